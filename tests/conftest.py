"""Shared fixtures: tiny random checkpoints written once per test session."""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# Without a GPU, Triton's kernels (kernels.gpu) run through its interpreter: chosen when
# triton is first imported, so before anything imports the kernels
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import cluster  # noqa: E402
from cluster.model.tiny import TinySpec, make_tiny

torch.set_num_threads(min(2, os.cpu_count() or 1))

# The flagship's structure at toy width, and smaller variants for the other shapes.
FLAGSHIP_SHAPE = TinySpec(seed=1)  # 512 experts, top-10, shared expert, 3:1 DeltaNet:attention
FEW_EXPERTS = TinySpec(seed=2, num_experts=8, top_k=2, layers=4)
TIED_FUSED = TinySpec(seed=3, num_experts=16, top_k=4, tie_word_embeddings=True, fused_experts=True)


@pytest.fixture(scope="session")
def make_checkpoint(tmp_path_factory):
    """make_checkpoint(spec) -> directory, written once per distinct spec."""
    made: dict[TinySpec, str] = {}

    def make(spec: TinySpec) -> str:
        if spec not in made:
            made[spec] = str(make_tiny(tmp_path_factory.mktemp("ckpt"), spec))
        return made[spec]

    return make


@pytest.fixture
def gpu_kernels_on_cpu(monkeypatch) -> set[str]:
    """kernels.gpu's Triton kernels run wherever a GPU would run them, here on CPU tensors through
    Triton's interpreter (the C++ kernels off; the few-rows, grouped and dense FP8 kernels allowed fp32,
    the parity dtype): returns the set of the ops launched, filled as they launch."""
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("a GPU is here: tests/cuda/test_engine.py runs the engine through the compiled kernels")
    from kernels import backend
    from kernels.gpu import moe as gpu_moe
    from kernels.gpu.triton_guard import TritonOp

    launched: set[str] = set()
    launch = TritonOp.launch

    def on_any_device(op: TritonOp, device: torch.device, dtype: torch.dtype) -> bool:
        return op.unavailable is None and dtype in op.dtypes

    def recorded(op: TritonOp, run, *args):
        launched.add(op.name)
        return launch(op, run, *args)

    monkeypatch.setattr(backend, "_cpu_kernels", False)
    monkeypatch.setattr(TritonOp, "usable_for", on_any_device)
    monkeypatch.setattr(TritonOp, "launch", recorded)
    monkeypatch.setattr(gpu_moe.FEW_ROWS, "dtypes", (torch.float32,))
    monkeypatch.setattr(gpu_moe.GROUPED, "dtypes", (torch.float32,))
    monkeypatch.setattr(gpu_moe.DENSE_FP8, "dtypes", (torch.float32,))
    return launched


@pytest.fixture(scope="session")
def trained_checkpoint(tmp_path_factory) -> Path:
    """`epserve make-tiny --train` for 6 seconds on epserve's own source (16 experts, hidden 64)."""
    out = tmp_path_factory.mktemp("trained") / "m"
    run = subprocess.run(
        [sys.executable, "-m", "deploy.cli", "make-tiny", str(out), "--train", "--train-minutes", "0.1",
         "--corpus", str(Path(cluster.__file__).parent), "--num-experts", "16", "--top-k", "4", "--hidden", "64"],
        capture_output=True, text=True, check=True)
    assert "training [" in run.stderr and "loss" in run.stdout, (run.stdout, run.stderr)
    return out


def free_port() -> int:
    """A port free on every interface now, below the kernel's ephemeral range (32768-60999) and
    above Ray's worker ports (10002-19999), so no process of the Ray cluster a test starts takes it
    before the server binds it (seen once: Serve's gRPC proxy failing to bind an ephemeral one)."""
    family, host = (socket.AF_INET6, "::") if socket.has_ipv6 else (socket.AF_INET, "0.0.0.0")
    for port in random.Random().sample(range(20000, 32000), 200):
        with socket.socket(family) as s:  # [::] as Serve's proxies bind (IPv4 included)
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 20000-32000")


def worker_processes(*roles: str) -> list[str]:
    """Command lines of live processes of these Ray actor classes (default: both worker roles)."""
    roles = roles or ("AttentionWorker", "ExpertWorker")
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    return [line for line in ps.splitlines() if any(role in line for role in roles)]


METRICS_PORT = free_port()  # Ray's Prometheus endpoint for this test session


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """One local Ray cluster for the whole test session (start-up costs seconds)."""
    ray = pytest.importorskip("ray")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    from deploy.launch import SERVE_ENV

    for name, value in SERVE_ENV.items():  # as `epserve serve` starts its cluster
        os.environ.setdefault(name, value)
    ray.init(
        num_cpus=4,  # logical: fractional actors of several model instances on 2 cores
        include_dashboard=False,
        logging_level="ERROR",
        log_to_driver=False,  # actor logs (expected request errors) would flood the test output
        _temp_dir=str(tmp_path_factory.mktemp("ray")),
        object_store_memory=200 * 2**20,
        _metrics_export_port=METRICS_PORT,
    )
    yield ray
    ray.shutdown()
