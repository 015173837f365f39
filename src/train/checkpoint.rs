//! Training checkpoints: `dir/checkpoint-{step}/` holds the PEFT adapter, the AdamW moments
//! (`[n]` f32 m and v per LoRA tensor) with the update count, and `trainer_state.json` (schedule,
//! hyperparameters, data position, RNG state), so that a resumed run is bit-identical. The files
//! do not depend on where the optimizer ran: a checkpoint of `CudaAdamW` resumes on the CPU and back.
//!
//! Every file is written to a temporary name, synced and renamed; the directory is filled as
//! `checkpoint-{step}.tmp`, synced, and renamed to its final name, so a crash at any point leaves
//! either a complete checkpoint or a `.tmp` directory that loading ignores and saving removes.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::kernels::adamw::AdamWConfig;
use crate::model::llama::LlamaModel;
use crate::peft::lora::{write_atomic, ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE};
use crate::peft::{LoraAdapter, TargetModule};
use crate::train::schedule::{LrSchedule, ScheduleKind};
use crate::train::trainer::{
    lora_tensor_name, CheckpointOptimizer, CpuAdamW, MomentMap, Moments, NonFinitePolicy, Trainer,
    TrainerConfig,
};
use crate::{Error, Result};

/// The version of this layout; loading refuses any other.
pub const CHECKPOINT_FORMAT_VERSION: u32 = 1;
/// AdamW moments: `{name}.exp_avg` and `{name}.exp_avg_sq` (f32 `[n]`) per LoRA tensor, named
/// by [`lora_tensor_name`]; the update count is the `step` metadata entry.
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// Everything but tensors, as JSON.
pub const TRAINER_STATE_FILE: &str = "trainer_state.json";

const CHECKPOINT_PREFIX: &str = "checkpoint-";
const TMP_SUFFIX: &str = ".tmp";

/// Where the data loader stands: the next example is `index` of epoch `epoch`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataPosition {
    pub epoch: u64,
    pub index: u64,
}

/// The run's random streams: every draw (shuffling, dropout masks) derives from `seed` and the
/// number of draws `counter` taken so far, so these two numbers resume them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RngState {
    pub seed: u64,
    pub counter: u64,
}

/// The loop's state beside the trainer's.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrainState {
    /// The loop's step (names the directory `checkpoint-{step}`).
    pub step: u64,
    pub data_position: DataPosition,
    pub rng_state: RngState,
}

