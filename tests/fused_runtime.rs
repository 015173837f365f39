//! The runtime's fused path (RMSNorm, RoPE, SwiGLU and attention kernels in the training
//! backward, `KernelPath::Emulated`: the `.cu` sources run through the CPU emulation) against its
//! tensor-op path, with the fused LoRA and chunked cross-entropy kernels of tests/fused_lora_loss.rs
//! around them, on a tiny random GQA model with a padded batch, in f32 and bf16 compute: the
//! loss and every LoRA gradient agree, and the kernels really ran. On a GPU the same wiring runs
//! with `KernelPath::Cuda` (tests/llama_cuda.rs compares it with the CPU).

mod common;

use candle_core::{DType, Device, Tensor};
use common::llama::seeded;
use qlora::kernels::emu::launches_on_this_thread;
use qlora::model::backward::lora_gradients;
use qlora::model::llama::LlamaModel;
use qlora::model::{KernelPath, Linear, LlamaConfig, LlamaWeights};
use qlora::peft::{LoraAdapter, LoraConfig, LoraPair, TargetModule};
use qlora::quant::nf4::Nf4Tensor;
use qlora::tolerance::{lookup, Dtype, Op};

/// 2 layers, 4 query heads of 16 over 2 kv heads, an intermediate size and vocab that are not
/// multiples of any tile.
fn config() -> LlamaConfig {
    common::llama::tiny_gqa_config(88)
}

/// The model in `dtype` with RMSNorm weights away from 1, so a dropped weight shows.
fn model(dtype: DType) -> LlamaModel {
    LlamaModel::new(config(), weights(dtype)).unwrap()
}

/// [`model`]'s weights.
fn weights(dtype: DType) -> LlamaWeights {
    let c = config();
    let mut weights = LlamaWeights::random(&c, 0.08, 11, dtype, &Device::Cpu).unwrap();
    for (i, layer) in weights.layers.iter_mut().enumerate() {
        let h = c.hidden_size;
        let norm = |seed| {
            (seeded(seed, &[h], 0.5) + 1.0)
                .unwrap()
                .to_dtype(dtype)
                .unwrap()
        };
        layer.input_layernorm = norm(100 + i as u64);
        layer.post_attention_layernorm = norm(200 + i as u64);
    }
    weights
}

/// r 8 on all seven linears, A as PEFT initialises it, a seeded non-zero B.
fn adapter(model: &LlamaModel) -> LoraAdapter {
    let config = LoraConfig {
        r: 8,
        alpha: 16.0,
        target_modules: TargetModule::ALL.to_vec(),
        ..LoraConfig::default()
    };
    let mut adapter =
        LoraAdapter::init(config, model.config(), DType::F32, &Device::Cpu, 5).unwrap();
    let pairs: Vec<_> = adapter.pairs().map(|(k, p)| (k, p.clone())).collect();
    for ((layer, module), pair) in pairs {
        let b = seeded((layer * 16 + module as usize) as u64, pair.b.dims(), 0.1);
        adapter
            .set_pair(layer, module, LoraPair { a: pair.a, b })
            .unwrap();
    }
    adapter
}

/// Batch 2 × 9: a full row and a left-padded one (3 pads), prompt tokens unlabelled.
fn batch() -> (Tensor, Tensor, Tensor) {
    let ids: Vec<u32> = (0..18).map(|i| (i * 37 + 5) % 97).collect();
    let mask: Vec<u32> = [vec![1; 9], vec![0, 0, 0], vec![1; 6]].concat();
    let labels: Vec<i64> = ids
        .iter()
        .zip(&mask)
        .enumerate()
        .map(|(i, (&id, &m))| {
            if m == 0 || i % 9 < 4 {
                -100
            } else {
                i64::from(id)
            }
        })
        .collect();
    let cpu = &Device::Cpu;
    (
        Tensor::from_vec(ids, (2, 9), cpu).unwrap(),
        Tensor::from_vec(mask, (2, 9), cpu).unwrap(),
        Tensor::from_vec(labels, (2, 9), cpu).unwrap(),
    )
}

