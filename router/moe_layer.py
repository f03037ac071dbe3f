"""The MoE block as the attention side runs it: gate, dispatch, experts, combine, shared expert.

    y = combine(experts(dispatch(x, top-k of gate(x)))) + sigmoid(shared_expert_gate(x)) * shared(x)

The layer is handed its dispatcher and the local expert shard (which may hold no experts, when the
experts live on other workers), so the same code runs in one process and across Ray actors. The
router and the shared expert's gate run as one matmul once fused. With remote experts the shared
expert runs between dispatch and combine, while they compute.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn

from kernels import fuse_weights, linear, moe_block, one_call

from .dispatcher import Dispatcher, LocalDispatcher
from .gate import TopKGate
from .load import ExpertLoadWindow


class MoELayer(nn.Module):
    def __init__(
        self,
        layer_idx: int,
        gate: TopKGate,
        shared_expert: nn.Module,
        hidden_size: int,
    ) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.gate = gate
        self.top_k = gate.top_k
        self.shared_expert = shared_expert
        self.shared_expert_gate = nn.Linear(hidden_size, 1, bias=False)
        self.dispatcher: Dispatcher | None = None  # wired by the runner
        self.experts = None  # an experts.ExpertShard (duck-typed: router does not import experts)
        self.timer = None  # optional: anything with .phase(name) -> context manager
        self.load = None  # optional router.load.ExpertLoadWindow: counts routed pairs per expert
        self.router: torch.Tensor | None = None  # [E + 1, D]: gate rows, then the shared gate's
        self.shared_weights: tuple | None = None  # once fused: the shared expert's (gate_up, down)

    def fuse(self) -> None:
        """After loading: the router and the shared expert's gate as one matmul."""
        self.router = fuse_weights(self.gate, self.shared_expert_gate)
        self.shared_expert.fuse()
        self.shared_weights = (self.shared_expert.gate_up, self.shared_expert.down)

    def _phase(self, name: str):
        return self.timer.phase(name) if self.timer is not None else nullcontext()

    def start(self, x_TD: torch.Tensor) -> tuple:
        """Routes and dispatches: the experts start on x (on other workers, they now compute while
        this one runs the shared expert, then something else). Returns what `finish` needs."""
        logits = linear(x_TD, self.router)
        num_experts = logits.shape[1] - 1
        topk_idx, topk_weights = self.gate.select(logits[:, :num_experts])
        if self.load is not None:
            self.load.record(self.layer_idx, topk_idx)
        with self._phase("dispatch"):
            batch, handle = self.dispatcher.dispatch(self.layer_idx, x_TD, topk_idx, topk_weights)
        with self._phase("experts"):
            expert_out = self.experts.forward(self.layer_idx, batch)
        shared = None
        if self.dispatcher.remote:  # off the critical path: before waiting for the routed sums
            shared = self.shared_expert.forward(x_TD, logits[:, num_experts:], torch.zeros_like(x_TD))
        return x_TD, logits[:, num_experts:], expert_out, handle, shared

    def finish(self, started: tuple) -> torch.Tensor:
        """Collects the routed experts' sum and adds the shared expert."""
        x_TD, shared_logit, expert_out, handle, shared = started
        with self._phase("combine"):
            routed = self.dispatcher.combine(expert_out, handle)
        if shared is not None:  # the same bits as one call: it rounds the gated shared term, then adds
            return routed + shared
        return self.shared_expert.forward(x_TD, shared_logit, routed)

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        if self.one_call(x_TD):  # start and finish in one C++ call
            bank = self.experts.banks[self.layer_idx]
            counts = self.load.row(self.layer_idx) if self.load is not None else None
            with self._phase("experts"):  # here the router and the shared expert count as experts
                return moe_block(x_TD, self.router, self.top_k, bank.gate_up, bank.down, *self.shared_weights, counts)
        return self.finish(self.start(x_TD))

    def one_call(self, x_TD: torch.Tensor) -> bool:
        """The C++ kernels run, this process's bank is the layer's every expert in router order (no
        exchange, no remap), and the load, if any, is a window the kernel counts into (not a decode
        graph's routing recorder, which keeps the top-k tensors)."""
        return (one_call(x_TD) and isinstance(self.dispatcher, LocalDispatcher)
                and self.dispatcher.local_index[self.layer_idx] is None
                and (self.load is None or isinstance(self.load, ExpertLoadWindow)))
