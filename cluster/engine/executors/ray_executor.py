"""RayExecutor: a model instance as A AttentionWorker + E ExpertWorker Ray actors.

The actors are placed in one placement group (the Serve replica's when there is one: bundle 0 the
replica, then one per worker). Each runs a persistent step loop (cluster.worker.workers); the
engine drives it over control links (cluster.worker.links): per step one command to each worker
(the attention workers' carries its msgpack StepInput) and one reply from each attention worker —
no Ray call on the step path. The MoE tensors go between the workers over their own links, one
message each way per layer. Control operations (load statistics, placement, scaling, info) pause
the loops, make ordinary Ray calls, and start the loops again.

Failures surface in seconds: a dead process closes its sockets (the peers' reads end at once), a
stuck one misses the step timeout. `execute` then raises WorkerFailure and `recover` re-forms the
instance: every loop ends (a stuck worker is killed), a lost attention worker is restarted in its
placement-group bundle, a lost expert worker's experts go to the survivors (kept replicas serve
theirs) while a replacement starts in its bundle, to be folded back in by `fold_in` between later
steps. Attention workers undo a step that failed half-way, so the engine replays it; where an
attention worker was lost, its sequences are prefilled again (Recovery says which).
"""

from __future__ import annotations

import logging
import secrets
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import torch

from router.placement import ExpertPlacement

from ...config import ClusterConfig, ModelConfig
from ...worker import links
from ...worker.messages import PAUSE, RELEASE, STEP, decode_results, encode_command, encode_step
from ...worker.step import ChunkResult, StepInput, micro_batches, mtp_pass_rows
from ..cache_plan import CacheLayout
from ..memory_plan import MemoryPlan, load_timeout_s
from .worker_recovery import Recovery, WorkerFailure, WorkerRecovery  # noqa: F401 (Recovery: re-exported)

log = logging.getLogger(__name__)


