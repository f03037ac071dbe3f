// Small matrix products for the expert kernels: n rows (n small) times the rows of a weight matrix,
// as dot products along the contiguous dim. Four weight rows at a time share each loaded input
// chunk; AVX-512 (fp32 FMA, and bf16 pairs with AVX512-BF16's dpbf16) where the CPU has it,
// plain loops elsewhere.
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

template <>
inline void rows_times_weights<float>(const float* const* rows, int64_t n, const float* W, int64_t out_dim,
                                      int64_t D, float* out) {
  const int64_t full = D / 16 * 16;
  const __mmask16 tail = static_cast<__mmask16>((1u << (D - full)) - 1u);
  int64_t i = 0;
  for (; i + 4 <= out_dim; i += 4) {
    const float *w0 = W + i * D, *w1 = w0 + D, *w2 = w1 + D, *w3 = w2 + D;
    for (int64_t r = 0; r < n; ++r) {
      const float* x = rows[r];
      __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      for (int64_t d = 0; d < full; d += 16) {
        const __m512 xv = _mm512_loadu_ps(x + d);
        a0 = _mm512_fmadd_ps(_mm512_loadu_ps(w0 + d), xv, a0);
        a1 = _mm512_fmadd_ps(_mm512_loadu_ps(w1 + d), xv, a1);
        a2 = _mm512_fmadd_ps(_mm512_loadu_ps(w2 + d), xv, a2);
        a3 = _mm512_fmadd_ps(_mm512_loadu_ps(w3 + d), xv, a3);
      }
      if (tail) {
        const __m512 xv = _mm512_maskz_loadu_ps(tail, x + full);
        a0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, w0 + full), xv, a0);
        a1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, w1 + full), xv, a1);
        a2 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, w2 + full), xv, a2);
        a3 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, w3 + full), xv, a3);
      }
      float* o = out + r * out_dim + i;
      o[0] = _mm512_reduce_add_ps(a0);
      o[1] = _mm512_reduce_add_ps(a1);
      o[2] = _mm512_reduce_add_ps(a2);
      o[3] = _mm512_reduce_add_ps(a3);
    }
  }
  for (; i < out_dim; ++i)
    for (int64_t r = 0; r < n; ++r) out[r * out_dim + i] = dot_both(rows[r], W + i * D, D);
}

#if defined(__AVX512BF16__)

template <>
inline void rows_times_weights<c10::BFloat16>(const c10::BFloat16* const* rows, int64_t n, const c10::BFloat16* W,
                                              int64_t out_dim, int64_t D, float* out) {
  const int64_t full = D / 32 * 32;
  const __mmask32 tail = static_cast<__mmask32>((D - full) ? (1ull << (D - full)) - 1ull : 0ull);
  auto load = [](const c10::BFloat16* p) { return (__m512bh)_mm512_loadu_si512(p); };
  auto load_tail = [tail](const c10::BFloat16* p) { return (__m512bh)_mm512_maskz_loadu_epi16(tail, p); };
  int64_t i = 0;
  for (; i + 4 <= out_dim; i += 4) {
    const c10::BFloat16 *w0 = W + i * D, *w1 = w0 + D, *w2 = w1 + D, *w3 = w2 + D;
    for (int64_t r = 0; r < n; ++r) {
      const c10::BFloat16* x = rows[r];
      __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      for (int64_t d = 0; d < full; d += 32) {
        const __m512bh xv = load(x + d);
        a0 = _mm512_dpbf16_ps(a0, load(w0 + d), xv);
        a1 = _mm512_dpbf16_ps(a1, load(w1 + d), xv);
        a2 = _mm512_dpbf16_ps(a2, load(w2 + d), xv);
        a3 = _mm512_dpbf16_ps(a3, load(w3 + d), xv);
      }
      if (tail) {
        const __m512bh xv = load_tail(x + full);
        a0 = _mm512_dpbf16_ps(a0, load_tail(w0 + full), xv);
        a1 = _mm512_dpbf16_ps(a1, load_tail(w1 + full), xv);
        a2 = _mm512_dpbf16_ps(a2, load_tail(w2 + full), xv);
        a3 = _mm512_dpbf16_ps(a3, load_tail(w3 + full), xv);
      }
      float* o = out + r * out_dim + i;
      o[0] = _mm512_reduce_add_ps(a0);
      o[1] = _mm512_reduce_add_ps(a1);
      o[2] = _mm512_reduce_add_ps(a2);
      o[3] = _mm512_reduce_add_ps(a3);
    }
  }
  for (; i < out_dim; ++i)
    for (int64_t r = 0; r < n; ++r) out[r * out_dim + i] = dot_both(rows[r], W + i * D, D);
}

#endif  // __AVX512BF16__
#endif  // __AVX512F__

template <typename T>
void rows_times_weights(const T* const* rows, int64_t n, const T* W, int64_t out_dim, int64_t D, float* out) {
  detail::rows_times_weights_plain(rows, n, W, out_dim, D, out);
}

}  // namespace epserve
