//! Parity of the Llama hot-op kernels in kernels/llama.cu (RMSNorm, RoPE, SwiGLU, forward and
//! backward): the Rust reference ≡ the same CUDA source run through the CPU emulation ≡ CUDA when
//! a GPU is present, on odd shapes and every dtype; the backward references against candle's
//! autograd (RMSNorm, SwiGLU) and the adjoint identity (RoPE).

use candle_core::{Device, Tensor, Var};
use half::{bf16, f16};
use qlora::kernels::launch::Element;
use qlora::kernels::llama::*;
use qlora::testing::normal_vector;
use qlora::tolerance::{lookup, Dtype, Op};
use qlora::Error;

const EPS: f32 = 1e-5;
/// (rows, h): one row, odd widths, one width past a block's 4096 and the widest row.
const RMS_SHAPES: &[(usize, usize)] = &[(1, 1), (3, 7), (37, 96), (5, 200), (3, 4097), (2, 8192)];
/// (tokens, q_heads, kv_heads, head_dim).
const ROPE_SHAPES: &[(usize, usize, usize, usize)] = &[(1, 1, 1, 2), (5, 6, 2, 16), (3, 6, 2, 128)];
const SWIGLU_SHAPES: &[(usize, usize)] = &[(1, 1), (3, 13), (37, 200)];

fn dtype<T: Element>() -> Dtype {
    match T::DTYPE as i32 {
        0 => Dtype::F32,
        1 => Dtype::BF16,
        _ => Dtype::F16,
    }
}

fn cast<T: Element>(v: &[f32]) -> Vec<T> {
    v.iter().map(|&x| T::from_f32(x)).collect()
}

fn widen<T: Element>(v: &[T]) -> Vec<f32> {
    v.iter().map(|x| x.to_f32()).collect()
}

/// `got` (already in T) against the f32 reference rounded once to T.
fn check<T: Element>(what: &str, op: Op, got: &[T], want: &[f32]) {
    let want: Vec<f32> = want.iter().map(|&x| T::from_f32(x).to_f32()).collect();
    if let Err(e) = lookup(op, dtype::<T>()).check(&widen(got), &want) {
        panic!("{what} {:?}: {e}", dtype::<T>());
    }
}

fn check_f32(what: &str, op: Op, got: &[f32], want: &[f32]) {
    if let Err(e) = lookup(op, Dtype::F32).check(got, want) {
        panic!("{what}: {e}");
    }
}

fn rms_inputs<T: Element>(rows: usize, h: usize, seed: u64) -> (Vec<T>, Vec<T>, Vec<T>) {
    let x = cast(&normal_vector(rows * h, 1.0, seed));
    let w: Vec<f32> = normal_vector(h, 0.2, seed + 1)
        .iter()
        .map(|v| 1.0 + v)
        .collect();
    let dy = cast(&normal_vector(rows * h, 1.0, seed + 2));
    (x, cast(&w), dy)
}

fn rmsnorm_parity<T: Element>(rows: usize, h: usize, seed: u64) {
    let (x, w, dy) = rms_inputs::<T>(rows, h, seed);
    let what = format!("rmsnorm rows={rows} h={h}");
    let (want_y, want_rstd) = rmsnorm_forward_ref(&x, &w, h, EPS).unwrap();
    let (y, rstd) = rmsnorm_forward_emulated(&x, &w, h, EPS).unwrap();
    check(&what, Op::RmsNorm, &y, &want_y);
    check_f32(&what, Op::RmsNorm, &rstd, &want_rstd);

    let (want_dx, want_dw) = rmsnorm_backward_ref(&dy, &x, &w, &want_rstd, h).unwrap();
    let (dx, dw) = rmsnorm_backward_emulated(&dy, &x, &w, &want_rstd, h).unwrap();
    check(&what, Op::RmsNormBackward, &dx, &want_dx);
    check_f32(&what, Op::RmsNormBackward, &dw, &want_dw);
}

#[test]
fn emulated_rmsnorm_matches_reference_forward_and_backward() {
    for (i, &(rows, h)) in RMS_SHAPES.iter().enumerate() {
        rmsnorm_parity::<f32>(rows, h, i as u64);
        rmsnorm_parity::<bf16>(rows, h, 10 + i as u64);
    }
    rmsnorm_parity::<f16>(37, 96, 20);
    rmsnorm_parity::<f16>(3, 4097, 21);
}

