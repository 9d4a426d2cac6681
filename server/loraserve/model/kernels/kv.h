// Writing a forward's new keys or values into a paged pool: one copy of D elements per token
// and head, straight from the projection's strided output (torch's index_copy_ made the
// transposed source contiguous first, then dispatched a strided copy per token).

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

}  // namespace LS_NAMESPACE
