//! The runtime's hot ops through our fused kernels: RMSNorm, RoPE, SwiGLU and causal attention,
//! forward and backward, on candle tensors (f32 holding compute-dtype values, as the runtime keeps
//! activations). The kernels run in the compute dtype (f32 or bf16) on the model's CUDA device, or
//! through the CPU emulation of the same `.cu` sources, which is how CI proves this wiring with no
//! GPU ([`KernelPath::Emulated`]).

use candle_core::{DType, Device, Tensor, WithDType};
use half::bf16;

use crate::kernels::attention::{self, AttentionShape};
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

    fn unavailable(&self) -> Error {
        Error::invalid(
            "fused kernels",
            format!("{} is not available in this build", self.path),
        )
    }

    /// RMSNorm of `x` `[.., h]` with the frozen `weight` `[h]`: `(y, rstd)`, y shaped as x (f32
    /// holding `dtype` values), rstd `[rows]` f32 for the backward.
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

/// Host values of `T` as an f32 tensor of `dims` on the CPU.
pub(crate) fn from_host<T: FusedElement>(values: Vec<T>, dims: &[usize]) -> Result<Tensor> {
    Ok(Tensor::from_vec(values, dims, &Device::Cpu)?.to_dtype(DType::F32)?)
}

fn rms_norm_t<T: FusedElement>(
    k: &Kernels,
    x: &Tensor,
    weight: &Tensor,
    eps: f32,
) -> Result<(Tensor, Tensor)> {
    let h = weight.elem_count();
    let rows = x.elem_count() / h.max(1);
    match k.path {
        KernelPath::Emulated => {
            let (y, rstd) = ops::rmsnorm_forward_emulated::<T>(&host(x)?, &host(weight)?, h, eps)?;
            Ok((
                from_host(y, x.dims())?,
                Tensor::from_vec(rstd, rows, &Device::Cpu)?,
            ))
        }
        #[cfg(feature = "cuda")]
        KernelPath::Cuda => cuda::rms_norm::<T>(k.device()?, x, weight, eps),
        _ => Err(k.unavailable()),
    }
}

