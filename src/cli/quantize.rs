//! `qlora quantize`: NF4 exactly as bitsandbytes stores it, for a whole Hugging Face model folder
//! (`--model-dir`: a pre-quantized folder transformers and our loader read as is), one safetensors
//! file (`--input`: every `*_proj.weight` quantized, the rest copied), or a built-in 4096×4096
//! Llama-shaped weight (sizes, error, speed, and the emulated CUDA kernels checked).

use std::path::{Path, PathBuf};
use std::time::Instant;

use half::{bf16, f16};
use safetensors::Dtype;

use crate::cli::merge::{parse_shard_size, DtypeArg};
use crate::kernels::device::Emulator;
use crate::kernels::nf4::{dequantize, quantize, Nf4Weight, Scales};
use crate::model::quantize_dir::{quantize_model_dir, QuantizeDirOptions};
use crate::quant::bnb::nf4_to_tensors;
use crate::quant::nf4::{Nf4Scales, Nf4Tensor, NF4_CODE};
use crate::{Error, Result};

/// Quantize weights to NF4 exactly as bitsandbytes stores them, and report sizes and error.
#[derive(clap::Args, Debug, Clone)]
#[command(
    long_about = "Quantize weights to NF4 exactly as bitsandbytes stores them, and report sizes \
        and error.\n\n\
        With --model-dir and --output, a whole Hugging Face Llama folder becomes a bitsandbytes \
        pre-quantized folder: the seven linears of every layer in NF4 (the tensors and quant \
        state bitsandbytes saves), embeddings, norms and lm_head copied as stored, \
        `quantization_config` added to config.json as transformers writes it, tokenizer files \
        copied. transformers (with bitsandbytes) and `qlora` load it without requantizing. \
        --model-dir may be a llama.cpp GGUF file: its tensors are dequantized, the linears \
        quantized from those values, the rest written in f32, with the config and tokenizer \
        files `qlora convert` writes.\n\n\
        With --input, every 2-D `*_proj.weight` of one safetensors file is quantized and the \
        other tensors copied. With neither, a built-in 4096×4096 Llama-shaped weight is \
        quantized and the emulated CUDA kernels are checked against the Rust reference."
)]
pub struct QuantizeArgs {
    /// A Hugging Face model folder (config.json + model.safetensors or shards with
    /// model.safetensors.index.json), or a llama.cpp GGUF file, to turn into a bitsandbytes NF4
    /// folder; needs --output.
    #[arg(long, value_name = "DIR|FILE.gguf", conflicts_with = "input")]
    pub model_dir: Option<PathBuf>,
    /// A safetensors file; every 2-D `*_proj.weight` tensor is quantized, others are copied.
    #[arg(long, value_name = "FILE")]
    pub input: Option<PathBuf>,
    /// Where to write: the output folder with --model-dir, else a safetensors file.
    #[arg(long, value_name = "PATH")]
    pub output: Option<PathBuf>,
    /// Elements per quantization block (transformers always uses 64).
    #[arg(long, default_value_t = 64)]
    pub blocksize: usize,
    /// Keep f32 block scales instead of double-quantizing them to 8 bits.
    #[arg(long)]
    pub no_double_quant: bool,
    /// With --model-dir: `bnb_4bit_compute_dtype` written to the config, the dtype
    /// bitsandbytes runs the quantized linears in.
    #[arg(long, value_enum, default_value = "bf16")]
    pub compute_dtype: DtypeArg,
    /// With --model-dir: the largest shard, as Hugging Face writes it ("5GB", "500MB", "60KB":
    /// decimal units, or a number of bytes); a larger tensor gets a shard of its own.
    #[arg(long, default_value = "5GB", value_parser = parse_shard_size)]
    pub max_shard_size: u64,
    /// Rows of the built-in example also run through the emulated CUDA kernels (0 to skip).
    #[arg(long, default_value_t = 16)]
    pub kernel_rows: usize,
}

/// Runs `qlora quantize`.
pub fn run(args: &QuantizeArgs) -> Result<()> {
    let double_quant = !args.no_double_quant;
    match (&args.model_dir, &args.input) {
        (Some(dir), _) => {
            let output = args.output.as_deref().ok_or_else(|| {
                Error::invalid(
                    "quantize",
                    "--model-dir needs --output (the folder to write)",
                )
            })?;
            quantize_dir(dir, output, args)
        }
        (None, Some(path)) => {
            quantize_file(path, args.output.as_deref(), args.blocksize, double_quant)
        }
        (None, None) => quantize_demo(
            args.output.as_deref(),
            args.blocksize,
            double_quant,
            args.kernel_rows,
        ),
    }
}

