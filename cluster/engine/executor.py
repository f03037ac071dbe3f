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

from ..model.checkpoint import CheckpointReader
from ..config import ClusterConfig, ModelConfig
from ..model.loading import load_dense_model, load_expert_shard
from .cache_plan import CacheLayout
from ..worker.messages import decode_results, encode_step
from ..worker.runner import ModelRunner
from ..worker.step import ChunkResult, StepInput
from ..worker.timing import PhaseTimer

log = logging.getLogger(__name__)


class LocalExecutor:
    def __init__(self, cfg: ModelConfig, model_dir: str | Path, dtype: torch.dtype, layout: CacheLayout,
                 load_window_steps: int = 64) -> None:
        reader = CheckpointReader(model_dir)
        model = load_dense_model(cfg, reader, dtype)
        all_experts = {layer: list(range(cfg.num_experts)) for layer in cfg.moe_layer_ids}
        shard = load_expert_shard(cfg, reader, all_experts, dtype)
        dispatcher = LocalDispatcher(shard.local_index)
        self.timer = PhaseTimer()
        for moe in model.moe_layers():
            moe.dispatcher, moe.experts, moe.timer = dispatcher, shard, self.timer
        self.runner = ModelRunner(model, layout, load_window_steps=load_window_steps)
        self.expert_bytes = shard.nbytes

    def execute(self, steps: list[StepInput]) -> list[list[ChunkResult]]:
        [step] = steps
        with self.timer.phase("step"):
            out = self.runner.execute(step)
        self.timer.steps += 1 if step.chunks else 0
        return [out]

    def num_cached_sequences(self) -> int:
        return len(self.runner.sequences)

    placement = None  # every expert is local: there is nothing to place

    def expert_load(self) -> torch.Tensor:
        return self.runner.load.totals()

    def reset_load(self) -> None:
        self.runner.load.reset()

    def worker_info(self) -> list[dict]:
        return [{"role": "local", "expert_bytes": self.expert_bytes, "sequences": len(self.runner.sequences)}]

    def timings(self, reset: bool = False) -> list[dict[str, float]]:
        return [{"role": "local", **self.timer.snapshot(reset)}]

    def shutdown(self) -> None:
        self.runner.sequences.clear()


