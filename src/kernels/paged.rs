//! Paged AdamW states (docs/ARCHITECTURE.md, "Paged optimizer states"): where each tensor's f32 moments `m`,
//! `v` (`[n]` each) live, decided by a pure policy from element counts, the device's
//! concurrent-managed-access attribute and a device-memory budget; and (feature `cuda`) the buffers
//! that follow it, with the AdamW step that moves a paged tensor's states in and out around its update.

use crate::{Error, Result};

/// States with fewer elements stay on the device, as bitsandbytes' paged optimizers keep them.
pub const MIN_PAGED_ELEMS: usize = 100_000;
/// Bytes of state per parameter element: f32 `m` and f32 `v`.
pub const STATE_BYTES_PER_ELEM: u64 = 8;

/// Which states may be paged.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum PagingMode {
    /// Every state on the device.
    #[default]
    Off,
    /// Page the largest states (of at least [`MIN_PAGED_ELEMS`]) until the rest fits the budget.
    Auto,
    /// Page every state of at least [`MIN_PAGED_ELEMS`] (bitsandbytes' `paged_adamw`).
    All,
}

/// How a paged state reaches the device for its update.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// `cuMemAllocManaged` advised to the host, `cuMemPrefetchAsync` to the device before the
    /// update (needs `CU_DEVICE_ATTRIBUTE_CONCURRENT_MANAGED_ACCESS` = 1).
    Managed,
    /// Pinned host memory, copied asynchronously into one shared device staging buffer before the
    /// update and back after (Windows, WSL: the attribute is 0).
    PinnedStaging,
}

/// What the optimizer is asked to do with its states.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PagingPolicy {
    pub mode: PagingMode,
    /// Device bytes the states may hold between updates ([`PagingMode::Auto`] pages until the
    /// device-resident states fit; paged states also go back to the host after their update
    /// unless everything fits).
    pub device_budget_bytes: u64,
    /// Forces a transport; `None` picks [`Transport::Managed`] where the device supports
    /// concurrent managed access and [`Transport::PinnedStaging`] elsewhere.
    pub transport: Option<Transport>,
}

/// Where one tensor's states live.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placement {
    /// Device memory, always.
    Device,
    /// Managed memory preferring the host, prefetched to the device before each update and, with
    /// `evict_after_update`, prefetched back to the host after it.
    Managed { evict_after_update: bool },
    /// Pinned host memory staged through the shared device buffer for each update.
    Pinned,
}

/// The placement of every tensor's states and the device memory that follows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PagingPlan {
    pub placements: Vec<Placement>,
    /// State bytes on the device between updates ([`Placement::Device`] ones, plus the managed
    /// ones when they are not evicted).
    pub resident_bytes: u64,
    /// State bytes that live on the host between updates.
    pub paged_bytes: u64,
    /// Elements of the device staging buffer ([`Placement::Pinned`]: `2 · n` of the largest).
    pub staging_elems: usize,
    /// Device state bytes at the peak of an update: the resident states, the staging buffer and
    /// the one evicted managed state being updated.
    pub peak_device_bytes: u64,
}

fn state_bytes(op: &'static str, n: usize) -> Result<u64> {
    (n as u64)
        .checked_mul(STATE_BYTES_PER_ELEM)
        .ok_or_else(|| Error::invalid(op, format!("{n} elements of state overflow")))
}

