//! Fused AdamW (`kernels/adamw.cu`): torch.optim.AdamW's update over a flat tensor of `n` params
//! (f32/bf16/f16) and grads, with f32 moments (`[n]` each) or 8-bit blockwise moments (`[n]` codes
//! and `ceil(n / 256)` absmax per moment, as bitsandbytes' 8-bit optimizers store them). The plain
//! Rust reference and one launcher per kernel over any launch device (the CPU emulation or CUDA).

use super::abi::{QlAdamW8bitParams, QlAdamWParams, QlAdamWScalars};
use super::device::{KernelArg, KernelArgMut, LaunchDevice};
use super::launch::{declare_kernels, Element, LaunchConfig};
use crate::quant::dynamic8::{dynamic_map_signed_ref, torch_linspace_f32};
use crate::{Error, Result};
use std::sync::OnceLock;

declare_kernels! {
    module "adamw";
    /// `k_adamw_f32`: grid-stride, one element per thread per iteration.
    ADAMW_F32 = k_adamw_f32 / qlemu_k_adamw_f32 {
        block: super::launch::BlockShape::Linear { max_threads: 256 }
    };
    /// `k_adamw_8bit`: one CUDA block of 256 threads per state block of 256 elements.
    ADAMW_8BIT = k_adamw_8bit / qlemu_k_adamw_8bit {
        block: super::launch::BlockShape::Exact(256, 1, 1)
    };
}

/// Elements per 8-bit state block (one absmax per block and moment), as bitsandbytes uses.
pub const STATE_BLOCK_ELEMS: usize = 256;
const THREADS: u32 = 256;
/// Enough blocks of `k_adamw_f32` to fill any sm_80..sm_90 GPU; larger tensors grid-stride.
const MAX_F32_BLOCKS: u64 = 8192;
/// Grid-x limit of every CUDA device we target.
const MAX_GRID_X: u64 = (1 << 31) - 1;

/// Hyperparameters of torch.optim.AdamW (amsgrad and maximize off), as Python floats (f64).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWConfig {
    pub lr: f64,
    pub betas: (f64, f64),
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    /// torch.optim.AdamW's defaults.
    fn default() -> Self {
        AdamWConfig {
            lr: 1e-3,
            betas: (0.9, 0.999),
            eps: 1e-8,
            weight_decay: 1e-2,
        }
    }
}

impl AdamWConfig {
    /// The checks torch.optim.AdamW makes, plus finiteness.
    pub fn validate(&self) -> Result<()> {
        const OP: &str = "adamw";
        let (b1, b2) = self.betas;
        let bad = |what: &str, v: f64| Err(Error::invalid(OP, format!("invalid {what}: {v}")));
        if !(self.lr.is_finite() && self.lr >= 0.0) {
            return bad("learning rate", self.lr);
        }
        if !(self.eps.is_finite() && self.eps >= 0.0) {
            return bad("epsilon", self.eps);
        }
        if !(0.0..1.0).contains(&b1) {
            return bad("beta1", b1);
        }
        if !(0.0..1.0).contains(&b2) {
            return bad("beta2", b2);
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return bad("weight decay", self.weight_decay);
        }
        Ok(())
    }

    /// The f32 scalars of update number `step` (1-based, as torch counts after its increment),
    /// with the gradient multiplied by `grad_scale` first (1.0 for none). Bias corrections are
    /// computed in f64 exactly as torch's Python code does (`1 - beta ** step`, `bc2 ** 0.5`),
    /// then each scalar is rounded to f32 once, as ATen's CPU kernels round their scalar arguments.
    pub fn step(&self, step: u64, grad_scale: f32) -> Result<AdamWStep> {
        self.validate()?;
        if step == 0 {
            return Err(Error::invalid("adamw", "steps count from 1"));
        }
        if !(grad_scale.is_finite() && grad_scale >= 0.0) {
            return Err(Error::invalid(
                "adamw",
                format!("grad_scale must be finite and >= 0, got {grad_scale}"),
            ));
        }
        let (b1, b2) = self.betas;
        let t = step as f64;
        let bc1 = 1.0 - b1.powf(t);
        let bc2 = 1.0 - b2.powf(t);
        Ok(AdamWStep {
            s: QlAdamWScalars {
                decay: (1.0 - self.lr * self.weight_decay) as f32,
                one_minus_beta1: (1.0 - b1) as f32,
                beta2: b2 as f32,
                one_minus_beta2: (1.0 - b2) as f32,
                neg_step_size: (-(self.lr / bc1)) as f32,
                bc2_sqrt: bc2.powf(0.5) as f32,
                eps: self.eps as f32,
                grad_scale,
            },
        })
    }
}

