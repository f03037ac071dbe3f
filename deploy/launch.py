"""Starting and stopping the Serve application on a Ray cluster (embedded or existing)."""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass

import ray
from ray import serve
from ray.serve.config import HTTPOptions, gRPCOptions

from .app import GRPC_SERVICERS, build_app
from .config import AppConfig

APP_NAME = "epserve"


@dataclass(frozen=True)
class ClusterViews:
    """Where an embedded cluster shows itself: the Ray dashboard and the Prometheus metrics port
    (None: off). Joining a running cluster uses that cluster's own."""

    dashboard: bool = True
    dashboard_host: str = "127.0.0.1"  # 0.0.0.0 shows it to the network: it can stop jobs and actors
    dashboard_port: int = 8265
    metrics_port: int | None = 8080  # KubeRay's metrics-export-port


DIRECT_PORTS = 16  # ports per protocol direct ingress may hand out (a replaced replica takes a fresh one)

# Serve settings read where a cluster's processes start (set here for an embedded cluster, in the
# pods' env on KubeRay): Serve's proxies hand requests to the replicas over gRPC instead of as Ray
# actor calls, which makes relaying every streamed message cheaper (16 streaming clients through
# the default layout: +18% output tok/s here, README).
SERVE_ENV = {"RAY_SERVE_PROXY_USE_GRPC": "1"}


def direct_ingress_env(http_port: int, grpc_port: int) -> dict[str, str]:
    """Ray Serve's direct ingress (an experimental Serve setting, read where its controller starts):
    every ingress replica also serves HTTP and gRPC itself, on ports from http_port + 1 and
    grpc_port + 1 up, next to the head node's proxy on the main ports. A client there skips the
    proxy's relay of every streamed message; nothing balances load between replicas' ports."""
    return {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
            "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(http_port + 1),
            "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(http_port + 1 + DIRECT_PORTS),
            "RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT": str(grpc_port + 1),
            "RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT": str(grpc_port + 1 + DIRECT_PORTS),
            # the 30 s default lets a load balancer deregister a stopping replica; none is in front here
            "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2"}


def direct_ingress_refusal(address: str | None) -> str | None:
    """Why direct ingress cannot be had here (None: it can): it needs the cluster this process starts."""
    if address is not None or ray.is_initialized():
        return ("direct ingress is a setting of the Ray cluster's Serve controller: start an embedded cluster "
                "(no address), or set RAY_SERVE_ENABLE_DIRECT_INGRESS=1 where the cluster starts")
    return None


def start_server(cfg: AppConfig, grpc_port: int = 9000, http_port: int = 8000, host: str = "127.0.0.1",
                 address: str | None = None, num_cpus: float | None = None, ssl_certfile: str | None = None,
                 ssl_keyfile: str | None = None, views: ClusterViews = ClusterViews(dashboard=False, metrics_port=None),
                 direct_ingress: bool = False) -> dict:
    """address None starts a fresh embedded local Ray cluster; "auto" or an address joins one.
    ssl_certfile / ssl_keyfile: HTTPS on the HTTP proxy (Serve's gRPC proxy has no TLS option:
    terminate TLS for gRPC in front of it, e.g. at a Kubernetes Ingress or Service mesh).
    direct_ingress: see direct_ingress_env (embedded clusters only).
    Returns the cluster's dashboard URL and metrics endpoint (None where there is none) and, with
    direct ingress, the replicas' own ports ("direct_http", "direct_grpc")."""
    if direct_ingress:
        refusal = direct_ingress_refusal(address)
        if refusal:
            raise ValueError(refusal)
        os.environ.update(direct_ingress_env(http_port, grpc_port))
    if not ray.is_initialized():
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a local demo cluster needs no token
        embedded = address is None
        if embedded:
            for name, value in SERVE_ENV.items():
                os.environ.setdefault(name, value)  # the caller's own setting wins
        ray.init(address=address or "local", num_cpus=num_cpus, logging_level=logging.WARNING, log_to_driver=False,
                 **(dict(include_dashboard=views.dashboard, dashboard_host=views.dashboard_host,
                         dashboard_port=views.dashboard_port, _metrics_export_port=views.metrics_port)
                    if embedded else {}))
    serve.start(
        http_options=HTTPOptions(host=host, port=http_port, ssl_certfile=ssl_certfile, ssl_keyfile=ssl_keyfile),
        grpc_options=gRPCOptions(port=grpc_port, grpc_servicer_functions=GRPC_SERVICERS),
    )
    serve.run(build_app(cfg), name=APP_NAME, route_prefix="/")
    direct = {name: [port for port in range(first + 1, first + 1 + DIRECT_PORTS) if listening(host, port)]
              for name, first in (("direct_http", http_port), ("direct_grpc", grpc_port)) if direct_ingress}
    return {**cluster_views(), **direct}


def listening(host: str, port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1" if host == "0.0.0.0" else host, port), timeout=0.5):
            return True
    except OSError:
        return False


def cluster_views() -> dict[str, str | None]:
    """The running cluster's dashboard URL and this node's Prometheus endpoint."""
    from ray._private.worker import get_dashboard_url

    dashboard = get_dashboard_url() or None
    here = ray.util.get_node_ip_address()
    node = next((n for n in ray.nodes() if n.get("Alive") and n.get("NodeManagerAddress") == here), None)
    metrics = f"http://{here}:{node['MetricsExportPort']}/metrics" if node and node.get("MetricsExportPort") else None
    return {"dashboard": f"http://{dashboard}" if dashboard and "://" not in dashboard else dashboard,
            "metrics": metrics}


def stop_server(shutdown_ray: bool = True) -> None:
    serve.shutdown()
    if shutdown_ray:
        ray.shutdown()
