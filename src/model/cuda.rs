//! The NF4 linears of a model placed on a CUDA device: every layer's packed codes and block scales
//! uploaded once ([`Nf4DeviceTensor`]), and dequantized on the device by `k_nf4_dequantize`, on
//! candle's stream, whenever the forward or the backward asks for a frozen weight `[out, in]`, or
//! multiplied by bf16 activations through the [`Nf4Matmul`] dispatcher (GEMV, tensor-core
//! dequant-GEMM or dequantize + cuBLAS) without materializing the weight.

use std::sync::Mutex;

use candle_core::{DType, Device, Tensor};
use half::bf16;

use crate::kernels::cuda::{cuda_err, storage_slice, CudaDevice};
use crate::kernels::nf4::Nf4DeviceTensor;
use crate::kernels::nf4_gemm::{GemmOp, Nf4Matmul, Nf4MatmulPlan};
use crate::model::adapter::TargetModule;
use crate::model::weights::{Linear, LlamaWeights};
use crate::{Error, Result};

/// The device copies of a model's NF4 linears and the kernel device that dequantizes them.
pub(crate) struct DeviceNf4Linears {
    dev: CudaDevice,
    /// Per layer, the seven linears in [`TargetModule::ALL`] order; None where the weight is dense.
    layers: Vec<[Option<Nf4DeviceTensor>; 7]>,
    /// The product dispatcher (its cuBLAS handle and dequantize buffer), made on first use so a
    /// model that never multiplies through it (f32 compute) holds no cuBLAS handle.
    gemm: Mutex<Option<Nf4Matmul>>,
}

impl std::fmt::Debug for DeviceNf4Linears {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let count = self.layers.iter().flatten().flatten().count();
        write!(f, "DeviceNf4Linears({count} NF4 linears on {:?})", self.dev)
    }
}

impl DeviceNf4Linears {
    /// Uploads every NF4 linear of `weights` to `device`; None when `device` is not a CUDA device
    /// (the CPU dequantizes from the host data).
    pub(crate) fn upload(weights: &LlamaWeights, device: &Device) -> Result<Option<Self>> {
        if !device.is_cuda() {
            return Ok(None);
        }
        let dev = CudaDevice::from_candle(device)?;
        let layers = weights
            .layers
            .iter()
            .map(|layer| {
                let mut linears: [Option<Nf4DeviceTensor>; 7] = Default::default();
                for (slot, module) in linears.iter_mut().zip(TargetModule::ALL) {
                    if let Linear::Nf4(t) = layer.linear(module) {
                        *slot = Some(Nf4DeviceTensor::upload(t, device)?);
                    }
                }
                Ok(linears)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Some(Self {
            dev,
            layers,
            gemm: Mutex::new(None),
        }))
    }

    fn tensor(&self, layer: usize, module: TargetModule) -> Result<&Nf4DeviceTensor> {
        self.layers
            .get(layer)
            .and_then(|l| l[module as usize].as_ref())
            .ok_or_else(|| {
                Error::invalid(
                    "LlamaModel::frozen_weight",
                    format!("layer {layer} {module} has no NF4 copy on the device"),
                )
            })
    }

    /// Whether `module` of `layer` has an NF4 copy here.
    pub(crate) fn has(&self, layer: usize, module: TargetModule) -> bool {
        self.tensor(layer, module).is_ok()
    }

    /// The NF4 weight of `module` in `layer` dequantized on the device, in its original dtype.
    pub(crate) fn dequantize(&self, layer: usize, module: TargetModule) -> Result<Tensor> {
        self.tensor(layer, module)?.dequantize(&self.dev)
    }

    /// `a · Wᵀ` (`op` Forward, `a` `[m, in]`) or `a · W` (InputGrad, `a` `[m, out]`) for the NF4
    /// weight W `[out, in]` of `module` in `layer`: `a` rounded to bf16, the products summed in f32
    /// by the path [`Nf4Matmul`] picks for the shape, the result `[m, out]` / `[m, in]` written by
    /// the kernel in `out` (bf16: rounded once there, as the kernel path stores activations; f32:
    /// unrounded, for the tensor-op path).
    pub(crate) fn matmul(
        &self,
        op: GemmOp,
        a: &Tensor,
        layer: usize,
        module: TargetModule,
        out: DType,
    ) -> Result<Tensor> {
        match out {
            DType::BF16 => self.matmul_into::<bf16>(op, a, layer, module),
            DType::F32 => self.matmul_into::<f32>(op, a, layer, module),
            other => Err(Error::invalid(
                op.name(),
                format!("an NF4 product in {other:?}, not f32 or bf16"),
            )),
        }
    }

    fn matmul_into<Y>(
        &self,
        op: GemmOp,
        a: &Tensor,
        layer: usize,
        module: TargetModule,
    ) -> Result<Tensor>
    where
        Y: crate::kernels::launch::Element
            + candle_core::cuda_backend::CudaDType
            + cudarc::driver::DeviceRepr,
    {
        let w = self.tensor(layer, module)?;
        let (m, red) = a.dims2()?;
        let (out, inp) = match w.shape() {
            [out, inp] => (*out, *inp),
            other => {
                return Err(Error::invalid(
                    "LlamaModel::linear",
                    format!("NF4 weight of shape {other:?} is not 2-D"),
                ))
            }
        };
        let (want_red, cols) = match op {
            GemmOp::Forward => (inp, out),
            GemmOp::InputGrad => (out, inp),
        };
        if red != want_red {
            return Err(Error::invalid(
                op.name(),
                format!("activations [{m}, {red}] for a [{out}, {inp}] weight"),
            ));
        }
        // A fresh tensor: contiguous and spanning its whole buffer, as `storage_slice` requires.
        let a = a.to_dtype(DType::BF16)?;
        // SAFETY: every element is written by the product before anyone reads it.
        let mut y = unsafe { self.dev.stream().alloc::<Y>(m * cols) }.map_err(cuda_err)?;
        {
            let mut gemm = self
                .gemm
                .lock()
                .map_err(|_| Error::Cuda("the NF4 GEMM dispatcher's lock is poisoned".into()))?;
            if gemm.is_none() {
                *gemm = Some(Nf4Matmul::new(&self.dev, Nf4MatmulPlan::from_env()?)?);
            }
            let gemm = gemm
                .as_mut()
                .ok_or_else(|| Error::Cuda("NF4 GEMM dispatcher missing".into()))?;
            let (a_s, a_l) = a.storage_and_layout();
            let a_slice = storage_slice::<bf16>(&a_s, a_l)?;
            w.with_weight(|weight| gemm.run(&self.dev, op, a_slice, m, &weight, &mut y))?;
        }
        self.dev.tensor_from_slice(y, (m, cols))
    }
}