/// The validated f32 scalars of one AdamW step (from [`AdamWConfig::step`]), shared by the
/// reference and the launcher (on every device) so that all round the same numbers.
#[derive(Clone, Copy, Debug)]
pub struct AdamWStep {
    s: QlAdamWScalars,
}

impl AdamWStep {
    /// One element of torch's single-tensor AdamW with its f32 roundings; `adamw_element` in
    /// kernels/adamw.cu documents each line and where torch's other paths differ.
    /// Returns the new `(param, m, v)` in f32.
    fn element(&self, p: f32, g: f32, m: f32, v: f32) -> (f32, f32, f32) {
        let s = &self.s;
        let g = g * s.grad_scale;
        let p = p * s.decay;
        let w = s.one_minus_beta1;
        let diff = g - m;
        let m = if w.abs() < 0.5 {
            w.mul_add(diff, m)
        } else {
            (w - 1.0).mul_add(diff, g)
        };
        let v = (s.one_minus_beta2 * g).mul_add(g, v * s.beta2);
        let denom = v.sqrt() / s.bc2_sqrt + s.eps;
        (p + (s.neg_step_size * m) / denom, m, v)
    }
}

/// bitsandbytes' unsigned dynamic 8-bit map (`create_dynamic_map(signed=False)`, its second-moment
/// code book): for exponent `i` in 0..7 the midpoints of `torch.linspace(0.1, 1, 2^(i+1) + 1)`
/// (f32) times `f32(10^(i-6))`, then 0 and 1, sorted ascending (256 values in [0, 1]).
pub fn dynamic_map_unsigned() -> [f32; 256] {
    const SCALES: [f64; 7] = [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0];
    let mut map = [0f32; 256];
    let mut len = 0;
    for (i, &scale) in SCALES.iter().enumerate() {
        let linspace = torch_linspace_f32(0.1, 1.0, (2usize << i) + 1);
        for pair in linspace.windows(2) {
            map[len] = scale as f32 * ((pair[0] + pair[1]) / 2.0);
            len += 1;
        }
    }
    // 254 midpoints, then 0 (already there) and 1.
    map[len + 1] = 1.0;
    map.sort_by(f32::total_cmp);
    map
}

/// The cached unsigned dynamic map (see [`dynamic_map_unsigned`]).
pub fn dynamic_map_unsigned_ref() -> &'static [f32; 256] {
    static MAP: OnceLock<[f32; 256]> = OnceLock::new();
    MAP.get_or_init(dynamic_map_unsigned)
}

/// 8-bit blockwise AdamW moments: `m` with the signed dynamic map, `v` with the unsigned one, one
/// u8 code per element and one f32 absmax per block of [`STATE_BLOCK_ELEMS`].
#[derive(Clone, Debug, PartialEq)]
pub struct AdamW8bitState {
    pub m_q: Vec<u8>,
    pub m_absmax: Vec<f32>,
    pub v_q: Vec<u8>,
    pub v_absmax: Vec<f32>,
}

impl AdamW8bitState {
    /// Zero moments for `n` elements, stored as the kernel stores an all-zero block (absmax 1.0,
    /// the code of 0.0).
    pub fn zeros(n: usize) -> Self {
        let blocks = n.div_ceil(STATE_BLOCK_ELEMS);
        let zero = |code: &[f32; 256]| nearest_code(0.0, code);
        AdamW8bitState {
            m_q: vec![zero(dynamic_map_signed_ref()); n],
            m_absmax: vec![1.0; blocks],
            v_q: vec![zero(dynamic_map_unsigned_ref()); n],
            v_absmax: vec![1.0; blocks],
        }
    }

