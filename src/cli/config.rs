//! `qlora train`'s settings: one struct read from a TOML file (`--config run.toml`, unknown keys
//! are an error naming the key), overridden by command-line flags, validated, printed at start and
//! saved beside the outputs as `train_config.toml`. Every field has a default.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::kernels::adamw::AdamWConfig;
use crate::peft::{LoraConfig, TargetModule};
use crate::train::data::{DataConfig, Overflow};
use crate::train::schedule::{LrSchedule, ScheduleKind};
use crate::train::trainer::{NonFinitePolicy, TrainerConfig};
use crate::{Error, Result};

/// The name the effective settings are saved under in the output folder.
pub const SAVED_CONFIG_FILE: &str = "train_config.toml";

fn invalid(reason: impl Into<String>) -> Error {
    Error::invalid("train config", reason)
}

/// Which line shape a dataset holds (`auto` recognises each line by its fields).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum DataFormat {
    Auto,
    Instruction,
    Chat,
    Mcqa,
    Text,
}

/// The learning-rate curve after the linear warmup.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum ScheduleName {
    Cosine,
    Linear,
    Constant,
}

/// The dtype activations and dense weights are computed in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum ComputeDtype {
    Bf16,
    F32,
}

/// How the seven linears of each layer are stored while training.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Quantize {
    /// NF4, blocksize 64, double quant (QLoRA); bitsandbytes pre-quantized weights stay as stored.
    Nf4,
    /// Dense in the compute dtype (plain LoRA).
    None,
}

/// Which AdamW states a CUDA run pages to host memory (`kernels::paged`); the CPU ignores it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum PagedOptimizer {
    /// Every state on the device.
    Off,
    /// Page the largest states (of at least 1e5 elements) until the rest fits 1/16 of the
    /// device's memory.
    Auto,
    /// Page every state of at least 1e5 elements (bitsandbytes' paged AdamW).
    All,
}

/// What a training step does on a NaN/Inf loss or gradient.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum OnNonFinite {
    Error,
    Skip,
}

/// Where the run computes: `cpu`, or `cuda` / `cuda:N` (CUDA device N, 0 by default; needs a
/// build with `--features cuda`). Written as that string on the command line and in TOML.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum DeviceName {
    Cpu,
    Cuda(usize),
}

impl std::str::FromStr for DeviceName {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "cpu" => Ok(DeviceName::Cpu),
            "cuda" => Ok(DeviceName::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(DeviceName::Cuda)
                .ok_or_else(|| format!("unknown device {s:?}: expected cpu, cuda or cuda:N")),
        }
    }
}

impl TryFrom<String> for DeviceName {
    type Error = String;

    fn try_from(s: String) -> std::result::Result<Self, String> {
        s.parse()
    }
}

impl From<DeviceName> for String {
    fn from(d: DeviceName) -> String {
        d.to_string()
    }
}

impl std::fmt::Display for DeviceName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceName::Cpu => write!(f, "cpu"),
            DeviceName::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// Every setting of a training run. Field names are the TOML keys.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// Hugging Face Llama folder (config.json, safetensors, tokenizer files) or llama.cpp GGUF file.
    pub model: Option<PathBuf>,
    /// Training JSONL file.
    pub data: Option<PathBuf>,
    pub format: DataFormat,
    /// Held-out JSONL file; takes precedence over `eval_split`.
    pub eval_data: Option<PathBuf>,
    /// Fraction of the training examples held out for evaluation when `eval_data` is unset.
    pub eval_split: f64,
    /// Evaluate every this many steps (0: only at the end); needs eval data.
    pub eval_steps: u64,
    pub output: PathBuf,

    /// Optimizer updates; when unset, `epochs` passes over the data decide.
    pub steps: Option<u64>,
    pub epochs: f64,
    pub batch_size: usize,
    pub grad_accum: usize,
    pub seq_len: usize,
    /// Over-long examples: truncated (prompt from the left first) or skipped.
    pub overflow: OverflowName,
    /// Concatenate examples into rows of `seq_len` tokens.
    pub pack: bool,
    pub seed: u64,

    pub lr: f64,
    pub schedule: ScheduleName,
    /// Warmup as a fraction of the steps, unless `warmup_steps` is set.
    pub warmup_ratio: f64,
    pub warmup_steps: Option<u64>,
    pub weight_decay: f64,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_eps: f64,
    /// Clip the global gradient norm to this; 0 turns clipping off.
    pub max_grad_norm: f64,
    pub on_non_finite: OnNonFinite,

    pub r: usize,
    pub alpha: f64,
    /// Adapted linears: names among q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj,
    /// down_proj, or "all".
    pub targets: Vec<String>,
    pub use_rslora: bool,
    /// LoRA dropout on each adapted linear's input while training, in [0, 1).
    pub lora_dropout: f64,

    pub compute_dtype: ComputeDtype,
    pub quantize: Quantize,
    pub device: DeviceName,
    /// Paged AdamW states on CUDA.
    pub paged_optimizer: PagedOptimizer,

    /// Save a checkpoint every this many steps (0: never).
    pub save_steps: u64,
    /// Checkpoints kept on disk.
    pub keep_last: usize,
    /// Print a line every this many steps (besides the progress bar).
    pub log_steps: u64,
}

