//! GPU bench of the NF4 GEMV (decode path) at Llama-2-13B weight shapes, M = 1 and 16: time per
//! call, effective GB/s of the bytes moved (codes + scales + x + y, each once) and % of the
//! device's theoretical DRAM bandwidth. Without a GPU (no `cuda` feature, no driver, or the stub
//! driver) it says so and exits 0.

#[cfg(not(feature = "cuda"))]
fn main() {
    println!("nf4_gemv_gpu: built without the `cuda` feature; nothing to measure (cargo bench --features cuda --bench nf4_gemv_gpu)");
}

#[cfg(feature = "cuda")]
fn main() {
    use half::bf16;
    use qlora::kernels::cuda::CudaDevice;
    use qlora::kernels::nf4::DeviceScales;
    use qlora::kernels::nf4_gemv::{nf4_gemv_cuda_into, DeviceNf4Weight};
    use qlora::quant::nf4::{double_quantize, quantize_nf4, NF4_CODE};

    let Some(dev) = CudaDevice::first_available() else {
        println!("nf4_gemv_gpu: no CUDA device; skipped");
        return;
    };
    let info = dev.describe().expect("device attributes");
    println!("{info}");
    let s = dev.stream().clone();
    // Llama-2-13B [out, in]: q/k/v/o 5120×5120, gate/up 13824×5120, down 5120×13824.
    let shapes = [(5120usize, 5120usize), (13824, 5120), (5120, 13824)];
    println!(
        "{:<34} {:>10} {:>10} {:>8}",
        "gemv bf16, dq, bs 64 [m, n, k]", "us/call", "GB/s", "% peak"
    );
    for (n, k) in shapes {
        let w = qlora::testing::normal_vector(n * k, 0.02, 1);
        let (packed, absmax) = quantize_nf4(&w, 64).expect("quantize");
        let dq = double_quantize(&absmax, 256).expect("double quant");
        let d_packed = s.clone_htod(&packed).unwrap();
        let d_code = s.clone_htod(&NF4_CODE).unwrap();
        let d_q = s.clone_htod(&dq.absmax_q).unwrap();
        let d_na = s.clone_htod(&dq.nested_absmax).unwrap();
        let d_nc = s.clone_htod(&dq.nested_code).unwrap();
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
        for m in [1usize, 16] {
            let x: Vec<bf16> = qlora::testing::normal_vector(m * k, 1.0, 2)
                .iter()
                .map(|&v| bf16::from_f32(v))
                .collect();
            let d_x = s.clone_htod(&x).unwrap();
            let mut d_y = s.alloc_zeros::<bf16>(m * n).unwrap();
            let bytes =
                packed.len() + dq.absmax_q.len() + dq.nested_absmax.len() * 4 + (m * k + m * n) * 2;
            let secs = dev
                .seconds_per_call(200, || {
                    nf4_gemv_cuda_into(&dev, &d_x, m, &weight, None::<&_>, &mut d_y).unwrap();
                })
                .unwrap();
            let gbs = bytes as f64 / secs / 1e9;
            println!(
                "{:<34} {:>10.1} {:>10.1} {:>7.1}%",
                format!("[{m}, {n}, {k}]"),
                secs * 1e6,
                gbs,
                100.0 * gbs / info.peak_bandwidth_gbs
            );
        }
    }
}
