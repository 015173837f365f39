//! The PEFT adapter directory (`adapter_config.json` + `adapter_model.safetensors`) of a LoRA
//! adapter, written and read as Hugging Face PEFT does. The adapter itself (A `[r, in]` and B
//! `[out, r]` per adapted linear, PEFT's initialisation, the forward delta) is
//! `model::adapter`'s, the layer that consumes it; its types are re-exported here.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::io::Write;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use half::bf16;
use serde_json::{json, Map, Value};

use crate::model::adapter::check_dtype;
pub use crate::model::adapter::{
    kaiming_uniform_bound, LoraAdapter, LoraConfig, LoraMode, LoraPair, TargetModule,
};
use crate::{Error, Result};

/// The adapter config file of a PEFT adapter directory.
pub const ADAPTER_CONFIG_FILE: &str = "adapter_config.json";
/// The adapter weights file of a PEFT adapter directory.
pub const ADAPTER_WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// The PEFT release whose `adapter_config.json` field set `save_pretrained` writes.
pub const PEFT_FORMAT_VERSION: &str = "0.21.2";
/// Where `PeftModelForCausalLM` puts a Llama decoder layer in its state dict.
const KEY_PREFIX: &str = "base_model.model.model.layers.";

fn config_error(field: &'static str, reason: impl Into<String>) -> Error {
    Error::AdapterConfig {
        field,
        reason: reason.into(),
    }
}

impl TargetModule {
    /// PEFT's state-dict key of `matrix` ("A" or "B") of this module in `layer`.
    fn key(self, layer: usize, matrix: &str) -> String {
        format!(
            "{KEY_PREFIX}{layer}.{}.{}.lora_{matrix}.weight",
            self.block(),
            self.name()
        )
    }
}

impl LoraAdapter {
    /// Writes the PEFT adapter directory `dir` (created if missing): `adapter_config.json` with
    /// the fields PEFT 0.21 writes, and `adapter_model.safetensors` with PEFT's keys, shapes and
    /// dtype. Each file goes to a temporary name, is synced, then renamed into place.
    pub fn save_pretrained(&self, dir: impl AsRef<Path>) -> Result<()> {
        let dir = dir.as_ref();
        fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let config = serde_json::to_string_pretty(&self.peft_config_json())
            .map_err(|e| Error::encode(ADAPTER_CONFIG_FILE, e))?;
        write_atomic(dir, ADAPTER_CONFIG_FILE, config.as_bytes())?;
        let st_dtype = match self.dtype {
            DType::BF16 => safetensors::Dtype::BF16,
            _ => safetensors::Dtype::F32,
        };
        let mut tensors = Vec::new();
        for (&(layer, module), pair) in &self.pairs {
            for (matrix, t) in [("A", &pair.a), ("B", &pair.b)] {
                tensors.push((
                    module.key(layer, matrix),
                    t.dims().to_vec(),
                    tensor_bytes(t)?,
                ));
            }
        }
        let views = tensors
            .iter()
            .map(|(key, shape, bytes)| {
                let view = safetensors::tensor::TensorView::new(st_dtype, shape.clone(), bytes)
                    .map_err(|e| Error::encode(key.as_str(), e))?;
                Ok((key.as_str(), view))
            })
            .collect::<Result<Vec<_>>>()?;
        let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
        let bytes =
            crate::hf::file::serialize_safetensors(ADAPTER_WEIGHTS_FILE, views, Some(metadata))?;
        write_atomic(dir, ADAPTER_WEIGHTS_FILE, &bytes)
    }

    /// Reads a PEFT LoRA adapter directory onto `device`. Fields this crate does not use are
    /// ignored; options it cannot reproduce (DoRA, fan_in_fan_out, per-layer ranks, ...) are
    /// [`Error::AdapterConfig`]. A `target_modules` regex string (or null) is resolved to the
    /// modules present in the weights, and saved back as a list.
    /// Every error names the folder, and the file or tensor where one is to blame.
    pub fn load_pretrained(dir: impl AsRef<Path>, device: &Device) -> Result<Self> {
        let dir = dir.as_ref();
        Self::read_pretrained(dir, device).map_err(|e| match e {
            Error::BadTensor { key, reason } => Error::CorruptFile {
                path: dir.join(ADAPTER_WEIGHTS_FILE),
                reason: format!("tensor `{key}`: {reason}"),
            },
            Error::AdapterConfig { field, reason } => Error::AdapterConfig {
                field,
                reason: format!("{reason} (in {})", dir.join(ADAPTER_CONFIG_FILE).display()),
            },
            Error::InvalidArgument { op, reason } => Error::InvalidArgument {
                op,
                reason: format!("adapter {}: {reason}", dir.display()),
            },
            other => other,
        })
    }

