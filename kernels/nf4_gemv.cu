// NF4 small-M GEMV for decode and small batches: y[M, N] = x[M, K] · dequant(W)[N, K]^T (+ bias[N])
// for M ≤ 16, W in bitsandbytes NF4 (blocks of `blocksize` over the flattened [N, K] weight, first
// code of a byte in the high nibble, f32 or double-quantized scales, exactly as kernels/nf4.cu).
//
// Design: one warp per output row n, 4 rows per 128-thread block, grid ceil(N / 4). A lane owns
// chunks of 32 consecutive codes (16 bytes) of its row, lane-strided (chunk c = lane, lane + 32, ...)
// so a warp reads 512 contiguous bytes of W per step and every byte of W exactly once; the next
// chunk's uint4 is in flight while the current one is consumed. When K % 32 == 0 and W and x are
// 16-byte aligned a chunk starts at a flat index that is a multiple of 32, and every supported
// blocksize is a multiple of 32, so a chunk lies in one quantization block: one scale per 32 codes.
// x is not staged in shared memory: it is read with __ldg vector loads (4 bf16 or 4 f32), and
// since every warp of the grid reads the same M·K elements, all but the first reads hit L1/L2;
// bf16 x stays 2 bytes per element on chip (an f32 shared copy would double that traffic), and
// there is no limit on K. Any other K (rows starting mid-byte, quantization blocks straddling
// chunks and rows) or alignment takes a per-element path with the same arithmetic. The code book
// lives in shared memory (16 words in 16 banks: lookups never conflict). w = code[q] * scale is
// one f32 rounding, bit-identical to k_nf4_dequantize; acc[m] = fma(x, w, acc[m]) in f32, a
// butterfly shuffle sum, and lane m stores y[m, n] = acc + bias with one rounding.
//
// Bytes moved per call (DRAM): N·K/2 codes + scales (4·N·K/bs, or N·K/bs + 4·N·K/(256·bs) with
// double quant) + M·K·sizeof(x) + M·N·sizeof(y) (+ N·sizeof(y) of bias). Llama-2-13B gate/up
// [13824, 5120], M = 1, bf16, bs 64, double quant: 35.39 MB + 1.11 MB + 10 KB + 28 KB ≈ 36.5 MB,
// ≈ 11 µs at 3.35 TB/s. M = 1 has its own kernel (k_nf4_gemv); k_nf4_gemv_rows runs passes of ≤ 8 rows of x
// (8 accumulators per lane; 16 spill on sm_80), so M > 8 reads each row's codes twice, the second
// time mostly from L2. There each code feeds 16 FMAs and the f32 pipes, not DRAM, bound the kernel
// (≈ 1/3 of DRAM speed on H100); larger M belongs to the tensor-core GEMM.
#include "common.cuh"

namespace {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kChunk = 32;  // codes per lane per step: one uint4 of W

__device__ __forceinline__ bool aligned16(const void* ptr) {
  return (reinterpret_cast<uintptr_t>(ptr) & 15) == 0;
}

// Scale of quantization block `b`: f32, or double quantized with the two roundings of nf4.cu.
// Block sizes are powers of two (checked by the launcher), so indexing shifts: a 64-bit division
// is a subroutine call on the GPU, and the registers live across it spill.
__device__ __forceinline__ float block_scale(const QlNf4GemvParams& p, int nested_shift, int64_t b) {
  if (p.absmax != nullptr) return __ldg(&p.absmax[b]);
  const float nested = __ldg(&p.nested_code[__ldg(&p.absmax_q[b])]);
  return __fadd_rn(__fmul_rn(nested, __ldg(&p.nested_absmax[b >> nested_shift])), p.nested_offset);
}

// Four consecutive x elements starting at the element `i` (8-byte aligned for bf16, 16 for f32),
// widened to f32 exactly (a bf16 is the high half of an f32; the lower-index element sits in the
// low 16 bits). Four, not eight, per load: at M = 16 the compiler hoists every row's loads ahead
// of the FMAs, and 16 × 8 live values would spill on sm_80.
template <bool kBf16>
__device__ __forceinline__ void load_x4(const void* x, int64_t i, float (&v)[4]) {
  if (kBf16) {
    const uint2 u = __ldg(reinterpret_cast<const uint2*>(static_cast<const __nv_bfloat16*>(x) + i));
    v[0] = __uint_as_float(u.x << 16);
    v[1] = __uint_as_float(u.x & 0xffff0000u);
    v[2] = __uint_as_float(u.y << 16);
    v[3] = __uint_as_float(u.y & 0xffff0000u);
  } else {
    const float4 a = __ldg(reinterpret_cast<const float4*>(static_cast<const float*>(x) + i));
    v[0] = a.x;
    v[1] = a.y;
    v[2] = a.z;
    v[3] = a.w;
  }
}

// One warp's output row for x rows m0 .. m0 + rows - 1 (rows ≤ kMaxM, the rest skipped uniformly),
// accumulators in registers.
template <int kMaxM, bool kBf16, class Code>
__device__ __forceinline__ void gemv_row(const QlNf4GemvParams& p, Code& s_code, int64_t row, int lane, int m0,
                                         int rows) {
  float acc[kMaxM];
#pragma unroll
  for (int m = 0; m < kMaxM; ++m) acc[m] = 0.0f;
  const int64_t k = p.k;
  const int64_t row0 = row * k;  // flat index of w[row, 0]
  const int bs_shift = __ffs(p.blocksize) - 1;
  const int nested_shift = p.absmax != nullptr ? 0 : __ffs(p.nested_blocksize) - 1;

  if (k % kChunk == 0 && aligned16(p.packed) && aligned16(p.x)) {
    const int64_t chunks = k / kChunk;
    const uint4* wrow = reinterpret_cast<const uint4*>(p.packed + (row0 >> 1));
    uint4 next = lane < chunks ? __ldg(&wrow[lane]) : make_uint4(0u, 0u, 0u, 0u);
    for (int64_t c = lane; c < chunks; c += 32) {
      const uint4 cur = next;
      if (c + 32 < chunks) next = __ldg(&wrow[c + 32]);
      const float scale = block_scale(p, nested_shift, (row0 + c * kChunk) >> bs_shift);
      const uint32_t words[4] = {cur.x, cur.y, cur.z, cur.w};
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const uint32_t half = words[j / 2] >> (16 * (j & 1));  // 2 bytes: 4 codes
        float w[4];
#pragma unroll
        for (int b = 0; b < 2; ++b) {
          const uint32_t byte = (half >> (8 * b)) & 0xffu;
          const float hi = s_code[byte >> 4];
          const float lo = s_code[byte & 0xfu];
          w[2 * b] = __fmul_rn(hi, scale);
          w[2 * b + 1] = __fmul_rn(lo, scale);
        }
        const int64_t kk = c * kChunk + 4 * j;
#pragma unroll
        for (int m = 0; m < kMaxM; ++m) {
          if (m < rows) {
            float xv[4];
            load_x4<kBf16>(p.x, (m0 + m) * k + kk, xv);
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[m] = __fmaf_rn(xv[e], w[e], acc[m]);
          }
        }
      }
    }
  } else {
    for (int64_t k0 = static_cast<int64_t>(lane) * kChunk; k0 < k; k0 += 32 * kChunk) {
      const int64_t k1 = min(k0 + static_cast<int64_t>(kChunk), k);
      int64_t f = row0 + k0;
      int64_t b = f >> bs_shift;
      int64_t block_end = (b + 1) * p.blocksize;
      float scale = block_scale(p, nested_shift, b);
      for (int64_t kk = k0; kk < k1; ++kk, ++f) {
        if (f == block_end) {
          ++b;
          block_end += p.blocksize;
          scale = block_scale(p, nested_shift, b);
        }
        const uint32_t byte = __ldg(&p.packed[f >> 1]);
        const float code = s_code[(f & 1) ? (byte & 0xfu) : (byte >> 4)];
        const float w = __fmul_rn(code, scale);
#pragma unroll
        for (int m = 0; m < kMaxM; ++m) {
          if (m < rows) acc[m] = __fmaf_rn(ql::load_as_f32(p.x, (m0 + m) * k + kk, p.x_dtype), w, acc[m]);
        }
      }
    }
  }

