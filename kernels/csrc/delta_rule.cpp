// The gated delta rule over a flat batch of sequences (decode steps and prefill chunks alike) on
// the state pool: one task per (sequence, value head) walks the sequence's rows in order with its
// state S [dk, dv] (fp32) in cache, read once from the pool (row slots[s]) and written once (row
// out_slots[s]: the same row for an update in place, another to keep the state before the step).
//   q, k [T, Hk, dk], v [T, H, dv] (rows may be strided); a, b [T, H] (the raw in_proj_a /
//   in_proj_b outputs); A_log, dt_bias [H]; state [M, H, dk, dv] fp32; slots, out_slots [B];
//   query_start [B + 1]  ->  o [T, H, dv] in v's dtype.
// Per row and value head h (key head h / (H / Hk)), as the reference (kernels.delta_rule) computes:
//   g = -exp(A_log) * softplus(a + dt_bias); beta = sigmoid(b) (rounded to the input dtype);
//   q, k L2-normalised (eps 1e-6), q scaled by dk^-0.5;
//   S <- exp(g) S;  delta = beta (v - S^T k);  S <- S + k (x) delta;  o = S^T q.
// One sweep over S per row: while it updates S for row t it also accumulates S^T k for row t + 1.
#include "common.h"

namespace epserve {

namespace {

struct Row {  // one row's normalised q, k and its gates, for one value head
  std::vector<float> q, k, v;
  float decay = 1.f, beta = 0.f;
};

template <typename T>
class RowReader {
 public:
  RowReader(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& a,
            const at::Tensor& b, const float* A_log, const float* dt_bias)
      : q_(q), k_(k), v_(v), a_(a), b_(b), A_log_(A_log), dt_bias_(dt_bias),
        dk_(q.size(2)), dv_(v.size(2)), group_(v.size(1) / q.size(1)),
        scale_(1.f / std::sqrt(static_cast<float>(q.size(2)))) {}

  void read(int64_t t, int64_t h, Row& row) const {
    const int64_t hk = h / group_;
    row.q.resize(dk_);
    row.k.resize(dk_);
    row.v.resize(dv_);
    load_floats(row.q.data(), q_.data_ptr<T>() + t * q_.stride(0) + hk * dk_, dk_);
    load_floats(row.k.data(), k_.data_ptr<T>() + t * k_.stride(0) + hk * dk_, dk_);
    load_floats(row.v.data(), v_.data_ptr<T>() + t * v_.stride(0) + h * dv_, dv_);
    float qq = 0.f, kk = 0.f;
    const float *qp = row.q.data(), *kp = row.k.data();
#pragma omp simd reduction(+ : qq, kk)
    for (int64_t i = 0; i < dk_; ++i) {
      qq += qp[i] * qp[i];
      kk += kp[i] * kp[i];
    }
    const float qs = scale_ / std::sqrt(qq + 1e-6f), ks = 1.f / std::sqrt(kk + 1e-6f);
    for (int64_t i = 0; i < dk_; ++i) {
      row.q[i] *= qs;
      row.k[i] *= ks;
    }
    const float a = to_float(a_.data_ptr<T>()[t * a_.stride(0) + h]);
    row.decay = std::exp(-std::exp(A_log_[h]) * softplus(a + dt_bias_[h]));
    row.beta = round_to<T>(sigmoid(to_float(b_.data_ptr<T>()[t * b_.stride(0) + h])));
  }

