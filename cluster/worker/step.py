"""The step message between the engine (scheduler) and an attention worker, and its reply.

A step message carries only what changed since the last one: new tokens of each scheduled
sequence, the KV blocks appended to its block table, and — with a sequence's first chunk (past == 0,
a new or recomputed sequence) — its state slot, sampling spec and images. Sequences that finished, were
cancelled or preempted are listed in `freed`; the worker forgets them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vision import PreparedImage

# a chunk's token that the step before, still in flight, samples (async scheduling): the worker
# feeds the token it sampled there, on the device
FUTURE_TOKEN = -1


@dataclass(frozen=True)
class SamplingSpec:
    """How the worker picks a sequence's next token (see cluster.engine.sampling.SamplingParams)."""

    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    min_p: float = 0.0
    seed: int = 0  # the engine always sets one: sampling is a function of (seed, output index)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: int = -1  # -1: none; n >= 0: the sampled token's logprob and the top n
    prompt_len: int = 0  # tokens before this index are prompt (penalties treat them apart)
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added logit)


@dataclass(slots=True)  # not frozen: a frozen dataclass's __init__ costs 5x, per chunk per step
class ScheduledChunk:
    seq_id: int
    token_ids: tuple[int, ...]  # tokens computed this step: a prompt chunk or the last sampled token
    # (FUTURE_TOKEN when that is not back yet)
    past: int  # tokens of this sequence already cached on the worker (0: start afresh)
    new_blocks: tuple[int, ...] = ()  # KV blocks appended to the sequence's block table
    slot: int = -1  # DeltaNet state slot; sent when past == 0
    sample: bool = True  # the chunk reaches the last known token: sample the next one
    want_logits: bool = False  # return fp32 logits of every position of the chunk (scoring)
    sampling: SamplingSpec | None = None  # sent when past == 0
    # speculative decoding (MTP) with k = spec_tokens > 0: the MTP layer also runs over the chunk's
    # rows (its K/V stay complete) and, when the chunk samples, drafts k tokens the worker keeps
    spec_tokens: int = 0
    verify: bool = False  # the chunk's rows are token_ids + the worker's k drafts, verified this step
    next_token: int = -1  # the token after a chunk that does not sample (its last MTP row's input)
    # the prompt's images, sent when past == 0: (index of its first image token, the image)
    images: tuple[tuple[int, PreparedImage], ...] = ()

    @property
    def rows(self) -> int:
        """Rows this chunk adds to the step's flat batch."""
        return len(self.token_ids) + (self.spec_tokens if self.verify else 0)


@dataclass(frozen=True)
class StepInput:
    chunks: tuple[ScheduledChunk, ...]
    freed: tuple[int, ...] = field(default=())  # seq ids to forget before this step


@dataclass
class ChunkResult:
    seq_id: int
    token_id: int = -1  # the sampled next token, -1 when the chunk did not sample
    logprob: float = 0.0  # its log-probability under the model (raw logits)
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)
    logits: torch.Tensor | None = None  # [n, V] fp32, only for want_logits chunks
    # a verify chunk: the drafts accepted, as (token, logprob, top logprobs), emitted before token_id
    accepted: list[tuple[int, float, list[tuple[int, float]]]] = field(default_factory=list)


def micro_batches(chunks: tuple[ScheduledChunk, ...], overlap: bool) -> list[tuple[ScheduledChunk, ...]]:
    """How a step's chunks split into micro-batches: two halves by rows (whole sequences each) when
    two-batch overlap is on and there are two sequences or more, else one. The engine (for the
    expert workers' message sizes) and the attention worker (for its forward) both call this."""
    if not overlap or len(chunks) < 2:
        return [chunks]
    total, running = sum(c.rows for c in chunks), 0
    for i, chunk in enumerate(chunks[:-1]):
        running += chunk.rows
        if 2 * running >= total:
            return [chunks[: i + 1], chunks[i + 1 :]]
    return [chunks[:-1], chunks[-1:]]


def mtp_pass_rows(chunks: tuple[ScheduledChunk, ...]) -> list[int]:
    """Rows of each MTP pass of a step (the expert workers' message sizes for the MTP layer): the
    rows of every speculating chunk, then k - 1 draft passes of one row per speculating chunk that
    samples. [] when nothing speculates."""
    spec = [c for c in chunks if c.spec_tokens]
    if not spec:
        return []
    drafting = sum(1 for c in spec if c.sample)
    return [sum(c.rows for c in spec)] + [drafting] * (spec[0].spec_tokens - 1)
