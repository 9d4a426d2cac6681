// RMSNorm as transformers' Llama family computes it in fp32, one pass per row instead of six
// ops: y = weight * (x * (1 / sqrt(sum(x^2) / D + eps))). Only the order of the sum of squares
// differs from torch's (whose rsqrt is also 1 / sqrt).

namespace LS_NAMESPACE {

// x, y [M, D]; weight [D].
inline void rms_norm(const float* x, int64_t M, int64_t D, const float* weight, float eps,
                     float* y) {
  at::parallel_for(0, M, rows_grain(D), [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const float* row = x + m * D;
      float* out = y + m * D;
      vf acc = vf{};
      int64_t d = 0;
      for (; d + kLanes <= D; d += kLanes) {
        const vf v = *reinterpret_cast<const vf*>(row + d);
        acc += v * v;
      }
      float total = hsum(acc);
      for (; d < D; ++d) total += row[d] * row[d];
      const float inv = 1.f / std::sqrt(total / static_cast<float>(D) + eps);
      for (d = 0; d + kLanes <= D; d += kLanes) {
        const vf normed = *reinterpret_cast<const vf*>(row + d) * inv;
        *reinterpret_cast<vf*>(out + d) = *reinterpret_cast<const vf*>(weight + d) * normed;
      }
      for (; d < D; ++d) out[d] = weight[d] * (row[d] * inv);
    }
  });
}

}  // namespace LS_NAMESPACE
