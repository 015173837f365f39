//! Launchers and plain-Rust references for `kernels/cross_entropy.cu`: causal-LM cross-entropy over
//! a chunk of logit rows `[rows, vocab]` (f32 or bf16) with labels `[rows]` (i32, -100 ignored).
//! The forward returns per-row losses and logsumexps `[rows]` f32; the backward overwrites the
//! logits in place with `(softmax - onehot(label)) * grad_scale`, so a chunk needs no second
//! `[rows, vocab]` buffer.
//!
//! The loss of a batch is the sum of the per-row losses of all its chunks (on the host, in f64, in
//! row order, so it is deterministic) divided by the number of label tokens of the whole
//! accumulated batch ([`label_tokens`]); the backward's `grad_scale` is `dloss` over that count.

use super::abi::{QlCrossEntropyBackwardParams, QlCrossEntropyForwardParams, QlDtype};
use super::device::{KernelArg, KernelArgMut, LaunchDevice};
use super::launch::{declare_kernels, Element, LaunchConfig};
use crate::{Error, Result};

declare_kernels! {
    module "cross_entropy";
    /// `k_cross_entropy_fwd`: a block per row, online (max, sum-exp) reduced across the block.
    CROSS_ENTROPY_FORWARD = k_cross_entropy_fwd / qlemu_k_cross_entropy_fwd {
        block: super::launch::BlockShape::Warps { max_threads: 512 }
    };
    /// `k_cross_entropy_bwd`: a block per row, dlogits written over the logits.
    CROSS_ENTROPY_BACKWARD = k_cross_entropy_bwd / qlemu_k_cross_entropy_bwd {
        block: super::launch::BlockShape::Warps { max_threads: 512 }
    };
}

/// The label of a position that has no target (prompt, padding), as in PyTorch and Hugging Face.
pub const IGNORE_INDEX: i32 = -100;
/// Most threads per block (the kernels' `__launch_bounds__`).
const MAX_THREADS: u64 = 512;
/// Grid-x limit of every CUDA device we target.
const MAX_GRID_X: u64 = (1 << 31) - 1;

/// Validated sizes of a chunk of logits `[rows, vocab]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CrossEntropyShape {
    pub rows: usize,
    pub vocab: usize,
}

impl CrossEntropyShape {
    /// Checks `logits_len == labels_len × vocab` and the limits of the kernels' index types.
    pub fn new(
        op: &'static str,
        logits_len: usize,
        labels_len: usize,
        vocab: usize,
    ) -> Result<Self> {
        let bad = |reason: String| Err(Error::invalid(op, reason));
        if vocab == 0 || vocab > i32::MAX as usize {
            return bad(format!("vocab {vocab} outside 1..={}", i32::MAX));
        }
        if labels_len == 0 || labels_len as u64 > MAX_GRID_X {
            return bad(format!("{labels_len} rows outside 1..={MAX_GRID_X}"));
        }
        if labels_len.checked_mul(vocab) != Some(logits_len)
            || logits_len as u64 > i64::MAX as u64 / 4
        {
            return bad(format!(
                "logits have {logits_len} elements, expected {labels_len} rows × {vocab}"
            ));
        }
        Ok(CrossEntropyShape {
            rows: labels_len,
            vocab,
        })
    }

    fn check_len(&self, op: &'static str, what: &str, got: usize) -> Result<()> {
        if got == self.rows {
            Ok(())
        } else {
            Err(Error::invalid(
                op,
                format!("{what} has {got} elements, expected {} rows", self.rows),
            ))
        }
    }
}

/// Launch geometry of both kernels (every backend): one block per row, with threads enough for at
/// least eight 4-element vectors each, from one warp up to 512 threads.
pub fn cross_entropy_launch(shape: &CrossEntropyShape) -> LaunchConfig {
    let threads = (shape.vocab as u64)
        .div_ceil(32)
        .next_power_of_two()
        .clamp(32, MAX_THREADS);
    LaunchConfig::linear(shape.rows as u32, threads as u32)
}

fn check_dtype<T: Element>(op: &'static str) -> Result<()> {
    match T::DTYPE {
        QlDtype::QL_DTYPE_F32 | QlDtype::QL_DTYPE_BF16 => Ok(()),
        other => Err(Error::invalid(
            op,
            format!("logits must be f32 or bf16, not {other:?}"),
        )),
    }
}

