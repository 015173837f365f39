//! The Llama runtime on a CUDA device against the same model on the CPU, on the tiny checkpoints
//! of tests/fixtures/llama/: NF4 weights dequantized on the device bit for bit, logits and loss
//! (f32, bf16, NF4), LoRA gradients from the explicit backward, and greedy generation token for
//! token. Each GPU test returns early (saying why) without a GPU; the typed-error test runs always.
#![cfg(feature = "cuda")]

mod common;

use common::llama::{fixture_dir, kept_rows, max_abs_diff, seeded};
use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use half::{bf16, f16};
use qlora::kernels::cuda::{storage_slice, CudaDevice};
use qlora::kernels::nf4::Nf4DeviceTensor;
use qlora::model::backward::lora_gradients;
use qlora::model::generate::{generate, GenerationConfig};
use qlora::model::llama::LlamaModel;
use qlora::model::{LlamaConfig, LlamaWeights, LoadOptions};
use qlora::peft::{LoraAdapter, LoraConfig, LoraMode, LoraPair, TargetModule};
use qlora::quant::nf4::Nf4Tensor;
use qlora::tolerance::{lookup, Dtype, Op};
use qlora::Error;

/// Fixture model `name` loaded straight onto `device` (dense tensors there; on a CUDA device
/// `LlamaModel::new` uploads the NF4 linears).
fn load_on(name: &str, dtype: DType, quantize: bool, device: &Device) -> LlamaModel {
    let dir = fixture_dir(name);
    let config = LlamaConfig::from_file(dir.join("config.json")).unwrap();
    let options = LoadOptions {
        dtype,
        device: device.clone(),
        quantize,
    };
    let weights = LlamaWeights::load(&dir, &config, &options).unwrap();
    LlamaModel::new(config, weights).unwrap()
}

/// The padded batch of tests/fixtures/llama/forward.safetensors: ids, mask, labels.
fn padded_batch() -> (Tensor, Tensor, Tensor) {
    let f: HashMap<String, Tensor> =
        candle_core::safetensors::load(fixture_dir("forward.safetensors"), &Device::Cpu).unwrap();
    (
        f["input_ids"].to_dtype(DType::U32).unwrap(),
        f["attention_mask"].clone(),
        f["labels"].clone(),
    )
}

use qlora::testing::values;

fn tol_dtype(dtype: DType) -> Dtype {
    match dtype {
        DType::BF16 => Dtype::BF16,
        _ => Dtype::F32,
    }
}

/// The cases every comparison runs: (fixture, compute dtype, quantize on load).
const CASES: &[(&str, DType, bool)] = &[
    ("base", DType::F32, false),
    ("base", DType::BF16, false),
    ("base", DType::BF16, true),
    ("base", DType::F32, true),
    ("bnb_nf4", DType::F32, false),
    ("bnb_nf4", DType::BF16, false),
    ("llama3_tied_f32", DType::F32, false),
];

#[test]
fn missing_gpu_is_a_typed_error() {
    // CI runs this against the stub libcuda (every call answers CUDA_ERROR_STUB_LIBRARY) with
    // QLORA_EXPECT_NO_GPU=1, where opening the device must fail as `NoCudaDevice`.
    let expect_none = std::env::var("QLORA_EXPECT_NO_GPU").is_ok_and(|v| v == "1");
    match CudaDevice::candle_device(0) {
        Ok(device) => {
            assert!(!expect_none, "a device opened under the stub driver");
            assert!(device.is_cuda());
        }
        Err(err) => assert!(matches!(err, Error::NoCudaDevice(_)), "{err}"),
    }
    // Asking for CUDA work on the CPU device is an argument error, GPU or not.
    let err = CudaDevice::from_candle(&Device::Cpu).unwrap_err();
    assert!(matches!(err, Error::InvalidArgument { .. }), "{err}");
    let t = Nf4Tensor::quantize(&[0.5, -1.0, 0.25], &[3], 64, false).unwrap();
    let err = Nf4DeviceTensor::upload(&t, &Device::Cpu).unwrap_err();
    assert!(matches!(err, Error::InvalidArgument { .. }), "{err}");
    let host = Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap();
    let (storage, layout) = host.storage_and_layout();
    let err = storage_slice::<f32>(&storage, layout).unwrap_err();
    assert!(matches!(err, Error::InvalidArgument { .. }), "{err}");
}

