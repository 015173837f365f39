//! GGUF in: a llama.cpp GGUF file read as a model source (`qlora::model::gguf`) against
//! transformers' GGUF loader on tests/fixtures/gguf/ (written by scripts/make_fixtures.py: a tiny
//! random Llama in F32, F16, BF16, Q8_0, Q4_0, Q4_1 and Q5_0 tensors with a byte-level BPE
//! tokenizer), files written here with candle's GGUF writer (K-quants, bit-exact round trips),
//! damaged files, and the real SmolLM2-135M-Instruct GGUF when it is present.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use qlora::model::gguf::{gguf_name, is_gguf, permute_rows, GgufFile};
use qlora::model::llama::LlamaModel;
use qlora::model::tokenizer::ChatMessage;
use qlora::model::{LlamaConfig, LlamaWeights, LoadOptions, RopeScaling};
use qlora::testing::values;
use qlora::tolerance::{lookup, Dtype, Op};
use qlora::Error;
use serde_json::Value as Json;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/gguf")
        .join(name)
}

fn expected() -> Json {
    serde_json::from_str(&std::fs::read_to_string(fixture("expected.json")).unwrap()).unwrap()
}

fn tensors() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture("expected.safetensors"), &Device::Cpu).unwrap()
}

fn f32_options() -> LoadOptions {
    LoadOptions {
        dtype: DType::F32,
        device: Device::Cpu,
        quantize: false,
    }
}

fn tiny() -> GgufFile {
    GgufFile::open(fixture("tiny.gguf")).unwrap()
}

#[test]
fn config_is_what_transformers_reads_from_the_metadata() {
    let file = tiny();
    let config = file.config().unwrap();
    let want = &expected()["config"];
    let u = |k: &str| want[k].as_u64().unwrap() as usize;
    assert_eq!(config.hidden_size, u("hidden_size"));
    assert_eq!(config.intermediate_size, u("intermediate_size"));
    assert_eq!(config.num_hidden_layers, u("num_hidden_layers"));
    assert_eq!(config.num_attention_heads, u("num_attention_heads"));
    assert_eq!(config.num_key_value_heads, u("num_key_value_heads"));
    assert_eq!(config.vocab_size, u("vocab_size"));
    assert_eq!(config.max_position_embeddings, u("max_position_embeddings"));
    assert_eq!(config.rms_norm_eps, want["rms_norm_eps"].as_f64().unwrap());
    assert_eq!(
        config.tie_word_embeddings,
        want["tie_word_embeddings"].as_bool().unwrap()
    );
    assert_eq!(config.bos_token_id, Some(u("bos_token_id") as u32));
    assert_eq!(config.eos_token_ids, vec![u("eos_token_id") as u32]);
    assert_eq!(config.pad_token_id, Some(u("pad_token_id") as u32));
    assert_eq!(config.head_dim, 16);
    assert_eq!(config.rope_theta, 10_000.0);
    assert_eq!(config.rope_scaling, RopeScaling::Default);
    assert!(is_gguf(&fixture("tiny.gguf")));
    assert!(!is_gguf(&fixture("expected.json")));
}

#[test]
fn tensors_are_transformers_dequantized_and_unpermuted_weights() {
    // Layer 0's q (Q8_0, permuted), k (Q4_0, permuted) and v (Q4_1): the same f32 values, bit for
    // bit, as transformers' GGUF loader (gguf-py's dequantization and its reverse permutation).
    let file = tiny();
    let config = file.config().unwrap();
    let want = tensors();
    let (q, kv) = (
        config.num_attention_heads * config.head_dim,
        config.num_key_value_heads * config.head_dim,
    );
    for (module, rows) in [("q_proj", q), ("k_proj", kv), ("v_proj", kv)] {
        let got = file
            .tensor_f32(
                &format!("model.layers.0.self_attn.{module}.weight"),
                &[rows, config.hidden_size],
                &config,
            )
            .unwrap();
        let want = values(&want[&format!("layers.0.{module}")]);
        assert_eq!(got.len(), want.len(), "{module}");
        let worst = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(
            got.iter()
                .zip(&want)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "{module}: max |diff| {worst:e}"
        );
    }
}