/// The kernels the fused path launches; attention runs on tensor cores (`_mma`) in bf16.
fn kernels(dtype: DType) -> Vec<String> {
    let mma = if dtype == DType::BF16 { "_mma" } else { "" };
    let mut names: Vec<String> = [
        "k_rmsnorm_forward",
        "k_rmsnorm_backward",
        "k_rmsnorm_dw_reduce",
        "k_rope",
        "k_swiglu_forward",
        "k_swiglu_backward",
        "k_attention_bwd_delta",
    ]
    .map(String::from)
    .to_vec();
    for k in [
        "k_attention_fwd",
        "k_attention_bwd_dq",
        "k_attention_bwd_dkdv",
    ] {
        names.push(format!("{k}{mma}"));
    }
    names
}

fn launches(dtype: DType) -> Vec<u64> {
    kernels(dtype)
        .iter()
        .map(|k| launches_on_this_thread(k))
        .collect()
}

use qlora::testing::values;

/// The largest |got − want| of one gradient tensor over its largest |want|.
fn scaled_error(got: &[f32], want: &[f32]) -> f32 {
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-30);
    got.iter()
        .zip(want)
        .fold(0f32, |m, (g, w)| m.max((g - w).abs() / scale))
}

fn check(dtype: DType, tol_dtype: Dtype) {
    check_model(model(dtype), dtype, tol_dtype);
}

/// [`model`] in bf16 with its seven linears quantized to NF4 (blocks of 64, double quant), as
/// quantize-on-load stores them.
fn nf4_model() -> LlamaModel {
    let mut weights = weights(DType::BF16);
    for layer in weights.layers.iter_mut() {
        for module in TargetModule::ALL {
            let Linear::Dense(w) = layer.linear(module) else {
                unreachable!("random weights are dense")
            };
            let t = Nf4Tensor::quantize(&values(w), w.dims(), 64, true).unwrap();
            *layer.linear_mut(module) = Linear::Nf4(Nf4Tensor {
                dtype: "bfloat16".into(),
                ..t
            });
        }
    }
    LlamaModel::new(config(), weights).unwrap()
}

fn check_model(ops: LlamaModel, dtype: DType, tol_dtype: Dtype) {
    assert_eq!(ops.kernel_path(), KernelPath::TensorOps);
    let fused = ops.clone().with_kernel_path(KernelPath::Emulated).unwrap();
    let adapter = adapter(&ops);
    let (ids, mask, labels) = batch();

    let want = lora_gradients(&ops, &adapter, &ids, Some(&mask), &labels).unwrap();
    let before = launches(dtype);
    let got = lora_gradients(&fused, &adapter, &ids, Some(&mask), &labels).unwrap();
    let after = launches(dtype);
    for ((name, b), a) in kernels(dtype).iter().zip(&before).zip(&after) {
        assert!(a > b, "{name} never ran on the fused path");
    }
    // Two layers, each recomputed once for the backward: 2 forward passes of 2 norms per layer,
    // plus the final norm (its rstd kept for its backward).
    assert_eq!(after[0] - before[0], 2 * 2 * 2 + 1, "RMSNorm forwards");

    let tol = lookup(Op::FusedLoss, tol_dtype);
    assert_eq!(got.label_tokens, want.label_tokens);
    let loss_err = (got.loss - want.loss).abs() / want.loss.abs();
    eprintln!(
        "{dtype:?}: loss {} vs {} (relative {loss_err:.2e})",
        got.loss, want.loss
    );
    assert!(
        tol.check(&[got.loss], &[want.loss]).is_ok(),
        "{dtype:?} loss {} vs {}",
        got.loss,
        want.loss
    );
    assert_eq!(got.lora.len(), want.lora.len());
    let tol = lookup(Op::FusedLoraGrad, tol_dtype);
    let mut worst = 0f32;
    for (key, w) in &want.lora {
        let g = &got.lora[key];
        for (what, gt, wt) in [("A", &g.a, &w.a), ("B", &g.b, &w.b)] {
            let (gv, wv) = (values(gt), values(wt));
            let err = scaled_error(&gv, &wv);
            worst = worst.max(err);
            let scale = wv.iter().fold(0f32, |m, v| m.max(v.abs()));
            let scaled = |v: &[f32]| v.iter().map(|x| x / scale).collect::<Vec<_>>();
            if let Err(m) = tol.check(&scaled(&gv), &scaled(&wv)) {
                panic!("{dtype:?} {key:?} d{what}: {m}");
            }
        }
    }
    eprintln!("{dtype:?}: worst LoRA gradient error {worst:.2e} of the tensor's largest");
}

