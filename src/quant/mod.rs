//! The NF4 format, bit-compatible with bitsandbytes: 4-bit codes packed two per byte with one
//! f32 scale per block (`nf4`), the signed dynamic 8-bit map that double quantization stores the
//! scales in (`dynamic8`) and the tensors of a bnb pre-quantized checkpoint (`bnb`). Whole model
//! folders quantized to NF4 are `model::quantize_dir`'s (they need the Llama config).
//!
//! Everything here is the plain-Rust reference that CUDA kernels are tested against; the exact
//! arithmetic (roundings, tie rules) follows bitsandbytes' CPU path and is described on each item.

pub mod bnb;
pub mod dynamic8;
pub mod nf4;

use crate::{Error, Result};

/// `Ok` when `blocksize` is one of `supported`, else an [`Error::InvalidArgument`] naming them.
pub(crate) fn check_blocksize(
    op: &'static str,
    blocksize: usize,
    supported: &[usize],
) -> Result<()> {
    if supported.contains(&blocksize) {
        Ok(())
    } else {
        Err(Error::invalid(
            op,
            format!("blocksize {blocksize} is not one of {supported:?}"),
        ))
    }
}
