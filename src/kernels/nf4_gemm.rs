//! Launchers, the plain-Rust reference and the path dispatcher for `kernels/nf4_gemm.cu`, the NF4
//! dequant-GEMM on tensor cores: forward `y[M, N] = x[M, K] · dequant(W)[N, K]^T` and input
//! gradient `dx[M, K] = dy[M, N] · dequant(W)[N, K]`, activations bf16, output f32 or bf16.
//!
//! Semantics every backend matches: each weight element is dequantized exactly as
//! `k_nf4_dequantize` does (f32 scale, one f32 product) and rounded once to bf16; products with the
//! bf16 activations are summed in f32 (the reference sequentially, the tensor cores in their own
//! order: `tolerance::Op::Nf4Gemm`) and rounded once to the output dtype, which is overwritten.
//! The baseline "dequantize into a reused bf16 buffer + cuBLAS" multiplies that same bf16 weight.
//! [`Nf4MatmulPlan`] picks GEMV (M ≤ 16), the tensor-core kernel or the cuBLAS baseline per shape
//! from a table the GPU bench measures (`benches/nf4_gemm_gpu.rs`), or by a default heuristic.

use super::abi::{QlDtype, QlNf4GemmParams};
use super::device::{Emulator, KernelArg, KernelArgMut, LaunchDevice};
use super::launch::{declare_kernels, Element, LaunchConfig};
use super::nf4::{check_scales, Nf4Layout, Nf4Weight, ScaleLens};
use super::nf4_gemv::MAX_M as GEMV_MAX_M;
use crate::{Error, Result};
use half::bf16;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

declare_kernels! {
    module "nf4_gemm";
    /// `k_nf4_gemm`: y = x · dequant(W)^T, 128 × 128 output tiles, 256 threads; aligned
    /// shapes only (see [`fast_path`]).
    GEMM = k_nf4_gemm / qlemu_k_nf4_gemm {
        block: super::launch::BlockShape::Exact(256, 1, 1)
    };
    /// `k_nf4_gemm_dx`: dx = dy · dequant(W), as [`GEMM`].
    GEMM_DX = k_nf4_gemm_dx / qlemu_k_nf4_gemm_dx {
        block: super::launch::BlockShape::Exact(256, 1, 1)
    };
    /// `k_nf4_gemm_general`: [`GEMM`] for any shape and alignment (tiles built per element).
    GEMM_GENERAL = k_nf4_gemm_general / qlemu_k_nf4_gemm_general {
        block: super::launch::BlockShape::Exact(256, 1, 1)
    };
    /// `k_nf4_gemm_dx_general`: [`GEMM_DX`] for any shape and alignment.
    GEMM_DX_GENERAL = k_nf4_gemm_dx_general / qlemu_k_nf4_gemm_dx_general {
        block: super::launch::BlockShape::Exact(256, 1, 1)
    };
}

const THREADS: u32 = 256;
/// Output tile of one block (rows of the activations × output columns).
const TILE_M: u64 = 128;
const TILE_N: u64 = 128;
/// Grid limits of every CUDA device we target.
const MAX_GRID_X: u64 = (1 << 31) - 1;
const MAX_GRID_Y: u64 = 65535;

/// Which product of the frozen NF4 weight `W [n, k]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GemmOp {
    /// `y [m, n] = x [m, k] · Wᵀ` (the linear layer's forward).
    Forward,
    /// `dx [m, k] = dy [m, n] · W` (the backward through the frozen weight).
    InputGrad,
}

impl GemmOp {
    /// (reduction length, output columns) for a weight `[n, k]`.
    fn dims(self, n: usize, k: usize) -> (usize, usize) {
        match self {
            GemmOp::Forward => (k, n),
            GemmOp::InputGrad => (n, k),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            GemmOp::Forward => "nf4_gemm",
            GemmOp::InputGrad => "nf4_gemm_dx",
        }
    }
}

/// Validated sizes of one product: activations `[m, red]`, W `[n, k]` in NF4, output `[m, out]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GemmShape {
    pub op: GemmOp,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    /// The flattened weight: `n · k` elements in blocks of `blocksize`.
    pub weight: Nf4Layout,
}

