"""Starting and stopping the Serve application on a Ray cluster (embedded or existing)."""

from __future__ import annotations

import logging
import os
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


def start_server(cfg: AppConfig, grpc_port: int = 9000, http_port: int = 8000, host: str = "127.0.0.1",
                 address: str | None = None, num_cpus: float | None = None, ssl_certfile: str | None = None,
                 ssl_keyfile: str | None = None, views: ClusterViews = ClusterViews(dashboard=False, metrics_port=None)
                 ) -> dict[str, str | None]:
    """address None starts a fresh embedded local Ray cluster; "auto" or an address joins one.
    ssl_certfile / ssl_keyfile: HTTPS on the HTTP proxy (Serve's gRPC proxy has no TLS option:
    terminate TLS for gRPC in front of it, e.g. at a Kubernetes Ingress or Service mesh).
    Returns the cluster's dashboard URL and metrics endpoint (None where there is none)."""
    if not ray.is_initialized():
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a local demo cluster needs no token
        embedded = address is None
        ray.init(address=address or "local", num_cpus=num_cpus, logging_level=logging.WARNING, log_to_driver=False,
                 **(dict(include_dashboard=views.dashboard, dashboard_host=views.dashboard_host,
                         dashboard_port=views.dashboard_port, _metrics_export_port=views.metrics_port)
                    if embedded else {}))
    serve.start(
        http_options=HTTPOptions(host=host, port=http_port, ssl_certfile=ssl_certfile, ssl_keyfile=ssl_keyfile),
        grpc_options=gRPCOptions(port=grpc_port, grpc_servicer_functions=GRPC_SERVICERS),
    )
    serve.run(build_app(cfg), name=APP_NAME, route_prefix="/")
    return cluster_views()


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
