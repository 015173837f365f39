//! The LoRA adapter as the model's forward and backward consume it: for an adapted Llama linear
//! `W` `[out, in]` (one of the seven [`TargetModule`]s of a decoder layer), A `[r, in]` and B
//! `[out, r]` with `y = x·Wᵀ + scaling · (dropout(x)·Aᵀ)·Bᵀ`, PEFT's initialisation and dropout.
//! Reading and writing the PEFT adapter directory is `peft::lora`'s, a layer above.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::str::FromStr;

use candle_core::{DType, Device, Tensor};
use rand::distr::{Distribution, Uniform};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::model::config::{linear_shape, LlamaConfig};
use crate::{Error, Result};

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

    pub(crate) fn targets(&self) -> impl Iterator<Item = TargetModule> + '_ {
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
    pub(crate) config: LoraConfig,
    pub(crate) num_layers: usize,
    pub(crate) dtype: DType,
    pub(crate) pairs: BTreeMap<(usize, TargetModule), LoraPair>,
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
}

/// `Ok` for the adapter dtypes, f32 and bf16.
pub(crate) fn check_dtype(dtype: DType) -> Result<()> {
    if matches!(dtype, DType::F32 | DType::BF16) {
        Ok(())
    } else {
        Err(invalid(format!(
            "adapter dtype {dtype:?} is not f32 or bf16"
        )))
    }
}
