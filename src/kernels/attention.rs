//! Launchers and the plain-Rust reference for `kernels/attention.cu`: causal self-attention over
//! q `[B, Hq, T, D]` and k, v `[B, Hkv, T, D]` (GQA), with an optional key padding mask `[B, T]`,
//! forward (o and the per-row logsumexp) and backward (dq, dk, dv). f32 or bf16 in and out, f32
//! softmax; bf16 runs on tensor cores (`_mma` kernels, p and ds rounded to bf16 for the products as
//! FlashAttention-2 does), f32 on CUDA cores. dk and dv sum a GQA group's query heads inside one
//! block in a fixed order, and dq has its own pass: no atomics, bit-identical reruns.
//!
//! Semantics are those of the Llama runtime (`src/model/llama.rs`, Hugging Face eager attention):
//! scores `q·kᵀ · D^-0.5`, key j visible to query i when `j ≤ i` and `key_mask[b, j] = 1`, softmax
//! in f32. A query row that sees no key at all (left padding: every key up to it is a pad) gets
//! the additive mask's minimum on every score, so the runtime's softmax is uniform over all T keys:
//! here too `o[i]` is the mean of v over every key, `lse[i] = ln T`, and the backward takes
//! `p = 1 / T` there (the gradient the runtime's explicit backward and candle's autograd give). No
//! row produces NaN.

use super::abi::{QlAttentionBackwardParams, QlAttentionForwardParams, QlDtype};
use super::device::{opt_ptr, Emulator, KernelArg, KernelArgMut, LaunchDevice};
use super::launch::{declare_kernels, Element, Kernel, LaunchConfig};
use crate::{Error, Result};

declare_kernels! {
    module "attention";
    /// `k_attention_fwd` (f32 on CUDA cores): 16 query rows per block, key tiles of 32 with an
    /// online softmax.
    FORWARD = k_attention_fwd / qlemu_k_attention_fwd {
        block: super::launch::BlockShape::Exact(128, 1, 1)
    };
    /// `k_attention_fwd_mma` (bf16 on tensor cores): 64 query rows per block, key tiles of 64.
    FORWARD_MMA = k_attention_fwd_mma / qlemu_k_attention_fwd_mma {
        block: super::launch::BlockShape::Exact(128, 1, 1)
    };
    /// `k_attention_bwd_delta`: `delta = rowsum(do ∘ o)`, one warp per row.
    BACKWARD_DELTA = k_attention_bwd_delta / qlemu_k_attention_bwd_delta {
        block: super::launch::BlockShape::Exact(128, 1, 1)
    };
    /// `k_attention_bwd_dq` (f32): 8 query rows per block, walking the key tiles like the forward.
    BACKWARD_DQ = k_attention_bwd_dq / qlemu_k_attention_bwd_dq {
        block: super::launch::BlockShape::Exact(128, 1, 1)
    };
    /// `k_attention_bwd_dkdv` (f32): 32 keys per block, summing the GQA group's query heads in
    /// order.
    BACKWARD_DKDV = k_attention_bwd_dkdv / qlemu_k_attention_bwd_dkdv {
        block: super::launch::BlockShape::Exact(128, 1, 1)
    };
    /// `k_attention_bwd_dq_mma` (bf16 on tensor cores): 64 query rows per block, key tiles of 32.
    BACKWARD_DQ_MMA = k_attention_bwd_dq_mma / qlemu_k_attention_bwd_dq_mma {
        block: super::launch::BlockShape::Exact(128, 1, 1)
    };
    /// `k_attention_bwd_dkdv_mma` (bf16 on tensor cores): 64 keys per block, query tiles of 16.
    BACKWARD_DKDV_MMA = k_attention_bwd_dkdv_mma / qlemu_k_attention_bwd_dkdv_mma {
        block: super::launch::BlockShape::Exact(128, 1, 1)
    };
}

/// Widest head the kernels take (their shared tiles are sized for it).
pub const MAX_HEAD_DIM: usize = 128;
const THREADS: u32 = 128;
const FWD_QUERY_ROWS: usize = 16;
const DQ_QUERY_ROWS: usize = 8;
const DKDV_KEYS: usize = 32;
/// Query rows (dq) or keys (dk/dv) per block of the tensor-core kernels.
const MMA_ROWS: usize = 64;
const DELTA_ROWS_PER_BLOCK: usize = 4;
/// Grid-y/z limit (heads and batch go there).
const MAX_GRID_YZ: usize = 65535;

