//! `lora_gradients` through the fused LoRA and chunked cross-entropy kernels (CPU emulation of the
//! `.cu` sources) against the same model on tensor ops: a tiny random Llama (GQA, head_dim 16, an
//! intermediate size no tile divides) with an adapter on all seven linears, f32 and bf16 compute.

mod common;

use candle_core::{DType, Device, Tensor};
use qlora::kernels::emu::launches_on_this_thread;
use qlora::model::backward::{lora_gradients, StackGradients};
use qlora::model::llama::LlamaModel;
use qlora::model::{KernelPath, LlamaConfig, LlamaWeights};
use qlora::peft::{LoraAdapter, LoraConfig, LoraPair, TargetModule};
use qlora::testing::normal_vector;
use qlora::tolerance::{lookup, Dtype, Op};

const KERNELS: [&str; 8] = [
    "k_lora_xa",
    "k_lora_add",
    "k_lora_dyb",
    "k_lora_db",
    "k_lora_da",
    "k_lora_dx",
    "k_cross_entropy_fwd",
    "k_cross_entropy_bwd",
];

fn config() -> LlamaConfig {
    common::llama::tiny_gqa_config(96)
}

/// An adapter of rank 8 on every linear with random A and B (B non-zero, so every gradient and
/// the LoRA delta of the forward are exercised), in `dtype`.
fn adapter(config: &LlamaConfig, dtype: DType, rslora: bool) -> LoraAdapter {
    let lora = LoraConfig {
        r: 8,
        alpha: 16.0,
        use_rslora: rslora,
        ..LoraConfig::default()
    };
    let mut adapter = LoraAdapter::init(lora, config, dtype, &Device::Cpu, 3).unwrap();
    let mut seed = 100;
    for layer in 0..config.num_hidden_layers {
        for module in TargetModule::ALL {
            let [out_features, in_features] = module.shape(config);
            let mut matrix = |rows: usize, cols: usize| {
                seed += 1;
                Tensor::from_vec(
                    normal_vector(rows * cols, 0.1, seed),
                    (rows, cols),
                    &Device::Cpu,
                )
                .unwrap()
                .to_dtype(dtype)
                .unwrap()
            };
            let pair = LoraPair {
                a: matrix(8, in_features),
                b: matrix(out_features, 8),
            };
            adapter.set_pair(layer, module, pair).unwrap();
        }
    }
    adapter
}

/// Batch 2 × 7: the second row padded at its last two positions, some labels ignored.
fn batch() -> (Tensor, Tensor, Tensor) {
    let ids = Tensor::new(
        &[[5u32, 17, 40, 3, 96, 11, 60], [8, 23, 71, 50, 9, 2, 2]],
        &Device::Cpu,
    )
    .unwrap();
    let mask = Tensor::new(
        &[[1u8, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0]],
        &Device::Cpu,
    )
    .unwrap()
    .to_dtype(DType::U32)
    .unwrap();
    let labels = Tensor::new(
        &[
            [-100i64, 17, 40, 3, -100, 11, 60],
            [-100, 23, 71, 50, 9, -100, -100],
        ],
        &Device::Cpu,
    )
    .unwrap();
    (ids, mask, labels)
}

use qlora::testing::values;

/// Runs `lora_gradients` on the tensor ops and on the emulated kernels; checks every kernel ran
/// on the fused side and returns `(tensor ops, fused)`.
fn both(dtype: DType, adapter_dtype: DType, rslora: bool) -> (StackGradients, StackGradients) {
    let config = config();
    let weights = LlamaWeights::random(&config, 0.1, 11, dtype, &Device::Cpu).unwrap();
    let model = LlamaModel::new(config.clone(), weights).unwrap();
    let adapter = adapter(&config, adapter_dtype, rslora);
    let (ids, mask, labels) = batch();
    let ops = lora_gradients(&model, &adapter, &ids, Some(&mask), &labels).unwrap();
    let before = KERNELS.map(launches_on_this_thread);
    let model = model.with_kernel_path(KernelPath::Emulated).unwrap();
    let fused = lora_gradients(&model, &adapter, &ids, Some(&mask), &labels).unwrap();
    for (name, before) in KERNELS.iter().zip(before) {
        assert!(
            launches_on_this_thread(name) > before,
            "{name} did not run on the fused path"
        );
    }
    (ops, fused)
}

/// Compares loss and every dA, dB (each scaled by its largest |want|) under the tolerance rows
/// for `dtype`; prints the worst errors seen.
fn compare(dtype: Dtype, ops: &StackGradients, fused: &StackGradients) {
    let loss_tol = lookup(Op::FusedLoss, dtype);
    eprintln!(
        "loss: tensor ops {} fused {} (|diff| {:e})",
        ops.loss,
        fused.loss,
        (ops.loss - fused.loss).abs()
    );
    if let Err(e) = loss_tol.check(&[fused.loss], &[ops.loss]) {
        panic!("loss: {e}");
    }
    assert_eq!(fused.label_tokens, ops.label_tokens);
    assert_eq!(fused.label_tokens, 9);
    let tol = lookup(Op::FusedLoraGrad, dtype);
    assert_eq!(
        fused.lora.keys().collect::<Vec<_>>(),
        ops.lora.keys().collect::<Vec<_>>()
    );
    assert_eq!(ops.lora.len(), 14);
    let mut worst = 0f32;
    for (key, want) in &ops.lora {
        let got = &fused.lora[key];
        for (what, g, w) in [("dA", &got.a, &want.a), ("dB", &got.b, &want.b)] {
            assert_eq!(g.dims(), w.dims(), "{key:?} {what}");
            let (g, w) = (values(g), values(w));
            let scale = w.iter().fold(0f32, |m, v| m.max(v.abs()));
            assert!(scale > 0.0, "{key:?} {what} is all zero");
            let g: Vec<f32> = g.iter().map(|v| v / scale).collect();
            let w: Vec<f32> = w.iter().map(|v| v / scale).collect();
            let err = g
                .iter()
                .zip(&w)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            worst = worst.max(err);
            if let Err(e) = tol.check(&g, &w) {
                panic!("{key:?} {what}: {e}");
            }
        }
    }
    eprintln!("worst scaled |dA, dB diff|: {worst:e}");
}

#[test]
fn f32_compute_f32_adapter() {
    let (ops, fused) = both(DType::F32, DType::F32, false);
    compare(Dtype::F32, &ops, &fused);
}

#[test]
fn f32_compute_rslora() {
    let (ops, fused) = both(DType::F32, DType::F32, true);
    compare(Dtype::F32, &ops, &fused);
}

#[test]
fn bf16_compute_f32_adapter() {
    let (ops, fused) = both(DType::BF16, DType::F32, false);
    compare(Dtype::BF16, &ops, &fused);
}

#[test]
fn bf16_compute_bf16_adapter() {
    let (ops, fused) = both(DType::BF16, DType::BF16, false);
    compare(Dtype::BF16, &ops, &fused);
}
