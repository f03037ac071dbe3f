"""Sequence: the engine's record of one request (tokens, cache ownership, stop state, timings)."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from .sampling import SamplingParams
from ..worker.step import FUTURE_TOKEN, SamplingSpec


class Status(enum.Enum):
    WAITING = "waiting"  # queued, or preempted and waiting to be recomputed
    RUNNING = "running"  # owns a worker's slot and KV blocks
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    seq_id: int
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    seed: int  # the user's seed, or one drawn at arrival: sampling is a function of it
    max_total_tokens: int  # prompt + outputs may not pass this (max_tokens or the context)
    score_only: bool = False  # scoring: compute the prompt's logits, generate nothing
    output_ids: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    num_computed: int = 0  # tokens already in the worker's caches (or being written by a step in flight)
    # async scheduling: tokens sampled by steps still in flight, not yet known here (0-2: the next
    # step is scheduled before the last one's tokens are read); token(i) past the known ones is
    # FUTURE_TOKEN, which the worker replaces with the token it sampled
    pending: int = 0
    worker: int = -1  # attention worker holding the caches while running
    slot: int = -1
    block_table: list[int] = field(default_factory=list)
    blocks_sent: int = 0  # block_table entries the worker already knows
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: str | int | None = None  # the stop string or token that ended it
    arrival_time: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None
    num_preemptions: int = 0
    # speculative decoding: the MTP layer runs over this sequence's chunks while this holds (it
    # stops for good when the instance is crowded or the sequence nears its end)
    speculating: bool = False
    has_drafts: bool = False  # its worker holds k drafts to verify
    spec_verifies: int = 0  # verify steps
    spec_drafted: int = 0  # drafts verified
    spec_accepted: int = 0  # drafts accepted
    # a prompt with images: (index of each image's first token, the image), sent with the first
    # chunk; the vision tower's work in tokens, counted in the budget of the step that encodes them
    images: tuple = ()
    vision_cost: int = 0

    def spec_stats(self) -> dict | None:
        """speculation_rates of this sequence; None if it never verified."""
        if not self.spec_verifies:
            return None
        return speculation_rates(self.spec_verifies, self.spec_drafted, self.spec_accepted)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def token(self, i: int) -> int:
        n = len(self.prompt_ids)
        if i >= self.num_tokens:
            return FUTURE_TOKEN
        return self.prompt_ids[i] if i < n else self.output_ids[i - n]

    def tokens(self, begin: int, end: int) -> tuple[int, ...]:
        return tuple(self.token(i) for i in range(begin, end))

    def sampling_spec(self) -> SamplingSpec:
        p = self.params
        return SamplingSpec(
            temperature=p.temperature, top_p=p.top_p, top_k=p.top_k, min_p=p.min_p, seed=self.seed,
            presence_penalty=p.presence_penalty, frequency_penalty=p.frequency_penalty,
            repetition_penalty=p.repetition_penalty,
            logprobs=-1 if p.logprobs is None else p.logprobs, prompt_len=len(self.prompt_ids),
            logit_bias=p.logit_bias,
        )


def speculation_rates(verify_steps: int, drafted: int, accepted: int) -> dict:
    """The counts with the acceptance rate (accepted / drafted) and the mean accepted length
    (tokens per verify step, the bonus token included); 0.0 where there is nothing to divide by."""
    return {"verify_steps": verify_steps, "drafted": drafted, "accepted": accepted,
            "acceptance_rate": accepted / drafted if drafted else 0.0,
            "mean_accepted_length": 1 + accepted / verify_steps if verify_steps else 0.0}
