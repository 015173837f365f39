/* Parameter structs shared by the CUDA kernels (nvcc), their CPU emulation (g++) and Rust (bindgen).
 * Every kernel takes exactly one of these structs by value; pointers are device pointers on CUDA
 * and host pointers under the emulation. Plain C, fixed-width fields only. */
#ifndef QLORA_ABI_H
#define QLORA_ABI_H

#include <stdint.h>

/* Element types of kernel inputs and outputs. */
typedef enum QlDtype {
  QL_DTYPE_F32 = 0,
  QL_DTYPE_BF16 = 1,
  QL_DTYPE_F16 = 2
} QlDtype;

/* Grid and block of one launch, as cudaLaunchKernel takes them. */
typedef struct QlLaunchConfig {
  uint32_t grid[3];
  uint32_t block[3];
  uint32_t dynamic_smem_bytes;
} QlLaunchConfig;

/* NF4 blockwise quantization of `n` elements: one absmax per `blocksize` consecutive elements,
 * two 4-bit codes per byte, the first element in the high nibble. */
typedef struct QlNf4QuantizeParams {
  const void* input;   /* [n] of in_dtype */
  const float* code;   /* [16] code book, ascending */
  uint8_t* packed;     /* [(n + 1) / 2] */
  float* absmax;       /* [ceil(n / blocksize)] */
  int64_t n;
  int32_t blocksize;
  int32_t in_dtype;    /* QlDtype */
} QlNf4QuantizeParams;

/* NF4 dequantization. With `absmax` non-null the block scales are f32; otherwise they are double
 * quantized: scale[b] = nested_code[absmax_q[b]] * nested_absmax[b / nested_blocksize] + nested_offset. */
typedef struct QlNf4DequantizeParams {
  const uint8_t* packed;       /* [(n + 1) / 2] */
  const float* code;           /* [16] */
  const float* absmax;         /* [nblocks] f32 scales, or null for double quant */
  const uint8_t* absmax_q;     /* [nblocks] 8-bit scale codes (double quant) */
  const float* nested_code;    /* [256] dynamic 8-bit code map (double quant) */
  const float* nested_absmax;  /* [ceil(nblocks / nested_blocksize)] (double quant) */
  void* out;                   /* [n] of out_dtype */
  int64_t n;
  float nested_offset;
  int32_t blocksize;
  int32_t nested_blocksize;
  int32_t out_dtype;           /* QlDtype */
} QlNf4DequantizeParams;

/* Self-test kernels of the CPU emulation (kernels/emu_selftest.cu); run on a GPU they check the
 * emulator's semantics against silicon. Element types and shapes are per kernel. */
typedef struct QlEmuTestParams {
  const void* a;       /* first input */
  const void* b;       /* second input */
  const void* c;       /* third input */
  float* out;          /* f32 output */
  uint32_t* out_u32;   /* u32 output */
  int32_t m;
  int32_t n;
  int32_t k;
  int32_t flags;       /* per-kernel switches */
} QlEmuTestParams;

/* ---- Llama hot ops (kernels/llama.cu): RMSNorm, RoPE, SwiGLU, forward and backward. ---- */

/* RMSNorm forward over `rows` rows of width `h`: rstd = rsqrt(mean(x^2) + eps),
 * y = w * dtype(x * rstd) (Hugging Face LlamaRMSNorm). x, w and y share `dtype`. */
typedef struct QlRmsNormForwardParams {
  const void* x;   /* [rows, h] */
  const void* w;   /* [h] */
  void* y;         /* [rows, h] */
  float* rstd;     /* [rows], kept for the backward */
  int64_t rows;
  int32_t h;
  float eps;
  int32_t dtype;   /* QlDtype */
} QlRmsNormForwardParams;

/* RMSNorm backward, first pass: dx per row, and per row-block partial sums of dw = sum dy * x * rstd
 * (one row of `dw_partial` per block of the grid, summed in a fixed order by k_rmsnorm_dw_reduce). */
typedef struct QlRmsNormBackwardParams {
  const void* dy;         /* [rows, h] */
  const void* x;          /* [rows, h] */
  const void* w;          /* [h] */
  const float* rstd;      /* [rows] */
  void* dx;               /* [rows, h] */
  float* dw_partial;      /* [gridDim.x, h] */
  int64_t rows;
  int32_t h;
  int32_t dtype;          /* QlDtype of dy, x, w and dx */
} QlRmsNormBackwardParams;

/* dw[c] = sum over b < partial_rows of dw_partial[b, c], in order of b. */
typedef struct QlRmsNormDwReduceParams {
  const float* dw_partial;  /* [partial_rows, h] */
  float* dw;                /* [h] */
  int32_t partial_rows;
  int32_t h;
} QlRmsNormDwReduceParams;

