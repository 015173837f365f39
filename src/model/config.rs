//! A Llama `config.json` as transformers writes it (v4: `torch_dtype`, `rope_theta` +
//! `rope_scaling`; v5: `dtype`, `rope_parameters`), validated into [`LlamaConfig`], and the RoPE
//! inverse frequencies (`[head_dim / 2]` f32) computed with transformers' exact f32 arithmetic.
//!
//! Policy: `model_type` must be `"llama"`; fields transformers' Llama checkpoints always write
//! (sizes, head counts, vocab) are required, the rest take `LlamaConfig`'s defaults. Biased linears,
//! activations other than SiLU, partial rotary embeddings and RoPE types other than default,
//! linear and llama3 are refused with [`Error::Config`] rather than silently computed wrong.

use std::path::Path;

use serde::Deserialize;
use serde_json::{Map, Value};

use crate::hf::folder::ModelFolder;
use crate::{Error, Result};

/// transformers' default `rope_theta`.
pub const DEFAULT_ROPE_THETA: f64 = 10000.0;

/// A floating-point dtype named as torch names it in configs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TorchDtype {
    F32,
    F16,
    BF16,
}

impl TorchDtype {
    /// Parses `"float32"`, `"float16"` or `"bfloat16"` (optionally prefixed `torch.`).
    pub fn parse(field: &'static str, name: &str) -> Result<Self> {
        match name.strip_prefix("torch.").unwrap_or(name) {
            "float32" => Ok(Self::F32),
            "float16" => Ok(Self::F16),
            "bfloat16" => Ok(Self::BF16),
            other => Err(config_err(
                field,
                format!("dtype {other:?} is not float32, float16 or bfloat16"),
            )),
        }
    }

    /// The candle dtype.
    pub fn to_candle(self) -> candle_core::DType {
        match self {
            Self::F32 => candle_core::DType::F32,
            Self::F16 => candle_core::DType::F16,
            Self::BF16 => candle_core::DType::BF16,
        }
    }

    /// The safetensors dtype.
    pub fn safetensors(self) -> safetensors::Dtype {
        match self {
            Self::F32 => safetensors::Dtype::F32,
            Self::F16 => safetensors::Dtype::F16,
            Self::BF16 => safetensors::Dtype::BF16,
        }
    }

    /// Little-endian bytes of `values` in this dtype, each rounded to nearest even as torch's
    /// `.to()` rounds.
    pub fn encode(self, values: &[f32]) -> Vec<u8> {
        match self {
            Self::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            Self::BF16 => values
                .iter()
                .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
                .collect(),
            Self::F16 => values
                .iter()
                .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
                .collect(),
        }
    }
}

/// How RoPE frequencies are rescaled (`rope_type`).
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    /// `"default"` (or no scaling at all).
    Default,
    /// `"linear"`: every inverse frequency divided by `factor`.
    Linear { factor: f64 },
    /// `"llama3"`: Llama 3.1's wavelength-dependent interpolation.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
}

/// `quantization_config` of a bitsandbytes 4-bit (NF4) pre-quantized checkpoint.
#[derive(Clone, Debug, PartialEq)]
pub struct BnbQuantConfig {
    /// `bnb_4bit_use_double_quant`.
    pub double_quant: bool,
    /// `bnb_4bit_compute_dtype` (bitsandbytes' default float32).
    pub compute_dtype: TorchDtype,
    /// `llm_int8_skip_modules`: modules left unquantized (`None`: bnb's default, lm_head).
    pub skip_modules: Option<Vec<String>>,
}

/// A validated Llama configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct LlamaConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub tie_word_embeddings: bool,
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    /// `dtype` (v5) or `torch_dtype` (v4): the dtype the checkpoint was saved in.
    pub torch_dtype: Option<TorchDtype>,
    pub bos_token_id: Option<u32>,
    /// `eos_token_id`, an int or a list in the file.
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
    /// Present for a bitsandbytes pre-quantized checkpoint.
    pub quantization: Option<BnbQuantConfig>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(u32),
    Many(Vec<u32>),
}

#[derive(Deserialize)]
struct RawConfig {
    model_type: Option<String>,
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_scaling: Option<Map<String, Value>>,
    rope_parameters: Option<Map<String, Value>>,
    partial_rotary_factor: Option<f64>,
    tie_word_embeddings: Option<bool>,
    vocab_size: Option<usize>,
    max_position_embeddings: Option<usize>,
    torch_dtype: Option<String>,
    dtype: Option<String>,
    bos_token_id: Option<u32>,
    eos_token_id: Option<OneOrMany>,
    pad_token_id: Option<u32>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    hidden_act: Option<String>,
    quantization_config: Option<Value>,
}

