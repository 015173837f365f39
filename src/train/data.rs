//! JSONL datasets → `Example { input_ids, labels }` (labels `-100` on prompt tokens), fitted to
//! `max_seq_len`, then padded into `[batch, seq]` batches with an attention mask, or packed.
//!
//! Line shapes, recognised by their fields:
//! - instruction: `instruction`, optional `input`, `output`; the prompt is
//!   `"### Instruction:\n{instruction}\n\n[### Input:\n{input}\n\n]### Response:\n"`.
//! - chat: `messages: [{role, content}]`, rendered with the tokenizer's chat template.
//! - multiple-choice QA: `question`, `choices: [..]`, `answer` (0-based index or letter); the
//!   prompt is `"Question: {question}\nA. {choice}\nB. ...\nAnswer:"`, the response `" {letter}"`.
//! - plain text: `text`; no prompt, the loss on every token (continued pretraining, perplexity).
//!
//! A `.txt` file is read as one document instead: tokenized whole (BOS, text, EOS) and cut into
//! blocks of `max_seq_len` tokens, every token after a block's first learned.
//!
//! Tokens and labels: the whole rendered text is tokenized at once (so chat ids equal
//! transformers' `apply_chat_template(tokenize=True)`), and a token is a response token when its
//! byte range overlaps a response span. Instruction and QA texts are encoded with special tokens
//! (BOS from the post-processor) and get EOS appended as a response token. Chat texts are encoded
//! without them: the template writes BOS and each turn's end marker (EOS for Llama 2,
//! `<|eot_id|>` for Llama 3), which sits inside the assistant span and so is learned.
//!
//! Truncation ([`Overflow::Truncate`]): an example longer than `max_seq_len` first loses prompt
//! tokens from the left of the part before its first response token (a leading BOS is kept), and
//! if still too long is cut on the right (losing the end of the response, EOS included). An
//! example left without a response token is skipped. [`Overflow::Skip`] skips every over-long
//! example instead. Every skip and truncation is counted in [`DatasetStats`].
//!
//! A line longer than [`line_byte_limit`] is skipped before it is parsed or tokenized (counted in
//! [`DatasetStats::skipped_long_lines`]): tokenizing megabytes costs gigabytes, and such a line
//! holds far more than `max_seq_len` tokens (a JSON escape is at most 6 bytes for one character,
//! and no token covers more than [`Tokenizer::max_token_bytes`]), so it would be cut to a sliver
//! of itself or skipped anyway. (A line whose bulk sits in fields no record shape reads is
//! skipped too.)

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::model::tokenizer::{ChatMessage, Tokenizer};
use crate::{Error, Result};

/// The label of a token the loss ignores (prompt and padding), as in PyTorch and transformers.
pub const IGNORE_INDEX: i64 = -100;

/// One training sequence: `labels[i]` is `input_ids[i]` on response tokens, else [`IGNORE_INDEX`].
/// Labels are not shifted; the causal-LM loss shifts them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    pub input_ids: Vec<u32>,
    pub labels: Vec<i64>,
}

impl Example {
    pub fn len(&self) -> usize {
        self.input_ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.input_ids.is_empty()
    }

    /// Tokens that carry a loss.
    pub fn label_tokens(&self) -> usize {
        self.labels.iter().filter(|&&l| l != IGNORE_INDEX).count()
    }
}

/// What happens to an example longer than `max_seq_len`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overflow {
    /// Cut the prompt from the left (keeping BOS), then the response from the right.
    Truncate,
    /// Drop the example (counted in [`DatasetStats::skipped_too_long`]).
    Skip,
}

/// How dataset lines become examples.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataConfig {
    pub max_seq_len: usize,
    pub overflow: Overflow,
}

