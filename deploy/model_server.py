"""ModelServer: one model instance (attention group + expert group, or with in_process the model in
this process) behind one Serve replica.

A plain class (tests build it without Serve); `deploy.app` wraps it in a deployment whose placement
group bundles reserve the replica and every worker at once, so an instance starts whole or not at
all. Outputs cross the deployment handle as plain dicts.
"""

from __future__ import annotations

from contextlib import aclosing
from dataclasses import asdict
from typing import Any

from cluster import (AsyncLLM, CacheConfig, ClusterConfig, RebalanceConfig, SamplingParams, SchedulerConfig,
                     SpeculativeConfig)

from .config import AppConfig
from .errors import RequestError
from .heatmap import worker_vs_mean


def output_dict(out) -> dict[str, Any]:
    d = asdict(out)
    d.pop("prompt_logits", None)
    d["logprobs"] = [(lp["token_id"], lp["logprob"], [tuple(t) for t in lp["top"]]) for lp in d["logprobs"]]
    return d


def cluster_config(cfg: AppConfig) -> ClusterConfig:
    """How each model instance of the app is laid out and run."""
    return ClusterConfig(expert_workers=cfg.expert_workers, attention_workers=cfg.attention_workers,
                         use_ray=not cfg.in_process, device=cfg.device, cpus_per_worker=cfg.cpus_per_worker,
                         gpus_per_worker=cfg.gpus_per_worker, fp8_activations=cfg.fp8_activations,
                         threads_per_worker=max(1, round(cfg.cpus_per_worker)),  # the CPUs reserved
                         attention_resources=tuple(cfg.attention_worker_resources.items()),
                         expert_resources=tuple(cfg.expert_worker_resources.items()))


class ModelServer:
    def __init__(self, config: dict) -> None:
        cfg = AppConfig(**config)
        self.config = cfg
        self.engine = AsyncLLM(
            cfg.model,
            dtype=cfg.dtype,
            cluster=cluster_config(cfg),
            scheduler=SchedulerConfig(max_num_seqs=cfg.max_num_seqs, max_num_batched_tokens=cfg.max_num_batched_tokens,
                                      max_waiting=cfg.max_waiting, max_model_len=cfg.max_model_len),
            cache=CacheConfig(memory_budget_mb=cfg.kv_cache_memory_mb, kv_cache_dtype=cfg.kv_cache_dtype),
            rebalance=RebalanceConfig(enabled=cfg.rebalance, interval_steps=cfg.rebalance_interval_steps,
                                      imbalance_threshold=cfg.rebalance_threshold,
                                      redundant_slots=cfg.redundant_expert_slots),
            metrics_name=cfg.name,
            metrics_interval_steps=cfg.metrics_interval_steps,
            speculative_config=SpeculativeConfig(num_speculative_tokens=cfg.speculative_tokens,
                                          max_batch=cfg.speculative_max_batch) if cfg.speculative_tokens else None,
        )

    async def generate(self, prompt: list[int] | dict, params: dict, request_id: str):
        """Streams output dicts (prompt: token ids, or a dict with images from deploy.images);
        raises OverloadedError / ContextLengthError / ValueError first."""
        async with aclosing(self.engine.generate(prompt, SamplingParams(**params), request_id,
                                                 stream_interval=self.config.stream_interval)) as outs:
            async for out in outs:  # closing this generator closes the engine's: the request is aborted
                yield output_dict(out)

    async def expert_status(self) -> dict:
        """Per-layer, per-expert load of the window, the placement and its worker-load stats."""
        status = await self.engine.expert_status()
        placement, stats, layers = status["placement"], status["stats"], sorted(status["load"])
        load = [status["load"][layer] for layer in layers]
        if placement is None:  # in process: every expert is here, nothing to balance
            return {"expert_workers": 0, "load": load, "placement": None}
        held = [[list(ids) for ids in placement.held[layer]] for layer in layers]
        return {"expert_workers": placement.num_workers, "load": load, "placement": held,
                "worker_load": [status["worker_loads"][layer] for layer in layers],
                "worker_load_vs_mean": worker_vs_mean(load, held),
                "max_load": stats.max_load, "mean_load": stats.mean_load, "imbalance": stats.imbalance}

    async def rebalance(self) -> dict:
        result = await self.engine.rebalance()
        return {"before": result["before"].__dict__, "after": result["after"].__dict__,
                "bytes_loaded": result["bytes_loaded"]}

    async def scale_experts(self, num_workers: int) -> dict:
        if self.config.in_process:
            raise RequestError("invalid", "this instance runs its model in process (in_process): it has no "
                                          "expert workers to scale")
        await self.engine.scale_experts(num_workers)
        return {"expert_workers": num_workers}

    def cache_usage(self) -> dict:
        return self.engine.cache_usage()

    async def worker_info(self) -> list[dict]:
        return await self.engine.worker_info()

    def ready(self) -> bool:
        """Whether the instance can step: the model is loaded and the workers linked (both before
        the engine thread starts), the thread is alive, and it is not re-forming after a worker
        failure nor broken (grpc.health.v1 says NOT_SERVING meanwhile)."""
        engine = self.engine.engine
        return (self.engine._thread.is_alive() and self.engine.last_error is None
                and not engine.recovering and not engine.broken)

    def check_health(self) -> None:
        """Serve's health check: it fails once the engine thread stopped or the instance could not
        recover from a worker failure, and Serve replaces the replica. (A recovery in progress
        is bounded by the cluster's timeouts and ends broken if they pass.)"""
        if not self.engine._thread.is_alive():
            raise RuntimeError("engine thread stopped")
        if self.engine.engine.broken:
            raise RuntimeError("the instance lost workers and could not recover")

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()