#[derive(Deserialize)]
struct RawBnb {
    quant_method: Option<String>,
    load_in_4bit: Option<bool>,
    _load_in_4bit: Option<bool>,
    load_in_8bit: Option<bool>,
    _load_in_8bit: Option<bool>,
    bnb_4bit_quant_type: Option<String>,
    bnb_4bit_use_double_quant: Option<bool>,
    bnb_4bit_compute_dtype: Option<String>,
    bnb_4bit_quant_storage: Option<String>,
    llm_int8_skip_modules: Option<Vec<String>>,
}

fn config_err(field: &'static str, reason: impl Into<String>) -> Error {
    Error::Config {
        field,
        reason: reason.into(),
    }
}

fn required(field: &'static str, value: Option<usize>) -> Result<usize> {
    match value {
        None => Err(config_err(field, "missing")),
        Some(0) => Err(config_err(field, "must be positive")),
        Some(v) => Ok(v),
    }
}

fn positive_finite(field: &'static str, value: f64) -> Result<f64> {
    if value.is_finite() && value > 0.0 {
        Ok(value)
    } else {
        Err(config_err(
            field,
            format!("{value} is not a positive number"),
        ))
    }
}

fn map_f64(map: &Map<String, Value>, field: &'static str, key: &str) -> Result<Option<f64>> {
    match map.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_f64()
            .map(Some)
            .ok_or_else(|| config_err(field, format!("`{key}` is not a number: {v}"))),
    }
}

fn map_required_f64(map: &Map<String, Value>, field: &'static str, key: &str) -> Result<f64> {
    let v =
        map_f64(map, field, key)?.ok_or_else(|| config_err(field, format!("`{key}` missing")))?;
    positive_finite(field, v)
}

/// A `rope_scaling` / `rope_parameters` object: its `rope_theta` (if any) and its scaling.
fn parse_rope_map(
    map: &Map<String, Value>,
    field: &'static str,
    max_position_embeddings: usize,
) -> Result<(Option<f64>, RopeScaling)> {
    let type_of = |key: &str| -> Result<Option<&str>> {
        match map.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.as_str())),
            Some(v) => Err(config_err(field, format!("`{key}` is not a string: {v}"))),
        }
    };
    let rope_type = match (type_of("rope_type")?, type_of("type")?) {
        (Some(a), Some(b)) if a != b => {
            return Err(config_err(
                field,
                format!("`rope_type` {a:?} and `type` {b:?} disagree"),
            ))
        }
        (Some(a), _) | (None, Some(a)) => a,
        (None, None) => "default",
    };
    if let Some(p) = map_f64(map, field, "partial_rotary_factor")? {
        if p != 1.0 {
            return Err(config_err(
                field,
                format!("partial_rotary_factor {p} is not supported"),
            ));
        }
    }
    let theta = map_f64(map, field, "rope_theta")?
        .map(|t| positive_finite(field, t))
        .transpose()?;
    let scaling = match rope_type {
        "default" => RopeScaling::Default,
        "linear" => RopeScaling::Linear {
            factor: map_required_f64(map, field, "factor")?,
        },
        "llama3" => {
            let low_freq_factor = map_required_f64(map, field, "low_freq_factor")?;
            let high_freq_factor = map_required_f64(map, field, "high_freq_factor")?;
            if high_freq_factor <= low_freq_factor {
                return Err(config_err(
                    field,
                    format!(
                        "high_freq_factor {high_freq_factor} must exceed low_freq_factor \
                         {low_freq_factor}"
                    ),
                ));
            }
            let original = match map.get("original_max_position_embeddings") {
                None | Some(Value::Null) => max_position_embeddings,
                Some(v) => v.as_u64().filter(|&n| n > 0).ok_or_else(|| {
                    config_err(
                        field,
                        format!("`original_max_position_embeddings` is not a positive int: {v}"),
                    )
                })? as usize,
            };
            RopeScaling::Llama3 {
                factor: map_required_f64(map, field, "factor")?,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: original,
            }
        }
        other => {
            return Err(config_err(
                field,
                format!("rope type {other:?} is not supported (default, linear, llama3)"),
            ))
        }
    };
    Ok((theta, scaling))
}

