//! One QLoRA training step on the CPU (forward, explicit backward, clipping, AdamW through
//! `Trainer::train_step`) on a random Llama (the ~100M-parameter bench model, or a tiny one):
//! tokens/s, s/step and peak RSS, each base (NF4 or dense linears) in a fresh child process so
//! peaks do not mix, and beside it the same step in PyTorch + PEFT (benches/train_step_peft.py)
//! when a python with torch, transformers, peft and bitsandbytes is given.
//!
//! Peak RSS is VmHWM, reset after the warm-up (so "steps" is the training peak, "setup" the peak
//! while building the model) and "RSS at start" the process before it builds the model (for
//! Python, after importing torch). The parent re-runs its own executable with [`CHILD_ENV`] set to
//! the child's settings; the executable hands control to [`child_from_env`] first thing.

use std::env;
use std::path::PathBuf;
use std::process::{Command, ExitCode};
use std::time::Instant;

use candle_core::{DType, Device};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::kernels::adamw::AdamWConfig;
use crate::model::llama::LlamaModel;
use crate::model::{LlamaConfig, LlamaWeights, RopeScaling};
use crate::peft::{LoraAdapter, LoraConfig};
use crate::train::data::Batch;
use crate::train::schedule::LrSchedule;
use crate::train::train_loop::{run_steps, RepeatBatch};
use crate::train::trainer::{CpuAdamW, NonFinitePolicy, Trainer, TrainerConfig};
use crate::{Error, Result};

/// Set in a child's environment to its settings (JSON of [`ChildSpec`]).
pub const CHILD_ENV: &str = "QLORA_BENCH_TRAIN_STEP_CHILD";

/// The model's size.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Preset {
    /// 12 layers of hidden 768 with GQA (12 query, 4 kv heads), intermediate 2048, tied
    /// embeddings over a 32000-token vocabulary: 100.1M parameters.
    #[value(name = "100m")]
    #[serde(rename = "100m")]
    Llama100m,
    /// 2 layers of hidden 64 (4 query, 2 kv heads), intermediate 128, vocabulary 256: a smoke
    /// test that runs in a second.
    Tiny,
}

/// The shapes of a [`Preset`].
#[derive(Clone, Copy, Debug)]
pub struct ModelDims {
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub intermediate: usize,
    pub vocab: usize,
}

impl Preset {
    pub fn dims(self) -> ModelDims {
        match self {
            Preset::Llama100m => ModelDims {
                hidden: 768,
                layers: 12,
                heads: 12,
                kv_heads: 4,
                intermediate: 2048,
                vocab: 32000,
            },
            Preset::Tiny => ModelDims {
                hidden: 64,
                layers: 2,
                heads: 4,
                kv_heads: 2,
                intermediate: 128,
                vocab: 256,
            },
        }
    }
}

/// The base linears' format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Base {
    /// NF4, blocks of 64, double quant (QLoRA).
    Nf4,
    /// f32 (LoRA on a dense base).
    Dense,
}

impl Base {
    pub fn name(self) -> &'static str {
        match self {
            Base::Nf4 => "nf4",
            Base::Dense => "dense",
        }
    }
}

/// Tied embeddings, batch 1, LoRA on all seven linears (`LoraConfig::default()` is r 16, alpha 32,
/// all seven, no dropout), constant learning rate.
const TIED: bool = true;
const BATCH: usize = 1;
const RANK: usize = 16;
const ALPHA: f64 = 32.0;
const LR: f64 = 1e-4;
const WEIGHT_DECAY: f64 = 0.01;
const MAX_GRAD_NORM: f64 = 1.0;
const SEED: u64 = 0;

/// What to run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TrainStepOptions {
    pub preset: Preset,
    pub seq_len: usize,
    /// Timed steps (at least 1).
    pub steps: usize,
    /// Untimed steps before them.
    pub warmup: usize,
    /// One row each, in order.
    pub bases: Vec<Base>,
    /// A python with torch, transformers, peft and bitsandbytes, to run benches/train_step_peft.py
    /// beside each row.
    pub peft_python: Option<PathBuf>,
    /// Whether torch recomputes each layer in the backward as we do ("on") or keeps its
    /// activations ("off").
    pub peft_checkpointing: String,
}