/* Rotate-half RoPE in place on q [tokens, q_heads, head_dim] and k [tokens, kv_heads, head_dim]:
 * for i < head_dim / 2, (a, b) = (v[i], v[i + head_dim / 2]) becomes (a c - b s, b c + a s) with
 * c = cos[pos, i], s = sin[pos, i], pos = positions[token]; `inverse` = 1 rotates by -angle (the
 * backward on dq / dk). A position outside [0, num_positions) writes NaN into that token's heads. */
typedef struct QlRopeParams {
  void* q;                 /* [tokens, q_heads, head_dim] */
  void* k;                 /* [tokens, kv_heads, head_dim] */
  const float* cos;        /* [num_positions, head_dim / 2] */
  const float* sin;        /* [num_positions, head_dim / 2] */
  const int32_t* positions; /* [tokens] */
  int64_t tokens;
  int32_t q_heads;
  int32_t kv_heads;
  int32_t head_dim;
  int32_t num_positions;
  int32_t inverse;
  int32_t dtype;           /* QlDtype of q and k */
} QlRopeParams;

/* SwiGLU on n elements: forward h = silu(g) * u; backward dg = dh * u * silu'(g), du = dh * silu(g).
 * The forward reads g, u and writes h; the backward reads g, u, dh and writes dg, du. */
typedef struct QlSwigluParams {
  const void* g;   /* [n] */
  const void* u;   /* [n] */
  const void* dh;  /* [n], backward only */
  void* h;         /* [n], forward only */
  void* dg;        /* [n], backward only */
  void* du;        /* [n], backward only */
  int64_t n;
  int32_t dtype;   /* QlDtype of every buffer */
} QlSwigluParams;

/* ---- Fused AdamW (kernels/adamw.cu) ---------------------------------------------------------- */

/* The per-step scalars of torch.optim.AdamW, computed on the host in f64 and rounded to f32 once,
 * as torch's CPU kernels round their Python-float arguments. */
typedef struct QlAdamWScalars {
  float decay;            /* 1 - lr * weight_decay */
  float one_minus_beta1;  /* lerp weight of the first moment */
  float beta2;
  float one_minus_beta2;
  float neg_step_size;    /* -lr / (1 - beta1^t) */
  float bc2_sqrt;         /* (1 - beta2^t)^0.5 */
  float eps;
  float grad_scale;       /* multiplies the gradient first (clipping, loss scaling); 1 = none */
} QlAdamWScalars;

/* One AdamW step over `n` elements with f32 moments, everything updated in place. */
typedef struct QlAdamWParams {
  void* param;            /* [n] of param_dtype */
  const void* grad;       /* [n] of grad_dtype */
  float* m;               /* [n] first moment */
  float* v;               /* [n] second moment */
  int64_t n;
  QlAdamWScalars s;
  int32_t param_dtype;    /* QlDtype */
  int32_t grad_dtype;     /* QlDtype */
} QlAdamWParams;

/* One AdamW step with 8-bit blockwise moments: blocks of 256 consecutive elements, one u8 code per
 * element and one f32 absmax per block for each moment (m: signed dynamic map, v: unsigned). */
typedef struct QlAdamW8bitParams {
  void* param;            /* [n] of param_dtype */
  const void* grad;       /* [n] of grad_dtype */
  uint8_t* m_q;           /* [n] */
  uint8_t* v_q;           /* [n] */
  float* m_absmax;        /* [ceil(n / 256)] */
  float* v_absmax;        /* [ceil(n / 256)] */
  const float* m_code;    /* [256] signed dynamic map, ascending */
  const float* v_code;    /* [256] unsigned dynamic map, ascending */
  int64_t n;
  QlAdamWScalars s;
  int32_t param_dtype;    /* QlDtype */
  int32_t grad_dtype;     /* QlDtype */
} QlAdamW8bitParams;

/* ---- NF4 small-M GEMV (kernels/nf4_gemv.cu) ------------------------------------------------- */

/* y[m, n] = sum_k x[m, k] * w[n, k] (+ bias[n]) for m < M <= 16, with w the NF4 [N, K] weight:
 * blocks of `blocksize` over the flattened [N, K] array, scales as in QlNf4DequantizeParams
 * (`absmax` non-null: f32; else double quantized). f32 accumulation, one rounding to y_dtype. */
typedef struct QlNf4GemvParams {
  const void* x;               /* [m, k] of x_dtype */
  const uint8_t* packed;       /* [ceil(n * k / 2)] */
  const float* code;           /* [16] */
  const float* absmax;         /* [nblocks] f32 scales, or null for double quant */
  const uint8_t* absmax_q;     /* [nblocks] 8-bit scale codes (double quant) */
  const float* nested_code;    /* [256] dynamic 8-bit code map (double quant) */
  const float* nested_absmax;  /* [ceil(nblocks / nested_blocksize)] (double quant) */
  const void* bias;            /* [n] of y_dtype, or null */
  void* y;                     /* [m, n] of y_dtype */
  int64_t n;
  int64_t k;
  float nested_offset;
  int32_t m;
  int32_t blocksize;
  int32_t nested_blocksize;
  int32_t x_dtype;             /* QlDtype: F32 or BF16 */
  int32_t y_dtype;             /* QlDtype: F32 or BF16 */
} QlNf4GemvParams;

