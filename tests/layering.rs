//! The module layers of the crate, bottom up, and the rule that keeps them: code in a module may
//! name (`crate::...`) only modules of a lower layer, or its own module. The table below is the
//! one statement of the order (docs/ARCHITECTURE.md, "Module layers", explains it); this test
//! reads every file under `src/` and fails on any path that reaches up or sideways, so a new
//! upward import cannot slip in unnoticed.
//!
//! Test code is exempt: a `#[cfg(test)]` module may use a higher layer as its oracle (the
//! attention kernel's tests run the Llama model, for one). The binary's files (`main.rs`,
//! `demo.rs`) sit above everything and name the library as `qlora::`, so they are not scanned.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

/// The crate's top-level modules, bottom up. A module may import from the rows above its own.
/// Modules in one row may not import each other.
const LAYERS: &[&[&str]] = &[
    // Foundations: no crate imports at all.
    &["error", "tolerance"],
    // Hugging Face folders on disk: safetensors shards, index, mmap, JSON as Python writes it.
    &["hf"],
    // The NF4 / bitsandbytes format (plain-Rust reference).
    &["quant"],
    // Deterministic test inputs (NF4 code values among them).
    &["testing"],
    // CUDA kernels: reference, CPU emulation, CUDA launch.
    &["kernels"],
    // The Llama model, the LoRA adapter it consumes, generation, the model-folder quantizer.
    &["model"],
    // PEFT adapter directories and merging.
    &["peft"],
    // Data, the training step and loop, optimizers, checkpoints, metrics, the memory plan.
    &["train"],
    // Benchmarks, then the command line (which runs them).
    &["bench"],
    &["cli"],
];

/// Files of `model/` bottom up, by the same rule inside the module (the circles between
/// llama.rs, generate.rs and peft/lora.rs must not come back).
const MODEL_FILES: &[&[&str]] = &[
    &["config", "tokenizer", "kv_cache", "matmul"],
    &["adapter", "gguf"],
    &["weights", "gguf_write", "source"],
    &["init", "cuda", "quantize_dir"],
    &["fused"],
    &["nf4_host"],
    &["fused_lora"],
    &["llama"],
    &["fused_loss"],
    &["backward"],
    &["generate"],
];

/// Known exceptions, `(file module, imported module)`, each with the reason it stays for now.
const ALLOWED: &[(&str, &str, &str)] = &[(
    "model::fused",
    "model::llama",
    "FusedInputs::new reads the model's weights and RoPE tables; being reworked with fused.rs",
)];

/// Files that only declare and re-export their module's children.
fn is_module_root(rel: &Path) -> bool {
    rel == Path::new("lib.rs") || rel.file_name().is_some_and(|f| f == "mod.rs")
}

fn rank(table: &[&[&str]], name: &str) -> Option<usize> {
    table.iter().position(|row| row.contains(&name))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// `source` without comments, string contents and `#[cfg(test)]` items (a test module ends at
/// the first line that closes it at its own indentation, as rustfmt writes it).
fn code_only(source: &str) -> String {
    let mut out = String::new();
    let mut lines = source.lines().peekable();
    let mut in_block_comment = false;
    while let Some(line) = lines.next() {
        let trimmed = line.trim_start();
        if trimmed.starts_with("#[cfg(test)]") {
            if let Some(next) = lines.peek() {
                let indent = next.len() - next.trim_start().len();
                let item = next.trim_start();
                if ["mod ", "pub mod ", "pub(crate) mod "]
                    .iter()
                    .any(|m| item.starts_with(m))
                {
                    let close = format!("{}}}", " ".repeat(indent));
                    for l in lines.by_ref() {
                        if l == close {
                            break;
                        }
                    }
                } else {
                    lines.next();
                }
            }
            continue;
        }
        let mut chars = line.chars().peekable();
        let mut in_string = false;
        while let Some(c) = chars.next() {
            if in_block_comment {
                if c == '*' && chars.peek() == Some(&'/') {
                    chars.next();
                    in_block_comment = false;
                }
                continue;
            }
            if in_string {
                match c {
                    '\\' => {
                        chars.next();
                    }
                    '"' => in_string = false,
                    _ => {}
                }
                continue;
            }
            match c {
                '/' if chars.peek() == Some(&'/') => break,
                '/' if chars.peek() == Some(&'*') => {
                    chars.next();
                    in_block_comment = true;
                }
                '"' => in_string = true,
                _ => out.push(c),
            }
        }
        out.push('\n');
    }
    out
}

/// Every path the code names from the crate root, as its first two segments
/// (`crate::model::llama::X` gives `model::llama`; `crate::{Error, model::x}` gives `Error`
/// and `model::x`).
fn crate_paths(code: &str) -> Vec<String> {
    let mut found = Vec::new();
    let bytes = code.as_bytes();
    let ident = |at: usize| -> (String, usize) {
        let mut end = at;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        (code[at..end].to_string(), end)
    };
    let mut from = 0;
    while let Some(i) = code[from..].find("crate::") {
        let at = from + i;
        from = at + "crate::".len();
        let before = code[..at].chars().next_back();
        if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':') {
            continue; // `$crate::`, `other_crate::`, `super::crate` are not ours
        }
        let mut starts = Vec::new();
        if bytes.get(from) == Some(&b'{') {
            // A group: the first segment of each element at depth one.
            let mut depth = 0;
            let mut expect = true;
            for (k, &b) in bytes.iter().enumerate().skip(from) {
                match b {
                    b'{' => {
                        depth += 1;
                        expect = depth == 1;
                    }
                    b'}' => {
                        depth -= 1;
                        if depth == 0 {
                            break;
                        }
                    }
                    b',' if depth == 1 => expect = true,
                    b if expect && depth == 1 && (b.is_ascii_alphabetic() || b == b'_') => {
                        starts.push(k);
                        expect = false;
                    }
                    _ => {}
                }
            }
        } else {
            starts.push(from);
        }
        for start in starts {
            let (first, end) = ident(start);
            let second = match code[end..].strip_prefix("::") {
                Some(_) => ident(end + 2).0,
                None => String::new(),
            };
            found.push(
                if second.is_empty() || !second.starts_with(char::is_lowercase) {
                    first
                } else {
                    format!("{first}::{second}")
                },
            );
        }
    }
    found
}

