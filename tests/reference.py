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