impl Default for TrainStepOptions {
    fn default() -> Self {
        TrainStepOptions {
            preset: Preset::Llama100m,
            seq_len: 512,
            steps: 3,
            warmup: 1,
            bases: vec![Base::Nf4, Base::Dense],
            peft_python: None,
            peft_checkpointing: "on".to_string(),
        }
    }
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

impl TrainStepOptions {
    /// The defaults overridden by the bench target's knobs: QLORA_BENCH_STEPS, QLORA_BENCH_WARMUP,
    /// QLORA_BENCH_SEQ, QLORA_BENCH_BASES ("nf4,dense"), QLORA_BENCH_PRESET ("100m" or "tiny"),
    /// QLORA_PEFT_PYTHON and QLORA_PEFT_CHECKPOINTING.
    pub fn from_env() -> Result<Self> {
        let d = TrainStepOptions::default();
        let bases = match env::var("QLORA_BENCH_BASES") {
            Ok(list) => list
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| match s {
                    "nf4" => Ok(Base::Nf4),
                    "dense" => Ok(Base::Dense),
                    bad => Err(Error::invalid(
                        "QLORA_BENCH_BASES",
                        format!("holds {bad:?}; use nf4 and/or dense"),
                    )),
                })
                .collect::<Result<Vec<_>>>()?,
            Err(_) => d.bases,
        };
        let preset = match env::var("QLORA_BENCH_PRESET").as_deref() {
            Err(_) | Ok("100m") => d.preset,
            Ok("tiny") => Preset::Tiny,
            Ok(bad) => {
                return Err(Error::invalid(
                    "QLORA_BENCH_PRESET",
                    format!("{bad:?}: use 100m or tiny"),
                ))
            }
        };
        Ok(TrainStepOptions {
            preset,
            seq_len: env_or("QLORA_BENCH_SEQ", d.seq_len),
            steps: env_or("QLORA_BENCH_STEPS", d.steps),
            warmup: env_or("QLORA_BENCH_WARMUP", d.warmup),
            bases,
            peft_python: env::var_os("QLORA_PEFT_PYTHON").map(PathBuf::from),
            peft_checkpointing: env::var("QLORA_PEFT_CHECKPOINTING")
                .unwrap_or(d.peft_checkpointing),
        })
    }

    fn validate(&self) -> Result<()> {
        if self.steps == 0 || self.seq_len == 0 || self.bases.is_empty() {
            return Err(Error::invalid(
                "bench train-step",
                "steps and sequence length must be >= 1 and at least one base given",
            ));
        }
        if !matches!(self.peft_checkpointing.as_str(), "on" | "off") {
            return Err(Error::invalid(
                "bench train-step",
                format!("checkpointing {:?}: use on or off", self.peft_checkpointing),
            ));
        }
        Ok(())
    }
}

/// A child's settings.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ChildSpec {
    pub options: TrainStepOptions,
    pub base: Base,
}

fn config(d: &ModelDims) -> LlamaConfig {
    LlamaConfig {
        hidden_size: d.hidden,
        intermediate_size: d.intermediate,
        num_hidden_layers: d.layers,
        num_attention_heads: d.heads,
        num_key_value_heads: d.kv_heads,
        head_dim: d.hidden / d.heads,
        rms_norm_eps: 1e-6,
        rope_theta: 10_000.0,
        rope_scaling: RopeScaling::Default,
        tie_word_embeddings: TIED,
        vocab_size: d.vocab,
        max_position_embeddings: 2048,
        torch_dtype: None,
        bos_token_id: Some(1),
        eos_token_ids: vec![2],
        pad_token_id: None,
        quantization: None,
    }
}

/// If this process is a child (its environment holds [`CHILD_ENV`]), runs its configuration,
/// prints one JSON line for the parent and returns the exit status; `None` otherwise.
pub fn child_from_env() -> Option<ExitCode> {
    let spec = env::var(CHILD_ENV).ok()?;
    let result = serde_json::from_str::<ChildSpec>(&spec)
        .map_err(|e| Error::invalid(CHILD_ENV, e.to_string()))
        .and_then(|spec| child(&spec));
    Some(match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("train step child: {e}");
            ExitCode::FAILURE
        }
    })
}

