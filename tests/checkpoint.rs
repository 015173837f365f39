//! Training checkpoints (`qlora::train::checkpoint`) on the tiny f32 Llama fixture
//! (tests/fixtures/llama/base) with an r = 4 adapter: bit-identical resume, pruning, torn writes
//! ignored, and a writer killed with SIGKILL leaving a loadable checkpoint.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use qlora::kernels::adamw::AdamWConfig;
use qlora::model::llama::{LlamaModel, IGNORE_INDEX};
use qlora::peft::{LoraAdapter, LoraConfig, TargetModule};
use qlora::train::checkpoint::{
    latest_checkpoint, load_checkpoint, load_checkpoint_with, save_checkpoint, DataPosition,
    OptimizerState, RngState, TrainState, OPTIMIZER_FILE, TRAINER_STATE_FILE,
};
use qlora::train::data::{collate, Batch, Example};
use qlora::train::schedule::{LrSchedule, ScheduleKind};
use qlora::train::trainer::{
    CheckpointOptimizer, CpuAdamW, NonFinitePolicy, StepMetrics, Trainer, TrainerConfig,
};
use qlora::Error;

/// Set on the child process of [`sigkill_mid_write_leaves_the_last_checkpoint_loadable`]: the
/// directory [`sigkill_child_saves_checkpoints_until_killed`] writes into.
const CHILD_DIR_ENV: &str = "QLORA_CHECKPOINT_SIGKILL_DIR";

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("qlora-checkpoint-{}-{name}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    dir
}

/// A fresh trainer: r = 4 on every target, AdamW with weight decay, cosine with warmup over 6
/// updates, clipping at a norm small enough to bite.
fn fresh_trainer(model: &LlamaModel) -> Trainer<'_, CpuAdamW> {
    fresh_trainer_with_dropout(model, 0.0)
}

/// [`fresh_trainer`] with LoRA dropout `p`.
fn fresh_trainer_with_dropout(model: &LlamaModel, p: f64) -> Trainer<'_, CpuAdamW> {
    let lora = LoraConfig {
        r: 4,
        alpha: 8.0,
        dropout: p,
        target_modules: TargetModule::ALL.to_vec(),
        ..LoraConfig::default()
    };
    let adapter = LoraAdapter::init(lora, model.config(), DType::F32, &Device::Cpu, 7).unwrap();
    let optimizer = CpuAdamW::new(AdamWConfig {
        lr: 1e-2,
        weight_decay: 0.1,
        ..AdamWConfig::default()
    })
    .unwrap();
    let config = TrainerConfig {
        schedule: LrSchedule {
            kind: ScheduleKind::Cosine { num_cycles: 0.5 },
            warmup_steps: 2,
            total_steps: 6,
        },
        max_grad_norm: Some(0.5),
        non_finite: NonFinitePolicy::Error,
    };
    Trainer::new(model, adapter, optimizer, config).unwrap()
}

/// `len` pseudo-random ids below the fixture's vocab (200); the last half are labels.
fn example(seed: u64, len: usize) -> Example {
    let input_ids: Vec<u32> = (0..len as u64)
        .map(|i| ((i * 37 + seed * 101 + 11) % 197 + 3) as u32)
        .collect();
    let labels = input_ids
        .iter()
        .enumerate()
        .map(|(i, &id)| {
            if 2 * i >= len {
                id as i64
            } else {
                IGNORE_INDEX
            }
        })
        .collect();
    Example { input_ids, labels }
}

/// The fixed batch of update `step` (0-based): two examples of different lengths.
fn batch(step: u64) -> Batch {
    collate(&[example(2 * step, 9), example(2 * step + 1, 6)], 0).unwrap()
}

fn train(trainer: &mut Trainer<'_, CpuAdamW>, steps: std::ops::Range<u64>) -> Vec<StepMetrics> {
    steps
        .map(|step| trainer.train_step(&[batch(step)]).unwrap())
        .collect()
}

fn bits(t: &Tensor) -> Vec<u32> {
    let values = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    values.into_iter().map(f32::to_bits).collect()
}