/// Places the states of tensors with `elems[i]` elements each under `policy` on a device whose
/// `CU_DEVICE_ATTRIBUTE_CONCURRENT_MANAGED_ACCESS` is `concurrent_managed_access`.
///
/// `Auto` pages the largest eligible states first (ties by index) until the device-resident
/// bytes fit the budget; states under [`MIN_PAGED_ELEMS`] are never paged, so the resident bytes
/// may still exceed a budget smaller than the small states together. Paged states go back to
/// the host after their update unless all states fit the budget together.
pub fn plan_paging(
    policy: &PagingPolicy,
    elems: &[usize],
    concurrent_managed_access: bool,
) -> Result<PagingPlan> {
    const OP: &str = "paging";
    let bytes = elems
        .iter()
        .map(|&n| state_bytes(OP, n))
        .collect::<Result<Vec<u64>>>()?;
    let total = bytes
        .iter()
        .try_fold(0u64, |acc, &b| acc.checked_add(b))
        .ok_or_else(|| Error::invalid(OP, "total state bytes overflow"))?;
    let budget = policy.device_budget_bytes;
    let eligible = |i: usize| elems[i] >= MIN_PAGED_ELEMS;

    let mut paged = vec![false; elems.len()];
    match policy.mode {
        PagingMode::Off => {}
        PagingMode::All => {
            for (i, p) in paged.iter_mut().enumerate() {
                *p = eligible(i);
            }
        }
        PagingMode::Auto => {
            let mut order: Vec<usize> = (0..elems.len()).filter(|&i| eligible(i)).collect();
            order.sort_by(|&a, &b| bytes[b].cmp(&bytes[a]).then(a.cmp(&b)));
            let mut resident = total;
            for i in order {
                if resident <= budget {
                    break;
                }
                paged[i] = true;
                resident -= bytes[i];
            }
        }
    }

    let transport = policy.transport.unwrap_or(if concurrent_managed_access {
        Transport::Managed
    } else {
        Transport::PinnedStaging
    });
    if transport == Transport::Managed && !concurrent_managed_access && paged.contains(&true) {
        return Err(Error::invalid(
            OP,
            "managed paging needs CU_DEVICE_ATTRIBUTE_CONCURRENT_MANAGED_ACCESS = 1",
        ));
    }
    let evict = total > budget;
    let mut plan = PagingPlan {
        placements: Vec::with_capacity(elems.len()),
        resident_bytes: 0,
        paged_bytes: 0,
        staging_elems: 0,
        peak_device_bytes: 0,
    };
    let mut largest_in_flight = 0u64;
    for (i, &is_paged) in paged.iter().enumerate() {
        let placement = match (is_paged, transport) {
            (false, _) => Placement::Device,
            (true, Transport::Managed) => Placement::Managed {
                evict_after_update: evict,
            },
            (true, Transport::PinnedStaging) => Placement::Pinned,
        };
        match placement {
            Placement::Device
            | Placement::Managed {
                evict_after_update: false,
            } => plan.resident_bytes += bytes[i],
            Placement::Managed {
                evict_after_update: true,
            } => {
                plan.paged_bytes += bytes[i];
                largest_in_flight = largest_in_flight.max(bytes[i]);
            }
            Placement::Pinned => {
                plan.paged_bytes += bytes[i];
                plan.staging_elems = plan.staging_elems.max(2 * elems[i]);
            }
        }
        plan.placements.push(placement);
    }
    plan.peak_device_bytes =
        plan.resident_bytes + plan.staging_elems as u64 * 4 + largest_in_flight;
    Ok(plan)
}

#[cfg(feature = "cuda")]
pub use cuda_impl::*;

#[cfg(feature = "cuda")]
mod cuda_impl {
    use super::*;
    use crate::kernels::adamw::{self, AdamWStep};
    use crate::kernels::cuda::{cuda_err, CudaDevice};
    use crate::kernels::device::{Guard, KernelArg, KernelArgMut, Ptr, Scalar};
    use crate::kernels::launch::Element;
    use cudarc::driver::sys::{CUmemLocation, CUmemLocationType, CUmem_advise};
    use cudarc::driver::{
        result, CudaSlice, DevicePtr, DevicePtrMut, PinnedHostSlice, UnifiedSlice,
    };

    /// Managed memory as a kernel argument: its device address, ordered on the device's stream.
    impl<T: Scalar> KernelArg<CudaDevice, T> for UnifiedSlice<T> {
        fn len(&self) -> usize {
            cudarc::driver::DeviceSlice::len(self)
        }
        fn ptr<'a>(&'a self, dev: &'a CudaDevice) -> Ptr<'a> {
            let (addr, guard) = self.device_ptr(dev.stream());
            Ptr::new(addr as usize, Guard::Cuda(guard))
        }
    }

    impl<T: Scalar> KernelArgMut<CudaDevice, T> for UnifiedSlice<T> {
        fn ptr_mut<'a>(&'a mut self, dev: &'a CudaDevice) -> Ptr<'a> {
            let (addr, guard) = self.device_ptr_mut(dev.stream());
            Ptr::new(addr as usize, Guard::Cuda(guard))
        }
    }

    /// One tensor's `m` and `v`, where its [`Placement`] puts them.
    enum Store {
        Device {
            m: CudaSlice<f32>,
            v: CudaSlice<f32>,
        },
        Managed {
            m: UnifiedSlice<f32>,
            v: UnifiedSlice<f32>,
            evict_after_update: bool,
        },
        Pinned {
            m: PinnedHostSlice<f32>,
            v: PinnedHostSlice<f32>,
        },
    }

    /// f32 AdamW moments of a list of tensors placed by a [`PagingPlan`], with the device staging
    /// buffer the pinned ones share. Tensor `i` is updated by [`PagedAdamWStates::step`].
    pub struct PagedAdamWStates {
        plan: PagingPlan,
        elems: Vec<usize>,
        stores: Vec<Store>,
        staging: Option<CudaSlice<f32>>,
    }

