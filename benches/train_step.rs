//! One QLoRA training step on the CPU (forward, explicit backward, clipping, AdamW through
//! `Trainer::train_step`) on a random ~100M-parameter Llama at batch 1 × seq 512: tokens/s, s/step
//! and peak RSS, each base (NF4 or dense linears) in a fresh child process so peaks do not mix,
//! and beside it the same step in PyTorch + PEFT (benches/train_step_peft.py) when
//! `QLORA_PEFT_PYTHON` names a python with torch, transformers, peft and bitsandbytes.
//!
//! Peak RSS is VmHWM, reset after the warm-up (so "steps" is the training peak, "setup" the peak
//! while building the model) and "RSS at start" the process before it builds the model (for
//! Python, after importing torch).
//! `cargo bench --bench train_step`; knobs: QLORA_BENCH_STEPS (timed steps, 3), QLORA_BENCH_WARMUP
//! (1), QLORA_BENCH_SEQ (512), QLORA_BENCH_BASES ("nf4,dense"), QLORA_PEFT_CHECKPOINTING ("on":
//! torch recomputes each layer as we do; "off" keeps its activations), RAYON_NUM_THREADS.

use std::env;
use std::path::PathBuf;
use std::process::{Command, ExitCode};
use std::time::Instant;

use candle_core::{DType, Device};
use qlora::kernels::adamw::AdamWConfig;
use qlora::model::llama::LlamaModel;
use qlora::model::{LlamaConfig, LlamaWeights, RopeScaling};
use qlora::peft::{LoraAdapter, LoraConfig};
use qlora::train::data::Batch;
use qlora::train::schedule::LrSchedule;
use qlora::train::trainer::{CpuAdamW, NonFinitePolicy, Trainer, TrainerConfig};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

