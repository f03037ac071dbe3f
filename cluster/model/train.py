"""`epserve make-tiny DIR --train`: trains the tiny model and its MTP module on local text.

The corpus is the Python standard library's own source by default (on every machine, nothing to
download). The loss is next-token cross-entropy plus the MTP loss as DeepSeek-V3 and Qwen3-Next
train it: the MTP layer predicts token t+2 from the main model's final normed hidden at t and the
embedding of token t+1 (weighted by `mtp_weight`; its gradient reaches the trunk too).

The training forward is plain differentiable torch over whole sequences, built on the same
parameters as the serving model (cluster.model.model: names equal the checkpoint's) and on the
kernels' references: norms, q/k norm + rotary, the chunked delta rule, top-k softmax, the grouped
expert matmul and the shared expert. tests/cluster/model/test_train.py checks that its logits equal the
engine's on the trained checkpoint, so what is trained is what is served.
Shapes: B sequences, S tokens, D hidden, E experts, V vocab.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from attention import GatedAttention, GatedDeltaNet
from kernels import reference_kernels
from kernels.attention import qk_norm_rope_reference
from kernels.delta_rule import chunked_gated_delta_rule, gating
from kernels.moe import add_shared_expert_reference, moe_experts_grouped, topk_softmax_reference
from kernels.norms import gated_rms_norm_reference, rms_norm_reference
from router import MoELayer

from ..config import ModelConfig
from .checkpoint import CheckpointReader
from .loading import load_dense_model
from .model import DecoderLayer, Qwen35MoeModel
from .tiny import TinySpec, make_tiny, save_weights


TRAINING_RECORD = "epserve_training.json"  # beside the weights: how they were trained


@dataclass(frozen=True)
class TrainSpec:
    minutes: float = 3.0  # wall-clock budget of the optimisation steps
    corpus: str | None = None  # a text file or a directory of *.py files; None: the stdlib's source
    max_corpus_mb: float = 16.0
    seq_len: int = 128
    batch: int = 16
    lr: float = 3e-3
    mtp_weight: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        if self.minutes <= 0:
            raise ValueError(f"train minutes must be > 0, got {self.minutes}")


def corpus_text(path: str | None, max_mb: float) -> str:
    """The training text: a file, or the *.py files under a directory (sorted), up to max_mb."""
    root = Path(path) if path else Path(sysconfig.get_paths()["stdlib"])
    if not root.exists():
        raise FileNotFoundError(f"corpus {root} does not exist")
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*.py") if "test" not in p.parts)
    limit, parts, size = int(max_mb * 2**20), [], 0
    for file in files:
        text = file.read_text(errors="ignore")
        parts.append(text)
        size += len(text)
        if size >= limit:
            break
    text = "\n".join(parts)[:limit]
    if len(text) < 10_000:
        raise ValueError(f"corpus {root} has {len(text)} characters; give it at least 10,000")
    return text


class Trainable(torch.nn.Module):
    """The serving model's dense parameters (with the MTP module) and every expert as parameters
    gate_up [E, 2I, D], down [E, D, I] per MoE layer."""

    def __init__(self, model: Qwen35MoeModel, reader: CheckpointReader) -> None:
        super().__init__()
        cfg = model.cfg
        self.model, self.cfg = model, cfg
        self.gate_up, self.down = torch.nn.ParameterList(), torch.nn.ParameterList()
        for layer in cfg.moe_layer_ids:
            gate_up, down = reader.read_experts(cfg.layer_prefix(layer), list(range(cfg.num_experts)),
                                                cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size)
            self.gate_up.append(torch.nn.Parameter(gate_up.float()))
            self.down.append(torch.nn.Parameter(down.float()))

    def _layer(self, layer: DecoderLayer, x_BSD: torch.Tensor) -> torch.Tensor:
        eps = self.cfg.rms_norm_eps
        h = rms_norm_reference(x_BSD, layer.input_layernorm.weight, eps)
        x_BSD = x_BSD + (self._deltanet(layer.linear_attn, h) if layer.is_linear else self._attention(layer.self_attn, h))
        h = rms_norm_reference(x_BSD, layer.post_attention_layernorm.weight, eps)
        return x_BSD + self._moe(layer.mlp, h)

    def _deltanet(self, m: GatedDeltaNet, x_BSD: torch.Tensor) -> torch.Tensor:
        B, S, _ = x_BSD.shape
        qkv = F.conv1d(F.pad((x_BSD @ m.in_proj_qkv.weight.T).transpose(1, 2), (m.conv_kernel - 1, 0)),
                       m.conv1d.weight, groups=m.conv_channels)
        q, k, v = F.silu(qkv).transpose(1, 2).split([m.key_dim, m.key_dim, m.value_dim], dim=-1)
        g, beta = gating(x_BSD @ m.in_proj_a.weight.T, x_BSD @ m.in_proj_b.weight.T, m.A_log, m.dt_bias)
        out, _ = chunked_gated_delta_rule(q.reshape(B, S, m.num_key_heads, -1), k.reshape(B, S, m.num_key_heads, -1),
                                          v.reshape(B, S, m.num_value_heads, -1), g, beta)
        z = (x_BSD @ m.in_proj_z.weight.T).view(B, S, m.num_value_heads, -1)
        normed = gated_rms_norm_reference(out, z, m.norm.weight, m.norm.eps)
        return normed.reshape(B, S, m.value_dim) @ m.out_proj.weight.T

    def _attention(self, m: GatedAttention, x_BSD: torch.Tensor) -> torch.Tensor:
        B, S, _ = x_BSD.shape
        H, KV, hd = m.num_heads, m.num_kv_heads, m.head_dim
        query, gate = (x_BSD @ m.q_proj.weight.T).view(B * S, H, 2 * hd).split(hd, dim=-1)
        positions = torch.arange(S).repeat(B)
        query, key = qk_norm_rope_reference(query, (x_BSD @ m.k_proj.weight.T).view(B * S, KV, hd),
                                            m.q_norm.weight, m.k_norm.weight, m.q_norm.eps, positions,
                                            m.rotary.inv_freq)
        value = (x_BSD @ m.v_proj.weight.T).view(B, S, KV, hd)
        out = F.scaled_dot_product_attention(
            query.view(B, S, H, hd).transpose(1, 2), key.view(B, S, KV, hd).transpose(1, 2),
            value.transpose(1, 2), is_causal=True, enable_gqa=True)
        out = out.transpose(1, 2).reshape(B, S, H * hd) * torch.sigmoid(gate.reshape(B, S, H * hd))
        return out @ m.o_proj.weight.T

    def _moe(self, m: MoELayer, x_BSD: torch.Tensor) -> torch.Tensor:
        x = x_BSD.reshape(-1, x_BSD.shape[-1])
        idx, weights = topk_softmax_reference(x @ m.gate.weight.T, m.gate.top_k)
        routed = moe_experts_grouped(x, idx, weights, self.gate_up[m.layer_idx], self.down[m.layer_idx])
        shared = m.shared_expert
        gate_up = torch.cat([shared.gate_proj.weight, shared.up_proj.weight])
        out = add_shared_expert_reference(x, gate_up, shared.down_proj.weight, x @ m.shared_expert_gate.weight.T, routed)
        return out.view_as(x_BSD)

    def forward(self, ids_BS: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits [B, S, V] of the main model and [B, S - 1, V] of the MTP module (row i: token i + 2)."""
        model, eps = self.model, self.cfg.rms_norm_eps
        x = model.embed_tokens(ids_BS)
        for layer in model.layers:
            x = self._layer(layer, x)
        hidden = rms_norm_reference(x, model.norm.weight, eps)
        mtp = model.mtp
        joined = torch.cat([rms_norm_reference(model.embed_tokens(ids_BS[:, 1:]), mtp.pre_fc_norm_embedding.weight, eps),
                            rms_norm_reference(hidden[:, :-1], mtp.pre_fc_norm_hidden.weight, eps)], dim=-1)
        drafted = rms_norm_reference(self._layer(mtp.layers[0], joined @ mtp.fc.weight.T), mtp.norm.weight, eps)
        return hidden @ model.lm_head.weight.T, drafted @ model.lm_head.weight.T

    def weights(self) -> dict[str, torch.Tensor]:
        """Every tensor under its canonical checkpoint name, experts one by one (cluster.model.tiny)."""
        out = {name: p.detach().clone() for name, p in self.model.named_parameters()
               if not (name == "lm_head.weight" and self.cfg.tie_word_embeddings)}
        I = self.cfg.moe_intermediate_size
        for layer, gate_up, down in zip(self.cfg.moe_layer_ids, self.gate_up, self.down):
            prefix = self.cfg.layer_prefix(layer) + "mlp.experts."
            for e in range(self.cfg.num_experts):
                out[f"{prefix}{e}.gate_proj.weight"] = gate_up[e, :I].detach().clone()
                out[f"{prefix}{e}.up_proj.weight"] = gate_up[e, I:].detach().clone()
                out[f"{prefix}{e}.down_proj.weight"] = down[e].detach().clone()
        return out


