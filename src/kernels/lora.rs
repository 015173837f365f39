//! Launchers and plain-Rust references for `kernels/lora.cu`: the fused LoRA forward and backward
//! of `y = base(x) + s·(x·Aᵀ)·Bᵀ` with X `[M, K]`, A `[r, K]`, B `[N, r]`, Y `[M, N]` (f32 or bf16,
//! the adapter weights may differ from the activations) for rank r ≤ 64, accumulating in f32.
//!
//! The forward writes T = X·Aᵀ `[M, r]` f32, which the caller keeps for the backward (r/K of X's
//! size), and adds s·T·Bᵀ into the base GEMM's output in place. The backward recomputes
//! U = dY·B `[M, r]` f32 (a scratch buffer, not saved by the forward) and writes dB = s·dYᵀ·T,
//! dA = s·Uᵀ·X (f32, overwritten, deterministic) and adds s·U·A into dX in place. Dropout, when
//! used, is applied by the caller: X is the dropped-out input in both passes.

use super::abi::{
    QlDtype, QlLoraExpandParams, QlLoraGradWParams, QlLoraProjectParams, QlRmsNormDwReduceParams,
};
use super::device::{KernelArg, KernelArgMut, LaunchDevice};
use super::launch::{declare_kernels, Element, Kernel, LaunchConfig};
use super::llama::RMSNORM_DW_REDUCE;
use crate::{Error, Result};
use std::ffi::c_void;

declare_kernels! {
    module "lora";
    /// `k_lora_xa`: T = X·Aᵀ for rank ≤ 16, a block per 8 rows of X, A staged in shared memory
    /// per 32 columns.
    LORA_XA = k_lora_xa / qlemu_k_lora_xa {
        block: super::launch::BlockShape::Exact(128, 1, 1)
    };
    /// `k_lora_xa_wide`: `k_lora_xa` for rank ≤ 64 (four times the accumulators).
    LORA_XA_WIDE = k_lora_xa_wide / qlemu_k_lora_xa_wide {
        block: super::launch::BlockShape::Exact(128, 1, 1)
    };
    /// `k_lora_add`: Y += s·T·Bᵀ in place, a block per 16 × 64 tile of Y.
    LORA_ADD = k_lora_add / qlemu_k_lora_add {
        block: super::launch::BlockShape::Exact(128, 1, 1)
    };
    /// `k_lora_dyb`: U = dY·B for rank ≤ 16, a block per 8 rows of dY.
    LORA_DYB = k_lora_dyb / qlemu_k_lora_dyb {
        block: super::launch::BlockShape::Exact(128, 1, 1)
    };
    /// `k_lora_dyb_wide`: `k_lora_dyb` for rank ≤ 64.
    LORA_DYB_WIDE = k_lora_dyb_wide / qlemu_k_lora_dyb_wide {
        block: super::launch::BlockShape::Exact(128, 1, 1)
    };
    /// `k_lora_db`: dB = s·dYᵀ·T, a block per 64 columns of dY looping over all rows.
    LORA_DB = k_lora_db / qlemu_k_lora_db {
        block: super::launch::BlockShape::Exact(128, 1, 1)
    };
    /// `k_lora_da`: dA = s·Uᵀ·X, a block per 64 columns of X looping over all rows.
    LORA_DA = k_lora_da / qlemu_k_lora_da {
        block: super::launch::BlockShape::Exact(128, 1, 1)
    };
    /// `k_lora_dx`: dX += s·U·A in place, a block per 16 × 64 tile of dX.
    LORA_DX = k_lora_dx / qlemu_k_lora_dx {
        block: super::launch::BlockShape::Exact(128, 1, 1)
    };
}

