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

// The source lane of output lane o when two vectors, each holding kLanes / W heads' partial
// sums in runs of W lanes, fold into one holding twice the heads in runs of W / 2: the low half
// of each run (high: its high half), a's heads first.
constexpr int fold_lane(int o, int W, bool high) {
  const int half_run = W / 2, from_b = o < kLanes / 2 ? 0 : kLanes, p = o % (kLanes / 2);
  return from_b + p / half_run * W + p % half_run + (high ? half_run : 0);
}
template <int W, int... O>
inline vf fold_pair(vf a, vf b, std::integer_sequence<int, O...>) {
  return __builtin_shufflevector(a, b, fold_lane(O, W, false)...) +
         __builtin_shufflevector(a, b, fold_lane(O, W, true)...);
}
// One vector whose lane i is the sum of acc[i]'s lanes (acc[0..W) overwritten): kLanes heads'
// dot products reduced together, kLanes - 1 folds of two shuffles and an add for them all,
// where a horizontal sum each would take log2(kLanes) shuffles and adds apiece.
template <int W = kLanes>
inline vf transpose_sum(vf* acc) {
  if constexpr (W == 1) {
    return acc[0];
  } else {
    constexpr auto lanes = std::make_integer_sequence<int, kLanes>{};
    for (int i = 0; i < W / 2; ++i) acc[i] = fold_pair<W>(acc[2 * i], acc[2 * i + 1], lanes);
    return transpose_sum<W / 2>(acc);
  }
}

// s[0:H] = scale * (each q head's row of q_rows [H, D] . its kv head's keys at keys +
// kv_offset[h]); s is padded to whole vectors (lanes past H: 0). Each head's dot product is a
// vector of partial sums over D's vectors (a tail past them added into lane 0), kLanes heads'
// reduced together. VPH = D / kLanes where it is one of the common ones (unrolled), else 0
// (any D). G consecutive q heads share a kv head (G divides the model's group and kLanes): each
// vector of its keys is loaded, and widened, once for the G of them.
template <int VPH, int G, typename T>
inline void decode_scores(const float* q_rows, const T* keys, const int64_t* kv_offset,
                          int64_t H, int64_t D, float scale, float* s) {
  const int64_t stride = VPH > 0 ? VPH * kLanes : D, vectors = stride / kLanes;
  for (int64_t h0 = 0; h0 < H; h0 += kLanes) {
    vf acc[kLanes];
#pragma GCC unroll 16  // the sums in registers, not memory
    for (int i = 0; i < kLanes; i += G) {
      for (int g = 0; g < G; ++g) acc[i + g] = vf{};
      const int64_t h = h0 + i;
      if (h >= H) continue;  // H is a multiple of G: a run of G heads is all there or not
      const float* q_h = q_rows + h * stride;
      const T* k_h = keys + kv_offset[h];
#pragma GCC unroll 8
      for (int64_t v = 0; v < vectors; ++v) {
        const vf k = load_vf(k_h + v * kLanes);
#pragma GCC unroll 8
        for (int g = 0; g < G; ++g) acc[i + g] += load_vf(q_h + g * stride + v * kLanes) * k;
      }
      if constexpr (VPH == 0) {
        for (int g = 0; g < G; ++g) {
          float tail = 0.f;
          for (int64_t d = vectors * kLanes; d < D; ++d)
            tail += q_h[g * D + d] * to_float(k_h[d]);
          acc[i + g][0] += tail;
        }
      }
    }
    *reinterpret_cast<vf*>(s + h0) = transpose_sum(acc) * scale;
  }
}

// Decode scores for runs of G heads: unrolled over D's vectors where there are 2, 4 or 8.
template <int G, typename T>
inline auto scores_kernel(int64_t D) {
  const int64_t vectors = D / kLanes;
  if (vectors * kLanes != D) return decode_scores<0, G, T>;
  return vectors == 4   ? decode_scores<4, G, T>
         : vectors == 8 ? decode_scores<8, G, T>
         : vectors == 2 ? decode_scores<2, G, T>
                        : decode_scores<0, G, T>;
}
template <typename T>
inline auto scores_kernel(int G, int64_t D) {
  switch (G) {
    case 8: return scores_kernel<8, T>(D);
    case 4: return scores_kernel<4, T>(D);
    case 2: return scores_kernel<2, T>(D);
    default: return scores_kernel<1, T>(D);
  }
}