#[test]
fn emulated_rmsnorm_takes_the_scalar_path_on_misaligned_rows() {
    // Offsetting every buffer by one element breaks 16-byte alignment with h % 4 == 0.
    let (rows, h) = (9, 96);
    let (x, w, dy) = rms_inputs::<f32>(rows, h + 1, 30);
    let (x, dy) = (&x[1..rows * h + 1], &dy[1..rows * h + 1]);
    let w = &w[1..];
    let (want_y, rstd) = rmsnorm_forward_ref(x, w, h, EPS).unwrap();
    let (y, _) = rmsnorm_forward_emulated(x, w, h, EPS).unwrap();
    check("misaligned rmsnorm", Op::RmsNorm, &y, &want_y);
    let (want_dx, want_dw) = rmsnorm_backward_ref(dy, x, w, &rstd, h).unwrap();
    let (dx, dw) = rmsnorm_backward_emulated(dy, x, w, &rstd, h).unwrap();
    check("misaligned rmsnorm", Op::RmsNormBackward, &dx, &want_dx);
    check_f32("misaligned rmsnorm dw", Op::RmsNormBackward, &dw, &want_dw);
}

fn var(v: &[f32], shape: &[usize]) -> Var {
    Var::from_tensor(&Tensor::from_slice(v, shape, &Device::Cpu).unwrap()).unwrap()
}

fn grad_of(grads: &candle_core::backprop::GradStore, v: &Var) -> Vec<f32> {
    grads
        .get(v.as_tensor())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

#[test]
fn rmsnorm_backward_reference_matches_candle_autograd() {
    for &(rows, h) in &[(3, 7), (4, 96)] {
        let (x, w, dy) = rms_inputs::<f32>(rows, h, 40);
        let (xv, wv) = (var(&x, &[rows, h]), var(&w, &[h]));
        let dyt = Tensor::from_slice(&dy, (rows, h), &Device::Cpu).unwrap();
        let xt = xv.as_tensor();
        let ms = xt.sqr().unwrap().mean_keepdim(1).unwrap();
        let rstd = (ms + EPS as f64).unwrap().sqrt().unwrap().recip().unwrap();
        let y = xt
            .broadcast_mul(&rstd)
            .unwrap()
            .broadcast_mul(wv.as_tensor())
            .unwrap();
        let loss = (y * &dyt).unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        let (_, r) = rmsnorm_forward_ref(&x, &w, h, EPS).unwrap();
        let (dx, dw) = rmsnorm_backward_ref(&dy, &x, &w, &r, h).unwrap();
        check_f32("candle dx", Op::RmsNormBackward, &dx, &grad_of(&grads, &xv));
        check_f32("candle dw", Op::RmsNormBackward, &dw, &grad_of(&grads, &wv));
    }
}

/// HF Llama tables: `[positions, head_dim / 2]` of cos / sin of `pos · theta^(-2i / head_dim)`.
fn rope_tables(positions: usize, head_dim: usize) -> (Vec<f32>, Vec<f32>) {
    let half = head_dim / 2;
    let mut cos = Vec::with_capacity(positions * half);
    let mut sin = Vec::with_capacity(positions * half);
    for p in 0..positions {
        for i in 0..half {
            let angle = p as f64 * 10000f64.powf(-2.0 * i as f64 / head_dim as f64);
            cos.push(angle.cos() as f32);
            sin.push(angle.sin() as f32);
        }
    }
    (cos, sin)
}

fn rope_positions(tokens: usize) -> Vec<i32> {
    (0..tokens).map(|t| ((t * 7 + 3) % 12) as i32).collect()
}

fn rope_parity<T: Element>(tokens: usize, qh: usize, kh: usize, d: usize, seed: u64) {
    let (cos, sin) = rope_tables(12, d);
    let pos = rope_positions(tokens);
    let q: Vec<T> = cast(&normal_vector(tokens * qh * d, 1.0, seed));
    let k: Vec<T> = cast(&normal_vector(tokens * kh * d, 1.0, seed + 1));
    let what = format!("rope t={tokens} heads={qh}/{kh} d={d}");
    for inverse in [false, true] {
        let (wq, wk) = rope_ref(&q, &k, &cos, &sin, &pos, qh, kh, d, inverse).unwrap();
        let (mut gq, mut gk) = (q.clone(), k.clone());
        rope_emulated(&mut gq, &mut gk, &cos, &sin, &pos, qh, kh, d, inverse).unwrap();
        check(&what, Op::Rope, &gq, &wq);
        check(&what, Op::Rope, &gk, &wk);
    }
}

#[test]
fn emulated_rope_matches_reference_forward_and_inverse() {
    for (i, &(t, qh, kh, d)) in ROPE_SHAPES.iter().enumerate() {
        rope_parity::<f32>(t, qh, kh, d, i as u64);
        rope_parity::<bf16>(t, qh, kh, d, 10 + i as u64);
        rope_parity::<f16>(t, qh, kh, d, 20 + i as u64);
    }
}

#[test]
fn rope_backward_inverts_forward() {
    let (t, qh, kh, d) = (5, 6, 2, 16);
    let (cos, sin) = rope_tables(12, d);
    let pos = rope_positions(t);
    let q0 = normal_vector(t * qh * d, 1.0, 50);
    let k0 = normal_vector(t * kh * d, 1.0, 51);
    let (mut q, mut k) = (q0.clone(), k0.clone());
    rope_emulated(&mut q, &mut k, &cos, &sin, &pos, qh, kh, d, false).unwrap();
    assert!(
        q.iter().zip(&q0).any(|(a, b)| a != b),
        "rotation is not the identity"
    );
    rope_emulated(&mut q, &mut k, &cos, &sin, &pos, qh, kh, d, true).unwrap();
    check_f32("rope round trip q", Op::Rope, &q, &q0);
    check_f32("rope round trip k", Op::Rope, &k, &k0);
}

#[test]
fn rope_inverse_is_the_adjoint_of_the_forward() {
    // <R x, y> = <x, Rᵀ y>: the backward (inverse rotation) is the transpose of the forward.
    let (t, qh, kh, d) = (4, 3, 1, 8);
    let (cos, sin) = rope_tables(12, d);
    let pos = rope_positions(t);
    let (x, kx) = (
        normal_vector(t * qh * d, 1.0, 60),
        normal_vector(t * kh * d, 1.0, 61),
    );
    let (y, ky) = (
        normal_vector(t * qh * d, 1.0, 62),
        normal_vector(t * kh * d, 1.0, 63),
    );
    let (rx, rkx) = rope_ref(&x, &kx, &cos, &sin, &pos, qh, kh, d, false).unwrap();
    let (ry, rky) = rope_ref(&y, &ky, &cos, &sin, &pos, qh, kh, d, true).unwrap();
    let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(p, q)| p * q).sum::<f32>();
    let lhs = dot(&rx, &y) + dot(&rkx, &ky);
    let rhs = dot(&x, &ry) + dot(&kx, &rky);
    check_f32("rope adjoint", Op::Reduction, &[lhs], &[rhs]);
}

