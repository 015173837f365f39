//! `qlora train`: QLoRA fine-tuning of a Hugging Face Llama folder on a JSONL dataset, on the CPU
//! (`CpuAdamW`) or a CUDA device (`CudaAdamW`, optionally paged states).
//! Settings come from defaults < `--config run.toml` < flags; the shared loop
//! (`train::train_loop::run_steps`) feeds `[batch_size, T]` micro-batches (`grad_accum` per
//! update) in a seeded per-epoch order to the [`Trainer`]; this file's hook writes metrics,
//! evaluates, checkpoints every `save_steps`, and a run resumes bit-identically from a checkpoint.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::DType;
use indicatif::ProgressBar;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;

use crate::cli::config::{
    ComputeDtype, DataFormat, DeviceName, PagedOptimizer, Quantize, ScheduleName, TrainConfig,
    SAVED_CONFIG_FILE,
};
use crate::cli::{check_format, load_model, progress_style};
use crate::model::tokenizer::Tokenizer;
use crate::model::weights::NF4_LOAD_BLOCKSIZE;
use crate::peft::base_record::{BaseLinears, BaseRecord};
use crate::peft::LoraAdapter;
use crate::train::checkpoint::{
    find_latest_checkpoint, load_checkpoint_with, save_checkpoint, DataPosition, OptimizerState,
    RngState, TrainState, TRAINER_STATE_FILE,
};
use crate::train::data::{load_jsonl, pack, read_records, Dataset, Example};
use crate::train::data::{Record, RecordKind};
use crate::train::eval::{evaluate_loss, multiple_choice_accuracy, ChoiceReport};
use crate::train::metrics::{peak_rss_mib, write_loss_curve, MetricsWriter, StepRecord};
use crate::train::train_loop::{run_steps, DataStream, StreamBatches};
use crate::train::trainer::{CheckpointOptimizer, CpuAdamW, Trainer};
use crate::{Error, Result};

/// The final adapter's folder inside the output folder.
pub const ADAPTER_DIR: &str = "adapter";

fn invalid(reason: impl Into<String>) -> Error {
    Error::invalid("train", reason)
}

