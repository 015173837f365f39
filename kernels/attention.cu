// Causal attention, forward and backward, over q [B, Hq, T, D] and k, v [B, Hkv, T, D] (GQA: query
// head h reads kv head h / (Hq / Hkv)), D a multiple of 8 up to 128, f32 or bf16 in and out, f32
// softmax. Flash-style: key tiles stream through shared memory with an online softmax; the bf16
// forward runs on tensor cores (k_attention_fwd_mma), the rest on CUDA cores in f32.
#include "common.cuh"

namespace {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxD = 128;
// Keys per tile: one per lane when scores are computed.
constexpr int kKeyTile = 32;
// Key and value rows are padded to an odd stride so that lanes reading row `lane` at the same
// column hit different banks.
constexpr int kKvStride = kMaxD + 1;
// Query rows per warp: the forward holds 4 rows per warp (16 per block); the dq pass also keeps dO
// rows in shared memory, so it takes 2 per warp (8 per block) to stay within 48 KiB.
constexpr int kFwdRowsPerWarp = 4;
constexpr int kFwdRows = kWarps * kFwdRowsPerWarp;
constexpr int kDqRowsPerWarp = 2;
constexpr int kDqRows = kWarps * kDqRowsPerWarp;
// The dk/dv pass owns kKeyTile keys (8 per warp when accumulating) and streams queries 8 at a time.
constexpr int kDkvQueryRows = 8;
constexpr int kDkvKeysPerWarp = kKeyTile / kWarps;
// Head-dim columns per lane when lanes split D.
constexpr int kColsPerLane = kMaxD / 32;

__device__ __forceinline__ float neg_inf() { return -__int_as_float(0x7f800000); }

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(ql::kFullMask, v, off));
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(ql::kFullMask, v, off);
  return v;
}

__device__ __forceinline__ int imin(int a, int b) { return a < b ? a : b; }

// Offset of row `row` of head `head` in batch `b` of a [B, heads, T, D] tensor.
__device__ __forceinline__ int64_t row_offset(int b, int heads, int head, int seq, int row, int d) {
  return ((static_cast<int64_t>(b) * heads + head) * seq + row) * d;
}

// The first key of batch row `b` that is not padding (seq when all are, 0 without a mask). Query
// rows before it see no key at all. Every thread of the block must call it; all get the result.
template <typename Scratch>
__device__ int first_visible_key(const uint8_t* key_mask, int b, int seq, Scratch& s_warp_min) {
  if (key_mask == nullptr) return 0;
  const int tid = static_cast<int>(threadIdx.x);
  int first = seq;
  for (int j = tid; j < seq; j += kThreads) {
    if (key_mask[static_cast<int64_t>(b) * seq + j] != 0) {
      first = j;
      break;
    }
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) first = min(first, __shfl_xor_sync(ql::kFullMask, first, off));
  if ((tid & 31) == 0) s_warp_min[tid >> 5] = first;
  __syncthreads();
  int all = seq;
  for (int w = 0; w < kWarps; ++w) {
    const int m = s_warp_min[w];
    all = min(all, m);
  }
  return all;
}

// Copies `rows` rows of D elements starting at global row offset `src` (rows past `valid` are
// zero) into a shared f32 tile with row stride `stride`, widened from `dtype`.
template <typename Tile>
__device__ __forceinline__ void load_rows(Tile& dst, int stride, const void* src, int64_t base, int rows,
                                          int valid, int d, int dtype) {
  for (int e = static_cast<int>(threadIdx.x); e < rows * d; e += kThreads) {
    const int r = e / d, c = e - r * d;
    dst[r * stride + c] = r < valid ? ql::load_as_f32(src, base + static_cast<int64_t>(r) * d + c, dtype) : 0.0f;
  }
}

// Dot product of shared rows a[ra * sa ..] and b[rb * sb ..] over d columns, in column order.
template <typename TileA, typename TileB>
__device__ __forceinline__ float row_dot(TileA& a, int ra, int sa, TileB& b, int rb, int sb, int d) {
  float acc = 0.0f;
  for (int c = 0; c < d; ++c) {
    const float x = a[ra * sa + c];
    const float y = b[rb * sb + c];
    acc = fmaf(x, y, acc);
  }
  return acc;
}

}  // namespace

