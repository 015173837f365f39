//! The runtime's hot ops through our fused kernels: RMSNorm, RoPE, SwiGLU and causal attention,
//! forward and backward, on candle tensors stored in the compute dtype (docs/ARCHITECTURE.md,
//! "Activation storage"). The kernels run in the compute dtype (f32 or bf16) on the model's CUDA device, or
//! through the CPU emulation of the same `.cu` sources, which is how CI proves this wiring with no
//! GPU ([`KernelPath::Emulated`]).

use candle_core::{DType, Device, Tensor, WithDType};
use half::bf16;

use crate::kernels::attention::{self, AttentionShape, DeviceAttentionInputs};
use crate::kernels::device::{Emulator, Guard, KernelArg, LaunchDevice, Ptr};
use crate::kernels::launch::Element;
use crate::kernels::llama as ops;
use crate::{Error, Result};

/// Where the runtime's RMSNorm, RoPE, SwiGLU and attention run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KernelPath {
    /// candle tensor ops, rounded exactly where torch rounds: the CPU default and the reference.
    #[default]
    TensorOps,
    /// Our kernels through the CPU emulation of `kernels/*.cu` (slow; for tests on the CPU).
    Emulated,
    /// Our kernels launched on the model's CUDA device: the default there (feature `cuda`).
    Cuda,
}

impl KernelPath {
    /// The default for a model on `device`: [`KernelPath::Cuda`] on a CUDA device (unless the
    /// environment sets `QLORA_KERNELS=ops`, for A/B runs), else [`KernelPath::TensorOps`].
    pub fn default_for(device: &Device) -> Result<Self> {
        let forced = std::env::var("QLORA_KERNELS").ok();
        match forced.as_deref() {
            None | Some("") | Some("fused") => {}
            Some("ops") => return Ok(KernelPath::TensorOps),
            Some(other) => {
                return Err(Error::invalid(
                    "QLORA_KERNELS",
                    format!("`{other}` is not `fused` or `ops`"),
                ))
            }
        }
        Ok(if device.is_cuda() {
            KernelPath::Cuda
        } else {
            KernelPath::TensorOps
        })
    }
}

impl std::fmt::Display for KernelPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            KernelPath::TensorOps => "tensor ops",
            KernelPath::Emulated => "fused kernels (CPU emulation)",
            KernelPath::Cuda => "fused CUDA kernels",
        })
    }
}

#[cfg(feature = "cuda")]
pub(crate) trait DeviceBounds:
    candle_core::cuda_backend::CudaDType + cudarc::driver::DeviceRepr
{
}
#[cfg(feature = "cuda")]
impl<T: candle_core::cuda_backend::CudaDType + cudarc::driver::DeviceRepr> DeviceBounds for T {}
#[cfg(not(feature = "cuda"))]
pub(crate) trait DeviceBounds {}
#[cfg(not(feature = "cuda"))]
impl<T> DeviceBounds for T {}

/// An element type the fused path runs in: a compute dtype of the runtime.
pub(crate) trait FusedElement: Element + WithDType + DeviceBounds {}
impl FusedElement for f32 {}
impl FusedElement for bf16 {}

/// Runs the generic `$f::<T>(args)` for the compute dtype `$dtype` (F32 or BF16).
macro_rules! by_dtype {
    ($dtype:expr, $f:ident ( $($arg:expr),* $(,)? )) => {
        match $dtype {
            DType::F32 => $f::<f32>($($arg),*),
            DType::BF16 => $f::<bf16>($($arg),*),
            other => Err(Error::invalid(
                "fused kernels",
                format!("compute dtype {other:?} is not f32 or bf16"),
            )),
        }
    };
}

/// The kernel backend a model runs its fused ops on.
#[derive(Clone, Debug)]
pub(crate) struct Kernels {
    path: KernelPath,
    #[cfg(feature = "cuda")]
    dev: Option<std::sync::Arc<crate::kernels::cuda::CudaDevice>>,
}

