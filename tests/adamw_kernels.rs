//! Parity of the fused AdamW kernels in kernels/adamw.cu: the Rust reference ≡ the same CUDA
//! source run through the CPU emulation ≡ CUDA when a GPU is present (each launcher test body runs
//! on every device, `qlora::device_test!`), over several steps on odd sizes, f32/bf16 params and
//! grads, with and without weight decay and grad_scale; f32 and 8-bit blockwise moments; the
//! reference ≡ torch.optim.AdamW (tests/fixtures/adamw).

use std::collections::HashMap;
use std::path::PathBuf;

use half::bf16;
use qlora::kernels::adamw::{
    self, dynamic_map_unsigned, reference_step, reference_step_8bit, AdamW8bitState, AdamWConfig,
    AdamWStep, DeviceAdamW8bitState,
};
use qlora::kernels::device::LaunchDevice;
use qlora::kernels::launch::Element;
use qlora::testing::normal_vector;
use qlora::tolerance::{lookup, Dtype, Op};
use qlora::Error;
use safetensors::SafeTensors;
use serde::Deserialize;

/// Not multiples of a warp, of the 256-thread block or of the 256-element state block.
const SIZES: &[usize] = &[1, 255, 257, 1000, 4097];
const STEPS: u64 = 3;

fn configs() -> [(AdamWConfig, f32); 3] {
    let plain = AdamWConfig {
        lr: 1e-2,
        betas: (0.9, 0.999),
        eps: 1e-8,
        weight_decay: 0.0,
    };
    let decayed = AdamWConfig {
        weight_decay: 0.1,
        ..plain
    };
    // 1 - beta1 >= 0.5 takes lerp's other branch.
    let low_beta1 = AdamWConfig {
        lr: 3e-3,
        betas: (0.3, 0.99),
        eps: 1e-6,
        weight_decay: 0.05,
    };
    [(plain, 1.0), (decayed, 0.37), (low_beta1, 2.5)]
}

fn as_dtype<T: Element>(v: &[f32]) -> Vec<T> {
    v.iter().map(|&x| T::from_f32(x)).collect()
}

fn widen<T: Element>(v: &[T]) -> Vec<f32> {
    v.iter().map(|x| x.to_f32()).collect()
}

use qlora::kernels::launch::tolerance_dtype as param_dtype;

/// Gradients of step `k`: normal values with a few exact zeros and a spread of magnitudes.
fn grads(n: usize, k: u64) -> Vec<f32> {
    let mut g = normal_vector(n, 1.0, 1000 + k);
    for (i, x) in g.iter_mut().enumerate() {
        *x *= [1e-6, 1e-3, 1.0, 10.0][i % 4];
        if i % 13 == 5 {
            *x = 0.0;
        }
    }
    g
}

fn check<D: LaunchDevice, T: Element, G: Element>(
    dev: &D,
    n: usize,
    cfg: &AdamWConfig,
    grad_scale: f32,
) {
    let tol = lookup(Op::AdamW, param_dtype::<T>());
    let mut p_ref: Vec<T> = as_dtype(&normal_vector(n, 0.5, n as u64));
    let (mut m_ref, mut v_ref) = (vec![0f32; n], vec![0f32; n]);
    let mut d_p = dev.upload(&p_ref).unwrap();
    let (mut d_m, mut d_v) = (dev.upload(&m_ref).unwrap(), dev.upload(&v_ref).unwrap());
    for k in 1..=STEPS {
        let step = cfg.step(k, grad_scale).unwrap();
        let g: Vec<G> = as_dtype(&grads(n, k));
        reference_step(&step, &mut p_ref, &g, &mut m_ref, &mut v_ref).unwrap();
        let d_g = dev.upload(&g).unwrap();
        adamw::step(dev, &step, &mut d_p, &d_g, &mut d_m, &mut d_v).unwrap();
        let what = format!("{} n={n} {cfg:?} scale={grad_scale} step {k}", dev.label());
        for (name, got, want) in [
            ("param", widen(&dev.download(&d_p).unwrap()), widen(&p_ref)),
            ("m", dev.download(&d_m).unwrap(), m_ref.clone()),
            ("v", dev.download(&d_v).unwrap(), v_ref.clone()),
        ] {
            if let Err(e) = tol.check(&got, &want) {
                panic!("{what} {name}: {e}");
            }
        }
    }
}

