//! Damaged files fail loud and name the culprit: a corrupt safetensors model, shard index,
//! `config.json`, adapter folder or optimizer state gives an error that names the file (and the
//! tensor where one is to blame), never a bare parser message; and files we write are
//! byte-reproducible (the safetensors metadata in sorted order).

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use qlora::hf::file::{read_safetensors, serialize_safetensors};
use qlora::model::{LlamaConfig, LlamaWeights, LoadOptions};
use qlora::Error;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/llama")
        .join(name)
}

/// A copy of fixture model `base` in a fresh temporary folder.
fn model_copy(tag: &str) -> PathBuf {
    let dir =
        std::env::temp_dir().join(format!("qlora-loader-errors-{tag}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    for f in ["config.json", "model.safetensors"] {
        fs::copy(fixture("base").join(f), dir.join(f)).unwrap();
    }
    dir
}

fn load(dir: &Path) -> Result<LlamaWeights, Error> {
    let config = LlamaConfig::from_file(dir.join("config.json"))?;
    let options = LoadOptions {
        dtype: DType::F32,
        device: Device::Cpu,
        quantize: false,
    };
    LlamaWeights::load(dir, &config, &options)
}

/// The message of `err`, which must be [`Error::CorruptFile`] naming `path`.
fn corrupt_message(err: Error, path: &Path) -> String {
    let msg = err.to_string();
    match &err {
        Error::CorruptFile { path: p, .. } => assert_eq!(p, path, "{msg}"),
        other => panic!("expected CorruptFile for {}, got {other:?}", path.display()),
    }
    assert!(msg.contains(&path.display().to_string()), "{msg}");
    eprintln!("{msg}");
    msg
}

/// The header length and header JSON of a safetensors file.
fn header(bytes: &[u8]) -> (usize, serde_json::Value) {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    (n, serde_json::from_slice(&bytes[8..8 + n]).unwrap())
}

#[test]
fn truncated_model_file_names_the_file_and_the_tensor_cut_off() {
    let dir = model_copy("truncated");
    let path = dir.join("model.safetensors");
    let bytes = fs::read(&path).unwrap();
    fs::write(&path, &bytes[..bytes.len() - 100]).unwrap();
    let msg = corrupt_message(load(&dir).unwrap_err(), &path);
    assert!(
        msg.contains("tensor `") && msg.contains("truncated"),
        "{msg}"
    );
    // Cut inside the 8-byte length and inside the header too.
    for keep in [3, 8 + 10] {
        fs::write(&path, &bytes[..keep]).unwrap();
        corrupt_message(load(&dir).unwrap_err(), &path);
    }
}

#[test]
fn garbage_and_oversized_headers_name_the_file() {
    let dir = model_copy("garbage");
    let path = dir.join("model.safetensors");
    let mut bytes = fs::read(&path).unwrap();
    bytes[9] = b'!';
    fs::write(&path, &bytes).unwrap();
    let msg = corrupt_message(load(&dir).unwrap_err(), &path);
    assert!(msg.contains("not valid JSON"), "{msg}");
    bytes[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    fs::write(&path, &bytes).unwrap();
    let msg = corrupt_message(load(&dir).unwrap_err(), &path);
    assert!(msg.contains("header length"), "{msg}");
}

#[test]
fn a_shape_that_disagrees_with_its_bytes_names_the_tensor() {
    let dir = model_copy("shape");
    let path = dir.join("model.safetensors");
    let bytes = fs::read(&path).unwrap();
    let (n, mut head) = header(&bytes);
    let name = "model.norm.weight";
    let shape = head[name]["shape"].as_array().unwrap().clone();
    let doubled = shape[0].as_u64().unwrap() * 2;
    head[name]["shape"] = serde_json::json!([doubled]);
    let mut text = serde_json::to_vec(&head).unwrap();
    assert!(text.len() <= n);
    text.resize(n, b' ');
    let mut out = bytes[..8].to_vec();
    out.extend_from_slice(&text);
    out.extend_from_slice(&bytes[8 + n..]);
    fs::write(&path, out).unwrap();
    let msg = corrupt_message(load(&dir).unwrap_err(), &path);
    assert!(msg.contains(&format!("tensor `{name}`")), "{msg}");
}

#[test]
fn malformed_config_and_index_name_their_files() {
    let dir = model_copy("json");
    let config = dir.join("config.json");
    let text = fs::read_to_string(&config).unwrap();
    fs::write(&config, &text[..text.len() / 2]).unwrap();
    let err = LlamaConfig::from_file(&config).unwrap_err();
    let msg = corrupt_message(err, &config);
    assert!(msg.contains("invalid JSON"), "{msg}");

    let dir = model_copy("index");
    let index = dir.join("model.safetensors.index.json");
    fs::write(&index, "{\"weight_map\": {\"a\": ").unwrap();
    corrupt_message(load(&dir).unwrap_err(), &index);
}

#[test]
fn damaged_adapter_files_name_the_file() {
    use qlora::peft::{LoraAdapter, LoraConfig};
    let config = LlamaConfig::from_file(fixture("base").join("config.json")).unwrap();
    let adapter =
        LoraAdapter::init(LoraConfig::default(), &config, DType::F32, &Device::Cpu, 7).unwrap();
    let dir = std::env::temp_dir().join(format!("qlora-loader-adapter-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    adapter.save_pretrained(&dir).unwrap();

    let st = dir.join("adapter_model.safetensors");
    let bytes = fs::read(&st).unwrap();
    fs::write(&st, &bytes[..bytes.len() - 5]).unwrap();
    let err = LoraAdapter::load_pretrained(&dir, &Device::Cpu).unwrap_err();
    corrupt_message(err, &st);
    fs::write(&st, &bytes).unwrap();

    let cfg = dir.join("adapter_config.json");
    let text = fs::read_to_string(&cfg).unwrap();
    fs::write(&cfg, &text[..text.len() - 3]).unwrap();
    let err = LoraAdapter::load_pretrained(&dir, &Device::Cpu).unwrap_err();
    let msg = corrupt_message(err, &cfg);
    assert!(msg.contains("invalid JSON"), "{msg}");
}

#[test]
fn safetensors_we_write_are_byte_reproducible() {
    let values: Vec<u8> = (0..16u8).collect();
    let write = || {
        let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![4], &values)
            .unwrap();
        // A fresh HashMap each time: its iteration order is seeded per map.
        let metadata: HashMap<String, String> =
            (0..8).map(|i| (format!("key{i}"), i.to_string())).collect();
        serialize_safetensors("test.safetensors", [("t", view)], Some(metadata)).unwrap()
    };
    let first = write();
    for _ in 0..32 {
        assert_eq!(write(), first, "the bytes changed between two writes");
    }
    // Still a valid file, with every metadata entry.
    let st = read_safetensors(Path::new("test.safetensors"), &first).unwrap();
    assert_eq!(st.names(), vec!["t"]);
    let (_, head) = header(&first);
    assert_eq!(head["__metadata__"].as_object().unwrap().len(), 8);
}

/// Sets element 0 of `tensor` in the safetensors file `path` to NaN, in place.
fn poison(path: &Path, tensor: &str) {
    let mut bytes = fs::read(path).unwrap();
    let (n, head) = header(&bytes);
    let begin = 8 + n + head[tensor]["data_offsets"][0].as_u64().unwrap() as usize;
    let nan: &[u8] = match head[tensor]["dtype"].as_str().unwrap() {
        "BF16" => &[0xc0, 0x7f],
        "F16" => &[0x00, 0x7e],
        "F32" => &[0x00, 0x00, 0xc0, 0x7f],
        other => panic!("dtype {other}"),
    };
    bytes[begin..begin + nan.len()].copy_from_slice(nan);
    fs::write(path, bytes).unwrap();
}

#[test]
fn nan_weights_are_refused_naming_file_and_tensor_unless_allowed() {
    use qlora::model::quantize_dir::{quantize_model_dir, QuantizeDirOptions};
    let dir = model_copy("nan");
    let path = dir.join("model.safetensors");
    let tensor = "model.layers.1.mlp.up_proj.weight";
    poison(&path, tensor);
    let msg = corrupt_message(load(&dir).unwrap_err(), &path);
    assert!(msg.contains(tensor) && msg.contains("NaN"), "{msg}");
    assert!(msg.contains("QLORA_ALLOW_NON_FINITE"), "{msg}");
    // quantize --model-dir: refused before anything is written (it used to report a relative
    // error of 0 and write a layer that dequantizes to NaN everywhere).
    let out = dir.join("q");
    let err = quantize_model_dir(&dir, &out, &QuantizeDirOptions::default()).unwrap_err();
    let msg = corrupt_message(err, &path);
    assert!(msg.contains(tensor), "{msg}");
    assert!(!out.exists());
}

#[test]
fn nan_in_an_adapter_is_refused_naming_file_and_tensor() {
    use qlora::peft::{LoraAdapter, LoraConfig};
    let config = LlamaConfig::from_file(fixture("base").join("config.json")).unwrap();
    let adapter =
        LoraAdapter::init(LoraConfig::default(), &config, DType::F32, &Device::Cpu, 3).unwrap();
    let dir = std::env::temp_dir().join(format!("qlora-loader-adapter-nan-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    adapter.save_pretrained(&dir).unwrap();
    let st = dir.join("adapter_model.safetensors");
    let tensor = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight";
    poison(&st, tensor);
    let err = LoraAdapter::load_pretrained(&dir, &Device::Cpu).unwrap_err();
    let msg = corrupt_message(err, &st);
    assert!(msg.contains(tensor), "{msg}");
}

/// The override, in a child process so that no other test sees the variable.
#[test]
fn the_override_lets_a_nan_weight_load() {
    let dir = model_copy("nan-allowed");
    poison(
        &dir.join("model.safetensors"),
        "model.layers.0.self_attn.q_proj.weight",
    );
    let run = |allow: bool| {
        let out = dir.join(if allow { "q-allowed" } else { "q-refused" });
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_qlora"));
        cmd.args(["quantize", "--model-dir"])
            .arg(&dir)
            .arg("--output")
            .arg(&out);
        if allow {
            cmd.env("QLORA_ALLOW_NON_FINITE", "1");
        } else {
            cmd.env_remove("QLORA_ALLOW_NON_FINITE");
        }
        cmd.output().unwrap()
    };
    let refused = run(false);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("q_proj.weight") && stderr.contains("NaN"),
        "{stderr}"
    );
    assert!(!refused.status.success());
    let allowed = run(true);
    let stderr = String::from_utf8_lossy(&allowed.stderr);
    assert!(allowed.status.success(), "{stderr}");
}
