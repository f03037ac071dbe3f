"""The two worker roles of a model instance, as plain classes (Ray wraps them in
cluster.engine.executors.ray_executor).

AttentionWorker: the dense model (embeddings, DeltaNet / attention, norms, router gate, shared
expert, LM head) and the caches of its sequences; no routed experts.
ExpertWorker: an ExpertShard with only its own experts, read from the checkpoint by itself.

Each worker runs a persistent step loop (`serve_steps`, one long Ray call): it waits on its control
link for the engine's next command, runs the step, and — attention workers — answers with the
results; per MoE layer the attention workers' dispatcher and the expert workers' ExpertServer
exchange one message each way over the worker links (cluster.worker.exchange). Ray keeps
placement, lifecycle and the control operations, which the engine makes between steps after
pausing the loops (PAUSE).
"""

from __future__ import annotations

import logging
import os

import torch

from experts import ExpertBank, ExpertShard
from kernels import fp8_activations_on, use_fp8_activations
from router.placement import ExpertPlacement

from ..config import ModelConfig
from ..engine.cache_plan import CacheLayout
from ..engine.memory_plan import MemoryPlan, device_capacity
from ..model.checkpoint import CheckpointReader
from ..model.loading import load_dense_model, load_expert_shard
from . import links as links_
from .exchange import ExpertServer, LinkDispatcher
from .messages import PAUSE, RELEASE, STEP, decode_command, decode_step, encode_error, encode_results
from .runner import ModelRunner
from .timing import PhaseTimer

log = logging.getLogger(__name__)


def worker_device(requested: str) -> torch.device:
    """The instance's device; a worker asked for cuda that Ray gave no GPU says so."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("this worker was asked to run on cuda but sees no GPU (CUDA_VISIBLE_DEVICES="
                           f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r}): its bundle reserved none")
    return torch.device(requested)


class _Worker:
    """Links and the step loop shared by both roles."""

    role = ""
    max_concurrency = 1  # Ray calls at once: the step loop holds the one thread while it runs

    def __init__(self, rank: int, num_attention: int, threads: int, fault_step: int | None = None,
                 device: str = "cpu", memory_plan: MemoryPlan | None = None, fp8_activations: bool = False) -> None:
        self.rank, self.num_attention = rank, num_attention
        use_fp8_activations(fp8_activations)  # ClusterConfig.fp8_activations, for this process's kernels
        self.fault_step, self.steps_seen = fault_step, 0  # ClusterConfig.fault_injection
        self.device = worker_device(device)
        if memory_plan is not None and self.device.type == "cuda":  # refuse before loading a byte
            memory_plan.check(str(self.device), device_capacity(str(self.device)), role=self.role)
        if self.device.type == "cpu":
            torch.set_num_threads(threads)
        self.timer = PhaseTimer()
        self.listener: links_.Listener | None = None
        self.engine_link: links_.Link | None = None

    def listen(self, loopback: bool) -> links_.Address:
        """Opens this worker's listening sockets (TCP on loopback when the instance is on one node)."""
        if loopback:
            host = "127.0.0.1"
        else:
            import ray

            host = ray.util.get_node_ip_address()
        self.close_links()
        self.listener = links_.Listener(host)
        return self.listener.address

    def close_links(self) -> None:
        for link in self._links():
            link.close()
        if self.listener is not None:
            self.listener.close()
            self.listener = None
        self.engine_link = None

    def _links(self) -> list[links_.Link]:
        return [self.engine_link] if self.engine_link is not None else []

    def serve_steps(self) -> int:
        """The step loop: runs commands from the engine until PAUSE; returns the steps served."""
        served = 0
        while True:
            kind, rows, body, number, mtp_rows = decode_command(self.engine_link.recv_bytes())
            if kind == PAUSE:
                return served
            if kind == STEP:
                self.steps_seen += 1
                if self.steps_seen == self.fault_step:
                    log.warning("fault injection: %s %d exits at step %d", self.role, self.rank, self.steps_seen)
                    os._exit(1)  # as a crash: no cleanup, the OS closes the sockets
            try:
                self._command(kind, rows, body, number, mtp_rows)
            except Exception as e:  # noqa: BLE001 - reported to the engine, then the loop ends
                if isinstance(e, links_.LinkError):  # a peer is gone: the engine recovers
                    log.warning("step ended on %s %d: %s", self.role, self.rank, e)
                else:
                    log.exception("step failed on %s %d", self.role, self.rank)
                self._fail(e)
                raise
            served += 1

    def _command(self, kind: int, rows: list[list[int]], body: bytes, number: int,
                 mtp_rows: list[list[int]]) -> None:
        raise NotImplementedError

    def _fail(self, error: Exception) -> None:
        """After an error the exchange is out of step: every link closes, so peers stop too."""
        self.close_links()

    def timings(self, reset: bool = False) -> dict[str, float]:
        return self.timer.snapshot(reset)

    def pid(self) -> int:
        return os.getpid()


