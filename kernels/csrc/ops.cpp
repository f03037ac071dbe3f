// Registers epserve's CPU kernels as torch operators (torch.ops.epserve.*). The schemas are the
// kernel interface: a CUDA implementation registers under the same names for the CUDA key.
#include <torch/library.h>

#include "common.h"
#include "ops.h"

TORCH_LIBRARY(epserve, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("add_rms_norm(Tensor x, Tensor delta, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def("gated_rms_norm(Tensor x, Tensor z, Tensor weight, float eps) -> Tensor");
  m.def("causal_conv1d(Tensor x, Tensor weight, Tensor(a!) state, Tensor slots, Tensor query_start, "
        "Tensor out_slots) -> Tensor");
  m.def("delta_rule(Tensor q, Tensor k, Tensor v, Tensor a, Tensor b, Tensor A_log, "
        "Tensor dt_bias, Tensor(a!) state, Tensor slots, Tensor query_start, Tensor out_slots) -> Tensor");
  m.def("paged_attention(Tensor query, Tensor key_cache, Tensor value_cache, Tensor block_tables, "
        "Tensor query_start, Tensor context_lens, float scale) -> Tensor");
  m.def("write_kv(Tensor(a!) key_cache, Tensor(b!) value_cache, Tensor key, Tensor value, Tensor slot_mapping) -> ()");
  m.def("topk_softmax(Tensor logits, int k) -> (Tensor, Tensor)");
  m.def("linear_rows(Tensor x, Tensor weight) -> Tensor");
  m.def("qk_norm_rope(Tensor query, Tensor key, Tensor q_weight, Tensor k_weight, float eps, "
        "Tensor positions, Tensor inv_freq) -> (Tensor, Tensor)");
  m.def("shared_expert(Tensor x, Tensor gate_up, Tensor down, Tensor gate_logit, Tensor routed) -> Tensor");
  m.def("moe_experts(Tensor x, Tensor idx, Tensor weights, Tensor gate_up, Tensor down, bool partial) -> Tensor");
  m.def("deltanet_mixer(Tensor x, Tensor in_proj, Tensor conv_weight, Tensor A_log, Tensor dt_bias, "
        "Tensor norm_weight, float eps, Tensor out_proj, Tensor(a!) conv_state, Tensor(b!) recurrent_state, "
        "Tensor slots, Tensor query_start, Tensor out_slots, int num_key_heads, int key_head_dim, "
        "int num_value_heads, int value_head_dim) -> (Tensor, Tensor)");
  m.def("attention_mixer(Tensor x, Tensor qkv_weight, Tensor q_norm_weight, Tensor k_norm_weight, float eps, "
        "Tensor positions, Tensor inv_freq, Tensor(a!) key_cache, Tensor(b!) value_cache, Tensor slot_mapping, "
        "Tensor block_tables, Tensor query_start, Tensor context_lens, float scale, Tensor o_proj, "
        "int num_heads, int num_kv_heads, int head_dim) -> Tensor");
  m.def("moe_block(Tensor x, Tensor router, int top_k, Tensor gate_up, Tensor down, Tensor shared_gate_up, "
        "Tensor shared_down, Tensor(a!)? expert_counts) -> Tensor");
  m.def("decoder_layers(Tensor embeds, Tensor[] weights, Tensor[] banks, int[] layout, float eps, "
        "Tensor(a!)[] states, Tensor slots, Tensor query_start, Tensor out_slots, Tensor positions, Tensor inv_freq, "
        "Tensor slot_mapping, Tensor block_tables, Tensor context_lens, Tensor(b!)? expert_counts) "
        "-> (Tensor, Tensor[], float)");
}

TORCH_LIBRARY_IMPL(epserve, CPU, m) {
  m.impl("rms_norm", &epserve::rms_norm);
  m.impl("add_rms_norm", &epserve::add_rms_norm);
  m.impl("gated_rms_norm", &epserve::gated_rms_norm);
  m.impl("causal_conv1d", &epserve::causal_conv1d);
  m.impl("delta_rule", &epserve::delta_rule);
  m.impl("paged_attention", &epserve::paged_attention);
  m.impl("write_kv", &epserve::write_kv);
  m.impl("topk_softmax", &epserve::topk_softmax);
  m.impl("linear_rows", &epserve::linear_rows);
  m.impl("qk_norm_rope", &epserve::qk_norm_rope);
  m.impl("shared_expert", &epserve::shared_expert);
  m.impl("moe_experts", &epserve::moe_experts);
  m.impl("deltanet_mixer", &epserve::deltanet_mixer);
  m.impl("attention_mixer", &epserve::attention_mixer);
  m.impl("moe_block", &epserve::moe_block);
  m.impl("decoder_layers", &epserve::decoder_layers);
}