/// `qlora train` flags. Each overrides the same-named key of `--config` (dashes for
/// underscores); anything not given keeps the file's value, else the default.
#[derive(clap::Args, Clone, Debug, Default, PartialEq)]
#[command(
    allow_negative_numbers = true,
    after_help = "EXAMPLES:\n  \
    qlora train --model ./Llama-3.2-1B --data train.jsonl --output run1 --steps 200\n  \
    qlora train --config run.toml --lr 1e-4          (file settings, one overridden)\n  \
    qlora train --config run.toml --resume run1      (continue from the newest checkpoint)\n  \
    qlora train --demo                               (built-in demo, no files needed)\n\n\
DATA: one JSON object per line, recognised by its fields:\n  \
    {\"instruction\": ..., \"input\": ..., \"output\": ...}     instruction tuning\n  \
    {\"messages\": [{\"role\": ..., \"content\": ...}]}         chat, rendered with the chat template\n  \
    {\"question\": ..., \"choices\": [...], \"answer\": 0|\"A\"}   multiple choice\n\
The loss is on the response tokens only.\n\n\
OUTPUT (in --output): adapter/ (PEFT format), checkpoint-N/, metrics.jsonl, metrics.csv,\n\
loss.svg and train_config.toml (the effective settings)."
)]
pub struct TrainArgs {
    /// Run the built-in demo instead (a tiny random model and a synthetic task; takes only
    /// --steps, --output and --seed).
    #[arg(long)]
    pub demo: bool,
    /// TOML file of settings (keys as the flags below, with underscores: lr, batch_size, ...).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Hugging Face Llama folder: config.json, model.safetensors (or shards), tokenizer.json,
    /// tokenizer_config.json. Plain bf16/f16/f32 or bitsandbytes NF4 pre-quantized. Or a
    /// llama.cpp GGUF file (Llama architecture, any GGML type candle reads).
    #[arg(long, value_name = "DIR|FILE.gguf")]
    pub model: Option<PathBuf>,
    /// Training data, JSONL.
    #[arg(long, value_name = "FILE")]
    pub data: Option<PathBuf>,
    /// Line shape of the data [default: auto, recognised per line].
    #[arg(long, value_enum)]
    pub format: Option<DataFormat>,
    /// Held-out JSONL evaluated every --eval-steps and at the end.
    #[arg(long, value_name = "FILE")]
    pub eval_data: Option<PathBuf>,
    /// Hold out this fraction of the training data for evaluation instead [default: 0].
    #[arg(long, value_name = "FRACTION")]
    pub eval_split: Option<f64>,
    /// Evaluate every N steps (0: only at the end) [default: 0].
    #[arg(long, value_name = "N")]
    pub eval_steps: Option<u64>,
    /// Output folder [default: qlora-out; qlora-demo-out with --demo].
    #[arg(long, value_name = "DIR")]
    pub output: Option<PathBuf>,
    /// Optimizer updates [default: enough for --epochs; 300 with --demo].
    #[arg(long, value_name = "N")]
    pub steps: Option<u64>,
    /// Passes over the data when --steps is not given [default: 1].
    #[arg(long, value_name = "N")]
    pub epochs: Option<f64>,
    /// Peak learning rate [default: 2e-4].
    #[arg(long, value_name = "LR")]
    pub lr: Option<f64>,
    /// Learning-rate curve after warmup [default: cosine].
    #[arg(long, value_enum)]
    pub schedule: Option<ScheduleName>,
    /// Warmup updates [default: 3% of the steps].
    #[arg(long, value_name = "N")]
    pub warmup_steps: Option<u64>,
    /// LoRA rank [default: 16].
    #[arg(long, value_name = "R")]
    pub r: Option<usize>,
    /// LoRA alpha; the update is scaled by alpha / r [default: 32].
    #[arg(long, value_name = "ALPHA")]
    pub alpha: Option<f64>,
    /// Adapted linears, comma-separated: q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj
    /// or all [default: all].
    #[arg(long, value_delimiter = ',', value_name = "LIST")]
    pub targets: Option<Vec<String>>,
    /// Examples per micro-batch [default: 4].
    #[arg(long, value_name = "N")]
    pub batch_size: Option<usize>,
    /// Micro-batches per optimizer update (gradient accumulation) [default: 1].
    #[arg(long, value_name = "N")]
    pub grad_accum: Option<usize>,
    /// Maximum tokens per example; longer ones are truncated (or skipped, see the config's
    /// `overflow`) [default: 512].
    #[arg(long, value_name = "TOKENS")]
    pub seq_len: Option<usize>,
    /// Pack examples into rows of --seq-len tokens.
    #[arg(long)]
    pub pack: bool,
    /// Seed of the adapter init, the data order and the eval split [default: 42; 0 with --demo].
    #[arg(long)]
    pub seed: Option<u64>,
    /// Clip the gradient norm to this, 0 for no clipping [default: 1.0].
    #[arg(long, value_name = "NORM")]
    pub max_grad_norm: Option<f64>,
    /// Compute dtype [default: bf16].
    #[arg(long, value_enum)]
    pub compute_dtype: Option<ComputeDtype>,
    /// Storage of the frozen linears: nf4 (QLoRA) or none (plain LoRA) [default: nf4].
    #[arg(long, value_enum)]
    pub quantize: Option<Quantize>,
    /// Where to run: cpu, or cuda / cuda:N (a build with `--features cuda`) [default: cpu].
    #[arg(long, value_name = "DEVICE")]
    pub device: Option<DeviceName>,
    /// LoRA dropout on each adapted linear's input while training, in [0, 1) (QLoRA used 0.05
    /// up to 13B and 0.1 above) [default: 0].
    #[arg(long, value_name = "P")]
    pub lora_dropout: Option<f64>,
    /// AdamW states paged to host memory on CUDA: off, auto (the largest, until the rest fits
    /// 1/16 of the device's memory) or all (every state of 1e5 elements or more). The CPU
    /// ignores it [default: auto].
    #[arg(long, value_enum)]
    pub paged_optimizer: Option<PagedOptimizer>,
    /// Save a checkpoint every N steps (0: never) [default: 100].
    #[arg(long, value_name = "N")]
    pub save_steps: Option<u64>,
    /// Checkpoints kept on disk [default: 2].
    #[arg(long, value_name = "N")]
    pub keep_last: Option<usize>,
    /// Print a line every N steps [default: 10].
    #[arg(long, value_name = "N")]
    pub log_steps: Option<u64>,
    /// Continue from a checkpoint folder (checkpoint-N) or the newest one in an output folder.
    /// The other settings must match the run that wrote it.
    #[arg(long, value_name = "DIR")]
    pub resume: Option<PathBuf>,
    /// Replace what an earlier run left in --output (its adapter, checkpoints and metrics);
    /// without it, or --resume, such a folder is refused.
    #[arg(long)]
    pub overwrite: bool,
}