/// Counts for one loaded file; in a JSONL file every line is accounted for:
/// `lines == blank_lines + examples + skipped_too_long + skipped_no_labels + skipped_long_lines`.
/// A `.txt` file is one document cut into blocks: `lines` counts its lines, `examples` its
/// blocks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DatasetStats {
    pub lines: usize,
    pub blank_lines: usize,
    pub examples: usize,
    /// Examples kept after truncation (included in `examples`).
    pub truncated: usize,
    /// Over-long examples dropped under [`Overflow::Skip`], or left with no response token after
    /// truncation.
    pub skipped_too_long: usize,
    /// Examples whose response is empty even before truncation (e.g. a chat template that
    /// renders nothing for the assistant turns).
    pub skipped_no_labels: usize,
    /// Lines over [`line_byte_limit`], skipped unread.
    pub skipped_long_lines: usize,
    /// Tokens over all kept examples, and those of them carrying a loss.
    pub tokens: usize,
    pub label_tokens: usize,
}

impl fmt::Display for DatasetStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} lines: {} examples ({} truncated), {} skipped as too long, {} skipped without \
             response tokens, {} blank; {} tokens, {} with loss",
            self.lines,
            self.examples,
            self.truncated,
            self.skipped_too_long + self.skipped_long_lines,
            self.skipped_no_labels,
            self.blank_lines,
            self.tokens,
            self.label_tokens
        )
    }
}

/// A loaded dataset file.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub path: PathBuf,
    pub examples: Vec<Example>,
    pub stats: DatasetStats,
}

/// One parsed dataset line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    Instruction {
        instruction: String,
        input: String,
        output: String,
    },
    Chat {
        messages: Vec<ChatMessage>,
    },
    MultipleChoice {
        question: String,
        choices: Vec<String>,
        /// 0-based index into `choices`.
        answer: usize,
    },
    /// Plain text, every token learned.
    Text {
        text: String,
    },
}

#[derive(Deserialize)]
struct TextLine {
    text: String,
}

#[derive(Deserialize)]
struct InstructionLine {
    instruction: String,
    #[serde(default)]
    input: Option<String>,
    output: String,
}

#[derive(Deserialize)]
struct ChatLine {
    messages: Vec<ChatMessage>,
}

#[derive(Deserialize)]
struct ChoiceLine {
    question: String,
    choices: Vec<String>,
    answer: Answer,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Answer {
    Index(u64),
    Letter(String),
}

/// `A`, `B`, ... for choice `i` (at most 26 choices).
fn choice_letter(i: usize) -> char {
    char::from(b'A' + i as u8)
}

impl Record {
    /// Parses one JSON line; the error is the reason, without file and line.
    pub fn parse(line: &str) -> std::result::Result<Record, String> {
        let value: serde_json::Value =
            serde_json::from_str(line).map_err(|e| format!("invalid JSON: {e}"))?;
        let object = value
            .as_object()
            .ok_or_else(|| "expected a JSON object".to_string())?;
        let shape = |e: serde_json::Error, what: &str| format!("{what} line: {e}");
        if object.contains_key("messages") {
            let line: ChatLine = serde_json::from_value(value).map_err(|e| shape(e, "chat"))?;
            if !line.messages.iter().any(|m| m.role == "assistant") {
                return Err("chat line has no assistant message to learn from".into());
            }
            Ok(Record::Chat {
                messages: line.messages,
            })
        } else if object.contains_key("question") {
            let line: ChoiceLine =
                serde_json::from_value(value).map_err(|e| shape(e, "multiple-choice"))?;
            let n = line.choices.len();
            if n == 0 || n > 26 {
                return Err(format!("`choices` must hold 1 to 26 entries, got {n}"));
            }
            let answer = match &line.answer {
                Answer::Index(i) => usize::try_from(*i).unwrap_or(usize::MAX),
                Answer::Letter(s) => {
                    let upper = s.trim().to_ascii_uppercase();
                    match upper.as_bytes() {
                        [c @ b'A'..=b'Z'] => usize::from(c - b'A'),
                        _ => {
                            return Err(format!(
                                "`answer` must be a 0-based index or a letter, got {s:?}"
                            ))
                        }
                    }
                }
            };
            if answer >= n {
                return Err(format!(
                    "`answer` {} is out of range for {n} choices",
                    match line.answer {
                        Answer::Index(i) => i.to_string(),
                        Answer::Letter(s) => format!("{s:?}"),
                    }
                ));
            }
            Ok(Record::MultipleChoice {
                question: line.question,
                choices: line.choices,
                answer,
            })
        } else if object.contains_key("text") {
            let line: TextLine = serde_json::from_value(value).map_err(|e| shape(e, "text"))?;
            if line.text.trim().is_empty() {
                return Err("`text` is empty".into());
            }
            Ok(Record::Text { text: line.text })
        } else if object.contains_key("instruction") {
            let line: InstructionLine =
                serde_json::from_value(value).map_err(|e| shape(e, "instruction"))?;
            Ok(Record::Instruction {
                instruction: line.instruction,
                input: line.input.unwrap_or_default(),
                output: line.output,
            })
        } else {
            Err(
                "unknown shape: expected `instruction`/`output`, `messages`, \
                 `question`/`choices`/`answer`, or `text`"
                    .into(),
            )
        }
    }

