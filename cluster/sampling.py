"""SamplingParams and token selection. Greedy (temperature 0) and plain temperature sampling for now;
top-p / top-k / penalties arrive with the scheduler."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16  # tokens to generate at most
    temperature: float = 1.0  # 0 = greedy
    seed: int | None = None  # makes a sampled request reproducible
    ignore_eos: bool = False  # keep generating past end-of-sequence tokens

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")


class Sampler:
    """Picks the next token of one request from its fp32 logits [V]."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self.generator = torch.Generator()
        if params.seed is not None:
            self.generator.manual_seed(params.seed)
        else:
            self.generator.seed()

    def sample(self, logits_V: torch.Tensor) -> int:
        if self.params.temperature == 0:
            return int(torch.argmax(logits_V))
        probs = torch.softmax(logits_V / self.params.temperature, dim=-1)
        return int(torch.multinomial(probs, 1, generator=self.generator))
