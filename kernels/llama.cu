// Llama hot ops, forward and backward: RMSNorm over rows [rows, h], rotate-half RoPE in place on
// q [tokens, q_heads, head_dim] / k [tokens, kv_heads, head_dim], and SwiGLU on [n]. Inputs and
// outputs are f32, bf16 or f16 (QlDtype); all arithmetic is f32, rounded once on store.
#include "common.cuh"

namespace {

constexpr int kMaxBlockThreads = 1024;
constexpr int kMaxWarps = kMaxBlockThreads / 32;
constexpr int kElementwiseThreads = 256;

// Rounds an f32 to `dtype` and back, as a cast to the input dtype does in PyTorch.
__device__ __forceinline__ float round_to(float v, int dtype) {
  if (dtype == QL_DTYPE_BF16) return __bfloat162float(__float2bfloat16_rn(v));
  if (dtype == QL_DTYPE_F16) return __half2float(__float2half_rn(v));
  return v;
}

// True when every pointer is aligned for 4-element vector accesses of `dtype` and rows of `h`
// elements keep that alignment; the same for every thread of a launch.
__device__ __forceinline__ bool vec4_ok(const void* a, const void* b, const void* c, int h, int dtype) {
  const uintptr_t mask = dtype == QL_DTYPE_F32 ? 15u : 7u;
  return h % 4 == 0 && ((reinterpret_cast<uintptr_t>(a) | reinterpret_cast<uintptr_t>(b) |
                         reinterpret_cast<uintptr_t>(c)) & mask) == 0;
}

__device__ __forceinline__ float half_bits_to_f32(uint32_t bits, int dtype) {
  if (dtype == QL_DTYPE_BF16) return __uint_as_float(bits << 16);
  return __half2float(__ushort_as_half(static_cast<unsigned short>(bits)));
}

__device__ __forceinline__ uint32_t f32_to_half_bits(float v, int dtype) {
  if (dtype == QL_DTYPE_BF16) return __bfloat16_as_ushort(__float2bfloat16_rn(v));
  return __half_as_ushort(__float2half_rn(v));
}

// Elements i..i+3 (i a multiple of 4, buffer aligned as vec4_ok checks) in one 16- or 8-byte load.
__device__ __forceinline__ void load4(const void* p, int64_t i, int dtype, float v[4]) {
  if (dtype == QL_DTYPE_F32) {
    const float4 f = *reinterpret_cast<const float4*>(static_cast<const float*>(p) + i);
    v[0] = f.x, v[1] = f.y, v[2] = f.z, v[3] = f.w;
  } else {
    const uint2 u = *reinterpret_cast<const uint2*>(static_cast<const uint16_t*>(p) + i);
    v[0] = half_bits_to_f32(u.x & 0xffffu, dtype), v[1] = half_bits_to_f32(u.x >> 16, dtype);
    v[2] = half_bits_to_f32(u.y & 0xffffu, dtype), v[3] = half_bits_to_f32(u.y >> 16, dtype);
  }
}

__device__ __forceinline__ void store4(void* p, int64_t i, int dtype, const float v[4]) {
  if (dtype == QL_DTYPE_F32) {
    *reinterpret_cast<float4*>(static_cast<float*>(p) + i) = make_float4(v[0], v[1], v[2], v[3]);
  } else {
    *reinterpret_cast<uint2*>(static_cast<uint16_t*>(p) + i) =
        make_uint2(f32_to_half_bits(v[0], dtype) | (f32_to_half_bits(v[1], dtype) << 16),
                   f32_to_half_bits(v[2], dtype) | (f32_to_half_bits(v[3], dtype) << 16));
  }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(ql::kFullMask, v, off);
  return v;
}

// Sum of `v` over the blockDim.x threads that share a row (threadIdx.y); every one gets the
// result. A row is one warp, or the whole block (blockDim.y == 1), in which case this contains
// block barriers and must be reached by every thread. The warp sums are added in warp order, so
// the result does not depend on scheduling.
template <typename WarpSums>
__device__ __forceinline__ float row_sum(float v, WarpSums& s_warp) {
  v = warp_sum(v);
  if (blockDim.x == 32) return v;
  const int warp = static_cast<int>(threadIdx.x) >> 5;
  if ((threadIdx.x & 31) == 0) s_warp[warp] = v;
  __syncthreads();
  float total = 0.0f;
  for (int i = 0; i < static_cast<int>(blockDim.x) >> 5; ++i) {
    const float w = s_warp[i];
    total += w;
  }
  __syncthreads();  // s_warp is reused by the next call
  return total;
}

// dy, x (row elements base + c ..) and w (columns c ..) of the RMSNorm backward: four of each
// through vector loads, or one each with the other three zero (so they add nothing to a sum).
__device__ __forceinline__ void load_dy_x_w(const QlRmsNormBackwardParams& p, int64_t base, int c, bool vec,
                                            float dy[4], float x[4], float w[4]) {
  if (vec) {
    load4(p.dy, base + c, p.dtype, dy);
    load4(p.x, base + c, p.dtype, x);
    load4(p.w, c, p.dtype, w);
    return;
  }
#pragma unroll
  for (int j = 1; j < 4; ++j) dy[j] = x[j] = w[j] = 0.0f;
  dy[0] = ql::load_as_f32(p.dy, base + c, p.dtype);
  x[0] = ql::load_as_f32(p.x, base + c, p.dtype);
  w[0] = ql::load_as_f32(p.w, c, p.dtype);
}

__device__ __forceinline__ float sigmoid(float g) { return 1.0f / (1.0f + expf(-g)); }

}  // namespace

