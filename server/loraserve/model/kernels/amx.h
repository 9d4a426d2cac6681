// bf16 rows against a 4-bit weight in AMX tiles (Intel's Advanced Matrix Extensions), for bf16
// compute on CPUs that have them: y[M, N] = bf16(x[M, K] @ W[N, K]^T + bias), W dequantized to
// bf16 the way bitsandbytes' dequantize to bf16 rounds it (code[q] * absmax in fp32, rounded to
// nearest even), products summed in fp32.
//
// A tile multiply (TDPBF16PS) takes a [16, 32] bf16 tile of weights, a [16 pairs of k, 16 rows]
// tile of x whose k come in pairs, and adds their products to a [16 columns, 16 rows] fp32 tile
// of sums; it does in one instruction what 512 fp32 multiply-adds do, so the work left is
// decoding the weight. Each work item is a block of 32 output columns: a chunk of k at a time
// is decoded, 32 k (16 packed bytes) of a column per vector, straight into the two weight tiles'
// row layout (a packed byte holds k and k + 1 of one column, exactly a tile row's pair), and
// multiplied against every pass of 32 rows of x. x is rearranged once per call into the pairs
// the x tiles read. Sums leave the tiles once per block, transposed into y's rows.
//
// Without AMX, on a CPU with AVX512-BF16 (AMD Zen 4 and 5), the same blocks, chunks and layouts
// multiply by that extension's pair dot products instead (`pairs_block`, below), twice the
// multiply-adds of an fp32 FMA per instruction; up to 6 rows, with k in the lanes instead of
// rows (`gemv_bf16`): each column's weights decoded into registers and used at once.
//
// Compiled into the AVX-512 build only, for the CPU features AMX implies (`#pragma GCC target`
// below), and used only where `amx_usable()` says this CPU and kernel allow the tiles, or, for
// the pair dot products, where `bf16_pairs_usable()` finds AVX512-BF16 (and, for both,
// AVX512-VBMI, which the decoding takes).

#if LS_LANES == 16 && defined(__AVX512F__)
#define LS_AMX 1

#include <cpuid.h>
#include <cstdlib>
#include <strings.h>
#include <sys/syscall.h>
#include <unistd.h>

namespace LS_NAMESPACE {

// Whether this CPU has AVX512-VBMI, whose byte permute the 4-bit weights' decoding to bf16
// takes (`decode_bf16`): every CPU with AMX, and AMD Zen 4 and 5; not Intel's Cooper Lake.
inline bool has_vbmi() {
  unsigned a, b, c, d;
  return __get_cpuid_count(7, 0, &a, &b, &c, &d) && ((c >> 1) & 1);
}

// Whether the environment turns the tiles off (LORASERVE_AMX=off, 0, false or no): the bf16 ops
// then take AVX512-BF16's pair dot products, as on a CPU without AMX, so that an AMX machine can
// run, test and time those paths too.
inline bool amx_turned_off() {
  const char* value = std::getenv("LORASERVE_AMX");
  if (value == nullptr) return false;
  for (const char* off : {"off", "0", "false", "no"})
    if (strcasecmp(value, off) == 0) return true;
  return false;
}

// Whether this CPU has AMX-BF16 tiles, AVX512-BF16 and AVX512-VBMI, Linux lets this process use
// the tiles (asked for once: their state is too large to be saved for every process by
// default), and the environment does not turn them off.
inline bool amx_usable() {
  static const bool usable = [] {
    if (amx_turned_off()) return false;
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    const bool tiles = (d >> 24) & 1, bf16_tiles = (d >> 22) & 1;
    if (!__get_cpuid_count(7, 1, &a, &b, &c, &d)) return false;
    const bool avx512_bf16 = (a >> 5) & 1;
    constexpr long kRequestPermission = 0x1023;  // ARCH_REQ_XCOMP_PERM
    constexpr long kTileData = 18;               // XFEATURE_XTILEDATA
    return tiles && bf16_tiles && avx512_bf16 && has_vbmi() &&
           syscall(SYS_arch_prctl, kRequestPermission, kTileData) == 0;
  }();
  return usable;
}

#pragma GCC push_options
#pragma GCC target("amx-tile,amx-bf16,avx512bf16,avx512bw,avx512vl,avx512vbmi")

constexpr int64_t kAmxStepK = 32;    // k per tile multiply: 16 pairs (a shift of 5)
constexpr int64_t kAmxColumns = 32;  // output columns per work item: two weight tiles
constexpr int64_t kAmxPassRows = 32;  // rows of x per pass: two x tiles
constexpr int64_t kAmxChunkSteps = 8;  // steps decoded before they are multiplied (16 KB in L1)
constexpr int64_t kTileElements = 16 * 32;  // bf16 in a full tile (1 KB)
constexpr int64_t kAmxMaxPasses = 8;
constexpr int64_t kAmxMaxRows = kAmxMaxPasses * kAmxPassRows;  // rows of x a call takes

// Tiles: sums of (column tile c, row tile r) in tile 2c + r; weights in 4 and 5; x in 6 and 7.
// Every tile is 16 rows of 64 bytes.
struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// The tiles configured for this thread while it lives, released after (a thread that leaves
// them configured has their 8 KB saved at every context switch).
class TileSession {
 public:
  TileSession() {
    TileConfig config;
    for (int t = 0; t < 8; ++t) {
      config.colsb[t] = 64;
      config.rows[t] = 16;
    }
    // Not _tile_loadconfig: GCC's declares only the first 8 bytes read, and drops the stores of
    // the rest as dead.
    asm volatile("ldtilecfg %0" : : "m"(config));
  }
  ~TileSession() { _tile_release(); }
  TileSession(const TileSession&) = delete;
  TileSession& operator=(const TileSession&) = delete;
};

// The 16 code values times a block's scale, rounded to bf16, in both halves of a vector's 32
// words (so that a word index's bit 4 does not matter).
inline __m512i scaled_bf16_table(__m512 code, float scale) {
  const __m256bh table = _mm512_cvtneps_pbh(_mm512_mul_ps(code, _mm512_set1_ps(scale)));
  return _mm512_broadcast_i64x4(reinterpret_cast<__m256i>(table));
}

// 16 packed bytes (32 k of one column) as 32 bf16 in k order: a byte's high nibble is the even
// k, its low nibble the odd one. vpermb puts byte j in the low byte of words 2j and 2j + 1 (the
// high bytes zero), the even words shift down by 4 (the high nibble), and vpermw looks the words
// up: an odd word's bits 4-7 (the high nibble) fall outside the low 4 bits, and bit 4 picks the
// table's other half, which holds the same values.
inline __m512i decode_bf16(const uint8_t* bytes, __m512i table) {
  const __m512i spread = _mm512_set_epi32(
      0x000F000F, 0x000E000E, 0x000D000D, 0x000C000C, 0x000B000B, 0x000A000A, 0x00090009,
      0x00080008, 0x00070007, 0x00060006, 0x00050005, 0x00040004, 0x00030003, 0x00020002,
      0x00010001, 0x00000000);
  const __m512i q = _mm512_maskz_permutexvar_epi8(
      0x5555555555555555ull, spread,
      _mm512_castsi128_si512(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes))));
  const __m512i index = _mm512_srlv_epi16(q, _mm512_set1_epi32(4));
  return _mm512_permutexvar_epi16(index, table);
}

