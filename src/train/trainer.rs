//! The training step on the CPU: LoRA gradients of each micro-batch (`[B, T]` token batches),
//! accumulated and normalised by the total label-token count, a NaN/Inf check, global-norm
//! clipping folded into the optimizer's grad scale, and one AdamW update of every A `[r, in]` and
//! B `[out, r]` at the scheduled learning rate.

use std::collections::BTreeMap;

use candle_core::{DType, Tensor};
use half::bf16;

use crate::kernels::adamw::{reference_step, AdamWConfig, AdamWStep};
use crate::kernels::launch::Element;
use crate::model::backward::{first_non_finite_activation, lora_gradients_in, LoraGrads};
use crate::model::llama::{LlamaModel, IGNORE_INDEX};
use crate::peft::{LoraAdapter, LoraMode, LoraPair, TargetModule};
use crate::train::data::Batch;
use crate::train::schedule::LrSchedule;
use crate::{Error, Result};

/// `clip_grad_norm_`'s guard against dividing by a zero norm.
const CLIP_EPS: f64 = 1e-6;

fn invalid(reason: impl Into<String>) -> Error {
    Error::invalid("trainer", reason)
}

/// The name of A (`matrix` "A") or B of `module` in `layer`, as PEFT's key without its prefix
/// and `.weight`: `layers.1.mlp.down_proj.lora_B`.
pub fn lora_tensor_name(layer: usize, module: TargetModule, matrix: &str) -> String {
    format!(
        "layers.{layer}.{}.{}.lora_{matrix}",
        module.block(),
        module.name()
    )
}

/// Updates an adapter's A and B tensors from their gradients. One interface for the CPU
/// reference and the device optimizers.
pub trait Optimizer {
    /// The peak learning rate the schedule multiplies.
    fn base_lr(&self) -> f64;

    /// How many updates have been applied.
    fn steps(&self) -> u64;

    /// One update of every pair of `adapter` with its gradient in `grads` (same keys, f32,
    /// multiplied by `grad_scale` first) at learning rate `lr`. Nothing changes on an error.
    fn step(
        &mut self,
        adapter: &mut LoraAdapter,
        grads: &LoraGrads,
        lr: f64,
        grad_scale: f32,
    ) -> Result<()>;
}

/// f32 first and second moments of one parameter tensor, `[n]` each (torch's `exp_avg` and
/// `exp_avg_sq`).
#[derive(Clone, Debug, PartialEq)]
pub struct Moments {
    pub m: Vec<f32>,
    pub v: Vec<f32>,
}

impl Moments {
    fn zeros(n: usize) -> Self {
        Moments {
            m: vec![0.0; n],
            v: vec![0.0; n],
        }
    }
}

/// Checks restored AdamW moments (`[A, B]` per adapted linear): each m and v pair must have one
/// length. Shared by every optimizer that restores from a checkpoint.
pub(crate) fn check_moments(moments: &BTreeMap<(usize, TargetModule), [Moments; 2]>) -> Result<()> {
    for (&(layer, module), pair) in moments {
        for (matrix, state) in ["A", "B"].into_iter().zip(pair) {
            if state.m.len() != state.v.len() {
                return Err(invalid(format!(
                    "moments of {} hold {} m and {} v values",
                    lora_tensor_name(layer, module, matrix),
                    state.m.len(),
                    state.v.len()
                )));
            }
        }
    }
    Ok(())
}

/// torch.optim.AdamW on the CPU through [`reference_step`], one tensor at a time, with f32
/// moments created (zero) on the first update as torch does. Parameters stay in the adapter's
/// dtype (f32 or bf16).
#[derive(Clone, Debug)]
pub struct CpuAdamW {
    config: AdamWConfig,
    steps: u64,
    /// `[A, B]` moments per adapted linear.
    moments: BTreeMap<(usize, TargetModule), [Moments; 2]>,
}

impl CpuAdamW {
    /// `config.lr` is the base learning rate of the schedule.
    pub fn new(config: AdamWConfig) -> Result<Self> {
        config.validate()?;
        Ok(CpuAdamW {
            config,
            steps: 0,
            moments: BTreeMap::new(),
        })
    }

