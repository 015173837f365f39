// NF4 blockwise quantization and dequantization, bit-compatible with bitsandbytes: blocks of
// `blocksize` consecutive elements of the flattened tensor, one f32 absmax per block (optionally
// double quantized to u8 + nested f32 absmax + offset), two codes per byte, first in the high nibble.
#include "common.cuh"

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

// Index of the code a normalized value maps to, as torch.bucketize(x, midpoints) does: the number
// of midpoints strictly below x, so a value exactly on a midpoint takes the lower code; NaN sorts
// after everything, to the last code.
__device__ __forceinline__ uint32_t nf4_bucket(float x, const float (&mid)[15]) {
  if (x != x) return 15u;
  uint32_t q = 0;
#pragma unroll
  for (int i = 0; i < 15; ++i) q += x > mid[i] ? 1u : 0u;
  return q;
}

// Scales a value into [-1, 1] exactly as bitsandbytes does: full blocks multiply by the f32
// reciprocal of the absmax, the partial last block divides by it. NaN stays NaN (torch.clamp).
__device__ __forceinline__ float nf4_normalize(float x, bool partial, float denom, float inv) {
  const float s = partial ? __fdiv_rn(x, denom) : __fmul_rn(x, inv);
  return s != s ? s : fminf(fmaxf(s, -1.0f), 1.0f);
}

}  // namespace

// One warp per quantization block: a warp-wide absmax, then each lane packs pairs of elements.
extern "C" __global__ void __launch_bounds__(kThreads) k_nf4_quantize(const QlNf4QuantizeParams p) {
  const int lane = threadIdx.x & 31;
  const int64_t nblocks = (p.n + p.blocksize - 1) / p.blocksize;
  const int64_t qblock = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (qblock >= nblocks) return;  // uniform per warp
  const int64_t start = qblock * p.blocksize;
  const int64_t end = min(start + static_cast<int64_t>(p.blocksize), p.n);

  float amax = 0.0f;
  for (int64_t i = start + lane; i < end; i += 32) {
    amax = ql::nan_max(fabsf(ql::load_as_f32(p.input, i, p.in_dtype)), amax);
  }
  amax = ql::warp_reduce_nan_max(amax);

  const bool partial = end - start < p.blocksize;
  const float denom = amax != amax ? amax : fmaxf(amax, ql::absmax_floor());
  const float inv = __frcp_rn(denom);
  // bitsandbytes stores the unclamped absmax of a full block but the clamped one of the tail.
  if (lane == 0) p.absmax[qblock] = partial ? denom : amax;

  float mid[15];
#pragma unroll
  for (int i = 0; i < 15; ++i) mid[i] = __fmul_rn(__fadd_rn(__ldg(&p.code[i]), __ldg(&p.code[i + 1])), 0.5f);

  for (int64_t j = start / 2 + lane; j < (end + 1) / 2; j += 32) {
    const int64_t i0 = 2 * j;
    const float x0 = ql::load_as_f32(p.input, i0, p.in_dtype);
    // An odd tail is padded with a zero *after* scaling, which lands on the code of 0.0.
    const float x1 = i0 + 1 < end ? ql::load_as_f32(p.input, i0 + 1, p.in_dtype) : 0.0f;
    const uint32_t q0 = nf4_bucket(nf4_normalize(x0, partial, denom, inv), mid);
    const uint32_t q1 = nf4_bucket(nf4_normalize(x1, partial, denom, inv), mid);
    p.packed[j] = static_cast<uint8_t>((q0 << 4) | q1);
  }
}
QL_EMU_ENTRY(k_nf4_quantize, QlNf4QuantizeParams)

// Each thread expands 4 packed bytes into 8 elements, which always share one quantization block
// (block sizes are multiples of 8), so the block scale is computed once per thread.
extern "C" __global__ void __launch_bounds__(kThreads) k_nf4_dequantize(const QlNf4DequantizeParams p) {
  QL_SHARED_ARRAY(float, s_code, 16);
  if (threadIdx.x < 16) s_code[threadIdx.x] = __ldg(&p.code[threadIdx.x]);
  __syncthreads();

  const int64_t npacked = (p.n + 1) / 2;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t * 4 < npacked;
       t += stride) {
    const int64_t byte0 = t * 4;
    const int64_t elem0 = byte0 * 2;
    const int64_t b = elem0 / p.blocksize;
    float scale;
    if (p.absmax != nullptr) {
      scale = __ldg(&p.absmax[b]);
    } else {
      // Two roundings in this order (no fused multiply-add), as bitsandbytes dequantizes the
      // 8-bit scale and then adds the offset in a separate f32 op.
      const float nested = __ldg(&p.nested_code[__ldg(&p.absmax_q[b])]);
      scale = __fadd_rn(__fmul_rn(nested, __ldg(&p.nested_absmax[b / p.nested_blocksize])),
                        p.nested_offset);
    }

    uint32_t bytes = 0;
    const bool whole = byte0 + 4 <= npacked;
    if (whole && (reinterpret_cast<uintptr_t>(p.packed + byte0) & 3) == 0) {
      bytes = __ldg(reinterpret_cast<const uint32_t*>(p.packed + byte0));
    } else {
      for (int k = 0; k < 4 && byte0 + k < npacked; ++k) bytes |= uint32_t(__ldg(&p.packed[byte0 + k])) << (8 * k);
    }
    float v[8];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const uint32_t byte = (bytes >> (8 * k)) & 0xffu;
      v[2 * k] = __fmul_rn(s_code[byte >> 4], scale);
      v[2 * k + 1] = __fmul_rn(s_code[byte & 0xfu], scale);
    }

    const bool full8 = elem0 + 8 <= p.n;
    if (full8 && p.out_dtype == QL_DTYPE_F32 &&
        (reinterpret_cast<uintptr_t>(static_cast<float*>(p.out) + elem0) & 15) == 0) {
      float4* o = reinterpret_cast<float4*>(static_cast<float*>(p.out) + elem0);
      o[0] = make_float4(v[0], v[1], v[2], v[3]);
      o[1] = make_float4(v[4], v[5], v[6], v[7]);
    } else if (full8 && p.out_dtype == QL_DTYPE_BF16 &&
               (reinterpret_cast<uintptr_t>(static_cast<__nv_bfloat16*>(p.out) + elem0) & 15) == 0) {
      uint32_t w[4];
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        w[k] = uint32_t(__bfloat16_as_ushort(__float2bfloat16_rn(v[2 * k]))) |
               (uint32_t(__bfloat16_as_ushort(__float2bfloat16_rn(v[2 * k + 1]))) << 16);
      }
      *reinterpret_cast<uint4*>(static_cast<__nv_bfloat16*>(p.out) + elem0) = make_uint4(w[0], w[1], w[2], w[3]);
    } else {
      for (int k = 0; k < 8 && elem0 + k < p.n; ++k) ql::store_from_f32(p.out, elem0 + k, p.out_dtype, v[k]);
    }
  }
}
QL_EMU_ENTRY(k_nf4_dequantize, QlNf4DequantizeParams)
