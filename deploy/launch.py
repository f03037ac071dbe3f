"""Starting and stopping the Serve application on a Ray cluster (embedded or existing)."""

from __future__ import annotations

import logging
import os

import ray
from ray import serve
from ray.serve.config import HTTPOptions, gRPCOptions

from .app import GRPC_SERVICERS, build_app
from .config import AppConfig

APP_NAME = "epserve"


def start_server(cfg: AppConfig, grpc_port: int = 9000, http_port: int = 8000, host: str = "127.0.0.1",
                 address: str | None = None, num_cpus: float | None = None, ssl_certfile: str | None = None,
                 ssl_keyfile: str | None = None) -> None:
    """address None starts a fresh embedded local Ray cluster; "auto" or an address joins one.
    ssl_certfile / ssl_keyfile: HTTPS on the HTTP proxy (Serve's gRPC proxy has no TLS option:
    terminate TLS for gRPC in front of it, e.g. at a Kubernetes Ingress or Service mesh)."""
    if not ray.is_initialized():
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a local demo cluster needs no token
        ray.init(address=address or "local", num_cpus=num_cpus, include_dashboard=False,
                 logging_level=logging.WARNING, log_to_driver=False)
    serve.start(
        http_options=HTTPOptions(host=host, port=http_port, ssl_certfile=ssl_certfile, ssl_keyfile=ssl_keyfile),
        grpc_options=gRPCOptions(port=grpc_port, grpc_servicer_functions=GRPC_SERVICERS),
    )
    serve.run(build_app(cfg), name=APP_NAME, route_prefix="/")


def stop_server(shutdown_ray: bool = True) -> None:
    serve.shutdown()
    if shutdown_ray:
        ray.shutdown()
