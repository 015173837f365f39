// NF4 dequant-GEMM on tensor cores, for training shapes (M = tokens, typically ≥ 256):
//   k_nf4_gemm     y[M, N]  = x[M, K] · dequant(W)[N, K]^T    (forward)
//   k_nf4_gemm_dx  dx[M, K] = dy[M, N] · dequant(W)[N, K]     (input gradient)
// and their *_general twins for shapes or alignments the fast path does not take (see the end).
// x / dy bf16, output f32 or bf16 (overwritten, one rounding), W in bitsandbytes NF4 exactly as
// kernels/nf4.cu reads it (blocks of `blocksize` over the flattened [N, K] weight, first code of a
// byte in the high nibble, f32 or double-quantized scales). Any M, N, K ≥ 1.
//
// Numerics: w = bf16(code[q] · scale) with scale and the product rounded in f32 exactly as
// k_nf4_dequantize rounds them, so the weight the MMA sees is bit-identical to the bf16 buffer the
// dequantize + cuBLAS path multiplies; products of bf16 are exact in f32 and summed in f32 by the
// tensor cores (mma.sync m16n8k16, f32 accumulate).
//
// Tiling: a 256-thread block (8 warps as 2 × 4) computes a 128 × 128 output tile, each warp 64 × 32
// (4 × 4 mma tiles, 64 f32 accumulators per thread), stepping the reduction by 32. Per step:
//  - the activation tile (128 rows × 32 bf16) comes in by cp.async, double-buffered, zero-filled
//    past the edges;
//  - the weight tile (4096 codes, 2 KB) is read by one 8-byte load per thread (16 codes of one
//    quantization block, since every block size is a multiple of 16) issued a step ahead into
//    registers, together with that block's scale words; after the step's MMAs the thread
//    dequantizes its 16 codes (code book and nested map in shared memory) and stores them as bf16
//    into the other shared buffer. Each block row of the grid reads the codes once, 4 bits each
//    (mostly from L2); no bf16 copy of W ever exists in global memory.
// Shared rows are padded by 16 bytes (80 or 272-byte strides), so ldmatrix reads eight rows from
// eight distinct bank quads. The forward keeps the weight tile as [n][k] (k contiguous), which is
// already the mma "col" B operand (plain ldmatrix); the dx kernel keeps it as [n][k] too, with n
// now the reduction, so it reads it with ldmatrix.trans. When K % 16 != 0 (rows of W start
// mid-block or mid-byte), the reduction length is not a multiple of 8, or a base is misaligned,
// the general kernels build both tiles element by element with the same arithmetic: correct
// everywhere, fast where Llama shapes are. Registers of the fast kernels: ≤ 128 (two 8-warp blocks
// per SM, 84 KB of static shared memory), 0 spills on sm_80 and sm_90 (scripts/ptxas-report.sh).
#include "common.cuh"

namespace {

constexpr int kThreads = 256;
constexpr int kBM = 128;  // rows of x / dy per block
constexpr int kBN = 128;  // output columns per block
constexpr int kBK = 32;   // reduction step
constexpr int kWarpsN = 4;
constexpr int kWM = 64;   // warp tile rows
constexpr int kWN = 32;   // warp tile columns
constexpr int kMT = kWM / 16;
constexpr int kNT = kWN / 8;
constexpr int kAStride = kBK / 8 + 1;  // uint4 per padded activation row
constexpr int kCodesPerThread = 16;
constexpr uint32_t kGroupM = 8;  // row tiles per rasterization group

static_assert(kBM * kBN == kThreads * kWM * kWN / 32, "8 warps cover the block tile");
static_assert(kBN * kBK == kThreads * kCodesPerThread, "one 16-code chunk of W per thread");
static_assert(kBM * kBK / 8 == 2 * kThreads, "two 16-byte chunks of the activations per thread");

// The weight tile in shared memory, rows n and columns k of W: forward [kBN][kBK] (n is the output
// column), dx [kBK][kBN] (n is the reduction).
template <bool kDx>
struct WTile {
  static constexpr int kRows = kDx ? kBK : kBN;
  static constexpr int kCols = kDx ? kBN : kBK;
  static constexpr int kStride = kCols / 8 + 1;  // uint4 per padded row
  static constexpr int kChunksPerRow = kCols / kCodesPerThread;
};

// A thread's 16 codes of the next weight tile and the words of their block scale, loaded one step
// ahead so the loads are in flight during the MMAs.
struct WStage {
  uint2 codes;
  float scale_word;  // f32 absmax, or nested_absmax of the block's nested block (double quant)
  uint32_t q;        // 8-bit scale code (double quant)
  bool valid;
};

struct Ctx {
  int64_t n, k;           // W is [n, k]
  int64_t rows;           // M
  int64_t red;            // reduction length: k (forward) or n (dx)
  int64_t out_cols;       // n (forward) or k (dx)
  int bs_shift, nested_shift;
  bool double_quant;
};

__device__ __forceinline__ uint32_t bf16_bits(float v) {
  return static_cast<uint32_t>(__bfloat16_as_ushort(__float2bfloat16_rn(v)));
}

// Two values rounded to bf16 in one conversion, `first` in the low half (the lower index).
__device__ __forceinline__ uint32_t bf16x2_bits(float first, float second) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(first, second);
  return static_cast<uint32_t>(__bfloat16_as_ushort(v.x)) | (static_cast<uint32_t>(__bfloat16_as_ushort(v.y)) << 16);
}