class RayExecutor:
    def __init__(self, cfg: ModelConfig, model_dir: str | Path, dtype: str, cluster: ClusterConfig,
                 layout: CacheLayout, load_window_steps: int = 64) -> None:
        import ray
        from ray.util.placement_group import placement_group, remove_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from ..worker.workers import AttentionWorker, ExpertWorker

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
        self.placement, self.cfg, self.model_dir, self.dtype = placement, cfg, str(model_dir), dtype
        self.extra_pgs: list = []  # groups reserved for expert workers added by scale_experts
        gpus = cluster.gpus_per_worker
        if gpus is None:
            gpus = 1 if torch.cuda.is_available() else 0
        backend = cluster.backend if cluster.backend != "auto" else ("nccl" if gpus else "gloo")
        base = {"CPU": cluster.cpus_per_worker, **({"GPU": gpus} if gpus else {})}
        attention_bundle = {**base, **dict(cluster.attention_resources)}
        bundle = {**base, **dict(cluster.expert_resources)}  # an expert worker's
        # Inside a Serve replica whose placement group reserved this instance (bundle 0: the replica,
        # then one per worker) the workers go there; otherwise the executor makes its own group.
        current = ray.util.get_current_placement_group()
        if current is not None and len(current.bundle_specs) == 1 + A + E:
            self.pg, first_bundle, self.own_pg = current, 1, False
        else:
            bundles = [attention_bundle] * A + [bundle] * E
            self.pg, first_bundle, self.own_pg = placement_group(bundles, strategy="PACK"), 0, True
        ray.get(self.pg.ready(), timeout=self.timeout)

        def options(i: int) -> dict:
            custom = dict(cluster.attention_resources if i < A else cluster.expert_resources)
            return dict(
                num_cpus=cluster.cpus_per_worker, num_gpus=gpus, resources=custom,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    self.pg, placement_group_bundle_index=first_bundle + i),
            )

        args = (str(model_dir), cfg, placement)
        tail = (A, A + E, dtype, cluster.threads_per_worker, layout, load_window_steps)
        self.attention = [
            ray.remote(AttentionWorker).options(**options(r)).remote(*args, r, *tail) for r in range(A)
        ]
        self.experts = [
            ray.remote(ExpertWorker).options(**options(A + i)).remote(*args, A + i, *tail) for i in range(E)
        ]
        self.workers = self.attention + self.experts
        single_node = len([n for n in ray.nodes() if n["Alive"]]) == 1
        self.backend, self.single_node, self.bundle, self.layout = backend, single_node, bundle, layout
        self._connect()

    def _connect(self) -> None:
        init_method = self._ray.get(self.workers[0].rendezvous_address.remote(self.single_node), timeout=self.timeout)
        self._ray.get([w.connect.remote(init_method, self.backend, self.timeout) for w in self.workers],
                      timeout=self.timeout)

    def execute(self, steps: list[StepInput]) -> list[list[ChunkResult]]:
        """One StepInput per attention worker; the experts join when any worker has chunks."""
        if not any(step.chunks for step in steps):  # only releases: no collective step
            refs = [w.release.remote(list(s.freed)) for w, s in zip(self.attention, steps) if s.freed]
            self._ray.get(refs, timeout=self.timeout)
            return [[] for _ in steps]
        calls = [w.execute.remote(encode_step(s)) for w, s in zip(self.attention, steps)]
        calls += [w.execute.remote() for w in self.experts]
        replies = self._ray.get(calls, timeout=self.timeout)
        return [decode_results(r) for r in replies[: len(self.attention)]]

    def num_cached_sequences(self) -> int:
        return sum(info["sequences"] for info in self.worker_info() if info["role"] == "attention")

    def expert_load(self) -> torch.Tensor:
        """[L, E] routed pairs over the load window, summed over attention workers."""
        loads = self._ray.get([w.expert_load.remote() for w in self.attention], timeout=self.timeout)
        return torch.tensor(loads).sum(0)

    def reset_load(self) -> None:
        self._ray.get([w.reset_load.remote() for w in self.attention], timeout=self.timeout)

    def apply_placement(self, placement: ExpertPlacement) -> int:
        """Between steps: every expert worker loads its new experts while the old ones stay, then
        all workers switch tables together. Returns the bytes read from the checkpoint."""
        if placement.num_workers != len(self.experts):
            raise ValueError(f"placement has {placement.num_workers} workers, the instance {len(self.experts)}")
        loaded = self._ray.get([w.prepare_placement.remote(placement) for w in self.experts], timeout=self.timeout)
        self._ray.get([w.commit_placement.remote() for w in self.experts]
                      + [w.set_placement.remote(placement) for w in self.attention], timeout=self.timeout)
        self.placement = placement
        return sum(loaded)

    def scale_experts(self, num_workers: int, placement: ExpertPlacement) -> None:
        """Between steps: a new expert group of `num_workers` actors and a new process group. The
        attention workers keep their caches, so sequences in flight carry on."""
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from ..worker.workers import ExpertWorker

        ray, A = self._ray, len(self.attention)
        ray.get([w.disconnect.remote() for w in self.workers], timeout=self.timeout)
        for worker in self.experts[num_workers:]:
            ray.kill(worker)
        self.experts = self.experts[:num_workers]
        world = A + num_workers
        resized = [w.resize.remote(A + i, world, placement) for i, w in enumerate(self.experts)]
        added = num_workers - len(self.experts)
        if added > 0:
            pg = placement_group([self.bundle] * added, strategy="PACK")
            ray.get(pg.ready(), timeout=self.timeout)
            self.extra_pgs.append(pg)
            for i in range(added):
                strategy = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i)
                self.experts.append(ray.remote(ExpertWorker).options(
                    num_cpus=self.bundle["CPU"], num_gpus=self.bundle.get("GPU", 0),
                    resources=dict(self.cluster.expert_resources), scheduling_strategy=strategy,
                ).remote(self.model_dir, self.cfg, placement, A + len(self.experts), A, world, self.dtype,
                         self.cluster.threads_per_worker, self.layout))
        ray.get(resized + [w.resize.remote(world, placement) for w in self.attention], timeout=self.timeout)
        self.workers = self.attention + self.experts
        self.placement = placement
        self._connect()

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
        if self.own_pg:
            self._remove_pg(self.pg)
        for pg in self.extra_pgs:
            self._remove_pg(pg)
        self.extra_pgs = []
        if self.started_ray:
            self._ray.shutdown()
