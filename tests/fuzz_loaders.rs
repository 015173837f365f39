//! Every loader against structured mutations of valid files: truncation at every length class,
//! flipped bytes, swapped shapes and dtypes, huge lengths and offsets, NaN/Inf values, edited
//! JSON and TOML. Each case must give `Ok` or an `Err` that names the file (or, for a tensor that
//! disagrees with the config, the tensor), never a panic, and never make the loader allocate far
//! beyond the size of what it read. Seeded, so a failure names a case that reproduces.

use std::fs;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use candle_core::{DType, Device};
use qlora::cli::config::TrainConfig;
use qlora::model::tokenizer::Tokenizer;
use qlora::model::{LlamaConfig, LlamaWeights, LoadOptions};
use qlora::peft::{LoraAdapter, LoraConfig};
use qlora::testing::alloc::{live, peak, reset_peak, CountingAllocator, Tracked};
use qlora::train::data::read_records;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

/// One loader at a time: the allocation counters are process-wide.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// What a loader may allocate beyond the bytes it was given: decoded tensors widen bf16 to f32
/// (×2) and a header is parsed into a map; anything beyond this is a length taken on trust.
const ALLOC_FACTOR: isize = 8;
const ALLOC_SLACK: isize = 4 << 20;

fn fixture(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(path)
}

fn scratch(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("qlora-fuzz-{tag}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    dir
}

/// Mutations every file gets: truncations (empty, inside a length prefix, at random points),
/// byte flips, runs of 0xff, garbage appended.
fn byte_mutations(valid: &[u8], rng: &mut StdRng, n: usize) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for keep in [
        0,
        1,
        4,
        7,
        8,
        9,
        16,
        valid.len() / 2,
        valid.len().saturating_sub(1),
    ] {
        out.push((
            format!("truncated to {keep}"),
            valid[..keep.min(valid.len())].to_vec(),
        ));
    }
    for i in 0..n {
        let mut bytes = valid.to_vec();
        match i % 4 {
            0 => {
                let keep = rng.random_range(0..valid.len());
                bytes.truncate(keep);
                out.push((format!("truncated to {keep}"), bytes));
            }
            1 => {
                // Most structure sits near the start: flip there three times in four.
                let end = if rng.random_bool(0.75) {
                    valid.len().min(4096)
                } else {
                    valid.len()
                };
                let at = rng.random_range(0..end);
                let bit = 1u8 << rng.random_range(0..8);
                bytes[at] ^= bit;
                out.push((format!("bit {bit:#x} flipped at {at}"), bytes));
            }
            2 => {
                let at = rng.random_range(0..valid.len());
                let len = rng.random_range(1..16).min(valid.len() - at);
                bytes[at..at + len].fill(0xff);
                out.push((format!("{len} bytes of 0xff at {at}"), bytes));
            }
            _ => {
                let extra: Vec<u8> = (0..rng.random_range(1..64)).map(|_| rng.random()).collect();
                bytes.extend_from_slice(&extra);
                out.push((format!("{} garbage bytes appended", extra.len()), bytes));
            }
        }
    }
    out
}

/// Header length and header JSON of a safetensors file.
fn split_header(bytes: &[u8]) -> (usize, serde_json::Map<String, Value>) {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    match serde_json::from_slice(&bytes[8..8 + n]).unwrap() {
        Value::Object(map) => (n, map),
        _ => unreachable!(),
    }
}

/// A safetensors file with `header` (re-encoded, padded) in front of `valid`'s data.
fn with_header(valid: &[u8], n: usize, header: &serde_json::Map<String, Value>) -> Vec<u8> {
    let mut text = serde_json::to_vec(header).unwrap();
    while !text.len().is_multiple_of(8) {
        text.push(b' ');
    }
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&text);
    out.extend_from_slice(&valid[8 + n..]);
    out
}

