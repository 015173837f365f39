//! LoRA against Hugging Face PEFT on the f32 `base` tiny Llama: adapter directories written by
//! PEFT's `save_pretrained` (tests/fixtures/lora/<name>/, r = 4, alpha = 8, all seven linears,
//! rsLoRA off and on, seeded non-zero B) and PEFT's logits for the padded forward batch
//! (tests/fixtures/lora/lora_logits.safetensors), all written by scripts/make_fixtures.py.

mod common;

use common::llama::{kept_rows, max_abs_diff};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use qlora::model::llama::LlamaModel;
use qlora::peft::lora::{
    kaiming_uniform_bound, ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, PEFT_FORMAT_VERSION,
};
use qlora::peft::{LoraAdapter, LoraConfig, LoraMode, TargetModule};
use qlora::tolerance::{lookup, Dtype, Op};
use qlora::Error;
use serde_json::Value;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn adapter_dir(name: &str) -> PathBuf {
    fixtures().join("lora").join(name)
}

fn peft_logits() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(
        fixtures().join("lora/lora_logits.safetensors"),
        &Device::Cpu,
    )
    .unwrap()
}

fn batch(f: &HashMap<String, Tensor>) -> (Tensor, Tensor) {
    (
        f["input_ids"].to_dtype(DType::U32).unwrap(),
        f["attention_mask"].clone(),
    )
}

fn check_peft_logits(name: &str, rslora: bool) {
    let model = common::llama::load("base", DType::F32, false);
    let adapter = LoraAdapter::load_pretrained(adapter_dir(name), &Device::Cpu).unwrap();
    assert_eq!(adapter.config().use_rslora, rslora);
    assert_eq!(adapter.config().r, 4);
    assert_eq!(adapter.config().scaling(), if rslora { 4.0 } else { 2.0 });
    assert_eq!(adapter.dtype(), DType::F32);
    assert_eq!(adapter.pairs().count(), 2 * 7);
    let f = peft_logits();
    let (ids, mask) = batch(&f);
    let logits = model
        .forward_with_adapter(&ids, Some(&mask), &adapter, &LoraMode::Eval)
        .unwrap();
    let got = kept_rows(&logits, &mask);
    let want = kept_rows(&f[&format!("{name}.logits")], &mask);
    let base = kept_rows(&model.forward(&ids, Some(&mask)).unwrap(), &mask);
    let adapter_effect = max_abs_diff(&base, &want);
    eprintln!(
        "{name}: max |logit diff| vs PEFT {:e} over {} values (adapter moves logits by {adapter_effect:e})",
        max_abs_diff(&got, &want),
        got.len()
    );
    assert!(adapter_effect > 1e-2, "the fixture adapter barely matters");
    if let Err(m) = lookup(Op::LlamaLogits, Dtype::F32).check(&got, &want) {
        panic!("{name} logits: {m}");
    }
}

#[test]
fn peft_adapter_logits_match_peft() {
    check_peft_logits("r4_all", false);
}