fn parse_bnb(value: Value) -> Result<BnbQuantConfig> {
    const FIELD: &str = "quantization_config";
    let raw: RawBnb =
        serde_json::from_value(value).map_err(|e| config_err(FIELD, e.to_string()))?;
    match raw.quant_method.as_deref() {
        Some("bitsandbytes") => {}
        other => {
            return Err(config_err(
                "quantization_config.quant_method",
                format!("{other:?} is not \"bitsandbytes\""),
            ))
        }
    }
    if raw.load_in_8bit.or(raw._load_in_8bit).unwrap_or(false) {
        return Err(config_err(
            "quantization_config.load_in_8bit",
            "8-bit (LLM.int8) checkpoints are not supported",
        ));
    }
    if !raw.load_in_4bit.or(raw._load_in_4bit).unwrap_or(false) {
        return Err(config_err(
            "quantization_config.load_in_4bit",
            "must be true",
        ));
    }
    // BitsAndBytesConfig's default quant type is fp4.
    let quant_type = raw.bnb_4bit_quant_type.as_deref().unwrap_or("fp4");
    if quant_type != "nf4" {
        return Err(config_err(
            "quantization_config.bnb_4bit_quant_type",
            format!("{quant_type:?} is not supported (nf4 only)"),
        ));
    }
    let storage = raw.bnb_4bit_quant_storage.as_deref().unwrap_or("uint8");
    if storage != "uint8" {
        return Err(config_err(
            "quantization_config.bnb_4bit_quant_storage",
            format!("{storage:?} is not supported (uint8 only)"),
        ));
    }
    let compute_dtype = match raw.bnb_4bit_compute_dtype.as_deref() {
        None => TorchDtype::F32,
        Some(name) => TorchDtype::parse("quantization_config.bnb_4bit_compute_dtype", name)?,
    };
    Ok(BnbQuantConfig {
        double_quant: raw.bnb_4bit_use_double_quant.unwrap_or(false),
        compute_dtype,
        skip_modules: raw.llm_int8_skip_modules,
    })
}