/// Safetensors-aware mutations: per tensor, shapes swapped or inflated, dtypes changed, offsets
/// moved or made huge, the entry dropped; header lengths that lie; NaN and Inf in float data.
fn safetensors_mutations(valid: &[u8], rng: &mut StdRng, n: usize) -> Vec<(String, Vec<u8>)> {
    let (hn, header) = split_header(valid);
    let names: Vec<String> = header
        .keys()
        .filter(|k| k.as_str() != "__metadata__")
        .cloned()
        .collect();
    let mut out = Vec::new();
    for huge in [u64::MAX, 1 << 40, (valid.len() as u64) * 2, 7] {
        let mut bytes = valid.to_vec();
        bytes[..8].copy_from_slice(&huge.to_le_bytes());
        out.push((format!("header length {huge}"), bytes));
    }
    for i in 0..n {
        let name = &names[rng.random_range(0..names.len())];
        let mut h = header.clone();
        let entry = h.get_mut(name).unwrap();
        let what = match i % 6 {
            0 => {
                let shape = entry["shape"].as_array().unwrap().clone();
                let mut rev = shape.clone();
                rev.reverse();
                rev.push(Value::from(2));
                entry["shape"] = Value::from(rev);
                "shape changed"
            }
            1 => {
                entry["shape"] = serde_json::json!([u64::MAX / 2, 4]);
                "huge shape"
            }
            2 => {
                let dtypes = ["F32", "F16", "BF16", "I64", "U8", "BOOL", "F64", "XX"];
                entry["dtype"] = Value::from(dtypes[rng.random_range(0..dtypes.len())]);
                "dtype changed"
            }
            3 => {
                let end = entry["data_offsets"][1].as_u64().unwrap();
                entry["data_offsets"] = serde_json::json!([end, end + (1 << 33)]);
                "offsets past the end"
            }
            4 => {
                h.remove(name);
                "entry dropped"
            }
            _ => {
                let mut bytes = valid.to_vec();
                let begin = 8 + hn + entry["data_offsets"][0].as_u64().unwrap() as usize;
                let pattern: &[u8] = match (entry["dtype"].as_str().unwrap(), rng.random_bool(0.5))
                {
                    ("F32", true) => &[0x00, 0x00, 0xc0, 0x7f],
                    ("F32", false) => &[0x00, 0x00, 0x80, 0xff],
                    ("BF16", true) => &[0xc0, 0x7f],
                    ("BF16", false) => &[0x80, 0x7f],
                    ("F16", _) => &[0x00, 0x7c],
                    _ => &[0xff],
                };
                let end = (begin + pattern.len()).min(bytes.len());
                bytes[begin..end].copy_from_slice(&pattern[..end - begin]);
                out.push((format!("non-finite value in `{name}`"), bytes));
                continue;
            }
        };
        out.push((format!("`{name}`: {what}"), with_header(valid, hn, &h)));
    }
    out
}

/// Textual mutations of JSON or TOML: truncations, a character deleted or doubled, values
/// replaced by other types, huge numbers, NaN.
fn text_mutations(valid: &[u8], rng: &mut StdRng, n: usize) -> Vec<(String, Vec<u8>)> {
    let text = String::from_utf8(valid.to_vec()).unwrap();
    let mut out = byte_mutations(valid, rng, n / 2);
    let replacements = [
        "null",
        "-1",
        "1e999",
        "NaN",
        "\"\"",
        "[]",
        "{}",
        "18446744073709551616",
    ];
    for _ in 0..n / 2 {
        let mut t = text.clone();
        // Replace a value after a random ':' or '=' up to the next ',' or newline.
        let seps: Vec<usize> = t.match_indices([':', '=']).map(|(i, _)| i).collect();
        if seps.is_empty() {
            continue;
        }
        let at = seps[rng.random_range(0..seps.len())] + 1;
        let end = t[at..].find([',', '\n', '}']).map_or(t.len(), |e| at + e);
        let with = replacements[rng.random_range(0..replacements.len())];
        t.replace_range(at..end, &format!(" {with}"));
        out.push((
            format!("value at byte {at} replaced by {with}"),
            t.into_bytes(),
        ));
    }
    out
}

/// Runs `load` on each case written to `path`: no panic, an `Err` naming `path`'s file name (or
/// one of `also`), and no more than [`ALLOC_FACTOR`] × the case's bytes allocated. Returns how
/// many cases loaded and how many were refused.
fn run_cases<T>(
    path: &Path,
    cases: Vec<(String, Vec<u8>)>,
    also: &[&str],
    load: impl Fn() -> qlora::Result<T>,
) -> (usize, usize) {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let file = path.file_name().unwrap().to_string_lossy().to_string();
    let (mut ok, mut refused) = (0, 0);
    for (what, bytes) in cases {
        fs::write(path, &bytes).unwrap();
        let tracked = Tracked::start();
        let before = live();
        reset_peak();
        let result = catch_unwind(AssertUnwindSafe(&load));
        let grew = peak() - before;
        drop(tracked);
        let limit = ALLOC_FACTOR * bytes.len() as isize + ALLOC_SLACK;
        assert!(
            grew <= limit,
            "{file}, {what}: allocated {grew} B for a {} B file",
            bytes.len()
        );
        match result {
            Err(_) => panic!("{file}, {what}: the loader panicked"),
            Ok(Ok(_)) => ok += 1,
            Ok(Err(e)) => {
                let msg = e.to_string();
                assert!(
                    msg.contains(&file) || also.iter().any(|a| msg.contains(a)),
                    "{file}, {what}: the error names neither the file nor the tensor: {msg}"
                );
                refused += 1;
            }
        }
    }
    (ok, refused)
}

