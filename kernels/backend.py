"""Which implementation of each op runs: the C++ CPU kernels for CPU tensors when they load; the
batched torch versions (and kernels.gpu's Triton kernels on CUDA) on other devices or without a compiler
(EPSERVE_KERNELS=reference turns the C++ kernels off); the plain-torch references inside
`reference_kernels()` (tests). Inside `compiled_glue()` (the forwards CUDA decode graphs capture)
the plain-torch glue between a step's GEMMs and kernels (functions marked @glue) runs through
torch.compile: inductor fuses each function's elementwise ops into a few Triton kernels."""

from __future__ import annotations

import functools
import logging
import os
from contextlib import contextmanager

import torch

from . import build

log = logging.getLogger(__name__)

_cpu_kernels: bool | None = None  # None: not tried yet; loading happens once per process
_forced_reference = False


def cpu_kernels_loaded() -> bool:
    """Loads the C++ CPU kernels on first call (building them once per machine)."""
    global _cpu_kernels
    if _cpu_kernels is None:
        if os.environ.get("EPSERVE_KERNELS", "").lower() == "reference":
            _cpu_kernels = False
        else:
            try:
                seconds = build.load()
                log.info("epserve CPU kernels ready in %.1fs", seconds)
                _cpu_kernels = True
            except Exception as e:  # no compiler, unsupported platform: the references still work
                log.warning("epserve CPU kernels unavailable, using the torch references: %s", e)
                _cpu_kernels = False
    return _cpu_kernels


_NATIVE_DTYPES = (torch.float32, torch.bfloat16)


def native(t: torch.Tensor) -> bool:
    """True when the fast CPU kernel should run on tensors like t (CPU, fp32 or bf16)."""
    return (t.is_cpu and t.dtype in _NATIVE_DTYPES and not _forced_reference
            and (_cpu_kernels or (_cpu_kernels is None and cpu_kernels_loaded())))


_separate_sublayers = False
_separate_layers = False


def one_call(t: torch.Tensor) -> bool:
    """True when a sublayer (mixer, MoE block) on tensors like t runs as one composite C++ op
    (kernels.layers) rather than op by op: the C++ kernels run and `separate_sublayers()` is off."""
    return native(t) and not _separate_sublayers


def one_call_forward(t: torch.Tensor) -> bool:
    """True when a forward's layers on tensors like t run as one C++ op (kernels.decoder_layers):
    `one_call(t)` holds and `separate_layers()` is off."""
    return one_call(t) and not _separate_layers


@contextmanager
def separate_layers():
    """Runs a forward layer by layer inside the block, each sublayer still one call (tests compare)."""
    global _separate_layers
    previous, _separate_layers = _separate_layers, True
    try:
        yield
    finally:
        _separate_layers = previous


@contextmanager
def separate_sublayers():
    """Runs sublayers op by op inside the block, each op still the C++ kernel (tests compare the two)."""
    global _separate_sublayers
    previous, _separate_sublayers = _separate_sublayers, True
    try:
        yield
    finally:
        _separate_sublayers = previous


def batched(t: torch.Tensor) -> bool:
    """True unless references are forced: batched plain-torch versions run on any device."""
    return not _forced_reference


@contextmanager
def reference_kernels():
    """Runs every op's plain-torch reference inside the block (tests compare the two)."""
    global _forced_reference
    previous, _forced_reference = _forced_reference, True
    try:
        yield
    finally:
        _forced_reference = previous


_glue_backend: str | None = None  # inside compiled_glue(): the torch.compile backend glue runs through


@contextmanager
def compiled_glue(backend: str = "inductor"):
    """Functions marked @glue run compiled inside the block (tests pass backend="eager": dynamo's
    tracing without code generation)."""
    global _glue_backend
    previous, _glue_backend = _glue_backend, backend
    try:
        yield
    finally:
        _glue_backend = previous


def glue(fn):
    """Marks a plain-torch function of the GPU path that compiles well (elementwise ops, reductions,
    gathers: no host syncs, no calls into other kernels' libraries). Outside compiled_glue() it is
    the function itself; inside, one torch.compile of it per backend (shapes static at first, then
    dynamic on the first change; functions that read the host's query lengths recompile per batch
    bucket, up to dynamo's recompile limit, past which they run as they are), with
    emulate_precision_casts so that 16-bit intermediates round where eager rounds them."""
    compiled: dict[str, object] = {}

    @functools.wraps(fn)
    def run(*args, **kwargs):
        if _glue_backend is None or torch.compiler.is_compiling():  # nested glue: traced inline
            return fn(*args, **kwargs)
        if _glue_backend not in compiled:
            options = {"emulate_precision_casts": True} if _glue_backend == "inductor" else None
            compiled[_glue_backend] = torch.compile(fn, backend=_glue_backend, options=options)
        return compiled[_glue_backend](*args, **kwargs)

    return run
