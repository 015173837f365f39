//! Parity of the Llama hot-op kernels in kernels/llama.cu (RMSNorm, RoPE, SwiGLU, forward and
//! backward): the Rust reference ≡ the same CUDA source run through the CPU emulation ≡ CUDA when
//! a GPU is present, on odd shapes and every dtype; the backward references against candle's
//! autograd (RMSNorm, SwiGLU) and the adjoint identity (RoPE).

use candle_core::{Device, Tensor, Var};
use half::{bf16, f16};
use qlora::kernels::device::{Emulator, LaunchDevice};
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

use qlora::kernels::launch::tolerance_dtype as dtype;

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

fn rmsnorm_parity<D: LaunchDevice, T: Element>(dev: &D, rows: usize, h: usize, seed: u64) {
    let (x, w, dy) = rms_inputs::<T>(rows, h, seed);
    let what = format!("{} rmsnorm rows={rows} h={h}", dev.label());
    let (dx_, dw_, ddy) = (
        dev.upload(&x).unwrap(),
        dev.upload(&w).unwrap(),
        dev.upload(&dy).unwrap(),
    );
    let (want_y, want_rstd) = rmsnorm_forward_ref(&x, &w, h, EPS).unwrap();
    let (y, rstd) = rmsnorm_forward(dev, &dx_, &dw_, h, EPS).unwrap();
    check(&what, Op::RmsNorm, &dev.download(&y).unwrap(), &want_y);
    check_f32(
        &what,
        Op::RmsNorm,
        &dev.download(&rstd).unwrap(),
        &want_rstd,
    );

    let (want_dx, want_dw) = rmsnorm_backward_ref(&dy, &x, &w, &want_rstd, h).unwrap();
    let (dx, dw) = rmsnorm_backward(dev, &ddy, &dx_, &dw_, &rstd, h).unwrap();
    check(
        &what,
        Op::RmsNormBackward,
        &dev.download(&dx).unwrap(),
        &want_dx,
    );
    check_f32(
        &what,
        Op::RmsNormBackward,
        &dev.download(&dw).unwrap(),
        &want_dw,
    );
}

fn rmsnorm_every_shape_and_dtype<D: LaunchDevice>(dev: &D) {
    for (i, &(rows, h)) in RMS_SHAPES.iter().enumerate() {
        rmsnorm_parity::<D, f32>(dev, rows, h, i as u64);
        rmsnorm_parity::<D, bf16>(dev, rows, h, 10 + i as u64);
    }
    rmsnorm_parity::<D, f16>(dev, 37, 96, 20);
    rmsnorm_parity::<D, f16>(dev, 3, 4097, 21);
}
qlora::device_test!(
    rmsnorm_matches_reference_forward_and_backward,
    rmsnorm_every_shape_and_dtype
);

fn rmsnorm_misaligned<D: LaunchDevice>(dev: &D) {
    // Offsetting every buffer by one element breaks 16-byte alignment with h % 4 == 0.
    let (rows, h) = (9, 96);
    let (x, w, dy) = rms_inputs::<f32>(rows, h + 1, 30);
    let (xb, wb, dyb) = (
        dev.upload(&x).unwrap(),
        dev.upload(&w).unwrap(),
        dev.upload(&dy).unwrap(),
    );
    let (xd, wd, dyd) = (
        dev.slice(&xb, 1..rows * h + 1).unwrap(),
        dev.slice(&wb, 1..h + 1).unwrap(),
        dev.slice(&dyb, 1..rows * h + 1).unwrap(),
    );
    let (x, dy, w) = (&x[1..rows * h + 1], &dy[1..rows * h + 1], &w[1..]);
    let (want_y, rstd) = rmsnorm_forward_ref(x, w, h, EPS).unwrap();
    let (y, rstd_d) = rmsnorm_forward(dev, &xd, &wd, h, EPS).unwrap();
    check(
        "misaligned rmsnorm",
        Op::RmsNorm,
        &dev.download(&y).unwrap(),
        &want_y,
    );
    let (want_dx, want_dw) = rmsnorm_backward_ref(dy, x, w, &rstd, h).unwrap();
    let (dx, dw) = rmsnorm_backward(dev, &dyd, &xd, &wd, &rstd_d, h).unwrap();
    let dx = dev.download(&dx).unwrap();
    check("misaligned rmsnorm", Op::RmsNormBackward, &dx, &want_dx);
    let dw = dev.download(&dw).unwrap();
    check_f32("misaligned rmsnorm dw", Op::RmsNormBackward, &dw, &want_dw);
}
qlora::device_test!(
    rmsnorm_takes_the_scalar_path_on_misaligned_rows,
    rmsnorm_misaligned
);

