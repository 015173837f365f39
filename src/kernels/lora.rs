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
    lora: &LoraOperands<[W]>,
    x_len: usize,
    y_len: usize,
) -> Result<()> {
    check_lens(op, &lora.dims, lora.a.len(), lora.b.len(), x_len, y_len)?;
    check_dtype::<T>(op, "activations")?;
    check_dtype::<W>(op, "adapter weights")?;
    check_scale(op, lora.scale)
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
    check_operands::<T, W>(OP, lora, x.len(), y_base.len())?;
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
    check_operands::<T, W>(OP, lora, x.len(), dy.len())?;
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

// ---------------------------------------------------------------------------------------------
// Emulated launches (host buffers).

/// Forward through the CPU emulation of `k_lora_xa` then `k_lora_add`: `y` (holding the base
/// GEMM's output) becomes `y + s·(X·Aᵀ)·Bᵀ`; returns T = X·Aᵀ `[M, r]` f32 for the backward.
pub fn lora_forward_emulated<T: Element, W: Element>(
    lora: &LoraOperands<[W]>,
    x: &[T],
    y: &mut [T],
) -> Result<Vec<f32>> {
    const OP: &str = "lora_forward";
    check_operands::<T, W>(OP, lora, x.len(), y.len())?;
    let d = lora.dims;
    let mut t = vec![0f32; d.tokens * d.rank];
    let xa = QlLoraProjectParams {
        x: x.as_ptr().cast(),
        w: lora.a.as_ptr().cast(),
        out: t.as_mut_ptr(),
        rows: d.tokens as i64,
        cols: d.in_features as i32,
        rank: d.rank as i32,
        x_dtype: T::DTYPE as i32,
        w_dtype: W::DTYPE as i32,
    };
    // SAFETY: x holds tokens × in, A rank × in and t tokens × rank elements (validated above); all
    // outlive the synchronous launch.
    unsafe { super::emu::launch(&lora_project_kernels(&d).0, &lora_project_launch(&d), &xa)? };
    let add = QlLoraExpandParams {
        t: t.as_ptr(),
        w: lora.b.as_ptr().cast(),
        y: y.as_mut_ptr().cast(),
        rows: d.tokens as i64,
        cols: d.out_features as i32,
        rank: d.rank as i32,
        scale: lora.scale,
        w_dtype: W::DTYPE as i32,
        y_dtype: T::DTYPE as i32,
    };
    // SAFETY: t holds tokens × rank, B out × rank and y tokens × out elements (validated above);
    // all outlive the synchronous launch.
    unsafe { super::emu::launch(&LORA_ADD, &lora_expand_launch(&d, d.out_features), &add)? };
    Ok(t)
}

/// Backward through the CPU emulation of `k_lora_dyb`, `k_lora_db`, `k_lora_da` and `k_lora_dx`
/// from `dy` `[M, N]` and the forward's `t` `[M, r]`: `dx` becomes `dx + s·U·A`; returns dA, dB.
pub fn lora_backward_emulated<T: Element, W: Element>(
    lora: &LoraOperands<[W]>,
    x: &[T],
    t: &[f32],
    dy: &[T],
    dx: &mut [T],
) -> Result<LoraGrads> {
    const OP: &str = "lora_backward";
    check_operands::<T, W>(OP, lora, x.len(), dy.len())?;
    let d = lora.dims;
    d.check_len(OP, "T", t.len(), d.tokens * d.rank)?;
    d.check_len(OP, "dX", dx.len(), d.tokens * d.in_features)?;
    let mut u = vec![0f32; d.tokens * d.rank];
    let mut grads = LoraGrads {
        da: vec![0f32; d.rank * d.in_features],
        db: vec![0f32; d.out_features * d.rank],
    };
    let (da_slices, db_slices) = grad_slices(&d);
    let mut da_partial = vec![0f32; partial_len(da_slices, grads.da.len())];
    let mut db_partial = vec![0f32; partial_len(db_slices, grads.db.len())];
    let launches = BackwardLaunches::new::<T, W>(
        &d,
        lora.scale,
        BackwardPtrs {
            x: x.as_ptr().cast(),
            a: lora.a.as_ptr().cast(),
            b: lora.b.as_ptr().cast(),
            t: t.as_ptr(),
            dy: dy.as_ptr().cast(),
            dx: dx.as_mut_ptr().cast(),
            u: u.as_mut_ptr(),
            da: grads.da.as_mut_ptr(),
            db: grads.db.as_mut_ptr(),
            da_partial: da_partial.as_mut_ptr(),
            db_partial: db_partial.as_mut_ptr(),
        },
    );
    // SAFETY: every buffer has the length its params claim (validated above: x, dx tokens × in;
    // dy tokens × out; A rank × in; B, dB out × rank; t, u tokens × rank; dA rank × in; the
    // partials slices × those) and outlives the synchronous launches, which run in order (U is
    // written before it is read, the partials before they are added).
    unsafe { launches.run_emulated(&d)? };
    Ok(grads)
}

/// Row slices of dA (over `in` columns) and dB (over `out`).
fn grad_slices(d: &LoraDims) -> (usize, usize) {
    (
        lora_grad_slices(d.in_features, d.tokens, d.rank),
        lora_grad_slices(d.out_features, d.tokens, d.rank),
    )
}

/// Floats of a gradient's partials: `slices` copies of its `len`, none with one slice.
fn partial_len(slices: usize, len: usize) -> usize {
    if slices > 1 {
        slices * len
    } else {
        0
    }
}

/// Raw pointers of the backward's buffers (host or device); the partials are used (and must
/// hold slices × the gradient's length) only when their gradient has more than one row slice.
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

/// The params of the backward's four launches, built once for both backends.
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

    /// The four launches in order through the CPU emulation.
    ///
    /// # Safety
    /// Every pointer must be valid for the accesses the kernels make over `d`.
    unsafe fn run_emulated(&self, d: &LoraDims) -> Result<()> {
        // SAFETY: the caller guarantees the pointers; each params struct is its kernel's.
        unsafe {
            super::emu::launch(
                &lora_project_kernels(d).1,
                &lora_project_launch(d),
                &self.dyb,
            )?;
            for (kernel, grad) in [(&LORA_DB, &self.db), (&LORA_DA, &self.da)] {
                super::emu::launch(kernel, &grad.cfg, &grad.params)?;
                if let Some(reduce) = &grad.reduce {
                    let cfg = grad_reduce_launch(reduce.h as usize);
                    super::emu::launch(&RMSNORM_DW_REDUCE, &cfg, reduce)?;
                }
            }
            super::emu::launch(&LORA_DX, &lora_expand_launch(d, d.in_features), &self.dx)
        }
    }
}

