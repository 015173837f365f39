//! Llama config parsing and checkpoint loading against the tiny transformers checkpoints in
//! tests/fixtures/llama/ (scripts/make_fixtures.py): configs, RoPE inverse frequencies, dense,
//! sharded, tied, quantize-on-load and bnb pre-quantized weights, named errors, peak heap.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicIsize, Ordering};

use candle_core::{DType, Device, Tensor};
use half::bf16;
use qlora::model::{
    BnbQuantConfig, LayerWeights, Linear, LlamaConfig, LlamaWeights, LoadOptions, RopeScaling,
    TorchDtype,
};
use qlora::quant::bnb::{nf4_from_safetensors, OwnedTensor};
use qlora::quant::nf4::Nf4Tensor;
use qlora::Error;
use safetensors::tensor::Dtype;
use safetensors::SafeTensors;
use serde_json::{json, Value};

/// Counts heap bytes live on threads that opted in, so parallel tests do not disturb the figure.
struct CountingAlloc;

thread_local! {
    static TRACKED: Cell<bool> = const { Cell::new(false) };
}
static LIVE_BYTES: AtomicIsize = AtomicIsize::new(0);
static PEAK_BYTES: AtomicIsize = AtomicIsize::new(0);

fn tracked() -> bool {
    TRACKED.try_with(Cell::get).unwrap_or(false)
}

fn count(delta: isize) {
    let live = LIVE_BYTES.fetch_add(delta, Ordering::Relaxed) + delta;
    PEAK_BYTES.fetch_max(live, Ordering::Relaxed);
}

// SAFETY: every call is forwarded unchanged to the system allocator; counting has no effect on it.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract for `alloc` is passed on as is.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() && tracked() {
            count(layout.size() as isize);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if tracked() {
            count(-(layout.size() as isize));
        }
        // SAFETY: `ptr` was allocated by `System` with `layout` (the caller's contract).
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller's contract for `realloc` is passed on as is.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() && tracked() {
            count(new_size as isize - layout.size() as isize);
        }
        p
    }
}

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

const FIXTURES: [&str; 4] = ["base", "llama3_tied_f32", "sharded", "bnb_nf4"];
const LINEARS: [&str; 7] = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
];

fn fixture_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/llama")
        .join(name)
}

fn config(name: &str) -> LlamaConfig {
    LlamaConfig::from_file(fixture_dir(name).join("config.json")).unwrap()
}

