//! The one table of numeric tolerances (atol + rtol per op and dtype) that every parity test
//! uses: reference ≡ emulated kernel ≡ CUDA ≡ Hugging Face fixtures. A value `got` passes against
//! `want` when `|got - want| <= atol + rtol * |want|` (NaN only matches NaN).

use std::fmt;

/// Element type a comparison is made in (the output dtype of the op).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dtype {
    F32,
    BF16,
    F16,
}

/// Numeric operations with a tolerance entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    /// NF4 / 8-bit blockwise dequantization: a lookup and one or two f32 roundings in a fixed
    /// order, so every backend must agree bit for bit.
    Dequantize,
    /// Sums whose association order differs between backends (tree vs sequential).
    Reduction,
    /// bf16 × bf16 products accumulated in f32 (tensor-core mma vs a sequential f32 loop): the
    /// hardware accumulates with its own order and alignment, worth a few ulps per term.
    MatmulBf16,
    /// One AdamW step (f32 or 8-bit blockwise moments): element-wise f32 ops in one fixed order,
    /// with fma exactly where torch's CPU kernels fuse, compared in the param dtype.
    AdamW,
    /// RMSNorm forward (y, rstd): a row sum of squares in tree vs sequential order and rsqrt
    /// (2 ulp on the GPU), then y = w · dtype(x · rstd).
    RmsNorm,
    /// RMSNorm backward (dx, and dw in f32): two reordered row sums feeding a difference that can
    /// cancel, and dw summed over rows in a different grouping.
    RmsNormBackward,
    /// RoPE rotation (forward and inverse): two products and a sum per element, fused into fma
    /// by nvcc, rounded once to the output dtype.
    Rope,
    /// SwiGLU forward and backward: element-wise f32 with expf (≤ 2 ulp on the GPU), rounded once.
    Swiglu,
    /// NF4 GEMV (decode): bit-exact dequantized weights, products of x and w accumulated in f32
    /// with fma in lane-strided chunks and a shuffle tree vs a sequential loop, rounded once.
    Nf4Gemv,
    /// NF4 dequant-GEMM on tensor cores (forward and input gradient): bit-exact bf16 weights,
    /// exact bf16 × bf16 products summed in f32 by mma.sync in its own order and alignment vs a
    /// sequential loop, rounded once to the output dtype.
    Nf4Gemm,
    /// Cross-entropy forward (per-row loss and logsumexp, f32 whatever the logits dtype): an
    /// online f32 sum of expf over the row in tree order vs an f64 reference.
    CrossEntropy,
    /// Cross-entropy backward (dlogits in the logits dtype): expf(x − lse) − onehot, times
    /// grad_scale, from the same f32 lse in every backend.
    CrossEntropyBackward,
    /// Fused LoRA kernels, forward (T = X·Aᵀ in f32, and Y + s·T·Bᵀ rounded once to Y's dtype):
    /// f32 sums over K (lane-strided and shuffled vs sequential) and over r, in Y's dtype.
    LoraFused,
    /// Fused LoRA kernels, backward: U = dY·B, dA and dB in f32 (sums over M in the reference's
    /// order, or in row slices added in order for long M; over N reordered) and dX + s·U·A
    /// rounded once to dX's dtype.
    LoraFusedBackward,
    /// The whole Llama forward (logits, and the loss from them) against transformers: every op
    /// rounded where torch rounds, but sums (GEMMs, norms, softmax) reordered.
    LlamaLogits,
    /// A real pretrained model's forward (SmolLM2-135M from its GGUF file: 30 layers, K up to
    /// 1536, logits up to ~20) against transformers' GGUF loader: `LlamaLogits` at depth.
    RealModelLogits,
    /// LoRA gradients (dA, dB) and the layer input gradient from the explicit backward against
    /// an autograd oracle: the same math through differently ordered sums and transposed GEMMs.
    LoraGrad,
    /// The Llama forward (logits, loss) on a CUDA device against the same model on the CPU: the
    /// same ops and roundings (NF4 weights bit-exact), but cuBLAS and candle's CUDA reductions sum
    /// in their own order, and expf/logf are within 2 ulp.
    LlamaDeviceLogits,
    /// LoRA gradients from the explicit backward on a CUDA device against the CPU's: the same
    /// graph, with reordered sums as in [`Op::LlamaDeviceLogits`].
    LoraGradDevice,
    /// LoRA gradients (dA, dB) and the layer input gradient of the bf16-compute backward against
    /// candle's autograd through the same forward (roundings straight-through), each tensor divided
    /// by its largest |want| first: bf16 errors scale with the terms that make up a tensor.
    LoraGradScaled,
    /// LoRA gradients (dA, dB) of the bf16-compute backward against PEFT's autograd in torch, which
    /// rounds every intermediate gradient to bf16 too; each tensor divided by its largest |want|.
    LoraGradPeftScaled,
    /// A merged weight `W + s·(B·A)` against PEFT's `merge_and_unload()`: the r-term f32 sum of
    /// B·A (and whether it is fused into fma) follows each side's GEMM, then the same two roundings.
    LoraMerge,
    /// Logits of the merged model (no adapter) against the base model run with the adapter:
    /// `x·(W + sBA)ᵀ` vs `x·Wᵀ + s·(x·Aᵀ)·Bᵀ` reassociated in every adapted linear, and for a
    /// bf16 or f16 export the merged weights rounded once to that dtype.
    MergedLogits,
    /// Causal attention forward (o in the input dtype, lse in f32), kernel vs reference: scores,
    /// softmax and p·v in f32 with an online (rescaled, tile by tile) softmax and fma vs one pass
    /// over the materialised row, rounded once to the output dtype.
    Attention,
    /// Causal attention backward (dq, dk, dv in the input dtype), kernel vs reference: the same
    /// f32 recomputation of p, then ds = p (dp − delta) (which cancels) summed over keys or over
    /// the GQA group's query rows in another order, rounded once.
    AttentionBackward,
    /// The attention reference against the Llama runtime's eager attention (its additive mask,
    /// GQA and roundings) and candle's autograd through it.
    AttentionRuntime,
    /// LoRA gradients from the explicit backward on a CUDA device in bf16 compute, where the
    /// frozen NF4 linears' input gradients dx = dy·W go through the NF4 dequant-GEMM (dy rounded
    /// to bf16 for the kernel's bf16 activations), against the CPU's f32 dy·W.
    LoraGradDeviceNf4Gemm,
    /// The forward's logits with the fused RMSNorm, RoPE, attention, SwiGLU and LoRA kernels
    /// against the same model in tensor ops: FlashAttention-style online softmax instead of eager
    /// attention, and in bf16 the kernels' roundings (one per op, p rounded before p·v).
    FusedLogits,
    /// The causal-LM loss of `lora_gradients` with the fused kernels (CPU emulation or CUDA)
    /// against the same model on tensor ops: the chunked cross-entropy kernels' online f32 row
    /// sums vs candle's, on logits that went through the fused layers (RMSNorm, RoPE, attention,
    /// SwiGLU and LoRA kernels, each summing in its own order).
    FusedLoss,
    /// LoRA gradients (dA, dB) of `lora_gradients` with the fused kernels against the same model
    /// on tensor ops, each tensor divided by its largest |want| first: the fused LoRA backward
    /// reads dY in the compute dtype and rounds dX to it, and every fused op reorders its sums.
    FusedLoraGrad,
    /// A few LoRA training steps on a CUDA device (fused AdamW) against the same steps on the
    /// CPU: losses, adapters and moments. The AdamW update itself is bit-exact ([`Op::AdamW`]);
    /// each step feeds it [`Op::LoraGradDevice`] gradients, and m̂/(√v̂ + eps) turns a relative
    /// gradient error into about the same relative error of the update, carried step to step.
    TrainDevice,
    /// Llama 3.1's RoPE scaling as llama.cpp stores it (the base inverse frequencies divided by
    /// `rope_freqs`, computed in f64 and rounded to f32) against transformers' scaled inverse
    /// frequencies (f32 throughout): a few roundings apart.
    RopeFreqFactors,
}

