//! The `qlora` command line: one module per subcommand, each with a `#[derive(clap::Args)]`
//! struct and a `run` function (`train`, `eval`, `generate`, `merge`, `export`, `convert`, `quantize`, `plan`), the
//! training settings file (`config`), and what they share: loading a Hugging Face Llama folder with its tokenizer and an
//! optional PEFT adapter, and the progress bar.

pub mod bench;
pub mod config;
pub mod convert;
pub mod eval;
pub mod export;
pub mod generate;
pub mod merge;
pub mod plan;
pub mod quantize;
pub mod train;

use std::path::Path;

use candle_core::{DType, Device};
use indicatif::ProgressStyle;

use crate::model::gguf::{is_gguf, GgufFile};
use crate::model::llama::LlamaModel;
use crate::model::tokenizer::Tokenizer;
use crate::model::{LlamaConfig, LlamaWeights, LoadOptions};
use crate::peft::LoraAdapter;
use crate::train::data::{Record, RecordKind};
use crate::{Error, Result};

pub use config::{ComputeDtype, DataFormat, DeviceName, Quantize};

/// The progress bar's look: bar, step count, elapsed and ETA, then the caller's message.
pub fn progress_style() -> Result<ProgressStyle> {
    ProgressStyle::with_template("{bar:30} {pos:>5}/{len} [{elapsed_precise}<{eta_precise}] {msg}")
        .map_err(|e| Error::invalid("progress bar", e.to_string()))
}

/// A loaded model folder.
pub struct LoadedModel {
    pub model: LlamaModel,
    pub tokenizer: Tokenizer,
    /// One line saying what was loaded, for the user.
    pub summary: String,
}

/// Loads `dir` (config.json, model.safetensors or shards, tokenizer.json and
/// tokenizer_config.json; or a llama.cpp GGUF file, its tensors dequantized) onto `device`, dense tensors in `dtype`, the seven linears of each layer
/// quantized to NF4 on load when `quantize` is NF4 (bitsandbytes pre-quantized linears are NF4
/// either way).
pub fn load_model(
    dir: &Path,
    dtype: ComputeDtype,
    quantize: Quantize,
    device: DeviceName,
) -> Result<LoadedModel> {
    let candle_device = open_device(device)?;
    let gguf = match is_gguf(dir) {
        true => Some(GgufFile::open(dir)?),
        false => None,
    };
    let (config, tokenizer) = match &gguf {
        Some(g) => (g.config()?, g.tokenizer()?),
        None => (
            LlamaConfig::from_file(dir.join("config.json"))?,
            Tokenizer::from_dir(dir)?,
        ),
    };
    if tokenizer.vocab_size() > config.vocab_size {
        return Err(Error::invalid(
            "load model",
            format!(
                "{}: the tokenizer has {} tokens, the model's vocab_size is {}",
                dir.display(),
                tokenizer.vocab_size(),
                config.vocab_size
            ),
        ));
    }
    let options = LoadOptions {
        dtype: match dtype {
            ComputeDtype::Bf16 => DType::BF16,
            ComputeDtype::F32 => DType::F32,
        },
        device: candle_device,
        quantize: quantize == Quantize::Nf4,
    };
    let weights = match &gguf {
        Some(g) => LlamaWeights::load_gguf(g, &config, &options)?,
        None => LlamaWeights::load(dir, &config, &options)?,
    };
    let stored_nf4 = config.quantization.is_some();
    let source = match &gguf {
        Some(g) => {
            let types: Vec<String> = g
                .type_counts()
                .iter()
                .map(|(t, n)| format!("{n} {t}"))
                .collect();
            format!("GGUF ({}), dequantized, then ", types.join(", "))
        }
        None => String::new(),
    };
    let summary = format!(
        "model: {} ({} layers, hidden {}, {} heads / {} kv, vocab {}); linears {source}{}, compute \
         {}, {}",
        dir.display(),
        config.num_hidden_layers,
        config.hidden_size,
        config.num_attention_heads,
        config.num_key_value_heads,
        config.vocab_size,
        match (stored_nf4, quantize) {
            (true, _) => "NF4 as stored (bitsandbytes)",
            (false, Quantize::Nf4) => "quantized to NF4 on load (blocksize 64, double quant)",
            (false, Quantize::None) => "dense",
        },
        match dtype {
            ComputeDtype::Bf16 => "bf16",
            ComputeDtype::F32 => "f32",
        },
        match device {
            DeviceName::Cpu => "CPU".to_string(),
            DeviceName::Cuda(n) => format!("CUDA device {n}"),
        }
    );
    let model = LlamaModel::new(config, weights)?;
    Ok(LoadedModel {
        model,
        tokenizer,
        summary,
    })
}

/// The candle device `device` names: the CPU, or CUDA device N in a build with `--features
/// cuda`. A typed error (no panic) when CUDA was left out of the build or no such device opens.
pub fn open_device(device: DeviceName) -> Result<Device> {
    match device {
        DeviceName::Cpu => Ok(Device::Cpu),
        #[cfg(feature = "cuda")]
        DeviceName::Cuda(n) => crate::kernels::cuda::CudaDevice::candle_device(n),
        #[cfg(not(feature = "cuda"))]
        DeviceName::Cuda(n) => Err(Error::NoCudaDevice(format!(
            "--device cuda:{n} needs qlora built with `--features cuda` (this build is CPU-only)"
        ))),
    }
}

/// A PEFT adapter folder, checked against the model it will run on.
pub fn load_adapter(dir: &Path, model: &LlamaModel) -> Result<LoraAdapter> {
    let adapter = LoraAdapter::load_pretrained(dir, model.device())?;
    adapter.check_fits(model.config())?;
    Ok(adapter)
}

/// Checks every record (with its line number) of the dataset `path` has the shape `format`
/// names; `auto` accepts any. The error names the file and the first line that does not fit.
pub fn check_format(path: &Path, records: &[(usize, Record)], format: DataFormat) -> Result<()> {
    let want = match format {
        DataFormat::Auto => return Ok(()),
        DataFormat::Instruction => RecordKind::Instruction,
        DataFormat::Chat => RecordKind::Chat,
        DataFormat::Mcqa => RecordKind::MultipleChoice,
        DataFormat::Text => RecordKind::Text,
    };
    match records.iter().find(|(_, r)| r.kind() != want) {
        Some((line, record)) => Err(Error::Dataset {
            path: path.to_path_buf(),
            line: *line,
            reason: format!(
                "a {:?} line in a dataset given as --format {}",
                record.kind(),
                format!("{format:?}").to_lowercase()
            ),
        }),
        None => Ok(()),
    }
}