    /// Dequantized `(m, v)`: `code[q] * absmax` per element.
    pub fn dequantize(&self) -> (Vec<f32>, Vec<f32>) {
        let deq = |q: &[u8], absmax: &[f32], code: &[f32; 256]| -> Vec<f32> {
            q.chunks(STATE_BLOCK_ELEMS)
                .zip(absmax)
                .flat_map(|(block, &a)| block.iter().map(move |&c| code[c as usize] * a))
                .collect()
        };
        (
            deq(&self.m_q, &self.m_absmax, dynamic_map_signed_ref()),
            deq(&self.v_q, &self.v_absmax, dynamic_map_unsigned_ref()),
        )
    }
}

/// Index of the code nearest to `x` with f32-rounded distances, the first on ties
/// (`torch.argmin(|x - code|)`, as bitsandbytes' PyTorch 8-bit optimizer quantizes); NaN → 0.
fn nearest_code(x: f32, code: &[f32; 256]) -> u8 {
    let mut best = 0;
    let mut best_d = (x - code[0]).abs();
    for (i, &c) in code.iter().enumerate().skip(1) {
        let d = (x - c).abs();
        if d < best_d {
            best = i;
            best_d = d;
        }
    }
    best as u8
}

/// Block absmax as the kernel stores it: the NaN-propagating max of `|x|`, 1.0 for a zero block.
fn block_absmax(xs: &[f32]) -> f32 {
    let a = xs.iter().fold(0f32, |acc, &x| {
        let x = x.abs();
        if x.is_nan() || x > acc {
            x
        } else {
            acc
        }
    });
    if a == 0.0 {
        1.0
    } else {
        a
    }
}

/// Buffer lengths of one AdamW call, host or device.
struct Lens {
    param: usize,
    grad: usize,
    /// `(m, v)` for f32 moments, `(m_q, v_q)` codes for 8-bit ones.
    moments: (usize, usize),
    /// `(m_absmax, v_absmax)` (8-bit only).
    absmax: Option<(usize, usize)>,
}

/// Checks every length against `param`'s and returns `n`.
fn check_lens(op: &'static str, lens: Lens) -> Result<usize> {
    let n = lens.param;
    if n == 0 {
        return Err(Error::invalid(op, "empty tensor (kernels need n >= 1)"));
    }
    if n as u64 > i64::MAX as u64 {
        return Err(Error::invalid(op, format!("{n} elements is too many")));
    }
    let check = |what: &str, got: usize, want: usize| {
        if got == want {
            Ok(())
        } else {
            Err(Error::invalid(
                op,
                format!("{what} has {got} elements, expected {want} for {n} params"),
            ))
        }
    };
    check("grad", lens.grad, n)?;
    check("first moment", lens.moments.0, n)?;
    check("second moment", lens.moments.1, n)?;
    if let Some((m_absmax, v_absmax)) = lens.absmax {
        let blocks = n.div_ceil(STATE_BLOCK_ELEMS);
        check("first-moment absmax", m_absmax, blocks)?;
        check("second-moment absmax", v_absmax, blocks)?;
    }
    Ok(n)
}

/// Launch geometry of `k_adamw_f32` for `n` elements (shared by every backend).
pub fn f32_launch(n: usize) -> LaunchConfig {
    let blocks = (n as u64).div_ceil(THREADS as u64).clamp(1, MAX_F32_BLOCKS);
    LaunchConfig::linear(blocks as u32, THREADS)
}

/// Launch geometry of `k_adamw_8bit` for `n` elements: one block per state block.
pub fn launch_8bit(n: usize) -> Result<LaunchConfig> {
    let blocks = (n as u64).div_ceil(STATE_BLOCK_ELEMS as u64);
    if blocks > MAX_GRID_X {
        return Err(Error::invalid(
            "adamw_8bit",
            format!("{blocks} state blocks exceed the grid limit"),
        ));
    }
    let cfg = LaunchConfig::linear(blocks.max(1) as u32, THREADS);
    ADAMW_8BIT.check_launch(&cfg)?;
    Ok(cfg)
}

/// The plain-Rust reference of one AdamW step with f32 moments, all updated in place.
pub fn reference_step<T: Element, G: Element>(
    step: &AdamWStep,
    param: &mut [T],
    grad: &[G],
    m: &mut [f32],
    v: &mut [f32],
) -> Result<()> {
    check_lens(
        "adamw",
        Lens {
            param: param.len(),
            grad: grad.len(),
            moments: (m.len(), v.len()),
            absmax: None,
        },
    )?;
    for (((p, g), m), v) in param.iter_mut().zip(grad).zip(m).zip(v) {
        let (np, nm, nv) = step.element(p.to_f32(), g.to_f32(), *m, *v);
        *p = T::from_f32(np);
        *m = nm;
        *v = nv;
    }
    Ok(())
}

