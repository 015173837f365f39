//! `qlora merge`: a PEFT LoRA adapter folded into its base model (`W + s·B·A` per adapted linear,
//! in f32 from the base's values, NF4 bases dequantized), written as a standalone Hugging Face
//! model folder, optionally with the error re-quantizing it to NF4 would add. The base may be a
//! GGUF file (docs/ARCHITECTURE.md, "Merging").

use std::path::PathBuf;
use std::time::Instant;

use crate::hf::folder::parse_size;
use crate::model::config::TorchDtype;
use crate::peft::base_record::{BaseRecord, BASE_RECORD_FILE};
use crate::peft::merge::{merge_adapter_dir, BaseWeights, MergeOptions, RequantizeReport};
use crate::{Error, Result};

const MIB: f64 = 1024.0 * 1024.0;

/// A floating-point dtype on the command line.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum DtypeArg {
    #[value(alias = "float32")]
    F32,
    #[value(alias = "float16")]
    F16,
    #[value(alias = "bfloat16")]
    Bf16,
}

impl DtypeArg {
    pub fn torch(self) -> TorchDtype {
        match self {
            DtypeArg::F32 => TorchDtype::F32,
            DtypeArg::F16 => TorchDtype::F16,
            DtypeArg::Bf16 => TorchDtype::BF16,
        }
    }
}

/// clap's parser for `--max-shard-size` (see [`parse_size`]).
pub fn parse_shard_size(text: &str) -> std::result::Result<u64, String> {
    parse_size(text).map_err(|e| e.to_string())
}

/// Merge a LoRA adapter into its base model and write a standalone Hugging Face model folder.
#[derive(clap::Args, Debug, Clone)]
#[command(
    long_about = "Merge a LoRA adapter into its base model and write a standalone Hugging Face \
        model folder.\n\n\
        Every adapted linear becomes W + scaling·B·A (scaling = alpha/r, or alpha/sqrt(r) with \
        rsLoRA), computed in f32 from the base's stored values; an NF4 (bitsandbytes) base is \
        dequantized to its original dtype first, exactly as the forward uses it; a llama.cpp \
        GGUF base is dequantized as `--model FILE.gguf` loads it. Tensors are \
        read and written one at a time, so memory stays near the largest tensor. The output \
        holds model.safetensors (or shards with model.safetensors.index.json), config.json \
        without quantization_config and with torch_dtype set, and the base's tokenizer and \
        generation files (a GGUF base's tokenizer as `qlora convert` writes it). transformers \
        loads it with from_pretrained; qlora loads it with no adapter. `qlora export` merges \
        the same way into a GGUF file."
)]
pub struct MergeArgs {
    /// The base model folder: config.json + model.safetensors or shards; dense (f32, f16, bf16)
    /// or bitsandbytes NF4 pre-quantized; or a llama.cpp GGUF file.
    #[arg(long, value_name = "DIR|FILE.gguf")]
    pub base: PathBuf,
    /// The PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors).
    #[arg(long, value_name = "DIR")]
    pub adapter: PathBuf,
    /// The folder to write (created if missing; a checkpoint already in it is replaced).
    #[arg(long, value_name = "DIR")]
    pub output: PathBuf,
    /// Dtype of the merged model's weights.
    #[arg(long, value_enum, default_value = "bf16")]
    pub dtype: DtypeArg,
    /// The largest shard, as Hugging Face writes it ("5GB", "500MB", "60KB": decimal units, or a
    /// number of bytes); a larger tensor gets a shard of its own.
    #[arg(long, default_value = "5GB", value_parser = parse_shard_size)]
    pub max_shard_size: u64,
    /// Also measure what re-quantizing the merged model to NF4 (blocks of 64, double quant, as
    /// `qlora quantize` does) would lose: relative and max absolute error per linear and overall,
    /// printed and written to this JSON file.
    #[arg(long, value_name = "FILE")]
    pub requantize_report: Option<PathBuf>,
    /// The base weights to merge into. `trained` (default): those the adapter trained against,
    /// from its qlora_base.json: an adapter trained on NF4 quantized on load is merged into the
    /// dense base quantized and dequantized exactly as training loaded it, which keeps what the
    /// adapter learned. `original`: the dense weights as stored (prints how far they are from
    /// what the adapter trained against).
    #[arg(long, value_enum, default_value = "trained")]
    pub base_weights: BaseWeightsArg,
}

