"""Token selection for a batch of sequences with their own sampling specs, on the attention worker.

Order of operations (as vLLM): penalties on the raw logits, then temperature, then top-k, top-p and
min-p filtering, then a draw. The draw for output token i of a request is a function of (seed, i)
only, so a seeded request gives the same tokens alone, in any batch, on any worker, and after
preemption. Logprobs are those of the raw model logits.
Shapes: B rows (sequences sampling this step), V vocab.
"""

from __future__ import annotations

import torch

from .step import SamplingSpec


def _draw_key(seed: int, index: int) -> int:
    return (seed * 1_000_003 + index) % (2**63 - 1)


def apply_penalties(logits_V: torch.Tensor, spec: SamplingSpec, history: list[int]) -> torch.Tensor:
    """OpenAI presence/frequency penalties on output tokens; HF repetition penalty on all tokens."""
    out_tokens = history[spec.prompt_len :]
    if spec.repetition_penalty != 1.0 and history:
        seen = torch.tensor(sorted(set(history)), device=logits_V.device)
        values = logits_V[seen]
        logits_V[seen] = torch.where(values > 0, values / spec.repetition_penalty,
                                     values * spec.repetition_penalty)
    if (spec.presence_penalty or spec.frequency_penalty) and out_tokens:
        counts = torch.bincount(torch.tensor(out_tokens, device=logits_V.device),
                                minlength=logits_V.shape[0]).to(logits_V.dtype)
        logits_V -= spec.frequency_penalty * counts + spec.presence_penalty * (counts > 0)
    return logits_V


def filter_logits(logits_V: torch.Tensor, spec: SamplingSpec) -> torch.Tensor:
    """Temperature, then top-k, top-p (nucleus) and min-p: filtered entries become -inf."""
    logits_V = logits_V / spec.temperature
    if 0 < spec.top_k < logits_V.shape[0]:
        kth = torch.topk(logits_V, spec.top_k).values[-1]
        logits_V = logits_V.masked_fill(logits_V < kth, float("-inf"))
    if spec.top_p < 1.0:
        sorted_logits, order = torch.sort(logits_V, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        drop_sorted = cumulative - torch.softmax(sorted_logits, dim=-1) >= spec.top_p  # keep >= 1 token
        logits_V = logits_V.masked_fill(torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted),
                                        float("-inf"))
    if spec.min_p > 0.0:
        probs = torch.softmax(logits_V, dim=-1)
        logits_V = logits_V.masked_fill(probs < spec.min_p * probs.max(), float("-inf"))
    return logits_V


def sample_batch(
    logits_BV: torch.Tensor, specs: list[SamplingSpec], histories: list[list[int]]
) -> list[tuple[int, float, list[tuple[int, float]]]]:
    """Per row: (token id, its raw logprob, top-n raw logprobs)."""
    raw_logprobs = torch.log_softmax(logits_BV.float(), dim=-1)
    results = []
    for row, (spec, history) in enumerate(zip(specs, histories)):
        logits = apply_penalties(logits_BV[row].float().clone(), spec, history)
        if spec.temperature == 0.0:
            token = int(torch.argmax(logits))
        else:
            probs = torch.softmax(filter_logits(logits, spec), dim=-1)
            generator = torch.Generator(device=logits.device)
            generator.manual_seed(_draw_key(spec.seed, len(history) - spec.prompt_len))
            # exponential race: argmax(p / E), E ~ Exp(1), draws token t with probability p_t
            race = torch.empty_like(probs).exponential_(generator=generator)
            token = int(torch.argmax(probs / race))
        top = []
        if spec.logprobs > 0:
            values, ids = torch.topk(raw_logprobs[row], spec.logprobs)
            top = list(zip(ids.tolist(), values.tolist()))
        results.append((token, float(raw_logprobs[row, token]), top))
    return results
