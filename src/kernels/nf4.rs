//! Launchers for `kernels/nf4.cu`: NF4 blockwise quantize and dequantize (f32 or double-quantized
//! scales), for the CPU emulation and CUDA (raw device buffers, or an `Nf4DeviceTensor` kept as
//! candle tensors). Shapes: a flat tensor of `n` elements, `(n + 1) / 2` packed bytes,
//! `ceil(n / blocksize)` block scales. The Rust reference is `crate::quant::nf4`.

use super::abi::{QlNf4DequantizeParams, QlNf4QuantizeParams};
use super::device::{KernelArg, KernelArgMut, LaunchDevice};
use super::launch::{declare_kernels, Element, LaunchConfig};
use crate::{Error, Result};
use std::ffi::c_void;

declare_kernels! {
    module "nf4";
    /// `k_nf4_quantize`: one warp per quantization block.
    QUANTIZE = k_nf4_quantize / qlemu_k_nf4_quantize {
        block: super::launch::BlockShape::Exact(256, 1, 1)
    };
    /// `k_nf4_dequantize`: one thread per 4 packed bytes.
    DEQUANTIZE = k_nf4_dequantize / qlemu_k_nf4_dequantize {
        block: super::launch::BlockShape::Exact(256, 1, 1)
    };
}

const THREADS: u32 = 256;
const WARPS_PER_BLOCK: u64 = THREADS as u64 / 32;
const PACKED_BYTES_PER_THREAD: u64 = 4;
/// Grid-x limit of every CUDA device we target.
const MAX_GRID_X: u64 = (1 << 31) - 1;

/// Validated sizes of one NF4 tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Nf4Layout {
    pub n: usize,
    pub blocksize: usize,
}

impl Nf4Layout {
    pub fn new(op: &'static str, n: usize, blocksize: usize) -> Result<Self> {
        crate::quant::nf4::check_blocksize(op, blocksize)?;
        if n == 0 {
            return Err(Error::invalid(op, "empty tensor (kernels need n >= 1)"));
        }
        if n as u64 > i64::MAX as u64 / 2 {
            return Err(Error::invalid(op, format!("{n} elements is too many")));
        }
        Ok(Nf4Layout { n, blocksize })
    }

    pub fn blocks(&self) -> usize {
        self.n.div_ceil(self.blocksize)
    }

    pub fn packed_bytes(&self) -> usize {
        self.n.div_ceil(2)
    }

    fn check_len(&self, op: &'static str, what: &str, got: usize, want: usize) -> Result<()> {
        if got == want {
            Ok(())
        } else {
            Err(Error::invalid(
                op,
                format!(
                    "{what} has {got} elements, expected {want} for n = {} and blocksize {}",
                    self.n, self.blocksize
                ),
            ))
        }
    }
}

/// Launch geometry of `k_nf4_quantize` (shared by every backend, so the emulation runs the
/// configuration the GPU runs).
pub fn quantize_launch(layout: &Nf4Layout) -> Result<LaunchConfig> {
    let blocks = (layout.blocks() as u64).div_ceil(WARPS_PER_BLOCK);
    let cfg = grid("nf4_quantize", blocks)?;
    QUANTIZE.check_launch(&cfg)?;
    Ok(cfg)
}

/// Launch geometry of `k_nf4_dequantize`.
pub fn dequantize_launch(layout: &Nf4Layout) -> Result<LaunchConfig> {
    let threads = (layout.packed_bytes() as u64).div_ceil(PACKED_BYTES_PER_THREAD);
    let cfg = grid("nf4_dequantize", threads.div_ceil(THREADS as u64))?;
    DEQUANTIZE.check_launch(&cfg)?;
    Ok(cfg)
}

fn grid(op: &'static str, blocks: u64) -> Result<LaunchConfig> {
    if blocks > MAX_GRID_X {
        return Err(Error::invalid(
            op,
            format!("{blocks} blocks exceed the grid limit"),
        ));
    }
    Ok(LaunchConfig::linear(blocks.max(1) as u32, THREADS))
}

