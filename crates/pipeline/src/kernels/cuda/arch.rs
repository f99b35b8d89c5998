//! The GPU architecture the host's choices follow, and where our kernels' PTX comes from.
//!
//! Every choice that depends on the compute capability is made from here, so one switch drives
//! them all:
//! - kernels.cu's compile target: NVRTC `compute_N` for the device ([`kernel_arch`]);
//! - attention: tensor cores (`mma.sync`) from sm_80, CUDA cores below (`attn::attention`);
//! - cuDNN convolutions: f32 compute type on every architecture; tensor-op math from sm_70,
//!   FMA math below (no tensor cores before Volta) ([`tensor_cores`], `conv.rs`);
//! - cuBLAS GEMMs: f32 compute on every architecture (candle's default, no reduced precision);
//!   tensor cores allowed from sm_70, pedantic math (no tensor cores) below ([`prepare`]; the
//!   cuBLASLt linear layers take the same choice as their compute type, [`blas_pedantic`]);
//! - the bf16 warning below 8.0 (`device::select_dtype`).
//!
//! `SDSERVE_CUDA_ARCH_AS=61` makes all of them as on that capability whatever the device is:
//! with `SDSERVE_CUDA_KERNELS_PTX=<file>` (kernels.cu as PTX for sm_61, from
//! tools/kernels_ptx.py with NVRTC 12) a CUDA 13 GPU runs the GTX 1060 build's own device
//! code and choices (`scripts/build-cuda.sh sm61-on-cu13`, docs/GPU.md "Pascal"). Which
//! kernels cuDNN and cuBLAS pick inside those settings is still theirs, by the real device.

use std::path::PathBuf;
use std::sync::OnceLock;

/// From this compute capability cuDNN and cuBLAS may use tensor cores (Volta).
pub const TENSOR_CORES: u32 = 70;
/// From this compute capability our attention runs on tensor cores (`mma.sync` m16n8k16 f16).
pub const MMA_ATTENTION: u32 = 80;

/// `61`, `6.1` or `sm_61` as 61.
fn parse_arch(s: &str) -> Option<u32> {
    let s = s.trim();
    let s = s.strip_prefix("sm_").unwrap_or(s);
    let a = match s.split_once('.') {
        Some((major, minor)) => major.parse::<u32>().ok()? * 10 + minor.parse::<u32>().ok()?,
        None => s.parse::<u32>().ok()?,
    };
    (10..=200).contains(&a).then_some(a)
}

/// The capability `SDSERVE_CUDA_ARCH_AS` asks the host to choose for (read once); `None`:
/// the device's own.
pub fn arch_as() -> Option<u32> {
    static AS: OnceLock<Option<u32>> = OnceLock::new();
    *AS.get_or_init(|| parse_arch(&std::env::var("SDSERVE_CUDA_ARCH_AS").ok()?))
}

