//! The built-in demo through the `qlora` binary (`qlora train --demo`, a few steps): it prints the
//! loss and the held-out accuracy, the loss falls, and the saved adapter loads back.

use std::process::Command;

use candle_core::Device;
use qlora::peft::{LoraAdapter, TargetModule};

/// The number after `key` on the first line of `text` containing `key`.
fn number_after(text: &str, key: &str) -> f64 {
    let line = text
        .lines()
        .find(|l| l.contains(key))
        .unwrap_or_else(|| panic!("no line with {key:?} in\n{text}"));
    let rest = &line[line.find(key).unwrap() + key.len()..];
    let number: String = rest
        .trim_start()
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    number
        .parse()
        .unwrap_or_else(|_| panic!("no number after {key:?} in {line:?}"))
}

#[test]
fn demo_prints_a_falling_loss_and_accuracy_and_saves_a_loadable_adapter() {
    let out_dir = std::env::temp_dir().join(format!("qlora-demo-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out_dir);
    let out = Command::new(env!("CARGO_BIN_EXE_qlora"))
        .args(["train", "--demo", "--steps", "40", "--output"])
        .arg(&out_dir)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let before = number_after(&stdout, "held-out accuracy before training:");
    let after = number_after(&stdout, "held-out accuracy after training:");
    assert!((0.0..=100.0).contains(&before), "{stdout}");
    assert!((0.0..=100.0).contains(&after), "{stdout}");
    assert_eq!(
        stdout.lines().filter(|l| l.starts_with("step ")).count(),
        11
    );
    let first = number_after(&stdout, "mean of the first 10 steps");
    let last = number_after(&stdout, "of the last 10 steps");
    assert!(
        last < first,
        "loss did not fall: {first} -> {last}\n{stdout}"
    );

    let adapter_dir = out_dir.join("adapter");
    assert!(
        stdout.contains(&adapter_dir.display().to_string()),
        "{stdout}"
    );
    let adapter = LoraAdapter::load_pretrained(&adapter_dir, &Device::Cpu).unwrap();
    assert_eq!(adapter.config().r, 16);
    assert_eq!(adapter.config().target_modules, TargetModule::ALL.to_vec());
    assert_eq!(adapter.num_layers(), 2);

    let metrics = std::fs::read_to_string(out_dir.join("metrics.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = metrics
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 41, "{metrics}");
    assert_eq!(lines[0]["step"], 1);
    assert!(lines[40]["held_out_accuracy_after"].is_number());
    std::fs::remove_dir_all(&out_dir).unwrap();
}

#[test]
fn train_without_demo_is_a_clear_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_qlora"))
        .arg("train")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("qlora train --demo"), "{stderr}");
}
