//! Which files of a diffusers repo we fetch: configs, tokenizer, and the safetensors of the
//! chosen precision for unet / vae / text_encoder. Nothing else (no safety_checker,
//! feature_extractor, `.bin`/`.ckpt`, README, root-level single files).

/// Components whose weights the pipeline loads.
pub const COMPONENTS: [&str; 3] = ["unet", "vae", "text_encoder"];

/// The diffusers variant of a weight file name: `model.fp16.safetensors` -> `fp16`,
/// `model.fp16-00001-of-00002.safetensors` -> `fp16`, `model.safetensors.index.fp16.json` -> `fp16`,
/// `diffusion_pytorch_model.non_ema.safetensors` -> `non_ema`; plain files have none.
fn variant(name: &str) -> Option<&str> {
    if let Some((_, rest)) = name.split_once(".safetensors.index.") {
        return rest.strip_suffix("json").and_then(|v| v.strip_suffix('.'));
    }
    sdserve_pipeline::single_file::weight_variant(name)
}

fn is_weights(name: &str) -> bool {
    name.ends_with(".safetensors")
        || (name.contains(".safetensors.index.") && name.ends_with(".json"))
}

/// Of one component's weight files: the `fp16` variant when `fp16` and the repo has it, else the
/// plain files, falling back to the variant when that is all there is (empty: no weights).
fn pick_precision(files: Vec<&String>, fp16: bool) -> Vec<&String> {
    let name = |f: &&String| f.rsplit('/').next().unwrap_or_default().to_string();
    let half: Vec<&String> = files
        .iter()
        .copied()
        .filter(|f| variant(&name(f)) == Some("fp16"))
        .collect();
    let plain: Vec<&String> = files
        .iter()
        .copied()
        .filter(|f| variant(&name(f)).is_none())
        .collect();
    if (fp16 && !half.is_empty()) || plain.is_empty() {
        half
    } else {
        plain
    }
}

/// Picks the files of a one-model repo (`config.json` + `diffusion_pytorch_model*.safetensors`
/// at its root, e.g. `madebyollin/taesd`), with the precision rule of [`select_files`].
pub fn select_component_files(all: &[String], fp16: bool) -> Result<Vec<String>, String> {
    if !all.iter().any(|f| f == "config.json") {
        return Err("config.json is missing: not a diffusers model repo".into());
    }
    let files: Vec<&String> = all
        .iter()
        .filter(|f| !f.contains('/') && f.starts_with("diffusion_pytorch_model") && is_weights(f))
        .collect();
    let pick = pick_precision(files, fp16);
    if pick.is_empty() {
        return Err(
            "no diffusion_pytorch_model.safetensors (sdserve does not download pickle .bin/.pth files)"
                .into(),
        );
    }
    let mut out = vec!["config.json".to_string()];
    out.extend(pick.into_iter().cloned());
    Ok(out)
}