impl TrainArgs {
    /// Defaults, then the `--config` file, then the flags given.
    pub fn effective_config(&self) -> Result<TrainConfig> {
        let mut c = match &self.config {
            Some(path) => TrainConfig::from_toml_file(path)?,
            None => TrainConfig::default(),
        };
        fn set<T: Clone>(slot: &mut T, value: &Option<T>) {
            if let Some(v) = value {
                *slot = v.clone();
            }
        }
        if self.model.is_some() {
            c.model.clone_from(&self.model);
        }
        if self.data.is_some() {
            c.data.clone_from(&self.data);
        }
        if self.eval_data.is_some() {
            c.eval_data.clone_from(&self.eval_data);
        }
        if self.steps.is_some() {
            c.steps = self.steps;
        }
        if self.warmup_steps.is_some() {
            c.warmup_steps = self.warmup_steps;
        }
        set(&mut c.format, &self.format);
        set(&mut c.eval_split, &self.eval_split);
        set(&mut c.eval_steps, &self.eval_steps);
        set(&mut c.output, &self.output);
        set(&mut c.epochs, &self.epochs);
        set(&mut c.lr, &self.lr);
        set(&mut c.schedule, &self.schedule);
        set(&mut c.r, &self.r);
        set(&mut c.alpha, &self.alpha);
        set(&mut c.targets, &self.targets);
        set(&mut c.batch_size, &self.batch_size);
        set(&mut c.grad_accum, &self.grad_accum);
        set(&mut c.seq_len, &self.seq_len);
        set(&mut c.seed, &self.seed);
        set(&mut c.max_grad_norm, &self.max_grad_norm);
        set(&mut c.compute_dtype, &self.compute_dtype);
        set(&mut c.quantize, &self.quantize);
        set(&mut c.device, &self.device);
        set(&mut c.paged_optimizer, &self.paged_optimizer);
        set(&mut c.lora_dropout, &self.lora_dropout);
        set(&mut c.save_steps, &self.save_steps);
        set(&mut c.keep_last, &self.keep_last);
        set(&mut c.log_steps, &self.log_steps);
        if self.pack {
            c.pack = true;
        }
        c.validate()?;
        Ok(c)
    }

    /// Whether a flag the demo does not take (anything but --demo, --steps, --output, --seed)
    /// was given.
    pub fn has_non_demo_flags(&self) -> bool {
        let demo_only = TrainArgs {
            demo: self.demo,
            steps: self.steps,
            output: self.output.clone(),
            seed: self.seed,
            ..TrainArgs::default()
        };
        *self != demo_only
    }
}

/// Loads a dataset file, checking every line has the shape `format` names (unless auto), and
/// prints its counts (truncated and skipped examples included).
fn load_dataset(
    path: &Path,
    format: DataFormat,
    tokenizer: &Tokenizer,
    config: &TrainConfig,
    what: &str,
) -> Result<Dataset> {
    if format != DataFormat::Auto {
        check_format(path, &read_records(path)?, format)?;
    }
    let dataset = load_jsonl(path, tokenizer, &config.data())?;
    println!("{what} data: {}: {}", path.display(), dataset.stats);
    if dataset.examples.is_empty() {
        return Err(invalid(format!(
            "{}: no example left to train on",
            path.display()
        )));
    }
    Ok(dataset)
}

