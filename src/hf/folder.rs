//! Hugging Face model folders as `qlora merge` and `qlora quantize --model-dir` read and write
//! them: the checkpoint (`model.safetensors` or index + shards) memory-mapped, written back one
//! tensor at a time into size-bounded shards with `model.safetensors.index.json` (huggingface_hub's
//! split rule), `config.json` in transformers' JSON style, and the tokenizer files copied.

use std::borrow::Cow;
use std::cell::RefCell;
use std::fs;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::tensor::{Dtype, View};
use serde_json::{Map, Value};

use crate::hf::checkpoint::{map_file, shard_files, Checkpoint, INDEX_FILE, SINGLE_FILE};
use crate::hf::json::python_json;
use crate::{Error, Result};

/// The model config file of a folder.
pub const CONFIG_FILE: &str = "config.json";

/// Files besides the weights and config that a model folder carries and an output folder keeps:
/// the tokenizer (fast and sentencepiece), its config and chat template, and generation defaults.
pub const COPIED_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
];

/// huggingface_hub's default `max_shard_size` ("5GB", decimal units).
pub const DEFAULT_MAX_SHARD_BYTES: u64 = 5_000_000_000;

/// Parses a shard size as huggingface_hub's `parse_size_to_int` does ("5GB", "60KB", "1.5MB":
/// decimal KB/MB/GB/TB, case-insensitive), or a plain number of bytes.
pub fn parse_size(text: &str) -> Result<u64> {
    let text = text.trim();
    let bad = |why: &str| Error::invalid("parse_size", format!("{text:?}: {why}"));
    if let Ok(bytes) = text.parse::<u64>() {
        return Ok(bytes);
    }
    let split = text.len().saturating_sub(2);
    let (value, unit) = (
        text.get(..split).unwrap_or(""),
        text.get(split..).unwrap_or(""),
    );
    let multiplier = match unit.to_ascii_uppercase().as_str() {
        "KB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "TB" => 1e12,
        _ => return Err(bad("the unit is not KB, MB, GB or TB")),
    };
    let value: f64 = value
        .trim()
        .parse()
        .map_err(|_| bad("the value is not a number"))?;
    let bytes = value * multiplier;
    if !(bytes.is_finite() && bytes >= 1.0) {
        return Err(bad("the size must be at least one byte"));
    }
    Ok(bytes as u64)
}

/// A model folder opened for reading: its checkpoint files mapped.
pub struct ModelFolder {
    dir: PathBuf,
    files: Vec<PathBuf>,
    maps: Vec<Mmap>,
}

impl ModelFolder {
    /// Maps `dir`'s `model.safetensors`, or the shards its index names.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        let files = shard_files(&dir)?;
        let maps = files
            .iter()
            .map(|p| map_file(p))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { dir, files, maps })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The parsed safetensors headers and which shard holds each tensor.
    pub(crate) fn checkpoint(&self) -> Result<Checkpoint<'_>> {
        Checkpoint::new(&self.files, &self.maps)
    }

    /// The text of `config.json` (what it configures is for the layer that reads it:
    /// `model::config::read_folder_config` for a Llama).
    pub fn config_text(&self) -> Result<String> {
        let path = self.dir.join(CONFIG_FILE);
        fs::read_to_string(&path).map_err(|e| Error::io(&path, e))
    }
}

/// Where a tensor goes in transformers' state-dict order (embeddings, layers in order with
/// attention, MLP then norms, final norm, lm_head), which decides how shards are filled.
pub fn state_dict_order(name: &str) -> (u8, usize, u8) {
    const IN_LAYER: [&str; 9] = [
        "self_attn.q_proj.",
        "self_attn.k_proj.",
        "self_attn.v_proj.",
        "self_attn.o_proj.",
        "mlp.gate_proj.",
        "mlp.up_proj.",
        "mlp.down_proj.",
        "input_layernorm.",
        "post_attention_layernorm.",
    ];
    if name.starts_with("model.embed_tokens.") {
        return (0, 0, 0);
    }
    if let Some(rest) = name.strip_prefix("model.layers.") {
        if let Some((index, rest)) = rest.split_once('.') {
            if let Ok(index) = index.parse::<usize>() {
                let rank = IN_LAYER
                    .iter()
                    .position(|p| rest.starts_with(p))
                    .unwrap_or(IN_LAYER.len());
                return (1, index, rank as u8);
            }
        }
    }
    if name.starts_with("model.norm.") {
        (2, 0, 0)
    } else if name.starts_with("lm_head.") {
        (3, 0, 0)
    } else {
        (4, 0, 0)
    }
}

