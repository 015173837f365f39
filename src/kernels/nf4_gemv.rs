//! Launchers and the plain-Rust reference for `kernels/nf4_gemv.cu`, the small-M (decode) GEMV
//! `y[M, N] = x[M, K] · dequant(W)[N, K]^T (+ bias[N])` for M ≤ 16: W in NF4 with f32 or
//! double-quantized scales over the flattened `[N, K]` weight, x and y f32 or bf16 (bias in y's
//! dtype), f32 accumulation and one rounding per output.

use super::abi::{QlDtype, QlNf4GemvParams};
use super::launch::{declare_kernels, Element, Kernel, LaunchConfig};
use super::nf4::{check_scales, Nf4Layout, ScaleLens, Scales};
use crate::quant::nf4::{dequantize_absmax, dequantize_nf4, DoubleQuant};
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

/// An NF4 weight `[n, k]` in host memory, quantized over its flattened `n · k` elements.
#[derive(Clone, Copy, Debug)]
pub struct Nf4Weight<'a> {
    /// `ceil(n · k / 2)` bytes, first element of a byte in the high nibble.
    pub packed: &'a [u8],
    pub scales: Scales<'a>,
    pub n: usize,
    pub k: usize,
    pub blocksize: usize,
    pub code: &'a [f32; 16],
}

/// Buffer lengths one launch reads or writes, host or device.
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

