//! Training on a CUDA device with the fused `CudaAdamW` against the CPU trainer, on the tiny f32
//! Llama fixture (tests/fixtures/llama/base) with an r = 4 adapter: a few steps on the GPU, a
//! checkpoint written there resumed on the CPU and on the GPU, and a CPU checkpoint resumed on the
//! GPU, all within `Op::TrainDevice` of the straight CPU run. Each test returns early without a GPU.
#![cfg(feature = "cuda")]

mod common;

use std::path::PathBuf;
use std::sync::Arc;

use candle_core::DType;
use qlora::kernels::adamw::AdamWConfig;
use qlora::kernels::cuda::CudaDevice;
use qlora::kernels::paged::{PagingMode, PagingPolicy};
use qlora::model::llama::{LlamaModel, IGNORE_INDEX};
use qlora::peft::{LoraAdapter, LoraConfig, TargetModule};
use qlora::tolerance::{lookup, Dtype, Op};
use qlora::train::checkpoint::{
    load_checkpoint, load_checkpoint_with, save_checkpoint, DataPosition, RngState, TrainState,
};
use qlora::train::cuda_adamw::CudaAdamW;
use qlora::train::data::{collate, Batch, Example};
use qlora::train::schedule::{LrSchedule, ScheduleKind};
use qlora::train::trainer::{
    CheckpointOptimizer, CpuAdamW, MomentMap, NonFinitePolicy, Optimizer, StepMetrics, Trainer,
    TrainerConfig,
};

const STEPS: u64 = 4;
const HALF: u64 = 2;

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("qlora-train-cuda-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn adamw() -> AdamWConfig {
    AdamWConfig {
        lr: 1e-3,
        weight_decay: 0.1,
        ..AdamWConfig::default()
    }
}

fn trainer_config() -> TrainerConfig {
    TrainerConfig {
        schedule: LrSchedule {
            kind: ScheduleKind::Cosine { num_cycles: 0.5 },
            warmup_steps: 1,
            total_steps: STEPS,
        },
        max_grad_norm: Some(1.0),
        non_finite: NonFinitePolicy::Error,
    }
}

/// The r = 4 adapter on every linear, seeded identically on any device.
fn adapter(model: &LlamaModel) -> LoraAdapter {
    let lora = LoraConfig {
        r: 4,
        alpha: 8.0,
        target_modules: TargetModule::ALL.to_vec(),
        ..LoraConfig::default()
    };
    LoraAdapter::init(lora, model.config(), DType::F32, model.device(), 7).unwrap()
}

/// Paging every state the policy may page (none of this adapter's is 100k elements, so they stay
/// on the device; the paged paths are tests/paged_adamw.rs's).
fn policy() -> PagingPolicy {
    PagingPolicy {
        mode: PagingMode::All,
        device_budget_bytes: 0,
        transport: None,
    }
}

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

/// The batch of update `step` (0-based), on the CPU (the model moves ids where it runs).
fn batch(step: u64) -> Batch {
    collate(&[example(2 * step, 9), example(2 * step + 1, 6)], 0).unwrap()
}

fn train<O: Optimizer>(
    trainer: &mut Trainer<'_, O>,
    steps: std::ops::Range<u64>,
) -> Vec<StepMetrics> {
    steps
        .map(|step| trainer.train_step(&[batch(step)]).unwrap())
        .collect()
}

use qlora::testing::values;

fn state(step: u64) -> TrainState {
    TrainState {
        step,
        data_position: DataPosition {
            epoch: 0,
            index: step,
        },
        rng_state: RngState {
            seed: 11,
            counter: 0,
        },
    }
}