// Forward. Grid (ceil(T / 16), Hq, B), 128 threads; the longest (last) query tiles start first.
// Warp w owns query rows 4w..4w+3 of the tile; for scores lane l takes key l of the key tile, for
// the output lanes split D. Key tiles stop at the diagonal unless the tile holds rows that see no
// key, which attend to every key (p = 1 / T).
extern "C" __global__ void __launch_bounds__(kThreads) k_attention_fwd(const QlAttentionForwardParams p) {
  QL_SHARED_ARRAY(float, s_q, kFwdRows * kMaxD);
  QL_SHARED_ARRAY(float, s_k, kKeyTile * kKvStride);
  QL_SHARED_ARRAY(float, s_v, kKeyTile * kMaxD);
  QL_SHARED_ARRAY(float, s_p, kWarps * kFwdRowsPerWarp * kKeyTile);
  QL_SHARED_ARRAY(int, s_keep, kKeyTile);
  QL_SHARED_ARRAY(int, s_warp_min, kWarps);
  const int T = p.seq, D = p.head_dim;
  const int q0 = (static_cast<int>(gridDim.x) - 1 - static_cast<int>(blockIdx.x)) * kFwdRows;
  const int h = static_cast<int>(blockIdx.y), b = static_cast<int>(blockIdx.z);
  const int kvh = h / (p.q_heads / p.kv_heads);
  const int warp = static_cast<int>(threadIdx.x) >> 5, lane = static_cast<int>(threadIdx.x) & 31;

  const int first_key = first_visible_key(p.key_mask, b, T, s_warp_min);
  const int key_end = q0 < first_key ? T : imin(T, q0 + kFwdRows);
  const int64_t q_base = row_offset(b, p.q_heads, h, T, q0, D);
  load_rows(s_q, kMaxD, p.q, q_base, kFwdRows, T - q0, D, p.dtype);

  float m[kFwdRowsPerWarp], l[kFwdRowsPerWarp], acc[kFwdRowsPerWarp][kColsPerLane];
#pragma unroll
  for (int r = 0; r < kFwdRowsPerWarp; ++r) {
    m[r] = neg_inf();
    l[r] = 0.0f;
#pragma unroll
    for (int c = 0; c < kColsPerLane; ++c) acc[r][c] = 0.0f;
  }

  for (int k0 = 0; k0 < key_end; k0 += kKeyTile) {
    __syncthreads();  // the previous tile's readers are done (and s_q is loaded)
    const int nk = imin(kKeyTile, T - k0);
    const int64_t kv_base = row_offset(b, p.kv_heads, kvh, T, k0, D);
    load_rows(s_k, kKvStride, p.k, kv_base, kKeyTile, nk, D, p.dtype);
    load_rows(s_v, kMaxD, p.v, kv_base, kKeyTile, nk, D, p.dtype);
    if (threadIdx.x < kKeyTile) {
      const int j = k0 + static_cast<int>(threadIdx.x);
      s_keep[threadIdx.x] = j < T && (p.key_mask == nullptr || p.key_mask[static_cast<int64_t>(b) * T + j] != 0);
    }
    __syncthreads();

    const int j = k0 + lane;
    const int keep = s_keep[lane];
#pragma unroll
    for (int r = 0; r < kFwdRowsPerWarp; ++r) {
      const int row = warp * kFwdRowsPerWarp + r, i = q0 + row;
      float s;
      if (i < first_key) {
        s = j < T ? 0.0f : neg_inf();
      } else {
        const float dot = row_dot(s_q, row, kMaxD, s_k, lane, kKvStride, D);
        s = (keep && j <= i) ? dot * p.scale : neg_inf();
      }
      const float m_new = fmaxf(m[r], warp_max(s));
      // A row with nothing visible yet keeps exp() away from (-inf) - (-inf).
      const float m_ref = m_new == neg_inf() ? 0.0f : m_new;
      const float e = expf(s - m_ref);
      const float alpha = expf(m[r] - m_ref);
      l[r] = l[r] * alpha + warp_sum(e);
      m[r] = m_new;
      s_p[row * kKeyTile + lane] = e;
#pragma unroll
      for (int c = 0; c < kColsPerLane; ++c) acc[r][c] *= alpha;
    }
    __syncwarp();
    for (int jj = 0; jj < nk; ++jj) {
#pragma unroll
      for (int r = 0; r < kFwdRowsPerWarp; ++r) {
        const float pj = s_p[(warp * kFwdRowsPerWarp + r) * kKeyTile + jj];
#pragma unroll
        for (int c = 0; c < kColsPerLane; ++c) {
          const int col = lane + 32 * c;
          if (col < D) {
            const float vv = s_v[jj * kMaxD + col];
            acc[r][c] = fmaf(pj, vv, acc[r][c]);
          }
        }
      }
    }
  }

#pragma unroll
  for (int r = 0; r < kFwdRowsPerWarp; ++r) {
    const int i = q0 + warp * kFwdRowsPerWarp + r;
    if (i >= T) continue;
    // Every row has a visible key or attends to all T keys, so l >= 1 after the max subtraction.
    const float inv = 1.0f / l[r];
    const int64_t out = q_base + static_cast<int64_t>(i - q0) * D;
#pragma unroll
    for (int c = 0; c < kColsPerLane; ++c) {
      const int col = lane + 32 * c;
      if (col < D) ql::store_from_f32(p.o, out + col, p.dtype, acc[r][c] * inv);
    }
    if (lane == 0) {
      const float m_ref = m[r] == neg_inf() ? 0.0f : m[r];
      p.lse[(static_cast<int64_t>(b) * p.q_heads + h) * T + i] = m_ref + logf(l[r]);
    }
  }
}
QL_EMU_ENTRY(k_attention_fwd, QlAttentionForwardParams)

// delta[row] = do[row]·o[row] over the B·Hq·T rows: one warp per row, 4 rows per block.
extern "C" __global__ void __launch_bounds__(kThreads) k_attention_bwd_delta(const QlAttentionBackwardParams p) {
  const int64_t rows = static_cast<int64_t>(p.batch) * p.q_heads * p.seq;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  const int lane = static_cast<int>(threadIdx.x) & 31;
  if (row >= rows) return;  // whole warps leave together
  const int64_t base = row * p.head_dim;
  float acc = 0.0f;
  for (int c = lane; c < p.head_dim; c += 32) {
    acc = fmaf(ql::load_as_f32(p.d_o, base + c, p.dtype), ql::load_as_f32(p.o, base + c, p.dtype), acc);
  }
  acc = warp_sum(acc);
  if (lane == 0) p.delta[row] = acc;
}
QL_EMU_ENTRY(k_attention_bwd_delta, QlAttentionBackwardParams)

// p and ds for query row i (lse, delta) and key j of score `dot` (unscaled) and dp = do·v.
__device__ __forceinline__ void prob_and_dscore(int i, int j, int seq, int first_key, int keep, float dot,
                                                float dp, float scale, float lse, float delta, float* prob,
                                                float* ds) {
  float pr;
  if (i >= seq) {
    pr = 0.0f;
  } else if (i < first_key) {
    pr = j < seq ? expf(-lse) : 0.0f;
  } else {
    pr = (keep && j <= i) ? expf(dot * scale - lse) : 0.0f;
  }
  *prob = pr;
  *ds = pr * (dp - delta);
}

