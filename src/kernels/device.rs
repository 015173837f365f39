//! Launch devices: the one interface every kernel launcher is written against
//! (docs/ARCHITECTURE.md, "Launch devices").
//!
//! A launcher validates its arguments, computes its launch geometry and fills the kernel's `abi.h`
//! parameter struct once, generic over a [`LaunchDevice`]; the device only allocates buffers,
//! hands out raw pointers that keep their guards alive for the launch, and runs the kernel. Two
//! devices implement it:
//! - [`Emulator`]: host buffers (`Vec<T>`, `[T]`) and the CPU emulation of CUDA
//!   (`kernels/emu/`), which is what CI runs;
//! - `CudaDevice` (feature `cuda`, `src/kernels/cuda.rs`): `CudaSlice`/`CudaView` buffers and the
//!   nvcc-built kernels launched through cudarc.
//!
//! So the code a GPU runs is the code CI runs, except the thin trait implementation.

use super::emu::EmuOptions;
use super::launch::{Kernel, KernelParams, LaunchConfig};
use crate::{Error, Result};
use std::ffi::c_void;
use std::marker::PhantomData;
use std::ops::Range;

/// What a device buffer may hold: plain-data scalars with an all-zero bit pattern valid.
pub trait Scalar: Copy + Default + Send + Sync + ScalarBounds + 'static {}

/// What the CUDA backend additionally needs of a buffer element (nothing without `cuda`).
#[cfg(feature = "cuda")]
pub trait ScalarBounds: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits {}
#[cfg(feature = "cuda")]
impl<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits> ScalarBounds for T {}
/// What the CUDA backend additionally needs of a buffer element (nothing without `cuda`).
#[cfg(not(feature = "cuda"))]
pub trait ScalarBounds {}
#[cfg(not(feature = "cuda"))]
impl<T> ScalarBounds for T {}

impl Scalar for f32 {}
impl Scalar for half::bf16 {}
impl Scalar for half::f16 {}
impl Scalar for i32 {}
impl Scalar for u8 {}
impl Scalar for u32 {}
impl Scalar for i64 {}

/// What keeps a pointer's buffer ordered on its stream until the launch is queued.
pub(crate) enum Guard<'a> {
    /// Memory the borrow itself keeps alive and ordered (host memory; a tensor's device buffer
    /// on the one stream candle and the kernels share).
    Borrow(PhantomData<&'a ()>),
    /// A cudarc stream guard (records the access on the buffer's events when dropped).
    #[cfg(feature = "cuda")]
    Cuda(#[allow(dead_code)] cudarc::driver::SyncOnDrop<'a>),
}

/// A raw pointer into a device buffer, for a kernel's parameter struct. Holds the buffer borrowed
/// (and, on CUDA, its stream guard) for as long as it lives: build the parameters and launch
/// while the `Ptr`s are in scope.
pub struct Ptr<'a> {
    addr: usize,
    _guard: Guard<'a>,
}

impl<'a> Ptr<'a> {
    pub(crate) fn new(addr: usize, guard: Guard<'a>) -> Self {
        Ptr {
            addr,
            _guard: guard,
        }
    }

    /// The null pointer (an absent optional operand).
    pub fn null() -> Ptr<'static> {
        Ptr::new(0, Guard::Borrow(PhantomData))
    }

    /// The address as a typed const pointer.
    pub fn get<X>(&self) -> *const X {
        self.addr as *const X
    }

    /// The address as a typed mutable pointer (for an argument borrowed mutably).
    pub fn get_mut<X>(&self) -> *mut X {
        self.addr as *mut X
    }

    /// The untyped address, as most `abi.h` structs take it.
    pub fn void(&self) -> *const c_void {
        self.get()
    }

    /// The untyped mutable address.
    pub fn void_mut(&self) -> *mut c_void {
        self.get_mut()
    }
}

/// A buffer of `T` on device `D` that a kernel may read: its length and a pointer to its first
/// element.
pub trait KernelArg<D: ?Sized, T> {
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    fn ptr<'a>(&'a self, dev: &'a D) -> Ptr<'a>;
}