/// Refuses an `output` folder where an earlier run left its results (an adapter, checkpoints,
/// metrics), which a new run would replace without a word.
fn check_fresh_output(output: &Path) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(output) else {
        return Ok(());
    };
    let mut found: Vec<String> = entries
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|name| {
            name == ADAPTER_DIR
                || name == crate::train::metrics::METRICS_JSONL
                || name.starts_with("checkpoint-")
        })
        .collect();
    found.sort();
    if found.is_empty() {
        return Ok(());
    }
    Err(invalid(format!(
        "--output {} already holds a run ({}); pass --overwrite to replace it, --resume {} to \
         continue it, or another --output",
        output.display(),
        found.join(", "),
        output.display()
    )))
}

/// The checkpoint folder `path` names: itself when it holds a trainer state, else the newest
/// complete checkpoint inside it.
fn resolve_resume(path: &Path) -> Result<PathBuf> {
    if path.join(TRAINER_STATE_FILE).is_file() {
        return Ok(path.to_path_buf());
    }
    let (found, skipped) = find_latest_checkpoint(path);
    // A damaged newer checkpoint is moved aside, never passed over in silence and then
    // overwritten when the resumed run reaches its step.
    for s in &skipped {
        let aside = set_aside_name(&s.path);
        std::fs::rename(&s.path, &aside).map_err(|e| Error::io(&s.path, e))?;
        eprintln!(
            "qlora: warning: {} is damaged ({}); moved to {}{}",
            s.path.display(),
            s.reason,
            aside.display(),
            match &found {
                Some(f) => format!("; resuming from {}", f.display()),
                None => String::new(),
            }
        );
    }
    found.ok_or_else(|| {
        invalid(format!(
            "--resume {}: neither a checkpoint folder nor an output folder holding a complete one",
            path.display()
        ))
    })
}

/// `{path}.damaged`, or `{path}.damaged-2`, ... : the first name not taken.
fn set_aside_name(path: &Path) -> PathBuf {
    let base = format!("{}.damaged", path.display());
    (1..)
        .map(|i| match i {
            1 => PathBuf::from(&base),
            i => PathBuf::from(format!("{base}-{i}")),
        })
        .find(|p| !p.exists())
        .unwrap_or_else(|| PathBuf::from(base))
}

/// Checks a restored trainer was written by a run with these settings, naming each setting that
/// differs with both values.
fn check_resumed<O: CheckpointOptimizer>(
    trainer: &Trainer<'_, O>,
    want: &Trainer<'_, O>,
) -> Result<()> {
    let (got, expected) = (resume_settings(trainer), resume_settings(want));
    let differ: Vec<String> = got
        .iter()
        .zip(&expected)
        .filter(|((_, a), (_, b))| a != b)
        .map(|((key, a), (_, b))| format!("{key} = {a} (these settings: {b})"))
        .collect();
    if differ.is_empty() {
        return Ok(());
    }
    Err(invalid(format!(
        "the checkpoint was written with {}; resume with the settings of the original run",
        differ.join(", ")
    )))
}

/// The settings a resumed run must share with the run that wrote its checkpoint, by name.
fn resume_settings<O: CheckpointOptimizer>(t: &Trainer<'_, O>) -> Vec<(&'static str, String)> {
    let c = t.config();
    let o = t.optimizer().adamw_config();
    let l = t.adapter().config();
    let targets: Vec<&str> = l.target_modules.iter().map(|m| m.name()).collect();
    vec![
        ("schedule", format!("{:?}", c.schedule.kind)),
        ("warmup_steps", c.schedule.warmup_steps.to_string()),
        ("steps", c.schedule.total_steps.to_string()),
        (
            "max_grad_norm",
            c.max_grad_norm
                .map_or("0 (off)".to_string(), |v| v.to_string()),
        ),
        ("non-finite policy", format!("{:?}", c.non_finite)),
        ("lr", o.lr.to_string()),
        ("adam_betas", format!("{:?}", o.betas)),
        ("adam_eps", o.eps.to_string()),
        ("weight_decay", o.weight_decay.to_string()),
        ("r", l.r.to_string()),
        ("alpha", l.alpha.to_string()),
        ("targets", targets.join(",")),
        ("use_rslora", l.use_rslora.to_string()),
        ("lora_dropout", l.dropout.to_string()),
    ]
}

