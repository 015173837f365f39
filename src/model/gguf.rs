//! llama.cpp's GGUF files as a model source: a Llama-architecture `.gguf` read through candle's
//! `quantized::gguf_file`, its metadata turned into the `config.json` transformers would build from
//! it (then validated as any config), its tensors dequantized to f32 by Hugging Face name, with
//! llama.cpp's Q/K row permutation undone, and its tokenizer rebuilt from the metadata
//! (docs/ARCHITECTURE.md, "Model sources").
//!
//! Memory: the file is mapped, and each tensor is dequantized on its own when the loader asks for
//! it, so the heap holds one f32 tensor beside what the loader keeps.

use std::collections::HashMap;
use std::io::{Cursor, Read};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::Device;
use memmap2::Mmap;
use serde_json::{json, Map, Value as Json};

use crate::error::without_backtrace;
use crate::hf::checkpoint::map_file;
use crate::hf::file::check_finite_f32;
use crate::hf::folder::{
    prepare_output_dir, write_checkpoint, write_config, OutTensor, WrittenCheckpoint,
};
use crate::model::config::{
    checkpoint_tensor_names, linear_shape, torch_dtype_name, LlamaConfig, TorchDtype,
};
use crate::model::tokenizer::Tokenizer;
use crate::{Error, Result};

/// GGUF's magic bytes, the first four of every file.
const MAGIC: &[u8; 4] = b"GGUF";

/// Whether `path` is a file that starts with GGUF's magic bytes (a folder, a missing file or
/// anything else is not).
pub fn is_gguf(path: &Path) -> bool {
    let mut head = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut head))
        .is_ok()
        && &head == MAGIC
}

/// The GGUF tensor that holds the Hugging Face tensor `hf` of a Llama (`model.layers.3.self_attn.
/// q_proj.weight` → `blk.3.attn_q.weight`), as llama.cpp's converter names them.
pub fn gguf_name(hf: &str) -> Option<String> {
    match hf {
        "model.embed_tokens.weight" => return Some("token_embd.weight".into()),
        "model.norm.weight" => return Some("output_norm.weight".into()),
        "lm_head.weight" => return Some("output.weight".into()),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (index, rest) = rest.split_once('.')?;
    let index: usize = index.parse().ok()?;
    let part = match rest {
        "input_layernorm.weight" => "attn_norm",
        "post_attention_layernorm.weight" => "ffn_norm",
        "self_attn.q_proj.weight" => "attn_q",
        "self_attn.k_proj.weight" => "attn_k",
        "self_attn.v_proj.weight" => "attn_v",
        "self_attn.o_proj.weight" => "attn_output",
        "mlp.gate_proj.weight" => "ffn_gate",
        "mlp.up_proj.weight" => "ffn_up",
        "mlp.down_proj.weight" => "ffn_down",
        _ => return None,
    };
    Some(format!("blk.{index}.{part}.weight"))
}

/// A mapped GGUF file and its parsed header (metadata and tensor directory).
pub struct GgufFile {
    path: PathBuf,
    map: Mmap,
    content: Content,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("tensors", &self.content.tensor_infos.len())
            .finish()
    }
}

impl GgufFile {
    /// Maps `path` and reads its header. A file that is not GGUF, or whose header is damaged,
    /// gives [`Error::CorruptFile`] naming it.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let map = map_file(&path)?;
        if map.len() < 4 || &map[..4] != MAGIC {
            return Err(Error::CorruptFile {
                path,
                reason: "not a GGUF file (its first bytes are not `GGUF`)".into(),
            });
        }
        let content =
            Content::read(&mut Cursor::new(&map[..])).map_err(|e| Error::CorruptFile {
                path: path.clone(),
                reason: format!("GGUF header: {}", without_backtrace(e)),
            })?;
        Ok(GgufFile { path, map, content })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn corrupt(&self, reason: impl Into<String>) -> Error {
        Error::CorruptFile {
            path: self.path.clone(),
            reason: reason.into(),
        }
    }

