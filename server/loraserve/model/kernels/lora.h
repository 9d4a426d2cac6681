// The batched LoRA delta over segments of tokens that share a slot:
// y[t] += (x[t] @ A[s].T[:, :rank]) * scale[s] @ B[s][:rank] for every token t of a segment on
// slot s. The slots hold float32, bfloat16 or float16 (widened as they are loaded); x and y
// are float32, or both 16-bit (a 16-bit compute dtype: each chunk's rows are widened, its
// delta summed in float32 apart from y and added to y in one rounding); without scales, every
// slot has its adapter's scaling folded into B. Float32 slots may hold bf16 or fp16 rows instead,
// in the first half of their bytes (an adapter stored in 16 bits: the same values, half the
// bytes read). Where the CPU has AMX tiles, chunks of bf16 rows on bf16 slots run in them
// instead (`amx.h`: x @ A^T is rounded to bf16 before it meets B).
//
// A segment is split into chunks of a few tokens so that a batch of one adapter (a long
// prefill) still uses every thread, while each chunk reads its slot's A and B once.

namespace LS_NAMESPACE {

constexpr int64_t kLoraChunkTokens = 16;  // at most a tile's rows (kLoraTileTokens, amx.h)

// What a float32 slot holds (narrow [S], one byte a slot): float32 rows, or an adapter's bf16 or
// fp16 rows in the first half of the slot's bytes. The same codes as `NarrowSlots` (lora.py).
constexpr uint8_t kWideRows = 0, kNarrowBf16 = 1, kNarrowFp16 = 2;

#ifdef LS_AMX
// Chunks of at least this many tokens on bf16 rows and slots run in AMX tiles (`amx.h`), where
// the CPU allows them, in is a multiple of 32 and the rank at most kLoraTileMaxRank. A chunk in
// tiles pairs its slot's whole B whatever its tokens, so short ones stay with the widened rows
// (192 chunks of rank 16, 1,024 x 2,816, two threads: 1 token 0.82-0.84 ms in tiles against
// 0.52-0.54, 4 tokens 1.00-1.05 against 0.76, 8 tokens 1.22-1.34 against 1.35-1.43, 16 tokens
// 1.84-2.08 against 2.66-2.71; benchmarks/RESULTS.md, 2026-12-01).
constexpr int64_t kLoraTileMinTokens = 8;

inline bool takes_lora_tiles(int64_t tokens, int64_t in, int64_t rank) {
  return tokens >= kLoraTileMinTokens && in % kAmxStepK == 0 && rank <= kLoraTileMaxRank &&
         amx_usable();
}
static_assert(kLoraChunkTokens <= kLoraTileTokens);
#endif

// Ranks per shrink block (dot products of 4 rows of x with this many rows of A at once): as
// many sums as the GEMMs' micro-kernel keeps in registers, 6 with AVX-512's 32 (a rank-16
// slot in three blocks, not five of 3 and one of 1: a prefill's deltas 0.90x the time), 3 with
// AVX2's 16.
constexpr int kShrinkColumns = kAccRegs / kRowBlock;
constexpr int kExpandVectors = 3;  // output vectors per expand block (4 rows x 3: 12 registers)
// One row (a decode step's token) on 16-bit slots: blocks of 2 vectors. A decode step's 56
// deltas on bf16 slots took 0.94x the time of 3 (6: 1.07x, 1: 0.96x; fp32 slots gain nothing;
// `ab_kernels.py --lora-decode --compute-dtype bf16`, 2026-12-01).
constexpr int kExpandVectorsOneRow16bit = 2;

// y[m, c:c + NV * kLanes] += h[m, :rank] @ b[:rank, c:c + NV * kLanes] for m < MR. A float y
// carries the sums; a 16-bit Y gets them summed in fp32 from zero, then added in one rounding
// (what torch's y.add_(delta) gives for a separate fp32 delta, without writing one).
template <int MR, int NV, class T, class Y>
inline void expand_block(const float* h, int64_t ldh, int64_t rank, const T* b, int64_t ldb,
                         Y* y, int64_t ldy) {
  constexpr bool kFloatY = std::is_same_v<Y, float>;
  vf acc[MR][NV];
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < NV; ++v)
      acc[m][v] = kFloatY ? load_vf(y + m * ldy + v * kLanes) : vf{};
  for (int64_t r = 0; r < rank; ++r) {
    vf bv[NV];
    if constexpr (sizeof(T) == 2)  // see kBf16PrefetchAhead
      _mm_prefetch(reinterpret_cast<const char*>(b + r * ldb + kBf16PrefetchAhead), _MM_HINT_T0);
    if constexpr (std::is_same_v<T, bf16> && NV % 2 == 0)
      for (int v = 0; v < NV; v += 2) load_vf_pair(b + r * ldb + v * kLanes, bv[v], bv[v + 1]);
    else
      for (int v = 0; v < NV; ++v) bv[v] = load_vf(b + r * ldb + v * kLanes);
    for (int m = 0; m < MR; ++m) {
      const vf hm = broadcast(h + m * ldh + r);
      for (int v = 0; v < NV; ++v) acc[m][v] += hm * bv[v];
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < NV; ++v) {
      Y* out = y + m * ldy + v * kLanes;
      store_rounded(out, kFloatY ? acc[m][v] : load_vf(out) + acc[m][v]);
    }
}

template <int MR, class T, class Y>
inline void expand_rows(const float* h, int64_t ldh, int64_t rank, const T* b, int64_t out,
                        Y* y, int64_t ldy) {
  constexpr int NV = sizeof(T) == 2 && MR == 1 ? kExpandVectorsOneRow16bit : kExpandVectors;
  constexpr int64_t wide = NV * kLanes;
  int64_t c = 0;
  for (; c + wide <= out; c += wide)
    expand_block<MR, NV>(h, ldh, rank, b + c, out, y + c, ldy);
  for (; c + kLanes <= out; c += kLanes) expand_block<MR, 1>(h, ldh, rank, b + c, out, y + c, ldy);
  for (; c < out; ++c)
    for (int m = 0; m < MR; ++m) {
      Y& target = y[m * ldy + c];
      float sum = std::is_same_v<Y, float> ? to_float(target) : 0.0f;
      for (int64_t r = 0; r < rank; ++r)
        sum = __builtin_fmaf(h[m * ldh + r], to_float(b[r * out + c]), sum);  // as dot_block's tail
      round_to(&target, std::is_same_v<Y, float> ? sum : to_float(target) + sum);
    }
}

// y[:n] += h[:n, :rank] @ b[:rank, :out]; h [n, ldh], b [rank, out], y [n, out] (as expand_block).
template <class T, class Y>
inline void expand(const float* h, int64_t ldh, int64_t n, int64_t rank, const T* b,
                   int64_t out, Y* y) {
  int64_t m = 0;
  for (; m + kRowBlock <= n; m += kRowBlock)
    expand_rows<kRowBlock>(h + m * ldh, ldh, rank, b, out, y + m * out, out);
  switch (n - m) {
    case 3: expand_rows<3>(h + m * ldh, ldh, rank, b, out, y + m * out, out); break;
    case 2: expand_rows<2>(h + m * ldh, ldh, rank, b, out, y + m * out, out); break;
    case 1: expand_rows<1>(h + m * ldh, ldh, rank, b, out, y + m * out, out); break;
    default: break;
  }
}

// dst [cols, rows] = src [rows, cols]^T * scale: B as PEFT stores it ([out, r]) to the layout
// the expand reads ([r, out]), at load time.
inline void transpose_scaled(const float* src, int64_t rows, int64_t cols, float scale,
                             float* dst) {
  transpose(src, rows, cols, cols, dst, rows, scale);
}

// Whether src [n] holds a NaN or an infinity (a float whose exponent bits are all set): one
// pass, no floating-point compare, so no compiler flag or rounding mode can change the answer.
inline bool any_nonfinite(const float* src, int64_t n) {
  constexpr int32_t kExponent = 0x7f800000;
  const int32_t* bits = reinterpret_cast<const int32_t*>(src);
  vi seen = {};
  int64_t i = 0;
  for (; i + 4 * kLanes <= n; i += 4 * kLanes)
    for (int u = 0; u < 4; ++u) {
      const vi v = *reinterpret_cast<const vi*>(bits + i + u * kLanes) & kExponent;
      seen |= v == kExponent;
    }
  for (; i + kLanes <= n; i += kLanes)
    seen |= (*reinterpret_cast<const vi*>(bits + i) & kExponent) == kExponent;
  bool found = false;
  for (int l = 0; l < kLanes; ++l) found |= seen[l] != 0;
  for (; i < n; ++i) found |= (bits[i] & kExponent) == kExponent;
  return found;
}

// ---- 16-bit pairs kept as stored (bf16 or fp16) ----------------------------------------
// For either format a value's magnitude is its bits & 0x7fff: finite magnitudes order as
// those integers do, and an infinity or a NaN is at or past the exponent's all-ones pattern
// (0x7f80 in bf16, 0x7c00 in fp16). So one integer maximum per tensor says whether it is
// finite and how large it gets, with no floating-point compare.

// The largest magnitude's bits among src [n].
inline uint16_t max_magnitude_bits(const uint16_t* src, int64_t n) {
  uint16_t most = 0;
  for (int64_t i = 0; i < n; ++i) most = std::max<uint16_t>(most, src[i] & 0x7fff);
  return most;
}

// dst [cols, rows] = src [rows, cols]^T, 16-bit elements, in blocks of 64 rows (read a few
// cache lines at a time, written along dst's rows); returns max_magnitude_bits of src.
inline uint16_t transpose_16(const uint16_t* src, int64_t rows, int64_t cols, uint16_t* dst) {
  constexpr int64_t kBlock = 64;
  uint16_t most = 0;
  for (int64_t i0 = 0; i0 < rows; i0 += kBlock) {
    const int64_t i1 = std::min(rows, i0 + kBlock);
    for (int64_t j = 0; j < cols; ++j)
      for (int64_t i = i0; i < i1; ++i) {
        const uint16_t v = src[i * cols + j];
        dst[j * rows + i] = v;
        most = std::max<uint16_t>(most, v & 0x7fff);
      }
  }
  return most;
}

// One chunk of n tokens on one slot, its rows xs already float: y[:n] += (xs[:n] @ a[:rank]^T)
// * scale @ b[:rank]; a [rank, in] and b [rank, out] rows in T; shrunk: n * rank floats.
template <class T, class Y>
inline void lora_chunk(const float* xs, int64_t n, int64_t in, const T* a, const T* b,
                       int64_t rank, float scale, int64_t out, float* shrunk, Y* y) {
  dot_tile<kShrinkColumns>(xs, n, in, a, in, rank, shrunk, rank);  // [n, rank]
  if (scale != 1.0f)
    for (int64_t i = 0; i < n * rank; ++i) shrunk[i] *= scale;
  expand(shrunk, rank, n, rank, b, out, y);
}

// x [N, in]; y [N, out] (updated; X: float, bf16 or fp16, as x); lora_a [S, R, in]; lora_b
// [S, R, out] (T: float, bf16 or fp16); scales [S] or null; narrow [S] or null: which float
// slots hold their adapter in 16 bits (kNarrowBf16 or kNarrowFp16; kWideRows: none), A [R, in]
// and B [R, out] in the first half of each of their slot's bytes (an adapter stored in bf16 or
// fp16, served exactly at half the bytes); segments: starts, ends, slots, ranks [num_segments]
// int64. `invariant` (batch invariance): never in AMX tiles, which round x @ A^T to bf16 for
// chunks of some lengths only, so that a token's delta does not depend on how many tokens
// share its chunk.
template <class T, class X>
inline void lora_delta(const X* x, X* y, int64_t in, int64_t out, const T* lora_a,
                       const T* lora_b, const float* scales, const uint8_t* narrow, int64_t R,
                       const int64_t* starts, const int64_t* ends, const int64_t* slots,
                       const int64_t* ranks, int64_t num_segments, bool invariant) {
  constexpr bool kWidened = !std::is_same_v<X, float>;
  std::vector<int64_t> chunk_segment, chunk_start;
  for (int64_t s = 0; s < num_segments; ++s)
    for (int64_t t = starts[s]; t < ends[s]; t += kLoraChunkTokens) {
      chunk_segment.push_back(s);
      chunk_start.push_back(t);
    }
  parallel_items(int64_t(chunk_segment.size()), [&](WorkQueue& queue) {
    std::vector<float> shrunk(kLoraChunkTokens * R);
    std::vector<float> rows(kWidened ? kLoraChunkTokens * in : 0);  // a 16-bit chunk's, widened
#ifdef LS_AMX
    LoraTiles tiles;
#endif
    queue.each([&](int64_t c) {
      const int64_t s = chunk_segment[c], t0 = chunk_start[c];
      const int64_t n = std::min(kLoraChunkTokens, ends[s] - t0);
      const int64_t rank = ranks[s];
      const T* a = lora_a + slots[s] * R * in;
      const T* b = lora_b + slots[s] * R * out;
#ifdef LS_AMX
      if constexpr (std::is_same_v<X, bf16> && std::is_same_v<T, bf16>) {
        if (!invariant && takes_lora_tiles(n, in, rank)) {
          const float scale = scales == nullptr ? 1.0f : scales[slots[s]];
          lora_chunk_amx(x + t0 * in, n, in, a, b, rank, scale, y + t0 * out, out, tiles);
          return;
        }
      }
#endif
      const float* xs;
      if constexpr (kWidened) {
        widen_row(x + t0 * in, n * in, rows.data());  // n rows of in
        xs = rows.data();
      } else {
        xs = x + t0 * in;
      }
      const float scale = scales == nullptr ? 1.0f : scales[slots[s]];
      if constexpr (std::is_same_v<T, float>) {
        const uint8_t held = narrow == nullptr ? kWideRows : narrow[slots[s]];
        if (held == kNarrowBf16)
          return lora_chunk(xs, n, in, reinterpret_cast<const bf16*>(a),
                            reinterpret_cast<const bf16*>(b), rank, scale, out, shrunk.data(),
                            y + t0 * out);
        if (held == kNarrowFp16)
          return lora_chunk(xs, n, in, reinterpret_cast<const fp16*>(a),
                            reinterpret_cast<const fp16*>(b), rank, scale, out, shrunk.data(),
                            y + t0 * out);
      }
      lora_chunk(xs, n, in, a, b, rank, scale, out, shrunk.data(), y + t0 * out);
    });
  });
}

}  // namespace LS_NAMESPACE