// dq = scale · Σ_j ds[i, j] k[j]. Grid (ceil(T / 8), Hq, B), 128 threads; the same key-tile walk
// as the forward, with 2 query rows per warp.
extern "C" __global__ void __launch_bounds__(kThreads) k_attention_bwd_dq(const QlAttentionBackwardParams p) {
  QL_SHARED_ARRAY(float, s_q, kDqRows * kMaxD);
  QL_SHARED_ARRAY(float, s_do, kDqRows * kMaxD);
  QL_SHARED_ARRAY(float, s_k, kKeyTile * kKvStride);
  QL_SHARED_ARRAY(float, s_v, kKeyTile * kKvStride);
  QL_SHARED_ARRAY(float, s_ds, kDqRows * kKeyTile);
  QL_SHARED_ARRAY(int, s_keep, kKeyTile);
  QL_SHARED_ARRAY(int, s_warp_min, kWarps);
  const int T = p.seq, D = p.head_dim;
  const int q0 = (static_cast<int>(gridDim.x) - 1 - static_cast<int>(blockIdx.x)) * kDqRows;
  const int h = static_cast<int>(blockIdx.y), b = static_cast<int>(blockIdx.z);
  const int kvh = h / (p.q_heads / p.kv_heads);
  const int warp = static_cast<int>(threadIdx.x) >> 5, lane = static_cast<int>(threadIdx.x) & 31;

  const int first_key = first_visible_key(p.key_mask, b, T, s_warp_min);
  const int key_end = q0 < first_key ? T : imin(T, q0 + kDqRows);
  const int64_t q_base = row_offset(b, p.q_heads, h, T, q0, D);
  load_rows(s_q, kMaxD, p.q, q_base, kDqRows, T - q0, D, p.dtype);
  load_rows(s_do, kMaxD, p.d_o, q_base, kDqRows, T - q0, D, p.dtype);
  float lse[kDqRowsPerWarp], delta[kDqRowsPerWarp], acc[kDqRowsPerWarp][kColsPerLane];
#pragma unroll
  for (int r = 0; r < kDqRowsPerWarp; ++r) {
    const int i = q0 + warp * kDqRowsPerWarp + r;
    const int64_t stat = (static_cast<int64_t>(b) * p.q_heads + h) * T + i;
    lse[r] = i < T ? p.lse[stat] : 0.0f;
    delta[r] = i < T ? p.delta[stat] : 0.0f;
#pragma unroll
    for (int c = 0; c < kColsPerLane; ++c) acc[r][c] = 0.0f;
  }

  for (int k0 = 0; k0 < key_end; k0 += kKeyTile) {
    __syncthreads();
    const int nk = imin(kKeyTile, T - k0);
    const int64_t kv_base = row_offset(b, p.kv_heads, kvh, T, k0, D);
    load_rows(s_k, kKvStride, p.k, kv_base, kKeyTile, nk, D, p.dtype);
    load_rows(s_v, kKvStride, p.v, kv_base, kKeyTile, nk, D, p.dtype);
    if (threadIdx.x < kKeyTile) {
      const int j = k0 + static_cast<int>(threadIdx.x);
      s_keep[threadIdx.x] = j < T && (p.key_mask == nullptr || p.key_mask[static_cast<int64_t>(b) * T + j] != 0);
    }
    __syncthreads();

    const int j = k0 + lane;
    const int keep = s_keep[lane];
#pragma unroll
    for (int r = 0; r < kDqRowsPerWarp; ++r) {
      const int row = warp * kDqRowsPerWarp + r, i = q0 + row;
      const float dot = row_dot(s_q, row, kMaxD, s_k, lane, kKvStride, D);
      const float dp = row_dot(s_do, row, kMaxD, s_v, lane, kKvStride, D);
      float pr, ds;
      prob_and_dscore(i, j, T, first_key, keep, dot, dp, p.scale, lse[r], delta[r], &pr, &ds);
      s_ds[row * kKeyTile + lane] = ds;
    }
    __syncwarp();
    for (int jj = 0; jj < nk; ++jj) {
#pragma unroll
      for (int r = 0; r < kDqRowsPerWarp; ++r) {
        const float dsj = s_ds[(warp * kDqRowsPerWarp + r) * kKeyTile + jj];
#pragma unroll
        for (int c = 0; c < kColsPerLane; ++c) {
          const int col = lane + 32 * c;
          if (col < D) {
            const float kv = s_k[jj * kKvStride + col];
            acc[r][c] = fmaf(dsj, kv, acc[r][c]);
          }
        }
      }
    }
  }

#pragma unroll
  for (int r = 0; r < kDqRowsPerWarp; ++r) {
    const int i = q0 + warp * kDqRowsPerWarp + r;
    if (i >= T) continue;
    const int64_t out = q_base + static_cast<int64_t>(i - q0) * D;
#pragma unroll
    for (int c = 0; c < kColsPerLane; ++c) {
      const int col = lane + 32 * c;
      if (col < D) ql::store_from_f32(p.dq, out + col, p.dtype, acc[r][c] * p.scale);
    }
  }
}
QL_EMU_ENTRY(k_attention_bwd_dq, QlAttentionBackwardParams)

