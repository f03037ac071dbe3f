// Causal attention of a flat batch of sequences against the paged KV cache, in one call per layer.
//   query [T, Hq, hd] (rows of all sequences; heads may be strided), key_cache / value_cache
//   [N, Hkv, S, hd] (a kv head's keys of a block contiguous: one stream per task; stored in the
//   query's dtype, bf16 under an fp32 query, or float8 e5m2 / e4m3fn), block_tables [B, max_blocks],
//   query_start [B + 1], context_lens [B] (keys in the cache for each sequence, this step's
//   included)  ->  out [T, Hq, hd].
// Query i of a sequence with n new tokens and L = context_len sits at position L - n + i and sees
// keys 0 .. L - n + i. K/V are read in place, block by block (no gathered copy, no GQA repeat):
// a task is (sequence, kv head, tile of query positions) with all the query heads of
// that kv head; online softmax over key blocks (flash-attention style), fp32 throughout. With
// AVX-512, 16 keys at a time, transposed first: a query's 16 scores are one register of
// multiply-adds over the head dim (no horizontal sums), its softmax step a few register ops.
#include "common.h"

namespace epserve {

namespace {

// Query rows (positions x query heads of a kv head) per task: a task streams its sequence's K/V
// once and transposes each chunk of keys once, for all of its rows. 64 rows of 256-wide heads keep
// q and the sums in L2.
constexpr int64_t kTileRows = 64;
constexpr int64_t kAhead = 4;  // KV blocks prefetched ahead (into L2)
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

struct Task {
  int64_t seq, first, count, kv_head;
};

#if defined(__AVX512F__)
constexpr int64_t kQueries = 4;  // queries whose value sums run side by side

// For U queries (U <= kQueries) and W register-wide slices of the head (W <= 2):
// acc_u[slice] += sum_j p_u[j] values[j][slice], keys j in order. Each value slice is loaded once
// for all U, and the U * W multiply-add chains interleave (one chain alone waits on its previous
// multiply-add at every key).
template <typename C, int U, int W>
inline void weighted_values(const float* p, int64_t p_stride, int64_t nk, const C* values, int64_t value_stride,
                            const __mmask16* masks, float* acc, int64_t acc_stride) {
  __m512 sums[U][W];
  for (int u = 0; u < U; ++u)
    for (int w = 0; w < W; ++w) sums[u][w] = _mm512_maskz_loadu_ps(masks[w], acc + u * acc_stride + 16 * w);
  for (int64_t j = 0; j < nk; ++j) {
    __m512 value[W];
    for (int w = 0; w < W; ++w) value[w] = load_as_floats(values + j * value_stride + 16 * w, masks[w]);
    for (int u = 0; u < U; ++u) {
      const __m512 weight = _mm512_set1_ps(p[u * p_stride + j]);
      for (int w = 0; w < W; ++w) sums[u][w] = _mm512_fmadd_ps(weight, value[w], sums[u][w]);
    }
  }
  for (int u = 0; u < U; ++u)
    for (int w = 0; w < W; ++w) _mm512_mask_storeu_ps(acc + u * acc_stride + 16 * w, masks[w], sums[u][w]);
}

// out[16 x 16] = the 16 registers r (rows) transposed: out + 16 c holds lane c of every row.
inline void transpose16(const __m512 (&r)[16], float* out) {
  __m512 t[16], u[16];
  for (int j = 0; j < 16; j += 2) {  // per 128-bit quarter: rows j, j + 1 interleaved
    t[j] = _mm512_unpacklo_ps(r[j], r[j + 1]);
    t[j + 1] = _mm512_unpackhi_ps(r[j], r[j + 1]);
  }
  const auto lo = [&](int a, int b) { return _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[a]), _mm512_castps_pd(t[b]))); };
  const auto hi = [&](int a, int b) { return _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[a]), _mm512_castps_pd(t[b]))); };
  for (int g = 0; g < 16; g += 4) {  // u[g + c], quarter k: rows g..g+3 of column 4k + c
    u[g] = lo(g, g + 2), u[g + 1] = hi(g, g + 2), u[g + 2] = lo(g + 1, g + 3), u[g + 3] = hi(g + 1, g + 3);
  }
  for (int c = 0; c < 4; ++c) {  // quarters gathered: column c + 4k from rows 0-3, 4-7, 8-11, 12-15
    const __m512 a = _mm512_shuffle_f32x4(u[c], u[4 + c], 0x88), b = _mm512_shuffle_f32x4(u[c], u[4 + c], 0xDD);
    const __m512 a2 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0x88), b2 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0xDD);
    _mm512_storeu_ps(out + c * 16, _mm512_shuffle_f32x4(a, a2, 0x88));
    _mm512_storeu_ps(out + (8 + c) * 16, _mm512_shuffle_f32x4(a, a2, 0xDD));
    _mm512_storeu_ps(out + (4 + c) * 16, _mm512_shuffle_f32x4(b, b2, 0x88));
    _mm512_storeu_ps(out + (12 + c) * 16, _mm512_shuffle_f32x4(b, b2, 0xDD));
  }
}

