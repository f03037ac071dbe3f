"""Step profiling: PhaseTimer (wall time accumulated per named phase of a step: attention, dispatch,
experts, combine), split_step, and count_host_syncs.

Cheap enough to stay on: one perf_counter pair per phase per layer. On CUDA the numbers are host
times (no synchronisation), which is what the CPU benchmarks here read.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from contextlib import contextmanager

import torch


class PhaseTimer:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.steps = 0

    def phase(self, name: str) -> _Phase:
        """with timer.phase(name): adds the block's wall time to seconds[name]."""
        return _Phase(self.seconds, name)

    def add(self, name: str, seconds: float) -> None:
        """Adds time measured elsewhere (a C++ call that runs several phases) to seconds[name]."""
        self.seconds[name] += seconds

    def reset(self) -> None:
        self.seconds.clear()
        self.steps = 0

    def snapshot(self, reset: bool = False) -> dict[str, float]:
        snap = {"steps": self.steps, **self.seconds}
        if reset:
            self.reset()
        return snap


class _Phase:
    """PhaseTimer.phase's context manager: a plain class, as it runs several times per layer per step
    (a generator-based contextmanager costs a few microseconds more each time)."""

    __slots__ = ("seconds", "name", "start")

    def __init__(self, seconds: dict[str, float], name: str) -> None:
        self.seconds, self.name = seconds, name

    def __enter__(self) -> None:
        self.start = time.perf_counter()

    def __exit__(self, *exc) -> None:
        self.seconds[self.name] += time.perf_counter() - self.start


def split_step(timings: list[dict]) -> dict[str, float] | None:
    """Seconds per step of each phase, from an executor's timings() (one dict per worker):
    step and attention (the busiest attention worker's whole step, and its part outside the MoE
    exchange), dispatch and combine (its time in the exchange, waiting for the experts included),
    experts (the slowest expert worker; in one process, the local expert compute, with the router
    and the shared expert where a MoE block runs as one C++ call, kernels.moe_block).
    None when no worker has timed a step."""
    per_step = [{k: v / t["steps"] for k, v in t.items() if k not in ("role", "steps")} | {"role": t["role"]}
                for t in timings if t.get("steps")]
    attention = [t for t in per_step if t["role"] in ("attention", "local")]
    if not attention:
        return None
    a = max(attention, key=lambda t: t.get("step", 0.0))
    dispatch, combine, local = a.get("dispatch", 0.0), a.get("combine", 0.0), a.get("experts", 0.0)
    experts = max((t.get("experts", 0.0) for t in per_step if t["role"] == "expert"), default=local)
    return {"step": a["step"], "attention": a["step"] - dispatch - combine - local, "dispatch": dispatch,
            "combine": combine, "experts": experts}


_SYNCING = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy")


@contextmanager
def count_host_syncs():
    """Counts, by method, the tensor calls made inside the block that copy a device tensor's values
    to the host (item, tolist, bool/int/float, cpu, numpy): on CPU they cost nothing, on a GPU each
    one waits for the device. Yields a Counter, filled as the block runs."""
    counts: Counter[str] = Counter()
    originals = {name: getattr(torch.Tensor, name) for name in _SYNCING}

    def counting(name, method):
        def call(self, *args, **kwargs):
            counts[name] += 1
            return method(self, *args, **kwargs)
        return call

    for name, method in originals.items():
        setattr(torch.Tensor, name, counting(name, method))
    try:
        yield counts
    finally:
        for name, method in originals.items():
            setattr(torch.Tensor, name, method)
