"""PhaseTimer: wall time accumulated per named phase of a step (attention, dispatch, experts, combine).

Cheap enough to stay on: one perf_counter pair per phase per layer. On CUDA the numbers are host
times (no synchronisation), which is what the CPU benchmarks here read.
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager


class PhaseTimer:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.steps = 0

    @contextmanager
    def phase(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - start

    def reset(self) -> None:
        self.seconds.clear()
        self.steps = 0

    def snapshot(self) -> dict[str, float]:
        return {"steps": self.steps, **self.seconds}
