//! A Hugging Face checkpoint on disk: `model.safetensors`, or the shards that
//! `model.safetensors.index.json` names, memory-mapped, with the parsed headers of every shard and
//! the shard that holds each tensor; tensors looked up by name through [`TensorSource`].

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use memmap2::Mmap;
use safetensors::tensor::{Dtype, TensorView};
use safetensors::{SafeTensorError, SafeTensors};
use serde::Deserialize;

use crate::{Error, Result};

/// The single-file checkpoint name.
pub const SINGLE_FILE: &str = "model.safetensors";
/// The shard index name.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// Where a module's NF4 tensors are looked up by name: one safetensors file, or every shard of a
/// checkpoint (a weight and its quantization state may sit in different shards, as
/// huggingface_hub splits a state dict by size alone).
pub trait TensorSource<'data> {
    /// The tensor `key`; [`Error::MissingTensor`] when no file holds it.
    fn tensor_view(&self, key: &str) -> Result<TensorView<'data>>;
}

impl<'data> TensorSource<'data> for SafeTensors<'data> {
    fn tensor_view(&self, key: &str) -> Result<TensorView<'data>> {
        self.tensor(key).map_err(|e| match e {
            SafeTensorError::TensorNotFound(_) => Error::MissingTensor {
                key: key.to_string(),
            },
            other => bad(key, other.to_string()),
        })
    }
}

/// The safetensors files of the checkpoint in `dir`, in index order.
pub(crate) fn shard_files(dir: &Path) -> Result<Vec<PathBuf>> {
    #[derive(Deserialize)]
    struct Index {
        weight_map: HashMap<String, String>,
    }
    let index_path = dir.join(INDEX_FILE);
    if !index_path.exists() {
        return Ok(vec![dir.join(SINGLE_FILE)]);
    }
    let text = std::fs::read_to_string(&index_path).map_err(|e| Error::io(&index_path, e))?;
    let index: Index = super::file::parse_json(&index_path, &text)?;
    let mut names: Vec<&String> = index.weight_map.values().collect();
    names.sort();
    names.dedup();
    names
        .into_iter()
        .map(|name| {
            let plain = Path::new(name)
                .file_name()
                .is_some_and(|f| f == name.as_str());
            if plain && dir.join(name).is_file() {
                Ok(dir.join(name))
            } else if plain {
                Err(Error::CorruptFile {
                    path: index_path.clone(),
                    reason: format!("names shard {name:?}, which is not in {}", dir.display()),
                })
            } else {
                Err(Error::invalid(
                    "LlamaWeights::load",
                    format!(
                        "{}: shard {name:?} is not a file name",
                        index_path.display()
                    ),
                ))
            }
        })
        .collect()
}

pub(crate) fn map_file(path: &Path) -> Result<Mmap> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    // SAFETY: the map is read-only and lives only while loading; like every safetensors reader
    // that maps, we rely on nobody truncating or rewriting the checkpoint file meanwhile.
    unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))
}

/// The parsed headers of every shard and which shard holds each tensor.
pub(crate) struct Checkpoint<'a> {
    files: Vec<PathBuf>,
    shards: Vec<SafeTensors<'a>>,
    pub(crate) shard_of: HashMap<String, usize>,
}

impl<'a> Checkpoint<'a> {
    /// The headers of `maps`, the mapped contents of `files` (which name them in errors).
    pub(crate) fn new(files: &[PathBuf], maps: &'a [Mmap]) -> Result<Self> {
        let shards = files
            .iter()
            .zip(maps)
            .map(|(path, m)| super::file::read_safetensors(path, m))
            .collect::<Result<Vec<_>>>()?;
        let mut shard_of = HashMap::new();
        for (i, shard) in shards.iter().enumerate() {
            for name in shard.names() {
                shard_of.insert(name.to_string(), i);
            }
        }
        Ok(Self {
            files: files.to_vec(),
            shards,
            shard_of,
        })
    }

    pub(crate) fn shard(&self, key: &str) -> Option<&SafeTensors<'a>> {
        self.shard_of.get(key).map(|&i| &self.shards[i])
    }

    /// The view of `key`, refused (naming its file) if it holds a NaN or ±Inf
    /// ([`super::file::check_finite`]).
    pub(crate) fn finite_view(&self, key: &str) -> Result<TensorView<'a>> {
        let view = self.view(key)?;
        if let Some(&i) = self.shard_of.get(key) {
            super::file::check_finite(&self.files[i], key, view.dtype(), view.data())?;
        }
        Ok(view)
    }

    pub(crate) fn view(&self, key: &str) -> Result<TensorView<'a>> {
        self.shard(key)
            .and_then(|st| st.tensor(key).ok())
            .ok_or_else(|| Error::MissingTensor {
                key: key.to_string(),
            })
    }
}

impl<'a> TensorSource<'a> for Checkpoint<'a> {
    fn tensor_view(&self, key: &str) -> Result<TensorView<'a>> {
        self.view(key)
    }
}

pub(crate) fn widen(dtype: Dtype, bytes: &[u8]) -> impl Iterator<Item = f32> + '_ {
    let width = dtype.bitsize() / 8;
    bytes.chunks_exact(width).map(move |b| match dtype {
        Dtype::F16 => f16::from_le_bytes([b[0], b[1]]).to_f32(),
        Dtype::BF16 => bf16::from_le_bytes([b[0], b[1]]).to_f32(),
        _ => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
    })
}

fn bad(key: &str, reason: impl Into<String>) -> Error {
    Error::BadTensor {
        key: key.to_string(),
        reason: reason.into(),
    }
}