#[test]
fn fused_bf16_backward_on_nf4_linears_matches_the_tensor_ops() {
    // The kernel path takes the NF4 linears through the GEMV / dequant-GEMM kernels by the
    // dispatcher's path, as on CUDA; the tensor ops dequantize and multiply.
    let ops = nf4_model();
    let fused = ops.clone().with_kernel_path(KernelPath::Emulated).unwrap();
    for layer in 0..2 {
        for module in TargetModule::ALL {
            assert!(!ops.uses_nf4_gemm(layer, module));
            assert!(fused.uses_nf4_gemm(layer, module), "layer {layer} {module}");
        }
    }
    let names = ["k_nf4_gemm_general", "k_nf4_gemm_dx_general"];
    let before: Vec<u64> = names.iter().map(|k| launches_on_this_thread(k)).collect();
    check_model(ops, DType::BF16, Dtype::BF16);
    for (name, b) in names.iter().zip(before) {
        assert!(launches_on_this_thread(name) > b, "{name} never ran");
    }
}

#[test]
fn fused_f32_backward_matches_the_tensor_ops() {
    check(DType::F32, Dtype::F32);
}

#[test]
fn fused_bf16_backward_matches_the_tensor_ops() {
    check(DType::BF16, Dtype::BF16);
}

#[test]
fn unsupported_head_dims_and_devices_are_refused_or_fall_back() {
    // The emulation runs on CPU tensors only; CUDA needs a CUDA model.
    let m = model(DType::F32);
    assert!(m.clone().with_kernel_path(KernelPath::Cuda).is_err());
    // head_dim 12 is not a multiple of 8: the fused path falls back to the tensor ops, with the
    // same result and no kernel launched.
    let mut c = config();
    c.head_dim = 12;
    c.num_attention_heads = 4;
    let weights = LlamaWeights::random(&c, 0.08, 3, DType::F32, &Device::Cpu).unwrap();
    let ops = LlamaModel::new(c, weights).unwrap();
    let fused = ops.clone().with_kernel_path(KernelPath::Emulated).unwrap();
    let adapter = adapter(&ops);
    let (ids, mask, labels) = batch();
    let want = lora_gradients(&ops, &adapter, &ids, Some(&mask), &labels).unwrap();
    let before = launches(DType::F32);
    let got = lora_gradients(&fused, &adapter, &ids, Some(&mask), &labels).unwrap();
    assert_eq!(
        launches(DType::F32),
        before,
        "a kernel ran for an unsupported head_dim"
    );
    assert_eq!(got.loss, want.loss);
}

