// Small-M GEMM kernels: y[M, N] = x[M, K] @ W[N, K]^T (+ bias), W either fp32 or 4-bit
// (bitsandbytes NF4 / FP4: two codes per byte, high nibble first, one fp32 absmax per block of
// `blocksize` consecutive elements of the row-major [N, K] weight).
//
// Written once with GCC vector extensions of LS_LANES floats and compiled once per instruction
// set (AVX2: 8 lanes, AVX-512: 16 lanes); only the compiler's lowering differs between them.
//
// The 4-bit path never materialises the whole weight: for 1 to 4 rows (with AVX-512 5 and 6
// too where the next path does not take the weight) each weight is decoded into registers and
// used at once (up to 4 rows read a vector of a column's packed bytes at a time where its
// blocks allow); from 5 to 12 rows with AVX-512, a block of 32 output columns is decoded a chunk
// of k at a time into vectors of 16 columns, each row's x[k] broadcast against them; for up to
// one pass of rows (a decode step), a block of output columns decodes one group of k at a time
// while the previous group's multiply-adds run;
// for more, a tile of a few output columns is decoded, one chunk of k at a time, into a small
// fp32 buffer (the same values bitsandbytes' dequantize gives: code[q] * absmax) that stays in
// L1 while every pass of rows of x is multiplied against it. Past 16 rows, the last 1 to 8
// (AVX2: 1) rows of a batch that is not a multiple of 16 take the few-rows paths on their own
// instead of a whole vector's work. A decoded chunk keeps each group of 2 * LS_LANES
// consecutive k as its even-k elements then its odd-k elements (that is how nibbles unpack
// fastest), so x is permuted the same way once per call: the dot products are unchanged by the
// shared order.

namespace LS_NAMESPACE {

constexpr int kLanes = LS_LANES;
typedef float vf __attribute__((vector_size(kLanes * 4), aligned(4)));
typedef int32_t vi __attribute__((vector_size(kLanes * 4), aligned(4)));
typedef uint8_t vb __attribute__((vector_size(kLanes), aligned(1)));

// bfloat16 as torch stores it: the upper 16 bits of a float. Widened exactly by a shift, after
// one zero-extending load (the compiler splits `__builtin_convertvector` into halves).
typedef uint16_t bf16;

inline vf load_vf(const float* p) { return *reinterpret_cast<const vf*>(p); }
inline vf load_vf(const bf16* p) {
#if LS_LANES == 16 && defined(__AVX512F__)
  const __m256i half = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return reinterpret_cast<vf>(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
#elif LS_LANES == 8
  const __m128i half = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return reinterpret_cast<vf>(_mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16));
#else  // 16 lanes without AVX-512: only the test build that checks that logic
  typedef uint16_t vh __attribute__((vector_size(kLanes * 2), aligned(2)));
  typedef uint32_t vu __attribute__((vector_size(kLanes * 4), aligned(4)));
  return reinterpret_cast<vf>(__builtin_convertvector(*reinterpret_cast<const vh*>(p), vu) << 16);
#endif
}
#if LS_LANES == 16 && defined(__AVX512BW__)
// 32 bf16 from p widened into two vectors (p[0..15], p[16..31]), each exactly load_vf's: one
// 64-byte load and two word permutes that move each value into the upper half of its float,
// zeroing the lower half (2 loads, 2 widenings and 2 shifts for two load_vf).
constexpr bool kBf16Pairs = true;
inline void load_vf_pair(const bf16* p, vf& first, vf& second) {
  alignas(64) static constexpr uint16_t kFirst[32] = {
      0, 0, 0, 1, 0, 2, 0, 3, 0, 4, 0, 5, 0, 6, 0, 7,
      0, 8, 0, 9, 0, 10, 0, 11, 0, 12, 0, 13, 0, 14, 0, 15};
  alignas(64) static constexpr uint16_t kSecond[32] = {
      0, 16, 0, 17, 0, 18, 0, 19, 0, 20, 0, 21, 0, 22, 0, 23,
      0, 24, 0, 25, 0, 26, 0, 27, 0, 28, 0, 29, 0, 30, 0, 31};
  constexpr __mmask32 kHighWords = 0xAAAAAAAA;
  const __m512i words = _mm512_loadu_si512(p);
  first = reinterpret_cast<vf>(_mm512_maskz_permutexvar_epi16(
      kHighWords, _mm512_load_si512(kFirst), words));
  second = reinterpret_cast<vf>(_mm512_maskz_permutexvar_epi16(
      kHighWords, _mm512_load_si512(kSecond), words));
}
#else
constexpr bool kBf16Pairs = false;
inline void load_vf_pair(const bf16* p, vf& first, vf& second) {
  first = load_vf(p);
  second = load_vf(p + kLanes);
}
#endif

// bf16 rows are read this many elements (8 cache lines) ahead of their loads: widening takes
// three instructions a vector, so fewer lines are in flight than with float rows, which reach
// the memory bandwidth without it (a decode step's 56 LoRA deltas: 0.69 of the float slots'
// time with it, 0.76 without; 128 or 512 ahead: less).
constexpr int64_t kBf16PrefetchAhead = 256;

inline float to_float(float v) { return v; }
inline float to_float(bf16 v) { return std::bit_cast<float>(uint32_t(v) << 16); }
// int8 codes (the output projection in 8 bits), widened exactly: the scales apply to the sums.
inline vf load_vf(const int8_t* p) {
#if LS_LANES == 16 && defined(__AVX512F__)
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return reinterpret_cast<vf>(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes)));
#elif LS_LANES == 8
  const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  return reinterpret_cast<vf>(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes)));
#else  // 16 lanes without AVX-512: only the test build that checks that logic
  typedef int8_t vb __attribute__((vector_size(kLanes), aligned(1)));
  return __builtin_convertvector(*reinterpret_cast<const vb*>(p), vf);
#endif
}
inline float to_float(int8_t v) { return float(v); }

// IEEE half precision as torch stores it, widened exactly by F16C's conversion (a distinct type
// from bf16, which is a plain uint16_t, so that overloads tell them apart).
struct fp16 {
  uint16_t bits;
};

inline vf load_vf(const fp16* p) {
#if LS_LANES == 16 && defined(__AVX512F__)
  const __m256i half = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return reinterpret_cast<vf>(_mm512_cvtph_ps(half));
#elif LS_LANES == 8
  const __m128i half = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return reinterpret_cast<vf>(_mm256_cvtph_ps(half));
#else  // 16 lanes without AVX-512: only the test build that checks that logic
  const __m256 low = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const __m256 high = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8)));
  typedef float v8 __attribute__((vector_size(32), aligned(4)));
  return __builtin_shufflevector(reinterpret_cast<v8>(low), reinterpret_cast<v8>(high), 0, 1, 2,
                                 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
#endif
}
inline float to_float(fp16 v) { return _cvtsh_ss(v.bits); }

// A float rounded to nearest even, as torch converts it: bf16 by its upper 16 bits (a NaN to
// the quiet NaN torch gives), fp16 by F16C.
inline void store_rounded(bf16* p, vf v) {
  typedef uint32_t vu __attribute__((vector_size(kLanes * 4), aligned(4)));
  typedef uint16_t vh __attribute__((vector_size(kLanes * 2), aligned(2)));
  const vu bits = reinterpret_cast<vu>(v);
  const vu rounded = (bits + (((bits >> 16) & 1) + 0x7FFF)) >> 16;
  const vu nan = reinterpret_cast<vu>(v != v);  // all ones where v is a NaN
  *reinterpret_cast<vh*>(p) = __builtin_convertvector((rounded & ~nan) | (nan & 0x7FC0), vh);
}
inline void store_rounded(fp16* p, vf v) {
#if LS_LANES == 16 && defined(__AVX512F__)
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                      _mm512_cvtps_ph(reinterpret_cast<__m512>(v), _MM_FROUND_TO_NEAREST_INT));
#elif LS_LANES == 8
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                   _mm256_cvtps_ph(reinterpret_cast<__m256>(v), _MM_FROUND_TO_NEAREST_INT));
#else  // 16 lanes without AVX-512: only the test build that checks that logic
  typedef float v8 __attribute__((vector_size(32), aligned(4)));
  const v8 low = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7);
  const v8 high = __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                   _mm256_cvtps_ph(reinterpret_cast<__m256>(low), _MM_FROUND_TO_NEAREST_INT));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p + 8),
                   _mm256_cvtps_ph(reinterpret_cast<__m256>(high), _MM_FROUND_TO_NEAREST_INT));
#endif
}

inline void round_to(bf16* p, float v) {
  const uint32_t bits = std::bit_cast<uint32_t>(v);
  *p = v != v ? bf16{0x7FC0} : static_cast<bf16>((bits + (((bits >> 16) & 1) + 0x7FFF)) >> 16);
}
inline void round_to(fp16* p, float v) { p->bits = _cvtss_sh(v, _MM_FROUND_TO_NEAREST_INT); }
inline void store_rounded(float* p, vf v) { *reinterpret_cast<vf*>(p) = v; }
inline void round_to(float* p, float v) { *p = v; }
// v rounded to X's precision (nearest even) and widened back: what a torch op in X rounds its
// fp32 result to. Float: v itself. In registers: store_rounded's bits, kept in the upper half
// (bf16), or F16C's conversion there and back (fp16).
template <class X>
inline vf rounded_as(vf v) {
  if constexpr (std::is_same_v<X, float>) {
    return v;
  } else if constexpr (std::is_same_v<X, bf16>) {
    typedef uint32_t vu __attribute__((vector_size(kLanes * 4), aligned(4)));
    const vu bits = reinterpret_cast<vu>(v);
    const vu rounded = (bits + (((bits >> 16) & 1) + 0x7FFF)) & 0xFFFF0000u;
    const vu nan = reinterpret_cast<vu>(v != v);  // all ones where v is a NaN
    return reinterpret_cast<vf>((rounded & ~nan) | (nan & 0x7FC00000u));
  } else {
#if LS_LANES == 16 && defined(__AVX512F__)
    return reinterpret_cast<vf>(_mm512_cvtph_ps(
        _mm512_cvtps_ph(reinterpret_cast<__m512>(v), _MM_FROUND_TO_NEAREST_INT)));
#elif LS_LANES == 8
    return reinterpret_cast<vf>(_mm256_cvtph_ps(
        _mm256_cvtps_ph(reinterpret_cast<__m256>(v), _MM_FROUND_TO_NEAREST_INT)));
#else  // 16 lanes without AVX-512: only the test build that checks that logic
    alignas(64) X narrow[kLanes];
    store_rounded(narrow, v);
    return load_vf(narrow);
#endif
  }
}
// One value rounded as rounded_as<X> rounds a vector of them.
template <class X>
inline float rounded_as(float v) {
  X narrow;
  round_to(&narrow, v);
  return to_float(narrow);
}

constexpr int kRowBlock = 4;     // rows of x per micro-kernel call
constexpr int kColBlock = 3;     // output columns per micro-kernel call
constexpr int kTileCols = 12;    // columns decoded per tile (a multiple of kColBlock)

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

