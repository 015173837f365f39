//! The model's tokenizer: `tokenizer.json` through the `tokenizers` crate, special tokens and the
//! chat template from `tokenizer_config.json` (or `chat_template.jinja`), and chat rendering with
//! minijinja configured as transformers configures Jinja2 (trim_blocks, lstrip_blocks).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use minijinja::value::{Kwargs, Value, ValueKind};
use minijinja::{Environment, ErrorKind, State};
use serde::Deserialize;

use crate::{Error, Result};

/// A token's `start..end` byte range in the encoded text.
pub type ByteRange = (usize, usize);

/// The name transformers picks when `chat_template` is a list of named templates.
const DEFAULT_TEMPLATE_NAME: &str = "default";

/// One turn of a conversation, as in a chat dataset line or transformers' `messages`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// A special token's text and its id in the vocabulary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecialToken {
    pub content: String,
    pub id: u32,
}

/// A Hugging Face tokenizer with its special tokens and chat templates.
#[derive(Debug, Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos: Option<SpecialToken>,
    eos: Option<SpecialToken>,
    pad: Option<SpecialToken>,
    unk: Option<SpecialToken>,
    /// Chat templates by name; a single-string `chat_template` is stored as `default`.
    chat_templates: BTreeMap<String, String>,
}

impl Tokenizer {
    /// Loads `tokenizer.json` and, when present, `tokenizer_config.json` from a model folder; a
    /// `chat_template.jinja` beside them (transformers v5 writes one) replaces the default template.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let config = dir.join("tokenizer_config.json");
        let config = config.is_file().then_some(config);
        let mut tokenizer = Self::from_files(dir.join("tokenizer.json"), config.as_deref())?;
        let jinja = dir.join("chat_template.jinja");
        if jinja.is_file() {
            let template = std::fs::read_to_string(&jinja).map_err(|e| Error::TokenizerFile {
                path: jinja.clone(),
                reason: e.to_string(),
            })?;
            tokenizer
                .chat_templates
                .insert(DEFAULT_TEMPLATE_NAME.to_string(), template);
        }
        Ok(tokenizer)
    }

    /// Loads a `tokenizer.json` and an optional `tokenizer_config.json`.
    pub fn from_files(
        tokenizer_json: impl AsRef<Path>,
        config_json: Option<&Path>,
    ) -> Result<Self> {
        let path = tokenizer_json.as_ref();
        let bytes = std::fs::read(path).map_err(|e| Error::TokenizerFile {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        let inner =
            tokenizers::Tokenizer::from_bytes(&bytes).map_err(|e| Error::TokenizerFile {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })?;
        let config = match config_json {
            Some(path) => TokenizerConfig::read(path)?,
            None => TokenizerConfig::default(),
        };
        let config_path = config_json.map(Path::to_path_buf).unwrap_or_default();
        let special = |token: Option<TokenText>| -> Result<Option<SpecialToken>> {
            let Some(token) = token else { return Ok(None) };
            let content = token.content();
            let id = inner
                .token_to_id(&content)
                .ok_or_else(|| Error::TokenizerFile {
                    path: config_path.clone(),
                    reason: format!("special token `{content}` is not in the vocabulary"),
                })?;
            Ok(Some(SpecialToken { content, id }))
        };
        Ok(Tokenizer {
            bos: special(config.bos_token)?,
            eos: special(config.eos_token)?,
            pad: special(config.pad_token)?,
            unk: special(config.unk_token)?,
            chat_templates: config
                .chat_template
                .map(ChatTemplates::into_map)
                .unwrap_or_default(),
            inner,
        })
    }

    /// Wraps a tokenizer built in code (no files, no chat template); the special tokens are named
    /// by their text and must be in its vocabulary.
    pub fn from_tokenizer(
        inner: tokenizers::Tokenizer,
        bos: Option<&str>,
        eos: Option<&str>,
        pad: Option<&str>,
        unk: Option<&str>,
    ) -> Result<Self> {
        let special = |content: Option<&str>| -> Result<Option<SpecialToken>> {
            let Some(content) = content else {
                return Ok(None);
            };
            let id = inner.token_to_id(content).ok_or_else(|| {
                Error::Tokenizer(format!(
                    "special token `{content}` is not in the vocabulary"
                ))
            })?;
            Ok(Some(SpecialToken {
                content: content.to_string(),
                id,
            }))
        };
        Ok(Tokenizer {
            bos: special(bos)?,
            eos: special(eos)?,
            pad: special(pad)?,
            unk: special(unk)?,
            chat_templates: BTreeMap::new(),
            inner,
        })
    }

    /// This tokenizer with `template` as its default chat template (a GGUF file's
    /// `tokenizer.chat_template`).
    pub fn with_chat_template(mut self, template: impl Into<String>) -> Self {
        self.chat_templates
            .insert(DEFAULT_TEMPLATE_NAME.to_string(), template.into());
        self
    }

    /// Token ids of `text`; `add_special_tokens` runs the post-processor (e.g. prepends BOS), as
    /// transformers' `encode` does.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Token ids of `text` with each token's byte range in `text` (added special tokens get an
    /// empty range).
    pub fn encode_with_offsets(
        &self,
        text: &str,
        add_special_tokens: bool,
    ) -> Result<(Vec<u32>, Vec<ByteRange>)> {
        let encoding = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok((encoding.get_ids().to_vec(), encoding.get_offsets().to_vec()))
    }

    /// The text of `ids`; `skip_special_tokens` drops special tokens as transformers does.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| Error::Tokenizer(e.to_string()))
    }

    /// Vocabulary size including added tokens (transformers' `len(tokenizer)`).
    /// The longest token's text in bytes, as the vocabulary spells it (byte-level and
    /// SentencePiece spellings take at least as many bytes as the text the token covers): no
    /// token covers more of an input than this.
    pub fn max_token_bytes(&self) -> usize {
        self.inner
            .get_vocab(true)
            .keys()
            .map(String::len)
            .max()
            .unwrap_or(1)
            .max(1)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn bos(&self) -> Option<&SpecialToken> {
        self.bos.as_ref()
    }

    pub fn eos(&self) -> Option<&SpecialToken> {
        self.eos.as_ref()
    }

    pub fn pad(&self) -> Option<&SpecialToken> {
        self.pad.as_ref()
    }

    pub fn unk(&self) -> Option<&SpecialToken> {
        self.unk.as_ref()
    }

    /// The id that fills padded positions: the pad token, else EOS (the usual choice for Llama 3,
    /// which ships no pad token). Padded positions are masked out and carry label -100.
    pub fn pad_id(&self) -> Result<u32> {
        self.pad
            .as_ref()
            .or(self.eos.as_ref())
            .map(|t| t.id)
            .ok_or_else(|| Error::Tokenizer("no pad or eos token to pad with".into()))
    }

    /// The chat template transformers would use (the one named `default`).
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template_named(DEFAULT_TEMPLATE_NAME)
    }

    /// A template from a list of named templates (`tool_use`, `rag`, ...).
    pub fn chat_template_named(&self, name: &str) -> Option<&str> {
        self.chat_templates.get(name).map(String::as_str)
    }

    /// Renders `messages` with the default chat template, as transformers'
    /// `apply_chat_template(messages, tokenize=False, add_generation_prompt=...)`. The result is
    /// tokenized with `encode(text, false)`: the template writes its own special tokens.
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let template = self.chat_template().ok_or_else(|| {
            Error::ChatTemplate("the tokenizer has no (default) chat_template".into())
        })?;
        self.render_chat_template(template, messages, add_generation_prompt)
    }

    /// Renders `messages` with the given template source and this tokenizer's special tokens.
    pub fn render_chat_template(
        &self,
        template: &str,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let env = chat_environment();
        let template = env
            .template_from_str(template)
            .map_err(|e| Error::ChatTemplate(e.to_string()))?;
        let messages: Vec<Value> = messages
            .iter()
            .map(|m| {
                Value::from_pairs([
                    ("role", Value::from(m.role.as_str())),
                    ("content", Value::from(m.content.as_str())),
                ])
            })
            .collect();
        let token = |t: &Option<SpecialToken>| match t {
            Some(t) => Value::from(t.content.as_str()),
            None => Value::from(()),
        };
        let context = Value::from_pairs([
            ("messages", Value::from(messages)),
            ("add_generation_prompt", Value::from(add_generation_prompt)),
            ("bos_token", token(&self.bos)),
            ("eos_token", token(&self.eos)),
            ("pad_token", token(&self.pad)),
            ("unk_token", token(&self.unk)),
        ]);
        template.render(context).map_err(|e| {
            // raise_exception's message alone, as Jinja2's TemplateError carries it.
            match (e.kind(), e.detail()) {
                (ErrorKind::InvalidOperation, Some(detail)) => {
                    Error::ChatTemplate(detail.to_string())
                }
                _ => Error::ChatTemplate(e.to_string()),
            }
        })
    }
}

