"""Recovery of a RayExecutor's instance from lost workers (a mixin of RayExecutor, which holds the
actors, links and placement it works on).

`recover` ends every step loop (a hung worker is killed), restarts a lost attention worker in its
placement-group bundle (its sequences must be prefilled again), moves a lost expert worker's
experts to the survivors while a replacement starts in its bundle, and links the instance again;
`fold_in` takes the replacements back between later steps, never waiting for them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


class WorkerFailure(RuntimeError):
    """A worker died, stopped answering, or failed its step: the instance must recover."""


@dataclass
class Recovery:
    """What recover() did. lost: the workers that died or hung ("expert 1", "attention 0");
    caches_kept: every attention worker holds its caches as before the steps in flight (the engine
    replays them), else the running sequences must be prefilled again; replacing: expert workers
    starting in the background, folded in by fold_in()."""

    lost: list[str] = field(default_factory=list)
    caches_kept: bool = True
    replacing: list[str] = field(default_factory=list)


class WorkerRecovery:
    def recover(self, grace_s: float = 5.0) -> Recovery:
        """Ends every step loop, then re-forms the instance without the workers that died or hang:
        attention workers restarted (their sequences' caches are lost), expert workers' experts
        moved to the survivors while replacements start. Links the instance again."""
        ray, A = self._ray, len(self.attention)
        self._close_links()  # every loop's next read ends: the survivors return
        lost = self._stopped_workers(grace_s)
        self._loops = None
        recovery = Recovery()
        for i in [i for i in lost if i < A]:
            self.attention[i] = self._start(i, self._bundles[i], self.placement)
            ray.get(self.attention[i].pid.remote(), timeout=self.start_timeout)
            recovery.lost.append(f"attention {i}")
            recovery.caches_kept = False
        lost_experts = [i - A for i in lost if i >= A]
        recovery.lost += [f"expert {self.slots[e]}" for e in lost_experts]
        if lost_experts and len(lost_experts) == len(self.experts):  # no survivor: wait for replacements
            for e in lost_experts:
                self.experts[e] = self._start(A + self.slots[e], self._bundles[A + self.slots[e]], self.placement)
            ray.get([w.pid.remote() for w in self.experts], timeout=self.start_timeout)
        elif lost_experts:
            self._run_without(lost_experts)
            recovery.replacing = [f"expert {slot}" for slot in sorted(self.starting)]
        self.workers = self.attention + self.experts
        if self._in_flight and not self.cluster.replay_failed_steps:  # no undo point kept
            recovery.caches_kept = False
        if self._in_flight and recovery.caches_kept:  # did anyone finish a step the engine has not read?
            done = ray.get([w.last_completed_step.remote() for w in self.attention], timeout=self.timeout)
            recovery.caches_kept = not any(number in done for number in self._in_flight)
        self._in_flight = []
        self.preparing = None  # a placement change under way is dropped
        if self._placement_in_doubt and not lost_experts:  # survivors may hold a half-switched placement
            self._reassert_placement()
        self._placement_in_doubt = False
        self._connect()
        return recovery

    def _stopped_workers(self, grace_s: float) -> list[int]:
        """Waits for the step loops to end; kills the workers that hang (expert workers first: an
        attention worker may only be waiting on one). Returns the indices of the lost workers."""
        ray, A = self._ray, len(self.attention)
        if self._loops is None:  # between steps: the dead ones do not answer
            pings = [w.pid.remote() for w in self.workers]
            ready, _ = ray.wait(pings, num_returns=len(pings), timeout=grace_s)
            lost = [i for i, ref in enumerate(pings) if ref not in ready]
            for i in lost:
                ray.kill(self.workers[i], no_restart=True)
            for i, ref in enumerate(pings):
                if i not in lost:
                    try:
                        ray.get(ref)
                    except ray.exceptions.RayActorError:
                        lost.append(i)
            return sorted(lost)
        lost = []
        _, stuck = ray.wait(self._loops, num_returns=len(self._loops), timeout=grace_s)
        for roles in (range(A, len(self.workers)), range(A)):
            hung = [i for i in roles if self._loops[i] in stuck]
            for i in hung:
                if i < A:  # another chance, now that hung expert workers are gone
                    if ray.wait([self._loops[i]], timeout=grace_s)[0]:
                        continue
                ray.kill(self.workers[i], no_restart=True)
                lost.append(i)
        for i, ref in enumerate(self._loops):
            if i in lost:
                continue
            try:
                ray.get(ref, timeout=self.timeout)
            except ray.exceptions.RayActorError:
                lost.append(i)
            except Exception:  # noqa: BLE001 - the loop ended on a broken link: the worker lives
                pass
        return sorted(lost)

    def _run_without(self, lost: list[int]) -> None:
        """Re-forms on the surviving expert workers (indices into self.experts): they take the lost
        workers' experts (from replicas they hold, else from the checkpoint); replacements for the
        lost ones start in their bundles meanwhile."""
        ray, A = self._ray, len(self.attention)
        if self.full_placement is None:
            self.full_placement = self.placement
        for e in lost:
            slot = self.slots[e]
            actor = self._start(A + slot, self._bundles[A + slot], self.full_placement)
            self.starting[slot] = (actor, actor.pid.remote())
        kept = [e for e in range(len(self.experts)) if e not in lost]
        self.placement = self.placement.without_workers(lost)
        self.experts, self.slots = [self.experts[e] for e in kept], [self.slots[e] for e in kept]
        ray.get([w.resize.remote(A + k, self.placement) for k, w in enumerate(self.experts)], timeout=self.timeout)

    def fold_in(self) -> list[str]:
        """Between steps: once every replacement has started, the instance takes them back and the
        full placement (the survivors only drop the experts they took over). Returns the workers
        folded in; [] while some are still starting (the call does not wait)."""
        if not self.starting:
            return []
        ray, A = self._ray, len(self.attention)
        refs = [ref for _, ref in self.starting.values()]
        if len(ray.wait(refs, num_returns=len(refs), timeout=0)[0]) < len(refs):
            return []
        for slot, (actor, ref) in list(self.starting.items()):
            try:
                ray.get(ref)
            except ray.exceptions.RayError as e:  # it died starting: try again
                log.warning("replacement for expert worker %d failed to start (%s); starting another", slot, e)
                actor = self._start(A + slot, self._bundles[A + slot], self.full_placement)
                self.starting[slot] = (actor, actor.pid.remote())
                return []
        by_slot = dict(zip(self.slots, self.experts)) | {slot: actor for slot, (actor, _) in self.starting.items()}
        self._pause()
        self._close_links()
        full = self.full_placement
        survivors = [by_slot[slot].resize.remote(A + slot, full) for slot in self.slots]
        try:
            ray.get(survivors, timeout=self.timeout)
        except ray.exceptions.RayError as e:
            raise WorkerFailure(f"folding replacements in: {e}") from e
        folded = [f"expert {slot}" for slot in sorted(self.starting)]
        self.experts = [by_slot[slot] for slot in sorted(by_slot)]
        self.slots, self.placement = sorted(by_slot), full
        self.full_placement, self.starting = None, {}
        self.workers = self.attention + self.experts
        self._connect()
        return folded