impl Kernels {
    /// Checks `path` against the model's `device`: emulation runs on CPU tensors, CUDA kernels
    /// on tensors of a CUDA device (with feature `cuda`).
    pub(crate) fn new(path: KernelPath, device: &Device) -> Result<Self> {
        let bad = |reason: &str| Err(Error::invalid("kernel path", format!("{path}: {reason}")));
        match path {
            KernelPath::TensorOps => {}
            KernelPath::Emulated if !device.is_cpu() => {
                return bad("the emulation runs on CPU tensors; move the model to the CPU")
            }
            KernelPath::Emulated => {}
            KernelPath::Cuda if !device.is_cuda() => {
                return bad("the model is not on a CUDA device")
            }
            KernelPath::Cuda => {
                #[cfg(feature = "cuda")]
                {
                    let dev = crate::kernels::cuda::CudaDevice::from_candle(device)?;
                    return Ok(Kernels {
                        path,
                        dev: Some(std::sync::Arc::new(dev)),
                    });
                }
                #[cfg(not(feature = "cuda"))]
                return bad("this build has no CUDA support (feature `cuda`)");
            }
        }
        Ok(Kernels {
            path,
            #[cfg(feature = "cuda")]
            dev: None,
        })
    }

    pub(crate) fn path(&self) -> KernelPath {
        self.path
    }

    /// Whether the fused ops run (anything but [`KernelPath::TensorOps`]).
    pub(crate) fn fused(&self) -> bool {
        self.path != KernelPath::TensorOps
    }

    #[cfg(feature = "cuda")]
    pub(crate) fn device(&self) -> Result<&crate::kernels::cuda::CudaDevice> {
        self.dev
            .as_deref()
            .ok_or_else(|| Error::invalid("fused kernels", "no CUDA device for the CUDA path"))
    }

    pub(crate) fn unavailable(&self) -> Error {
        Error::invalid(
            "fused kernels",
            format!("{} is not available in this build", self.path),
        )
    }

    /// RMSNorm of `x` `[.., h]` with the frozen `weight` `[h]`: `(y, rstd)`, y shaped as x (in
    /// `dtype`), rstd `[rows]` f32 for the backward.
    pub(crate) fn rms_norm(
        &self,
        dtype: DType,
        x: &Tensor,
        weight: &Tensor,
        eps: f64,
    ) -> Result<(Tensor, Tensor)> {
        by_dtype!(dtype, rms_norm_t(self, x, weight, eps as f32))
    }

    /// The RMSNorm backward: dL/dx from `dy`, the input `x`, `weight` and the forward's `rstd`.
    pub(crate) fn rms_norm_backward(
        &self,
        dtype: DType,
        dy: &Tensor,
        x: &Tensor,
        weight: &Tensor,
        rstd: &Tensor,
    ) -> Result<Tensor> {
        by_dtype!(dtype, rms_norm_backward_t(self, dy, x, weight, rstd))
    }

    /// Rotate-half RoPE (or its inverse, for the gradients) on q `[B, T, q_heads · d]` and
    /// k `[B, T, kv_heads · d]`, token (b, t) at `positions[b · T + t]` of the tables
    /// `[P, d / 2]` (f32 host values). Returns the rotated `(q, k)` as new tensors.
    pub(crate) fn rope(
        &self,
        dtype: DType,
        q: &Tensor,
        k: &Tensor,
        rope: &RopeTables,
        inverse: bool,
    ) -> Result<(Tensor, Tensor)> {
        by_dtype!(dtype, rope_t(self, q, k, rope, inverse))
    }

    /// SwiGLU `silu(g) · u` on same-shaped g and u.
    pub(crate) fn swiglu(&self, dtype: DType, g: &Tensor, u: &Tensor) -> Result<Tensor> {
        by_dtype!(dtype, swiglu_t(self, g, u))
    }

    /// The SwiGLU backward: `(dg, du)` from `dh`.
    pub(crate) fn swiglu_backward(
        &self,
        dtype: DType,
        g: &Tensor,
        u: &Tensor,
        dh: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        by_dtype!(dtype, swiglu_backward_t(self, g, u, dh))
    }

    /// Causal attention over q `[B, Hq, T, D]`, k and v `[B, Hkv, T, D]` with the key padding
    /// mask: `(o, lse)`, o `[B, Hq, T, D]`, lse `[B · Hq · T]` f32.
    pub(crate) fn attention(
        &self,
        dtype: DType,
        qkv: &Qkv<'_>,
        mask: &KeyMask,
    ) -> Result<(Tensor, Tensor)> {
        by_dtype!(dtype, attention_t(self, qkv, mask))
    }