fn metric_bits(metrics: &[StepMetrics]) -> Vec<(u64, u32, u64, u64)> {
    metrics
        .iter()
        .map(|m| {
            (
                m.step,
                m.loss.to_bits(),
                m.lr.to_bits(),
                m.grad_norm.to_bits(),
            )
        })
        .collect()
}

/// Every A, B, m and v of the trainer, as bits, by name.
fn state_bits(trainer: &Trainer<'_, CpuAdamW>) -> Vec<(String, Vec<u32>)> {
    let mut out = Vec::new();
    for ((layer, module), pair) in trainer.adapter().pairs() {
        out.push((format!("{layer}.{module}.A"), bits(&pair.a)));
        out.push((format!("{layer}.{module}.B"), bits(&pair.b)));
    }
    for ((layer, module), moments) in trainer.optimizer().moments() {
        for (matrix, state) in ["A", "B"].into_iter().zip(moments) {
            let m = state.m.iter().map(|x| x.to_bits()).collect();
            let v = state.v.iter().map(|x| x.to_bits()).collect();
            out.push((format!("{layer}.{module}.{matrix}.m"), m));
            out.push((format!("{layer}.{module}.{matrix}.v"), v));
        }
    }
    out
}

fn train_state(step: u64) -> TrainState {
    TrainState {
        step,
        data_position: DataPosition {
            epoch: step / 4,
            index: step % 4,
        },
        rng_state: RngState {
            seed: 0xDEAD_BEEF_0000_0001,
            counter: 3 * step,
        },
    }
}

