//! `qlora quantize --model-dir`: a whole model folder to a bitsandbytes pre-quantized NF4 folder.
//! The tiny `base` Llama quantized here must be byte for byte the checkpoint bitsandbytes wrote
//! from the same weights (tests/fixtures/llama/bnb_nf4, scripts/make_fixtures.py), load as
//! pre-quantized, and give the logits of quantize-on-load.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{DType, Device, Tensor};
use common::llama::{fixture_dir, kept_rows};
use qlora::model::config::TorchDtype;
use qlora::model::llama::LlamaModel;
use qlora::model::quantize_dir::{bnb_quantization_config, quantize_model_dir, QuantizeDirOptions};
use qlora::model::{Linear, LlamaConfig, LlamaWeights, LoadOptions};
use qlora::Error;
use serde_json::Value;

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("qlora-qdir-{}-{name}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    dir
}

fn config_json(dir: &Path) -> serde_json::Map<String, Value> {
    match serde_json::from_str(&fs::read_to_string(dir.join("config.json")).unwrap()).unwrap() {
        Value::Object(m) => m,
        other => panic!("config.json is {other}"),
    }
}

fn load_weights(dir: &Path, dtype: DType, quantize: bool) -> (LlamaConfig, LlamaWeights) {
    let config = LlamaConfig::from_file(dir.join("config.json")).unwrap();
    let options = LoadOptions {
        dtype,
        device: Device::Cpu,
        quantize,
    };
    let weights = LlamaWeights::load(dir, &config, &options).unwrap();
    (config, weights)
}

fn linears(w: &LlamaWeights) -> Vec<&Linear> {
    w.layers
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
        .collect()
}

