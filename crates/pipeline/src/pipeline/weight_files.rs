//! Which files hold a component's weights in a diffusers folder, with diffusers' precedence.
//!
//! diffusers 0.42 (`ModelMixin.from_pretrained`, `_get_model_file`, `_fetch_index_file`;
//! `DiffusionPipeline`'s `_identify_model_variants`) and transformers (`CLIPTextModel`) choose:
//! first the variant (the `fp16` files when a half-precision load asks for them and the folder
//! has any), then the format: safetensors (one file, or shards listed by an index), and the
//! PyTorch pickle `.bin` (one file, or shards) only when that variant has no safetensors. So a
//! folder of only `.bin` files loads, and a folder with both never reads the pickle. `.bin`
//! files are read by [`crate::ckpt`], which builds tensors and never runs pickle code.
//!
//! Names: diffusers models `diffusion_pytorch_model.safetensors` / `.bin`; transformers models
//! `model.safetensors` / `pytorch_model.bin`. A variant goes before the extension
//! (`diffusion_pytorch_model.fp16.bin`), shard indexes are `<weights>.index.json` and
//! `<weights>.index.fp16.json` (and the deprecated `<weights>.fp16.index.json` diffusers still
//! reads). We go further than diffusers in two places: an f32 load takes the fp16 files when
//! they are all the folder has (some repos publish only those), and sharded `.bin` diffusers
//! models load without diffusers' `use_safetensors=False`.

use std::path::{Path, PathBuf};

use candle_core::DType;

use crate::error::read_json;
use crate::{PipelineError, Result};

/// The variant whose files half precision prefers.
const HALF: &str = "fp16";

/// The pickle file stem that goes with a safetensors stem: transformers writes
/// `model.safetensors` but `pytorch_model.bin`; diffusers uses one stem for both.
fn pickle_stem(safetensors_stem: &str) -> String {
    if safetensors_stem == "model" {
        "pytorch_model".to_string()
    } else {
        safetensors_stem.to_string()
    }
}

/// Weight files of one component (`component` is a subfolder of `dir`, or `""` for a one-model
/// folder such as TAESD) whose safetensors stem is `stem` (`diffusion_pytorch_model`, or
/// `model` for the text encoder), in diffusers' precedence (see the module documentation):
/// for `dtype` f16 the `fp16` variant, else the plain files, else the other; in each, the
/// safetensors before the `.bin`.
pub fn component_weight_files(
    dir: &Path,
    component: &str,
    stem: &str,
    dtype: DType,
) -> Result<Vec<PathBuf>> {
    let folder = dir.join(component);
    let variants = if dtype == DType::F16 {
        [Some(HALF), None]
    } else {
        [None, Some(HALF)]
    };
    let pickle = pickle_stem(stem);
    let mut looked_for = Vec::new();
    for variant in variants {
        for (stem, ext) in [(stem, "safetensors"), (pickle.as_str(), "bin")] {
            let single = with_variant(&format!("{stem}.{ext}"), variant);
            let path = folder.join(&single);
            if path.is_file() {
                return Ok(vec![path]);
            }
            for index in index_names(stem, ext, variant) {
                let index_path = folder.join(&index);
                if index_path.is_file() {
                    return shards(&folder, &index_path);
                }
            }
            looked_for.push(single);
        }
    }
    Err(PipelineError::Weights {
        path: folder,
        message: format!(
            "no weights: expected one of {} (or their sharded .index.json forms)",
            looked_for.join(", ")
        ),
    })
}

/// `name` with the variant before its extension: `model.safetensors` -> `model.fp16.safetensors`.
fn with_variant(name: &str, variant: Option<&str>) -> String {
    match (variant, name.rsplit_once('.')) {
        (Some(v), Some((base, ext))) => format!("{base}.{v}.{ext}"),
        _ => name.to_string(),
    }
}

/// The index file names of sharded weights: `<stem>.<ext>.index.json`; with a variant,
/// `<stem>.<ext>.index.<v>.json` and the deprecated `<stem>.<ext>.<v>.index.json`.
fn index_names(stem: &str, ext: &str, variant: Option<&str>) -> Vec<String> {
    match variant {
        None => vec![format!("{stem}.{ext}.index.json")],
        Some(v) => vec![
            format!("{stem}.{ext}.index.{v}.json"),
            format!("{stem}.{ext}.{v}.index.json"),
        ],
    }
}

