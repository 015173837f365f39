//! The fused LoRA kernels (`kernels/lora.cu`) on the runtime's tensors: the adapted linear's
//! forward `y + s·(x·Aᵀ)·Bᵀ` in place of the base output, keeping T = x·Aᵀ `[M, r]` f32, and its
//! backward from T, on the CPU emulation or the model's CUDA device, over compute and adapter dtypes.

use std::collections::BTreeMap;

use candle_core::{DType, Tensor};
use half::bf16;

use crate::kernels::lora::{self, LoraDims, LoraOperands, MAX_LORA_RANK};
use crate::model::adapter::{LoraPair, TargetModule};
use crate::model::fused::{on_device, FusedElement, Kernels, TensorDevice};
use crate::{Error, Result};

/// T = x·Aᵀ `[M, r]` f32 of each adapted linear of one layer, from the recomputed forward: the
/// backward's dB = s·dYᵀ·T reads it instead of a third product x·Aᵀ.
pub(crate) type SavedProjections = BTreeMap<TargetModule, Tensor>;

/// One adapted linear's operands for the kernels: the pair, its scaling and the sizes.
pub(crate) struct FusedLora<'a> {
    pub pair: &'a LoraPair,
    pub scale: f32,
    pub dims: LoraDims,
}

impl<'a> FusedLora<'a> {
    /// The kernels' operands over `a` and `b` (kernel arguments on a launch device).
    pub(crate) fn operands<'s, S: ?Sized>(&self, a: &'s S, b: &'s S) -> LoraOperands<'s, S> {
        LoraOperands {
            dims: self.dims,
            a,
            b,
            scale: self.scale,
        }
    }

    /// The kernels' view of `pair` on `rows` rows, or None where they do not take it (rank above
    /// [`MAX_LORA_RANK`], sizes beyond their grids): the caller then runs the tensor ops.
    pub(crate) fn new(pair: &'a LoraPair, scale: f64, rows: usize) -> Result<Option<Self>> {
        let (rank, in_features) = pair.a.dims2()?;
        let (out_features, _) = pair.b.dims2()?;
        if rank > MAX_LORA_RANK {
            return Ok(None);
        }
        Ok(
            LoraDims::new("fused lora", rows, in_features, out_features, rank)
                .ok()
                .map(|dims| FusedLora {
                    pair,
                    scale: scale as f32,
                    dims,
                }),
        )
    }
}

/// Runs `$f::<T, W>(args)` for the compute dtype `$t` and the adapter dtype `$w`.
macro_rules! by_dtypes {
    ($t:expr, $w:expr, $f:ident ( $($arg:expr),* $(,)? )) => {
        match ($t, $w) {
            (DType::F32, DType::F32) => $f::<f32, f32>($($arg),*),
            (DType::F32, DType::BF16) => $f::<f32, bf16>($($arg),*),
            (DType::BF16, DType::F32) => $f::<bf16, f32>($($arg),*),
            (DType::BF16, DType::BF16) => $f::<bf16, bf16>($($arg),*),
            (t, w) => Err(Error::invalid(
                "fused lora",
                format!("compute dtype {t:?} and adapter dtype {w:?} are not f32 or bf16"),
            )),
        }
    };
}

/// The forward on `x` `[M, in]` and the base output `y` `[M, out]` (in `dtype`):
/// `(y + s·T·Bᵀ rounded once to dtype, T [M, r] f32)`.
pub(crate) fn forward(
    k: &Kernels,
    dtype: DType,
    lora: &FusedLora<'_>,
    x: &Tensor,
    y: &Tensor,
) -> Result<(Tensor, Tensor)> {
    by_dtypes!(dtype, lora.pair.a.dtype(), forward_t(k, lora, x, y))
}

/// The backward from `x` `[M, in]`, the forward's `t` `[M, r]` and `dy` `[M, out]`, with the base
/// input gradient `dx` `[M, in]`: `(dx + s·(dY·B)·A rounded once to dtype, dA [r, in], dB [out, r])`,
/// the gradients f32.
pub(crate) fn backward(
    k: &Kernels,
    dtype: DType,
    lora: &FusedLora<'_>,
    x: &Tensor,
    t: &Tensor,
    dy: &Tensor,
    dx: &Tensor,
) -> Result<(Tensor, LoraPair)> {
    by_dtypes!(
        dtype,
        lora.pair.a.dtype(),
        backward_t(k, lora, x, t, dy, dx)
    )
}

fn forward_on<D: TensorDevice, T: FusedElement, W: FusedElement>(
    dev: &D,
    lora: &FusedLora<'_>,
    x: &Tensor,
    y: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let d = lora.dims;
    let (xs, a, b) = (
        dev.input::<T>(x)?,
        dev.input::<W>(&lora.pair.a)?,
        dev.input::<W>(&lora.pair.b)?,
    );
    let mut out = dev.writable::<T>(y)?;
    let t = lora::lora_forward::<D, T, W, _>(dev, &lora.operands(&a, &b), &xs, &mut out)?;
    Ok((
        dev.tensor(out, y.dims())?,
        dev.tensor(t, &[d.tokens, d.rank])?,
    ))
}

