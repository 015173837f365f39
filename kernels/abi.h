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

#endif /* QLORA_ABI_H */