// dk = scale · Σ_i ds[i, j] q[i] and dv = Σ_i p[i, j] do[i], summed over every query head of the
// GQA group in head order, then query order. Grid (ceil(T / 32), Hkv, B), 128 threads: the block
// keeps its 32 keys and values in shared memory and their gradients in registers (warp w owns keys
// 8w..8w+7, lanes split D); query tiles of 8 rows stream through, skipping those that see none of
// these keys (above the diagonal, unless their rows see no key at all).
extern "C" __global__ void __launch_bounds__(kThreads) k_attention_bwd_dkdv(const QlAttentionBackwardParams p) {
  QL_SHARED_ARRAY(float, s_k, kKeyTile * kKvStride);
  QL_SHARED_ARRAY(float, s_v, kKeyTile * kKvStride);
  QL_SHARED_ARRAY(float, s_q, kDkvQueryRows * kMaxD);
  QL_SHARED_ARRAY(float, s_do, kDkvQueryRows * kMaxD);
  QL_SHARED_ARRAY(float, s_p, kDkvQueryRows * kKeyTile);
  QL_SHARED_ARRAY(float, s_ds, kDkvQueryRows * kKeyTile);
  QL_SHARED_ARRAY(float, s_stat, 2 * kDkvQueryRows);
  QL_SHARED_ARRAY(int, s_warp_min, kWarps);
  const int T = p.seq, D = p.head_dim;
  const int k0 = (static_cast<int>(gridDim.x) - 1 - static_cast<int>(blockIdx.x)) * kKeyTile;
  const int kvh = static_cast<int>(blockIdx.y), b = static_cast<int>(blockIdx.z);
  const int group = p.q_heads / p.kv_heads;
  const int warp = static_cast<int>(threadIdx.x) >> 5, lane = static_cast<int>(threadIdx.x) & 31;

  const int first_key = first_visible_key(p.key_mask, b, T, s_warp_min);
  const int nk = imin(kKeyTile, T - k0);
  const int64_t kv_base = row_offset(b, p.kv_heads, kvh, T, k0, D);
  load_rows(s_k, kKvStride, p.k, kv_base, kKeyTile, nk, D, p.dtype);
  load_rows(s_v, kKvStride, p.v, kv_base, kKeyTile, nk, D, p.dtype);
  const int j = k0 + lane;
  const int keep = j < T && (p.key_mask == nullptr || p.key_mask[static_cast<int64_t>(b) * T + j] != 0);

  float dk[kDkvKeysPerWarp][kColsPerLane], dv[kDkvKeysPerWarp][kColsPerLane];
#pragma unroll
  for (int kk = 0; kk < kDkvKeysPerWarp; ++kk) {
#pragma unroll
    for (int c = 0; c < kColsPerLane; ++c) dk[kk][c] = dv[kk][c] = 0.0f;
  }

  for (int g = 0; g < group; ++g) {
    const int h = kvh * group + g;
    for (int q0 = 0; q0 < T; q0 += kDkvQueryRows) {
      // Rows before the diagonal see these keys only if they see no key at all.
      if (q0 + kDkvQueryRows <= k0 && q0 >= first_key) continue;
      __syncthreads();  // the previous query tile's readers are done (and s_k, s_v are loaded)
      const int64_t q_base = row_offset(b, p.q_heads, h, T, q0, D);
      load_rows(s_q, kMaxD, p.q, q_base, kDkvQueryRows, T - q0, D, p.dtype);
      load_rows(s_do, kMaxD, p.d_o, q_base, kDkvQueryRows, T - q0, D, p.dtype);
      if (threadIdx.x < 2 * kDkvQueryRows) {
        const int r = static_cast<int>(threadIdx.x) % kDkvQueryRows;
        const int i = q0 + r;
        const int64_t stat = (static_cast<int64_t>(b) * p.q_heads + h) * T + i;
        s_stat[threadIdx.x] = i < T ? (threadIdx.x < kDkvQueryRows ? p.lse[stat] : p.delta[stat]) : 0.0f;
      }
      __syncthreads();

      // Scores: lane = key, warp w takes query rows w and w + 4.
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int row = warp + kWarps * half, i = q0 + row;
        const float dot = row_dot(s_q, row, kMaxD, s_k, lane, kKvStride, D);
        const float dp = row_dot(s_do, row, kMaxD, s_v, lane, kKvStride, D);
        const float lse = s_stat[row];
        const float delta = s_stat[kDkvQueryRows + row];
        float pr, ds;
        prob_and_dscore(i, j, T, first_key, keep, dot, dp, p.scale, lse, delta, &pr, &ds);
        s_p[row * kKeyTile + lane] = pr;
        s_ds[row * kKeyTile + lane] = ds;
      }
      __syncthreads();

      // Accumulation: warp w owns keys 8w.., lanes split D.
      for (int row = 0; row < kDkvQueryRows; ++row) {
#pragma unroll
        for (int c = 0; c < kColsPerLane; ++c) {
          const int col = lane + 32 * c;
          if (col >= D) continue;
          const float qv = s_q[row * kMaxD + col];
          const float dov = s_do[row * kMaxD + col];
#pragma unroll
          for (int kk = 0; kk < kDkvKeysPerWarp; ++kk) {
            const int key = warp * kDkvKeysPerWarp + kk;
            const float pr = s_p[row * kKeyTile + key];
            const float ds = s_ds[row * kKeyTile + key];
            dv[kk][c] = fmaf(pr, dov, dv[kk][c]);
            dk[kk][c] = fmaf(ds, qv, dk[kk][c]);
          }
        }
      }
    }
  }

#pragma unroll
  for (int kk = 0; kk < kDkvKeysPerWarp; ++kk) {
    const int key = warp * kDkvKeysPerWarp + kk;
    if (key >= nk) continue;
    const int64_t out = kv_base + static_cast<int64_t>(key) * D;
#pragma unroll
    for (int c = 0; c < kColsPerLane; ++c) {
      const int col = lane + 32 * c;
      if (col < D) {
        ql::store_from_f32(p.dk, out + col, p.dtype, dk[kk][c] * p.scale);
        ql::store_from_f32(p.dv, out + col, p.dtype, dv[kk][c]);
      }
    }
  }
}
QL_EMU_ENTRY(k_attention_bwd_dkdv, QlAttentionBackwardParams)

namespace {

// Tensor-core forward (bf16): 64 query rows per block (16 per warp, the m16n8k16 A tile), key
// tiles of 64, tiles kept in bf16 with rows of kMaxD + 8 elements (272 bytes: 16-byte aligned
// for ldmatrix, and eight consecutive rows start on eight different 4-bank groups).
constexpr int kMmaRows = kWarps * 16;
constexpr int kMmaKeys = 64;
constexpr int kMmaStride = kMaxD + 8;
constexpr int kMmaKSteps = kMaxD / 16;
constexpr int kMmaDTiles = kMaxD / 8;
constexpr int kMmaKeyTiles = kMmaKeys / 8;

__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
  return static_cast<uint32_t>(__bfloat16_as_ushort(__float2bfloat16_rn(lo))) |
         (static_cast<uint32_t>(__bfloat16_as_ushort(__float2bfloat16_rn(hi))) << 16);
}

// Copies `rows` rows of D bf16 (global rows past `valid` become zeros) into rows dst_row.. of a
// shared tile of row stride kMmaStride, in 16-byte chunks through cp.async when the source is 16-byte aligned, and
// commits them as one group; the caller waits. Columns D.. of the tile are left as they are.
template <typename Tile>
__device__ __forceinline__ void load_bf16_rows(Tile& dst, int dst_row, const void* src, int64_t base, int rows,
                                               int valid, int d, bool aligned) {
  const __nv_bfloat16* g = static_cast<const __nv_bfloat16*>(src);
  const int chunks = d / 8;
  for (int e = static_cast<int>(threadIdx.x); e < rows * chunks; e += kThreads) {
    const int r = e / chunks, c = (e - r * chunks) * 8;
    const int at = (dst_row + r) * kMmaStride + c;
    if (aligned) {
      const bool in = r < valid;
      cp_async_16_zfill(&dst[at], in ? g + base + static_cast<int64_t>(r) * d + c : g, in ? 16 : 0);
    } else {
      for (int x = 0; x < 8; ++x) {
        dst[at + x] = r < valid ? g[base + static_cast<int64_t>(r) * d + c + x] : __float2bfloat16_rn(0.0f);
      }
    }
  }
  cp_async_commit();
}

// Zeroes columns D..d16 of `rows` rows: they take part in the 16-wide k steps and no load
// writes them.
template <typename Tile>
__device__ __forceinline__ void zero_pad_columns(Tile& tile, int rows, int d, int d16) {
  const int pad = d16 - d;
  for (int e = static_cast<int>(threadIdx.x); e < rows * pad; e += kThreads) {
    const int r = e / pad;
    tile[r * kMmaStride + d + (e - r * pad)] = __float2bfloat16_rn(0.0f);
  }
}