/// Largest rank the kernels take (their shared-memory tiles and accumulators are sized by it).
pub const MAX_LORA_RANK: usize = 64;
/// Largest rank of the narrow projection kernels (`k_lora_xa`, `k_lora_dyb`).
pub const NARROW_RANK: usize = 16;
/// Threads per block of every LoRA kernel (their `__launch_bounds__`).
const THREADS: u32 = 128;
/// Rows of X (or dY) per block of the projections.
const PROJECT_ROWS: usize = 8;
/// Output tile of the in-place expansions.
const EXPAND_ROWS: usize = 16;
const EXPAND_COLS: usize = 64;
/// Output columns per block of the weight gradients.
const GRAD_COLS: usize = 64;
/// Blocks the weight gradients aim for: two waves of a 132-SM H100. Fixed rather than read from
/// the device, so the slicing (and the order of the sums) is the same everywhere.
const GRAD_TARGET_BLOCKS: usize = 264;
/// Fewest rows per slice of the weight gradients (four chunks of 16).
const GRAD_MIN_SLICE_ROWS: usize = 64;
/// Most row slices of the weight gradients.
const GRAD_MAX_SLICES: usize = 64;
/// Threads per block of the partials' reduction (`k_rmsnorm_dw_reduce`'s launch bounds).
const REDUCE_THREADS: usize = 256;
/// Grid-y limit of every CUDA device we target (rows of the expansions' tiles).
const MAX_GRID_Y: usize = 65535;

/// Validated sizes of one adapted linear: `tokens` rows M, `in_features` K, `out_features` N.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoraDims {
    pub tokens: usize,
    pub in_features: usize,
    pub out_features: usize,
    pub rank: usize,
}

impl LoraDims {
    /// Checks every size against `1..` and the limits of the kernels' grids and index types.
    pub fn new(
        op: &'static str,
        tokens: usize,
        in_features: usize,
        out_features: usize,
        rank: usize,
    ) -> Result<Self> {
        let bad = |reason: String| Err(Error::invalid(op, reason));
        if rank == 0 || rank > MAX_LORA_RANK {
            return bad(format!("rank {rank} outside 1..={MAX_LORA_RANK}"));
        }
        for (what, v) in [("in_features", in_features), ("out_features", out_features)] {
            if v == 0 || v > i32::MAX as usize {
                return bad(format!("{what} {v} outside 1..={}", i32::MAX));
            }
        }
        let max_tokens = MAX_GRID_Y * EXPAND_ROWS;
        if tokens == 0 || tokens > max_tokens {
            return bad(format!("{tokens} tokens outside 1..={max_tokens}"));
        }
        // Flat indices are i64 in the kernels; 2^62 elements also bounds every byte count.
        if tokens
            .checked_mul(in_features.max(out_features))
            .is_none_or(|n| n as u64 > 1 << 62)
        {
            return bad(format!(
                "{tokens} × {} elements overflow",
                in_features.max(out_features)
            ));
        }
        Ok(LoraDims {
            tokens,
            in_features,
            out_features,
            rank,
        })
    }

    fn check_len(&self, op: &'static str, what: &str, got: usize, want: usize) -> Result<()> {
        if got == want {
            Ok(())
        } else {
            Err(Error::invalid(
                op,
                format!("{what} has {got} elements, expected {want} for {self:?}"),
            ))
        }
    }
}

/// One LoRA adapter applied to a linear: the weights A `[rank, in]`, B `[out, rank]` (host slices
/// or device buffers), the scaling s (alpha / r, or alpha / √r with rsLoRA) and the sizes.
#[derive(Debug)]
pub struct LoraOperands<'a, S: ?Sized> {
    pub dims: LoraDims,
    pub a: &'a S,
    pub b: &'a S,
    pub scale: f32,
}

impl<S: ?Sized> Clone for LoraOperands<'_, S> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<S: ?Sized> Copy for LoraOperands<'_, S> {}

/// Weight gradients of one adapter, f32: dA `[rank, in]` and dB `[out, rank]`.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraGrads {
    pub da: Vec<f32>,
    pub db: Vec<f32>,
}

fn check_dtype<T: Element>(op: &'static str, what: &str) -> Result<()> {
    match T::DTYPE {
        QlDtype::QL_DTYPE_F32 | QlDtype::QL_DTYPE_BF16 => Ok(()),
        other => Err(Error::invalid(
            op,
            format!("{what} must be f32 or bf16, not {other:?}"),
        )),
    }
}

