//! NF4 quantization exactly as bitsandbytes does it: a row-major flattened weight of `n` values
//! in blocks of `blocksize`, one f32 absmax per block, 4-bit codes packed two per byte (the first
//! value in the high nibble) into `(n + 1) / 2` bytes; optionally the absmax vector double-quantized.

use half::{bf16, f16};

use crate::error::{Error, Result};
use crate::quant::dynamic8;

/// The NF4 code book (bitsandbytes' `get_4bit_type("nf4")`), index 0..15. The literals are
/// bitsandbytes' own decimal text, so they compare with its source by eye (docs/ARCHITECTURE.md,
/// "NF4 format").
#[allow(clippy::excessive_precision)]
pub const NF4_CODE: [f32; 16] = [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
];

/// The 15 decision thresholds `(code[i] + code[i+1]) / 2` computed in f32, as bitsandbytes'
/// CPU path builds them. bitsandbytes' CUDA `dQuantizeNF4` tree uses decimal `f` literals that
/// round to a neighbouring f32 at indices 0, 8, 12 and 14 (see the unit test), so on the GPU
/// exactly one normalized value per such threshold gets the other code; we follow the CPU.
pub const NF4_THRESHOLDS: [f32; 15] = {
    let mut t = [0f32; 15];
    let mut i = 0;
    while i < 15 {
        t[i] = (NF4_CODE[i] + NF4_CODE[i + 1]) / 2.0;
        i += 1;
    }
    t
};

/// Block sizes bitsandbytes accepts for 4-bit quantization (its CPU path included).
pub const SUPPORTED_BLOCKSIZES: &[usize] = &[32, 64, 128, 256, 512, 1024, 2048, 4096];

/// Block size bitsandbytes uses for double quantization of the NF4 scales.
pub const NESTED_BLOCKSIZE: usize = 256;

/// torch's `absmax.clamp(min=1e-38)` bound in f32 (a subnormal, bits 0x006c_e3ee): bitsandbytes
/// scales a block by `1 / max(absmax, this)` so all-zero blocks do not divide by zero.
pub const MIN_SCALE: f32 = 1e-38;

/// The code index of the pad value bitsandbytes appends to an odd-length input (0.0 maps to the
/// code 0.0), so the last byte of an odd `n` has low nibble 7.
pub const PAD_CODE: u8 = 7;

/// Torch dtype names an NF4 tensor may carry as its original dtype (bitsandbytes' 4-bit inputs).
pub const SUPPORTED_DTYPES: &[&str] = &["float32", "bfloat16", "float16"];

/// Maps a normalized value to its NF4 code index exactly as bitsandbytes does: the number of
/// thresholds strictly below `x`, so a value exactly on a threshold takes the lower code and
/// NaN takes code 15 (`torch.bucketize`, `right=False`). Values outside [-1, 1] saturate.
#[inline]
pub fn nf4_code_index(x_normalized: f32) -> u8 {
    let mut index = 0u8;
    for &t in &NF4_THRESHOLDS {
        index += u8::from(x_normalized > t || x_normalized.is_nan());
    }
    index
}

pub(crate) fn check_blocksize(op: &'static str, blocksize: usize) -> Result<()> {
    super::check_blocksize(op, blocksize, SUPPORTED_BLOCKSIZES)
}

/// torch's `abs().max()`: NaN as soon as one value is NaN.
fn block_absmax(block: &[f32]) -> f32 {
    let mut max = 0f32;
    let mut nan = false;
    for &x in block {
        let a = x.abs();
        max = max.max(a);
        nan |= a.is_nan();
    }
    if nan {
        f32::NAN
    } else {
        max
    }
}

/// `max(x, MIN_SCALE)` keeping NaN, as `torch.clamp(min=...)` does.
fn clamp_min_scale(x: f32) -> f32 {
    if x < MIN_SCALE {
        MIN_SCALE
    } else {
        x
    }
}