#[test]
fn kernels_read_only_whole_cuda_tensors() {
    let Some(gpu) = CudaDevice::first_available_candle() else {
        return;
    };
    let t = Tensor::arange(0f32, 8.0, &gpu).unwrap();
    {
        let (storage, layout) = t.storage_and_layout();
        assert_eq!(storage_slice::<f32>(&storage, layout).unwrap().len(), 8);
        // The wrong dtype; below, a view that starts inside the buffer and one that ends short.
        assert!(storage_slice::<u8>(&storage, layout).is_err());
    }
    for view in [t.narrow(0, 1, 7).unwrap(), t.narrow(0, 0, 4).unwrap()] {
        let (storage, layout) = view.storage_and_layout();
        let err = storage_slice::<f32>(&storage, layout).unwrap_err();
        assert!(matches!(err, Error::InvalidArgument { .. }), "{err}");
    }
    // A kernel's output handed to candle: the same values back, on the same device.
    let dev = CudaDevice::from_candle(&gpu).unwrap();
    let slice = dev.stream().clone_htod(&[1.5f32, -2.0, 3.25]).unwrap();
    let err = dev.tensor_from_slice(slice.clone(), 4).unwrap_err();
    assert!(matches!(err, Error::InvalidArgument { .. }), "{err}");
    let wrapped = dev.tensor_from_slice(slice, (3, 1)).unwrap();
    assert!(wrapped.device().same_device(&gpu));
    assert_eq!(values(&wrapped), [1.5, -2.0, 3.25]);
    // A device of its own (not candle's) cannot hand buffers to candle.
    if let Some(own) = CudaDevice::first_available() {
        let slice = own.stream().clone_htod(&[1.0f32]).unwrap();
        assert!(own.tensor_from_slice(slice, 1).is_err());
    }
}

/// `t` dequantized on the CPU and rounded to its original dtype, as f32.
fn cpu_dequantized(t: &Nf4Tensor) -> Vec<f32> {
    let values = t.dequantize().unwrap();
    match t.dtype.as_str() {
        "bfloat16" => values.iter().map(|&v| bf16::from_f32(v).to_f32()).collect(),
        "float16" => values.iter().map(|&v| f16::from_f32(v).to_f32()).collect(),
        _ => values,
    }
}

#[test]
fn device_nf4_dequantize_equals_cpu_bit_for_bit() {
    let Some(gpu) = CudaDevice::first_available_candle() else {
        return;
    };
    let dev = CudaDevice::from_candle(&gpu).unwrap();
    // Odd sizes (a partial last block, an odd element count with a half-filled last byte) and
    // sizes past one nested block of 256 scales; f32 and double-quantized scales; every dtype.
    for &(n, blocksize) in &[(1, 64), (7, 64), (65, 64), (1000, 128), (64 * 300 + 37, 64)] {
        for double_quant in [false, true] {
            for (dtype, want_dtype) in [
                ("float32", DType::F32),
                ("bfloat16", DType::BF16),
                ("float16", DType::F16),
            ] {
                let data: Vec<f32> = (0..n)
                    .map(|i| ((i as f32 * 0.618_034).sin() * 3.0).powi(3))
                    .collect();
                let mut t = Nf4Tensor::quantize(&data, &[n], blocksize, double_quant).unwrap();
                t.dtype = dtype.to_string();
                let on_gpu = Nf4DeviceTensor::upload(&t, &gpu).unwrap();
                let w = on_gpu.dequantize(&dev).unwrap();
                assert_eq!(w.dtype(), want_dtype);
                assert_eq!(w.dims(), &[n]);
                assert!(w.device().same_device(&gpu));
                let tol = lookup(Op::Dequantize, tol_dtype(want_dtype));
                if let Err(m) = tol.check(&values(&w), &cpu_dequantized(&t)) {
                    panic!("n {n} blocksize {blocksize} double {double_quant} {dtype}: {m}");
                }
            }
        }
    }
}

#[test]
fn frozen_weights_on_cuda_equal_the_cpus_bit_for_bit() {
    let Some(gpu) = CudaDevice::first_available_candle() else {
        return;
    };
    for &(name, dtype, quantize) in CASES {
        let cpu = load_on(name, dtype, quantize, &Device::Cpu);
        let cuda = load_on(name, dtype, quantize, &gpu);
        for layer in 0..cpu.config().num_hidden_layers {
            for module in TargetModule::ALL {
                let want = cpu.frozen_weight(layer, module).unwrap();
                let got = cuda.frozen_weight(layer, module).unwrap();
                assert!(got.device().same_device(&gpu), "{name} weight left the GPU");
                assert_eq!(got.dtype(), want.dtype(), "{name} {layer} {module}");
                let tol = lookup(Op::Dequantize, Dtype::F32);
                if let Err(m) = tol.check(&values(&got), &values(&want)) {
                    panic!("{name} {dtype:?} quantize {quantize} layer {layer} {module}: {m}");
                }
            }
        }
    }
}

