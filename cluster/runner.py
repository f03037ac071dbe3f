"""ModelRunner: the attention worker's side of a step.

Owns the dense model, the paged KV cache and DeltaNet state slots (allocated once from a
CacheLayout) and, per sequence, its block table, slot, sampling spec and token history. Executes one
StepInput: lays the chunks out as a flat batch, runs the model once, samples where asked.
Plain Python around torch: the engine calls it directly in one process; an AttentionWorker wraps it
on Ray.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from attention import DeltaNetStateCache, ForwardBatch, PagedKVCache, SequenceSlice
from router import ExpertLoadWindow

from .cache_plan import CacheLayout
from .model import Qwen35MoeModel
from .sampler import sample_batch
from .step import ChunkResult, SamplingSpec, StepInput


@dataclass
class _SequenceState:
    slot: int
    sampling: SamplingSpec
    block_table: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)  # every token fed so far (prompt, then outputs)


class ModelRunner:
    def __init__(self, model: Qwen35MoeModel, layout: CacheLayout, spmd: bool = False,
                 load_window_steps: int = 64) -> None:
        self.model = model
        cfg = model.cfg
        self.device = model.embed_tokens.weight.device
        dtype = model.embed_tokens.weight.dtype
        full = [i for i, t in enumerate(cfg.layer_types) if t == "full_attention"]
        linear = [i for i, t in enumerate(cfg.layer_types) if t == "linear_attention"]
        self.kv = PagedKVCache(full, layout.num_blocks, layout.block_size, cfg.num_key_value_heads,
                               cfg.head_dim, dtype, self.device)
        conv_channels = 2 * cfg.linear_num_key_heads * cfg.linear_key_head_dim + (
            cfg.linear_num_value_heads * cfg.linear_value_head_dim)
        self.states = DeltaNetStateCache(linear, layout.num_slots, conv_channels, cfg.linear_conv_kernel_dim,
                                         cfg.linear_num_value_heads, cfg.linear_key_head_dim,
                                         cfg.linear_value_head_dim, dtype, self.device)
        # spmd: the model's MoE layers join collectives, so even an empty step runs the forward
        self.spmd = spmd
        self.sequences: dict[int, _SequenceState] = {}
        self.load = ExpertLoadWindow(cfg.num_hidden_layers, cfg.num_experts, load_window_steps)
        for moe in model.moe_layers():
            moe.load = self.load

    def execute(self, step: StepInput) -> list[ChunkResult]:
        for seq_id in step.freed:
            self.sequences.pop(seq_id, None)
        if not step.chunks and not self.spmd:
            return []
        slices, ids, positions, start = [], [], [], 0
        for chunk in step.chunks:
            if chunk.past == 0:
                self.sequences[chunk.seq_id] = _SequenceState(chunk.slot, chunk.sampling or SamplingSpec())
            seq = self.sequences[chunk.seq_id]
            if len(seq.tokens) != chunk.past:
                raise RuntimeError(f"sequence {chunk.seq_id}: worker has {len(seq.tokens)} tokens, "
                                   f"step says {chunk.past}")
            seq.block_table.extend(chunk.new_blocks)
            seq.tokens.extend(chunk.token_ids)
            n = len(chunk.token_ids)
            table = torch.tensor(seq.block_table, dtype=torch.long, device=self.device)
            slices.append(SequenceSlice(start, n, chunk.past, table, seq.slot))
            ids.extend(chunk.token_ids)
            positions.extend(range(chunk.past, chunk.past + n))
            start += n
        as_long = dict(dtype=torch.long, device=self.device)
        batch = ForwardBatch(torch.tensor(positions, **as_long), slices, self.kv, self.states)
        hidden = self.model(torch.tensor(ids, **as_long), batch)
        if not step.chunks:
            return []
        self.load.advance()
        return self._results(step, slices, hidden)

    def _results(self, step: StepInput, slices: list[SequenceSlice], hidden: torch.Tensor) -> list[ChunkResult]:
        results = [ChunkResult(chunk.seq_id) for chunk in step.chunks]
        for chunk, s, result in zip(step.chunks, slices, results):
            if chunk.want_logits:
                result.logits = self.model.logits(hidden[s.rows]).cpu()
        sampling = [i for i, chunk in enumerate(step.chunks) if chunk.sample]
        if sampling:
            last_rows = torch.tensor([slices[i].start + slices[i].length - 1 for i in sampling], device=self.device)
            logits = self.model.logits(hidden[last_rows])
            seqs = [self.sequences[step.chunks[i].seq_id] for i in sampling]
            picks = sample_batch(logits, [s.sampling for s in seqs], [s.tokens for s in seqs])
            for i, (token, logprob, top) in zip(sampling, picks):
                results[i].token_id, results[i].logprob, results[i].top_logprobs = token, logprob, top
        return results
