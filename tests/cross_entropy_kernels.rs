//! Parity of the chunked cross-entropy kernels in kernels/cross_entropy.cu (forward: per-row loss
//! and logsumexp; backward: dlogits in place): the Rust reference ≡ the same CUDA source run
//! through the CPU emulation ≡ CUDA when a GPU is present, on odd vocab sizes, f32 and bf16
//! logits, ignored labels and extreme logits; the reference against candle's autograd.

use candle_core::{Device, Tensor, Var};
use half::{bf16, f16};
use qlora::kernels::cross_entropy::*;
use qlora::kernels::device::{Emulator, LaunchDevice};
use qlora::kernels::launch::Element;
use qlora::testing::normal_vector;
use qlora::tolerance::{lookup, Dtype, Op};
use qlora::Error;

const ROWS: &[usize] = &[1, 3, 9];
/// Odd sizes, one past a 4096 block, Llama-2's vocab plus 3; 300 and 32000 take the vector path
/// for f32, 32000 also for bf16.
const VOCABS: &[usize] = &[1, 7, 300, 4097, 32003];

use qlora::kernels::launch::tolerance_dtype as dtype;

fn cast<T: Element>(v: &[f32]) -> Vec<T> {
    v.iter().map(|&x| T::from_f32(x)).collect()
}

fn widen<T: Element>(v: &[T]) -> Vec<f32> {
    v.iter().map(|x| x.to_f32()).collect()
}

fn check_f32(what: &str, op: Op, got: &[f32], want: &[f32]) {
    if let Err(e) = lookup(op, Dtype::F32).check(got, want) {
        panic!("{what}: {e}");
    }
}

/// `got` (already in T) against the f32 reference rounded once to T.
fn check<T: Element>(what: &str, op: Op, got: &[T], want: &[f32]) {
    let want: Vec<f32> = want.iter().map(|&x| T::from_f32(x).to_f32()).collect();
    if let Err(e) = lookup(op, dtype::<T>()).check(&widen(got), &want) {
        panic!("{what} {:?}: {e}", dtype::<T>());
    }
}

/// Every third row (from the second) ignored; the others a label spread over the vocab.
fn labels_for(rows: usize, vocab: usize, seed: u64) -> Vec<i32> {
    (0..rows)
        .map(|r| {
            if r % 3 == 1 {
                IGNORE_INDEX
            } else {
                ((r as u64 * 7919 + seed * 31) % vocab as u64) as i32
            }
        })
        .collect()
}

fn grad_scale(labels: &[i32]) -> f32 {
    1.0 / label_tokens(labels).max(1) as f32
}

/// The checks of a backward's `d` (in T) against the reference and the row invariants.
fn check_backward<T: Element>(
    what: &str,
    d: &[T],
    want_d: &[f32],
    labels: &[i32],
    vocab: usize,
    scale: f32,
) {
    check(
        &format!("{what} dlogits"),
        Op::CrossEntropyBackward,
        d,
        want_d,
    );
    for (r, &label) in labels.iter().enumerate() {
        let row = widen(&d[r * vocab..(r + 1) * vocab]);
        if label == IGNORE_INDEX {
            assert!(row.iter().all(|&v| v == 0.0), "{what}: ignored row {r}");
        } else {
            // Softmax sums to 1, so a row of dlogits sums to 0.
            let sum: f32 = row.iter().sum();
            assert!(sum.abs() < 1e-2 * scale, "{what}: row {r} sums to {sum}");
        }
    }
}

