//! Generation with a KV cache against transformers' greedy `generate` on the tiny checkpoints
//! (tests/fixtures/llama/generate.safetensors: a left-padded batch of 3 prompts, 8 new tokens),
//! the cached step against the full forward, stop tokens, and the sampling warpers.

mod common;

use common::llama::fixture_dir;
use std::collections::{BTreeSet, HashMap};

use candle_core::{DType, Device, IndexOp, Tensor};
use qlora::model::generate::{generate, warp_logits, GenerationConfig, KvCache, Sampler};
use qlora::model::llama::LlamaModel;
use qlora::tolerance::{lookup, Dtype, Op};
use qlora::Error;

fn fixtures() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture_dir("generate.safetensors"), &Device::Cpu).unwrap()
}

/// The fixture's prompts with their left padding removed.
fn fixture_prompts(f: &HashMap<String, Tensor>) -> Vec<Vec<u32>> {
    let ids = f["input_ids"].to_vec2::<i64>().unwrap();
    let mask = f["attention_mask"].to_vec2::<i64>().unwrap();
    ids.iter()
        .zip(&mask)
        .map(|(row, keep)| {
            row.iter()
                .zip(keep)
                .filter(|(_, &k)| k == 1)
                .map(|(&id, _)| id as u32)
                .collect()
        })
        .collect()
}

fn greedy(max_new_tokens: usize) -> GenerationConfig {
    GenerationConfig {
        max_new_tokens,
        ..GenerationConfig::default()
    }
}

/// Prompts of lengths 6, 1 and 4 (ids ≥ 3, clear of bos, eos and pad).
fn mixed_prompts() -> Vec<Vec<u32>> {
    vec![
        vec![17, 140, 9, 55, 191, 23],
        vec![88],
        vec![5, 120, 33, 76],
    ]
}

fn check_greedy_matches_transformers(name: &str) {
    let f = fixtures();
    let model = common::llama::load(name, DType::F32, false);
    let eos = model.config().eos_token_ids.clone();
    let got = generate(&model, &fixture_prompts(&f), &greedy(8)).unwrap();
    let want: Vec<Vec<u32>> = f[&format!("{name}.tokens")]
        .to_vec2::<i64>()
        .unwrap()
        .into_iter()
        .map(|row| {
            // transformers pads a row after its eos; ours ends there.
            let end = row
                .iter()
                .position(|&t| eos.contains(&(t as u32)))
                .map_or(row.len(), |i| i + 1);
            row[..end].iter().map(|&t| t as u32).collect()
        })
        .collect();
    assert_eq!(got, want, "{name}: greedy tokens");
}

#[test]
fn greedy_base_matches_transformers_token_for_token() {
    check_greedy_matches_transformers("base");
}

#[test]
fn greedy_llama3_tied_matches_transformers_token_for_token() {
    check_greedy_matches_transformers("llama3_tied_f32");
}

/// Prefills two prompts, then feeds four more tokens one at a time; after every step the cached
/// last-position logits must match the full no-cache forward over everything so far.
fn check_cached_steps_match_full_forward(model: &LlamaModel, dtype: Dtype) {
    let tol = lookup(Op::LlamaLogits, dtype);
    let prompts = [[11u32, 42, 7, 150, 99], [3, 180, 64, 21, 130]];
    let extra = [[61u32, 4], [170, 33], [8, 8], [199, 120]];
    let (b, p) = (prompts.len(), prompts[0].len());
    let mut seqs: Vec<Vec<u32>> = prompts.iter().map(|r| r.to_vec()).collect();
    let mut cache = KvCache::new(model.config().num_hidden_layers);
    let ids = Tensor::new(&prompts, &Device::Cpu).unwrap();
    let positions: Vec<usize> = (0..b).flat_map(|_| 0..p).collect();
    let mut step_logits = model
        .forward_step(&ids, &positions, &vec![true; b * p], &mut cache)
        .unwrap();
    for next in extra.iter().map(Some).chain([None]) {
        let s = seqs[0].len();
        assert_eq!(cache.seq_len(), s);
        let (k, v) = cache.layer(1).unwrap();
        let c = model.config();
        assert_eq!(k.dims(), [b, c.num_key_value_heads, s, c.head_dim]);
        assert_eq!(v.dims(), k.dims());
        assert_eq!(k.dtype(), model.dtype());
        let flat: Vec<u32> = seqs.concat();
        let full = model
            .forward(&Tensor::from_vec(flat, (b, s), &Device::Cpu).unwrap(), None)
            .unwrap();
        let want = full.i((.., s - 1, ..)).unwrap();
        assert_eq!(step_logits.dims(), want.dims());
        assert_eq!(step_logits.dtype(), want.dtype());
        let got = step_logits
            .to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap();
        let want = want.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
        let (got, want) = (
            got.to_vec1::<f32>().unwrap(),
            want.to_vec1::<f32>().unwrap(),
        );
        if let Err(m) = tol.check(&got, &want) {
            panic!("cached logits after {s} tokens: {m}");
        }
        let Some(next) = next else { break };
        for (seq, &t) in seqs.iter_mut().zip(next) {
            seq.push(t);
        }
        let ids = Tensor::from_vec(next.to_vec(), (b, 1), &Device::Cpu).unwrap();
        step_logits = model
            .forward_step(&ids, &[s, s], &vec![true; b * (s + 1)], &mut cache)
            .unwrap();
    }
}

