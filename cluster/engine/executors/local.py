"""LocalExecutor: a model instance in this process, one ModelRunner with every expert and the
LocalDispatcher. The other executor, across Ray actors, is ray_executor.RayExecutor; both offer
execute(steps), launch(steps) (async scheduling: the step runs, and the function returned reads its
results), placement, expert_load / reset_load, worker_info, timings and shutdown; only the Ray one
places experts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from kernels import fp8_activations_on, use_fp8_activations
from router import LocalDispatcher

from ...config import ModelConfig
from ...model.checkpoint import CheckpointReader
from ...model.loading import load_dense_model, load_expert_shard
from ...worker.runner import ModelRunner
from ...worker.step import ChunkResult, StepInput
from ...worker.timing import PhaseTimer
from ..cache_plan import CacheLayout


class LocalExecutor:
    def __init__(self, cfg: ModelConfig, model_dir: str | Path, dtype: torch.dtype, layout: CacheLayout,
                 load_window_steps: int = 64, device: str = "cpu", decode_graphs: bool = False,
                 compile_glue: bool = True, fp8_activations: bool = False) -> None:
        use_fp8_activations(fp8_activations)  # ClusterConfig.fp8_activations, for this process's kernels
        reader = CheckpointReader(model_dir)
        model = load_dense_model(cfg, reader, dtype, device)
        all_experts = {layer: list(range(cfg.num_experts)) for layer in cfg.moe_layer_ids}
        shard = load_expert_shard(cfg, reader, all_experts, dtype, device)
        dispatcher = LocalDispatcher(shard.local_index)
        self.timer = PhaseTimer()
        for moe in model.moe_layers():
            moe.dispatcher, moe.experts, moe.timer = dispatcher, shard, self.timer
        self.runner = ModelRunner(model, layout, load_window_steps=load_window_steps, decode_graphs=decode_graphs,
                                  compile_glue=compile_glue)
        self.expert_bytes = shard.nbytes

    def execute(self, steps: list[StepInput]) -> list[list[ChunkResult]]:
        [step] = steps
        with self.timer.phase("step"):
            out = self.runner.execute(step)
        self.timer.steps += 1 if step.chunks else 0
        return [out]

    def launch(self, steps: list[StepInput]) -> Callable[[], list[list[ChunkResult]]]:
        """Runs the step up to its tokens' copy to the host (async scheduling); the function
        returned waits for them and gives the results."""
        [step] = steps
        with self.timer.phase("step"):  # the host's part: the wait for the device is not in it
            land = self.runner.launch(step)
        self.timer.steps += 1 if step.chunks else 0
        return lambda: [land()]

    def num_cached_sequences(self) -> int:
        return len(self.runner.sequences)

    def capture_decode_graphs(self, max_batch: int) -> int:
        return self.runner.capture_decode_graphs(max_batch)

    placement = None  # every expert is local: there is nothing to place

    def expert_load(self) -> torch.Tensor:
        return self.runner.load.totals()

    def reset_load(self) -> None:
        self.runner.load.reset()

    def worker_info(self) -> list[dict]:
        return [{"role": "local", "expert_bytes": self.expert_bytes, "sequences": len(self.runner.sequences),
                 "fp8_activations": fp8_activations_on()}]

    def timings(self, reset: bool = False) -> list[dict[str, float]]:
        return [{"role": "local", **self.timer.snapshot(reset)}]

    def shutdown(self) -> None:
        self.runner.sequences.clear()
