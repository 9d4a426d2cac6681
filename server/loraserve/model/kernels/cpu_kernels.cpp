// loraserve's CPU kernels, registered as torch ops under `loraserve::`. Built by
// `python -m loraserve.model.kernels` once per instruction set (LS_LANES: 8 for AVX2,
// 16 for AVX-512); `kernels/__init__.py` loads the build that fits this CPU.
//
// Each op's torch path, where it is called, is its oracle: tests/model/test_kernels.py compares them.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <dlfcn.h>
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <optional>
#include <span>
#include <thread>
#include <tuple>
#include <type_traits>
#include <vector>

#define LS_NAMESPACE loraserve_cpu
#include "parallel.h"
#include "gemm.h"
#include "amx.h"
#include "attention.h"
#include "lora.h"
#include "scores.h"
#include "norm.h"
#include "kv.h"
#include "rotary.h"

namespace {

using namespace loraserve_cpu;

void check_cpu_f32(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous(), name,
              " must be a contiguous float32 CPU tensor");
}

at::Tensor add_bias(at::Tensor y, const c10::optional<at::Tensor>& bias) {
  if (bias.has_value() && bias->defined()) y.add_(*bias);
  return y;
}

// y [M, N] = x [M, K] @ weight [N, K]^T + bias; weight float32, or bfloat16 (widened exactly:
// the same sums as a float32 weight of those values).
at::Tensor linear_f32(const at::Tensor& x, const at::Tensor& weight,
                      const c10::optional<at::Tensor>& bias, bool invariant) {
  check_cpu_f32(x, "x");
  TORCH_CHECK(weight.device().is_cpu() && weight.is_contiguous() &&
                  (weight.scalar_type() == at::kFloat || weight.scalar_type() == at::kBFloat16),
              "weight must be a contiguous float32 or bfloat16 CPU tensor");
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1),
              "x [M, K] and weight [N, K] must share K");
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  at::Tensor y = at::empty({M, N}, x.options());
  if (weight.scalar_type() == at::kFloat)
    gemm_dense(x.data_ptr<float>(), M, K, weight.data_ptr<float>(), N, y.data_ptr<float>(),
               invariant);
  else
    gemm_dense(x.data_ptr<float>(), M, K,
               reinterpret_cast<const bf16*>(weight.data_ptr<at::BFloat16>()), N,
               y.data_ptr<float>(), invariant);
  return add_bias(y, bias);
}

// An 8-bit weight's codes [N, K] int8 and scales [N] fp32 against x [M, K], checked.
void check_int8_weight(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales) {
  check_cpu_f32(scales, "scales");
  TORCH_CHECK(codes.device().is_cpu() && codes.is_contiguous() && codes.scalar_type() == at::kChar,
              "codes must be a contiguous int8 CPU tensor");
  TORCH_CHECK(x.dim() == 2 && codes.dim() == 2 && x.size(1) == codes.size(1) &&
                  scales.dim() == 1 && scales.size(0) == codes.size(0),
              "x [M, K], codes [N, K] and scales [N] must agree");
}

// y [M, N] = (x [M, K] @ codes [N, K]^T) * scales [N] + bias: a weight held in 8 bits, one
// scale an output row (`int8_output.py`). Each output's sum over k is the one gemm_dense gives
// an fp32 weight of the codes' values, then scaled: the same paths, batch-invariant ones too.
at::Tensor linear_int8(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales,
                       const c10::optional<at::Tensor>& bias, bool invariant) {
  check_cpu_f32(x, "x");
  check_int8_weight(x, codes, scales);
  const int64_t M = x.size(0), K = x.size(1), N = codes.size(0);
  at::Tensor y = at::empty({M, N}, x.options());
  gemm_dense(x.data_ptr<float>(), M, K, codes.data_ptr<int8_t>(), N, y.data_ptr<float>(),
             invariant);
  return add_bias(y.mul_(scales), bias);
}

// The 4-bit weight [N, K] of dequantize(packed, absmax, code), checked. absmax is fp32, or uint8
// when bitsandbytes double-quantized it (then absmax2, code2 and offset decode it).
Weight4bit weight_4bit(const at::Tensor& packed, const at::Tensor& absmax, const at::Tensor& code,
                       int64_t blocksize, int64_t N, int64_t K,
                       const c10::optional<at::Tensor>& absmax2,
                       const c10::optional<at::Tensor>& code2, double offset) {
  check_cpu_f32(code, "code");
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous(),
              "packed must be contiguous uint8");
  TORCH_CHECK(blocksize >= kGroup && (blocksize & (blocksize - 1)) == 0 && K % blocksize == 0,
              "blocksize must be a power of two from ", kGroup, " and divide K");
  TORCH_CHECK(packed.numel() * 2 == N * K && absmax.numel() * blocksize == N * K &&
                  code.numel() == 16,
              "packed, absmax and code do not describe a [", N, ", ", K, "] weight");
  Scales scales{nullptr, nullptr, nullptr, nullptr, static_cast<float>(offset)};
  const bool nested = absmax2.has_value() && absmax2->defined();
  if (nested) {
    TORCH_CHECK(absmax.scalar_type() == at::kByte && absmax.is_contiguous() &&
                    code2.has_value() && code2->numel() == 256 &&
                    absmax2->numel() * 256 >= absmax.numel(),
                "double-quantized scales need uint8 absmax, code2 [256] and absmax2");
    check_cpu_f32(*absmax2, "absmax2");
    check_cpu_f32(*code2, "code2");
    scales.absmax8 = absmax.data_ptr<uint8_t>();
    scales.code2 = code2->data_ptr<float>();
    scales.absmax2 = absmax2->data_ptr<float>();
  } else {
    check_cpu_f32(absmax, "absmax");
    scales.absmax = absmax.data_ptr<float>();
  }
  return Weight4bit{packed.data_ptr<uint8_t>(), scales, code.data_ptr<float>(), blocksize, N};
}

void check_rows(const at::Tensor& x) {
  check_cpu_f32(x, "x");
  TORCH_CHECK(x.dim() == 2, "x must be [M, K]");
}

