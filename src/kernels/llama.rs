//! Launchers and plain-Rust references for `kernels/llama.cu`, forward and backward: RMSNorm over
//! `[rows, h]` (Hugging Face `LlamaRMSNorm`), rotate-half RoPE in place on q `[tokens, q_heads,
//! head_dim]` and k `[tokens, kv_heads, head_dim]`, and SwiGLU on `[n]`. All math is f32; inputs
//! and outputs are f32, bf16 or f16.

use super::abi::{
    QlRmsNormBackwardParams, QlRmsNormDwReduceParams, QlRmsNormForwardParams, QlRopeParams,
    QlSwigluParams,
};
use super::launch::{declare_kernels, Element, LaunchConfig};
use crate::{Error, Result};
use std::ffi::c_void;

declare_kernels! {
    module "llama";
    /// `k_rmsnorm_forward`: a warp per row (h ≤ 1024, four rows per block) or a block per row.
    RMSNORM_FORWARD = k_rmsnorm_forward / qlemu_k_rmsnorm_forward {
        block: super::launch::BlockShape::Rows { max_threads: 1024 }
    };
    /// `k_rmsnorm_backward`: dx and per-block dw partial sums, same block shape as the forward.
    RMSNORM_BACKWARD = k_rmsnorm_backward / qlemu_k_rmsnorm_backward {
        block: super::launch::BlockShape::Rows { max_threads: 1024 }
    };
    /// `k_rmsnorm_dw_reduce`: the dw partials summed in a fixed order, one thread per column.
    RMSNORM_DW_REDUCE = k_rmsnorm_dw_reduce / qlemu_k_rmsnorm_dw_reduce {
        block: super::launch::BlockShape::Linear { max_threads: 256 }
    };
    /// `k_rope`: one thread per rotated pair, forward or inverse, in place.
    ROPE = k_rope / qlemu_k_rope {
        block: super::launch::BlockShape::Linear { max_threads: 256 }
    };
    /// `k_swiglu_forward`: one thread per element.
    SWIGLU_FORWARD = k_swiglu_forward / qlemu_k_swiglu_forward {
        block: super::launch::BlockShape::Linear { max_threads: 256 }
    };
    /// `k_swiglu_backward`: one thread per element.
    SWIGLU_BACKWARD = k_swiglu_backward / qlemu_k_swiglu_backward {
        block: super::launch::BlockShape::Linear { max_threads: 256 }
    };
}

/// Widest RMSNorm row: the backward keeps `h` f32 dw sums per row group in shared memory, within
/// the 48 KiB a block gets without opting in.
pub const MAX_HIDDEN: usize = 8192;
/// Most blocks of the RMSNorm backward, so the dw partials stay `≤ 256 × h` floats.
const MAX_DW_PARTIAL_ROWS: u64 = 256;
const ELEMENTWISE_THREADS: u32 = 256;
/// Elementwise kernels loop grid-stride beyond this many blocks.
const MAX_ELEMENTWISE_BLOCKS: u64 = 1 << 16;
/// Grid-x limit of every CUDA device we target.
const MAX_GRID_X: u64 = (1 << 31) - 1;

/// Validated sizes of an RMSNorm input `[rows, h]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RmsNormShape {
    pub rows: usize,
    pub h: usize,
}

impl RmsNormShape {
    /// Shape of an input of `len` elements in rows of `h`.
    pub fn from_len(op: &'static str, len: usize, h: usize) -> Result<Self> {
        if h == 0 || h > MAX_HIDDEN {
            return Err(Error::invalid(
                op,
                format!("row width {h} outside 1..={MAX_HIDDEN}"),
            ));
        }
        if len == 0 || len % h != 0 {
            return Err(Error::invalid(
                op,
                format!("{len} elements are not a non-empty whole number of rows of {h}"),
            ));
        }
        if len as u64 > i64::MAX as u64 / 4 {
            return Err(Error::invalid(op, format!("{len} elements is too many")));
        }
        Ok(RmsNormShape { rows: len / h, h })
    }

    fn check_len(&self, op: &'static str, what: &str, got: usize, want: usize) -> Result<()> {
        if got == want {
            Ok(())
        } else {
            Err(Error::invalid(
                op,
                format!(
                    "{what} has {got} elements, expected {want} for {} rows of {}",
                    self.rows, self.h
                ),
            ))
        }
    }

    /// Threads per row and rows per block: a warp per row up to 1024 elements, else a block.
    fn block(&self) -> (u32, u32) {
        match self.h {
            0..=1024 => (32, 4),
            1025..=4096 => (256, 1),
            _ => (512, 1),
        }
    }

    fn row_blocks(&self) -> u64 {
        (self.rows as u64).div_ceil(self.block().1 as u64)
    }