impl GemmShape {
    pub fn new(op: GemmOp, m: usize, n: usize, k: usize, blocksize: usize) -> Result<Self> {
        let name = op.name();
        if m == 0 || n == 0 || k == 0 {
            return Err(Error::invalid(
                name,
                format!("empty product m = {m}, [{n}, {k}]"),
            ));
        }
        let numel = n
            .checked_mul(k)
            .ok_or_else(|| Error::invalid(name, format!("weight [{n}, {k}] is too large")))?;
        let weight = Nf4Layout::new(name, numel, blocksize)?;
        let (red, out) = op.dims(n, k);
        let fits = |a: usize, b: usize| {
            (a as u64)
                .checked_mul(b as u64)
                .is_some_and(|v| v <= i64::MAX as u64 / 2)
        };
        if !fits(m, red) || !fits(m, out) {
            return Err(Error::invalid(
                name,
                format!("m = {m} with [{n}, {k}] is too large"),
            ));
        }
        // The kernels count reduction steps in 32 bits.
        if red > i32::MAX as usize {
            return Err(Error::invalid(
                name,
                format!("reduction length {red} exceeds 2^31 - 1"),
            ));
        }
        let (gx, gy) = ((out as u64).div_ceil(TILE_N), (m as u64).div_ceil(TILE_M));
        // The kernels number blocks in 32 bits for their grouped rasterization.
        if gx > MAX_GRID_X || gy > MAX_GRID_Y || gx * gy > MAX_GRID_X {
            return Err(Error::invalid(
                name,
                format!("grid ({gx}, {gy}) exceeds the device limits or 2^31 - 1 blocks"),
            ));
        }
        Ok(GemmShape {
            op,
            m,
            n,
            k,
            weight,
        })
    }

    /// Elements of the activations (`x` or `dy`) and of the output (`y` or `dx`).
    pub fn lens(&self) -> (usize, usize) {
        let (red, out) = self.op.dims(self.n, self.k);
        (self.m * red, self.m * out)
    }

    /// Multiply-adds times two.
    pub fn flops(&self) -> f64 {
        2.0 * self.m as f64 * self.n as f64 * self.k as f64
    }
}

