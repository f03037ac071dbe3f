"""EngineCore: requests in, streamed outputs out. The loop is three lines: schedule (Scheduler),
execute (the executor), update (OutputProcessor, cluster.engine.outputs); with async scheduling:
schedule, launch the step, update with the step before's. Around it: worker failures and recovery,
control operations between steps, the warm-up, metrics.

Synchronous and single-threaded: the offline LLM drives it directly, AsyncLLM runs it on a thread.
"""

from __future__ import annotations

import itertools
import logging
import random
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from kernels.moe import fp8_banks_supported
from vision import PreparedImage

from .cache_plan import CacheConfig, plan_cache
from ..config import ClusterConfig, ConfigError, ModelConfig, RebalanceConfig, SpeculativeConfig, resolve_dtype
from ..model.checkpoint import CheckpointReader, with_mtp
from ..model.loading import fp8_dense_names
from ..model.quantization import read_quantization
from ..worker import decode_graphs
from .executors.local import LocalExecutor
from .memory_plan import device_capacity, plan_instance
from .multimodal import multimodal_prompt, vision_cost_tokens
from .executors.placement_control import PlacementChange, PlacementControl
from .executors.ray_executor import RayExecutor, WorkerFailure
from .sampling import SamplingParams
from .scheduler import OverloadedError, Scheduled, Scheduler, SchedulerConfig
from .outputs import OutputProcessor, RequestOutput
from .sequence import Sequence, Status
from ..worker.step import ChunkResult
from .tokenizer import Tokenizer, check_token_ids

log = logging.getLogger(__name__)

MAX_RECOVERIES_IN_A_ROW = 3  # then the instance is broken: requests fail, health says so, Serve replaces it


class UnavailableError(RuntimeError):
    """The instance lost workers and could not re-form: it takes no more requests."""


@dataclass
class _Launched:
    """A step launched with async scheduling, its results not read yet."""

    scheduled: list[Scheduled]
    messages: list
    replies: Callable[[], list[list[ChunkResult]]] | None = None