#[test]
fn logits_and_loss_on_cuda_match_the_cpu() {
    let Some(gpu) = CudaDevice::first_available_candle() else {
        return;
    };
    let (ids, mask, labels) = padded_batch();
    for &(name, dtype, quantize) in CASES {
        let cpu = load_on(name, dtype, quantize, &Device::Cpu);
        let cuda = load_on(name, dtype, quantize, &gpu);
        let want = cpu.forward(&ids, Some(&mask)).unwrap();
        // The batch stays on the host: the model moves ids to its device, masks are built there.
        let got = cuda.forward(&ids, Some(&mask)).unwrap();
        assert!(got.device().same_device(&gpu));
        assert_eq!((got.dims(), got.dtype()), (want.dims(), want.dtype()));
        let (got_rows, want_rows) = (kept_rows(&got, &mask), kept_rows(&want, &mask));
        let tol = lookup(Op::LlamaDeviceLogits, tol_dtype(dtype));
        eprintln!(
            "{name} {dtype:?} quantize {quantize}: max |logit diff| CUDA vs CPU {:e}",
            max_abs_diff(&got_rows, &want_rows)
        );
        if let Err(m) = tol.check(&got_rows, &want_rows) {
            panic!("{name} {dtype:?} quantize {quantize} logits: {m}");
        }
        let (want_loss, want_count) = LlamaModel::loss(&want, &labels).unwrap();
        let (got_loss, got_count) =
            LlamaModel::loss(&got, &labels.to_device(&gpu).unwrap()).unwrap();
        assert_eq!(got_count, want_count);
        let (got_loss, want_loss) = (values(&got_loss), values(&want_loss));
        if let Err(m) = tol.check(&got_loss, &want_loss) {
            panic!("{name} {dtype:?} quantize {quantize} loss: {m}");
        }
    }
}

/// Which models multiply their frozen linears through the NF4 dequant-GEMM dispatcher: NF4 weights
/// on CUDA in bf16 compute, not f32 compute, dense weights or the CPU. The comparisons against the
/// CPU above (logits, loss, LoRA gradients) run the bf16 NF4 cases through that path.
#[test]
fn nf4_linears_in_bf16_on_cuda_go_through_the_dequant_gemm() {
    let Some(gpu) = CudaDevice::first_available_candle() else {
        return;
    };
    for &(name, dtype, quantize) in CASES {
        let cpu = load_on(name, dtype, quantize, &Device::Cpu);
        let cuda = cpu.to_device(&gpu).unwrap();
        let nf4 = quantize || name == "bnb_nf4";
        for layer in 0..cuda.config().num_hidden_layers {
            for module in TargetModule::ALL {
                assert!(!cpu.uses_nf4_gemm(layer, module));
                assert_eq!(
                    cuda.uses_nf4_gemm(layer, module),
                    nf4 && dtype == DType::BF16,
                    "{name} {dtype:?} quantize {quantize} layer {layer} {module}"
                );
            }
        }
    }
}

#[test]
fn a_model_moved_to_cuda_and_back_is_unchanged() {
    let Some(gpu) = CudaDevice::first_available_candle() else {
        return;
    };
    let (ids, mask, _) = padded_batch();
    let cpu = load_on("base", DType::BF16, true, &Device::Cpu);
    let moved = cpu.to_device(&gpu).unwrap();
    assert!(moved.device().same_device(&gpu));
    let loaded = load_on("base", DType::BF16, true, &gpu);
    let a = values(&moved.forward(&ids, Some(&mask)).unwrap());
    let b = values(&loaded.forward(&ids, Some(&mask)).unwrap());
    assert!(
        a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
        "moving and loading onto the GPU give different logits"
    );
    let back = moved.to_device(&Device::Cpu).unwrap();
    assert!(back.device().is_cpu());
    let want = values(&cpu.forward(&ids, Some(&mask)).unwrap());
    let got = values(&back.forward(&ids, Some(&mask)).unwrap());
    assert_eq!(
        got, want,
        "the CPU model after a round trip through the GPU"
    );
}

/// r = 4, alpha = 8 on every linear, PEFT-initialised A and a seeded non-zero B, on the CPU.
fn adapter(model: &LlamaModel, dtype: DType) -> LoraAdapter {
    let config = LoraConfig {
        r: 4,
        alpha: 8.0,
        ..LoraConfig::default()
    };
    let mut adapter = LoraAdapter::init(config, model.config(), dtype, &Device::Cpu, 7).unwrap();
    let pairs: Vec<_> = adapter.pairs().map(|(k, p)| (k, p.clone())).collect();
    for ((layer, module), pair) in pairs {
        let seed = (layer * 16 + module as usize) as u64;
        let b = seeded(seed, pair.b.dims(), 0.2).to_dtype(dtype).unwrap();
        adapter
            .set_pair(layer, module, LoraPair { a: pair.a, b })
            .unwrap();
    }
    adapter
}