/// Validated sizes of one attention call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionShape {
    pub batch: usize,
    pub q_heads: usize,
    pub kv_heads: usize,
    pub seq: usize,
    pub head_dim: usize,
}

impl AttentionShape {
    /// Checks the sizes: all non-zero, `q_heads` a multiple of `kv_heads`, `head_dim` a multiple
    /// of 8 up to [`MAX_HEAD_DIM`], and every tensor addressable by the kernels.
    pub fn new(
        batch: usize,
        q_heads: usize,
        kv_heads: usize,
        seq: usize,
        head_dim: usize,
    ) -> Result<Self> {
        let bad = |reason: String| Err(Error::invalid("attention", reason));
        if batch == 0 || q_heads == 0 || kv_heads == 0 || seq == 0 {
            return bad(format!(
                "batch {batch}, q_heads {q_heads}, kv_heads {kv_heads} and seq {seq} must be >= 1"
            ));
        }
        if !q_heads.is_multiple_of(kv_heads) {
            return bad(format!(
                "q_heads {q_heads} is not a multiple of kv_heads {kv_heads}"
            ));
        }
        if head_dim == 0 || !head_dim.is_multiple_of(8) || head_dim > MAX_HEAD_DIM {
            return bad(format!(
                "head_dim {head_dim} must be a multiple of 8 in 8..={MAX_HEAD_DIM}"
            ));
        }
        if batch > MAX_GRID_YZ || q_heads > MAX_GRID_YZ {
            return bad(format!(
                "batch {batch} and q_heads {q_heads} must be <= {MAX_GRID_YZ}"
            ));
        }
        let elems = (batch as u128) * (q_heads as u128) * (seq as u128) * (head_dim as u128);
        let delta_blocks = (batch as u128 * q_heads as u128 * seq as u128).div_ceil(4);
        if seq > i32::MAX as usize
            || elems > (i64::MAX / 4) as u128
            || delta_blocks > i32::MAX as u128
        {
            return bad(format!(
                "[{batch}, {q_heads}, {seq}, {head_dim}] is too large"
            ));
        }
        Ok(AttentionShape {
            batch,
            q_heads,
            kv_heads,
            seq,
            head_dim,
        })
    }

    /// Elements of q, o, do and dq: `B · Hq · T · D`.
    pub fn q_len(&self) -> usize {
        self.batch * self.q_heads * self.seq * self.head_dim
    }

    /// Elements of k, v, dk and dv: `B · Hkv · T · D`.
    pub fn kv_len(&self) -> usize {
        self.batch * self.kv_heads * self.seq * self.head_dim
    }

    /// Query rows, the length of lse and delta: `B · Hq · T`.
    pub fn rows(&self) -> usize {
        self.batch * self.q_heads * self.seq
    }

    /// Query heads per kv head.
    pub fn group(&self) -> usize {
        self.q_heads / self.kv_heads
    }

    /// The score scale, `head_dim ** -0.5` rounded to f32 as transformers applies it.
    pub fn scale(&self) -> f32 {
        (self.head_dim as f64).powf(-0.5) as f32
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

    fn check_inputs(&self, op: &'static str, q: usize, k: usize, v: usize) -> Result<()> {
        self.check_len(op, "q", q, self.q_len())?;
        self.check_len(op, "k", k, self.kv_len())?;
        self.check_len(op, "v", v, self.kv_len())
    }

    fn check_mask_len(&self, op: &'static str, mask: Option<usize>) -> Result<()> {
        match mask {
            Some(len) => self.check_len(op, "key_mask", len, self.batch * self.seq),
            None => Ok(()),
        }
    }
}

/// q, k, v and the optional key padding mask (`[B, T]`, 1 = attend, 0 = padding) of one call.
#[derive(Clone, Copy, Debug)]
pub struct AttentionInputs<'a, T> {
    pub q: &'a [T],
    pub k: &'a [T],
    pub v: &'a [T],
    pub key_mask: Option<&'a [u8]>,
}

impl<T> AttentionInputs<'_, T> {
    fn validate(&self, op: &'static str, shape: &AttentionShape) -> Result<()> {
        shape.check_inputs(op, self.q.len(), self.k.len(), self.v.len())?;
        shape.check_mask_len(op, self.key_mask.map(<[u8]>::len))?;
        match self.key_mask.and_then(|m| m.iter().find(|&&x| x > 1)) {
            Some(x) => Err(Error::invalid(
                op,
                format!("key_mask holds {x}, not 0 or 1"),
            )),
            None => Ok(()),
        }
    }
}