/// Forward and backward of reference and device on `logits`; the device backward starts from
/// the reference lse, so they differ only in their arithmetic. Returns the device losses.
fn parity<D: LaunchDevice, T: Element>(
    dev: &D,
    what: &str,
    logits: &[T],
    labels: &[i32],
    vocab: usize,
) -> Vec<f32> {
    let what = format!("{} {what} {:?}", dev.label(), dtype::<T>());
    let (want_loss, want_lse) = cross_entropy_forward_ref(logits, labels, vocab).unwrap();
    let (mut d_logits, d_labels) = (dev.upload(logits).unwrap(), dev.upload(labels).unwrap());
    let (loss, lse) = cross_entropy_forward(dev, &d_logits, &d_labels, vocab).unwrap();
    let (loss, lse) = (dev.download(&loss).unwrap(), dev.download(&lse).unwrap());
    check_f32(&format!("{what} loss"), Op::CrossEntropy, &loss, &want_loss);
    check_f32(&format!("{what} lse"), Op::CrossEntropy, &lse, &want_lse);
    assert!(loss.iter().all(|l| l.is_finite()), "{what}: {loss:?}");

    let scale = grad_scale(labels);
    let want_d = cross_entropy_backward_ref(logits, labels, &want_lse, vocab, scale).unwrap();
    let ref_lse = dev.upload(&want_lse).unwrap();
    cross_entropy_backward(dev, &mut d_logits, &d_labels, &ref_lse, vocab, scale).unwrap();
    let d = dev.download(&d_logits).unwrap();
    check_backward(&what, &d, &want_d, labels, vocab, scale);
    loss
}

fn random_parity<D: LaunchDevice, T: Element>(dev: &D, rows: usize, vocab: usize, seed: u64) {
    let logits: Vec<T> = cast(&normal_vector(rows * vocab, 3.0, seed));
    let labels = labels_for(rows, vocab, seed);
    parity(
        dev,
        &format!("rows={rows} vocab={vocab}"),
        &logits,
        &labels,
        vocab,
    );
}

fn every_shape_and_dtype<D: LaunchDevice>(dev: &D) {
    let mut seed = 0;
    for &rows in ROWS {
        for &vocab in VOCABS {
            random_parity::<D, f32>(dev, rows, vocab, seed);
            random_parity::<D, bf16>(dev, rows, vocab, seed + 1);
            seed += 2;
        }
    }
    random_parity::<D, f32>(dev, 3, 32000, 100);
    random_parity::<D, bf16>(dev, 3, 32000, 101);
    random_parity::<D, bf16>(dev, 2, 320, 102);
}
qlora::device_test!(
    cross_entropy_matches_reference_forward_and_backward,
    every_shape_and_dtype
);

/// Large vocabularies and a long chunk, too slow for the emulation: on a GPU only.
#[test]
fn cross_entropy_large_shapes_on_a_gpu() {
    #[cfg(feature = "cuda")]
    if let Some(dev) = qlora::kernels::cuda::CudaDevice::first_available() {
        let mut seed = 200;
        for &rows in ROWS {
            for vocab in [32000, 128256] {
                random_parity::<_, f32>(&dev, rows, vocab, seed);
                random_parity::<_, bf16>(&dev, rows, vocab, seed);
                seed += 1;
            }
        }
        random_parity::<_, bf16>(&dev, 1024, 32000, 300);
    }
}

/// Offsetting the buffer by one element breaks 16-byte alignment with vocab % 8 == 0. The
/// forward reads a misaligned view; the backward overwrites `buf[1..]` in place.
fn misaligned<T: Element>(f: &[f32]) -> (Vec<T>, usize, usize, Vec<i32>) {
    let (rows, vocab) = (3, 320);
    let labels = labels_for(rows, vocab, 7);
    let v: Vec<T> = cast(&f[..rows * vocab + 1]);
    (v, rows, vocab, labels)
}

fn misaligned_forward<D: LaunchDevice, T: Element>(dev: &D, f: &[f32]) {
    let (v, rows, vocab, labels) = misaligned::<T>(f);
    let what = format!("{} misaligned {:?}", dev.label(), dtype::<T>());
    let (want_loss, want_lse) = cross_entropy_forward_ref(&v[1..], &labels, vocab).unwrap();
    let (buf, d_labels) = (dev.upload(&v).unwrap(), dev.upload(&labels).unwrap());
    let view = dev.slice(&buf, 1..rows * vocab + 1).unwrap();
    let (loss, lse) = cross_entropy_forward(dev, &view, &d_labels, vocab).unwrap();
    let (loss, lse) = (dev.download(&loss).unwrap(), dev.download(&lse).unwrap());
    check_f32(&format!("{what} loss"), Op::CrossEntropy, &loss, &want_loss);
    check_f32(&format!("{what} lse"), Op::CrossEntropy, &lse, &want_lse);
}