// keys_t [round_up(hd, 16)][16] = the chunk's keys (`count` <= 16 rows of hd, row stride hd) as
// floats, transposed: element d of every key side by side (0 past count and past hd).
template <typename C>
inline void transpose_keys(const C* keys, int64_t hd, int64_t count, float* keys_t) {
  for (int64_t d0 = 0; d0 < hd; d0 += 16) {
    const __mmask16 cols = first_lanes(hd - d0);
    __m512 r[16];
    for (int j = 0; j < 16; ++j) r[j] = j < count ? load_as_floats(keys + j * hd + d0, cols) : _mm512_setzero_ps();
    transpose16(r, keys_t + d0 * 16);
  }
}

// scores[u][j] = sum_d q_u[d] keys_t[d][j] for U queries, 16 keys in one register each: even and
// odd d in two chains, added at the end (one fixed order for every query, whatever U).
template <int U>
inline void scores_of(const float* q, int64_t hd, const float* keys_t, float* scores) {
  __m512 even[U], odd[U];
  for (int u = 0; u < U; ++u) even[u] = odd[u] = _mm512_setzero_ps();
  int64_t d = 0;
  for (; d + 1 < hd; d += 2) {
    const __m512 k0 = _mm512_loadu_ps(keys_t + d * 16), k1 = _mm512_loadu_ps(keys_t + (d + 1) * 16);
    for (int u = 0; u < U; ++u) {
      even[u] = _mm512_fmadd_ps(_mm512_set1_ps(q[u * hd + d]), k0, even[u]);
      odd[u] = _mm512_fmadd_ps(_mm512_set1_ps(q[u * hd + d + 1]), k1, odd[u]);
    }
  }
  if (d < hd) {
    const __m512 k0 = _mm512_loadu_ps(keys_t + d * 16);
    for (int u = 0; u < U; ++u) even[u] = _mm512_fmadd_ps(_mm512_set1_ps(q[u * hd + d]), k0, even[u]);
  }
  for (int u = 0; u < U; ++u) _mm512_storeu_ps(scores + u * 16, _mm512_add_ps(even[u], odd[u]));
}

#if defined(__AVX512BF16__)
// Up to 32 elements of a key (n of them, even; 0 past them) as 16 bf16 pairs in 32-bit lanes: bf16
// keys as stored; float8 keys widened to fp32 and packed to bf16, exactly (every e5m2 and e4m3
// value is a bf16 value)
inline __m512 key_pairs(const c10::BFloat16* key, int64_t n) {
  return _mm512_maskz_loadu_ps(first_lanes(n / 2), reinterpret_cast<const float*>(key));
}

template <typename C>
inline __m512 key_pairs(const C* key, int64_t n) {
  const __m512 lo = load_as_floats(key, first_lanes(n)), hi = load_as_floats(key + 16, first_lanes(n - 16));
  return (__m512)_mm512_cvtne2ps_pbh(hi, lo);
}

