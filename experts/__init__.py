"""Expert weights of a shard; their grouped compute is kernels.moe_experts (pure torch + C++)."""

from .shard import ExpertBank, ExpertShard

__all__ = ["ExpertBank", "ExpertShard"]