    /// The full example, before fitting to a length. A chat template error is returned as
    /// [`Error::ChatTemplate`].
    pub fn tokenize(&self, tokenizer: &Tokenizer) -> Result<Example> {
        match self {
            Record::Instruction {
                instruction,
                input,
                output,
            } => {
                let prompt = if input.is_empty() {
                    format!("### Instruction:\n{instruction}\n\n### Response:\n")
                } else {
                    format!(
                        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
                    )
                };
                prompt_response(tokenizer, &prompt, output)
            }
            Record::MultipleChoice {
                question,
                choices,
                answer,
            } => {
                let mut prompt = format!("Question: {question}\n");
                for (i, choice) in choices.iter().enumerate() {
                    prompt.push_str(&format!("{}. {choice}\n", choice_letter(i)));
                }
                prompt.push_str("Answer:");
                prompt_response(tokenizer, &prompt, &format!(" {}", choice_letter(*answer)))
            }
            Record::Chat { messages } => chat_example(tokenizer, messages),
            Record::Text { text } => prompt_response(tokenizer, "", text),
        }
    }
}

/// `prompt + response` encoded with special tokens, EOS appended; loss on the response and EOS.
fn prompt_response(tokenizer: &Tokenizer, prompt: &str, response: &str) -> Result<Example> {
    let eos = tokenizer
        .eos()
        .ok_or_else(|| Error::Tokenizer("no eos token to end responses with".into()))?
        .id;
    let text = format!("{prompt}{response}");
    let mut example = label_spans(tokenizer, &text, true, &[(prompt.len(), text.len())])?;
    example.input_ids.push(eos);
    example.labels.push(i64::from(eos));
    Ok(example)
}

/// The conversation rendered once; each assistant turn's span is what rendering the turn adds
/// after the conversation before it with the generation prompt.
fn chat_example(tokenizer: &Tokenizer, messages: &[ChatMessage]) -> Result<Example> {
    let full = tokenizer.apply_chat_template(messages, false)?;
    let prefix_of_full = |part: String| -> Result<usize> {
        if full.starts_with(&part) {
            Ok(part.len())
        } else {
            Err(Error::ChatTemplate(
                "the template's rendering of a conversation prefix is not a prefix of the whole \
                 conversation, so assistant turns cannot be located"
                    .into(),
            ))
        }
    };
    let mut spans = Vec::new();
    for (i, message) in messages.iter().enumerate() {
        if message.role != "assistant" {
            continue;
        }
        let start = if i == 0 {
            0
        } else {
            prefix_of_full(tokenizer.apply_chat_template(&messages[..i], true)?)?
        };
        let end = prefix_of_full(tokenizer.apply_chat_template(&messages[..=i], false)?)?;
        spans.push((start, end.max(start)));
    }
    label_spans(tokenizer, &full, false, &spans)
}

/// Encodes `text`; a token is labelled when its byte range overlaps one of `spans` (so a token
/// straddling the prompt/response boundary is learned). Zero-width added tokens never are.
fn label_spans(
    tokenizer: &Tokenizer,
    text: &str,
    add_special_tokens: bool,
    spans: &[(usize, usize)],
) -> Result<Example> {
    let (input_ids, offsets) = tokenizer.encode_with_offsets(text, add_special_tokens)?;
    let labels = input_ids
        .iter()
        .zip(&offsets)
        .map(|(&id, &(start, end))| {
            let response = spans.iter().any(|&(s, e)| start < e && end > s);
            if response {
                i64::from(id)
            } else {
                IGNORE_INDEX
            }
        })
        .collect();
    Ok(Example { input_ids, labels })
}

/// How [`fit_to_length`] treated an example.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fitted {
    Kept(Example),
    Truncated(Example),
    /// Over-long under [`Overflow::Skip`], or no response token left after truncation.
    TooLong,
}

