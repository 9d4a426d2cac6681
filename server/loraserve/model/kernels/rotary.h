// Rotary position embedding as transformers' Llama family applies it in fp32:
// out = x * cos + rotate_half(x) * sin, rotate_half(x) = cat(-x[D/2:], x[:D/2]). Each output
// rounds the same two products and their sum as torch's three ops do, so the bits are equal:
// GCC would contract a product and a sum into one multiply-add (one rounding) unless told not
// to, here only (the GEMMs want their multiply-adds); clang contracts only within an expression.

namespace LS_NAMESPACE {

#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")

// One row of D: out[d] = x[d] * c[d] + x'[d] * s[d], x' the row's other half, negated for d < D/2.
inline void rotate_row(const float* x, const float* c, const float* s, int64_t D, float* out) {
  const int64_t half = D / 2;
  int64_t d = 0;
  for (; d + kLanes <= half; d += kLanes) {
    const vf lo = load_vf(x + d), hi = load_vf(x + half + d);
    const vf lo_product = lo * load_vf(c + d), rotated_lo = -hi * load_vf(s + d);
    const vf hi_product = hi * load_vf(c + half + d), rotated_hi = lo * load_vf(s + half + d);
    *reinterpret_cast<vf*>(out + d) = lo_product + rotated_lo;
    *reinterpret_cast<vf*>(out + half + d) = hi_product + rotated_hi;
  }
  for (; d < half; ++d) {
    const float lo_product = x[d] * c[d], rotated_lo = -x[half + d] * s[d];
    const float hi_product = x[half + d] * c[half + d], rotated_hi = x[d] * s[half + d];
    out[d] = lo_product + rotated_lo;
    out[half + d] = hi_product + rotated_hi;
  }
}

// A [B, H, S, D] tensor's layout: strides in floats, D contiguous.
struct HeadsLayout {
  int64_t B, H, S, D;
  int64_t batch, head, position;
};

// out = rotary(x) for x and out laid out as given, cos and sin [B or 1, S, D] contiguous.
inline void rotate(const float* x, const HeadsLayout& in, const float* cos, const float* sin,
                   int64_t cos_batch_stride, float* out, const HeadsLayout& to) {
  const int64_t rows = in.B * in.H * in.S;
  at::parallel_for(0, rows, rows_grain(in.D), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / (in.H * in.S), h = r / in.S % in.H, s = r % in.S;
      const int64_t angle = b * cos_batch_stride + s * in.D;
      rotate_row(x + b * in.batch + h * in.head + s * in.position, cos + angle, sin + angle,
                 in.D, out + b * to.batch + h * to.head + s * to.position);
    }
  });
}

#pragma GCC pop_options

}  // namespace LS_NAMESPACE
