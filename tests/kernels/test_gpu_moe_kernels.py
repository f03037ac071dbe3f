"""The routed experts' Triton kernels (kernels.gpu.moe, kernels.gpu.fp8_activations) against the
plain-torch references, on CPU tensors through Triton's interpreter: SwiGLU and the weighted sum as
one pass each, the few-rows kernels of decode-sized batches, the grouped kernels of larger ones over
bf16 / fp16 / FP8 banks (FP8 activations too), dense FP8 weights read as stored, and each kernel's
fallback when it does not build. On a GPU tests/cuda/test_kernels.py runs the compiled kernels."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.kernels.test_gpu_kernels import TOLERANCE
from tests.kernels.test_ops import close

# grouped_mm leaves the rows of pairs outside the bank unwritten; SwiGLU of their garbage overflows
# in the interpreter's numpy (the sum never reads them)
OVERFLOW_IN_UNWRITTEN_ROWS = pytest.mark.filterwarnings("ignore:(overflow|invalid value) encountered:RuntimeWarning")


def routed_pairs(dtype, R=23, K=4, N=7, D=40, seed=9):
    """A routed-experts step as the grouped GEMMs leave it: (row, k) pairs sorted by expert (some
    outside the bank: idx -1), their outputs in expert order, NaN in the rows past the groups (which
    the GEMMs never write), the router's weights."""
    from kernels.moe import _pairs_by_expert

    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(-1, N, (R, K), generator=g)
    order, position, _ = _pairs_by_expert(idx, N)
    sorted_out = torch.randn(R * K, D, generator=g).to(dtype)
    sorted_out[idx.reshape(-1)[order] < 0] = float("nan")
    return sorted_out, position, idx, torch.rand(R, K, generator=g).to(dtype)


@pytest.mark.parametrize("dtype", TOLERANCE)
@pytest.mark.parametrize("partial", [False, True])
@pytest.mark.parametrize("D", [40, 1100])  # one column block, ragged; two
def test_routed_experts_weighted_sum_reads_the_pairs_in_place_with_the_same_bits(interpreter, dtype, partial, D):
    """The Triton sum over each row's pairs, read at their positions in expert order, against the
    torch version that copies them back to (row, k) order: bit for bit, fp64 sums (partial) too."""
    from kernels.gpu import moe as gpu_moe
    from kernels.moe import _weighted_sum

    args = routed_pairs(dtype, D=D)
    fast = gpu_moe.weighted_sum(*args, partial)
    ref = _weighted_sum(*args, partial)
    assert fast.dtype == ref.dtype == (torch.float64 if partial else dtype) and torch.equal(fast, ref)


@pytest.mark.parametrize("dtype", TOLERANCE)
def test_routed_experts_swiglu_in_one_pass(interpreter, dtype):
    """silu(gate) * up, each rounded to the dtype as torch rounds: bf16 bit for bit but for an
    ulp where the two exps differ in fp32's last bits (none in this draw), fp32 within a few ulps."""
    from kernels.gpu import moe as gpu_moe
    from kernels.moe import _swiglu

    hidden = (3 * torch.randn(300, 2 * 200, generator=torch.Generator().manual_seed(10))).to(dtype)
    fast, ref = gpu_moe.swiglu(hidden), _swiglu(hidden)
    assert fast.dtype == dtype and fast.shape == (300, 200) and fast.is_contiguous()
    if dtype == torch.bfloat16:
        assert torch.equal(fast, ref)
    assert ((fast.float() - ref.float()).abs() <= 1e-6 * ref.float().abs()).all()


