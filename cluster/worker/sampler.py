"""Token selection on the attention worker: per-row sampling specs become batch tensors for
kernels.sample (penalties, temperature, top-k/p, min-p, seeded draws, logprobs), vectorised; a
batch of greedy rows without penalties builds nothing but an argmax.

The draw for output token i of a request is uniform_draw(seed, i): a function of (seed, i) only, so
a seeded request gives the same tokens alone, in any batch, on any worker, and after preemption.
Shapes: B rows (sequences sampling this step), V vocab.
"""

from __future__ import annotations

from typing import Callable

import torch

from kernels import SamplingTensors, sample, uniform_draw
from kernels.sampling import Draws, Penalties, SampleResult

from .step import SamplingSpec


def _penalised(s: SamplingSpec) -> bool:
    return bool(s.presence_penalty or s.frequency_penalty or s.repetition_penalty != 1.0)


def sampling_tensors(specs: list[SamplingSpec], histories: list[list[int]], vocab_size: int,
                     device: torch.device | str = "cpu") -> SamplingTensors:
    """histories[i]: every token row i has fed so far (prompt, then outputs)."""
    on_host = torch.device(device).type == "cpu"

    def column(values, dtype=torch.float32):
        # on a GPU through pinned memory, without waiting: a plain host-to-device copy waits for the
        # device to drain (here, the step's forward), which async scheduling must not
        host = torch.tensor(values, dtype=dtype)
        return host if on_host else host.pin_memory().to(device, non_blocking=True)

    draws = penalties = None
    sampled = [s for s in specs if s.temperature > 0]
    if sampled:
        draws = Draws(
            temperature=column([s.temperature for s in specs]),
            top_k=column([s.top_k for s in specs], torch.long),
            top_p=column([s.top_p for s in specs]),
            min_p=column([s.min_p for s in specs]),
            uniform=column([uniform_draw(s.seed, len(h) - s.prompt_len) for s, h in zip(specs, histories)],
                           torch.float64),
            max_top_k=max(s.top_k for s in sampled),
            any_top_p=any(s.top_p < 1.0 for s in sampled),
            any_min_p=any(s.min_p > 0.0 for s in sampled),
        )
    rows = [i for i, s in enumerate(specs) if _penalised(s)]
    if rows:
        counts = torch.zeros(len(specs), vocab_size, device=device)
        seen = torch.zeros(len(specs), vocab_size, dtype=torch.bool, device=device)
        outputs = [(i, t) for i in rows for t in histories[i][specs[i].prompt_len :]]
        if outputs:
            index = column(outputs, torch.long)
            counts.index_put_((index[:, 0], index[:, 1]), torch.ones(len(outputs), device=device), accumulate=True)
        everything = column([(i, t) for i in rows for t in histories[i]], torch.long).view(-1, 2)
        seen[everything[:, 0], everything[:, 1]] = True
        penalties = Penalties(column([s.presence_penalty for s in specs]), column([s.frequency_penalty for s in specs]),
                              column([s.repetition_penalty for s in specs]), counts, seen)
    bias = None
    biased = [(i, t, b) for i, s in enumerate(specs) for t, b in s.logit_bias if t < vocab_size]
    if biased:
        bias = torch.zeros(len(specs), vocab_size, device=device)
        index = column([(i, t) for i, t, _ in biased], torch.long)
        bias.index_put_((index[:, 0], index[:, 1]), column([b for _, _, b in biased]), accumulate=True)
    return SamplingTensors(draws, penalties, max((s.logprobs for s in specs), default=-1), bias)


def sample_batch(
    logits_BV: torch.Tensor, specs: list[SamplingSpec], histories: list[list[int]]
) -> list[tuple[int, float, list[tuple[int, float]]]]:
    """Per row: (token id, its raw logprob, top-n raw logprobs); one batched selection."""
    return picks(sample(logits_BV, sampling_tensors(specs, histories, logits_BV.shape[-1], logits_BV.device)), specs)


def needs_history(specs: list[SamplingSpec]) -> bool:
    """True when the selection reads the tokens fed so far (penalties), not just how many there are."""
    return any(_penalised(s) for s in specs)


def copy_to_host(result: SampleResult) -> Callable[[], SampleResult]:
    """Starts copying a selection made on a GPU to the host (pinned buffers, without waiting);
    the function returned waits for the copy. On a CPU the selection itself."""
    if result.tokens.device.type == "cpu":
        return lambda: result
    host = SampleResult(*(None if t is None else torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                          .copy_(t, non_blocking=True)
                          for t in (result.tokens, result.logprobs, result.top_ids, result.top_logprobs)))
    copied = torch.cuda.Event()
    copied.record()

    def wait() -> SampleResult:
        copied.synchronize()
        return host

    return wait


def picks(result: SampleResult, specs: list[SamplingSpec]) -> list[tuple[int, float, list[tuple[int, float]]]]:
    """A selection's rows as (token id, raw logprob, top-n raw logprobs) on the host."""
    tokens = result.tokens.tolist()
    if result.logprobs is None:
        return [(token, 0.0, []) for token in tokens]
    logprobs, top_ids, top_values = result.logprobs.tolist(), result.top_ids.tolist(), result.top_logprobs.tolist()
    return [(token, logprob, list(zip(ids[: s.logprobs], values[: s.logprobs])) if s.logprobs > 0 else [])
            for token, logprob, ids, values, s in zip(tokens, logprobs, top_ids, top_values, specs)]
