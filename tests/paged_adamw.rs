//! Paged AdamW states: the placement policy (pure, CPU) on element counts, budgets and the
//! concurrent-managed-access attribute; and, with a GPU, paged (managed and pinned-staging) vs
//! unpaged states vs the CPU reference bit for bit over several steps, and `CudaAdamW` ≡ `CpuAdamW`.

use candle_core::{DType, Device};
use qlora::kernels::paged::{
    plan_paging, PagingMode, PagingPolicy, Placement, Transport, MIN_PAGED_ELEMS,
    STATE_BYTES_PER_ELEM,
};
use qlora::model::config::LlamaConfig;
use qlora::peft::{LoraAdapter, LoraConfig, TargetModule};

const B: u64 = STATE_BYTES_PER_ELEM;

fn policy(mode: PagingMode, budget_elems: u64) -> PagingPolicy {
    PagingPolicy {
        mode,
        device_budget_bytes: budget_elems * B,
        transport: None,
    }
}

const EVICTED: Placement = Placement::Managed {
    evict_after_update: true,
};

#[test]
fn off_keeps_every_state_on_the_device() {
    let plan = plan_paging(&policy(PagingMode::Off, 0), &[1, 500_000, 2_000_000], true).unwrap();
    assert_eq!(plan.placements, vec![Placement::Device; 3]);
    assert_eq!(plan.resident_bytes, 2_500_001 * B);
    assert_eq!(plan.paged_bytes, 0);
    assert_eq!(plan.peak_device_bytes, plan.resident_bytes);
}

#[test]
fn states_under_1e5_elements_are_never_paged() {
    let elems = [MIN_PAGED_ELEMS - 1, MIN_PAGED_ELEMS, 7];
    let plan = plan_paging(&policy(PagingMode::All, 0), &elems, true).unwrap();
    assert_eq!(
        plan.placements,
        vec![Placement::Device, EVICTED, Placement::Device]
    );
    // Auto with a zero budget pages what it may and leaves the small ones resident, over budget.
    let plan = plan_paging(&policy(PagingMode::Auto, 0), &elems, true).unwrap();
    assert_eq!(
        plan.placements,
        vec![Placement::Device, EVICTED, Placement::Device]
    );
    assert_eq!(plan.resident_bytes, (MIN_PAGED_ELEMS as u64 - 1 + 7) * B);
}

#[test]
fn auto_pages_the_largest_states_until_the_rest_fits() {
    let elems = [200_000, 300_000, 150_000, 1_000];
    // Paging the 300k tensor alone leaves exactly the budget resident.
    let plan = plan_paging(&policy(PagingMode::Auto, 351_000), &elems, true).unwrap();
    assert_eq!(
        plan.placements,
        vec![
            Placement::Device,
            EVICTED,
            Placement::Device,
            Placement::Device
        ]
    );
    assert_eq!(plan.resident_bytes, 351_000 * B);
    assert_eq!(plan.paged_bytes, 300_000 * B);
    // The evicted state is on the device only while it is updated.
    assert_eq!(plan.peak_device_bytes, 651_000 * B);
    // One byte less pages the next largest too.
    let mut p = policy(PagingMode::Auto, 351_000);
    p.device_budget_bytes -= 1;
    let plan = plan_paging(&p, &elems, true).unwrap();
    assert_eq!(
        plan.placements,
        vec![EVICTED, EVICTED, Placement::Device, Placement::Device]
    );
    assert_eq!(plan.resident_bytes, 151_000 * B);
    assert_eq!(plan.peak_device_bytes, 451_000 * B);
}

#[test]
fn auto_within_the_budget_pages_nothing() {
    let elems = [200_000, 300_000];
    let plan = plan_paging(&policy(PagingMode::Auto, 500_000), &elems, true).unwrap();
    assert_eq!(plan.placements, vec![Placement::Device; 2]);
}