fn f32_options() -> LoadOptions {
    LoadOptions {
        dtype: DType::F32,
        device: Device::Cpu,
        quantize: false,
    }
}

/// A model folder copied from a fixture, with the file `name` to be replaced by each case.
fn model_folder(tag: &str, fixture_dir: &str) -> PathBuf {
    let dir = scratch(tag);
    for entry in fs::read_dir(fixture(fixture_dir)).unwrap() {
        let entry = entry.unwrap();
        fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
    }
    dir
}

fn load_model(dir: &Path) -> qlora::Result<LlamaWeights> {
    let config = LlamaConfig::from_file(dir.join("config.json"))?;
    LlamaWeights::load(dir, &config, &f32_options())
}

/// Names a tensor error may cite instead of the file: `tensor `name``.
const TENSOR: &[&str] = &["tensor `"];

#[test]
fn model_safetensors() {
    let dir = model_folder("model", "llama/base");
    let path = dir.join("model.safetensors");
    let valid = fs::read(&path).unwrap();
    let mut rng = StdRng::seed_from_u64(1);
    let mut cases = byte_mutations(&valid, &mut rng, 300);
    cases.extend(safetensors_mutations(&valid, &mut rng, 300));
    let (ok, refused) = run_cases(&path, cases, TENSOR, || load_model(&dir));
    assert!(refused > 300, "{ok} loaded, {refused} refused");
}

#[test]
fn bnb_nf4_model_with_its_quant_state() {
    let dir = model_folder("bnb", "llama/bnb_nf4");
    let path = dir.join("model.safetensors");
    let valid = fs::read(&path).unwrap();
    let mut rng = StdRng::seed_from_u64(2);
    let mut cases = byte_mutations(&valid, &mut rng, 150);
    cases.extend(safetensors_mutations(&valid, &mut rng, 150));
    let (ok, refused) = run_cases(&path, cases, TENSOR, || load_model(&dir));
    assert!(refused > 150, "{ok} loaded, {refused} refused");
}

/// GGUF header mutations: huge or zero counts, string lengths, dimensions, type ids and offsets
/// written over the header's fields (every 8-byte-aligned word of the first `header` bytes can be
/// one), as a damaged or hostile file would carry them.
fn gguf_mutations(valid: &[u8], rng: &mut StdRng, n: usize) -> Vec<(String, Vec<u8>)> {
    // The header (metadata and tensor directory) ends where the 32-byte-aligned tensor data
    // starts; the tokenizer arrays make it most of this small file, so mutate the first 8 KiB.
    let header = valid.len().min(8 << 10);
    let words = [
        0u64,
        1,
        30,
        255,
        u32::MAX as u64,
        u64::MAX,
        1 << 40,
        1 << 62,
    ];
    (0..n)
        .map(|i| {
            let mut bytes = valid.to_vec();
            let at = rng.random_range(0..header / 4) * 4;
            let word = words[rng.random_range(0..words.len())];
            let width = if rng.random_bool(0.5) { 4 } else { 8 };
            let end = (at + width).min(bytes.len());
            bytes[at..end].copy_from_slice(&word.to_le_bytes()[..end - at]);
            (
                format!("gguf word {i}: {word:#x} ({width} B) at {at}"),
                bytes,
            )
        })
        .collect()
}

#[test]
fn gguf_model() {
    let dir = scratch("gguf");
    let path = dir.join("tiny.gguf");
    let valid = fs::read(fixture("gguf/tiny.gguf")).unwrap();
    let mut rng = StdRng::seed_from_u64(9);
    let mut cases = byte_mutations(&valid, &mut rng, 200);
    cases.extend(gguf_mutations(&valid, &mut rng, 400));
    let (ok, refused) = run_cases(&path, cases, &["tiny.gguf"], || {
        let file = qlora::model::gguf::GgufFile::open(&path)?;
        let config = file.config()?;
        LlamaWeights::load_gguf(&file, &config, &f32_options())?;
        file.tokenizer()
    });
    eprintln!("gguf: {ok} loaded, {refused} refused");
    assert!(refused > 200, "{ok} loaded, {refused} refused");
}