/// Launch geometry of both kernels (shared by every backend): one 256-thread block per 128 × 128
/// output tile, grid `(ceil(out / 128), ceil(m / 128))`.
pub fn gemm_launch(shape: &GemmShape) -> LaunchConfig {
    let (_, out) = shape.op.dims(shape.n, shape.k);
    LaunchConfig {
        grid_dim: (
            (out as u64).div_ceil(TILE_N) as u32,
            (shape.m as u64).div_ceil(TILE_M) as u32,
            1,
        ),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Buffer lengths one launch reads or writes.
struct Lens {
    a: usize,
    packed: usize,
    code: usize,
    out: usize,
}

fn validate(
    op: GemmOp,
    out_dtype: QlDtype,
    m: usize,
    (n, k, blocksize): (usize, usize, usize),
    scales: ScaleLens,
    lens: Lens,
) -> Result<GemmShape> {
    let name = op.name();
    if !matches!(out_dtype, QlDtype::QL_DTYPE_F32 | QlDtype::QL_DTYPE_BF16) {
        return Err(Error::invalid(
            name,
            format!("output is {out_dtype:?}; f32 or bf16 expected"),
        ));
    }
    let shape = GemmShape::new(op, m, n, k, blocksize)?;
    let (a_len, out_len) = shape.lens();
    let check = |what: &str, got: usize, want: usize| {
        if got == want {
            Ok(())
        } else {
            Err(Error::invalid(
                name,
                format!("{what} has {got} elements, expected {want} for m = {m}, n = {n}, k = {k}"),
            ))
        }
    };
    check("activations", lens.a, a_len)?;
    check("packed", lens.packed, shape.weight.packed_bytes())?;
    check("code", lens.code, 16)?;
    // The kernels index blocks and nested blocks with shifts.
    if let ScaleLens::Double {
        nested_blocksize, ..
    } = scales
    {
        if !nested_blocksize.is_power_of_two() {
            return Err(Error::invalid(
                name,
                format!("nested blocksize {nested_blocksize} is not a power of two"),
            ));
        }
    }
    check_scales(name, &shape.weight, scales)?;
    check("output", lens.out, out_len)?;
    Ok(shape)
}

fn base_params(shape: &GemmShape, out_dtype: QlDtype) -> QlNf4GemmParams {
    QlNf4GemmParams {
        m: shape.m as i64,
        n: shape.n as i64,
        k: shape.k as i64,
        blocksize: shape.weight.blocksize as i32,
        out_dtype: out_dtype as i32,
        ..Default::default()
    }
}

/// Whether the fast kernels can run a product: activation rows in whole 16-byte cp.async chunks
/// (reduction length a multiple of 8, base 16-byte aligned) and weight rows in whole 16-code chunks
/// of one quantization block (K a multiple of 16, codes 8-byte aligned). Llama shapes always are.
pub fn fast_path(shape: &GemmShape, a_addr: u64, packed_addr: u64) -> bool {
    let (red, _) = shape.op.dims(shape.n, shape.k);
    red % 8 == 0
        && shape.k.is_multiple_of(16)
        && a_addr.is_multiple_of(16)
        && packed_addr.is_multiple_of(8)
}

fn kernel(op: GemmOp, fast: bool) -> &'static super::launch::Kernel {
    match (op, fast) {
        (GemmOp::Forward, true) => &GEMM,
        (GemmOp::InputGrad, true) => &GEMM_DX,
        (GemmOp::Forward, false) => &GEMM_GENERAL,
        (GemmOp::InputGrad, false) => &GEMM_DX_GENERAL,
    }
}

/// [`validate`] for `w` and the lengths of the activations and the output.
fn validate_args<D: LaunchDevice, Y: Element>(
    op: GemmOp,
    a: usize,
    m: usize,
    w: &Nf4Weight<'_, D>,
    out: usize,
) -> Result<GemmShape> {
    let lens = Lens {
        a,
        packed: w.packed.len(),
        code: w.code.len(),
        out,
    };
    validate(
        op,
        Y::DTYPE,
        m,
        (w.n, w.k, w.blocksize),
        w.scales.lens(),
        lens,
    )
}

/// W `[n, k]` dequantized with `crate::quant::nf4` and rounded once to bf16, row-major: the weight
/// every backend multiplies (bit-identical to `k_nf4_dequantize` with bf16 output).
pub fn dequantize_weight_bf16(w: &Nf4Weight<'_, Emulator>) -> Result<Vec<bf16>> {
    let dense = w.dequantize_host("nf4_gemm_ref")?;
    Ok(dense.into_iter().map(bf16::from_f32).collect())
}

/// The reference: [`dequantize_weight_bf16`], then per output a sequential f32 sum of exact
/// bf16 × bf16 products over the reduction index in increasing order, unrounded: `y [m, n]`
/// (forward) or `dx [m, k]` (input gradient) in f32.
pub fn nf4_gemm_ref(
    op: GemmOp,
    a: &[bf16],
    m: usize,
    w: &Nf4Weight<'_, Emulator>,
) -> Result<Vec<f32>> {
    let (_, out) = op.dims(w.n, w.k);
    let shape = validate_args::<_, f32>(op, a.len(), m, w, m.saturating_mul(out))?;
    let weight: Vec<f32> = dequantize_weight_bf16(w)?
        .into_iter()
        .map(f32::from)
        .collect();
    let (red, out_cols) = op.dims(shape.n, shape.k);
    let mut out = vec![0f32; m * out_cols];
    for (a_row, out_row) in a.chunks_exact(red).zip(out.chunks_exact_mut(out_cols)) {
        let a_row: Vec<f32> = a_row.iter().map(|v| v.to_f32()).collect();
        for (j, o) in out_row.iter_mut().enumerate() {
            *o = match op {
                GemmOp::Forward => a_row
                    .iter()
                    .zip(&weight[j * shape.k..(j + 1) * shape.k])
                    .fold(0f32, |acc, (x, w)| acc + x * w),
                GemmOp::InputGrad => a_row
                    .iter()
                    .enumerate()
                    .fold(0f32, |acc, (i, x)| acc + x * weight[i * shape.k + j]),
            };
        }
    }
    Ok(out)
}

/// The product by `k_nf4_gemm` / `k_nf4_gemm_dx` (or their general variants where the fast
/// kernels' alignment and divisibility assumptions do not hold) into a caller-owned output; `a`
/// is x `[m, k]` (forward) or dy `[m, n]` (input gradient), `out` is y `[m, n]` or dx `[m, k]`.
pub fn nf4_gemm_into<D: LaunchDevice, Y: Element>(
    dev: &D,
    op: GemmOp,
    a: &(impl KernelArg<D, bf16> + ?Sized),
    m: usize,
    w: &Nf4Weight<'_, D>,
    out: &mut (impl KernelArgMut<D, Y> + ?Sized),
) -> Result<()> {
    let shape = validate_args::<D, Y>(op, a.len(), m, w, out.len())?;
    let cfg = gemm_launch(&shape);
    let (ap, wp, op_) = (a.ptr(dev), w.ptrs(dev), out.ptr_mut(dev));
    let params = QlNf4GemmParams {
        a: ap.void(),
        packed: wp.packed.get(),
        code: wp.code.get(),
        absmax: wp.scales.absmax.get(),
        absmax_q: wp.scales.absmax_q.get(),
        nested_code: wp.scales.nested_code.get(),
        nested_absmax: wp.scales.nested_absmax.get(),
        out: op_.void_mut(),
        nested_offset: wp.scales.nested_offset,
        nested_blocksize: wp.scales.nested_blocksize,
        ..base_params(&shape, Y::DTYPE)
    };
    let fast = fast_path(&shape, ap.void() as u64, wp.packed.void() as u64);
    // SAFETY: the activations, the weight's buffers and the output have exactly the lengths the
    // kernel indexes for `shape` (validated above), and the pointers' guards keep them alive and
    // ordered until the launch is queued; the fast kernel is taken only where its alignment and
    // divisibility assumptions hold.
    unsafe { dev.launch(kernel(op, fast), &cfg, &params) }
}

/// [`nf4_gemm_into`] into a new buffer (`y [m, n]` or `dx [m, k]`).
pub fn nf4_gemm<D: LaunchDevice, Y: Element>(
    dev: &D,
    op: GemmOp,
    a: &(impl KernelArg<D, bf16> + ?Sized),
    m: usize,
    w: &Nf4Weight<'_, D>,
) -> Result<D::Buffer<Y>> {
    let shape = GemmShape::new(op, m, w.n, w.k, w.blocksize)?;
    // SAFETY: the kernel writes every element of the output.
    let mut out = unsafe { dev.alloc::<Y>(shape.lens().1)? };
    nf4_gemm_into(dev, op, a, m, w, &mut out)?;
    Ok(out)
}

// ---- Path dispatch ------------------------------------------------------------------------------

/// One way to compute a product with an NF4 weight.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Nf4MatmulPath {
    /// `k_nf4_gemv` (forward only, m ≤ 16). It multiplies the f32 dequantized weight, not its
    /// bf16 rounding: results differ from the other paths by that rounding (`Op::Nf4Gemv`).
    Gemv,
    /// `k_nf4_gemm` / `k_nf4_gemm_dx`.
    TensorCore,
    /// `k_nf4_dequantize` into a reused bf16 buffer, then cuBLAS bf16 GEMM.
    DequantCublas,
}