// RMSNorm forward. Block (threads_per_row, rows_per_block): a warp per row for h <= 1024 (four
// rows per block), otherwise one block per row. Two passes over the row (the second re-reads x
// from L1/L2): the sum of squares, then y = w * dtype(x * rstd).
extern "C" __global__ void __launch_bounds__(kMaxBlockThreads) k_rmsnorm_forward(const QlRmsNormForwardParams p) {
  QL_SHARED_ARRAY(float, s_warp, kMaxWarps);
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  // Block-uniform whenever row_sum synchronizes the block (one row per block, grid == rows).
  if (row >= p.rows) return;
  const int tx = static_cast<int>(threadIdx.x), nt = static_cast<int>(blockDim.x);
  const int64_t base = row * p.h;
  const bool vec = vec4_ok(p.x, p.y, p.w, p.h, p.dtype);

  float ss = 0.0f;
  if (vec) {
    for (int c = 4 * tx; c < p.h; c += 4 * nt) {
      float v[4];
      load4(p.x, base + c, p.dtype, v);
      ss += v[0] * v[0] + v[1] * v[1] + v[2] * v[2] + v[3] * v[3];
    }
  } else {
    for (int c = tx; c < p.h; c += nt) {
      const float v = ql::load_as_f32(p.x, base + c, p.dtype);
      ss += v * v;
    }
  }
  ss = row_sum(ss, s_warp);
  const float rstd = rsqrtf(ss / static_cast<float>(p.h) + p.eps);
  if (tx == 0) p.rstd[row] = rstd;

  if (vec) {
    for (int c = 4 * tx; c < p.h; c += 4 * nt) {
      float v[4], w[4];
      load4(p.x, base + c, p.dtype, v);
      load4(p.w, c, p.dtype, w);
#pragma unroll
      for (int j = 0; j < 4; ++j) v[j] = w[j] * round_to(v[j] * rstd, p.dtype);
      store4(p.y, base + c, p.dtype, v);
    }
  } else {
    for (int c = tx; c < p.h; c += nt) {
      const float n = round_to(ql::load_as_f32(p.x, base + c, p.dtype) * rstd, p.dtype);
      ql::store_from_f32(p.y, base + c, p.dtype, ql::load_as_f32(p.w, c, p.dtype) * n);
    }
  }
}
QL_EMU_ENTRY(k_rmsnorm_forward, QlRmsNormForwardParams)

