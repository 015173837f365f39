//! bitsandbytes' signed dynamic 8-bit map (256 sorted f32 codes in [-1, 1]) and 8-bit blockwise
//! quantization with it: one f32 absmax per block of `blocksize` consecutive values, one u8 code
//! per value. Double quantization stores the NF4 scales this way (blocks of 256).

use std::sync::OnceLock;

use crate::error::{Error, Result};

/// Block sizes bitsandbytes documents for 8-bit blockwise quantization.
pub const SUPPORTED_BLOCKSIZES: &[usize] = &[64, 128, 256, 512, 1024, 2048, 4096];

/// The signed dynamic map exactly as `bitsandbytes.functional.create_dynamic_map(signed=True)`
/// builds it on the pinned stack (the values stored as `nested_quant_map` in checkpoints).
///
/// For exponent `i` in 0..7 it takes the midpoints of `torch.linspace(0.1, 1, 2^i + 1)` (f32),
/// scales them by `10^(i-6)` (rounded to f32, product in f32), adds their negatives, then `0` and
/// `1`, and sorts. torch's CPU linspace computes element `k` as `fma(step, k, start)` below the
/// halfway index and `fma(-step, steps-1-k, end)` above it (the compiler contracts
/// `start + step * k`); reproducing that contraction is what makes every bit match.
pub fn dynamic_map_signed() -> [f32; 256] {
    const SCALES: [f64; 7] = [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0];
    let mut map = [0f32; 256];
    let mut len = 0;
    for (i, &scale) in SCALES.iter().enumerate() {
        let steps = (1usize << i) + 1;
        let linspace = torch_linspace_f32(0.1, 1.0, steps);
        let scale = scale as f32;
        for pair in linspace.windows(2) {
            let value = scale * ((pair[0] + pair[1]) / 2.0);
            map[len] = value;
            map[len + 1] = -value;
            len += 2;
        }
    }
    // The two remaining entries are 0 and 1 (`map` is zero-initialised, so 0 is already there).
    map[len + 1] = 1.0;
    map.sort_by(f32::total_cmp);
    map
}

/// torch's CPU `linspace(start, end, steps)` for f32 (steps >= 2), as described above.
pub(crate) fn torch_linspace_f32(start: f32, end: f32, steps: usize) -> Vec<f32> {
    let step = (end - start) / (steps - 1) as f32;
    let halfway = steps / 2;
    (0..steps)
        .map(|k| {
            if k < halfway {
                step.mul_add(k as f32, start)
            } else {
                (-step).mul_add((steps - 1 - k) as f32, end)
            }
        })
        .collect()
}

/// The cached signed dynamic map (see [`dynamic_map_signed`]).
pub fn dynamic_map_signed_ref() -> &'static [f32; 256] {
    static MAP: OnceLock<[f32; 256]> = OnceLock::new();
    MAP.get_or_init(dynamic_map_signed)
}

/// Number of bins bitsandbytes discretises [-1, 1] into when it quantizes to a 256-entry code.
const LUT_BINS: usize = 65536;

/// bitsandbytes' CPU lookup table from a normalized value's bin to a code index: bin `i` stands
/// for `v_i = (2i) / 65535 - 1` and maps to the number of code midpoints `(c[j] + c[j+1]) * 0.5`
/// strictly below `v_i`, so a bin exactly on a midpoint takes the lower code.
fn build_bin_lut(code: &[f32; 256]) -> Vec<u8> {
    let midpoints: Vec<f32> = code.windows(2).map(|w| (w[0] + w[1]) * 0.5).collect();
    let mut lut = vec![0u8; LUT_BINS];
    let mut index = 0usize;
    for (bin, slot) in lut.iter_mut().enumerate() {
        let value = (2.0 * bin as f32) / (LUT_BINS - 1) as f32 - 1.0;
        while index < midpoints.len() && midpoints[index] < value {
            index += 1;
        }
        // index <= 255 because there are 255 midpoints.
        *slot = index as u8;
    }
    lut
}

/// The bin of a normalized value: `trunc(fma((v + 1) * 0.5, 65535, 0.5))` after clamping to
/// [-1, 1]. bitsandbytes' compiled code fuses the last multiply-add, so we do too. NaN (from a
/// NaN or infinite input) lands in bin 0, as the x86 truncating conversion gives there.
#[inline]
fn bin_of(normalized: f32) -> usize {
    // f32::clamp keeps NaN, as std::clamp does.
    let v = normalized.clamp(-1.0, 1.0);
    let t = ((v + 1.0) * 0.5).mul_add((LUT_BINS - 1) as f32, 0.5);
    // `as i32` saturates and maps NaN to 0; the value is within [0.5, 65535.5] otherwise.
    (t as i32 as usize) & (LUT_BINS - 1)
}

fn check_blocksize(op: &'static str, blocksize: usize) -> Result<()> {
    super::check_blocksize(op, blocksize, SUPPORTED_BLOCKSIZES)
}

