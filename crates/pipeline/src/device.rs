//! Choosing the device and the dtype: `DEVICE` = `auto | cpu | cuda | cuda:N`,
//! `DTYPE` = `auto | f32 | f16 | bf16`.
//!
//! `auto` takes the first visible CUDA device when this build has CUDA (`--features cuda`) and
//! the driver opens it; otherwise it falls back to the CPU with a warning, never an error. An
//! explicit `cuda`/`cuda:N` that cannot be opened is an error ([`PipelineError::Device`]), since
//! silently running a GPU deployment on the CPU would be 50x slower.
//!
//! `CUDA_VISIBLE_DEVICES` is applied by the CUDA driver itself (ordinal N is the N-th *visible*
//! device); we read it only to refuse early when it hides every GPU, to check `N` against the
//! visible count, and to name the physical device in the label.

use std::fmt;
use std::str::FromStr;

use candle_core::{DType, Device};

use crate::{PipelineError, Result};

/// What the operator asked for with `DEVICE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceRequest {
    #[default]
    Auto,
    Cpu,
    /// `cuda` is `Cuda(0)`.
    Cuda(usize),
}

impl FromStr for DeviceRequest {
    type Err = PipelineError;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" | "" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" | "gpu" => Ok(Self::Cuda(0)),
            other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Ok(Self::Cuda(n)),
                _ => Err(PipelineError::Device(format!(
                    "DEVICE must be auto, cpu, cuda or cuda:N (got {s:?})"
                ))),
            },
        }
    }
}

impl fmt::Display for DeviceRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Auto => f.write_str("auto"),
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// What the operator asked for with `DTYPE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DTypeRequest {
    #[default]
    Auto,
    F32,
    F16,
    Bf16,
}

impl FromStr for DTypeRequest {
    type Err = PipelineError;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" | "" => Ok(Self::Auto),
            "f32" | "fp32" | "float32" => Ok(Self::F32),
            "f16" | "fp16" | "float16" | "half" => Ok(Self::F16),
            "bf16" | "bfloat16" => Ok(Self::Bf16),
            _ => Err(PipelineError::Device(format!(
                "DTYPE must be auto, f32, f16 or bf16 (got {s:?})"
            ))),
        }
    }
}

/// `CUDA_VISIBLE_DEVICES` as the driver reads it: `None` when unset (every GPU visible),
/// otherwise the listed entries up to the first invalid one (the driver ignores the rest).
pub fn visible_devices_from(value: Option<&str>) -> Option<Vec<String>> {
    let value = value?;
    let mut out = Vec::new();
    for entry in value.split(',').map(str::trim) {
        // "-1", "NoDevFiles" or garbage end the list; an empty value hides every device.
        let valid = !entry.is_empty()
            && (entry.chars().all(|c| c.is_ascii_digit())
                || entry.starts_with("GPU-")
                || entry.starts_with("MIG-"));
        if !valid {
            break;
        }
        out.push(entry.to_string());
    }
    Some(out)
}

fn visible_devices() -> Option<Vec<String>> {
    visible_devices_from(std::env::var("CUDA_VISIBLE_DEVICES").ok().as_deref())
}

/// The device the pipeline will run on, how to name it, and why it may not be what was asked.
#[derive(Debug, Clone)]
pub struct SelectedDevice {
    pub device: Device,
    /// `cpu`, `cuda:0`, or `cuda:0 (CUDA_VISIBLE_DEVICES entry 3)`.
    pub label: String,
    /// Set when `auto` fell back to the CPU, with the reason (log it as a warning).
    pub warning: Option<String>,
}

/// True when this binary was built with the CUDA backend.
pub fn cuda_compiled() -> bool {
    candle_core::utils::cuda_is_available()
}