/// Memory plan (`train::plan`) against bytes counted by a global allocator (tests/plan.rs): host
/// metadata the plan leaves out, per tensor. A candle tensor's `Arc<Tensor_>`, shape and stride
/// vectors and storage `Arc<RwLock<..>>` take about 200 bytes; an NF4 linear adds its shape and
/// dtype name beside its inline struct in the layer; a BTreeMap entry of a LoRA pair a share of a
/// node. Payload bytes (tensor data, codes, scales, moments) are matched exactly.
pub const PLAN_METADATA_BYTES_PER_TENSOR: usize = 512;

/// Memory plan: a training step's planned peak against the measured allocator peak, as a
/// relative difference. Tensor-op path (`Target::Cpu`): the plan counts every tensor the explicit
/// backward holds at its worst moment, and all of the LoRA gradients although only the last
/// layer's exist then; measured (tests/plan.rs, B·T = 128..256, hidden 128, vocab 512 and 8192,
/// f32 and bf16) 0.67–1.49% under the plan. Kernel path on the emulator (`Target::Emulated`): the
/// plan replays the allocations, gradients made so far included, and leaves out candle's
/// per-tensor metadata; measured 0.65% over the plan in bf16 at B·T = 256, vocab 512 (backward
/// peak, NF4 linears through the emulated GEMM; 1.05% in a `cuda` build, whose per-tensor
/// metadata is larger), 0.03% at vocab 8192 (loss peak), 0.90% in f32 at B·T = 64
/// (dequantized linears).
pub const PLAN_STEP_PEAK_RTOL: f64 = 0.02;

/// An absolute and a relative tolerance.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Tolerance {
    pub atol: f32,
    pub rtol: f32,
}

impl Tolerance {
    /// Bit-for-bit equality (NaN payloads aside).
    pub const EXACT: Tolerance = Tolerance {
        atol: 0.0,
        rtol: 0.0,
    };

    /// Compares element-wise; on failure names the count of mismatches and the worst one.
    pub fn check(&self, got: &[f32], want: &[f32]) -> Result<(), Mismatch> {
        if got.len() != want.len() {
            return Err(Mismatch {
                len: (got.len(), want.len()),
                ..Mismatch::default()
            });
        }
        let mut bad = Mismatch::default();
        for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
            let ok = if g.is_nan() || w.is_nan() {
                g.is_nan() && w.is_nan()
            } else if *self == Self::EXACT {
                g.to_bits() == w.to_bits()
            } else {
                g == w || (g - w).abs() <= self.atol + self.rtol * w.abs()
            };
            if !ok {
                bad.count += 1;
                let excess = if g.is_finite() && w.is_finite() {
                    (g - w).abs() - self.rtol * w.abs()
                } else {
                    f32::INFINITY
                };
                if bad.count == 1 || excess > bad.worst_excess {
                    bad.worst_excess = excess;
                    bad.worst = Some((i, g, w));
                }
            }
        }
        if bad.count == 0 {
            Ok(())
        } else {
            bad.len = (got.len(), want.len());
            bad.tol = *self;
            Err(bad)
        }
    }
}