/// The module a file defines: (`model`, `llama`) for src/model/llama.rs, (`error`, ``) for
/// src/error.rs.
fn file_module(rel: &Path) -> (String, String) {
    let parts: Vec<String> = rel
        .with_extension("")
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    (parts[0].clone(), parts.get(1).cloned().unwrap_or_default())
}

/// Crate-root items re-exported from a module (`pub use error::{Error, Result}` in lib.rs).
fn root_item_module(name: &str) -> Option<&'static str> {
    match name {
        "Error" | "Result" => Some("error"),
        _ => None,
    }
}

fn violations() -> Vec<String> {
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    let mut problems = Vec::new();
    for path in files {
        let rel = path.strip_prefix(&src).unwrap().to_path_buf();
        if rel == Path::new("main.rs") || rel == Path::new("demo.rs") {
            continue;
        }
        if rel == Path::new("lib.rs") {
            continue;
        }
        let (module, child) = file_module(&rel);
        let Some(own) = rank(LAYERS, &module) else {
            problems.push(format!(
                "src/{}: module `{module}` is not in the LAYERS table",
                rel.display()
            ));
            continue;
        };
        let code = code_only(&fs::read_to_string(&path).unwrap());
        for target in crate_paths(&code) {
            let (top, sub) = match target.split_once("::") {
                Some((a, b)) => (a.to_string(), b.to_string()),
                None => (target.clone(), String::new()),
            };
            let top = root_item_module(&top).map_or(top, str::to_string);
            if top == module {
                if module == "model" && !is_module_root(&rel) && !sub.is_empty() && sub != child {
                    let from = format!("model::{child}");
                    let to = format!("model::{sub}");
                    if ALLOWED.iter().any(|&(f, t, _)| f == from && t == to) {
                        continue;
                    }
                    match (rank(MODEL_FILES, &child), rank(MODEL_FILES, &sub)) {
                        (Some(a), Some(b)) if b < a => {}
                        (None, _) => problems.push(format!(
                            "src/{}: model file `{child}` is not in the MODEL_FILES table",
                            rel.display()
                        )),
                        (_, None) => problems.push(format!(
                            "src/{}: imports crate::{target}, not in the MODEL_FILES table",
                            rel.display()
                        )),
                        _ => problems.push(format!(
                            "src/{}: imports crate::{target}, a model file at or above its own",
                            rel.display()
                        )),
                    }
                }
                continue;
            }
            match rank(LAYERS, &top) {
                Some(r) if r < own => {}
                Some(_) => problems.push(format!(
                    "src/{}: `{module}` imports crate::{target} from a layer at or above its own",
                    rel.display()
                )),
                None => problems.push(format!(
                    "src/{}: imports crate::{target}, which is not in the LAYERS table",
                    rel.display()
                )),
            }
        }
    }
    problems
}

#[test]
fn no_module_imports_from_a_layer_above_it() {
    let problems = violations();
    assert!(
        problems.is_empty(),
        "layering violations (see LAYERS in tests/layering.rs):\n{}",
        problems.join("\n")
    );
}

#[test]
fn every_top_level_module_has_a_layer() {
    let lib =
        fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src/lib.rs")).unwrap();
    let declared: Vec<&str> = lib
        .lines()
        .filter_map(|l| l.trim().strip_prefix("pub mod "))
        .map(|l| l.trim_end_matches(';'))
        .collect();
    assert!(!declared.is_empty());
    for module in &declared {
        assert!(rank(LAYERS, module).is_some(), "`{module}` has no layer");
    }
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for name in LAYERS.iter().flat_map(|row| row.iter()) {
        *counts.entry(name).or_default() += 1;
    }
    assert!(counts.values().all(|&n| n == 1), "a module listed twice");
}

#[test]
fn the_scanner_sees_imports_and_skips_tests_and_comments() {
    let code = code_only(
        "use crate::model::llama::LlamaModel;\n\
         use crate::{Error, peft::lora::{A, B}, Result};\n\
         // use crate::cli::x;\n\
         let s = \"crate::bench::y\";\n\
         fn f() -> crate::train::data::Batch { todo!() }\n\
         #[cfg(test)]\n\
         mod tests {\n    use crate::cli::plan::Preset;\n}\n\
         use crate::kernels::Kernel;\n",
    );
    assert_eq!(
        crate_paths(&code),
        [
            "model::llama",
            "Error",
            "peft::lora",
            "Result",
            "train::data",
            "kernels"
        ]
    );
}
