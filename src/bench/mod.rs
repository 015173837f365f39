//! Benchmarks shared by the `cargo bench` targets and `qlora bench`: GPU kernel timings at
//! Llama-2 weight shapes (`kernels`, a registry of kernel families) and one QLoRA training step on
//! the CPU beside PyTorch + PEFT (`train_step`).

pub mod kernels;
pub mod train_step;
