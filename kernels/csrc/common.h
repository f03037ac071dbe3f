// Shared helpers of epserve's CPU kernels: fp32 math on float / bfloat16 / half storage.
// Every kernel loads its inputs as fp32, computes in fp32 and rounds once when it stores.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace epserve {

inline float to_float(float x) { return x; }
inline float to_float(c10::BFloat16 x) { return static_cast<float>(x); }
inline float to_float(c10::Half x) { return static_cast<float>(x); }

template <typename T>
inline T from_float(float x) { return static_cast<T>(x); }

// round to nearest even, NaN kept quiet: c10's conversion, written without branches so loops vectorise
template <>
inline c10::BFloat16 from_float<c10::BFloat16>(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  const bool nan = (u & 0x7FFFFFFFu) > 0x7F800000u;
  return c10::BFloat16(static_cast<uint16_t>(nan ? 0x7FC0u : rounded), c10::BFloat16::from_bits());
}

// rounds through the storage type (so fp32 code reproduces a reference's bf16 intermediates)
template <typename T>
inline float round_to(float x) { return to_float(from_float<T>(x)); }

template <typename T>
inline void load_floats(float* dst, const T* src, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = to_float(src[i]);
}

template <typename T>
inline void store_floats(T* dst, const float* src, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = from_float<T>(src[i]);
}

template <typename T>
inline float dot(const float* a, const T* b, int64_t n) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += a[i] * to_float(b[i]);
  return acc;
}

// exp(x) for x in float range, to about 1 ulp, in plain arithmetic so that loops over it vectorise
// (std::exp does not without -ffast-math): 2^n * p(r), n = round(x / ln 2), Cephes' polynomial.
// Below -87.3 it returns the smallest normal float instead of a denormal or 0.
inline float fast_exp(float x) {
  x = std::min(std::max(x, -87.33654f), 88.72283f);
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

template <typename T>
inline float dot_both(const T* a, const T* b, int64_t n) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += to_float(a[i]) * to_float(b[i]);
  return acc;
}

inline float silu(float x) { return x / (1.f + fast_exp(-x)); }
inline float sigmoid(float x) { return 1.f / (1.f + fast_exp(-x)); }
inline float softplus(float x) { return x > 20.f ? x : std::log1p(std::exp(x)); }  // torch's threshold

inline void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
}

inline void check_rows(const at::Tensor& t, int64_t dims, const char* name) {
  check_cpu(t, name);
  TORCH_CHECK(t.dim() == dims, name, " must have ", dims, " dims, got ", t.dim());
  TORCH_CHECK(t.stride(-1) == 1, name, " must be contiguous in its last dim");
}

// Waking a second thread costs several microseconds: a parallel loop hands each thread at least
// this much work (in elements touched), so decode-sized calls stay on one thread.
constexpr int64_t kParallelWork = 1 << 16;

inline int64_t grain_for(int64_t work_per_item) {
  return std::max<int64_t>(1, kParallelWork / std::max<int64_t>(1, work_per_item));
}

}  // namespace epserve

// float, bfloat16 and half storage
#define EPSERVE_DISPATCH(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, TYPE, NAME, __VA_ARGS__)
