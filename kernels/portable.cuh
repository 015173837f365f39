/* The one header every kernel includes first. Under nvcc it gives the real CUDA headers and the
 * inline-PTX tensor-core / async-copy wrappers; under QL_EMULATION (g++, set by build.rs) the CPU
 * emulation in emu/cuda_emu.h with the same names. Kernels write no inline PTX outside this file.
 *
 * Shared memory is declared only through these macros, so the emulation can bounds- and
 * race-check it:
 *   QL_SHARED_ARRAY(T, name, N)        __shared__ T name[N]      (16-byte aligned)
 *   QL_SHARED_ARRAY2(T, name, R, C)    __shared__ T name[R][C]   (16-byte aligned)
 *   QL_DYNAMIC_SHARED(T, name)         T* name over the launch's dynamic shared bytes
 * Under the emulation an element is a proxy: read it into a variable of type T (not `auto`), and
 * copy struct elements (float4 v = s[i];) rather than writing s[i].x. Raw pointers taken from an
 * array (&s[i], s + i, passing s to a T* parameter) work, but only the ldmatrix / cp.async
 * wrappers and atomics check what is done through them.
 * After each kernel, QL_EMU_ENTRY(kernel, Params) defines the emulated entry `qlemu_<kernel>`. */
#ifndef QLORA_PORTABLE_CUH
#define QLORA_PORTABLE_CUH

#include "abi.h"

#if defined(__CUDACC__)

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#define QL_SHARED_ARRAY(T, name, N) __shared__ __align__(16) T name[N]
#define QL_SHARED_ARRAY2(T, name, R, C) __shared__ __align__(16) T name[R][C]
#define QL_DYNAMIC_SHARED(T, name)                     \
  extern __shared__ __align__(16) unsigned char name##_ql_bytes[]; \
  T* name = reinterpret_cast<T*>(name##_ql_bytes)
#define QL_EMU_ENTRY(kernel, Params)

/* mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32: d = a·b + c, fragments as in
 * docs/ARCHITECTURE.md, "Tensor-core fragments". */
__device__ __forceinline__ void mma_m16n8k16_bf16(float d[4], const uint32_t a[4], const uint32_t b[2],
                                                  const float c[4]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%10,%11,%12,%13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
        "f"(c[3]));
}

/* ldmatrix.sync.aligned.m8n8.x{4,2}[.trans].shared.b16; every lane passes its row address. */
__device__ __forceinline__ void ldmatrix_x4(uint32_t r[4], const void* smem_row_ptr) {
  const unsigned p = static_cast<unsigned>(__cvta_generic_to_shared(smem_row_ptr));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(p)
               : "memory");
}
__device__ __forceinline__ void ldmatrix_x2(uint32_t r[2], const void* smem_row_ptr) {
  const unsigned p = static_cast<unsigned>(__cvta_generic_to_shared(smem_row_ptr));
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(p)
               : "memory");
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t r[4], const void* smem_row_ptr) {
  const unsigned p = static_cast<unsigned>(__cvta_generic_to_shared(smem_row_ptr));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(p)
               : "memory");
}
__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t r[2], const void* smem_row_ptr) {
  const unsigned p = static_cast<unsigned>(__cvta_generic_to_shared(smem_row_ptr));
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(p)
               : "memory");
}

/* cp.async.cg (16 bytes, L2 only); the _zfill form reads src_bytes (0..16) and zeroes the rest. */
__device__ __forceinline__ void cp_async_16(void* smem_dst, const void* gmem_src) {
  const unsigned p = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(p), "l"(gmem_src) : "memory");
}
__device__ __forceinline__ void cp_async_16_zfill(void* smem_dst, const void* gmem_src, int src_bytes) {
  const unsigned p = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(p), "l"(gmem_src), "r"(src_bytes)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
/* Waits until at most N of this thread's committed groups are still in flight. */
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;\n" ::: "memory"); }

#elif defined(QL_EMULATION)

#include "emu/cuda_emu.h"

#define QL_SHARED_ARRAY(T, name, N) QLEMU_SHARED_ARRAY(T, name, N)
#define QL_SHARED_ARRAY2(T, name, R, C) QLEMU_SHARED_ARRAY2(T, name, R, C)
#define QL_DYNAMIC_SHARED(T, name) QLEMU_DYNAMIC_SHARED(T, name)
#define QL_EMU_ENTRY(kernel, Params) QLEMU_ENTRY(kernel, Params)

inline void mma_m16n8k16_bf16(float d[4], const uint32_t a[4], const uint32_t b[2], const float c[4]) {
  qlemu::mma_bf16_16816(d, a, b, c);
}
inline void ldmatrix_x4(uint32_t r[4], const void* smem_row_ptr) { qlemu::ldmatrix(r, 4, false, smem_row_ptr); }
inline void ldmatrix_x2(uint32_t r[2], const void* smem_row_ptr) { qlemu::ldmatrix(r, 2, false, smem_row_ptr); }
inline void ldmatrix_x4_trans(uint32_t r[4], const void* smem_row_ptr) { qlemu::ldmatrix(r, 4, true, smem_row_ptr); }
inline void ldmatrix_x2_trans(uint32_t r[2], const void* smem_row_ptr) { qlemu::ldmatrix(r, 2, true, smem_row_ptr); }
inline void cp_async_16(void* smem_dst, const void* gmem_src) { qlemu::cp_async(smem_dst, gmem_src, 16); }
inline void cp_async_16_zfill(void* smem_dst, const void* gmem_src, int src_bytes) {
  qlemu::cp_async(smem_dst, gmem_src, src_bytes);
}
inline void cp_async_commit() { qlemu::cp_async_commit(); }
template <int N>
inline void cp_async_wait() {
  qlemu::cp_async_wait(N);
}
inline void cp_async_wait_all() { qlemu::cp_async_wait_all(); }

#else
#error "kernels are compiled by nvcc or, for the CPU emulation, with -DQL_EMULATION"
#endif

#endif /* QLORA_PORTABLE_CUH */