fn swiglu_parity<T: Element>(tokens: usize, inter: usize, seed: u64) {
    let n = tokens * inter;
    let g: Vec<T> = cast(&normal_vector(n, 3.0, seed));
    let u: Vec<T> = cast(&normal_vector(n, 1.0, seed + 1));
    let dh: Vec<T> = cast(&normal_vector(n, 1.0, seed + 2));
    let what = format!("swiglu {tokens}x{inter}");
    let want = swiglu_forward_ref(&g, &u).unwrap();
    check(
        &what,
        Op::Swiglu,
        &swiglu_forward_emulated(&g, &u).unwrap(),
        &want,
    );
    let (want_dg, want_du) = swiglu_backward_ref(&g, &u, &dh).unwrap();
    let (dg, du) = swiglu_backward_emulated(&g, &u, &dh).unwrap();
    check(&what, Op::Swiglu, &dg, &want_dg);
    check(&what, Op::Swiglu, &du, &want_du);
}

#[test]
fn emulated_swiglu_matches_reference_forward_and_backward() {
    for (i, &(t, inter)) in SWIGLU_SHAPES.iter().enumerate() {
        swiglu_parity::<f32>(t, inter, i as u64);
        swiglu_parity::<bf16>(t, inter, 10 + i as u64);
        swiglu_parity::<f16>(t, inter, 20 + i as u64);
    }
}

#[test]
fn swiglu_backward_reference_matches_candle_autograd() {
    let n = 200;
    let (g, u, dh) = (
        normal_vector(n, 3.0, 70),
        normal_vector(n, 1.0, 71),
        normal_vector(n, 1.0, 72),
    );
    let (gv, uv) = (var(&g, &[n]), var(&u, &[n]));
    let dht = Tensor::from_slice(&dh, n, &Device::Cpu).unwrap();
    let gt = gv.as_tensor();
    let sig = (gt.neg().unwrap().exp().unwrap() + 1.0)
        .unwrap()
        .recip()
        .unwrap();
    let h = ((gt * sig).unwrap() * uv.as_tensor()).unwrap();
    let grads = (h * dht).unwrap().sum_all().unwrap().backward().unwrap();
    let (dg, du) = swiglu_backward_ref(&g, &u, &dh).unwrap();
    check_f32("candle dg", Op::Swiglu, &dg, &grad_of(&grads, &gv));
    check_f32("candle du", Op::Swiglu, &du, &grad_of(&grads, &uv));
}