/// Packs one block's codes; `out` holds `ceil(block.len() / 2)` bytes.
fn pack_block(block: &[f32], out: &mut [u8], normalize: impl Fn(f32) -> f32) {
    let mut pairs = block.chunks_exact(2);
    for (byte, pair) in out.iter_mut().zip(&mut pairs) {
        *byte = (nf4_code_index(normalize(pair[0])) << 4) | nf4_code_index(normalize(pair[1]));
    }
    if let ([last], Some(byte)) = (pairs.remainder(), out.last_mut()) {
        *byte = (nf4_code_index(normalize(*last)) << 4) | PAD_CODE;
    }
}

/// Quantizes `input` to NF4: `(packed, absmax)` with `packed.len() == (n + 1) / 2` and
/// `absmax.len() == ceil(n / blocksize)`, bit-identical to bitsandbytes' CPU `quantize_4bit`.
///
/// A full block stores `absmax = max |x|` and normalizes by `x * (1 / max(absmax, MIN_SCALE))`
/// (reciprocal then multiply); a partial last block stores `max(absmax, MIN_SCALE)` and normalizes
/// by true division. An empty input gives two empty vectors.
pub fn quantize_nf4(input: &[f32], blocksize: usize) -> Result<(Vec<u8>, Vec<f32>)> {
    check_blocksize("quantize_nf4", blocksize)?;
    let mut packed = vec![0u8; input.len().div_ceil(2)];
    let mut absmax = Vec::with_capacity(input.len().div_ceil(blocksize));
    // Block sizes are even, so every block starts on a byte boundary.
    for (block, out) in input
        .chunks(blocksize)
        .zip(packed.chunks_mut(blocksize / 2))
    {
        let max = stored_absmax(block, blocksize);
        absmax.push(max);
        if block.len() == blocksize {
            let inv = 1.0 / clamp_min_scale(max);
            pack_block(block, out, |x| x * inv);
        } else {
            pack_block(block, out, |x| x / max);
        }
    }
    Ok((packed, absmax))
}

/// The scale [`quantize_nf4`] stores for `block`: `max |x|` for a full block, clamped to
/// [`MIN_SCALE`] for a partial last one.
fn stored_absmax(block: &[f32], blocksize: usize) -> f32 {
    let max = block_absmax(block);
    if block.len() == blocksize {
        max
    } else {
        clamp_min_scale(max)
    }
}

/// The per-block scales [`quantize_nf4`] would store, without computing the codes (one pass of
/// block maxima): what a writer needs to size and fill the scale tensors ahead of the codes.
pub fn nf4_absmax(input: &[f32], blocksize: usize) -> Result<Vec<f32>> {
    check_blocksize("nf4_absmax", blocksize)?;
    Ok(input
        .chunks(blocksize)
        .map(|block| stored_absmax(block, blocksize))
        .collect())
}

/// The stored form of NF4 block scales: as they are, or double-quantized in blocks of
/// [`NESTED_BLOCKSIZE`] as bitsandbytes' `compress_statistics=True` does.
pub fn nf4_scales(absmax: Vec<f32>, double_quant: bool) -> Result<Nf4Scales> {
    if double_quant {
        Ok(Nf4Scales::Double(double_quantize(
            &absmax,
            NESTED_BLOCKSIZE,
        )?))
    } else {
        Ok(Nf4Scales::F32(absmax))
    }
}

fn check_dequant_lengths(
    op: &'static str,
    packed: usize,
    absmax: usize,
    n: usize,
    blocksize: usize,
) -> Result<()> {
    check_blocksize(op, blocksize)?;
    if packed != n.div_ceil(2) {
        return Err(Error::invalid(
            op,
            format!(
                "{n} values need {} packed bytes, got {packed}",
                n.div_ceil(2)
            ),
        ));
    }
    let blocks = n.div_ceil(blocksize);
    if absmax != blocks {
        return Err(Error::invalid(
            op,
            format!("{n} values in blocks of {blocksize} need {blocks} scales, got {absmax}"),
        ));
    }
    Ok(())
}