/// Applies the truncation policy (module docs). `bos` is the id kept at position 0 when the
/// example starts with it.
pub fn fit_to_length(example: Example, config: &DataConfig, bos: Option<u32>) -> Fitted {
    let max = config.max_seq_len;
    if example.len() <= max {
        return Fitted::Kept(example);
    }
    if config.overflow == Overflow::Skip {
        return Fitted::TooLong;
    }
    let Example {
        mut input_ids,
        mut labels,
    } = example;
    let keep = usize::from(bos.is_some() && input_ids.first() == bos.as_ref()).min(max);
    let first_response = labels
        .iter()
        .position(|&l| l != IGNORE_INDEX)
        .unwrap_or(labels.len());
    let excess = input_ids.len() - max;
    let cut = excess.min(first_response.saturating_sub(keep));
    input_ids.drain(keep..keep + cut);
    labels.drain(keep..keep + cut);
    input_ids.truncate(max);
    labels.truncate(max);
    if labels.iter().all(|&l| l == IGNORE_INDEX) {
        return Fitted::TooLong;
    }
    Fitted::Truncated(Example { input_ids, labels })
}

/// The longest line [`load_jsonl`] reads for `max_seq_len` with `tokenizer`: 6 bytes per character
/// (the longest JSON escape) times the bytes of the longest token times `max_seq_len`, and at
/// least 256 KiB. Anything longer holds more than `max_seq_len` tokens.
pub fn line_byte_limit(max_seq_len: usize, tokenizer: &Tokenizer) -> usize {
    (6 * tokenizer.max_token_bytes())
        .saturating_mul(max_seq_len)
        .max(256 << 10)
}

/// Reads a JSONL file into examples. A malformed line (bad UTF-8 or JSON, unknown shape, missing
/// field, chat template error) is an [`Error::Dataset`] naming the file and 1-based line.
pub fn load_jsonl(
    path: impl AsRef<Path>,
    tokenizer: &Tokenizer,
    config: &DataConfig,
) -> Result<Dataset> {
    let path = path.as_ref();
    if config.max_seq_len == 0 {
        return Err(Error::invalid(
            "load_jsonl",
            "max_seq_len must be at least 1",
        ));
    }
    if is_text_file(path) {
        return load_text(path, tokenizer, config);
    }
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let bos = tokenizer.bos().map(|t| t.id);
    let limit = line_byte_limit(config.max_seq_len, tokenizer);
    let mut stats = DatasetStats::default();
    let mut examples = Vec::new();
    let mut lines: Vec<&[u8]> = bytes.split(|&b| b == b'\n').collect();
    if lines.last().is_some_and(|l| l.is_empty()) {
        lines.pop();
    }
    for (index, raw) in lines.into_iter().enumerate() {
        let bad = |reason: String| Error::Dataset {
            path: path.to_path_buf(),
            line: index + 1,
            reason,
        };
        stats.lines += 1;
        if raw.len() > limit {
            stats.skipped_long_lines += 1;
            continue;
        }
        let line = std::str::from_utf8(raw).map_err(|e| bad(format!("invalid UTF-8: {e}")))?;
        if line.trim().is_empty() {
            stats.blank_lines += 1;
            continue;
        }
        let record = Record::parse(line).map_err(bad)?;
        let example = record.tokenize(tokenizer).map_err(|e| bad(e.to_string()))?;
        if example.label_tokens() == 0 {
            stats.skipped_no_labels += 1;
            continue;
        }
        let example = match fit_to_length(example, config, bos) {
            Fitted::Kept(example) => example,
            Fitted::Truncated(example) => {
                stats.truncated += 1;
                example
            }
            Fitted::TooLong => {
                stats.skipped_too_long += 1;
                continue;
            }
        };
        stats.examples += 1;
        stats.tokens += example.len();
        stats.label_tokens += example.label_tokens();
        examples.push(example);
    }
    Ok(Dataset {
        path: path.to_path_buf(),
        examples,
        stats,
    })
}

