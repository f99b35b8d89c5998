//! IP-Adapter units as the sd-webui-controlnet extension runs them, against its lines written
//! out around diffusers (`tools/make_ip_adapter_a1111_fixtures.py`): the `clip` preprocessor's
//! pixel values (the image stretched to the encoder's square with OpenCV's `INTER_AREA`, an
//! RGBA input's mask applied), a unit's tokens (several images averaged, a Plus adapter's
//! negative side from the extension's `uc` file), and whole images with the units' weights and
//! guidance windows (step / steps); the window and the `uc` file each matter.

use crate::common;

use std::path::PathBuf;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use common::{fixture_path, generate, image_case_failures, image_failure, max_abs_diff};
use common::{read_png, request_params, Fixtures};
use sdserve_pipeline::ip_adapter::{
    extension_unit_tokens, ExtensionImage, ExtensionRun, ImageEncoder, ImageEncoderModel,
    IpAdapter, IpAdapterModel, IpAdapterUnit,
};
use sdserve_pipeline::pipeline::{GenerationParams, StableDiffusion};
use sdserve_pipeline::unet::UNetConfig;

fn models() -> PathBuf {
    fixture_path("ip-adapter/models")
}

fn file_of(model: &str) -> &'static str {
    match model {
        "ip-adapter-plus_sd15" => "ip-adapter-plus_sd15.safetensors",
        "ip-adapter-plus-face_sd15" => "ip-adapter-plus-face_sd15.bin",
        "ip-adapter_sd15" => "ip-adapter_sd15.safetensors",
        other => panic!("no fixture adapter {other}"),
    }
}

/// The script's `stripes_alpha`: the RGBA input's alpha (255: the user's strokes).
fn stripes_alpha(w: usize, h: usize) -> Vec<u8> {
    (0..h)
        .flat_map(|y| (0..w).map(move |x| if ((x + 2 * y) / 9) % 3 == 0 { 255 } else { 0 }))
        .collect()
}

fn image_of(v: &serde_json::Value) -> ExtensionImage {
    let image = read_png(v["image"].as_str().unwrap());
    let alpha = v["masked"]
        .as_bool()
        .unwrap()
        .then(|| stripes_alpha(image.width as usize, image.height as usize));
    ExtensionImage { image, alpha }
}

fn run_of(u: &serde_json::Value, uc: bool) -> ExtensionRun {
    ExtensionRun {
        images: u["images"]
            .as_array()
            .unwrap()
            .iter()
            .map(image_of)
            .collect(),
        guidance_start: u["guidance_start"].as_f64().unwrap(),
        guidance_end: u["guidance_end"].as_f64().unwrap(),
        plus_uncond: uc.then(|| models().join("clip_vision_h_uc.data")),
        record: None,
    }
}

fn unit_of(u: &serde_json::Value, uc: bool) -> IpAdapterUnit {
    let model = u["model"].as_str().unwrap();
    let run = run_of(u, uc);
    IpAdapterUnit {
        model: Arc::new(IpAdapter::new(model, models().join(file_of(model)))),
        image_encoder: Arc::new(ImageEncoder::new(
            "image_encoder",
            models().join("image_encoder"),
        )),
        image: run.images[0].image.clone(),
        scale: u["weight"].as_f64().unwrap(),
        extension: Some(run),
    }
}

fn params_of(case: &serde_json::Value) -> GenerationParams {
    let units = case["units"].as_array().unwrap();
    GenerationParams {
        batch_size: case["batch_size"].as_u64().unwrap() as usize,
        ip_adapters: units.iter().map(|u| unit_of(u, true)).collect(),
        ..request_params(case)
    }
}

fn encoder() -> ImageEncoderModel {
    ImageEncoderModel::load(&models().join("image_encoder"), &Device::Cpu, DType::F32).unwrap()
}

fn adapter(model: &str) -> IpAdapterModel {
    let text = std::fs::read_to_string(fixture_path("tiny-a/unet/config.json")).unwrap();
    let config: UNetConfig = serde_json::from_str(&text).unwrap();
    let path = models().join(file_of(model));
    IpAdapterModel::load(&path, &config, &Device::Cpu, DType::F32).unwrap()
}

fn relative_diff(want: &Tensor, got: &Tensor) -> f32 {
    let scale = want.abs().unwrap().max_all().unwrap();
    max_abs_diff(want, got) / scale.to_scalar::<f32>().unwrap().max(1.0)
}

#[test]
fn clip_pixels_and_unit_tokens_match_the_extension() {
    let f = Fixtures::load("ip-adapter-a1111");
    let enc = encoder();
    for (key, want) in f.tensors.iter().filter(|(k, _)| k.starts_with("pixels.")) {
        let rest = key.strip_prefix("pixels.").unwrap();
        let (name, masked) = match rest.strip_suffix(".masked") {
            Some(name) => (name, true),
            None => (rest, false),
        };
        let image = image_of(&serde_json::json!({"image": name, "masked": masked}));
        let got = enc.extension_pixels(&image).unwrap();
        // The resize is OpenCV's bit for bit; the normalisation float noise.
        assert!(
            max_abs_diff(want, &got) < 1e-5,
            "{key}: {}",
            max_abs_diff(want, &got)
        );
    }
    let mut checked = 0;
    for (label, case) in f.meta["cases"].as_object().unwrap() {
        for (k, u) in case["units"].as_array().unwrap().iter().enumerate() {
            let a = adapter(u["model"].as_str().unwrap());
            let got = extension_unit_tokens(&a, &enc, &run_of(u, true)).unwrap();
            let want = f.get(&format!("tokens.{label}.{k}"));
            let d = relative_diff(want, &got);
            assert!(d < 1e-4, "{label} unit {k}: tokens {d}");
            if a.takes_hidden_states() {
                // Without the extension's uc file the negative side is the zero image's.
                let zero = extension_unit_tokens(&a, &enc, &run_of(u, false)).unwrap();
                let d = relative_diff(&want.get(0).unwrap(), &zero.get(0).unwrap());
                assert!(
                    d > 0.05,
                    "{label} unit {k}: the uc file changes nothing ({d})"
                );
            }
            checked += 1;
        }
    }
    assert_eq!(checked, 4);
}

#[test]
fn images_match_the_extension_units() {
    let f = Fixtures::load("ip-adapter-a1111");
    let cases = f.meta["cases"].as_object().unwrap().clone();
    let (failures, images) = image_case_failures(&cases, params_of, |label| {
        f.get(&format!("image.{label}")).clone()
    });
    assert!(failures.is_empty(), "{failures:#?}");
    assert_eq!(images, 4);
}

#[test]
fn the_guidance_window_matters() {
    let f = Fixtures::load("ip-adapter-a1111");
    let sd = StableDiffusion::load(&fixture_path("tiny-a"), &Device::Cpu, DType::F32).unwrap();
    let label = "plain-two-images-window";
    let mut params = params_of(&f.meta["cases"][label]);
    let want = f.get(&format!("image.{label}")).get(0).unwrap();
    let run = params.ip_adapters[0].extension.as_mut().unwrap();
    (run.guidance_start, run.guidance_end) = (0.0, 1.0);
    let got = generate(&sd, &params);
    assert!(image_failure("every step", &got[0].pixels, &want).is_some());
}
