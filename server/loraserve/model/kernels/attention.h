// Decode attention straight from the paged KV pools: one query token per row, its keys and
// values read in place through the row's block table (no gathered copy of the context).
//
// Pools are [num_slots, kv_heads, head_dim]; position j of row r lives at pool slot
// block_tables[r, j / block_size] * block_size + j % block_size. Grouped-query attention: the
// q heads h in [g * group, (g + 1) * group) share kv head g, whose keys are read once for all.

namespace LS_NAMESPACE {

// exp(x) for x <= 0 (softmax after subtracting the max): 2^(x log2 e) split into 2^n * 2^f,
// f in [-0.5, 0.5], with a degree-6 polynomial for 2^f (relative error below 2e-7).
inline vf exp_nonpositive(vf x) {
  const vf clamped = x < -87.f ? vf{} - 87.f : x;
  const vf t = clamped * 1.44269504088896341f;
  const vf n = __builtin_convertvector(__builtin_convertvector(t + (t < 0 ? -0.5f : 0.5f), vi), vf);
  const vf f = (t - n) * 0.69314718055994531f;  // ln(2^(t - n)) in [-0.35, 0.35]
  vf p = vf{} + 1.f / 720;
  p = p * f + 1.f / 120;
  p = p * f + 1.f / 24;
  p = p * f + 1.f / 6;
  p = p * f + 0.5f;
  p = p * f + 1.f;
  p = p * f + 1.f;
  const vi bits = (__builtin_convertvector(n, vi) + 127) << 23;
  return p * reinterpret_cast<vf>(bits);
}

// The pools' element T: float, or bf16 or fp16 (widened exactly as they are loaded).
template <typename T>
inline float dot(const float* a, const T* b, int64_t n) {
  vf acc = vf{};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) acc += *reinterpret_cast<const vf*>(a + i) * load_vf(b + i);
  float total = hsum(acc);
  for (; i < n; ++i) total += a[i] * to_float(b[i]);
  return total;
}

// out[0:D] += w * v[0:D]
template <typename T>
inline void axpy(float w, const T* v, int64_t D, float* out) {
  int64_t d = 0;
  for (; d + kLanes <= D; d += kLanes) *reinterpret_cast<vf*>(out + d) += w * load_vf(v + d);
  for (; d < D; ++d) out[d] += w * to_float(v[d]);
}

// Softmax of scores[0:n] in place.
inline void softmax_inplace(float* scores, int64_t n) {
  float top = scores[0];
  for (int64_t j = 1; j < n; ++j) top = std::max(top, scores[j]);
  vf sum_v = vf{};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    const vf e = exp_nonpositive(*reinterpret_cast<const vf*>(scores + j) - top);
    *reinterpret_cast<vf*>(scores + j) = e;
    sum_v += e;
  }
  float sum = hsum(sum_v);
  for (; j < n; ++j) {
    scores[j] = exp_nonpositive(vf{} + (scores[j] - top))[0];
    sum += scores[j];
  }
  const float inv = 1.f / sum;
  for (j = 0; j < n; ++j) scores[j] *= inv;
}

// A position's keys (or values) of every head are one [KVH, D] run, often a page of their own:
// the hardware prefetchers stop at page boundaries, so the runs ahead are fetched while this
// one is used: kAheadL1 positions on into L1, and kAheadL2 on into L2, which keeps more lines
// in flight than L1's fill buffers alone (decode attention over 8 layers' pools from memory:
// 0.86x the time of L1 prefetches alone, one-off, 2026-11-30; 4 or 10 on: less). Written out
// where used: GCC 12 compiled a helper taking the slots by reference without any prefetch
// (check with objdump after changing them).
constexpr int64_t kAheadL1 = 2, kAheadL2 = 6;

template <_mm_hint kHint, typename T>
inline void prefetch_position(const T* run, int64_t elements) {
  const char* bytes = reinterpret_cast<const char*>(run);
  const int64_t size = elements * int64_t(sizeof(T));
  for (int64_t offset = 0; offset < size; offset += 64) _mm_prefetch(bytes + offset, kHint);
}

