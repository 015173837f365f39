//! The explicit backward of the Llama decoder stack for LoRA training (docs/ARCHITECTURE.md,
//! "Training without an autograd tape"): a layer's forward is recomputed from its saved input `[B, T, hidden]`, keeping
//! the intermediates, and hand-written gradients give dL/dx `[B, T, hidden]` and, for every adapted
//! linear, dA `[r, in]` and dB `[out, r]` in f32. Frozen weights get no gradients; no autograd runs.

use std::collections::BTreeMap;

use candle_core::{DType, Tensor, D};

use crate::kernels::nf4_gemm::GemmOp;
use crate::model::adapter::{LoraAdapter, LoraMode, LoraPair, TargetModule};
use crate::model::fused::{FusedInputs, Qkv};
use crate::model::fused_lora::{self, FusedLora, SavedProjections};
use crate::model::fused_loss;
use crate::model::llama::{repeat_kv, LlamaModel};
use crate::model::matmul::{matmul, Weight};
use crate::model::weights::LayerWeights;
use crate::{Error, Result};

/// LoRA gradients by (layer, module): `a` holds dL/dA `[r, in]`, `b` holds dL/dB `[out, r]`, f32.
pub type LoraGrads = BTreeMap<(usize, TargetModule), LoraPair>;

/// One decoder layer's backward: the input gradient and the gradients of its adapter pairs.
#[derive(Clone, Debug)]
pub struct LayerGradients {
    /// dL/dx `[B, T, hidden]`, f32.
    pub dx: Tensor,
    pub lora: LoraGrads,
}

/// What the checkpointed forward kept alive for the backward: one input per decoder layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CheckpointStats {
    pub saved_tensors: usize,
    pub saved_bytes: usize,
}

/// The whole stack's backward for a causal-LM batch.
#[derive(Clone, Debug)]
pub struct StackGradients {
    /// The mean causal-LM loss over the label tokens, as [`LlamaModel::loss`].
    pub loss: f32,
    /// How many label tokens the loss averages over.
    pub label_tokens: usize,
    pub lora: LoraGrads,
    pub checkpoints: CheckpointStats,
}

fn invalid(reason: impl Into<String>) -> Error {
    Error::invalid("backward", reason)
}

/// The loss and every LoRA gradient of `adapter` for a causal-LM batch: `input_ids` `[B, T]` (u32),
/// `attention_mask` `[B, T]` (0/1, as [`LlamaModel::forward`]), `labels` `[B, T]` (i64, shifted
/// inside, [`crate::model::llama::IGNORE_INDEX`] skipped). The adapter runs as in
/// [`LoraMode::Eval`] (no dropout); lm_head, the norms and the base linears are frozen.
pub fn lora_gradients(
    model: &LlamaModel,
    adapter: &LoraAdapter,
    input_ids: &Tensor,
    attention_mask: Option<&Tensor>,
    labels: &Tensor,
) -> Result<StackGradients> {
    lora_gradients_in(
        model,
        adapter,
        input_ids,
        attention_mask,
        labels,
        &LoraMode::Eval,
    )
}

/// [`lora_gradients`] with the adapter in `mode`: in [`LoraMode::Train`] with a LoRA dropout,
/// each adapted linear's input is dropped out by the mask [`LoraAdapter::dropout_mask`] draws
/// (the same in the forward, its recomputation and the backward, which pulls dA and the input
/// gradient back through it), as PEFT trains.
pub fn lora_gradients_in(
    model: &LlamaModel,
    adapter: &LoraAdapter,
    input_ids: &Tensor,
    attention_mask: Option<&Tensor>,
    labels: &Tensor,
    mode: &LoraMode,
) -> Result<StackGradients> {
    let chunk = fused_loss::chunk_rows(model.config().vocab_size);
    lora_gradients_chunked(
        model,
        adapter,
        input_ids,
        attention_mask,
        labels,
        chunk,
        mode,
    )
}

/// [`lora_gradients`] with the fused path's loss taken `chunk` rows of logits at a time (tests
/// use tiny chunks; [`fused_loss::chunk_rows`] otherwise). Where the layers run through the fused
/// kernels, the loss and dL/d(final norm output) come from the chunked cross-entropy kernels and
/// the `[B · T, V]` logits never exist whole; else from the full f32 logits.
pub(crate) fn lora_gradients_chunked(
    model: &LlamaModel,
    adapter: &LoraAdapter,
    input_ids: &Tensor,
    attention_mask: Option<&Tensor>,
    labels: &Tensor,
    chunk: usize,
    mode: &LoraMode,
) -> Result<StackGradients> {
    model.check_adapter(adapter)?;
    let forward = checkpointed_forward(model, adapter, input_ids, attention_mask, *mode)?;
    let (b, t) = input_ids.dims2()?;
    let checkpoints = forward.stats();
    if forward.rope.fused() {
        let w = model.weights();
        let (k, dt, eps) = (model.kernels(), model.dtype(), model.config().rms_norm_eps);
        let (normed, rstd) = k.rms_norm(dt, &forward.hidden, &w.norm, eps)?;
        let out = fused_loss::causal_lm_loss(model, &normed, labels, chunk)?;
        // The final norm's output is not read again: freed before the layers are pulled back.
        drop(normed);
        let lora = backward_from_dnormed(model, adapter, forward, &out.dnormed, Some(&rstd))?;
        return Ok(StackGradients {
            loss: out.loss,
            label_tokens: out.label_tokens,
            lora,
            checkpoints,
        });
    }
    let logits = final_logits(model, &forward.hidden)?;
    let (loss, count) = LlamaModel::loss(&logits.reshape((b, t, ()))?, labels)?;
    if count == 0 {
        return Err(invalid("the labels hold no token to predict"));
    }
    let dlogits = causal_lm_loss_grad(&logits, labels, count)?;
    let lora = backward_from_logits(model, adapter, forward, &dlogits)?;
    Ok(StackGradients {
        loss: loss.to_scalar::<f32>()?,
        label_tokens: count,
        lora,
        checkpoints,
    })
}