    fn read_pretrained(dir: &Path, device: &Device) -> Result<Self> {
        let config_path = dir.join(ADAPTER_CONFIG_FILE);
        let text = fs::read_to_string(&config_path).map_err(|e| Error::io(&config_path, e))?;
        let (mut config, listed) =
            parse_peft_config(&crate::hf::file::parse_json(&config_path, &text)?)?;
        let weights_path = dir.join(ADAPTER_WEIGHTS_FILE);
        let bytes = fs::read(&weights_path).map_err(|e| Error::io(&weights_path, e))?;
        let st = crate::hf::file::read_safetensors(&weights_path, &bytes)?;
        for (name, view) in st.tensors() {
            crate::hf::file::check_finite(&weights_path, &name, view.dtype(), view.data())?;
        }
        let tensors = candle_core::safetensors::load_buffer(&bytes, device)?;

        let mut halves: BTreeMap<(usize, TargetModule), [Option<Tensor>; 2]> = BTreeMap::new();
        let mut dtype = None;
        for (key, t) in tensors {
            let (layer, module, matrix) = parse_key(&key)?;
            check_dtype(t.dtype()).map_err(|_| Error::BadTensor {
                key: key.clone(),
                reason: format!("dtype {:?}, expected f32 or bf16", t.dtype()),
            })?;
            if *dtype.get_or_insert(t.dtype()) != t.dtype() {
                return Err(Error::BadTensor {
                    key,
                    reason: format!("dtype {:?}, other tensors {dtype:?}", t.dtype()),
                });
            }
            halves.entry((layer, module)).or_default()[matrix] = Some(t);
        }
        let dtype = dtype.ok_or_else(|| Error::BadTensor {
            key: ADAPTER_WEIGHTS_FILE.to_string(),
            reason: "holds no LoRA weights".to_string(),
        })?;
        let present: BTreeSet<TargetModule> = halves.keys().map(|&(_, m)| m).collect();
        config.target_modules = match listed {
            Some(listed) => {
                if let Some(extra) = present.iter().find(|m| !listed.contains(m)) {
                    return Err(config_error(
                        "target_modules",
                        format!("the weights adapt {extra}, which is not listed"),
                    ));
                }
                listed
            }
            None => present.into_iter().collect(),
        };
        config.validate()?;
        let num_layers = halves.keys().map(|&(l, _)| l + 1).max().unwrap_or(0);
        let mut pairs = BTreeMap::new();
        for layer in 0..num_layers {
            for module in config.targets() {
                let [a, b] = halves.remove(&(layer, module)).unwrap_or_default();
                let a = a.ok_or_else(|| Error::MissingTensor {
                    key: module.key(layer, "A"),
                })?;
                let b = b.ok_or_else(|| Error::MissingTensor {
                    key: module.key(layer, "B"),
                })?;
                let r = config.r;
                let ok = matches!(a.dims(), [ra, _] if *ra == r)
                    && matches!(b.dims(), [_, rb] if *rb == r);
                if !ok {
                    return Err(Error::BadTensor {
                        key: module.key(layer, "A"),
                        reason: format!(
                            "A {:?} and B {:?} are not [r, in] and [out, r] with r = {r}",
                            a.dims(),
                            b.dims()
                        ),
                    });
                }
                pairs.insert((layer, module), LoraPair { a, b });
            }
        }
        Ok(Self {
            config,
            num_layers,
            dtype,
            pairs,
        })
    }

