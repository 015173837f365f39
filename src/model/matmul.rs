//! Products of activations with frozen weights in the activations' storage dtype
//! (docs/ARCHITECTURE.md, "Activation storage"). f32 activations multiply as candle's f32 matmul.
//! bf16 activations stay bf16 in memory and accumulate in f32: on a CUDA device through candle's
//! bf16 matmul (cuBLAS, f32 compute); on the CPU, whose candle matmul widens whole operands to
//! f32, with the CPU's AVX-512 BF16 dot products for `x · Wᵀ` where it has them ([`avx512`]:
//! both operands read in place) and otherwise through [`bf16_tiled`], which widens one block of
//! each operand at a time; either way a bf16 run holds no f32 copy of an activation or a weight.

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
        DType::BF16
            if x.device().is_cpu()
                && w.dtype() == DType::BF16
                && side == Weight::Transposed
                && avx512::available() =>
        {
            avx512::matmul_transposed(x, w)
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
    let (m, k, n) = dims(x, w, side)?;
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

/// The operands' shapes `(m, k, n)` for `side`, checked to agree.
fn dims(x: &Tensor, w: &Tensor, side: Weight) -> Result<(usize, usize, usize)> {
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
    Ok((m, k, n))
}

fn join(mut pieces: Vec<Tensor>, dim: usize) -> Result<Tensor> {
    if pieces.len() == 1 {
        return Ok(pieces.swap_remove(0));
    }
    Ok(Tensor::cat(&pieces, dim)?)
}

/// bf16 products on the CPU's AVX-512 BF16 units (`vdpbf16ps`): pairs of exact bf16 × bf16
/// products added into f32 lanes, the lanes summed, each output rounded to bf16 once. The
/// instruction flushes subnormal inputs and results to zero and sums in its own order, so its
/// results agree with [`bf16_tiled`] to `tolerance::Op::MatmulBf16`, not bit for bit.
pub(crate) mod avx512 {
    use candle_core::{DType, Tensor};
    use half::bf16;

    use super::{dims, Weight};
    use crate::{Error, Result};

    /// Whether this CPU has the instructions (checked once per call; the check is cached by std).
    pub(crate) fn available() -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("avx512bf16")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    }

    /// A contiguous CPU bf16 tensor's elements, read in place.
    fn with_elements<R>(t: &Tensor, f: impl FnOnce(&[bf16]) -> R) -> Result<R> {
        let t = if t.is_contiguous() {
            t.clone()
        } else {
            t.copy()?
        };
        let (storage, layout) = t.storage_and_layout();
        let candle_core::Storage::Cpu(cpu) = &*storage else {
            return Err(Error::invalid(
                "matmul",
                "AVX-512 products read CPU tensors",
            ));
        };
        let (start, end) = layout
            .contiguous_offsets()
            .ok_or_else(|| Error::invalid("matmul", "a copied tensor is not contiguous"))?;
        Ok(f(&cpu.as_slice::<bf16>()?[start..end]))
    }

    /// `x · Wᵀ` for bf16 `x` `[m, k]` and `w` `[n, k]` on a CPU with [`available`]
    /// instructions: both read in place, output rows split across candle's thread pool. (`x · W`
    /// would need W transposed first, which costs more than [`super::bf16_tiled`] saves: it stays
    /// there.)
    pub(crate) fn matmul_transposed(x: &Tensor, w: &Tensor) -> Result<Tensor> {
        let (m, k, n) = dims(x, w, Weight::Transposed)?;
        if x.dtype() != DType::BF16 || w.dtype() != DType::BF16 || !available() {
            return Err(Error::invalid(
                "matmul",
                "the AVX-512 BF16 product needs bf16 operands and a CPU with avx512_bf16",
            ));
        }
        let mut out = vec![bf16::ZERO; m * n];
        let product = |xs: &[bf16]| -> Result<()> {
            with_elements(w, |ws| {
                // SAFETY: `available()` confirmed avx512f, avx512bw and avx512bf16 above; the
                // slices hold m·k and n·k elements (contiguous tensors of those shapes) and `out`
                // m·n, which is what `dot_rows` reads and writes.
                unsafe { x86::dot_rows(xs, ws, m, n, k, &mut out) }
            })?
        };
        with_elements(x, product)??;
        Ok(Tensor::from_vec(out, (m, n), x.device())?)
    }

    #[cfg(target_arch = "x86_64")]
    mod x86 {
        use std::arch::x86_64::*;

        use half::bf16;

        use crate::Result;

        /// Rows of x and of w each microkernel call takes (4 × 4 accumulators in registers).
        const R: usize = 4;
        /// bf16 elements per 512-bit load.
        const L: usize = 32;
        /// bf16 elements of x rows, and of w rows, one block takes (256 KiB each, so both stay in
        /// L2 while every pair is multiplied).
        const BLOCK_ELEMENTS: usize = 1 << 17;

        /// `out[i·n + j] = bf16(Σ_c x[i·k + c] · w[j·k + c])`: blocks of x's rows in parallel,
        /// each against w one cache-sized block of rows at a time.
        ///
        /// # Safety
        /// The CPU has avx512f, avx512bw and avx512bf16; `x.len() == m·k`, `w.len() == n·k`,
        /// `out.len() == m·n`.
        pub(super) unsafe fn dot_rows(
            x: &[bf16],
            w: &[bf16],
            m: usize,
            n: usize,
            k: usize,
            out: &mut [bf16],
        ) -> Result<()> {
            use rayon::prelude::*;
            debug_assert!(x.len() == m * k && w.len() == n * k && out.len() == m * n);
            if n == 0 || k == 0 {
                return Ok(());
            }
            let block = (BLOCK_ELEMENTS / k).max(1).next_multiple_of(R);
            out.par_chunks_mut(block * n)
                .zip(x.par_chunks(block * k))
                .for_each(|(o, xr)| {
                    // SAFETY: the features were checked by the caller; `xr` holds `o.len() / n`
                    // whole rows of x.
                    unsafe { row_block(xr, w, n, k, block, o) }
                });
            Ok(())
        }

        /// The rows of x in `x` against every row of w, `block` rows of w at a time.
        #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
        unsafe fn row_block(
            x: &[bf16],
            w: &[bf16],
            n: usize,
            k: usize,
            block: usize,
            out: &mut [bf16],
        ) {
            let rows = out.len() / n;
            for j0 in (0..n).step_by(block) {
                let j1 = (j0 + block).min(n);
                for i in (0..rows).step_by(R) {
                    let ri = R.min(rows - i);
                    let mut j = j0;
                    while j < j1 {
                        let cols = R.min(j1 - j);
                        let mut sums = [[0f32; R]; R];
                        // SAFETY: ri ≤ 4 rows of x from row i and cols ≤ 4 rows of w from row j,
                        // each k long, lie inside the slices.
                        unsafe {
                            dot_block(
                                x.as_ptr().add(i * k),
                                w.as_ptr().add(j * k),
                                ri,
                                cols,
                                k,
                                &mut sums,
                            )
                        };
                        for (a, row) in sums.iter().enumerate().take(ri) {
                            for (b, &v) in row.iter().enumerate().take(cols) {
                                out[(i + a) * n + j + b] = bf16::from_f32(v);
                            }
                        }
                        j += cols;
                    }
                }
            }
        }

        /// 32 bf16 at `p`, or the first `tail` of them (the rest zero).
        #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
        unsafe fn load(p: *const bf16, tail: Option<__mmask32>) -> __m512bh {
            // SAFETY: the caller passes a pointer with 32 readable elements, or `tail` masking
            // the load to the readable ones.
            let v = unsafe {
                match tail {
                    None => _mm512_loadu_si512(p.cast()),
                    Some(mask) => _mm512_maskz_loadu_epi16(mask, p.cast()),
                }
            };
            // SAFETY: both are 512 bits of plain data.
            unsafe { std::mem::transmute::<__m512i, __m512bh>(v) }
        }

        /// `sums[a][b] = Σ_c x[a·k + c] · w[b·k + c]` for a < rows ≤ 4, b < cols ≤ 4.
        #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
        unsafe fn dot_block(
            x: *const bf16,
            w: *const bf16,
            rows: usize,
            cols: usize,
            k: usize,
            sums: &mut [[f32; R]; R],
        ) {
            let mut acc = [[_mm512_setzero_ps(); R]; R];
            let full = k / L * L;
            let tail = (k > full).then(|| ((1u64 << (k - full)) - 1) as __mmask32);
            let mut c = 0;
            while c < k {
                let mask = if c < full { None } else { tail };
                let mut xs = [load_zero(); R];
                let mut ws = [load_zero(); R];
                for (a, v) in xs.iter_mut().enumerate().take(rows) {
                    // SAFETY: row a of x has k elements from a·k; c + 32 ≤ k or the mask stops
                    // at k.
                    *v = unsafe { load(x.add(a * k + c), mask) };
                }
                for (b, v) in ws.iter_mut().enumerate().take(cols) {
                    // SAFETY: as for x.
                    *v = unsafe { load(w.add(b * k + c), mask) };
                }
                for a in 0..R {
                    for b in 0..R {
                        acc[a][b] = _mm512_dpbf16_ps(acc[a][b], xs[a], ws[b]);
                    }
                }
                c += L;
            }
            for a in 0..rows {
                for b in 0..cols {
                    sums[a][b] = _mm512_reduce_add_ps(acc[a][b]);
                }
            }
        }

        #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
        fn load_zero() -> __m512bh {
            // SAFETY: all-zero bits are bf16 zeros.
            unsafe { std::mem::transmute::<__m512i, __m512bh>(_mm512_setzero_si512()) }
        }
    }

    #[cfg(not(target_arch = "x86_64"))]
    mod x86 {
        use half::bf16;

        use crate::{Error, Result};

        /// Never called: [`super::available`] is false off x86-64.
        pub(super) unsafe fn dot_rows(
            _x: &[bf16],
            _w: &[bf16],
            _m: usize,
            _n: usize,
            _k: usize,
            _out: &mut [bf16],
        ) -> Result<()> {
            Err(Error::invalid(
                "matmul",
                "AVX-512 BF16 exists only on x86-64",
            ))
        }
    }
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
        }
    }

    #[test]
    fn avx512_bf16_products_agree_with_the_widened_product() {
        // x · Wᵀ runs on the AVX-512 BF16 units here, x · W through the widened tiles.
        if !avx512::available() {
            eprintln!("skipped: this CPU has no AVX-512 BF16");
            return;
        }
        let tol = crate::tolerance::lookup(
            crate::tolerance::Op::MatmulBf16,
            crate::tolerance::Dtype::BF16,
        );
        // Odd sizes: partial 4 × 4 blocks and a k tail shorter than one 32-element load.
        for (m, k, n) in [(37, 70, 29), (4, 32, 4), (1, 5, 3), (9, 300, 17)] {
            let x = bf16_values((m, k), 3);
            for side in [Weight::Transposed, Weight::Plain] {
                let w = match side {
                    Weight::Transposed => bf16_values((n, k), 4),
                    Weight::Plain => bf16_values((k, n), 4),
                };
                let want = bf16_tiled(&x, &w, side, TILE_ELEMENTS).unwrap();
                let mut results = vec![matmul(&x, &w, side).unwrap()];
                if side == Weight::Transposed {
                    results.push(avx512::matmul_transposed(&x, &w).unwrap());
                }
                for got in results {
                    assert_eq!(got.dims(), [m, n]);
                    let f = crate::testing::values;
                    if let Err(e) = tol.check(&f(&got), &f(&want)) {
                        panic!("{side:?} [{m}, {k}] x [{k}, {n}]: {e}");
                    }
                }
            }
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