  const float bias = p.bias != nullptr ? ql::load_as_f32(p.bias, row, p.y_dtype) : 0.0f;
#pragma unroll
  for (int m = 0; m < kMaxM; ++m) {
    if (m < rows) {
      float v = acc[m];
      // A butterfly: a + b == b + a, so every lane ends with the same bits.
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) v = __fadd_rn(v, __shfl_xor_sync(ql::kFullMask, v, off));
      if (lane == m) ql::store_from_f32(p.y, (m0 + m) * p.n + row, p.y_dtype, p.bias != nullptr ? __fadd_rn(v, bias) : v);
    }
  }
}

template <int kMaxM, class Code>
__device__ __forceinline__ void gemv_row_dtype(const QlNf4GemvParams& p, Code& s_code, int64_t row, int lane, int m0,
                                               int rows) {
  if (p.x_dtype == QL_DTYPE_BF16) {
    gemv_row<kMaxM, true>(p, s_code, row, lane, m0, rows);
  } else {
    gemv_row<kMaxM, false>(p, s_code, row, lane, m0, rows);
  }
}

}  // namespace

// The code book in shared memory and this warp's output row (the grid's tail warps get -1).
template <class Code>
__device__ __forceinline__ int64_t gemv_setup(const QlNf4GemvParams& p, Code& s_code) {
  if (threadIdx.x < 16) s_code[threadIdx.x] = __ldg(&p.code[threadIdx.x]);
  __syncthreads();
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  return row < p.n ? row : -1;
}

// One warp per output row, p.m == 1 (decode), x and y f32 or bf16 (checked by the launcher). Its
// own kernel rather than a branch of k_nf4_gemv_rows: registers are allocated per kernel, and the
// one-row path needs far fewer than the eight-row one, so more warps keep loads in flight.
extern "C" __global__ void __launch_bounds__(kThreads) k_nf4_gemv(const QlNf4GemvParams p) {
  QL_SHARED_ARRAY(float, s_code, 16);
  const int64_t row = gemv_setup(p, s_code);
  if (row < 0) return;  // uniform per warp
  gemv_row_dtype<1>(p, s_code, row, static_cast<int>(threadIdx.x & 31), 0, 1);
}
QL_EMU_ENTRY(k_nf4_gemv, QlNf4GemvParams)

// One warp per output row, p.m in 2..=16. At most 8 accumulators live (16 spill on sm_80): M > 8
// takes two passes over the row's codes (the second from L2), where the f32 pipes bound the
// kernel anyway.
extern "C" __global__ void __launch_bounds__(kThreads) k_nf4_gemv_rows(const QlNf4GemvParams p) {
  QL_SHARED_ARRAY(float, s_code, 16);
  const int64_t row = gemv_setup(p, s_code);
  if (row < 0) return;  // uniform per warp
  const int lane = static_cast<int>(threadIdx.x & 31);
  for (int m0 = 0; m0 < p.m; m0 += 8) gemv_row_dtype<8>(p, s_code, row, lane, m0, min(p.m - m0, 8));
}
QL_EMU_ENTRY(k_nf4_gemv_rows, QlNf4GemvParams)