    /// Rows of the dw partial sums the backward writes (its grid size): `[partial_rows, h]` f32.
    pub fn dw_partial_rows(&self) -> usize {
        self.row_blocks().min(MAX_DW_PARTIAL_ROWS) as usize
    }
}

fn check_grid(op: &'static str, blocks: u64) -> Result<u32> {
    if blocks > MAX_GRID_X {
        return Err(Error::invalid(
            op,
            format!("{blocks} blocks exceed the grid limit"),
        ));
    }
    Ok(blocks.max(1) as u32)
}

fn check_eps(op: &'static str, eps: f32) -> Result<()> {
    if eps.is_finite() && eps >= 0.0 {
        Ok(())
    } else {
        Err(Error::invalid(
            op,
            format!("eps {eps} must be finite and >= 0"),
        ))
    }
}

/// Launch geometry of `k_rmsnorm_forward` (shared by every backend). Checked against the kernel's
/// [`BlockShape::Rows`](super::launch::BlockShape::Rows): its early return before `row_sum`'s
/// barrier is safe only while a row is one warp or the whole block.
pub fn rmsnorm_forward_launch(shape: &RmsNormShape) -> Result<LaunchConfig> {
    let (tx, ty) = shape.block();
    let cfg = LaunchConfig {
        grid_dim: (check_grid("rmsnorm_forward", shape.row_blocks())?, 1, 1),
        block_dim: (tx, ty, 1),
        shared_mem_bytes: 0,
    };
    RMSNORM_FORWARD.check_launch(&cfg)?;
    Ok(cfg)
}

/// Launch geometry of `k_rmsnorm_backward`: `dw_partial_rows` blocks, `rows_per_block × h` f32
/// of dynamic shared memory, which must stay within the 48 KiB the kernel gets without opting in
/// (at most 32 KiB up to [`MAX_HIDDEN`]); checked with the block shape, as for the forward.
pub fn rmsnorm_backward_launch(shape: &RmsNormShape) -> Result<LaunchConfig> {
    let (tx, ty) = shape.block();
    let smem = (ty as u64) * (shape.h as u64) * 4;
    let cfg = LaunchConfig {
        grid_dim: (shape.dw_partial_rows() as u32, 1, 1),
        block_dim: (tx, ty, 1),
        shared_mem_bytes: u32::try_from(smem).unwrap_or(u32::MAX),
    };
    RMSNORM_BACKWARD.check_launch(&cfg)?;
    Ok(cfg)
}

/// Launch geometry of `k_rmsnorm_dw_reduce`.
pub fn rmsnorm_dw_reduce_launch(shape: &RmsNormShape) -> LaunchConfig {
    LaunchConfig::linear(
        (shape.h as u32).div_ceil(ELEMENTWISE_THREADS),
        ELEMENTWISE_THREADS,
    )
}

fn elementwise_launch(items: u64) -> LaunchConfig {
    let blocks = items
        .div_ceil(ELEMENTWISE_THREADS as u64)
        .clamp(1, MAX_ELEMENTWISE_BLOCKS);
    LaunchConfig::linear(blocks as u32, ELEMENTWISE_THREADS)
}

/// Validated sizes of a RoPE application.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RopeShape {
    pub tokens: usize,
    pub q_heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub num_positions: usize,
}

impl RopeShape {
    /// Checks the head counts and the lengths of q, k, the cos/sin tables and the positions.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        op: &'static str,
        q_len: usize,
        k_len: usize,
        table_lens: (usize, usize),
        tokens: usize,
        q_heads: usize,
        kv_heads: usize,
        head_dim: usize,
    ) -> Result<Self> {
        let bad = |reason: String| Err(Error::invalid(op, reason));
        if head_dim < 2 || head_dim % 2 != 0 {
            return bad(format!("head_dim {head_dim} must be even and >= 2"));
        }
        if q_heads == 0 || kv_heads == 0 {
            return bad(format!(
                "q_heads {q_heads} and kv_heads {kv_heads} must be >= 1"
            ));
        }
        if (q_heads + kv_heads).saturating_mul(head_dim) > i32::MAX as usize {
            return bad(format!(
                "{} heads of {head_dim} is too wide",
                q_heads + kv_heads
            ));
        }
        if tokens == 0 {
            return bad("no tokens".into());
        }
        let per_token = (q_heads + kv_heads) * head_dim;
        if tokens as u64 > i64::MAX as u64 / 4 / per_token as u64 {
            return bad(format!("{tokens} tokens is too many"));
        }
        if q_len != tokens * q_heads * head_dim || k_len != tokens * kv_heads * head_dim {
            return bad(format!(
                "q has {q_len} and k {k_len} elements, expected {} and {} for {tokens} tokens",
                tokens * q_heads * head_dim,
                tokens * kv_heads * head_dim
            ));
        }
        let half = head_dim / 2;
        let (cos_len, sin_len) = table_lens;
        if cos_len != sin_len
            || cos_len == 0
            || cos_len % half != 0
            || cos_len / half > i32::MAX as usize
        {
            return bad(format!(
                "cos ({cos_len}) and sin ({sin_len}) must both be [positions, {half}]"
            ));
        }
        Ok(RopeShape {
            tokens,
            q_heads,
            kv_heads,
            head_dim,
            num_positions: cos_len / half,
        })
    }

    fn pairs(&self) -> u64 {
        (self.tokens * (self.q_heads + self.kv_heads) * self.head_dim / 2) as u64
    }
}