    /// An optimizer that has made `steps` updates and holds `moments` (`[A, B]` per adapted
    /// linear), as restored from a checkpoint. Each m and v pair must have one length.
    pub fn from_state(
        config: AdamWConfig,
        steps: u64,
        moments: BTreeMap<(usize, TargetModule), [Moments; 2]>,
    ) -> Result<Self> {
        config.validate()?;
        check_moments(&moments)?;
        Ok(CpuAdamW {
            config,
            steps,
            moments,
        })
    }

    pub fn config(&self) -> &AdamWConfig {
        &self.config
    }

    /// `[A, B]` moments per adapted linear; empty until the first update.
    pub fn moments(&self) -> &BTreeMap<(usize, TargetModule), [Moments; 2]> {
        &self.moments
    }
}

/// The `[A, B]` f32 moments of every adapted linear, as a checkpoint holds them.
pub type MomentMap = BTreeMap<(usize, TargetModule), [Moments; 2]>;

/// An AdamW optimizer a checkpoint can hold and rebuild, on the CPU or a device: its settings,
/// its update count ([`Optimizer::steps`]) and its moments copied to the host.
pub trait CheckpointOptimizer: Optimizer + Sized {
    fn adamw_config(&self) -> &AdamWConfig;

    /// The moments on the host (empty before the first update).
    fn host_moments(&self) -> Result<MomentMap>;
}

impl CheckpointOptimizer for CpuAdamW {
    fn adamw_config(&self) -> &AdamWConfig {
        &self.config
    }

    fn host_moments(&self) -> Result<MomentMap> {
        Ok(self.moments.clone())
    }
}

impl Optimizer for CpuAdamW {
    fn base_lr(&self) -> f64 {
        self.config.lr
    }

    fn steps(&self) -> u64 {
        self.steps
    }

    fn step(
        &mut self,
        adapter: &mut LoraAdapter,
        grads: &LoraGrads,
        lr: f64,
        grad_scale: f32,
    ) -> Result<()> {
        check_grads_match(adapter, grads)?;
        let scalars = AdamWConfig { lr, ..self.config }.step(self.steps + 1, grad_scale)?;
        let mut updated = Vec::with_capacity(grads.len());
        for ((layer, module), pair) in adapter.pairs() {
            let grad = grads
                .get(&(layer, module))
                .ok_or_else(|| invalid(format!("no gradient for layer {layer} {module}")))?;
            // A copy, so that an error part-way leaves every state as it was.
            let mut moments = self
                .moments
                .get(&(layer, module))
                .cloned()
                .unwrap_or_else(|| {
                    [
                        Moments::zeros(pair.a.elem_count()),
                        Moments::zeros(pair.b.elem_count()),
                    ]
                });
            let [ma, mb] = &mut moments;
            let a = update_tensor(&scalars, &pair.a, &grad.a, ma)?;
            let b = update_tensor(&scalars, &pair.b, &grad.b, mb)?;
            updated.push(((layer, module), LoraPair { a, b }, moments));
        }
        for ((layer, module), pair, moments) in updated {
            adapter.set_pair(layer, module, pair)?;
            self.moments.insert((layer, module), moments);
        }
        self.steps += 1;
        Ok(())
    }
}

/// `grads` holds exactly the adapter's pairs, each f32 and shaped as its parameter.
pub(crate) fn check_grads_match(adapter: &LoraAdapter, grads: &LoraGrads) -> Result<()> {
    if grads.len() != adapter.pairs().count() {
        return Err(invalid(format!(
            "{} gradient pairs for {} adapter pairs",
            grads.len(),
            adapter.pairs().count()
        )));
    }
    for ((layer, module), pair) in adapter.pairs() {
        let grad = grads
            .get(&(layer, module))
            .ok_or_else(|| invalid(format!("no gradient for layer {layer} {module}")))?;
        for (matrix, p, g) in [("A", &pair.a, &grad.a), ("B", &pair.b, &grad.b)] {
            if p.dims() != g.dims() || g.dtype() != DType::F32 {
                return Err(invalid(format!(
                    "gradient of {} is {:?} {:?}, expected {:?} F32",
                    lora_tensor_name(layer, module, matrix),
                    g.dims(),
                    g.dtype(),
                    p.dims()
                )));
            }
        }
    }
    Ok(())
}