// A row's output vectors in slices of NV vectors of G consecutive q heads that share a kv head:
// slice i covers out_row[out[i] + g * head_stride, + NV * kLanes) for g < G, weighted by heads
// head[i] + g, and reads each position's values once for them all, at offset in[i] of its run.
struct ValueSlices {
  std::vector<int64_t> head, in, out;
  int64_t head_stride;
};

// For slices [first, first + count) (count <= kAccRegs / (NV * G), their sums in registers):
// out_row += sum over the block's positions j of weights[j, head] * values[j][in : in + NV *
// kLanes]. weights [positions, Hp]. values[j] for j < fetch_until (past the block's positions,
// up to the part's end) are fetched into L2 kAheadL2 / 2 positions ahead as the block is walked.
template <int NV, int G, typename T>
inline void decode_values(const float* weights, int64_t Hp, const T* const* values,
                          int64_t positions, const ValueSlices& slices, int64_t first,
                          int64_t count, float* out_row, int64_t fetch_until, int64_t run) {
  constexpr int kSlices = kAccRegs / (NV * G);
  static_assert(kSlices > 0, "a slice's sums must fit in the registers");
  vf acc[kSlices][G][NV];
  const auto out_of = [&](int i, int g) {
    return out_row + slices.out[first + i] + g * slices.head_stride;
  };
  for (int i = 0; i < kSlices; ++i)
    if (i < count)
      for (int g = 0; g < G; ++g)
        for (int v = 0; v < NV; ++v) acc[i][g][v] = load_vf(out_of(i, g) + v * kLanes);
  for (int64_t j = 0; j < positions; ++j) {
    if (j + kAheadL2 / 2 < fetch_until)
      prefetch_position<_MM_HINT_T1>(values[j + kAheadL2 / 2], run);
    const float* w_j = weights + j * Hp;
    // Unrolled, or GCC keeps the sums in memory (it stops unrolling by itself once widening
    // 16-bit values lengthens the body, and for NV < 4): 0.90x the time over GQA bf16 pools.
#pragma GCC unroll 24
    for (int i = 0; i < kSlices; ++i) {
      if (i < count) {
        const T* v_j = values[j] + slices.in[first + i];
        vf x[NV];
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) x[v] = load_vf(v_j + v * kLanes);
#pragma GCC unroll 8
        for (int g = 0; g < G; ++g) {
          const vf w = broadcast(w_j + slices.head[first + i] + g);
#pragma GCC unroll 4
          for (int v = 0; v < NV; ++v) acc[i][g][v] += w * x[v];
        }
      }
    }
  }
  for (int i = 0; i < kSlices; ++i)
    if (i < count)
      for (int g = 0; g < G; ++g)
        for (int v = 0; v < NV; ++v)
          *reinterpret_cast<vf*>(out_of(i, g) + v * kLanes) = acc[i][g][v];
}

// q [R, H, D] of Q (fp32, or 16-bit: widened as it is read, exactly); k_pool, v_pool [S, KVH, D]
// of T (fp32, or 16-bit: half the bytes to read, and decode attention is bound by them; or int8
// codes, a quarter, each position's head scaled by k_scales, v_scales [S, KVH]: a key's scale
// multiplies its scores, a value's the weights its codes are summed with);
// block_tables [R, max_blocks] int32; context_lens [R] int32 (the query sits at position
// context_lens[r] - 1 and sees keys from max(0, len - window) when window > 0); out [R, H, D]
// contiguous, of Q: summed in fp32 and rounded once (what widening q, attending in fp32 and
// converting the output gives, without the three copies).
//
// A row's positions are attended in parts of equal length (but the last): as few as hold at most
// kDecodePart each, but no fewer than hold kShortPart each up to kShortParts (so one stream's row
// of a few hundred positions is shared by that many threads), each part a work item taken as
// threads get to them (rows differ in length, and a long row, or fewer rows than threads, still
// shares the work); a row of several parts merges their unnormalised outputs, maxima and sums
// after (as flash decoding does). The parts depend on the row's length alone, so its output is the
// same whatever the batch around it. Within a part, scores walk the positions in order, each
// position's keys of every head one contiguous [KVH, D] run read once: each head's dot product as
// a vector of partial sums, kLanes heads' reduced together (transpose_sum), so the scores are
// [positions, heads] with heads in the lanes, and the softmax over positions is vertical. Values
// walk blocks of kValueBlock positions; within one, slices of the output (a few vectors of each of
// the q heads that share a kv head) keep their sums in registers across the block's positions,
// each slice reading its part of every position's run. Under grouped-query attention each vector
// of keys or values is loaded (and widened) once for the q heads that share it, not once per head.
// The softmax's denominator divides the output once at the end.
constexpr int64_t kDecodePart = 256, kShortPart = 64, kShortParts = 4, kValueBlock = 16;