/// Dequantizes into `out` (`n = out.len()` values): `out[i] = code[q_i] * absmax[i / blocksize]`,
/// one f32 multiply per value, as every bitsandbytes backend computes it.
pub fn dequantize_nf4_into(
    packed: &[u8],
    absmax: &[f32],
    blocksize: usize,
    code: &[f32; 16],
    out: &mut [f32],
) -> Result<()> {
    let n = out.len();
    check_dequant_lengths("dequantize_nf4", packed.len(), absmax.len(), n, blocksize)?;
    for ((values, bytes), &scale) in out
        .chunks_mut(blocksize)
        .zip(packed.chunks(blocksize / 2))
        .zip(absmax)
    {
        // The same products as `code[q] * scale` per value, computed once per block.
        let table: [f32; 16] = std::array::from_fn(|k| code[k] * scale);
        let mut pairs = values.chunks_exact_mut(2);
        for (pair, &byte) in (&mut pairs).zip(bytes) {
            pair[0] = table[usize::from(byte >> 4)];
            pair[1] = table[usize::from(byte & 0x0f)];
        }
        if let ([last], Some(&byte)) = (pairs.into_remainder(), bytes.last()) {
            *last = table[usize::from(byte >> 4)];
        }
    }
    Ok(())
}

/// Dequantizes `n` NF4 values (see [`dequantize_nf4_into`]).
pub fn dequantize_nf4(
    packed: &[u8],
    absmax: &[f32],
    n: usize,
    blocksize: usize,
    code: &[f32; 16],
) -> Result<Vec<f32>> {
    check_dequant_lengths("dequantize_nf4", packed.len(), absmax.len(), n, blocksize)?;
    let mut out = vec![0f32; n];
    dequantize_nf4_into(packed, absmax, blocksize, code, &mut out)?;
    Ok(out)
}

/// Double-quantized NF4 scales: `absmax - offset` stored as 8-bit codes of `nested_code` with
/// one f32 `nested_absmax` per `nested_blocksize` scales.
#[derive(Clone, Debug, PartialEq)]
pub struct DoubleQuant {
    pub absmax_q: Vec<u8>,
    pub nested_absmax: Vec<f32>,
    pub offset: f32,
    pub nested_blocksize: usize,
    pub nested_code: [f32; 256],
}

impl DoubleQuant {
    /// Checks that the parts fit together and describe `blocks` scales.
    pub fn validate(&self, blocks: usize) -> Result<()> {
        if !dynamic8::SUPPORTED_BLOCKSIZES.contains(&self.nested_blocksize) {
            return Err(Error::invalid(
                "DoubleQuant",
                format!(
                    "nested blocksize {} is not one of {:?}",
                    self.nested_blocksize,
                    dynamic8::SUPPORTED_BLOCKSIZES
                ),
            ));
        }
        if self.absmax_q.len() != blocks {
            return Err(Error::invalid(
                "DoubleQuant",
                format!(
                    "{} quantized scales for {blocks} blocks",
                    self.absmax_q.len()
                ),
            ));
        }
        let nested = blocks.div_ceil(self.nested_blocksize);
        if self.nested_absmax.len() != nested {
            return Err(Error::invalid(
                "DoubleQuant",
                format!(
                    "{blocks} scales in nested blocks of {} need {nested} nested absmax values, got {}",
                    self.nested_blocksize,
                    self.nested_absmax.len()
                ),
            ));
        }
        Ok(())
    }
}

/// The mean of the scales, as close to exact as f32 allows (f64 sum, one final rounding).
/// bitsandbytes uses `torch.mean` (f32 cascade sum whose order depends on the host's vector
/// width and thread count), so its offset may differ from this by an ulp or so.
fn mean_f32(values: &[f32]) -> f32 {
    let sum: f64 = values.iter().map(|&v| f64::from(v)).sum();
    (sum / values.len() as f64) as f32
}

