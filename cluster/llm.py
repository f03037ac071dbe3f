"""LLM: the offline entry point, vLLM-style.

    llm = LLM(model=DIR)
    llm.score([[1, 2, 3]])                         # fp32 logits [len, V] for every position
    llm.generate(["hello"], SamplingParams(max_tokens=8, temperature=0.0))

Each call runs prefill for all prompts as one flat batch, then batched decode steps that feed one
token per unfinished sequence and reuse the caches.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import ClusterConfig, ModelConfig
from .executor import LocalExecutor, RayExecutor
from .runner import SequenceChunk, StepInput
from .sampling import Sampler, SamplingParams
from .tokenizer import Tokenizer


@dataclass
class Completion:
    prompt: str | None
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" (end-of-sequence token) or "length" (max_tokens reached)


class LLM:
    def __init__(
        self,
        model: str | Path,
        dtype: str = "float32",
        expert_workers: int = 1,
        attention_workers: int = 1,
        use_ray: bool | None = None,
        cluster: ClusterConfig | None = None,
    ) -> None:
        self.model_dir = Path(model)
        self.config = ModelConfig.from_pretrained(self.model_dir)
        self.cluster = cluster or ClusterConfig(
            expert_workers=expert_workers, attention_workers=attention_workers, use_ray=use_ray
        )
        if self.cluster.wants_ray:
            self.executor = RayExecutor(self.config, self.model_dir, dtype, self.cluster)
        else:
            self.executor = LocalExecutor(self.config, self.model_dir, getattr(torch, dtype))
        try:
            self.tokenizer: Tokenizer | None = Tokenizer(self.model_dir, self.config.eos_token_ids)
        except FileNotFoundError:
            self.tokenizer = None
        self._seq_ids = itertools.count()

    def shutdown(self) -> None:
        """Stops the workers (Ray actors, process group); idempotent."""
        self.executor.shutdown()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def worker_info(self) -> list[dict]:
        """Per worker: role, rank, bytes of weights held (experts: about 1/E of them)."""
        return self.executor.worker_info()

    def _check_ids(self, ids: list[int]) -> list[int]:
        if not ids:
            raise ValueError("prompt is empty")
        bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are outside the vocabulary [0, {self.config.vocab_size})")
        return list(ids)

    def _tokenize(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"{self.model_dir} has no tokenizer.json: pass token ids")
            return self._check_ids(self.tokenizer.encode(prompt))
        return self._check_ids(list(prompt))

    def score(self, token_id_lists: list[list[int]]) -> list[torch.Tensor]:
        """fp32 logits [len, V] for every position of every list, in one batch."""
        chunks = tuple(
            SequenceChunk(next(self._seq_ids), tuple(self._check_ids(ids)), all_logits=True)
            for ids in token_id_lists
        )
        logits = self.executor.execute(StepInput(chunks))
        self.executor.execute(StepInput((), finished=tuple(c.seq_id for c in chunks)))
        return logits

    def generate(
        self, prompts: list[str | list[int]] | str, sampling_params: SamplingParams | None = None
    ) -> list[Completion]:
        params = sampling_params or SamplingParams()
        if isinstance(prompts, str):
            prompts = [prompts]
        prompt_ids = [self._tokenize(p) for p in prompts]
        seq_ids = [next(self._seq_ids) for _ in prompts]
        samplers = [Sampler(params) for _ in prompts]
        outputs: list[list[int]] = [[] for _ in prompts]
        reasons: list[str | None] = [None] * len(prompts)
        eos = set() if params.ignore_eos or self.tokenizer is None else set(self.tokenizer.eos_token_ids)
        if not eos and not params.ignore_eos:
            eos = set(self.config.eos_token_ids)

        pending = [SequenceChunk(s, tuple(ids)) for s, ids in zip(seq_ids, prompt_ids)]
        index = {s: i for i, s in enumerate(seq_ids)}
        while pending:
            logits = self.executor.execute(StepInput(tuple(pending)))
            next_pending = []
            for chunk, row in zip(pending, logits):
                i = index[chunk.seq_id]
                token = samplers[i].sample(row[-1])
                outputs[i].append(token)
                if token in eos:
                    reasons[i] = "stop"
                elif len(outputs[i]) >= params.max_tokens:
                    reasons[i] = "length"
                else:
                    next_pending.append(SequenceChunk(chunk.seq_id, (token,)))
            pending = next_pending
        self.executor.execute(StepInput((), finished=tuple(seq_ids)))
        return [
            Completion(
                prompt=p if isinstance(p, str) else None,
                prompt_token_ids=ids,
                token_ids=out,
                text=self.tokenizer.decode(out) if self.tokenizer else "",
                finish_reason=reason,
            )
            for p, ids, out, reason in zip(prompts, prompt_ids, outputs, reasons)
        ]