// Where the queries are: q [R, H, D] with these strides in elements (D contiguous).
struct QueryLayout {
  int64_t row, head;
};

// q [R, H, D] of Q (fp32, or 16-bit: widened as it is read, exactly); k_pool, v_pool [S, KVH, D]
// of T (fp32, or 16-bit: half the bytes to read, and decode attention is bound by them);
// block_tables [R, max_blocks] int32; context_lens [R] int32 (the query sits at position
// context_lens[r] - 1 and sees keys from max(0, len - window) when window > 0); out [R, H, D]
// contiguous, of Q: summed in fp32 and rounded once (what widening q, attending in fp32 and
// converting the output gives, without the three copies).
//
// One row at a time per thread (rows are taken as threads get to them: they differ in length),
// walking its positions in order: the keys of every head at a position are one contiguous
// [KVH, D] run of the pool, read once for all heads.
template <typename T, typename Q>
inline void paged_decode_attention(const Q* q, const QueryLayout& q_layout, const T* k_pool,
                                   const T* v_pool, const int32_t* block_tables,
                                   int64_t max_blocks, const int32_t* context_lens, int64_t R,
                                   int64_t H, int64_t KVH, int64_t D, int64_t block_size,
                                   int64_t window, float scale, Q* out) {
  const int64_t group = H / KVH;
  parallel_items(R, [&](WorkQueue& queue) {
    std::vector<float> scores;
    std::vector<int64_t> slots;
    std::vector<float> q_row(H * D), out_row(H * D);  // the row's queries and output, in fp32
    queue.each([&](int64_t r) {
      const int64_t len = context_lens[r];
      const int64_t first = window > 0 ? std::max<int64_t>(0, len - window) : 0;
      const int64_t n = len - first;
      const int32_t* table = block_tables + r * max_blocks;
      slots.resize(n);
      for (int64_t j = 0; j < n; ++j) {
        const int64_t pos = first + j;
        slots[j] = int64_t(table[pos / block_size]) * block_size + pos % block_size;
      }
      for (int64_t h = 0; h < H; ++h)
        for (int64_t d = 0; d < D; ++d)
          q_row[h * D + d] = to_float(q[r * q_layout.row + h * q_layout.head + d]);
      scores.resize(H * n);  // [H, n]
      for (int64_t j = 0; j < n; ++j) {
        if (j + kAheadL1 < n)
          prefetch_position<_MM_HINT_T0>(k_pool + slots[j + kAheadL1] * KVH * D, KVH * D);
        if (j + kAheadL2 < n)
          prefetch_position<_MM_HINT_T1>(k_pool + slots[j + kAheadL2] * KVH * D, KVH * D);
        const T* keys = k_pool + slots[j] * KVH * D;
        for (int64_t g = 0, h = 0; g < KVH; ++g)
          for (int64_t i = 0; i < group; ++i, ++h)
            scores[h * n + j] = scale * dot(q_row.data() + h * D, keys + g * D, D);
      }
      for (int64_t h = 0; h < H; ++h) softmax_inplace(scores.data() + h * n, n);
      std::fill(out_row.begin(), out_row.end(), 0.f);
      for (int64_t j = 0; j < n; ++j) {
        if (j + kAheadL1 < n)
          prefetch_position<_MM_HINT_T0>(v_pool + slots[j + kAheadL1] * KVH * D, KVH * D);
        if (j + kAheadL2 < n)
          prefetch_position<_MM_HINT_T1>(v_pool + slots[j + kAheadL2] * KVH * D, KVH * D);
        const T* values = v_pool + slots[j] * KVH * D;
        for (int64_t g = 0, h = 0; g < KVH; ++g)
          for (int64_t i = 0; i < group; ++i, ++h)
            axpy(scores[h * n + j], values + g * D, D, out_row.data() + h * D);
      }
      Q* to = out + r * H * D;
      int64_t i = 0;
      for (; i + kLanes <= H * D; i += kLanes) store_rounded(to + i, load_vf(out_row.data() + i));
      for (; i < H * D; ++i) round_to(to + i, out_row[i]);
    });
  });
}

}  // namespace LS_NAMESPACE