/// Whether `path` is a plain-text dataset (`.txt`) rather than JSONL.
pub fn is_text_file(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "txt")
}

/// The whole text of a `.txt` dataset, checked to be UTF-8 and not blank.
fn read_text(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let text = String::from_utf8(bytes).map_err(|e| Error::Dataset {
        path: path.to_path_buf(),
        line: 1 + e.as_bytes()[..e.utf8_error().valid_up_to()]
            .iter()
            .filter(|&&b| b == b'\n')
            .count(),
        reason: format!("invalid UTF-8: {}", e.utf8_error()),
    })?;
    if text.trim().is_empty() {
        return Err(Error::Dataset {
            path: path.to_path_buf(),
            line: 1,
            reason: "the text file is empty".into(),
        });
    }
    Ok(text)
}

/// A `.txt` dataset for continued pretraining: the whole file tokenized as one document (BOS
/// first, EOS last) and cut into blocks of `max_seq_len` tokens, every token after a block's
/// first learned, as transformers' `run_clm` groups texts (the last, shorter block kept).
fn load_text(path: &Path, tokenizer: &Tokenizer, config: &DataConfig) -> Result<Dataset> {
    let text = read_text(path)?;
    let document = Record::Text { text: text.clone() }.tokenize(tokenizer)?;
    let mut stats = DatasetStats {
        lines: text.lines().count(),
        blank_lines: text.lines().filter(|l| l.trim().is_empty()).count(),
        ..DatasetStats::default()
    };
    let examples: Vec<Example> = document
        .input_ids
        .chunks(config.max_seq_len)
        .map(|ids| Example {
            input_ids: ids.to_vec(),
            // A block's first token has nothing before it to be predicted from.
            labels: std::iter::once(IGNORE_INDEX)
                .chain(ids[1..].iter().map(|&id| i64::from(id)))
                .collect(),
        })
        .filter(|e| e.len() > 1)
        .collect();
    for e in &examples {
        stats.examples += 1;
        stats.tokens += e.len();
        stats.label_tokens += e.label_tokens();
    }
    Ok(Dataset {
        path: path.to_path_buf(),
        examples,
        stats,
    })
}

/// Row-major `[batch_size, seq_len]` training inputs, right-padded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    pub batch_size: usize,
    pub seq_len: usize,
    pub input_ids: Vec<u32>,
    /// [`IGNORE_INDEX`] on prompt and padding positions.
    pub labels: Vec<i64>,
    /// 1 on real tokens, 0 on padding.
    pub attention_mask: Vec<u8>,
}

impl Batch {
    /// Tokens that carry a loss (what gradient accumulation normalises by).
    pub fn label_tokens(&self) -> usize {
        self.labels.iter().filter(|&&l| l != IGNORE_INDEX).count()
    }
}

