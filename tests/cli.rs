//! The `qlora` binary end to end: `quantize` on the built-in example and on a safetensors file,
//! whose output must load back as bitsandbytes NF4 equal to the library's quantization.

use half::bf16;
use qlora::quant::bnb::{is_bnb_nf4, nf4_from_safetensors, OwnedTensor};
use qlora::quant::nf4::Nf4Tensor;
use safetensors::{Dtype, SafeTensors};
use std::process::Command;

fn qlora() -> Command {
    Command::new(env!("CARGO_BIN_EXE_qlora"))
}

#[test]
fn quantize_demo_reports_sizes_and_checks_the_emulated_kernels() {
    let out = qlora()
        .args(["quantize", "--kernel-rows", "2"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("4.127 bits/param"), "{stdout}");
    assert!(
        stdout.contains("packed bytes identical to the reference"),
        "{stdout}"
    );
}

#[test]
fn quantize_file_writes_bitsandbytes_tensors_and_copies_the_rest() {
    let dir = std::env::temp_dir().join(format!("qlora-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (input, output) = (dir.join("in.safetensors"), dir.join("out.safetensors"));

    let w: Vec<bf16> = qlora::testing::normal_vector(64 * 96, 0.02, 3)
        .into_iter()
        .map(bf16::from_f32)
        .collect();
    let norm = vec![1.0f32; 96];
    let tensors = vec![
        (
            "model.layers.0.self_attn.q_proj.weight".to_string(),
            OwnedTensor {
                dtype: Dtype::BF16,
                shape: vec![64, 96],
                data: w.iter().flat_map(|x| x.to_le_bytes()).collect(),
            },
        ),
        (
            "model.layers.0.input_layernorm.weight".to_string(),
            OwnedTensor {
                dtype: Dtype::F32,
                shape: vec![96],
                data: norm.iter().flat_map(|x| x.to_le_bytes()).collect(),
            },
        ),
    ];
    std::fs::write(&input, safetensors::serialize(tensors, None).unwrap()).unwrap();

    let out = qlora()
        .args(["quantize", "--input"])
        .arg(&input)
        .arg("--output")
        .arg(&output)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("1 tensors quantized, 1 copied"), "{stdout}");

    let bytes = std::fs::read(&output).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let prefix = "model.layers.0.self_attn.q_proj";
    assert!(is_bnb_nf4(&st, prefix));
    let got = nf4_from_safetensors(&st, prefix).unwrap();
    let want = Nf4Tensor::quantize_bf16(&w, &[64, 96], 64, true).unwrap();
    assert_eq!(got, want);
    let copied = st.tensor("model.layers.0.input_layernorm.weight").unwrap();
    assert_eq!(copied.dtype(), Dtype::F32);
    assert_eq!(
        copied.data(),
        norm.iter()
            .flat_map(|x| x.to_le_bytes())
            .collect::<Vec<u8>>()
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn quantize_reports_a_missing_file_without_panicking() {
    let out = qlora()
        .args(["quantize", "--input", "/nonexistent/x.safetensors"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.starts_with("error: /nonexistent/x.safetensors"),
        "{stderr}"
    );
}

/// A reader that went away (`qlora … | head -1`) ends the process quietly, by SIGPIPE as it ends
/// Unix tools, not with a panic ("failed printing to stdout: Broken pipe", exit 101).
#[cfg(unix)]
#[test]
fn a_closed_stdout_ends_quietly() {
    use std::os::unix::process::ExitStatusExt;
    /// SIGPIPE's number on Linux and macOS.
    const SIGPIPE: i32 = 13;
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = qlora()
        .args(["plan", "--preset", "llama2-7b"])
        .stdout(writer)
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(!stderr.contains("Broken pipe"), "{stderr}");
    assert!(
        out.status.success() || out.status.signal() == Some(SIGPIPE),
        "{:?}: {stderr}",
        out.status
    );
}