#[test]
fn logits_match_transformers_gguf_loader() {
    let file = tiny();
    let config = file.config().unwrap();
    let weights = LlamaWeights::load_gguf(&file, &config, &f32_options()).unwrap();
    let model = LlamaModel::new(config, weights).unwrap();
    let t = tensors();
    let ids = t["input_ids"].to_dtype(DType::U32).unwrap();
    let logits = model.forward(&ids, None).unwrap();
    let (got, want) = (values(&logits), values(&t["logits"]));
    assert_eq!(logits.dims(), t["logits"].dims());
    let worst = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    eprintln!("tiny GGUF logits: max |diff| {worst:e} over {}", got.len());
    if let Err(m) = lookup(Op::LlamaLogits, Dtype::F32).check(&got, &want) {
        panic!("logits: {m}");
    }
}

#[test]
fn nf4_on_load_from_gguf_quantizes_the_dequantized_weights() {
    // Quantize-on-load reads the GGUF tensors as it reads safetensors: every linear NF4, the
    // embeddings and norms dense, and the logits close to the dense model's.
    let file = tiny();
    let config = file.config().unwrap();
    let options = LoadOptions {
        quantize: true,
        ..f32_options()
    };
    let weights = LlamaWeights::load_gguf(&file, &config, &options).unwrap();
    assert!(weights
        .layers
        .iter()
        .all(|l| matches!(l.q_proj, qlora::model::Linear::Nf4(_))
            && matches!(l.down_proj, qlora::model::Linear::Nf4(_))));
    let model = LlamaModel::new(config, weights).unwrap();
    let ids = tensors()["input_ids"].to_dtype(DType::U32).unwrap();
    let logits = model.forward(&ids, None).unwrap();
    assert!(values(&logits).iter().all(|v| v.is_finite()));
}

#[test]
fn tokenizer_encodes_and_decodes_as_transformers_gguf_tokenizer() {
    let tok = tiny().tokenizer().unwrap();
    let want = expected();
    check_bos_eos(&tok, &want);
    assert_eq!(
        tok.pad().unwrap().id,
        want["pad_id"].as_u64().unwrap() as u32
    );
    // transformers' GPT2Tokenizer adds its default unk `<|endoftext|>` as one more token (301);
    // the file has 300 and so do we.
    assert_eq!(tok.vocab_size(), 300);
    assert_eq!(want["vocab_size"].as_u64(), Some(301));
    check_encodings(&tok, &want["encode"]);
    let chat = &want["chat"];
    let messages: Vec<ChatMessage> = serde_json::from_value(chat["messages"].clone()).unwrap();
    assert_eq!(
        tok.apply_chat_template(&messages, false).unwrap(),
        chat["rendered"].as_str().unwrap()
    );
}

/// A small random config whose linears' rows are multiples of 256, so K-quants fit.
fn k_config() -> LlamaConfig {
    LlamaConfig {
        hidden_size: 256,
        intermediate_size: 512,
        num_hidden_layers: 1,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 64,
        rms_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        rope_scaling: RopeScaling::Default,
        tie_word_embeddings: true,
        vocab_size: 64,
        max_position_embeddings: 128,
        torch_dtype: None,
        bos_token_id: None,
        eos_token_ids: Vec::new(),
        pad_token_id: None,
        quantization: None,
    }
}

/// Metadata of a llama GGUF for `c`, as llama.cpp's converter writes it, with a tiny
/// byte-level vocabulary (one token per printable ASCII character).
fn metadata(c: &LlamaConfig) -> Vec<(String, Value)> {
    let tokens: Vec<Value> = (0..c.vocab_size)
        .map(|i| Value::String(char::from(b'!' + i as u8).to_string()))
        .collect();
    let mut meta: Vec<(String, Value)> =
        vec![("general.architecture".into(), Value::String("llama".into()))];
    for (key, n) in [
        ("llama.embedding_length", c.hidden_size),
        ("llama.feed_forward_length", c.intermediate_size),
        ("llama.block_count", c.num_hidden_layers),
        ("llama.attention.head_count", c.num_attention_heads),
        ("llama.attention.head_count_kv", c.num_key_value_heads),
        ("llama.context_length", c.max_position_embeddings),
    ] {
        meta.push((key.into(), Value::U32(n as u32)));
    }
    for (key, x) in [
        ("llama.attention.layer_norm_rms_epsilon", c.rms_norm_eps),
        ("llama.rope.freq_base", c.rope_theta),
    ] {
        meta.push((key.into(), Value::F32(x as f32)));
    }
    meta.extend([
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        ("tokenizer.ggml.tokens".into(), Value::Array(tokens)),
        ("tokenizer.ggml.merges".into(), Value::Array(Vec::new())),
    ]);
    meta
}