impl Nf4MatmulPath {
    /// Whether the path computes `op` at `m` rows.
    pub fn supports(self, op: GemmOp, m: usize) -> bool {
        self != Nf4MatmulPath::Gemv || (op == GemmOp::Forward && m <= GEMV_MAX_M)
    }
}

/// Below this many rows (and above the GEMV's 16) the default heuristic takes the tensor-core
/// kernel, at or above it dequantize + cuBLAS. From a bytes/flops model, not a measurement: the
/// dequantize pass moves ≈ 4.5 bytes per weight (read 0.5, write 2, cuBLAS reads 2) against the
/// fused kernel's 0.5, ≈ 0.1 ms for a 13824 × 5120 weight at 3.35 TB/s, as long as a 512-row GEMM
/// at H100 dense bf16 rates; above it cuBLAS' tuned kernels (wgmma on sm_90, which mma.sync cannot
/// use) are expected to win.
pub const DEFAULT_CUBLAS_MIN_M: usize = 512;

/// Measured seconds per call of each path at one shape, as the GPU bench records them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Nf4MatmulTiming {
    pub op: GemmOp,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub seconds: BTreeMap<Nf4MatmulPath, f64>,
}

/// A table of measured timings (JSON), written by `benches/nf4_gemm_gpu.rs` on one device.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Nf4MatmulTable {
    /// The device the timings were taken on, as the bench prints it.
    pub device: String,
    pub entries: Vec<Nf4MatmulTiming>,
}

impl Nf4MatmulTable {
    pub fn from_json(text: &str) -> Result<Self> {
        let table: Nf4MatmulTable = serde_json::from_str(text)
            .map_err(|e| Error::invalid("nf4_matmul_table", format!("malformed table: {e}")))?;
        for e in &table.entries {
            if e.m == 0 || e.n == 0 || e.k == 0 {
                return Err(Error::invalid(
                    "nf4_matmul_table",
                    format!("empty shape in {e:?}"),
                ));
            }
            if e.seconds.values().any(|s| !s.is_finite() || *s <= 0.0) {
                return Err(Error::invalid(
                    "nf4_matmul_table",
                    format!("bad timing in {e:?}"),
                ));
            }
        }
        Ok(table)
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a table of numbers and names serializes")
    }

    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_json(&text)
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        std::fs::write(path, self.to_json()).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })
    }
}

/// Environment variable naming the table file the GPU bench writes and [`Nf4MatmulPlan::from_env`]
/// reads.
pub const TABLE_ENV: &str = "QLORA_NF4_GEMM_TABLE";

/// Chooses a path per shape: from the nearest measured shape of the table when there is one,
/// otherwise by [`Nf4MatmulPlan::default_path`].
#[derive(Clone, Debug, Default)]
pub struct Nf4MatmulPlan {
    pub table: Option<Nf4MatmulTable>,
}

impl Nf4MatmulPlan {
    pub fn with_table(table: Nf4MatmulTable) -> Self {
        Nf4MatmulPlan { table: Some(table) }
    }

    /// The plan of the table file named by `QLORA_NF4_GEMM_TABLE`, or the default heuristic when
    /// the variable is unset. A named file that cannot be read or parsed is an error.
    pub fn from_env() -> Result<Self> {
        match std::env::var_os(TABLE_ENV) {
            Some(path) => Ok(Self::with_table(Nf4MatmulTable::load(Path::new(&path))?)),
            None => Ok(Self::default()),
        }
    }

