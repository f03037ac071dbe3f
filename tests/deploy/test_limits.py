"""Serve's limits and the engine's queue agree; refusals say when to come back."""

from __future__ import annotations

from cluster import OverloadedError
from deploy.app import model_deployment_options
from deploy.config import AppConfig
from deploy.errors import classify


def test_serve_takes_what_the_engine_holds_and_queues_a_bounded_number(make_checkpoint):
    from tests.deploy.conftest import SERVE_SPEC

    cfg = AppConfig(model=make_checkpoint(SERVE_SPEC), attention_workers=2, max_num_seqs=32, max_waiting=100)
    options = model_deployment_options(cfg)
    assert options["max_ongoing_requests"] == 2 * 32 + 100 and options["max_queued_requests"] == 16
    assert options["backpressure_config"] == {"status_code": 429, "retry_after_s": 1}  # Serve's own refusal
    explicit = cfg.model_copy(update={"max_ongoing_requests": 7, "max_queued_requests": 3})
    assert (model_deployment_options(explicit)["max_ongoing_requests"],
            model_deployment_options(explicit)["max_queued_requests"]) == (7, 3)


def test_backpressure_and_overload_become_429_with_retry_after():
    from ray.serve.exceptions import BackPressureError

    for error in (BackPressureError(num_queued_requests=16, max_queued_requests=16), OverloadedError("full")):
        refusal = classify(error)
        assert refusal.http_status == 429 and refusal.headers == {"Retry-After": "1"}
