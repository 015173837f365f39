//! The crate's one error type. Library code returns these and never panics on user input.

use std::path::PathBuf;

/// Every failure the library reports.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An argument is out of range or inconsistent with another (shapes, lengths, block sizes).
    #[error("{op}: {reason}")]
    InvalidArgument { op: &'static str, reason: String },

    /// A kernel run through the CPU emulation of CUDA reported a fault (out-of-bounds shared
    /// memory, a data race on shared memory, a divergent barrier, ...).
    #[error("emulated kernel `{kernel}` failed: {reason}")]
    Emulation {
        kernel: &'static str,
        reason: String,
    },

    /// A CUDA driver, launch or copy failure.
    #[error("CUDA: {0}")]
    Cuda(String),

    /// The NVIDIA driver is older than the CUDA release the kernels were built with, so it cannot
    /// load them.
    #[error(
        "the NVIDIA driver supports CUDA {driver}, but the kernels were built with CUDA {built}: \
         {advice}"
    )]
    CudaDriverTooOld {
        /// The newest CUDA release the driver supports (`cuDriverGetVersion`).
        driver: String,
        /// The CUDA release of the nvcc that built the kernels.
        built: String,
        advice: String,
    },

    /// No usable CUDA device (feature off, no driver, or no GPU).
    #[error("no CUDA device available: {0}")]
    NoCudaDevice(String),

    /// A model `config.json` field is missing, malformed, inconsistent or unsupported.
    #[error("config: `{field}`: {reason}")]
    Config { field: &'static str, reason: String },

    /// A LoRA / PEFT adapter config field is missing, malformed, out of range or unsupported.
    #[error("adapter config: `{field}`: {reason}")]
    AdapterConfig { field: &'static str, reason: String },

    /// A LoRA adapter does not fit the base model it is merged into: another layer count, module
    /// shapes that differ, or a module the base does not have.
    #[error("the adapter does not fit the base model: {reason}")]
    AdapterMismatch { reason: String },

    /// A tensor the model needs is in none of its safetensors files.
    #[error("no file of the model holds tensor `{key}`")]
    MissingTensor { key: String },

    /// A model tensor or its metadata does not fit the config (shape, dtype, quant state).
    #[error("model tensor `{key}`: {reason}")]
    BadTensor { key: String, reason: String },

    /// A training checkpoint directory is incomplete, malformed, from another format version, or
    /// does not fit the model it is loaded onto.
    #[error("training checkpoint {path}: {reason}")]
    TrainingCheckpoint { path: PathBuf, reason: String },

    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// `tokenizer.json` or `tokenizer_config.json` is missing, unreadable or malformed.
    #[error("tokenizer file {path}: {reason}")]
    TokenizerFile { path: PathBuf, reason: String },

    /// Encoding or decoding through the tokenizer failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),

    /// A chat template is missing, does not compile, or raised an exception while rendering.
    #[error("chat template: {0}")]
    ChatTemplate(String),

    /// A dataset line is malformed or does not fit its shape.
    #[error("{path}:{line}: {reason}")]
    Dataset {
        path: PathBuf,
        line: usize,
        reason: String,
    },

    /// NaN or ±Inf in a training step: the first non-finite activation of the forward (when the
    /// loss is), or a gradient; `layer` is None for the embeddings, logits or loss.
    #[error("training step {step}: {tensor} is not finite ({value})")]
    NonFinite {
        /// The optimizer update (1-based) the step would have made.
        step: u64,
        /// The decoder layer of the tensor (`None` for the loss).
        layer: Option<usize>,
        /// `loss` or `gradient of layers.{i}.{block}.{module}.lora_{A|B}`.
        tensor: String,
        value: f32,
    },

    /// A file that is not what it should be (a corrupt safetensors file, malformed JSON): the
    /// file, the tensor where one is to blame, and what is wrong.
    #[error("{}: {reason}", path.display())]
    CorruptFile { path: PathBuf, reason: String },

    /// JSON that is not what it should be, where no file is involved (a `config.json` given as
    /// text); read from a file it is [`Error::CorruptFile`].
    #[error("invalid JSON: {0}")]
    Json(String),

    /// Writing a file failed to encode (a safetensors or JSON serialization).
    #[error("writing {what}: {reason}")]
    Encode { what: String, reason: String },

    /// A candle error, without the backtrace candle attaches when `RUST_BACKTRACE` is set (see
    /// [`without_backtrace`]).
    #[error(transparent)]
    Candle(candle_core::Error),
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Shorthand for [`Error::InvalidArgument`].
    pub fn invalid(op: &'static str, reason: impl Into<String>) -> Self {
        Error::InvalidArgument {
            op,
            reason: reason.into(),
        }
    }

    /// Shorthand for [`Error::Encode`].
    pub fn encode(what: impl Into<String>, reason: impl std::fmt::Display) -> Self {
        Error::Encode {
            what: what.into(),
            reason: reason.to_string(),
        }
    }

    /// Shorthand for [`Error::Io`].
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}

impl From<candle_core::Error> for Error {
    fn from(e: candle_core::Error) -> Self {
        Error::Candle(without_backtrace(e))
    }
}

/// `e` without the backtrace candle captures into its errors when `RUST_BACKTRACE` is set: its
/// message would print the whole stack (and resolving it allocates some 150 MB of debug info) in
/// what is a user-facing error.
pub fn without_backtrace(e: candle_core::Error) -> candle_core::Error {
    use candle_core::Error as E;
    match e {
        E::WithBacktrace { inner, .. } => without_backtrace(*inner),
        E::Context { inner, context } => E::Context {
            inner: Box::new(without_backtrace(*inner)),
            context,
        },
        E::WithPath { inner, path } => E::WithPath {
            inner: Box::new(without_backtrace(*inner)),
            path,
        },
        other => other,
    }
}