/// The parts of `tokenizer_config.json` we use; everything else is ignored.
#[derive(Debug, Default, Deserialize)]
struct TokenizerConfig {
    bos_token: Option<TokenText>,
    eos_token: Option<TokenText>,
    pad_token: Option<TokenText>,
    unk_token: Option<TokenText>,
    chat_template: Option<ChatTemplates>,
}

impl TokenizerConfig {
    fn read(path: &Path) -> Result<Self> {
        let bad = |reason: String| Error::TokenizerFile {
            path: PathBuf::from(path),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
        serde_json::from_str(&text).map_err(|e| bad(e.to_string()))
    }
}

/// A special token is written either as its text or as a serialized `AddedToken`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum TokenText {
    Text(String),
    Added { content: String },
}

impl TokenText {
    fn content(self) -> String {
        match self {
            TokenText::Text(s) | TokenText::Added { content: s } => s,
        }
    }
}

/// `chat_template` is one template or a list of `{name, template}`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum ChatTemplates {
    One(String),
    Named(Vec<NamedTemplate>),
}

#[derive(Debug, Deserialize)]
struct NamedTemplate {
    name: String,
    template: String,
}

impl ChatTemplates {
    fn into_map(self) -> BTreeMap<String, String> {
        match self {
            ChatTemplates::One(t) => BTreeMap::from([(DEFAULT_TEMPLATE_NAME.to_string(), t)]),
            ChatTemplates::Named(list) => list.into_iter().map(|t| (t.name, t.template)).collect(),
        }
    }
}