/// Decides where a CUDA request can go, without touching the driver: `Err` says why not.
fn check_cuda_ordinal(n: usize, visible: Option<&[String]>) -> std::result::Result<String, String> {
    if !cuda_compiled() {
        return Err(
            "this sdserve binary was built without CUDA (cargo feature `cuda`); \
                    use the CUDA build, or DEVICE=cpu"
                .into(),
        );
    }
    match visible {
        Some([]) => Err("CUDA_VISIBLE_DEVICES hides every GPU".into()),
        Some(list) if n >= list.len() => Err(format!(
            "cuda:{n} requested but CUDA_VISIBLE_DEVICES makes only {} device(s) visible",
            list.len()
        )),
        Some(list) => Ok(format!("cuda:{n} (CUDA_VISIBLE_DEVICES entry {})", list[n])),
        None => Ok(format!("cuda:{n}")),
    }
}

/// Opens the CUDA device, turning a panic inside the driver bindings into an error.
fn open_cuda(n: usize) -> std::result::Result<Device, String> {
    match std::panic::catch_unwind(|| Device::new_cuda(n)) {
        Ok(Ok(d)) => {
            // Before any tensor exists: the settings apply to allocations made afterwards.
            crate::kernels::cuda::prepare_device(&d);
            Ok(d)
        }
        Ok(Err(e)) => Err(format!("cannot open CUDA device {n}: {e}")),
        Err(_) => Err(format!(
            "cannot open CUDA device {n}: the CUDA driver panicked"
        )),
    }
}

/// Resolves `DEVICE` to a device. `auto` never fails: it falls back to the CPU with a warning.
pub fn select_device(request: DeviceRequest) -> Result<SelectedDevice> {
    select_device_with(request, visible_devices().as_deref(), open_cuda)
}

/// [`select_device`] with the environment and the driver passed in (for tests).
pub fn select_device_with(
    request: DeviceRequest,
    visible: Option<&[String]>,
    open: impl Fn(usize) -> std::result::Result<Device, String>,
) -> Result<SelectedDevice> {
    let cpu = |warning| SelectedDevice {
        device: Device::Cpu,
        label: "cpu".into(),
        warning,
    };
    match request {
        DeviceRequest::Cpu => Ok(cpu(None)),
        DeviceRequest::Cuda(n) => {
            let label = check_cuda_ordinal(n, visible).map_err(PipelineError::Device)?;
            let device = open(n).map_err(PipelineError::Device)?;
            Ok(SelectedDevice {
                device,
                label,
                warning: None,
            })
        }
        DeviceRequest::Auto => {
            let attempt = check_cuda_ordinal(0, visible)
                .and_then(|label| open(0).map(|device| (device, label)));
            Ok(match attempt {
                Ok((device, label)) => SelectedDevice {
                    device,
                    label,
                    warning: None,
                },
                // No CUDA in this build is the normal CPU deployment: nothing to warn about.
                Err(_) if !cuda_compiled() => cpu(None),
                Err(why) => cpu(Some(format!("DEVICE=auto: {why}; running on the CPU"))),
            })
        }
    }
}

/// Resolves `DTYPE` for `device`: `auto` is f16 on CUDA (SD 1.5 in f16 is ~2 GB of weights and
/// runs on tensor cores) and f32 on the CPU (candle's CPU half kernels are slower than f32).
/// The warning, if any, is for the log.
pub fn select_dtype(request: DTypeRequest, device: &Device) -> (DType, Option<String>) {
    let on_gpu = !device.is_cpu();
    match request {
        DTypeRequest::Auto if on_gpu => (DType::F16, None),
        DTypeRequest::Auto | DTypeRequest::F32 => (DType::F32, None),
        DTypeRequest::F16 if !on_gpu => (
            DType::F16,
            Some(
                "DTYPE=f16 on the CPU is slower than f32 and less exact; use it to test only"
                    .into(),
            ),
        ),
        DTypeRequest::F16 => (DType::F16, None),
        // candle 0.11's CPU backend has no bf16 convolution: the UNet and VAE would fail.
        DTypeRequest::Bf16 if !on_gpu => (
            DType::F32,
            Some("DTYPE=bf16 is not supported on the CPU (no bf16 convolutions); using f32".into()),
        ),
        DTypeRequest::Bf16 => {
            // As on another GPU when SDSERVE_CUDA_ARCH_AS says so (kernels::cuda::arch).
            let capability = crate::kernels::cuda::arch::arch_as()
                .map(|a| ((a / 10) as i32, (a % 10) as i32))
                .or_else(|| cuda_compute_capability(device));
            let warning = match capability {
                Some((major, minor)) if major < 8 => Some(format!(
                    "DTYPE=bf16 on compute capability {major}.{minor}: no native bf16 before 8.0, expect it to be slow or fail; prefer f16"
                )),
                _ => None,
            };
            (DType::BF16, warning)
        }
    }
}

