"""Device-level probes for benchmarks/gpu_check.py, apart from the engine: the card, its software
and which implementation each op takes there, its copy bandwidth and bf16 matmul rate, the routed
experts' grouped GEMMs against their roofline (and a padded batched-matmul alternative), and Qwen's
block-scaled FP8 GEMM. Each returns figures; the device is synchronised around every timed call."""

from __future__ import annotations

import math
import time

import torch

from cluster.config import ModelConfig

SPECS = {  # name: (bf16 dense TFLOP/s, HBM TB/s), SXM parts
    "H100": (989.4, 3.35), "H200": (989.4, 4.8), "B200": (2250.0, 8.0), "A100": (312.0, 2.0),
}


def card_spec(device: str) -> tuple[str, float | None, float | None]:
    if not device.startswith("cuda"):
        return "cpu", None, None
    name = torch.cuda.get_device_name()
    for key, (tflops, tbps) in SPECS.items():
        if key in name:
            return name, tflops, tbps
    return name, None, None


def environment(device: str) -> dict:
    """Versions and which implementation each op takes on this device."""
    import importlib.metadata as md

    from kernels.gpu import attention as gpu_attention
    from kernels.gpu import delta_rule as gpu_delta_rule
    from kernels.gpu import fla
    from kernels.gpu import moe as gpu_moe

    found = {}
    for package in ("torch", "triton", "flash-linear-attention"):
        try:
            found[package] = md.version(package)
        except md.PackageNotFoundError:
            found[package] = None
    probe = torch.empty(1, device=device, dtype=torch.bfloat16)
    found["delta_rule_decode"] = ("C++" if device == "cpu" else "Triton" if gpu_delta_rule.usable(probe)
                                  else "flash-linear-attention" if fla.usable(probe) else "batched torch")
    found["delta_rule_prefill"] = ("C++" if device == "cpu" else "flash-linear-attention" if fla.usable(probe)
                                   else "batched torch")
    found["paged_attention"] = ("C++" if device == "cpu" else "Triton" if gpu_attention.usable(probe)
                                else "batched torch (SDPA)")
    found["grouped_experts"] = ("reference" if not hasattr(torch, "_grouped_mm") else "torch._grouped_mm"
                                + (", Triton SwiGLU and weighted sum" if gpu_moe.usable(probe) else ""))
    return found


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def seconds_per_call(fn, device: str, runs: int) -> float:
    """Mean seconds of fn() over `runs` calls after one warm-up call, the device synchronised."""
    fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(runs):
        fn()
    sync(device)
    return (time.perf_counter() - start) / runs


