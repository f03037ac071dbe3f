"""The `epserve` command line, run as a user would."""

from __future__ import annotations

import subprocess
import sys

from cluster import LLM, SamplingParams


def test_make_tiny_then_generate(tmp_path):
    model_dir = tmp_path / "m"
    subprocess.run(
        [sys.executable, "-m", "deploy.cli", "make-tiny", str(model_dir), "--num-experts", "16",
         "--top-k", "4", "--layers", "4", "--hidden", "64", "--fused-experts", "--seed", "3"],
        check=True,
    )
    llm = LLM(model=model_dir)
    assert llm.config.num_experts == 16 and llm.config.hidden_size == 64
    out = llm.generate(["hello"], SamplingParams(max_tokens=4))
    assert len(out[0].token_ids) >= 1



def test_demo_prefers_a_trained_model(tmp_path, monkeypatch):
    from deploy import cli

    random_dir, trained_dir = tmp_path / "tiny-qwen35", tmp_path / "tiny-trained"
    monkeypatch.setattr(cli, "DEFAULT_DEMO_DIR", random_dir)
    monkeypatch.setattr(cli, "DEFAULT_TRAINED_DIR", trained_dir)
    random_dir.mkdir()
    (random_dir / "config.json").write_text("{}")
    assert cli.ensure_demo_model(random_dir) == random_dir
    trained_dir.mkdir()
    (trained_dir / "config.json").write_text("{}")
    assert cli.ensure_demo_model(random_dir) == trained_dir
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text("{}")
    assert cli.ensure_demo_model(other) == other  # --model wins


def test_epserve_plan_of_the_flagship_fits_refuses_and_counts_narrow_kv(capsys):
    """The README's memory plan: 2 attention + 8 expert workers on 141 GiB devices; fp8 K/V doubles
    the blocks of the same budget; 80 GiB devices cannot hold 8 expert workers' bf16 experts, but
    can their FP8 ones."""
    from deploy.cli import main

    flagship = ["plan", "--expert-workers", "8", "--attention-workers", "2", "--kv-cache-memory-mb", "40000",
                "--max-num-seqs", "64", "--max-num-batched-tokens", "8192"]
    assert main([*flagship, "--device-gib", "141"]) == 0
    out = capsys.readouterr().out
    assert "60325 KV blocks" in out and "expert        90.00" in out and "fits a 141 GiB device" in out
    assert main([*flagship, "--device-gib", "141", "--kv-cache-dtype", "fp8_e5m2"]) == 0
    assert "120650 KV blocks" in capsys.readouterr().out
    assert main([*flagship, "--device-gib", "80"]) == 1
    out = capsys.readouterr().out
    assert "does not fit: the expert worker needs 90.63 GiB on a 80 GiB device" in out
    assert main([*flagship, "--device-gib", "80", "--fp8"]) == 0  # FP8 experts: a byte a weight and scales
    out = capsys.readouterr().out
    # as Qwen's release: 45 DeltaNet layers' qkv, z, out; 15 attention layers' q, k, v, o; 60 shared experts x 3
    assert "experts and 375 dense linear layers FP8 (128x128 blocks)" in out and "fits a 80 GiB" in out
    assert "attention     11.16     27.61     11.45     11.45      2.50     64.18" in out
    assert "expert        45.01      0.00      0.00      0.00      0.63     45.64" in out  # no dequantised copy


def test_epserve_plan_of_an_fp8_checkpoint_counts_the_layers_it_stores_fp8(make_checkpoint, tmp_path, capsys):
    """`--model`: the checkpoint says which tensors are FP8 (safetensors headers): 3 DeltaNet layers'
    qkv, z, out, an attention layer's q, k, v, o and 4 shared experts' gate, up, down; DeltaNet's b
    and a stay as Qwen stores them, unquantized."""
    from cluster.model.quantization import write_fp8_checkpoint
    from deploy.cli import main
    from tests.conftest import FEW_EXPERTS

    write_fp8_checkpoint(make_checkpoint(FEW_EXPERTS), tmp_path / "fp8")
    assert main(["plan", "--model", str(tmp_path / "fp8"), "--dtype", "bfloat16", "--device-gib", "1",
                 "--kv-cache-memory-mb", "64"]) == 0
    assert "experts and 25 dense linear layers FP8 (128x128 blocks)" in capsys.readouterr().out


def test_serve_fp8_activations_reach_the_instances_and_are_refused_on_cpus(make_checkpoint, monkeypatch):
    """`epserve serve --fp8-activations`: the app's config and each instance's ClusterConfig carry it;
    with the workers on CPUs the app is refused before anything starts."""
    import pytest

    from cluster import ConfigError
    from deploy import launch
    from deploy.app import with_device
    from deploy.cli import main
    from deploy.model_server import cluster_config
    from tests.conftest import FEW_EXPERTS

    started = []  # the app's config as `serve` hands it to the server, which resolves the device first
    monkeypatch.setattr(launch, "start_server", lambda cfg, *args, **kwargs: started.append(cfg) or with_device(cfg))
    with pytest.raises(ConfigError, match="fp8_activations needs GPUs"):
        main(["serve", "--model", make_checkpoint(FEW_EXPERTS), "--fp8-activations", "--device", "cpu"])
    [cfg] = started
    assert cfg.fp8_activations and cluster_config(cfg.model_copy(update={"device": "cuda"})).fp8_activations
