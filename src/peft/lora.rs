//! LoRA as Hugging Face PEFT defines it: for an adapted Llama linear `W` `[out, in]`, A `[r, in]`
//! and B `[out, r]` with `y = x·Wᵀ + scaling · (dropout(x)·Aᵀ)·Bᵀ`, PEFT's initialisation, and the
//! PEFT adapter directory (`adapter_config.json` + `adapter_model.safetensors`) written and read.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::fs;
use std::io::Write;
use std::path::Path;
use std::str::FromStr;

use candle_core::{DType, Device, Tensor};
use half::bf16;
use rand::distr::{Distribution, Uniform};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Map, Value};

use crate::model::config::{linear_shape, LlamaConfig};
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

fn invalid(reason: impl Into<String>) -> Error {
    Error::invalid("LoraAdapter", reason)
}

/// The seven linears of a Llama decoder layer that LoRA can adapt.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum TargetModule {
    QProj,
    KProj,
    VProj,
    OProj,
    GateProj,
    UpProj,
    DownProj,
}

impl TargetModule {
    pub const ALL: [TargetModule; 7] = [
        TargetModule::QProj,
        TargetModule::KProj,
        TargetModule::VProj,
        TargetModule::OProj,
        TargetModule::GateProj,
        TargetModule::UpProj,
        TargetModule::DownProj,
    ];

    /// The module name PEFT's `target_modules` uses.
    pub fn name(self) -> &'static str {
        match self {
            TargetModule::QProj => "q_proj",
            TargetModule::KProj => "k_proj",
            TargetModule::VProj => "v_proj",
            TargetModule::OProj => "o_proj",
            TargetModule::GateProj => "gate_proj",
            TargetModule::UpProj => "up_proj",
            TargetModule::DownProj => "down_proj",
        }
    }

    /// `[out, in]` of this linear in a model with `config`.
    pub fn shape(self, config: &LlamaConfig) -> [usize; 2] {
        linear_shape(config, self.name())
    }

    /// The parent module in HF's module path (`model.layers.{i}.{block}.{name}`).
    pub fn block(self) -> &'static str {
        match self {
            TargetModule::QProj
            | TargetModule::KProj
            | TargetModule::VProj
            | TargetModule::OProj => "self_attn",
            _ => "mlp",
        }
    }

    /// PEFT's state-dict key of `matrix` ("A" or "B") of this module in `layer`.
    fn key(self, layer: usize, matrix: &str) -> String {
        format!(
            "{KEY_PREFIX}{layer}.{}.{}.lora_{matrix}.weight",
            self.block(),
            self.name()
        )
    }
}

impl fmt::Display for TargetModule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for TargetModule {
    type Err = Error;

    fn from_str(name: &str) -> Result<Self> {
        TargetModule::ALL
            .into_iter()
            .find(|m| m.name() == name)
            .ok_or_else(|| {
                config_error(
                    "target_modules",
                    format!(
                        "unknown target module `{name}`; LoRA adapts q_proj, k_proj, v_proj, \
                         o_proj, gate_proj, up_proj and down_proj"
                    ),
                )
            })
    }
}

/// LoRA settings, as PEFT's `LoraConfig` fields of the same meaning.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraConfig {
    /// The rank (`r`), > 0.
    pub r: usize,
    /// `lora_alpha`, the numerator of the scaling.
    pub alpha: f64,
    /// `lora_dropout`: the probability of zeroing an adapter input element in training, in [0, 1).
    pub dropout: f64,
    /// The adapted linears of every layer, no repeats.
    pub target_modules: Vec<TargetModule>,
    /// rsLoRA: scaling `alpha / sqrt(r)` instead of `alpha / r`.
    pub use_rslora: bool,
    /// PEFT's `bias`; only "none" (no bias trained) is supported.
    pub bias: String,
    /// Written as `base_model_name_or_path`.
    pub base_model_name_or_path: Option<String>,
}

impl Default for LoraConfig {
    /// r = 16, alpha = 32, no dropout, all seven linears.
    fn default() -> Self {
        Self {
            r: 16,
            alpha: 32.0,
            dropout: 0.0,
            target_modules: TargetModule::ALL.to_vec(),
            use_rslora: false,
            bias: "none".to_string(),
            base_model_name_or_path: None,
        }
    }
}

