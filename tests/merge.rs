//! `qlora merge`: a LoRA adapter folded into the tiny Llama fixtures (dense bf16 `base`, bnb NF4
//! `bnb_nf4`) and written as a model folder. The merged model alone must give the logits of the
//! base run with the adapter, its weights must equal PEFT's `merge_and_unload()`
//! (tests/fixtures/lora/merged.safetensors), shards and index must be consistent, and a wrong
//! adapter must fail with a typed error before anything is written.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{DType, Device, Tensor};
use common::llama::{fixture_dir, kept_rows, max_abs_diff};
use qlora::model::config::TorchDtype;
use qlora::model::llama::LlamaModel;
use qlora::model::{Linear, LlamaConfig, LlamaWeights, LoadOptions};
use qlora::peft::merge::{lora_delta, merge_adapter, merge_adapter_dir, MergeOptions};
use qlora::peft::{LoraAdapter, LoraConfig, LoraMode, LoraPair, TargetModule};
use qlora::quant::nf4::Nf4Tensor;
use qlora::tolerance::{lookup, Dtype, Op};
use qlora::Error;
use safetensors::SafeTensors;
use serde_json::Value;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn adapter_dir(name: &str) -> PathBuf {
    fixtures().join("lora").join(name)
}

/// A fresh scratch folder for one test.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("qlora-merge-{}-{name}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    dir
}

fn options(dtype: TorchDtype) -> MergeOptions {
    MergeOptions {
        dtype,
        ..MergeOptions::default()
    }
}

/// The padded forward batch of the LoRA fixtures (ids as u32, mask as i64).
fn batch() -> (Tensor, Tensor) {
    let f = candle_core::safetensors::load(
        fixtures().join("lora/lora_logits.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    (
        f["input_ids"].to_dtype(DType::U32).unwrap(),
        f["attention_mask"].clone(),
    )
}

fn load_model(dir: &Path, dtype: DType) -> LlamaModel {
    let config = LlamaConfig::from_file(dir.join("config.json")).unwrap();
    let options = LoadOptions {
        dtype,
        device: Device::Cpu,
        quantize: false,
    };
    let weights = LlamaWeights::load(dir, &config, &options).unwrap();
    LlamaModel::new(config, weights).unwrap()
}

fn logits(model: &LlamaModel, adapter: Option<&LoraAdapter>) -> Vec<f32> {
    let (ids, mask) = batch();
    let out = match adapter {
        Some(a) => model
            .forward_with_adapter(&ids, Some(&mask), a, &LoraMode::Eval)
            .unwrap(),
        None => model.forward(&ids, Some(&mask)).unwrap(),
    };
    kept_rows(&out, &mask)
}

/// Every tensor of the checkpoint in `dir` (one file or shards): name -> (dtype, shape, f32 values
/// for float tensors).
fn read_tensors(dir: &Path) -> BTreeMap<String, (safetensors::Dtype, Vec<usize>, Vec<f32>)> {
    let mut out = BTreeMap::new();
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if !(name.starts_with("model") && name.ends_with(".safetensors")) {
            continue; // e.g. the fixtures' rope.safetensors
        }
        let bytes = fs::read(&path).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        for (name, view) in st.tensors() {
            let values: Vec<f32> = match view.dtype() {
                safetensors::Dtype::F32 => view
                    .data()
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect(),
                safetensors::Dtype::BF16 => view
                    .data()
                    .chunks_exact(2)
                    .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                    .collect(),
                safetensors::Dtype::F16 => view
                    .data()
                    .chunks_exact(2)
                    .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                    .collect(),
                _ => Vec::new(),
            };
            assert!(
                out.insert(name.clone(), (view.dtype(), view.shape().to_vec(), values))
                    .is_none(),
                "{name} stored twice"
            );
        }
    }
    out
}

