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
