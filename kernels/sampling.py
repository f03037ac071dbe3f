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
class SamplingTensors:
    """Per-row parameters [B] (on the logits' device); the host flags skip whole stages."""

    temperature: torch.Tensor  # fp32; 0: greedy
    top_k: torch.Tensor  # int64; 0: off
    top_p: torch.Tensor  # fp32; 1: off
    min_p: torch.Tensor  # fp32; 0: off
    uniform: torch.Tensor  # fp64 draws in [0, 1)
    presence_penalty: torch.Tensor  # fp32
    frequency_penalty: torch.Tensor  # fp32
    repetition_penalty: torch.Tensor  # fp32; 1: off
    output_counts: torch.Tensor | None  # [B, V] fp32 occurrences in the output; None: no penalties
    seen: torch.Tensor | None  # [B, V] bool: in the prompt or the output
    # host-side summaries, so that no stage asks the device what it holds
    num_logprobs: int  # largest n asked for; -1: no row wants logprobs
    all_greedy: bool
    max_top_k: int  # 0: no row filters by top-k
    any_top_p: bool
    any_min_p: bool


@dataclass
class SampleResult:
    tokens: torch.Tensor  # [B] int64
    logprobs: torch.Tensor | None  # [B] raw logprob of each token (None when num_logprobs < 0)
    top_ids: torch.Tensor | None  # [B, n]
    top_logprobs: torch.Tensor | None  # [B, n]


def apply_penalties(logits_BV: torch.Tensor, st: SamplingTensors) -> torch.Tensor:
    """OpenAI presence/frequency penalties on output tokens; HF repetition penalty on seen tokens."""
    rep = st.repetition_penalty[:, None]
    logits_BV = torch.where(st.seen, torch.where(logits_BV > 0, logits_BV / rep, logits_BV * rep), logits_BV)
    counts = st.output_counts
    return logits_BV - st.frequency_penalty[:, None] * counts - st.presence_penalty[:, None] * (counts > 0)


def filter_logits(logits_BV: torch.Tensor, st: SamplingTensors) -> torch.Tensor:
    """Temperature, then top-k, top-p (nucleus) and min-p: filtered entries become -inf."""
    inf = float("-inf")
    temperature = torch.where(st.temperature > 0, st.temperature, 1.0)
    logits_BV = logits_BV / temperature[:, None]
    if st.max_top_k > 0:
        top = torch.topk(logits_BV, min(st.max_top_k, logits_BV.shape[1]), dim=-1).values
        kth = top.gather(1, (st.top_k.clamp(1, top.shape[1]) - 1)[:, None])
        logits_BV = logits_BV.masked_fill((st.top_k[:, None] > 0) & (logits_BV < kth), inf)
    if st.any_top_p:
        sorted_logits, order = torch.sort(logits_BV, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        drop_sorted = (probs.cumsum(-1) - probs >= st.top_p[:, None]) & (st.top_p[:, None] < 1)
        logits_BV = logits_BV.masked_fill(torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted), inf)
    if st.any_min_p:
        probs = torch.softmax(logits_BV, dim=-1)
        logits_BV = logits_BV.masked_fill(probs < st.min_p[:, None] * probs.max(-1, keepdim=True).values, inf)
    return logits_BV


def _draw(filtered_BV: torch.Tensor, uniform_B: torch.Tensor) -> torch.Tensor:
    """Inverse CDF: the first token whose cumulative probability passes u * total."""
    cdf = torch.softmax(filtered_BV, dim=-1).cumsum(-1)
    total = cdf[:, -1:]
    value = torch.minimum(uniform_B[:, None].to(cdf.dtype) * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, value, right=True)[:, 0]


def sample(logits_BV: torch.Tensor, st: SamplingTensors) -> SampleResult:
    logits_BV = logits_BV.float()
    penalised = apply_penalties(logits_BV, st) if st.output_counts is not None else logits_BV
    tokens = penalised.argmax(-1)
    if not st.all_greedy:
        drawn = _draw(filter_logits(penalised, st), st.uniform)
        tokens = torch.where(st.temperature > 0, drawn, tokens)
    return _with_logprobs(logits_BV, tokens, st.num_logprobs)


def _with_logprobs(logits_BV: torch.Tensor, tokens: torch.Tensor, n: int) -> SampleResult:
    if n < 0:
        return SampleResult(tokens, None, None, None)
    raw = torch.log_softmax(logits_BV, dim=-1)
    top = torch.topk(raw, n, dim=-1)
    return SampleResult(tokens, raw.gather(1, tokens[:, None])[:, 0], top.indices, top.values)


def sample_reference(logits_BV: torch.Tensor, st: SamplingTensors) -> SampleResult:
    """Row by row: each row's parameters applied to its own logits."""
    logits_BV = logits_BV.float()
    tokens = []
    for row in range(logits_BV.shape[0]):
        one = SamplingTensors(
            st.temperature[row : row + 1], st.top_k[row : row + 1], st.top_p[row : row + 1],
            st.min_p[row : row + 1], st.uniform[row : row + 1], st.presence_penalty[row : row + 1],
            st.frequency_penalty[row : row + 1], st.repetition_penalty[row : row + 1],
            None if st.output_counts is None else st.output_counts[row : row + 1],
            None if st.seen is None else st.seen[row : row + 1], -1, False,
            int(st.top_k[row]), bool(st.top_p[row] < 1), bool(st.min_p[row] > 0))
        logits = logits_BV[row : row + 1]
        if one.output_counts is not None:
            logits = apply_penalties(logits, one)
        if float(one.temperature) == 0.0:
            tokens.append(int(logits.argmax()))
        else:
            tokens.append(int(_draw(filter_logits(logits, one), one.uniform)))
    return _with_logprobs(logits_BV, torch.tensor(tokens, device=logits_BV.device), st.num_logprobs)