/// `trainer_state.json`. f64 values are strings in Rust's shortest round-trip form: serde_json
/// (without `float_roundtrip`) may parse a number one ulp off, and resume must be bit-identical.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StateFile {
    format_version: u32,
    step: u64,
    optimizer_steps: u64,
    skipped_batches: u64,
    base_lr: String,
    betas: [String; 2],
    eps: String,
    weight_decay: String,
    schedule: ScheduleFile,
    max_grad_norm: Option<String>,
    non_finite: NonFiniteFile,
    data_position: DataPosition,
    rng_state: RngState,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ScheduleFile {
    kind: ScheduleKindFile,
    /// Cosine only.
    num_cycles: Option<String>,
    warmup_steps: u64,
    total_steps: u64,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum ScheduleKindFile {
    Constant,
    Linear,
    Cosine,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum NonFiniteFile {
    Error,
    SkipBatch,
}

fn bad(path: &Path, reason: impl Into<String>) -> Error {
    Error::TrainingCheckpoint {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

fn float(x: f64) -> String {
    format!("{x:?}")
}

fn parse_float(path: &Path, field: &str, text: &str) -> Result<f64> {
    text.parse()
        .map_err(|e| bad(path, format!("`{field}` = {text:?}: {e}")))
}

fn checkpoint_name(step: u64) -> String {
    format!("{CHECKPOINT_PREFIX}{step}")
}

/// The step of a final (not `.tmp`) checkpoint directory name.
fn checkpoint_step(name: &str) -> Option<u64> {
    let digits = name.strip_prefix(CHECKPOINT_PREFIX)?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// `(name, path)` of every entry of `dir` whose name starts with `checkpoint-`.
fn checkpoint_entries(dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    let entries = fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        if let Some(name) = entry.file_name().to_str() {
            if name.starts_with(CHECKPOINT_PREFIX) {
                found.push((name.to_string(), entry.path()));
            }
        }
    }
    Ok(found)
}

fn sync_dir(dir: &Path) -> Result<()> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(dir, e))
}

/// Writes `dir/checkpoint-{state.step}/` for `trainer` and `state`, then removes all but the
/// newest `keep_last` checkpoints of `dir` (created if missing). Stale `.tmp` directories of
/// interrupted saves are removed first; a checkpoint of the same step is replaced.
pub fn save_checkpoint<O: CheckpointOptimizer>(
    dir: impl AsRef<Path>,
    trainer: &Trainer<'_, O>,
    state: &TrainState,
    keep_last: usize,
) -> Result<PathBuf> {
    let dir = dir.as_ref();
    if keep_last == 0 {
        return Err(Error::invalid(
            "save_checkpoint",
            "keep_last must be at least 1 (the checkpoint being written)",
        ));
    }
    fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    for (name, path) in checkpoint_entries(dir)? {
        if name.ends_with(TMP_SUFFIX) {
            fs::remove_dir_all(&path).map_err(|e| Error::io(&path, e))?;
        }
    }

    let name = checkpoint_name(state.step);
    let tmp = dir.join(format!("{name}{TMP_SUFFIX}"));
    fs::create_dir(&tmp).map_err(|e| Error::io(&tmp, e))?;
    trainer.adapter().save_pretrained(&tmp)?;
    let optimizer = trainer.optimizer();
    let bytes = optimizer_bytes(&optimizer.host_moments()?, optimizer.steps())?;
    write_atomic(&tmp, OPTIMIZER_FILE, &bytes)?;
    let json = serde_json::to_string_pretty(&state_file(trainer, state))
        .map_err(|e| Error::encode(TRAINER_STATE_FILE, e))?;
    write_atomic(&tmp, TRAINER_STATE_FILE, json.as_bytes())?;
    sync_dir(&tmp)?;

    let path = dir.join(&name);
    if path.exists() {
        fs::remove_dir_all(&path).map_err(|e| Error::io(&path, e))?;
    }
    fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e))?;
    sync_dir(dir)?;
    prune(dir, keep_last)?;
    Ok(path)
}

/// Removes all but the newest `keep_last` final checkpoints, each renamed to `.tmp` first so
/// that a crash part-way leaves a directory loading ignores, never a half-deleted checkpoint.
fn prune(dir: &Path, keep_last: usize) -> Result<()> {
    let mut steps: Vec<(u64, PathBuf)> = checkpoint_entries(dir)?
        .into_iter()
        .filter_map(|(name, path)| checkpoint_step(&name).map(|step| (step, path)))
        .collect();
    steps.sort_unstable_by_key(|&(step, _)| step);
    let excess = steps.len().saturating_sub(keep_last);
    for (step, path) in steps.into_iter().take(excess) {
        let doomed = dir.join(format!("{}{TMP_SUFFIX}", checkpoint_name(step)));
        fs::rename(&path, &doomed).map_err(|e| Error::io(&path, e))?;
        fs::remove_dir_all(&doomed).map_err(|e| Error::io(&doomed, e))?;
    }
    if excess > 0 {
        sync_dir(dir)?;
    }
    Ok(())
}