/// The plain-Rust reference of one AdamW step with 8-bit blockwise moments: per block, dequantize
/// (`code[q] * absmax`), update in f32 (the param with the unquantized new moments), requantize
/// with the new block absmax (`x / absmax`, nearest code).
pub fn reference_step_8bit<T: Element, G: Element>(
    step: &AdamWStep,
    param: &mut [T],
    grad: &[G],
    state: &mut AdamW8bitState,
) -> Result<()> {
    check_lens("adamw_8bit", lens_8bit(param.len(), grad.len(), state))?;
    let m_code = dynamic_map_signed_ref();
    let v_code = dynamic_map_unsigned_ref();
    let mut m = Vec::with_capacity(STATE_BLOCK_ELEMS);
    let mut v = Vec::with_capacity(STATE_BLOCK_ELEMS);
    for ((((p, g), mq), vq), (ma, va)) in param
        .chunks_mut(STATE_BLOCK_ELEMS)
        .zip(grad.chunks(STATE_BLOCK_ELEMS))
        .zip(state.m_q.chunks_mut(STATE_BLOCK_ELEMS))
        .zip(state.v_q.chunks_mut(STATE_BLOCK_ELEMS))
        .zip(state.m_absmax.iter_mut().zip(state.v_absmax.iter_mut()))
    {
        m.clear();
        v.clear();
        for (((p, g), &mc), &vc) in p.iter_mut().zip(g).zip(mq.iter()).zip(vq.iter()) {
            let (np, nm, nv) = step.element(
                p.to_f32(),
                g.to_f32(),
                m_code[mc as usize] * *ma,
                v_code[vc as usize] * *va,
            );
            *p = T::from_f32(np);
            m.push(nm);
            v.push(nv);
        }
        *ma = block_absmax(&m);
        *va = block_absmax(&v);
        for (q, &x) in mq.iter_mut().zip(&m) {
            *q = nearest_code(x / *ma, m_code);
        }
        for (q, &x) in vq.iter_mut().zip(&v) {
            *q = nearest_code(x / *va, v_code);
        }
    }
    Ok(())
}

fn lens_8bit(param: usize, grad: usize, state: &AdamW8bitState) -> Lens {
    Lens {
        param,
        grad,
        moments: (state.m_q.len(), state.v_q.len()),
        absmax: Some((state.m_absmax.len(), state.v_absmax.len())),
    }
}

// ---------------------------------------------------------------------------------------------
// Launchers: one per kernel, generic over the launch device (docs/ARCHITECTURE.md, "Launch
// devices").

/// 8-bit blockwise moments on a launch device ([`AdamW8bitState`]'s buffers), with the two code
/// maps the kernel reads.
pub struct DeviceAdamW8bitState<D: LaunchDevice> {
    pub m_q: D::Buffer<u8>,
    pub m_absmax: D::Buffer<f32>,
    pub v_q: D::Buffer<u8>,
    pub v_absmax: D::Buffer<f32>,
    m_code: D::Buffer<f32>,
    v_code: D::Buffer<f32>,
}

impl<D: LaunchDevice> std::fmt::Debug for DeviceAdamW8bitState<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceAdamW8bitState")
            .field("n", &self.m_q.len())
            .field("blocks", &self.m_absmax.len())
            .finish()
    }
}

impl<D: LaunchDevice> DeviceAdamW8bitState<D> {
    /// Copies host moments (e.g. [`AdamW8bitState::zeros`] or a checkpoint) to the device.
    pub fn from_host(dev: &D, state: &AdamW8bitState) -> Result<Self> {
        Ok(DeviceAdamW8bitState {
            m_q: dev.upload(&state.m_q)?,
            m_absmax: dev.upload(&state.m_absmax)?,
            v_q: dev.upload(&state.v_q)?,
            v_absmax: dev.upload(&state.v_absmax)?,
            m_code: dev.upload(dynamic_map_signed_ref())?,
            v_code: dev.upload(dynamic_map_unsigned_ref())?,
        })
    }