    /// The attention backward from the forward's `o` and `lse` and `d_o`: `(dq, dk, dv)`, dk and
    /// dv at the kv heads (a GQA group's query heads summed).
    pub(crate) fn attention_backward(
        &self,
        dtype: DType,
        qkv: &Qkv<'_>,
        mask: &KeyMask,
        o: &Tensor,
        lse: &Tensor,
        d_o: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        by_dtype!(dtype, attention_backward_t(self, qkv, mask, o, lse, d_o))
    }
}

/// The RoPE cos/sin tables `[P, d / 2]` (values rounded to the compute dtype, as the runtime's
/// tables) and one position per token.
pub(crate) struct RopeTables {
    pub head_dim: usize,
    pub cos: Vec<f32>,
    pub sin: Vec<f32>,
    pub positions: Vec<i32>,
    /// Their device copies, uploaded by the first CUDA RoPE of the batch and reused by every
    /// later one (a layer's forward, its recomputation and its backward).
    #[cfg(feature = "cuda")]
    pub device: std::sync::OnceLock<cuda::DeviceRope>,
}

/// What the fused kernels take for one batch instead of the additive mask and the broadcast RoPE
/// tables: the attention shape, the key padding mask and the half tables with positions.
pub(crate) struct FusedInputs {
    pub shape: AttentionShape,
    pub key_mask: KeyMask,
    pub rope: RopeTables,
}

impl FusedInputs {
    /// The inputs of a batch `[b, t]` at positions `0..t` with key flags `keep` `[b, t]`, when
    /// the model runs its fused kernels and they take its shapes
    /// ([`crate::model::llama::LlamaModel::fused_attention_shape`]).
    pub(crate) fn new(
        model: &crate::model::llama::LlamaModel,
        keep: &[bool],
        b: usize,
        t: usize,
    ) -> Option<Self> {
        model.fused_attention_shape(b, t).map(|shape| FusedInputs {
            shape,
            key_mask: KeyMask(
                (!keep.iter().all(|&k| k)).then(|| keep.iter().map(|&k| u8::from(k)).collect()),
            ),
            rope: model.fused_rope_tables(b, t),
        })
    }
}

/// q, k and v of one attention call and their validated sizes.
pub(crate) struct Qkv<'a> {
    pub shape: AttentionShape,
    pub q: &'a Tensor,
    pub k: &'a Tensor,
    pub v: &'a Tensor,
}

/// The key padding mask `[B, T]` (1 = attend), or none.
#[derive(Clone, Debug)]
pub(crate) struct KeyMask(pub Option<Vec<u8>>);

/// `x` as host values of `T` (flattened, row-major).
pub(crate) fn host<T: FusedElement>(x: &Tensor) -> Result<Vec<T>> {
    Ok(x.to_dtype(<T as WithDType>::DTYPE)?
        .flatten_all()?
        .to_vec1::<T>()?)
}

/// Host values of `T` as a tensor of `T` of `dims` on the CPU.
pub(crate) fn from_host<T: FusedElement>(values: Vec<T>, dims: &[usize]) -> Result<Tensor> {
    Ok(Tensor::from_vec(values, dims, &Device::Cpu)?)
}

/// Runs `$body` with `$dev` bound to the launch device of `$k`'s path: the body is written once
/// and compiled for the emulator and (feature `cuda`) the CUDA device.
macro_rules! on_device {
    ($k:expr, |$dev:ident| $body:expr) => {
        match $k.path() {
            $crate::model::fused::KernelPath::Emulated => {
                let $dev = &$crate::kernels::device::Emulator::default();
                $body
            }
            #[cfg(feature = "cuda")]
            $crate::model::fused::KernelPath::Cuda => {
                let $dev = $k.device()?;
                $body
            }
            _ => Err($k.unavailable()),
        }
    };
}
pub(crate) use on_device;

/// A launch device the runtime's tensors meet its kernels on (docs/ARCHITECTURE.md, "Launch
/// devices"): tensors in, kernel buffers, tensors out. The emulator copies through host vectors;
/// CUDA hands kernels the tensors' own device buffers on candle's stream.
pub(crate) trait TensorDevice: LaunchDevice {
    /// A kernel input made from a tensor.
    type Input<T: FusedElement>: KernelArg<Self, T>;

    /// `t` in `T` for a kernel to read.
    fn input<T: FusedElement>(&self, t: &Tensor) -> Result<Self::Input<T>>;

