//! Hugging Face model folders on disk, the lowest layer above `error`: the checkpoint
//! (`model.safetensors` or index + shards) memory-mapped and read by tensor name (`checkpoint`),
//! folders written back shard by shard with their config and tokenizer files (`folder`), and JSON
//! in Python's `json.dumps` style (`json`), and safetensors or JSON files read with errors that name
//! the file and tensor (`file`). Nothing here knows what a Llama, an NF4 weight or an
//! adapter is; `quant`, `model` and `peft` build on it.

pub mod checkpoint;
pub mod file;
pub mod folder;
pub mod json;