fn config_json(name: &str) -> Value {
    let text = std::fs::read_to_string(fixture_dir(name).join("config.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn parse(v: &Value) -> qlora::Result<LlamaConfig> {
    LlamaConfig::from_json_str(&v.to_string())
}

fn options(dtype: DType, quantize: bool) -> LoadOptions {
    LoadOptions {
        dtype,
        device: Device::Cpu,
        quantize,
    }
}

fn linears(layer: &LayerWeights) -> [&Linear; 7] {
    [
        &layer.q_proj,
        &layer.k_proj,
        &layer.v_proj,
        &layer.o_proj,
        &layer.gate_proj,
        &layer.up_proj,
        &layer.down_proj,
    ]
}

/// Every tensor of a checkpoint directory (all shards), as f32 values with shapes.
fn raw_f32(dir: &Path) -> std::collections::HashMap<String, (Vec<usize>, Dtype, Vec<f32>)> {
    let mut out = std::collections::HashMap::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap();
        if !name.starts_with("model") || !name.ends_with(".safetensors") {
            continue;
        }
        let bytes = std::fs::read(&path).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        for (key, view) in st.tensors() {
            let values = match view.dtype() {
                Dtype::F32 => view
                    .data()
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect(),
                Dtype::BF16 => view
                    .data()
                    .chunks_exact(2)
                    .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
                    .collect(),
                _ => continue,
            };
            out.insert(key, (view.shape().to_vec(), view.dtype(), values));
        }
    }
    out
}

fn tensor_f32(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn assert_bits_eq(key: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{key}");
    let diff = got
        .iter()
        .zip(want)
        .position(|(a, b)| a.to_bits() != b.to_bits());
    assert_eq!(diff, None, "{key}: first differing element");
}

/// Every dense tensor of `weights` by its HF name.
fn dense_by_name(w: &LlamaWeights) -> Vec<(String, &Tensor)> {
    let mut out = vec![
        ("model.embed_tokens.weight".to_string(), &w.embed_tokens),
        ("model.norm.weight".to_string(), &w.norm),
    ];
    if let Some(head) = &w.lm_head {
        out.push(("lm_head.weight".to_string(), head));
    }
    for (i, layer) in w.layers.iter().enumerate() {
        let p = format!("model.layers.{i}");
        out.push((
            format!("{p}.input_layernorm.weight"),
            &layer.input_layernorm,
        ));
        out.push((
            format!("{p}.post_attention_layernorm.weight"),
            &layer.post_attention_layernorm,
        ));
        for (name, lin) in LINEARS.iter().zip(linears(layer)) {
            if let Linear::Dense(t) = lin {
                out.push((format!("{p}.{name}.weight"), t));
            }
        }
    }
    out
}

#[test]
fn every_fixture_config_parses() {
    for name in FIXTURES {
        let c = config(name);
        assert_eq!(
            (c.hidden_size, c.intermediate_size, c.num_hidden_layers),
            (72, 136, 2),
            "{name}"
        );
        assert_eq!(
            (c.num_attention_heads, c.num_key_value_heads, c.head_dim),
            (6, 2, 12)
        );
        assert_eq!((c.vocab_size, c.max_position_embeddings), (200, 256));
        assert_eq!(c.rms_norm_eps, 1e-5);
        assert_eq!(
            (c.bos_token_id, c.eos_token_ids.as_slice(), c.pad_token_id),
            (Some(1), &[2][..], Some(0))
        );
    }
    let base = config("base");
    assert_eq!(
        (base.rope_theta, &base.rope_scaling),
        (10000.0, &RopeScaling::Default)
    );
    assert_eq!(base.torch_dtype, Some(TorchDtype::BF16));
    assert!(!base.tie_word_embeddings && base.quantization.is_none());

    let l3 = config("llama3_tied_f32");
    assert_eq!(l3.rope_theta, 500000.0);
    assert_eq!(
        l3.rope_scaling,
        RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 64
        }
    );
    assert!(l3.tie_word_embeddings);
    assert_eq!(l3.torch_dtype, Some(TorchDtype::F32));

    assert_eq!(
        config("sharded").rope_scaling,
        RopeScaling::Linear { factor: 2.0 }
    );
    assert_eq!(
        config("bnb_nf4").quantization,
        Some(BnbQuantConfig {
            double_quant: true,
            compute_dtype: TorchDtype::BF16,
            skip_modules: None
        })
    );
}

#[test]
fn v4_rope_scaling_form_equals_v5_rope_parameters_form() {
    let mut v4 = config_json("llama3_tied_f32");
    let obj = v4.as_object_mut().unwrap();
    let mut params = obj.remove("rope_parameters").unwrap();
    let theta = params
        .as_object_mut()
        .unwrap()
        .remove("rope_theta")
        .unwrap();
    let dtype = obj.remove("dtype").unwrap();
    obj.insert("rope_theta".into(), theta);
    obj.insert("rope_scaling".into(), params);
    obj.insert("torch_dtype".into(), dtype);
    assert_eq!(parse(&v4).unwrap(), config("llama3_tied_f32"));

    // Both forms present and consistent is fine; `type` is the old spelling of `rope_type`.
    let mut both = config_json("llama3_tied_f32");
    both["rope_theta"] = json!(500000.0);
    both["rope_scaling"] = json!({"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64});
    assert_eq!(parse(&both).unwrap(), config("llama3_tied_f32"));

    // No rope keys at all: transformers' default theta.
    let mut none = config_json("base");
    none.as_object_mut().unwrap().remove("rope_parameters");
    let c = parse(&none).unwrap();
    assert_eq!(
        (c.rope_theta, c.rope_scaling),
        (10000.0, RopeScaling::Default)
    );

    // llama3 without original_max_position_embeddings falls back to max_position_embeddings.
    let mut fallback = config_json("llama3_tied_f32");
    fallback["rope_parameters"]
        .as_object_mut()
        .unwrap()
        .remove("original_max_position_embeddings");
    let c = parse(&fallback).unwrap();
    assert!(matches!(
        c.rope_scaling,
        RopeScaling::Llama3 {
            original_max_position_embeddings: 256,
            ..
        }
    ));
}

#[test]
fn eos_token_id_may_be_a_list_or_absent() {
    let mut v = config_json("base");
    v["eos_token_id"] = json!([2, 7, 9]);
    assert_eq!(parse(&v).unwrap().eos_token_ids, vec![2, 7, 9]);
    v["eos_token_id"] = Value::Null;
    assert!(parse(&v).unwrap().eos_token_ids.is_empty());
}

#[test]
fn defaults_follow_transformers() {
    let mut v = config_json("base");
    let obj = v.as_object_mut().unwrap();
    for key in ["num_key_value_heads", "head_dim", "dtype", "rms_norm_eps"] {
        obj.remove(key);
    }
    let c = parse(&v).unwrap();
    assert_eq!(
        (
            c.num_key_value_heads,
            c.head_dim,
            c.torch_dtype,
            c.rms_norm_eps
        ),
        (6, 12, None, 1e-6)
    );
}

#[test]
fn malformed_configs_give_named_errors() {
    let l3 = || config_json("llama3_tied_f32");
    let base = || config_json("base");
    let bnb = || config_json("bnb_nf4");
    let with = |mut v: Value, path: &[&str], value: Value| {
        let mut slot = &mut v;
        for key in &path[..path.len() - 1] {
            slot = &mut slot[*key];
        }
        slot[path[path.len() - 1]] = value;
        v
    };
    let without = |mut v: Value, key: &str| {
        v.as_object_mut().unwrap().remove(key);
        v
    };
    let cases: Vec<(Value, &str)> = vec![
        (
            with(base(), &["model_type"], json!("mistral")),
            "model_type",
        ),
        (without(base(), "hidden_size"), "hidden_size"),
        (
            with(base(), &["intermediate_size"], json!(0)),
            "intermediate_size",
        ),
        (
            with(base(), &["num_key_value_heads"], json!(4)),
            "num_key_value_heads",
        ),
        (
            without(
                with(
                    with(base(), &["num_attention_heads"], json!(5)),
                    &["num_key_value_heads"],
                    json!(5),
                ),
                "head_dim",
            ),
            "num_attention_heads",
        ),
        (with(base(), &["head_dim"], json!(13)), "head_dim"),
        (with(base(), &["rms_norm_eps"], json!(-1.0)), "rms_norm_eps"),
        (with(base(), &["hidden_act"], json!("gelu")), "hidden_act"),
        (
            with(base(), &["attention_bias"], json!(true)),
            "attention_bias",
        ),
        (with(base(), &["mlp_bias"], json!(true)), "mlp_bias"),
        (with(base(), &["dtype"], json!("int8")), "dtype"),
        (with(base(), &["torch_dtype"], json!("float32")), "dtype"),
        (
            with(base(), &["rope_parameters", "rope_type"], json!("yarn")),
            "rope_parameters",
        ),
        (
            with(base(), &["rope_parameters", "rope_type"], json!("linear")),
            "rope_parameters",
        ),
        (
            with(base(), &["rope_theta"], json!(20000.0)),
            "rope_parameters",
        ),
        (
            with(
                base(),
                &["rope_scaling"],
                json!({"rope_type": "linear", "factor": 2.0}),
            ),
            "rope_parameters",
        ),
        (
            with(l3(), &["rope_parameters", "high_freq_factor"], json!(1.0)),
            "rope_parameters",
        ),
        (
            with(l3(), &["rope_parameters", "factor"], json!("8")),
            "rope_parameters",
        ),
        (
            with(
                bnb(),
                &["quantization_config", "bnb_4bit_quant_type"],
                json!("fp4"),
            ),
            "quantization_config.bnb_4bit_quant_type",
        ),
        (
            with(
                bnb(),
                &["quantization_config", "quant_method"],
                json!("gptq"),
            ),
            "quantization_config.quant_method",
        ),
        (
            with(bnb(), &["quantization_config", "load_in_8bit"], json!(true)),
            "quantization_config.load_in_8bit",
        ),
        (
            with(
                bnb(),
                &["quantization_config", "bnb_4bit_quant_storage"],
                json!("bfloat16"),
            ),
            "quantization_config.bnb_4bit_quant_storage",
        ),
    ];
    for (v, want) in cases {
        match parse(&v) {
            Err(Error::Config { field, .. }) => assert_eq!(field, want, "{v}"),
            other => panic!("expected Config error on {want}, got {other:?}"),
        }
    }
    // A wrongly typed field is a serde error naming it.
    let err = parse(&with(base(), &["hidden_size"], json!("72"))).unwrap_err();
    assert!(
        matches!(&err, Error::Json(e) if e.to_string().contains("invalid type")),
        "{err}"
    );
}

#[test]
fn rope_inv_freq_matches_transformers_bit_for_bit() {
    for name in FIXTURES {
        let bytes = std::fs::read(fixture_dir(name).join("rope.safetensors")).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let want: Vec<f32> = st
            .tensor("inv_freq")
            .unwrap()
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        assert_bits_eq(name, &config(name).rope_inv_freq(), &want);
    }
}

#[test]
fn dense_load_equals_safetensors_content() {
    for (name, dtype) in [
        ("base", DType::F32),
        ("base", DType::BF16),
        ("llama3_tied_f32", DType::F32),
        ("llama3_tied_f32", DType::BF16),
    ] {
        let dir = fixture_dir(name);
        let w = LlamaWeights::load(&dir, &config(name), &options(dtype, false)).unwrap();
        let raw = raw_f32(&dir);
        let tensors = dense_by_name(&w);
        assert_eq!(tensors.len(), raw.len(), "{name}: every tensor loaded");
        for (key, t) in tensors {
            let (shape, _, values) = &raw[&key];
            assert_eq!(t.dims(), shape.as_slice(), "{key}");
            assert_eq!(t.dtype(), dtype, "{key}");
            let want: Vec<f32> = match dtype {
                DType::BF16 => values.iter().map(|&v| bf16::from_f32(v).to_f32()).collect(),
                _ => values.clone(),
            };
            assert_bits_eq(&key, &tensor_f32(t), &want);
        }
    }
}

#[test]
fn sharded_load_equals_single_file() {
    // `sharded` has base's weights (same seed), saved in five shards with an index.
    assert!(fixture_dir("sharded")
        .join("model.safetensors.index.json")
        .exists());
    let opts = options(DType::BF16, false);
    let sharded = LlamaWeights::load(fixture_dir("sharded"), &config("sharded"), &opts).unwrap();
    let single = LlamaWeights::load(fixture_dir("base"), &config("base"), &opts).unwrap();
    let (a, b) = (dense_by_name(&sharded), dense_by_name(&single));
    assert_eq!(a.len(), b.len());
    for ((ka, ta), (kb, tb)) in a.iter().zip(&b) {
        assert_eq!(ka, kb);
        assert_bits_eq(ka, &tensor_f32(ta), &tensor_f32(tb));
    }
}

#[test]
fn tied_lm_head_is_the_embeddings() {
    let name = "llama3_tied_f32";
    let w = LlamaWeights::load(
        fixture_dir(name),
        &config(name),
        &options(DType::F32, false),
    )
    .unwrap();
    assert!(w.lm_head.is_none());
    assert_bits_eq(
        "lm_head",
        &tensor_f32(w.lm_head()),
        &tensor_f32(&w.embed_tokens),
    );
}

#[test]
fn quantize_on_load_equals_nf4_reference() {
    for (name, dtype) in [("base", DType::BF16), ("llama3_tied_f32", DType::F32)] {
        let dir = fixture_dir(name);
        let w = LlamaWeights::load(&dir, &config(name), &options(dtype, true)).unwrap();
        let raw = raw_f32(&dir);
        for (i, layer) in w.layers.iter().enumerate() {
            for (lin_name, lin) in LINEARS.iter().zip(linears(layer)) {
                let key = format!("model.layers.{i}.{lin_name}.weight");
                let (shape, _, values) = &raw[&key];
                let want = match dtype {
                    DType::BF16 => {
                        let v: Vec<bf16> = values.iter().map(|&x| bf16::from_f32(x)).collect();
                        Nf4Tensor::quantize_bf16(&v, shape, 64, true).unwrap()
                    }
                    _ => Nf4Tensor::quantize(values, shape, 64, true).unwrap(),
                };
                match lin {
                    Linear::Nf4(t) => assert_eq!(t, &want, "{name} {key}"),
                    Linear::Dense(_) => panic!("{key} was not quantized"),
                }
            }
        }
        // Embeddings, norms and lm_head stay dense in the requested dtype.
        assert_eq!(w.embed_tokens.dtype(), dtype);
        assert_eq!(w.lm_head().dtype(), dtype);
    }
}

#[test]
fn bnb_prequantized_checkpoint_loads_its_stored_bytes() {
    let dir = fixture_dir("bnb_nf4");
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    // Asking for dense still yields the stored NF4: pre-quantized linears are never requantized.
    let w = LlamaWeights::load(&dir, &config("bnb_nf4"), &options(DType::BF16, false)).unwrap();
    for (i, layer) in w.layers.iter().enumerate() {
        for (lin_name, lin) in LINEARS.iter().zip(linears(layer)) {
            let prefix = format!("model.layers.{i}.{lin_name}");
            let Linear::Nf4(t) = lin else {
                panic!("{prefix} is not NF4")
            };
            assert_eq!(t, &nf4_from_safetensors(&st, &prefix).unwrap());
            let stored = st.tensor(&format!("{prefix}.weight")).unwrap();
            assert_eq!(t.packed.as_slice(), stored.data(), "{prefix}");
            assert_eq!(t.dtype, "bfloat16");
        }
    }
    // Its dense tensors are base's (the same seed).
    let base = LlamaWeights::load(
        fixture_dir("base"),
        &config("base"),
        &options(DType::BF16, false),
    )
    .unwrap();
    assert_bits_eq(
        "embed",
        &tensor_f32(&w.embed_tokens),
        &tensor_f32(&base.embed_tokens),
    );
    assert_bits_eq(
        "lm_head",
        &tensor_f32(w.lm_head()),
        &tensor_f32(base.lm_head()),
    );
}

/// A copy of `base` in a scratch directory whose single file went through `edit`.
fn edited_base(case: &str, edit: impl FnOnce(&mut Vec<(String, OwnedTensor)>)) -> PathBuf {
    let src = fixture_dir("base");
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("model_loading_{case}"));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, OwnedTensor)> = st
        .tensors()
        .into_iter()
        .map(|(k, v)| {
            let t = OwnedTensor {
                dtype: v.dtype(),
                shape: v.shape().to_vec(),
                data: v.data().to_vec(),
            };
            (k, t)
        })
        .collect();
    edit(&mut tensors);
    safetensors::serialize_to_file(tensors, None, &dir.join("model.safetensors")).unwrap();
    dir
}

#[test]
fn missing_or_malformed_tensors_are_named() {
    let cfg = config("base");
    let opts = options(DType::F32, false);
    let key = "model.layers.1.mlp.up_proj.weight";

    let dir = edited_base("missing", |t| t.retain(|(k, _)| k != key));
    match LlamaWeights::load(&dir, &cfg, &opts) {
        Err(Error::MissingTensor { key: k }) => assert_eq!(k, key),
        other => panic!("{other:?}"),
    }
    let quantized = LlamaWeights::load(&dir, &cfg, &options(DType::BF16, true));
    assert!(matches!(quantized, Err(Error::MissingTensor { key: k }) if k == key));

    let dir = edited_base("shape", |t| {
        let (_, w) = t.iter_mut().find(|(k, _)| k == key).unwrap();
        w.shape = vec![w.shape[1], w.shape[0]];
    });
    match LlamaWeights::load(&dir, &cfg, &opts) {
        Err(Error::BadTensor { key: k, reason }) => {
            assert_eq!(k, key);
            assert!(reason.contains("shape"), "{reason}");
        }
        other => panic!("{other:?}"),
    }

    let norm = "model.norm.weight";
    let dir = edited_base("dtype", |t| {
        let (_, w) = t.iter_mut().find(|(k, _)| k == norm).unwrap();
        w.dtype = Dtype::I16;
    });
    match LlamaWeights::load(&dir, &cfg, &opts) {
        Err(Error::BadTensor { key: k, reason }) => {
            assert_eq!(k, norm);
            assert!(reason.contains("dtype"), "{reason}");
        }
        other => panic!("{other:?}"),
    }

    let missing_dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("model_loading_nothing");
    std::fs::create_dir_all(&missing_dir).unwrap();
    assert!(matches!(
        LlamaWeights::load(&missing_dir, &cfg, &opts),
        Err(Error::Io { .. })
    ));
}

/// A deterministic bf16 Llama (8 layers, hidden 256, intermediate 704, vocab 256) in one shard
/// per layer plus one for embeddings/norm/lm_head; returns its directory and bf16 bytes.
fn write_synthetic_model() -> (PathBuf, LlamaConfig, usize) {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("model_loading_synthetic");
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = json!({
        "model_type": "llama", "hidden_size": 256, "intermediate_size": 704,
        "num_hidden_layers": 8, "num_attention_heads": 4, "num_key_value_heads": 2,
        "vocab_size": 256, "rms_norm_eps": 1e-5, "torch_dtype": "bfloat16",
    });
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    let config = parse(&cfg).unwrap();
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut tensor = |shape: Vec<usize>| {
        let n: usize = shape.iter().product();
        let data = (0..n)
            .flat_map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let x = ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.1;
                bf16::from_f32(x).to_le_bytes()
            })
            .collect();
        OwnedTensor {
            dtype: Dtype::BF16,
            shape,
            data,
        }
    };
    let (h, m, v) = (256, 704, 256);
    let (q, kv) = (256, 128);
    let mut weight_map = serde_json::Map::new();
    let mut total = 0;
    let mut shards: Vec<Vec<(String, OwnedTensor)>> = vec![vec![
        ("model.embed_tokens.weight".into(), tensor(vec![v, h])),
        ("model.norm.weight".into(), tensor(vec![h])),
        ("lm_head.weight".into(), tensor(vec![v, h])),
    ]];
    for i in 0..8 {
        let p = format!("model.layers.{i}");
        shards.push(vec![
            (format!("{p}.input_layernorm.weight"), tensor(vec![h])),
            (
                format!("{p}.post_attention_layernorm.weight"),
                tensor(vec![h]),
            ),
            (format!("{p}.self_attn.q_proj.weight"), tensor(vec![q, h])),
            (format!("{p}.self_attn.k_proj.weight"), tensor(vec![kv, h])),
            (format!("{p}.self_attn.v_proj.weight"), tensor(vec![kv, h])),
            (format!("{p}.self_attn.o_proj.weight"), tensor(vec![h, q])),
            (format!("{p}.mlp.gate_proj.weight"), tensor(vec![m, h])),
            (format!("{p}.mlp.up_proj.weight"), tensor(vec![m, h])),
            (format!("{p}.mlp.down_proj.weight"), tensor(vec![h, m])),
        ]);
    }
    let count = shards.len();
    for (i, shard) in shards.into_iter().enumerate() {
        let file = format!("model-{:05}-of-{count:05}.safetensors", i + 1);
        for (k, t) in &shard {
            weight_map.insert(k.clone(), json!(file));
            total += t.data.len();
        }
        safetensors::serialize_to_file(shard, None, &dir.join(&file)).unwrap();
    }
    let index = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    (dir, config, total)
}