// keys under a bf16 query (hd even) scored as bf16: keys_t [round_up(hd / 2, 16)][16] holds them
// transposed in pairs, row r elements 2r and 2r + 1 of every key, as 32-bit lanes.
template <typename C>
inline void transpose_key_pairs(const C* keys, int64_t hd, int64_t count, float* keys_t) {
  for (int64_t p0 = 0; p0 < hd / 2; p0 += 16) {
    const int64_t n = std::min<int64_t>(32, hd - 2 * p0);
    __m512 r[16];
    for (int j = 0; j < 16; ++j) r[j] = j < count ? key_pairs(keys + j * hd + 2 * p0, n) : _mm512_setzero_ps();
    transpose16(r, keys_t + p0 * 16);
  }
}

// scores[u][j] = scale * sum_d q_u[d] k_j[d] from pairs (dpbf16: two products per lane and
// instruction, no conversion of the keys): four chains (pair index mod 4), (0 + 1) + (2 + 3).
template <int U>
inline void scores_of_pairs(const c10::BFloat16* q, int64_t hd, const float* keys_t, float scale, float* scores) {
  __m512 sums[U][4];
  for (int u = 0; u < U; ++u)
    for (int r = 0; r < 4; ++r) sums[u][r] = _mm512_setzero_ps();
  for (int64_t p0 = 0; p0 < hd / 2; p0 += 4)
    for (int r = 0; r < 4 && p0 + r < hd / 2; ++r) {
      const __m512bh k = (__m512bh)_mm512_castps_si512(_mm512_loadu_ps(keys_t + (p0 + r) * 16));
      for (int u = 0; u < U; ++u) {
        int32_t pair;
        std::memcpy(&pair, q + u * hd + 2 * (p0 + r), sizeof(pair));
        sums[u][r] = _mm512_dpbf16_ps(sums[u][r], (__m512bh)_mm512_set1_epi32(pair), k);
      }
    }
  for (int u = 0; u < U; ++u) {
    const __m512 total = _mm512_add_ps(_mm512_add_ps(sums[u][0], sums[u][1]), _mm512_add_ps(sums[u][2], sums[u][3]));
    _mm512_storeu_ps(scores + u * 16, _mm512_mul_ps(total, _mm512_set1_ps(scale)));
  }
}
#endif

// f(std::integral_constant<int, U>) for U = min(kQueries, n): the register-count templates' switch.
template <typename F>
inline void with_queries(int64_t n, F&& f) {
  switch (std::min<int64_t>(kQueries, n)) {
    case 1: f(std::integral_constant<int, 1>()); break;
    case 2: f(std::integral_constant<int, 2>()); break;
    case 3: f(std::integral_constant<int, 3>()); break;
    default: f(std::integral_constant<int, 4>()); break;
  }
}

template <typename C, int W>
inline void weighted_values_of(int64_t queries, const float* p, int64_t p_stride, int64_t nk, const C* values,
                               int64_t value_stride, const __mmask16* masks, float* acc, int64_t acc_stride) {
  for (int64_t v = 0; v < queries; v += kQueries) {
    const float* pv = p + v * p_stride;
    float* av = acc + v * acc_stride;
    with_queries(queries - v, [&](auto u) {
      weighted_values<C, decltype(u)::value, W>(pv, p_stride, nk, values, value_stride, masks, av, acc_stride);
    });
  }
}
#endif

