"""ExpertShard: the experts one worker holds, for every MoE layer, and their compute.

A shard may hold any subset of each layer's experts (contiguous blocks by default, replicas of hot
experts later). Weights of a layer are stacked in the order of `expert_ids[layer]`, so local index i
is global expert expert_ids[layer][i].
Shapes: N experts held in a layer, E experts in the model, D hidden, I intermediate, R rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels import moe_experts


@dataclass
class ExpertBank:
    """One layer's held experts: gate_up [N, 2I, D], down [N, D, I]."""

    expert_ids: tuple[int, ...]
    gate_up: torch.Tensor
    down: torch.Tensor

    def __post_init__(self) -> None:
        n = len(self.expert_ids)
        if self.gate_up.shape[0] != n or self.down.shape[0] != n:
            raise ValueError(
                f"bank holds {n} experts but gate_up has {self.gate_up.shape[0]} and down "
                f"{self.down.shape[0]}"
            )

    @property
    def nbytes(self) -> int:
        return self.gate_up.nbytes + self.down.nbytes


class ExpertShard:
    def __init__(self, num_experts: int, banks: dict[int, ExpertBank]) -> None:
        self.num_experts = num_experts
        self.banks = banks
        # local_index[layer][e] = position of global expert e in the bank, or -1 if not held here
        self.local_index: dict[int, torch.Tensor] = {}
        for layer, bank in banks.items():
            index = torch.full((num_experts,), -1, dtype=torch.long, device=bank.gate_up.device)
            index[list(bank.expert_ids)] = torch.arange(len(bank.expert_ids), device=index.device)
            self.local_index[layer] = index

    @property
    def nbytes(self) -> int:
        return sum(bank.nbytes for bank in self.banks.values())

    def forward(self, layer: int, batch, partial: bool = False) -> torch.Tensor:
        """A router.ExpertBatch -> [R, D]: per row, the weighted sum of its experts' SwiGLU outputs
        (partial=True: unrounded fp64, to be added to other workers' parts)."""
        if batch.hidden.shape[0] == 0:
            return batch.hidden.double() if partial else batch.hidden
        bank = self.banks[layer]
        return moe_experts(batch.hidden, batch.expert_idx, batch.weights, bank.gate_up, bank.down, partial)
