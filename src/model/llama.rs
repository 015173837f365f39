//! The Llama causal LM forward pass as transformers' `LlamaForCausalLM` computes it (eager
//! attention): input ids `[B, T]` (+ a 0/1 attention mask) → logits `[B, T, V]`, and the causal-LM
//! loss with HF's shift. Every op runs in f32 and is rounded to the compute dtype (f32 or bf16)
//! exactly where torch rounds, so the bf16 path reproduces HF's bf16 roundings, not just its math.
//! On the tensor-op path (the reference) activations are f32 tensors holding compute-dtype values;
//! through the kernels they are stored in the compute dtype itself ([`LlamaModel::act_dtype`]).
//! The same code runs on the CPU or (feature `cuda`) a CUDA device, wherever the weights are.

use candle_core::{DType, Device, Tensor, D};
use half::{bf16, f16};

use crate::kernels::attention::AttentionShape;
use crate::kernels::nf4_gemm::GemmOp;
use crate::model::adapter::{LoraAdapter, LoraMode, TargetModule};
use crate::model::config::{linear_shape, LlamaConfig};
use crate::model::fused::{FusedInputs, KernelPath, Kernels, Qkv, RopeTables};
use crate::model::fused_lora::{self, FusedLora};
use crate::model::kv_cache::{KvCache, LayerKvCache};
use crate::model::matmul::{matmul, Weight};
use crate::model::weights::{LayerWeights, Linear, LlamaWeights};
use crate::{Error, Result};

/// The label value the loss skips (PyTorch's `ignore_index` default).
pub const IGNORE_INDEX: i64 = -100;

/// A Llama causal LM ready to run: its config, weights and RoPE inverse frequencies.
#[derive(Clone, Debug)]
pub struct LlamaModel {
    config: LlamaConfig,
    weights: LlamaWeights,
    /// The compute dtype: the dtype of the dense weights (F32 or BF16).
    dtype: DType,
    inv_freq: Vec<f32>,
    /// Where RMSNorm, RoPE, SwiGLU and attention run ([`KernelPath`]).
    kernels: Kernels,
    /// On a CUDA device, the NF4 linears' bytes and scales uploaded there by [`Self::new`].
    #[cfg(feature = "cuda")]
    nf4_device: Option<std::sync::Arc<crate::model::cuda::DeviceNf4Linears>>,
}

fn invalid(reason: impl Into<String>) -> Error {
    Error::invalid("LlamaModel", reason)
}

fn check_shape(what: &str, t: &Tensor, want: &[usize]) -> Result<()> {
    if t.dims() != want {
        return Err(invalid(format!(
            "{what} has shape {:?}, expected {want:?}",
            t.dims()
        )));
    }
    Ok(())
}

impl LlamaModel {
    /// Checks that `weights` fit `config` (layer count, shapes) and share one dense dtype, F32 or
    /// BF16, which becomes the compute dtype, and one device, where the model runs. On a CUDA
    /// device the NF4 linears (held in host memory by [`Linear::Nf4`]) are uploaded there once.
    pub fn new(config: LlamaConfig, weights: LlamaWeights) -> Result<Self> {
        let dtype = weights.embed_tokens.dtype();
        let device = weights.embed_tokens.device();
        if !matches!(dtype, DType::F32 | DType::BF16) {
            return Err(invalid(format!(
                "compute dtype {dtype:?} is not f32 or bf16"
            )));
        }
        if weights.layers.len() != config.num_hidden_layers {
            return Err(invalid(format!(
                "{} layers of weights for num_hidden_layers {}",
                weights.layers.len(),
                config.num_hidden_layers
            )));
        }
        let (v, h) = (config.vocab_size, config.hidden_size);
        let mut dense = vec![
            ("embed_tokens", &weights.embed_tokens, vec![v, h]),
            ("norm", &weights.norm, vec![h]),
            ("lm_head", weights.lm_head(), vec![v, h]),
        ];
        for layer in &weights.layers {
            dense.push(("input_layernorm", &layer.input_layernorm, vec![h]));
            dense.push((
                "post_attention_layernorm",
                &layer.post_attention_layernorm,
                vec![h],
            ));
            for (name, linear) in linears(layer) {
                if let Linear::Dense(w) = linear {
                    dense.push((name, w, linear_shape(&config, name).to_vec()));
                }
            }
        }
        for (name, t, shape) in dense {
            check_shape(name, t, &shape)?;
            if t.dtype() != dtype {
                return Err(invalid(format!(
                    "{name} is {:?}, the embeddings {dtype:?}",
                    t.dtype()
                )));
            }
            if !t.device().same_device(device) {
                return Err(invalid(format!(
                    "{name} is on {:?}, the embeddings on {:?}",
                    t.device().location(),
                    device.location()
                )));
            }
        }
        for layer in &weights.layers {
            for (name, linear) in linears(layer) {
                if let Linear::Nf4(t) = linear {
                    if t.shape != linear_shape(&config, name) {
                        return Err(invalid(format!(
                            "NF4 {name} has shape {:?}, expected {:?}",
                            t.shape,
                            linear_shape(&config, name)
                        )));
                    }
                    t.validate()?;
                }
            }
        }
        let inv_freq = config.rope_inv_freq();
        let kernels = Kernels::new(KernelPath::default_for(device)?, device)?;
        #[cfg(feature = "cuda")]
        let nf4_device = crate::model::cuda::DeviceNf4Linears::upload(&weights, device)?
            .map(std::sync::Arc::new);
        Ok(Self {
            config,
            weights,
            dtype,
            inv_freq,
            kernels,
            #[cfg(feature = "cuda")]
            nf4_device,
        })
    }