// Scale of block b from its words: f32, or nested_code[q] · nested_absmax + offset with the two
// f32 roundings of kernels/nf4.cu.
template <class Nested>
__device__ __forceinline__ float scale_of(const QlNf4GemmParams& p, const Ctx& c, Nested& s_nested, uint32_t q,
                                          float word) {
  if (!c.double_quant) return word;
  const float nested = s_nested[q];
  return __fadd_rn(__fmul_rn(nested, word), p.nested_offset);
}

template <bool kDx>
__device__ __forceinline__ void w_chunk_origin(int tid, int64_t n_base, int64_t k_base, int64_t& wn, int64_t& wk,
                                               int& row, int& col) {
  row = tid / WTile<kDx>::kChunksPerRow;
  col = (tid % WTile<kDx>::kChunksPerRow) * kCodesPerThread;
  wn = n_base + row;
  wk = k_base + col;
}

// Fast path (K % 16 == 0, codes 8-byte aligned): a chunk lies in one row of W and one quantization
// block, and is either wholly inside the tile or wholly past its edge.
template <bool kDx>
__device__ __forceinline__ WStage fetch_w(const QlNf4GemmParams& p, const Ctx& c, int tid, int64_t n_base,
                                          int64_t k_base) {
  int64_t wn, wk;
  int row, col;
  w_chunk_origin<kDx>(tid, n_base, k_base, wn, wk, row, col);
  WStage s;
  s.valid = wn < c.n && wk < c.k;
  s.codes = make_uint2(0u, 0u);
  s.scale_word = 0.0f;
  s.q = 0u;
  if (s.valid) {
    const int64_t f = wn * c.k + wk;
    s.codes = __ldg(reinterpret_cast<const uint2*>(p.packed + (f >> 1)));
    const int64_t b = f >> c.bs_shift;
    if (c.double_quant) {
      s.q = __ldg(&p.absmax_q[b]);
      s.scale_word = __ldg(&p.nested_absmax[b >> c.nested_shift]);
    } else {
      s.scale_word = __ldg(&p.absmax[b]);
    }
  }
  return s;
}

// Dequantizes a fetched chunk into the weight tile of `stage`.
template <bool kDx, class Ws, class Code, class Nested>
__device__ __forceinline__ void store_w(const QlNf4GemmParams& p, const Ctx& c, Ws& ws, Code& s_code,
                                        Nested& s_nested, int stage, int tid, const WStage& s) {
  int64_t wn, wk;
  int row, col;
  w_chunk_origin<kDx>(tid, 0, 0, wn, wk, row, col);
  uint32_t words[8];
  if (s.valid) {
    const float scale = scale_of(p, c, s_nested, s.q, s.scale_word);
    const uint32_t raw[2] = {s.codes.x, s.codes.y};
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const uint32_t byte = (raw[i / 4] >> (8 * (i % 4))) & 0xffu;  // little-endian: byte i in memory
      const float hi = s_code[byte >> 4];                            // first element of the byte
      const float lo = s_code[byte & 0xfu];
      words[i] = bf16x2_bits(__fmul_rn(hi, scale), __fmul_rn(lo, scale));
    }
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i) words[i] = 0u;
  }
  const int r = stage * WTile<kDx>::kRows + row;
  ws[r][col / 8] = make_uint4(words[0], words[1], words[2], words[3]);
  ws[r][col / 8 + 1] = make_uint4(words[4], words[5], words[6], words[7]);
}