// y[m * ldy + n * ystride] = sum_k x[m * ldx + k] * w[n * ldw + k], for m < MR, n < NR; w is
// float or bf16 (widened as it is loaded).
template <int MR, int NR, class W>
inline void dot_block(const float* x, int64_t ldx, const W* w, int64_t ldw, int64_t K,
                      float* y, int64_t ldy, int64_t ystride = 1) {
  vf acc[MR][NR];
  for (int m = 0; m < MR; ++m)
    for (int n = 0; n < NR; ++n) acc[m][n] = vf{};
  const int64_t kv = K - K % kLanes;
  const auto prefetch = [&](int64_t k) {
    if constexpr (sizeof(W) == 2)  // see kBf16PrefetchAhead
      for (int n = 0; n < NR; ++n)
        _mm_prefetch(reinterpret_cast<const char*>(w + n * ldw + k + kBf16PrefetchAhead),
                     _MM_HINT_T0);
  };
  const auto multiply = [&](int64_t k, const vf (&wv)[NR]) {
    for (int m = 0; m < MR; ++m) {
      const vf xv = *reinterpret_cast<const vf*>(x + m * ldx + k);
      for (int n = 0; n < NR; ++n) acc[m][n] += xv * wv[n];
    }
  };
  int64_t k = 0;
  // bf16 rows two vectors a step (load_vf_pair), where the registers hold both
  constexpr bool kPairs = std::is_same_v<W, bf16> && kBf16Pairs && MR * NR + 2 * (NR + MR) <= 30;
  if constexpr (kPairs)
    for (; k + 2 * kLanes <= kv; k += 2 * kLanes) {
      prefetch(k);
      vf first[NR], second[NR];
      for (int n = 0; n < NR; ++n) load_vf_pair(w + n * ldw + k, first[n], second[n]);
      multiply(k, first);
      multiply(k + kLanes, second);
    }
  for (; k < kv; k += kLanes) {
    prefetch(k);
    vf wv[NR];
    for (int n = 0; n < NR; ++n) wv[n] = load_vf(w + n * ldw + k);
    multiply(k, wv);
  }
  for (int m = 0; m < MR; ++m)
    for (int n = 0; n < NR; ++n) {
      float total = hsum(acc[m][n]);
      // A multiply-add written out: whether GCC contracts the product into one must not
      // depend on W (a bf16 weight gives the sums of fp32 weights of its values).
      for (int64_t k = kv; k < K; ++k)
        total = __builtin_fmaf(x[m * ldx + k], to_float(w[n * ldw + k]), total);
      y[m * ldy + n * ystride] = total;
    }
}

// The L2 streamer follows one stream a 4 KB page: rows read side by side that share a page
// (bf16 rows under 2,048 elements, float ones under 1,024) came from memory at about 20 GB/s
// where whole pages' rows reach 28. With each block's rows from distinct pages (and bf16 rows
// loaded in pairs) a 32,000 x 1,024 bf16 output projection took 0.82x the time at one row and
// 0.77x at four (benchmarks/RESULTS.md, 2026-12-06).
constexpr int64_t kPageBytes = 4096;

template <int MR, int NR, class W>
inline void dot_rows(const float* x, int64_t ldx, const W* w, int64_t ldw, int64_t K,
                     int64_t cols, float* y, int64_t ldy) {
  // Rows shorter than a page: a block takes rows `spread` apart, each from its own page.
  const int64_t per_page = kPageBytes / (ldw * int64_t{sizeof(W)});
  const int64_t spread = std::max<int64_t>(1, std::min(per_page, cols / NR));
  int64_t n = 0;
  if (spread > 1)
    for (; n + spread * NR <= cols; n += spread * NR)
      for (int64_t j = 0; j < spread; ++j)
        dot_block<MR, NR>(x, ldx, w + (n + j) * ldw, spread * ldw, K, y + n + j, ldy, spread);
  for (; n + NR <= cols; n += NR)
    dot_block<MR, NR>(x, ldx, w + n * ldw, ldw, K, y + n, ldy);
  switch (cols - n) {
    case 5: dot_block<MR, 5>(x, ldx, w + n * ldw, ldw, K, y + n, ldy); break;
    case 4: dot_block<MR, 4>(x, ldx, w + n * ldw, ldw, K, y + n, ldy); break;
    case 3: dot_block<MR, 3>(x, ldx, w + n * ldw, ldw, K, y + n, ldy); break;
    case 2: dot_block<MR, 2>(x, ldx, w + n * ldw, ldw, K, y + n, ldy); break;
    case 1: dot_block<MR, 1>(x, ldx, w + n * ldw, ldw, K, y + n, ldy); break;
    default: break;
  }
}

// Every row of x against `cols` weight rows w[cols, K] (ldw apart): y[:, :cols], NR columns
// per block.
template <int NR = kColBlock, class W>
inline void dot_tile(const float* x, int64_t M, int64_t K, const W* w, int64_t ldw,
                     int64_t cols, float* y, int64_t ldy) {
  int64_t m = 0;
  for (; m + kRowBlock <= M; m += kRowBlock)
    dot_rows<kRowBlock, NR>(x + m * K, K, w, ldw, K, cols, y + m * ldy, ldy);
  switch (M - m) {
    case 3: dot_rows<3, NR>(x + m * K, K, w, ldw, K, cols, y + m * ldy, ldy); break;
    case 2: dot_rows<2, NR>(x + m * K, K, w, ldw, K, cols, y + m * ldy, ldy); break;
    case 1: dot_rows<1, NR>(x + m * K, K, w, ldw, K, cols, y + m * ldy, ldy); break;
    default: break;
  }
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
    // Rounded, then offset, as bitsandbytes' dequantize does: the compiler would fuse the two
    // into one multiply-add in some callers and not in others, and the kernels' paths would
    // then scale the same block differently.
    float scale = code2[absmax8[block]] * absmax2[block / 256];
    asm("" : "+x"(scale));
    return scale + offset;
  }
};

// ---- decoding 4-bit weights: kGroup k at a time, 16 packed bytes, into kGroupVecs vectors ----

constexpr int64_t kGroup = 32;
constexpr int kGroupVecs = kGroup / kLanes;

#if LS_LANES == 16
// A group decodes into its 16 even k, then its 16 odd k (one permute of the 16 code values each).
inline int64_t decoded_k(int64_t j) {
  const int64_t i = j % kGroup;
  return j - i + (i < 16 ? 2 * i : 2 * (i - 16) + 1);
}

struct CodeTables {
  vf values;  // code[0..15]
};

inline CodeTables code_tables(const float* code) {
  CodeTables t;
  for (int i = 0; i < 16; ++i) t.values[i] = code[i];
  return t;
}

// The table of a block's decoded weights, code[q] * scale: the same products as scaling each
// decoded weight, one multiply a block instead of one a vector.
constexpr bool kScaledTables = true;
inline CodeTables scaled(const CodeTables& t, vf scale) { return CodeTables{t.values * scale}; }

inline void decode_group(const uint8_t* bytes, const CodeTables& t, vf (&out)[kGroupVecs]) {
#if defined(__AVX512F__)
  // One vpmovzxbd: GCC lowers the generic conversion below to 16 scalar byte loads and inserts,
  // which took as long as the GEMM itself.
  const vi q = reinterpret_cast<vi>(
      _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes))));
#else  // 16 lanes without AVX-512: only the test build that checks that logic
  const vi q = __builtin_convertvector(*reinterpret_cast<const vb*>(bytes), vi);  // 16 bytes
#endif
#if defined(__AVX512F__)
  // vpermps reads only the low 4 bits of each index: the low nibble needs no mask.
  const __m512 values = reinterpret_cast<__m512>(t.values);
  out[0] = reinterpret_cast<vf>(_mm512_permutexvar_ps(reinterpret_cast<__m512i>(q >> 4), values));
  out[1] = reinterpret_cast<vf>(_mm512_permutexvar_ps(reinterpret_cast<__m512i>(q), values));
#else
  out[0] = __builtin_shuffle(t.values, q >> 4);
  out[1] = __builtin_shuffle(t.values, q & 15);
#endif
}
#else
// AVX2 has no 16-entry float permute, so each of a code value's four bytes is looked up for 32
// nibbles at once (vpshufb), and the byte planes are interleaved back into floats. Vector v of
// a group then holds k = 8v, 8v+2, 8v+4, 8v+6, 8v+1, 8v+3, 8v+5, 8v+7.
inline int64_t decoded_k(int64_t j) {
  const int64_t t = j % 8;
  return j - t + (t < 4 ? 2 * t : 2 * t - 7);
}

struct CodeTables {
  __m256i planes[4];  // byte p of code[0..15], in both 128-bit lanes
};

// The byte planes cannot be scaled: each decoded vector is multiplied by its block's scale.
constexpr bool kScaledTables = false;
inline const CodeTables& scaled(const CodeTables& t, vf) { return t; }

inline CodeTables code_tables(const float* code) {
  alignas(32) uint8_t bytes[4][32];
  for (int i = 0; i < 32; ++i) {
    uint32_t bits;
    std::memcpy(&bits, code + i % 16, 4);
    for (int p = 0; p < 4; ++p) bytes[p][i] = static_cast<uint8_t>(bits >> (8 * p));
  }
  CodeTables t;
  for (int p = 0; p < 4; ++p)
    t.planes[p] = _mm256_load_si256(reinterpret_cast<const __m256i*>(bytes[p]));
  return t;
}

inline void decode_group(const uint8_t* bytes, const CodeTables& t, vf (&out)[kGroupVecs]) {
  const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes));
  const __m128i nibble = _mm_set1_epi8(0x0F);
  const __m128i high = _mm_and_si128(_mm_srli_epi16(packed, 4), nibble);  // even k
  const __m128i low = _mm_and_si128(packed, nibble);                       // odd k
  // codes 0-15: even k of bytes 0-15; codes 16-31: odd k of bytes 0-15
  const __m256i codes = _mm256_inserti128_si256(_mm256_castsi128_si256(high), low, 1);
  __m256i plane[4];
  for (int p = 0; p < 4; ++p) plane[p] = _mm256_shuffle_epi8(t.planes[p], codes);
  const __m256i lo01 = _mm256_unpacklo_epi8(plane[0], plane[1]);  // codes 0-7 | 16-23
  const __m256i hi01 = _mm256_unpackhi_epi8(plane[0], plane[1]);  // codes 8-15 | 24-31
  const __m256i lo23 = _mm256_unpacklo_epi8(plane[2], plane[3]);
  const __m256i hi23 = _mm256_unpackhi_epi8(plane[2], plane[3]);
  out[0] = reinterpret_cast<vf>(_mm256_unpacklo_epi16(lo01, lo23));  // codes 0-3 | 16-19
  out[1] = reinterpret_cast<vf>(_mm256_unpackhi_epi16(lo01, lo23));  // codes 4-7 | 20-23
  out[2] = reinterpret_cast<vf>(_mm256_unpacklo_epi16(hi01, hi23));  // codes 8-11 | 24-27
  out[3] = reinterpret_cast<vf>(_mm256_unpackhi_epi16(hi01, hi23));  // codes 12-15 | 28-31
}
#endif

// acc[m][c] += (the sum of part[m][c]'s kParts chains) * scale for every row m: a GEMV's
// partial sums of column c over a block (or step), scaled by its block's scale.
template <int MR, int NC, int kParts>
inline void add_scaled_parts(const vf (&part)[MR][NC][kParts], int c, vf scale,
                             vf (&acc)[MR][NC]) {
  for (int m = 0; m < MR; ++m) {
    vf sum = part[m][c][0];
    for (int i = 1; i < kParts; ++i) sum += part[m][c][i];
    acc[m][c] += sum * scale;
  }
}

// y[m, n0 + c] (rows ldy apart) = the sum of acc[m][c]'s lanes: a GEMV's sums leaving.
template <int MR, int NC>
inline void store_column_sums(const vf (&acc)[MR][NC], int64_t n0, float* y, int64_t ldy) {
  for (int m = 0; m < MR; ++m)
    for (int c = 0; c < NC; ++c) y[m * ldy + n0 + c] = hsum(acc[m][c]);
}

// For 1 to kGemvRows rows: each weight is decoded into registers and used at once, never
// stored. The block scale multiplies each block's partial sums, not every weight. NC output
// columns at a time, each row's sums of a column in two accumulators up to 4 rows (independent
// chains of multiply-adds), and each step prefetches a line kGemvAhead bytes on. One column at
// a time without prefetches, one row streamed its weights at 10 GB/s; with both changes 17 (56
// decode projections 0.66x the time, paired, 2026-12-01), with either alone at most 11. With
// AVX-512 it also beats the one-pass outer products up to 6 rows (5: 9.1 against 15.1 ms for
// the 56 projections; 6: 13.7 against 17.1; 8: 20.9 against 16.1; one-offs), though 6 rows go
// to the column-vector path below where it takes the weight; AVX2's decoding needs the
// registers more columns or rows would take.
template <int MR>
constexpr int kGemvCols = kLanes == 16 ? (MR <= 2 ? 4 : MR <= 4 ? 2 : 1) : 1;
constexpr int64_t kGemvRows = kLanes == 16 ? 6 : 4;
constexpr int64_t kGemvAhead = 4096;  // bytes, at least, between a line read and one prefetched

