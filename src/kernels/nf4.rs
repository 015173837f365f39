//! Launchers for `kernels/nf4.cu`: NF4 blockwise quantize and dequantize (f32 or double-quantized
//! scales), one each over any [`LaunchDevice`] (the CPU emulation, CUDA), and the NF4 weight type
//! [`Nf4Weight`] / [`Scales`] the dequantize, GEMV and GEMM kernels read; with `cuda`, also an
//! `Nf4DeviceTensor` kept as candle tensors. Shapes: a flat tensor of `n` elements,
//! `(n + 1) / 2` packed bytes, `ceil(n / blocksize)` block scales. The Rust reference is
//! `crate::quant::nf4`.

use super::abi::{QlNf4DequantizeParams, QlNf4QuantizeParams};
use super::device::{Emulator, KernelArg, KernelArgMut, LaunchDevice, Ptr};
use super::launch::{declare_kernels, Element, LaunchConfig};
use crate::quant::nf4::{dequantize_absmax, dequantize_nf4, DoubleQuant};
use crate::{Error, Result};

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

/// Block scales as the NF4 kernels take them, borrowed from buffers on device `D` (host slices on
/// the [`Emulator`](super::device::Emulator)).
pub enum Scales<'a, D: LaunchDevice + 'a> {
    /// One f32 absmax per block.
    F32(D::View<'a, f32>),
    /// Double quantization: `nested_code[absmax_q[b]] * nested_absmax[b / nested_blocksize] + offset`
    /// (`nested_code` holds 256 values).
    Double {
        absmax_q: D::View<'a, u8>,
        nested_absmax: D::View<'a, f32>,
        nested_code: D::View<'a, f32>,
        offset: f32,
        nested_blocksize: usize,
    },
}

impl<'a, D: LaunchDevice + 'a> Clone for Scales<'a, D>
where
    D::View<'a, f32>: Clone,
    D::View<'a, u8>: Clone,
{
    fn clone(&self) -> Self {
        match self {
            Scales::F32(absmax) => Scales::F32(absmax.clone()),
            Scales::Double {
                absmax_q,
                nested_absmax,
                nested_code,
                offset,
                nested_blocksize,
            } => Scales::Double {
                absmax_q: absmax_q.clone(),
                nested_absmax: nested_absmax.clone(),
                nested_code: nested_code.clone(),
                offset: *offset,
                nested_blocksize: *nested_blocksize,
            },
        }
    }
}

impl<'a, D: LaunchDevice + 'a> Copy for Scales<'a, D>
where
    D::View<'a, f32>: Copy,
    D::View<'a, u8>: Copy,
{
}

impl<'a, D: LaunchDevice + 'a> std::fmt::Debug for Scales<'a, D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.lens().fmt(f)
    }
}

/// Buffer lengths of a set of block scales. (Any f32 offset is valid: bitsandbytes stores an
/// infinite mean when the block maxima overflow, and dequantizes it as such.)
#[derive(Clone, Copy, Debug)]
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

/// The pointers and values of a set of scales, as every NF4 kernel's parameter struct takes them
/// (null for the kind not used); the pointers keep their buffers borrowed until the launch.
pub(crate) struct ScalePtrs<'s> {
    pub absmax: Ptr<'s>,
    pub absmax_q: Ptr<'s>,
    pub nested_absmax: Ptr<'s>,
    pub nested_code: Ptr<'s>,
    pub nested_offset: f32,
    pub nested_blocksize: i32,
}

impl<'a, D: LaunchDevice + 'a> Scales<'a, D> {
    pub(crate) fn lens(&self) -> ScaleLens {
        match self {
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
                nested_blocksize: *nested_blocksize,
            },
        }
    }

    /// The scales' pointers on `dev` (validate the lengths with [`check_scales`] first).
    pub(crate) fn ptrs<'s>(&'s self, dev: &'s D) -> ScalePtrs<'s> {
        match self {
            Scales::F32(absmax) => ScalePtrs {
                absmax: absmax.ptr(dev),
                absmax_q: Ptr::null(),
                nested_absmax: Ptr::null(),
                nested_code: Ptr::null(),
                nested_offset: 0.0,
                nested_blocksize: 0,
            },
            Scales::Double {
                absmax_q,
                nested_absmax,
                nested_code,
                offset,
                nested_blocksize,
            } => ScalePtrs {
                absmax: Ptr::null(),
                absmax_q: absmax_q.ptr(dev),
                nested_absmax: nested_absmax.ptr(dev),
                nested_code: nested_code.ptr(dev),
                nested_offset: *offset,
                nested_blocksize: *nested_blocksize as i32,
            },
        }
    }
}

