"""Scheduler: continuous batching with chunked prefill under a token budget (plain Python policy).

Each step:
  1. running sequences, oldest first, get their next tokens: one for a decode, the rest of the
     prompt (up to the budget) for a prefill in progress. A sequence that needs a KV block when none
     is free preempts the newest running sequence (recomputation: its blocks and slot are freed and
     it waits at the head of the queue, to be prefilled again with its outputs so far);
  2. waiting sequences are admitted first come, first served, while the budget, a free state slot
     and enough free blocks allow, on the attention worker with the most free blocks.
The result is one StepInput per attention worker carrying only what changed since the last step.
Capacities are plain ints, so the policy is tested with fake ones.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from .cache_plan import CacheLayout
from ..config import ConfigError, SpeculativeConfig
from .free_list import FreeList
from .sequence import Sequence, Status
from ..worker.step import ScheduledChunk, StepInput


class OverloadedError(RuntimeError):
    """The wait queue is full: the request is refused rather than queued without bound."""


class ContextLengthError(ValueError):
    """The request cannot fit the model's context or a worker's KV cache."""


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 32  # running sequences per attention worker (= its DeltaNet state slots)
    max_num_batched_tokens: int = 256  # tokens per step: prefill chunks + decodes
    max_waiting: int = 256  # queued requests (beyond free slots) past which new ones are refused
    max_model_len: int | None = None  # None: the model's max_position_embeddings

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_waiting"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ConfigError(f"max_model_len must be >= 2, got {self.max_model_len}")


@dataclass
class Scheduled:
    seq: Sequence
    num_tokens: int  # tokens computed this step (of the sequence's own; a verify adds k drafts)
    sample: bool  # the chunk reaches the sequence's last token: a new token comes back
    spec: bool = False  # the MTP layer runs over the chunk (and drafts, if it samples)
    verify: bool = False  # the worker's k drafts ride along and are verified
    past: int = 0  # the sequence's tokens computed before this chunk

    @property
    def end(self) -> int:
        """The sequence's tokens computed once this chunk is (its own, drafts not counted)."""
        return self.past + self.num_tokens

    def rows(self, k: int) -> int:
        return self.num_tokens + (k if self.verify else 0)


