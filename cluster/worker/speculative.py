"""Speculative decoding's token choices on the attention worker: drawing MTP drafts, and verifying
them against the target model's logits by rejection sampling.

Each draft d_j was drawn from a distribution q_j (the MTP logits under the request's temperature,
top-k/p and min-p; one-hot at the argmax for greedy requests). The target's distribution p_j is the
one the plain sampler would draw from at that position (logit bias, penalties over the history up
to it, temperature, filters; one-hot at the argmax for greedy). Draft j is accepted when
u_j < p_j(d_j) / q_j(d_j); the first rejected one is replaced by a draw from max(0, p_j - q_j)
(normalised), and when all k are accepted a bonus token is drawn from p_k. Each emitted token is
then distributed as the target's (Leviathan et al., 2023); with one-hot p and q this is exactly
greedy decoding: a draft is kept iff it is the target's argmax, and the replacement is the argmax.
Draws are functions of (seed, output index) as in the plain sampler, from streams of their own.
Shapes: R rows, V vocab, k drafts.
"""

from __future__ import annotations

import torch

from kernels import uniform_draw
from kernels.sampling import apply_penalties, filter_logits

from .sampler import sampling_tensors
from .step import SamplingSpec

ACCEPT_STREAM, DRAFT_STREAM = 0x5EC1, 0xD7AF  # seeds of the accept tests and the draft draws

Pick = tuple[int, float, list[tuple[int, float]]]  # token, its raw logprob, top raw logprobs


def distributions(logits_RV: torch.Tensor, specs: list[SamplingSpec], histories: list[list[int]],
                  penalised: bool = True) -> torch.Tensor:
    """What each row draws from, fp32 probabilities [R, V]; one-hot at the argmax for greedy rows
    (penalties and bias apply to those too, as in kernels.sample)."""
    st = sampling_tensors(specs, histories, logits_RV.shape[-1], logits_RV.device)
    logits = logits_RV.float()
    if penalised:
        logits = logits if st.bias is None else logits + st.bias
        logits = logits if st.penalties is None else apply_penalties(logits, st.penalties)
    probs = torch.zeros_like(logits).scatter_(1, logits.argmax(-1, keepdim=True), 1.0)
    if st.draws is not None:
        sampled = torch.softmax(filter_logits(logits, st.draws), dim=-1)
        probs = torch.where((st.draws.temperature > 0)[:, None], sampled, probs)
    return probs


def _draw(probs_V: torch.Tensor, u: float) -> int:
    """Inverse CDF draw from (unnormalised) probabilities."""
    cdf = probs_V.double().cumsum(0)
    index = int(torch.searchsorted(cdf, torch.tensor([u * float(cdf[-1])], dtype=cdf.dtype), right=True))
    return min(index, probs_V.shape[0] - 1)


def draw_drafts(logits_BV: torch.Tensor, specs: list[SamplingSpec], output_index: list[int]
                ) -> tuple[list[int], torch.Tensor | None]:
    """One draft per row from the MTP logits (no penalties: any q is valid, it only sets the
    acceptance rate); output_index[i]: the output position the draft stands for. Returns the
    tokens and their distributions q [B, V] (None when every row is greedy: q is the argmax)."""
    if all(s.temperature == 0 for s in specs):
        return logits_BV.argmax(-1).tolist(), None
    q = distributions(logits_BV, specs, [[]] * len(specs), penalised=False)
    tokens = q.argmax(-1).tolist()
    for i, s in enumerate(specs):
        if s.temperature > 0:
            tokens[i] = _draw(q[i], uniform_draw(s.seed ^ DRAFT_STREAM, output_index[i]))
    return tokens, q


def _pick(raw_logprobs_V: torch.Tensor, token: int, n: int) -> Pick:
    if n < 0:
        return token, 0.0, []
    top = torch.topk(raw_logprobs_V, n) if n > 0 else None
    pairs = list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else []
    return token, float(raw_logprobs_V[token]), pairs


def verify(logits_RV: torch.Tensor, spec: SamplingSpec, history: list[int], drafts: list[int],
           draft_probs: torch.Tensor | None) -> list[Pick]:
    """One sequence's verify chunk: logits [k + 1, V] at its last token and its k drafts; history
    ends with the drafts (the chunk's tokens); draft_probs [k, V] the q they came from (None for
    greedy drafts). Returns the tokens emitted: the accepted drafts, then the replacement or bonus
    token (1 .. k + 1)."""
    k = len(drafts)
    base = len(history) - k  # tokens fed up to and including row 0
    raw = torch.log_softmax(logits_RV.float(), dim=-1) if spec.logprobs >= 0 else None

    def emit(j: int, token: int) -> Pick:
        return _pick(raw[j], token, spec.logprobs) if raw is not None else (token, 0.0, [])

    histories = [history[: base + j] for j in range(k + 1)]
    if spec.temperature == 0:  # the same as the general rule with one-hot p and q, without building them
        plain = not (spec.logit_bias or spec.presence_penalty or spec.frequency_penalty
                     or spec.repetition_penalty != 1.0)
        best = (logits_RV if plain else distributions(logits_RV, [spec] * (k + 1), histories)).argmax(-1).tolist()
        out = []
        for j, d in enumerate(drafts):
            if best[j] != d:
                return [*out, emit(j, best[j])]
            out.append(emit(j, d))
        return [*out, emit(k, best[k])]
    p = distributions(logits_RV, [spec] * (k + 1), histories)
    if draft_probs is None:  # greedy drafts for a sampled request (not made by the runner): q one-hot
        draft_probs = torch.zeros_like(p[:k]).scatter_(1, torch.tensor(drafts, device=p.device)[:, None], 1.0)
    out: list[Pick] = []
    for j, d in enumerate(drafts):
        index = base + j - spec.prompt_len  # output index of the token row j predicts
        ratio = float(p[j, d]) / max(float(draft_probs[j, d]), 1e-30)
        if uniform_draw(spec.seed ^ ACCEPT_STREAM, index) < ratio:
            out.append(emit(j, d))
            continue
        residual = (p[j] - draft_probs[j]).clamp_min(0)
        if float(residual.sum()) <= 0:  # p == q up to rounding: any draw from p will do
            residual = p[j]
        out.append(emit(j, _draw(residual, uniform_draw(spec.seed, index))))
        return out
    bonus = _draw(p[k], uniform_draw(spec.seed, base + k - spec.prompt_len))
    out.append(emit(k, bonus))
    return out