/* ---- NF4 dequant-GEMM on tensor cores (kernels/nf4_gemm.cu) ------------------------------ */

/* k_nf4_gemm: out[m, n] = sum_k a[m, k] * w[n, k] (a = x [m, k]);
 * k_nf4_gemm_dx: out[m, k] = sum_n a[m, n] * w[n, k] (a = dy [m, n]).
 * w is the NF4 [n, k] weight (blocks of `blocksize` over the flattened array, scales as in
 * QlNf4DequantizeParams), each element rounded to bf16 after dequantization; a is bf16; products
 * summed in f32 and rounded once to out_dtype; out is overwritten. */
typedef struct QlNf4GemmParams {
  const void* a;               /* bf16: x [m, k] or dy [m, n] */
  const uint8_t* packed;       /* [ceil(n * k / 2)] */
  const float* code;           /* [16] */
  const float* absmax;         /* [nblocks] f32 scales, or null for double quant */
  const uint8_t* absmax_q;     /* [nblocks] 8-bit scale codes (double quant) */
  const float* nested_code;    /* [256] dynamic 8-bit code map (double quant) */
  const float* nested_absmax;  /* [ceil(nblocks / nested_blocksize)] (double quant) */
  void* out;                   /* y [m, n] or dx [m, k] of out_dtype */
  int64_t m;
  int64_t n;
  int64_t k;
  float nested_offset;
  int32_t blocksize;           /* a power of two >= 16 */
  int32_t nested_blocksize;    /* a power of two */
  int32_t out_dtype;           /* QlDtype: F32 or BF16 */
} QlNf4GemmParams;

/* ---- Chunked cross-entropy (kernels/cross_entropy.cu) ---------------------------------------- */

/* Cross-entropy forward over a chunk of `rows` logit rows: per row, lse = logsumexp(logits[row])
 * and loss = lse - logits[row, label] in f32. Rows whose label is -100 are skipped (loss 0, lse 0);
 * a label outside [0, vocab) otherwise gives a NaN loss. */
typedef struct QlCrossEntropyForwardParams {
  const void* logits;      /* [rows, vocab] of dtype */
  const int32_t* labels;   /* [rows] */
  float* lse;              /* [rows] */
  float* losses;           /* [rows] */
  int64_t rows;
  int32_t vocab;
  int32_t dtype;           /* QlDtype: F32 or BF16 */
} QlCrossEntropyForwardParams;

/* Cross-entropy backward in place: logits[row] becomes (exp(logits[row] - lse[row]) -
 * onehot(label)) * grad_scale (grad_scale = dloss / label tokens of the batch); rows whose label is
 * -100 become 0, and a label outside [0, vocab) otherwise fills its row with NaN. */
typedef struct QlCrossEntropyBackwardParams {
  void* logits;            /* [rows, vocab] of dtype, read then overwritten by dlogits */
  const int32_t* labels;   /* [rows] */
  const float* lse;        /* [rows], from the forward */
  int64_t rows;
  int32_t vocab;
  float grad_scale;
  int32_t dtype;           /* QlDtype: F32 or BF16 */
} QlCrossEntropyBackwardParams;

/* ---- Fused LoRA (kernels/lora.cu): rank <= 64, f32 accumulation -------------------------- */

/* out[m, j] = sum_c x[m, c] * W(j, c) for m < rows, j < rank, in f32: T = X·Aᵀ (k_lora_xa, W = A
 * [rank, cols]) or U = dY·B (k_lora_dyb, W(j, c) = B[c, j], B [cols, rank]). */
typedef struct QlLoraProjectParams {
  const void* x;   /* [rows, cols] of x_dtype: X or dY */
  const void* w;   /* A [rank, cols] or B [cols, rank], of w_dtype */
  float* out;      /* [rows, rank] */
  int64_t rows;
  int32_t cols;
  int32_t rank;
  int32_t x_dtype; /* QlDtype: F32 or BF16 */
  int32_t w_dtype; /* QlDtype: F32 or BF16 */
} QlLoraProjectParams;

/* y[m, c] += scale * sum_j t[m, j] * W(j, c) in place, one rounding to y_dtype: Y += s·T·Bᵀ
 * (k_lora_add, W(j, c) = B[c, j]) or dX += s·U·A (k_lora_dx, W = A [rank, cols]). */
