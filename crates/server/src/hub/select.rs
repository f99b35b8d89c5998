//! Which files of a diffusers repo we fetch: configs, tokenizer, and for unet / vae /
//! text_encoder the weights of the chosen precision. Nothing else (no safety_checker,
//! feature_extractor, `.ckpt`, README, root-level single files).
//!
//! Weights, per component, in diffusers' precedence (the one `component_weight_files` loads
//! with): the variant first (`fp16` for half precision when the component has it, else the
//! plain files, else the other), then the format: the safetensors files, or the PyTorch pickle
//! `.bin` files only when that variant has no safetensors (older diffusers saves, many
//! fine-tunes). A `.bin` is read by sdserve's own pickle reader (`sdserve_pipeline::ckpt`),
//! which builds tensors and plain containers and never runs code: a file naming any other
//! pickle global (`os.system`, `builtins.exec`, ...) fails the load, naming it.
//! Unlike diffusers' `DiffusionPipeline.download`, which takes the `.bin` of every component
//! when one lacks safetensors, only that component's pickles are fetched.

/// Components whose weights the pipeline loads.
pub const COMPONENTS: [&str; 3] = ["unet", "vae", "text_encoder"];

/// The file stems a component's weights have: diffusers' `diffusion_pytorch_model`, and
/// transformers' `model` (safetensors) / `pytorch_model` (`.bin`) for the text encoder.
fn weight_stems(component: &str) -> &'static [&'static str] {
    match component {
        "text_encoder" => &["model", "pytorch_model"],
        _ => &["diffusion_pytorch_model"],
    }
}

/// Whether `name` is `<stem>.<...>` or a shard `<stem>-00001-of-00002.<...>` of one of `stems`.
fn has_stem(name: &str, stems: &[&str]) -> bool {
    stems.iter().any(|s| {
        name.strip_prefix(s)
            .is_some_and(|rest| rest.starts_with('.') || rest.starts_with('-'))
    })
}

/// The diffusers variant of a weight file name: `model.fp16.safetensors` -> `fp16`,
/// `model.fp16-00001-of-00002.safetensors` -> `fp16`, `model.safetensors.index.fp16.json` and
/// the legacy `model.safetensors.fp16.index.json` -> `fp16`, `diffusion_pytorch_model.non_ema.bin`
/// -> `non_ema`; plain files (`pytorch_model.bin.index.json` too) have none.
fn variant(name: &str) -> Option<&str> {
    for ext in [".safetensors.", ".bin."] {
        if let Some((_, rest)) = name.split_once(ext) {
            if rest == "index.json" {
                return None;
            }
            return rest
                .strip_prefix("index.")
                .and_then(|r| r.strip_suffix(".json"))
                .or_else(|| rest.strip_suffix(".index.json"));
        }
    }
    sdserve_pipeline::single_file::weight_variant(name)
}

/// A shard index: `<weights>.index.json`, `<weights>.index.<v>.json`, `<weights>.<v>.index.json`.
fn is_index(name: &str, ext: &str) -> bool {
    name.ends_with(".json")
        && name
            .split_once(ext)
            .is_some_and(|(_, rest)| rest.starts_with("index.") || rest.ends_with(".index.json"))
}

fn is_safetensors(name: &str) -> bool {
    name.ends_with(".safetensors") || is_index(name, ".safetensors.")
}

fn is_pickle(name: &str) -> bool {
    name.ends_with(".bin") || is_index(name, ".bin.")
}

/// Of one component's weight files (any names; only weights matter): those of the precision
/// and format diffusers would load (see the module documentation); empty: no weights.
fn pick_weights(files: &[&String], fp16: bool) -> Vec<String> {
    let name = |f: &String| f.rsplit('/').next().unwrap_or_default().to_string();
    let variants = if fp16 {
        [Some("fp16"), None]
    } else {
        [None, Some("fp16")]
    };
    for v in variants {
        for format in [is_safetensors as fn(&str) -> bool, is_pickle] {
            let pick: Vec<String> = files
                .iter()
                .filter(|f| {
                    let n = name(f);
                    format(&n) && variant(&n) == v
                })
                .map(|f| f.to_string())
                .collect();
            if !pick.is_empty() {
                return pick;
            }
        }
    }
    Vec::new()
}

/// Picks the files of a one-model repo (`config.json` + `diffusion_pytorch_model*.safetensors`,
/// or `.bin` where it has no safetensors, at its root, e.g. `madebyollin/taesd`), with the rule
/// of [`select_files`].
pub fn select_component_files(all: &[String], fp16: bool) -> Result<Vec<String>, String> {
    if !all.iter().any(|f| f == "config.json") {
        return Err("config.json is missing: not a diffusers model repo".into());
    }
    let files: Vec<&String> = all
        .iter()
        .filter(|f| !f.contains('/') && has_stem(f, weight_stems("")))
        .collect();
    let pick = pick_weights(&files, fp16);
    if pick.is_empty() {
        return Err("no diffusion_pytorch_model.safetensors or diffusion_pytorch_model.bin".into());
    }
    let mut out = vec!["config.json".to_string()];
    out.extend(pick);
    Ok(out)
}

