//! Generation with a KV cache, as transformers' `generate`: a per-layer cache of keys (after RoPE)
//! and values `[B, kv_heads, S, head_dim]`, greedy decoding or sampling (temperature → top-k →
//! top-p), stop tokens, and a batch of prompts left-padded to one length `[B, T]`.

use candle_core::{DType, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::model::adapter::LoraAdapter;
pub use crate::model::kv_cache::{KvCache, LayerKvCache};
use crate::model::llama::LlamaModel;
use crate::{Error, Result};

fn invalid(reason: impl Into<String>) -> Error {
    Error::invalid("generate", reason)
}

/// How [`generate`] picks tokens and when it stops. Floats are f64 as transformers' Python floats.
#[derive(Clone, Debug, PartialEq)]
pub struct GenerationConfig {
    pub max_new_tokens: usize,
    /// 0 decodes greedily (argmax); above 0 samples from the logits divided by it.
    pub temperature: f64,
    /// Keeps the `top_k` highest logits (and any tied with the k-th) when sampling; 0 keeps all.
    pub top_k: usize,
    /// Keeps the smallest set of most likely tokens whose probability reaches `top_p` when
    /// sampling, in (0, 1]; 1 keeps all.
    pub top_p: f64,
    /// A row stops after producing one of these; None means the config's `eos_token_id`s.
    pub stop_token_ids: Option<Vec<u32>>,
    /// The id left padding and stopped rows are fed; None means the config's `pad_token_id`, else
    /// the first stop token (as transformers falls back to eos).
    pub pad_token_id: Option<u32>,
    /// Seeds the sampling RNG (rand's `StdRng`: the stream is ours, not torch's).
    pub seed: u64,
}

impl Default for GenerationConfig {
    fn default() -> Self {
        Self {
            max_new_tokens: 20,
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            stop_token_ids: None,
            pad_token_id: None,
            seed: 0,
        }
    }
}

impl GenerationConfig {
    /// Checks the sampling parameters: temperature finite and ≥ 0, top_p in (0, 1].
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(invalid(format!(
                "temperature {} is not a finite value ≥ 0",
                self.temperature
            )));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(invalid(format!("top_p {} is not in (0, 1]", self.top_p)));
        }
        Ok(())
    }
}

/// Picks one token from a row of logits per a [`GenerationConfig`]: argmax when the temperature
/// is 0, else a draw from the softmax of [`warp_logits`]' scores with a seeded RNG.
#[derive(Clone, Debug)]
pub struct Sampler {
    temperature: f64,
    top_k: usize,
    top_p: f64,
    rng: StdRng,
}

impl Sampler {
    pub fn new(config: &GenerationConfig) -> Result<Self> {
        config.validate()?;
        Ok(Self {
            temperature: config.temperature,
            top_k: config.top_k,
            top_p: config.top_p,
            rng: StdRng::seed_from_u64(config.seed),
        })
    }

    /// The next token for `logits` `[V]` (f32, V > 0).
    pub fn next_token(&mut self, logits: &[f32]) -> Result<u32> {
        if logits.is_empty() {
            return Err(invalid("no logits to pick a token from"));
        }
        if self.temperature == 0.0 {
            return Ok(argmax(logits));
        }
        let scores = warp_logits(logits, self.temperature, self.top_k, self.top_p);
        let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        if !max.is_finite() {
            return Err(invalid(format!("logits have no finite maximum ({max})")));
        }
        let weights: Vec<f64> = scores.iter().map(|&s| f64::from(s - max).exp()).collect();
        let mut draw = self.rng.random::<f64>() * weights.iter().sum::<f64>();
        let mut last_kept = 0;
        for (i, &w) in weights.iter().enumerate() {
            if w > 0.0 {
                last_kept = i;
                if draw < w {
                    return Ok(i as u32);
                }
                draw -= w;
            }
        }
        // Rounding in the running subtraction can step past the end: the draw belongs to the
        // last token with any weight.
        Ok(last_kept as u32)
    }
}