fn config_json(dir: &Path) -> serde_json::Map<String, Value> {
    match serde_json::from_str(&fs::read_to_string(dir.join("config.json")).unwrap()).unwrap() {
        Value::Object(m) => m,
        other => panic!("config.json is {other}"),
    }
}

fn check(op: Op, dtype: Dtype, got: &[f32], want: &[f32], what: &str) {
    if let Err(e) = lookup(op, dtype).check(got, want) {
        panic!("{what}: {e}");
    }
}

#[test]
fn f32_merge_gives_the_logits_of_the_base_run_with_the_adapter() {
    let base = common::llama::load("base", DType::F32, false);
    for name in ["r4_all", "r4_all_rslora"] {
        let out = scratch(&format!("f32-{name}"));
        let summary = merge_adapter_dir(
            fixture_dir("base"),
            adapter_dir(name),
            &out,
            &options(TorchDtype::F32),
        )
        .unwrap();
        assert_eq!(summary.merged_modules, 14);
        assert_eq!(summary.nf4_modules, 0);
        assert_eq!(summary.files, vec![out.join("model.safetensors")]);
        let adapter = LoraAdapter::load_pretrained(adapter_dir(name), &Device::Cpu).unwrap();
        let want = logits(&base, Some(&adapter));
        let got = logits(&load_model(&out, DType::F32), None);
        println!(
            "{name}: merged f32 vs base + adapter, max |Δlogit| {:.3e}",
            max_abs_diff(&got, &want)
        );
        check(Op::MergedLogits, Dtype::F32, &got, &want, name);
        // The adapter moves the logits far beyond the bf16 tolerance, so the checks have teeth.
        let moved = max_abs_diff(&logits(&base, None), &want);
        println!("{name}: the adapter moves the logits by up to {moved:.3e}");
        let bf16 = lookup(Op::MergedLogits, Dtype::BF16);
        assert!(moved > 10.0 * bf16.atol, "{moved}");
        fs::remove_dir_all(&out).unwrap();
    }
}

#[test]
fn bf16_merge_gives_the_logits_of_the_base_run_with_the_adapter_within_bf16() {
    let out = scratch("bf16");
    merge_adapter_dir(
        fixture_dir("base"),
        adapter_dir("r4_all"),
        &out,
        &MergeOptions::default(),
    )
    .unwrap();
    let tensors = read_tensors(&out);
    assert!(tensors
        .values()
        .all(|(dtype, _, _)| *dtype == safetensors::Dtype::BF16));
    assert_eq!(config_json(&out)["dtype"], "bfloat16");
    let adapter = LoraAdapter::load_pretrained(adapter_dir("r4_all"), &Device::Cpu).unwrap();
    let want = logits(
        &common::llama::load("base", DType::F32, false),
        Some(&adapter),
    );
    let got = logits(&load_model(&out, DType::F32), None);
    println!(
        "bf16 merged (f32 compute) vs base + adapter, max |Δlogit| {:.3e}",
        max_abs_diff(&got, &want)
    );
    check(Op::MergedLogits, Dtype::BF16, &got, &want, "bf16 merge");
    fs::remove_dir_all(&out).unwrap();
}

