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
                "routed_experts_tflops_512", "routed_experts_grouped_tflops_512", "fraction_of_copy_bandwidth"):
        assert figures[key] > 0, key
    assert figures["routed_experts_path_512"] == "grouped"  # the padded path: GPUs only
    # FP8 experts dequantised for the GEMMs (all a CPU does): the bits of the bf16 bank
    assert figures["routed_fp8_dequantised_same_bits_16"] is True and figures["routed_fp8_max_abs_diff_16"] == 0
    assert figures["dense_fp8_max_abs_diff_16"] == 0 and figures["dense_fp8_us_16"] > 0  # dense ones too
    # W8A8 asked for: on a CPU nothing stays FP8, so nothing changes
    assert figures["routed_fp8_w8a8_max_abs_diff_16"] == 0 and figures["dense_fp8_w8a8_max_abs_diff_16"] == 0
    assert figures["routed_fp8_w8a8_bank_us_16"] > 0 and figures["dense_fp8_w8a8_us_16"] > 0
    assert figures["fp8_prefill_tok_s"] > 0 and figures["fp8_w8a8_prefill_tok_s"] > 0
    assert figures["fp8_decode_tok_s_batch64"] > 0 and "fp8_decode_error" not in figures  # the FP8 slice's decode


def test_gpu_check_runs_the_sections_asked_for(tmp_path):
    """--sections: a short device run can take the parts it needs; an unknown name is refused, named."""
    out = tmp_path / "figures.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--smoke", "--json", str(out)]
    result = subprocess.run([*command, "--sections", "grouped_gemm"], capture_output=True, text=True, timeout=300,
                            cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert figures["grouped_gemm_tflops_512"] > 0 and "decode_tok_s_batch1" not in figures
    refused = subprocess.run([*command, "--sections", "grouped_gemm,decode"], capture_output=True, text=True,
                             timeout=300, cwd=ROOT)
    assert refused.returncode == 2 and "no section decode" in refused.stderr