// y [M, N] = x [M, K] @ dequantize(packed, absmax, code)[N, K]^T + bias (see weight_4bit).
at::Tensor linear_4bit(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                       const at::Tensor& code, int64_t blocksize, int64_t out_features,
                       const c10::optional<at::Tensor>& bias,
                       const c10::optional<at::Tensor>& absmax2,
                       const c10::optional<at::Tensor>& code2, double offset, bool invariant) {
  check_rows(x);
  const int64_t M = x.size(0), K = x.size(1);
  const Weight4bit weight =
      weight_4bit(packed, absmax, code, blocksize, out_features, K, absmax2, code2, offset);
  at::Tensor y = at::empty({M, out_features}, x.options());
  float* out = y.data_ptr<float>();
  gemm_4bit(x.data_ptr<float>(), M, K, {&weight, 1}, {&out, 1}, invariant);
  return add_bias(y, bias);
}

// An entry of a list of tensors where some may be absent (a bias, a weight's nested scales):
// an empty tensor stands for none (lists of optional tensors are what TorchScript's tracer,
// which records decode steps, cannot take).
c10::optional<at::Tensor> present(const at::Tensor& entry) {
  if (!entry.defined() || entry.numel() == 0) return c10::nullopt;
  return entry;
}

// The weights [N_i, K] element i of each list describes (see weight_4bit), checked.
std::vector<Weight4bit> weights_4bit(
    int64_t K, at::TensorList packed, at::TensorList absmax, at::TensorList code,
    at::IntArrayRef blocksize, at::IntArrayRef out_features, at::TensorList bias,
    at::TensorList absmax2, at::TensorList code2, at::ArrayRef<double> offset) {
  const size_t n = packed.size();
  TORCH_CHECK(absmax.size() == n && code.size() == n && blocksize.size() == n &&
                  out_features.size() == n && bias.size() == n && absmax2.size() == n &&
                  code2.size() == n && offset.size() == n,
              "every list must hold one entry per weight");
  std::vector<Weight4bit> weights;
  for (size_t i = 0; i < n; ++i)
    weights.push_back(weight_4bit(packed[i], absmax[i], code[i], blocksize[i], out_features[i],
                                  K, present(absmax2[i]), present(code2[i]), offset[i]));
  return weights;
}

// linear_4bit of several weights that read the same x, in one call: element i of each list
// describes weight i.
std::vector<at::Tensor> linear_4bit_group(
    const at::Tensor& x, at::TensorList packed, at::TensorList absmax, at::TensorList code,
    at::IntArrayRef blocksize, at::IntArrayRef out_features, at::TensorList bias,
    at::TensorList absmax2, at::TensorList code2, at::ArrayRef<double> offset,
    bool invariant) {
  check_rows(x);
  const int64_t M = x.size(0), K = x.size(1);
  const std::vector<Weight4bit> weights = weights_4bit(K, packed, absmax, code, blocksize,
                                                       out_features, bias, absmax2, code2, offset);
  std::vector<at::Tensor> ys;
  std::vector<float*> outs;
  for (const Weight4bit& w : weights) {
    ys.push_back(at::empty({M, w.N}, x.options()));
    outs.push_back(ys.back().data_ptr<float>());
  }
  gemm_4bit(x.data_ptr<float>(), M, K, weights, outs, invariant);
  for (size_t i = 0; i < ys.size(); ++i) add_bias(ys[i], present(bias[i]));
  return ys;
}

bool amx_usable_op() {
#ifdef LS_AMX
  return amx_usable();
#else
  return false;
#endif
}

bool bf16_pairs_usable_op() {
#ifdef LS_AMX
  return bf16_pairs_usable();
#else
  return false;
#endif
}

#ifdef LS_AMX
// x [M, K] as the bf16 ops take it, checked (and that this CPU has their instructions).
void check_bf16_rows(const at::Tensor& x) {
  TORCH_CHECK(amx_usable() || bf16_pairs_usable(),
              "this CPU, or its kernel, gives loraserve neither AMX tiles nor AVX512-BF16");
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kBFloat16 && x.is_contiguous() &&
                  x.dim() == 2,
              "x must be a contiguous bfloat16 CPU tensor [M, K]");
  TORCH_CHECK(x.size(0) <= kAmxMaxRows && x.size(1) % kAmxStepK == 0, "x must have at most ",
              kAmxMaxRows, " rows and K a multiple of ", kAmxStepK);
}

// A float32 bias [N] for the bf16 ops, checked; null when absent.
const float* bf16_op_bias(const c10::optional<at::Tensor>& bias, int64_t N) {
  if (!bias.has_value() || !bias->defined()) return nullptr;
  check_cpu_f32(*bias, "bias");
  TORCH_CHECK(bias->numel() == N, "a bias must hold one value per output");
  return bias->data_ptr<float>();
}

const uint16_t* bf16_data(const at::Tensor& t) {
  return reinterpret_cast<const uint16_t*>(t.data_ptr<at::BFloat16>());
}
#endif

// linear_4bit_group for bf16 x: the weights dequantized to bf16, fp32 sums, the outputs bf16
// (see amx.h); in AMX tiles where amx_usable(), else by AVX512-BF16's pair dot products where
// bf16_pairs_usable().
std::vector<at::Tensor> linear_4bit_bf16(
    const at::Tensor& x, at::TensorList packed, at::TensorList absmax, at::TensorList code,
    at::IntArrayRef blocksize, at::IntArrayRef out_features, at::TensorList bias,
    at::TensorList absmax2, at::TensorList code2, at::ArrayRef<double> offset,
    bool invariant) {
#ifdef LS_AMX
  check_bf16_rows(x);
  const int64_t M = x.size(0), K = x.size(1);
  const std::vector<Weight4bit> weights = weights_4bit(K, packed, absmax, code, blocksize,
                                                       out_features, bias, absmax2, code2, offset);
  std::vector<at::Tensor> ys;
  std::vector<uint16_t*> outs;
  std::vector<const float*> biases;
  for (size_t i = 0; i < weights.size(); ++i) {
    ys.push_back(at::empty({M, weights[i].N}, x.options()));
    outs.push_back(reinterpret_cast<uint16_t*>(ys.back().data_ptr<at::BFloat16>()));
    biases.push_back(bf16_op_bias(present(bias[i]), weights[i].N));
  }
  std::vector<Decoded4bit> sources;
  for (const Weight4bit& w : weights) sources.push_back({w, _mm512_loadu_ps(w.code), K});
  if (M > 0) gemm_bf16<Decoded4bit>(bf16_data(x), M, K, sources, biases, outs, invariant);
  return ys;
#else
  TORCH_CHECK(false, "this build of loraserve's kernels has no bf16 code");
#endif
}