/// Every tensor name of `checkpoint`, in [`state_dict_order`] then by name.
pub(crate) fn ordered_names(checkpoint: &Checkpoint<'_>) -> Vec<String> {
    let mut names: Vec<String> = checkpoint.shard_of.keys().cloned().collect();
    names.sort_by(|a, b| {
        state_dict_order(a)
            .cmp(&state_dict_order(b))
            .then_with(|| a.cmp(b))
    });
    names
}

/// Bytes per element of a safetensors dtype (sub-byte dtypes are not written here).
pub fn dtype_bytes(dtype: Dtype) -> usize {
    (dtype.bitsize() / 8).max(1)
}

/// One tensor of an output checkpoint: its header now, its bytes when the writer reaches it.
pub struct OutTensor<'a> {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// The little-endian bytes; called once, while the shard holding the tensor is written.
    pub produce: Box<dyn Fn() -> Result<Vec<u8>> + 'a>,
}

impl OutTensor<'_> {
    pub fn byte_len(&self) -> usize {
        self.shape.iter().product::<usize>() * dtype_bytes(self.dtype)
    }
}

/// A safetensors view that produces its bytes when serialization asks for them, so a shard is
/// written with one tensor in memory. The first failure is kept and zeros stand in for the bytes;
/// the writer then deletes the file and returns the error.
struct LazyView<'t, 'a> {
    tensor: &'t OutTensor<'a>,
    failure: &'t RefCell<Option<Error>>,
}

impl View for LazyView<'_, '_> {
    fn dtype(&self) -> Dtype {
        self.tensor.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.tensor.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        let len = self.tensor.byte_len();
        if self.failure.borrow().is_some() {
            return Cow::Owned(vec![0; len]);
        }
        match (self.tensor.produce)() {
            Ok(bytes) if bytes.len() == len => Cow::Owned(bytes),
            Ok(bytes) => {
                *self.failure.borrow_mut() = Some(Error::BadTensor {
                    key: self.tensor.name.clone(),
                    reason: format!("produced {} bytes, the header says {len}", bytes.len()),
                });
                Cow::Owned(vec![0; len])
            }
            Err(e) => {
                *self.failure.borrow_mut() = Some(e);
                Cow::Owned(vec![0; len])
            }
        }
    }
    fn data_len(&self) -> usize {
        self.tensor.byte_len()
    }
}

/// What [`write_checkpoint`] wrote.
#[derive(Clone, Debug)]
pub struct WrittenCheckpoint {
    /// The safetensors files, in shard order.
    pub files: Vec<PathBuf>,
    /// Sum of the tensors' byte sizes (the index's `total_size`).
    pub total_bytes: u64,
}

/// Groups tensor byte sizes into shards as huggingface_hub's `split_state_dict_into_shards_factory`
/// does: in order, a new shard when the next tensor would push the current one past `max_bytes`,
/// and a tensor larger than `max_bytes` alone in a shard of its own.
pub fn plan_shards(sizes: &[usize], max_bytes: u64) -> Vec<Vec<usize>> {
    let mut shards: Vec<Vec<usize>> = Vec::new();
    let mut current: Vec<usize> = Vec::new();
    let mut current_bytes = 0u64;
    for (i, &size) in sizes.iter().enumerate() {
        let size = size as u64;
        if size > max_bytes {
            shards.push(vec![i]);
            continue;
        }
        if current_bytes + size > max_bytes && !current.is_empty() {
            shards.push(std::mem::take(&mut current));
            current_bytes = 0;
        }
        current.push(i);
        current_bytes += size;
    }
    if !current.is_empty() {
        shards.push(current);
    }
    shards
}

/// The weight a tensor belongs to: `m.weight` for `m.weight` and its state `m.weight.*`.
fn weight_owner(name: &str) -> &str {
    match name.find(".weight.") {
        Some(i) => &name[..i + ".weight".len()],
        None => name,
    }
}