    /// Without measurements: GEMV for a forward with m ≤ 16, the tensor-core kernel below
    /// [`DEFAULT_CUBLAS_MIN_M`] rows, dequantize + cuBLAS from there on.
    pub fn default_path(op: GemmOp, m: usize) -> Nf4MatmulPath {
        if Nf4MatmulPath::Gemv.supports(op, m) {
            Nf4MatmulPath::Gemv
        } else if m < DEFAULT_CUBLAS_MIN_M {
            Nf4MatmulPath::TensorCore
        } else {
            Nf4MatmulPath::DequantCublas
        }
    }

    /// The path for `op` at `m` rows with a weight `[n, k]`: among the table's entries for `op`,
    /// the one nearest in `|ln(m/m')| + |ln(n/n')| + |ln(k/k')|` (ties to the earlier entry), and
    /// of its measured paths that can run this shape the fastest. Falls back to the default when
    /// the table has no entry for `op` or none of the nearest entry's paths fits.
    pub fn choose_path(&self, op: GemmOp, m: usize, n: usize, k: usize) -> Nf4MatmulPath {
        let dist = |a: usize, b: usize| ((a.max(1) as f64) / (b.max(1) as f64)).ln().abs();
        let nearest = self.table.as_ref().and_then(|t| {
            t.entries
                .iter()
                .filter(|e| e.op == op)
                .map(|e| (dist(m, e.m) + dist(n, e.n) + dist(k, e.k), e))
                .fold(None::<(f64, &Nf4MatmulTiming)>, |best, (d, e)| match best {
                    Some((bd, _)) if bd <= d => best,
                    _ => Some((d, e)),
                })
        });
        nearest
            .and_then(|(_, e)| {
                e.seconds
                    .iter()
                    .filter(|(p, _)| p.supports(op, m))
                    .min_by(|a, b| a.1.total_cmp(b.1))
                    .map(|(p, _)| *p)
            })
            .unwrap_or_else(|| Self::default_path(op, m))
    }
}

#[cfg(feature = "cuda")]
pub use cuda_impl::*;

#[cfg(feature = "cuda")]
mod cuda_impl {
    use super::*;
    use crate::kernels::cuda::{cuda_err, CudaDevice};
    use crate::kernels::nf4::dequantize_into;
    use crate::kernels::nf4_gemv::nf4_gemv_into;
    use cudarc::cublas::{result as cublas_result, sys as cublas_sys, CudaBlas};
    use cudarc::driver::CudaSlice;

    fn cuda_dtype(dtype: QlDtype) -> cublas_sys::cudaDataType {
        match dtype {
            QlDtype::QL_DTYPE_F32 => cublas_sys::cudaDataType::CUDA_R_32F,
            QlDtype::QL_DTYPE_BF16 => cublas_sys::cudaDataType::CUDA_R_16BF,
            QlDtype::QL_DTYPE_F16 => cublas_sys::cudaDataType::CUDA_R_16F,
        }
    }

    fn to_c_int(op: GemmOp, v: usize) -> Result<i32> {
        i32::try_from(v)
            .map_err(|_| Error::invalid(op.name(), format!("{v} exceeds cuBLAS' 32-bit sizes")))
    }

