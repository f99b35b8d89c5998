//! A1111's `<checkpoint>.yaml` beside a single-file checkpoint (`tools/make_ldm_yaml_fixtures.py`):
//! the LDM config decides what the weights cannot say (here `parameterization: v`, whose images
//! are diffusers' on the tiny-a folder with `prediction_type: v_prediction`), and A1111's own
//! configs that contradict the weights or are no SD 1.x model are refused, naming the key.

use crate::common;

use common::ScratchDir;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use sdserve_pipeline::pipeline::StableDiffusion;
use sdserve_pipeline::single_file::{config_beside, convert_single_file, ConvertOptions};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// tiny-a's single file in a folder of its own, with `yaml` (a fixture) beside it as
/// `model.yaml`.
fn checkpoint_with(tmp: &ScratchDir, yaml: Option<&str>) -> PathBuf {
    let file = tmp.0.join("model.safetensors");
    std::fs::copy(fixtures().join("single-file/tiny-a.safetensors"), &file).unwrap();
    if let Some(yaml) = yaml {
        std::fs::copy(
            fixtures().join("ldm-yaml").join(yaml),
            tmp.0.join("model.yaml"),
        )
        .unwrap();
    }
    file
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.path().is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

fn tokenizer() -> Vec<(String, Vec<u8>)> {
    let dir = fixtures().join("tiny-a/tokenizer");
    std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| {
            let p = e.unwrap().path();
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&p).unwrap())
        })
        .collect()
}

/// Converts with tiny-a's folder configs for what neither the weights nor an LDM config can
/// say (its per-level head counts and 8 norm groups); the YAML is applied over them.
fn convert(file: &Path, out: &Path) -> sdserve_pipeline::Result<()> {
    let tiny = fixtures().join("tiny-a");
    let opts = ConvertOptions {
        config_dir: Some(&tiny),
        tokenizer_files: &[],
    };
    convert_single_file(file, out, &opts).map(|_| ())
}

#[test]
fn a_v_prediction_yaml_gives_diffusers_v_prediction_images() {
    let f = common::Fixtures::load("ldm-yaml/ldm-yaml");
    let tmp = ScratchDir::new("sf-yaml-v");
    let file = checkpoint_with(&tmp, Some("tiny-a-v.yaml"));
    assert_eq!(config_beside(&file), Some(tmp.0.join("model.yaml")));
    let out = tmp.0.join("converted");
    convert(&file, &out).unwrap();
    let scheduler: serde_json::Value = serde_json::from_slice(
        &std::fs::read(out.join("scheduler/scheduler_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(scheduler["prediction_type"], "v_prediction");
    let model = StableDiffusion::load(&out, &Device::Cpu, DType::F32).unwrap();

    // The same file without its YAML: epsilon, and another image.
    let plain = ScratchDir::new("sf-yaml-none");
    let plain_file = checkpoint_with(&plain, None);
    assert_eq!(config_beside(&plain_file), None);
    convert(&plain_file, &plain.0.join("converted")).unwrap();
    let eps = StableDiffusion::load(&plain.0.join("converted"), &Device::Cpu, DType::F32).unwrap();

    // tiny-a's diffusers folder with its scheduler config saying v_prediction.
    let folder = ScratchDir::new("sf-yaml-folder");
    let v_folder = folder.0.join("tiny-a-v");
    copy_tree(&fixtures().join("tiny-a"), &v_folder);
    let cfg_path = v_folder.join("scheduler/scheduler_config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&cfg_path).unwrap()).unwrap();
    cfg["prediction_type"] = "v_prediction".into();
    std::fs::write(&cfg_path, serde_json::to_vec(&cfg).unwrap()).unwrap();
    let v_model = StableDiffusion::load(&v_folder, &Device::Cpu, DType::F32).unwrap();

    let cases = f.meta["cases"].as_object().unwrap();
    assert_eq!(cases.len(), 3);
    for (label, case) in cases {
        let params = common::request_params(case);
        let want = f.tensors[&format!("result.{label}")].get(0).unwrap();
        let image = common::generate_one(&model, &params);
        let from_folder = common::generate_one(&v_model, &params);
        assert!(
            image.pixels == from_folder.pixels,
            "{label}: not the folder's image"
        );
        let failure = common::image_failure(label, &image.pixels, &want);
        assert!(failure.is_none(), "{failure:?}");
        let image = common::generate_one(&eps, &params);
        let failure =
            common::image_failure(&format!("{label} without the yaml"), &image.pixels, &want);
        assert!(failure.is_some(), "{label}: the YAML changed nothing");
    }
}

#[test]
fn a1111_s_configs_that_do_not_fit_are_refused_naming_the_key() {
    for (yaml, says) in [
        // SD 1.5's real sizes beside the tiny weights.
        (
            "v1-inference.yaml",
            "model_channels x channel_mult is [320,640,1280,1280], but the checkpoint's weights have [32,64]",
        ),
        (
            "v1-inpainting-inference.yaml",
            "unet_config.params.in_channels is 9, but the checkpoint's weights have 4",
        ),
        ("sd_xl_inpaint.yaml", "sgm.models.diffusion.DiffusionEngine is not a Stable Diffusion 1.x model"),
        ("instruct-pix2pix.yaml", "is not a Stable Diffusion 1.x model"),
        ("alt-diffusion-inference.yaml", "is not SD 1.x's CLIP text encoder"),
    ] {
        let tmp = ScratchDir::new("sf-yaml-a1111");
        let file = checkpoint_with(&tmp, Some(&format!("a1111/{yaml}")));
        // Inferred configs (no folder), as a file dropped into MODELS_DIR is converted.
        let tok = tokenizer();
        let tok: Vec<(&str, &[u8])> = tok.iter().map(|(n, b)| (n.as_str(), b.as_slice())).collect();
        let opts = ConvertOptions {
            config_dir: None,
            tokenizer_files: &tok,
        };
        let e = convert_single_file(&file, &tmp.0.join("converted"), &opts)
            .unwrap_err()
            .to_string();
        assert!(e.contains(says) && e.contains("model.yaml"), "{yaml}: {e}");
        assert!(!tmp.0.join("converted").exists(), "{yaml}: a folder was left");
    }
}
