//! GPU bench of causal attention at Llama-2-13B shapes (40 heads, head_dim 128, B 1, T 2048, bf16
//! and f32): forward and backward time per call and TFLOP/s of the causal work (forward
//! 4·B·H·T²·D / 2; backward 2.5× that: five T×T×D products against the forward's two). Without a
//! GPU (no `cuda` feature, no driver, or the stub driver) it says so and exits 0.

#[cfg(not(feature = "cuda"))]
fn main() {
    println!("attention_gpu: built without the `cuda` feature; nothing to measure (cargo bench --features cuda --bench attention_gpu)");
}

#[cfg(feature = "cuda")]
fn main() {
    use half::bf16;
    use qlora::kernels::cuda::CudaDevice;

    let Some(dev) = CudaDevice::first_available() else {
        println!("attention_gpu: no CUDA device; skipped");
        return;
    };
    println!("{}", dev.describe().expect("device attributes"));
    println!(
        "{:<40} {:>10} {:>9} {:>10} {:>9}",
        "causal attention [B, H, T, D]", "fwd ms", "TFLOP/s", "bwd ms", "TFLOP/s"
    );
    run::<bf16>(&dev, "bf16");
    run::<f32>(&dev, "f32");
}

#[cfg(feature = "cuda")]
fn run<T: qlora::kernels::launch::Element>(dev: &qlora::kernels::cuda::CudaDevice, name: &str) {
    use qlora::kernels::attention::*;

    let shape = AttentionShape::new(1, 40, 40, 2048, 128).expect("shape");
    let s = dev.stream().clone();
    let upload = |n: usize, seed: u64| {
        let v: Vec<T> = qlora::testing::normal_vector(n, 1.0, seed)
            .into_iter()
            .map(T::from_f32)
            .collect();
        s.clone_htod(&v).unwrap()
    };
    let (q, k, v) = (
        upload(shape.q_len(), 1),
        upload(shape.kv_len(), 2),
        upload(shape.kv_len(), 3),
    );
    let d_o = upload(shape.q_len(), 4);
    let inputs = DeviceAttentionInputs {
        q: &q,
        k: &k,
        v: &v,
        key_mask: None,
    };
    let (mut o, mut lse) = attention_forward_cuda(dev, &shape, &inputs).unwrap();
    let fwd = dev
        .seconds_per_call(10, || {
            attention_forward_cuda_into(dev, &shape, &inputs, &mut o, &mut lse).unwrap();
        })
        .unwrap();
    let mut grads = DeviceAttentionGrads::<T>::alloc(dev, &shape).unwrap();
    let bwd = dev
        .seconds_per_call(10, || {
            attention_backward_cuda_into(dev, &shape, &inputs, (&o, &lse, &d_o), &mut grads)
                .unwrap();
        })
        .unwrap();
    let (b, h, t, d) = (
        shape.batch as f64,
        shape.q_heads as f64,
        shape.seq as f64,
        shape.head_dim as f64,
    );
    let fwd_flop = 4.0 * b * h * t * t * d / 2.0;
    let bwd_flop = 2.5 * fwd_flop;
    println!(
        "{:<40} {:>10.3} {:>9.2} {:>10.3} {:>9.2}",
        format!("{name} [1, 40, 2048, 128]"),
        fwd * 1e3,
        fwd_flop / fwd / 1e12,
        bwd * 1e3,
        bwd_flop / bwd / 1e12
    );
}
