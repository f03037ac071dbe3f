"""Builds and loads epserve's C++ CPU kernels (kernels/csrc) as `torch.ops.epserve.*`.

The first use on a machine compiles them with the system's C++ compiler for this CPU (-march=native;
about 30 s on 2 cores) into ~/.cache/epserve/kernels/<hash of sources, flags, torch and CPU>; every
later process loads the cached library in milliseconds. Without a compiler, or with
EPSERVE_KERNELS=reference, plain torch runs instead (kernels.backend).
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
CFLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-trapping-math"]  # the last lets floor() vectorise
# -fopenmp links libgomp.so.1, which resolves to the copy torch has already loaded: one thread pool.
LDFLAGS = ["-fopenmp"]
LIBRARY = "epserve_cpu_kernels"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def build_directory() -> Path:
    """Where this machine's build lives: one directory per (sources, flags, torch, CPU)."""
    digest = hashlib.sha256()
    for path in sorted(CSRC.iterdir()):
        digest.update(path.name.encode() + path.read_bytes())
    digest.update(" ".join(CFLAGS + LDFLAGS + [torch.__version__, platform.python_version(), _cpu_flags()]).encode())
    root = Path(os.environ.get("EPSERVE_KERNEL_CACHE", Path.home() / ".cache" / "epserve" / "kernels"))
    return root / digest.hexdigest()[:16]


def load() -> float:
    """Loads the kernels (building them first if this machine has no build yet); returns the
    seconds it took. Raises if they cannot be built."""
    start = time.perf_counter()
    directory = build_directory()
    library, done = directory / f"{LIBRARY}.so", directory / "complete"
    if not done.exists():
        from torch.utils import cpp_extension

        directory.mkdir(parents=True, exist_ok=True)
        log.info("building epserve's CPU kernels in %s (once per machine)", directory)
        cpp_extension.load(
            name=LIBRARY, sources=[str(p) for p in sorted(CSRC.glob("*.cpp"))], extra_cflags=CFLAGS,
            extra_ldflags=LDFLAGS, build_directory=str(directory), is_python_module=False, verbose=False,
        )
        done.touch()
    else:
        torch.ops.load_library(str(library))
    return time.perf_counter() - start
