"""The kernel tests' shared fixture."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="module")
def interpreter():
    """Triton's kernels built for its interpreter (tests/conftest.py asks for it on machines without a
    GPU, before triton is imported)."""
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("a GPU is here: tests/cuda/test_kernels.py runs the compiled kernels")
