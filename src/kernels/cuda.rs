//! The CUDA backend: one device context and stream (our own, or candle's so that kernels and
//! candle ops share one queue), the fatbin modules built by nvcc (SASS for sm_80/86/89/90 and
//! compute_80 PTX; loaded on first use, their kernels' registers and local memory checked against
//! ptxas's build-time figures), the one place kernels are launched through cudarc, and the bridge
//! between candle tensors and device buffers. Opening a device first checks that the driver
//! supports the CUDA release the fatbins were built with.

use super::launch::{Kernel, LaunchConfig};
use crate::{Error, Result};
use candle_core::cuda_backend::{CudaDType, CudaStorage};
use candle_core::{Layout, Shape, Storage, Tensor};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DeviceRepr, PushKernelArg,
};
use cudarc::nvrtc::Ptx;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// The fatbin of every `kernels/*.cu` (`NF4`, `EMU_SELFTEST`, ...), embedded at build time, with
/// the CUDA release that built them (`BUILT_WITH`), their SASS architectures (`SASS_ARCHS`) and
/// what ptxas reported per kernel and architecture (`PTXAS`).
pub mod fatbin {
    include!(concat!(env!("OUT_DIR"), "/fatbin.rs"));
}

fn module_fatbin(module: &str) -> Option<&'static [u8]> {
    match module {
        "nf4" => Some(fatbin::NF4),
        "emu_selftest" => Some(fatbin::EMU_SELFTEST),
        "llama" => Some(fatbin::LLAMA),
        "adamw" => Some(fatbin::ADAMW),
        "nf4_gemv" => Some(fatbin::NF4_GEMV),
        "nf4_gemm" => Some(fatbin::NF4_GEMM),
        "cross_entropy" => Some(fatbin::CROSS_ENTROPY),
        "lora" => Some(fatbin::LORA),
        "attention" => Some(fatbin::ATTENTION),
        _ => None,
    }
}

/// The CUDA release the fatbins were built with.
pub fn built_with() -> super::driver::CudaVersion {
    super::driver::CudaVersion {
        major: fatbin::BUILT_WITH.0,
        minor: fatbin::BUILT_WITH.1,
    }
}

/// Checks that the installed driver supports [`built_with`] ([`Error::CudaDriverTooOld`]
/// otherwise, naming both releases). No driver, or the stub libcuda, is [`Error::NoCudaDevice`].
pub fn check_driver() -> Result<()> {
    let mut version: std::ffi::c_int = 0;
    // SAFETY: cuDriverGetVersion writes one int through the pointer, which points at a live local;
    // it needs no cuInit and no context.
    let rc = unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut version) };
    rc.result()
        .map_err(|e| Error::NoCudaDevice(format!("cuDriverGetVersion: {e}")))?;
    super::driver::check_driver_version(version, built_with())
}

/// A kernel's function handle, loaded once per device, and the dynamic shared memory limit set on
/// it so far (`CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES`; 0 while unset).
struct LoadedFunction {
    func: CudaFunction,
    static_shared_bytes: u32,
    dynamic_shared_set: u32,
}

pub(crate) fn cuda_err(e: cudarc::driver::DriverError) -> Error {
    Error::Cuda(e.to_string())
}

/// A CUDA device with its stream and the kernel modules loaded so far.
pub struct CudaDevice {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
    /// Functions by `(module, kernel)`, loaded on their first launch.
    functions: Mutex<HashMap<(&'static str, &'static str), LoadedFunction>>,
    /// The candle device whose context and stream these are ([`CudaDevice::from_candle`]); None
    /// for a device opened on its own by [`CudaDevice::new`].
    candle: Option<candle_core::Device>,
}

impl std::fmt::Debug for CudaDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CudaDevice({})", self.ctx.ordinal())
    }
}

