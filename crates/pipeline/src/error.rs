//! The pipeline's one error type.

use std::path::PathBuf;

pub type Result<T, E = PipelineError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A config file is missing, is not valid JSON, or holds a value we cannot use.
    #[error("bad config {path}: {message}")]
    Config { path: PathBuf, message: String },
    /// A weight file does not hold what the config implies (missing tensor, wrong shape or dtype).
    #[error("bad weights in {path}: {message}")]
    Weights { path: PathBuf, message: String },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The request asks for something the model cannot do (e.g. a size not divisible by the VAE factor).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// The per-step hook asked the run to stop.
    #[error("generation cancelled")]
    Cancelled,
    /// The device could not allocate what this request needs (e.g. CUDA out of memory). Only
    /// the request failed: what it held is freed and the model stays loaded.
    #[error("out of memory on the device: {0}")]
    OutOfMemory(String),
    /// The requested device cannot be used (not in this build, absent, or hidden by
    /// CUDA_VISIBLE_DEVICES).
    #[error("device: {0}")]
    Device(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl PipelineError {
    pub fn config(path: impl Into<PathBuf>, message: impl std::fmt::Display) -> Self {
        Self::Config {
            path: path.into(),
            message: message.to_string(),
        }
    }
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
}

/// Reads and parses a JSON config file into `T` as Python's `json` does ([`crate::config_json`]),
/// with errors naming the file.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &std::path::Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| PipelineError::io(path, e))?;
    crate::config_json::from_str(&text).map_err(|e| PipelineError::config(path, e))
}