template <typename T, typename C>  // query and output type, cache type
void attention_impl(const at::Tensor& query, const at::Tensor& key_cache, const at::Tensor& value_cache,
                    const int64_t* tables, int64_t max_blocks, const int64_t* qs, const int64_t* cl,
                    const std::vector<Task>& tasks, int64_t tile, int64_t work, float scale, at::Tensor& out) {
  const int64_t Hq = query.size(1), hd = query.size(2);
  const int64_t Hkv = key_cache.size(1), S = key_cache.size(2), G = Hq / Hkv;
  const int64_t qs0 = query.stride(0), qs1 = query.stride(1);
  const T* qp = query.data_ptr<T>();
  const C* kc = static_cast<const C*>(key_cache.data_ptr());
  const C* vc = static_cast<const C*>(value_cache.data_ptr());
  T* op = out.data_ptr<T>();
  const int64_t num_tasks = static_cast<int64_t>(tasks.size());
  // a bf16 query over bf16 or float8 keys: scores from bf16 pairs (AVX512-BF16; bf16 keys never
  // widened, float8 ones only to bf16), two products per instruction
  constexpr bool kBf16Pairs = std::is_same_v<T, c10::BFloat16> && !std::is_same_v<C, float>;
#if defined(__AVX512BF16__)
  const bool pairs = kBf16Pairs && hd % 2 == 0;
#else
  const bool pairs = false;
#endif
#pragma omp parallel if (num_tasks > 1 && work > kParallelWork)
  {
    const int64_t nq_max = tile * G;
    std::vector<float> q(pairs ? 0 : nq_max * hd), acc(nq_max * hd), m(nq_max), l(nq_max), s(nq_max * std::max<int64_t>(S, 16));
    std::vector<int64_t> qpos(nq_max);
    std::vector<float> keys_t((hd + 15) / 16 * 16 * 16);  // a chunk of 16 keys, transposed
    std::vector<T> q_raw(pairs ? nq_max * hd : 0);  // the pairs path's query rows, as stored
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < num_tasks; ++t) {
      const Task task = tasks[t];
      const int64_t row0 = qs[task.seq] + task.first;
      const int64_t first_pos = cl[task.seq] - (qs[task.seq + 1] - qs[task.seq]) + task.first;
      const int64_t nq = task.count * G;
      for (int64_t r = 0; r < task.count; ++r)
        for (int64_t g = 0; g < G; ++g) {
          const int64_t v = r * G + g;
          const T* src = qp + (row0 + r) * qs0 + (task.kv_head * G + g) * qs1;
          if (pairs) {  // scored as stored, the scale applied after
            std::copy(src, src + hd, &q_raw[v * hd]);
          } else {
            float* dst = &q[v * hd];
#pragma omp simd
            for (int64_t d = 0; d < hd; ++d) dst[d] = to_float(src[d]) * scale;
          }
          qpos[v] = first_pos + r;
        }
      std::fill(m.begin(), m.begin() + nq, kNegInf);
      std::fill(l.begin(), l.begin() + nq, 0.f);
      std::fill(acc.begin(), acc.begin() + nq * hd, 0.f);
      const int64_t last_pos = first_pos + task.count - 1;
      const int64_t* table = tables + task.seq * max_blocks;
      for (int64_t kb = 0; kb * S <= last_pos; ++kb) {
        const int64_t base = kb * S, nk = std::min(S, last_pos + 1 - base), block = table[kb];
        const int64_t key_stride = hd;
        const C* keys = kc + (block * Hkv + task.kv_head) * S * hd;  // key j at keys + j * hd
        const C* values = vc + (block * Hkv + task.kv_head) * S * hd;
        if ((kb + kAhead) * S <= last_pos) {  // blocks lie anywhere: fetch ahead while this one runs
          const int64_t next = (table[kb + kAhead] * Hkv + task.kv_head) * S * hd;
          prefetch(kc + next, S * hd);
          prefetch(vc + next, S * hd);
        }
#if defined(__AVX512F__)
        // 16 keys at a time: a query's scores in one register, their exponentials against the
        // running max (rescaling what came before), then the value sums of all the queries
        for (int64_t c = 0; c < nk; c += 16) {
          const int64_t chunk = std::min<int64_t>(16, nk - c);
          if (pairs) {
#if defined(__AVX512BF16__)
            if constexpr (kBf16Pairs) {
              transpose_key_pairs(keys + c * key_stride, hd, chunk, keys_t.data());
              for (int64_t v = 0; v < nq; v += kQueries)
                with_queries(nq - v, [&](auto u) {
                  scores_of_pairs<decltype(u)::value>(&q_raw[v * hd], hd, keys_t.data(), scale, &s[v * 16]);
                });
            }
#endif
          } else {
            transpose_keys(keys + c * key_stride, hd, chunk, keys_t.data());
            for (int64_t v = 0; v < nq; v += kQueries)
              with_queries(nq - v, [&](auto u) { scores_of<decltype(u)::value>(&q[v * hd], hd, keys_t.data(), &s[v * 16]); });
          }
          for (int64_t v = 0; v < nq; ++v) {
            const int64_t visible = std::clamp<int64_t>(qpos[v] - base - c + 1, 0, chunk);  // causal mask
            const __mmask16 seen = first_lanes(visible);
            const __m512 scores = _mm512_loadu_ps(&s[v * 16]);
            const float new_m = std::max(m[v], _mm512_mask_reduce_max_ps(seen, scores));
            const __m512 p = _mm512_maskz_mov_ps(seen, fast_exp(_mm512_sub_ps(scores, _mm512_set1_ps(new_m))));
            _mm512_storeu_ps(&s[v * 16], p);
            const float correction = visible ? fast_exp(m[v] - new_m) : 1.f;  // ~0 on the first keys (m = -inf)
            l[v] = l[v] * correction + _mm512_reduce_add_ps(p);
            m[v] = new_m;
            if (correction != 1.f) {  // the max moved: most chunks leave it
              float* a = &acc[v * hd];
#pragma omp simd
              for (int64_t d = 0; d < hd; ++d) a[d] *= correction;
            }
          }
          // acc[v] += sum_j p[v, j] V[j], over the keys in order for each element
          for (int64_t d = 0; d < hd; d += 32) {  // two register-wide slices of the head at a time
            const __mmask16 masks[2] = {first_lanes(hd - d), first_lanes(hd - d - 16)};
            const C* chunk_values = values + c * key_stride + d;
            if (hd - d > 16) {
              weighted_values_of<C, 2>(nq, s.data(), 16, chunk, chunk_values, key_stride, masks, acc.data() + d, hd);
            } else {
              weighted_values_of<C, 1>(nq, s.data(), 16, chunk, chunk_values, key_stride, masks, acc.data() + d, hd);
            }
          }
        }
#else
        // scores, then their exponentials against the running max (rescaling what came before)
        for (int64_t v = 0; v < nq; ++v) {
          const int64_t visible = std::clamp<int64_t>(qpos[v] - base + 1, 0, nk);  // causal mask
          float* sv = &s[v * S];
          const float* qv = &q[v * hd];
          for (int64_t j = 0; j < visible; ++j) sv[j] = dot(qv, keys + j * key_stride, hd);
          float block_max = kNegInf;
#pragma omp simd reduction(max : block_max)
          for (int64_t j = 0; j < visible; ++j) block_max = std::max(block_max, sv[j]);
          const float new_m = std::max(m[v], block_max);
          const float correction = visible ? fast_exp(m[v] - new_m) : 1.f;  // ~0 on the first block (m = -inf)
          float sum = 0.f;
#pragma omp simd reduction(+ : sum)
          for (int64_t j = 0; j < nk; ++j) {
            sv[j] = j < visible ? fast_exp(sv[j] - new_m) : 0.f;
            sum += sv[j];
          }
          l[v] = l[v] * correction + sum;
          m[v] = visible ? new_m : m[v];
          float* a = &acc[v * hd];
#pragma omp simd
          for (int64_t d = 0; d < hd; ++d) a[d] *= correction;
        }
        // acc[v] += sum_j p[v, j] V[j], over the keys in order for each element
        for (int64_t v = 0; v < nq; ++v) {
          const float* p = &s[v * S];
          float* a = &acc[v * hd];
          for (int64_t j = 0; j < nk; ++j) {
            const C* val = values + j * key_stride;
            for (int64_t d = 0; d < hd; ++d) a[d] += p[j] * to_float(val[d]);
          }
        }
#endif
      }
      for (int64_t r = 0; r < task.count; ++r)
        for (int64_t g = 0; g < G; ++g) {
          const int64_t v = r * G + g;
          const float inv = 1.f / l[v];
          T* dst = op + ((row0 + r) * Hq + task.kv_head * G + g) * hd;
#pragma omp simd
          for (int64_t d = 0; d < hd; ++d) dst[d] = from_float<T>(acc[v * hd + d] * inv);
        }
    }
  }
}

}  // namespace

