// Writing a forward's new keys or values into a paged pool: one copy of D elements per token
// and head, straight from the projection's strided output (torch's index_copy_ made the
// transposed source contiguous first, then dispatched a strided copy per token); into an int8
// pool, each token's head quantized on the way, its scale written beside.

namespace LS_NAMESPACE {

// pool[slots[n], h, :] = states[h * stride_h + n * stride_n + (0..D)] for n < N, h < KVH;
// pool [S, KVH, D]; T: the pool's element, which the states already are (fp32 or 16 bits).
template <typename T>
inline void kv_write(T* pool, const int64_t* slots, const T* states, int64_t KVH, int64_t N,
                     int64_t D, int64_t stride_h, int64_t stride_n) {
  at::parallel_for(0, N, rows_grain(KVH * D), [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      T* dst = pool + slots[n] * KVH * D;
      for (int64_t h = 0; h < KVH; ++h)
        std::copy_n(states + h * stride_h + n * stride_n, D, dst + h * D);
    }
  });
}

// The int8 codes of a head's keys or values, and their scale: the scale is the largest
// magnitude / 127 (NaN where the head holds a NaN); each code is x / scale rounded to the
// nearest integer, ties to even, clamped to [-127, 127], and 0 where x / scale is not finite (a
// head of zeros: scale 0; one holding an infinity: its codes read back as NaN, 0 times an
// infinite scale). `kv_cache.quantize_heads` is the same in torch, and the tests' oracle.
// pool [S, KVH, D][slots[n], h] = the codes of states[h * stride_h + n * stride_n + (0..D)],
// scales [S, KVH][slots[n], h] = their scale, for n < N, h < KVH; S: the states' element.
template <typename S>
inline void kv_write_int8(int8_t* pool, float* scales, const int64_t* slots, const S* states,
                          int64_t KVH, int64_t N, int64_t D, int64_t stride_h, int64_t stride_n) {
  typedef int8_t vb __attribute__((vector_size(kLanes), aligned(1)));
  constexpr float kRound = 12582912.f;  // 1.5 * 2^23: (x + it) - it rounds |x| < 2^22, ties even
  constexpr float kInf = std::numeric_limits<float>::infinity();
  const int64_t vector_part = D / kLanes * kLanes;
  const auto code = [&](float v) {  // v = x / scale
    const float r = std::clamp((v + kRound) - kRound, -127.f, 127.f);
    return std::isfinite(v) ? int8_t(r) : int8_t(0);
  };
  at::parallel_for(0, N, rows_grain(KVH * D), [&](int64_t n0, int64_t n1) {
    std::vector<float> row(D);
    for (int64_t n = n0; n < n1; ++n) {
      for (int64_t h = 0; h < KVH; ++h) {
        widen_row(states + h * stride_h + n * stride_n, D, row.data());
        vf top{};
        vi nan{};
        int64_t d = 0;
        for (; d < vector_part; d += kLanes) {
          const vf x = load_vf(row.data() + d), a = x < 0 ? -x : x;
          nan |= a != a;
          top = a > top ? a : top;
        }
        float largest = 0.f;
        bool has_nan = false;
        for (int l = 0; l < kLanes; ++l) {
          has_nan |= nan[l] != 0;
          largest = top[l] > largest ? top[l] : largest;
        }
        for (; d < D; ++d) {
          const float a = std::fabs(row[d]);
          has_nan |= a != a;
          largest = a > largest ? a : largest;
        }
        const float scale = has_nan ? std::numeric_limits<float>::quiet_NaN() : largest / 127.f;
        const int64_t at = slots[n] * KVH + h;
        int8_t* codes = pool + at * D;
        for (d = 0; d < vector_part; d += kLanes) {
          const vf v = load_vf(row.data() + d) / scale, a = v < 0 ? -v : v;
          vf r = (v + kRound) - kRound;
          r = r > 127.f ? vf{} + 127.f : r;
          r = r < -127.f ? vf{} - 127.f : r;
          r = (v == v) & (a != kInf) ? r : vf{};
          *reinterpret_cast<vb*>(codes + d) =
              __builtin_convertvector(__builtin_convertvector(r, vi), vb);
        }
        for (; d < D; ++d) codes[d] = code(row[d] / scale);
        scales[at] = scale;
      }
    }
  });
}

}  // namespace LS_NAMESPACE
