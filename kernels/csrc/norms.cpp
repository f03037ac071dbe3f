// RMSNorms of Qwen3.5: zero-centred rms(x) * (1 + w), its fused residual-add form, and the gated
// norm on Gated DeltaNet's output (w * rms(x) * silu(z), rounding through the storage type where
// the reference does). x is [R, W] (rows may be strided); each row holds W / D groups of D = the
// weight's size, normalised independently (heads of a projection output, without a copy).
#include "common.h"

namespace epserve {

namespace {

constexpr int64_t kGrainElems = 1 << 14;  // rows per task: small inputs run on one thread

template <typename T>
void norm_row(const float* x, const T* w, T* out, int64_t D, float eps) {
  float ss = 0.f;
#pragma omp simd reduction(+ : ss)
  for (int64_t i = 0; i < D; ++i) ss += x[i] * x[i];
  const float r = 1.f / std::sqrt(ss / D + eps);
#pragma omp simd
  for (int64_t i = 0; i < D; ++i) out[i] = from_float<T>(x[i] * r * (1.f + to_float(w[i])));
}

at::Tensor rows_like(const at::Tensor& x) { return at::empty({x.size(0), x.size(1)}, x.options()); }

template <typename T>
void rms_norm_impl(const at::Tensor& x, const at::Tensor& weight, at::Tensor& out, double eps) {
  const int64_t D = weight.numel(), W = x.size(1), G = W / D, xs = x.stride(0);
  const T* xp = x.data_ptr<T>();
  const T* wp = weight.data_ptr<T>();
  T* op = out.data_ptr<T>();
  at::parallel_for(0, x.size(0) * G, std::max<int64_t>(1, kGrainElems / D), [&](int64_t begin, int64_t end) {
    std::vector<float> row(D);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t r = i / G, g = i % G;
      load_floats(row.data(), xp + r * xs + g * D, D);
      norm_row(row.data(), wp, op + r * W + g * D, D, static_cast<float>(eps));
    }
  });
}

template <typename T>
void add_rms_norm_impl(const at::Tensor& x, const at::Tensor& delta, const at::Tensor& weight,
                       at::Tensor& sum, at::Tensor& out, double eps) {
  const int64_t R = x.size(0), D = x.size(1), xs = x.stride(0), ds = delta.stride(0);
  const T *xp = x.data_ptr<T>(), *dp = delta.data_ptr<T>(), *wp = weight.data_ptr<T>();
  T *sp = sum.data_ptr<T>(), *op = out.data_ptr<T>();
  at::parallel_for(0, R, std::max<int64_t>(1, kGrainElems / D), [&](int64_t begin, int64_t end) {
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
  const int64_t D = weight.numel(), W = x.size(1), G = W / D, xs = x.stride(0), zs = z.stride(0);
  const T *xp = x.data_ptr<T>(), *zp = z.data_ptr<T>(), *wp = weight.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const float e = static_cast<float>(eps);
  at::parallel_for(0, x.size(0) * G, std::max<int64_t>(1, kGrainElems / D), [&](int64_t begin, int64_t end) {
    std::vector<float> row(D);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t r = i / G, g = i % G;
      load_floats(row.data(), xp + r * xs + g * D, D);
      float ss = 0.f;
#pragma omp simd reduction(+ : ss)
      for (int64_t i = 0; i < D; ++i) ss += row[i] * row[i];
      const float inv = 1.f / std::sqrt(ss / D + e);
      const T* zr = zp + r * zs + g * D;
      T* o = op + r * W + g * D;
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
  check_rows(x, 2, "x");
  TORCH_CHECK(weight.is_contiguous() && weight.numel() > 0 && x.size(1) % weight.numel() == 0,
              "row width ", x.size(1), " is not a multiple of the weight's ", weight.numel());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "weight and x dtypes differ");
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
  check_rows(x, 2, "x");
  check_rows(z, 2, "z");
  TORCH_CHECK(x.sizes() == z.sizes(), "x and z shapes differ");
  TORCH_CHECK(weight.is_contiguous() && weight.numel() > 0 && x.size(1) % weight.numel() == 0,
              "row width ", x.size(1), " is not a multiple of the weight's ", weight.numel());
  TORCH_CHECK(x.scalar_type() == z.scalar_type() && x.scalar_type() == weight.scalar_type(),
              "x, z and weight dtypes differ");
  auto out = rows_like(x);
  EPSERVE_DISPATCH(x.scalar_type(), "gated_rms_norm", [&] { gated_rms_norm_impl<scalar_t>(x, z, weight, out, eps); });
  return out;
}

}  // namespace epserve