// A fragments (16 rows from `row0`, k step ks) of a shared bf16 tile.
template <typename Tile>
__device__ __forceinline__ void load_a(uint32_t a[4], Tile& tile, int row0, int ks, int lane) {
  ldmatrix_x4(a, &tile[(row0 + (lane & 15)) * kMmaStride + ks * 16 + (lane >> 4) * 8]);
}

// B fragments of two n tiles (rows row0.. and row0 + 8.. of a tile stored [n][k], k step ks):
// registers 0-1 for the first n tile, 2-3 for the second.
template <typename Tile>
__device__ __forceinline__ void load_b_pair(uint32_t b[4], Tile& tile, int row0, int ks, int lane) {
  ldmatrix_x4(b, &tile[(row0 + (lane & 7) + ((lane >> 4) << 3)) * kMmaStride + ks * 16 + ((lane >> 3) & 1) * 8]);
}

// B fragments of two n tiles (columns n0.. and n0 + 8..) of a tile stored [k][n] (rows k0..k0+15).
template <typename Tile>
__device__ __forceinline__ void load_b_pair_trans(uint32_t b[4], Tile& tile, int k0, int n0, int lane) {
  ldmatrix_x4_trans(b, &tile[(k0 + (lane & 15)) * kMmaStride + n0 + (lane >> 4) * 8]);
}

// The A fragment of a 16×16 product operand from two 16×8 accumulator tiles (c0..c3 each),
// rounded to bf16: the m16n8k16 C layout of columns 0-7 and 8-15 is the A layout of k 0-15.
__device__ __forceinline__ void accumulators_as_a(uint32_t a[4], const float lo[4], const float hi[4]) {
  a[0] = pack_bf16x2(lo[0], lo[1]);
  a[1] = pack_bf16x2(lo[2], lo[3]);
  a[2] = pack_bf16x2(hi[0], hi[1]);
  a[3] = pack_bf16x2(hi[2], hi[3]);
}

}  // namespace

// Forward for bf16 on tensor cores (FlashAttention-2 order). Grid (ceil(T / 64), Hq, B), 128
// threads, the longest query tiles first. The block's q tile is staged through shared memory
// into A fragments held for the whole loop; per key tile, S = Q·Kᵀ (ldmatrix of K rows as the
// col-major B operand), the mask and online softmax on the accumulator fragments (rows g and
// g + 8 of the warp's 16, reduced across the 4 lanes of a quad), then P (rounded to bf16, the
// accumulators re-read as A fragments) · V (ldmatrix.trans). Same semantics as k_attention_fwd.
extern "C" __global__ void __launch_bounds__(kThreads) k_attention_fwd_mma(const QlAttentionForwardParams p) {
  QL_SHARED_ARRAY(__nv_bfloat16, s_k, kMmaKeys * kMmaStride);
  QL_SHARED_ARRAY(__nv_bfloat16, s_v, kMmaKeys * kMmaStride);
  QL_SHARED_ARRAY(int, s_keep, kMmaKeys);
  QL_SHARED_ARRAY(int, s_warp_min, kWarps);
  const int T = p.seq, D = p.head_dim;
  const int d16 = (D + 15) & ~15, ksteps = d16 / 16, dtiles = d16 / 8;
  const int q0 = (static_cast<int>(gridDim.x) - 1 - static_cast<int>(blockIdx.x)) * kMmaRows;
  const int h = static_cast<int>(blockIdx.y), b = static_cast<int>(blockIdx.z);
  const int kvh = h / (p.q_heads / p.kv_heads);
  const int tid = static_cast<int>(threadIdx.x), warp = tid >> 5, lane = tid & 31;
  const int g = lane >> 2, t = lane & 3;
  const bool aligned =
      ((reinterpret_cast<uintptr_t>(p.q) | reinterpret_cast<uintptr_t>(p.k) | reinterpret_cast<uintptr_t>(p.v)) & 15) == 0;

  const int first_key = first_visible_key(p.key_mask, b, T, s_warp_min);
  const int key_end = q0 < first_key ? T : imin(T, q0 + kMmaRows);
  zero_pad_columns(s_k, kMmaKeys, D, d16);
  zero_pad_columns(s_v, kMmaKeys, D, d16);
  const int64_t q_base = row_offset(b, p.q_heads, h, T, q0, D);
  load_bf16_rows(s_k, 0, p.q, q_base, kMmaRows, T - q0, D, aligned);
  cp_async_wait_all();
  __syncthreads();
  uint32_t qf[kMmaKSteps][4];
#pragma unroll
  for (int ks = 0; ks < kMmaKSteps; ++ks) {
    if (ks < ksteps) load_a(qf[ks], s_k, warp * 16, ks, lane);
  }

  float o[kMmaDTiles][4], m[2], l[2];
#pragma unroll
  for (int dt = 0; dt < kMmaDTiles; ++dt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) o[dt][e] = 0.0f;
  }
  m[0] = m[1] = neg_inf();
  l[0] = l[1] = 0.0f;

  for (int k0 = 0; k0 < key_end; k0 += kMmaKeys) {
    __syncthreads();  // every warp is done with the previous tile (and with the staged q)
    const int64_t kv_base = row_offset(b, p.kv_heads, kvh, T, k0, D);
    load_bf16_rows(s_k, 0, p.k, kv_base, kMmaKeys, T - k0, D, aligned);
    load_bf16_rows(s_v, 0, p.v, kv_base, kMmaKeys, T - k0, D, aligned);
    if (tid < kMmaKeys) {
      const int j = k0 + tid;
      s_keep[tid] = j < T && (p.key_mask == nullptr || p.key_mask[static_cast<int64_t>(b) * T + j] != 0);
    }
    cp_async_wait_all();
    __syncthreads();

    float s[kMmaKeyTiles][4];
#pragma unroll
    for (int nt = 0; nt < kMmaKeyTiles; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) s[nt][e] = 0.0f;
    }
#pragma unroll
    for (int ks = 0; ks < kMmaKSteps; ++ks) {
      if (ks >= ksteps) continue;
#pragma unroll
      for (int np = 0; np < kMmaKeyTiles / 2; ++np) {
        uint32_t kb[4];
        load_b_pair(kb, s_k, np * 16, ks, lane);
        mma_m16n8k16_bf16(s[2 * np], qf[ks], kb, s[2 * np]);
        mma_m16n8k16_bf16(s[2 * np + 1], qf[ks], kb + 2, s[2 * np + 1]);
      }
    }

