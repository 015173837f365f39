//! The explicit LoRA backward (`qlora::model::backward`) against candle's autograd on the CPU, the
//! independent oracle: the same layer / stack built from candle ops with `Var`s for x, A and B, on
//! the tiny f32 fixtures (tests/fixtures/llama/{base, llama3_tied_f32}) and the padded batch of
//! tests/fixtures/llama/forward.safetensors (left-padded, right-padded and full rows).

mod common;

use common::llama::{fixture_dir, load_weights, max_abs_diff};
use std::collections::{BTreeMap, HashMap};

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var, D};
use qlora::model::backward::{
    decoder_layer_backward, lora_gradients, lora_gradients_from_dlogits, LoraGrads,
};
use qlora::model::llama::LlamaModel;
use qlora::model::{Linear, LlamaConfig, LlamaWeights};
use qlora::peft::{LoraAdapter, LoraConfig, LoraMode, LoraPair, TargetModule};
use qlora::tolerance::{lookup, Dtype, Op};
use qlora::Error;

struct Batch {
    input_ids: Tensor,
    attention_mask: Tensor,
    labels: Tensor,
}

fn padded_batch() -> Batch {
    let f: HashMap<String, Tensor> =
        candle_core::safetensors::load(fixture_dir("forward.safetensors"), &Device::Cpu).unwrap();
    Batch {
        input_ids: f["input_ids"].to_dtype(DType::U32).unwrap(),
        attention_mask: f["attention_mask"].clone(),
        labels: f["labels"].clone(),
    }
}

/// Deterministic values in ±`scale`, distinct per `seed`.
fn seeded(seed: u64, dims: &[usize], scale: f32) -> Tensor {
    let n: usize = dims.iter().product();
    let values: Vec<f32> = (0..n)
        .map(|i| ((i as f64 * 0.618_034 + seed as f64 * 1.3).sin() * 43_758.545).fract())
        .map(|u| u as f32 * scale)
        .collect();
    Tensor::from_vec(values, dims, &Device::Cpu).unwrap()
}

/// r = 4, alpha = 8 on `targets`, PEFT-initialised A and a seeded non-zero B.
fn adapter(model: &LlamaModel, targets: &[TargetModule], rslora: bool) -> LoraAdapter {
    let config = LoraConfig {
        r: 4,
        alpha: 8.0,
        target_modules: targets.to_vec(),
        use_rslora: rslora,
        ..LoraConfig::default()
    };
    let mut adapter =
        LoraAdapter::init(config, model.config(), DType::F32, &Device::Cpu, 7).unwrap();
    let pairs: Vec<_> = adapter.pairs().map(|(k, p)| (k, p.clone())).collect();
    for ((layer, module), pair) in pairs {
        let seed = (layer * 16 + module as usize) as u64;
        let b = seeded(seed, pair.b.dims(), 0.2);
        adapter
            .set_pair(layer, module, LoraPair { a: pair.a, b })
            .unwrap();
    }
    adapter
}

/// The layer and stack as plain candle ops on `Var`s, differentiated by candle's autograd.
struct Oracle<'a> {
    config: &'a LlamaConfig,
    weights: &'a LlamaWeights,
    scaling: f64,
    lora: BTreeMap<(usize, TargetModule), (Var, Var)>,
    mask: Tensor,
    cos: Tensor,
    sin: Tensor,
}

impl<'a> Oracle<'a> {
    fn new(
        config: &'a LlamaConfig,
        weights: &'a LlamaWeights,
        adapter: &LoraAdapter,
        attention_mask: &Tensor,
    ) -> Self {
        let lora = adapter
            .pairs()
            .map(|(k, p)| {
                let a = Var::from_tensor(&p.a).unwrap();
                let b = Var::from_tensor(&p.b).unwrap();
                (k, (a, b))
            })
            .collect();
        let (b, t) = attention_mask.dims2().unwrap();
        let keep = attention_mask.to_vec2::<i64>().unwrap();
        let mut mask = vec![0f32; b * t * t];
        for (row, keep) in keep.iter().enumerate() {
            for i in 0..t {
                for j in 0..t {
                    if j > i || keep[j] == 0 {
                        mask[(row * t + i) * t + j] = f32::MIN;
                    }
                }
            }
        }
        let inv_freq = config.rope_inv_freq();
        let mut angles = Vec::new();
        for pos in 0..t {
            for _ in 0..2 {
                angles.extend(inv_freq.iter().map(|f| pos as f32 * f));
            }
        }
        let angles = Tensor::from_vec(angles, (1, 1, t, config.head_dim), &Device::Cpu).unwrap();
        Self {
            config,
            weights,
            scaling: adapter.config().scaling(),
            lora,
            mask: Tensor::from_vec(mask, (b, 1, t, t), &Device::Cpu).unwrap(),
            cos: angles.cos().unwrap(),
            sin: angles.sin().unwrap(),
        }
    }