fn misaligned_forwards<D: LaunchDevice>(dev: &D) {
    let f = normal_vector(3 * 320 + 1, 3.0, 8);
    misaligned_forward::<D, f32>(dev, &f);
    misaligned_forward::<D, bf16>(dev, &f);
}
qlora::device_test!(
    cross_entropy_forward_takes_the_scalar_path_on_misaligned_rows,
    misaligned_forwards
);

/// The in-place backward at an odd offset (a host sub-slice, which the emulator takes as a
/// buffer).
fn misaligned_backward<T: Element>(f: &[f32]) {
    let dev = Emulator::default();
    let (mut v, _, vocab, labels) = misaligned::<T>(f);
    let what = format!("misaligned {:?}", dtype::<T>());
    let (_, want_lse) = cross_entropy_forward_ref(&v[1..], &labels, vocab).unwrap();
    let scale = grad_scale(&labels);
    let want_d = cross_entropy_backward_ref(&v[1..], &labels, &want_lse, vocab, scale).unwrap();
    cross_entropy_backward(&dev, &mut v[1..], &labels, &want_lse, vocab, scale).unwrap();
    check_backward(&what, &v[1..], &want_d, &labels, vocab, scale);
}

#[test]
fn emulated_cross_entropy_backward_takes_the_scalar_path_on_misaligned_rows() {
    let f = normal_vector(3 * 320 + 1, 3.0, 8);
    misaligned_backward::<f32>(&f);
    misaligned_backward::<bf16>(&f);
}

fn all_ignored<D: LaunchDevice>(dev: &D) {
    let (rows, vocab) = (3, 300);
    let logits = normal_vector(rows * vocab, 3.0, 9);
    let labels = vec![IGNORE_INDEX; rows];
    assert_eq!(label_tokens(&labels), 0);
    let (mut d, d_labels) = (dev.upload(&logits).unwrap(), dev.upload(&labels).unwrap());
    let (loss, lse) = cross_entropy_forward(dev, &d, &d_labels, vocab).unwrap();
    let (loss, lse) = (dev.download(&loss).unwrap(), dev.download(&lse).unwrap());
    assert_eq!((loss, lse), (vec![0.0; rows], vec![0.0; rows]));
    let zero_lse = dev.upload(&[0f32; 3]).unwrap();
    cross_entropy_backward(dev, &mut d, &d_labels, &zero_lse, vocab, 0.5).unwrap();
    assert!(dev.download(&d).unwrap().iter().all(|&v| v == 0.0));
}
qlora::device_test!(
    all_ignored_chunk_gives_zero_loss_and_zero_gradient,
    all_ignored
);

/// Rows mixing logits near ±1e4 (and one -inf): a naive exp overflows, the online max keeps
/// everything finite. The label sits on a large logit, a small one, and the masked one's neighbour.
fn extreme_logits(rows: usize, vocab: usize) -> (Vec<f32>, Vec<i32>) {
    let noise = normal_vector(rows * vocab, 1.0, 11);
    let logits: Vec<f32> = noise
        .iter()
        .enumerate()
        .map(|(i, &n)| match i % vocab % 5 {
            0 => 1e4 + 0.5 * n,
            1 => -1e4 + n,
            2 if i % vocab == 2 => f32::NEG_INFINITY,
            _ => n,
        })
        .collect();
    let labels = (0..rows)
        .map(|r| match [0, 1, 3, IGNORE_INDEX][r % 4] {
            IGNORE_INDEX => IGNORE_INDEX,
            l => (l + 5 * (r as i32 / 4)) % vocab as i32,
        })
        .collect();
    (logits, labels)
}

