// Attention straight from the paged KV pools, through each row's block table (no gathered copy
// of the context): decode rows (one query token each) and prefill rows (a prompt chunk each,
// causal over its context).
//
// Pools are [num_slots, kv_heads, head_dim]; position j of row r lives at pool slot
// block_tables[r, j / block_size] * block_size + j % block_size. Grouped-query attention: the
// q heads h in [g * group, (g + 1) * group) share kv head g, whose keys are read once for all.

namespace LS_NAMESPACE {

// The pool slot of position pos of a row whose block table is table.
inline int64_t pool_slot(const int32_t* table, int64_t pos, int64_t block_size) {
  return int64_t(table[pos / block_size]) * block_size + pos % block_size;
}

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
        slots[j] = pool_slot(table, pos, block_size);
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

// Prefill attention: a work item is up to 32 (query token, head of a kv group) pairs of one
// row, for every kv head, the pairs in the lanes of NV vectors (as few as hold them: a short
// chunk after a cached prefix fills one). Its queries are transposed once into qt [KVH, D,
// lanes]; then its context is taken a chunk of positions at a time (each position's keys of
// every head are one [KVH, D] run of the pool: read in place, or widened into rows once for all
// heads), and each chunk is one step of an online softmax per kv head: the scores s [chunk,
// lanes] = keys @ qt (a key's element broadcast against the lanes), each lane's running max and
// sum, and ot [D, lanes] += values^T @ p (a value's element broadcast against the lanes'
// weights). Lanes past the pairs, and keys a pair does not see, weigh 0.
constexpr int64_t kPrefillMaxLanes = 32;
constexpr int kPrefillMaxVectors = kPrefillMaxLanes / kLanes;
template <int NV>
constexpr int kPrefillBlock = kAccRegs / NV;  // keys (or d) per register block
// Positions per chunk: 64, fewer where a position's keys of every head are longer than 1024
// floats (a 16-bit chunk's widened keys and values stay at 512 KB at most, in L2).
inline int64_t prefill_chunk(int64_t kv_floats) {
  return std::clamp<int64_t>(65536 / std::max<int64_t>(kv_floats, 1), 8, 64);
}

// s[j, :] = scale * keys[j][:D] @ qt for the NB keys at keys[0..NB); NV vectors of lanes.
template <int NB, int NV>
inline void score_block(const float* qt, const float* const* keys, int64_t D, float scale,
                        float* s) {
  constexpr int64_t L = NV * kLanes;
  vf acc[NB][NV] = {};
  for (int64_t d = 0; d < D; ++d) {
    vf lanes[NV];
    for (int v = 0; v < NV; ++v) lanes[v] = load_vf(qt + d * L + v * kLanes);
    for (int j = 0; j < NB; ++j) {
      const vf k = broadcast(keys[j] + d);
      for (int v = 0; v < NV; ++v) acc[j][v] += k * lanes[v];
    }
  }
  for (int j = 0; j < NB; ++j)
    for (int v = 0; v < NV; ++v) *reinterpret_cast<vf*>(s + j * L + v * kLanes) = acc[j][v] * scale;
}

// ot[d0 + i, :] += sum over j < n of values[j][d0 + i] * p[j, :] for i < NB.
template <int NB, int NV>
inline void value_block(const float* p, const float* const* values, int64_t n, int64_t d0,
                        float* ot) {
  constexpr int64_t L = NV * kLanes;
  vf acc[NB][NV];
  for (int i = 0; i < NB; ++i)
    for (int v = 0; v < NV; ++v) acc[i][v] = load_vf(ot + (d0 + i) * L + v * kLanes);
  for (int64_t j = 0; j < n; ++j) {
    vf weights[NV];
    for (int v = 0; v < NV; ++v) weights[v] = load_vf(p + j * L + v * kLanes);
    for (int i = 0; i < NB; ++i) {
      const vf x = broadcast(values[j] + d0 + i);
      for (int v = 0; v < NV; ++v) acc[i][v] += x * weights[v];
    }
  }
  for (int i = 0; i < NB; ++i)
    for (int v = 0; v < NV; ++v) *reinterpret_cast<vf*>(ot + (d0 + i) * L + v * kLanes) = acc[i][v];
}

// block.template operator()<rest>() for a rest from 1 to NB: the last keys (or d) of a
// score_block or value_block loop as one block of that many.
template <int NB, class Block>
inline void rest_block(int64_t rest, Block block) {
  if constexpr (NB > 1)
    if (rest != NB) return rest_block<NB - 1>(rest, block);
  block.template operator()<NB>();
}

// One kv head's online-softmax state for a work item's lanes (the first NV vectors).
struct LaneSoftmax {
  vf top[kPrefillMaxVectors];  // the largest score seen (-inf before any)
  vf sum[kPrefillMaxVectors];  // the sum of exp(score - top) so far

