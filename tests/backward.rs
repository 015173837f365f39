//! The explicit LoRA backward (`qlora::model::backward`) against candle's autograd on the CPU, the
//! independent oracle: the same layer / stack built from candle ops with `Var`s for x, A and B, on
//! the tiny fixtures (tests/fixtures/llama/{base, llama3_tied_f32, bnb_nf4}) in f32 and in bf16
//! compute (NF4 linears, f32 and bf16 adapters; the oracle rounds where the forward rounds) and
//! the padded batch of tests/fixtures/llama/forward.safetensors (left-, right-padded, full rows).

mod common;

use std::collections::{BTreeMap, HashMap};

use common::llama::{fixture_dir, load_weights, max_abs_diff, seeded};

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var, D};
use half::bf16;
use qlora::model::backward::{
    decoder_layer_backward, lora_gradients, lora_gradients_from_dlogits, lora_gradients_in,
    LoraGrads,
};
use qlora::model::llama::LlamaModel;
use qlora::model::{Linear, LlamaConfig, LlamaWeights};
use qlora::peft::{LoraAdapter, LoraConfig, LoraMode, LoraPair, TargetModule};
use qlora::tolerance::{lookup, Dtype, Mismatch, Op};
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

/// r = 4, alpha = 8 on `targets` in `dtype`, PEFT-initialised A and a seeded non-zero B.
fn adapter_in(
    model: &LlamaModel,
    targets: &[TargetModule],
    rslora: bool,
    dtype: DType,
) -> LoraAdapter {
    let config = LoraConfig {
        r: 4,
        alpha: 8.0,
        target_modules: targets.to_vec(),
        use_rslora: rslora,
        ..LoraConfig::default()
    };
    let mut adapter = LoraAdapter::init(config, model.config(), dtype, &Device::Cpu, 7).unwrap();
    let pairs: Vec<_> = adapter.pairs().map(|(k, p)| (k, p.clone())).collect();
    for ((layer, module), pair) in pairs {
        let seed = (layer * 16 + module as usize) as u64;
        let b = seeded(seed, pair.b.dims(), 0.2).to_dtype(dtype).unwrap();
        adapter
            .set_pair(layer, module, LoraPair { a: pair.a, b })
            .unwrap();
    }
    adapter
}

/// [`adapter_in`] f32.
fn adapter(model: &LlamaModel, targets: &[TargetModule], rslora: bool) -> LoraAdapter {
    adapter_in(model, targets, rslora, DType::F32)
}

/// `x` rounded to `dtype` in the forward and passed through unchanged in the backward
/// (straight-through): `x + (round(x) − x)` with the difference detached, exactly `round(x)` in
/// value. This is the rule the explicit backward applies at every rounding of the bf16 forward.
fn round_straight_through(x: &Tensor, dtype: DType) -> Tensor {
    if dtype == DType::F32 {
        return x.clone();
    }
    let rounded = x.to_dtype(dtype).unwrap().to_dtype(DType::F32).unwrap();
    (x + (rounded - x).unwrap().detach()).unwrap()
}

/// A frozen linear's weight `[out, in]` in f32 as the model multiplies by it: dense as stored, NF4
/// dequantized, rounded to its stored dtype, then to the compute dtype.
fn frozen_f32(linear: &Linear, compute: DType) -> Tensor {
    let w = match linear {
        Linear::Dense(w) => w.to_dtype(DType::F32).unwrap(),
        Linear::Nf4(t) => {
            let stored = match t.dtype.as_str() {
                "bfloat16" => DType::BF16,
                "float16" => DType::F16,
                _ => DType::F32,
            };
            Tensor::from_vec(t.dequantize().unwrap(), t.shape.as_slice(), &Device::Cpu)
                .unwrap()
                .to_dtype(stored)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
        }
    };
    w.to_dtype(compute).unwrap().to_dtype(DType::F32).unwrap()
}