    fn linear(&self, layer: usize, module: TargetModule, x: &Tensor) -> Tensor {
        let l = &self.weights.layers[layer];
        let w = match module {
            TargetModule::QProj => &l.q_proj,
            TargetModule::KProj => &l.k_proj,
            TargetModule::VProj => &l.v_proj,
            TargetModule::OProj => &l.o_proj,
            TargetModule::GateProj => &l.gate_proj,
            TargetModule::UpProj => &l.up_proj,
            TargetModule::DownProj => &l.down_proj,
        };
        let Linear::Dense(w) = w else {
            panic!("the oracle takes dense weights")
        };
        let (b, t, i) = x.dims3().unwrap();
        let x2 = x.reshape((b * t, i)).unwrap();
        let mut y = x2.matmul(&w.t().unwrap()).unwrap();
        if let Some((a, bm)) = self.lora.get(&(layer, module)) {
            let delta = x2
                .matmul(&a.as_tensor().t().unwrap())
                .unwrap()
                .matmul(&bm.as_tensor().t().unwrap())
                .unwrap();
            y = (y + (delta * self.scaling).unwrap()).unwrap();
        }
        y.reshape((b, t, ())).unwrap()
    }

    fn rms_norm(&self, x: &Tensor, w: &Tensor) -> Tensor {
        let rstd = (x.sqr().unwrap().mean_keepdim(D::Minus1).unwrap() + self.config.rms_norm_eps)
            .unwrap()
            .sqrt()
            .unwrap()
            .recip()
            .unwrap();
        x.broadcast_mul(&rstd).unwrap().broadcast_mul(w).unwrap()
    }

    fn rope(&self, x: &Tensor) -> Tensor {
        let half = self.config.head_dim / 2;
        let x1 = x.narrow(D::Minus1, 0, half).unwrap();
        let x2 = x.narrow(D::Minus1, half, half).unwrap();
        let rotated = Tensor::cat(&[&x2.neg().unwrap(), &x1], D::Minus1).unwrap();
        (x.broadcast_mul(&self.cos).unwrap() + rotated.broadcast_mul(&self.sin).unwrap()).unwrap()
    }

    fn heads(&self, x: &Tensor, n: usize) -> Tensor {
        let (b, t, _) = x.dims3().unwrap();
        x.reshape((b, t, n, self.config.head_dim))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
    }

    fn repeat(&self, x: &Tensor) -> Tensor {
        let c = self.config;
        let n_rep = c.num_attention_heads / c.num_key_value_heads;
        let (b, kv, t, d) = x.dims4().unwrap();
        x.unsqueeze(2)
            .unwrap()
            .broadcast_as((b, kv, n_rep, t, d))
            .unwrap()
            .reshape((b, kv * n_rep, t, d))
            .unwrap()
    }

    fn layer(&self, layer: usize, x: &Tensor) -> Tensor {
        let c = self.config;
        let l = &self.weights.layers[layer];
        let (b, t, _) = x.dims3().unwrap();
        let n = self.rms_norm(x, &l.input_layernorm);
        let q = self.rope(&self.heads(
            &self.linear(layer, TargetModule::QProj, &n),
            c.num_attention_heads,
        ));
        let k = self.rope(&self.heads(
            &self.linear(layer, TargetModule::KProj, &n),
            c.num_key_value_heads,
        ));
        let v = self.heads(
            &self.linear(layer, TargetModule::VProj, &n),
            c.num_key_value_heads,
        );
        let (k, v) = (self.repeat(&k), self.repeat(&v));
        let scores = (q.matmul(&k.t().unwrap()).unwrap() / (c.head_dim as f64).sqrt()).unwrap();
        let scores = scores.broadcast_add(&self.mask).unwrap();
        let max = scores.max_keepdim(D::Minus1).unwrap().detach();
        let exp = scores.broadcast_sub(&max).unwrap().exp().unwrap();
        let probs = exp
            .broadcast_div(&exp.sum_keepdim(D::Minus1).unwrap())
            .unwrap();
        let out = probs
            .matmul(&v)
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .reshape((b, t, ()))
            .unwrap();
        let h = (x + self.linear(layer, TargetModule::OProj, &out)).unwrap();
        let n = self.rms_norm(&h, &l.post_attention_layernorm);
        let gate = self.linear(layer, TargetModule::GateProj, &n);
        let up = self.linear(layer, TargetModule::UpProj, &n);
        let act = (gate.silu().unwrap() * up).unwrap();
        (&h + self.linear(layer, TargetModule::DownProj, &act)).unwrap()
    }