fn f32_moments_every_size<D: LaunchDevice>(dev: &D) {
    for &n in SIZES {
        for (cfg, scale) in configs() {
            check::<D, f32, f32>(dev, n, &cfg, scale);
            check::<D, bf16, bf16>(dev, n, &cfg, scale);
            check::<D, f32, bf16>(dev, n, &cfg, scale);
        }
    }
    check::<D, bf16, f32>(dev, 1000, &configs()[1].0, 0.37);
}
qlora::device_test!(
    f32_moments_match_reference_over_steps,
    f32_moments_every_size
);

fn check_8bit<D: LaunchDevice, T: Element, G: Element>(
    dev: &D,
    n: usize,
    cfg: &AdamWConfig,
    grad_scale: f32,
) {
    let tol = lookup(Op::AdamW, param_dtype::<T>());
    let mut p_ref: Vec<T> = as_dtype(&normal_vector(n, 0.5, n as u64 + 1));
    let mut s_ref = AdamW8bitState::zeros(n);
    let mut d_p = dev.upload(&p_ref).unwrap();
    let mut d_s = DeviceAdamW8bitState::from_host(dev, &s_ref).unwrap();
    for k in 1..=STEPS {
        let step = cfg.step(k, grad_scale).unwrap();
        let g: Vec<G> = as_dtype(&grads(n, k + 10));
        reference_step_8bit(&step, &mut p_ref, &g, &mut s_ref).unwrap();
        let d_g = dev.upload(&g).unwrap();
        adamw::step_8bit(dev, &step, &mut d_p, &d_g, &mut d_s).unwrap();
        let s_dev = d_s.to_host(dev).unwrap();
        let what = format!("{} n={n} {cfg:?} scale={grad_scale} step {k}", dev.label());
        if let Some(i) = s_dev.m_q.iter().zip(&s_ref.m_q).position(|(a, b)| a != b) {
            panic!("{what}: m code [{i}] {} vs {}", s_dev.m_q[i], s_ref.m_q[i]);
        }
        if let Some(i) = s_dev.v_q.iter().zip(&s_ref.v_q).position(|(a, b)| a != b) {
            panic!("{what}: v code [{i}] {} vs {}", s_dev.v_q[i], s_ref.v_q[i]);
        }
        let exact = lookup(Op::AdamW, Dtype::F32);
        exact.check(&s_dev.m_absmax, &s_ref.m_absmax).unwrap();
        exact.check(&s_dev.v_absmax, &s_ref.v_absmax).unwrap();
        if let Err(e) = tol.check(&widen(&dev.download(&d_p).unwrap()), &widen(&p_ref)) {
            panic!("{what} param: {e}");
        }
    }
}

fn eight_bit_moments_every_size<D: LaunchDevice>(dev: &D) {
    for &n in SIZES {
        for (cfg, scale) in configs() {
            check_8bit::<D, f32, f32>(dev, n, &cfg, scale);
        }
        check_8bit::<D, bf16, bf16>(dev, n, &configs()[1].0, 1.0);
        check_8bit::<D, bf16, f32>(dev, n, &configs()[1].0, 0.37);
    }
}
qlora::device_test!(
    eight_bit_moments_match_reference_codes_and_params,
    eight_bit_moments_every_size
);

#[test]
fn eight_bit_moments_track_f32_moments() {
    // The 8-bit state is an approximation of the f32 one: after a few steps the dequantized
    // moments stay within a few percent of each block's absmax.
    let n = 1000;
    let cfg = configs()[1].0;
    let mut p8 = normal_vector(n, 0.5, 3);
    let mut p32 = p8.clone();
    let mut s8 = AdamW8bitState::zeros(n);
    let (mut m, mut v) = (vec![0f32; n], vec![0f32; n]);
    for k in 1..=STEPS {
        let step = cfg.step(k, 1.0).unwrap();
        let g = normal_vector(n, 1e-2, 50 + k);
        reference_step_8bit(&step, &mut p8, &g, &mut s8).unwrap();
        reference_step(&step, &mut p32, &g, &mut m, &mut v).unwrap();
    }
    let (m8, v8) = s8.dequantize();
    for (i, ((a, b), (c, d))) in m8.iter().zip(&m).zip(v8.iter().zip(&v)).enumerate() {
        let blk = i / 256;
        assert!(
            (a - b).abs() <= 0.05 * s8.m_absmax[blk],
            "m[{i}] {a} vs {b}"
        );
        assert!(
            (c - d).abs() <= 0.05 * s8.v_absmax[blk],
            "v[{i}] {c} vs {d}"
        );
    }
}

