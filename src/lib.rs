//! qlora: QLoRA and parameter-efficient fine-tuning of Llama-family models on custom CUDA kernels.
//!
//! Layers, bottom up: `quant` (NF4 format, bitsandbytes-compatible), `kernels` (CUDA kernels with
//! their CPU reference and CPU emulation), then the model, PEFT methods and trainer, and `cli`,
//! the `qlora` binary's subcommands.

pub mod bench;
pub mod cli;
pub mod error;
pub mod hf;
pub mod kernels;
pub mod model;
pub mod peft;
pub mod quant;
pub mod testing;
pub mod tolerance;
pub mod train;

pub use error::{Error, Result};