// dst[p * 16 + r] = src[r * ld + p] for 8 rows r and 8 pairs p: the first `rows` of the rows
// from src (ld pairs apart), the rest zero; the 32-bit pairs move as floats, bit for bit.
inline void transpose_pairs(const uint32_t* src, int64_t ld, int64_t rows, uint32_t* dst) {
  v8f block[8];
  for (int r = 0; r < 8; ++r)
    block[r] = r < rows ? *reinterpret_cast<const v8f*>(src + r * ld) : v8f{};
  store_transposed(block, reinterpret_cast<float*>(dst), 16);
}

// x [M, K] bf16 (as uint32 pairs of k) into the x tiles' layout: for pass p and row tile r,
// [K / 2 pairs][16 rows] of pairs, rows past M zero. K is a multiple of kAmxStepK.
inline std::vector<uint32_t> pack_rows(const uint32_t* x, int64_t M, int64_t K) {
  const int64_t pairs = K / 2;
  const int64_t tiles = (M + kAmxPassRows - 1) / kAmxPassRows * 2;
  std::vector<uint32_t> packed(tiles * pairs * 16);
  for (int64_t t = 0; t < tiles; ++t)
    for (int64_t j0 = 0; j0 < 16; j0 += 8)
      for (int64_t k0 = 0; k0 < pairs; k0 += 8) {
        const int64_t m = t * 16 + j0;
        transpose_pairs(x + m * pairs + k0, pairs, M - m,
                        packed.data() + (t * pairs + k0) * 16 + j0);
      }
  return packed;
}

// A whole chunk (kAmxChunkSteps steps from s0, a multiple of them) of one column whose bytes
// start at `row`, into `out` (its rows of the chunk's weight tiles), kStepsPerBlock steps to a
// scale from `block` on: the loops have constant trip counts, unrolled, each scale read as the
// next. (The loop below, which finds each block's end, decoded 0.65-0.77x as many weights a
// second as this on the Xeon with AMX: one core, a 2,816 x 1,024 weight in L2; RESULTS.md,
// 2026-12-05.)
template <bool kNested, int kStepsPerBlock>
inline void decode_whole_chunk(const Weight4bit& w, __m512 code, const uint8_t* row,
                               int64_t block, int64_t s0, uint16_t* out) {
#pragma GCC unroll 8
  for (int b = 0; b < kAmxChunkSteps / kStepsPerBlock; ++b) {
    const float scale = kNested ? w.scales(block + b) : w.scales.absmax[block + b];
    const __m512i table = scaled_bf16_table(code, scale);
#pragma GCC unroll 8
    for (int j = 0; j < kStepsPerBlock; ++j) {
      const int64_t s = b * kStepsPerBlock + j;
      _mm512_storeu_si512(out + s * 2 * kTileElements,
                          decode_bf16(row + (s0 + s) * kAmxStepK / 2, table));
    }
  }
}

// Decodes steps [s0, s0 + steps) of columns n0 .. n0 + 31 of `w` into `tiles` (per step, the
// two weight tiles' rows); columns past N are zero. kNested: whether w's scales are double-
// quantized (else each is one load, which the multiply broadcasts from memory itself).
template <bool kNested>
inline void decode_steps(const Weight4bit& w, __m512 code, int64_t K, int64_t n0, int64_t s0,
                         int64_t steps, uint16_t* tiles) {
  const int block_shift = __builtin_ctzll(w.blocksize);
  // Steps to a scale in a whole chunk: its k start at a multiple of 256, so a block of 256 k or
  // more holds all of it.
  const int64_t whole_steps_per_block =
      steps == kAmxChunkSteps ? std::min(w.blocksize / kAmxStepK, kAmxChunkSteps) : 0;
  for (int64_t c = 0; c < kAmxColumns; ++c) {
    uint16_t* out = tiles + (c / 16) * kTileElements + (c % 16) * 32;
    const int64_t n = n0 + c;
    if (n >= w.N) {
      for (int64_t s = 0; s < steps; ++s)
        _mm512_storeu_si512(out + s * 2 * kTileElements, _mm512_setzero_si512());
      continue;
    }
    const uint8_t* row = w.packed + n * K / 2;
    // this column's bytes of the next chunk (two lines), read while this chunk is multiplied;
    // after the last chunk, those of the next block's first (a thread takes runs of blocks)
    const int64_t next = (s0 + steps) * kAmxStepK / 2;
    const uint8_t* ahead = next < K / 2              ? row + next
                           : n + kAmxColumns < w.N ? row + kAmxColumns * K / 2
                                                   : nullptr;
    if (ahead != nullptr) {
      _mm_prefetch(reinterpret_cast<const char*>(ahead), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(ahead + 64), _MM_HINT_T0);
    }
    const int64_t first_block = (n * K + s0 * kAmxStepK) >> block_shift;
    switch (whole_steps_per_block) {
      case 1: decode_whole_chunk<kNested, 1>(w, code, row, first_block, s0, out); continue;
      case 2: decode_whole_chunk<kNested, 2>(w, code, row, first_block, s0, out); continue;
      case 4: decode_whole_chunk<kNested, 4>(w, code, row, first_block, s0, out); continue;
      case 8: decode_whole_chunk<kNested, 8>(w, code, row, first_block, s0, out); continue;
      default: break;
    }
    for (int64_t s = 0; s < steps;) {  // one quantization block (or what the chunk has of it)
      const int64_t k = (s0 + s) * kAmxStepK;
      const int64_t block = (n * K + k) >> block_shift;  // blocksize: a power of two
      const int64_t end =
          std::min(steps, s + ((w.blocksize - (k & (w.blocksize - 1))) >> 5));  // 32 k a step
      const float scale = kNested ? w.scales(block) : w.scales.absmax[block];
      const __m512i table = scaled_bf16_table(code, scale);
      for (; s < end; ++s)
        _mm512_storeu_si512(out + s * 2 * kTileElements,
                            decode_bf16(row + (s0 + s) * kAmxStepK / 2, table));
    }
  }
}

// Where a chunk's weight tiles are: tile (step s, column tile c) starts at base + s * step +
// c * tile (bf16 elements), its 16 rows row_bytes apart.
struct StagedTiles {
  const uint16_t* base;
  int64_t step, tile, row_bytes;
};

// The chunk layout decode_steps and DenseBf16's tail copy write: per step, two tiles of 64-byte
// rows.
inline StagedTiles in_buffer(const uint16_t* buffer) {
  return {buffer, 2 * kTileElements, kTileElements, 64};
}

// A 4-bit weight, decoded into the chunk buffer.
struct Decoded4bit {
  const Weight4bit& w;
  __m512 code;
  int64_t K;

  int64_t columns() const { return w.N; }
  const float* scales() const { return nullptr; }
  StagedTiles stage(int64_t n0, int64_t s0, int64_t steps, uint16_t* buffer) const {
    if (w.scales.absmax != nullptr)
      decode_steps<false>(w, code, K, n0, s0, steps, buffer);
    else
      decode_steps<true>(w, code, K, n0, s0, steps, buffer);
    return in_buffer(buffer);
  }
};

// A bf16 weight [N, K] (a dense projection, the output projection): its rows are the weight
// tiles' rows as they are, read in place; a last block of fewer than 32 columns is copied
// beside zeros.
struct DenseBf16 {
  const uint16_t* weight;
  int64_t N, K;

