//! Reading a file as safetensors or JSON with errors that name it: [`Error::CorruptFile`] with the
//! path, and for a safetensors header whose offsets disagree with a tensor's shape and dtype, the
//! tensor (the `safetensors` crate's own error names neither).

use std::collections::HashMap;
use std::path::Path;

use safetensors::{Dtype, SafeTensorError, SafeTensors};
use serde::de::DeserializeOwned;

use crate::{Error, Result};

/// `bytes` (the contents of `path`) parsed as a safetensors file.
pub fn read_safetensors<'a>(path: &Path, bytes: &'a [u8]) -> Result<SafeTensors<'a>> {
    SafeTensors::deserialize(bytes).map_err(|e| corrupt_safetensors(path, bytes, e))
}

/// The error for `bytes` of `path` that the safetensors reader refused with `e`: the file, what
/// is wrong in plain words, and the tensor when one is to blame.
pub fn corrupt_safetensors(path: &Path, bytes: &[u8], e: SafeTensorError) -> Error {
    let reason = match &e {
        SafeTensorError::HeaderTooSmall | SafeTensorError::InvalidHeaderLength => format!(
            "not a safetensors file, or truncated ({} bytes; the header length says {})",
            bytes.len(),
            header_len(bytes).map_or("nothing".to_string(), |n| format!("{n} bytes"))
        ),
        SafeTensorError::HeaderTooLarge => format!(
            "not a safetensors file: its header length ({} bytes) is over the 100 MB limit",
            header_len(bytes).unwrap_or(0)
        ),
        SafeTensorError::InvalidHeader(_) | SafeTensorError::InvalidHeaderDeserialization(_) => {
            format!("the safetensors header is not valid JSON ({e})")
        }
        SafeTensorError::MetadataIncompleteBuffer | SafeTensorError::TensorInvalidInfo => {
            match first_bad_tensor(bytes) {
                Some(detail) => format!("{e}: {detail}"),
                None => format!("{e} (the file is {} bytes; truncated?)", bytes.len()),
            }
        }
        _ => e.to_string(),
    };
    Error::CorruptFile {
        path: path.to_path_buf(),
        reason,
    }
}

/// `data` serialized as a safetensors file whose bytes depend only on its contents: the
/// `safetensors` crate writes the `__metadata__` map in `HashMap` order, which changes from run to
/// run, so its entries are put in sorted order (the rest of the header is already deterministic
/// and stays as the crate, and PEFT through it, writes it). `what` names the file in errors.
pub fn serialize_safetensors<S, V, I>(
    what: &str,
    data: I,
    metadata: Option<HashMap<String, String>>,
) -> Result<Vec<u8>>
where
    S: AsRef<str> + Ord + std::fmt::Display,
    V: safetensors::View,
    I: IntoIterator<Item = (S, V)>,
{
    const PREFIX: &[u8] = b"{\"__metadata__\":";
    let mut bytes = safetensors::serialize(data, metadata).map_err(|e| Error::encode(what, e))?;
    let n = header_len(&bytes)
        .and_then(|n| usize::try_from(n).ok())
        .filter(|&n| bytes.len() >= 8 + n)
        .ok_or_else(|| Error::encode(what, "the serializer wrote no header"))?;
    let header = &mut bytes[8..8 + n];
    if !header.starts_with(PREFIX) {
        return Ok(bytes);
    }
    let start = PREFIX.len();
    let mut values = serde_json::Deserializer::from_slice(&header[start..])
        .into_iter::<std::collections::BTreeMap<String, String>>();
    let sorted = match values.next() {
        Some(Ok(map)) => serde_json::to_vec(&map).map_err(|e| Error::encode(what, e))?,
        _ => {
            return Err(Error::encode(
                what,
                "unreadable __metadata__ in the written header",
            ))
        }
    };
    // The same entries in another order take the same bytes.
    if sorted.len() != values.byte_offset() {
        return Err(Error::encode(
            what,
            "the sorted __metadata__ changed length",
        ));
    }
    header[start..start + sorted.len()].copy_from_slice(&sorted);
    Ok(bytes)
}

/// The environment variable that lets tensors with NaN or ±Inf values load (refused otherwise).
pub const ALLOW_NON_FINITE_ENV: &str = "QLORA_ALLOW_NON_FINITE";

/// The first NaN or ±Inf among `bytes` read as little-endian `dtype` values: its index and value.
/// Integer and 8-bit float dtypes are not checked (None).
pub fn first_non_finite(dtype: Dtype, bytes: &[u8]) -> Option<(usize, f64)> {
    // A float is NaN or infinite exactly when its exponent bits are all ones.
    fn scan<const N: usize>(
        bytes: &[u8],
        exp: u64,
        value: fn([u8; N]) -> f64,
    ) -> Option<(usize, f64)> {
        bytes.chunks_exact(N).enumerate().find_map(|(i, c)| {
            let b: [u8; N] = c.try_into().ok()?;
            let mut word = [0u8; 8];
            word[..N].copy_from_slice(&b);
            (u64::from_le_bytes(word) & exp == exp).then(|| (i, value(b)))
        })
    }
    match dtype {
        Dtype::BF16 => scan::<2>(bytes, 0x7f80, |b| half::bf16::from_le_bytes(b).to_f64()),
        Dtype::F16 => scan::<2>(bytes, 0x7c00, |b| half::f16::from_le_bytes(b).to_f64()),
        Dtype::F32 => scan::<4>(bytes, 0x7f80_0000, |b| f32::from_le_bytes(b) as f64),
        Dtype::F64 => scan::<8>(bytes, 0x7ff0_0000_0000_0000, f64::from_le_bytes),
        _ => None,
    }
}