/// The forward (eval, generation's prefill) through the fused kernels: logits as the tensor ops
/// give them.
fn check_forward(dtype: DType, tol_dtype: Dtype) {
    let ops = model(dtype);
    let fused = ops.clone().with_kernel_path(KernelPath::Emulated).unwrap();
    let adapter = adapter(&ops);
    let (ids, mask, _) = batch();
    let mode = qlora::peft::LoraMode::Eval;
    let want = ops
        .forward_with_adapter(&ids, Some(&mask), &adapter, &mode)
        .unwrap();
    let attention = format!(
        "k_attention_fwd{}",
        if dtype == DType::BF16 { "_mma" } else { "" }
    );
    let before = launches_on_this_thread(&attention);
    let lora_before = launches_on_this_thread("k_lora_add");
    let got = fused
        .forward_with_adapter(&ids, Some(&mask), &adapter, &mode)
        .unwrap();
    assert_eq!(
        launches_on_this_thread(&attention) - before,
        2,
        "one attention per layer"
    );
    assert_eq!(
        launches_on_this_thread("k_lora_add") - lora_before,
        14,
        "one fused LoRA per adapted linear"
    );
    assert_eq!(got.dims(), want.dims());
    // Only the rows of real tokens: a pad query's output is defined but differs by design (the
    // kernel and the runtime both average v there, in different roundings).
    let keep = values(&mask.to_dtype(DType::F32).unwrap());
    let v = ops.config().vocab_size;
    let rows = |t: &Tensor| -> Vec<f32> {
        let all = values(&t.to_dtype(DType::F32).unwrap());
        keep.iter()
            .enumerate()
            .filter(|(_, &k)| k == 1.0)
            .flat_map(|(i, _)| all[i * v..(i + 1) * v].to_vec())
            .collect()
    };
    let (g, w) = (rows(&got), rows(&want));
    eprintln!(
        "{dtype:?}: worst logit error {:.2e} of the largest",
        scaled_error(&g, &w)
    );
    if let Err(m) = lookup(Op::FusedLogits, tol_dtype).check(&g, &w) {
        panic!("{dtype:?} logits: {m}");
    }
}

#[test]
fn fused_forward_matches_the_tensor_ops() {
    check_forward(DType::F32, Dtype::F32);
    check_forward(DType::BF16, Dtype::BF16);
}

/// On a GPU: the CUDA kernels in the training backward against their CPU emulation (the same
/// `.cu` code; cuBLAS and candle's CUDA ops sum the linears in their own order). Skips without
/// a GPU.
#[cfg(feature = "cuda")]
#[test]
fn cuda_fused_backward_matches_the_emulation() {
    let Some(gpu) = qlora::kernels::cuda::CudaDevice::first_available_candle() else {
        return;
    };
    for (dtype, tol_dtype) in [(DType::F32, Dtype::F32), (DType::BF16, Dtype::BF16)] {
        let cpu = model(dtype).with_kernel_path(KernelPath::Emulated).unwrap();
        let on_gpu = model(dtype)
            .to_device(&gpu)
            .unwrap()
            .with_kernel_path(KernelPath::Cuda)
            .unwrap();
        let adapter = adapter(&cpu);
        let gpu_adapter = adapter.to_device(&gpu).unwrap();
        let (ids, mask, labels) = batch();
        let want = lora_gradients(&cpu, &adapter, &ids, Some(&mask), &labels).unwrap();
        let got = lora_gradients(&on_gpu, &gpu_adapter, &ids, Some(&mask), &labels).unwrap();
        let tol = lookup(Op::FusedLoss, tol_dtype);
        assert!(
            tol.check(&[got.loss], &[want.loss]).is_ok(),
            "{dtype:?} loss {} vs {}",
            got.loss,
            want.loss
        );
        let tol = lookup(Op::FusedLoraGrad, tol_dtype);
        for (key, w) in &want.lora {
            let g = &got.lora[key];
            for (what, gt, wt) in [("A", &g.a, &w.a), ("B", &g.b, &w.b)] {
                let gv = values(&gt.to_device(&Device::Cpu).unwrap());
                let wv = values(wt);
                let scale = wv.iter().fold(0f32, |m, v| m.max(v.abs()));
                let scaled = |v: &[f32]| v.iter().map(|x| x / scale).collect::<Vec<_>>();
                if let Err(m) = tol.check(&scaled(&gv), &scaled(&wv)) {
                    panic!("{dtype:?} {key:?} d{what} on the GPU: {m}");
                }
            }
        }
    }
}