  int64_t columns() const { return N; }
  const float* scales() const { return nullptr; }
  StagedTiles stage(int64_t n0, int64_t s0, int64_t steps, uint16_t* buffer) const {
    if (n0 + kAmxColumns <= N)
      return {weight + n0 * K + s0 * kAmxStepK, kAmxStepK, 16 * K, 2 * K};
    for (int64_t c = 0; c < kAmxColumns; ++c) {
      uint16_t* out = buffer + (c / 16) * kTileElements + (c % 16) * 32;
      const int64_t n = n0 + c;
      for (int64_t s = 0; s < steps; ++s)
        _mm512_storeu_si512(out + s * 2 * kTileElements,
                            n < N ? _mm512_loadu_si512(weight + n * K + (s0 + s) * kAmxStepK)
                                  : _mm512_setzero_si512());
    }
    return in_buffer(buffer);
  }
};

// An int8 weight [N, K] of codes and one scale an output (the output projection in 8 bits,
// `int8_output.py`): 32 codes of a column widened to bf16 a step, exactly (|code| <= 127 fits
// bf16's 8 significant bits), into the chunk buffer; the sums are scaled as they leave.
struct Int8Codes {
  const int8_t* codes;
  const float* row_scales;
  int64_t N, K;

  int64_t columns() const { return N; }
  const float* scales() const { return row_scales; }
  StagedTiles stage(int64_t n0, int64_t s0, int64_t steps, uint16_t* buffer) const {
    for (int64_t c = 0; c < kAmxColumns; ++c) {
      uint16_t* out = buffer + (c / 16) * kTileElements + (c % 16) * 32;
      const int64_t n = n0 + c;
      for (int64_t s = 0; s < steps; ++s) {
        __m512i words = _mm512_setzero_si512();
        if (n < N) {
          const __m256i bytes = _mm256_loadu_si256(
              reinterpret_cast<const __m256i*>(codes + n * K + (s0 + s) * kAmxStepK));
          const __m128i first = _mm256_castsi256_si128(bytes);
          const __m128i second = _mm256_extracti128_si256(bytes, 1);
          const __m512 low = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(first));
          const __m512 high = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(second));
          words = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(high, low));
        }
        _mm512_store_si512(out + s * 2 * kTileElements, words);
      }
    }
    return in_buffer(buffer);
  }
};

// A block's sums leave for y: sums tile (c, r) of pass p, at sums + (p * 4 + 2c + r) * 256, is
// [16 columns][16 rows] fp32; each is transposed into y's rows (columns n0 + 16c .., rows
// 32p + 16r ..), scaled by `scales` (one an output, or null: none), the bias added, rounded to
// bf16. With fold > 1 (one pass, one row tile of at most 16 / fold rows: see pairs_block) row
// j's sums are the tile's rows fold * j .. + fold - 1.
inline void store_block(const float* sums, int64_t passes, int64_t M, int64_t N, int64_t n0,
                        const float* bias, const float* scales, uint16_t* y, int fold = 1) {
  const int64_t columns = std::min(kAmxColumns, N - n0);
  for (int64_t p = 0; p < passes; ++p)
    for (int t = 0; t < 4; ++t) {
      const int c = t / 2, r = t % 2;
      const int64_t first = n0 + c * 16, width = std::min<int64_t>(16, columns - c * 16);
      const int64_t m0 = p * kAmxPassRows + r * 16;
      if (width <= 0 || m0 >= M) continue;
      alignas(64) float rows[16 * 16];
      const float* tile = sums + (p * 4 + t) * 256;
      for (int bi = 0; bi < 2; ++bi)
        for (int bj = 0; bj < 2; ++bj) {
          v8f block[8];
          for (int i = 0; i < 8; ++i)
            block[i] = *reinterpret_cast<const v8f*>(tile + (bi * 8 + i) * 16 + bj * 8);
          store_transposed(block, rows + bj * 8 * 16 + bi * 8, 16);
        }
      const __mmask16 mask = static_cast<__mmask16>((1u << width) - 1);
      const __m512 b =
          bias == nullptr ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(mask, bias + first);
      const __m512 scale =
          scales == nullptr ? _mm512_set1_ps(1.0f) : _mm512_maskz_loadu_ps(mask, scales + first);
      for (int j = 0; j * fold < 16 && m0 + j < M; ++j) {
        __m512 sum = scales == nullptr ? b : _mm512_setzero_ps();
        for (int h = 0; h < fold; ++h)
          sum = _mm512_add_ps(sum, _mm512_load_ps(rows + (j * fold + h) * 16));
        if (scales != nullptr) sum = _mm512_add_ps(_mm512_mul_ps(sum, scale), b);
        const __m256bh out = _mm512_cvtneps_pbh(sum);
        _mm256_mask_storeu_epi16(y + (m0 + j) * N + first, mask, reinterpret_cast<__m256i>(out));
      }
    }
}

// One block of 32 output columns from n0 of `w`, every row of x, in tiles: y[m, n0 + c] for
// c < 32.
template <class Source>
inline void amx_block(const Source& w, const uint32_t* xp, int64_t M, int64_t K, int64_t n0,
                      const float* bias, uint16_t* y) {
  const int64_t pairs = K / 2, steps = K / kAmxStepK;
  const int64_t passes = (M + kAmxPassRows - 1) / kAmxPassRows;
  alignas(64) uint16_t buffer[kAmxChunkSteps * 2 * kTileElements];
  alignas(64) float sums[kAmxMaxPasses * 4 * 256];  // per pass, the four sum tiles
  const bool spill = passes > 1;  // one pass keeps its sums in the tiles throughout
  if (!spill) {
    _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
  }
  for (int64_t s0 = 0; s0 < steps; s0 += kAmxChunkSteps) {
    const int64_t chunk = std::min(kAmxChunkSteps, steps - s0);
    const StagedTiles tiles = w.stage(n0, s0, chunk, buffer);
    for (int64_t p = 0; p < passes; ++p) {
      float* pass_sums = sums + p * 4 * 256;
      if (spill && s0 == 0) {
        _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
      } else if (spill) {
        _tile_loadd(0, pass_sums, 64); _tile_loadd(1, pass_sums + 256, 64);
        _tile_loadd(2, pass_sums + 512, 64); _tile_loadd(3, pass_sums + 768, 64);
      }
      const uint32_t* x0 = xp + (2 * p * pairs + s0 * 16) * 16;
      const uint32_t* x1 = x0 + pairs * 16;
      for (int64_t s = 0; s < chunk; ++s) {
        const uint16_t* a = tiles.base + s * tiles.step;
        _tile_loadd(4, a, tiles.row_bytes);
        _tile_loadd(5, a + tiles.tile, tiles.row_bytes);
        _tile_loadd(6, x0 + s * 256, 64);
        _tile_loadd(7, x1 + s * 256, 64);
        _tile_dpbf16ps(0, 4, 6); _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6); _tile_dpbf16ps(3, 5, 7);
      }
      if (spill) {
        _tile_stored(0, pass_sums, 64); _tile_stored(1, pass_sums + 256, 64);
        _tile_stored(2, pass_sums + 512, 64); _tile_stored(3, pass_sums + 768, 64);
      }
    }
  }
  if (!spill) {
    _tile_stored(0, sums, 64); _tile_stored(1, sums + 256, 64);
    _tile_stored(2, sums + 512, 64); _tile_stored(3, sums + 768, 64);
  }
  store_block(sums, passes, M, w.columns(), n0, bias, w.scales(), y);
}