fn check_scale(op: &'static str, scale: f32) -> Result<()> {
    if scale.is_finite() {
        Ok(())
    } else {
        Err(Error::invalid(op, format!("scale {scale} must be finite")))
    }
}

/// Checks the adapter (lengths of A and B, dtypes, scale) and the lengths of X `[M, K]` and of the
/// `[M, N]` output or gradient `y`.
fn check_operands<T: Element, W: Element>(
    op: &'static str,
    adapter: &AdapterLens,
    x_len: usize,
    y_len: usize,
) -> Result<()> {
    check_lens(op, &adapter.dims, adapter.a, adapter.b, x_len, y_len)?;
    check_dtype::<T>(op, "activations")?;
    check_dtype::<W>(op, "adapter weights")?;
    check_scale(op, adapter.scale)
}

/// An adapter's sizes, the lengths of its A and B, and its scale, for the checks.
struct AdapterLens {
    dims: LoraDims,
    a: usize,
    b: usize,
    scale: f32,
}

impl<S: ?Sized> LoraOperands<'_, S> {
    fn lens_with(&self, len: impl Fn(&S) -> usize) -> AdapterLens {
        AdapterLens {
            dims: self.dims,
            a: len(self.a),
            b: len(self.b),
            scale: self.scale,
        }
    }
}

fn check_lens(
    op: &'static str,
    d: &LoraDims,
    a_len: usize,
    b_len: usize,
    x_len: usize,
    y_len: usize,
) -> Result<()> {
    d.check_len(op, "A", a_len, d.rank * d.in_features)?;
    d.check_len(op, "B", b_len, d.out_features * d.rank)?;
    d.check_len(op, "X", x_len, d.tokens * d.in_features)?;
    d.check_len(op, "Y", y_len, d.tokens * d.out_features)
}

// ---------------------------------------------------------------------------------------------
// Launch geometry (every backend).

/// The projection kernels for `dims.rank`: `(X·Aᵀ, dY·B)`, the narrow pair up to rank 16 (fewer
/// registers, higher occupancy), the `_wide` pair above.
pub fn lora_project_kernels(dims: &LoraDims) -> (Kernel, Kernel) {
    if dims.rank <= NARROW_RANK {
        (LORA_XA, LORA_DYB)
    } else {
        (LORA_XA_WIDE, LORA_DYB_WIDE)
    }
}

/// `k_lora_xa` / `k_lora_dyb` (and `_wide`): a block of 128 threads per 8 rows.
pub fn lora_project_launch(dims: &LoraDims) -> LaunchConfig {
    LaunchConfig::linear(dims.tokens.div_ceil(PROJECT_ROWS) as u32, THREADS)
}