#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int i = q0 + warp * 16 + g + 8 * half;
      const bool sees_none = i < first_key;
      float mx = neg_inf();
#pragma unroll
      for (int nt = 0; nt < kMmaKeyTiles; ++nt) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int jl = nt * 8 + 2 * t + e, j = k0 + jl;
          const int keep = s_keep[jl];
          float v;
          if (sees_none) {
            v = j < T ? 0.0f : neg_inf();
          } else {
            v = (keep && j <= i) ? s[nt][2 * half + e] * p.scale : neg_inf();
          }
          s[nt][2 * half + e] = v;
          mx = fmaxf(mx, v);
        }
      }
      mx = fmaxf(mx, __shfl_xor_sync(ql::kFullMask, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(ql::kFullMask, mx, 2));
      const float m_new = fmaxf(m[half], mx);
      const float m_ref = m_new == neg_inf() ? 0.0f : m_new;
      const float alpha = expf(m[half] - m_ref);
      float sum = 0.0f;
#pragma unroll
      for (int nt = 0; nt < kMmaKeyTiles; ++nt) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const float pr = expf(s[nt][2 * half + e] - m_ref);
          s[nt][2 * half + e] = pr;
          sum += pr;
        }
      }
      // l stays this lane's partial sum over its columns; the quad adds them at the end.
      l[half] = l[half] * alpha + sum;
      m[half] = m_new;
#pragma unroll
      for (int dt = 0; dt < kMmaDTiles; ++dt) {
        o[dt][2 * half] *= alpha;
        o[dt][2 * half + 1] *= alpha;
      }
    }

#pragma unroll
    for (int kk = 0; kk < kMmaKeyTiles / 2; ++kk) {
      uint32_t a[4];
      accumulators_as_a(a, s[2 * kk], s[2 * kk + 1]);
#pragma unroll
      for (int dp = 0; dp < kMmaDTiles / 2; ++dp) {
        if (2 * dp >= dtiles) continue;
        uint32_t vb[4];
        load_b_pair_trans(vb, s_v, kk * 16, dp * 16, lane);
        mma_m16n8k16_bf16(o[2 * dp], a, vb, o[2 * dp]);
        mma_m16n8k16_bf16(o[2 * dp + 1], a, vb + 2, o[2 * dp + 1]);
      }
    }
  }

#pragma unroll
  for (int half = 0; half < 2; ++half) {
    float total = l[half];
    total += __shfl_xor_sync(ql::kFullMask, total, 1);
    total += __shfl_xor_sync(ql::kFullMask, total, 2);
    const int i = q0 + warp * 16 + g + 8 * half;
    if (i >= T) continue;
    const float inv = 1.0f / total;
    const int64_t out = q_base + static_cast<int64_t>(i - q0) * D;
#pragma unroll
    for (int dt = 0; dt < kMmaDTiles; ++dt) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int col = dt * 8 + 2 * t + e;
        if (col < D) ql::store_from_f32(p.o, out + col, QL_DTYPE_BF16, o[dt][2 * half + e] * inv);
      }
    }
    if (t == 0) {
      const float m_ref = m[half] == neg_inf() ? 0.0f : m[half];
      p.lse[(static_cast<int64_t>(b) * p.q_heads + h) * T + i] = m_ref + logf(total);
    }
  }
}
QL_EMU_ENTRY(k_attention_fwd_mma, QlAttentionForwardParams)

namespace {
// The tensor-core dq pass takes key tiles of 32 (S and dP for 32 keys beside the q and do fragments
// and the dq accumulators stay within the register file); the dk/dv pass keeps 64 keys and streams
// queries 16 at a time.
constexpr int kDqMmaKeys = 32;
constexpr int kDkvMmaQueries = 16;
}  // namespace

// dq for bf16 on tensor cores. Grid (ceil(T / 64), Hq, B), 128 threads, warp w owning query rows
// 16w.. of the tile. q and do are staged through shared memory into A fragments; per key tile of
// 32, S = Q·Kᵀ and dP = dO·Vᵀ (K and V rows as col-major B operands), ds = p (dp - delta) on the
// accumulators, then dQ += dS·K (dS rounded to bf16 as A, K through ldmatrix.trans). Shared
// memory holds one 64-row tile: the staged q / do, then K in rows 0..31 and V in rows 32..63.
extern "C" __global__ void __launch_bounds__(kThreads) k_attention_bwd_dq_mma(const QlAttentionBackwardParams p) {
  QL_SHARED_ARRAY(__nv_bfloat16, s_kv, kMmaRows * kMmaStride);
  QL_SHARED_ARRAY(int, s_keep, kDqMmaKeys);
  QL_SHARED_ARRAY(int, s_warp_min, kWarps);
  const int T = p.seq, D = p.head_dim;
  const int d16 = (D + 15) & ~15, ksteps = d16 / 16, dtiles = d16 / 8;
  const int q0 = (static_cast<int>(gridDim.x) - 1 - static_cast<int>(blockIdx.x)) * kMmaRows;
  const int h = static_cast<int>(blockIdx.y), b = static_cast<int>(blockIdx.z);
  const int kvh = h / (p.q_heads / p.kv_heads);
  const int tid = static_cast<int>(threadIdx.x), warp = tid >> 5, lane = tid & 31;
  const int g = lane >> 2, t = lane & 3;
  const bool aligned = ((reinterpret_cast<uintptr_t>(p.q) | reinterpret_cast<uintptr_t>(p.k) |
                         reinterpret_cast<uintptr_t>(p.v) | reinterpret_cast<uintptr_t>(p.d_o)) & 15) == 0;

  const int first_key = first_visible_key(p.key_mask, b, T, s_warp_min);
  const int key_end = q0 < first_key ? T : imin(T, q0 + kMmaRows);
  zero_pad_columns(s_kv, kMmaRows, D, d16);
  const int64_t q_base = row_offset(b, p.q_heads, h, T, q0, D);
  uint32_t qf[kMmaKSteps][4], dof[kMmaKSteps][4];
  load_bf16_rows(s_kv, 0, p.q, q_base, kMmaRows, T - q0, D, aligned);
  cp_async_wait_all();
  __syncthreads();
#pragma unroll
  for (int ks = 0; ks < kMmaKSteps; ++ks) {
    if (ks < ksteps) load_a(qf[ks], s_kv, warp * 16, ks, lane);
  }
  __syncthreads();
  load_bf16_rows(s_kv, 0, p.d_o, q_base, kMmaRows, T - q0, D, aligned);
  cp_async_wait_all();
  __syncthreads();
#pragma unroll
  for (int ks = 0; ks < kMmaKSteps; ++ks) {
    if (ks < ksteps) load_a(dof[ks], s_kv, warp * 16, ks, lane);
  }

  float lse[2], delta[2], dq[kMmaDTiles][4];
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int i = q0 + warp * 16 + g + 8 * half;
    const int64_t stat = (static_cast<int64_t>(b) * p.q_heads + h) * T + i;
    lse[half] = i < T ? p.lse[stat] : 0.0f;
    delta[half] = i < T ? p.delta[stat] : 0.0f;
  }
