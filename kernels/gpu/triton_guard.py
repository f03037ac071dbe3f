"""Triton where it is installed (it comes with torch's CUDA builds), and what happens when one of its
kernels does not build on a device (a Triton or card it was never compiled for): that op logs it once
and runs its torch version from then on, instead of failing every step."""

from __future__ import annotations

import logging

import torch

try:
    import triton
    from triton.compiler.errors import CompilationError
    from triton.runtime.errors import OutOfResources

    BUILD_ERRORS: tuple[type[Exception], ...] = (CompilationError, OutOfResources)
except ImportError:  # CPU-only installs: every op's torch version runs
    triton = None
    BUILD_ERRORS = ()

log = logging.getLogger(__name__)


class KernelUnavailable(RuntimeError):
    """The op's kernels did not build on this device; the caller runs its torch version."""


class TritonOp:
    """One op's Triton kernels: whether they may run on tensors like t, and their launches guarded."""

    def __init__(self, name: str, dtypes: tuple[torch.dtype, ...]) -> None:
        self.name, self.dtypes = name, dtypes
        self.unavailable: str | None = None  # why they did not build here (then never tried again)

    def usable(self, t: torch.Tensor) -> bool:
        return self.usable_for(t.device, t.dtype)

    def usable_for(self, device: torch.device, dtype: torch.dtype) -> bool:
        return triton is not None and self.unavailable is None and device.type == "cuda" and dtype in self.dtypes

    def launch(self, run, *args) -> None:
        """run(*args), the first build failure turned into KernelUnavailable (logged once)."""
        try:
            run(*args)
        except BUILD_ERRORS as e:
            self.unavailable = f"{type(e).__name__}: {e}"
            log.warning("Triton %s unavailable on this device, its torch version runs: %s", self.name, self.unavailable)
            raise KernelUnavailable(self.unavailable) from e