/// `k_lora_add` / `k_lora_dx` over `[tokens, cols]`: a block of 128 threads per 16 × 64 tile.
pub fn lora_expand_launch(dims: &LoraDims, cols: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (
            cols.div_ceil(EXPAND_COLS) as u32,
            dims.tokens.div_ceil(EXPAND_ROWS) as u32,
            1,
        ),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Row slices of `k_lora_db` / `k_lora_da` over `cols` output columns and `rows` rows: enough
/// for [`GRAD_TARGET_BLOCKS`] blocks with the column tiles, each slice at least
/// [`GRAD_MIN_SLICE_ROWS`] rows, at most [`GRAD_MAX_SLICES`]; 1 when the partials of `rank`
/// would not be addressable by the reduction's i32 column index. A pure function of the shape,
/// so the sums run in the same order on every device.
pub fn lora_grad_slices(cols: usize, rows: usize, rank: usize) -> usize {
    if rank.saturating_mul(cols) > i32::MAX as usize {
        return 1;
    }
    let want = GRAD_TARGET_BLOCKS.div_ceil(cols.div_ceil(GRAD_COLS).max(1));
    let most = rows.div_ceil(GRAD_MIN_SLICE_ROWS);
    want.min(most).clamp(1, GRAD_MAX_SLICES)
}

/// `k_lora_db` / `k_lora_da` over `cols` output columns and `rows` rows: a block of 128 threads
/// per 64 columns and row slice ([`lora_grad_slices`]).
pub fn lora_grad_launch(cols: usize, rows: usize, rank: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (
            cols.div_ceil(GRAD_COLS) as u32,
            lora_grad_slices(cols, rows, rank) as u32,
            1,
        ),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Launch of `k_rmsnorm_dw_reduce` adding `n` partial gradient values per slice.
fn grad_reduce_launch(n: usize) -> LaunchConfig {
    LaunchConfig::linear(n.div_ceil(REDUCE_THREADS) as u32, REDUCE_THREADS as u32)
}

// ---------------------------------------------------------------------------------------------
// References (plain Rust, f32, sequential sums).

/// `out[m, j] = Σ_c x[m, c] · w(j, c)` over rows of `x` `[rows, cols]`.
fn project_ref(x: &[f32], cols: usize, rank: usize, w: impl Fn(usize, usize) -> f32) -> Vec<f32> {
    x.chunks_exact(cols)
        .flat_map(|row| {
            let w = &w;
            (0..rank).map(move |j| row.iter().enumerate().map(|(c, &v)| v * w(j, c)).sum())
        })
        .collect()
}

fn widen<T: Element>(v: &[T]) -> Vec<f32> {
    v.iter().map(|x| x.to_f32()).collect()
}

/// Forward reference: returns `(y, t)` with `t = X·Aᵀ` `[M, r]` and
/// `y = y_base + s · Σ_j t[m, j] · B[n, j]` `[M, N]` in f32, before its rounding to `T`.
pub fn lora_forward_ref<T: Element, W: Element>(
    lora: &LoraOperands<[W]>,
    x: &[T],
    y_base: &[T],
) -> Result<(Vec<f32>, Vec<f32>)> {
    const OP: &str = "lora_forward_ref";
    check_operands::<T, W>(OP, &lora.lens_with(<[W]>::len), x.len(), y_base.len())?;
    let LoraDims {
        in_features: k,
        out_features: n,
        rank: r,
        ..
    } = lora.dims;
    let (a, b) = (widen(lora.a), widen(lora.b));
    let t = project_ref(&widen(x), k, r, |j, c| a[j * k + c]);
    let lora_out = project_ref(&t, r, n, |c, j| b[c * r + j]);
    let y = y_base
        .iter()
        .zip(&lora_out)
        .map(|(base, &d)| base.to_f32() + lora.scale * d)
        .collect();
    Ok((y, t))
}

/// Backward reference from `dy` `[M, N]` and the forward's `t` `[M, r]`: returns the weight
/// gradients and `dx = dx_base + s · U·A` `[M, K]` in f32 (before its rounding to `T`), with
/// `U = dY·B`, `dB = s·dYᵀ·T`, `dA = s·Uᵀ·X`.
pub fn lora_backward_ref<T: Element, W: Element>(
    lora: &LoraOperands<[W]>,
    x: &[T],
    t: &[f32],
    dy: &[T],
    dx_base: &[T],
) -> Result<(LoraGrads, Vec<f32>)> {
    const OP: &str = "lora_backward_ref";
    check_operands::<T, W>(OP, &lora.lens_with(<[W]>::len), x.len(), dy.len())?;
    let d = lora.dims;
    let (m, k, n, r) = (d.tokens, d.in_features, d.out_features, d.rank);
    d.check_len(OP, "T", t.len(), m * r)?;
    d.check_len(OP, "dX", dx_base.len(), m * k)?;
    let (a, b, x, dy) = (widen(lora.a), widen(lora.b), widen(x), widen(dy));
    let u = project_ref(&dy, n, r, |j, c| b[c * r + j]);
    let s = lora.scale;
    // Weight gradients: sums over the rows in order m = 0, 1, ..., as the kernels add them.
    let mut db = vec![0f32; n * r];
    for (c, row) in db.chunks_exact_mut(r).enumerate() {
        for (j, out) in row.iter_mut().enumerate() {
            *out = s * (0..m).map(|i| dy[i * n + c] * t[i * r + j]).sum::<f32>();
        }
    }
    let mut da = vec![0f32; r * k];
    for (j, row) in da.chunks_exact_mut(k).enumerate() {
        for (c, out) in row.iter_mut().enumerate() {
            *out = s * (0..m).map(|i| x[i * k + c] * u[i * r + j]).sum::<f32>();
        }
    }
    let lora_dx = project_ref(&u, r, k, |c, j| a[j * k + c]);
    let dx = dx_base
        .iter()
        .zip(&lora_dx)
        .map(|(base, &v)| base.to_f32() + s * v)
        .collect();
    Ok((LoraGrads { da, db }, dx))
}

// Launchers: one per pass, generic over the launch device (docs/ARCHITECTURE.md, "Launch
// devices"). `*_into` writes caller-owned buffers; the plain form allocates its outputs.

/// Forward (`k_lora_xa` then `k_lora_add`): `y` (the base GEMM's output `[tokens, out]`) becomes
/// `y + s·(X·Aᵀ)·Bᵀ` in place and `t` `[tokens, rank]` receives T = X·Aᵀ (f32) for the backward.
pub fn lora_forward_into<D, T, W, S>(
    dev: &D,
    lora: &LoraOperands<'_, S>,
    x: &(impl KernelArg<D, T> + ?Sized),
    y: &mut (impl KernelArgMut<D, T> + ?Sized),
    t: &mut (impl KernelArgMut<D, f32> + ?Sized),
) -> Result<()>
where
    D: LaunchDevice,
    T: Element,
    W: Element,
    S: KernelArg<D, W> + ?Sized,
{
    const OP: &str = "lora_forward";
    check_operands::<T, W>(
        OP,
        &lora.lens_with(<S as KernelArg<D, W>>::len),
        x.len(),
        y.len(),
    )?;
    let d = lora.dims;
    d.check_len(OP, "T", t.len(), d.tokens * d.rank)?;
    let (xp, ap, bp) = (x.ptr(dev), lora.a.ptr(dev), lora.b.ptr(dev));
    let (yp, tp) = (y.ptr_mut(dev), t.ptr_mut(dev));
    let xa = QlLoraProjectParams {
        x: xp.void(),
        w: ap.void(),
        out: tp.get_mut(),
        rows: d.tokens as i64,
        cols: d.in_features as i32,
        rank: d.rank as i32,
        x_dtype: T::DTYPE as i32,
        w_dtype: W::DTYPE as i32,
    };
    let add = QlLoraExpandParams {
        t: tp.get(),
        w: bp.void(),
        y: yp.void_mut(),
        rows: d.tokens as i64,
        cols: d.out_features as i32,
        rank: d.rank as i32,
        scale: lora.scale,
        w_dtype: W::DTYPE as i32,
        y_dtype: T::DTYPE as i32,
    };
    // SAFETY: x holds tokens × in, A rank × in, B out × rank, y tokens × out and t tokens × rank
    // elements (validated above); the two launches run in order on the device (T is written
    // before it is read), and the guards keep every buffer alive and ordered until both are
    // queued.
    unsafe {
        dev.launch(&lora_project_kernels(&d).0, &lora_project_launch(&d), &xa)?;
        dev.launch(&LORA_ADD, &lora_expand_launch(&d, d.out_features), &add)
    }
}

/// Forward (`k_lora_xa` then `k_lora_add`): `y` becomes `y + s·(X·Aᵀ)·Bᵀ` in place; returns
/// T = X·Aᵀ `[tokens, rank]` f32 for the backward.
pub fn lora_forward<D, T, W, S>(
    dev: &D,
    lora: &LoraOperands<'_, S>,
    x: &(impl KernelArg<D, T> + ?Sized),
    y: &mut (impl KernelArgMut<D, T> + ?Sized),
) -> Result<D::Buffer<f32>>
where
    D: LaunchDevice,
    T: Element,
    W: Element,
    S: KernelArg<D, W> + ?Sized,
{
    // SAFETY: `k_lora_xa` writes every element of T (one per row and rank).
    let mut t = unsafe { dev.alloc::<f32>(lora.dims.tokens * lora.dims.rank)? };
    lora_forward_into::<D, T, W, S>(dev, lora, x, y, &mut t)?;
    Ok(t)
}

/// The backward's outputs and scratch on a device, all f32: dA `[rank, in]`, dB `[out, rank]`
/// (overwritten), the scratch U = dY·B `[tokens, rank]` and the row slices' partial sums of dA
/// and dB ([`lora_grad_slices`]; one unused element where a gradient takes one slice).
pub struct LoraGradBuffers<D: LaunchDevice> {
    pub da: D::Buffer<f32>,
    pub db: D::Buffer<f32>,
    pub u: D::Buffer<f32>,
    da_partial: D::Buffer<f32>,
    db_partial: D::Buffer<f32>,
}

impl<D: LaunchDevice> std::fmt::Debug for LoraGradBuffers<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoraGradBuffers")
            .field("da", &self.da.len())
            .field("db", &self.db.len())
            .field("u", &self.u.len())
            .finish()
    }
}

