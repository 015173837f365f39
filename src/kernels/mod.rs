//! CUDA kernels, each with three backends side by side: a plain Rust reference, the same `.cu`
//! source run on the CPU through the emulation in `kernels/emu/`, and (feature `cuda`) the fatbin
//! built by nvcc launched through cudarc.

pub mod abi;
pub mod adamw;
pub mod attention;
pub mod cross_entropy;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod device;
pub mod driver;
pub mod emu;
pub mod launch;
pub mod llama;
pub mod lora;
pub mod nf4;
pub mod nf4_gemm;
pub mod nf4_gemv;
pub mod paged;
pub mod toolchain;

pub use launch::{Kernel, LaunchConfig};
