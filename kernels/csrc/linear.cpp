// y = x W^T for a few rows (decode batches): the weight streamed once, split across threads by
// output rows. Larger batches go to the BLAS (kernels.linear decides).
//   x [M, K] (rows may be strided), weight [N, K]  ->  y [M, N]
#include "common.h"
#include "gemv.h"

namespace epserve {

namespace {

constexpr int64_t kMaxRows = 16;
constexpr int64_t kColumns = 64;  // output columns per task

template <typename T>
void linear_impl(const at::Tensor& x, const at::Tensor& weight, at::Tensor& y) {
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0), xs = x.stride(0);
  const T* xp = x.data_ptr<T>();
  const T* wp = weight.data_ptr<T>();
  T* yp = y.data_ptr<T>();
  const int64_t blocks = (N + kColumns - 1) / kColumns;
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    const T* rows[kMaxRows];
    float out[kMaxRows * kColumns];
    for (int64_t r = 0; r < M; ++r) rows[r] = xp + r * xs;
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t n0 = blk * kColumns, n = std::min(N, n0 + kColumns) - n0;
      rows_times_weights(rows, M, wp + n0 * K, n, K, out);
      for (int64_t r = 0; r < M; ++r) store_floats(yp + r * N + n0, out + r * n, n);
    }
  });
}

}  // namespace

at::Tensor linear_rows(const at::Tensor& x, const at::Tensor& weight) {
  check_rows(x, 2, "x");
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous() && weight.size(1) == x.size(1),
              "weight must be a contiguous [N, K] matrix matching x's K");
  TORCH_CHECK(x.size(0) <= kMaxRows, "linear_rows takes at most ", kMaxRows, " rows");
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), "x and weight dtypes differ");
  auto y = at::empty({x.size(0), weight.size(0)}, x.options());
  EPSERVE_DISPATCH(x.scalar_type(), "linear_rows", [&] { linear_impl<scalar_t>(x, weight, y); });
  return y;
}

}  // namespace epserve