fn extreme<D: LaunchDevice>(dev: &D) {
    for vocab in [7, 300, 4097] {
        let (logits, labels) = extreme_logits(9, vocab);
        let what = format!("±1e4 vocab={vocab}");
        let loss = parity(dev, &what, &logits, &labels, vocab);
        parity(dev, &what, &cast::<bf16>(&logits), &labels, vocab);
        // A label on a ~-1e4 logit among ~+1e4 ones costs ~2e4; one among the largest costs ~ln(V / 5).
        assert!(loss[1] > 1.9e4, "{}", loss[1]);
        assert!(loss[0] < (vocab as f32).ln() + 3.0, "{}", loss[0]);
    }
}
qlora::device_test!(extreme_logits_stay_finite_and_match_the_reference, extreme);

fn var(v: &[f32], shape: &[usize]) -> Var {
    Var::from_tensor(&Tensor::from_slice(v, shape, &Device::Cpu).unwrap()).unwrap()
}

#[test]
fn reference_matches_candle_autograd() {
    for &(rows, vocab) in &[(1, 1), (3, 7), (9, 300), (4, 4097)] {
        let logits = normal_vector(rows * vocab, 3.0, 12);
        let labels = labels_for(rows, vocab, 13);
        let scale = grad_scale(&labels);
        // loss = Σ_valid -log_softmax(x)[label] * scale, so d loss / dx is the kernel's dlogits.
        let x = var(&logits, &[rows, vocab]);
        let xt = x.as_tensor();
        let max = xt.max_keepdim(1).unwrap().detach();
        let shifted = xt.broadcast_sub(&max).unwrap();
        let log_sum = shifted
            .exp()
            .unwrap()
            .sum_keepdim(1)
            .unwrap()
            .log()
            .unwrap();
        let log_p = shifted.broadcast_sub(&log_sum).unwrap();
        let index: Vec<u32> = labels.iter().map(|&l| l.max(0) as u32).collect();
        let index = Tensor::from_slice(&index, (rows, 1), &Device::Cpu).unwrap();
        let weight: Vec<f32> = labels
            .iter()
            .map(|&l| if l == IGNORE_INDEX { 0.0 } else { -scale })
            .collect();
        let weight = Tensor::from_slice(&weight, (rows, 1), &Device::Cpu).unwrap();
        let picked = log_p.gather(&index, 1).unwrap();
        let loss = (picked.clone() * weight).unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        let candle_d: Vec<f32> = grads
            .get(xt)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let candle_loss: Vec<f32> = picked
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .zip(&labels)
            .map(|(&p, &l)| if l == IGNORE_INDEX { 0.0 } else { -p })
            .collect();

        let what = format!("candle rows={rows} vocab={vocab}");
        let (ref_loss, ref_lse) = cross_entropy_forward_ref(&logits, &labels, vocab).unwrap();
        check_f32(&what, Op::CrossEntropy, &ref_loss, &candle_loss);
        let ref_d = cross_entropy_backward_ref(&logits, &labels, &ref_lse, vocab, scale).unwrap();
        check_f32(&what, Op::CrossEntropyBackward, &ref_d, &candle_d);
    }
}

fn is_invalid<T>(r: qlora::Result<T>) -> bool {
    matches!(r, Err(Error::InvalidArgument { .. }))
}

