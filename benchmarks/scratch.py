"""Scratch directories for the benchmarks' checkpoints and outputs, removed when the script exits
(a 512-expert toy checkpoint is up to ~3 GB: left behind, a few dozen runs filled this disk)."""

from __future__ import annotations

import atexit
import shutil
import tempfile


def scratch_dir(prefix: str = "epserve-bench-") -> str:
    path = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, path, True)
    return path