/// Block scales as the dequantize kernel takes them.
#[derive(Clone, Copy, Debug)]
pub enum Scales<'a> {
    /// One f32 absmax per block.
    F32(&'a [f32]),
    /// Double quantization: `nested_code[absmax_q[b]] * nested_absmax[b / nested_blocksize] + offset`.
    Double {
        absmax_q: &'a [u8],
        nested_absmax: &'a [f32],
        nested_code: &'a [f32; 256],
        offset: f32,
        nested_blocksize: usize,
    },
}

/// Buffer lengths of a set of block scales, host or device. (Any f32 offset is valid: bitsandbytes
/// stores an infinite mean when the block maxima overflow, and dequantizes it as such.)
pub(crate) enum ScaleLens {
    F32 {
        absmax: usize,
    },
    Double {
        absmax_q: usize,
        nested_absmax: usize,
        nested_code: usize,
        nested_blocksize: usize,
    },
}

pub(crate) fn check_scales(op: &'static str, layout: &Nf4Layout, lens: ScaleLens) -> Result<()> {
    match lens {
        ScaleLens::F32 { absmax } => layout.check_len(op, "absmax", absmax, layout.blocks()),
        ScaleLens::Double {
            absmax_q,
            nested_absmax,
            nested_code,
            nested_blocksize,
        } => {
            layout.check_len(op, "quantized absmax", absmax_q, layout.blocks())?;
            layout.check_len(op, "nested code", nested_code, 256)?;
            if nested_blocksize == 0 || nested_blocksize > i32::MAX as usize {
                return Err(Error::invalid(
                    op,
                    format!("nested blocksize {nested_blocksize}"),
                ));
            }
            let want = layout.blocks().div_ceil(nested_blocksize);
            layout.check_len(op, "nested absmax", nested_absmax, want)
        }
    }
}

impl Scales<'_> {
    pub(crate) fn lens(&self) -> ScaleLens {
        match *self {
            Scales::F32(absmax) => ScaleLens::F32 {
                absmax: absmax.len(),
            },
            Scales::Double {
                absmax_q,
                nested_absmax,
                nested_code,
                nested_blocksize,
                ..
            } => ScaleLens::Double {
                absmax_q: absmax_q.len(),
                nested_absmax: nested_absmax.len(),
                nested_code: nested_code.len(),
                nested_blocksize,
            },
        }
    }
}

/// Quantizes `input` to NF4 with `code` (16 values) by `k_nf4_quantize` into caller-owned
/// `packed` (`(n + 1) / 2` bytes) and `absmax` (`ceil(n / blocksize)` scales).
pub fn quantize_into<D: LaunchDevice, T: Element>(
    dev: &D,
    input: &(impl KernelArg<D, T> + ?Sized),
    blocksize: usize,
    code: &(impl KernelArg<D, f32> + ?Sized),
    packed: &mut (impl KernelArgMut<D, u8> + ?Sized),
    absmax: &mut (impl KernelArgMut<D, f32> + ?Sized),
) -> Result<()> {
    const OP: &str = "nf4_quantize";
    let layout = Nf4Layout::new(OP, input.len(), blocksize)?;
    layout.check_len(OP, "code", code.len(), 16)?;
    layout.check_len(OP, "packed", packed.len(), layout.packed_bytes())?;
    layout.check_len(OP, "absmax", absmax.len(), layout.blocks())?;
    let cfg = quantize_launch(&layout)?;
    let (ip, cp, pp, ap) = (
        input.ptr(dev),
        code.ptr(dev),
        packed.ptr_mut(dev),
        absmax.ptr_mut(dev),
    );
    let params = QlNf4QuantizeParams {
        input: ip.void(),
        code: cp.get(),
        packed: pp.get_mut(),
        absmax: ap.get_mut(),
        n: layout.n as i64,
        blocksize: layout.blocksize as i32,
        in_dtype: T::DTYPE as i32,
    };
    // SAFETY: every buffer has exactly the length the kernel indexes for `layout` (validated
    // above); the pointers' guards keep them alive and ordered until the launch is queued.
    unsafe { dev.launch(&QUANTIZE, &cfg, &params) }
}