template <int MR, int NC>
inline void gemv_cols_4bit(const float* x, int64_t K, const uint8_t* packed,
                           const Scales& scales, const CodeTables& tables, int64_t blocksize,
                           int64_t n0, int64_t N, float* y, int64_t ldy) {
  const int64_t blocks_per_row = K / blocksize;
  // The columns' bytes are one run, and the next columns' follow it: a group step reads NC * 16
  // bytes of this run and prefetches the line as far on as the run is long, or kGemvAhead.
  const uint8_t* ahead = packed + n0 * K / 2 + std::max<int64_t>(NC * K / 2, kGemvAhead);
  const uint8_t* end = packed + N * K / 2;
  constexpr int kParts = MR <= 4 ? 2 : 1;  // more rows: chains enough, registers too few
  vf acc[MR][NC];
  for (int m = 0; m < MR; ++m)
    for (int c = 0; c < NC; ++c) acc[m][c] = vf{};
  for (int64_t b = 0; b < blocks_per_row; ++b) {
    vf part[MR][NC][kParts];
    for (int m = 0; m < MR; ++m)
      for (int c = 0; c < NC; ++c)
        for (int i = 0; i < kParts; ++i) part[m][c][i] = vf{};
    for (int64_t k = b * blocksize; k < (b + 1) * blocksize; k += kGroup) {
      const int64_t read = k / kGroup * NC * 16;  // bytes of the run read before this step
      if (read % 64 == 0 && ahead + read < end)
        _mm_prefetch(reinterpret_cast<const char*>(ahead + read), _MM_HINT_T0);
      for (int c = 0; c < NC; ++c) {
        vf w[kGroupVecs];
        decode_group(packed + (n0 + c) * K / 2 + k / 2, tables, w);
        for (int m = 0; m < MR; ++m)
          for (int v = 0; v < kGroupVecs; ++v)
            part[m][c][v % kParts] +=
                *reinterpret_cast<const vf*>(x + m * K + k + v * kLanes) * w[v];
      }
    }
    for (int c = 0; c < NC; ++c)
      add_scaled_parts(part, c, vf{} + scales((n0 + c) * blocks_per_row + b), acc);
  }
  store_column_sums(acc, n0, y, ldy);
}

#if (LS_LANES == 16 && defined(__AVX512F__)) || LS_LANES == 8
#define LS_GEMV_WIDE 1
// The same for up to kGemvWideRows rows where a column's blocks hold a multiple of 64 k and K is
// a multiple of a step (8 k a lane: 128 with AVX-512, 64 with AVX2): each step loads a column's
// packed bytes as one vector of dwords, lane j holding k 8j to 8j + 7 of the step's, and its 8
// nibbles, shifted down in turn, index the code values (`wide_lookup`): 8 vectors of weights
// for 7 shifts and 8 lookups, where the path above widens every 16 bytes (vpmovzxbd) first with
// AVX-512, and looks up four byte planes and interleaves them with AVX2. A block's 64 k are 8
// lanes, so a step's sums are scaled by one vector of its blocks' scales (AVX-512: two).
// On the 2-core AMD EPYC (2026-12-04, `ab_kernels.py --projections`, two runs) with AVX-512 a
// decode step's 56 projections took 0.88-0.93x the time at one row and 0.73-0.80x at 2 to 4, a
// Llama 3 8B layer's 0.92-0.98x and 0.69-0.90x; 5 rows, bound by their multiply-adds, 0.99x and
// 1.06x, so they stay above. The AVX2 build on the same CPU (one run): 0.92x, 0.96x and 0.80x
// at 1, 2 and 4 rows, the 8B layer 0.88x, 0.91x and 0.89x.
constexpr int64_t kGemvWideStepK = 8 * kLanes;
constexpr int64_t kGemvWideRows = 4;

inline bool gemv_wide_takes(int64_t blocksize, int64_t M, int64_t K) {
  return M <= kGemvWideRows && blocksize % 64 == 0 && K % kGemvWideStepK == 0;
}

// Position j of the wide path's decoded order -> k: vector t of a step holds lane j's nibble t,
// the low nibble (odd k) of byte t / 2 for even t, the high nibble (even k) for odd t.
inline int64_t gemv_wide_decoded_k(int64_t j) {
  const int64_t i = j % kGemvWideStepK, t = i / kLanes, lane = i % kLanes;
  return j - i + 8 * lane + 2 * (t / 2) + (t % 2 == 0 ? 1 : 0);
}

typedef uint32_t vu __attribute__((vector_size(kLanes * 4), aligned(4)));

// The 16 code values as wide_lookup reads them.
struct WideCode {
#if LS_LANES == 16
  __m512 values;
#else
  __m256 low, high;  // code[0..7], code[8..15]
#endif
};

inline WideCode wide_code(const float* code) {
#if LS_LANES == 16
  return WideCode{_mm512_loadu_ps(code)};
#else
  return WideCode{_mm256_loadu_ps(code), _mm256_loadu_ps(code + 8)};
#endif
}

// code[each lane's low 4 bits of q]
inline vf wide_lookup(const WideCode& code, vu q) {
#if LS_LANES == 16
  // vpermps reads only the low 4 bits of each index
  return reinterpret_cast<vf>(_mm512_permutexvar_ps(reinterpret_cast<__m512i>(q), code.values));
#else
  // vpermps reads the low 3 bits; bit 3, shifted to the sign, picks the upper 8 values
  const __m256i i = reinterpret_cast<__m256i>(q);
  return reinterpret_cast<vf>(_mm256_blendv_ps(_mm256_permutevar8x32_ps(code.low, i),
                                               _mm256_permutevar8x32_ps(code.high, i),
                                               _mm256_castsi256_ps(_mm256_slli_epi32(i, 28))));
#endif
}

// The scales of the step from k of the column whose first block is `first`: lanes of 8 k, 64 k
// to a block (AVX-512: a step's two halves; AVX2: one), blocks of 2^blocksize_log2 k.
inline vf wide_scales(const Scales& scales, int64_t first, int64_t k, int blocksize_log2) {
  const float low = scales(first + (k >> blocksize_log2));
#if LS_LANES == 16
  const float high = scales(first + ((k + kGemvWideStepK / 2) >> blocksize_log2));
  return reinterpret_cast<vf>(_mm512_insertf32x8(_mm512_set1_ps(low), _mm256_set1_ps(high), 1));
#else
  return vf{} + low;
#endif
}

template <int MR, int NC>
inline void gemv_wide_cols_4bit(const float* x, int64_t K, const uint8_t* packed,
                                const Scales& scales, const WideCode& code, int blocksize_log2,
                                int64_t n0, int64_t N, float* y, int64_t ldy) {
  constexpr int64_t kStepBytes = kGemvWideStepK / 2;
  const int64_t blocks_per_row = K >> blocksize_log2;
  const uint8_t* ahead = packed + n0 * K / 2 + std::max<int64_t>(NC * K / 2, kGemvAhead);
  const uint8_t* end = packed + N * K / 2;
  constexpr int kParts = MR * NC <= 4 ? 2 : 1;  // independent chains where registers allow
  vf acc[MR][NC];
  for (int m = 0; m < MR; ++m)
    for (int c = 0; c < NC; ++c) acc[m][c] = vf{};
  for (int64_t k = 0; k < K; k += kGemvWideStepK) {
    const int64_t read = k / 2 * NC;  // bytes of the run read before this step
    for (int64_t line = read; line < read + NC * kStepBytes; line += 64)
      if (ahead + line < end)
        _mm_prefetch(reinterpret_cast<const char*>(ahead + line), _MM_HINT_T0);
    vu nibbles[NC];
    for (int c = 0; c < NC; ++c)
      nibbles[c] = *reinterpret_cast<const vu*>(packed + (n0 + c) * K / 2 + k / 2);
    vf part[MR][NC][kParts];
#pragma GCC unroll 8
    for (int t = 0; t < 8; ++t) {
      vf rows[MR];
      for (int m = 0; m < MR; ++m) rows[m] = load_vf(x + m * K + k + t * kLanes);
      for (int c = 0; c < NC; ++c) {
        const vf w = wide_lookup(code, nibbles[c]);
        nibbles[c] >>= 4;
        for (int m = 0; m < MR; ++m) {
          vf& sum = part[m][c][t % kParts];
          sum = t < kParts ? rows[m] * w : sum + rows[m] * w;
        }
      }
    }
    for (int c = 0; c < NC; ++c)
      add_scaled_parts(part, c, wide_scales(scales, (n0 + c) * blocks_per_row, k, blocksize_log2),
                       acc);
  }
  store_column_sums(acc, n0, y, ldy);
}
#endif

// x [M, K] with each row's k in decoded order, for the 1-to-kGemvRows-row 4-bit path.
inline void permute_like_decoded(const float* x, int64_t M, int64_t K, float* out) {
  for (int64_t m = 0; m < M; ++m)
    for (int64_t j = 0; j < K; ++j) out[m * K + j] = x[m * K + decoded_k(j)];
}

#ifdef LS_GEMV_WIDE
// x [M, K] with each row's k in the wide path's decoded order.
inline void permute_like_wide(const float* x, int64_t M, int64_t K, float* out) {
  for (int64_t m = 0; m < M; ++m)
    for (int64_t j = 0; j < K; ++j) out[m * K + j] = x[m * K + gemv_wide_decoded_k(j)];
}
#endif

// x as permute_like_decoded (or, where gemv_wide_takes, permute_like_wide) orders it.
template <int MR>
inline void gemv_4bit(const float* x, int64_t K, const uint8_t* packed, const Scales& scales,
                      const float* code, int64_t blocksize, int64_t N, float* y) {
  constexpr int NC = kGemvCols<MR>;
  static_assert(kTileCols % NC == 0, "a tile's columns split evenly into column blocks");
  const CodeTables tables = code_tables(code);
#ifdef LS_GEMV_WIDE
  const bool wide = gemv_wide_takes(blocksize, MR, K);
  const WideCode wide_values = wide_code(code);
  const int blocksize_log2 = __builtin_ctzll(blocksize);
#endif
  parallel_items((N + kTileCols - 1) / kTileCols, [&](WorkQueue& queue) {
    queue.each([&](int64_t t) {
      const int64_t end = std::min((t + 1) * kTileCols, N);
      int64_t n = t * kTileCols;
#ifdef LS_GEMV_WIDE
      if constexpr (MR <= kGemvWideRows) {
        if (wide) {
          for (; n + NC <= end; n += NC)
            gemv_wide_cols_4bit<MR, NC>(x, K, packed, scales, wide_values, blocksize_log2, n, N,
                                        y, N);
          for (; n < end; ++n)
            gemv_wide_cols_4bit<MR, 1>(x, K, packed, scales, wide_values, blocksize_log2, n, N,
                                       y, N);
          return;
        }
      }
#endif
      for (; n + NC <= end; n += NC)
        gemv_cols_4bit<MR, NC>(x, K, packed, scales, tables, blocksize, n, N, y, N);
      for (; n < end; ++n)
        gemv_cols_4bit<MR, 1>(x, K, packed, scales, tables, blocksize, n, N, y, N);
    });
  });
}

// ---- 5 rows and more (past one pass with 16 lanes): outer products over chunks in L1 ----
//
// x is transposed once per call into passes of up to kPassRows rows, each [K, width] with its
// rows padded with zeros to whole vectors. For every tile of kTileCols output columns and every
// chunk of kDepth k, the micro-kernel keeps a [kTileCols / MV columns, MV vectors of rows] block
// of sums in registers, broadcasts one weight per column and loads MV vectors of activations per
// k: each load from memory feeds several FMAs, and a chunk's weights (kTileCols x kDepth) and
// activations (kDepth x kPassRows) fit in L1 together. Sums carry over chunks in a per-tile
// [kTileCols, rows] buffer, written to y once per tile.

constexpr int kMaxRowVecs = 2;                       // vectors of rows per micro-kernel
constexpr int64_t kPassRows = kMaxRowVecs * kLanes;  // rows of x per pass
// Sums a micro-kernel keeps in registers: with 2 row vectors and a broadcast, 27 of AVX-512's 32
// registers (a whole tile's columns at once: 0.82 -> 0.95 of the one-core matmul peak) or 15 of
// AVX2's 16.
#if defined(__AVX512F__)
constexpr int kAccRegs = 24;
#else
constexpr int kAccRegs = 12;
#endif
constexpr int64_t kDepth = 128;                      // k per chunk (a multiple of kGroup)

// Row vectors in the pass of x that starts at row m0.
inline int pass_vectors(int64_t M, int64_t m0) {
  return static_cast<int>((std::min(kPassRows, M - m0) + kLanes - 1) / kLanes);
}

