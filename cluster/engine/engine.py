"""EngineCore: requests in, streamed outputs out. The loop is three lines: schedule, execute, update.

Synchronous and single-threaded: the offline LLM drives it directly, AsyncLLM runs it on a thread.
"""

from __future__ import annotations

import itertools
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from router import ExpertPlacement, PlacementPlanner, PlanStats, placement_stats
from router.planner import worker_loads

from .cache_plan import CacheConfig, plan_cache
from ..config import ClusterConfig, ModelConfig, RebalanceConfig
from .detokenizer import IncrementalDetokenizer
from .executor import LocalExecutor
from .ray_executor import RayExecutor
from .sampling import SamplingParams
from .scheduler import OverloadedError, Scheduled, Scheduler, SchedulerConfig
from .sequence import Sequence, Status
from ..worker.step import ChunkResult
from .tokenizer import Tokenizer, check_token_ids

log = logging.getLogger(__name__)


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # the n most likely (token id, logprob), n = params.logprobs


@dataclass
class RequestOutput:
    """What one step added to one request (a streaming delta)."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: str | int | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    prompt_logits: torch.Tensor | None = None  # scoring requests: [prompt, V] fp32
    time_to_first_token: float | None = None  # seconds, set on the output carrying the first token

    def then(self, later: RequestOutput) -> RequestOutput:
        """This delta followed by a later one of the same request, as one delta."""
        return RequestOutput(
            self.request_id, self.new_token_ids + later.new_token_ids, self.new_text + later.new_text,
            later.finished, later.finish_reason, later.stop_reason, self.logprobs + later.logprobs,
            later.num_prompt_tokens, later.num_output_tokens, later.prompt_logits,
            self.time_to_first_token if self.time_to_first_token is not None else later.time_to_first_token)


class EngineCore:
    def __init__(
        self,
        model_dir: str | Path,
        dtype: str = "float32",
        cluster: ClusterConfig | None = None,
        scheduler: SchedulerConfig | None = None,
        cache: CacheConfig | None = None,
        rebalance: RebalanceConfig | None = None,
        metrics_name: str | None = None,
        metrics_interval_steps: int = 50,
        warm_up: bool = True,
    ) -> None:
        self.model_dir = Path(model_dir)
        self.config = ModelConfig.from_pretrained(self.model_dir)
        self.cluster = cluster or ClusterConfig()
        self.scheduler_config = scheduler or SchedulerConfig()
        self.cache_config = cache or CacheConfig()
        self.rebalance_config = rebalance or RebalanceConfig()
        self._steps = 0
        dtype_bytes = torch.empty(0, dtype=getattr(torch, dtype)).element_size()
        self.layout = plan_cache(self.config, self.cache_config, self.scheduler_config.max_num_seqs, dtype_bytes)
        self.max_model_len = self.scheduler_config.max_model_len or self.config.max_position_embeddings
        try:
            self.tokenizer: Tokenizer | None = Tokenizer(self.model_dir, self.config.eos_token_ids)
        except FileNotFoundError:
            self.tokenizer = None
        if self.cluster.wants_ray:
            self.executor = RayExecutor(self.config, self.model_dir, dtype, self.cluster, self.layout,
                                        self.rebalance_config.window_steps)
        else:
            self.executor = LocalExecutor(self.config, self.model_dir, getattr(torch, dtype), self.layout,
                                          self.rebalance_config.window_steps)
        self.scheduler = Scheduler(self.scheduler_config, self.layout, self.cluster.attention_workers,
                                   self.max_model_len)
        self.requests: dict[str, Sequence] = {}
        self._detok: dict[str, IncrementalDetokenizer] = {}
        self._logits: dict[str, list[torch.Tensor]] = {}
        self._seq_ids = itertools.count()
        self._seeds = random.Random()
        self.metrics = None  # cluster.engine.metrics.EngineMetrics when asked for and Ray is up
        self.warm_up_seconds = self.warm_up() if warm_up else None  # before metrics: not counted
        if metrics_name is not None:
            import ray

            if ray.is_initialized():
                from .metrics import EngineMetrics

                self.metrics = EngineMetrics(metrics_name)
        self.metrics_interval_steps = metrics_interval_steps

    # -- requests ----------------------------------------------------------------------------------
    def tokenize(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"{self.model_dir} has no tokenizer.json: send token ids")
            ids = self.tokenizer.encode(prompt)
        else:
            ids = list(prompt)
        return check_token_ids(ids, self.config.vocab_size)

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                    score_only: bool = False) -> Sequence:
        """Queues a request; raises ValueError / ContextLengthError / OverloadedError at once."""
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        try:
            ids = self.tokenize(prompt)
        except ValueError:
            self._count_rejection("rejected_invalid")
            raise
        max_total = len(ids) if score_only else min(len(ids) + params.max_tokens, self.max_model_len)
        seq = Sequence(
            seq_id=next(self._seq_ids), request_id=request_id, prompt_ids=ids, params=params,
            seed=params.seed if params.seed is not None else self._seeds.randrange(2**31),
            max_total_tokens=max_total, score_only=score_only,
        )
        try:
            self.scheduler.add(seq)
        except Exception as e:
            self._count_rejection("rejected_overload" if isinstance(e, OverloadedError) else "rejected_context")
            raise
        self.requests[request_id] = seq
        if self.metrics is not None:
            self.metrics.prompt_tokens.inc(len(ids), self.metrics.tags)
        if self.tokenizer is not None and not score_only:
            self._detok[request_id] = IncrementalDetokenizer(
                self.tokenizer, params.stop, params.include_stop_str_in_output, params.skip_special_tokens)
        return seq

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Cancels a request; its KV blocks and state slot are free when this returns."""
        seq = self.requests.get(request_id)
        if seq is None or seq.status == Status.FINISHED:
            return None
        self.scheduler.finish(seq, "abort")
        return self._finish_output(seq, [], [])

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # -- the loop ----------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        scheduled, messages = self.scheduler.schedule()
        results = self.executor.execute(messages)
        outputs = self._update(scheduled, results)
        self._maybe_rebalance()
        self._record_metrics(outputs)
        return outputs

    def warm_up(self) -> float:
        """Runs two throw-away requests through every path of a step before serving — a chunked
        prefill across DeltaNet chunks, a one-token prompt, decodes, greedy and sampled selection —
        so that loading the kernels (building them, the first time on a machine) and first-shape
        work do not land on the first real requests. Returns the seconds it took."""
        start = time.perf_counter()
        room = min(self.max_model_len, self.layout.num_blocks * self.layout.block_size) - 4
        prompts = {"warm-up-prefill": [0] * max(1, min(2 * 64 + 5, room)), "warm-up-decode": [0]}
        for request_id, prompt in prompts.items():
            self.add_request(request_id, prompt, SamplingParams(
                max_tokens=3, temperature=0.0 if request_id.endswith("prefill") else 1.0, top_p=0.9, seed=0,
                ignore_eos=True))
        steps = 0
        while self.has_unfinished():
            scheduled, messages = self.scheduler.schedule()
            self._update(scheduled, self.executor.execute(messages))
            steps += 1
        self.flush()
        self.executor.reset_load()  # the load window describes real traffic only
        seconds = time.perf_counter() - start
        log.info("warm-up: %d steps in %.2fs", steps, seconds)
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
            m.phases(self.executor.timings(reset=True))
            status = self.expert_status()
            m.expert_load(status["load"], status["worker_loads"])

    def flush(self) -> None:
        """Tells the workers about finished sequences now instead of with the next step."""
        messages = self.scheduler.take_freed()
        if messages is not None:
            self.executor.execute(messages)

    def _update(self, scheduled: list[Scheduled], results: list[list[ChunkResult]]) -> list[RequestOutput]:
        by_seq = {r.seq_id: r for worker in results for r in worker}
        outputs = []
        now = time.monotonic()
        for item in scheduled:
            seq, result = item.seq, by_seq[item.seq.seq_id]
            seq.num_computed += item.num_tokens
            if seq.score_only:
                self._logits.setdefault(seq.request_id, []).append(result.logits)
                if seq.num_computed == len(seq.prompt_ids):
                    self.scheduler.finish(seq, "length")
                    outputs.append(self._finish_output(seq, [], []))
                continue
            if not item.sample:
                continue  # a prefill chunk in the middle of the prompt
            outputs.append(self._append_token(seq, result, now))
        return outputs

    def _append_token(self, seq: Sequence, result: ChunkResult, now: float) -> RequestOutput:
        token = result.token_id
        seq.output_ids.append(token)
        ttft = None
        if seq.first_token_time is None:
            seq.first_token_time = now
            ttft = now - seq.arrival_time
        logprobs = []
        if seq.params.logprobs is not None:
            logprobs = [TokenLogprob(token, result.logprob, result.top_logprobs)]
        params = seq.params
        detok = self._detok.get(seq.request_id)
        stop_string = detok.add(token) if detok else None
        eos = () if params.ignore_eos or self.tokenizer is None else self.tokenizer.eos_token_ids
        if stop_string is not None:
            self.scheduler.finish(seq, "stop", stop_string)
        elif token in params.stop_token_ids or token in eos:
            self.scheduler.finish(seq, "stop", token)
        elif len(seq.output_ids) >= params.max_tokens or seq.num_tokens >= seq.max_total_tokens:
            self.scheduler.finish(seq, "length")
        if seq.status == Status.FINISHED:
            out = self._finish_output(seq, [token], logprobs)
        else:
            out = RequestOutput(seq.request_id, [token], detok.delta(False) if detok else "",
                                logprobs=logprobs, num_prompt_tokens=len(seq.prompt_ids),
                                num_output_tokens=len(seq.output_ids))
        out.time_to_first_token = ttft
        return out

    def _finish_output(self, seq: Sequence, new_tokens: list[int], logprobs: list[TokenLogprob]) -> RequestOutput:
        if self.metrics is not None and not seq.score_only:
            self.metrics.request_finished(seq.finish_reason, len(seq.output_ids), seq.first_token_time,
                                          time.monotonic())
        detok = self._detok.pop(seq.request_id, None)
        logits = self._logits.pop(seq.request_id, None)
        self.requests.pop(seq.request_id, None)
        return RequestOutput(
            seq.request_id, new_tokens, detok.delta(True) if detok else "", finished=True,
            finish_reason=seq.finish_reason, stop_reason=seq.stop_reason, logprobs=logprobs,
            num_prompt_tokens=len(seq.prompt_ids), num_output_tokens=len(seq.output_ids),
            prompt_logits=torch.cat(logits) if logits else None,
        )

    # -- expert placement ------------------------------------------------------------------------
    def expert_load(self) -> torch.Tensor:
        """[layers, experts] (token, expert) pairs routed over the load window."""
        return self.executor.expert_load()

    def _loads(self) -> dict[int, list[int]]:
        totals = self.expert_load().tolist()
        return {layer: totals[layer] for layer in self.config.moe_layer_ids}

    def expert_status(self) -> dict:
        """The load window {layer: pairs per expert}, the placement (None in one process) and, with a
        placement, {layer: load per worker} and the PlanStats."""
        loads, placement = self._loads(), self.executor.placement
        if placement is None:
            return {"load": loads, "placement": None, "worker_loads": None, "stats": None}
        return {"load": loads, "placement": placement,
                "worker_loads": {layer: worker_loads(row, placement.held[layer]) for layer, row in loads.items()},
                "stats": placement_stats(loads, placement)}

    def rebalance(self, redundant_slots: int | None = None) -> dict:
        """Plans a placement for the current load window and applies it between steps; returns the
        placement and the max / mean worker load before and after (PlanStats)."""
        current: ExpertPlacement | None = self.executor.placement
        loads = self._loads()
        if current is None:  # one process: every expert is local
            stats = PlanStats(max_load=sum(sum(v) for v in loads.values()),
                              mean_load=sum(sum(v) for v in loads.values()))
            return {"placement": None, "before": stats, "after": stats, "bytes_loaded": 0}
        slots = redundant_slots if redundant_slots is not None else self.rebalance_config.redundant_slots
        if slots is None:
            slots = self.config.num_experts // 16
        new = PlacementPlanner(current.num_workers, slots).plan(loads, self.config.num_experts, current)
        loaded = self.executor.apply_placement(new) if new != current else 0
        return {"placement": new, "before": placement_stats(loads, current),
                "after": placement_stats(loads, new), "bytes_loaded": loaded}

    def scale_experts(self, num_workers: int) -> dict:
        """Adds or removes expert workers between steps (new links, contiguous placement);
        requests in flight keep their caches on the attention workers."""
        if self.executor.placement is None:
            raise ValueError("scale_experts needs the Ray executor (use_ray=True)")
        if not 1 <= num_workers <= self.config.num_experts:
            raise ValueError(f"expert workers must be in 1..{self.config.num_experts}, got {num_workers}")
        placement = ExpertPlacement.contiguous(self.config.num_experts, num_workers, list(self.config.moe_layer_ids))
        self.executor.scale_experts(num_workers, placement)
        return {"expert_workers": num_workers, "placement": placement}

    def _maybe_rebalance(self) -> None:
        policy = self.rebalance_config
        self._steps += 1
        if not policy.enabled or self._steps % policy.interval_steps or self.executor.placement is None:
            return
        if placement_stats(self._loads(), self.executor.placement).imbalance > policy.imbalance_threshold:
            self.rebalance()

    # -- introspection -----------------------------------------------------------------------------
    def cache_usage(self) -> dict[str, float | int]:
        """Scheduler-side cache occupancy: KV blocks and DeltaNet slots, used and total."""
        usage = self.scheduler.usage()
        usage["cache_bytes_per_worker"] = self.layout.total_bytes
        return usage

    def shutdown(self) -> None:
        self.executor.shutdown()
