"""ModelRunner: the attention worker's side of a step.

Owns the dense model, the paged KV cache and DeltaNet state slots (allocated once from a
CacheLayout) and, per sequence, its block table, slot, sampling spec and token history. Executes one
StepInput: lays the chunks out as one flat batch (decodes first, then prefill chunks), runs the
model once, samples where asked; or launches it (async scheduling): the sampled tokens are read
later, and the next step's FUTURE_TOKEN inputs take them on the device. Plain Python around torch: the engine calls it directly in one
process; an AttentionWorker wraps it on Ray.

A transactional runner (an AttentionWorker's, whose experts live in other processes that may die)
can undo a step that fails half-way: its DeltaNet states are double-buffered (a step writes the
rows it does not read, and commits them only when it succeeds), and it puts back its token and
block bookkeeping when the forward raises. K/V writes need no undo: a replay writes the same bits
to the same places before any row reads them.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field
from typing import Callable

import torch

from attention import BlockTables, DeltaNetStateCache, ForwardBatch, PagedKVCache, SpeculativeRollback
from kernels import sample
from router import ExpertLoadWindow

from vision import mrope_axes, mrope_positions, patchify, rotary_positions

from ..engine.cache_plan import CacheLayout
from ..model.model import Qwen35MoeModel
from .decode_graphs import DecodeGraphs, GraphCaptureError
from .sampler import copy_to_host, needs_history, picks, sampling_tensors
from .speculative import draw_drafts, verify
from .step import FUTURE_TOKEN, ChunkResult, SamplingSpec, ScheduledChunk, StepInput, micro_batches

log = logging.getLogger(__name__)


def to_device(device: torch.device, *host: torch.Tensor) -> list[torch.Tensor]:
    """Host int64 tensors on `device` in one transfer (one pinned buffer, copied without waiting
    for the device) rather than one blocking copy each; on a CPU, the tensors themselves."""
    if device.type == "cpu":
        return list(host)
    packed = torch.cat([t.reshape(-1) for t in host]).pin_memory().to(device, non_blocking=True)
    return [part.view(t.shape) for part, t in zip(packed.split([t.numel() for t in host]), host)]


@dataclass
class _SequenceState:
    slot: int
    sampling: SamplingSpec
    block_table: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)  # every token fed so far (prompt, then outputs)
    drafts: list[int] = field(default_factory=list)  # MTP drafts for the next step to verify
    draft_probs: torch.Tensor | None = None  # [k, V] the distributions they were drawn from
    # a prompt with images: M-RoPE positions of the prompt ([prompt, R / 2], one per rotary
    # frequency), the offset of later positions, and until its prefill ends the vision tower's
    # embeddings [N, D] with, per prompt token, its row in them (-1: a text token)
    mrope: torch.Tensor | None = None
    rope_delta: int = 0
    image_embeds: torch.Tensor | None = None
    image_index: torch.Tensor | None = None

    def image_rows(self, begin: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Of prompt positions begin .. begin + n: which are image tokens (offsets from begin) and
        their embeddings."""
        index = self.image_index[begin : begin + n]
        where = (index >= 0).nonzero().flatten()
        return where, self.image_embeds[index[where]]

    def rope_positions(self, past: int, n: int, num_freqs: int) -> torch.Tensor:
        """[n, num_freqs] rotary positions of rows past .. past + n."""
        out = (torch.arange(past, past + n) + self.rope_delta)[:, None].repeat(1, num_freqs)
        if self.mrope is not None and past < len(self.mrope):
            k = min(n, len(self.mrope) - past)
            out[:k] = self.mrope[past : past + k]
        return out