typedef struct QlLoraExpandParams {
  const float* t;  /* [rows, rank]: T or U */
  const void* w;   /* B [cols, rank] or A [rank, cols], of w_dtype */
  void* y;         /* [rows, cols] of y_dtype, read and written once */
  int64_t rows;
  int32_t cols;
  int32_t rank;
  float scale;
  int32_t w_dtype; /* QlDtype: F32 or BF16 */
  int32_t y_dtype; /* QlDtype: F32 or BF16 */
} QlLoraExpandParams;

/* out(j, c) = scale * sum_m p[m, c] * q[m, j], summed over m in order, overwriting out:
 * dB = s·dYᵀ·T (k_lora_db, out [cols, rank]) or dA = s·Uᵀ·X (k_lora_da, out [rank, cols]). */
typedef struct QlLoraGradWParams {
  const void* p;   /* [rows, cols] of p_dtype: dY or X */
  const float* q;  /* [rows, rank]: T or U */
  float* out;      /* dB [cols, rank] or dA [rank, cols] */
  int64_t rows;
  int32_t cols;
  int32_t rank;
  float scale;
  int32_t p_dtype; /* QlDtype: F32 or BF16 */
} QlLoraGradWParams;

/* ---- Causal attention (kernels/attention.cu): flash-style tiles, online softmax in f32 ---------- */

/* Causal self-attention forward as Hugging Face's eager Llama attention computes it: for query
 * head h (kv head h / (q_heads / kv_heads)), scores s[i, j] = scale * q[i]·k[j], key j visible to
 * query i when j <= i and key_mask[b, j] != 0, o[i] = softmax_j(s[i, :]) · v in f32. A row with no
 * visible key (every key up to i masked) attends uniformly to all `seq` keys, as the runtime's
 * additive mask of the dtype's minimum makes it: o[i] = mean of v, lse[i] = ln(seq).
 * lse[row] = logsumexp of the row's visible scores, saved for the backward. Taken by
 * k_attention_fwd (f32, CUDA cores) and k_attention_fwd_mma (bf16, tensor cores). */
typedef struct QlAttentionForwardParams {
  const void* q;             /* [batch, q_heads, seq, head_dim] of dtype */
  const void* k;             /* [batch, kv_heads, seq, head_dim] of dtype */
  const void* v;             /* [batch, kv_heads, seq, head_dim] of dtype */
  const uint8_t* key_mask;   /* [batch, seq], 1 = attend, 0 = padding; null = no padding */
  void* o;                   /* [batch, q_heads, seq, head_dim] of dtype */
  float* lse;                /* [batch, q_heads, seq] */
  int32_t batch;
  int32_t q_heads;
  int32_t kv_heads;
  int32_t seq;
  int32_t head_dim;          /* multiple of 8, <= 128 */
  float scale;               /* head_dim^-0.5 as transformers applies it, in f32 */
  int32_t dtype;             /* QlDtype: F32 or BF16 */
} QlAttentionForwardParams;

/* Attention backward (FlashAttention-2 order): k_attention_bwd_delta writes delta[row] =
 * do[row]·o[row]; k_attention_bwd_dq then writes dq and k_attention_bwd_dkdv dk, dv (the _mma
 * variants on tensor cores for bf16), each recomputing p = exp(s - lse) and ds = p * (do·v - delta)
 * tile by tile. dk and dv sum the query
 * heads of a GQA group inside one block, in a fixed order (no atomics). Rows with no visible key
 * take p = 1 / seq over every key, the gradient the runtime's autograd gives through its mask. */
typedef struct QlAttentionBackwardParams {
  const void* q;             /* [batch, q_heads, seq, head_dim] of dtype */
  const void* k;             /* [batch, kv_heads, seq, head_dim] of dtype */
  const void* v;             /* [batch, kv_heads, seq, head_dim] of dtype */
  const uint8_t* key_mask;   /* [batch, seq] or null, as in the forward */
  const void* o;             /* [batch, q_heads, seq, head_dim] of dtype, the forward's output */
  const void* d_o;           /* [batch, q_heads, seq, head_dim] of dtype */
  const float* lse;          /* [batch, q_heads, seq], from the forward */
  float* delta;              /* [batch, q_heads, seq]: written by _delta, read by _dq and _dkdv */
  void* dq;                  /* [batch, q_heads, seq, head_dim] of dtype */
  void* dk;                  /* [batch, kv_heads, seq, head_dim] of dtype */
  void* dv;                  /* [batch, kv_heads, seq, head_dim] of dtype */
  int32_t batch;
  int32_t q_heads;
  int32_t kv_heads;
  int32_t seq;
  int32_t head_dim;
  float scale;
  int32_t dtype;             /* QlDtype: F32 or BF16 */
} QlAttentionBackwardParams;

#endif /* QLORA_ABI_H */