/// Launch geometry of `k_rope`.
pub fn rope_launch(shape: &RopeShape) -> LaunchConfig {
    elementwise_launch(shape.pairs())
}

/// Launch geometry of `k_swiglu_forward` and `k_swiglu_backward` on `n` elements.
pub fn swiglu_launch(n: usize) -> LaunchConfig {
    elementwise_launch(n as u64)
}

fn check_swiglu(op: &'static str, n: usize, others: &[(&str, usize)]) -> Result<()> {
    if n == 0 || n as u64 > i64::MAX as u64 / 4 {
        return Err(Error::invalid(op, format!("{n} elements")));
    }
    for &(what, len) in others {
        if len != n {
            return Err(Error::invalid(
                op,
                format!("{what} has {len} elements, expected {n}"),
            ));
        }
    }
    Ok(())
}

fn check_positions(op: &'static str, positions: &[i32], num_positions: usize) -> Result<()> {
    match positions
        .iter()
        .find(|&&p| p < 0 || p as usize >= num_positions)
    {
        Some(p) => Err(Error::invalid(
            op,
            format!("position {p} outside the {num_positions} rows of the cos/sin tables"),
        )),
        None => Ok(()),
    }
}

// ---------------------------------------------------------------------------------------------
// References (plain Rust, f32 math, sequential sums). Outputs are the f32 values a kernel rounds
// once to its output dtype.

fn widen<T: Element>(v: &[T]) -> Vec<f32> {
    v.iter().map(|x| x.to_f32()).collect()
}

/// RMSNorm forward as Hugging Face computes it: `rstd = 1 / sqrt(mean(x²) + eps)` in f32,
/// `y = w * T(x * rstd)`. Returns `(y, rstd)` with `y` before its final rounding to `T`.
pub fn rmsnorm_forward_ref<T: Element>(
    x: &[T],
    w: &[T],
    h: usize,
    eps: f32,
) -> Result<(Vec<f32>, Vec<f32>)> {
    const OP: &str = "rmsnorm_forward_ref";
    let shape = RmsNormShape::from_len(OP, x.len(), h)?;
    shape.check_len(OP, "w", w.len(), h)?;
    check_eps(OP, eps)?;
    let w = widen(w);
    let mut y = Vec::with_capacity(x.len());
    let mut rstd = Vec::with_capacity(shape.rows);
    for row in x.chunks_exact(h) {
        let row = widen(row);
        let ss: f32 = row.iter().map(|v| v * v).sum();
        let r = 1.0 / (ss / h as f32 + eps).sqrt();
        rstd.push(r);
        y.extend(
            row.iter()
                .zip(&w)
                .map(|(&v, &wc)| wc * T::from_f32(v * r).to_f32()),
        );
    }
    Ok((y, rstd))
}

/// RMSNorm backward: with `n = x * rstd` and `dn = dy * w` (f32),
/// `dx = rstd * dn - x * rstd³ * Σ(dn * x) / h` and `dw = Σ_rows dy * n`. Returns `(dx, dw)`.
pub fn rmsnorm_backward_ref<T: Element>(
    dy: &[T],
    x: &[T],
    w: &[T],
    rstd: &[f32],
    h: usize,
) -> Result<(Vec<f32>, Vec<f32>)> {
    const OP: &str = "rmsnorm_backward_ref";
    let shape = RmsNormShape::from_len(OP, x.len(), h)?;
    shape.check_len(OP, "dy", dy.len(), x.len())?;
    shape.check_len(OP, "w", w.len(), h)?;
    shape.check_len(OP, "rstd", rstd.len(), shape.rows)?;
    let w = widen(w);
    let mut dx = Vec::with_capacity(x.len());
    let mut dw = vec![0f32; h];
    for ((dy, x), &r) in dy.chunks_exact(h).zip(x.chunks_exact(h)).zip(rstd) {
        let (dy, x) = (widen(dy), widen(x));
        let dot: f32 = (0..h).map(|c| dy[c] * w[c] * x[c]).sum();
        let coef = dot * r * r * r / h as f32;
        for c in 0..h {
            dx.push(r * (dy[c] * w[c]) - x[c] * coef);
            dw[c] += dy[c] * (x[c] * r);
        }
    }
    Ok((dx, dw))
}

