"""Operating the Serve application through its proxies (after test_server.py's requests, on the
same server): the README's demo, the experts API and CLI (heatmap, rebalance, scale), health and
reflection, an expert worker killed mid-stream, Prometheus metrics, autoscaling, the HTTP bench."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest

from cluster import SamplingParams
from deploy.client import Client
from tests.conftest import free_port
from tests.deploy.test_server import GREEDY, post

def test_readme_demo_command(server, trained_checkpoint):
    """`epserve demo` end to end, twice side by side, each in its own process and embedded Ray
    cluster: a random model gets a chat; a trained one a completion, sampled, with MTP speculative
    decoding."""
    models = {"random": ["--model", server["model_dir"]],
              "trained": ["--model", str(trained_checkpoint), "--speculative-tokens", "2"]}
    demos = {model: subprocess.Popen(
        [sys.executable, "-m", "deploy.cli", "demo", *extra, "--grpc-port", str(free_port()),
         "--http-port", str(free_port()), "--max-tokens", "4"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for model, extra in models.items()}
    try:
        outputs = {model: demo.communicate(timeout=300) for model, demo in demos.items()}
    finally:
        for demo in demos.values():
            demo.kill()
    for model, (stdout, stderr) in outputs.items():
        assert demos[model].returncode == 0, (model, stderr[-3000:])
        assert "gRPC Generate:" in stdout
    assert "HTTP /v1/chat/completions:" in outputs["random"][0] and "weights are random" in outputs["random"][0]
    assert "HTTP /v1/completions:" in outputs["trained"][0] and "trained for minutes" in outputs["trained"][0]


def get(server, path: str) -> dict:
    with urllib.request.urlopen(server["http"] + path, timeout=60) as resp:
        return json.loads(resp.read())


def test_experts_api_cli_heatmap_rebalance_and_scale(server, client, offline, tmp_path):
    client.generate(list(range(5, 60)), max_tokens=16, ignore_eos=True)  # some load in the window
    status = get(server, "/v1/experts")
    # 4 decoder layers and the MTP layer (the server speculates): each MoE layer placed and counted
    assert status["expert_workers"] == 2 and len(status["load"]) == 5 and len(status["load"][0]) == 16
    assert sum(map(sum, status["load"])) > 0 and sum(status["load"][4]) > 0
    assert sorted(e for ids in status["placement"][0] for e in ids) == list(range(16))
    result = subprocess.run(
        [sys.executable, "-m", "deploy.cli", "experts", "--url", server["http"], "--heatmap",
         str(tmp_path / "load.png"), "--rebalance", "--admin-api-key", server["admin_key"]],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "before: 2 expert workers" in result.stdout and "after: 2 expert workers" in result.stdout
    assert (tmp_path / "load.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # before and after in one
    ratios = status["worker_load_vs_mean"]  # the picture's numbers, in the API
    assert len(ratios) == 5 and all(len(r) == 2 and abs(sum(r) - 2) < 1e-9 for r in ratios)
    assert max(max(r) for r in ratios) == pytest.approx(max(
        max(w) / (sum(w) / 2) for w in status["worker_load"]))
    code, reply = post(server, "/v1/experts/scale", {"expert_workers": 2})  # no admin key
    assert code == 403 and "admin API key" in reply["error"]["message"]
    code, reply = post(server, "/v1/experts/rebalance", {}, key="not-the-admin-key")
    assert code == 403 and reply["error"]["type"] == "permission_error"
    code, reply = post(server, "/v1/experts/scale", {"expert_workers": 0}, key=server["admin_key"])
    assert code == 400 and "expert_workers must be in 1..16" in reply["error"]["message"]
    expected = offline.generate([[9, 8, 7]], SamplingParams(**GREEDY))[0].token_ids
    for workers in (3, 2):
        code, reply = post(server, "/v1/experts/scale", {"expert_workers": workers}, key=server["admin_key"])
        assert code == 200 and get(server, "/v1/experts")["expert_workers"] == workers
        assert list(client.generate([9, 8, 7], **GREEDY).token_ids) == expected


def test_grpc_health_and_reflection(server):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    channel = grpc.insecure_channel(server["grpc"])
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "epserve.v1.Generation"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=30)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as info:
        health.Check(health_pb2.HealthCheckRequest(service="nope.v1.Nothing"), timeout=30)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    services = ProtoReflectionDescriptorDatabase(channel).get_services()
    assert "epserve.v1.Generation" in services and "grpc.health.v1.Health" in services
    channel.close()


def test_expert_worker_killed_mid_grpc_stream(server, client, offline):
    """End to end: the stream goes on with the undisturbed tokens, the instance serves on with a
    replacement folded in, health says SERVING again."""
    import os
    import signal

    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from ray import serve

    model = serve.get_deployment_handle("Model", app_name="epserve")
    [*_, pid] = [w["pid"] for w in model.worker_info.remote().result(timeout_s=30) if w["role"] == "expert"]
    params = dict(max_tokens=48, temperature=0.0, ignore_eos=True)
    expected = offline.generate([[7, 3, 9]], SamplingParams(**params))[0].token_ids
    tokens = []
    for message in client.stream([7, 3, 9], **params):
        if not tokens:
            os.kill(pid, signal.SIGKILL)
        tokens += message.token_ids
    assert tokens == expected
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(server["grpc"]))
    deadline = time.time() + 30
    while health.Check(health_pb2.HealthCheckRequest(service=""), timeout=30).status != \
            health_pb2.HealthCheckResponse.SERVING:
        assert time.time() < deadline, "the instance never reported SERVING again"
        time.sleep(0.2)
    while len([w for w in model.worker_info.remote().result(timeout_s=30) if w["role"] == "expert"]) < 2:
        assert time.time() < deadline, "the replacement expert worker was never folded in"
        time.sleep(0.2)
    assert list(client.generate([7, 3, 9], **params).token_ids) == expected


METRICS = [
    "ray_epserve_requests_total", "ray_epserve_prompt_tokens_total", "ray_epserve_generated_tokens_total",
    "ray_epserve_waiting_requests", "ray_epserve_running_sequences", "ray_epserve_kv_cache_usage",
    "ray_epserve_state_slot_usage", "ray_epserve_time_to_first_token_seconds_bucket",
    "ray_epserve_time_per_output_token_seconds_bucket", "ray_epserve_step_phase_seconds",
    "ray_epserve_expert_load_imbalance", "ray_epserve_expert_hottest_share", "ray_epserve_expert_worker_load",
    # from the worker killed above
    "ray_epserve_worker_failures_total", "ray_epserve_recoveries_total", "ray_epserve_replayed_steps_total",
    "ray_epserve_recovery_seconds_bucket",
    # the server speculates (tests/deploy/conftest.py); accepted tokens count only once one is accepted
    "ray_epserve_spec_draft_tokens_total", "ray_epserve_spec_verify_steps_total",
    "ray_epserve_spec_accepted_length_bucket",
]


def test_prometheus_endpoint_has_the_engine_metrics(server, client):
    from tests.conftest import METRICS_PORT

    for i in range(12):  # enough steps for the every-5-steps phase and load gauges
        client.generate([5 + i, 6], max_tokens=4, ignore_eos=True)
    with pytest.raises(grpc.RpcError):
        client.generate("", max_tokens=4)
    deadline, text = time.time() + 40, ""
    while time.time() < deadline:
        text = urllib.request.urlopen(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=10).read().decode()
        if all(name in text for name in METRICS):
            break
        time.sleep(1)
    missing = [name for name in METRICS if name not in text]
    assert not missing
    # every series the Grafana dashboard queries is one this server exports
    dashboard = json.loads((Path(__file__).parents[2] / "deploy" / "grafana" / "epserve.json").read_text())
    queried = {name for p in dashboard["panels"] for t in p["targets"] for name in re.findall(r"ray_epserve_\w+", t["expr"])}
    assert len(queried) >= 15 and not sorted(name for name in queried if name not in text)
    assert re.search(r'ray_epserve_requests_total\{[^}]*outcome="length"', text)
    assert re.search(r'ray_epserve_step_phase_seconds\{[^}]*phase="dispatch"', text)


def test_autoscaling_adds_and_removes_whole_instances(server):
    """A second application with fast autoscaling settings: load brings a second model instance
    (its replica and 3 worker actors), idleness takes it away. Runs last: it adds an application."""
    from ray import serve

    from deploy.app import build_app

    cfg = server["config"].model_copy(update=dict(
        min_replicas=1, max_replicas=2, target_ongoing_requests=1, upscale_delay_s=0.5, downscale_delay_s=2,
        metrics_interval_s=0.5, look_back_period_s=1, max_waiting=16, max_num_seqs=8))
    serve.run(build_app(cfg), name="scale", route_prefix="/scale")
    client = Client(server["grpc"], application="scale")  # two applications: name the one meant

    def running_replicas() -> int:
        return serve.status().applications["scale"].deployments["Model"].replica_states.get("RUNNING", 0)

    def load(i):  # through the proxy and the ingress, whose handle reports the ongoing requests
        while not stop.is_set():
            for _ in client.stream([5 + i], max_tokens=100, ignore_eos=True):
                if stop.is_set():
                    break

    stop = threading.Event()
    threads = [threading.Thread(target=load, args=(i,)) for i in range(6)]
    try:
        assert running_replicas() == 1
        for t in threads:
            t.start()
        deadline = time.time() + 120
        while running_replicas() < 2 and time.time() < deadline:
            time.sleep(0.5)
        scaled_up = running_replicas()
        stop.set()
        for t in threads:
            t.join(timeout=120)
        deadline = time.time() + 120
        while running_replicas() > 1 and time.time() < deadline:
            time.sleep(0.5)
        assert scaled_up == 2 and running_replicas() == 1
    finally:
        stop.set()
        client.close()
        serve.delete("scale")


def test_http_bench_needs_no_grpc(server, capsys):
    """`epserve bench --endpoint http --http-url URL` loads any OpenAI-compatible server: the gRPC
    address given here answers nothing."""
    from deploy.cli import main

    assert main(["bench", "--endpoint", "http", "--http-url", server["http"], "--address", "127.0.0.1:1",
                 "--concurrency", "2", "--num-prompts", "4", "--prompt-len", "6", "--output-len", "4",
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["failed"] == 0 and result["num_prompts"] == 4 and result["output_tokens_per_s"] > 0