#[test]
fn cached_steps_match_full_forward_f32() {
    check_cached_steps_match_full_forward(
        &common::llama::load("base", DType::F32, false),
        Dtype::F32,
    );
    check_cached_steps_match_full_forward(
        &common::llama::load("llama3_tied_f32", DType::F32, false),
        Dtype::F32,
    );
}

#[test]
fn cached_steps_match_full_forward_bf16() {
    check_cached_steps_match_full_forward(
        &common::llama::load("base", DType::BF16, false),
        Dtype::BF16,
    );
}

#[test]
fn left_padded_batch_equals_each_prompt_alone() {
    for dtype in [DType::F32, DType::BF16] {
        let model = common::llama::load("base", dtype, false);
        let prompts = mixed_prompts();
        let batch = generate(&model, &prompts, &greedy(6)).unwrap();
        for (prompt, got) in prompts.iter().zip(&batch) {
            let alone = generate(&model, std::slice::from_ref(prompt), &greedy(6)).unwrap();
            assert_eq!(got, &alone[0], "{dtype:?}: prompt {prompt:?}");
        }
    }
}

#[test]
fn stop_tokens_end_a_row() {
    let model = common::llama::load("base", DType::F32, false);
    let prompts = mixed_prompts();
    let no_stop = GenerationConfig {
        stop_token_ids: Some(Vec::new()),
        ..greedy(8)
    };
    let free = generate(&model, &prompts, &no_stop).unwrap();
    assert!(free.iter().all(|row| row.len() == 8));
    let stop = free[0][2];
    let with_stop = GenerationConfig {
        stop_token_ids: Some(vec![stop]),
        ..greedy(8)
    };
    let got = generate(&model, &prompts, &with_stop).unwrap();
    let want: Vec<Vec<u32>> = free
        .iter()
        .map(|row| {
            let end = row
                .iter()
                .position(|&t| t == stop)
                .map_or(row.len(), |i| i + 1);
            row[..end].to_vec()
        })
        .collect();
    assert_eq!(got, want);
    assert!(got[0].len() <= 3 && got[0].last() == Some(&stop));

    // Every row stopping ends generation: a single prompt stopped by its first token.
    let first = GenerationConfig {
        stop_token_ids: Some(vec![free[1][0]]),
        ..greedy(8)
    };
    let got = generate(&model, &prompts[1..2], &first).unwrap();
    assert_eq!(got, vec![vec![free[1][0]]]);
}

#[test]
fn top_k_one_sampling_equals_greedy() {
    let model = common::llama::load("base", DType::F32, false);
    let prompts = mixed_prompts();
    let want = generate(&model, &prompts, &greedy(6)).unwrap();
    let sampled = GenerationConfig {
        temperature: 0.7,
        top_k: 1,
        seed: 5,
        ..greedy(6)
    };
    assert_eq!(generate(&model, &prompts, &sampled).unwrap(), want);
}

#[test]
fn sampling_is_deterministic_for_a_seed() {
    let model = common::llama::load("base", DType::F32, false);
    let prompts = mixed_prompts();
    let config = |seed| GenerationConfig {
        temperature: 1.3,
        top_k: 40,
        top_p: 0.9,
        seed,
        stop_token_ids: Some(Vec::new()),
        ..greedy(8)
    };
    let a = generate(&model, &prompts, &config(7)).unwrap();
    assert_eq!(a, generate(&model, &prompts, &config(7)).unwrap());
    assert!(a.iter().all(|row| row.len() == 8));
    let others: Vec<_> = (8..12)
        .map(|seed| generate(&model, &prompts, &config(seed)).unwrap())
        .collect();
    assert!(others.iter().any(|o| o != &a), "the seed changes the draws");
}

/// Logits whose softmax is `probs` exactly up to f32 rounding, plus two tokens of tiny mass.
fn crafted_logits() -> Vec<f32> {
    [0.05f32, 0.5, 1e-6, 0.15, 0.3, 1e-6]
        .iter()
        .map(|p| p.ln())
        .collect()
}