/// One AdamW update of `param` (f32 or bf16) with the f32 `grad`; the new moments land in
/// `moments`, the new parameter is returned.
fn update_tensor(
    scalars: &AdamWStep,
    param: &Tensor,
    grad: &Tensor,
    moments: &mut Moments,
) -> Result<Tensor> {
    fn run<T: Element + candle_core::WithDType>(
        scalars: &AdamWStep,
        param: &Tensor,
        grad: &[f32],
        moments: &mut Moments,
    ) -> Result<Tensor> {
        let mut p = param.flatten_all()?.to_vec1::<T>()?;
        reference_step(scalars, &mut p, grad, &mut moments.m, &mut moments.v)?;
        Ok(Tensor::from_vec(p, param.dims(), param.device())?)
    }
    let g = grad.flatten_all()?.to_vec1::<f32>()?;
    match param.dtype() {
        DType::F32 => run::<f32>(scalars, param, &g, moments),
        DType::BF16 => run::<bf16>(scalars, param, &g, moments),
        other => Err(invalid(format!(
            "adapter parameters are {other:?}, not f32 or bf16"
        ))),
    }
}

/// The gradient of the mean loss over every label token of a group of micro-batches.
#[derive(Clone, Debug)]
pub struct AccumulatedGradients {
    /// Mean causal-LM loss over all `label_tokens`.
    pub loss: f32,
    pub label_tokens: usize,
    /// Non-padding input tokens.
    pub tokens: usize,
    /// f32, by (layer, module).
    pub grads: LoraGrads,
}

/// `[B, T]` tensors of a batch: input ids (u32), attention mask (u8), labels (i64).
fn batch_tensors(model: &LlamaModel, batch: &Batch) -> Result<(Tensor, Tensor, Tensor)> {
    let n = batch.batch_size * batch.seq_len;
    let lens = [
        batch.input_ids.len(),
        batch.attention_mask.len(),
        batch.labels.len(),
    ];
    if lens.iter().any(|&len| len != n) || n == 0 {
        return Err(invalid(format!(
            "batch of [{}, {}] holds {lens:?} ids, mask values and labels",
            batch.batch_size, batch.seq_len
        )));
    }
    let shape = (batch.batch_size, batch.seq_len);
    let device = model.device();
    Ok((
        Tensor::from_vec(batch.input_ids.clone(), shape, device)?,
        Tensor::from_vec(batch.attention_mask.clone(), shape, device)?,
        Tensor::from_vec(batch.labels.clone(), shape, device)?,
    ))
}

/// Label tokens the shifted causal-LM loss predicts: [`Batch::label_tokens`] less a label on a
/// row's first position, which no token predicts.
fn predicted_label_tokens(batch: &Batch) -> usize {
    batch
        .labels
        .iter()
        .enumerate()
        .filter(|&(i, &label)| label != IGNORE_INDEX && i % batch.seq_len.max(1) != 0)
        .count()
}

/// Gradients of the mean loss over ALL label tokens of `micro_batches` (not the mean of the
/// per-micro-batch means): micro-batch i's mean-loss gradient is weighted by `count_i / total`,
/// which is its sum-loss gradient divided by the total. Micro-batches without labels add nothing.
pub fn accumulate_gradients(
    model: &LlamaModel,
    adapter: &LoraAdapter,
    micro_batches: &[Batch],
) -> Result<AccumulatedGradients> {
    accumulate_gradients_in(model, adapter, micro_batches, |_| LoraMode::Eval)
}

/// [`accumulate_gradients`] with micro-batch i's adapter in `mode(i)` (its dropout masks).
pub fn accumulate_gradients_in(
    model: &LlamaModel,
    adapter: &LoraAdapter,
    micro_batches: &[Batch],
    mode: impl Fn(usize) -> LoraMode,
) -> Result<AccumulatedGradients> {
    let total: usize = micro_batches.iter().map(predicted_label_tokens).sum();
    if total == 0 {
        return Err(invalid("the micro-batches hold no label token"));
    }
    let mut loss_sum = 0f64;
    let mut tokens = 0usize;
    let mut grads = LoraGrads::new();
    for (i, batch) in micro_batches.iter().enumerate() {
        tokens += batch.attention_mask.iter().filter(|&&m| m != 0).count();
        if predicted_label_tokens(batch) == 0 {
            continue;
        }
        let (ids, mask, labels) = batch_tensors(model, batch)?;
        let micro = lora_gradients_in(model, adapter, &ids, Some(&mask), &labels, &mode(i))?;
        let weight = micro.label_tokens as f64 / total as f64;
        loss_sum += micro.loss as f64 * micro.label_tokens as f64;
        for (key, pair) in micro.lora {
            let a = pair.a.affine(weight, 0.0)?;
            let b = pair.b.affine(weight, 0.0)?;
            let sum = match grads.remove(&key) {
                Some(acc) => LoraPair {
                    a: (acc.a + a)?,
                    b: (acc.b + b)?,
                },
                None => LoraPair { a, b },
            };
            grads.insert(key, sum);
        }
    }
    Ok(AccumulatedGradients {
        loss: (loss_sum / total as f64) as f32,
        label_tokens: total,
        tokens,
        grads,
    })
}

