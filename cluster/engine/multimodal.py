"""Prompts with images, on the engine's side: each image becomes its run of image tokens in the
prompt (as many as the vision tower gives it embeddings), and its encoder cost in the token budget.

A prompt with images is a dict: {"prompt": text, or "prompt_token_ids": ids, "images": [...]}, each
image a PIL image, encoded bytes, a file path or a vision.PreparedImage. Image i goes where the
prompt's i-th `<|image_pad|>` is (a run of them counts as one: the front door sends them already
expanded), so a chat template's `<|vision_start|><|image_pad|><|vision_end|>` places them; a
prompt without any gets them at its start, each wrapped in vision start / end tokens.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from vision import ImageLimits, PreparedImage, image_spans, load_image

from ..config import ModelConfig

Span = tuple[int, PreparedImage]  # (index of the image's first token in the prompt, the image)


def place_images(ids: list[int], images: list[PreparedImage], cfg: ModelConfig) -> tuple[list[int], tuple[Span, ...]]:
    """The prompt's ids with each image's placeholder expanded to its tokens, and where each starts."""
    pad, merge = cfg.image_token_id, cfg.vision.spatial_merge_size
    if pad not in ids:
        ids = [t for _ in images for t in (cfg.vision_start_token_id, pad, cfg.vision_end_token_id)] + ids
    placeholders = [i for i, t in enumerate(ids) if t == pad and (i == 0 or ids[i - 1] != pad)]
    if len(placeholders) != len(images):
        raise ValueError(f"the prompt has {len(placeholders)} image placeholders (<|image_pad|>) for "
                         f"{len(images)} images")
    out: list[int] = []
    for i, t in enumerate(ids):
        if t != pad:
            out.append(t)
        elif i in placeholders:
            out.extend([pad] * images[placeholders.index(i)].num_tokens(merge))
    starts = image_spans(out, pad, [image.grid for image in images], merge)
    return out, tuple(zip(starts, images))


def multimodal_prompt(prompt: dict, tokenize: Callable[[str | list[int]], list[int]], cfg: ModelConfig,
                      limits: ImageLimits = ImageLimits()) -> tuple[list[int], tuple[Span, ...]]:
    """A dict prompt -> (token ids with the image tokens in place, image spans); ValueError naming
    what is wrong (no vision tower, bad keys, undecodable images, placeholders that do not match)."""
    unknown = set(prompt) - {"prompt", "prompt_token_ids", "images"}
    if unknown:
        raise ValueError(f"unknown prompt keys {sorted(unknown)}: expected prompt or prompt_token_ids, and images")
    if ("prompt" in prompt) == ("prompt_token_ids" in prompt):
        raise ValueError("a dict prompt needs exactly one of 'prompt' (text) and 'prompt_token_ids'")
    images = list(prompt.get("images") or [])
    ids = tokenize(prompt["prompt"] if "prompt" in prompt else list(prompt["prompt_token_ids"]))
    if not images:
        return ids, ()
    if cfg.vision is None:
        raise ValueError("this model has no vision tower (its config.json has no vision_config): send text only")
    return place_images(ids, [load_image(image, cfg.vision, limits) for image in images], cfg)


def text_flops_per_token(cfg: ModelConfig) -> int:
    """Multiply-adds of the text model per token (projections, shared expert, top-k experts, head)."""
    D = cfg.hidden_size
    attention = D * cfg.head_dim * (3 * cfg.num_attention_heads + 2 * cfg.num_key_value_heads)
    kd, vd = cfg.linear_num_key_heads * cfg.linear_key_head_dim, cfg.linear_num_value_heads * cfg.linear_value_head_dim
    deltanet = D * (2 * kd + 3 * vd + 2 * cfg.linear_num_value_heads)
    moe = 3 * D * (cfg.moe_intermediate_size * cfg.num_experts_per_tok + cfg.shared_expert_intermediate_size)
    mixers = sum(deltanet if kind == "linear_attention" else attention for kind in cfg.layer_types)
    return mixers + cfg.num_hidden_layers * (moe + D * cfg.num_experts) + D * cfg.vocab_size


def vision_cost_tokens(cfg: ModelConfig, images: tuple[Span, ...]) -> int:
    """The vision tower's work on these images, in text tokens of the same work (the step's
    token budget counts it on the step that encodes them)."""
    if not images:
        return 0
    patches = sum(image.num_patches() for _, image in images)
    return math.ceil(patches * cfg.vision.flops_per_patch() / text_flops_per_token(cfg))
