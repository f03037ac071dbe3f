// The routed experts of a MoE layer: router top-k, and grouped SwiGLU with the weighted sum.
//
// topk_softmax: logits [T, E] -> idx [T, K] int64, weights [T, K] in the logits' dtype: softmax over
//   all experts in fp32, the K largest (descending, ties to the lower id), renormalised to sum 1.
// moe_experts: x [R, D], idx [R, K] (expert index in the bank, -1: not here), weights [R, K],
//   gate_up [N, 2I, D], down [N, D, I]  ->  out [R, D] = sum over k, in k order, of
//   weights[r, k] * down_e (silu(gate_e x_r) * up_e x_r), e = idx[r, k].
//   Pairs are grouped by expert (counting sort); a task is up to kRows pairs of one expert, so the
//   expert's weights are read once per task; each pair's weighted output rounds through the
//   storage dtype as the reference's does, and the sum over a row's pairs is taken in fp64 (exact
//   for these few terms), so any split of a row's experts over workers, summed again in fp64, gives
//   the same bits. partial=true returns those fp64 sums (an expert worker's answer) unrounded.
#include "common.h"
#include "gemv.h"

namespace epserve {

namespace {

constexpr int64_t kRows = 16;  // pairs of one expert per task
constexpr int64_t kPrefetchBytes = 2048;  // of each matrix of the next task's expert

template <typename T>
void topk_impl(const at::Tensor& logits, int64_t K, at::Tensor& idx, at::Tensor& weights) {
  const int64_t T_rows = logits.size(0), E = logits.size(1), ls = logits.stride(0);
  const T* lp = logits.data_ptr<T>();
  int64_t* ip = idx.data_ptr<int64_t>();
  T* wp = weights.data_ptr<T>();
  at::parallel_for(0, T_rows, grain_for(E), [&](int64_t begin, int64_t end) {
    std::vector<float> top_v(K);
    std::vector<int64_t> top_i(K);
    for (int64_t t = begin; t < end; ++t) {
      const T* row = lp + t * ls;
      int64_t n = 0;  // kept so far, sorted descending
      for (int64_t e = 0; e < E; ++e) {
        const float v = to_float(row[e]);
        if (n == K && !(v > top_v[K - 1])) continue;
        int64_t pos = n < K ? n++ : K - 1;
        while (pos > 0 && v > top_v[pos - 1]) {
          top_v[pos] = top_v[pos - 1];
          top_i[pos] = top_i[pos - 1];
          --pos;
        }
        top_v[pos] = v;
        top_i[pos] = e;
      }
      const float max = top_v[0];
      float sum = 0.f;
      for (int64_t j = 0; j < K; ++j) sum += (top_v[j] = std::exp(top_v[j] - max));
      for (int64_t j = 0; j < K; ++j) {
        ip[t * K + j] = top_i[j];
        wp[t * K + j] = from_float<T>(top_v[j] / sum);
      }
    }
  });
}

struct Task {
  int64_t expert, first, count;
};

// pairs p = r * K + k in `order`, grouped by expert: tasks[t] covers order[first .. first + count)
template <typename T, typename Out>
void experts_impl(const at::Tensor& x, const int64_t* ip, const T* wp, const at::Tensor& gate_up,
                  const at::Tensor& down, int64_t K, const std::vector<int64_t>& order,
                  const std::vector<Task>& tasks, at::Tensor& pair_out, at::Tensor& out) {
  const int64_t R = x.size(0), D = x.size(1), xs = x.stride(0);
  const int64_t I2 = gate_up.size(1), I = I2 / 2;
  const T *xp = x.data_ptr<T>(), *gp = gate_up.data_ptr<T>(), *dp = down.data_ptr<T>();
  T* pp = pair_out.data_ptr<T>();
  const int64_t num_tasks = static_cast<int64_t>(tasks.size());
  const int64_t work = num_tasks * 3 * I * D;  // weight elements read
#pragma omp parallel if (num_tasks > 1 && work > kParallelWork)
  {
    std::vector<float> h(kRows * I2), y(kRows * D);
    std::vector<T> act(kRows * I);
    const T* rows[kRows];
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < num_tasks; ++t) {
      const Task task = tasks[t];
      const int64_t n = task.count;
      if (t + 1 < num_tasks && tasks[t + 1].expert != task.expert) {
        // the start of the next expert's two weight streams: the hardware prefetchers, which ramp
        // up on each new stream, then find it under way (small experts are mostly stream starts)
        const int64_t next = tasks[t + 1].expert, elements = kPrefetchBytes / static_cast<int64_t>(sizeof(T));
        prefetch(gp + next * I2 * D, std::min<int64_t>(I2 * D, elements));
        prefetch(dp + next * D * I, std::min<int64_t>(D * I, elements));
      }
      for (int64_t r = 0; r < n; ++r) rows[r] = xp + (order[task.first + r] / K) * xs;
      rows_times_weights(rows, n, gp + task.expert * I2 * D, I2, D, h.data());  // gate | up
      for (int64_t r = 0; r < n; ++r) {
        const float* hr = &h[r * I2];
        T* ar = &act[r * I];
#pragma omp simd
        for (int64_t i = 0; i < I; ++i)
          ar[i] = from_float<T>(round_to<T>(silu(round_to<T>(hr[i]))) * round_to<T>(hr[I + i]));
        rows[r] = ar;
      }
      rows_times_weights(rows, n, dp + task.expert * D * I, D, I, y.data());  // down
      for (int64_t r = 0; r < n; ++r) {
        const int64_t p = order[task.first + r];
        const float w = to_float(wp[p]);
        const float* yr = &y[r * D];
        T* dst = pp + p * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) dst[d] = from_float<T>(w * round_to<T>(yr[d]));
      }
    }
  }
  Out* op = out.data_ptr<Out>();
  at::parallel_for(0, R, grain_for(D * K), [&](int64_t begin, int64_t end) {
    std::vector<double> sum(D);
    for (int64_t r = begin; r < end; ++r) {
      std::fill(sum.begin(), sum.end(), 0.0);
      for (int64_t k = 0; k < K; ++k) {
        if (ip[r * K + k] < 0) continue;
        const T* src = pp + (r * K + k) * D;
        double* acc = sum.data();
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) acc[d] += static_cast<double>(to_float(src[d]));
      }
      Out* dst = op + r * D;
      for (int64_t d = 0; d < D; ++d) {
        if constexpr (std::is_same_v<Out, double>) {
          dst[d] = sum[d];
        } else {
          dst[d] = from_float<T>(static_cast<float>(sum[d]));
        }
      }
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> topk_softmax(const at::Tensor& logits, int64_t K) {
  check_rows(logits, 2, "logits");
  const int64_t T = logits.size(0), E = logits.size(1);
  TORCH_CHECK(K >= 1 && K <= E, "top-k must be in 1..", E);
  auto idx = at::empty({T, K}, logits.options().dtype(at::kLong));
  auto weights = at::empty({T, K}, logits.options());
  EPSERVE_DISPATCH(logits.scalar_type(), "topk_softmax", [&] { topk_impl<scalar_t>(logits, K, idx, weights); });
  return {idx, weights};
}

at::Tensor moe_experts(const at::Tensor& x, const at::Tensor& idx, const at::Tensor& weights,
                       const at::Tensor& gate_up, const at::Tensor& down, bool partial) {
  check_rows(x, 2, "x");
  check_cpu(idx, "idx");
  TORCH_CHECK(gate_up.is_contiguous() && down.is_contiguous() && gate_up.dim() == 3 && down.dim() == 3,
              "gate_up and down must be contiguous [N, 2I, D] and [N, D, I] banks");
  const int64_t R = x.size(0), D = x.size(1), K = idx.size(1);
  const int64_t N = gate_up.size(0), I = gate_up.size(1) / 2;
  TORCH_CHECK(gate_up.size(2) == D && down.size(0) == N && down.size(1) == D && down.size(2) == I,
              "expert bank shapes disagree with x");
  TORCH_CHECK(idx.dim() == 2 && idx.size(0) == R && weights.sizes() == idx.sizes(),
              "idx and weights must be [R, K]");
  TORCH_CHECK(x.scalar_type() == gate_up.scalar_type() && x.scalar_type() == down.scalar_type(),
              "x and expert weights dtypes differ");
  auto idx_c = idx.to(at::kLong).contiguous();
  auto w_c = weights.to(x.scalar_type()).contiguous();
  const int64_t* ip = idx_c.data_ptr<int64_t>();
  const int64_t P = R * K;
  std::vector<int64_t> offsets(N + 1, 0), order(P);  // counting sort of the pairs by expert
  for (int64_t p = 0; p < P; ++p) {
    TORCH_CHECK(ip[p] < N, "expert index ", ip[p], " outside the bank of ", N);
    if (ip[p] >= 0) ++offsets[ip[p] + 1];
  }
  for (int64_t e = 0; e < N; ++e) offsets[e + 1] += offsets[e];
  {
    std::vector<int64_t> fill(offsets.begin(), offsets.end() - 1);
    for (int64_t p = 0; p < P; ++p)
      if (ip[p] >= 0) order[fill[ip[p]]++] = p;
  }
  std::vector<Task> tasks;
  for (int64_t e = 0; e < N; ++e)
    for (int64_t i = offsets[e]; i < offsets[e + 1]; i += kRows)
      tasks.push_back({e, i, std::min(kRows, offsets[e + 1] - i)});
  auto out = at::empty({R, D}, partial ? x.options().dtype(at::kDouble) : x.options());
  auto pair_out = at::empty({P, D}, x.options());  // the weighted result of each (row, k) pair
  EPSERVE_DISPATCH(x.scalar_type(), "moe_experts", [&] {
    if (partial) {
      experts_impl<scalar_t, double>(x, ip, w_c.data_ptr<scalar_t>(), gate_up, down, K, order, tasks, pair_out, out);
    } else {
      experts_impl<scalar_t, scalar_t>(x, ip, w_c.data_ptr<scalar_t>(), gate_up, down, K, order, tasks, pair_out,
                                       out);
    }
  });
  return out;
}

}  // namespace epserve
