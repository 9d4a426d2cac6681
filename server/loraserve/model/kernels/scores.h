// What sampling needs of each row of next-token scores, in two reads of the row instead of
// torch's five (argmax, amax, and logsumexp's max, exp and sum): the first index of the
// maximum, the maximum, and log(sum(exp(x))).
//
// As torch has them: a NaN counts as larger than everything (the first NaN is the argmax, the
// max and the log-sum-exp are NaN); a row of -infinity has argmax 0, max and log-sum-exp
// -infinity; a row whose max is +infinity has log-sum-exp +infinity. Otherwise the log-sum-exp
// is max + log(sum(exp(x - max))), with attention.h's exp_nonpositive.

namespace LS_NAMESPACE {

struct RowStats {
  int64_t argmax;
  float max;
  float logsumexp;
};

// x [V], V >= 1, V < 2^31.
inline RowStats row_stats(const float* x, int64_t V) {
  // Pass 1: each lane's largest value and the first index it was seen at (strict > keeps the
  // first), and whether any lane saw a NaN.
  vi lanes = {}, where = {}, nan = {};
  for (int l = 0; l < kLanes; ++l) lanes[l] = l;
  vf best = vf{} - INFINITY;
  int64_t i = 0;
  for (; i + kLanes <= V; i += kLanes) {
    const vf v = *reinterpret_cast<const vf*>(x + i);
    const vi greater = v > best;
    where = greater ? lanes + static_cast<int32_t>(i) : where;
    best = greater ? v : best;
    nan |= v != v;
  }
  RowStats stats{0, -INFINITY, -INFINITY};
  bool seen_nan = false;
  for (int l = 0; l < kLanes; ++l) {
    seen_nan |= nan[l] != 0;
    if (best[l] > stats.max || (best[l] == stats.max && where[l] < stats.argmax)) {
      stats.max = best[l];
      stats.argmax = where[l];
    }
  }
  for (int64_t j = i; j < V; ++j) {
    seen_nan |= x[j] != x[j];
    if (x[j] > stats.max) {
      stats.max = x[j];
      stats.argmax = j;
    }
  }
  if (seen_nan) {
    int64_t first = 0;
    while (x[first] == x[first]) ++first;
    return {first, NAN, NAN};
  }
  if (std::isinf(stats.max)) return {stats.argmax, stats.max, stats.max};
  // Pass 2 (the row is in cache): the sum of exp(x - max).
  vf sum = vf{};
  for (i = 0; i + kLanes <= V; i += kLanes)
    sum += exp_nonpositive(*reinterpret_cast<const vf*>(x + i) - stats.max);
  float total = hsum(sum);
  for (; i < V; ++i) total += exp_nonpositive(vf{} + (x[i] - stats.max))[0];
  stats.logsumexp = stats.max + std::log(total);
  return stats;
}

// scores [B, V] -> argmax [B], max [B], logsumexp [B]: rows in parallel.
inline void score_stats(const float* scores, int64_t B, int64_t V, int64_t* argmax, float* max,
                        float* logsumexp) {
  parallel_items(B, [&](WorkQueue& queue) {
    queue.each([&](int64_t b) {
      const RowStats s = row_stats(scores + b * V, V);
      argmax[b] = s.argmax;
      max[b] = s.max;
      logsumexp[b] = s.logsumexp;
    });
  });
}

}  // namespace LS_NAMESPACE