namespace {

// f(an element of the K/V cache's storage type): float, bf16 or float8 (e5m2, e4m3fn)
template <typename F>
void with_cache_element(at::ScalarType c_type, F&& f) {
  if (c_type == at::kFloat8_e5m2) {
    f(c10::Float8_e5m2());
  } else if (c_type == at::kFloat8_e4m3fn) {
    f(c10::Float8_e4m3fn());
  } else if (c_type == at::kBFloat16) {
    f(c10::BFloat16());
  } else {
    TORCH_CHECK(c_type == at::kFloat, "a K/V cache of ", c_type, ": fp32, bf16 or float8 (e5m2, e4m3fn)");
    f(float());
  }
}

// one row's heads into the cache at `slot`, rounded as torch's .to() rounds (through fp32); e4m3fn
// has no infinity, so it saturates at its largest finite value, 448, first (as kernels.attention._stored)
template <typename T, typename C>
void write_rows(const at::Tensor& x, at::Tensor& cache, const int64_t* slots) {
  const int64_t T_rows = x.size(0), Hkv = x.size(1), hd = x.size(2), S = cache.size(2);
  const T* xp = x.data_ptr<T>();
  C* cp = static_cast<C*>(cache.data_ptr());
  const float e4m3_max = static_cast<float>(std::numeric_limits<c10::Float8_e4m3fn>::max());
  for (int64_t t = 0; t < T_rows; ++t) {
    const int64_t block = slots[t] / S, offset = slots[t] % S;
    for (int64_t h = 0; h < Hkv; ++h) {
      const T* src = xp + t * x.stride(0) + h * x.stride(1);
      C* dst = cp + ((block * Hkv + h) * S + offset) * hd;
      for (int64_t d = 0; d < hd; ++d) {
        float v = to_float(src[d]);
        if constexpr (std::is_same_v<C, c10::Float8_e4m3fn>) v = std::clamp(v, -e4m3_max, e4m3_max);
        dst[d] = static_cast<C>(v);
      }
    }
  }
}

}  // namespace