@OVERFLOW_IN_UNWRITTEN_ROWS
def test_routed_experts_run_the_triton_passes_on_gpus_and_torch_when_they_do_not_build(interpreter, monkeypatch,
                                                                                        caplog):
    """kernels.moe_experts' grouped path with the Triton passes swapped in (on CUDA tensors only; here
    forced onto CPU tensors) gives the torch path's bits; a build failure logs once and the torch
    passes run from then on."""
    from triton.runtime.errors import OutOfResources

    from kernels.gpu import moe as gpu_moe
    from kernels.moe import moe_experts_grouped

    g = torch.Generator().manual_seed(11)
    R, K, N, D, I = 19, 4, 6, 32, 16
    x = torch.randn(R, D, generator=g).bfloat16()
    idx = torch.randint(-1, N, (R, K), generator=g)
    weights = torch.rand(R, K, generator=g).bfloat16()
    gate_up = (0.3 * torch.randn(N, 2 * I, D, generator=g)).bfloat16()
    down = (0.3 * torch.randn(N, D, I, generator=g)).bfloat16()
    torch_path = moe_experts_grouped(x, idx, weights, gate_up, down)
    launched = []
    real_launch = gpu_moe.OP.launch
    monkeypatch.setattr(gpu_moe.OP, "unavailable", None)  # restored to it after the test
    monkeypatch.setattr(gpu_moe.OP, "usable", lambda t: gpu_moe.OP.unavailable is None)
    monkeypatch.setattr(gpu_moe.OP, "launch", lambda run: launched.append(run) or real_launch(run))
    assert torch.equal(moe_experts_grouped(x, idx, weights, gate_up, down), torch_path) and len(launched) == 2

    def does_not_fit():
        raise OutOfResources(300_000, 232_448, "shared memory")

    monkeypatch.setattr(gpu_moe.OP, "launch", lambda run: real_launch(does_not_fit))
    with caplog.at_level("WARNING"):
        assert torch.equal(moe_experts_grouped(x, idx, weights, gate_up, down), torch_path)
    assert "OutOfResources" in gpu_moe.OP.unavailable and caplog.text.count("unavailable") == 1


def few_rows_inputs(R, K, N, D, I, dtype=torch.bfloat16, seed=12):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(R, D, generator=g).to(dtype)
    idx = torch.randint(-1, N, (R, K), generator=g)  # -1: an expert outside this bank
    weights = torch.rand(R, K, generator=g).to(dtype)
    gate_up = (torch.randn(N, 2 * I, D, generator=g) / D**0.5).to(dtype)
    return x, idx, weights, gate_up, (torch.randn(N, D, I, generator=g) / I**0.5).to(dtype)


@pytest.mark.parametrize("partial, shape", [  # R K N D I (the interpreter is slow: one sum a shape past the first)
    (False, (1, 10, 16, 64, 32)), (True, (1, 10, 16, 64, 32)), (True, (8, 10, 40, 72, 40)),
    (False, (3, 4, 9, 300, 264))])
def test_routed_experts_for_few_rows_match_the_reference(interpreter, partial, shape):
    """The decode-sized path (each pair's MLP as two matrix-vector kernels over its expert's weights,
    then the weighted sum) against the reference, tiles ragged in both dims; each row's result the
    same bits alone as in its batch."""
    from kernels.gpu import moe as gpu_moe
    from kernels.moe import moe_experts_reference

    x, idx, weights, gate_up, down = few_rows_inputs(*shape)
    fast = gpu_moe.experts_few_rows(x, idx, weights, gate_up, down, partial)
    ref = moe_experts_reference(x, idx, weights, gate_up, down, partial)
    assert fast.dtype == ref.dtype and close(fast, ref, TOLERANCE[torch.bfloat16])
    alone = gpu_moe.experts_few_rows(x[-1:], idx[-1:], weights[-1:], gate_up, down, partial)
    assert torch.equal(alone, fast[-1:])


@OVERFLOW_IN_UNWRITTEN_ROWS
def test_decode_sized_batches_take_the_few_rows_kernels_and_larger_ones_the_grouped_gemms(interpreter, monkeypatch):
    """kernels.moe_experts on GPUs (here fp16 CPU tensors, which no C++ kernel takes, with the kernels
    allowed on them): up to FEW_ROWS_MAX_PAIRS pairs the few-rows kernels, past it the grouped path;
    both within tolerance of the reference."""
    import kernels
    from kernels.gpu import moe as gpu_moe
    from kernels.moe import moe_experts_reference

    monkeypatch.setattr(gpu_moe.FEW_ROWS, "usable", lambda t: True)
    monkeypatch.setattr(gpu_moe.OP, "usable", lambda t: True)
    few_rows = []
    real_launch = gpu_moe.FEW_ROWS.launch
    monkeypatch.setattr(gpu_moe.FEW_ROWS, "launch", lambda run: few_rows.append(run) or real_launch(run))
    for rows, expected in ((8, 1), (9, 0)):  # 80 pairs, 90 pairs at top-10
        few_rows.clear()
        args = few_rows_inputs(rows, 10, 24, 64, 32, torch.float16)
        out = kernels.moe_experts(*args)
        assert len(few_rows) == expected and close(out, moe_experts_reference(*args), TOLERANCE[torch.bfloat16])