  void reset() {
    for (int v = 0; v < kPrefillMaxVectors; ++v) {
      top[v] = vf{} - std::numeric_limits<float>::infinity();
      sum[v] = vf{};
    }
  }

  // s [n, lanes] of one chunk, its unseen keys -inf, to weights exp(s - top) in place (0 where
  // unseen), with the sums and ot [D, lanes] rescaled to the new max first.
  template <int NV>
  void step(float* s, int64_t n, float* ot, int64_t D) {
    constexpr float kInf = std::numeric_limits<float>::infinity();
    constexpr int64_t L = NV * kLanes;
    vf shift[NV];  // the new max where a lane has seen a key, else 0
    for (int v = 0; v < NV; ++v) {
      vf next = top[v];
      for (int64_t j = 0; j < n; ++j) {
        const vf score = load_vf(s + j * L + v * kLanes);
        next = next > score ? next : score;
      }
      shift[v] = next == -kInf ? vf{} : next;
      const vf rescale = exp_nonpositive(top[v] - shift[v]);  // ~0 before any key: sums are 0
      sum[v] *= rescale;
      for (int64_t d = 0; d < D; ++d) {
        vf& o = *reinterpret_cast<vf*>(ot + d * L + v * kLanes);
        o *= rescale;
      }
      top[v] = next;
    }
    for (int64_t j = 0; j < n; ++j)
      for (int v = 0; v < NV; ++v) {
        vf& score = *reinterpret_cast<vf*>(s + j * L + v * kLanes);
        const vf weight = exp_nonpositive(score - shift[v]);
        score = score == -kInf ? vf{} : weight;
        sum[v] += score;
      }
  }
};

// Where the prefill rows are: row p's count new tokens are q's (and out's) rows first..first +
// count - 1, at sequence positions start..start + count - 1 (int64 [P] each).
struct PrefillRows {
  const int64_t* firsts;
  const int64_t* counts;
  const int64_t* starts;
  const int32_t* block_tables;  // [P, max_blocks]
  int64_t max_blocks;
};

// One call's operands (see paged_prefill_attention) and the shapes derived from them.
template <typename T, typename Q>
struct PrefillCall {
  const Q* q;
  QueryLayout q_layout;
  const T* k_pool;
  const T* v_pool;
  PrefillRows rows;
  int64_t H, KVH, D, block_size, window;
  float scale;
  Q* out;
  int64_t group = H / KVH, run = KVH * D, chunk = prefill_chunk(run);
};

// A thread's buffers, sized for the widest item.
struct PrefillScratch {
  std::vector<float> qt, ot;   // [KVH, D, lanes] each
  std::vector<float> rows;     // [lanes, D]: one head's lanes' queries or outputs
  std::vector<float> s;        // [chunk, lanes]
  std::vector<float> widened_keys, widened_values;  // [KVH, chunk, D]: a 16-bit chunk's
  std::vector<int64_t> slots;  // [chunk]
  std::vector<const float*> keys, values;  // [chunk]: one head's rows of the chunk
  std::vector<LaneSoftmax> softmax;        // [KVH]