#[test]
fn f32_merge_equals_peft_merge_and_unload() {
    let bytes = fs::read(fixtures().join("lora/merged.safetensors")).unwrap();
    let peft = SafeTensors::deserialize(&bytes).unwrap();
    let f32s = |key: &str| -> Vec<f32> {
        let v = peft.tensor(key).unwrap_or_else(|e| panic!("{key}: {e}"));
        v.data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect()
    };
    let f64s = |key: &str| -> Vec<f64> {
        let v = peft.tensor(key).unwrap_or_else(|e| panic!("{key}: {e}"));
        v.data()
            .chunks_exact(8)
            .map(|b| f64::from_le_bytes(b.try_into().unwrap()))
            .collect()
    };
    let base = read_tensors(&fixture_dir("base"));
    for name in ["r4_all", "r4_all_rslora"] {
        let out = scratch(&format!("peft-{name}"));
        merge_adapter_dir(
            fixture_dir("base"),
            adapter_dir(name),
            &out,
            &options(TorchDtype::F32),
        )
        .unwrap();
        let merged = read_tensors(&out);
        assert_eq!(
            merged.keys().collect::<Vec<_>>(),
            base.keys().collect::<Vec<_>>()
        );
        let mut linears = 0;
        for (key, (_, shape, w)) in &merged {
            if !key.contains("_proj.") {
                // Embeddings, norms and lm_head: the base's values, widened exactly.
                assert_eq!(w, &base[key].2, "{key}");
                continue;
            }
            linears += 1;
            let (rows, cols) = (shape[0], shape[1]);
            let sample: Vec<f32> = w.iter().step_by(7).copied().collect();
            check(
                Op::LoraMerge,
                Dtype::F32,
                &sample,
                &f32s(&format!("{name}.{key}.sample")),
                key,
            );
            let row_sums: Vec<f32> = (0..rows)
                .map(|r| {
                    w[r * cols..(r + 1) * cols]
                        .iter()
                        .map(|&v| f64::from(v))
                        .sum::<f64>() as f32
                })
                .collect();
            let col_sums: Vec<f32> = (0..cols)
                .map(|c| (0..rows).map(|r| f64::from(w[r * cols + c])).sum::<f64>() as f32)
                .collect();
            let want_rows: Vec<f32> = f64s(&format!("{name}.{key}.row_sum"))
                .into_iter()
                .map(|v| v as f32)
                .collect();
            let want_cols: Vec<f32> = f64s(&format!("{name}.{key}.col_sum"))
                .into_iter()
                .map(|v| v as f32)
                .collect();
            check(Op::LoraMerge, Dtype::F32, &row_sums, &want_rows, key);
            check(Op::LoraMerge, Dtype::F32, &col_sums, &want_cols, key);
            // The merge changed the weight (the fixture is not the base).
            assert_ne!(w, &base[key].2, "{key}");
        }
        assert_eq!(linears, 14);
        fs::remove_dir_all(&out).unwrap();
    }
}

#[test]
fn nf4_base_merge_gives_the_logits_of_the_nf4_base_run_with_the_adapter() {
    let out = scratch("nf4");
    let summary = merge_adapter_dir(
        fixture_dir("bnb_nf4"),
        adapter_dir("r4_all"),
        &out,
        &MergeOptions {
            dtype: TorchDtype::F32,
            requantize_report: true,
            ..MergeOptions::default()
        },
    )
    .unwrap();
    assert_eq!((summary.merged_modules, summary.nf4_modules), (14, 14));
    let config = config_json(&out);
    assert!(!config.contains_key("quantization_config"));
    assert_eq!(config["dtype"], "float32");
    // No NF4 state survives: every tensor is a dense f32 weight of the base's logical shape.
    let tensors = read_tensors(&out);
    assert_eq!(tensors.len(), 21);
    assert!(tensors
        .values()
        .all(|(dtype, _, _)| *dtype == safetensors::Dtype::F32));

    let adapter = LoraAdapter::load_pretrained(adapter_dir("r4_all"), &Device::Cpu).unwrap();
    let nf4 = common::llama::load("bnb_nf4", DType::F32, false);
    let want = logits(&nf4, Some(&adapter));
    let got = logits(&load_model(&out, DType::F32), None);
    println!(
        "NF4 base merged (f32) vs NF4 base + adapter, max |Δlogit| {:.3e}",
        max_abs_diff(&got, &want)
    );
    check(Op::MergedLogits, Dtype::F32, &got, &want, "nf4 merge");

    // The report: each merged linear as written, quantized to NF4 and back, against itself.
    let report = summary.report.unwrap();
    assert_eq!(report.modules.len(), 14);
    assert!(report.modules.iter().all(|m| m.merged));
    let (mut se_all, mut norm_all) = (0f64, 0f64);
    for m in &report.modules {
        let (_, shape, w) = &tensors[&m.name];
        let q = Nf4Tensor::quantize(w, shape, 64, true).unwrap();
        let back = q.dequantize().unwrap();
        let (mut se, mut norm, mut max_abs) = (0f64, 0f64, 0f64);
        for (&a, &b) in w.iter().zip(&back) {
            let d = f64::from(b) - f64::from(a);
            se += d * d;
            norm += f64::from(a) * f64::from(a);
            max_abs = max_abs.max(d.abs());
        }
        assert_eq!(m.numel, w.len());
        assert_eq!(m.error.relative_error, (se / norm).sqrt(), "{}", m.name);
        assert_eq!(m.error.max_abs_error, max_abs, "{}", m.name);
        se_all += se;
        norm_all += norm;
    }
    assert_eq!(report.overall.relative_error, (se_all / norm_all).sqrt());
    println!(
        "re-quantizing the merged NF4 model: relative error {:.4}, max |err| {:.3e}",
        report.overall.relative_error, report.overall.max_abs_error
    );
    fs::remove_dir_all(&out).unwrap();
}