    /// The metadata value of `key`, if present.
    pub fn metadata(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    fn string(&self, key: &str) -> Result<Option<&str>> {
        match self.metadata(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(self.corrupt(format!("metadata `{key}` is not a string: {v:?}"))),
        }
    }

    fn unsigned(&self, key: &str) -> Result<Option<u64>> {
        let v = match self.metadata(key) {
            None => return Ok(None),
            Some(v) => v,
        };
        let n = match *v {
            Value::U8(n) => Some(u64::from(n)),
            Value::U16(n) => Some(u64::from(n)),
            Value::U32(n) => Some(u64::from(n)),
            Value::U64(n) => Some(n),
            Value::I8(n) => u64::try_from(n).ok(),
            Value::I16(n) => u64::try_from(n).ok(),
            Value::I32(n) => u64::try_from(n).ok(),
            Value::I64(n) => u64::try_from(n).ok(),
            _ => None,
        };
        n.map(Some).ok_or_else(|| {
            self.corrupt(format!(
                "metadata `{key}` is not a non-negative integer: {v:?}"
            ))
        })
    }

    fn float(&self, key: &str) -> Result<Option<f64>> {
        match self.metadata(key) {
            None => Ok(None),
            Some(Value::F32(x)) => Ok(Some(f64::from(*x))),
            Some(Value::F64(x)) => Ok(Some(*x)),
            Some(_) => self.unsigned(key).map(|n| n.map(|n| n as f64)),
        }
    }

    /// The array `key`, each element converted by `item` (`None`: not a `what`).
    fn array<'s, T>(
        &'s self,
        key: &str,
        what: &str,
        item: impl Fn(&'s Value) -> Option<T>,
    ) -> Result<Option<Vec<T>>> {
        let Some(v) = self.metadata(key) else {
            return Ok(None);
        };
        let Value::Array(items) = v else {
            return Err(self.corrupt(format!("metadata `{key}` is not an array")));
        };
        items
            .iter()
            .enumerate()
            .map(|(i, v)| {
                item(v).ok_or_else(|| {
                    self.corrupt(format!("metadata `{key}`[{i}] is not {what}: {v:?}"))
                })
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    fn strings(&self, key: &str) -> Result<Option<Vec<&str>>> {
        self.array(key, "a string", |v| match v {
            Value::String(s) => Some(s.as_str()),
            _ => None,
        })
    }

    fn floats(&self, key: &str) -> Result<Option<Vec<f32>>> {
        self.array(key, "a float", |v| match *v {
            Value::F32(x) => Some(x),
            Value::F64(x) => Some(x as f32),
            _ => None,
        })
    }

    fn integers(&self, key: &str) -> Result<Option<Vec<i64>>> {
        self.array(key, "an integer", |v| match *v {
            Value::I32(n) => Some(i64::from(n)),
            Value::U32(n) => Some(i64::from(n)),
            Value::I8(n) => Some(i64::from(n)),
            Value::U8(n) => Some(i64::from(n)),
            Value::I16(n) => Some(i64::from(n)),
            Value::U16(n) => Some(i64::from(n)),
            Value::I64(n) => Some(n),
            _ => None,
        })
    }

    /// `general.architecture`; only `llama` is a model qlora runs.
    pub fn architecture(&self) -> Result<&str> {
        self.string("general.architecture")?
            .ok_or_else(|| self.corrupt("metadata `general.architecture` is missing"))
    }

    /// Whether the file holds the GGUF tensor `name`.
    pub fn has_tensor(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    /// The row-major shape of the GGUF tensor `name` (GGUF lists dimensions innermost first).
    pub fn tensor_shape(&self, name: &str) -> Option<&[usize]> {
        self.content.tensor_infos.get(name).map(|t| t.shape.dims())
    }

    /// The `config.json` transformers builds from this file's metadata (`model_type` llama): the
    /// sizes, head counts, RMSNorm epsilon, RoPE base and linear scaling, context length, the
    /// vocabulary size of the embeddings, tied embeddings when there is no `output.weight`, and the
    /// special token ids.
    pub fn config_json(&self) -> Result<Map<String, Json>> {
        let arch = self.architecture()?;
        if arch != "llama" {
            return Err(Error::Config {
                field: "general.architecture",
                reason: format!(
                    "{arch:?} in {} is not supported (only llama GGUF files)",
                    self.path.display()
                ),
            });
        }
        let need = |key: &str| -> Result<u64> {
            self.unsigned(key)?
                .ok_or_else(|| self.corrupt(format!("metadata `{key}` is missing")))
        };
        let hidden = need("llama.embedding_length")?;
        let heads = need("llama.attention.head_count")?;
        let mut c = Map::new();
        c.insert("model_type".into(), json!("llama"));
        c.insert("hidden_size".into(), json!(hidden));
        c.insert(
            "intermediate_size".into(),
            json!(need("llama.feed_forward_length")?),
        );
        c.insert(
            "num_hidden_layers".into(),
            json!(need("llama.block_count")?),
        );
        c.insert("num_attention_heads".into(), json!(heads));
        c.insert(
            "num_key_value_heads".into(),
            json!(self
                .unsigned("llama.attention.head_count_kv")?
                .unwrap_or(heads)),
        );
        let key_length = self.unsigned("llama.attention.key_length")?;
        let value_length = self.unsigned("llama.attention.value_length")?;
        if let (Some(k), Some(v)) = (key_length, value_length) {
            if k != v {
                return Err(self.corrupt(format!(
                    "attention key length {k} and value length {v} differ (not a Llama)"
                )));
            }
        }
        if let Some(head_dim) = key_length.or(self.unsigned("llama.rope.dimension_count")?) {
            c.insert("head_dim".into(), json!(head_dim));
        }
        if let Some(eps) = self.float("llama.attention.layer_norm_rms_epsilon")? {
            c.insert("rms_norm_eps".into(), json!(eps));
        }
        if let Some(theta) = self.float("llama.rope.freq_base")? {
            c.insert("rope_theta".into(), json!(theta));
        }
        if let Some(n) = self.unsigned("llama.context_length")? {
            c.insert("max_position_embeddings".into(), json!(n));
        }
        match self.string("llama.rope.scaling.type")? {
            None | Some("none") => {}
            Some("linear") => {
                let factor = self
                    .float("llama.rope.scaling.factor")?
                    .ok_or_else(|| self.corrupt("`llama.rope.scaling.factor` is missing"))?;
                c.insert(
                    "rope_scaling".into(),
                    json!({"rope_type": "linear", "factor": factor}),
                );
            }
            Some(other) => {
                return Err(Error::Config {
                    field: "llama.rope.scaling.type",
                    reason: format!(
                        "{other:?} in {} is not supported (none, linear)",
                        self.path.display()
                    ),
                })
            }
        }
        if self.has_tensor("rope_freqs.weight") {
            return Err(Error::Config {
                field: "rope_freqs.weight",
                reason: format!(
                    "{} scales RoPE by a stored frequency tensor (Llama 3.1 style), which qlora \
                     does not read from GGUF yet; convert the original Hugging Face folder instead",
                    self.path.display()
                ),
            });
        }
        let vocab = match self.tensor_shape("token_embd.weight") {
            Some([v, _]) => *v as u64,
            Some(other) => {
                return Err(self.corrupt(format!(
                    "tensor `token_embd.weight` has shape {other:?}, not [vocab, hidden]"
                )))
            }
            None => return Err(self.missing("token_embd.weight")),
        };
        c.insert("vocab_size".into(), json!(vocab));
        c.insert(
            "tie_word_embeddings".into(),
            json!(!self.has_tensor("output.weight")),
        );
        for (gguf, hf) in [
            ("tokenizer.ggml.bos_token_id", "bos_token_id"),
            ("tokenizer.ggml.eos_token_id", "eos_token_id"),
            ("tokenizer.ggml.padding_token_id", "pad_token_id"),
        ] {
            if let Some(id) = self.unsigned(gguf)? {
                c.insert(hf.into(), json!(id));
            }
        }
        Ok(c)
    }

    /// The validated Llama config of [`Self::config_json`].
    pub fn config(&self) -> Result<LlamaConfig> {
        let text = Json::Object(self.config_json()?).to_string();
        LlamaConfig::from_json_str(&text).map_err(|e| match e {
            Error::Config { field, reason } => Error::Config {
                field,
                reason: format!("{reason} (from the metadata of {})", self.path.display()),
            },
            other => other,
        })
    }

    fn missing(&self, name: &str) -> Error {
        self.corrupt(format!("tensor `{name}` is missing"))
    }

    /// The Hugging Face tensor `hf` (`[out, in]` or `[n]`), dequantized to f32 and checked to have
    /// `shape` and finite values; `q_proj` and `k_proj` with llama.cpp's row permutation undone
    /// (`heads` and `kv_heads` of `config`), as transformers' GGUF loader does.
    pub fn tensor_f32(&self, hf: &str, shape: &[usize], config: &LlamaConfig) -> Result<Vec<f32>> {
        let name = gguf_name(hf).ok_or_else(|| Error::MissingTensor { key: hf.into() })?;
        let info = self
            .content
            .tensor_infos
            .get(&name)
            .ok_or_else(|| self.missing(&name))?;
        if info.shape.dims() != shape {
            return Err(self.corrupt(format!(
                "tensor `{name}` ({hf}) has shape {:?}, expected {shape:?}",
                info.shape.dims()
            )));
        }
        let bad = |e: candle_core::Error| {
            self.corrupt(format!("tensor `{name}`: {}", without_backtrace(e)))
        };
        let q = info
            .read(
                &mut Cursor::new(&self.map[..]),
                self.content.tensor_data_offset,
                &Device::Cpu,
            )
            .map_err(bad)?;
        let values = q
            .dequantize(&Device::Cpu)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(bad)?;
        check_finite_f32(&self.path, &name, &values)?;
        let heads = if hf.ends_with("self_attn.q_proj.weight") {
            config.num_attention_heads
        } else if hf.ends_with("self_attn.k_proj.weight") {
            config.num_key_value_heads
        } else {
            return Ok(values);
        };
        Ok(unpermute_rows(&values, shape, heads))
    }

    /// The tokenizer the metadata describes (`tokenizer.ggml.*`): byte-level BPE (`gpt2`) with its
    /// vocabulary, merges, special tokens and the pre-tokenizer llama.cpp names
    /// (`tokenizer.ggml.pre`), and the chat template (`tokenizer.chat_template`).
    pub fn tokenizer(&self) -> Result<Tokenizer> {
        let parts = self.tokenizer_parts()?;
        let json = tokenizer_json(&parts).map_err(|e| self.corrupt(format!("tokenizer: {e}")))?;
        let inner = tokenizers::Tokenizer::from_str(&json.to_string())
            .map_err(|e| self.corrupt(format!("tokenizer: {e}")))?;
        let text = |id: Option<u32>| id.map(|i| parts.tokens[i as usize]);
        let tokenizer = Tokenizer::from_tokenizer(
            inner,
            text(parts.bos),
            text(parts.eos),
            text(parts.pad),
            text(parts.unk),
        )
        .map_err(|e| self.corrupt(format!("tokenizer: {e}")))?;
        Ok(match parts.chat_template {
            Some(t) => tokenizer.with_chat_template(t),
            None => tokenizer,
        })
    }

    fn tokenizer_parts(&self) -> Result<GgufTokenizer<'_>> {
        let model = self
            .string("tokenizer.ggml.model")?
            .ok_or_else(|| self.corrupt("metadata `tokenizer.ggml.model` is missing"))?;
        let tokens = self
            .strings("tokenizer.ggml.tokens")?
            .ok_or_else(|| self.corrupt("metadata `tokenizer.ggml.tokens` is missing"))?;
        let token_types = self.integers("tokenizer.ggml.token_type")?;
        if let Some(t) = &token_types {
            if t.len() != tokens.len() {
                return Err(self.corrupt(format!(
                    "`tokenizer.ggml.token_type` has {} entries for {} tokens",
                    t.len(),
                    tokens.len()
                )));
            }
        }
        let count = tokens.len();
        let id = |key: &str| -> Result<Option<u32>> {
            match self.unsigned(key)? {
                None => Ok(None),
                Some(n) if (n as usize) < count => Ok(Some(n as u32)),
                Some(n) => Err(self.corrupt(format!("`{key}` {n} is outside the {count} tokens"))),
            }
        };
        // llama.cpp adds BOS to a SentencePiece vocabulary that does not say otherwise.
        let add_bos = match self.metadata("tokenizer.ggml.add_bos_token") {
            None => model == "llama",
            Some(Value::Bool(b)) => *b,
            Some(v) => {
                return Err(self.corrupt(format!(
                    "metadata `tokenizer.ggml.add_bos_token` is not a bool: {v:?}"
                )))
            }
        };
        Ok(GgufTokenizer {
            model,
            pre: self.string("tokenizer.ggml.pre")?,
            merges: self.strings("tokenizer.ggml.merges")?.unwrap_or_default(),
            scores: self.floats("tokenizer.ggml.scores")?.unwrap_or_default(),
            tokens,
            token_types: token_types.unwrap_or_default(),
            bos: id("tokenizer.ggml.bos_token_id")?,
            eos: id("tokenizer.ggml.eos_token_id")?,
            pad: id("tokenizer.ggml.padding_token_id")?,
            unk: id("tokenizer.ggml.unknown_token_id")?,
            add_bos,
            chat_template: self.string("tokenizer.chat_template")?,
        })
    }

    /// Writes this model as a Hugging Face folder in `out`: the tensors dequantized (Q/K rows in
    /// Hugging Face order) as `dtype` in `model.safetensors` or shards of at most
    /// `max_shard_bytes`, `config.json` ([`Self::config_json`] with `architectures`,
    /// `torch_dtype`), `tokenizer.json` ([`Self::tokenizer`]'s pipeline) and
    /// `tokenizer_config.json` (special tokens and the chat template). One tensor is in memory
    /// at a time.
    pub fn write_hf_folder(
        &self,
        out: &Path,
        dtype: TorchDtype,
        max_shard_bytes: u64,
    ) -> Result<WrittenCheckpoint> {
        let config = self.config()?;
        // The tokenizer is checked before anything is written.
        tokenizer_json(&self.tokenizer_parts()?)
            .map_err(|e| self.corrupt(format!("tokenizer: {e}")))?;
        let mut config_json = self.config_json()?;
        config_json.insert("architectures".into(), json!(["LlamaForCausalLM"]));
        config_json.insert("torch_dtype".into(), json!(torch_dtype_name(dtype)));
        let mut parameters = 0u64;
        let tensors: Vec<OutTensor<'_>> = checkpoint_tensor_names(&config)
            .into_iter()
            .map(|name| {
                let shape = hf_tensor_shape(&config, &name);
                parameters += shape.iter().product::<usize>() as u64;
                let (config, key) = (&config, name.clone());
                let produce_shape = shape.clone();
                OutTensor {
                    name,
                    dtype: dtype.safetensors(),
                    shape,
                    produce: Box::new(move || {
                        Ok(dtype.encode(&self.tensor_f32(&key, &produce_shape, config)?))
                    }),
                }
            })
            .collect();
        prepare_output_dir(out, &[self.path.as_path()])?;
        let written = write_checkpoint(out, tensors, max_shard_bytes, parameters)?;
        write_config(out, &config_json)?;
        self.write_tokenizer_files(out)?;
        Ok(written)
    }

    /// Writes `tokenizer.json` ([`Self::tokenizer`]'s pipeline) and `tokenizer_config.json`
    /// (special tokens, BOS handling and the chat template) into the folder `out`; returns their
    /// names.
    pub fn write_tokenizer_files(&self, out: &Path) -> Result<Vec<String>> {
        let parts = self.tokenizer_parts()?;
        let tokenizer =
            tokenizer_json(&parts).map_err(|e| self.corrupt(format!("tokenizer: {e}")))?;
        let text = |t: Option<u32>| t.map(|i| parts.tokens[i as usize]);
        let mut tok_config = Map::new();
        tok_config.insert("tokenizer_class".into(), json!("PreTrainedTokenizerFast"));
        for (key, id) in [
            ("bos_token", parts.bos),
            ("eos_token", parts.eos),
            ("pad_token", parts.pad),
            ("unk_token", parts.unk),
        ] {
            if let Some(t) = text(id) {
                tok_config.insert(key.into(), json!(t));
            }
        }
        tok_config.insert("add_bos_token".into(), json!(parts.add_bos));
        tok_config.insert("clean_up_tokenization_spaces".into(), json!(false));
        // The context length is all of the model this needs (a tokenizer-only file has none).
        if let Some(n) = self.unsigned(&format!("{}.context_length", self.architecture()?))? {
            tok_config.insert("model_max_length".into(), json!(n));
        }
        if let Some(t) = parts.chat_template {
            tok_config.insert("chat_template".into(), json!(t));
        }
        let mut names = Vec::new();
        for (name, value) in [
            ("tokenizer.json", tokenizer),
            ("tokenizer_config.json", Json::Object(tok_config)),
        ] {
            let path = out.join(name);
            let text = serde_json::to_string_pretty(&value)
                .map_err(|e| Error::encode(path.display().to_string(), e))?;
            std::fs::write(&path, text + "\n").map_err(|e| Error::io(&path, e))?;
            names.push(name.to_string());
        }
        Ok(names)
    }

    /// Every `tokenizer.*` metadata entry, by key (what a GGUF file written from this one copies).
    pub fn tokenizer_metadata(&self) -> Vec<(String, Value)> {
        let mut out: Vec<(String, Value)> = self
            .content
            .metadata
            .iter()
            .filter(|(k, _)| k.starts_with("tokenizer."))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// How many tensors of each GGML type the file holds (for a summary line).
    pub fn type_counts(&self) -> Vec<(String, usize)> {
        let mut counts: HashMap<String, usize> = HashMap::new();
        for t in self.content.tensor_infos.values() {
            *counts.entry(format!("{:?}", t.ggml_dtype)).or_default() += 1;
        }
        let mut out: Vec<_> = counts.into_iter().collect();
        out.sort();
        out
    }
}

/// The tokenizer fields of a GGUF file's metadata.
struct GgufTokenizer<'a> {
    /// `tokenizer.ggml.model`: `gpt2` (byte-level BPE) or `llama` (SentencePiece).
    model: &'a str,
    /// `tokenizer.ggml.pre`: llama.cpp's name of the pre-tokenizer.
    pre: Option<&'a str>,
    tokens: Vec<&'a str>,
    /// `tokenizer.ggml.token_type` (1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused,
    /// 6 byte); empty when absent.
    token_types: Vec<i64>,
    /// `tokenizer.ggml.merges`, `"a b"` each.
    merges: Vec<&'a str>,
    /// `tokenizer.ggml.scores` (SentencePiece); empty when absent.
    scores: Vec<f32>,
    bos: Option<u32>,
    eos: Option<u32>,
    pad: Option<u32>,
    unk: Option<u32>,
    add_bos: bool,
    chat_template: Option<&'a str>,
}

/// The byte-level pre-tokenizer step (`use_regex`: GPT-2's split first).
fn byte_level(use_regex: bool) -> Json {
    json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true,
           "use_regex": use_regex})
}

/// Llama 3's split pattern (its tokenizer.json; llama.cpp's `llama-bpe`).
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The `tokenizer.json` (the `tokenizers` crate's format) of a GGUF byte-level BPE tokenizer:
/// the pre-tokenizer of the model family llama.cpp names in `tokenizer.ggml.pre` (as that family's
/// own tokenizer.json has it), control tokens (type 3) special, user-defined ones (type 4) added,
/// and BOS prepended when `tokenizer.ggml.add_bos_token` says so.
fn tokenizer_json(t: &GgufTokenizer<'_>) -> std::result::Result<Json, String> {
    let sentencepiece = match t.model {
        "gpt2" => false,
        "llama" => true,
        other => {
            return Err(format!(
                "tokenizer model {other:?} is not supported (gpt2: byte-level BPE; llama: \
                 SentencePiece BPE)"
            ))
        }
    };
    let vocab: Map<String, Json> = t
        .tokens
        .iter()
        .enumerate()
        .map(|(i, tok)| (tok.to_string(), json!(i)))
        .collect();
    if vocab.len() != t.tokens.len() {
        return Err("`tokenizer.ggml.tokens` repeats a token".into());
    }
    let merges: Vec<Json> = if t.merges.is_empty() && sentencepiece {
        sentencepiece_merges(&t.tokens, &t.scores)?
            .into_iter()
            .map(|(a, b)| json!([a, b]))
            .collect()
    } else {
        t.merges
            .iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| json!([a, b]))
                    .ok_or_else(|| format!("merge {m:?} is not two tokens"))
            })
            .collect::<std::result::Result<_, _>>()?
    };
    // Control tokens are special, user-defined ones added; a SentencePiece vocabulary's unknown
    // token is special too (as transformers' LlamaTokenizer registers it).
    let added: Vec<Json> = t
        .token_types
        .iter()
        .enumerate()
        .filter(|&(id, ty)| matches!(ty, 3 | 4) || (sentencepiece && t.unk == Some(id as u32)))
        .map(|(id, ty)| {
            json!({"id": id, "content": t.tokens[id], "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": *ty == 4, "special": *ty != 4})
        })
        .collect();
    let bos_template = match (t.add_bos, t.bos) {
        (true, Some(bos)) => {
            let b = t.tokens[bos as usize];
            Some(json!({
                "type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": b, "type_id": 0}},
                           {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": b, "type_id": 0}},
                         {"Sequence": {"id": "A", "type_id": 0}},
                         {"SpecialToken": {"id": b, "type_id": 1}},
                         {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {b: {"id": b, "ids": [bos], "tokens": [b]}}}))
        }
        _ => None,
    };
    let (pre_tokenizer, post_processor, decoder) = if sentencepiece {
        // transformers' LlamaTokenizer (not legacy): `▁` for spaces and before the first word,
        // bytes for what the vocabulary lacks.
        (
            json!({"type": "Metaspace", "replacement": "\u{2581}", "prepend_scheme": "first",
                   "split": false}),
            bos_template.unwrap_or(Json::Null),
            json!({"type": "Sequence", "decoders": [
                {"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "},
                {"type": "ByteFallback"}, {"type": "Fuse"},
                {"type": "Strip", "content": " ", "start": 1, "stop": 0}]}),
        )
    } else {
        let byte_post = json!({"type": "ByteLevel", "add_prefix_space": true,
                               "trim_offsets": false, "use_regex": true});
        (
            byte_level_pre_tokenizer(t.pre)?,
            match bos_template {
                Some(tp) => json!({"type": "Sequence", "processors": [byte_post, tp]}),
                None => byte_post,
            },
            json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true,
                   "use_regex": true}),
        )
    };
    let unk = match sentencepiece {
        true => Json::Null,
        false => json!(t.unk.map(|u| t.tokens[u as usize])),
    };
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": post_processor,
        "decoder": decoder,
        "model": {"type": "BPE", "dropout": null, "unk_token": unk,
                  "continuing_subword_prefix": null, "end_of_word_suffix": null,
                  "fuse_unk": sentencepiece, "byte_fallback": sentencepiece,
                  "ignore_merges": false, "vocab": vocab, "merges": merges}
    }))
}