#[test]
fn rmsnorm_4096_square_bf16_on_a_gpu() {
    #[cfg(feature = "cuda")]
    if let Some(dev) = qlora::kernels::cuda::CudaDevice::first_available() {
        rmsnorm_parity::<_, bf16>(&dev, 4096, 4096, 99);
    }
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

fn rope_parity<D: LaunchDevice, T: Element>(
    dev: &D,
    (tokens, qh, kh, d): (usize, usize, usize, usize),
    seed: u64,
) {
    let (cos, sin) = rope_tables(12, d);
    let pos = rope_positions(tokens);
    let q: Vec<T> = cast(&normal_vector(tokens * qh * d, 1.0, seed));
    let k: Vec<T> = cast(&normal_vector(tokens * kh * d, 1.0, seed + 1));
    let what = format!("{} rope t={tokens} heads={qh}/{kh} d={d}", dev.label());
    let (dcos, dsin, dpos) = (
        dev.upload(&cos).unwrap(),
        dev.upload(&sin).unwrap(),
        dev.upload(&pos).unwrap(),
    );
    for inverse in [false, true] {
        let (wq, wk) = rope_ref(&q, &k, &cos, &sin, &pos, qh, kh, d, inverse).unwrap();
        let (mut gq, mut gk) = (dev.upload(&q).unwrap(), dev.upload(&k).unwrap());
        rope(
            dev, &mut gq, &mut gk, &dcos, &dsin, &dpos, qh, kh, d, inverse,
        )
        .unwrap();
        check(&what, Op::Rope, &dev.download(&gq).unwrap(), &wq);
        check(&what, Op::Rope, &dev.download(&gk).unwrap(), &wk);
    }
}

fn rope_every_shape_and_dtype<D: LaunchDevice>(dev: &D) {
    for (i, &shape) in ROPE_SHAPES.iter().enumerate() {
        rope_parity::<D, f32>(dev, shape, i as u64);
        rope_parity::<D, bf16>(dev, shape, 10 + i as u64);
        rope_parity::<D, f16>(dev, shape, 20 + i as u64);
    }
}
qlora::device_test!(
    rope_matches_reference_forward_and_inverse,
    rope_every_shape_and_dtype
);

/// A position outside the cos/sin tables poisons that token's rows with NaN (the kernel bounds
/// every table read) and leaves the other tokens rotated.
fn rope_bad_position<D: LaunchDevice>(dev: &D) {
    let (cos, sin) = rope_tables(4, 4);
    let (dcos, dsin) = (dev.upload(&cos).unwrap(), dev.upload(&sin).unwrap());
    for bad in [4, -1] {
        let (mut q, mut k) = (
            dev.upload(&[1f32; 2 * 2 * 4]).unwrap(),
            dev.upload(&[1f32; 2 * 4]).unwrap(),
        );
        let pos = dev.upload(&[0, bad]).unwrap();
        rope(dev, &mut q, &mut k, &dcos, &dsin, &pos, 2, 1, 4, false).unwrap();
        let (q, k) = (dev.download(&q).unwrap(), dev.download(&k).unwrap());
        assert!(q[..8].iter().chain(&k[..4]).all(|v| v.is_finite()), "{q:?}");
        assert!(q[8..].iter().chain(&k[4..]).all(|v| v.is_nan()), "{q:?}");
    }
}
qlora::device_test!(rope_position_outside_the_tables_is_nan, rope_bad_position);

#[test]
fn rope_backward_inverts_forward() {
    let (t, qh, kh, d) = (5, 6, 2, 16);
    let (cos, sin) = rope_tables(12, d);
    let pos = rope_positions(t);
    let q0 = normal_vector(t * qh * d, 1.0, 50);
    let k0 = normal_vector(t * kh * d, 1.0, 51);
    let (mut q, mut k) = (q0.clone(), k0.clone());
    let (dev, pos) = (Emulator::default(), &pos[..]);
    rope(&dev, &mut q, &mut k, &cos, &sin, pos, qh, kh, d, false).unwrap();
    assert!(
        q.iter().zip(&q0).any(|(a, b)| a != b),
        "rotation is not the identity"
    );
    rope(&dev, &mut q, &mut k, &cos, &sin, pos, qh, kh, d, true).unwrap();
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

fn swiglu_parity<D: LaunchDevice, T: Element>(dev: &D, tokens: usize, inter: usize, seed: u64) {
    let n = tokens * inter;
    let g: Vec<T> = cast(&normal_vector(n, 3.0, seed));
    let u: Vec<T> = cast(&normal_vector(n, 1.0, seed + 1));
    let dh: Vec<T> = cast(&normal_vector(n, 1.0, seed + 2));
    let (dg_in, du_in, ddh) = (
        dev.upload(&g).unwrap(),
        dev.upload(&u).unwrap(),
        dev.upload(&dh).unwrap(),
    );
    let what = format!("{} swiglu {tokens}x{inter}", dev.label());
    let want = swiglu_forward_ref(&g, &u).unwrap();
    let h = swiglu_forward(dev, &dg_in, &du_in).unwrap();
    check(&what, Op::Swiglu, &dev.download(&h).unwrap(), &want);
    let (want_dg, want_du) = swiglu_backward_ref(&g, &u, &dh).unwrap();
    let (dg, du) = swiglu_backward(dev, &dg_in, &du_in, &ddh).unwrap();
    check(&what, Op::Swiglu, &dev.download(&dg).unwrap(), &want_dg);
    check(&what, Op::Swiglu, &dev.download(&du).unwrap(), &want_du);
}

fn swiglu_every_shape_and_dtype<D: LaunchDevice>(dev: &D) {
    for (i, &(t, inter)) in SWIGLU_SHAPES.iter().enumerate() {
        swiglu_parity::<D, f32>(dev, t, inter, i as u64);
        swiglu_parity::<D, bf16>(dev, t, inter, 10 + i as u64);
        swiglu_parity::<D, f16>(dev, t, inter, 20 + i as u64);
    }
}
qlora::device_test!(
    swiglu_matches_reference_forward_and_backward,
    swiglu_every_shape_and_dtype
);

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

fn is_invalid<T>(r: qlora::Result<T>) -> bool {
    matches!(r, Err(Error::InvalidArgument { .. }))
}

fn invalid_arguments<D: LaunchDevice>(dev: &D) {
    let up = |v: &[f32]| dev.upload(v).unwrap();
    let part = |b, r| dev.slice(b, r).unwrap();
    let (x, w, empty) = (up(&[1f32; 12]), up(&[1f32; 4]), up(&[]));
    assert!(is_invalid(rmsnorm_forward(dev, &x, &w, 5, EPS)));
    assert!(is_invalid(rmsnorm_forward(
        dev,
        &x,
        &part(&w, 0..3),
        4,
        EPS
    )));
    assert!(is_invalid(rmsnorm_forward(dev, &x, &w, 0, EPS)));
    assert!(is_invalid(rmsnorm_forward(dev, &empty, &w, 4, EPS)));
    assert!(is_invalid(rmsnorm_forward(dev, &x, &w, 4, f32::NAN)));
    let wide = up(&vec![1f32; MAX_HIDDEN + 1]);
    assert!(is_invalid(rmsnorm_forward(
        dev,
        &wide,
        &wide,
        MAX_HIDDEN + 1,
        EPS
    )));
    let (r2, r3) = (up(&[1.0; 2]), up(&[1.0; 3]));
    assert!(is_invalid(rmsnorm_backward(dev, &x, &x, &w, &r2, 4)));
    assert!(is_invalid(rmsnorm_backward(
        dev,
        &part(&x, 0..8),
        &x,
        &w,
        &r3,
        4
    )));
    let mut small = up(&[0f32; 11]);
    let (mut dw, mut partial) = (up(&[0f32; 4]), up(&[0f32; 4]));
    assert!(is_invalid(rmsnorm_backward_into(
        dev,
        &x,
        &x,
        &w,
        &r3,
        4,
        &mut small,
        &mut dw,
        &mut partial
    )));

    let (cos, sin) = rope_tables(4, 4);
    let (cos, sin) = (up(&cos), up(&sin));
    let (mut q, mut k) = (up(&[0f32; 2 * 2 * 4]), up(&[0f32; 2 * 4]));
    let p1 = dev.upload(&[0i32]).unwrap();
    let p2 = dev.upload(&[0i32, 1]).unwrap();
    let sin6 = part(&sin, 0..6);
    let mut q15 = up(&[0f32; 15]);
    assert!(is_invalid(rope(
        dev, &mut q, &mut k, &cos, &sin, &p1, 2, 1, 4, false
    )));
    assert!(is_invalid(rope(
        dev, &mut q, &mut k, &cos, &sin6, &p2, 2, 1, 4, false
    )));
    assert!(is_invalid(rope(
        dev, &mut q, &mut k, &cos, &sin, &p2, 4, 0, 4, false
    )));
    assert!(is_invalid(rope(
        dev, &mut q15, &mut k, &cos, &sin, &p2, 2, 1, 3, false
    )));

    assert!(is_invalid(swiglu_forward(dev, &empty, &empty)));
    assert!(is_invalid(swiglu_forward(dev, &x, &w)));
    assert!(is_invalid(swiglu_backward(dev, &x, &x, &w)));
    let mut h11 = up(&[0f32; 11]);
    assert!(is_invalid(swiglu_forward_into(dev, &x, &x, &mut h11)));
}
qlora::device_test!(invalid_arguments_are_rejected, invalid_arguments);