#ifdef LS_AMX
// y [M, N] = bf16(x [M, K] @ W^T + bias) for one weight `source` of N columns (gemm_bf16), x
// and bias checked by the caller.
template <class Source>
at::Tensor bf16_one_weight(const at::Tensor& x, const Source& source,
                           const c10::optional<at::Tensor>& bias, bool invariant) {
  const int64_t M = x.size(0), K = x.size(1), N = source.columns();
  const float* b = bf16_op_bias(bias, N);
  at::Tensor y = at::empty({M, N}, x.options());
  uint16_t* out = reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>());
  if (M > 0) gemm_bf16<Source>(bf16_data(x), M, K, {&source, 1}, {&b, 1}, {&out, 1}, invariant);
  return y;
}
#endif

// y [M, N] = bf16(x [M, K] @ weight [N, K]^T + bias), both bf16: fp32 sums of the exact
// products, rounded once; as linear_4bit_bf16, in tiles or by pair dot products.
at::Tensor linear_bf16(const at::Tensor& x, const at::Tensor& weight,
                       const c10::optional<at::Tensor>& bias, bool invariant) {
#ifdef LS_AMX
  check_bf16_rows(x);
  TORCH_CHECK(weight.device().is_cpu() && weight.scalar_type() == at::kBFloat16 &&
                  weight.is_contiguous() && weight.dim() == 2 && weight.size(1) == x.size(1),
              "weight must be a contiguous bfloat16 CPU tensor [N, K] sharing x's K");
  return bf16_one_weight(x, DenseBf16{bf16_data(weight), weight.size(0), x.size(1)}, bias,
                         invariant);
#else
  TORCH_CHECK(false, "this build of loraserve's kernels has no bf16 code");
#endif
}

// y [M, N] = bf16((x [M, K] @ codes [N, K]^T) * scales + bias), x bf16: linear_int8's codes
// widened to bf16 exactly, fp32 sums, as linear_bf16 computes, in AMX tiles only (a CPU without
// them widens x for linear_int8: the pair dot products' paths were not measured for codes).
at::Tensor linear_int8_bf16(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales,
                            const c10::optional<at::Tensor>& bias, bool invariant) {
#ifdef LS_AMX
  check_bf16_rows(x);
  TORCH_CHECK(amx_usable(), "linear_int8_bf16 runs in AMX tiles, which this CPU does not give");
  check_int8_weight(x, codes, scales);
  const Int8Codes source{codes.data_ptr<int8_t>(), scales.data_ptr<float>(), codes.size(0),
                         x.size(1)};
  return bf16_one_weight(x, source, bias, invariant);
#else
  TORCH_CHECK(false, "this build of loraserve's kernels has no bf16 code");
#endif
}

void check_cpu(const at::Tensor& t, at::ScalarType type, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == type && t.is_contiguous(), name,
              " must be a contiguous ", c10::toString(type), " CPU tensor");
}

// Calls f with a value of the C++ type of `t`'s elements (float, bf16 or fp16), for kernels
// that read rows, KV pools or LoRA slots of any of these dtypes; `what` names them in errors.
template <typename F>
void with_dtype(const at::Tensor& t, const char* what, F&& f) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return f(float{});
    case at::kBFloat16:
      return f(bf16{});
    case at::kHalf:
      return f(fp16{});
    default:
      TORCH_CHECK(false, what, " must be float32, bfloat16 or float16, not ",
                  c10::toString(t.scalar_type()));
  }
}

// with_dtype for a contiguous CPU tensor (checked).
template <typename F>
void with_element(const at::Tensor& t, const char* what, F&& f) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous(), what, " must be contiguous CPU tensors");
  with_dtype(t, what, f);
}

// What both attention ops take: q [rows, H, D] on the CPU, D contiguous; the pools [S, KVH, D]
// contiguous CPU tensors of one dtype, KVH dividing H.
void check_attention(const at::Tensor& q, const at::Tensor& k_pool, const at::Tensor& v_pool) {
  TORCH_CHECK(q.device().is_cpu() && q.dim() == 3 && q.stride(2) == 1,
              "q must be a CPU [rows, H, D] tensor with D contiguous");
  TORCH_CHECK(v_pool.scalar_type() == k_pool.scalar_type() && v_pool.device().is_cpu() &&
                  v_pool.is_contiguous() && k_pool.device().is_cpu() && k_pool.is_contiguous(),
              "the pools must be contiguous CPU tensors of one dtype");
  TORCH_CHECK(k_pool.dim() == 3 && k_pool.sizes() == v_pool.sizes() &&
                  q.size(2) == k_pool.size(2) && q.size(1) % k_pool.size(1) == 0,
              "q [rows, H, D] and pools [S, KVH, D] do not match");
}

