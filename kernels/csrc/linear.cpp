// Row-wise products: each output element is summed in one fixed order whatever the batch
// (gemv.h), so a row's result does not depend on the rows beside it; the weight is streamed in
// memory order, split across threads by blocks of output columns.
//   linear_rows: x [M, K] (rows may be strided), weight [N, K]  ->  y [M, N] = x W^T
//   shared_expert: routed + sigmoid(gate_logit) * down (silu(gate) * up) with gate | up = x W_gu^T,
//     x [M, D], gate_up [2I, D], down [D, I], gate_logit [M, 1], routed [M, D] -> [M, D]
//     (intermediates rounded through the storage dtype as the reference's separate ops round them)
#include "common.h"
#include "gemv.h"

namespace epserve {

namespace {

template <typename T>
std::vector<const T*> row_pointers(const at::Tensor& x) {
  std::vector<const T*> rows(x.size(0));
  for (int64_t r = 0; r < x.size(0); ++r) rows[r] = x.data_ptr<T>() + r * x.stride(0);
  return rows;
}

template <typename T>
void linear_impl(const at::Tensor& x, const at::Tensor& weight, at::Tensor& y) {
  const int64_t M = x.size(0), N = weight.size(0);
  std::vector<float> out(M * N);
  rows_times_weights_parallel(row_pointers<T>(x).data(), M, weight.data_ptr<T>(), N, x.size(1), out.data());
  store_floats(y.data_ptr<T>(), out.data(), M * N);
}

template <typename T>
void shared_expert_impl(const at::Tensor& x, const at::Tensor& gate_up, const at::Tensor& down,
                        const at::Tensor& gate_logit, const at::Tensor& routed, at::Tensor& y) {
  const int64_t M = x.size(0), D = x.size(1), I = down.size(1);
  std::vector<float> h(M * 2 * I), out(M * D);
  rows_times_weights_parallel(row_pointers<T>(x).data(), M, gate_up.data_ptr<T>(), 2 * I, D, h.data());
  std::vector<T> act(M * I);
  std::vector<const T*> act_rows(M);
  for (int64_t r = 0; r < M; ++r) {
    for (int64_t i = 0; i < I; ++i) {
      const float g = h[r * 2 * I + i], u = h[r * 2 * I + I + i];
      act[r * I + i] = from_float<T>(round_to<T>(silu(round_to<T>(g))) * round_to<T>(u));
    }
    act_rows[r] = &act[r * I];
  }
  rows_times_weights_parallel(act_rows.data(), M, down.data_ptr<T>(), D, I, out.data());
  const T *gp = gate_logit.data_ptr<T>(), *rp = routed.data_ptr<T>();
  T* yp = y.data_ptr<T>();
  for (int64_t r = 0; r < M; ++r) {
    const float scale = round_to<T>(sigmoid(to_float(gp[r * gate_logit.stride(0)])));
    for (int64_t d = 0; d < D; ++d) {
      const float shared = round_to<T>(scale * round_to<T>(out[r * D + d]));
      yp[r * D + d] = from_float<T>(to_float(rp[r * routed.stride(0) + d]) + shared);
    }
  }
}

}  // namespace

at::Tensor linear_rows(const at::Tensor& x, const at::Tensor& weight) {
  check_rows(x, 2, "x");
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous() && weight.size(1) == x.size(1),
              "weight must be a contiguous [N, K] matrix matching x's K");
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), "x and weight dtypes differ");
  auto y = at::empty({x.size(0), weight.size(0)}, x.options());
  EPSERVE_DISPATCH(x.scalar_type(), "linear_rows", [&] { linear_impl<scalar_t>(x, weight, y); });
  return y;
}

at::Tensor shared_expert(const at::Tensor& x, const at::Tensor& gate_up, const at::Tensor& down,
                         const at::Tensor& gate_logit, const at::Tensor& routed) {
  check_rows(x, 2, "x");
  check_rows(routed, 2, "routed");
  check_rows(gate_logit, 2, "gate_logit");
  const int64_t M = x.size(0), D = x.size(1), I = down.size(1);
  TORCH_CHECK(gate_up.is_contiguous() && down.is_contiguous() && gate_up.size(0) == 2 * I &&
                  gate_up.size(1) == D && down.size(0) == D,
              "gate_up must be [2I, D] and down [D, I], contiguous");
  TORCH_CHECK(routed.sizes() == x.sizes() && gate_logit.size(0) == M && gate_logit.size(1) == 1,
              "routed must be [M, D] and gate_logit [M, 1]");
  TORCH_CHECK(x.scalar_type() == gate_up.scalar_type() && x.scalar_type() == down.scalar_type() &&
                  x.scalar_type() == routed.scalar_type() && x.scalar_type() == gate_logit.scalar_type(),
              "dtypes differ");
  auto y = at::empty({M, D}, x.options());
  EPSERVE_DISPATCH(x.scalar_type(), "shared_expert",
                   [&] { shared_expert_impl<scalar_t>(x, gate_up, down, gate_logit, routed, y); });
  return y;
}

}  // namespace epserve
