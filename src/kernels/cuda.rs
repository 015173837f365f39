//! The CUDA backend: one device context and stream, the PTX modules built by nvcc (loaded on first
//! use), and the one place kernels are launched through cudarc.

use super::abi::{QlEmuTestParams, QlNf4DequantizeParams, QlNf4QuantizeParams};
use super::launch::{Kernel, LaunchConfig};
use crate::{Error, Result};
use cudarc::driver::{CudaContext, CudaModule, CudaStream, DeviceRepr, PushKernelArg};
use cudarc::nvrtc::Ptx;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// PTX of every `kernels/*.cu`, embedded at build time (`NF4`, `EMU_SELFTEST`, ...).
pub mod ptx {
    include!(concat!(env!("OUT_DIR"), "/ptx.rs"));
}

// SAFETY: these are `#[repr(C)]` plain-data structs generated from kernels/abi.h (layout-tested by
// bindgen); a kernel receives exactly one of them by value, as its C signature declares.
unsafe impl DeviceRepr for QlNf4QuantizeParams {}
// SAFETY: as above.
unsafe impl DeviceRepr for QlNf4DequantizeParams {}
// SAFETY: as above.
unsafe impl DeviceRepr for QlEmuTestParams {}
// SAFETY: as above.
unsafe impl DeviceRepr for super::abi::QlRmsNormForwardParams {}
// SAFETY: as above.
unsafe impl DeviceRepr for super::abi::QlRmsNormBackwardParams {}
// SAFETY: as above.
unsafe impl DeviceRepr for super::abi::QlRmsNormDwReduceParams {}
// SAFETY: as above.
unsafe impl DeviceRepr for super::abi::QlRopeParams {}
// SAFETY: as above.
unsafe impl DeviceRepr for super::abi::QlSwigluParams {}
// SAFETY: as above.
unsafe impl DeviceRepr for super::abi::QlAdamWParams {}
// SAFETY: as above.
unsafe impl DeviceRepr for super::abi::QlAdamW8bitParams {}
// SAFETY: as above.
unsafe impl DeviceRepr for super::abi::QlNf4GemvParams {}
// SAFETY: as above.
unsafe impl DeviceRepr for super::abi::QlCrossEntropyForwardParams {}
// SAFETY: as above.
unsafe impl DeviceRepr for super::abi::QlCrossEntropyBackwardParams {}
// SAFETY: as above.
unsafe impl DeviceRepr for super::abi::QlLoraProjectParams {}
// SAFETY: as above.
unsafe impl DeviceRepr for super::abi::QlLoraExpandParams {}
// SAFETY: as above.
unsafe impl DeviceRepr for super::abi::QlLoraGradWParams {}
// SAFETY: as above.
unsafe impl DeviceRepr for super::abi::QlAttentionForwardParams {}
// SAFETY: as above.
unsafe impl DeviceRepr for super::abi::QlAttentionBackwardParams {}

fn module_ptx(module: &str) -> Option<&'static str> {
    match module {
        "nf4" => Some(ptx::NF4),
        "emu_selftest" => Some(ptx::EMU_SELFTEST),
        "llama" => Some(ptx::LLAMA),
        "adamw" => Some(ptx::ADAMW),
        "nf4_gemv" => Some(ptx::NF4_GEMV),
        "cross_entropy" => Some(ptx::CROSS_ENTROPY),
        "lora" => Some(ptx::LORA),
        "attention" => Some(ptx::ATTENTION),
        _ => None,
    }
}

pub(crate) fn cuda_err(e: cudarc::driver::DriverError) -> Error {
    Error::Cuda(e.to_string())
}

/// A CUDA device with its default stream and the kernel modules loaded so far.
pub struct CudaDevice {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
}

impl std::fmt::Debug for CudaDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CudaDevice({})", self.ctx.ordinal())
    }
}

impl CudaDevice {
    /// Opens device `ordinal`. Fails with [`Error::NoCudaDevice`] when there is no driver or GPU
    /// (a stub libcuda answers every call with CUDA_ERROR_STUB_LIBRARY).
    pub fn new(ordinal: usize) -> Result<Self> {
        let ctx = CudaContext::new(ordinal).map_err(|e| Error::NoCudaDevice(e.to_string()))?;
        let stream = ctx.default_stream();
        Ok(CudaDevice {
            ctx,
            stream,
            modules: Mutex::new(HashMap::new()),
        })
    }