impl CudaDevice {
    /// Opens device `ordinal`. Fails with [`Error::NoCudaDevice`] when there is no driver or GPU
    /// (a stub libcuda answers every call with CUDA_ERROR_STUB_LIBRARY), and with
    /// [`Error::CudaDriverTooOld`] when the driver cannot load our fatbins ([`check_driver`]).
    pub fn new(ordinal: usize) -> Result<Self> {
        check_driver()?;
        let ctx = CudaContext::new(ordinal).map_err(|e| Error::NoCudaDevice(e.to_string()))?;
        let stream = ctx.default_stream();
        Ok(CudaDevice {
            ctx,
            stream,
            modules: Mutex::new(HashMap::new()),
            functions: Mutex::new(HashMap::new()),
            candle: None,
        })
    }

    /// Our kernels on a candle CUDA device: its context and its stream, so a launch is queued
    /// behind the candle ops that produced its inputs and before those that read its outputs, with
    /// no copy and no host synchronization. Other devices are an [`Error::InvalidArgument`].
    pub fn from_candle(device: &candle_core::Device) -> Result<Self> {
        let candle_core::Device::Cuda(cuda) = device else {
            return Err(Error::invalid(
                "CudaDevice::from_candle",
                format!("{:?} is not a CUDA device", device.location()),
            ));
        };
        check_driver()?;
        let stream = cuda.cuda_stream();
        Ok(CudaDevice {
            ctx: stream.context().clone(),
            stream,
            modules: Mutex::new(HashMap::new()),
            functions: Mutex::new(HashMap::new()),
            candle: Some(device.clone()),
        })
    }

