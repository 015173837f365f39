/* Self-test kernels of the CPU emulation (tests/emulator.rs): reductions, warp collectives,
 * an mma/ldmatrix/cp.async GEMM, fragment layouts, races, bounds, conversions, atomics. All take
 * QlEmuTestParams; each kernel's comment gives its inputs, outputs and launch shape. */
#include "portable.cuh"

__device__ __forceinline__ int linear_tid() {
  return static_cast<int>(threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z));
}

/* Sum over the first `lanes` lanes of the warp (lanes < 32 in a block's partial last warp). */
__device__ __forceinline__ float warp_sum(float v, int lanes) {
  const unsigned mask = lanes == 32 ? 0xFFFFFFFFu : (1u << lanes) - 1u;
  const int lane = linear_tid() & 31;
  for (int off = 16; off > 0; off >>= 1) {
    const float other = __shfl_down_sync(mask, v, off);
    if (lane + off < lanes) v += other;
  }
  return v;
}

/* out[b] = sum of a[b*k, min((b+1)*k, n)) (a: f32). Any block shape; dynamic shared memory of
 * 32 floats holds the per-warp sums. */
extern "C" __global__ void k_emu_block_reduce(const QlEmuTestParams p) {
  QL_DYNAMIC_SHARED(float, warp_sums);
  const float* a = static_cast<const float*>(p.a);
  const int nthreads = static_cast<int>(blockDim.x * blockDim.y * blockDim.z);
  const int tid = linear_tid();
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * p.k;
  const int64_t end = begin + p.k < p.n ? begin + p.k : static_cast<int64_t>(p.n);
  float v = 0.0f;
  for (int64_t i = begin + tid; i < end; i += nthreads) v += a[i];
  const int warp = tid / 32, lane = tid % 32;
  const int rest = nthreads - 32 * warp;
  v = warp_sum(v, rest < 32 ? rest : 32);
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  if (warp == 0) {
    const int nwarps = (nthreads + 31) / 32;
    float s = lane < nwarps ? static_cast<float>(warp_sums[lane]) : 0.0f;
    s = warp_sum(s, nthreads < 32 ? nthreads : 32);
    if (lane == 0) p.out[blockIdx.x] = s;
  }
}
QL_EMU_ENTRY(k_emu_block_reduce, QlEmuTestParams)

/* out_u32[i] = inclusive prefix sum of a[] (u32) within aligned sections of width k (a power of
 * two <= 32). 1-D launch of whole warps, one element per thread. */
extern "C" __global__ void k_emu_warp_scan(const QlEmuTestParams p) {
  const unsigned* a = static_cast<const unsigned*>(p.a);
  const int i = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  const int lane_in_section = (threadIdx.x & 31) % p.k;
  unsigned v = a[i];
  for (int d = 1; d < p.k; d <<= 1) {
    const unsigned o = __shfl_up_sync(0xFFFFFFFFu, v, d, p.k);
    if (lane_in_section >= d) v += o;
  }
  p.out_u32[i] = v;
}
QL_EMU_ENTRY(k_emu_warp_scan, QlEmuTestParams)

/* Twelve u32 per thread from x = a[i] (u32), with shuffle width k: idx, up, down and xor
 * shuffles, ballot/any/all, shuffles of double, bf16 and u64, the active mask and a vote on a
 * subset of lanes. 1-D launch of whole warps. */
extern "C" __global__ void k_emu_warp_ops(const QlEmuTestParams p) {
  const unsigned* a = static_cast<const unsigned*>(p.a);
  const int i = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  const int lane = static_cast<int>(threadIdx.x & 31);
  const unsigned full = 0xFFFFFFFFu;
  const unsigned x = a[i];
  /* Read before the first collective: no lane can have exited yet. */
  const unsigned active = __activemask();
  unsigned* o = p.out_u32 + 12 * i;
  o[0] = __shfl_sync(full, x, lane * 3 + 1, p.k);
  o[1] = __shfl_up_sync(full, x, 3, p.k);
  o[2] = __shfl_down_sync(full, x, 3, p.k);
  o[3] = __shfl_xor_sync(full, x, 5, p.k);
  o[4] = __ballot_sync(full, x & 1u);
  o[5] = static_cast<unsigned>(__any_sync(full, x == 7u));
  o[6] = static_cast<unsigned>(__all_sync(full, x != 0u));
  const double d = __shfl_xor_sync(full, static_cast<double>(x) + 0.5, 1);
  o[7] = static_cast<unsigned>(2.0 * d);
  const __nv_bfloat16 h = __shfl_down_sync(full, __ushort_as_bfloat16(static_cast<unsigned short>(x)), 1);
  o[8] = __bfloat16_as_ushort(h);
  const unsigned long long wide = (static_cast<unsigned long long>(x) << 32) | static_cast<unsigned>(lane);
  o[9] = static_cast<unsigned>(__shfl_sync(full, wide, 0) >> 32);
  o[10] = active;
  o[11] = 0;
  if (lane < 16) o[11] = __ballot_sync(0x0000FFFFu, lane & 1);
}
QL_EMU_ENTRY(k_emu_warp_ops, QlEmuTestParams)