fn logits(config: LlamaConfig, weights: LlamaWeights) -> Vec<f32> {
    let f = candle_core::safetensors::load(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama/forward.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let ids: Tensor = f["input_ids"].to_dtype(DType::U32).unwrap();
    let mask = &f["attention_mask"];
    let model = LlamaModel::new(config, weights).unwrap();
    kept_rows(&model.forward(&ids, Some(mask)).unwrap(), mask)
}

/// Loads `out` as stored and `src` quantized on load, both in `dtype`: every linear of `out` is
/// NF4 as stored (never requantized) and equal to quantize-on-load's, and the logits agree bit
/// for bit.
fn check_loads_like_quantize_on_load(out: &Path, src: &Path, dtype: DType) {
    let (config, stored) = load_weights(out, dtype, false);
    let (src_config, on_load) = load_weights(src, dtype, true);
    assert_eq!(
        config.quantization.as_ref().map(|q| q.double_quant),
        Some(true)
    );
    let (a, b) = (linears(&stored), linears(&on_load));
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(&b) {
        match (x, y) {
            (Linear::Nf4(x), Linear::Nf4(y)) => assert_eq!(x, y),
            _ => panic!("a linear is not NF4"),
        }
    }
    assert_eq!(logits(config, stored), logits(src_config, on_load));
}

#[test]
fn quantized_base_is_byte_identical_to_the_bitsandbytes_checkpoint() {
    let out = scratch("bytes");
    let s = quantize_model_dir(fixture_dir("base"), &out, &QuantizeDirOptions::default()).unwrap();
    assert_eq!((s.quantized, s.copied), (14, 7));
    assert_eq!(s.files, vec![out.join("model.safetensors")]);
    assert_eq!(
        fs::read(out.join("model.safetensors")).unwrap(),
        fs::read(fixture_dir("bnb_nf4").join("model.safetensors")).unwrap(),
        "model.safetensors differs from bitsandbytes'"
    );
    let (mut want, mut got) = (config_json(&fixture_dir("bnb_nf4")), config_json(&out));
    assert_eq!(
        got["quantization_config"], want["quantization_config"],
        "transformers' BitsAndBytesConfig.to_dict()"
    );
    assert_eq!(
        got["quantization_config"],
        bnb_quantization_config(true, TorchDtype::BF16)
    );
    // The rest of the config is the input's (the fixture's config adds transformers' defaults).
    got.remove("quantization_config");
    want.remove("quantization_config");
    assert_eq!(got, config_json(&fixture_dir("base")));
    println!(
        "14 linears: {} -> {} bytes, relative error {:.4}",
        s.bytes_in, s.bytes_out, s.relative_error
    );
    fs::remove_dir_all(&out).unwrap();
}

#[test]
fn quantized_folder_loads_as_prequantized_with_the_logits_of_quantize_on_load() {
    let out = scratch("load");
    quantize_model_dir(fixture_dir("base"), &out, &QuantizeDirOptions::default()).unwrap();
    check_loads_like_quantize_on_load(&out, &fixture_dir("base"), DType::BF16);
    fs::remove_dir_all(&out).unwrap();
}

#[test]
fn f32_tied_model_quantizes_in_f32_and_keeps_its_tied_head() {
    let out = scratch("f32");
    quantize_model_dir(
        fixture_dir("llama3_tied_f32"),
        &out,
        &QuantizeDirOptions {
            compute_dtype: TorchDtype::F32,
            ..QuantizeDirOptions::default()
        },
    )
    .unwrap();
    let config = config_json(&out);
    assert_eq!(
        config["quantization_config"]["bnb_4bit_compute_dtype"],
        "float32"
    );
    check_loads_like_quantize_on_load(&out, &fixture_dir("llama3_tied_f32"), DType::F32);
    let (_, w) = load_weights(&out, DType::F32, false);
    assert!(w.lm_head.is_none());
    match linears(&w)[0] {
        Linear::Nf4(t) => assert_eq!(t.dtype, "float32"),
        Linear::Dense(_) => panic!("q_proj is dense"),
    }
    fs::remove_dir_all(&out).unwrap();
}

#[test]
fn sharded_input_and_output_round_trip() {
    let out = scratch("sharded");
    let s = quantize_model_dir(
        fixture_dir("sharded"),
        &out,
        &QuantizeDirOptions {
            max_shard_bytes: 30_000,
            ..QuantizeDirOptions::default()
        },
    )
    .unwrap();
    assert!(s.files.len() > 2, "{} files", s.files.len());
    let index: Value = serde_json::from_str(
        &fs::read_to_string(out.join("model.safetensors.index.json")).unwrap(),
    )
    .unwrap();
    // Every tensor is in the index, and an NF4 weight's six tensors share its shard.
    let map = index["weight_map"].as_object().unwrap();
    assert_eq!(map.len(), 14 * 6 + 7);
    for (key, file) in map {
        if let Some(i) = key.find(".weight.") {
            assert_eq!(file, &map[&key[..i + ".weight".len()]], "{key}");
        }
    }
    check_loads_like_quantize_on_load(&out, &fixture_dir("sharded"), DType::BF16);
    fs::remove_dir_all(&out).unwrap();
}

#[test]
fn without_double_quant_the_scales_stay_f32() {
    let out = scratch("f32-scales");
    quantize_model_dir(
        fixture_dir("base"),
        &out,
        &QuantizeDirOptions {
            double_quant: false,
            blocksize: 128,
            ..QuantizeDirOptions::default()
        },
    )
    .unwrap();
    let config = LlamaConfig::from_file(out.join("config.json")).unwrap();
    assert!(!config.quantization.as_ref().unwrap().double_quant);
    let (_, w) = load_weights(&out, DType::BF16, false);
    for lin in linears(&w) {
        match lin {
            Linear::Nf4(t) => {
                assert_eq!(t.blocksize, 128);
                assert!(matches!(t.scales, qlora::quant::nf4::Nf4Scales::F32(_)));
            }
            Linear::Dense(_) => panic!("a linear is dense"),
        }
    }
    fs::remove_dir_all(&out).unwrap();
}

#[test]
fn an_already_quantized_folder_is_refused() {
    let out = scratch("twice");
    let err = quantize_model_dir(
        fixture_dir("bnb_nf4"),
        out.join("q"),
        &QuantizeDirOptions::default(),
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            Error::Config {
                field: "quantization_config",
                ..
            }
        ),
        "{err}"
    );
    assert!(!out.join("q").exists());
    fs::remove_dir_all(&out).unwrap();
}