/// [`validate`] for host buffers, the output being `m · n` elements the caller allocates.
fn validate_host<X: Element, Y: Element>(
    op: &'static str,
    x: &[X],
    m: usize,
    w: &Nf4Weight<'_>,
    bias: Option<&[Y]>,
) -> Result<GemvShape> {
    let lens = Lens {
        x: x.len(),
        packed: w.packed.len(),
        code: w.code.len(),
        bias: bias.map(<[Y]>::len),
        y: m.saturating_mul(w.n),
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
    w: &Nf4Weight<'_>,
    bias: Option<&[Y]>,
) -> Result<Vec<f32>> {
    const OP: &str = "nf4_gemv_ref";
    let shape = validate_host(OP, x, m, w, bias)?;
    let absmax = match w.scales {
        Scales::F32(absmax) => absmax.to_vec(),
        Scales::Double {
            absmax_q,
            nested_absmax,
            nested_code,
            offset,
            nested_blocksize,
        } => dequantize_absmax(&DoubleQuant {
            absmax_q: absmax_q.to_vec(),
            nested_absmax: nested_absmax.to_vec(),
            offset,
            nested_blocksize,
            nested_code: *nested_code,
        }),
    };
    let weight = dequantize_nf4(w.packed, &absmax, shape.weight.n, w.blocksize, w.code)?;
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

/// `y = x · dequant(W)^T (+ bias)` through the CPU emulation of `k_nf4_gemv`; x is `[m, k]`.
pub fn nf4_gemv_emulated<X: Element, Y: Element>(
    x: &[X],
    m: usize,
    w: &Nf4Weight<'_>,
    bias: Option<&[Y]>,
) -> Result<Vec<Y>> {
    const OP: &str = "nf4_gemv";
    let shape = validate_host(OP, x, m, w, bias)?;
    let mut y = vec![Y::default(); m * w.n];
    let mut p = base_params(&shape, X::DTYPE, Y::DTYPE);
    p.x = x.as_ptr().cast();
    p.packed = w.packed.as_ptr();
    p.code = w.code.as_ptr();
    p.bias = bias.map_or(std::ptr::null(), |b| b.as_ptr().cast());
    p.y = y.as_mut_ptr().cast();
    match w.scales {
        Scales::F32(absmax) => p.absmax = absmax.as_ptr(),
        Scales::Double {
            absmax_q,
            nested_absmax,
            nested_code,
            offset,
            nested_blocksize,
        } => {
            p.absmax_q = absmax_q.as_ptr();
            p.nested_absmax = nested_absmax.as_ptr();
            p.nested_code = nested_code.as_ptr();
            p.nested_offset = offset;
            p.nested_blocksize = nested_blocksize as i32;
        }
    }
    // SAFETY: x, the weight's buffers, the bias and y have exactly the lengths the kernel indexes
    // for `shape` (validated above) and outlive the synchronous launch.
    unsafe { super::emu::launch(&gemv_kernel(&shape), &gemv_launch(&shape)?, &p)? };
    Ok(y)
}

#[cfg(feature = "cuda")]
pub use cuda_impl::*;

#[cfg(feature = "cuda")]
mod cuda_impl {
    use super::*;
    use crate::kernels::cuda::{cuda_err, CudaDevice};
    use crate::kernels::nf4::DeviceScales;
    use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut};
    use std::ffi::c_void;

    /// An NF4 weight `[n, k]` in device memory, mirroring [`Nf4Weight`].
    pub struct DeviceNf4Weight<'a> {
        pub packed: &'a CudaSlice<u8>,
        pub scales: DeviceScales<'a>,
        pub n: usize,
        pub k: usize,
        pub blocksize: usize,
        pub code: &'a CudaSlice<f32>,
    }

    /// `y = x · dequant(W)^T (+ bias)` with `k_nf4_gemv` into a new device buffer `[m, n]`.
    pub fn nf4_gemv_cuda<X: Element, Y: Element>(
        dev: &CudaDevice,
        x: &CudaSlice<X>,
        m: usize,
        w: &DeviceNf4Weight<'_>,
        bias: Option<&CudaSlice<Y>>,
    ) -> Result<CudaSlice<Y>> {
        let shape = GemvShape::new("nf4_gemv", m, w.n, w.k, w.blocksize)?;
        // SAFETY: every element of y is written by the kernel before anyone reads it.
        let mut y = unsafe { dev.stream().alloc::<Y>(shape.m * shape.n) }.map_err(cuda_err)?;
        nf4_gemv_cuda_into(dev, x, m, w, bias, &mut y)?;
        Ok(y)
    }

    /// [`nf4_gemv_cuda`] into a caller-owned `y` of `m · n` elements.
    pub fn nf4_gemv_cuda_into<X: Element, Y: Element>(
        dev: &CudaDevice,
        x: &CudaSlice<X>,
        m: usize,
        w: &DeviceNf4Weight<'_>,
        bias: Option<&CudaSlice<Y>>,
        y: &mut CudaSlice<Y>,
    ) -> Result<()> {
        const OP: &str = "nf4_gemv";
        let lens = Lens {
            x: x.len(),
            packed: w.packed.len(),
            code: w.code.len(),
            bias: bias.map(CudaSlice::len),
            y: y.len(),
        };
        let shape = validate(
            OP,
            X::DTYPE,
            Y::DTYPE,
            m,
            (w.n, w.k, w.blocksize),
            w.scales.lens(),
            lens,
        )?;
        let cfg = gemv_launch(&shape)?;
        let stream = dev.stream();
        let mut p = base_params(&shape, X::DTYPE, Y::DTYPE);
        let mut guards = Vec::new();
        let (ptr, g) = x.device_ptr(stream);
        guards.push(g);
        p.x = ptr as *const c_void;
        let (ptr, g) = w.packed.device_ptr(stream);
        guards.push(g);
        p.packed = ptr as *const u8;
        let (ptr, g) = w.code.device_ptr(stream);
        guards.push(g);
        p.code = ptr as *const f32;
        if let Some(bias) = bias {
            let (ptr, g) = bias.device_ptr(stream);
            guards.push(g);
            p.bias = ptr as *const c_void;
        }
        let (sp, scale_guards) = w.scales.device_ptrs(stream);
        guards.extend(scale_guards);
        p.absmax = sp.absmax;
        p.absmax_q = sp.absmax_q;
        p.nested_absmax = sp.nested_absmax;
        p.nested_code = sp.nested_code;
        p.nested_offset = sp.nested_offset;
        p.nested_blocksize = sp.nested_blocksize;
        let (y_ptr, _gy) = y.device_ptr_mut(stream);
        p.y = y_ptr as *mut c_void;
        // SAFETY: every device buffer has the length the kernel reads or writes for `shape`
        // (validated above) and is kept ordered on `stream` by its guard until the launch is queued.
        unsafe { dev.launch(&gemv_kernel(&shape), &cfg, &p) }
    }
}