#[test]
fn lora_forward_and_gradients_on_cuda_match_the_cpu() {
    let Some(gpu) = CudaDevice::first_available_candle() else {
        return;
    };
    let (ids, mask, labels) = padded_batch();
    for &(name, dtype, quantize) in CASES {
        let cpu = load_on(name, dtype, quantize, &Device::Cpu);
        let cuda = cpu.to_device(&gpu).unwrap();
        let cpu_adapter = adapter(&cpu, dtype);
        let cuda_adapter = cpu_adapter.to_device(&gpu).unwrap();
        assert!(cuda_adapter.device().is_some_and(|d| d.same_device(&gpu)));
        // An adapter left on the host is refused by name, not by a failing op deep inside.
        let err = cuda
            .forward_with_adapter(&ids, Some(&mask), &cpu_adapter, &LoraMode::Eval)
            .unwrap_err();
        assert!(matches!(err, Error::InvalidArgument { .. }), "{err}");
        let err = lora_gradients(&cuda, &cpu_adapter, &ids, Some(&mask), &labels).unwrap_err();
        assert!(matches!(err, Error::InvalidArgument { .. }), "{err}");
        let what = format!("{name} {dtype:?} quantize {quantize}");

        let want = cpu
            .forward_with_adapter(&ids, Some(&mask), &cpu_adapter, &LoraMode::Eval)
            .unwrap();
        let got = cuda
            .forward_with_adapter(&ids, Some(&mask), &cuda_adapter, &LoraMode::Eval)
            .unwrap();
        let tol = lookup(Op::LlamaDeviceLogits, tol_dtype(dtype));
        if let Err(m) = tol.check(&kept_rows(&got, &mask), &kept_rows(&want, &mask)) {
            panic!("{what}: adapted logits: {m}");
        }

        let want = lora_gradients(&cpu, &cpu_adapter, &ids, Some(&mask), &labels).unwrap();
        let got = lora_gradients(&cuda, &cuda_adapter, &ids, Some(&mask), &labels).unwrap();
        assert_eq!(got.label_tokens, want.label_tokens);
        assert_eq!(got.checkpoints, want.checkpoints);
        if let Err(m) = tol.check(&[got.loss], &[want.loss]) {
            panic!("{what}: loss: {m}");
        }
        assert_eq!(
            got.lora.keys().collect::<Vec<_>>(),
            want.lora.keys().collect::<Vec<_>>()
        );
        // bf16 NF4 models take the dequant-GEMM path, whose dx = dy·W rounds dy to bf16.
        let grad_op = if cuda.uses_nf4_gemm(0, TargetModule::QProj) {
            Op::LoraGradDeviceNf4Gemm
        } else {
            Op::LoraGradDevice
        };
        let grad_tol = lookup(grad_op, tol_dtype(dtype));
        let mut worst = 0f32;
        for (key, w) in &want.lora {
            let g = &got.lora[key];
            assert!(g.a.device().same_device(&gpu) && g.b.device().same_device(&gpu));
            for (which, g, w) in [("dA", &g.a, &w.a), ("dB", &g.b, &w.b)] {
                let (g, w) = (values(g), values(w));
                worst = worst.max(max_abs_diff(&g, &w));
                if let Err(m) = grad_tol.check(&g, &w) {
                    panic!("{what}: layer {} {} {which}: {m}", key.0, key.1);
                }
            }
        }
        eprintln!("{what}: max |LoRA grad diff| CUDA vs CPU {worst:e}");
    }
}

#[test]
fn greedy_generation_on_cuda_matches_the_cpu_token_for_token() {
    let Some(gpu) = CudaDevice::first_available_candle() else {
        return;
    };
    let prompts = vec![
        vec![17, 140, 9, 55, 191, 23],
        vec![88],
        vec![5, 120, 33, 76],
    ];
    let config = GenerationConfig {
        max_new_tokens: 12,
        ..GenerationConfig::default()
    };
    // f32 compute only: bf16 logits tie often (one ulp is 2^-8 relative), and a tie broken the
    // other way by a reordered sum would pick another token without either side being wrong.
    for &(name, dtype, quantize) in CASES.iter().filter(|c| c.1 == DType::F32) {
        let cpu = load_on(name, dtype, quantize, &Device::Cpu);
        let cuda = load_on(name, dtype, quantize, &gpu);
        let want = generate(&cpu, &prompts, &config).unwrap();
        let got = generate(&cuda, &prompts, &config).unwrap();
        assert_eq!(got, want, "{name} {dtype:?} quantize {quantize}");
    }
}