/// Why a comparison failed.
#[derive(Clone, Debug, Default)]
pub struct Mismatch {
    pub len: (usize, usize),
    pub count: usize,
    pub worst: Option<(usize, f32, f32)>,
    pub worst_excess: f32,
    pub tol: Tolerance,
}

impl Default for Tolerance {
    fn default() -> Self {
        Tolerance::EXACT
    }
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.len.0 != self.len.1 {
            return write!(f, "length {} != expected {}", self.len.0, self.len.1);
        }
        write!(
            f,
            "{} of {} elements outside atol {:e} + rtol {:e}",
            self.count, self.len.0, self.tol.atol, self.tol.rtol
        )?;
        if let Some((i, g, w)) = self.worst {
            write!(f, "; worst at [{i}]: got {g:e}, want {w:e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Mismatch {}

/// The table. Each entry states why its numbers are what they are.
const TABLE: &[(Op, Dtype, Tolerance)] = &[
    // Lookups and fixed-order f32 roundings: exact everywhere, bf16/f16 being one final RNE cast.
    (Op::Dequantize, Dtype::F32, Tolerance::EXACT),
    (Op::Dequantize, Dtype::BF16, Tolerance::EXACT),
    (Op::Dequantize, Dtype::F16, Tolerance::EXACT),
    // A reordered f32 sum of n terms is within ~n·eps·Σ|x|; tests keep n ≤ 1e5 with |x| ≤ 1.
    (
        Op::Reduction,
        Dtype::F32,
        Tolerance {
            atol: 1e-4,
            rtol: 1e-5,
        },
    ),
    // bf16 output: one rounding of 2^-8 relative on top of the f32 reordering.
    (
        Op::Reduction,
        Dtype::BF16,
        Tolerance {
            atol: 1e-2,
            rtol: 8e-3,
        },
    ),
    (
        Op::Reduction,
        Dtype::F16,
        Tolerance {
            atol: 1e-3,
            rtol: 1e-3,
        },
    ),
    // Exact products, f32 accumulation in a different order: K ≤ 4096 terms of |x| ≤ ~4.
    (
        Op::MatmulBf16,
        Dtype::F32,
        Tolerance {
            atol: 1e-4,
            rtol: 1e-4,
        },
    ),
    (
        Op::MatmulBf16,
        Dtype::BF16,
        Tolerance {
            atol: 1e-2,
            rtol: 8e-3,
        },
    ),
    (
        Op::MatmulBf16,
        Dtype::F16,
        Tolerance {
            atol: 1e-3,
            rtol: 1e-3,
        },
    ),
    // AdamW: correctly rounded f32 ops (and fma) in the same order in the reference, the kernel
    // and torch's CPU single-tensor path (pinned by tests/fixtures/adamw), bf16/f16 params being
    // one final RNE cast; 8-bit moments add a max and a nearest-code search, both order-free.
    (Op::AdamW, Dtype::F32, Tolerance::EXACT),
    (Op::AdamW, Dtype::BF16, Tolerance::EXACT),
    (Op::AdamW, Dtype::F16, Tolerance::EXACT),
    // Reordered sums of ≤ 8192 squares (|x| ≤ ~4) and a 2-ulp rsqrt: a few e-7 relative in f32.
    (
        Op::RmsNorm,
        Dtype::F32,
        Tolerance {
            atol: 1e-5,
            rtol: 1e-5,
        },
    ),
    // x · rstd is rounded to bf16 before the multiply by w and again after: two bf16 ulps (2^-7 each).
    (
        Op::RmsNorm,
        Dtype::BF16,
        Tolerance {
            atol: 1e-2,
            rtol: 1.6e-2,
        },
    ),
    // The same two roundings at f16's 2^-10.
    (
        Op::RmsNorm,
        Dtype::F16,
        Tolerance {
            atol: 1e-3,
            rtol: 2e-3,
        },
    ),
    // dx = rstd·dn − x·rstd³·Σ(dn·x)/h cancels: the reordered Σ's ~sqrt(h)·eps error lands on O(1) terms.
    (
        Op::RmsNormBackward,
        Dtype::F32,
        Tolerance {
            atol: 1e-4,
            rtol: 1e-4,
        },
    ),
    // One bf16 rounding of dx on top of the f32 differences above.
    (
        Op::RmsNormBackward,
        Dtype::BF16,
        Tolerance {
            atol: 1e-2,
            rtol: 8e-3,
        },
    ),
    // One f16 rounding of dx on top of the f32 differences above.
    (
        Op::RmsNormBackward,
        Dtype::F16,
        Tolerance {
            atol: 1e-3,
            rtol: 2e-3,
        },
    ),
    // a·c − b·s may cancel; fma vs separate roundings differ by ~eps·(|a·c| + |b·s|).
    (
        Op::Rope,
        Dtype::F32,
        Tolerance {
            atol: 1e-6,
            rtol: 1e-5,
        },
    ),
    // One bf16 rounding of nearly equal f32 values: at most one bf16 ulp apart.
    (
        Op::Rope,
        Dtype::BF16,
        Tolerance {
            atol: 1e-5,
            rtol: 8e-3,
        },
    ),
    // One f16 rounding of nearly equal f32 values: at most one f16 ulp apart.
    (
        Op::Rope,
        Dtype::F16,
        Tolerance {
            atol: 1e-5,
            rtol: 1e-3,
        },
    ),
    // expf within 2 ulp and a few products: a few e-7 relative; atol for outputs that cancel to ~0.
    (
        Op::Swiglu,
        Dtype::F32,
        Tolerance {
            atol: 1e-6,
            rtol: 1e-5,
        },
    ),
    // One bf16 rounding of nearly equal f32 values: at most one bf16 ulp apart.
    (
        Op::Swiglu,
        Dtype::BF16,
        Tolerance {
            atol: 1e-5,
            rtol: 8e-3,
        },
    ),
    // One f16 rounding of nearly equal f32 values: at most one f16 ulp apart.
    (
        Op::Swiglu,
        Dtype::F16,
        Tolerance {
            atol: 1e-5,
            rtol: 1e-3,
        },
    ),
    // Reordered f32 sums of K ≤ 16384 products |x·w| ≲ 0.1 (fma vs a rounded product): the error
    // grows like sqrt(K)·eps·Σ|x·w|, a few e-6 on outputs of order 1; atol for outputs near 0.
    (
        Op::Nf4Gemv,
        Dtype::F32,
        Tolerance {
            atol: 1e-4,
            rtol: 1e-4,
        },
    ),
    // One bf16 rounding of nearly equal f32 values: at most one bf16 ulp (2^-8 relative) apart.
    (
        Op::Nf4Gemv,
        Dtype::BF16,
        Tolerance {
            atol: 1e-3,
            rtol: 8e-3,
        },
    ),
    // The kernel writes no f16 (the launchers reject it); the entry keeps the table total.
    (
        Op::Nf4Gemv,
        Dtype::F16,
        Tolerance {
            atol: 1e-4,
            rtol: 1e-3,
        },
    ),
    // Reductions over ≤ 200 (K or N) exact products of |x| ≲ 4 and |w| ≲ 0.1, reordered in f32
    // (the tensor cores add in 16-wide chunks): a few e-6 on outputs of order 0.1-1; atol covers
    // outputs that cancel to ~0.
    (
        Op::Nf4Gemm,
        Dtype::F32,
        Tolerance {
            atol: 1e-4,
            rtol: 1e-4,
        },
    ),
    // One bf16 rounding of nearly equal f32 values: at most one bf16 ulp (2^-8 relative) apart.
    (
        Op::Nf4Gemm,
        Dtype::BF16,
        Tolerance {
            atol: 1e-3,
            rtol: 8e-3,
        },
    ),
    // The kernels write no f16 (the launchers reject it); the entry keeps the table total.
    (
        Op::Nf4Gemm,
        Dtype::F16,
        Tolerance {
            atol: 1e-4,
            rtol: 1e-3,
        },
    ),
    // loss = (max − x[label]) + ln(s): s is a sum of ≤ ~256 expf terms per thread (2 ulp on the
    // GPU) merged in a tree, vs an f64 reference: ln(s) within ~1e-5 absolute; lse = max + ln(s)
    // adds one rounding relative to |lse| (logits up to ±1e4 in tests).
    (
        Op::CrossEntropy,
        Dtype::F32,
        Tolerance {
            atol: 2e-5,
            rtol: 1e-5,
        },
    ),
    // Losses and lse are f32 whatever the logits dtype; the entry keeps the table total.
    (
        Op::CrossEntropy,
        Dtype::BF16,
        Tolerance {
            atol: 2e-5,
            rtol: 1e-5,
        },
    ),
    // The kernels take no f16 logits (the launchers reject them); the entry keeps the table total.
    (
        Op::CrossEntropy,
        Dtype::F16,
        Tolerance {
            atol: 2e-5,
            rtol: 1e-5,
        },
    ),
    // One expf (2 ulp on the GPU) of the same f32 x − lse, minus 1 at the label (which cancels
    // when p ≈ 1: atol), times grad_scale ≤ 1.
    (
        Op::CrossEntropyBackward,
        Dtype::F32,
        Tolerance {
            atol: 1e-6,
            rtol: 1e-5,
        },
    ),
    // One bf16 rounding of nearly equal f32 values: at most one bf16 ulp apart.
    (
        Op::CrossEntropyBackward,
        Dtype::BF16,
        Tolerance {
            atol: 1e-6,
            rtol: 8e-3,
        },
    ),
    // The kernels take no f16 logits (the launchers reject them); the entry keeps the table total.
    (
        Op::CrossEntropyBackward,
        Dtype::F16,
        Tolerance {
            atol: 1e-6,
            rtol: 1e-3,
        },
    ),
    // Sums of ≤ 200 products of |x| ≲ 4 and |w| ≲ 0.5 reordered in f32, then one more sum over
    // r ≤ 64: a few e-6 absolute on values of order 1 (atol covers cancellation to ~0).
    (
        Op::LoraFused,
        Dtype::F32,
        Tolerance {
            atol: 1e-4,
            rtol: 1e-4,
        },
    ),
    // The same f32 value rounded once to bf16 on both sides: at most one bf16 ulp (2^-8) apart.
    (
        Op::LoraFused,
        Dtype::BF16,
        Tolerance {
            atol: 1e-2,
            rtol: 8e-3,
        },
    ),
    // The kernels take no f16 (the launchers reject it); the entry keeps the table total.
    (
        Op::LoraFused,
        Dtype::F16,
        Tolerance {
            atol: 1e-3,
            rtol: 1e-3,
        },
    ),
    // U is a reordered sum over N ≤ 136; dA sums ≤ 300 rows of X·U (in up to 5 slices) carrying
    // U's error; dX one more sum over r: a few e-6 relative on values of order 1-10.
    (
        Op::LoraFusedBackward,
        Dtype::F32,
        Tolerance {
            atol: 1e-4,
            rtol: 1e-4,
        },
    ),
    // dX rounded once to bf16 from nearly equal f32 values: one bf16 ulp.
    (
        Op::LoraFusedBackward,
        Dtype::BF16,
        Tolerance {
            atol: 1e-2,
            rtol: 8e-3,
        },
    ),
    // The kernels take no f16 (the launchers reject it); the entry keeps the table total.
    (
        Op::LoraFusedBackward,
        Dtype::F16,
        Tolerance {
            atol: 1e-3,
            rtol: 1e-3,
        },
    ),
    // Reordered f32 sums through a few layers of GEMMs (K ≤ 200), norms and softmax on logits
    // |x| ≲ 1.2: measured ≤ 3e-7 on logits and one ulp on the loss (~5); atol for logits near 0.
    (
        Op::LlamaLogits,
        Dtype::F32,
        Tolerance {
            atol: 1e-5,
            rtol: 1e-5,
        },
    ),
    // Rounded where torch rounds (measured bit-exact), but a reordered f32 sum that lands on the
    // other side of a bf16 rounding boundary flips one ulp (2^-8 relative) and carries forward.
    (
        Op::LlamaLogits,
        Dtype::BF16,
        Tolerance {
            atol: 4e-3,
            rtol: 8e-3,
        },
    ),
    // SmolLM2-135M (tests/gguf.rs, 18 tokens): f32 sums reordered through 30 layers, measured
    // 7.3e-5 on the last position's logits, 1.7e-5 on the log-sum-exp; twice that.
    (
        Op::RealModelLogits,
        Dtype::F32,
        Tolerance {
            atol: 1.5e-4,
            rtol: 1e-5,
        },
    ),
    // bf16: both round every op to bf16, but GEMM sums in another order land on the other side of
    // a rounding boundary and the difference grows over 30 layers: measured 0.44 on the last
    // position's logits (|logit| up to ~20), 0.37 on the log-sum-exp, one greedy token of 18
    // flipped at a near tie. Bit-exactness with transformers is claimed for f32 and NF4 codes
    // only.
    (
        Op::RealModelLogits,
        Dtype::BF16,
        Tolerance {
            atol: 0.75,
            rtol: 0.02,
        },
    ),
    // No f16 forward (LlamaModel refuses it); the entry keeps the table total.
    (
        Op::RealModelLogits,
        Dtype::F16,
        Tolerance {
            atol: 1.0,
            rtol: 1e-1,
        },
    ),
    // No f16 forward (LlamaModel refuses it); the entry keeps the table total.
    (
        Op::LlamaLogits,
        Dtype::F16,
        Tolerance {
            atol: 2e-3,
            rtol: 2e-3,
        },
    ),
    // f32 sums over B·T ≤ 27 rows and K ≤ 136 reordered through two layers and the loss: measured
    // ≤ 6e-6 on one layer's dA/dB (random dy), ≤ 2e-7 through the stack; atol for values near 0.
    (
        Op::LoraGrad,
        Dtype::F32,
        Tolerance {
            atol: 1e-5,
            rtol: 1e-4,
        },
    ),
    // bf16 compute: the forward's roundings pass gradients unchanged (straight-through), so the
    // recomputed activations carry bf16 ulps (2^-8 relative) into every product.
    (
        Op::LoraGrad,
        Dtype::BF16,
        Tolerance {
            atol: 1e-2,
            rtol: 2e-2,
        },
    ),
    // No f16 compute (LlamaModel refuses it); the entry keeps the table total.
    (
        Op::LoraGrad,
        Dtype::F16,
        Tolerance {
            atol: 2e-3,
            rtol: 4e-3,
        },
    ),
    // CUDA vs CPU rows: not yet measured on a GPU (none has been available). The error sources
    // are those of LlamaLogits vs transformers (reordered f32 sums, measured ≤ 3e-7 there) plus
    // the GPU's expf/logf (≤ 2 ulp), so the same bounds.
    (
        Op::LlamaDeviceLogits,
        Dtype::F32,
        Tolerance {
            atol: 1e-5,
            rtol: 1e-5,
        },
    ),
    // One flipped bf16 rounding (2^-8 relative) carried forward, as LlamaLogits bf16.
    (
        Op::LlamaDeviceLogits,
        Dtype::BF16,
        Tolerance {
            atol: 4e-3,
            rtol: 8e-3,
        },
    ),
    // No f16 forward (LlamaModel refuses it); the entry keeps the table total.
    (
        Op::LlamaDeviceLogits,
        Dtype::F16,
        Tolerance {
            atol: 2e-3,
            rtol: 2e-3,
        },
    ),
    // As LoraGrad: f32 sums over B·T ≤ 27 rows and K ≤ 136 reordered through two layers.
    (
        Op::LoraGradDevice,
        Dtype::F32,
        Tolerance {
            atol: 1e-5,
            rtol: 1e-4,
        },
    ),
    // bf16 compute: a flipped rounding in a recomputed activation carries into every product.
    (
        Op::LoraGradDevice,
        Dtype::BF16,
        Tolerance {
            atol: 1e-2,
            rtol: 2e-2,
        },
    ),
    // No f16 compute (LlamaModel refuses it); the entry keeps the table total.
    (
        Op::LoraGradDevice,
        Dtype::F16,
        Tolerance {
            atol: 2e-3,
            rtol: 4e-3,
        },
    ),
    // f32 compute: the LoraGrad F32 sums, with values scaled to |x| ≤ 1.
    (
        Op::LoraGradScaled,
        Dtype::F32,
        Tolerance {
            atol: 1e-5,
            rtol: 1e-4,
        },
    ),
    // The oracle runs the same bf16 forward bit for bit; the explicit backward evaluates the
    // softmax and SwiGLU derivatives at the rounded activations where autograd uses the unrounded
    // ones (2^-9 relative), and a bf16 adapter rounds x·Aᵀ before B: measured about 6e-3 of a
    // tensor's largest gradient (bf16 adapter, one layer, NF4), about 3.5e-3 through the stack.
    (
        Op::LoraGradScaled,
        Dtype::BF16,
        Tolerance {
            atol: 1e-2,
            rtol: 1e-2,
        },
    ),
    // No f16 compute (LlamaModel refuses it); the entry keeps the table total.
    (
        Op::LoraGradScaled,
        Dtype::F16,
        Tolerance {
            atol: 2e-3,
            rtol: 4e-3,
        },
    ),
    // f32 compute against PEFT: the LoraGrad F32 sums, with values scaled to |x| ≤ 1.
    (
        Op::LoraGradPeftScaled,
        Dtype::F32,
        Tolerance {
            atol: 1e-5,
            rtol: 1e-4,
        },
    ),
    // torch rounds every activation gradient to bf16 (the explicit backward keeps them f32):
    // measured ≤ 1.6e-2 of a tensor's largest gradient (bf16 adapter), ≤ 1.2e-2 (f32 adapter,
    // dense or NF4); PEFT's own bf16 and f32 gradients on the same weights differ by ≤ 3.7e-2.
    (
        Op::LoraGradPeftScaled,
        Dtype::BF16,
        Tolerance {
            atol: 2.5e-2,
            rtol: 2e-2,
        },
    ),
    // No f16 compute (LlamaModel refuses it); the entry keeps the table total.
    (
        Op::LoraGradPeftScaled,
        Dtype::F16,
        Tolerance {
            atol: 2e-3,
            rtol: 4e-3,
        },
    ),
    // Measured bit-exact against PEFT (f32 and bf16, all 115560 weights of the fixture); the
    // tolerance allows a GEMM that sums the r ≤ 64 terms in another order or with fma (a few ulps
    // of |w| ≲ 1), and row/column sums of ≤ 200 such weights compared in f64.
    (
        Op::LoraMerge,
        Dtype::F32,
        Tolerance {
            atol: 2e-6,
            rtol: 1e-6,
        },
    ),
    // One final RNE rounding of nearly equal f32 values: at most one bf16 ulp apart.
    (
        Op::LoraMerge,
        Dtype::BF16,
        Tolerance {
            atol: 1e-6,
            rtol: 8e-3,
        },
    ),
    // One final RNE rounding of nearly equal f32 values: at most one f16 ulp apart.
    (
        Op::LoraMerge,
        Dtype::F16,
        Tolerance {
            atol: 1e-6,
            rtol: 1e-3,
        },
    ),
    // f32 merged weights: only the reassociation of each adapted linear (GEMMs with K ≤ 136, as
    // for LlamaLogits); measured ≤ 3.3e-7 on the tiny Llama, dense and NF4 bases.
    (
        Op::MergedLogits,
        Dtype::F32,
        Tolerance {
            atol: 1e-5,
            rtol: 1e-5,
        },
    ),
    // bf16 merged weights run in f32: each weight moved by ≤ 2^-9 relative; measured 1.9e-3 on
    // logits |x| ≲ 1.5 (the adapter itself moves them by ≥ 0.59).
    (
        Op::MergedLogits,
        Dtype::BF16,
        Tolerance {
            atol: 1e-2,
            rtol: 8e-3,
        },
    ),
    // f16 merged weights run in f32: each weight moved by ≤ 2^-12 relative; measured 2.4e-4 on
    // the fixture (hidden 72, logits |x| ≲ 1.5), 2.3e-3 on tests/gguf.rs's f16 GGUF export (hidden
    // 256, K up to 512, |x| ≤ 2.7; into the original weights instead: 0.69).
    (
        Op::MergedLogits,
        Dtype::F16,
        Tolerance {
            atol: 5e-3,
            rtol: 1e-3,
        },
    ),
    // f32 sums over ≤ 300 keys of p·v (|v| ≲ 4) and over D ≤ 128 for the scores, reordered, and
    // expf within 2 ulp on the GPU: measured ≤ 6e-7 absolute on o and lse (emulated, T ≤ 130).
    (
        Op::Attention,
        Dtype::F32,
        Tolerance {
            atol: 2e-5,
            rtol: 2e-5,
        },
    ),
    // One rounding to bf16 of nearly equal f32 values, and the tensor-core kernel rounds p to bf16
    // before p·v (2^-9 relative per term): measured ≤ 7.9e-3 absolute on o (one ulp at |o| ~ 1),
    // at most 0.43 of this bound (T ≤ 300, D ≤ 128).
    (
        Op::Attention,
        Dtype::BF16,
        Tolerance {
            atol: 1e-2,
            rtol: 8e-3,
        },
    ),
    // The kernels take no f16 (the launchers reject it); the entry keeps the table total.
    (
        Op::Attention,
        Dtype::F16,
        Tolerance {
            atol: 1e-3,
            rtol: 1e-3,
        },
    ),
    // dp − delta cancels (delta is the p-weighted mean of dp), so the reordered f32 sums' error
    // lands on smaller values: measured ≤ 2.4e-6 absolute on dq, dk, dv (emulated, T ≤ 130).
    (
        Op::AttentionBackward,
        Dtype::F32,
        Tolerance {
            atol: 2e-5,
            rtol: 1e-4,
        },
    ),
    // The tensor-core kernels round p and ds to bf16 before the products (as FlashAttention-2),
    // then one rounding of the output: measured ≤ 0.031 absolute on dv (T = 300, D = 128, sums
    // over ≤ 300 rows), at most 0.78 of the rtol 8e-3 bound; two bf16 ulps leave room for the GPU.
    (
        Op::AttentionBackward,
        Dtype::BF16,
        Tolerance {
            atol: 1e-2,
            rtol: 1.6e-2,
        },
    ),
    // The kernels take no f16 (the launchers reject it); the entry keeps the table total.
    (
        Op::AttentionBackward,
        Dtype::F16,
        Tolerance {
            atol: 1e-3,
            rtol: 1e-3,
        },
    ),
    // f32: the same math as candle's matmul / softmax graph, reordered sums over ≤ 9 keys.
    (
        Op::AttentionRuntime,
        Dtype::F32,
        Tolerance {
            atol: 1e-5,
            rtol: 1e-5,
        },
    ),
    // bf16 runtime: scores, probabilities and the output each rounded to bf16 (the reference keeps
    // f32 until its one rounding): a few bf16 ulps (2^-8 relative each).
    (
        Op::AttentionRuntime,
        Dtype::BF16,
        Tolerance {
            atol: 2e-2,
            rtol: 2e-2,
        },
    ),
    // No f16 runtime (LlamaModel refuses it); the entry keeps the table total.
    (
        Op::AttentionRuntime,
        Dtype::F16,
        Tolerance {
            atol: 1e-3,
            rtol: 1e-3,
        },
    ),
    // Not yet measured on a GPU (none has been available). On top of LoraGradDevice bf16: dy
    // rounded to bf16 (2^-9 relative per element) before each frozen NF4 input-gradient product,
    // through two layers and into dA = s·(dy·B)ᵀ·x, so twice its bounds.
    (
        Op::LoraGradDeviceNf4Gemm,
        Dtype::BF16,
        Tolerance {
            atol: 2e-2,
            rtol: 4e-2,
        },
    ),
    // The NF4 dequant-GEMM path runs in bf16 compute only; these entries keep the table total.
    (
        Op::LoraGradDeviceNf4Gemm,
        Dtype::F32,
        Tolerance {
            atol: 1e-5,
            rtol: 1e-4,
        },
    ),
    (
        Op::LoraGradDeviceNf4Gemm,
        Dtype::F16,
        Tolerance {
            atol: 2e-3,
            rtol: 4e-3,
        },
    ),
    // Measured (tests/fused_runtime.rs, emulated kernels, 2 layers, GQA, a left-padded row,
    // real tokens' rows): within 4.0e-7 of the largest logit.
    (
        Op::FusedLogits,
        Dtype::F32,
        Tolerance {
            atol: 1e-5,
            rtol: 1e-5,
        },
    ),
    // Measured: within 1.1e-2 of the largest logit (LlamaLogits bf16 allows a flipped bf16
    // rounding carried forward; here every op rounds in its own place).
    (
        Op::FusedLogits,
        Dtype::BF16,
        Tolerance {
            atol: 3e-2,
            rtol: 3e-2,
        },
    ),
    // No f16 compute (LlamaModel refuses it); the entry keeps the table total.
    (
        Op::FusedLogits,
        Dtype::F16,
        Tolerance {
            atol: 5e-2,
            rtol: 5e-2,
        },
    ),
    // f32 compute: reordered f32 sums through two layers and the per-row logsumexp; measured
    // 4.8e-7 (0 with rsLoRA) on a loss of 4.5 (tests/fused_lora_loss.rs).
    (
        Op::FusedLoss,
        Dtype::F32,
        Tolerance {
            atol: 1e-5,
            rtol: 1e-5,
        },
    ),
    // bf16 compute: a flipped bf16 rounding (2^-8 relative) in an activation carried to the
    // logits, as LlamaLogits bf16; measured ≤ 3.7e-3 on a loss of 4.5.
    (
        Op::FusedLoss,
        Dtype::BF16,
        Tolerance {
            atol: 4e-3,
            rtol: 8e-3,
        },
    ),
    // No f16 compute (LlamaModel refuses it); the entry keeps the table total.
    (
        Op::FusedLoss,
        Dtype::F16,
        Tolerance {
            atol: 2e-3,
            rtol: 2e-3,
        },
    ),
    // f32 compute, values scaled to |x| ≤ 1: the LoraGrad F32 sums; measured ≤ 5.1e-6 (rsLoRA),
    // ≤ 1.1e-6 without, over all 28 tensors of two layers.
    (
        Op::FusedLoraGrad,
        Dtype::F32,
        Tolerance {
            atol: 2e-5,
            rtol: 1e-4,
        },
    ),
    // bf16 compute, values scaled to |x| ≤ 1: measured ≤ 2.6e-2 of a tensor's largest gradient
    // (f32 or bf16 adapter); with the LoRA pairs on tensor ops (so only RMSNorm, RoPE, attention,
    // SwiGLU and the cross-entropy fused, each reading bf16 gradients) already 2.0–2.5e-2.
    (
        Op::FusedLoraGrad,
        Dtype::BF16,
        Tolerance {
            atol: 4e-2,
            rtol: 2e-2,
        },
    ),
    // No f16 compute (LlamaModel refuses it); the entry keeps the table total.
    (
        Op::FusedLoraGrad,
        Dtype::F16,
        Tolerance {
            atol: 2e-3,
            rtol: 4e-3,
        },
    ),
    // LoraGradDevice f32's error carried through ≤ 4 updates (lr 1e-3: parameters move ~1e-3 per
    // step, so atol 1e-6 is ~0.1% of one update); not yet measured on a GPU.
    (
        Op::TrainDevice,
        Dtype::F32,
        Tolerance {
            atol: 1e-6,
            rtol: 1e-3,
        },
    ),
    // The device training tests run in f32 compute; these entries keep the table total, as
    // LoraGradDevice's bf16 and f16 rows carried through the updates.
    (
        Op::TrainDevice,
        Dtype::BF16,
        Tolerance {
            atol: 2e-2,
            rtol: 4e-2,
        },
    ),
    (
        Op::TrainDevice,
        Dtype::F16,
        Tolerance {
            atol: 4e-3,
            rtol: 8e-3,
        },
    ),
    // Measured 1.13 ulp (tests/gguf.rs, head_dim 64, theta 5e5, all three regions); 4 ulps.
    (
        Op::RopeFreqFactors,
        Dtype::F32,
        Tolerance {
            atol: 0.0,
            rtol: 4.0 * f32::EPSILON,
        },
    ),
    // Frequencies are f32 only; the entries keep the table total.
    (
        Op::RopeFreqFactors,
        Dtype::BF16,
        Tolerance {
            atol: 0.0,
            rtol: 4.0 * f32::EPSILON,
        },
    ),
    (
        Op::RopeFreqFactors,
        Dtype::F16,
        Tolerance {
            atol: 0.0,
            rtol: 4.0 * f32::EPSILON,
        },
    ),
];

/// The tolerance for `op` compared in `dtype`.
pub fn lookup(op: Op, dtype: Dtype) -> Tolerance {
    TABLE
        .iter()
        .find(|(o, d, _)| *o == op && *d == dtype)
        .map(|(_, _, t)| *t)
        .expect("every (Op, Dtype) pair has a table entry; see tolerance::tests")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_op_and_dtype_has_an_entry() {
        for op in [
            Op::Dequantize,
            Op::RealModelLogits,
            Op::Reduction,
            Op::MatmulBf16,
            Op::AdamW,
            Op::RmsNorm,
            Op::RmsNormBackward,
            Op::Rope,
            Op::Swiglu,
            Op::Nf4Gemv,
            Op::Nf4Gemm,
            Op::CrossEntropy,
            Op::CrossEntropyBackward,
            Op::LoraFused,
            Op::LoraFusedBackward,
            Op::LlamaLogits,
            Op::LoraGrad,
            Op::LlamaDeviceLogits,
            Op::LoraGradDevice,
            Op::LoraGradScaled,
            Op::LoraGradPeftScaled,
            Op::LoraMerge,
            Op::MergedLogits,
            Op::Attention,
            Op::AttentionBackward,
            Op::AttentionRuntime,
            Op::LoraGradDeviceNf4Gemm,
            Op::FusedLogits,
            Op::FusedLoss,
            Op::FusedLoraGrad,
            Op::TrainDevice,
            Op::RopeFreqFactors,
        ] {
            for dt in [Dtype::F32, Dtype::BF16, Dtype::F16] {
                let n = TABLE
                    .iter()
                    .filter(|(o, d, _)| *o == op && *d == dt)
                    .count();
                assert_eq!(n, 1, "{op:?} {dt:?}");
            }
        }
    }

    #[test]
    fn exact_rejects_one_ulp_and_accepts_equal_nans() {
        let t = Tolerance::EXACT;
        assert!(t.check(&[1.0, f32::NAN], &[1.0, f32::NAN]).is_ok());
        let e = t
            .check(&[1.0], &[f32::from_bits(1.0f32.to_bits() + 1)])
            .unwrap_err();
        assert_eq!(e.count, 1);
        assert!(
            t.check(&[0.0], &[-0.0]).is_err(),
            "signed zeros differ in bits"
        );
    }

    #[test]
    fn relative_tolerance_scales_with_magnitude() {
        let t = Tolerance {
            atol: 0.0,
            rtol: 1e-3,
        };
        assert!(t.check(&[1000.5], &[1000.0]).is_ok());
        assert!(t.check(&[1.5], &[1.0]).is_err());
        assert!(t.check(&[1.0, 2.0], &[1.0]).is_err());
    }
}