impl Scales<'_, Emulator> {
    /// The f32 block scales (double quantization undone with `crate::quant::nf4`), for the
    /// plain-Rust references.
    pub(crate) fn host_absmax(&self, op: &'static str) -> Result<Vec<f32>> {
        match *self {
            Scales::F32(absmax) => Ok(absmax.to_vec()),
            Scales::Double {
                absmax_q,
                nested_absmax,
                nested_code,
                offset,
                nested_blocksize,
            } => {
                let nested_code: [f32; 256] = nested_code.try_into().map_err(|_| {
                    Error::invalid(
                        op,
                        format!("nested code has {} values, expected 256", nested_code.len()),
                    )
                })?;
                Ok(dequantize_absmax(&DoubleQuant {
                    absmax_q: absmax_q.to_vec(),
                    nested_absmax: nested_absmax.to_vec(),
                    offset,
                    nested_blocksize,
                    nested_code,
                }))
            }
        }
    }
}

/// An NF4 weight `[n, k]` (a flat tensor of `n · k` elements, quantized over them in blocks of
/// `blocksize`) borrowed from buffers on device `D`: what the dequantize, GEMV and GEMM kernels
/// read.
pub struct Nf4Weight<'a, D: LaunchDevice + 'a> {
    /// `ceil(n · k / 2)` bytes, first element of a byte in the high nibble.
    pub packed: D::View<'a, u8>,
    pub scales: Scales<'a, D>,
    pub n: usize,
    pub k: usize,
    pub blocksize: usize,
    /// The 16 NF4 code values.
    pub code: D::View<'a, f32>,
}

impl<'a, D: LaunchDevice + 'a> Clone for Nf4Weight<'a, D>
where
    D::View<'a, f32>: Clone,
    D::View<'a, u8>: Clone,
{
    fn clone(&self) -> Self {
        Nf4Weight {
            packed: self.packed.clone(),
            scales: self.scales.clone(),
            n: self.n,
            k: self.k,
            blocksize: self.blocksize,
            code: self.code.clone(),
        }
    }
}

impl<'a, D: LaunchDevice + 'a> Copy for Nf4Weight<'a, D>
where
    D::View<'a, f32>: Copy,
    D::View<'a, u8>: Copy,
{
}

impl<'a, D: LaunchDevice + 'a> std::fmt::Debug for Nf4Weight<'a, D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Nf4Weight")
            .field("packed", &self.packed.len())
            .field("scales", &self.scales)
            .field("n", &self.n)
            .field("k", &self.k)
            .field("blocksize", &self.blocksize)
            .field("code", &self.code.len())
            .finish()
    }
}

/// The pointers of a weight's buffers, borrowed until the launch.
pub(crate) struct WeightPtrs<'s> {
    pub packed: Ptr<'s>,
    pub code: Ptr<'s>,
    pub scales: ScalePtrs<'s>,
}

impl<'a, D: LaunchDevice + 'a> Nf4Weight<'a, D> {
    /// A flat tensor of `numel` elements, as one row `[1, numel]`.
    pub fn flat(
        packed: D::View<'a, u8>,
        scales: Scales<'a, D>,
        numel: usize,
        blocksize: usize,
        code: D::View<'a, f32>,
    ) -> Self {
        Nf4Weight {
            packed,
            scales,
            n: 1,
            k: numel,
            blocksize,
            code,
        }
    }

    /// The layout of the flattened `n · k` elements.
    pub fn layout(&self, op: &'static str) -> Result<Nf4Layout> {
        let numel = self.n.checked_mul(self.k).ok_or_else(|| {
            Error::invalid(op, format!("weight [{}, {}] is too large", self.n, self.k))
        })?;
        Nf4Layout::new(op, numel, self.blocksize)
    }

    /// Checks the packed codes, the code book and the scales against `layout`.
    pub(crate) fn check_buffers(&self, op: &'static str, layout: &Nf4Layout) -> Result<()> {
        layout.check_len(op, "packed", self.packed.len(), layout.packed_bytes())?;
        layout.check_len(op, "code", self.code.len(), 16)?;
        check_scales(op, layout, self.scales.lens())
    }

    pub(crate) fn ptrs<'s>(&'s self, dev: &'s D) -> WeightPtrs<'s> {
        WeightPtrs {
            packed: self.packed.ptr(dev),
            code: self.code.ptr(dev),
            scales: self.scales.ptrs(dev),
        }
    }
}

