"""ModelRunner: owns the model and the caches of its sequences, and executes one step.

A step is a flat batch of chunks (new tokens of several sequences, prefill and decode mixed); the
runner lays them out, runs the model once, and returns logits for each chunk. Plain Python around
torch: the engine calls it directly in one process, and an AttentionWorker wraps it on Ray.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from attention import SequenceCache, SequenceSlice

from .model import Qwen35MoeModel


@dataclass(frozen=True)
class SequenceChunk:
    seq_id: int  # engine-assigned; a new id starts a fresh cache
    token_ids: tuple[int, ...]  # tokens to feed now, following those already cached
    all_logits: bool = False  # logits for every token (scoring) or only the last (generation)


@dataclass(frozen=True)
class StepInput:
    chunks: tuple[SequenceChunk, ...]
    finished: tuple[int, ...] = field(default=())  # seq ids whose caches are dropped first


class ModelRunner:
    def __init__(self, model: Qwen35MoeModel, spmd: bool = False) -> None:
        self.model = model
        self.device = model.embed_tokens.weight.device
        # spmd: the model's MoE layers join collectives, so even an empty step runs the forward
        self.spmd = spmd
        self.caches: dict[int, SequenceCache] = {}

    def execute(self, step: StepInput) -> list[torch.Tensor]:
        """Returns per chunk fp32 logits [n, V] (all_logits) or [1, V]."""
        for seq_id in step.finished:
            self.caches.pop(seq_id, None)
        if not step.chunks and not self.spmd:
            return []
        slices, ids, positions, start = [], [], [], 0
        for chunk in step.chunks:
            cache = self.caches.setdefault(chunk.seq_id, self.model.new_cache())
            n = len(chunk.token_ids)
            slices.append(SequenceSlice(start, n, cache))
            ids.extend(chunk.token_ids)
            positions.extend(range(cache.num_tokens, cache.num_tokens + n))
            start += n
        as_long = dict(dtype=torch.long, device=self.device)
        hidden = self.model(torch.tensor(ids, **as_long), torch.tensor(positions, **as_long), slices)
        if not step.chunks:
            return []
        rows = [
            torch.arange(s.start, s.start + s.length) if chunk.all_logits
            else torch.tensor([s.start + s.length - 1])
            for chunk, s in zip(step.chunks, slices)
        ]
        logits = self.model.logits(hidden[torch.cat(rows).to(self.device)])
        return list(logits.cpu().split([len(r) for r in rows]))
