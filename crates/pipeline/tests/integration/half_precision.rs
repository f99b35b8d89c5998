//! Half precision and the memory levers on the CPU, against the f32 references of the tiny
//! fixture models (images from diffusers in f32, `tools/make_tiny_models.py`).
//!
//! The tiny models have random weights, so half-precision rounding is amplified more than in a
//! trained model; the tolerances below are what we measured, with some margin, not a claim about
//! SD 1.5 in f16 on a GPU (see docs/GPU.md for what is and is not measured).

use crate::common;

use common::{generate_one, request_params, tiny_model_json};

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use sdserve_pipeline::attention::AttentionSlicing;
use sdserve_pipeline::memory::precision::has_non_finite;
use sdserve_pipeline::memory::{MemoryPlan, Offload, VaeTiling};
use sdserve_pipeline::pipeline::StableDiffusion;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn references(name: &str) -> (serde_json::Value, HashMap<String, Tensor>) {
    let json = tiny_model_json(name);
    let tensors = candle_core::safetensors::load(
        fixtures().join(format!("{name}.safetensors")),
        &Device::Cpu,
    )
    .unwrap();
    (json, tensors)
}

/// (mean abs difference on 0..255, fraction of values off by more than 8, max difference).
fn pixel_stats(ours: &[u8], reference: &[u8]) -> (f64, f64, u8) {
    assert_eq!(ours.len(), reference.len());
    let d: Vec<u8> = ours
        .iter()
        .zip(reference)
        .map(|(a, b)| a.abs_diff(*b))
        .collect();
    let mean = d.iter().map(|&x| x as f64).sum::<f64>() / d.len() as f64;
    let over = d.iter().filter(|&&x| x > 8).count() as f64 / d.len() as f64;
    (mean, over, d.iter().copied().max().unwrap_or(0))
}

fn load(name: &str, dtype: DType) -> StableDiffusion {
    StableDiffusion::load(&fixtures().join(name), &Device::Cpu, dtype).expect("loads")
}

/// Whole images in f16 and bf16 against diffusers' f32 images, for a few schedulers.
fn half_images(name: &str, dtype: DType, max_mean: f64, max_over: f64, max_pixel: u8) {
    let (json, tensors) = references(name);
    let model = load(name, dtype);
    for label in ["euler", "dpmpp_2m", "ddim"] {
        let request = &json["images"][label];
        let params = request_params(request);
        let image = generate_one(&model, &params);
        let expected = tensors[&format!("image.{label}")]
            .flatten_all()
            .unwrap()
            .to_vec1::<u8>()
            .unwrap();
        let (mean, over, max) = pixel_stats(&image.pixels, &expected);
        eprintln!(
            "{name} {} {label}: mean abs diff {mean:.3}, fraction > 8: {over:.4}, max {max}",
            dtype.as_str()
        );
        assert!(
            mean <= max_mean && over <= max_over && max <= max_pixel,
            "{name} {} {label}: mean {mean:.3} (limit {max_mean}), >8 {over:.4} (limit {max_over}), max {max} (limit {max_pixel})",
            dtype.as_str()
        );
    }
}

#[test]
fn f16_images_close_to_f32_reference() {
    // Measured (euler, dpmpp_2m, ddim): mean 0.08-0.22 of 255, max 3, none off by more than 8.
    half_images("tiny-a", DType::F16, 0.5, 0.0, 6);
    half_images("tiny-b", DType::F16, 0.5, 0.0, 6);
}

#[test]
fn bf16_on_cpu_text_encoder_only() {
    // candle 0.11's CPU backend has no bf16 convolution (UNet/VAE fail with "unsupported dtype
    // BF16 for op matmul" inside conv2d), so `select_dtype` maps DTYPE=bf16 on the CPU to f32.
    // What does run on the CPU in bf16 is the text encoder; compare it with the f32 reference.
    let (_, tensors) = references("tiny-a");
    let model = load("tiny-a", DType::BF16);
    let (json, _) = references("tiny-a");
    let prompt = json["text"]["prompt"].as_str().unwrap();
    let emb = model.encode_prompt(prompt, "", false).unwrap();
    assert_eq!(emb.dtype(), DType::BF16);
    let want = &tensors["text.embeddings"];
    let d = common::max_abs_diff(&emb.to_dtype(DType::F32).unwrap(), want);
    eprintln!("tiny-a bf16 text embeddings: max abs diff {d:.4}");
    assert!(d < 0.1, "{d}");
    let params = request_params(&json["images"]["euler"]);
    let err = model
        .generate(&params, &mut |_| ControlFlow::Continue(()))
        .unwrap_err();
    assert!(err.to_string().contains("BF16"), "{err}");
}