fn check_dtype<T: Element>(op: &'static str) -> Result<()> {
    match T::DTYPE {
        QlDtype::QL_DTYPE_F32 | QlDtype::QL_DTYPE_BF16 => Ok(()),
        other => Err(Error::invalid(
            op,
            format!("{other:?} is not supported (f32 or bf16)"),
        )),
    }
}

fn launch(blocks: (usize, usize, usize)) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (blocks.0 as u32, blocks.1 as u32, blocks.2 as u32),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// The forward kernel for element type `T` and its launch geometry: `k_attention_fwd_mma` for
/// bf16, `k_attention_fwd` for f32.
pub fn forward_launch<T: Element>(shape: &AttentionShape) -> (Kernel, LaunchConfig) {
    let (kernel, rows) = match T::DTYPE {
        QlDtype::QL_DTYPE_BF16 => (FORWARD_MMA, MMA_ROWS),
        _ => (FORWARD, FWD_QUERY_ROWS),
    };
    let cfg = launch((shape.seq.div_ceil(rows), shape.q_heads, shape.batch));
    (kernel, cfg)
}

/// Launch geometry of `k_attention_bwd_delta`.
pub fn backward_delta_launch(shape: &AttentionShape) -> LaunchConfig {
    launch((shape.rows().div_ceil(DELTA_ROWS_PER_BLOCK), 1, 1))
}

/// The backward's three launches for element type `T`, in order: delta, then dq and dk/dv
/// (`_mma` kernels on tensor cores for bf16, CUDA-core kernels for f32).
pub fn backward_launches<T: Element>(shape: &AttentionShape) -> [(Kernel, LaunchConfig); 3] {
    let ((dq, dq_rows), (dkdv, dkdv_keys)) = match T::DTYPE {
        QlDtype::QL_DTYPE_BF16 => ((BACKWARD_DQ_MMA, MMA_ROWS), (BACKWARD_DKDV_MMA, MMA_ROWS)),
        _ => ((BACKWARD_DQ, DQ_QUERY_ROWS), (BACKWARD_DKDV, DKDV_KEYS)),
    };
    let (t, b) = (shape.seq, shape.batch);
    [
        (BACKWARD_DELTA, backward_delta_launch(shape)),
        (dq, launch((t.div_ceil(dq_rows), shape.q_heads, b))),
        (dkdv, launch((t.div_ceil(dkdv_keys), shape.kv_heads, b))),
    ]
}

// ---------------------------------------------------------------------------------------------
// Reference (plain Rust, f32, one query row at a time, the whole score row materialised).

fn widen<T: Element>(v: &[T]) -> Vec<f32> {
    v.iter().map(|x| x.to_f32()).collect()
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// The attention probabilities of query row `i` over all `T` keys of one (batch, head) and the
/// row's logsumexp: softmax of the visible scaled scores, or uniform when nothing is visible.
fn probabilities(
    q_row: &[f32],
    keys: &[f32],
    keep: &dyn Fn(usize) -> bool,
    i: usize,
    shape: &AttentionShape,
) -> (Vec<f32>, f32) {
    let (t, d) = (shape.seq, shape.head_dim);
    let visible: Vec<usize> = (0..=i).filter(|&j| keep(j)).collect();
    if visible.is_empty() {
        return (vec![1.0 / t as f32; t], (t as f32).ln());
    }
    let mut scores = vec![f32::NEG_INFINITY; t];
    for &j in &visible {
        scores[j] = dot(q_row, &keys[j * d..(j + 1) * d]) * shape.scale();
    }
    let max = visible
        .iter()
        .map(|&j| scores[j])
        .fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f32> = scores.iter().map(|&s| (s - max).exp()).collect();
    let sum: f32 = exps.iter().sum();
    (exps.iter().map(|e| e / sum).collect(), max + sum.ln())
}

/// Offsets of (batch, head) blocks of `[B, heads, T, D]`.
fn head_block(shape: &AttentionShape, heads: usize, b: usize, h: usize) -> std::ops::Range<usize> {
    let len = shape.seq * shape.head_dim;
    let start = (b * heads + h) * len;
    start..start + len
}

fn key_keep<'a>(mask: Option<&'a [u8]>, b: usize, seq: usize) -> impl Fn(usize) -> bool + 'a {
    move |j| mask.is_none_or(|m| m[b * seq + j] != 0)
}