fn all_zero_state_blocks<D: LaunchDevice>(dev: &D) {
    let n = 300;
    let zeros = AdamW8bitState::zeros(n);
    let mut p = dev.upload(&vec![1.0f32; n]).unwrap();
    let mut s = DeviceAdamW8bitState::from_host(dev, &zeros).unwrap();
    let step = AdamWConfig::default().step(1, 1.0).unwrap();
    let g = dev.upload(&vec![0f32; n]).unwrap();
    adamw::step_8bit(dev, &step, &mut p, &g, &mut s).unwrap();
    let s = s.to_host(dev).unwrap();
    assert_eq!(s, zeros);
    assert_eq!(s.m_absmax, vec![1.0, 1.0]);
    let p = dev.download(&p).unwrap();
    assert!(p.iter().all(|&x| x == (1.0 - 1e-3 * 1e-2) as f32));
}
qlora::device_test!(
    all_zero_state_blocks_store_absmax_one,
    all_zero_state_blocks
);

#[derive(Deserialize)]
struct TorchMeta {
    torch: String,
    steps: u64,
    cases: HashMap<String, TorchCase>,
}

#[derive(Deserialize)]
struct TorchCase {
    lr: f64,
    betas: (f64, f64),
    eps: f64,
    weight_decay: f64,
}