/// Rotate-half RoPE on one buffer `[tokens, heads, head_dim]`: `(a, b) = (v[i], v[i + d/2])`
/// becomes `(a c - b s, b c + a s)`, with `s` negated for the inverse rotation.
fn rope_one_ref(
    v: &[f32],
    heads: usize,
    head_dim: usize,
    cos: &[f32],
    sin: &[f32],
    positions: &[i32],
    inverse: bool,
) -> Vec<f32> {
    let half = head_dim / 2;
    let mut out = v.to_vec();
    for (t, &pos) in positions.iter().enumerate() {
        let table = pos as usize * half;
        for hd in 0..heads {
            let base = (t * heads + hd) * head_dim;
            for i in 0..half {
                let (c, s) = (cos[table + i], sin[table + i]);
                let s = if inverse { -s } else { s };
                let (a, b) = (v[base + i], v[base + i + half]);
                out[base + i] = a * c - b * s;
                out[base + i + half] = b * c + a * s;
            }
        }
    }
    out
}

/// RoPE reference on q and k (forward, or the inverse rotation for the backward). Returns the
/// rotated `(q, k)` in f32.
#[allow(clippy::too_many_arguments)]
pub fn rope_ref<T: Element>(
    q: &[T],
    k: &[T],
    cos: &[f32],
    sin: &[f32],
    positions: &[i32],
    q_heads: usize,
    kv_heads: usize,
    head_dim: usize,
    inverse: bool,
) -> Result<(Vec<f32>, Vec<f32>)> {
    const OP: &str = "rope_ref";
    let shape = RopeShape::new(
        OP,
        q.len(),
        k.len(),
        (cos.len(), sin.len()),
        positions.len(),
        q_heads,
        kv_heads,
        head_dim,
    )?;
    check_positions(OP, positions, shape.num_positions)?;
    let rq = rope_one_ref(&widen(q), q_heads, head_dim, cos, sin, positions, inverse);
    let rk = rope_one_ref(&widen(k), kv_heads, head_dim, cos, sin, positions, inverse);
    Ok((rq, rk))
}

fn sigmoid(g: f32) -> f32 {
    1.0 / (1.0 + (-g).exp())
}

/// SwiGLU forward reference: `h = silu(g) * u`, `silu(g) = g * sigmoid(g)`.
pub fn swiglu_forward_ref<T: Element>(g: &[T], u: &[T]) -> Result<Vec<f32>> {
    check_swiglu("swiglu_forward_ref", g.len(), &[("u", u.len())])?;
    Ok(g.iter()
        .zip(u)
        .map(|(g, u)| {
            let g = g.to_f32();
            g * sigmoid(g) * u.to_f32()
        })
        .collect())
}

/// SwiGLU backward reference: `dg = dh * u * sigmoid(g) * (1 + g * (1 - sigmoid(g)))`,
/// `du = dh * silu(g)`. Returns `(dg, du)`.
pub fn swiglu_backward_ref<T: Element>(g: &[T], u: &[T], dh: &[T]) -> Result<(Vec<f32>, Vec<f32>)> {
    check_swiglu(
        "swiglu_backward_ref",
        g.len(),
        &[("u", u.len()), ("dh", dh.len())],
    )?;
    Ok(g.iter()
        .zip(u)
        .zip(dh)
        .map(|((g, u), dh)| {
            let (g, u, dh) = (g.to_f32(), u.to_f32(), dh.to_f32());
            let sg = sigmoid(g);
            (dh * u * (sg * (1.0 + g * (1.0 - sg))), dh * (g * sg))
        })
        .unzip())
}

// ---------------------------------------------------------------------------------------------
// Emulated launches (host buffers).

/// RMSNorm forward through the CPU emulation of `k_rmsnorm_forward`. Returns `(y, rstd)`.
pub fn rmsnorm_forward_emulated<T: Element>(
    x: &[T],
    w: &[T],
    h: usize,
    eps: f32,
) -> Result<(Vec<T>, Vec<f32>)> {
    const OP: &str = "rmsnorm_forward";
    let shape = RmsNormShape::from_len(OP, x.len(), h)?;
    shape.check_len(OP, "w", w.len(), h)?;
    check_eps(OP, eps)?;
    let cfg = rmsnorm_forward_launch(&shape)?;
    let mut y = vec![T::default(); x.len()];
    let mut rstd = vec![0f32; shape.rows];
    let params = QlRmsNormForwardParams {
        x: x.as_ptr().cast(),
        w: w.as_ptr().cast(),
        y: y.as_mut_ptr().cast(),
        rstd: rstd.as_mut_ptr(),
        rows: shape.rows as i64,
        h: h as i32,
        eps,
        dtype: T::DTYPE as i32,
    };
    // SAFETY: x and y hold rows × h elements, w h and rstd rows (validated above); all outlive
    // the synchronous launch.
    unsafe { super::emu::launch(&RMSNORM_FORWARD, &cfg, &params)? };
    Ok((y, rstd))
}

