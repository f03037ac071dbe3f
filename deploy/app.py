"""The Ray Serve application: `build_app(config) -> Application`, in one of two layouts.

    colocated (default)  Model x N   each replica serves gRPC epserve.v1.Generation + OpenAI HTTP
                                     and runs one model instance: Serve's proxy -> replica
    separate             Ingress (stateless; gRPC + HTTP)  --handle-->  Model x N

A model replica holds one whole model instance: placement group bundles reserve the replica
(bundle 0) and each of its A + E worker actors (bundles 1..), so an instance starts whole or not at
all (`in_process`: the replica runs the model itself, one bundle with the worker's CPUs and GPU);
Serve's autoscaling adds and removes whole instances. Under streaming load every message is
relayed by each process between the engine and the client, and on a small machine those relays
compete with the engine for the cores: the colocated layout has one fewer (measured in the README).

`serve run deploy/serve_config.yaml` or `epserve serve` start it; KubeRay's serveConfigV2 uses the
same import path (`deploy.app:build_app`) and args.
"""

from __future__ import annotations

from ray import serve
from ray.serve import Application

from .config import AppConfig
from .errors import RETRY_AFTER_S
from .ingress import HandleModel, Ingress, LocalModel
from .model_server import ModelServer
from .openai_api import OpenAIRoutes, app

GRPC_SERVICER = "epserve_proto.generation_pb2_grpc.add_GenerationServicer_to_server"
HEALTH_SERVICER = "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server"
GRPC_SERVICERS = [GRPC_SERVICER, HEALTH_SERVICER]


@serve.ingress(app)
class EpserveIngress(OpenAIRoutes, Ingress):
    """gRPC methods from Ingress, HTTP routes from OpenAIRoutes, one replica class (separate layout)."""

    def __init__(self, model_handle, config: dict) -> None:
        super().__init__(HandleModel(model_handle), config)


@serve.ingress(app)
class EpserveModel(OpenAIRoutes, Ingress):
    """The colocated layout's replica: the ingress's routes in front of a ModelServer in-process."""

    def __init__(self, config: dict) -> None:
        self.server = ModelServer(config)
        super().__init__(LocalModel(self.server), config)

    def check_health(self) -> None:
        self.server.check_health()

    # what a deployment handle to the separate layout's model replica also answers (operators, tests)
    def cache_usage(self) -> dict:
        return self.server.cache_usage()

    async def worker_info(self) -> list[dict]:
        return await self.server.worker_info()


def with_device(cfg: AppConfig) -> AppConfig:
    """Resolves device "auto" against the Ray cluster this app is built on (GPUs there: cuda) and
    the GPUs each worker's bundle reserves (1 on cuda, 0 on cpu): the replica and its workers
    then agree on both. Refuses cuda on a cluster without GPUs, and what ClusterConfig refuses
    (fp8_activations on CPUs)."""
    import ray

    from cluster import ClusterConfig

    gpus_available = ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0
    device = ClusterConfig(device=cfg.device, gpus_per_worker=cfg.gpus_per_worker).resolve_device(gpus_available)
    gpus = cfg.gpus_per_worker if cfg.gpus_per_worker is not None else int(device == "cuda")
    ClusterConfig(device=device, gpus_per_worker=gpus, fp8_activations=cfg.fp8_activations)
    return cfg.model_copy(update={"device": device, "gpus_per_worker": gpus})


def model_deployment_options(cfg: AppConfig) -> dict:
    worker = {"CPU": cfg.cpus_per_worker}
    if cfg.gpus_per_worker:
        worker["GPU"] = cfg.gpus_per_worker
    attention = {**worker, **cfg.attention_worker_resources}
    expert = {**worker, **cfg.expert_worker_resources}
    if cfg.in_process:  # the replica is the one worker: its bundle reserves the worker's CPUs, GPU, resources
        replica = {**attention, **cfg.expert_worker_resources, "CPU": cfg.replica_cpus + cfg.cpus_per_worker}
        custom = {k: v for k, v in replica.items() if k not in ("CPU", "GPU")}
        actor = {"num_cpus": replica["CPU"], "num_gpus": replica.get("GPU", 0)}
        if custom:
            actor["resources"] = custom
        bundles = [replica]
    else:
        actor = {"num_cpus": cfg.replica_cpus}
        bundles = [{"CPU": cfg.replica_cpus}] + [attention] * cfg.attention_workers + [expert] * cfg.expert_workers
    options = dict(
        name="Model",
        ray_actor_options=actor,
        placement_group_bundles=bundles,
        placement_group_strategy="PACK",
        max_ongoing_requests=cfg.replica_capacity,  # past it, Serve holds max_queued_requests, then 429
        max_queued_requests=cfg.max_queued_requests,
        # a refusal there reaches HTTP clients as Serve's own response: make it a 429 with Retry-After
        backpressure_config={"status_code": 429, "retry_after_s": RETRY_AFTER_S},
        graceful_shutdown_timeout_s=10,
        # a replica that cannot recover from a lost worker fails check_health; Serve replaces it
        # after a few failed checks (seconds, not the default half minute)
        health_check_period_s=2,
        health_check_timeout_s=10,
    )
    if cfg.min_replicas == cfg.max_replicas:
        options["num_replicas"] = cfg.max_replicas
    else:
        options["autoscaling_config"] = {
            "min_replicas": cfg.min_replicas, "max_replicas": cfg.max_replicas,
            "target_ongoing_requests": cfg.target_ongoing_requests, "upscale_delay_s": cfg.upscale_delay_s,
            "downscale_delay_s": cfg.downscale_delay_s, "metrics_interval_s": cfg.metrics_interval_s,
            "look_back_period_s": cfg.look_back_period_s,
        }
    return options


def build_app(args: dict | AppConfig) -> Application:
    """Validated config in, Serve application out (the builder Serve's import_path points at)."""
    cfg = args if isinstance(args, AppConfig) else AppConfig(**args)
    cfg = with_device(cfg)
    config = cfg.model_dump()
    if cfg.ingress == "colocated":
        return serve.deployment(EpserveModel).options(**model_deployment_options(cfg)).bind(config)
    model = serve.deployment(ModelServer).options(**model_deployment_options(cfg)).bind(config)
    # the ingress only forwards: it takes every request the instances could, several times over,
    # so that refusals come from the instances' limits (429) and not from a queue in front of it
    admitted = 4 * (cfg.replica_capacity + cfg.max_queued_requests) * max(cfg.max_replicas, 1)
    ingress = serve.deployment(EpserveIngress).options(
        name="Ingress", ray_actor_options={"num_cpus": cfg.ingress_cpus},
        max_ongoing_requests=max(1024, admitted), max_queued_requests=max(1024, admitted),
        backpressure_config={"status_code": 429, "retry_after_s": RETRY_AFTER_S},
    )
    return ingress.bind(model, config)