/// Every LoRA gradient of `adapter` given dL/dlogits `[B, T, V]` (f32) for the batch
/// `input_ids` / `attention_mask`, with the checkpoint stats of the forward.
pub fn lora_gradients_from_dlogits(
    model: &LlamaModel,
    adapter: &LoraAdapter,
    input_ids: &Tensor,
    attention_mask: Option<&Tensor>,
    dlogits: &Tensor,
) -> Result<(LoraGrads, CheckpointStats)> {
    model.check_adapter(adapter)?;
    let forward = checkpointed_forward(model, adapter, input_ids, attention_mask, LoraMode::Eval)?;
    let (b, t) = input_ids.dims2()?;
    let v = model.config().vocab_size;
    if dlogits.dims() != [b, t, v] || dlogits.dtype() != DType::F32 {
        return Err(invalid(format!(
            "dlogits are {:?} {:?}, expected [{b}, {t}, {v}] F32",
            dlogits.dims(),
            dlogits.dtype()
        )));
    }
    let checkpoints = forward.stats();
    let grads = backward_from_logits(model, adapter, forward, &dlogits.reshape((b * t, v))?)?;
    Ok((grads, checkpoints))
}

/// One decoder layer's backward: recomputes layer `layer`'s forward from its input `x`
/// `[B, T, hidden]` (f32 holding compute-dtype values; the layer runs in the batch's storage
/// dtype, [`LlamaModel::act_dtype`]) under `attention_mask` `[B, T]` (positions
/// `0..T`), then pulls `dy` = dL/d(layer output) back to dL/dx and the LoRA gradients of `adapter`
/// (if any) in that layer.
pub fn decoder_layer_backward(
    model: &LlamaModel,
    adapter: Option<&LoraAdapter>,
    layer: usize,
    x: &Tensor,
    attention_mask: Option<&Tensor>,
    dy: &Tensor,
) -> Result<LayerGradients> {
    let c = model.config();
    if layer >= c.num_hidden_layers {
        return Err(invalid(format!(
            "layer {layer} of a {}-layer model",
            c.num_hidden_layers
        )));
    }
    if let Some(adapter) = adapter {
        model.check_adapter(adapter)?;
    }
    let (b, t, h) = x.dims3()?;
    if h != c.hidden_size || x.dtype() != DType::F32 {
        return Err(invalid(format!(
            "x is {:?} {:?}, expected [B, T, {}] F32",
            x.dims(),
            x.dtype(),
            c.hidden_size
        )));
    }
    if dy.dims() != x.dims() || dy.dtype() != DType::F32 {
        return Err(invalid(format!(
            "dy is {:?} {:?}, x {:?} F32",
            dy.dims(),
            dy.dtype(),
            x.dims()
        )));
    }
    let rope = AttentionInputs::new(model, attention_mask, b, t)?;
    let act = rope.act_dtype(model);
    let pass = LayerPass::new(model, adapter, layer, act)?;
    let mut lora = LoraGrads::new();
    let dx = pass.backward(&x.to_dtype(act)?, &rope, &dy.to_dtype(act)?, &mut lora)?;
    Ok(LayerGradients {
        dx: dx.to_dtype(DType::F32)?,
        lora,
    })
}

/// What a batch's attention needs: the fused kernels' inputs when they run
/// ([`LlamaModel::fused_attention_shape`]: key flags and half tables with positions), else the
/// additive mask `[B, 1, T, T]` and RoPE tables `[1, 1, T, head_dim]` of the tensor ops. Only one
/// of the two is ever built.
enum AttentionInputs {
    Tables {
        mask: Tensor,
        cos: Tensor,
        sin: Tensor,
    },
    /// Boxed: with `cuda` it holds the device copies of the tables, far larger than three
    /// tensor handles.
    Kernels(Box<FusedInputs>),
}

impl AttentionInputs {
    fn new(
        model: &LlamaModel,
        attention_mask: Option<&Tensor>,
        b: usize,
        t: usize,
    ) -> Result<Self> {
        let keep = match attention_mask {
            Some(mask) => model.check_mask(mask, b, t)?,
            None => vec![true; b * t],
        };
        if let Some(fused) = FusedInputs::new(model, &keep, b, t) {
            return Ok(Self::Kernels(Box::new(fused)));
        }
        let mask = model.additive_mask(&keep, b, 0, t)?;
        let positions: Vec<usize> = (0..t).collect();
        let (cos, sin) = model.rope_tables(1, &positions)?;
        Ok(Self::Tables { mask, cos, sin })
    }

    fn fused(&self) -> bool {
        matches!(self, Self::Kernels(_))
    }

    /// The dtype the batch's activations and their gradients are stored in.
    fn act_dtype(&self, model: &LlamaModel) -> DType {
        model.act_dtype(self.fused())
    }
}

/// The stack's forward with only each layer's input kept (gradient checkpointing).
struct CheckpointedForward {
    rope: AttentionInputs,
    /// Layer i's input `[B, T, hidden]` in the compute dtype (its values are exact there).
    inputs: Vec<Tensor>,
    /// The last layer's output `[B, T, hidden]`, before the final norm.
    hidden: Tensor,
    /// How the adapter ran (its dropout masks), for the backward's recomputation.
    mode: LoraMode,
}

impl CheckpointedForward {
    fn stats(&self) -> CheckpointStats {
        CheckpointStats {
            saved_tensors: self.inputs.len(),
            saved_bytes: self
                .inputs
                .iter()
                .map(|x| x.elem_count() * x.dtype().size_in_bytes())
                .sum(),
        }
    }
}

/// The batch's attention inputs and its embeddings `[B, T, hidden]` in the batch's storage dtype,
/// the stack's input.
fn embed(
    model: &LlamaModel,
    input_ids: &Tensor,
    attention_mask: Option<&Tensor>,
) -> Result<(AttentionInputs, Tensor)> {
    let (b, t) = model.check_ids(input_ids)?;
    let rope = AttentionInputs::new(model, attention_mask, b, t)?;
    let h = model.config().hidden_size;
    let ids = input_ids.flatten_all()?.to_device(model.device())?;
    let x = model
        .weights()
        .embed_tokens
        .index_select(&ids, 0)?
        .to_dtype(rope.act_dtype(model))?
        .reshape((b, t, h))?;
    Ok((rope, x))
}

