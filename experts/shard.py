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
from kernels.moe import Fp8Scales


@dataclass
class ExpertBank:
    """One layer's held experts: gate_up [N, 2I, D], down [N, D, I], in the compute dtype, or FP8
    as the checkpoint stores them with their block scales (GPUs: kernels.moe.fp8_banks_supported)."""

    expert_ids: tuple[int, ...]
    gate_up: torch.Tensor
    down: torch.Tensor
    scales: Fp8Scales | None = None

    def __post_init__(self) -> None:
        n = len(self.expert_ids)
        held = [t.shape[0] for t in (self.gate_up, self.down)]
        if self.scales is not None:
            held += [t.shape[0] for t in (self.scales.gate_up, self.scales.down)]
        if any(h != n for h in held):
            raise ValueError(f"bank holds {n} experts but its tensors hold {held}")

    @property
    def nbytes(self) -> int:
        return self.gate_up.nbytes + self.down.nbytes + (self.scales.nbytes if self.scales is not None else 0)

    def experts(self, positions: list[int]) -> ExpertBank:
        """The bank of the experts at these positions (a copy)."""
        scales = self.scales
        if scales is not None:
            scales = Fp8Scales(scales.gate_up[positions], scales.down[positions], scales.block)
        return ExpertBank(tuple(self.expert_ids[i] for i in positions), self.gate_up[positions],
                          self.down[positions], scales)

    @staticmethod
    def joined(banks: list[ExpertBank]) -> ExpertBank:
        """One bank of the experts of several, in order (all FP8 or none)."""
        scales = None
        if banks[0].scales is not None:
            scales = Fp8Scales(torch.cat([b.scales.gate_up for b in banks]), torch.cat([b.scales.down for b in banks]),
                               banks[0].scales.block)
        return ExpertBank(tuple(e for b in banks for e in b.expert_ids), torch.cat([b.gate_up for b in banks]),
                          torch.cat([b.down for b in banks]), scales)


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
        return moe_experts(batch.hidden, batch.expert_idx, batch.weights, bank.gate_up, bank.down, partial,
                           bank.scales)