// RMSNorm backward, dx and per-block dw partials. Same block shape as the forward; the grid is
// capped, so each row group loops over rows blockIdx.x * rows_per_block + y + k * gridDim.x *
// rows_per_block. With n = x * rstd and dn = dy * w:
//   dx = rstd * dn - x * rstd^3 * sum(dn * x) / h,     dw_partial[block] += dy * n.
// Each thread accumulates dw for its own columns in dynamic shared memory (rows_per_block * h
// floats, one slice per row group), so the sums are deterministic and need no atomics; the slices
// are added in order at the end.
extern "C" __global__ void __launch_bounds__(kMaxBlockThreads) k_rmsnorm_backward(const QlRmsNormBackwardParams p) {
  QL_SHARED_ARRAY(float, s_warp, kMaxWarps);
  QL_DYNAMIC_SHARED(float, s_dw);
  const int tx = static_cast<int>(threadIdx.x), nt = static_cast<int>(blockDim.x);
  const int64_t slice = static_cast<int64_t>(threadIdx.y) * p.h;
  const bool vec = vec4_ok(p.dy, p.x, p.dx, p.h, p.dtype) && vec4_ok(p.w, p.w, p.w, p.h, p.dtype);
  const int step = vec ? 4 : 1;

  for (int c = step * tx; c < p.h; c += step * nt) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      if (j < step) s_dw[slice + c + j] = 0.0f;
    }
  }

  const int64_t row_step = static_cast<int64_t>(gridDim.x) * blockDim.y;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; row < p.rows;
       row += row_step) {
    const int64_t base = row * p.h;
    float dot = 0.0f;
    for (int c = step * tx; c < p.h; c += step * nt) {
      float dy[4], x[4], w[4];
      load_dy_x_w(p, base, c, vec, dy, x, w);
#pragma unroll
      for (int j = 0; j < 4; ++j) dot += dy[j] * w[j] * x[j];
    }
    dot = row_sum(dot, s_warp);
    const float rstd = __ldg(&p.rstd[row]);
    const float coef = dot * rstd * rstd * rstd / static_cast<float>(p.h);
    for (int c = step * tx; c < p.h; c += step * nt) {
      float dy[4], x[4], w[4], dx[4];
      load_dy_x_w(p, base, c, vec, dy, x, w);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        dx[j] = rstd * (dy[j] * w[j]) - x[j] * coef;
        if (j < step) {
          const float acc = s_dw[slice + c + j];
          s_dw[slice + c + j] = acc + dy[j] * (x[j] * rstd);
        }
      }
      if (vec) {
        store4(p.dx, base + c, p.dtype, dx);
      } else {
        ql::store_from_f32(p.dx, base + c, p.dtype, dx[0]);
      }
    }
  }

  __syncthreads();
  const int tid = static_cast<int>(threadIdx.y) * nt + tx;
  for (int c = tid; c < p.h; c += nt * static_cast<int>(blockDim.y)) {
    float sum = 0.0f;
    for (int y = 0; y < static_cast<int>(blockDim.y); ++y) {
      const float v = s_dw[static_cast<int64_t>(y) * p.h + c];
      sum += v;
    }
    p.dw_partial[static_cast<int64_t>(blockIdx.x) * p.h + c] = sum;
  }
}
QL_EMU_ENTRY(k_rmsnorm_backward, QlRmsNormBackwardParams)