/// Picks the files to fetch from a repo listing (paths relative to the repo root, `/`-separated).
/// `fp16`: prefer the `*.fp16.safetensors` variant where the repo has one (half-precision runs);
/// otherwise the plain files, falling back to the variant when that is all there is.
pub fn select_files(all: &[String], fp16: bool) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    let has = |p: &str| all.iter().any(|f| f == p);
    for required in ["model_index.json", "scheduler/scheduler_config.json"] {
        if !has(required) {
            return Err(format!(
                "{required} is missing: not a diffusers Stable Diffusion repo"
            ));
        }
        out.push(required.to_string());
    }
    let tokenizer: Vec<&String> = all
        .iter()
        .filter(|f| {
            f.strip_prefix("tokenizer/")
                .is_some_and(|r| !r.contains('/'))
        })
        .collect();
    if !tokenizer
        .iter()
        .any(|f| f.as_str() == "tokenizer/vocab.json")
    {
        return Err("tokenizer/vocab.json is missing".into());
    }
    out.extend(tokenizer.into_iter().cloned());
    for comp in COMPONENTS {
        let config = format!("{comp}/config.json");
        if !has(&config) {
            return Err(format!("{config} is missing"));
        }
        out.push(config);
        let files: Vec<&String> = all
            .iter()
            .filter(|f| {
                f.strip_prefix(&format!("{comp}/"))
                    .is_some_and(|r| !r.contains('/') && is_weights(r))
            })
            .collect();
        let pick = pick_precision(files, fp16);
        if pick.is_empty() {
            return Err(format!(
                "{comp}/ has no .safetensors weights (sdserve does not download pickle .bin/.ckpt files)"
            ));
        }
        out.extend(pick.into_iter().cloned());
    }
    out.sort();
    out.dedup();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The sibling list of stable-diffusion-v1-5/stable-diffusion-v1-5 (as the hub API lists it).
    fn sd15() -> Vec<String> {
        [
            ".gitattributes",
            "README.md",
            "feature_extractor/preprocessor_config.json",
            "model_index.json",
            "safety_checker/config.json",
            "safety_checker/model.fp16.safetensors",
            "safety_checker/model.safetensors",
            "safety_checker/pytorch_model.bin",
            "scheduler/scheduler_config.json",
            "text_encoder/config.json",
            "text_encoder/model.fp16.safetensors",
            "text_encoder/model.safetensors",
            "text_encoder/pytorch_model.bin",
            "tokenizer/merges.txt",
            "tokenizer/special_tokens_map.json",
            "tokenizer/tokenizer_config.json",
            "tokenizer/vocab.json",
            "unet/config.json",
            "unet/diffusion_pytorch_model.bin",
            "unet/diffusion_pytorch_model.fp16.safetensors",
            "unet/diffusion_pytorch_model.non_ema.safetensors",
            "unet/diffusion_pytorch_model.safetensors",
            "v1-5-pruned-emaonly.ckpt",
            "v1-5-pruned-emaonly.safetensors",
            "v1-inference.yaml",
            "vae/config.json",
            "vae/diffusion_pytorch_model.bin",
            "vae/diffusion_pytorch_model.fp16.safetensors",
            "vae/diffusion_pytorch_model.safetensors",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    #[test]
    fn fp32_picks_plain_safetensors_only() {
        let got = select_files(&sd15(), false).unwrap();
        assert!(got.contains(&"unet/diffusion_pytorch_model.safetensors".to_string()));
        assert!(!got.iter().any(|f| f.contains(".fp16.")
            || f.ends_with(".bin")
            || f.ends_with(".ckpt")
            || f.starts_with("safety_checker")
            || f.starts_with("feature_extractor")
            || f.starts_with("v1-5")));
        // non_ema is another variant (a second UNet), not part of the plain set.
        assert_eq!(
            got.iter().filter(|f| f.ends_with(".safetensors")).count(),
            3
        );
    }

    #[test]
    fn fp16_picks_the_variant() {
        let got = select_files(&sd15(), true).unwrap();
        let weights: Vec<_> = got.iter().filter(|f| f.ends_with(".safetensors")).collect();
        assert_eq!(weights.len(), 3);
        assert!(weights.iter().all(|f| f.contains(".fp16.")));
    }

    #[test]
    fn variants_and_shards() {
        assert_eq!(variant("model.safetensors"), None);
        assert_eq!(variant("model.fp16.safetensors"), Some("fp16"));
        assert_eq!(
            variant("diffusion_pytorch_model-00001-of-00002.safetensors"),
            None
        );
        assert_eq!(
            variant("diffusion_pytorch_model.fp16-00001-of-00002.safetensors"),
            Some("fp16")
        );
        assert_eq!(
            variant("diffusion_pytorch_model.safetensors.index.json"),
            None
        );
        assert_eq!(
            variant("diffusion_pytorch_model.safetensors.index.fp16.json"),
            Some("fp16")
        );
        assert_eq!(
            variant("diffusion_pytorch_model.non_ema.safetensors"),
            Some("non_ema")
        );
    }

    /// A repo shaped like madebyollin/taesd: diffusers' files next to the original project's.
    fn taesd() -> Vec<String> {
        [
            ".gitattributes",
            "README.md",
            "config.json",
            "diffusion_pytorch_model.bin",
            "diffusion_pytorch_model.safetensors",
            "images/screenshot.jpg",
            "taesd_decoder.pth",
            "taesd_decoder.safetensors",
            "taesd_encoder.pth",
            "taesd_encoder.safetensors",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    #[test]
    fn a_component_repo_gives_its_config_and_diffusers_weights() {
        for fp16 in [false, true] {
            assert_eq!(
                select_component_files(&taesd(), fp16).unwrap(),
                ["config.json", "diffusion_pytorch_model.safetensors"]
            );
        }
        let mut with_half = taesd();
        with_half.push("diffusion_pytorch_model.fp16.safetensors".into());
        assert_eq!(
            select_component_files(&with_half, true).unwrap()[1],
            "diffusion_pytorch_model.fp16.safetensors"
        );
        let mut no_config = taesd();
        no_config.retain(|f| f != "config.json");
        assert!(select_component_files(&no_config, false)
            .unwrap_err()
            .contains("config.json"));
        let mut pickles_only = taesd();
        pickles_only.retain(|f| !f.ends_with(".safetensors"));
        assert!(select_component_files(&pickles_only, false)
            .unwrap_err()
            .contains("diffusion_pytorch_model.safetensors"));
        // A pipeline repo is not a component repo.
        assert!(select_component_files(&sd15(), false).is_err());
    }

    #[test]
    fn missing_weights_are_reported() {
        let mut l = sd15();
        l.retain(|f| !(f.starts_with("vae/") && f.ends_with(".safetensors")));
        let e = select_files(&l, false).unwrap_err();
        assert!(e.contains("vae/"), "{e}");
    }
}