fn check_labels(op: &'static str, labels: &[i32], vocab: usize) -> Result<()> {
    match labels
        .iter()
        .find(|&&l| l != IGNORE_INDEX && (l < 0 || l as usize >= vocab))
    {
        Some(l) => Err(Error::invalid(
            op,
            format!("label {l} is neither {IGNORE_INDEX} nor in 0..{vocab}"),
        )),
        None => Ok(()),
    }
}

fn check_grad_scale(op: &'static str, grad_scale: f32) -> Result<()> {
    if grad_scale.is_finite() {
        Ok(())
    } else {
        Err(Error::invalid(
            op,
            format!("grad_scale {grad_scale} must be finite"),
        ))
    }
}

/// Positions that count towards the loss (labels other than [`IGNORE_INDEX`]): the denominator
/// of the mean loss and of `grad_scale`.
pub fn label_tokens(labels: &[i32]) -> usize {
    labels.iter().filter(|&&l| l != IGNORE_INDEX).count()
}

// ---------------------------------------------------------------------------------------------
// References (plain Rust).

/// Forward reference in f64: per row `lse = max + ln Σ exp(x - max)` and `loss = lse - x[label]`,
/// each rounded once to f32; rows labelled -100 give loss 0 and lse 0. Returns `(losses, lse)`.
pub fn cross_entropy_forward_ref<T: Element>(
    logits: &[T],
    labels: &[i32],
    vocab: usize,
) -> Result<(Vec<f32>, Vec<f32>)> {
    const OP: &str = "cross_entropy_forward_ref";
    CrossEntropyShape::new(OP, logits.len(), labels.len(), vocab)?;
    check_dtype::<T>(OP)?;
    check_labels(OP, labels, vocab)?;
    let mut losses = Vec::with_capacity(labels.len());
    let mut lses = Vec::with_capacity(labels.len());
    for (row, &label) in logits.chunks_exact(vocab).zip(labels) {
        if label == IGNORE_INDEX {
            losses.push(0.0);
            lses.push(0.0);
            continue;
        }
        let x: Vec<f64> = row.iter().map(|v| v.to_f32() as f64).collect();
        let max = x.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let log_sum = x.iter().map(|&v| (v - max).exp()).sum::<f64>().ln();
        losses.push(((max - x[label as usize]) + log_sum) as f32);
        lses.push((max + log_sum) as f32);
    }
    Ok((losses, lses))
}

/// Backward reference in f32, as the kernel computes it from the forward's f32 `lse`:
/// `d = (exp(x - lse) - onehot(label)) * grad_scale`, 0 on rows labelled -100. Returns dlogits
/// before their rounding to `T`.
pub fn cross_entropy_backward_ref<T: Element>(
    logits: &[T],
    labels: &[i32],
    lse: &[f32],
    vocab: usize,
    grad_scale: f32,
) -> Result<Vec<f32>> {
    const OP: &str = "cross_entropy_backward_ref";
    let shape = CrossEntropyShape::new(OP, logits.len(), labels.len(), vocab)?;
    shape.check_len(OP, "lse", lse.len())?;
    check_dtype::<T>(OP)?;
    check_labels(OP, labels, vocab)?;
    check_grad_scale(OP, grad_scale)?;
    let mut d = Vec::with_capacity(logits.len());
    for ((row, &label), &l) in logits.chunks_exact(vocab).zip(labels).zip(lse) {
        if label == IGNORE_INDEX {
            d.resize(d.len() + vocab, 0.0);
            continue;
        }
        d.extend(row.iter().enumerate().map(|(c, x)| {
            let p = (x.to_f32() - l).exp();
            (if c == label as usize { p - 1.0 } else { p }) * grad_scale
        }));
    }
    Ok(d)
}

// ---------------------------------------------------------------------------------------------
// Launchers: one per kernel, generic over the launch device (docs/ARCHITECTURE.md, "Launch
// devices"). Labels are not checked on the host (they may live on the device): a label outside
// `0..vocab` other than -100 gives its row a NaN loss in the forward and fills its row with NaN in
// the backward (the kernels bound every logit read by the label check).