/// Refuses tensor `tensor` of file `path` if it holds a NaN or ±Inf (unless
/// [`ALLOW_NON_FINITE_ENV`] is set): such a weight would silently turn every output, loss or
/// quantization scale it touches into NaN.
pub fn check_finite(path: &Path, tensor: &str, dtype: Dtype, bytes: &[u8]) -> Result<()> {
    match first_non_finite(dtype, bytes) {
        None => Ok(()),
        Some((index, value)) => refuse_non_finite(path, tensor, index, value),
    }
}

/// [`check_finite`] for values already decoded (a dequantized GGUF tensor, say): `values[index]`
/// is the first non-finite one, the error names it unless [`ALLOW_NON_FINITE_ENV`] is set.
pub fn check_finite_f32(path: &Path, tensor: &str, values: &[f32]) -> Result<()> {
    match values.iter().position(|v| !v.is_finite()) {
        None => Ok(()),
        Some(index) => refuse_non_finite(path, tensor, index, f64::from(values[index])),
    }
}

fn refuse_non_finite(path: &Path, tensor: &str, index: usize, value: f64) -> Result<()> {
    if std::env::var_os(ALLOW_NON_FINITE_ENV).is_some_and(|v| !v.is_empty() && v != "0") {
        return Ok(());
    }
    Err(Error::CorruptFile {
        path: path.to_path_buf(),
        reason: format!(
            "tensor `{tensor}` holds {value} at element {index}; refusing a non-finite weight \
             (set {ALLOW_NON_FINITE_ENV}=1 to load it anyway)"
        ),
    })
}

/// `text` (the contents of `path`) parsed as JSON into `T`.
pub fn parse_json<T: DeserializeOwned>(path: &Path, text: &str) -> Result<T> {
    serde_json::from_str(text).map_err(|e| Error::CorruptFile {
        path: path.to_path_buf(),
        reason: format!("invalid JSON: {e}"),
    })
}

/// The header length the first 8 bytes give, if there are 8.
fn header_len(bytes: &[u8]) -> Option<u64> {
    let head: [u8; 8] = bytes.get(..8)?.try_into().ok()?;
    Some(u64::from_le_bytes(head))
}

/// Which tensor of a header that parses as JSON does not fit: a byte range that disagrees with
/// its shape and dtype, or that runs past the end of the file.
fn first_bad_tensor(bytes: &[u8]) -> Option<String> {
    let n = usize::try_from(header_len(bytes)?).ok()?;
    let header = bytes.get(8..8usize.checked_add(n)?)?;
    let value: serde_json::Value = serde_json::from_slice(header).ok()?;
    let data_len = (bytes.len() - 8 - n) as u64;
    let mut entries: Vec<(&String, &serde_json::Value)> = value
        .as_object()?
        .iter()
        .filter(|(k, _)| k.as_str() != "__metadata__")
        .collect();
    entries.sort_by_key(|(k, _)| k.as_str());
    for (name, info) in entries {
        let offsets = info.get("data_offsets")?.as_array()?;
        let (begin, end) = (offsets.first()?.as_u64()?, offsets.get(1)?.as_u64()?);
        let dtype = info.get("dtype")?.as_str()?;
        let shape: Vec<u64> = info
            .get("shape")?
            .as_array()?
            .iter()
            .map(|d| d.as_u64())
            .collect::<Option<_>>()?;
        let bits = dtype_bits(dtype)?;
        let want = shape
            .iter()
            .try_fold(bits, |acc, &d| acc.checked_mul(d))
            .map(|b| b.div_ceil(8));
        if want != end.checked_sub(begin) {
            return Some(format!(
                "tensor `{name}` is {dtype} {shape:?} ({} bytes) but its offsets [{begin}, {end}] \
                 hold {} bytes",
                want.map_or("overflowing".to_string(), |w| w.to_string()),
                end.saturating_sub(begin)
            ));
        }
        if end > data_len {
            return Some(format!(
                "tensor `{name}` ends at byte {end} of the data, but the file holds {data_len} \
                 (truncated?)"
            ));
        }
    }
    None
}

/// Bits per element of a safetensors dtype name.
fn dtype_bits(dtype: &str) -> Option<u64> {
    Some(match dtype {
        "BOOL" | "U8" | "I8" | "F8_E5M2" | "F8_E4M3" | "F8_E8M0" => 8,
        "F4" => 4,
        "F6_E2M3" | "F6_E3M2" => 6,
        "U16" | "I16" | "F16" | "BF16" => 16,
        "U32" | "I32" | "F32" => 32,
        "U64" | "I64" | "F64" | "C64" => 64,
        _ => return None,
    })
}