void write_kv(at::Tensor& key_cache, at::Tensor& value_cache, const at::Tensor& key, const at::Tensor& value,
              const at::Tensor& slot_mapping) {
  check_rows(key, 3, "key");
  check_rows(value, 3, "value");
  TORCH_CHECK(key_cache.is_contiguous() && value_cache.is_contiguous() && key_cache.dim() == 4 &&
                  key_cache.sizes() == value_cache.sizes() && key_cache.scalar_type() == value_cache.scalar_type(),
              "key_cache and value_cache must be contiguous [N, Hkv, S, hd] pools of one dtype");
  TORCH_CHECK(key.sizes() == value.sizes() && key.scalar_type() == value.scalar_type() &&
                  key.size(1) == key_cache.size(1) && key.size(2) == key_cache.size(3),
              "key and value must be [T, Hkv, hd] rows of the cache's heads");
  auto slots = slot_mapping.to(at::kLong).contiguous();
  TORCH_CHECK(slots.numel() == key.size(0), "one slot per row");
  const int64_t* sp = slots.data_ptr<int64_t>();
  const int64_t capacity = key_cache.size(0) * key_cache.size(2);
  for (int64_t t = 0; t < slots.numel(); ++t)
    TORCH_CHECK(sp[t] >= 0 && sp[t] < capacity, "slot ", sp[t], " outside the cache of ", capacity);
  EPSERVE_DISPATCH(key.scalar_type(), "write_kv", [&] {
    with_cache_element(key_cache.scalar_type(), [&](auto cache_element) {
      using C = decltype(cache_element);
      write_rows<scalar_t, C>(key, key_cache, sp);
      write_rows<scalar_t, C>(value, value_cache, sp);
    });
  });
}

