// Fused LoRA for rank r ≤ 64 on X [M, K], A [r, K], B [N, r] and Y, dY [M, N] (f32 or bf16),
// y = base(x) + s·(x·Aᵀ)·Bᵀ with f32 accumulation. Forward: k_lora_xa writes T = X·Aᵀ [M, r] f32
// (kept for the backward), k_lora_add adds s·T·Bᵀ into the base GEMM's Y in one read-modify-write.
//
// Backward from dY, X, A, B and the saved T: k_lora_dyb recomputes U = dY·B [M, r] f32 (never
// saved: it costs one pass over dY, which the backward reads anyway); k_lora_db writes
// dB = s·dYᵀ·T [N, r] and k_lora_da dA = s·Uᵀ·X [r, K] (f32, overwritten), one block per tile of
// 64 output columns and slice of M rows, each looping over its rows in order; with more than one
// slice the partials are added in slice order by k_rmsnorm_dw_reduce (llama.cu), so the sums are
// deterministic without float atomics; k_lora_dx adds s·U·A into dX in one read-modify-write. X must be
// the same (dropped-out) X the forward used. The three shapes of kernel are shared through
// templates on W's layout: A is rank-major [r, cols], B cols-major [cols, r].
//
// Registers: the projection keeps 2 rows × kRank f32 accumulators per lane (32 in the r ≤ 16
// kernels, 128 in the _wide ones for r ≤ 64, under the 255 that __launch_bounds__(128) allows);
// the gradient kernels 32 per thread, the expansion 1.
#include "common.cuh"

namespace {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxRank = 64;

// k_lora_xa / k_lora_dyb: each warp owns kProjRowsPerWarp rows of the block's tile; a lane owns
// the columns lane, lane + 32, ... of the reduction and the partial sums are shuffled together.
constexpr int kProjRowsPerWarp = 2;
constexpr int kProjRows = kWarps * kProjRowsPerWarp;
constexpr int kProjTileCols = 32;
// k_lora_add / k_lora_dx: a block owns a [kExpandRows, kExpandCols] tile of the output.
constexpr int kExpandRows = 16;
constexpr int kExpandCols = 64;
constexpr int kExpandRowGroups = kThreads / kExpandCols;
// k_lora_db / k_lora_da: a block owns kGradCols output columns, all ranks, and walks M in chunks.
constexpr int kGradCols = 64;
constexpr int kGradRows = 16;
constexpr int kGradRankGroups = kThreads / kGradCols;
constexpr int kGradPerThread = kMaxRank / kGradRankGroups;

// Sum over a full warp; the butterfly gives every lane the same bits (a + b == b + a exactly).
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(ql::kFullMask, v, off);
  return v;
}

// Flat index of W's element (rank j, column c): A [rank, cols] is rank-major, B [cols, rank] not.
template <bool kRankMajor>
__device__ __forceinline__ int64_t w_index(int j, int64_t c, int rank, int cols) {
  return kRankMajor ? static_cast<int64_t>(j) * cols + c : c * rank + j;
}