/// Writes `weights` of `c` as a GGUF file: Q/K rows permuted as llama.cpp does, each linear in
/// `linear_type`, everything else F32; `edit` may change the metadata and tensors first.
fn write_gguf(
    path: &Path,
    c: &LlamaConfig,
    weights: &LlamaWeights,
    linear_type: GgmlDType,
    edit: impl FnOnce(&mut Vec<(String, Value)>, &mut Vec<(String, QTensor)>),
) {
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    let mut add = |hf: &str, t: &Tensor, dtype: GgmlDType| {
        let mut t = t.to_dtype(DType::F32).unwrap();
        let heads = if hf.ends_with("q_proj.weight") {
            Some(c.num_attention_heads)
        } else if hf.ends_with("k_proj.weight") {
            Some(c.num_key_value_heads)
        } else {
            None
        };
        if let Some(heads) = heads {
            let permuted = permute_rows(&values(&t), t.dims(), heads);
            t = Tensor::from_vec(permuted, t.dims(), &Device::Cpu).unwrap();
        }
        let q = QTensor::quantize(&t, dtype).unwrap();
        tensors.push((gguf_name(hf).unwrap(), q));
    };
    add(
        "model.embed_tokens.weight",
        &weights.embed_tokens,
        GgmlDType::F32,
    );
    add("model.norm.weight", &weights.norm, GgmlDType::F32);
    for (i, l) in weights.layers.iter().enumerate() {
        let p = format!("model.layers.{i}");
        add(
            &format!("{p}.input_layernorm.weight"),
            &l.input_layernorm,
            GgmlDType::F32,
        );
        add(
            &format!("{p}.post_attention_layernorm.weight"),
            &l.post_attention_layernorm,
            GgmlDType::F32,
        );
        for (name, linear) in [
            ("self_attn.q_proj", &l.q_proj),
            ("self_attn.k_proj", &l.k_proj),
            ("self_attn.v_proj", &l.v_proj),
            ("self_attn.o_proj", &l.o_proj),
            ("mlp.gate_proj", &l.gate_proj),
            ("mlp.up_proj", &l.up_proj),
            ("mlp.down_proj", &l.down_proj),
        ] {
            let qlora::model::Linear::Dense(w) = linear else {
                unreachable!("random weights are dense")
            };
            add(&format!("{p}.{name}.weight"), w, linear_type);
        }
    }
    let mut meta = metadata(c);
    edit(&mut meta, &mut tensors);
    let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut file = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut file, &meta_refs, &tensor_refs).unwrap();
}

fn temp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("qlora-gguf-{name}-{}.gguf", std::process::id()))
}

fn no_edit(_: &mut Vec<(String, Value)>, _: &mut Vec<(String, QTensor)>) {}

