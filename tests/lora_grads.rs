//! Our explicit LoRA backward against Hugging Face PEFT's autograd: the PEFT adapters of
//! tests/fixtures/lora/{r4_all, r4_all_rslora} (r = 4, alpha = 8, all seven linears, rsLoRA off
//! and on) on the f32 `base` tiny Llama, and PEFT's causal-LM loss and dA `[r, in]` / dB
//! `[out, r]` for the padded batch in tests/fixtures/lora/lora_grads.safetensors.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use qlora::model::backward::lora_gradients;
use qlora::model::llama::IGNORE_INDEX;
use qlora::peft::{LoraAdapter, TargetModule};
use qlora::tolerance::{lookup, Dtype, Op, Tolerance};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// The name PEFT gives the gradient's parameter in adapter_model.safetensors, spelled out here
/// rather than taken from the loader, so a wrong mapping there cannot hide a swapped gradient.
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

/// The worst errors over all compared values: absolute, relative (where |want| is at least
/// 1e-3 of the tensor's largest magnitude, so near-zero entries do not dominate), and the
/// largest fraction of the tolerance `atol + rtol·|want|` used.
#[derive(Default)]
struct Errors {
    abs: f32,
    rel: f32,
    tol_used: f32,
}

impl Errors {
    fn add(&mut self, got: &[f32], want: &[f32], tol: Tolerance) {
        let scale = want.iter().fold(0f32, |m, w| m.max(w.abs()));
        for (&g, &w) in got.iter().zip(want) {
            let err = (g - w).abs();
            self.abs = self.abs.max(err);
            if w.abs() >= 1e-3 * scale {
                self.rel = self.rel.max(err / w.abs());
            }
            self.tol_used = self.tol_used.max(err / (tol.atol + tol.rtol * w.abs()));
        }
    }
}

fn check_against_peft(name: &str, rslora: bool) {
    let f: HashMap<String, Tensor> = candle_core::safetensors::load(
        fixtures().join("lora/lora_grads.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let ids = f["input_ids"].to_dtype(DType::U32).unwrap();
    let mask = &f["attention_mask"];
    let labels = &f["labels"];
    let model = common::llama::load("base", DType::F32, false);
    let adapter =
        LoraAdapter::load_pretrained(fixtures().join("lora").join(name), &Device::Cpu).unwrap();
    assert_eq!(adapter.config().use_rslora, rslora);
    assert_eq!(adapter.config().scaling(), if rslora { 4.0 } else { 2.0 });

    let grads = lora_gradients(&model, &adapter, &ids, Some(mask), labels).unwrap();
    let tol = lookup(Op::LoraGrad, Dtype::F32);

    // transformers' loss: the mean over the shifted labels that are not -100.
    let shifted_labels = labels
        .narrow(1, 1, labels.dim(1).unwrap() - 1)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<i64>()
        .unwrap();
    let label_tokens = shifted_labels
        .iter()
        .filter(|&&l| l != IGNORE_INDEX)
        .count();
    assert_eq!(grads.label_tokens, label_tokens, "{name}: label tokens");
    let want_loss = f[&format!("{name}.loss")].to_scalar::<f32>().unwrap();
    let loss_err = (grads.loss - want_loss).abs();
    if let Err(m) = tol.check(&[grads.loss], &[want_loss]) {
        panic!("{name} loss: {m}");
    }

    // The gradient keys: exactly PEFT's, 7 targets × layers × {A, B}.
    let prefix = format!("{name}.");
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
    let got_keys: BTreeSet<String> = got.keys().cloned().collect();
    assert_eq!(got_keys, want_keys, "{name}: gradient keys");
    let layers = model.config().num_hidden_layers;
    assert_eq!(
        want_keys.len(),
        7 * layers * 2,
        "{name}: PEFT gradient count"
    );

    let mut errors = Errors::default();
    let mut failures = Vec::new();
    let mut largest = 0f32;
    for key in &want_keys {
        let want = &f[&format!("{prefix}{key}")];
        let got = got[key];
        assert_eq!(got.dims(), want.dims(), "{name} {key}: shape");
        assert_eq!(got.dtype(), DType::F32, "{name} {key}: dtype");
        let (got, want) = (values(got), values(want));
        largest = want.iter().fold(largest, |m, w| m.max(w.abs()));
        errors.add(&got, &want, tol);
        if let Err(m) = tol.check(&got, &want) {
            failures.push(format!("{key}: {m}"));
        }
    }
    let summary = format!(
        "{name}: loss {} vs PEFT {want_loss} (|err| {loss_err:e}); {} gradients, max abs err \
         {:e}, max rel err {:e}, {:.3} of the tolerance (atol {:e}, rtol {:e}), largest |grad| {largest:e}",
        grads.loss,
        want_keys.len(),
        errors.abs,
        errors.rel,
        errors.tol_used,
        tol.atol,
        tol.rtol
    );
    eprintln!("{summary}");
    assert!(largest > 1e-3, "{name}: PEFT's gradients are all near zero");
    assert!(
        failures.is_empty(),
        "{summary}\n{} tensors out of tolerance:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn lora_gradients_match_peft() {
    check_against_peft("r4_all", false);
}

#[test]
fn rslora_gradients_match_peft() {
    check_against_peft("r4_all_rslora", true);
}