/// A buffer of `T` on device `D` that a kernel may write.
pub trait KernelArgMut<D: ?Sized, T>: KernelArg<D, T> {
    fn ptr_mut<'a>(&'a mut self, dev: &'a D) -> Ptr<'a>;
}

impl<D: ?Sized, T, S: KernelArg<D, T> + ?Sized> KernelArg<D, T> for &S {
    fn len(&self) -> usize {
        (**self).len()
    }
    fn ptr<'a>(&'a self, dev: &'a D) -> Ptr<'a> {
        (**self).ptr(dev)
    }
}

impl<D: ?Sized, T, S: KernelArg<D, T> + ?Sized> KernelArg<D, T> for &mut S {
    fn len(&self) -> usize {
        (**self).len()
    }
    fn ptr<'a>(&'a self, dev: &'a D) -> Ptr<'a> {
        (**self).ptr(dev)
    }
}

impl<D: ?Sized, T, S: KernelArgMut<D, T> + ?Sized> KernelArgMut<D, T> for &mut S {
    fn ptr_mut<'a>(&'a mut self, dev: &'a D) -> Ptr<'a> {
        (**self).ptr_mut(dev)
    }
}

/// The pointer of an optional operand: null when absent.
pub fn opt_ptr<'a, D: ?Sized, T, S: KernelArg<D, T> + ?Sized>(
    arg: Option<&'a S>,
    dev: &'a D,
) -> Ptr<'a> {
    match arg {
        Some(a) => a.ptr(dev),
        None => Ptr::null(),
    }
}

/// A device kernels launch on. See the module documentation.
pub trait LaunchDevice: Sized + Sync {
    /// An owned buffer of `T` on this device.
    type Buffer<T: Scalar>: KernelArgMut<Self, T>;
    /// A read-only view of part of a [`Self::Buffer`].
    type View<'a, T: Scalar>: KernelArg<Self, T>
    where
        Self: 'a;

    /// Human-readable name, for errors and test output.
    fn label(&self) -> String;

    /// A buffer of `len` zeros.
    fn zeros<T: Scalar>(&self, len: usize) -> Result<Self::Buffer<T>>;

    /// A buffer of `len` elements that the caller's kernel overwrites entirely before anything
    /// reads it (uninitialised on CUDA, zeros on the emulator).
    ///
    /// # Safety
    /// The contents are unspecified until written: the caller must write every element before
    /// reading any.
    unsafe fn alloc<T: Scalar>(&self, len: usize) -> Result<Self::Buffer<T>>;

    /// A copy of host values on the device.
    fn upload<T: Scalar>(&self, host: &[T]) -> Result<Self::Buffer<T>>;

    /// A copy of a buffer's values on the host (waits for the work queued before it).
    fn download<T: Scalar>(&self, buf: &Self::Buffer<T>) -> Result<Vec<T>>;

    /// Elements `range` of `buf`, without a copy.
    fn slice<'a, T: Scalar>(
        &'a self,
        buf: &'a Self::Buffer<T>,
        range: Range<usize>,
    ) -> Result<Self::View<'a, T>>;

    /// Runs (or queues) `kernel` with `params` as its one argument.
    ///
    /// # Safety
    /// `P` must be the parameter struct the kernel takes, and every pointer in `params` must be
    /// valid for all the reads and writes the kernel makes under `cfg`, until the kernel has run.
    unsafe fn launch<P: KernelParams>(
        &self,
        kernel: &Kernel,
        cfg: &LaunchConfig,
        params: &P,
    ) -> Result<()>;

    /// Waits until every queued launch and copy has finished.
    fn synchronize(&self) -> Result<()>;
}

/// The CPU emulation of CUDA as a launch device: host buffers, kernels run synchronously through
/// `kernels/emu/` with the race checker and watchdog of its [`EmuOptions`].
#[derive(Clone, Copy, Debug, Default)]
pub struct Emulator {
    pub options: EmuOptions,
}