fn checkpointed_forward(
    model: &LlamaModel,
    adapter: &LoraAdapter,
    input_ids: &Tensor,
    attention_mask: Option<&Tensor>,
    mode: LoraMode,
) -> Result<CheckpointedForward> {
    let (rope, mut x) = embed(model, input_ids, attention_mask)?;
    let mut inputs = Vec::with_capacity(model.config().num_hidden_layers);
    for layer in 0..model.config().num_hidden_layers {
        let pass = LayerPass::new(model, Some(adapter), layer, rope.act_dtype(model))?;
        let next = pass.with_mode(mode).forward(&x, &rope)?.output;
        // The input holds compute-dtype values: kept in that dtype (exactly; on the tensor-op
        // path half the bytes of its f32 carrier in bf16, widened again when pulled back).
        inputs.push(x.to_dtype(model.dtype())?);
        x = next;
    }
    Ok(CheckpointedForward {
        rope,
        inputs,
        hidden: x,
        mode,
    })
}

/// Where a batch's forward first turns non-finite: `(layer, tensor, value)` for the first NaN or
/// ±Inf among the embeddings, then each layer's intermediates in the order the layer computes them
/// (`input_layernorm`, `attention`, `residual`, `post_attention_layernorm`, `gate_proj`,
/// `up_proj`, `act`, `output`), then the final norm and the logits; None when all are finite. A
/// diagnostic for a non-finite loss: it reruns the forward the step ran, with the adapter in
/// `mode`.
pub fn first_non_finite_activation(
    model: &LlamaModel,
    adapter: &LoraAdapter,
    input_ids: &Tensor,
    attention_mask: Option<&Tensor>,
    mode: LoraMode,
) -> Result<Option<(Option<usize>, String, f32)>> {
    let first_bad = |t: &Tensor| -> Result<Option<f32>> {
        let values = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        Ok(values.into_iter().find(|v| !v.is_finite()))
    };
    let (rope, mut x) = embed(model, input_ids, attention_mask)?;
    if let Some(v) = first_bad(&x)? {
        return Ok(Some((None, "embed_tokens output".to_string(), v)));
    }
    for layer in 0..model.config().num_hidden_layers {
        let s = LayerPass::new(model, Some(adapter), layer, rope.act_dtype(model))?
            .with_mode(mode)
            .forward(&x, &rope)?;
        let named = [
            ("input_layernorm", &s.normed_attn),
            ("self_attn output", &s.attn_out),
            ("residual after attention", &s.residual),
            ("post_attention_layernorm", &s.normed_mlp),
            ("mlp.gate_proj output", &s.gate),
            ("mlp.up_proj output", &s.up),
            ("mlp activation", &s.act),
            ("output", &s.output),
        ];
        for (name, tensor) in named {
            if let Some(v) = first_bad(tensor)? {
                return Ok(Some((Some(layer), format!("layers.{layer}.{name}"), v)));
            }
        }
        x = s.output;
    }
    let logits = final_logits(model, &x)?;
    Ok(first_bad(&logits)?.map(|v| (None, "logits".to_string(), v)))
}

/// f32 logits `[B · T, V]` of the final hidden states (final norm and lm_head, as tensor ops; the
/// fused path takes its loss in chunks, [`fused_loss::causal_lm_loss`]).
fn final_logits(model: &LlamaModel, hidden: &Tensor) -> Result<Tensor> {
    let w = model.weights();
    let normed = model.rms_norm(hidden, &w.norm)?;
    let v = model.config().vocab_size;
    Ok(model.dense_linear(&normed, w.lm_head())?.reshape(((), v))?)
}

/// dL/dlogits `[B · T, V]` of the mean causal-LM loss over `count` label tokens: row `i − 1`
/// predicts label `i` (same sequence), `(softmax − onehot) / count` there and zero elsewhere.
/// Off the CPU, [`causal_lm_loss_grad_on_device`] computes it where the logits are.
fn causal_lm_loss_grad(logits: &Tensor, labels: &Tensor, count: usize) -> Result<Tensor> {
    if !logits.device().is_cpu() {
        return causal_lm_loss_grad_on_device(logits, labels, count);
    }
    let (rows, v) = logits.dims2()?;
    let t = labels.dim(1)?;
    let labels = labels.flatten_all()?.to_vec1::<i64>()?;
    let mut grad = vec![0f32; rows * v];
    let logits_rows = logits.to_vec2::<f32>()?;
    let inv_count = 1.0 / count as f32;
    for (i, &label) in labels.iter().enumerate() {
        if i % t == 0 || label < 0 {
            continue;
        }
        let row = &logits_rows[i - 1];
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let sum: f32 = row.iter().map(|&z| (z - max).exp()).sum();
        let out = &mut grad[(i - 1) * v..i * v];
        for (g, &z) in out.iter_mut().zip(row) {
            *g = (z - max).exp() / sum * inv_count;
        }
        out[label as usize] -= inv_count;
    }
    Ok(Tensor::from_vec(grad, (rows, v), logits.device())?)
}

/// [`causal_lm_loss_grad`] as tensor ops on the logits' device, so the `[B · T, V]` logits never
/// cross to the host: each row's softmax times its weight (1 / count where the row predicts a
/// label, else 0), minus 1 / count at the label. Only the `[B · T]` weights and targets are built
/// on the host. The same products as the host loop; the row sums run in the device's order.
fn causal_lm_loss_grad_on_device(logits: &Tensor, labels: &Tensor, count: usize) -> Result<Tensor> {
    let (rows, v) = logits.dims2()?;
    let t = labels.dim(1)?;
    let labels = labels.flatten_all()?.to_vec1::<i64>()?;
    let inv_count = 1.0 / count as f32;
    let mut weight = vec![0f32; rows];
    // V matches no column: rows without a label get no one-hot term.
    let mut target = vec![v as u32; rows];
    for (i, &label) in labels.iter().enumerate() {
        if i % t == 0 || label < 0 {
            continue;
        }
        weight[i - 1] = inv_count;
        target[i - 1] = label as u32;
    }
    let device = logits.device();
    let weight = Tensor::from_vec(weight, (rows, 1), device)?;
    let target = Tensor::from_vec(target, (rows, 1), device)?;
    let max = logits.max_keepdim(D::Minus1)?;
    let exp = logits.broadcast_sub(&max)?.exp()?;
    let probs = exp.broadcast_div(&exp.sum_keepdim(D::Minus1)?)?;
    let onehot = Tensor::arange(0u32, v as u32, device)?
        .unsqueeze(0)?
        .broadcast_eq(&target)?
        .to_dtype(DType::F32)?;
    Ok((probs.broadcast_mul(&weight)? - (onehot * f64::from(inv_count))?)?)
}

