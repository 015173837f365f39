//! The Llama forward pass and causal-LM loss against transformers' `LlamaForCausalLM` on the tiny
//! checkpoints of tests/fixtures/llama/ (tests/fixtures/llama/forward.safetensors, written by
//! scripts/make_fixtures.py): a padded batch [3, 9] in f32 and bf16, dense, tied and NF4.

mod common;

use common::llama::{fixture_dir, kept_rows, load, load_weights, max_abs_diff};
use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use qlora::model::llama::LlamaModel;
use qlora::model::Linear;
use qlora::tolerance::{lookup, Dtype, Op};
use qlora::Error;

fn fixtures() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture_dir("forward.safetensors"), &Device::Cpu).unwrap()
}

struct Batch {
    input_ids: Tensor,
    attention_mask: Tensor,
    labels: Tensor,
}

fn batch(f: &HashMap<String, Tensor>) -> Batch {
    Batch {
        input_ids: f["input_ids"].to_dtype(DType::U32).unwrap(),
        attention_mask: f["attention_mask"].clone(),
        labels: f["labels"].clone(),
    }
}

/// Runs `model` on the fixture batch and checks logits (non-pad positions) and loss against
/// `{case}.logits` / `{case}.loss` within the LlamaLogits tolerance of `dtype`.
fn check_case(model: &LlamaModel, case: &str, dtype: Dtype) {
    let f = fixtures();
    let batch = batch(&f);
    let logits = model
        .forward(&batch.input_ids, Some(&batch.attention_mask))
        .unwrap();
    assert_eq!(logits.dtype(), model.dtype());
    let want = &f[&format!("{case}.logits")];
    assert_eq!(logits.dims(), want.dims());
    assert_eq!(logits.dtype(), want.dtype(), "{case}: logits dtype");
    let got_rows = kept_rows(&logits, &batch.attention_mask);
    let want_rows = kept_rows(want, &batch.attention_mask);
    let tol = lookup(Op::LlamaLogits, dtype);
    eprintln!(
        "{case}: max |logit diff| {:e} over {} values",
        max_abs_diff(&got_rows, &want_rows),
        got_rows.len()
    );
    if let Err(m) = tol.check(&got_rows, &want_rows) {
        panic!("{case} logits: {m}");
    }

    let (loss, count) = LlamaModel::loss(&logits, &batch.labels).unwrap();
    assert_eq!(count, 17, "label tokens after the shift");
    let got = loss.to_scalar::<f32>().unwrap();
    let want = f[&format!("{case}.loss")].to_scalar::<f32>().unwrap();
    eprintln!(
        "{case}: loss {got} vs {want}, |diff| {:e}",
        (got - want).abs()
    );
    if let Err(m) = tol.check(&[got], &[want]) {
        panic!("{case} loss: {m}");
    }
}

#[test]
fn base_f32_matches_transformers() {
    check_case(&load("base", DType::F32, false), "base.f32", Dtype::F32);
}

#[test]
fn base_bf16_matches_transformers_bf16() {
    check_case(&load("base", DType::BF16, false), "base.bf16", Dtype::BF16);
}

#[test]
fn llama3_rope_tied_embeddings_match_transformers() {
    check_case(
        &load("llama3_tied_f32", DType::F32, false),
        "llama3_tied_f32.f32",
        Dtype::F32,
    );
}

#[test]
fn bnb_prequantized_matches_transformers_on_bnb_dequantized_weights() {
    let (config, weights) = load_weights("bnb_nf4", DType::F32, false);
    assert!(matches!(weights.layers[1].down_proj, Linear::Nf4(_)));
    check_case(
        &LlamaModel::new(config, weights).unwrap(),
        "bnb_nf4.f32",
        Dtype::F32,
    );
}

