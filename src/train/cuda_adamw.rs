//! AdamW on the CUDA device behind the trainer's [`Optimizer`] trait: the fused `k_adamw_f32`
//! kernel over every LoRA A `[r, in]` and B `[out, r]` held as candle CUDA tensors (f32 or bf16,
//! f32 grads), with f32 moments placed by a [`PagingPolicy`] (see `kernels::paged`).

use std::collections::BTreeMap;
use std::sync::Arc;

use candle_core::cuda::{CudaDType, CudaStorage};
use candle_core::op::BackpropOp;
use candle_core::{DType, Device, Storage, Tensor};
use cudarc::driver::CudaView;
use half::bf16;

use crate::kernels::adamw::{AdamWConfig, AdamWStep};
use crate::kernels::cuda::{cuda_err, CudaDevice};
use crate::kernels::launch::Element;
use crate::kernels::paged::{PagedAdamWStates, PagingPolicy};
use crate::model::backward::LoraGrads;
use crate::peft::{LoraAdapter, LoraPair, TargetModule};
use crate::train::trainer::{
    check_grads_match, check_moments, lora_tensor_name, CheckpointOptimizer, MomentMap, Moments,
    Optimizer,
};
use crate::{Error, Result};

fn invalid(reason: impl Into<String>) -> Error {
    Error::invalid("cuda_adamw", reason)
}

/// `(layer, module)` of each adapted linear in update order with A's and B's element counts.
/// Tensor `2i` of the states is pair `i`'s A, `2i + 1` its B.
type Layout = Vec<((usize, TargetModule), [usize; 2])>;

/// torch.optim.AdamW on the GPU, bit-identical to [`crate::train::trainer::CpuAdamW`]: f32
/// moments created (zero) on the first update, parameters kept in the adapter's dtype.
#[derive(Debug)]
pub struct CudaAdamW {
    dev: Arc<CudaDevice>,
    config: AdamWConfig,
    policy: PagingPolicy,
    steps: u64,
    layout: Layout,
    states: Option<PagedAdamWStates>,
    /// Moments restored from a checkpoint, placed on the first update.
    restored: BTreeMap<(usize, TargetModule), [Moments; 2]>,
}

impl CudaAdamW {
    /// `config.lr` is the base learning rate of the schedule; the adapter's tensors must live on
    /// `dev` (the same device ordinal).
    pub fn new(dev: Arc<CudaDevice>, config: AdamWConfig, policy: PagingPolicy) -> Result<Self> {
        Self::from_state(dev, config, policy, 0, BTreeMap::new())
    }

    /// An optimizer that has made `steps` updates and holds `moments` (`[A, B]` per adapted
    /// linear), as restored from a checkpoint; they are placed on the device on the first update.
    pub fn from_state(
        dev: Arc<CudaDevice>,
        config: AdamWConfig,
        policy: PagingPolicy,
        steps: u64,
        moments: BTreeMap<(usize, TargetModule), [Moments; 2]>,
    ) -> Result<Self> {
        config.validate()?;
        check_moments(&moments)?;
        Ok(CudaAdamW {
            dev,
            config,
            policy,
            steps,
            layout: Vec::new(),
            states: None,
            restored: moments,
        })
    }

    pub fn config(&self) -> &AdamWConfig {
        &self.config
    }

    /// The placed states (`None` before the first update).
    pub fn states(&self) -> Option<&PagedAdamWStates> {
        self.states.as_ref()
    }

    /// `[A, B]` moments per adapted linear, copied to the host (for checkpoints); the restored
    /// ones before the first update.
    pub fn moments(&self) -> Result<BTreeMap<(usize, TargetModule), [Moments; 2]>> {
        let Some(states) = &self.states else {
            return Ok(self.restored.clone());
        };
        let mut out = BTreeMap::new();
        for (i, (key, _)) in self.layout.iter().enumerate() {
            let (am, av) = states.to_host(&self.dev, 2 * i)?;
            let (bm, bv) = states.to_host(&self.dev, 2 * i + 1)?;
            out.insert(*key, [Moments { m: am, v: av }, Moments { m: bm, v: bv }]);
        }
        Ok(out)
    }

    /// The moments of the first update: restored ones where given (lengths checked), else zeros.
    fn initial_moments(&self, layout: &Layout) -> Result<Vec<(Vec<f32>, Vec<f32>)>> {
        let mut out = Vec::with_capacity(2 * layout.len());
        for &((layer, module), counts) in layout {
            let restored = self.restored.get(&(layer, module));
            for (j, (matrix, n)) in ["A", "B"].into_iter().zip(counts).enumerate() {
                match restored.map(|pair| &pair[j]) {
                    Some(s) if s.m.len() == n => out.push((s.m.clone(), s.v.clone())),
                    Some(s) => {
                        return Err(invalid(format!(
                            "restored moments of {} hold {} values, the tensor {n}",
                            lora_tensor_name(layer, module, matrix),
                            s.m.len()
                        )))
                    }
                    None => out.push((vec![0.0; n], vec![0.0; n])),
                }
            }
        }
        Ok(out)
    }

    /// Checks `t` is a CUDA tensor on this optimizer's device.
    fn check_device(&self, t: &Tensor, what: impl Fn() -> String) -> Result<()> {
        match t.device() {
            Device::Cuda(cd) if cd.cuda_stream().context().ordinal() == self.dev.ordinal() => {
                Ok(())
            }
            other => Err(invalid(format!(
                "{} is on {other:?}, expected CUDA device {}",
                what(),
                self.dev.ordinal()
            ))),
        }
    }
}