/// Runs `qlora train` (not the demo).
pub fn run(args: &TrainArgs) -> Result<()> {
    let started = Instant::now();
    let mut config = args.effective_config()?;
    if let DeviceName::Cuda(_) = config.device {
        // Fails first, typed, when CUDA is not built in or the device does not open.
        crate::cli::open_device(config.device)?;
    }
    let model_dir = config.model.clone().ok_or_else(|| {
        invalid(
            "no model given: pass --model DIR and --data FILE (or set them in --config run.toml), \
             or run `qlora train --demo` for the built-in demo",
        )
    })?;
    let data_path = config
        .data
        .clone()
        .ok_or_else(|| invalid("no training data given: pass --data FILE.jsonl"))?;
    if args.resume.is_none() && !args.overwrite {
        check_fresh_output(&config.output)?;
    }
    let loaded = load_model(
        &model_dir,
        config.compute_dtype,
        config.quantize,
        config.device,
    )?;
    println!("{}", loaded.summary);
    let (model, tokenizer) = (&loaded.model, &loaded.tokenizer);
    let pad_id = tokenizer.pad_id()?;

    let train_data = load_dataset(&data_path, config.format, tokenizer, &config, "training")?;
    let mut train_rows = train_data.examples;
    let mut eval_rows: Vec<Example> = Vec::new();
    // An eval file of multiple-choice questions only is also scored for accuracy.
    let mut eval_questions: Vec<Record> = Vec::new();
    if let Some(path) = &config.eval_data {
        eval_rows = load_dataset(path, config.format, tokenizer, &config, "eval")?.examples;
        let records = read_records(path)?;
        if records
            .iter()
            .all(|(_, r)| r.kind() == RecordKind::MultipleChoice)
        {
            eval_questions = records.into_iter().map(|(_, r)| r).collect();
        }
    } else if config.eval_split > 0.0 {
        let held = ((train_rows.len() as f64) * config.eval_split).round() as usize;
        if held == 0 || held >= train_rows.len() {
            return Err(invalid(format!(
                "eval_split {} of {} examples leaves {held} for evaluation",
                config.eval_split,
                train_rows.len()
            )));
        }
        let mut order: Vec<usize> = (0..train_rows.len()).collect();
        order.shuffle(&mut StdRng::seed_from_u64(config.seed ^ 0xe5a1));
        let held_set: std::collections::HashSet<usize> = order[..held].iter().copied().collect();
        let (mut kept, mut held_out) = (Vec::new(), Vec::new());
        for (i, row) in train_rows.into_iter().enumerate() {
            if held_set.contains(&i) {
                held_out.push(row);
            } else {
                kept.push(row);
            }
        }
        train_rows = kept;
        eval_rows = held_out;
        println!(
            "eval split: {} examples held out, {} left for training",
            eval_rows.len(),
            train_rows.len()
        );
    }
    if config.pack {
        let before = train_rows.len();
        train_rows = pack(&train_rows, config.seq_len)?;
        println!(
            "packing: {before} examples into {} rows of at most {} tokens",
            train_rows.len(),
            config.seq_len
        );
    }

    let total_steps = config.total_steps(train_rows.len());
    config.steps = Some(total_steps);
    let output = config.output.clone();
    std::fs::create_dir_all(&output).map_err(|e| Error::io(&output, e))?;
    let settings = config.to_toml()?;
    println!("settings (saved as {SAVED_CONFIG_FILE}):");
    for line in settings.lines() {
        println!("  {line}");
    }
    let saved = output.join(SAVED_CONFIG_FILE);
    std::fs::write(&saved, &settings).map_err(|e| Error::io(&saved, e))?;

    let run = Run {
        args,
        config: &config,
        model,
        tokenizer,
        pad_id,
        train_rows: &train_rows,
        eval_rows: &eval_rows,
        eval_questions: &eval_questions,
        total_steps,
        output: &output,
        data_path: &data_path,
        started,
    };
    match config.device {
        DeviceName::Cpu => run.train(|s| CpuAdamW::from_state(s.config, s.steps, s.moments)),
        #[cfg(feature = "cuda")]
        DeviceName::Cuda(_) => {
            let dev = std::sync::Arc::new(crate::kernels::cuda::CudaDevice::from_candle(
                model.device(),
            )?);
            let policy = paging_policy(config.paged_optimizer, &dev)?;
            println!(
                "optimizer: fused AdamW on {}, paged states {:?}",
                config.device, config.paged_optimizer
            );
            run.train(|s| {
                crate::train::cuda_adamw::CudaAdamW::from_state(
                    dev.clone(),
                    s.config,
                    policy,
                    s.steps,
                    s.moments,
                )
            })
        }
        #[cfg(not(feature = "cuda"))]
        DeviceName::Cuda(_) => Err(invalid("CUDA is not built into this binary")),
    }
}