    /// A copy of `t` in `T` that a kernel may overwrite.
    fn writable<T: FusedElement>(&self, t: &Tensor) -> Result<Self::Buffer<T>>;

    /// A kernel's output as a tensor of `T` of `dims`: activations stay in the compute dtype.
    fn tensor<T: FusedElement>(&self, buf: Self::Buffer<T>, dims: &[usize]) -> Result<Tensor>;

    /// Runs `f` on the batch's RoPE tables `(cos, sin, positions)` on this device.
    fn with_rope<R>(
        &self,
        rope: &RopeTables,
        f: impl FnOnce(&RopeArgs<'_, Self>) -> Result<R>,
    ) -> Result<R>;
}

/// The RoPE tables and positions as kernel arguments.
pub(crate) struct RopeArgs<'a, D: ?Sized> {
    pub cos: &'a dyn KernelArg<D, f32>,
    pub sin: &'a dyn KernelArg<D, f32>,
    pub positions: &'a dyn KernelArg<D, i32>,
}

/// A CPU tensor's own storage as an emulated kernel's input, with no copy: the tensor (kept
/// alive here) and the address and length of its contiguous elements. A tensor of another dtype
/// or layout is converted first, as [`TensorDevice::input`] does on CUDA.
pub(crate) struct HostInput<T> {
    _tensor: Tensor,
    addr: usize,
    len: usize,
    _t: std::marker::PhantomData<T>,
}

impl<T: FusedElement> HostInput<T> {
    fn new(t: &Tensor) -> Result<Self> {
        let t = t.to_dtype(<T as WithDType>::DTYPE)?;
        let t = if t.is_contiguous() { t } else { t.copy()? };
        let (addr, len) = {
            let (storage, layout) = t.storage_and_layout();
            let candle_core::Storage::Cpu(cpu) = &*storage else {
                return Err(Error::invalid(
                    "fused kernels",
                    "the emulation reads CPU tensors only",
                ));
            };
            let (start, end) = layout.contiguous_offsets().ok_or_else(|| {
                Error::invalid("fused kernels", "a copied tensor is not contiguous")
            })?;
            let elements = &cpu.as_slice::<T>()?[start..end];
            (elements.as_ptr() as usize, elements.len())
        };
        Ok(HostInput {
            _tensor: t,
            addr,
            len,
            _t: std::marker::PhantomData,
        })
    }
}

impl<T: FusedElement> KernelArg<Emulator, T> for HostInput<T> {
    fn len(&self) -> usize {
        self.len
    }
    fn ptr<'a>(&'a self, _dev: &'a Emulator) -> Ptr<'a> {
        // The elements live as long as `_tensor` (candle storage is not resized or written while a
        // tensor holds it), and emulated launches finish before they return.
        Ptr::new(self.addr, Guard::Borrow(std::marker::PhantomData))
    }
}

impl TensorDevice for Emulator {
    type Input<T: FusedElement> = HostInput<T>;

    fn input<T: FusedElement>(&self, t: &Tensor) -> Result<HostInput<T>> {
        HostInput::new(t)
    }

    fn writable<T: FusedElement>(&self, t: &Tensor) -> Result<Vec<T>> {
        host(t)
    }

    fn tensor<T: FusedElement>(&self, buf: Vec<T>, dims: &[usize]) -> Result<Tensor> {
        from_host(buf, dims)
    }

