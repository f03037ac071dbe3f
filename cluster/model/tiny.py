"""`epserve make-tiny`: a random Qwen3.5-MoE checkpoint in Hugging Face format, written offline.

config.json, safetensors with the real tensor names (text-only or multimodal prefixes, per-expert or
fused experts, optionally sharded with an index), tokenizer.json, tokenizer_config.json and
generation_config.json. transformers' AutoModelForCausalLM loads the text-only layout as is.
The initialisation is wider than a trained model's so that logits are well separated (greedy
decoding is then stable across implementations).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from .tiny_tokenizer import SPECIAL_TOKENS, VISION_TOKENS, byte_level_tokenizer, qwen35_tokenizer

# Qwen's ChatML (no tools, no thinking); deploy.chat uses the same default for checkpoints without one
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass(frozen=True)
class TinySpec:
    seed: int = 0
    num_experts: int = 512
    top_k: int = 10
    layers: int = 4
    hidden: int = 128
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 32
    linear_key_heads: int = 2
    linear_value_heads: int = 8
    linear_head_dim: int = 32
    moe_intermediate: int = 32
    shared_intermediate: int = 64
    full_attention_interval: int = 4
    tie_word_embeddings: bool = False
    fused_experts: bool = False
    multimodal: bool = False  # `model.language_model.` names, a text_config wrapper and a vision tower
    vision_depth: int = 2  # the tiny vision tower (multimodal): blocks, width, heads
    vision_hidden: int = 32
    vision_heads: int = 2
    vision_min_pixels: int = 32 * 32  # the image processor's resizing bounds (Qwen's: 256^2 .. 4096^2)
    vision_max_pixels: int = 1024 * 1024
    tokenizer: str = "byte"  # "byte" (small byte-level BPE) or "qwen3.5" (the real vocabulary)
    max_shard_mb: float = 0  # > 0 splits the weights into shards with an index file
    max_position_embeddings: int = 4096
    router_skew: float = 0.0  # > 0: a few experts of each layer take much of the traffic
    mtp: bool = False  # an MTP module (`mtp.*`, mtp_num_hidden_layers = 1) for speculative decoding

    def __post_init__(self) -> None:
        if self.tokenizer not in ("byte", "qwen3.5"):
            raise ValueError(f"tokenizer must be 'byte' or 'qwen3.5', got {self.tokenizer!r}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k {self.top_k} must be in 1..num_experts ({self.num_experts})")


def _text_config(spec: TinySpec, vocab_size: int, eos_id: int) -> dict:
    layer_types = [
        "full_attention" if (i + 1) % spec.full_attention_interval == 0 else "linear_attention"
        for i in range(spec.layers)
    ]
    return {
        "model_type": "qwen3_5_moe_text",
        "architectures": ["Qwen3_5MoeForCausalLM"],
        "vocab_size": vocab_size,
        "hidden_size": spec.hidden,
        "num_hidden_layers": spec.layers,
        "layer_types": layer_types,
        "num_attention_heads": spec.heads,
        "num_key_value_heads": spec.kv_heads,
        "head_dim": spec.head_dim,
        "linear_num_key_heads": spec.linear_key_heads,
        "linear_num_value_heads": spec.linear_value_heads,
        "linear_key_head_dim": spec.linear_head_dim,
        "linear_value_head_dim": spec.linear_head_dim,
        "linear_conv_kernel_dim": 4,
        "num_experts": spec.num_experts,
        "num_experts_per_tok": spec.top_k,
        "moe_intermediate_size": spec.moe_intermediate,
        "shared_expert_intermediate_size": spec.shared_intermediate,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": spec.max_position_embeddings,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25,
                            **({"mrope_section": [2, 1, 1], "mrope_interleaved": True} if spec.multimodal else {})},
        "tie_word_embeddings": spec.tie_word_embeddings,
        "attention_bias": False,
        "eos_token_id": eos_id,
        "dtype": "float32",
        **({"mtp_num_hidden_layers": 1} if spec.mtp else {}),
    }


def _random_weights(spec: TinySpec, vocab_size: int) -> dict[str, torch.Tensor]:
    """Text-model tensors under their canonical names (no `model.` prefix), per-expert layout."""
    g = torch.Generator().manual_seed(spec.seed)

    def normal(*shape, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std

    def linear(out_dim: int, in_dim: int) -> torch.Tensor:
        return normal(out_dim, in_dim, std=1 / math.sqrt(in_dim))

    D = spec.hidden
    # std 1/sqrt(D) keeps tied logits (h @ embed^T) at the scale of untied ones
    w: dict[str, torch.Tensor] = {"embed_tokens.weight": normal(vocab_size, D, std=D**-0.5)}
    for i in range(spec.layers):
        w.update(_layer_weights(spec, f"layers.{i}.", bool((i + 1) % spec.full_attention_interval), normal, g))
    w["norm.weight"] = normal(D, std=0.1)
    if not spec.tie_word_embeddings:
        w["lm_head.weight"] = linear(vocab_size, D)
    if spec.mtp:  # generated last: the main model's weights do not depend on it
        w.update({f"mtp.{k}": v for k, v in _layer_weights(spec, "layers.0.", False, normal, g).items()})
        w["mtp.fc.weight"] = linear(D, 2 * D)
        for name in ("pre_fc_norm_embedding", "pre_fc_norm_hidden", "norm"):
            w[f"mtp.{name}.weight"] = normal(D, std=0.1)
    if spec.multimodal:  # its own generator: the text weights do not change
        w.update(_vision_weights(spec))
    return w


def _layer_weights(spec: TinySpec, p: str, is_linear: bool, normal, g: torch.Generator) -> dict[str, torch.Tensor]:
    """One decoder layer's tensors under prefix p: Gated DeltaNet or gated attention, then the MoE."""

    def linear(out_dim: int, in_dim: int) -> torch.Tensor:
        return normal(out_dim, in_dim, std=1 / math.sqrt(in_dim))

    D, E, I = spec.hidden, spec.num_experts, spec.moe_intermediate
    key_dim = spec.linear_key_heads * spec.linear_head_dim
    value_dim = spec.linear_value_heads * spec.linear_head_dim
    w: dict[str, torch.Tensor] = {}
    w[p + "input_layernorm.weight"] = normal(D, std=0.1)
    w[p + "post_attention_layernorm.weight"] = normal(D, std=0.1)
    if is_linear:
        a = p + "linear_attn."
        # Keys correlated with queries (as in trained models): DeltaNet's output S^T q is then
        # not a sum of cancelling terms, and fp32 implementations agree to ~1e-5.
        q_rows, v_rows = linear(key_dim, D), linear(value_dim, D)
        k_rows = 0.8 * q_rows + 0.6 * linear(key_dim, D)
        w[a + "in_proj_qkv.weight"] = torch.cat([q_rows, k_rows, v_rows])
        w[a + "in_proj_z.weight"] = linear(value_dim, D)
        w[a + "in_proj_b.weight"] = linear(spec.linear_value_heads, D)
        w[a + "in_proj_a.weight"] = linear(spec.linear_value_heads, D)
        q_conv = normal(key_dim, 1, 4, std=0.5)
        w[a + "conv1d.weight"] = torch.cat([q_conv, q_conv, normal(value_dim, 1, 4, std=0.5)])
        w[a + "A_log"] = torch.empty(spec.linear_value_heads).uniform_(1, 16, generator=g).log()
        w[a + "dt_bias"] = normal(spec.linear_value_heads, std=0.5)
        w[a + "norm.weight"] = 1 + normal(spec.linear_head_dim, std=0.1)
        w[a + "out_proj.weight"] = linear(D, value_dim)
    else:
        a = p + "self_attn."
        w[a + "q_proj.weight"] = linear(spec.heads * spec.head_dim * 2, D)
        w[a + "k_proj.weight"] = linear(spec.kv_heads * spec.head_dim, D)
        w[a + "v_proj.weight"] = linear(spec.kv_heads * spec.head_dim, D)
        w[a + "o_proj.weight"] = linear(D, spec.heads * spec.head_dim)
        w[a + "q_norm.weight"] = normal(spec.head_dim, std=0.1)
        w[a + "k_norm.weight"] = normal(spec.head_dim, std=0.1)
    m = p + "mlp."
    w[m + "gate.weight"] = linear(E, D) * _router_scale(E, spec.router_skew, g)[:, None]
    for e in range(E):
        w[f"{m}experts.{e}.gate_proj.weight"] = linear(I, D)
        w[f"{m}experts.{e}.up_proj.weight"] = linear(I, D)
        w[f"{m}experts.{e}.down_proj.weight"] = linear(D, I)
    w[m + "shared_expert.gate_proj.weight"] = linear(spec.shared_intermediate, D)
    w[m + "shared_expert.up_proj.weight"] = linear(spec.shared_intermediate, D)
    w[m + "shared_expert.down_proj.weight"] = linear(D, spec.shared_intermediate)
    w[m + "shared_expert_gate.weight"] = linear(1, D)
    return w


