//! NF4 test weights shared by the GEMV and GEMM parity tests: a quantized `[n, k]` weight with
//! both kinds of scales, its host view for the references, and its buffers on any launch device.

use qlora::kernels::device::{Emulator, KernelArg, LaunchDevice, Scalar};
use qlora::kernels::nf4::{Nf4Weight, Scales};
use qlora::quant::nf4::{double_quantize, quantize_nf4, DoubleQuant, NF4_CODE};
use qlora::testing::normal_vector;

/// A quantized `[n, k]` weight with both kinds of scales.
pub struct Weight {
    pub n: usize,
    pub k: usize,
    pub blocksize: usize,
    pub packed: Vec<u8>,
    pub absmax: Vec<f32>,
    pub dq: DoubleQuant,
}

impl Weight {
    pub fn new(n: usize, k: usize, blocksize: usize, std: f32, seed: u64) -> Self {
        let w = normal_vector(n * k, std, seed);
        let (packed, absmax) = quantize_nf4(&w, blocksize).unwrap();
        let dq = double_quantize(&absmax, 256).unwrap();
        Weight {
            n,
            k,
            blocksize,
            packed,
            absmax,
            dq,
        }
    }

    /// The host view the reference reads.
    pub fn host(&self, double: bool) -> Nf4Weight<'_, Emulator> {
        let scales = if double {
            Scales::Double {
                absmax_q: &self.dq.absmax_q[..],
                nested_absmax: &self.dq.nested_absmax[..],
                nested_code: &self.dq.nested_code[..],
                offset: self.dq.offset,
                nested_blocksize: self.dq.nested_blocksize,
            }
        } else {
            Scales::F32(&self.absmax[..])
        };
        Nf4Weight {
            packed: &self.packed[..],
            scales,
            n: self.n,
            k: self.k,
            blocksize: self.blocksize,
            code: &NF4_CODE[..],
        }
    }
}

/// The whole of a device buffer as a view.
pub fn all<'a, D: LaunchDevice, T: Scalar>(dev: &'a D, buf: &'a D::Buffer<T>) -> D::View<'a, T> {
    dev.slice(buf, 0..buf.len()).unwrap()
}

/// A weight's buffers on a device.
pub struct DeviceWeight<D: LaunchDevice> {
    pub packed: D::Buffer<u8>,
    pub code: D::Buffer<f32>,
    pub absmax: D::Buffer<f32>,
    pub q: D::Buffer<u8>,
    pub na: D::Buffer<f32>,
    pub nc: D::Buffer<f32>,
    pub offset: f32,
    pub nested_blocksize: usize,
    pub n: usize,
    pub k: usize,
    pub blocksize: usize,
}

impl<D: LaunchDevice> DeviceWeight<D> {
    pub fn new(dev: &D, w: &Weight) -> Self {
        DeviceWeight {
            packed: dev.upload(&w.packed).unwrap(),
            code: dev.upload(&NF4_CODE).unwrap(),
            absmax: dev.upload(&w.absmax).unwrap(),
            q: dev.upload(&w.dq.absmax_q).unwrap(),
            na: dev.upload(&w.dq.nested_absmax).unwrap(),
            nc: dev.upload(&w.dq.nested_code).unwrap(),
            offset: w.dq.offset,
            nested_blocksize: w.dq.nested_blocksize,
            n: w.n,
            k: w.k,
            blocksize: w.blocksize,
        }
    }

    pub fn view<'a>(&'a self, dev: &'a D, double: bool) -> Nf4Weight<'a, D> {
        let scales = if double {
            self.double_scales(dev, self.nested_blocksize)
        } else {
            Scales::F32(all(dev, &self.absmax))
        };
        Nf4Weight {
            packed: all(dev, &self.packed),
            scales,
            n: self.n,
            k: self.k,
            blocksize: self.blocksize,
            code: all(dev, &self.code),
        }
    }

    /// The double-quantized scales with `nested_blocksize` (the refusal tests pass a bad one).
    pub fn double_scales<'a>(&'a self, dev: &'a D, nested_blocksize: usize) -> Scales<'a, D> {
        Scales::Double {
            absmax_q: all(dev, &self.q),
            nested_absmax: all(dev, &self.na),
            nested_code: all(dev, &self.nc),
            offset: self.offset,
            nested_blocksize,
        }
    }
}