class AttentionWorker(_Worker):
    role = "attention"

    def __init__(self, model_dir: str, cfg: ModelConfig, placement: ExpertPlacement, rank: int,
                 num_attention: int, dtype: str, threads: int, layout: CacheLayout,
                 load_window_steps: int = 64, overlap: bool = False, transactional: bool = True,
                 fault_step: int | None = None, device: str = "cpu", memory_plan: MemoryPlan | None = None,
                 fp8_activations: bool = False) -> None:
        super().__init__(rank, num_attention, threads, fault_step, device, memory_plan, fp8_activations)
        reader = CheckpointReader(model_dir)
        self.model = load_dense_model(cfg, reader, getattr(torch, dtype), self.device)
        self.dense_bytes = reader.bytes_read
        self.placement = placement
        self.expert_links: list[links_.Link] = []
        # transactional: a step that fails half-way (an expert worker lost) is undone, for a replay
        self.runner = ModelRunner(self.model, layout, load_window_steps=load_window_steps, overlap=overlap,
                                  transactional=transactional)
        self.completed_step = 0  # the number of the last step whose results went to the engine

    def _links(self) -> list[links_.Link]:
        return super()._links() + self.expert_links

    def connect_links(self, token: str, expert_addresses: list[tuple[str, int]], placement: ExpertPlacement,
                      timeout_s: float, step_timeout_s: float | None = None) -> None:
        """Connects to every expert worker (routing by `placement`), then takes the engine's link.
        An expert silent for step_timeout_s within a step fails the step (a hung peer)."""
        self.expert_links = [links_.connect(address, token, self.role, self.rank, timeout_s)
                             for address in expert_addresses]
        for link in self.expert_links:
            link.set_timeout(step_timeout_s)
        self.engine_link = self.listener.accept(token, {("engine", 0)}, timeout_s)[("engine", 0)]
        self.set_placement(placement)

    def close_links(self) -> None:
        super().close_links()
        self.expert_links = []

    def set_placement(self, placement: ExpertPlacement) -> None:
        """Switches the routing tables (between steps, once the expert workers hold the weights)."""
        self.placement = placement
        dispatcher = LinkDispatcher(placement, self.expert_links, device=self.device)
        no_experts = ExpertShard(placement.num_experts, {})
        for moe in self.model.moe_layers():
            moe.dispatcher, moe.experts, moe.timer = dispatcher, no_experts, self.timer

    def expert_load(self) -> list[list[int]]:
        """[layer][expert] routed pairs over the load window, for this worker's sequences."""
        return self.runner.load.totals().tolist()

    def reset_load(self) -> None:
        self.runner.load.reset()

    def _command(self, kind: int, rows: list[list[int]], body: bytes, number: int,
                 mtp_rows: list[list[int]]) -> None:
        step = decode_step(body)
        if kind == RELEASE:
            for seq_id in step.freed:
                self.runner.sequences.pop(seq_id, None)
            return
        with self.timer.phase("step"):
            results = self.runner.execute(step)
        self.timer.steps += 1 if step.chunks else 0
        self.completed_step = number
        self.engine_link.send(encode_results(results))

    def last_completed_step(self) -> int:
        return self.completed_step

    def _fail(self, error: Exception) -> None:
        try:  # the engine is waiting for this worker's reply: tell it what happened
            self.engine_link.send(encode_error(f"{type(error).__name__}: {error}"))
        except links_.LinkError:
            pass
        super()._fail(error)

    def info(self) -> dict:
        return {"role": "attention", "rank": self.rank, "pid": os.getpid(), "dense_bytes": self.dense_bytes,
                "sequences": len(self.runner.sequences), "device": str(self.device),
                "fp8_activations": fp8_activations_on()}