def _vision_config(spec: TinySpec) -> dict:
    return {"model_type": "qwen3_5_moe_vision", "depth": spec.vision_depth, "hidden_size": spec.vision_hidden,
            "intermediate_size": 2 * spec.vision_hidden, "num_heads": spec.vision_heads, "in_channels": 3,
            "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2, "out_hidden_size": spec.hidden,
            "num_position_embeddings": 256, "hidden_act": "gelu_pytorch_tanh",
            "rope_parameters": {"rope_type": "axial", "rope_theta": 10000.0}}


def _vision_weights(spec: TinySpec) -> dict[str, torch.Tensor]:
    """The tower's tensors under their canonical names (`visual.*`), from a generator of their own."""
    g = torch.Generator().manual_seed(spec.seed + 1000)
    cfg = _vision_config(spec)
    D, I, M = cfg["hidden_size"], cfg["intermediate_size"], cfg["spatial_merge_size"] ** 2

    def normal(*shape, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std

    def linear(name: str, out_dim: int, in_dim: int) -> dict[str, torch.Tensor]:
        return {f"{name}.weight": normal(out_dim, in_dim, std=in_dim**-0.5), f"{name}.bias": normal(out_dim, std=0.02)}

    def norm(name: str, dim: int) -> dict[str, torch.Tensor]:
        return {f"{name}.weight": 1 + normal(dim, std=0.1), f"{name}.bias": normal(dim, std=0.02)}

    w = {"patch_embed.proj.weight": normal(D, 3, 2, 16, 16, std=1536**-0.5), "patch_embed.proj.bias": normal(D, std=0.02),
         "pos_embed.weight": normal(cfg["num_position_embeddings"], D, std=0.5)}
    for i in range(spec.vision_depth):
        b = f"blocks.{i}."
        w |= norm(b + "norm1", D) | norm(b + "norm2", D) | linear(b + "attn.qkv", 3 * D, D)
        w |= linear(b + "attn.proj", D, D) | linear(b + "mlp.linear_fc1", I, D) | linear(b + "mlp.linear_fc2", D, I)
    w |= norm("merger.norm", D) | linear("merger.linear_fc1", M * D, M * D) | linear("merger.linear_fc2", spec.hidden, M * D)
    return {f"visual.{k}": v for k, v in w.items()}


def _router_scale(num_experts: int, skew: float, g: torch.Generator) -> torch.Tensor:
    """Row scales of the router: the k-th hottest expert (a random one) gets 1 + skew * 0.8^k.
    A larger scale widens that expert's logits, so it lands in the top-k far more often."""
    order = torch.randperm(num_experts, generator=g)
    scale = torch.ones(num_experts)
    scale[order] = 1 + skew * 0.8 ** torch.arange(num_experts, dtype=torch.float32)
    return scale


def _fuse_experts(w: dict[str, torch.Tensor], spec: TinySpec) -> dict[str, torch.Tensor]:
    out = {k: v for k, v in w.items() if ".mlp.experts." not in k}
    for m in [f"layers.{i}.mlp.experts." for i in range(spec.layers)] + (["mtp.layers.0.mlp.experts."] if spec.mtp else []):
        out[m + "gate_up_proj"] = torch.stack(
            [torch.cat([w[f"{m}{e}.gate_proj.weight"], w[f"{m}{e}.up_proj.weight"]]) for e in range(spec.num_experts)]
        )
        out[m + "down_proj"] = torch.stack([w[f"{m}{e}.down_proj.weight"] for e in range(spec.num_experts)])
    return out


def _file_names(w: dict[str, torch.Tensor], spec: TinySpec) -> dict[str, torch.Tensor]:
    """Canonical names -> the file's (the inverse of cluster.model.checkpoint.canonical_name)."""
    prefix = "model.language_model." if spec.multimodal else "model."

    def file_name(name: str) -> str:
        if name == "lm_head.weight" or name.startswith("mtp."):
            return name
        return "model." + name if name.startswith("visual.") else prefix + name

    out = {file_name(k): v.contiguous() for k, v in w.items()}
    if spec.multimodal:  # an MTP tensor a server without speculation keeps aside
        out.setdefault("mtp.fc.weight", torch.zeros(spec.hidden, 2 * spec.hidden))
    return out


def _save_shards(tensors: dict[str, torch.Tensor], out: Path, max_shard_mb: float) -> None:
    if max_shard_mb <= 0:
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
        return
    limit, shards, current, size = max_shard_mb * 2**20, [], {}, 0
    for name in sorted(tensors):
        if current and size + tensors[name].nbytes > limit:
            shards.append(current)
            current, size = {}, 0
        current[name] = tensors[name]
        size += tensors[name].nbytes
    shards.append(current)
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / file), metadata={"format": "pt"})
        weight_map.update({name: file for name in shard})
    total = sum(t.nbytes for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def save_weights(out: Path, spec: TinySpec, weights: dict[str, torch.Tensor]) -> None:
    """Writes canonical-name tensors (experts one by one) in the layout the spec asks for."""
    for old in list(out.glob("*.safetensors")) + list(out.glob("*.safetensors.index.json")):
        old.unlink()
    if spec.fused_experts:
        weights = _fuse_experts(weights, spec)
    _save_shards(_file_names(weights, spec), out, spec.max_shard_mb)


def make_tiny(out_dir: str | Path, spec: TinySpec = TinySpec()) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = qwen35_tokenizer() if spec.tokenizer == "qwen3.5" else byte_level_tokenizer()
    if spec.multimodal and spec.tokenizer == "byte":  # after the trained vocabulary: its ids do not move
        tok.add_special_tokens(VISION_TOKENS)
    if spec.tokenizer == "qwen3.5":
        vocab_size = 248320  # the flagship's padded vocabulary
    else:
        vocab_size = math.ceil(tok.get_vocab_size() / 64) * 64
    eos_id = tok.token_to_id("<|im_end|>")
    text_cfg = _text_config(spec, vocab_size, eos_id)
    config = text_cfg
    if spec.multimodal:
        text_cfg = {k: v for k, v in text_cfg.items() if k != "architectures"}
        text_cfg["model_type"] = "qwen3_5_moe_text"
        config = {
            "model_type": "qwen3_5_moe",
            "architectures": ["Qwen3_5MoeForConditionalGeneration"],
            "text_config": text_cfg,
            "vision_config": _vision_config(spec),
            "tie_word_embeddings": spec.tie_word_embeddings,
            **{f"{name}_token_id": tok.token_to_id(f"<|{name}|>")
               for name in ("vision_start", "vision_end")},
            "image_token_id": tok.token_to_id("<|image_pad|>"),
            "video_token_id": tok.token_to_id("<|video_pad|>"),
        }
        (out / "preprocessor_config.json").write_text(json.dumps({
            "image_processor_type": "Qwen2VLImageProcessor", "patch_size": 16, "temporal_patch_size": 2,
            "merge_size": 2, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
            "size": {"shortest_edge": spec.vision_min_pixels, "longest_edge": spec.vision_max_pixels}}, indent=2))
    config["epserve_tiny_spec"] = asdict(spec)  # how it was made, for humans
    (out / "config.json").write_text(json.dumps(config, indent=2))
    save_weights(out, spec, _random_weights(spec, vocab_size))
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "eos_token": "<|im_end|>",
                "pad_token": "<|endoftext|>",
                "additional_special_tokens": SPECIAL_TOKENS + (VISION_TOKENS if spec.multimodal else []),
                "chat_template": CHATML_TEMPLATE,
            },
            indent=2,
        )
    )
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": eos_id}, indent=2))
    return out
