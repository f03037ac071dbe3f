// Small matrix products for the expert and few-row linear kernels: n rows (n small) times the rows
// of a weight matrix, as dot products along the contiguous dim. AVX-512 (fp32 FMA, and bf16 pairs
// with AVX512-BF16's dpbf16) where the CPU has it, plain loops elsewhere.
#pragma once

#include "common.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace epserve {

// out[r * out_dim + i] = sum_d rows[r][d] * W[i * D + d]  for r < n, i < out_dim
template <typename T>
void rows_times_weights(const T* const* rows, int64_t n, const T* W, int64_t out_dim, int64_t D, float* out);

namespace detail {

template <typename T>
inline void rows_times_weights_plain(const T* const* rows, int64_t n, const T* W, int64_t out_dim, int64_t D,
                                     float* out) {
  for (int64_t i = 0; i < out_dim; ++i)
    for (int64_t r = 0; r < n; ++r) out[r * out_dim + i] = dot_both(rows[r], W + i * D, D);
}

}  // namespace detail

#if defined(__AVX512F__)

// Lanes of one 512-bit register, and how to load / multiply-add them, per storage type: fp32 FMA
// on 16 floats; with AVX512-BF16, dpbf16 on 32 bf16 (products of pairs summed into 16 fp32 lanes).
template <typename T>
struct Simd;

template <>
struct Simd<float> {
  using Vec = __m512;
  using Mask = __mmask16;
  static constexpr int64_t kLanes = 16;
  static Vec load(const float* p) { return _mm512_loadu_ps(p); }
  static Vec load(const float* p, Mask m) { return _mm512_maskz_loadu_ps(m, p); }
  static __m512 fma(__m512 acc, Vec a, Vec b) { return _mm512_fmadd_ps(a, b, acc); }
};

#if defined(__AVX512BF16__)
template <>
struct Simd<c10::BFloat16> {
  using Vec = __m512bh;
  using Mask = __mmask32;
  static constexpr int64_t kLanes = 32;
  static Vec load(const c10::BFloat16* p) { return (__m512bh)_mm512_loadu_si512(p); }
  static Vec load(const c10::BFloat16* p, Mask m) { return (__m512bh)_mm512_maskz_loadu_epi16(m, p); }
  static __m512 fma(__m512 acc, Vec a, Vec b) { return _mm512_dpbf16_ps(acc, a, b); }
};
#endif

// The weight is read strictly in memory order, one row after another (interleaving several rows
// halves what this machine's prefetchers deliver); each weight chunk serves a group of up to four
// input rows (G, a compile-time count, so a short last group does no extra work). Every output is
// summed in one fixed order — register-wide chunks in turn, then reduce_add4's tree, the same for
// each of its four slots — whatever n is and wherever the row falls in its group, so a row's result
// does not depend on the batch around it.
template <typename T, int G>
inline void group_times_weight_row(const T* const* x, const T* w, int64_t full, typename Simd<T>::Mask tail,
                                   float* sums) {
  using S = Simd<T>;
  constexpr int64_t L = S::kLanes;
  __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
  for (int64_t d = 0; d < full; d += L) {
    const auto wv = S::load(w + d);
    for (int g = 0; g < G; ++g) acc[g] = S::fma(acc[g], wv, S::load(x[g] + d));
  }
  if (tail) {
    const auto wv = S::load(w + full, tail);
    for (int g = 0; g < G; ++g) acc[g] = S::fma(acc[g], wv, S::load(x[g] + full, tail));
  }
  _mm_storeu_ps(sums, reduce_add4(acc[0], acc[1], acc[2], acc[3]));
}

