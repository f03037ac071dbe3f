"""AppConfig: everything `build_app` needs, validated with messages that name the bad field."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


KV_CACHE_DTYPES = ("auto", "bfloat16", "fp8_e5m2", "fp8_e4m3")  # CacheConfig.kv_cache_dtype's choices (the Literal below)
DTYPES = ("auto", "float32", "bfloat16", "float16")  # cluster.config.DTYPES (the Literal below)


class AppConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str = Field(description="checkpoint directory in Hugging Face format (config.json, safetensors)")
    served_model_name: str | None = Field(None, description="name clients send; default: the directory name")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="weights and activations; auto: the dtype the checkpoint was saved in")
    device: Literal["auto", "cuda", "cpu"] = Field(
        "auto", description="where the workers run; auto: cuda when the Ray cluster has GPUs")
    # one model instance = one Serve replica of the model deployment
    in_process: bool = Field(
        False, description="the model replica runs the model itself (one process: the dense layers and every "
        "expert; CUDA graphs on a GPU) instead of in worker actors; needs expert_workers = attention_workers = 1")
    expert_workers: int = Field(1, ge=1, description="expert-worker actors per model instance")
    attention_workers: int = Field(1, ge=1, description="attention-worker actors per model instance")
    cpus_per_worker: float = Field(0.25, gt=0, description="CPUs reserved per worker actor (or for the model "
                                   "with in_process), rounded (at least 1): the worker's torch threads")
    gpus_per_worker: int | None = Field(None, ge=0, description="GPUs per worker (whole); default 1 on cuda, else 0")
    replica_cpus: float = Field(0.1, gt=0, description="CPUs of the model replica itself (engine, scheduler)")
    attention_worker_resources: dict[str, float] = Field(
        default_factory=dict, description="custom Ray resources per attention worker (node-group steering)")
    expert_worker_resources: dict[str, float] = Field(
        default_factory=dict, description="custom Ray resources per expert worker (node-group steering)")
    # the engine
    max_num_seqs: int = Field(32, ge=1, description="running sequences per attention worker")
    max_num_batched_tokens: int = Field(256, ge=1, description="tokens per engine step")
    max_waiting: int = Field(256, ge=1, description="queued requests per instance before RESOURCE_EXHAUSTED / 429")
    max_model_len: int | None = Field(None, ge=2, description="context length; default the model's")
    kv_cache_memory_mb: float = Field(512, gt=0, description="KV blocks + DeltaNet state per attention worker")
    kv_cache_dtype: Literal["auto", "bfloat16", "fp8_e5m2", "fp8_e4m3"] = Field(
        "auto", description="how K/V are stored: auto = the model's dtype; narrower holds more tokens, rounded")
    fp8_activations: bool = Field(False, description="an FP8 checkpoint on GPUs with e4m3 (sm_89+): GEMMs past "
                                  "the few-rows kernels quantize their activations to e4m3 too and multiply FP8 x "
                                  "FP8 (W8A8); off: weights dequantised in registers (W8A16)")
    max_tokens_limit: int = Field(4096, ge=1, description="largest max_tokens a request may ask for")
    stream_interval: int = Field(1, ge=1, description="tokens per streamed message after the first (vLLM's "
                                 "--stream-interval): fewer, larger messages through Serve under load")
    speculative_tokens: int = Field(0, ge=0, le=3, description="MTP speculative decoding: tokens drafted per "
                                    "step by the checkpoint's MTP module (0: off)")
    speculative_max_batch: int = Field(8, ge=1, description="decoding sequences per attention worker above "
                                       "which speculation switches itself off")
    # images (checkpoints with a vision tower)
    max_images_per_request: int = Field(4, ge=0, description="images one request may carry")
    max_image_bytes: int = Field(20 * 2**20, ge=1, description="encoded size of one image")
    max_image_pixels: int = Field(40_000_000, ge=1, description="decoded width x height of one image (before "
                                  "resizing); larger ones are refused unread")
    allow_image_urls: bool = Field(False, description="fetch http(s) image_url parts (off: data URLs only)")
    image_url_hosts: list[str] = Field(default_factory=list, description="the only hosts image URLs (and their "
                                       "redirects) may name, fetching on for them; empty: any host where "
                                       "allow_image_urls")
    # access
    api_keys: list[str] = Field(default_factory=list, description="Bearer keys every request but health needs")
    admin_api_keys: list[str] = Field(default_factory=list,
                                      description="Bearer keys for rebalance / scale (refused when empty)")
    # expert placement
    rebalance: bool = Field(True, description="move hot experts between expert workers as load changes")
    rebalance_interval_steps: int = Field(200, ge=1, description="engine steps between load checks")
    rebalance_threshold: float = Field(1.25, ge=1, description="rebalance above this max/mean worker load")
    redundant_expert_slots: int | None = Field(None, ge=0, description="replicas per layer; default E/16")
    metrics_interval_steps: int = Field(50, ge=1, description="engine steps between step-phase / load metrics")
    # Serve
    max_ongoing_requests: int | None = Field(
        None, ge=1, description="requests Serve sends one model replica; default what its engine holds: "
                                "max_num_seqs x attention_workers running + max_waiting queued")
    max_queued_requests: int = Field(
        16, ge=1, description="requests Serve holds while every replica is full; past them: 429 / RESOURCE_EXHAUSTED")
    min_replicas: int = Field(1, ge=0, description="autoscaling: fewest model instances")
    max_replicas: int = Field(1, ge=1, description="autoscaling: most model instances")
    target_ongoing_requests: float = Field(16, gt=0, description="autoscaling: requests per instance to aim at")
    upscale_delay_s: float = Field(30, ge=0)
    downscale_delay_s: float = Field(600, ge=0)
    metrics_interval_s: float = Field(10, gt=0)
    look_back_period_s: float = Field(30, gt=0)
    ingress: Literal["colocated", "separate"] = Field(
        "colocated", description="colocated: each model replica serves HTTP and gRPC itself (Serve's proxy "
        "-> replica); separate: a stateless ingress deployment in front of the model replicas (proxy -> "
        "ingress -> replica: one more relay of every streamed message, preprocessing off the engine's process)")
    ingress_cpus: float = Field(0.1, gt=0, description="CPUs of each ingress replica (separate ingress)")

    @field_validator("model")
    @classmethod
    def _expand(cls, value: str) -> str:
        return str(Path(value).expanduser())

    @model_validator(mode="after")
    def _check(self) -> AppConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) > max_replicas ({self.max_replicas})")
        if self.in_process and (self.expert_workers > 1 or self.attention_workers > 1):
            raise ValueError(f"in_process runs the model in the replica's own process: expert_workers and "
                             f"attention_workers must be 1, got {self.expert_workers} and {self.attention_workers}")
        if not (Path(self.model) / "config.json").is_file():
            raise ValueError(f"model: no config.json in {self.model!r}")
        return self

    @property
    def replica_capacity(self) -> int:
        """Requests one model replica takes: Serve's limit and the engine's queue agree on it."""
        return self.max_ongoing_requests or self.max_num_seqs * self.attention_workers + self.max_waiting

    @property
    def name(self) -> str:
        return self.served_model_name or Path(self.model).name