// decode_values for slices of NV vectors of G heads (as many vectors as fit in the registers).
template <int G, typename T>
inline auto values_kernel(int NV) {
  if constexpr (4 * G <= kAccRegs) {
    if (NV == 4) return decode_values<4, G, T>;
  }
  if constexpr (2 * G <= kAccRegs) {
    if (NV == 2) return decode_values<2, G, T>;
  }
  return decode_values<1, G, T>;
}
template <typename T>
inline auto values_kernel(int G, int NV) {
  switch (G) {
    case 8: return values_kernel<8, T>(NV);
    case 7: return values_kernel<7, T>(NV);
    case 6: return values_kernel<6, T>(NV);
    case 5: return values_kernel<5, T>(NV);
    case 4: return values_kernel<4, T>(NV);
    case 3: return values_kernel<3, T>(NV);
    case 2: return values_kernel<2, T>(NV);
    default: return values_kernel<1, T>(NV);
  }
}

// One part's unnormalised output [H, D], and per head (padded to Hp) its largest score and the
// sum of exp(score - largest).
struct DecodePart {
  float* out;
  float* top;
  float* sum;
};

template <typename T, typename Q>
inline void paged_decode_attention(const Q* q, const QueryLayout& q_layout, const T* k_pool,
                                   const T* v_pool, const float* k_scales,
                                   const float* v_scales, const int32_t* block_tables,
                                   int64_t max_blocks, const int32_t* context_lens, int64_t R,
                                   int64_t H, int64_t KVH, int64_t D, int64_t block_size,
                                   int64_t window, float scale, Q* out) {
  constexpr bool kCoded = std::is_same_v<T, int8_t>;
  const int64_t group = H / KVH, Hp = (H + kLanes - 1) / kLanes * kLanes, run = KVH * D;
  const int64_t vectors = D / kLanes, vector_part = vectors * kLanes;
  // Runs of q heads that share a kv head read its keys and values once for the run. The scores'
  // runs (G) lie whole in blocks of kLanes heads, so G divides kLanes as well as the group; the
  // values' runs (GV) are whole groups of up to 8 heads (7 of Qwen2.5 7B's, 5 of its 14B's).
  const int G = group % 8 == 0 ? 8 : group % 4 == 0 ? 4 : group % 2 == 0 ? 2 : 1;
  const int GV = group <= 8 ? int(group) : G;
  // Values' slices: as many vectors of a head as divide its vectors evenly, up to 4, whose
  // sums for the GV heads fit in the registers.
  const auto fits = [&](int nv) { return vectors % nv == 0 && nv * GV <= kAccRegs; };
  const int NV = fits(4) ? 4 : fits(2) ? 2 : 1;
  const int64_t per_run = vectors / NV, slice_count = H / GV * per_run;
  const int64_t slices_at_once = kAccRegs / (NV * GV);
  std::vector<int64_t> kv_offset(H), kv_head(H);
  ValueSlices slices{std::vector<int64_t>(slice_count), std::vector<int64_t>(slice_count),
                     std::vector<int64_t>(slice_count), D};
  for (int64_t h = 0; h < H; ++h) {
    kv_head[h] = h / group;
    kv_offset[h] = kv_head[h] * D;
  }
  for (int64_t i = 0; i < slice_count; ++i) {
    const int64_t h = i / per_run * GV, d = i % per_run * NV * kLanes;
    slices.head[i] = h;
    slices.in[i] = kv_offset[h] + d;
    slices.out[i] = h * D + d;
  }
  const auto scores_of = scores_kernel<T>(G, D);
  const auto values_of = values_kernel<T>(GV, NV);
  // Each pass of slices over a block reads a slice of every position's run; the first fetches
  // the runs into L2 ahead of it for the rest where a pass alone keeps too few lines in flight:
  // 16-bit values (more instructions a line, widening) and q heads sharing a kv head (fewer
  // lines a pass; fp32 pools of 16 q heads over 2: 0.80x the time of fetching none).
  const bool fetch_values = !std::is_same_v<T, float> || GV > 1;
  // Work items in row order: row r's are [first_item[r], first_item[r + 1]).
  std::vector<int64_t> first_item(R + 1), item_row, part_len(R);
  for (int64_t r = 0; r < R; ++r) {
    const int64_t n = window > 0 ? std::min<int64_t>(context_lens[r], window) : context_lens[r];
    const int64_t short_parts = std::min((n + kShortPart - 1) / kShortPart, kShortParts);
    const int64_t parts = std::max<int64_t>({1, (n + kDecodePart - 1) / kDecodePart, short_parts});
    part_len[r] = std::max<int64_t>(1, (n + parts - 1) / parts);
    first_item[r] = int64_t(item_row.size());
    item_row.insert(item_row.end(), parts, r);
  }
  first_item[R] = int64_t(item_row.size());
  const int64_t items = first_item[R];
  const bool split = items > R;  // a row of several parts: their partial results kept to merge
  const std::unique_ptr<float[]> part_out(split ? new float[items * H * D] : nullptr),
      part_stats(split ? new float[items * 2 * Hp] : nullptr);  // each part writes its own
  const auto part = [&](int64_t item) {
    return DecodePart{part_out.get() + item * H * D, part_stats.get() + item * 2 * Hp,
                      part_stats.get() + item * 2 * Hp + Hp};
  };
  // out's row r (of Q): weights[p][h] * parts[p].out[h] summed over its parts, each head divided
  // by its weights' sum of the parts' sums.
  const auto write_row = [&](int64_t r, const DecodePart* parts, const float* weights,
                             int64_t count) {
    Q* to = out + r * H * D;
    for (int64_t h = 0; h < H; ++h) {
      float total = 0.f;
      for (int64_t p = 0; p < count; ++p) total += weights[p * Hp + h] * parts[p].sum[h];
      const float inverse = 1.f / total;
      int64_t d = 0;
      for (; d + kLanes <= D; d += kLanes) {
        vf o = vf{};
        for (int64_t p = 0; p < count; ++p)
          o += load_vf(parts[p].out + h * D + d) * weights[p * Hp + h];
        store_rounded(to + h * D + d, o * inverse);
      }
      for (; d < D; ++d) {
        float o = 0.f;
        for (int64_t p = 0; p < count; ++p) o += parts[p].out[h * D + d] * weights[p * Hp + h];
        round_to(to + h * D + d, o * inverse);
      }
    }
  };
  parallel_items(items, [&](WorkQueue& queue) {
    std::vector<float> scores, q_rows(H * D), out_row(H * D), top(Hp), sum(Hp), ones(Hp, 1.f);
    const DecodePart own{out_row.data(), top.data(), sum.data()};  // a row of one part's
    std::vector<const T*> keys, values;
    std::vector<const float*> key_scales, value_scales;  // int8 pools: each position's [KVH]
    std::vector<float> weighted;  // int8 pools: [n, Hp] weights times their values' scales
    queue.each([&](int64_t item) {
      const int64_t r = item_row[item], len = context_lens[r];
      const int64_t begin = (window > 0 ? std::max<int64_t>(0, len - window) : 0) +
                            (item - first_item[r]) * part_len[r];
      const int64_t n = std::min(part_len[r], len - begin);
      const int32_t* table = block_tables + r * max_blocks;
      keys.resize(n);
      values.resize(n);
      if constexpr (kCoded) {
        key_scales.resize(n);
        value_scales.resize(n);
      }
      for (int64_t j = 0; j < n; ++j) {
        const int64_t slot = pool_slot(table, begin + j, block_size);
        keys[j] = k_pool + slot * run;
        values[j] = v_pool + slot * run;
        if constexpr (kCoded) {
          key_scales[j] = k_scales + slot * KVH;
          value_scales[j] = v_scales + slot * KVH;
        }
      }
      for (int64_t h = 0; h < H; ++h)
        for (int64_t d = 0; d < D; ++d)
          q_rows[h * D + d] = to_float(q[r * q_layout.row + h * q_layout.head + d]);
      const bool alone = first_item[r + 1] - first_item[r] == 1;
      const DecodePart mine = alone ? own : part(item);
      scores.resize(n * Hp);  // [n, Hp]
      for (int64_t j = 0; j < n; ++j) {
        if (j + kAheadL1 < n) prefetch_position<_MM_HINT_T0>(keys[j + kAheadL1], run);
        if (j + kAheadL2 < n) prefetch_position<_MM_HINT_T1>(keys[j + kAheadL2], run);
        scores_of(q_rows.data(), keys[j], kv_offset.data(), H, D, scale, scores.data() + j * Hp);
        if constexpr (kCoded) {
          if (j + kAheadL1 < n) _mm_prefetch(key_scales[j + kAheadL1], _MM_HINT_T0);
          float* s = scores.data() + j * Hp;
          for (int64_t h = 0; h < H; ++h) s[h] *= key_scales[j][kv_head[h]];
        }
      }
      for (int64_t h0 = 0; h0 < Hp; h0 += kLanes) {  // softmax over positions, heads in lanes
        vf largest = load_vf(scores.data() + h0);
        for (int64_t j = 1; j < n; ++j) {
          const vf s = load_vf(scores.data() + j * Hp + h0);
          largest = s > largest ? s : largest;
        }
        vf total = vf{};
        for (int64_t j = 0; j < n; ++j) {
          vf& s = *reinterpret_cast<vf*>(scores.data() + j * Hp + h0);
          s = exp_nonpositive(s - largest);
          total += s;
        }
        *reinterpret_cast<vf*>(mine.top + h0) = largest;
        *reinterpret_cast<vf*>(mine.sum + h0) = total;
      }
      const float* weight_rows = scores.data();  // [n, Hp]: what each position's values weigh
      if constexpr (kCoded) {
        weighted.assign(n * Hp, 0.f);
        for (int64_t j = 0; j < n; ++j)
          for (int64_t h = 0; h < H; ++h)
            weighted[j * Hp + h] = scores[j * Hp + h] * value_scales[j][kv_head[h]];
        weight_rows = weighted.data();
      }
      std::fill(mine.out, mine.out + H * D, 0.f);
      if (fetch_values)
        for (int64_t j = 0; j < std::min(n, kAheadL2 / 2); ++j)
          prefetch_position<_MM_HINT_T1>(values[j], run);
      for (int64_t j0 = 0; j0 < n; j0 += kValueBlock) {
        const int64_t positions = std::min(kValueBlock, n - j0);
        const float* weights = weight_rows + j0 * Hp;
        for (int64_t s = 0; s < slice_count; s += slices_at_once)
          values_of(weights, Hp, values.data() + j0, positions, slices, s,
                    std::min(slices_at_once, slice_count - s), mine.out,
                    fetch_values && s == 0 ? n - j0 : 0, run);
        if (vector_part < D)  // D's tail past its vectors
          for (int64_t j = 0; j < positions; ++j)
            for (int64_t h = 0; h < H; ++h)
              for (int64_t d = vector_part; d < D; ++d)
                mine.out[h * D + d] +=
                    weights[j * Hp + h] * to_float(values[j0 + j][kv_offset[h] + d]);
      }
      if (alone) write_row(r, &mine, ones.data(), 1);
    });
  });
  if (!split) return;
  parallel_items(R, [&](WorkQueue& queue) {  // rows of several parts: their parts merged
    std::vector<DecodePart> parts;
    std::vector<float> weights;
    queue.each([&](int64_t r) {
      const int64_t count = first_item[r + 1] - first_item[r];
      if (count == 1) return;
      parts.resize(count);
      weights.resize(count * Hp);
      for (int64_t p = 0; p < count; ++p) parts[p] = part(first_item[r] + p);
      for (int64_t h0 = 0; h0 < Hp; h0 += kLanes) {  // exp(part's max - row's max)
        vf largest = load_vf(parts[0].top + h0);
        for (int64_t p = 1; p < count; ++p) {
          const vf t = load_vf(parts[p].top + h0);
          largest = t > largest ? t : largest;
        }
        for (int64_t p = 0; p < count; ++p)
          *reinterpret_cast<vf*>(weights.data() + p * Hp + h0) =
              exp_nonpositive(load_vf(parts[p].top + h0) - largest);
      }
      write_row(r, parts.data(), weights.data(), count);
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
constexpr int64_t kPrefillMaxChunk = 64;
inline int64_t prefill_chunk(int64_t kv_floats) {
  return std::clamp<int64_t>(65536 / std::max<int64_t>(kv_floats, 1), 8, kPrefillMaxChunk);
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
  const float* k_scales;  // int8 pools: [S, KVH], else null
  const float* v_scales;
  PrefillRows rows;
  int64_t H, KVH, D, block_size, window;
  float scale;
  Q* out;
  int64_t group = H / KVH, run = KVH * D, chunk = prefill_chunk(run);

  // The first chunk of positions that a query at `earliest` or later sees. Chunks start at
  // multiples of `chunk` whatever the queries, so a query's sums have the same bits in any
  // prompt chunking (with a window as well).
  int64_t lowest_chunk(int64_t earliest) const {
    return window > 0 ? std::max<int64_t>(0, earliest - window + 1) / chunk * chunk : 0;
  }
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

// out [D] = kv head g's keys (or values) at pool slot `slot` of pool [S, KVH, D], widened to
// fp32: exactly, or for int8 codes, each times its scale (scales [S, KVH]).
template <typename T>
inline void widen_head(const T* pool, const float* scales, int64_t slot, int64_t KVH, int64_t g,
                       int64_t D, float* out) {
  widen_row(pool + (slot * KVH + g) * D, D, out);
  if constexpr (std::is_same_v<T, int8_t>) {
    const float scale = scales[slot * KVH + g];
    for (int64_t d = 0; d < D; ++d) out[d] *= scale;
  }
}

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
  for (int64_t c0 = c.lowest_chunk(start + f0 / group); c0 <= last; c0 += c.chunk) {
    const int64_t n = std::min(c.chunk, last + 1 - c0);
    for (int64_t j = 0; j < n; ++j) {
      x.slots[j] = pool_slot(table, c0 + j, c.block_size);
      if constexpr (kWidened)
        for (int64_t g = 0; g < KVH; ++g) {  // into [KVH, chunk, D]: a head's rows D apart
          widen_head(c.k_pool, c.k_scales, x.slots[j], KVH, g, D,
                     x.widened_keys.data() + (g * c.chunk + j) * D);
          widen_head(c.v_pool, c.v_scales, x.slots[j], KVH, g, D,
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

// A row of few (token, head) pairs against its context: a prompt's last tokens after a cached
// prefix (one, when a prompt sent again finds the rest cached). Its item above would hold a lane
// per pair and leave most of each vector idle, so such a row is worked per kv head instead
// (the heads on all threads), its lanes the context's positions for the scores (the chunk's
// keys transposed once for the head's pairs) and the head dimension for the values. Each pair's
// arithmetic is the item's, in the same order: its scores summed over d in order, then scaled;
// the same chunks of positions, maxima, exponentials and sums; values weighted position by
// position. So a query's output has the same bits whichever way its row is worked
// (batch_invariant holds across prompt chunkings).
constexpr int64_t kFewPairs = kLanes / 2;  // pairs a row may have to be worked this way

struct FewScratch {
  std::vector<float> q, o;     // [pairs, D]: queries widened; outputs so far
  std::vector<float> top, sum;  // [pairs]: each pair's online-softmax state
  std::vector<float> kt;       // [D, kPrefillMaxChunk]: the chunk's keys, transposed
  std::vector<float> s;        // [kPrefillMaxChunk]: one pair's scores, then weights
  std::vector<float> widened;  // [2, chunk, D]: a 16-bit chunk's keys, values
  std::vector<const float*> keys, values;  // [chunk]

  FewScratch(int64_t D, int64_t chunk)
      : q(kFewPairs * D), o(q.size()), top(kFewPairs), sum(kFewPairs), kt(D * kPrefillMaxChunk),
        s(kPrefillMaxChunk), widened(2 * chunk * D), keys(chunk), values(chunk) {}
};

// kt[d * kPrefillMaxChunk + j] = rows[j][d] for j < n <= kPrefillMaxChunk (0 for j past n,
// to the end of its vector), d < D.
inline void transpose_positions(const float* const* rows, int64_t n, int64_t D, float* kt) {
  constexpr int64_t ld = kPrefillMaxChunk;
  const int64_t D8 = D - D % 8;
  static const float zeros[8] = {};
  for (int64_t j = 0; j < n; j += 8)
    for (int64_t d = 0; d < D8; d += 8) {
      v8f tile[8];
      for (int r = 0; r < 8; ++r)
        tile[r] = j + r < n ? *reinterpret_cast<const v8f*>(rows[j + r] + d)
                            : *reinterpret_cast<const v8f*>(zeros);
      store_transposed(tile, kt + d * ld + j, ld);
    }
  for (int64_t d = D8; d < D; ++d)
    for (int64_t j = 0; j < n; ++j) kt[d * ld + j] = rows[j][d];
  for (int64_t d = 0; d < D; ++d)  // the last vector's positions past n
    for (int64_t j = n; j < (n + kLanes - 1) / kLanes * kLanes; ++j) kt[d * ld + j] = 0.f;
}

// Row p's pairs of kv head g (count * group <= kFewPairs): out's rows of their queries.
template <typename T, typename Q>
inline void attend_prefill_few(const PrefillCall<T, Q>& c, FewScratch& x, int64_t p, int64_t g) {
  constexpr float kInf = std::numeric_limits<float>::infinity();
  const int64_t group = c.group, D = c.D, run = c.run;
  const int64_t count = c.rows.counts[p], pairs = count * group;
  const int64_t first = c.rows.firsts[p], start = c.rows.starts[p];
  const int32_t* table = c.rows.block_tables + p * c.rows.max_blocks;
  for (int64_t f = 0; f < pairs; ++f) {  // pair f: token f / group, head g * group + f % group
    const int64_t token = first + f / group, head = g * group + f % group;
    widen_row(c.q + token * c.q_layout.row + head * c.q_layout.head, D, x.q.data() + f * D);
    std::fill(x.o.begin() + f * D, x.o.begin() + (f + 1) * D, 0.f);
    x.top[f] = -kInf;
    x.sum[f] = 0.f;
  }
  const int64_t last = start + count - 1;
  for (int64_t c0 = c.lowest_chunk(start); c0 <= last; c0 += c.chunk) {
    const int64_t n = std::min(c.chunk, last + 1 - c0);
    // the next chunk's keys and values of this head, into L2 while this one is worked: a
    // position's are a run apart from the next's, too far for the hardware prefetchers
    for (int64_t pos = c0 + c.chunk; pos < std::min(c0 + 2 * c.chunk, last + 1); ++pos) {
      const int64_t slot = pool_slot(table, pos, c.block_size) * run + g * D;
      prefetch_position<_MM_HINT_T1>(c.k_pool + slot, D);
      prefetch_position<_MM_HINT_T1>(c.v_pool + slot, D);
    }
    for (int64_t j = 0; j < n; ++j) {
      const int64_t slot = pool_slot(table, c0 + j, c.block_size);
      if constexpr (std::is_same_v<T, float>) {
        x.keys[j] = c.k_pool + slot * run + g * D;
        x.values[j] = c.v_pool + slot * run + g * D;
      } else {
        float* key = x.widened.data() + j * D;
        float* value = x.widened.data() + (c.chunk + j) * D;
        widen_head(c.k_pool, c.k_scales, slot, c.KVH, g, D, key);
        widen_head(c.v_pool, c.v_scales, slot, c.KVH, g, D, value);
        x.keys[j] = key;
        x.values[j] = value;
      }
    }
    transpose_positions(x.keys.data(), n, D, x.kt.data());
    for (int64_t f = 0; f < pairs; ++f) {
      const float* query = x.q.data() + f * D;
      float* s = x.s.data();
      for (int64_t j0 = 0; j0 < n; j0 += kLanes) {  // scores, kLanes positions at a time
        vf acc{};
        for (int64_t d = 0; d < D; ++d)
          acc += load_vf(x.kt.data() + d * kPrefillMaxChunk + j0) * broadcast(query + d);
        *reinterpret_cast<vf*>(s + j0) = acc * c.scale;
      }
      const int64_t at = start + f / group;  // the pair's position: it sees c0 + j <= at
      float next = x.top[f];
      for (int64_t j = 0; j < n; ++j) {
        const int64_t pos = c0 + j;
        const bool seen = pos <= at && (c.window <= 0 || at - pos < c.window);
        s[j] = seen ? s[j] : -kInf;
        next = next > s[j] ? next : s[j];
      }
      const float shift = next == -kInf ? 0.f : next;
      const float rescale = exp_nonpositive(vf{} + (x.top[f] - shift))[0];
      x.sum[f] *= rescale;
      float* o = x.o.data() + f * D;
      for (int64_t d = 0; d < D; ++d) o[d] *= rescale;
      x.top[f] = next;
      for (int64_t j0 = 0; j0 < n; j0 += kLanes) {  // weights, kLanes positions at a time
        vf& score = *reinterpret_cast<vf*>(s + j0);
        const vf weight = exp_nonpositive(score - shift);
        score = score == -kInf ? vf{} : weight;
      }
      for (int64_t j = 0; j < n; ++j) x.sum[f] += s[j];
      int64_t d = 0;
      for (; d + kLanes <= D; d += kLanes) {  // values, kLanes of d at a time
        vf acc = load_vf(o + d);
        for (int64_t j = 0; j < n; ++j) acc += load_vf(x.values[j] + d) * broadcast(s + j);
        *reinterpret_cast<vf*>(o + d) = acc;
      }
      for (; d < D; ++d)
        for (int64_t j = 0; j < n; ++j) o[d] += x.values[j][d] * s[j];
    }
  }
  for (int64_t f = 0; f < pairs; ++f) {
    const float* o = x.o.data() + f * D;
    Q* to = c.out + ((first + f / group) * c.H + g * group + f % group) * D;
    const float inv = 1.f / x.sum[f];
    int64_t d = 0;
    for (; d + kLanes <= D; d += kLanes) store_rounded(to + d, load_vf(o + d) * inv);
    for (; d < D; ++d) round_to(to + d, o[d] * inv);
  }
}

// q [N, H, D] of Q (strides in q_layout, D contiguous); out [N, H, D] contiguous, of Q: the
// prefill rows' tokens are written (summed in fp32, rounded once), no other. Query i of a row
// sees its positions j <= start + i (and start + i - j < window when window > 0): its own
// chunk's keys and values must be in the pools already.
template <typename T, typename Q>
inline void paged_prefill_attention(const Q* q, const QueryLayout& q_layout, const T* k_pool,
                                    const T* v_pool, const float* k_scales,
                                    const float* v_scales, const PrefillRows& rows, int64_t P,
                                    int64_t H, int64_t KVH, int64_t D, int64_t block_size,
                                    int64_t window, float scale, Q* out) {
  const PrefillCall<T, Q> call{q,    q_layout, k_pool,     v_pool, k_scales, v_scales, rows,
                               H,    KVH,      D,          block_size, window, scale, out};
  struct Item {
    int64_t row;
    int64_t first;  // the item's first (token, head) pair; for a row of few pairs, its kv head
    bool few;       // a row of few pairs, worked per kv head (attend_prefill_few)
  };
  std::vector<Item> items;
  for (int64_t p = 0; p < P; ++p) {
    const int64_t pairs = rows.counts[p] * call.group;
    if (pairs <= kFewPairs)
      for (int64_t g = 0; g < KVH; ++g) items.push_back({p, g, true});
    else
      for (int64_t f = 0; f < pairs; f += kPrefillMaxLanes) items.push_back({p, f, false});
  }
  parallel_items(int64_t(items.size()), [&](WorkQueue& queue) {
    std::optional<PrefillScratch> scratch;  // each made on a thread's first item of its kind
    std::optional<FewScratch> few;
    queue.each([&](int64_t i) {
      const auto [p, f0, few_pairs] = items[i];
      if (few_pairs) {
        if (!few) few.emplace(D, call.chunk);
        return attend_prefill_few(call, *few, p, f0);
      }
      if (!scratch) scratch.emplace(KVH, D, call.chunk, !std::is_same_v<T, float>);
      const int64_t pairs = std::min(kPrefillMaxLanes, rows.counts[p] * call.group - f0);
      if (pairs <= kLanes) return attend_prefill_item<1>(call, *scratch, p, f0);
      if constexpr (kPrefillMaxVectors > 2)
        if (pairs <= 2 * kLanes) return attend_prefill_item<2>(call, *scratch, p, f0);
      attend_prefill_item<kPrefillMaxVectors>(call, *scratch, p, f0);
    });
  });
}

}  // namespace LS_NAMESPACE
