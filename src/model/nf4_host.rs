//! The NF4 linears of a CPU model multiplied on the emulator (docs/ARCHITECTURE.md, "Activation
//! storage"): the kernel path on the CPU takes the same product route a CUDA device takes — the
//! path [`Nf4MatmulPlan`] picks for the shape, then `k_nf4_gemv` or the tensor-core
//! `k_nf4_gemm` / `k_nf4_gemm_dx` launched through the same generic launchers, reading the
//! model's host copy of the codes and scales in place. Where CUDA would dequantize into a buffer
//! and call cuBLAS, the emulator dequantizes with `k_nf4_dequantize` and multiplies with
//! [`crate::model::matmul`].

use candle_core::{DType, Tensor};
use half::bf16;

use crate::kernels::device::Emulator;
use crate::kernels::launch::Element;
use crate::kernels::nf4::{dequantize, Nf4Weight, Scales};
use crate::kernels::nf4_gemm::{nf4_gemm, GemmOp, Nf4MatmulPath, Nf4MatmulPlan};
use crate::kernels::nf4_gemv::nf4_gemv;
use crate::model::fused::{FusedElement, TensorDevice};
use crate::model::matmul::{matmul, Weight};
use crate::quant::nf4::{Nf4Scales, Nf4Tensor};
use crate::{Error, Result};

/// `t` as the kernels' weight view over its host buffers.
fn weight(t: &Nf4Tensor) -> Result<Nf4Weight<'_, Emulator>> {
    let [n, k] = t.shape[..] else {
        return Err(Error::invalid(
            "nf4 linear",
            format!("NF4 weight of shape {:?} is not 2-D", t.shape),
        ));
    };
    let scales = match &t.scales {
        Nf4Scales::F32(absmax) => Scales::F32(&absmax[..]),
        Nf4Scales::Double(dq) => Scales::Double {
            absmax_q: &dq.absmax_q[..],
            nested_absmax: &dq.nested_absmax[..],
            nested_code: &dq.nested_code[..],
            offset: dq.offset,
            nested_blocksize: dq.nested_blocksize,
        },
    };
    Ok(Nf4Weight {
        packed: &t.packed[..],
        scales,
        n,
        k,
        blocksize: t.blocksize,
        code: &t.code[..],
    })
}

/// `a · Wᵀ` (`op` Forward, `a` `[m, in]`) or `a · W` (InputGrad, `a` `[m, out]`) for the NF4
/// weight `t` `[out, in]` on the emulator: `a` rounded to bf16, the result `[m, out]` / `[m, in]`
/// in `out` (bf16 on the kernel path, rounded once by the kernel).
pub(crate) fn matmul_nf4(t: &Nf4Tensor, op: GemmOp, a: &Tensor, out: DType) -> Result<Tensor> {
    match out {
        DType::BF16 => product::<bf16>(t, op, a),
        DType::F32 => product::<f32>(t, op, a),
        other => Err(Error::invalid(
            op.name(),
            format!("an NF4 product in {other:?}, not f32 or bf16"),
        )),
    }
}

fn product<Y: FusedElement + Element>(t: &Nf4Tensor, op: GemmOp, a: &Tensor) -> Result<Tensor> {
    let dev = &Emulator::default();
    let w = weight(t)?;
    let (m, red) = a.dims2()?;
    let (want, cols) = match op {
        GemmOp::Forward => (w.k, w.n),
        GemmOp::InputGrad => (w.n, w.k),
    };
    if red != want {
        return Err(Error::invalid(
            op.name(),
            format!("activations [{m}, {red}] for a [{}, {}] weight", w.n, w.k),
        ));
    }
    let path = Nf4MatmulPlan::from_env()?.choose_path(op, m, w.n, w.k);
    let a16 = dev.input::<bf16>(a)?;
    let y: Vec<Y> = match path {
        Nf4MatmulPath::Gemv if path.supports(op, m) => {
            nf4_gemv::<_, bf16, Y, [Y]>(dev, &a16, m, &w, None)?
        }
        Nf4MatmulPath::Gemv | Nf4MatmulPath::TensorCore => nf4_gemm::<_, Y>(dev, op, &a16, m, &w)?,
        Nf4MatmulPath::DequantCublas => {
            // The weight in bf16 for one product, as CUDA's reused dequantize buffer.
            let wt = Tensor::from_vec(dequantize::<_, bf16>(dev, &w)?, (w.n, w.k), a.device())?;
            let side = match op {
                GemmOp::Forward => Weight::Transposed,
                GemmOp::InputGrad => Weight::Plain,
            };
            let y = matmul(&a.to_dtype(DType::BF16)?, &wt, side)?;
            return Ok(y.to_dtype(<Y as candle_core::WithDType>::DTYPE)?);
        }
    };
    Ok(Tensor::from_vec(y, (m, cols), a.device())?)
}