/// The global L2 norm of `grads` (every element of every tensor, squares summed in f64) if the
/// `loss` and every gradient are finite; otherwise [`Error::NonFinite`] naming update `step`
/// (1-based) and the loss or the first non-finite tensor (by layer, then module, A before B).
pub fn check_finite_grad_norm(step: u64, loss: f32, grads: &LoraGrads) -> Result<f64> {
    if !loss.is_finite() {
        return Err(Error::NonFinite {
            step,
            layer: None,
            tensor: "loss".to_string(),
            value: loss,
        });
    }
    let mut sum_sq = 0f64;
    for (&(layer, module), pair) in grads {
        for (matrix, g) in [("A", &pair.a), ("B", &pair.b)] {
            for x in g.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()? {
                if !x.is_finite() {
                    return Err(Error::NonFinite {
                        step,
                        layer: Some(layer),
                        tensor: format!("gradient of {}", lora_tensor_name(layer, module, matrix)),
                        value: x,
                    });
                }
                sum_sq += x as f64 * x as f64;
            }
        }
    }
    Ok(sum_sq.sqrt())
}

/// `clip_grad_norm_`'s factor for a total norm `norm`: `max_norm / (norm + 1e-6)`, capped at 1.
pub fn clip_scale(norm: f64, max_norm: f64) -> f64 {
    (max_norm / (norm + CLIP_EPS)).min(1.0)
}

/// What a step does when the loss or a gradient is NaN or ±Inf.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum NonFinitePolicy {
    /// Return [`Error::NonFinite`].
    #[default]
    Error,
    /// Leave the adapter, the optimizer and the schedule untouched and count the batch skipped.
    SkipBatch,
}

/// Everything of a training step but the optimizer's own hyperparameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TrainerConfig {
    pub schedule: LrSchedule,
    /// Clip the global gradient norm to this (`None`: no clipping).
    pub max_grad_norm: Option<f64>,
    pub non_finite: NonFinitePolicy,
}

impl TrainerConfig {
    pub fn validate(&self) -> Result<()> {
        self.schedule.validate()?;
        if let Some(max_norm) = self.max_grad_norm {
            if !(max_norm.is_finite() && max_norm > 0.0) {
                return Err(invalid(format!(
                    "max_grad_norm must be finite and > 0, got {max_norm}"
                )));
            }
        }
        Ok(())
    }
}

/// What one training step did.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepMetrics {
    /// The optimizer update this step made (1-based), or would have made when skipped.
    pub step: u64,
    /// Mean loss over the step's label tokens.
    pub loss: f32,
    /// The learning rate of the update.
    pub lr: f64,
    /// The global gradient norm before clipping (NaN when a gradient was not finite).
    pub grad_norm: f64,
    /// Non-padding input tokens.
    pub tokens: usize,
    pub label_tokens: usize,
    /// The batch was skipped for a non-finite loss or gradient.
    pub skipped: bool,
}

/// LoRA training of one adapter on a frozen model.
#[derive(Debug)]
pub struct Trainer<'m, O: Optimizer = CpuAdamW> {
    model: &'m LlamaModel,
    adapter: LoraAdapter,
    optimizer: O,
    config: TrainerConfig,
    skipped_batches: u64,
    /// Seed of the LoRA dropout masks (used when the adapter has a dropout).
    dropout_seed: u64,
}

