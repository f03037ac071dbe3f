"""The flagship-width slice benchmarks/gpu_check.py runs the engine on: its config.json (the
flagship's widths, some overrides) in a scratch directory, and a LocalExecutor that makes random
weights on the device instead of loading a checkpoint (no 50 GB to write; seeded, so the fp32 and
bf16 engines of one run share them), or (RandomWeightsExecutor.fp8_block) random FP8 ones as an FP8
checkpoint's are held: the experts and the dense linear layers Qwen's release stores FP8."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from scratch import scratch_dir

from attention.norm import GatedRMSNorm, RMSNorm
from cluster.config import ModelConfig
from cluster.engine.executors.local import LocalExecutor
from cluster.engine.memory_plan import FLAGSHIP
from cluster.model.loading import empty_model, fp8_dense_names
from cluster.model.model import Qwen35MoeModel
from cluster.model.quantization import FP8, keep_fp8_as_stored
from experts import ExpertBank, ExpertShard
from kernels.moe import Fp8Scales


def random_model(cfg: ModelConfig, dtype: torch.dtype, device: str, seed: int) -> Qwen35MoeModel:
    """The dense model, built on meta and filled on the device: linear weights N(0, 1/in), norms
    as their modules start, DeltaNet decay parameters in a trained model's range."""
    torch.manual_seed(seed)
    model = empty_model(cfg, torch.float32, device)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                p.uniform_(0, math.log(16))
            elif name.endswith("dt_bias"):
                p.fill_(1.0)
            elif p.dim() >= 2:
                p.normal_(0, 1 / math.sqrt(p.shape[-1]))
            else:
                p.zero_()
        for m in model.modules():
            if isinstance(m, GatedRMSNorm):
                m.weight.fill_(1.0)
            elif isinstance(m, RMSNorm):
                m.weight.zero_()  # (1 + w) scaling
    return model.to(dtype).eval()


def random_experts(cfg: ModelConfig, dtype: torch.dtype, device: str, seed: int) -> ExpertShard:
    g = torch.Generator(device=device).manual_seed(seed + 1)
    N, D, I = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
    banks = {}
    for layer in cfg.moe_layer_ids:
        gate_up = torch.empty(N, 2 * I, D, dtype=dtype, device=device)
        down = torch.empty(N, D, I, dtype=dtype, device=device)
        for e in range(0, N, 64):  # in pieces: no fp32 copy of a whole layer
            gate_up[e:e + 64] = torch.randn(gate_up[e:e + 64].shape, generator=g, device=device) / math.sqrt(D)
            down[e:e + 64] = torch.randn(down[e:e + 64].shape, generator=g, device=device) / math.sqrt(I)
        banks[layer] = ExpertBank(tuple(range(N)), gate_up, down)
    return ExpertShard(N, banks)


def fp8_random(shape: tuple[int, ...], block: tuple[int, int], device: str, generator=None):
    """Random FP8 weights [..., out, in] (N(0, 1) values) and block scales 1/sqrt(in): dequantised,
    N(0, 1/in) like random_model's (gpu_probes' FP8 weights too)."""
    *lead, out, inp = shape
    weight = torch.randn(shape, generator=generator, device=device).to(FP8)
    scale = torch.full((*lead, -(-out // block[0]), -(-inp // block[1])), 1 / math.sqrt(inp), device=device)
    return weight, scale


def to_fp8(model: Qwen35MoeModel, block: tuple[int, int], device: str, seed: int) -> None:
    """The dense linear layers Qwen's FP8 release stores FP8 made random FP8 weights held as stored."""
    g = torch.Generator(device=device).manual_seed(seed + 2)
    for name in fp8_dense_names(model.cfg, None):
        layer = model.get_submodule(name.removesuffix(".weight"))
        weight, scale = fp8_random(tuple(layer.weight.shape), block, device, g)
        keep_fp8_as_stored(layer, block)
        layer.weight.data.copy_(weight)
        layer.weight_scale_inv.copy_(scale)


def random_fp8_experts(cfg: ModelConfig, block: tuple[int, int], device: str, seed: int) -> ExpertShard:
    g = torch.Generator(device=device).manual_seed(seed + 1)
    N, D, I = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
    banks = {}
    for layer in cfg.moe_layer_ids:
        (gate_up, gate_up_scale), (down, down_scale) = (fp8_random((N, 2 * I, D), block, device, g),
                                                        fp8_random((N, D, I), block, device, g))
        banks[layer] = ExpertBank(tuple(range(N)), gate_up, down, Fp8Scales(gate_up_scale, down_scale, block))
    return ExpertShard(N, banks)


class RandomWeightsExecutor(LocalExecutor):
    """LocalExecutor over random weights made on the device (seeded: fp32 and bf16 runs share them)."""

    seed = 0
    fp8_block: tuple[int, int] | None = None  # random FP8 experts and dense layers, kept as stored
    cpu_graphs = False  # --smoke: the decode graphs' static path on a CPU too (eagerly), so it is exercised

    def __init__(self, cfg, model_dir, dtype, layout, load_window_steps=64, device="cpu", decode_graphs=False,
                 compile_glue=True, fp8_activations=False) -> None:
        from router import LocalDispatcher

        from cluster.worker.runner import ModelRunner
        from cluster.worker.timing import PhaseTimer
        from kernels import use_fp8_activations

        use_fp8_activations(fp8_activations)
        model = random_model(cfg, dtype, device, self.seed)
        if self.fp8_block is not None:
            to_fp8(model, self.fp8_block, device, self.seed)
            shard = random_fp8_experts(cfg, self.fp8_block, device, self.seed)
        else:
            shard = random_experts(cfg, dtype, device, self.seed)
        dispatcher, self.timer = LocalDispatcher(shard.local_index), PhaseTimer()
        for moe in model.moe_layers():
            moe.dispatcher, moe.experts, moe.timer = dispatcher, shard, self.timer
        self.runner = ModelRunner(model, layout, load_window_steps=load_window_steps,
                                  decode_graphs=decode_graphs or self.cpu_graphs, compile_glue=compile_glue)
        self.expert_bytes = shard.nbytes


def slice_dir(overrides: dict) -> str:
    path = Path(scratch_dir(prefix="epserve-gpu-check-"))
    (path / "config.json").write_text(json.dumps({**FLAGSHIP, **overrides}))
    return str(path)
