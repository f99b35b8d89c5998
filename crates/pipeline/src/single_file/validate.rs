//! Load-time weight validation: float dtypes, sampled NaN/Inf, a folder's weight files and
//! variants.

use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use safetensors::Dtype;

use super::{read_json_value, weights};
use crate::error::{PipelineError, Result};

/// Number of elements looked at per tensor by the NaN/Inf check (evenly spaced, plus the last).
const FINITE_SAMPLES: usize = 4096;

/// Distance between the elements the NaN/Inf check looks at in a tensor of `n` elements: it
/// looks at `0, step, 2 * step, ..` and at the last one.
pub(crate) fn finite_sample_step(n: usize) -> usize {
    (n / FINITE_SAMPLES).max(1)
}

fn is_float(d: Dtype) -> bool {
    matches!(d, Dtype::F16 | Dtype::BF16 | Dtype::F32 | Dtype::F64)
}

/// Index of the first non-finite element among a sample of a float tensor's raw bytes.
pub(crate) fn first_non_finite(dtype: Dtype, data: &[u8]) -> Option<usize> {
    let es = dtype.bitsize() / 8;
    let n = data.len() / es.max(1);
    if n == 0 || !is_float(dtype) {
        return None;
    }
    let step = finite_sample_step(n);
    let bad = |i: usize| -> bool {
        let b = &data[i * es..(i + 1) * es];
        // All exponent bits set <=> Inf or NaN, in every IEEE format.
        match dtype {
            Dtype::F16 => u16::from_le_bytes([b[0], b[1]]) & 0x7C00 == 0x7C00,
            Dtype::BF16 => u16::from_le_bytes([b[0], b[1]]) & 0x7F80 == 0x7F80,
            Dtype::F32 => u32::from_le_bytes(b.try_into().expect("4")) & 0x7F80_0000 == 0x7F80_0000,
            Dtype::F64 => {
                u64::from_le_bytes(b.try_into().expect("8")) & 0x7FF0_0000_0000_0000
                    == 0x7FF0_0000_0000_0000
            }
            _ => false,
        }
    };
    (0..n)
        .step_by(step)
        .chain(std::iter::once(n - 1))
        .find(|&i| bad(i))
}

/// Checks every tensor of one safetensors file: weights are floating point (integer tensors only
/// for `position_ids`) and a sample of each tensor's values is finite. Errors name file and tensor.
pub fn validate_safetensors(path: &Path) -> Result<usize> {
    // SAFETY: read-only mapping of a file we do not modify.
    let st = unsafe { MmapedSafetensors::new(path) }.map_err(|e| weights(path, e))?;
    let tensors = st.tensors();
    for (name, view) in &tensors {
        check_view(path, name, view.dtype(), view.data())?;
        // SAFETY: `view` points into `st`'s read-only file mapping; the samples were read.
        unsafe { crate::weights::release_mapped(view.data()) };
    }
    Ok(tensors.len())
}

fn check_view(path: &Path, name: &str, dtype: Dtype, data: &[u8]) -> Result<()> {
    check_dtype(path, name, dtype)?;
    match first_non_finite(dtype, data) {
        Some(i) => Err(non_finite(path, name, i)),
        None => Ok(()),
    }
}

pub(super) fn check_dtype(path: &Path, name: &str, dtype: Dtype) -> Result<()> {
    if !is_float(dtype) && !name.ends_with("position_ids") {
        return Err(weights(
            path,
            format!("tensor `{name}` has dtype {dtype:?}; weights must be floating point"),
        ));
    }
    Ok(())
}

pub(super) fn non_finite(path: &Path, name: &str, element: usize) -> PipelineError {
    weights(
        path,
        format!("tensor `{name}` holds NaN or Inf (element {element})"),
    )
}

/// The diffusers variant in a weight file name (`.safetensors` or pickle `.bin`):
/// `model.fp16.safetensors` -> `fp16`, `model.fp16-00001-of-00002.safetensors` -> `fp16`,
/// `diffusion_pytorch_model.non_ema.bin` -> `non_ema`; plain names have none.
pub fn weight_variant(file_name: &str) -> Option<&str> {
    let stem = file_name
        .strip_suffix(".safetensors")
        .or_else(|| file_name.strip_suffix(".bin"))?;
    // Drop a shard suffix `-00001-of-00002`.
    let stem = match stem.rsplit_once("-of-") {
        Some((head, tail)) if tail.chars().all(|c| c.is_ascii_digit()) => head
            .rsplit_once('-')
            .filter(|(_, n)| n.chars().all(|c| c.is_ascii_digit()))
            .map_or(stem, |(h, _)| h),
        _ => stem,
    };
    stem.rsplit_once('.').map(|(_, v)| v)
}

