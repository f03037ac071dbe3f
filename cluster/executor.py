"""Executors run a step on a model instance: in this process, or across Ray actors.

LocalExecutor: one ModelRunner with every expert and the LocalDispatcher.
RayExecutor: A AttentionWorker + E ExpertWorker actors in one placement group, one process group;
each step is one Ray call per worker (msgpack step message in, msgpack logits out), and the tensors
of the MoE layers travel over torch.distributed all-to-all.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from router import LocalDispatcher
from router.placement import ExpertPlacement

from .checkpoint import CheckpointReader
from .config import ClusterConfig, ModelConfig
from .loading import load_dense_model, load_expert_shard
from .messages import decode_tensors, encode_step
from .runner import ModelRunner, StepInput
from .timing import PhaseTimer

log = logging.getLogger(__name__)


class LocalExecutor:
    def __init__(self, cfg: ModelConfig, model_dir: str | Path, dtype: torch.dtype) -> None:
        reader = CheckpointReader(model_dir)
        model = load_dense_model(cfg, reader, dtype)
        all_experts = {layer: list(range(cfg.num_experts)) for layer in cfg.moe_layer_ids}
        shard = load_expert_shard(cfg, reader, all_experts, dtype)
        dispatcher = LocalDispatcher(
            shard.local_index, {layer: len(b.expert_ids) for layer, b in shard.banks.items()}
        )
        self.timer = PhaseTimer()
        for moe in model.moe_layers():
            moe.dispatcher, moe.experts, moe.timer = dispatcher, shard, self.timer
        self.runner = ModelRunner(model)
        self.expert_bytes = shard.nbytes

    def execute(self, step: StepInput) -> list[torch.Tensor]:
        with self.timer.phase("step"):
            out = self.runner.execute(step)
        self.timer.steps += 1
        return out

    def num_cached_sequences(self) -> int:
        return len(self.runner.caches)

    def worker_info(self) -> list[dict]:
        return [{"role": "local", "expert_bytes": self.expert_bytes, "sequences": len(self.runner.caches)}]

    def timings(self, reset: bool = False) -> list[dict[str, float]]:
        snap = self.timer.snapshot()
        if reset:
            self.timer.reset()
        return [{"role": "local", **snap}]

    def shutdown(self) -> None:
        self.runner.caches.clear()


class RayExecutor:
    def __init__(self, cfg: ModelConfig, model_dir: str | Path, dtype: str, cluster: ClusterConfig) -> None:
        import ray
        from ray.util.placement_group import placement_group, remove_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from .workers import AttentionWorker, ExpertWorker

        self._ray, self._remove_pg = ray, remove_placement_group
        self.started_ray = not ray.is_initialized()
        if self.started_ray:  # joins a running local cluster if there is one, else starts one
            ray.init(ignore_reinit_error=True, logging_level=logging.WARNING)
        self.cluster = cluster
        self.timeout = cluster.timeout_s
        A, E = cluster.attention_workers, cluster.expert_workers
        placement = cluster.placement or ExpertPlacement.contiguous(cfg.num_experts, E, list(cfg.moe_layer_ids))
        if placement.num_workers != E:
            raise ValueError(f"placement has {placement.num_workers} workers but expert_workers = {E}")
        gpus = cluster.gpus_per_worker
        if gpus is None:
            gpus = 1 if torch.cuda.is_available() else 0
        backend = cluster.backend if cluster.backend != "auto" else ("nccl" if gpus else "gloo")
        bundle = {"CPU": cluster.cpus_per_worker, **({"GPU": gpus} if gpus else {})}
        self.pg = placement_group([bundle] * (A + E), strategy="PACK")
        ray.get(self.pg.ready(), timeout=self.timeout)

        def options(i: int) -> dict:
            return dict(
                num_cpus=cluster.cpus_per_worker, num_gpus=gpus,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=i),
            )

        args = (str(model_dir), cfg, placement)
        tail = (A, A + E, dtype, cluster.threads_per_worker)
        self.attention = [
            ray.remote(AttentionWorker).options(**options(r)).remote(*args, r, *tail) for r in range(A)
        ]
        self.experts = [
            ray.remote(ExpertWorker).options(**options(A + i)).remote(*args, A + i, *tail) for i in range(E)
        ]
        self.workers = self.attention + self.experts
        single_node = len([n for n in ray.nodes() if n["Alive"]]) == 1
        init_method = ray.get(self.workers[0].rendezvous_address.remote(single_node), timeout=self.timeout)
        ray.get([w.connect.remote(init_method, backend, cluster.timeout_s) for w in self.workers],
                timeout=self.timeout)
        self.owner: dict[int, int] = {}  # seq_id -> attention worker index
        self.load = [0] * A  # live sequences per attention worker

    def _assign(self, seq_id: int) -> int:
        if seq_id not in self.owner:
            worker = min(range(len(self.load)), key=self.load.__getitem__)
            self.owner[seq_id] = worker
            self.load[worker] += 1
        return self.owner[seq_id]

    def execute(self, step: StepInput) -> list[torch.Tensor]:
        A = len(self.attention)
        per_worker_chunks = [[] for _ in range(A)]
        positions = []  # (worker, index in its chunk list) per chunk of the step
        for chunk in step.chunks:
            w = self._assign(chunk.seq_id)
            positions.append((w, len(per_worker_chunks[w])))
            per_worker_chunks[w].append(chunk)
        per_worker_finished = [[] for _ in range(A)]
        for seq_id in step.finished:
            if seq_id in self.owner:
                w = self.owner.pop(seq_id)
                self.load[w] -= 1
                per_worker_finished[w].append(seq_id)
        if not step.chunks:  # nothing to compute: release caches without a collective step
            self._release(per_worker_finished)
            return []
        calls = [
            worker.execute.remote(encode_step(StepInput(tuple(c), tuple(f))))
            for worker, c, f in zip(self.attention, per_worker_chunks, per_worker_finished)
        ]
        calls += [worker.execute.remote() for worker in self.experts]
        replies = self._ray.get(calls, timeout=self.timeout)
        logits = [decode_tensors(replies[w]) for w in range(A)]
        return [logits[w][i] for w, i in positions]

    def _release(self, per_worker_finished: list[list[int]]) -> None:
        refs = [self.attention[w].release.remote(f) for w, f in enumerate(per_worker_finished) if f]
        self._ray.get(refs, timeout=self.timeout)

    def num_cached_sequences(self) -> int:
        return sum(info["sequences"] for info in self.worker_info() if info["role"] == "attention")

    def worker_info(self) -> list[dict]:
        return self._ray.get([w.info.remote() for w in self.workers], timeout=self.timeout)

    def timings(self, reset: bool = False) -> list[dict[str, float]]:
        infos = self._ray.get([w.timings.remote(reset) for w in self.workers], timeout=self.timeout)
        roles = ["attention"] * len(self.attention) + ["expert"] * len(self.experts)
        return [{"role": role, **info} for role, info in zip(roles, infos)]

    def shutdown(self) -> None:
        if not self.workers:
            return
        try:
            self._ray.get([w.disconnect.remote() for w in self.workers], timeout=30)
        except Exception as e:  # a dead worker must not keep the others alive
            log.warning("process group teardown failed: %s", e)
        for w in self.workers:
            self._ray.kill(w)
        self.workers, self.attention, self.experts = [], [], []
        self._remove_pg(self.pg)
        if self.started_ray:
            self._ray.shutdown()
