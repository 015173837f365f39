//! Writing llama.cpp GGUF files (docs/ARCHITECTURE.md, "GGUF export"): a Llama's metadata in
//! llama.cpp's conventions (`general.*`, `llama.*`, `tokenizer.*`), the tensor type of each tensor
//! for an export type (`f16`, `q8_0`, and `q4_k_m` chosen per tensor as llama.cpp's quantizer
//! chooses it), the quantization itself through candle's `quantized` module, and a streaming
//! writer.
//!
//! The writer lays a file out exactly as candle's `gguf_file::write` does (header, metadata,
//! tensor directory, data aligned to 32 bytes; a test compares the two byte for byte), but as GGUF
//! version 3 and one tensor at a time: each is produced, quantized and written before the next
//! is made, so memory stays near the largest tensor instead of the whole output file (26 GB for a
//! 13B model in f16).

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use rayon::prelude::*;

use serde_json::Value as Json;

use crate::error::without_backtrace;
use crate::model::config::{LlamaConfig, RopeScaling, TorchDtype};
use crate::model::gguf::byte_level_pre_tokenizer;
use crate::model::tokenizer::Tokenizer;
use crate::{Error, Result};

/// The alignment of the tensor data section and of each tensor in it (`general.alignment`'s
/// default, which is therefore not written).
pub const ALIGNMENT: usize = 32;

/// GGUF's version written here (v3: v2's layout with the byte order stated as little-endian).
pub const VERSION: u32 = 3;

/// What `qlora export --type` writes: llama.cpp's file types of the same names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExportType {
    /// Every matrix in f16, vectors in f32 (`LLAMA_FTYPE_MOSTLY_F16`).
    F16,
    /// Every matrix in Q8_0 (8-bit, blocks of 32), vectors in f32 (`LLAMA_FTYPE_MOSTLY_Q8_0`).
    Q8_0,
    /// llama.cpp's Q4_K_M mix (`LLAMA_FTYPE_MOSTLY_Q4_K_M`): Q4_K, with Q6_K for the output
    /// matrix and for `attn_v`/`ffn_down` in the layers llama.cpp gives more bits.
    Q4KM,
}

impl ExportType {
    /// `general.file_type` (llama.cpp's `llama_ftype`).
    pub fn file_type(self) -> u32 {
        match self {
            ExportType::F16 => 1,
            ExportType::Q8_0 => 7,
            ExportType::Q4KM => 15,
        }
    }

    /// The name on the command line and in llama.cpp (`f16`, `q8_0`, `q4_k_m`).
    pub fn name(self) -> &'static str {
        match self {
            ExportType::F16 => "f16",
            ExportType::Q8_0 => "q8_0",
            ExportType::Q4KM => "q4_k_m",
        }
    }
}

/// GGML's numeric code of a tensor type (`ggml_type`), as a GGUF tensor directory stores it.
pub fn ggml_type_code(dtype: GgmlDType) -> u32 {
    match dtype {
        GgmlDType::F32 => 0,
        GgmlDType::F16 => 1,
        GgmlDType::Q4_0 => 2,
        GgmlDType::Q4_1 => 3,
        GgmlDType::Q5_0 => 6,
        GgmlDType::Q5_1 => 7,
        GgmlDType::Q8_0 => 8,
        GgmlDType::Q8_1 => 9,
        GgmlDType::Q2K => 10,
        GgmlDType::Q3K => 11,
        GgmlDType::Q4K => 12,
        GgmlDType::Q5K => 13,
        GgmlDType::Q6K => 14,
        GgmlDType::Q8K => 15,
        GgmlDType::BF16 => 30,
    }
}

/// llama.cpp's `use_more_bits`: the first and last eighth of the layers and every third layer
/// between them.
pub fn use_more_bits(layer: usize, layers: usize) -> bool {
    layer < layers / 8 || layer >= 7 * layers / 8 || (layer - layers / 8) % 3 == 2
}