class EngineCore(PlacementControl):
    def __init__(
        self,
        model_dir: str | Path,
        dtype: str = "auto",
        cluster: ClusterConfig | None = None,
        scheduler: SchedulerConfig | None = None,
        cache: CacheConfig | None = None,
        rebalance: RebalanceConfig | None = None,
        metrics_name: str | None = None,
        metrics_interval_steps: int = 50,
        warm_up: bool = True,
        speculative_config: SpeculativeConfig | dict | None = None,
    ) -> None:
        self.model_dir = Path(model_dir)
        self.config = ModelConfig.from_pretrained(self.model_dir)
        self.speculative = SpeculativeConfig.parse(speculative_config)
        if self.speculative is not None:
            self.config = with_mtp(self.config, self.model_dir)
        self.cluster = cluster or ClusterConfig()
        if self.cluster.async_scheduling and self.speculative is not None:
            raise ConfigError("async_scheduling and speculative decoding do not combine: the drafts are drawn "
                              "from each step's tokens on the host")
        self.scheduler_config = scheduler or SchedulerConfig()
        self.cache_config = cache or CacheConfig()
        self.rebalance_config = rebalance or RebalanceConfig()
        self._steps = 0
        dtype = self.dtype = resolve_dtype(dtype, self.model_dir)
        dtype_bytes = torch.empty(0, dtype=getattr(torch, dtype)).element_size()
        self.layout = plan_cache(self.config, self.cache_config, self.scheduler_config.max_num_seqs, dtype_bytes)
        self.max_model_len = self.scheduler_config.max_model_len or self.config.max_position_embeddings
        try:
            self.tokenizer: Tokenizer | None = Tokenizer(self.model_dir, self.config.eos_token_ids)
        except FileNotFoundError:
            self.tokenizer = None
        # Ray workers check the plan on their GPUs only: planned as if the cluster had GPUs
        device = self.cluster.resolve_device(self.cluster.wants_ray or torch.cuda.is_available())
        quantization = read_quantization(self.model_dir)
        fp8_block = quantization.block if quantization and fp8_banks_supported(device, getattr(torch, dtype)) else None
        fp8_dense = fp8_dense_names(self.config, CheckpointReader(self.model_dir)) if fp8_block else []
        self.memory_plan = plan_instance(self.config, self.layout, dtype_bytes, self.cluster,
                                         self.scheduler_config.max_num_batched_tokens, fp8_block, fp8_dense)
        if self.cluster.fp8_activations and fp8_block is None:
            log.warning("fp8_activations has no effect: no FP8 weights are kept as stored here (%s, %s, %s)",
                        "an FP8 checkpoint" if quantization else "not an FP8 checkpoint", device, dtype)
        log.info("memory plan per worker:\n%s", self.memory_plan.describe())
        if self.cluster.wants_ray:
            self.executor = RayExecutor(self.config, self.model_dir, dtype, self.cluster, self.layout,
                                        self.rebalance_config.window_steps, self.memory_plan)
        else:
            self.memory_plan.check(device, device_capacity(device))  # before a byte is read
            self.executor = LocalExecutor(self.config, self.model_dir, getattr(torch, dtype), self.layout,
                                          self.rebalance_config.window_steps, device,
                                          decode_graphs=self.cluster.cuda_graphs
                                          and decode_graphs.supported(device, getattr(torch, dtype)),
                                          compile_glue=self.cluster.compile_decode_graphs,
                                          fp8_activations=self.cluster.fp8_activations)
        self.scheduler = Scheduler(self.scheduler_config, self.layout, self.cluster.attention_workers,
                                   self.max_model_len, self.speculative)
        self.output_processor = OutputProcessor(self.scheduler, self.tokenizer, self.speculative)
        self.async_scheduling = self._async_scheduling()
        self._unread: deque[_Launched] = deque()  # async scheduling: steps launched, results not read
        self._held: list[RequestOutput] = []  # read before a control operation, returned by the next step
        self._seq_ids = itertools.count()
        self._seeds = random.Random()
        self._failures_in_a_row = 0
        self.recovering = False  # re-forming after a worker failure: not serving meanwhile
        self.broken = False  # could not recover: requests fail and health says so
        self.recoveries: list[dict] = []  # per recovery: what was lost, seconds, replayed or recomputed
        self.replayed_steps = 0
        self._change: PlacementChange | None = None  # a rebalance loading beside serving
        self.metrics = None  # cluster.engine.metrics.EngineMetrics when asked for and Ray is up
        self.warm_up_seconds = self.warm_up() if warm_up else None  # before metrics: not counted
        if metrics_name is not None:
            import ray

            if ray.is_initialized():
                from .metrics import EngineMetrics

                self.metrics = self.output_processor.metrics = EngineMetrics(metrics_name)
        self.metrics_interval_steps = metrics_interval_steps

    def _async_scheduling(self) -> bool:
        """ClusterConfig.async_scheduling resolved. By default on for Ray layouts (the engine's work
        and the replies' round trip overlap the workers') and in one process on a GPU (the host's
        overlaps the device's); off in one process on a CPU (the same cores do both) and with
        speculative decoding (its drafts are drawn from the host's tokens)."""
        asked = self.cluster.async_scheduling
        if asked is None:
            in_process = isinstance(self.executor, LocalExecutor)
            return self.speculative is None and (not in_process or self.executor.runner.device.type == "cuda")
        return asked

    # -- requests ----------------------------------------------------------------------------------
    @property
    def requests(self) -> dict[str, Sequence]:
        """The requests in the engine: request id -> Sequence."""
        return self.output_processor.requests

    def tokenize(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"{self.model_dir} has no tokenizer.json: send token ids")
            ids = self.tokenizer.encode(prompt)
        else:
            ids = list(prompt)
        return check_token_ids(ids, self.config.vocab_size)

    def add_request(self, request_id: str, prompt: str | list[int] | dict, params: SamplingParams,
                    score_only: bool = False) -> Sequence:
        """Queues a request (a dict prompt carries images: cluster.engine.multimodal); raises
        ValueError / ContextLengthError / OverloadedError / UnavailableError at once."""
        if self.broken:
            raise UnavailableError("this model instance lost workers and could not recover; it is being replaced")
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        try:
            if isinstance(prompt, dict):
                ids, images = multimodal_prompt(prompt, self.tokenize, self.config)
            else:
                ids, images = self.tokenize(prompt), ()
        except ValueError:
            self._count_rejection("rejected_invalid")
            raise
        max_total = len(ids) if score_only else min(len(ids) + params.max_tokens, self.max_model_len)
        seq = Sequence(
            seq_id=next(self._seq_ids), request_id=request_id, prompt_ids=ids, params=params,
            seed=params.seed if params.seed is not None else self._seeds.randrange(2**31),
            max_total_tokens=max_total, score_only=score_only,
            speculating=self.speculative is not None and not score_only,
            images=images, vision_cost=vision_cost_tokens(self.config, images),
        )
        try:
            self.scheduler.add(seq)
        except Exception as e:
            self._count_rejection("rejected_overload" if isinstance(e, OverloadedError) else "rejected_context")
            raise
        self.output_processor.add(seq)
        if self.metrics is not None:
            self.metrics.prompt_tokens.inc(len(ids), self.metrics.tags)
        return seq

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Cancels a request; its KV blocks and state slot are free when this returns."""
        seq = self.requests.get(request_id)
        if seq is None or seq.status == Status.FINISHED:
            return None
        self.scheduler.finish(seq, "abort")
        return self.output_processor.finish(seq, [], [])

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._unread or self._held)

    # -- the loop ----------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        outputs, self._held = self._held + self._advance(), []
        self.maintain()
        self._maybe_rebalance()
        self._record_metrics(outputs)
        return outputs

    def _advance(self) -> list[RequestOutput]:
        """Schedule, execute, update: one step, or with async scheduling the next one launched and the
        one before read."""
        if self.async_scheduling:
            return self._step_ahead()
        outputs = self._land()  # a step left in flight when async scheduling was turned off
        scheduled, messages = self.scheduler.schedule()
        results = self._execute(messages)
        if results is not None:  # None: a worker failed; the instance re-formed and recomputes them
            self._launched(scheduled)
            outputs += self.output_processor.update(scheduled, results)
        return outputs

    def _step_ahead(self) -> list[RequestOutput]:
        """Async scheduling: schedules and launches step N + 1 before reading step N's tokens, so
        that the host's work (this, the layout, reading N's tokens, the outputs) runs while the
        device (or the workers) compute. N + 1's decodes take N's tokens on the device (FUTURE_TOKEN
        in their chunks); a sequence that N ends has computed one row in vain."""
        scheduled, messages = self.scheduler.schedule()
        outputs: list[RequestOutput] = []
        try:
            if scheduled:  # listed before it is sent: a failure sending it replays it too
                self._launched(scheduled)
                self._unread.append(_Launched(scheduled, messages))
                self._unread[-1].replies = self.executor.launch(messages)
            while len(self._unread) > (1 if scheduled else 0):
                outputs += self._read_oldest()
        except WorkerFailure as failure:
            return outputs + self._replay_unread(failure)
        if not scheduled:  # the last tokens are read: finished sequences to free
            if not self._unread and any(seq.pending for seq in self.scheduler.waiting):
                raise RuntimeError("sequences wait for tokens that no step in flight will bring")
            self._execute(messages)
        return outputs

    def _read_oldest(self) -> list[RequestOutput]:
        step = self._unread[0]
        results = step.replies()
        self._unread.popleft()
        self._failures_in_a_row = 0
        return self.output_processor.update(step.scheduled, results)

    def _land(self) -> list[RequestOutput]:
        """Reads every launched step's results into its sequences (before a control operation, or
        when async scheduling is turned off)."""
        outputs: list[RequestOutput] = []
        try:
            while self._unread:
                outputs += self._read_oldest()
        except WorkerFailure as failure:
            outputs += self._replay_unread(failure)
        return outputs

    def _replay_unread(self, failure: WorkerFailure) -> list[RequestOutput]:
        """A worker failed with launched steps unread (async scheduling): re-forms the instance; the
        steps are replayed in order where the attention workers kept their caches as before the
        first of them, else their sequences are prefilled again and their tokens in flight void."""
        steps, self._unread = list(self._unread), deque()
        outputs: list[RequestOutput] = []
        if self._recover(failure):
            self.replayed_steps += len(steps)
            if self.metrics is not None:
                self.metrics.replayed.inc(len(steps), self.metrics.tags)
            for i, step in enumerate(steps):
                results = self._execute(step.messages)
                if results is None:  # failed again, and recomputing: the rest is void
                    steps = steps[i:]
                    break
                outputs += self.output_processor.update(step.scheduled, results)
            else:
                return outputs
        for step in steps:
            for item in step.scheduled:
                if item.sample and not item.seq.score_only:
                    item.seq.pending -= 1
        return outputs

    # -- failures ----------------------------------------------------------------------------------
    def _execute(self, messages) -> list[list[ChunkResult]] | None:
        """Runs a step; after a worker failure, re-forms the instance and replays the step where the
        attention workers kept their caches. None: the step's sequences were sent back to be
        prefilled again (an attention worker was lost), nothing to update."""
        while True:
            try:
                results = self.executor.execute(messages)
            except WorkerFailure as failure:
                if self._recover(failure):
                    self.replayed_steps += 1
                    if self.metrics is not None:
                        self.metrics.replayed.inc(1, self.metrics.tags)
                    continue
                return None
            self._failures_in_a_row = 0
            return results

    def _recover(self, failure: WorkerFailure) -> bool:
        """Re-forms the instance (executors.ray_executor.RayExecutor.recover). Returns True where
        every attention worker kept its caches as before the failed step, which is then replayed:
        the same inputs give the same bits in any layout, so greedy streams go on unchanged.
        Otherwise every running sequence is prefilled again from its prompt and outputs (prefill
        walks rows as decode does: the same bits again); nothing was delivered from the failed
        step, so no client sees a token twice or misses one."""
        self._failures_in_a_row += 1
        if self._failures_in_a_row > MAX_RECOVERIES_IN_A_ROW:
            self.broken = True
            raise UnavailableError(f"the instance cannot recover: {failure}") from failure
        self.recovering = True
        start = time.monotonic()
        log.warning("worker failure, recovering: %s", failure)
        try:
            recovery = self.executor.recover()
        except Exception as e:
            self.broken = True
            raise UnavailableError(f"the instance cannot recover: {e}") from e
        finally:
            self.recovering = False
        recomputed = 0 if recovery.caches_kept else self.scheduler.recompute_all()
        seconds = time.monotonic() - start
        self.recoveries.append({"lost": recovery.lost, "replacing": recovery.replacing, "seconds": seconds,
                                "replayed": recovery.caches_kept, "recomputed": recomputed, "cause": str(failure)})
        log.warning("recovered in %.2fs: lost %s, replacing %s, %s", seconds, recovery.lost or "none",
                    recovery.replacing or "none",
                    "replaying the step" if recovery.caches_kept else f"{recomputed} sequences recomputed")
        if self.metrics is not None:
            self.metrics.recovered(recovery.lost, seconds, recomputed)
        return recovery.caches_kept

    def _controlled(self, what: str, action):
        """A control operation; a worker failure during it re-forms the instance (at the last
        placement that worked) and is reported."""
        if self._unread:  # the workers settle first; the next step returns what they answered
            self._held += self._land()
        try:
            return action()
        except WorkerFailure as failure:
            self._recover(failure)
            raise RuntimeError(f"{what} failed ({failure}); the instance recovered and serves on") from failure

    def warm_up(self) -> float:
        """Runs two throw-away requests through every path of a step before serving — a chunked
        prefill across DeltaNet chunks, a one-token prompt, decodes, greedy and sampled selection —
        and captures the decode graphs of every batch bucket (CUDA), so that loading the kernels
        (building them, the first time on a machine), compiling and first-shape work do not land
        on the first real requests. Returns the seconds it took."""
        start = time.perf_counter()
        room = min(self.max_model_len, self.layout.num_blocks * self.layout.block_size) - 4
        prompts = {"warm-up-prefill": [0] * max(1, min(2 * 64 + 5, room)), "warm-up-decode": [0]}
        if self.config.vision is not None:  # the vision tower's first shapes too (a one-token image)
            side = self.config.vision.factor
            merge = self.config.vision.spatial_merge_size
            image = PreparedImage(np.zeros((side, side, 3), dtype=np.uint8), (1, merge, merge))
            prompts["warm-up-image"] = {"prompt_token_ids": [0], "images": [image]}
        for request_id, prompt in prompts.items():
            self.add_request(request_id, prompt, SamplingParams(
                max_tokens=3, temperature=0.0 if request_id.endswith("prefill") else 1.0, top_p=0.9, seed=0,
                ignore_eos=True))
        steps = 0
        while self.has_unfinished():
            self._advance()
            steps += 1
        self.flush()
        graphs = self.executor.capture_decode_graphs(self.scheduler_config.max_num_seqs)  # CUDA, one process
        self._controlled("resetting the load window", self.executor.reset_load)  # real traffic only
        self.output_processor.reset_spec_totals()
        seconds = time.perf_counter() - start
        log.info("warm-up: %d steps, %d decode graphs captured, in %.2fs", steps, graphs, seconds)
        return seconds

    def _count_rejection(self, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.requests.inc(1, {**self.metrics.tags, "outcome": outcome})

    def _record_metrics(self, outputs: list[RequestOutput]) -> None:
        m = self.metrics
        if m is None:
            return
        generated = sum(len(o.new_token_ids) for o in outputs)
        if generated:
            m.generated_tokens.inc(generated, m.tags)
        for out in outputs:
            if out.time_to_first_token is not None:
                m.ttft.observe(out.time_to_first_token, m.tags)
        m.step(self.scheduler.usage())
        if self._steps % self.metrics_interval_steps == 0:
            try:
                m.phases(self._controlled("reading step timings", lambda: self.executor.timings(reset=True)))
            except RuntimeError as e:  # recovered; the next interval reads them
                log.warning("%s", e)
                return
            status = self.expert_status()
            m.expert_load(status["load"], status["worker_loads"])

    def flush(self) -> None:
        """Tells the workers about finished sequences now instead of with the next step."""
        if self._unread:
            raise RuntimeError("flush with a step in flight: step until has_unfinished() is False")
        messages = self.scheduler.take_freed()
        if messages is not None:
            self._execute(messages)

    def _launched(self, scheduled: list[Scheduled]) -> None:
        """A step's chunks are (being) computed: their tokens count as in the caches, and each that
        samples has a token in flight until _update reads it."""
        for item in scheduled:
            item.seq.num_computed += item.num_tokens
            if item.sample and not item.seq.score_only:
                item.seq.pending += 1

    # -- introspection -----------------------------------------------------------------------------
    def worker_info(self) -> list[dict]:
        return self.executor.worker_info()

    def cache_usage(self) -> dict[str, float | int]:
        """Scheduler-side cache occupancy: KV blocks and DeltaNet slots, used and total."""
        usage = self.scheduler.usage()
        usage["cache_bytes_per_worker"] = self.layout.total_bytes
        return usage

    def shutdown(self) -> None:
        self.executor.shutdown()