    /// `adapter_config.json` as PEFT 0.21's `LoraConfig.save_pretrained` writes it for this
    /// adapter (every other option at PEFT's default; `target_modules` sorted, as a list).
    fn peft_config_json(&self) -> BTreeMap<&'static str, Value> {
        let c = &self.config;
        let alpha = if c.alpha.fract() == 0.0 && c.alpha.abs() < 2f64.powi(53) {
            json!(c.alpha as i64)
        } else {
            json!(c.alpha)
        };
        let mut targets: Vec<&str> = c.target_modules.iter().map(|m| m.name()).collect();
        targets.sort_unstable();
        BTreeMap::from([
            ("alora_invocation_tokens", Value::Null),
            ("alpha_pattern", json!({})),
            ("arrow_config", Value::Null),
            ("auto_mapping", Value::Null),
            ("base_model_name_or_path", json!(c.base_model_name_or_path)),
            ("bias", json!(c.bias)),
            ("corda_config", Value::Null),
            ("ensure_weight_tying", json!(false)),
            ("eva_config", Value::Null),
            ("exclude_modules", Value::Null),
            ("fan_in_fan_out", json!(false)),
            ("inference_mode", json!(true)),
            ("init_lora_weights", json!(true)),
            ("kasa_config", Value::Null),
            ("layer_replication", Value::Null),
            ("layers_pattern", Value::Null),
            ("layers_to_transform", Value::Null),
            ("loftq_config", json!({})),
            ("lora_alpha", alpha),
            ("lora_bias", json!(false)),
            ("lora_dropout", json!(c.dropout)),
            ("lora_ga_config", Value::Null),
            ("megatron_config", Value::Null),
            ("megatron_core", json!("megatron.core")),
            ("modules_to_save", Value::Null),
            ("monteclora_config", Value::Null),
            ("peft_type", json!("LORA")),
            ("peft_version", json!(PEFT_FORMAT_VERSION)),
            ("qalora_group_size", json!(16)),
            ("r", json!(c.r)),
            ("rank_pattern", json!({})),
            ("revision", Value::Null),
            ("target_modules", json!(targets)),
            ("target_parameters", Value::Null),
            ("task_type", json!("CAUSAL_LM")),
            ("trainable_token_indices", Value::Null),
            ("use_bdlora", Value::Null),
            ("use_dora", json!(false)),
            ("use_qalora", json!(false)),
            ("use_rslora", json!(c.use_rslora)),
            ("velora_config", Value::Null),
        ])
    }
}

/// PEFT options whose non-default value changes the adapter's math or layout in ways this crate
/// does not reproduce, and why.
const UNSUPPORTED: [(&str, &str); 11] = [
    ("use_dora", "DoRA (weight-decomposed LoRA) is not supported"),
    (
        "fan_in_fan_out",
        "fan_in_fan_out (Conv1D [in, out] weights) is not supported",
    ),
    ("lora_bias", "a trained LoRA bias is not supported"),
    ("use_qalora", "QA-LoRA is not supported"),
    ("rank_pattern", "per-module ranks are not supported"),
    ("alpha_pattern", "per-module alphas are not supported"),
    (
        "layers_to_transform",
        "adapting a subset of layers is not supported",
    ),
    ("layer_replication", "layer replication is not supported"),
    (
        "modules_to_save",
        "fully trained extra modules are not supported",
    ),
    ("target_parameters", "LoRA on parameters is not supported"),
    (
        "trainable_token_indices",
        "trainable tokens are not supported",
    ),
];