/// The byte-level pre-tokenizer of the model family llama.cpp names in `tokenizer.ggml.pre`, as
/// that family's own tokenizer.json has it.
pub(crate) fn byte_level_pre_tokenizer(pre: Option<&str>) -> std::result::Result<Json, String> {
    Ok(match pre.unwrap_or("default") {
        "default" | "gpt-2" | "gpt2" => byte_level(true),
        // SmolLM's tokenizer.json: digits one by one, then GPT-2's split.
        "smollm" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true}, byte_level(true)]}),
        "llama3" | "llama-bpe" | "smaug-bpe" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": LLAMA3_SPLIT}, "behavior": "Isolated",
             "invert": false},
            byte_level(false)]}),
        other => {
            return Err(format!(
                "pre-tokenizer {other:?} (`tokenizer.ggml.pre`) is not supported (default, gpt-2, \
                 smollm, llama3, llama-bpe, smaug-bpe)"
            ))
        }
    })
}

/// The merges a SentencePiece vocabulary without stored merges implies, as transformers derives
/// them (`generate_merges`): every split of every token into two vocabulary tokens, those of one
/// token in vocabulary order, then all of them by the token's score, then by the pieces' lengths
/// in characters, best first (a stable sort, so ties keep that order).
fn sentencepiece_merges<'a>(
    tokens: &[&'a str],
    scores: &[f32],
) -> std::result::Result<Vec<(&'a str, &'a str)>, String> {
    if scores.len() != tokens.len() {
        return Err(format!(
            "`tokenizer.ggml.scores` has {} entries for {} tokens (a SentencePiece vocabulary \
             without merges needs one score per token)",
            scores.len(),
            tokens.len()
        ));
    }
    let index: HashMap<&str, usize> = tokens.iter().enumerate().map(|(i, &t)| (t, i)).collect();
    let mut merges: Vec<(&str, &str, f32)> = Vec::new();
    for (&token, &score) in tokens.iter().zip(scores) {
        let mut local: Vec<(&str, &str, f32)> = token
            .char_indices()
            .skip(1)
            .map(|(at, _)| token.split_at(at))
            .filter(|(l, r)| index.contains_key(l) && index.contains_key(r))
            .map(|(l, r)| (l, r, score))
            .collect();
        local.sort_by_key(|&(l, r, _)| (index[l], index[r]));
        merges.extend(local);
    }
    let key = |m: &(&str, &str, f32)| (m.2, m.0.chars().count(), m.1.chars().count());
    merges.sort_by(|a, b| {
        let (ka, kb) = (key(a), key(b));
        kb.0.total_cmp(&ka.0)
            .then(kb.1.cmp(&ka.1))
            .then(kb.2.cmp(&ka.2))
    });
    Ok(merges.into_iter().map(|(l, r, _)| (l, r)).collect())
}