// ---- Without tiles: AVX512-BF16's pair dot products -------------------------------------
//
// The same blocks, chunks and layouts on a CPU with AVX512-BF16 but no AMX (AMD Zen 4 and 5):
// VDPBF16PS adds to each of 16 fp32 lanes the two products of a lane's pair of bf16, so with a
// pass's rows in the lanes (the x tiles' layout: for each pair of k, 16 rows' pairs) and one
// column's pair of weights broadcast, one instruction does 32 multiply-adds, twice what an fp32
// FMA does. Each column keeps its rows' sums in registers over a chunk, in the sum tiles' layout
// between chunks; the block's sums leave by store_block as the tiles' do.

// Whether this CPU has AVX512-BF16 and AVX512-VBMI (as AVX-512 needs no permission from the
// OS, nothing else is asked). Cooper Lake, with AVX512-BF16 but no VBMI, runs bf16 compute as a
// CPU without AVX512-BF16 does.
inline bool bf16_pairs_usable() {
  static const bool usable = [] {
    unsigned a, b, c, d;
    return __get_cpuid_count(7, 1, &a, &b, &c, &d) && ((a >> 5) & 1) && has_vbmi();
  }();
  return usable;
}

// kRowTiles vectors of 16 rows (from x0, the next pairs * 16 on) against 16 / kRowTiles columns
// from c0 of a chunk's staged weights, adding to the sum tiles of one pass. first: the chunk
// is the block's first (the sums start at zero).
template <int kRowTiles>
inline void pairs_columns(const StagedTiles& w, int64_t chunk, int64_t c0, const uint32_t* x0,
                          int64_t pairs, bool first, float* pass_sums) {
  constexpr int kColumns = 16 / kRowTiles;
  const int64_t column_words = w.row_bytes / 4;  // a column's pairs: 32-bit words apart
  float* tile = pass_sums + (c0 / 16) * 2 * 256 + (c0 % 16) * 16;  // row tile r: + r * 256
  __m512 acc[kColumns][kRowTiles];
  for (int j = 0; j < kColumns; ++j)
    for (int r = 0; r < kRowTiles; ++r)
      acc[j][r] = first ? _mm512_setzero_ps() : _mm512_load_ps(tile + r * 256 + j * 16);
  for (int64_t s = 0; s < chunk; ++s) {
    const uint32_t* weights = reinterpret_cast<const uint32_t*>(
                                  w.base + s * w.step + (c0 / 16) * w.tile) +
                              (c0 % 16) * column_words;
    const uint32_t* x = x0 + s * 256;
    for (int q = 0; q < 16; ++q) {
      __m512bh rows[kRowTiles];
      for (int r = 0; r < kRowTiles; ++r)
        rows[r] = reinterpret_cast<__m512bh>(_mm512_loadu_si512(x + r * pairs * 16 + q * 16));
      for (int j = 0; j < kColumns; ++j) {
        const __m512bh pair =
            reinterpret_cast<__m512bh>(_mm512_set1_epi32(weights[j * column_words + q]));
        for (int r = 0; r < kRowTiles; ++r) acc[j][r] = _mm512_dpbf16_ps(acc[j][r], pair, rows[r]);
      }
    }
  }
  for (int j = 0; j < kColumns; ++j)
    for (int r = 0; r < kRowTiles; ++r) _mm512_store_ps(tile + r * 256 + j * 16, acc[j][r]);
}

// Up to 8 rows fill half a vector's lanes or less, so they are folded: with fold F (2 for 5 to
// 8 rows, 4 for up to 4), lane F * i + h holds row i's pair of k F * g + h, and one broadcast of
// a column's F consecutive pairs meets all F of them, so a step takes 16 / F instructions instead
// of 16; the F lanes of a row are summed as the block's sums leave (store_block).
inline int pairs_fold(int64_t M) { return M <= 4 ? 4 : M <= 8 ? 2 : 1; }

// x [M, K] bf16 (as uint32 pairs of k), M at most 16 / fold, in the folded lanes: for each group
// g of `fold` pairs, 16 words, word fold * i + h = x[i][fold * g + h] (zero past M).
inline std::vector<uint32_t> pack_folded(const uint32_t* x, int64_t M, int64_t K, int fold) {
  const int64_t pairs = K / 2;
  std::vector<uint32_t> packed(pairs / fold * 16);
  for (int64_t i = 0; i < M; ++i)
    for (int64_t g = 0; g < pairs / fold; ++g)
      for (int h = 0; h < fold; ++h) packed[g * 16 + i * fold + h] = x[i * pairs + g * fold + h];
  return packed;
}

// pairs_columns for folded rows (one vector of lanes, 16 columns from c0): each column's kFold
// consecutive pairs broadcast against the lanes of a group.
template <int kFold>
inline void folded_columns(const StagedTiles& w, int64_t chunk, int64_t c0, const uint32_t* x0,
                           bool first, float* sums) {
  constexpr int kGroups = 16 / kFold;  // groups of pairs in a step of 32 k
  const int64_t column_words = w.row_bytes / 4;
  float* tile = sums + (c0 / 16) * 2 * 256;
  __m512 acc[16];
  for (int j = 0; j < 16; ++j)
    acc[j] = first ? _mm512_setzero_ps() : _mm512_load_ps(tile + j * 16);
  for (int64_t s = 0; s < chunk; ++s) {
    const uint32_t* weights =
        reinterpret_cast<const uint32_t*>(w.base + s * w.step + (c0 / 16) * w.tile);
    const uint32_t* x = x0 + s * kGroups * 16;
    for (int g = 0; g < kGroups; ++g) {
      const __m512bh lanes = reinterpret_cast<__m512bh>(_mm512_loadu_si512(x + g * 16));
      for (int j = 0; j < 16; ++j) {
        const uint32_t* pairs = weights + j * column_words + g * kFold;
        __m512i broadcast;
        if constexpr (kFold == 2) {
          int64_t two;
          std::memcpy(&two, pairs, sizeof two);
          broadcast = _mm512_set1_epi64(two);
        } else {
          broadcast =
              _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(pairs)));
        }
        acc[j] = _mm512_dpbf16_ps(acc[j], reinterpret_cast<__m512bh>(broadcast), lanes);
      }
    }
  }
  for (int j = 0; j < 16; ++j) _mm512_store_ps(tile + j * 16, acc[j]);
}

// amx_block by pair dot products: one block of 32 output columns from n0 of `w`, every row; xp
// as pack_rows packs x, or, with fold > 1, as pack_folded does.
template <class Source>
inline void pairs_block(const Source& w, const uint32_t* xp, int64_t M, int64_t K, int64_t n0,
                        const float* bias, uint16_t* y, int fold) {
  const int64_t pairs = K / 2, steps = K / kAmxStepK;
  const int64_t passes = (M + kAmxPassRows - 1) / kAmxPassRows;
  alignas(64) uint16_t buffer[kAmxChunkSteps * 2 * kTileElements];
  alignas(64) float sums[kAmxMaxPasses * 4 * 256];
  for (int64_t s0 = 0; s0 < steps; s0 += kAmxChunkSteps) {
    const int64_t chunk = std::min(kAmxChunkSteps, steps - s0);
    const StagedTiles tiles = w.stage(n0, s0, chunk, buffer);
    if (fold > 1) {  // one pass, one vector of lanes: steps of 16 words
      for (int64_t c0 = 0; c0 < kAmxColumns; c0 += 16) {
        if (fold == 2)
          folded_columns<2>(tiles, chunk, c0, xp + s0 * 16 * 8, s0 == 0, sums);
        else
          folded_columns<4>(tiles, chunk, c0, xp + s0 * 16 * 4, s0 == 0, sums);
      }
      continue;
    }
    for (int64_t p = 0; p < passes; ++p) {
      const uint32_t* x0 = xp + (2 * p * pairs + s0 * 16) * 16;
      float* pass_sums = sums + p * 4 * 256;
      if (M - p * kAmxPassRows > 16) {
        for (int64_t c0 = 0; c0 < kAmxColumns; c0 += 8)
          pairs_columns<2>(tiles, chunk, c0, x0, pairs, s0 == 0, pass_sums);
      } else {  // a pass of at most 16 rows: its second row tile is all zeros
        for (int64_t c0 = 0; c0 < kAmxColumns; c0 += 16)
          pairs_columns<1>(tiles, chunk, c0, x0, pairs, s0 == 0, pass_sums);
      }
    }
  }
  store_block(sums, passes, M, w.columns(), n0, bias, w.scales(), y, fold);
}

