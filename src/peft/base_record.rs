//! `qlora_base.json` in an adapter folder: which frozen weights the adapter was trained against.
//! A QLoRA adapter learns its correction against the NF4-quantized base; merged into the original
//! dense weights it no longer fits them (measured on SmolLM2-135M: held-out accuracy 78% against
//! the NF4 base, see README). `qlora train` writes this record, `qlora merge` reads it and by
//! default merges into the weights training saw (docs/ARCHITECTURE.md, "Merging").

use std::fs;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::hf::file::parse_json;
use crate::peft::lora::write_atomic;
use crate::{Error, Result};

/// The record's file name in an adapter folder.
pub const BASE_RECORD_FILE: &str = "qlora_base.json";

/// How the base's seven linears per layer were stored while the adapter trained.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BaseLinears {
    /// Quantized to NF4 when loaded (`--quantize nf4` on a dense model).
    Nf4OnLoad,
    /// NF4 as stored in the model folder (bitsandbytes pre-quantized): merge reads it as stored.
    Nf4Stored,
    /// Dense, as stored.
    Dense,
}

/// The base an adapter was trained against.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BaseRecord {
    pub linears: BaseLinears,
    /// NF4 on load: the block size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blocksize: Option<usize>,
    /// NF4 on load: whether the scales were double-quantized.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub double_quant: Option<bool>,
    /// NF4 on load: the dtype the values were converted to before quantizing (`float32`,
    /// `bfloat16`), which decides the NF4 codes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantized_from: Option<String>,
    /// The model the run loaded, as it was given.
    pub model: String,
}

impl BaseRecord {
    /// Writes the record into the adapter folder `dir`.
    pub fn write(&self, dir: &Path) -> Result<()> {
        let json = serde_json::to_string_pretty(self)
            .map_err(|e| Error::encode(BASE_RECORD_FILE, e))?
            + "\n";
        write_atomic(dir, BASE_RECORD_FILE, json.as_bytes())
    }

    /// The record of the adapter folder `dir`, `None` when it has none (a PEFT adapter, or one
    /// from before qlora wrote records).
    pub fn read(dir: &Path) -> Result<Option<Self>> {
        let path = dir.join(BASE_RECORD_FILE);
        if !path.is_file() {
            return Ok(None);
        }
        let text = fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let record: BaseRecord = parse_json(&path, &text)?;
        if record.linears == BaseLinears::Nf4OnLoad
            && (record.blocksize.is_none() || record.quantized_from.is_none())
        {
            return Err(Error::CorruptFile {
                path,
                reason: "nf4-on-load needs `blocksize` and `quantized_from`".into(),
            });
        }
        Ok(Some(record))
    }
}