#pragma unroll
  for (int dt = 0; dt < kMmaDTiles; ++dt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) dq[dt][e] = 0.0f;
  }

  for (int k0 = 0; k0 < key_end; k0 += kDqMmaKeys) {
    __syncthreads();  // every warp is done with the previous tile (and with the staged do)
    const int64_t kv_base = row_offset(b, p.kv_heads, kvh, T, k0, D);
    load_bf16_rows(s_kv, 0, p.k, kv_base, kDqMmaKeys, T - k0, D, aligned);
    load_bf16_rows(s_kv, kDqMmaKeys, p.v, kv_base, kDqMmaKeys, T - k0, D, aligned);
    if (tid < kDqMmaKeys) {
      const int j = k0 + tid;
      s_keep[tid] = j < T && (p.key_mask == nullptr || p.key_mask[static_cast<int64_t>(b) * T + j] != 0);
    }
    cp_async_wait_all();
    __syncthreads();

    float s[kDqMmaKeys / 8][4], dp[kDqMmaKeys / 8][4];
#pragma unroll
    for (int nt = 0; nt < kDqMmaKeys / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) s[nt][e] = dp[nt][e] = 0.0f;
    }
#pragma unroll
    for (int ks = 0; ks < kMmaKSteps; ++ks) {
      if (ks >= ksteps) continue;
#pragma unroll
      for (int np = 0; np < kDqMmaKeys / 16; ++np) {
        uint32_t kb[4], vb[4];
        load_b_pair(kb, s_kv, np * 16, ks, lane);
        load_b_pair(vb, s_kv, kDqMmaKeys + np * 16, ks, lane);
        mma_m16n8k16_bf16(s[2 * np], qf[ks], kb, s[2 * np]);
        mma_m16n8k16_bf16(s[2 * np + 1], qf[ks], kb + 2, s[2 * np + 1]);
        mma_m16n8k16_bf16(dp[2 * np], dof[ks], vb, dp[2 * np]);
        mma_m16n8k16_bf16(dp[2 * np + 1], dof[ks], vb + 2, dp[2 * np + 1]);
      }
    }
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int i = q0 + warp * 16 + g + 8 * half;
#pragma unroll
      for (int nt = 0; nt < kDqMmaKeys / 8; ++nt) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int jl = nt * 8 + 2 * t + e;
          const int keep = s_keep[jl];
          float pr, ds;
          prob_and_dscore(i, k0 + jl, T, first_key, keep, s[nt][2 * half + e], dp[nt][2 * half + e], p.scale,
                          lse[half], delta[half], &pr, &ds);
          s[nt][2 * half + e] = ds;
        }
      }
    }
#pragma unroll
    for (int kk = 0; kk < kDqMmaKeys / 16; ++kk) {
      uint32_t a[4];
      accumulators_as_a(a, s[2 * kk], s[2 * kk + 1]);
#pragma unroll
      for (int dp2 = 0; dp2 < kMmaDTiles / 2; ++dp2) {
        if (2 * dp2 >= dtiles) continue;
        uint32_t kb[4];
        load_b_pair_trans(kb, s_kv, kk * 16, dp2 * 16, lane);
        mma_m16n8k16_bf16(dq[2 * dp2], a, kb, dq[2 * dp2]);
        mma_m16n8k16_bf16(dq[2 * dp2 + 1], a, kb + 2, dq[2 * dp2 + 1]);
      }
    }
  }

#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int i = q0 + warp * 16 + g + 8 * half;
    if (i >= T) continue;
    const int64_t out = q_base + static_cast<int64_t>(i - q0) * D;
#pragma unroll
    for (int dt = 0; dt < kMmaDTiles; ++dt) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int col = dt * 8 + 2 * t + e;
        if (col < D) ql::store_from_f32(p.dq, out + col, QL_DTYPE_BF16, dq[dt][2 * half + e] * p.scale);
      }
    }
  }
}
QL_EMU_ENTRY(k_attention_bwd_dq_mma, QlAttentionBackwardParams)

