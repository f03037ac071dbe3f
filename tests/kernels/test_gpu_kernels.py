"""The GPU's Triton kernels (kernels.gpu) against the plain-torch references, run on CPU tensors
through Triton's interpreter. Paged attention: ragged prefill chunks beside decodes, GQA groups, block
sizes under and over a key tile, ragged head dims, narrower K/V caches, decode batches split along the
keys. The DeltaNet decode step: strided inputs, value heads sharing key heads, states read at their
slots and written at others. The routed experts' and FP8 kernels: test_gpu_moe_kernels.py; every
kernel's sm_90 / sm_80 build: the last test here. On a GPU tests/cuda/test_kernels.py runs the
compiled kernels."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kernels.attention import paged_attention_reference
from kernels.delta_rule import delta_rule_decode_reference
from kernels.gpu import attention as gpu_attention
from kernels.gpu import delta_rule as gpu_delta_rule
from tests.kernels.test_ops import delta_inputs, paged_inputs

TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 3e-2}


def check(args, dtype):
    out = gpu_attention.paged_attention(*args)
    ref = paged_attention_reference(*args)
    scale = max(1.0, ref.abs().max().item())
    assert (out.float() - ref.float()).abs().max().item() <= TOLERANCE[dtype] * scale


@pytest.mark.parametrize("dtype", TOLERANCE)
@pytest.mark.parametrize("heads", [(4, 2), (8, 1), (2, 2)])
@pytest.mark.parametrize("cache_dtype", [None, torch.bfloat16, torch.float8_e5m2, torch.float8_e4m3fn])
@pytest.mark.parametrize("block_and_head", [(4, 16), (32, 41)])  # blocks under / over a key tile; a ragged head
def test_mixed_steps_match_the_reference(interpreter, dtype, heads, cache_dtype, block_and_head):
    if cache_dtype == dtype:
        pytest.skip("the same as the query's")
    block_size, hd = block_and_head
    check(paged_inputs(dtype, heads, cache_dtype, block_size, hd, [1, 1, 9, 3, 17], [0, 20, 3, 0, 14]), dtype)


@pytest.mark.parametrize("dtype", TOLERANCE)
@pytest.mark.parametrize("heads_and_dim", [(4, 2, 64), (16, 1, 64), (32, 2, 256)])  # the last: the flagship's
def test_decode_batches_split_along_the_keys(interpreter, dtype, heads_and_dim):
    """Decode-only steps cut each sequence's keys into ranges merged by a second kernel (on a CPU 64
    programs are wanted: a batch of 3 splits several ways); short sequences leave splits empty."""
    H, KV, hd = heads_and_dim
    args = paged_inputs(dtype, (H, KV), None, 16, hd, [1, 1, 1], [0, 150, 37], width=16)
    B, W = args[3].shape
    assert gpu_attention.launch_plan(B, W, 16, KV, H // KV, 1, hd, torch.device("cpu")).splits > 1
    check(args, dtype)


def test_empty_step(interpreter):
    """An attention worker with no sequences still runs the forward."""
    cache = torch.zeros(2, 2, 16, 16)
    out = gpu_attention.paged_attention(torch.zeros(0, 4, 16), cache, cache, torch.zeros(0, 1, dtype=torch.long),
                                      torch.zeros(1, dtype=torch.long), torch.zeros(0, dtype=torch.long), 0.25, [])
    assert out.shape == (0, 4, 16)


def test_kernels_that_do_not_build_on_a_device_leave_the_batched_version_running(interpreter, monkeypatch, caplog):
    """A Triton or card the kernels do not compile for: one warning, then kernels.paged_attention runs
    the batched torch version for the rest of the process (not an engine that fails every step)."""
    import kernels
    from kernels.attention import paged_attention_batched
    from triton.runtime.errors import OutOfResources

    launches = []

    def does_not_fit(*args, **kwargs):
        launches.append(1)
        raise OutOfResources(300_000, 232_448, "shared memory")

    monkeypatch.setattr(gpu_attention, "_launch", does_not_fit)
    monkeypatch.setattr(gpu_attention.OP, "unavailable", None)  # restored to it after the test
    # on CUDA tensors only; here a half-precision query (no C++ kernel takes it) stands in for one
    monkeypatch.setattr(gpu_attention, "usable", lambda query: gpu_attention.OP.unavailable is None)
    args = paged_inputs(torch.float16, (4, 2), None, 16, 32, [1, 5], [20, 0])
    with caplog.at_level("WARNING"):
        first = kernels.paged_attention(*args)
    assert "unavailable" in caplog.text and "OutOfResources" in gpu_attention.OP.unavailable
    assert torch.equal(first, paged_attention_batched(*args))
    assert torch.equal(kernels.paged_attention(*args), first) and len(launches) == 1


def test_a_delta_rule_kernel_that_does_not_build_leaves_the_torch_version_running(interpreter, monkeypatch):
    import kernels
    from triton.runtime.errors import OutOfResources

    class DoesNotFit:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                raise OutOfResources(300_000, 232_448, "shared memory")
            return launch

    monkeypatch.setattr(gpu_delta_rule, "_decode_step", DoesNotFit())
    monkeypatch.setattr(gpu_delta_rule.OP, "unavailable", None)  # restored to it after the test
    monkeypatch.setattr(gpu_delta_rule, "usable", lambda q: gpu_delta_rule.OP.unavailable is None)
    q, k, v, a, b, A_log, dt_bias, state = delta_inputs(5, 2, 4, 32, 16, 8, torch.float16, seed=32)
    slots = torch.tensor([3, 0, 7, 5, 1])
    ref_state = state.clone()
    out = kernels.delta_rule_decode(q, k, v, a, b, A_log, dt_bias, state, slots)
    assert "OutOfResources" in gpu_delta_rule.OP.unavailable
    assert torch.equal(out, delta_rule_decode_reference(q, k, v, a, b, A_log, dt_bias, ref_state, slots))
    assert torch.equal(state, ref_state)


@pytest.mark.parametrize("dtype", TOLERANCE)
@pytest.mark.parametrize("heads_and_dims", [(2, 4, 32, 16), (1, 1, 128, 128), (2, 8, 24, 40)])  # ragged dims last
def test_delta_rule_decode_steps_the_states_in_place(interpreter, dtype, heads_and_dims):
    """The decode step against the reference: outputs, the states written at out_slots (at the
    slots themselves too), every other state row untouched."""
    Hk, H, dk, dv = heads_and_dims
    q, k, v, a, b, A_log, dt_bias, state = delta_inputs(5, Hk, H, dk, dv, 12, dtype, seed=31)
    slots = torch.tensor([3, 0, 7, 5, 1])
    for out_slots in (torch.tensor([9, 2, 11, 4, 10]), slots):
        fast_state, ref_state = state.clone(), state.clone()
        fast = gpu_delta_rule.decode(q, k, v, a, b, A_log, dt_bias, fast_state, slots, out_slots)
        ref = delta_rule_decode_reference(q, k, v, a, b, A_log, dt_bias, ref_state, slots, out_slots)
        assert fast.dtype == ref.dtype
        assert (fast.float() - ref.float()).abs().max().item() <= TOLERANCE[dtype] * max(1.0, ref.abs().max().item())
        assert (fast_state - ref_state).abs().max().item() <= 2e-5  # fp32 states, both ways
        untouched = [m for m in range(12) if m not in out_slots.tolist()]
        assert torch.equal(fast_state[untouched], state[untouched])


def test_the_kernels_build_for_hopper_and_ampere(tmp_path):
    """Triton's compiler and its ptxas build each kernel in the configurations the engine launches
    (tests/kernels/triton_build.py: the flagship's heads and a toy's; bf16, fp8 and fp32 caches; decode
    and prefill; the routed experts' passes and kernels over bf16, fp16 and FP8 banks, the grouped ones
    over FP8 also with FP8 activations, which sm_90 multiplies with FP8 wgmma) into sm_90 and
    sm_80 cubins, no GPU needed, each within its card's shared memory and without spilling registers
    (the tile sizes of kernels.gpu.attention.launch_plan and kernels.gpu.moe were chosen so)."""
    pytest.importorskip("triton")
    from tests.kernels.triton_build import SHARED_MEMORY

    built = []
    builds = {arch: subprocess.Popen(  # one process an architecture, side by side: compiling is single-threaded
        [sys.executable, "-m", "tests.kernels.triton_build", str(arch)], cwd=Path(__file__).parents[2],
        env={**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(tmp_path / str(arch))},  # afresh
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for arch in (90, 80)}
    for arch, build in builds.items():
        stdout, stderr = build.communicate(timeout=600)
        assert build.returncode == 0, (arch, stderr[-4000:])
        built += [json.loads(line) for line in stdout.splitlines()]
    kernels = ("_attend", "_merge", "_decode_step", "_swiglu", "_weighted_sum", "_experts_up", "_experts_down",
               "_grouped_up", "_grouped_down")
    assert {(b["kernel"], b["arch"]) for b in built} == {(k, a) for k in kernels for a in (90, 80)} | {
        ("_dequantize", 90)}  # FP8 banks: sm_89+
    assert len(built) == 63  # sm_90 also builds the few-rows and grouped kernels over FP8 banks (grouped: W8A8 too)
    for b in built:
        assert b["shared"] <= SHARED_MEMORY[b["arch"]] and b["spill_bytes"] == 0, b
    # W8A8: prefill tiles (64 pairs) multiply FP8 x FP8 with Hopper's wgmma; 16-pair tiles (memory-bound
    # anyway) get e4m3 widened to fp16 (exact) for mma.sync
    w8a8 = [(b["kernel"], b["config"]["BLOCK_M"], b["mma"]) for b in built if b["config"].get("A8")]
    fp8_wgmma = ["wgmma.mma_async.sync.aligned.m64n64k32.f32.e4m3.e4m3"]
    assert len(w8a8) == 4 and all((mma == fp8_wgmma) == (block_m == 64) and mma for _, block_m, mma in w8a8), w8a8
