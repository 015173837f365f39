//! GPU bench of the NF4 products at Llama-2-13B weight shapes (M = 16, 2048, 4096 tokens; forward
//! y = x·Wᵀ and input gradient dx = dy·W; bf16 activations and output, blocks of 64, double
//! quant): time per call and TFLOP/s of cuBLAS bf16 on the dense bf16 weight, of the tensor-core
//! kernel, of dequantize + cuBLAS and (M ≤ 16 forward) of the GEMV, each as a ratio to cuBLAS.
//! Writes the measured table the dispatcher reads (`QLORA_NF4_GEMM_TABLE`, default
//! `target/nf4_gemm_dispatch.json`). Without a GPU it says so and exits 0. The measurement is
//! `qlora::bench::kernels` (family "gemm").

fn main() -> std::process::ExitCode {
    qlora::bench::kernels::bench_target("nf4_gemm_gpu", &["gemm"], &[16, 2048, 4096])
}
