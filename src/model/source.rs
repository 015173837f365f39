//! A model on disk as the commands that rewrite one read it (`merge`, `export`, `quantize
//! --model-dir`): a Hugging Face folder or a llama.cpp GGUF file (docs/ARCHITECTURE.md, "Model
//! sources: GGUF").

use std::path::Path;

use serde_json::{Map, Value};

use crate::hf::folder::{copy_side_files, ModelFolder};
use crate::model::config::{read_folder_config, LlamaConfig};
use crate::model::gguf::{is_gguf, GgufFile};
use crate::Result;

/// A model given by path: a Hugging Face folder (dense or bitsandbytes NF4) or a llama.cpp GGUF
/// file (each tensor dequantized, Q/K rows in Hugging Face order), as `merge`, `export` and
/// `quantize --model-dir` read it.
pub enum ModelSource {
    Folder(ModelFolder),
    Gguf(GgufFile),
}

impl ModelSource {
    /// Opens `path`: a GGUF file when it starts with GGUF's magic bytes, else a model folder.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        if path.is_file() && is_gguf(path) {
            Ok(Self::Gguf(GgufFile::open(path)?))
        } else {
            Ok(Self::Folder(ModelFolder::open(path)?))
        }
    }

    /// The folder or file it was opened from.
    pub fn path(&self) -> &Path {
        match self {
            Self::Folder(f) => f.dir(),
            Self::Gguf(g) => g.path(),
        }
    }

    /// `config.json` as a JSON object (a GGUF file's built from its metadata) and validated.
    pub fn config(&self) -> Result<(Map<String, Value>, LlamaConfig)> {
        match self {
            Self::Folder(f) => read_folder_config(f),
            Self::Gguf(g) => {
                let mut raw = g.config_json()?;
                raw.insert(
                    "architectures".into(),
                    Value::from(vec!["LlamaForCausalLM"]),
                );
                Ok((raw, g.config()?))
            }
        }
    }

    /// The tokenizer (and generation) files of the base written into `out`: a folder's copied,
    /// a GGUF file's built from its metadata.
    pub fn write_side_files(&self, out: &Path) -> Result<Vec<String>> {
        match self {
            Self::Folder(f) => copy_side_files(f.dir(), out),
            Self::Gguf(g) => g.write_tokenizer_files(out),
        }
    }
}
