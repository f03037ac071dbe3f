// Composite layer ops: a sublayer's kernels called one after the other from C++, so a step pays one
// Python call and one dispatch per sublayer instead of ~10 ops and ~20 small tensor calls between
// them (at batch 1 that glue took two thirds of the kernels' time). They call the very kernels the
// model's plain path calls, in the same order: the results are the same bits
// (tests/kernels/test_layers.py).
//   deltanet_mixer: Gated DeltaNet (attention/deltanet.py) -> (out [T, D], projected [T, P])
//   attention_mixer: gated attention (attention/gated_attention.py) -> out [T, D]
//   moe_block: router, top-k (counted into the load window), the whole local bank, shared expert
//     (router/moe_layer.py) -> out [T, D]
//   decoder_layers: every main layer, from the embeddings to the final norm (cluster/model/model.py's
//     forward: norm, mixer, norm, MoE block per layer, each residual add fused into the next norm)
//     -> (normed hidden [T, D], each DeltaNet layer's projection in layer order, seconds in the MoE
//     blocks). The Python between the ~33 calls of a batch-1 forward took a seventh of its time.
#include <chrono>

#include "common.h"
#include "ops.h"

namespace epserve {

std::tuple<at::Tensor, at::Tensor> deltanet_mixer(
    const at::Tensor& x, const at::Tensor& in_proj, const at::Tensor& conv_weight, const at::Tensor& A_log,
    const at::Tensor& dt_bias, const at::Tensor& norm_weight, double eps, const at::Tensor& out_proj,
    at::Tensor& conv_state, at::Tensor& recurrent_state, const at::Tensor& slots, const at::Tensor& query_start,
    const at::Tensor& out_slots, int64_t num_key_heads, int64_t key_head_dim, int64_t num_value_heads,
    int64_t value_head_dim) {
  const int64_t T = x.size(0), Hk = num_key_heads, dk = key_head_dim, H = num_value_heads, dv = value_head_dim;
  const int64_t key_dim = Hk * dk, value_dim = H * dv, conv_channels = 2 * key_dim + value_dim;
  auto projected = linear_rows(x, in_proj);  // [T, C + H dv + 2H]: qkv | z | b | a
  auto parts = projected.split_with_sizes({conv_channels, value_dim, H, H}, -1);
  auto mixed = causal_conv1d(parts[0], conv_weight, conv_state, slots, query_start, out_slots);
  auto qkv = mixed.split_with_sizes({key_dim, key_dim, value_dim}, -1);
  auto out = delta_rule(qkv[0].view({T, Hk, dk}), qkv[1].view({T, Hk, dk}), qkv[2].view({T, H, dv}), parts[3],
                        parts[2], A_log, dt_bias, recurrent_state, slots, query_start, out_slots);
  auto normed = gated_rms_norm(out, parts[1].view({T, H, dv}), norm_weight, eps);
  return {linear_rows(normed.view({T, value_dim}), out_proj), projected};
}

at::Tensor attention_mixer(const at::Tensor& x, const at::Tensor& qkv_weight, const at::Tensor& q_norm_weight,
                           const at::Tensor& k_norm_weight, double eps, const at::Tensor& positions,
                           const at::Tensor& inv_freq, at::Tensor& key_cache, at::Tensor& value_cache,
                           const at::Tensor& slot_mapping, const at::Tensor& block_tables,
                           const at::Tensor& query_start, const at::Tensor& context_lens, double scale,
                           const at::Tensor& o_proj, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim) {
  const int64_t T = x.size(0), H = num_heads, KV = num_kv_heads, hd = head_dim, width = H * hd;
  auto parts = linear_rows(x, qkv_weight).split_with_sizes({2 * width, KV * hd, KV * hd}, -1);
  auto query_and_gate = parts[0].view({T, H, 2 * hd}).split(hd, -1);
  auto [query, key] = qk_norm_rope(query_and_gate[0], parts[1].view({T, KV, hd}), q_norm_weight, k_norm_weight,
                                   eps, positions, inv_freq);
  write_kv(key_cache, value_cache, key, parts[2].view({T, KV, hd}), slot_mapping);
  auto out = paged_attention(query, key_cache, value_cache, block_tables, query_start, context_lens, scale);
  auto gated = out.reshape({T, width}) * at::sigmoid(query_and_gate[1].reshape({T, width}));
  return linear_rows(gated, o_proj);
}

at::Tensor moe_block(const at::Tensor& x, const at::Tensor& router, int64_t top_k, const at::Tensor& gate_up,
                     const at::Tensor& down, const at::Tensor& shared_gate_up, const at::Tensor& shared_down,
                     const std::optional<at::Tensor>& expert_counts) {
  const int64_t E = router.size(0) - 1;  // the router's rows, then the shared expert's gate
  auto logits = linear_rows(x, router);
  auto [idx, weights] = topk_softmax(logits.narrow(1, 0, E), top_k);
  if (expert_counts.has_value()) {  // the load window's row of this layer: +1 per routed pair
    TORCH_CHECK(expert_counts->scalar_type() == at::kLong && expert_counts->numel() == E &&
                    expert_counts->stride(0) == 1,
                "expert_counts must be a contiguous int64 [E]");
    int64_t* counts = expert_counts->data_ptr<int64_t>();
    const int64_t* ip = idx.data_ptr<int64_t>();
    for (int64_t p = 0; p < idx.numel(); ++p) ++counts[ip[p]];
  }
  auto routed = moe_experts(x, idx, weights, gate_up, down, false);
  return shared_expert(x, shared_gate_up, shared_down, logits.narrow(1, E, 1), routed);
}

std::tuple<at::Tensor, std::vector<at::Tensor>, double> decoder_layers(
    const at::Tensor& embeds, at::TensorList weights, at::TensorList banks, at::IntArrayRef layout, double eps,
    at::TensorList states, const at::Tensor& slots, const at::Tensor& query_start, const at::Tensor& out_slots,
    const at::Tensor& positions, const at::Tensor& inv_freq, const at::Tensor& slot_mapping,
    const at::Tensor& block_tables, const at::Tensor& context_lens, const std::optional<at::Tensor>& expert_counts) {
  const int64_t L = static_cast<int64_t>(layout.size()) / kLayerLayout;
  TORCH_CHECK(L >= 1 && static_cast<int64_t>(layout.size()) == L * kLayerLayout, "layout must hold ",
              kLayerLayout, " ints per layer");
  TORCH_CHECK(static_cast<int64_t>(states.size()) == 2 * L && static_cast<int64_t>(banks.size()) == 2 * L,
              "states and banks must hold two tensors per layer");
  TORCH_CHECK(!expert_counts.has_value() || (expert_counts->dim() == 2 && expert_counts->size(0) >= L),
              "expert_counts must be [layers, E]");
  size_t cursor = 0;
  auto next = [&]() -> const at::Tensor& {
    TORCH_CHECK(cursor < weights.size(), "weights end before layout does");
    return weights[cursor++];
  };
  at::Tensor out = embeds, residual, h;
  std::vector<at::Tensor> projected;
  double moe_seconds = 0.0;
  for (int64_t l = 0; l < L; ++l) {
    const int64_t* spec = layout.data() + l * kLayerLayout;  // kind, four head sizes, top-k
    const at::Tensor &input_norm = next(), &post_norm = next();
    if (l == 0) {
      residual = out;
      h = rms_norm(out, input_norm, eps);
    } else {
      std::tie(residual, h) = add_rms_norm(residual, out, input_norm, eps);
    }
    at::Tensor state_a = states[2 * l], state_b = states[2 * l + 1], mixed;
    if (spec[0] == kDeltaNetLayer) {
      const at::Tensor &in_proj = next(), &conv_weight = next(), &A_log = next(), &dt_bias = next();
      const at::Tensor &norm_weight = next(), &out_proj = next();
      at::Tensor layer_projected;
      std::tie(mixed, layer_projected) =
          deltanet_mixer(h, in_proj, conv_weight, A_log, dt_bias, norm_weight, eps, out_proj, state_a, state_b,
                         slots, query_start, out_slots, spec[1], spec[2], spec[3], spec[4]);
      projected.push_back(layer_projected);
    } else {
      TORCH_CHECK(spec[0] == kAttentionLayer, "layer ", l, " has unknown kind ", spec[0]);
      const at::Tensor &qkv = next(), &q_norm = next(), &k_norm = next(), &o_proj = next();
      mixed = attention_mixer(h, qkv, q_norm, k_norm, eps, positions, inv_freq, state_a, state_b, slot_mapping,
                              block_tables, query_start, context_lens, std::pow(static_cast<double>(spec[3]), -0.5),
                              o_proj, spec[1], spec[2], spec[3]);
    }
    std::tie(residual, h) = add_rms_norm(residual, mixed, post_norm, eps);
    const at::Tensor &router = next(), &shared_gate_up = next(), &shared_down = next();
    const at::Tensor &gate_up = banks[2 * l], &down = banks[2 * l + 1];
    std::optional<at::Tensor> counts;
    if (expert_counts.has_value()) counts = expert_counts->select(0, l);
    const auto start = std::chrono::steady_clock::now();
    out = moe_block(h, router, spec[5], gate_up, down, shared_gate_up, shared_down, counts);
    moe_seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  }
  const at::Tensor& final_norm = next();
  TORCH_CHECK(cursor == weights.size(), "weights hold ", weights.size() - cursor, " tensors past the layout");
  return {std::get<1>(add_rms_norm(residual, out, final_norm, eps)), projected, moe_seconds};
}

}  // namespace epserve
