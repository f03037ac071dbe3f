"""One Serve application for the deploy tests, on the session's Ray cluster, on loopback ports."""

from __future__ import annotations

import pytest

from cluster import LLM
from cluster.model.tiny import TinySpec
from deploy.client import Client
from deploy.config import AppConfig
from tests.conftest import free_port

SERVE_SPEC = TinySpec(seed=11, num_experts=16, top_k=4, mtp=True, multimodal=True)  # images too
SPECULATIVE = {"method": "mtp", "num_speculative_tokens": 2}  # the server speculates: every test goes through it
ADMIN_KEY = "admin-key-for-tests"  # rebalance / scale are refused on a server without one


@pytest.fixture(scope="session")
def server(ray_cluster, make_checkpoint):
    from ray import serve

    from deploy.launch import start_server

    model_dir = make_checkpoint(SERVE_SPEC)
    cfg = AppConfig(model=model_dir, served_model_name="tiny", expert_workers=2, attention_workers=1,
                    max_num_seqs=4, max_waiting=4, max_model_len=256, max_tokens_limit=128,
                    max_ongoing_requests=64,  # above what the engine holds: its own refusals are tested
                    metrics_interval_steps=5, admin_api_keys=[ADMIN_KEY],
                    speculative_tokens=SPECULATIVE["num_speculative_tokens"],
                    max_images_per_request=2, max_image_pixels=500_000,
                    image_url_hosts=["127.0.0.1"])  # tests/deploy/test_images.py's image host
    grpc_port, http_port = free_port(), free_port()
    start_server(cfg, grpc_port=grpc_port, http_port=http_port)
    yield {"grpc": f"127.0.0.1:{grpc_port}", "http": f"http://127.0.0.1:{http_port}", "config": cfg,
           "model_dir": model_dir, "admin_key": ADMIN_KEY}
    serve.shutdown()


@pytest.fixture(scope="session")
def client(server):
    c = Client(server["grpc"])
    yield c
    c.close()


@pytest.fixture(scope="session")
def offline(server):
    return LLM(model=server["model_dir"], speculative_config=SPECULATIVE)  # seeded draws as the server's