/// Quantizes `input` to NF4 with `code` by `k_nf4_quantize`. Returns `(packed, absmax)`.
pub fn quantize<D: LaunchDevice, T: Element>(
    dev: &D,
    input: &(impl KernelArg<D, T> + ?Sized),
    blocksize: usize,
    code: &(impl KernelArg<D, f32> + ?Sized),
) -> Result<(D::Buffer<u8>, D::Buffer<f32>)> {
    let layout = Nf4Layout::new("nf4_quantize", input.len(), blocksize)?;
    // SAFETY: the kernel writes every packed byte and every block scale.
    let (mut packed, mut absmax) = unsafe {
        (
            dev.alloc::<u8>(layout.packed_bytes())?,
            dev.alloc::<f32>(layout.blocks())?,
        )
    };
    quantize_into(dev, input, blocksize, code, &mut packed, &mut absmax)?;
    Ok((packed, absmax))
}

/// Dequantizes NF4 data through the CPU emulation of `k_nf4_dequantize`.
pub fn dequantize_emulated<T: Element>(
    packed: &[u8],
    scales: Scales<'_>,
    n: usize,
    blocksize: usize,
    code: &[f32; 16],
) -> Result<Vec<T>> {
    const OP: &str = "nf4_dequantize";
    let layout = Nf4Layout::new(OP, n, blocksize)?;
    layout.check_len(OP, "packed", packed.len(), layout.packed_bytes())?;
    check_scales(OP, &layout, scales.lens())?;
    let mut out = vec![T::default(); n];
    let params = dequantize_params(
        packed.as_ptr(),
        code.as_ptr(),
        &scales,
        out.as_mut_ptr().cast(),
        &layout,
        T::DTYPE as i32,
    );
    // SAFETY: `packed`, the scale buffers and `out` have the lengths the kernel reads and writes
    // for `layout` (validated above) and stay alive across the synchronous launch.
    unsafe { super::emu::launch(&DEQUANTIZE, &dequantize_launch(&layout)?, &params)? };
    Ok(out)
}

fn dequantize_params(
    packed: *const u8,
    code: *const f32,
    scales: &Scales<'_>,
    out: *mut c_void,
    layout: &Nf4Layout,
    out_dtype: i32,
) -> QlNf4DequantizeParams {
    let mut p = QlNf4DequantizeParams {
        packed,
        code,
        out,
        n: layout.n as i64,
        blocksize: layout.blocksize as i32,
        out_dtype,
        ..Default::default()
    };
    match *scales {
        Scales::F32(absmax) => p.absmax = absmax.as_ptr(),
        Scales::Double {
            absmax_q,
            nested_absmax,
            nested_code,
            offset,
            nested_blocksize,
        } => {
            p.absmax_q = absmax_q.as_ptr();
            p.nested_absmax = nested_absmax.as_ptr();
            p.nested_code = nested_code.as_ptr();
            p.nested_offset = offset;
            p.nested_blocksize = nested_blocksize as i32;
        }
    }
    p
}

#[cfg(feature = "cuda")]
pub use cuda_impl::*;

