"""The caches of a hybrid model on an attention worker, and the layout of a flat (varlen) batch.

Full-attention layers keep K/V for every past token in a *paged* pool: fixed-size blocks, each
sequence owning a block table (which blocks hold its tokens, in order). Gated DeltaNet layers keep a
fixed-size state per sequence whatever its length, in a *slot*: the last `kernel - 1` conv inputs
and the recurrent matrix (fp32), in one row of the pool (two, double-buffered). The pools are
allocated once, from a memory budget; which sequence owns which blocks and slot is decided by the
scheduler (cluster.engine.scheduler).

Shapes: N blocks, S block size, KV kv heads, hd head dim, M slots, C conv channels, H value heads,
T rows of a step, B sequences of a step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


class PagedKVCache:
    """K and V of every full-attention layer: [N, KV, S, hd] each, per layer (a kv head's tokens of a
    block side by side, so attention streams them)."""

    def __init__(self, layers: list[int], num_blocks: int, block_size: int, kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device | str = "cpu") -> None:
        self.block_size = block_size
        shape = (num_blocks, kv_heads, block_size, head_dim)
        self.key = {i: torch.zeros(shape, dtype=dtype, device=device) for i in layers}
        self.value = {i: torch.zeros(shape, dtype=dtype, device=device) for i in layers}

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, kv_heads: int, head_dim: int,
                        dtype_bytes: int) -> int:
        return 2 * num_layers * block_size * kv_heads * head_dim * dtype_bytes


class BlockTables:
    """Every running sequence's block table, one host row per sequence slot [M, W] (W grows as
    sequences do). A step's tables are one gather of its slots' rows, not lists rebuilt and copied
    per step (a 60K-token sequence has ~4K entries). Entries past a sequence's length are stale and
    never read: the kernels stop at its context length."""

    def __init__(self, num_slots: int, width: int = 64) -> None:
        self._rows = torch.zeros(num_slots, width, dtype=torch.long)

    def write(self, slot: int, first: int, blocks: tuple[int, ...] | list[int]) -> None:
        """Entries first .. first + len(blocks) of the slot's table."""
        end = first + len(blocks)
        if end > self._rows.shape[1]:
            grown = torch.zeros(self._rows.shape[0], max(end, 2 * self._rows.shape[1]), dtype=torch.long)
            grown[:, : self._rows.shape[1]] = self._rows
            self._rows = grown
        if blocks:
            self._rows[slot, first:end] = torch.tensor(blocks, dtype=torch.long)

    def gather(self, slots: torch.Tensor, width: int) -> torch.Tensor:
        """[B, width] the tables of slots [B] (host tensor), cut to width entries."""
        return self._rows[:, :width].index_select(0, slots)