 private:
  const at::Tensor &q_, &k_, &v_, &a_, &b_;
  const float *A_log_, *dt_bias_;
  int64_t dk_, dv_, group_;
  float scale_;
};

// S^T k over S [dk, dv]: acc[j] = sum_i S[i, j] k[i]
inline void transpose_times(const float* S, const float* k, int64_t dk, int64_t dv, float* acc) {
  std::fill(acc, acc + dv, 0.f);
  for (int64_t i = 0; i < dk; ++i) {
    const float ki = k[i];
    const float* Si = S + i * dv;
#pragma omp simd
    for (int64_t j = 0; j < dv; ++j) acc[j] += Si[j] * ki;
  }
}

// One sweep down S for one row: S <- decay S + k (x) delta; o = S^T q; kv_next = S^T k_next.
// Columns go in blocks of N whose accumulators stay in registers while i runs down the rows.
template <int64_t N>
inline void sweep_block(float* S, int64_t dk, int64_t dv, float decay, const float* k, const float* q,
                        const float* delta, const float* k_next, float* o, float* kv_next) {
  float acc_o[N] = {}, acc_kv[N] = {}, d[N];
  for (int64_t j = 0; j < N; ++j) d[j] = delta[j];
  for (int64_t i = 0; i < dk; ++i) {
    float* Si = S + i * dv;
    const float ki = k[i], qi = q[i], kn = k_next[i];
#pragma omp simd
    for (int64_t j = 0; j < N; ++j) {
      const float u = decay * Si[j] + ki * d[j];
      Si[j] = u;
      acc_o[j] += u * qi;
      acc_kv[j] += u * kn;
    }
  }
  for (int64_t j = 0; j < N; ++j) {
    o[j] = acc_o[j];
    kv_next[j] = acc_kv[j];
  }
}

inline void sweep(float* S, int64_t dk, int64_t dv, float decay, const float* k, const float* q,
                  const float* delta, const float* k_next, float* o, float* kv_next) {
  int64_t j0 = 0;
  for (; j0 + 64 <= dv; j0 += 64) sweep_block<64>(S + j0, dk, dv, decay, k, q, delta + j0, k_next, o + j0, kv_next + j0);
  for (; j0 + 16 <= dv; j0 += 16) sweep_block<16>(S + j0, dk, dv, decay, k, q, delta + j0, k_next, o + j0, kv_next + j0);
  for (; j0 < dv; ++j0) sweep_block<1>(S + j0, dk, dv, decay, k, q, delta + j0, k_next, o + j0, kv_next + j0);
}

template <typename T>
void recurrent_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& a,
                    const at::Tensor& b, const float* A_log, const float* dt_bias, float* S_pool,
                    const int64_t* slots, const int64_t* out_slots, const int64_t* qs, int64_t B,
                    at::Tensor& out) {
  const int64_t H = v.size(1), dk = q.size(2), dv = v.size(2);
  const RowReader<T> reader(q, k, v, a, b, A_log, dt_bias);
  T* op = out.data_ptr<T>();
  const int64_t rows_per_item = std::max<int64_t>(1, qs[B] / std::max<int64_t>(1, B));
  at::parallel_for(0, B * H, grain_for(rows_per_item * dk * dv), [&](int64_t begin, int64_t end) {
    Row row, next;
    std::vector<float> kv(dv), kv_next(dv), delta(dv), o(dv), zeros(dk, 0.f);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t s = item / H, h = item % H, t0 = qs[s], t1 = qs[s + 1];
      if (t0 == t1) continue;
      float* S = S_pool + (out_slots[s] * H + h) * dk * dv;
      const float* S_in = S_pool + (slots[s] * H + h) * dk * dv;
      if (S_in != S) std::copy(S_in, S_in + dk * dv, S);  // then in place, in cache
      reader.read(t0, h, row);
      transpose_times(S, row.k.data(), dk, dv, kv.data());
      for (int64_t t = t0; t < t1; ++t) {
        const bool more = t + 1 < t1;
        if (more) reader.read(t + 1, h, next);
        for (int64_t j = 0; j < dv; ++j) delta[j] = row.beta * (row.v[j] - row.decay * kv[j]);
        sweep(S, dk, dv, row.decay, row.k.data(), row.q.data(), delta.data(),
              more ? next.k.data() : zeros.data(), o.data(), kv_next.data());
        store_floats(op + (t * H + h) * dv, o.data(), dv);
        std::swap(kv, kv_next);
        std::swap(row, next);
      }
    }
  });
}

}  // namespace

at::Tensor delta_rule(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& a,
                      const at::Tensor& b, const at::Tensor& A_log, const at::Tensor& dt_bias,
                      at::Tensor& state, const at::Tensor& slots, const at::Tensor& query_start,
                      const at::Tensor& out_slots) {
  check_rows(q, 3, "q");
  check_rows(k, 3, "k");
  check_rows(v, 3, "v");
  check_rows(a, 2, "a");
  check_rows(b, 2, "b");
  check_cpu(state, "state");
  const int64_t T = q.size(0), Hk = q.size(1), dk = q.size(2), H = v.size(1), dv = v.size(2);
  const int64_t B = slots.numel();
  TORCH_CHECK(k.sizes() == q.sizes() && v.size(0) == T && a.size(0) == T && b.size(0) == T,
              "q, k, v, a, b disagree on the rows");
  TORCH_CHECK(q.stride(1) == dk && k.stride(1) == dk && v.stride(1) == dv, "heads must be contiguous");
  TORCH_CHECK(H % Hk == 0, "value heads must be a multiple of key heads");
  TORCH_CHECK(a.size(1) == H && b.size(1) == H && A_log.numel() == H && dt_bias.numel() == H,
              "a, b, A_log, dt_bias must hold one value per value head");
  TORCH_CHECK(state.scalar_type() == at::kFloat && state.is_contiguous() && state.dim() == 4 &&
                  state.size(1) == H && state.size(2) == dk && state.size(3) == dv,
              "state must be a contiguous fp32 [M, H, dk, dv] pool");
  TORCH_CHECK(query_start.numel() == B + 1, "query_start must have one entry more than slots");
  TORCH_CHECK(out_slots.numel() == B, "out_slots must have one entry per sequence, as slots");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type() &&
                  q.scalar_type() == a.scalar_type() && q.scalar_type() == b.scalar_type(),
              "q, k, v, a and b dtypes differ");
  auto slots_c = slots.to(at::kLong).contiguous();
  auto out_slots_c = out_slots.to(at::kLong).contiguous();
  auto qs_c = query_start.to(at::kLong).contiguous();
  TORCH_CHECK(qs_c.data_ptr<int64_t>()[B] == T, "query_start must end at the number of rows");
  auto A_f = A_log.to(at::kFloat).contiguous();
  auto dt_f = dt_bias.to(at::kFloat).contiguous();
  auto out = at::empty({T, H, dv}, v.options());
  EPSERVE_DISPATCH(q.scalar_type(), "delta_rule", [&] {
    recurrent_impl<scalar_t>(q, k, v, a, b, A_f.data_ptr<float>(), dt_f.data_ptr<float>(), state.data_ptr<float>(),
                             slots_c.data_ptr<int64_t>(), out_slots_c.data_ptr<int64_t>(), qs_c.data_ptr<int64_t>(), B,
                             out);
  });
  return out;
}

}  // namespace epserve