    fn with_rope<R>(
        &self,
        rope: &RopeTables,
        f: impl FnOnce(&RopeArgs<'_, Self>) -> Result<R>,
    ) -> Result<R> {
        f(&RopeArgs {
            cos: &rope.cos,
            sin: &rope.sin,
            positions: &rope.positions,
        })
    }
}

fn rms_norm_on<D: TensorDevice, T: FusedElement>(
    dev: &D,
    x: &Tensor,
    weight: &Tensor,
    eps: f32,
) -> Result<(Tensor, Tensor)> {
    let h = weight.elem_count();
    let (xs, ws) = (dev.input::<T>(x)?, dev.input::<T>(weight)?);
    let (y, rstd) = ops::rmsnorm_forward(dev, &xs, &ws, h, eps)?;
    let rows = rstd.len();
    Ok((dev.tensor(y, x.dims())?, dev.tensor(rstd, &[rows])?))
}

fn rms_norm_t<T: FusedElement>(
    k: &Kernels,
    x: &Tensor,
    weight: &Tensor,
    eps: f32,
) -> Result<(Tensor, Tensor)> {
    on_device!(k, |dev| rms_norm_on::<_, T>(dev, x, weight, eps))
}

fn rms_norm_backward_on<D: TensorDevice, T: FusedElement>(
    dev: &D,
    dy: &Tensor,
    x: &Tensor,
    weight: &Tensor,
    rstd: &Tensor,
) -> Result<Tensor> {
    let h = weight.elem_count();
    let (dys, xs, ws) = (
        dev.input::<T>(dy)?,
        dev.input::<T>(x)?,
        dev.input::<T>(weight)?,
    );
    let rs = dev.input::<f32>(rstd)?;
    let (dx, _dw) = ops::rmsnorm_backward(dev, &dys, &xs, &ws, &rs, h)?;
    dev.tensor(dx, x.dims())
}

fn rms_norm_backward_t<T: FusedElement>(
    k: &Kernels,
    dy: &Tensor,
    x: &Tensor,
    weight: &Tensor,
    rstd: &Tensor,
) -> Result<Tensor> {
    on_device!(k, |dev| rms_norm_backward_on::<_, T>(
        dev, dy, x, weight, rstd
    ))
}

/// `(q_heads, kv_heads)` of q and k `[.., heads · d]` for RoPE.
fn rope_heads(q: &Tensor, k: &Tensor, rope: &RopeTables) -> Result<(usize, usize)> {
    let d = rope.head_dim.max(1);
    let (q_last, k_last) = (
        q.dim(candle_core::D::Minus1)?,
        k.dim(candle_core::D::Minus1)?,
    );
    if q_last % d != 0 || k_last % d != 0 {
        return Err(Error::invalid(
            "rope",
            format!("q rows of {q_last} and k rows of {k_last} are not whole heads of {d}"),
        ));
    }
    Ok((q_last / d, k_last / d))
}

fn rope_on<D: TensorDevice, T: FusedElement>(
    dev: &D,
    q: &Tensor,
    key: &Tensor,
    rope: &RopeTables,
    inverse: bool,
) -> Result<(Tensor, Tensor)> {
    let (q_heads, kv_heads) = rope_heads(q, key, rope)?;
    // Host positions are checked here: on the device a bad one would only poison its token.
    check_rope_positions(rope)?;
    let (mut qs, mut ks) = (dev.writable::<T>(q)?, dev.writable::<T>(key)?);
    dev.with_rope(rope, |t| {
        ops::rope(
            dev,
            &mut qs,
            &mut ks,
            t.cos,
            t.sin,
            t.positions,
            q_heads,
            kv_heads,
            rope.head_dim,
            inverse,
        )
    })?;
    Ok((dev.tensor(qs, q.dims())?, dev.tensor(ks, key.dims())?))
}

/// Every position indexes the tables' rows.
fn check_rope_positions(rope: &RopeTables) -> Result<()> {
    let rows = rope.cos.len() / (rope.head_dim / 2).max(1);
    match rope
        .positions
        .iter()
        .find(|&&p| p < 0 || p as usize >= rows)
    {
        Some(p) => Err(Error::invalid(
            "rope",
            format!("position {p} outside the {rows} rows of the cos/sin tables"),
        )),
        None => Ok(()),
    }
}

fn rope_t<T: FusedElement>(
    k: &Kernels,
    q: &Tensor,
    key: &Tensor,
    rope: &RopeTables,
    inverse: bool,
) -> Result<(Tensor, Tensor)> {
    on_device!(k, |dev| rope_on::<_, T>(dev, q, key, rope, inverse))
}

fn swiglu_on<D: TensorDevice, T: FusedElement>(dev: &D, g: &Tensor, u: &Tensor) -> Result<Tensor> {
    let (gs, us) = (dev.input::<T>(g)?, dev.input::<T>(u)?);
    let h = ops::swiglu_forward(dev, &gs, &us)?;
    dev.tensor(h, g.dims())
}

fn swiglu_t<T: FusedElement>(k: &Kernels, g: &Tensor, u: &Tensor) -> Result<Tensor> {
    on_device!(k, |dev| swiglu_on::<_, T>(dev, g, u))
}

fn swiglu_backward_on<D: TensorDevice, T: FusedElement>(
    dev: &D,
    g: &Tensor,
    u: &Tensor,
    dh: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let (gs, us, dhs) = (dev.input::<T>(g)?, dev.input::<T>(u)?, dev.input::<T>(dh)?);
    let (dg, du) = ops::swiglu_backward(dev, &gs, &us, &dhs)?;
    Ok((dev.tensor(dg, g.dims())?, dev.tensor(du, g.dims())?))
}

fn swiglu_backward_t<T: FusedElement>(
    k: &Kernels,
    g: &Tensor,
    u: &Tensor,
    dh: &Tensor,
) -> Result<(Tensor, Tensor)> {
    on_device!(k, |dev| swiglu_backward_on::<_, T>(dev, g, u, dh))
}

/// q, k and v of `qkv` in `T` and the key mask on `dev`, for the attention kernels.
type AttentionOperands<D, T> = (
    <D as TensorDevice>::Input<T>,
    <D as TensorDevice>::Input<T>,
    <D as TensorDevice>::Input<T>,
    Option<<D as LaunchDevice>::Buffer<u8>>,
);

fn attention_operands<D: TensorDevice, T: FusedElement>(
    dev: &D,
    qkv: &Qkv<'_>,
    mask: &KeyMask,
) -> Result<AttentionOperands<D, T>> {
    let mask = match &mask.0 {
        Some(m) => Some(dev.upload(m)?),
        None => None,
    };
    Ok((
        dev.input::<T>(qkv.q)?,
        dev.input::<T>(qkv.k)?,
        dev.input::<T>(qkv.v)?,
        mask,
    ))
}

/// The kernels' view of [`attention_operands`].
fn attention_inputs<D: TensorDevice, T: FusedElement>(
    (q, k, v, m): &AttentionOperands<D, T>,
) -> DeviceAttentionInputs<'_, D, T> {
    DeviceAttentionInputs {
        q,
        k,
        v,
        key_mask: m.as_ref().map(|m| m as &dyn KernelArg<D, u8>),
    }
}