/// Final norm and lm_head backward, then every layer from the last, recomputing each from its
/// saved input and dropping that input once used.
fn backward_from_logits(
    model: &LlamaModel,
    adapter: &LoraAdapter,
    forward: CheckpointedForward,
    dlogits: &Tensor,
) -> Result<LoraGrads> {
    let lm_head = model.weights().lm_head().to_dtype(DType::F32)?;
    let dnormed = dlogits.matmul(&lm_head)?.reshape(forward.hidden.dims())?;
    backward_from_dnormed(model, adapter, forward, &dnormed, None)
}

/// The final norm's backward from `dnormed` `[B, T, hidden]` (with the fused RMSNorm's `rstd`
/// when the caller has it), then every layer from the last as [`backward_from_logits`].
fn backward_from_dnormed(
    model: &LlamaModel,
    adapter: &LoraAdapter,
    forward: CheckpointedForward,
    dnormed: &Tensor,
    rstd: Option<&Tensor>,
) -> Result<LoraGrads> {
    let w = model.weights();
    let mut dx = if forward.rope.fused() {
        let (k, dt, eps) = (model.kernels(), model.dtype(), model.config().rms_norm_eps);
        let rstd = match rstd {
            Some(r) => r.clone(),
            None => k.rms_norm(dt, &forward.hidden, &w.norm, eps)?.1,
        };
        k.rms_norm_backward(dt, dnormed, &forward.hidden, &w.norm, &rstd)?
    } else {
        rms_norm_backward(model, &forward.hidden, &w.norm, dnormed)?
    };
    let mut lora = LoraGrads::new();
    let CheckpointedForward {
        rope,
        mut inputs,
        mode,
        ..
    } = forward;
    let act = rope.act_dtype(model);
    for layer in (0..inputs.len()).rev() {
        let x = inputs
            .pop()
            .ok_or_else(|| invalid(format!("no saved input for layer {layer}")))?
            .to_dtype(act)?;
        let pass = LayerPass::new(model, Some(adapter), layer, act)?.with_mode(mode);
        dx = pass.backward(&x, &rope, &dx, &mut lora)?;
    }
    Ok(lora)
}

/// `x · rsqrt(mean(x²) + eps)` times the frozen `weight`, pulled back: with g = dn ⊙ w,
/// dx = rstd · g − x · rstd³ · Σ(g ⊙ x) / hidden. The bf16 roundings pass gradients unchanged.
fn rms_norm_backward(
    model: &LlamaModel,
    x: &Tensor,
    weight: &Tensor,
    dnormed: &Tensor,
) -> Result<Tensor> {
    let h = x.dim(D::Minus1)? as f64;
    let variance = x.sqr()?.mean_keepdim(D::Minus1)?;
    let rstd = (variance + model.config().rms_norm_eps)?.sqrt()?.recip()?;
    let g = dnormed.broadcast_mul(&weight.to_dtype(DType::F32)?)?;
    let dot = (&g * x)?.sum_keepdim(D::Minus1)?;
    let coef = ((rstd.powf(3.0)? * dot)? / h)?;
    Ok((g.broadcast_mul(&rstd)? - x.broadcast_mul(&coef)?)?)
}

/// The transpose of the RoPE rotation `y = x · cos + rotate_half(x) · sin`:
/// dx = dy · cos + [ (dy · sin)₂, −(dy · sin)₁ ] over the two halves of head_dim.
fn rope_backward(dy: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let half = dy.dim(D::Minus1)? / 2;
    let z = dy.broadcast_mul(sin)?;
    let z1 = z.narrow(D::Minus1, 0, half)?;
    let z2 = z.narrow(D::Minus1, half, half)?;
    let rotated = Tensor::cat(&[&z2, &z1.neg()?], D::Minus1)?;
    Ok((dy.broadcast_mul(cos)? + rotated)?)
}

/// One decoder layer's frozen weights (dequantized once, in the batch's storage dtype) and its
/// adapter, for the recomputed forward and the backward.
struct LayerPass<'a> {
    model: &'a LlamaModel,
    adapter: Option<&'a LoraAdapter>,
    layer: usize,
    weights: &'a LayerWeights,
    /// The seven linears' weights `[out, in]`, in [`TargetModule::ALL`] order; None where the
    /// products go through the NF4 dequant-GEMM ([`LlamaModel::uses_nf4_gemm`]).
    linears: Vec<Option<Tensor>>,
    /// How the adapter runs: its dropout masks in [`LoraMode::Train`].
    mode: LoraMode,
}

/// The intermediates of one layer's forward that its backward reads.
struct LayerActivations {
    output: Tensor,
    normed_attn: Tensor,
    /// Each RMSNorm's rstd when the fused kernel ran it (the tensor-op backward recomputes it).
    rstd_attn: Option<Tensor>,
    attention: AttentionState,
    attn_out: Tensor,
    residual: Tensor,
    normed_mlp: Tensor,
    rstd_mlp: Option<Tensor>,
    gate: Tensor,
    up: Tensor,
    act: Tensor,
    /// T = x·Aᵀ of each linear whose LoRA ran through the fused kernels.
    lora_t: SavedProjections,
}

