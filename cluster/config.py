"""ModelConfig: every field of a Qwen3.5-MoE `config.json` that changes the math.

Parsed once from the Hugging Face config (text-only `qwen3_5_moe_text` or the multimodal wrapper
`qwen3_5_moe` with its `text_config`), frozen, and handed to everything that builds the model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from vision import VisionConfig

SUPPORTED_MODEL_TYPES = ("qwen3_5_moe_text", "qwen3_5_moe")
DEVICES = ("auto", "cuda", "cpu")
DTYPES = ("auto", "float32", "bfloat16", "float16")  # compute dtypes; auto: the checkpoint's own
LAYER_TYPES = ("linear_attention", "full_attention")


class ConfigError(ValueError):
    """A config.json that epserve cannot serve; the message names the field."""


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    layer_types: tuple[str, ...]  # "linear_attention" (Gated DeltaNet) or "full_attention"
    rms_norm_eps: float
    # gated full attention
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    partial_rotary_factor: float
    rope_theta: float
    max_position_embeddings: int
    # Gated DeltaNet
    linear_num_key_heads: int
    linear_num_value_heads: int
    linear_key_head_dim: int
    linear_value_head_dim: int
    linear_conv_kernel_dim: int
    # MoE
    num_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    shared_expert_intermediate_size: int
    norm_topk_prob: bool = True  # Qwen3.5 always renormalises; False is refused below
    tie_word_embeddings: bool = False
    eos_token_ids: tuple[int, ...] = ()
    model_type: str = "qwen3_5_moe_text"
    mtp_layers: int = 0  # `mtp_num_hidden_layers`: multi-token-prediction layers the checkpoint carries
    # the engine runs the MTP module (speculative decoding): its decoder layer is layer
    # num_hidden_layers of the KV cache, the expert placement and the load window
    use_mtp: bool = False
    # multimodal checkpoints (`qwen3_5_moe` with a `vision_config`): the vision tower, the special
    # tokens of an image span, and the rotary frequencies turned by the row / column positions
    vision: VisionConfig | None = None
    image_token_id: int = -1
    vision_start_token_id: int = -1
    vision_end_token_id: int = -1
    mrope_section: tuple[int, int, int] = (11, 11, 10)

    def __post_init__(self) -> None:
        if len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError(
                f"layer_types has {len(self.layer_types)} entries but num_hidden_layers is "
                f"{self.num_hidden_layers}"
            )
        for i, kind in enumerate(self.layer_types):
            if kind not in LAYER_TYPES:
                raise ConfigError(f"layer_types[{i}] = {kind!r}; expected one of {LAYER_TYPES}")
        if not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ConfigError(
                f"num_experts_per_tok = {self.num_experts_per_tok} must be in 1..num_experts "
                f"({self.num_experts})"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) is not a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.linear_num_value_heads % self.linear_num_key_heads:
            raise ConfigError(
                f"linear_num_value_heads ({self.linear_num_value_heads}) is not a multiple of "
                f"linear_num_key_heads ({self.linear_num_key_heads})"
            )
        if not self.norm_topk_prob:
            raise ConfigError("norm_topk_prob = false is not supported: Qwen3.5-MoE renormalises")
        if self.rotary_dim % 2:
            raise ConfigError(f"head_dim * partial_rotary_factor = {self.rotary_dim} must be even")
        if self.vision is not None and self.vision.out_hidden_size != self.hidden_size:
            raise ConfigError(f"vision_config.out_hidden_size ({self.vision.out_hidden_size}) must equal the "
                              f"text hidden_size ({self.hidden_size})")
        if self.use_mtp and self.mtp_layers != 1:
            raise ConfigError(f"MTP speculative decoding needs a checkpoint with one MTP layer "
                              f"(mtp_num_hidden_layers = 1), this one has {self.mtp_layers}")

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def moe_layer_ids(self) -> tuple[int, ...]:
        """Every Qwen3.5-MoE decoder layer has a MoE block, the MTP layer too (id num_hidden_layers)."""
        return tuple(range(self.num_hidden_layers + self.use_mtp))

    @property
    def kv_layer_ids(self) -> tuple[int, ...]:
        """Layers with K/V in the paged cache: full attention, and the MTP layer when it runs."""
        full = [i for i, kind in enumerate(self.layer_types) if kind == "full_attention"]
        return tuple(full + ([self.num_hidden_layers] if self.use_mtp else []))

    @property
    def mtp_layer_id(self) -> int:
        return self.num_hidden_layers

    def layer_prefix(self, layer: int) -> str:
        """A decoder layer's checkpoint name prefix; the MTP layer's lives under `mtp.`."""
        return "mtp.layers.0." if layer == self.mtp_layer_id else f"layers.{layer}."

    @classmethod
    def from_dict(cls, raw: dict[str, Any], processor: dict[str, Any] | None = None) -> ModelConfig:
        """raw: config.json; processor: preprocessor_config.json (image sizes, normalisation), if any."""
        model_type = raw.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"unsupported model_type {model_type!r}; epserve serves {SUPPORTED_MODEL_TYPES}"
            )
        text = raw
        if model_type == "qwen3_5_moe":
            if not isinstance(raw.get("text_config"), dict):
                raise ConfigError("model_type 'qwen3_5_moe' needs a 'text_config' object")
            text = dict(raw["text_config"])
            # tie_word_embeddings / eos may sit on the wrapper rather than the text part
            for key in ("tie_word_embeddings", "eos_token_id"):
                if key not in text and key in raw:
                    text[key] = raw[key]
        from .model.quantization import quantization_from

        quantization_from(raw)  # refuses a method epserve cannot load, before anything is read
        vision = {}
        if model_type == "qwen3_5_moe" and isinstance(raw.get("vision_config"), dict):
            try:
                vision["vision"] = VisionConfig.from_dict(raw["vision_config"], processor)
            except (TypeError, ValueError) as e:
                raise ConfigError(f"vision_config: {e}") from e
            for key in ("image_token_id", "vision_start_token_id", "vision_end_token_id"):
                vision[key] = int(_require(raw, key))
        return cls(model_type=model_type, **_text_fields(text), **vision)

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> ModelConfig:
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise ConfigError(f"no config.json in {model_dir}")
        processor = Path(model_dir) / "preprocessor_config.json"
        return cls.from_dict(json.loads(path.read_text()),
                             json.loads(processor.read_text()) if processor.is_file() else None)


def resolve_dtype(dtype: str, model_dir: str | Path | None) -> str:
    """The compute dtype's name: `dtype` itself, or for "auto" the one the checkpoint was saved in
    (config.json's `dtype` or `torch_dtype`, or its text model's: bfloat16 for Qwen's releases, their
    FP8 ones included), float32 when it names none. Anything else is refused, naming it."""
    if dtype not in DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if dtype != "auto":
        return dtype
    raw = json.loads((Path(model_dir) / "config.json").read_text()) if model_dir is not None else {}
    text = raw.get("text_config") if isinstance(raw.get("text_config"), dict) else {}
    saved = next((c.get(k) for c in (raw, text) for k in ("dtype", "torch_dtype") if c.get(k)), "float32")
    if saved not in DTYPES[1:]:
        raise ConfigError(f"the checkpoint's dtype {saved!r} is not one of {', '.join(DTYPES[1:])}: "
                          "pass a dtype explicitly")
    return saved


def _require(text: dict[str, Any], key: str) -> Any:
    if key not in text or text[key] is None:
        raise ConfigError(f"config.json is missing required field {key!r}")
    return text[key]


def _text_fields(text: dict[str, Any]) -> dict[str, Any]:
    required_ints = [
        "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim", "linear_num_key_heads", "linear_num_value_heads",
        "linear_key_head_dim", "linear_value_head_dim", "linear_conv_kernel_dim", "num_experts",
        "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size",
    ]
    out: dict[str, Any] = {key: int(_require(text, key)) for key in required_ints}
    out["rms_norm_eps"] = float(_require(text, "rms_norm_eps"))
    out["max_position_embeddings"] = int(text.get("max_position_embeddings", 262144))

    num_layers = out["num_hidden_layers"]
    layer_types = text.get("layer_types")
    if layer_types is None:
        interval = int(text.get("full_attention_interval", 4))
        layer_types = [
            "full_attention" if (i + 1) % interval == 0 else "linear_attention"
            for i in range(num_layers)
        ]
    out["layer_types"] = tuple(layer_types)

    # transformers 5 nests rope settings in rope_parameters; older files keep them at top level.
    rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "mrope"):
        raise ConfigError(f"unsupported rope_type {rope_type!r}; only default rotary is supported")
    theta = rope.get("rope_theta", text.get("rope_theta"))
    if theta is None:
        raise ConfigError("config.json is missing required field 'rope_theta'")
    out["rope_theta"] = float(theta)
    if "mrope_section" in rope:
        out["mrope_section"] = tuple(int(n) for n in rope["mrope_section"])
        if len(out["mrope_section"]) != 3:
            raise ConfigError(f"mrope_section must have 3 entries, got {rope['mrope_section']}")
    out["partial_rotary_factor"] = float(
        rope.get("partial_rotary_factor", text.get("partial_rotary_factor", 0.25))
    )
    out["norm_topk_prob"] = bool(text.get("norm_topk_prob", True))
    out["mtp_layers"] = int(text.get("mtp_num_hidden_layers", 0) or 0)
    out["tie_word_embeddings"] = bool(text.get("tie_word_embeddings", False))
    eos = text.get("eos_token_id")
    out["eos_token_ids"] = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
    known = {f.name for f in fields(ModelConfig)}
    assert set(out) <= known, set(out) - known
    return out


@dataclass(frozen=True)
class ClusterConfig:
    """How one model instance is laid out: A attention workers and E expert workers.

    With E = A = 1 and use_ray unset, everything runs in this process with the local dispatcher.
    """

    expert_workers: int = 1  # E: actors each holding a shard of every MoE layer's experts
    attention_workers: int = 1  # A: actors running the dense layers, data-parallel over sequences
    use_ray: bool | None = None  # None: Ray whenever E > 1 or A > 1
    # "cuda", "cpu", or "auto": cuda when there are GPUs (the Ray cluster's for Ray layouts, this
    # process's in one process); weights are created there, in the engine's dtype
    device: str = "auto"
    gpus_per_worker: float | None = None  # None: 1 on cuda, 0 on cpu; whole GPUs only
    cpus_per_worker: float = 0.25  # fractional on CPU machines (2 cores hold 8 workers)
    placement: Any = None  # router.placement.ExpertPlacement; None: contiguous blocks of E_total / E
    timeout_s: float = 120.0  # worker start-up and control calls
    step_timeout_s: float = 10.0  # a step's reply later than this: the instance is stuck, recover it
    # deterministic failure for tests: "attention:0:5" makes attention worker 0 exit as it gets its
    # 5th step command (role "attention" or "expert", index within the role); replacements never do
    fault_injection: str | None = None
    # attention workers keep an undo point per step (a copy of the step's DeltaNet states: 5-15% of
    # a tiny-model decode step here) so that a lost expert worker costs one replayed step; off, such
    # a loss re-prefills every running sequence, as a lost attention worker does
    replay_failed_steps: bool = True
    threads_per_worker: int = 1  # torch threads inside each CPU worker
    # Ray layouts: split each step into two micro-batches (whole sequences) so that one's dense
    # layers run on the attention workers while the other's experts run on the expert workers.
    # On even with more worker processes than cores: 1 + 2 workers on 2 cores served 16 streaming
    # clients ~14% faster with it (README, expert parallelism); batch-1 steps are not split.
    two_batch_overlap: bool = True
    # in one process on a GPU, in bf16/fp16: decode steps replay CUDA graphs captured per batch and
    # block-table width bucket (cluster.worker.decode_graphs); off: every step launches its kernels
    cuda_graphs: bool = True
    # ... and the forwards they capture run the plain-torch glue between GEMMs (norms, rotary,
    # gating, attention's masking, the experts' sort and sum) through torch.compile (kernels.backend
    # .glue): ~490 -> ~250 kernels a step; it compiles as the engine's warm-up captures the buckets
    compile_decode_graphs: bool = True
    # an FP8 checkpoint kept FP8 on GPUs (sm_89+): its GEMMs past the few-rows kernels (routed experts
    # past 80 pairs, dense FP8 layers past 8 rows: prefill and larger decode batches) quantize their
    # activations to e4m3 too, a scale per row and 128 columns, and multiply FP8 by FP8 on the tensor
    # cores (W8A8, as vLLM and SGLang run these checkpoints), rounding the activations; off: each weight
    # dequantised to the compute dtype as the kernels load it (W8A16, the dequantised weights' values)
    fp8_activations: bool = False
    # schedule and launch step N + 1 before reading step N's tokens (its decodes take them on the
    # device), so the engine's work per step overlaps the device's or the workers'. None: on for Ray
    # layouts and in one process on a GPU, off in one process on a CPU and with speculative decoding
    async_scheduling: bool | None = None
    # custom Ray resources each worker also reserves: steer the roles onto node groups (KubeRay worker
    # groups advertise them with rayStartParams.resources), e.g. {"epserve_expert": 1}
    attention_resources: tuple[tuple[str, float], ...] = ()
    expert_resources: tuple[tuple[str, float], ...] = ()

    def __post_init__(self) -> None:
        if self.expert_workers < 1:
            raise ConfigError(f"expert_workers must be >= 1, got {self.expert_workers}")
        if self.attention_workers < 1:
            raise ConfigError(f"attention_workers must be >= 1, got {self.attention_workers}")
        if self.cpus_per_worker <= 0:
            raise ConfigError(f"cpus_per_worker must be > 0, got {self.cpus_per_worker}")
        if self.step_timeout_s <= 0:
            raise ConfigError(f"step_timeout_s must be > 0, got {self.step_timeout_s}")
        if self.device not in DEVICES:
            raise ConfigError(f"device must be one of {DEVICES}, got {self.device!r}")
        gpus = self.gpus_per_worker
        if gpus is not None and (gpus < 0 or gpus != int(gpus)):
            raise ConfigError(f"gpus_per_worker must be a whole number, got {gpus}: each worker drives one "
                              f"GPU of its own (sharing a GPU between workers is not supported)")
        if self.device == "cuda" and gpus == 0:
            raise ConfigError("device 'cuda' with gpus_per_worker = 0: the workers would see no GPU")
        if self.device == "cpu" and gpus:
            raise ConfigError(f"device 'cpu' with gpus_per_worker = {gpus}: drop one of them")
        if self.device == "cpu" and self.fp8_activations:
            raise ConfigError("fp8_activations needs GPUs with FP8 (sm_89+): on CPUs FP8 checkpoints are "
                              "dequantised as they load")
        if self.fault_injection is not None:
            role, _, rest = self.fault_injection.partition(":")
            index, _, step = rest.partition(":")
            if role not in ("attention", "expert") or not index.isdigit() or not step.isdigit():
                raise ConfigError(f"fault_injection must be 'attention|expert:<index>:<step>', "
                                  f"got {self.fault_injection!r}")
        if not self.wants_ray and self.placement is not None:
            raise ConfigError("an expert placement needs the Ray executor (use_ray=True)")

    def resolve_device(self, gpus_available: bool) -> str:
        """"cuda" or "cpu" for this instance, given whether GPUs are there to use; refuses cuda
        without GPUs."""
        if self.device == "cuda" and not gpus_available:
            raise ConfigError("device 'cuda' was asked for but there is no GPU (torch.cuda.is_available() is "
                              "False here, or the Ray cluster has no GPU resources)")
        if self.device == "auto":
            return "cuda" if gpus_available and self.gpus_per_worker != 0 else "cpu"
        return self.device

    @property
    def wants_ray(self) -> bool:
        if self.use_ray is not None:
            if not self.use_ray and (self.expert_workers > 1 or self.attention_workers > 1):
                raise ConfigError("use_ray=False runs one process: expert_workers and attention_workers must be 1")
            return self.use_ray
        return self.expert_workers > 1 or self.attention_workers > 1


SPECULATIVE_METHODS = ("mtp",)


@dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding with the checkpoint's multi-token-prediction layer: it drafts k tokens
    after each sampled one, and the next step verifies them in one target forward."""

    method: str = "mtp"
    num_speculative_tokens: int = 2  # k, 1..3
    # a step with more sequences running or waiting than this (per attention worker) drafts nothing,
    # and its sequences decode plainly from then on: under load a verify step costs more than it saves
    max_batch: int = 8

    def __post_init__(self) -> None:
        if self.method not in SPECULATIVE_METHODS:
            raise ConfigError(f"speculative method must be one of {SPECULATIVE_METHODS}, got {self.method!r}")
        if not 1 <= self.num_speculative_tokens <= 3:
            raise ConfigError(f"num_speculative_tokens must be in 1..3, got {self.num_speculative_tokens}")
        if self.max_batch < 1:
            raise ConfigError(f"speculative max_batch must be >= 1, got {self.max_batch}")

    @classmethod
    def parse(cls, value: SpeculativeConfig | dict | None) -> SpeculativeConfig | None:
        """From a SpeculativeConfig, a dict as vLLM takes it ({"method": "mtp",
        "num_speculative_tokens": k}) or None (off)."""
        if value is None or isinstance(value, SpeculativeConfig):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"speculative_config must be a dict, got {type(value).__name__}")
        unknown = set(value) - {f.name for f in fields(cls)}
        if unknown:
            raise ConfigError(f"unknown speculative_config keys {sorted(unknown)}")
        return cls(**value)


@dataclass(frozen=True)
class RebalanceConfig:
    """When the engine moves hot experts between expert workers (Ray layouts with E > 1)."""

    enabled: bool = False  # periodic rebalancing; the server turns it on
    interval_steps: int = 200  # look at the load every this many engine steps
    imbalance_threshold: float = 1.25  # rebalance when busiest / mean worker load passes this
    redundant_slots: int | None = None  # replicas per layer beyond one per expert; None: E / 16
    window_steps: int = 64  # steps in the load window (the runner's counters)

    def __post_init__(self) -> None:
        if self.interval_steps < 1:
            raise ConfigError(f"interval_steps must be >= 1, got {self.interval_steps}")
        if self.imbalance_threshold < 1:
            raise ConfigError(f"imbalance_threshold must be >= 1, got {self.imbalance_threshold}")
        if self.redundant_slots is not None and self.redundant_slots < 0:
            raise ConfigError(f"redundant_slots must be >= 0, got {self.redundant_slots}")