fn state_file<O: CheckpointOptimizer>(trainer: &Trainer<'_, O>, state: &TrainState) -> StateFile {
    let adamw = trainer.optimizer().adamw_config();
    let config = trainer.config();
    let (kind, num_cycles) = match config.schedule.kind {
        ScheduleKind::Constant => (ScheduleKindFile::Constant, None),
        ScheduleKind::Linear => (ScheduleKindFile::Linear, None),
        ScheduleKind::Cosine { num_cycles } => (ScheduleKindFile::Cosine, Some(float(num_cycles))),
    };
    StateFile {
        format_version: CHECKPOINT_FORMAT_VERSION,
        step: state.step,
        optimizer_steps: trainer.steps(),
        skipped_batches: trainer.skipped_batches(),
        base_lr: float(adamw.lr),
        betas: [float(adamw.betas.0), float(adamw.betas.1)],
        eps: float(adamw.eps),
        weight_decay: float(adamw.weight_decay),
        schedule: ScheduleFile {
            kind,
            num_cycles,
            warmup_steps: config.schedule.warmup_steps,
            total_steps: config.schedule.total_steps,
        },
        max_grad_norm: config.max_grad_norm.map(float),
        non_finite: match config.non_finite {
            NonFinitePolicy::Error => NonFiniteFile::Error,
            NonFinitePolicy::SkipBatch => NonFiniteFile::SkipBatch,
        },
        data_position: state.data_position,
        rng_state: state.rng_state,
    }
}

fn moment_keys(layer: usize, module: TargetModule, matrix: &str) -> [String; 2] {
    let name = lora_tensor_name(layer, module, matrix);
    [format!("{name}.exp_avg"), format!("{name}.exp_avg_sq")]
}

fn optimizer_bytes(moments: &MomentMap, steps: u64) -> Result<Vec<u8>> {
    let mut tensors = Vec::new();
    for (&(layer, module), pair) in moments {
        for (matrix, state) in ["A", "B"].into_iter().zip(pair) {
            let [m_key, v_key] = moment_keys(layer, module, matrix);
            for (key, values) in [(m_key, &state.m), (v_key, &state.v)] {
                let bytes: Vec<u8> = values.iter().flat_map(|x| x.to_le_bytes()).collect();
                tensors.push((key, values.len(), bytes));
            }
        }
    }
    let views = tensors
        .iter()
        .map(|(key, n, bytes)| {
            let view =
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![*n], bytes)
                    .map_err(|e| Error::encode(key.as_str(), e))?;
            Ok((key.as_str(), view))
        })
        .collect::<Result<Vec<_>>>()?;
    let metadata = HashMap::from([
        ("format".to_string(), "pt".to_string()),
        ("step".to_string(), steps.to_string()),
    ]);
    crate::hf::file::serialize_safetensors(OPTIMIZER_FILE, views, Some(metadata))
}

/// The newest complete checkpoint in `dir`: a final `checkpoint-{step}` directory holding every
/// file, whose `trainer_state.json` parses and names the same step. `.tmp` directories, other
/// entries and a missing `dir` are ignored.
pub fn latest_checkpoint(dir: impl AsRef<Path>) -> Option<PathBuf> {
    find_latest_checkpoint(dir).0
}

/// A `checkpoint-{step}` folder newer than the one a resume takes, and why it was passed over.
#[derive(Clone, Debug, PartialEq)]
pub struct SkippedCheckpoint {
    pub path: PathBuf,
    pub reason: String,
}

/// [`latest_checkpoint`], with every newer final-named folder it passed over and why (a file
/// missing, a trainer state that does not parse or names another step), for the resume to tell
/// the user.
pub fn find_latest_checkpoint(dir: impl AsRef<Path>) -> (Option<PathBuf>, Vec<SkippedCheckpoint>) {
    let Ok(entries) = checkpoint_entries(dir.as_ref()) else {
        return (None, Vec::new());
    };
    let mut found: Vec<(u64, PathBuf)> = entries
        .into_iter()
        .filter_map(|(name, path)| checkpoint_step(&name).map(|step| (step, path)))
        .collect();
    found.sort_unstable_by_key(|&(step, _)| std::cmp::Reverse(step));
    let mut skipped = Vec::new();
    for (step, path) in found {
        match check_complete(&path, step) {
            Ok(()) => return (Some(path), skipped),
            Err(reason) => skipped.push(SkippedCheckpoint { path, reason }),
        }
    }
    (None, skipped)
}