/// RMSNorm backward through the CPU emulation of `k_rmsnorm_backward` + `k_rmsnorm_dw_reduce`.
/// Returns `(dx, dw)`, dw in f32.
pub fn rmsnorm_backward_emulated<T: Element>(
    dy: &[T],
    x: &[T],
    w: &[T],
    rstd: &[f32],
    h: usize,
) -> Result<(Vec<T>, Vec<f32>)> {
    const OP: &str = "rmsnorm_backward";
    let shape = RmsNormShape::from_len(OP, x.len(), h)?;
    shape.check_len(OP, "dy", dy.len(), x.len())?;
    shape.check_len(OP, "w", w.len(), h)?;
    shape.check_len(OP, "rstd", rstd.len(), shape.rows)?;
    let cfg = rmsnorm_backward_launch(&shape)?;
    let mut dx = vec![T::default(); x.len()];
    let mut partial = vec![0f32; shape.dw_partial_rows() * h];
    let mut dw = vec![0f32; h];
    let params = QlRmsNormBackwardParams {
        dy: dy.as_ptr().cast(),
        x: x.as_ptr().cast(),
        w: w.as_ptr().cast(),
        rstd: rstd.as_ptr(),
        dx: dx.as_mut_ptr().cast(),
        dw_partial: partial.as_mut_ptr(),
        rows: shape.rows as i64,
        h: h as i32,
        dtype: T::DTYPE as i32,
    };
    // SAFETY: dy, x and dx hold rows × h elements, w h, rstd rows, and the partials one row of h
    // per block of `cfg` (validated and sized above); all outlive the synchronous launch.
    unsafe { super::emu::launch(&RMSNORM_BACKWARD, &cfg, &params)? };
    let reduce = QlRmsNormDwReduceParams {
        dw_partial: partial.as_ptr(),
        dw: dw.as_mut_ptr(),
        partial_rows: shape.dw_partial_rows() as i32,
        h: h as i32,
    };
    // SAFETY: the partials hold partial_rows × h floats and dw h; both outlive the launch.
    unsafe {
        super::emu::launch(
            &RMSNORM_DW_REDUCE,
            &rmsnorm_dw_reduce_launch(&shape),
            &reduce,
        )?
    };
    Ok((dx, dw))
}

/// RoPE in place through the CPU emulation of `k_rope`; `inverse` applies the backward rotation.
#[allow(clippy::too_many_arguments)]
pub fn rope_emulated<T: Element>(
    q: &mut [T],
    k: &mut [T],
    cos: &[f32],
    sin: &[f32],
    positions: &[i32],
    q_heads: usize,
    kv_heads: usize,
    head_dim: usize,
    inverse: bool,
) -> Result<()> {
    const OP: &str = "rope";
    let shape = RopeShape::new(
        OP,
        q.len(),
        k.len(),
        (cos.len(), sin.len()),
        positions.len(),
        q_heads,
        kv_heads,
        head_dim,
    )?;
    check_positions(OP, positions, shape.num_positions)?;
    let params = rope_params(
        &shape,
        q.as_mut_ptr().cast(),
        k.as_mut_ptr().cast(),
        (cos.as_ptr(), sin.as_ptr()),
        positions.as_ptr(),
        inverse,
        T::DTYPE as i32,
    );
    // SAFETY: q, k, the tables and the positions have the lengths `shape` was validated against,
    // every position indexes the tables, and all outlive the synchronous launch.
    unsafe { super::emu::launch(&ROPE, &rope_launch(&shape), &params) }
}

fn rope_params(
    shape: &RopeShape,
    q: *mut c_void,
    k: *mut c_void,
    (cos, sin): (*const f32, *const f32),
    positions: *const i32,
    inverse: bool,
    dtype: i32,
) -> QlRopeParams {
    QlRopeParams {
        q,
        k,
        cos,
        sin,
        positions,
        tokens: shape.tokens as i64,
        q_heads: shape.q_heads as i32,
        kv_heads: shape.kv_heads as i32,
        head_dim: shape.head_dim as i32,
        num_positions: shape.num_positions as i32,
        inverse: i32::from(inverse),
        dtype,
    }
}

/// SwiGLU forward through the CPU emulation of `k_swiglu_forward`.
pub fn swiglu_forward_emulated<T: Element>(g: &[T], u: &[T]) -> Result<Vec<T>> {
    check_swiglu("swiglu_forward", g.len(), &[("u", u.len())])?;
    let mut h = vec![T::default(); g.len()];
    let params = QlSwigluParams {
        g: g.as_ptr().cast(),
        u: u.as_ptr().cast(),
        h: h.as_mut_ptr().cast(),
        n: g.len() as i64,
        dtype: T::DTYPE as i32,
        ..Default::default()
    };
    // SAFETY: g, u and h all hold n elements and outlive the synchronous launch.
    unsafe { super::emu::launch(&SWIGLU_FORWARD, &swiglu_launch(g.len()), &params)? };
    Ok(h)
}

