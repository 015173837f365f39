//! Products of activations with frozen weights in the activations' storage dtype
//! (docs/ARCHITECTURE.md, "Activation storage"). f32 activations multiply as candle's f32 matmul.
//! bf16 activations stay bf16 in memory and accumulate in f32: on a CUDA device through candle's
//! bf16 matmul (cuBLAS, f32 compute); on the CPU, whose candle matmul widens whole operands to
//! f32, through [`bf16_tiled`], which widens one block of each operand at a time, so a bf16 run
//! holds no f32 copy of an activation or a weight.

use candle_core::{DType, Tensor};

use crate::{Error, Result};

/// How the weight enters the product.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Weight {
    /// `x · Wᵀ` with W `[n, k]` (a linear's forward).
    Transposed,
    /// `x · W` with W `[k, n]` (a linear's input gradient).
    Plain,
}

/// f32 elements in one widened operand block of [`bf16_tiled`] (8 MiB).
pub(crate) const TILE_ELEMENTS: usize = 1 << 21;

/// `x` `[m, k]` times the weight `w` as `side` says: `[m, n]` in x's dtype. For f32 x, w is
/// widened to f32 and the product is candle's (unrounded f32). For bf16 x, each output is the f32
/// sum of exact bf16 × bf16 products (a weight in f32 must hold bf16 values), rounded once.
pub(crate) fn matmul(x: &Tensor, w: &Tensor, side: Weight) -> Result<Tensor> {
    match x.dtype() {
        DType::F32 => {
            let w = w.to_dtype(DType::F32)?;
            Ok(match side {
                Weight::Transposed => x.matmul(&w.t()?)?,
                Weight::Plain => x.matmul(&w)?,
            })
        }
        DType::BF16 if x.device().is_cpu() => bf16_tiled(x, w, side, TILE_ELEMENTS),
        DType::BF16 => {
            let w = w.to_dtype(DType::BF16)?;
            Ok(match side {
                Weight::Transposed => x.matmul(&w.t()?)?,
                Weight::Plain => x.matmul(&w)?,
            })
        }
        other => Err(Error::invalid(
            "matmul",
            format!("activations of {other:?} are not f32 or bf16"),
        )),
    }
}

/// [`matmul`] for bf16 `x` on the CPU: blocks of x's rows and of the weight's output columns,
/// each at most `tile` elements once widened, multiplied in f32 and rounded to bf16 block by
/// block. Every output sums the same k products in the same f32 matmul as a whole-operand
/// product, so the blocking changes no value.
pub(crate) fn bf16_tiled(x: &Tensor, w: &Tensor, side: Weight, tile: usize) -> Result<Tensor> {
    let (m, k) = x.dims2()?;
    let (wk, n) = match (side, w.dims2()?) {
        (Weight::Transposed, (n, wk)) => (wk, n),
        (Weight::Plain, (wk, n)) => (wk, n),
    };
    if wk != k {
        return Err(Error::invalid(
            "matmul",
            format!(
                "activations [{m}, {k}] for a {side:?} weight {:?}",
                w.dims()
            ),
        ));
    }
    let block = (tile / k.max(1)).max(1);
    let (rows, cols) = (block.min(m.max(1)), block.min(n.max(1)));
    let mut row_blocks = Vec::with_capacity(m.div_ceil(rows));
    for i0 in (0..m).step_by(rows) {
        let xi = x.narrow(0, i0, rows.min(m - i0))?.to_dtype(DType::F32)?;
        let mut pieces = Vec::with_capacity(n.div_ceil(cols));
        for j0 in (0..n).step_by(cols) {
            let nj = cols.min(n - j0);
            let wj = match side {
                Weight::Transposed => w.narrow(0, j0, nj)?.to_dtype(DType::F32)?.t()?,
                Weight::Plain => w.narrow(1, j0, nj)?.contiguous()?.to_dtype(DType::F32)?,
            };
            pieces.push(xi.matmul(&wj)?.to_dtype(DType::BF16)?);
        }
        row_blocks.push(join(pieces, 1)?);
    }
    if row_blocks.is_empty() {
        return Ok(Tensor::zeros((m, n), DType::BF16, x.device())?);
    }
    join(row_blocks, 0)
}

fn join(mut pieces: Vec<Tensor>, dim: usize) -> Result<Tensor> {
    if pieces.len() == 1 {
        return Ok(pieces.swap_remove(0));
    }
    Ok(Tensor::cat(&pieces, dim)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn bf16_values(dims: (usize, usize), seed: usize) -> Tensor {
        let values: Vec<f32> = (0..dims.0 * dims.1)
            .map(|i| (((i * 7919 + seed * 104_729) % 2003) as f32 - 1001.0) / 257.0)
            .collect();
        Tensor::from_vec(values, dims, &Device::Cpu)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap()
    }

    fn bits(t: &Tensor) -> Vec<u16> {
        let v = t.flatten_all().unwrap().to_vec1::<half::bf16>().unwrap();
        v.into_iter().map(half::bf16::to_bits).collect()
    }

    #[test]
    fn tiles_give_the_whole_operand_product_rounded_once() {
        // Small tiles force many row and column blocks, uneven at the edges.
        let (m, k, n) = (37, 24, 29);
        let x = bf16_values((m, k), 1);
        for side in [Weight::Transposed, Weight::Plain] {
            let w = match side {
                Weight::Transposed => bf16_values((n, k), 2),
                Weight::Plain => bf16_values((k, n), 2),
            };
            let wide = matmul(&x.to_dtype(DType::F32).unwrap(), &w, side).unwrap();
            let want = wide.to_dtype(DType::BF16).unwrap();
            for tile in [1, k * 5, k * 16, TILE_ELEMENTS] {
                let got = bf16_tiled(&x, &w, side, tile).unwrap();
                assert_eq!(got.dtype(), DType::BF16);
                assert_eq!(got.dims(), [m, n]);
                assert_eq!(bits(&got), bits(&want), "{side:?} tile {tile}");
            }
            let got = matmul(&x, &w, side).unwrap();
            assert_eq!(bits(&got), bits(&want), "{side:?} through matmul");
        }
    }

    #[test]
    fn mismatched_operands_are_refused() {
        let x = bf16_values((4, 8), 1);
        let w = bf16_values((5, 7), 2);
        for side in [Weight::Transposed, Weight::Plain] {
            let err = bf16_tiled(&x, &w, side, TILE_ELEMENTS).unwrap_err();
            assert!(err.to_string().contains("[4, 8]"), "{err}");
        }
    }
}