impl LlamaConfig {
    /// Reads and validates `path` (a `config.json`).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json_str(&text).map_err(|e| in_file(e, path))
    }

    /// Parses and validates the text of a `config.json`. Wrongly typed fields give
    /// [`Error::Json`] (from [`Self::from_file`], [`Error::CorruptFile`]); missing, inconsistent or unsupported values give [`Error::Config`].
    pub fn from_json_str(text: &str) -> Result<Self> {
        let raw: RawConfig = serde_json::from_str(text).map_err(|e| Error::Json(e.to_string()))?;
        match raw.model_type.as_deref() {
            Some("llama") => {}
            other => {
                return Err(config_err(
                    "model_type",
                    format!("{other:?} is not \"llama\""),
                ))
            }
        }
        if let Some(act) = raw.hidden_act.as_deref().filter(|a| *a != "silu") {
            return Err(config_err(
                "hidden_act",
                format!("{act:?} is not supported (silu)"),
            ));
        }
        if raw.attention_bias == Some(true) {
            return Err(config_err(
                "attention_bias",
                "biased linears are not supported",
            ));
        }
        if raw.mlp_bias == Some(true) {
            return Err(config_err("mlp_bias", "biased linears are not supported"));
        }
        if let Some(p) = raw.partial_rotary_factor.filter(|&p| p != 1.0) {
            return Err(config_err(
                "partial_rotary_factor",
                format!("{p} is not supported"),
            ));
        }

        let hidden_size = required("hidden_size", raw.hidden_size)?;
        let intermediate_size = required("intermediate_size", raw.intermediate_size)?;
        let num_hidden_layers = required("num_hidden_layers", raw.num_hidden_layers)?;
        let num_attention_heads = required("num_attention_heads", raw.num_attention_heads)?;
        let vocab_size = required("vocab_size", raw.vocab_size)?;
        let max_position_embeddings = match raw.max_position_embeddings {
            None => 2048,
            v => required("max_position_embeddings", v)?,
        };
        let num_key_value_heads = match raw.num_key_value_heads {
            None => num_attention_heads,
            v => required("num_key_value_heads", v)?,
        };
        if num_attention_heads % num_key_value_heads != 0 {
            return Err(config_err(
                "num_key_value_heads",
                format!(
                    "{num_attention_heads} attention heads are not a multiple of \
                     {num_key_value_heads} key/value heads"
                ),
            ));
        }
        let head_dim = match raw.head_dim {
            Some(d) => required("head_dim", Some(d))?,
            None if hidden_size % num_attention_heads == 0 => hidden_size / num_attention_heads,
            None => {
                return Err(config_err(
                    "num_attention_heads",
                    format!(
                        "hidden_size {hidden_size} is not a multiple of {num_attention_heads} \
                         heads and no head_dim is given"
                    ),
                ))
            }
        };
        if head_dim % 2 != 0 {
            return Err(config_err(
                "head_dim",
                format!("{head_dim} is odd; rotate-half RoPE needs an even head_dim"),
            ));
        }
        let rms_norm_eps = positive_finite("rms_norm_eps", raw.rms_norm_eps.unwrap_or(1e-6))?;

        let mut thetas: Vec<(&'static str, f64)> = Vec::new();
        if let Some(t) = raw.rope_theta {
            thetas.push(("rope_theta", positive_finite("rope_theta", t)?));
        }
        let mut scalings: Vec<(&'static str, RopeScaling)> = Vec::new();
        for (field, map) in [
            ("rope_scaling", &raw.rope_scaling),
            ("rope_parameters", &raw.rope_parameters),
        ] {
            if let Some(map) = map {
                let (theta, scaling) = parse_rope_map(map, field, max_position_embeddings)?;
                if let Some(t) = theta {
                    thetas.push((field, t));
                }
                scalings.push((field, scaling));
            }
        }
        let rope_theta = thetas.first().map_or(DEFAULT_ROPE_THETA, |t| t.1);
        if let Some((field, t)) = thetas.iter().find(|t| t.1 != rope_theta) {
            return Err(config_err(
                field,
                format!("rope_theta {t} disagrees with {} {rope_theta}", thetas[0].0),
            ));
        }
        let rope_scaling = scalings
            .first()
            .map_or(RopeScaling::Default, |s| s.1.clone());
        if let Some((field, s)) = scalings.iter().find(|s| s.1 != rope_scaling) {
            return Err(config_err(
                field,
                format!("{s:?} disagrees with {} {rope_scaling:?}", scalings[0].0),
            ));
        }

        let torch_dtype = match (&raw.dtype, &raw.torch_dtype) {
            (Some(a), Some(b)) => {
                let (a, b) = (
                    TorchDtype::parse("dtype", a)?,
                    TorchDtype::parse("torch_dtype", b)?,
                );
                if a != b {
                    return Err(config_err(
                        "dtype",
                        format!("{a:?} disagrees with torch_dtype {b:?}"),
                    ));
                }
                Some(a)
            }
            (Some(a), None) => Some(TorchDtype::parse("dtype", a)?),
            (None, Some(b)) => Some(TorchDtype::parse("torch_dtype", b)?),
            (None, None) => None,
        };
        let eos_token_ids = match raw.eos_token_id {
            None => Vec::new(),
            Some(OneOrMany::One(id)) => vec![id],
            Some(OneOrMany::Many(ids)) => ids,
        };
        let quantization = raw
            .quantization_config
            .filter(|v| !v.is_null())
            .map(parse_bnb)
            .transpose()?;

        Ok(Self {
            hidden_size,
            intermediate_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps,
            rope_theta,
            rope_scaling,
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            vocab_size,
            max_position_embeddings,
            torch_dtype,
            bos_token_id: raw.bos_token_id,
            eos_token_ids,
            pad_token_id: raw.pad_token_id,
            quantization,
        })
    }

    /// The RoPE inverse frequencies of this model (`head_dim / 2` values).
    pub fn rope_inv_freq(&self) -> Vec<f32> {
        rope_inv_freq(self.head_dim, self.rope_theta, &self.rope_scaling)
    }
}

/// RoPE inverse frequencies as transformers computes them, every step in f32 with torch's
/// operator semantics: `1 / theta^(arange(0, dim, 2) / dim)`, then the scaling. Python scalars
/// become f32 operands, and `scalar / tensor` is `tensor.reciprocal() * scalar` (torch's
/// `__rtruediv__`), which the order of operations below reproduces.
pub fn rope_inv_freq(head_dim: usize, theta: f64, scaling: &RopeScaling) -> Vec<f32> {
    let dim = head_dim as f32;
    let base = theta as f32;
    let inv_freq = (0..head_dim).step_by(2).map(|i| {
        let exponent = i as f32 / dim;
        // torch's vectorised powf is within an ulp; f64 pow rounded once is the exact value.
        1.0 / (f64::from(base).powf(f64::from(exponent)) as f32)
    });
    match *scaling {
        RopeScaling::Default => inv_freq.collect(),
        RopeScaling::Linear { factor } => inv_freq.map(|f| f / factor as f32).collect(),
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } => {
            let old_context_len = original_max_position_embeddings as f64;
            let low_freq_wavelen = (old_context_len / low_freq_factor) as f32;
            let high_freq_wavelen = (old_context_len / high_freq_factor) as f32;
            let two_pi = (2.0 * std::f64::consts::PI) as f32;
            let factor = factor as f32;
            let low = low_freq_factor as f32;
            let span = (high_freq_factor - low_freq_factor) as f32;
            inv_freq
                .map(|f| {
                    let wavelen = (1.0 / f) * two_pi;
                    let scaled = if wavelen > low_freq_wavelen {
                        f / factor
                    } else {
                        f
                    };
                    let medium = wavelen >= high_freq_wavelen && wavelen <= low_freq_wavelen;
                    if medium {
                        let smooth = ((1.0 / wavelen) * old_context_len as f32 - low) / span;
                        (1.0 - smooth) * scaled / factor + smooth * scaled
                    } else {
                        scaled
                    }
                })
                .collect()
        }
    }
}