/// The environment transformers renders chat templates in: trim_blocks and lstrip_blocks,
/// loop controls, `raise_exception`, a `tojson` that writes what Python's `json.dumps` writes, and
/// the Python string and dict methods templates call (`.strip()`, `.items()`, ...).
fn chat_environment() -> Environment<'static> {
    let mut env = Environment::new();
    let syntax = minijinja::syntax::SyntaxConfig::builder()
        .trim_blocks(true)
        .lstrip_blocks(true)
        .build();
    // The builder only fails on custom delimiters, which we do not set.
    if let Ok(syntax) = syntax {
        env.set_syntax(syntax);
    }
    env.add_function(
        "raise_exception",
        |message: String| -> Result<Value, minijinja::Error> {
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
        },
    );
    env.add_filter("tojson", tojson);
    env.set_unknown_method_callback(python_method);
    env
}

/// `json.dumps(value, ensure_ascii=False, indent=indent)`: `", "` and `": "` separators on one
/// line, or one item per line indented by `indent` spaces (then `","` ends a line).
fn tojson(value: &Value, kwargs: Kwargs) -> Result<Value, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    kwargs.assert_all_used()?;
    let mut out = String::new();
    write_json(&mut out, value, indent, 0)?;
    Ok(Value::from_safe_string(out))
}

fn write_json(
    out: &mut String,
    value: &Value,
    indent: Option<usize>,
    depth: usize,
) -> Result<(), minijinja::Error> {
    let newline = |out: &mut String, depth: usize| {
        if let Some(width) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(width * depth));
        }
    };
    let item_sep = if indent.is_some() { "," } else { ", " };
    match value.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::Number => match value.as_i64() {
            Some(i) => {
                let _ = write!(out, "{i}");
            }
            None => {
                let f = f64::try_from(value.clone())?;
                out.push_str(&serde_json::to_string(&f).map_err(json_error)?);
            }
        },
        ValueKind::String => {
            let s = value.as_str().unwrap_or_default();
            out.push_str(&serde_json::to_string(s).map_err(json_error)?);
        }
        ValueKind::Map => {
            let keys: Vec<Value> = value.try_iter()?.collect();
            if keys.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            out.push('{');
            for (i, key) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                let key_text = key.as_str().map(str::to_string).unwrap_or(key.to_string());
                out.push_str(&serde_json::to_string(&key_text).map_err(json_error)?);
                out.push_str(": ");
                write_json(out, &value.get_item(key)?, indent, depth + 1)?;
            }
            newline(out, depth);
            out.push('}');
        }
        _ => {
            let items: Vec<Value> = value.try_iter()?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                write_json(out, item, indent, depth + 1)?;
            }
            newline(out, depth);
            out.push(']');
        }
    }
    Ok(())
}