impl LoraConfig {
    /// Checks every field is in range and supported.
    pub fn validate(&self) -> Result<()> {
        if self.r == 0 {
            return Err(config_error("r", "the rank must be positive"));
        }
        if !self.alpha.is_finite() {
            return Err(config_error(
                "lora_alpha",
                format!("{} is not finite", self.alpha),
            ));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(config_error(
                "lora_dropout",
                format!("{} is not in [0, 1)", self.dropout),
            ));
        }
        if self.target_modules.is_empty() {
            return Err(config_error("target_modules", "no module is targeted"));
        }
        let unique: BTreeSet<_> = self.target_modules.iter().collect();
        if unique.len() != self.target_modules.len() {
            return Err(config_error(
                "target_modules",
                format!("{:?} names a module twice", self.target_modules),
            ));
        }
        if self.bias != "none" {
            return Err(config_error(
                "bias",
                format!("`{}` is not supported, only \"none\"", self.bias),
            ));
        }
        Ok(())
    }

    /// The factor on `B·A`: `alpha / r`, or `alpha / sqrt(r)` with rsLoRA (in f64, as PEFT
    /// computes it in Python; torch applies it to f32 tensors as f32).
    pub fn scaling(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.r as f64).sqrt()
        } else {
            self.alpha / self.r as f64
        }
    }

    fn targets(&self) -> impl Iterator<Item = TargetModule> + '_ {
        TargetModule::ALL
            .into_iter()
            .filter(|m| self.target_modules.contains(m))
    }
}

/// How an adapter runs: `Eval` (dropout is the identity) or `Train`, where dropout masks come from
/// `seed`, one stream per (layer, module). A trainer passes a fresh seed per step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoraMode {
    Eval,
    Train { seed: u64 },
}

/// One adapted linear's A `[r, in]` and B `[out, r]`.
#[derive(Clone, Debug)]
pub struct LoraPair {
    pub a: Tensor,
    pub b: Tensor,
}

/// `kaiming_uniform_(a = √5)`'s bound, by torch's formula: gain `sqrt(2 / (1 + a²))`, bound
/// `gain · sqrt(3 / fan_in)`, which is `1 / sqrt(fan_in)` up to rounding.
pub fn kaiming_uniform_bound(fan_in: usize) -> f64 {
    let a = 5f64.sqrt();
    let gain = (2.0 / (1.0 + a * a)).sqrt();
    gain * (3.0 / fan_in as f64).sqrt()
}

/// A LoRA adapter on a Llama model: a pair per (layer, targeted module), all of one dtype (f32 or
/// bf16), for layers `0..num_layers`.
#[derive(Clone, Debug)]
pub struct LoraAdapter {
    config: LoraConfig,
    num_layers: usize,
    dtype: DType,
    pairs: BTreeMap<(usize, TargetModule), LoraPair>,
}

impl LoraAdapter {
    /// A fresh adapter as PEFT initialises one: A uniform in ±`kaiming_uniform_bound(in)`, B zero
    /// (so the adapted model starts equal to the base). A is drawn from `StdRng` seeded with `seed`,
    /// layer by layer and module by module; the distribution is torch's, the stream is not.
    pub fn init(
        config: LoraConfig,
        model: &LlamaConfig,
        dtype: DType,
        device: &Device,
        seed: u64,
    ) -> Result<Self> {
        config.validate()?;
        check_dtype(dtype)?;
        let mut rng = StdRng::seed_from_u64(seed);
        let mut pairs = BTreeMap::new();
        for layer in 0..model.num_hidden_layers {
            for module in config.targets() {
                let [out_features, in_features] = module.shape(model);
                let bound = kaiming_uniform_bound(in_features) as f32;
                let uniform = Uniform::new(-bound, bound)
                    .map_err(|e| invalid(format!("kaiming bound {bound}: {e}")))?;
                let a: Vec<f32> = (0..config.r * in_features)
                    .map(|_| uniform.sample(&mut rng))
                    .collect();
                let a = Tensor::from_vec(a, (config.r, in_features), device)?.to_dtype(dtype)?;
                let b = Tensor::zeros((out_features, config.r), dtype, device)?;
                pairs.insert((layer, module), LoraPair { a, b });
            }
        }
        Ok(Self {
            config,
            num_layers: model.num_hidden_layers,
            dtype,
            pairs,
        })
    }

    pub fn config(&self) -> &LoraConfig {
        &self.config
    }