/// Quantizes `input - offset` blockwise with `code` (sorted ascending, as bitsandbytes assumes):
/// returns one u8 code per value and one absmax per block (the last block may be partial).
///
/// Matches bitsandbytes' CPU kernel bit for bit: `x = input - offset` (f32); absmax = the max
/// of `|x|` over the block, starting from 0 and ignoring NaN; an all-zero block stores absmax 0 and
/// codes 0; otherwise `v = x * (1 / absmax)` (reciprocal then multiply) is mapped through the
/// 65536-bin table of [`build_bin_lut`]. This is nearest-code rounding except within about
/// 1.5e-5 of a midpoint, where the bin decides. Pass `offset = 0.0` for plain quantization.
pub fn quantize_blockwise8(
    input: &[f32],
    code: &[f32; 256],
    blocksize: usize,
    offset: f32,
) -> Result<(Vec<u8>, Vec<f32>)> {
    check_blocksize("quantize_blockwise8", blocksize)?;
    let lut = build_bin_lut(code);
    let mut q = Vec::with_capacity(input.len());
    let mut absmax = Vec::with_capacity(input.len().div_ceil(blocksize));
    let mut shifted = Vec::with_capacity(blocksize);
    for block in input.chunks(blocksize) {
        shifted.clear();
        shifted.extend(block.iter().map(|&x| x - offset));
        let mut block_max = 0f32;
        for &x in &shifted {
            let a = x.abs();
            if block_max < a {
                block_max = a;
            }
        }
        absmax.push(block_max);
        if block_max == 0.0 {
            q.extend(std::iter::repeat_n(0u8, shifted.len()));
            continue;
        }
        let inv = 1.0 / block_max;
        q.extend(shifted.iter().map(|&x| lut[bin_of(x * inv)]));
    }
    Ok((q, absmax))
}

/// Dequantizes 8-bit blockwise codes: `code[q[i]] * absmax[i / blocksize] + offset`, two f32
/// roundings (no fused multiply-add), as bitsandbytes composes double-quant scales.
///
/// Pass `offset = -0.0` for bitsandbytes' plain 8-bit dequantization: adding -0.0 is the exact
/// identity, whereas +0.0 would turn a -0.0 product (code 0 times absmax 0) into +0.0.
pub fn dequantize_blockwise8(
    q: &[u8],
    absmax: &[f32],
    code: &[f32; 256],
    blocksize: usize,
    offset: f32,
) -> Result<Vec<f32>> {
    check_blocksize("dequantize_blockwise8", blocksize)?;
    let blocks = q.len().div_ceil(blocksize);
    if absmax.len() != blocks {
        return Err(Error::invalid(
            "dequantize_blockwise8",
            format!(
                "{} codes in blocks of {blocksize} need {blocks} absmax values, got {}",
                q.len(),
                absmax.len()
            ),
        ));
    }
    let mut out = Vec::with_capacity(q.len());
    for (block, &scale) in q.chunks(blocksize).zip(absmax) {
        out.extend(block.iter().map(|&c| code[c as usize] * scale + offset));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dynamic_map_is_sorted_with_the_expected_ends() {
        let map = dynamic_map_signed();
        assert!(map.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(map[255], 1.0);
        assert_eq!(map[127], 0.0);
        // The most negative code is -(1 * (0.98594 + 1) / 2), not -1.
        assert!((map[0] + 0.99297).abs() < 1e-5);
    }

    #[test]
    fn linspace_matches_known_torch_values() {
        // torch.linspace(0.1, 1, 3) == [0.1, 0.55, 1.0] in f32.
        assert_eq!(torch_linspace_f32(0.1, 1.0, 3), vec![0.1f32, 0.55, 1.0]);
    }

    #[test]
    fn bins_cover_the_range_and_send_nan_to_bin_zero() {
        assert_eq!(bin_of(-1.0), 0);
        assert_eq!(bin_of(-7.0), 0);
        assert_eq!(bin_of(1.0), LUT_BINS - 1);
        assert_eq!(bin_of(3.0), LUT_BINS - 1);
        assert_eq!(bin_of(f32::NAN), 0);
        assert_eq!(bin_of(0.0), 32768);
    }

    #[test]
    fn code_values_map_to_themselves() {
        let map = dynamic_map_signed();
        let lut = build_bin_lut(&map);
        // Codes far from their neighbours (the coarse outer ones) must come back exactly.
        for (i, &c) in map.iter().enumerate().filter(|(_, c)| c.abs() > 0.1) {
            assert_eq!(lut[bin_of(c)] as usize, i, "code {c}");
        }
    }

    #[test]
    fn zero_block_gives_zero_codes_and_zero_absmax() {
        let map = dynamic_map_signed();
        let (q, absmax) = quantize_blockwise8(&[0.0; 70], &map, 64, 0.0).unwrap();
        assert_eq!(q, vec![0u8; 70]);
        assert_eq!(absmax, vec![0.0, 0.0]);
    }
}