  PrefillScratch(int64_t KVH, int64_t D, int64_t chunk, bool widened)
      : qt(KVH * D * kPrefillMaxLanes), ot(qt.size()), rows(kPrefillMaxLanes * D),
        s(chunk * kPrefillMaxLanes), widened_keys(widened ? chunk * KVH * D : 0),
        widened_values(widened_keys.size()), slots(chunk), keys(chunk), values(chunk),
        softmax(KVH) {}
};

// The work item of row p whose first (token, head of a group) pair is f0, in NV vectors of lanes.
template <int NV, typename T, typename Q>
inline void attend_prefill_item(const PrefillCall<T, Q>& c, PrefillScratch& x, int64_t p,
                                int64_t f0) {
  constexpr float kInf = std::numeric_limits<float>::infinity();
  constexpr bool kWidened = !std::is_same_v<T, float>;
  constexpr int64_t L = NV * kLanes;
  constexpr int kBlock = kPrefillBlock<NV>;
  const int64_t group = c.group, run = c.run, D = c.D, KVH = c.KVH;
  const int64_t lanes = std::min(L, c.rows.counts[p] * group - f0);
  const int64_t first = c.rows.firsts[p], start = c.rows.starts[p];
  const int32_t* table = c.rows.block_tables + p * c.rows.max_blocks;
  // lane l holds token i = (f0 + l) / group of the row, head g * group + (f0 + l) % group
  alignas(64) int32_t position[L];
  for (int64_t l = 0; l < L; ++l)
    position[l] = l < lanes ? int32_t(start + (f0 + l) / group) : -1;  // -1: sees nothing
  std::fill(x.rows.begin(), x.rows.begin() + L * D, 0.f);
  for (int64_t g = 0; g < KVH; ++g) {  // each head's lanes' queries, widened, transposed
    for (int64_t l = 0; l < lanes; ++l) {
      const int64_t i = (f0 + l) / group, h = g * group + (f0 + l) % group;
      const Q* query = c.q + (first + i) * c.q_layout.row + h * c.q_layout.head;
      widen_row(query, D, x.rows.data() + l * D);
    }
    transpose(x.rows.data(), L, D, D, x.qt.data() + g * D * L, L);
  }
  std::fill(x.ot.begin(), x.ot.begin() + KVH * D * L, 0.f);
  for (LaneSoftmax& state : x.softmax) state.reset();
  const int64_t last = start + (f0 + lanes - 1) / group;  // the item's latest query
  const int64_t lowest = c.window > 0 ? std::max<int64_t>(0, start + f0 / group - c.window + 1) : 0;
  for (int64_t c0 = lowest; c0 <= last; c0 += c.chunk) {
    const int64_t n = std::min(c.chunk, last + 1 - c0);
    for (int64_t j = 0; j < n; ++j) {
      x.slots[j] = pool_slot(table, c0 + j, c.block_size);
      if constexpr (kWidened)
        for (int64_t g = 0; g < KVH; ++g) {  // into [KVH, chunk, D]: a head's rows D apart
          widen_row(c.k_pool + x.slots[j] * run + g * D, D,
                    x.widened_keys.data() + (g * c.chunk + j) * D);
          widen_row(c.v_pool + x.slots[j] * run + g * D, D,
                    x.widened_values.data() + (g * c.chunk + j) * D);
        }
    }
    for (int64_t g = 0; g < KVH; ++g) {
      for (int64_t j = 0; j < n; ++j) {
        if constexpr (kWidened) {
          x.keys[j] = x.widened_keys.data() + (g * c.chunk + j) * D;
          x.values[j] = x.widened_values.data() + (g * c.chunk + j) * D;
        } else {
          x.keys[j] = c.k_pool + x.slots[j] * run + g * D;
          x.values[j] = c.v_pool + x.slots[j] * run + g * D;
        }
      }
      const float* qt = x.qt.data() + g * D * L;
      float* ot = x.ot.data() + g * D * L;
      float* s = x.s.data();
      int64_t j = 0;
      for (; j + kBlock <= n; j += kBlock)
        score_block<kBlock, NV>(qt, x.keys.data() + j, D, c.scale, s + j * L);
      if (j < n)
        rest_block<kBlock - 1>(n - j, [&]<int NB>() {
          score_block<NB, NV>(qt, x.keys.data() + j, D, c.scale, s + j * L);
        });
      for (j = 0; j < n; ++j) {  // keys a lane does not see: -inf
        const int32_t pos = int32_t(c0 + j);
        for (int v = 0; v < NV; ++v) {
          const vi at = *reinterpret_cast<const vi*>(position + v * kLanes);
          vi seen = at >= pos;
          if (c.window > 0) seen &= at - pos < int32_t(c.window);
          vf& score = *reinterpret_cast<vf*>(s + j * L + v * kLanes);
          score = seen ? score : vf{} - kInf;
        }
      }
      x.softmax[g].template step<NV>(s, n, ot, D);
      int64_t d = 0;
      for (; d + kBlock <= D; d += kBlock) value_block<kBlock, NV>(s, x.values.data(), n, d, ot);
      if (d < D)
        rest_block<kBlock - 1>(D - d, [&]<int NB>() {
          value_block<NB, NV>(s, x.values.data(), n, d, ot);
        });
    }
  }
  for (int64_t g = 0; g < KVH; ++g) {  // each head's lanes' outputs: transposed back, scaled
    alignas(64) float total[L];
    for (int v = 0; v < NV; ++v) *reinterpret_cast<vf*>(total + v * kLanes) = x.softmax[g].sum[v];
    transpose(x.ot.data() + g * D * L, D, L, L, x.rows.data(), D);
    for (int64_t l = 0; l < lanes; ++l) {
      const int64_t i = (f0 + l) / group, h = g * group + (f0 + l) % group;
      const float* o = x.rows.data() + l * D;
      Q* to = c.out + ((first + i) * c.H + h) * D;
      const float inv = 1.f / total[l];
      int64_t d = 0;
      for (; d + kLanes <= D; d += kLanes) store_rounded(to + d, load_vf(o + d) * inv);
      for (; d < D; ++d) round_to(to + d, o[d] * inv);
    }
  }
}

// q [N, H, D] of Q (strides in q_layout, D contiguous); out [N, H, D] contiguous, of Q: the
// prefill rows' tokens are written (summed in fp32, rounded once), no other. Query i of a row
// sees its positions j <= start + i (and start + i - j < window when window > 0): its own
// chunk's keys and values must be in the pools already.
template <typename T, typename Q>
inline void paged_prefill_attention(const Q* q, const QueryLayout& q_layout, const T* k_pool,
                                    const T* v_pool, const PrefillRows& rows, int64_t P,
                                    int64_t H, int64_t KVH, int64_t D, int64_t block_size,
                                    int64_t window, float scale, Q* out) {
  const PrefillCall<T, Q> call{q, q_layout, k_pool, v_pool, rows, H, KVH, D, block_size,
                               window, scale, out};
  std::vector<int64_t> item_row, item_first_pair;  // per item: its row, its first pair
  for (int64_t p = 0; p < P; ++p)
    for (int64_t f = 0; f < rows.counts[p] * call.group; f += kPrefillMaxLanes) {
      item_row.push_back(p);
      item_first_pair.push_back(f);
    }
  parallel_items(int64_t(item_row.size()), [&](WorkQueue& queue) {
    PrefillScratch scratch(KVH, D, call.chunk, !std::is_same_v<T, float>);
    queue.each([&](int64_t item) {
      const int64_t p = item_row[item], f0 = item_first_pair[item];
      const int64_t pairs = std::min(kPrefillMaxLanes, rows.counts[p] * call.group - f0);
      if (pairs <= kLanes) return attend_prefill_item<1>(call, scratch, p, f0);
      if constexpr (kPrefillMaxVectors > 2)
        if (pairs <= 2 * kLanes) return attend_prefill_item<2>(call, scratch, p, f0);
      attend_prefill_item<kPrefillMaxVectors>(call, scratch, p, f0);
    });
  });
}

}  // namespace LS_NAMESPACE