    /// The dtype of every A and B.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn num_layers(&self) -> usize {
        self.num_layers
    }

    /// The pair of `module` in `layer`, if targeted.
    pub fn pair(&self, layer: usize, module: TargetModule) -> Option<&LoraPair> {
        self.pairs.get(&(layer, module))
    }

    /// Every pair, by layer then module.
    pub fn pairs(&self) -> impl Iterator<Item = ((usize, TargetModule), &LoraPair)> {
        self.pairs.iter().map(|(&k, v)| (k, v))
    }

    /// The device of the A and B tensors (that of any pair; all are made on one device).
    pub fn device(&self) -> Option<&Device> {
        self.pairs.values().next().map(|p| p.a.device())
    }

    /// This adapter with every A and B on `device` (same values and dtype), e.g. the model's CUDA
    /// device for training there.
    pub fn to_device(&self, device: &Device) -> Result<Self> {
        let pairs = self
            .pairs
            .iter()
            .map(|(&k, p)| {
                Ok((
                    k,
                    LoraPair {
                        a: p.a.to_device(device)?,
                        b: p.b.to_device(device)?,
                    },
                ))
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            config: self.config.clone(),
            num_layers: self.num_layers,
            dtype: self.dtype,
            pairs,
        })
    }

    /// Replaces the pair of `module` in `layer` with one of the same shapes and dtype.
    pub fn set_pair(&mut self, layer: usize, module: TargetModule, pair: LoraPair) -> Result<()> {
        let old = self
            .pairs
            .get_mut(&(layer, module))
            .ok_or_else(|| invalid(format!("layer {layer} {module} is not adapted")))?;
        for (name, new, cur) in [("A", &pair.a, &old.a), ("B", &pair.b, &old.b)] {
            if new.dims() != cur.dims() || new.dtype() != cur.dtype() {
                return Err(invalid(format!(
                    "layer {layer} {module} {name} is {:?} {:?}, expected {:?} {:?}",
                    new.dims(),
                    new.dtype(),
                    cur.dims(),
                    cur.dtype()
                )));
            }
        }
        *old = pair;
        Ok(())
    }

    /// Checks the adapter fits a model with `model`: same layer count, every pair's shapes.
    pub fn check_fits(&self, model: &LlamaConfig) -> Result<()> {
        if self.num_layers != model.num_hidden_layers {
            return Err(invalid(format!(
                "adapter has {} layers, the model {}",
                self.num_layers, model.num_hidden_layers
            )));
        }
        for (&(layer, module), pair) in &self.pairs {
            let [out_features, in_features] = module.shape(model);
            let r = self.config.r;
            if pair.a.dims() != [r, in_features] || pair.b.dims() != [out_features, r] {
                return Err(invalid(format!(
                    "layer {layer} {module}: A {:?} and B {:?} do not fit [{out_features}, \
                     {in_features}] at r = {r}",
                    pair.a.dims(),
                    pair.b.dims()
                )));
            }
        }
        Ok(())
    }

    /// `base + scaling · (dropout(x)·Aᵀ)·Bᵀ` for `module` of `layer`, or `base` unchanged when not
    /// targeted. `x` `[.., in]` and `base` `[.., out]` are f32 holding the model's compute-dtype
    /// values; as PEFT, x is cast to the adapter dtype and each product and the scaling are
    /// rounded to it, and the sum is left in f32 for the caller to round to its compute dtype.
    pub fn apply(
        &self,
        layer: usize,
        module: TargetModule,
        x: &Tensor,
        base: &Tensor,
        mode: &LoraMode,
    ) -> Result<Tensor> {
        let Some(pair) = self.pairs.get(&(layer, module)) else {
            return Ok(base.clone());
        };
        let in_features = pair.a.dim(1)?;
        if x.dims().last() != Some(&in_features) {
            return Err(invalid(format!(
                "layer {layer} {module}: input {:?} for in_features {in_features}",
                x.dims()
            )));
        }
        let rows = x.elem_count() / in_features;
        let x = self.round(x.reshape((rows, in_features))?)?;
        let x = match *mode {
            LoraMode::Train { seed } if self.config.dropout > 0.0 => {
                self.dropout(&x, seed, layer, module)?
            }
            _ => x,
        };
        let a = pair.a.to_dtype(DType::F32)?;
        let b = pair.b.to_dtype(DType::F32)?;
        let ax = self.round(x.matmul(&a.t()?)?)?;
        let bax = self.round(ax.matmul(&b.t()?)?)?;
        let delta = self.round((bax * self.config.scaling())?)?;
        Ok((base.to_dtype(DType::F32)? + delta.reshape(base.dims())?)?)
    }

    /// f32 values rounded to the adapter dtype (kept in f32).
    fn round(&self, x: Tensor) -> Result<Tensor> {
        let x = x.to_dtype(DType::F32)?;
        if self.dtype == DType::F32 {
            return Ok(x);
        }
        Ok(x.to_dtype(self.dtype)?.to_dtype(DType::F32)?)
    }

    /// Inverted dropout as torch's: each element kept with probability `1 - p` and scaled by
    /// `1 / (1 - p)`. The stream for (seed, layer, module) is distinct per layer and module.
    fn dropout(&self, x: &Tensor, seed: u64, layer: usize, module: TargetModule) -> Result<Tensor> {
        let mask = self.dropout_scale(seed, layer, module, x.dims(), x.device())?;
        self.round(x.mul(&mask)?)
    }

    /// The dropout factors [`Self::apply`] multiplies an input of `dims` by in `mode` for
    /// `module` of `layer` (0 or `1 / (1 - p)`, rounded to the adapter dtype): the same draw
    /// for the same (seed, layer, module, dims), so a backward can pull its gradient back
    /// through the same mask. None when the mode or the config drops nothing.
    pub fn dropout_mask(
        &self,
        layer: usize,
        module: TargetModule,
        dims: &[usize],
        mode: &LoraMode,
    ) -> Result<Option<Tensor>> {
        match *mode {
            LoraMode::Train { seed } if self.config.dropout > 0.0 => {
                let device = self.device().unwrap_or(&candle_core::Device::Cpu).clone();
                Ok(Some(
                    self.dropout_scale(seed, layer, module, dims, &device)?,
                ))
            }
            _ => Ok(None),
        }
    }

    fn dropout_scale(
        &self,
        seed: u64,
        layer: usize,
        module: TargetModule,
        dims: &[usize],
        device: &candle_core::Device,
    ) -> Result<Tensor> {
        let p = self.config.dropout;
        let site = ((layer as u64) << 3) | module as u64;
        let mut rng = StdRng::seed_from_u64(seed ^ site.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let keep_scale = 1.0 / (1.0 - p as f32);
        let n: usize = dims.iter().product();
        let mask: Vec<f32> = (0..n)
            .map(|_| {
                if rng.random::<f64>() < p {
                    0.0
                } else {
                    keep_scale
                }
            })
            .collect();
        self.round(Tensor::from_vec(mask, dims, device)?)
    }

    /// Writes the PEFT adapter directory `dir` (created if missing): `adapter_config.json` with
    /// the fields PEFT 0.21 writes, and `adapter_model.safetensors` with PEFT's keys, shapes and
    /// dtype. Each file goes to a temporary name, is synced, then renamed into place.
    pub fn save_pretrained(&self, dir: impl AsRef<Path>) -> Result<()> {
        let dir = dir.as_ref();
        fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let config = serde_json::to_string_pretty(&self.peft_config_json())?;
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
                let view = safetensors::tensor::TensorView::new(st_dtype, shape.clone(), bytes)?;
                Ok((key.as_str(), view))
            })
            .collect::<Result<Vec<_>>>()?;
        let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
        let bytes = safetensors::serialize(views, Some(metadata))?;
        write_atomic(dir, ADAPTER_WEIGHTS_FILE, &bytes)
    }

    /// Reads a PEFT LoRA adapter directory onto `device`. Fields this crate does not use are
    /// ignored; options it cannot reproduce (DoRA, fan_in_fan_out, per-layer ranks, ...) are
    /// [`Error::AdapterConfig`]. A `target_modules` regex string (or null) is resolved to the
    /// modules present in the weights, and saved back as a list.
    pub fn load_pretrained(dir: impl AsRef<Path>, device: &Device) -> Result<Self> {
        let dir = dir.as_ref();
        let config_path = dir.join(ADAPTER_CONFIG_FILE);
        let text = fs::read_to_string(&config_path).map_err(|e| Error::io(&config_path, e))?;
        let (mut config, listed) = parse_peft_config(&serde_json::from_str(&text)?)?;
        let weights_path = dir.join(ADAPTER_WEIGHTS_FILE);
        let bytes = fs::read(&weights_path).map_err(|e| Error::io(&weights_path, e))?;
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

fn check_dtype(dtype: DType) -> Result<()> {
    if matches!(dtype, DType::F32 | DType::BF16) {
        Ok(())
    } else {
        Err(invalid(format!(
            "adapter dtype {dtype:?} is not f32 or bf16"
        )))
    }
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
