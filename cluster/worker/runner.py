"""ModelRunner: the attention worker's side of a step.

Owns the dense model, the paged KV cache and DeltaNet state slots (allocated once from a
CacheLayout) and, per sequence, its block table, slot, sampling spec and token history. Executes one
StepInput: lays the chunks out as one flat batch (decodes first, then prefill chunks), runs the
model once, samples where asked. Plain Python around torch: the engine calls it directly in one
process; an AttentionWorker wraps it on Ray.

A transactional runner (an AttentionWorker's, whose experts live in other processes that may die)
can undo a step that fails half-way: it copies the step's DeltaNet states before the forward and
puts them back, with its token and block bookkeeping, when the forward raises. K/V writes need no
undo: a replay writes the same bits to the same places before any row reads them.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch

from attention import DeltaNetStateCache, ForwardBatch, PagedKVCache
from router import ExpertLoadWindow

from ..engine.cache_plan import CacheLayout
from ..model.model import Qwen35MoeModel
from .sampler import sample_batch
from .step import ChunkResult, SamplingSpec, ScheduledChunk, StepInput, micro_batches


@dataclass
class _SequenceState:
    slot: int
    sampling: SamplingSpec
    block_table: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)  # every token fed so far (prompt, then outputs)


class ModelRunner:
    def __init__(self, model: Qwen35MoeModel, layout: CacheLayout, load_window_steps: int = 64,
                 overlap: bool = False, transactional: bool = False) -> None:
        self.model = model
        model.fuse()
        cfg = model.cfg
        self.device = model.embed_tokens.weight.device
        dtype = model.embed_tokens.weight.dtype
        full = [i for i, t in enumerate(cfg.layer_types) if t == "full_attention"]
        linear = [i for i, t in enumerate(cfg.layer_types) if t == "linear_attention"]
        self.block_size = layout.block_size
        self.kv = PagedKVCache(full, layout.num_blocks, layout.block_size, cfg.num_key_value_heads,
                               cfg.head_dim, dtype, self.device)
        conv_channels = 2 * cfg.linear_num_key_heads * cfg.linear_key_head_dim + (
            cfg.linear_num_value_heads * cfg.linear_value_head_dim)
        self.states = DeltaNetStateCache(linear, layout.num_slots, conv_channels, cfg.linear_conv_kernel_dim,
                                         cfg.linear_num_value_heads, cfg.linear_key_head_dim,
                                         cfg.linear_value_head_dim, dtype, self.device)
        self.overlap = overlap  # two micro-batches per step (expert workers elsewhere: cluster.worker.step)
        self.transactional = transactional
        self.sequences: dict[int, _SequenceState] = {}
        self.load = ExpertLoadWindow(cfg.num_hidden_layers, cfg.num_experts, load_window_steps, self.device)
        for moe in model.moe_layers():
            moe.load = self.load

    def execute(self, step: StepInput) -> list[ChunkResult]:
        for seq_id in step.freed:
            self.sequences.pop(seq_id, None)
        if not step.chunks:
            return []
        # per micro-batch, decodes first (stable)
        groups = [sorted(g, key=lambda c: len(c.token_ids) > 1) for g in micro_batches(step.chunks, self.overlap)]
        undo = self._undo_point(step) if self.transactional else None
        try:
            laid = [self._layout(group) for group in groups]
            if len(laid) == 1:
                hidden = self.model(*laid[0])
            else:
                hidden = torch.cat(self.model.forward_overlapped([ids for ids, _ in laid], [b for _, b in laid]))
        except Exception:
            if undo is not None:
                self._roll_back(*undo)
            raise
        self.load.advance()
        chunks = [chunk for group in groups for chunk in group]
        return self._results(chunks, [n for _, batch in laid for n in batch.query_lens], hidden)

    def _undo_point(self, step: StepInput):
        """What a failed step would change: the continuing sequences' states, token and block
        counts, and this step's expert-load counts."""
        lengths = {c.seq_id: (len(self.sequences[c.seq_id].tokens), len(self.sequences[c.seq_id].block_table))
                   for c in step.chunks if c.past > 0 and c.seq_id in self.sequences}
        slots = torch.tensor([self.sequences[i].slot for i in lengths], dtype=torch.long, device=self.device)
        load = self.load.counts[self.load.slot].clone()
        return lengths, slots, self.states.save(slots), load, [c.seq_id for c in step.chunks if c.past == 0]

    def _roll_back(self, lengths, slots, states, load, started) -> None:
        for seq_id, (num_tokens, num_blocks) in lengths.items():
            seq = self.sequences[seq_id]
            del seq.tokens[num_tokens:], seq.block_table[num_blocks:]
        for seq_id in started:  # a replay starts them afresh
            self.sequences.pop(seq_id, None)
        self.states.restore(slots, states)
        self.load.counts[self.load.slot] = load

    def _layout(self, chunks: list[ScheduledChunk]) -> tuple[torch.Tensor, ForwardBatch]:
        """The step's flat batch: token ids [T] and the ForwardBatch (host lists -> one tensor each)."""
        ids, positions, slot_mapping, query_lens, context_lens, slots, tables, fresh = [], [], [], [], [], [], [], []
        bs = self.block_size
        for chunk in chunks:
            if chunk.past == 0:
                self.sequences[chunk.seq_id] = _SequenceState(chunk.slot, chunk.sampling or SamplingSpec())
                fresh.append(chunk.slot)
            seq = self.sequences[chunk.seq_id]
            if len(seq.tokens) != chunk.past:
                raise RuntimeError(f"sequence {chunk.seq_id}: worker has {len(seq.tokens)} tokens, "
                                   f"step says {chunk.past}")
            seq.block_table.extend(chunk.new_blocks)
            seq.tokens.extend(chunk.token_ids)
            n, past, table = len(chunk.token_ids), chunk.past, seq.block_table
            ids.extend(chunk.token_ids)
            positions.extend(range(past, past + n))
            slot_mapping.extend(table[p // bs] * bs + p % bs for p in range(past, past + n))
            query_lens.append(n)
            context_lens.append(past + n)
            slots.append(seq.slot)
            tables.append(table)
        width = max((len(t) for t in tables), default=1)
        padded = [t + [0] * (width - len(t)) for t in tables]
        as_long = dict(dtype=torch.long, device=self.device)
        starts = [0]
        for n in query_lens:
            starts.append(starts[-1] + n)
        batch = ForwardBatch(
            positions=torch.tensor(positions, **as_long),
            query_lens=query_lens,
            num_decodes=sum(1 for n in query_lens if n == 1),
            query_start=torch.tensor(starts, **as_long),
            context_lens=torch.tensor(context_lens, **as_long),
            slots=torch.tensor(slots, **as_long),
            block_tables=torch.tensor(padded, **as_long).view(len(tables), width),
            slot_mapping=torch.tensor(slot_mapping, **as_long),
            kv=self.kv, states=self.states,
        )
        if fresh:  # new or recomputed sequences start from zero states
            self.states.reset(torch.tensor(fresh, **as_long))
        return torch.tensor(ids, **as_long), batch

    def _results(self, chunks: list[ScheduledChunk], query_lens: list[int], hidden: torch.Tensor) -> list[ChunkResult]:
        """hidden [T, D]: the chunks' rows in order, query_lens[i] of them for chunk i."""
        results = [ChunkResult(chunk.seq_id) for chunk in chunks]
        ends = list(itertools.accumulate(query_lens))
        for i, chunk in enumerate(chunks):
            if chunk.want_logits:
                results[i].logits = self.model.logits(hidden[ends[i] - query_lens[i] : ends[i]]).cpu()
        sampling = [i for i, chunk in enumerate(chunks) if chunk.sample]
        if sampling:
            last_rows = torch.tensor([ends[i] - 1 for i in sampling], device=self.device)
            logits = self.model.logits(hidden[last_rows])
            seqs = [self.sequences[chunks[i].seq_id] for i in sampling]
            picks = sample_batch(logits, [s.sampling for s in seqs], [s.tokens for s in seqs])
            for i, (token, logprob, top) in zip(sampling, picks):
                results[i].token_id, results[i].logprob, results[i].top_logprobs = token, logprob, top
        return results
