// RMSNorms of Qwen3.5: zero-centred rms(x) * (1 + w), its fused residual-add form, and the gated
// norm on Gated DeltaNet's output (w * rms(x) * silu(z), rounding through the storage type where
// the reference does). x is [R, D] or [R, G, D] (heads; rows and heads may be strided, the last dim
// contiguous), normalised over D = the weight's size; the output is contiguous, shaped as x.
#include "common.h"

namespace epserve {

namespace {

template <typename T>
void norm_row(const float* x, const T* w, T* out, int64_t D, float eps) {
  float ss = 0.f;
#pragma omp simd reduction(+ : ss)
  for (int64_t i = 0; i < D; ++i) ss += x[i] * x[i];
  const float r = 1.f / std::sqrt(ss / D + eps);
#pragma omp simd
  for (int64_t i = 0; i < D; ++i) out[i] = from_float<T>(x[i] * r * (1.f + to_float(w[i])));
}

at::Tensor rows_like(const at::Tensor& x) { return at::empty(x.sizes(), x.options()); }

// [R, D] or [R, G, D] as rows of D: row i = (r, g) starts at r * s0 + g * s1
struct Rows {
  int64_t count, groups, s0, s1;
  explicit Rows(const at::Tensor& x)
      : count(x.dim() == 3 ? x.size(0) * x.size(1) : x.size(0)), groups(x.dim() == 3 ? x.size(1) : 1),
        s0(x.stride(0)), s1(x.dim() == 3 ? x.stride(1) : 0) {}
  int64_t offset(int64_t i) const { return (i / groups) * s0 + (i % groups) * s1; }
};

void check_norm_input(const at::Tensor& x, const at::Tensor& weight) {
  check_cpu(x, "x");
  TORCH_CHECK((x.dim() == 2 || x.dim() == 3) && x.stride(-1) == 1, "x must be [R, D] or [R, G, D], contiguous in D");
  TORCH_CHECK(weight.is_contiguous() && weight.numel() == x.size(-1), "weight must hold ", x.size(-1), " values");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "weight and x dtypes differ");
}

template <typename T>
void rms_norm_impl(const at::Tensor& x, const at::Tensor& weight, at::Tensor& out, double eps) {
  const int64_t D = weight.numel();
  const Rows rows(x);
  const T* xp = x.data_ptr<T>();
  const T* wp = weight.data_ptr<T>();
  T* op = out.data_ptr<T>();
  at::parallel_for(0, rows.count, grain_for(D), [&](int64_t begin, int64_t end) {
    std::vector<float> row(D);
    for (int64_t i = begin; i < end; ++i) {
      load_floats(row.data(), xp + rows.offset(i), D);
      norm_row(row.data(), wp, op + i * D, D, static_cast<float>(eps));
    }
  });
}

template <typename T>
void add_rms_norm_impl(const at::Tensor& x, const at::Tensor& delta, const at::Tensor& weight,
                       at::Tensor& sum, at::Tensor& out, double eps) {
  const int64_t R = x.size(0), D = x.size(1), xs = x.stride(0), ds = delta.stride(0);
  const T *xp = x.data_ptr<T>(), *dp = delta.data_ptr<T>(), *wp = weight.data_ptr<T>();
  T *sp = sum.data_ptr<T>(), *op = out.data_ptr<T>();
  at::parallel_for(0, R, grain_for(D), [&](int64_t begin, int64_t end) {
    std::vector<float> row(D);
    for (int64_t r = begin; r < end; ++r) {
      const T* a = xp + r * xs;
      const T* b = dp + r * ds;
      T* s = sp + r * D;
#pragma omp simd
      for (int64_t i = 0; i < D; ++i) {
        s[i] = from_float<T>(to_float(a[i]) + to_float(b[i]));  // the residual stream
        row[i] = to_float(s[i]);
      }
      norm_row(row.data(), wp, op + r * D, D, static_cast<float>(eps));
    }
  });
}

template <typename T>
void gated_rms_norm_impl(const at::Tensor& x, const at::Tensor& z, const at::Tensor& weight,
                         at::Tensor& out, double eps) {
  const int64_t D = weight.numel();
  const Rows xrows(x), zrows(z);
  const T *xp = x.data_ptr<T>(), *zp = z.data_ptr<T>(), *wp = weight.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const float e = static_cast<float>(eps);
  at::parallel_for(0, xrows.count, grain_for(D), [&](int64_t begin, int64_t end) {
    std::vector<float> row(D);
    for (int64_t i = begin; i < end; ++i) {
      load_floats(row.data(), xp + xrows.offset(i), D);
      float ss = 0.f;
#pragma omp simd reduction(+ : ss)
      for (int64_t i = 0; i < D; ++i) ss += row[i] * row[i];
      const float inv = 1.f / std::sqrt(ss / D + e);
      const T* zr = zp + zrows.offset(i);
      T* o = op + i * D;
#pragma omp simd
      for (int64_t i = 0; i < D; ++i) {
        const float normed = round_to<T>(row[i] * inv);
        const float scaled = round_to<T>(to_float(wp[i]) * normed);
        o[i] = from_float<T>(scaled * silu(to_float(zr[i])));
      }
    }
  });
}

}  // namespace

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_norm_input(x, weight);
  auto out = rows_like(x);
  EPSERVE_DISPATCH(x.scalar_type(), "rms_norm", [&] { rms_norm_impl<scalar_t>(x, weight, out, eps); });
  return out;
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const at::Tensor& delta,
                                                const at::Tensor& weight, double eps) {
  check_rows(x, 2, "x");
  check_rows(delta, 2, "delta");
  TORCH_CHECK(x.sizes() == delta.sizes(), "x and delta shapes differ");
  TORCH_CHECK(x.scalar_type() == delta.scalar_type() && x.scalar_type() == weight.scalar_type(),
              "x, delta and weight dtypes differ");
  const int64_t R = x.size(0), D = x.size(1);
  TORCH_CHECK(weight.numel() == D && weight.is_contiguous(), "weight must hold ", D, " values");
  auto sum = rows_like(x);
  auto out = rows_like(x);
  EPSERVE_DISPATCH(x.scalar_type(), "add_rms_norm",
                   [&] { add_rms_norm_impl<scalar_t>(x, delta, weight, sum, out, eps); });
  return {sum, out};
}

at::Tensor gated_rms_norm(const at::Tensor& x, const at::Tensor& z, const at::Tensor& weight, double eps) {
  check_norm_input(x, weight);
  check_norm_input(z, weight);
  TORCH_CHECK(x.sizes() == z.sizes(), "x and z shapes differ");
  auto out = rows_like(x);
  EPSERVE_DISPATCH(x.scalar_type(), "gated_rms_norm", [&] { gated_rms_norm_impl<scalar_t>(x, z, weight, out, eps); });
  return out;
}

}  // namespace epserve
