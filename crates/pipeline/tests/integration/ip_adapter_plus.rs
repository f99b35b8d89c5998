//! IP-Adapter Plus against diffusers (`tools/make_ip_adapter_plus_fixtures.py`): the image
//! encoder's penultimate hidden states of the image and of zero pixel values (the negative
//! side), the Resampler's image tokens (from `.safetensors` and h94's `.bin`), and whole images
//! of `StableDiffusionPipeline` with Plus adapters on tiny-a (two scales, a batch, a plain and
//! a Plus adapter in one request); a Resampler with its heads split otherwise leaves the bounds.

use crate::common;

use std::path::PathBuf;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use common::{fixture_path, generate, image_case_failures, image_failure, max_abs_diff};
use common::{read_png, request_params, Fixtures};
use sdserve_pipeline::ip_adapter::{
    ImageEncoder, ImageEncoderModel, IpAdapter, IpAdapterModel, IpAdapterUnit,
};
use sdserve_pipeline::pipeline::{GenerationParams, StableDiffusion};
use sdserve_pipeline::unet::UNetConfig;

const IMAGES: [&str; 2] = ["ip-prompt-96x72.png", "ip-prompt-b-50x70.png"];
const PLUS: [&str; 2] = ["ip-adapter-plus_sd15", "ip-adapter-plus-face_sd15"];

fn models() -> PathBuf {
    fixture_path("ip-adapter/models")
}

/// The file of each fixture adapter (the face one is h94's `.bin`).
fn file_of(model: &str) -> &'static str {
    match model {
        "ip-adapter-plus_sd15" => "ip-adapter-plus_sd15.safetensors",
        "ip-adapter-plus-face_sd15" => "ip-adapter-plus-face_sd15.bin",
        "ip-adapter_sd15" => "ip-adapter_sd15.safetensors",
        other => panic!("no fixture adapter {other}"),
    }
}

fn unet_config() -> UNetConfig {
    let text = std::fs::read_to_string(fixture_path("tiny-a/unet/config.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn adapter(model: &str) -> IpAdapterModel {
    let path = models().join(file_of(model));
    IpAdapterModel::load(&path, &unet_config(), &Device::Cpu, DType::F32)
        .unwrap_or_else(|e| panic!("{model}: {e}"))
}

fn encoder() -> ImageEncoderModel {
    ImageEncoderModel::load(&models().join("image_encoder"), &Device::Cpu, DType::F32).unwrap()
}

/// Max abs diff relative to the reference's largest value (at least 1).
fn relative_diff(want: &Tensor, got: &Tensor) -> f32 {
    let scale = want.abs().unwrap().max_all().unwrap();
    let scale = scale.to_scalar::<f32>().unwrap();
    assert!(scale > 1e-3, "the reference is ~0");
    max_abs_diff(want, got) / scale.max(1.0)
}

#[test]
fn hidden_states_and_resampler_tokens_match_diffusers() {
    let f = Fixtures::load("ip-adapter-plus");
    let enc = encoder();
    for model in PLUS {
        let a = adapter(model);
        let r = &f.meta["resampler"];
        assert!(a.takes_hidden_states(), "{model}");
        assert_eq!(a.num_tokens() as u64, r["num_queries"].as_u64().unwrap());
        assert_eq!(a.resampler_heads().map(|h| h as u64), r["heads"].as_u64());
        assert_eq!(a.embed_dim(), enc.model.config().hidden_size);
    }
    assert!(!adapter("ip-adapter_sd15").takes_hidden_states());
    for name in IMAGES {
        let (cond, uncond) = enc.penultimate_states(&read_png(name)).unwrap();
        let d = relative_diff(f.get(&format!("hidden.{name}")), &cond);
        assert!(d < 1e-5, "{name}: hidden states {d}");
        let d = relative_diff(f.get("hidden.zeros"), &uncond);
        assert!(d < 1e-5, "the zero image's hidden states {d}");
        for model in PLUS {
            let a = adapter(model);
            for (what, input) in [(name, &cond), ("zeros", &uncond)] {
                let want = f.get(&format!("tokens.{model}.{what}"));
                let d = relative_diff(want, &a.image_tokens(input).unwrap());
                // Four blocks of sharp attention: float noise grows to ~2e-5.
                assert!(d < 1e-4, "{model} {what}: tokens {d}");
            }
        }
    }
}

fn unit(model: &str, image: &str, scale: f64) -> IpAdapterUnit {
    IpAdapterUnit {
        model: Arc::new(IpAdapter::new(model, models().join(file_of(model)))),
        image_encoder: Arc::new(ImageEncoder::new(
            "image_encoder",
            models().join("image_encoder"),
        )),
        image: read_png(image),
        scale,
        extension: None,
    }
}

fn params_of(case: &serde_json::Value) -> GenerationParams {
    let ip_adapters = case["ip_adapters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| {
            let s = |k: &str| u[k].as_str().unwrap();
            unit(s("model"), s("image"), u["scale"].as_f64().unwrap())
        })
        .collect();
    GenerationParams {
        batch_size: case["batch_size"].as_u64().unwrap() as usize,
        ip_adapters,
        ..request_params(case)
    }
}

#[test]
fn images_match_diffusers_ip_adapter_plus_pipeline() {
    let f = Fixtures::load("ip-adapter-plus");
    let cases = f.meta["cases"].as_object().unwrap().clone();
    let (failures, images) = image_case_failures(&cases, params_of, |label| {
        f.get(&format!("image.{label}")).clone()
    });
    assert!(failures.is_empty(), "{failures:#?}");
    assert_eq!(images, 5);
}

#[test]
fn the_resampler_and_the_zero_image_matter() {
    let f = Fixtures::load("ip-adapter-plus");
    let sd = StableDiffusion::load(&fixture_path("tiny-a"), &Device::Cpu, DType::F32).unwrap();
    let case = &f.meta["cases"]["plus-scale-1"];
    let want = f.get("image.plus-scale-1").get(0).unwrap();
    let params = params_of(case);
    let ours = generate(&sd, &params);
    assert!(image_failure("plus", &ours[0].pixels, &want).is_none());
    // One head of 128 instead of the file's two of 64: tokens and image leave the bounds.
    let model = "ip-adapter-plus_sd15";
    let one_head = adapter(model).with_resampler_heads(1);
    let (cond, _) = encoder().penultimate_states(&read_png(IMAGES[0])).unwrap();
    let d = relative_diff(
        f.get(&format!("tokens.{model}.{}", IMAGES[0])),
        &one_head.image_tokens(&cond).unwrap(),
    );
    assert!(d > 0.05, "one head: tokens within {d}");
    let mut mutated = params.clone();
    let path = models().join(file_of(model));
    mutated.ip_adapters[0].model =
        Arc::new(IpAdapter::with_loaded(model, path, Arc::new(one_head)));
    let got = generate(&sd, &mutated);
    assert!(image_failure("one head", &got[0].pixels, &want).is_some());
    // The negative side is the zero image's states, not zeros: their tokens differ.
    let a = adapter(model);
    let zeros = a.image_tokens(&cond.zeros_like().unwrap()).unwrap();
    let d = relative_diff(f.get(&format!("tokens.{model}.zeros")), &zeros);
    assert!(d > 0.05, "zeros' tokens are the zero image's: {d}");
}