// General path: the same chunk built element by element (rows of W starting mid-byte, blocks
// straddling the chunk, partial chunks at the K edge).
template <bool kDx, class Ws, class Code, class Nested>
__device__ __forceinline__ void build_w_general(const QlNf4GemmParams& p, const Ctx& c, Ws& ws, Code& s_code,
                                                Nested& s_nested, int stage, int tid, int64_t n_base,
                                                int64_t k_base) {
  int64_t wn, wk;
  int row, col;
  w_chunk_origin<kDx>(tid, n_base, k_base, wn, wk, row, col);
  uint32_t words[8];
  int64_t cached_block = -1;
  float scale = 0.0f;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    uint32_t pair = 0u;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t kk = wk + 2 * i + h;
      if (wn < c.n && kk < c.k) {
        const int64_t f = wn * c.k + kk;
        const int64_t b = f >> c.bs_shift;
        if (b != cached_block) {
          cached_block = b;
          const uint32_t q = c.double_quant ? static_cast<uint32_t>(__ldg(&p.absmax_q[b])) : 0u;
          const float word = c.double_quant ? __ldg(&p.nested_absmax[b >> c.nested_shift]) : __ldg(&p.absmax[b]);
          scale = scale_of(p, c, s_nested, q, word);
        }
        const uint32_t byte = __ldg(&p.packed[f >> 1]);
        const float code = s_code[(f & 1) ? (byte & 0xfu) : (byte >> 4)];
        pair |= bf16_bits(__fmul_rn(code, scale)) << (16 * h);
      }
    }
    words[i] = pair;
  }
  const int r = stage * WTile<kDx>::kRows + row;
  ws[r][col / 8] = make_uint4(words[0], words[1], words[2], words[3]);
  ws[r][col / 8 + 1] = make_uint4(words[4], words[5], words[6], words[7]);
}

// The activation tile (rows m0.., reduction columns r0..) of a row-major bf16 [rows, red] matrix.
template <class As>
__device__ __forceinline__ void load_a(const QlNf4GemmParams& p, const Ctx& c, As& as, int stage, int tid,
                                       int64_t m0, int64_t r0, bool vec) {
  const __nv_bfloat16* a = static_cast<const __nv_bfloat16*>(p.a);
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int chunk = tid + kThreads * i;
    const int row = chunk / (kBK / 8), c8 = chunk % (kBK / 8);
    const int64_t gm = m0 + row, gr = r0 + 8 * c8;
    if (vec) {
      // red % 8 == 0: a chunk is wholly inside or wholly outside the row.
      const bool valid = gm < c.rows && gr < c.red;
      const __nv_bfloat16* src = valid ? a + gm * c.red + gr : a;
      cp_async_16_zfill(&as[stage * kBM + row][c8], src, valid ? 16 : 0);
    } else {
      uint32_t words[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        uint32_t pair = 0u;
        for (int h = 0; h < 2; ++h) {
          const int64_t col = gr + 2 * e + h;
          if (gm < c.rows && col < c.red) {
            pair |= static_cast<uint32_t>(__bfloat16_as_ushort(a[gm * c.red + col])) << (16 * h);
          }
        }
        words[e] = pair;
      }
      as[stage * kBM + row][c8] = make_uint4(words[0], words[1], words[2], words[3]);
    }
  }
}