#[test]
fn quantized_load_peak_heap_stays_well_below_the_bf16_model() {
    let (dir, cfg, bf16_bytes) = write_synthetic_model();
    TRACKED.with(|t| t.set(true));
    LIVE_BYTES.store(0, Ordering::Relaxed);
    PEAK_BYTES.store(0, Ordering::Relaxed);
    let weights = LlamaWeights::load(&dir, &cfg, &options(DType::BF16, true)).unwrap();
    let peak = PEAK_BYTES.load(Ordering::Relaxed) as usize;
    let retained = LIVE_BYTES.load(Ordering::Relaxed) as usize;
    TRACKED.with(|t| t.set(false));
    drop(weights);
    let largest_bf16_tensor = 704 * 256 * 2;
    println!(
        "bf16 model {bf16_bytes} B, loaded NF4 model {retained} B, peak heap {peak} B \
         ({:.2} of bf16)",
        peak as f64 / bf16_bytes as f64
    );
    // The result plus one linear converted (bf16) and widened to f32 for quantization.
    assert!(
        peak <= retained + 3 * largest_bf16_tensor + (64 << 10),
        "peak {peak} retained {retained}"
    );
    assert!(peak * 5 < bf16_bytes * 2, "peak {peak} of {bf16_bytes}");
}

