// The batched LoRA delta over segments of tokens that share a slot:
// y[t] += (x[t] @ A[s].T[:, :rank]) @ B[s][:rank] for every token t of a segment on slot s.
//
// A segment is split into chunks of a few tokens so that a batch of one adapter (a long
// prefill) still uses every thread, while each chunk reads its slot's A and B once.

namespace LS_NAMESPACE {

constexpr int64_t kLoraChunkTokens = 16;

// x [N, in]; y [N, out] (updated); lora_a [S, R, in]; lora_b [S, R, out]; segments: starts,
// ends, slots, ranks [num_segments] int64.
inline void lora_delta(const float* x, float* y, int64_t in, int64_t out, const float* lora_a,
                       const float* lora_b, int64_t R, const int64_t* starts,
                       const int64_t* ends, const int64_t* slots, const int64_t* ranks,
                       int64_t num_segments) {
  std::vector<int64_t> chunk_segment, chunk_start;
  for (int64_t s = 0; s < num_segments; ++s)
    for (int64_t t = starts[s]; t < ends[s]; t += kLoraChunkTokens) {
      chunk_segment.push_back(s);
      chunk_start.push_back(t);
    }
  at::parallel_for(0, int64_t(chunk_segment.size()), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> shrunk(kLoraChunkTokens * R);
    for (int64_t c = begin; c < end; ++c) {
      const int64_t s = chunk_segment[c], t0 = chunk_start[c];
      const int64_t n = std::min(kLoraChunkTokens, ends[s] - t0);
      const int64_t rank = ranks[s];
      const float* a = lora_a + slots[s] * R * in;
      const float* b = lora_b + slots[s] * R * out;
      dot_tile(x + t0 * in, n, in, a, in, rank, shrunk.data(), rank);  // [n, rank]
      for (int64_t i = 0; i < n; ++i) {
        float* yt = y + (t0 + i) * out;
        for (int64_t r = 0; r < rank; ++r) {
          const float h = shrunk[i * rank + r];
          const float* br = b + r * out;
          int64_t d = 0;
          for (; d + kLanes <= out; d += kLanes)
            *reinterpret_cast<vf*>(yt + d) += h * *reinterpret_cast<const vf*>(br + d);
          for (; d < out; ++d) yt[d] += h * br[d];
        }
      }
    }
  });
}

}  // namespace LS_NAMESPACE
