//! GPU kernel benches at Llama-2 shapes, as a registry of kernel families ([`KERNELS`]): each
//! measures its kernels and returns typed rows (time, bytes moved, flops, cuBLAS time), printed as
//! one table by `qlora bench kernels` and by the `*_gpu` bench targets.

use serde::Serialize;
use std::path::PathBuf;

use crate::{Error, Result};

/// The dimensions of a Llama model that set the kernels' shapes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct ModelShape {
    pub name: &'static str,
    pub hidden: usize,
    pub intermediate: usize,
    pub heads: usize,
    pub layers: usize,
    pub vocab: usize,
}

impl ModelShape {
    pub const LLAMA2_13B: ModelShape = ModelShape {
        name: "13b",
        hidden: 5120,
        intermediate: 13824,
        heads: 40,
        layers: 40,
        vocab: 32000,
    };
    pub const LLAMA2_7B: ModelShape = ModelShape {
        name: "7b",
        hidden: 4096,
        intermediate: 11008,
        heads: 32,
        layers: 32,
        vocab: 32000,
    };

    /// `13b` or `7b`.
    pub fn by_name(name: &str) -> Result<Self> {
        [Self::LLAMA2_13B, Self::LLAMA2_7B]
            .into_iter()
            .find(|s| s.name == name)
            .ok_or_else(|| Error::invalid("bench shapes", format!("{name:?}: use 13b or 7b")))
    }

    /// The distinct linear weights `[out, in]`: q/k/v/o, gate/up, down.
    pub fn linears(&self) -> [(usize, usize); 3] {
        [
            (self.hidden, self.hidden),
            (self.intermediate, self.hidden),
            (self.hidden, self.intermediate),
        ]
    }

    pub fn head_dim(&self) -> usize {
        self.hidden / self.heads
    }

    /// Trainable parameters of LoRA rank `r` on all seven linears of every layer, the tensor
    /// AdamW updates in QLoRA.
    pub fn lora_params(&self, r: usize) -> usize {
        let per_layer: usize = [
            (self.hidden, self.hidden, 4),
            (self.intermediate, self.hidden, 2),
            (self.hidden, self.intermediate, 1),
        ]
        .iter()
        .map(|&(o, i, count)| count * r * (o + i))
        .sum();
        self.layers * per_layer
    }
}

/// One measured kernel at one shape.
#[derive(Clone, Debug, Serialize)]
pub struct KernelRow {
    pub kernel: String,
    pub shape: String,
    /// Mean seconds per call.
    pub seconds: f64,
    /// Bytes each call must move (every input read and output written once), for memory-bound
    /// kernels.
    pub bytes: Option<f64>,
    /// Floating-point operations per call, for products.
    pub flops: Option<f64>,
    /// cuBLAS bf16 on the dense weight at the same shape, for products.
    pub cublas_seconds: Option<f64>,
}

impl KernelRow {
    pub fn gbs(&self) -> Option<f64> {
        self.bytes.map(|b| b / self.seconds / 1e9)
    }

    pub fn percent_of_peak(&self, peak_gbs: f64) -> Option<f64> {
        self.gbs().map(|g| 100.0 * g / peak_gbs)
    }

    pub fn tflops(&self) -> Option<f64> {
        self.flops.map(|f| f / self.seconds / 1e12)
    }

    /// cuBLAS time over this kernel's: above 1 is faster than cuBLAS.
    pub fn ratio_to_cublas(&self) -> Option<f64> {
        self.cublas_seconds.map(|c| c / self.seconds)
    }
}

/// What to measure.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    pub shape: ModelShape,
    /// Token counts (rows of the activations); families skip those their kernel does not take.
    pub ms: Vec<usize>,
    /// Where the GEMM family writes the measured NF4 dispatch table, if anywhere.
    pub dispatch_table: Option<PathBuf>,
}

pub const DEFAULT_MS: [usize; 4] = [1, 16, 2048, 4096];

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            shape: ModelShape::LLAMA2_13B,
            ms: DEFAULT_MS.to_vec(),
            dispatch_table: None,
        }
    }
}