// Floats per column of a tile's sums: every row, the last pass padded to whole vectors.
inline int64_t padded_rows(int64_t M) {
  const int64_t last = (M - 1) / kPassRows * kPassRows;
  return last + pass_vectors(M, last) * kLanes;
}

// Transposes go in 8 x 8 blocks of AVX2 vectors whatever LS_LANES is: a pass's width is a
// multiple of 8 either way.
typedef float v8f __attribute__((vector_size(32), aligned(4)));

// out[t * ldo + r] = rows[r][t] for 8 rows and 8 t.
inline void store_transposed(const v8f (&rows)[8], float* out, int64_t ldo) {
  v8f pair_lo[4], pair_hi[4];  // rows 2i and 2i + 1 interleaved: t 0, 1, 4, 5 | t 2, 3, 6, 7
  for (int i = 0; i < 4; ++i) {
    pair_lo[i] = __builtin_shufflevector(rows[2 * i], rows[2 * i + 1], 0, 8, 1, 9, 4, 12, 5, 13);
    pair_hi[i] = __builtin_shufflevector(rows[2 * i], rows[2 * i + 1], 2, 10, 3, 11, 6, 14, 7, 15);
  }
  v8f quad[4][2];  // [t][h]: rows 4h..4h + 3 at t, then at t + 4
  for (int h = 0; h < 2; ++h) {
    const v8f &lo0 = pair_lo[2 * h], &lo1 = pair_lo[2 * h + 1];
    const v8f &hi0 = pair_hi[2 * h], &hi1 = pair_hi[2 * h + 1];
    quad[0][h] = __builtin_shufflevector(lo0, lo1, 0, 1, 8, 9, 4, 5, 12, 13);
    quad[1][h] = __builtin_shufflevector(lo0, lo1, 2, 3, 10, 11, 6, 7, 14, 15);
    quad[2][h] = __builtin_shufflevector(hi0, hi1, 0, 1, 8, 9, 4, 5, 12, 13);
    quad[3][h] = __builtin_shufflevector(hi0, hi1, 2, 3, 10, 11, 6, 7, 14, 15);
  }
  for (int t = 0; t < 4; ++t) {
    const v8f &a = quad[t][0], &b = quad[t][1];
    *reinterpret_cast<v8f*>(out + t * ldo) = __builtin_shufflevector(a, b, 0, 1, 2, 3, 8, 9, 10, 11);
    *reinterpret_cast<v8f*>(out + (t + 4) * ldo) =
        __builtin_shufflevector(a, b, 4, 5, 6, 7, 12, 13, 14, 15);
  }
}

// dst [cols, rows] (rows of ldd floats) = src [rows, cols]^T * scale (src rows lds floats
// apart): 8 x 8 tiles through AVX registers (store_transposed), the edges one by one.
inline void transpose(const float* src, int64_t rows, int64_t cols, int64_t lds, float* dst,
                      int64_t ldd, float scale = 1.0f) {
  const int64_t rows8 = rows - rows % 8, cols8 = cols - cols % 8;
  for (int64_t i = 0; i < rows8; i += 8)
    for (int64_t j = 0; j < cols8; j += 8) {
      v8f tile[8];
      for (int r = 0; r < 8; ++r)
        tile[r] = *reinterpret_cast<const v8f*>(src + (i + r) * lds + j) * scale;
      store_transposed(tile, dst + j * ldd + i, ldd);
    }
  for (int64_t i = 0; i < rows; ++i)  // the edges the tiles leave
    for (int64_t j = i < rows8 ? cols8 : 0; j < cols; ++j)
      dst[j * ldd + i] = src[i * lds + j] * scale;
}

// row[decoded_k(j + t)] for t < 8, j a multiple of 8.
inline v8f gather_decoded(const float* row, int64_t j) {
#if LS_LANES == 16
  const int64_t k = decoded_k(j);  // then k + 2, ..., k + 14: every other one of the pair from
  const float* p = row + (k & ~int64_t{1});  // the even k at or below k
  const v8f a = *reinterpret_cast<const v8f*>(p), b = *reinterpret_cast<const v8f*>(p + 8);
  return (k & 1) ? __builtin_shufflevector(a, b, 1, 3, 5, 7, 9, 11, 13, 15)
                 : __builtin_shufflevector(a, b, 0, 2, 4, 6, 8, 10, 12, 14);
#else
  const v8f a = *reinterpret_cast<const v8f*>(row + j);
  return __builtin_shufflevector(a, a, 0, 2, 4, 6, 1, 3, 5, 7);
#endif
}

// x [M, K] -> xt, columns [j0, j1) of every pass: the pass starting at row m0 lies at
// xt + m0 * K as [K, width] (rows past M are zeros). With kDecoded, position j of each row holds
// k = decoded_k(j). j0 is a multiple of 8; j1 is too, or K.
template <bool kDecoded>
inline void transpose_passes(const float* x, int64_t M, int64_t K, int64_t j0, int64_t j1,
                             float* xt) {
  const int64_t whole = kDecoded ? j1 : std::min(j1, K - K % 8);  // 4-bit K: a multiple of kGroup
  for (int64_t m0 = 0; m0 < M; m0 += kPassRows) {
    const int64_t width = pass_vectors(M, m0) * kLanes;
    float* dst = xt + m0 * K;
    for (int64_t r0 = 0; r0 < width; r0 += 8) {
      const int64_t rows = std::clamp<int64_t>(M - m0 - r0, 0, 8);
      const float* src = x + (m0 + r0) * K;
      for (int64_t j = j0; j < whole; j += 8) {
        v8f block[8];
        for (int r = 0; r < 8; ++r) {
          if (r >= rows) {
            block[r] = v8f{};
          } else if (kDecoded) {
            block[r] = gather_decoded(src + r * K, j);
          } else {
            block[r] = *reinterpret_cast<const v8f*>(src + r * K + j);
          }
        }
        store_transposed(block, dst + j * width + r0, width);
      }
      for (int64_t j = std::max(whole, j0); j < j1; ++j)  // fp32 K past the last multiple of 8
        for (int64_t r = 0; r < 8; ++r) dst[j * width + r0 + r] = r < rows ? src[r * K + j] : 0.0f;
    }
  }
}

// *p in every lane of a V, vf or v8f (one vbroadcastss from memory; `V{} + *p` would add a
// scalar first).
template <class V = vf>
inline V broadcast(const float* p) {
  if constexpr (sizeof(V) == 32) {
    return reinterpret_cast<V>(_mm256_broadcast_ss(p));
  } else {
#if LS_LANES == 16 && defined(__AVX512F__)
    return reinterpret_cast<V>(_mm512_set1_ps(*p));
#else  // 16 lanes without AVX-512: only the test build that checks that logic
    return V{} + *p;
#endif
  }
}

