//! Parameter-efficient fine-tuning methods, file-compatible with Hugging Face PEFT: `lora` holds
//! LoRA adapters (A `[r, in]`, B `[out, r]` per adapted linear), their PEFT initialisation, the
//! forward delta and the PEFT adapter directory (`adapter_config.json` + `adapter_model.safetensors`);
//! `merge` folds an adapter into its base model and writes the merged model folder.

pub mod base_record;
pub mod export;
pub mod lora;
pub mod merge;

pub use lora::{LoraAdapter, LoraConfig, LoraMode, LoraPair, TargetModule};