class DeltaNetStateCache:
    """Per DeltaNet layer: conv [R, kernel - 1, C] and recurrent [R, H, dk, dv] (fp32) rows, held as
    one tensor of each kind over all layers so that a fresh slot is zeroed in one op per kind.

    Single-buffered (R = M) a step updates slot s's row in place. Double-buffered (R = 2M, for a
    runner that must be able to undo a step) slot s owns rows 2s and 2s + 1: a step reads the
    current one and writes the other, and `commit` makes the written row current once the step has
    succeeded. A step that fails half-way leaves every slot's current row as it was, with no copy
    made per step (the price: twice the state memory)."""

    def __init__(self, layers: list[int], num_slots: int, conv_channels: int, conv_kernel: int,
                 num_heads: int, key_dim: int, value_dim: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu", double_buffered: bool = False) -> None:
        L, rows = len(layers), num_slots * (2 if double_buffered else 1)
        self._conv = torch.zeros(L, rows, conv_kernel - 1, conv_channels, dtype=dtype, device=device)
        self._recurrent = torch.zeros(L, rows, num_heads, key_dim, value_dim, device=device)
        self.conv = {layer: self._conv[i] for i, layer in enumerate(layers)}
        self.recurrent = {layer: self._recurrent[i] for i, layer in enumerate(layers)}
        self.index = {layer: i for i, layer in enumerate(layers)}  # position in save()'s first dim
        self.double_buffered = double_buffered
        # double-buffered: which of its two rows holds each slot's current state (0 or 1)
        self._current = torch.zeros(num_slots, dtype=torch.long, device=device) if double_buffered else None

    def rows(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(read, write) rows of the slots [B] for a step: the current state's row and the row the
        step writes (the same row when single-buffered)."""
        if self._current is None:
            return slots, slots
        current = self._current[slots]
        return 2 * slots + current, 2 * slots + 1 - current

    def commit(self, slots: list[int]) -> None:
        """After a successful step over these slots: what it wrote becomes their current state."""
        if self._current is not None:
            self._current[torch.tensor(slots, dtype=torch.long, device=self._current.device)] ^= 1

    def reset(self, slots: torch.Tensor) -> None:
        """Zeroes the current state of sequences starting afresh (new, or recomputed after preemption)."""
        read, _ = self.rows(slots)
        self._conv.index_fill_(1, read, 0)
        self._recurrent.index_fill_(1, read, 0)

    def save(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A copy of the slots' current states (conv [L, B, K-1, C], recurrent [L, B, H, dk, dv])."""
        read, _ = self.rows(slots)
        return self._conv.index_select(1, read), self._recurrent.index_select(1, read)

    @staticmethod
    def bytes_per_slot(num_layers: int, conv_channels: int, conv_kernel: int, num_heads: int,
                       key_dim: int, value_dim: int, dtype_bytes: int) -> int:
        conv = conv_channels * (conv_kernel - 1) * dtype_bytes
        return num_layers * (conv + num_heads * key_dim * value_dim * 4)


@dataclass
class ForwardBatch:
    """Everything a layer needs besides its input rows [T, D].

    Sequences appear in turn, the `num_decodes` single-row ones first (decode steps), then the
    prefill chunks. Built once per step by the runner; the tensors live on the model's device."""

    positions: torch.Tensor  # [T] rotary position of each row; [T, R / 2] one per frequency (images: M-RoPE)
    query_lens: list[int]  # [B] rows of each sequence (host)
    num_decodes: int  # sequences 0 .. num_decodes - 1 have one row each
    query_start: torch.Tensor  # [B + 1] row offsets
    context_lens: torch.Tensor  # [B] tokens of each sequence in the caches once this step is written
    slots: torch.Tensor  # [B] DeltaNet state rows the step reads (DeltaNetStateCache.rows)
    out_slots: torch.Tensor  # [B] and writes (the same rows unless the cache is double-buffered)
    block_tables: torch.Tensor  # [B, max_blocks] KV blocks of each sequence (padded with 0)
    slot_mapping: torch.Tensor  # [T] flat KV position (block * S + offset) of each row
    kv: PagedKVCache
    states: DeltaNetStateCache
    rollback: SpeculativeRollback | None = None  # the step verifies drafts: DeltaNet layers keep their inputs
    image_rows: torch.Tensor | None = None  # [R] rows that are image tokens: their embeddings are
    image_embeds: torch.Tensor | None = None  # [R, D] the vision tower's, not the token table's


@dataclass
class SpeculativeRollback:
    """What moves the DeltaNet states of a step's verify chunks (the last token and k drafts, k + 1
    rows each) back to just after the accepted prefix: the chunks' states from before the step and
    each DeltaNet layer's conv inputs (qkv, a, b) of their rows; a rejected suffix then costs
    re-running the conv and the delta rule from the earlier states over the accepted rows, the same
    arithmetic as the step (K/V need nothing: rows past a sequence's length are never read, and are
    written again before they are). A double-buffered cache still holds the earlier states in the
    rows the step read; a single-buffered one needs the copy `saved`, which is put back first.
    Shapes: Bv verify chunks, k + 1 rows each."""

    seq_ids: list[int]  # [Bv]
    rows: torch.Tensor  # [Bv, k + 1] rows of each chunk in the flat batch
    slots: torch.Tensor  # [Bv] state rows the step read
    out_slots: torch.Tensor  # [Bv] and wrote
    saved: tuple[torch.Tensor, torch.Tensor] | None  # single-buffered: DeltaNetStateCache.save(slots)
    projected: dict = field(default_factory=dict)  # layer -> the layer's input projection [Bv, k + 1, P]

    def keep(self, layer: int, projected_TP: torch.Tensor) -> None:
        """Called by a DeltaNet layer with its fused input projection (qkv | z | b | a) of every row."""
        self.projected[layer] = projected_TP[self.rows]