class ModelRunner:
    def __init__(self, model: Qwen35MoeModel, layout: CacheLayout, load_window_steps: int = 64,
                 overlap: bool = False, transactional: bool = False, decode_graphs: bool = False,
                 compile_glue: bool = True) -> None:
        """decode_graphs: decode steps run through cluster.worker.decode_graphs (captured CUDA graphs
        on a GPU, their glue compiled unless compile_glue is off; on a CPU the same padded static
        rows, eagerly: for tests)."""
        self.model = model
        model.fuse()
        cfg = model.cfg
        self.device = model.embed_tokens.weight.device
        dtype = model.embed_tokens.weight.dtype
        full = list(cfg.kv_layer_ids)
        linear = [i for i, t in enumerate(cfg.layer_types) if t == "linear_attention"]
        self.block_size = layout.block_size
        scratch = 1 if decode_graphs else 0  # a block and a slot past the scheduler's: graph padding rows
        self.kv = PagedKVCache(full, layout.num_blocks + scratch, layout.block_size, cfg.num_key_value_heads,
                               cfg.head_dim, layout.kv_dtype or dtype, self.device)
        conv_channels = 2 * cfg.linear_num_key_heads * cfg.linear_key_head_dim + (
            cfg.linear_num_value_heads * cfg.linear_value_head_dim)
        self.states = DeltaNetStateCache(linear, layout.num_slots + scratch, conv_channels,
                                         cfg.linear_conv_kernel_dim, cfg.linear_num_value_heads,
                                         cfg.linear_key_head_dim, cfg.linear_value_head_dim, dtype, self.device,
                                         double_buffered=transactional)
        self.block_tables = BlockTables(layout.num_slots)
        self.graphs = DecodeGraphs(model, self.kv, self.states, layout.num_slots, layout.num_blocks,
                                   self.device, compile_glue) if decode_graphs else None
        self.overlap = overlap  # two micro-batches per step (expert workers elsewhere: cluster.worker.step)
        self.transactional = transactional
        self.sequences: dict[int, _SequenceState] = {}
        self.load = ExpertLoadWindow(len(cfg.moe_layer_ids), cfg.num_experts, load_window_steps, self.device)
        for moe in model.moe_layers():
            moe.load = self.load
        # the last step's selection on the device ([S] tokens, the row of each sequence), which the
        # next step's FUTURE_TOKEN inputs read, and the function that lands its results
        self._sampled: tuple[torch.Tensor, dict[int, int]] | None = None
        self._landing: Callable[[], list[ChunkResult]] | None = None

    def execute(self, step: StepInput) -> list[ChunkResult]:
        return self.launch(step)()

    def launch(self, step: StepInput) -> Callable[[], list[ChunkResult]]:
        """Runs a step up to its sampled tokens' copy to the host, which it does not wait for;
        returns the function that waits and gives the step's results (async scheduling calls it
        after launching the next step, whose FUTURE_TOKEN inputs are this step's tokens, fed on the
        device). Speculative steps, and every step of a transactional runner, complete here."""
        for seq_id in step.freed:
            self.sequences.pop(seq_id, None)
        if not step.chunks:
            return list
        # per micro-batch, decodes first (stable)
        groups = [sorted(g, key=lambda c: c.rows > 1) for g in micro_batches(step.chunks, self.overlap)]
        undo = self._undo_point(step) if self.transactional else None
        try:
            laid = [self._layout(group) for group in groups]
            if len(laid) == 1:
                hidden = self._forward(*laid[0])
            else:
                hidden = torch.cat(self.model.forward_overlapped([ids for ids, _ in laid], [b for _, b in laid]))
            chunks = [chunk for group in groups for chunk in group]
            land = self._results(chunks, [n for _, batch in laid for n in batch.query_lens], hidden)
            if self.transactional or any(c.spec_tokens for c in chunks):
                results = land()  # drafts and verification read the tokens now
                self._roll_back_rejected(chunks, results, [batch for _, batch in laid])
                self._draft(chunks, results, hidden)
            self.states.commit([self.sequences[c.seq_id].slot for c in chunks])
        except Exception:
            if undo is not None:
                self._roll_back(*undo)
            raise
        self.load.advance()
        self._landing = land
        return land

    def capture_decode_graphs(self, max_batch: int) -> int:
        """The decode graphs of every batch bucket up to max_batch, captured now (the engine's
        warm-up; only scratch rows run): how many there are."""
        if self.graphs is None:
            return 0
        try:
            return len(self.graphs.capture_buckets(max_batch))
        except GraphCaptureError as e:
            self._graphs_off(e)
            return 0

    def _graphs_off(self, e: GraphCaptureError) -> None:
        """Nothing but the scratch rows ran: decode steps go on eagerly from now on."""
        log.warning("CUDA graphs off, decode steps run eagerly: %s", e.__cause__ or e)
        self.graphs = None

    def _forward(self, ids_T: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """One micro-batch: through a decode graph where one takes it, else eagerly."""
        if self.graphs is not None and self.graphs.takes(batch):
            try:
                return self.graphs.run(ids_T, batch, self.load)
            except GraphCaptureError as e:
                self._graphs_off(e)
        return self.model(ids_T, batch)

    def _undo_point(self, step: StepInput):
        """What a failed step would change besides the DeltaNet states (double-buffered, not
        committed): the continuing sequences' token and block counts and drafts, and this step's
        expert-load counts."""
        kept = {c.seq_id: self.sequences[c.seq_id] for c in step.chunks if c.past > 0 and c.seq_id in self.sequences}
        lengths = {i: (len(s.tokens), len(s.block_table), s.drafts, s.draft_probs) for i, s in kept.items()}
        load = self.load.counts[self.load.slot].clone()
        return lengths, load, [c.seq_id for c in step.chunks if c.past == 0]

    def _roll_back(self, lengths, load, started) -> None:
        for seq_id, (num_tokens, num_blocks, drafts, draft_probs) in lengths.items():
            seq = self.sequences[seq_id]
            del seq.tokens[num_tokens:], seq.block_table[num_blocks:]
            seq.drafts, seq.draft_probs = drafts, draft_probs
        for seq_id in started:  # a replay starts them afresh
            self.sequences.pop(seq_id, None)
        self.load.counts[self.load.slot] = load

    def _layout(self, chunks: list[ScheduledChunk]) -> tuple[torch.Tensor, ForwardBatch]:
        """The step's flat batch: token ids [T] and the ForwardBatch (host lists -> one tensor each).
        A verify chunk's rows are its token and the sequence's drafts."""
        ids, rows, fresh, verify, image_rows, image_embeds, futures = [], [], [], [], [], [], []
        for chunk in chunks:
            if chunk.past == 0:
                self.sequences[chunk.seq_id] = _SequenceState(chunk.slot, chunk.sampling or SamplingSpec())
                fresh.append(chunk.slot)
                if chunk.images:
                    self._encode_images(self.sequences[chunk.seq_id], chunk.images)
            seq = self.sequences[chunk.seq_id]
            if seq.image_embeds is not None:
                if chunk.past >= seq.sampling.prompt_len:  # the prefill is over
                    seq.image_embeds = seq.image_index = None
                else:
                    where, embeds = seq.image_rows(chunk.past, len(chunk.token_ids))
                    image_rows.append(where + len(ids))
                    image_embeds.append(embeds)
            if len(seq.tokens) != chunk.past:
                raise RuntimeError(f"sequence {chunk.seq_id}: worker has {len(seq.tokens)} tokens, "
                                   f"step says {chunk.past}")
            tokens = chunk.token_ids
            if chunk.verify:
                if len(seq.drafts) != chunk.spec_tokens:
                    raise RuntimeError(f"sequence {chunk.seq_id}: asked to verify {chunk.spec_tokens} drafts, "
                                       f"worker has {len(seq.drafts)}")
                tokens += tuple(seq.drafts)
                verify.append((chunk.seq_id, len(ids), seq.slot))
            if tokens[-1] == FUTURE_TOKEN:
                futures.append((len(ids) + len(tokens) - 1, chunk.seq_id))
            self.block_tables.write(seq.slot, len(seq.block_table), chunk.new_blocks)
            seq.block_table.extend(chunk.new_blocks)
            seq.tokens.extend(tokens)
            ids.extend(tokens)
            rows.append((chunk.past, len(tokens), seq))
        ids_T, batch = self._batch(rows, ids)
        if futures:
            self._feed_sampled(ids_T, futures)
        as_long = dict(dtype=torch.long, device=self.device)
        if image_rows:
            batch.image_rows, batch.image_embeds = torch.cat(image_rows).to(self.device), torch.cat(image_embeds)
        if verify:
            width = max(c.rows for c in chunks if c.verify)
            slots = torch.tensor([slot for _, _, slot in verify], **as_long)
            verify_rows = torch.tensor([list(range(start, start + width)) for _, start, _ in verify], **as_long)
            read, write = self.states.rows(slots)
            saved = None if self.states.double_buffered else self.states.save(slots)  # else kept in `read`
            batch.rollback = SpeculativeRollback([seq_id for seq_id, _, _ in verify], verify_rows, read, write, saved)
        if fresh:  # new or recomputed sequences start from zero states
            self.states.reset(torch.tensor(fresh, **as_long))
        return ids_T, batch

    def _feed_sampled(self, ids_T: torch.Tensor, futures: list[tuple[int, int]]) -> None:
        """Async scheduling: ids_T's FUTURE_TOKEN rows (row, seq id) take the tokens the last step
        selected, on the device (nothing waits for them)."""
        tokens, row_of = self._sampled if self._sampled is not None else (None, {})
        missing = [seq_id for _, seq_id in futures if seq_id not in row_of]
        if missing:
            raise RuntimeError(f"sequences {missing}: an input token comes from a step that did not sample it here")
        rows, picked = to_device(self.device, torch.tensor([row for row, _ in futures]),
                                 torch.tensor([row_of[seq_id] for _, seq_id in futures]))
        ids_T[rows] = tokens[picked]

    def _encode_images(self, seq: _SequenceState, images) -> None:
        """A fresh sequence's images through the vision tower; its M-RoPE positions and delta."""
        cfg = self.model.cfg
        merge = cfg.vision.spatial_merge_size
        patches = torch.cat([patchify(torch.from_numpy(image.pixels.copy()), cfg.vision) for _, image in images])
        seq.image_embeds = self.model.visual(patches.to(self.device), [image.grid for _, image in images])
        spans = [(start, image.grid) for start, image in images]
        positions, seq.rope_delta = mrope_positions(seq.sampling.prompt_len, spans, merge)
        seq.mrope = rotary_positions(positions, mrope_axes(cfg.mrope_section, cfg.rotary_dim // 2))
        seq.image_index = torch.full((seq.sampling.prompt_len,), -1, dtype=torch.long)
        offset = 0
        for start, image in images:
            n = image.num_tokens(merge)
            seq.image_index[start : start + n] = torch.arange(offset, offset + n)
            offset += n

    def _batch(self, rows: list[tuple[int, int, _SequenceState]],
               ids: list[int]) -> tuple[torch.Tensor, ForwardBatch]:
        """The token ids [T] and a ForwardBatch over sequences given as (past, rows, state) each,
        every host tensor in one transfer."""
        positions, slot_mapping, query_lens, context_lens, slots = [], [], [], [], []
        bs = self.block_size
        num_freqs = self.model.cfg.rotary_dim // 2
        per_freq = any(seq.mrope is not None and past < len(seq.mrope) for past, _, seq in rows)
        for past, n, seq in rows:
            table, slot = seq.block_table, seq.slot
            if per_freq:  # some rows are images: a position per rotary frequency, for every row
                positions.append(seq.rope_positions(past, n, num_freqs))
            else:
                positions.extend(range(past + seq.rope_delta, past + n + seq.rope_delta))
            slot_mapping.extend(table[p // bs] * bs + p % bs for p in range(past, past + n))
            query_lens.append(n)
            context_lens.append(past + n)
            slots.append(slot)
        width = max((len(seq.block_table) for _, _, seq in rows), default=1)
        host_slots = torch.tensor(slots, dtype=torch.long)
        starts = [0, *itertools.accumulate(query_lens)]
        host_positions = torch.cat(positions).long() if per_freq else torch.tensor(positions, dtype=torch.long)
        (ids_T, positions_T, query_start, context_lens_B, slots_B, block_tables, slot_mapping) = to_device(
            self.device, torch.tensor(ids, dtype=torch.long), host_positions, torch.tensor(starts),
            torch.tensor(context_lens), host_slots, self.block_tables.gather(host_slots, width),
            torch.tensor(slot_mapping, dtype=torch.long))
        read, write = self.states.rows(slots_B)
        return ids_T, ForwardBatch(
            positions=positions_T, query_lens=query_lens,
            num_decodes=next((i for i, n in enumerate(query_lens) if n > 1), len(query_lens)),
            query_start=query_start, context_lens=context_lens_B, slots=read, out_slots=write,
            block_tables=block_tables, slot_mapping=slot_mapping, kv=self.kv, states=self.states,
        )

    def _results(self, chunks: list[ScheduledChunk], query_lens: list[int],
                 hidden: torch.Tensor) -> Callable[[], list[ChunkResult]]:
        """hidden [T, D]: the chunks' rows in order, query_lens[i] of them for chunk i. Selects the
        sampling chunks' tokens on the device and starts their copy to the host; returns the
        function that waits for it and gives every chunk's result (once computed, kept)."""
        results = [ChunkResult(chunk.seq_id) for chunk in chunks]
        ends = list(itertools.accumulate(query_lens))
        for i, chunk in enumerate(chunks):
            if chunk.want_logits:
                results[i].logits = self.model.logits(hidden[ends[i] - query_lens[i] : ends[i]]).cpu()
        verifying = [i for i, chunk in enumerate(chunks) if chunk.verify]
        if verifying:
            rows = torch.cat([torch.arange(ends[i] - query_lens[i], ends[i]) for i in verifying]).to(self.device)
            logits = self.model.logits(hidden[rows]).split([query_lens[i] for i in verifying])
            for i, chunk_logits in zip(verifying, logits):
                seq = self.sequences[chunks[i].seq_id]
                *accepted, last = verify(chunk_logits, seq.sampling, seq.tokens, seq.drafts, seq.draft_probs)
                results[i].accepted = accepted
                results[i].token_id, results[i].logprob, results[i].top_logprobs = last
        sampling = [i for i, chunk in enumerate(chunks) if chunk.sample and not chunk.verify]
        self._sampled = None
        if not sampling:
            return lambda: results
        last_rows = [ends[i] - 1 for i in sampling]
        sampled = hidden  # decodes only: every row, in order
        if last_rows != list(range(hidden.shape[0])):
            sampled = hidden[to_device(self.device, torch.tensor(last_rows))[0]]
        logits = self.model.logits(sampled)
        seqs = [self.sequences[chunks[i].seq_id] for i in sampling]
        specs = [s.sampling for s in seqs]
        if needs_history(specs) and self._landing is not None:
            self._landing()  # penalties count the tokens fed, the last of which the step before samples
        selection = sample(logits, sampling_tensors(specs, [s.tokens for s in seqs], logits.shape[-1], logits.device))
        self._sampled = (selection.tokens, {chunks[i].seq_id: b for b, i in enumerate(sampling)})
        copied = copy_to_host(selection)
        positions = [chunks[i].past + query_lens[i] for i in sampling]  # of the sampled tokens in their histories
        landed = []

        def land() -> list[ChunkResult]:
            if not landed:
                for i, seq, position, pick in zip(sampling, seqs, positions, picks(copied(), specs)):
                    results[i].token_id, results[i].logprob, results[i].top_logprobs = pick
                    if position < len(seq.tokens):  # the step after fed it as FUTURE_TOKEN
                        seq.tokens[position] = pick[0]
                landed.append(True)
            return results

        return land

    def _roll_back_rejected(self, chunks: list[ScheduledChunk], results: list[ChunkResult],
                            batches: list[ForwardBatch]) -> None:
        """Verify chunks keep their last token and accepted drafts: the rest of their tokens is
        dropped and their DeltaNet states go back to after the accepted ones."""
        kept = {}
        for chunk, result in zip(chunks, results):
            if chunk.verify:
                seq = self.sequences[chunk.seq_id]
                kept[chunk.seq_id] = 1 + len(result.accepted)
                del seq.tokens[chunk.past + kept[chunk.seq_id]:]
                seq.drafts, seq.draft_probs = [], None
        for batch in batches:
            if batch.rollback is not None:
                keep = [kept[seq_id] for seq_id in batch.rollback.seq_ids]
                for layer in self.model.layers:
                    if layer.is_linear:
                        layer.linear_attn.roll_back(batch.rollback, keep, self.states)

    def _draft(self, chunks: list[ScheduledChunk], results: list[ChunkResult], hidden: torch.Tensor) -> None:
        """The MTP layer over every speculating chunk's rows (hidden at i, token i + 1), then k - 1
        more one-row passes for the chunks that sampled; each sampling chunk's sequence keeps k
        drafts for the next step to verify. Rows past a verify chunk's accepted tokens compute
        throw-away values (their K/V are written again before they are read)."""
        offsets = [0, *itertools.accumulate(c.rows for c in chunks)]
        spec = [i for i, c in enumerate(chunks) if c.spec_tokens]
        if not spec:
            return
        rows, next_ids, layout, last = [], [], [], []  # last: per drafting chunk, its row in the pass
        image_rows, image_embeds = [], []
        for i in spec:
            chunk, result, seq = chunks[i], results[i], self.sequences[chunks[i].seq_id]
            if chunk.verify:  # row j's next token: the accepted draft j + 1, or the token sampled after
                emitted = [t for t, _, _ in result.accepted] + [result.token_id]
                following = emitted + [result.token_id] * (chunk.rows - len(emitted))
            else:
                following = list(chunk.token_ids[1:]) + [result.token_id if chunk.sample else chunk.next_token]
            if chunk.sample:
                valid = len(result.accepted) + 1 if chunk.verify else chunk.rows
                last.append((i, len(rows) + valid - 1, chunk.past + valid - 1))
            if seq.image_embeds is not None:  # a prompt chunk whose next tokens include image tokens
                where, embeds = seq.image_rows(chunk.past + 1, chunk.rows)
                image_rows.append(where + len(rows))
                image_embeds.append(embeds)
            rows.extend(range(offsets[i], offsets[i + 1]))
            next_ids.extend(following)
            layout.append((chunk.past, chunk.rows, seq))
        as_long = dict(dtype=torch.long, device=self.device)
        next_ids_T, batch = self._batch(layout, next_ids)
        if image_rows:  # the MTP layer sees an image token's embedding as the main model did
            batch.image_rows, batch.image_embeds = torch.cat(image_rows).to(self.device), torch.cat(image_embeds)
        out = self.model.draft(next_ids_T, hidden[torch.tensor(rows, **as_long)], batch)
        if not last:
            return
        hidden_BD = out[torch.tensor([row for _, row, _ in last], **as_long)]
        seqs = [self.sequences[chunks[i].seq_id] for i, _, _ in last]
        positions = [position for _, _, position in last]  # of each row's hidden
        drafts: list[list[int]] = [[] for _ in seqs]
        probs: list[list[torch.Tensor]] = [[] for _ in seqs]
        for j in range(chunks[spec[0]].spec_tokens):
            if j:  # the next row: the last draft after the MTP's own hidden, one position on
                positions = [p + 1 for p in positions]
                last_T, batch = self._batch([(p, 1, s) for p, s in zip(positions, seqs)], [d[-1] for d in drafts])
                hidden_BD = self.model.draft(last_T, hidden_BD, batch)
            # the draft stands for output index (position of its token) - prompt
            tokens, q = draw_drafts(self.model.logits(hidden_BD), [s.sampling for s in seqs],
                                    [p + 2 - s.sampling.prompt_len for p, s in zip(positions, seqs)])
            for b, token in enumerate(tokens):
                drafts[b].append(token)
                probs[b].append(q[b] if q is not None and seqs[b].sampling.temperature > 0 else None)
        for seq, d, q in zip(seqs, drafts, probs):
            seq.drafts, seq.draft_probs = d, None if q[0] is None else torch.stack(q)