/// The AdamW paging policy of `--paged-optimizer` on `dev`: auto pages until the states left on
/// the device fit 1/16 of its memory.
#[cfg(feature = "cuda")]
fn paging_policy(
    paged: PagedOptimizer,
    dev: &crate::kernels::cuda::CudaDevice,
) -> Result<crate::kernels::paged::PagingPolicy> {
    use crate::kernels::paged::{PagingMode, PagingPolicy};
    let (_, total) = dev.memory_info()?;
    Ok(PagingPolicy {
        mode: match paged {
            PagedOptimizer::Off => PagingMode::Off,
            PagedOptimizer::Auto => PagingMode::Auto,
            PagedOptimizer::All => PagingMode::All,
        },
        device_budget_bytes: total as u64 / 16,
        transport: None,
    })
}

/// Everything `qlora train` prepared before the loop: settings, model, data, output folder.
struct Run<'a> {
    args: &'a TrainArgs,
    config: &'a TrainConfig,
    model: &'a crate::model::llama::LlamaModel,
    tokenizer: &'a Tokenizer,
    pad_id: u32,
    train_rows: &'a [Example],
    eval_rows: &'a [Example],
    /// The eval file's questions when it is all multiple-choice (else empty): scored for
    /// accuracy before training and at each eval.
    eval_questions: &'a [Record],
    total_steps: u64,
    output: &'a Path,
    data_path: &'a Path,
    started: Instant,
}

