"""Rounding inside Triton kernels the way torch's eager ops round, on a GPU and in Triton's
interpreter alike (the interpreter truncates fp32 -> bf16 where GPUs round to nearest even)."""

from __future__ import annotations

from .triton_guard import triton

if triton is not None:
    import triton.language as tl

    @triton.jit
    def round_to(x, dtype: tl.constexpr):
        """fp32 x rounded to dtype and back, to nearest even (bf16 by its bits)."""
        if dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            return bits.to(tl.float32, bitcast=True)
        return x.to(dtype).to(tl.float32)
