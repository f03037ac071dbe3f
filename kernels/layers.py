"""Composite sublayer ops: a mixer or a MoE block as one C++ call (kernels/csrc/layers.cpp).

At batch 1 the Python and the ~20 small tensor calls between a sublayer's ~10 kernels (views,
splits, wrappers, dispatch) took about two thirds of the kernels' own time; each composite runs the
same kernels in the same order from C++, so its results are the same bits as the model's op-by-op
path, which stays the reference (and the path off CPU). The model calls these when `one_call(x)` holds.
`decoder_layers` runs a whole forward's layers so (the Python between the ~33 calls of a batch-1
forward took about a seventh of it).
Shapes: T rows, D hidden, P the DeltaNet's fused projection width, K top-k, L layers, E experts.
"""

from __future__ import annotations

import torch


def deltanet_mixer(x_TD, in_proj, conv_weight, A_log, dt_bias, norm_weight, eps: float, out_proj, conv_state,
                   recurrent_state, slots, query_start, out_slots, heads: tuple[int, int, int, int]):
    """Gated DeltaNet (attention.deltanet) on a flat batch -> (out [T, D], projected [T, P]);
    heads = (key heads, key head dim, value heads, value head dim)."""
    return torch.ops.epserve.deltanet_mixer(x_TD, in_proj, conv_weight, A_log, dt_bias, norm_weight, eps, out_proj,
                                            conv_state, recurrent_state, slots, query_start, out_slots, *heads)


def attention_mixer(x_TD, qkv, q_norm_weight, k_norm_weight, eps: float, positions, inv_freq, key_cache,
                    value_cache, slot_mapping, block_tables, query_start, context_lens, scale: float, o_proj,
                    heads: tuple[int, int, int]) -> torch.Tensor:
    """Gated attention (attention.gated_attention) on a flat batch -> [T, D]; heads = (query heads,
    kv heads, head dim)."""
    return torch.ops.epserve.attention_mixer(x_TD, qkv, q_norm_weight, k_norm_weight, eps, positions, inv_freq,
                                             key_cache, value_cache, slot_mapping, block_tables, query_start,
                                             context_lens, scale, o_proj, *heads)


def moe_block(x_TD, router, top_k: int, gate_up, down, shared_gate_up, shared_down,
              expert_counts_E: torch.Tensor | None) -> torch.Tensor:
    """Router (its last row the shared expert's gate), top-k, the bank of every expert, shared expert
    (router.moe_layer, one process) -> out [T, D]; adds each routed pair to expert_counts (int64,
    the load window's row of the layer) when given."""
    return torch.ops.epserve.moe_block(x_TD, router, top_k, gate_up, down, shared_gate_up, shared_down,
                                       expert_counts_E)


DELTANET_LAYER, ATTENTION_LAYER = 0, 1  # decoder_layers' layer kinds (kernels/csrc/ops.h)


def decoder_layers(embeds_TD, weights: tuple, banks: list, layout: list[int], eps: float, states: list, slots,
                   query_start, out_slots, positions, inv_freq, slot_mapping, block_tables, context_lens,
                   expert_counts_LE: torch.Tensor | None) -> tuple[torch.Tensor, list[torch.Tensor], float]:
    """The model's main layers (cluster.model.model's forward) from the embeddings to the final norm
    -> (normed hidden [T, D], each DeltaNet layer's projection [T, P] in layer order, seconds spent in
    the MoE blocks). Per layer, layout holds 6 ints (kind, four head sizes as deltanet_mixer /
    attention_mixer take them, top-k); weights its input and post norms, its mixer's weights, router,
    shared gate_up and down, then the final norm last; banks its (gate_up, down); states its (conv,
    recurrent) or (key, value) caches, written in place. expert_counts: the load window's step row."""
    return torch.ops.epserve.decoder_layers(embeds_TD, weights, banks, layout, eps, states, slots, query_start,
                                            out_slots, positions, inv_freq, slot_mapping, block_tables, context_lens,
                                            expert_counts_LE)
