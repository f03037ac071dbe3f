"""The chunked gated delta rule against the recurrent definition."""

from __future__ import annotations

import pytest
import torch

from kernels.delta_rule import chunked_gated_delta_rule, recurrent_gated_delta_rule


def _inputs(B, L, Hk, H, dk, dv, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, L, Hk, dk, generator=g) for _ in range(2))
    v = torch.randn(B, L, H, dv, generator=g)
    decay = -torch.rand(B, L, H, generator=g) * 3
    beta = torch.rand(B, L, H, generator=g)
    return q, k, v, decay, beta


@pytest.mark.parametrize("L", [1, 5, 64, 65, 200])
@pytest.mark.parametrize("with_state", [False, True])
def test_chunked_equals_recurrent(L, with_state):
    q, k, v, g, beta = _inputs(2, L, 2, 4, 16, 8)
    state = torch.randn(2, 4, 16, 8) if with_state else None
    out_r, s_r = recurrent_gated_delta_rule(q, k, v, g, beta, state)
    out_c, s_c = chunked_gated_delta_rule(q, k, v, g, beta, state, chunk_size=16)
    assert (out_r - out_c).abs().max() < 1e-5
    assert (s_r - s_c).abs().max() < 1e-5


def test_split_prefill_equals_whole():
    """Prefill in two pieces, handing the state over, equals one pass (what chunked prefill does)."""
    q, k, v, g, beta = _inputs(1, 100, 2, 4, 16, 8, seed=1)
    whole, s_whole = chunked_gated_delta_rule(q, k, v, g, beta)
    first, s1 = chunked_gated_delta_rule(q[:, :37], k[:, :37], v[:, :37], g[:, :37], beta[:, :37])
    rest, s2 = chunked_gated_delta_rule(q[:, 37:], k[:, 37:], v[:, 37:], g[:, 37:], beta[:, 37:], s1)
    assert (torch.cat([first, rest], 1) - whole).abs().max() < 1e-5
    assert (s2 - s_whole).abs().max() < 1e-5


def test_matches_transformers_kernels():
    from transformers.models.qwen3_5_moe import modeling_qwen3_5_moe as ref

    q, k, v, g, beta = _inputs(1, 70, 2, 4, 16, 8, seed=2)
    state = torch.randn(1, 4, 16, 8)
    ours, our_state = chunked_gated_delta_rule(q, k, v, g, beta, state)
    theirs, their_state = ref.torch_chunk_gated_delta_rule(
        q, k, v, g=g, beta=beta, initial_state=state, output_final_state=True,
        use_qk_l2norm_in_kernel=True,
    )
    assert (ours - theirs).abs().max() < 1e-5
    assert (our_state - their_state).abs().max() < 1e-5