/// What the attention backward reads, by path.
enum AttentionState {
    /// Tensor ops: rotated queries `[B, heads, T, d]`, keys and values repeated to `heads`, and
    /// the `[B, heads, T, T]` probabilities.
    Ops {
        q: Tensor,
        k: Tensor,
        v: Tensor,
        probs: Tensor,
    },
    /// The fused kernel: rotated queries `[B, heads, T, d]`, rotated keys and values
    /// `[B, kv_heads, T, d]`, the output `[B, heads, T, d]` and its per-row logsumexp.
    Kernels {
        q: Tensor,
        k: Tensor,
        v: Tensor,
        o: Tensor,
        lse: Tensor,
    },
}

impl<'a> LayerPass<'a> {
    fn new(
        model: &'a LlamaModel,
        adapter: Option<&'a LoraAdapter>,
        layer: usize,
        act: DType,
    ) -> Result<Self> {
        let weights = model
            .weights()
            .layers
            .get(layer)
            .ok_or_else(|| invalid(format!("no weights for layer {layer}")))?;
        // Weights multiplied through the NF4 dequant-GEMM are never materialized (None).
        let linears = TargetModule::ALL
            .into_iter()
            .map(|m| {
                if model.uses_nf4_gemm(layer, m) {
                    return Ok(None);
                }
                model
                    .frozen_weight(layer, m)?
                    .to_dtype(act)
                    .map(Some)
                    .map_err(Error::from)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            model,
            adapter,
            layer,
            weights,
            linears,
            mode: LoraMode::Eval,
        })
    }

    fn with_mode(mut self, mode: LoraMode) -> Self {
        self.mode = mode;
        self
    }

    /// Whether the adapter drops its inputs out in this pass.
    fn drops_out(&self) -> bool {
        matches!(self.mode, LoraMode::Train { .. })
            && self.adapter.is_some_and(|a| a.config().dropout > 0.0)
    }

    /// `module` on `x`, with the adapter's LoRA delta, rounded as `LlamaModel`'s forward rounds.
    /// With `fused`, the delta goes through the fused LoRA kernels (no dropout, as
    /// [`LoraMode::Eval`]), which also give T = x·Aᵀ `[M, r]` f32: the recomputed forward makes T
    /// anyway, so it is kept in `saved` for [`Self::linear_backward`] (r/in of x's size) instead of
    /// being made a third time there. Pairs the kernels do not take run as tensor ops.
    fn linear(
        &self,
        x: &Tensor,
        module: TargetModule,
        saved: &mut SavedProjections,
        fused: bool,
    ) -> Result<Tensor> {
        let y = match &self.linears[module as usize] {
            Some(w) => self.model.dense_linear(x, w)?,
            None => self.model.linear(x, self.layer, module)?,
        };
        if fused {
            if let Some(lora) = self.fused_lora(x, module)? {
                let rows = lora.dims.tokens;
                let x2 = x.reshape((rows, lora.dims.in_features))?;
                let y2 = y.reshape((rows, lora.dims.out_features))?;
                let (k, dt) = (self.model.kernels(), self.model.dtype());
                let (y2, t) = fused_lora::forward(k, dt, &lora, &x2, &y2)?;
                saved.insert(module, t);
                return Ok(y2.reshape(y.dims())?);
            }
        }
        match self.adapter {
            Some(adapter) => self.model.store(
                adapter.apply(self.layer, module, x, &y, &self.mode)?,
                x.dtype(),
            ),
            None => Ok(y),
        }
    }

    /// The frozen weight's pullback dy2 `[M, out]` · W → `[M, in]` in dy2's dtype (f32
    /// unrounded on the tensor-op path).
    fn frozen_backward(&self, dy2: &Tensor, module: TargetModule) -> Result<Tensor> {
        match &self.linears[module as usize] {
            Some(w) => matmul(dy2, w, Weight::Plain),
            // dy rounded to bf16 for the kernel's bf16 activations (tolerance::Op::LlamaCudaNf4Gemm).
            None => Ok(self
                .model
                .nf4_gemm(GemmOp::InputGrad, dy2, self.layer, module)?
                .ok_or_else(|| invalid(format!("layer {} {module}: no NF4 GEMM", self.layer)))?
                .to_dtype(dy2.dtype())?),
        }
    }

    /// The pullback of `module` on `x`: through the fused LoRA kernels from the forward's T in
    /// `saved` (dX in the compute dtype) when the forward ran them, else as tensor ops
    /// ([`Self::linear_backward_ops`]).
    fn linear_backward(
        &self,
        x: &Tensor,
        dy: &Tensor,
        module: TargetModule,
        saved: &SavedProjections,
        grads: &mut LoraGrads,
    ) -> Result<Tensor> {
        let (Some(t), Some(lora)) = (saved.get(&module), self.fused_lora(x, module)?) else {
            return self.linear_backward_ops(x, dy, module, grads);
        };
        let d = lora.dims;
        let x2 = x.reshape((d.tokens, d.in_features))?;
        let dy2 = dy.reshape((d.tokens, d.out_features))?;
        let dx = self.frozen_backward(&dy2, module)?;
        let (k, dt) = (self.model.kernels(), self.model.dtype());
        let (dx, pair) = fused_lora::backward(k, dt, &lora, &x2, t, &dy2, &dx)?;
        grads.insert((self.layer, module), pair);
        Ok(dx.reshape(x.dims())?)
    }

