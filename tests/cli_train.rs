//! `qlora train`, `eval` and `generate` end to end on a tiny random Llama folder (2 layers, hidden
//! 32, vocab 300 to match tests/fixtures/tokenizer) written to a temp dir, with JSONL data: the
//! adapter and metrics files, TOML + flag precedence, unknown keys, bit-identical resume, eval
//! numbers against an independent computation, greedy generation against the library, and
//! dataset errors naming file and line.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::{DType, Device, Tensor, D};
use qlora::cli::config::{PagedOptimizer, TrainConfig};
use qlora::cli::{load_model, ComputeDtype, DeviceName, Quantize};
use qlora::model::generate::{generate, generate_with_adapter, GenerationConfig};
use qlora::model::llama::LlamaModel;
use qlora::model::tokenizer::ChatMessage;
use qlora::model::{Linear, LlamaConfig, LlamaWeights, RopeScaling};
use qlora::peft::{LoraAdapter, LoraConfig, LoraMode, LoraPair, TargetModule};
use qlora::tolerance::{lookup, Dtype, Op};
use qlora::train::data::{read_records, Record};
use qlora::train::metrics::read_metrics;

/// A fresh temp folder for one test.
fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("qlora-cli-train-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn tokenizer_fixture(file: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/tokenizer")
        .join(file)
}

/// The tiny model's config: ids as the fixture tokenizer's `<s>` 0, `</s>` 1, `<pad>` 2.
fn tiny_config() -> LlamaConfig {
    LlamaConfig {
        hidden_size: 32,
        intermediate_size: 64,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 8,
        rms_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        rope_scaling: RopeScaling::Default,
        tie_word_embeddings: false,
        vocab_size: 300,
        max_position_embeddings: 256,
        torch_dtype: None,
        bos_token_id: Some(0),
        eos_token_ids: vec![1],
        pad_token_id: Some(2),
        quantization: None,
    }
}

/// Writes a Hugging Face Llama folder with random f32 weights (seed 7) under `dir/model`.
fn write_model(dir: &Path) -> PathBuf {
    let model_dir = dir.join("model");
    std::fs::create_dir_all(&model_dir).unwrap();
    let config = tiny_config();
    let json = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "vocab_size": config.vocab_size,
        "max_position_embeddings": config.max_position_embeddings,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "pad_token_id": 2,
        "tie_word_embeddings": false,
        "hidden_act": "silu",
        "torch_dtype": "float32",
    });
    std::fs::write(model_dir.join("config.json"), json.to_string()).unwrap();
    // 1/sqrt(hidden) as the demo: logits spread enough for greedy picks to be unambiguous.
    let weights = LlamaWeights::random(&config, 0.18, 7, DType::F32, &Device::Cpu).unwrap();
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    tensors.insert(
        "model.embed_tokens.weight".into(),
        weights.embed_tokens.clone(),
    );
    tensors.insert("model.norm.weight".into(), weights.norm.clone());
    tensors.insert("lm_head.weight".into(), weights.lm_head().clone());
    for (i, layer) in weights.layers.iter().enumerate() {
        let p = format!("model.layers.{i}");
        tensors.insert(
            format!("{p}.input_layernorm.weight"),
            layer.input_layernorm.clone(),
        );
        tensors.insert(
            format!("{p}.post_attention_layernorm.weight"),
            layer.post_attention_layernorm.clone(),
        );
        for (name, linear) in [
            ("self_attn.q_proj", &layer.q_proj),
            ("self_attn.k_proj", &layer.k_proj),
            ("self_attn.v_proj", &layer.v_proj),
            ("self_attn.o_proj", &layer.o_proj),
            ("mlp.gate_proj", &layer.gate_proj),
            ("mlp.up_proj", &layer.up_proj),
            ("mlp.down_proj", &layer.down_proj),
        ] {
            let Linear::Dense(w) = linear else {
                panic!("random weights are dense")
            };
            tensors.insert(format!("{p}.{name}.weight"), w.clone());
        }
    }
    candle_core::safetensors::save(&tensors, model_dir.join("model.safetensors")).unwrap();
    for file in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(tokenizer_fixture(file), model_dir.join(file)).unwrap();
    }
    model_dir
}

const WORDS: [&str; 8] = ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree"];

/// `n` multiple-choice lines: "which word is X?" with four words, the answer at `(i * 3) % 4`.
fn mcqa_lines(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            let answer = (i * 3) % 4;
            let choices: Vec<&str> = (0..4).map(|j| WORDS[(i + j * 2) % 8]).collect();
            serde_json::json!({
                "question": format!("which is {}?", choices[answer]),
                "choices": choices,
                "answer": answer,
            })
            .to_string()
        })
        .collect()
}

/// `n` instruction lines.
fn instruction_lines(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            serde_json::json!({
                "instruction": format!("say {}", WORDS[i % 8]),
                "output": format!("{} {}", WORDS[i % 8], WORDS[(i + 1) % 8]),
            })
            .to_string()
        })
        .collect()
}