/// f32 elements of the buffers a backward of `dims` allocates ([`LoraGradBuffers::new`]):
/// `(dA + dB, U + the row-slice partials)`; the caller keeps the gradients, the rest goes with
/// the buffers. The memory plan counts them from here.
pub fn lora_backward_floats(dims: &LoraDims) -> (usize, usize) {
    let (da_slices, db_slices) = grad_slices(dims);
    let (da_len, db_len) = (dims.rank * dims.in_features, dims.out_features * dims.rank);
    let scratch =
        dims.tokens * dims.rank + partial_len(da_slices, da_len) + partial_len(db_slices, db_len);
    (da_len + db_len, scratch)
}

impl<D: LaunchDevice> LoraGradBuffers<D> {
    /// Buffers for the backward of `dims`, left for its kernels to fill.
    pub fn new(dev: &D, dims: &LoraDims) -> Result<Self> {
        let (da_slices, db_slices) = grad_slices(dims);
        let (da_len, db_len) = (dims.rank * dims.in_features, dims.out_features * dims.rank);
        // SAFETY: the backward writes every element of dA, dB and U, and every partial before
        // the reduction reads it; nothing reads these buffers before a backward has filled them.
        unsafe {
            Ok(LoraGradBuffers {
                da: dev.alloc(da_len)?,
                db: dev.alloc(db_len)?,
                u: dev.alloc(dims.tokens * dims.rank)?,
                da_partial: dev.alloc(partial_len(da_slices, da_len))?,
                db_partial: dev.alloc(partial_len(db_slices, db_len))?,
            })
        }
    }
}