/// One configuration in this process; prints one JSON line for the parent.
fn child(spec: &ChildSpec) -> Result<()> {
    let o = &spec.options;
    o.validate()?;
    let dims = o.preset.dims();
    let baseline = vm_bytes("VmRSS:");
    let mut config = config(&dims);
    config.max_position_embeddings = config.max_position_embeddings.max(o.seq_len);
    let device = Device::Cpu;
    let built = Instant::now();
    let mut weights = LlamaWeights::random(&config, 0.02, SEED, DType::F32, &device)?;
    let params = weights.embed_tokens.elem_count()
        + weights.lm_head.as_ref().map_or(0, |t| t.elem_count())
        + weights.norm.elem_count()
        + dims.layers
            * (2 * dims.hidden
                + crate::peft::TargetModule::ALL
                    .iter()
                    .map(|m| m.shape(&config).iter().product::<usize>())
                    .sum::<usize>());
    if spec.base == Base::Nf4 {
        weights = weights.quantize_linears(64, true)?;
    }
    let model = LlamaModel::new(config.clone(), weights)?;
    let lora = LoraConfig {
        r: RANK,
        alpha: ALPHA,
        ..LoraConfig::default()
    };
    let adapter = LoraAdapter::init(lora, &config, DType::F32, &device, SEED)?;
    let trainable: usize = adapter
        .pairs()
        .map(|(_, p)| p.a.elem_count() + p.b.elem_count())
        .sum();
    let optimizer = CpuAdamW::new(AdamWConfig {
        lr: LR,
        weight_decay: WEIGHT_DECAY,
        ..AdamWConfig::default()
    })?;
    let trainer_config = TrainerConfig {
        schedule: LrSchedule::CONSTANT,
        max_grad_norm: Some(MAX_GRAD_NORM),
        non_finite: NonFinitePolicy::Error,
    };
    let mut trainer = Trainer::new(&model, adapter, optimizer, trainer_config)?;
    let mut rng = StdRng::seed_from_u64(SEED + 1);
    let ids: Vec<u32> = (0..BATCH * o.seq_len)
        .map(|_| rng.random_range(0..dims.vocab as u32))
        .collect();
    let batch = Batch {
        batch_size: BATCH,
        seq_len: o.seq_len,
        labels: ids.iter().map(|&id| i64::from(id)).collect(),
        attention_mask: vec![1; ids.len()],
        input_ids: ids,
    };
    let setup_seconds = built.elapsed().as_secs_f64();
    let setup_peak = vm_bytes("VmHWM:");

    let mut losses = Vec::new();
    let mut source = RepeatBatch(batch);
    let warmup = o.warmup as u64;
    run_steps(&mut trainer, 1..=warmup, &mut source, |_, _, r| {
        losses.push(r.metrics.loss);
        Ok(())
    })?;
    let reset = reset_peak_rss();
    let mut times = Vec::new();
    let timed = warmup + 1..=warmup + o.steps as u64;
    run_steps(&mut trainer, timed, &mut source, |_, _, r| {
        losses.push(r.metrics.loss);
        times.push(r.step_s);
        Ok(())
    })?;
    let s_per_step = times.iter().sum::<f64>() / times.len() as f64;
    let report = json!({
        "impl": "qlora",
        "base": spec.base.name(),
        "threads": candle_core::utils::get_num_threads(),
        "params": params,
        "trainable_params": trainable,
        "tokens_per_step": BATCH * o.seq_len,
        "steps": o.steps,
        "step_seconds": times,
        "s_per_step": s_per_step,
        "tokens_per_s": (BATCH * o.seq_len) as f64 / s_per_step,
        "peak_rss_bytes": if reset { vm_bytes("VmHWM:") } else { None },
        "setup_peak_rss_bytes": setup_peak,
        "baseline_rss_bytes": baseline,
        "setup_seconds": setup_seconds,
        "losses": losses,
    });
    println!("{report}");
    Ok(())
}

