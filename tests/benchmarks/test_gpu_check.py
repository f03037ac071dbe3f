"""benchmarks/gpu_check.py is run on a lent GPU in one shot: it must not break on the way there."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_runs_end_to_end_at_smoke_size(tmp_path):
    out = tmp_path / "figures.json"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--smoke", "--json", str(out)],
                            capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert figures["bf16_within_tolerance"] is True and 0.5 < figures["bf16_top1_agreement"] <= 1
    for key in ("decode_tok_s_batch1", "decode_tok_s_batch64", "prefill_tok_s", "grouped_gemm_tflops_512",
                "fraction_of_copy_bandwidth"):
        assert figures[key] > 0, key


def test_the_fusion_experiments_ops_match_the_references():
    """gpu_check's fused_ops (run on a GPU against the engine) compute what the ops they replace
    compute: checked here on CPU tensors, ragged conv steps falling back to the batched form."""
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from gpu_check import fused_ops
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))

    import kernels.attention as attention_module
    import kernels.conv as conv_module
    import kernels.norms as norms_module

    ops = {name: fn for (_, name), fn in fused_ops().items()}
    g = torch.Generator().manual_seed(5)
    for dtype, tolerance in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        x, z = (torch.randn(7, 3, 64, generator=g).to(dtype) for _ in range(2))
        w = (0.1 * torch.randn(64, generator=g)).to(dtype)
        assert torch.allclose(ops["rms_norm_reference"](x, w, 1e-6).float(),
                              norms_module.rms_norm_reference(x, w, 1e-6).float(), atol=tolerance, rtol=tolerance)
        assert torch.allclose(ops["gated_rms_norm_reference"](x, z, w + 1, 1e-6).float(),
                              norms_module.gated_rms_norm_reference(x, z, w + 1, 1e-6).float(), atol=tolerance,
                              rtol=tolerance)
        assert attention_module.rms_norm_reference is norms_module.rms_norm_reference  # the one both patch
        C, K, M = 48, 4, 9
        weight = torch.randn(C, K, generator=g).to(dtype)
        for lens in ([1, 1, 1], [1, 5, 2]):
            x = torch.randn(sum(lens), C, generator=g).to(dtype)
            state = torch.randn(M, K - 1, C, generator=g).to(dtype)
            slots, out_slots = torch.tensor([4, 0, 7]), torch.tensor([1, 2, 3])
            query_start = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()])
            fast_state, ref_state = state.clone(), state.clone()
            fast = ops["causal_conv1d_batched"](x, weight, fast_state, slots, query_start, lens, out_slots)
            ref = conv_module.causal_conv1d_reference(x, weight, ref_state, slots, query_start, lens, out_slots)
            assert torch.allclose(fast.float(), ref.float(), atol=tolerance, rtol=tolerance)
            assert torch.allclose(fast_state.float(), ref_state.float())
