//! `qlora export`: a model, with a LoRA adapter merged in or not, written as a llama.cpp GGUF file
//! (docs/ARCHITECTURE.md, "GGUF export").

use std::path::PathBuf;
use std::time::Instant;

use crate::cli::merge::{print_base_weights, BaseWeightsArg};
use crate::model::gguf_write::ExportType;
use crate::model::source::ModelSource;
use crate::peft::export::{export_gguf, ExportOptions};
use crate::peft::merge::{read_adapter, BaseWeights};
use crate::Result;

/// `--type`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExportTypeArg {
    F16,
    #[value(name = "q8_0")]
    Q8_0,
    #[value(name = "q4_k_m")]
    Q4KM,
}

impl ExportTypeArg {
    pub fn export_type(self) -> ExportType {
        match self {
            ExportTypeArg::F16 => ExportType::F16,
            ExportTypeArg::Q8_0 => ExportType::Q8_0,
            ExportTypeArg::Q4KM => ExportType::Q4KM,
        }
    }
}

/// Write a model (and a merged LoRA adapter) as a llama.cpp GGUF file.
#[derive(clap::Args, Debug, Clone)]
#[command(
    long_about = "Write a Llama model as a llama.cpp GGUF file, for llama.cpp, Ollama and \
        transformers' GGUF loader.\n\n\
        With --adapter, the LoRA adapter is merged first (W + scaling·B·A in f32), by default \
        into the weights it trained against (its qlora_base.json: NF4 quantized on load is \
        rebuilt exactly), as `qlora merge` does. Without it the model is written as it is (a \
        merged folder, or any model folder or GGUF file). Each tensor is renamed to llama.cpp's \
        name, its Q/K rows put in llama.cpp's order, quantized and written before the next is \
        made, so memory stays near the largest tensor.\n\n\
        --type f16: matrices in f16; q8_0: matrices in Q8_0; q4_k_m: llama.cpp's Q4_K_M mix \
        (Q4_K, Q6_K for the output matrix and for attn_v/ffn_down in the layers llama.cpp gives \
        more bits). Norms stay f32. The metadata follows llama.cpp's converter: llama.* sizes, \
        heads, RoPE, and the tokenizer (a GGUF model's copied; a folder's byte-level BPE or \
        byte-fallback BPE tokenizer.json converted) with its chat template."
)]
pub struct ExportArgs {
    /// The base model: a folder (dense or bitsandbytes NF4) or a GGUF file.
    #[arg(long, visible_alias = "base", value_name = "DIR|FILE.gguf")]
    pub model: PathBuf,
    /// A PEFT LoRA adapter folder to merge in first.
    #[arg(long, value_name = "DIR")]
    pub adapter: Option<PathBuf>,
    /// The GGUF file to write (replaced if present).
    #[arg(long, value_name = "OUT.gguf")]
    pub gguf: PathBuf,
    /// The tensor types.
    #[arg(long = "type", value_enum, default_value = "q8_0")]
    pub export_type: ExportTypeArg,
    /// The base weights to merge an adapter into (see `qlora merge --help`).
    #[arg(long, value_enum, default_value = "trained")]
    pub base_weights: BaseWeightsArg,
    /// A folder with tokenizer.json (and tokenizer_config.json) to write instead of the model's
    /// own tokenizer.
    #[arg(long, value_name = "DIR")]
    pub tokenizer: Option<PathBuf>,
}

/// Runs `qlora export`.
pub fn run(args: &ExportArgs) -> Result<()> {
    let t0 = Instant::now();
    let (adapter, record) = match &args.adapter {
        Some(dir) => {
            let (adapter, record) = read_adapter(dir)?;
            (Some(adapter), record)
        }
        None => (None, None),
    };
    let base = ModelSource::open(&args.model)?;
    let options = ExportOptions {
        export: args.export_type.export_type(),
        base_weights: match args.base_weights {
            BaseWeightsArg::Trained => BaseWeights::Trained,
            BaseWeightsArg::Original => BaseWeights::Original,
        },
        tokenizer: args.tokenizer.clone(),
    };
    let s = export_gguf(&base, adapter.as_ref(), record, &args.gguf, &options)?;
    let types: Vec<String> = s.types.iter().map(|(t, n)| format!("{n} {t}")).collect();
    println!(
        "exported {}{} as {}: {:.2} MiB ({}), {:.1} s",
        args.model.display(),
        match &args.adapter {
            Some(a) => format!(
                " with {} ({} linears merged)",
                a.display(),
                s.stats.merged_modules
            ),
            None => String::new(),
        },
        options.export.name(),
        s.bytes as f64 / (1024.0 * 1024.0),
        types.join(", "),
        t0.elapsed().as_secs_f64()
    );
    if args.adapter.is_some() {
        print_base_weights(
            &s.stats.record,
            s.stats.requantized_modules,
            s.stats.original_vs_trained,
        );
    }
    println!("wrote {}", args.gguf.display());
    Ok(())
}