#[test]
fn nf4_merge_of_a_zero_adapter_is_the_dequantized_base_bit_for_bit() {
    let dir = fixture_dir("bnb_nf4");
    let config = LlamaConfig::from_file(dir.join("config.json")).unwrap();
    let lora = LoraConfig {
        r: 2,
        alpha: 4.0,
        target_modules: vec![TargetModule::QProj, TargetModule::VProj],
        ..LoraConfig::default()
    };
    // PEFT's init: B = 0, so W + s·B·A is the dequantized base, adapted or not.
    let adapter = LoraAdapter::init(lora, &config, DType::F32, &Device::Cpu, 5).unwrap();
    let out = scratch("nf4-zero");
    let summary = merge_adapter(
        &dir,
        &adapter,
        &out,
        &MergeOptions {
            dtype: TorchDtype::F32,
            requantize_report: true,
            ..MergeOptions::default()
        },
    )
    .unwrap();
    assert_eq!((summary.merged_modules, summary.nf4_modules), (4, 14));
    let report = summary.report.unwrap();
    assert_eq!(report.modules.iter().filter(|m| m.merged).count(), 4);
    let nf4 = common::llama::load("bnb_nf4", DType::F32, false);
    let merged = load_model(&out, DType::F32);
    assert_eq!(logits(&merged, None), logits(&nf4, None));
    fs::remove_dir_all(&out).unwrap();
}

#[test]
fn sharded_merge_writes_a_consistent_index_and_replaces_stale_shards() {
    let out = scratch("sharded");
    let max_shard_bytes = 60_000;
    let summary = merge_adapter_dir(
        fixture_dir("base"),
        adapter_dir("r4_all"),
        &out,
        &MergeOptions {
            max_shard_bytes,
            ..MergeOptions::default()
        },
    )
    .unwrap();
    let n = summary.files.len();
    assert!(n > 2, "{n} shards");
    let index: Value = serde_json::from_str(
        &fs::read_to_string(out.join("model.safetensors.index.json")).unwrap(),
    )
    .unwrap();
    let weight_map = index["weight_map"].as_object().unwrap();
    let mut seen = BTreeSet::new();
    let mut total = 0u64;
    for (i, file) in summary.files.iter().enumerate() {
        let name = file.file_name().unwrap().to_str().unwrap();
        assert_eq!(name, format!("model-{:05}-of-{n:05}.safetensors", i + 1));
        let bytes = fs::read(file).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let mut shard_bytes = 0u64;
        for (tensor, view) in st.tensors() {
            assert_eq!(weight_map[&tensor], name, "{tensor}");
            assert!(seen.insert(tensor.clone()), "{tensor} in two shards");
            shard_bytes += view.data().len() as u64;
        }
        assert!(shard_bytes <= max_shard_bytes || st.len() == 1, "{name}");
        total += shard_bytes;
    }
    assert_eq!(seen.len(), weight_map.len());
    assert_eq!(index["metadata"]["total_size"], total);
    assert_eq!(index["metadata"]["total_parameters"], 115560);

    // The sharded folder loads to the same model as a single file.
    let single = scratch("single");
    merge_adapter_dir(
        fixture_dir("base"),
        adapter_dir("r4_all"),
        &single,
        &MergeOptions::default(),
    )
    .unwrap();
    assert_eq!(
        logits(&load_model(&out, DType::BF16), None),
        logits(&load_model(&single, DType::BF16), None)
    );

    // Writing again into the same folder unsharded leaves no stale shard or index behind.
    merge_adapter_dir(
        fixture_dir("base"),
        adapter_dir("r4_all"),
        &out,
        &MergeOptions::default(),
    )
    .unwrap();
    let mut left: Vec<String> = fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    left.sort();
    assert_eq!(left, ["config.json", "model.safetensors"]);
    fs::remove_dir_all(&out).unwrap();
    fs::remove_dir_all(&single).unwrap();
}