/// The layer and stack as plain candle ops on `Var`s, differentiated by candle's autograd. In bf16
/// compute it rounds where `LlamaModel`'s forward rounds (and the adapter where PEFT rounds), each
/// rounding straight-through, so it is the same bf16 forward with exact f32 derivatives.
struct Oracle<'a> {
    config: &'a LlamaConfig,
    weights: &'a LlamaWeights,
    /// The compute dtype (F32 or BF16) and the adapter's dtype.
    dtype: DType,
    adapter_dtype: DType,
    /// Every linear's frozen weight `[out, in]` in f32, by (layer, module).
    linears: BTreeMap<(usize, TargetModule), Tensor>,
    scaling: f64,
    /// A and B as f32 `Var`s holding the adapter's values.
    lora: BTreeMap<(usize, TargetModule), (Var, Var)>,
    mask: Tensor,
    cos: Tensor,
    sin: Tensor,
    /// LoRA dropout factors per (layer, module), `[B · T, in]`; empty without dropout.
    dropout: BTreeMap<(usize, TargetModule), Tensor>,
}

impl<'a> Oracle<'a> {
    /// The oracle with the adapter's inputs dropped out as `adapter` does in `mode` for a batch
    /// of `rows` tokens: the masks come from [`LoraAdapter::dropout_mask`], so both sides draw
    /// the same ones.
    fn with_dropout(mut self, adapter: &LoraAdapter, mode: &LoraMode, rows: usize) -> Self {
        for ((layer, module), pair) in adapter.pairs() {
            let dims = [rows, pair.a.dim(1).unwrap()];
            if let Some(m) = adapter.dropout_mask(layer, module, &dims, mode).unwrap() {
                self.dropout.insert((layer, module), m);
            }
        }
        self
    }

