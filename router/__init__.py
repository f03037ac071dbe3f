"""Routing (pure torch): the top-k gate, dispatch/combine, and the MoE layer that joins them."""

from .dispatcher import Dispatcher, ExpertBatch, LocalDispatcher, weighted_sum
from .gate import TopKGate
from .load import ExpertLoadWindow
from .moe_layer import MoELayer
from .placement import ExpertPlacement
from .planner import PlacementPlanner, PlanStats, placement_stats

__all__ = [
    "Dispatcher", "ExpertBatch", "ExpertLoadWindow", "ExpertPlacement", "LocalDispatcher", "MoELayer",
    "PlacementPlanner", "PlanStats", "TopKGate", "placement_stats", "weighted_sum",
]