/// A copy of the `base` fixture with tokenizer files, in a scratch folder.
fn base_with_tokenizer(name: &str) -> PathBuf {
    let dir = scratch(name);
    for f in ["config.json", "model.safetensors"] {
        fs::copy(fixture_dir("base").join(f), dir.join(f)).unwrap();
    }
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        fs::copy(fixtures().join("tokenizer").join(f), dir.join(f)).unwrap();
    }
    fs::write(
        dir.join("generation_config.json"),
        "{\n  \"bos_token_id\": 1,\n  \"eos_token_id\": 2\n}\n",
    )
    .unwrap();
    dir
}

#[test]
fn merge_copies_tokenizer_files_and_only_changes_the_config_dtype() {
    let base = base_with_tokenizer("tok-base");
    let out = scratch("tok-out");
    let summary = merge_adapter_dir(
        &base,
        adapter_dir("r4_all"),
        &out,
        &options(TorchDtype::F16),
    )
    .unwrap();
    assert_eq!(
        summary.copied_files,
        [
            "tokenizer.json",
            "tokenizer_config.json",
            "generation_config.json"
        ]
    );
    for f in &summary.copied_files {
        assert_eq!(
            fs::read(base.join(f)).unwrap(),
            fs::read(out.join(f)).unwrap()
        );
    }
    let (mut before, mut after) = (config_json(&base), config_json(&out));
    assert_eq!(after.remove("dtype"), Some(Value::from("float16")));
    before.remove("dtype");
    assert_eq!(before, after);
    // transformers' JSON style: sorted keys, two-space indent, Python float reprs.
    let text = fs::read_to_string(out.join("config.json")).unwrap();
    assert!(text.contains("\n  \"rms_norm_eps\": 1e-05,\n"), "{text}");
    assert!(read_tensors(&out)
        .values()
        .all(|(dtype, _, _)| *dtype == safetensors::Dtype::F16));
    let adapter = LoraAdapter::load_pretrained(adapter_dir("r4_all"), &Device::Cpu).unwrap();
    let want = logits(
        &common::llama::load("base", DType::F32, false),
        Some(&adapter),
    );
    let got = logits(&load_model(&out, DType::F32), None);
    println!(
        "f16 merged (f32 compute) vs base + adapter, max |Δlogit| {:.3e}",
        max_abs_diff(&got, &want)
    );
    check(Op::MergedLogits, Dtype::F16, &got, &want, "f16 merge");
    fs::remove_dir_all(&base).unwrap();
    fs::remove_dir_all(&out).unwrap();
}