/// Backward (`k_lora_dyb`, `k_lora_db`, `k_lora_da`, `k_lora_dx`, and `k_rmsnorm_dw_reduce` over
/// the row slices' partials) from `dy` `[tokens, out]` and the forward's `t` `[tokens, rank]`:
/// `dx` `[tokens, in]` becomes `dx + s·U·A` in place and `grads` receive dA and dB.
#[allow(clippy::too_many_arguments)]
pub fn lora_backward_into<D, T, W, S>(
    dev: &D,
    lora: &LoraOperands<'_, S>,
    x: &(impl KernelArg<D, T> + ?Sized),
    t: &(impl KernelArg<D, f32> + ?Sized),
    dy: &(impl KernelArg<D, T> + ?Sized),
    dx: &mut (impl KernelArgMut<D, T> + ?Sized),
    grads: &mut LoraGradBuffers<D>,
) -> Result<()>
where
    D: LaunchDevice,
    T: Element,
    W: Element,
    S: KernelArg<D, W> + ?Sized,
{
    const OP: &str = "lora_backward";
    check_operands::<T, W>(
        OP,
        &lora.lens_with(<S as KernelArg<D, W>>::len),
        x.len(),
        dy.len(),
    )?;
    let d = lora.dims;
    d.check_len(OP, "T", t.len(), d.tokens * d.rank)?;
    d.check_len(OP, "dX", dx.len(), d.tokens * d.in_features)?;
    d.check_len(OP, "U", grads.u.len(), d.tokens * d.rank)?;
    let (da_len, db_len) = (d.rank * d.in_features, d.out_features * d.rank);
    d.check_len(OP, "dA", grads.da.len(), da_len)?;
    d.check_len(OP, "dB", grads.db.len(), db_len)?;
    let (da_slices, db_slices) = grad_slices(&d);
    let (da_partial_len, db_partial_len) = (
        partial_len(da_slices, da_len),
        partial_len(db_slices, db_len),
    );
    d.check_len(OP, "dA partials", grads.da_partial.len(), da_partial_len)?;
    d.check_len(OP, "dB partials", grads.db_partial.len(), db_partial_len)?;
    let (xp, ap, bp) = (x.ptr(dev), lora.a.ptr(dev), lora.b.ptr(dev));
    let (tp, dyp, dxp) = (t.ptr(dev), dy.ptr(dev), dx.ptr_mut(dev));
    let (up, dap, dbp) = (
        grads.u.ptr_mut(dev),
        grads.da.ptr_mut(dev),
        grads.db.ptr_mut(dev),
    );
    let (dapp, dbpp) = (grads.da_partial.ptr_mut(dev), grads.db_partial.ptr_mut(dev));
    let launches = BackwardLaunches::new::<T, W>(
        &d,
        lora.scale,
        BackwardPtrs {
            x: xp.void(),
            a: ap.void(),
            b: bp.void(),
            t: tp.get(),
            dy: dyp.void(),
            dx: dxp.void_mut(),
            u: up.get_mut(),
            da: dap.get_mut(),
            db: dbp.get_mut(),
            da_partial: dapp.get_mut(),
            db_partial: dbpp.get_mut(),
        },
    );
    // SAFETY: every buffer has the length its params claim (validated above: x, dx tokens × in;
    // dy tokens × out; A rank × in; B, dB out × rank; t, U tokens × rank; dA rank × in; the
    // partials slices × their gradient where it takes several slices); the launches run in order
    // on the device (U is written before it is read, the partials before they are added), and
    // the guards keep every buffer alive and ordered until all are queued.
    unsafe {
        dev.launch(
            &lora_project_kernels(&d).1,
            &lora_project_launch(&d),
            &launches.dyb,
        )?;
        for (kernel, grad) in [(&LORA_DB, &launches.db), (&LORA_DA, &launches.da)] {
            dev.launch(kernel, &grad.cfg, &grad.params)?;
            if let Some(reduce) = &grad.reduce {
                let cfg = grad_reduce_launch(reduce.h as usize);
                dev.launch(&RMSNORM_DW_REDUCE, &cfg, reduce)?;
            }
        }
        dev.launch(
            &LORA_DX,
            &lora_expand_launch(&d, d.in_features),
            &launches.dx,
        )
    }
}

