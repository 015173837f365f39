//! Tokenizer parity with transformers (tests/fixtures/tokenizer/expected.json) and the JSONL data
//! pipeline: response-only labels, truncation, padding, packing, line errors and counts.

use std::path::{Path, PathBuf};

use qlora::model::tokenizer::{ChatMessage, Tokenizer};
use qlora::train::data::{
    collate, fit_to_length, load_jsonl, pack, DataConfig, Example, Fitted, Overflow, IGNORE_INDEX,
};
use qlora::Error;
use serde::Deserialize;

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizer")
}

fn tokenizer() -> Tokenizer {
    Tokenizer::from_dir(fixture_dir()).expect("fixture tokenizer loads")
}

#[derive(Deserialize)]
struct Expected {
    bos_id: u32,
    eos_id: u32,
    pad_id: u32,
    unk_id: Option<u32>,
    vocab_size: usize,
    encode: Vec<EncodeCase>,
    chat: Vec<ChatCase>,
    chat_error: ChatError,
}

#[derive(Deserialize)]
struct EncodeCase {
    text: String,
    ids: Vec<u32>,
    ids_no_special: Vec<u32>,
    decoded: String,
    decoded_skip_special: String,
}

#[derive(Deserialize)]
struct ChatCase {
    messages: Vec<ChatMessage>,
    add_generation_prompt: bool,
    rendered: String,
    ids: Vec<u32>,
}

#[derive(Deserialize)]
struct ChatError {
    messages: Vec<ChatMessage>,
    message: String,
}