// ---- Batch-invariant calls of 1 to 8 rows without tiles: columns in the lanes -------------
//
// The pair kernel holds rows in its lanes, so one row costs what 16 do, and the paths for few
// rows (folded rows, k in the lanes) split a row's sums. Here each step's staged pairs (16
// columns' 16 pairs) are transposed in registers so that a vector holds 16 columns' pair q, and
// each row's pair q of x is broadcast against it: per output the same products in the same
// chain of VDPBF16PS as the pair kernel's (its two operands swapped, which the instruction's
// products do not see), the sums rounded with the bias as store_block rounds them: the same
// bits.
constexpr int64_t kPairsColumnRows = 8;

// y[:M, n0 .. n0 + 32) = bf16(x [M, K] @ w[n0 .. n0 + 32)^T + bias); x as bf16 pairs, row-major.
template <int M, class Source>
inline void pairs_columns_block(const Source& w, const uint32_t* x, int64_t K, int64_t n0,
                                const float* bias, uint16_t* y) {
  const int64_t pairs = K / 2, steps = K / kAmxStepK;
  alignas(64) uint16_t buffer[kAmxChunkSteps * 2 * kTileElements];
  __m512 acc[2][M];
  for (int c = 0; c < 2; ++c)
    for (int m = 0; m < M; ++m) acc[c][m] = _mm512_setzero_ps();
  for (int64_t s0 = 0; s0 < steps; s0 += kAmxChunkSteps) {
    const int64_t chunk = std::min(kAmxChunkSteps, steps - s0);
    const StagedTiles tiles = w.stage(n0, s0, chunk, buffer);
    const int64_t column_words = tiles.row_bytes / 4;  // a column's pairs: 32-bit words apart
    for (int c = 0; c < 2; ++c)
      for (int64_t s = 0; s < chunk; ++s) {
        const uint32_t* weights =
            reinterpret_cast<const uint32_t*>(tiles.base + s * tiles.step + c * tiles.tile);
        __m512 v[16];
        for (int j = 0; j < 16; ++j)
          v[j] = _mm512_castsi512_ps(_mm512_loadu_si512(weights + j * column_words));
        transpose_16x16(v);  // v[q]: the 16 columns' pair q
        const uint32_t* xs = x + (s0 + s) * 16;
        for (int q = 0; q < 16; ++q)
          for (int m = 0; m < M; ++m)
            acc[c][m] = _mm512_dpbf16_ps(acc[c][m], reinterpret_cast<__m512bh>(v[q]),
                                         reinterpret_cast<__m512bh>(
                                             _mm512_set1_epi32(xs[m * pairs + q])));
      }
  }
  const int64_t N = w.columns();
  for (int c = 0; c < 2; ++c) {
    const int64_t first = n0 + c * 16, width = std::min<int64_t>(16, N - first);
    if (width <= 0) continue;
    const __mmask16 mask = static_cast<__mmask16>((1u << width) - 1);
    const __m512 b =
        bias == nullptr ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(mask, bias + first);
    for (int m = 0; m < M; ++m) {
      const __m256bh out = _mm512_cvtneps_pbh(_mm512_add_ps(b, acc[c][m]));
      _mm256_mask_storeu_epi16(y + m * N + first, mask, reinterpret_cast<__m256i>(out));
    }
  }
}

// pairs_columns_block<M> for a runtime M from 1 to kPairsColumnRows.
template <class Source>
inline void pairs_columns_rows(const Source& w, const uint32_t* x, int64_t M, int64_t K,
                               int64_t n0, const float* bias, uint16_t* y) {
  static_assert(kPairsColumnRows == 8);
  switch (M) {
    case 1: return pairs_columns_block<1>(w, x, K, n0, bias, y);
    case 2: return pairs_columns_block<2>(w, x, K, n0, bias, y);
    case 3: return pairs_columns_block<3>(w, x, K, n0, bias, y);
    case 4: return pairs_columns_block<4>(w, x, K, n0, bias, y);
    case 5: return pairs_columns_block<5>(w, x, K, n0, bias, y);
    case 6: return pairs_columns_block<6>(w, x, K, n0, bias, y);
    case 7: return pairs_columns_block<7>(w, x, K, n0, bias, y);
    default: return pairs_columns_block<8>(w, x, K, n0, bias, y);
  }
}

// ---- One to six rows without tiles: k in the lanes ----------------------------------------
//
// A few rows leave most of the pair kernel's lanes idle however they are folded, and its chunk
// buffer costs a store and a load of every decoded weight. Here a column's weights are decoded
// into registers and used at once, as the fp32 GEMV does (gemm.h, gemv_cols_4bit): 32 packed
// bytes (64 k) are widened to words and looked up twice in the block's table (its 16 code
// values times its scale, rounded to bf16 as in the pair kernel), giving the high nibbles'
// weights (the even k) and the low nibbles' (the odd k) in two vectors. x is rearranged once
// per call into the same order (per 64 k: its 32 even k, then its 32 odd k), so each
// VDPBF16PS takes 32 of a row's products: per 64 k and column, one widening, one shift and two
// permutes, then two pair dot products a row. Blocks of at least 64 k (blocks divide K, so a
// step's weights then share one block's table, and every column starts a block); blocks of 32
// take the pair kernel.

constexpr int64_t kGemvBf16StepK = 64;   // k per step: 32 packed bytes of a column
constexpr int64_t kGemvBf16MaxRows = 6;  // rows this path takes

// Whether the k-in-lanes path takes M rows against these weights.
inline bool gemv_bf16_takes(std::span<const Decoded4bit> weights, int64_t M) {
  if (M < 1 || M > kGemvBf16MaxRows) return false;
  return std::all_of(weights.begin(), weights.end(),
                     [](const Decoded4bit& d) { return d.w.blocksize >= kGemvBf16StepK; });
}

// x [M, K] bf16 in the path's order: per row and step of 64 k, the 32 even k, then the 32 odd.
inline std::vector<uint16_t> pack_even_odd(const uint16_t* x, int64_t M, int64_t K) {
  std::vector<uint16_t> out(M * K);
  for (int64_t i = 0; i < M * K; i += kGemvBf16StepK)
    for (int64_t j = 0; j < kGemvBf16StepK / 2; ++j) {
      out[i + j] = x[i + 2 * j];
      out[i + kGemvBf16StepK / 2 + j] = x[i + 2 * j + 1];
    }
  return out;
}

