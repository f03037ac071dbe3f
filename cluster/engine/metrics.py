"""Engine metrics through Ray's own metrics API: exported in Prometheus format on each node's
metrics port (names gain a `ray_` prefix, counters a `_total` suffix) and shown in the Ray dashboard.

Series stay few: per model; per layer (expert-load imbalance and hottest-expert share, not one
series per expert); per expert worker; per step phase.
"""

from __future__ import annotations

from ..worker.timing import split_step

TTFT_BOUNDARIES = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30]
TPOT_BOUNDARIES = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1]
RECOVERY_BOUNDARIES = [0.5, 1, 2, 3, 5, 10, 20, 60]


class EngineMetrics:
    def __init__(self, model: str) -> None:
        from ray.util.metrics import Counter, Gauge, Histogram

        self.tags = {"model": model}
        keys = ("model",)
        self.requests = Counter("epserve_requests", "Requests by outcome: stop, length, abort, or rejected_*",
                                tag_keys=keys + ("outcome",))
        self.prompt_tokens = Counter("epserve_prompt_tokens", "Prompt tokens of accepted requests", tag_keys=keys)
        self.generated_tokens = Counter("epserve_generated_tokens", "Tokens generated", tag_keys=keys)
        self.waiting = Gauge("epserve_waiting_requests", "Requests queued (the wait queue depth)", tag_keys=keys)
        self.running = Gauge("epserve_running_sequences", "Sequences holding cache", tag_keys=keys)
        self.kv_usage = Gauge("epserve_kv_cache_usage", "Fraction of KV cache blocks in use", tag_keys=keys)
        self.slot_usage = Gauge("epserve_state_slot_usage", "Fraction of DeltaNet state slots in use",
                                tag_keys=keys)
        self.ttft = Histogram("epserve_time_to_first_token_seconds", "Time to first token",
                              boundaries=TTFT_BOUNDARIES, tag_keys=keys)
        self.tpot = Histogram("epserve_time_per_output_token_seconds", "Mean time per output token after the first",
                              boundaries=TPOT_BOUNDARIES, tag_keys=keys)
        self.step_phase = Gauge("epserve_step_phase_seconds",
                                "Mean seconds per step: attention, dispatch, combine (attention workers), "
                                "experts (slowest expert worker)", tag_keys=keys + ("phase",))
        self.imbalance = Gauge("epserve_expert_load_imbalance", "Busiest / mean expert-worker load per layer",
                               tag_keys=keys + ("layer",))
        self.hottest = Gauge("epserve_expert_hottest_share", "Share of a layer's routed pairs taken by its "
                             "hottest expert", tag_keys=keys + ("layer",))
        self.worker_load = Gauge("epserve_expert_worker_load", "Routed pairs per expert worker over the load "
                                 "window, summed over layers", tag_keys=keys + ("worker",))
        self.worker_failures = Counter("epserve_worker_failures", "Workers lost (died or hung)",
                                       tag_keys=keys + ("role",))
        self.recoveries = Counter("epserve_recoveries", "Times the instance re-formed after a worker failure",
                                  tag_keys=keys)
        self.replayed = Counter("epserve_replayed_steps", "Steps run again after a recovery (the attention "
                                "workers undid the failed one)", tag_keys=keys)
        self.recomputed = Counter("epserve_recomputed_sequences", "Sequences prefilled again after a failure "
                                  "(the failed step's work is redone this way)", tag_keys=keys)
        self.spec_drafted = Counter("epserve_spec_draft_tokens", "Draft tokens verified (MTP speculative decoding)",
                                    tag_keys=keys)
        self.spec_accepted = Counter("epserve_spec_accepted_tokens", "Draft tokens accepted", tag_keys=keys)
        self.spec_verifies = Counter("epserve_spec_verify_steps", "Sequence steps that verified drafts "
                                     "(mean accepted length = 1 + accepted / verify steps)", tag_keys=keys)
        self.spec_accepted_length = Histogram("epserve_spec_accepted_length", "Tokens emitted per verify step",
                                              boundaries=[1.5, 2.5, 3.5], tag_keys=keys)
        self.recovery_seconds = Histogram("epserve_recovery_seconds", "Seconds from a failure to serving again",
                                          boundaries=RECOVERY_BOUNDARIES, tag_keys=keys)

    def request_finished(self, outcome: str, num_output: int, first: float | None, last: float | None) -> None:
        self.requests.inc(1, {**self.tags, "outcome": outcome})
        if first is not None and last is not None and num_output > 1:
            self.tpot.observe((last - first) / (num_output - 1), self.tags)

    def speculated(self, drafted: int, accepted: int) -> None:
        self.spec_drafted.inc(drafted, self.tags)
        if accepted:
            self.spec_accepted.inc(accepted, self.tags)
        self.spec_verifies.inc(1, self.tags)
        self.spec_accepted_length.observe(1 + accepted, self.tags)

    def recovered(self, lost: list[str], seconds: float, recomputed: int) -> None:
        for worker in lost:  # "expert 1", "attention 0"
            self.worker_failures.inc(1, {**self.tags, "role": worker.split()[0]})
        self.recoveries.inc(1, self.tags)
        if recomputed:
            self.recomputed.inc(recomputed, self.tags)
        self.recovery_seconds.observe(seconds, self.tags)

    def step(self, usage: dict) -> None:
        self.waiting.set(usage["waiting"], self.tags)
        self.running.set(usage["running"], self.tags)
        self.kv_usage.set(usage["kv_usage"], self.tags)
        self.slot_usage.set(usage["state_slot_usage"], self.tags)

    def phases(self, timings: list[dict]) -> None:
        split = split_step(timings)
        if split is None:
            return
        for phase in ("attention", "dispatch", "combine", "experts"):
            self.step_phase.set(max(split[phase], 0.0), {**self.tags, "phase": phase})

    def expert_load(self, load: dict[int, list[int]], worker_loads: dict[int, list[float]] | None) -> None:
        """load: {layer: pairs per expert}; worker_loads: {layer: load per expert worker} (None in
        one process), as EngineCore.expert_status gives them."""
        for layer, row in load.items():
            total = sum(row)
            if total:
                self.hottest.set(max(row) / total, {**self.tags, "layer": str(layer)})
        if worker_loads:
            per_worker = [sum(column) for column in zip(*worker_loads.values())]
            for w, value in enumerate(per_worker):
                self.worker_load.set(value, {**self.tags, "worker": str(w)})
            for layer, loads in worker_loads.items():
                mean = sum(loads) / len(loads)
                if mean:
                    self.imbalance.set(max(loads) / mean, {**self.tags, "layer": str(layer)})