/// One kernel family of the registry.
pub struct KernelFamily {
    pub name: &'static str,
    pub about: &'static str,
    #[cfg(feature = "cuda")]
    pub run: fn(&gpu::GpuBench<'_>) -> Result<Vec<KernelRow>>,
}

/// Every kernel family `qlora bench kernels` runs, in order. Adding a family is one entry here.
pub const KERNELS: &[KernelFamily] = &[
    KernelFamily {
        name: "nf4",
        about: "NF4 dequantize (double quant) to bf16 and quantize from bf16, per linear weight",
        #[cfg(feature = "cuda")]
        run: gpu::nf4,
    },
    KernelFamily {
        name: "gemv",
        about: "NF4 GEMV y = x·Wᵀ for M ≤ 16 (decode), per linear weight",
        #[cfg(feature = "cuda")]
        run: gpu::gemv,
    },
    KernelFamily {
        name: "gemm",
        about: "NF4 products (forward and input gradient): tensor-core kernel, dequantize + \
                cuBLAS and GEMV against cuBLAS bf16 on the dense weight",
        #[cfg(feature = "cuda")]
        run: gpu::gemm,
    },
    KernelFamily {
        name: "adamw",
        about: "AdamW step with f32 moments over the LoRA r 16 parameters of all seven linears",
        #[cfg(feature = "cuda")]
        run: gpu::adamw,
    },
    KernelFamily {
        name: "llama",
        about: "RMSNorm forward, RoPE on q and k, SwiGLU forward, bf16 [M, width]",
        #[cfg(feature = "cuda")]
        run: gpu::llama,
    },
    KernelFamily {
        name: "attention",
        about: "Causal attention forward and backward, bf16 on tensor cores and f32, batch 1 with \
                each M ≥ 128 as the sequence length",
        #[cfg(feature = "cuda")]
        run: gpu::attention,
    },
    KernelFamily {
        name: "cross-entropy",
        about: "Cross-entropy forward and backward over bf16 logits [M, vocab]",
        #[cfg(feature = "cuda")]
        run: gpu::cross_entropy,
    },
];

/// The families named in `names` (all of them for an empty list), or which name is unknown.
pub fn select(names: &[&str]) -> Result<Vec<&'static KernelFamily>> {
    if names.is_empty() {
        return Ok(KERNELS.iter().collect());
    }
    names
        .iter()
        .map(|n| {
            KERNELS.iter().find(|f| f.name == *n).ok_or_else(|| {
                let known: Vec<&str> = KERNELS.iter().map(|f| f.name).collect();
                Error::invalid(
                    "bench kernels",
                    format!("unknown kernel family {n:?}; known: {}", known.join(", ")),
                )
            })
        })
        .collect()
}

/// The device a run measured.
#[derive(Clone, Debug, Serialize)]
pub struct DeviceSummary {
    /// Name, compute capability and theoretical DRAM bandwidth, in words.
    pub description: String,
    pub peak_bandwidth_gbs: f64,
}

/// Every row of one run and the device they ran on.
#[derive(Clone, Debug, Serialize)]
pub struct KernelReport {
    pub device: DeviceSummary,
    pub model: ModelShape,
    pub rows: Vec<KernelRow>,
}

/// A run, or why none could be made (no `cuda` feature, no driver, no GPU).
#[derive(Clone, Debug)]
pub enum KernelBench {
    Skipped(String),
    Ran(KernelReport),
}

/// Runs `families` on device 0, handing each row to `on_row` as soon as it is measured (a full
/// run takes minutes). A missing GPU is [`KernelBench::Skipped`] with the reason, not an error.
pub fn run(
    families: &[&KernelFamily],
    opts: &BenchOptions,
    on_row: &mut dyn FnMut(&KernelRow, &DeviceSummary),
) -> Result<KernelBench> {
    if opts.ms.is_empty() || opts.ms.contains(&0) {
        return Err(Error::invalid(
            "bench kernels",
            "token counts (--m) must be one or more numbers >= 1",
        ));
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (families, on_row);
        Ok(KernelBench::Skipped(
            "built without the `cuda` feature (rebuild with --features cuda)".to_string(),
        ))
    }
    #[cfg(feature = "cuda")]
    {
        let dev = match crate::kernels::cuda::CudaDevice::new(0) {
            Ok(dev) => dev,
            Err(e) => return Ok(KernelBench::Skipped(e.to_string())),
        };
        let info = dev.describe()?;
        let device = DeviceSummary {
            description: info.to_string(),
            peak_bandwidth_gbs: info.peak_bandwidth_gbs,
        };
        let bench = gpu::GpuBench { dev: &dev, opts };
        let mut rows = Vec::new();
        for family in families {
            for row in (family.run)(&bench)? {
                on_row(&row, &device);
                rows.push(row);
            }
        }
        Ok(KernelBench::Ran(KernelReport {
            device,
            model: opts.shape,
            rows,
        }))
    }
}