    /// The pullback of `module` on `x`: dx = dy·W + s·(dy·B)·A, and with u = x·Aᵀ,
    /// dB = s·dyᵀ·u and dA = s·(dy·B)ᵀ·x, stored in `grads`. With dropout mask m (inverted
    /// scaling included), x is m ⊙ x in u and dA, and the adapter's share of dx is m ⊙ (s·(dy·B)·A).
    fn linear_backward_ops(
        &self,
        x: &Tensor,
        dy: &Tensor,
        module: TargetModule,
        grads: &mut LoraGrads,
    ) -> Result<Tensor> {
        let in_features = *x.dims().last().ok_or_else(|| invalid("a 0-D input"))?;
        let out_features = *dy.dims().last().ok_or_else(|| invalid("a 0-D gradient"))?;
        let rows = x.elem_count() / in_features.max(1);
        let x2 = x.reshape((rows, in_features))?;
        let dy2 = dy.reshape((rows, out_features))?;
        let mut dx = self.frozen_backward(&dy2, module)?;
        if let Some((adapter, pair)) = self
            .adapter
            .and_then(|a| a.pair(self.layer, module).map(|p| (a, p)))
        {
            // The adapter's share in f32, added to the frozen pullback in dy's storage dtype.
            let (x2, dy2) = (x2.to_dtype(DType::F32)?, dy2.to_dtype(DType::F32)?);
            let s = adapter.config().scaling();
            let a = pair.a.to_dtype(DType::F32)?;
            let b = pair.b.to_dtype(DType::F32)?;
            let mask = adapter.dropout_mask(self.layer, module, x2.dims(), &self.mode)?;
            let xd = match &mask {
                Some(m) => (&x2 * m)?,
                None => x2.clone(),
            };
            let u = xd.matmul(&a.t()?)?;
            let du = (dy2.matmul(&b)? * s)?;
            let db = (dy2.t()?.matmul(&u)? * s)?;
            let da = du.t()?.matmul(&xd)?;
            let dx_lora = du.matmul(&a)?;
            let dx_lora = match &mask {
                Some(m) => (dx_lora * m)?,
                None => dx_lora,
            };
            dx = (dx.to_dtype(DType::F32)? + dx_lora)?.to_dtype(dy.dtype())?;
            grads.insert((self.layer, module), LoraPair { a: da, b: db });
        }
        Ok(dx.reshape(x.dims())?)
    }

