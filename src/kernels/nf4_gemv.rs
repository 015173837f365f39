//! Launchers and the plain-Rust reference for `kernels/nf4_gemv.cu`, the small-M (decode) GEMV
//! `y[M, N] = x[M, K] · dequant(W)[N, K]^T (+ bias[N])` for M ≤ 16: W in NF4 with f32 or
//! double-quantized scales over the flattened `[N, K]` weight, x and y f32 or bf16 (bias in y's
//! dtype), f32 accumulation and one rounding per output. One launcher over any [`LaunchDevice`].

use super::abi::{QlDtype, QlNf4GemvParams};
use super::device::{opt_ptr, Emulator, KernelArg, KernelArgMut, LaunchDevice};
use super::launch::{declare_kernels, Element, Kernel, LaunchConfig};
use super::nf4::{check_scales, Nf4Layout, Nf4Weight, ScaleLens};
use crate::{Error, Result};

declare_kernels! {
    module "nf4_gemv";
    /// `k_nf4_gemv`: M = 1 (decode), one warp per output row, four rows per block.
    GEMV = k_nf4_gemv / qlemu_k_nf4_gemv {
        block: super::launch::BlockShape::Exact(128, 1, 1)
    };
    /// `k_nf4_gemv_rows`: M in 2..=16, the same geometry, passes of up to 8 rows of x.
    GEMV_ROWS = k_nf4_gemv_rows / qlemu_k_nf4_gemv_rows {
        block: super::launch::BlockShape::Exact(128, 1, 1)
    };
}

/// Most rows of x (tokens) one launch takes; larger batches belong to the dequant-GEMM.
pub const MAX_M: usize = 16;
const THREADS: u32 = 128;
const ROWS_PER_BLOCK: u64 = THREADS as u64 / 32;
/// Grid-x limit of every CUDA device we target.
const MAX_GRID_X: u64 = (1 << 31) - 1;

/// Validated sizes of one GEMV: x `[m, k]`, W `[n, k]` in NF4, y `[m, n]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GemvShape {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    /// The flattened weight: `n · k` elements in blocks of `blocksize`.
    pub weight: Nf4Layout,
}

impl GemvShape {
    pub fn new(op: &'static str, m: usize, n: usize, k: usize, blocksize: usize) -> Result<Self> {
        if m == 0 || m > MAX_M {
            return Err(Error::invalid(op, format!("m = {m} outside 1..={MAX_M}")));
        }
        if n == 0 || k == 0 {
            return Err(Error::invalid(op, format!("empty weight [{n}, {k}]")));
        }
        let numel = n
            .checked_mul(k)
            .ok_or_else(|| Error::invalid(op, format!("weight [{n}, {k}] is too large")))?;
        let weight = Nf4Layout::new(op, numel, blocksize)?;
        // m ≤ 16 while n · k ≤ i64::MAX / 2 (checked above): keep m · k and m · n in i64 too.
        if (m as u64) * (n.max(k) as u64) > i64::MAX as u64 / 2 {
            return Err(Error::invalid(op, format!("[{m}, {n}, {k}] is too large")));
        }
        Ok(GemvShape { m, n, k, weight })
    }

    fn check_len(&self, op: &'static str, what: &str, got: usize, want: usize) -> Result<()> {
        if got == want {
            Ok(())
        } else {
            Err(Error::invalid(
                op,
                format!(
                    "{what} has {got} elements, expected {want} for m = {}, n = {}, k = {}",
                    self.m, self.n, self.k
                ),
            ))
        }
    }
}

/// The kernel for `shape`: [`GEMV`] for one row of x, [`GEMV_ROWS`] for more (registers are
/// allocated per kernel, so the decode path does not pay for the multi-row accumulators).
pub fn gemv_kernel(shape: &GemvShape) -> Kernel {
    if shape.m == 1 {
        GEMV
    } else {
        GEMV_ROWS
    }
}