fn quantize_dir(input: &Path, output: &Path, args: &QuantizeArgs) -> Result<()> {
    let options = QuantizeDirOptions {
        blocksize: args.blocksize,
        double_quant: !args.no_double_quant,
        compute_dtype: args.compute_dtype.torch(),
        max_shard_bytes: args.max_shard_size,
    };
    let t0 = Instant::now();
    let s = quantize_model_dir(input, output, &options)?;
    println!(
        "{} linears quantized to NF4 (blocksize {}, {}), {} tensors copied: {:.2} MiB -> {:.2} MiB, \
         relative error {:.4}, {:.1} s",
        s.quantized,
        options.blocksize,
        if options.double_quant { "double quant" } else { "f32 scales" },
        s.copied,
        s.bytes_in as f64 / MIB,
        s.bytes_out as f64 / MIB,
        s.relative_error,
        t0.elapsed().as_secs_f64()
    );
    for f in &s.files {
        println!("wrote {}", f.display());
    }
    if !s.copied_files.is_empty() {
        let verb = match crate::model::gguf::is_gguf(input) {
            true => "wrote",
            false => "copied",
        };
        println!("{verb} {}", s.copied_files.join(", "));
    }
    Ok(())
}

const MIB: f64 = 1024.0 * 1024.0;

/// Error statistics of a dequantized weight against the original.
struct ErrorStats {
    rmse: f64,
    max_abs: f64,
    rel_frobenius: f64,
}

fn error_stats(orig: &[f32], deq: &[f32]) -> ErrorStats {
    let (mut se, mut norm, mut max_abs) = (0f64, 0f64, 0f64);
    for (&a, &b) in orig.iter().zip(deq) {
        let d = (a - b) as f64;
        se += d * d;
        norm += (a as f64) * (a as f64);
        max_abs = max_abs.max(d.abs());
    }
    ErrorStats {
        rmse: (se / orig.len().max(1) as f64).sqrt(),
        max_abs,
        rel_frobenius: (se / norm.max(f64::MIN_POSITIVE)).sqrt(),
    }
}

fn scale_bytes(t: &Nf4Tensor) -> usize {
    match &t.scales {
        Nf4Scales::F32(a) => a.len() * 4,
        Nf4Scales::Double(dq) => dq.absmax_q.len() + dq.nested_absmax.len() * 4 + 256 * 4 + 4,
    }
}

fn quantize_demo(
    output: Option<&Path>,
    blocksize: usize,
    double_quant: bool,
    kernel_rows: usize,
) -> Result<()> {
    let (rows, cols) = (4096usize, 4096usize);
    let weight: Vec<bf16> = crate::testing::normal_vector(rows * cols, 0.02, 7)
        .into_iter()
        .map(bf16::from_f32)
        .collect();
    let widened: Vec<f32> = weight.iter().map(|x| x.to_f32()).collect();
    println!("built-in weight: [{rows}, {cols}] bf16, normal(0, 0.02) like a Llama-7B projection");

    let t0 = Instant::now();
    let q = Nf4Tensor::quantize_bf16(&weight, &[rows, cols], blocksize, double_quant)?;
    let quant_s = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let deq = q.dequantize()?;
    let dequant_s = t1.elapsed().as_secs_f64();

    let n = rows * cols;
    let nf4_bytes = q.packed.len() + scale_bytes(&q);
    println!(
        "  bf16 original         {:>8.2} MiB  16.000 bits/param",
        (n * 2) as f64 / MIB
    );
    println!(
        "  NF4 (bs {blocksize}, {})  {:>8.2} MiB  {:6.3} bits/param",
        if double_quant {
            "double quant"
        } else {
            "f32 scales  "
        },
        nf4_bytes as f64 / MIB,
        nf4_bytes as f64 * 8.0 / n as f64
    );
    let e = error_stats(&widened, &deq);
    println!(
        "  error                 rmse {:.3e}, max |err| {:.3e}, relative (Frobenius) {:.4}",
        e.rmse, e.max_abs, e.rel_frobenius
    );
    println!(
        "  reference speed       quantize {:.3} s ({:.2} GB/s of bf16 read), dequantize {:.3} s ({:.2} GB/s of f32 written)",
        quant_s,
        (n * 2) as f64 / quant_s / 1e9,
        dequant_s,
        (n * 4) as f64 / dequant_s / 1e9
    );

    if kernel_rows > 0 {
        check_emulated_kernels(&weight[..kernel_rows.min(rows) * cols], blocksize)?;
    }
    if let Some(path) = output {
        write_bnb(
            path,
            vec![("model.layers.0.mlp.down_proj".to_string(), q)],
            Vec::new(),
        )?;
        println!(
            "  wrote {} (bitsandbytes NF4 keys under model.layers.0.mlp.down_proj)",
            path.display()
        );
    }
    Ok(())
}