    /// This model with its fused ops on `path`: [`KernelPath::Emulated`] needs a CPU model,
    /// [`KernelPath::Cuda`] a CUDA one; [`KernelPath::TensorOps`] runs anywhere.
    pub fn with_kernel_path(mut self, path: KernelPath) -> Result<Self> {
        self.kernels = Kernels::new(path, self.device())?;
        Ok(self)
    }

    /// Where this model's RMSNorm, RoPE, SwiGLU and attention run.
    pub fn kernel_path(&self) -> KernelPath {
        self.kernels.path()
    }

    pub(crate) fn kernels(&self) -> &Kernels {
        &self.kernels
    }

    /// This model on `device`: every dense tensor moved there, and on a CUDA device the NF4
    /// linears uploaded there (their host copies are kept, so the model can move back).
    pub fn to_device(&self, device: &Device) -> Result<Self> {
        Self::new(self.config.clone(), self.weights.to_device(device)?)
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// The compute dtype (and the dtype of the logits).
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        self.weights.embed_tokens.device()
    }

    /// The weights, for the explicit backward (`model::backward`).
    pub(crate) fn weights(&self) -> &LlamaWeights {
        &self.weights
    }

    /// Logits `[B, T, V]` in the compute dtype for `input_ids` `[B, T]` (u32). `attention_mask`
    /// `[B, T]` (u8, u32 or i64; 1 = token, 0 = pad, left or right padding) hides pad keys; logits
    /// at pad positions are computed but meaningless. Position ids are `0..T` for every row, as
    /// transformers uses when only `attention_mask` is given.
    pub fn forward(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>) -> Result<Tensor> {
        self.forward_lora(input_ids, attention_mask, None)
    }

    /// [`Self::forward`] with `adapter`'s LoRA deltas added to the linears it targets, as PEFT's
    /// `PeftModelForCausalLM` computes them; dropout runs only in [`LoraMode::Train`].
    pub fn forward_with_adapter(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        adapter: &LoraAdapter,
        mode: &LoraMode,
    ) -> Result<Tensor> {
        self.check_adapter(adapter)?;
        self.forward_lora(input_ids, attention_mask, Some((adapter, mode)))
    }

    /// Checks that `adapter` fits this model ([`LoraAdapter::check_fits`]) and lives on its device.
    pub(crate) fn check_adapter(&self, adapter: &LoraAdapter) -> Result<()> {
        adapter.check_fits(&self.config)?;
        match adapter.device() {
            Some(d) if !d.same_device(self.device()) => Err(invalid(format!(
                "the adapter is on {:?}, the model on {:?}",
                d.location(),
                self.device().location()
            ))),
            _ => Ok(()),
        }
    }

    fn forward_lora(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        lora: Lora<'_>,
    ) -> Result<Tensor> {
        let (b, t) = self.check_ids(input_ids)?;
        let keep = match attention_mask {
            Some(mask) => self.check_mask(mask, b, t)?,
            None => vec![true; b * t],
        };
        let fused = FusedInputs::new(self, &keep, b, t);
        let mask = self.additive_mask(&keep, b, 0, t)?;
        let positions: Vec<usize> = (0..t).collect();
        let (cos, sin) = self.rope_tables(1, &positions)?;
        let rope = StepRope {
            cos: &cos,
            sin: &sin,
            fused: fused.as_ref(),
        };
        let x = self.decoder_stack(input_ids, &mask, &rope, None, lora)?;
        let x = self.layer_norm(&x, &self.weights.norm, fused.is_some())?;
        let logits = self.dense_linear(&x, self.weights.lm_head())?;
        Ok(logits.to_dtype(self.dtype)?)
    }

    /// One incremental step with a KV cache: runs `input_ids` `[B, T]` (u32) at `positions`
    /// (`B · T` RoPE positions, row-major) after the `S` tokens already in `cache`, appends this
    /// step's keys and values to it, and returns the last position's logits `[B, V]` in the compute
    /// dtype. `key_mask` holds `B · (S + T)` flags, row-major (true = a real token): query i sees key
    /// j when j ≤ S + i and the key is real, as transformers' eager mask during `generate`.
    pub fn forward_step(
        &self,
        input_ids: &Tensor,
        positions: &[usize],
        key_mask: &[bool],
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        self.forward_step_with_adapter(input_ids, positions, key_mask, cache, None)
    }

