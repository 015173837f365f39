//! Launchers and plain-Rust references for `kernels/llama.cu`, forward and backward: RMSNorm over
//! `[rows, h]` (Hugging Face `LlamaRMSNorm`), rotate-half RoPE in place on q `[tokens, q_heads,
//! head_dim]` and k `[tokens, kv_heads, head_dim]`, and SwiGLU on `[n]`. All math is f32; inputs
//! and outputs are f32, bf16 or f16.

use super::abi::{
    QlRmsNormBackwardParams, QlRmsNormDwReduceParams, QlRmsNormForwardParams, QlRopeParams,
    QlSwigluParams,
};
use super::device::{KernelArg, KernelArgMut, LaunchDevice};
use super::launch::{declare_kernels, Element, LaunchConfig};
use crate::{Error, Result};

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
        if len == 0 || !len.is_multiple_of(h) {
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
        if head_dim < 2 || !head_dim.is_multiple_of(2) {
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
// Launchers: one per kernel, generic over the launch device (docs/ARCHITECTURE.md, "Launch
// devices"). `*_into` writes caller-owned buffers; the plain form allocates its outputs.

/// RMSNorm forward (`k_rmsnorm_forward`) into caller-owned `y` `[rows, h]` and `rstd` `[rows]`.
#[allow(clippy::too_many_arguments)]
pub fn rmsnorm_forward_into<D: LaunchDevice, T: Element>(
    dev: &D,
    x: &(impl KernelArg<D, T> + ?Sized),
    w: &(impl KernelArg<D, T> + ?Sized),
    h: usize,
    eps: f32,
    y: &mut (impl KernelArgMut<D, T> + ?Sized),
    rstd: &mut (impl KernelArgMut<D, f32> + ?Sized),
) -> Result<()> {
    const OP: &str = "rmsnorm_forward";
    let shape = RmsNormShape::from_len(OP, x.len(), h)?;
    shape.check_len(OP, "w", w.len(), h)?;
    shape.check_len(OP, "y", y.len(), x.len())?;
    shape.check_len(OP, "rstd", rstd.len(), shape.rows)?;
    check_eps(OP, eps)?;
    let cfg = rmsnorm_forward_launch(&shape)?;
    let (xp, wp, yp, rp) = (x.ptr(dev), w.ptr(dev), y.ptr_mut(dev), rstd.ptr_mut(dev));
    let params = QlRmsNormForwardParams {
        x: xp.void(),
        w: wp.void(),
        y: yp.void_mut(),
        rstd: rp.get_mut(),
        rows: shape.rows as i64,
        h: h as i32,
        eps,
        dtype: T::DTYPE as i32,
    };
    // SAFETY: x and y hold rows × h elements, w h and rstd rows (validated above); the pointers'
    // guards keep every buffer alive and ordered until the launch is queued.
    unsafe { dev.launch(&RMSNORM_FORWARD, &cfg, &params) }
}

/// RMSNorm forward (`k_rmsnorm_forward`). Returns `(y, rstd)`.
pub fn rmsnorm_forward<D: LaunchDevice, T: Element>(
    dev: &D,
    x: &(impl KernelArg<D, T> + ?Sized),
    w: &(impl KernelArg<D, T> + ?Sized),
    h: usize,
    eps: f32,
) -> Result<(D::Buffer<T>, D::Buffer<f32>)> {
    let shape = RmsNormShape::from_len("rmsnorm_forward", x.len(), h)?;
    // SAFETY: the kernel writes every element of both buffers (one output per row and column).
    let (mut y, mut rstd) = unsafe { (dev.alloc::<T>(x.len())?, dev.alloc::<f32>(shape.rows)?) };
    rmsnorm_forward_into(dev, x, w, h, eps, &mut y, &mut rstd)?;
    Ok((y, rstd))
}

/// RMSNorm backward (`k_rmsnorm_backward` + `k_rmsnorm_dw_reduce`) into caller-owned `dx`
/// `[rows, h]`, `dw` `[h]` (f32) and scratch `dw_partial` of [`RmsNormShape::dw_partial_rows`] ×
/// h floats.
#[allow(clippy::too_many_arguments)]
pub fn rmsnorm_backward_into<D: LaunchDevice, T: Element>(
    dev: &D,
    dy: &(impl KernelArg<D, T> + ?Sized),
    x: &(impl KernelArg<D, T> + ?Sized),
    w: &(impl KernelArg<D, T> + ?Sized),
    rstd: &(impl KernelArg<D, f32> + ?Sized),
    h: usize,
    dx: &mut (impl KernelArgMut<D, T> + ?Sized),
    dw: &mut (impl KernelArgMut<D, f32> + ?Sized),
    dw_partial: &mut (impl KernelArgMut<D, f32> + ?Sized),
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
    let (dyp, xp, wp, rp) = (dy.ptr(dev), x.ptr(dev), w.ptr(dev), rstd.ptr(dev));
    let (dxp, pp, dwp) = (dx.ptr_mut(dev), dw_partial.ptr_mut(dev), dw.ptr_mut(dev));
    let params = QlRmsNormBackwardParams {
        dy: dyp.void(),
        x: xp.void(),
        w: wp.void(),
        rstd: rp.get(),
        dx: dxp.void_mut(),
        dw_partial: pp.get_mut(),
        rows: shape.rows as i64,
        h: h as i32,
        dtype: T::DTYPE as i32,
    };
    let reduce = QlRmsNormDwReduceParams {
        dw_partial: pp.get(),
        dw: dwp.get_mut(),
        partial_rows: shape.dw_partial_rows() as i32,
        h: h as i32,
    };
    // SAFETY: every buffer has the length validated above (the partials one row of h per block
    // of `cfg`); the two launches run in order on the device, and the guards keep the buffers
    // alive and ordered until both are queued.
    unsafe {
        dev.launch(&RMSNORM_BACKWARD, &cfg, &params)?;
        dev.launch(
            &RMSNORM_DW_REDUCE,
            &rmsnorm_dw_reduce_launch(&shape),
            &reduce,
        )
    }
}

/// RMSNorm backward. Returns `(dx, dw)`, dw in f32.
pub fn rmsnorm_backward<D: LaunchDevice, T: Element>(
    dev: &D,
    dy: &(impl KernelArg<D, T> + ?Sized),
    x: &(impl KernelArg<D, T> + ?Sized),
    w: &(impl KernelArg<D, T> + ?Sized),
    rstd: &(impl KernelArg<D, f32> + ?Sized),
    h: usize,
) -> Result<(D::Buffer<T>, D::Buffer<f32>)> {
    let shape = RmsNormShape::from_len("rmsnorm_backward", x.len(), h)?;
    // SAFETY: the backward writes every dx element and every partial; the reduce every dw.
    let (mut dx, mut dw, mut partial) = unsafe {
        (
            dev.alloc::<T>(x.len())?,
            dev.alloc::<f32>(h)?,
            dev.alloc::<f32>(shape.dw_partial_rows() * h)?,
        )
    };
    rmsnorm_backward_into(dev, dy, x, w, rstd, h, &mut dx, &mut dw, &mut partial)?;
    Ok((dx, dw))
}

/// RoPE in place on q and k (`k_rope`; `inverse` applies the backward rotation, for dq / dk).
/// Positions may live on the device, so the launcher does not read them: on every device the
/// kernel bounds each table read and writes NaN into a token whose position is outside the
/// tables (the model checks its positions on the host when it builds them).
#[allow(clippy::too_many_arguments)]
pub fn rope<D: LaunchDevice, T: Element>(
    dev: &D,
    q: &mut (impl KernelArgMut<D, T> + ?Sized),
    k: &mut (impl KernelArgMut<D, T> + ?Sized),
    cos: &(impl KernelArg<D, f32> + ?Sized),
    sin: &(impl KernelArg<D, f32> + ?Sized),
    positions: &(impl KernelArg<D, i32> + ?Sized),
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
    let (qp, kp) = (q.ptr_mut(dev), k.ptr_mut(dev));
    let (cp, sp, pp) = (cos.ptr(dev), sin.ptr(dev), positions.ptr(dev));
    let params = QlRopeParams {
        q: qp.void_mut(),
        k: kp.void_mut(),
        cos: cp.get(),
        sin: sp.get(),
        positions: pp.get(),
        tokens: shape.tokens as i64,
        q_heads: shape.q_heads as i32,
        kv_heads: shape.kv_heads as i32,
        head_dim: shape.head_dim as i32,
        num_positions: shape.num_positions as i32,
        inverse: i32::from(inverse),
        dtype: T::DTYPE as i32,
    };
    // SAFETY: q, k, the tables and the positions have the lengths `shape` was validated against;
    // the kernel checks each position against `num_positions` before reading the tables; the
    // guards keep every buffer alive and ordered until the launch is queued.
    unsafe { dev.launch(&ROPE, &rope_launch(&shape), &params) }
}

/// SwiGLU forward (`k_swiglu_forward`) into a caller-owned `h`.
pub fn swiglu_forward_into<D: LaunchDevice, T: Element>(
    dev: &D,
    g: &(impl KernelArg<D, T> + ?Sized),
    u: &(impl KernelArg<D, T> + ?Sized),
    h: &mut (impl KernelArgMut<D, T> + ?Sized),
) -> Result<()> {
    check_swiglu("swiglu_forward", g.len(), &[("u", u.len()), ("h", h.len())])?;
    let (gp, up, hp) = (g.ptr(dev), u.ptr(dev), h.ptr_mut(dev));
    let params = QlSwigluParams {
        g: gp.void(),
        u: up.void(),
        h: hp.void_mut(),
        n: g.len() as i64,
        dtype: T::DTYPE as i32,
        ..Default::default()
    };
    // SAFETY: g, u and h hold n elements (validated above); the guards keep them alive and
    // ordered until the launch is queued.
    unsafe { dev.launch(&SWIGLU_FORWARD, &swiglu_launch(g.len()), &params) }
}

/// SwiGLU forward (`k_swiglu_forward`).
pub fn swiglu_forward<D: LaunchDevice, T: Element>(
    dev: &D,
    g: &(impl KernelArg<D, T> + ?Sized),
    u: &(impl KernelArg<D, T> + ?Sized),
) -> Result<D::Buffer<T>> {
    check_swiglu("swiglu_forward", g.len(), &[])?;
    // SAFETY: the kernel writes every element.
    let mut h = unsafe { dev.alloc::<T>(g.len())? };
    swiglu_forward_into(dev, g, u, &mut h)?;
    Ok(h)
}

/// SwiGLU backward (`k_swiglu_backward`) into caller-owned `dg` and `du`.
pub fn swiglu_backward_into<D: LaunchDevice, T: Element>(
    dev: &D,
    g: &(impl KernelArg<D, T> + ?Sized),
    u: &(impl KernelArg<D, T> + ?Sized),
    dh: &(impl KernelArg<D, T> + ?Sized),
    dg: &mut (impl KernelArgMut<D, T> + ?Sized),
    du: &mut (impl KernelArgMut<D, T> + ?Sized),
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
    let (gp, up, dhp) = (g.ptr(dev), u.ptr(dev), dh.ptr(dev));
    let (dgp, dup) = (dg.ptr_mut(dev), du.ptr_mut(dev));
    let params = QlSwigluParams {
        g: gp.void(),
        u: up.void(),
        dh: dhp.void(),
        dg: dgp.void_mut(),
        du: dup.void_mut(),
        n: g.len() as i64,
        dtype: T::DTYPE as i32,
        ..Default::default()
    };
    // SAFETY: all five buffers hold n elements (validated above); the guards keep them alive and
    // ordered until the launch is queued.
    unsafe { dev.launch(&SWIGLU_BACKWARD, &swiglu_launch(g.len()), &params) }
}

/// SwiGLU backward (`k_swiglu_backward`). Returns `(dg, du)`.
pub fn swiglu_backward<D: LaunchDevice, T: Element>(
    dev: &D,
    g: &(impl KernelArg<D, T> + ?Sized),
    u: &(impl KernelArg<D, T> + ?Sized),
    dh: &(impl KernelArg<D, T> + ?Sized),
) -> Result<(D::Buffer<T>, D::Buffer<T>)> {
    check_swiglu("swiglu_backward", g.len(), &[])?;
    // SAFETY: the kernel writes every element of both.
    let (mut dg, mut du) = unsafe { (dev.alloc::<T>(g.len())?, dev.alloc::<T>(g.len())?) };
    swiglu_backward_into(dev, g, u, dh, &mut dg, &mut du)?;
    Ok((dg, du))
}
