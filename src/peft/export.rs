//! GGUF export: a base model, with an adapter merged in (or already merged), written as a
//! llama.cpp GGUF file in f16, q8_0 or q4_k_m (docs/ARCHITECTURE.md, "GGUF export"). The merge is
//! [`merge_with`]'s, in f32 and into the weights the adapter trained against by default; each
//! merged tensor is renamed to llama.cpp's name, its Q/K rows put in llama.cpp's order, quantized
//! and written before the next is merged.

use std::path::{Path, PathBuf};

use candle_core::quantized::GgmlDType;
use safetensors::tensor::Dtype;

use crate::hf::checkpoint::widen;
use crate::model::config::TorchDtype;
use crate::model::gguf::{gguf_name, permute_rows};
use crate::model::gguf_write::{
    hf_tokenizer_metadata, llama_metadata, rope_freq_factors, tensor_type, write_gguf, ExportType,
    GgufTensorOut,
};
use crate::model::source::ModelSource;
use crate::peft::base_record::BaseRecord;
use crate::peft::merge::{merge_with, BaseWeights, MergeOptions, MergeStats};
use crate::peft::LoraAdapter;
use crate::{Error, Result};

/// How `qlora export` writes its file.
#[derive(Clone, Debug)]
pub struct ExportOptions {
    pub export: ExportType,
    /// The weights an adapter is merged into (see [`BaseWeights`]).
    pub base_weights: BaseWeights,
    /// A folder whose tokenizer.json (and tokenizer_config.json) replaces the base's tokenizer.
    pub tokenizer: Option<PathBuf>,
}

/// What an export wrote.
#[derive(Clone, Debug)]
pub struct ExportSummary {
    pub bytes: u64,
    /// Tensors written per GGML type (`Q4K`, `Q6K`, `F32`, …), sorted by type name.
    pub types: Vec<(String, usize)>,
    pub stats: MergeStats,
}

/// Merges `adapter` (none: `base` as it is) into `base` and writes the GGUF file `out`: the
/// Llama metadata of the merged config, the tokenizer (a GGUF base's `tokenizer.*` entries
/// copied; a folder's tokenizer.json converted by [`hf_tokenizer_metadata`]), and every tensor
/// under llama.cpp's name in the type [`tensor_type`] gives it for `options.export` (lm_head left
/// out when the embeddings are tied).
pub fn export_gguf(
    base: &ModelSource,
    adapter: Option<&LoraAdapter>,
    record: Option<BaseRecord>,
    out: &Path,
    options: &ExportOptions,
) -> Result<ExportSummary> {
    let merge_options = MergeOptions {
        dtype: TorchDtype::F32,
        base_weights: options.base_weights,
        ..MergeOptions::default()
    };
    let (written, stats) = merge_with(base, adapter, &merge_options, record, |merged| {
        let config = merged.config;
        if out.exists()
            && std::fs::canonicalize(out).ok() == std::fs::canonicalize(base.path()).ok()
        {
            return Err(Error::invalid(
                "export",
                format!("{} is also the input; write to another file", out.display()),
            ));
        }
        let name = base
            .path()
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".into());
        let mut metadata = llama_metadata(config, &name, options.export)?;
        metadata.extend(match (&options.tokenizer, base) {
            (Some(dir), _) => hf_tokenizer_metadata(dir, config.vocab_size)?,
            (None, ModelSource::Gguf(g)) => g.tokenizer_metadata(),
            (None, ModelSource::Folder(f)) => hf_tokenizer_metadata(f.dir(), config.vocab_size)?,
        });
        let gqa = config.num_attention_heads / config.num_key_value_heads.max(1);
        let mut tensors = Vec::new();
        // Llama 3.1's RoPE scaling, first as llama.cpp's converter writes it.
        if let Some(factors) = rope_freq_factors(config) {
            tensors.push(GgufTensorOut {
                name: "rope_freqs.weight".into(),
                shape: vec![factors.len()],
                dtype: GgmlDType::F32,
                produce: Box::new(move || Ok(factors.clone())),
            });
        }
        for t in &merged.tensors {
            if config.tie_word_embeddings && t.name == "lm_head.weight" {
                continue;
            }
            let gguf = gguf_name(&t.name).ok_or_else(|| Error::BadTensor {
                key: t.name.clone(),
                reason: "not a Llama tensor llama.cpp names".into(),
            })?;
            if t.dtype != Dtype::F32 {
                return Err(Error::BadTensor {
                    key: t.name.clone(),
                    reason: format!("stored as {:?}, not a float tensor", t.dtype),
                });
            }
            let heads = if t.name.ends_with("self_attn.q_proj.weight") {
                Some(config.num_attention_heads)
            } else if t.name.ends_with("self_attn.k_proj.weight") {
                Some(config.num_key_value_heads)
            } else {
                None
            };
            let dtype = tensor_type(
                options.export,
                &gguf,
                &t.shape,
                config.num_hidden_layers,
                gqa,
                config.tie_word_embeddings,
            );
            let shape = t.shape.clone();
            tensors.push(GgufTensorOut {
                name: gguf,
                shape: t.shape.clone(),
                dtype,
                produce: Box::new(move || {
                    let bytes = (t.produce)()?;
                    let values: Vec<f32> = widen(Dtype::F32, &bytes).collect();
                    Ok(match heads {
                        Some(h) => permute_rows(&values, &shape, h),
                        None => values,
                    })
                }),
            });
        }
        let mut types: std::collections::BTreeMap<String, usize> = Default::default();
        for t in &tensors {
            *types.entry(format!("{:?}", t.dtype)).or_default() += 1;
        }
        let bytes = write_gguf(out, &metadata, &tensors)?;
        Ok((bytes, types.into_iter().collect::<Vec<_>>()))
    })?;
    Ok(ExportSummary {
        bytes: written.0,
        types: written.1,
        stats,
    })
}
