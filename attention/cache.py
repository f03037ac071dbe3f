"""The caches of a hybrid model on an attention worker, and the layout of a flat (varlen) batch.

Full-attention layers keep K/V for every past token in a *paged* pool: fixed-size blocks, each
sequence owning a block table (which blocks hold its tokens, in order). Gated DeltaNet layers keep a
fixed-size state per sequence whatever its length, in a *slot*: the last `kernel - 1` conv inputs
and the recurrent matrix (fp32). The pools are allocated once, from a memory budget; which
sequence owns which blocks and slot is decided by the scheduler (cluster.engine.scheduler).

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


class DeltaNetStateCache:
    """Per DeltaNet layer: conv [M, kernel - 1, C] and recurrent [M, H, dk, dv] (fp32) slots, held as
    one tensor of each kind over all layers so that a fresh slot is zeroed in one op per kind."""

    def __init__(self, layers: list[int], num_slots: int, conv_channels: int, conv_kernel: int,
                 num_heads: int, key_dim: int, value_dim: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu") -> None:
        L = len(layers)
        self._conv = torch.zeros(L, num_slots, conv_kernel - 1, conv_channels, dtype=dtype, device=device)
        self._recurrent = torch.zeros(L, num_slots, num_heads, key_dim, value_dim, device=device)
        self.conv = {layer: self._conv[i] for i, layer in enumerate(layers)}
        self.recurrent = {layer: self._recurrent[i] for i, layer in enumerate(layers)}
        self.index = {layer: i for i, layer in enumerate(layers)}  # position in save()'s first dim

    def reset(self, slots: torch.Tensor) -> None:
        """Zeroes the slots of sequences starting afresh (new, or recomputed after preemption)."""
        self._conv.index_fill_(1, slots, 0)
        self._recurrent.index_fill_(1, slots, 0)

    def save(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A copy of the slots' states (conv [L, B, K-1, C], recurrent [L, B, H, dk, dv]), taken before a
        step that may fail half-way: the kernels update the states in place, layer by layer."""
        return self._conv.index_select(1, slots), self._recurrent.index_select(1, slots)

    def restore(self, slots: torch.Tensor, saved: tuple[torch.Tensor, torch.Tensor]) -> None:
        """Puts back what save() copied: the slots are as before the failed step."""
        self._conv.index_copy_(1, slots, saved[0])
        self._recurrent.index_copy_(1, slots, saved[1])

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
    slots: torch.Tensor  # [B] DeltaNet state slot
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
    rows each) back to just after the accepted prefix: each DeltaNet layer keeps the chunks' states
    from before the step and its conv inputs (qkv, a, b) of their rows; a rejected suffix then costs
    restoring the states and re-running the conv and the delta rule over the accepted rows, the same
    arithmetic as the step (K/V need nothing: rows past a sequence's length are never read, and are
    written again before they are).
    Shapes: Bv verify chunks, k + 1 rows each."""

    seq_ids: list[int]  # [Bv]
    rows: torch.Tensor  # [Bv, k + 1] rows of each chunk in the flat batch
    slots: torch.Tensor  # [Bv]
    saved: tuple[torch.Tensor, torch.Tensor]  # DeltaNetStateCache.save(slots), before the step
    projected: dict = field(default_factory=dict)  # layer -> the layer's input projection [Bv, k + 1, P]
    # column of each verify chunk in `saved` (None: saved holds exactly the chunks, in order) — a
    # transactional runner's undo point already copied these states, so the record points into it
    saved_columns: torch.Tensor | None = None

    def keep(self, layer: int, projected_TP: torch.Tensor) -> None:
        """Called by a DeltaNet layer with its fused input projection (qkv | z | b | a) of every row."""
        self.projected[layer] = projected_TP[self.rows]