/// Writes `tensors` (in state-dict order) into `dir` as transformers' `save_pretrained` would:
/// one `model.safetensors`, or `model-0000i-of-0000n.safetensors` shards of at most
/// `max_shard_bytes` each (see [`plan_shards`]; a weight and its quantization state count as one
/// tensor) plus `model.safetensors.index.json` with `total_parameters` (`parameters`) and
/// `total_size`. Each file carries safetensors metadata `{"format": "pt"}`. On an error, the
/// files written so far are removed.
pub fn write_checkpoint(
    dir: &Path,
    tensors: Vec<OutTensor<'_>>,
    max_shard_bytes: u64,
    parameters: u64,
) -> Result<WrittenCheckpoint> {
    if max_shard_bytes == 0 {
        return Err(Error::invalid(
            "write_checkpoint",
            "the shard size must be positive",
        ));
    }
    let total_bytes: u64 = tensors.iter().map(|t| t.byte_len() as u64).sum();
    // A weight and its quantization state (`m.weight.absmax`, ...) stay in one shard, so a
    // reader finds a module whole in the file that holds its weight.
    let mut units: Vec<Vec<usize>> = Vec::new();
    for (i, t) in tensors.iter().enumerate() {
        let owner = weight_owner(&t.name);
        match units.last_mut() {
            Some(unit) if weight_owner(&tensors[unit[0]].name) == owner => unit.push(i),
            _ => units.push(vec![i]),
        }
    }
    let unit_sizes: Vec<usize> = units
        .iter()
        .map(|u| u.iter().map(|&i| tensors[i].byte_len()).sum())
        .collect();
    let shards: Vec<Vec<usize>> = plan_shards(&unit_sizes, max_shard_bytes)
        .into_iter()
        .map(|shard| shard.iter().flat_map(|&u| units[u].clone()).collect())
        .collect();
    let n = shards.len();
    let names: Vec<String> = if n <= 1 {
        vec![SINGLE_FILE.to_string()]
    } else {
        (1..=n)
            .map(|i| format!("model-{i:05}-of-{n:05}.safetensors"))
            .collect()
    };
    let mut files = Vec::new();
    let mut weight_map = Map::new();
    let metadata = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    for (shard, file_name) in shards.iter().zip(&names) {
        let path = dir.join(file_name);
        let failure = RefCell::new(None);
        let views: Vec<(&str, LazyView<'_, '_>)> = shard
            .iter()
            .map(|&i| {
                weight_map.insert(tensors[i].name.clone(), Value::from(file_name.as_str()));
                (
                    tensors[i].name.as_str(),
                    LazyView {
                        tensor: &tensors[i],
                        failure: &failure,
                    },
                )
            })
            .collect();
        files.push(path.clone());
        let written = safetensors::serialize_to_file(views, Some(metadata.clone()), &path);
        let failed = match (written, failure.into_inner()) {
            (_, Some(e)) => Some(e),
            (Err(e), None) => Some(Error::encode(path.display().to_string(), e)),
            (Ok(()), None) => None,
        };
        if let Some(e) = failed {
            for f in &files {
                let _ = fs::remove_file(f);
            }
            return Err(e);
        }
        // safetensors writes through a 0600 temporary file; a model folder is for sharing.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(&path, fs::Permissions::from_mode(0o644))
                .map_err(|e| Error::io(&path, e))?;
        }
    }
    if n > 1 {
        let index = serde_json::json!({
            "metadata": {"total_parameters": parameters, "total_size": total_bytes},
            "weight_map": weight_map,
        });
        let path = dir.join(INDEX_FILE);
        fs::write(&path, python_json(&index)).map_err(|e| Error::io(&path, e))?;
    }
    Ok(WrittenCheckpoint { files, total_bytes })
}