    /// The mean causal-LM loss of the whole stack on `batch`.
    fn loss(&self, batch: &Batch) -> Tensor {
        let (b, t) = batch.input_ids.dims2().unwrap();
        let w = self.weights;
        let ids = batch.input_ids.flatten_all().unwrap();
        let mut x = w
            .embed_tokens
            .index_select(&ids, 0)
            .unwrap()
            .reshape((b, t, ()))
            .unwrap();
        for layer in 0..self.config.num_hidden_layers {
            x = self.layer(layer, &x);
        }
        let x = self.rms_norm(&x, &w.norm).reshape((b * t, ())).unwrap();
        let logits = x.matmul(&w.lm_head().t().unwrap()).unwrap();
        let labels = batch
            .labels
            .flatten_all()
            .unwrap()
            .to_vec1::<i64>()
            .unwrap();
        let (mut rows, mut targets) = (Vec::new(), Vec::new());
        for (i, &label) in labels.iter().enumerate() {
            if i % t != 0 && label >= 0 {
                rows.push((i - 1) as u32);
                targets.push(label as u32);
            }
        }
        let count = rows.len();
        let rows = Tensor::from_vec(rows, count, &Device::Cpu).unwrap();
        let targets = Tensor::from_vec(targets, (count, 1), &Device::Cpu).unwrap();
        let z = logits.index_select(&rows, 0).unwrap();
        let max = z.max_keepdim(D::Minus1).unwrap().detach();
        let shifted = z.broadcast_sub(&max).unwrap();
        let lse = shifted
            .exp()
            .unwrap()
            .sum_keepdim(D::Minus1)
            .unwrap()
            .log()
            .unwrap();
        let nll = (lse - shifted.gather(&targets, 1).unwrap()).unwrap();
        (nll.sum_all().unwrap() / count as f64).unwrap()
    }

    /// The gradients of the pairs the differentiated output depends on.
    fn lora_grads(&self, grads: &GradStore) -> LoraGrads {
        self.lora
            .iter()
            .filter_map(|(&k, (a, b))| {
                let pair = LoraPair {
                    a: grads.get(a.as_tensor())?.clone(),
                    b: grads.get(b.as_tensor())?.clone(),
                };
                Some((k, pair))
            })
            .collect()
    }
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// Every (layer, module) of `want` is in `got` (and nothing else), within `Op::LoraGrad` F32;
/// returns the worst absolute difference.
fn check_lora_grads(what: &str, got: &LoraGrads, want: &LoraGrads) -> f32 {
    let tol = lookup(Op::LoraGrad, Dtype::F32);
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>(),
        "{what}: gradients for exactly the adapted linears"
    );
    let mut worst = 0f32;
    for (key, g) in got {
        let w = &want[key];
        for (name, gt, wt) in [("dA", &g.a, &w.a), ("dB", &g.b, &w.b)] {
            assert_eq!(gt.dims(), wt.dims(), "{what} {key:?} {name}");
            let (gv, wv) = (values(gt), values(wt));
            worst = worst.max(max_abs_diff(&gv, &wv));
            if let Err(m) = tol.check(&gv, &wv) {
                panic!("{what} {key:?} {name}: {m}");
            }
        }
    }
    worst
}

fn check_layer(name: &str, rslora: bool) {
    let (model, weights) = load(name);
    let adapter = adapter(&model, &TargetModule::ALL, rslora);
    let batch = padded_batch();
    let c = model.config();
    let (b, t) = batch.input_ids.dims2().unwrap();
    let oracle = Oracle::new(c, &weights, &adapter, &batch.attention_mask);
    for layer in 0..c.num_hidden_layers {
        let x = seeded(100 + layer as u64, &[b, t, c.hidden_size], 1.0);
        let dy = seeded(200 + layer as u64, &[b, t, c.hidden_size], 1.0);
        let x_var = Var::from_tensor(&x).unwrap();
        let y = oracle.layer(layer, x_var.as_tensor());
        let grads = (y * &dy).unwrap().sum_all().unwrap().backward().unwrap();
        let want_dx = grads.get(x_var.as_tensor()).unwrap();
        let want = oracle.lora_grads(&grads);

        let got = decoder_layer_backward(
            &model,
            Some(&adapter),
            layer,
            &x,
            Some(&batch.attention_mask),
            &dy,
        )
        .unwrap();
        let worst = check_lora_grads(&format!("{name} layer {layer}"), &got.lora, &want);
        let (gx, wx) = (values(&got.dx), values(want_dx));
        eprintln!(
            "{name} rslora={rslora} layer {layer}: max |dx diff| {:e} (|dx| ≤ {:e}), max |dA, dB diff| {worst:e}",
            max_abs_diff(&gx, &wx),
            wx.iter().fold(0f32, |m, v| m.max(v.abs()))
        );
        if let Err(m) = lookup(Op::LoraGrad, Dtype::F32).check(&gx, &wx) {
            panic!("{name} layer {layer} dx: {m}");
        }
    }
}