/// Backward from `dy` `[tokens, out]` and the forward's `t`: `dx` becomes `dx + s·U·A` in place;
/// returns the buffers holding dA and dB.
pub fn lora_backward<D, T, W, S>(
    dev: &D,
    lora: &LoraOperands<'_, S>,
    x: &(impl KernelArg<D, T> + ?Sized),
    t: &(impl KernelArg<D, f32> + ?Sized),
    dy: &(impl KernelArg<D, T> + ?Sized),
    dx: &mut (impl KernelArgMut<D, T> + ?Sized),
) -> Result<LoraGradBuffers<D>>
where
    D: LaunchDevice,
    T: Element,
    W: Element,
    S: KernelArg<D, W> + ?Sized,
{
    let mut grads = LoraGradBuffers::new(dev, &lora.dims)?;
    lora_backward_into::<D, T, W, S>(dev, lora, x, t, dy, dx, &mut grads)?;
    Ok(grads)
}

/// Row slices of dA (over `in` columns) and dB (over `out`).
fn grad_slices(d: &LoraDims) -> (usize, usize) {
    (
        lora_grad_slices(d.in_features, d.tokens, d.rank),
        lora_grad_slices(d.out_features, d.tokens, d.rank),
    )
}

/// Floats of a gradient's partials: `slices` copies of its `len`, or one unused element with
/// one slice (a device allocation is never empty).
fn partial_len(slices: usize, len: usize) -> usize {
    if slices > 1 {
        slices * len
    } else {
        1
    }
}