/// Forward reference: `(o, lse)` in f32, `o` before its rounding to `T`.
pub fn attention_forward_ref<T: Element>(
    shape: &AttentionShape,
    inputs: &AttentionInputs<'_, T>,
) -> Result<(Vec<f32>, Vec<f32>)> {
    const OP: &str = "attention_forward_ref";
    inputs.validate(OP, shape)?;
    let (q, k, v) = (widen(inputs.q), widen(inputs.k), widen(inputs.v));
    let (t, d) = (shape.seq, shape.head_dim);
    let mut o = vec![0f32; shape.q_len()];
    let mut lse = vec![0f32; shape.rows()];
    for b in 0..shape.batch {
        let keep = key_keep(inputs.key_mask, b, t);
        for h in 0..shape.q_heads {
            let qs = &q[head_block(shape, shape.q_heads, b, h)];
            let kv_range = head_block(shape, shape.kv_heads, b, h / shape.group());
            let (ks, vs) = (&k[kv_range.clone()], &v[kv_range]);
            let out_start = head_block(shape, shape.q_heads, b, h).start;
            for i in 0..t {
                let (probs, row_lse) = probabilities(&qs[i * d..(i + 1) * d], ks, &keep, i, shape);
                lse[(b * shape.q_heads + h) * t + i] = row_lse;
                let out = &mut o[out_start + i * d..out_start + (i + 1) * d];
                for (j, &p) in probs.iter().enumerate() {
                    for (o_c, &v_c) in out.iter_mut().zip(&vs[j * d..(j + 1) * d]) {
                        *o_c += p * v_c;
                    }
                }
            }
        }
    }
    Ok((o, lse))
}

/// Backward reference: `(dq, dk, dv)` in f32 from the upstream gradient `d_o` and the forward's
/// output `o` (as stored, in `T`). With `p` the row's probabilities (recomputed),
/// `dp[j] = do·v[j]`, `ds[j] = p[j] (dp[j] − do·o)`: `dq = scale Σ_j ds[j] k[j]`,
/// `dk[j] += scale ds[j] q`, `dv[j] += p[j] do`, dk and dv summed over each kv head's query heads.
pub fn attention_backward_ref<T: Element>(
    shape: &AttentionShape,
    inputs: &AttentionInputs<'_, T>,
    o: &[T],
    d_o: &[T],
) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
    const OP: &str = "attention_backward_ref";
    inputs.validate(OP, shape)?;
    shape.check_len(OP, "o", o.len(), shape.q_len())?;
    shape.check_len(OP, "d_o", d_o.len(), shape.q_len())?;
    let (q, k, v) = (widen(inputs.q), widen(inputs.k), widen(inputs.v));
    let (o, d_o) = (widen(o), widen(d_o));
    let (t, d, scale) = (shape.seq, shape.head_dim, shape.scale());
    let mut dq = vec![0f32; shape.q_len()];
    let mut dk = vec![0f32; shape.kv_len()];
    let mut dv = vec![0f32; shape.kv_len()];
    for b in 0..shape.batch {
        let keep = key_keep(inputs.key_mask, b, t);
        for h in 0..shape.q_heads {
            let q_range = head_block(shape, shape.q_heads, b, h);
            let kv_range = head_block(shape, shape.kv_heads, b, h / shape.group());
            let (ks, vs) = (&k[kv_range.clone()], &v[kv_range.clone()]);
            for i in 0..t {
                let row = q_range.start + i * d..q_range.start + (i + 1) * d;
                let (q_i, do_i) = (&q[row.clone()], &d_o[row.clone()]);
                let (probs, _) = probabilities(q_i, ks, &keep, i, shape);
                let delta = dot(do_i, &o[row.clone()]);
                for (j, &p) in probs.iter().enumerate() {
                    let key = j * d..(j + 1) * d;
                    let ds = p * (dot(do_i, &vs[key.clone()]) - delta);
                    let kv_row = kv_range.start + j * d;
                    for c in 0..d {
                        dq[row.start + c] += scale * ds * ks[key.start + c];
                        dk[kv_row + c] += scale * ds * q_i[c];
                        dv[kv_row + c] += p * do_i[c];
                    }
                }
            }
        }
    }
    Ok((dq, dk, dv))
}

type QkvPtrs = (
    *const std::ffi::c_void,
    *const std::ffi::c_void,
    *const std::ffi::c_void,
);