#[test]
fn layer_backward_matches_candle_autograd() {
    check_layer("base", false);
}

#[test]
fn layer_backward_matches_candle_autograd_rslora_tied_llama3() {
    check_layer("llama3_tied_f32", true);
}

fn check_stack(name: &str, rslora: bool) {
    let (model, weights) = load(name);
    let adapter = adapter(&model, &TargetModule::ALL, rslora);
    let batch = padded_batch();
    let got = lora_gradients(
        &model,
        &adapter,
        &batch.input_ids,
        Some(&batch.attention_mask),
        &batch.labels,
    )
    .unwrap();

    let oracle = Oracle::new(model.config(), &weights, &adapter, &batch.attention_mask);
    let loss = oracle.loss(&batch);
    let want = oracle.lora_grads(&loss.backward().unwrap());
    let worst = check_lora_grads(&format!("{name} stack"), &got.lora, &want);
    let want_loss = loss.to_scalar::<f32>().unwrap();
    eprintln!(
        "{name} rslora={rslora} stack: loss {} vs candle {want_loss}, max |dA, dB diff| {worst:e}",
        got.loss
    );
    let tol = lookup(Op::LlamaLogits, Dtype::F32);
    tol.check(&[got.loss], &[want_loss]).unwrap();

    let logits = model
        .forward_with_adapter(
            &batch.input_ids,
            Some(&batch.attention_mask),
            &adapter,
            &LoraMode::Eval,
        )
        .unwrap();
    let (forward_loss, count) = LlamaModel::loss(&logits, &batch.labels).unwrap();
    assert_eq!(got.label_tokens, count);
    assert_eq!(
        got.loss,
        forward_loss.to_scalar::<f32>().unwrap(),
        "the checkpointed forward is LlamaModel's forward"
    );
}

#[test]
fn stack_gradients_match_candle_autograd() {
    check_stack("base", false);
}

#[test]
fn stack_gradients_match_candle_autograd_rslora_tied_llama3() {
    check_stack("llama3_tied_f32", true);
}

#[test]
fn stack_keeps_only_each_layers_input() {
    let (model, _) = load("base");
    let adapter = adapter(&model, &TargetModule::ALL, false);
    let batch = padded_batch();
    let got = lora_gradients(
        &model,
        &adapter,
        &batch.input_ids,
        Some(&batch.attention_mask),
        &batch.labels,
    )
    .unwrap();
    let c = model.config();
    let (b, t) = batch.input_ids.dims2().unwrap();
    assert_eq!(got.checkpoints.saved_tensors, c.num_hidden_layers);
    assert_eq!(
        got.checkpoints.saved_bytes,
        c.num_hidden_layers * b * t * c.hidden_size * 4
    );
}

#[test]
fn only_adapted_linears_get_gradients() {
    let (model, _) = load("base");
    let targets = [
        TargetModule::QProj,
        TargetModule::VProj,
        TargetModule::DownProj,
    ];
    let adapter = adapter(&model, &targets, false);
    let batch = padded_batch();
    let got = lora_gradients(
        &model,
        &adapter,
        &batch.input_ids,
        Some(&batch.attention_mask),
        &batch.labels,
    )
    .unwrap();
    let want: Vec<_> = adapter.pairs().map(|(k, _)| k).collect();
    assert_eq!(got.lora.keys().copied().collect::<Vec<_>>(), want);
    for ((layer, module), g) in &got.lora {
        let p = adapter.pair(*layer, *module).unwrap();
        assert_eq!(g.a.dims(), p.a.dims());
        assert_eq!(g.b.dims(), p.b.dims());
        assert_eq!(g.a.dtype(), DType::F32);
    }
}

