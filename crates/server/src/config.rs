//! Resolved runtime settings: device, dtype, logging; and process memory for the logs.

use candle_core::{DType, Device};

use crate::cli::{DtypeArg, LogFormat};

/// A device choice, resolved without touching the device yet (creation happens on the worker).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceChoice {
    Cpu,
    Cuda(usize),
}

impl DeviceChoice {
    /// `auto` picks CUDA device 0 when this build has CUDA and a device is present.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(if candle_core::utils::cuda_is_available() {
                Self::Cuda(0)
            } else {
                Self::Cpu
            }),
            "cpu" => Ok(Self::Cpu),
            "cuda" | "gpu" => Ok(Self::Cuda(0)),
            other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Ok(Self::Cuda(n)),
                _ => Err(format!(
                    "DEVICE must be auto, cpu, cuda or cuda:N (got {s:?})"
                )),
            },
        }
    }

    pub fn label(self) -> String {
        match self {
            Self::Cpu => "cpu".into(),
            Self::Cuda(n) => format!("cuda:{n}"),
        }
    }

    pub fn create(self) -> Result<Device, String> {
        match self {
            Self::Cpu => Ok(Device::Cpu),
            Self::Cuda(n) => {
                Device::new_cuda(n).map_err(|e| format!("cannot open CUDA device {n}: {e}"))
            }
        }
    }

    pub fn dtype(self, arg: DtypeArg) -> DType {
        match (arg, self) {
            (DtypeArg::Auto, Self::Cpu) => DType::F32,
            (DtypeArg::Auto, Self::Cuda(_)) => DType::F16,
            (DtypeArg::F32, _) => DType::F32,
            (DtypeArg::F16, _) => DType::F16,
            (DtypeArg::Bf16, _) => DType::BF16,
        }
    }
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
    fn device_strings() {
        assert_eq!(DeviceChoice::parse("cpu").unwrap(), DeviceChoice::Cpu);
        assert_eq!(DeviceChoice::parse("cuda").unwrap(), DeviceChoice::Cuda(0));
        assert_eq!(
            DeviceChoice::parse("CUDA:3").unwrap(),
            DeviceChoice::Cuda(3)
        );
        assert!(DeviceChoice::parse("cuda:x").is_err());
        assert!(DeviceChoice::parse("tpu").is_err());
        assert_eq!(DeviceChoice::Cpu.dtype(DtypeArg::Auto), DType::F32);
        assert_eq!(DeviceChoice::Cuda(0).dtype(DtypeArg::Auto), DType::F16);
        assert_eq!(DeviceChoice::Cuda(1).label(), "cuda:1");
    }
}
