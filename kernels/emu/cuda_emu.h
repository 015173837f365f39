/* CPU emulation of the CUDA execution model for g++ (included by kernels/portable.cuh when
 * QL_EMULATION is defined): built-in variables, qualifiers, bf16/f16 and vector types, intrinsics,
 * atomics, warp collectives, and bounds- and race-checked __shared__ arrays. Runtime: cuda_emu.cpp. */
#ifndef QLORA_CUDA_EMU_H
#define QLORA_CUDA_EMU_H

/* Every standard header the emulation or a kernel may need comes first: `__noinline__` below is
 * also an attribute name that libstdc++ headers spell out, so none may be included after it. */
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <type_traits>
#include <utility>

#include "abi.h"

/* `#pragma unroll` is CUDA's and g++ ignores it; GCC 13+ also honours this switch for the
 * warning (GCC 12 needs -Wno-unknown-pragmas on the command line). */
#pragma GCC diagnostic ignored "-Wunknown-pragmas"

/* ---- Qualifiers: plain C++ on the CPU ---- */
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
/* Namespace-scope constant tables live in headers included by several kernel files, which all
 * link into one library here: internal linkage keeps them from clashing. */
#define __constant__ static

/* ---- Vector types and launch dimensions ---- */
struct __align__(8) float2 { float x, y; };
struct __align__(16) float4 { float x, y, z, w; };
struct __align__(8) int2 { int x, y; };
struct __align__(16) int4 { int x, y, z, w; };
struct __align__(8) uint2 { unsigned x, y; };
struct __align__(16) uint4 { unsigned x, y, z, w; };
struct __align__(4) uchar4 { unsigned char x, y, z, w; };
struct __align__(4) ushort2 { unsigned short x, y; };
struct uint3 { unsigned x, y, z; };
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
};

inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline int2 make_int2(int x, int y) { return {x, y}; }
inline int4 make_int4(int x, int y, int z, int w) { return {x, y, z, w}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
inline uchar4 make_uchar4(unsigned char x, unsigned char y, unsigned char z, unsigned char w) {
  return {x, y, z, w};
}
inline ushort2 make_ushort2(unsigned short x, unsigned short y) { return {x, y}; }
inline uint3 make_uint3(unsigned x, unsigned y, unsigned z) { return {x, y, z}; }

/* Per emulated thread (thread_local) and per launch (set before the threads start). */
extern thread_local uint3 threadIdx;
extern thread_local uint3 blockIdx;
extern dim3 blockDim;
extern dim3 gridDim;
constexpr int warpSize = 32;

/* ---- Bit casts and float intrinsics (-ffp-contract=off keeps a*b+c unfused, as *_rn are) ---- */
namespace qlemu {
template <class To, class From>
inline To bit_cast(const From& v) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast between types of different sizes");
  To out;
  std::memcpy(&out, &v, sizeof(To));
  return out;
}
}  // namespace qlemu

inline unsigned __float_as_uint(float x) { return qlemu::bit_cast<unsigned>(x); }
inline float __uint_as_float(unsigned x) { return qlemu::bit_cast<float>(x); }
inline int __float_as_int(float x) { return qlemu::bit_cast<int>(x); }
inline float __int_as_float(int x) { return qlemu::bit_cast<float>(x); }
inline long long __double_as_longlong(double x) { return qlemu::bit_cast<long long>(x); }
inline double __longlong_as_double(long long x) { return qlemu::bit_cast<double>(x); }

inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline float __frcp_rn(float a) { return 1.0f / a; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
/* The fast-math intrinsics are approximations on the GPU (a few ulp); here they are the libm
 * functions, so a kernel's tolerance must cover the GPU's error, not the emulation's. */
inline float __fdividef(float a, float b) { return a / b; }
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __powf(float a, float b) { return std::pow(a, b); }
inline float __sinf(float x) { return std::sin(x); }
inline float __cosf(float x) { return std::cos(x); }
inline void __sincosf(float x, float* s, float* c) {
  *s = std::sin(x);
  *c = std::cos(x);
}
inline float __saturatef(float x) { return x != x ? 0.0f : std::min(std::max(x, 0.0f), 1.0f); }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }

inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline int __clzll(long long x) {
  return x == 0 ? 64 : __builtin_clzll(static_cast<unsigned long long>(x));
}
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline unsigned __brev(unsigned x) {
  x = ((x >> 1) & 0x55555555u) | ((x & 0x55555555u) << 1);
  x = ((x >> 2) & 0x33333333u) | ((x & 0x33333333u) << 2);
  x = ((x >> 4) & 0x0F0F0F0Fu) | ((x & 0x0F0F0F0Fu) << 4);
  x = ((x >> 8) & 0x00FF00FFu) | ((x & 0x00FF00FFu) << 8);
  return (x >> 16) | (x << 16);
}

inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline unsigned long long min(unsigned long long a, unsigned long long b) { return a < b ? a : b; }
inline unsigned long long max(unsigned long long a, unsigned long long b) { return a > b ? a : b; }
inline long min(long a, long b) { return a < b ? a : b; }
inline long max(long a, long b) { return a > b ? a : b; }
inline float min(float a, float b) { return std::fmin(a, b); }
inline float max(float a, float b) { return std::fmax(a, b); }
inline double min(double a, double b) { return std::fmin(a, b); }
inline double max(double a, double b) { return std::fmax(a, b); }

template <class T>
inline T __ldg(const T* p) {
  return *p;
}

