//! GPU bench of the NF4 GEMV (decode path) at Llama-2-13B weight shapes, M = 1 and 16: time per
//! call, effective GB/s of the bytes moved (codes + scales + x + y, each once) and % of the
//! device's theoretical DRAM bandwidth. Without a GPU (no `cuda` feature, no driver, or the stub
//! driver) it says so and exits 0. The measurement is `qlora::bench::kernels` (family "gemv").

fn main() -> std::process::ExitCode {
    qlora::bench::kernels::bench_target("nf4_gemv_gpu", &["gemv"], &[1, 16])
}