// The main loop and epilogue. kFast: activation rows 16-byte aligned with a reduction length that
// is a multiple of 8 (cp.async chunks), and the fast weight path (K % 16 == 0, codes 8-byte
// aligned); otherwise both tiles are built element by element.
template <bool kDx, bool kFast, class SA, class SW, class Code, class Nested>
__device__ __forceinline__ void gemm_body(const QlNf4GemmParams& p, const Ctx& c, SA& s_a, SW& s_w, Code& s_code,
                                          Nested& s_nested) {
  const int tid = static_cast<int>(threadIdx.x);
  const int warp = tid / 32, lane = tid % 32;
  // Grouped rasterization: consecutive blocks walk down kGroupM row tiles before moving one column
  // tile on, so a group's activation rows stay in L2 while each weight tile is read by kGroupM
  // consecutive blocks (instead of W streaming from DRAM once per row tile). The launcher keeps
  // the grid under 2^31 blocks, so 32-bit arithmetic suffices.
  const uint32_t grid_x = gridDim.x, grid_y = gridDim.y;
  const uint32_t block = blockIdx.y * grid_x + blockIdx.x;
  const uint32_t per_group = kGroupM * grid_x;
  const uint32_t first_tile_m = block / per_group * kGroupM;
  const uint32_t group_rows = min(grid_y - first_tile_m, static_cast<uint32_t>(kGroupM));
  const int64_t m0 = static_cast<int64_t>(first_tile_m + block % per_group % group_rows) * kBM;
  const int64_t o0 = static_cast<int64_t>(block % per_group / group_rows) * kBN;  // first output column
  const int ktiles = static_cast<int>((c.red + kBK - 1) / kBK);
  constexpr bool vec_a = kFast, vec_w = kFast;
  using W = WTile<kDx>;
  // W tile origin (row n, column k) of reduction step t.
  auto w_n = [&](int t) -> int64_t { return kDx ? static_cast<int64_t>(t) * kBK : o0; };
  auto w_k = [&](int t) -> int64_t { return kDx ? o0 : static_cast<int64_t>(t) * kBK; };

  const int wm0 = (warp / kWarpsN) * kWM, wn0 = (warp % kWarpsN) * kWN;
  float acc[kMT][kNT][4];
#pragma unroll
  for (int i = 0; i < kMT; ++i)
#pragma unroll
    for (int j = 0; j < kNT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.0f;

  load_a(p, c, s_a, 0, tid, m0, 0, vec_a);
  cp_async_commit();
  if constexpr (vec_w) {
    store_w<kDx>(p, c, s_w, s_code, s_nested, 0, tid, fetch_w<kDx>(p, c, tid, w_n(0), w_k(0)));
  } else {
    build_w_general<kDx>(p, c, s_w, s_code, s_nested, 0, tid, w_n(0), w_k(0));
  }

#pragma unroll 1
  for (int kt = 0; kt < ktiles; ++kt) {
    const int stage = kt & 1;
    const bool has_next = kt + 1 < ktiles;
    WStage next = {};
    if (has_next) {
      load_a(p, c, s_a, stage ^ 1, tid, m0, static_cast<int64_t>(kt + 1) * kBK, vec_a);
      cp_async_commit();
      if constexpr (vec_w) next = fetch_w<kDx>(p, c, tid, w_n(kt + 1), w_k(kt + 1));
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();

#pragma unroll
    for (int ks = 0; ks < kBK; ks += 16) {
      uint32_t b[kNT][2];
#pragma unroll
      for (int np = 0; np < kNT / 2; ++np) {
        uint32_t r[4];
        if (kDx) {
          // Matrices: (n 0-7, k 0-7), (n 8-15, k 0-7), (n 0-7, k 8-15), (n 8-15, k 8-15), transposed.
          ldmatrix_x4_trans(
              r, &s_w[stage * W::kRows + ks + ((lane / 8) & 1) * 8 + (lane % 8)][(wn0 + np * 16) / 8 + lane / 16]);
        } else {
          // Matrices: (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7), (n 8-15, k 8-15).
          ldmatrix_x4(r, &s_w[stage * W::kRows + wn0 + np * 16 + (lane / 16) * 8 + (lane % 8)][ks / 8 + ((lane / 8) & 1)]);
        }
        b[2 * np][0] = r[0];
        b[2 * np][1] = r[1];
        b[2 * np + 1][0] = r[2];
        b[2 * np + 1][1] = r[3];
      }
      // One A fragment live at a time (4 registers, not 16): the 64 accumulators leave little room.
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) {
        uint32_t a[4];
        ldmatrix_x4(a, &s_a[stage * kBM + wm0 + mt * 16 + (lane % 16)][ks / 8 + lane / 16]);
#pragma unroll
        for (int nt = 0; nt < kNT; ++nt) mma_m16n8k16_bf16(acc[mt][nt], a, b[nt], acc[mt][nt]);
      }
    }

    if (has_next) {
      // The other buffer was last read in step kt - 1, before this step's barrier.
      if constexpr (vec_w) {
        store_w<kDx>(p, c, s_w, s_code, s_nested, stage ^ 1, tid, next);
      } else {
        build_w_general<kDx>(p, c, s_w, s_code, s_nested, stage ^ 1, tid, w_n(kt + 1), w_k(kt + 1));
      }
    }
    // Step kt + 1 overwrites this step's activation buffer.
    __syncthreads();
  }

  const int g = lane / 4, t = lane % 4;
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int64_t row = m0 + wm0 + mt * 16 + g + (e >= 2 ? 8 : 0);
        const int64_t col = o0 + wn0 + nt * 8 + 2 * t + (e & 1);
        if (row < c.rows && col < c.out_cols) ql::store_from_f32(p.out, row * c.out_cols + col, p.out_dtype, acc[mt][nt][e]);
      }
    }
  }
}