fn json_error(e: serde_json::Error) -> minijinja::Error {
    minijinja::Error::new(ErrorKind::InvalidOperation, e.to_string())
}

/// Python `str` and `dict` methods that chat templates call and minijinja lacks.
fn python_method(
    _state: &mut State,
    value: &Value,
    method: &str,
    args: &[Value],
) -> Result<Value, minijinja::Error> {
    let arg = |i: usize| args.get(i).and_then(Value::as_str);
    let unknown = || minijinja::Error::from(ErrorKind::UnknownMethod);
    if let Some(s) = value.as_str() {
        let chars: Option<Vec<char>> = arg(0).map(|c| c.chars().collect());
        let is_strip = |c: char| match &chars {
            Some(set) => set.contains(&c),
            None => c.is_whitespace(),
        };
        return Ok(match method {
            "strip" => Value::from(s.trim_matches(is_strip)),
            "lstrip" => Value::from(s.trim_start_matches(is_strip)),
            "rstrip" => Value::from(s.trim_end_matches(is_strip)),
            "upper" => Value::from(s.to_uppercase()),
            "lower" => Value::from(s.to_lowercase()),
            "startswith" => Value::from(s.starts_with(arg(0).ok_or_else(unknown)?)),
            "endswith" => Value::from(s.ends_with(arg(0).ok_or_else(unknown)?)),
            "replace" => {
                let (from, to) = (arg(0).ok_or_else(unknown)?, arg(1).ok_or_else(unknown)?);
                Value::from(s.replace(from, to))
            }
            "split" => match arg(0) {
                Some(sep) => s.split(sep).map(Value::from).collect(),
                None => s.split_whitespace().map(Value::from).collect(),
            },
            _ => return Err(unknown()),
        });
    }
    if value.kind() == ValueKind::Map {
        let keys = || value.try_iter();
        return Ok(match method {
            "keys" => keys()?.collect(),
            "values" => keys()?
                .map(|k| value.get_item(&k))
                .collect::<Result<Vec<_>, _>>()?
                .into(),
            "items" => keys()?
                .map(|k| Ok(Value::from(vec![k.clone(), value.get_item(&k)?])))
                .collect::<Result<Vec<Value>, minijinja::Error>>()?
                .into(),
            "get" => {
                let key = args.first().ok_or_else(unknown)?;
                let found = value.get_item(key)?;
                if found.is_undefined() {
                    args.get(1).cloned().unwrap_or(Value::from(()))
                } else {
                    found
                }
            }
            _ => return Err(unknown()),
        });
    }
    Err(unknown())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(source: &str) -> Result<String> {
        let env = chat_environment();
        let template = env
            .template_from_str(source)
            .map_err(|e| Error::ChatTemplate(e.to_string()))?;
        let message = Value::from_pairs([("role", "user"), ("content", " hi \"you\"\n")]);
        template
            .render(Value::from_pairs([("m", message)]))
            .map_err(|e| Error::ChatTemplate(e.to_string()))
    }

    #[test]
    fn tojson_writes_python_json_dumps() {
        assert_eq!(
            render("{{ m | tojson }}").unwrap(),
            r#"{"role": "user", "content": " hi \"you\"\n"}"#
        );
        assert_eq!(
            render("{{ [1, 2.5, none, true] | tojson(indent=2) }}").unwrap(),
            "[\n  1,\n  2.5,\n  null,\n  true\n]"
        );
    }

    #[test]
    fn python_string_and_dict_methods() {
        assert_eq!(render("[{{ m.content.strip() }}]").unwrap(), "[hi \"you\"]");
        assert_eq!(
            render("[{{ m.content.rstrip() }}]").unwrap(),
            "[ hi \"you\"]"
        );
        assert_eq!(render("{{ 'xxaxx'.strip('x') }}").unwrap(), "a");
        assert_eq!(render("{{ m.role.upper() }}").unwrap(), "USER");
        assert_eq!(render("{{ m.role.startswith('us') }}").unwrap(), "True");
        assert_eq!(
            render("{% for k, v in m.items() %}{{ k }};{% endfor %}").unwrap(),
            "role;content;"
        );
        assert_eq!(render("{{ m.get('nope', 'd') }}").unwrap(), "d");
        assert!(render("{{ m.role.frobnicate() }}").is_err());
    }
}
