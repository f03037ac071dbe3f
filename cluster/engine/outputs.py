"""A step's results to what each request streams: OutputProcessor appends the sampled (and accepted
draft) tokens to their sequences, ends a sequence at a stop token, stop string or its length
(finishing it in the scheduler), detokenises incrementally, gathers a scored prompt's logits chunk
by chunk, counts speculative decoding's acceptance, and returns one RequestOutput (a streaming
delta) per request the step advanced.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..config import SpeculativeConfig
from ..worker.step import ChunkResult
from .detokenizer import IncrementalDetokenizer
from .scheduler import Scheduled, Scheduler
from .sequence import Sequence, Status, speculation_rates
from .tokenizer import Tokenizer


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
    speculative: dict | None = None  # on the last output: Sequence.spec_stats (MTP acceptance)

    def then(self, later: RequestOutput) -> RequestOutput:
        """This delta followed by a later one of the same request, as one delta."""
        return RequestOutput(
            self.request_id, self.new_token_ids + later.new_token_ids, self.new_text + later.new_text,
            later.finished, later.finish_reason, later.stop_reason, self.logprobs + later.logprobs,
            later.num_prompt_tokens, later.num_output_tokens, later.prompt_logits,
            self.time_to_first_token if self.time_to_first_token is not None else later.time_to_first_token,
            later.speculative)


class OutputProcessor:
    """The requests in the engine (request id -> Sequence), their detokenisers and scored logits."""

    def __init__(self, scheduler: Scheduler, tokenizer: Tokenizer | None,
                 speculative: SpeculativeConfig | None) -> None:
        self.scheduler, self.tokenizer, self.speculative = scheduler, tokenizer, speculative
        self.requests: dict[str, Sequence] = {}
        self.spec_totals = {"verify_steps": 0, "drafted": 0, "accepted": 0}
        self.metrics = None  # the engine's EngineMetrics once it has them
        self._detok: dict[str, IncrementalDetokenizer] = {}
        self._logits: dict[str, list[torch.Tensor]] = {}

    def add(self, seq: Sequence) -> None:
        """A request the scheduler has taken."""
        self.requests[seq.request_id] = seq
        p = seq.params
        if self.tokenizer is not None and not seq.score_only:
            self._detok[seq.request_id] = IncrementalDetokenizer(
                self.tokenizer, p.stop, p.include_stop_str_in_output, p.skip_special_tokens)

    def update(self, scheduled: list[Scheduled], results: list[list[ChunkResult]]) -> list[RequestOutput]:
        """A step's results (per attention worker) into its sequences: the outputs of the requests
        it advanced."""
        by_seq = {r.seq_id: r for worker in results for r in worker}
        outputs = []
        now = time.monotonic()
        for item in scheduled:
            seq, result = item.seq, by_seq[item.seq.seq_id]
            if item.sample and not seq.score_only:
                seq.pending -= 1
            if seq.status == Status.FINISHED or (seq.status == Status.WAITING and seq.score_only):
                continue  # ended (or preempted, to be scored again) after this step was launched
            if seq.score_only:
                if item.past == 0:  # its first chunk, or the first again after a preemption
                    self._logits[seq.request_id] = []
                self._logits[seq.request_id].append(result.logits)
                if item.end == len(seq.prompt_ids):  # its last chunk (num_computed counts chunks in flight)
                    self.scheduler.finish(seq, "length")
                    outputs.append(self.finish(seq, [], []))
                continue
            if item.verify:  # the accepted drafts are in the worker's caches now
                seq.num_computed += len(result.accepted)
                self._count_verify(seq, len(result.accepted))
            seq.has_drafts = item.spec and item.sample
            if not item.sample:
                continue  # a prefill chunk in the middle of the prompt
            picks = result.accepted + [(result.token_id, result.logprob, result.top_logprobs)]
            outputs.append(self._append_tokens(seq, picks, now))
        return outputs

    def finish(self, seq: Sequence, new_tokens: list[int], logprobs: list[TokenLogprob]) -> RequestOutput:
        """The last output of a sequence the scheduler has finished; the request leaves."""
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
            prompt_logits=torch.cat(logits) if logits else None, speculative=seq.spec_stats(),
        )

    def spec_stats(self) -> dict | None:
        """Speculative decoding since start (warm-up excluded): verify steps, drafts, accepted,
        acceptance rate and mean accepted length (tokens per verify step); None when it is off."""
        if self.speculative is None:
            return None
        t = self.spec_totals
        return {**t, "num_speculative_tokens": self.speculative.num_speculative_tokens} | speculation_rates(**t)

    def reset_spec_totals(self) -> None:
        """Counts speculative decoding from now on (after the warm-up; a benchmark's pass)."""
        self.spec_totals = dict.fromkeys(self.spec_totals, 0)

    def _count_verify(self, seq: Sequence, accepted: int) -> None:
        k = self.speculative.num_speculative_tokens
        seq.spec_verifies, seq.spec_drafted, seq.spec_accepted = (
            seq.spec_verifies + 1, seq.spec_drafted + k, seq.spec_accepted + accepted)
        for key, value in (("verify_steps", 1), ("drafted", k), ("accepted", accepted)):
            self.spec_totals[key] += value
        if self.metrics is not None:
            self.metrics.speculated(k, accepted)

    def _append_tokens(self, seq: Sequence, picks: list[tuple[int, float, list]], now: float) -> RequestOutput:
        """Appends a step's tokens (one, or the accepted drafts and one more) until one ends the sequence."""
        ttft = None
        if seq.first_token_time is None:
            seq.first_token_time = now
            ttft = now - seq.arrival_time
        params = seq.params
        detok = self._detok.get(seq.request_id)
        eos = () if params.ignore_eos or self.tokenizer is None else self.tokenizer.eos_token_ids
        tokens, logprobs = [], []
        for token, logprob, top in picks:
            seq.output_ids.append(token)
            tokens.append(token)
            if params.logprobs is not None:
                logprobs.append(TokenLogprob(token, logprob, top))
            stop_string = detok.add(token) if detok else None
            if stop_string is not None:
                self.scheduler.finish(seq, "stop", stop_string)
            elif token in params.stop_token_ids or token in eos:
                self.scheduler.finish(seq, "stop", token)
            elif len(seq.output_ids) >= params.max_tokens or seq.num_tokens >= seq.max_total_tokens:
                self.scheduler.finish(seq, "length")
            if seq.status == Status.FINISHED:
                break
        if seq.status == Status.FINISHED:
            out = self.finish(seq, tokens, logprobs)
        else:
            out = RequestOutput(seq.request_id, tokens, detok.delta(False) if detok else "",
                                logprobs=logprobs, num_prompt_tokens=len(seq.prompt_ids),
                                num_output_tokens=len(seq.output_ids))
        out.time_to_first_token = ttft
        return out