#[cfg(feature = "cuda")]
pub use cuda_impl::*;

#[cfg(feature = "cuda")]
mod cuda_impl {
    use super::*;
    use crate::kernels::cuda::{cuda_err, CudaDevice};
    use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut};

    /// The backward's outputs on the device, all f32 and overwritten: dA `[rank, in]`,
    /// dB `[out, rank]`, and the scratch U = dY·B `[tokens, rank]`.
    #[derive(Debug)]
    pub struct LoraGradBuffers<'a> {
        pub da: &'a mut CudaSlice<f32>,
        pub db: &'a mut CudaSlice<f32>,
        pub u: &'a mut CudaSlice<f32>,
    }

    fn check_device<T: Element, W: Element>(
        op: &'static str,
        lora: &LoraOperands<CudaSlice<W>>,
        x_len: usize,
        y_len: usize,
    ) -> Result<()> {
        check_lens(op, &lora.dims, lora.a.len(), lora.b.len(), x_len, y_len)?;
        check_dtype::<T>(op, "activations")?;
        check_dtype::<W>(op, "adapter weights")?;
        check_scale(op, lora.scale)
    }

    /// Forward on the device: `y` (the base GEMM's output `[tokens, out]`) becomes
    /// `y + s·(X·Aᵀ)·Bᵀ` in place and `t` `[tokens, rank]` receives T = X·Aᵀ for the backward.
    pub fn lora_forward_cuda<T: Element, W: Element>(
        dev: &CudaDevice,
        lora: &LoraOperands<CudaSlice<W>>,
        x: &CudaSlice<T>,
        y: &mut CudaSlice<T>,
        t: &mut CudaSlice<f32>,
    ) -> Result<()> {
        const OP: &str = "lora_forward";
        check_device::<T, W>(OP, lora, x.len(), y.len())?;
        let d = lora.dims;
        d.check_len(OP, "T", t.len(), d.tokens * d.rank)?;
        let stream = dev.stream();
        let (x_ptr, _g0) = x.device_ptr(stream);
        let (a_ptr, _g1) = lora.a.device_ptr(stream);
        let (b_ptr, _g2) = lora.b.device_ptr(stream);
        let (y_ptr, _g3) = y.device_ptr_mut(stream);
        let (t_ptr, _g4) = t.device_ptr_mut(stream);
        let xa = QlLoraProjectParams {
            x: x_ptr as *const c_void,
            w: a_ptr as *const c_void,
            out: t_ptr as *mut f32,
            rows: d.tokens as i64,
            cols: d.in_features as i32,
            rank: d.rank as i32,
            x_dtype: T::DTYPE as i32,
            w_dtype: W::DTYPE as i32,
        };
        let add = QlLoraExpandParams {
            t: t_ptr as *const f32,
            w: b_ptr as *const c_void,
            y: y_ptr as *mut c_void,
            rows: d.tokens as i64,
            cols: d.out_features as i32,
            rank: d.rank as i32,
            scale: lora.scale,
            w_dtype: W::DTYPE as i32,
            y_dtype: T::DTYPE as i32,
        };
        // SAFETY: the device buffers have the lengths validated above, the two launches are
        // ordered on `stream` (T is written before it is read), and the guards keep the buffers
        // alive and ordered until both are queued.
        unsafe {
            dev.launch(&lora_project_kernels(&d).0, &lora_project_launch(&d), &xa)?;
            dev.launch(&LORA_ADD, &lora_expand_launch(&d, d.out_features), &add)
        }
    }

    /// Backward on the device from `dy` `[tokens, out]` and the forward's `t`: `dx` `[tokens, in]`
    /// becomes `dx + s·U·A` in place, and `grads` receive dA, dB (and the scratch U).
    pub fn lora_backward_cuda<T: Element, W: Element>(
        dev: &CudaDevice,
        lora: &LoraOperands<CudaSlice<W>>,
        x: &CudaSlice<T>,
        t: &CudaSlice<f32>,
        dy: &CudaSlice<T>,
        dx: &mut CudaSlice<T>,
        grads: LoraGradBuffers<'_>,
    ) -> Result<()> {
        const OP: &str = "lora_backward";
        check_device::<T, W>(OP, lora, x.len(), dy.len())?;
        let d = lora.dims;
        d.check_len(OP, "T", t.len(), d.tokens * d.rank)?;
        d.check_len(OP, "dX", dx.len(), d.tokens * d.in_features)?;
        d.check_len(OP, "U", grads.u.len(), d.tokens * d.rank)?;
        d.check_len(OP, "dA", grads.da.len(), d.rank * d.in_features)?;
        d.check_len(OP, "dB", grads.db.len(), d.out_features * d.rank)?;
        let stream = dev.stream();
        let (x_ptr, _g0) = x.device_ptr(stream);
        let (a_ptr, _g1) = lora.a.device_ptr(stream);
        let (b_ptr, _g2) = lora.b.device_ptr(stream);
        let (t_ptr, _g3) = t.device_ptr(stream);
        let (dy_ptr, _g4) = dy.device_ptr(stream);
        let (dx_ptr, _g5) = dx.device_ptr_mut(stream);
        let (u_ptr, _g6) = grads.u.device_ptr_mut(stream);
        let (da_ptr, _g7) = grads.da.device_ptr_mut(stream);
        let (db_ptr, _g8) = grads.db.device_ptr_mut(stream);
        let (da_slices, db_slices) = grad_slices(&d);
        // SAFETY: the slices' kernels write every partial before the reduction reads it.
        let mut da_partial =
            unsafe { stream.alloc::<f32>(partial_len(da_slices, d.rank * d.in_features).max(1)) }
                .map_err(cuda_err)?;
        // SAFETY: as above.
        let mut db_partial =
            unsafe { stream.alloc::<f32>(partial_len(db_slices, d.out_features * d.rank).max(1)) }
                .map_err(cuda_err)?;
        let (da_partial_ptr, _g9) = da_partial.device_ptr_mut(stream);
        let (db_partial_ptr, _g10) = db_partial.device_ptr_mut(stream);
        let launches = BackwardLaunches::new::<T, W>(
            &d,
            lora.scale,
            BackwardPtrs {
                x: x_ptr as *const c_void,
                a: a_ptr as *const c_void,
                b: b_ptr as *const c_void,
                t: t_ptr as *const f32,
                dy: dy_ptr as *const c_void,
                dx: dx_ptr as *mut c_void,
                u: u_ptr as *mut f32,
                da: da_ptr as *mut f32,
                db: db_ptr as *mut f32,
                da_partial: da_partial_ptr as *mut f32,
                db_partial: db_partial_ptr as *mut f32,
            },
        );
        // SAFETY: the device buffers have the lengths validated above (the partials slices × their
        // gradient, allocated here), the launches are ordered on `stream` (U is written before it
        // is read, the partials before they are added), and the guards keep the buffers alive and
        // ordered until all are queued; the partials' frees are ordered after them on `stream`.
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
}