/* ---- bf16 and f16 with CUDA's rounding (round to nearest even; NaN -> 0x7FFF) ---- */
namespace qlemu {
inline uint16_t f32_to_bf16_bits(float f) {
  uint32_t u = bit_cast<uint32_t>(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FFF;
  u += 0x7FFFu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}
inline float bf16_bits_to_f32(uint16_t h) { return bit_cast<float>(static_cast<uint32_t>(h) << 16); }

inline uint16_t f32_to_f16_bits(float f) {
  const uint32_t u = bit_cast<uint32_t>(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t a = u & 0x7FFFFFFFu;
  if (a > 0x7F800000u) return 0x7FFF;
  if (a >= 0x477FF000u) return static_cast<uint16_t>(sign | 0x7C00u); /* >= 65520 rounds to inf */
  if (a <= 0x33000000u) return static_cast<uint16_t>(sign);           /* <= 2^-25 rounds to 0 */
  uint32_t r, rem, halfway;
  if (a < 0x38800000u) { /* below 2^-14: f16 subnormal, unit 2^-24 */
    const uint32_t m = (a & 0x7FFFFFu) | 0x800000u;
    const uint32_t shift = 126u - (a >> 23);
    r = m >> shift;
    rem = m & ((1u << shift) - 1u);
    halfway = 1u << (shift - 1u);
  } else {
    r = (((a >> 23) - 112u) << 10) | ((a & 0x7FFFFFu) >> 13);
    rem = a & 0x1FFFu;
    halfway = 0x1000u;
  }
  if (rem > halfway || (rem == halfway && (r & 1u))) ++r;
  return static_cast<uint16_t>(sign | r);
}
inline float f16_bits_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t e = (h >> 10) & 0x1Fu;
  const uint32_t m = h & 0x3FFu;
  if (e == 0x1F) return bit_cast<float>(sign | 0x7F800000u | (m << 13));
  if (e != 0) return bit_cast<float>(sign | ((e + 112u) << 23) | (m << 13));
  const float mag = static_cast<float>(m) * 5.9604644775390625e-8f; /* m * 2^-24, exact */
  return sign ? -mag : mag;
}
}  // namespace qlemu

/* Raw 16-bit storage; conversions and arithmetic as cuda_bf16.h / cuda_fp16.h give them (each
 * operation rounds once: a float result of two 16-bit operands is exact or double rounding is
 * innocuous, since 24 >= 2 * 11 + 2). */
struct __align__(2) __nv_bfloat16 {
  unsigned short __x;
  __nv_bfloat16() = default;
  __nv_bfloat16(float f) : __x(qlemu::f32_to_bf16_bits(f)) {}
  operator float() const { return qlemu::bf16_bits_to_f32(__x); }
};
struct __align__(2) __half {
  unsigned short __x;
  __half() = default;
  __half(float f) : __x(qlemu::f32_to_f16_bits(f)) {}
  operator float() const { return qlemu::f16_bits_to_f32(__x); }
};
struct __align__(4) __nv_bfloat162 { __nv_bfloat16 x, y; };
struct __align__(4) __half2 { __half x, y; };
typedef __half half;
typedef __half2 half2;

#define QLEMU_16BIT_OPS(T)                                                                   \
  inline T operator+(const T& a, const T& b) { return T(float(a) + float(b)); }              \
  inline T operator-(const T& a, const T& b) { return T(float(a) - float(b)); }              \
  inline T operator*(const T& a, const T& b) { return T(float(a) * float(b)); }              \
  inline T operator/(const T& a, const T& b) { return T(float(a) / float(b)); }              \
  inline T operator-(const T& a) {                                                           \
    T r;                                                                                     \
    r.__x = static_cast<unsigned short>(a.__x ^ 0x8000u);                                    \
    return r;                                                                                \
  }                                                                                          \
  inline bool operator==(const T& a, const T& b) { return float(a) == float(b); }            \
  inline bool operator!=(const T& a, const T& b) { return float(a) != float(b); }            \
  inline bool operator<(const T& a, const T& b) { return float(a) < float(b); }              \
  inline bool operator>(const T& a, const T& b) { return float(a) > float(b); }              \
  inline bool operator<=(const T& a, const T& b) { return float(a) <= float(b); }            \
  inline bool operator>=(const T& a, const T& b) { return float(a) >= float(b); }
QLEMU_16BIT_OPS(__nv_bfloat16)
QLEMU_16BIT_OPS(__half)
#undef QLEMU_16BIT_OPS

inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short x) {
  __nv_bfloat16 r;
  r.__x = x;
  return r;
}
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.__x; }
inline __half __ushort_as_half(unsigned short x) {
  __half r;
  r.__x = x;
  return r;
}
inline unsigned short __half_as_ushort(__half h) { return h.__x; }
inline __nv_bfloat16 __float2bfloat16(float f) { return __ushort_as_bfloat16(qlemu::f32_to_bf16_bits(f)); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __float2bfloat16(f); }
inline float __bfloat162float(__nv_bfloat16 h) { return qlemu::bf16_bits_to_f32(h.__x); }
inline __half __float2half(float f) { return __ushort_as_half(qlemu::f32_to_f16_bits(f)); }
inline __half __float2half_rn(float f) { return __float2half(f); }
inline float __half2float(__half h) { return qlemu::f16_bits_to_f32(h.__x); }
inline __nv_bfloat162 __floats2bfloat162_rn(float lo, float hi) {
  return {__float2bfloat16(lo), __float2bfloat16(hi)};
}
inline __nv_bfloat162 __float22bfloat162_rn(float2 v) { return __floats2bfloat162_rn(v.x, v.y); }
inline __half2 __floats2half2_rn(float lo, float hi) { return {__float2half(lo), __float2half(hi)}; }
inline float __low2float(__nv_bfloat162 v) { return __bfloat162float(v.x); }
inline float __high2float(__nv_bfloat162 v) { return __bfloat162float(v.y); }
inline float __low2float(__half2 v) { return __half2float(v.x); }
inline float __high2float(__half2 v) { return __half2float(v.y); }
inline float2 __bfloat1622float2(__nv_bfloat162 v) { return {__low2float(v), __high2float(v)}; }