#[test]
fn config_json() {
    let dir = model_folder("config", "llama/base");
    let path = dir.join("config.json");
    let valid = fs::read(&path).unwrap();
    let mut rng = StdRng::seed_from_u64(3);
    let cases = text_mutations(&valid, &mut rng, 400);
    // A value that parses but disagrees with the weights names the tensor it does not fit.
    let (ok, refused) = run_cases(&path, cases, TENSOR, || load_model(&dir));
    assert!(refused > 100, "{ok} loaded, {refused} refused");
}

#[test]
fn shard_index_json() {
    let dir = model_folder("index", "llama/sharded");
    let path = dir.join("model.safetensors.index.json");
    let valid = fs::read(&path).unwrap();
    let mut rng = StdRng::seed_from_u64(4);
    let cases = text_mutations(&valid, &mut rng, 200);
    let shard_names: Vec<String> = (1..=5)
        .map(|i| format!("model-0000{i}-of-00005.safetensors"))
        .collect();
    let mut also: Vec<&str> = shard_names.iter().map(String::as_str).collect();
    also.extend(TENSOR);
    let (ok, refused) = run_cases(&path, cases, &also, || load_model(&dir));
    assert!(refused > 50, "{ok} loaded, {refused} refused");
}

#[test]
fn adapter_folder() {
    let config = LlamaConfig::from_file(fixture("llama/base/config.json")).unwrap();
    let adapter =
        LoraAdapter::init(LoraConfig::default(), &config, DType::F32, &Device::Cpu, 9).unwrap();
    let dir = scratch("adapter");
    adapter.save_pretrained(&dir).unwrap();
    let load = || LoraAdapter::load_pretrained(&dir, &Device::Cpu);
    let mut rng = StdRng::seed_from_u64(5);

    let weights = dir.join("adapter_model.safetensors");
    let valid = fs::read(&weights).unwrap();
    let mut cases = byte_mutations(&valid, &mut rng, 150);
    cases.extend(safetensors_mutations(&valid, &mut rng, 150));
    let (_, refused) = run_cases(&weights, cases, TENSOR, load);
    assert!(refused > 150);
    fs::write(&weights, &valid).unwrap();

    let config_path = dir.join("adapter_config.json");
    let valid = fs::read(&config_path).unwrap();
    let cases = text_mutations(&valid, &mut rng, 300);
    let (_, refused) = run_cases(&config_path, cases, &["adapter config"], load);
    assert!(refused > 100);
}

#[test]
fn jsonl_data() {
    let dir = scratch("jsonl");
    let path = dir.join("train.jsonl");
    let lines = [
        r#"{"instruction": "Add", "input": "2 and 3", "output": "5"}"#,
        r#"{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}"#,
        r#"{"question": "Sky?", "choices": ["blue", "green"], "answer": 0}"#,
        r#"{"text": "plain text"}"#,
    ];
    let valid = (lines.join("\n") + "\n").into_bytes();
    let mut rng = StdRng::seed_from_u64(6);
    let cases = text_mutations(&valid, &mut rng, 600);
    let (ok, refused) = run_cases(&path, cases, &[], || read_records(&path));
    assert!(refused > 100, "{ok} loaded, {refused} refused");
}

#[test]
fn toml_settings() {
    let dir = scratch("toml");
    let path = dir.join("run.toml");
    let valid = TrainConfig::default().to_toml().unwrap().into_bytes();
    let mut rng = StdRng::seed_from_u64(7);
    let cases = text_mutations(&valid, &mut rng, 600);
    // Parsing only: a value out of range is named by its setting when the settings (file and
    // flags together) are validated.
    let (ok, refused) = run_cases(&path, cases, &[], || TrainConfig::from_toml_file(&path));
    assert!(refused > 100, "{ok} loaded, {refused} refused");
}

#[test]
fn tokenizer_config_json() {
    let dir = scratch("tokenizer");
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        fs::copy(fixture("tokenizer").join(f), dir.join(f)).unwrap();
    }
    let path = dir.join("tokenizer_config.json");
    let valid = fs::read(&path).unwrap();
    let mut rng = StdRng::seed_from_u64(8);
    let cases = text_mutations(&valid, &mut rng, 300);
    let json = dir.join("tokenizer.json");
    let (ok, refused) = run_cases(&path, cases, &[], || {
        Tokenizer::from_files(&json, Some(path.as_path()))
    });
    assert!(refused > 50, "{ok} loaded, {refused} refused");
}

