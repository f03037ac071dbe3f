"""The caches of a hybrid model on an attention worker, and the layout of a flat (varlen) batch.

Full-attention layers keep K/V for every past token in a *paged* pool: fixed-size blocks, each
sequence owning a block table (which blocks hold its tokens, in order). Gated DeltaNet layers keep a
fixed-size state per sequence whatever its length, in a *slot*: the last `kernel - 1` conv inputs
and the recurrent matrix (fp32). The pools are allocated once, from a memory budget; which
sequence owns which blocks and slot is decided by the scheduler (cluster.scheduler).

Shapes: N blocks, S block size, KV kv heads, hd head dim, M slots, C conv channels, H value heads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SequenceSlice:
    """Rows [start, start + length) of a flat batch are new tokens of one sequence."""

    start: int
    length: int
    past: int  # tokens of this sequence already in the caches (0: a new or recomputed sequence)
    block_table: torch.Tensor  # int64 KV block ids covering past + length tokens
    slot: int  # DeltaNet state slot

    @property
    def rows(self) -> slice:
        return slice(self.start, self.start + self.length)


class PagedKVCache:
    """K and V of every full-attention layer: [N, S, KV, hd] each, per layer."""

    def __init__(self, layers: list[int], num_blocks: int, block_size: int, kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device | str = "cpu") -> None:
        self.block_size = block_size
        shape = (num_blocks, block_size, kv_heads, head_dim)
        self.key = {i: torch.zeros(shape, dtype=dtype, device=device) for i in layers}
        self.value = {i: torch.zeros(shape, dtype=dtype, device=device) for i in layers}

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, kv_heads: int, head_dim: int,
                        dtype_bytes: int) -> int:
        return 2 * num_layers * block_size * kv_heads * head_dim * dtype_bytes

    def _flat_index(self, block_table: torch.Tensor, begin: int, end: int) -> torch.Tensor:
        pos = torch.arange(begin, end, device=block_table.device)
        return block_table[pos // self.block_size] * self.block_size + pos % self.block_size

    def write(self, layer: int, s: SequenceSlice, key: torch.Tensor, value: torch.Tensor) -> None:
        """Stores [n, KV, hd] new entries at positions past .. past + n."""
        index = self._flat_index(s.block_table, s.past, s.past + s.length)
        self.key[layer].view(-1, *key.shape[1:]).index_copy_(0, index, key)
        self.value[layer].view(-1, *value.shape[1:]).index_copy_(0, index, value)

    def read(self, layer: int, s: SequenceSlice) -> tuple[torch.Tensor, torch.Tensor]:
        """The sequence's whole K, V [past + length, KV, hd]."""
        index = self._flat_index(s.block_table, 0, s.past + s.length)
        k = self.key[layer].view(-1, *self.key[layer].shape[2:])
        v = self.value[layer].view(-1, *self.value[layer].shape[2:])
        return k[index], v[index]


class DeltaNetStateCache:
    """Per DeltaNet layer: conv [M, C, kernel - 1] and recurrent [M, H, dk, dv] (fp32) slots."""

    def __init__(self, layers: list[int], num_slots: int, conv_channels: int, conv_kernel: int,
                 num_heads: int, key_dim: int, value_dim: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu") -> None:
        self.conv = {i: torch.zeros(num_slots, conv_channels, conv_kernel - 1, dtype=dtype, device=device)
                     for i in layers}
        self.recurrent = {i: torch.zeros(num_slots, num_heads, key_dim, value_dim, device=device)
                          for i in layers}

    @staticmethod
    def bytes_per_slot(num_layers: int, conv_channels: int, conv_kernel: int, num_heads: int,
                       key_dim: int, value_dim: int, dtype_bytes: int) -> int:
        conv = conv_channels * (conv_kernel - 1) * dtype_bytes
        return num_layers * (conv + num_heads * key_dim * value_dim * 4)


@dataclass
class ForwardBatch:
    """Everything a layer needs besides its input rows."""

    positions: torch.Tensor  # [T] position of each row in its sequence
    slices: list[SequenceSlice]
    kv: PagedKVCache
    states: DeltaNetStateCache