// A V (vf or v8f) from p, 4-byte aligned: a template argument drops the typedefs' alignment.
template <class V>
inline V load_as(const float* p) {
  V v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// acc[n][v] += column(n)[k] * xt[k * MV * kLanes + v * kLanes + lane], for k < depth and NR
// columns (column(n): column n's weight for k = 0) and MV vectors of rows, each a V: vf, or
// v8f (MV = 1), the first 8 lanes of a one-vector pass. Unrolled by kGroup: a whole group is one
// loop body, across which a caller's sums stay in registers.
template <int MV, int NR, class Column, class V>
inline void multiply_columns(Column column, const float* xt, int64_t depth, V (&acc)[NR][MV]) {
  constexpr int64_t ldxt = MV * kLanes;
#pragma GCC unroll 32
  for (int64_t k = 0; k < depth; ++k) {
    V xv[MV];
#pragma GCC unroll 4
    for (int v = 0; v < MV; ++v) xv[v] = load_as<V>(xt + k * ldxt + v * kLanes);
#pragma GCC unroll 16
    for (int n = 0; n < NR; ++n) {
      const V wv = broadcast<V>(column(n) + k);
#pragma GCC unroll 4
      for (int v = 0; v < MV; ++v) acc[n][v] += wv * xv[v];
    }
  }
}
static_assert(kGroup == 32, "multiply_columns unrolls by a group");

// sums[n][rows] += sum over `depth` k of w[n * ldw + k] * xt[k * MV * kLanes + rows], for NR
// columns and MV vectors of rows. ldw is kLdw when that is not 0: with both strides constant, a
// k step moves just two pointers.
template <int MV, int NR, int64_t kLdw>
inline void outer_block(const float* xt, const float* w, int64_t runtime_ldw, int64_t depth,
                        float* sums, int64_t ldsums) {
  const int64_t ldw = kLdw != 0 ? kLdw : runtime_ldw;
  vf acc[NR][MV];
#pragma GCC unroll 16
  for (int n = 0; n < NR; ++n)
#pragma GCC unroll 4
    for (int v = 0; v < MV; ++v)
      acc[n][v] = *reinterpret_cast<const vf*>(sums + n * ldsums + v * kLanes);
  multiply_columns<MV, NR>([&](int n) { return w + n * ldw; }, xt, depth, acc);
#pragma GCC unroll 16
  for (int n = 0; n < NR; ++n)
#pragma GCC unroll 4
    for (int v = 0; v < MV; ++v)
      *reinterpret_cast<vf*>(sums + n * ldsums + v * kLanes) = acc[n][v];
}

// Every column of a tile's chunk (kTileCols weight rows, ldw apart) against one pass of MV
// vectors.
template <int MV, int64_t kLdw>
inline void outer_tile(const float* xt, const float* w, int64_t ldw, int64_t depth, float* sums,
                       int64_t ldsums) {
  constexpr int NR = std::min(kTileCols, kAccRegs / MV);
  static_assert(kTileCols % NR == 0, "a tile's columns split evenly into column blocks");
  for (int n = 0; n < kTileCols; n += NR)
    outer_block<MV, NR, kLdw>(xt, w + n * ldw, ldw, depth, sums + n * ldsums, ldsums);
}

// One chunk of a tile's weights, as the micro-kernels read them: row n at w + n * ld.
struct WeightChunk {
  const float* w;
  int64_t ld;
};

// x [M, K] transposed into passes (transpose_passes) by the threads of one parallel_items call
// together, a range of kDepth k each: transposed by the calling thread alone it cost as much as
// a few tiles, and the other threads then read all of it from that one's cache. kDecoded: in
// decoded order (decoded_k).
template <bool kDecoded>
class SharedTranspose {
 public:
  // `threads`: the team of the parallel_items call, every one of which calls wait_for_all.
  SharedTranspose(const float* x, int64_t M, int64_t K, int64_t threads)
      : x_(x), M_(M), K_(K), ranges_((K + kDepth - 1) / kDepth),
        data_(new float[padded_rows(M) * K]), queue_(ranges_, threads) {}

  // This thread's share of the work, then a wait for the others' (every range taken is being
  // done by a running thread, so the wait ends); the pass that starts at row m0 lies at
  // result + m0 * K as [K, width].
  const float* wait_for_all() {
    queue_.each([&](int64_t r) {
      transpose_passes<kDecoded>(x_, M_, K_, r * kDepth, std::min(K_, (r + 1) * kDepth),
                                 data_.get());
      done_.fetch_add(1, std::memory_order_release);
    });
    for (int spins = 1; done_.load(std::memory_order_acquire) < ranges_; ++spins)
      spins % 1024 ? _mm_pause() : std::this_thread::yield();  // yield to a descheduled peer
    return data_.get();
  }

 private:
  const float* x_;
  const int64_t M_, K_, ranges_;
  std::unique_ptr<float[]> data_;
  WorkQueue queue_;
  std::atomic<int64_t> done_{0};
};

// y [M, N] = x [M, K] @ W^T where `chunk_of(n0, cols, k0, depth, scratch)` gives the
// WeightChunk of weight rows n0.. (kTileCols of them, zeros past `cols`) and k0..k0 + depth,
// written to `scratch` [kTileCols, kDepth] if it is not read in place; its ld is always kLdw
// unless kLdw is 0. kDecoded: the chunks keep k in decoded order (decoded_k), so x is transposed
// in that order too.
template <int64_t kLdw, bool kDecoded, class ChunkOf>
inline void gemm_outer(const float* x, int64_t M, int64_t K, int64_t N, ChunkOf chunk_of,
                       float* y) {
  const int64_t tiles = (N + kTileCols - 1) / kTileCols, ldsums = padded_rows(M);
  SharedTranspose<kDecoded> transposed(x, M, K, team_size(tiles));
  parallel_items(tiles, [&](WorkQueue& queue) {
    const float* xt = transposed.wait_for_all();
    std::unique_ptr<float[]> scratch(new float[kTileCols * kDepth]);
    std::unique_ptr<float[]> sums(new float[kTileCols * ldsums]);
    queue.each([&](int64_t t) {
      const int64_t n0 = t * kTileCols, cols = std::min<int64_t>(kTileCols, N - n0);
      std::fill(sums.get(), sums.get() + kTileCols * ldsums, 0.0f);
      for (int64_t k0 = 0; k0 < K; k0 += kDepth) {
        const int64_t depth = std::min(kDepth, K - k0);
        const WeightChunk chunk = chunk_of(n0, cols, k0, depth, scratch.get());
        for (int64_t m0 = 0; m0 < M; m0 += kPassRows) {
          const int64_t width = pass_vectors(M, m0) * kLanes;
          const float* xp = xt + m0 * K + k0 * width;
          if (width == kLanes)
            outer_tile<1, kLdw>(xp, chunk.w, chunk.ld, depth, sums.get() + m0, ldsums);
          else
            outer_tile<2, kLdw>(xp, chunk.w, chunk.ld, depth, sums.get() + m0, ldsums);
        }
      }
      for (int64_t m = 0; m < M; ++m)
        for (int64_t c = 0; c < cols; ++c) y[m * N + n0 + c] = sums[c * ldsums + m];
    });
  });
}

// Weight rows n0..n0 + cols, k0..k0 + depth of the packed 4-bit weight, decoded into dst
// [kTileCols, kDepth] (rows past `cols` zeroed). The blocksize is 2^blocksize_log2 and divides
// K; k0, depth and blocksize are multiples of kGroup (so a group lies in one block).
//
// Each row's bytes for the next chunk (the same row's next k, else the next tile's row) are
// prefetched: a chunk reads one cache line per row, and the hardware prefetchers do not keep up
// with kTileCols such streams, so weights that come from memory, not cache, would stall.
inline void decode_chunk(const uint8_t* packed, const Scales& scales, const CodeTables& tables,
                         int blocksize_log2, int64_t N, int64_t K, int64_t n0, int64_t cols,
                         int64_t k0, int64_t depth, float* dst) {
  const int64_t blocks_per_row = K >> blocksize_log2;
  // k0 is a block's start, or the chunk lies in one block
  const int64_t block_step = std::min(depth, int64_t{1} << blocksize_log2);
  for (int64_t c = 0; c < cols; ++c) {
    const int64_t next = k0 + depth < K ? (n0 + c) * K + k0 + depth : (n0 + kTileCols + c) * K;
    if (next < N * K) _mm_prefetch(reinterpret_cast<const char*>(packed + next / 2), _MM_HINT_T0);
    const uint8_t* bytes = packed + ((n0 + c) * K + k0) / 2;
    const int64_t row_blocks = (n0 + c) * blocks_per_row;
    float* out = dst + c * kDepth;
    for (int64_t b0 = 0; b0 < depth; b0 += block_step) {  // each block of the chunk
      const vf scale = vf{} + scales(row_blocks + ((k0 + b0) >> blocksize_log2));
      const auto& block_tables = scaled(tables, scale);
      for (int64_t j = b0; j < b0 + block_step; j += kGroup) {
        vf w[kGroupVecs];
        decode_group(bytes + j / 2, block_tables, w);
        for (int v = 0; v < kGroupVecs; ++v)
          *reinterpret_cast<vf*>(out + j + v * kLanes) = kScaledTables ? w[v] : w[v] * scale;
      }
    }
  }
  for (int64_t c = cols; c < kTileCols; ++c)
    std::fill(dst + c * kDepth, dst + c * kDepth + depth, 0.0f);
}

// ---- one pass of rows (at most kPassRows: a decode step): sums in registers for all of K ----
//
// With a single pass of rows nothing reads a chunk of weights twice, so a block of columns keeps
// its sums in registers over the whole of K and takes its weights one group (kGroup k) at a
// time. A 4-bit group is decoded while the previous group's multiply-adds run: a few
// instructions beside many multiply-adds, which out-of-order execution runs side by side,
// instead of a phase of its own per chunk (about a fifth of the kernel's time, `perf annotate`).
// fp32 weights are read in place. A pass of at most 8 rows keeps its sums in 8-lane vectors.

// Taken with 16 lanes (AVX-512, where it was measured: a decode step's 4-bit projections 0.94x
// the time of the chunked path; and the 16-lane test build). AVX2's decoding needs more of its
// 16 registers than the sums leave it.
constexpr bool kOnePass = kLanes == 16;

// One group of NR weight rows, as the one-pass kernel reads it: weight (n, k0 + k) at row[n][k].
template <int NR>
struct GroupView {
  const float* row[NR];
};

// NR weight rows as the one-pass kernel reads them, filled into fp32 a group at a time, one group
// ahead of the one read: `Rows::fill(k0, group)` writes the group from k0, and its work runs
// beside the previous group's multiply-adds. `Rows` calls `start()` once its own members are set.
template <int NR, class Rows>
class GroupsAhead {
 public:
  // The group from k0, for k0 = 0, kGroup, 2 kGroup, ... in turn.
  GroupView<NR> at(int64_t k0) {
    const int64_t group = k0 / kGroup;
    if (k0 + kGroup < K_) rows().fill(k0 + kGroup, groups_[(group + 1) % 2]);
    GroupView<NR> view;
    for (int n = 0; n < NR; ++n) view.row[n] = groups_[group % 2][n];
    return view;
  }

 protected:
  explicit GroupsAhead(int64_t K) : K_(K) {}
  void start() { rows().fill(0, groups_[0]); }

  const int64_t K_;

 private:
  Rows& rows() { return static_cast<Rows&>(*this); }

  alignas(64) float groups_[2][NR][kGroup];  // the group being read, and the next
};

// A block's 4-bit weight rows, decoded. Each row's next cache line is prefetched as a chunk of
// kDepth starts (the next kDepth k of the row, else the same row of the next block): the
// hardware prefetchers do not follow NR interleaved streams.
template <int NR>
class Decoded4bitGroups : public GroupsAhead<NR, Decoded4bitGroups<NR>> {
  using Base = GroupsAhead<NR, Decoded4bitGroups<NR>>;
  friend Base;
  using Base::K_;

 public:
  // Rows n0 .. n0 + NR; rows past N repeat the last one.
  Decoded4bitGroups(const uint8_t* packed, const Scales& scales, const CodeTables& tables,
                    int blocksize_log2, int64_t N, int64_t K, int64_t n0)
      : Base(K), scales_(scales), tables_(tables), blocksize_log2_(blocksize_log2),
        next_rows_(n0 + 2 * NR <= N ? packed + (n0 + NR) * K / 2 : nullptr) {
    for (int n = 0; n < NR; ++n) {
      const int64_t row = std::min(n0 + n, N - 1);
      rows_[n] = packed + row * K / 2;
      first_block_[n] = (row * K) >> blocksize_log2;
    }
    Base::start();
  }

 private:
  void fill(int64_t k0, float (&w)[NR][kGroup]) {
    const bool prefetch = k0 % kDepth == 0;
    const int64_t ahead = k0 + kDepth;
#pragma GCC unroll 16
    for (int n = 0; n < NR; ++n) {
      if (prefetch && ahead < K_)
        _mm_prefetch(reinterpret_cast<const char*>(rows_[n] + ahead / 2), _MM_HINT_T0);
      else if (prefetch && next_rows_ != nullptr)
        _mm_prefetch(reinterpret_cast<const char*>(next_rows_ + n * K_ / 2), _MM_HINT_T0);
      const vf scale = vf{} + scales_(first_block_[n] + (k0 >> blocksize_log2_));
      vf v[kGroupVecs];
      decode_group(rows_[n] + k0 / 2, scaled(tables_, scale), v);
      for (int i = 0; i < kGroupVecs; ++i)
        *reinterpret_cast<vf*>(w[n] + i * kLanes) = kScaledTables ? v[i] : v[i] * scale;
    }
  }

  const Scales& scales_;
  const CodeTables& tables_;
  const int blocksize_log2_;
  const uint8_t* const next_rows_;
  const uint8_t* rows_[NR];
  int64_t first_block_[NR];
};

// A block's fp32 weight rows read in place; each row's lines kPrefetchAhead k ahead (else the
// same row of the next block) are prefetched: one row of the output projection is a 4 KB page,
// where the hardware prefetchers start over.
template <int NR>
class InPlaceGroups {
 public:
  static constexpr int64_t kPrefetchAhead = 4 * kGroup;

  // Rows n0 .. n0 + NR of w [N, K]; rows past N repeat the last one.
  InPlaceGroups(const float* w, int64_t N, int64_t K, int64_t n0)
      : K_(K), next_rows_(n0 + 2 * NR <= N ? w + (n0 + NR) * K : nullptr) {
    for (int n = 0; n < NR; ++n) rows_[n] = w + std::min(n0 + n, N - 1) * K;
  }

  GroupView<NR> at(int64_t k0) {
    const int64_t ahead = k0 + kPrefetchAhead;
    GroupView<NR> view;
#pragma GCC unroll 16
    for (int n = 0; n < NR; ++n) {
      const float* line = ahead < K_                ? rows_[n] + ahead
                          : next_rows_ != nullptr ? next_rows_ + n * K_ + (ahead - K_)
                                                  : nullptr;
      if (line != nullptr)
        for (int64_t j = 0; j < kGroup; j += 64 / sizeof(float))
          _mm_prefetch(reinterpret_cast<const char*>(line + j), _MM_HINT_T0);
      view.row[n] = rows_[n] + k0;
    }
    return view;
  }

 private:
  const int64_t K_;
  const float* const next_rows_;
  const float* rows_[NR];
};

// out[:n] = row[:n] widened to fp32 (float, bf16 or fp16; exactly).
template <class T>
inline void widen_row(const T* row, int64_t n, float* out) {
  int64_t k = 0;
  for (; k + kLanes <= n; k += kLanes) *reinterpret_cast<vf*>(out + k) = load_vf(row + k);
  for (; k < n; ++k) out[k] = to_float(row[k]);
}

// A block's bf16 weight rows (or int8 codes), widened to fp32 exactly: half (a quarter) of the
// bytes of fp32 rows. Each row's line kBf16PrefetchAhead k on (else the same row of the next
// block) is prefetched.
template <int NR, class T = bf16>
class WidenedGroups : public GroupsAhead<NR, WidenedGroups<NR, T>> {
  using Base = GroupsAhead<NR, WidenedGroups<NR, T>>;
  friend Base;
  using Base::K_;

 public:
  // Rows n0 .. n0 + NR of w [N, K]; rows past N repeat the last one.
  WidenedGroups(const T* w, int64_t N, int64_t K, int64_t n0)
      : Base(K), next_rows_(n0 + 2 * NR <= N ? w + (n0 + NR) * K : nullptr) {
    for (int n = 0; n < NR; ++n) rows_[n] = w + std::min(n0 + n, N - 1) * K;
    Base::start();
  }

 private:
  void fill(int64_t k0, float (&w)[NR][kGroup]) {
    const int64_t ahead = k0 + kBf16PrefetchAhead;
    const bool whole = k0 + kGroup <= K_;
#pragma GCC unroll 16
    for (int n = 0; n < NR; ++n) {
      const T* line = ahead < K_                ? rows_[n] + ahead
                      : next_rows_ != nullptr ? next_rows_ + n * K_ + (ahead - K_)
                                              : nullptr;
      if (line != nullptr) _mm_prefetch(reinterpret_cast<const char*>(line), _MM_HINT_T0);
      if (whole)  // a constant trip count: widen_row's loop over a runtime count cost 5-7%
        for (int i = 0; i < kGroupVecs; ++i)
          *reinterpret_cast<vf*>(w[n] + i * kLanes) = load_vf(rows_[n] + k0 + i * kLanes);
      else  // the last k of a row whose K is not a multiple of kGroup
        widen_row(rows_[n] + k0, K_ - k0, w[n]);
    }
  }

  const T* const next_rows_;
  const T* rows_[NR];
};

// y[:, n0 .. n0 + NR) (the columns before N) for the rows of one pass, MV vectors of them (each a
// V: vf, or v8f for a pass of at most 8 rows), from xt [K, MV * kLanes] (transposed, in the
// groups' order of k).
template <int MV, int NR, class V, class Groups>
inline void columns_one_pass(const float* xt, int64_t M, int64_t K, int64_t N, int64_t n0,
                             Groups& groups, float* y) {
  constexpr int kVectorLanes = sizeof(V) / sizeof(float);
  for (int64_t m = 0; m < M; ++m)  // y's lines, to be written at the end
    _mm_prefetch(reinterpret_cast<const char*>(y + m * N + n0), _MM_HINT_ET0);
  V acc[NR][MV] = {};
  int64_t k0 = 0;
  const auto multiply = [&](int64_t depth) {
    const GroupView<NR> w = groups.at(k0);
    multiply_columns<MV, NR>([&](int n) { return w.row[n]; }, xt + k0 * MV * kLanes, depth, acc);
  };
  for (; k0 + kGroup <= K; k0 += kGroup) multiply(kGroup);  // a constant: one unrolled body
  if (k0 < K) multiply(K - k0);  // fp32 weights: K need not be a multiple of kGroup
  alignas(64) float sums[NR][MV * kVectorLanes];
  for (int n = 0; n < NR; ++n)
    for (int v = 0; v < MV; ++v) std::memcpy(sums[n] + v * kVectorLanes, &acc[n][v], sizeof(V));
  const int64_t cols = std::min<int64_t>(NR, N - n0);
  for (int64_t m = 0; m < M; ++m)  // row by row: each row's columns are one run of y
    for (int64_t n = 0; n < cols; ++n) y[m * N + n0 + n] = sums[n][m];
}

// A pass of at most this many rows keeps its sums in vectors of 8 lanes (the first half of its
// transposed rows' 16): the same multiply-adds, in the same order (the same bits), as 16 lanes,
// but where a CPU runs AVX-512 as two 256-bit halves (AMD Zen 4) each costs half; where it has
// whole 512-bit units, as many instructions. The output projection at 5-8 rows on the 2-core
// EPYC (2026-12-04, paired): 32,000 x 1,024 bf16-held 0.68-0.71x the time, fp32 0.93-0.96x;
// Llama 3 8B's 128,256 x 4,096 bf16-held 0.76-0.78x, fp32 0.99x.
constexpr int64_t kHalfVectorRows = kLanes == 16 ? 8 : 0;

// One output of a one-pass call: y [M, N].
struct PassOutput {
  int64_t N;
  float* y;
};

// outputs[i].y = x [M, K] @ W_i^T in blocks of NR columns whose weights `groups_of(i, n0)`
// gives, for M at most kPassRows (MV vectors of rows) or, past it, in passes of kPassRows rows
// (the last of one vector or MV), each block running every pass in turn (its weights from cache
// after the first): several weights that read the same x share one transpose of it and one
// parallel region. kDecoded: the groups keep k in decoded order.
template <int MV, int NR, bool kDecoded, class GroupsOf>
inline void gemm_one_pass(const float* x, int64_t M, int64_t K,
                          std::span<const PassOutput> outputs, GroupsOf groups_of) {
  std::vector<int64_t> first_block{0};  // output i's blocks: first_block[i] .. first_block[i + 1]
  for (const PassOutput& out : outputs)
    first_block.push_back(first_block.back() + (out.N + NR - 1) / NR);
  const int64_t blocks = first_block.back();
  SharedTranspose<kDecoded> transposed(x, M, K, team_size(blocks));
  parallel_items(blocks, [&](WorkQueue& queue) {
    const float* xt = transposed.wait_for_all();
    queue.each([&](int64_t b) {
      size_t i = 0;
      while (b >= first_block[i + 1]) ++i;
      const int64_t n0 = (b - first_block[i]) * NR;
      for (int64_t m0 = 0; m0 < M; m0 += kPassRows) {
        auto groups = groups_of(i, n0);
        const int64_t rows = std::min(kPassRows, M - m0);
        float* y = outputs[i].y + m0 * outputs[i].N;
        if (rows <= kHalfVectorRows)
          columns_one_pass<1, NR, v8f>(xt + m0 * K, rows, K, outputs[i].N, n0, groups, y);
        else if (pass_vectors(M, m0) == 1)
          columns_one_pass<1, NR, vf>(xt + m0 * K, rows, K, outputs[i].N, n0, groups, y);
        else
          columns_one_pass<MV, NR, vf>(xt + m0 * K, rows, K, outputs[i].N, n0, groups, y);
      }
    });
  });
}

// 4-bit columns per block: their sums and 4 registers for the decoding (more spill the sums).
constexpr int decoded_columns(int row_vectors) {
  return std::min(kTileCols, (kAccRegs - 4) / row_vectors);
}

// One 4-bit weight [N, K] as the kernels read it: packed [N * K / 2] uint8; scales: one per
// block of `blocksize` (a power of two from kGroup that divides K); code [16] fp32.
struct Weight4bit {
  const uint8_t* packed;
  Scales scales;
  const float* code;
  int64_t blocksize;
  int64_t N;
};

template <int MV>
inline void gemm_4bit_one_pass(const float* x, int64_t M, int64_t K,
                               std::span<const Weight4bit> weights, std::span<float* const> ys) {
  constexpr int NR = decoded_columns(MV);
  std::vector<CodeTables> tables;
  std::vector<PassOutput> outputs;
  for (size_t i = 0; i < weights.size(); ++i) {
    tables.push_back(code_tables(weights[i].code));
    outputs.push_back({weights[i].N, ys[i]});
  }
  gemm_one_pass<MV, NR, true>(x, M, K, outputs, [&](size_t i, int64_t n0) {
    const Weight4bit& w = weights[i];
    return Decoded4bitGroups<NR>(w.packed, w.scales, tables[i], __builtin_ctzll(w.blocksize),
                                 w.N, K, n0);
  });
}

// ---- 5 to 12 rows with AVX-512: the lanes hold output columns, not rows ----
//
// The one-pass kernel holds rows in its vectors' lanes, so from 7 to 16 rows it runs one vector
// of 16 and 8 rows cost what 16 do. Here a vector holds 16 output columns at one k instead: each
// chunk of k of a block of 32 columns is decoded into an L1 buffer (each lane's 4 bytes gathered
// from its column's row of the packed weight), and every row's x[k] is broadcast against it, so
// the multiply-adds are the rows' own. Each output sums its products over k in the order the
// one-pass kernel does (the groups' decoded order, one chain of multiply-adds): the same bits.
// The 56 projections of a decode step on two threads, paired against the paths before
// (`ab_kernels.py --projections`, 2026-12-01): 6 rows 0.91-0.92x the GEMV's time, 7 rows 0.68x
// the one-pass kernel's, 8 rows 0.68x, 10 rows 0.81x, 12 rows 0.89x; 3, 4 and 5 rows 1.36x,
// 1.19x and 1.01-1.05x the GEMV's, and 16 rows slower than one pass (one-off), so those stay
// where they were. The decoding was about half of its time, by gathers of a dword from each
// column (a 16 x 16 byte transpose instead measured slower still); 16-byte loads of each column
// and a 4 x 4 dword transpose per 128-bit lane (row_dwords) took the 56 projections to 0.87x
// the time at 6 rows, 0.88x at 8, 0.91x at 12 (`ab_kernels.py --projections`, 2026-12-04), and
// a row alone (batch-invariant calls) to 0.70x. On the Intel Xeon with full-width AVX-512
// (2026-12-05), 5 rows took 0.79x the GEMV's time (one call a projection; 0.92x with q/k/v and
// gate/up in group calls; engine decode steps of 5 rows 0.97-0.98x), and 2 to 4 rows 1.30-1.72x
// the GEMV's wide path, so the GEMV keeps 1 to 4. (The AMD EPYC, not measured since: there 5
// rows were 1.01-1.05x on 2026-12-01, before both paths changed.)
#if defined(__AVX512F__)
constexpr int64_t kFewestColumnVectorRows = 5;  // fewer run faster by the GEMV's wide path
constexpr int64_t kMostColumnVectorRows = 12;   // 2 x 12 sums in registers
constexpr int64_t kVectorColumns = 32;          // columns per block: two vectors of 16
constexpr int64_t kColumnDepth = 128;           // k per decoded chunk: 16 KB of weights

// q[d] lane i = the 4 bytes at src + i * ld + 4d (i < 16, d < 4): 16 bytes of each of 16 rows
// as 4 vectors of one dword a row, by 16 loads and a 4 x 4 transpose of dwords in each 128-bit
// lane (lane L of z[j] holds row 4L + j, so each transposed dword lands in its row's lane).
inline void row_dwords(const uint8_t* src, int64_t ld, __m512i (&q)[4]) {
  const auto row = [&](int64_t i) {
    return _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i * ld));
  };
  __m512i z[4];
  for (int j = 0; j < 4; ++j) {
    z[j] = _mm512_castsi128_si512(row(j));
    z[j] = _mm512_inserti32x4(z[j], row(4 + j), 1);
    z[j] = _mm512_inserti32x4(z[j], row(8 + j), 2);
    z[j] = _mm512_inserti32x4(z[j], row(12 + j), 3);
  }
  const __m512i t0 = _mm512_unpacklo_epi32(z[0], z[1]), t1 = _mm512_unpackhi_epi32(z[0], z[1]);
  const __m512i t2 = _mm512_unpacklo_epi32(z[2], z[3]), t3 = _mm512_unpackhi_epi32(z[2], z[3]);
  q[0] = _mm512_unpacklo_epi64(t0, t2);
  q[1] = _mm512_unpackhi_epi64(t0, t2);
  q[2] = _mm512_unpacklo_epi64(t1, t3);
  q[3] = _mm512_unpackhi_epi64(t1, t3);
}

