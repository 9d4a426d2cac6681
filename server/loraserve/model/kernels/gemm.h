// Small-M GEMM kernels: y[M, N] = x[M, K] @ W[N, K]^T (+ bias), W either fp32 or 4-bit
// (bitsandbytes NF4 / FP4: two codes per byte, high nibble first, one fp32 absmax per block of
// `blocksize` consecutive elements of the row-major [N, K] weight).
//
// Written once with GCC vector extensions of LS_LANES floats and compiled once per instruction
// set (AVX2: 8 lanes, AVX-512: 16 lanes); only the compiler's lowering differs between them.
//
// The 4-bit path never materialises the whole weight: a tile of a few output columns is decoded
// into a small fp32 buffer (the same values bitsandbytes' dequantize gives: code[q] * absmax),
// which stays in cache while every row of x is multiplied against it. The decoded buffer keeps
// each group of 2 * LS_LANES consecutive k as its even-k elements then its odd-k elements (that
// is how nibbles unpack fastest), so x is permuted the same way once per call: the dot products
// are unchanged by the shared order.

namespace LS_NAMESPACE {

constexpr int kLanes = LS_LANES;
typedef float vf __attribute__((vector_size(kLanes * 4), aligned(4)));
typedef int32_t vi __attribute__((vector_size(kLanes * 4), aligned(4)));
typedef uint8_t vb __attribute__((vector_size(kLanes), aligned(1)));

constexpr int kRowBlock = 4;     // rows of x per micro-kernel call
constexpr int kColBlock = 3;     // output columns per micro-kernel call
constexpr int kTileCols = 12;    // columns decoded per tile (a multiple of kColBlock)
constexpr int64_t kRowChunk = 64;  // rows of x per pass over the 4-bit weight

inline float hsum(vf v) {
  typedef float f4 __attribute__((vector_size(16)));
#if LS_LANES == 16
  const auto half = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                    __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
#else
  const vf half = v;
#endif
  f4 quarter = __builtin_shufflevector(half, half, 0, 1, 2, 3) +
               __builtin_shufflevector(half, half, 4, 5, 6, 7);
  quarter += __builtin_shufflevector(quarter, quarter, 2, 3, 0, 1);
  quarter += __builtin_shufflevector(quarter, quarter, 1, 0, 3, 2);
  return quarter[0];
}

// y[m * ldy + n] = sum_k x[m * ldx + k] * w[n * ldw + k], for m < MR, n < NR.
template <int MR, int NR>
inline void dot_block(const float* x, int64_t ldx, const float* w, int64_t ldw, int64_t K,
                      float* y, int64_t ldy) {
  vf acc[MR][NR];
  for (int m = 0; m < MR; ++m)
    for (int n = 0; n < NR; ++n) acc[m][n] = vf{};
  const int64_t kv = K - K % kLanes;
  for (int64_t k = 0; k < kv; k += kLanes) {
    vf wv[NR];
    for (int n = 0; n < NR; ++n) wv[n] = *reinterpret_cast<const vf*>(w + n * ldw + k);
    for (int m = 0; m < MR; ++m) {
      const vf xv = *reinterpret_cast<const vf*>(x + m * ldx + k);
      for (int n = 0; n < NR; ++n) acc[m][n] += xv * wv[n];
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int n = 0; n < NR; ++n) {
      float total = hsum(acc[m][n]);
      for (int64_t k = kv; k < K; ++k) total += x[m * ldx + k] * w[n * ldw + k];
      y[m * ldy + n] = total;
    }
}

template <int MR>
inline void dot_rows(const float* x, int64_t ldx, const float* w, int64_t ldw, int64_t K,
                     int64_t cols, float* y, int64_t ldy) {
  int64_t n = 0;
  for (; n + kColBlock <= cols; n += kColBlock)
    dot_block<MR, kColBlock>(x, ldx, w + n * ldw, ldw, K, y + n, ldy);
  switch (cols - n) {
    case 2: dot_block<MR, 2>(x, ldx, w + n * ldw, ldw, K, y + n, ldy); break;
    case 1: dot_block<MR, 1>(x, ldx, w + n * ldw, ldw, K, y + n, ldy); break;
    default: break;
  }
}

// Every row of x against `cols` weight rows w[cols, K] (ldw apart): y[:, :cols].
inline void dot_tile(const float* x, int64_t M, int64_t K, const float* w, int64_t ldw,
                     int64_t cols, float* y, int64_t ldy) {
  int64_t m = 0;
  for (; m + kRowBlock <= M; m += kRowBlock)
    dot_rows<kRowBlock>(x + m * K, K, w, ldw, K, cols, y + m * ldy, ldy);
  switch (M - m) {
    case 3: dot_rows<3>(x + m * K, K, w, ldw, K, cols, y + m * ldy, ldy); break;
    case 2: dot_rows<2>(x + m * K, K, w, ldw, K, cols, y + m * ldy, ldy); break;
    case 1: dot_rows<1>(x + m * K, K, w, ldw, K, cols, y + m * ldy, ldy); break;
    default: break;
  }
}

// x [M, K] fp32 contiguous; w [N, K] fp32 contiguous; y [M, N] fp32 contiguous. Rows go in
// chunks of kRowChunk, whose activations stay in cache while the weight streams past.
inline void gemm_f32(const float* x, int64_t M, int64_t K, const float* w, int64_t N, float* y) {
  const int64_t tiles = (N + kTileCols - 1) / kTileCols;
  for (int64_t m0 = 0; m0 < M; m0 += kRowChunk) {
    const int64_t rows = std::min(kRowChunk, M - m0);
    at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t n0 = t * kTileCols;
        const int64_t cols = std::min<int64_t>(kTileCols, N - n0);
        dot_tile(x + m0 * K, rows, K, w + n0 * K, K, cols, y + m0 * N + n0, N);
      }
    });
  }
}