/// `"f32"`, `"f16"`, `"bf16"`.
pub fn dtype_label(dtype: DType) -> &'static str {
    dtype.as_str()
}

/// The GPU as /health shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct GpuInfo {
    pub name: String,
    pub compute_capability: Option<(i32, i32)>,
    pub memory_total_bytes: u64,
    pub memory_free_bytes: u64,
}

impl GpuInfo {
    pub fn memory_used_bytes(&self) -> u64 {
        self.memory_total_bytes
            .saturating_sub(self.memory_free_bytes)
    }
}

/// Name, compute capability and free/total memory of a CUDA device from the driver; `None` on
/// the CPU or when the driver does not answer.
pub fn gpu_info(device: &Device) -> Option<GpuInfo> {
    #[cfg(feature = "cuda-core")]
    {
        let ctx = device
            .as_cuda_device()
            .ok()?
            .cuda_stream()
            .context()
            .clone();
        let (free, total) = ctx.mem_get_info().ok()?;
        Some(GpuInfo {
            name: ctx.name().unwrap_or_else(|_| "unknown CUDA device".into()),
            compute_capability: ctx.compute_capability().ok(),
            memory_total_bytes: total as u64,
            memory_free_bytes: free as u64,
        })
    }
    #[cfg(not(feature = "cuda-core"))]
    {
        let _ = device;
        None
    }
}