/// The fields of a PEFT `adapter_config.json` this crate uses, and the listed target modules
/// (`None` for a regex string or null, resolved from the weights).
fn parse_peft_config(value: &Value) -> Result<(LoraConfig, Option<Vec<TargetModule>>)> {
    let obj = value
        .as_object()
        .ok_or_else(|| config_error("adapter_config.json", "not a JSON object"))?;
    match get(obj, "peft_type").and_then(Value::as_str) {
        Some("LORA") => {}
        other => {
            return Err(config_error(
                "peft_type",
                format!("`{}`, expected \"LORA\"", other.unwrap_or("missing")),
            ))
        }
    }
    match get(obj, "task_type") {
        None => {}
        Some(v) if v.as_str() == Some("CAUSAL_LM") => {}
        Some(v) => {
            return Err(config_error(
                "task_type",
                format!("{v}, expected \"CAUSAL_LM\""),
            ))
        }
    }
    for (field, reason) in UNSUPPORTED {
        let set = match get(obj, field) {
            None | Some(Value::Bool(false)) => false,
            Some(Value::Object(m)) => !m.is_empty(),
            Some(Value::Array(a)) => !a.is_empty(),
            Some(_) => true,
        };
        if set {
            return Err(config_error(field, reason));
        }
    }
    let r = match get(obj, "r") {
        Some(v) => v
            .as_u64()
            .ok_or_else(|| config_error("r", format!("{v} is not a non-negative integer")))?,
        None => return Err(config_error("r", "missing")),
    };
    let listed = match get(obj, "target_modules") {
        Some(Value::Array(names)) => {
            let mut modules = BTreeSet::new();
            for name in names {
                let name = name.as_str().ok_or_else(|| {
                    config_error("target_modules", format!("{name} is not a string"))
                })?;
                modules.insert(name.parse::<TargetModule>()?);
            }
            Some(modules.into_iter().collect())
        }
        None | Some(Value::String(_)) => None,
        Some(v) => {
            return Err(config_error(
                "target_modules",
                format!("{v} is neither a list nor a string"),
            ))
        }
    };
    let config = LoraConfig {
        r: usize::try_from(r).map_err(|_| config_error("r", format!("{r} is too large")))?,
        alpha: number(obj, "lora_alpha", 8.0)?,
        dropout: number(obj, "lora_dropout", 0.0)?,
        target_modules: Vec::new(),
        use_rslora: match get(obj, "use_rslora") {
            None => false,
            Some(v) => v
                .as_bool()
                .ok_or_else(|| config_error("use_rslora", format!("{v} is not a bool")))?,
        },
        bias: match get(obj, "bias") {
            None => "none".to_string(),
            Some(v) => v
                .as_str()
                .ok_or_else(|| config_error("bias", format!("{v} is not a string")))?
                .to_string(),
        },
        base_model_name_or_path: get(obj, "base_model_name_or_path")
            .and_then(Value::as_str)
            .map(str::to_string),
    };
    Ok((config, listed))
}

/// A field's value, with null read as absent.
fn get<'a>(obj: &'a Map<String, Value>, field: &str) -> Option<&'a Value> {
    obj.get(field).filter(|v| !v.is_null())
}

fn number(obj: &Map<String, Value>, field: &'static str, default: f64) -> Result<f64> {
    match get(obj, field) {
        None => Ok(default),
        Some(v) => v
            .as_f64()
            .ok_or_else(|| config_error(field, format!("{v} is not a number"))),
    }
}

/// (layer, module, 0 for A / 1 for B) of a PEFT LoRA key.
fn parse_key(key: &str) -> Result<(usize, TargetModule, usize)> {
    let bad = |reason: &str| Error::BadTensor {
        key: key.to_string(),
        reason: reason.to_string(),
    };
    if key.contains("lora_magnitude_vector") {
        return Err(config_error(
            "use_dora",
            "the weights hold DoRA magnitudes; DoRA is not supported",
        ));
    }
    let rest = key
        .strip_prefix(KEY_PREFIX)
        .ok_or_else(|| bad("not a LoRA weight of a Llama decoder layer"))?;
    let (layer, rest) = rest.split_once('.').ok_or_else(|| bad("no layer index"))?;
    let layer: usize = layer.parse().map_err(|_| bad("bad layer index"))?;
    for module in TargetModule::ALL {
        for (matrix, name) in ["A", "B"].into_iter().enumerate() {
            let want = format!("{}.{}.lora_{name}.weight", module.block(), module.name());
            if rest == want {
                return Ok((layer, module, matrix));
            }
        }
    }
    Err(bad(
        "not lora_A/lora_B of q, k, v, o, gate, up or down_proj",
    ))
}

/// The little-endian bytes of an f32 or bf16 tensor, row-major.
fn tensor_bytes(t: &Tensor) -> Result<Vec<u8>> {
    let flat = t.flatten_all()?;
    Ok(match t.dtype() {
        DType::BF16 => flat
            .to_vec1::<bf16>()?
            .into_iter()
            .flat_map(|v| v.to_bits().to_le_bytes())
            .collect(),
        _ => flat
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?
            .into_iter()
            .flat_map(f32::to_le_bytes)
            .collect(),
    })
}

/// Writes `dir/name` through `dir/name.tmp`, synced before the rename, so a crash leaves either
/// the old file or the new one.
pub(crate) fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> Result<()> {
    let path = dir.join(name);
    let tmp = dir.join(format!("{name}.tmp"));
    let mut file = fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
    file.write_all(bytes).map_err(|e| Error::io(&tmp, e))?;
    file.sync_all().map_err(|e| Error::io(&tmp, e))?;
    fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e))
}