fn forward_params<T: Element>(
    shape: &AttentionShape,
    (q, k, v): QkvPtrs,
    key_mask: *const u8,
    o: *mut std::ffi::c_void,
    lse: *mut f32,
) -> QlAttentionForwardParams {
    QlAttentionForwardParams {
        q,
        k,
        v,
        key_mask,
        o,
        lse,
        batch: shape.batch as i32,
        q_heads: shape.q_heads as i32,
        kv_heads: shape.kv_heads as i32,
        seq: shape.seq as i32,
        head_dim: shape.head_dim as i32,
        scale: shape.scale(),
        dtype: T::DTYPE as i32,
    }
}

/// The size fields of the backward parameters (pointers null).
fn backward_sizes<T: Element>(shape: &AttentionShape) -> QlAttentionBackwardParams {
    QlAttentionBackwardParams {
        batch: shape.batch as i32,
        q_heads: shape.q_heads as i32,
        kv_heads: shape.kv_heads as i32,
        seq: shape.seq as i32,
        head_dim: shape.head_dim as i32,
        scale: shape.scale(),
        dtype: T::DTYPE as i32,
        ..Default::default()
    }
}

// ---------------------------------------------------------------------------------------------
// Launchers: one per kernel, generic over the launch device (docs/ARCHITECTURE.md, "Launch
// devices"). `*_into` writes caller-owned buffers; the plain form allocates its outputs.

/// q, k, v and the optional key padding mask (`[B, T]`) of one call, as buffers on device `D`.
/// Mask values are not checked on the host (they may live on the device): any non-zero byte
/// attends.
pub struct DeviceAttentionInputs<'a, D, T> {
    pub q: &'a dyn KernelArg<D, T>,
    pub k: &'a dyn KernelArg<D, T>,
    pub v: &'a dyn KernelArg<D, T>,
    pub key_mask: Option<&'a dyn KernelArg<D, u8>>,
}

impl<D, T> Clone for DeviceAttentionInputs<'_, D, T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<D, T> Copy for DeviceAttentionInputs<'_, D, T> {}

impl<D, T> DeviceAttentionInputs<'_, D, T> {
    fn validate(&self, op: &'static str, shape: &AttentionShape) -> Result<()> {
        shape.check_inputs(op, self.q.len(), self.k.len(), self.v.len())?;
        shape.check_mask_len(op, self.key_mask.map(|m| m.len()))
    }
}

impl<'a, T> DeviceAttentionInputs<'a, Emulator, T> {
    /// Host inputs (as the reference takes them) for the emulator.
    pub fn host(inputs: &'a AttentionInputs<'_, T>) -> Self {
        DeviceAttentionInputs {
            q: &inputs.q,
            k: &inputs.k,
            v: &inputs.v,
            key_mask: inputs
                .key_mask
                .as_ref()
                .map(|m| m as &dyn KernelArg<Emulator, u8>),
        }
    }
}

/// Forward (`k_attention_fwd`, or `k_attention_fwd_mma` for bf16) into caller-owned `o` (q's
/// shape) and `lse` `[B, Hq, T]`.
pub fn attention_forward_into<D: LaunchDevice, T: Element>(
    dev: &D,
    shape: &AttentionShape,
    inputs: &DeviceAttentionInputs<'_, D, T>,
    o: &mut (impl KernelArgMut<D, T> + ?Sized),
    lse: &mut (impl KernelArgMut<D, f32> + ?Sized),
) -> Result<()> {
    const OP: &str = "attention_forward";
    check_dtype::<T>(OP)?;
    inputs.validate(OP, shape)?;
    shape.check_len(OP, "o", o.len(), shape.q_len())?;
    shape.check_len(OP, "lse", lse.len(), shape.rows())?;
    let (qp, kp, vp) = (inputs.q.ptr(dev), inputs.k.ptr(dev), inputs.v.ptr(dev));
    let mp = opt_ptr(inputs.key_mask, dev);
    let (op, lp) = (o.ptr_mut(dev), lse.ptr_mut(dev));
    let params = forward_params::<T>(
        shape,
        (qp.void(), kp.void(), vp.void()),
        mp.get(),
        op.void_mut(),
        lp.get_mut(),
    );
    let (kernel, cfg) = forward_launch::<T>(shape);
    // SAFETY: q and o hold q_len elements, k and v kv_len, lse rows and the mask (if any) B·T,
    // as validated above; the pointers' guards keep every buffer alive and ordered until the
    // launch is queued.
    unsafe { dev.launch(&kernel, &cfg, &params) }
}