fn f32s(st: &SafeTensors<'_>, key: &str) -> Vec<f32> {
    let t = st.tensor(key).unwrap_or_else(|e| panic!("{key}: {e}"));
    assert_eq!(t.dtype(), safetensors::Dtype::F32, "{key}");
    t.data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

fn torch_fixture() -> Vec<u8> {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/adamw/adamw.safetensors");
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn torch_adamw_single_tensor_path<D: LaunchDevice>(dev: &D) {
    let buffer = torch_fixture();
    let (_, meta) = SafeTensors::read_metadata(&buffer).unwrap();
    let meta: TorchMeta =
        serde_json::from_str(&meta.metadata().as_ref().unwrap()["fixture"]).unwrap();
    assert!(meta.torch.starts_with("2.9.1"), "{}", meta.torch);
    let st = SafeTensors::deserialize(&buffer).unwrap();
    let tol = lookup(Op::AdamW, Dtype::F32);
    assert_eq!(meta.cases.len(), 2);
    for (case, hp) in &meta.cases {
        let cfg = AdamWConfig {
            lr: hp.lr,
            betas: hp.betas,
            eps: hp.eps,
            weight_decay: hp.weight_decay,
        };
        let mut p_ref = f32s(&st, &format!("{case}.param0"));
        let n = p_ref.len();
        let mut d_p = dev.upload(&p_ref).unwrap();
        let (mut m_ref, mut v_ref) = (vec![0f32; n], vec![0f32; n]);
        let (mut d_m, mut d_v) = (dev.upload(&m_ref).unwrap(), dev.upload(&v_ref).unwrap());
        for k in 1..=meta.steps {
            let g = f32s(&st, &format!("{case}.grad{k}"));
            let step = cfg.step(k, 1.0).unwrap();
            reference_step(&step, &mut p_ref, &g, &mut m_ref, &mut v_ref).unwrap();
            let d_g = dev.upload(&g).unwrap();
            adamw::step(dev, &step, &mut d_p, &d_g, &mut d_m, &mut d_v).unwrap();
        }
        for (name, want) in [("param", &p_ref), ("m", &m_ref), ("v", &v_ref)] {
            let torch = f32s(&st, &format!("{case}.{name}"));
            if let Err(e) = tol.check(want, &torch) {
                panic!("{case} reference {name} vs torch: {e}");
            }
        }
        for (name, got) in [("param", &d_p), ("m", &d_m), ("v", &d_v)] {
            let torch = f32s(&st, &format!("{case}.{name}"));
            if let Err(e) = tol.check(&dev.download(got).unwrap(), &torch) {
                panic!("{case} {} {name} vs torch: {e}", dev.label());
            }
        }
    }
}
qlora::device_test!(
    reference_and_launcher_match_torch_adamw_single_tensor_path,
    torch_adamw_single_tensor_path
);

#[test]
fn unsigned_dynamic_map_matches_bitsandbytes() {
    let buffer = torch_fixture();
    let st = SafeTensors::deserialize(&buffer).unwrap();
    let want = f32s(&st, "udynamic");
    let got = dynamic_map_unsigned();
    assert_eq!(want.len(), 256);
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(g.to_bits(), w.to_bits(), "code {i}: {g} vs {w}");
    }
}

fn assert_invalid(r: qlora::Result<()>, what: &str) {
    assert!(
        matches!(r, Err(Error::InvalidArgument { .. })),
        "{what}: {r:?}"
    );
}

#[test]
fn invalid_hyperparameters_are_rejected() {
    let ok = AdamWConfig::default();
    let bad = [
        AdamWConfig { lr: -1.0, ..ok },
        AdamWConfig { lr: f64::NAN, ..ok },
        AdamWConfig {
            betas: (1.0, 0.999),
            ..ok
        },
        AdamWConfig {
            betas: (0.9, -0.1),
            ..ok
        },
        AdamWConfig { eps: -1e-8, ..ok },
        AdamWConfig {
            weight_decay: f64::INFINITY,
            ..ok
        },
    ];
    for cfg in bad {
        assert_invalid(cfg.step(1, 1.0).map(drop), &format!("{cfg:?}"));
    }
    assert_invalid(ok.step(0, 1.0).map(drop), "step 0");
    assert_invalid(ok.step(1, f32::NAN).map(drop), "NaN grad_scale");
    assert_invalid(ok.step(1, -1.0).map(drop), "negative grad_scale");
}

fn mismatched_lengths<D: LaunchDevice>(dev: &D) {
    let step: AdamWStep = AdamWConfig::default().step(1, 1.0).unwrap();
    let up = |v: &[f32]| dev.upload(v).unwrap();
    let g = vec![0f32; 10];
    let (d_g, mut m, mut v) = (up(&g), up(&[0f32; 10]), up(&[0f32; 10]));
    let (mut empty_p, empty_g) = (up(&[]), up(&[]));
    let (mut empty_m, mut empty_v) = (up(&[]), up(&[]));
    assert_invalid(
        adamw::step::<D, f32, f32>(
            dev,
            &step,
            &mut empty_p,
            &empty_g,
            &mut empty_m,
            &mut empty_v,
        ),
        "empty",
    );
    assert_invalid(
        adamw::step(dev, &step, &mut up(&[0f32; 9]), &d_g, &mut m, &mut v),
        "short param",
    );
    assert_invalid(
        adamw::step(
            dev,
            &step,
            &mut up(&[0f32; 10]),
            &d_g,
            &mut m,
            &mut up(&[0f32; 9]),
        ),
        "short v",
    );
    assert_invalid(
        adamw::step(
            dev,
            &step,
            &mut up(&[0f32; 10]),
            &dev.slice(&d_g, 0..3).unwrap(),
            &mut m,
            &mut v,
        ),
        "short grad",
    );
    let (mut m_host, mut v_host) = (vec![0f32; 10], vec![0f32; 10]);
    assert_invalid(
        reference_step(&step, &mut [0f32; 10], &g[..3], &mut m_host, &mut v_host),
        "short grad (reference)",
    );
    let mut s = AdamW8bitState::zeros(300);
    s.v_absmax.pop();
    let mut d_s = DeviceAdamW8bitState::from_host(dev, &s).unwrap();
    assert_invalid(
        adamw::step_8bit(
            dev,
            &step,
            &mut up(&[0f32; 300]),
            &up(&[0f32; 300]),
            &mut d_s,
        ),
        "short absmax",
    );
    let mut d_s = DeviceAdamW8bitState::from_host(dev, &AdamW8bitState::zeros(300)).unwrap();
    assert_invalid(
        adamw::step_8bit(
            dev,
            &step,
            &mut up(&[0f32; 299]),
            &up(&[0f32; 299]),
            &mut d_s,
        ),
        "8-bit state of another size",
    );
    let mut s = AdamW8bitState::zeros(300);
    assert_invalid(
        reference_step_8bit(&step, &mut [0f32; 299], &[0f32; 299], &mut s),
        "8-bit state of another size (reference)",
    );
    // Nothing rejected wrote anything.
    assert_eq!(dev.download(&m).unwrap(), vec![0f32; 10]);
    assert_eq!(dev.download(&v).unwrap(), vec![0f32; 10]);
    assert_eq!(
        d_s.to_host(dev).unwrap(),
        AdamW8bitState::zeros(300),
        "rejected 8-bit step wrote nothing"
    );
}
qlora::device_test!(
    mismatched_lengths_are_rejected_before_launch,
    mismatched_lengths
);