#[test]
fn peft_rslora_adapter_logits_match_peft() {
    check_peft_logits("r4_all_rslora", true);
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("qlora-lora-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn save_pretrained_reproduces_peft_files() {
    for name in ["r4_all", "r4_all_rslora"] {
        let peft = adapter_dir(name);
        let adapter = LoraAdapter::load_pretrained(&peft, &Device::Cpu).unwrap();
        let out = temp_dir(name);
        adapter.save_pretrained(&out).unwrap();

        // The tensors: names, shapes, dtypes and bytes, and the header metadata; with the same
        // layout rules the files are identical byte for byte.
        let ours = std::fs::read(out.join(ADAPTER_WEIGHTS_FILE)).unwrap();
        let theirs = std::fs::read(peft.join(ADAPTER_WEIGHTS_FILE)).unwrap();
        let (a, b) = (
            safetensors::SafeTensors::deserialize(&ours).unwrap(),
            safetensors::SafeTensors::deserialize(&theirs).unwrap(),
        );
        let mut names = a.names();
        names.sort();
        let mut want_names = b.names();
        want_names.sort();
        assert_eq!(names, want_names, "{name}: tensor names");
        for key in want_names {
            let (x, y) = (a.tensor(key).unwrap(), b.tensor(key).unwrap());
            assert_eq!(x.dtype(), y.dtype(), "{key}");
            assert_eq!(x.shape(), y.shape(), "{key}");
            assert_eq!(x.data(), y.data(), "{key}");
        }
        assert_eq!(ours, theirs, "{name}: adapter_model.safetensors bytes");

        // The config: every field PEFT wrote, same values, same text.
        let ours = read_json(&out.join(ADAPTER_CONFIG_FILE));
        let theirs = read_json(&peft.join(ADAPTER_CONFIG_FILE));
        assert_eq!(ours, theirs, "{name}: adapter_config.json");
        assert_eq!(theirs["peft_version"], PEFT_FORMAT_VERSION);
        assert_eq!(
            std::fs::read_to_string(out.join(ADAPTER_CONFIG_FILE)).unwrap(),
            std::fs::read_to_string(peft.join(ADAPTER_CONFIG_FILE)).unwrap()
        );
        std::fs::remove_dir_all(&out).unwrap();
    }
}

#[test]
fn saved_adapter_loads_back_to_same_logits() {
    let model = common::llama::load("base", DType::F32, false);
    let mut adapter = LoraAdapter::init(
        LoraConfig {
            r: 3,
            alpha: 5.5,
            target_modules: vec![TargetModule::VProj, TargetModule::DownProj],
            ..LoraConfig::default()
        },
        model.config(),
        DType::BF16,
        &Device::Cpu,
        7,
    )
    .unwrap();
    let pair = adapter.pair(1, TargetModule::DownProj).unwrap().clone();
    let b = (pair.b.ones_like().unwrap() * 0.25).unwrap();
    adapter
        .set_pair(
            1,
            TargetModule::DownProj,
            qlora::peft::LoraPair { a: pair.a, b },
        )
        .unwrap();
    let out = temp_dir("roundtrip");
    adapter.save_pretrained(&out).unwrap();
    let config = read_json(&out.join(ADAPTER_CONFIG_FILE));
    assert_eq!(config["lora_alpha"], 5.5);
    assert_eq!(
        config["target_modules"],
        serde_json::json!(["down_proj", "v_proj"])
    );
    let loaded = LoraAdapter::load_pretrained(&out, &Device::Cpu).unwrap();
    assert_eq!(loaded.dtype(), DType::BF16);
    assert_eq!(loaded.config(), adapter.config());
    let f = peft_logits();
    let (ids, mask) = batch(&f);
    let run = |a: &LoraAdapter| {
        model
            .forward_with_adapter(&ids, Some(&mask), a, &LoraMode::Eval)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    let before = run(&adapter);
    assert_eq!(before, run(&loaded));
    assert_ne!(before, run_base(&model, &ids, &mask));
    std::fs::remove_dir_all(&out).unwrap();
}

fn run_base(model: &LlamaModel, ids: &Tensor, mask: &Tensor) -> Vec<f32> {
    model
        .forward(ids, Some(mask))
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

#[test]
fn fresh_adapter_leaves_base_logits_unchanged() {
    let model = common::llama::load("base", DType::F32, false);
    let f = peft_logits();
    let (ids, mask) = batch(&f);
    let base = run_base(&model, &ids, &mask);
    for dtype in [DType::F32, DType::BF16] {
        let adapter = LoraAdapter::init(
            LoraConfig::default(),
            model.config(),
            dtype,
            &Device::Cpu,
            1,
        )
        .unwrap();
        let logits = model
            .forward_with_adapter(&ids, Some(&mask), &adapter, &LoraMode::Eval)
            .unwrap();
        assert_eq!(
            logits.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            base
        );
    }
}

#[test]
fn init_draws_a_from_kaiming_uniform() {
    // torch's kaiming_uniform_(a = √5) bound is 1 / sqrt(fan_in).
    for fan_in in [72, 136, 4096] {
        let bound = kaiming_uniform_bound(fan_in);
        assert!(
            (bound - 1.0 / (fan_in as f64).sqrt()).abs() < 1e-15,
            "{fan_in}"
        );
    }
    let model = common::llama::load("base", DType::F32, false);
    let config = LoraConfig {
        r: 8,
        ..LoraConfig::default()
    };
    let adapter = LoraAdapter::init(config, model.config(), DType::F32, &Device::Cpu, 3).unwrap();
    let mut by_fan_in: HashMap<usize, Vec<f32>> = HashMap::new();
    for ((_, module), pair) in adapter.pairs() {
        let [out_features, in_features] = module.shape(model.config());
        assert_eq!(pair.a.dims(), [8, in_features]);
        assert_eq!(pair.b.dims(), [out_features, 8]);
        let b = pair.b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(b.iter().all(|&v| v == 0.0), "B starts at zero");
        by_fan_in
            .entry(in_features)
            .or_default()
            .extend(pair.a.flatten_all().unwrap().to_vec1::<f32>().unwrap());
    }
    for (fan_in, values) in by_fan_in {
        let bound = kaiming_uniform_bound(fan_in) as f32;
        let n = values.len() as f64;
        let max = values.iter().fold(0f32, |m, v| m.max(v.abs()));
        let mean = values.iter().map(|&v| v as f64).sum::<f64>() / n;
        let var = values
            .iter()
            .map(|&v| (v as f64 - mean).powi(2))
            .sum::<f64>()
            / n;
        let want_var = (bound as f64).powi(2) / 3.0;
        eprintln!("fan_in {fan_in}: {n} values, max |a| {max} (bound {bound}), var {var:e} (uniform {want_var:e})");
        assert!(
            max <= bound && max > 0.99 * bound,
            "fan_in {fan_in}: max {max}"
        );
        assert!(mean.abs() < 4.0 * (want_var / n).sqrt(), "mean {mean}");
        assert!(
            (var / want_var - 1.0).abs() < 0.05,
            "var {var} vs {want_var}"
        );
    }
}

#[test]
fn dropout_runs_only_in_training_and_is_seeded() {
    let model = common::llama::load("base", DType::F32, false);
    let f = peft_logits();
    let (ids, mask) = batch(&f);
    let eval_plain = LoraAdapter::load_pretrained(adapter_dir("r4_all"), &Device::Cpu).unwrap();
    // The dropout comes from the config, as a trainer's adapter gets it.
    let out = temp_dir("dropout");
    eval_plain.save_pretrained(&out).unwrap();
    let mut json = read_json(&out.join(ADAPTER_CONFIG_FILE));
    json["lora_dropout"] = serde_json::json!(0.5);
    std::fs::write(out.join(ADAPTER_CONFIG_FILE), json.to_string()).unwrap();
    let with_dropout = LoraAdapter::load_pretrained(&out, &Device::Cpu).unwrap();
    std::fs::remove_dir_all(&out).unwrap();
    assert_eq!(with_dropout.config().dropout, 0.5);

    let run = |a: &LoraAdapter, mode: LoraMode| {
        model
            .forward_with_adapter(&ids, Some(&mask), a, &mode)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    let eval = run(&eval_plain, LoraMode::Eval);
    assert_eq!(run(&with_dropout, LoraMode::Eval), eval, "eval: identity");
    let train = run(&with_dropout, LoraMode::Train { seed: 9 });
    assert_ne!(train, eval);
    assert_eq!(train, run(&with_dropout, LoraMode::Train { seed: 9 }));
    assert_ne!(train, run(&with_dropout, LoraMode::Train { seed: 10 }));
    assert_eq!(run(&eval_plain, LoraMode::Train { seed: 9 }), eval, "p = 0");
}

/// An edit of a PEFT adapter_config.json.
type ConfigEdit = Box<dyn FnOnce(&mut Value)>;

fn config_field_error(err: Error) -> &'static str {
    match err {
        Error::AdapterConfig { field, .. } => field,
        other => panic!("expected an adapter config error, got {other}"),
    }
}

/// A copy of the r4_all adapter directory with `edit` applied to its config.
fn edited_adapter(name: &str, edit: impl FnOnce(&mut Value)) -> PathBuf {
    let out = temp_dir(name);
    std::fs::create_dir_all(&out).unwrap();
    let mut config = read_json(&adapter_dir("r4_all").join(ADAPTER_CONFIG_FILE));
    edit(&mut config);
    std::fs::write(out.join(ADAPTER_CONFIG_FILE), config.to_string()).unwrap();
    std::fs::copy(
        adapter_dir("r4_all").join(ADAPTER_WEIGHTS_FILE),
        out.join(ADAPTER_WEIGHTS_FILE),
    )
    .unwrap();
    out
}

#[test]
fn bad_configs_give_named_errors() {
    let model = common::llama::load("base", DType::F32, false);
    let init = |config: LoraConfig| {
        LoraAdapter::init(config, model.config(), DType::F32, &Device::Cpu, 0).unwrap_err()
    };
    let zero_r = LoraConfig {
        r: 0,
        ..LoraConfig::default()
    };
    assert_eq!(config_field_error(init(zero_r)), "r");
    let bias = LoraConfig {
        bias: "all".to_string(),
        ..LoraConfig::default()
    };
    assert_eq!(config_field_error(init(bias)), "bias");
    let dropout = LoraConfig {
        dropout: 1.0,
        ..LoraConfig::default()
    };
    assert_eq!(config_field_error(init(dropout)), "lora_dropout");
    let twice = LoraConfig {
        target_modules: vec![TargetModule::QProj, TargetModule::QProj],
        ..LoraConfig::default()
    };
    assert_eq!(config_field_error(init(twice)), "target_modules");
    let err = "lm_head".parse::<TargetModule>().unwrap_err();
    assert!(err.to_string().contains("lm_head"), "{err}");
    assert_eq!(config_field_error(err), "target_modules");

    let cases: [(&str, ConfigEdit, &str); 7] = [
        ("zero_r", Box::new(|c| c["r"] = 0.into()), "r"),
        (
            "unknown_target",
            Box::new(|c| c["target_modules"] = serde_json::json!(["q_proj", "embed_tokens"])),
            "target_modules",
        ),
        (
            "dora",
            Box::new(|c| c["use_dora"] = true.into()),
            "use_dora",
        ),
        (
            "fan_in_fan_out",
            Box::new(|c| c["fan_in_fan_out"] = true.into()),
            "fan_in_fan_out",
        ),
        (
            "rank_pattern",
            Box::new(|c| c["rank_pattern"] = serde_json::json!({"q_proj": 8})),
            "rank_pattern",
        ),
        (
            "prefix",
            Box::new(|c| c["peft_type"] = "PREFIX_TUNING".into()),
            "peft_type",
        ),
        (
            "listed_subset",
            Box::new(|c| c["target_modules"] = serde_json::json!(["q_proj"])),
            "target_modules",
        ),
    ];
    for (name, edit, field) in cases {
        let dir = edited_adapter(name, edit);
        let err = LoraAdapter::load_pretrained(&dir, &Device::Cpu).unwrap_err();
        eprintln!("{name}: {err}");
        // The message names the adapter's config file, not a bare `adapter config:`.
        let file = dir.join("adapter_config.json").display().to_string();
        assert!(err.to_string().contains(&file), "{name}: {err}");
        assert_eq!(config_field_error(err), field, "{name}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

#[test]
fn peft_configs_with_extra_fields_and_string_targets_load() {
    let dir = edited_adapter("string_targets", |c| {
        c["target_modules"] =
            ".*\\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)".into();
        c["some_future_option"] = serde_json::json!({"nested": [1, 2]});
        c["task_type"] = Value::Null;
    });
    let adapter = LoraAdapter::load_pretrained(&dir, &Device::Cpu).unwrap();
    let mut targets = adapter.config().target_modules.clone();
    targets.sort();
    assert_eq!(targets, TargetModule::ALL.to_vec());
    std::fs::remove_dir_all(&dir).unwrap();

    let missing = LoraAdapter::load_pretrained(temp_dir("absent"), &Device::Cpu).unwrap_err();
    assert!(matches!(missing, Error::Io { .. }), "{missing}");
}