    /// This layer's adapter pair on `module` as the fused LoRA kernels take it for `x`, or None
    /// (no adapter or pair there, or a rank or size beyond the kernels).
    fn fused_lora(&self, x: &Tensor, module: TargetModule) -> Result<Option<FusedLora<'a>>> {
        let Some(adapter) = self.adapter else {
            return Ok(None);
        };
        // The kernels add the unmasked s·U·A into dX; dropout runs as tensor ops.
        if self.drops_out() {
            return Ok(None);
        }
        let Some(pair) = adapter.pair(self.layer, module) else {
            return Ok(None);
        };
        let in_features = pair.a.dim(1)?;
        if x.dims().last() != Some(&in_features) {
            return Err(invalid(format!(
                "layer {} {module}: input {:?} for in_features {in_features}",
                self.layer,
                x.dims()
            )));
        }
        FusedLora::new(
            pair,
            adapter.config().scaling(),
            x.elem_count() / in_features,
        )
    }

    /// `[B, T, n · d]` → `[B, n, T, d]`.
    fn split_heads(&self, x: &Tensor, n: usize) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let d = self.model.config().head_dim;
        Ok(x.reshape((b, t, n, d))?.transpose(1, 2)?.contiguous()?)
    }

    /// `[B, n, T, d]` → `[B, T, n · d]`.
    fn merge_heads(x: &Tensor) -> Result<Tensor> {
        let (b, n, t, d) = x.dims4()?;
        Ok(x.transpose(1, 2)?.contiguous()?.reshape((b, t, n * d))?)
    }

    /// RMSNorm with `weight`: `(y, rstd)`, rstd only from the fused kernel.
    fn norm(&self, x: &Tensor, weight: &Tensor, fused: bool) -> Result<(Tensor, Option<Tensor>)> {
        let m = self.model;
        if !fused {
            return Ok((m.rms_norm(x, weight)?, None));
        }
        let (y, rstd) = m
            .kernels()
            .rms_norm(m.dtype(), x, weight, m.config().rms_norm_eps)?;
        Ok((y, Some(rstd)))
    }

    /// The RMSNorm pullback of `dy`: through the kernel from the forward's rstd, or as tensor ops.
    fn norm_backward(
        &self,
        dy: &Tensor,
        x: &Tensor,
        weight: &Tensor,
        rstd: Option<&Tensor>,
    ) -> Result<Tensor> {
        let m = self.model;
        match rstd {
            Some(rstd) => m
                .kernels()
                .rms_norm_backward(m.dtype(), dy, x, weight, rstd),
            None => rms_norm_backward(m, x, weight, dy),
        }
    }

    /// SwiGLU `silu(gate) · up`, rounded as `LlamaModel`'s forward rounds.
    fn swiglu(&self, gate: &Tensor, up: &Tensor, fused: bool) -> Result<Tensor> {
        let m = self.model;
        if fused {
            return m.kernels().swiglu(m.dtype(), gate, up);
        }
        m.round(m.round(gate.silu()?)?.mul(up)?)
    }

    /// The SwiGLU pullback: `(dgate, dup)`.
    fn swiglu_backward(
        &self,
        gate: &Tensor,
        up: &Tensor,
        dact: &Tensor,
        fused: bool,
    ) -> Result<(Tensor, Tensor)> {
        let m = self.model;
        if fused {
            return m.kernels().swiglu_backward(m.dtype(), gate, up, dact);
        }
        let sig = (gate.neg()?.exp()? + 1.0)?.recip()?;
        let silu = (gate * &sig)?;
        let dsilu = (&sig * ((gate * (1.0 - &sig)?)? + 1.0)?)?;
        let dgate = ((dact * up)? * dsilu)?;
        let dup = (dact * silu)?;
        Ok((dgate, dup))
    }

    /// Causal self-attention with RoPE on the projections q `[B, T, heads · d]`, k and v
    /// `[B, T, kv_heads · d]`: the merged output `[B, T, heads · d]` and what the backward reads.
    fn attention(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        rope: &AttentionInputs,
    ) -> Result<(Tensor, AttentionState)> {
        let m = self.model;
        let c = m.config();
        let (n_heads, n_kv) = (c.num_attention_heads, c.num_key_value_heads);
        match rope {
            AttentionInputs::Kernels(f) => {
                let (kernels, dt) = (m.kernels(), m.dtype());
                let (q, k) = kernels.rope(dt, q, k, &f.rope, false)?;
                let q = self.split_heads(&q, n_heads)?;
                let k = self.split_heads(&k, n_kv)?;
                let v = self.split_heads(v, n_kv)?;
                let qkv = Qkv {
                    shape: f.shape,
                    q: &q,
                    k: &k,
                    v: &v,
                };
                let (o, lse) = kernels.attention(dt, &qkv, &f.key_mask)?;
                let out = Self::merge_heads(&o)?;
                Ok((out, AttentionState::Kernels { q, k, v, o, lse }))
            }
            AttentionInputs::Tables { mask, cos, sin } => {
                let q = m.rope(&self.split_heads(q, n_heads)?, cos, sin)?;
                let k = repeat_kv(
                    &m.rope(&self.split_heads(k, n_kv)?, cos, sin)?,
                    n_heads / n_kv,
                )?;
                let v = repeat_kv(&self.split_heads(v, n_kv)?, n_heads / n_kv)?;
                let scores = m.round(q.matmul(&k.t()?.contiguous()?)?)?;
                let scores = m.round((scores * f64::from(attention_scaling(c.head_dim)))?)?;
                let scores = m.round(scores.broadcast_add(mask)?)?;
                let max = scores.max_keepdim(D::Minus1)?;
                let exp = scores.broadcast_sub(&max)?.exp()?;
                let probs = m.round(exp.broadcast_div(&exp.sum_keepdim(D::Minus1)?)?)?;
                let out = Self::merge_heads(&m.round(probs.matmul(&v)?)?)?;
                Ok((out, AttentionState::Ops { q, k, v, probs }))
            }
        }
    }

    /// The attention pullback of the merged output's gradient: `(dq, dk, dv)` as the projections
    /// `[B, T, heads · d]` and `[B, T, kv_heads · d]` (through the inverse RoPE; a GQA group's
    /// query heads summed into their kv head).
    fn attention_backward(
        &self,
        state: &AttentionState,
        dattn_out: &Tensor,
        rope: &AttentionInputs,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let m = self.model;
        let c = m.config();
        let (n_heads, n_kv) = (c.num_attention_heads, c.num_key_value_heads);
        let dout = self.split_heads(dattn_out, n_heads)?;
        match (state, rope) {
            (AttentionState::Kernels { q, k, v, o, lse }, AttentionInputs::Kernels(f)) => {
                let (kernels, dt) = (m.kernels(), m.dtype());
                let qkv = Qkv {
                    shape: f.shape,
                    q,
                    k,
                    v,
                };
                let (dq, dk, dv) =
                    kernels.attention_backward(dt, &qkv, &f.key_mask, o, lse, &dout)?;
                let (dq, dk) = kernels.rope(
                    dt,
                    &Self::merge_heads(&dq)?,
                    &Self::merge_heads(&dk)?,
                    &f.rope,
                    true,
                )?;
                Ok((dq, dk, Self::merge_heads(&dv)?))
            }
            (AttentionState::Ops { q, k, v, probs }, AttentionInputs::Tables { cos, sin, .. }) => {
                let dprobs = dout.matmul(&v.t()?)?;
                let dv = probs.t()?.matmul(&dout)?;
                let row_dot = (&dprobs * probs)?.sum_keepdim(D::Minus1)?;
                let dscores = (probs.mul(&dprobs.broadcast_sub(&row_dot)?)?
                    * f64::from(attention_scaling(c.head_dim)))?;
                let dq = dscores.matmul(k)?;
                let dk = dscores.t()?.matmul(q)?;
                let dq = rope_backward(&dq, cos, sin)?;
                let dk = rope_backward(&sum_repeated_kv(&dk, n_kv)?, cos, sin)?;
                let dv = sum_repeated_kv(&dv, n_kv)?;
                Ok((
                    Self::merge_heads(&dq)?,
                    Self::merge_heads(&dk)?,
                    Self::merge_heads(&dv)?,
                ))
            }
            _ => Err(invalid("the attention state is not of the batch's path")),
        }
    }

    /// The layer's forward as `LlamaModel`'s `decoder_layer` computes it (through the fused
    /// kernels when the batch has their inputs), keeping what the backward reads. One layer for
    /// every path (docs/ARCHITECTURE.md, "The decoder layer").
    fn forward(&self, x: &Tensor, rope: &AttentionInputs) -> Result<LayerActivations> {
        let m = self.model;
        let fused = rope.fused();
        let mut lora_t = SavedProjections::new();
        let (normed_attn, rstd_attn) = self.norm(x, &self.weights.input_layernorm, fused)?;
        let q = self.linear(&normed_attn, TargetModule::QProj, &mut lora_t, fused)?;
        let k = self.linear(&normed_attn, TargetModule::KProj, &mut lora_t, fused)?;
        let v = self.linear(&normed_attn, TargetModule::VProj, &mut lora_t, fused)?;
        let (attn_out, attention) = self.attention(&q, &k, &v, rope)?;
        let attn = self.linear(&attn_out, TargetModule::OProj, &mut lora_t, fused)?;
        let residual = m.round((x + attn)?)?;
        let post_norm = &self.weights.post_attention_layernorm;
        let (normed_mlp, rstd_mlp) = self.norm(&residual, post_norm, fused)?;
        let gate = self.linear(&normed_mlp, TargetModule::GateProj, &mut lora_t, fused)?;
        let up = self.linear(&normed_mlp, TargetModule::UpProj, &mut lora_t, fused)?;
        let act = self.swiglu(&gate, &up, fused)?;
        let mlp = self.linear(&act, TargetModule::DownProj, &mut lora_t, fused)?;
        let output = m.round((&residual + mlp)?)?;
        Ok(LayerActivations {
            output,
            normed_attn,
            rstd_attn,
            attention,
            attn_out,
            residual,
            normed_mlp,
            rstd_mlp,
            gate,
            up,
            act,
            lora_t,
        })
    }

    /// Recomputes the forward from `x` and pulls `dy` back to dL/dx, adding this layer's LoRA
    /// gradients to `grads`.
    fn backward(
        &self,
        x: &Tensor,
        rope: &AttentionInputs,
        dy: &Tensor,
        grads: &mut LoraGrads,
    ) -> Result<Tensor> {
        let s = self.forward(x, rope)?;
        let t = &s.lora_t;

        // MLP: output = residual + down(silu(gate) ⊙ up).
        let dact = self.linear_backward(&s.act, dy, TargetModule::DownProj, t, grads)?;
        let (dgate, dup) = self.swiglu_backward(&s.gate, &s.up, &dact, rope.fused())?;
        let dnormed =
            (self.linear_backward(&s.normed_mlp, &dgate, TargetModule::GateProj, t, grads)?
                + self.linear_backward(&s.normed_mlp, &dup, TargetModule::UpProj, t, grads)?)?;
        let post_norm = &self.weights.post_attention_layernorm;
        let dresidual =
            (dy + self.norm_backward(&dnormed, &s.residual, post_norm, s.rstd_mlp.as_ref())?)?;

        // Attention: residual = x + o(softmax(q·kᵀ·scale + mask)·v).
        let dattn_out =
            self.linear_backward(&s.attn_out, &dresidual, TargetModule::OProj, t, grads)?;
        let (dq, dk, dv) = self.attention_backward(&s.attention, &dattn_out, rope)?;
        let mut dnormed =
            self.linear_backward(&s.normed_attn, &dq, TargetModule::QProj, t, grads)?;
        for (d, module) in [(dk, TargetModule::KProj), (dv, TargetModule::VProj)] {
            let dm = self.linear_backward(&s.normed_attn, &d, module, t, grads)?;
            dnormed = (dnormed + dm)?;
        }
        let input_norm = &self.weights.input_layernorm;
        Ok((dresidual + self.norm_backward(&dnormed, x, input_norm, s.rstd_attn.as_ref())?)?)
    }
}