    /// Whether this is [`CudaDevice::from_candle`] of `device` (the same candle device, so the
    /// same context and stream).
    pub fn is_candle_device(&self, device: &candle_core::Device) -> bool {
        self.candle.as_ref().is_some_and(|d| d.same_device(device))
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

    /// Opens device `ordinal` as a candle device (the device models and tensors are placed on).
    /// Fails with [`Error::NoCudaDevice`] when there is no driver or GPU and with
    /// [`Error::CudaDriverTooOld`] for an old driver, as [`CudaDevice::new`].
    pub fn candle_device(ordinal: usize) -> Result<candle_core::Device> {
        check_driver()?;
        // candle appends a backtrace (under RUST_BACKTRACE) after the first line: keep the reason.
        candle_core::Device::new_cuda(ordinal).map_err(|e| {
            let message = e.to_string();
            Error::NoCudaDevice(message.lines().next().unwrap_or_default().to_string())
        })
    }

    /// [`CudaDevice::candle_device`] 0 if it can be opened; `None` (with the reason on stderr)
    /// otherwise, for tests that skip cleanly without a GPU.
    pub fn first_available_candle() -> Option<candle_core::Device> {
        match Self::candle_device(0) {
            Ok(d) => Some(d),
            Err(e) => {
                eprintln!("skipping CUDA: {e}");
                None
            }
        }
    }

    /// Hands `slice` (from this device's stream) to candle as a contiguous tensor of `shape`,
    /// without a copy. Needs a device made by [`CudaDevice::from_candle`].
    pub fn tensor_from_slice<T: CudaDType + DeviceRepr>(
        &self,
        slice: CudaSlice<T>,
        shape: impl Into<Shape>,
    ) -> Result<Tensor> {
        const OP: &str = "CudaDevice::tensor_from_slice";
        let shape = shape.into();
        let Some(candle_core::Device::Cuda(candle)) = &self.candle else {
            return Err(Error::invalid(
                OP,
                "this device was not made from a candle device",
            ));
        };
        if shape.elem_count() != slice.len() {
            return Err(Error::invalid(
                OP,
                format!("shape {shape:?} for {} elements", slice.len()),
            ));
        }
        let storage = CudaStorage::wrap_cuda_slice(slice, candle.clone());
        Ok(Tensor::from_storage(
            Storage::Cuda(storage),
            shape,
            candle_core::op::BackpropOp::none(),
            false,
        ))
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
        let image =
            module_fatbin(name).ok_or_else(|| Error::Cuda(format!("no CUDA module `{name}`")))?;
        // `from_binary` hands the bytes to cuModuleLoadData, which takes a fatbin as well as a
        // cubin; the copy is heap memory, aligned as the fatbin header needs (16 bytes from
        // malloc), which the `include_bytes!` static does not promise.
        let m = self
            .ctx
            .load_module(Ptx::from_binary(image.to_vec()))
            .map_err(|e| Error::Cuda(format!("loading module `{name}`: {e}")))?;
        self.check_loaded_kernels(name, &m);
        modules.insert(name, m.clone());
        Ok(m)
    }

    /// Compares each kernel of module `name`, as the driver loaded it, with what ptxas reported
    /// at build time for that architecture, and warns on stderr about a difference, spills or
    /// local memory ([`super::toolchain::load_warning`]). Only warns: the module works either way.
    fn check_loaded_kernels(&self, name: &str, module: &Arc<CudaModule>) {
        use super::toolchain::{load_warning, DriverFigures};
        let mut kernels: Vec<&str> = fatbin::PTXAS
            .iter()
            .filter(|(m, _, _)| *m == name)
            .map(|(_, k, _)| *k)
            .collect();
        // The table lists each kernel once per architecture.
        kernels.sort_unstable();
        kernels.dedup();
        for kernel in kernels {
            let read = module.load_function(kernel).and_then(|f| {
                Ok(DriverFigures {
                    binary_arch: u32::try_from(f.binary_version()?).unwrap_or(0),
                    registers: u32::try_from(f.num_regs()?).unwrap_or(0),
                    local_bytes: u32::try_from(f.local_size_bytes()?).unwrap_or(0),
                })
            });
            let loaded = match read {
                Ok(loaded) => loaded,
                Err(e) => {
                    eprintln!("qlora: warning: kernel `{kernel}`: cannot read its attributes: {e}");
                    continue;
                }
            };
            let built = fatbin::PTXAS
                .iter()
                .find(|(m, k, f)| *m == name && *k == kernel && f.arch == loaded.binary_arch)
                .map(|(_, _, f)| f);
            if let Some(warning) = load_warning(kernel, built, &loaded) {
                eprintln!("qlora: warning: {warning}");
            }
        }
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
        // The same checks as the emulation makes, so a launch that fails or deadlocks on a GPU
        // has failed there first; here they also come before any driver call.
        kernel.check_launch(cfg)?;
        let func = self.function(kernel, cfg.shared_mem_bytes)?;
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

    /// `kernel`'s function, loaded on first use, with its dynamic shared memory limit raised to
    /// `dynamic_shared_bytes` when a launch needs more than the default 48 KiB (static and dynamic
    /// together): only for a kernel that opted in ([`Kernel::dynamic_shared_opt_in`]), and within
    /// the device's opt-in limit; otherwise a typed error before the launch.
    fn function(&self, kernel: &Kernel, dynamic_shared_bytes: u32) -> Result<CudaFunction> {
        use super::launch::DEFAULT_DYNAMIC_SHARED_BYTES;
        use cudarc::driver::sys::{CUdevice_attribute, CUfunction_attribute};
        let mut functions = self
            .functions
            .lock()
            .map_err(|_| Error::Cuda("function cache poisoned".into()))?;
        let key = (kernel.module, kernel.name);
        let loaded = match functions.entry(key) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                let func = self
                    .module(kernel.module)?
                    .load_function(kernel.name)
                    .map_err(cuda_err)?;
                let static_shared_bytes = func.shared_size_bytes().map_err(cuda_err)?.max(0) as u32;
                e.insert(LoadedFunction {
                    func,
                    static_shared_bytes,
                    dynamic_shared_set: 0,
                })
            }
        };
        let total = loaded.static_shared_bytes as u64 + dynamic_shared_bytes as u64;
        if total > DEFAULT_DYNAMIC_SHARED_BYTES as u64
            && dynamic_shared_bytes > loaded.dynamic_shared_set
        {
            if kernel.dynamic_shared_opt_in.is_none() {
                return Err(Error::invalid(
                    kernel.name,
                    format!(
                        "{} bytes of static and {dynamic_shared_bytes} of dynamic shared memory \
                         exceed the {DEFAULT_DYNAMIC_SHARED_BYTES} a kernel gets without opting \
                         in",
                        loaded.static_shared_bytes
                    ),
                ));
            }
            let device_max = self
                .ctx
                .attribute(
                    CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
                )
                .map_err(cuda_err)?
                .max(0) as u64;
            if total > device_max {
                return Err(Error::invalid(
                    kernel.name,
                    format!(
                        "{} bytes of static and {dynamic_shared_bytes} of dynamic shared memory \
                         exceed this device's {device_max}-byte opt-in limit per block",
                        loaded.static_shared_bytes
                    ),
                ));
            }
            // cudarc's set_attribute does not make the context current; the driver call is on a
            // function of this context.
            self.ctx.bind_to_thread().map_err(cuda_err)?;
            loaded
                .func
                .set_attribute(
                    CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    dynamic_shared_bytes as i32,
                )
                .map_err(|e| {
                    Error::Cuda(format!(
                        "{}: setting {dynamic_shared_bytes} bytes of dynamic shared memory: {e}",
                        kernel.name
                    ))
                })?;
            loaded.dynamic_shared_set = dynamic_shared_bytes;
        }
        Ok(loaded.func.clone())
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

    /// `CU_DEVICE_ATTRIBUTE_CONCURRENT_MANAGED_ACCESS`: whether managed memory can be prefetched
    /// to this device and touched by the host while kernels run (0 on Windows and WSL).
    pub fn concurrent_managed_access(&self) -> Result<bool> {
        use cudarc::driver::sys::CUdevice_attribute as A;
        let v = self
            .ctx
            .attribute(A::CU_DEVICE_ATTRIBUTE_CONCURRENT_MANAGED_ACCESS)
            .map_err(cuda_err)?;
        Ok(v != 0)
    }

    /// `(free, total)` device memory in bytes, as `cuMemGetInfo` reports it now.
    pub fn memory_info(&self) -> Result<(usize, usize)> {
        self.ctx.mem_get_info().map_err(cuda_err)
    }

    /// The device's ordinal (its `CUmemLocation` id).
    pub fn ordinal(&self) -> usize {
        self.ctx.ordinal()
    }
}

/// The device buffer behind a contiguous CUDA tensor that starts at the beginning of its storage
/// and spans all of it (a freshly made or uploaded tensor, not a view), for a kernel to read. The
/// caller keeps `storage` locked (`Tensor::storage_and_layout`) until the launch is queued.
pub fn storage_slice<'a, T: CudaDType>(
    storage: &'a Storage,
    layout: &Layout,
) -> Result<&'a CudaSlice<T>> {
    const OP: &str = "cuda::storage_slice";
    let Storage::Cuda(cuda) = storage else {
        return Err(Error::invalid(OP, "the tensor is not on a CUDA device"));
    };
    let slice = cuda.as_cuda_slice::<T>()?;
    match layout.contiguous_offsets() {
        Some((0, end)) if end == slice.len() => Ok(slice),
        _ => Err(Error::invalid(
            OP,
            format!(
                "a {:?} view (start {}) of a {}-element buffer is not a whole contiguous tensor",
                layout.dims(),
                layout.start_offset(),
                slice.len()
            ),
        )),
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

// ---------------------------------------------------------------------------------------------
// The launch-device implementation: the only CUDA-specific part of every launcher
// (docs/ARCHITECTURE.md, "Launch devices").

use super::device::{check_range, Guard, KernelArg, KernelArgMut, LaunchDevice, Ptr, Scalar};
use super::launch::KernelParams;
use cudarc::driver::{CudaView, CudaViewMut, DevicePtr, DevicePtrMut};

impl<T: Scalar> KernelArg<CudaDevice, T> for CudaSlice<T> {
    fn len(&self) -> usize {
        CudaSlice::len(self)
    }
    fn ptr<'a>(&'a self, dev: &'a CudaDevice) -> Ptr<'a> {
        let (addr, guard) = self.device_ptr(&dev.stream);
        Ptr::new(addr as usize, Guard::Cuda(guard))
    }
}

impl<T: Scalar> KernelArgMut<CudaDevice, T> for CudaSlice<T> {
    fn ptr_mut<'a>(&'a mut self, dev: &'a CudaDevice) -> Ptr<'a> {
        let (addr, guard) = self.device_ptr_mut(&dev.stream);
        Ptr::new(addr as usize, Guard::Cuda(guard))
    }
}

impl<T: Scalar> KernelArg<CudaDevice, T> for CudaView<'_, T> {
    fn len(&self) -> usize {
        cudarc::driver::DeviceSlice::len(self)
    }
    fn ptr<'a>(&'a self, dev: &'a CudaDevice) -> Ptr<'a> {
        let (addr, guard) = self.device_ptr(&dev.stream);
        Ptr::new(addr as usize, Guard::Cuda(guard))
    }
}