// A block's table: its code values times its scale, rounded to bf16, in both halves of the
// vector, so that a word permute indexed by a whole byte (it reads the low 5 bits) finds the
// low nibble's code whatever the high nibble's lowest bit is.
inline __m512i gemv_bf16_table(__m512 code, float scale) {
  const __m512 values = _mm512_mul_ps(code, _mm512_set1_ps(scale));
  return reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(values, values));
}

// y[m, n0 + c] (y [MR, N] bf16) = the sum of acc[m][c]'s parts and lanes, plus the bias,
// rounded once: the k-in-lanes path's sums leaving.
template <int MR, int NC, int kParts>
inline void store_gemv_sums(const __m512 (&acc)[MR][NC][kParts], int64_t n0, int64_t N,
                            const float* bias, uint16_t* y) {
  for (int m = 0; m < MR; ++m)
    for (int c = 0; c < NC; ++c) {
      __m512 sum = acc[m][c][0];
      for (int i = 1; i < kParts; ++i) sum = _mm512_add_ps(sum, acc[m][c][i]);
      const int64_t n = n0 + c;
      round_to(reinterpret_cast<bf16*>(y) + m * N + n,
               _mm512_reduce_add_ps(sum) + (bias == nullptr ? 0.0f : bias[n]));
    }
}

// y[m, n] for MR rows and the NC columns from n0 of w: xq as pack_even_odd packs x.
template <int MR, int NC, bool kNested>
inline void gemv_bf16_columns(const Decoded4bit& d, const uint16_t* xq, int64_t n0,
                              const float* bias, uint16_t* y) {
  const Weight4bit& w = d.w;
  const int64_t K = d.K, blocks = K / w.blocksize, steps = w.blocksize / kGemvBf16StepK;
  const uint8_t* column = w.packed + n0 * (K / 2);  // column c's bytes: c * K / 2 on
  // As gemv_cols_4bit: the columns' bytes are one run, the next columns' follow it, and each
  // step prefetches the lines as far on as the run is long, or kGemvAhead.
  const uint8_t* ahead = column + std::max<int64_t>(NC * K / 2, kGemvAhead);
  const uint8_t* end = w.packed + w.N * (K / 2);
  constexpr int kParts = MR <= 2 ? 2 : 1;  // the even and odd k's sums apart: more chains
  __m512 acc[MR][NC][kParts];
  for (int m = 0; m < MR; ++m)
    for (int c = 0; c < NC; ++c)
      for (int i = 0; i < kParts; ++i) acc[m][c][i] = _mm512_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    __m512i table[NC];
    for (int c = 0; c < NC; ++c) {
      const int64_t block = (n0 + c) * blocks + b;
      table[c] = gemv_bf16_table(d.code, kNested ? w.scales(block) : w.scales.absmax[block]);
    }
    for (int64_t s = 0; s < steps; ++s) {
      const int64_t k = (b * steps + s) * kGemvBf16StepK;
      const int64_t read = k / kGemvBf16StepK * NC * 32;  // bytes of the run read before
      for (int64_t line = read; line < read + NC * 32; line += 64)
        if (ahead + line < end)
          _mm_prefetch(reinterpret_cast<const char*>(ahead + line), _MM_HINT_T0);
      __m512bh even_x[MR], odd_x[MR];
      for (int m = 0; m < MR; ++m) {
        even_x[m] = reinterpret_cast<__m512bh>(_mm512_loadu_si512(xq + m * K + k));
        odd_x[m] = reinterpret_cast<__m512bh>(_mm512_loadu_si512(xq + m * K + k + 32));
      }
      for (int c = 0; c < NC; ++c) {
        const __m512i q = _mm512_cvtepu8_epi16(
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(column + c * (K / 2) + k / 2)));
        const __m512bh even = reinterpret_cast<__m512bh>(
            _mm512_permutexvar_epi16(_mm512_srli_epi16(q, 4), table[c]));
        const __m512bh odd = reinterpret_cast<__m512bh>(_mm512_permutexvar_epi16(q, table[c]));
        for (int m = 0; m < MR; ++m) {
          acc[m][c][0] = _mm512_dpbf16_ps(acc[m][c][0], even, even_x[m]);
          acc[m][c][kParts - 1] = _mm512_dpbf16_ps(acc[m][c][kParts - 1], odd, odd_x[m]);
        }
      }
    }
  }
  store_gemv_sums(acc, n0, w.N, bias, y);
}

template <int MR, bool kNested>
inline void gemv_bf16_block(const Decoded4bit& d, const uint16_t* xq, int64_t n0,
                            const float* bias, uint16_t* y) {
  constexpr int NC = MR <= 5 ? 4 : 2;  // columns a step decodes, each into its own sums
  const int64_t end = std::min(n0 + kAmxColumns, d.w.N);
  int64_t n = n0;
  for (; n + NC <= end; n += NC) gemv_bf16_columns<MR, NC, kNested>(d, xq, n, bias, y);
  for (; n < end; ++n) gemv_bf16_columns<MR, 1, kNested>(d, xq, n, bias, y);
}

// One block of 32 output columns from n0 of d's weight, M (1 to kGemvBf16MaxRows) rows.
inline void gemv_bf16(const Decoded4bit& d, const uint16_t* xq, int64_t M, int64_t n0,
                      const float* bias, uint16_t* y) {
  const bool nested = d.w.scales.absmax == nullptr;
  switch (M * 2 + nested) {
    case 2: return gemv_bf16_block<1, false>(d, xq, n0, bias, y);
    case 3: return gemv_bf16_block<1, true>(d, xq, n0, bias, y);
    case 4: return gemv_bf16_block<2, false>(d, xq, n0, bias, y);
    case 5: return gemv_bf16_block<2, true>(d, xq, n0, bias, y);
    case 6: return gemv_bf16_block<3, false>(d, xq, n0, bias, y);
    case 7: return gemv_bf16_block<3, true>(d, xq, n0, bias, y);
    case 8: return gemv_bf16_block<4, false>(d, xq, n0, bias, y);
    case 9: return gemv_bf16_block<4, true>(d, xq, n0, bias, y);
    case 10: return gemv_bf16_block<5, false>(d, xq, n0, bias, y);
    case 11: return gemv_bf16_block<5, true>(d, xq, n0, bias, y);
    case 12: return gemv_bf16_block<6, false>(d, xq, n0, bias, y);
    default: return gemv_bf16_block<6, true>(d, xq, n0, bias, y);
  }
}

// The same for a bf16 weight [N, K] (DenseBf16): each 32 k of a column, as stored, are the
// pairs a VDPBF16PS takes against a row's 32 k, also as stored (x needs no rearranging).
template <int MR, int NC>
inline void gemv_bf16_dense_columns(const DenseBf16& d, const uint16_t* x, int64_t n0,
                                    const float* bias, uint16_t* y) {
  const int64_t K = d.K;
  const uint16_t* column = d.weight + n0 * K;  // column c's weights: c * K on
  const uint16_t* ahead = column + std::max<int64_t>(NC * K, kGemvAhead / 2);
  const uint16_t* end = d.weight + d.N * K;
  constexpr int kParts = MR <= 2 ? 2 : 1;  // alternate steps' sums apart: more chains
  __m512 acc[MR][NC][kParts];
  for (int m = 0; m < MR; ++m)
    for (int c = 0; c < NC; ++c)
      for (int i = 0; i < kParts; ++i) acc[m][c][i] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += kAmxStepK) {
    const int64_t read = k / kAmxStepK * NC * kAmxStepK;  // elements of the run read before
    for (int64_t line = read; line < read + NC * kAmxStepK; line += 32)
      if (ahead + line < end)
        _mm_prefetch(reinterpret_cast<const char*>(ahead + line), _MM_HINT_T0);
    const int part = kParts > 1 ? static_cast<int>(k / kAmxStepK % 2) : 0;
    __m512bh rows[MR];
    for (int m = 0; m < MR; ++m)
      rows[m] = reinterpret_cast<__m512bh>(_mm512_loadu_si512(x + m * K + k));
    for (int c = 0; c < NC; ++c) {
      const __m512bh w = reinterpret_cast<__m512bh>(_mm512_loadu_si512(column + c * K + k));
      for (int m = 0; m < MR; ++m)
        acc[m][c][part] = _mm512_dpbf16_ps(acc[m][c][part], w, rows[m]);
    }
  }
  store_gemv_sums(acc, n0, d.N, bias, y);
}