/// Pads `examples` on the right to the longest one with `pad_id` (mask 0, label -100).
pub fn collate(examples: &[Example], pad_id: u32) -> Result<Batch> {
    if examples.is_empty() {
        return Err(Error::invalid("collate", "no examples to batch"));
    }
    let seq_len = examples.iter().map(Example::len).max().unwrap_or(0);
    let size = examples.len() * seq_len;
    let mut batch = Batch {
        batch_size: examples.len(),
        seq_len,
        input_ids: Vec::with_capacity(size),
        labels: Vec::with_capacity(size),
        attention_mask: Vec::with_capacity(size),
    };
    for example in examples {
        let pad = seq_len - example.len();
        batch.input_ids.extend_from_slice(&example.input_ids);
        batch.input_ids.extend(std::iter::repeat_n(pad_id, pad));
        batch.labels.extend_from_slice(&example.labels);
        batch.labels.extend(std::iter::repeat_n(IGNORE_INDEX, pad));
        batch
            .attention_mask
            .extend(std::iter::repeat_n(1, example.len()));
        batch.attention_mask.extend(std::iter::repeat_n(0, pad));
    }
    Ok(batch)
}

/// Concatenates consecutive examples into rows of at most `max_seq_len` tokens (greedy, in
/// order; a row is closed when the next example does not fit).
///
/// Attention is NOT separated per example: a packed row is one causal sequence, so tokens of a
/// later example attend to the earlier examples in its row and positions run on across them. The
/// loss never crosses a boundary: each example's first label is set to -100, so no token is asked
/// to predict the first token of the next example.
pub fn pack(examples: &[Example], max_seq_len: usize) -> Result<Vec<Example>> {
    let mut rows: Vec<Example> = Vec::new();
    let mut row = Example {
        input_ids: Vec::new(),
        labels: Vec::new(),
    };
    for (i, example) in examples.iter().enumerate() {
        if example.len() > max_seq_len {
            return Err(Error::invalid(
                "pack",
                format!(
                    "example {i} has {} tokens, more than max_seq_len {max_seq_len}",
                    example.len()
                ),
            ));
        }
        if row.len() + example.len() > max_seq_len {
            rows.push(std::mem::replace(
                &mut row,
                Example {
                    input_ids: Vec::new(),
                    labels: Vec::new(),
                },
            ));
        }
        let start = row.len();
        row.input_ids.extend_from_slice(&example.input_ids);
        row.labels.extend_from_slice(&example.labels);
        if let Some(first) = row.labels.get_mut(start) {
            *first = IGNORE_INDEX;
        }
    }
    if !row.is_empty() {
        rows.push(row);
    }
    Ok(rows)
}

/// The kind of a [`Record`], for checking a dataset holds the shape the user named.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordKind {
    Instruction,
    Chat,
    MultipleChoice,
    Text,
}

impl Record {
    pub fn kind(&self) -> RecordKind {
        match self {
            Record::Instruction { .. } => RecordKind::Instruction,
            Record::Chat { .. } => RecordKind::Chat,
            Record::MultipleChoice { .. } => RecordKind::MultipleChoice,
            Record::Text { .. } => RecordKind::Text,
        }
    }
}

/// The records of a JSONL file with their 1-based line numbers, blank lines skipped. A malformed
/// line is an [`Error::Dataset`] naming the file and line, as in [`load_jsonl`].
pub fn read_records(path: impl AsRef<Path>) -> Result<Vec<(usize, Record)>> {
    let path = path.as_ref();
    if is_text_file(path) {
        return Ok(vec![(
            1,
            Record::Text {
                text: read_text(path)?,
            },
        )]);
    }
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let mut records = Vec::new();
    for (index, raw) in bytes.split(|&b| b == b'\n').enumerate() {
        let bad = |reason: String| Error::Dataset {
            path: path.to_path_buf(),
            line: index + 1,
            reason,
        };
        let line = std::str::from_utf8(raw).map_err(|e| bad(format!("invalid UTF-8: {e}")))?;
        if line.trim().is_empty() {
            continue;
        }
        records.push((index + 1, Record::parse(line).map_err(bad)?));
    }
    Ok(records)
}
