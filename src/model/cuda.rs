//! The NF4 linears of a model placed on a CUDA device: every layer's packed codes and block scales
//! uploaded once ([`Nf4DeviceTensor`]), and dequantized on the device by `k_nf4_dequantize`, on
//! candle's stream, whenever the forward or the backward asks for a frozen weight `[out, in]`.

use candle_core::{Device, Tensor};

use crate::kernels::cuda::CudaDevice;
use crate::kernels::nf4::Nf4DeviceTensor;
use crate::model::weights::{Linear, LlamaWeights};
use crate::peft::TargetModule;
use crate::{Error, Result};

/// The device copies of a model's NF4 linears and the kernel device that dequantizes them.
pub(crate) struct DeviceNf4Linears {
    dev: CudaDevice,
    /// Per layer, the seven linears in [`TargetModule::ALL`] order; None where the weight is dense.
    layers: Vec<[Option<Nf4DeviceTensor>; 7]>,
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
        Ok(Some(Self { dev, layers }))
    }

    /// The NF4 weight of `module` in `layer` dequantized on the device, in its original dtype.
    pub(crate) fn dequantize(&self, layer: usize, module: TargetModule) -> Result<Tensor> {
        self.layers
            .get(layer)
            .and_then(|l| l[module as usize].as_ref())
            .ok_or_else(|| {
                Error::invalid(
                    "LlamaModel::frozen_weight",
                    format!("layer {layer} {module} has no NF4 copy on the device"),
                )
            })?
            .dequantize(&self.dev)
    }
}