// f(T{}, key scales, value scales) for the pools' element T: float, bf16 or fp16 (the scales
// null), or int8 codes, whose k_scales and v_scales [S, KVH] are contiguous float32 CPU tensors.
template <typename F>
void with_pools(const at::Tensor& k_pool, const c10::optional<at::Tensor>& k_scales,
                const c10::optional<at::Tensor>& v_scales, F&& f) {
  const bool scaled = k_scales.has_value() && k_scales->defined();
  TORCH_CHECK(scaled == (v_scales.has_value() && v_scales->defined()),
              "k_scales and v_scales go together");
  if (k_pool.scalar_type() != at::kChar) {
    TORCH_CHECK(!scaled, "only int8 pools take scales");
    return with_element(k_pool, "KV pools", [&](auto element) { f(element, nullptr, nullptr); });
  }
  TORCH_CHECK(scaled, "int8 pools need k_scales and v_scales");
  for (const at::Tensor* t : {&*k_scales, &*v_scales}) {
    check_cpu_f32(*t, "k_scales and v_scales");
    TORCH_CHECK(t->dim() == 2 && t->size(0) == k_pool.size(0) && t->size(1) == k_pool.size(1),
                "k_scales and v_scales must be [S, KVH], as the pools' first two dimensions");
  }
  f(int8_t{}, static_cast<const float*>(k_scales->data_ptr()),
    static_cast<const float*>(v_scales->data_ptr()));
}

// out [R, H, D] of q's dtype: decode attention of q [R, H, D] (float32, bfloat16 or float16; D
// contiguous, rows and heads any stride) over the paged pools [S, KVH, D] (float32, bfloat16 or
// float16, both alike; or int8 codes with their scales [S, KVH]).
at::Tensor paged_decode_attention_op(const at::Tensor& q, const at::Tensor& k_pool,
                                     const at::Tensor& v_pool, const at::Tensor& block_tables,
                                     const at::Tensor& context_lens, int64_t block_size,
                                     int64_t window, double scale,
                                     const c10::optional<at::Tensor>& k_scales,
                                     const c10::optional<at::Tensor>& v_scales) {
  check_attention(q, k_pool, v_pool);
  check_cpu(block_tables, at::kInt, "block_tables");
  check_cpu(context_lens, at::kInt, "context_lens");
  const int64_t R = q.size(0), H = q.size(1), D = q.size(2), KVH = k_pool.size(1);
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) == R && context_lens.numel() == R,
              "block_tables [R, max_blocks] and context_lens [R] must have one row per query");
  at::Tensor out = at::empty({R, H, D}, q.options());
  const QueryLayout layout{q.stride(0), q.stride(1)};
  with_dtype(q, "q", [&](auto query) {
    using Q = decltype(query);
    with_pools(k_pool, k_scales, v_scales, [&](auto element, const float* ks, const float* vs) {
      using T = decltype(element);
      paged_decode_attention(static_cast<const Q*>(q.data_ptr()), layout,
                             static_cast<const T*>(k_pool.data_ptr()),
                             static_cast<const T*>(v_pool.data_ptr()), ks, vs,
                             block_tables.data_ptr<int32_t>(), block_tables.size(1),
                             context_lens.data_ptr<int32_t>(), R, H, KVH, D, block_size, window,
                             static_cast<float>(scale), static_cast<Q*>(out.data_ptr()));
    });
  });
  return out;
}

// out's prefill rows = their queries' attention over their contexts in the pools (see
// paged_prefill_attention); out [N, H, D] contiguous, of q's dtype; the other rows untouched.
void paged_prefill_attention_op(const at::Tensor& q, at::Tensor& out, const at::Tensor& k_pool,
                                const at::Tensor& v_pool, const at::Tensor& block_tables,
                                const at::Tensor& firsts, const at::Tensor& counts,
                                const at::Tensor& starts, int64_t block_size, int64_t window,
                                double scale, const c10::optional<at::Tensor>& k_scales,
                                const c10::optional<at::Tensor>& v_scales) {
  check_attention(q, k_pool, v_pool);
  TORCH_CHECK(out.device().is_cpu() && out.is_contiguous() && out.sizes() == q.sizes() &&
                  out.scalar_type() == q.scalar_type(),
              "out must be a contiguous CPU tensor of q's shape and dtype");
  check_cpu(block_tables, at::kInt, "block_tables");
  for (const at::Tensor* t : {&firsts, &counts, &starts}) check_cpu(*t, at::kLong, "rows");
  const int64_t P = firsts.numel();
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) == P && counts.numel() == P &&
                  starts.numel() == P,
              "block_tables [P, max_blocks], firsts, counts and starts [P] must have one row "
              "per prefill row");
  const int64_t* first = firsts.data_ptr<int64_t>();
  const int64_t* count = counts.data_ptr<int64_t>();
  const int64_t* start = starts.data_ptr<int64_t>();
  for (int64_t p = 0; p < P; ++p) {
    TORCH_CHECK(count[p] >= 1 && first[p] >= 0 && first[p] + count[p] <= q.size(0) &&
                    start[p] >= 0 &&
                    start[p] + count[p] <= block_tables.size(1) * block_size,
                "prefill row ", p, " lies outside q or its block table");
  }
  const PrefillRows rows{first, count, start, block_tables.data_ptr<int32_t>(),
                         block_tables.size(1)};
  const QueryLayout layout{q.stride(0), q.stride(1)};
  with_dtype(q, "q", [&](auto query) {
    using Q = decltype(query);
    with_pools(k_pool, k_scales, v_scales, [&](auto element, const float* ks, const float* vs) {
      using T = decltype(element);
      paged_prefill_attention(static_cast<const Q*>(q.data_ptr()), layout,
                              static_cast<const T*>(k_pool.data_ptr()),
                              static_cast<const T*>(v_pool.data_ptr()), ks, vs, rows, P, q.size(1),
                              k_pool.size(1), q.size(2), block_size, window,
                              static_cast<float>(scale), static_cast<Q*>(out.data_ptr()));
    });
  });
}