impl Run<'_> {
    /// The training loop with the optimizer `make` builds from an [`OptimizerState`] (fresh:
    /// no updates, no moments; or restored from `--resume`).
    fn train<O: CheckpointOptimizer>(
        self,
        make: impl Fn(OptimizerState) -> Result<O>,
    ) -> Result<()> {
        let Run {
            args,
            config,
            model,
            tokenizer,
            pad_id,
            train_rows,
            eval_rows,
            eval_questions,
            total_steps,
            output,
            data_path,
            started,
        } = self;
        let adapter = LoraAdapter::init(
            config.lora()?,
            model.config(),
            DType::F32,
            model.device(),
            config.seed,
        )?;
        let base_record = base_record(config, model);
        let base_record = &base_record;
        let fresh = Trainer::new(
            model,
            adapter,
            make(OptimizerState {
                config: config.adamw(),
                steps: 0,
                moments: Default::default(),
            })?,
            config.trainer(total_steps),
        )?;
        let (trainer, state) = match &args.resume {
            Some(path) => {
                let checkpoint = resolve_resume(path)?;
                let (trainer, state) = load_checkpoint_with(&checkpoint, model, &make)?;
                check_resumed(&trainer, &fresh)?;
                if state.rng_state.seed != config.seed {
                    return Err(invalid(format!(
                        "the checkpoint was written with seed {}, these settings give {}",
                        state.rng_state.seed, config.seed
                    )));
                }
                println!(
                    "resuming from {} at step {} of {total_steps}",
                    checkpoint.display(),
                    state.step
                );
                (trainer, state)
            }
            None => (
                fresh,
                TrainState {
                    step: 0,
                    data_position: DataPosition::default(),
                    rng_state: RngState {
                        seed: config.seed,
                        counter: 0,
                    },
                },
            ),
        };
        let mut trainer = trainer.with_dropout_seed(config.seed);
        if state.step >= total_steps {
            return Err(invalid(format!(
                "the checkpoint is at step {}, the run has {total_steps} steps: nothing left to do",
                state.step
            )));
        }
        let trainable: usize = trainer
            .adapter()
            .pairs()
            .map(|(_, p)| p.a.elem_count() + p.b.elem_count())
            .sum();
        println!(
            "LoRA r {} alpha {} on {}: {trainable} trainable parameters; {} rows, {total_steps} steps \
             of {} x {} rows, lr {:e} ({:?}, {} warmup steps)",
            config.r,
            config.alpha,
            config
                .target_modules()?
                .iter()
                .map(|m| m.name())
                .collect::<Vec<_>>()
                .join(","),
            train_rows.len(),
            config.grad_accum,
            config.batch_size,
            config.lr,
            config.schedule,
            trainer.config().schedule.warmup_steps,
        );

        let resumed = args.resume.is_some().then_some(state.step);
        let mut metrics = MetricsWriter::create(output, resumed)?;
        let mut source = StreamBatches {
            stream: DataStream::new(train_rows, config.seed, state.data_position),
            batch_size: config.batch_size,
            grad_accum: config.grad_accum,
            pad_id,
        };
        let accuracy = |adapter: &LoraAdapter| -> Result<Option<ChoiceReport>> {
            match eval_questions.is_empty() {
                true => Ok(None),
                false => multiple_choice_accuracy(model, Some(adapter), tokenizer, eval_questions)
                    .map(Some),
            }
        };
        if state.step == 0 {
            if let Some(c) = accuracy(trainer.adapter())? {
                println!(
                    "eval accuracy before training: {:.2}% ({}/{})",
                    100.0 * c.accuracy,
                    c.correct,
                    c.questions
                );
            }
        }
        let bar = ProgressBar::new(total_steps).with_style(progress_style()?);
        bar.set_position(state.step);
        let mut last_eval = None;
        let mut last_accuracy = None;
        let steps = state.step + 1..=total_steps;
        let summary = run_steps(&mut trainer, steps, &mut source, |trainer, source, r| {
            let (step, m, elapsed, tokens_per_s) =
                (r.step, r.metrics, r.elapsed_s, r.tokens_per_s());
            let stream = &source.stream;
            let eval_now = !eval_rows.is_empty()
                && (step == total_steps
                    || (config.eval_steps > 0 && step % config.eval_steps == 0));
            let (eval_loss, eval_accuracy) = match eval_now {
                true => {
                    let report = bar.suspend(|| {
                        evaluate_loss(
                            model,
                            Some(trainer.adapter()),
                            eval_rows,
                            config.batch_size,
                            pad_id,
                        )
                    })?;
                    last_eval = Some(report);
                    let choices = bar.suspend(|| accuracy(trainer.adapter()))?;
                    let acc = choices.as_ref().map(|c| c.accuracy);
                    if choices.is_some() {
                        last_accuracy = choices;
                    }
                    (Some(report.loss), acc)
                }
                false => (None, None),
            };
            let rss = peak_rss_mib();
            metrics.write(StepRecord {
                step,
                epoch: stream.epochs_done(),
                loss: m.loss,
                lr: m.lr,
                grad_norm: m.grad_norm,
                tokens: m.tokens,
                label_tokens: m.label_tokens,
                tokens_per_s,
                elapsed_s: elapsed,
                peak_rss_mib: rss,
                eval_loss,
                skipped: m.skipped,
                eval_accuracy,
            })?;
            bar.set_message(format!(
                "loss {:.4}  lr {:.2e}  {:.0} tok/s  peak RSS {}",
                m.loss,
                m.lr,
                tokens_per_s,
                rss.map_or("n/a".to_string(), |r| format!("{r:.0} MiB"))
            ));
            bar.set_position(step);
            if step == state.step + 1 || step % config.log_steps == 0 || step == total_steps {
                bar.suspend(|| {
                    println!(
                        "step {step:>5}/{total_steps}  loss {:.4}  lr {:.3e}  grad norm {:.3}  \
                         {tokens_per_s:.0} tok/s{}{}",
                        m.loss,
                        m.lr,
                        m.grad_norm,
                        eval_loss.map_or(String::new(), |l| format!("  eval loss {l:.4}"))
                            + &eval_accuracy.map_or(String::new(), |a| format!(
                                "  eval accuracy {:.2}%",
                                100.0 * a
                            )),
                        if m.skipped {
                            "  (skipped: not finite)"
                        } else {
                            ""
                        }
                    )
                });
            }
            if config.save_steps > 0 && step % config.save_steps == 0 && step < total_steps {
                metrics.flush()?;
                let train_state = TrainState {
                    step,
                    data_position: stream.position,
                    rng_state: state.rng_state,
                };
                let path = save_checkpoint(output, trainer, &train_state, config.keep_last)?;
                base_record.write(&path)?;
                bar.suspend(|| println!("saved {}", path.display()));
            }
            Ok(())
        })?;
        bar.finish_and_clear();
        metrics.flush()?;
        let (tokens, train_s) = (summary.tokens, summary.seconds);
        let stream = source.stream;

        let adapter_dir = output.join(ADAPTER_DIR);
        trainer.adapter().save_pretrained(&adapter_dir)?;
        base_record.write(&adapter_dir)?;
        let final_state = TrainState {
            step: total_steps,
            data_position: stream.position,
            rng_state: state.rng_state,
        };
        if config.save_steps > 0 {
            let path = save_checkpoint(output, &trainer, &final_state, config.keep_last)?;
            base_record.write(&path)?;
        }
        let svg = write_loss_curve(
            output,
            metrics.records(),
            &format!("qlora train: {}", data_path.display()),
        )?;
        if trainer.skipped_batches() > 0 {
            println!(
                "{} batches skipped for a non-finite loss or gradient",
                trainer.skipped_batches()
            );
        }
        if let Some(report) = last_eval {
            println!(
                "eval: loss {:.4}, perplexity {:.3} over {} label tokens of {} examples",
                report.loss, report.perplexity, report.label_tokens, report.examples
            );
        }
        if let Some(c) = last_accuracy {
            println!(
                "eval accuracy: {:.2}% ({}/{})",
                100.0 * c.accuracy,
                c.correct,
                c.questions
            );
        }
        println!(
            "trained steps {}..={total_steps} in {train_s:.1} s ({:.0} tokens/s)",
            state.step + 1,
            tokens as f64 / train_s.max(1e-9)
        );
        println!("wrote:");
        println!("  {}  (PEFT adapter)", adapter_dir.display());
        println!(
            "  {}, {}, {}  (metrics per step, loss curve)",
            output.join(crate::train::metrics::METRICS_JSONL).display(),
            output.join(crate::train::metrics::METRICS_CSV).display(),
            svg.display()
        );
        println!("done in {:.1} s", started.elapsed().as_secs_f64());
        Ok(())
    }
}

/// What the adapter of this run trains against (written as the adapter's `qlora_base.json`).
fn base_record(config: &TrainConfig, model: &crate::model::llama::LlamaModel) -> BaseRecord {
    let linears = match (model.config().quantization.is_some(), config.quantize) {
        (true, _) => BaseLinears::Nf4Stored,
        (false, Quantize::Nf4) => BaseLinears::Nf4OnLoad,
        (false, Quantize::None) => BaseLinears::Dense,
    };
    let on_load = linears == BaseLinears::Nf4OnLoad;
    BaseRecord {
        linears,
        blocksize: on_load.then_some(NF4_LOAD_BLOCKSIZE),
        double_quant: on_load.then_some(true),
        quantized_from: on_load.then(|| {
            match config.compute_dtype {
                ComputeDtype::Bf16 => "bfloat16",
                ComputeDtype::F32 => "float32",
            }
            .to_string()
        }),
        model: config
            .model
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
    }
}
