"""The CUDA paths of the ops (flash-linear-attention's kernels when installed, the Triton kernels,
the batched torch versions, torch._grouped_mm) against the plain-torch references on the GPU, at the
flagship's widths where it matters. Skipped without a GPU; the engine on CUDA: test_engine.py."""

from __future__ import annotations

import pytest
import torch

import kernels
from kernels import reference_kernels
from kernels.gpu import fla
from tests.kernels.test_ops import LENS, close, delta_inputs, paged_inputs, ragged

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2}  # fp32 takes the batched torch versions


def error(a, b) -> float:
    """max |a - b| over max(1, max |b|): what `close` compares with its tolerance."""
    return (a.float() - b.float()).abs().max().item() / max(1.0, b.float().abs().max().item())


def on_cuda(*tensors):
    return [t.cuda() if isinstance(t, torch.Tensor) else t for t in tensors]


def cuda_and_reference(fn, *args):
    """fn on CUDA tensors (the fast path) and the reference on copies; states cloned."""
    fast_args = on_cuda(*(a.clone() if isinstance(a, torch.Tensor) else a for a in args))
    ref_args = on_cuda(*(a.clone() if isinstance(a, torch.Tensor) else a for a in args))
    fast = fn(*fast_args)
    with reference_kernels():
        ref = fn(*ref_args)
    torch.cuda.synchronize()
    return fast, ref, fast_args, ref_args


def test_flash_linear_attention_is_what_runs_when_installed():
    installed = True
    try:
        import fla as _  # noqa: F401
    except ImportError:
        installed = False
    assert fla.usable(torch.empty(1, device="cuda", dtype=torch.bfloat16)) == installed
    assert not fla.usable(torch.empty(1, device="cuda"))  # fp32: the batched torch versions


@pytest.mark.parametrize("dtype", TOLERANCE)
def test_delta_rule_on_a_mixed_step(dtype):
    lens = [1, 1, 1, 5, 64, 65, 130, 17]
    q, k, v, a, b, A_log, dt_bias, state = delta_inputs(sum(lens), 2, 4, 128, 128, 20, dtype, seed=21)
    # written in place, and elsewhere (rows no sequence reads, as a double-buffered cache does)
    slots, out_slots = torch.tensor([3, 0, 7, 5, 1, 6, 9, 2]), torch.tensor([14, 8, 10, 11, 12, 19, 13, 16])
    for write in (slots, out_slots):
        fast, ref, fast_args, ref_args = cuda_and_reference(
            kernels.delta_rule, q, k, v, a, b, A_log, dt_bias, state, slots, ragged(lens), lens, 3, write)
        assert not fast.isnan().any()
        assert close(fast, ref, TOLERANCE[dtype]), error(fast, ref)
        assert close(fast_args[7], ref_args[7], TOLERANCE[dtype]), error(fast_args[7], ref_args[7])