template <bool kDx, bool kFast>
__device__ __forceinline__ void gemm_entry(const QlNf4GemmParams& p) {
  using W = WTile<kDx>;
  QL_SHARED_ARRAY2(uint4, s_a, 2 * kBM, kAStride);
  QL_SHARED_ARRAY2(uint4, s_w, 2 * W::kRows, W::kStride);
  QL_SHARED_ARRAY(float, s_code, 16);
  QL_SHARED_ARRAY(float, s_nested, 256);

  const int tid = static_cast<int>(threadIdx.x);
  Ctx c;
  c.n = p.n;
  c.k = p.k;
  c.rows = p.m;
  c.red = kDx ? p.n : p.k;
  c.out_cols = kDx ? p.k : p.n;
  c.bs_shift = __ffs(p.blocksize) - 1;
  c.double_quant = p.absmax == nullptr;
  c.nested_shift = c.double_quant ? __ffs(p.nested_blocksize) - 1 : 0;

  if (tid < 16) s_code[tid] = __ldg(&p.code[tid]);
  if (c.double_quant) s_nested[tid] = __ldg(&p.nested_code[tid]);
  __syncthreads();
  gemm_body<kDx, kFast>(p, c, s_a, s_w, s_code, s_nested);
}

}  // namespace

// Fast kernels: the launcher takes them only when the reduction length is a multiple of 8 and
// K of 16, the activations are 16-byte aligned and the codes 8-byte aligned (see kFast); the
// *_general kernels take any shape and alignment. Separate kernels rather than a runtime switch:
// together the two paths need more than the 128 registers two resident blocks per SM allow. The
// general kernels (the slow path anyway) may use more registers, one block per SM, to not spill.
// Grid (ceil(out / 128), ceil(m / 128)), 256 threads, out = n (y) or k (dx).
extern "C" __global__ void __launch_bounds__(kThreads, 2) k_nf4_gemm(const QlNf4GemmParams p) {
  gemm_entry<false, true>(p);
}
QL_EMU_ENTRY(k_nf4_gemm, QlNf4GemmParams)

extern "C" __global__ void __launch_bounds__(kThreads, 2) k_nf4_gemm_dx(const QlNf4GemmParams p) {
  gemm_entry<true, true>(p);
}
QL_EMU_ENTRY(k_nf4_gemm_dx, QlNf4GemmParams)

extern "C" __global__ void __launch_bounds__(kThreads, 1) k_nf4_gemm_general(const QlNf4GemmParams p) {
  gemm_entry<false, false>(p);
}
QL_EMU_ENTRY(k_nf4_gemm_general, QlNf4GemmParams)

extern "C" __global__ void __launch_bounds__(kThreads, 1) k_nf4_gemm_dx_general(const QlNf4GemmParams p) {
  gemm_entry<true, false>(p);
}
QL_EMU_ENTRY(k_nf4_gemm_dx_general, QlNf4GemmParams)