/// Double-quantizes NF4 scales: `offset = mean(absmax)`, then 8-bit blockwise quantization of
/// `absmax - offset` with the signed dynamic map in blocks of `nested_blocksize`.
pub fn double_quantize(absmax: &[f32], nested_blocksize: usize) -> Result<DoubleQuant> {
    if absmax.is_empty() {
        return Err(Error::invalid("double_quantize", "no scales to quantize"));
    }
    double_quantize_with_offset(absmax, nested_blocksize, mean_f32(absmax))
}

/// [`double_quantize`] with a given offset: bit-identical to bitsandbytes once its offset is used.
pub fn double_quantize_with_offset(
    absmax: &[f32],
    nested_blocksize: usize,
    offset: f32,
) -> Result<DoubleQuant> {
    let nested_code = *dynamic8::dynamic_map_signed_ref();
    let (absmax_q, nested_absmax) =
        dynamic8::quantize_blockwise8(absmax, &nested_code, nested_blocksize, offset)?;
    Ok(DoubleQuant {
        absmax_q,
        nested_absmax,
        offset,
        nested_blocksize,
        nested_code,
    })
}

/// The per-block scales double quantization stands for:
/// `nested_code[q[b]] * nested_absmax[b / nested_blocksize] + offset`, rounded after the
/// multiply and after the add (bitsandbytes dequantizes, then adds the offset in place).
/// Blocks an inconsistent `dq` has no nested absmax for (see [`DoubleQuant::validate`]) are NaN.
pub fn dequantize_absmax(dq: &DoubleQuant) -> Vec<f32> {
    if dq.nested_blocksize == 0 {
        return vec![f32::NAN; dq.absmax_q.len()];
    }
    let mut scales = Vec::with_capacity(dq.absmax_q.len());
    for (b, block) in dq.absmax_q.chunks(dq.nested_blocksize).enumerate() {
        let nested = dq.nested_absmax.get(b).copied().unwrap_or(f32::NAN);
        scales.extend(
            block
                .iter()
                .map(|&q| dq.nested_code[usize::from(q)] * nested + dq.offset),
        );
    }
    scales
}

/// The per-block scales of an NF4 tensor. `Double` carries its 1 KiB map inline; there is one
/// value per weight tensor, so the size difference costs nothing worth a box in the API.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq)]
pub enum Nf4Scales {
    /// One f32 absmax per block.
    F32(Vec<f32>),
    /// Double-quantized absmax.
    Double(DoubleQuant),
}

/// A quantized weight as bitsandbytes stores it (`Params4bit` data plus its `QuantState`).
#[derive(Clone, Debug, PartialEq)]
pub struct Nf4Tensor {
    /// Logical shape of the original weight (row-major), e.g. `[out, in]`.
    pub shape: Vec<usize>,
    pub blocksize: usize,
    pub code: [f32; 16],
    /// `(numel + 1) / 2` bytes, first value in the high nibble.
    pub packed: Vec<u8>,
    pub scales: Nf4Scales,
    /// Torch name of the original dtype ("bfloat16", "float16" or "float32").
    pub dtype: String,
}

impl Nf4Tensor {
    /// Quantizes an f32 weight (original dtype "float32"); `double_quant` compresses the scales
    /// with blocks of [`NESTED_BLOCKSIZE`] as bitsandbytes' `compress_statistics=True` does.
    pub fn quantize(
        data: &[f32],
        shape: &[usize],
        blocksize: usize,
        double_quant: bool,
    ) -> Result<Self> {
        Self::quantize_as(data, shape, blocksize, double_quant, "float32")
    }

