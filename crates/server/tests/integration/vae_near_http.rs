//! A1111's VAE beside the checkpoint over real HTTP: MODELS_DIR holds tiny-a as a single file
//! (`--model`) and `tiny-a.vae.safetensors` (tiny-a's own VAE with its output bias shifted, so its images
//! differ). With `vae` absent (A1111's `sd_vae: Automatic`) the checkpoint decodes with it,
//! pixel for pixel as when the request names it; `none` is the model's own VAE; the file is a
//! VAE (`GET /vaes`), not a model (`GET /models`).

use crate::common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use common::{decode_png, post_json_to};
use serde_json::{json, Value};

struct Folder(PathBuf);

impl Drop for Folder {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// MODELS_DIR with `tiny-a.safetensors` and the VAE beside it.
fn models_dir() -> Folder {
    let dir = std::env::temp_dir().join(format!("sdserve-vae-near-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let ckpt = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../pipeline/tests/fixtures/single-file/tiny-a.safetensors");
    std::fs::copy(&ckpt, dir.join("tiny-a.safetensors")).unwrap();
    let mut vae: HashMap<String, candle_core::Tensor> =
        candle_core::safetensors::load(&ckpt, &candle_core::Device::Cpu)
            .unwrap()
            .into_iter()
            .filter(|(k, _)| k.starts_with("first_stage_model."))
            .collect();
    let bias = "first_stage_model.decoder.conv_out.bias";
    vae.insert(bias.into(), (&vae[bias] + 0.5).unwrap());
    candle_core::safetensors::save(&vae, dir.join("tiny-a.vae.safetensors")).unwrap();
    Folder(dir)
}

#[test]
fn automatic_decodes_with_the_vae_near_the_checkpoint() {
    let models = models_dir();
    // The checkpoint is `--model` (tiny-a is not SD 1.5-shaped: MODEL_CONFIG describes it).
    let ckpt = models.0.join("tiny-a.safetensors");
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("../pipeline/tests/fixtures/tiny-a");
    let s = common::tiny_server(
        "vae-near",
        &[
            ("MODEL_ID", ckpt.to_str().unwrap()),
            ("MODEL_CONFIG", config.to_str().unwrap()),
            ("MODELS_DIR", models.0.to_str().unwrap()),
            ("RESPONSE_CACHE_MB", "0"),
        ],
    );
    let run = |vae: Value| {
        let mut body = json!({"prompt": "a lighthouse", "steps": 1, "width": 256, "height": 256,
                              "seed": 3, "scheduler": "euler", "guidance_scale": 7.0});
        if !vae.is_null() {
            body["vae"] = vae;
        }
        let r = s.post_json(&body);
        assert_eq!(r.status, 200, "{}", r.text());
        let v = r.json();
        (
            decode_png(v["image_base64"].as_str().unwrap()).2,
            v["metadata"]["vae"].clone(),
        )
    };
    // tiny-a's VAE keeps 256x256 at 128x128 latents: one step each, four images in all.
    let (automatic, used) = run(Value::Null);
    assert_eq!(used, json!("tiny-a.vae.safetensors"));
    let (named, _) = run(json!("tiny-a.vae.safetensors"));
    assert!(
        automatic == named,
        "automatic is the VAE near the checkpoint"
    );
    let (own, used) = run(json!("none"));
    assert_eq!(used, Value::Null);
    assert!(own != automatic, "the shifted VAE changes the image");

    // A1111's default `sd_vae` (Automatic) on that checkpoint.
    let r = post_json_to(
        s.addr,
        "/sdapi/v1/txt2img",
        &json!({"prompt": "a lighthouse", "steps": 1, "width": 256, "height": 256, "seed": 3,
                "sampler_name": "Euler"}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert!(decode_png(v["images"][0].as_str().unwrap()).2 == automatic);
    let info: Value = serde_json::from_str(v["info"].as_str().unwrap()).unwrap();
    assert_eq!(
        info["sd_vae_name"],
        json!("tiny-a.vae.safetensors"),
        "{info}"
    );

    let listed = |path: &str, key: &str| -> Vec<String> {
        s.get(path).json()[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["name"].as_str().unwrap().to_string())
            .collect()
    };
    assert!(listed("/vaes", "vaes").contains(&"tiny-a.vae.safetensors".to_string()));
    assert!(!listed("/models", "models").contains(&"tiny-a.vae.safetensors".to_string()));
}