/// The shard files an index lists (`weight_map` values), each once, sorted. A shard must be a
/// file name in the index's folder: an index cannot point the loader elsewhere.
fn shards(folder: &Path, index_path: &Path) -> Result<Vec<PathBuf>> {
    #[derive(serde::Deserialize)]
    struct ShardIndex {
        weight_map: std::collections::BTreeMap<String, String>,
    }
    let index: ShardIndex = read_json(index_path)?;
    let mut files = Vec::new();
    for name in index.weight_map.values() {
        let plain = Path::new(name)
            .file_name()
            .is_some_and(|f| f == name.as_str());
        if !plain || name == ".." {
            return Err(PipelineError::Weights {
                path: index_path.to_path_buf(),
                message: format!("shard `{name}` is not a file name in the index's folder"),
            });
        }
        files.push(folder.join(name));
    }
    files.sort();
    files.dedup();
    if files.is_empty() {
        return Err(PipelineError::Weights {
            path: index_path.to_path_buf(),
            message: "the index lists no shards".into(),
        });
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scratch folder holding `unet/<f>` (empty files; an index lists `-00001-of-00002` and
    /// `-00002-of-00002` shards named after it) for each `f`.
    fn folder_with(tag: &str, files: &[&str]) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("sdserve-weights-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("unet")).unwrap();
        for f in files {
            let body = if f.ends_with(".json") {
                let base = f.split(".index").next().unwrap();
                let (stem, ext) = base.split_once('.').unwrap();
                let shard = |i| format!("{stem}-0000{i}-of-00002.{ext}");
                serde_json::json!({"weight_map": {"a": shard(1), "b": shard(2), "c": shard(1)}})
                    .to_string()
            } else {
                String::new()
            };
            std::fs::write(dir.join("unet").join(f), body).unwrap();
        }
        dir
    }

    fn chosen(dir: &Path, stem: &str, dtype: DType) -> Vec<String> {
        component_weight_files(dir, "unet", stem, dtype)
            .unwrap()
            .iter()
            .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
            .collect()
    }

    const D: &str = "diffusion_pytorch_model";

    #[test]
    fn precision_picks_its_variant_and_falls_back_to_the_other() {
        let both = folder_with(
            "both",
            &[
                "diffusion_pytorch_model.safetensors",
                "diffusion_pytorch_model.fp16.safetensors",
            ],
        );
        assert_eq!(chosen(&both, D, DType::F32), [format!("{D}.safetensors")]);
        assert_eq!(
            chosen(&both, D, DType::F16),
            [format!("{D}.fp16.safetensors")]
        );

        let half_only = folder_with("half", &["diffusion_pytorch_model.fp16.safetensors"]);
        assert_eq!(
            chosen(&half_only, D, DType::F32),
            [format!("{D}.fp16.safetensors")]
        );

        let none = folder_with("none", &["diffusion_pytorch_model.non_ema.safetensors"]);
        let err = component_weight_files(&none, "unet", D, DType::F32).unwrap_err();
        assert!(matches!(err, PipelineError::Weights { .. }));
        assert!(
            err.to_string().contains("diffusion_pytorch_model.bin"),
            "{err}"
        );
        for dir in [both, half_only, none] {
            std::fs::remove_dir_all(dir).unwrap();
        }
    }

    #[test]
    fn pickle_weights_only_when_the_variant_has_no_safetensors() {
        // Both formats: the pickle is never read.
        let both = folder_with(
            "formats",
            &[
                "diffusion_pytorch_model.bin",
                "diffusion_pytorch_model.safetensors",
                "diffusion_pytorch_model.fp16.bin",
            ],
        );
        assert_eq!(chosen(&both, D, DType::F32), [format!("{D}.safetensors")]);
        // The variant comes first (diffusers' variant=fp16 takes `.fp16.bin` over the plain
        // safetensors), then the format.
        assert_eq!(chosen(&both, D, DType::F16), [format!("{D}.fp16.bin")]);

        let pickles = folder_with("pickles", &["diffusion_pytorch_model.bin"]);
        assert_eq!(chosen(&pickles, D, DType::F32), [format!("{D}.bin")]);
        assert_eq!(chosen(&pickles, D, DType::F16), [format!("{D}.bin")]);

        // transformers' names: model.safetensors but pytorch_model.bin.
        let te = folder_with("te", &["pytorch_model.bin", "model.fp16.safetensors"]);
        assert_eq!(chosen(&te, "model", DType::F32), ["pytorch_model.bin"]);
        assert_eq!(chosen(&te, "model", DType::F16), ["model.fp16.safetensors"]);
        for dir in [both, pickles, te] {
            std::fs::remove_dir_all(dir).unwrap();
        }
    }

    #[test]
    fn shards_are_read_from_the_index_diffusers_names() {
        let te = folder_with("shards", &["pytorch_model.bin.index.json"]);
        assert_eq!(
            chosen(&te, "model", DType::F32),
            [
                "pytorch_model-00001-of-00002.bin",
                "pytorch_model-00002-of-00002.bin"
            ]
        );
        // The variant index is `<weights>.index.fp16.json` (and the legacy `.fp16.index.json`).
        let half = folder_with(
            "half-shards",
            &[
                "diffusion_pytorch_model.safetensors.index.fp16.json",
                "model.safetensors.fp16.index.json",
            ],
        );
        assert_eq!(
            chosen(&half, D, DType::F16),
            [
                format!("{D}-00001-of-00002.safetensors"),
                format!("{D}-00002-of-00002.safetensors")
            ]
        );
        assert_eq!(chosen(&half, "model", DType::F16).len(), 2);

        // An index cannot point outside its folder.
        let escape = folder_with("escape", &[]);
        std::fs::write(
            escape.join("unet/diffusion_pytorch_model.bin.index.json"),
            r#"{"weight_map": {"a": "../../secret.bin"}}"#,
        )
        .unwrap();
        let e = component_weight_files(&escape, "unet", D, DType::F32).unwrap_err();
        assert!(e.to_string().contains("not a file name"), "{e}");
        for dir in [te, half, escape] {
            std::fs::remove_dir_all(dir).unwrap();
        }
    }
}