/// `(major, minor)` of a CUDA device; `None` on the CPU.
pub fn cuda_compute_capability(device: &Device) -> Option<(i32, i32)> {
    #[cfg(feature = "cuda-core")]
    {
        let cuda = device.as_cuda_device().ok()?;
        cuda.cuda_stream().context().compute_capability().ok()
    }
    #[cfg(not(feature = "cuda-core"))]
    {
        let _ = device;
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn parses_device_strings() {
        assert_eq!(
            "auto".parse::<DeviceRequest>().unwrap(),
            DeviceRequest::Auto
        );
        assert_eq!(
            " CPU ".parse::<DeviceRequest>().unwrap(),
            DeviceRequest::Cpu
        );
        assert_eq!(
            "cuda".parse::<DeviceRequest>().unwrap(),
            DeviceRequest::Cuda(0)
        );
        assert_eq!(
            "cuda:3".parse::<DeviceRequest>().unwrap(),
            DeviceRequest::Cuda(3)
        );
        for bad in ["cuda:", "cuda:x", "tpu", "cuda:-1"] {
            assert!(matches!(
                bad.parse::<DeviceRequest>(),
                Err(PipelineError::Device(_))
            ));
        }
        assert_eq!(DeviceRequest::Cuda(2).to_string(), "cuda:2");
    }

    #[test]
    fn parses_dtype_strings() {
        assert_eq!("auto".parse::<DTypeRequest>().unwrap(), DTypeRequest::Auto);
        assert_eq!("fp16".parse::<DTypeRequest>().unwrap(), DTypeRequest::F16);
        assert_eq!("BF16".parse::<DTypeRequest>().unwrap(), DTypeRequest::Bf16);
        assert_eq!("f32".parse::<DTypeRequest>().unwrap(), DTypeRequest::F32);
        assert!("f8".parse::<DTypeRequest>().is_err());
    }

    #[test]
    fn reads_cuda_visible_devices_like_the_driver() {
        assert_eq!(visible_devices_from(None), None);
        assert_eq!(visible_devices_from(Some("")), Some(vec![]));
        assert_eq!(visible_devices_from(Some("-1")), Some(vec![]));
        assert_eq!(visible_devices_from(Some("NoDevFiles")), Some(vec![]));
        assert_eq!(visible_devices_from(Some("2, 0")), Some(list(&["2", "0"])));
        // The driver stops at the first invalid entry.
        assert_eq!(visible_devices_from(Some("1,-1,0")), Some(list(&["1"])));
        assert_eq!(
            visible_devices_from(Some("GPU-8f3a,1")),
            Some(list(&["GPU-8f3a", "1"]))
        );
    }

    #[test]
    fn cpu_is_always_cpu() {
        let s = select_device_with(DeviceRequest::Cpu, None, |_| panic!("not opened")).unwrap();
        assert!(s.device.is_cpu());
        assert_eq!(s.label, "cpu");
        assert!(s.warning.is_none());
    }

    #[test]
    fn auto_falls_back_to_cpu_and_never_fails() {
        // Whatever the build: a driver that fails, or no visible GPU, gives the CPU.
        let failing = |_| Err("CUDA_ERROR_NO_DEVICE".to_string());
        for visible in [None, Some(vec![]), Some(list(&["0"]))] {
            let s = select_device_with(DeviceRequest::Auto, visible.as_deref(), failing).unwrap();
            assert!(s.device.is_cpu());
            if cuda_compiled() {
                assert!(s.warning.unwrap().contains("running on the CPU"));
            } else {
                assert!(s.warning.is_none(), "a CPU build falls back silently");
            }
        }
        // A panicking driver binding does not crash auto either.
        let s = select_device_with(DeviceRequest::Auto, None, |n| {
            open_cuda_with(n, || panic!("boom"))
        })
        .unwrap();
        assert!(s.device.is_cpu());
    }

    fn open_cuda_with(
        n: usize,
        f: impl Fn() -> candle_core::Result<Device> + std::panic::UnwindSafe,
    ) -> std::result::Result<Device, String> {
        match std::panic::catch_unwind(f) {
            Ok(Ok(d)) => Ok(d),
            Ok(Err(e)) => Err(format!("cannot open CUDA device {n}: {e}")),
            Err(_) => Err(format!(
                "cannot open CUDA device {n}: the CUDA driver panicked"
            )),
        }
    }

    #[test]
    fn explicit_cuda_errors_say_why() {
        let ok = |_| Ok(Device::Cpu); // stands in for a device that opens
        let err = |r, v: Option<Vec<String>>| match select_device_with(r, v.as_deref(), ok) {
            Err(PipelineError::Device(m)) => m,
            other => panic!("expected a device error, got {other:?}"),
        };
        if !cuda_compiled() {
            assert!(err(DeviceRequest::Cuda(0), None).contains("built without CUDA"));
            return;
        }
        assert!(err(DeviceRequest::Cuda(0), Some(vec![])).contains("hides every GPU"));
        assert!(err(DeviceRequest::Cuda(2), Some(list(&["5", "6"]))).contains("only 2 device"));
        let s = select_device_with(DeviceRequest::Cuda(1), Some(&list(&["5", "6"])), ok).unwrap();
        assert_eq!(s.label, "cuda:1 (CUDA_VISIBLE_DEVICES entry 6)");
    }

    #[test]
    fn dtype_auto_follows_the_device() {
        assert_eq!(
            select_dtype(DTypeRequest::Auto, &Device::Cpu),
            (DType::F32, None)
        );
        let (d, w) = select_dtype(DTypeRequest::F16, &Device::Cpu);
        assert_eq!(d, DType::F16);
        assert!(w.is_some());
        let (d, w) = select_dtype(DTypeRequest::Bf16, &Device::Cpu);
        assert_eq!(d, DType::F32, "no bf16 convolutions on the CPU");
        assert!(w.unwrap().contains("not supported"));
        assert_eq!(
            select_dtype(DTypeRequest::F32, &Device::Cpu),
            (DType::F32, None)
        );
        assert_eq!(dtype_label(DType::BF16), "bf16");
    }

    #[test]
    fn no_gpu_info_on_cpu() {
        assert_eq!(gpu_info(&Device::Cpu), None);
        assert_eq!(cuda_compute_capability(&Device::Cpu), None);
    }
}