/// Launch geometry of `k_nf4_gemv` and `k_nf4_gemv_rows` (shared by every backend): `ceil(n / 4)`
/// blocks of 128 threads.
pub fn gemv_launch(shape: &GemvShape) -> Result<LaunchConfig> {
    let blocks = (shape.n as u64).div_ceil(ROWS_PER_BLOCK);
    if blocks > MAX_GRID_X {
        return Err(Error::invalid(
            "nf4_gemv",
            format!("{blocks} blocks exceed the grid limit"),
        ));
    }
    let cfg = LaunchConfig::linear(blocks as u32, THREADS);
    // Both kernels take the same block (a warp per row, its early return uniform per warp).
    GEMV.check_launch(&cfg)?;
    GEMV_ROWS.check_launch(&cfg)?;
    Ok(cfg)
}

/// Buffer lengths one launch reads or writes.
struct Lens {
    x: usize,
    packed: usize,
    code: usize,
    bias: Option<usize>,
    y: usize,
}

fn validate(
    op: &'static str,
    x_dtype: QlDtype,
    y_dtype: QlDtype,
    m: usize,
    (n, k, blocksize): (usize, usize, usize),
    scales: ScaleLens,
    lens: Lens,
) -> Result<GemvShape> {
    for (what, dtype) in [("x", x_dtype), ("y", y_dtype)] {
        if !matches!(dtype, QlDtype::QL_DTYPE_F32 | QlDtype::QL_DTYPE_BF16) {
            return Err(Error::invalid(
                op,
                format!("{what} is {dtype:?}; f32 or bf16 expected"),
            ));
        }
    }
    let shape = GemvShape::new(op, m, n, k, blocksize)?;
    shape.check_len(op, "x", lens.x, m * k)?;
    shape.check_len(op, "packed", lens.packed, shape.weight.packed_bytes())?;
    shape.check_len(op, "code", lens.code, 16)?;
    // The kernel indexes nested blocks with a shift (every bitsandbytes nested blocksize is one).
    if let ScaleLens::Double {
        nested_blocksize, ..
    } = scales
    {
        if !nested_blocksize.is_power_of_two() {
            return Err(Error::invalid(
                op,
                format!("nested blocksize {nested_blocksize} is not a power of two"),
            ));
        }
    }
    check_scales(op, &shape.weight, scales)?;
    if let Some(bias) = lens.bias {
        shape.check_len(op, "bias", bias, n)?;
    }
    shape.check_len(op, "y", lens.y, m * n)?;
    Ok(shape)
}

fn base_params(shape: &GemvShape, x_dtype: QlDtype, y_dtype: QlDtype) -> QlNf4GemvParams {
    QlNf4GemvParams {
        n: shape.n as i64,
        k: shape.k as i64,
        m: shape.m as i32,
        blocksize: shape.weight.blocksize as i32,
        x_dtype: x_dtype as i32,
        y_dtype: y_dtype as i32,
        ..Default::default()
    }
}

/// [`validate`] for `w` and the lengths of x, the bias and y.
fn validate_args<D: LaunchDevice, X: Element, Y: Element>(
    op: &'static str,
    m: usize,
    w: &Nf4Weight<'_, D>,
    x: usize,
    bias: Option<usize>,
    y: usize,
) -> Result<GemvShape> {
    let lens = Lens {
        x,
        packed: w.packed.len(),
        code: w.code.len(),
        bias,
        y,
    };
    validate(
        op,
        X::DTYPE,
        Y::DTYPE,
        m,
        (w.n, w.k, w.blocksize),
        w.scales.lens(),
        lens,
    )
}