impl Nf4Weight<'_, Emulator> {
    /// The weight dequantized with `crate::quant::nf4` (f32, unrounded), for the plain-Rust
    /// references; validates every buffer first.
    pub(crate) fn dequantize_host(&self, op: &'static str) -> Result<Vec<f32>> {
        let layout = self.layout(op)?;
        self.check_buffers(op, &layout)?;
        let absmax = self.scales.host_absmax(op)?;
        let code: &[f32; 16] = self
            .code
            .try_into()
            .map_err(|_| Error::invalid(op, "code must hold 16 values"))?;
        dequantize_nf4(self.packed, &absmax, layout.n, self.blocksize, code)
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

/// Dequantizes the flattened `n · k` elements of `w` by `k_nf4_dequantize` into caller-owned
/// `out` (`n · k` elements of `T`; e.g. one dequantization buffer reused by every layer).
pub fn dequantize_into<D: LaunchDevice, T: Element>(
    dev: &D,
    w: &Nf4Weight<'_, D>,
    out: &mut (impl KernelArgMut<D, T> + ?Sized),
) -> Result<()> {
    const OP: &str = "nf4_dequantize";
    let layout = w.layout(OP)?;
    w.check_buffers(OP, &layout)?;
    layout.check_len(OP, "out", out.len(), layout.n)?;
    let cfg = dequantize_launch(&layout)?;
    let (wp, op) = (w.ptrs(dev), out.ptr_mut(dev));
    let params = QlNf4DequantizeParams {
        packed: wp.packed.get(),
        code: wp.code.get(),
        absmax: wp.scales.absmax.get(),
        absmax_q: wp.scales.absmax_q.get(),
        nested_code: wp.scales.nested_code.get(),
        nested_absmax: wp.scales.nested_absmax.get(),
        out: op.void_mut(),
        n: layout.n as i64,
        nested_offset: wp.scales.nested_offset,
        blocksize: layout.blocksize as i32,
        nested_blocksize: wp.scales.nested_blocksize,
        out_dtype: T::DTYPE as i32,
    };
    // SAFETY: the packed codes, code book, scales and `out` have exactly the lengths the kernel
    // reads and writes for `layout` (validated above); the pointers' guards keep them alive and
    // ordered until the launch is queued.
    unsafe { dev.launch(&DEQUANTIZE, &cfg, &params) }
}

/// Dequantizes the flattened `n · k` elements of `w` by `k_nf4_dequantize` into a new buffer.
pub fn dequantize<D: LaunchDevice, T: Element>(
    dev: &D,
    w: &Nf4Weight<'_, D>,
) -> Result<D::Buffer<T>> {
    let layout = w.layout("nf4_dequantize")?;
    // SAFETY: the kernel writes every element.
    let mut out = unsafe { dev.alloc::<T>(layout.n)? };
    dequantize_into(dev, w, &mut out)?;
    Ok(out)
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
    use cudarc::driver::CudaSlice;

    /// The whole of a device buffer as a view.
    fn whole<T>(slice: &CudaSlice<T>) -> cudarc::driver::CudaView<'_, T> {
        slice.slice(0..slice.len())
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
            f: impl FnOnce(Nf4Weight<'_, CudaDevice>) -> Result<R>,
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
                (ScaleTensors::F32(_), [(s, l)]) => Scales::F32(whole(storage_slice(s, l)?)),
                (
                    ScaleTensors::Double {
                        offset,
                        nested_blocksize,
                        ..
                    },
                    [(q_s, q_l), (na_s, na_l), (nc_s, nc_l)],
                ) => Scales::Double {
                    absmax_q: whole(storage_slice(q_s, q_l)?),
                    nested_absmax: whole(storage_slice(na_s, na_l)?),
                    nested_code: whole(storage_slice(nc_s, nc_l)?),
                    offset: *offset,
                    nested_blocksize: *nested_blocksize,
                },
                _ => return Err(Error::invalid(OP, "scale tensors do not match their kind")),
            };
            let (n, k) = match self.shape.as_slice() {
                [n, k] => (*n, *k),
                _ => (1, self.layout.n),
            };
            f(Nf4Weight {
                packed: whole(storage_slice(&packed_s, packed_l)?),
                scales,
                n,
                k,
                blocksize: self.layout.blocksize,
                code: whole(storage_slice(&code_s, code_l)?),
            })
        }

        fn dequantize_as<T: Element + CudaDType>(&self, dev: &CudaDevice) -> Result<Tensor> {
            // SAFETY: every element is written by the kernel before anyone reads it.
            let mut out = unsafe { dev.stream().alloc::<T>(self.layout.n) }.map_err(cuda_err)?;
            self.with_weight(|w| dequantize_into(dev, &w, &mut out))?;
            dev.tensor_from_slice(out, self.shape.as_slice())
        }
    }
}