class Scheduler:
    def __init__(self, config: SchedulerConfig, layout: CacheLayout, num_workers: int,
                 max_model_len: int, speculative: SpeculativeConfig | None = None) -> None:
        self.config, self.layout = config, layout
        self.speculative = speculative
        self.spec_tokens = speculative.num_speculative_tokens if speculative else 0
        self.max_model_len = max_model_len
        self.blocks = [FreeList(layout.num_blocks) for _ in range(num_workers)]
        self.slots = [FreeList(min(layout.num_slots, config.max_num_seqs)) for _ in range(num_workers)]
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admission order
        self._freed: list[list[int]] = [[] for _ in range(num_workers)]  # for the next step message

    # -- admission control -------------------------------------------------------------------------
    def check(self, num_prompt: int, max_total: int) -> None:
        """Raises unless a request of this size can ever run."""
        if num_prompt >= self.max_model_len:
            raise ContextLengthError(
                f"prompt has {num_prompt} tokens; the model's context is {self.max_model_len} "
                f"(prompt + at least one generated token must fit)")
        blocks = math.ceil(max_total / self.layout.block_size)
        if blocks > self.layout.num_blocks:
            raise ContextLengthError(
                f"prompt + max_tokens = {max_total} tokens need {blocks} KV blocks, but an attention "
                f"worker's cache holds {self.layout.num_blocks}; lower max_tokens or raise the cache budget")

    def add(self, seq: Sequence) -> None:
        # requests that free state slots will take at the next step are not queued in effect
        free_slots = sum(s.num_free for s in self.slots)
        if len(self.waiting) >= self.config.max_waiting + free_slots:
            raise OverloadedError(f"server overloaded: {len(self.waiting)} requests already waiting")
        self.check(len(seq.prompt_ids), seq.max_total_tokens)
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # -- releasing ---------------------------------------------------------------------------------
    def _release(self, seq: Sequence) -> None:
        if seq.worker >= 0:
            self.blocks[seq.worker].free(seq.block_table)
            self.slots[seq.worker].free([seq.slot])
            self._freed[seq.worker].append(seq.seq_id)
        seq.worker, seq.slot, seq.block_table, seq.blocks_sent, seq.num_computed = -1, -1, [], 0, 0
        seq.has_drafts = False

    def finish(self, seq: Sequence, reason: str, stop_reason: str | int | None = None) -> None:
        """Ends a sequence (done, or cancelled): its blocks and slot are free at once."""
        if seq.status == Status.FINISHED:
            return
        if seq.status == Status.RUNNING:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        self._release(seq)
        seq.status, seq.finish_reason, seq.stop_reason = Status.FINISHED, reason, stop_reason

    def recompute_all(self) -> int:
        """Every running sequence back to the head of the queue, to be prefilled again from its
        prompt and outputs (after a worker failure left caches in doubt); returns how many."""
        running = list(self.running)
        for seq in reversed(running):  # the oldest ends up first in the queue
            self._preempt(seq)
        return len(running)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._release(seq)
        seq.status = Status.WAITING
        seq.num_preemptions += 1
        self.waiting.appendleft(seq)

    # -- scheduling --------------------------------------------------------------------------------
    def _grow(self, seq: Sequence, total_tokens: int) -> bool:
        need = math.ceil(total_tokens / self.layout.block_size) - len(seq.block_table)
        if need <= 0:
            return True
        if self.blocks[seq.worker].num_free < need:
            return False
        seq.block_table.extend(self.blocks[seq.worker].allocate(need))
        return True

    def _chunk(self, seq: Sequence, budget: int, crowded: bool) -> Scheduled:
        """The sequence's next chunk under the budget, with its speculation decided: a sequence
        stops speculating for good when the instance is crowded or its end is within 2k tokens
        (the positions a verify and its drafts write)."""
        k = self.spec_tokens
        if seq.speculating and (crowded or seq.num_tokens + 2 * k > seq.max_total_tokens):
            seq.speculating = False
        n = min(seq.num_tokens + seq.pending - seq.num_computed, budget)
        sample = seq.num_computed + n == seq.num_tokens + seq.pending
        verify = seq.speculating and seq.has_drafts and n == 1 and budget >= 1 + k
        return Scheduled(seq, n, sample, spec=seq.speculating, verify=verify, past=seq.num_computed)

    @staticmethod
    def _has_work(seq: Sequence) -> bool:
        """False while everything it has is computed or being computed (async scheduling: a scored
        prompt in flight, or a token in flight that ends the sequence by length)."""
        ahead = seq.num_tokens + seq.pending
        return ahead > seq.num_computed and not (seq.pending and ahead >= seq.max_total_tokens)

    def _tokens_needed(self, item: Scheduled) -> int:
        """Cache positions the chunk writes up to: its rows, and k - 1 more draft rows when it drafts."""
        k = self.spec_tokens
        return item.seq.num_computed + item.rows(k) + (k - 1 if item.spec and item.sample else 0)

    def schedule(self) -> tuple[list[Scheduled], list[StepInput]]:
        budget = self.config.max_num_batched_tokens
        spec = self.speculative
        # the load speculation looks at: sequences running and waiting to (those admitted this step)
        crowded = spec is not None and len(self.running) + len(self.waiting) > spec.max_batch * len(self.blocks)
        scheduled: list[Scheduled] = []
        preempted = False
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status != Status.RUNNING or not self._has_work(seq):  # preempted earlier in this loop,
                continue  # or all it has is in flight
            item = self._chunk(seq, budget, crowded)
            while not self._grow(seq, self._tokens_needed(item)):
                victim = self.running[-1]
                for old in [s for s in scheduled if s.seq is victim]:
                    scheduled.remove(old)
                    budget += old.rows(self.spec_tokens)
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            if seq.status == Status.RUNNING:
                scheduled.append(item)
                budget -= item.rows(self.spec_tokens)

        while self.waiting and budget > 0 and not preempted:
            seq = self.waiting[0]
            if seq.pending:  # preempted with a token in flight: recomputed once it is known
                break
            vision = seq.vision_cost  # its images are encoded with its first chunk
            if vision >= budget and scheduled:
                break  # a step of its own (at least its first token) rather than a crowded one
            item = self._chunk(seq, max(1, budget - vision), crowded)
            need = math.ceil(self._tokens_needed(item) / self.layout.block_size)
            candidates = [w for w in range(len(self.blocks)) if self.slots[w].num_free
                          and self.blocks[w].num_free >= need]
            if not candidates:
                break
            worker = max(candidates, key=lambda w: (self.blocks[w].num_free, -w))
            self.waiting.popleft()
            seq.worker, seq.slot = worker, self.slots[worker].allocate(1)[0]
            self._grow(seq, self._tokens_needed(item))
            seq.status = Status.RUNNING
            self.running.append(seq)
            scheduled.append(item)
            budget -= item.num_tokens + vision
        return scheduled, self._messages(scheduled)

    def _messages(self, scheduled: list[Scheduled]) -> list[StepInput]:
        chunks: list[list[ScheduledChunk]] = [[] for _ in self.blocks]
        for item in scheduled:
            seq = item.seq
            fresh = seq.num_computed == 0
            chunks[seq.worker].append(ScheduledChunk(
                seq_id=seq.seq_id,
                token_ids=seq.tokens(seq.num_computed, seq.num_computed + item.num_tokens),
                past=seq.num_computed,
                new_blocks=tuple(seq.block_table[seq.blocks_sent:]),
                slot=seq.slot if fresh else -1,
                sample=item.sample and not seq.score_only,
                want_logits=seq.score_only,
                sampling=seq.sampling_spec() if fresh else None,
                spec_tokens=self.spec_tokens if item.spec else 0,
                verify=item.verify,
                next_token=seq.token(seq.num_computed + item.num_tokens) if item.spec and not item.sample else -1,
                images=seq.images if fresh else (),
            ))
            seq.blocks_sent = len(seq.block_table)
        messages = [StepInput(tuple(c), tuple(f)) for c, f in zip(chunks, self._freed)]
        self._freed = [[] for _ in self.blocks]
        return messages

    def take_freed(self) -> list[StepInput] | None:
        """Step messages that only release finished sequences on the workers, if there are any."""
        if not any(self._freed):
            return None
        return self._messages([])

    def usage(self) -> dict[str, float | int]:
        used_blocks = sum(b.num_used for b in self.blocks)
        total_blocks = sum(b.size for b in self.blocks)
        used_slots = sum(s.num_used for s in self.slots)
        total_slots = sum(s.size for s in self.slots)
        return {
            "running": len(self.running), "waiting": len(self.waiting),
            "kv_blocks_used": used_blocks, "kv_blocks_total": total_blocks,
            "kv_usage": used_blocks / total_blocks, "state_slots_used": used_slots,
            "state_slots_total": total_slots, "state_slot_usage": used_slots / total_slots,
        }