fn expected() -> Expected {
    let text = std::fs::read_to_string(fixture_dir().join("expected.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// A temp dir per test, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("qlora-data-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn write(&self, file: &str, text: &str) -> PathBuf {
        let path = self.0.join(file);
        std::fs::write(&path, text).unwrap();
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn config(max_seq_len: usize) -> DataConfig {
    DataConfig {
        max_seq_len,
        overflow: Overflow::Truncate,
    }
}

/// The labelled part of an example, decoded.
fn response_text(tok: &Tokenizer, example: &Example) -> String {
    let ids: Vec<u32> = example
        .labels
        .iter()
        .filter(|&&l| l != IGNORE_INDEX)
        .map(|&l| l as u32)
        .collect();
    tok.decode(&ids, false).unwrap()
}

/// Labels are -100 on a prefix-free prompt and equal the ids elsewhere.
fn assert_labels_are_ids_or_ignored(example: &Example) {
    assert_eq!(example.input_ids.len(), example.labels.len());
    for (&id, &label) in example.input_ids.iter().zip(&example.labels) {
        assert!(label == IGNORE_INDEX || label == i64::from(id));
    }
}

#[test]
fn special_tokens_match_transformers() {
    let tok = tokenizer();
    let exp = expected();
    assert_eq!(tok.bos().map(|t| t.id), Some(exp.bos_id));
    assert_eq!(tok.eos().map(|t| t.id), Some(exp.eos_id));
    assert_eq!(tok.pad().map(|t| t.id), Some(exp.pad_id));
    assert_eq!(tok.unk().map(|t| t.id), exp.unk_id);
    assert_eq!(tok.eos().map(|t| t.content.as_str()), Some("</s>"));
    assert_eq!(tok.vocab_size(), exp.vocab_size);
    assert_eq!(tok.pad_id().unwrap(), exp.pad_id);
}

#[test]
fn encode_and_decode_match_transformers() {
    let tok = tokenizer();
    for case in expected().encode {
        assert_eq!(
            tok.encode(&case.text, true).unwrap(),
            case.ids,
            "{:?}",
            case.text
        );
        assert_eq!(
            tok.encode(&case.text, false).unwrap(),
            case.ids_no_special,
            "{:?}",
            case.text
        );
        assert_eq!(tok.decode(&case.ids, false).unwrap(), case.decoded);
        assert_eq!(
            tok.decode(&case.ids, true).unwrap(),
            case.decoded_skip_special
        );
    }
}

#[test]
fn chat_template_matches_transformers() {
    let tok = tokenizer();
    let exp = expected();
    for case in exp.chat {
        let rendered = tok
            .apply_chat_template(&case.messages, case.add_generation_prompt)
            .unwrap();
        assert_eq!(rendered, case.rendered);
        assert_eq!(tok.encode(&rendered, false).unwrap(), case.ids);
    }
    match tok.apply_chat_template(&exp.chat_error.messages, false) {
        Err(Error::ChatTemplate(message)) => assert_eq!(message, exp.chat_error.message),
        other => panic!("expected the template's exception, got {other:?}"),
    }
}

#[test]
fn missing_and_malformed_tokenizer_files_are_named_errors() {
    let dir = TempDir::new("badtok");
    match Tokenizer::from_dir(&dir.0) {
        Err(Error::TokenizerFile { path, .. }) => assert!(path.ends_with("tokenizer.json")),
        other => panic!("{other:?}"),
    }
    dir.write("tokenizer.json", "{not json");
    match Tokenizer::from_dir(&dir.0) {
        Err(Error::TokenizerFile { path, .. }) => assert!(path.ends_with("tokenizer.json")),
        other => panic!("{other:?}"),
    }
    let good = std::fs::read_to_string(fixture_dir().join("tokenizer.json")).unwrap();
    dir.write("tokenizer.json", &good);
    dir.write("tokenizer_config.json", r#"{"eos_token": 5}"#);
    match Tokenizer::from_dir(&dir.0) {
        Err(Error::TokenizerFile { path, .. }) => assert!(path.ends_with("tokenizer_config.json")),
        other => panic!("{other:?}"),
    }
    dir.write("tokenizer_config.json", r#"{"eos_token": "<nope>"}"#);
    assert!(matches!(
        Tokenizer::from_dir(&dir.0),
        Err(Error::TokenizerFile { .. })
    ));
    // No template at all, and a template that does not compile.
    dir.write("tokenizer_config.json", r#"{"eos_token": "</s>"}"#);
    let tok = Tokenizer::from_dir(&dir.0).unwrap();
    let messages = [ChatMessage::new("user", "hi")];
    assert!(matches!(
        tok.apply_chat_template(&messages, true),
        Err(Error::ChatTemplate(_))
    ));
    assert!(matches!(
        tok.render_chat_template("{% for %}", &messages, true),
        Err(Error::ChatTemplate(_))
    ));
}

#[test]
fn named_chat_templates_use_default() {
    let dir = TempDir::new("named");
    let good = std::fs::read_to_string(fixture_dir().join("tokenizer.json")).unwrap();
    dir.write("tokenizer.json", &good);
    dir.write(
        "tokenizer_config.json",
        r#"{"bos_token": "<s>", "chat_template": [
            {"name": "tool_use", "template": "TOOLS"},
            {"name": "default", "template": "{{ bos_token }}{% for m in messages %}{{ m.role }}: {{ m.content | trim }}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"}
        ]}"#,
    );
    let tok = Tokenizer::from_dir(&dir.0).unwrap();
    assert_eq!(tok.chat_template_named("tool_use"), Some("TOOLS"));
    let messages = [ChatMessage::new("user", "  hi  ")];
    assert_eq!(
        tok.apply_chat_template(&messages, true).unwrap(),
        "<s>user: hi\nassistant:"
    );
    // transformers v5 keeps the template in its own file, which wins.
    dir.write("chat_template.jinja", "J{{ messages | length }}");
    let tok = Tokenizer::from_dir(&dir.0).unwrap();
    assert_eq!(tok.apply_chat_template(&messages, false).unwrap(), "J1");
}

#[test]
fn instruction_labels_cover_exactly_the_response_and_eos() {
    let tok = tokenizer();
    let dir = TempDir::new("instr");
    let path = dir.write(
        "instr.jsonl",
        concat!(
            r#"{"instruction": "Sum one and two.", "output": "three"}"#,
            "\n",
            r#"{"instruction": "Explain.", "input": "why sky blue", "output": "light", "id": 7}"#,
            "\n"
        ),
    );
    let data = load_jsonl(&path, &tok, &config(512)).unwrap();
    assert_eq!(data.examples.len(), 2);
    let eos = tok.eos().unwrap().id;
    for (example, (prompt, response)) in data.examples.iter().zip([
        (
            "### Instruction:\nSum one and two.\n\n### Response:\n",
            "three",
        ),
        (
            "### Instruction:\nExplain.\n\n### Input:\nwhy sky blue\n\n### Response:\n",
            "light",
        ),
    ]) {
        assert_labels_are_ids_or_ignored(example);
        let prompt_ids = tok.encode(prompt, true).unwrap();
        let all = tok.encode(&format!("{prompt}{response}"), true).unwrap();
        let mut ids = all.clone();
        ids.push(eos);
        assert_eq!(example.input_ids, ids);
        // The prompt ends in "\n", so its tokens are a prefix of the whole and are exactly the
        // ignored ones.
        assert_eq!(&all[..prompt_ids.len()], &prompt_ids[..]);
        let ignored = example
            .labels
            .iter()
            .take_while(|&&l| l == IGNORE_INDEX)
            .count();
        assert_eq!(ignored, prompt_ids.len());
        assert!(example.labels[ignored..].iter().all(|&l| l != IGNORE_INDEX));
        assert_eq!(*example.labels.last().unwrap(), i64::from(eos));
        assert_eq!(response_text(&tok, example), format!("{response}</s>"));
    }
    assert_eq!(data.stats.examples, 2);
    assert_eq!(
        data.stats.label_tokens,
        data.examples
            .iter()
            .map(Example::label_tokens)
            .sum::<usize>()
    );
}

#[test]
fn chat_labels_cover_exactly_the_assistant_turns() {
    let tok = tokenizer();
    let exp = expected();
    let dir = TempDir::new("chat");
    let line = r#"{"messages": [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Sum one and two."}, {"role": "assistant", "content": "Three."}, {"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."}]}"#;
    let path = dir.write("chat.jsonl", &format!("{line}\n"));
    let data = load_jsonl(&path, &tok, &config(512)).unwrap();
    let example = &data.examples[0];
    assert_labels_are_ids_or_ignored(example);
    let messages: Vec<ChatMessage> = serde_json::from_value(
        serde_json::from_str::<serde_json::Value>(line).unwrap()["messages"].clone(),
    )
    .unwrap();
    let rendered = tok.apply_chat_template(&messages, false).unwrap();
    assert_eq!(example.input_ids, tok.encode(&rendered, false).unwrap());
    // Both assistant turns with their </s>, nothing of the user turns.
    assert_eq!(response_text(&tok, example), "Three. </s>Paris. </s>");
    // The ids of transformers' rendering of a two-turn conversation are what we train on.
    let case = &exp.chat[0];
    let path = dir.write(
        "chat1.jsonl",
        &serde_json::json!({ "messages": case.messages.iter().map(|m| serde_json::json!({"role": m.role, "content": m.content})).collect::<Vec<_>>() })
            .to_string(),
    );
    let data = load_jsonl(&path, &tok, &config(512)).unwrap();
    assert_eq!(data.examples[0].input_ids, case.ids);
    assert_eq!(response_text(&tok, &data.examples[0]), "Paris. </s>");
}

#[test]
fn multiple_choice_labels_are_the_answer_letter_and_eos() {
    let tok = tokenizer();
    let dir = TempDir::new("mcqa");
    let path = dir.write(
        "mcqa.jsonl",
        concat!(
            r#"{"question": "Capital of France?", "choices": ["Berlin", "Paris", "Rome"], "answer": 1}"#,
            "\n",
            r#"{"question": "Colour of the sky?", "choices": ["red", "blue"], "answer": "b"}"#,
            "\n"
        ),
    );
    let data = load_jsonl(&path, &tok, &config(512)).unwrap();
    let prompt = "Question: Capital of France?\nA. Berlin\nB. Paris\nC. Rome\nAnswer:";
    let prompt_len = tok.encode(prompt, true).unwrap().len();
    let first = &data.examples[0];
    assert_labels_are_ids_or_ignored(first);
    assert!(first.labels[..prompt_len]
        .iter()
        .all(|&l| l == IGNORE_INDEX));
    assert_eq!(response_text(&tok, first), " B</s>");
    assert_eq!(response_text(&tok, &data.examples[1]), " B</s>");
}

#[test]
fn truncation_cuts_prompt_from_the_left_then_response_from_the_right() {
    let tok = tokenizer();
    let bos = tok.bos().unwrap().id;
    let example = Example {
        input_ids: vec![bos, 10, 11, 12, 13, 20, 21, 22],
        labels: vec![
            IGNORE_INDEX,
            IGNORE_INDEX,
            IGNORE_INDEX,
            IGNORE_INDEX,
            IGNORE_INDEX,
            20,
            21,
            22,
        ],
    };
    // Fits: untouched.
    assert_eq!(
        fit_to_length(example.clone(), &config(8), Some(bos)),
        Fitted::Kept(example.clone())
    );
    // Three too many: the oldest prompt tokens go, BOS stays.
    let Fitted::Truncated(cut) = fit_to_length(example.clone(), &config(5), Some(bos)) else {
        panic!()
    };
    assert_eq!(cut.input_ids, vec![bos, 13, 20, 21, 22]);
    assert_eq!(cut.labels, vec![IGNORE_INDEX, IGNORE_INDEX, 20, 21, 22]);
    // The whole prompt after BOS goes, then the end of the response.
    let Fitted::Truncated(cut) = fit_to_length(example.clone(), &config(3), Some(bos)) else {
        panic!()
    };
    assert_eq!(cut.input_ids, vec![bos, 20, 21]);
    assert_eq!(cut.labels, vec![IGNORE_INDEX, 20, 21]);
    // Only BOS fits: no response token is left.
    assert_eq!(
        fit_to_length(example.clone(), &config(1), Some(bos)),
        Fitted::TooLong
    );
    // Skip policy.
    let skip = DataConfig {
        max_seq_len: 5,
        overflow: Overflow::Skip,
    };
    assert_eq!(fit_to_length(example, &skip, Some(bos)), Fitted::TooLong);
}

#[test]
fn truncated_and_skipped_examples_are_counted() {
    let tok = tokenizer();
    let dir = TempDir::new("stats");
    let long = "one two three four five six seven eight nine ten ".repeat(4);
    let text = format!(
        "{}\n\n{}\n   \n{}\n",
        r#"{"instruction": "hi", "output": "yes"}"#,
        serde_json::json!({"instruction": long, "output": "no"}),
        r#"{"instruction": "hello", "output": "true"}"#,
    );
    let path = dir.write("stats.jsonl", &text);
    let max = 48;
    let data = load_jsonl(&path, &tok, &config(max)).unwrap();
    let s = &data.stats;
    assert_eq!(
        (s.lines, s.blank_lines, s.examples, s.truncated),
        (5, 2, 3, 1)
    );
    assert_eq!(s.skipped_too_long, 0);
    let cut = &data.examples[1];
    assert_eq!(cut.len(), max);
    assert_eq!(cut.input_ids[0], tok.bos().unwrap().id);
    assert_eq!(response_text(&tok, cut), "no</s>");
    assert!(data.examples.iter().all(|e| e.len() <= max));

    let skip = DataConfig {
        max_seq_len: max,
        overflow: Overflow::Skip,
    };
    let data = load_jsonl(&path, &tok, &skip).unwrap();
    let s = &data.stats;
    assert_eq!((s.examples, s.truncated, s.skipped_too_long), (2, 0, 1));
    assert_eq!(
        s.lines,
        s.blank_lines
            + s.examples
            + s.skipped_too_long
            + s.skipped_no_labels
            + s.skipped_long_lines
    );
    assert!(s.to_string().contains("1 skipped as too long"));
}

#[test]
fn padding_is_right_sided_with_mask_and_ignored_labels() {
    let a = Example {
        input_ids: vec![0, 5, 6],
        labels: vec![IGNORE_INDEX, 5, 6],
    };
    let b = Example {
        input_ids: vec![0, 7],
        labels: vec![IGNORE_INDEX, 7],
    };
    let pad = tokenizer().pad_id().unwrap();
    let batch = collate(&[a, b], pad).unwrap();
    assert_eq!((batch.batch_size, batch.seq_len), (2, 3));
    assert_eq!(batch.input_ids, vec![0, 5, 6, 0, 7, pad]);
    assert_eq!(
        batch.labels,
        vec![IGNORE_INDEX, 5, 6, IGNORE_INDEX, 7, IGNORE_INDEX]
    );
    assert_eq!(batch.attention_mask, vec![1, 1, 1, 1, 1, 0]);
    assert_eq!(batch.label_tokens(), 3);
    assert!(collate(&[], pad).is_err());
}

#[test]
fn packing_concatenates_up_to_max_len_without_cross_example_targets() {
    let ex = |n: u32| Example {
        input_ids: (0..n).collect(),
        labels: (0..n).map(i64::from).collect(),
    };
    let rows = pack(&[ex(3), ex(4), ex(2), ex(5)], 8).unwrap();
    let lens: Vec<usize> = rows.iter().map(Example::len).collect();
    assert_eq!(lens, vec![7, 7]);
    assert_eq!(rows[0].input_ids, vec![0, 1, 2, 0, 1, 2, 3]);
    // Each example's first label is ignored, so nothing predicts across a boundary.
    assert_eq!(
        rows[0].labels,
        vec![IGNORE_INDEX, 1, 2, IGNORE_INDEX, 1, 2, 3]
    );
    assert_eq!(
        rows[1].labels,
        vec![IGNORE_INDEX, 1, IGNORE_INDEX, 1, 2, 3, 4]
    );
    assert!(pack(&[ex(9)], 8).is_err());
}

#[test]
fn bad_lines_name_file_line_and_reason() {
    let tok = tokenizer();
    let dir = TempDir::new("bad");
    let good = r#"{"instruction": "a", "output": "b"}"#;
    let cases = [
        ("{oops", "invalid JSON"),
        ("[1, 2]", "expected a JSON object"),
        (r#"{"body": "x"}"#, "unknown shape"),
        (r#"{"text": 3}"#, "text line"),
        (r#"{"instruction": "a"}"#, "missing field `output`"),
        (
            r#"{"question": "q", "choices": ["x", "y"], "answer": 2}"#,
            "out of range",
        ),
        (
            r#"{"question": "q", "choices": ["x", "y"], "answer": "maybe"}"#,
            "letter",
        ),
        (
            r#"{"messages": [{"role": "user", "content": "hi"}]}"#,
            "no assistant",
        ),
        (
            r#"{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}]}"#,
            "roles must alternate",
        ),
    ];
    for (i, (line, reason)) in cases.into_iter().enumerate() {
        let path = dir.write(
            &format!("bad{i}.jsonl"),
            &format!("{good}\n\n{line}\n{good}\n"),
        );
        match load_jsonl(&path, &tok, &config(64)) {
            Err(err @ Error::Dataset { .. }) => {
                let Error::Dataset {
                    path: p,
                    line: n,
                    reason: r,
                } = &err
                else {
                    unreachable!()
                };
                assert_eq!((p, *n), (&path, 3), "{line}");
                assert!(r.contains(reason), "{r:?} lacks {reason:?}");
                assert!(err
                    .to_string()
                    .starts_with(&format!("{}:3: ", path.display())));
            }
            other => panic!("{line}: expected a dataset error, got {other:?}"),
        }
    }
    let path = dir.write("utf8.jsonl", "");
    std::fs::write(&path, b"\xff\xfe\n").unwrap();
    assert!(matches!(
        load_jsonl(&path, &tok, &config(64)),
        Err(Error::Dataset { line: 1, .. })
    ));
    assert!(matches!(
        load_jsonl(dir.0.join("missing.jsonl"), &tok, &config(64)),
        Err(Error::Io { .. })
    ));
}

#[test]
fn text_lines_learn_every_token_but_bos() {
    // {"text": ...}: continued pretraining and perplexity; every token after BOS is a label,
    // EOS appended, and an empty text is an error naming the line.
    let tok = tokenizer();
    let dir = TempDir::new("text");
    let path = dir.write(
        "text.jsonl",
        concat!(r#"{"text": "The sky is blue.\nHello world"}"#, "\n"),
    );
    let data = load_jsonl(&path, &tok, &config(512)).unwrap();
    let ex = &data.examples[0];
    let ids = tok.encode("The sky is blue.\nHello world", true).unwrap();
    assert_eq!(ex.input_ids[..ids.len()], ids[..]);
    assert_eq!(ex.labels[0], IGNORE_INDEX, "BOS is not predicted");
    assert!(ex.labels[1..]
        .iter()
        .zip(&ex.input_ids[1..])
        .all(|(&l, &id)| l == i64::from(id)));
    assert_eq!(response_text(&tok, ex), "The sky is blue.\nHello world</s>");
    let bad = dir.write("bad.jsonl", "{\"text\": \"ok\"}\n{\"text\": \"  \"}\n");
    match load_jsonl(&bad, &tok, &config(512)) {
        Err(Error::Dataset {
            line: 2, reason, ..
        }) => assert!(reason.contains("empty"), "{reason}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_txt_file_is_one_document_cut_into_blocks() {
    // Continued pretraining on a .txt file: BOS + the whole text + EOS, in blocks of max_seq_len
    // tokens (the last one shorter), every token a label; `read_records` sees one text record.
    let tok = tokenizer();
    let dir = TempDir::new("txt");
    let text = "The sky is blue.\n\nHello world, hello sky.\nThe end.\n";
    let path = dir.write("book.txt", text);
    let data = load_jsonl(&path, &tok, &config(8)).unwrap();
    let mut want = tok.encode(text, true).unwrap();
    want.push(tok.eos().unwrap().id);
    let got: Vec<u32> = data
        .examples
        .iter()
        .flat_map(|e| e.input_ids.clone())
        .collect();
    assert_eq!(got, want);
    assert!(data.examples.iter().all(|e| e.len() <= 8));
    assert_eq!(data.examples.len(), want.len().div_ceil(8));
    for e in &data.examples {
        assert_eq!(
            e.labels[0], IGNORE_INDEX,
            "nothing before a block's first token"
        );
        assert!(e.labels[1..]
            .iter()
            .zip(&e.input_ids[1..])
            .all(|(&l, &id)| l == i64::from(id)));
    }
    assert_eq!((data.stats.lines, data.stats.blank_lines), (4, 1));
    let records = qlora::train::data::read_records(&path).unwrap();
    assert!(
        matches!(&records[..], [(1, qlora::train::data::Record::Text { text: t })] if t == text)
    );
    let empty = dir.write("empty.txt", " \n\n");
    assert!(matches!(
        load_jsonl(&empty, &tok, &config(8)),
        Err(Error::Dataset { line: 1, .. })
    ));
}