/// Why the folder `path` is not a complete checkpoint of `step`, if it is not.
fn check_complete(path: &Path, step: u64) -> std::result::Result<(), String> {
    let files = [
        ADAPTER_CONFIG_FILE,
        ADAPTER_WEIGHTS_FILE,
        OPTIMIZER_FILE,
        TRAINER_STATE_FILE,
    ];
    if let Some(f) = files.iter().find(|f| !path.join(f).is_file()) {
        return Err(format!("{f} is missing"));
    }
    match read_state_file(path) {
        Ok(state) if state.step == step => Ok(()),
        Ok(state) => Err(format!("{TRAINER_STATE_FILE} names step {}", state.step)),
        Err(e) => Err(e.to_string()),
    }
}

fn read_state_file(path: &Path) -> Result<StateFile> {
    let file = path.join(TRAINER_STATE_FILE);
    let text = fs::read_to_string(&file).map_err(|e| Error::io(&file, e))?;
    let state: StateFile =
        serde_json::from_str(&text).map_err(|e| bad(&file, format!("malformed: {e}")))?;
    if state.format_version != CHECKPOINT_FORMAT_VERSION {
        return Err(bad(
            &file,
            format!(
                "format version {} (this build reads {CHECKPOINT_FORMAT_VERSION})",
                state.format_version
            ),
        ));
    }
    Ok(state)
}

/// The optimizer a checkpoint holds, on the host: settings, update count and moments (empty
/// before the first update). Which optimizer it becomes is the loader's choice, so a checkpoint
/// written on the CPU resumes on a GPU and back.
#[derive(Clone, Debug, PartialEq)]
pub struct OptimizerState {
    pub config: AdamWConfig,
    pub steps: u64,
    pub moments: MomentMap,
}

/// Restores the trainer (adapter, AdamW moments and update count, schedule position, settings)
/// and the loop's state from the checkpoint directory `path`, on `model`'s device, with the CPU
/// optimizer.
pub fn load_checkpoint<'m>(
    path: impl AsRef<Path>,
    model: &'m LlamaModel,
) -> Result<(Trainer<'m, CpuAdamW>, TrainState)> {
    load_checkpoint_with(path, model, |s| {
        CpuAdamW::from_state(s.config, s.steps, s.moments)
    })
}

/// [`load_checkpoint`] with the optimizer `make` builds from the checkpoint's
/// [`OptimizerState`] (e.g. `CudaAdamW::from_state` for a model on a GPU; the adapter is loaded
/// onto the model's device).
pub fn load_checkpoint_with<'m, O: CheckpointOptimizer>(
    path: impl AsRef<Path>,
    model: &'m LlamaModel,
    make: impl FnOnce(OptimizerState) -> Result<O>,
) -> Result<(Trainer<'m, O>, TrainState)> {
    let path = path.as_ref();
    let file = read_state_file(path)?;
    let state_path = path.join(TRAINER_STATE_FILE);
    let f = |field: &str, text: &str| parse_float(&state_path, field, text);

    let adamw = AdamWConfig {
        lr: f("base_lr", &file.base_lr)?,
        betas: (f("betas", &file.betas[0])?, f("betas", &file.betas[1])?),
        eps: f("eps", &file.eps)?,
        weight_decay: f("weight_decay", &file.weight_decay)?,
    };
    let kind = match (file.schedule.kind, &file.schedule.num_cycles) {
        (ScheduleKindFile::Constant, None) => ScheduleKind::Constant,
        (ScheduleKindFile::Linear, None) => ScheduleKind::Linear,
        (ScheduleKindFile::Cosine, Some(cycles)) => ScheduleKind::Cosine {
            num_cycles: f("num_cycles", cycles)?,
        },
        (kind, cycles) => {
            return Err(bad(
                &state_path,
                format!("schedule {kind:?} with num_cycles {cycles:?}"),
            ))
        }
    };
    let config = TrainerConfig {
        schedule: LrSchedule {
            kind,
            warmup_steps: file.schedule.warmup_steps,
            total_steps: file.schedule.total_steps,
        },
        max_grad_norm: file
            .max_grad_norm
            .as_deref()
            .map(|text| f("max_grad_norm", text))
            .transpose()?,
        non_finite: match file.non_finite {
            NonFiniteFile::Error => NonFinitePolicy::Error,
            NonFiniteFile::SkipBatch => NonFinitePolicy::SkipBatch,
        },
    };
    // Settings the optimizer or trainer would refuse are the state file's fault: say so.
    adamw
        .validate()
        .and_then(|()| config.validate())
        .map_err(|e| bad(&state_path, e.to_string()))?;

    let adapter = LoraAdapter::load_pretrained(path, model.device())?;
    let optimizer = make(read_optimizer(path, &adapter, adamw, file.optimizer_steps)?)?;
    let trainer =
        Trainer::new(model, adapter, optimizer, config)?.with_skipped_batches(file.skipped_batches);
    let state = TrainState {
        step: file.step,
        data_position: file.data_position,
        rng_state: file.rng_state,
    };
    Ok((trainer, state))
}

