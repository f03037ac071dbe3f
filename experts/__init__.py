"""Expert weights of a shard and grouped expert compute (pure torch)."""

from .grouped import grouped_swiglu, swiglu_reference
from .shard import ExpertBank, ExpertShard

__all__ = ["ExpertBank", "ExpertShard", "grouped_swiglu", "swiglu_reference"]
