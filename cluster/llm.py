"""LLM: the offline entry point, vLLM-style, on the same engine the server uses.

    llm = LLM(model=DIR)                                  # one process
    llm = LLM(model=DIR, expert_workers=4, attention_workers=2)   # Ray: 6 actors linked to each other
    llm.generate(["hello"], SamplingParams(max_tokens=8, temperature=0.0))
    llm.score([[1, 2, 3]])                                # fp32 logits [len, V] for every position
"""

from __future__ import annotations

import dataclasses

import itertools
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .engine.cache_plan import CacheConfig
from .config import ClusterConfig, RebalanceConfig, SpeculativeConfig
from .engine.engine import EngineCore
from .engine.outputs import TokenLogprob
from .engine.sampling import SamplingParams
from .engine.scheduler import SchedulerConfig


@dataclass
class Completion:
    prompt: str | None
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" (end token, stop token or string) or "length"
    stop_reason: str | int | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)


class LLM:
    def __init__(
        self,
        model: str | Path,
        dtype: str = "auto",
        device: str = "auto",
        expert_workers: int = 1,
        attention_workers: int = 1,
        use_ray: bool | None = None,
        cluster: ClusterConfig | None = None,
        scheduler: SchedulerConfig | None = None,
        cache: CacheConfig | None = None,
        rebalance: RebalanceConfig | None = None,
        warm_up: bool = True,
        speculative_config: SpeculativeConfig | dict | None = None,
    ) -> None:
        cluster = cluster or ClusterConfig(
            expert_workers=expert_workers, attention_workers=attention_workers, use_ray=use_ray, device=device)
        if device != "auto" and cluster.device != device:
            cluster = dataclasses.replace(cluster, device=device)
        self.engine = EngineCore(model, dtype, cluster, scheduler, cache, rebalance, warm_up=warm_up,
                                 speculative_config=speculative_config)
        self.config, self.tokenizer = self.engine.config, self.engine.tokenizer
        self._ids = itertools.count()

    @property
    def executor(self):
        return self.engine.executor

    def shutdown(self) -> None:
        """Stops the workers (step loops, links, Ray actors); idempotent."""
        self.engine.shutdown()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def worker_info(self) -> list[dict]:
        """Per worker: role, rank, bytes of weights held (experts: about 1/E of them)."""
        return self.engine.executor.worker_info()

    def spec_stats(self) -> dict | None:
        """MTP speculative decoding so far: verify steps, drafted and accepted tokens, acceptance
        rate, mean accepted length (tokens per verify step); None when speculation is off."""
        return self.engine.output_processor.spec_stats()

    def expert_load(self) -> torch.Tensor:
        """[layers, experts] (token, expert) pairs routed over the current load window."""
        return self.engine.expert_load()

    def rebalance(self, redundant_slots: int | None = None) -> dict:
        """Plans and applies an expert placement now: {"placement", "before", "after", "bytes_loaded"},
        before/after being the max and mean worker load (router.PlanStats)."""
        return self.engine.rebalance(redundant_slots)

    def scale_experts(self, num_workers: int) -> dict:
        """Changes the number of expert workers, linking them afresh with a new placement."""
        return self.engine.scale_experts(num_workers)

    def _run(self, request_ids: list[str]) -> dict[str, list]:
        outputs: dict[str, list] = {r: [] for r in request_ids}
        while self.engine.has_unfinished():
            for out in self.engine.step():
                if out.request_id in outputs:  # requests added to the engine directly are not ours
                    outputs[out.request_id].append(out)
        self.engine.flush()
        return outputs

    def score(self, token_id_lists: list[list[int] | dict]) -> list[torch.Tensor]:
        """fp32 logits [len, V] for every position of every list (or dict prompt with images, as
        generate takes), batched by the scheduler."""
        ids = [f"score-{next(self._ids)}" for _ in token_id_lists]
        for request_id, tokens in zip(ids, token_id_lists):
            prompt = tokens if isinstance(tokens, dict) else list(tokens)
            self.engine.add_request(request_id, prompt, SamplingParams(max_tokens=1), score_only=True)
        outputs = self._run(ids)
        return [outputs[r][-1].prompt_logits for r in ids]

    def generate(
        self, prompts: list[str | list[int] | dict] | str | dict, sampling_params: SamplingParams | None = None
    ) -> list[Completion]:
        """Prompts: text, token ids, or {"prompt" | "prompt_token_ids": ..., "images": [...]} (PIL
        images, encoded bytes or file paths; cluster.engine.multimodal says where they go)."""
        params = sampling_params or SamplingParams()
        prompts = [prompts] if isinstance(prompts, (str, dict)) else prompts
        ids = [f"gen-{next(self._ids)}" for _ in prompts]
        seqs = []
        try:
            for request_id, prompt in zip(ids, prompts):
                seqs.append(self.engine.add_request(request_id, prompt, params))
        except Exception:  # one bad prompt refuses the call: take back those already queued
            for seq in seqs:
                self.engine.abort_request(seq.request_id)
            raise
        outputs = self._run(ids)
        completions = []
        for prompt, seq, request_id in zip(prompts, seqs, ids):
            outs = outputs[request_id]
            completions.append(Completion(
                prompt=prompt if isinstance(prompt, str) else (prompt.get("prompt") if isinstance(prompt, dict) else None),
                prompt_token_ids=seq.prompt_ids,
                token_ids=[t for o in outs for t in o.new_token_ids],
                text="".join(o.new_text for o in outs),
                finish_reason=outs[-1].finish_reason,
                stop_reason=outs[-1].stop_reason,
                logprobs=[lp for o in outs for lp in o.logprobs],
            ))
        return completions
