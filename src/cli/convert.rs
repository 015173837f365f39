//! `qlora convert`: a llama.cpp GGUF file written as a Hugging Face model folder (docs/
//! ARCHITECTURE.md, "Model sources: GGUF").

use std::path::PathBuf;
use std::time::Instant;

use crate::cli::merge::{parse_shard_size, DtypeArg};
use crate::model::gguf::GgufFile;
use crate::Result;

/// Write a GGUF model as a Hugging Face folder.
#[derive(clap::Args, Debug, Clone)]
#[command(
    long_about = "Write a llama.cpp GGUF model (Llama architecture) as a Hugging Face model \
        folder.\n\n\
        Each tensor is dequantized from its GGML type (Q/K rows put back in Hugging Face order) \
        and written in --dtype: model.safetensors or shards with model.safetensors.index.json, \
        config.json from the file's metadata, tokenizer.json and tokenizer_config.json (special \
        tokens, chat template) from its tokenizer metadata. transformers and qlora load the \
        folder like any other; a quantized GGUF gives the dequantized values, not the model it \
        was quantized from."
)]
pub struct ConvertArgs {
    /// The GGUF file.
    #[arg(long, value_name = "FILE.gguf")]
    pub gguf: PathBuf,
    /// The folder to write (created if missing; a checkpoint already in it is replaced).
    #[arg(long, value_name = "DIR")]
    pub output: PathBuf,
    /// Dtype of the written weights.
    #[arg(long, value_enum, default_value = "bf16")]
    pub dtype: DtypeArg,
    /// The largest shard ("5GB", "500MB": decimal units, or a number of bytes).
    #[arg(long, default_value = "5GB", value_parser = parse_shard_size)]
    pub max_shard_size: u64,
}

/// Runs `qlora convert`.
pub fn run(args: &ConvertArgs) -> Result<()> {
    let t0 = Instant::now();
    let file = GgufFile::open(&args.gguf)?;
    let written = file.write_hf_folder(&args.output, args.dtype.torch(), args.max_shard_size)?;
    println!(
        "converted {} to {:?}: {:.2} MiB in {} file(s), {:.1} s",
        args.gguf.display(),
        args.dtype,
        written.total_bytes as f64 / (1024.0 * 1024.0),
        written.files.len(),
        t0.elapsed().as_secs_f64()
    );
    for f in &written.files {
        println!("wrote {}", f.display());
    }
    println!("wrote config.json, tokenizer.json, tokenizer_config.json");
    Ok(())
}