fn rms_norm_backward_t<T: FusedElement>(
    k: &Kernels,
    dy: &Tensor,
    x: &Tensor,
    weight: &Tensor,
    rstd: &Tensor,
) -> Result<Tensor> {
    let h = weight.elem_count();
    match k.path {
        KernelPath::Emulated => {
            let (dx, _dw) = ops::rmsnorm_backward_emulated::<T>(
                &host(dy)?,
                &host(x)?,
                &host(weight)?,
                &rstd.flatten_all()?.to_vec1::<f32>()?,
                h,
            )?;
            from_host(dx, x.dims())
        }
        #[cfg(feature = "cuda")]
        KernelPath::Cuda => cuda::rms_norm_backward::<T>(k.device()?, dy, x, weight, rstd),
        _ => Err(k.unavailable()),
    }
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

fn rope_t<T: FusedElement>(
    k: &Kernels,
    q: &Tensor,
    key: &Tensor,
    rope: &RopeTables,
    inverse: bool,
) -> Result<(Tensor, Tensor)> {
    let (q_heads, kv_heads) = rope_heads(q, key, rope)?;
    match k.path {
        KernelPath::Emulated => {
            let (mut qv, mut kv) = (host::<T>(q)?, host::<T>(key)?);
            ops::rope_emulated::<T>(
                &mut qv,
                &mut kv,
                &rope.cos,
                &rope.sin,
                &rope.positions,
                q_heads,
                kv_heads,
                rope.head_dim,
                inverse,
            )?;
            Ok((from_host(qv, q.dims())?, from_host(kv, key.dims())?))
        }
        #[cfg(feature = "cuda")]
        KernelPath::Cuda => {
            cuda::rope::<T>(k.device()?, q, key, rope, (q_heads, kv_heads), inverse)
        }
        _ => Err(k.unavailable()),
    }
}

fn swiglu_t<T: FusedElement>(k: &Kernels, g: &Tensor, u: &Tensor) -> Result<Tensor> {
    match k.path {
        KernelPath::Emulated => {
            let h = ops::swiglu_forward_emulated::<T>(&host(g)?, &host(u)?)?;
            from_host(h, g.dims())
        }
        #[cfg(feature = "cuda")]
        KernelPath::Cuda => cuda::swiglu::<T>(k.device()?, g, u),
        _ => Err(k.unavailable()),
    }
}

fn swiglu_backward_t<T: FusedElement>(
    k: &Kernels,
    g: &Tensor,
    u: &Tensor,
    dh: &Tensor,
) -> Result<(Tensor, Tensor)> {
    match k.path {
        KernelPath::Emulated => {
            let (dg, du) = ops::swiglu_backward_emulated::<T>(&host(g)?, &host(u)?, &host(dh)?)?;
            Ok((from_host(dg, g.dims())?, from_host(du, g.dims())?))
        }
        #[cfg(feature = "cuda")]
        KernelPath::Cuda => cuda::swiglu_backward::<T>(k.device()?, g, u, dh),
        _ => Err(k.unavailable()),
    }
}

fn attention_t<T: FusedElement>(
    k: &Kernels,
    qkv: &Qkv<'_>,
    mask: &KeyMask,
) -> Result<(Tensor, Tensor)> {
    let shape = qkv.shape;
    match k.path {
        KernelPath::Emulated => {
            let (q, kk, v) = (host::<T>(qkv.q)?, host::<T>(qkv.k)?, host::<T>(qkv.v)?);
            let inputs = attention::AttentionInputs {
                q: &q,
                k: &kk,
                v: &v,
                key_mask: mask.0.as_deref(),
            };
            let (o, lse) = attention::attention_forward_emulated::<T>(&shape, &inputs)?;
            Ok((
                from_host(o, qkv.q.dims())?,
                Tensor::from_vec(lse, shape.rows(), &Device::Cpu)?,
            ))
        }
        #[cfg(feature = "cuda")]
        KernelPath::Cuda => cuda::attention::<T>(k.device()?, qkv, mask),
        _ => Err(k.unavailable()),
    }
}

fn attention_backward_t<T: FusedElement>(
    k: &Kernels,
    qkv: &Qkv<'_>,
    mask: &KeyMask,
    o: &Tensor,
    lse: &Tensor,
    d_o: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    let shape = qkv.shape;
    match k.path {
        KernelPath::Emulated => {
            let (q, kk, v) = (host::<T>(qkv.q)?, host::<T>(qkv.k)?, host::<T>(qkv.v)?);
            let inputs = attention::AttentionInputs {
                q: &q,
                k: &kk,
                v: &v,
                key_mask: mask.0.as_deref(),
            };
            let (dq, dk, dv) = attention::attention_backward_emulated::<T>(
                &shape,
                &inputs,
                &host::<T>(o)?,
                &lse.flatten_all()?.to_vec1::<f32>()?,
                &host::<T>(d_o)?,
            )?;
            Ok((
                from_host(dq, qkv.q.dims())?,
                from_host(dk, qkv.k.dims())?,
                from_host(dv, qkv.v.dims())?,
            ))
        }
        #[cfg(feature = "cuda")]
        KernelPath::Cuda => cuda::attention_backward::<T>(k.device()?, qkv, mask, o, lse, d_o),
        _ => Err(k.unavailable()),
    }
}

/// The CUDA side: tensors in, kernels on candle's stream, tensors out, with no host round trip.
#[cfg(feature = "cuda")]
pub(crate) mod cuda {
    use super::*;
    use crate::kernels::attention::DeviceAttentionInputs;
    use crate::kernels::cuda::{cuda_err, storage_slice, CudaDevice};
    use cudarc::driver::CudaSlice;

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

    /// An uninitialised device buffer of `n` elements, for a kernel to fill.
    pub(crate) fn output<T: FusedElement>(dev: &CudaDevice, n: usize) -> Result<CudaSlice<T>> {
        // SAFETY: every caller passes the buffer to a kernel that writes all `n` elements before
        // anything reads it.
        unsafe { dev.stream().alloc::<T>(n) }.map_err(cuda_err)
    }

    /// A kernel's output buffer as an f32 tensor of `dims` (f32 holding `T` values).
    pub(crate) fn tensor<T: FusedElement>(
        dev: &CudaDevice,
        slice: CudaSlice<T>,
        dims: &[usize],
    ) -> Result<Tensor> {
        Ok(dev.tensor_from_slice(slice, dims)?.to_dtype(DType::F32)?)
    }

    pub(super) fn rms_norm<T: FusedElement>(
        dev: &CudaDevice,
        x: &Tensor,
        weight: &Tensor,
        eps: f32,
    ) -> Result<(Tensor, Tensor)> {
        let h = weight.elem_count();
        let (x_t, w_t) = (operand::<T>(x)?, operand::<T>(weight)?);
        let (y, rstd) = read::<T, _>(&x_t, |xs| {
            read::<T, _>(&w_t, |ws| {
                ops::rmsnorm_forward_cuda::<T>(dev, xs, ws, h, eps)
            })
        })?;
        let rows = rstd.len();
        Ok((tensor(dev, y, x.dims())?, tensor(dev, rstd, &[rows])?))
    }

    pub(super) fn rms_norm_backward<T: FusedElement>(
        dev: &CudaDevice,
        dy: &Tensor,
        x: &Tensor,
        weight: &Tensor,
        rstd: &Tensor,
    ) -> Result<Tensor> {
        let h = weight.elem_count();
        let (dy_t, x_t, w_t) = (operand::<T>(dy)?, operand::<T>(x)?, operand::<T>(weight)?);
        let rstd_t = operand::<f32>(rstd)?;
        let (dx, _dw) = read::<T, _>(&dy_t, |dys| {
            read::<T, _>(&x_t, |xs| {
                read::<T, _>(&w_t, |ws| {
                    read::<f32, _>(&rstd_t, |rs| {
                        ops::rmsnorm_backward_cuda::<T>(dev, dys, xs, ws, rs, h)
                    })
                })
            })
        })?;
        tensor(dev, dx, x.dims())
    }

    /// [`RopeTables`] on the device.
    pub(crate) struct DeviceRope {
        cos: CudaSlice<f32>,
        sin: CudaSlice<f32>,
        positions: CudaSlice<i32>,
    }

    pub(super) fn rope<T: FusedElement>(
        dev: &CudaDevice,
        q: &Tensor,
        k: &Tensor,
        rope: &RopeTables,
        (q_heads, kv_heads): (usize, usize),
        inverse: bool,
    ) -> Result<(Tensor, Tensor)> {
        let mut qs = writable::<T>(dev, q)?;
        let mut ks = writable::<T>(dev, k)?;
        let tables = match rope.device.get() {
            Some(t) => t,
            None => {
                let stream = dev.stream();
                let uploaded = DeviceRope {
                    cos: stream.clone_htod(&rope.cos).map_err(cuda_err)?,
                    sin: stream.clone_htod(&rope.sin).map_err(cuda_err)?,
                    positions: stream.clone_htod(&rope.positions).map_err(cuda_err)?,
                };
                rope.device.get_or_init(|| uploaded)
            }
        };
        ops::rope_cuda::<T>(
            dev,
            &mut qs,
            &mut ks,
            &tables.cos,
            &tables.sin,
            &tables.positions,
            q_heads,
            kv_heads,
            rope.head_dim,
            inverse,
        )?;
        Ok((tensor(dev, qs, q.dims())?, tensor(dev, ks, k.dims())?))
    }

    pub(super) fn swiglu<T: FusedElement>(
        dev: &CudaDevice,
        g: &Tensor,
        u: &Tensor,
    ) -> Result<Tensor> {
        let (g_t, u_t) = (operand::<T>(g)?, operand::<T>(u)?);
        let h = read::<T, _>(&g_t, |gs| {
            read::<T, _>(&u_t, |us| ops::swiglu_forward_cuda::<T>(dev, gs, us))
        })?;
        tensor(dev, h, g.dims())
    }

    pub(super) fn swiglu_backward<T: FusedElement>(
        dev: &CudaDevice,
        g: &Tensor,
        u: &Tensor,
        dh: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let (g_t, u_t, dh_t) = (operand::<T>(g)?, operand::<T>(u)?, operand::<T>(dh)?);
        let (dg, du) = read::<T, _>(&g_t, |gs| {
            read::<T, _>(&u_t, |us| {
                read::<T, _>(&dh_t, |dhs| {
                    ops::swiglu_backward_cuda::<T>(dev, gs, us, dhs)
                })
            })
        })?;
        Ok((tensor(dev, dg, g.dims())?, tensor(dev, du, g.dims())?))
    }

    /// q, k, v (and the mask) as device buffers, for `f`.
    fn with_qkv<T: FusedElement, R>(
        dev: &CudaDevice,
        qkv: &Qkv<'_>,
        mask: &KeyMask,
        f: impl FnOnce(&DeviceAttentionInputs<'_, T>) -> Result<R>,
    ) -> Result<R> {
        let (q_t, k_t, v_t) = (
            operand::<T>(qkv.q)?,
            operand::<T>(qkv.k)?,
            operand::<T>(qkv.v)?,
        );
        let mask = match &mask.0 {
            Some(m) => Some(dev.stream().clone_htod(m).map_err(cuda_err)?),
            None => None,
        };
        read::<T, _>(&q_t, |q| {
            read::<T, _>(&k_t, |k| {
                read::<T, _>(&v_t, |v| {
                    f(&DeviceAttentionInputs {
                        q,
                        k,
                        v,
                        key_mask: mask.as_ref(),
                    })
                })
            })
        })
    }

    pub(super) fn attention<T: FusedElement>(
        dev: &CudaDevice,
        qkv: &Qkv<'_>,
        mask: &KeyMask,
    ) -> Result<(Tensor, Tensor)> {
        let shape = qkv.shape;
        let (o, lse) = with_qkv::<T, _>(dev, qkv, mask, |inputs| {
            attention::attention_forward_cuda::<T>(dev, &shape, inputs)
        })?;
        Ok((
            tensor(dev, o, qkv.q.dims())?,
            tensor(dev, lse, &[shape.rows()])?,
        ))
    }

    pub(super) fn attention_backward<T: FusedElement>(
        dev: &CudaDevice,
        qkv: &Qkv<'_>,
        mask: &KeyMask,
        o: &Tensor,
        lse: &Tensor,
        d_o: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let shape = qkv.shape;
        let (o_t, do_t, lse_t) = (operand::<T>(o)?, operand::<T>(d_o)?, operand::<f32>(lse)?);
        let mut grads = attention::DeviceAttentionGrads::<T>::alloc(dev, &shape)?;
        with_qkv::<T, _>(dev, qkv, mask, |inputs| {
            read::<T, _>(&o_t, |os| {
                read::<T, _>(&do_t, |dos| {
                    read::<f32, _>(&lse_t, |ls| {
                        attention::attention_backward_cuda_into::<T>(
                            dev,
                            &shape,
                            inputs,
                            (os, ls, dos),
                            &mut grads,
                        )
                    })
                })
            })
        })?;
        let attention::DeviceAttentionGrads { dq, dk, dv, .. } = grads;
        Ok((
            tensor(dev, dq, qkv.q.dims())?,
            tensor(dev, dk, qkv.k.dims())?,
            tensor(dev, dv, qkv.v.dims())?,
        ))
    }
}