#[test]
fn f32_gguf_gives_the_model_it_was_written_from_bit_for_bit() {
    // Written with Q/K permuted, read back unpermuted: the logits are those of the original
    // weights exactly (a wrong permutation would move rotary pairs and change them).
    let c = k_config();
    let weights = LlamaWeights::random(&c, 0.05, 9, DType::F32, &Device::Cpu).unwrap();
    let path = temp("f32");
    write_gguf(&path, &c, &weights, GgmlDType::F32, no_edit);
    let file = GgufFile::open(&path).unwrap();
    let config = file.config().unwrap();
    assert!(config.tie_word_embeddings, "no output.weight: tied");
    let loaded = LlamaWeights::load_gguf(&file, &config, &f32_options()).unwrap();
    let ids = Tensor::new(&[[3u32, 17, 5, 60, 2, 9, 33, 41]], &Device::Cpu).unwrap();
    let want = LlamaModel::new(c.clone(), weights)
        .unwrap()
        .forward(&ids, None)
        .unwrap();
    let got = LlamaModel::new(config, loaded)
        .unwrap()
        .forward(&ids, None)
        .unwrap();
    let (got, want) = (values(&got), values(&want));
    assert!(got
        .iter()
        .zip(&want)
        .all(|(a, b)| a.to_bits() == b.to_bits()));
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn k_quant_tensors_read_as_candle_dequantizes_them() {
    // Q4_K, Q5_K and Q6_K: the loader's values are candle's dequantization of the stored blocks,
    // with the Q rows put back in Hugging Face order.
    let c = k_config();
    let weights = LlamaWeights::random(&c, 0.05, 10, DType::F32, &Device::Cpu).unwrap();
    for dtype in [GgmlDType::Q4K, GgmlDType::Q5K, GgmlDType::Q6K] {
        let path = temp(&format!("{dtype:?}"));
        write_gguf(&path, &c, &weights, dtype, no_edit);
        let file = GgufFile::open(&path).unwrap();
        let config = file.config().unwrap();
        let shape = [c.num_attention_heads * c.head_dim, c.hidden_size];
        let got = file
            .tensor_f32("model.layers.0.self_attn.q_proj.weight", &shape, &config)
            .unwrap();
        let qlora::model::Linear::Dense(w) = &weights.layers[0].q_proj else {
            unreachable!()
        };
        let permuted = permute_rows(&values(w), &shape, c.num_attention_heads);
        let permuted = Tensor::from_vec(permuted, &shape[..], &Device::Cpu).unwrap();
        let stored = QTensor::quantize(&permuted, dtype)
            .unwrap()
            .dequantize(&Device::Cpu)
            .unwrap();
        let want =
            qlora::model::gguf::unpermute_rows(&values(&stored), &shape, c.num_attention_heads);
        assert!(
            got.iter()
                .zip(&want)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "{dtype:?}"
        );
        // And close to the original weights (the quantization's own error).
        let worst = got
            .iter()
            .zip(values(w))
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(worst < 0.05, "{dtype:?}: {worst}");
        let model = LlamaWeights::load_gguf(&file, &config, &f32_options()).unwrap();
        assert_eq!(model.layers.len(), 1);
        std::fs::remove_file(&path).unwrap();
    }
}

fn open_err(path: &Path) -> Error {
    match GgufFile::open(path).and_then(|f| {
        let c = f.config()?;
        LlamaWeights::load_gguf(&f, &c, &f32_options())?;
        f.tokenizer()?;
        Ok(())
    }) {
        Ok(()) => panic!("{} loaded", path.display()),
        Err(e) => e,
    }
}

#[test]
fn damaged_and_foreign_files_are_refused_by_name() {
    let c = LlamaConfig {
        hidden_size: 64,
        intermediate_size: 128,
        head_dim: 16,
        ..k_config()
    };
    let weights = LlamaWeights::random(&c, 0.05, 11, DType::F32, &Device::Cpu).unwrap();

    // Another architecture.
    let path = temp("arch");
    write_gguf(&path, &c, &weights, GgmlDType::F32, |meta, _| {
        meta[0].1 = Value::String("qwen2".into());
    });
    let e = open_err(&path);
    assert!(
        matches!(&e, Error::Config { field: "general.architecture", reason } if reason.contains("qwen2")),
        "{e}"
    );

    // A tensor missing.
    write_gguf(&path, &c, &weights, GgmlDType::F32, |_, tensors| {
        tensors.retain(|(n, _)| n != "blk.0.attn_v.weight");
    });
    let e = open_err(&path);
    assert!(e.to_string().contains("blk.0.attn_v.weight"), "{e}");

    // A NaN in a weight.
    write_gguf(&path, &c, &weights, GgmlDType::F32, |_, tensors| {
        let t = tensors
            .iter_mut()
            .find(|(n, _)| n == "blk.0.ffn_up.weight")
            .unwrap();
        let mut v = values(&t.1.dequantize(&Device::Cpu).unwrap());
        v[7] = f32::NAN;
        let shape = t.1.shape().clone();
        let nan = Tensor::from_vec(v, shape, &Device::Cpu).unwrap();
        t.1 = QTensor::quantize(&nan, GgmlDType::F32).unwrap();
    });
    let e = open_err(&path);
    assert!(
        matches!(&e, Error::CorruptFile { reason, .. } if reason.contains("blk.0.ffn_up.weight") && reason.contains("at element 7")),
        "{e}"
    );

    // A truncated file.
    write_gguf(&path, &c, &weights, GgmlDType::F32, no_edit);
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let e = open_err(&path);
    assert!(
        matches!(&e, Error::CorruptFile { path: p, .. } if p == &path),
        "{e}"
    );

    // Not GGUF at all.
    std::fs::write(&path, b"{\"not\": \"gguf\"}").unwrap();
    let e = open_err(&path);
    assert!(e.to_string().contains("not a GGUF file"), "{e}");

    // An unsupported pre-tokenizer is named.
    write_gguf(&path, &c, &weights, GgmlDType::F32, |meta, _| {
        meta.push(("tokenizer.ggml.pre".into(), Value::String("tekken".into())));
    });
    let e = GgufFile::open(&path).unwrap().tokenizer().unwrap_err();
    assert!(e.to_string().contains("tekken"), "{e}");
    std::fs::remove_file(&path).unwrap();
}

/// The SmolLM2-135M-Instruct Q4_1 GGUF: `$QLORA_SMOLLM2_GGUF`, or where
/// `scripts/fetch-smollm2.sh` puts it.
fn smollm2() -> Option<PathBuf> {
    let path = match std::env::var_os("QLORA_SMOLLM2_GGUF") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(std::env::var_os("HOME")?)
            .join(".cache/qlora/models/SmolLM2-135M-Instruct.Q4_1.gguf"),
    };
    path.is_file().then_some(path)
}

