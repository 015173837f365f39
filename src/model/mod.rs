//! The Llama model: `config.json` parsing and validation with the RoPE inverse frequencies
//! (`config`), and checkpoint loading from one safetensors file or shards, dense or NF4 (`weights`);
//! the forward, backward and generation run on the CPU or, with feature `cuda`, a CUDA device.

pub mod adapter;
pub mod backward;
pub mod config;
#[cfg(feature = "cuda")]
mod cuda;
pub mod fused;
mod fused_lora;
mod fused_loss;
pub mod generate;
pub mod gguf;
pub mod gguf_write;
pub mod init;
pub mod kv_cache;
pub mod llama;
pub(crate) mod matmul;
mod nf4_host;
pub mod quantize_dir;
pub mod source;
pub mod tokenizer;
pub mod weights;

pub use config::{BnbQuantConfig, LlamaConfig, RopeScaling, TorchDtype};
pub use fused::KernelPath;
pub(crate) use fused_loss::chunk_rows as loss_chunk_rows;
pub use weights::{LayerWeights, Linear, LlamaWeights, LoadOptions};