def test_grouped_tiles_cover_each_expert_s_pairs_once_and_never_span_two():
    """The grouped kernels' tiles (kernels.gpu.moe.tiles_by_expert), sized without a host sync: every
    pair of the groups in exactly one tile of its own expert, empty groups none, tiles past the last -1."""
    pytest.importorskip("triton")
    from kernels.gpu import moe as gpu_moe

    g = torch.Generator().manual_seed(3)
    for N, block_m in ((1, 16), (7, 16), (40, 64)):
        counts = torch.randint(0, 150, (N,), generator=g) * (torch.rand(N, generator=g) > 0.3)
        ends = counts.cumsum(0).to(torch.int32)
        P = int(ends[-1]) + 5  # 5 pairs outside the bank, sorted past every group
        expert, first = gpu_moe.tiles_by_expert(ends, P, block_m)
        assert expert.numel() == -(-P // block_m) + min(N, P)
        owner = torch.full((P,), -1)
        for e, f in zip(expert.tolist(), first.tolist()):
            if e >= 0:
                pairs = torch.arange(f, min(f + block_m, int(ends[e])))
                assert pairs.numel() > 0 and (owner[pairs] == -1).all()
                owner[pairs] = e
        assert torch.equal(owner[: int(ends[-1])], torch.repeat_interleave(torch.arange(N), counts))
        assert (expert[(expert >= 0).sum():] == -1).all()


@OVERFLOW_IN_UNWRITTEN_ROWS
@pytest.mark.parametrize("dtype, shape, block", [  # R K N D I; an FP8 bank's block, None: the bank as is
    (torch.float16, (9, 10, 12, 200, 40), None),  # ragged tiles both ways, 16 pairs a tile
    (torch.float32, (128, 2, 2, 64, 48), None),  # 64 pairs a tile, several tiles an expert
    (torch.bfloat16, (9, 10, 12, 200, 40), (16, 40)),  # a tile across block columns: scales a weight
    (torch.bfloat16, (12, 8, 6, 512, 160), (64, 256))])  # tiles half a block column wide
def test_grouped_kernels_match_the_reference(interpreter, monkeypatch, dtype, shape, block):
    """The grouped path (pairs sorted by expert, both GEMMs as tiled Triton kernels reading the bank
    as stored, x gathered and SwiGLU fused in the first) against the reference over the bank it holds
    (an FP8 one: its weights dequantised); fp32 to fp32's tolerance."""
    from kernels.gpu import moe as gpu_moe
    from kernels.moe import moe_experts_reference, moe_experts_triton

    x, idx, weights, gate_up, down = few_rows_inputs(*shape, dtype=dtype)
    scales = None
    if block is not None:
        gate_up, down, scales, *exact = fp8_bank(gate_up, down, block)
    ref = moe_experts_reference(x, idx, weights, *(exact if block else (gate_up, down)))
    launched, real_launch = [], gpu_moe.GROUPED.launch
    monkeypatch.setattr(gpu_moe.GROUPED, "launch", lambda run, *args: launched.append(run) or real_launch(run, *args))
    out = moe_experts_triton(x, idx, weights, gate_up, down, False, scales)
    assert launched and out.dtype == dtype
    assert close(out, ref, TOLERANCE[torch.float32 if dtype == torch.float32 else torch.bfloat16])


def fp8_bank(gate_up, down, block):
    """gate_up, down quantized as Qwen's FP8 checkpoints store them, and the bank they encode in the
    original's dtype."""
    from cluster.model.quantization import quantize
    from kernels.moe import Fp8Scales, dequantize_blocks

    (gate_up_q, gate_up_s), (down_q, down_s) = quantize(gate_up.float(), block), quantize(down.float(), block)
    scales = Fp8Scales(gate_up_s.contiguous(), down_s.contiguous(), block)
    exact = [dequantize_blocks(q, s, block).to(gate_up.dtype) for q, s in ((gate_up_q, gate_up_s), (down_q, down_s))]
    return gate_up_q, down_q, scales, *exact


@OVERFLOW_IN_UNWRITTEN_ROWS
@pytest.mark.parametrize("shape_and_block", [((3, 4, 6, 200, 40), (16, 32)), ((9, 10, 12, 256, 64), (128, 128))])
def test_fp8_banks_give_the_bits_of_the_bank_they_encode(interpreter, monkeypatch, shape_and_block):
    """An FP8 bank kept as stored, its block scales ragged or Qwen's 128 x 128: the few-rows kernels
    (each weight times its block's scale rounded to bf16 as it loads) and the Triton dequantisation
    give the bits of the bank dequantised at load; moe_experts takes the few-rows kernels up to 80
    pairs (12 here), past them (90) the grouped kernels, or where those do not build the experts hit
    dequantised for the grouped GEMMs (then the bits of the bank dequantised at load)."""
    import kernels
    from kernels.gpu import moe as gpu_moe
    from kernels.moe import moe_experts_reference

    (R, K, N, D, I), block = shape_and_block
    x, idx, weights, gate_up, down = few_rows_inputs(R, K, N, D, I)
    gate_up_q, down_q, scales, gate_up_exact, down_exact = fp8_bank(gate_up, down, block)
    assert torch.equal(gpu_moe.dequantize(gate_up_q, scales.gate_up, block, x.dtype), gate_up_exact)
    wanted = torch.arange(N) % 3 == 1  # only these experts' rows written
    assert torch.equal(gpu_moe.dequantize(down_q, scales.down, block, x.dtype, wanted)[wanted], down_exact[wanted])
    # one row (the interpreter runs a program per pair and 8 outputs)
    few = gpu_moe.experts_few_rows(x[:1], idx[:1], weights[:1], gate_up_q, down_q, False, scales)
    assert torch.equal(few, gpu_moe.experts_few_rows(x[:1], idx[:1], weights[:1], gate_up_exact, down_exact, False))
    monkeypatch.setattr(gpu_moe.FEW_ROWS, "usable", lambda t: True)
    monkeypatch.setattr(gpu_moe.OP, "usable", lambda t: True)
    monkeypatch.setattr(gpu_moe.DEQUANTIZE, "usable_for", lambda device, dtype: True)
    idx = torch.where(idx < N // 2, idx, -1)  # half the experts not hit: not dequantised
    reference = moe_experts_reference(x, idx, weights, gate_up_exact, down_exact)
    monkeypatch.setattr(gpu_moe.GROUPED, "usable", lambda t: True)
    grouped, real_launch = [], gpu_moe.GROUPED.launch
    monkeypatch.setattr(gpu_moe.GROUPED, "launch", lambda run, *args: grouped.append(run) or real_launch(run, *args))
    assert close(kernels.moe_experts(x, idx, weights, gate_up_q, down_q, False, scales), reference,
                 TOLERANCE[torch.bfloat16]) and len(grouped) == (idx.numel() > gpu_moe.FEW_ROWS_MAX_PAIRS)
    if grouped:  # where the grouped kernels do not build: the experts hit dequantised
        monkeypatch.setattr(gpu_moe.GROUPED, "launch", build_fails)
        out = kernels.moe_experts(x, idx, weights, gate_up_q, down_q, False, scales)
        assert torch.equal(out, kernels.moe_experts(x, idx, weights, gate_up_exact, down_exact))
        assert close(out, reference, TOLERANCE[torch.bfloat16])


def w8a8_tiles(a, block_k):
    """a [M, C] as the W8A8 kernels multiply it: each [row, block_k columns] tile rounded to e4m3 with
    its largest |value| / 448 as scale, times the scale (fp32)."""
    parts = []
    for tile in a.float().split(block_k, dim=1):
        scale = tile.abs().amax(1, keepdim=True).clamp(min=1e-30) / 448
        parts.append((tile / scale).clamp(-448, 448).to(torch.float8_e4m3fn).float() * scale)
    return torch.cat(parts, 1)


def w8a8_reference(x, idx, weights, gate_up_q, down_q, scales, block_k):
    """moe_experts_reference as the W8A8 grouped kernels compute it: x's and SwiGLU's rows in e4m3
    tiles, the weights FP8 times their block scales, unrounded (fp32), outputs rounded to x's dtype."""
    from kernels.moe import dequantize_blocks

    gate_up, down = (dequantize_blocks(q, s, scales.block) for q, s in ((gate_up_q, scales.gate_up),
                                                                          (down_q, scales.down)))
    R, K = idx.shape
    I, dtype = down.shape[2], x.dtype
    pair_out = torch.zeros(R * K, x.shape[1], dtype=dtype)
    flat = idx.reshape(-1)
    for p in (flat >= 0).nonzero()[:, 0].tolist():
        hidden = (w8a8_tiles(x[p // K][None], block_k) @ gate_up[flat[p]].T).to(dtype).float()
        gate, up = hidden[:, :I], hidden[:, I:]
        act = (F.silu(gate).to(dtype).float() * up).to(dtype)
        pair_out[p] = (w8a8_tiles(act, block_k) @ down[flat[p]].T).to(dtype)[0]
    weighted = pair_out.view(R, K, -1) * weights.to(dtype)[..., None]
    return weighted.double().sum(1).float().to(dtype)


@OVERFLOW_IN_UNWRITTEN_ROWS
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_activations_multiply_fp8_by_fp8_in_the_grouped_kernels(interpreter, monkeypatch, dtype):
    """W8A8 (kernels.gpu.fp8_activations): the grouped kernels over an FP8 bank with Qwen's 128 x 128 blocks
    quantize x's and SwiGLU's rows a [row, 128 columns] tile at a time (a scale a row a tile) and
    multiply by the FP8 weights as stored (and so does a dense FP8 layer past 8 rows): a torch emulation
    of that within 1e-3 (fp32) or bf16's tolerance, and within 8% of the largest output from the W8A16
    kernels' (what the activations' rounding costs); off, the W8A16 kernels run, as they do for blocks
    whose columns do not hold whole tiles and where the W8A8 kernels do not build."""
    from kernels import Fp8Weight, linear
    from kernels.gpu import fp8_activations
    from kernels.gpu import moe as gpu_moe
    from kernels.moe import dequantize_blocks, moe_experts_triton

    R, K, N, D, I = 24, 4, 6, 256, 256  # 96 pairs: grouped; two block columns each way
    x, idx, weights, gate_up, down = few_rows_inputs(R, K, N, D, I, dtype=dtype)
    gate_up_q, down_q, scales, *exact = fp8_bank(gate_up, down, (128, 128))
    monkeypatch.setattr(gpu_moe.GROUPED, "usable", lambda t: True)
    monkeypatch.setattr(fp8_activations.GROUPED_A8, "dtypes", (torch.bfloat16, torch.float32))
    monkeypatch.setattr(fp8_activations.GROUPED_A8, "usable", lambda t: t.dtype in fp8_activations.GROUPED_A8.dtypes)
    launched = []
    for op in (gpu_moe.GROUPED, fp8_activations.GROUPED_A8):
        monkeypatch.setattr(op, "launch", lambda run, *args, op=op, launch=op.launch: launched.append(op.name)
                            or launch(run, *args))
    w8a16 = moe_experts_triton(x, idx, weights, gate_up_q, down_q, False, scales)
    assert launched == [gpu_moe.GROUPED.name]
    monkeypatch.setattr(fp8_activations, "_on", False)
    fp8_activations.use_fp8_activations(True)
    w8a8 = moe_experts_triton(x, idx, weights, gate_up_q, down_q, False, scales)
    assert launched[1:] == [fp8_activations.GROUPED_A8.name]
    # fp32: the emulation's SwiGLU rows differ from the kernel's in last bits, so now and then one
    # rounds to the neighbouring e4m3 value, which moves that pair's whole output a little
    tolerance = 1e-3 if dtype == torch.float32 else TOLERANCE[torch.bfloat16]
    assert close(w8a8, w8a8_reference(x, idx, weights, gate_up_q, down_q, scales, 128), tolerance)
    assert not torch.equal(w8a8, w8a16) and close(w8a8, w8a16, 0.08)
    ragged_q, ragged_down_q, ragged, *_ = fp8_bank(gate_up, down, (16, 40))  # 40 columns: no whole tiles
    moe_experts_triton(x, idx, weights, ragged_q, ragged_down_q, False, ragged)
    assert launched[2:] == [gpu_moe.GROUPED.name]
    dense = Fp8Weight(down_q[0], scales.down[0], scales.block)  # [D, I]: 24 rows, two tiles of rows
    monkeypatch.setattr(gpu_moe.DENSE_FP8, "usable", lambda t: True)
    emulated = F.linear(w8a8_tiles(x, 128), dequantize_blocks(dense.weight, dense.scale, dense.block)).to(dtype)
    assert close(linear(x, dense), emulated, tolerance)
    assert launched[3:] == [fp8_activations.GROUPED_A8.name]
    monkeypatch.setattr(fp8_activations.GROUPED_A8, "launch", build_fails)  # W8A8 does not build: W8A16 runs
    assert torch.equal(moe_experts_triton(x, idx, weights, gate_up_q, down_q, False, scales), w8a16)


@pytest.mark.parametrize("rows, shape, block", [
    (3, (70, 200), (16, 40)),  # few rows; ragged blocks: tiles across block columns read a scale an element
    (100, (96, 256), (32, 128)),  # two tiles of rows (the last ragged), one scale a row
])
def test_dense_fp8_weights_are_read_as_stored(interpreter, monkeypatch, rows, shape, block):
    """kernels.linear over a dense FP8 weight kept as stored: up to 8 rows the few-rows down kernel,
    past them the grouped one's tiles (a bank of one expert), against x @ the weight dequantised to
    x's dtype (fp32 and bf16 to their tolerances); where the kernel does not build, the weight
    dequantised for the call: the bits of the weight dequantised at load."""
    import torch.nn.functional as F

    from cluster.model.quantization import quantize
    from kernels import Fp8Weight, linear
    from kernels.gpu import moe as gpu_moe
    from kernels.moe import dequantize_blocks

    N, K = shape
    weight, scale = quantize(torch.randn(N, K) * K**-0.5, block)
    fp8, exact = Fp8Weight(weight, scale, block), dequantize_blocks(weight, scale, block)
    monkeypatch.setattr(gpu_moe.DENSE_FP8, "usable", lambda t: True)
    launched, real_launch = [], gpu_moe.DENSE_FP8.launch
    monkeypatch.setattr(gpu_moe.DENSE_FP8, "launch", lambda run, *args: launched.append(run) or real_launch(run, *args))
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(rows, K, dtype=dtype)
        reference = F.linear(x.float(), exact.to(dtype).float())
        assert close(linear(x, fp8), reference, TOLERANCE[dtype])
    assert len(launched) == 2
    monkeypatch.setattr(gpu_moe.DENSE_FP8, "launch", build_fails)
    assert torch.equal(linear(x, fp8), F.linear(x, exact.to(x.dtype)))


def test_the_shared_expert_over_fp8_weights_runs_eagerly_inside_compiled_glue(interpreter, monkeypatch):
    """add_shared_expert is compiled glue (CUDA decode graphs), but not over FP8 weights, which
    its Triton kernels read: the same values inside compiled_glue as outside."""
    from cluster.model.quantization import quantize
    from kernels import Fp8Weight, add_shared_expert, backend
    from kernels.backend import compiled_glue
    from kernels.gpu import moe as gpu_moe

    monkeypatch.setattr(backend, "_cpu_kernels", False)
    monkeypatch.setattr(gpu_moe.DENSE_FP8, "usable", lambda t: True)
    launched, real_launch = [], gpu_moe.DENSE_FP8.launch
    monkeypatch.setattr(gpu_moe.DENSE_FP8, "launch", lambda run, *args: launched.append(run) or real_launch(run, *args))
    D, I = 64, 32
    gate_up, down = (Fp8Weight(*quantize(torch.randn(*shape) * 0.2, (16, 16)), (16, 16))
                     for shape in ((2 * I, D), (D, I)))
    x, logit, routed = torch.randn(3, D), torch.randn(3, 1), torch.randn(3, D)
    eager = add_shared_expert(x, gate_up, down, logit, routed)
    with compiled_glue("aot_eager"):
        assert torch.equal(add_shared_expert(x, gate_up, down, logit, routed), eager)
    assert len(launched) == 4


def build_fails(run, *args):
    from kernels.gpu.triton_guard import KernelUnavailable

    raise KernelUnavailable("did not build here")