// y [N, out] += the LoRA delta of x [N, in] over token segments on slots; the slots float32,
// bfloat16 or float16 (both alike), scales [S] float32 (none: every slot's scaling is folded
// into its B), narrow [S] uint8 (none: no slot holds 16-bit rows within float32 slots; the codes
// in lora.h).
void lora_delta_op(const at::Tensor& x, at::Tensor& y, const at::Tensor& lora_a,
                   const at::Tensor& lora_b, const at::Tensor& starts, const at::Tensor& ends,
                   const at::Tensor& slots, const at::Tensor& ranks,
                   const c10::optional<at::Tensor>& scales,
                   const c10::optional<at::Tensor>& narrow, bool invariant) {
  TORCH_CHECK(x.scalar_type() == y.scalar_type() && y.device().is_cpu() && y.is_contiguous(),
              "x and y must share a dtype, and y be a contiguous CPU tensor");
  TORCH_CHECK(lora_b.scalar_type() == lora_a.scalar_type() && lora_b.device().is_cpu() &&
                  lora_b.is_contiguous(),
              "lora_b must be a contiguous CPU tensor of lora_a's dtype");
  for (const at::Tensor* t : {&starts, &ends, &slots, &ranks}) check_cpu(*t, at::kLong, "segments");
  TORCH_CHECK(x.dim() == 2 && y.dim() == 2 && x.size(0) == y.size(0) &&
                  lora_a.size(2) == x.size(1) && lora_b.size(2) == y.size(1) &&
                  lora_a.size(1) == lora_b.size(1),
              "x [N, in], y [N, out], lora_a [S, R, in], lora_b [S, R, out] do not match");
  const float* scale = nullptr;
  if (scales.has_value() && scales->defined()) {
    check_cpu_f32(*scales, "scales");
    TORCH_CHECK(scales->dim() == 1 && scales->size(0) == lora_a.size(0), "scales must be [S]");
    scale = scales->data_ptr<float>();
  }
  const uint8_t* narrow_slots = nullptr;
  if (narrow.has_value() && narrow->defined()) {
    check_cpu(*narrow, at::kByte, "narrow");
    TORCH_CHECK(narrow->dim() == 1 && narrow->size(0) == lora_a.size(0), "narrow must be [S]");
    TORCH_CHECK(lora_a.scalar_type() == at::kFloat, "only float32 slots hold 16-bit rows");
    narrow_slots = narrow->data_ptr<uint8_t>();
  }
  with_element(x, "x and y", [&](auto row_element) {
    using X = decltype(row_element);
    with_element(lora_a, "LoRA slots", [&](auto element) {
      using T = decltype(element);
      lora_delta(static_cast<const X*>(x.data_ptr()), static_cast<X*>(y.data_ptr()), x.size(1),
                 y.size(1), static_cast<const T*>(lora_a.data_ptr()),
                 static_cast<const T*>(lora_b.data_ptr()), scale, narrow_slots, lora_a.size(1),
                 starts.data_ptr<int64_t>(), ends.data_ptr<int64_t>(), slots.data_ptr<int64_t>(),
                 ranks.data_ptr<int64_t>(), starts.numel(), invariant);
    });
  });
}

// Each src[i] [rows, cols] (any float dtype, any strides) -> [cols, rows] float32, times
// scale[i]: views of one new buffer.
std::vector<at::Tensor> transpose_scaled_op(at::TensorList src, at::ArrayRef<double> scale) {
  TORCH_CHECK(src.size() == scale.size(), "one scale per tensor");
  std::vector<at::Tensor> dense;
  int64_t total = 0;
  for (const at::Tensor& t : src) {
    TORCH_CHECK(t.device().is_cpu() && at::isFloatingType(t.scalar_type()) && t.dim() == 2,
                "src must be [rows, cols] floating-point CPU tensors");
    dense.push_back(t.to(at::kFloat).contiguous());
    total += t.numel();
  }
  at::Tensor buffer = at::empty({total}, at::TensorOptions().dtype(at::kFloat));
  std::vector<at::Tensor> dst;
  int64_t offset = 0;
  for (size_t i = 0; i < dense.size(); ++i) {
    const int64_t rows = dense[i].size(0), cols = dense[i].size(1);
    dst.push_back(buffer.narrow(0, offset, rows * cols).view({cols, rows}));
    transpose_scaled(dense[i].data_ptr<float>(), rows, cols, static_cast<float>(scale[i]),
                     dst.back().data_ptr<float>());
    offset += rows * cols;
  }
  return dst;
}

// The elements of every pair a[i] [r, in], b[i] [out, r] in all, once each is checked: 2-d CPU
// tensors sharing r, one scale per pair, and a dtype `dtype_ok` takes (else `dtypes` says what
// it must be).
template <class DtypeOk>
int64_t pairs_elements(at::TensorList a, at::TensorList b, at::ArrayRef<double> scale,
                       DtypeOk dtype_ok, const char* dtypes) {
  TORCH_CHECK(a.size() == b.size() && b.size() == scale.size(), "one A, B and scale per pair");
  int64_t total = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    for (const at::Tensor& t : {a[i], b[i]})
      TORCH_CHECK(t.device().is_cpu() && dtype_ok(t.scalar_type()) && t.dim() == 2,
                  "A and B must be 2-d CPU tensors, ", dtypes);
    TORCH_CHECK(a[i].size(0) == b[i].size(1), "A [r, in] and B [out, r] must share r");
    total += a[i].numel() + b[i].numel();
  }
  return total;
}