/// Makes `out` ready for a new checkpoint: created if missing, refused when it is one of
/// `inputs` (its files are mapped while we write), and cleared of a previous checkpoint
/// (`model.safetensors`, shards, index) as `save_pretrained` clears stale shards.
pub fn prepare_output_dir(out: &Path, inputs: &[&Path]) -> Result<()> {
    fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let canonical = fs::canonicalize(out).map_err(|e| Error::io(out, e))?;
    for input in inputs {
        if fs::canonicalize(input).is_ok_and(|i| i == canonical) {
            return Err(Error::invalid(
                "output folder",
                format!(
                    "{} is also an input; write to another folder",
                    out.display()
                ),
            ));
        }
    }
    let entries = fs::read_dir(out).map_err(|e| Error::io(out, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(out, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name == SINGLE_FILE || name == INDEX_FILE || is_shard_name(&name) {
            fs::remove_file(entry.path()).map_err(|e| Error::io(entry.path(), e))?;
        }
    }
    Ok(())
}

/// `model-00001-of-00002.safetensors`.
fn is_shard_name(name: &str) -> bool {
    let Some(rest) = name
        .strip_prefix("model-")
        .and_then(|r| r.strip_suffix(".safetensors"))
    else {
        return false;
    };
    match rest.split_once("-of-") {
        Some((a, b)) => {
            !a.is_empty()
                && !b.is_empty()
                && a.bytes().all(|c| c.is_ascii_digit())
                && b.bytes().all(|c| c.is_ascii_digit())
        }
        None => false,
    }
}

/// Writes `config` to `dir/config.json` as transformers writes configs.
pub fn write_config(dir: &Path, config: &Map<String, Value>) -> Result<()> {
    let path = dir.join(CONFIG_FILE);
    fs::write(&path, python_json(&Value::Object(config.clone()))).map_err(|e| Error::io(&path, e))
}

/// Copies those of [`COPIED_FILES`] that `from` holds into `to`; returns their names.
pub fn copy_side_files(from: &Path, to: &Path) -> Result<Vec<String>> {
    let mut copied = Vec::new();
    for name in COPIED_FILES {
        let src = from.join(name);
        if src.is_file() {
            fs::copy(&src, to.join(name)).map_err(|e| Error::io(&src, e))?;
            copied.push(name.to_string());
        }
    }
    Ok(copied)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_as_huggingface_hub_does() {
        assert_eq!(parse_size("5GB").unwrap(), 5_000_000_000);
        assert_eq!(parse_size("60KB").unwrap(), 60_000);
        assert_eq!(parse_size(" 1.5mb ").unwrap(), 1_500_000);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("5GiB").is_err());
        assert!(parse_size("xGB").is_err());
        assert!(parse_size("0KB").is_err());
    }

    #[test]
    fn shards_split_like_huggingface_hub() {
        // huggingface_hub's docstring example: [6, 6, 2, 6, 2, 2] at 10 -> [6], [6+2], [6+2+2].
        assert_eq!(
            plan_shards(&[6, 6, 2, 6, 2, 2], 10),
            vec![vec![0], vec![1, 2], vec![3, 4, 5]]
        );
        // A tensor above the limit sits alone, and the shard being filled continues after it.
        assert_eq!(
            plan_shards(&[3, 20, 4, 5], 10),
            vec![vec![1], vec![0, 2], vec![3]]
        );
        assert!(plan_shards(&[], 10).is_empty());
    }

    fn tensor(name: &str, values: usize, fail: bool) -> OutTensor<'static> {
        let key = name.to_string();
        OutTensor {
            name: name.to_string(),
            dtype: Dtype::F32,
            shape: vec![values],
            produce: Box::new(move || {
                if fail {
                    Err(Error::MissingTensor { key: key.clone() })
                } else {
                    Ok(vec![0; values * 4])
                }
            }),
        }
    }

    #[test]
    fn a_failing_tensor_removes_the_shards_already_written() {
        let dir = std::env::temp_dir().join(format!("qlora-hf-folder-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        // Three shards of one tensor each; the third fails after two files exist.
        let tensors = vec![
            tensor("a.weight", 10, false),
            tensor("b.weight", 10, false),
            tensor("c.weight", 10, true),
        ];
        let err = write_checkpoint(&dir, tensors, 40, 30).unwrap_err();
        assert!(
            matches!(err, Error::MissingTensor { ref key } if key == "c.weight"),
            "{err}"
        );
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 0);

        let ok = vec![tensor("a.weight", 10, false), tensor("b.weight", 10, false)];
        let written = write_checkpoint(&dir, ok, 40, 20).unwrap();
        assert_eq!(written.files.len(), 2);
        assert_eq!(written.total_bytes, 80);
        let index: Value =
            serde_json::from_str(&fs::read_to_string(dir.join(INDEX_FILE)).unwrap()).unwrap();
        assert_eq!(
            index["weight_map"]["b.weight"],
            "model-00002-of-00002.safetensors"
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_weight_and_its_state_share_an_owner() {
        assert_eq!(weight_owner("m.q_proj.weight.absmax"), "m.q_proj.weight");
        assert_eq!(weight_owner("m.q_proj.weight"), "m.q_proj.weight");
        assert_eq!(weight_owner("m.norm.bias"), "m.norm.bias");
    }

    #[test]
    fn state_dict_order_puts_layers_numerically_between_embeddings_and_head() {
        let mut names = vec![
            "lm_head.weight",
            "model.layers.10.mlp.up_proj.weight",
            "model.layers.2.input_layernorm.weight",
            "model.layers.2.self_attn.q_proj.weight.absmax",
            "model.norm.weight",
            "model.embed_tokens.weight",
        ];
        names.sort_by_key(|n| (state_dict_order(n), n.to_string()));
        assert_eq!(
            names,
            [
                "model.embed_tokens.weight",
                "model.layers.2.self_attn.q_proj.weight.absmax",
                "model.layers.2.input_layernorm.weight",
                "model.layers.10.mlp.up_proj.weight",
                "model.norm.weight",
                "lm_head.weight",
            ]
        );
    }
}
