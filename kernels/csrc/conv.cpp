// Depthwise causal conv1d + SiLU over Gated DeltaNet's qkv channels, for a flat batch of sequences
// (decode tokens and prefill chunks alike), continuing each sequence's conv state: state[slots[b]]
// holds its last K - 1 inputs, oldest first, and the new last K - 1 go to state[out_slots[b]] (the
// same row: in place).
//   x [T, C] (rows may be strided), weight [C, K], state [M, K - 1, C], slots, out_slots [B],
//   query_start [B + 1]
//   -> y [T, C] = silu(conv(state ++ x)) per sequence (the conv output rounded to x's dtype first,
//   as the reference's conv1d then silu). Vectorised across channels.
#include "common.h"

namespace epserve {

namespace {

constexpr int64_t kMaxKernel = 8;
constexpr int64_t kBlock = 256;  // channels per task

template <typename T>
void conv_impl(const at::Tensor& x, const at::Tensor& weight, at::Tensor& state, const int64_t* slots,
               const int64_t* out_slots, const int64_t* qs, int64_t B, at::Tensor& y) {
  const int64_t C = x.size(1), K = weight.size(1), H = K - 1, xs = x.stride(0);
  const int64_t blocks = (C + kBlock - 1) / kBlock;
  const T* xp = x.data_ptr<T>();
  const T* wp = weight.data_ptr<T>();
  T* st = state.data_ptr<T>();
  T* yp = y.data_ptr<T>();
  const int64_t rows_per_item = std::max<int64_t>(1, qs[B] / std::max<int64_t>(1, B));
  at::parallel_for(0, B * blocks, grain_for(rows_per_item * kBlock * K), [&](int64_t begin, int64_t end) {
    float w[kMaxKernel][kBlock], acc[kBlock];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / blocks, c0 = (item % blocks) * kBlock, n = std::min(C, c0 + kBlock) - c0;
      const int64_t t0 = qs[b], L = qs[b + 1] - t0;
      const T* hist = st + slots[b] * H * C + c0;  // row j: input j - H relative to the chunk's first
      T* hist_out = st + out_slots[b] * H * C + c0;
      auto input = [&](int64_t p) { return p < 0 ? hist + (H + p) * C : xp + (t0 + p) * xs + c0; };
      for (int64_t c = 0; c < n; ++c)
        for (int64_t j = 0; j < K; ++j) w[j][c] = to_float(wp[(c0 + c) * K + j]);
      for (int64_t t = 0; t < L; ++t) {
        std::fill(acc, acc + n, 0.f);
        for (int64_t j = 0; j < K; ++j) {
          const T* in = input(t - H + j);
          const float* wj = w[j];
#pragma omp simd
          for (int64_t c = 0; c < n; ++c) acc[c] += wj[c] * to_float(in[c]);
        }
        T* out = yp + (t0 + t) * C + c0;
#pragma omp simd
        for (int64_t c = 0; c < n; ++c) out[c] = from_float<T>(silu(round_to<T>(acc[c])));
      }
      for (int64_t j = 0; j < H; ++j) {  // the last K - 1 inputs; in place, reads run ahead of writes
        const T* src = input(L - H + j);
        if (src != hist_out + j * C) std::copy(src, src + n, hist_out + j * C);
      }
    }
  });
}

}  // namespace

at::Tensor causal_conv1d(const at::Tensor& x, const at::Tensor& weight, at::Tensor& state,
                         const at::Tensor& slots, const at::Tensor& query_start, const at::Tensor& out_slots) {
  check_rows(x, 2, "x");
  check_cpu(state, "state");
  TORCH_CHECK(state.is_contiguous() && state.dim() == 3, "state must be a contiguous [M, K - 1, C] pool");
  TORCH_CHECK(weight.is_contiguous() && weight.dim() == 2, "weight must be a contiguous [C, K] tensor");
  const int64_t C = x.size(1), K = weight.size(1), B = slots.numel();
  TORCH_CHECK(weight.size(0) == C && state.size(1) == K - 1 && state.size(2) == C, "conv shapes disagree");
  TORCH_CHECK(K >= 2 && K <= kMaxKernel, "conv kernel must be in 2..", kMaxKernel);
  TORCH_CHECK(query_start.numel() == B + 1, "query_start must have B + 1 entries");
  TORCH_CHECK(out_slots.numel() == B, "out_slots must have one entry per sequence, as slots");
  TORCH_CHECK(x.scalar_type() == state.scalar_type() && x.scalar_type() == weight.scalar_type(),
              "x, weight and state dtypes differ");
  auto slots_c = slots.to(at::kLong).contiguous();
  auto out_slots_c = out_slots.to(at::kLong).contiguous();
  auto qs_c = query_start.to(at::kLong).contiguous();
  auto y = at::empty({x.size(0), C}, x.options());
  EPSERVE_DISPATCH(x.scalar_type(), "causal_conv1d", [&] {
    conv_impl<scalar_t>(x, weight, state, slots_c.data_ptr<int64_t>(), out_slots_c.data_ptr<int64_t>(),
                        qs_c.data_ptr<int64_t>(), B, y);
  });
  return y;
}

}  // namespace epserve