def copy_bandwidth(device: str, megabytes: int) -> float:
    """Bytes per second of a device-to-device copy (read + write)."""
    x = torch.empty(megabytes * 2**20, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    return 2 * x.numel() / seconds_per_call(lambda: y.copy_(x), device, runs=5)


def grouped_gemm(cfg: ModelConfig, tokens: int, dtype: torch.dtype, device: str) -> dict:
    """The routed experts of one layer over `tokens` tokens, random top-k routing: TFLOP/s of the
    whole op (sort by expert, gather, two grouped GEMMs, SwiGLU, fp64 weighted sum) and of its two
    grouped GEMMs alone, and the least bytes the GEMMs must move (the weights of every expert hit,
    the pairs' inputs and outputs): over a measured bandwidth that bounds the TFLOP/s (at 4k tokens
    over 512 experts top-10 each expert sees ~80 rows: ~80 FLOP per weight byte, memory-bound)."""
    import torch.nn.functional as F

    from kernels.moe import _pairs_by_expert, _swiglu, _weighted_sum, moe_experts_grouped, pad_by_expert

    N, D, I, K = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts_per_tok
    gate_up = torch.randn(N, 2 * I, D, dtype=dtype, device=device) / math.sqrt(D)
    down = torch.randn(N, D, I, dtype=dtype, device=device) / math.sqrt(I)
    x = torch.randn(tokens, D, dtype=dtype, device=device)
    idx = torch.rand(tokens, N, device=device).topk(K, dim=-1).indices
    weights = torch.full((tokens, K), 1.0 / K, dtype=dtype, device=device)
    pairs = _pairs_by_expert(idx, N)
    order, position, offsets = pairs
    x_pairs = x[order // K]

    def gemms():
        gate, up = torch._grouped_mm(x_pairs, gate_up.transpose(-2, -1), offs=offsets).chunk(2, dim=-1)
        return torch._grouped_mm((F.silu(gate) * up).contiguous(), down.transpose(-2, -1), offs=offsets)

    # the same GEMMs as one batched matmul over every expert's rows padded to the busiest expert's
    # count (what moe_experts_padded runs): dense tiles, wasted rows (flops counted useful)
    x_padded = pad_by_expert(x, idx, pairs, N, max_waste=math.inf)[0]

    def padded():
        gate, up = torch.bmm(x_padded, gate_up.transpose(-2, -1)).chunk(2, dim=-1)
        return torch.bmm(F.silu(gate) * up, down.transpose(-2, -1))

    # where the whole op's time goes besides its GEMMs: each of its passes alone, ms (SwiGLU and the
    # weighted sum as torch's passes and as kernels.gpu.moe's Triton passes, which the op runs on GPUs)
    from kernels.gpu import moe as gpu_moe

    hidden = torch._grouped_mm(x_pairs, gate_up.transpose(-2, -1), offs=offsets)
    sorted_out = gemms()
    stages = {"sort": lambda: _pairs_by_expert(idx, N), "gather": lambda: x[order // K],
              "swiglu": lambda: _swiglu(hidden),
              "weighted_sum": lambda: _weighted_sum(sorted_out, position, idx, weights, False)}
    if gpu_moe.usable(hidden):
        stages |= {"swiglu_triton": lambda: gpu_moe.swiglu(hidden),
                   "weighted_sum_triton": lambda: gpu_moe.weighted_sum(sorted_out, position, idx, weights, False)}
    stage_ms = {f"routed_experts_{name}_ms": seconds_per_call(run, device, 5) * 1e3 for name, run in stages.items()}

    flops = tokens * K * 6 * D * I
    size = torch.finfo(dtype).bits // 8
    least_bytes = (idx.unique().numel() * 3 * D * I + tokens * K * (2 * D + 3 * I)) * size
    # the whole op as the engine runs it (kernels.moe_experts: the padded batched matmuls from
    # PADDED_MIN_PAIRS pairs on, unless routing is too skewed), and through the grouped GEMMs
    from kernels import moe as moe_ops

    whole = flops / seconds_per_call(lambda: moe_ops.moe_experts(x, idx, weights, gate_up, down), device, 5)
    padded_taken = (moe_ops.padded_usable(x, idx)
                    and moe_ops.moe_experts_padded(x, idx, weights, gate_up, down) is not None)
    via_grouped = flops / seconds_per_call(lambda: moe_experts_grouped(x, idx, weights, gate_up, down), device, 5)
    torch_passes = {}
    if gpu_moe.usable(hidden):  # the grouped op once more with torch's passes (what it ran before them)
        gpu_moe.OP.unavailable = "timing the torch passes"
        seconds = seconds_per_call(lambda: moe_experts_grouped(x, idx, weights, gate_up, down), device, 5)
        gpu_moe.OP.unavailable = None
        torch_passes["routed_experts_torch_passes_tflops"] = flops / seconds / 1e12
    grouped = flops / seconds_per_call(gemms, device, 5)
    return {"routed_experts_tflops": whole / 1e12, "routed_experts_path": "padded" if padded_taken else "grouped",
            "routed_experts_grouped_tflops": via_grouped / 1e12, "grouped_gemm_tflops": grouped / 1e12,
            "grouped_gemm_flop_per_byte": flops / least_bytes,
            "padded_bmm_tflops": flops / seconds_per_call(padded, device, 5) / 1e12,
            "padded_bmm_rows_per_expert": x_padded.shape[1], "mean_rows_per_expert": tokens * K / N,
            "routed_experts_ms": flops / whole * 1e3,
            "grouped_gemms_ms": flops / grouped * 1e3, **stage_ms, **torch_passes}


def routed_experts_few_rows(cfg: ModelConfig, device: str, smoke: bool = False) -> dict:
    """The routed experts of one layer at decode batches (1 to 64 rows, random top-10 over the
    flagship's 512 experts, bf16): the few-rows kernels (kernels.gpu.moe.experts_few_rows, what the
    engine runs up to FEW_ROWS_MAX_PAIRS pairs) against the sorted grouped-GEMM path, us a call and
    the weight bytes of the experts hit over that time; and max |diff| between the two."""
    from kernels.gpu import moe as gpu_moe
    from kernels.moe import moe_experts_grouped

    N, D, I, K = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts_per_tok
    gate_up = torch.randn(N, 2 * I, D, dtype=torch.bfloat16, device=device) / math.sqrt(D)
    down = torch.randn(N, D, I, dtype=torch.bfloat16, device=device) / math.sqrt(I)
    found = {}
    for rows in (1, 2) if smoke else (1, 2, 4, 8, 16, 32, 64):
        x = torch.randn(rows, D, dtype=torch.bfloat16, device=device)
        idx = torch.rand(rows, N, device=device).topk(K, dim=-1).indices
        weights = torch.softmax(torch.randn(rows, K, device=device), -1).to(torch.bfloat16)
        expert_bytes = idx.unique().numel() * 3 * D * I * 2
        ways = {"grouped": lambda: moe_experts_grouped(x, idx, weights, gate_up, down)}
        if gpu_moe.FEW_ROWS.usable(x):
            ways["few_rows"] = lambda: gpu_moe.experts_few_rows(x, idx, weights, gate_up, down, False)
        outs = {}
        for name, run in ways.items():
            outs[name] = run()
            seconds = seconds_per_call(run, device, 20)
            found |= {f"routed_{name}_us_{rows}": seconds * 1e6,
                      f"routed_{name}_tb_s_{rows}": expert_bytes / seconds / 1e12}
        if "few_rows" in outs:
            diff = outs["few_rows"].float() - outs["grouped"].float()
            found[f"routed_few_rows_max_abs_diff_{rows}"] = diff.abs().max().item()
    return found


def w8a8(run):
    """run, called with W8A8 on (kernels.use_fp8_activations), as ClusterConfig(fp8_activations=True)
    runs it: the grouped kernels over FP8 weights multiply e4m3 activations on the FP8 tensor cores."""
    from kernels import use_fp8_activations

    def with_fp8_activations():
        use_fp8_activations(True)
        try:
            return run()
        finally:
            use_fp8_activations(False)

    return with_fp8_activations


def routed_experts_fp8(cfg: ModelConfig, device: str, smoke: bool = False) -> dict:
    """One layer's routed experts (the flagship's 512, top-10) held FP8 as Qwen stores them (128 x
    128 block scales, random) against the same bank dequantised to bf16 at load, through
    kernels.moe.moe_experts as a worker runs them: few-rows kernels over the FP8 weights up to 8
    rows, past them the grouped Triton kernels dequantising each weight tile as they load it. us a
    call both ways, and of each way the FP8 bank can take at every size (few-rows kernels, grouped
    kernels, the experts hit dequantised for the grouped GEMMs: the data for FP8's thresholds), the
    grouped Triton kernels over the bf16 bank beside torch's grouped GEMMs, the whole bank's
    dequantisation alone; whether FP8's outputs are bf16's bits (up to 8 rows, and dequantised:
    they should be) and how far they are elsewhere; TFLOP/s at prefill sizes; past 8 rows the same
    with W8A8 (the activations in e4m3 too, FP8 x FP8: fp8_w8a8) and how far it is from bf16."""
    from gpu_slice import fp8_random

    from kernels.gpu import moe as gpu_moe
    from kernels.moe import Fp8Scales, dequantize_bank, moe_experts, moe_experts_dequantised, moe_experts_triton

    N, D, I, K = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts_per_tok
    block = (128, 128)

    gate_up, gate_up_scale = fp8_random((N, 2 * I, D), block, device)
    down, down_scale = fp8_random((N, D, I), block, device)
    scales = Fp8Scales(gate_up_scale, down_scale, block)
    gate_up_bf16 = dequantize_bank(gate_up, gate_up_scale, block, torch.bfloat16)
    down_bf16 = dequantize_bank(down, down_scale, block, torch.bfloat16)
    found = {"routed_fp8_dequantize_bank_us": seconds_per_call(
        lambda: (dequantize_bank(gate_up, gate_up_scale, block, torch.bfloat16),
                 dequantize_bank(down, down_scale, block, torch.bfloat16)), device, 5) * 1e6}
    for rows in (1, 16) if smoke else (1, 8, 64, 512, 4096):
        x = torch.randn(rows, D, dtype=torch.bfloat16, device=device)
        idx = torch.rand(rows, N, device=device).topk(K, dim=-1).indices
        weights = torch.softmax(torch.randn(rows, K, device=device), -1).to(torch.bfloat16)
        bf16 = moe_experts(x, idx, weights, gate_up_bf16, down_bf16)
        fp8 = moe_experts(x, idx, weights, gate_up, down, False, scales)
        found[f"routed_fp8_max_abs_diff_{rows}"] = (fp8.float() - bf16.float()).abs().max().item()
        if gpu_moe.few_rows_usable(x, idx):
            found[f"routed_fp8_same_bits_{rows}"] = bool(torch.equal(fp8, bf16))
        dequantised = moe_experts_dequantised(x, idx, weights, gate_up, down, False, scales)
        found[f"routed_fp8_dequantised_same_bits_{rows}"] = bool(torch.equal(dequantised, bf16))
        ways = {"fp8": lambda: moe_experts(x, idx, weights, gate_up, down, False, scales),
                "bf16": lambda: moe_experts(x, idx, weights, gate_up_bf16, down_bf16),
                "fp8_dequantised": lambda: moe_experts_dequantised(x, idx, weights, gate_up, down, False, scales)}
        if gpu_moe.grouped_usable(x):
            ways["fp8_grouped"] = lambda: moe_experts_triton(x, idx, weights, gate_up, down, False, scales)
            ways["bf16_grouped_triton"] = lambda: moe_experts_triton(x, idx, weights, gate_up_bf16, down_bf16)
        if gpu_moe.FEW_ROWS.usable(x) and rows <= 512:  # past 8 rows too: where reading FP8 a pair beats the rest
            ways["fp8_few_rows"] = lambda: gpu_moe.experts_few_rows(x, idx, weights, gate_up, down, False, scales)
        if rows > 8:  # the grouped kernels' sizes
            ways["fp8_w8a8"] = w8a8(lambda: moe_experts(x, idx, weights, gate_up, down, False, scales))
            difference = ways["fp8_w8a8"]().float() - bf16.float()
            found[f"routed_fp8_w8a8_max_abs_diff_{rows}"] = difference.abs().max().item()
        for name, run in ways.items():
            seconds = seconds_per_call(run, device, 3 if smoke else 20)
            found[f"routed_{name}_bank_us_{rows}"] = seconds * 1e6
            if rows >= 512:
                found[f"routed_{name}_bank_tflops_{rows}"] = 6 * rows * K * D * I / seconds / 1e12
    return found


def dense_fp8(cfg: ModelConfig, device: str, smoke: bool = False) -> dict:
    """A dense linear layer of an FP8 checkpoint kept FP8 as Qwen stores it (DeltaNet's in_proj_qkv
    and in_proj_z fused: 2 key dims + 2 value dims by hidden, 128 x 128 block scales, random)
    through kernels.linear (few-rows kernel up to 8 rows, tiles of rows past them) against bf16
    F.linear over the weight dequantised at load: us a call at 1-4096 rows both ways, GB/s of
    weight read at 1 and 8 rows, TFLOP/s at 512 and 4096, and how far FP8's outputs are from bf16's
    (on a CPU the weight is dequantised for each call: bf16's bits); past 8 rows the same with W8A8
    (fp8_w8a8: the activations in e4m3 too)."""
    import torch.nn.functional as F

    from gpu_slice import fp8_random

    from kernels import Fp8Weight, linear
    from kernels.moe import dequantize_bank

    D = cfg.hidden_size
    keys = cfg.linear_num_key_heads * cfg.linear_key_head_dim
    N = 2 * (keys + cfg.linear_num_value_heads * cfg.linear_value_head_dim)  # q, k, v, z
    block = (128, 128)
    weight, scale = fp8_random((N, D), block, device)
    fp8 = Fp8Weight(weight, scale, block)
    bf16 = dequantize_bank(weight[None], scale[None], block, torch.bfloat16)[0]
    found = {}
    for rows in (1, 16) if smoke else (1, 8, 64, 512, 4096):
        x = torch.randn(rows, D, dtype=torch.bfloat16, device=device)
        difference = linear(x, fp8).float() - F.linear(x, bf16).float()
        found[f"dense_fp8_max_abs_diff_{rows}"] = difference.abs().max().item()
        ways = [("fp8", lambda: linear(x, fp8), weight.nbytes + scale.nbytes),
                ("bf16", lambda: F.linear(x, bf16), bf16.nbytes)]
        if rows > 8:  # the grouped kernel's sizes
            ways.append(("fp8_w8a8", w8a8(lambda: linear(x, fp8)), weight.nbytes + scale.nbytes))
            difference = ways[-1][1]().float() - F.linear(x, bf16).float()
            found[f"dense_fp8_w8a8_max_abs_diff_{rows}"] = difference.abs().max().item()
        for name, run, weight_bytes in ways:
            seconds = seconds_per_call(run, device, 3 if smoke else 50)
            found[f"dense_{name}_us_{rows}"] = seconds * 1e6
            if rows <= 8:
                found[f"dense_{name}_weight_gb_s_{rows}"] = weight_bytes / seconds / 1e9
            if rows >= 512:
                found[f"dense_{name}_tflops_{rows}"] = 2 * rows * N * D / seconds / 1e12
    return found


def dense_tflops(device: str, n: int = 8192) -> float:
    """bf16 TFLOP/s of one n x n x n matmul on random data: the card's attainable matrix rate."""
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    return 2 * n**3 / seconds_per_call(lambda: a @ b, device, 10) / 1e12


def fp8_block_gemm(device: str, tokens: int = 4096, out: int = 4096, inp: int = 4096) -> dict:
    """Qwen's FP8 format on the GPU's FP8 units, a probe (the engine computes in the 16-bit dtype:
    FP8 experts are dequantised in registers or per layer, the dense weights at load): weights in
    128 x 128 blocks (cluster.model.quantization), activations quantised per token in groups of
    128, one torch._scaled_mm with block-wise scales (cuBLAS, sm90, CUDA >= 12.9). Error against
    the dequantised weights in fp32, and TFLOP/s beside a bf16 matmul of the same shape."""
    from cluster.model.quantization import FP8, FP8_MAX, dequantize, quantize

    w = torch.randn(out, inp) / math.sqrt(inp)
    w_fp8, w_scale_inv = (t.to(device) for t in quantize(w, (128, 128)))
    x = torch.randn(tokens, inp, device=device, dtype=torch.bfloat16)
    groups = x.float().view(tokens, inp // 128, 128)
    x_scale_inv = groups.abs().amax(-1).clamp(min=1e-12) / FP8_MAX  # [tokens, inp / 128]
    x_fp8 = (groups / x_scale_inv[..., None]).to(FP8).view(tokens, inp)

    def fp8():  # scales outer-dim major, as cuBLAS's block-wise modes want them
        return torch._scaled_mm(x_fp8, w_fp8.t(), scale_a=x_scale_inv.t().contiguous().t(),
                                scale_b=w_scale_inv.t(), out_dtype=torch.bfloat16)

    w_dequantised = dequantize(w_fp8, w_scale_inv, (128, 128))
    reference = x.float() @ w_dequantised.t()
    error = ((fp8().float() - reference).norm() / reference.norm()).item()
    w_bf16, flops = w_dequantised.to(torch.bfloat16), 2 * tokens * out * inp
    return {"fp8_block_gemm_relative_error": error,
            "fp8_block_gemm_tflops": flops / seconds_per_call(fp8, device, 20) / 1e12,
            "bf16_same_gemm_tflops": flops / seconds_per_call(lambda: x @ w_bf16.t(), device, 20) / 1e12}


def paged_attention(device: str, smoke: bool = False) -> dict:
    """The paged attention of one layer with the flagship's heads (32 query heads over 2 kv heads of
    256; blocks of 16 keys, scattered), bf16: the Triton kernel the engine runs on CUDA
    (kernels.gpu.attention: K/V read in place, decode steps split along the keys) against the
    batched torch version it replaces (every table's blocks gathered, one masked SDPA), on decode
    batches (1 x 32k and 64 x 2k cached keys) and a prefill step (4 x 2048 new rows). Per case: ms
    a call each way and the K/V read rate of the kernel (the bytes of the keys and values it must
    read, once, over its time); and max |diff| between the two."""
    from kernels.gpu import attention as gpu_attention
    from kernels.attention import paged_attention_batched

    Hq, Hkv, hd, S = 32, 2, 256, 16
    cases = {"decode_1x32k": ([1], [32768]), "decode_64x2k": ([1] * 64, [2048] * 64),
             "prefill_4x2k": ([2048] * 4, [0] * 4)}
    if smoke:
        cases = {"decode_1x256": ([1], [256]), "prefill_2x64": ([64] * 2, [0] * 2)}
    found = {}
    for name, (lens, past) in cases.items():
        context = [n + p for n, p in zip(lens, past)]
        width = max(-(-c // S) for c in context)
        num_blocks = sum(-(-c // S) for c in context)
        key_cache, value_cache = (torch.randn(num_blocks, Hkv, S, hd, device=device, dtype=torch.bfloat16)
                                  for _ in range(2))
        blocks = torch.randperm(num_blocks, device=device)
        tables, used = torch.zeros(len(lens), width, dtype=torch.long, device=device), 0
        for i, c in enumerate(context):
            n = -(-c // S)
            tables[i, :n] = blocks[used : used + n]
            used += n
        query = torch.randn(sum(lens), Hq, hd, device=device, dtype=torch.bfloat16)
        starts = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], device=device)
        args = (query, key_cache, value_cache, tables, starts, torch.tensor(context, device=device), hd**-0.5, lens)
        kernel = seconds_per_call(lambda: gpu_attention.paged_attention(*args), device, 20)
        gathered = seconds_per_call(lambda: paged_attention_batched(*args), device, 20)
        diff = (gpu_attention.paged_attention(*args).float() - paged_attention_batched(*args).float()).abs().max()
        kv_bytes = 2 * sum(context) * Hkv * hd * 2
        found |= {f"attention_{name}_triton_ms": kernel * 1e3, f"attention_{name}_gathered_sdpa_ms": gathered * 1e3,
                  f"attention_{name}_speedup": gathered / kernel, f"attention_{name}_kv_tb_s": kv_bytes / kernel / 1e12,
                  f"attention_{name}_max_abs_diff": diff.item()}
    return found


def delta_rule_decode(device: str, smoke: bool = False) -> dict:
    """One Gated DeltaNet layer's decode step with the flagship's heads (16 key heads, 64 value heads
    of 128; fp32 states of 4 MiB a sequence) at batch 64, bf16: the Triton kernel the engine runs on
    CUDA (kernels.gpu.delta_rule: the states read and written once, in place) against
    flash-linear-attention's recurrent kernel with the slots gathered and scattered around it (when
    installed) and the batched torch version. Per way: ms a call and the state bytes it must move
    (one read, one write) over its time; and max |diff| from the Triton kernel."""
    from kernels.delta_rule import delta_rule_decode_reference, gating
    from kernels.gpu import delta_rule as gpu_delta_rule
    from kernels.gpu import fla

    B, Hk, H, d, M = (4, 2, 4, 32, 8) if smoke else (64, 16, 64, 128, 130)
    g = torch.Generator(device=device).manual_seed(7)
    q, k = (torch.randn(B, Hk, d, device=device, generator=g).to(torch.bfloat16) for _ in range(2))
    v = torch.randn(B, H, d, device=device, generator=g).to(torch.bfloat16)
    a, b = (torch.randn(B, H, device=device, generator=g).to(torch.bfloat16) for _ in range(2))
    A_log, dt_bias = (torch.rand(H, device=device).to(torch.bfloat16),
                      torch.randn(H, device=device).to(torch.bfloat16))
    state = 0.1 * torch.randn(M, H, d, d, device=device, generator=g)
    slots = torch.randperm(M, device=device)[:B]
    ways = {"triton": lambda: gpu_delta_rule.decode(q, k, v, a, b, A_log, dt_bias, state, slots, slots),
            "batched_torch": lambda: delta_rule_decode_reference(q, k, v, a, b, A_log, dt_bias, state, slots, slots)}
    if fla.usable(q):
        ways["fla_gathered"] = lambda: fla.decode(q, k, v, *gating(a, b, A_log, dt_bias), state, slots, slots)
    state_bytes = 2 * B * H * d * d * 4
    found, first = {}, None
    for name, run in ways.items():
        saved = state.clone()
        out = run()
        first = out if first is None else first
        found[f"delta_decode_{name}_max_abs_diff"] = (out.float() - first.float()).abs().max().item()
        state.copy_(saved)
        seconds = seconds_per_call(run, device, 20)
        found |= {f"delta_decode_{name}_ms": seconds * 1e3,
                  f"delta_decode_{name}_state_tb_s": state_bytes / seconds / 1e12}
        state.copy_(saved)
    return found
