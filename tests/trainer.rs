//! The CPU training step (`qlora::train::trainer`, `qlora::train::schedule`) on the tiny f32 Llama
//! fixture (tests/fixtures/llama/base): schedules against transformers' values, gradient
//! accumulation over the total label-token count, clipping, the NaN/Inf check, determinism and a
//! short overfit run.

mod common;

use common::llama::seeded;

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use qlora::kernels::adamw::{reference_step, AdamWConfig};
use qlora::model::backward::LoraGrads;
use qlora::model::llama::{LlamaModel, IGNORE_INDEX};
use qlora::peft::{LoraAdapter, LoraConfig, LoraPair, TargetModule};
use qlora::tolerance::{lookup, Dtype, Op};
use qlora::train::data::{collate, Example};
use qlora::train::schedule::{LrSchedule, ScheduleKind};
use qlora::train::trainer::{
    accumulate_gradients, check_finite_grad_norm, CpuAdamW, NonFinitePolicy, Optimizer, Trainer,
    TrainerConfig,
};
use qlora::Error;

/// r = 4, alpha = 8 on every target, PEFT-initialised A (seed `seed`); B seeded non-zero when
/// `nonzero_b` so that dA is not zero either.
fn adapter(model: &LlamaModel, seed: u64, nonzero_b: bool) -> LoraAdapter {
    let config = LoraConfig {
        r: 4,
        alpha: 8.0,
        target_modules: TargetModule::ALL.to_vec(),
        ..LoraConfig::default()
    };
    let mut adapter =
        LoraAdapter::init(config, model.config(), DType::F32, &Device::Cpu, seed).unwrap();
    if nonzero_b {
        let pairs: Vec<_> = adapter.pairs().map(|(k, p)| (k, p.clone())).collect();
        for ((layer, module), pair) in pairs {
            let b = seeded((layer * 16 + module as usize) as u64, pair.b.dims(), 0.2);
            adapter
                .set_pair(layer, module, LoraPair { a: pair.a, b })
                .unwrap();
        }
    }
    adapter
}

