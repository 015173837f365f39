//! Parity of the causal attention kernels in kernels/attention.cu, forward and backward: the Rust
//! reference ≡ the same CUDA source run through the CPU emulation ≡ CUDA when a GPU is present, on
//! odd shapes (one-token, non-multiples of every tile), GQA, padding masks with rows that see no
//! key, f32 and bf16. (The reference against the runtime and candle's autograd: the unit tests of
//! src/kernels/attention.rs.)

use half::bf16;
use qlora::kernels::attention::*;
use qlora::kernels::launch::Element;
use qlora::testing::normal_vector;
use qlora::tolerance::{lookup, Dtype, Op};
use qlora::Error;

/// (batch, q_heads, kv_heads, seq, head_dim).
const SHAPES: &[(usize, usize, usize, usize, usize)] = &[
    (2, 2, 1, 1, 8),
    (2, 6, 2, 5, 16),
    (2, 2, 1, 67, 24),
    (1, 2, 2, 33, 64),
];

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

/// `got` (in T) against the f32 reference rounded once to T.
fn check<T: Element>(what: &str, op: Op, got: &[T], want: &[f32]) {
    let want: Vec<f32> = want.iter().map(|&x| T::from_f32(x).to_f32()).collect();
    if let Err(e) = lookup(op, dtype::<T>()).check(&widen(got), &want) {
        panic!("{what} {:?}: {e}", dtype::<T>());
    }
}

/// Padding patterns: none; batch row 0 left-padded (its first rows see no key: with T = 1 the
/// whole row) and row 1 right-padded with a hole.
fn masks(shape: &AttentionShape) -> Vec<Option<Vec<u8>>> {
    let t = shape.seq;
    let mut m = vec![1u8; shape.batch * t];
    m[..(t / 3).max(1)].fill(0);
    if shape.batch > 1 {
        for j in (t * 3 / 4 + 1)..t {
            m[t + j] = 0;
        }
        if t > 3 {
            m[t + 1] = 0;
        }
    }
    vec![None, Some(m)]
}

struct Case<T> {
    shape: AttentionShape,
    q: Vec<T>,
    k: Vec<T>,
    v: Vec<T>,
    d_o: Vec<T>,
    mask: Option<Vec<u8>>,
}

impl<T: Element> Case<T> {
    fn new(shape: AttentionShape, mask: Option<Vec<u8>>, seed: u64) -> Self {
        Case {
            shape,
            q: cast(&normal_vector(shape.q_len(), 1.0, seed)),
            k: cast(&normal_vector(shape.kv_len(), 1.0, seed + 1)),
            v: cast(&normal_vector(shape.kv_len(), 1.0, seed + 2)),
            d_o: cast(&normal_vector(shape.q_len(), 1.0, seed + 3)),
            mask,
        }
    }

    fn inputs(&self) -> AttentionInputs<'_, T> {
        AttentionInputs {
            q: &self.q,
            k: &self.k,
            v: &self.v,
            key_mask: self.mask.as_deref(),
        }
    }
}

fn parity<T: Element>(case: &Case<T>) {
    let what = format!(
        "{:?} mask={}",
        case.shape,
        if case.mask.is_some() {
            "padded"
        } else {
            "none"
        }
    );
    let inputs = case.inputs();
    let (want_o, want_lse) = attention_forward_ref(&case.shape, &inputs).unwrap();
    let (o, lse) = attention_forward_emulated(&case.shape, &inputs).unwrap();
    check(&format!("o {what}"), Op::Attention, &o, &want_o);
    check::<f32>(&format!("lse {what}"), Op::Attention, &lse, &want_lse);
    assert!(widen(&o).iter().chain(&lse).all(|x| x.is_finite()));

    let (want_dq, want_dk, want_dv) =
        attention_backward_ref(&case.shape, &inputs, &o, &case.d_o).unwrap();
    let (dq, dk, dv) =
        attention_backward_emulated(&case.shape, &inputs, &o, &lse, &case.d_o).unwrap();
    check(&format!("dq {what}"), Op::AttentionBackward, &dq, &want_dq);
    check(&format!("dk {what}"), Op::AttentionBackward, &dk, &want_dk);
    check(&format!("dv {what}"), Op::AttentionBackward, &dv, &want_dv);
}

fn all_cases<T: Element>(seed: u64, each: impl Fn(&Case<T>)) {
    for (i, &(b, hq, hkv, t, d)) in SHAPES.iter().enumerate() {
        let shape = AttentionShape::new(b, hq, hkv, t, d).unwrap();
        for (m, mask) in masks(&shape).into_iter().enumerate() {
            each(&Case::new(shape, mask, seed + 10 * i as u64 + m as u64 * 5));
        }
    }
}