def load_trainable(model_dir: str | Path) -> Trainable:
    """The checkpoint in model_dir (it must carry an MTP module) as a Trainable, fp32."""
    cfg = dataclasses.replace(ModelConfig.from_pretrained(model_dir), use_mtp=True)
    reader = CheckpointReader(model_dir)
    return Trainable(load_dense_model(cfg, reader, torch.float32).train(), reader)


def _progress(step: int, elapsed: float, budget: float, loss: float, mtp_loss: float, tokens: int) -> None:
    done = min(elapsed / budget, 1.0)
    bar = "#" * int(30 * done) + "-" * (30 - int(30 * done))
    sys.stderr.write(f"\rtraining [{bar}] {100 * done:3.0f}% step {step} loss {loss:.3f} mtp {mtp_loss:.3f} "
                     f"{tokens / max(elapsed, 1e-9):,.0f} tok/s")
    sys.stderr.flush()


def train(model_dir: str | Path, spec: TrainSpec = TrainSpec(), log=print) -> tuple[dict[str, torch.Tensor], dict]:
    """Trains the checkpoint in model_dir for spec.minutes; returns the trained weights (canonical
    names, experts one by one) and a summary, printing the loss as it goes."""
    torch.manual_seed(spec.seed)
    trainable = load_trainable(model_dir)
    tokenizer = Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))
    text = corpus_text(spec.corpus, spec.max_corpus_mb)
    ids = torch.tensor(tokenizer.encode(text).ids, dtype=torch.long)
    log(f"corpus: {len(text) / 2**20:.1f} MiB, {len(ids):,} tokens; training {spec.minutes:g} min "
        f"on batches of {spec.batch} x {spec.seq_len} tokens")
    optimizer = torch.optim.AdamW(trainable.parameters(), lr=spec.lr, weight_decay=0.01, betas=(0.9, 0.95))
    budget, start, step, tokens = spec.minutes * 60, time.monotonic(), 0, 0
    generator = torch.Generator().manual_seed(spec.seed)
    first = smoothed = smoothed_mtp = None
    while (elapsed := time.monotonic() - start) < budget:
        for group in optimizer.param_groups:  # short warm-up, then cosine over the time budget
            group["lr"] = spec.lr * min(1.0, (step + 1) / 20) * (0.55 + 0.45 * math.cos(math.pi * elapsed / budget))
        offsets = torch.randint(0, len(ids) - spec.seq_len - 1, (spec.batch,), generator=generator)
        batch = torch.stack([ids[o : o + spec.seq_len] for o in offsets.tolist()])
        with reference_kernels():  # differentiable torch everywhere
            logits, mtp_logits = trainable(batch)
        V = logits.shape[-1]
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, V), batch[:, 1:].reshape(-1))
        mtp_loss = F.cross_entropy(mtp_logits[:, :-1].reshape(-1, V), batch[:, 2:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        (loss + spec.mtp_weight * mtp_loss).backward()
        torch.nn.utils.clip_grad_norm_(trainable.parameters(), 1.0)
        optimizer.step()
        step, tokens = step + 1, tokens + batch.numel()
        smoothed = loss.item() if smoothed is None else 0.9 * smoothed + 0.1 * loss.item()
        smoothed_mtp = mtp_loss.item() if smoothed_mtp is None else 0.9 * smoothed_mtp + 0.1 * mtp_loss.item()
        first = first or (loss.item(), mtp_loss.item())
        _progress(step, time.monotonic() - start, budget, smoothed, smoothed_mtp, tokens)
    sys.stderr.write("\n")
    log(f"trained {step} steps ({tokens:,} tokens) in {time.monotonic() - start:.0f}s: loss {first[0]:.2f} -> "
        f"{smoothed:.2f}, MTP loss {first[1]:.2f} -> {smoothed_mtp:.2f}")
    summary = {"corpus": spec.corpus or "python stdlib", "corpus_tokens": len(ids), "steps": step, "tokens": tokens,
               "seconds": round(time.monotonic() - start, 1), "loss": [first[0], smoothed],
               "mtp_loss": [first[1], smoothed_mtp], "train_spec": dataclasses.asdict(spec)}
    return trainable.weights(), summary


def make_trained(out_dir: str | Path, spec: TinySpec = TinySpec(), train_spec: TrainSpec = TrainSpec(),
                 log=print) -> Path:
    """make_tiny (with an MTP module), then trains it and writes the trained weights in its place."""
    spec = dataclasses.replace(spec, mtp=True)
    out = make_tiny(out_dir, spec)
    weights, summary = train(out, train_spec, log)
    save_weights(out, spec, weights)
    (out / TRAINING_RECORD).write_text(json.dumps(summary, indent=2))
    return out
