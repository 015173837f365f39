//! `qlora bench` end to end: `kernels` without a GPU exits 0 and says why (the default build, and
//! the cuda build against the stub driver that CI marks with QLORA_EXPECT_NO_GPU=1), `train-step`
//! on the tiny preset prints tokens/s and peak RSS per base, and the help texts describe both.

use std::process::{Command, Output};

fn qlora(args: &[&str]) -> (Output, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_qlora"))
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "qlora {args:?} failed\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (out, stdout)
}

#[test]
fn kernels_without_a_gpu_exit_0_with_the_reason() {
    let expect_none = std::env::var("QLORA_EXPECT_NO_GPU").is_ok_and(|v| v == "1");
    if cfg!(feature = "cuda") && !expect_none {
        // A real GPU would run the whole bench (minutes); CI covers the stub-driver case.
        eprintln!("cuda build without QLORA_EXPECT_NO_GPU=1: not running the full kernel bench");
        return;
    }
    let (_, stdout) = qlora(&["bench", "kernels", "--m", "1,16"]);
    assert!(stdout.contains("no GPU to benchmark: "), "{stdout}");
    let why = if cfg!(feature = "cuda") {
        "no CUDA device available"
    } else {
        "built without the `cuda` feature"
    };
    assert!(stdout.contains(why), "{stdout}");
    assert!(stdout.contains("nothing measured"), "{stdout}");
}

#[test]
fn kernels_reject_bad_options_before_looking_for_a_gpu() {
    for args in [
        &["bench", "kernels", "--only", "nosuch"][..],
        &["bench", "kernels", "--m", "0"][..],
        &["bench", "kernels", "--shapes", "70b"][..],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_qlora"))
            .args(args)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?} should fail");
    }
}

#[test]
fn train_step_on_the_tiny_preset_reports_tokens_per_second_and_peak_rss() {
    let (_, stdout) = qlora(&[
        "bench",
        "train-step",
        "--steps",
        "1",
        "--seq-len",
        "16",
        "--preset",
        "tiny",
    ]);
    assert!(stdout.contains("batch 1 × 16"), "{stdout}");
    for base in ["nf4", "dense"] {
        let row = stdout
            .lines()
            .find(|l| l.starts_with(&format!("| {base} | qlora (Rust) |")))
            .unwrap_or_else(|| panic!("no {base} row in\n{stdout}"));
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        // | base | implementation | params | s/step | tokens/s | peak RSS, steps | ...
        let tokens_per_s: f64 = cells[5].parse().unwrap_or_else(|_| panic!("{row}"));
        assert!(tokens_per_s > 0.0, "{row}");
        assert!(
            cells[6].ends_with(" MiB") && cells[6] != "0 MiB",
            "peak RSS missing: {row}"
        );
    }
}

#[test]
fn train_step_rejects_zero_steps() {
    let out = Command::new(env!("CARGO_BIN_EXE_qlora"))
        .args(["bench", "train-step", "--steps", "0", "--preset", "tiny"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("steps"));
}

#[test]
fn help_texts_describe_the_benches() {
    let (_, top) = qlora(&["bench", "--help"]);
    assert!(
        top.contains("kernels") && top.contains("train-step"),
        "{top}"
    );
    let (_, kernels) = qlora(&["bench", "kernels", "--help"]);
    for needle in ["--shapes", "--m", "--json", "cuBLAS", "GB/s", "exits 0"] {
        assert!(kernels.contains(needle), "{needle} missing from\n{kernels}");
    }
    for family in qlora::bench::kernels::KERNELS {
        assert!(
            kernels.contains(family.name),
            "--only does not list {}:\n{kernels}",
            family.name
        );
    }
    let (_, train) = qlora(&["bench", "train-step", "--help"]);
    for needle in [
        "--steps",
        "--seq-len",
        "--base",
        "--preset",
        "--peft-python",
        "tokens/s",
    ] {
        assert!(train.contains(needle), "{needle} missing from\n{train}");
    }
}