/// `--base-weights`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum BaseWeightsArg {
    Trained,
    Original,
}

/// Runs `qlora merge`.
pub fn run(args: &MergeArgs) -> Result<()> {
    let options = MergeOptions {
        dtype: args.dtype.torch(),
        max_shard_bytes: args.max_shard_size,
        requantize_report: args.requantize_report.is_some(),
        base_weights: match args.base_weights {
            BaseWeightsArg::Trained => BaseWeights::Trained,
            BaseWeightsArg::Original => BaseWeights::Original,
        },
    };
    let t0 = Instant::now();
    let s = merge_adapter_dir(&args.base, &args.adapter, &args.output, &options)?;
    println!(
        "merged {} linears{} into {:?} weights: {:.2} MiB in {} file(s), {:.1} s",
        s.merged_modules,
        if s.nf4_modules > 0 {
            format!(" ({} NF4 base linears dequantized)", s.nf4_modules)
        } else {
            String::new()
        },
        args.dtype,
        s.total_bytes as f64 / MIB,
        s.files.len(),
        t0.elapsed().as_secs_f64()
    );
    print_base_weights(&s.record, s.requantized_modules, s.original_vs_trained);
    for f in &s.files {
        println!("wrote {}", f.display());
    }
    if !s.copied_files.is_empty() {
        println!("copied {}", s.copied_files.join(", "));
    }
    if let (Some(report), Some(path)) = (&s.report, &args.requantize_report) {
        print_report(report);
        let json = serde_json::to_string_pretty(report)
            .map_err(|e| Error::encode(path.display().to_string(), e))?
            + "\n";
        std::fs::write(path, json).map_err(|e| Error::io(path, e))?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

/// What an adapter was merged into: the weights it trained against (from its record), or the
/// original weights with a warning that measures how far they are from those.
pub fn print_base_weights(
    record: &Option<BaseRecord>,
    requantized_modules: usize,
    original_vs_trained: Option<f64>,
) {
    match (record, original_vs_trained) {
        (None, _) => println!(
            "the adapter has no {BASE_RECORD_FILE}: merged into the base weights as stored"
        ),
        (Some(r), None) if requantized_modules > 0 => println!(
            "the adapter trained against NF4 quantized on load (blocks of {}, from {}): {} dense \
             linears quantized and dequantized as training loaded them before merging \
             (--base-weights original merges into the stored weights)",
            r.blocksize.unwrap_or_default(),
            r.quantized_from.as_deref().unwrap_or("?"),
            requantized_modules
        ),
        (Some(r), None) => println!("the adapter trained against {:?} base linears", r.linears),
        (Some(_), Some(change)) => eprintln!(
            "warning: the adapter trained against NF4 weights, and the original weights it is \
             merged into differ from them by {:.2}% (relative RMS over the merged linears); \
             what it learned may not carry over (drop --base-weights original to merge into \
             the weights it trained against)",
            100.0 * change
        ),
    }
}

fn print_report(report: &RequantizeReport) {
    println!(
        "re-quantizing to NF4 (blocksize {}, double quant): relative error, max |error|",
        report.blocksize
    );
    for m in &report.modules {
        println!(
            "  {:<48} {:.4}  {:.3e}{}",
            m.name,
            m.error.relative_error,
            m.error.max_abs_error,
            if m.merged { "" } else { "  (not adapted)" }
        );
    }
    println!(
        "  {:<48} {:.4}  {:.3e}",
        "overall", report.overall.relative_error, report.overall.max_abs_error
    );
}