/// The bnb fixture rewritten as two shards that put every NF4 `.weight` in one file and its
/// quantization state (`.absmax`, `.quant_map`, nested scales, the packed state) in the other, as
/// huggingface_hub may cut a state dict that it splits by size alone.
#[test]
fn bnb_weights_and_quant_states_in_different_shards_load_as_one_file() {
    let src = fixture_dir("bnb_nf4");
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("model_loading_split_bnb");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let (mut first, mut second) = (Vec::new(), Vec::new());
    let mut weight_map = serde_json::Map::new();
    for (k, v) in st.tensors() {
        let t = OwnedTensor {
            dtype: v.dtype(),
            shape: v.shape().to_vec(),
            data: v.data().to_vec(),
        };
        // Everything but the quantization state goes to the first shard.
        let is_state = k.contains(".weight.");
        let file = if is_state {
            "model-00002-of-00002.safetensors"
        } else {
            "model-00001-of-00002.safetensors"
        };
        weight_map.insert(k.clone(), json!(file));
        if is_state {
            second.push((k, t));
        } else {
            first.push((k, t));
        }
    }
    assert!(!second.is_empty(), "the fixture has quantization states");
    for (tensors, file) in [
        (first, "model-00001-of-00002.safetensors"),
        (second, "model-00002-of-00002.safetensors"),
    ] {
        safetensors::serialize_to_file(tensors, None, &dir.join(file)).unwrap();
    }
    let index = json!({"metadata": {"total_size": bytes.len()}, "weight_map": weight_map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();

    let opts = options(DType::BF16, false);
    let split = LlamaWeights::load(&dir, &config("bnb_nf4"), &opts).unwrap();
    let single = LlamaWeights::load(&src, &config("bnb_nf4"), &opts).unwrap();
    for (i, (a, b)) in split.layers.iter().zip(&single.layers).enumerate() {
        for (name, (la, lb)) in LINEARS.iter().zip(linears(a).into_iter().zip(linears(b))) {
            match (la, lb) {
                (Linear::Nf4(x), Linear::Nf4(y)) => assert_eq!(x, y, "layer {i} {name}"),
                _ => panic!("layer {i} {name} is not NF4 in both loads"),
            }
        }
    }
}