/// `SDSERVE_CUDA_KERNELS_PTX`: kernels.cu's PTX to load instead of compiling it with NVRTC.
pub fn kernels_ptx_path() -> Option<PathBuf> {
    std::env::var_os("SDSERVE_CUDA_KERNELS_PTX")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// The architecture of a PTX module's `.target sm_NN` line.
pub fn ptx_target(ptx: &str) -> Option<u32> {
    let line = ptx
        .lines()
        .find(|l| l.trim_start().starts_with(".target"))?;
    let target = line.split_whitespace().nth(1)?.trim_end_matches(',');
    parse_arch(target.trim_end_matches('a').trim_end_matches('f'))
}

/// Reads a PTX file of kernels.cu and its target architecture; the error names the variable,
/// the file and what is wrong with it.
pub fn read_kernels_ptx(path: &std::path::Path) -> Result<(u32, String), String> {
    let what = format!("SDSERVE_CUDA_KERNELS_PTX={}", path.display());
    let ptx = std::fs::read_to_string(path).map_err(|e| format!("{what}: {e}"))?;
    let arch =
        ptx_target(&ptx).ok_or_else(|| format!("{what}: no `.target sm_NN` line, not PTX"))?;
    Ok((arch, ptx))
}

/// Whether cuDNN and cuBLAS may use tensor cores on `arch`.
pub fn tensor_cores(arch: u32) -> bool {
    arch >= TENSOR_CORES
}

#[cfg(feature = "cuda-core")]
pub(super) use gpu::*;

#[cfg(feature = "cuda-core")]
mod gpu {
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex, OnceLock};

    use candle_core::cuda_backend::cudarc::cublas::sys as cublas;
    use candle_core::cuda_backend::{CudaDevice, DeviceId, WrapErr};
    use candle_core::Result;

    use super::*;

    /// The capability the host chooses for: `SDSERVE_CUDA_ARCH_AS`, else the device's (asked
    /// once per device: convolutions ask on every call).
    pub fn host_arch(dev: &CudaDevice) -> Result<u32> {
        static SEEN: OnceLock<Mutex<HashMap<DeviceId, u32>>> = OnceLock::new();
        if let Some(a) = arch_as() {
            return Ok(a);
        }
        let seen = SEEN.get_or_init(Default::default);
        if let Some(a) = seen.lock().unwrap().get(&dev.id()) {
            return Ok(*a);
        }
        let (major, minor) = dev.cuda_stream().context().compute_capability().w()?;
        let a = (major * 10 + minor) as u32;
        seen.lock().unwrap().insert(dev.id(), a);
        Ok(a)
    }

    /// kernels.cu's PTX from `SDSERVE_CUDA_KERNELS_PTX` with its target, read once; `None` when
    /// unset (NVRTC compiles it).
    pub fn kernels_ptx_file() -> Result<Option<Arc<(u32, String)>>> {
        type Loaded = std::result::Result<Option<Arc<(u32, String)>>, String>;
        static FILE: OnceLock<Loaded> = OnceLock::new();
        let loaded = FILE.get_or_init(|| {
            let Some(path) = kernels_ptx_path() else {
                return Ok(None);
            };
            Ok(Some(Arc::new(read_kernels_ptx(&path)?)))
        });
        loaded.clone().map_err(candle_core::Error::Msg)
    }

    /// The compute capability kernels.cu is compiled for, which also picks the attention
    /// kernel: the PTX file's target when one is given, else `SDSERVE_CUDA_KERNEL_ARCH` (an
    /// older NVRTC target, for A/B runs), else [`host_arch`].
    pub fn kernel_arch(dev: &CudaDevice) -> Result<u32> {
        if let Some(file) = kernels_ptx_file()? {
            return Ok(file.0);
        }
        if let Some(a) = std::env::var("SDSERVE_CUDA_KERNEL_ARCH")
            .ok()
            .and_then(|s| parse_arch(&s))
        {
            return Ok(a);
        }
        host_arch(dev)
    }

    /// Whether GEMMs run in pedantic math (f32 FMA kernels, no tensor cores): below sm_70, or
    /// as `SDSERVE_CUBLAS_MATH=default|pedantic` says. cuBLAS takes it as the handle's math
    /// mode ([`prepare`]), cuBLASLt as the compute type (`lt.rs`).
    pub fn blas_pedantic(dev: &CudaDevice) -> Result<bool> {
        Ok(
            match std::env::var("SDSERVE_CUBLAS_MATH")
                .as_deref()
                .map(str::trim)
            {
                Ok("pedantic") => true,
                Ok("default") => false,
                _ => !tensor_cores(host_arch(dev)?),
            },
        )
    }

    /// Library settings that depend on the architecture, once per device: below sm_70 cuBLAS
    /// runs in pedantic math (f32 FMA kernels, no tensor cores: what a Pascal card runs);
    /// `SDSERVE_CUBLAS_MATH=default|pedantic` overrides for A/B runs.
    pub fn prepare(dev: &CudaDevice) -> Result<()> {
        if blas_pedantic(dev)? {
            let blas = dev.cublas_handle();
            // SAFETY: a live handle of this device; the mode applies to its later GEMMs.
            let status = unsafe {
                cublas::cublasSetMathMode(
                    *blas.handle(),
                    cublas::cublasMath_t::CUBLAS_PEDANTIC_MATH,
                )
            };
            if status != cublas::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
                candle_core::bail!("cublasSetMathMode(PEDANTIC): {status:?}");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arch_spellings() {
        assert_eq!(parse_arch("61"), Some(61));
        assert_eq!(parse_arch(" 6.1 "), Some(61));
        assert_eq!(parse_arch("sm_90"), Some(90));
        assert_eq!(parse_arch("12.0"), Some(120));
        assert_eq!(parse_arch("pascal"), None);
        assert_eq!(parse_arch("6"), None);
    }

    #[test]
    fn ptx_target_line() {
        let ptx = "//\n// Generated by NVIDIA NVVM Compiler\n.version 8.4\n.target sm_61\n.address_size 64\n";
        assert_eq!(ptx_target(ptx), Some(61));
        assert_eq!(ptx_target(".version 8.8\n.target sm_90a\n"), Some(90));
        assert_eq!(ptx_target("not ptx"), None);
        assert!(!tensor_cores(61) && tensor_cores(75) && tensor_cores(90));
    }

    #[test]
    fn kernels_ptx_file_is_read_with_its_target() {
        let dir = std::env::temp_dir().join(format!("sdserve-arch-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("k.ptx");
        std::fs::write(&good, ".version 8.4\n.target sm_61\n.address_size 64\n").unwrap();
        let (arch, ptx) = read_kernels_ptx(&good).unwrap();
        assert_eq!(arch, 61);
        assert!(ptx.contains(".address_size 64"));
        let bad = dir.join("k.cu");
        std::fs::write(&bad, "extern \"C\" __global__ void k() {}\n").unwrap();
        let e = read_kernels_ptx(&bad).unwrap_err();
        assert!(
            e.contains("SDSERVE_CUDA_KERNELS_PTX=") && e.contains("not PTX"),
            "{e}"
        );
        let e = read_kernels_ptx(&dir.join("missing.ptx")).unwrap_err();
        assert!(e.contains("missing.ptx"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
