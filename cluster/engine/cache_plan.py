"""Sizing the caches of an attention worker from a memory budget.

KV blocks serve the full-attention layers (grow with length); DeltaNet state slots serve the
linear-attention layers (fixed per sequence: for the flagship 180 MiB fp32 per sequence, so slots,
not blocks, often bound the batch). Slots = max_num_seqs; blocks take the rest of the budget.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attention import DeltaNetStateCache, PagedKVCache

from ..config import ConfigError, ModelConfig


KV_CACHE_DTYPES = {"auto": None, "bfloat16": torch.bfloat16, "fp8_e5m2": torch.float8_e5m2,
                   "fp8_e4m3": torch.float8_e4m3fn}


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16  # tokens per KV block
    memory_budget_mb: float = 512.0  # per attention worker: KV blocks + DeltaNet state slots
    num_blocks: int | None = None  # overrides the budget-derived count (tests, tight setups)
    # how K/V are stored: auto = the model's dtype; bfloat16 (an fp32 model's half); fp8_e5m2 or
    # fp8_e4m3 (float8 without scales, a quarter of fp32: e5m2 the top byte of a float16, range to
    # 57344 with 2 mantissa bits; e4m3fn 3 mantissa bits, saturating at +-448, subnormal below 2^-6).
    # Rounded K/V cost accuracy; they buy blocks (longer contexts, more sequences) and long-context
    # decode speed (fewer bytes read).
    kv_cache_dtype: str = "auto"

    def __post_init__(self) -> None:
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ConfigError(f"kv_cache_dtype must be one of {sorted(KV_CACHE_DTYPES)}, got {self.kv_cache_dtype!r}")
        if self.block_size < 1:
            raise ConfigError(f"block_size must be >= 1, got {self.block_size}")
        if self.memory_budget_mb <= 0:
            raise ConfigError(f"memory_budget_mb must be > 0, got {self.memory_budget_mb}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ConfigError(f"num_blocks must be >= 1, got {self.num_blocks}")


@dataclass(frozen=True)
class CacheLayout:
    """What each attention worker allocates; the scheduler hands out the same blocks and slots."""

    num_blocks: int
    block_size: int
    num_slots: int
    block_bytes: int
    slot_bytes: int
    kv_dtype: torch.dtype | None = None  # None: the model's

    @property
    def total_bytes(self) -> int:
        return self.num_blocks * self.block_bytes + self.num_slots * self.slot_bytes


def plan_cache(cfg: ModelConfig, cache: CacheConfig, max_num_seqs: int, dtype_bytes: int) -> CacheLayout:
    full = len(cfg.kv_layer_ids)  # the MTP layer's K/V too when it runs
    linear = cfg.layer_types.count("linear_attention")
    kv_dtype = KV_CACHE_DTYPES[cache.kv_cache_dtype]
    block_bytes = PagedKVCache.bytes_per_block(
        full, cache.block_size, cfg.num_key_value_heads, cfg.head_dim, kv_dtype.itemsize if kv_dtype else dtype_bytes)
    conv_channels = 2 * cfg.linear_num_key_heads * cfg.linear_key_head_dim + (
        cfg.linear_num_value_heads * cfg.linear_value_head_dim)
    slot_bytes = DeltaNetStateCache.bytes_per_slot(
        linear, conv_channels, cfg.linear_conv_kernel_dim, cfg.linear_num_value_heads,
        cfg.linear_key_head_dim, cfg.linear_value_head_dim, dtype_bytes)
    if cache.num_blocks is not None:
        num_blocks = cache.num_blocks
    else:
        budget = cache.memory_budget_mb * 2**20
        num_blocks = int((budget - max_num_seqs * slot_bytes) // max(block_bytes, 1))
        if num_blocks < 1:
            raise ConfigError(
                f"memory_budget_mb = {cache.memory_budget_mb} cannot hold {max_num_seqs} DeltaNet state "
                f"slots ({slot_bytes / 2**20:.2f} MiB each) plus one KV block: raise the budget or "
                f"lower max_num_seqs")
    return CacheLayout(num_blocks, cache.block_size, max_num_seqs, block_bytes, slot_bytes, kv_dtype)