/// The PyTorch + PEFT script's command line for `base`.
fn peft_command(python: &PathBuf, o: &TrainStepOptions, base: Base, threads: usize) -> Command {
    let d = o.preset.dims();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("benches/train_step_peft.py");
    let mut cmd = Command::new(python);
    cmd.arg(script);
    for (flag, value) in [
        ("--base", base.name().to_string()),
        ("--threads", threads.to_string()),
        ("--hidden", d.hidden.to_string()),
        ("--layers", d.layers.to_string()),
        ("--heads", d.heads.to_string()),
        ("--kv-heads", d.kv_heads.to_string()),
        ("--intermediate", d.intermediate.to_string()),
        ("--vocab", d.vocab.to_string()),
        ("--batch", BATCH.to_string()),
        ("--seq", o.seq_len.to_string()),
        ("--rank", RANK.to_string()),
        ("--alpha", ALPHA.to_string()),
        ("--lr", LR.to_string()),
        ("--weight-decay", WEIGHT_DECAY.to_string()),
        ("--max-grad-norm", MAX_GRAD_NORM.to_string()),
        ("--warmup", o.warmup.to_string()),
        ("--steps", o.steps.to_string()),
        ("--checkpointing", o.peft_checkpointing.clone()),
    ] {
        cmd.args([flag, &value]);
    }
    if TIED {
        cmd.arg("--tied");
    }
    cmd
}

/// Runs every base of `o` in a child (this executable with `child_args`, which must reach
/// [`child_from_env`]) and beside it PyTorch + PEFT when asked, and prints the tables. Fails when
/// a row failed (its error on stderr).
pub fn run(o: &TrainStepOptions, child_args: &[&str]) -> Result<()> {
    o.validate()?;
    let exe = env::current_exe().map_err(|e| Error::io(PathBuf::from("current executable"), e))?;
    let d = o.preset.dims();
    let threads = candle_core::utils::get_num_threads();
    println!(
        "train step: random Llama (hidden {}, {} layers, {} heads / {} kv, intermediate {}, vocab \
         {}, tied embeddings), f32 compute; LoRA r {RANK} alpha {ALPHA} on all 7 linears; batch \
         {BATCH} × {}; forward + backward + clip {MAX_GRAD_NORM} + AdamW; {} warm-up + {} timed \
         steps; {threads} threads; each row a fresh process",
        d.hidden,
        d.layers,
        d.heads,
        d.kv_heads,
        d.intermediate,
        d.vocab,
        o.seq_len,
        o.warmup,
        o.steps
    );
    println!("load average before: {}", load_average());

    let mut rows: Vec<Row> = Vec::new();
    for &base in &o.bases {
        let spec = ChildSpec {
            options: o.clone(),
            base,
        };
        let spec =
            serde_json::to_string(&spec).map_err(|e| Error::invalid(CHILD_ENV, e.to_string()))?;
        let mut cmd = Command::new(&exe);
        cmd.args(child_args).env(CHILD_ENV, spec);
        let ours = run_json(cmd, &format!("qlora {}", base.name()));
        let theirs = o.peft_python.as_ref().map(|py| {
            run_json(
                peft_command(py, o, base, threads),
                &format!("pytorch+peft {}", base.name()),
            )
        });
        rows.push((base.name().to_string(), ours, theirs));
    }
    println!("load average after: {}", load_average());
    let failed = print_tables(&rows);
    if o.peft_python.is_none() {
        println!(
            "\nno PyTorch comparison: give a python with torch, transformers, peft and \
             bitsandbytes (QLORA_PEFT_PYTHON for the bench target, --peft-python for `qlora bench \
             train-step`; e.g. ~/.cache/qlora/fixtures-venv/bin/python, see \
             scripts/requirements-fixtures.txt) to run benches/train_step_peft.py beside each row"
        );
    }
    if failed {
        Err(Error::invalid(
            "bench train-step",
            "a row failed (see above)",
        ))
    } else {
        Ok(())
    }
}