/// SwiGLU backward through the CPU emulation of `k_swiglu_backward`. Returns `(dg, du)`.
pub fn swiglu_backward_emulated<T: Element>(
    g: &[T],
    u: &[T],
    dh: &[T],
) -> Result<(Vec<T>, Vec<T>)> {
    check_swiglu(
        "swiglu_backward",
        g.len(),
        &[("u", u.len()), ("dh", dh.len())],
    )?;
    let mut dg = vec![T::default(); g.len()];
    let mut du = vec![T::default(); g.len()];
    let params = QlSwigluParams {
        g: g.as_ptr().cast(),
        u: u.as_ptr().cast(),
        dh: dh.as_ptr().cast(),
        dg: dg.as_mut_ptr().cast(),
        du: du.as_mut_ptr().cast(),
        n: g.len() as i64,
        dtype: T::DTYPE as i32,
        ..Default::default()
    };
    // SAFETY: g, u, dh, dg and du all hold n elements and outlive the synchronous launch.
    unsafe { super::emu::launch(&SWIGLU_BACKWARD, &swiglu_launch(g.len()), &params)? };
    Ok((dg, du))
}

#[cfg(feature = "cuda")]
pub use cuda_impl::*;

#[cfg(feature = "cuda")]
mod cuda_impl {
    use super::*;
    use crate::kernels::cuda::{cuda_err, CudaDevice};
    use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut};

    /// RMSNorm forward on the device. Returns `(y, rstd)`.
    pub fn rmsnorm_forward_cuda<T: Element>(
        dev: &CudaDevice,
        x: &CudaSlice<T>,
        w: &CudaSlice<T>,
        h: usize,
        eps: f32,
    ) -> Result<(CudaSlice<T>, CudaSlice<f32>)> {
        let shape = RmsNormShape::from_len("rmsnorm_forward", x.len(), h)?;
        let stream = dev.stream();
        // SAFETY: both buffers are fully written by the kernel before anyone reads them.
        let mut y = unsafe { stream.alloc::<T>(x.len()) }.map_err(cuda_err)?;
        // SAFETY: as above.
        let mut rstd = unsafe { stream.alloc::<f32>(shape.rows) }.map_err(cuda_err)?;
        rmsnorm_forward_cuda_into(dev, x, w, h, eps, &mut y, &mut rstd)?;
        Ok((y, rstd))
    }

    /// [`rmsnorm_forward_cuda`] into caller-owned `y` `[rows, h]` and `rstd` `[rows]`.
    pub fn rmsnorm_forward_cuda_into<T: Element>(
        dev: &CudaDevice,
        x: &CudaSlice<T>,
        w: &CudaSlice<T>,
        h: usize,
        eps: f32,
        y: &mut CudaSlice<T>,
        rstd: &mut CudaSlice<f32>,
    ) -> Result<()> {
        const OP: &str = "rmsnorm_forward";
        let shape = RmsNormShape::from_len(OP, x.len(), h)?;
        shape.check_len(OP, "w", w.len(), h)?;
        shape.check_len(OP, "y", y.len(), x.len())?;
        shape.check_len(OP, "rstd", rstd.len(), shape.rows)?;
        check_eps(OP, eps)?;
        let cfg = rmsnorm_forward_launch(&shape)?;
        let stream = dev.stream();
        let (x_ptr, _g0) = x.device_ptr(stream);
        let (w_ptr, _g1) = w.device_ptr(stream);
        let (y_ptr, _g2) = y.device_ptr_mut(stream);
        let (rstd_ptr, _g3) = rstd.device_ptr_mut(stream);
        let params = QlRmsNormForwardParams {
            x: x_ptr as *const c_void,
            w: w_ptr as *const c_void,
            y: y_ptr as *mut c_void,
            rstd: rstd_ptr as *mut f32,
            rows: shape.rows as i64,
            h: h as i32,
            eps,
            dtype: T::DTYPE as i32,
        };
        // SAFETY: the device buffers have the lengths validated above; the guards keep them
        // ordered on `stream` until the launch is queued.
        unsafe { dev.launch(&RMSNORM_FORWARD, &cfg, &params) }
    }

    /// RMSNorm backward on the device. Returns `(dx, dw)`, dw in f32.
    pub fn rmsnorm_backward_cuda<T: Element>(
        dev: &CudaDevice,
        dy: &CudaSlice<T>,
        x: &CudaSlice<T>,
        w: &CudaSlice<T>,
        rstd: &CudaSlice<f32>,
        h: usize,
    ) -> Result<(CudaSlice<T>, CudaSlice<f32>)> {
        let shape = RmsNormShape::from_len("rmsnorm_backward", x.len(), h)?;
        let stream = dev.stream();
        // SAFETY: every buffer is fully written by the kernels before anyone reads it.
        let mut dx = unsafe { stream.alloc::<T>(x.len()) }.map_err(cuda_err)?;
        // SAFETY: as above.
        let mut dw = unsafe { stream.alloc::<f32>(h) }.map_err(cuda_err)?;
        // SAFETY: as above.
        let mut partial =
            unsafe { stream.alloc::<f32>(shape.dw_partial_rows() * h) }.map_err(cuda_err)?;
        rmsnorm_backward_cuda_into(dev, dy, x, w, rstd, h, &mut dx, &mut dw, &mut partial)?;
        Ok((dx, dw))
    }

    /// [`rmsnorm_backward_cuda`] into caller-owned `dx` `[rows, h]`, `dw` `[h]` and scratch
    /// `dw_partial` of [`RmsNormShape::dw_partial_rows`] × h floats.
    #[allow(clippy::too_many_arguments)]
    pub fn rmsnorm_backward_cuda_into<T: Element>(
        dev: &CudaDevice,
        dy: &CudaSlice<T>,
        x: &CudaSlice<T>,
        w: &CudaSlice<T>,
        rstd: &CudaSlice<f32>,
        h: usize,
        dx: &mut CudaSlice<T>,
        dw: &mut CudaSlice<f32>,
        dw_partial: &mut CudaSlice<f32>,
    ) -> Result<()> {
        const OP: &str = "rmsnorm_backward";
        let shape = RmsNormShape::from_len(OP, x.len(), h)?;
        shape.check_len(OP, "dy", dy.len(), x.len())?;
        shape.check_len(OP, "w", w.len(), h)?;
        shape.check_len(OP, "rstd", rstd.len(), shape.rows)?;
        shape.check_len(OP, "dx", dx.len(), x.len())?;
        shape.check_len(OP, "dw", dw.len(), h)?;
        let partial_len = shape.dw_partial_rows() * h;
        shape.check_len(OP, "dw_partial", dw_partial.len(), partial_len)?;
        let cfg = rmsnorm_backward_launch(&shape)?;
        let stream = dev.stream();
        let (dy_ptr, _g0) = dy.device_ptr(stream);
        let (x_ptr, _g1) = x.device_ptr(stream);
        let (w_ptr, _g2) = w.device_ptr(stream);
        let (rstd_ptr, _g3) = rstd.device_ptr(stream);
        let (dx_ptr, _g4) = dx.device_ptr_mut(stream);
        let (partial_ptr, _g5) = dw_partial.device_ptr_mut(stream);
        let (dw_ptr, _g6) = dw.device_ptr_mut(stream);
        let params = QlRmsNormBackwardParams {
            dy: dy_ptr as *const c_void,
            x: x_ptr as *const c_void,
            w: w_ptr as *const c_void,
            rstd: rstd_ptr as *const f32,
            dx: dx_ptr as *mut c_void,
            dw_partial: partial_ptr as *mut f32,
            rows: shape.rows as i64,
            h: h as i32,
            dtype: T::DTYPE as i32,
        };
        let reduce = QlRmsNormDwReduceParams {
            dw_partial: partial_ptr as *const f32,
            dw: dw_ptr as *mut f32,
            partial_rows: shape.dw_partial_rows() as i32,
            h: h as i32,
        };
        // SAFETY: every device buffer has the length validated above (the partials one row of h
        // per block of `cfg`); both launches are queued in order on `stream`, and the guards keep
        // the buffers ordered there until then.
        unsafe {
            dev.launch(&RMSNORM_BACKWARD, &cfg, &params)?;
            dev.launch(
                &RMSNORM_DW_REDUCE,
                &rmsnorm_dw_reduce_launch(&shape),
                &reduce,
            )
        }
    }

    /// RoPE in place on device q and k (`inverse` for the backward on dq / dk). Positions are not
    /// checked on the host: a position outside the tables writes NaN into that token's heads.
    #[allow(clippy::too_many_arguments)]
    pub fn rope_cuda<T: Element>(
        dev: &CudaDevice,
        q: &mut CudaSlice<T>,
        k: &mut CudaSlice<T>,
        cos: &CudaSlice<f32>,
        sin: &CudaSlice<f32>,
        positions: &CudaSlice<i32>,
        q_heads: usize,
        kv_heads: usize,
        head_dim: usize,
        inverse: bool,
    ) -> Result<()> {
        let shape = RopeShape::new(
            "rope",
            q.len(),
            k.len(),
            (cos.len(), sin.len()),
            positions.len(),
            q_heads,
            kv_heads,
            head_dim,
        )?;
        let stream = dev.stream();
        let (q_ptr, _g0) = q.device_ptr_mut(stream);
        let (k_ptr, _g1) = k.device_ptr_mut(stream);
        let (cos_ptr, _g2) = cos.device_ptr(stream);
        let (sin_ptr, _g3) = sin.device_ptr(stream);
        let (pos_ptr, _g4) = positions.device_ptr(stream);
        let params = rope_params(
            &shape,
            q_ptr as *mut c_void,
            k_ptr as *mut c_void,
            (cos_ptr as *const f32, sin_ptr as *const f32),
            pos_ptr as *const i32,
            inverse,
            T::DTYPE as i32,
        );
        // SAFETY: the device buffers have the lengths validated above, table reads are bounded by
        // the kernel's position check, and the guards keep them ordered on `stream`.
        unsafe { dev.launch(&ROPE, &rope_launch(&shape), &params) }
    }

    /// SwiGLU forward on the device.
    pub fn swiglu_forward_cuda<T: Element>(
        dev: &CudaDevice,
        g: &CudaSlice<T>,
        u: &CudaSlice<T>,
    ) -> Result<CudaSlice<T>> {
        check_swiglu("swiglu_forward", g.len(), &[])?;
        // SAFETY: every element is written by the kernel before anyone reads it.
        let mut h = unsafe { dev.stream().alloc::<T>(g.len()) }.map_err(cuda_err)?;
        swiglu_forward_cuda_into(dev, g, u, &mut h)?;
        Ok(h)
    }

    /// [`swiglu_forward_cuda`] into a caller-owned `h`.
    pub fn swiglu_forward_cuda_into<T: Element>(
        dev: &CudaDevice,
        g: &CudaSlice<T>,
        u: &CudaSlice<T>,
        h: &mut CudaSlice<T>,
    ) -> Result<()> {
        check_swiglu("swiglu_forward", g.len(), &[("u", u.len()), ("h", h.len())])?;
        let stream = dev.stream();
        let (g_ptr, _g0) = g.device_ptr(stream);
        let (u_ptr, _g1) = u.device_ptr(stream);
        let (h_ptr, _g2) = h.device_ptr_mut(stream);
        let params = QlSwigluParams {
            g: g_ptr as *const c_void,
            u: u_ptr as *const c_void,
            h: h_ptr as *mut c_void,
            n: g.len() as i64,
            dtype: T::DTYPE as i32,
            ..Default::default()
        };
        // SAFETY: g, u and h hold n elements (validated above); the guards keep them ordered.
        unsafe { dev.launch(&SWIGLU_FORWARD, &swiglu_launch(g.len()), &params) }
    }

    /// SwiGLU backward on the device. Returns `(dg, du)`.
    pub fn swiglu_backward_cuda<T: Element>(
        dev: &CudaDevice,
        g: &CudaSlice<T>,
        u: &CudaSlice<T>,
        dh: &CudaSlice<T>,
    ) -> Result<(CudaSlice<T>, CudaSlice<T>)> {
        check_swiglu("swiglu_backward", g.len(), &[])?;
        let stream = dev.stream();
        // SAFETY: both buffers are fully written by the kernel before anyone reads them.
        let mut dg = unsafe { stream.alloc::<T>(g.len()) }.map_err(cuda_err)?;
        // SAFETY: as above.
        let mut du = unsafe { stream.alloc::<T>(g.len()) }.map_err(cuda_err)?;
        swiglu_backward_cuda_into(dev, g, u, dh, &mut dg, &mut du)?;
        Ok((dg, du))
    }

    /// [`swiglu_backward_cuda`] into caller-owned `dg` and `du`.
    pub fn swiglu_backward_cuda_into<T: Element>(
        dev: &CudaDevice,
        g: &CudaSlice<T>,
        u: &CudaSlice<T>,
        dh: &CudaSlice<T>,
        dg: &mut CudaSlice<T>,
        du: &mut CudaSlice<T>,
    ) -> Result<()> {
        check_swiglu(
            "swiglu_backward",
            g.len(),
            &[
                ("u", u.len()),
                ("dh", dh.len()),
                ("dg", dg.len()),
                ("du", du.len()),
            ],
        )?;
        let stream = dev.stream();
        let (g_ptr, _g0) = g.device_ptr(stream);
        let (u_ptr, _g1) = u.device_ptr(stream);
        let (dh_ptr, _g2) = dh.device_ptr(stream);
        let (dg_ptr, _g3) = dg.device_ptr_mut(stream);
        let (du_ptr, _g4) = du.device_ptr_mut(stream);
        let params = QlSwigluParams {
            g: g_ptr as *const c_void,
            u: u_ptr as *const c_void,
            dh: dh_ptr as *const c_void,
            dg: dg_ptr as *mut c_void,
            du: du_ptr as *mut c_void,
            n: g.len() as i64,
            dtype: T::DTYPE as i32,
            ..Default::default()
        };
        // SAFETY: all five buffers hold n elements (validated above); the guards keep them ordered.
        unsafe { dev.launch(&SWIGLU_BACKWARD, &swiglu_launch(g.len()), &params) }
    }
}