// w[j][c][:] = columns n0 + 16c .. n0 + 16c + 15 at the chunk's j-th k in decoded order, for the
// chunk k0 .. k0 + depth (a multiple of kGroup, within one row). Not inlined: its registers
// would push the caller's sums out of theirs.
__attribute__((noinline)) inline void decode_column_vectors(
    const uint8_t* packed, const Scales& scales, const CodeTables& tables, int blocksize_log2,
    int64_t K, int64_t n0, int64_t k0, int64_t depth, float (*w)[2][16]) {
  const __m512 code = reinterpret_cast<__m512>(tables.values);
  const int64_t blocks_per_row = K >> blocksize_log2;
  const int64_t ahead = k0 + 2 * kColumnDepth;  // this chunk's rows, two chunks on
  for (int c = 0; c < 2; ++c) {
    const int64_t first = n0 + 16 * c;
    if (ahead < K)
      for (int i = 0; i < 16; ++i)
        _mm_prefetch(reinterpret_cast<const char*>(packed + (first + i) * K / 2 + ahead / 2),
                     _MM_HINT_T0);
    __m512 scale = _mm512_setzero_ps();
    for (int64_t g = 0; g < depth; g += kGroup) {
      const int64_t k = k0 + g;
      if (g == 0 || (k & ((int64_t{1} << blocksize_log2) - 1)) == 0) {
        alignas(64) float block_scales[16];
        for (int i = 0; i < 16; ++i)
          block_scales[i] = scales((first + i) * blocks_per_row + (k >> blocksize_log2));
        scale = _mm512_load_ps(block_scales);
      }
      __m512i q[4];  // q[d]: 4 bytes of each column, its k + 8d .. k + 8d + 7
      row_dwords(packed + first * (K / 2) + k / 2, K / 2, q);
      for (int d = 0; d < 4; ++d) {
        for (int b = 0; b < 4; ++b) {
          const int j = 4 * d + b;  // vpermps reads only each index's low 4 bits
          const __m512 even = _mm512_permutexvar_ps(_mm512_srli_epi32(q[d], 8 * b + 4), code);
          const __m512 odd = _mm512_permutexvar_ps(_mm512_srli_epi32(q[d], 8 * b), code);
          _mm512_store_ps(w[g + j][c], _mm512_mul_ps(even, scale));
          _mm512_store_ps(w[g + 16 + j][c], _mm512_mul_ps(odd, scale));
        }
      }
    }
  }
}