impl Emulator {
    /// An emulator with explicit options.
    pub fn with_options(options: EmuOptions) -> Self {
        Emulator { options }
    }
}

impl<T> KernelArg<Emulator, T> for [T] {
    fn len(&self) -> usize {
        <[T]>::len(self)
    }
    fn ptr<'a>(&'a self, _dev: &'a Emulator) -> Ptr<'a> {
        Ptr::new(self.as_ptr() as usize, Guard::Borrow(PhantomData))
    }
}

impl<T> KernelArgMut<Emulator, T> for [T] {
    fn ptr_mut<'a>(&'a mut self, _dev: &'a Emulator) -> Ptr<'a> {
        Ptr::new(self.as_mut_ptr() as usize, Guard::Borrow(PhantomData))
    }
}

impl<T> KernelArg<Emulator, T> for Vec<T> {
    fn len(&self) -> usize {
        Vec::len(self)
    }
    fn ptr<'a>(&'a self, dev: &'a Emulator) -> Ptr<'a> {
        self.as_slice().ptr(dev)
    }
}

impl<T> KernelArgMut<Emulator, T> for Vec<T> {
    fn ptr_mut<'a>(&'a mut self, dev: &'a Emulator) -> Ptr<'a> {
        self.as_mut_slice().ptr_mut(dev)
    }
}

/// Checks `range` against a buffer of `len` elements.
pub(crate) fn check_range(op: &'static str, range: &Range<usize>, len: usize) -> Result<()> {
    if range.start > range.end || range.end > len {
        return Err(Error::invalid(
            op,
            format!("range {range:?} outside a buffer of {len} elements"),
        ));
    }
    Ok(())
}

impl LaunchDevice for Emulator {
    type Buffer<T: Scalar> = Vec<T>;
    type View<'a, T: Scalar> = &'a [T];

    fn label(&self) -> String {
        "CPU emulation".into()
    }

    fn zeros<T: Scalar>(&self, len: usize) -> Result<Vec<T>> {
        Ok(vec![T::default(); len])
    }

    unsafe fn alloc<T: Scalar>(&self, len: usize) -> Result<Vec<T>> {
        self.zeros(len)
    }

    fn upload<T: Scalar>(&self, host: &[T]) -> Result<Vec<T>> {
        Ok(host.to_vec())
    }

    fn download<T: Scalar>(&self, buf: &Vec<T>) -> Result<Vec<T>> {
        Ok(buf.clone())
    }

    fn slice<'a, T: Scalar>(&'a self, buf: &'a Vec<T>, range: Range<usize>) -> Result<&'a [T]> {
        check_range("Emulator::slice", &range, buf.len())?;
        Ok(&buf[range])
    }

    unsafe fn launch<P: KernelParams>(
        &self,
        kernel: &Kernel,
        cfg: &LaunchConfig,
        params: &P,
    ) -> Result<()> {
        // SAFETY: the caller upholds launch_with's contract, which is this method's.
        unsafe { super::emu::launch_with(kernel, cfg, params, &self.options) }
    }

    fn synchronize(&self) -> Result<()> {
        Ok(())
    }
}

/// Runs a test body `fn(&D)` generic over [`LaunchDevice`] on every device this build has: the
/// CPU emulation always, and (feature `cuda`) device 0 when one opens, printing
/// `skipping CUDA: <reason>` otherwise (which `scripts/gpu-check.sh` counts as a failure).
///
/// `qlora::device_test!(rmsnorm_matches_reference, rmsnorm_parity);` makes the tests
/// `rmsnorm_matches_reference::emulated` and `rmsnorm_matches_reference::cuda`.
#[macro_export]
macro_rules! device_test {
    ($name:ident, $body:ident) => {
        mod $name {
            #[test]
            fn emulated() {
                super::$body(&$crate::kernels::device::Emulator::default());
            }

            #[cfg(feature = "cuda")]
            #[test]
            fn cuda() {
                if let Some(dev) = $crate::kernels::cuda::CudaDevice::first_available() {
                    super::$body(&dev);
                }
            }
        }
    };
}