template <int MR>
inline void gemv_bf16_dense_block(const DenseBf16& d, const uint16_t* x, int64_t n0,
                                  const float* bias, uint16_t* y) {
  constexpr int NC = MR <= 5 ? 4 : 2;
  const int64_t end = std::min(n0 + kAmxColumns, d.N);
  int64_t n = n0;
  for (; n + NC <= end; n += NC) gemv_bf16_dense_columns<MR, NC>(d, x, n, bias, y);
  for (; n < end; ++n) gemv_bf16_dense_columns<MR, 1>(d, x, n, bias, y);
}

inline bool gemv_bf16_takes(std::span<const DenseBf16>, int64_t M) {
  return M >= 1 && M <= kGemvBf16MaxRows;
}

// int8 codes run in tiles only (gemm_bf16): a few rows take linear_int8's fp32 kernel instead.
inline bool gemv_bf16_takes(std::span<const Int8Codes>, int64_t) { return false; }

// One block of 32 output columns from n0 of a bf16 weight, M (1 to kGemvBf16MaxRows) rows of x
// as they are.
inline void gemv_bf16(const DenseBf16& d, const uint16_t* x, int64_t M, int64_t n0,
                      const float* bias, uint16_t* y) {
  switch (M) {
    case 1: return gemv_bf16_dense_block<1>(d, x, n0, bias, y);
    case 2: return gemv_bf16_dense_block<2>(d, x, n0, bias, y);
    case 3: return gemv_bf16_dense_block<3>(d, x, n0, bias, y);
    case 4: return gemv_bf16_dense_block<4>(d, x, n0, bias, y);
    case 5: return gemv_bf16_dense_block<5>(d, x, n0, bias, y);
    default: return gemv_bf16_dense_block<6>(d, x, n0, bias, y);
  }
}

// x rearranged for the k-in-lanes path: 4-bit weights read it as pack_even_odd packs it; bf16
// weights read x as it is (empty: nothing to hold).
inline std::vector<uint16_t> gemv_rows(std::span<const Decoded4bit>, const uint16_t* x,
                                       int64_t M, int64_t K) {
  return pack_even_odd(x, M, K);
}
inline std::vector<uint16_t> gemv_rows(std::span<const DenseBf16>, const uint16_t*, int64_t,
                                       int64_t) {
  return {};
}
inline std::vector<uint16_t> gemv_rows(std::span<const Int8Codes>, const uint16_t*, int64_t,
                                       int64_t) {
  return {};
}

// Every weight's y_i = x @ W_i^T + bias_i in one parallel region, its blocks of 32 columns the
// work items, in AMX tiles where amx_usable() (else by pair dot products; bf16_pairs_usable()
// must hold); x [M, K] bf16 as uint16, M at most kAmxMaxRows; Source: Decoded4bit, DenseBf16 or
// Int8Codes (in tiles only: its caller checks amx_usable()).
// `invariant` (batch invariance): every row's outputs get the bits they would in a call of any
// other rows. In tiles they always do (a tile multiply sums each output of its own row and
// column, in k order, whatever the other rows hold; tiles take every row count). By pair dot
// products: the pair kernel unfolded at every row count (each output's pairs summed in one
// order, one lane a row), never the k-in-lanes path or folded rows, whose lanes hold parts of a
// row's sums; 1 to kPairsColumnRows rows by the columns in the lanes, which give the pair
// kernel's bits.
template <class Source>
inline void gemm_bf16(const uint16_t* x, int64_t M, int64_t K, std::span<const Source> weights,
                      std::span<const float* const> biases, std::span<uint16_t* const> ys,
                      bool invariant) {
  const bool tiles = amx_usable();
  const bool gemv = !tiles && !invariant && gemv_bf16_takes(weights, M);
  const bool columns = !tiles && invariant && M <= kPairsColumnRows;
  const int fold = tiles || gemv || invariant ? 1 : pairs_fold(M);
  const uint32_t* rows = reinterpret_cast<const uint32_t*>(x);
  const std::vector<uint32_t> xp = gemv || columns ? std::vector<uint32_t>()
                                   : fold > 1      ? pack_folded(rows, M, K, fold)
                                                   : pack_rows(rows, M, K);
  const std::vector<uint16_t> xq = gemv ? gemv_rows(weights, x, M, K) : std::vector<uint16_t>();
  const uint16_t* gemv_x = xq.empty() ? x : xq.data();
  std::vector<int64_t> first_block{0};  // weight i's blocks: first_block[i] .. first_block[i + 1]
  for (const Source& w : weights)
    first_block.push_back(first_block.back() + (w.columns() + kAmxColumns - 1) / kAmxColumns);
  parallel_items(first_block.back(), [&](WorkQueue& queue) {
    std::optional<TileSession> session;
    if (tiles) session.emplace();
    queue.each([&](int64_t b) {
      size_t i = 0;
      while (b >= first_block[i + 1]) ++i;
      const int64_t n0 = (b - first_block[i]) * kAmxColumns;
      if constexpr (std::is_same_v<Source, Int8Codes>) {  // tiles only (linear_int8_bf16)
        amx_block(weights[i], xp.data(), M, K, n0, biases[i], ys[i]);
      } else {
        if (gemv) return gemv_bf16(weights[i], gemv_x, M, n0, biases[i], ys[i]);
        if (columns) return pairs_columns_rows(weights[i], rows, M, K, n0, biases[i], ys[i]);
        if (tiles)
          amx_block(weights[i], xp.data(), M, K, n0, biases[i], ys[i]);
        else
          pairs_block(weights[i], xp.data(), M, K, n0, biases[i], ys[i], fold);
      }
    });
  });
}

// ---- A LoRA delta's chunk of tokens in tiles ---------------------------------------------
//
// y[t] += bf16(x[t] @ a[:rank].T * scale) @ b[:rank] for the tokens of one chunk (at most 16,
// one segment), x, y and the slot's a [rank, in] and b [rank, out] bf16. The shrink takes x's
// rows from memory as the first operand and, for each 32 k, every rank's 16 pairs of k as the
// second (a 16 x 16 transpose of 32-bit pairs); its fp32 sums, scaled, leave the tiles rounded to
// bf16 (where a bf16 model rounds lora_A's output); ranks past the adapter's are zero (its a's
// rows are paired as zeros), up to a multiple of 32.
// The expand takes those as the first operand and, for each block of 16 output columns, 32
// ranks of b with rows r and r + 1 interleaved as the second; each block's fp32 sums are added
// to y's rows in one rounding, as the widened path adds its sums.

