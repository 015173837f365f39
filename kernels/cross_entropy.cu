// Chunked causal-LM cross-entropy over `rows` logit rows [rows, vocab] (f32 or bf16), one block
// per row: the forward writes each row's logsumexp and loss (f32), the backward overwrites the
// logits in place with dlogits = (softmax - onehot(label)) * grad_scale. Labels of -100 are ignored.
#include "common.cuh"

namespace {

constexpr int kMaxThreads = 512;
constexpr int kMaxWarps = kMaxThreads / 32;
constexpr int kIgnoreIndex = -100;

__device__ __forceinline__ float neg_inf() { return __int_as_float(static_cast<int>(0xff800000u)); }
__device__ __forceinline__ float quiet_nan() { return __int_as_float(0x7fc00000); }

// Element access for one logits dtype, with 16-byte vector loads and stores of kVec elements.
template <int kDtype>
struct Logits;

template <>
struct Logits<QL_DTYPE_F32> {
  static constexpr int kVec = 4;
  __device__ static float load(const void* p, int64_t i) { return static_cast<const float*>(p)[i]; }
  __device__ static void store(void* p, int64_t i, float v) { static_cast<float*>(p)[i] = v; }
  __device__ static void load_vec(const void* p, int64_t i, float v[kVec]) {
    const float4 f = *reinterpret_cast<const float4*>(static_cast<const float*>(p) + i);
    v[0] = f.x, v[1] = f.y, v[2] = f.z, v[3] = f.w;
  }
  __device__ static void store_vec(void* p, int64_t i, const float v[kVec]) {
    *reinterpret_cast<float4*>(static_cast<float*>(p) + i) = make_float4(v[0], v[1], v[2], v[3]);
  }
};

template <>
struct Logits<QL_DTYPE_BF16> {
  static constexpr int kVec = 8;
  __device__ static float load(const void* p, int64_t i) {
    return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
  }
  __device__ static void store(void* p, int64_t i, float v) {
    static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v);
  }
  __device__ static uint32_t pack(float lo, float hi) {
    return static_cast<uint32_t>(__bfloat16_as_ushort(__float2bfloat16_rn(lo))) |
           (static_cast<uint32_t>(__bfloat16_as_ushort(__float2bfloat16_rn(hi))) << 16);
  }
  __device__ static void load_vec(const void* p, int64_t i, float v[kVec]) {
    const uint4 u = *reinterpret_cast<const uint4*>(static_cast<const uint16_t*>(p) + i);
    const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      v[2 * j] = __uint_as_float(w[j] << 16);
      v[2 * j + 1] = __uint_as_float(w[j] & 0xffff0000u);
    }
  }
  __device__ static void store_vec(void* p, int64_t i, const float v[kVec]) {
    *reinterpret_cast<uint4*>(static_cast<uint16_t*>(p) + i) =
        make_uint4(pack(v[0], v[1]), pack(v[2], v[3]), pack(v[4], v[5]), pack(v[6], v[7]));
  }
};

// True when every row starts on a 16-byte boundary, so rows can be read in kVec-element vectors.
template <int kDtype>
__device__ __forceinline__ bool rows_vectorizable(const void* logits, int vocab) {
  return vocab % Logits<kDtype>::kVec == 0 && (reinterpret_cast<uintptr_t>(logits) & 15u) == 0;
}

// Online softmax normalizer: (m, s) stands for s * exp(m) = sum of exp(x) over the elements seen.
// A -inf logit adds nothing; a NaN makes s NaN (m never becomes NaN, since NaN > m is false).
__device__ __forceinline__ void online_add(float& m, float& s, float x) {
  if (x > m) {
    s = s * expf(m - x) + 1.0f;
    m = x;
  } else if (x != neg_inf()) {
    s += expf(x - m);
  }
}

// Merges (m2, s2) into (m, s); m2 == -inf means the other side saw nothing (s2 == 0).
__device__ __forceinline__ void merge(float& m, float& s, float m2, float s2) {
  if (m2 > m) {
    s = s * expf(m - m2) + s2;
    m = m2;
  } else if (m2 != neg_inf()) {
    s += s2 * expf(m2 - m);
  }
}