fn checkpoint_steps(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

#[test]
fn resume_after_half_the_steps_is_bit_identical() {
    let started = Instant::now();
    let model = common::llama::load("base", DType::F32, false);
    let mut straight = fresh_trainer(&model);
    let straight_metrics = train(&mut straight, 0..6);

    let dir = temp_dir("resume");
    let mut first = fresh_trainer(&model);
    let mut resumed_metrics = train(&mut first, 0..3);
    let saved = save_checkpoint(&dir, &first, &train_state(3), 2).unwrap();
    assert_eq!(saved, dir.join("checkpoint-3"));
    let before_save = state_bits(&first);
    drop(first);

    let (mut second, state) = load_checkpoint(&saved, &model).unwrap();
    assert_eq!(state, train_state(3));
    assert_eq!(second.steps(), 3);
    assert_eq!(second.config(), fresh_trainer(&model).config());
    assert_eq!(
        second.optimizer().config(),
        fresh_trainer(&model).optimizer().config()
    );
    assert_eq!(state_bits(&second), before_save, "state after load");
    resumed_metrics.extend(train(&mut second, 3..6));

    assert_eq!(
        metric_bits(&resumed_metrics),
        metric_bits(&straight_metrics),
        "step, loss, lr and grad norm of every step"
    );
    let (straight_state, resumed_state) = (state_bits(&straight), state_bits(&second));
    assert_eq!(straight_state.len(), 2 * 7 * 2 * 3, "A, B, m, v per linear");
    assert_eq!(resumed_state, straight_state, "final A, B and moments");
    // The run did move: the last loss is below the first.
    assert!(straight_metrics[5].loss < straight_metrics[0].loss);
    fs::remove_dir_all(&dir).unwrap();
    eprintln!("resume test: {:?}", started.elapsed());
}

#[test]
fn optimizer_file_names_the_moments_of_every_lora_tensor() {
    let model = common::llama::load("base", DType::F32, false);
    let mut trainer = fresh_trainer(&model);
    train(&mut trainer, 0..1);
    let dir = temp_dir("names");
    let path = save_checkpoint(&dir, &trainer, &train_state(1), 1).unwrap();
    let bytes = fs::read(path.join(OPTIMIZER_FILE)).unwrap();
    let tensors = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names = tensors.names();
    names.sort();
    assert_eq!(names.len(), 2 * 7 * 2 * 2);
    assert_eq!(names[0], "layers.0.mlp.down_proj.lora_A.exp_avg");
    assert_eq!(names[1], "layers.0.mlp.down_proj.lora_A.exp_avg_sq");
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    assert_eq!(header.metadata().as_ref().unwrap()["step"], "1");
    let json: serde_json::Value =
        serde_json::from_slice(&fs::read(path.join(TRAINER_STATE_FILE)).unwrap()).unwrap();
    assert_eq!(json["format_version"], 1);
    assert_eq!(json["base_lr"], "0.01");
    assert_eq!(json["schedule"]["kind"], "cosine");
    assert_eq!(json["data_position"]["index"], 1);
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn keep_last_prunes_older_checkpoints() {
    let model = common::llama::load("base", DType::F32, false);
    let trainer = fresh_trainer(&model);
    let dir = temp_dir("prune");
    for step in 1..=5 {
        save_checkpoint(&dir, &trainer, &train_state(step), 2).unwrap();
    }
    assert_eq!(checkpoint_steps(&dir), ["checkpoint-4", "checkpoint-5"]);
    assert_eq!(latest_checkpoint(&dir), Some(dir.join("checkpoint-5")));
    // Keeping more leaves everything; numeric order, not lexicographic, decides the newest.
    save_checkpoint(&dir, &trainer, &train_state(10), 3).unwrap();
    assert_eq!(
        checkpoint_steps(&dir),
        ["checkpoint-10", "checkpoint-4", "checkpoint-5"]
    );
    save_checkpoint(&dir, &trainer, &train_state(11), 1).unwrap();
    assert_eq!(checkpoint_steps(&dir), ["checkpoint-11"]);

    let err = save_checkpoint(&dir, &trainer, &train_state(12), 0).unwrap_err();
    assert!(matches!(err, Error::InvalidArgument { .. }), "{err}");
    assert_eq!(latest_checkpoint(temp_dir("absent")), None);
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn torn_write_is_ignored_and_the_previous_checkpoint_loads() {
    let model = common::llama::load("base", DType::F32, false);
    let mut trainer = fresh_trainer(&model);
    train(&mut trainer, 0..2);
    let dir = temp_dir("torn");
    let good = save_checkpoint(&dir, &trainer, &train_state(6), 3).unwrap();

    // A save of step 9 interrupted part-way: some files, the optimizer's cut in half, and a
    // per-file temporary left behind.
    let torn = dir.join("checkpoint-9.tmp");
    fs::create_dir(&torn).unwrap();
    for name in ["adapter_config.json", "adapter_model.safetensors"] {
        fs::copy(good.join(name), torn.join(name)).unwrap();
    }
    let optimizer = fs::read(good.join(OPTIMIZER_FILE)).unwrap();
    fs::write(torn.join(OPTIMIZER_FILE), &optimizer[..optimizer.len() / 2]).unwrap();
    fs::write(torn.join("trainer_state.json.tmp"), b"{\"format_vers").unwrap();
    // A final-named directory that lacks a file (never written by save_checkpoint, which renames
    // a complete directory) is not complete either.
    let partial = dir.join("checkpoint-12");
    fs::create_dir(&partial).unwrap();
    fs::copy(
        good.join(TRAINER_STATE_FILE),
        partial.join(TRAINER_STATE_FILE),
    )
    .unwrap();

    assert_eq!(latest_checkpoint(&dir), Some(good.clone()));
    let (loaded, state) = load_checkpoint(latest_checkpoint(&dir).unwrap(), &model).unwrap();
    assert_eq!(state, train_state(6));
    assert_eq!(state_bits(&loaded), state_bits(&trainer));

    // Loading the torn directory directly is an error, not a panic.
    assert!(load_checkpoint(&torn, &model).is_err());
    // A truncated optimizer file in an otherwise complete checkpoint is a typed error.
    let copy = dir.join("checkpoint-7");
    fs::create_dir(&copy).unwrap();
    for entry in fs::read_dir(&good).unwrap() {
        let entry = entry.unwrap();
        fs::copy(entry.path(), copy.join(entry.file_name())).unwrap();
    }
    fs::write(copy.join(OPTIMIZER_FILE), &optimizer[..optimizer.len() - 8]).unwrap();
    assert!(load_checkpoint(&copy, &model).is_err());

    // The next save clears the stale temporary directory.
    save_checkpoint(&dir, &trainer, &train_state(13), 10).unwrap();
    assert!(!torn.exists());
    fs::remove_dir_all(&dir).unwrap();
}

/// The child of [`sigkill_mid_write_leaves_the_last_checkpoint_loadable`]; does nothing unless
/// [`CHILD_DIR_ENV`] is set. Resumes from the newest checkpoint there (or starts fresh), then
/// trains and saves a checkpoint after every update until it is killed.
#[test]
fn sigkill_child_saves_checkpoints_until_killed() {
    let Some(dir) = std::env::var_os(CHILD_DIR_ENV).map(PathBuf::from) else {
        return;
    };
    let model = common::llama::load("base", DType::F32, false);
    let (mut trainer, mut state) = match latest_checkpoint(&dir) {
        Some(path) => load_checkpoint(path, &model).unwrap(),
        None => (fresh_trainer(&model), TrainState::default()),
    };
    loop {
        trainer.train_step(&[batch(state.step % 6)]).unwrap();
        state.step += 1;
        save_checkpoint(&dir, &trainer, &state, 2).unwrap();
    }
}

#[test]
fn sigkill_mid_write_leaves_the_last_checkpoint_loadable() {
    let model = common::llama::load("base", DType::F32, false);
    let dir = temp_dir("sigkill");
    fs::create_dir_all(&dir).unwrap();
    let mut last_step = 0;
    // Three writers, each killed a different time after its first new checkpoint appears, and
    // each resuming from what the previous one left.
    for delay_ms in [0, 3, 11] {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "sigkill_child_saves_checkpoints_until_killed",
                "--test-threads=1",
            ])
            .env(CHILD_DIR_ENV, &dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        // By name only: the child may prune a checkpoint while it is being read.
        let latest_step = || {
            latest_checkpoint(&dir)
                .and_then(|p| {
                    p.file_name()?
                        .to_str()?
                        .strip_prefix("checkpoint-")?
                        .parse()
                        .ok()
                })
                .unwrap_or(0)
        };
        while latest_step() < last_step + 2 {
            assert!(Instant::now() < deadline, "the child wrote no checkpoint");
            assert!(child.try_wait().unwrap().is_none(), "the child exited");
            std::thread::sleep(Duration::from_millis(2));
        }
        std::thread::sleep(Duration::from_millis(delay_ms));
        // `Child::kill` is SIGKILL on Unix: no destructor, no flush, possibly mid-write.
        child.kill().unwrap();
        child.wait().unwrap();

        let latest = latest_checkpoint(&dir).expect("a complete checkpoint survives");
        let (trainer, state) = load_checkpoint(&latest, &model).unwrap();
        assert_eq!(latest, dir.join(format!("checkpoint-{}", state.step)));
        assert_eq!(trainer.steps(), state.step);
        assert!(state.step >= last_step + 2);
        last_step = state.step;
    }
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_optimizer_state_is_handed_to_the_loader_of_the_callers_choice() {
    // What a CUDA resume receives (`load_checkpoint_with` + `CudaAdamW::from_state`), checked on
    // the CPU: the settings, the update count and the host moments exactly as saved.
    let model = common::llama::load("base", DType::F32, false);
    let mut trainer = fresh_trainer(&model);
    train(&mut trainer, 0..2);
    let dir = temp_dir("handed");
    let path = save_checkpoint(&dir, &trainer, &train_state(2), 1).unwrap();
    let want = OptimizerState {
        config: *trainer.optimizer().adamw_config(),
        steps: 2,
        moments: trainer.optimizer().host_moments().unwrap(),
    };
    assert_eq!(
        want.moments.len(),
        7 * 2,
        "every adapted linear of two layers"
    );
    let mut seen = None;
    let (restored, _) = load_checkpoint_with(&path, &model, |s| {
        seen = Some(s.clone());
        CpuAdamW::from_state(s.config, s.steps, s.moments)
    })
    .unwrap();
    assert_eq!(seen.unwrap(), want);
    assert_eq!(restored.optimizer().host_moments().unwrap(), want.moments);
    // The loader's own error comes back unchanged.
    let err = load_checkpoint_with(&path, &model, |_| -> qlora::Result<CpuAdamW> {
        Err(Error::Cuda("no device".into()))
    })
    .err()
    .unwrap();
    assert!(matches!(err, Error::Cuda(_)), "{err}");
    fs::remove_dir_all(&dir).unwrap();
}

/// Rewrites `optimizer.safetensors` of checkpoint `path` with its `step` metadata set to `step`
/// and the tensor `from` (if any) renamed to `to` (or left out when `to` is empty).
fn rewrite_optimizer(path: &Path, step: &str, edit: Option<(&str, &str)>) {
    let file = path.join(OPTIMIZER_FILE);
    let bytes = fs::read(&file).unwrap();
    let tensors = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let kept: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .tensors()
        .into_iter()
        .filter_map(|(name, view)| match edit {
            Some((from, "")) if name == from => None,
            Some((from, to)) if name == from => Some((to.to_string(), view)),
            _ => Some((name, view)),
        })
        .collect();
    let metadata = std::collections::HashMap::from([
        ("format".to_string(), "pt".to_string()),
        ("step".to_string(), step.to_string()),
    ]);
    fs::write(&file, safetensors::serialize(kept, Some(metadata)).unwrap()).unwrap();
}

#[test]
fn a_wrong_step_or_a_missing_moment_fails_before_any_optimizer_is_built() {
    let model = common::llama::load("base", DType::F32, false);
    let mut trainer = fresh_trainer(&model);
    train(&mut trainer, 0..1);
    let dir = temp_dir("mutations");
    let path = save_checkpoint(&dir, &trainer, &train_state(1), 1).unwrap();
    let missing = "layers.1.self_attn.v_proj.lora_B.exp_avg_sq";
    // (step metadata, tensor renamed (to "" for removed), the error's words)
    type Mutation<'a> = (&'a str, Option<(&'a str, &'a str)>, &'a str);
    let cases: [Mutation<'_>; 4] = [
        ("2", None, "step 2, but trainer_state.json says 1"),
        ("one", None, "no integer `step`"),
        ("1", Some((missing, "")), "55 tensors, expected 56"),
        // The right count with one tensor renamed away is caught by name.
        (
            "1",
            Some((missing, "layers.1.self_attn.v_proj.lora_B.stray")),
            "no tensor `layers.1.self_attn.v_proj.lora_B.exp_avg_sq`",
        ),
    ];
    for (step, edit, want) in cases {
        let copy = dir.join("mutated");
        let _ = fs::remove_dir_all(&copy);
        fs::create_dir(&copy).unwrap();
        for entry in fs::read_dir(&path).unwrap() {
            let entry = entry.unwrap();
            fs::copy(entry.path(), copy.join(entry.file_name())).unwrap();
        }
        rewrite_optimizer(&copy, step, edit);
        let mut built = false;
        let err = load_checkpoint_with(&copy, &model, |s| {
            built = true;
            CpuAdamW::from_state(s.config, s.steps, s.moments)
        })
        .err()
        .unwrap();
        assert!(!built, "{step} {edit:?}: an optimizer was built");
        assert!(err.to_string().contains(want), "{step} {edit:?}: {err}");
    }
    // Untouched, the same directory loads.
    load_checkpoint(&path, &model).unwrap();
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn dropout_masks_follow_the_run_seed_and_resume_bit_identically() {
    let model = common::llama::load("base", DType::F32, false);
    let fresh = |seed| fresh_trainer_with_dropout(&model, 0.2).with_dropout_seed(seed);
    let mut straight = fresh(5);
    let straight_metrics = train(&mut straight, 0..4);
    // Another seed draws other masks; no dropout differs again.
    let other = train(&mut fresh(6), 0..4);
    let none = train(&mut fresh_trainer(&model), 0..4);
    assert_ne!(metric_bits(&other), metric_bits(&straight_metrics));
    assert_ne!(metric_bits(&none)[0], metric_bits(&straight_metrics)[0]);

    let dir = temp_dir("dropout-resume");
    let mut first = fresh(5);
    let mut metrics = train(&mut first, 0..2);
    let saved = save_checkpoint(&dir, &first, &train_state(2), 1).unwrap();
    let (second, _) = load_checkpoint(&saved, &model).unwrap();
    assert_eq!(second.adapter().config().dropout, 0.2);
    let mut second = second.with_dropout_seed(5);
    metrics.extend(train(&mut second, 2..4));
    assert_eq!(metric_bits(&metrics), metric_bits(&straight_metrics));
    assert_eq!(state_bits(&second), state_bits(&straight));
    fs::remove_dir_all(&dir).unwrap();
}