#[test]
fn an_adapter_for_another_model_is_refused_before_writing() {
    let config = LlamaConfig::from_file(fixture_dir("base").join("config.json")).unwrap();
    let out = scratch("mismatch").join("never");
    for other in [
        LlamaConfig {
            num_hidden_layers: 3,
            ..config.clone()
        },
        LlamaConfig {
            hidden_size: 96,
            head_dim: 16,
            ..config.clone()
        },
    ] {
        let adapter =
            LoraAdapter::init(LoraConfig::default(), &other, DType::F32, &Device::Cpu, 1).unwrap();
        let err = merge_adapter(
            fixture_dir("base"),
            &adapter,
            &out,
            &MergeOptions::default(),
        )
        .unwrap_err();
        assert!(matches!(err, Error::AdapterMismatch { .. }), "{err}");
        assert!(!out.exists(), "nothing is written for a refused adapter");
    }
    fs::remove_dir_all(out.parent().unwrap()).unwrap();
}

#[test]
fn a_base_tensor_whose_shape_disagrees_with_its_config_is_a_bad_tensor() {
    let base = scratch("bad-shape");
    fs::copy(
        fixture_dir("base").join("model.safetensors"),
        base.join("model.safetensors"),
    )
    .unwrap();
    let mut config = config_json(&fixture_dir("base"));
    config.insert("intermediate_size".to_string(), Value::from(128));
    fs::write(
        base.join("config.json"),
        serde_json::to_string(&config).unwrap(),
    )
    .unwrap();
    let llama = LlamaConfig::from_file(base.join("config.json")).unwrap();
    let lora = LoraConfig {
        target_modules: vec![TargetModule::GateProj],
        ..LoraConfig::default()
    };
    let adapter = LoraAdapter::init(lora, &llama, DType::F32, &Device::Cpu, 1).unwrap();
    let err =
        merge_adapter(&base, &adapter, base.join("out"), &MergeOptions::default()).unwrap_err();
    match err {
        Error::BadTensor { key, .. } => assert_eq!(key, "model.layers.0.mlp.gate_proj.weight"),
        other => panic!("{other}"),
    }
    fs::remove_dir_all(&base).unwrap();
}

#[test]
fn missing_adapter_and_output_onto_the_base_are_refused() {
    let out = scratch("missing");
    let err = merge_adapter_dir(
        fixture_dir("base"),
        out.join("no-such-adapter"),
        &out,
        &MergeOptions::default(),
    )
    .unwrap_err();
    assert!(matches!(err, Error::Io { .. }), "{err}");
    let adapter = LoraAdapter::load_pretrained(adapter_dir("r4_all"), &Device::Cpu).unwrap();
    let base = base_with_tokenizer("onto-base");
    let err = merge_adapter(&base, &adapter, &base, &MergeOptions::default()).unwrap_err();
    assert!(matches!(err, Error::InvalidArgument { .. }), "{err}");
    assert!(base.join("model.safetensors").exists());
    fs::remove_dir_all(&out).unwrap();
    fs::remove_dir_all(&base).unwrap();
}

/// `s·B·A` through `LoraPair` directly: the merged weight is `W + delta`, elementwise in f32.
#[test]
fn lora_delta_is_scaling_times_b_times_a() {
    let a = Tensor::from_vec(vec![1f32, 2.0, 3.0, -1.0, 0.5, 0.25], (2, 3), &Device::Cpu).unwrap();
    let b = Tensor::from_vec(vec![1f32, 0.0, 2.0, -1.0], (2, 2), &Device::Cpu).unwrap();
    let delta = qlora::peft::merge::lora_delta(&LoraPair { a, b }, 0.5).unwrap();
    // B·A = [[1, 2, 3], [3, 3.5, 5.75]], times 0.5.
    assert_eq!(delta, [0.5, 1.0, 1.5, 1.5, 1.75, 2.875]);
}

fn qlora_bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_qlora"))
}