/// The table's header line.
pub fn table_header() -> String {
    format!(
        "{:<30} {:<22} {:>11} {:>9} {:>7} {:>8} {:>8}",
        "kernel", "shape", "time us", "GB/s", "% peak", "TFLOP/s", "/cuBLAS"
    )
}

/// One row of the table; `-` where a figure does not apply.
pub fn table_row(row: &KernelRow, peak_gbs: f64) -> String {
    let opt = |v: Option<f64>, digits: usize| {
        v.map_or_else(|| "-".to_string(), |x| format!("{x:.digits$}"))
    };
    format!(
        "{:<30} {:<22} {:>11.1} {:>9} {:>7} {:>8} {:>8}",
        row.kernel,
        row.shape,
        row.seconds * 1e6,
        opt(row.gbs(), 1),
        opt(row.percent_of_peak(peak_gbs), 1),
        opt(row.tflops(), 1),
        opt(row.ratio_to_cublas(), 2)
    )
}

/// A `*_gpu` bench target: runs `families` at 13B shapes and token counts `ms` and prints the
/// device and the table, or why it skipped. Exit status 0 either way unless a kernel failed.
pub fn bench_target(target: &str, families: &[&str], ms: &[usize]) -> std::process::ExitCode {
    let opts = BenchOptions {
        ms: ms.to_vec(),
        dispatch_table: families.contains(&"gemm").then(default_dispatch_table),
        ..BenchOptions::default()
    };
    let mut printed_header = false;
    let result = select(families).and_then(|selected| {
        run(&selected, &opts, &mut |row, device| {
            if !std::mem::replace(&mut printed_header, true) {
                println!("{}\n{}", device.description, table_header());
            }
            println!("{}", table_row(row, device.peak_bandwidth_gbs));
        })
    });
    match result {
        Ok(KernelBench::Skipped(why)) => {
            println!("{target}: skipped, nothing measured: {why}");
            std::process::ExitCode::SUCCESS
        }
        Ok(KernelBench::Ran(_)) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{target}: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// `QLORA_NF4_GEMM_TABLE` if set, else `nf4_gemm_dispatch.json` in the cargo target folder.
pub fn default_dispatch_table() -> PathBuf {
    std::env::var_os(crate::kernels::nf4_gemm::TABLE_ENV).map_or_else(
        || {
            let target = std::env::var_os("CARGO_TARGET_DIR")
                .map_or_else(|| PathBuf::from("target"), PathBuf::from);
            target.join("nf4_gemm_dispatch.json")
        },
        PathBuf::from,
    )
}

#[cfg(feature = "cuda")]
pub mod gpu {
    //! The measurements: one function per kernel family, each allocating its inputs at the
    //! model's shapes and timing the launches with [`CudaDevice::seconds_per_call`].

    use super::{BenchOptions, KernelRow};
    use crate::kernels::cuda::{cuda_err, CudaDevice};
    use crate::kernels::nf4::{Nf4Weight, Scales};
    use crate::quant::nf4::{double_quantize, quantize_nf4, DoubleQuant, NF4_CODE};
    use crate::Result;
    use cudarc::driver::CudaSlice;
    use half::bf16;

    /// The device and the options every family reads.
    pub struct GpuBench<'a> {
        pub dev: &'a CudaDevice,
        pub opts: &'a BenchOptions,
    }

    /// Seconds per call of `launch` over `iters` calls; the first launch error, if any.
    fn time(dev: &CudaDevice, iters: u32, mut launch: impl FnMut() -> Result<()>) -> Result<f64> {
        let mut failed = None;
        let secs = dev.seconds_per_call(iters, || {
            if failed.is_none() {
                failed = launch().err();
            }
        })?;
        failed.map_or(Ok(secs), Err)
    }

    fn bf16_normal(n: usize, std: f32, seed: u64) -> Vec<bf16> {
        crate::testing::normal_vector(n, std, seed)
            .into_iter()
            .map(bf16::from_f32)
            .collect()
    }

    /// A random `[n, k]` weight (std 0.02) in NF4, blocks of 64, double quant, on the device.
    struct BenchWeight {
        n: usize,
        k: usize,
        packed_len: usize,
        dq: DoubleQuant,
        /// The dequantized weight in bf16 (for cuBLAS on the dense weight).
        dense: Vec<bf16>,
        d_packed: CudaSlice<u8>,
        d_code: CudaSlice<f32>,
        d_q: CudaSlice<u8>,
        d_na: CudaSlice<f32>,
        d_nc: CudaSlice<f32>,
    }

    impl BenchWeight {
        fn new(dev: &CudaDevice, n: usize, k: usize, with_dense: bool) -> Result<Self> {
            let w = crate::testing::normal_vector(n * k, 0.02, 1);
            let (packed, absmax) = quantize_nf4(&w, 64)?;
            let dq = double_quantize(&absmax, 256)?;
            let dense = if with_dense {
                crate::quant::nf4::dequantize_nf4(&packed, &absmax, n * k, 64, &NF4_CODE)?
                    .into_iter()
                    .map(bf16::from_f32)
                    .collect()
            } else {
                Vec::new()
            };
            let s = dev.stream();
            Ok(BenchWeight {
                n,
                k,
                packed_len: packed.len(),
                d_packed: s.clone_htod(&packed).map_err(cuda_err)?,
                d_code: s.clone_htod(&NF4_CODE).map_err(cuda_err)?,
                d_q: s.clone_htod(&dq.absmax_q).map_err(cuda_err)?,
                d_na: s.clone_htod(&dq.nested_absmax).map_err(cuda_err)?,
                d_nc: s.clone_htod(&dq.nested_code).map_err(cuda_err)?,
                dq,
                dense,
            })
        }

        fn scales(&self) -> Scales<'_, CudaDevice> {
            Scales::Double {
                absmax_q: self.d_q.slice(..),
                nested_absmax: self.d_na.slice(..),
                nested_code: self.d_nc.slice(..),
                offset: self.dq.offset,
                nested_blocksize: 256,
            }
        }

        fn device(&self) -> Nf4Weight<'_, CudaDevice> {
            Nf4Weight {
                packed: self.d_packed.slice(..),
                scales: self.scales(),
                n: self.n,
                k: self.k,
                blocksize: 64,
                code: self.d_code.slice(..),
            }
        }

        /// Bytes of the codes and the double-quantized scales.
        fn bytes(&self) -> usize {
            self.packed_len + self.dq.absmax_q.len() + self.dq.nested_absmax.len() * 4
        }
    }

    fn memory_row(kernel: &str, shape: String, seconds: f64, bytes: usize) -> KernelRow {
        KernelRow {
            kernel: kernel.to_string(),
            shape,
            seconds,
            bytes: Some(bytes as f64),
            flops: None,
            cublas_seconds: None,
        }
    }

    /// NF4 dequantize (double quant) to bf16 and quantize from bf16 on the q/k/v/o and gate/up
    /// weights (down has gate/up's element count).
    pub fn nf4(b: &GpuBench<'_>) -> Result<Vec<KernelRow>> {
        use crate::kernels::nf4::{dequantize_into, quantize_into};
        let (dev, s) = (b.dev, b.dev.stream());
        let mut rows = Vec::new();
        for (n, k) in b.opts.shape.linears().into_iter().take(2) {
            let len = n * k;
            let w = BenchWeight::new(dev, n, k, false)?;
            let weight = w.device();
            let d_in = s.clone_htod(&bf16_normal(len, 0.02, 1)).map_err(cuda_err)?;
            let mut d_out = s.alloc_zeros::<bf16>(len).map_err(cuda_err)?;
            let mut d_qout = s.alloc_zeros::<u8>(w.packed_len).map_err(cuda_err)?;
            let mut d_qabsmax = s.alloc_zeros::<f32>(len.div_ceil(64)).map_err(cuda_err)?;
            let shape = format!("[{n}, {k}]");
            let secs = time(dev, 50, || dequantize_into(dev, &weight, &mut d_out))?;
            rows.push(memory_row(
                "nf4 dequantize→bf16 (dq)",
                shape.clone(),
                secs,
                w.bytes() + len * 2,
            ));
            let secs = time(dev, 50, || {
                quantize_into(dev, &d_in, 64, &w.d_code, &mut d_qout, &mut d_qabsmax)
            })?;
            rows.push(memory_row(
                "nf4 quantize bf16",
                shape,
                secs,
                len * 2 + w.packed_len + len.div_ceil(64) * 4,
            ));
        }
        Ok(rows)
    }

    /// The NF4 GEMV at every M ≤ 16 of the options, on each linear weight.
    pub fn gemv(b: &GpuBench<'_>) -> Result<Vec<KernelRow>> {
        use crate::kernels::nf4_gemm::{GemmOp, Nf4MatmulPath};
        use crate::kernels::nf4_gemv::nf4_gemv_into;
        let (dev, s) = (b.dev, b.dev.stream());
        let ms: Vec<usize> = (b.opts.ms.iter().copied())
            .filter(|&m| Nf4MatmulPath::Gemv.supports(GemmOp::Forward, m))
            .collect();
        let mut rows = Vec::new();
        if ms.is_empty() {
            return Ok(rows);
        }
        for (n, k) in b.opts.shape.linears() {
            let w = BenchWeight::new(dev, n, k, false)?;
            let weight = w.device();
            for &m in &ms {
                let d_x = s
                    .clone_htod(&bf16_normal(m * k, 1.0, 2))
                    .map_err(cuda_err)?;
                let mut d_y = s.alloc_zeros::<bf16>(m * n).map_err(cuda_err)?;
                let secs = time(dev, 200, || {
                    nf4_gemv_into(dev, &d_x, m, &weight, None::<&CudaSlice<bf16>>, &mut d_y)
                })?;
                rows.push(memory_row(
                    "nf4 gemv bf16 (dq)",
                    format!("[{m}, {n}, {k}]"),
                    secs,
                    w.bytes() + (m * k + m * n) * 2,
                ));
            }
        }
        Ok(rows)
    }

    /// Forward and input-gradient products on each linear weight at every M: cuBLAS bf16 on the
    /// dense weight, then each NF4 path that takes the shape, each as a ratio to cuBLAS. Writes
    /// the measured dispatch table when the options name a file.
    pub fn gemm(b: &GpuBench<'_>) -> Result<Vec<KernelRow>> {
        use crate::kernels::nf4_gemm::{
            dense_bf16_gemm_into, DequantCublas, GemmOp, GemmShape, Nf4Matmul, Nf4MatmulPath,
            Nf4MatmulPlan, Nf4MatmulTable, Nf4MatmulTiming,
        };
        use std::collections::BTreeMap;
        let (dev, s) = (b.dev, b.dev.stream());
        let mut mm = Nf4Matmul::new(dev, Nf4MatmulPlan::default())?;
        let dense_blas = DequantCublas::new(dev)?;
        let mut table = Nf4MatmulTable {
            device: dev.describe()?.to_string(),
            entries: Vec::new(),
        };
        let mut rows = Vec::new();
        for (n, k) in b.opts.shape.linears() {
            let w = BenchWeight::new(dev, n, k, true)?;
            let d_dense = s.clone_htod(&w.dense).map_err(cuda_err)?;
            let weight = w.device();
            for op in [GemmOp::Forward, GemmOp::InputGrad] {
                let op_name = match op {
                    GemmOp::Forward => "fwd",
                    GemmOp::InputGrad => "dgrad",
                };
                for &m in &b.opts.ms {
                    let shape = GemmShape::new(op, m, n, k, 64)?;
                    let (a_len, out_len) = shape.lens();
                    let d_a = s
                        .clone_htod(&bf16_normal(a_len, 1.0, 2))
                        .map_err(cuda_err)?;
                    let mut d_out = s.alloc_zeros::<bf16>(out_len).map_err(cuda_err)?;
                    let iters = if m <= 16 { 200 } else { 20 };
                    let dense_view = d_dense.slice(0..n * k);
                    let cublas = time(dev, iters, || {
                        dense_bf16_gemm_into(
                            dev,
                            dense_blas.blas(),
                            op,
                            &d_a,
                            m,
                            &dense_view,
                            (n, k),
                            &mut d_out,
                        )
                    })?;
                    let row = |kernel: &str, seconds: f64| KernelRow {
                        kernel: format!("gemm {op_name} {kernel}"),
                        shape: format!("[{m}, {n}, {k}]"),
                        seconds,
                        bytes: None,
                        flops: Some(shape.flops()),
                        cublas_seconds: Some(cublas),
                    };
                    rows.push(row("cuBLAS bf16 dense", cublas));
                    let mut seconds = BTreeMap::new();
                    for (path, label) in [
                        (Nf4MatmulPath::TensorCore, "nf4 tensor-core"),
                        (Nf4MatmulPath::DequantCublas, "nf4 dequant+cuBLAS"),
                        (Nf4MatmulPath::Gemv, "nf4 gemv"),
                    ] {
                        if path.supports(op, m) {
                            let t = time(dev, iters, || {
                                mm.run_path(dev, path, op, &d_a, m, &weight, &mut d_out)
                            })?;
                            rows.push(row(label, t));
                            seconds.insert(path, t);
                        }
                    }
                    table.entries.push(Nf4MatmulTiming {
                        op,
                        m,
                        n,
                        k,
                        seconds,
                    });
                }
            }
        }
        if let Some(path) = &b.opts.dispatch_table {
            table.save(path)?;
            eprintln!(
                "dispatch table written to {} (use it with {}={})",
                path.display(),
                crate::kernels::nf4_gemm::TABLE_ENV,
                path.display()
            );
        }
        Ok(rows)
    }

    /// One AdamW step (f32 parameters, gradients and moments) over the LoRA parameters of the
    /// whole model as one flat tensor.
    pub fn adamw(b: &GpuBench<'_>) -> Result<Vec<KernelRow>> {
        use crate::kernels::adamw::{self, AdamWConfig};
        let (dev, s) = (b.dev, b.dev.stream());
        let n = b.opts.shape.lora_params(16);
        let step = AdamWConfig::default().step(1, 1.0)?;
        let mut d_p = s
            .clone_htod(&crate::testing::normal_vector(n, 0.02, 1))
            .map_err(cuda_err)?;
        let d_g = s
            .clone_htod(&crate::testing::normal_vector(n, 1e-3, 2))
            .map_err(cuda_err)?;
        let mut d_m = s.alloc_zeros::<f32>(n).map_err(cuda_err)?;
        let mut d_v = s.alloc_zeros::<f32>(n).map_err(cuda_err)?;
        let secs = time(dev, 50, || {
            adamw::step(dev, &step, &mut d_p, &d_g, &mut d_m, &mut d_v)
        })?;
        // Reads param, grad, m, v; writes param, m, v: seven f32 per element.
        Ok(vec![memory_row(
            "adamw f32 (LoRA r 16, all 7)",
            format!("[{n}]"),
            secs,
            n * 4 * 7,
        )])
    }

    /// RMSNorm forward over [M, hidden], RoPE on q and k [M, heads, head_dim], SwiGLU forward
    /// over [M, intermediate], bf16, at every M.
    pub fn llama(b: &GpuBench<'_>) -> Result<Vec<KernelRow>> {
        use crate::kernels::llama::{rmsnorm_forward_into, rope, swiglu_forward_into};
        let (dev, s) = (b.dev, b.dev.stream());
        let shape = b.opts.shape;
        let (h, inter, heads, hd) = (
            shape.hidden,
            shape.intermediate,
            shape.heads,
            shape.head_dim(),
        );
        let mut rows = Vec::new();
        for &m in &b.opts.ms {
            let iters = if m <= 16 { 200 } else { 50 };
            let d_x = s
                .clone_htod(&bf16_normal(m * h, 1.0, 1))
                .map_err(cuda_err)?;
            let d_w = s.clone_htod(&bf16_normal(h, 1.0, 2)).map_err(cuda_err)?;
            let mut d_y = s.alloc_zeros::<bf16>(m * h).map_err(cuda_err)?;
            let mut d_rstd = s.alloc_zeros::<f32>(m).map_err(cuda_err)?;
            let secs = time(dev, iters, || {
                rmsnorm_forward_into(dev, &d_x, &d_w, h, 1e-5, &mut d_y, &mut d_rstd)
            })?;
            rows.push(memory_row(
                "rmsnorm fwd bf16",
                format!("[{m}, {h}]"),
                secs,
                2 * m * h * 2 + h * 2 + m * 4,
            ));
            drop((d_x, d_y));

            let half = hd / 2;
            let (mut cos, mut sin) = (Vec::with_capacity(m * half), Vec::with_capacity(m * half));
            for p in 0..m {
                for i in 0..half {
                    let angle = p as f64 / 10_000f64.powf(2.0 * i as f64 / hd as f64);
                    cos.push(angle.cos() as f32);
                    sin.push(angle.sin() as f32);
                }
            }
            let positions: Vec<i32> = (0..m as i32).collect();
            let d_cos = s.clone_htod(&cos).map_err(cuda_err)?;
            let d_sin = s.clone_htod(&sin).map_err(cuda_err)?;
            let d_pos = s.clone_htod(&positions).map_err(cuda_err)?;
            let mut d_q = s
                .clone_htod(&bf16_normal(m * h, 1.0, 3))
                .map_err(cuda_err)?;
            let mut d_k = s
                .clone_htod(&bf16_normal(m * h, 1.0, 4))
                .map_err(cuda_err)?;
            let secs = time(dev, iters, || {
                rope(
                    dev, &mut d_q, &mut d_k, &d_cos, &d_sin, &d_pos, heads, heads, hd, false,
                )
            })?;
            // q and k read and written, each token's cos/sin row and position read once.
            rows.push(memory_row(
                "rope q+k bf16",
                format!("[{m}, {heads}, {hd}]"),
                secs,
                2 * 2 * m * h * 2 + m * half * 2 * 4 + m * 4,
            ));
            drop((d_q, d_k));

            let d_g = s
                .clone_htod(&bf16_normal(m * inter, 1.0, 5))
                .map_err(cuda_err)?;
            let d_u = s
                .clone_htod(&bf16_normal(m * inter, 1.0, 6))
                .map_err(cuda_err)?;
            let mut d_h = s.alloc_zeros::<bf16>(m * inter).map_err(cuda_err)?;
            let secs = time(dev, iters, || {
                swiglu_forward_into(dev, &d_g, &d_u, &mut d_h)
            })?;
            rows.push(memory_row(
                "swiglu fwd bf16",
                format!("[{m}, {inter}]"),
                secs,
                3 * m * inter * 2,
            ));
        }
        Ok(rows)
    }

    /// Cross-entropy forward (per-row loss and log-sum-exp) and backward (the logits' gradient
    /// written over them) at every M, over the model's vocabulary.
    pub fn cross_entropy(b: &GpuBench<'_>) -> Result<Vec<KernelRow>> {
        use crate::kernels::cross_entropy::{cross_entropy_backward, cross_entropy_forward_into};
        let (dev, s) = (b.dev, b.dev.stream());
        let vocab = b.opts.shape.vocab;
        let mut rows = Vec::new();
        for &m in &b.opts.ms {
            let iters = if m <= 16 { 200 } else { 20 };
            let mut d_logits = s
                .clone_htod(&bf16_normal(m * vocab, 1.0, 1))
                .map_err(cuda_err)?;
            let labels: Vec<i32> = (0..m).map(|i| (i * 7919 % vocab) as i32).collect();
            let d_labels = s.clone_htod(&labels).map_err(cuda_err)?;
            let mut d_losses = s.alloc_zeros::<f32>(m).map_err(cuda_err)?;
            let mut d_lse = s.alloc_zeros::<f32>(m).map_err(cuda_err)?;
            let shape = format!("[{m}, {vocab}]");
            let secs = time(dev, iters, || {
                cross_entropy_forward_into(
                    dev,
                    &d_logits,
                    &d_labels,
                    vocab,
                    &mut d_losses,
                    &mut d_lse,
                )
            })?;
            rows.push(memory_row(
                "cross-entropy fwd bf16",
                shape.clone(),
                secs,
                m * vocab * 2 + m * 4 + 2 * m * 4,
            ));
            // Each call overwrites the logits with their gradient; the next reads that as logits,
            // the same work on finite values.
            let secs = time(dev, iters, || {
                cross_entropy_backward(dev, &mut d_logits, &d_labels, &d_lse, vocab, 1.0)
            })?;
            rows.push(memory_row(
                "cross-entropy bwd bf16",
                shape,
                secs,
                2 * m * vocab * 2 + m * 4 + m * 4,
            ));
        }
        Ok(rows)
    }

    /// Causal attention at batch 1, every head of the model, head_dim hidden / heads, with each
    /// M ≥ 128 as the sequence length. Flops count the causal half of the work: forward
    /// 4·H·T²·D / 2 (two T×T×D products), backward 2.5× that (five products).
    pub fn attention(b: &GpuBench<'_>) -> Result<Vec<KernelRow>> {
        let mut rows = Vec::new();
        for &t in b.opts.ms.iter().filter(|&&m| m >= 128) {
            rows.extend(attention_at::<bf16>(b, t, "bf16")?);
            rows.extend(attention_at::<f32>(b, t, "f32")?);
        }
        Ok(rows)
    }

    fn attention_at<T: crate::kernels::launch::Element>(
        b: &GpuBench<'_>,
        seq: usize,
        dtype: &str,
    ) -> Result<Vec<KernelRow>> {
        use crate::kernels::attention::{
            attention_backward_into, attention_forward, attention_forward_into, AttentionShape,
            DeviceAttentionGrads, DeviceAttentionInputs,
        };
        let (dev, s) = (b.dev, b.dev.stream());
        let heads = b.opts.shape.heads;
        let shape = AttentionShape::new(1, heads, heads, seq, b.opts.shape.head_dim())?;
        let upload = |n: usize, seed: u64| {
            let v: Vec<T> = crate::testing::normal_vector(n, 1.0, seed)
                .into_iter()
                .map(T::from_f32)
                .collect();
            s.clone_htod(&v).map_err(cuda_err)
        };
        let (q, k, v) = (
            upload(shape.q_len(), 1)?,
            upload(shape.kv_len(), 2)?,
            upload(shape.kv_len(), 3)?,
        );
        let d_o = upload(shape.q_len(), 4)?;
        let inputs = DeviceAttentionInputs {
            q: &q,
            k: &k,
            v: &v,
            key_mask: None,
        };
        let (mut o, mut lse) = attention_forward(dev, &shape, &inputs)?;
        let fwd = time(dev, 10, || {
            attention_forward_into(dev, &shape, &inputs, &mut o, &mut lse)
        })?;
        let mut grads = DeviceAttentionGrads::alloc(dev, &shape)?;
        let bwd = time(dev, 10, || {
            attention_backward_into(dev, &shape, &inputs, &o, &lse, &d_o, &mut grads)
        })?;
        let (h, t, d) = (heads as f64, seq as f64, shape.head_dim as f64);
        let fwd_flops = 4.0 * h * t * t * d / 2.0;
        let desc = format!("[1, {heads}, {seq}, {}]", shape.head_dim);
        let row = |kernel: String, seconds: f64, flops: f64| KernelRow {
            kernel,
            shape: desc.clone(),
            seconds,
            bytes: None,
            flops: Some(flops),
            cublas_seconds: None,
        };
        Ok(vec![
            row(format!("attention fwd {dtype}"), fwd, fwd_flops),
            row(format!("attention bwd {dtype}"), bwd, 2.5 * fwd_flops),
        ])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lora_params_of_13b_count_all_seven_linears() {
        // Per layer: 4 × 16 × 10240 + 2 × 16 × 18944 + 16 × 18944 = 1 564 672; 40 layers.
        assert_eq!(ModelShape::LLAMA2_13B.lora_params(16), 62_586_880);
    }

    #[test]
    fn rows_derive_rates_and_ratios() {
        let row = KernelRow {
            kernel: "k".into(),
            shape: "[1]".into(),
            seconds: 2e-3,
            bytes: Some(4e9),
            flops: Some(8e12),
            cublas_seconds: Some(1e-3),
        };
        assert_eq!(row.gbs(), Some(2000.0));
        assert_eq!(row.percent_of_peak(4000.0), Some(50.0));
        assert_eq!(row.tflops(), Some(4000.0));
        assert_eq!(row.ratio_to_cublas(), Some(0.5));
        let line = table_row(&row, 4000.0);
        assert!(line.contains("2000.0") && line.contains("0.50"), "{line}");
    }

    #[test]
    fn select_rejects_unknown_families_and_defaults_to_all() {
        assert_eq!(select(&[]).unwrap().len(), KERNELS.len());
        assert_eq!(select(&["gemm"]).unwrap()[0].name, "gemm");
        assert!(select(&["attention?"]).is_err());
        assert!(ModelShape::by_name("70b").is_err());
    }
}