/// A 10 MB JSONL line (it used to cost about 2.3 GB to tokenize at --seq-len 64) is skipped
/// unread and counted; the lines around it load, and the whole file costs a few times its size.
#[test]
fn a_huge_jsonl_line_is_skipped_before_tokenizing() {
    use qlora::train::data::{line_byte_limit, load_jsonl, DataConfig, Overflow};
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let tokenizer = Tokenizer::from_files(
        fixture("tokenizer/tokenizer.json"),
        Some(fixture("tokenizer/tokenizer_config.json").as_path()),
    )
    .unwrap();
    let dir = scratch("huge-line");
    let path = dir.join("data.jsonl");
    let short = r#"{"instruction": "Say hi", "output": "hi"}"#;
    let huge = format!(
        r#"{{"instruction": "{}", "output": "x"}}"#,
        "word ".repeat(2 << 20)
    );
    fs::write(&path, format!("{short}\n{huge}\n{short}\n")).unwrap();
    let config = DataConfig {
        max_seq_len: 64,
        overflow: Overflow::Truncate,
    };
    assert!(huge.len() > line_byte_limit(64, &tokenizer));
    let tracked = Tracked::start();
    let before = live();
    reset_peak();
    let data = load_jsonl(&path, &tokenizer, &config).unwrap();
    let grew = peak() - before;
    drop(tracked);
    assert_eq!((data.stats.examples, data.stats.skipped_long_lines), (2, 1));
    let size = fs::metadata(&path).unwrap().len() as isize;
    assert!(grew < 3 * size, "{grew} B allocated for a {size} B file");
}

/// A training checkpoint (after one update, so the optimizer file holds moments): its trainer
/// state, optimizer file and adapter files each mutated in turn.
#[test]
fn training_checkpoint() {
    use qlora::kernels::adamw::AdamWConfig;
    use qlora::model::llama::LlamaModel;
    use qlora::train::checkpoint::{
        load_checkpoint, save_checkpoint, DataPosition, RngState, TrainState,
    };
    use qlora::train::data::{collate, Example};
    use qlora::train::schedule::{LrSchedule, ScheduleKind};
    use qlora::train::trainer::{CpuAdamW, NonFinitePolicy, Trainer, TrainerConfig};

    let base = fixture("llama/base");
    let config = LlamaConfig::from_file(base.join("config.json")).unwrap();
    let weights = LlamaWeights::load(&base, &config, &f32_options()).unwrap();
    let model = LlamaModel::new(config, weights).unwrap();
    let lora = LoraConfig {
        r: 2,
        ..LoraConfig::default()
    };
    let adapter = LoraAdapter::init(lora, model.config(), DType::F32, &Device::Cpu, 3).unwrap();
    let optimizer = CpuAdamW::new(AdamWConfig::default()).unwrap();
    let trainer_config = TrainerConfig {
        schedule: LrSchedule {
            kind: ScheduleKind::Cosine { num_cycles: 0.5 },
            warmup_steps: 1,
            total_steps: 4,
        },
        max_grad_norm: Some(1.0),
        non_finite: NonFinitePolicy::Error,
    };
    let mut trainer = Trainer::new(&model, adapter, optimizer, trainer_config).unwrap();
    let ids: Vec<u32> = (0..8).map(|i| 3 + i * 11).collect();
    let labels = ids.iter().map(|&i| i as i64).collect();
    let batch = collate(
        &[Example {
            input_ids: ids,
            labels,
        }],
        0,
    )
    .unwrap();
    trainer.train_step(&[batch]).unwrap();
    let state = TrainState {
        step: 1,
        data_position: DataPosition { epoch: 0, index: 1 },
        rng_state: RngState {
            seed: 1,
            counter: 1,
        },
    };
    let dir = scratch("checkpoint");
    let saved = save_checkpoint(&dir, &trainer, &state, 1).unwrap();
    let load = || load_checkpoint(&saved, &model);
    let mut rng = StdRng::seed_from_u64(10);
    let mut also: Vec<&str> = TENSOR.to_vec();
    // A checkpoint error names its folder (`training checkpoint …/checkpoint-1: …`).
    let folder = saved.display().to_string();
    also.push(&folder);
    for file in ["trainer_state.json", "adapter_config.json"] {
        let path = saved.join(file);
        let valid = fs::read(&path).unwrap();
        let cases = text_mutations(&valid, &mut rng, 200);
        run_cases(&path, cases, &also, load);
        fs::write(&path, &valid).unwrap();
    }
    for file in ["optimizer.safetensors", "adapter_model.safetensors"] {
        let path = saved.join(file);
        let valid = fs::read(&path).unwrap();
        let mut cases = byte_mutations(&valid, &mut rng, 100);
        cases.extend(safetensors_mutations(&valid, &mut rng, 100));
        let (_, refused) = run_cases(&path, cases, &also, load);
        assert!(refused > 100, "{file}: {refused} refused");
        fs::write(&path, &valid).unwrap();
    }
    load().unwrap();
}