/// A copy of tiny-a whose VAE `conv_out` bias for the red channel is 70000: finite in f32, but
/// +inf once the weights are converted to f16 (65504 is f16's largest value). An f16 decode then
/// yields Inf/NaN like an overflowing VAE does; the f32 decode is finite.
fn overflowing_model_dir() -> PathBuf {
    let src = fixtures().join("tiny-a");
    let dir = std::env::temp_dir().join(format!("sdserve-f16-overflow-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("vae")).unwrap();
    for entry in [
        "model_index.json",
        "scheduler",
        "text_encoder",
        "tokenizer",
        "unet",
    ] {
        std::os::unix::fs::symlink(src.join(entry), dir.join(entry)).unwrap();
    }
    std::fs::copy(src.join("vae/config.json"), dir.join("vae/config.json")).unwrap();
    let file = "vae/diffusion_pytorch_model.safetensors";
    let mut tensors = candle_core::safetensors::load(src.join(file), &Device::Cpu).unwrap();
    let bias = tensors["decoder.conv_out.bias"].to_vec1::<f32>().unwrap();
    let mut poisoned = bias.clone();
    poisoned[0] = 70000.0;
    tensors.insert(
        "decoder.conv_out.bias".into(),
        Tensor::new(poisoned, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&tensors, dir.join(file)).unwrap();
    dir
}

#[test]
fn nan_decode_in_half_precision_is_redone_in_f32() {
    let (_, tensors) = references("tiny-a");
    let latents = (&tensors["vae.latents"] * 0.18215).unwrap();

    // The real model decodes cleanly in f16: no retry.
    let half = load("tiny-a", DType::F16);
    assert!(half.memory_plan().vae_nan_retry);
    let image = half.decode_latents(&latents).unwrap();
    assert!(!half.last_decode_retried());
    assert!(!has_non_finite(&image).unwrap());

    // The poisoned VAE overflows in f16: the decode is redone in f32, no black image.
    let dir = overflowing_model_dir();
    let half = StableDiffusion::load(&dir, &Device::Cpu, DType::F16).unwrap();
    let image = half.decode_latents(&latents).unwrap();
    assert!(
        half.last_decode_retried(),
        "the f16 decode overflowed and was retried"
    );
    assert!(!has_non_finite(&image).unwrap(), "no black image");
    assert_eq!(image.dtype(), DType::F32);
    // The retry is exactly the f32 decode.
    let full = StableDiffusion::load(&dir, &Device::Cpu, DType::F32).unwrap();
    let want = full.decode_latents(&latents).unwrap();
    let d = common::max_abs_diff(&image, &want);
    assert!(d < 1e-3, "retry differs from the f32 decode by {d}");
    // And through the whole pipeline the image is not black.
    let (json, _) = references("tiny-a");
    let img = generate_one(&half, &request_params(&json["images"]["euler"]));
    assert!(half.last_decode_retried());
    assert!(img.pixels.iter().any(|&p| p != 0));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn tiled_decode_is_close_to_untiled() {
    let (_, tensors) = references("tiny-a");
    let mut model = load("tiny-a", DType::F32);
    // vae.latents are already divided by the scaling factor; decode_latents divides again.
    let latents = (&tensors["vae.latents"] * 0.18215).unwrap();
    let untiled = model.decode_latents(&latents).unwrap();
    let want = &tensors["vae.output"];
    let d0 = common::max_abs_diff(&untiled, want);
    assert!(d0 < 1e-4, "untiled decode vs diffusers: {d0}");
    let (_, _, h, _) = latents.dims4().unwrap();
    for tile in [h / 2, h * 3 / 4] {
        model.set_vae_tiling(Some(VaeTiling::new(tile)));
        let tiled = model.decode_latents(&latents).unwrap();
        assert_eq!(tiled.dims(), untiled.dims());
        let diff = (&tiled - &untiled).unwrap().abs().unwrap();
        let max: f32 = diff.max_all().unwrap().to_scalar().unwrap();
        let mean: f32 = diff.mean_all().unwrap().to_scalar().unwrap();
        eprintln!("tiny-a tiled decode, tile {tile} of {h} latent cells: max {max:.4}, mean {mean:.4} (image range [-1, 1])");
        // Each tile's group norms see only that tile: a visible but small difference, as in
        // diffusers. Measured on this random model; see docs/GPU.md.
        assert!(
            mean < 0.05 && max < 0.5,
            "tile {tile}: mean {mean}, max {max}"
        );
    }
}

#[test]
fn memory_levers_keep_the_image() {
    let (json, _) = references("tiny-a");
    let params = request_params(&json["images"]["euler"]);
    let mut model = load("tiny-a", DType::F32);
    let base = generate_one(&model, &params);

    // Attention slicing changes only float rounding.
    for slicing in [AttentionSlicing::Off, AttentionSlicing::MaxBytes(4096)] {
        model.set_attention_slicing(slicing);
        let (mean, _, max) = pixel_stats(&generate_one(&model, &params).pixels, &base.pixels);
        eprintln!("attention {slicing:?}: mean {mean:.4}, max {max}");
        assert!(max <= 1, "{slicing:?}: max pixel difference {max}");
    }
    model.set_attention_slicing(AttentionSlicing::Auto);

    // Model offload computes the same thing with components built for their stage.
    model.set_offload(Offload::Model).unwrap();
    assert_eq!(generate_one(&model, &params).pixels, base.pixels);
    model.set_offload(Offload::None).unwrap();
    assert_eq!(generate_one(&model, &params).pixels, base.pixels);

    // Loading with an offload plan from the start gives the same image too.
    let mut plan = MemoryPlan::cpu(DType::F32);
    plan.offload = Offload::Model;
    let offloaded = StableDiffusion::load_with_plan(
        &fixtures().join("tiny-a"),
        &Device::Cpu,
        DType::F32,
        &plan,
    )
    .unwrap();
    assert_eq!(generate_one(&offloaded, &params).pixels, base.pixels);
    assert_eq!(
        offloaded.last_memory_usage(),
        None,
        "no device accounting on the CPU"
    );
}
