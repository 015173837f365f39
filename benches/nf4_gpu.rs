//! GPU bench of the NF4 kernels at Llama-2-13B weight shapes: time per call, effective GB/s
//! (bytes read + written) and % of the device's theoretical DRAM bandwidth. Without a GPU (no
//! `cuda` feature, no driver, or the stub driver) it says so and exits 0. The measurement is
//! `qlora::bench::kernels` (family "nf4"), shared with `qlora bench kernels`.

fn main() -> std::process::ExitCode {
    qlora::bench::kernels::bench_target("nf4_gpu", &["nf4"], &[1])
}