    /// Quantizes a bf16 weight (original dtype "bfloat16"); bf16 widens to f32 exactly, so this
    /// equals bitsandbytes quantizing the bf16 tensor.
    pub fn quantize_bf16(
        data: &[bf16],
        shape: &[usize],
        blocksize: usize,
        double_quant: bool,
    ) -> Result<Self> {
        let widened: Vec<f32> = data.iter().map(|v| v.to_f32()).collect();
        Self::quantize_as(&widened, shape, blocksize, double_quant, "bfloat16")
    }

    fn quantize_as(
        data: &[f32],
        shape: &[usize],
        blocksize: usize,
        double_quant: bool,
        dtype: &str,
    ) -> Result<Self> {
        let numel = checked_numel(shape).ok_or_else(|| {
            Error::invalid("Nf4Tensor::quantize", format!("shape {shape:?} overflows"))
        })?;
        if numel != data.len() || numel == 0 {
            return Err(Error::invalid(
                "Nf4Tensor::quantize",
                format!(
                    "shape {shape:?} ({numel} values) for {} values; an NF4 tensor is non-empty",
                    data.len()
                ),
            ));
        }
        let (packed, absmax) = quantize_nf4(data, blocksize)?;
        let scales = nf4_scales(absmax, double_quant)?;
        Ok(Self {
            shape: shape.to_vec(),
            blocksize,
            code: NF4_CODE,
            packed,
            scales,
            dtype: dtype.to_string(),
        })
    }

    /// Number of values (the product of `shape`; `usize::MAX` if that overflows).
    pub fn numel(&self) -> usize {
        checked_numel(&self.shape).unwrap_or(usize::MAX)
    }

    /// Number of quantization blocks.
    pub fn num_blocks(&self) -> usize {
        self.numel().div_ceil(self.blocksize.max(1))
    }

    /// Checks that shape, block size, packed bytes, scales and dtype are consistent.
    pub fn validate(&self) -> Result<()> {
        let numel = checked_numel(&self.shape).ok_or_else(|| {
            Error::invalid("Nf4Tensor", format!("shape {:?} overflows", self.shape))
        })?;
        if numel == 0 {
            return Err(Error::invalid("Nf4Tensor", "an NF4 tensor is non-empty"));
        }
        if !SUPPORTED_DTYPES.contains(&self.dtype.as_str()) {
            return Err(Error::invalid(
                "Nf4Tensor",
                format!("dtype {:?} is not one of {SUPPORTED_DTYPES:?}", self.dtype),
            ));
        }
        let scales = match &self.scales {
            Nf4Scales::F32(absmax) => absmax.len(),
            Nf4Scales::Double(dq) => {
                dq.validate(numel.div_ceil(self.blocksize.max(1)))?;
                dq.absmax_q.len()
            }
        };
        check_dequant_lengths(
            "Nf4Tensor",
            self.packed.len(),
            scales,
            numel,
            self.blocksize,
        )
    }

    /// Per-block scales as dequantization uses them.
    pub fn absmax_f32(&self) -> Vec<f32> {
        match &self.scales {
            Nf4Scales::F32(absmax) => absmax.clone(),
            Nf4Scales::Double(dq) => dequantize_absmax(dq),
        }
    }

    /// Dequantizes into `out` (`numel` values), e.g. a buffer reused across layers.
    pub fn dequantize_into(&self, out: &mut [f32]) -> Result<()> {
        self.validate()?;
        if out.len() != self.numel() {
            return Err(Error::invalid(
                "Nf4Tensor::dequantize_into",
                format!(
                    "output holds {} values, tensor has {}",
                    out.len(),
                    self.numel()
                ),
            ));
        }
        dequantize_nf4_into(
            &self.packed,
            &self.absmax_f32(),
            self.blocksize,
            &self.code,
            out,
        )
    }

    /// Dequantizes to f32 (bitsandbytes' output for `dtype=torch.float32`).
    pub fn dequantize(&self) -> Result<Vec<f32>> {
        self.validate()?;
        let mut out = vec![0f32; self.numel()];
        self.dequantize_into(&mut out)?;
        Ok(out)
    }