// What an adapter's pairs hold in the host tier, from a[i] [r, in] and b[i] [out, r] as PEFT
// stores them (any float dtype, any strides): a[i] copied and b[i]^T * scale[i], in float32, or
// formed in float32 and rounded to bf16 (as torch rounds: to nearest, ties to even) for bf16
// compute, all views of one new buffer; and the positions i whose A or scaled B holds a NaN or
// an infinity in that dtype, each pair checked right after it is written, while in cache.
std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<int64_t>> lora_factors_op(
    at::TensorList a, at::TensorList b, at::ArrayRef<double> scale,
    std::optional<at::ScalarType> dtype) {
  const at::ScalarType out_dtype = dtype.value_or(at::kFloat);
  TORCH_CHECK(out_dtype == at::kFloat || out_dtype == at::kBFloat16, "dtype: float32 or bf16");
  const int64_t total = pairs_elements(
      a, b, scale, [](at::ScalarType t) { return at::isFloatingType(t); }, "floating-point");
  at::Tensor buffer = at::empty({total}, at::TensorOptions().dtype(out_dtype));
  std::vector<at::Tensor> a_out, b_out;
  std::vector<int64_t> nonfinite;
  std::vector<float> wide;  // a bf16 pair in float32 before it is rounded
  int64_t offset = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    const at::Tensor a_dense = a[i].to(at::kFloat).contiguous();
    const at::Tensor b_dense = b[i].to(at::kFloat).contiguous();
    const int64_t rank = a_dense.size(0), out = b_dense.size(0), n_a = a_dense.numel();
    const int64_t n = n_a + rank * out;  // the pair's A then B, adjacent in the buffer
    a_out.push_back(buffer.narrow(0, offset, n_a).view(a_dense.sizes()));
    b_out.push_back(buffer.narrow(0, offset + n_a, rank * out).view({rank, out}));
    if (out_dtype == at::kBFloat16) wide.resize(n);
    float* pair = out_dtype == at::kFloat ? buffer.data_ptr<float>() + offset : wide.data();
    std::memcpy(pair, a_dense.data_ptr<float>(), n_a * sizeof(float));
    transpose_scaled(b_dense.data_ptr<float>(), out, rank, static_cast<float>(scale[i]),
                     pair + n_a);
    bool bad;
    if (out_dtype == at::kFloat) {
      bad = any_nonfinite(pair, n);
    } else {
      auto* rounded = static_cast<bf16*>(buffer.data_ptr()) + offset;
      for (int64_t j = 0; j < n; ++j) round_to(rounded + j, pair[j]);  // as torch rounds
      bad = max_magnitude_bits(rounded, n) >= 0x7f80;
    }
    if (bad) nonfinite.push_back(static_cast<int64_t>(i));
    offset += n;
  }
  return {a_out, b_out, nonfinite};
}

// What the host tier holds of pairs stored in 16 bits (bf16 or fp16, one dtype for all) under
// fp32 compute: a[i] [r, in] copied and b[i] [out, r] transposed, in their dtype and not
// scaled, views of one new buffer; and the positions i whose A or B holds a NaN or an infinity,
// or whose B times scale[i] leaves float32's range (the product of its largest magnitude, in
// float32, as the slot write forms it, tested by its exponent bits).
std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<int64_t>> lora_pairs_16_op(
    at::TensorList a, at::TensorList b, at::ArrayRef<double> scale) {
  TORCH_CHECK(!a.empty(), "no pairs");
  const at::ScalarType dtype = a[0].scalar_type();
  TORCH_CHECK(dtype == at::kBFloat16 || dtype == at::kHalf, "pairs must be bf16 or fp16");
  const uint16_t infinity_bits = dtype == at::kBFloat16 ? 0x7f80 : 0x7c00;
  const int64_t total = pairs_elements(
      a, b, scale, [dtype](at::ScalarType t) { return t == dtype; }, "all of one 16-bit dtype");
  at::Tensor buffer = at::empty({total}, at::TensorOptions().dtype(dtype));
  std::vector<at::Tensor> a_out, b_out;
  std::vector<int64_t> nonfinite;
  int64_t offset = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    const at::Tensor a_dense = a[i].contiguous(), b_dense = b[i].contiguous();
    const int64_t rank = a_dense.size(0), out = b_dense.size(0), n_a = a_dense.numel();
    a_out.push_back(buffer.narrow(0, offset, n_a).view(a_dense.sizes()));
    b_out.push_back(buffer.narrow(0, offset + n_a, rank * out).view({rank, out}));
    auto* a_dst = static_cast<uint16_t*>(a_out.back().data_ptr());
    std::memcpy(a_dst, a_dense.data_ptr(), n_a * sizeof(uint16_t));
    const uint16_t a_most = max_magnitude_bits(a_dst, n_a);
    const uint16_t b_most = transpose_16(static_cast<const uint16_t*>(b_dense.data_ptr()), out,
                                         rank, static_cast<uint16_t*>(b_out.back().data_ptr()));
    const float largest = dtype == at::kBFloat16 ? std::bit_cast<float>(uint32_t{b_most} << 16)
                                                 : _cvtsh_ss(b_most);
    const float scaled = largest * static_cast<float>(std::fabs(scale[i]));
    if (a_most >= infinity_bits || b_most >= infinity_bits ||
        (std::bit_cast<uint32_t>(scaled) & 0x7f800000u) == 0x7f800000u)
      nonfinite.push_back(static_cast<int64_t>(i));
    offset += n_a + rank * out;
  }
  return {a_out, b_out, nonfinite};
}

// The positions in `tensors` of those holding a NaN or an infinity.
std::vector<int64_t> nonfinite_op(at::TensorList tensors) {
  std::vector<int64_t> found;
  for (size_t i = 0; i < tensors.size(); ++i) {
    check_cpu_f32(tensors[i], "every tensor");
    if (any_nonfinite(tensors[i].data_ptr<float>(), tensors[i].numel()))
      found.push_back(static_cast<int64_t>(i));
  }
  return found;
}

// argmax [B] int64, max [B] and logsumexp [B] of each row of scores [B, V].
std::tuple<at::Tensor, at::Tensor, at::Tensor> score_stats_op(const at::Tensor& scores) {
  check_cpu_f32(scores, "scores");
  TORCH_CHECK(scores.dim() == 2 && scores.size(1) >= 1 && scores.size(1) < (int64_t{1} << 31),
              "scores must be [B, V] with 1 <= V < 2^31");
  const int64_t B = scores.size(0), V = scores.size(1);
  at::Tensor argmax = at::empty({B}, scores.options().dtype(at::kLong));
  at::Tensor max = at::empty({B}, scores.options());
  at::Tensor logsumexp = at::empty({B}, scores.options());
  score_stats(scores.data_ptr<float>(), B, V, argmax.data_ptr<int64_t>(), max.data_ptr<float>(),
              logsumexp.data_ptr<float>());
  return {argmax, max, logsumexp};
}

