"""A second application whose replica runs the model in its own process (`in_process`): the same
answers as the worker-actor server, through the same proxies, with no worker actors."""

from __future__ import annotations

import json
import urllib.request

import pytest

from deploy.client import Client
from tests.deploy.test_access import call

GREEDY = dict(max_tokens=8, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def in_process(server):
    from ray import serve

    from deploy.app import build_app

    cfg = server["config"].model_copy(update={"in_process": True, "expert_workers": 1})
    serve.run(build_app(cfg), name="inproc", route_prefix="/inproc")
    yield {"http": server["http"] + "/inproc", "grpc": server["grpc"], "config": cfg}
    serve.delete("inproc")


def test_in_process_replica_answers_as_the_workers_do(in_process, server):
    from ray import serve

    client = Client(in_process["grpc"], application="inproc")
    try:
        reply = client.generate([5, 6, 7, 8], **GREEDY)
        streamed = [t for m in client.stream([5, 6, 7, 8], **GREEDY) for t in m.token_ids]
        info = client.model_info()
    finally:
        client.close()
    workers = Client(server["grpc"], application="epserve")
    expected = list(workers.generate([5, 6, 7, 8], **GREEDY).token_ids)
    workers.close()
    assert list(reply.token_ids) == expected and streamed == expected
    assert (info.expert_workers, info.attention_workers) == (0, 0)
    body = {"model": "tiny", "prompt": [5, 6, 7, 8], **GREEDY}
    code, completion = call(in_process["http"] + "/v1/completions", body)
    assert code == 200 and completion["usage"]["completion_tokens"] == 8
    req = urllib.request.Request(in_process["http"] + "/v1/completions", headers={"Content-Type": "application/json"},
                                 data=json.dumps({**body, "stream": True}).encode())
    with urllib.request.urlopen(req, timeout=60) as resp:
        events = [line[6:] for line in resp.read().decode().splitlines() if line.startswith("data: ")]
    assert "".join(c["text"] for e in events[:-1] for c in json.loads(e)["choices"]) == completion["choices"][0]["text"]
    # the replica is the worker: one process, no actors beside it
    info = serve.get_deployment_handle("Model", app_name="inproc").worker_info.remote().result(timeout_s=30)
    assert [w["role"] for w in info] == ["local"]


def test_in_process_expert_operations(in_process, server):
    code, status = call(in_process["http"] + "/v1/experts")
    assert code == 200 and status["placement"] is None and status["expert_workers"] == 0
    assert status["load"] and all(len(row) == 16 for row in status["load"])  # per MoE layer, per expert
    code, reply = call(in_process["http"] + "/v1/experts/scale", {"expert_workers": 2}, key=server["admin_key"])
    assert code == 400 and "in process" in reply["error"]["message"]
    code, reply = call(in_process["http"] + "/v1/experts/rebalance", {}, key=server["admin_key"])
    assert code == 200 and reply["bytes_loaded"] == 0


def test_in_process_needs_one_worker_of_each_role(server):
    from pydantic import ValidationError

    from deploy.config import AppConfig

    with pytest.raises(ValidationError, match="in_process runs the model in the replica's own process"):
        AppConfig(**{**server["config"].model_dump(), "in_process": True, "expert_workers": 2})


def test_an_in_process_replica_reserves_the_workers_gpu_and_resources(make_checkpoint):
    from deploy.app import model_deployment_options
    from deploy.config import AppConfig
    from tests.deploy.conftest import SERVE_SPEC

    cfg = AppConfig(model=make_checkpoint(SERVE_SPEC), in_process=True, device="cuda", gpus_per_worker=1,
                    cpus_per_worker=4, replica_cpus=0.5, attention_worker_resources={"gpu_node": 1})
    options = model_deployment_options(cfg)
    assert options["placement_group_bundles"] == [{"CPU": 4.5, "GPU": 1, "gpu_node": 1}]
    assert options["ray_actor_options"] == {"num_cpus": 4.5, "num_gpus": 1, "resources": {"gpu_node": 1}}
    workers = model_deployment_options(cfg.model_copy(update={"in_process": False}))
    assert len(workers["placement_group_bundles"]) == 3 and workers["ray_actor_options"] == {"num_cpus": 0.5}
