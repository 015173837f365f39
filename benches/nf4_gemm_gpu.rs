//! GPU bench of the NF4 products at Llama-2-13B weight shapes (M = 16, 2048, 4096 tokens; forward
//! y = x·Wᵀ and input gradient dx = dy·W; bf16 activations and output, blocks of 64, double
//! quant): time per call and TFLOP/s of the tensor-core kernel, of dequantize + cuBLAS and (M ≤ 16
//! forward) of the GEMV, each as a ratio to cuBLAS bf16 on the dense bf16 weight. Writes the
//! measured table the dispatcher reads (`QLORA_NF4_GEMM_TABLE`, default
//! `target/nf4_gemm_dispatch.json`). Without a GPU it says so and exits 0.

#[cfg(not(feature = "cuda"))]
fn main() {
    println!("nf4_gemm_gpu: built without the `cuda` feature; nothing to measure (cargo bench --features cuda --bench nf4_gemm_gpu)");
}

#[cfg(feature = "cuda")]
fn main() {
    use half::bf16;
    use qlora::kernels::cuda::CudaDevice;
    use qlora::kernels::nf4::DeviceScales;
    use qlora::kernels::nf4_gemm::{
        dense_bf16_gemm_into, DequantCublas, GemmOp, GemmShape, Nf4Matmul, Nf4MatmulPath,
        Nf4MatmulPlan, Nf4MatmulTable, Nf4MatmulTiming, TABLE_ENV,
    };
    use qlora::kernels::nf4_gemv::DeviceNf4Weight;
    use qlora::quant::nf4::{double_quantize, quantize_nf4, NF4_CODE};
    use std::collections::BTreeMap;
    use std::path::PathBuf;

    let Some(dev) = CudaDevice::first_available() else {
        println!("nf4_gemm_gpu: no CUDA device; skipped");
        return;
    };
    let info = dev.describe().expect("device attributes");
    println!("{info}");
    let s = dev.stream().clone();
    let mut mm = Nf4Matmul::new(&dev, Nf4MatmulPlan::default()).expect("cuBLAS handle");
    let dense_blas = DequantCublas::new(&dev).expect("cuBLAS handle");
    let mut table = Nf4MatmulTable {
        device: info.to_string(),
        entries: Vec::new(),
    };
    // Llama-2-13B [out, in]: q/k/v/o 5120×5120, gate/up 13824×5120, down 5120×13824.
    let shapes = [(5120usize, 5120usize), (13824, 5120), (5120, 13824)];
    println!(
        "{:<10} {:<20} {:>10} {:>8} | {:>10} {:>8} {:>7} | {:>10} {:>8} {:>7} | {:>10} {:>7}",
        "op",
        "[m, n, k]",
        "cuBLAS ms",
        "TFLOP/s",
        "tc ms",
        "TFLOP/s",
        "tc/cuB",
        "dq+cuB ms",
        "TFLOP/s",
        "dq/cuB",
        "gemv ms",
        "gv/cuB"
    );
    for (n, k) in shapes {
        let w = qlora::testing::normal_vector(n * k, 0.02, 1);
        let (packed, absmax) = quantize_nf4(&w, 64).expect("quantize");
        let dq = double_quantize(&absmax, 256).expect("double quant");
        let dense: Vec<bf16> =
            qlora::quant::nf4::dequantize_nf4(&packed, &absmax, n * k, 64, &NF4_CODE)
                .expect("dequantize")
                .into_iter()
                .map(bf16::from_f32)
                .collect();
        drop(w);
        let d_packed = s.clone_htod(&packed).unwrap();
        let d_code = s.clone_htod(&NF4_CODE).unwrap();
        let d_q = s.clone_htod(&dq.absmax_q).unwrap();
        let d_na = s.clone_htod(&dq.nested_absmax).unwrap();
        let d_nc = s.clone_htod(&dq.nested_code).unwrap();
        let d_dense = s.clone_htod(&dense).unwrap();
        let weight = DeviceNf4Weight {
            packed: &d_packed,
            scales: DeviceScales::Double {
                absmax_q: &d_q,
                nested_absmax: &d_na,
                nested_code: &d_nc,
                offset: dq.offset,
                nested_blocksize: 256,
            },
            n,
            k,
            blocksize: 64,
            code: &d_code,
        };
        for op in [GemmOp::Forward, GemmOp::InputGrad] {
            for m in [16usize, 2048, 4096] {
                let shape = GemmShape::new(op, m, n, k, 64).expect("shape");
                let (a_len, out_len) = shape.lens();
                let a: Vec<bf16> = qlora::testing::normal_vector(a_len, 1.0, 2)
                    .iter()
                    .map(|&v| bf16::from_f32(v))
                    .collect();
                let d_a = s.clone_htod(&a).unwrap();
                let mut d_out = s.alloc_zeros::<bf16>(out_len).unwrap();
                let iters = if m <= 16 { 200 } else { 20 };
                let dense_view = d_dense.slice(0..n * k);
                let cublas = dev
                    .seconds_per_call(iters, || {
                        dense_bf16_gemm_into(
                            &dev,
                            dense_blas.blas(),
                            op,
                            &d_a,
                            m,
                            &dense_view,
                            (n, k),
                            &mut d_out,
                        )
                        .unwrap();
                    })
                    .unwrap();
                let mut seconds = BTreeMap::new();
                for path in [
                    Nf4MatmulPath::TensorCore,
                    Nf4MatmulPath::DequantCublas,
                    Nf4MatmulPath::Gemv,
                ] {
                    if path.supports(op, m) {
                        let t = dev
                            .seconds_per_call(iters, || {
                                mm.run_path(&dev, path, op, &d_a, m, &weight, &mut d_out)
                                    .unwrap();
                            })
                            .unwrap();
                        seconds.insert(path, t);
                    }
                }
                let tflops = |t: f64| shape.flops() / t / 1e12;
                let col = |p: Nf4MatmulPath| {
                    seconds.get(&p).map_or_else(
                        || format!("{:>10} {:>8} {:>7}", "-", "-", "-"),
                        |&t| {
                            format!(
                                "{:>10.3} {:>8.1} {:>6.0}%",
                                t * 1e3,
                                tflops(t),
                                100.0 * cublas / t
                            )
                        },
                    )
                };
                let gemv = seconds.get(&Nf4MatmulPath::Gemv).map_or_else(
                    || format!("{:>10} {:>7}", "-", "-"),
                    |&t| format!("{:>10.3} {:>6.0}%", t * 1e3, 100.0 * cublas / t),
                );
                println!(
                    "{:<10} {:<20} {:>10.3} {:>8.1} | {} | {} | {}",
                    format!("{op:?}"),
                    format!("[{m}, {n}, {k}]"),
                    cublas * 1e3,
                    tflops(cublas),
                    col(Nf4MatmulPath::TensorCore),
                    col(Nf4MatmulPath::DequantCublas),
                    gemv
                );
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
    let path = std::env::var_os(TABLE_ENV).map_or_else(
        || {
            let target = std::env::var_os("CARGO_TARGET_DIR")
                .map_or_else(|| PathBuf::from("target"), PathBuf::from);
            target.join("nf4_gemm_dispatch.json")
        },
        PathBuf::from,
    );
    match table.save(&path) {
        Ok(()) => println!(
            "dispatch table written to {} (use it with {TABLE_ENV}={})",
            path.display(),
            path.display()
        ),
        Err(e) => println!("could not write the dispatch table: {e}"),
    }
}
