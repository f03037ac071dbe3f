"""transformers' Qwen3.5-MoE as the test reference (a test-only dependency)."""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=4)
def hf_model(model_dir: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@torch.no_grad()
def hf_logits(model_dir: str, token_ids: list[int]) -> torch.Tensor:
    return hf_model(model_dir)(torch.tensor([token_ids])).logits[0].float()


@torch.no_grad()
def hf_greedy(model_dir: str, token_ids: list[int], max_new_tokens: int) -> list[int]:
    out = hf_model(model_dir).generate(
        torch.tensor([token_ids]),
        max_new_tokens=max_new_tokens,
        min_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )
    return out[0, len(token_ids):].tolist()


def expert_mix(x_TD: torch.Tensor, idx_TK: torch.Tensor, weights_TK: torch.Tensor, gate_up: torch.Tensor,
               down: torch.Tensor) -> torch.Tensor:
    """sum_k w[t, k] * SwiGLU of expert idx[t, k] on x[t], token by token (obviously right; fp32)."""
    out = torch.zeros(x_TD.shape[0], x_TD.shape[1])
    for t in range(x_TD.shape[0]):
        for k in range(idx_TK.shape[1]):
            e = int(idx_TK[t, k])
            if e >= 0:
                gate, up = (gate_up[e].float() @ x_TD[t].float()).chunk(2)
                out[t] += weights_TK[t, k].float() * (down[e].float() @ (torch.nn.functional.silu(gate) * up))
    return out


# -- images: transformers' Qwen3_5MoeForConditionalGeneration and Qwen's image processor ------------
@functools.lru_cache(maxsize=2)
def hf_vl_model(model_dir: str):
    from transformers import Qwen3_5MoeForConditionalGeneration

    return Qwen3_5MoeForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()


def hf_image_processor(vision):
    """transformers' own (Pillow) image processor with the checkpoint's settings."""
    from transformers import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(
        patch_size=vision.patch_size, merge_size=vision.spatial_merge_size,
        temporal_patch_size=vision.temporal_patch_size, image_mean=list(vision.image_mean),
        image_std=list(vision.image_std), size={"shortest_edge": vision.min_pixels, "longest_edge": vision.max_pixels})


def hf_vl_inputs(model_dir: str, ids: list[int], images: list) -> dict:
    """The reference's inputs for a prompt whose images sit at its single <|image_pad|> tokens."""
    from cluster.config import ModelConfig

    cfg = ModelConfig.from_pretrained(model_dir)
    processed = hf_image_processor(cfg.vision)(images, return_tensors="pt")
    counts = iter(int(g.prod()) // cfg.vision.spatial_merge_size**2 for g in processed["image_grid_thw"])
    expanded = [t for token in ids for t in ([token] * next(counts) if token == cfg.image_token_id else [token])]
    input_ids = torch.tensor([expanded])
    return {"input_ids": input_ids, "pixel_values": processed["pixel_values"],
            "image_grid_thw": processed["image_grid_thw"],
            "mm_token_type_ids": (input_ids == cfg.image_token_id).int()}


@torch.no_grad()
def hf_vl_logits(model_dir: str, ids: list[int], images: list) -> torch.Tensor:
    return hf_vl_model(model_dir)(**hf_vl_inputs(model_dir, ids, images)).logits[0].float()


@torch.no_grad()
def hf_vl_greedy(model_dir: str, ids: list[int], images: list, max_new_tokens: int) -> list[int]:
    inputs = hf_vl_inputs(model_dir, ids, images)
    out = hf_vl_model(model_dir).generate(**inputs, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                                          do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, inputs["input_ids"].shape[1]:].tolist()