/// [`Overflow`] as a TOML / flag value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum OverflowName {
    Truncate,
    Skip,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            model: None,
            data: None,
            format: DataFormat::Auto,
            eval_data: None,
            eval_split: 0.0,
            eval_steps: 0,
            output: PathBuf::from("qlora-out"),
            steps: None,
            epochs: 1.0,
            batch_size: 4,
            grad_accum: 1,
            seq_len: 512,
            overflow: OverflowName::Truncate,
            pack: false,
            seed: 42,
            lr: 2e-4,
            schedule: ScheduleName::Cosine,
            warmup_ratio: 0.03,
            warmup_steps: None,
            weight_decay: 0.0,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_eps: 1e-8,
            max_grad_norm: 1.0,
            on_non_finite: OnNonFinite::Error,
            r: 16,
            alpha: 32.0,
            targets: vec!["all".to_string()],
            use_rslora: false,
            lora_dropout: 0.0,
            compute_dtype: ComputeDtype::Bf16,
            quantize: Quantize::Nf4,
            device: DeviceName::Cpu,
            paged_optimizer: PagedOptimizer::Auto,
            save_steps: 100,
            keep_last: 2,
            log_steps: 10,
        }
    }
}

impl TrainConfig {
    /// Reads a TOML file; a key this struct does not have is an error naming it.
    pub fn from_toml_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_toml_str(&text).map_err(|e| match e {
            Error::InvalidArgument { reason, .. } => {
                invalid(format!("{}: {reason}", path.display()))
            }
            other => other,
        })
    }

    pub fn from_toml_str(text: &str) -> Result<Self> {
        toml::from_str(text).map_err(|e| invalid(e.to_string().trim_end().to_string()))
    }

    /// The settings as TOML, the form they are printed and saved in.
    pub fn to_toml(&self) -> Result<String> {
        toml::to_string(self).map_err(|e| invalid(format!("cannot write the settings: {e}")))
    }

    /// Checks every value is in range and names the first that is not.
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("batch_size", self.batch_size),
            ("grad_accum", self.grad_accum),
            ("seq_len", self.seq_len),
            ("keep_last", self.keep_last),
        ];
        for (key, value) in positive {
            if value == 0 {
                return Err(invalid(format!("`{key}` must be at least 1")));
            }
        }
        if self.steps == Some(0) {
            return Err(invalid("`steps` must be at least 1"));
        }
        if self.steps.is_none() && !(self.epochs.is_finite() && self.epochs > 0.0) {
            return Err(invalid(format!(
                "`epochs` must be a number > 0, got {}",
                self.epochs
            )));
        }
        if !(0.0..1.0).contains(&self.eval_split) {
            return Err(invalid(format!(
                "`eval_split` must be in [0, 1), got {}",
                self.eval_split
            )));
        }
        if !(0.0..=1.0).contains(&self.warmup_ratio) {
            return Err(invalid(format!(
                "`warmup_ratio` must be in [0, 1], got {}",
                self.warmup_ratio
            )));
        }
        if !(self.max_grad_norm.is_finite() && self.max_grad_norm >= 0.0) {
            return Err(invalid(format!(
                "`max_grad_norm` must be ≥ 0 (0 turns clipping off), got {}",
                self.max_grad_norm
            )));
        }
        if self.log_steps == 0 {
            return Err(invalid("`log_steps` must be at least 1"));
        }
        // AdamW divides by sqrt(v̂) + eps, and v̂ is 0 wherever a gradient has been 0 so far.
        if !(self.adam_eps.is_finite() && self.adam_eps > 0.0) {
            return Err(invalid(format!(
                "`adam_eps` must be a number > 0, got {}",
                self.adam_eps
            )));
        }
        self.adamw().validate()?;
        self.lora()?.validate()?;
        Ok(())
    }

    /// The adapted modules `targets` names, in the canonical order.
    pub fn target_modules(&self) -> Result<Vec<TargetModule>> {
        if self.targets.iter().any(|t| t == "all") {
            if self.targets.len() > 1 {
                return Err(invalid("`targets` = \"all\" cannot be combined with names"));
            }
            return Ok(TargetModule::ALL.to_vec());
        }
        let mut modules = Vec::with_capacity(self.targets.len());
        for name in &self.targets {
            let module: TargetModule = name.parse()?;
            if modules.contains(&module) {
                return Err(invalid(format!("`targets` names {name} twice")));
            }
            modules.push(module);
        }
        if modules.is_empty() {
            return Err(invalid("`targets` is empty"));
        }
        Ok(TargetModule::ALL
            .into_iter()
            .filter(|m| modules.contains(m))
            .collect())
    }

    pub fn lora(&self) -> Result<LoraConfig> {
        Ok(LoraConfig {
            r: self.r,
            alpha: self.alpha,
            dropout: self.lora_dropout,
            target_modules: self.target_modules()?,
            use_rslora: self.use_rslora,
            bias: "none".to_string(),
            base_model_name_or_path: self.model.as_ref().map(|p| p.display().to_string()),
        })
    }

    pub fn adamw(&self) -> AdamWConfig {
        AdamWConfig {
            lr: self.lr,
            betas: (self.adam_beta1, self.adam_beta2),
            eps: self.adam_eps,
            weight_decay: self.weight_decay,
        }
    }

    pub fn data(&self) -> DataConfig {
        DataConfig {
            max_seq_len: self.seq_len,
            overflow: match self.overflow {
                OverflowName::Truncate => Overflow::Truncate,
                OverflowName::Skip => Overflow::Skip,
            },
        }
    }

    /// The number of optimizer updates for `examples` training rows: `steps`, or enough
    /// updates of `batch_size · grad_accum` rows to pass `epochs` times over the data.
    pub fn total_steps(&self, examples: usize) -> u64 {
        match self.steps {
            Some(steps) => steps,
            None => {
                let per_step = (self.batch_size * self.grad_accum) as f64;
                ((self.epochs * examples as f64) / per_step).ceil().max(1.0) as u64
            }
        }
    }

    pub fn trainer(&self, total_steps: u64) -> TrainerConfig {
        let warmup_steps = self
            .warmup_steps
            .unwrap_or_else(|| (self.warmup_ratio * total_steps as f64).ceil() as u64);
        TrainerConfig {
            schedule: LrSchedule {
                kind: match self.schedule {
                    ScheduleName::Cosine => ScheduleKind::Cosine { num_cycles: 0.5 },
                    ScheduleName::Linear => ScheduleKind::Linear,
                    ScheduleName::Constant => ScheduleKind::Constant,
                },
                warmup_steps,
                total_steps,
            },
            max_grad_norm: (self.max_grad_norm > 0.0).then_some(self.max_grad_norm),
            non_finite: match self.on_non_finite {
                OnNonFinite::Error => NonFinitePolicy::Error,
                OnNonFinite::Skip => NonFinitePolicy::SkipBatch,
            },
        }
    }
}