#[test]
fn equal_sizes_page_in_index_order() {
    let elems = [100_000, 100_000, 100_000];
    let plan = plan_paging(&policy(PagingMode::Auto, 200_000), &elems, true).unwrap();
    assert_eq!(
        plan.placements,
        vec![EVICTED, Placement::Device, Placement::Device]
    );
}

#[test]
fn all_keeps_paged_states_on_the_device_when_everything_fits() {
    let elems = [100_000, 5];
    let plan = plan_paging(&policy(PagingMode::All, 100_005), &elems, true).unwrap();
    assert_eq!(
        plan.placements,
        vec![
            Placement::Managed {
                evict_after_update: false
            },
            Placement::Device
        ]
    );
    assert_eq!(plan.resident_bytes, 100_005 * B);
    assert_eq!(plan.paged_bytes, 0);
}

#[test]
fn without_concurrent_managed_access_paged_states_are_staged_through_pinned_memory() {
    let elems = [300_000, 200_000, 10];
    let plan = plan_paging(&policy(PagingMode::All, 0), &elems, false).unwrap();
    assert_eq!(
        plan.placements,
        vec![Placement::Pinned, Placement::Pinned, Placement::Device]
    );
    assert_eq!(plan.staging_elems, 600_000);
    assert_eq!(plan.resident_bytes, 10 * B);
    assert_eq!(plan.paged_bytes, 500_000 * B);
    assert_eq!(plan.peak_device_bytes, 10 * B + 600_000 * 4);
}

#[test]
fn a_forced_transport_overrides_the_attribute() {
    let elems = [150_000];
    let mut p = policy(PagingMode::All, 0);
    p.transport = Some(Transport::PinnedStaging);
    let plan = plan_paging(&p, &elems, true).unwrap();
    assert_eq!(plan.placements, vec![Placement::Pinned]);
    // Managed paging where the device cannot prefetch is refused, not silently degraded.
    p.transport = Some(Transport::Managed);
    assert!(matches!(
        plan_paging(&p, &elems, false),
        Err(qlora::Error::InvalidArgument { .. })
    ));
    // Nothing to page: no transport is needed.
    assert!(plan_paging(&p, &[10], false).is_ok());
}

#[test]
fn overflowing_sizes_are_rejected() {
    let p = policy(PagingMode::Auto, 0);
    assert!(plan_paging(&p, &[usize::MAX], true).is_err());
    assert!(plan_paging(&p, &[usize::MAX / 9, usize::MAX / 9], true).is_err());
}

/// One layer, hidden 1600, the model `CudaAdamW` is tested on with r 64: q_proj's A `[64, 1600]`
/// and B `[1600, 64]` and down_proj's B `[1600, 64]` hold 102 400 elements (pageable), down_proj's
/// A `[64, 48]` 3 072 (always on the device).
fn model_config() -> LlamaConfig {
    LlamaConfig::from_json_str(
        r#"{"model_type": "llama", "hidden_size": 1600, "intermediate_size": 48,
            "num_hidden_layers": 1, "num_attention_heads": 25, "num_key_value_heads": 5,
            "rms_norm_eps": 1e-5, "vocab_size": 32, "max_position_embeddings": 64}"#,
    )
    .unwrap()
}

fn optimizer_test_lora() -> LoraConfig {
    LoraConfig {
        r: 64,
        alpha: 16.0,
        target_modules: vec![TargetModule::QProj, TargetModule::DownProj],
        ..LoraConfig::default()
    }
}