/// The reference: W dequantized with `crate::quant::nf4`, then a sequential f32 dot product per
/// output (plus the bias), unrounded: `[m, n]` f32.
pub fn nf4_gemv_ref<X: Element, Y: Element>(
    x: &[X],
    m: usize,
    w: &Nf4Weight<'_, Emulator>,
    bias: Option<&[Y]>,
) -> Result<Vec<f32>> {
    const OP: &str = "nf4_gemv_ref";
    validate_args::<_, X, Y>(
        OP,
        m,
        w,
        x.len(),
        bias.map(<[Y]>::len),
        m.saturating_mul(w.n),
    )?;
    let weight = w.dequantize_host(OP)?;
    let mut y = vec![0f32; m * w.n];
    for (x_row, y_row) in x.chunks_exact(w.k).zip(y.chunks_exact_mut(w.n)) {
        let x_row: Vec<f32> = x_row.iter().map(|v| v.to_f32()).collect();
        for (j, (out, w_row)) in y_row.iter_mut().zip(weight.chunks_exact(w.k)).enumerate() {
            let dot = x_row
                .iter()
                .zip(w_row)
                .fold(0f32, |acc, (a, b)| acc + a * b);
            *out = bias.map_or(dot, |b| dot + b[j].to_f32());
        }
    }
    Ok(y)
}

/// `y = x · dequant(W)^T (+ bias)` by `k_nf4_gemv` (m = 1) or `k_nf4_gemv_rows` into a
/// caller-owned `y` of `m · n` elements; x is `[m, k]`, the bias `[n]` in y's dtype.
pub fn nf4_gemv_into<D, X, Y, B>(
    dev: &D,
    x: &(impl KernelArg<D, X> + ?Sized),
    m: usize,
    w: &Nf4Weight<'_, D>,
    bias: Option<&B>,
    y: &mut (impl KernelArgMut<D, Y> + ?Sized),
) -> Result<()>
where
    D: LaunchDevice,
    X: Element,
    Y: Element,
    B: KernelArg<D, Y> + ?Sized,
{
    const OP: &str = "nf4_gemv";
    let shape = validate_args::<D, X, Y>(OP, m, w, x.len(), bias.map(|b| b.len()), y.len())?;
    let cfg = gemv_launch(&shape)?;
    let (xp, wp, bp, yp) = (
        x.ptr(dev),
        w.ptrs(dev),
        opt_ptr::<D, Y, B>(bias, dev),
        y.ptr_mut(dev),
    );
    let params = QlNf4GemvParams {
        x: xp.void(),
        packed: wp.packed.get(),
        code: wp.code.get(),
        absmax: wp.scales.absmax.get(),
        absmax_q: wp.scales.absmax_q.get(),
        nested_code: wp.scales.nested_code.get(),
        nested_absmax: wp.scales.nested_absmax.get(),
        bias: bp.void(),
        y: yp.void_mut(),
        nested_offset: wp.scales.nested_offset,
        nested_blocksize: wp.scales.nested_blocksize,
        ..base_params(&shape, X::DTYPE, Y::DTYPE)
    };
    // SAFETY: x, the weight's buffers, the bias and y have exactly the lengths the kernel indexes
    // for `shape` (validated above); the pointers' guards keep them alive and ordered until the
    // launch is queued.
    unsafe { dev.launch(&gemv_kernel(&shape), &cfg, &params) }
}

/// [`nf4_gemv_into`] into a new buffer `[m, n]`.
pub fn nf4_gemv<D, X, Y, B>(
    dev: &D,
    x: &(impl KernelArg<D, X> + ?Sized),
    m: usize,
    w: &Nf4Weight<'_, D>,
    bias: Option<&B>,
) -> Result<D::Buffer<Y>>
where
    D: LaunchDevice,
    X: Element,
    Y: Element,
    B: KernelArg<D, Y> + ?Sized,
{
    let shape = GemvShape::new("nf4_gemv", m, w.n, w.k, w.blocksize)?;
    // SAFETY: the kernel writes every element of y.
    let mut y = unsafe { dev.alloc::<Y>(shape.m * shape.n)? };
    nf4_gemv_into(dev, x, m, w, bias, &mut y)?;
    Ok(y)
}
