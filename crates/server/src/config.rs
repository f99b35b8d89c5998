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
    refuse_half_on_cpu(dtype, &sel.device, sel.warning.as_deref())?;
    let (dtype, dwarn) = select_dtype(dreq, &sel.device);
    Ok(Runtime {
        device: sel.device,
        label: sel.label,
        dtype,
        warnings: sel.warning.into_iter().chain(dwarn).collect(),
    })
}

/// DTYPE=f16 on the CPU is refused: candle's CPU backend has no fast half-precision kernels,
/// so it runs far slower than f32 for no better image. `fallback` is why `auto` chose the CPU.
pub fn refuse_half_on_cpu(
    dtype: DtypeArg,
    device: &Device,
    fallback: Option<&str>,
) -> Result<(), String> {
    if dtype != DtypeArg::F16 || !device.is_cpu() {
        return Ok(());
    }
    let why = fallback.map_or(String::new(), |w| {
        format!(" (DEVICE=auto chose the CPU: {w})")
    });
    Err(format!(
        "DTYPE=f16 is refused on the CPU{why}: the CPU has no fast half-precision kernels, so f16 \
         runs many times slower than f32 and makes no better image. On the CPU use DTYPE=auto or \
         f32; f16 is for CUDA GPUs (DEVICE=cuda with a CUDA build, see docs/GPU.md)."
    ))
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

    #[test]
    fn half_precision_is_refused_on_the_cpu() {
        let err = select_runtime("cpu", DtypeArg::F16).unwrap_err();
        assert!(err.contains("DTYPE=f16") && err.contains("f32"), "{err}");
        let rt = select_runtime("cpu", DtypeArg::F32).unwrap();
        assert_eq!(rt.dtype, DType::F32);
        // bf16 falls back to f32 on the CPU with a warning (no bf16 convolutions there).
        let rt = select_runtime("cpu", DtypeArg::Bf16).unwrap();
        assert_eq!(rt.dtype, DType::F32);
        assert!(!rt.warnings.is_empty());
    }
}
