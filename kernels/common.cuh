// Helpers shared by every kernel: dtype loads/stores, warp reductions, and the NF4 code book.
// Included after portable.cuh, so the same code builds under nvcc and the CPU emulation.
#pragma once

#include "portable.cuh"
#include "abi.h"

namespace ql {

constexpr unsigned kFullMask = 0xffffffffu;

// f32(1e-38): the floor bitsandbytes clamps a block's absmax to before taking its reciprocal.
__device__ __forceinline__ float absmax_floor() { return __uint_as_float(0x006ce3eeu); }

// max(a, b) that propagates NaN from `a` as torch.max does (fmaxf would drop it).
__device__ __forceinline__ float nan_max(float a, float b) { return (a != a || a > b) ? a : b; }

// NaN-propagating max over the 32 lanes of a full warp; every lane gets the result.
__device__ __forceinline__ float warp_reduce_nan_max(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = nan_max(__shfl_xor_sync(kFullMask, v, off), v);
  return v;
}

// Element `i` of a buffer of QlDtype `dtype`, widened to f32 (exact for every dtype).
__device__ __forceinline__ float load_as_f32(const void* p, int64_t i, int dtype) {
  if (dtype == QL_DTYPE_BF16) return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
  if (dtype == QL_DTYPE_F16) return __half2float(static_cast<const __half*>(p)[i]);
  return static_cast<const float*>(p)[i];
}

// Store an f32 value into element `i` of a buffer of QlDtype `dtype`, rounding to nearest even.
__device__ __forceinline__ void store_from_f32(void* p, int64_t i, int dtype, float v) {
  if (dtype == QL_DTYPE_BF16) {
    static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v);
  } else if (dtype == QL_DTYPE_F16) {
    static_cast<__half*>(p)[i] = __float2half_rn(v);
  } else {
    static_cast<float*>(p)[i] = v;
  }
}

}  // namespace ql