    /// [`Self::forward_step`] with `adapter`'s LoRA deltas (in [`LoraMode::Eval`]) added to the
    /// linears it targets, when one is given.
    pub fn forward_step_with_adapter(
        &self,
        input_ids: &Tensor,
        positions: &[usize],
        key_mask: &[bool],
        cache: &mut KvCache,
        adapter: Option<&LoraAdapter>,
    ) -> Result<Tensor> {
        if let Some(adapter) = adapter {
            adapter.check_fits(&self.config)?;
        }
        let lora = adapter.map(|a| (a, &LoraMode::Eval));
        let (b, t) = self.check_ids(input_ids)?;
        let past = cache.seq_len();
        if cache.num_layers() != self.config.num_hidden_layers {
            return Err(invalid(format!(
                "KV cache has {} layers for num_hidden_layers {}",
                cache.num_layers(),
                self.config.num_hidden_layers
            )));
        }
        if cache.batch_size().is_some_and(|cached| cached != b) {
            return Err(invalid(format!(
                "KV cache holds batch {:?}, input_ids batch {b}",
                cache.batch_size()
            )));
        }
        if positions.len() != b * t || key_mask.len() != b * (past + t) {
            return Err(invalid(format!(
                "{} positions and {} key mask flags for batch {b}, {t} new and {past} cached tokens",
                positions.len(),
                key_mask.len()
            )));
        }
        let mask = self.additive_mask(key_mask, b, past, t)?;
        let (cos, sin) = self.rope_tables(b, positions)?;
        let rope = StepRope {
            cos: &cos,
            sin: &sin,
            fused: None,
        };
        let x = self.decoder_stack(input_ids, &mask, &rope, Some(cache), lora)?;
        let x = self.rms_norm(&x.narrow(1, t - 1, 1)?.contiguous()?, &self.weights.norm)?;
        let logits = self.dense_linear(&x, self.weights.lm_head())?;
        Ok(logits
            .reshape((b, self.config.vocab_size))?
            .to_dtype(self.dtype)?)
    }