#[test]
fn cli_merges_with_a_requantize_report_and_fails_cleanly_on_a_missing_adapter() {
    let out = scratch("cli");
    let report = out.join("report.json");
    let run = qlora_bin()
        .args(["merge", "--base"])
        .arg(fixture_dir("bnb_nf4"))
        .arg("--adapter")
        .arg(adapter_dir("r4_all"))
        .arg("--output")
        .arg(out.join("model"))
        .args(["--max-shard-size", "100KB", "--requantize-report"])
        .arg(&report)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(
        stdout.contains("merged 14 linears (14 NF4 base linears dequantized)"),
        "{stdout}"
    );
    let json: Value = serde_json::from_str(&fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(json["modules"].as_array().unwrap().len(), 14);
    assert_eq!(json["dtype"], "bfloat16");
    let rel = json["overall"]["relative_error"].as_f64().unwrap();
    assert!(
        rel > 0.05 && rel < 0.15,
        "NF4 error of normal weights is ~0.09, got {rel}"
    );
    assert!(out.join("model/model.safetensors.index.json").exists());

    let run = qlora_bin()
        .args(["merge", "--base"])
        .arg(fixture_dir("base"))
        .arg("--adapter")
        .arg(out.join("no-adapter"))
        .arg("--output")
        .arg(out.join("never"))
        .output()
        .unwrap();
    assert!(!run.status.success());
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        stderr.starts_with("error: ") && stderr.contains("no-adapter"),
        "{stderr}"
    );
    assert!(!out.join("never").exists());
    fs::remove_dir_all(&out).unwrap();
}

#[test]
fn a_merged_nf4_folder_loads_as_a_dense_model() {
    let out = scratch("dense");
    merge_adapter_dir(
        fixture_dir("bnb_nf4"),
        adapter_dir("r4_all"),
        &out,
        &MergeOptions::default(),
    )
    .unwrap();
    let config = LlamaConfig::from_file(out.join("config.json")).unwrap();
    assert!(config.quantization.is_none());
    let weights = LlamaWeights::load(
        &out,
        &config,
        &LoadOptions {
            dtype: DType::BF16,
            device: Device::Cpu,
            quantize: false,
        },
    )
    .unwrap();
    let kinds: HashMap<bool, usize> = weights
        .layers
        .iter()
        .flat_map(|l| {
            [
                &l.q_proj,
                &l.k_proj,
                &l.v_proj,
                &l.o_proj,
                &l.gate_proj,
                &l.up_proj,
                &l.down_proj,
            ]
        })
        .fold(HashMap::new(), |mut m, lin| {
            *m.entry(matches!(lin, Linear::Dense(_))).or_default() += 1;
            m
        });
    assert_eq!(kinds, HashMap::from([(true, 14)]));
    fs::remove_dir_all(&out).unwrap();
}