/// Undoes llama.cpp's permutation of a Q or K projection `[heads·head_dim, in]`: within each head,
/// llama.cpp stores row `2t + s` what Hugging Face stores at row `s·head_dim/2 + t` (the two
/// rotary halves interleaved).
pub fn unpermute_rows(values: &[f32], shape: &[usize], heads: usize) -> Vec<f32> {
    move_rows(values, shape, heads, true)
}

/// llama.cpp's permutation of a Hugging Face Q or K projection (the inverse of
/// [`unpermute_rows`]), as its converter writes GGUF files.
pub fn permute_rows(values: &[f32], shape: &[usize], heads: usize) -> Vec<f32> {
    move_rows(values, shape, heads, false)
}

/// Row `2t + s` of each head (llama.cpp) to row `s·head_dim/2 + t` (Hugging Face) when `to_hf`,
/// else the other way.
fn move_rows(values: &[f32], shape: &[usize], heads: usize, to_hf: bool) -> Vec<f32> {
    let (rows, cols) = (shape[0], shape[1]);
    let head_dim = rows / heads;
    let half = head_dim / 2;
    let mut out = vec![0f32; values.len()];
    for h in 0..heads {
        for s in 0..2 {
            for t in 0..half {
                let hf = h * head_dim + s * half + t;
                let gg = h * head_dim + 2 * t + s;
                let (to, from) = if to_hf { (hf, gg) } else { (gg, hf) };
                out[to * cols..(to + 1) * cols]
                    .copy_from_slice(&values[from * cols..(from + 1) * cols]);
            }
        }
    }
    out
}

/// The shape transformers gives the Llama tensor `name` (a name of [`checkpoint_tensor_names`]):
/// the linears' from [`linear_shape`], `[vocab, hidden]` for embeddings and lm_head, `[hidden]`
/// for the norms.
pub fn hf_tensor_shape(c: &LlamaConfig, name: &str) -> Vec<usize> {
    let module = name.strip_suffix(".weight").unwrap_or(name);
    match module.rsplit('.').next().unwrap_or(module) {
        "embed_tokens" | "lm_head" => vec![c.vocab_size, c.hidden_size],
        m @ ("q_proj" | "k_proj" | "v_proj" | "o_proj" | "gate_proj" | "up_proj" | "down_proj") => {
            linear_shape(c, m).to_vec()
        }
        _ => vec![c.hidden_size],
    }
}