fn attention_on<D: TensorDevice, T: FusedElement>(
    dev: &D,
    qkv: &Qkv<'_>,
    mask: &KeyMask,
) -> Result<(Tensor, Tensor)> {
    let shape = qkv.shape;
    let operands = attention_operands::<D, T>(dev, qkv, mask)?;
    let inputs = attention_inputs(&operands);
    let (o, lse) = attention::attention_forward(dev, &shape, &inputs)?;
    Ok((
        dev.tensor(o, qkv.q.dims())?,
        dev.tensor(lse, &[shape.rows()])?,
    ))
}

fn attention_t<T: FusedElement>(
    k: &Kernels,
    qkv: &Qkv<'_>,
    mask: &KeyMask,
) -> Result<(Tensor, Tensor)> {
    on_device!(k, |dev| attention_on::<_, T>(dev, qkv, mask))
}

fn attention_backward_on<D: TensorDevice, T: FusedElement>(
    dev: &D,
    qkv: &Qkv<'_>,
    mask: &KeyMask,
    o: &Tensor,
    lse: &Tensor,
    d_o: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    let shape = qkv.shape;
    let operands = attention_operands::<D, T>(dev, qkv, mask)?;
    let inputs = attention_inputs(&operands);
    let (os, dos, ls) = (
        dev.input::<T>(o)?,
        dev.input::<T>(d_o)?,
        dev.input::<f32>(lse)?,
    );
    let (dq, dk, dv) = attention::attention_backward(dev, &shape, &inputs, &os, &ls, &dos)?;
    Ok((
        dev.tensor(dq, qkv.q.dims())?,
        dev.tensor(dk, qkv.k.dims())?,
        dev.tensor(dv, qkv.v.dims())?,
    ))
}

fn attention_backward_t<T: FusedElement>(
    k: &Kernels,
    qkv: &Qkv<'_>,
    mask: &KeyMask,
    o: &Tensor,
    lse: &Tensor,
    d_o: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    on_device!(k, |dev| attention_backward_on::<_, T>(
        dev, qkv, mask, o, lse, d_o
    ))
}

/// The CUDA side: tensors in, kernels on candle's stream, tensors out, with no host round trip.
#[cfg(feature = "cuda")]
pub(crate) mod cuda {
    use super::*;
    use crate::kernels::cuda::{cuda_err, storage_slice, CudaDevice};
    use cudarc::driver::{CudaSlice, DevicePtr};