#[cfg(feature = "cuda")]
mod cuda_impl {
    use super::*;
    use crate::kernels::cuda::{cuda_err, storage_slice, CudaDevice};
    use crate::quant::nf4::{Nf4Scales, Nf4Tensor};
    use candle_core::cuda_backend::CudaDType;
    use candle_core::{DType, Device, Tensor};
    use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut, SyncOnDrop};
    use std::sync::Arc;

    /// Device-side block scales, mirroring [`Scales`].
    pub enum DeviceScales<'a> {
        F32(&'a CudaSlice<f32>),
        Double {
            absmax_q: &'a CudaSlice<u8>,
            nested_absmax: &'a CudaSlice<f32>,
            nested_code: &'a CudaSlice<f32>,
            offset: f32,
            nested_blocksize: usize,
        },
    }

    /// Device pointers of a set of scales, as the NF4 kernels' parameter structs take them.
    pub(crate) struct ScalePtrs {
        pub absmax: *const f32,
        pub absmax_q: *const u8,
        pub nested_absmax: *const f32,
        pub nested_code: *const f32,
        pub nested_offset: f32,
        pub nested_blocksize: i32,
    }

    impl<'a> DeviceScales<'a> {
        /// The scales' device pointers, with the guards that keep their buffers ordered on
        /// `stream` until the launch that reads them is queued.
        pub(crate) fn device_ptrs<'s>(
            &'s self,
            stream: &'s Arc<CudaStream>,
        ) -> (ScalePtrs, Vec<SyncOnDrop<'s>>) {
            let mut p = ScalePtrs {
                absmax: std::ptr::null(),
                absmax_q: std::ptr::null(),
                nested_absmax: std::ptr::null(),
                nested_code: std::ptr::null(),
                nested_offset: 0.0,
                nested_blocksize: 0,
            };
            let mut guards = Vec::new();
            match self {
                DeviceScales::F32(absmax) => {
                    let (ptr, g) = absmax.device_ptr(stream);
                    guards.push(g);
                    p.absmax = ptr as *const f32;
                }
                DeviceScales::Double {
                    absmax_q,
                    nested_absmax,
                    nested_code,
                    offset,
                    nested_blocksize,
                } => {
                    let (q, g0) = absmax_q.device_ptr(stream);
                    let (na, g1) = nested_absmax.device_ptr(stream);
                    let (nc, g2) = nested_code.device_ptr(stream);
                    guards.extend([g0, g1, g2]);
                    p.absmax_q = q as *const u8;
                    p.nested_absmax = na as *const f32;
                    p.nested_code = nc as *const f32;
                    p.nested_offset = *offset;
                    p.nested_blocksize = *nested_blocksize as i32;
                }
            }
            (p, guards)
        }
    }

    impl DeviceScales<'_> {
        pub(crate) fn lens(&self) -> ScaleLens {
            match self {
                DeviceScales::F32(absmax) => ScaleLens::F32 {
                    absmax: absmax.len(),
                },
                DeviceScales::Double {
                    absmax_q,
                    nested_absmax,
                    nested_code,
                    nested_blocksize,
                    ..
                } => ScaleLens::Double {
                    absmax_q: absmax_q.len(),
                    nested_absmax: nested_absmax.len(),
                    nested_code: nested_code.len(),
                    nested_blocksize: *nested_blocksize,
                },
            }
        }
    }

    /// Dequantizes NF4 device data with `k_nf4_dequantize` into a new device buffer of `T`.
    pub fn dequantize_cuda<T: Element>(
        dev: &CudaDevice,
        packed: &CudaSlice<u8>,
        scales: DeviceScales<'_>,
        n: usize,
        blocksize: usize,
        code: &CudaSlice<f32>,
    ) -> Result<CudaSlice<T>> {
        Nf4Layout::new("nf4_dequantize", n, blocksize)?;
        // SAFETY: every element is written by the kernel before anyone reads it.
        let mut out = unsafe { dev.stream().alloc::<T>(n) }.map_err(cuda_err)?;
        dequantize_cuda_into(dev, packed, scales, blocksize, code, &mut out)?;
        Ok(out)
    }

    /// [`dequantize_cuda`] into a caller-owned buffer of `n = out.len()` elements (e.g. one
    /// dequantization buffer reused by every layer).
    pub fn dequantize_cuda_into<T: Element>(
        dev: &CudaDevice,
        packed: &CudaSlice<u8>,
        scales: DeviceScales<'_>,
        blocksize: usize,
        code: &CudaSlice<f32>,
        out: &mut CudaSlice<T>,
    ) -> Result<()> {
        const OP: &str = "nf4_dequantize";
        let layout = Nf4Layout::new(OP, out.len(), blocksize)?;
        layout.check_len(OP, "packed", packed.len(), layout.packed_bytes())?;
        layout.check_len(OP, "code", code.len(), 16)?;
        check_scales(OP, &layout, scales.lens())?;
        let cfg = dequantize_launch(&layout)?;
        let stream = dev.stream();
        let (packed_ptr, _g0) = packed.device_ptr(stream);
        let (code_ptr, _g1) = code.device_ptr(stream);
        let (out_ptr, _g2) = out.device_ptr_mut(stream);
        let mut p = QlNf4DequantizeParams {
            packed: packed_ptr as *const u8,
            code: code_ptr as *const f32,
            out: out_ptr as *mut c_void,
            n: layout.n as i64,
            blocksize: layout.blocksize as i32,
            out_dtype: T::DTYPE as i32,
            ..Default::default()
        };
        let (sp, _scale_guards) = scales.device_ptrs(stream);
        p.absmax = sp.absmax;
        p.absmax_q = sp.absmax_q;
        p.nested_absmax = sp.nested_absmax;
        p.nested_code = sp.nested_code;
        p.nested_offset = sp.nested_offset;
        p.nested_blocksize = sp.nested_blocksize;
        // SAFETY: every device buffer has the length the kernel reads or writes for `layout`
        // (validated above) and is kept ordered on `stream` by its guard until the launch is queued.
        unsafe { dev.launch(&DEQUANTIZE, &cfg, &p) }
    }

    /// One [`Nf4Tensor`] on a candle CUDA device: its packed codes, code book and block scales
    /// uploaded once as candle tensors, dequantized there by `k_nf4_dequantize` into a new tensor
    /// of its shape and original dtype, bit for bit [`Nf4Tensor::dequantize`] rounded to that dtype.
    #[derive(Clone, Debug)]
    pub struct Nf4DeviceTensor {
        shape: Vec<usize>,
        layout: Nf4Layout,
        /// The original dtype (the tensor's torch dtype "float32", "bfloat16" or "float16").
        dtype: DType,
        /// U8 `[(n + 1) / 2]`.
        packed: Tensor,
        /// F32 `[16]`.
        code: Tensor,
        scales: ScaleTensors,
    }

    /// The block scales of an [`Nf4DeviceTensor`], mirroring [`Nf4Scales`].
    #[derive(Clone, Debug)]
    enum ScaleTensors {
        /// F32 `[blocks]`.
        F32(Tensor),
        /// U8 `[blocks]`, F32 `[ceil(blocks / nested_blocksize)]`, F32 `[256]`.
        Double {
            absmax_q: Tensor,
            nested_absmax: Tensor,
            nested_code: Tensor,
            offset: f32,
            nested_blocksize: usize,
        },
    }

    impl Nf4DeviceTensor {
        /// Validates `t` and copies its bytes and scales to `device` (a CUDA device).
        pub fn upload(t: &Nf4Tensor, device: &Device) -> Result<Self> {
            const OP: &str = "Nf4DeviceTensor::upload";
            if !device.is_cuda() {
                return Err(Error::invalid(
                    OP,
                    format!("{:?} is not a CUDA device", device.location()),
                ));
            }
            t.validate()?;
            let layout = Nf4Layout::new(OP, t.numel(), t.blocksize)?;
            let dtype = match t.dtype.as_str() {
                "bfloat16" => DType::BF16,
                "float16" => DType::F16,
                _ => DType::F32,
            };
            let scales = match &t.scales {
                Nf4Scales::F32(absmax) => {
                    ScaleTensors::F32(Tensor::from_slice(absmax, absmax.len(), device)?)
                }
                Nf4Scales::Double(dq) => ScaleTensors::Double {
                    absmax_q: Tensor::from_slice(&dq.absmax_q, dq.absmax_q.len(), device)?,
                    nested_absmax: Tensor::from_slice(
                        &dq.nested_absmax,
                        dq.nested_absmax.len(),
                        device,
                    )?,
                    nested_code: Tensor::from_slice(&dq.nested_code, 256, device)?,
                    offset: dq.offset,
                    nested_blocksize: dq.nested_blocksize,
                },
            };
            Ok(Self {
                shape: t.shape.clone(),
                layout,
                dtype,
                packed: Tensor::from_slice(&t.packed, t.packed.len(), device)?,
                code: Tensor::from_slice(&t.code, 16, device)?,
                scales,
            })
        }

        /// The logical shape, e.g. `[out, in]`.
        pub fn shape(&self) -> &[usize] {
            &self.shape
        }

        /// The original dtype, which [`Self::dequantize`] returns.
        pub fn dtype(&self) -> DType {
            self.dtype
        }

        /// The candle device the data lives on.
        pub fn device(&self) -> &Device {
            self.packed.device()
        }

        /// The dequantized tensor of [`Self::shape`] in [`Self::dtype`], computed on `dev`'s stream;
        /// `dev` must be [`CudaDevice::from_candle`] of [`Self::device`].
        pub fn dequantize(&self, dev: &CudaDevice) -> Result<Tensor> {
            if !dev.is_candle_device(self.device()) {
                return Err(Error::invalid(
                    "Nf4DeviceTensor::dequantize",
                    "the kernel device is not the one the tensor was uploaded to",
                ));
            }
            match self.dtype {
                DType::BF16 => self.dequantize_as::<half::bf16>(dev),
                DType::F16 => self.dequantize_as::<half::f16>(dev),
                _ => self.dequantize_as::<f32>(dev),
            }
        }

        /// Runs `f` on this weight's device buffers as the NF4 kernels take them (`n` rows of `k`
        /// codes for a 2-D `[n, k]` tensor, else one row), holding candle's read locks on them
        /// until `f` returns, so no one writes them while a launch that reads them is queued.
        pub fn with_weight<R>(
            &self,
            f: impl FnOnce(crate::kernels::nf4_gemv::DeviceNf4Weight<'_>) -> Result<R>,
        ) -> Result<R> {
            const OP: &str = "Nf4DeviceTensor::with_weight";
            let (packed_s, packed_l) = self.packed.storage_and_layout();
            let (code_s, code_l) = self.code.storage_and_layout();
            let scale_tensors: Vec<&Tensor> = match &self.scales {
                ScaleTensors::F32(absmax) => vec![absmax],
                ScaleTensors::Double {
                    absmax_q,
                    nested_absmax,
                    nested_code,
                    ..
                } => vec![absmax_q, nested_absmax, nested_code],
            };
            let guards: Vec<_> = scale_tensors
                .iter()
                .map(|t| t.storage_and_layout())
                .collect();
            let scales = match (&self.scales, guards.as_slice()) {
                (ScaleTensors::F32(_), [(s, l)]) => DeviceScales::F32(storage_slice(s, l)?),
                (
                    ScaleTensors::Double {
                        offset,
                        nested_blocksize,
                        ..
                    },
                    [(q_s, q_l), (na_s, na_l), (nc_s, nc_l)],
                ) => DeviceScales::Double {
                    absmax_q: storage_slice(q_s, q_l)?,
                    nested_absmax: storage_slice(na_s, na_l)?,
                    nested_code: storage_slice(nc_s, nc_l)?,
                    offset: *offset,
                    nested_blocksize: *nested_blocksize,
                },
                _ => return Err(Error::invalid(OP, "scale tensors do not match their kind")),
            };
            let (n, k) = match self.shape.as_slice() {
                [n, k] => (*n, *k),
                _ => (1, self.layout.n),
            };
            f(crate::kernels::nf4_gemv::DeviceNf4Weight {
                packed: storage_slice(&packed_s, packed_l)?,
                scales,
                n,
                k,
                blocksize: self.layout.blocksize,
                code: storage_slice(&code_s, code_l)?,
            })
        }

        fn dequantize_as<T: Element + CudaDType>(&self, dev: &CudaDevice) -> Result<Tensor> {
            // SAFETY: every element is written by the kernel before anyone reads it.
            let mut out = unsafe { dev.stream().alloc::<T>(self.layout.n) }.map_err(cuda_err)?;
            self.with_weight(|w| {
                dequantize_cuda_into(dev, w.packed, w.scales, w.blocksize, w.code, &mut out)
            })?;
            dev.tensor_from_slice(out, self.shape.as_slice())
        }
    }
}