    fn new(
        config: &'a LlamaConfig,
        weights: &'a LlamaWeights,
        dtype: DType,
        adapter: &LoraAdapter,
        attention_mask: &Tensor,
    ) -> Self {
        let lora = adapter
            .pairs()
            .map(|(k, p)| {
                let a = Var::from_tensor(&p.a.to_dtype(DType::F32).unwrap()).unwrap();
                let b = Var::from_tensor(&p.b.to_dtype(DType::F32).unwrap()).unwrap();
                (k, (a, b))
            })
            .collect();
        let mut linears = BTreeMap::new();
        for (layer, l) in weights.layers.iter().enumerate() {
            for module in TargetModule::ALL {
                let w = match module {
                    TargetModule::QProj => &l.q_proj,
                    TargetModule::KProj => &l.k_proj,
                    TargetModule::VProj => &l.v_proj,
                    TargetModule::OProj => &l.o_proj,
                    TargetModule::GateProj => &l.gate_proj,
                    TargetModule::UpProj => &l.up_proj,
                    TargetModule::DownProj => &l.down_proj,
                };
                linears.insert((layer, module), frozen_f32(w, dtype));
            }
        }
        // transformers' eager mask: the compute dtype's most negative finite value.
        let hidden = match dtype {
            DType::BF16 => bf16::MIN.to_f32(),
            _ => f32::MIN,
        };
        let (b, t) = attention_mask.dims2().unwrap();
        let keep = attention_mask.to_vec2::<i64>().unwrap();
        let mut mask = vec![0f32; b * t * t];
        for (row, keep) in keep.iter().enumerate() {
            for i in 0..t {
                for j in 0..t {
                    if j > i || keep[j] == 0 {
                        mask[(row * t + i) * t + j] = hidden;
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
        // transformers returns the RoPE tables in the compute dtype.
        let table = |t: Tensor| t.to_dtype(dtype).unwrap().to_dtype(DType::F32).unwrap();
        Self {
            config,
            weights,
            dtype,
            adapter_dtype: adapter.dtype(),
            linears,
            scaling: adapter.config().scaling(),
            lora,
            mask: Tensor::from_vec(mask, (b, 1, t, t), &Device::Cpu).unwrap(),
            cos: table(angles.cos().unwrap()),
            sin: table(angles.sin().unwrap()),
            dropout: BTreeMap::new(),
        }
    }

    /// Rounded to the compute dtype, straight-through.
    fn round(&self, x: &Tensor) -> Tensor {
        round_straight_through(x, self.dtype)
    }

    /// Rounded to the adapter dtype, straight-through.
    fn round_adapter(&self, x: &Tensor) -> Tensor {
        round_straight_through(x, self.adapter_dtype)
    }

    /// `x·Wᵀ` rounded, plus PEFT's `scaling · (x·Aᵀ)·Bᵀ` with x, each product and the scaled
    /// delta in the adapter dtype, the sum rounded to the compute dtype.
    fn linear(&self, layer: usize, module: TargetModule, x: &Tensor) -> Tensor {
        let w = &self.linears[&(layer, module)];
        let (b, t, i) = x.dims3().unwrap();
        let x2 = x.reshape((b * t, i)).unwrap();
        let mut y = self.round(&x2.matmul(&w.t().unwrap()).unwrap());
        if let Some((a, bm)) = self.lora.get(&(layer, module)) {
            let xa = self.round_adapter(&x2);
            // PEFT drops out the adapter-dtype input: round(x · mask).
            let xa = match self.dropout.get(&(layer, module)) {
                Some(m) => self.round_adapter(&(xa * m).unwrap()),
                None => xa,
            };
            let ax = self.round_adapter(&xa.matmul(&a.as_tensor().t().unwrap()).unwrap());
            let bax = self.round_adapter(&ax.matmul(&bm.as_tensor().t().unwrap()).unwrap());
            let delta = self.round_adapter(&(bax * self.scaling).unwrap());
            y = self.round(&(y + delta).unwrap());
        }
        y.reshape((b, t, ())).unwrap()
    }

    /// RMSNorm: statistics in f32, `round(w · round(x · rstd))`.
    fn rms_norm(&self, x: &Tensor, w: &Tensor) -> Tensor {
        let rstd = (x.sqr().unwrap().mean_keepdim(D::Minus1).unwrap() + self.config.rms_norm_eps)
            .unwrap()
            .sqrt()
            .unwrap()
            .recip()
            .unwrap();
        let normed = self.round(&x.broadcast_mul(&rstd).unwrap());
        self.round(
            &normed
                .broadcast_mul(&w.to_dtype(DType::F32).unwrap())
                .unwrap(),
        )
    }

    fn rope(&self, x: &Tensor) -> Tensor {
        let half = self.config.head_dim / 2;
        let x1 = x.narrow(D::Minus1, 0, half).unwrap();
        let x2 = x.narrow(D::Minus1, half, half).unwrap();
        let rotated = Tensor::cat(&[&x2.neg().unwrap(), &x1], D::Minus1).unwrap();
        let a = self.round(&x.broadcast_mul(&self.cos).unwrap());
        let b = self.round(&rotated.broadcast_mul(&self.sin).unwrap());
        self.round(&(a + b).unwrap())
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
        // transformers' `head_dim ** -0.5` is a Python float that torch applies in f32.
        let scale = f64::from((c.head_dim as f64).powf(-0.5) as f32);
        let scores = self.round(&q.matmul(&k.t().unwrap()).unwrap());
        let scores = self.round(&(scores * scale).unwrap());
        let scores = self.round(&scores.broadcast_add(&self.mask).unwrap());
        let max = scores.max_keepdim(D::Minus1).unwrap().detach();
        let exp = scores.broadcast_sub(&max).unwrap().exp().unwrap();
        let probs = self.round(
            &exp.broadcast_div(&exp.sum_keepdim(D::Minus1).unwrap())
                .unwrap(),
        );
        let out = self
            .round(&probs.matmul(&v).unwrap())
            .transpose(1, 2)
            .unwrap()
            .reshape((b, t, ()))
            .unwrap();
        let h = self.round(&(x + self.linear(layer, TargetModule::OProj, &out)).unwrap());
        let n = self.rms_norm(&h, &l.post_attention_layernorm);
        let gate = self.linear(layer, TargetModule::GateProj, &n);
        let up = self.linear(layer, TargetModule::UpProj, &n);
        let act = self.round(&(self.round(&gate.silu().unwrap()) * up).unwrap());
        self.round(&(&h + self.linear(layer, TargetModule::DownProj, &act)).unwrap())
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
            .to_dtype(DType::F32)
            .unwrap()
            .reshape((b, t, ()))
            .unwrap();
        for layer in 0..self.config.num_hidden_layers {
            x = self.layer(layer, &x);
        }
        let x = self.rms_norm(&x, &w.norm).reshape((b * t, ())).unwrap();
        let lm_head = w.lm_head().to_dtype(DType::F32).unwrap();
        let logits = self.round(&x.matmul(&lm_head.t().unwrap()).unwrap());
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

use qlora::testing::values;

/// How a case's gradients are compared: f32 element by element within `Op::LoraGrad` F32; bf16
/// compute within `Op::LoraGradScaled` BF16 after dividing each tensor by its largest |want|, as
/// bf16 errors scale with the terms that make up a tensor rather than with each element.
fn check_values(dtype: Dtype, got: &[f32], want: &[f32]) -> Result<(), Mismatch> {
    if dtype == Dtype::F32 {
        return lookup(Op::LoraGrad, Dtype::F32).check(got, want);
    }
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    assert!(scale > 0.0, "the oracle's gradient is zero");
    let scaled = |v: &[f32]| v.iter().map(|x| x / scale).collect::<Vec<_>>();
    lookup(Op::LoraGradScaled, dtype).check(&scaled(got), &scaled(want))
}

/// Every (layer, module) of `want` is in `got` (and nothing else), each within [`check_values`]
/// for `dtype`; returns the worst absolute difference.
fn check_lora_grads_within(what: &str, got: &LoraGrads, want: &LoraGrads, dtype: Dtype) -> f32 {
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
            assert_eq!(gt.dtype(), DType::F32, "{what} {key:?} {name}");
            let (gv, wv) = (values(gt), values(wt));
            worst = worst.max(max_abs_diff(&gv, &wv));
            if let Err(m) = check_values(dtype, &gv, &wv) {
                panic!("{what} {key:?} {name}: {m}");
            }
        }
    }
    worst
}

/// [`check_lora_grads_within`] `Op::LoraGrad` F32.
fn check_lora_grads(what: &str, got: &LoraGrads, want: &LoraGrads) -> f32 {
    check_lora_grads_within(what, got, want, Dtype::F32)
}

/// The largest magnitude among every dA and dB.
fn largest_grad(grads: &LoraGrads) -> f32 {
    grads
        .values()
        .flat_map(|p| values(&p.a).into_iter().chain(values(&p.b)))
        .fold(0f32, |m, v| m.max(v.abs()))
}

/// A model and adapter to differentiate: fixture `model` with its dense weights in `dtype` (the
/// compute dtype; bnb_nf4's linears stay NF4, `quantize` makes any model's NF4 on load), the
/// adapter in `adapter_dtype`.
#[derive(Clone, Copy)]
struct Case {
    model: &'static str,
    dtype: DType,
    quantize: bool,
    adapter_dtype: DType,
    rslora: bool,
}

impl Case {
    fn f32(model: &'static str, rslora: bool) -> Self {
        Case {
            model,
            dtype: DType::F32,
            quantize: false,
            adapter_dtype: DType::F32,
            rslora,
        }
    }

    /// The tolerance row: any bf16 in the forward makes it a bf16 comparison.
    fn tol_dtype(&self) -> Dtype {
        if self.dtype == DType::F32 && self.adapter_dtype == DType::F32 {
            Dtype::F32
        } else {
            Dtype::BF16
        }
    }

    fn load(&self) -> (LlamaModel, LlamaWeights) {
        let (config, weights) = load_weights(self.model, self.dtype, self.quantize);
        (LlamaModel::new(config, weights.clone()).unwrap(), weights)
    }
}

impl std::fmt::Display for Case {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {:?}{} adapter {:?}{}",
            self.model,
            self.dtype,
            if self.quantize { " nf4" } else { "" },
            self.adapter_dtype,
            if self.rslora { " rslora" } else { "" }
        )
    }
}

fn check_layer(case: Case) {
    let (model, weights) = case.load();
    let adapter = adapter_in(&model, &TargetModule::ALL, case.rslora, case.adapter_dtype);
    let batch = padded_batch();
    let c = model.config();
    let (b, t) = batch.input_ids.dims2().unwrap();
    let oracle = Oracle::new(c, &weights, case.dtype, &adapter, &batch.attention_mask);
    for layer in 0..c.num_hidden_layers {
        // The layer input holds compute-dtype values, as the stack's forward keeps them.
        let x = seeded(100 + layer as u64, &[b, t, c.hidden_size], 1.0)
            .to_dtype(case.dtype)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
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
        let worst = check_lora_grads_within(
            &format!("{case} layer {layer}"),
            &got.lora,
            &want,
            case.tol_dtype(),
        );
        let (gx, wx) = (values(&got.dx), values(want_dx));
        eprintln!(
            "{case} layer {layer}: max |dx diff| {:e} (|dx| ≤ {:e}), max |dA, dB diff| {worst:e} \
             (|dA, dB| ≤ {:e})",
            max_abs_diff(&gx, &wx),
            wx.iter().fold(0f32, |m, v| m.max(v.abs())),
            largest_grad(&want)
        );
        if let Err(m) = check_values(case.tol_dtype(), &gx, &wx) {
            panic!("{case} layer {layer} dx: {m}");
        }
    }
}

#[test]
fn layer_backward_matches_candle_autograd() {
    check_layer(Case::f32("base", false));
}

#[test]
fn layer_backward_matches_candle_autograd_rslora_tied_llama3() {
    check_layer(Case::f32("llama3_tied_f32", true));
}

fn check_stack(case: Case) {
    check_stack_in(case, 0.0, LoraMode::Eval);
}

/// The stack's gradients against the oracle with LoRA dropout `p` and the adapter in `mode`;
/// returns the loss.
fn check_stack_in(case: Case, p: f64, mode: LoraMode) -> f32 {
    let (model, weights) = case.load();
    let adapter = adapter_in(&model, &TargetModule::ALL, case.rslora, case.adapter_dtype);
    let adapter = with_dropout(&adapter, &model, p);
    let batch = padded_batch();
    let (b, t) = batch.input_ids.dims2().unwrap();
    let got = lora_gradients_in(
        &model,
        &adapter,
        &batch.input_ids,
        Some(&batch.attention_mask),
        &batch.labels,
        &mode,
    )
    .unwrap();

    let oracle = Oracle::new(
        model.config(),
        &weights,
        case.dtype,
        &adapter,
        &batch.attention_mask,
    )
    .with_dropout(&adapter, &mode, b * t);
    let loss = oracle.loss(&batch);
    let want = oracle.lora_grads(&loss.backward().unwrap());
    let worst =
        check_lora_grads_within(&format!("{case} stack"), &got.lora, &want, case.tol_dtype());
    let want_loss = loss.to_scalar::<f32>().unwrap();
    eprintln!(
        "{case} stack (dropout {p}): loss {} vs candle {want_loss}, max |dA, dB diff| {worst:e} \
         (|dA, dB| ≤ {:e})",
        got.loss,
        largest_grad(&want)
    );
    let tol = lookup(Op::LlamaLogits, case.tol_dtype());
    tol.check(&[got.loss], &[want_loss]).unwrap();

    let logits = model
        .forward_with_adapter(
            &batch.input_ids,
            Some(&batch.attention_mask),
            &adapter,
            &mode,
        )
        .unwrap();
    let (forward_loss, count) = LlamaModel::loss(&logits, &batch.labels).unwrap();
    assert_eq!(got.label_tokens, count);
    assert_eq!(
        got.loss,
        forward_loss.to_scalar::<f32>().unwrap(),
        "the checkpointed forward is LlamaModel's forward"
    );
    got.loss
}

#[test]
fn stack_gradients_match_candle_autograd() {
    check_stack(Case::f32("base", false));
}

#[test]
fn stack_gradients_match_candle_autograd_rslora_tied_llama3() {
    check_stack(Case::f32("llama3_tied_f32", true));
}

/// The bf16 forward with an f32 adapter (PEFT's default: it upcasts a bf16 model's adapter),
/// a bf16 adapter, and NF4 linears (bitsandbytes' stored checkpoint, dequantized to bf16).
const BF16_CASES: [Case; 4] = [
    Case {
        model: "base",
        dtype: DType::BF16,
        quantize: false,
        adapter_dtype: DType::F32,
        rslora: false,
    },
    Case {
        model: "base",
        dtype: DType::BF16,
        quantize: false,
        adapter_dtype: DType::BF16,
        rslora: true,
    },
    Case {
        model: "bnb_nf4",
        dtype: DType::BF16,
        quantize: false,
        adapter_dtype: DType::F32,
        rslora: false,
    },
    Case {
        model: "bnb_nf4",
        dtype: DType::BF16,
        quantize: false,
        adapter_dtype: DType::BF16,
        rslora: false,
    },
];

#[test]
fn bf16_layer_backward_matches_candle_autograd() {
    for case in BF16_CASES {
        check_layer(case);
    }
}

#[test]
fn bf16_stack_gradients_match_candle_autograd() {
    for case in BF16_CASES {
        check_stack(case);
    }
}

/// NF4 linears quantized on load with f32 compute: the dequantized weights are the only change.
#[test]
fn nf4_f32_gradients_match_candle_autograd() {
    let case = Case {
        quantize: true,
        ..Case::f32("llama3_tied_f32", false)
    };
    check_layer(case);
    check_stack(case);
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
fn load(name: &'static str) -> (LlamaModel, LlamaWeights) {
    Case::f32(name, false).load()
}

/// `adapter` with LoRA dropout `p` (same A and B).
fn with_dropout(adapter: &LoraAdapter, model: &LlamaModel, p: f64) -> LoraAdapter {
    let config = LoraConfig {
        dropout: p,
        ..adapter.config().clone()
    };
    let mut out =
        LoraAdapter::init(config, model.config(), adapter.dtype(), &Device::Cpu, 0).unwrap();
    for ((layer, module), pair) in adapter.pairs() {
        out.set_pair(layer, module, pair.clone()).unwrap();
    }
    out
}

#[test]
fn dropout_gradients_match_candle_autograd_through_the_same_masks() {
    // Both sides draw the masks from `LoraAdapter::dropout_mask`; the oracle applies them where
    // PEFT does and candle's autograd differentiates through them.
    let train = LoraMode::Train { seed: 9 };
    let dropped = check_stack_in(Case::f32("base", false), 0.3, train);
    // The masks matter, and without them (Eval, or p = 0) the loss is the plain one.
    let eval = check_stack_in(Case::f32("base", false), 0.3, LoraMode::Eval);
    let plain = check_stack_in(Case::f32("base", false), 0.0, train);
    assert_ne!(dropped, eval);
    assert_eq!(eval, plain);
}