/// Forward (`k_attention_fwd`, or `k_attention_fwd_mma` for bf16). Returns `(o, lse)`.
pub fn attention_forward<D: LaunchDevice, T: Element>(
    dev: &D,
    shape: &AttentionShape,
    inputs: &DeviceAttentionInputs<'_, D, T>,
) -> Result<(D::Buffer<T>, D::Buffer<f32>)> {
    // SAFETY: the kernel writes every element of both buffers.
    let (mut o, mut lse) = unsafe {
        (
            dev.alloc::<T>(shape.q_len())?,
            dev.alloc::<f32>(shape.rows())?,
        )
    };
    attention_forward_into(dev, shape, inputs, &mut o, &mut lse)?;
    Ok((o, lse))
}

/// The backward's outputs and its scratch on device `D`: dq (q's shape), dk and dv (k's shape),
/// and `delta` `[B, Hq, T]` f32.
pub struct DeviceAttentionGrads<D: LaunchDevice, T: Element> {
    pub dq: D::Buffer<T>,
    pub dk: D::Buffer<T>,
    pub dv: D::Buffer<T>,
    pub delta: D::Buffer<f32>,
}

impl<D: LaunchDevice, T: Element> DeviceAttentionGrads<D, T> {
    /// Buffers for `shape` (uninitialised on CUDA: the backward writes every element).
    pub fn alloc(dev: &D, shape: &AttentionShape) -> Result<Self> {
        // SAFETY: every buffer is fully written by the backward before anyone reads it.
        unsafe {
            Ok(DeviceAttentionGrads {
                dq: dev.alloc::<T>(shape.q_len())?,
                dk: dev.alloc::<T>(shape.kv_len())?,
                dv: dev.alloc::<T>(shape.kv_len())?,
                delta: dev.alloc::<f32>(shape.rows())?,
            })
        }
    }
}

/// Backward (`k_attention_bwd_delta`, then `_dq` and `_dkdv`, `_mma` for bf16) from the forward's
/// `o` and `lse` and the upstream gradient `d_o`, into `grads` (see
/// [`DeviceAttentionGrads::alloc`]).
pub fn attention_backward_into<D: LaunchDevice, T: Element>(
    dev: &D,
    shape: &AttentionShape,
    inputs: &DeviceAttentionInputs<'_, D, T>,
    o: &(impl KernelArg<D, T> + ?Sized),
    lse: &(impl KernelArg<D, f32> + ?Sized),
    d_o: &(impl KernelArg<D, T> + ?Sized),
    grads: &mut DeviceAttentionGrads<D, T>,
) -> Result<()> {
    const OP: &str = "attention_backward";
    check_dtype::<T>(OP)?;
    inputs.validate(OP, shape)?;
    shape.check_len(OP, "o", o.len(), shape.q_len())?;
    shape.check_len(OP, "d_o", d_o.len(), shape.q_len())?;
    shape.check_len(OP, "lse", lse.len(), shape.rows())?;
    shape.check_len(OP, "dq", grads.dq.len(), shape.q_len())?;
    shape.check_len(OP, "dk", grads.dk.len(), shape.kv_len())?;
    shape.check_len(OP, "dv", grads.dv.len(), shape.kv_len())?;
    shape.check_len(OP, "delta", grads.delta.len(), shape.rows())?;
    let (qp, kp, vp) = (inputs.q.ptr(dev), inputs.k.ptr(dev), inputs.v.ptr(dev));
    let mp = opt_ptr(inputs.key_mask, dev);
    let (op, lp, dop) = (o.ptr(dev), lse.ptr(dev), d_o.ptr(dev));
    let DeviceAttentionGrads { dq, dk, dv, delta } = grads;
    let (deltap, dqp) = (delta.ptr_mut(dev), dq.ptr_mut(dev));
    let (dkp, dvp) = (dk.ptr_mut(dev), dv.ptr_mut(dev));
    let params = QlAttentionBackwardParams {
        q: qp.void(),
        k: kp.void(),
        v: vp.void(),
        key_mask: mp.get(),
        o: op.void(),
        d_o: dop.void(),
        lse: lp.get(),
        delta: deltap.get_mut(),
        dq: dqp.void_mut(),
        dk: dkp.void_mut(),
        dv: dvp.void_mut(),
        ..backward_sizes::<T>(shape)
    };
    for (kernel, cfg) in backward_launches::<T>(shape) {
        // SAFETY: q, o, d_o and dq hold q_len elements, k, v, dk and dv kv_len, lse and delta
        // rows and the mask (if any) B·T, as validated above; the launches run in order on the
        // device (delta is written before it is read), and the guards keep every buffer alive
        // and ordered until all three are queued.
        unsafe { dev.launch(&kernel, &cfg, &params)? };
    }
    Ok(())
}