fn is_invalid<T: std::fmt::Debug>(r: qlora::Result<T>) -> bool {
    matches!(r, Err(Error::InvalidArgument { .. }))
}

#[test]
fn invalid_arguments_are_rejected() {
    let x = vec![1f32; 12];
    let w = vec![1f32; 4];
    assert!(is_invalid(rmsnorm_forward_emulated(&x, &w, 5, EPS)));
    assert!(is_invalid(rmsnorm_forward_emulated(&x, &w[..3], 4, EPS)));
    assert!(is_invalid(rmsnorm_forward_emulated(&x, &w, 0, EPS)));
    assert!(is_invalid(rmsnorm_forward_emulated::<f32>(&[], &w, 4, EPS)));
    assert!(is_invalid(rmsnorm_forward_emulated(&x, &w, 4, f32::NAN)));
    let wide = vec![1f32; MAX_HIDDEN + 1];
    assert!(is_invalid(rmsnorm_forward_emulated(
        &wide,
        &wide,
        MAX_HIDDEN + 1,
        EPS
    )));
    assert!(is_invalid(rmsnorm_backward_emulated(
        &x, &x, &w, &[1.0; 2], 4
    )));
    assert!(is_invalid(rmsnorm_backward_emulated(
        &x[..8],
        &x,
        &w,
        &[1.0; 3],
        4
    )));

    let (cos, sin) = rope_tables(4, 4);
    let (mut q, mut k) = (vec![0f32; 2 * 2 * 4], vec![0f32; 2 * 4]);
    assert!(is_invalid(rope_emulated(
        &mut q,
        &mut k,
        &cos,
        &sin,
        &[0, 4],
        2,
        1,
        4,
        false
    )));
    assert!(is_invalid(rope_emulated(
        &mut q,
        &mut k,
        &cos,
        &sin,
        &[0, -1],
        2,
        1,
        4,
        false
    )));
    assert!(is_invalid(rope_emulated(
        &mut q,
        &mut k,
        &cos,
        &sin,
        &[0],
        2,
        1,
        4,
        false
    )));
    assert!(is_invalid(rope_emulated(
        &mut q,
        &mut k,
        &cos,
        &sin[..6],
        &[0, 1],
        2,
        1,
        4,
        false
    )));
    assert!(is_invalid(rope_emulated(
        &mut q,
        &mut k,
        &cos,
        &sin,
        &[0, 1],
        4,
        0,
        4,
        false
    )));
    assert!(is_invalid(rope_emulated(
        &mut q[..15],
        &mut k,
        &cos,
        &sin,
        &[0, 1],
        2,
        1,
        3,
        false
    )));

    assert!(is_invalid(swiglu_forward_emulated::<f32>(&[], &[])));
    assert!(is_invalid(swiglu_forward_emulated(&x, &w)));
    assert!(is_invalid(swiglu_backward_emulated(&x, &x, &w)));
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::*;
    use qlora::kernels::cuda::CudaDevice;

    fn rmsnorm_on_gpu<T: Element>(dev: &CudaDevice, rows: usize, h: usize, seed: u64) {
        let (x, w, dy) = rms_inputs::<T>(rows, h, seed);
        let what = format!("cuda rmsnorm rows={rows} h={h}");
        let s = dev.stream();
        let (dx_, dw_, ddy) = (
            s.clone_htod(&x).unwrap(),
            s.clone_htod(&w).unwrap(),
            s.clone_htod(&dy).unwrap(),
        );
        let (want_y, want_rstd) = rmsnorm_forward_ref(&x, &w, h, EPS).unwrap();
        let (y, rstd) = rmsnorm_forward_cuda(dev, &dx_, &dw_, h, EPS).unwrap();
        check(&what, Op::RmsNorm, &s.clone_dtoh(&y).unwrap(), &want_y);
        check_f32(
            &what,
            Op::RmsNorm,
            &s.clone_dtoh(&rstd).unwrap(),
            &want_rstd,
        );
        let (want_dx, want_dw) = rmsnorm_backward_ref(&dy, &x, &w, &want_rstd, h).unwrap();
        let (gdx, gdw) = rmsnorm_backward_cuda(dev, &ddy, &dx_, &dw_, &rstd, h).unwrap();
        check(
            &what,
            Op::RmsNormBackward,
            &s.clone_dtoh(&gdx).unwrap(),
            &want_dx,
        );
        check_f32(
            &what,
            Op::RmsNormBackward,
            &s.clone_dtoh(&gdw).unwrap(),
            &want_dw,
        );
    }

    #[test]
    fn cuda_rmsnorm_matches_reference() {
        let Some(dev) = CudaDevice::first_available() else {
            return;
        };
        for (i, &(rows, h)) in RMS_SHAPES.iter().enumerate() {
            rmsnorm_on_gpu::<f32>(&dev, rows, h, i as u64);
            rmsnorm_on_gpu::<bf16>(&dev, rows, h, 10 + i as u64);
        }
        rmsnorm_on_gpu::<bf16>(&dev, 4096, 4096, 99);
    }

    fn rope_on_gpu<T: Element>(dev: &CudaDevice, t: usize, qh: usize, kh: usize, d: usize) {
        let (cos, sin) = rope_tables(12, d);
        let pos = rope_positions(t);
        let q: Vec<T> = cast(&normal_vector(t * qh * d, 1.0, 80));
        let k: Vec<T> = cast(&normal_vector(t * kh * d, 1.0, 81));
        let s = dev.stream();
        let (dcos, dsin, dpos) = (
            s.clone_htod(&cos).unwrap(),
            s.clone_htod(&sin).unwrap(),
            s.clone_htod(&pos).unwrap(),
        );
        for inverse in [false, true] {
            let (wq, wk) = rope_ref(&q, &k, &cos, &sin, &pos, qh, kh, d, inverse).unwrap();
            let (mut dq, mut dk) = (s.clone_htod(&q).unwrap(), s.clone_htod(&k).unwrap());
            rope_cuda(
                dev, &mut dq, &mut dk, &dcos, &dsin, &dpos, qh, kh, d, inverse,
            )
            .unwrap();
            check("cuda rope q", Op::Rope, &s.clone_dtoh(&dq).unwrap(), &wq);
            check("cuda rope k", Op::Rope, &s.clone_dtoh(&dk).unwrap(), &wk);
        }
    }

    #[test]
    fn cuda_rope_matches_reference() {
        let Some(dev) = CudaDevice::first_available() else {
            return;
        };
        for &(t, qh, kh, d) in ROPE_SHAPES {
            rope_on_gpu::<f32>(&dev, t, qh, kh, d);
            rope_on_gpu::<bf16>(&dev, t, qh, kh, d);
        }
    }

    fn swiglu_on_gpu<T: Element>(dev: &CudaDevice, n: usize) {
        let g: Vec<T> = cast(&normal_vector(n, 3.0, 90));
        let u: Vec<T> = cast(&normal_vector(n, 1.0, 91));
        let dh: Vec<T> = cast(&normal_vector(n, 1.0, 92));
        let s = dev.stream();
        let (dg_in, du_in, ddh) = (
            s.clone_htod(&g).unwrap(),
            s.clone_htod(&u).unwrap(),
            s.clone_htod(&dh).unwrap(),
        );
        let h = swiglu_forward_cuda(dev, &dg_in, &du_in).unwrap();
        let want = swiglu_forward_ref(&g, &u).unwrap();
        check("cuda swiglu", Op::Swiglu, &s.clone_dtoh(&h).unwrap(), &want);
        let (dg, du) = swiglu_backward_cuda(dev, &dg_in, &du_in, &ddh).unwrap();
        let (want_dg, want_du) = swiglu_backward_ref(&g, &u, &dh).unwrap();
        check(
            "cuda swiglu dg",
            Op::Swiglu,
            &s.clone_dtoh(&dg).unwrap(),
            &want_dg,
        );
        check(
            "cuda swiglu du",
            Op::Swiglu,
            &s.clone_dtoh(&du).unwrap(),
            &want_du,
        );
    }

    #[test]
    fn cuda_swiglu_matches_reference() {
        let Some(dev) = CudaDevice::first_available() else {
            return;
        };
        for &(t, inter) in SWIGLU_SHAPES {
            swiglu_on_gpu::<f32>(&dev, t * inter);
            swiglu_on_gpu::<bf16>(&dev, t * inter);
        }
    }
}