// The order a decoded 4-bit row keeps its elements in: within each group of 2 * kLanes
// consecutive k, the even k first, then the odd k.
inline void permute_like_decoded(const float* x, int64_t M, int64_t K, float* out) {
  for (int64_t m = 0; m < M; ++m) {
    const float* src = x + m * K;
    float* dst = out + m * K;
    for (int64_t g = 0; g < K; g += 2 * kLanes)
      for (int i = 0; i < kLanes; ++i) {
        dst[g + i] = src[g + 2 * i];
        dst[g + kLanes + i] = src[g + 2 * i + 1];
      }
  }
}

// kLanes consecutive packed bytes as int32 lanes.
inline vi load_bytes(const uint8_t* bytes) {
#if LS_LANES == 16
  return reinterpret_cast<vi>(
      _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes))));
#else
  return reinterpret_cast<vi>(
      _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes))));
#endif
}

// The fp32 scale of every block of `cols` rows from row n0: absmax itself, or, when bitsandbytes
// double-quantized it, code2[absmax8[b]] * absmax2[b / 256] + offset.
struct Scales {
  const float* absmax;    // fp32 [blocks], or null when nested
  const uint8_t* absmax8;  // uint8 [blocks] when nested
  const float* code2;      // [256]
  const float* absmax2;    // [blocks / 256 rounded up]
  float offset;

  float operator()(int64_t block) const {
    if (absmax != nullptr) return absmax[block];
    return code2[absmax8[block]] * absmax2[block / 256] + offset;
  }
};

// Decode `cols` rows of the packed weight, starting at row n0, into dst [cols, K].
// K % blocksize == 0: every block lies inside one row.
inline void decode_rows(const uint8_t* packed, const Scales& scales, const float* code,
                        int64_t blocksize, int64_t K, int64_t n0, int64_t cols, float* dst) {
  vf table_lo, table_hi;
  for (int i = 0; i < kLanes; ++i) {
    table_lo[i] = code[i % 16];
    table_hi[i] = code[(kLanes + i) % 16];
  }
  const int64_t blocks_per_row = K / blocksize;
  for (int64_t c = 0; c < cols; ++c) {
    const uint8_t* bytes = packed + (n0 + c) * K / 2;
    const int64_t first_block = (n0 + c) * blocks_per_row;
    float* out = dst + c * K;
    for (int64_t b = 0; b < blocks_per_row; ++b) {
      const vf scale = vf{} + scales(first_block + b);
      for (int64_t k = b * blocksize; k < (b + 1) * blocksize; k += 2 * kLanes) {
        const vi q = load_bytes(bytes + k / 2);
        const vi hi = q >> 4;  // even k
        const vi lo = q & 15;  // odd k
#if LS_LANES == 16
        const vf even = __builtin_shuffle(table_lo, hi);
        const vf odd = __builtin_shuffle(table_lo, lo);
#else
        const vf even = __builtin_shuffle(table_lo, table_hi, hi);
        const vf odd = __builtin_shuffle(table_lo, table_hi, lo);
#endif
        *reinterpret_cast<vf*>(out + k) = even * scale;
        *reinterpret_cast<vf*>(out + k + kLanes) = odd * scale;
      }
    }
  }
}