/* out = A·B (f32 [m][n]) for A bf16 [m][k] and B bf16 [k][n], rows padded to a multiple of 8
 * elements (16 bytes) so cp.async sources stay aligned; the pad is never read. Tiles of 32×16
 * per block of 64 threads (two warps of 16×16), k in steps of 32 through a double-buffered
 * cp.async pipeline; ldmatrix_x4 gives A fragments, ldmatrix_x2_trans B fragments. */
#define GEMM_BM 32
#define GEMM_BN 16
#define GEMM_BK 32
#define GEMM_LDA (GEMM_BK + 8)
#define GEMM_LDB (GEMM_BN + 8)
extern "C" __global__ void __launch_bounds__(64) k_emu_mma_gemm(const QlEmuTestParams p) {
  QL_SHARED_ARRAY2(__nv_bfloat16, As, 2 * GEMM_BM, GEMM_LDA);
  QL_SHARED_ARRAY2(__nv_bfloat16, Bs, 2 * GEMM_BK, GEMM_LDB);
  const __nv_bfloat16* A = static_cast<const __nv_bfloat16*>(p.a);
  const __nv_bfloat16* B = static_cast<const __nv_bfloat16*>(p.b);
  const int M = p.m, N = p.n, K = p.k;
  const int lda = (K + 7) / 8 * 8, ldb = (N + 7) / 8 * 8;
  const int tid = static_cast<int>(threadIdx.x), warp = tid / 32, lane = tid % 32;
  const int m0 = static_cast<int>(blockIdx.y) * GEMM_BM, n0 = static_cast<int>(blockIdx.x) * GEMM_BN;
  const int ktiles = (K + GEMM_BK - 1) / GEMM_BK;

  /* One k-tile: A is 32 rows × 4 chunks of 8 bf16 (two chunks per thread), B 32 rows × 2 chunks. */
  auto load_tile = [&](int stage, int kt) {
    const int k0 = kt * GEMM_BK;
    for (int c = 0; c < 2; ++c) {
      const int chunk = tid + 64 * c, r = chunk / 4, col = (chunk % 4) * 8;
      const int gm = m0 + r, gk = k0 + col;
      const int valid = gm < M && gk < K ? (K - gk < 8 ? K - gk : 8) : 0;
      const __nv_bfloat16* src = valid > 0 ? A + static_cast<int64_t>(gm) * lda + gk : A;
      cp_async_16_zfill(&As[stage * GEMM_BM + r][col], src, 2 * valid);
    }
    const int r = tid / 2, col = (tid % 2) * 8;
    const int gk = k0 + r, gn = n0 + col;
    const int valid = gk < K && gn < N ? (N - gn < 8 ? N - gn : 8) : 0;
    const __nv_bfloat16* src = valid > 0 ? B + static_cast<int64_t>(gk) * ldb + gn : B;
    cp_async_16_zfill(&Bs[stage * GEMM_BK + r][col], src, 2 * valid);
  };

  float acc[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};
  load_tile(0, 0);
  cp_async_commit();
  for (int kt = 0; kt < ktiles; ++kt) {
    const int stage = kt & 1;
    if (kt + 1 < ktiles) {
      load_tile(stage ^ 1, kt + 1);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    for (int ks = 0; ks < GEMM_BK; ks += 16) {
      uint32_t a[4];
      ldmatrix_x4(a, &As[stage * GEMM_BM + warp * 16 + (lane % 16)][ks + (lane / 16) * 8]);
      for (int nt = 0; nt < 2; ++nt) {
        uint32_t b[2];
        ldmatrix_x2_trans(b, &Bs[stage * GEMM_BK + ks + (lane % 16)][nt * 8]);
        mma_m16n8k16_bf16(acc[nt], a, b, acc[nt]);
      }
    }
    __syncthreads();
  }
  const int g = lane / 4, t = lane % 4;
  for (int nt = 0; nt < 2; ++nt) {
    for (int i = 0; i < 4; ++i) {
      const int row = m0 + warp * 16 + g + (i >= 2 ? 8 : 0);
      const int col = n0 + nt * 8 + 2 * t + (i & 1);
      if (row < M && col < N) p.out[static_cast<int64_t>(row) * N + col] = acc[nt][i];
    }
  }
}
QL_EMU_ENTRY(k_emu_mma_gemm, QlEmuTestParams)

/* One warp: D (out, f32 [16][8]) = A (a, bf16 [16][16]) · B (b, bf16 [16][8], row k) + C (c, f32
 * [16][8]), fragments gathered from global memory with the PTX ISA layout formulas. */
extern "C" __global__ void k_emu_mma_layout(const QlEmuTestParams p) {
  const unsigned short* A = static_cast<const unsigned short*>(p.a);
  const unsigned short* B = static_cast<const unsigned short*>(p.b);
  const float* C = static_cast<const float*>(p.c);
  const int lane = static_cast<int>(threadIdx.x), g = lane / 4, t = lane % 4;
  uint32_t a[4], b[2];
  float c[4], d[4];
  for (int r = 0; r < 4; ++r) {
    uint32_t word = 0;
    for (int h = 0; h < 2; ++h) {
      const int i = 2 * r + h;
      const int row = g + ((i & 2) ? 8 : 0), col = 2 * t + (i & 1) + (i >= 4 ? 8 : 0);
      word |= static_cast<uint32_t>(A[row * 16 + col]) << (16 * h);
    }
    a[r] = word;
  }
  for (int r = 0; r < 2; ++r) {
    uint32_t word = 0;
    for (int h = 0; h < 2; ++h) {
      const int i = 2 * r + h;
      const int k = 2 * t + (i & 1) + (i >= 2 ? 8 : 0);
      word |= static_cast<uint32_t>(B[k * 8 + g]) << (16 * h);
    }
    b[r] = word;
  }
  for (int i = 0; i < 4; ++i) c[i] = C[(g + (i >= 2 ? 8 : 0)) * 8 + 2 * t + (i & 1)];
  mma_m16n8k16_bf16(d, a, b, c);
  for (int i = 0; i < 4; ++i) p.out[(g + (i >= 2 ? 8 : 0)) * 8 + 2 * t + (i & 1)] = d[i];
}
QL_EMU_ENTRY(k_emu_mma_layout, QlEmuTestParams)

/* One warp: four 8×8 u16 matrices in shared memory, element (j, r, c) = 64j + 8r + c; lane l
 * supplies the address of row 7 - l%8 of matrix l/8 (rows reversed, so the test sees which lane's
 * address each row came from). out_u32[(v * 32 + lane) * 4 + j] = register j of variant v:
 * 0 x4, 1 x4.trans, 2 x2, 3 x2.trans (x2 leaves registers 2, 3 zero). */
extern "C" __global__ void k_emu_ldmatrix_layout(const QlEmuTestParams p) {
  QL_SHARED_ARRAY2(unsigned short, mats, 32, 8);
  const int lane = static_cast<int>(threadIdx.x);
  for (int c = 0; c < 8; ++c) mats[lane][c] = static_cast<unsigned short>(8 * lane + c);
  __syncwarp();
  const unsigned short* row = &mats[(lane & ~7) + 7 - (lane & 7)][0];
  uint32_t r[4][4] = {};
  ldmatrix_x4(r[0], row);
  ldmatrix_x4_trans(r[1], row);
  ldmatrix_x2(r[2], row);
  ldmatrix_x2_trans(r[3], row);
  for (int v = 0; v < 4; ++v) {
    for (int j = 0; j < 4; ++j) p.out_u32[(v * 32 + lane) * 4 + j] = r[v][j];
  }
}
QL_EMU_ENTRY(k_emu_ldmatrix_layout, QlEmuTestParams)

/* Each thread writes cells[tid] = a[tid] (f32) and reads a neighbour's cell into out[tid]. flags:
 * 1 = __syncthreads between, 2 = __syncwarp between, 4 = the neighbour is the next lane of the same
 * warp (else the next thread of the block). 1-D blocks of at most 1024 threads. */
extern "C" __global__ void k_emu_neighbour_exchange(const QlEmuTestParams p) {
  QL_SHARED_ARRAY(float, cells, 1024);
  const float* a = static_cast<const float*>(p.a);
  const int tid = static_cast<int>(threadIdx.x), n = static_cast<int>(blockDim.x);
  cells[tid] = a[blockIdx.x * blockDim.x + tid];
  if (p.flags & 1) __syncthreads();
  if (p.flags & 2) __syncwarp();
  const int neighbour = (p.flags & 4) ? (tid & ~31) + ((tid + 1) & 31) : (tid + 1) % n;
  p.out[blockIdx.x * blockDim.x + tid] = cells[neighbour];
}
QL_EMU_ENTRY(k_emu_neighbour_exchange, QlEmuTestParams)

/* Writes and reads back shared element tid + k (out[tid]) of: flags 0 `tile` (64 floats), 1
 * `grid2` (8×8 floats, as [tid / 8][tid % 8 + k]), 2 dynamic `dyn` (launch with 256 bytes). */
extern "C" __global__ void k_emu_shared_oob(const QlEmuTestParams p) {
  QL_SHARED_ARRAY(float, tile, 64);
  QL_SHARED_ARRAY2(float, grid2, 8, 8);
  QL_DYNAMIC_SHARED(float, dyn);
  const int tid = static_cast<int>(threadIdx.x);
  const float v = static_cast<float>(tid);
  if (p.flags == 0) {
    tile[tid + p.k] = v;
    p.out[tid] = tile[tid + p.k];
  } else if (p.flags == 1) {
    grid2[tid / 8][tid % 8 + p.k] = v;
    p.out[tid] = grid2[tid / 8][tid % 8 + p.k];
  } else {
    dyn[tid + p.k] = v;
    p.out[tid] = dyn[tid + p.k];
  }
}
QL_EMU_ENTRY(k_emu_shared_oob, QlEmuTestParams)

/* x = a[i] (f32, i < n): out_u32[i] = bf16(x) | f16(x) << 16, round to nearest even; out[2i],
 * out[2i + 1] = those values back in f32. The bf16 goes through shared memory on the way. */
extern "C" __global__ void k_emu_convert(const QlEmuTestParams p) {
  QL_SHARED_ARRAY(__nv_bfloat16, staged, 256);
  const int tid = static_cast<int>(threadIdx.x);
  const int i = static_cast<int>(blockIdx.x * blockDim.x) + tid;
  if (i >= p.n) return;
  const float x = static_cast<const float*>(p.a)[i];
  staged[tid] = __float2bfloat16_rn(x);
  const __nv_bfloat16 bf = staged[tid];
  const __half h = __float2half_rn(x);
  p.out_u32[i] = static_cast<uint32_t>(__bfloat16_as_ushort(bf)) | (static_cast<uint32_t>(__half_as_ushort(h)) << 16);
  p.out[2 * i] = __bfloat162float(bf);
  p.out[2 * i + 1] = __half2float(h);
}
QL_EMU_ENTRY(k_emu_convert, QlEmuTestParams)

/* Over all threads i < n with x = a[i] (small integral f32): out[0] += x; out_u32[0] += 1;
 * out_u32[1] = max and out_u32[2] = min of (i * 2654435761) mod 2^32; out_u32[3] (as int) = max of
 * (int)x - 1000; out_u32[4] += 1 through an atomicCAS loop; out_u32[5] = 1 by atomicExch;
 * out_u32[6] += each block's count of threads, tallied by shared-memory atomics. 1-D launch. */
extern "C" __global__ void k_emu_atomics(const QlEmuTestParams p) {
  QL_SHARED_ARRAY(unsigned, block_count, 1);
  const int tid = static_cast<int>(threadIdx.x);
  const int i = static_cast<int>(blockIdx.x * blockDim.x) + tid;
  if (tid == 0) block_count[0] = 0u;
  __syncthreads();
  if (i < p.n) {
    const float x = static_cast<const float*>(p.a)[i];
    atomicAdd(p.out, x);
    atomicAdd(&p.out_u32[0], 1u);
    const unsigned h = static_cast<unsigned>(i) * 2654435761u;
    atomicMax(&p.out_u32[1], h);
    atomicMin(&p.out_u32[2], h);
    atomicMax(reinterpret_cast<int*>(&p.out_u32[3]), static_cast<int>(x) - 1000);
    unsigned old = atomicAdd(&p.out_u32[4], 0u), seen;
    do {
      seen = old;
      old = atomicCAS(&p.out_u32[4], seen, seen + 1u);
    } while (old != seen);
    atomicExch(&p.out_u32[5], 1u);
    atomicAdd(&block_count[0], 1u);
  }
  __syncthreads();
  if (tid == 0) atomicAdd(&p.out_u32[6], static_cast<unsigned>(block_count[0]));
}
QL_EMU_ENTRY(k_emu_atomics, QlEmuTestParams)

/* cp.async ordering, per thread t of one block (a: f32 [4 * blockDim], out: f32 [4 * blockDim],
 * out_u32: [4 * blockDim]). Chunk 0 = buf[4t..4t+4), chunk 1 = buf[4 * 256 + 4t..), both set
 * to -1 first. Group 0 copies a[4t..4t+4) to chunk 0; group 1 copies the first k bytes of it to
 * chunk 1 and zero-fills the rest. flags 0: out[4t..] = chunk 0 after wait_group 1, out_u32[4t..]
 * = chunk 1 after wait_group 0. The other flags race with a copy in flight, as a missing or early
 * wait does: 1 reads chunk 0 before any wait, 2 writes chunk 1 after wait_group 1 (group 1 still
 * in flight), 3 issues a second cp.async into chunk 0 before group 0 is waited for. */
extern "C" __global__ void k_emu_cp_async(const QlEmuTestParams p) {
  QL_SHARED_ARRAY(float, buf, 2 * 4 * 256);
  const float* a = static_cast<const float*>(p.a);
  const int t = static_cast<int>(threadIdx.x);
  for (int j = 0; j < 4; ++j) {
    buf[4 * t + j] = -1.0f;
    buf[4 * 256 + 4 * t + j] = -1.0f;
  }
  cp_async_16(&buf[4 * t], a + 4 * t);
  cp_async_commit();
  if (p.flags == 3) cp_async_16(&buf[4 * t], a + 4 * t);
  cp_async_16_zfill(&buf[4 * 256 + 4 * t], a + 4 * t, p.k);
  cp_async_commit();
  if (p.flags == 1) p.out[4 * t] = buf[4 * t];
  cp_async_wait<1>();
  if (p.flags == 2) buf[4 * 256 + 4 * t] = 0.0f;
  for (int j = 0; j < 4; ++j) p.out[4 * t + j] = buf[4 * t + j];
  cp_async_wait<0>();
  for (int j = 0; j < 4; ++j) p.out_u32[4 * t + j] = __float_as_uint(buf[4 * 256 + 4 * t + j]);
}
QL_EMU_ENTRY(k_emu_cp_async, QlEmuTestParams)

/* Misused warp and block synchronization, one warp (all undefined behaviour on the GPU; never run
 * there). flags 0: lane 0 exits, the others __syncwarp() with it; 1: lane 0 waits at __syncthreads
 * while the others wait for it in __syncwarp() (a deadlock); 2: lanes disagree on the mask. */
extern "C" __global__ void k_emu_bad_sync(const QlEmuTestParams p) {
  const int lane = static_cast<int>(threadIdx.x & 31);
  if (p.flags == 0) {
    if (lane == 0) return;
    __syncwarp();
  } else if (p.flags == 1) {
    if (lane == 0) {
      __syncthreads();
    } else {
      __syncwarp();
    }
  } else {
    /* Each mask names a lane of the other group, so neither group can complete alone. */
    __syncwarp(lane < 16 ? 0x0001FFFFu : 0xFFFFFFFFu);
  }
  p.out[threadIdx.x] = 1.0f;
}
QL_EMU_ENTRY(k_emu_bad_sync, QlEmuTestParams)