    /// Embeddings and every decoder layer: ids `[B, T]` → hidden states `[B, T, hidden]` in the
    /// batch's storage dtype ([`Self::act_dtype`]), appending each layer's keys and values to `cache` if given.
    fn decoder_stack(
        &self,
        input_ids: &Tensor,
        mask: &Tensor,
        rope: &StepRope<'_>,
        cache: Option<&mut KvCache>,
        lora: Lora<'_>,
    ) -> Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        let h = self.config.hidden_size;
        let ids = input_ids.flatten_all()?.to_device(self.device())?;
        let mut x = self
            .weights
            .embed_tokens
            .index_select(&ids, 0)?
            .to_dtype(self.act_dtype(rope.fused.is_some()))?
            .reshape((b, t, h))?;
        let mut slots = cache.map(|c| c.layers_mut().iter_mut());
        for (index, weights) in self.weights.layers.iter().enumerate() {
            let layer = AdaptedLayer {
                weights,
                index,
                lora,
            };
            let slot = slots.as_mut().and_then(|s| s.next());
            x = self.decoder_layer(&x, layer, mask, rope, slot)?;
        }
        Ok(x)
    }

    /// The causal-LM loss of `logits` `[B, T, V]` (f32 or bf16) against `labels` `[B, T]` (i64):
    /// position t predicts label t + 1, labels equal to [`IGNORE_INDEX`] are skipped, and the
    /// summed f32 cross-entropy is divided by the number of label tokens, which is returned too
    /// (for normalizing accumulated micro-batches). With no label tokens the loss is NaN, as
    /// PyTorch's mean over nothing.
    pub fn loss(logits: &Tensor, labels: &Tensor) -> Result<(Tensor, usize)> {
        let (b, t, v) = match *logits.dims() {
            [b, t, v] if v > 0 => (b, t, v),
            _ => {
                return Err(invalid(format!(
                    "logits have shape {:?}, expected [B, T, V > 0]",
                    logits.dims()
                )))
            }
        };
        if !matches!(logits.dtype(), DType::F32 | DType::BF16) {
            return Err(invalid(format!(
                "logits are {:?}, not f32 or bf16",
                logits.dtype()
            )));
        }
        check_shape("labels", labels, &[b, t])?;
        if labels.dtype() != DType::I64 {
            return Err(invalid(format!("labels are {:?}, not i64", labels.dtype())));
        }
        let labels = labels.flatten_all()?.to_vec1::<i64>()?;
        let mut rows = Vec::new();
        let mut targets = Vec::new();
        for (i, &label) in labels.iter().enumerate() {
            if label == IGNORE_INDEX {
                continue;
            }
            if label < 0 || label as u64 >= v as u64 {
                return Err(invalid(format!(
                    "label {label} at {i} is neither {IGNORE_INDEX} nor below vocab {v}"
                )));
            }
            if i % t != 0 {
                rows.push((i - 1) as u32);
                targets.push(label as u32);
            }
        }
        let count = rows.len();
        let device = logits.device();
        if count == 0 {
            return Ok((Tensor::new(f32::NAN, device)?, 0));
        }
        let rows = Tensor::from_vec(rows, count, device)?;
        let targets = Tensor::from_vec(targets, (count, 1), device)?;
        let x = logits
            .to_dtype(DType::F32)?
            .reshape((b * t, v))?
            .index_select(&rows, 0)?;
        let max = x.max_keepdim(D::Minus1)?;
        let shifted = x.broadcast_sub(&max)?;
        let log_sum = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
        let picked = shifted.gather(&targets, 1)?;
        let nll = (log_sum - picked)?.sum_all()?;
        // A true f32 division, as torch's mean (candle's `/ f64` multiplies by the reciprocal).
        let count_t = Tensor::new(count as f32, device)?;
        Ok((nll.div(&count_t)?, count))
    }

    pub(crate) fn check_ids(&self, input_ids: &Tensor) -> Result<(usize, usize)> {
        let (b, t) = match *input_ids.dims() {
            [b, t] if b > 0 && t > 0 => (b, t),
            _ => {
                return Err(invalid(format!(
                    "input_ids have shape {:?}, expected non-empty [B, T]",
                    input_ids.dims()
                )))
            }
        };
        if input_ids.dtype() != DType::U32 {
            return Err(invalid(format!(
                "input_ids are {:?}, not u32",
                input_ids.dtype()
            )));
        }
        let vocab = self.config.vocab_size;
        if let Some(&id) = input_ids
            .flatten_all()?
            .to_vec1::<u32>()?
            .iter()
            .find(|&&id| id as usize >= vocab)
        {
            return Err(invalid(format!("token id {id} is not below vocab {vocab}")));
        }
        Ok((b, t))
    }

    /// The mask as one bool per token (true = attend), checked to be 0/1 of an integer dtype.
    pub(crate) fn check_mask(&self, mask: &Tensor, b: usize, t: usize) -> Result<Vec<bool>> {
        check_shape("attention_mask", mask, &[b, t])?;
        if !matches!(mask.dtype(), DType::U8 | DType::U32 | DType::I64) {
            return Err(invalid(format!(
                "attention_mask is {:?}, not u8, u32 or i64",
                mask.dtype()
            )));
        }
        let values = mask.flatten_all()?.to_dtype(DType::I64)?.to_vec1::<i64>()?;
        values
            .into_iter()
            .map(|m| match m {
                0 => Ok(false),
                1 => Ok(true),
                other => Err(invalid(format!("attention_mask holds {other}, not 0 or 1"))),
            })
            .collect()
    }

    /// `[B, 1, T, S]` f32 for T queries after `past` cached keys (S = past + T, `keep` `[B, S]`): 0
    /// where query i may see key j (j ≤ past + i and j not a pad), else the compute dtype's most
    /// negative finite value, as transformers' eager mask. Built on the host for the CPU; on a
    /// GPU from `keep` alone, so the `B · T · S` floats are not uploaded each step.
    pub(crate) fn additive_mask(
        &self,
        keep: &[bool],
        b: usize,
        past: usize,
        t: usize,
    ) -> Result<Tensor> {
        let hidden = match self.dtype {
            DType::BF16 => bf16::MIN.to_f32(),
            _ => f32::MIN,
        };
        if self.device().is_cpu() {
            additive_mask_host(keep, b, past, t, hidden)
        } else {
            additive_mask_ops(keep, b, past, t, hidden, self.device())
        }
    }

    /// cos and sin `[rows, 1, T, head_dim]` for `positions` (`rows · T`, row-major): `pos · inv_freq`
    /// in f32, duplicated over both halves, rounded to the compute dtype as transformers' rotary
    /// embedding returns them.
    pub(crate) fn rope_tables(&self, rows: usize, positions: &[usize]) -> Result<(Tensor, Tensor)> {
        let d = self.config.head_dim;
        let t = positions.len() / rows;
        let mut cos = Vec::with_capacity(positions.len() * d);
        let mut sin = Vec::with_capacity(positions.len() * d);
        for &pos in positions {
            let angles: Vec<f32> = self.inv_freq.iter().map(|&f| pos as f32 * f).collect();
            for _ in 0..2 {
                cos.extend(angles.iter().map(|a| a.cos()));
                sin.extend(angles.iter().map(|a| a.sin()));
            }
        }
        let cos = Tensor::from_vec(cos, (rows, 1, t, d), self.device())?;
        let sin = Tensor::from_vec(sin, (rows, 1, t, d), self.device())?;
        Ok((self.round(cos)?, self.round(sin)?))
    }

    /// The fused kernels' RoPE inputs for `rows` sequences at positions `0..t`: tables `[t, d / 2]`
    /// with the values of [`Self::rope_tables`] (one half; the halves are equal) and position
    /// `i` for token i of every row.
    pub(crate) fn fused_rope_tables(&self, rows: usize, t: usize) -> RopeTables {
        let round = |v: f32| match self.dtype {
            DType::BF16 => bf16::from_f32(v).to_f32(),
            _ => v,
        };
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(t * half);
        let mut sin = Vec::with_capacity(t * half);
        for pos in 0..t {
            for &f in &self.inv_freq {
                let angle = pos as f32 * f;
                cos.push(round(angle.cos()));
                sin.push(round(angle.sin()));
            }
        }
        RopeTables {
            head_dim: self.config.head_dim,
            cos,
            sin,
            positions: (0..rows).flat_map(|_| 0..t as i32).collect(),
            #[cfg(feature = "cuda")]
            device: Default::default(),
        }
    }

    /// The shape of a batch's attention for the fused kernels, when they run and take it (head
    /// dims that are multiples of 8 up to 128, rows of RMSNorm up to 8192); None sends the batch
    /// through the tensor ops.
    pub(crate) fn fused_attention_shape(&self, b: usize, t: usize) -> Option<AttentionShape> {
        let c = &self.config;
        if !self.kernels.fused() || c.hidden_size > crate::kernels::llama::MAX_HIDDEN {
            return None;
        }
        AttentionShape::new(
            b,
            c.num_attention_heads,
            c.num_key_value_heads,
            t,
            c.head_dim,
        )
        .ok()
    }

    /// f32 values rounded to the compute dtype (and kept in f32): where torch stores a result on
    /// the tensor-op path. A tensor already stored in the compute dtype (the kernel path's
    /// activations) is returned as it is.
    pub(crate) fn round(&self, x: Tensor) -> Result<Tensor> {
        if self.dtype == DType::F32 || x.dtype() != DType::F32 {
            return Ok(x);
        }
        Ok(x.to_dtype(self.dtype)?.to_dtype(DType::F32)?)
    }

    /// An f32 result `y` stored as activations of dtype `act` are: rounded in f32 on the tensor-op
    /// path (`act` F32), cast to `act` (one rounding) on the kernel path.
    pub(crate) fn store(&self, y: Tensor, act: DType) -> Result<Tensor> {
        if act == DType::F32 {
            return self.round(y.to_dtype(DType::F32)?);
        }
        Ok(y.to_dtype(act)?)
    }

    /// The dtype a batch's activations are stored in (docs/ARCHITECTURE.md, "Activation
    /// storage"): the compute dtype when it runs through the kernels (`fused`), else f32 holding
    /// compute-dtype values, as the tensor-op reference rounds them.
    pub(crate) fn act_dtype(&self, fused: bool) -> DType {
        if fused {
            self.dtype
        } else {
            DType::F32
        }
    }

    /// RMSNorm: `w · dtype(x · rsqrt(mean(x²) + eps))`, the statistics in f32.
    pub(crate) fn rms_norm(&self, x: &Tensor, weight: &Tensor) -> Result<Tensor> {
        let variance = x.sqr()?.mean_keepdim(D::Minus1)?;
        let rstd = (variance + self.config.rms_norm_eps)?.sqrt()?.recip()?;
        let normed = self.round(x.broadcast_mul(&rstd)?)?;
        self.round(normed.broadcast_mul(&weight.to_dtype(DType::F32)?)?)
    }

    /// `x · wᵀ` for the frozen linear `module` of `layer`, x `[.., in]` in its storage dtype
    /// ([`Self::act_dtype`]), the result in the same. The one seam where a backend's (dequant-)GEMM plugs in: on a CUDA
    /// device in bf16 compute an NF4 weight goes through our dequant-GEMM dispatcher
    /// ([`Self::nf4_gemm`]); otherwise NF4 weights are dequantized to their original dtype (as
    /// bitsandbytes' forward does), cast to the compute dtype and multiplied in f32.
    pub(crate) fn linear(&self, x: &Tensor, layer: usize, module: TargetModule) -> Result<Tensor> {
        if let Some(y) = self.nf4_gemm(GemmOp::Forward, x, layer, module)? {
            return self.store(y, x.dtype());
        }
        self.dense_linear(x, &self.frozen_weight(layer, module)?)
    }

    /// Whether products with the frozen weight of `module` in `layer` run through the NF4
    /// GEMV / dequant-GEMM kernels by the path [`crate::kernels::nf4_gemm::Nf4MatmulPlan`] picks,
    /// rather than a dequantized copy: for an NF4 weight in bf16 compute on the kernel path, on a
    /// CUDA device or the emulator (the same route). bf16 compute only, since the kernels take
    /// bf16 activations; an f32 model keeps dequantize + f32 matmul, which is exact against the
    /// CPU.
    pub fn uses_nf4_gemm(&self, layer: usize, module: TargetModule) -> bool {
        if self.dtype != DType::BF16 {
            return false;
        }
        if self.kernels.path() == KernelPath::Emulated {
            return self.nf4_linear(layer, module).is_some();
        }
        #[cfg(feature = "cuda")]
        if let Some(on_device) = &self.nf4_device {
            return on_device.has(layer, module);
        }
        false
    }

    /// The NF4 weight of `module` in `layer`, if it is one.
    fn nf4_linear(
        &self,
        layer: usize,
        module: TargetModule,
    ) -> Option<&crate::quant::nf4::Nf4Tensor> {
        match self.weights.layers.get(layer)?.linear(module) {
            Linear::Nf4(t) => Some(t),
            Linear::Dense(_) => None,
        }
    }

    /// When [`Self::uses_nf4_gemm`]: `a · Wᵀ` (`op` Forward, `a` `[.., in]`) or `a · W`
    /// (InputGrad, `a` `[.., out]`) with the frozen NF4 weight W `[out, in]`, `a` rounded to bf16
    /// and the products summed in f32, `[.., out]` / `[.., in]` in a's dtype (bf16 rounded once by
    /// the kernel on the kernel path; unrounded f32 on the tensor-op path); None otherwise.
    pub(crate) fn nf4_gemm(
        &self,
        op: GemmOp,
        a: &Tensor,
        layer: usize,
        module: TargetModule,
    ) -> Result<Option<Tensor>> {
        if !self.uses_nf4_gemm(layer, module) {
            return Ok(None);
        }
        let dims = a.dims();
        let red = *dims.last().ok_or_else(|| invalid("a 0-D activation"))?;
        let a2 = a.reshape((a.elem_count() / red.max(1), red))?;
        let y = match self.nf4_linear(layer, module) {
            Some(t) if self.kernels.path() == KernelPath::Emulated => {
                crate::model::nf4_host::matmul_nf4(t, op, &a2, a.dtype())?
            }
            #[cfg(feature = "cuda")]
            _ if self.nf4_device.is_some() => match &self.nf4_device {
                Some(on_device) => on_device.matmul(op, &a2, layer, module, a.dtype())?,
                None => return Ok(None),
            },
            _ => return Ok(None),
        };
        let mut out_dims = dims.to_vec();
        if let Some(last) = out_dims.last_mut() {
            *last = y.dim(1)?;
        }
        Ok(Some(y.reshape(out_dims)?))
    }

    /// The frozen weight `[out, in]` of `module` in `layer` as [`Self::linear`] multiplies by it,
    /// in the compute dtype: dense as stored; NF4 dequantized to its original dtype and rounded to
    /// the compute dtype — on a CUDA device by `k_nf4_dequantize` from the copy [`Self::new`]
    /// uploaded, with the same roundings, so the same bits as on the CPU.
    pub fn frozen_weight(&self, layer: usize, module: TargetModule) -> Result<Tensor> {
        let weights = self.weights.layers.get(layer).ok_or_else(|| {
            invalid(format!(
                "layer {layer} of a {}-layer model",
                self.weights.layers.len()
            ))
        })?;
        match weights.linear(module) {
            Linear::Dense(w) => Ok(w.clone()),
            Linear::Nf4(t) => {
                #[cfg(feature = "cuda")]
                if let Some(on_device) = &self.nf4_device {
                    let w = on_device.dequantize(layer, module)?;
                    return Ok(w.to_dtype(self.dtype)?);
                }
                let mut values = t.dequantize()?;
                match t.dtype.as_str() {
                    "bfloat16" => values
                        .iter_mut()
                        .for_each(|v| *v = bf16::from_f32(*v).to_f32()),
                    "float16" => values
                        .iter_mut()
                        .for_each(|v| *v = f16::from_f32(*v).to_f32()),
                    _ => {}
                }
                let w = Tensor::from_vec(values, t.shape.as_slice(), self.device())?;
                Ok(w.to_dtype(self.dtype)?)
            }
        }
    }

    /// `module` of `layer` on `x`, plus the adapter's LoRA delta when it targets the module, the
    /// sum rounded to the compute dtype as PEFT's `result.to(torch_result_dtype)`. With `fused`
    /// kernels the delta goes through the fused LoRA kernels when the adapter runs without
    /// dropout (eval, or a dropout of 0) and the kernels take the pair's rank and sizes.
    fn adapted_linear(
        &self,
        x: &Tensor,
        layer: AdaptedLayer<'_>,
        module: TargetModule,
        fused: bool,
    ) -> Result<Tensor> {
        let y = self.linear(x, layer.index, module)?;
        let Some((adapter, mode)) = layer.lora else {
            return Ok(y);
        };
        let no_dropout = matches!(mode, LoraMode::Eval) || adapter.config().dropout == 0.0;
        let pair = adapter
            .pair(layer.index, module)
            .filter(|_| fused && no_dropout);
        if let Some(pair) = pair {
            let in_features = *x.dims().last().ok_or_else(|| invalid("a 0-D activation"))?;
            let rows = x.elem_count() / in_features.max(1);
            if let Some(lora) = FusedLora::new(pair, adapter.config().scaling(), rows)? {
                let d = lora.dims;
                let x2 = x.reshape((rows, d.in_features))?;
                let y2 = y.reshape((rows, d.out_features))?;
                let (y2, _t) = fused_lora::forward(&self.kernels, self.dtype, &lora, &x2, &y2)?;
                return Ok(y2.reshape(y.dims())?);
            }
        }
        self.store(adapter.apply(layer.index, module, x, &y, mode)?, x.dtype())
    }

    /// `x · wᵀ` with exact products accumulated in f32 and one rounding, as torch's CPU GEMMs; x
    /// and the result in x's storage dtype ([`Self::act_dtype`]).
    pub(crate) fn dense_linear(&self, x: &Tensor, w: &Tensor) -> Result<Tensor> {
        let (out_features, in_features) = w.dims2()?;
        let dims = x.dims();
        let rows = x.elem_count() / in_features;
        let y = matmul(&x.reshape((rows, in_features))?, w, Weight::Transposed)?;
        let mut out_dims = dims.to_vec();
        if let Some(last) = out_dims.last_mut() {
            *last = out_features;
        }
        self.round(y.reshape(out_dims)?)
    }

    /// One decoder layer, for every path: each op (RMSNorm, attention with RoPE, SwiGLU, the
    /// adapted linears) runs through the fused kernels when the batch has `rope.fused` inputs and
    /// as tensor ops otherwise (docs/ARCHITECTURE.md, "The decoder layer").
    fn decoder_layer(
        &self,
        x: &Tensor,
        layer: AdaptedLayer<'_>,
        mask: &Tensor,
        rope: &StepRope<'_>,
        cache: Option<&mut LayerKvCache>,
    ) -> Result<Tensor> {
        let fused = rope.fused.is_some();
        let normed = self.layer_norm(x, &layer.weights.input_layernorm, fused)?;
        let attn = match rope.fused {
            Some(inputs) => self.attention_kernels(&normed, layer, inputs)?,
            None => self.attention(&normed, layer, mask, rope.cos, rope.sin, cache)?,
        };
        let x = self.round((x + attn)?)?;
        let normed = self.layer_norm(&x, &layer.weights.post_attention_layernorm, fused)?;
        let gate = self.adapted_linear(&normed, layer, TargetModule::GateProj, fused)?;
        let up = self.adapted_linear(&normed, layer, TargetModule::UpProj, fused)?;
        let act = if fused {
            self.kernels.swiglu(self.dtype, &gate, &up)?
        } else {
            self.round(self.round(gate.silu()?)?.mul(&up)?)?
        };
        let mlp = self.adapted_linear(&act, layer, TargetModule::DownProj, fused)?;
        self.round((x + mlp)?)
    }

    /// RMSNorm through the fused kernel (the statistics in f32, one rounding per op) or as tensor
    /// ops.
    fn layer_norm(&self, x: &Tensor, weight: &Tensor, fused: bool) -> Result<Tensor> {
        if !fused {
            return self.rms_norm(x, weight);
        }
        let eps = self.config.rms_norm_eps;
        Ok(self.kernels.rms_norm(self.dtype, x, weight, eps)?.0)
    }

    /// Self-attention through the fused RoPE and attention kernels (no KV cache: a whole batch
    /// from position 0).
    fn attention_kernels(
        &self,
        x: &Tensor,
        layer: AdaptedLayer<'_>,
        fused: &FusedInputs,
    ) -> Result<Tensor> {
        let (k, dt) = (&self.kernels, self.dtype);
        let c = &self.config;
        let (b, t, _) = x.dims3()?;
        let (n_heads, n_kv, d) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        let q = self.adapted_linear(x, layer, TargetModule::QProj, true)?;
        let kk = self.adapted_linear(x, layer, TargetModule::KProj, true)?;
        let v = self.adapted_linear(x, layer, TargetModule::VProj, true)?;
        let (q, kk) = k.rope(dt, &q, &kk, &fused.rope, false)?;
        let heads = |y: &Tensor, n: usize| -> Result<Tensor> {
            Ok(y.reshape((b, t, n, d))?.transpose(1, 2)?.contiguous()?)
        };
        let (q, kk, v) = (heads(&q, n_heads)?, heads(&kk, n_kv)?, heads(&v, n_kv)?);
        let qkv = Qkv {
            shape: fused.shape,
            q: &q,
            k: &kk,
            v: &v,
        };
        let (o, _lse) = k.attention(dt, &qkv, &fused.key_mask)?;
        let o = o
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b, t, n_heads * d))?;
        self.adapted_linear(&o, layer, TargetModule::OProj, true)
    }

    /// `[B, T, hidden]` → `[B, heads, T, head_dim]` for projection `module`.
    fn heads(
        &self,
        x: &Tensor,
        layer: AdaptedLayer<'_>,
        module: TargetModule,
        n_heads: usize,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        Ok(self
            .adapted_linear(x, layer, module, false)?
            .reshape((b, t, n_heads, self.config.head_dim))?
            .transpose(1, 2)?
            .contiguous()?)
    }

    /// `x · cos + rotate_half(x) · sin`, each product and the sum rounded.
    pub(crate) fn rope(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let half = self.config.head_dim / 2;
        let x1 = x.narrow(D::Minus1, 0, half)?;
        let x2 = x.narrow(D::Minus1, half, half)?;
        let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
        let a = self.round(x.broadcast_mul(cos)?)?;
        let b = self.round(rotated.broadcast_mul(sin)?)?;
        self.round((a + b)?)
    }

    fn attention(
        &self,
        x: &Tensor,
        layer: AdaptedLayer<'_>,
        mask: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        cache: Option<&mut LayerKvCache>,
    ) -> Result<Tensor> {
        let c = &self.config;
        let (b, t, _) = x.dims3()?;
        let (n_heads, n_kv, d) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        let q = self.rope(
            &self.heads(x, layer, TargetModule::QProj, n_heads)?,
            cos,
            sin,
        )?;
        let k = self.rope(&self.heads(x, layer, TargetModule::KProj, n_kv)?, cos, sin)?;
        let v = self.heads(x, layer, TargetModule::VProj, n_kv)?;
        let (k, v) = match cache {
            Some(cache) => cache.append(&k, &v, self.dtype)?,
            None => (k, v),
        };
        let k = repeat_kv(&k, n_heads / n_kv)?;
        let v = repeat_kv(&v, n_heads / n_kv)?;
        let scores = self.round(q.matmul(&k.t()?.contiguous()?)?)?;
        // transformers multiplies by the Python float `head_dim ** -0.5`, which torch applies in f32.
        let scaling = (d as f64).powf(-0.5) as f32;
        let scores = self.round((scores * f64::from(scaling))?)?;
        let scores = self.round(scores.broadcast_add(mask)?)?;
        let max = scores.max_keepdim(D::Minus1)?;
        let exp = scores.broadcast_sub(&max)?.exp()?;
        let probs = self.round(exp.broadcast_div(&exp.sum_keepdim(D::Minus1)?)?)?;
        let out = self.round(probs.matmul(&v)?)?;
        let out = out.transpose(1, 2)?.reshape((b, t, n_heads * d))?;
        self.adapted_linear(&out, layer, TargetModule::OProj, false)
    }
}

