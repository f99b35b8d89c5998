//! IP-Adapter against diffusers (`tools/make_ip_adapter_fixtures.py`): the CLIP image
//! processor's pixels (transformers 5's torchvision resize), the image encoder's embeds, the
//! adapter's image tokens (from `.safetensors` and h94's `.bin`), one UNet call with the image
//! tokens, and whole images of `StableDiffusionPipeline` / `StableDiffusionImg2ImgPipeline` with
//! `load_ip_adapter` + `ip_adapter_image` on tiny-a (two scales, a batch, no guidance,
//! img2img).

use crate::common;

use std::path::PathBuf;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use common::{fixture_path, image_case_failures, image_failure, max_abs_diff, read_png, Fixtures};
use common::{generate, request_params};
use sdserve_pipeline::controlnet::CondRows;
use sdserve_pipeline::ip_adapter::{
    ImageEncoder, ImageEncoderModel, ImagePrompts, IpAdapter, IpAdapterModel, IpAdapterUnit,
};
use sdserve_pipeline::pipeline::{GenerationParams, InitImage, StableDiffusion};
use sdserve_pipeline::unet::{UNet2DConditionModel, UNetConfig};

fn models() -> PathBuf {
    fixture_path("ip-adapter/models")
}

fn unet_config(model: &str) -> UNetConfig {
    let text = std::fs::read_to_string(fixture_path(&format!("{model}/unet/config.json"))).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn adapter(file: &str) -> IpAdapterModel {
    IpAdapterModel::load(
        &models().join(file),
        &unet_config("tiny-a"),
        &Device::Cpu,
        DType::F32,
    )
    .unwrap_or_else(|e| panic!("{file}: {e}"))
}

fn encoder() -> ImageEncoderModel {
    ImageEncoderModel::load(&models().join("image_encoder"), &Device::Cpu, DType::F32).unwrap()
}

/// Within `tol` of the reference, relative to its largest value (at least 1).
fn assert_close(label: &str, want: &Tensor, got: &Tensor, tol: f32) {
    let scale = want
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let d = max_abs_diff(want, got);
    assert!(scale > 1e-3, "{label}: the reference is ~0");
    assert!(
        d < tol * scale.max(1.0),
        "{label}: max abs diff {d} (scale {scale})"
    );
}

const IMAGES: [&str; 2] = ["ip-prompt-96x72.png", "ip-prompt-b-50x70.png"];

#[test]
fn pixels_embeds_and_tokens_match_diffusers() {
    let f = Fixtures::load("ip-adapter");
    let enc = encoder();
    let safetensors = adapter("ip-adapter_sd15.safetensors");
    let bin = adapter("ip-adapter_sd15.bin");
    assert_eq!((safetensors.num_tokens(), safetensors.embed_dim()), (4, 24));
    for name in IMAGES {
        let image = read_png(name);
        // The processor's resize is exact (u8), the normalisation float noise.
        let pixels = enc.processor.preprocess(&image, &Device::Cpu).unwrap();
        let want = f.get(&format!("pixel_values.{name}"));
        assert!(max_abs_diff(want, &pixels) < 1e-5, "{name}: pixel values");
        let embeds = enc.image_embeds(&image).unwrap();
        assert_close(name, f.get(&format!("embeds.{name}")), &embeds, 1e-5);
        let want = f.get(&format!("tokens.{name}"));
        assert_close(
            name,
            want,
            &safetensors.image_tokens(&embeds).unwrap(),
            1e-5,
        );
        assert_eq!(
            max_abs_diff(
                &safetensors.image_tokens(&embeds).unwrap(),
                &bin.image_tokens(&embeds).unwrap()
            ),
            0.0,
            "the .bin holds the same adapter"
        );
    }
    let zeros = Tensor::zeros((1, 24), DType::F32, &Device::Cpu).unwrap();
    let tokens = safetensors.image_tokens(&zeros).unwrap();
    assert_close("zeros", f.get("tokens.zeros"), &tokens, 1e-5);
}

#[test]
fn the_unet_attends_to_the_image_tokens_as_diffusers_does() {
    let f = Fixtures::load("ip-adapter");
    let dir = fixture_path("tiny-a/unet");
    let files = sdserve_pipeline::pipeline::component_weight_files(
        &dir,
        "",
        "diffusion_pytorch_model",
        DType::F32,
    )
    .unwrap();
    let vb = || {
        sdserve_pipeline::single_file::checked_var_builder(&files, DType::F32, &Device::Cpu)
            .unwrap()
    };
    let config = unet_config("tiny-a");
    let unet = UNet2DConditionModel::new(vb(), &config).unwrap();
    let streamed = UNet2DConditionModel::streamed(vb(), &config, &Device::Cpu).unwrap();
    let ip = adapter("ip-adapter_sd15.safetensors");
    // Rows [zeros, the image's embeds]: the fixture's first row is the negative side.
    let embeds = f.get("model.image_embeds").narrow(0, 1, 1).unwrap();
    let prompts = ImagePrompts::from_image_embeds(&[(&ip, &embeds, 0.7)])
        .unwrap()
        .unwrap();
    let tokens = prompts.for_rows(2, CondRows::From(1)).unwrap();
    let (x, t, ctx) = (
        f.get("model.sample"),
        f.get("model.timesteps"),
        f.get("model.context"),
    );
    let got = unet
        .forward_with_image_tokens(x, t, ctx, None, None, Some(&tokens))
        .unwrap();
    let want = f.get("model.unet.ip");
    assert!(
        max_abs_diff(want, &got) < 1e-4,
        "{}",
        max_abs_diff(want, &got)
    );
    let got_streamed = streamed
        .forward_with_image_tokens(x, t, ctx, None, None, Some(&tokens))
        .unwrap();
    assert_eq!(max_abs_diff(&got, &got_streamed), 0.0);
    // Without them the output is far from the steered one; a scale of 0 is no adapter.
    let plain = unet.forward(x, t, ctx).unwrap();
    assert!(max_abs_diff(want, &plain) > 0.05);
    assert!(ImagePrompts::from_image_embeds(&[(&ip, &embeds, 0.0)])
        .unwrap()
        .is_none());
    // In f16 on the CPU attention takes the sliced path (no fused kernel): the image term
    // joins there too.
    let vb16 = sdserve_pipeline::single_file::checked_var_builder(&files, DType::F16, &Device::Cpu)
        .unwrap();
    let mut unet16 = UNet2DConditionModel::new(vb16, &config).unwrap();
    unet16.set_attention_slicing(sdserve_pipeline::unet::AttentionSlicing::MaxBytes(4096));
    let ip16 = IpAdapterModel::load(
        &models().join("ip-adapter_sd15.safetensors"),
        &config,
        &Device::Cpu,
        DType::F16,
    )
    .unwrap();
    let tokens16 = ImagePrompts::from_image_embeds(&[(&ip16, &embeds, 0.7)])
        .unwrap()
        .unwrap()
        .for_rows(2, CondRows::From(1))
        .unwrap();
    let got16 = unet16
        .forward_with_image_tokens(x, t, ctx, None, None, Some(&tokens16))
        .unwrap();
    let d16 = max_abs_diff(want, &got16);
    assert!(d16 < 0.05, "f16, sliced: {d16}");
    assert!(max_abs_diff(&plain, &got16) > 0.05);
}

fn unit(image: &str, scale: f64) -> IpAdapterUnit {
    IpAdapterUnit {
        model: Arc::new(IpAdapter::new(
            "ip-adapter_sd15",
            models().join("ip-adapter_sd15.safetensors"),
        )),
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
        .map(|u| unit(u["image"].as_str().unwrap(), u["scale"].as_f64().unwrap()))
        .collect();
    let init_image = case["init_image"].as_str().map(|name| InitImage {
        image: read_png(name),
        mask: None,
        strength: case["strength"].as_f64().unwrap(),
    });
    GenerationParams {
        batch_size: case["batch_size"].as_u64().unwrap() as usize,
        ip_adapters,
        init_image,
        ..request_params(case)
    }
}

#[test]
fn images_match_diffusers_ip_adapter_pipeline() {
    let f = Fixtures::load("ip-adapter");
    let cases = f.meta["cases"].as_object().unwrap().clone();
    let (failures, images) = image_case_failures(&cases, params_of, |label| {
        f.get(&format!("image.{label}")).clone()
    });
    assert!(failures.is_empty(), "{failures:#?}");
    assert_eq!(images, 5);
}

#[test]
fn scale_zero_is_no_adapter_and_scale_one_is_far_from_it() {
    let f = Fixtures::load("ip-adapter");
    let sd = StableDiffusion::load(&fixture_path("tiny-a"), &Device::Cpu, DType::F32).unwrap();
    let case = &f.meta["cases"]["scale-1"];
    let with = params_of(case);
    let plain = generate(
        &sd,
        &GenerationParams {
            ip_adapters: vec![],
            ..with.clone()
        },
    );
    let mut zero = with.clone();
    zero.ip_adapters[0].scale = 0.0;
    assert_eq!(generate(&sd, &zero), plain, "scale 0 is no adapter");
    // Our plain image is diffusers' plain one, and outside the bounds of the steered one.
    let want_plain = f.get("plain.scale-1").get(0).unwrap();
    assert!(image_failure("plain", &plain[0].pixels, &want_plain).is_none());
    let want = f.get("image.scale-1").get(0).unwrap();
    assert!(image_failure("plain vs steered", &plain[0].pixels, &want).is_some());
    // Two adapters' terms add up: the image at 0.5 + 0.5 is the one at 1.0.
    let mut halves = with.clone();
    halves.ip_adapters[0].scale = 0.5;
    halves.ip_adapters.push(halves.ip_adapters[0].clone());
    assert!(image_failure("0.5 + 0.5", &generate(&sd, &halves)[0].pixels, &want).is_none());
}

#[test]
fn an_adapter_for_another_unet_is_refused() {
    // tiny-b's UNet has other widths and cross-attentions.
    let e = IpAdapterModel::load(
        &models().join("ip-adapter_sd15.safetensors"),
        &unet_config("tiny-b"),
        &Device::Cpu,
        DType::F32,
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("cross-attention") || e.contains("does not fit"),
        "{e}"
    );
    // Through a request: an error naming the adapter.
    let f = Fixtures::load("ip-adapter");
    let sd = StableDiffusion::load(&fixture_path("tiny-b"), &Device::Cpu, DType::F32).unwrap();
    let e = sd
        .generate(&params_of(&f.meta["cases"]["scale-1"]), &mut |_| {
            std::ops::ControlFlow::Continue(())
        })
        .unwrap_err()
        .to_string();
    assert!(e.contains("ip-adapter_sd15"), "{e}");
}

/// The hires pass attends to the first pass's image tokens: the encoder (ViT-H/14 for SD 1.5's
/// adapters, 1.2 GB in f16) is read and run once a request. The encoder's folder is moved away
/// while the first pass denoises; a second read for the hires pass would fail.
#[test]
fn the_hires_pass_reuses_the_first_pass_s_image_tokens() {
    use sdserve_pipeline::pipeline::{Hires, Upscaler};
    let f = Fixtures::load("ip-adapter");
    let sd = StableDiffusion::load(&fixture_path("tiny-a"), &Device::Cpu, DType::F32).unwrap();
    let dir = std::env::temp_dir().join(format!("sdserve-ipa-hires-{}", std::process::id()));
    let encoder = dir.join("image_encoder");
    std::fs::create_dir_all(&encoder).unwrap();
    for entry in std::fs::read_dir(models().join("image_encoder")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), encoder.join(entry.file_name())).unwrap();
    }
    let mut params = params_of(&f.meta["cases"]["scale-1"]);
    params.ip_adapters[0].image_encoder = Arc::new(ImageEncoder::new("image_encoder", &encoder));
    params.hires = Some(Hires {
        width: params.width * 2,
        height: params.height * 2,
        upscale_width: params.width * 2,
        upscale_height: params.height * 2,
        upscaler: Upscaler::Resize,
        steps: 3,
        strength: 0.6,
        scheduler: None,
        schedule: None,
        prompt: None,
        negative_prompt: None,
    });
    let kept = generate(&sd, &params);
    let moved = dir.join("moved");
    let mut was_moved = false;
    let run = sd.generate(&params, &mut |p| {
        // Step 1 is the first pass's (the hires pass counts on from its steps).
        if p.step == 1 {
            std::fs::rename(&encoder, &moved).unwrap();
            was_moved = true;
        }
        std::ops::ControlFlow::Continue(())
    });
    let _ = std::fs::remove_dir_all(&dir);
    assert!(was_moved, "the folder was moved during the first pass");
    let images = run.expect("the hires pass does not read the encoder again");
    assert_eq!(images, kept, "the same image as with the folder in place");
}