fn forward_t<T: FusedElement, W: FusedElement>(
    k: &Kernels,
    lora: &FusedLora<'_>,
    x: &Tensor,
    y: &Tensor,
) -> Result<(Tensor, Tensor)> {
    on_device!(k, |dev| forward_on::<_, T, W>(dev, lora, x, y))
}

fn backward_on<D: TensorDevice, T: FusedElement, W: FusedElement>(
    dev: &D,
    lora: &FusedLora<'_>,
    x: &Tensor,
    t: &Tensor,
    dy: &Tensor,
    dx: &Tensor,
) -> Result<(Tensor, LoraPair)> {
    let d = lora.dims;
    let (xs, ts, dys) = (
        dev.input::<T>(x)?,
        dev.input::<f32>(t)?,
        dev.input::<T>(dy)?,
    );
    let (a, b) = (dev.input::<W>(&lora.pair.a)?, dev.input::<W>(&lora.pair.b)?);
    let mut dx_out = dev.writable::<T>(dx)?;
    let grads = lora::lora_backward::<D, T, W, _>(
        dev,
        &lora.operands(&a, &b),
        &xs,
        &ts,
        &dys,
        &mut dx_out,
    )?;
    Ok((
        dev.tensor(dx_out, dx.dims())?,
        LoraPair {
            a: dev.tensor(grads.da, &[d.rank, d.in_features])?,
            b: dev.tensor(grads.db, &[d.out_features, d.rank])?,
        },
    ))
}

fn backward_t<T: FusedElement, W: FusedElement>(
    k: &Kernels,
    lora: &FusedLora<'_>,
    x: &Tensor,
    t: &Tensor,
    dy: &Tensor,
    dx: &Tensor,
) -> Result<(Tensor, LoraPair)> {
    on_device!(k, |dev| backward_on::<_, T, W>(dev, lora, x, t, dy, dx))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::emu::launches_on_this_thread;
    use crate::model::fused::KernelPath;
    use crate::tolerance::{lookup, Dtype, Op};
    use candle_core::Device;

    use crate::testing::values;

    fn random(dims: (usize, usize), seed: u64) -> Tensor {
        let v = crate::testing::normal_vector(dims.0 * dims.1, 0.5, seed);
        Tensor::from_vec(v, dims, &Device::Cpu).unwrap()
    }

    #[test]
    fn emulated_bridge_matches_the_tensor_products() {
        // f32 everywhere: the bridge against x·Aᵀ, y + s·T·Bᵀ, dB = s·dyᵀ·T, dA = s·(dy·B)ᵀ·x
        // and dx + s·(dy·B)·A as f32 tensor products (sums in another order).
        let (m, kk, n, r) = (13, 24, 20, 5);
        let (x, y, dy, dx) = (
            random((m, kk), 1),
            random((m, n), 2),
            random((m, n), 3),
            random((m, kk), 4),
        );
        let pair = LoraPair {
            a: random((r, kk), 5),
            b: random((n, r), 6),
        };
        let s = 0.75;
        let lora = FusedLora::new(&pair, s, m).unwrap().unwrap();
        let k = Kernels::new(KernelPath::Emulated, &Device::Cpu).unwrap();
        let before = launches_on_this_thread("k_lora_xa");
        let (y_got, t_got) = forward(&k, DType::F32, &lora, &x, &y).unwrap();
        assert_eq!(launches_on_this_thread("k_lora_xa"), before + 1);
        let (dx_got, g) = backward(&k, DType::F32, &lora, &x, &t_got, &dy, &dx).unwrap();

        let t = x.matmul(&pair.a.t().unwrap()).unwrap();
        let y_want = (&y + (t.matmul(&pair.b.t().unwrap()).unwrap() * s).unwrap()).unwrap();
        let u = dy.matmul(&pair.b).unwrap();
        let db = (dy.t().unwrap().matmul(&t).unwrap() * s).unwrap();
        let da = (u.t().unwrap().matmul(&x).unwrap() * s).unwrap();
        let dx_want = (&dx + (u.matmul(&pair.a).unwrap() * s).unwrap()).unwrap();
        let fwd = lookup(Op::LoraFused, Dtype::F32);
        let bwd = lookup(Op::LoraFusedBackward, Dtype::F32);
        for (what, tol, got, want) in [
            ("T", fwd, &t_got, &t),
            ("y", fwd, &y_got, &y_want),
            ("dx", bwd, &dx_got, &dx_want),
            ("dA", bwd, &g.a, &da),
            ("dB", bwd, &g.b, &db),
        ] {
            assert_eq!(got.dims(), want.dims(), "{what}");
            if let Err(e) = tol.check(&values(got), &values(want)) {
                panic!("{what}: {e}");
            }
        }
    }

    #[test]
    fn ranks_beyond_the_kernels_fall_back() {
        let pair = LoraPair {
            a: random((MAX_LORA_RANK + 1, 8), 1),
            b: random((8, MAX_LORA_RANK + 1), 2),
        };
        assert!(FusedLora::new(&pair, 1.0, 4).unwrap().is_none());
        let pair = LoraPair {
            a: random((MAX_LORA_RANK, 8), 1),
            b: random((8, MAX_LORA_RANK), 2),
        };
        assert!(FusedLora::new(&pair, 1.0, 4).unwrap().is_some());
    }
}