// For 1 to 4 rows: each weight is decoded into registers and used at once, never stored. The
// block scale multiplies each block's partial sums, not every weight.
template <int MR>
inline void gemv_rows_4bit(const float* x, int64_t K, const uint8_t* packed,
                           const Scales& scales, const vf& table_lo, const vf& table_hi,
                           int64_t blocksize, int64_t n, float* y, int64_t ldy) {
  const uint8_t* bytes = packed + n * K / 2;
  const int64_t blocks_per_row = K / blocksize;
  vf acc[MR];
  for (int m = 0; m < MR; ++m) acc[m] = vf{};
  for (int64_t b = 0; b < blocks_per_row; ++b) {
    vf part[MR];
    for (int m = 0; m < MR; ++m) part[m] = vf{};
    for (int64_t k = b * blocksize; k < (b + 1) * blocksize; k += 2 * kLanes) {
      const vi q = load_bytes(bytes + k / 2);
#if LS_LANES == 16
      const vf even = __builtin_shuffle(table_lo, q >> 4);
      const vf odd = __builtin_shuffle(table_lo, q & 15);
#else
      const vf even = __builtin_shuffle(table_lo, table_hi, q >> 4);
      const vf odd = __builtin_shuffle(table_lo, table_hi, q & 15);
#endif
      for (int m = 0; m < MR; ++m)
        part[m] += *reinterpret_cast<const vf*>(x + m * K + k) * even +
                   *reinterpret_cast<const vf*>(x + m * K + k + kLanes) * odd;
    }
    const vf scale = vf{} + scales(n * blocks_per_row + b);
    for (int m = 0; m < MR; ++m) acc[m] += part[m] * scale;
  }
  for (int m = 0; m < MR; ++m) y[m * ldy + n] = hsum(acc[m]);
}

template <int MR>
inline void gemv_4bit(const float* x, int64_t K, const uint8_t* packed, const Scales& scales,
                      const float* code, int64_t blocksize, int64_t N, float* y) {
  vf table_lo, table_hi;
  for (int i = 0; i < kLanes; ++i) {
    table_lo[i] = code[i % 16];
    table_hi[i] = code[(kLanes + i) % 16];
  }
  at::parallel_for(0, N, kTileCols, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n)
      gemv_rows_4bit<MR>(x, K, packed, scales, table_lo, table_hi, blocksize, n, y, N);
  });
}

// x [M, K] fp32 (already permuted like decoded rows); packed [N * K / 2] uint8; scales: one per
// block of `blocksize`; code [16] fp32; y [M, N] fp32. K % blocksize == 0 and
// blocksize % (2 * kLanes) == 0.
inline void gemm_4bit(const float* x, int64_t M, int64_t K, const uint8_t* packed,
                      const Scales& scales, const float* code, int64_t blocksize, int64_t N,
                      float* y) {
  switch (M) {
    case 1: return gemv_4bit<1>(x, K, packed, scales, code, blocksize, N, y);
    case 2: return gemv_4bit<2>(x, K, packed, scales, code, blocksize, N, y);
    case 3: return gemv_4bit<3>(x, K, packed, scales, code, blocksize, N, y);
    case 4: return gemv_4bit<4>(x, K, packed, scales, code, blocksize, N, y);
    default: break;
  }
  const int64_t tiles = (N + kTileCols - 1) / kTileCols;
  // Rows in chunks whose activations stay in cache while every tile of the weight passes;
  // each tile is decoded once per chunk.
  for (int64_t m0 = 0; m0 < M; m0 += kRowChunk) {
    const int64_t rows = std::min(kRowChunk, M - m0);
    at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> decoded(kTileCols * K);
      for (int64_t t = begin; t < end; ++t) {
        const int64_t n0 = t * kTileCols;
        const int64_t cols = std::min<int64_t>(kTileCols, N - n0);
        decode_rows(packed, scales, code, blocksize, K, n0, cols, decoded.data());
        dot_tile(x + m0 * K, rows, K, decoded.data(), K, cols, y + m0 * N + n0, N);
      }
    });
  }
}

}  // namespace LS_NAMESPACE
