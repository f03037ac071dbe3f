"""Token selection for a batch of rows, each with its own sampling parameters, vectorised over the
batch, with a row-by-row reference beside it.

Order of operations (as vLLM): penalties on the raw logits, then temperature, then top-k, top-p and
min-p filtering, then a draw by inverse CDF with one uniform number per row. The uniform comes from
`uniform_draw(seed, output index)`, so a seeded request gives the same tokens alone, in any batch,
on any worker and after preemption. Logprobs are those of the raw model logits.
Shapes: B rows, V vocab, n top logprobs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_MASK64 = (1 << 64) - 1


def uniform_draw(seed: int, index: int) -> float:
    """A uniform number in [0, 1) from (seed, index) alone (splitmix64)."""
    z = (seed * 0x9E3779B97F4A7C15 + (index + 1) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return ((z ^ (z >> 31)) >> 11) * 2.0**-53


@dataclass
class Penalties:
    """Per row [B]; counts and seen [B, V]."""

    presence: torch.Tensor  # fp32: subtracted once from every token in the output
    frequency: torch.Tensor  # fp32: subtracted per occurrence in the output
    repetition: torch.Tensor  # fp32: divides positive, multiplies negative logits of seen tokens; 1: off
    output_counts: torch.Tensor  # fp32 occurrences in the output
    seen: torch.Tensor  # bool: in the prompt or the output


@dataclass
class Draws:
    """Per row [B] (greedy rows included: their draw is ignored); the host flags skip stages."""

    temperature: torch.Tensor  # fp32; 0: greedy
    top_k: torch.Tensor  # int64; 0: off
    top_p: torch.Tensor  # fp32; 1: off
    min_p: torch.Tensor  # fp32; 0: off
    uniform: torch.Tensor  # fp64 draws in [0, 1)
    max_top_k: int  # 0: no sampled row filters by top-k
    any_top_p: bool
    any_min_p: bool


@dataclass
class SamplingTensors:
    draws: Draws | None  # None: every row is greedy
    penalties: Penalties | None  # None: no row is penalised
    num_logprobs: int  # largest n asked for; -1: no row wants logprobs
    bias: torch.Tensor | None = None  # [B, V] added to the logits first (OpenAI logit_bias); None: none


@dataclass
class SampleResult:
    tokens: torch.Tensor  # [B] int64
    logprobs: torch.Tensor | None  # [B] raw logprob of each token (None when num_logprobs < 0)
    top_ids: torch.Tensor | None  # [B, n]
    top_logprobs: torch.Tensor | None  # [B, n]


def apply_penalties(logits_BV: torch.Tensor, p: Penalties) -> torch.Tensor:
    """OpenAI presence/frequency penalties on output tokens; HF repetition penalty on seen tokens."""
    rep = p.repetition[:, None]
    logits_BV = torch.where(p.seen, torch.where(logits_BV > 0, logits_BV / rep, logits_BV * rep), logits_BV)
    counts = p.output_counts
    return logits_BV - p.frequency[:, None] * counts - p.presence[:, None] * (counts > 0)


def filter_logits(logits_BV: torch.Tensor, d: Draws) -> torch.Tensor:
    """Temperature, then top-k, top-p (nucleus) and min-p: filtered entries become -inf."""
    inf = float("-inf")
    logits_BV = logits_BV / torch.where(d.temperature > 0, d.temperature, 1.0)[:, None]
    if d.max_top_k > 0:
        top = torch.topk(logits_BV, min(d.max_top_k, logits_BV.shape[1]), dim=-1).values
        kth = top.gather(1, (d.top_k.clamp(1, top.shape[1]) - 1)[:, None])
        logits_BV = logits_BV.masked_fill((d.top_k[:, None] > 0) & (logits_BV < kth), inf)
    if d.any_top_p:
        sorted_logits, order = torch.sort(logits_BV, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        drop_sorted = (probs.cumsum(-1) - probs >= d.top_p[:, None]) & (d.top_p[:, None] < 1)
        logits_BV = logits_BV.masked_fill(torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted), inf)
    if d.any_min_p:
        probs = torch.softmax(logits_BV, dim=-1)
        logits_BV = logits_BV.masked_fill(probs < d.min_p[:, None] * probs.max(-1, keepdim=True).values, inf)
    return logits_BV


def _draw(filtered_BV: torch.Tensor, uniform_B: torch.Tensor) -> torch.Tensor:
    """Inverse CDF: the first token whose cumulative probability passes u * total."""
    cdf = torch.softmax(filtered_BV, dim=-1).cumsum(-1)
    total = cdf[:, -1:]
    value = torch.minimum(uniform_B[:, None].to(cdf.dtype) * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, value, right=True)[:, 0]


def sample(logits_BV: torch.Tensor, st: SamplingTensors) -> SampleResult:
    logits_BV = logits_BV.float()
    biased = logits_BV if st.bias is None else logits_BV + st.bias
    penalised = biased if st.penalties is None else apply_penalties(biased, st.penalties)
    tokens = penalised.argmax(-1)
    if st.draws is not None:
        drawn = _draw(filter_logits(penalised, st.draws), st.draws.uniform)
        tokens = torch.where(st.draws.temperature > 0, drawn, tokens)
    return _with_logprobs(logits_BV, tokens, st.num_logprobs)


def _with_logprobs(logits_BV: torch.Tensor, tokens: torch.Tensor, n: int) -> SampleResult:
    if n < 0:
        return SampleResult(tokens, None, None, None)
    raw = torch.log_softmax(logits_BV, dim=-1)
    top = torch.topk(raw, n, dim=-1)
    return SampleResult(tokens, raw.gather(1, tokens[:, None])[:, 0], top.indices, top.values)


def _row(t, i: int):
    """Row i of a Draws / Penalties, as a batch of one."""
    if t is None:
        return None
    fields = {k: (v[i : i + 1] if isinstance(v, torch.Tensor) else v) for k, v in vars(t).items()}
    if isinstance(t, Draws):  # the host flags of that row alone
        fields.update(max_top_k=int(t.top_k[i]), any_top_p=bool(t.top_p[i] < 1), any_min_p=bool(t.min_p[i] > 0))
    return type(t)(**fields)


def sample_reference(logits_BV: torch.Tensor, st: SamplingTensors) -> SampleResult:
    """Row by row: each row's parameters applied to its own logits."""
    logits_BV = logits_BV.float()
    tokens = []
    for i in range(logits_BV.shape[0]):
        logits, draws, penalties = logits_BV[i : i + 1], _row(st.draws, i), _row(st.penalties, i)
        if st.bias is not None:
            logits = logits + st.bias[i : i + 1]
        if penalties is not None:
            logits = apply_penalties(logits, penalties)
        if draws is None or float(draws.temperature) == 0.0:
            tokens.append(int(logits.argmax()))
        else:
            tokens.append(int(_draw(filter_logits(logits, draws), draws.uniform)))
    return _with_logprobs(logits_BV, torch.tensor(tokens, device=logits_BV.device), st.num_logprobs)
