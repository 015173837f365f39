//! `metrics.jsonl` across a resume: the rows up to the checkpoint's step are kept byte for byte
//! (no float drifts on the way through a parser), and damage after that step (a line torn by the
//! kill) does not stop the resume; damage among the kept rows is an error naming the line. And
//! `loss.svg`'s axis: a loss never goes below 0.

use std::fs;
use std::path::{Path, PathBuf};

use qlora::train::metrics::{loss_curve_svg, MetricsWriter, StepRecord, METRICS_JSONL};
use qlora::Error;
use rand::{Rng, SeedableRng};

fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("qlora-metrics-{tag}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    dir
}

/// Step `step`'s record with floats of every magnitude (random bit patterns, as real learning
/// rates and norms are: the values a best-effort float parser gets wrong by an ulp).
fn record(step: u64, rng: &mut rand::rngs::StdRng) -> StepRecord {
    let mut float =
        || f64::from_bits(rng.random_range(0x3e00_0000_0000_0000..0x4100_0000_0000_0000));
    StepRecord {
        step,
        epoch: float(),
        loss: float() as f32,
        lr: float(),
        grad_norm: float(),
        tokens: 100,
        label_tokens: 50,
        tokens_per_s: float(),
        elapsed_s: float(),
        peak_rss_mib: Some(float()),
        eval_loss: step.is_multiple_of(3).then(&mut float),
        skipped: false,
        eval_accuracy: step.is_multiple_of(3).then(&mut float),
    }
}

fn run(dir: &Path, keep_through: Option<u64>, steps: std::ops::RangeInclusive<u64>) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let all: Vec<StepRecord> = (1..=400).map(|s| record(s, &mut rng)).collect();
    let mut w = MetricsWriter::create(dir, keep_through).unwrap();
    for s in steps {
        w.write(all[s as usize - 1].clone()).unwrap();
    }
    w.flush().unwrap();
}

#[test]
fn resumed_metrics_equal_the_straight_run_byte_for_byte_despite_a_torn_last_line() {
    let straight = temp_dir("straight");
    run(&straight, None, 1..=400);
    let want = fs::read(straight.join(METRICS_JSONL)).unwrap();

    let resumed = temp_dir("resumed");
    run(&resumed, None, 1..=250);
    // Killed mid-write after the checkpoint at step 200: a torn last line.
    let path = resumed.join(METRICS_JSONL);
    let mut bytes = fs::read(&path).unwrap();
    bytes.extend_from_slice(b"{\"step\":251,\"epoch\":0.12");
    fs::write(&path, bytes).unwrap();
    run(&resumed, Some(200), 201..=400);
    let got = fs::read(&path).unwrap();
    assert!(
        got == want,
        "the resumed metrics.jsonl differs from the straight run's"
    );
}

#[test]
fn damage_among_the_kept_rows_names_the_line() {
    let dir = temp_dir("damaged");
    run(&dir, None, 1..=20);
    let path = dir.join(METRICS_JSONL);
    let text = fs::read_to_string(&path).unwrap();
    let mut lines: Vec<&str> = text.lines().collect();
    lines[4] = "{\"step\": 5, torn";
    fs::write(&path, lines.join("\n")).unwrap();
    match MetricsWriter::create(&dir, Some(10)) {
        Err(Error::Dataset { line, .. }) => assert_eq!(line, 5),
        Err(other) => panic!("expected a Dataset error on line 5, got {other}"),
        Ok(_) => panic!("a damaged kept row was accepted"),
    }
}

#[test]
fn the_loss_axis_of_a_nonnegative_loss_starts_at_zero_or_above() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    // Falling from 6.29 to 0.05: padding the range by 5% would put the axis at -0.26.
    let records: Vec<StepRecord> = (1..=50)
        .map(|s| StepRecord {
            loss: 6.29 * (0.05f32 / 6.29).powf((s - 1) as f32 / 49.0),
            eval_loss: None,
            ..record(s, &mut rng)
        })
        .collect();
    let svg = loss_curve_svg(&records, "loss");
    // Every tick label is a number; none may be negative.
    let labels: Vec<f64> = svg
        .split("text-anchor=\"end\">")
        .skip(1)
        .map(|s| s.split('<').next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(labels.len(), 5, "{svg}");
    assert!(labels.iter().all(|&y| y >= 0.0), "{labels:?}");
    assert!(labels.iter().any(|&y| y > 6.29), "{labels:?}");
}
