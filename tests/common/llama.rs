//! The tiny transformers checkpoints of tests/fixtures/llama/ (scripts/make_fixtures.py), loaded on
//! the CPU, and the comparisons the Llama tests share.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use qlora::model::llama::LlamaModel;
use qlora::model::{LlamaConfig, LlamaWeights, LoadOptions, RopeScaling};

/// `tests/fixtures/llama/<name>`.
pub fn fixture_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/llama")
        .join(name)
}

/// The config and weights of fixture model `name` in `dtype`, optionally quantized on load.
pub fn load_weights(name: &str, dtype: DType, quantize: bool) -> (LlamaConfig, LlamaWeights) {
    let dir = fixture_dir(name);
    let config = LlamaConfig::from_file(dir.join("config.json")).unwrap();
    let options = LoadOptions {
        dtype,
        device: Device::Cpu,
        quantize,
    };
    let weights = LlamaWeights::load(&dir, &config, &options).unwrap();
    (config, weights)
}

/// Fixture model `name` ready to run.
pub fn load(name: &str, dtype: DType, quantize: bool) -> LlamaModel {
    let (config, weights) = load_weights(name, dtype, quantize);
    LlamaModel::new(config, weights).unwrap()
}

/// The f32 values of `logits` `[B, T, V]` at the positions the mask keeps. Pad positions are
/// skipped: a left pad's query sees no key at all, so transformers' softmax there runs over
/// nothing but masked scores and its output is arbitrary (it never reaches a real token).
pub fn kept_rows(logits: &Tensor, mask: &Tensor) -> Vec<f32> {
    let (b, t, v) = logits.dims3().unwrap();
    let keep = mask.flatten_all().unwrap().to_vec1::<i64>().unwrap();
    let all = logits
        .to_dtype(DType::F32)
        .unwrap()
        .reshape((b * t, v))
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    all.into_iter()
        .zip(keep)
        .filter(|(_, k)| *k == 1)
        .flat_map(|(row, _)| row)
        .collect()
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Deterministic values in ±`scale`, distinct per `seed`.
pub fn seeded(seed: u64, dims: &[usize], scale: f32) -> Tensor {
    let n: usize = dims.iter().product();
    let values: Vec<f32> = (0..n)
        .map(|i| ((i as f64 * 0.618_034 + seed as f64 * 1.3).sin() * 43_758.545).fract())
        .map(|u| u as f32 * scale)
        .collect();
    Tensor::from_vec(values, dims, &Device::Cpu).unwrap()
}

/// A tiny GQA Llama the fused kernels take (head_dim 16, a multiple of 8): 2 layers, hidden 64,
/// 4 query heads over 2 kv heads, vocab 97 and the given intermediate size (pick one that is not
/// a multiple of any tile).
pub fn tiny_gqa_config(intermediate_size: usize) -> LlamaConfig {
    LlamaConfig {
        hidden_size: 64,
        intermediate_size,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 16,
        rms_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        rope_scaling: RopeScaling::Default,
        tie_word_embeddings: false,
        vocab_size: 97,
        max_position_embeddings: 64,
        torch_dtype: None,
        bos_token_id: Some(0),
        eos_token_ids: vec![1],
        pad_token_id: Some(2),
        quantization: None,
    }
}