/* ---- Atomics: real atomics on host memory (shared or global alike) ---- */
namespace qlemu {
template <class T, class F>
inline T atomic_update(T* addr, F f) {
  T old = __atomic_load_n(addr, __ATOMIC_RELAXED);
  while (!__atomic_compare_exchange_n(addr, &old, f(old), true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
  }
  return old;
}
template <class Float, class Bits>
inline Float atomic_add_float(Float* addr, Float v) {
  Bits* bits = reinterpret_cast<Bits*>(addr);
  const Bits old = atomic_update(bits, [v](Bits b) { return bit_cast<Bits>(bit_cast<Float>(b) + v); });
  return bit_cast<Float>(old);
}
}  // namespace qlemu

inline float atomicAdd(float* a, float v) { return qlemu::atomic_add_float<float, uint32_t>(a, v); }
inline double atomicAdd(double* a, double v) { return qlemu::atomic_add_float<double, uint64_t>(a, v); }
inline int atomicAdd(int* a, int v) { return __atomic_fetch_add(a, v, __ATOMIC_RELAXED); }
inline unsigned atomicAdd(unsigned* a, unsigned v) { return __atomic_fetch_add(a, v, __ATOMIC_RELAXED); }
inline unsigned long long atomicAdd(unsigned long long* a, unsigned long long v) {
  return __atomic_fetch_add(a, v, __ATOMIC_RELAXED);
}
inline int atomicSub(int* a, int v) { return __atomic_fetch_sub(a, v, __ATOMIC_RELAXED); }
inline unsigned atomicSub(unsigned* a, unsigned v) { return __atomic_fetch_sub(a, v, __ATOMIC_RELAXED); }
inline int atomicMax(int* a, int v) { return qlemu::atomic_update(a, [v](int o) { return o > v ? o : v; }); }
inline unsigned atomicMax(unsigned* a, unsigned v) {
  return qlemu::atomic_update(a, [v](unsigned o) { return o > v ? o : v; });
}
inline int atomicMin(int* a, int v) { return qlemu::atomic_update(a, [v](int o) { return o < v ? o : v; }); }
inline unsigned atomicMin(unsigned* a, unsigned v) {
  return qlemu::atomic_update(a, [v](unsigned o) { return o < v ? o : v; });
}
inline int atomicExch(int* a, int v) { return __atomic_exchange_n(a, v, __ATOMIC_RELAXED); }
inline unsigned atomicExch(unsigned* a, unsigned v) { return __atomic_exchange_n(a, v, __ATOMIC_RELAXED); }
inline unsigned long long atomicExch(unsigned long long* a, unsigned long long v) {
  return __atomic_exchange_n(a, v, __ATOMIC_RELAXED);
}
inline float atomicExch(float* a, float v) {
  return qlemu::bit_cast<float>(__atomic_exchange_n(reinterpret_cast<uint32_t*>(a), __float_as_uint(v),
                                                    __ATOMIC_RELAXED));
}
template <class T>
inline T qlemu_atomic_cas(T* a, T compare, T v) {
  __atomic_compare_exchange_n(a, &compare, v, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
  return compare; /* the old value, whether or not the swap happened */
}
inline int atomicCAS(int* a, int c, int v) { return qlemu_atomic_cas(a, c, v); }
inline unsigned atomicCAS(unsigned* a, unsigned c, unsigned v) { return qlemu_atomic_cas(a, c, v); }
inline unsigned long long atomicCAS(unsigned long long* a, unsigned long long c, unsigned long long v) {
  return qlemu_atomic_cas(a, c, v);
}

/* Fences: the emulated threads already synchronize through the runtime's locks at every barrier;
 * a full fence keeps plain-memory ordering at least as strong as CUDA's. */
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_block() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __nanosleep(unsigned) {}
long long clock64();

/* ---- Runtime interface (cuda_emu.cpp) ---- */
namespace qlemu {

/* Thrown inside an emulated thread after the launch has recorded a fault; the runtime catches it
 * at the thread's top level, so it never crosses the FFI. */
struct Abort {};

/* One registered region of a block's shared memory (a static array or the dynamic buffer). */
struct Region;

/* Describes one checked shared array as the kernel names it. `rows`/`cols` give the 2-D shape
 * (cols == 0 for 1-D arrays). */
struct ArrayDesc {
  const char* name;
  unsigned char* base;
  size_t elem_bytes;
  size_t count;
  size_t rows;
  size_t cols;
  Region* region;
};

/* Registers a static array with the current launch on its first use there (sets desc.region);
 * `launch_serial` remembers the launch it was last registered with. */
void register_static(std::atomic<uint64_t>& launch_serial, ArrayDesc& desc);
/* Dynamic shared memory of the current launch: base, size in bytes, region; names the region
 * after the first view that asks. */
Region* dynamic_shared(const char* name, unsigned char** base, size_t* bytes);

/* Checks one element access (bounds, then races) and returns the element's address; reports and
 * throws Abort on a fault. `col` is only meaningful for 2-D arrays. */
void* element_access(const ArrayDesc& a, std::ptrdiff_t row, std::ptrdiff_t col, bool write);

/* Barriers and warp collectives. */
void syncthreads();
/* Waits for the lanes of `mask` (all must name it), publishes `bytes` (<= 64) of this lane's data
 * and returns this thread's copy of the 32 lanes' data (stride 64 bytes, valid until its next
 * collective) plus the effective mask (the lanes of `mask` that exist). */
const unsigned char* warp_exchange(uint32_t mask, const void* mine, size_t bytes, uint32_t* effective);
uint32_t active_mask();
unsigned lane_id();
void fail(const char* what);

/* Tensor-core and async-copy emulation. */
void mma_bf16_16816(float d[4], const uint32_t a[4], const uint32_t b[2], const float c[4]);
void ldmatrix(uint32_t* r, int count, bool trans, const void* row_ptr);
void cp_async(void* smem_dst, const void* gmem_src, int src_bytes);
void cp_async_commit();
void cp_async_wait(int pending_groups);
void cp_async_wait_all();

/* Launch entry shared by every QL_EMU_ENTRY. Never throws. */
int32_t launch(const QlLaunchConfig* cfg, const void* params, char* err, size_t err_len,
               void (*body)(const void*));

/* ---- Checked shared-memory element proxies ---- */
template <class T>
class SharedRef {
 public:
  SharedRef(const ArrayDesc* a, std::ptrdiff_t row, std::ptrdiff_t col) : a_(a), row_(row), col_(col) {}
  SharedRef(const SharedRef&) = default;
  operator T() const {
    T v;
    std::memcpy(&v, element_access(*a_, row_, col_, false), sizeof(T));
    return v;
  }
  const SharedRef& operator=(const T& v) const {
    std::memcpy(element_access(*a_, row_, col_, true), &v, sizeof(T));
    return *this;
  }
  const SharedRef& operator=(const SharedRef& other) const { return *this = static_cast<T>(other); }
  /* Address arithmetic is not an access (one past the end is a valid pointer): unchecked. */
  T* operator&() const { return reinterpret_cast<T*>(a_->base) + linear(); }
  template <class U>
  const SharedRef& operator+=(const U& v) const { return *this = static_cast<T>(static_cast<T>(*this) + v); }
  template <class U>
  const SharedRef& operator-=(const U& v) const { return *this = static_cast<T>(static_cast<T>(*this) - v); }
  template <class U>
  const SharedRef& operator*=(const U& v) const { return *this = static_cast<T>(static_cast<T>(*this) * v); }
  template <class U>
  const SharedRef& operator/=(const U& v) const { return *this = static_cast<T>(static_cast<T>(*this) / v); }
  template <class U>
  const SharedRef& operator|=(const U& v) const { return *this = static_cast<T>(static_cast<T>(*this) | v); }
  template <class U>
  const SharedRef& operator&=(const U& v) const { return *this = static_cast<T>(static_cast<T>(*this) & v); }
  template <class U>
  const SharedRef& operator^=(const U& v) const { return *this = static_cast<T>(static_cast<T>(*this) ^ v); }
  template <class U>
  const SharedRef& operator<<=(const U& v) const { return *this = static_cast<T>(static_cast<T>(*this) << v); }
  template <class U>
  const SharedRef& operator>>=(const U& v) const { return *this = static_cast<T>(static_cast<T>(*this) >> v); }
  const SharedRef& operator++() const { return *this += 1; }
  const SharedRef& operator--() const { return *this -= 1; }
  T operator++(int) const {
    const T old = *this;
    *this = static_cast<T>(old + 1);
    return old;
  }
  T operator--(int) const {
    const T old = *this;
    *this = static_cast<T>(old - 1);
    return old;
  }

 private:
  std::ptrdiff_t linear() const {
    return a_->cols ? row_ * static_cast<std::ptrdiff_t>(a_->cols) + col_ : row_;
  }
  const ArrayDesc* a_;
  std::ptrdiff_t row_, col_;
};

/* A row of a 2-D shared array: indexable, and decays to a raw pointer like `T[C]`. */
template <class T>
class SharedRow {
 public:
  SharedRow(const ArrayDesc* a, std::ptrdiff_t row) : a_(a), row_(row) {}
  template <class I>
  SharedRef<T> operator[](I col) const {
    return SharedRef<T>(a_, row_, static_cast<std::ptrdiff_t>(col));
  }
  operator T*() const { return ptr(); }
  template <class I>
  T* operator+(I off) const { return ptr() + off; }

 private:
  T* ptr() const { return reinterpret_cast<T*>(a_->base) + row_ * static_cast<std::ptrdiff_t>(a_->cols); }
  const ArrayDesc* a_;
  std::ptrdiff_t row_;
};

/* Static `__shared__ T name[R][C]` (C == 0: `T name[R]`), declared as a function-local static:
 * one object serves every block, because blocks run one at a time and launches are serialized.
 * Storage is 16-byte aligned, as the CUDA spelling in portable.cuh asks, so rows can feed
 * ldmatrix and cp.async. */
template <class T, size_t R, size_t C>
class StaticShared {
  static_assert(std::is_trivially_copyable<T>::value, "shared element types must be plain data");

 public:
  explicit StaticShared(const char* name) : desc_{name, storage_, sizeof(T), kCount, R, C, nullptr} {}
  StaticShared(const StaticShared&) = delete;
  StaticShared& operator=(const StaticShared&) = delete;

  template <class I, size_t C2 = C, typename std::enable_if<C2 == 0, int>::type = 0>
  SharedRef<T> operator[](I i) {
    return SharedRef<T>(desc(), static_cast<std::ptrdiff_t>(i), 0);
  }
  template <class I, size_t C2 = C, typename std::enable_if<C2 != 0, int>::type = 0>
  SharedRow<T> operator[](I r) {
    return SharedRow<T>(desc(), static_cast<std::ptrdiff_t>(r));
  }
  operator T*() { return reinterpret_cast<T*>(desc()->base); }
  template <class I>
  T* operator+(I off) {
    return reinterpret_cast<T*>(desc()->base) + off;
  }

 private:
  static constexpr size_t kCount = R * (C ? C : 1);
  const ArrayDesc* desc() {
    register_static(launch_serial_, desc_);
    return &desc_;
  }
  alignas(16) unsigned char storage_[kCount * sizeof(T)];
  std::atomic<uint64_t> launch_serial_{0};
  ArrayDesc desc_;
};

/* `extern __shared__` bytes viewed as T*: a per-thread view of the launch's dynamic buffer. */
template <class T>
class DynamicShared {
  static_assert(std::is_trivially_copyable<T>::value, "shared element types must be plain data");

 public:
  explicit DynamicShared(const char* name) {
    unsigned char* base = nullptr;
    size_t bytes = 0;
    Region* region = dynamic_shared(name, &base, &bytes);
    desc_ = ArrayDesc{name, base, sizeof(T), bytes / sizeof(T), bytes / sizeof(T), 0, region};
  }
  template <class I>
  SharedRef<T> operator[](I i) const {
    return SharedRef<T>(&desc_, static_cast<std::ptrdiff_t>(i), 0);
  }
  operator T*() const { return reinterpret_cast<T*>(desc_.base); }
  template <class I>
  T* operator+(I off) const {
    return reinterpret_cast<T*>(desc_.base) + off;
  }

 private:
  ArrayDesc desc_;
};

/* ---- Warp collectives over the exchange ---- */
template <class T>
inline T shfl_from(uint32_t mask, T v, int (*pick)(int lane, int arg, int width), int arg, int width) {
  static_assert(sizeof(T) == 2 || sizeof(T) == 4 || sizeof(T) == 8, "shuffles move 2, 4 or 8 bytes");
  if (width <= 0 || width > 32 || (width & (width - 1)) != 0) fail("shuffle width must be a power of two <= 32");
  uint32_t eff = 0;
  const unsigned char* slots = warp_exchange(mask, &v, sizeof(T), &eff);
  const int src = pick(static_cast<int>(lane_id()), arg, width);
  /* A source lane outside the mask gives an undefined value on the GPU; here a poison pattern
   * (NaN for floats), so a kernel that uses it shows wrong results instead of plausible ones. */
  if (!(eff >> src & 1u)) {
    T poison;
    std::memset(&poison, 0xFF, sizeof(T));
    return poison;
  }
  T out;
  std::memcpy(&out, slots + 64 * src, sizeof(T));
  return out;
}
/* The source-lane rules of PTX shfl.sync (segmask = ~(width - 1)), with CUDA's clamp values. */
inline int shfl_idx_lane(int lane, int src, int width) { return (lane & ~(width - 1)) | (src & (width - 1)); }
inline int shfl_up_lane(int lane, int delta, int width) {
  const int j = lane - delta;
  return j >= (lane & ~(width - 1)) ? j : lane;
}
inline int shfl_down_lane(int lane, int delta, int width) {
  const int j = lane + delta;
  return j <= ((lane & ~(width - 1)) | (width - 1)) ? j : lane;
}
inline int shfl_xor_lane(int lane, int lane_mask, int width) {
  const int j = lane ^ (lane_mask & 31);
  return j <= ((lane & ~(width - 1)) | (width - 1)) ? j : lane;
}
}  // namespace qlemu

inline void __syncthreads() { qlemu::syncthreads(); }
inline void __syncwarp(unsigned mask = 0xFFFFFFFFu) { qlemu::warp_exchange(mask, nullptr, 0, nullptr); }
template <class T>
inline T __shfl_sync(unsigned mask, T v, int src_lane, int width = 32) {
  return qlemu::shfl_from(mask, v, qlemu::shfl_idx_lane, src_lane, width);
}
template <class T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return qlemu::shfl_from(mask, v, qlemu::shfl_up_lane, static_cast<int>(delta), width);
}
template <class T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return qlemu::shfl_from(mask, v, qlemu::shfl_down_lane, static_cast<int>(delta), width);
}
template <class T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  return qlemu::shfl_from(mask, v, qlemu::shfl_xor_lane, lane_mask, width);
}
inline unsigned __ballot_sync(unsigned mask, int pred) {
  const uint8_t mine = pred != 0;
  uint32_t eff = 0;
  const unsigned char* slots = qlemu::warp_exchange(mask, &mine, 1, &eff);
  unsigned bits = 0;
  for (int l = 0; l < 32; ++l) {
    if ((eff >> l & 1u) && slots[64 * l]) bits |= 1u << l;
  }
  return bits;
}
inline int __any_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) != 0; }
inline int __all_sync(unsigned mask, int pred) {
  uint32_t eff = 0;
  const uint8_t mine = pred != 0;
  const unsigned char* slots = qlemu::warp_exchange(mask, &mine, 1, &eff);
  for (int l = 0; l < 32; ++l) {
    if ((eff >> l & 1u) && !slots[64 * l]) return 0;
  }
  return 1;
}
/* Lanes of this warp that exist and have not exited (the emulation keeps no notion of
 * divergence, so every live lane counts as active). */
inline unsigned __activemask() { return qlemu::active_mask(); }

/* ---- Shared-memory declarations and the emulated entry point (spelled in portable.cuh) ---- */
#define QLEMU_SHARED_ARRAY(T, name, N) static ::qlemu::StaticShared<T, (N), 0> name(#name)
#define QLEMU_SHARED_ARRAY2(T, name, R, C) static ::qlemu::StaticShared<T, (R), (C)> name(#name)
#define QLEMU_DYNAMIC_SHARED(T, name) const ::qlemu::DynamicShared<T> name(#name)
#define QLEMU_ENTRY(kernel, Params)                                                             \
  extern "C" int32_t qlemu_##kernel(const QlLaunchConfig* cfg, const void* params, char* err,  \
                                    size_t err_len) {                                          \
    return ::qlemu::launch(cfg, params, err, err_len,                                          \
                           [](const void* p) { kernel(*static_cast<const Params*>(p)); });     \
  }

#endif /* QLORA_CUDA_EMU_H */