#[test]
fn quantize_on_load_equals_bnb_prequantized_bit_for_bit() {
    // Loaded in bf16 as bitsandbytes quantizes a bf16 checkpoint: the same NF4 bytes and scales
    // and the same original dtype, so the same dequantized weights and the very same logits.
    let (config, ours) = load_weights("base", DType::BF16, true);
    let (_, bnb) = load_weights("bnb_nf4", DType::BF16, false);
    for (a, b) in ours.layers.iter().zip(&bnb.layers) {
        let pairs = [
            (&a.q_proj, &b.q_proj),
            (&a.k_proj, &b.k_proj),
            (&a.v_proj, &b.v_proj),
            (&a.o_proj, &b.o_proj),
            (&a.gate_proj, &b.gate_proj),
            (&a.up_proj, &b.up_proj),
            (&a.down_proj, &b.down_proj),
        ];
        for pair in pairs {
            match pair {
                (Linear::Nf4(a), Linear::Nf4(b)) => assert_eq!(a, b),
                _ => panic!("a linear is not NF4"),
            }
        }
    }
    let ours = LlamaModel::new(config.clone(), ours).unwrap();
    let bnb = LlamaModel::new(config, bnb).unwrap();
    let f = fixtures();
    let batch = batch(&f);
    let a = ours
        .forward(&batch.input_ids, Some(&batch.attention_mask))
        .unwrap();
    let b = bnb
        .forward(&batch.input_ids, Some(&batch.attention_mask))
        .unwrap();
    let a = a.flatten_all().unwrap().to_dtype(DType::F32).unwrap();
    let b = b.flatten_all().unwrap().to_dtype(DType::F32).unwrap();
    assert_eq!(a.to_vec1::<f32>().unwrap(), b.to_vec1::<f32>().unwrap());
}

#[test]
fn quantize_on_load_matches_transformers_on_bnb_dequantized_weights() {
    // bitsandbytes quantizes the bf16 checkpoint (quant_state dtype bfloat16) and the fixture ran
    // in f32: the f32 dense weights with the seven linears quantized on load from bf16.
    let (_, quantized) = load_weights("base", DType::BF16, true);
    let (config, mut weights) = load_weights("base", DType::F32, false);
    for (dense, q) in weights.layers.iter_mut().zip(quantized.layers) {
        assert!(matches!(q.q_proj, Linear::Nf4(_)));
        dense.q_proj = q.q_proj;
        dense.k_proj = q.k_proj;
        dense.v_proj = q.v_proj;
        dense.o_proj = q.o_proj;
        dense.gate_proj = q.gate_proj;
        dense.up_proj = q.up_proj;
        dense.down_proj = q.down_proj;
    }
    check_case(
        &LlamaModel::new(config, weights).unwrap(),
        "bnb_nf4.f32",
        Dtype::F32,
    );
}

/// The loss by hand: for each row, position t's log-softmax at label t + 1.
fn manual_loss(logits: &[Vec<Vec<f32>>], labels: &[Vec<i64>]) -> (f64, usize) {
    let mut sum = 0.0f64;
    let mut count = 0;
    for (row, labels) in logits.iter().zip(labels) {
        for t in 0..labels.len() - 1 {
            let label = labels[t + 1];
            if label == -100 {
                continue;
            }
            let x = &row[t];
            let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            let lse = max + x.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln();
            sum += lse - x[label as usize] as f64;
            count += 1;
        }
    }
    (sum / count as f64, count)
}

#[test]
fn loss_shifts_ignores_minus_100_and_divides_by_label_count() {
    let (b, t, v) = (2, 5, 7);
    let values: Vec<f32> = (0..b * t * v)
        .map(|i| ((i * 37 % 23) as f32 - 11.0) / 4.0)
        .collect();
    let logits = Tensor::from_vec(values, (b, t, v), &Device::Cpu).unwrap();
    let labels_rows = vec![vec![3i64, -100, 6, 0, 2], vec![-100, -100, 1, -100, 5]];
    let labels = Tensor::new(labels_rows.clone(), &Device::Cpu).unwrap();
    let (loss, count) = LlamaModel::loss(&logits, &labels).unwrap();
    let (want, want_count) = manual_loss(&logits.to_vec3::<f32>().unwrap(), &labels_rows);
    assert_eq!(count, 5);
    assert_eq!(count, want_count);
    let got = loss.to_scalar::<f32>().unwrap();
    let tol = lookup(Op::LlamaLogits, Dtype::F32);
    assert!(tol.check(&[got], &[want as f32]).is_ok(), "{got} vs {want}");

    // Logits whose next label is ignored (and every last position) do not enter the loss.
    let mut poked = logits.to_vec3::<f32>().unwrap();
    for (row, t) in [(0, 0), (0, 4), (1, 0), (1, 2), (1, 4)] {
        poked[row][t].iter_mut().for_each(|x| *x = 1e3);
    }
    let poked = Tensor::new(poked, &Device::Cpu).unwrap();
    let (again, _) = LlamaModel::loss(&poked, &labels).unwrap();
    assert_eq!(again.to_scalar::<f32>().unwrap(), got);

    // bf16 logits are widened to f32 before the cross-entropy, as transformers' loss does.
    let (bf, _) = LlamaModel::loss(&logits.to_dtype(DType::BF16).unwrap(), &labels).unwrap();
    assert_eq!(bf.dtype(), DType::F32);

    // No label token at all: NaN, as PyTorch's mean over nothing.
    let none = Tensor::new(vec![vec![-100i64; t]; b], &Device::Cpu).unwrap();
    let (nan, zero) = LlamaModel::loss(&logits, &none).unwrap();
    assert_eq!(zero, 0);
    assert!(nan.to_scalar::<f32>().unwrap().is_nan());
}