    /// Copies the moments back (for checkpoints and tests).
    pub fn to_host(&self, dev: &D) -> Result<AdamW8bitState> {
        Ok(AdamW8bitState {
            m_q: dev.download(&self.m_q)?,
            m_absmax: dev.download(&self.m_absmax)?,
            v_q: dev.download(&self.v_q)?,
            v_absmax: dev.download(&self.v_absmax)?,
        })
    }
}

/// One AdamW step with f32 moments (`k_adamw_f32`), `param`, `m` and `v` updated in place. Any
/// buffer of the device works (on CUDA: a `CudaSlice`, a view of one, managed memory).
pub fn step<D: LaunchDevice, T: Element, G: Element>(
    dev: &D,
    step: &AdamWStep,
    param: &mut (impl KernelArgMut<D, T> + ?Sized),
    grad: &(impl KernelArg<D, G> + ?Sized),
    m: &mut (impl KernelArgMut<D, f32> + ?Sized),
    v: &mut (impl KernelArgMut<D, f32> + ?Sized),
) -> Result<()> {
    let n = check_lens(
        "adamw",
        Lens {
            param: param.len(),
            grad: grad.len(),
            moments: (m.len(), v.len()),
            absmax: None,
        },
    )?;
    let (pp, gp) = (param.ptr_mut(dev), grad.ptr(dev));
    let (mp, vp) = (m.ptr_mut(dev), v.ptr_mut(dev));
    let params = QlAdamWParams {
        param: pp.void_mut(),
        grad: gp.void(),
        m: mp.get_mut(),
        v: vp.get_mut(),
        n: n as i64,
        s: step.s,
        param_dtype: T::DTYPE as i32,
        grad_dtype: G::DTYPE as i32,
    };
    // SAFETY: param, grad, m and v each hold exactly `n` elements of the dtypes named in `params`
    // (checked above); the kernel touches only indices < n, and the guards keep every buffer
    // alive and ordered until the launch is queued.
    unsafe { dev.launch(&ADAMW_F32, &f32_launch(n), &params) }
}

/// One AdamW step with 8-bit blockwise moments (`k_adamw_8bit`), `param` and `state` updated in
/// place.
pub fn step_8bit<D: LaunchDevice, T: Element, G: Element>(
    dev: &D,
    step: &AdamWStep,
    param: &mut (impl KernelArgMut<D, T> + ?Sized),
    grad: &(impl KernelArg<D, G> + ?Sized),
    state: &mut DeviceAdamW8bitState<D>,
) -> Result<()> {
    const OP: &str = "adamw_8bit";
    let n = check_lens(
        OP,
        Lens {
            param: param.len(),
            grad: grad.len(),
            moments: (state.m_q.len(), state.v_q.len()),
            absmax: Some((state.m_absmax.len(), state.v_absmax.len())),
        },
    )?;
    if state.m_code.len() != 256 || state.v_code.len() != 256 {
        return Err(Error::invalid(OP, "code maps must hold 256 values"));
    }
    let cfg = launch_8bit(n)?;
    let (pp, gp) = (param.ptr_mut(dev), grad.ptr(dev));
    let (mqp, vqp) = (state.m_q.ptr_mut(dev), state.v_q.ptr_mut(dev));
    let (map, vap) = (state.m_absmax.ptr_mut(dev), state.v_absmax.ptr_mut(dev));
    let (mcp, vcp) = (state.m_code.ptr(dev), state.v_code.ptr(dev));
    let params = QlAdamW8bitParams {
        param: pp.void_mut(),
        grad: gp.void(),
        m_q: mqp.get_mut(),
        v_q: vqp.get_mut(),
        m_absmax: map.get_mut(),
        v_absmax: vap.get_mut(),
        m_code: mcp.get(),
        v_code: vcp.get(),
        n: n as i64,
        s: step.s,
        param_dtype: T::DTYPE as i32,
        grad_dtype: G::DTYPE as i32,
    };
    // SAFETY: param, grad and the u8 moment codes hold `n` elements, the absmax buffers one per
    // block of 256, the code maps 256 (checked above); the guards keep every buffer alive and
    // ordered until the launch is queued.
    unsafe { dev.launch(&ADAMW_8BIT, &cfg, &params) }
}
