"""Builds the GPU's Triton kernels (kernels.gpu) ahead of time for a CUDA architecture, with no GPU
here: Triton's compiler and the ptxas it ships turn each kernel in the configurations the engine
launches into a cubin, so a kernel that would not compile (or not fit a card's shared memory) fails a
test on CPU rather than an engine on its first GPU. Run in a process of its own without
TRITON_INTERPRET (tests/kernels/test_gpu_kernels.py):

    python -m tests.kernels.triton_build 90 80    # prints one JSON line per kernel built
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource

from kernels.gpu import attention, delta_rule, moe

SHARED_MEMORY = {90: 232_448, 80: 166_912}  # bytes a block may use (H100 / H200, A100)


# kernels whose every pointer, size and stride is a multiple of 16 at the flagship's widths, as their
# launches there find (Triton's launcher specialises such arguments: aligned, vectorised loads)
ALIGNED = ("_grouped_up", "_grouped_down")


def build(fn, types: dict, constexprs: dict, arch: int, num_warps: int = 4) -> dict:
    """The kernel compiled for sm_<arch>: its shared memory, ptxas's count of registers and of bytes
    spilled to local memory per thread, and the tensor-core instructions in its PTX."""
    signature = {name: "constexpr" if name in constexprs else types.get(name, "i32") for name in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
             if fn.__name__ in ALIGNED and signature[name] != "constexpr"}
    kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32),
                            options={"num_warps": num_warps})
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as ptx:
        ptx.write(kernel.asm["ptx"])
        ptx.flush()
        report = subprocess.run([get_ptxas(arch).path, f"-arch=sm_{arch}{'a' if arch >= 90 else ''}", "-v", ptx.name,
                                 "-o", "/dev/null"], capture_output=True, text=True, check=True).stderr
    return {"kernel": fn.__name__, "arch": arch, "config": {**constexprs, **types}, "warps": num_warps,
            "shared": kernel.metadata.shared, "registers": int(re.search(r"Used (\d+) registers", report)[1]),
            "spill_bytes": int(re.search(r"(\d+) bytes spill stores", report)[1]),
            "mma": sorted(set(re.findall(r"(?:wgmma\.mma_async|mma\.sync)[\w.]*", kernel.asm["ptx"])))}


def configurations(arch: int):
    """(kernel, argument types, constexprs, warps) as kernels.gpu launches them for the flagship's heads
    (32 query / 2 kv heads of 256, 16 key / 64 value heads of 128) and a toy's (head dim 32), and its
    routed experts."""
    caches = ["bf16", "fp8e4nv", "fp8e5"] if arch >= 89 else ["bf16"]  # e4m3 needs sm_89+
    for query, cache in [("bf16", c) for c in caches] + [("fp32", "fp32")]:  # fp16: bf16's code
        for decode in (True, False):
            for hd, G in ((256, 16), (32, 2)) if arch >= 90 else ((256, 16),):
                rows = 1 if decode else 64
                plan = attention.launch_plan(1 if decode else 4, 64, 16, 2, G, rows, hd, torch.device("cpu"))
                pointers = {"Q": f"*{query}", "K": f"*{cache}", "V": f"*{cache}", "Out": f"*{query}",
                            "Part_M": "*fp32", "Part_L": "*fp32", "Part_O": "*fp32", "block_tables": "*i64",
                            "query_start": "*i64", "context_lens": "*i64", "scale_log2": "fp32"}
                yield attention._attend, pointers, dict(
                    G=G, HD=hd, HD_P2=max(16, hd), S=16, BLOCK_M=plan.block_m, BLOCK_N=plan.block_n,
                    SPLIT=plan.splits > 1, EXACT=query == "fp32"), plan.num_warps
    for hd in (256, 32):
        yield attention._merge, {"Out": "*bf16", "Part_M": "*fp32", "Part_L": "*fp32", "Part_O": "*fp32"}, dict(
            HD=hd, HD_P2=max(16, hd)), 4
    for dtype in ("bf16", "fp32"):
        for repeat, dk in ((4, 128), (4, 32)):
            pointers = {name: f"*{dtype}" for name in ("Q", "K", "V", "A", "Bt", "A_log", "dt_bias", "Out")}
            pointers |= {"State": "*fp32", "slots": "*i64", "out_slots": "*i64", "scale": "fp32"}
            yield delta_rule._decode_step, pointers, dict(REPEAT=repeat, DK=dk, DK_P2=dk, DV=dk, BLOCK_V=32), 4
    for dtype in ("bf16", "fp32"):  # the routed experts' passes at the flagship's widths (I 1024, D 4096)
        yield moe._swiglu, {"Hidden": f"*{dtype}", "Out": f"*{dtype}"}, dict(BLOCK=moe._block(1024)), 4
        for partial in (False, True):
            pointers = {"Sorted": f"*{dtype}", "Position": "*i64", "Idx": "*i64", "Weights": f"*{dtype}",
                        "Out": "*fp64" if partial else f"*{dtype}"}
            yield moe._weighted_sum, pointers, dict(K=10, BLOCK=moe._block(4096), PARTIAL=partial), 4
    # the few-rows kernels, bf16 banks and FP8 ones with Qwen's 128x128 block scales (sm_89+: e4m3)
    for bank in ("bf16", "fp8e4nv") if arch >= 89 else ("bf16",):
        scaled = bank != "bf16"
        tiles = dict(BLOCK_N=moe.BLOCK_N, BLOCK_K=moe.BLOCK_K, SCALED=scaled, B0=128 if scaled else 1,
                     B1=128 if scaled else 1)
        scale = "*fp32" if scaled else f"*{bank}"
        yield moe._experts_up, {"X": "*bf16", "Idx": "*i64", "GateUp": f"*{bank}", "Scale": scale,
                                "Act": "*bf16"}, dict(K=10, **tiles), 4
        yield moe._experts_down, {"Act": "*bf16", "Idx": "*i64", "Down": f"*{bank}", "Scale": scale,
                                  "Out": "*bf16"}, tiles, 4
    # the grouped kernels over FP8 banks (decode-batch and prefill tiles; W8A16 and W8A8) and over fp16 banks
    fp8 = [("fp8e4nv", 16, a8) for a8 in (False, True)] + [("fp8e4nv", 64, a8) for a8 in (False, True)]
    for bank, block_m, a8 in (fp8 if arch >= 89 else []) + [("fp16", 64, False)]:
        scaled, x = bank != "fp16", "bf16" if bank != "fp16" else "fp16"
        tiles = dict(BLOCK_M=block_m, BLOCK_N=moe.GROUPED_BLOCK_N, BLOCK_K=moe.grouped_block_k(128), SCALED=scaled,
                     B0=128, B1=128, WIDEN=False, A8=a8)
        scale = "*fp32" if scaled else f"*{bank}"
        tables = {"TileExpert": "*i32", "TileStart": "*i32", "Ends": "*i32"}
        yield moe._grouped_up, {"X": f"*{x}", "Order": "*i64", **tables, "GateUp": f"*{bank}", "Scale": scale,
                                "Act": f"*{x}"}, dict(K=10, **tiles), 4
        yield moe._grouped_down, {"Act": f"*{x}", **tables, "Down": f"*{bank}", "Scale": scale,
                                  "Out": f"*{x}"}, tiles, 4
    if arch >= 89:
        yield moe._dequantize, {"W": "*fp8e4nv", "Scale": "*fp32", "Wanted": "*i32", "Out": "*bf16"}, dict(
            B0=128, B1=128, BLOCK_R=moe.DEQUANTIZE_TILE[0], BLOCK_C=moe.DEQUANTIZE_TILE[1]), 4


if __name__ == "__main__":
    for arch in map(int, sys.argv[1:]):
        for fn, types, constexprs, warps in configurations(arch):
            print(json.dumps(build(fn, types, constexprs, arch, warps)), flush=True)