#[test]
fn a_bf16_adapters_delta_is_rounded_to_bf16_as_peft_does_on_the_cpu() {
    // PEFT's get_delta_weight widens a bf16 adapter on the CPU, multiplies and scales in f32,
    // and casts the delta back to bf16 before the add; an f32 adapter's delta stays f32.
    let a: Vec<f32> = (0..3 * 5)
        .map(|i| ((i * 7 % 11) as f32 - 5.0) / 9.0)
        .collect();
    let b: Vec<f32> = (0..4 * 3)
        .map(|i| ((i * 5 % 13) as f32 - 6.0) / 7.0)
        .collect();
    let pair = |dtype: DType| LoraPair {
        a: Tensor::from_vec(a.clone(), (3, 5), &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap(),
        b: Tensor::from_vec(b.clone(), (4, 3), &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap(),
    };
    let scaling = 2.5;
    let bf = pair(DType::BF16);
    let widened = LoraPair {
        a: bf.a.to_dtype(DType::F32).unwrap(),
        b: bf.b.to_dtype(DType::F32).unwrap(),
    };
    let f32_delta = lora_delta(&widened, scaling).unwrap();
    let bf16_delta = lora_delta(&bf, scaling).unwrap();
    let rounded: Vec<f32> = f32_delta
        .iter()
        .map(|&v| half::bf16::from_f32(v).to_f32())
        .collect();
    assert_eq!(bf16_delta, rounded);
    assert_ne!(f32_delta, rounded, "the case must exercise the rounding");
    // An f32 adapter: s·(B·A) unrounded.
    let exact = lora_delta(&pair(DType::F32), scaling).unwrap();
    assert!(exact.iter().any(|&v| half::bf16::from_f32(v).to_f32() != v));
}

/// A copy of the fixture adapter `name` with a `qlora_base.json` saying it trained against the
/// base quantized to NF4 on load in `from` (what `qlora train --quantize nf4` writes).
fn adapter_trained_on_nf4(name: &str, from: &str) -> PathBuf {
    use qlora::peft::base_record::{BaseLinears, BaseRecord};
    let dir = scratch(&format!("adapter-{name}-{from}"));
    for entry in fs::read_dir(adapter_dir(name)).unwrap() {
        let entry = entry.unwrap();
        fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
    }
    BaseRecord {
        linears: BaseLinears::Nf4OnLoad,
        blocksize: Some(64),
        double_quant: Some(true),
        quantized_from: Some(from.to_string()),
        model: "base".to_string(),
    }
    .write(&dir)
    .unwrap();
    dir
}

#[test]
fn an_adapter_trained_on_nf4_merges_into_the_nf4_weights_it_trained_against() {
    // The QLoRA model a run trained: the dense base quantized on load (f32), plus the adapter.
    // Merged by default (into the weights training saw), the merged model alone gives its
    // logits; merged into the original dense weights, it is further off and says so.
    use qlora::peft::merge::BaseWeights;
    let recorded = adapter_trained_on_nf4("r4_all", "float32");
    let adapter = LoraAdapter::load_pretrained(&recorded, &Device::Cpu).unwrap();
    let trained = common::llama::load("base", DType::F32, true);
    let want = logits(&trained, Some(&adapter));

    let out = scratch("trained-base");
    let summary = merge_adapter_dir(
        fixture_dir("base"),
        &recorded,
        &out,
        &options(TorchDtype::F32),
    )
    .unwrap();
    assert_eq!(
        summary.requantized_modules, 14,
        "every dense linear of the base"
    );
    assert!(summary.record.is_some() && summary.original_vs_trained.is_none());
    let got = logits(&load_model(&out, DType::F32), None);
    let on_trained = max_abs_diff(&got, &want);
    println!("merged into the NF4 weights vs the QLoRA model, max |Δlogit| {on_trained:.3e}");
    check(
        Op::MergedLogits,
        Dtype::F32,
        &got,
        &want,
        "merge into NF4 weights",
    );

    let out_original = scratch("original-base");
    let summary = merge_adapter_dir(
        fixture_dir("base"),
        &recorded,
        &out_original,
        &MergeOptions {
            base_weights: BaseWeights::Original,
            ..options(TorchDtype::F32)
        },
    )
    .unwrap();
    assert_eq!(summary.requantized_modules, 0);
    let change = summary.original_vs_trained.unwrap();
    println!(
        "original vs NF4 weights: {:.2}% relative RMS",
        100.0 * change
    );
    assert!(change > 0.01 && change < 0.5, "{change}");
    let got = logits(&load_model(&out_original, DType::F32), None);
    let on_original = max_abs_diff(&got, &want);
    println!("merged into the original weights vs the QLoRA model, max |Δlogit| {on_original:.3e}");
    assert!(
        on_original > 100.0 * on_trained.max(1e-6),
        "{on_original} vs {on_trained}"
    );

    // Without a record, the merge takes the base as stored (a PEFT adapter, say).
    let out_plain = scratch("no-record");
    let summary = merge_adapter_dir(
        fixture_dir("base"),
        adapter_dir("r4_all"),
        &out_plain,
        &options(TorchDtype::F32),
    )
    .unwrap();
    assert!(summary.record.is_none() && summary.requantized_modules == 0);
    for d in [out, out_original, out_plain, recorded] {
        fs::remove_dir_all(d).unwrap();
    }
}