// One input row (batch-1 decode): four weight rows at a time, each read whole in turn (memory
// order), into four accumulators that one reduce_add4 finishes — a quarter of the reductions of
// one row at a time, the same arithmetic per output. J < 4 for the last rows.
template <typename T, int J>
inline void row_times_weight_rows(const T* x, const T* w, int64_t D, int64_t full, typename Simd<T>::Mask tail,
                                  float* out) {
  using S = Simd<T>;
  constexpr int64_t L = S::kLanes;
  __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
  for (int j = 0; j < J; ++j) {
    const T* wj = w + j * D;
    for (int64_t d = 0; d < full; d += L) acc[j] = S::fma(acc[j], S::load(wj + d), S::load(x + d));
    if (tail) acc[j] = S::fma(acc[j], S::load(wj + full, tail), S::load(x + full, tail));
  }
  alignas(16) float sums[4];
  _mm_store_ps(sums, reduce_add4(acc[0], acc[1], acc[2], acc[3]));
  for (int j = 0; j < J; ++j) out[j] = sums[j];
}

template <typename T>
inline void rows_times_weights_simd(const T* const* rows, int64_t n, const T* W, int64_t out_dim, int64_t D,
                                    float* out) {
  constexpr int64_t L = Simd<T>::kLanes;
  const int64_t full = D / L * L;
  const auto tail = static_cast<typename Simd<T>::Mask>((D - full) ? (1ull << (D - full)) - 1ull : 0ull);
  if (n == 1) {
    int64_t i = 0;
    for (; i + 4 <= out_dim; i += 4) row_times_weight_rows<T, 4>(rows[0], W + i * D, D, full, tail, out + i);
    switch (out_dim - i) {
      case 1: row_times_weight_rows<T, 1>(rows[0], W + i * D, D, full, tail, out + i); break;
      case 2: row_times_weight_rows<T, 2>(rows[0], W + i * D, D, full, tail, out + i); break;
      case 3: row_times_weight_rows<T, 3>(rows[0], W + i * D, D, full, tail, out + i); break;
      default: break;
    }
    return;
  }
  alignas(16) float sums[4];
  for (int64_t i = 0; i < out_dim; ++i) {
    const T* w = W + i * D;
    for (int64_t r = 0; r < n; r += 4) {
      const int64_t g = std::min<int64_t>(4, n - r);
      switch (g) {
        case 1: group_times_weight_row<T, 1>(rows + r, w, full, tail, sums); break;
        case 2: group_times_weight_row<T, 2>(rows + r, w, full, tail, sums); break;
        case 3: group_times_weight_row<T, 3>(rows + r, w, full, tail, sums); break;
        default: group_times_weight_row<T, 4>(rows + r, w, full, tail, sums); break;
      }
      for (int64_t j = 0; j < g; ++j) out[(r + j) * out_dim + i] = sums[j];
    }
  }
}

template <>
inline void rows_times_weights<float>(const float* const* rows, int64_t n, const float* W, int64_t out_dim,
                                      int64_t D, float* out) {
  rows_times_weights_simd(rows, n, W, out_dim, D, out);
}

#if defined(__AVX512BF16__)

template <>
inline void rows_times_weights<c10::BFloat16>(const c10::BFloat16* const* rows, int64_t n, const c10::BFloat16* W,
                                              int64_t out_dim, int64_t D, float* out) {
  rows_times_weights_simd(rows, n, W, out_dim, D, out);
}

#endif  // __AVX512BF16__
#endif  // __AVX512F__

template <typename T>
void rows_times_weights(const T* const* rows, int64_t n, const T* W, int64_t out_dim, int64_t D, float* out) {
  detail::rows_times_weights_plain(rows, n, W, out_dim, D, out);
}

// The same, split across threads by blocks of output columns (a few rows: the weight is streamed
// once in all): out [n, out_dim] fp32.
template <typename T>
void rows_times_weights_parallel(const T* const* rows, int64_t n, const T* W, int64_t out_dim, int64_t D,
                                 float* out) {
  constexpr int64_t kColumns = 64;
  const int64_t blocks = (out_dim + kColumns - 1) / kColumns;
  at::parallel_for(0, blocks, grain_for(kColumns * D), [&](int64_t begin, int64_t end) {
    std::vector<float> part(n * kColumns);
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t i0 = blk * kColumns, m = std::min(out_dim, i0 + kColumns) - i0;
      rows_times_weights(rows, n, W + i0 * D, m, D, part.data());
      for (int64_t r = 0; r < n; ++r) std::copy(&part[r * m], &part[r * m] + m, out + r * out_dim + i0);
    }
  });
}

}  // namespace epserve
