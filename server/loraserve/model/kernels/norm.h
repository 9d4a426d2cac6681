// RMSNorm as transformers' Llama family computes it, one pass per row instead of six ops:
// y = weight * (x * (1 / sqrt(sum(x^2) / D + eps))), in fp32. In a 16-bit dtype X (x, weight
// and y) the row is widened, and, as transformers does, the normalised row is rounded to X
// before the weight multiplies it, the product rounded again. Only the order of the sum of
// squares differs from torch's (whose rsqrt is also 1 / sqrt).

namespace LS_NAMESPACE {

// x, y [M, D]; weight [D].
template <class X>
inline void rms_norm(const X* x, int64_t M, int64_t D, const X* weight, float eps, X* y) {
  at::parallel_for(0, M, rows_grain(D), [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const X* row = x + m * D;
      X* out = y + m * D;
      vf acc = vf{};
      int64_t d = 0;
      for (; d + kLanes <= D; d += kLanes) {
        const vf v = load_vf(row + d);
        acc += v * v;
      }
      float total = hsum(acc);
      for (; d < D; ++d) total += to_float(row[d]) * to_float(row[d]);
      const float inv = 1.f / std::sqrt(total / static_cast<float>(D) + eps);
      for (d = 0; d + kLanes <= D; d += kLanes) {
        const vf normed = rounded_as<X>(load_vf(row + d) * inv);
        store_rounded(out + d, load_vf(weight + d) * normed);
      }
      for (; d < D; ++d)
        round_to(out + d, to_float(weight[d]) * rounded_as<X>(to_float(row[d]) * inv));
    }
  });
}

}  // namespace LS_NAMESPACE