impl<T: Scalar> KernelArg<CudaDevice, T> for CudaViewMut<'_, T> {
    fn len(&self) -> usize {
        cudarc::driver::DeviceSlice::len(self)
    }
    fn ptr<'a>(&'a self, dev: &'a CudaDevice) -> Ptr<'a> {
        let (addr, guard) = self.device_ptr(&dev.stream);
        Ptr::new(addr as usize, Guard::Cuda(guard))
    }
}

impl<T: Scalar> KernelArgMut<CudaDevice, T> for CudaViewMut<'_, T> {
    fn ptr_mut<'a>(&'a mut self, dev: &'a CudaDevice) -> Ptr<'a> {
        let (addr, guard) = self.device_ptr_mut(&dev.stream);
        Ptr::new(addr as usize, Guard::Cuda(guard))
    }
}

impl LaunchDevice for CudaDevice {
    type Buffer<T: Scalar> = CudaSlice<T>;
    type View<'a, T: Scalar> = CudaView<'a, T>;

    fn label(&self) -> String {
        format!("CUDA device {}", self.ctx.ordinal())
    }

    fn zeros<T: Scalar>(&self, len: usize) -> Result<CudaSlice<T>> {
        self.stream.alloc_zeros::<T>(len).map_err(cuda_err)
    }

