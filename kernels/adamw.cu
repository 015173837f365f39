// Fused AdamW, exactly torch.optim.AdamW (decoupled weight decay, no amsgrad, no maximize): one pass
// over param (f32/bf16/f16), grad (f32/bf16/f16) and the two moments, either f32 (k_adamw_f32) or
// 8-bit blockwise with 256 elements per block (k_adamw_8bit, as bitsandbytes' 8-bit optimizers).
#include "common.cuh"

namespace {

constexpr int kThreads = 256;
// Elements per 8-bit state block; k_adamw_8bit runs one CUDA block per state block.
constexpr int kStateBlock = 256;
constexpr int kWarps = kThreads / 32;

struct Moments {
  float p, m, v;
};

// One element of torch's single-tensor AdamW on the CPU (torch/optim/adam.py, _single_tensor_adam),
// with the f32 roundings its ATen CPU kernels make, checked bit for bit against torch 2.9.1:
//   g = grad * grad_scale                       (ours; torch has no such factor, 1 is exact)
//   p = p * f32(1 - lr·wd)                      param.mul_
//   m = fma(w, g - m, m)          if |w| < 0.5   exp_avg.lerp_(grad, w = 1 - beta1): ATen's vector
//     = fma(w - 1, g - m, g)      otherwise      lerp fuses its multiply-add
//   v = fma(f32(1 - b2) · g, g, v · b2)          exp_avg_sq.mul_(b2).addcmul_(g, g, value=1 - b2)
//   d = sqrt(v) / f32(bc2_sqrt) + f32(eps)       correctly rounded sqrt and division
//   p = p + (f32(-step_size) · m) / d            param.addcdiv_(m, d, value=-step_size)
// torch's foreach and fused (CUDA) kernels group these differently (e.g. reciprocal multiplies,
// fused bias corrections), so they can differ from this in the last bits; the CPU single-tensor
// path is the reference. A bf16/f16 param is rounded to nearest even once, after the update.
__device__ __forceinline__ Moments adamw_element(const QlAdamWScalars& s, float p, float g, float m,
                                                 float v) {
  g = __fmul_rn(g, s.grad_scale);
  p = __fmul_rn(p, s.decay);
  const float w = s.one_minus_beta1;
  const float diff = __fsub_rn(g, m);
  m = fabsf(w) < 0.5f ? __fmaf_rn(w, diff, m) : __fmaf_rn(__fsub_rn(w, 1.0f), diff, g);
  v = __fmaf_rn(__fmul_rn(s.one_minus_beta2, g), g, __fmul_rn(v, s.beta2));
  const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(v), s.bc2_sqrt), s.eps);
  p = __fadd_rn(p, __fdiv_rn(__fmul_rn(s.neg_step_size, m), denom));
  return {p, m, v};
}

// Index of the code nearest to x, ties to the lower index, with distances |x - code[i]| rounded
// to f32: exactly torch.argmin(|x - code|) as bitsandbytes' PyTorch 8-bit optimizer quantizes.
// A binary search finds the neighbours of x; since rounded distances are monotone in the code,
// only codes below the winner can tie with it, so we walk down over equal distances. NaN → 0.
// `code` is a shared array of 256 ascending codes (a template so the emulation checks its reads).
template <class Code>
__device__ __forceinline__ uint32_t nearest_code(float x, Code& code) {
  if (x != x) return 0u;
  int lo = 0;  // number of codes < x, found as the first index with code >= x
  int hi = 256;
  while (lo < hi) {
    const int mid = (lo + hi) >> 1;
    const float c = code[mid];
    if (c < x) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  int best = lo < 256 ? lo : 255;
  const float c_best = code[best];
  float best_d = fabsf(__fsub_rn(x, c_best));
  if (lo > 0) {
    const float c_below = code[lo - 1];
    const float d = fabsf(__fsub_rn(x, c_below));
    if (d <= best_d) {
      best = lo - 1;
      best_d = d;
    }
  }
  while (best > 0) {
    const float c = code[best - 1];
    if (fabsf(__fsub_rn(x, c)) != best_d) break;
    --best;
  }
  return static_cast<uint32_t>(best);
}

// NaN-propagating max over a whole block of kThreads threads; every thread gets the result.
// `s_warp` (kWarps floats) holds one partial per warp and is free again on return; the result is
// left in s_result[slot].
template <class Warp, class Result>
__device__ __forceinline__ float block_reduce_nan_max(float x, Warp& s_warp, Result& s_result, int slot) {
  x = ql::warp_reduce_nan_max(x);
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  if (lane == 0) s_warp[warp] = x;
  __syncthreads();
  if (warp == 0) {
    float y = 0.0f;
    if (lane < kWarps) y = s_warp[lane];
    y = ql::warp_reduce_nan_max(y);
    if (lane == 0) s_result[slot] = y;
  }
  __syncthreads();
  const float r = s_result[slot];
  return r;
}

}  // namespace