/// The torch name of a dtype as configs write it.
pub fn torch_dtype_name(dtype: TorchDtype) -> &'static str {
    match dtype {
        TorchDtype::F32 => "float32",
        TorchDtype::F16 => "float16",
        TorchDtype::BF16 => "bfloat16",
    }
}

/// `[out, in]` of the linear `name` (one of `model::llama::linears`' names).
pub(crate) fn linear_shape(c: &LlamaConfig, name: &str) -> [usize; 2] {
    let (h, m) = (c.hidden_size, c.intermediate_size);
    let q = c.num_attention_heads * c.head_dim;
    let kv = c.num_key_value_heads * c.head_dim;
    match name {
        "q_proj" => [q, h],
        "k_proj" | "v_proj" => [kv, h],
        "o_proj" => [h, q],
        "down_proj" => [h, m],
        _ => [m, h],
    }
}

/// The name of every tensor a transformers Llama checkpoint with `c` holds (as saved before any
/// quantization), in state-dict order: embeddings, each layer's seven linears and two norms, the
/// final norm, and `lm_head` unless the embeddings are tied.
pub fn checkpoint_tensor_names(c: &LlamaConfig) -> Vec<String> {
    let mut out = vec!["model.embed_tokens.weight".to_string()];
    for i in 0..c.num_hidden_layers {
        let p = format!("model.layers.{i}");
        for m in ["q_proj", "k_proj", "v_proj", "o_proj"] {
            out.push(format!("{p}.self_attn.{m}.weight"));
        }
        for m in ["gate_proj", "up_proj", "down_proj"] {
            out.push(format!("{p}.mlp.{m}.weight"));
        }
        out.push(format!("{p}.input_layernorm.weight"));
        out.push(format!("{p}.post_attention_layernorm.weight"));
    }
    out.push("model.norm.weight".to_string());
    if !c.tie_word_embeddings {
        out.push("lm_head.weight".to_string());
    }
    out
}

/// `e`, an error of [`LlamaConfig::from_json_str`] on the text of `path`, naming the file.
fn in_file(e: Error, path: &Path) -> Error {
    match e {
        Error::Json(reason) => Error::CorruptFile {
            path: path.to_path_buf(),
            reason: format!("invalid JSON: {reason}"),
        },
        Error::Config { field, reason } => Error::Config {
            field,
            reason: format!("{reason} (in {})", path.display()),
        },
        other => other,
    }
}

/// `config.json` of the model folder `folder` as a JSON object (kept whole, so a folder written
/// from it keeps every field) and validated as a Llama config.
pub fn read_folder_config(folder: &ModelFolder) -> Result<(Map<String, Value>, LlamaConfig)> {
    let text = folder.config_text()?;
    let path = folder.dir().join("config.json");
    let config = LlamaConfig::from_json_str(&text).map_err(|e| in_file(e, &path))?;
    match serde_json::from_str(&text).map_err(|e| Error::Json(e.to_string()))? {
        Value::Object(map) => Ok((map, config)),
        _ => Err(Error::Config {
            field: "config.json",
            reason: "not a JSON object".to_string(),
        }),
    }
}