/// The model: Llama-shaped, 12 layers of hidden 768 with GQA (12 query, 4 kv heads), tied
/// embeddings over a 32000-token vocabulary: 100.1M parameters.
const HIDDEN: usize = 768;
const LAYERS: usize = 12;
const HEADS: usize = 12;
const KV_HEADS: usize = 4;
const INTERMEDIATE: usize = 2048;
const VOCAB: usize = 32000;
const TIED: bool = true;
const BATCH: usize = 1;
/// LoRA on all seven linears (`LoraConfig::default()` is r 16, alpha 32, all seven, no dropout).
const RANK: usize = 16;
const ALPHA: f64 = 32.0;
const LR: f64 = 1e-4;
const WEIGHT_DECAY: f64 = 0.01;
const MAX_GRAD_NORM: f64 = 1.0;
const SEED: u64 = 0;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn config() -> LlamaConfig {
    LlamaConfig {
        hidden_size: HIDDEN,
        intermediate_size: INTERMEDIATE,
        num_hidden_layers: LAYERS,
        num_attention_heads: HEADS,
        num_key_value_heads: KV_HEADS,
        head_dim: HIDDEN / HEADS,
        rms_norm_eps: 1e-6,
        rope_theta: 10_000.0,
        rope_scaling: RopeScaling::Default,
        tie_word_embeddings: TIED,
        vocab_size: VOCAB,
        max_position_embeddings: 2048,
        torch_dtype: None,
        bos_token_id: Some(1),
        eos_token_ids: vec![2],
        pad_token_id: None,
        quantization: None,
    }
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

/// One configuration in this process; prints one JSON line for the parent.
fn child(base: &str) -> qlora::Result<()> {
    let seq: usize = env_or("QLORA_BENCH_SEQ", 512);
    let warmup: usize = env_or("QLORA_BENCH_WARMUP", 1);
    let steps: usize = env_or("QLORA_BENCH_STEPS", 3).max(1);
    let baseline = vm_bytes("VmRSS:");
    let config = config();
    let device = Device::Cpu;
    let built = Instant::now();
    let mut weights = LlamaWeights::random(&config, 0.02, SEED, DType::F32, &device)?;
    let params = weights.embed_tokens.elem_count()
        + weights.lm_head.as_ref().map_or(0, |t| t.elem_count())
        + weights.norm.elem_count()
        + LAYERS
            * (2 * HIDDEN
                + qlora::peft::TargetModule::ALL
                    .iter()
                    .map(|m| m.shape(&config).iter().product::<usize>())
                    .sum::<usize>());
    if base == "nf4" {
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
    let ids: Vec<u32> = (0..BATCH * seq)
        .map(|_| rng.random_range(0..VOCAB as u32))
        .collect();
    let batch = Batch {
        batch_size: BATCH,
        seq_len: seq,
        labels: ids.iter().map(|&id| i64::from(id)).collect(),
        attention_mask: vec![1; ids.len()],
        input_ids: ids,
    };
    let setup_seconds = built.elapsed().as_secs_f64();
    let setup_peak = vm_bytes("VmHWM:");

    let mut losses = Vec::new();
    for _ in 0..warmup {
        losses.push(trainer.train_step(std::slice::from_ref(&batch))?.loss);
    }
    let reset = reset_peak_rss();
    let mut times = Vec::new();
    for _ in 0..steps {
        let t0 = Instant::now();
        losses.push(trainer.train_step(std::slice::from_ref(&batch))?.loss);
        times.push(t0.elapsed().as_secs_f64());
    }
    let s_per_step = times.iter().sum::<f64>() / times.len() as f64;
    let report = json!({
        "impl": "qlora",
        "base": base,
        "threads": candle_core::utils::get_num_threads(),
        "params": params,
        "trainable_params": trainable,
        "tokens_per_step": BATCH * seq,
        "steps": steps,
        "step_seconds": times,
        "s_per_step": s_per_step,
        "tokens_per_s": (BATCH * seq) as f64 / s_per_step,
        "peak_rss_bytes": if reset { vm_bytes("VmHWM:") } else { None },
        "setup_peak_rss_bytes": setup_peak,
        "baseline_rss_bytes": baseline,
        "setup_seconds": setup_seconds,
        "losses": losses,
    });
    println!("{report}");
    Ok(())
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

fn parent() -> ExitCode {
    let exe = match env::current_exe() {
        Ok(exe) => exe,
        Err(e) => {
            eprintln!("train_step: cannot find this executable: {e}");
            return ExitCode::FAILURE;
        }
    };
    let bases: Vec<String> = env::var("QLORA_BENCH_BASES")
        .unwrap_or_else(|_| "nf4,dense".to_string())
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();
    if let Some(bad) = bases
        .iter()
        .find(|b| !matches!(b.as_str(), "nf4" | "dense"))
    {
        eprintln!("train_step: QLORA_BENCH_BASES holds {bad:?}; use nf4 and/or dense");
        return ExitCode::FAILURE;
    }
    let threads = candle_core::utils::get_num_threads();
    let seq: usize = env_or("QLORA_BENCH_SEQ", 512);
    let steps: usize = env_or("QLORA_BENCH_STEPS", 3).max(1);
    let warmup: usize = env_or("QLORA_BENCH_WARMUP", 1);
    let checkpointing = env::var("QLORA_PEFT_CHECKPOINTING").unwrap_or_else(|_| "on".into());
    let python = env::var_os("QLORA_PEFT_PYTHON").map(PathBuf::from);
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("benches/train_step_peft.py");
    println!(
        "train step: random Llama (hidden {HIDDEN}, {LAYERS} layers, {HEADS} heads / {KV_HEADS} kv, \
         intermediate {INTERMEDIATE}, vocab {VOCAB}, tied embeddings), f32 compute; LoRA r {RANK} \
         alpha {ALPHA} on all 7 linears; batch {BATCH} × {seq}; forward + backward + clip {MAX_GRAD_NORM} \
         + AdamW; {warmup} warm-up + {steps} timed steps; {threads} threads; each row a fresh process"
    );
    println!("load average before: {}", load_average());

    let mut rows: Vec<Row> = Vec::new();
    for base in &bases {
        let mut cmd = Command::new(&exe);
        cmd.args(["--child", base]);
        let ours = run_json(cmd, &format!("qlora {base}"));
        let theirs = python.as_ref().map(|py| {
            let mut cmd = Command::new(py);
            cmd.arg(&script).args([
                "--base",
                base,
                "--threads",
                &threads.to_string(),
                "--hidden",
                &HIDDEN.to_string(),
                "--layers",
                &LAYERS.to_string(),
                "--heads",
                &HEADS.to_string(),
                "--kv-heads",
                &KV_HEADS.to_string(),
                "--intermediate",
                &INTERMEDIATE.to_string(),
                "--vocab",
                &VOCAB.to_string(),
                "--batch",
                &BATCH.to_string(),
                "--seq",
                &seq.to_string(),
                "--rank",
                &RANK.to_string(),
                "--alpha",
                &ALPHA.to_string(),
                "--lr",
                &LR.to_string(),
                "--weight-decay",
                &WEIGHT_DECAY.to_string(),
                "--max-grad-norm",
                &MAX_GRAD_NORM.to_string(),
                "--warmup",
                &warmup.to_string(),
                "--steps",
                &steps.to_string(),
                "--checkpointing",
                &checkpointing,
            ]);
            if TIED {
                cmd.arg("--tied");
            }
            run_json(cmd, &format!("pytorch+peft {base}"))
        });
        rows.push((base.clone(), ours, theirs));
    }
    println!("load average after: {}", load_average());

    println!();
    println!("| base | implementation | params | s/step | tokens/s | peak RSS, steps | peak RSS, setup | RSS at start |");
    println!("|---|---|---|---|---|---|---|---|");
    let mut failed = false;
    for (base, ours, theirs) in &rows {
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
    for (base, ours, _) in &rows {
        if let Ok(v) = ours {
            println!("qlora {base}: step seconds {}", v["step_seconds"]);
        }
    }
    if python.is_none() {
        println!(
            "\nno PyTorch comparison: set QLORA_PEFT_PYTHON to a python with torch, transformers, \
             peft and bitsandbytes (e.g. ~/.cache/qlora/fixtures-venv/bin/python, see \
             scripts/requirements-fixtures.txt) to run benches/train_step_peft.py beside each row"
        );
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = env::args().collect();
    match args.iter().position(|a| a == "--child") {
        Some(i) => {
            let base = args.get(i + 1).map(String::as_str).unwrap_or("nf4");
            match child(base) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("train_step child {base}: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        None => parent(),
    }
}
