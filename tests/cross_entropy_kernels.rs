//! Parity of the chunked cross-entropy kernels in kernels/cross_entropy.cu (forward: per-row loss
//! and logsumexp; backward: dlogits in place): the Rust reference ≡ the same CUDA source run
//! through the CPU emulation ≡ CUDA when a GPU is present, on odd vocab sizes, f32 and bf16
//! logits, ignored labels and extreme logits; the reference against candle's autograd.

use candle_core::{Device, Tensor, Var};
use half::{bf16, f16};
use qlora::kernels::cross_entropy::*;
use qlora::kernels::launch::Element;
use qlora::testing::normal_vector;
use qlora::tolerance::{lookup, Dtype, Op};
use qlora::Error;

const ROWS: &[usize] = &[1, 3, 9];
/// Odd sizes, one past a 4096 block, Llama-2's vocab plus 3; 300 and 32000 take the vector path
/// for f32, 32000 also for bf16.
const VOCABS: &[usize] = &[1, 7, 300, 4097, 32003];

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

/// Forward and backward of reference and emulation on `logits`; the backward of both starts from
/// the reference lse, so they differ only in their arithmetic. The in-place buffer of the backward
/// starts `pad` elements into its allocation (1 keeps a misaligned input misaligned).
fn parity<T: Element>(what: &str, logits: &[T], labels: &[i32], vocab: usize, pad: usize) {
    let what = format!("{what} {:?}", dtype::<T>());
    let (want_loss, want_lse) = cross_entropy_forward_ref(logits, labels, vocab).unwrap();
    let (loss, lse) = cross_entropy_forward_emulated(logits, labels, vocab).unwrap();
    check_f32(&format!("{what} loss"), Op::CrossEntropy, &loss, &want_loss);
    check_f32(&format!("{what} lse"), Op::CrossEntropy, &lse, &want_lse);
    assert!(loss.iter().all(|l| l.is_finite()), "{what}: {loss:?}");

    let scale = grad_scale(labels);
    let want_d = cross_entropy_backward_ref(logits, labels, &want_lse, vocab, scale).unwrap();
    let mut buf = vec![T::default(); pad];
    buf.extend_from_slice(logits);
    let d = &mut buf[pad..];
    cross_entropy_backward_emulated(d, labels, &want_lse, vocab, scale).unwrap();
    check(
        &format!("{what} dlogits"),
        Op::CrossEntropyBackward,
        d,
        &want_d,
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

fn random_parity<T: Element>(rows: usize, vocab: usize, seed: u64) {
    let logits: Vec<T> = cast(&normal_vector(rows * vocab, 3.0, seed));
    let labels = labels_for(rows, vocab, seed);
    parity(
        &format!("rows={rows} vocab={vocab}"),
        &logits,
        &labels,
        vocab,
        0,
    );
}

#[test]
fn emulated_cross_entropy_matches_reference_forward_and_backward() {
    let mut seed = 0;
    for &rows in ROWS {
        for &vocab in VOCABS {
            random_parity::<f32>(rows, vocab, seed);
            random_parity::<bf16>(rows, vocab, seed + 1);
            seed += 2;
        }
    }
    random_parity::<f32>(3, 32000, 100);
    random_parity::<bf16>(3, 32000, 101);
    random_parity::<bf16>(2, 320, 102);
}

#[test]
fn emulated_cross_entropy_takes_the_scalar_path_on_misaligned_rows() {
    // Offsetting the buffer by one element breaks 16-byte alignment with vocab % 8 == 0.
    let (rows, vocab) = (3, 320);
    let labels = labels_for(rows, vocab, 7);
    let f: Vec<f32> = normal_vector(rows * vocab + 1, 3.0, 8);
    parity("misaligned", &f[1..], &labels, vocab, 1);
    let b: Vec<bf16> = cast(&f);
    parity("misaligned", &b[1..], &labels, vocab, 1);
}

#[test]
fn all_ignored_chunk_gives_zero_loss_and_zero_gradient() {
    let (rows, vocab) = (3, 300);
    let logits = normal_vector(rows * vocab, 3.0, 9);
    let labels = vec![IGNORE_INDEX; rows];
    assert_eq!(label_tokens(&labels), 0);
    let (loss, lse) = cross_entropy_forward_emulated(&logits, &labels, vocab).unwrap();
    assert_eq!((loss, lse), (vec![0.0; rows], vec![0.0; rows]));
    let mut d = logits.clone();
    cross_entropy_backward_emulated(&mut d, &labels, &[0.0; 3], vocab, 0.5).unwrap();
    assert!(d.iter().all(|&v| v == 0.0));
}

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

#[test]
fn extreme_logits_stay_finite_and_match_the_reference() {
    for vocab in [7, 300, 4097] {
        let (logits, labels) = extreme_logits(9, vocab);
        parity(&format!("±1e4 vocab={vocab}"), &logits, &labels, vocab, 0);
        parity(
            &format!("±1e4 vocab={vocab}"),
            &cast::<bf16>(&logits),
            &labels,
            vocab,
            0,
        );
        let (loss, _) = cross_entropy_forward_emulated(&logits, &labels, vocab).unwrap();
        // A label on a ~-1e4 logit among ~+1e4 ones costs ~2e4; one among the largest costs ~ln(V / 5).
        assert!(loss[1] > 1.9e4, "{}", loss[1]);
        assert!(loss[0] < (vocab as f32).ln() + 3.0, "{}", loss[0]);
    }
}

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

fn is_invalid<T: std::fmt::Debug>(r: qlora::Result<T>) -> bool {
    matches!(r, Err(Error::InvalidArgument { .. }))
}

#[test]
fn invalid_arguments_are_rejected() {
    let logits = vec![0f32; 3 * 5];
    let lse = [0f32; 3];
    let fwd = |labels: &[i32]| cross_entropy_forward_emulated(&logits, labels, 5);
    assert!(is_invalid(fwd(&[0, 5, 1])));
    assert!(is_invalid(fwd(&[0, -1, 1])));
    assert!(is_invalid(fwd(&[0, -101, 1])));
    assert!(is_invalid(fwd(&[0, 1])));
    assert!(is_invalid(fwd(&[])));
    assert!(is_invalid(cross_entropy_forward_ref(
        &logits,
        &[0, 5, 1],
        5
    )));
    assert!(is_invalid(cross_entropy_forward_emulated(
        &logits,
        &[0, 1, 2],
        0
    )));
    assert!(is_invalid(cross_entropy_forward_emulated(
        &logits[..14],
        &[0, 1, 2],
        5
    )));
    let half_logits = vec![f16::ZERO; 15];
    assert!(is_invalid(cross_entropy_forward_emulated(
        &half_logits,
        &[0, 1, 2],
        5
    )));

    let mut d = logits.clone();
    let mut bwd = |labels: &[i32], lse: &[f32], scale: f32| {
        cross_entropy_backward_emulated(&mut d, labels, lse, 5, scale)
    };
    assert!(is_invalid(bwd(&[0, 1, 2], &lse[..2], 1.0)));
    assert!(is_invalid(bwd(&[0, 1, 7], &lse, 1.0)));
    assert!(is_invalid(bwd(&[0, 1, 2], &lse, f32::NAN)));
    assert!(is_invalid(bwd(&[0, 1], &lse[..2], 1.0)));
    assert!(is_invalid(cross_entropy_backward_ref(
        &logits,
        &[0, 1, 2],
        &lse,
        5,
        f32::INFINITY
    )));
    assert!(d.iter().all(|&v| v == 0.0), "rejected calls wrote nothing");
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::*;
    use qlora::kernels::cuda::CudaDevice;

    fn on_gpu<T: Element>(dev: &CudaDevice, logits: &[T], labels: &[i32], vocab: usize) {
        let what = format!("cuda rows={} vocab={vocab}", labels.len());
        let s = dev.stream();
        let (want_loss, want_lse) = cross_entropy_forward_ref(logits, labels, vocab).unwrap();
        let mut dlogits = s.clone_htod(logits).unwrap();
        let dlabels = s.clone_htod(labels).unwrap();
        let (loss, lse) = cross_entropy_forward_cuda(dev, &dlogits, &dlabels, vocab).unwrap();
        check_f32(
            &what,
            Op::CrossEntropy,
            &s.clone_dtoh(&loss).unwrap(),
            &want_loss,
        );
        check_f32(
            &what,
            Op::CrossEntropy,
            &s.clone_dtoh(&lse).unwrap(),
            &want_lse,
        );
        let scale = grad_scale(labels);
        let want_d = cross_entropy_backward_ref(logits, labels, &want_lse, vocab, scale).unwrap();
        let ref_lse = s.clone_htod(&want_lse).unwrap();
        cross_entropy_backward_cuda(dev, &mut dlogits, &dlabels, &ref_lse, vocab, scale).unwrap();
        check(
            &what,
            Op::CrossEntropyBackward,
            &s.clone_dtoh(&dlogits).unwrap(),
            &want_d,
        );
    }

    #[test]
    fn cuda_cross_entropy_matches_reference() {
        let Some(dev) = CudaDevice::first_available() else {
            return;
        };
        let mut seed = 200;
        for &rows in ROWS {
            for &vocab in VOCABS.iter().chain(&[32000, 128256]) {
                let logits = normal_vector(rows * vocab, 3.0, seed);
                let labels = labels_for(rows, vocab, seed);
                on_gpu::<f32>(&dev, &logits, &labels, vocab);
                on_gpu::<bf16>(&dev, &cast(&logits), &labels, vocab);
                seed += 1;
            }
        }
        let (logits, labels) = extreme_logits(9, 4097);
        on_gpu::<f32>(&dev, &logits, &labels, 4097);
        on_gpu::<bf16>(&dev, &cast(&logits), &labels, 4097);
        let logits = normal_vector(1024 * 32000, 3.0, 300);
        let labels = labels_for(1024, 32000, 300);
        on_gpu::<bf16>(&dev, &cast(&logits), &labels, 32000);
    }
}
