//! Resolved runtime settings: device, dtype, logging; and process memory for the logs.

use candle_core::{DType, Device};
use sdserve_pipeline::device::{select_device, select_dtype, DTypeRequest, DeviceRequest};
use sdserve_pipeline::PipelineError;

use crate::cli::{DtypeArg, LogFormat};

/// The device and dtype this process runs on, chosen by the pipeline's `device` module
/// (`DEVICE` = auto|cpu|cuda|cuda:N, `DTYPE` = auto|f32|f16|bf16).
#[derive(Debug, Clone)]
pub struct Runtime {
    pub device: Device,
    /// `cpu`, `cuda:0`, ... for logs and /health.
    pub label: String,
    pub dtype: DType,
    /// Why the choice differs from the request, for the log.
    pub warnings: Vec<String>,
}

pub fn select_runtime(device: &str, dtype: DtypeArg) -> Result<Runtime, String> {
    let req: DeviceRequest = device.parse().map_err(|e: PipelineError| e.to_string())?;
    let dreq = match dtype {
        DtypeArg::Auto => DTypeRequest::Auto,
        DtypeArg::F32 => DTypeRequest::F32,
        DtypeArg::F16 => DTypeRequest::F16,
        DtypeArg::Bf16 => DTypeRequest::Bf16,
    };
    let sel = select_device(req).map_err(|e| e.to_string())?;
    let (dtype, dwarn) = select_dtype(dreq, &sel.device);
    Ok(Runtime {
        device: sel.device,
        label: sel.label,
        dtype,
        warnings: sel.warning.into_iter().chain(dwarn).collect(),
    })
}

pub fn dtype_label(d: DType) -> &'static str {
    d.as_str()
}

/// Resident memory of this process in MiB (Linux), for the start-up and model-ready logs.
pub fn rss_mb() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024)
}

/// Installs the tracing subscriber (stdout; JSON or text).
pub fn init_logging(level: &str, format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_new(level).unwrap_or_else(|e| {
        eprintln!("LOG_LEVEL {level:?} is not a valid filter ({e}); using info");
        EnvFilter::new("info")
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stdout);
    let _ = match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
        LogFormat::Text => builder.with_ansi(false).try_init(),
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_runtime_and_bad_strings() {
        let rt = select_runtime("cpu", DtypeArg::Auto).unwrap();
        assert!(rt.device.is_cpu());
        assert_eq!((rt.label.as_str(), rt.dtype), ("cpu", DType::F32));
        let err = select_runtime("tpu", DtypeArg::Auto).unwrap_err();
        assert!(err.contains("DEVICE"), "{err}");
    }
}