/// `len` pseudo-random ids below the fixture's vocab (200); the last `labelled` are labels.
fn example(seed: u64, len: usize, labelled: usize) -> Example {
    let input_ids: Vec<u32> = (0..len as u64)
        .map(|i| ((i * 37 + seed * 101 + 11) % 197 + 3) as u32)
        .collect();
    let labels = input_ids
        .iter()
        .enumerate()
        .map(|(i, &id)| {
            if i + labelled >= len {
                id as i64
            } else {
                IGNORE_INDEX
            }
        })
        .collect();
    Example { input_ids, labels }
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

fn adamw(lr: f64) -> CpuAdamW {
    CpuAdamW::new(AdamWConfig {
        lr,
        ..AdamWConfig::default()
    })
    .unwrap()
}

fn config(max_grad_norm: Option<f64>) -> TrainerConfig {
    TrainerConfig {
        schedule: LrSchedule::CONSTANT,
        max_grad_norm,
        non_finite: NonFinitePolicy::Error,
    }
}

/// Keeps the gradients and scale it is given instead of updating anything.
#[derive(Default)]
struct Recorder {
    calls: Vec<(LoraGrads, f64, f32)>,
}

impl Optimizer for Recorder {
    fn base_lr(&self) -> f64 {
        0.5
    }

    fn steps(&self) -> u64 {
        self.calls.len() as u64
    }

    fn step(
        &mut self,
        _adapter: &mut LoraAdapter,
        grads: &LoraGrads,
        lr: f64,
        grad_scale: f32,
    ) -> qlora::Result<()> {
        self.calls.push((grads.clone(), lr, grad_scale));
        Ok(())
    }
}

/// Values printed by transformers' `_get_*_schedule_with_warmup_lr_lambda` (the module's last
/// cosine definition, min_lr_rate 0) for the same arguments.
#[test]
fn schedules_match_transformers_lambdas() {
    let linear = LrSchedule {
        kind: ScheduleKind::Linear,
        warmup_steps: 3,
        total_steps: 10,
    };
    let got: Vec<f64> = [0, 1, 2, 3, 4, 7, 10, 12]
        .map(|s| linear.factor(s))
        .to_vec();
    let want = [
        0.0,
        0.3333333333333333,
        0.6666666666666666,
        1.0,
        0.8571428571428571,
        0.42857142857142855,
        0.0,
        0.0,
    ];
    assert_eq!(got, want, "linear, warmup 3 of 10");

    let cosine = LrSchedule {
        kind: ScheduleKind::Cosine { num_cycles: 0.5 },
        warmup_steps: 3,
        total_steps: 10,
    };
    let got: Vec<f64> = [0, 1, 3, 4, 5, 7, 9, 10, 12]
        .map(|s| cosine.factor(s))
        .to_vec();
    // Past total_steps the half-wave turns back up: transformers does not clamp progress.
    let want = [
        0.0,
        0.3333333333333333,
        1.0,
        0.9504844339512095,
        0.8117449009293668,
        0.38873953302184283,
        0.04951556604879048,
        0.0,
        0.18825509907063315,
    ];
    assert_eq!(got, want, "cosine, warmup 3 of 10");

    let full_cycle = LrSchedule {
        kind: ScheduleKind::Cosine { num_cycles: 1.0 },
        warmup_steps: 0,
        total_steps: 8,
    };
    let got: Vec<f64> = [0, 2, 4, 6, 8].map(|s| full_cycle.factor(s)).to_vec();
    assert_eq!(
        got,
        [1.0, 0.5, 0.0, 0.4999999999999999, 1.0],
        "cosine, 1 cycle"
    );

    let constant = LrSchedule {
        kind: ScheduleKind::Constant,
        warmup_steps: 3,
        total_steps: 0,
    };
    let got: Vec<f64> = [0, 1, 3, 50].map(|s| constant.factor(s)).to_vec();
    assert_eq!(
        got,
        [0.0, 0.3333333333333333, 1.0, 1.0],
        "constant, warmup 3"
    );

    // warmup longer than training: the max(1, total - warmup) guard.
    let odd = LrSchedule {
        kind: ScheduleKind::Linear,
        warmup_steps: 10,
        total_steps: 4,
    };
    assert_eq!((odd.factor(5), odd.factor(12)), (0.5, 0.0));
    assert_eq!(linear.lr(2e-4, 1), 2e-4 * 0.3333333333333333);
    assert_eq!(LrSchedule::CONSTANT.factor(0), 1.0);
}

/// Micro-batches of 3 and 9 predicted labels accumulate to the gradient of the one batch holding
/// all three rows; the mean of the per-micro-batch means (the pre-2024 transformers bug) does not.
#[test]
fn accumulation_normalises_by_total_label_tokens() {
    let model = common::llama::load("base", DType::F32, false);
    let adapter = adapter(&model, 3, true);
    let (e1, e2, e3) = (example(1, 6, 3), example(2, 9, 6), example(3, 12, 3));
    let micro = [
        collate(std::slice::from_ref(&e1), 0).unwrap(),
        collate(&[e2.clone(), e3.clone()], 0).unwrap(),
    ];
    let whole = collate(&[e1, e2, e3], 0).unwrap();

    let acc = accumulate_gradients(&model, &adapter, &micro).unwrap();
    let one = accumulate_gradients(&model, &adapter, std::slice::from_ref(&whole)).unwrap();
    assert_eq!((acc.label_tokens, one.label_tokens), (12, 12));
    assert_eq!((acc.tokens, one.tokens), (27, 27));
    let loss_tol = lookup(Op::LlamaLogits, Dtype::F32);
    loss_tol.check(&[acc.loss], &[one.loss]).unwrap();

    let separate: Vec<_> = micro
        .iter()
        .map(|b| accumulate_gradients(&model, &adapter, std::slice::from_ref(b)).unwrap())
        .collect();
    assert_eq!((separate[0].label_tokens, separate[1].label_tokens), (3, 9));

    let tol = lookup(Op::LoraGrad, Dtype::F32);
    assert_eq!(acc.grads.len(), 14);
    let mut mean_of_means_caught = false;
    for (key, want) in &one.grads {
        let got = &acc.grads[key];
        for (g, w, matrix) in [(&got.a, &want.a, "A"), (&got.b, &want.b, "B")] {
            tol.check(&flat(g), &flat(w))
                .unwrap_or_else(|m| panic!("{key:?} {matrix}: {m}"));
        }
        let naive =
            ((&separate[0].grads[key].b + &separate[1].grads[key].b).unwrap() * 0.5).unwrap();
        mean_of_means_caught |= tol.check(&flat(&naive), &flat(&want.b)).is_err();
    }
    assert!(
        mean_of_means_caught,
        "the per-micro-batch-mean gradient should differ"
    );
}

/// The trainer hands the optimizer the unclipped gradients and a grad scale that brings the
/// global norm to at most max_norm without turning them; below max_norm the scale is 1.
#[test]
fn clipping_scales_to_max_norm_and_keeps_direction() {
    let model = common::llama::load("base", DType::F32, false);
    let batch = collate(&[example(4, 10, 7), example(5, 8, 5)], 0).unwrap();
    let adapter = adapter(&model, 5, true);
    let acc = accumulate_gradients(&model, &adapter, std::slice::from_ref(&batch)).unwrap();
    let norm = check_finite_grad_norm(1, acc.loss, &acc.grads).unwrap();
    assert!(norm > 0.0);

    let max_norm = norm / 4.0;
    let mut trainer = Trainer::new(
        &model,
        adapter.clone(),
        Recorder::default(),
        config(Some(max_norm)),
    )
    .unwrap();
    let metrics = trainer.train_step(std::slice::from_ref(&batch)).unwrap();
    assert_eq!(
        metrics.grad_norm, norm,
        "grad_norm is the norm before clipping"
    );
    assert_eq!(metrics.lr, 0.5);
    let (grads, _, scale) = &trainer.optimizer().calls[0];
    assert!(*scale > 0.0 && *scale < 1.0, "scale {scale}");
    let mut clipped_sq = 0f64;
    for (key, pair) in grads {
        for (got, want) in [(&pair.a, &acc.grads[key].a), (&pair.b, &acc.grads[key].b)] {
            let (got, want) = (flat(got), flat(want));
            assert_eq!(got, want, "{key:?}: the optimizer gets the raw gradient");
            clipped_sq += got
                .iter()
                .map(|&g| (g as f64 * *scale as f64).powi(2))
                .sum::<f64>();
        }
    }
    let clipped = clipped_sq.sqrt();
    assert!(
        clipped <= max_norm * (1.0 + 1e-6) && clipped >= max_norm * (1.0 - 1e-5),
        "clipped norm {clipped}, max {max_norm}"
    );

    let mut loose = Trainer::new(
        &model,
        adapter,
        Recorder::default(),
        config(Some(norm * 2.0)),
    )
    .unwrap();
    loose.train_step(std::slice::from_ref(&batch)).unwrap();
    assert_eq!(loose.optimizer().calls[0].2, 1.0);
}

/// A NaN gradient is reported with the step, the layer and the tensor's PEFT-style name.
#[test]
fn non_finite_gradient_names_step_layer_and_tensor() {
    let model = common::llama::load("base", DType::F32, false);
    let adapter = adapter(&model, 1, false);
    let mut grads = LoraGrads::new();
    for ((layer, module), pair) in adapter.pairs() {
        let mut b = vec![0.25f32; pair.b.elem_count()];
        if (layer, module) == (1, TargetModule::DownProj) {
            b[5] = f32::NAN;
        }
        let b = Tensor::from_vec(b, pair.b.dims(), &Device::Cpu).unwrap();
        grads.insert(
            (layer, module),
            LoraPair {
                a: pair.a.clone(),
                b,
            },
        );
    }
    let err = check_finite_grad_norm(3, 1.5, &grads).unwrap_err();
    let message = err.to_string();
    assert!(
        message.contains("step 3") && message.contains("layers.1.mlp.down_proj.lora_B"),
        "{message}"
    );
    assert!(
        matches!(
            err,
            Error::NonFinite {
                step: 3,
                layer: Some(1),
                ..
            }
        ),
        "{err:?}"
    );
    let loss_err = check_finite_grad_norm(7, f32::INFINITY, &grads).unwrap_err();
    assert!(
        matches!(
            loss_err,
            Error::NonFinite {
                step: 7,
                layer: None,
                ..
            }
        ),
        "{loss_err:?}"
    );
}

/// A NaN in the adapter makes the loss NaN: an error by default, a counted skip that leaves the
/// adapter and the optimizer untouched under `SkipBatch`.
#[test]
fn non_finite_loss_errors_or_skips_the_batch() {
    let model = common::llama::load("base", DType::F32, false);
    let mut poisoned = adapter(&model, 2, false);
    let pair = poisoned.pair(0, TargetModule::VProj).unwrap().clone();
    let mut b = flat(&pair.b);
    b[0] = f32::NAN;
    let b = Tensor::from_vec(b, pair.b.dims(), &Device::Cpu).unwrap();
    poisoned
        .set_pair(0, TargetModule::VProj, LoraPair { a: pair.a, b })
        .unwrap();
    let batch = collate(&[example(6, 8, 4)], 0).unwrap();

    let mut strict = Trainer::new(&model, poisoned.clone(), adamw(1e-3), config(None)).unwrap();
    let err = strict.train_step(std::slice::from_ref(&batch)).unwrap_err();
    // The loss is NaN; the error names where the forward first went non-finite: layer 0's
    // attention output (its v_proj adapter holds the NaN).
    match &err {
        qlora::Error::NonFinite {
            step,
            layer,
            tensor,
            ..
        } => {
            assert_eq!((*step, *layer), (1, Some(0)), "{err}");
            assert!(tensor.contains("layers.0.self_attn output"), "{err}");
        }
        other => panic!("expected NonFinite, got {other}"),
    }

    let skipping = TrainerConfig {
        non_finite: NonFinitePolicy::SkipBatch,
        ..config(None)
    };
    let mut lenient = Trainer::new(&model, poisoned.clone(), adamw(1e-3), skipping).unwrap();
    let metrics = lenient.train_step(std::slice::from_ref(&batch)).unwrap();
    assert!(metrics.skipped && metrics.loss.is_nan());
    assert_eq!((lenient.skipped_batches(), lenient.steps()), (1, 0));
    let a_before = flat(&poisoned.pair(1, TargetModule::QProj).unwrap().a);
    let a_after = flat(&lenient.adapter().pair(1, TargetModule::QProj).unwrap().a);
    assert_eq!(a_before, a_after);
}

fn run_losses(model: &LlamaModel, steps: usize) -> (Vec<f32>, LoraAdapter) {
    let batches = [
        collate(&[example(7, 12, 8), example(8, 9, 4)], 0).unwrap(),
        collate(&[example(9, 11, 6)], 0).unwrap(),
    ];
    let schedule = LrSchedule {
        kind: ScheduleKind::Cosine { num_cycles: 0.5 },
        warmup_steps: 1,
        total_steps: steps as u64,
    };
    let config = TrainerConfig {
        schedule,
        ..config(Some(1.0))
    };
    let mut trainer = Trainer::new(model, adapter(model, 42, false), adamw(5e-3), config).unwrap();
    let losses = (0..steps)
        .map(|_| trainer.train_step(&batches).unwrap().loss)
        .collect();
    (losses, trainer.into_adapter())
}

/// Same seeds, same data: the same loss at every step and the same final weights, bit for bit.
#[test]
fn fixed_seeds_give_identical_runs() {
    let model = common::llama::load("base", DType::F32, false);
    let (first, adapter_1) = run_losses(&model, 5);
    let (second, adapter_2) = run_losses(&model, 5);
    assert_eq!(
        first.iter().map(|l| l.to_bits()).collect::<Vec<_>>(),
        second.iter().map(|l| l.to_bits()).collect::<Vec<_>>()
    );
    for ((key, p1), (_, p2)) in adapter_1.pairs().zip(adapter_2.pairs()) {
        assert_eq!(flat(&p1.a), flat(&p2.a), "{key:?} A");
        assert_eq!(flat(&p1.b), flat(&p2.b), "{key:?} B");
    }
    assert_ne!(first[0], first[4], "the adapter trained");
}

/// AdamW on one fixed batch (one row, 8 labels) takes the loss down by more than 1 nat in 20
/// steps (lm_head and the norms stay frozen, so r = 4 on this tiny model plateaus near 3.9).
#[test]
fn overfits_one_batch() {
    let model = common::llama::load("base", DType::F32, false);
    let batch = collate(&[example(10, 12, 8)], 0).unwrap();
    let mut trainer = Trainer::new(
        &model,
        adapter(&model, 0, false),
        CpuAdamW::new(AdamWConfig {
            lr: 1e-2,
            weight_decay: 0.0,
            ..AdamWConfig::default()
        })
        .unwrap(),
        config(Some(1.0)),
    )
    .unwrap();
    let start = Instant::now();
    let losses: Vec<f32> = (0..20)
        .map(|_| {
            let m = trainer.train_step(std::slice::from_ref(&batch)).unwrap();
            assert!(!m.skipped && m.grad_norm.is_finite());
            m.loss
        })
        .collect();
    eprintln!("overfit losses: {losses:?} in {:?}", start.elapsed());
    assert_eq!(trainer.steps(), 20);
    let (first, last) = (losses[0], losses[19]);
    assert!(last < first - 1.0, "loss {first} -> {last}");
}

/// Two CpuAdamW updates of a bf16 adapter equal `reference_step` run by hand on each tensor with
/// the same moments, lr and grad scale (bf16 params, f32 moments).
#[test]
fn cpu_adamw_is_reference_step_per_tensor() {
    let model = common::llama::load("base", DType::F32, false);
    let f32_adapter = adapter(&model, 9, true);
    let mut bf16_adapter = LoraAdapter::init(
        f32_adapter.config().clone(),
        model.config(),
        DType::BF16,
        &Device::Cpu,
        9,
    )
    .unwrap();
    let mut grads = LoraGrads::new();
    for (i, ((layer, module), pair)) in f32_adapter.pairs().enumerate() {
        let b = pair.b.to_dtype(DType::BF16).unwrap();
        let a = pair.a.to_dtype(DType::BF16).unwrap();
        bf16_adapter
            .set_pair(layer, module, LoraPair { a, b })
            .unwrap();
        let ga = seeded(100 + i as u64, pair.a.dims(), 0.3);
        let gb = seeded(200 + i as u64, pair.b.dims(), 0.3);
        grads.insert((layer, module), LoraPair { a: ga, b: gb });
    }
    let config = AdamWConfig::default();
    let mut optimizer = CpuAdamW::new(config).unwrap();
    let key = (1, TargetModule::GateProj);
    let bf = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<half::bf16>().unwrap();
    let mut want = bf(&bf16_adapter.pair(key.0, key.1).unwrap().b);
    let (mut m, mut v) = (vec![0f32; want.len()], vec![0f32; want.len()]);
    for (step, (lr, scale)) in [(3e-3, 0.5f32), (2e-3, 1.0)].into_iter().enumerate() {
        optimizer
            .step(&mut bf16_adapter, &grads, lr, scale)
            .unwrap();
        let scalars = AdamWConfig { lr, ..config }
            .step(step as u64 + 1, scale)
            .unwrap();
        reference_step(&scalars, &mut want, &flat(&grads[&key].b), &mut m, &mut v).unwrap();
    }
    assert_eq!(optimizer.steps(), 2);
    assert_eq!(bf(&bf16_adapter.pair(key.0, key.1).unwrap().b), want);
}