fn qlora_bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_qlora"))
}

#[test]
fn cli_quantizes_a_model_folder_and_needs_an_output() {
    let out = scratch("cli");
    let run = qlora_bin()
        .args(["quantize", "--model-dir"])
        .arg(fixture_dir("base"))
        .arg("--output")
        .arg(&out)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(stdout.contains("14 linears quantized to NF4"), "{stdout}");
    assert_eq!(
        fs::read(out.join("model.safetensors")).unwrap(),
        fs::read(fixture_dir("bnb_nf4").join("model.safetensors")).unwrap()
    );

    let run = qlora_bin()
        .args(["quantize", "--model-dir"])
        .arg(fixture_dir("base"))
        .output()
        .unwrap();
    assert!(!run.status.success());
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(stderr.contains("--output"), "{stderr}");
    fs::remove_dir_all(&out).unwrap();
}

/// A folder whose checkpoint lacks a tensor its config implies is refused before anything is
/// written, naming the tensor (it used to quantize "successfully" into a model that cannot load).
#[test]
fn a_folder_missing_a_tensor_is_refused_naming_it() {
    let out = scratch("missing");
    let src = out.join("src");
    fs::create_dir_all(&src).unwrap();
    fs::copy(
        fixture_dir("base").join("config.json"),
        src.join("config.json"),
    )
    .unwrap();
    let bytes = fs::read(fixture_dir("base").join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let dropped = "model.layers.1.mlp.up_proj.weight";
    let kept: Vec<(String, safetensors::tensor::TensorView<'_>)> = st
        .tensors()
        .into_iter()
        .filter(|(name, _)| name != dropped)
        .collect();
    safetensors::serialize_to_file(kept, None, &src.join("model.safetensors")).unwrap();
    let err = quantize_model_dir(&src, out.join("q"), &QuantizeDirOptions::default()).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains(dropped), "{msg}");
    assert!(!out.join("q").exists());
    fs::remove_dir_all(&out).unwrap();
}

#[test]
fn a_gguf_file_quantizes_to_the_nf4_weights_quantize_on_load_makes_of_it() {
    // tests/fixtures/gguf/tiny.gguf (F32 … Q5_0 tensors): the folder's NF4 linears are those the
    // loader makes when it quantizes the GGUF file's dequantized weights, the other tensors are
    // f32, and the config and tokenizer files are the GGUF file's; the logits agree bit for bit.
    use qlora::model::gguf::GgufFile;
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gguf/tiny.gguf");
    let out = scratch("gguf");
    let s = quantize_model_dir(&src, &out, &QuantizeDirOptions::default()).unwrap();
    assert_eq!((s.quantized, s.copied), (14, 7));
    assert_eq!(s.copied_files, ["tokenizer.json", "tokenizer_config.json"]);
    assert_eq!(config_json(&out)["torch_dtype"], "float32");
    let (config, stored) = load_weights(&out, DType::F32, false);
    let gguf = GgufFile::open(&src).unwrap();
    let gguf_config = gguf.config().unwrap();
    let on_load = LlamaWeights::load_gguf(
        &gguf,
        &gguf_config,
        &LoadOptions {
            dtype: DType::F32,
            device: Device::Cpu,
            quantize: true,
        },
    )
    .unwrap();
    for (x, y) in linears(&stored).iter().zip(&linears(&on_load)) {
        match (x, y) {
            (Linear::Nf4(x), Linear::Nf4(y)) => assert_eq!(x, y),
            _ => panic!("a linear is not NF4"),
        }
    }
    assert_eq!(logits(config, stored), logits(gguf_config, on_load));
    let tok = qlora::model::tokenizer::Tokenizer::from_dir(&out).unwrap();
    assert_eq!(
        tok.encode("hello world", false).unwrap(),
        gguf.tokenizer()
            .unwrap()
            .encode("hello world", false)
            .unwrap()
    );
    fs::remove_dir_all(&out).unwrap();
}