/// Raw pointers of the backward's buffers; the partials are used (and must hold slices × the
/// gradient's length) only when their gradient has more than one row slice.
struct BackwardPtrs {
    x: *const c_void,
    a: *const c_void,
    b: *const c_void,
    t: *const f32,
    dy: *const c_void,
    dx: *mut c_void,
    u: *mut f32,
    da: *mut f32,
    db: *mut f32,
    da_partial: *mut f32,
    db_partial: *mut f32,
}

/// The params of the backward's four launches.
struct BackwardLaunches {
    dyb: QlLoraProjectParams,
    db: GradLaunch,
    da: GradLaunch,
    dx: QlLoraExpandParams,
}

/// One weight gradient's launch, and with more than one row slice the in-order sum of the
/// slices' partials into the gradient.
struct GradLaunch {
    params: QlLoraGradWParams,
    cfg: LaunchConfig,
    reduce: Option<QlRmsNormDwReduceParams>,
}

impl GradLaunch {
    /// `params` with its output redirected to `partial` when `cols`, `rows` take several slices.
    fn new(mut params: QlLoraGradWParams, partial: *mut f32) -> Self {
        let (cols, rows, rank) = (
            params.cols as usize,
            params.rows as usize,
            params.rank as usize,
        );
        let cfg = lora_grad_launch(cols, rows, rank);
        let slices = cfg.grid_dim.1;
        let reduce = (slices > 1).then(|| {
            let reduce = QlRmsNormDwReduceParams {
                dw_partial: partial,
                dw: params.out,
                partial_rows: slices as i32,
                h: (rank * cols) as i32,
            };
            params.out = partial;
            reduce
        });
        GradLaunch {
            params,
            cfg,
            reduce,
        }
    }
}

impl BackwardLaunches {
    fn new<T: Element, W: Element>(d: &LoraDims, scale: f32, p: BackwardPtrs) -> Self {
        let (rows, rank) = (d.tokens as i64, d.rank as i32);
        let (k, n) = (d.in_features as i32, d.out_features as i32);
        BackwardLaunches {
            dyb: QlLoraProjectParams {
                x: p.dy,
                w: p.b,
                out: p.u,
                rows,
                cols: n,
                rank,
                x_dtype: T::DTYPE as i32,
                w_dtype: W::DTYPE as i32,
            },
            db: GradLaunch::new(
                QlLoraGradWParams {
                    p: p.dy,
                    q: p.t,
                    out: p.db,
                    rows,
                    cols: n,
                    rank,
                    scale,
                    p_dtype: T::DTYPE as i32,
                },
                p.db_partial,
            ),
            da: GradLaunch::new(
                QlLoraGradWParams {
                    p: p.x,
                    q: p.u,
                    out: p.da,
                    rows,
                    cols: k,
                    rank,
                    scale,
                    p_dtype: T::DTYPE as i32,
                },
                p.da_partial,
            ),
            dx: QlLoraExpandParams {
                t: p.u,
                w: p.a,
                y: p.dx,
                rows,
                cols: k,
                rank,
                scale,
                w_dtype: W::DTYPE as i32,
                y_dtype: T::DTYPE as i32,
            },
        }
    }
}