#[test]
fn emulated_attention_matches_reference_f32() {
    all_cases::<f32>(0, parity);
}

#[test]
fn emulated_attention_matches_reference_bf16() {
    all_cases::<bf16>(100, parity);
}

fn rows_that_see_no_key<T: Element>() {
    // Batch row 0 is left-padded by 2: its query rows 0 and 1 see no key and (as the runtime's
    // all-minimum scores give) take the mean of v over all T keys, with lse = ln T.
    let shape = AttentionShape::new(1, 1, 1, 5, 8).unwrap();
    let case = Case::<T>::new(shape, Some(vec![0, 0, 1, 1, 1]), 7);
    let (o, lse) = attention_forward_emulated(&shape, &case.inputs()).unwrap();
    let (d, v) = (shape.head_dim, widen(&case.v));
    for row in 0..2 {
        let mean: Vec<f32> = (0..d)
            .map(|c| (0..5).map(|j| v[j * d + c]).sum::<f32>() / 5.0)
            .collect();
        check(
            "mean of v",
            Op::Attention,
            &o[row * d..(row + 1) * d],
            &mean,
        );
        check::<f32>("ln T", Op::Attention, &lse[row..row + 1], &[5f32.ln()]);
    }
    // Row 2 sees only key 2: its output is v[2].
    check("one key", Op::Attention, &o[2 * d..3 * d], &v[2 * d..3 * d]);
}

#[test]
fn rows_that_see_no_key_average_every_value() {
    rows_that_see_no_key::<f32>();
    rows_that_see_no_key::<bf16>();
}

fn gqa_sums<T: Element + PartialEq + std::fmt::Debug>() {
    // Two runs of the backward give identical bits (no atomics), and dk/dv of a kv head equal the
    // sum of the gradients of its query heads computed one head at a time (Hkv = Hq).
    let shape = AttentionShape::new(1, 4, 2, 9, 8).unwrap();
    let case = Case::<T>::new(shape, None, 40);
    let inputs = case.inputs();
    let (o, lse) = attention_forward_emulated(&shape, &inputs).unwrap();
    let first = attention_backward_emulated(&shape, &inputs, &o, &lse, &case.d_o).unwrap();
    let second = attention_backward_emulated(&shape, &inputs, &o, &lse, &case.d_o).unwrap();
    assert_eq!(first, second);

    let wide = AttentionShape::new(1, 4, 4, 9, 8).unwrap();
    let block = shape.seq * shape.head_dim;
    let repeat = |x: &[T]| -> Vec<T> {
        x.chunks(block)
            .flat_map(|c| c.iter().chain(c).copied().collect::<Vec<_>>())
            .collect()
    };
    let (k4, v4) = (repeat(&case.k), repeat(&case.v));
    let wide_inputs = AttentionInputs {
        q: &case.q,
        k: &k4,
        v: &v4,
        key_mask: None,
    };
    let (_, dk4, dv4) =
        attention_backward_emulated(&wide, &wide_inputs, &o, &lse, &case.d_o).unwrap();
    let fold = |x: &[T]| -> Vec<f32> {
        widen(x)
            .chunks(2 * block)
            .flat_map(|c| (0..block).map(|e| c[e] + c[block + e]).collect::<Vec<_>>())
            .collect()
    };
    check("dk fold", Op::AttentionBackward, &first.1, &fold(&dk4));
    check("dv fold", Op::AttentionBackward, &first.2, &fold(&dv4));
}

#[test]
fn gradients_sum_over_the_gqa_group_deterministically() {
    gqa_sums::<f32>();
    gqa_sums::<bf16>();
}

fn is_invalid<T: std::fmt::Debug>(r: qlora::Result<T>) -> bool {
    matches!(r, Err(Error::InvalidArgument { .. }))
}