/// Backward from the forward's `o` and `lse` and the upstream gradient `d_o`. Returns
/// `(dq, dk, dv)`.
#[allow(clippy::type_complexity)]
pub fn attention_backward<D: LaunchDevice, T: Element>(
    dev: &D,
    shape: &AttentionShape,
    inputs: &DeviceAttentionInputs<'_, D, T>,
    o: &(impl KernelArg<D, T> + ?Sized),
    lse: &(impl KernelArg<D, f32> + ?Sized),
    d_o: &(impl KernelArg<D, T> + ?Sized),
) -> Result<(D::Buffer<T>, D::Buffer<T>, D::Buffer<T>)> {
    let mut grads = DeviceAttentionGrads::alloc(dev, shape)?;
    attention_backward_into(dev, shape, inputs, o, lse, d_o, &mut grads)?;
    let DeviceAttentionGrads { dq, dk, dv, .. } = grads;
    Ok((dq, dk, dv))
}

/// The reference against the Llama runtime itself: its additive mask and `repeat_kv` with the
/// softmax sequence of `LlamaModel::attention`, and candle's autograd through that graph.
#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::llama::{repeat_kv, LlamaModel};
    use crate::model::{LlamaConfig, LlamaWeights};
    use crate::testing::normal_vector;
    use crate::tolerance::{lookup, Dtype, Op};
    use candle_core::{DType, Device, Tensor, Var, D};

    /// A one-layer model whose attention geometry is `shape`, for its mask and rounding rules.
    fn model(shape: &AttentionShape, dtype: DType) -> LlamaModel {
        let config = LlamaConfig::from_json_str(&format!(
            r#"{{"model_type": "llama", "hidden_size": {h}, "intermediate_size": 16,
                "num_hidden_layers": 1, "num_attention_heads": {qh}, "num_key_value_heads": {kvh},
                "head_dim": {d}, "vocab_size": 8, "rms_norm_eps": 1e-5}}"#,
            h = shape.q_heads * shape.head_dim,
            qh = shape.q_heads,
            kvh = shape.kv_heads,
            d = shape.head_dim,
        ))
        .unwrap();
        let weights = LlamaWeights::random(&config, 0.02, 0, dtype, &Device::Cpu).unwrap();
        LlamaModel::new(config, weights).unwrap()
    }

    /// `LlamaModel::attention` from q, k, v `[B, heads, T, D]` (f32 tensors holding values of
    /// the model's dtype) on: the runtime's mask, GQA and rounding, returning o `[B, Hq, T, D]`.
    fn runtime_attention(
        m: &LlamaModel,
        shape: &AttentionShape,
        (q, k, v): (&Tensor, &Tensor, &Tensor),
        keep: &[bool],
    ) -> Tensor {
        let mask = m.additive_mask(keep, shape.batch, 0, shape.seq).unwrap();
        let k = repeat_kv(k, shape.group()).unwrap();
        let v = repeat_kv(v, shape.group()).unwrap();
        let scores = m
            .round(q.matmul(&k.t().unwrap().contiguous().unwrap()).unwrap())
            .unwrap();
        let scores = m
            .round((scores * f64::from(shape.scale())).unwrap())
            .unwrap();
        let scores = m.round(scores.broadcast_add(&mask).unwrap()).unwrap();
        // The max only stabilises the exponent; detached, as it carries no gradient.
        let max = scores.max_keepdim(D::Minus1).unwrap().detach();
        let exp = scores.broadcast_sub(&max).unwrap().exp().unwrap();
        let probs = m
            .round(
                exp.broadcast_div(&exp.sum_keepdim(D::Minus1).unwrap())
                    .unwrap(),
            )
            .unwrap();
        m.round(probs.matmul(&v).unwrap()).unwrap()
    }

    /// Batch row 0 left-padded by 3 (its first 3 query rows see no key), row 1 with a pad hole.
    fn keep_mask(shape: &AttentionShape) -> Vec<u8> {
        let t = shape.seq;
        let mut keep = vec![1u8; shape.batch * t];
        keep[..3.min(t)].fill(0);
        if shape.batch > 1 && t > 4 {
            keep[t + 2] = 0;
        }
        keep
    }

    fn tensor(v: &[f32], shape: &AttentionShape, heads: usize) -> Tensor {
        let dims = (shape.batch, heads, shape.seq, shape.head_dim);
        Tensor::from_slice(v, dims, &Device::Cpu).unwrap()
    }

    fn flat(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    }

    fn check(what: &str, op: Op, dtype: Dtype, got: &[f32], want: &[f32]) {
        if let Err(e) = lookup(op, dtype).check(got, want) {
            panic!("{what}: {e}");
        }
    }

    fn runtime_forward_parity<T: Element>(dtype: DType, tol: Dtype) {
        let shape = AttentionShape::new(2, 6, 2, 9, 16).unwrap();
        let m = model(&shape, dtype);
        let round = |v: Vec<f32>| -> Vec<T> { v.into_iter().map(T::from_f32).collect() };
        let q: Vec<T> = round(normal_vector(shape.q_len(), 1.0, 1));
        let k: Vec<T> = round(normal_vector(shape.kv_len(), 1.0, 2));
        let v: Vec<T> = round(normal_vector(shape.kv_len(), 1.0, 3));
        let mask = keep_mask(&shape);
        let keep: Vec<bool> = mask.iter().map(|&x| x != 0).collect();
        let (qt, kt, vt) = (
            tensor(&widen(&q), &shape, shape.q_heads),
            tensor(&widen(&k), &shape, shape.kv_heads),
            tensor(&widen(&v), &shape, shape.kv_heads),
        );
        let want = flat(&runtime_attention(&m, &shape, (&qt, &kt, &vt), &keep));
        let inputs = AttentionInputs {
            q: &q,
            k: &k,
            v: &v,
            key_mask: Some(&mask),
        };
        let (o, _) = attention_forward_ref(&shape, &inputs).unwrap();
        let o: Vec<f32> = o.into_iter().map(|x| T::from_f32(x).to_f32()).collect();
        check("runtime attention", Op::AttentionRuntime, tol, &o, &want);
    }

    #[test]
    fn reference_forward_matches_runtime_attention_f32() {
        runtime_forward_parity::<f32>(DType::F32, Dtype::F32);
    }

    #[test]
    fn reference_forward_matches_runtime_attention_bf16() {
        runtime_forward_parity::<half::bf16>(DType::BF16, Dtype::BF16);
    }

    #[test]
    fn reference_backward_matches_candle_autograd_through_runtime_attention() {
        let shape = AttentionShape::new(2, 6, 2, 7, 8).unwrap();
        let m = model(&shape, DType::F32);
        let (q, k, v) = (
            normal_vector(shape.q_len(), 1.0, 4),
            normal_vector(shape.kv_len(), 1.0, 5),
            normal_vector(shape.kv_len(), 1.0, 6),
        );
        let d_o = normal_vector(shape.q_len(), 1.0, 7);
        let mask = keep_mask(&shape);
        let keep: Vec<bool> = mask.iter().map(|&x| x != 0).collect();
        let qv = Var::from_tensor(&tensor(&q, &shape, shape.q_heads)).unwrap();
        let kv = Var::from_tensor(&tensor(&k, &shape, shape.kv_heads)).unwrap();
        let vv = Var::from_tensor(&tensor(&v, &shape, shape.kv_heads)).unwrap();
        let out = runtime_attention(
            &m,
            &shape,
            (qv.as_tensor(), kv.as_tensor(), vv.as_tensor()),
            &keep,
        );
        let weights = tensor(&d_o, &shape, shape.q_heads);
        let grads = (&out * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let grad = |var: &Var| flat(grads.get(var.as_tensor()).unwrap());
        let inputs = AttentionInputs {
            q: &q,
            k: &k,
            v: &v,
            key_mask: Some(&mask),
        };
        let (o, _) = attention_forward_ref(&shape, &inputs).unwrap();
        let (dq, dk, dv) = attention_backward_ref(&shape, &inputs, &o, &d_o).unwrap();
        check("dq", Op::AttentionRuntime, Dtype::F32, &dq, &grad(&qv));
        check("dk", Op::AttentionRuntime, Dtype::F32, &dk, &grad(&kv));
        check("dv", Op::AttentionRuntime, Dtype::F32, &dv, &grad(&vv));
        // The left-padded rows really are in the test, with non-zero gradient through them.
        assert!(dq[..shape.head_dim].iter().any(|&x| x != 0.0));
    }
}
