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

    @triton.jit
    def round_to_e4m3(x):
        """fp32 x (|x| <= 448) rounded to float8 e4m3 and back, to nearest even, by its bits: what
        x.to(tl.float8e4nv) gives on a GPU, which Triton's interpreter gets wrong where a value rounds
        up into the next power of two (126.8 -> 64, not 128)."""
        bits = x.to(tl.uint32, bitcast=True)
        normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & 0xFFF00000).to(tl.float32, bitcast=True)
        magic = 12582912.0  # 1.5 * 2^23: y + magic - magic is y rounded to an integer, ties to even
        subnormal = ((x * 512.0 + magic) - magic) / 512.0  # below 2^-6 the step is 2^-9
        return tl.where(tl.abs(x) < 0.015625, subnormal, normal)
