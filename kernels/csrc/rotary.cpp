// Query/key preparation of gated attention in one pass: per head, zero-centred RMSNorm then NeoX
// rotary embedding on the first R dims (rotate-half), angles computed from positions on the fly.
//   query [T, H, hd], key [T, KV, hd] (heads may be strided), q_weight / k_weight [hd],
//   positions [T] or [T, R / 2] (multimodal rows: a position per frequency), inv_freq [R / 2] fp32
//   ->  (query', key') contiguous.
// Roundings follow the reference (separate norm, cos/sin in the storage dtype, rotation in it).
#include "common.h"

namespace epserve {

namespace {

template <typename T>
void norm_rope_rows(const at::Tensor& x, const at::Tensor& weight, const float* cos_sin, int64_t R,
                    double eps, at::Tensor& out) {
  const int64_t T_ = x.size(0), H = x.size(1), hd = x.size(2), half = R / 2;
  const T* xp = x.data_ptr<T>();
  const T* wp = weight.data_ptr<T>();
  T* op = out.data_ptr<T>();
  at::parallel_for(0, T_ * H, grain_for(hd), [&](int64_t begin, int64_t end) {
    std::vector<float> v(hd);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t t = item / H, h = item % H;
      const T* src = xp + t * x.stride(0) + h * x.stride(1);
      load_floats(v.data(), src, hd);
      float ss = 0.f;
      for (int64_t d = 0; d < hd; ++d) ss += v[d] * v[d];
      const float r = 1.f / std::sqrt(ss / hd + static_cast<float>(eps));
      for (int64_t d = 0; d < hd; ++d) v[d] = round_to<T>(v[d] * r * (1.f + to_float(wp[d])));
      T* dst = op + (t * H + h) * hd;
      const float* cs = cos_sin + t * 2 * half;  // cos[half], sin[half]
      for (int64_t d = 0; d < half; ++d) {
        const float c = cs[d], s = cs[half + d], a = v[d], b = v[d + half];
        dst[d] = from_float<T>(round_to<T>(a * c) + round_to<T>(-b * s));
        dst[d + half] = from_float<T>(round_to<T>(b * c) + round_to<T>(a * s));
      }
      for (int64_t d = R; d < hd; ++d) dst[d] = from_float<T>(v[d]);
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> qk_norm_rope(const at::Tensor& query, const at::Tensor& key,
                                                const at::Tensor& q_weight, const at::Tensor& k_weight,
                                                double eps, const at::Tensor& positions,
                                                const at::Tensor& inv_freq) {
  check_rows(query, 3, "query");
  check_rows(key, 3, "key");
  const int64_t T = query.size(0), hd = query.size(2), half = inv_freq.numel(), R = 2 * half;
  const bool per_freq = positions.dim() == 2;
  TORCH_CHECK(key.size(0) == T && key.size(2) == hd && positions.numel() == (per_freq ? T * half : T),
              "query, key, positions disagree");
  TORCH_CHECK(R <= hd && q_weight.numel() == hd && k_weight.numel() == hd && q_weight.is_contiguous() &&
                  k_weight.is_contiguous(),
              "rotary dims or norm weights do not fit the head dim");
  TORCH_CHECK(query.scalar_type() == key.scalar_type() && query.scalar_type() == q_weight.scalar_type() &&
                  query.scalar_type() == k_weight.scalar_type(),
              "dtypes differ");
  auto pos = positions.to(at::kLong).contiguous();
  auto freq = inv_freq.to(at::kFloat).contiguous();
  std::vector<float> cos_sin(T * R);  // per row: cos of each frequency, then sin, in the storage dtype
  auto q_out = at::empty({T, query.size(1), hd}, query.options());
  auto k_out = at::empty({T, key.size(1), hd}, key.options());
  EPSERVE_DISPATCH(query.scalar_type(), "qk_norm_rope", [&] {
    const int64_t* pp = pos.data_ptr<int64_t>();
    const float* fp = freq.data_ptr<float>();
    for (int64_t t = 0; t < T; ++t)
      for (int64_t d = 0; d < half; ++d) {
        const float angle = static_cast<float>(per_freq ? pp[t * half + d] : pp[t]) * fp[d];
        cos_sin[t * R + d] = round_to<scalar_t>(std::cos(angle));
        cos_sin[t * R + half + d] = round_to<scalar_t>(std::sin(angle));
      }
    norm_rope_rows<scalar_t>(query, q_weight, cos_sin.data(), R, eps, q_out);
    norm_rope_rows<scalar_t>(key, k_weight, cos_sin.data(), R, eps, k_out);
  });
  return {q_out, k_out};
}

}  // namespace epserve
