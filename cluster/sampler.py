"""Token selection on the attention worker: per-row sampling specs become batch tensors for
kernels.sample (penalties, temperature, top-k/p, min-p, seeded draws, logprobs), vectorised.

The draw for output token i of a request is uniform_draw(seed, i): a function of (seed, i) only, so
a seeded request gives the same tokens alone, in any batch, on any worker, and after preemption.
Shapes: B rows (sequences sampling this step), V vocab.
"""

from __future__ import annotations

import torch

from kernels import SamplingTensors, sample, uniform_draw

from .step import SamplingSpec


def sampling_tensors(specs: list[SamplingSpec], histories: list[list[int]], vocab_size: int,
                     device: torch.device | str = "cpu") -> SamplingTensors:
    """histories[i]: every token row i has fed so far (prompt, then outputs)."""

    def column(values, dtype=torch.float32):
        return torch.tensor(values, dtype=dtype, device=device)

    penalised = [i for i, s in enumerate(specs)
                 if s.presence_penalty or s.frequency_penalty or s.repetition_penalty != 1.0]
    counts = seen = None
    if penalised:
        B = len(specs)
        counts = torch.zeros(B, vocab_size, device=device)
        seen = torch.zeros(B, vocab_size, dtype=torch.bool, device=device)
        out_rows = [i for i in penalised for _ in histories[i][specs[i].prompt_len :]]
        out_tokens = [t for i in penalised for t in histories[i][specs[i].prompt_len :]]
        if out_tokens:
            counts.index_put_((column(out_rows, torch.long), column(out_tokens, torch.long)),
                              torch.ones(len(out_tokens), device=device), accumulate=True)
        all_rows = [i for i in penalised for _ in histories[i]]
        all_tokens = [t for i in penalised for t in histories[i]]
        if all_tokens:
            seen[column(all_rows, torch.long), column(all_tokens, torch.long)] = True
    return SamplingTensors(
        temperature=column([s.temperature for s in specs]),
        top_k=column([s.top_k for s in specs], torch.long),
        top_p=column([s.top_p for s in specs]),
        min_p=column([s.min_p for s in specs]),
        uniform=column([uniform_draw(s.seed, len(h) - s.prompt_len) for s, h in zip(specs, histories)],
                       torch.float64),
        presence_penalty=column([s.presence_penalty for s in specs]),
        frequency_penalty=column([s.frequency_penalty for s in specs]),
        repetition_penalty=column([s.repetition_penalty for s in specs]),
        output_counts=counts, seen=seen,
        num_logprobs=max((s.logprobs for s in specs), default=-1),
        all_greedy=all(s.temperature == 0.0 for s in specs),
        max_top_k=max((s.top_k for s in specs if s.temperature > 0), default=0),
        any_top_p=any(s.top_p < 1.0 and s.temperature > 0 for s in specs),
        any_min_p=any(s.min_p > 0.0 and s.temperature > 0 for s in specs),
    )


def sample_batch(
    logits_BV: torch.Tensor, specs: list[SamplingSpec], histories: list[list[int]]
) -> list[tuple[int, float, list[tuple[int, float]]]]:
    """Per row: (token id, its raw logprob, top-n raw logprobs); one batched selection."""
    st = sampling_tensors(specs, histories, logits_BV.shape[-1], logits_BV.device)
    result = sample(logits_BV, st)
    tokens = result.tokens.tolist()
    if result.logprobs is None:
        return [(token, 0.0, []) for token in tokens]
    logprobs, top_ids, top_values = result.logprobs.tolist(), result.top_ids.tolist(), result.top_logprobs.tolist()
    return [(token, logprob, list(zip(ids[: s.logprobs], values[: s.logprobs])) if s.logprobs > 0 else [])
            for token, logprob, ids, values, s in zip(tokens, logprobs, top_ids, top_values, specs)]