// y [M, D] = Llama's RMSNorm of x [M, D] with weight [D].
at::Tensor rms_norm_op(const at::Tensor& x, const at::Tensor& weight, double eps) {
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() && weight.is_contiguous() &&
                  weight.device().is_cpu(),
              "weight must be a contiguous CPU tensor of x's dtype");
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 1 && weight.size(0) == x.size(1),
              "x must be [M, D] and weight [D]");
  at::Tensor y = at::empty(x.sizes(), x.options());
  with_element(x, "x", [&](auto element) {
    using X = decltype(element);
    rms_norm(static_cast<const X*>(x.data_ptr()), x.size(0), x.size(1),
             static_cast<const X*>(weight.data_ptr()), static_cast<float>(eps),
             static_cast<X*>(y.data_ptr()));
  });
  return y;
}

HeadsLayout heads_layout(const at::Tensor& t) {
  return HeadsLayout{t.size(0), t.size(1), t.size(2), t.size(3),
                     t.stride(0), t.stride(1), t.stride(2)};
}

// (q, k) rotated: each [B, H, S, D] with D contiguous (q and k may differ in H); cos and sin
// [B or 1, S, D] contiguous; all four float32, bfloat16 or float16 alike. The outputs keep
// their input's layout.
std::tuple<at::Tensor, at::Tensor> rotary_op(const at::Tensor& q, const at::Tensor& k,
                                             const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(cos.dim() == 3 && cos.sizes() == sin.sizes() && cos.size(2) % 2 == 0 &&
                  sin.scalar_type() == cos.scalar_type() && sin.is_contiguous(),
              "cos and sin must be contiguous [B, S, D] of one shape and dtype, D even");
  std::vector<at::Tensor> outputs;
  for (const at::Tensor& x : {q, k}) {
    TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == cos.scalar_type() && x.dim() == 4 &&
                    x.stride(3) == 1,
                "q and k must be CPU [B, H, S, D] tensors of cos's dtype with D contiguous");
    TORCH_CHECK((cos.size(0) == x.size(0) || cos.size(0) == 1) && cos.size(1) == x.size(2) &&
                    cos.size(2) == x.size(3),
                "cos and sin must be [B or 1, S, D] for q and k [B, H, S, D]");
    at::Tensor out = at::empty_like(x);  // x's layout where it is dense, else contiguous
    with_element(cos, "cos and sin", [&](auto element) {
      using X = decltype(element);
      rotate(static_cast<const X*>(x.data_ptr()), heads_layout(x),
             static_cast<const X*>(cos.data_ptr()), static_cast<const X*>(sin.data_ptr()),
             cos.size(0) == 1 ? 0 : cos.stride(0), static_cast<X*>(out.data_ptr()),
             heads_layout(out));
    });
    outputs.push_back(out);
  }
  return {outputs[0], outputs[1]};
}

// slots [N] as an index into pool [S, KVH, D] for states [KVH, N, D] (on the CPU, D contiguous),
// every slot checked to lie inside it.
const int64_t* write_slots(const at::Tensor& pool, const at::Tensor& slots,
                           const at::Tensor& states) {
  check_cpu(slots, at::kLong, "slots");
  TORCH_CHECK(states.device().is_cpu() && states.dim() == 3 && states.stride(2) == 1,
              "states must be a CPU [KVH, N, D] tensor with D contiguous");
  TORCH_CHECK(pool.dim() == 3 && states.size(0) == pool.size(1) &&
                  states.size(2) == pool.size(2) && slots.dim() == 1 &&
                  slots.size(0) == states.size(1),
              "pool [S, KVH, D], slots [N] and states [KVH, N, D] disagree");
  const int64_t* index = slots.data_ptr<int64_t>();
  for (int64_t n = 0; n < slots.size(0); ++n)
    TORCH_CHECK(index[n] >= 0 && index[n] < pool.size(0), "slot ", index[n], " is outside");
  return index;
}

// pool [S, KVH, D][slots[n]] = states [KVH, N, D][:, n] (states strided, D contiguous).
void kv_write_op(at::Tensor& pool, const at::Tensor& slots, const at::Tensor& states) {
  const int64_t* index = write_slots(pool, slots, states);
  TORCH_CHECK(states.scalar_type() == pool.scalar_type(), "states must be of the pool's dtype");
  with_element(pool, "KV pools", [&](auto element) {
    using T = decltype(element);
    kv_write(static_cast<T*>(pool.data_ptr()), index, static_cast<const T*>(states.data_ptr()),
             states.size(0), states.size(1), states.size(2), states.stride(0), states.stride(1));
  });
}

// The same into an int8 pool: each token's head quantized (kv_write_int8), its codes at
// pool [S, KVH, D][slots[n], h] and its scale at scales [S, KVH][slots[n], h]; states float32,
// bfloat16 or float16.
void kv_write_int8_op(at::Tensor& pool, at::Tensor& scales, const at::Tensor& slots,
                      const at::Tensor& states) {
  const int64_t* index = write_slots(pool, slots, states);
  TORCH_CHECK(pool.device().is_cpu() && pool.is_contiguous() && pool.scalar_type() == at::kChar,
              "pool must be a contiguous int8 CPU tensor");
  check_cpu_f32(scales, "scales");
  TORCH_CHECK(scales.dim() == 2 && scales.size(0) == pool.size(0) &&
                  scales.size(1) == pool.size(1),
              "scales must be [S, KVH], as the pool's first two dimensions");
  with_dtype(states, "states", [&](auto element) {
    using S = decltype(element);
    kv_write_int8(static_cast<int8_t*>(pool.data_ptr()), scales.data_ptr<float>(), index,
                  static_cast<const S*>(states.data_ptr()), states.size(0), states.size(1),
                  states.size(2), states.stride(0), states.stride(1));
  });
}

