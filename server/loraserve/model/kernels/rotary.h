// Rotary position embedding as transformers' Llama family applies it (fp32, or a 16-bit dtype):
// out = x * cos + rotate_half(x) * sin, rotate_half(x) = cat(-x[D/2:], x[:D/2]). Each output
// rounds the same two products and their sum as torch's three ops do, so the bits are equal:
// GCC would contract a product and a sum into one multiply-add (one rounding) unless told not
// to, here only (the GEMMs want their multiply-adds); clang contracts only within an expression.

namespace LS_NAMESPACE {

#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")

// One row of D: out[d] = x[d] * c[d] + x'[d] * s[d], x' the row's other half, negated for d < D/2;
// in a 16-bit X, each product and the sum rounded to X, as torch's ops in X round them.
template <class X>
inline void rotate_row(const X* x, const X* c, const X* s, int64_t D, X* out) {
  const int64_t half = D / 2;
  int64_t d = 0;
  for (; d + kLanes <= half; d += kLanes) {
    const vf lo = load_vf(x + d), hi = load_vf(x + half + d);
    const vf lo_product = rounded_as<X>(lo * load_vf(c + d));
    const vf rotated_lo = rounded_as<X>(-hi * load_vf(s + d));
    const vf hi_product = rounded_as<X>(hi * load_vf(c + half + d));
    const vf rotated_hi = rounded_as<X>(lo * load_vf(s + half + d));
    store_rounded(out + d, lo_product + rotated_lo);
    store_rounded(out + half + d, hi_product + rotated_hi);
  }
  for (; d < half; ++d) {
    const float lo = to_float(x[d]), hi = to_float(x[half + d]);
    const float lo_product = rounded_as<X>(lo * to_float(c[d]));
    const float rotated_lo = rounded_as<X>(-hi * to_float(s[d]));
    const float hi_product = rounded_as<X>(hi * to_float(c[half + d]));
    const float rotated_hi = rounded_as<X>(lo * to_float(s[half + d]));
    round_to(out + d, lo_product + rotated_lo);
    round_to(out + half + d, hi_product + rotated_hi);
  }
}

// A [B, H, S, D] tensor's layout: strides in elements, D contiguous.
struct HeadsLayout {
  int64_t B, H, S, D;
  int64_t batch, head, position;
};

// out = rotary(x) for x and out laid out as given, cos and sin [B or 1, S, D] contiguous. Rows
// go in x's memory order: heads innermost where x is [B, S, H, D] seen through a transpose (as
// a projection's output is), so that each thread reads and writes one run (a 3,183-token bf16
// prefill's q and k: 0.42 the time of positions innermost, one-off, 2026-12-01).
template <class X>
inline void rotate(const X* x, const HeadsLayout& in, const X* cos, const X* sin,
                   int64_t cos_batch_stride, X* out, const HeadsLayout& to) {
  const int64_t rows = in.B * in.H * in.S;
  const bool heads_inner = in.head < in.position;
  at::parallel_for(0, rows, rows_grain(in.D), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / (in.H * in.S);
      const int64_t h = heads_inner ? r % in.H : r / in.S % in.H;
      const int64_t s = heads_inner ? r / in.H % in.S : r % in.S;
      const int64_t angle = b * cos_batch_stride + s * in.D;
      rotate_row(x + b * in.batch + h * in.head + s * in.position, cos + angle, sin + angle,
                 in.D, out + b * to.batch + h * to.head + s * to.position);
    }
  });
}

#pragma GCC pop_options

}  // namespace LS_NAMESPACE
