//! GPU bench of the NF4 kernels at Llama-2-13B weight shapes: time per call, effective GB/s
//! (bytes read + written) and % of the device's theoretical DRAM bandwidth. Without a GPU (no
//! `cuda` feature, no driver, or the stub driver) it says so and exits 0.

#[cfg(not(feature = "cuda"))]
fn main() {
    println!("nf4_gpu: built without the `cuda` feature; nothing to measure (cargo bench --features cuda --bench nf4_gpu)");
}

#[cfg(feature = "cuda")]
fn main() {
    use half::bf16;
    use qlora::kernels::cuda::CudaDevice;
    use qlora::kernels::nf4::{dequantize_cuda_into, quantize_cuda_into, DeviceScales};
    use qlora::quant::dynamic8::dynamic_map_signed;
    use qlora::quant::nf4::{double_quantize, quantize_nf4, NF4_CODE};

    let Some(dev) = CudaDevice::first_available() else {
        println!("nf4_gpu: no CUDA device; skipped");
        return;
    };
    let info = dev.describe().expect("device attributes");
    println!("{info}");
    let s = dev.stream().clone();
    // Llama-2-13B: q/k/v/o are 5120×5120, gate/up 13824×5120, down 5120×13824.
    let shapes = [(5120usize, 5120usize), (13824, 5120)];
    println!(
        "{:<22} {:>10} {:>10} {:>8}",
        "kernel [out, in]", "us/call", "GB/s", "% peak"
    );
    for (rows, cols) in shapes {
        let n = rows * cols;
        let input = qlora::testing::normal_vector(n, 0.02, 1);
        let input_bf16: Vec<bf16> = input.iter().map(|&x| bf16::from_f32(x)).collect();
        let (packed, absmax) = quantize_nf4(&input, 64).expect("quantize");
        let dq = double_quantize(&absmax, 256).expect("double quant");
        let d_in = s.clone_htod(&input_bf16).unwrap();
        let d_code = s.clone_htod(&NF4_CODE).unwrap();
        let d_packed = s.clone_htod(&packed).unwrap();
        let d_q = s.clone_htod(&dq.absmax_q).unwrap();
        let d_na = s.clone_htod(&dq.nested_absmax).unwrap();
        let d_nc = s.clone_htod(&dynamic_map_signed()).unwrap();
        let mut d_out = s.alloc_zeros::<bf16>(n).unwrap();
        let mut d_qout = s.alloc_zeros::<u8>(packed.len()).unwrap();
        let mut d_qabsmax = s.alloc_zeros::<f32>(absmax.len()).unwrap();

        let time = |label: &str, bytes: usize, f: &mut dyn FnMut()| {
            let secs = dev.seconds_per_call(50, f).unwrap();
            let gbs = bytes as f64 / secs / 1e9;
            println!(
                "{:<22} {:>10.1} {:>10.1} {:>7.1}%",
                format!("{label} [{rows}, {cols}]"),
                secs * 1e6,
                gbs,
                100.0 * gbs / info.peak_bandwidth_gbs
            );
        };
        let scale_bytes = dq.absmax_q.len() + dq.nested_absmax.len() * 4;
        time(
            "dequant→bf16 (dq)",
            n / 2 + scale_bytes + n * 2,
            &mut || {
                let scales = DeviceScales::Double {
                    absmax_q: &d_q,
                    nested_absmax: &d_na,
                    nested_code: &d_nc,
                    offset: dq.offset,
                    nested_blocksize: 256,
                };
                dequantize_cuda_into(&dev, &d_packed, scales, 64, &d_code, &mut d_out).unwrap();
            },
        );
        time(
            "quantize bf16",
            n * 2 + n / 2 + absmax.len() * 4,
            &mut || {
                quantize_cuda_into(&dev, &d_in, 64, &d_code, &mut d_qout, &mut d_qabsmax).unwrap();
            },
        );
    }
}