/// [`LlamaModel::additive_mask`] as a host loop, on the CPU.
fn additive_mask_host(
    keep: &[bool],
    b: usize,
    past: usize,
    t: usize,
    hidden: f32,
) -> Result<Tensor> {
    let s = past + t;
    let mut mask = vec![hidden; b * t * s];
    for row in 0..b {
        for i in 0..t {
            for j in 0..=past + i {
                if keep[row * s + j] {
                    mask[(row * t + i) * s + j] = 0.0;
                }
            }
        }
    }
    Ok(Tensor::from_vec(mask, (b, 1, t, s), &Device::Cpu)?)
}

/// [`LlamaModel::additive_mask`] as tensor ops on `device`: (key j ≤ query position) ∧ keep[j]
/// selects 0, else `hidden`; only the `B · S` keep flags come from the host. Exact values, so the
/// same tensor as [`additive_mask_host`].
fn additive_mask_ops(
    keep: &[bool],
    b: usize,
    past: usize,
    t: usize,
    hidden: f32,
    device: &Device,
) -> Result<Tensor> {
    let s = past + t;
    let keys = Tensor::arange(0u32, s as u32, device)?.reshape((1, 1, 1, s))?;
    let queries = Tensor::arange(past as u32, s as u32, device)?.reshape((1, 1, t, 1))?;
    let keep: Vec<u8> = keep.iter().map(|&k| u8::from(k)).collect();
    let keep = Tensor::from_vec(keep, (b, 1, 1, s), device)?;
    let seen = keys.broadcast_le(&queries)?.broadcast_mul(&keep)?;
    let shape = seen.shape().clone();
    let zero = Tensor::new(0f32, device)?.broadcast_as(&shape)?;
    let hidden = Tensor::new(hidden, device)?.broadcast_as(&shape)?;
    Ok(seen.where_cond(&zero, &hidden)?)
}

