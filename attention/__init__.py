"""The dense side of a Qwen3.5-MoE layer (pure torch): norms, rotary, gated attention, Gated
DeltaNet, paged KV and DeltaNet state caches and the shared expert. Embeddings and the LM head are plain
`nn.Embedding` / `nn.Linear` in the assembled model (cluster.model.model). Hot ops run through `kernels`."""

from .cache import BlockTables, DeltaNetStateCache, ForwardBatch, PagedKVCache, SpeculativeRollback
from .deltanet import GatedDeltaNet
from .gated_attention import GatedAttention
from .norm import GatedRMSNorm, RMSNorm
from .rotary import PartialRotary
from .shared_expert import SharedExpert

__all__ = [
    "BlockTables", "DeltaNetStateCache", "ForwardBatch", "GatedAttention", "GatedDeltaNet", "GatedRMSNorm",
    "PagedKVCache", "PartialRotary", "RMSNorm", "SharedExpert", "SpeculativeRollback",
]