/// Runs the NF4 kernels of kernels/nf4.cu through the CPU emulation and compares with the reference.
fn check_emulated_kernels(weight: &[bf16], blocksize: usize) -> Result<()> {
    let widened: Vec<f32> = weight.iter().map(|x| x.to_f32()).collect();
    let (want_packed, want_absmax) = crate::quant::nf4::quantize_nf4(&widened, blocksize)?;
    let t0 = Instant::now();
    let (packed, absmax) = quantize(&Emulator::default(), weight, blocksize, &NF4_CODE[..])?;
    let out: Vec<f32> = dequantize(
        &Emulator::default(),
        &Nf4Weight::flat(
            &packed[..],
            Scales::F32(&absmax[..]),
            weight.len(),
            blocksize,
            &NF4_CODE[..],
        ),
    )?;
    let secs = t0.elapsed().as_secs_f64();
    let want = crate::quant::nf4::dequantize_nf4(
        &want_packed,
        &want_absmax,
        weight.len(),
        blocksize,
        &NF4_CODE,
    )?;
    let same_bytes = packed == want_packed
        && absmax
            .iter()
            .zip(&want_absmax)
            .all(|(a, b)| a.to_bits() == b.to_bits());
    let same_out = out
        .iter()
        .zip(&want)
        .all(|(a, b)| a.to_bits() == b.to_bits());
    println!(
        "  emulated CUDA kernels  {} elements in {:.2} s: packed bytes {}, dequantized values {}",
        weight.len(),
        secs,
        if same_bytes {
            "identical to the reference"
        } else {
            "DIFFER"
        },
        if same_out { "bit-identical" } else { "DIFFER" }
    );
    if same_bytes && same_out {
        Ok(())
    } else {
        Err(Error::invalid(
            "quantize",
            "emulated kernels disagree with the reference",
        ))
    }
}

const LINEAR_NAMES: &[&str] = &[
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

fn quantize_file(
    input: &Path,
    output: Option<&Path>,
    blocksize: usize,
    double_quant: bool,
) -> Result<()> {
    let file = std::fs::File::open(input).map_err(|e| Error::io(input, e))?;
    // SAFETY: the mapping is read-only and lives until the end of this function; like every
    // safetensors reader we assume no other process truncates the file while we read it.
    let bytes = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(input, e))?;
    let st = crate::hf::file::read_safetensors(input, &bytes)?;
    let mut quantized = Vec::new();
    let mut copied = Vec::new();
    let (mut before, mut after) = (0usize, 0usize);
    let mut names: Vec<String> = st.names().into_iter().map(|s| s.to_string()).collect();
    names.sort();
    for name in names {
        let view = st.tensor(&name).map_err(|e| Error::CorruptFile {
            path: input.to_path_buf(),
            reason: format!("tensor `{name}`: {e}"),
        })?;
        let is_linear = view.shape().len() == 2
            && name.ends_with(".weight")
            && LINEAR_NAMES
                .iter()
                .any(|l| name.ends_with(&format!("{l}.weight")));
        let values = match (is_linear, view.dtype()) {
            (true, Dtype::F32) => Some((
                decode(view.data(), 4, |b| {
                    f32::from_le_bytes([b[0], b[1], b[2], b[3]])
                }),
                "float32",
            )),
            (true, Dtype::BF16) => Some((
                decode(view.data(), 2, |b| {
                    bf16::from_le_bytes([b[0], b[1]]).to_f32()
                }),
                "bfloat16",
            )),
            (true, Dtype::F16) => Some((
                decode(view.data(), 2, |b| {
                    f16::from_le_bytes([b[0], b[1]]).to_f32()
                }),
                "float16",
            )),
            _ => None,
        };
        before += view.data().len();
        match values {
            Some((v, dtype)) => {
                let mut q = Nf4Tensor::quantize(&v, view.shape(), blocksize, double_quant)?;
                q.dtype = dtype.to_string();
                let e = error_stats(&v, &q.dequantize()?);
                let size = q.packed.len() + scale_bytes(&q);
                after += size;
                println!(
                    "  {name:<48} {:?} -> NF4 {:>9} bytes, relative error {:.4}",
                    view.shape(),
                    size,
                    e.rel_frobenius
                );
                quantized.push((name.trim_end_matches(".weight").to_string(), q));
            }
            None => {
                after += view.data().len();
                copied.push((
                    name.clone(),
                    view.dtype(),
                    view.shape().to_vec(),
                    view.data().to_vec(),
                ));
            }
        }
    }
    println!(
        "{} tensors quantized, {} copied: {:.2} MiB -> {:.2} MiB",
        quantized.len(),
        copied.len(),
        before as f64 / MIB,
        after as f64 / MIB
    );
    if let Some(path) = output {
        write_bnb(path, quantized, copied)?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

fn decode(data: &[u8], width: usize, f: impl Fn(&[u8]) -> f32) -> Vec<f32> {
    data.chunks_exact(width).map(f).collect()
}

type RawTensor = (String, Dtype, Vec<usize>, Vec<u8>);

fn write_bnb(
    path: &Path,
    quantized: Vec<(String, Nf4Tensor)>,
    copied: Vec<RawTensor>,
) -> Result<()> {
    let mut tensors = Vec::new();
    for (prefix, q) in &quantized {
        tensors.extend(nf4_to_tensors(prefix, q)?);
    }
    for (name, dtype, shape, data) in copied {
        tensors.push((name, crate::quant::bnb::OwnedTensor { dtype, shape, data }));
    }
    let bytes = safetensors::serialize(tensors, None)
        .map_err(|e| Error::encode(path.display().to_string(), e))?;
    std::fs::write(path, bytes).map_err(|e| Error::io(path, e))
}