/// The dropout seed of micro-batch `micro` in the `batch`-th batch of a run seeded `seed`
/// (splitmix64 of the three), so a resumed run draws the masks of the straight one.
pub fn dropout_seed(seed: u64, batch: u64, micro: usize) -> u64 {
    let mut z = seed
        ^ batch.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ (micro as u64).wrapping_mul(0xD1B5_4A32_D192_ED03);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl<'m, O: Optimizer> Trainer<'m, O> {
    pub fn new(
        model: &'m LlamaModel,
        adapter: LoraAdapter,
        optimizer: O,
        config: TrainerConfig,
    ) -> Result<Self> {
        adapter.check_fits(model.config())?;
        config.validate()?;
        Ok(Trainer {
            model,
            adapter,
            optimizer,
            config,
            skipped_batches: 0,
            dropout_seed: 0,
        })
    }

    /// The same trainer drawing its LoRA dropout masks from `seed` (the run's seed; 0 unless set).
    pub fn with_dropout_seed(mut self, seed: u64) -> Self {
        self.dropout_seed = seed;
        self
    }

    pub fn adapter(&self) -> &LoraAdapter {
        &self.adapter
    }

    pub fn into_adapter(self) -> LoraAdapter {
        self.adapter
    }

    pub fn optimizer(&self) -> &O {
        &self.optimizer
    }

    pub fn config(&self) -> &TrainerConfig {
        &self.config
    }

    /// The same trainer with `skipped` batches already skipped, as restored from a checkpoint.
    pub fn with_skipped_batches(mut self, skipped: u64) -> Self {
        self.skipped_batches = skipped;
        self
    }

    /// Optimizer updates made so far (skipped batches not counted).
    pub fn steps(&self) -> u64 {
        self.optimizer.steps()
    }

    /// Batches skipped under [`NonFinitePolicy::SkipBatch`].
    pub fn skipped_batches(&self) -> u64 {
        self.skipped_batches
    }

    /// One optimizer update from the accumulated gradients of `micro_batches`.
    pub fn train_step(&mut self, micro_batches: &[Batch]) -> Result<StepMetrics> {
        let done = self.optimizer.steps();
        let lr = self.config.schedule.lr(self.optimizer.base_lr(), done);
        // Batches seen so far, skipped ones included, so every batch draws its own masks.
        let batch = done + self.skipped_batches;
        let dropout = self.adapter.config().dropout > 0.0;
        let seed = self.dropout_seed;
        let acc =
            accumulate_gradients_in(
                self.model,
                &self.adapter,
                micro_batches,
                |i| match dropout {
                    true => LoraMode::Train {
                        seed: dropout_seed(seed, batch, i),
                    },
                    false => LoraMode::Eval,
                },
            )?;
        let mut metrics = StepMetrics {
            step: done + 1,
            loss: acc.loss,
            lr,
            grad_norm: f64::NAN,
            tokens: acc.tokens,
            label_tokens: acc.label_tokens,
            skipped: false,
        };
        match check_finite_grad_norm(metrics.step, acc.loss, &acc.grads) {
            Ok(norm) => metrics.grad_norm = norm,
            Err(Error::NonFinite { .. })
                if self.config.non_finite == NonFinitePolicy::SkipBatch =>
            {
                self.skipped_batches += 1;
                metrics.skipped = true;
                return Ok(metrics);
            }
            Err(Error::NonFinite {
                step, layer: None, ..
            }) => {
                // The loss itself: rerun the forward to name where it first went non-finite.
                for (i, mb) in micro_batches.iter().enumerate() {
                    let mode = match dropout {
                        true => LoraMode::Train {
                            seed: dropout_seed(seed, batch, i),
                        },
                        false => LoraMode::Eval,
                    };
                    let (ids, mask, _) = batch_tensors(self.model, mb)?;
                    let found = first_non_finite_activation(
                        self.model,
                        &self.adapter,
                        &ids,
                        Some(&mask),
                        mode,
                    )?;
                    if let Some((layer, tensor, value)) = found {
                        return Err(Error::NonFinite {
                            step,
                            layer,
                            tensor: format!("{tensor} (micro-batch {i})"),
                            value,
                        });
                    }
                }
                return Err(Error::NonFinite {
                    step,
                    layer: None,
                    tensor: "loss".to_string(),
                    value: acc.loss,
                });
            }
            Err(err) => return Err(err),
        }
        let grad_scale = match self.config.max_grad_norm {
            Some(max_norm) => clip_scale(metrics.grad_norm, max_norm),
            None => 1.0,
        };
        self.optimizer
            .step(&mut self.adapter, &acc.grads, lr, grad_scale as f32)?;
        Ok(metrics)
    }
}