/// Runs `f` on the contiguous device slice of `t` (a CUDA tensor of element type `T`).
fn with_view<T: CudaDType, R>(
    t: &Tensor,
    f: impl FnOnce(&CudaView<'_, T>) -> Result<R>,
) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cuda(cs) = &*storage else {
        return Err(invalid("tensor is not on a CUDA device"));
    };
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| invalid("tensor is not contiguous"))?;
    let slice = cs.as_cuda_slice::<T>()?;
    let view = slice
        .try_slice(start..end)
        .ok_or_else(|| invalid(format!("layout {start}..{end} exceeds {}", slice.len())))?;
    f(&view)
}

/// A new tensor holding `param` after one AdamW update of state tensor `index` with `grad`.
fn update_tensor(
    dev: &CudaDevice,
    states: &mut PagedAdamWStates,
    scalars: &AdamWStep,
    index: usize,
    param: &Tensor,
    grad: &Tensor,
) -> Result<Tensor> {
    fn run<T: Element + CudaDType>(
        dev: &CudaDevice,
        states: &mut PagedAdamWStates,
        scalars: &AdamWStep,
        index: usize,
        param: &Tensor,
        grad: &Tensor,
    ) -> Result<Tensor> {
        let Device::Cuda(cd) = param.device() else {
            return Err(invalid("parameter is not on a CUDA device"));
        };
        // A copy, so tensors sharing the old parameter's storage keep its values.
        let mut out = with_view::<T, _>(param, |p| dev.stream().clone_dtod(p).map_err(cuda_err))?;
        with_view::<f32, _>(grad, |g| states.step(dev, scalars, index, &mut out, g))?;
        let storage = Storage::Cuda(CudaStorage::wrap_cuda_slice(out, cd.clone()));
        Ok(Tensor::from_storage(
            storage,
            param.shape().clone(),
            BackpropOp::none(),
            false,
        ))
    }
    match param.dtype() {
        DType::F32 => run::<f32>(dev, states, scalars, index, param, grad),
        DType::BF16 => run::<bf16>(dev, states, scalars, index, param, grad),
        other => Err(invalid(format!(
            "adapter parameters are {other:?}, not f32 or bf16"
        ))),
    }
}

impl CheckpointOptimizer for CudaAdamW {
    fn adamw_config(&self) -> &AdamWConfig {
        &self.config
    }

    fn host_moments(&self) -> Result<MomentMap> {
        self.moments()
    }
}

impl Optimizer for CudaAdamW {
    fn base_lr(&self) -> f64 {
        self.config.lr
    }

    fn steps(&self) -> u64 {
        self.steps
    }

    /// Every input is checked before the first kernel is queued, so an invalid call changes
    /// nothing; a CUDA fault part-way leaves the states of the tensors already updated advanced.
    fn step(
        &mut self,
        adapter: &mut LoraAdapter,
        grads: &LoraGrads,
        lr: f64,
        grad_scale: f32,
    ) -> Result<()> {
        check_grads_match(adapter, grads)?;
        let scalars = AdamWConfig { lr, ..self.config }.step(self.steps + 1, grad_scale)?;
        let layout: Layout = adapter
            .pairs()
            .map(|(key, pair)| (key, [pair.a.elem_count(), pair.b.elem_count()]))
            .collect();
        if self.states.is_some() && layout != self.layout {
            return Err(invalid(
                "the adapter's pairs or shapes changed since the first update",
            ));
        }
        let mut work = Vec::with_capacity(layout.len());
        for ((layer, module), pair) in adapter.pairs() {
            let grad = grads
                .get(&(layer, module))
                .ok_or_else(|| invalid(format!("no gradient for layer {layer} {module}")))?;
            for (matrix, p, g) in [("A", &pair.a, &grad.a), ("B", &pair.b, &grad.b)] {
                let name = || lora_tensor_name(layer, module, matrix);
                self.check_device(p, name)?;
                self.check_device(g, || format!("gradient of {}", name()))?;
                if !matches!(p.dtype(), DType::F32 | DType::BF16) {
                    return Err(invalid(format!(
                        "{} is {:?}, not f32 or bf16",
                        name(),
                        p.dtype()
                    )));
                }
            }
            work.push((
                (layer, module),
                pair.clone(),
                grad.a.contiguous()?,
                grad.b.contiguous()?,
            ));
        }
        if self.states.is_none() {
            let moments = self.initial_moments(&layout)?;
            self.states = Some(PagedAdamWStates::from_host(
                &self.dev,
                &self.policy,
                &moments,
            )?);
            self.layout = layout;
            self.restored.clear();
        }
        let states = self
            .states
            .as_mut()
            .ok_or_else(|| invalid("states were not placed"))?;
        let mut updated = Vec::with_capacity(work.len());
        for (i, (key, pair, ga, gb)) in work.into_iter().enumerate() {
            let a = update_tensor(&self.dev, states, &scalars, 2 * i, &pair.a, &ga)?;
            let b = update_tensor(&self.dev, states, &scalars, 2 * i + 1, &pair.b, &gb)?;
            updated.push((key, LoraPair { a, b }));
        }
        for ((layer, module), pair) in updated {
            adapter.set_pair(layer, module, pair)?;
        }
        self.steps += 1;
        Ok(())
    }
}