    /// Dequantizes to bf16: the f32 products rounded to nearest-even, which is bitsandbytes'
    /// output for `dtype=torch.bfloat16`.
    pub fn dequantize_bf16(&self) -> Result<Vec<bf16>> {
        Ok(self.dequantize()?.into_iter().map(bf16::from_f32).collect())
    }

    /// Dequantizes to the original dtype (`self.dtype`), the values held in f32: bitsandbytes'
    /// `dequantize_4bit` output with the quant state's dtype, which is what its forward and
    /// PEFT's merge multiply by or add to.
    pub fn dequantize_original(&self) -> Result<Vec<f32>> {
        let mut values = self.dequantize()?;
        match self.dtype.as_str() {
            "bfloat16" => values
                .iter_mut()
                .for_each(|v| *v = bf16::from_f32(*v).to_f32()),
            "float16" => values
                .iter_mut()
                .for_each(|v| *v = f16::from_f32(*v).to_f32()),
            _ => {}
        }
        Ok(values)
    }
}

pub(crate) fn checked_numel(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn min_scale_is_torchs_f32_rounding_of_1e_38() {
        assert_eq!(MIN_SCALE.to_bits(), 0x006c_e3ee);
    }

    #[test]
    fn thresholds_differ_from_bitsandbytes_cuda_literals_by_one_ulp_at_four_places() {
        // The literals of bitsandbytes' CUDA dQuantizeNF4, rounded to f32.
        #[allow(clippy::excessive_precision)]
        let cuda: [f32; 15] = [
            -0.8480964004993439,
            -0.6106329262256622,
            -0.4599952697753906,
            -0.33967943489551544,
            -0.23460740596055984,
            -0.13791173323988914,
            -0.045525018125772476,
            0.03979014977812767,
            0.1202552504837513,
            0.2035212516784668,
            0.2920137718319893,
            0.3893125355243683,
            0.5016634166240692,
            0.6427869200706482,
            0.8614784181118011,
        ];
        let ulps: Vec<i64> = NF4_THRESHOLDS
            .iter()
            .zip(&cuda)
            .map(|(ours, theirs)| i64::from(ours.to_bits()) - i64::from(theirs.to_bits()))
            .collect();
        // Bit distance (sign-magnitude): -1 at 0 and 8, +1 at 12 and 14, so the values
        // NF4_THRESHOLDS[0], cuda[8], NF4_THRESHOLDS[12] and NF4_THRESHOLDS[14] map differently.
        assert_eq!(ulps, [-1, 0, 0, 0, 0, 0, 0, 0, -1, 0, 0, 0, 1, 0, 1]);
    }

    #[test]
    fn code_values_map_to_their_index_and_ties_go_down() {
        for (i, &c) in NF4_CODE.iter().enumerate() {
            assert_eq!(nf4_code_index(c) as usize, i);
        }
        for (i, &t) in NF4_THRESHOLDS.iter().enumerate() {
            assert_eq!(nf4_code_index(t) as usize, i);
            let above = if t > 0.0 {
                t.to_bits() + 1
            } else {
                t.to_bits() - 1
            };
            assert_eq!(nf4_code_index(f32::from_bits(above)) as usize, i + 1);
        }
        assert_eq!(nf4_code_index(f32::NAN), 15);
        assert_eq!(nf4_code_index(-2.0), 0);
        assert_eq!(nf4_code_index(2.0), 15);
        assert_eq!(nf4_code_index(-0.0), PAD_CODE);
    }

    #[test]
    fn block_absmax_propagates_nan() {
        assert!(block_absmax(&[1.0, f32::NAN, 3.0]).is_nan());
        assert_eq!(block_absmax(&[-4.0, 2.0]), 4.0);
        assert_eq!(block_absmax(&[-0.0]), 0.0);
    }
}