/// The premise of `cuda_adamw_matches_cpu_adamw_with_paged_states`: its adapter has states on
/// both sides of the paging threshold.
#[test]
fn the_optimizer_test_adapter_straddles_the_paging_threshold() {
    let adapter = LoraAdapter::init(
        optimizer_test_lora(),
        &model_config(),
        DType::F32,
        &Device::Cpu,
        5,
    )
    .unwrap();
    let elems: Vec<usize> = adapter
        .pairs()
        .flat_map(|(_, p)| [p.a.elem_count(), p.b.elem_count()])
        .collect();
    assert_eq!(elems, vec![102_400, 102_400, 3_072, 102_400]);
    let plan = plan_paging(&policy(PagingMode::All, 0), &elems, true).unwrap();
    assert_eq!(
        plan.placements,
        vec![EVICTED, EVICTED, Placement::Device, EVICTED]
    );
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::*;
    use candle_core::Tensor;
    use half::bf16;
    use qlora::kernels::adamw::{reference_step, AdamWConfig};
    use qlora::kernels::cuda::CudaDevice;
    use qlora::kernels::launch::Element;
    use qlora::kernels::paged::PagedAdamWStates;
    use qlora::peft::LoraPair;
    use qlora::testing::normal_vector;
    use qlora::tolerance::{lookup, Dtype, Op};
    use qlora::train::cuda_adamw::CudaAdamW;
    use qlora::train::trainer::{CpuAdamW, Optimizer};
    use std::collections::BTreeMap;
    use std::sync::Arc;

    /// A small state (device), one just over the paging threshold and one of odd size.
    const ELEMS: [usize; 3] = [1_000, MIN_PAGED_ELEMS + 3, 250_001];
    const STEPS: u64 = 4;

    fn cfg() -> AdamWConfig {
        AdamWConfig {
            lr: 1e-2,
            betas: (0.9, 0.999),
            eps: 1e-8,
            weight_decay: 0.1,
        }
    }

    fn widen<T: Element>(v: &[T]) -> Vec<f32> {
        v.iter().map(|x| x.to_f32()).collect()
    }

    use qlora::kernels::launch::tolerance_dtype as dtype_of;

    /// Runs STEPS updates of every tensor through `policy`'s placement and the CPU reference side
    /// by side; params and both moments must agree bit for bit. Returns the placements used.
    fn run<T: Element>(dev: &CudaDevice, policy: &PagingPolicy) -> Vec<Placement> {
        let tol = lookup(Op::AdamW, dtype_of::<T>());
        let s = dev.stream();
        let mut states = PagedAdamWStates::zeros(dev, policy, &ELEMS).unwrap();
        let mut refs: Vec<(Vec<T>, Vec<f32>, Vec<f32>)> = ELEMS
            .iter()
            .map(|&n| {
                let p = normal_vector(n, 0.5, n as u64)
                    .iter()
                    .map(|&x| T::from_f32(x))
                    .collect();
                (p, vec![0.0; n], vec![0.0; n])
            })
            .collect();
        let mut d_params: Vec<_> = refs
            .iter()
            .map(|(p, _, _)| s.clone_htod(p).unwrap())
            .collect();
        for k in 1..=STEPS {
            let step = cfg().step(k, 0.5).unwrap();
            for (i, &n) in ELEMS.iter().enumerate() {
                let g = normal_vector(n, 1e-2, 100 * k + i as u64);
                let (p, m, v) = &mut refs[i];
                reference_step(&step, p, &g, m, v).unwrap();
                let d_g = s.clone_htod(&g).unwrap();
                states.step(dev, &step, i, &mut d_params[i], &d_g).unwrap();
            }
        }
        for (i, (p, m, v)) in refs.iter().enumerate() {
            let got: Vec<T> = s.clone_dtoh(&d_params[i]).unwrap();
            let what = format!("{policy:?} tensor {i}");
            tol.check(&widen(&got), &widen(p))
                .map_err(|e| format!("{what}: param {e}"))
                .unwrap();
            let (gm, gv) = states.to_host(dev, i).unwrap();
            let exact = lookup(Op::AdamW, Dtype::F32);
            exact
                .check(&gm, m)
                .map_err(|e| format!("{what}: m {e}"))
                .unwrap();
            exact
                .check(&gv, v)
                .map_err(|e| format!("{what}: v {e}"))
                .unwrap();
        }
        states.plan().placements.clone()
    }

    fn policies(managed: bool) -> Vec<(PagingPolicy, Vec<Placement>)> {
        let unpaged = vec![Placement::Device; 3];
        let pinned = vec![Placement::Device, Placement::Pinned, Placement::Pinned];
        let mut out = vec![
            (policy(PagingMode::Off, 0), unpaged),
            (
                PagingPolicy {
                    transport: Some(Transport::PinnedStaging),
                    ..policy(PagingMode::All, 0)
                },
                pinned,
            ),
        ];
        if managed {
            // Auto with room for all but the largest: only it is paged, and evicted after updates.
            out.push((
                policy(PagingMode::Auto, (ELEMS[0] + ELEMS[1]) as u64),
                vec![Placement::Device, Placement::Device, EVICTED],
            ));
            out.push((
                policy(PagingMode::All, 1 << 40),
                vec![
                    Placement::Device,
                    Placement::Managed {
                        evict_after_update: false,
                    },
                    Placement::Managed {
                        evict_after_update: false,
                    },
                ],
            ));
        }
        out
    }

    #[test]
    fn paged_and_unpaged_states_match_the_reference_bit_for_bit() {
        let Some(dev) = CudaDevice::first_available() else {
            return;
        };
        let managed = dev.concurrent_managed_access().unwrap();
        if !managed {
            eprintln!("device lacks concurrent managed access: managed paging not exercised");
        }
        for (p, want) in policies(managed) {
            assert_eq!(run::<f32>(&dev, &p), want, "{p:?}");
            assert_eq!(run::<bf16>(&dev, &p), want, "{p:?}");
        }
    }

    #[test]
    fn the_pinned_fallback_stages_states_through_the_device_when_forced() {
        let Some(dev) = CudaDevice::first_available() else {
            return;
        };
        let p = PagingPolicy {
            transport: Some(Transport::PinnedStaging),
            ..policy(PagingMode::Auto, 0)
        };
        let placements = run::<f32>(&dev, &p);
        assert_eq!(
            placements,
            vec![Placement::Device, Placement::Pinned, Placement::Pinned]
        );
    }

    #[test]
    fn a_step_with_mismatched_lengths_is_rejected() {
        let Some(dev) = CudaDevice::first_available() else {
            return;
        };
        let s = dev.stream();
        let mut states = PagedAdamWStates::zeros(&dev, &policy(PagingMode::Off, 0), &[10]).unwrap();
        let step = cfg().step(1, 1.0).unwrap();
        let mut p = s.clone_htod(&[0f32; 9]).unwrap();
        let g = s.clone_htod(&[0f32; 10]).unwrap();
        assert!(states.step(&dev, &step, 0, &mut p, &g).is_err());
        let mut p = s.clone_htod(&[0f32; 10]).unwrap();
        assert!(states.step(&dev, &step, 1, &mut p, &g).is_err());
    }

    fn seeded(dims: &[usize], seed: u64, device: &Device) -> Tensor {
        let n = dims.iter().product();
        Tensor::from_vec(normal_vector(n, 1e-2, seed), dims, device).unwrap()
    }

    #[test]
    fn cuda_adamw_matches_cpu_adamw_with_paged_states() {
        let Some(dev) = CudaDevice::first_available().map(Arc::new) else {
            return;
        };
        let gpu = Device::new_cuda(0).unwrap();
        let lora = optimizer_test_lora();
        let model = model_config();
        for dtype in [DType::F32, DType::BF16] {
            let mut cpu_adapter =
                LoraAdapter::init(lora.clone(), &model, dtype, &Device::Cpu, 5).unwrap();
            // The GPU adapter starts as a copy of the CPU one.
            let mut gpu_adapter = cpu_adapter.clone();
            let pairs: Vec<_> = cpu_adapter.pairs().map(|(k, p)| (k, p.clone())).collect();
            for ((layer, module), pair) in &pairs {
                let moved = LoraPair {
                    a: pair.a.to_device(&gpu).unwrap(),
                    b: pair.b.to_device(&gpu).unwrap(),
                };
                gpu_adapter.set_pair(*layer, *module, moved).unwrap();
            }
            let mut cpu_opt = CpuAdamW::new(cfg()).unwrap();
            let policy = PagingPolicy {
                mode: PagingMode::All,
                device_budget_bytes: 0,
                transport: None,
            };
            let mut gpu_opt = CudaAdamW::new(dev.clone(), cfg(), policy).unwrap();
            for k in 1..=STEPS {
                let mut cpu_grads = BTreeMap::new();
                let mut gpu_grads = BTreeMap::new();
                for (i, ((layer, module), pair)) in pairs.iter().enumerate() {
                    let seed = 10 * k + i as u64;
                    let a = seeded(pair.a.dims(), seed, &Device::Cpu);
                    let b = seeded(pair.b.dims(), seed + 5, &Device::Cpu);
                    let on_gpu = LoraPair {
                        a: a.to_device(&gpu).unwrap(),
                        b: b.to_device(&gpu).unwrap(),
                    };
                    cpu_grads.insert((*layer, *module), LoraPair { a, b });
                    gpu_grads.insert((*layer, *module), on_gpu);
                }
                let lr = 1e-2 / k as f64;
                cpu_opt.step(&mut cpu_adapter, &cpu_grads, lr, 0.8).unwrap();
                gpu_opt.step(&mut gpu_adapter, &gpu_grads, lr, 0.8).unwrap();
            }
            assert_eq!(gpu_opt.steps(), STEPS);
            let placements = &gpu_opt.states().unwrap().plan().placements;
            assert!(
                placements.iter().any(|p| *p != Placement::Device),
                "some state must be paged: {placements:?}"
            );
            let exact = lookup(Op::AdamW, Dtype::F32);
            let flat = |t: &Tensor| -> Vec<f32> {
                t.to_device(&Device::Cpu)
                    .unwrap()
                    .to_dtype(DType::F32)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap()
            };
            for ((key, want), (_, got)) in cpu_adapter.pairs().zip(gpu_adapter.pairs()) {
                exact
                    .check(&flat(&got.a), &flat(&want.a))
                    .unwrap_or_else(|e| panic!("{key:?} A {e}"));
                exact
                    .check(&flat(&got.b), &flat(&want.b))
                    .unwrap_or_else(|e| panic!("{key:?} B {e}"));
            }
            let gpu_moments = gpu_opt.moments().unwrap();
            for (key, want) in cpu_opt.moments() {
                let got = &gpu_moments[key];
                for j in 0..2 {
                    exact.check(&got[j].m, &want[j].m).unwrap();
                    exact.check(&got[j].v, &want[j].v).unwrap();
                }
            }
        }
    }

    #[test]
    fn cuda_adamw_rejects_cpu_tensors_without_changing_anything() {
        let Some(dev) = CudaDevice::first_available() else {
            return;
        };
        let lora = LoraConfig {
            r: 2,
            target_modules: vec![TargetModule::QProj],
            ..LoraConfig::default()
        };
        let mut adapter =
            LoraAdapter::init(lora, &model_config(), DType::F32, &Device::Cpu, 1).unwrap();
        let grads: BTreeMap<_, _> = adapter
            .pairs()
            .map(|(k, p)| {
                let g = LoraPair {
                    a: p.a.ones_like().unwrap(),
                    b: p.b.ones_like().unwrap(),
                };
                (k, g)
            })
            .collect();
        let mut opt = CudaAdamW::new(Arc::new(dev), cfg(), PagingPolicy::default()).unwrap();
        let before: Vec<f32> = adapter
            .pairs()
            .next()
            .unwrap()
            .1
            .a
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!(opt.step(&mut adapter, &grads, 1e-3, 1.0).is_err());
        assert_eq!(opt.steps(), 0);
        assert!(opt.states().is_none());
        let after: Vec<f32> = adapter
            .pairs()
            .next()
            .unwrap()
            .1
            .a
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(before, after);
    }
}