/// A copy of the files of folder `from` in a new folder `to`.
fn copy_folder(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

fn write_lines(path: &Path, lines: &[String]) {
    std::fs::write(path, lines.join("\n") + "\n").unwrap();
}

fn qlora(args: &[&str], paths: &[(&str, &Path)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_qlora"));
    command.args(args);
    for (flag, path) in paths {
        command.arg(flag).arg(path);
    }
    command.output().unwrap()
}

fn assert_success(out: &Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// A failure reported as an error (exit 1, `error: ...`), not a panic; returns stderr.
fn assert_clean_failure(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.starts_with("error: "), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    stderr
}

#[test]
fn train_saves_a_peft_adapter_metrics_and_curve_with_toml_and_flag_precedence() {
    let dir = temp_dir("train");
    let model = write_model(&dir);
    let data = dir.join("train.jsonl");
    let mut lines = instruction_lines(6);
    lines.extend(mcqa_lines(4));
    lines.push(
        serde_json::json!({"messages": [
            {"role": "user", "content": "name a color"},
            {"role": "assistant", "content": "green"},
        ]})
        .to_string(),
    );
    write_lines(&data, &lines);
    let config = dir.join("run.toml");
    std::fs::write(
        &config,
        "r = 4\nalpha = 8.0\nlr = 1e-3\nbatch_size = 3\nsteps = 5\nseq_len = 96\n\
         targets = [\"q_proj\", \"v_proj\"]\nsave_steps = 2\nkeep_last = 1\nlog_steps = 1\n",
    )
    .unwrap();
    let output = dir.join("out");
    let out = qlora(
        &[
            "train",
            "--r",
            "8",
            "--steps",
            "4",
            "--compute-dtype",
            "f32",
            "--eval-split",
            "0.2",
            "--eval-steps",
            "2",
            "--pack",
        ],
        &[
            ("--config", &config),
            ("--model", &model),
            ("--data", &data),
            ("--output", &output),
        ],
    );
    let stdout = assert_success(&out);
    assert!(stdout.contains("11 examples (0 truncated)"), "{stdout}");
    assert!(stdout.contains("2 examples held out, 9 left"), "{stdout}");
    assert!(stdout.contains("packing: 9 examples into "), "{stdout}");

    // Flags beat the file, the file beats the defaults, the rest are defaults.
    let saved = std::fs::read_to_string(output.join("train_config.toml")).unwrap();
    let effective = TrainConfig::from_toml_str(&saved).unwrap();
    assert_eq!(effective.r, 8);
    assert_eq!(effective.steps, Some(4));
    assert_eq!(effective.alpha, 8.0);
    assert_eq!(effective.lr, 1e-3);
    assert_eq!(effective.batch_size, 3);
    assert_eq!(effective.grad_accum, 1);
    assert_eq!(effective.quantize, Quantize::Nf4);
    assert_eq!(effective.max_grad_norm, 1.0);
    assert!(stdout.contains(saved.lines().next().unwrap()), "{stdout}");

    let adapter = LoraAdapter::load_pretrained(output.join("adapter"), &Device::Cpu).unwrap();
    assert_eq!(adapter.config().r, 8);
    assert_eq!(adapter.config().alpha, 8.0);
    assert_eq!(
        adapter.config().target_modules,
        vec![TargetModule::QProj, TargetModule::VProj]
    );
    adapter.check_fits(&tiny_config()).unwrap();
    let trained_b = adapter
        .pair(0, TargetModule::QProj)
        .unwrap()
        .b
        .abs()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(trained_b > 0.0, "B never left zero");

    // metrics.jsonl and metrics.csv hold the same steps and losses; every loss is finite.
    let records = read_metrics(&output).unwrap();
    assert_eq!(
        records.iter().map(|r| r.step).collect::<Vec<_>>(),
        vec![1, 2, 3, 4]
    );
    let csv = std::fs::read_to_string(output.join("metrics.csv")).unwrap();
    let mut rows = csv.lines();
    let header: Vec<&str> = rows.next().unwrap().split(',').collect();
    let loss_col = header.iter().position(|h| *h == "loss").unwrap();
    let step_col = header.iter().position(|h| *h == "step").unwrap();
    let csv_losses: Vec<(u64, f32)> = rows
        .map(|row| {
            let cells: Vec<&str> = row.split(',').collect();
            (
                cells[step_col].parse().unwrap(),
                cells[loss_col].parse().unwrap(),
            )
        })
        .collect();
    let json_losses: Vec<(u64, f32)> = records.iter().map(|r| (r.step, r.loss)).collect();
    assert_eq!(csv_losses, json_losses);
    assert!(records.iter().all(|r| r.loss.is_finite() && r.loss > 0.0));
    // Evaluated on the held-out split at steps 2 and 4 only.
    let evaluated: Vec<u64> = records
        .iter()
        .filter(|r| r.eval_loss.is_some_and(f64::is_finite))
        .map(|r| r.step)
        .collect();
    assert_eq!(evaluated, vec![2, 4]);
    let svg = std::fs::read_to_string(output.join("loss.svg")).unwrap();
    assert!(
        svg.starts_with("<svg") && svg.ends_with("</svg>\n"),
        "{svg}"
    );
    assert_eq!(svg.matches("<polyline").count(), 2, "train and eval curves");

    // save_steps 2, keep_last 1: only the final checkpoint is left.
    assert!(output
        .join("checkpoint-4")
        .join("trainer_state.json")
        .is_file());
    assert!(!output.join("checkpoint-2").exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn unknown_config_key_is_an_error_naming_it() {
    let dir = temp_dir("unknown-key");
    let config = dir.join("run.toml");
    std::fs::write(&config, "lr = 1e-4\nlearning_rate = 3e-4\n").unwrap();
    let out = qlora(&["train"], &[("--config", &config)]);
    let stderr = assert_clean_failure(&out);
    assert!(stderr.contains("learning_rate"), "{stderr}");
    assert!(stderr.contains("run.toml"), "{stderr}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Out-of-range numbers are refused by the settings' own check, naming the setting: a negative
/// number is a value (`--lr -1`, not only `--lr=-1`), and AdamW's epsilon must be above 0 (at 0
/// the first step with an all-zero second moment divides by zero).
#[test]
fn negative_and_zero_settings_are_refused_by_name() {
    let dir = temp_dir("bad-numbers");
    let model = write_model(&dir);
    let data = dir.join("train.jsonl");
    std::fs::write(&data, "{\"instruction\": \"a\", \"output\": \"b\"}\n").unwrap();
    let paths = [("--model", model.as_path()), ("--data", data.as_path())];
    let out = qlora(&["train", "--lr", "-1"], &paths);
    let stderr = assert_clean_failure(&out);
    assert!(stderr.contains("learning rate"), "{stderr}");
    let config = dir.join("run.toml");
    std::fs::write(&config, "adam_eps = 0.0\n").unwrap();
    let out = qlora(&["train"], &[paths[0], paths[1], ("--config", &config)]);
    let stderr = assert_clean_failure(&out);
    assert!(stderr.contains("adam_eps"), "{stderr}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A second run into an output folder that holds a run is refused (it used to replace the
/// adapter and metrics without a word) unless it says --overwrite, before the model loads.
#[test]
fn training_into_a_used_output_needs_overwrite() {
    let dir = temp_dir("overwrite");
    let model = write_model(&dir);
    let data = dir.join("train.jsonl");
    write_lines(&data, &instruction_lines(3));
    let out = dir.join("out");
    let paths = [
        ("--model", model.as_path()),
        ("--data", data.as_path()),
        ("--output", out.as_path()),
    ];
    let args = [
        "train",
        "--steps",
        "1",
        "--batch-size",
        "1",
        "--seq-len",
        "32",
    ];
    assert_success(&qlora(&args, &paths));
    let stderr = assert_clean_failure(&qlora(&args, &paths));
    assert!(
        stderr.contains("--overwrite") && stderr.contains("adapter"),
        "{stderr}"
    );
    let again: Vec<&str> = args.iter().copied().chain(["--overwrite"]).collect();
    assert_success(&qlora(&again, &paths));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `eval` checks its data before loading the model: an empty file is named, and data of another
/// format than --format says is refused, both with a model folder that does not even exist.
#[test]
fn eval_checks_the_data_before_the_model() {
    let dir = temp_dir("eval-data-first");
    let missing_model = dir.join("no-such-model");
    let empty = dir.join("empty.jsonl");
    std::fs::write(&empty, "\n \n").unwrap();
    let out = qlora(
        &["eval"],
        &[("--model", &missing_model), ("--data", &empty)],
    );
    let stderr = assert_clean_failure(&out);
    assert!(
        stderr.contains("empty.jsonl") && stderr.contains("no examples"),
        "{stderr}"
    );
    let instructions = dir.join("instructions.jsonl");
    write_lines(&instructions, &instruction_lines(2));
    let out = qlora(
        &["eval", "--format", "mcqa"],
        &[("--model", &missing_model), ("--data", &instructions)],
    );
    let stderr = assert_clean_failure(&out);
    assert!(!stderr.contains("no-such-model"), "{stderr}");
    assert!(stderr.contains("instructions.jsonl"), "{stderr}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_bad_jsonl_line_is_an_error_naming_file_and_line() {
    let dir = temp_dir("bad-line");
    let model = write_model(&dir);
    let data = dir.join("data.jsonl");
    let mut lines = instruction_lines(2);
    lines.push("{\"instruction\": \"no output\"}".to_string());
    write_lines(&data, &lines);
    let out = qlora(
        &["train", "--steps", "1"],
        &[
            ("--model", &model),
            ("--data", &data),
            ("--output", &dir.join("out")),
        ],
    );
    let stderr = assert_clean_failure(&out);
    assert!(
        stderr.contains(&format!("{}:3:", data.display())),
        "{stderr}"
    );
    // A line of another shape than --format names is refused the same way.
    write_lines(&data, &instruction_lines(2));
    let out = qlora(
        &["train", "--steps", "1", "--format", "mcqa"],
        &[
            ("--model", &model),
            ("--data", &data),
            ("--output", &dir.join("out")),
        ],
    );
    let stderr = assert_clean_failure(&out);
    assert!(
        stderr.contains(&format!("{}:1:", data.display())),
        "{stderr}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The run both resume tests cut short: 6 updates, a checkpoint every 3.
const RESUME_RUN: [&str; 15] = [
    "train",
    "--steps",
    "6",
    "--batch-size",
    "2",
    "--grad-accum",
    "2",
    "--seq-len",
    "40",
    "--save-steps",
    "3",
    "--keep-last",
    "5",
    "--lr",
    "5e-3",
];

/// A run killed while writing its step-6 checkpoint (the optimizer file never landed) and its
/// metrics (a torn last line): the resume says which checkpoint it passed over and why, moves it
/// aside instead of overwriting it later, and keeps the metrics rows up to the checkpoint byte for
/// byte (the later rows equal the straight run's in step, loss, lr and grad norm).
#[test]
fn resume_past_a_damaged_checkpoint_says_so_and_keeps_it() {
    let dir = temp_dir("resume-damaged");
    let model = write_model(&dir);
    let data = dir.join("train.jsonl");
    write_lines(&data, &instruction_lines(7));
    let common = RESUME_RUN;
    let straight = dir.join("straight");
    let paths = |out: &Path| -> Vec<(&'static str, PathBuf)> {
        vec![
            ("--model", model.clone()),
            ("--data", data.clone()),
            ("--output", out.to_path_buf()),
        ]
    };
    let run = |out: &Path, resume: bool| {
        let mut p = paths(out);
        if resume {
            p.push(("--resume", out.to_path_buf()));
        }
        let refs: Vec<(&str, &Path)> = p.iter().map(|(f, q)| (*f, q.as_path())).collect();
        qlora(&common, &refs)
    };
    assert_success(&run(&straight, false));

    let resumed = dir.join("resumed");
    for step in ["checkpoint-3", "checkpoint-6"] {
        copy_folder(&straight.join(step), &resumed.join(step));
    }
    std::fs::remove_file(resumed.join("checkpoint-6/optimizer.safetensors")).unwrap();
    let metrics = std::fs::read_to_string(straight.join("metrics.jsonl")).unwrap();
    let lines: Vec<&str> = metrics.lines().collect();
    let torn = format!(
        "{}\n{}",
        lines[..5].join("\n"),
        &lines[5][..lines[5].len() / 2]
    );
    std::fs::write(resumed.join("metrics.jsonl"), torn).unwrap();

    let out = run(&resumed, true);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert_success(&out);
    assert!(
        stderr.contains("checkpoint-6") && stderr.contains("optimizer.safetensors is missing"),
        "{stderr}"
    );
    assert!(resumed.join("checkpoint-6.damaged").is_dir());
    // The rows up to the checkpoint byte for byte; the rest equal in every field but the
    // timings and memory, which no two runs share.
    let got = std::fs::read_to_string(resumed.join("metrics.jsonl")).unwrap();
    let got_lines: Vec<&str> = got.lines().collect();
    assert_eq!(got_lines[..3], lines[..3]);
    let key = |r: &qlora::train::metrics::StepRecord| {
        (
            r.step,
            r.loss.to_bits(),
            r.lr.to_bits(),
            r.grad_norm.to_bits(),
        )
    };
    let fields = |d: &Path| read_metrics(d).unwrap().iter().map(key).collect::<Vec<_>>();
    assert_eq!(fields(&resumed), fields(&straight));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn resume_from_a_checkpoint_equals_the_straight_run() {
    let dir = temp_dir("resume");
    let model = write_model(&dir);
    let data = dir.join("train.jsonl");
    write_lines(&data, &instruction_lines(7));
    let common = RESUME_RUN;
    let straight = dir.join("straight");
    assert_success(&qlora(
        &common,
        &[
            ("--model", &model),
            ("--data", &data),
            ("--output", &straight),
        ],
    ));

    // A run that stopped after its step-3 checkpoint: only that checkpoint and its metrics.
    let resumed = dir.join("resumed");
    let checkpoint = resumed.join("checkpoint-3");
    copy_folder(&straight.join("checkpoint-3"), &checkpoint);
    let straight_metrics = std::fs::read_to_string(straight.join("metrics.jsonl")).unwrap();
    let first_three: Vec<&str> = straight_metrics.lines().take(3).collect();
    std::fs::write(resumed.join("metrics.jsonl"), first_three.join("\n") + "\n").unwrap();

    let stdout = assert_success(&qlora(
        &common,
        &[
            ("--model", &model),
            ("--data", &data),
            ("--output", &resumed),
            ("--resume", &resumed),
        ],
    ));
    assert!(stdout.contains("resuming from"), "{stdout}");
    let losses = |d: &Path| -> Vec<(u64, u32)> {
        read_metrics(d)
            .unwrap()
            .iter()
            .map(|r| (r.step, r.loss.to_bits()))
            .collect()
    };
    assert_eq!(losses(&resumed), losses(&straight));
    assert_eq!(losses(&straight).len(), 6);
    let weights = |d: &Path| std::fs::read(d.join("adapter/adapter_model.safetensors")).unwrap();
    assert_eq!(weights(&resumed), weights(&straight));

    // Other settings than the checkpoint's are refused.
    let mut changed = common.to_vec();
    let last = changed.len() - 1;
    changed[last] = "1e-3";
    let out = qlora(
        &changed,
        &[
            ("--model", &model),
            ("--data", &data),
            ("--output", &resumed),
            ("--resume", &checkpoint),
        ],
    );
    let stderr = assert_clean_failure(&out);
    // Named setting by setting, not as Rust Debug structs.
    assert!(
        stderr.contains("lr = 0.005 (these settings: 0.001)"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("AdamWConfig") && !stderr.contains('{'),
        "{stderr}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// An adapter on q_proj and down_proj with random A and B (seeded), saved under `dir`.
fn random_adapter(dir: &Path) -> LoraAdapter {
    let config = LoraConfig {
        r: 4,
        alpha: 8.0,
        target_modules: vec![TargetModule::QProj, TargetModule::DownProj],
        ..LoraConfig::default()
    };
    let mut adapter =
        LoraAdapter::init(config, &tiny_config(), DType::F32, &Device::Cpu, 3).unwrap();
    let keys: Vec<(usize, TargetModule)> = adapter.pairs().map(|(k, _)| k).collect();
    for (i, (layer, module)) in keys.into_iter().enumerate() {
        let pair = adapter.pair(layer, module).unwrap();
        let a = pair.a.clone();
        let (out, r) = pair.b.dims2().unwrap();
        let values = qlora::testing::normal_vector(out * r, 0.5, 100 + i as u64);
        let b = Tensor::from_vec(values, (out, r), &Device::Cpu).unwrap();
        adapter.set_pair(layer, module, LoraPair { a, b }).unwrap();
    }
    adapter.save_pretrained(dir).unwrap();
    adapter
}

/// Log-likelihood of each choice's answer letter, computed from full-sequence logits with
/// candle's ops (independently of `qlora::train::eval`).
fn letter_logprobs(model: &LlamaModel, adapter: &LoraAdapter, record: &Record) -> Vec<f64> {
    let Record::MultipleChoice {
        question, choices, ..
    } = record
    else {
        panic!("not a question")
    };
    let tokenizer = qlora::model::tokenizer::Tokenizer::from_dir(
        tokenizer_fixture("tokenizer.json").parent().unwrap(),
    )
    .unwrap();
    (0..choices.len())
        .map(|answer| {
            let candidate = Record::MultipleChoice {
                question: question.clone(),
                choices: choices.clone(),
                answer,
            };
            let example = candidate.tokenize(&tokenizer).unwrap();
            // Drop the appended EOS: the score is the letter's.
            let n = example.len() - 1;
            let ids =
                Tensor::from_vec(example.input_ids[..n].to_vec(), (1, n), &Device::Cpu).unwrap();
            let logits = model
                .forward_with_adapter(&ids, None, adapter, &LoraMode::Eval)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap();
            let logp = candle_core::Tensor::log_sum_exp(&logits, D::Minus1)
                .map(|lse| logits.broadcast_sub(&lse.unsqueeze(D::Minus1).unwrap()))
                .unwrap()
                .unwrap()
                .squeeze(0)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap();
            (1..n)
                .filter(|&t| example.labels[t] >= 0)
                .map(|t| logp[t - 1][example.input_ids[t] as usize] as f64)
                .sum()
        })
        .collect()
}

#[test]
fn eval_reports_loss_perplexity_and_accuracy_matching_an_independent_computation() {
    let dir = temp_dir("eval");
    let model_dir = write_model(&dir);
    let data = dir.join("mcqa.jsonl");
    write_lines(&data, &mcqa_lines(6));
    let adapter_dir = dir.join("adapter");
    let adapter = random_adapter(&adapter_dir);
    let flags = ["eval", "--compute-dtype", "f32", "--format", "mcqa"];
    let paths = [
        ("--model", model_dir.as_path()),
        ("--data", data.as_path()),
        ("--adapter", adapter_dir.as_path()),
    ];
    let json_file = dir.join("eval.json");
    let out = qlora(
        &[&flags[..], &["--json"]].concat(),
        &[&paths[..], &[("--output", json_file.as_path())]].concat(),
    );
    let stdout = assert_success(&out);
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(std::fs::read_to_string(&json_file).unwrap(), stdout);

    let loaded = load_model(
        &model_dir,
        ComputeDtype::F32,
        Quantize::Nf4,
        DeviceName::Cpu,
    )
    .unwrap();
    let records: Vec<Record> = read_records(&data)
        .unwrap()
        .into_iter()
        .map(|(_, r)| r)
        .collect();
    let mut correct = 0;
    for record in &records {
        let Record::MultipleChoice { answer, .. } = record else {
            unreachable!()
        };
        let scores = letter_logprobs(&loaded.model, &adapter, record);
        let best =
            (0..scores.len()).fold(0, |best, j| if scores[j] > scores[best] { j } else { best });
        correct += usize::from(best == *answer);
    }
    assert_eq!(report["questions"], 6);
    assert_eq!(report["correct"], correct);
    assert_eq!(report["accuracy"].as_f64().unwrap(), correct as f64 / 6.0);

    // The loss over every response token (letter and EOS) of the dataset, as one batch.
    let examples: Vec<_> = records
        .iter()
        .map(|r| r.tokenize(&loaded.tokenizer).unwrap())
        .collect();
    let batch = qlora::train::data::collate(&examples, 2).unwrap();
    let shape = (batch.batch_size, batch.seq_len);
    let ids = Tensor::from_vec(batch.input_ids, shape, &Device::Cpu).unwrap();
    let mask = Tensor::from_vec(batch.attention_mask, shape, &Device::Cpu).unwrap();
    let labels = Tensor::from_vec(batch.labels, shape, &Device::Cpu).unwrap();
    let logits = loaded
        .model
        .forward_with_adapter(&ids, Some(&mask), &adapter, &LoraMode::Eval)
        .unwrap();
    let (loss, count) = LlamaModel::loss(&logits, &labels).unwrap();
    let loss = loss.to_scalar::<f32>().unwrap();
    assert_eq!(report["label_tokens"], count);
    let got = report["loss"].as_f64().unwrap() as f32;
    let tol = lookup(Op::CrossEntropy, Dtype::F32);
    tol.check(&[got], &[loss]).unwrap();
    let ppl = report["perplexity"].as_f64().unwrap();
    let loss_f64 = report["loss"].as_f64().unwrap();
    assert!(
        (ppl - loss_f64.exp()).abs() <= 1e-12 * ppl,
        "{ppl} vs exp({loss_f64})"
    );

    // The table form shows the same numbers.
    let table = assert_success(&qlora(&flags, &paths));
    assert!(table.contains("| loss"), "{table}");
    assert!(table.contains("| perplexity"), "{table}");
    assert!(table.contains(&format!("({correct}/6)")), "{table}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn greedy_generate_matches_the_library_in_a_left_padded_batch() {
    let dir = temp_dir("generate");
    let model_dir = write_model(&dir);
    let adapter_dir = dir.join("adapter");
    let adapter = random_adapter(&adapter_dir);
    let prompts = ["red cat", "the blue moon and the green tree"];
    let run = |with_adapter: bool| -> Vec<Vec<u32>> {
        let mut args = vec![
            "generate",
            "--json",
            "--max-new-tokens",
            "6",
            "--compute-dtype",
            "f32",
        ];
        for p in prompts {
            args.extend(["--prompt", p]);
        }
        let mut paths = vec![("--model", model_dir.as_path())];
        if with_adapter {
            paths.push(("--adapter", adapter_dir.as_path()));
        }
        let stdout = assert_success(&qlora(&args, &paths));
        stdout
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                serde_json::from_value(v["token_ids"].clone()).unwrap()
            })
            .collect()
    };

    let loaded = load_model(
        &model_dir,
        ComputeDtype::F32,
        Quantize::Nf4,
        DeviceName::Cpu,
    )
    .unwrap();
    let ids: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| loaded.tokenizer.encode(p, true).unwrap())
        .collect();
    assert_ne!(ids[0].len(), ids[1].len(), "the batch must need padding");
    let config = GenerationConfig {
        max_new_tokens: 6,
        pad_token_id: Some(2),
        ..GenerationConfig::default()
    };
    let base = generate(&loaded.model, &ids, &config).unwrap();
    let adapted = generate_with_adapter(&loaded.model, Some(&adapter), &ids, &config).unwrap();
    assert_eq!(run(false), base);
    assert_eq!(run(true), adapted);
    assert_ne!(base, adapted, "the adapter should change the greedy tokens");

    // --prompts FILE with --chat: each line is a user message rendered by the chat template.
    let prompts_file = dir.join("prompts.txt");
    std::fs::write(&prompts_file, format!("{}\n\n{}\n", prompts[0], prompts[1])).unwrap();
    let stdout = assert_success(&qlora(
        &[
            "generate",
            "--json",
            "--chat",
            "--max-new-tokens",
            "6",
            "--compute-dtype",
            "f32",
        ],
        &[("--model", &model_dir), ("--prompts", &prompts_file)],
    ));
    let from_file: Vec<Vec<u32>> = stdout
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            serde_json::from_value(v["token_ids"].clone()).unwrap()
        })
        .collect();
    let chat_ids: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| {
            let text = loaded
                .tokenizer
                .apply_chat_template(&[ChatMessage::new("user", *p)], true)
                .unwrap();
            loaded.tokenizer.encode(&text, false).unwrap()
        })
        .collect();
    assert_eq!(
        from_file,
        generate(&loaded.model, &chat_ids, &config).unwrap()
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn cached_generation_with_an_adapter_equals_full_forward_argmax() {
    let dir = temp_dir("adapter-cache");
    let model_dir = write_model(&dir);
    let adapter = random_adapter(&dir.join("adapter"));
    let loaded = load_model(
        &model_dir,
        ComputeDtype::F32,
        Quantize::Nf4,
        DeviceName::Cpu,
    )
    .unwrap();
    let prompt = loaded.tokenizer.encode("green dog", true).unwrap();
    let config = GenerationConfig {
        max_new_tokens: 5,
        stop_token_ids: Some(Vec::new()),
        ..GenerationConfig::default()
    };
    let cached = generate_with_adapter(
        &loaded.model,
        Some(&adapter),
        std::slice::from_ref(&prompt),
        &config,
    )
    .unwrap();
    let mut seq = prompt.clone();
    for _ in 0..5 {
        let ids = Tensor::from_vec(seq.clone(), (1, seq.len()), &Device::Cpu).unwrap();
        let logits = loaded
            .model
            .forward_with_adapter(&ids, None, &adapter, &LoraMode::Eval)
            .unwrap();
        let next = logits
            .squeeze(0)
            .unwrap()
            .get(seq.len() - 1)
            .unwrap()
            .argmax(0)
            .unwrap()
            .to_scalar::<u32>()
            .unwrap();
        seq.push(next);
    }
    assert_eq!(cached[0], seq[prompt.len()..].to_vec());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_demo_refuses_flags_it_does_not_take() {
    let out = qlora(&["train", "--demo", "--steps", "1", "--pack"], &[]);
    let stderr = assert_clean_failure(&out);
    assert!(
        stderr.contains("takes only --steps, --output and --seed"),
        "{stderr}"
    );
}

#[test]
fn settings_default_to_qlora_paper_values() {
    let c = TrainConfig::from_toml_str("").unwrap();
    assert_eq!(c, TrainConfig::default());
    assert_eq!((c.r, c.alpha, c.lr), (16, 32.0, 2e-4));
    assert_eq!(c.target_modules().unwrap(), TargetModule::ALL.to_vec());
    assert_eq!(c.schedule, qlora::cli::config::ScheduleName::Cosine);
    assert!(c.warmup_ratio > 0.0);
    assert_eq!(c.compute_dtype, ComputeDtype::Bf16);
    assert_eq!(c.quantize, Quantize::Nf4);
    c.validate().unwrap();
    let err = TrainConfig::from_toml_str("r = 0\n")
        .unwrap()
        .validate()
        .unwrap_err();
    assert!(err.to_string().contains("rank"), "{err}");
}

/// `--device cuda[:N]` where CUDA cannot run (a CPU-only build, or no GPU behind the driver) is a
/// typed error naming CUDA, exit 1, no panic, for every command; a malformed device name is a
/// usage error; the TOML key takes the same strings.
#[test]
fn device_cuda_without_a_usable_gpu_is_a_clean_error() {
    let dir = temp_dir("device-cuda");
    let model = write_model(&dir);
    let data = dir.join("train.jsonl");
    write_lines(&data, &instruction_lines(4));
    let runs: [&[&str]; 3] = [
        &[
            "train",
            "--device",
            "cuda",
            "--steps",
            "1",
            "--paged-optimizer",
            "all",
        ],
        &["eval", "--device", "cuda:0"],
        &["generate", "--device", "cuda:1", "--prompt", "hi"],
    ];
    for args in runs {
        let paths: Vec<(&str, &Path)> = match args[0] {
            "generate" => vec![("--model", &model)],
            _ => vec![("--model", &model), ("--data", &data)],
        };
        if cuda_opens() {
            // With a GPU these run; `train_on_cuda_matches_the_cpu_and_resumes_across_devices`
            // checks training there.
            continue;
        }
        let out = qlora(args, &paths);
        let stderr = assert_clean_failure(&out);
        assert!(
            stderr.contains("no CUDA device available"),
            "{args:?}: {stderr}"
        );
        if !cfg!(feature = "cuda") {
            assert!(stderr.contains("--features cuda"), "{args:?}: {stderr}");
        }
    }
    let out = qlora(
        &["eval", "--device", "gpu"],
        &[("--model", &model), ("--data", &data)],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("expected cpu, cuda or cuda:N"));
    let config: TrainConfig = toml::from_str("device = \"cuda:3\"").unwrap();
    assert_eq!(config.device, DeviceName::Cuda(3));
    assert!(config.to_toml().unwrap().contains("device = \"cuda:3\""));
    assert!(toml::from_str::<TrainConfig>("device = \"tpu\"").is_err());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn paged_optimizer_is_a_setting_with_three_values() {
    for (text, want) in [
        ("off", PagedOptimizer::Off),
        ("auto", PagedOptimizer::Auto),
        ("all", PagedOptimizer::All),
    ] {
        let config: TrainConfig = toml::from_str(&format!("paged_optimizer = \"{text}\"")).unwrap();
        assert_eq!(config.paged_optimizer, want);
        let saved = config.to_toml().unwrap();
        assert!(
            saved.contains(&format!("paged_optimizer = \"{text}\"")),
            "{saved}"
        );
        assert_eq!(TrainConfig::from_toml_str(&saved).unwrap(), config);
    }
    assert_eq!(TrainConfig::default().paged_optimizer, PagedOptimizer::Auto);
    assert!(toml::from_str::<TrainConfig>("paged_optimizer = \"some\"").is_err());
    let out = qlora(&["train", "--paged-optimizer", "some"], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("possible values: off, auto, all"));
}

#[test]
fn lora_dropout_is_a_setting_saved_in_the_adapter() {
    let config: TrainConfig = toml::from_str("lora_dropout = 0.05").unwrap();
    assert_eq!(config.lora().unwrap().dropout, 0.05);
    let saved = config.to_toml().unwrap();
    assert!(saved.contains("lora_dropout = 0.05"), "{saved}");
    assert_eq!(TrainConfig::default().lora_dropout, 0.0);

    let dir = temp_dir("lora-dropout");
    let model = write_model(&dir);
    let data = dir.join("train.jsonl");
    write_lines(&data, &instruction_lines(4));
    let output = dir.join("out");
    let paths = [
        ("--model", model.as_path()),
        ("--data", data.as_path()),
        ("--output", output.as_path()),
    ];
    let args = |p: &'static str| {
        [
            "train",
            "--steps",
            "2",
            "--batch-size",
            "2",
            "--seq-len",
            "40",
            "--lora-dropout",
            p,
        ]
    };
    assert_success(&qlora(&args("0.1"), &paths));
    let adapter_config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(output.join("adapter/adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(adapter_config["lora_dropout"], serde_json::json!(0.1));
    let stderr = assert_clean_failure(&qlora(&args("1.5"), &paths));
    assert!(stderr.contains("lora_dropout"), "{stderr}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// On a GPU: the same run on CUDA (CudaAdamW, paged states) and on the CPU give the same losses
/// within the device tolerance, and a CUDA checkpoint resumes on the CPU to the CUDA run's end.
/// Skips without a GPU.
#[test]
fn train_on_cuda_matches_the_cpu_and_resumes_across_devices() {
    if !cuda_opens() {
        return;
    }
    let dir = temp_dir("train-cuda");
    let model = write_model(&dir);
    let data = dir.join("train.jsonl");
    write_lines(&data, &instruction_lines(8));
    let run = |device: &str, output: &Path, resume: Option<&Path>| {
        let args = [
            "train",
            "--steps",
            "4",
            "--batch-size",
            "2",
            "--seq-len",
            "40",
            "--compute-dtype",
            "f32",
            "--quantize",
            "none",
            "--save-steps",
            "2",
            "--keep-last",
            "5",
            "--lr",
            "5e-3",
            "--paged-optimizer",
            "all",
            "--device",
            device,
        ];
        let mut paths = vec![("--model", model.as_path()), ("--data", data.as_path())];
        paths.push(("--output", output));
        if let Some(r) = resume {
            paths.push(("--resume", r));
        }
        assert_success(&qlora(&args, &paths))
    };
    let (cpu, gpu, resumed) = (dir.join("cpu"), dir.join("gpu"), dir.join("resumed"));
    run("cpu", &cpu, None);
    run("cuda", &gpu, None);
    let losses =
        |d: &Path| -> Vec<f32> { read_metrics(d).unwrap().iter().map(|r| r.loss).collect() };
    let tol = qlora::tolerance::lookup(
        qlora::tolerance::Op::TrainDevice,
        qlora::tolerance::Dtype::F32,
    );
    if let Err(m) = tol.check(&losses(&gpu), &losses(&cpu)) {
        panic!("CUDA vs CPU losses: {m}");
    }
    // The CUDA run's step-2 checkpoint, finished on the CPU.
    let checkpoint = resumed.join("checkpoint-2");
    copy_folder(&gpu.join("checkpoint-2"), &checkpoint);
    run("cpu", &resumed, Some(&checkpoint));
    let finals = |d: &Path| -> Vec<f32> {
        let t = candle_core::safetensors::load(
            d.join("adapter/adapter_model.safetensors"),
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let mut keys: Vec<_> = t.keys().cloned().collect();
        keys.sort();
        keys.iter()
            .flat_map(|k| t[k].flatten_all().unwrap().to_vec1::<f32>().unwrap())
            .collect()
    };
    if let Err(m) = tol.check(&finals(&resumed), &finals(&gpu)) {
        panic!("a CUDA checkpoint resumed on the CPU: {m}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Whether CUDA device 0 opens in this build (never in a CPU-only one).
fn cuda_opens() -> bool {
    qlora::cli::open_device(DeviceName::Cuda(0)).is_ok()
}

#[test]
fn a_gguf_file_trains_evaluates_and_generates_like_a_folder() {
    // tests/fixtures/gguf/tiny.gguf through every command that takes --model: plan reads its
    // metadata, train writes an adapter, eval scores with it, generate decodes with it.
    let dir = temp_dir("gguf");
    let gguf = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gguf/tiny.gguf");
    let plan = assert_success(&qlora(
        &["plan", "--seq-len", "64", "--target", "cpu"],
        &[("--model", &gguf)],
    ));
    assert!(
        plan.contains("hidden 64") && plan.contains("2 layers"),
        "{plan}"
    );
    let data = dir.join("train.jsonl");
    write_lines(&data, &mcqa_lines(8));
    let output = dir.join("run");
    let out = qlora(
        &[
            "train",
            "--steps",
            "2",
            "--batch-size",
            "2",
            "--compute-dtype",
            "f32",
        ],
        &[
            ("--model", &gguf),
            ("--data", &data),
            ("--eval-data", &data),
            ("--output", &output),
        ],
    );
    let train_out = assert_success(&out);
    // An all-MCQA eval file is scored for accuracy before training and at each eval.
    assert!(
        train_out.contains("eval accuracy before training: "),
        "{train_out}"
    );
    let records = read_metrics(&output).unwrap();
    let final_accuracy = records.last().unwrap().eval_accuracy.unwrap();
    let adapter = output.join("adapter");
    assert!(adapter.join("adapter_model.safetensors").is_file());
    let eval = assert_success(&qlora(
        &["eval", "--json", "--compute-dtype", "f32"],
        &[
            ("--model", &gguf),
            ("--adapter", &adapter),
            ("--data", &data),
        ],
    ));
    let scores: serde_json::Value = serde_json::from_str(eval.trim()).unwrap();
    assert_eq!(scores["accuracy"].as_f64(), Some(final_accuracy), "{eval}");
    let gen = assert_success(&qlora(
        &[
            "generate",
            "--json",
            "--chat",
            "--max-new-tokens",
            "4",
            "--prompt",
            "hello",
        ],
        &[("--model", &gguf), ("--adapter", &adapter)],
    ));
    let v: serde_json::Value = serde_json::from_str(gen.lines().next().unwrap()).unwrap();
    assert_eq!(v["token_ids"].as_array().unwrap().len(), 4, "{gen}");
    // convert writes a folder that eval reads as it reads the GGUF file.
    let hf = dir.join("hf");
    assert_success(&qlora(
        &["convert", "--dtype", "f32"],
        &[("--gguf", &gguf), ("--output", &hf)],
    ));
    let from_folder = assert_success(&qlora(
        &["eval", "--json", "--compute-dtype", "f32"],
        &[("--model", &hf), ("--adapter", &adapter), ("--data", &data)],
    ));
    let w: serde_json::Value = serde_json::from_str(from_folder.trim()).unwrap();
    for key in ["loss", "accuracy", "label_tokens"] {
        assert_eq!(w[key], scores[key], "{key}: {from_folder} vs {eval}");
    }
    // A file that is not GGUF and not a folder is an error naming it.
    let bogus = dir.join("model.gguf");
    std::fs::write(&bogus, b"not a model").unwrap();
    let stderr = assert_clean_failure(&qlora(
        &["eval", "--json"],
        &[("--model", &bogus), ("--data", &data)],
    ));
    assert!(stderr.contains("model.gguf"), "{stderr}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn jsonl_prompts_hold_multiline_text_and_conversations() {
    let dir = temp_dir("jsonl-prompts");
    let model_dir = write_model(&dir);
    let ids_of = |args: &[&str], paths: &[(&str, &Path)]| -> Vec<Vec<u32>> {
        let mut all = vec![
            "generate",
            "--json",
            "--max-new-tokens",
            "5",
            "--compute-dtype",
            "f32",
        ];
        all.extend_from_slice(args);
        let mut with_model = vec![("--model", model_dir.as_path())];
        with_model.extend_from_slice(paths);
        assert_success(&qlora(&all, &with_model))
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                serde_json::from_value(v["token_ids"].clone()).unwrap()
            })
            .collect()
    };
    let file = dir.join("prompts.jsonl");
    std::fs::write(
        &file,
        "\"red cat\\nthe blue moon\"\n\n{\"messages\": [{\"role\": \"user\", \"content\": \"red cat\"}]}\n",
    )
    .unwrap();
    let from_file = ids_of(&[], &[("--prompts", &file)]);
    let text = ids_of(&["--prompt", "red cat\nthe blue moon"], &[]);
    let chat = ids_of(&["--chat", "--prompt", "red cat"], &[]);
    assert_eq!(from_file, vec![text[0].clone(), chat[0].clone()]);
    // A line that is neither is an error naming the file and line.
    std::fs::write(&file, "\"ok\"\n{\"prompt\": 3}\n").unwrap();
    let stderr = assert_clean_failure(&qlora(
        &["generate"],
        &[("--model", &model_dir), ("--prompts", &file)],
    ));
    assert!(stderr.contains("prompts.jsonl:2"), "{stderr}");
    std::fs::remove_dir_all(&dir).unwrap();
}