    unsafe fn alloc<T: Scalar>(&self, len: usize) -> Result<CudaSlice<T>> {
        // SAFETY: the caller writes every element before reading any (this method's contract).
        unsafe { self.stream.alloc::<T>(len) }.map_err(cuda_err)
    }

    fn upload<T: Scalar>(&self, host: &[T]) -> Result<CudaSlice<T>> {
        self.stream.clone_htod(host).map_err(cuda_err)
    }

    fn download<T: Scalar>(&self, buf: &CudaSlice<T>) -> Result<Vec<T>> {
        self.stream.clone_dtoh(buf).map_err(cuda_err)
    }

    fn slice<'a, T: Scalar>(
        &'a self,
        buf: &'a CudaSlice<T>,
        range: std::ops::Range<usize>,
    ) -> Result<CudaView<'a, T>> {
        check_range("CudaDevice::slice", &range, buf.len())?;
        Ok(buf.slice(range))
    }

    unsafe fn launch<P: KernelParams>(
        &self,
        kernel: &Kernel,
        cfg: &LaunchConfig,
        params: &P,
    ) -> Result<()> {
        // SAFETY: the caller upholds the inherent launch's contract, which is this method's.
        unsafe { CudaDevice::launch(self, kernel, cfg, params) }
    }

    fn synchronize(&self) -> Result<()> {
        CudaDevice::synchronize(self)
    }
}