    impl std::fmt::Debug for PagedAdamWStates {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("PagedAdamWStates")
                .field("plan", &self.plan)
                .field("elems", &self.elems)
                .finish()
        }
    }

    fn location(kind: CUmemLocationType, id: usize) -> CUmemLocation {
        CUmemLocation {
            type_: kind,
            id: id as i32,
        }
    }

    /// Queues a prefetch of all of `buf` to the device (`to_device`) or the host on `dev`'s stream.
    fn prefetch(dev: &CudaDevice, buf: &UnifiedSlice<f32>, to_device: bool) -> Result<()> {
        let loc = if to_device {
            location(
                CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE,
                dev.ordinal(),
            )
        } else {
            location(CUmemLocationType::CU_MEM_LOCATION_TYPE_HOST, 0)
        };
        let stream = dev.stream();
        let (ptr, _guard) = buf.device_ptr(stream);
        // SAFETY: `ptr` and `buf.num_bytes()` are exactly one whole cuMemAllocManaged allocation
        // (a UnifiedSlice), alive while the guard orders the prefetch on `stream`.
        unsafe { result::mem_prefetch_async(ptr, buf.num_bytes(), loc, stream.cu_stream()) }
            .map_err(cuda_err)
    }

    /// Managed memory holding `init`, advised to live on the host, first touched there.
    fn managed(dev: &CudaDevice, init: &[f32]) -> Result<UnifiedSlice<f32>> {
        // SAFETY: f32 is valid for any bit pattern; every element is written below before any read.
        let mut buf =
            unsafe { dev.context().alloc_unified::<f32>(init.len(), true) }.map_err(cuda_err)?;
        let (ptr, guard) = buf.device_ptr(dev.stream());
        let loc = location(CUmemLocationType::CU_MEM_LOCATION_TYPE_HOST, 0);
        // SAFETY: `ptr` spans exactly the managed allocation just made (`num_bytes`).
        unsafe {
            result::mem_advise(
                ptr,
                buf.num_bytes(),
                CUmem_advise::CU_MEM_ADVISE_SET_PREFERRED_LOCATION,
                loc,
            )
        }
        .map_err(cuda_err)?;
        drop(guard);
        buf.as_mut_slice().map_err(cuda_err)?.copy_from_slice(init);
        Ok(buf)
    }

    /// Page-locked host memory holding `init`.
    fn pinned(dev: &CudaDevice, init: &[f32]) -> Result<PinnedHostSlice<f32>> {
        // Plain (not write-combined) pinned memory: the host reads it back for checkpoints.
        // SAFETY: f32 is valid for any bit pattern; every element is written below before any read.
        let mut buf = unsafe { dev.context().alloc_pinned_with_flags::<f32>(init.len(), 0) }
            .map_err(cuda_err)?;
        buf.as_mut_slice().map_err(cuda_err)?.copy_from_slice(init);
        Ok(buf)
    }

    impl PagedAdamWStates {
        /// Zero moments for tensors of `elems[i]` elements, placed by [`plan_paging`] with the
        /// device's concurrent-managed-access attribute.
        pub fn zeros(dev: &CudaDevice, policy: &PagingPolicy, elems: &[usize]) -> Result<Self> {
            let zeros: Vec<(Vec<f32>, Vec<f32>)> = elems
                .iter()
                .map(|&n| (vec![0.0; n], vec![0.0; n]))
                .collect();
            Self::from_host(dev, policy, &zeros)
        }

        /// Moments `(m, v)` per tensor (from a checkpoint, or zeros), placed by [`plan_paging`].
        pub fn from_host(
            dev: &CudaDevice,
            policy: &PagingPolicy,
            moments: &[(Vec<f32>, Vec<f32>)],
        ) -> Result<Self> {
            const OP: &str = "paged_adamw";
            for (i, (m, v)) in moments.iter().enumerate() {
                if m.len() != v.len() || m.is_empty() {
                    return Err(Error::invalid(
                        OP,
                        format!("tensor {i} has {} m and {} v values", m.len(), v.len()),
                    ));
                }
            }
            let elems: Vec<usize> = moments.iter().map(|(m, _)| m.len()).collect();
            let plan = plan_paging(policy, &elems, dev.concurrent_managed_access()?)?;
            let stream = dev.stream();
            let mut stores = Vec::with_capacity(moments.len());
            for ((m, v), placement) in moments.iter().zip(&plan.placements) {
                stores.push(match *placement {
                    Placement::Device => Store::Device {
                        m: stream.clone_htod(m).map_err(cuda_err)?,
                        v: stream.clone_htod(v).map_err(cuda_err)?,
                    },
                    Placement::Managed { evict_after_update } => Store::Managed {
                        m: managed(dev, m)?,
                        v: managed(dev, v)?,
                        evict_after_update,
                    },
                    Placement::Pinned => Store::Pinned {
                        m: pinned(dev, m)?,
                        v: pinned(dev, v)?,
                    },
                });
            }
            let staging = match plan.staging_elems {
                0 => None,
                n => Some(stream.alloc_zeros::<f32>(n).map_err(cuda_err)?),
            };
            Ok(PagedAdamWStates {
                plan,
                elems,
                stores,
                staging,
            })
        }

        pub fn plan(&self) -> &PagingPlan {
            &self.plan
        }

        /// Element count of each tensor.
        pub fn elems(&self) -> &[usize] {
            &self.elems
        }

        /// One AdamW step of tensor `index`: `param` (`[n]`) updated in place with `grad` and the
        /// tensor's moments, on `dev`'s stream. A managed state is prefetched to the device just
        /// before the kernel (and back to the host after, when evicted); a pinned one is copied
        /// into the staging buffer and back.
        pub fn step<T: Element, G: Element>(
            &mut self,
            dev: &CudaDevice,
            step: &AdamWStep,
            index: usize,
            param: &mut (impl KernelArgMut<CudaDevice, T> + ?Sized),
            grad: &(impl KernelArg<CudaDevice, G> + ?Sized),
        ) -> Result<()> {
            const OP: &str = "paged_adamw";
            let count = self.stores.len();
            let n = *self.elems.get(index).ok_or_else(|| {
                Error::invalid(OP, format!("tensor {index} of {count} does not exist"))
            })?;
            if param.len() != n || grad.len() != n {
                return Err(Error::invalid(
                    OP,
                    format!(
                        "tensor {index} has {n} states but {} params and {} grads",
                        param.len(),
                        grad.len()
                    ),
                ));
            }
            match &mut self.stores[index] {
                Store::Device { m, v } => adamw::step(dev, step, param, grad, m, v),
                Store::Managed {
                    m,
                    v,
                    evict_after_update,
                } => {
                    prefetch(dev, m, true)?;
                    prefetch(dev, v, true)?;
                    adamw::step(dev, step, param, grad, m, v)?;
                    if *evict_after_update {
                        prefetch(dev, m, false)?;
                        prefetch(dev, v, false)?;
                    }
                    Ok(())
                }
                Store::Pinned { m, v } => {
                    let staging = self.staging.as_mut().ok_or_else(|| {
                        Error::invalid(OP, "pinned states without a staging buffer")
                    })?;
                    if staging.len() < 2 * n {
                        return Err(Error::invalid(
                            OP,
                            format!("staging holds {} elements, need {}", staging.len(), 2 * n),
                        ));
                    }
                    let stream = dev.stream();
                    let mut used = staging.slice_mut(..2 * n);
                    let (mut d_m, mut d_v) = used.split_at_mut(n);
                    stream.memcpy_htod(&*m, &mut d_m).map_err(cuda_err)?;
                    stream.memcpy_htod(&*v, &mut d_v).map_err(cuda_err)?;
                    adamw::step(dev, step, param, grad, &mut d_m, &mut d_v)?;
                    stream.memcpy_dtoh(&d_m, m).map_err(cuda_err)?;
                    stream.memcpy_dtoh(&d_v, v).map_err(cuda_err)?;
                    Ok(())
                }
            }
        }

        /// Tensor `index`'s moments `(m, v)` copied to the host (waits for queued updates).
        pub fn to_host(&self, dev: &CudaDevice, index: usize) -> Result<(Vec<f32>, Vec<f32>)> {
            let store = self.stores.get(index).ok_or_else(|| {
                Error::invalid(
                    "paged_adamw",
                    format!("tensor {index} of {} does not exist", self.stores.len()),
                )
            })?;
            dev.synchronize()?;
            match store {
                Store::Device { m, v } => {
                    let s = dev.stream();
                    Ok((
                        s.clone_dtoh(m).map_err(cuda_err)?,
                        s.clone_dtoh(v).map_err(cuda_err)?,
                    ))
                }
                Store::Managed { m, v, .. } => Ok((
                    m.as_slice().map_err(cuda_err)?.to_vec(),
                    v.as_slice().map_err(cuda_err)?.to_vec(),
                )),
                Store::Pinned { m, v } => Ok((
                    m.as_slice().map_err(cuda_err)?.to_vec(),
                    v.as_slice().map_err(cuda_err)?.to_vec(),
                )),
            }
        }
    }
}