// From now on, torch ops called from this thread run on it alone: for helper threads, such as
// the adapter loader, whose ops would otherwise start a second OpenMP team. Beyond making their
// small ops wait on the engine's threads, a second team makes more OpenMP threads than CPUs on
// a small machine, and libgomp then stops spinning between parallel regions for every team:
// each of the engine's parallel ops paid a thread wake-up (a multi-LoRA decode step took 88 ms
// instead of 77; docs/performance.md, "Threads").
void serial_thread() {
  // torch sizes a thread's team at its first parallel op, once per thread in each library that
  // inlines at::parallel_for: both happen now, so neither undoes the size set below later.
  at::get_num_threads();                                // libtorch's
  at::parallel_for(0, 1, 1, [](int64_t, int64_t) {});  // this library's
  omp_set_num_threads(1);
  // MKL's GEMMs size their team by MKL's own setting, global unless set for the thread (the
  // C entry point; mkl_set_num_threads_local is the Fortran one, taking a pointer).
  using SetLocal = int (*)(int);
  auto set_local = reinterpret_cast<SetLocal>(dlsym(RTLD_DEFAULT, "MKL_Set_Num_Threads_Local"));
  if (set_local != nullptr) set_local(1);
}

// (calls, seconds): the parallel calls that ran on a team so far, and how long their calling
// thread waited at their ends for the rest of the team (TeamWaits).
std::tuple<int64_t, double> team_waits_op() {
  const TeamWaits& waits = team_waits();
  return {waits.calls.load(std::memory_order_relaxed),
          waits.waited_ns.load(std::memory_order_relaxed) * 1e-9};
}

}  // namespace

TORCH_LIBRARY(loraserve, m) {
  m.def("serial_thread() -> ()", &serial_thread);
  m.def("team_waits() -> (int, float)", &team_waits_op);
  m.def("linear_f32(Tensor x, Tensor weight, Tensor? bias, bool invariant=False) -> Tensor");
  m.def(
      "linear_int8(Tensor x, Tensor codes, Tensor scales, Tensor? bias, bool invariant=False) "
      "-> Tensor");
  m.def(
      "linear_int8_bf16(Tensor x, Tensor codes, Tensor scales, Tensor? bias, "
      "bool invariant=False) -> Tensor");
  m.def(
      "linear_4bit(Tensor x, Tensor packed, Tensor absmax, Tensor code, int blocksize, "
      "int out_features, Tensor? bias, Tensor? absmax2=None, Tensor? code2=None, "
      "float offset=0.0, bool invariant=False) -> Tensor");
  m.def(
      "linear_4bit_group(Tensor x, Tensor[] packed, Tensor[] absmax, Tensor[] code, "
      "int[] blocksize, int[] out_features, Tensor[] bias, Tensor[] absmax2, Tensor[] code2, "
      "float[] offset, bool invariant=False) -> Tensor[]");
  m.def("amx_usable() -> bool", &amx_usable_op);
  m.def("bf16_pairs_usable() -> bool", &bf16_pairs_usable_op);
  m.def("linear_bf16(Tensor x, Tensor weight, Tensor? bias, bool invariant=False) -> Tensor");
  m.def(
      "linear_4bit_bf16(Tensor x, Tensor[] packed, Tensor[] absmax, Tensor[] code, "
      "int[] blocksize, int[] out_features, Tensor[] bias, Tensor[] absmax2, Tensor[] code2, "
      "float[] offset, bool invariant=False) -> Tensor[]");
  m.def(
      "paged_decode_attention(Tensor q, Tensor k_pool, Tensor v_pool, Tensor block_tables, "
      "Tensor context_lens, int block_size, int window, float scale, Tensor? k_scales=None, "
      "Tensor? v_scales=None) -> Tensor");
  m.def(
      "paged_prefill_attention_(Tensor q, Tensor(a!) out, Tensor k_pool, Tensor v_pool, "
      "Tensor block_tables, Tensor firsts, Tensor counts, Tensor starts, int block_size, "
      "int window, float scale, Tensor? k_scales=None, Tensor? v_scales=None) -> ()");
  m.def(
      "lora_delta_(Tensor x, Tensor(a!) y, Tensor lora_a, Tensor lora_b, Tensor starts, "
      "Tensor ends, Tensor slots, Tensor ranks, Tensor? scales=None, Tensor? narrow=None, "
      "bool invariant=False) -> ()");
  m.def("transpose_scaled(Tensor[] src, float[] scale) -> Tensor[]");
  m.def("nonfinite(Tensor[] tensors) -> int[]");
  m.def("lora_factors(Tensor[] a, Tensor[] b, float[] scale, ScalarType? dtype=None) -> "
        "(Tensor[], Tensor[], int[])");
  m.def("lora_pairs_16(Tensor[] a, Tensor[] b, float[] scale) -> (Tensor[], Tensor[], int[])");
  m.def("score_stats(Tensor scores) -> (Tensor, Tensor, Tensor)");
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("kv_write_(Tensor(a!) pool, Tensor slots, Tensor states) -> ()");
  m.def("kv_write_int8_(Tensor(a!) pool, Tensor(b!) scales, Tensor slots, Tensor states) -> ()");
  m.def("rotary(Tensor q, Tensor k, Tensor cos, Tensor sin) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(loraserve, CPU, m) {
  m.impl("linear_f32", &linear_f32);
  m.impl("linear_int8", &linear_int8);
  m.impl("linear_int8_bf16", &linear_int8_bf16);
  m.impl("linear_4bit", &linear_4bit);
  m.impl("linear_4bit_group", &linear_4bit_group);
  m.impl("linear_4bit_bf16", &linear_4bit_bf16);
  m.impl("linear_bf16", &linear_bf16);
  m.impl("paged_decode_attention", &paged_decode_attention_op);
  m.impl("paged_prefill_attention_", &paged_prefill_attention_op);
  m.impl("lora_delta_", &lora_delta_op);
  m.impl("transpose_scaled", &transpose_scaled_op);
  m.impl("nonfinite", &nonfinite_op);
  m.impl("lora_factors", &lora_factors_op);
  m.impl("lora_pairs_16", &lora_pairs_16_op);
  m.impl("score_stats", &score_stats_op);
  m.impl("rms_norm", &rms_norm_op);
  m.impl("kv_write_", &kv_write_op);
  m.impl("kv_write_int8_", &kv_write_int8_op);
  m.impl("rotary", &rotary_op);
}