#[test]
fn invalid_arguments_are_rejected() {
    assert!(is_invalid(AttentionShape::new(1, 3, 2, 4, 8)));
    assert!(is_invalid(AttentionShape::new(1, 2, 1, 4, 12)));
    assert!(is_invalid(AttentionShape::new(1, 2, 1, 4, 136)));
    assert!(is_invalid(AttentionShape::new(1, 2, 1, 0, 8)));
    assert!(is_invalid(AttentionShape::new(0, 2, 1, 4, 8)));
    assert!(is_invalid(AttentionShape::new(1, 0, 1, 4, 8)));
    let shape = AttentionShape::new(1, 2, 1, 4, 8).unwrap();
    let case = Case::<f32>::new(shape, Some(vec![1, 1, 2, 1]), 1);
    assert!(is_invalid(attention_forward_emulated(
        &shape,
        &case.inputs()
    )));
    assert!(is_invalid(attention_forward_ref(&shape, &case.inputs())));
    let short = AttentionInputs {
        q: &case.q[1..],
        k: &case.k,
        v: &case.v,
        key_mask: None,
    };
    assert!(is_invalid(attention_forward_emulated(&shape, &short)));
    let mask_short = AttentionInputs {
        key_mask: Some(&[1, 1, 1]),
        ..case.inputs()
    };
    assert!(is_invalid(attention_forward_emulated(&shape, &mask_short)));
    let ok = AttentionInputs {
        key_mask: None,
        ..case.inputs()
    };
    let (o, lse) = attention_forward_emulated(&shape, &ok).unwrap();
    assert!(is_invalid(attention_backward_emulated(
        &shape,
        &ok,
        &o,
        &lse[1..],
        &case.d_o
    )));
    assert!(is_invalid(attention_backward_emulated(
        &shape,
        &ok,
        &o[1..],
        &lse,
        &case.d_o
    )));
    let h: Vec<half::f16> = vec![half::f16::ONE; shape.q_len()];
    let hk: Vec<half::f16> = vec![half::f16::ONE; shape.kv_len()];
    let f16_inputs = AttentionInputs {
        q: &h,
        k: &hk,
        v: &hk,
        key_mask: None,
    };
    assert!(is_invalid(attention_forward_emulated(&shape, &f16_inputs)));
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::*;
    use qlora::kernels::cuda::CudaDevice;

    fn cuda_parity<T: Element>(dev: &CudaDevice, case: &Case<T>) {
        let s = dev.stream();
        let what = format!("cuda {:?}", case.shape);
        let (q, k, v) = (
            s.clone_htod(&case.q).unwrap(),
            s.clone_htod(&case.k).unwrap(),
            s.clone_htod(&case.v).unwrap(),
        );
        let mask = case.mask.as_ref().map(|m| s.clone_htod(m).unwrap());
        let inputs = DeviceAttentionInputs {
            q: &q,
            k: &k,
            v: &v,
            key_mask: mask.as_ref(),
        };
        let (o, lse) = attention_forward_cuda(dev, &case.shape, &inputs).unwrap();
        let (ho, hlse) = (s.clone_dtoh(&o).unwrap(), s.clone_dtoh(&lse).unwrap());
        let (want_o, want_lse) = attention_forward_ref(&case.shape, &case.inputs()).unwrap();
        check(&format!("o {what}"), Op::Attention, &ho, &want_o);
        check::<f32>(&format!("lse {what}"), Op::Attention, &hlse, &want_lse);

        let d_o = s.clone_htod(&case.d_o).unwrap();
        let mut grads = DeviceAttentionGrads::<T>::alloc(dev, &case.shape).unwrap();
        attention_backward_cuda_into(dev, &case.shape, &inputs, (&o, &lse, &d_o), &mut grads)
            .unwrap();
        let (want_dq, want_dk, want_dv) =
            attention_backward_ref(&case.shape, &case.inputs(), &ho, &case.d_o).unwrap();
        let dq = s.clone_dtoh(&grads.dq).unwrap();
        let dk = s.clone_dtoh(&grads.dk).unwrap();
        let dv = s.clone_dtoh(&grads.dv).unwrap();
        check(&format!("dq {what}"), Op::AttentionBackward, &dq, &want_dq);
        check(&format!("dk {what}"), Op::AttentionBackward, &dk, &want_dk);
        check(&format!("dv {what}"), Op::AttentionBackward, &dv, &want_dv);
    }

    #[test]
    fn cuda_attention_matches_reference() {
        let Some(dev) = CudaDevice::first_available() else {
            return;
        };
        all_cases::<f32>(200, |c| cuda_parity(&dev, c));
        all_cases::<bf16>(300, |c| cuda_parity(&dev, c));
        // A Llama-sized head and a sequence spanning many tiles of every kernel.
        let shape = AttentionShape::new(2, 4, 2, 300, 128).unwrap();
        for mask in masks(&shape) {
            cuda_parity(&dev, &Case::<bf16>::new(shape, mask, 400));
        }
    }
}