/// Prints the rows and, where both ran, the ratios; whether any row failed.
fn print_tables(rows: &[Row]) -> bool {
    println!();
    println!("| base | implementation | params | s/step | tokens/s | peak RSS, steps | peak RSS, setup | RSS at start |");
    println!("|---|---|---|---|---|---|---|---|");
    let mut failed = false;
    for (base, ours, theirs) in rows {
        for (name, result) in [
            ("qlora (Rust)", Some(ours)),
            ("PyTorch + PEFT", theirs.as_ref()),
        ] {
            match result {
                Some(Ok(v)) => {
                    let label = match v["impl"].as_str() {
                        Some("pytorch+peft") => format!(
                            "{name} ({}, {} attention, checkpointing {})",
                            v["lora_layer"].as_str().unwrap_or("?"),
                            v["attention"].as_str().unwrap_or("?"),
                            v["checkpointing"].as_str().unwrap_or("?")
                        ),
                        _ => name.to_string(),
                    };
                    println!(
                        "| {base} | {label} | {:.1}M | {} | {} | {} | {} | {} |",
                        v["params"].as_f64().unwrap_or(0.0) / 1e6,
                        f(&v["s_per_step"], 2),
                        f(&v["tokens_per_s"], 1),
                        mib(&v["peak_rss_bytes"]),
                        mib(&v["setup_peak_rss_bytes"]),
                        mib(&v["baseline_rss_bytes"]),
                    );
                }
                Some(Err(e)) => {
                    failed = true;
                    println!("| {base} | {name} | failed | | | | | |");
                    eprintln!("{e}");
                }
                None => {}
            }
        }
    }
    let pairs: Vec<_> = rows
        .iter()
        .filter_map(|(base, ours, theirs)| match (ours, theirs) {
            (Ok(o), Some(Ok(t))) => Some((base, o, t)),
            _ => None,
        })
        .collect();
    if !pairs.is_empty() {
        println!();
        println!("| base | tokens/s, qlora / PyTorch | peak RSS in steps, qlora / PyTorch | losses qlora | losses PyTorch |");
        println!("|---|---|---|---|---|");
        for (base, o, t) in pairs {
            println!(
                "| {base} | {} | {} | {} | {} |",
                ratio(o, t, "tokens_per_s"),
                ratio(o, t, "peak_rss_bytes"),
                o["losses"],
                t["losses"]
            );
        }
    }
    for (base, ours, _) in rows {
        if let Ok(v) = ours {
            println!("qlora {base}: step seconds {}", v["step_seconds"]);
        }
    }
    failed
}

/// A `Vm*` field of /proc/self/status in bytes (Linux).
fn vm_bytes(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Resets VmHWM to the current RSS (Linux: 5 written to clear_refs), so the peak read after it
/// belongs to the training steps, not to building the model.
fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// A child's JSON report, or why there is none.
type Report = Result<Value, String>;

/// One base: our report, and PyTorch's when it was asked for.
type Row = (String, Report, Option<Report>);

/// The JSON line a child printed last on stdout, or why there is none.
fn run_json(mut cmd: Command, what: &str) -> Report {
    let out = cmd
        .output()
        .map_err(|e| format!("{what}: cannot start: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().rev().find(|l| l.starts_with('{'));
    match (out.status.success(), line) {
        (true, Some(line)) => serde_json::from_str(line).map_err(|e| format!("{what}: {e}")),
        _ => {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let tail: Vec<&str> = stderr.lines().rev().take(15).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            Err(format!("{what}: exit {}\n{}", out.status, tail.join("\n")))
        }
    }
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".to_string())
}

fn mib(v: &Value) -> String {
    v.as_f64()
        .map_or("-".to_string(), |b| format!("{:.0} MiB", b / 1048576.0))
}

fn f(v: &Value, digits: usize) -> String {
    v.as_f64()
        .map_or("-".to_string(), |x| format!("{x:.digits$}"))
}

/// ours / theirs of field `key`, if both are numbers.
fn ratio(ours: &Value, theirs: &Value, key: &str) -> String {
    match (ours[key].as_f64(), theirs[key].as_f64()) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}×", a / b),
        _ => "-".to_string(),
    }
}