@pytest.mark.parametrize("dtype", TOLERANCE)
def test_attention_and_conv(dtype):
    g = torch.Generator().manual_seed(22)
    H, KV, S, hd, N = 8, 2, 16, 64, 64
    past = [0, 40, 3, 0, 14, 200, 0]
    context = [n + p for n, p in zip(LENS, past)]
    key_cache, value_cache = (torch.randn(N, KV, S, hd, generator=g).to(dtype) for _ in range(2))
    blocks, tables, used = torch.randperm(N, generator=g).tolist(), [], 0
    for L in context:
        n = -(-L // S)
        tables.append(blocks[used : used + n] + [0] * (24 - n))
        used += n
    query = torch.randn(sum(LENS), H, hd, generator=g).to(dtype)
    fast, ref, *_ = cuda_and_reference(kernels.paged_attention, query, key_cache, value_cache, torch.tensor(tables),
                                       ragged(LENS), torch.tensor(context), hd**-0.5, LENS)
    assert close(fast, ref, TOLERANCE[dtype]), error(fast, ref)
    C, K, M = 96, 4, 10
    x, weight = torch.randn(sum(LENS), C, generator=g).to(dtype), torch.randn(C, K, generator=g).to(dtype)
    conv_state = torch.randn(M, K - 1, C, generator=g).to(dtype)
    slots = torch.tensor([7, 2, 0, 9, 4, 1, 5])
    fast, ref, fast_args, ref_args = cuda_and_reference(kernels.causal_conv1d, x, weight, conv_state, slots,
                                                        ragged(LENS), LENS)
    assert close(fast, ref, TOLERANCE[dtype]) and torch.equal(fast_args[2], ref_args[2]), error(fast, ref)


@pytest.mark.parametrize("dtype", TOLERANCE)
@pytest.mark.parametrize("cache_dtype", [None, torch.float8_e4m3fn])
@pytest.mark.parametrize("lens_and_past", [([1] * 5, [0, 40, 3, 700, 3000]), (LENS, [0, 40, 3, 0, 14, 200, 0])])
def test_triton_paged_attention_with_the_flagships_heads(dtype, cache_dtype, lens_and_past):
    """kernels.gpu.attention (what CUDA runs) with 32 query heads over 2 kv heads of 256: decode
    batches split along the keys, and mixed steps, against the reference."""
    from kernels.gpu import attention as gpu_attention
    from kernels.attention import paged_attention_reference

    lens, past = lens_and_past
    args = on_cuda(*paged_inputs(dtype, (32, 2), cache_dtype, 16, 256, lens, past, width=200))
    assert gpu_attention.usable(args[0])
    fast = kernels.paged_attention(*args)
    ref = paged_attention_reference(*args)
    assert close(fast, ref, TOLERANCE[dtype]), error(fast, ref)


@pytest.mark.parametrize("dtype", TOLERANCE)
def test_triton_delta_rule_decode_with_the_flagships_heads(dtype):
    """kernels.gpu.delta_rule (what CUDA decodes run) with 16 key heads, 64 value heads of 128 at
    batch 64, states read at their slots and written at others, against the reference."""
    from kernels.delta_rule import delta_rule_decode_reference
    from kernels.gpu import delta_rule as gpu_delta_rule

    q, k, v, a, b, A_log, dt_bias, state = on_cuda(*delta_inputs(64, 16, 64, 128, 128, 130, dtype, seed=41))
    order = torch.randperm(130, device="cuda")
    slots, out_slots = order[:64], order[64:128]
    assert gpu_delta_rule.usable(q)
    fast_state, ref_state = state.clone(), state.clone()
    fast = gpu_delta_rule.decode(q, k, v, a, b, A_log, dt_bias, fast_state, slots, out_slots)
    ref = delta_rule_decode_reference(q, k, v, a, b, A_log, dt_bias, ref_state, slots, out_slots)
    assert close(fast, ref, TOLERANCE[dtype]), error(fast, ref)
    assert close(fast_state, ref_state, 1e-4), error(fast_state, ref_state)


def test_grouped_expert_gemm():
    g = torch.Generator().manual_seed(23)
    R, K, N, D, I = 300, 8, 64, 256, 128
    x = torch.randn(R, D, generator=g).bfloat16()
    idx = torch.stack([torch.randperm(N, generator=g)[:K] for _ in range(R)])
    weights = torch.rand(R, K, generator=g).bfloat16()
    gate_up = (torch.randn(N, 2 * I, D, generator=g) / D**0.5).bfloat16()
    down = (torch.randn(N, D, I, generator=g) / I**0.5).bfloat16()
    fast, ref, *_ = cuda_and_reference(kernels.moe_experts, x, idx, weights, gate_up, down)
    assert close(fast, ref, TOLERANCE[torch.bfloat16]), error(fast, ref)


@pytest.mark.parametrize("partial", [False, True])
def test_large_steps_take_the_padded_batched_matmuls(partial, monkeypatch):
    """4k rows top-10 (PADDED_MIN_PAIRS), some pairs outside the bank: moe_experts takes
    moe_experts_padded, against the reference and the grouped GEMMs it stands in for."""
    from kernels import moe

    g = torch.Generator().manual_seed(29)
    R, K, N, D, I = 4096, 10, 64, 1024, 256
    x = torch.randn(R, D, generator=g).bfloat16()
    idx = torch.stack([torch.randperm(N + 8, generator=g)[:K] for _ in range(R)])
    idx[idx >= N] = -1  # ~1 in 9 pairs another worker's
    weights = torch.softmax(torch.randn(R, K, generator=g), -1).bfloat16()
    gate_up = (torch.randn(N, 2 * I, D, generator=g) / D**0.5).bfloat16()
    down = (torch.randn(N, D, I, generator=g) / I**0.5).bfloat16()
    calls = []
    padded = moe.moe_experts_padded
    monkeypatch.setattr(moe, "moe_experts_padded", lambda *a, **kw: calls.append(1) or padded(*a, **kw))
    assert moe.padded_usable(*on_cuda(x, idx))
    fast, ref, args, _ = cuda_and_reference(kernels.moe_experts, x, idx, weights, gate_up, down, partial)
    assert calls and close(fast, ref, TOLERANCE[torch.bfloat16]), error(fast, ref)
    grouped = moe.moe_experts_grouped(*args)
    assert close(fast, grouped, TOLERANCE[torch.bfloat16]), error(fast, grouped)


def test_fp16_banks_past_the_few_rows_take_the_grouped_kernels():
    """fp16 (which torch's grouped GEMMs do not take on CUDA): kernels.gpu.moe's grouped kernels at
    the flagship's widths against the reference, no host sync."""
    from kernels.gpu import moe as gpu_moe

    g = torch.Generator().manual_seed(27)
    R, K, N, D, I = 200, 10, 32, 4096, 1024
    x = torch.randn(R, D, generator=g).half()
    idx = torch.stack([torch.randperm(N, generator=g)[:K] for _ in range(R)])
    weights = torch.softmax(torch.randn(R, K, generator=g), -1).half()
    gate_up = (torch.randn(N, 2 * I, D, generator=g) / D**0.5).half()
    down = (torch.randn(N, D, I, generator=g) / I**0.5).half()
    assert gpu_moe.grouped_usable(x.cuda())
    fast, ref, *_ = cuda_and_reference(kernels.moe_experts, x, idx, weights, gate_up, down)
    assert close(fast, ref, TOLERANCE[torch.bfloat16]), error(fast, ref)


@pytest.mark.parametrize("rows", [1, 8])
def test_routed_experts_for_few_rows_at_the_flagships_widths(rows):
    """Decode-sized batches take kernels.gpu.moe's few-rows kernels (hidden 4096, intermediate 1024,
    top-10): against the reference, and a row alone gives its bits in the batch."""
    from kernels.gpu import moe as gpu_moe

    g = torch.Generator().manual_seed(25)
    N, D, I, K = 32, 4096, 1024, 10
    x = torch.randn(rows, D, generator=g).bfloat16()
    idx = torch.stack([torch.randperm(N, generator=g)[:K] for _ in range(rows)])
    weights = torch.softmax(torch.randn(rows, K, generator=g), -1).bfloat16()
    gate_up = (torch.randn(N, 2 * I, D, generator=g) / D**0.5).bfloat16()
    down = (torch.randn(N, D, I, generator=g) / I**0.5).bfloat16()
    assert gpu_moe.few_rows_usable(*on_cuda(x, idx))
    fast, ref, fast_args, _ = cuda_and_reference(kernels.moe_experts, x, idx, weights, gate_up, down)
    assert close(fast, ref, TOLERANCE[torch.bfloat16]), error(fast, ref)
    x_, idx_, weights_ = (t[-1:] for t in fast_args[:3])
    assert torch.equal(kernels.moe_experts(x_, idx_, weights_, *fast_args[3:]), fast[-1:])


@pytest.mark.parametrize("rows", [1, 64, 512])
def test_fp8_banks_at_the_flagships_widths(rows):
    """An FP8 bank as Qwen stores it (e4m3, 128 x 128 block scales), kept so on this GPU when it has
    e4m3: the few-rows kernels (1 row) give the bits of the bank dequantised at load by torch, the
    grouped kernels (64 and 512 rows) its results within bf16's tolerance, and the experts hit
    dequantised by Triton (their fallback) its bits."""
    from cluster.model.quantization import quantize
    from kernels.moe import Fp8Scales, dequantize_blocks, fp8_banks_supported, moe_experts_dequantised

    if not fp8_banks_supported("cuda", torch.bfloat16):
        pytest.skip("this GPU has no e4m3 (sm_89+) or no Triton: FP8 checkpoints are dequantised at load")
    g = torch.Generator().manual_seed(26)
    N, D, I, K = 32, 4096, 1024, 10
    x = torch.randn(rows, D, generator=g).bfloat16().cuda()
    idx = torch.stack([torch.randperm(N, generator=g)[:K] for _ in range(rows)]).cuda()
    weights = torch.softmax(torch.randn(rows, K, generator=g), -1).bfloat16().cuda()
    (gate_up, gate_up_s), (down, down_s) = (quantize(torch.randn(N, r, c, generator=g) / c**0.5, (128, 128))
                                            for r, c in ((2 * I, D), (D, I)))
    exact = [dequantize_blocks(w, s, (128, 128)).bfloat16().cuda() for w, s in ((gate_up, gate_up_s), (down, down_s))]
    scales = Fp8Scales(gate_up_s.cuda(), down_s.cuda(), (128, 128))
    fp8 = kernels.moe_experts(x, idx, weights, gate_up.cuda(), down.cuda(), False, scales)
    bf16 = kernels.moe_experts(x, idx, weights, *exact)
    assert torch.equal(fp8, bf16) if rows == 1 else error(fp8, bf16) <= TOLERANCE[torch.bfloat16]
    assert torch.equal(moe_experts_dequantised(x, idx, weights, gate_up.cuda(), down.cuda(), False, scales), bf16)


@pytest.mark.parametrize("rows", [1, 8, 64, 4096])
def test_dense_fp8_weights_at_the_flagships_widths(rows):
    """A dense FP8 weight as Qwen stores it (DeltaNet's in_proj_qkv: 12288 x 4096, 128 x 128
    blocks) read as stored by kernels.linear (few-rows kernel up to 8 rows, tiles past them)
    against bf16 x @ the weight dequantised to bf16, within bf16's tolerance."""
    from cluster.model.quantization import quantize
    from kernels import Fp8Weight
    from kernels.gpu import moe as gpu_moe
    from kernels.moe import dequantize_blocks, fp8_banks_supported

    if not fp8_banks_supported("cuda", torch.bfloat16):
        pytest.skip("this GPU has no e4m3 (sm_89+) or no Triton: FP8 checkpoints are dequantised at load")
    g = torch.Generator().manual_seed(27)
    weight, scale = quantize(torch.randn(12288, 4096, generator=g) / 64, (128, 128))
    exact = dequantize_blocks(weight, scale, (128, 128)).bfloat16().cuda()
    x = torch.randn(rows, 4096, generator=g).bfloat16().cuda()
    assert gpu_moe.dense_fp8_usable(x)
    fp8 = kernels.linear(x, Fp8Weight(weight.cuda(), scale.cuda(), (128, 128)))
    assert error(fp8, torch.nn.functional.linear(x, exact)) <= TOLERANCE[torch.bfloat16]


@pytest.mark.parametrize("partial", [False, True])
def test_routed_experts_triton_passes_at_the_flagships_widths(partial):
    """kernels.gpu.moe's SwiGLU and weighted sum (what the grouped path runs on CUDA) against the
    torch passes they replace, hidden 4096, intermediate 1024, top-10, some pairs outside the bank:
    the sum bit for bit, SwiGLU within a bf16 ulp."""
    from kernels.gpu import moe as gpu_moe
    from kernels.moe import _pairs_by_expert, _swiglu, _weighted_sum

    g = torch.Generator().manual_seed(24)
    R, K, N, D, I = 700, 10, 64, 4096, 1024
    idx = torch.randint(-1, N, (R, K), generator=g).cuda()
    order, position, _ = _pairs_by_expert(idx, N)
    hidden = (3 * torch.randn(R * K, 2 * I, generator=g)).bfloat16().cuda()
    sorted_out = torch.randn(R * K, D, generator=g).bfloat16().cuda()
    sorted_out[idx.reshape(-1)[order] < 0] = float("nan")  # rows the GEMMs never write
    weights = torch.rand(R, K, generator=g).bfloat16().cuda()
    assert gpu_moe.usable(hidden, sorted_out, weights)
    fast, ref = gpu_moe.swiglu(hidden), _swiglu(hidden)
    assert ((fast.float() - ref.float()).abs() <= ref.float().abs() / 128).all()
    assert torch.equal(gpu_moe.weighted_sum(sorted_out, position, idx, weights, partial),
                       _weighted_sum(sorted_out, position, idx, weights, partial))


def test_fp8_activations_on_cuda_match_their_emulation(monkeypatch):
    """W8A8 on a GPU with e4m3: the grouped kernels over an FP8 bank (Qwen's 128 x 128 blocks, 96
    pairs) and a dense FP8 weight past 8 rows, FP8 x FP8, against the torch emulation of what they
    compute (tests/kernels/test_gpu_moe_kernels.py), to bf16's tolerance; the W8A8 kernels
    built."""
    import torch.nn.functional as F

    from kernels import Fp8Weight, linear
    from kernels.gpu import fp8_activations as w8a8
    from kernels.moe import dequantize_blocks, fp8_banks_supported, moe_experts_triton
    from tests.kernels.test_gpu_moe_kernels import (fp8_bank, few_rows_inputs, w8a8_reference,
                                                    w8a8_tiles)

    if not fp8_banks_supported("cuda", torch.bfloat16):
        pytest.skip("this GPU has no e4m3 (sm_89+): FP8 checkpoints are dequantised at load")
    x, idx, weights, gate_up, down = few_rows_inputs(24, 4, 6, 256, 256)
    gate_up_q, down_q, scales, *_ = fp8_bank(gate_up, down, (128, 128))
    monkeypatch.setattr(w8a8, "_on", False)
    w8a8.use_fp8_activations(True)
    routed = moe_experts_triton(*on_cuda(x, idx, weights, gate_up_q, down_q), False, scales.to("cuda"))
    dense = Fp8Weight(down_q[0].cuda(), scales.down[0].cuda(), scales.block)
    projected = linear(x.cuda(), dense)
    assert w8a8.GROUPED_A8.unavailable is None
    assert error(routed.cpu(), w8a8_reference(x, idx, weights, gate_up_q, down_q, scales, 128)) <= 3e-2
    emulated = F.linear(w8a8_tiles(x, 128), dequantize_blocks(down_q[0], scales.down[0], scales.block))
    assert error(projected.cpu(), emulated.to(torch.bfloat16)) <= 3e-2