    /// cuBLAS bf16 GEMM (f32 compute) with a dense row-major bf16 weight `[n, k]`: the product
    /// `op` of `a` into `out` (f32 or bf16), overwritten. The baseline every NF4 path is held to.
    #[allow(clippy::too_many_arguments)]
    pub fn dense_bf16_gemm_into<Y: Element>(
        dev: &CudaDevice,
        blas: &CudaBlas,
        op: GemmOp,
        a: &(impl KernelArg<CudaDevice, bf16> + ?Sized),
        m: usize,
        weight: &(impl KernelArg<CudaDevice, bf16> + ?Sized),
        (n, k): (usize, usize),
        out: &mut (impl KernelArgMut<CudaDevice, Y> + ?Sized),
    ) -> Result<()> {
        let name = op.name();
        if !matches!(Y::DTYPE, QlDtype::QL_DTYPE_F32 | QlDtype::QL_DTYPE_BF16) {
            return Err(Error::invalid(name, "output must be f32 or bf16"));
        }
        let shape = GemmShape::new(op, m, n, k, 64)?;
        let (a_len, out_len) = shape.lens();
        if a.len() != a_len || out.len() != out_len || weight.len() != n * k {
            return Err(Error::invalid(
                name,
                format!(
                    "lengths a {}, weight {}, out {} do not fit m = {m}, [{n}, {k}]",
                    a.len(),
                    weight.len(),
                    out.len()
                ),
            ));
        }
        let (mi, ni, ki) = (to_c_int(op, m)?, to_c_int(op, n)?, to_c_int(op, k)?);
        // Column-major view of the row-major buffers: W is k × n with ld k, x is k × m, dy is
        // n × m, y is n × m, dx is k × m. Forward: yᵀ = (Wᵀ)ᵀ·xᵀ; input grad: dxᵀ = Wᵀ·dyᵀ.
        let (transa, rows, red, ldb) = match op {
            GemmOp::Forward => (cublas_sys::cublasOperation_t::CUBLAS_OP_T, ni, ki, ki),
            GemmOp::InputGrad => (cublas_sys::cublasOperation_t::CUBLAS_OP_N, ki, ni, ni),
        };
        let (a_ptr, w_ptr, out_ptr) = (a.ptr(dev), weight.ptr(dev), out.ptr_mut(dev));
        let (alpha, beta) = (1.0f32, 0.0f32);
        // SAFETY: the three buffers have the lengths cuBLAS reads and writes for these sizes and
        // leading dimensions (checked above), stay alive and ordered on the handle's stream (the
        // device's stream) through their guards, and alpha/beta are host f32 as COMPUTE_32F wants.
        unsafe {
            cublas_result::gemm_ex(
                *blas.handle(),
                transa,
                cublas_sys::cublasOperation_t::CUBLAS_OP_N,
                rows,
                mi,
                red,
                (&alpha as *const f32).cast(),
                w_ptr.void(),
                cublas_sys::cudaDataType::CUDA_R_16BF,
                ki,
                a_ptr.void(),
                cublas_sys::cudaDataType::CUDA_R_16BF,
                ldb,
                (&beta as *const f32).cast(),
                out_ptr.void_mut(),
                cuda_dtype(Y::DTYPE),
                rows,
                cublas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| Error::Cuda(format!("cuBLAS: {e:?}")))
    }

    /// The "dequantize into a reused bf16 buffer + cuBLAS" path: one cuBLAS handle on the
    /// device's stream and one bf16 buffer grown to the largest weight seen, reused by every call.
    pub struct DequantCublas {
        blas: CudaBlas,
        buffer: Option<CudaSlice<bf16>>,
    }

    impl DequantCublas {
        pub fn new(dev: &CudaDevice) -> Result<Self> {
            let blas = CudaBlas::new(dev.stream().clone())
                .map_err(|e| Error::Cuda(format!("cuBLAS: {e:?}")))?;
            Ok(DequantCublas { blas, buffer: None })
        }

        pub fn blas(&self) -> &CudaBlas {
            &self.blas
        }

        /// Elements of the reused buffer (0 before the first call).
        pub fn buffer_elems(&self) -> usize {
            self.buffer.as_ref().map_or(0, CudaSlice::len)
        }

        /// `out = op(a, dequant(W))` by `k_nf4_dequantize` (bf16) into the buffer, then cuBLAS.
        pub fn matmul_into<Y: Element>(
            &mut self,
            dev: &CudaDevice,
            op: GemmOp,
            a: &(impl KernelArg<CudaDevice, bf16> + ?Sized),
            m: usize,
            w: &Nf4Weight<'_, CudaDevice>,
            out: &mut (impl KernelArgMut<CudaDevice, Y> + ?Sized),
        ) -> Result<()> {
            let shape = validate_args::<CudaDevice, Y>(op, a.len(), m, w, out.len())?;
            let numel = shape.weight.n;
            if self.buffer_elems() < numel {
                // SAFETY: the first `numel` elements are written by the dequantize kernel below
                // before cuBLAS reads them; the rest is never read.
                let fresh = unsafe { dev.stream().alloc::<bf16>(numel) }.map_err(cuda_err)?;
                self.buffer = Some(fresh);
            }
            let buffer = self
                .buffer
                .as_mut()
                .ok_or_else(|| Error::Cuda("dequantize buffer missing".into()))?;
            dequantize_into(dev, w, &mut buffer.slice_mut(0..numel))?;
            let weight = buffer.slice(0..numel);
            dense_bf16_gemm_into(dev, &self.blas, op, a, m, &weight, (w.n, w.k), out)
        }
    }

    /// A [`Nf4MatmulPlan`] with what its paths need on one device (the cuBLAS baseline's handle
    /// and buffer): runs every product by the path the plan picks for its shape.
    pub struct Nf4Matmul {
        pub plan: Nf4MatmulPlan,
        dequant: DequantCublas,
    }

    impl Nf4Matmul {
        pub fn new(dev: &CudaDevice, plan: Nf4MatmulPlan) -> Result<Self> {
            Ok(Nf4Matmul {
                plan,
                dequant: DequantCublas::new(dev)?,
            })
        }

        /// `out = op(a, dequant(W))` by `path` (checked to support the shape).
        #[allow(clippy::too_many_arguments)]
        pub fn run_path<Y: Element>(
            &mut self,
            dev: &CudaDevice,
            path: Nf4MatmulPath,
            op: GemmOp,
            a: &(impl KernelArg<CudaDevice, bf16> + ?Sized),
            m: usize,
            w: &Nf4Weight<'_, CudaDevice>,
            out: &mut (impl KernelArgMut<CudaDevice, Y> + ?Sized),
        ) -> Result<()> {
            if !path.supports(op, m) {
                return Err(Error::invalid(
                    op.name(),
                    format!("{path:?} cannot compute {op:?} at m = {m}"),
                ));
            }
            match path {
                Nf4MatmulPath::Gemv => {
                    nf4_gemv_into::<_, bf16, Y, CudaSlice<Y>>(dev, a, m, w, None, out)
                }
                Nf4MatmulPath::TensorCore => nf4_gemm_into(dev, op, a, m, w, out),
                Nf4MatmulPath::DequantCublas => self.dequant.matmul_into(dev, op, a, m, w, out),
            }
        }

        /// `out = op(a, dequant(W))` by the plan's path for this shape.
        pub fn run<Y: Element>(
            &mut self,
            dev: &CudaDevice,
            op: GemmOp,
            a: &(impl KernelArg<CudaDevice, bf16> + ?Sized),
            m: usize,
            w: &Nf4Weight<'_, CudaDevice>,
            out: &mut (impl KernelArgMut<CudaDevice, Y> + ?Sized),
        ) -> Result<()> {
            let path = self.plan.choose_path(op, m, w.n, w.k);
            self.run_path(dev, path, op, a, m, w, out)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timing(
        op: GemmOp,
        m: usize,
        n: usize,
        k: usize,
        s: &[(Nf4MatmulPath, f64)],
    ) -> Nf4MatmulTiming {
        Nf4MatmulTiming {
            op,
            m,
            n,
            k,
            seconds: s.iter().copied().collect(),
        }
    }

    #[test]
    fn default_path_by_rows() {
        use Nf4MatmulPath::*;
        let plan = Nf4MatmulPlan::default();
        assert_eq!(plan.choose_path(GemmOp::Forward, 1, 5120, 5120), Gemv);
        assert_eq!(plan.choose_path(GemmOp::Forward, 16, 5120, 5120), Gemv);
        assert_eq!(
            plan.choose_path(GemmOp::Forward, 17, 5120, 5120),
            TensorCore
        );
        assert_eq!(
            plan.choose_path(GemmOp::InputGrad, 1, 5120, 5120),
            TensorCore
        );
        assert_eq!(
            plan.choose_path(GemmOp::Forward, DEFAULT_CUBLAS_MIN_M - 1, 64, 64),
            TensorCore
        );
        assert_eq!(
            plan.choose_path(GemmOp::Forward, DEFAULT_CUBLAS_MIN_M, 64, 64),
            DequantCublas
        );
        assert_eq!(
            plan.choose_path(GemmOp::InputGrad, 4096, 64, 64),
            DequantCublas
        );
    }

    #[test]
    fn table_picks_the_fastest_path_of_the_nearest_shape() {
        use Nf4MatmulPath::*;
        let table = Nf4MatmulTable {
            device: "test".into(),
            entries: vec![
                timing(
                    GemmOp::Forward,
                    16,
                    5120,
                    5120,
                    &[(Gemv, 3.0), (TensorCore, 2.0), (DequantCublas, 9.0)],
                ),
                timing(
                    GemmOp::Forward,
                    2048,
                    5120,
                    5120,
                    &[(TensorCore, 5.0), (DequantCublas, 4.0)],
                ),
                timing(
                    GemmOp::Forward,
                    2048,
                    13824,
                    5120,
                    &[(TensorCore, 4.0), (DequantCublas, 5.0)],
                ),
                timing(
                    GemmOp::InputGrad,
                    2048,
                    5120,
                    5120,
                    &[(TensorCore, 1.0), (DequantCublas, 2.0)],
                ),
            ],
        };
        let plan = Nf4MatmulPlan::with_table(table);
        // Nearest entry m = 16: the tensor-core kernel measured faster than the GEMV there.
        assert_eq!(plan.choose_path(GemmOp::Forward, 8, 5120, 5120), TensorCore);
        // Nearest in m is 2048; the weight shape decides between the two 2048-row entries.
        assert_eq!(
            plan.choose_path(GemmOp::Forward, 4096, 5120, 5120),
            DequantCublas
        );
        assert_eq!(
            plan.choose_path(GemmOp::Forward, 4096, 13824, 5120),
            TensorCore
        );
        assert_eq!(
            plan.choose_path(GemmOp::InputGrad, 300, 5120, 5120),
            TensorCore
        );
    }

    #[test]
    fn table_never_picks_a_path_that_cannot_run_the_shape() {
        use Nf4MatmulPath::*;
        let table = Nf4MatmulTable {
            device: "test".into(),
            entries: vec![timing(
                GemmOp::Forward,
                16,
                64,
                64,
                &[(Gemv, 1.0), (DequantCublas, 2.0)],
            )],
        };
        let plan = Nf4MatmulPlan::with_table(table.clone());
        assert_eq!(plan.choose_path(GemmOp::Forward, 16, 64, 64), Gemv);
        // m = 32 is nearest to the m = 16 entry, but the GEMV takes at most 16 rows.
        assert_eq!(plan.choose_path(GemmOp::Forward, 32, 64, 64), DequantCublas);
        // No entry for the input gradient: the default.
        assert_eq!(plan.choose_path(GemmOp::InputGrad, 32, 64, 64), TensorCore);
        let only_gemv = Nf4MatmulTable {
            device: "test".into(),
            entries: vec![timing(GemmOp::Forward, 16, 64, 64, &[(Gemv, 1.0)])],
        };
        assert_eq!(
            Nf4MatmulPlan::with_table(only_gemv).choose_path(GemmOp::Forward, 4096, 64, 64),
            Nf4MatmulPlan::default_path(GemmOp::Forward, 4096)
        );
    }

    #[test]
    fn table_round_trips_through_json_and_rejects_bad_timings() {
        use Nf4MatmulPath::*;
        let table = Nf4MatmulTable {
            device: "NVIDIA H100".into(),
            entries: vec![timing(
                GemmOp::InputGrad,
                2048,
                13824,
                5120,
                &[(TensorCore, 1e-3), (DequantCublas, 9e-4)],
            )],
        };
        let text = table.to_json();
        assert!(
            text.contains("\"input_grad\"") && text.contains("\"dequant_cublas\""),
            "{text}"
        );
        assert_eq!(Nf4MatmulTable::from_json(&text).unwrap(), table);
        let bad = text.replace("0.0009", "-1.0");
        assert!(matches!(
            Nf4MatmulTable::from_json(&bad),
            Err(Error::InvalidArgument { .. })
        ));
        assert!(matches!(
            Nf4MatmulTable::from_json("{"),
            Err(Error::InvalidArgument { .. })
        ));
        let zero = text.replace("2048", "0");
        assert!(matches!(
            Nf4MatmulTable::from_json(&zero),
            Err(Error::InvalidArgument { .. })
        ));
    }

    #[test]
    fn table_file_round_trips_and_a_missing_file_is_an_io_error() {
        let table = Nf4MatmulTable {
            device: "test".into(),
            entries: vec![timing(
                GemmOp::Forward,
                16,
                64,
                64,
                &[(Nf4MatmulPath::Gemv, 1e-5)],
            )],
        };
        let path =
            std::env::temp_dir().join(format!("qlora-nf4-gemm-table-{}.json", std::process::id()));
        table.save(&path).unwrap();
        let loaded = Nf4MatmulTable::load(&path);
        std::fs::remove_file(&path).unwrap();
        assert_eq!(loaded.unwrap(), table);
        assert!(matches!(Nf4MatmulTable::load(&path), Err(Error::Io { .. })));
    }

    #[test]
    fn fast_path_needs_whole_chunks_and_aligned_bases() {
        let s = GemmShape::new(GemmOp::Forward, 3, 8, 64, 64).unwrap();
        assert!(fast_path(&s, 256, 8));
        assert!(!fast_path(&s, 258, 8), "activations misaligned");
        assert!(!fast_path(&s, 256, 9), "codes misaligned");
        // K = 72: cp.async chunks fit the forward rows, but 16-code chunks straddle W's rows.
        assert!(!fast_path(
            &GemmShape::new(GemmOp::Forward, 3, 8, 72, 64).unwrap(),
            256,
            8
        ));
        // dx reduces over n: n = 12 is no multiple of 8.
        assert!(fast_path(
            &GemmShape::new(GemmOp::InputGrad, 3, 16, 64, 64).unwrap(),
            256,
            8
        ));
        assert!(!fast_path(
            &GemmShape::new(GemmOp::InputGrad, 3, 12, 64, 64).unwrap(),
            256,
            8
        ));
    }

    #[test]
    fn launch_covers_every_output_tile() {
        let s = GemmShape::new(GemmOp::Forward, 130, 136, 72, 64).unwrap();
        assert_eq!(gemm_launch(&s).grid_dim, (2, 2, 1));
        let s = GemmShape::new(GemmOp::InputGrad, 1, 136, 300, 64).unwrap();
        assert_eq!(gemm_launch(&s).grid_dim, (3, 1, 1));
        assert!(GemmShape::new(GemmOp::Forward, 128 * 65536, 8, 8, 64).is_err());
        assert!(GemmShape::new(GemmOp::Forward, 1, 1, 1 << 31, 64).is_err());
        assert!(GemmShape::new(GemmOp::Forward, 1, 1, (1 << 31) - 64, 64).is_ok());
    }
}
