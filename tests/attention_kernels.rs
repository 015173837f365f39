//! Parity of the causal attention kernels in kernels/attention.cu, forward and backward: the Rust
//! reference ≡ the same CUDA source run through the CPU emulation ≡ CUDA when a GPU is present, on
//! odd shapes (one-token, non-multiples of every tile), GQA, padding masks with rows that see no
//! key, f32 and bf16. (The reference against the runtime and candle's autograd: the unit tests of
//! src/kernels/attention.rs.)

use half::bf16;
use qlora::kernels::attention::*;
use qlora::kernels::device::{Emulator, KernelArg, LaunchDevice};
use qlora::kernels::launch::Element;
use qlora::testing::normal_vector;
use qlora::tolerance::{lookup, Op};
use qlora::Error;

/// (batch, q_heads, kv_heads, seq, head_dim).
const SHAPES: &[(usize, usize, usize, usize, usize)] = &[
    (2, 2, 1, 1, 8),
    (2, 6, 2, 5, 16),
    (2, 2, 1, 67, 24),
    (1, 2, 2, 33, 64),
];

use qlora::kernels::launch::tolerance_dtype as dtype;

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

/// A case's buffers on a device.
struct OnDevice<D: LaunchDevice, T: Element> {
    q: D::Buffer<T>,
    k: D::Buffer<T>,
    v: D::Buffer<T>,
    d_o: D::Buffer<T>,
    mask: Option<D::Buffer<u8>>,
}

impl<D: LaunchDevice, T: Element> OnDevice<D, T> {
    fn new(dev: &D, case: &Case<T>) -> Self {
        OnDevice {
            q: dev.upload(&case.q).unwrap(),
            k: dev.upload(&case.k).unwrap(),
            v: dev.upload(&case.v).unwrap(),
            d_o: dev.upload(&case.d_o).unwrap(),
            mask: case.mask.as_ref().map(|m| dev.upload(m).unwrap()),
        }
    }

    fn inputs(&self) -> DeviceAttentionInputs<'_, D, T> {
        DeviceAttentionInputs {
            q: &self.q,
            k: &self.k,
            v: &self.v,
            key_mask: self.mask.as_ref().map(|m| m as &dyn KernelArg<D, u8>),
        }
    }
}

/// Forward and backward on `dev`: `(o, lse, dq, dk, dv)` on the host.
#[allow(clippy::type_complexity)]
fn run<D: LaunchDevice, T: Element>(
    dev: &D,
    case: &Case<T>,
) -> (Vec<T>, Vec<f32>, Vec<T>, Vec<T>, Vec<T>) {
    let bufs = OnDevice::new(dev, case);
    let inputs = bufs.inputs();
    let (o, lse) = attention_forward(dev, &case.shape, &inputs).unwrap();
    let (dq, dk, dv) = attention_backward(dev, &case.shape, &inputs, &o, &lse, &bufs.d_o).unwrap();
    let down = |b: &D::Buffer<T>| dev.download(b).unwrap();
    (
        down(&o),
        dev.download(&lse).unwrap(),
        down(&dq),
        down(&dk),
        down(&dv),
    )
}

