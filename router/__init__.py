"""Routing (pure torch): the top-k gate, dispatch/combine, and the MoE layer that joins them."""

from .dispatcher import Dispatcher, ExpertBatch, LocalDispatcher, weighted_sum
from .gate import TopKGate
from .moe_layer import MoELayer

__all__ = ["Dispatcher", "ExpertBatch", "LocalDispatcher", "MoELayer", "TopKGate", "weighted_sum"]