// Grid-stride over elements, one element per thread per iteration.
extern "C" __global__ void __launch_bounds__(kThreads) k_adamw_f32(const QlAdamWParams p) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < p.n; i += stride) {
    const Moments r = adamw_element(p.s, ql::load_as_f32(p.param, i, p.param_dtype),
                                    ql::load_as_f32(p.grad, i, p.grad_dtype), p.m[i], p.v[i]);
    ql::store_from_f32(p.param, i, p.param_dtype, r.p);
    p.m[i] = r.m;
    p.v[i] = r.v;
  }
}
QL_EMU_ENTRY(k_adamw_f32, QlAdamWParams)

// One CUDA block per state block of 256 elements, one element per thread: dequantize both moments
// (code[q] * absmax), update in f32 (the param with the unquantized new moments, as bitsandbytes
// does), then requantize each moment with its new block absmax (NaN-propagating max of |x|, a zero
// block stored as 1.0) as x / absmax → nearest code.
extern "C" __global__ void __launch_bounds__(kThreads) k_adamw_8bit(const QlAdamW8bitParams p) {
  QL_SHARED_ARRAY(float, s_mcode, 256);
  QL_SHARED_ARRAY(float, s_vcode, 256);
  QL_SHARED_ARRAY(float, s_warp, kWarps);
  QL_SHARED_ARRAY(float, s_absmax, 2);
  s_mcode[threadIdx.x] = __ldg(&p.m_code[threadIdx.x]);
  s_vcode[threadIdx.x] = __ldg(&p.v_code[threadIdx.x]);
  __syncthreads();

  const int64_t b = blockIdx.x;
  const int64_t i = b * kStateBlock + threadIdx.x;
  const bool active = i < p.n;
  float m = 0.0f;
  float v = 0.0f;
  if (active) {
    const float mc = s_mcode[p.m_q[i]];
    const float vc = s_vcode[p.v_q[i]];
    // Every thread reads the old absmax before thread 0 overwrites it below (barriers between).
    const Moments r = adamw_element(p.s, ql::load_as_f32(p.param, i, p.param_dtype),
                                    ql::load_as_f32(p.grad, i, p.grad_dtype),
                                    __fmul_rn(mc, p.m_absmax[b]), __fmul_rn(vc, p.v_absmax[b]));
    ql::store_from_f32(p.param, i, p.param_dtype, r.p);
    m = r.m;
    v = r.v;
  }

  float m_max = block_reduce_nan_max(fabsf(m), s_warp, s_absmax, 0);
  float v_max = block_reduce_nan_max(fabsf(v), s_warp, s_absmax, 1);
  m_max = m_max == 0.0f ? 1.0f : m_max;
  v_max = v_max == 0.0f ? 1.0f : v_max;
  if (threadIdx.x == 0) {
    p.m_absmax[b] = m_max;
    p.v_absmax[b] = v_max;
  }
  if (active) {
    p.m_q[i] = static_cast<uint8_t>(nearest_code(__fdiv_rn(m, m_max), s_mcode));
    p.v_q[i] = static_cast<uint8_t>(nearest_code(__fdiv_rn(v, v_max), s_vcode));
  }
}
QL_EMU_ENTRY(k_adamw_8bit, QlAdamW8bitParams)