    /// `x` in `T` as one whole contiguous device buffer (a fresh copy unless it already is one),
    /// as [`storage_slice`] hands kernels their inputs.
    pub(crate) fn operand<T: FusedElement>(x: &Tensor) -> Result<Tensor> {
        let t = x.to_dtype(<T as WithDType>::DTYPE)?;
        let whole = {
            let (s, l) = t.storage_and_layout();
            storage_slice::<T>(&s, l).is_ok()
        };
        if whole {
            Ok(t)
        } else {
            Ok(t.copy()?)
        }
    }

    /// Runs `f` on the device buffer of `t` (made by [`operand`]).
    pub(crate) fn read<T: FusedElement, R>(
        t: &Tensor,
        f: impl FnOnce(&CudaSlice<T>) -> Result<R>,
    ) -> Result<R> {
        let (s, l) = t.storage_and_layout();
        f(storage_slice::<T>(&s, l)?)
    }

    /// A device copy of `x` in `T` that a kernel may overwrite.
    pub(crate) fn writable<T: FusedElement>(dev: &CudaDevice, x: &Tensor) -> Result<CudaSlice<T>> {
        let t = operand::<T>(x)?;
        read::<T, _>(&t, |s| dev.stream().clone_dtod(s).map_err(cuda_err))
    }

    /// A kernel's output buffer as a tensor of `T` of `dims`, on the buffer itself.
    pub(crate) fn tensor<T: FusedElement>(
        dev: &CudaDevice,
        slice: CudaSlice<T>,
        dims: &[usize],
    ) -> Result<Tensor> {
        dev.tensor_from_slice(slice, dims)
    }

    /// A tensor's own device buffer as a kernel input: the tensor (kept alive here) and the
    /// address and length of its whole contiguous storage.
    pub(crate) struct TensorInput<T> {
        _tensor: Tensor,
        addr: usize,
        len: usize,
        _t: std::marker::PhantomData<T>,
    }

    impl<T: FusedElement> KernelArg<CudaDevice, T> for TensorInput<T> {
        fn len(&self) -> usize {
            self.len
        }
        fn ptr<'a>(&'a self, _dev: &'a CudaDevice) -> Ptr<'a> {
            // The buffer lives as long as `_tensor`; kernels and candle share one stream (a
            // `Kernels` device is made by `CudaDevice::from_candle`), so stream order is the
            // only ordering a launch needs.
            Ptr::new(self.addr, Guard::Borrow(std::marker::PhantomData))
        }
    }

    impl TensorDevice for CudaDevice {
        type Input<T: FusedElement> = TensorInput<T>;

        fn input<T: FusedElement>(&self, t: &Tensor) -> Result<TensorInput<T>> {
            let t = operand::<T>(t)?;
            let (addr, len) = read::<T, _>(&t, |s| {
                let (addr, _guard) = s.device_ptr(self.stream());
                Ok((addr as usize, s.len()))
            })?;
            Ok(TensorInput {
                _tensor: t,
                addr,
                len,
                _t: std::marker::PhantomData,
            })
        }

        fn writable<T: FusedElement>(&self, t: &Tensor) -> Result<CudaSlice<T>> {
            writable::<T>(self, t)
        }

        fn tensor<T: FusedElement>(&self, buf: CudaSlice<T>, dims: &[usize]) -> Result<Tensor> {
            tensor::<T>(self, buf, dims)
        }

        fn with_rope<R>(
            &self,
            rope: &RopeTables,
            f: impl FnOnce(&RopeArgs<'_, Self>) -> Result<R>,
        ) -> Result<R> {
            let tables = match rope.device.get() {
                Some(t) => t,
                None => {
                    let uploaded = DeviceRope {
                        cos: self.upload(&rope.cos)?,
                        sin: self.upload(&rope.sin)?,
                        positions: self.upload(&rope.positions)?,
                    };
                    rope.device.get_or_init(|| uploaded)
                }
            };
            f(&RopeArgs {
                cos: &tables.cos,
                sin: &tables.sin,
                positions: &tables.positions,
            })
        }
    }

    /// [`RopeTables`] on the device.
    pub(crate) struct DeviceRope {
        cos: CudaSlice<f32>,
        sin: CudaSlice<f32>,
        positions: CudaSlice<i32>,
    }
}