class ExpertWorker(_Worker):
    role = "expert"
    max_concurrency = 2  # prepare_placement loads new experts on a second thread while the loop serves

    def __init__(self, model_dir: str, cfg: ModelConfig, placement: ExpertPlacement, rank: int,
                 num_attention: int, dtype: str, threads: int, fault_step: int | None = None,
                 device: str = "cpu", memory_plan: MemoryPlan | None = None, fp8_activations: bool = False) -> None:
        super().__init__(rank, num_attention, threads, fault_step, device, memory_plan, fp8_activations)
        if self.device.type == "cpu" and hasattr(os, "SCHED_BATCH"):
            # woken by a dispatch, an expert worker must not take the core of the attention worker
            # that is still sending to the others: it runs on a free core, or when the sender waits
            os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
        self.cfg = cfg
        self.model_dir, self.dtype = model_dir, getattr(torch, dtype)
        self.shard = ExpertShard(cfg.num_experts, {})
        self.bytes_read = 0
        self.attention_links: list[links_.Link] = []
        self.server: ExpertServer | None = None
        self.prepare_placement(placement)
        self.commit_placement()

    def _links(self) -> list[links_.Link]:
        return super()._links() + self.attention_links

    def connect_links(self, token: str, expert_addresses: list[tuple[str, int]], placement: ExpertPlacement,
                      timeout_s: float, step_timeout_s: float | None = None) -> None:
        """Takes the engine's control link and one link from every attention worker (its experts
        were loaded for `placement` already). An attention worker silent for step_timeout_s within
        a step fails the step."""
        expected = {("engine", 0)} | {("attention", a) for a in range(self.num_attention)}
        accepted = self.listener.accept(token, expected, timeout_s)
        self.engine_link = accepted[("engine", 0)]
        self.attention_links = [accepted[("attention", a)] for a in range(self.num_attention)]
        for link in self.attention_links:
            link.set_timeout(step_timeout_s)
        self.server = ExpertServer(self.attention_links, self.cfg.hidden_size, self.cfg.num_experts_per_tok,
                                   self.dtype, self.device, self.timer)

    def close_links(self) -> None:
        super().close_links()
        self.attention_links, self.server = [], None

    def prepare_placement(self, placement: ExpertPlacement) -> int:
        """Loads the experts this worker will hold under `placement` (keeping those it has) while
        the current shard keeps serving (this runs beside the step loop, which only reads
        self.shard); returns the bytes read from the checkpoint."""
        index = self.rank - self.num_attention
        reader = CheckpointReader(self.model_dir)
        banks = {}
        for layer in self.cfg.moe_layer_ids:
            ids = list(placement.held[layer][index])
            old = self.shard.banks.get(layer)
            have = {e: i for i, e in enumerate(old.expert_ids)} if old is not None else {}
            missing = [e for e in ids if e not in have]
            sources = [old.experts([have[e] for e in ids if e in have])] if have else []
            if missing:
                sources.append(load_expert_shard(self.cfg, reader, {layer: missing}, self.dtype,
                                                 self.device).banks[layer])
            joined = ExpertBank.joined([b for b in sources if b.expert_ids])
            where = {e: i for i, e in enumerate(joined.expert_ids)}
            banks[layer] = joined.experts([where[e] for e in ids])  # in the placement's order
        self._pending = (placement, ExpertShard(self.cfg.num_experts, banks))
        self.bytes_read += reader.bytes_read
        return reader.bytes_read

    def commit_placement(self) -> None:
        """Switches to the prepared shard (between steps)."""
        self.placement, self.shard = self._pending
        self._pending = None

    def drop_prepared(self) -> None:
        self._pending = None

    def resize(self, rank: int, placement: ExpertPlacement) -> int:
        """A new expert group: this worker's rank may change; loads its experts for the next links."""
        self.rank = rank
        loaded = self.prepare_placement(placement)
        self.commit_placement()
        return loaded

    def _command(self, kind: int, rows: list[list[int]], body: bytes, number: int,
                 mtp_rows: list[list[int]]) -> None:
        """Serves every MoE layer of the step, micro-batch by micro-batch as the attention workers
        send them (rows[a][m]: rows of attention worker a in micro-batch m), then the MTP layer's
        passes (mtp_rows[a][p]: its rows in pass p)."""
        if kind == RELEASE or not any(map(any, rows)):
            return
        with self.timer.phase("step"):
            for layer in range(self.cfg.num_hidden_layers):
                for m in range(max(len(r) for r in rows)):
                    self.server.serve(layer, [r[m] if m < len(r) else 0 for r in rows], self.shard)
            for p in range(max(map(len, mtp_rows), default=0)):
                self.server.serve(self.cfg.mtp_layer_id, [r[p] if p < len(r) else 0 for r in mtp_rows],
                                  self.shard)
        self.timer.steps += 1

    def info(self) -> dict:
        return {"role": "expert", "rank": self.rank, "pid": os.getpid(), "expert_bytes": self.shard.nbytes,
                "bytes_read": self.bytes_read, "device": str(self.device), "fp8_activations": fp8_activations_on(),
                "experts_per_layer": {layer: len(b.expert_ids) for layer, b in self.shard.banks.items()},
                "bytes_in": self.server.bytes_in if self.server is not None else 0}