fn parity<D: LaunchDevice, T: Element>(dev: &D, case: &Case<T>) {
    let what = format!(
        "{} {:?} mask={}",
        dev.label(),
        case.shape,
        if case.mask.is_some() {
            "padded"
        } else {
            "none"
        }
    );
    let inputs = case.inputs();
    let (want_o, want_lse) = attention_forward_ref(&case.shape, &inputs).unwrap();
    let (o, lse, dq, dk, dv) = run(dev, case);
    check(&format!("o {what}"), Op::Attention, &o, &want_o);
    check::<f32>(&format!("lse {what}"), Op::Attention, &lse, &want_lse);
    assert!(widen(&o).iter().chain(&lse).all(|x| x.is_finite()));

    let (want_dq, want_dk, want_dv) =
        attention_backward_ref(&case.shape, &inputs, &o, &case.d_o).unwrap();
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

fn every_case_f32<D: LaunchDevice>(dev: &D) {
    all_cases::<f32>(0, |c| parity(dev, c));
}
qlora::device_test!(attention_matches_reference_f32, every_case_f32);

fn every_case_bf16<D: LaunchDevice>(dev: &D) {
    all_cases::<bf16>(100, |c| parity(dev, c));
}
qlora::device_test!(attention_matches_reference_bf16, every_case_bf16);

/// A Llama-sized head and a sequence spanning many tiles of every kernel: too slow for the
/// emulation, on a GPU only.
#[test]
fn attention_llama_head_on_a_gpu() {
    #[cfg(feature = "cuda")]
    if let Some(dev) = qlora::kernels::cuda::CudaDevice::first_available() {
        let shape = AttentionShape::new(2, 4, 2, 300, 128).unwrap();
        for mask in masks(&shape) {
            parity(&dev, &Case::<bf16>::new(shape, mask, 400));
        }
    }
}

fn rows_that_see_no_key<D: LaunchDevice, T: Element>(dev: &D) {
    // Batch row 0 is left-padded by 2: its query rows 0 and 1 see no key and (as the runtime's
    // all-minimum scores give) take the mean of v over all T keys, with lse = ln T.
    let shape = AttentionShape::new(1, 1, 1, 5, 8).unwrap();
    let case = Case::<T>::new(shape, Some(vec![0, 0, 1, 1, 1]), 7);
    let (o, lse, ..) = run(dev, &case);
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

fn rows_that_see_no_key_every_dtype<D: LaunchDevice>(dev: &D) {
    rows_that_see_no_key::<D, f32>(dev);
    rows_that_see_no_key::<D, bf16>(dev);
}
qlora::device_test!(
    rows_that_see_no_key_average_every_value,
    rows_that_see_no_key_every_dtype
);

fn gqa_sums<D: LaunchDevice, T: Element + PartialEq + std::fmt::Debug>(dev: &D) {
    // Two runs of the backward give identical bits (no atomics), and dk/dv of a kv head equal the
    // sum of the gradients of its query heads computed one head at a time (Hkv = Hq).
    let shape = AttentionShape::new(1, 4, 2, 9, 8).unwrap();
    let case = Case::<T>::new(shape, None, 40);
    let bufs = OnDevice::new(dev, &case);
    let inputs = bufs.inputs();
    let (o, lse) = attention_forward(dev, &shape, &inputs).unwrap();
    let backward = || {
        let (dq, dk, dv) = attention_backward(dev, &shape, &inputs, &o, &lse, &bufs.d_o).unwrap();
        (
            dev.download(&dq).unwrap(),
            dev.download(&dk).unwrap(),
            dev.download(&dv).unwrap(),
        )
    };
    let first = backward();
    let second = backward();
    assert_eq!(first, second);

    let wide = AttentionShape::new(1, 4, 4, 9, 8).unwrap();
    let block = shape.seq * shape.head_dim;
    let repeat = |x: &[T]| -> Vec<T> {
        x.chunks(block)
            .flat_map(|c| c.iter().chain(c).copied().collect::<Vec<_>>())
            .collect()
    };
    let (k4, v4) = (
        dev.upload(&repeat(&case.k)).unwrap(),
        dev.upload(&repeat(&case.v)).unwrap(),
    );
    let wide_inputs = DeviceAttentionInputs {
        k: &k4,
        v: &v4,
        key_mask: None,
        ..inputs
    };
    let (_, dk4, dv4) = attention_backward(dev, &wide, &wide_inputs, &o, &lse, &bufs.d_o).unwrap();
    let fold = |x: &D::Buffer<T>| -> Vec<f32> {
        widen(&dev.download(x).unwrap())
            .chunks(2 * block)
            .flat_map(|c| (0..block).map(|e| c[e] + c[block + e]).collect::<Vec<_>>())
            .collect()
    };
    check("dk fold", Op::AttentionBackward, &first.1, &fold(&dk4));
    check("dv fold", Op::AttentionBackward, &first.2, &fold(&dv4));
}

fn gqa_sums_every_dtype<D: LaunchDevice>(dev: &D) {
    gqa_sums::<D, f32>(dev);
    gqa_sums::<D, bf16>(dev);
}
qlora::device_test!(
    gradients_sum_over_the_gqa_group_deterministically,
    gqa_sums_every_dtype
);

/// The emulator takes the reference's host inputs as they are.
#[test]
fn host_inputs_run_on_the_emulator() {
    let dev = Emulator::default();
    let shape = AttentionShape::new(2, 6, 2, 5, 16).unwrap();
    let case = Case::<f32>::new(shape, masks(&shape).pop().unwrap(), 3);
    let host = case.inputs();
    let (o, lse) = attention_forward(&dev, &shape, &DeviceAttentionInputs::host(&host)).unwrap();
    let (want_o, lse_run, ..) = run(&dev, &case);
    assert_eq!(o, want_o);
    assert_eq!(lse, lse_run);
}

fn is_invalid<T>(r: qlora::Result<T>) -> bool {
    matches!(r, Err(Error::InvalidArgument { .. }))
}

#[test]
fn invalid_shapes_are_rejected() {
    assert!(is_invalid(AttentionShape::new(1, 3, 2, 4, 8)));
    assert!(is_invalid(AttentionShape::new(1, 2, 1, 4, 12)));
    assert!(is_invalid(AttentionShape::new(1, 2, 1, 4, 136)));
    assert!(is_invalid(AttentionShape::new(1, 2, 1, 0, 8)));
    assert!(is_invalid(AttentionShape::new(0, 2, 1, 4, 8)));
    assert!(is_invalid(AttentionShape::new(1, 0, 1, 4, 8)));
    let shape = AttentionShape::new(1, 2, 1, 4, 8).unwrap();
    let case = Case::<f32>::new(shape, Some(vec![1, 1, 2, 1]), 1);
    assert!(is_invalid(attention_forward_ref(&shape, &case.inputs())));
}

fn invalid_arguments<D: LaunchDevice>(dev: &D) {
    let shape = AttentionShape::new(1, 2, 1, 4, 8).unwrap();
    let case = Case::<f32>::new(shape, None, 1);
    let bufs = OnDevice::new(dev, &case);
    let ok = bufs.inputs();
    let q_short = dev.slice(&bufs.q, 1..shape.q_len()).unwrap();
    let short = DeviceAttentionInputs { q: &q_short, ..ok };
    assert!(is_invalid(attention_forward(dev, &shape, &short)));
    let mask3 = dev.upload(&[1u8, 1, 1]).unwrap();
    let mask_short = DeviceAttentionInputs {
        key_mask: Some(&mask3),
        ..ok
    };
    assert!(is_invalid(attention_forward(dev, &shape, &mask_short)));
    let (o, lse) = attention_forward(dev, &shape, &ok).unwrap();
    let lse_short = dev.slice(&lse, 1..shape.rows()).unwrap();
    assert!(is_invalid(attention_backward(
        dev, &shape, &ok, &o, &lse_short, &bufs.d_o
    )));
    let o_short = dev.slice(&o, 1..shape.q_len()).unwrap();
    assert!(is_invalid(attention_backward(
        dev, &shape, &ok, &o_short, &lse, &bufs.d_o
    )));
    let (mut o_small, mut lse_ok) = (
        dev.zeros::<f32>(3).unwrap(),
        dev.zeros::<f32>(shape.rows()).unwrap(),
    );
    assert!(is_invalid(attention_forward_into(
        dev,
        &shape,
        &ok,
        &mut o_small,
        &mut lse_ok
    )));
    let wide = AttentionShape::new(1, 2, 2, 4, 8).unwrap();
    let mut wrong = DeviceAttentionGrads::<D, f32>::alloc(dev, &wide).unwrap();
    assert!(is_invalid(attention_backward_into(
        dev, &shape, &ok, &o, &lse, &bufs.d_o, &mut wrong
    )));
    let h = dev.upload(&vec![half::f16::ONE; shape.q_len()]).unwrap();
    let hk = dev.upload(&vec![half::f16::ONE; shape.kv_len()]).unwrap();
    let f16_inputs = DeviceAttentionInputs {
        q: &h,
        k: &hk,
        v: &hk,
        key_mask: None,
    };
    assert!(is_invalid(attention_forward(dev, &shape, &f16_inputs)));
}
qlora::device_test!(invalid_arguments_are_rejected, invalid_arguments);

/// The mask lives on the device, so its values are not checked: any non-zero byte attends, as 1
/// does.
fn any_nonzero_mask_byte_attends<D: LaunchDevice>(dev: &D) {
    let shape = AttentionShape::new(1, 2, 1, 4, 8).unwrap();
    let ones = run(dev, &Case::<f32>::new(shape, Some(vec![0, 1, 1, 1]), 1));
    let other = run(dev, &Case::<f32>::new(shape, Some(vec![0, 1, 2, 255]), 1));
    assert_eq!(ones, other);
}
qlora::device_test!(a_nonzero_mask_byte_attends, any_nonzero_mask_byte_attends);