/// The tensor type of the GGUF tensor `name` (row-major `shape`) in an `export` file of a model
/// with `layers` layers and `gqa` query heads per key/value head, as llama.cpp's quantizer picks
/// it without an importance matrix: vectors in F32; f16 and q8_0 everything else in that type;
/// q4_k_m Q4_K with Q6_K for the output matrix (`token_embd` when embeddings are `tied`), and for
/// `attn_v` and `ffn_down` where [`use_more_bits`], `attn_v` of a 70B-shaped model (80 layers,
/// 8 query heads per kv head) in Q5_K. A row length the block does not divide falls back as
/// llama.cpp does: Q4_K → Q5_0, Q5_K → Q5_1, Q6_K → Q8_0, then F16 when even 32 does not divide.
pub fn tensor_type(
    export: ExportType,
    name: &str,
    shape: &[usize],
    layers: usize,
    gqa: usize,
    tied: bool,
) -> GgmlDType {
    if shape.len() < 2 {
        return GgmlDType::F32;
    }
    let wanted = match export {
        ExportType::F16 => GgmlDType::F16,
        ExportType::Q8_0 => GgmlDType::Q8_0,
        ExportType::Q4KM => {
            let layer = name
                .strip_prefix("blk.")
                .and_then(|r| r.split_once('.'))
                .and_then(|(i, _)| i.parse::<usize>().ok());
            if name == "output.weight" || (tied && name == "token_embd.weight") {
                GgmlDType::Q6K
            } else if name.ends_with(".attn_v.weight") {
                match layer {
                    Some(i) if use_more_bits(i, layers) => GgmlDType::Q6K,
                    _ if layers == 80 && gqa == 8 => GgmlDType::Q5K,
                    _ => GgmlDType::Q4K,
                }
            } else if name.ends_with(".ffn_down.weight") {
                match layer {
                    Some(i) if use_more_bits(i, layers) => GgmlDType::Q6K,
                    _ => GgmlDType::Q4K,
                }
            } else {
                GgmlDType::Q4K
            }
        }
    };
    let cols = shape[shape.len() - 1];
    let fitting = if cols.is_multiple_of(wanted.block_size()) {
        wanted
    } else {
        match wanted {
            GgmlDType::Q4K => GgmlDType::Q5_0,
            GgmlDType::Q5K => GgmlDType::Q5_1,
            GgmlDType::Q6K => GgmlDType::Q8_0,
            other => other,
        }
    };
    if cols.is_multiple_of(fitting.block_size()) {
        fitting
    } else {
        GgmlDType::F16
    }
}

/// The bytes of `dtype` for `shape` (rows of `shape`'s last dimension, whole blocks).
pub fn tensor_bytes(dtype: GgmlDType, shape: &[usize]) -> usize {
    shape.iter().product::<usize>() / dtype.block_size() * dtype.type_size()
}

/// `values` (row-major, `shape`) encoded as `dtype`: F32 and F16 directly, the quantized types
/// through candle's quantizers, rows split into chunks quantized in parallel (each row is whole
/// blocks, so the chunks' bytes concatenate to the tensor's).
pub fn encode(name: &str, values: &[f32], shape: &[usize], dtype: GgmlDType) -> Result<Vec<u8>> {
    let numel: usize = shape.iter().product();
    let cols = *shape.last().unwrap_or(&1);
    if values.len() != numel || cols == 0 || !cols.is_multiple_of(dtype.block_size()) {
        return Err(Error::BadTensor {
            key: name.into(),
            reason: format!(
                "{} values for shape {shape:?} cannot be stored as {dtype:?} (blocks of {})",
                values.len(),
                dtype.block_size()
            ),
        });
    }
    match dtype {
        GgmlDType::F32 => return Ok(TorchDtype::F32.encode(values)),
        GgmlDType::F16 => return Ok(TorchDtype::F16.encode(values)),
        _ => {}
    }
    let rows = numel / cols;
    // About 256 Ki values per chunk: enough work per task, and every core busy on a big matrix.
    let chunk_rows = (262_144 / cols).clamp(1, rows.max(1));
    let chunks: Vec<Vec<u8>> = values
        .par_chunks(chunk_rows * cols)
        .map(|chunk| {
            let quantized = Tensor::from_slice(chunk, (chunk.len() / cols, cols), &Device::Cpu)
                .and_then(|t| QTensor::quantize(&t, dtype))
                .map_err(|e| Error::BadTensor {
                    key: name.into(),
                    reason: format!("quantizing to {dtype:?}: {}", without_backtrace(e)),
                })?;
            let data = quantized.data().map_err(Error::from)?;
            Ok(data.into_owned())
        })
        .collect::<Result<_>>()?;
    let bytes = chunks.concat();
    debug_assert_eq!(bytes.len(), tensor_bytes(dtype, shape));
    Ok(bytes)
}

