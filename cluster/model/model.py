"""The Qwen3.5-MoE text model assembled from the pure-torch parts, and its weight loading.

Parameter names equal the checkpoint's canonical names (cluster.model.checkpoint), so loading is a
name-for-name copy. Routed experts are not parameters of this module: they live in an ExpertShard
that each MoE layer reaches through its dispatcher (locally, or on expert workers).
Shapes: T tokens of a flat batch, D hidden, V vocab.
"""

from __future__ import annotations

import torch
from torch import nn

from attention import (
    ForwardBatch,
    GatedAttention,
    GatedDeltaNet,
    PartialRotary,
    RMSNorm,
    SharedExpert,
)
from kernels import ATTENTION_LAYER, DELTANET_LAYER, decoder_layers, linear, one_call_forward, weight_of
from router import MoELayer, TopKGate
from vision import VisionTower

from .checkpoint import CheckpointReader
from .quantization import FP8, SCALE_SUFFIX
from ..config import ModelConfig


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, rotary: PartialRotary, kind: str | None = None) -> None:
        super().__init__()
        D = cfg.hidden_size
        self.is_linear = (kind or cfg.layer_types[layer_idx]) == "linear_attention"
        self.input_layernorm = RMSNorm(D, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(D, cfg.rms_norm_eps)
        if self.is_linear:
            self.linear_attn = GatedDeltaNet(
                layer_idx, D, cfg.linear_num_key_heads, cfg.linear_num_value_heads,
                cfg.linear_key_head_dim, cfg.linear_value_head_dim, cfg.linear_conv_kernel_dim,
                cfg.rms_norm_eps,
            )
        else:
            self.self_attn = GatedAttention(
                layer_idx, D, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                rotary, cfg.rms_norm_eps,
            )
        self.mlp = MoELayer(
            layer_idx,
            TopKGate(D, cfg.num_experts, cfg.num_experts_per_tok),
            SharedExpert(D, cfg.shared_expert_intermediate_size),
            D,
        )

    def mixer(self) -> nn.Module:
        return self.linear_attn if self.is_linear else self.self_attn

    def attend(self, out_TD: torch.Tensor, residual_TD: torch.Tensor | None, batch: ForwardBatch):
        """The dense half: x = x + mixer(norm(x)), then norm(x) for the MoE, with each residual add
        fused into the next norm. Takes the previous layer's (output, residual) (None: the
        embeddings); returns (residual, the MoE's input)."""
        if residual_TD is None:
            residual_TD, h = out_TD, self.input_layernorm(out_TD)
        else:
            residual_TD, h = self.input_layernorm.add_forward(residual_TD, out_TD)
        # .forward directly: nn.Module.__call__'s hook handling costs microseconds per call per step
        return self.post_attention_layernorm.add_forward(residual_TD, self.mixer().forward(h, batch))

    def forward(self, out_TD: torch.Tensor, residual_TD: torch.Tensor | None, batch: ForwardBatch):
        """x = x + mixer(norm(x)); x = x + mlp(norm(x)): returns this layer's (output, residual)."""
        residual_TD, h = self.attend(out_TD, residual_TD, batch)
        return self.mlp.forward(h), residual_TD

    def one_call_parts(self) -> tuple[list[int], list[torch.Tensor], set[float]]:
        """This layer as kernels.decoder_layers takes it, once fused: its 6 layout ints, its weights
        (the expert bank aside) and the eps of its norms."""
        norms = [self.input_layernorm.weight, self.post_attention_layernorm.weight]
        if self.is_linear:
            m = self.linear_attn
            in_proj, conv_weight, A_log, dt_bias, norm_weight, eps, out_proj = m.one_call_weights
            layout = [DELTANET_LAYER, m.num_key_heads, m.key_head_dim, m.num_value_heads, m.value_head_dim]
            mixer = [in_proj, conv_weight, A_log, dt_bias, norm_weight, out_proj]
        else:
            m = self.self_attn
            qkv, q_norm_weight, k_norm_weight, eps = m.one_call_weights
            layout = [ATTENTION_LAYER, m.num_heads, m.num_kv_heads, m.head_dim, 0]
            mixer = [qkv, q_norm_weight, k_norm_weight, m.o_proj.weight]
        all_eps = {eps, self.input_layernorm.eps, self.post_attention_layernorm.eps}
        return layout + [self.mlp.top_k], norms + mixer + [self.mlp.router, *self.mlp.shared_weights], all_eps


class MultiTokenPredictor(nn.Module):
    """Qwen3.5's MTP module (checkpoint names `mtp.*`): from the main model's final normed hidden
    h_i and the embedding of token i+1, one full-attention decoder layer with its MoE (layer id
    num_hidden_layers: its own K/V cache layer, expert placement and load counters) predicts token
    i+2 through the shared LM head. A row at position i writes the layer's K/V at i (as vLLM).
    For a further draft, the module's own output stands in for the main model's hidden."""

    def __init__(self, cfg: ModelConfig, rotary: PartialRotary) -> None:
        super().__init__()
        D = cfg.hidden_size
        self.pre_fc_norm_embedding = RMSNorm(D, cfg.rms_norm_eps)
        self.pre_fc_norm_hidden = RMSNorm(D, cfg.rms_norm_eps)
        self.fc = nn.Linear(2 * D, D, bias=False)
        self.layers = nn.ModuleList([DecoderLayer(cfg, cfg.mtp_layer_id, rotary, kind="full_attention")])
        self.norm = RMSNorm(D, cfg.rms_norm_eps)

    def forward(self, embeds_TD: torch.Tensor, hidden_TD: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """embeds of tokens i+1 and hidden at i, [T, D] each -> the normed hidden predicting i+2."""
        joined = torch.cat([self.pre_fc_norm_embedding(embeds_TD), self.pre_fc_norm_hidden(hidden_TD)], dim=-1)
        out, residual = self.layers[0].forward(linear(joined, weight_of(self.fc)), None, batch)
        return self.norm.add_forward(residual, out)[1]


class Qwen35MoeModel(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        rotary = PartialRotary(cfg.head_dim, cfg.rotary_dim, cfg.rope_theta)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, rotary) for i in range(cfg.num_hidden_layers))
        self.rotary = rotary  # the attention layers' (holds no weights)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.mtp = MultiTokenPredictor(cfg, rotary) if cfg.use_mtp else None
        self.visual = VisionTower(cfg.vision) if cfg.vision is not None else None
        self.one_call_layers: tuple | None = None  # once fused: decoder_layers' (layout, weights, eps)
        self.main_mlps: list[MoELayer] = []
        self.deltanet_ids: list[int] = []
        self.tie_weights()

    def tie_weights(self) -> None:
        """Tied embeddings: the LM head is embed_tokens' parameter (again after a move that split them)."""
        if self.cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def decoder_layers(self) -> list[DecoderLayer]:
        """The main layers, then the MTP layer when it runs."""
        return list(self.layers) + (list(self.mtp.layers) if self.mtp is not None else [])

    def moe_layers(self) -> list[MoELayer]:
        return [layer.mlp for layer in self.decoder_layers()]

    def fuse(self) -> None:
        """After loading and placing the weights: sibling projections become one matmul each; the
        main layers' weights as kernels.decoder_layers takes them (None where norms differ in eps)."""
        for layer in self.decoder_layers():
            layer.mixer().fuse()
            layer.mlp.fuse()
        parts = [layer.one_call_parts() for layer in self.layers]
        eps = set.union({self.norm.eps}, *(p[2] for p in parts))
        self.main_mlps = [layer.mlp for layer in self.layers]  # a plain list: no module lookups per step
        self.deltanet_ids = [i for i, layer in enumerate(self.layers) if layer.is_linear]
        plain = all(isinstance(w, torch.Tensor) for p in parts for w in p[1])  # not with FP8 kept as stored
        self.one_call_layers = None if len(eps) > 1 or not plain else (
            [n for p in parts for n in p[0]], tuple(w for p in parts for w in p[1]) + (self.norm.weight,), eps.pop())

    def embed(self, input_ids_T: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """Token embeddings [T, D], with the image tokens' rows taken from the vision tower's output."""
        out = self.embed_tokens(input_ids_T)
        if batch.image_rows is not None:
            out = out.index_copy(0, batch.image_rows, batch.image_embeds.to(out.dtype))
        return out

    @torch.inference_mode()
    def forward(self, input_ids_T: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """Runs the flat batch through every layer, writing the caches; returns normed hidden [T, D]."""
        out, residual = self.embed(input_ids_T, batch), None
        if self.one_call_layers is not None and one_call_forward(out) and all(m.one_call(out) for m in self.main_mlps):
            return self._forward_one_call(out, batch)
        for layer in self.layers:
            out, residual = layer.forward(out, residual, batch)
        return self.norm.add_forward(residual, out)[1]

    def _forward_one_call(self, embeds_TD: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """forward's layers as one C++ call: the same kernels in the same order as the layers' own
        one-call path (the same bits), without the Python between them."""
        layout, weights, eps = self.one_call_layers
        banks, states = [], []
        for i, (layer, mlp) in enumerate(zip(self.layers, self.main_mlps)):
            bank = mlp.experts.banks[i]  # read each step: workers may swap a layer's bank
            banks += (bank.gate_up, bank.down)
            states += ((batch.states.conv[i], batch.states.recurrent[i]) if layer.is_linear
                       else (batch.kv.key[i], batch.kv.value[i]))
        first = self.main_mlps[0]  # the executor gives every layer the same load window and timer
        out, projected, moe_seconds = decoder_layers(
            embeds_TD, weights, banks, layout, eps, states, batch.slots, batch.query_start,
            batch.slots if batch.out_slots is None else batch.out_slots, batch.positions, self.rotary.inv_freq,
            batch.slot_mapping, batch.block_tables, batch.context_lens,
            None if first.load is None else first.load.step_rows())
        if batch.rollback is not None:
            for i, projected_TP in zip(self.deltanet_ids, projected):
                batch.rollback.keep(i, projected_TP)
        if first.timer is not None:
            first.timer.add("experts", moe_seconds)
        return out

    @torch.inference_mode()
    def forward_overlapped(self, ids: list[torch.Tensor], batches: list[ForwardBatch]) -> list[torch.Tensor]:
        """Two micro-batches of different sequences, layer by layer, so that one's routed experts
        compute (on the expert workers) while the other's dense half runs here. Same function as
        forward() on each; returns each micro-batch's normed hidden."""
        outs = [self.embed(i, batch) for i, batch in zip(ids, batches)]
        residuals: list = [None] * len(ids)
        started: list = [None] * len(ids)
        previous = None
        for layer in self.layers:
            for m, batch in enumerate(batches):
                if previous is not None:
                    outs[m] = previous.mlp.finish(started[m])
                residuals[m], h = layer.attend(outs[m], residuals[m], batch)
                started[m] = layer.mlp.start(h)
            previous = layer
        return [self.norm.add_forward(residual, previous.mlp.finish(s))[1] for residual, s in zip(residuals, started)]

    @torch.inference_mode()
    def draft(self, next_ids_T: torch.Tensor, hidden_TD: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """The MTP module on rows (hidden at i, token i+1: an image token's embedding is the
        vision tower's, batch.image_rows), writing its K/V at the rows' positions (batch);
        returns its normed hidden [T, D], whose logits predict token i+2."""
        return self.mtp(self.embed(next_ids_T, batch), hidden_TD, batch)

    @torch.inference_mode()
    def logits(self, hidden_TD: torch.Tensor) -> torch.Tensor:
        return linear(hidden_TD, self.lm_head.weight).float()

    def load_dense(self, reader: CheckpointReader) -> None:
        """Copies every dense parameter from the checkpoint, checking names and shapes; weights
        kept FP8 (float8 parameters: loading.empty_model) and their scales as stored."""
        for name, param in self.named_parameters():
            if name == "lm_head.weight" and self.cfg.tie_word_embeddings:
                continue  # tied: it is embed_tokens.weight
            stored = param.dtype == FP8
            read = reader.read_stored if stored else reader.read
            tensor = read(name, expected_shape=tuple(param.shape))
            with torch.no_grad():
                param.copy_(tensor.to(param.dtype))
                if stored:
                    scale = self.get_submodule(name.rsplit(".", 1)[0]).weight_scale_inv
                    scale.copy_(reader.read_stored(name + SCALE_SUFFIX, expected_shape=tuple(scale.shape)))
