// The C++ signatures of epserve's CPU kernels (registered as torch operators in ops.cpp), for the
// composite layer ops (layers.cpp) to call directly: no dispatcher and no Python between them.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace epserve {
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);
std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const at::Tensor& delta,
                                                const at::Tensor& weight, double eps);
at::Tensor gated_rms_norm(const at::Tensor& x, const at::Tensor& z, const at::Tensor& weight, double eps);
at::Tensor causal_conv1d(const at::Tensor& x, const at::Tensor& weight, at::Tensor& state,
                         const at::Tensor& slots, const at::Tensor& query_start, const at::Tensor& out_slots);
at::Tensor delta_rule(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& a,
                      const at::Tensor& b, const at::Tensor& A_log, const at::Tensor& dt_bias,
                      at::Tensor& state, const at::Tensor& slots, const at::Tensor& query_start,
                      const at::Tensor& out_slots);
at::Tensor paged_attention(const at::Tensor& query, const at::Tensor& key_cache,
                           const at::Tensor& value_cache, const at::Tensor& block_tables,
                           const at::Tensor& query_start, const at::Tensor& context_lens, double scale);
void write_kv(at::Tensor& key_cache, at::Tensor& value_cache, const at::Tensor& key, const at::Tensor& value,
              const at::Tensor& slot_mapping);
std::tuple<at::Tensor, at::Tensor> topk_softmax(const at::Tensor& logits, int64_t K);
at::Tensor moe_experts(const at::Tensor& x, const at::Tensor& idx, const at::Tensor& weights,
                       const at::Tensor& gate_up, const at::Tensor& down, bool partial);
at::Tensor linear_rows(const at::Tensor& x, const at::Tensor& weight);
std::tuple<at::Tensor, at::Tensor> qk_norm_rope(const at::Tensor& query, const at::Tensor& key,
                                                const at::Tensor& q_weight, const at::Tensor& k_weight,
                                                double eps, const at::Tensor& positions,
                                                const at::Tensor& inv_freq);
at::Tensor shared_expert(const at::Tensor& x, const at::Tensor& gate_up, const at::Tensor& down,
                         const at::Tensor& gate_logit, const at::Tensor& routed);
// layers.cpp: composite ops over the kernels above
std::tuple<at::Tensor, at::Tensor> deltanet_mixer(
    const at::Tensor& x, const at::Tensor& in_proj, const at::Tensor& conv_weight, const at::Tensor& A_log,
    const at::Tensor& dt_bias, const at::Tensor& norm_weight, double eps, const at::Tensor& out_proj,
    at::Tensor& conv_state, at::Tensor& recurrent_state, const at::Tensor& slots, const at::Tensor& query_start,
    const at::Tensor& out_slots, int64_t num_key_heads, int64_t key_head_dim, int64_t num_value_heads,
    int64_t value_head_dim);
at::Tensor attention_mixer(const at::Tensor& x, const at::Tensor& qkv_weight, const at::Tensor& q_norm_weight,
                           const at::Tensor& k_norm_weight, double eps, const at::Tensor& positions,
                           const at::Tensor& inv_freq, at::Tensor& key_cache, at::Tensor& value_cache,
                           const at::Tensor& slot_mapping, const at::Tensor& block_tables,
                           const at::Tensor& query_start, const at::Tensor& context_lens, double scale,
                           const at::Tensor& o_proj, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim);
at::Tensor moe_block(const at::Tensor& x, const at::Tensor& router, int64_t top_k, const at::Tensor& gate_up,
                     const at::Tensor& down, const at::Tensor& shared_gate_up, const at::Tensor& shared_down,
                     const std::optional<at::Tensor>& expert_counts);
// decoder_layers' layout: per layer kind, four head sizes (DeltaNet: key heads, key head dim, value
// heads, value head dim; attention: heads, kv heads, head dim, 0), top-k
constexpr int64_t kLayerLayout = 6, kDeltaNetLayer = 0, kAttentionLayer = 1;
std::tuple<at::Tensor, std::vector<at::Tensor>, double> decoder_layers(
    const at::Tensor& embeds, at::TensorList weights, at::TensorList banks, at::IntArrayRef layout, double eps,
    at::TensorList states, const at::Tensor& slots, const at::Tensor& query_start, const at::Tensor& out_slots,
    const at::Tensor& positions, const at::Tensor& inv_freq, const at::Tensor& slot_mapping,
    const at::Tensor& block_tables, const at::Tensor& context_lens, const std::optional<at::Tensor>& expert_counts);
}  // namespace epserve