/// One tensor of a file being written: its GGUF name, row-major shape, type, and its f32 values
/// made when the writer reaches it.
pub struct GgufTensorOut<'a> {
    pub name: String,
    pub shape: Vec<usize>,
    pub dtype: GgmlDType,
    pub produce: Box<dyn Fn() -> Result<Vec<f32>> + 'a>,
}

/// GGUF's value type code of `value` (`gguf_type`).
fn value_type(value: &Value) -> u32 {
    match value {
        Value::U8(_) => 0,
        Value::I8(_) => 1,
        Value::U16(_) => 2,
        Value::I16(_) => 3,
        Value::U32(_) => 4,
        Value::I32(_) => 5,
        Value::F32(_) => 6,
        Value::Bool(_) => 7,
        Value::String(_) => 8,
        Value::Array(_) => 9,
        Value::U64(_) => 10,
        Value::I64(_) => 11,
        Value::F64(_) => 12,
    }
}

fn put_string(out: &mut Vec<u8>, text: &str) {
    out.extend_from_slice(&(text.len() as u64).to_le_bytes());
    out.extend_from_slice(text.as_bytes());
}

/// `value`'s payload (without its type code); arrays hold one element type (an empty array is
/// written as u32, as candle writes it).
fn put_value(out: &mut Vec<u8>, key: &str, value: &Value) -> Result<()> {
    match value {
        Value::U8(v) => out.push(*v),
        Value::I8(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::U16(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::I16(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::U32(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::I32(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::U64(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::I64(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::F32(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::F64(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::Bool(v) => out.push(u8::from(*v)),
        Value::String(s) => put_string(out, s),
        Value::Array(items) => {
            let ty = items.first().map_or(4, value_type);
            if items.iter().any(|v| value_type(v) != ty) {
                return Err(Error::encode(
                    format!("GGUF metadata `{key}`"),
                    "an array mixes value types",
                ));
            }
            out.extend_from_slice(&ty.to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for item in items {
                put_value(out, key, item)?;
            }
        }
    }
    Ok(())
}

fn padding(len: usize) -> usize {
    (ALIGNMENT - len % ALIGNMENT) % ALIGNMENT
}

/// The header, metadata and tensor directory of a file holding `tensors`, padded to the data
/// section.
fn header(metadata: &[(String, Value)], tensors: &[GgufTensorOut<'_>]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    out.extend_from_slice(b"GGUF");
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    out.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
    for (key, value) in metadata {
        put_string(&mut out, key);
        out.extend_from_slice(&value_type(value).to_le_bytes());
        put_value(&mut out, key, value)?;
    }
    let mut offset = 0usize;
    for t in tensors {
        put_string(&mut out, &t.name);
        out.extend_from_slice(&(t.shape.len() as u32).to_le_bytes());
        // GGUF lists dimensions innermost first.
        for &d in t.shape.iter().rev() {
            out.extend_from_slice(&(d as u64).to_le_bytes());
        }
        out.extend_from_slice(&ggml_type_code(t.dtype).to_le_bytes());
        out.extend_from_slice(&(offset as u64).to_le_bytes());
        let bytes = tensor_bytes(t.dtype, &t.shape);
        offset += bytes + padding(bytes);
    }
    out.resize(out.len() + padding(out.len()), 0);
    Ok(out)
}

/// Writes the GGUF file `path`: `metadata` in order, then `tensors`, each produced, encoded as its
/// type and written before the next is made. The file is written beside `path` under a temporary
/// name and renamed into place when complete, so a failure leaves no partial `.gguf`. Returns the
/// file's size in bytes.
pub fn write_gguf(
    path: &Path,
    metadata: &[(String, Value)],
    tensors: &[GgufTensorOut<'_>],
) -> Result<u64> {
    for t in tensors {
        let cols = *t.shape.last().unwrap_or(&0);
        if t.shape.is_empty() || cols % t.dtype.block_size() != 0 {
            return Err(Error::BadTensor {
                key: t.name.clone(),
                reason: format!(
                    "shape {:?} cannot be stored as {:?} (rows of whole blocks of {})",
                    t.shape,
                    t.dtype,
                    t.dtype.block_size()
                ),
            });
        }
    }
    let head = header(metadata, tensors)?;
    let mut partial = path.as_os_str().to_owned();
    partial.push(".partial");
    let partial = PathBuf::from(partial);
    let result = (|| -> Result<u64> {
        let file = File::create(&partial).map_err(|e| Error::io(&partial, e))?;
        let mut w = BufWriter::with_capacity(1 << 20, file);
        let io = |e| Error::io(&partial, e);
        w.write_all(&head).map_err(io)?;
        let mut total = head.len();
        for t in tensors {
            let values = (t.produce)()?;
            let bytes = encode(&t.name, &values, &t.shape, t.dtype)?;
            drop(values);
            w.write_all(&bytes).map_err(io)?;
            w.write_all(&vec![0u8; padding(bytes.len())]).map_err(io)?;
            total += bytes.len() + padding(bytes.len());
        }
        w.into_inner()
            .map_err(|e| Error::io(&partial, e.into_error()))?
            .sync_all()
            .map_err(io)?;
        Ok(total as u64)
    })();
    match result {
        Ok(total) => {
            std::fs::rename(&partial, path).map_err(|e| Error::io(path, e))?;
            Ok(total)
        }
        Err(e) => {
            let _ = std::fs::remove_file(&partial);
            Err(e)
        }
    }
}

/// The `general.*` and `llama.*` metadata of a Llama with `config`, as llama.cpp's converter
/// writes it: sizes, head counts (and the head size when it is not hidden / heads), RMSNorm
/// epsilon, RoPE base and linear scaling, context length, vocabulary size, the file type and
/// quantization version. Llama 3.1's RoPE scaling is no metadata but the `rope_freqs` tensor
/// ([`rope_freq_factors`]).
pub fn llama_metadata(
    config: &LlamaConfig,
    name: &str,
    export: ExportType,
) -> Result<Vec<(String, Value)>> {
    let u32_of = |field: &'static str, v: usize| -> Result<Value> {
        u32::try_from(v).map(Value::U32).map_err(|_| Error::Config {
            field,
            reason: format!("{v} does not fit GGUF's u32"),
        })
    };
    let mut m: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String("llama".into())),
        ("general.name".into(), Value::String(name.into())),
        ("general.file_type".into(), Value::U32(export.file_type())),
        ("general.quantization_version".into(), Value::U32(2)),
    ];
    for (key, field, v) in [
        (
            "context_length",
            "max_position_embeddings",
            config.max_position_embeddings,
        ),
        ("embedding_length", "hidden_size", config.hidden_size),
        ("block_count", "num_hidden_layers", config.num_hidden_layers),
        (
            "feed_forward_length",
            "intermediate_size",
            config.intermediate_size,
        ),
        ("rope.dimension_count", "head_dim", config.head_dim),
        (
            "attention.head_count",
            "num_attention_heads",
            config.num_attention_heads,
        ),
        (
            "attention.head_count_kv",
            "num_key_value_heads",
            config.num_key_value_heads,
        ),
    ] {
        m.push((format!("llama.{key}"), u32_of(field, v)?));
    }
    m.extend([
        (
            "llama.attention.layer_norm_rms_epsilon".into(),
            Value::F32(config.rms_norm_eps as f32),
        ),
        (
            "llama.rope.freq_base".into(),
            Value::F32(config.rope_theta as f32),
        ),
        (
            "llama.vocab_size".into(),
            u32_of("vocab_size", config.vocab_size)?,
        ),
    ]);
    if config.head_dim * config.num_attention_heads != config.hidden_size {
        for key in ["llama.attention.key_length", "llama.attention.value_length"] {
            m.push((key.into(), u32_of("head_dim", config.head_dim)?));
        }
    }
    match &config.rope_scaling {
        RopeScaling::Default => {}
        RopeScaling::Linear { factor } => {
            m.push((
                "llama.rope.scaling.type".into(),
                Value::String("linear".into()),
            ));
            m.push((
                "llama.rope.scaling.factor".into(),
                Value::F32(*factor as f32),
            ));
        }
        // llama.cpp keeps Llama 3.1's scaling as the `rope_freqs` tensor ([`rope_freq_factors`]).
        RopeScaling::Llama3 { .. } => {}
    }
    Ok(m)
}

/// The `rope_freqs.weight` tensor llama.cpp's converter writes for Llama 3.1's RoPE scaling
/// (`rope_type` llama3), `head_dim / 2` divisors of the base inverse frequencies: 1 for short
/// wavelengths, `factor` for long ones, and between the two `1 / ((1 − smooth) / factor +
/// smooth)` with `smooth = (original_context / wavelength − low_freq_factor) / (high_freq_factor
/// − low_freq_factor)`; computed in f64 and rounded once. `None` for other scalings.
pub fn rope_freq_factors(config: &LlamaConfig) -> Option<Vec<f32>> {
    let RopeScaling::Llama3 {
        factor,
        low_freq_factor,
        high_freq_factor,
        original_max_position_embeddings,
    } = config.rope_scaling
    else {
        return None;
    };
    let old_context = original_max_position_embeddings as f64;
    let (low_wavelen, high_wavelen) = (
        old_context / low_freq_factor,
        old_context / high_freq_factor,
    );
    let dim = config.head_dim as f64;
    Some(
        (0..config.head_dim)
            .step_by(2)
            .map(|i| {
                let freq = 1.0 / config.rope_theta.powf(i as f64 / dim);
                let wavelen = 2.0 * std::f64::consts::PI / freq;
                let divisor = if wavelen < high_wavelen {
                    1.0
                } else if wavelen > low_wavelen {
                    factor
                } else {
                    let smooth = (old_context / wavelen - low_freq_factor)
                        / (high_freq_factor - low_freq_factor);
                    1.0 / ((1.0 - smooth) / factor + smooth)
                };
                divisor as f32
            })
            .collect(),
    )
}

/// llama.cpp's token types (`tokenizer.ggml.token_type`).
mod token_type {
    pub const NORMAL: i32 = 1;
    pub const UNKNOWN: i32 = 2;
    pub const CONTROL: i32 = 3;
    pub const USER_DEFINED: i32 = 4;
    pub const UNUSED: i32 = 5;
    pub const BYTE: i32 = 6;
}

/// The byte-level pre-tokenizers llama.cpp knows by name (`tokenizer.ggml.pre`) that qlora reads
/// back, tried in this order against a tokenizer.json's pre-tokenizer.
const BYTE_LEVEL_PRE: [&str; 3] = ["gpt-2", "smollm", "llama-bpe"];

/// A pre-tokenizer's JSON as the `tokenizers` crate reads it and writes it back (defaults filled
/// in, one spelling), so two descriptions of one pipeline compare equal.
fn canonical_pre_tokenizer(value: &Json) -> std::result::Result<Json, String> {
    let parsed: tokenizers::pre_tokenizers::PreTokenizerWrapper =
        serde_json::from_value(value.clone()).map_err(|e| e.to_string())?;
    serde_json::to_value(&parsed).map_err(|e| e.to_string())
}

/// The `tokenizer.*` metadata of the Hugging Face tokenizer in `dir` (`tokenizer.json`, with
/// `tokenizer_config.json` for the special tokens and chat template) for a model with
/// `vocab_size` embedding rows, in llama.cpp's conventions:
///
/// - byte-level BPE → model `gpt2`: tokens, token types, merges, and the pre-tokenizer's name
///   (`gpt-2`, `smollm` or `llama-bpe`, found by comparing the pipeline with each);
/// - BPE with byte fallback (Llama 2's, TinyLlama's) → model `llama` (SentencePiece): tokens, token
///   types (`<0xNN>` bytes, the unknown token) and scores, each token's score minus the rank of
///   the first merge that makes it (what SentencePiece's BPE scores encode), so the merge order
///   survives without the merges;
///
/// added special tokens are control tokens, other added tokens user-defined, and ids the
/// tokenizer leaves empty up to `vocab_size` are unused `[PADn]` tokens, as llama.cpp's converter
/// fills them. BOS/EOS/padding/unknown ids, whether BOS and EOS are added, and the chat template
/// complete it. Other tokenizers give [`Error::TokenizerFile`] naming the file.
pub fn hf_tokenizer_metadata(dir: &Path, vocab_size: usize) -> Result<Vec<(String, Value)>> {
    let path = dir.join("tokenizer.json");
    let bad = |reason: String| Error::TokenizerFile {
        path: path.clone(),
        reason,
    };
    let text = std::fs::read_to_string(&path).map_err(|e| bad(e.to_string()))?;
    let json: Json = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    let model = &json["model"];
    if model["type"] != "BPE" {
        return Err(bad(format!(
            "model type {} cannot be written to GGUF (only BPE: byte-level, or SentencePiece-style \
             with byte fallback)",
            model["type"]
        )));
    }
    let mut tokens: Vec<Option<String>> = Vec::new();
    let mut types: Vec<i32> = Vec::new();
    let mut put = |id: u64, text: &str, ty: i32| -> Result<()> {
        let id = usize::try_from(id).map_err(|_| bad(format!("token id {id} is too large")))?;
        if id >= tokens.len() {
            tokens.resize(id + 1, None);
            types.resize(id + 1, token_type::UNUSED);
        }
        tokens[id] = Some(text.to_string());
        types[id] = ty;
        Ok(())
    };
    let vocab = model["vocab"]
        .as_object()
        .ok_or_else(|| bad("`model.vocab` is not an object".into()))?;
    for (token, id) in vocab {
        let id = id
            .as_u64()
            .ok_or_else(|| bad(format!("token {token:?} has id {id}, not an integer")))?;
        put(id, token, token_type::NORMAL)?;
    }
    for added in json["added_tokens"].as_array().into_iter().flatten() {
        let (Some(id), Some(content)) = (added["id"].as_u64(), added["content"].as_str()) else {
            return Err(bad(format!("added token {added} has no id or content")));
        };
        let ty = match added["special"].as_bool() {
            Some(true) => token_type::CONTROL,
            _ => token_type::USER_DEFINED,
        };
        put(id, content, ty)?;
    }
    if tokens.len() > vocab_size {
        return Err(bad(format!(
            "the tokenizer has ids up to {} but the model has {vocab_size} embedding rows",
            tokens.len() - 1
        )));
    }
    tokens.resize(vocab_size, None);
    types.resize(vocab_size, token_type::UNUSED);
    let tokens: Vec<String> = tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| t.unwrap_or_else(|| format!("[PAD{i}]")))
        .collect();

    let merges: Vec<(String, String)> = model["merges"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| match m {
            Json::String(s) => s
                .split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| bad(format!("merge {s:?} is not two tokens"))),
            Json::Array(pair) => match pair.as_slice() {
                [Json::String(a), Json::String(b)] => Ok((a.clone(), b.clone())),
                _ => Err(bad(format!("merge {m} is not two tokens"))),
            },
            _ => Err(bad(format!("merge {m} is not two tokens"))),
        })
        .collect::<Result<_>>()?;

    let tokenizer = Tokenizer::from_dir(dir)?;
    let mut m: Vec<(String, Value)> = Vec::new();
    let byte_fallback = model["byte_fallback"].as_bool().unwrap_or(false);
    if byte_fallback {
        // SentencePiece: bytes and the unknown token typed, the merge order as scores.
        let unk = tokenizer.unk().map(|t| t.id as usize);
        for (i, token) in tokens.iter().enumerate() {
            if Some(i) == unk {
                types[i] = token_type::UNKNOWN;
            } else if types[i] == token_type::NORMAL && is_byte_token(token) {
                types[i] = token_type::BYTE;
            }
        }
        let mut rank: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
        for (r, (a, b)) in merges.iter().enumerate() {
            rank.entry(format!("{a}{b}")).or_insert(r);
        }
        let unmerged = merges.len() as f32;
        let scores: Vec<Value> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| {
                Value::F32(match rank.get(t) {
                    Some(&r) => -(r as f32),
                    None => -(unmerged + i as f32),
                })
            })
            .collect();
        m.push(("tokenizer.ggml.model".into(), Value::String("llama".into())));
        m.push(("tokenizer.ggml.tokens".into(), strings(&tokens)));
        m.push(("tokenizer.ggml.scores".into(), Value::Array(scores)));
        m.push(("tokenizer.ggml.token_type".into(), token_types(&types)));
    } else {
        let pre = &json["pre_tokenizer"];
        let uses_byte_level = pre.to_string().contains("\"ByteLevel\"");
        if !uses_byte_level || !json["normalizer"].is_null() {
            return Err(bad(
                "only byte-level BPE (a ByteLevel pre-tokenizer, no normalizer) or BPE with \
                 byte fallback can be written to GGUF"
                    .into(),
            ));
        }
        let want = canonical_pre_tokenizer(pre).map_err(|e| bad(format!("pre_tokenizer: {e}")))?;
        let name = BYTE_LEVEL_PRE
            .iter()
            .find(|name| {
                byte_level_pre_tokenizer(Some(name))
                    .and_then(|j| canonical_pre_tokenizer(&j))
                    .is_ok_and(|j| j == want)
            })
            .ok_or_else(|| {
                bad(format!(
                    "its pre-tokenizer is none of those llama.cpp names that qlora writes ({})",
                    BYTE_LEVEL_PRE.join(", ")
                ))
            })?;
        if let Some((a, b)) = merges
            .iter()
            .find(|(a, b)| a.contains(' ') || b.contains(' '))
        {
            return Err(bad(format!(
                "merge ({a:?}, {b:?}) holds a space, which GGUF's `a b` merges cannot"
            )));
        }
        let merges: Vec<String> = merges.iter().map(|(a, b)| format!("{a} {b}")).collect();
        m.push(("tokenizer.ggml.model".into(), Value::String("gpt2".into())));
        m.push(("tokenizer.ggml.pre".into(), Value::String(name.to_string())));
        m.push(("tokenizer.ggml.tokens".into(), strings(&tokens)));
        m.push(("tokenizer.ggml.token_type".into(), token_types(&types)));
        m.push(("tokenizer.ggml.merges".into(), strings(&merges)));
    }
    for (key, token) in [
        ("bos_token_id", tokenizer.bos()),
        ("eos_token_id", tokenizer.eos()),
        ("padding_token_id", tokenizer.pad()),
        ("unknown_token_id", tokenizer.unk()),
    ] {
        if let Some(t) = token {
            m.push((format!("tokenizer.ggml.{key}"), Value::U32(t.id)));
        }
    }
    let probe = tokenizer.encode("a", true)?;
    let adds = |t: Option<&crate::model::tokenizer::SpecialToken>, at: Option<&u32>| {
        t.is_some_and(|t| at == Some(&t.id))
    };
    let add_bos = adds(tokenizer.bos(), probe.first());
    let add_eos = adds(tokenizer.eos(), probe.last()) && probe.len() > usize::from(add_bos);
    m.push(("tokenizer.ggml.add_bos_token".into(), Value::Bool(add_bos)));
    m.push(("tokenizer.ggml.add_eos_token".into(), Value::Bool(add_eos)));
    if let Some(template) = tokenizer.chat_template() {
        m.push((
            "tokenizer.chat_template".into(),
            Value::String(template.to_string()),
        ));
    }
    Ok(m)
}

/// `<0x00>` … `<0xFF>`: SentencePiece's byte tokens.
fn is_byte_token(token: &str) -> bool {
    token.len() == 6
        && token.starts_with("<0x")
        && token.ends_with('>')
        && token[3..5].chars().all(|c| c.is_ascii_hexdigit())
}

fn strings(items: &[String]) -> Value {
    Value::Array(items.iter().map(|s| Value::String(s.clone())).collect())
}

fn token_types(types: &[i32]) -> Value {
    Value::Array(types.iter().map(|&t| Value::I32(t)).collect())
}