// y[:, n0 .. n0 + 32) for the M rows of x [M, K].
template <int M>
inline void column_vector_block(const float* x, int64_t K, const uint8_t* packed,
                                const Scales& scales, const CodeTables& tables,
                                int blocksize_log2, int64_t n0, float* y, int64_t N) {
  __m512 acc[M][2];
  for (int m = 0; m < M; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
  alignas(64) float w[kColumnDepth][2][16];
  for (int64_t k0 = 0; k0 < K; k0 += kColumnDepth) {
    const int64_t depth = std::min(kColumnDepth, K - k0);
    decode_column_vectors(packed, scales, tables, blocksize_log2, K, n0, k0, depth, w);
    for (int64_t g = 0; g < depth; g += kGroup) {
#pragma GCC unroll 32
      for (int j = 0; j < kGroup; ++j) {
        const float* column_x = x + k0 + g + decoded_k(j);
        const __m512 w0 = _mm512_load_ps(w[g + j][0]);
        const __m512 w1 = _mm512_load_ps(w[g + j][1]);
#pragma GCC unroll 12
        for (int m = 0; m < M; ++m) {
          const __m512 xv = _mm512_set1_ps(column_x[m * K]);
          acc[m][0] = _mm512_fmadd_ps(xv, w0, acc[m][0]);
          acc[m][1] = _mm512_fmadd_ps(xv, w1, acc[m][1]);
        }
      }
    }
  }
  for (int m = 0; m < M; ++m) {
    _mm512_storeu_ps(y + m * N + n0, acc[m][0]);
    _mm512_storeu_ps(y + m * N + n0 + 16, acc[m][1]);
  }
}

// Whether the column-vector path takes a weight: whole blocks of columns, and every byte offset
// within an int32 (the gathers' indices).
inline bool takes_column_vectors(const Weight4bit& w, int64_t K) {
  return w.N % kVectorColumns == 0 && w.N * K / 2 <= std::numeric_limits<int32_t>::max();
}

// ys[i] [M, N_i] = x [M, K] @ dequantize(weights[i])^T: every weight's blocks of columns in one
// parallel region.
template <int M>
inline void gemm_4bit_columns(const float* x, int64_t K, std::span<const Weight4bit> weights,
                              std::span<float* const> ys) {
  std::vector<CodeTables> tables;
  std::vector<int64_t> first_block{0};  // weight i's blocks: first_block[i] .. first_block[i + 1]
  for (const Weight4bit& w : weights) {
    tables.push_back(code_tables(w.code));
    first_block.push_back(first_block.back() + w.N / kVectorColumns);
  }
  parallel_items(first_block.back(), [&](WorkQueue& queue) {
    queue.each([&](int64_t b) {
      size_t i = 0;
      while (b >= first_block[i + 1]) ++i;
      const Weight4bit& w = weights[i];
      column_vector_block<M>(x, K, w.packed, w.scales, tables[i], __builtin_ctzll(w.blocksize),
                             (b - first_block[i]) * kVectorColumns, ys[i], w.N);
    });
  });
}

// gemm_4bit_columns<M> for a runtime M from 1 (batch-invariant calls: see gemm_4bit) or
// kFewestColumnVectorRows to kMostColumnVectorRows.
inline void gemm_4bit_columns(const float* x, int64_t M, int64_t K,
                              std::span<const Weight4bit> weights, std::span<float* const> ys) {
  static_assert(kFewestColumnVectorRows == 5 && kMostColumnVectorRows == 12);
  switch (M) {
    case 1: return gemm_4bit_columns<1>(x, K, weights, ys);
    case 2: return gemm_4bit_columns<2>(x, K, weights, ys);
    case 3: return gemm_4bit_columns<3>(x, K, weights, ys);
    case 4: return gemm_4bit_columns<4>(x, K, weights, ys);
    case 5: return gemm_4bit_columns<5>(x, K, weights, ys);
    case 6: return gemm_4bit_columns<6>(x, K, weights, ys);
    case 7: return gemm_4bit_columns<7>(x, K, weights, ys);
    case 8: return gemm_4bit_columns<8>(x, K, weights, ys);
    case 9: return gemm_4bit_columns<9>(x, K, weights, ys);
    case 10: return gemm_4bit_columns<10>(x, K, weights, ys);
    case 11: return gemm_4bit_columns<11>(x, K, weights, ys);
    default: return gemm_4bit_columns<12>(x, K, weights, ys);
  }
}
#endif

// gemm_4bit by the paths that hold rows in vectors' lanes (or, for the GEMV, k; never where
// `invariant`). Up to one pass of rows the weights share one transpose of x and one parallel
// region; otherwise one call each.
inline void gemm_4bit_rows(const float* x, int64_t M, int64_t K,
                           std::span<const Weight4bit> weights, std::span<float* const> ys,
                           bool invariant) {
  if (kOnePass && (M > kGemvRows || invariant) && M <= kPassRows) {
    const auto one_pass = pass_vectors(M, 0) == 1 ? gemm_4bit_one_pass<1> : gemm_4bit_one_pass<2>;
    return one_pass(x, M, K, weights, ys);
  }
  // x in each decoded order the GEMV's weights read it in, made when first needed
  std::unique_ptr<float[]> permuted, permuted_wide;
  const auto gemv_x = [&](int64_t blocksize) -> const float* {
#ifdef LS_GEMV_WIDE
    if (gemv_wide_takes(blocksize, M, K)) {
      if (!permuted_wide) {
        permuted_wide.reset(new float[M * K]);
        permute_like_wide(x, M, K, permuted_wide.get());
      }
      return permuted_wide.get();
    }
#endif
    if (!permuted) {
      permuted.reset(new float[M * K]);
      permute_like_decoded(x, M, K, permuted.get());
    }
    return permuted.get();
  };
  for (size_t i = 0; i < weights.size(); ++i) {
    const Weight4bit& w = weights[i];
    float* y = ys[i];
    if (M <= kGemvRows && !invariant) {
      const float* p = gemv_x(w.blocksize);
      switch (M) {
        case 1: gemv_4bit<1>(p, K, w.packed, w.scales, w.code, w.blocksize, w.N, y); break;
        case 2: gemv_4bit<2>(p, K, w.packed, w.scales, w.code, w.blocksize, w.N, y); break;
        case 3: gemv_4bit<3>(p, K, w.packed, w.scales, w.code, w.blocksize, w.N, y); break;
        case 4: gemv_4bit<4>(p, K, w.packed, w.scales, w.code, w.blocksize, w.N, y); break;
        case 5: gemv_4bit<5>(p, K, w.packed, w.scales, w.code, w.blocksize, w.N, y); break;
        default: gemv_4bit<6>(p, K, w.packed, w.scales, w.code, w.blocksize, w.N, y); break;
      }
      continue;
    }
    const CodeTables tables = code_tables(w.code);
    const int blocksize_log2 = __builtin_ctzll(w.blocksize);
    gemm_outer<kDepth, true>(x, M, K, w.N,
                             [&](int64_t n0, int64_t cols, int64_t k0, int64_t depth,
                                 float* scratch) {
                               decode_chunk(w.packed, w.scales, tables, blocksize_log2, w.N, K,
                                            n0, cols, k0, depth, scratch);
                               return WeightChunk{scratch, kDepth};
                             },
                             y);
  }
}

// ys[i] [M, N_i] = x [M, K] @ dequantize(weights[i])^T, x fp32: each weight by the path its
// rows take (see gemm_4bit for `invariant`).
inline void gemm_4bit_paths(const float* x, int64_t M, int64_t K,
                            std::span<const Weight4bit> weights, std::span<float* const> ys,
                            bool invariant) {
  if (M == 0) return;
#if defined(__AVX512F__)
  if (M >= (invariant ? 1 : kFewestColumnVectorRows) && M <= kMostColumnVectorRows) {
    std::vector<Weight4bit> columns, rows;
    std::vector<float*> column_ys, row_ys;
    for (size_t i = 0; i < weights.size(); ++i) {
      const bool taken = takes_column_vectors(weights[i], K);
      (taken ? columns : rows).push_back(weights[i]);
      (taken ? column_ys : row_ys).push_back(ys[i]);
    }
    if (!columns.empty()) gemm_4bit_columns(x, M, K, columns, column_ys);
    if (!rows.empty()) gemm_4bit_rows(x, M, K, rows, row_ys, invariant);
    return;
  }
#endif
  gemm_4bit_rows(x, M, K, weights, ys, invariant);
}

// Rows the paths that hold rows in lanes round their work up to: a vector of 16 with AVX-512
// (each vector of rows its own multiply-adds), a pass of two vectors of 8 with AVX2 (a pass of
// one vector runs as many: its blocks take twice the columns).
constexpr int64_t kRowGrain = 16;
// Past a whole number of grains, this many rows or fewer run as a call of their own after the
// grains (by the GEMV or the column-vector path): one more read of the weights, often still in
// cache, instead of a grain's work for a few rows. A decode step's 56 projections on two threads
// (`ab_kernels.py --projections`, 2026-12-02), after / before: with AVX-512, 17 rows 0.75x,
// 22 rows 0.98x, 34 rows 0.81x, 38 rows 0.91x, 66 rows 0.95x (one-offs: 26 rows 1.06x, 44 rows
// 1.00x); with AVX2, 17 rows 0.91x and 33 rows 0.92x, but 18 rows 1.01x and 34 rows 1.07x.
constexpr int64_t kSplitTailRows = kLanes == 16 ? 8 : 1;

// ys[i] [M, N_i] = x [M, K] @ dequantize(weights[i])^T, x fp32. Each weight takes the path its
// own call would (its output has the same bits alone or beside others); up to one pass of rows
// the weights of one path share one transpose of x and one parallel region. A few rows past a
// whole number of grains (kSplitTailRows) get the bits a call of their own gives them.
//
// `invariant` (batch invariance): every row's outputs get the bits they would in a call of any
// other rows. The column vectors, the one pass and the outer products sum each output as one
// chain of multiply-adds over k in decoded order, whatever the rows beside it, so such calls
// take only those, from one row on; the GEMV (partial sums per block, then scaled) and the
// split tails are left out. A few rows cost more (the column vectors against the GEMV, the
// default model's projections, 2026-12-04: 2.2-3.0x its time at one row, 1.4-1.7x at four;
// benchmarks/RESULTS.md, "Batch invariance"), and a row's bits no longer depend on its batch.
inline void gemm_4bit(const float* x, int64_t M, int64_t K, std::span<const Weight4bit> weights,
                      std::span<float* const> ys, bool invariant) {
  const int64_t tail = M % kRowGrain;
  if (invariant || M < kRowGrain || tail == 0 || tail > kSplitTailRows)
    return gemm_4bit_paths(x, M, K, weights, ys, invariant);
  const int64_t head = M - tail;
  gemm_4bit_paths(x, head, K, weights, ys, false);
  std::vector<float*> tail_ys;
  for (size_t i = 0; i < weights.size(); ++i) tail_ys.push_back(ys[i] + head * weights[i].N);
  gemm_4bit_paths(x + head * K, tail, K, weights, tail_ys, false);
}

// gemm_dense in one pass of MV vectors of rows, or passes of up to kPassRows rows (the first MV
// vectors): sums in registers over all of k.
template <int MV, class W>
inline void gemm_dense_one_pass(const float* x, int64_t M, int64_t K, const W* w, int64_t N,
                                float* y) {
  constexpr int NR = std::min(kTileCols, kAccRegs / MV);
  const PassOutput out{N, y};
  gemm_one_pass<MV, NR, false>(x, M, K, {&out, 1}, [&](size_t, int64_t n0) {
    if constexpr (sizeof(W) < 4)
      return WidenedGroups<NR, W>(w, N, K, n0);
    else
      return InPlaceGroups<NR>(w, N, K, n0);
  });
}

// Rows up to which streaming each weight row once, whole, against every row (dot products) beats
// the outer products. One bound for fp32 and bf16 weights keeps a bf16-held weight's bits those
// of its fp32 values; it is bf16's, the weights of a bf16 checkpoint's output projection. The
// 32,000 x 1,024 output projection on two threads (2026-12-02), dot products / outer products:
// bf16 weights with AVX-512 1 row 3.3 / 4.4 ms, 4 rows 3.8 / 4.0, 5 rows 4.3 / 4.0, 6 rows 4.8 /
// 4.2; with AVX2 4 rows 3.9 / 4.3, 5 rows 4.7 / 4.3. fp32 weights with AVX-512 4 rows 5.8 / 4.8
// (fp32 would move to the outer products from 2 rows), 16 rows 9.4 / 4.9 (one vector of rows),
// 24 rows 12.2 / 6.8 (two); with AVX2 4 rows 5.5 / 5.4, 5 rows 6.1 / 5.4, 12 rows 8.0 / 6.2.
constexpr int64_t kDenseDotRows = 4;
// int8 codes (a quarter of fp32's bytes, widened as they are loaded) take the dot products up to
// this many rows, all in one block, each code widened once for every row. The default model's
// 32,000 x 1,024 output projection in int8 on two threads (a one-off script, medians of 25, two
// runs, the Xeon with AMX, 2026-12-06), against the one pass: AVX-512 1.74-1.84 ms against
// 4.29-4.45 at 5 rows, 2.44-2.70 against 4.43-4.52 at 8, 3.00-3.26 against 3.94-4.09 at 10,
// 3.82-3.99 against 3.93-4.14 at 12; the AVX2 build there 2.66-2.89 against 3.46-3.48 at 5,
// 3.16-3.32 against 3.48-3.49 at 6, 3.50-3.64 against 3.44-3.49 at 7, 3.95-4.09 against 3.50-3.52
// at 8 (its 16 registers hold a row's sums of one column).
constexpr int64_t kCodesDotRows = kLanes == 16 ? 10 : 6;
// Rows up to which the one-pass kernel (AVX-512) beats the tile path, in two passes past
// kPassRows: each block of columns reads its weights from memory once, for the first pass, and
// from cache for the second. The same weight (2026-12-02), tile path / two passes: fp32 33 rows
// 11.6-12.4 / 10.2-10.6 ms, 48 rows 12.3-12.4 / 10.5-10.7, 56 rows 14.1 / 12.5-12.9, 64 rows
// 14.4-15.0 / 13.0-15.4; bf16 33 rows 10.8-11.0 / 10.7-11.4, 48 rows 11.4 / 10.7-11.4, 64 rows
// 14.4-14.9 / 12.7-14.8; past 64 rows the passes lose (fp32 128 rows 27.9-28.0 / 28.9-30.1).
// (The 4-bit kernel, whose weights are an eighth of fp32's bytes, gained nothing from passes.)
constexpr int64_t kDenseOnePassRows = 2 * kPassRows;

#if defined(__AVX512F__)
// ---- 1 to 8 rows of a dense weight: output columns in the lanes ----
//
// The dot products hold k in their lanes (partial sums, reduced at the end), and the one pass
// holds up to 8 rows in a vector of 8. Here a vector holds 16 output columns instead: a 16 x 16
// block of the weight (16 columns' next 16 k) is loaded, transposed in registers, and each row's
// x[k] broadcast against it, so every output is the chain of multiply-adds over k in order that
// the one pass and the outer products give it: the same bits, so batch-invariant calls take it
// too. The default model's 32,000 x 1,024 output projection (a one-off script, medians of 15,
// 2026-12-04), an fp32 weight: 3.3 ms against the dot products' 3.8 at one row, 4.3 against
// 5.5 at 4, 4.5-5.6 against the one pass's 7.2-7.3 at 5 to 8; a weight held in bf16 (widened as
// it is loaded): 1.06-1.15x the time of its paths at 1-3 and 6-8 rows. Only batch-invariant
// calls take it (where the one pass put one row in a vector of 8: 7.2 ms at one row): a weight
// held in bf16 must keep the bits of its fp32 values (`narrow.py`), so both take one path.
constexpr int64_t kDenseColumnRows = 8;

// v[i][j] -> v[j][i] for the 16 x 16 floats of v: pairs, then quads within 128-bit lanes, then
// the lanes.
inline void transpose_16x16(__m512 (&v)[16]) {
  __m512 t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(v[i], v[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(v[i], v[i + 1]);
  }
  __m512 u[16];  // u[i + j] lane L: rows i .. i + 3 at k = 4L + j
  for (int i = 0; i < 16; i += 4) {
    const auto pd = [](__m512 a) { return _mm512_castps_pd(a); };
    u[i] = _mm512_castpd_ps(_mm512_unpacklo_pd(pd(t[i]), pd(t[i + 2])));
    u[i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(pd(t[i]), pd(t[i + 2])));
    u[i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(pd(t[i + 1]), pd(t[i + 3])));
    u[i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(pd(t[i + 1]), pd(t[i + 3])));
  }
  for (int j = 0; j < 4; ++j) {
    const __m512 low = _mm512_shuffle_f32x4(u[j], u[4 + j], 0x44);
    const __m512 high = _mm512_shuffle_f32x4(u[j], u[4 + j], 0xEE);
    const __m512 low2 = _mm512_shuffle_f32x4(u[8 + j], u[12 + j], 0x44);
    const __m512 high2 = _mm512_shuffle_f32x4(u[8 + j], u[12 + j], 0xEE);
    v[j] = _mm512_shuffle_f32x4(low, low2, 0x88);
    v[4 + j] = _mm512_shuffle_f32x4(low, low2, 0xDD);
    v[8 + j] = _mm512_shuffle_f32x4(high, high2, 0x88);
    v[12 + j] = _mm512_shuffle_f32x4(high, high2, 0xDD);
  }
}

// y[:M, n0 .. n0 + 16) = x [M, K] @ w[n0 .. n0 + 16)^T, each sum one chain over k in order.
template <int M, class W>
inline void dense_column_block(const float* x, int64_t K, const W* w, int64_t n0, float* y,
                               int64_t N) {
  __m512 acc[M];
  for (int m = 0; m < M; ++m) acc[m] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    __m512 v[16];
    for (int c = 0; c < 16; ++c) v[c] = reinterpret_cast<__m512>(load_vf(w + (n0 + c) * K + k));
    transpose_16x16(v);  // v[j]: the 16 columns at k + j
    for (int j = 0; j < 16; ++j)
      for (int m = 0; m < M; ++m)
        acc[m] = _mm512_fmadd_ps(_mm512_set1_ps(x[m * K + k + j]), v[j], acc[m]);
  }
  for (; k < K; ++k) {
    alignas(64) float column_k[16];
    for (int c = 0; c < 16; ++c) column_k[c] = to_float(w[(n0 + c) * K + k]);
    const __m512 v = _mm512_load_ps(column_k);
    for (int m = 0; m < M; ++m) acc[m] = _mm512_fmadd_ps(_mm512_set1_ps(x[m * K + k]), v, acc[m]);
  }
  for (int m = 0; m < M; ++m) _mm512_storeu_ps(y + m * N + n0, acc[m]);
}

// gemm_dense's batch-invariant calls of 1 to kDenseColumnRows rows: blocks of 16 columns in
// parallel; the last N % 16 columns one chain each.
template <int M, class W>
inline void gemm_dense_columns(const float* x, int64_t K, const W* w, int64_t N, float* y) {
  const int64_t blocks = N / 16;
  parallel_items(blocks + (N % 16 != 0), [&](WorkQueue& queue) {
    queue.each([&](int64_t b) {
      if (b < blocks) return dense_column_block<M>(x, K, w, b * 16, y, N);
      for (int64_t n = blocks * 16; n < N; ++n)
        for (int m = 0; m < M; ++m) {
          float sum = 0.0f;
          for (int64_t k = 0; k < K; ++k) sum = std::fma(x[m * K + k], to_float(w[n * K + k]), sum);
          y[m * N + n] = sum;
        }
    });
  });
}
#endif

// dot_tile for kDenseDotRows + 1 to kCodesDotRows rows of int8 codes w [cols, K]: every row in
// one block (the registers hold M x 2 sums with AVX-512, M x 1 with AVX2's 16).
inline void dot_codes_tile(const float* x, int64_t M, int64_t K, const int8_t* w, int64_t cols,
                           float* y, int64_t ldy) {
  constexpr int NR = kLanes == 16 ? 2 : 1;
  static_assert(kDenseDotRows == 4 && kCodesDotRows <= 10);
  switch (M) {
    case 5: return dot_rows<5, NR>(x, K, w, K, K, cols, y, ldy);
    case 6: return dot_rows<6, NR>(x, K, w, K, K, cols, y, ldy);
    case 7: return dot_rows<7, NR>(x, K, w, K, K, cols, y, ldy);
    case 8: return dot_rows<8, NR>(x, K, w, K, K, cols, y, ldy);
    case 9: return dot_rows<9, NR>(x, K, w, K, K, cols, y, ldy);
    default: return dot_rows<10, NR>(x, K, w, K, K, cols, y, ldy);
  }
}

// x [M, K] fp32 contiguous; w [N, K] fp32, bf16 or int8 (widened exactly as it is read: the
// same sums as fp32 weights of those values), contiguous; y [M, N] fp32 contiguous. `invariant`: as
// gemm_4bit's, the dot products (k in lanes) left out: 1 to kDenseColumnRows rows by the
// columns in the lanes (AVX-512).
template <class W>
inline void gemm_dense(const float* x, int64_t M, int64_t K, const W* w, int64_t N, float* y,
                       bool invariant) {
  if (M == 0) return;
#if defined(__AVX512F__)
  if (invariant && M <= kDenseColumnRows) {
    static_assert(kDenseColumnRows == 8);
    switch (M) {
      case 1: return gemm_dense_columns<1>(x, K, w, N, y);
      case 2: return gemm_dense_columns<2>(x, K, w, N, y);
      case 3: return gemm_dense_columns<3>(x, K, w, N, y);
      case 4: return gemm_dense_columns<4>(x, K, w, N, y);
      case 5: return gemm_dense_columns<5>(x, K, w, N, y);
      case 6: return gemm_dense_columns<6>(x, K, w, N, y);
      case 7: return gemm_dense_columns<7>(x, K, w, N, y);
      default: return gemm_dense_columns<8>(x, K, w, N, y);
    }
  }
#endif
  const int64_t tiles = (N + kTileCols - 1) / kTileCols;
  const int64_t dot_rows_most = sizeof(W) == 1 ? kCodesDotRows : kDenseDotRows;
  if (M <= dot_rows_most && !invariant) {
    parallel_items(tiles, [&](WorkQueue& queue) {
      queue.each([&](int64_t t) {
        const int64_t n0 = t * kTileCols, cols = std::min<int64_t>(kTileCols, N - n0);
        if constexpr (sizeof(W) == 1)
          if (M > kDenseDotRows) return dot_codes_tile(x, M, K, w + n0 * K, cols, y + n0, N);
        dot_tile(x, M, K, w + n0 * K, K, cols, y + n0, N);
      });
    });
    return;
  }
  if (kOnePass && M <= kDenseOnePassRows)
    return pass_vectors(M, 0) == 1 ? gemm_dense_one_pass<1>(x, M, K, w, N, y)
                                   : gemm_dense_one_pass<2>(x, M, K, w, N, y);
  // fp32 rows are read in place (copying each chunk costs more than the constant stride
  // saves), except the last tile's, padded with zeros. bf16 rows are widened into the chunk,
  // each row's next chunk (else the next tile's row) prefetched, as decode_chunk does.
  gemm_outer<0, false>(x, M, K, N,
                [&](int64_t n0, int64_t cols, int64_t k0, int64_t depth, float* scratch) {
                  if constexpr (sizeof(W) == 4)
                    if (cols == kTileCols) return WeightChunk{w + n0 * K + k0, K};
                  for (int64_t c = 0; c < kTileCols; ++c) {
                    float* out = scratch + c * kDepth;
                    const W* row = w + (n0 + c) * K + k0;
                    if (c >= cols) {
                      std::fill(out, out + depth, 0.0f);
                    } else if constexpr (sizeof(W) == 4) {
                      std::copy_n(row, depth, out);
                    } else {
                      const W* next = k0 + kDepth < K ? row + kDepth
                                      : n0 + kTileCols + c < N ? w + (n0 + kTileCols + c) * K
                                                              : nullptr;
                      if (next != nullptr)
                        for (int64_t k = 0; k < kDepth; k += 64 / sizeof(W))
                          _mm_prefetch(reinterpret_cast<const char*>(next + k), _MM_HINT_T0);
                      widen_row(row, depth, out);
                    }
                  }
                  return WeightChunk{scratch, kDepth};
                },
                y);
}

}  // namespace LS_NAMESPACE
