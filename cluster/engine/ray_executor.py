"""RayExecutor: a model instance as A AttentionWorker + E ExpertWorker Ray actors.

The actors are placed in one placement group (the Serve replica's when there is one: bundle 0 the
replica, then one per worker). Each runs a persistent step loop (cluster.worker.workers); the
engine drives it over control links (cluster.worker.links): per step one command to each worker
(the attention workers' carries its msgpack StepInput) and one reply from each attention worker —
no Ray call on the step path. The MoE tensors go between the workers over their own links, one
message each way per layer. Control operations (load statistics, placement, scaling, info) pause
the loops, make ordinary Ray calls, and start the loops again.
"""

from __future__ import annotations

import logging
import os
import secrets
from contextlib import contextmanager
from pathlib import Path

import torch

from router.placement import ExpertPlacement

from ..config import ClusterConfig, ModelConfig
from ..worker import links
from ..worker.messages import PAUSE, RELEASE, STEP, decode_results, encode_command, encode_step
from ..worker.step import ChunkResult, StepInput, micro_batches
from .cache_plan import CacheLayout

log = logging.getLogger(__name__)


class RayExecutor:
    def __init__(self, cfg: ModelConfig, model_dir: str | Path, dtype: str, cluster: ClusterConfig,
                 layout: CacheLayout, load_window_steps: int = 64) -> None:
        import ray
        from ray.util.placement_group import placement_group, remove_placement_group

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
        self.overlap = cluster.two_batch_overlap
        if self.overlap is None:
            self.overlap = gpus >= 1 or A + E <= (os.cpu_count() or 1)
        base = {"CPU": cluster.cpus_per_worker, **({"GPU": gpus} if gpus else {})}
        self.bundle = {**base, **dict(cluster.expert_resources)}  # an expert worker's
        attention_bundle = {**base, **dict(cluster.attention_resources)}
        # Inside a Serve replica whose placement group reserved this instance (bundle 0: the replica,
        # then one per worker) the workers go there; otherwise the executor makes its own group.
        current = ray.util.get_current_placement_group()
        if current is not None and len(current.bundle_specs) == 1 + A + E:
            self.pg, first_bundle, self.own_pg = current, 1, False
        else:
            bundles = [attention_bundle] * A + [self.bundle] * E
            self.pg, first_bundle, self.own_pg = placement_group(bundles, strategy="PACK"), 0, True
        ray.get(self.pg.ready(), timeout=self.timeout)
        self.attention = [
            self._actor(AttentionWorker, self.pg, first_bundle + r, cluster.attention_resources,
                        r, A, dtype, cluster.threads_per_worker, layout, load_window_steps, self.overlap)
            for r in range(A)
        ]
        self.experts = [
            self._actor(ExpertWorker, self.pg, first_bundle + A + i, cluster.expert_resources,
                        A + i, A, dtype, cluster.threads_per_worker)
            for i in range(E)
        ]
        self.workers = self.attention + self.experts
        self.single_node = len([n for n in ray.nodes() if n["Alive"]]) == 1
        self.links: list[links.Link] = []  # control links, in worker order
        self._loops: list | None = None  # the workers' serve_steps calls while they run
        self._connect()

    def _actor(self, cls, pg, bundle_index: int, resources, *args):
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        return self._ray.remote(cls).options(
            num_cpus=self.bundle["CPU"], num_gpus=self.bundle.get("GPU", 0), resources=dict(resources),
            scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=bundle_index),
        ).remote(self.model_dir, self.cfg, self.placement, *args)

    # -- links and the step loops ---------------------------------------------------------------------
    def _connect(self) -> None:
        """Links every attention worker to every expert worker and the engine to every worker, then
        starts the step loops."""
        ray, token = self._ray, secrets.token_hex(16)
        addresses = ray.get([w.listen.remote(self.single_node) for w in self.workers], timeout=self.timeout)
        expert_addresses = addresses[len(self.attention):]
        accepting = [w.connect_links.remote(token, expert_addresses, self.placement, self.timeout)
                     for w in self.workers]
        self.links = [links.connect(address, token, "engine", 0, self.timeout) for address in addresses]
        ray.get(accepting, timeout=self.timeout)
        for link in self.links:
            link.set_timeout(self.timeout)  # a step's reply, or the instance is in trouble
        self._start_loops()

    def _start_loops(self) -> None:
        self._loops = [w.serve_steps.remote() for w in self.workers]

    def _pause(self) -> None:
        """Ends the step loops (each returns after its current command)."""
        if self._loops is None:
            return
        for link in self.links:
            link.send(encode_command(PAUSE, []))
        self._ray.get(self._loops, timeout=self.timeout)
        self._loops = None

    @contextmanager
    def _between_steps(self):
        """Ray calls to the workers, with their step loops paused."""
        running = self._loops is not None
        self._pause()
        try:
            yield
        finally:
            if running and self.workers:
                self._start_loops()

    def _close_links(self) -> None:
        for link in self.links:
            link.close()
        self.links = []

    # -- steps ----------------------------------------------------------------------------------------
    def execute(self, steps: list[StepInput]) -> list[list[ChunkResult]]:
        """One StepInput per attention worker; the expert workers serve the layers of any worker
        that has rows. The attention workers with chunks (or releases) reply."""
        rows = [[sum(len(c.token_ids) for c in group) for group in micro_batches(step.chunks, self.overlap)]
                for step in steps]
        A = len(self.attention)
        if not any(map(any, rows)):  # only releases: no forward anywhere
            for link, step in zip(self.links[:A], steps):
                if step.freed:
                    link.send(encode_command(RELEASE, rows, encode_step(step)))
            return [[] for _ in steps]
        for link, step in zip(self.links[:A], steps):
            link.send(encode_command(STEP, rows, encode_step(step)))
        for link in self.links[A:]:
            link.send(encode_command(STEP, rows))
        return [decode_results(link.recv_bytes()) for link in self.links[:A]]

    # -- control, between steps -------------------------------------------------------------------
    def num_cached_sequences(self) -> int:
        return sum(info["sequences"] for info in self.worker_info() if info["role"] == "attention")

    def expert_load(self) -> torch.Tensor:
        """[L, E] routed pairs over the load window, summed over attention workers."""
        with self._between_steps():
            loads = self._ray.get([w.expert_load.remote() for w in self.attention], timeout=self.timeout)
        return torch.tensor(loads).sum(0)

    def reset_load(self) -> None:
        with self._between_steps():
            self._ray.get([w.reset_load.remote() for w in self.attention], timeout=self.timeout)

    def apply_placement(self, placement: ExpertPlacement) -> int:
        """Between steps: every expert worker loads its new experts while the old ones stay, then
        all workers switch tables together. Returns the bytes read from the checkpoint."""
        if placement.num_workers != len(self.experts):
            raise ValueError(f"placement has {placement.num_workers} workers, the instance {len(self.experts)}")
        with self._between_steps():
            loaded = self._ray.get([w.prepare_placement.remote(placement) for w in self.experts],
                                   timeout=self.timeout)
            self._ray.get([w.commit_placement.remote() for w in self.experts]
                          + [w.set_placement.remote(placement) for w in self.attention], timeout=self.timeout)
        self.placement = placement
        return sum(loaded)

    def scale_experts(self, num_workers: int, placement: ExpertPlacement) -> None:
        """Between steps: a new expert group of `num_workers` actors and new links. The attention
        workers keep their caches, so sequences in flight carry on."""
        from ray.util.placement_group import placement_group

        from ..worker.workers import ExpertWorker

        ray, A = self._ray, len(self.attention)
        self._pause()
        self._close_links()
        for worker in self.experts[num_workers:]:
            ray.kill(worker)
        self.experts = self.experts[:num_workers]
        self.placement = placement
        resized = [w.resize.remote(A + i, placement) for i, w in enumerate(self.experts)]
        added = num_workers - len(self.experts)
        if added > 0:
            pg = placement_group([self.bundle] * added, strategy="PACK")
            ray.get(pg.ready(), timeout=self.timeout)
            self.extra_pgs.append(pg)
            for i in range(added):
                self.experts.append(self._actor(ExpertWorker, pg, i, self.cluster.expert_resources,
                                                A + len(self.experts), A, self.dtype,
                                                self.cluster.threads_per_worker))
        ray.get(resized, timeout=self.timeout)
        self.workers = self.attention + self.experts
        self._connect()

    def worker_info(self) -> list[dict]:
        with self._between_steps():
            return self._ray.get([w.info.remote() for w in self.workers], timeout=self.timeout)

    def timings(self, reset: bool = False) -> list[dict[str, float]]:
        with self._between_steps():
            infos = self._ray.get([w.timings.remote(reset) for w in self.workers], timeout=self.timeout)
        roles = ["attention"] * len(self.attention) + ["expert"] * len(self.experts)
        return [{"role": role, **info} for role, info in zip(roles, infos)]

    def shutdown(self) -> None:
        if not self.workers:
            return
        try:
            self._pause()
        except Exception as e:  # a dead worker must not keep the others alive
            log.warning("step loops did not stop cleanly: %s", e)
        self._close_links()
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
