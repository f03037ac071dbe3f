// One decode step of the gated delta rule for a batch of sequences, in place on the state pool.
//   q, k [B, Hk, dk], v [B, H, dv] (rows may be strided); a, b [B, H] (the raw in_proj_a / in_proj_b
//   outputs); A_log, dt_bias [H]; state [M, H, dk, dv] fp32; slots [B]  ->  o [B, H, dv] in v's dtype.
// Per value head h (key head h / (H / Hk)), as the reference (kernels.delta_rule) computes it:
//   g = -exp(A_log) * softplus(a + dt_bias); beta = sigmoid(b) (rounded to the input dtype);
//   q, k L2-normalised (eps 1e-6), q scaled by dk^-0.5;
//   S <- exp(g) S;  delta = beta (v - S^T k);  S <- S + k (x) delta;  o = S^T q.
// The state is read once and written once; both passes over S [dk, dv] run from cache.
#include "common.h"

namespace epserve {

namespace {

template <typename T>
void decode_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& a,
                 const at::Tensor& b, const float* A_log, const float* dt_bias, float* S_pool,
                 const int64_t* slots, at::Tensor& out) {
  const int64_t B = q.size(0), Hk = q.size(1), dk = q.size(2), H = v.size(1), dv = v.size(2);
  const int64_t group = H / Hk;
  const float scale = 1.f / std::sqrt(static_cast<float>(dk));
  const T *qp = q.data_ptr<T>(), *kp = k.data_ptr<T>(), *vp = v.data_ptr<T>();
  const T *ap = a.data_ptr<T>(), *bp = b.data_ptr<T>();
  T* op = out.data_ptr<T>();
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qn(dk), kn(dk), vv(dv), delta(dv), o(dv);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t s = item / H, h = item % H, hk = h / group;
      load_floats(qn.data(), qp + s * q.stride(0) + hk * dk, dk);
      load_floats(kn.data(), kp + s * k.stride(0) + hk * dk, dk);
      load_floats(vv.data(), vp + s * v.stride(0) + h * dv, dv);
      float qq = 0.f, kk = 0.f;
#pragma omp simd reduction(+ : qq, kk)
      for (int64_t i = 0; i < dk; ++i) {
        qq += qn[i] * qn[i];
        kk += kn[i] * kn[i];
      }
      const float qs = scale / std::sqrt(qq + 1e-6f), ks = 1.f / std::sqrt(kk + 1e-6f);
      for (int64_t i = 0; i < dk; ++i) {
        qn[i] *= qs;
        kn[i] *= ks;
      }
      const float g = -std::exp(A_log[h]) * softplus(to_float(ap[s * a.stride(0) + h]) + dt_bias[h]);
      const float decay = std::exp(g);
      const float beta = round_to<T>(sigmoid(to_float(bp[s * b.stride(0) + h])));
      float* S = S_pool + (slots[s] * H + h) * dk * dv;
      std::fill(delta.begin(), delta.end(), 0.f);
      for (int64_t i = 0; i < dk; ++i) {  // S^T k
        const float ki = kn[i];
        const float* row = S + i * dv;
        float* acc = delta.data();
#pragma omp simd
        for (int64_t j = 0; j < dv; ++j) acc[j] += row[j] * ki;
      }
      for (int64_t j = 0; j < dv; ++j) delta[j] = beta * (vv[j] - decay * delta[j]);
      std::fill(o.begin(), o.end(), 0.f);
      for (int64_t i = 0; i < dk; ++i) {  // S <- decay S + k (x) delta;  o += S[i] q[i]
        const float ki = kn[i], qi = qn[i];
        float* row = S + i * dv;
        const float* d = delta.data();
        float* acc = o.data();
#pragma omp simd
        for (int64_t j = 0; j < dv; ++j) {
          const float updated = decay * row[j] + ki * d[j];
          row[j] = updated;
          acc[j] += updated * qi;
        }
      }
      store_floats(op + (s * H + h) * dv, o.data(), dv);
    }
  });
}

}  // namespace

at::Tensor delta_rule_decode(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             const at::Tensor& a, const at::Tensor& b, const at::Tensor& A_log,
                             const at::Tensor& dt_bias, at::Tensor& state, const at::Tensor& slots) {
  check_rows(q, 3, "q");
  check_rows(k, 3, "k");
  check_rows(v, 3, "v");
  check_rows(a, 2, "a");
  check_rows(b, 2, "b");
  check_cpu(state, "state");
  const int64_t B = q.size(0), Hk = q.size(1), dk = q.size(2), H = v.size(1), dv = v.size(2);
  TORCH_CHECK(k.sizes() == q.sizes() && v.size(0) == B && a.size(0) == B && b.size(0) == B,
              "q, k, v, a, b disagree on the batch");
  TORCH_CHECK(q.stride(1) == dk && k.stride(1) == dk && v.stride(1) == dv, "heads must be contiguous");
  TORCH_CHECK(H % Hk == 0, "value heads must be a multiple of key heads");
  TORCH_CHECK(a.size(1) == H && b.size(1) == H && A_log.numel() == H && dt_bias.numel() == H,
              "a, b, A_log, dt_bias must hold one value per value head");
  TORCH_CHECK(state.scalar_type() == at::kFloat && state.is_contiguous() && state.dim() == 4 &&
                  state.size(1) == H && state.size(2) == dk && state.size(3) == dv,
              "state must be a contiguous fp32 [M, H, dk, dv] pool");
  TORCH_CHECK(slots.numel() == B, "one slot per sequence");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type() &&
                  q.scalar_type() == a.scalar_type() && q.scalar_type() == b.scalar_type(),
              "q, k, v, a and b dtypes differ");
  auto slots_c = slots.to(at::kLong).contiguous();
  auto A_f = A_log.to(at::kFloat).contiguous();
  auto dt_f = dt_bias.to(at::kFloat).contiguous();
  auto out = at::empty({B, H, dv}, v.options());
  EPSERVE_DISPATCH(q.scalar_type(), "delta_rule_decode", [&] {
    decode_impl<scalar_t>(q, k, v, a, b, A_f.data_ptr<float>(), dt_f.data_ptr<float>(),
                          state.data_ptr<float>(), slots_c.data_ptr<int64_t>(), out);
  });
  return out;
}

}  // namespace epserve
