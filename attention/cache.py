"""Per-sequence caches of a hybrid model, and the layout of a flat (varlen) batch.

Full-attention layers keep K/V for every past token; Gated DeltaNet layers keep a fixed-size
state whatever the length: the last `conv_kernel - 1` conv inputs and the recurrent matrix.

Shapes: L tokens of a sequence, KV kv heads, hd head dim, C conv channels, H value heads.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class KVCache:
    """One full-attention layer of one sequence: key, value [KV, L, hd]."""

    key: torch.Tensor | None = None
    value: torch.Tensor | None = None

    def append(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Adds [KV, n, hd] new entries; returns the whole cache [KV, L + n, hd]."""
        if self.key is None:
            self.key, self.value = key, value
        else:
            self.key = torch.cat([self.key, key], dim=1)
            self.value = torch.cat([self.value, value], dim=1)
        return self.key, self.value


@dataclass
class DeltaNetState:
    """One Gated DeltaNet layer of one sequence: conv [C, kernel - 1], recurrent [H, dk, dv] (fp32)."""

    conv: torch.Tensor
    recurrent: torch.Tensor | None = None  # None until the first token


@dataclass
class SequenceCache:
    """Everything a sequence carries between steps, indexed by layer."""

    layers: list[KVCache | DeltaNetState] = field(default_factory=list)
    num_tokens: int = 0  # tokens already folded into the caches

    def kv(self, layer: int) -> KVCache:
        entry = self.layers[layer]
        assert isinstance(entry, KVCache), f"layer {layer} is not a full-attention layer"
        return entry

    def deltanet(self, layer: int) -> DeltaNetState:
        entry = self.layers[layer]
        assert isinstance(entry, DeltaNetState), f"layer {layer} is not a DeltaNet layer"
        return entry


@dataclass(frozen=True)
class SequenceSlice:
    """Rows [start, start + length) of a flat batch belong to one sequence with this cache."""

    start: int
    length: int
    cache: SequenceCache

    @property
    def rows(self) -> slice:
        return slice(self.start, self.start + self.length)