at::Tensor paged_attention(const at::Tensor& query, const at::Tensor& key_cache,
                           const at::Tensor& value_cache, const at::Tensor& block_tables,
                           const at::Tensor& query_start, const at::Tensor& context_lens, double scale) {
  check_rows(query, 3, "query");
  check_cpu(key_cache, "key_cache");
  TORCH_CHECK(key_cache.is_contiguous() && value_cache.is_contiguous() && key_cache.dim() == 4 &&
                  key_cache.sizes() == value_cache.sizes(),
              "key_cache and value_cache must be contiguous [N, Hkv, S, hd] pools");
  const int64_t T = query.size(0), Hq = query.size(1), hd = query.size(2);
  const int64_t Hkv = key_cache.size(1), S = key_cache.size(2);
  TORCH_CHECK(key_cache.size(3) == hd, "head dims of query and cache differ");
  TORCH_CHECK(Hq % Hkv == 0, "query heads must be a multiple of kv heads");
  const auto q_type = query.scalar_type(), c_type = key_cache.scalar_type();
  TORCH_CHECK(value_cache.scalar_type() == c_type, "key and value caches' dtypes differ");
  const bool fp8 = c_type == at::kFloat8_e5m2 || c_type == at::kFloat8_e4m3fn;
  TORCH_CHECK(c_type == q_type || fp8 || (q_type == at::kFloat && c_type == at::kBFloat16),
              "a cache of ", c_type, " under a ", q_type, " query: the cache holds the query's dtype, bf16 under "
              "fp32, or float8 (e5m2 or e4m3fn)");
  const int64_t B = context_lens.numel();
  TORCH_CHECK(query_start.numel() == B + 1 && block_tables.dim() == 2 && block_tables.size(0) == B,
              "query_start, context_lens and block_tables disagree on the batch");
  auto bt = block_tables.to(at::kLong).contiguous();
  auto qs_c = query_start.to(at::kLong).contiguous();
  auto cl_c = context_lens.to(at::kLong).contiguous();
  const int64_t *qs = qs_c.data_ptr<int64_t>(), *cl = cl_c.data_ptr<int64_t>();
  const int64_t max_blocks = bt.size(1);
  TORCH_CHECK(qs[B] == T, "query_start must end at the number of query rows");
  std::vector<Task> tasks;
  const int64_t tile = std::max<int64_t>(1, kTileRows / (Hq / Hkv));  // query positions per task
  int64_t work = 0;  // (query head, key) pairs times head dim
  for (int64_t b = 0; b < B; ++b) {
    const int64_t n = qs[b + 1] - qs[b];
    TORCH_CHECK(n <= cl[b] && (cl[b] + S - 1) / S <= max_blocks, "sequence ", b,
                ": context shorter than its queries, or more blocks than its block table holds");
    for (int64_t i = 0; i < n; i += tile)
      for (int64_t h = 0; h < Hkv; ++h) tasks.push_back({b, i, std::min(tile, n - i), h});
    work += n * cl[b] * Hq * hd;
  }
  auto out = at::empty({T, Hq, hd}, query.options());
  EPSERVE_DISPATCH(q_type, "paged_attention", [&] {
    with_cache_element(c_type, [&](auto cache_element) {
      attention_impl<scalar_t, decltype(cache_element)>(query, key_cache, value_cache, bt.data_ptr<int64_t>(),
                                                        max_blocks, qs, cl, tasks, tile, work, static_cast<float>(scale), out);
    });
  });
  return out;
}

}  // namespace epserve