#[test]
fn dlogits_entry_point_matches_the_loss_entry_point() {
    let (model, _) = load("base");
    let adapter = adapter(&model, &TargetModule::ALL, false);
    let batch = padded_batch();
    let mask = Some(&batch.attention_mask);
    let from_loss =
        lora_gradients(&model, &adapter, &batch.input_ids, mask, &batch.labels).unwrap();
    // The loss gradient by candle's autograd on the logits, fed back in.
    let logits = model
        .forward_with_adapter(&batch.input_ids, mask, &adapter, &LoraMode::Eval)
        .unwrap();
    let logits = Var::from_tensor(&logits).unwrap();
    let (loss, _) = LlamaModel::loss(logits.as_tensor(), &batch.labels).unwrap();
    let dlogits = loss
        .backward()
        .unwrap()
        .get(logits.as_tensor())
        .unwrap()
        .clone();
    let (grads, stats) =
        lora_gradients_from_dlogits(&model, &adapter, &batch.input_ids, mask, &dlogits).unwrap();
    assert_eq!(stats, from_loss.checkpoints);
    check_lora_grads("from dlogits", &grads, &from_loss.lora);

    let wrong = dlogits.narrow(2, 0, 10).unwrap();
    let err = lora_gradients_from_dlogits(&model, &adapter, &batch.input_ids, mask, &wrong);
    assert!(matches!(err, Err(Error::InvalidArgument { .. })), "{err:?}");
}

#[test]
fn bad_arguments_are_typed_errors() {
    let (model, _) = load("base");
    let adapter = adapter(&model, &TargetModule::ALL, false);
    let c = model.config();
    let x = seeded(1, &[1, 3, c.hidden_size], 1.0);
    let err = decoder_layer_backward(&model, Some(&adapter), c.num_hidden_layers, &x, None, &x);
    assert!(matches!(err, Err(Error::InvalidArgument { .. })), "{err:?}");
    let dy = seeded(2, &[1, 2, c.hidden_size], 1.0);
    let err = decoder_layer_backward(&model, Some(&adapter), 0, &x, None, &dy);
    assert!(matches!(err, Err(Error::InvalidArgument { .. })), "{err:?}");
    let ids = Tensor::new(&[[3u32, 4, 5]], &Device::Cpu).unwrap();
    let labels = Tensor::new(&[[-100i64, -100, -100]], &Device::Cpu).unwrap();
    let err = lora_gradients(&model, &adapter, &ids, None, &labels);
    assert!(matches!(err, Err(Error::InvalidArgument { .. })), "{err:?}");
}

/// Central differences of the loss (LlamaModel's forward) in a few of the largest dA entries.
#[test]
fn lora_a_gradient_matches_finite_differences() {
    let (model, _) = load("base");
    let adapter = adapter(&model, &TargetModule::ALL, false);
    let batch = padded_batch();
    let mask = Some(&batch.attention_mask);
    let got = lora_gradients(&model, &adapter, &batch.input_ids, mask, &batch.labels).unwrap();
    let loss_with = |a: Tensor, layer: usize, module: TargetModule| -> f64 {
        let mut perturbed = adapter.clone();
        let b = adapter.pair(layer, module).unwrap().b.clone();
        perturbed
            .set_pair(layer, module, LoraPair { a, b })
            .unwrap();
        let logits = model
            .forward_with_adapter(&batch.input_ids, mask, &perturbed, &LoraMode::Eval)
            .unwrap();
        let (loss, _) = LlamaModel::loss(&logits, &batch.labels).unwrap();
        f64::from(loss.to_scalar::<f32>().unwrap())
    };
    let eps = 1e-2f32;
    for (layer, module) in [(0, TargetModule::QProj), (1, TargetModule::GateProj)] {
        let da = values(&got.lora[&(layer, module)].a);
        let a = adapter.pair(layer, module).unwrap().a.clone();
        let a_values = values(&a);
        let mut order: Vec<usize> = (0..da.len()).collect();
        order.sort_by(|&i, &j| da[j].abs().total_cmp(&da[i].abs()));
        for &i in &order[..2] {
            let shifted = |delta: f32| {
                let mut v = a_values.clone();
                v[i] += delta;
                loss_with(
                    Tensor::from_vec(v, a.dims(), &Device::Cpu).unwrap(),
                    layer,
                    module,
                )
            };
            let fd = (shifted(eps) - shifted(-eps)) / (2.0 * f64::from(eps));
            let g = f64::from(da[i]);
            eprintln!("layer {layer} {module} dA[{i}]: explicit {g:e}, finite difference {fd:e}");
            assert!(
                (fd - g).abs() <= 2e-2 * g.abs() + 1e-4,
                "dA[{i}] {g} vs {fd}"
            );
        }
    }
}

/// Fixture model `name` in f32 with its weights (the oracle rebuilds the layers from them).
fn load(name: &str) -> (LlamaModel, LlamaWeights) {
    let (config, weights) = load_weights(name, DType::F32, false);
    (LlamaModel::new(config, weights.clone()).unwrap(), weights)
}
