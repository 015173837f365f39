//! Our explicit LoRA backward in bf16 compute against Hugging Face PEFT's autograd in bf16: the
//! r4_all / r4_all_rslora adapters on the `base` tiny Llama loaded in bf16 (dense, or with
//! bitsandbytes' NF4 linears of `bnb_nf4`), f32 and bf16 adapters, and PEFT's loss and dA / dB for
//! the padded batch, from tests/fixtures/lora/lora_grads_bf16.safetensors.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use qlora::model::backward::lora_gradients;
use qlora::peft::{LoraAdapter, LoraPair, TargetModule};
use qlora::tolerance::{lookup, Dtype, Op};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// PEFT's state-dict name of a gradient, spelled out here rather than taken from the loader.
fn peft_key(layer: usize, module: TargetModule, matrix: char) -> String {
    let block = match module {
        TargetModule::QProj | TargetModule::KProj | TargetModule::VProj | TargetModule::OProj => {
            "self_attn"
        }
        TargetModule::GateProj | TargetModule::UpProj | TargetModule::DownProj => "mlp",
    };
    format!(
        "base_model.model.model.layers.{layer}.{block}.{}.lora_{matrix}.weight",
        module.name()
    )
}

use qlora::testing::values;

/// `adapter` with A and B rounded to `dtype`, as PEFT holds it without `autocast_adapter_dtype`.
fn in_dtype(
    adapter: LoraAdapter,
    model: &qlora::model::llama::LlamaModel,
    dtype: DType,
) -> LoraAdapter {
    let mut cast = LoraAdapter::init(
        adapter.config().clone(),
        model.config(),
        dtype,
        &Device::Cpu,
        0,
    )
    .unwrap();
    for ((layer, module), pair) in adapter.pairs() {
        let pair = LoraPair {
            a: pair.a.to_dtype(dtype).unwrap(),
            b: pair.b.to_dtype(dtype).unwrap(),
        };
        cast.set_pair(layer, module, pair).unwrap();
    }
    cast
}

/// Fixture case `case`: `model` ("base" or "bnb_nf4") in bf16 compute, PEFT adapter directory
/// `adapter` held in `adapter_dtype`.
fn check_against_peft(case: &str, model: &str, adapter: &str, adapter_dtype: DType) {
    let f: HashMap<String, Tensor> = candle_core::safetensors::load(
        fixtures().join("lora/lora_grads_bf16.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let batch: HashMap<String, Tensor> = candle_core::safetensors::load(
        fixtures().join("lora/lora_grads.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let ids = batch["input_ids"].to_dtype(DType::U32).unwrap();
    let mask = &batch["attention_mask"];
    let labels = &batch["labels"];
    let model = common::llama::load(model, DType::BF16, false);
    let loaded =
        LoraAdapter::load_pretrained(fixtures().join("lora").join(adapter), &Device::Cpu).unwrap();
    let adapter = in_dtype(loaded, &model, adapter_dtype);

    let grads = lora_gradients(&model, &adapter, &ids, Some(mask), labels).unwrap();
    let want_loss = f[&format!("{case}.loss")].to_scalar::<f32>().unwrap();
    if let Err(m) = lookup(Op::LlamaLogits, Dtype::BF16).check(&[grads.loss], &[want_loss]) {
        panic!("{case} loss: {m}");
    }

    let prefix = format!("{case}.");
    let want_keys: BTreeSet<String> = f
        .keys()
        .filter_map(|k| k.strip_prefix(&prefix))
        .filter(|k| *k != "loss")
        .map(str::to_owned)
        .collect();
    let mut got = HashMap::new();
    for (&(layer, module), pair) in &grads.lora {
        got.insert(peft_key(layer, module, 'A'), &pair.a);
        got.insert(peft_key(layer, module, 'B'), &pair.b);
    }
    assert_eq!(
        got.keys().cloned().collect::<BTreeSet<_>>(),
        want_keys,
        "{case}: gradient keys"
    );
    assert_eq!(want_keys.len(), 7 * model.config().num_hidden_layers * 2);

    // bf16 errors scale with the terms that make up a tensor, not with each element: compare
    // every tensor divided by its largest |PEFT gradient|.
    let tol = lookup(Op::LoraGradPeftScaled, Dtype::BF16);
    let mut worst = (0f32, String::new());
    let mut failures = Vec::new();
    for key in &want_keys {
        let want_t = &f[&format!("{prefix}{key}")];
        let want_dtype = if adapter_dtype == DType::F32 {
            DType::F32
        } else {
            DType::BF16
        };
        assert_eq!(
            want_t.dtype(),
            want_dtype,
            "{case} {key}: PEFT's gradient dtype"
        );
        assert_eq!(got[key].dims(), want_t.dims(), "{case} {key}: shape");
        assert_eq!(got[key].dtype(), DType::F32, "{case} {key}: dtype");
        let (g, w) = (values(got[key]), values(want_t));
        let scale = w.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!(scale > 0.0, "{case} {key}: PEFT's gradient is zero");
        let (g, w): (Vec<f32>, Vec<f32>) = g
            .iter()
            .zip(&w)
            .map(|(g, w)| (g / scale, w / scale))
            .unzip();
        let err = common::llama::max_abs_diff(&g, &w);
        if err > worst.0 {
            worst = (err, key.clone());
        }
        if let Err(m) = tol.check(&g, &w) {
            failures.push(format!("{key} (largest |grad| {scale:e}): {m}"));
        }
    }
    eprintln!(
        "{case}: loss {} vs PEFT {want_loss}; {} gradients, worst |diff| / largest |grad| {:e} \
         ({}), tolerance atol {:e} rtol {:e}",
        grads.loss,
        want_keys.len(),
        worst.0,
        worst.1,
        tol.atol,
        tol.rtol
    );
    assert!(
        failures.is_empty(),
        "{case}: {} tensors out of tolerance:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn bf16_lora_gradients_match_peft_f32_adapter() {
    check_against_peft("bf16.r4_all", "base", "r4_all", DType::F32);
}

#[test]
fn bf16_lora_gradients_match_peft_bf16_adapter() {
    check_against_peft("bf16.r4_all_rslora", "base", "r4_all_rslora", DType::BF16);
}

#[test]
fn nf4_bf16_lora_gradients_match_peft() {
    check_against_peft("nf4.r4_all", "bnb_nf4", "r4_all", DType::F32);
}