template <int kDtype, typename Smem>
__device__ __forceinline__ void forward_row(const QlCrossEntropyForwardParams& p, int64_t row, Smem& s_m,
                                            Smem& s_s) {
  using L = Logits<kDtype>;
  const int tx = static_cast<int>(threadIdx.x), nt = static_cast<int>(blockDim.x);
  const int64_t base = row * p.vocab;
  float m = neg_inf(), s = 0.0f;
  if (rows_vectorizable<kDtype>(p.logits, p.vocab)) {
    for (int c = L::kVec * tx; c < p.vocab; c += L::kVec * nt) {
      float v[L::kVec];
      L::load_vec(p.logits, base + c, v);
#pragma unroll
      for (int j = 0; j < L::kVec; ++j) online_add(m, s, v[j]);
    }
  } else {
    for (int c = tx; c < p.vocab; c += nt) online_add(m, s, L::load(p.logits, base + c));
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const float m2 = __shfl_xor_sync(ql::kFullMask, m, off);
    const float s2 = __shfl_xor_sync(ql::kFullMask, s, off);
    merge(m, s, m2, s2);
  }
  if ((tx & 31) == 0) {
    s_m[tx >> 5] = m;
    s_s[tx >> 5] = s;
  }
  __syncthreads();
  if (tx != 0) return;
  // Warps merged in order by one thread: the result does not depend on scheduling.
  m = s_m[0];
  s = s_s[0];
  for (int w = 1; w < nt >> 5; ++w) {
    const float m2 = s_m[w];
    const float s2 = s_s[w];
    merge(m, s, m2, s2);
  }
  const float log_s = logf(s);
  p.lse[row] = m + log_s;
  const int label = __ldg(&p.labels[row]);
  // (m - x[label]) + log(s) keeps the loss accurate when it is small next to the logits.
  p.losses[row] =
      (label >= 0 && label < p.vocab) ? (m - L::load(p.logits, base + label)) + log_s : quiet_nan();
}

template <int kDtype>
__device__ __forceinline__ void backward_row(const QlCrossEntropyBackwardParams& p, int64_t row) {
  using L = Logits<kDtype>;
  const int tx = static_cast<int>(threadIdx.x), nt = static_cast<int>(blockDim.x);
  const int64_t base = row * p.vocab;
  const int label = __ldg(&p.labels[row]);
  const bool ignored = label == kIgnoreIndex;
  // An out-of-range label poisons its row with NaN instead of being silently dropped.
  const float lse = (label >= 0 && label < p.vocab) ? __ldg(&p.lse[row]) : quiet_nan();
  const float scale = ignored ? 0.0f : p.grad_scale;
  if (rows_vectorizable<kDtype>(p.logits, p.vocab)) {
    for (int c = L::kVec * tx; c < p.vocab; c += L::kVec * nt) {
      float v[L::kVec];
      if (ignored) {
#pragma unroll
        for (int j = 0; j < L::kVec; ++j) v[j] = 0.0f;
      } else {
        L::load_vec(p.logits, base + c, v);
#pragma unroll
        for (int j = 0; j < L::kVec; ++j) {
          const float prob = expf(v[j] - lse);
          v[j] = (c + j == label ? prob - 1.0f : prob) * scale;
        }
      }
      L::store_vec(p.logits, base + c, v);
    }
  } else {
    for (int c = tx; c < p.vocab; c += nt) {
      float d = 0.0f;
      if (!ignored) {
        const float prob = expf(L::load(p.logits, base + c) - lse);
        d = (c == label ? prob - 1.0f : prob) * scale;
      }
      L::store(p.logits, base + c, d);
    }
  }
}

}  // namespace

// Forward: block b reduces row b. Each thread folds its elements (16-byte vectors when rows are
// aligned) into an online (max, sum-exp) pair in f32; the pairs are merged across the warp with
// shuffles and across warps through shared memory, then thread 0 writes lse = max + log(sum) and
// the loss. Rows labelled -100 are skipped: loss 0, lse 0. A label outside [0, vocab) gives NaN.
extern "C" __global__ void __launch_bounds__(kMaxThreads) k_cross_entropy_fwd(const QlCrossEntropyForwardParams p) {
  QL_SHARED_ARRAY(float, s_m, kMaxWarps);
  QL_SHARED_ARRAY(float, s_s, kMaxWarps);
  const int64_t row = blockIdx.x;
  if (row >= p.rows) return;
  // Block-uniform: the whole block leaves before any barrier.
  if (__ldg(&p.labels[row]) == kIgnoreIndex) {
    if (threadIdx.x == 0) p.lse[row] = p.losses[row] = 0.0f;
    return;
  }
  if (p.dtype == QL_DTYPE_BF16) {
    forward_row<QL_DTYPE_BF16>(p, row, s_m, s_s);
  } else {
    forward_row<QL_DTYPE_F32>(p, row, s_m, s_s);
  }
}
QL_EMU_ENTRY(k_cross_entropy_fwd, QlCrossEntropyForwardParams)

// Backward in place: block b overwrites row b's logits with (exp(x - lse) - onehot(label)) *
// grad_scale, rounded once to the logits dtype; rows labelled -100 become 0. Each element is read
// and written by the same thread, so no other buffer of [rows, vocab] is needed.
extern "C" __global__ void __launch_bounds__(kMaxThreads) k_cross_entropy_bwd(const QlCrossEntropyBackwardParams p) {
  const int64_t row = blockIdx.x;
  if (row >= p.rows) return;
  if (p.dtype == QL_DTYPE_BF16) {
    backward_row<QL_DTYPE_BF16>(p, row);
  } else {
    backward_row<QL_DTYPE_F32>(p, row);
  }
}
QL_EMU_ENTRY(k_cross_entropy_bwd, QlCrossEntropyBackwardParams)
