//! qlora: QLoRA and parameter-efficient fine-tuning of Llama-family models on custom CUDA kernels.
//!
//! Layers, bottom up (a module imports only from layers below it; `tests/layering.rs` holds the
//! table and enforces it, docs/ARCHITECTURE.md explains it): `error` and `tolerance`; `hf`
//! (Hugging Face folders on disk); `quant` (NF4 format, bitsandbytes-compatible); `testing`;
//! `kernels` (CUDA kernels with their CPU reference and CPU emulation); `model` (the Llama model
//! and the LoRA adapter it consumes); `peft` (PEFT adapter folders, merging); `train`; `bench`;
//! and `cli`, the `qlora` binary's subcommands.

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