fn invalid_arguments<D: LaunchDevice>(dev: &D) {
    let logits = vec![0f32; 3 * 5];
    let d_logits = dev.upload(&logits).unwrap();
    let up = |l: &[i32]| dev.upload(l).unwrap();
    let (labels, short, empty) = (up(&[0, 1, 2]), up(&[0, 1]), up(&[]));
    let fwd = |labels: &D::Buffer<i32>| cross_entropy_forward(dev, &d_logits, labels, 5);
    assert!(is_invalid(fwd(&short)));
    assert!(is_invalid(fwd(&empty)));
    assert!(is_invalid(cross_entropy_forward_ref(
        &logits,
        &[0, 5, 1],
        5
    )));
    assert!(is_invalid(cross_entropy_forward_ref(
        &logits,
        &[0, -1, 1],
        5
    )));
    assert!(is_invalid(cross_entropy_forward(
        dev, &d_logits, &labels, 0
    )));
    let logits14 = dev.slice(&d_logits, 0..14).unwrap();
    assert!(is_invalid(cross_entropy_forward(
        dev, &logits14, &labels, 5
    )));
    let half_logits = dev.upload(&[f16::ZERO; 15]).unwrap();
    assert!(is_invalid(cross_entropy_forward(
        dev,
        &half_logits,
        &labels,
        5
    )));
    let (mut losses, mut lse2) = (
        dev.upload(&[0f32; 3]).unwrap(),
        dev.upload(&[0f32; 2]).unwrap(),
    );
    assert!(is_invalid(cross_entropy_forward_into(
        dev,
        &d_logits,
        &labels,
        5,
        &mut losses,
        &mut lse2
    )));

    let lse = dev.upload(&[0f32; 3]).unwrap();
    let lse_2 = dev.slice(&lse, 0..2).unwrap();
    let mut d = dev.upload(&logits).unwrap();
    assert!(is_invalid(cross_entropy_backward(
        dev, &mut d, &labels, &lse_2, 5, 1.0
    )));
    assert!(is_invalid(cross_entropy_backward(
        dev,
        &mut d,
        &labels,
        &lse,
        5,
        f32::NAN
    )));
    assert!(is_invalid(cross_entropy_backward(
        dev, &mut d, &short, &lse_2, 5, 1.0
    )));
    let mut half_d = dev.upload(&[f16::ZERO; 15]).unwrap();
    assert!(is_invalid(cross_entropy_backward(
        dev,
        &mut half_d,
        &labels,
        &lse,
        5,
        1.0
    )));
    assert!(is_invalid(cross_entropy_backward_ref(
        &logits,
        &[0, 1, 2],
        &[0f32; 3],
        5,
        f32::INFINITY
    )));
    assert!(is_invalid(cross_entropy_backward_ref(
        &logits,
        &[0, 1, 7],
        &[0f32; 3],
        5,
        1.0
    )));
    assert!(
        dev.download(&d).unwrap().iter().all(|&v| v == 0.0),
        "rejected calls wrote nothing"
    );
}
qlora::device_test!(invalid_arguments_are_rejected, invalid_arguments);

/// Labels live on the device, so the launchers do not check them: a label outside `0..vocab`
/// other than -100 (too large, -1, -101) poisons its row with NaN, loss and dlogits, and leaves
/// the other rows alone.
fn bad_labels<D: LaunchDevice>(dev: &D) {
    let vocab = 5;
    let logits = normal_vector(3 * vocab, 1.0, 14);
    let d_logits = dev.upload(&logits).unwrap();
    for bad in [5, -1, -101] {
        let labels = [0, bad, 1];
        let d_labels = dev.upload(&labels).unwrap();
        let (loss, lse) = cross_entropy_forward(dev, &d_logits, &d_labels, vocab).unwrap();
        let loss = dev.download(&loss).unwrap();
        assert!(loss[1].is_nan(), "label {bad}: {loss:?}");
        assert!(
            loss[0].is_finite() && loss[2].is_finite(),
            "label {bad}: {loss:?}"
        );
        let mut d = dev.upload(&logits).unwrap();
        cross_entropy_backward(dev, &mut d, &d_labels, &lse, vocab, 1.0).unwrap();
        let d = dev.download(&d).unwrap();
        assert!(
            d[vocab..2 * vocab].iter().all(|v| v.is_nan()),
            "label {bad}: {d:?}"
        );
        assert!(
            d[..vocab]
                .iter()
                .chain(&d[2 * vocab..])
                .all(|v| v.is_finite()),
            "label {bad}: {d:?}"
        );
    }
}
qlora::device_test!(a_label_outside_the_vocab_is_nan, bad_labels);