/// Losses, then every A and B, then every moment, within `Op::TrainDevice` of `want`'s.
fn assert_close<O: CheckpointOptimizer, P: CheckpointOptimizer>(
    what: &str,
    got: (&[StepMetrics], &Trainer<'_, O>),
    want: (&[StepMetrics], &Trainer<'_, P>),
) {
    let tol = lookup(Op::TrainDevice, Dtype::F32);
    let losses = |m: &[StepMetrics]| m.iter().map(|m| m.loss).collect::<Vec<f32>>();
    tol.check(&losses(got.0), &losses(want.0))
        .unwrap_or_else(|e| panic!("{what}: losses: {e}"));
    let (got, want) = (got.1, want.1);
    assert_eq!(got.steps(), want.steps(), "{what}");
    for ((key, g), (_, w)) in got.adapter().pairs().zip(want.adapter().pairs()) {
        tol.check(&values(&g.a), &values(&w.a))
            .unwrap_or_else(|e| panic!("{what}: {key:?} A: {e}"));
        tol.check(&values(&g.b), &values(&w.b))
            .unwrap_or_else(|e| panic!("{what}: {key:?} B: {e}"));
    }
    let (gm, wm): (MomentMap, MomentMap) = (
        got.optimizer().host_moments().unwrap(),
        want.optimizer().host_moments().unwrap(),
    );
    assert_eq!(gm.keys().collect::<Vec<_>>(), wm.keys().collect::<Vec<_>>());
    for (key, g) in &gm {
        for j in 0..2 {
            tol.check(&g[j].m, &wm[key][j].m)
                .unwrap_or_else(|e| panic!("{what}: {key:?} m: {e}"));
            tol.check(&g[j].v, &wm[key][j].v)
                .unwrap_or_else(|e| panic!("{what}: {key:?} v: {e}"));
        }
    }
}

#[test]
fn cuda_training_checkpoints_resume_on_either_device() {
    let Some(gpu) = CudaDevice::first_available_candle() else {
        return;
    };
    let cpu_model = common::llama::load("base", DType::F32, false);
    let gpu_model = cpu_model.to_device(&gpu).unwrap();
    let dev = Arc::new(CudaDevice::from_candle(&gpu).unwrap());
    let cuda_adamw = || CudaAdamW::new(dev.clone(), adamw(), policy()).unwrap();
    let restore_cuda = |s: qlora::train::checkpoint::OptimizerState| {
        CudaAdamW::from_state(dev.clone(), s.config, policy(), s.steps, s.moments)
    };

    // The reference: every step on the CPU.
    let mut straight = Trainer::new(
        &cpu_model,
        adapter(&cpu_model),
        CpuAdamW::new(adamw()).unwrap(),
        trainer_config(),
    )
    .unwrap();
    let want = train(&mut straight, 0..STEPS);
    assert!(
        want[STEPS as usize - 1].loss < want[0].loss,
        "the run moves"
    );

    // Every step on the GPU.
    let mut on_gpu = Trainer::new(
        &gpu_model,
        adapter(&gpu_model),
        cuda_adamw(),
        trainer_config(),
    )
    .unwrap();
    assert!(on_gpu
        .adapter()
        .device()
        .is_some_and(|d| d.same_device(&gpu)));
    let mut gpu_metrics = train(&mut on_gpu, 0..HALF);
    let dir = temp_dir("resume");
    let saved = save_checkpoint(&dir, &on_gpu, &state(HALF), 2).unwrap();
    gpu_metrics.extend(train(&mut on_gpu, HALF..STEPS));
    assert_close(
        "straight on the GPU",
        (&gpu_metrics, &on_gpu),
        (&want, &straight),
    );

    // The GPU's checkpoint, resumed on the CPU.
    let (mut cpu_resumed, resumed_state) = load_checkpoint(&saved, &cpu_model).unwrap();
    assert_eq!(resumed_state, state(HALF));
    let mut metrics = gpu_metrics[..HALF as usize].to_vec();
    metrics.extend(train(&mut cpu_resumed, HALF..STEPS));
    assert_close(
        "GPU checkpoint on the CPU",
        (&metrics, &cpu_resumed),
        (&want, &straight),
    );

    // The GPU's checkpoint, resumed on the GPU: the moments go back to the device.
    let (mut gpu_resumed, _) = load_checkpoint_with(&saved, &gpu_model, restore_cuda).unwrap();
    assert!(gpu_resumed
        .adapter()
        .device()
        .is_some_and(|d| d.same_device(&gpu)));
    let mut metrics = gpu_metrics[..HALF as usize].to_vec();
    metrics.extend(train(&mut gpu_resumed, HALF..STEPS));
    assert_close(
        "GPU checkpoint on the GPU",
        (&metrics, &gpu_resumed),
        (&want, &straight),
    );

    // A CPU checkpoint, resumed on the GPU.
    let mut first_half = Trainer::new(
        &cpu_model,
        adapter(&cpu_model),
        CpuAdamW::new(adamw()).unwrap(),
        trainer_config(),
    )
    .unwrap();
    let mut metrics = train(&mut first_half, 0..HALF);
    let cpu_dir = temp_dir("from-cpu");
    let saved = save_checkpoint(&cpu_dir, &first_half, &state(HALF), 1).unwrap();
    let (mut from_cpu, _) = load_checkpoint_with(&saved, &gpu_model, restore_cuda).unwrap();
    metrics.extend(train(&mut from_cpu, HALF..STEPS));
    assert_close(
        "CPU checkpoint on the GPU",
        (&metrics, &from_cpu),
        (&want, &straight),
    );

    std::fs::remove_dir_all(&dir).unwrap();
    std::fs::remove_dir_all(&cpu_dir).unwrap();
}