    /// Device 0 if one can be opened; `None` (with the reason on stderr) otherwise. For tests and
    /// benches that skip cleanly on machines without a GPU.
    pub fn first_available() -> Option<Self> {
        match Self::new(0) {
            Ok(d) => Some(d),
            Err(e) => {
                eprintln!("skipping CUDA: {e}");
                None
            }
        }
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Device name, compute capability and the theoretical DRAM bandwidth in GB/s (from the memory
    /// clock and bus width attributes), as benches report them.
    pub fn describe(&self) -> Result<DeviceInfo> {
        use cudarc::driver::sys::CUdevice_attribute as A;
        let attr = |a| self.ctx.attribute(a).map_err(cuda_err);
        let mem_clock_khz = attr(A::CU_DEVICE_ATTRIBUTE_MEMORY_CLOCK_RATE)? as f64;
        let bus_bits = attr(A::CU_DEVICE_ATTRIBUTE_GLOBAL_MEMORY_BUS_WIDTH)? as f64;
        Ok(DeviceInfo {
            name: self.ctx.name().map_err(cuda_err)?,
            compute_capability: (
                attr(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?,
                attr(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?,
            ),
            // Double data rate: two transfers per memory clock.
            peak_bandwidth_gbs: 2.0 * mem_clock_khz * 1e3 * bus_bits / 8.0 / 1e9,
        })
    }

    fn module(&self, name: &'static str) -> Result<Arc<CudaModule>> {
        let mut modules = self
            .modules
            .lock()
            .map_err(|_| Error::Cuda("module cache poisoned".into()))?;
        if let Some(m) = modules.get(name) {
            return Ok(m.clone());
        }
        let src = module_ptx(name).ok_or_else(|| Error::Cuda(format!("no PTX module `{name}`")))?;
        let m = self.ctx.load_module(Ptx::from_src(src)).map_err(cuda_err)?;
        modules.insert(name, m.clone());
        Ok(m)
    }

    /// Queues `kernel` on the stream with `params` as its one argument.
    ///
    /// # Safety
    /// Every device pointer in `params` must be valid for the accesses the kernel makes under
    /// `cfg`, and stay valid until the kernel has run.
    pub unsafe fn launch<P: DeviceRepr>(
        &self,
        kernel: &Kernel,
        cfg: &LaunchConfig,
        params: &P,
    ) -> Result<()> {
        let func = self
            .module(kernel.module)?
            .load_function(kernel.name)
            .map_err(cuda_err)?;
        let cfg = cudarc::driver::LaunchConfig {
            grid_dim: cfg.grid_dim,
            block_dim: cfg.block_dim,
            shared_mem_bytes: cfg.shared_mem_bytes,
        };
        let mut builder = self.stream.launch_builder(&func);
        builder.arg(params);
        // SAFETY: the caller guarantees the pointers in `params`; the argument list matches the
        // kernel's single by-value parameter of type `P`.
        unsafe { builder.launch(cfg) }.map_err(cuda_err)?;
        Ok(())
    }

    /// Waits for all queued work.
    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(cuda_err)
    }

    /// Mean seconds per call of `launch` (which queues work on this device's stream): one warm-up
    /// call, then `iters` calls between two synchronizations, as the GPU benches time kernels.
    pub fn seconds_per_call(&self, iters: u32, mut launch: impl FnMut()) -> Result<f64> {
        launch();
        self.synchronize()?;
        let start = std::time::Instant::now();
        for _ in 0..iters {
            launch();
        }
        self.synchronize()?;
        Ok(start.elapsed().as_secs_f64() / f64::from(iters.max(1)))
    }
}

impl std::fmt::Display for DeviceInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} (sm_{}{}), theoretical DRAM bandwidth {:.0} GB/s",
            self.name,
            self.compute_capability.0,
            self.compute_capability.1,
            self.peak_bandwidth_gbs
        )
    }
}

/// What benches print about a device.
#[derive(Clone, Debug)]
pub struct DeviceInfo {
    pub name: String,
    pub compute_capability: (i32, i32),
    pub peak_bandwidth_gbs: f64,
}