/// The index of the largest logit, the lowest index among ties (as `torch.argmax`).
fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in logits.iter().enumerate() {
        if x > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// transformers' sampling warpers in their order, in f32: divide by `temperature`; with
/// `top_k` > 0 keep the scores ≥ the k-th largest; with `top_p` < 1 sort ascending, take the
/// cumulative softmax and drop the scores whose cumulative probability is ≤ 1 − top_p, always
/// keeping the largest. Dropped scores become −∞.
pub fn warp_logits(logits: &[f32], temperature: f64, top_k: usize, top_p: f64) -> Vec<f32> {
    let temperature = temperature as f32;
    let mut scores: Vec<f32> = logits.iter().map(|&x| x / temperature).collect();
    if top_k > 0 && top_k < scores.len() {
        let mut sorted = scores.clone();
        sorted.sort_by(|a, b| b.total_cmp(a));
        let kth = sorted[top_k - 1];
        scores.iter_mut().filter(|s| **s < kth).for_each(|s| {
            *s = f32::NEG_INFINITY;
        });
    }
    if top_p < 1.0 && !scores.is_empty() {
        let mut order: Vec<usize> = (0..scores.len()).collect();
        order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
        let max = scores[order[order.len() - 1]];
        let exp: Vec<f32> = order.iter().map(|&i| (scores[i] - max).exp()).collect();
        let total: f32 = exp.iter().sum();
        // torch compares the f32 probabilities with the Python float `1 - top_p` cast to f32.
        let threshold = (1.0 - top_p) as f32;
        let mut cumulative = 0.0f32;
        for (&i, &e) in order[..order.len() - 1].iter().zip(&exp) {
            cumulative += e / total;
            if cumulative <= threshold {
                scores[i] = f32::NEG_INFINITY;
            }
        }
    }
    scores
}

/// Generates up to `config.max_new_tokens` tokens after each prompt and returns only the new
/// tokens per prompt, each row ending at (and including) its first stop token. The prompts run as
/// one batch, left-padded to the longest, with transformers' positions
/// (`cumsum(attention_mask) − 1`, the pads' positions never seen); a stopped row is fed the pad
/// id until every row has stopped or the budget is spent.
pub fn generate(
    model: &LlamaModel,
    prompts: &[Vec<u32>],
    config: &GenerationConfig,
) -> Result<Vec<Vec<u32>>> {
    generate_with_adapter(model, None, prompts, config)
}

/// [`generate`] with `adapter`'s LoRA deltas on the linears it targets, when one is given.
pub fn generate_with_adapter(
    model: &LlamaModel,
    adapter: Option<&LoraAdapter>,
    prompts: &[Vec<u32>],
    config: &GenerationConfig,
) -> Result<Vec<Vec<u32>>> {
    let mut sampler = Sampler::new(config)?;
    if prompts.is_empty() {
        return Err(invalid("no prompts"));
    }
    if let Some(row) = prompts.iter().position(Vec::is_empty) {
        return Err(invalid(format!("prompt {row} is empty")));
    }
    let model_config = model.config();
    let stop = config
        .stop_token_ids
        .clone()
        .unwrap_or_else(|| model_config.eos_token_ids.clone());
    let pad = config
        .pad_token_id
        .or(model_config.pad_token_id)
        .or(stop.first().copied())
        .ok_or_else(|| invalid("no pad_token_id given, in the config, or from a stop token"))?;
    if pad as usize >= model_config.vocab_size {
        return Err(invalid(format!(
            "pad id {pad} is not below vocab {}",
            model_config.vocab_size
        )));
    }
    let b = prompts.len();
    let mut new_tokens = vec![Vec::new(); b];
    if config.max_new_tokens == 0 {
        return Ok(new_tokens);
    }

    let width = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let mut ids = Vec::with_capacity(b * width);
    let mut keep = Vec::with_capacity(b * width);
    let mut positions = Vec::with_capacity(b * width);
    for prompt in prompts {
        let pads = width - prompt.len();
        ids.extend(std::iter::repeat_n(pad, pads).chain(prompt.iter().copied()));
        keep.extend((0..width).map(|j| j >= pads));
        positions.extend(std::iter::repeat_n(0, pads).chain(0..prompt.len()));
    }
    let mut next_positions: Vec<usize> = prompts.iter().map(Vec::len).collect();
    let mut cache = KvCache::new(model_config.num_hidden_layers);
    let ids = Tensor::from_vec(ids, (b, width), model.device())?;
    let mut logits =
        model.forward_step_with_adapter(&ids, &positions, &keep, &mut cache, adapter)?;
    let mut stopped = vec![false; b];
    for step in 0..config.max_new_tokens {
        let rows = logits.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        let mut next = Vec::with_capacity(b);
        for (row, row_logits) in rows.iter().enumerate() {
            if stopped[row] {
                next.push(pad);
                continue;
            }
            let token = sampler.next_token(row_logits)?;
            new_tokens[row].push(token);
            stopped[row] = stop.contains(&token);
            next.push(token);
        }
        if step + 1 == config.max_new_tokens || stopped.iter().all(|&s| s) {
            break;
        }
        let seen = cache.seq_len();
        keep = keep
            .chunks(seen)
            .flat_map(|row| row.iter().copied().chain([true]))
            .collect();
        positions.clone_from(&next_positions);
        next_positions.iter_mut().for_each(|p| *p += 1);
        let ids = Tensor::from_vec(next, (b, 1), model.device())?;
        logits = model.forward_step_with_adapter(&ids, &positions, &keep, &mut cache, adapter)?;
    }
    Ok(new_tokens)
}