fn assert_invalid<T: std::fmt::Debug>(result: qlora::Result<T>, what: &str) {
    match result {
        Err(Error::InvalidArgument { .. }) => {}
        other => panic!("{what}: expected InvalidArgument, got {other:?}"),
    }
}

#[test]
fn bad_shapes_and_dtypes_are_invalid_arguments() {
    let model = load("llama3_tied_f32", DType::F32, false);
    let cpu = &Device::Cpu;
    let ids = Tensor::new(&[[1u32, 2, 3], [4, 5, 6]], cpu).unwrap();
    let mask = Tensor::new(&[[1i64, 1, 1], [0, 1, 1]], cpu).unwrap();
    assert!(model.forward(&ids, Some(&mask)).is_ok());
    assert!(model.forward(&ids, None).is_ok());

    let i64_ids = ids.to_dtype(DType::I64).unwrap();
    assert_invalid(model.forward(&i64_ids, None), "i64 ids");
    let flat = ids.flatten_all().unwrap();
    assert_invalid(model.forward(&flat, None), "rank-1 ids");
    let empty = Tensor::zeros((2, 0), DType::U32, cpu).unwrap();
    assert_invalid(model.forward(&empty, None), "empty ids");
    let vocab = model.config().vocab_size as u32;
    let big = Tensor::new(&[[1u32, vocab]], cpu).unwrap();
    assert_invalid(model.forward(&big, None), "id ≥ vocab");
    let short = Tensor::new(&[[1i64, 1]], cpu).unwrap();
    assert_invalid(model.forward(&ids, Some(&short)), "mask shape");
    let two = Tensor::new(&[[1i64, 2, 1], [1, 1, 1]], cpu).unwrap();
    assert_invalid(model.forward(&ids, Some(&two)), "mask value 2");
    let float_mask = mask.to_dtype(DType::F32).unwrap();
    assert_invalid(model.forward(&ids, Some(&float_mask)), "f32 mask");

    let logits = model.forward(&ids, None).unwrap();
    let labels = Tensor::new(&[[1i64, 2, 3], [4, -100, 6]], cpu).unwrap();
    assert!(LlamaModel::loss(&logits, &labels).is_ok());
    assert_invalid(
        LlamaModel::loss(&logits, &labels.to_dtype(DType::U32).unwrap()),
        "u32 labels",
    );
    let short_labels = Tensor::new(&[[1i64, 2]], cpu).unwrap();
    assert_invalid(LlamaModel::loss(&logits, &short_labels), "labels shape");
    let out_of_vocab = Tensor::new(&[[1i64, 2, vocab as i64], [4, 5, 6]], cpu).unwrap();
    assert_invalid(LlamaModel::loss(&logits, &out_of_vocab), "label ≥ vocab");
    let negative = Tensor::new(&[[1i64, -1, 3], [4, 5, 6]], cpu).unwrap();
    assert_invalid(LlamaModel::loss(&logits, &negative), "label -1");
    let flat_logits = logits.flatten_to(1).unwrap();
    assert_invalid(LlamaModel::loss(&flat_logits, &labels), "rank-2 logits");

    // Weights that do not fit the config.
    let (config, weights) = load_weights("llama3_tied_f32", DType::F32, false);
    let mut fewer = weights.clone();
    fewer.layers.pop();
    assert_invalid(LlamaModel::new(config.clone(), fewer), "missing layer");
    let mut f16 = weights.clone();
    f16.embed_tokens = f16.embed_tokens.to_dtype(DType::F16).unwrap();
    assert_invalid(LlamaModel::new(config.clone(), f16), "f16 compute");
    let mut mixed = weights;
    mixed.norm = mixed.norm.to_dtype(DType::BF16).unwrap();
    assert_invalid(LlamaModel::new(config, mixed), "mixed dtypes");
}