constexpr int64_t kLoraTileTokens = 16;  // tokens a chunk in tiles takes: a tile's rows
constexpr int64_t kLoraTileMaxRank = 64;  // four shrink sum tiles; two expand steps

// Tiles 0-3: the shrink's sums of ranks 16g .. 16g + 15 (tiles 0 and 2 then two expand blocks'
// sums); tile 4: x's rows, then h's first 32 ranks; tile 1: h's next 32; tiles 5 and 6: the
// paired a or b. All are 64 bytes wide; tiles 5 and 6 have 16 rows (pairs), the others one per
// token of the chunk.
class LoraTiles {
 public:
  LoraTiles() = default;
  ~LoraTiles() {
    if (tokens_ != 0) _tile_release();
  }
  LoraTiles(const LoraTiles&) = delete;
  LoraTiles& operator=(const LoraTiles&) = delete;

  void configure(int64_t tokens) {
    if (tokens == tokens_) return;
    TileConfig config;
    for (int t = 0; t < 7; ++t) {
      config.colsb[t] = 64;
      config.rows[t] = static_cast<uint8_t>(t >= 5 ? 16 : tokens);
    }
    asm volatile("ldtilecfg %0" : : "m"(config));  // see TileSession
    tokens_ = tokens;
  }

 private:
  int64_t tokens_ = 0;
};

// pairs[p * 16 + r] = a's k0 + 2p and k0 + 2p + 1 of rank r0 + r (zero from rank `ranks` on):
// the shrink's second operand for 32 k.
inline void pair_ranks(const uint16_t* a, int64_t in, int64_t r0, int64_t ranks, int64_t k0,
                       uint32_t* pairs) {
  const uint32_t* rows = reinterpret_cast<const uint32_t*>(a + r0 * in + k0);
  for (int64_t i = 0; i < 16; i += 8)
    for (int64_t j = 0; j < 16; j += 8)  // ranks i.., pairs j..
      transpose_pairs(rows + i * (in / 2) + j, in / 2, ranks - r0 - i, pairs + j * 16 + i);
}

// pairs[p][2c + j] = b[q0 + 2p + j][c0 + c] for c < 16 (zero past `columns`, and from rank
// `ranks` on): the expand's second operand for 32 ranks and 16 columns.
inline void pair_columns(const uint16_t* b, int64_t out, int64_t q0, int64_t ranks, int64_t c0,
                         int64_t columns, uint16_t* pairs) {
  const __mmask16 mask = static_cast<__mmask16>((1u << std::min<int64_t>(16, columns)) - 1);
  const __m512i interleave = _mm512_set_epi16(
      47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8,
      39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);  // even[0], odd[0], even[1], ...
  for (int64_t p = 0; p < 16; ++p) {
    const int64_t r = q0 + 2 * p;
    const __m512i even = r < ranks ? _mm512_castsi256_si512(_mm256_maskz_loadu_epi16(
                                         mask, b + r * out + c0))
                                   : _mm512_setzero_si512();
    const __m512i odd = r + 1 < ranks ? _mm512_castsi256_si512(_mm256_maskz_loadu_epi16(
                                            mask, b + (r + 1) * out + c0))
                                      : _mm512_setzero_si512();
    _mm512_store_si512(pairs + p * 32, _mm512_permutex2var_epi16(even, interleave, odd));
  }
}

// The delta of `tokens` (1 to 16) rows of x [.., in] (in a multiple of 32) into y [.., out] from
// a [rank, in] and b [rank, out] (rank 1 to kLoraTileMaxRank), their scaling `scale` apart.
inline void lora_chunk_amx(const uint16_t* x, int64_t tokens, int64_t in, const uint16_t* a,
                           const uint16_t* b, int64_t rank, float scale, uint16_t* y,
                           int64_t out, LoraTiles& tiles) {
  alignas(64) uint32_t pairs[16 * 16];
  alignas(64) float sums[kLoraTileTokens * kLoraTileMaxRank];      // [token][rank]
  alignas(64) uint16_t h[kLoraTileTokens * kLoraTileMaxRank] = {};  // [token][rank], bf16
  tiles.configure(tokens);
  const int64_t groups = (rank + 15) / 16;
  _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
  for (int64_t k0 = 0; k0 < in; k0 += kAmxStepK) {
    _tile_loadd(4, x + k0, in * 2);
    for (int64_t g = 0; g < groups; ++g) {
      pair_ranks(a, in, 16 * g, rank, k0, pairs);
      _tile_loadd(5, pairs, 64);
      switch (g) {  // tile numbers are immediates
        case 0: _tile_dpbf16ps(0, 4, 5); break;
        case 1: _tile_dpbf16ps(1, 4, 5); break;
        case 2: _tile_dpbf16ps(2, 4, 5); break;
        default: _tile_dpbf16ps(3, 4, 5); break;
      }
    }
  }
  constexpr int64_t kSumsRow = kLoraTileMaxRank * 4;  // bytes
  _tile_stored(0, sums, kSumsRow); _tile_stored(1, sums + 16, kSumsRow);
  _tile_stored(2, sums + 32, kSumsRow); _tile_stored(3, sums + 48, kSumsRow);
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t g = 0; g < groups; ++g) {
      const float* row = sums + t * kLoraTileMaxRank + 16 * g;
      store_rounded(h + t * kLoraTileMaxRank + 16 * g, load_vf(row) * scale);
    }
  const int64_t steps = (rank + 31) / 32;
  _tile_loadd(4, h, kLoraTileMaxRank * 2);
  if (steps > 1) _tile_loadd(1, h + 32, kLoraTileMaxRank * 2);
  alignas(64) uint16_t paired[2][16 * 32];  // b's pairs for two blocks of 16 columns
  // Two blocks at a time, in sum tiles 0 and 2 from pairs in tiles 5 and 6, so that one
  // block's multiplies do not wait for the other's sums to leave the tiles.
  for (int64_t c0 = 0; c0 < out; c0 += 32) {
    const int64_t widths[2] = {std::min<int64_t>(16, out - c0),
                               std::min<int64_t>(16, out - c0 - 16)};
    const bool both = widths[1] > 0;
    _tile_zero(0);
    if (both) _tile_zero(2);
    for (int64_t q = 0; q < steps; ++q) {
      pair_columns(b, out, 32 * q, rank, c0, widths[0], paired[0]);
      _tile_loadd(5, paired[0], 64);
      if (both) {
        pair_columns(b, out, 32 * q, rank, c0 + 16, widths[1], paired[1]);
        _tile_loadd(6, paired[1], 64);
      }
      if (q == 0) {
        _tile_dpbf16ps(0, 4, 5);
        if (both) _tile_dpbf16ps(2, 4, 6);
      } else {
        _tile_dpbf16ps(0, 1, 5);
        if (both) _tile_dpbf16ps(2, 1, 6);
      }
    }
    _tile_stored(0, sums, 64);
    if (both) _tile_stored(2, sums + 256, 64);
    for (int block = 0; block < (both ? 2 : 1); ++block)
      for (int64_t t = 0; t < tokens; ++t) {
        uint16_t* target = y + t * out + c0 + 16 * block;
        const float* delta = sums + 256 * block + t * 16;
        if (widths[block] == 16) {
          store_rounded(target, load_vf(target) + load_vf(delta));
        } else {
          for (int64_t c = 0; c < widths[block]; ++c)
            round_to(target + c, to_float(target[c]) + delta[c]);
        }
      }
  }
}

#pragma GCC pop_options

}  // namespace LS_NAMESPACE

#endif
