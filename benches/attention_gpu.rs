//! GPU bench of causal attention at Llama-2-13B shapes (40 heads, head_dim 128, batch 1, T 2048
//! and 4096, bf16 and f32): forward and backward time per call and TFLOP/s of the causal work.
//! Without a GPU (no `cuda` feature, no driver, or the stub driver) it says so and exits 0. The
//! measurement is `qlora::bench::kernels` (family "attention"), shared with `qlora bench kernels`.

fn main() -> std::process::ExitCode {
    qlora::bench::kernels::bench_target("attention_gpu", &["attention"], &[2048, 4096])
}