#[test]
fn smollm2_gguf_matches_transformers_when_present() {
    let Some(path) = smollm2() else {
        eprintln!(
            "skipped: the SmolLM2 GGUF is not here (set QLORA_SMOLLM2_GGUF or run \
             scripts/fetch-smollm2.sh)"
        );
        return;
    };
    let file = GgufFile::open(&path).unwrap();
    let config = file.config().unwrap();
    assert_eq!(
        (
            config.hidden_size,
            config.num_hidden_layers,
            config.vocab_size
        ),
        (576, 30, 49152)
    );
    assert!(config.tie_word_embeddings);
    let tok = file.tokenizer().unwrap();
    let f = candle_core::safetensors::load(fixture("smollm2.safetensors"), &Device::Cpu).unwrap();
    let text = "The quick brown fox jumps over the lazy dog. Paris is the capital of France, and";
    let ids = tok.encode(text, false).unwrap();
    let want_ids: Vec<u32> = values(&f["input_ids"]).iter().map(|&v| v as u32).collect();
    assert_eq!(ids, want_ids);
    let input = Tensor::new(ids.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    for (dtype, prefix, tol_dtype) in [
        (DType::F32, "", Dtype::F32),
        (DType::BF16, "bf16.", Dtype::BF16),
    ] {
        let options = LoadOptions {
            dtype,
            ..f32_options()
        };
        let weights = LlamaWeights::load_gguf(&file, &config, &options).unwrap();
        let model = LlamaModel::new(config.clone(), weights).unwrap();
        let logits = model.forward(&input, None).unwrap().squeeze(0).unwrap();
        let tol = lookup(Op::RealModelLogits, tol_dtype);
        let lse = values(&row_logsumexp(&logits));
        let want_lse = values(&f[&format!("{prefix}lse")]);
        eprintln!(
            "SmolLM2 {dtype:?}: log-sum-exp max |diff| {:e}",
            max_diff(&lse, &want_lse)
        );
        if let Err(m) = tol.check(&lse, &want_lse) {
            panic!("{dtype:?} log-sum-exp: {m}");
        }
        let rows = logits.dim(0).unwrap();
        let last = values(&logits.get(rows - 1).unwrap());
        let want_last = values(&f[&format!("{prefix}last_logits")]);
        eprintln!(
            "SmolLM2 {dtype:?}: last-position logits max |diff| {:e}",
            max_diff(&last, &want_last)
        );
        if let Err(m) = tol.check(&last, &want_last) {
            panic!("{dtype:?} last logits: {m}");
        }
        // The greedy token at every position is transformers' unless its top two logits are
        // within the tolerance of each other (a near tie either library may break its own way).
        let want_argmax = values(&f[&format!("{prefix}argmax")].to_dtype(DType::F32).unwrap());
        let all = values(&logits);
        let cols = all.len() / rows;
        let mut ties = 0;
        for (t, row) in all.chunks(cols).enumerate() {
            let got = row
                .iter()
                .enumerate()
                .fold(0, |best, (i, &v)| if v > row[best] { i } else { best });
            let want = want_argmax[t] as usize;
            let gap = row[got] - row[want];
            ties += usize::from(got != want);
            assert!(
                got == want || gap <= 2.0 * (tol.atol + tol.rtol * row[got].abs()),
                "{dtype:?} position {t}: argmax {got} vs transformers' {want}, logit gap {gap}"
            );
        }
        eprintln!(
            "SmolLM2 {dtype:?}: greedy tokens differ (near ties) at {ties} of {rows} positions"
        );
    }
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
}

/// log Σ exp over the last dimension of `[T, V]`, in f64 per row.
fn row_logsumexp(logits: &Tensor) -> Tensor {
    let rows = logits.dim(0).unwrap();
    let v = values(logits);
    let cols = v.len() / rows;
    let out: Vec<f32> = v
        .chunks(cols)
        .map(|r| {
            let m = r.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
            (m + r.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln()) as f32
        })
        .collect();
    Tensor::from_vec(out, rows, &Device::Cpu).unwrap()
}

#[test]
fn converted_folder_loads_as_the_gguf_file_does() {
    // `write_hf_folder` (qlora convert): the folder's config, weights and tokenizer give what the
    // GGUF file gives: equal configs, bit-identical f32 logits, the same token ids and chat text.
    let file = tiny();
    let out = std::env::temp_dir().join(format!("qlora-gguf-convert-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let written = file
        .write_hf_folder(&out, qlora::model::TorchDtype::F32, 60_000)
        .unwrap();
    assert!(written.files.len() > 1, "60 KB shards: an index and shards");
    assert!(out.join("model.safetensors.index.json").is_file());
    let config = file.config().unwrap();
    let folder_config = LlamaConfig::from_file(out.join("config.json")).unwrap();
    assert_eq!(
        folder_config,
        LlamaConfig {
            torch_dtype: Some(qlora::model::TorchDtype::F32),
            ..config.clone()
        }
    );
    let ids = tensors()["input_ids"].to_dtype(DType::U32).unwrap();
    let from_gguf = LlamaModel::new(
        config.clone(),
        LlamaWeights::load_gguf(&file, &config, &f32_options()).unwrap(),
    )
    .unwrap()
    .forward(&ids, None)
    .unwrap();
    let from_folder = LlamaModel::new(
        folder_config.clone(),
        LlamaWeights::load(&out, &folder_config, &f32_options()).unwrap(),
    )
    .unwrap()
    .forward(&ids, None)
    .unwrap();
    assert!(values(&from_gguf)
        .iter()
        .zip(values(&from_folder))
        .all(|(a, b)| a.to_bits() == b.to_bits()));
    let (a, b) = (
        file.tokenizer().unwrap(),
        qlora::model::tokenizer::Tokenizer::from_dir(&out).unwrap(),
    );
    for case in expected()["encode"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        assert_eq!(
            a.encode(text, true).unwrap(),
            b.encode(text, true).unwrap(),
            "{text:?}"
        );
    }
    assert_eq!(a.eos(), b.eos());
    assert_eq!(a.chat_template(), b.chat_template());
    std::fs::remove_dir_all(&out).unwrap();
}

#[test]
fn sentencepiece_tokenizer_matches_transformers_gguf_tokenizer() {
    // tests/fixtures/gguf/spm.gguf: a Llama 2 style vocabulary (`tokenizer.ggml.model` llama:
    // byte tokens, `▁` pieces with scores, no stored merges, BOS added by default). The merges
    // are derived from the scores as transformers derives them; ids, decode and special tokens
    // equal its GGUF tokenizer's, byte fallback included.
    let file = GgufFile::open(fixture("spm.gguf")).unwrap();
    let tok = file.tokenizer().unwrap();
    let want: Json =
        serde_json::from_str(&std::fs::read_to_string(fixture("spm_expected.json")).unwrap())
            .unwrap();
    check_bos_eos(&tok, &want);
    assert_eq!(
        tok.vocab_size(),
        want["vocab_size"].as_u64().unwrap() as usize
    );
    check_encodings(&tok, &want["encode"]);
}

/// Each case of `cases` (transformers' `text`, `ids`, `ids_no_special`, `decoded`): the same ids
/// with and without special tokens, and the same decoded text.
fn check_encodings(tok: &qlora::model::tokenizer::Tokenizer, cases: &Json) {
    let ids = |v: &Json| -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|i| i.as_u64().unwrap() as u32)
            .collect()
    };
    for case in cases.as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        assert_eq!(
            tok.encode(text, true).unwrap(),
            ids(&case["ids"]),
            "{text:?}"
        );
        let plain = tok.encode(text, false).unwrap();
        assert_eq!(plain, ids(&case["ids_no_special"]), "{text:?}");
        assert_eq!(
            tok.decode(&plain, false).unwrap(),
            case["decoded"].as_str().unwrap(),
            "{text:?}"
        );
    }
}

/// BOS and EOS ids equal transformers' (`bos_id`, `eos_id` of `want`).
fn check_bos_eos(tok: &qlora::model::tokenizer::Tokenizer, want: &Json) {
    assert_eq!(Some(tok.bos().unwrap().id as u64), want["bos_id"].as_u64());
    assert_eq!(Some(tok.eos().unwrap().id as u64), want["eos_id"].as_u64());
}