/// Picks the files to fetch from a repo listing (paths relative to the repo root, `/`-separated).
/// `fp16`: prefer the `fp16` variant where a component has one (half-precision runs); otherwise
/// the plain files, falling back to the variant when that is all there is; in each, the
/// safetensors, or the `.bin` when there are none (the module documentation).
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
                    .is_some_and(|r| !r.contains('/') && has_stem(r, weight_stems(comp)))
            })
            .collect();
        let pick = pick_weights(&files, fp16);
        if pick.is_empty() {
            return Err(format!("{comp}/ has no .safetensors or .bin weights"));
        }
        out.extend(pick);
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
        // Without safetensors, its diffusers `.bin` (not the original project's `.pth`).
        let mut pickles_only = taesd();
        pickles_only.retain(|f| !f.ends_with(".safetensors"));
        assert_eq!(
            select_component_files(&pickles_only, true).unwrap(),
            ["config.json", "diffusion_pytorch_model.bin"]
        );
        let mut no_weights = pickles_only.clone();
        no_weights.retain(|f| !f.ends_with(".bin"));
        let e = select_component_files(&no_weights, false).unwrap_err();
        assert!(
            e.contains("diffusion_pytorch_model.safetensors")
                && e.contains("diffusion_pytorch_model.bin"),
            "{e}"
        );
        // A pipeline repo is not a component repo.
        assert!(select_component_files(&sd15(), false).is_err());
    }

    fn weights_of(got: &[String], comp: &str) -> Vec<String> {
        got.iter()
            .filter(|f| f.starts_with(&format!("{comp}/")) && !f.ends_with("config.json"))
            .cloned()
            .collect()
    }

    #[test]
    fn a_component_without_safetensors_gets_its_bin_and_only_it() {
        let mut l = sd15();
        l.retain(|f| !(f.starts_with("unet/") && f.ends_with(".safetensors")));
        for fp16 in [false, true] {
            let got = select_files(&l, fp16).unwrap();
            assert_eq!(
                weights_of(&got, "unet"),
                ["unet/diffusion_pytorch_model.bin"],
                "fp16 {fp16}"
            );
            // The other components keep their safetensors; no other pickle is fetched.
            assert_eq!(got.iter().filter(|f| f.ends_with(".bin")).count(), 1);
            assert_eq!(weights_of(&got, "vae").len(), 1);
            assert!(weights_of(&got, "vae")[0].ends_with(".safetensors"));
        }
    }

    #[test]
    fn the_variant_comes_before_the_format() {
        // diffusers with variant="fp16" loads `.fp16.bin` rather than the plain safetensors.
        let mut l = sd15();
        l.retain(|f| !(f.starts_with("unet/") && f.contains(".fp16.")));
        l.push("unet/diffusion_pytorch_model.fp16.bin".into());
        let half = select_files(&l, true).unwrap();
        assert_eq!(
            weights_of(&half, "unet"),
            ["unet/diffusion_pytorch_model.fp16.bin"]
        );
        let full = select_files(&l, false).unwrap();
        assert_eq!(
            weights_of(&full, "unet"),
            ["unet/diffusion_pytorch_model.safetensors"]
        );
        // A repo of fp16 pickles only: full precision takes them too (all there is).
        let mut half_pickles = sd15();
        half_pickles.retain(|f| !f.starts_with("vae/diffusion_pytorch_model"));
        half_pickles.push("vae/diffusion_pytorch_model.fp16.bin".into());
        assert_eq!(
            weights_of(&select_files(&half_pickles, false).unwrap(), "vae"),
            ["vae/diffusion_pytorch_model.fp16.bin"]
        );
    }

    #[test]
    fn sharded_pickles_come_with_their_index_and_nothing_else() {
        let mut l = sd15();
        l.retain(|f| !f.starts_with("text_encoder/") || f.ends_with("config.json"));
        l.extend(
            [
                "text_encoder/pytorch_model-00001-of-00002.bin",
                "text_encoder/pytorch_model-00002-of-00002.bin",
                "text_encoder/pytorch_model.bin.index.json",
                "text_encoder/optimizer.bin",
                "text_encoder/flax_model.msgpack",
            ]
            .map(String::from),
        );
        assert_eq!(
            weights_of(&select_files(&l, true).unwrap(), "text_encoder"),
            [
                "text_encoder/pytorch_model-00001-of-00002.bin",
                "text_encoder/pytorch_model-00002-of-00002.bin",
                "text_encoder/pytorch_model.bin.index.json",
            ]
        );
        assert_eq!(variant("pytorch_model.bin.index.json"), None);
        assert_eq!(variant("pytorch_model.bin.index.fp16.json"), Some("fp16"));
        assert_eq!(variant("model.safetensors.fp16.index.json"), Some("fp16"));
        assert_eq!(
            variant("pytorch_model.fp16-00001-of-00002.bin"),
            Some("fp16")
        );
        assert_eq!(variant("diffusion_pytorch_model.fp16.bin"), Some("fp16"));
    }

    #[test]
    fn missing_weights_are_reported() {
        let mut l = sd15();
        l.retain(|f| {
            !(f.starts_with("vae/") && (f.ends_with(".safetensors") || f.ends_with(".bin")))
        });
        let e = select_files(&l, false).unwrap_err();
        assert!(e.contains("vae/") && e.contains(".bin"), "{e}");
    }
}