/// The transpose of `repeat_kv`: `[B, kv · n_rep, T, d]` → `[B, kv, T, d]`, summing the
/// gradients of the query heads that read each kv head.
fn sum_repeated_kv(x: &Tensor, n_kv: usize) -> Result<Tensor> {
    let (b, heads, t, d) = x.dims4()?;
    if heads == n_kv {
        return Ok(x.clone());
    }
    Ok(x.reshape((b, n_kv, heads / n_kv, t, d))?.sum(2)?)
}

/// transformers' `head_dim ** -0.5`, applied in f32.
fn attention_scaling(head_dim: usize) -> f32 {
    (head_dim as f64).powf(-0.5) as f32
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tolerance::{lookup, Dtype, Op};
    use candle_core::Device;

    #[test]
    fn kernel_path_stores_activations_in_the_compute_dtype() {
        // bf16 through the emulated kernels: every activation the layer keeps is a bf16 tensor
        // (f32 only for the kernels' statistics); the tensor-op reference keeps f32 carriers.
        let (model, adapter, [ids, mask, _]) = crate::model::fused_loss::tests::tiny(DType::BF16);
        for (model, act) in [
            (model.clone(), DType::BF16),
            (
                model
                    .with_kernel_path(crate::model::KernelPath::TensorOps)
                    .unwrap(),
                DType::F32,
            ),
        ] {
            let forward =
                checkpointed_forward(&model, &adapter, &ids, Some(&mask), LoraMode::Eval).unwrap();
            assert_eq!(forward.rope.act_dtype(&model), act);
            assert_eq!(forward.hidden.dtype(), act);
            assert!(forward.inputs.iter().all(|x| x.dtype() == DType::BF16));
            let pass = LayerPass::new(&model, Some(&adapter), 0, act).unwrap();
            let x = forward.inputs[0].to_dtype(act).unwrap();
            let s = pass.forward(&x, &forward.rope).unwrap();
            let kept = [
                &s.output,
                &s.normed_attn,
                &s.attn_out,
                &s.residual,
                &s.normed_mlp,
                &s.gate,
                &s.up,
                &s.act,
            ];
            assert!(kept.iter().all(|t| t.dtype() == act), "{act:?}");
            match &s.attention {
                AttentionState::Kernels { q, k, v, o, lse } => {
                    assert_eq!(act, DType::BF16);
                    assert!([q, k, v, o].iter().all(|t| t.dtype() == DType::BF16));
                    assert_eq!(lse.dtype(), DType::F32);
                    let rstd = [&s.rstd_attn, &s.rstd_mlp];
                    assert!(rstd
                        .iter()
                        .all(|r| r.as_ref().unwrap().dtype() == DType::F32));
                    assert!(s.lora_t.values().all(|t| t.dtype() == DType::F32));
                }
                AttentionState::Ops { .. } => assert_eq!(act, DType::F32),
            }
            assert!(pass
                .linears
                .iter()
                .all(|w| w.as_ref().unwrap().dtype() == act));
        }
    }

    #[test]
    fn device_loss_gradient_matches_the_host_loop() {
        // The tensor-op form the GPU runs, here on the CPU backend, against the host loop: the
        // same products, the row sums in another order.
        let (b, t, v) = (2, 5, 11);
        let values: Vec<f32> = (0..b * t * v)
            .map(|i| ((i * 37 % 23) as f32 - 11.0) / 3.0)
            .collect();
        let logits = Tensor::from_vec(values, (b * t, v), &Device::Cpu).unwrap();
        let labels = Tensor::new(
            &[[3i64, -100, 6, 0, 2], [-100, -100, 1, -100, 10]],
            &Device::Cpu,
        )
        .unwrap();
        let count = 5;
        let host = causal_lm_loss_grad(&logits, &labels, count).unwrap();
        let ops = causal_lm_loss_grad_on_device(&logits, &labels, count).unwrap();
        assert_eq!(ops.dims(), host.dims());
        let host = host.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let ops = ops.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let tol = lookup(Op::CrossEntropyBackward, Dtype::F32);
        if let Err(m) = tol.check(&ops, &host) {
            panic!("{m}");
        }
        // Rows that predict no label (the last of each sequence, those before a -100) are zero;
        // a labelled row's softmax minus its one-hot sums to about zero.
        for row in [0, 4, 5, 7, 9] {
            assert!(
                ops[row * v..(row + 1) * v].iter().all(|&g| g == 0.0),
                "row {row}"
            );
        }
        for row in [1, 2, 3, 6, 8] {
            let sum: f32 = ops[row * v..(row + 1) * v].iter().sum();
            assert!(tol.check(&[sum], &[0.0]).is_ok(), "row {row} sums to {sum}");
        }
    }
}