/// The optimizer of `optimizer.safetensors`: its `step` must equal `steps`, and it holds m and v
/// for every tensor of `adapter`, shaped as it (or none at all before the first update).
fn read_optimizer(
    dir: &Path,
    adapter: &LoraAdapter,
    config: AdamWConfig,
    steps: u64,
) -> Result<OptimizerState> {
    let path = dir.join(OPTIMIZER_FILE);
    let bytes = fs::read(&path).map_err(|e| Error::io(&path, e))?;
    let tensors = crate::hf::file::read_safetensors(&path, &bytes)?;
    let (_, metadata) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| crate::hf::file::corrupt_safetensors(&path, &bytes, e))?;
    let file_steps = metadata
        .metadata()
        .as_ref()
        .and_then(|m| m.get("step"))
        .and_then(|s| s.parse::<u64>().ok())
        .ok_or_else(|| bad(&path, "no integer `step` in the metadata"))?;
    if file_steps != steps {
        return Err(bad(
            &path,
            format!("step {file_steps}, but {TRAINER_STATE_FILE} says {steps}"),
        ));
    }
    let expected = 4 * adapter.pairs().count();
    if tensors.len() != expected && !(tensors.is_empty() && steps == 0) {
        return Err(bad(
            &path,
            format!(
                "{} tensors, expected {expected} (m and v of each A and B)",
                tensors.len()
            ),
        ));
    }
    let mut moments = BTreeMap::new();
    if !tensors.is_empty() {
        for ((layer, module), pair) in adapter.pairs() {
            let read = |matrix: &str, n: usize| -> Result<Moments> {
                let [m_key, v_key] = moment_keys(layer, module, matrix);
                Ok(Moments {
                    m: read_f32(&path, &tensors, &m_key, n)?,
                    v: read_f32(&path, &tensors, &v_key, n)?,
                })
            };
            let a = read("A", pair.a.elem_count())?;
            let b = read("B", pair.b.elem_count())?;
            moments.insert((layer, module), [a, b]);
        }
    }
    Ok(OptimizerState {
        config,
        steps,
        moments,
    })
}

/// The f32 `[n]` tensor `key`.
fn read_f32(
    path: &Path,
    tensors: &safetensors::SafeTensors<'_>,
    key: &str,
    n: usize,
) -> Result<Vec<f32>> {
    let view = tensors
        .tensor(key)
        .map_err(|_| bad(path, format!("no tensor `{key}`")))?;
    if view.dtype() != safetensors::Dtype::F32 || view.shape() != [n] {
        return Err(bad(
            path,
            format!(
                "`{key}` is {:?} {:?}, expected F32 [{n}]",
                view.dtype(),
                view.shape()
            ),
        ));
    }
    Ok(view
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}