// dw[c] = sum of dw_partial[b, c] over b in order: one thread per column (coalesced across b).
extern "C" __global__ void __launch_bounds__(kElementwiseThreads) k_rmsnorm_dw_reduce(const QlRmsNormDwReduceParams p) {
  const int c = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  if (c >= p.h) return;
  float sum = 0.0f;
  for (int b = 0; b < p.partial_rows; ++b) sum += __ldg(&p.dw_partial[static_cast<int64_t>(b) * p.h + c]);
  p.dw[c] = sum;
}
QL_EMU_ENTRY(k_rmsnorm_dw_reduce, QlRmsNormDwReduceParams)

// RoPE (forward or inverse) in place, one thread per rotated pair (v[i], v[i + head_dim / 2]) over
// a grid-stride loop: consecutive threads take consecutive i of one head, so both halves are read
// coalesced. Each pair is read and written by exactly one thread.
extern "C" __global__ void __launch_bounds__(kElementwiseThreads) k_rope(const QlRopeParams p) {
  const int half = p.head_dim / 2;
  const int heads = p.q_heads + p.kv_heads;
  const int64_t pairs_per_token = static_cast<int64_t>(heads) * half;
  const int64_t total = p.tokens * pairs_per_token;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < total; t += stride) {
    const int64_t token = t / pairs_per_token;
    const int rem = static_cast<int>(t - token * pairs_per_token);
    const int head = rem / half;
    const int i = rem - head * half;
    const bool is_q = head < p.q_heads;
    void* buf = is_q ? p.q : p.k;
    const int64_t nheads = is_q ? p.q_heads : p.kv_heads;
    const int64_t h = is_q ? head : head - p.q_heads;
    const int64_t base = (token * nheads + h) * p.head_dim;
    const int pos = __ldg(&p.positions[token]);
    float c, s;
    if (pos >= 0 && pos < p.num_positions) {
      c = __ldg(&p.cos[static_cast<int64_t>(pos) * half + i]);
      s = __ldg(&p.sin[static_cast<int64_t>(pos) * half + i]);
      if (p.inverse) s = -s;
    } else {
      c = s = __int_as_float(0x7fc00000);  // a bad position poisons the token instead of reading out of bounds
    }
    const float a = ql::load_as_f32(buf, base + i, p.dtype);
    const float b = ql::load_as_f32(buf, base + i + half, p.dtype);
    ql::store_from_f32(buf, base + i, p.dtype, a * c - b * s);
    ql::store_from_f32(buf, base + i + half, p.dtype, b * c + a * s);
  }
}
QL_EMU_ENTRY(k_rope, QlRopeParams)

// SwiGLU forward, h = silu(g) * u, elementwise over a grid-stride loop.
extern "C" __global__ void __launch_bounds__(kElementwiseThreads) k_swiglu_forward(const QlSwigluParams p) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < p.n; i += stride) {
    const float g = ql::load_as_f32(p.g, i, p.dtype);
    const float u = ql::load_as_f32(p.u, i, p.dtype);
    ql::store_from_f32(p.h, i, p.dtype, g * sigmoid(g) * u);
  }
}
QL_EMU_ENTRY(k_swiglu_forward, QlSwigluParams)

// SwiGLU backward: silu'(g) = sigmoid(g) * (1 + g * (1 - sigmoid(g))),
// dg = dh * u * silu'(g), du = dh * silu(g).
extern "C" __global__ void __launch_bounds__(kElementwiseThreads) k_swiglu_backward(const QlSwigluParams p) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < p.n; i += stride) {
    const float g = ql::load_as_f32(p.g, i, p.dtype);
    const float u = ql::load_as_f32(p.u, i, p.dtype);
    const float dh = ql::load_as_f32(p.dh, i, p.dtype);
    const float sg = sigmoid(g);
    ql::store_from_f32(p.dg, i, p.dtype, dh * u * (sg * (1.0f + g * (1.0f - sg))));
    ql::store_from_f32(p.du, i, p.dtype, dh * (g * sg));
  }
}
QL_EMU_ENTRY(k_swiglu_backward, QlSwigluParams)