// dk and dv for bf16 on tensor cores. Grid (ceil(T / 64), Hkv, B), 128 threads, warp w owning
// keys 16w.. of the block's 64 (kept in shared memory, their gradients in registers). Query tiles
// of 16 stream through for every query head of the GQA group in order: Sᵀ = K·Qᵀ and dPᵀ = V·dOᵀ
// (K, V rows as A, q and do rows as col-major B), pᵀ and dsᵀ on the accumulators (lse and delta
// per column), then dV += Pᵀ·dO and dK += dSᵀ·Q (bf16 A from the accumulators, q and do through
// ldmatrix.trans). Tiles that see none of these keys are skipped, as in k_attention_bwd_dkdv.
extern "C" __global__ void __launch_bounds__(kThreads) k_attention_bwd_dkdv_mma(const QlAttentionBackwardParams p) {
  QL_SHARED_ARRAY(__nv_bfloat16, s_k, kMmaKeys * kMmaStride);
  QL_SHARED_ARRAY(__nv_bfloat16, s_v, kMmaKeys * kMmaStride);
  QL_SHARED_ARRAY(__nv_bfloat16, s_q, kDkvMmaQueries * kMmaStride);
  QL_SHARED_ARRAY(__nv_bfloat16, s_do, kDkvMmaQueries * kMmaStride);
  QL_SHARED_ARRAY(float, s_stat, 2 * kDkvMmaQueries);
  QL_SHARED_ARRAY(int, s_warp_min, kWarps);
  const int T = p.seq, D = p.head_dim;
  const int d16 = (D + 15) & ~15, ksteps = d16 / 16, dtiles = d16 / 8;
  const int k0 = (static_cast<int>(gridDim.x) - 1 - static_cast<int>(blockIdx.x)) * kMmaKeys;
  const int kvh = static_cast<int>(blockIdx.y), b = static_cast<int>(blockIdx.z);
  const int group = p.q_heads / p.kv_heads;
  const int tid = static_cast<int>(threadIdx.x), warp = tid >> 5, lane = tid & 31;
  const int g = lane >> 2, t = lane & 3;
  const bool aligned = ((reinterpret_cast<uintptr_t>(p.q) | reinterpret_cast<uintptr_t>(p.k) |
                         reinterpret_cast<uintptr_t>(p.v) | reinterpret_cast<uintptr_t>(p.d_o)) & 15) == 0;

  const int first_key = first_visible_key(p.key_mask, b, T, s_warp_min);
  zero_pad_columns(s_k, kMmaKeys, D, d16);
  zero_pad_columns(s_v, kMmaKeys, D, d16);
  zero_pad_columns(s_q, kDkvMmaQueries, D, d16);
  zero_pad_columns(s_do, kDkvMmaQueries, D, d16);
  const int64_t kv_base = row_offset(b, p.kv_heads, kvh, T, k0, D);
  load_bf16_rows(s_k, 0, p.k, kv_base, kMmaKeys, T - k0, D, aligned);
  load_bf16_rows(s_v, 0, p.v, kv_base, kMmaKeys, T - k0, D, aligned);
  int keep[2];
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int j = k0 + warp * 16 + g + 8 * half;
    keep[half] = j < T && (p.key_mask == nullptr || p.key_mask[static_cast<int64_t>(b) * T + j] != 0);
  }

  float dk[kMmaDTiles][4], dv[kMmaDTiles][4];
#pragma unroll
  for (int dt = 0; dt < kMmaDTiles; ++dt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[dt][e] = dv[dt][e] = 0.0f;
  }

  for (int gi = 0; gi < group; ++gi) {
    const int h = kvh * group + gi;
    for (int q0 = 0; q0 < T; q0 += kDkvMmaQueries) {
      // Rows before the diagonal see these keys only if they see no key at all.
      if (q0 + kDkvMmaQueries <= k0 && q0 >= first_key) continue;
      __syncthreads();  // every warp is done with the previous query tile
      const int64_t q_base = row_offset(b, p.q_heads, h, T, q0, D);
      load_bf16_rows(s_q, 0, p.q, q_base, kDkvMmaQueries, T - q0, D, aligned);
      load_bf16_rows(s_do, 0, p.d_o, q_base, kDkvMmaQueries, T - q0, D, aligned);
      if (tid < 2 * kDkvMmaQueries) {
        const int r = tid % kDkvMmaQueries, i = q0 + r;
        const int64_t stat = (static_cast<int64_t>(b) * p.q_heads + h) * T + i;
        s_stat[tid] = i < T ? (tid < kDkvMmaQueries ? p.lse[stat] : p.delta[stat]) : 0.0f;
      }
      cp_async_wait_all();
      __syncthreads();

      float st[2][4], dpt[2][4];
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) st[nt][e] = dpt[nt][e] = 0.0f;
      }
#pragma unroll
      for (int ks = 0; ks < kMmaKSteps; ++ks) {
        if (ks >= ksteps) continue;
        uint32_t ka[4], va[4], qb[4], dob[4];
        load_a(ka, s_k, warp * 16, ks, lane);
        load_a(va, s_v, warp * 16, ks, lane);
        load_b_pair(qb, s_q, 0, ks, lane);
        load_b_pair(dob, s_do, 0, ks, lane);
        mma_m16n8k16_bf16(st[0], ka, qb, st[0]);
        mma_m16n8k16_bf16(st[1], ka, qb + 2, st[1]);
        mma_m16n8k16_bf16(dpt[0], va, dob, dpt[0]);
        mma_m16n8k16_bf16(dpt[1], va, dob + 2, dpt[1]);
      }
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int j = k0 + warp * 16 + g + 8 * half;
#pragma unroll
        for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int il = nt * 8 + 2 * t + e;
            const float lse = s_stat[il];
            const float delta = s_stat[kDkvMmaQueries + il];
            float pr, ds;
            prob_and_dscore(q0 + il, j, T, first_key, keep[half], st[nt][2 * half + e], dpt[nt][2 * half + e],
                            p.scale, lse, delta, &pr, &ds);
            st[nt][2 * half + e] = pr;
            dpt[nt][2 * half + e] = ds;
          }
        }
      }
      uint32_t pa[4], dsa[4];
      accumulators_as_a(pa, st[0], st[1]);
      accumulators_as_a(dsa, dpt[0], dpt[1]);
#pragma unroll
      for (int dp2 = 0; dp2 < kMmaDTiles / 2; ++dp2) {
        if (2 * dp2 >= dtiles) continue;
        uint32_t dob[4], qb[4];
        load_b_pair_trans(dob, s_do, 0, dp2 * 16, lane);
        load_b_pair_trans(qb, s_q, 0, dp2 * 16, lane);
        mma_m16n8k16_bf16(dv[2 * dp2], pa, dob, dv[2 * dp2]);
        mma_m16n8k16_bf16(dv[2 * dp2 + 1], pa, dob + 2, dv[2 * dp2 + 1]);
        mma_m16n8k16_bf16(dk[2 * dp2], dsa, qb, dk[2 * dp2]);
        mma_m16n8k16_bf16(dk[2 * dp2 + 1], dsa, qb + 2, dk[2 * dp2 + 1]);
      }
    }
  }

#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int key = warp * 16 + g + 8 * half;
    if (k0 + key >= T) continue;
    const int64_t out = kv_base + static_cast<int64_t>(key) * D;
#pragma unroll
    for (int dt = 0; dt < kMmaDTiles; ++dt) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int col = dt * 8 + 2 * t + e;
        if (col < D) {
          ql::store_from_f32(p.dk, out + col, QL_DTYPE_BF16, dk[dt][2 * half + e] * p.scale);
          ql::store_from_f32(p.dv, out + col, QL_DTYPE_BF16, dv[dt][2 * half + e]);
        }
      }
    }
  }
}
QL_EMU_ENTRY(k_attention_bwd_dkdv_mma, QlAttentionBackwardParams)