class RayExecutor(WorkerRecovery):
    def __init__(self, cfg: ModelConfig, model_dir: str | Path, dtype: str, cluster: ClusterConfig,
                 layout: CacheLayout, load_window_steps: int = 64, memory_plan: MemoryPlan | None = None) -> None:
        import ray
        from ray.util.placement_group import placement_group, remove_placement_group

        from ...worker.workers import AttentionWorker, ExpertWorker

        self._ray, self._remove_pg = ray, remove_placement_group
        self.started_ray = not ray.is_initialized()
        if self.started_ray:  # joins a running local cluster if there is one, else starts one
            ray.init(ignore_reinit_error=True, logging_level=logging.WARNING)
        self.cluster = cluster
        self.timeout = cluster.timeout_s
        self.memory_plan = memory_plan  # each GPU worker checks its share before loading
        # start-up waits follow the bytes a worker reads (a 397B checkpoint takes minutes)
        self.start_timeout = self.timeout if memory_plan is None else load_timeout_s(
            max(w.weights for w in memory_plan.workers()), self.timeout)
        A, E = cluster.attention_workers, cluster.expert_workers
        placement = cluster.placement or ExpertPlacement.contiguous(cfg.num_experts, E, list(cfg.moe_layer_ids))
        if placement.num_workers != E:
            raise ValueError(f"placement has {placement.num_workers} workers but expert_workers = {E}")
        self.placement, self.cfg, self.model_dir, self.dtype = placement, cfg, str(model_dir), dtype
        self.extra_pgs: list = []  # groups reserved for expert workers added by scale_experts
        self.device = cluster.resolve_device(ray.cluster_resources().get("GPU", 0) > 0)
        gpus = cluster.gpus_per_worker
        if gpus is None:
            gpus = 1 if self.device == "cuda" else 0
        self.overlap = cluster.two_batch_overlap
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
        fault = self._fault_step(cluster.fault_injection)
        self.attention = [
            self._actor(AttentionWorker, self.pg, first_bundle + r, cluster.attention_resources,
                        r, A, dtype, cluster.threads_per_worker, layout, load_window_steps, self.overlap,
                        cluster.replay_failed_steps, fault.get(("attention", r)))
            for r in range(A)
        ]
        self.experts = [
            self._actor(ExpertWorker, self.pg, first_bundle + A + i, cluster.expert_resources,
                        A + i, A, dtype, cluster.threads_per_worker, fault.get(("expert", i)))
            for i in range(E)
        ]
        self.workers = self.attention + self.experts
        self.single_node = len([n for n in ray.nodes() if n["Alive"]]) == 1
        self.links: list[links.Link] = []  # control links, in worker order
        self._loops: list | None = None  # the workers' serve_steps calls while they run
        self._bundles = [(self.pg, first_bundle + i) for i in range(A + E)]  # where each worker runs
        self.layout, self.load_window_steps = layout, load_window_steps
        self._placement_in_doubt = False  # a placement change failed half-way: re-assert on recovery
        self._step_number, self._in_flight = 0, []  # the steps sent and not yet answered, oldest first
        # after an expert worker is lost: the instance runs on the survivors (self.experts, in slot
        # order; self.slots: their indices in full_placement) while replacements start
        self.slots = list(range(E))
        self.full_placement: ExpertPlacement | None = None
        self.starting: dict[int, tuple] = {}  # slot -> (actor, its ready ref)
        self.preparing: tuple | None = None  # (placement, prepare refs) while experts load for it
        self._connect()

    @staticmethod
    def _fault_step(spec: str | None) -> dict[tuple[str, int], int]:
        """ClusterConfig.fault_injection as {(role, index): step}."""
        if spec is None:
            return {}
        role, index, step = spec.split(":")
        return {(role, int(index)): int(step)}

    def _actor(self, cls, pg, bundle_index: int, resources, *args, placement: ExpertPlacement | None = None):
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        return self._ray.remote(cls).options(
            num_cpus=self.bundle["CPU"], num_gpus=self.bundle.get("GPU", 0), resources=dict(resources),
            max_concurrency=cls.max_concurrency,
            scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=bundle_index),
        ).remote(self.model_dir, self.cfg, placement or self.placement, *args, device=self.device,
                 memory_plan=self.memory_plan, fp8_activations=self.cluster.fp8_activations)

    # -- links and the step loops ---------------------------------------------------------------------
    def _connect(self) -> None:
        """Links every attention worker to every expert worker and the engine to every worker, then
        starts the step loops."""
        ray, token = self._ray, secrets.token_hex(16)
        addresses = ray.get([w.listen.remote(self.single_node) for w in self.workers], timeout=self.start_timeout)
        expert_addresses = addresses[len(self.attention):]
        accepting = [w.connect_links.remote(token, expert_addresses, self.placement, self.timeout,
                                            self.cluster.step_timeout_s) for w in self.workers]
        self.links = [links.connect(address, token, "engine", 0, self.timeout) for address in addresses]
        ray.get(accepting, timeout=self.timeout)
        for link in self.links:
            link.set_timeout(self.cluster.step_timeout_s)  # no reply by then: the instance is stuck
        self._start_loops()

    def _start_loops(self) -> None:
        self._loops = [w.serve_steps.remote() for w in self.workers]

    def _pause(self, timeout_s: float | None = None) -> None:
        """Ends the step loops (each returns after its current command); a worker that cannot be
        told or does not return within timeout_s (default: the step timeout) is a failure."""
        if self._loops is None:
            return
        try:
            for link in self.links:
                link.send(encode_command(PAUSE, []))
            self._ray.get(self._loops, timeout=timeout_s or self.cluster.step_timeout_s)
        except (links.LinkError, self._ray.exceptions.RayError, TimeoutError) as e:
            raise WorkerFailure(f"pausing the step loops: {e}") from e
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
        return self.launch(steps)()

    def launch(self, steps: list[StepInput]) -> Callable[[], list[list[ChunkResult]]]:
        """Sends the step's commands without waiting for the replies (async scheduling: the workers
        run the steps sent in order, and the next one can be sent before this one is answered);
        the function returned reads the replies (steps are read in the order they were sent)."""
        rows = [[sum(c.rows for c in group) for group in micro_batches(step.chunks, self.overlap)]
                for step in steps]
        mtp_rows = [mtp_pass_rows(step.chunks) for step in steps]
        A = len(self.attention)
        try:
            if not any(map(any, rows)):  # only releases: no forward anywhere
                for link, step in zip(self.links[:A], steps):
                    if step.freed:
                        link.send(encode_command(RELEASE, rows, encode_step(step)))
                return lambda: [[] for _ in steps]
            self._step_number += 1
            number = self._step_number
            self._in_flight.append(number)
            for link, step in zip(self.links[:A], steps):
                link.send(encode_command(STEP, rows, encode_step(step), number))
            for link in self.links[A:]:
                link.send(encode_command(STEP, rows, b"", number, mtp_rows))
        except links.LinkError as e:
            raise WorkerFailure(str(e)) from e
        replying = self.links[:A]

        def replies() -> list[list[ChunkResult]]:
            try:
                results = [decode_results(link.recv_bytes()) for link in replying]
            except (links.LinkError, RuntimeError) as e:  # RuntimeError: a worker reported its step failed
                raise WorkerFailure(str(e)) from e
            self._in_flight.remove(number)
            return results

        return replies

    def _start(self, index: int, bundle: tuple, placement: ExpertPlacement):
        """A new actor for worker `index` (attention workers first) in `bundle`; no fault injection."""
        from ...worker.workers import AttentionWorker, ExpertWorker

        pg, bundle_index = bundle
        A, c = len(self.attention), self.cluster
        if index < A:
            return self._actor(AttentionWorker, pg, bundle_index, c.attention_resources, index, A, self.dtype,
                               c.threads_per_worker, self.layout, self.load_window_steps, self.overlap,
                               c.replay_failed_steps, placement=placement)
        return self._actor(ExpertWorker, pg, bundle_index, c.expert_resources, index, A, self.dtype,
                           c.threads_per_worker, placement=placement)

    # -- control, between steps -------------------------------------------------------------------
    def capture_decode_graphs(self, max_batch: int) -> int:
        """None to capture: attention workers step eagerly (CUDA graphs run in one process)."""
        return 0

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

    def begin_placement(self, placement: ExpertPlacement) -> None:
        """The expert workers start loading their experts for `placement` beside their step loops
        (a second thread in each: serving goes on); commit_placement() switches once they are done."""
        if placement.num_workers != len(self.experts):
            raise ValueError(f"placement has {placement.num_workers} workers, the instance {len(self.experts)}")
        self._check_whole("a new placement")
        self.preparing = (placement, [w.prepare_placement.remote(placement) for w in self.experts])

    def placement_prepared(self) -> bool:
        """Whether every expert worker has loaded what the placement under way needs (no wait)."""
        if self.preparing is None:
            return False
        refs = self.preparing[1]
        return len(self._ray.wait(refs, num_returns=len(refs), timeout=0)[0]) == len(refs)

    def commit_placement(self) -> int:
        """Between steps: every worker switches to the prepared placement together (milliseconds).
        Returns the bytes the expert workers read from the checkpoint. A worker that died or failed
        to load leaves the last placement in force."""
        ray = self._ray
        placement, refs = self.preparing
        self.preparing = None
        try:
            loaded = ray.get(refs, timeout=self.timeout)
        except ray.exceptions.RayActorError as e:
            raise WorkerFailure(f"loading experts for a new placement: {e}") from e
        except (ray.exceptions.RayError, TimeoutError) as e:  # out of memory, a bad file: drop it all
            ray.get([w.drop_prepared.remote() for w in self.experts], timeout=self.timeout)
            raise RuntimeError(f"loading experts for a new placement failed, the placement is unchanged: {e}") from e
        with self._between_steps():
            self._switch(placement)
        return sum(loaded)

    def _switch(self, placement: ExpertPlacement) -> None:
        """All workers take the prepared placement together. A failure part-way leaves the instance
        in doubt, and recovery re-asserts the last placement that worked."""
        try:
            self._ray.get([w.commit_placement.remote() for w in self.experts]
                          + [w.set_placement.remote(placement) for w in self.attention], timeout=self.timeout)
        except self._ray.exceptions.RayError as e:
            self._placement_in_doubt = True
            raise WorkerFailure(f"switching to a new placement: {e}") from e
        self.placement = placement

    def _reassert_placement(self) -> None:
        """After a switch failed part-way: every worker back on self.placement (paused)."""
        try:
            self._ray.get([w.prepare_placement.remote(self.placement) for w in self.experts], timeout=self.timeout)
        except self._ray.exceptions.RayError as e:
            raise WorkerFailure(f"restoring the placement: {e}") from e
        self._switch(self.placement)

    def scale_experts(self, num_workers: int, placement: ExpertPlacement) -> None:
        """A new expert group of `num_workers` actors under `placement`, between steps. Added
        workers start and kept workers load their new experts first (a failure there leaves the
        instance unchanged), then the group switches and links again; a failure in the switch is
        a WorkerFailure, and recovery re-forms the old group. The attention workers keep their
        caches, so sequences in flight carry on."""
        from ray.util.placement_group import placement_group

        from ...worker.workers import ExpertWorker

        ray, A = self._ray, len(self.attention)
        self._check_whole("scaling")
        kept, removed = self.experts[:num_workers], self.experts[num_workers:]
        added = max(0, num_workers - len(self.experts))
        pg, started = None, []
        try:
            if added:
                pg = placement_group([self.bundle] * added, strategy="PACK")
                ray.get(pg.ready(), timeout=self.timeout)
                c = self.cluster
                started = [self._actor(ExpertWorker, pg, i, c.expert_resources, A + len(kept) + i, A, self.dtype,
                                       c.threads_per_worker, placement=placement) for i in range(added)]
            ray.get([w.prepare_placement.remote(placement) for w in kept] + [w.pid.remote() for w in started],
                    timeout=self.start_timeout)
        except (ray.exceptions.RayError, TimeoutError) as e:
            self._drop_started(started, pg)
            try:
                ray.get([w.drop_prepared.remote() for w in kept], timeout=self.timeout)
            except ray.exceptions.RayError as lost:  # a kept worker died: recovery re-forms the group
                raise WorkerFailure(f"scaling the expert workers: {lost}") from e
            raise RuntimeError(f"starting the new expert group failed, the instance is unchanged: {e}") from e
        self._pause()
        self._close_links()
        try:
            ray.get([w.commit_placement.remote() for w in kept], timeout=self.timeout)
        except ray.exceptions.RayError as e:  # recovery re-forms the old group on the old placement
            self._drop_started(started, pg)
            self._placement_in_doubt = True
            raise WorkerFailure(f"switching to {num_workers} expert workers: {e}") from e
        for worker in removed:
            ray.kill(worker)
        self.experts, self.placement = kept + started, placement
        self.workers = self.attention + self.experts
        self._bundles = self._bundles[: A + len(kept)] + [(pg, i) for i in range(added)]
        if pg is not None:
            self.extra_pgs.append(pg)
        self.slots = list(range(num_workers))
        self._connect()

    def _drop_started(self, started: list, pg) -> None:
        for worker in started:
            self._ray.kill(worker)
        if pg is not None:
            self._remove_pg(pg)

    def _check_whole(self, what: str) -> None:
        if self.starting:
            raise RuntimeError(f"{what} must wait: expert workers {sorted(self.starting)} are being replaced")
        if self.preparing is not None:
            raise RuntimeError(f"{what} must wait: a placement change is under way")

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
        try:  # the workers are killed next: a short wait for the loops to end is enough
            self._pause(timeout_s=min(2.0, self.cluster.step_timeout_s))
        except WorkerFailure as e:  # a dead worker must not keep the others alive, nor the caller waiting
            log.warning("step loops did not stop cleanly: %s", e)
        self._close_links()
        for w in self.workers + [actor for actor, _ in self.starting.values()]:
            self._ray.kill(w)
        self.workers, self.attention, self.experts, self.starting = [], [], [], {}
        if self.own_pg:
            self._remove_pg(self.pg)
        for pg in self.extra_pgs:
            self._remove_pg(pg)
        self.extra_pgs = []
        if self.started_ray:
            self._ray.shutdown()