/// The weight files of one component folder (`unet/`, `vae/`, `text_encoder/`): the fp16
/// variant (`*.fp16.safetensors`, all shards) when `prefer_fp16` and present, else the plain
/// ones, else the fp16 ones. Other variants (`non_ema`, `ema`) are never picked.
pub fn component_weight_files(dir: &Path, prefer_fp16: bool) -> Result<Vec<PathBuf>> {
    let mut plain = Vec::new();
    let mut fp16 = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| PipelineError::io(dir, e))? {
        let p = entry.map_err(|e| PipelineError::io(dir, e))?.path();
        let name = p
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_string();
        if !name.ends_with(".safetensors") {
            continue;
        }
        match weight_variant(&name) {
            None => plain.push(p),
            Some("fp16") => fp16.push(p),
            Some(_) => {}
        }
    }
    plain.sort();
    fp16.sort();
    let pick = if (prefer_fp16 && !fp16.is_empty()) || plain.is_empty() {
        fp16
    } else {
        plain
    };
    if pick.is_empty() {
        return Err(weights(dir, "no .safetensors weights in this folder"));
    }
    Ok(pick)
}

/// Validates a diffusers folder's weights (dtype, sampled NaN/Inf) and that its configs parse.
/// Shapes are checked against the configs by loading through [`checked_var_builder`].
pub fn validate_folder(dir: &Path) -> Result<()> {
    for comp in ["unet", "vae", "text_encoder"] {
        let cdir = dir.join(comp);
        read_json_value(&cdir.join("config.json"))?;
        for f in component_weight_files(&cdir, false)? {
            validate_safetensors(&f)?;
        }
    }
    read_json_value(&dir.join("scheduler/scheduler_config.json"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weight_files_skip_other_variants() {
        let dir = std::env::temp_dir().join(format!("sdserve-variants-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        for n in [
            "diffusion_pytorch_model.safetensors",
            "diffusion_pytorch_model.fp16.safetensors",
            "diffusion_pytorch_model.non_ema.safetensors",
            "diffusion_pytorch_model.bin",
        ] {
            std::fs::write(dir.join(n), b"").unwrap();
        }
        let names = |v: Vec<PathBuf>| -> Vec<String> {
            v.iter()
                .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
                .collect()
        };
        assert_eq!(
            names(component_weight_files(&dir, false).unwrap()),
            ["diffusion_pytorch_model.safetensors"]
        );
        assert_eq!(
            names(component_weight_files(&dir, true).unwrap()),
            ["diffusion_pytorch_model.fp16.safetensors"]
        );
        std::fs::remove_file(dir.join("diffusion_pytorch_model.safetensors")).unwrap();
        assert_eq!(
            names(component_weight_files(&dir, false).unwrap()),
            ["diffusion_pytorch_model.fp16.safetensors"]
        );
        assert_eq!(
            weight_variant("model.fp16-00001-of-00002.safetensors"),
            Some("fp16")
        );
        assert_eq!(weight_variant("model-00001-of-00002.safetensors"), None);
        assert_eq!(
            weight_variant("pytorch_model.fp16-00001-of-00002.bin"),
            Some("fp16")
        );
        assert_eq!(weight_variant("pytorch_model-00001-of-00002.bin"), None);
        assert_eq!(
            weight_variant("diffusion_pytorch_model.non_ema.bin"),
            Some("non_ema")
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn finite_check_sees_nan_and_inf_in_every_float_format() {
        let f32s: Vec<u8> = [1.0f32, f32::NAN]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        assert_eq!(first_non_finite(Dtype::F32, &f32s), Some(1));
        let ok: Vec<u8> = [1.0f32, -2.0]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        assert_eq!(first_non_finite(Dtype::F32, &ok), None);
        assert_eq!(
            first_non_finite(Dtype::F16, &[0x00, 0x3C, 0x00, 0x7C]),
            Some(1)
        ); // 1.0, +inf
        assert_eq!(
            first_non_finite(Dtype::BF16, &[0x80, 0x3F, 0xC0, 0xFF]),
            Some(1)
        ); // 1.0, NaN
        assert_eq!(first_non_finite(Dtype::F16, &[0xFF, 0x7B]), None); // f16::MAX
    }
}
