"""CUDA graphs for decode steps: one captured forward per (batch bucket, block-table width bucket).

A decode step launches hundreds of small kernels (506 per step on a 4-layer flagship-width slice,
benchmarks/gpu_check.py); replaying them from a graph removes the CPU's launch time, which on a GPU
is most of a small batch's step. A step of B decodes whose block tables are W wide runs the graph
captured for (B', W') = (the batch bucket >= B, the power of two >= W): the step's rows are copied
into the graph's static inputs and the rows past B point at a scratch DeltaNet slot and a scratch
KV block that no sequence owns (the runner allocates one of each past the scheduler's), so padding
never touches a sequence's state. Logits and sampling stay outside the graph.

What a captured forward must not do, and does not: sync with the host (kernels.moe sizes its
groups with searchsorted, not bincount), or depend on host values other than the shapes (query
lengths are all 1). The expert-load counters (router.ExpertLoadWindow) write into the slot of the
current step, a host value: while capturing, each MoE layer's routing tensor is kept instead, and
after every replay its first B rows are counted.

On CUDA the captured forwards run the plain-torch glue between GEMMs through torch.compile
(kernels.backend.glue; ~490 -> ~250 kernels a step on the slice): it compiles in the capture's
warm-up, outside the graph, and the graph replays inductor's Triton kernels. Eager steps (prefill,
mixed, fp32) never compile.

A forward that fails to capture (an op that syncs on some device or dtype) raises
GraphCaptureError; the runner then steps eagerly from there on. Capturing runs the forward only over
the scratch rows (the static inputs hold them until the first replay), so no sequence is touched.

On a CPU the same static-buffer path runs eagerly (capture=False): tests check there that padding
and scratch rows change nothing.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from attention import ForwardBatch
from kernels.backend import compiled_glue

BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


class GraphCaptureError(RuntimeError):
    """A decode forward could not be captured; what the capture raised is its __cause__."""


def supported(device: str, dtype: torch.dtype) -> bool:
    """Whether a decode forward captures: on CUDA in 16-bit. In fp32 the routed experts take the
    reference loop (torch._grouped_mm is bf16-only on CUDA), which asks the host which experts
    are hit: fp32 (the parity runs) steps eagerly."""
    return device == "cuda" and dtype in (torch.bfloat16, torch.float16)


def batch_bucket(n: int) -> int | None:
    return next((b for b in BATCH_BUCKETS if b >= n), None)


def width_bucket(n: int) -> int:
    return max(4, 1 << (max(n, 1) - 1).bit_length())


class _RoutingRecorder:
    """Stands in for the ExpertLoadWindow while a forward is captured: keeps each MoE layer's
    routing tensor [B', K] (graph memory, refilled by every replay)."""

    def __init__(self) -> None:
        self.routed: list[tuple[int, torch.Tensor]] = []

    def record(self, layer: int, topk_idx_TK: torch.Tensor) -> None:
        self.routed.append((layer, topk_idx_TK))


@dataclass
class _Captured:
    ids: torch.Tensor  # [B'] static inputs ...
    batch: ForwardBatch  # ... positions, context_lens, slots, out_slots, block_tables [B', W'], slot_mapping
    hidden: torch.Tensor | None = None  # [B', D] the forward's output (graph memory)
    routed: list[tuple[int, torch.Tensor]] | None = None
    graph: torch.cuda.CUDAGraph | None = None


class DecodeGraphs:
    def __init__(self, model, kv, states, scratch_slot: int, scratch_block: int, device: torch.device,
                 compile_glue: bool = True) -> None:
        """kv, states: the runner's PagedKVCache and DeltaNetStateCache, each with one slot / block
        past the scheduler's (scratch_slot, scratch_block) for the padding rows. compile_glue: the
        captured forwards run kernels' @glue functions through torch.compile (on CUDA only)."""
        self.model, self.kv, self.states, self.device = model, kv, states, device
        self.scratch_row = int(states.rows(torch.tensor([scratch_slot], device=device))[0][0])
        self.scratch_block = scratch_block
        self.capture = device.type == "cuda"
        self.compile_glue = compile_glue and self.capture
        self.pool = torch.cuda.graph_pool_handle() if self.capture else None
        self.graphs: dict[tuple[int, int], _Captured] = {}

    def takes(self, batch: ForwardBatch) -> bool:
        """Decodes only (one row each), no images, no drafts to verify, a batch bucket that fits."""
        B = len(batch.query_lens)
        return (B > 0 and batch.num_decodes == B and batch.rollback is None and batch.image_rows is None
                and batch.positions.dim() == 1 and batch_bucket(B) is not None)

    def capture_buckets(self, max_batch: int) -> list[tuple[int, int]]:
        """Captures the graph of every batch bucket up to max_batch's (narrowest tables), smallest
        first, then the largest at twice the width: on CUDA the glue compiles here, at start (batch 1
        specialised, then shapes dynamic in the batch and the table width: ~20 s on an H200 host),
        not on the first serving step that brings a new bucket. Returns the (batch, width) keys."""
        top = batch_bucket(max_batch) or BATCH_BUCKETS[-1]
        narrow = width_bucket(1)
        keys = [(b, narrow) for b in BATCH_BUCKETS if b <= top] + [(top, 2 * narrow)]
        for key in keys:
            if key not in self.graphs:
                self._capture(*key)
        return keys

    def run(self, ids_T: torch.Tensor, batch: ForwardBatch, load) -> torch.Tensor:
        """The forward over a decode batch ([B] ids) through its graph: normed hidden [B, D]. Its
        routing is counted in `load` (an ExpertLoadWindow, or None)."""
        B, W = batch.block_tables.shape
        key = (batch_bucket(B), width_bucket(W))
        captured = self.graphs.get(key) or self._capture(*key)
        self._fill(captured, ids_T, batch)
        if captured.graph is not None:
            captured.graph.replay()
            hidden, routed = captured.hidden, captured.routed
        else:  # CPU: the same static rows, eagerly
            hidden, routed = self._forward(captured)
        if load is not None:
            for layer, idx in routed:
                load.record(layer, idx[:B])
        return hidden[:B]

    def _fill(self, c: _Captured, ids_T: torch.Tensor, batch: ForwardBatch) -> None:
        """The step's B rows into the static inputs; rows B.. back to the scratch slot and block (an
        earlier, larger step may have left a sequence's rows there)."""
        B, W = batch.block_tables.shape
        S = self.kv.block_size
        for static, rows, pad in ((c.ids, ids_T, 0), (c.batch.positions, batch.positions, 0),
                                  (c.batch.context_lens, batch.context_lens, 1),
                                  (c.batch.slots, batch.slots, self.scratch_row),
                                  (c.batch.out_slots, batch.out_slots, self.scratch_row),
                                  (c.batch.slot_mapping, batch.slot_mapping, self.scratch_block * S)):
            static[:B].copy_(rows)
            static[B:].fill_(pad)
        c.batch.block_tables[:B, :W].copy_(batch.block_tables)
        c.batch.block_tables[:B, W:].fill_(self.scratch_block)
        c.batch.block_tables[B:].fill_(self.scratch_block)

    def _static(self, B: int, W: int) -> _Captured:
        as_long = dict(dtype=torch.long, device=self.device)
        S = self.kv.block_size
        batch = ForwardBatch(
            positions=torch.zeros(B, **as_long), query_lens=[1] * B, num_decodes=B,
            query_start=torch.arange(B + 1, **as_long), context_lens=torch.ones(B, **as_long),
            slots=torch.full((B,), self.scratch_row, **as_long), out_slots=torch.full((B,), self.scratch_row, **as_long),
            block_tables=torch.full((B, W), self.scratch_block, **as_long),
            slot_mapping=torch.full((B,), self.scratch_block * S, **as_long), kv=self.kv, states=self.states)
        return _Captured(torch.zeros(B, **as_long), batch)

    def _forward(self, c: _Captured) -> tuple[torch.Tensor, list]:
        """One forward over the static rows with the routing recorded instead of counted."""
        recorder, layers = _RoutingRecorder(), self.model.moe_layers()
        loads = [moe.load for moe in layers]
        for moe in layers:
            moe.load = recorder
        try:
            with compiled_glue() if self.compile_glue else contextlib.nullcontext():
                return self.model(c.ids, c.batch), recorder.routed
        finally:
            for moe, load in zip(layers, loads):
                moe.load = load

    def _capture(self, B: int, W: int) -> _Captured:
        c = self._static(B, W)
        if self.capture:
            try:
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):  # compiles and autotunes (Triton) outside the capture
                    self._forward(c)
                torch.cuda.current_stream().wait_stream(side)
                c.graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(c.graph, pool=self.pool):
                    c.hidden, c.routed = self._forward(c)
            except Exception as e:
                raise GraphCaptureError(f"decode forward for batch {B}, table width {W}: {e}") from e
        self.graphs[(B, W)] = c
        return c