fn kept(scores: &[f32]) -> BTreeSet<usize> {
    (0..scores.len())
        .filter(|&i| scores[i] > f32::NEG_INFINITY)
        .collect()
}

#[test]
fn warpers_keep_the_top_p_set_in_transformers_order() {
    let logits = crafted_logits();
    // Ascending cumulative probabilities ≈ 0, 0, 0.05, 0.2, 0.5, 1: p = 0.7 drops ≤ 0.3.
    assert_eq!(
        kept(&warp_logits(&logits, 1.0, 0, 0.7)),
        BTreeSet::from([1, 4])
    );
    // Temperature first: at 2 the probabilities flatten to ∝ √p and the 0.15 token joins.
    assert_eq!(
        kept(&warp_logits(&logits, 2.0, 0, 0.7)),
        BTreeSet::from([1, 3, 4])
    );
    // top-k before top-p: k = 2 leaves {0.5, 0.3}, renormalized; p = 0.6 then keeps only 0.5.
    assert_eq!(
        kept(&warp_logits(&logits, 1.0, 2, 0.6)),
        BTreeSet::from([1])
    );
    // top-k keeps ties with the k-th score; top_p = 1 keeps everything.
    let tied = [1.0f32, 3.0, 2.0, 2.0, 0.0];
    assert_eq!(
        kept(&warp_logits(&tied, 1.0, 2, 1.0)),
        BTreeSet::from([1, 2, 3])
    );
    assert_eq!(kept(&warp_logits(&tied, 1.0, 0, 1.0)).len(), tied.len());
    // A tiny top_p still keeps the most likely token.
    assert_eq!(
        kept(&warp_logits(&logits, 1.0, 0, 1e-9)),
        BTreeSet::from([1])
    );
}

#[test]
fn top_p_sampling_only_emits_tokens_in_the_top_p_set() {
    let logits = crafted_logits();
    let config = GenerationConfig {
        temperature: 1.0,
        top_p: 0.7,
        seed: 3,
        ..GenerationConfig::default()
    };
    let draw = |config: &GenerationConfig| {
        let mut sampler = Sampler::new(config).unwrap();
        (0..2000)
            .map(|_| sampler.next_token(&logits).unwrap())
            .collect::<Vec<u32>>()
    };
    let tokens = draw(&config);
    assert_eq!(tokens, draw(&config), "same seed, same draws");
    let seen: BTreeSet<u32> = tokens.iter().copied().collect();
    assert_eq!(seen, BTreeSet::from([1, 4]));
    // Renormalized over the set, token 1 has probability 0.5 / 0.8.
    let ones = tokens.iter().filter(|&&t| t == 1).count() as f64 / tokens.len() as f64;
    assert!((ones - 0.625).abs() < 0.05, "token 1 drawn at rate {ones}");
    let other_seed = GenerationConfig { seed: 4, ..config };
    assert_ne!(tokens, draw(&other_seed));
}

#[test]
fn greedy_ties_pick_the_lowest_index() {
    let mut sampler = Sampler::new(&GenerationConfig::default()).unwrap();
    assert_eq!(sampler.next_token(&[0.5, 2.0, -1.0, 2.0]).unwrap(), 1);
}

#[test]
fn invalid_configs_and_prompts_are_rejected() {
    let model = common::llama::load("llama3_tied_f32", DType::F32, false);
    let prompt = vec![vec![5u32, 6]];
    let bad = [
        GenerationConfig {
            top_p: 0.0,
            ..greedy(2)
        },
        GenerationConfig {
            top_p: 1.5,
            ..greedy(2)
        },
        GenerationConfig {
            top_p: f64::NAN,
            ..greedy(2)
        },
        GenerationConfig {
            temperature: -0.5,
            ..greedy(2)
        },
        GenerationConfig {
            temperature: f64::INFINITY,
            ..greedy(2)
        },
    ];
    for config in &bad {
        let err = generate(&model, &prompt, config).unwrap_err();
        assert!(
            matches!(err, Error::InvalidArgument { .. }),
            "{config:?}: {err}"
        );
        assert!(matches!(
            Sampler::new(config),
            Err(Error::InvalidArgument { .. })
        ));
    }
    for prompts in [vec![], vec![vec![5], vec![]], vec![vec![5, 999]]] {
        let err = generate(&model, &prompts, &greedy(2)).unwrap_err();
        assert!(
            matches!(err, Error::InvalidArgument { .. }),
            "{prompts:?}: {err}"
        );
    }
    let bad_pad = GenerationConfig {
        pad_token_id: Some(5000),
        ..greedy(2)
    };
    assert!(matches!(
        generate(&model, &prompt, &bad_pad),
        Err(Error::InvalidArgument { .. })
    ));
}