// out[m, j] = Σ_c x[m, c] · W(j, c) for j < rank, the block's kProjRows rows. Per tile of 32
// columns, the x rows and W (kRank × 32, zero past rank and cols) are staged in shared memory as
// f32; a lane multiplies column `lane` into 2 × kRank accumulators, reduced by shuffles at the end.
template <int kRank, bool kRankMajor, typename XTile, typename WTile>
__device__ __forceinline__ void project(const QlLoraProjectParams& p, XTile& xs, WTile& ws) {
  const int tx = static_cast<int>(threadIdx.x), lane = tx & 31, warp = tx >> 5;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kProjRows;
  float acc[kProjRowsPerWarp][kRank];
#pragma unroll
  for (int r = 0; r < kProjRowsPerWarp; ++r) {
#pragma unroll
    for (int j = 0; j < kRank; ++j) acc[r][j] = 0.0f;
  }
  for (int64_t c0 = 0; c0 < p.cols; c0 += kProjTileCols) {
    for (int e = tx; e < kProjRows * kProjTileCols; e += kThreads) {
      const int r = e / kProjTileCols, c = e % kProjTileCols;
      const int64_t row = row0 + r, col = c0 + c;
      xs[r][c] = (row < p.rows && col < p.cols) ? ql::load_as_f32(p.x, row * p.cols + col, p.x_dtype) : 0.0f;
    }
    // Consecutive threads walk W's contiguous dimension in global memory; the odd row pitch of
    // `ws` keeps the transposing stores of B free of bank conflicts.
    for (int e = tx; e < kRank * kProjTileCols; e += kThreads) {
      const int j = kRankMajor ? e / kProjTileCols : e % kRank;
      const int c = kRankMajor ? e % kProjTileCols : e / kRank;
      const int64_t col = c0 + c;
      ws[j][c] = (j < p.rank && col < p.cols)
                     ? ql::load_as_f32(p.w, w_index<kRankMajor>(j, col, p.rank, p.cols), p.w_dtype)
                     : 0.0f;
    }
    __syncthreads();
#pragma unroll
    for (int r = 0; r < kProjRowsPerWarp; ++r) {
      const float x = xs[warp * kProjRowsPerWarp + r][lane];
#pragma unroll
      for (int j = 0; j < kRank; ++j) {
        const float w = ws[j][lane];
        acc[r][j] = fmaf(x, w, acc[r][j]);
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int r = 0; r < kProjRowsPerWarp; ++r) {
    const int64_t row = row0 + warp * kProjRowsPerWarp + r;
#pragma unroll
    for (int j = 0; j < kRank; ++j) {
      // p.rank is uniform across the block, so whole warps take or skip the shuffles together.
      if (j < p.rank) {
        const float v = warp_sum(acc[r][j]);
        if (lane == (j & 31) && row < p.rows) p.out[row * p.rank + j] = v;
      }
    }
  }
}

// y[m, c] += scale · Σ_j t[m, j] · W(j, c) over the block's tile: t and W staged in shared memory
// (W as [col][rank] with an odd pitch, so lanes on consecutive columns hit distinct banks), then
// each y element read, updated and rounded once by one thread.
template <bool kRankMajor, typename TTile, typename WTile>
__device__ __forceinline__ void expand(const QlLoraExpandParams& p, TTile& ts, WTile& ws) {
  const int tx = static_cast<int>(threadIdx.x);
  const int64_t row0 = static_cast<int64_t>(blockIdx.y) * kExpandRows;
  const int64_t col0 = static_cast<int64_t>(blockIdx.x) * kExpandCols;
  for (int e = tx; e < kExpandRows * p.rank; e += kThreads) {
    const int r = e / p.rank, j = e % p.rank;
    const int64_t row = row0 + r;
    ts[r][j] = row < p.rows ? p.t[row * p.rank + j] : 0.0f;
  }
  for (int e = tx; e < kExpandCols * p.rank; e += kThreads) {
    const int j = kRankMajor ? e / kExpandCols : e % p.rank;
    const int c = kRankMajor ? e % kExpandCols : e / p.rank;
    const int64_t col = col0 + c;
    ws[c][j] = col < p.cols ? ql::load_as_f32(p.w, w_index<kRankMajor>(j, col, p.rank, p.cols), p.w_dtype) : 0.0f;
  }
  __syncthreads();
  const int c = tx % kExpandCols;
  const int64_t col = col0 + c;
  if (col >= p.cols) return;
  for (int r = tx / kExpandCols; r < kExpandRows; r += kExpandRowGroups) {
    const int64_t row = row0 + r;
    if (row >= p.rows) return;
    float acc = 0.0f;
    for (int j = 0; j < p.rank; ++j) {
      const float t = ts[r][j];
      const float w = ws[c][j];
      acc = fmaf(t, w, acc);
    }
    const int64_t i = row * p.cols + col;
    ql::store_from_f32(p.y, i, p.y_dtype, ql::load_as_f32(p.y, i, p.y_dtype) + p.scale * acc);
  }
}

// out(j, c) = scale · Σ_m p[m, c] · q[m, j] for the block's kGradCols columns and every j < rank:
// thread (c, g) owns ranks g, g + 2, ... of column c and adds the rows in order. With
// gridDim.y = S > 1 the rows are cut into S slices of whole kGradRows chunks, block (x, s) sums
// slice s in order into out + s · rank · cols (a partial), and a second pass adds the S partials
// in order: more blocks than columns alone give, still deterministic.
template <bool kRankMajorOut, typename PTile, typename QTile>
__device__ __forceinline__ void grad_w(const QlLoraGradWParams& p, PTile& ps, QTile& qs) {
  const int tx = static_cast<int>(threadIdx.x);
  const int c = tx % kGradCols, g = tx / kGradCols;
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kGradCols + c;
  const int64_t chunks = (p.rows + kGradRows - 1) / kGradRows;
  const int64_t slice_rows = (chunks + gridDim.y - 1) / gridDim.y * kGradRows;
  const int64_t begin = static_cast<int64_t>(blockIdx.y) * slice_rows;
  const int64_t end = begin + slice_rows < p.rows ? begin + slice_rows : p.rows;
  float acc[kGradPerThread];
#pragma unroll
  for (int i = 0; i < kGradPerThread; ++i) acc[i] = 0.0f;
  for (int64_t m0 = begin; m0 < end; m0 += kGradRows) {
    for (int e = tx; e < kGradRows * kGradCols; e += kThreads) {
      const int r = e / kGradCols, cc = e % kGradCols;
      const int64_t row = m0 + r, cl = static_cast<int64_t>(blockIdx.x) * kGradCols + cc;
      ps[r][cc] = (row < end && cl < p.cols) ? ql::load_as_f32(p.p, row * p.cols + cl, p.p_dtype) : 0.0f;
    }
    for (int e = tx; e < kGradRows * p.rank; e += kThreads) {
      const int r = e / p.rank, j = e % p.rank;
      const int64_t row = m0 + r;
      qs[r][j] = row < end ? p.q[row * p.rank + j] : 0.0f;
    }
    __syncthreads();
    for (int r = 0; r < kGradRows; ++r) {
      const float x = ps[r][c];
#pragma unroll
      for (int i = 0; i < kGradPerThread; ++i) {
        const int j = g + kGradRankGroups * i;
        if (j < p.rank) {
          const float q = qs[r][j];
          acc[i] = fmaf(x, q, acc[i]);
        }
      }
    }
    __syncthreads();
  }
  if (col >= p.cols) return;
  float* out = p.out + static_cast<int64_t>(blockIdx.y) * p.rank * p.cols;
#pragma unroll
  for (int i = 0; i < kGradPerThread; ++i) {
    const int j = g + kGradRankGroups * i;
    if (j < p.rank) out[kRankMajorOut ? static_cast<int64_t>(j) * p.cols + col : col * p.rank + j] = p.scale * acc[i];
  }
}

// Ranks up to kNarrowRank (the common r = 8, 16) get their own kernels with 2 × 16 accumulators:
// a register count is per kernel, so a runtime branch to the 2 × 64 instantiation would hold the
// narrow path to the wide one's registers and occupancy.
constexpr int kNarrowRank = 16;

template <int kRank, bool kRankMajor>
__device__ __forceinline__ void project_rank(const QlLoraProjectParams& p) {
  QL_SHARED_ARRAY2(float, xs, kProjRows, kProjTileCols);
  QL_SHARED_ARRAY2(float, ws, kRank, kProjTileCols + 1);
  project<kRank, kRankMajor>(p, xs, ws);
}

template <bool kRankMajor>
__device__ __forceinline__ void expand_tile(const QlLoraExpandParams& p) {
  QL_SHARED_ARRAY2(float, ts, kExpandRows, kMaxRank);
  QL_SHARED_ARRAY2(float, ws, kExpandCols, kMaxRank + 1);
  expand<kRankMajor>(p, ts, ws);
}

template <bool kRankMajorOut>
__device__ __forceinline__ void grad_w_tile(const QlLoraGradWParams& p) {
  QL_SHARED_ARRAY2(float, ps, kGradRows, kGradCols);
  QL_SHARED_ARRAY2(float, qs, kGradRows, kMaxRank);
  grad_w<kRankMajorOut>(p, ps, qs);
}

}  // namespace

// Forward, first half: T = X·Aᵀ [M, r] f32, a block per 8 rows of X (grid ceil(M / 8)), for
// r ≤ 16; k_lora_xa_wide for r ≤ 64.
extern "C" __global__ void __launch_bounds__(kThreads) k_lora_xa(const QlLoraProjectParams p) {
  project_rank<kNarrowRank, true>(p);
}
QL_EMU_ENTRY(k_lora_xa, QlLoraProjectParams)

extern "C" __global__ void __launch_bounds__(kThreads) k_lora_xa_wide(const QlLoraProjectParams p) {
  project_rank<kMaxRank, true>(p);
}
QL_EMU_ENTRY(k_lora_xa_wide, QlLoraProjectParams)

// Forward, second half, in place: Y += s·T·Bᵀ, grid (ceil(N / 64), ceil(M / 16)).
extern "C" __global__ void __launch_bounds__(kThreads) k_lora_add(const QlLoraExpandParams p) {
  expand_tile<false>(p);
}
QL_EMU_ENTRY(k_lora_add, QlLoraExpandParams)

// Backward: U = dY·B [M, r] f32 (B read as W(j, n) = B[n, j]), grid ceil(M / 8), for r ≤ 16;
// k_lora_dyb_wide for r ≤ 64.
extern "C" __global__ void __launch_bounds__(kThreads) k_lora_dyb(const QlLoraProjectParams p) {
  project_rank<kNarrowRank, false>(p);
}
QL_EMU_ENTRY(k_lora_dyb, QlLoraProjectParams)

extern "C" __global__ void __launch_bounds__(kThreads) k_lora_dyb_wide(const QlLoraProjectParams p) {
  project_rank<kMaxRank, false>(p);
}
QL_EMU_ENTRY(k_lora_dyb_wide, QlLoraProjectParams)

// Backward: dB = s·dYᵀ·T [N, r] f32, grid (ceil(N / 64), S row slices; S > 1 writes partials).
extern "C" __global__ void __launch_bounds__(kThreads) k_lora_db(const QlLoraGradWParams p) {
  grad_w_tile<false>(p);
}
QL_EMU_ENTRY(k_lora_db, QlLoraGradWParams)

// Backward: dA = s·Uᵀ·X [r, K] f32, grid (ceil(K / 64), S row slices; S > 1 writes partials).
extern "C" __global__ void __launch_bounds__(kThreads) k_lora_da(const QlLoraGradWParams p) {
  grad_w_tile<true>(p);
}
QL_EMU_ENTRY(k_lora_da, QlLoraGradWParams)

// Backward, in place: dX += s·U·A [M, K], grid (ceil(K / 64), ceil(M / 16)).
extern "C" __global__ void __launch_bounds__(kThreads) k_lora_dx(const QlLoraExpandParams p) {
  expand_tile<true>(p);
}
QL_EMU_ENTRY(k_lora_dx, QlLoraExpandParams)