/// The RoPE tables `[rows, 1, T, head_dim]` of one forward, and the fused kernels' inputs when
/// the batch runs through them.
struct StepRope<'a> {
    cos: &'a Tensor,
    sin: &'a Tensor,
    fused: Option<&'a FusedInputs>,
}

/// A LoRA adapter and the mode it runs in, or none.
type Lora<'a> = Option<(&'a LoraAdapter, &'a LoraMode)>;

/// One decoder layer's weights, its index and the adapter (if any) on its linears.
#[derive(Clone, Copy)]
struct AdaptedLayer<'a> {
    weights: &'a LayerWeights,
    index: usize,
    lora: Lora<'a>,
}

/// `[B, kv, T, d]` → `[B, kv · n_rep, T, d]`, query head h reading kv head h / n_rep.
pub(crate) fn repeat_kv(x: &Tensor, n_rep: usize) -> Result<Tensor> {
    if n_rep == 1 {
        return Ok(x.clone());
    }
    let (b, kv, t, d) = x.dims4()?;
    Ok(x.unsqueeze(2)?
        .broadcast_as((b, kv, n_rep, t, d))?
        .reshape((b, kv * n_rep, t, d))?)
}

fn linears(layer: &LayerWeights) -> [(&'static str, &Linear); 7] {
    [
        ("q_proj", &layer.q_proj),
        ("k_proj", &layer.k_proj),
        ("v_proj", &layer.v_proj),
        ("o_proj", &layer.o_proj),
        ("gate_proj", &layer.gate_proj),
        ("up_proj", &layer.up_proj),
        ("down_proj", &layer.down_proj),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_from_tensor_ops_equals_the_host_loop() {
        // The form a GPU runs, here on the CPU backend: exact values, so bit for bit.
        let cases: [(usize, usize, usize, Vec<bool>); 3] = [
            (
                2,
                0,
                4,
                vec![true, true, true, true, false, false, true, true],
            ),
            (1, 3, 2, vec![false, true, true, true, true]),
            (3, 2, 1, vec![true; 9]),
        ];
        for (b, past, t, keep) in cases {
            for hidden in [f32::MIN, bf16::MIN.to_f32()] {
                let host = additive_mask_host(&keep, b, past, t, hidden).unwrap();
                let ops = additive_mask_ops(&keep, b, past, t, hidden, &Device::Cpu).unwrap();
                assert_eq!(ops.dims(), host.dims());
                assert_eq!(ops.dtype(), DType::F32);
                let bits = |x: &Tensor| -> Vec<u32> {
                    let v = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                    v.into_iter().map(f32::to_bits).collect()
                };
                assert_eq!(bits(&ops), bits(&host), "b {b} past {past} t {t}");
            }
        }
    }
}
