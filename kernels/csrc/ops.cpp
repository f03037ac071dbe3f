// Registers epserve's CPU kernels as torch operators (torch.ops.epserve.*). The schemas are the
// kernel interface: a CUDA implementation registers under the same names for the CUDA key.
#include <torch/library.h>

#include "common.h"

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
}  // namespace epserve

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
}