/// Forward (`k_cross_entropy_fwd`) into caller-owned `losses` and `lse` `[rows]` f32.
pub fn cross_entropy_forward_into<D: LaunchDevice, T: Element>(
    dev: &D,
    logits: &(impl KernelArg<D, T> + ?Sized),
    labels: &(impl KernelArg<D, i32> + ?Sized),
    vocab: usize,
    losses: &mut (impl KernelArgMut<D, f32> + ?Sized),
    lse: &mut (impl KernelArgMut<D, f32> + ?Sized),
) -> Result<()> {
    const OP: &str = "cross_entropy_forward";
    let shape = CrossEntropyShape::new(OP, logits.len(), labels.len(), vocab)?;
    shape.check_len(OP, "losses", losses.len())?;
    shape.check_len(OP, "lse", lse.len())?;
    check_dtype::<T>(OP)?;
    let (xp, lp) = (logits.ptr(dev), labels.ptr(dev));
    let (lsep, lossp) = (lse.ptr_mut(dev), losses.ptr_mut(dev));
    let params = QlCrossEntropyForwardParams {
        logits: xp.void(),
        labels: lp.get(),
        lse: lsep.get_mut(),
        losses: lossp.get_mut(),
        rows: shape.rows as i64,
        vocab: vocab as i32,
        dtype: T::DTYPE as i32,
    };
    // SAFETY: logits hold rows × vocab elements, labels, lse and losses rows (validated above);
    // the kernel reads a logit at a label only after checking the label against vocab; the
    // pointers' guards keep every buffer alive and ordered until the launch is queued.
    unsafe {
        dev.launch(
            &CROSS_ENTROPY_FORWARD,
            &cross_entropy_launch(&shape),
            &params,
        )
    }
}

/// Forward (`k_cross_entropy_fwd`). Returns `(losses, lse)`, both `[rows]` f32.
pub fn cross_entropy_forward<D: LaunchDevice, T: Element>(
    dev: &D,
    logits: &(impl KernelArg<D, T> + ?Sized),
    labels: &(impl KernelArg<D, i32> + ?Sized),
    vocab: usize,
) -> Result<(D::Buffer<f32>, D::Buffer<f32>)> {
    let shape = CrossEntropyShape::new("cross_entropy_forward", logits.len(), labels.len(), vocab)?;
    // SAFETY: the kernel writes both outputs of every row (ignored rows included).
    let (mut losses, mut lse) =
        unsafe { (dev.alloc::<f32>(shape.rows)?, dev.alloc::<f32>(shape.rows)?) };
    cross_entropy_forward_into(dev, logits, labels, vocab, &mut losses, &mut lse)?;
    Ok((losses, lse))
}

/// Backward in place (`k_cross_entropy_bwd`): `logits` becomes dlogits.
pub fn cross_entropy_backward<D: LaunchDevice, T: Element>(
    dev: &D,
    logits: &mut (impl KernelArgMut<D, T> + ?Sized),
    labels: &(impl KernelArg<D, i32> + ?Sized),
    lse: &(impl KernelArg<D, f32> + ?Sized),
    vocab: usize,
    grad_scale: f32,
) -> Result<()> {
    const OP: &str = "cross_entropy_backward";
    let shape = CrossEntropyShape::new(OP, logits.len(), labels.len(), vocab)?;
    shape.check_len(OP, "lse", lse.len())?;
    check_dtype::<T>(OP)?;
    check_grad_scale(OP, grad_scale)?;
    let (xp, lp, lsep) = (logits.ptr_mut(dev), labels.ptr(dev), lse.ptr(dev));
    let params = QlCrossEntropyBackwardParams {
        logits: xp.void_mut(),
        labels: lp.get(),
        lse: lsep.get(),
        rows: shape.rows as i64,
        vocab: vocab as i32,
        grad_scale,
        dtype: T::DTYPE as i32,
    };
    // SAFETY: logits hold rows × vocab elements, labels and lse rows (validated above); the
    // pointers' guards keep every buffer alive and ordered until the launch is queued.
    unsafe {
        dev.launch(
            &CROSS_ENTROPY_BACKWARD,
            &cross_entropy_launch(&shape),
            &params,
        )
    }
}
