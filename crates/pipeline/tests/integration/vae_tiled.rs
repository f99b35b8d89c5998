//! The VAE tiled for large images against diffusers' `enable_tiling` (`_tiled_encode`,
//! `tiled_decode`, 0.42.1): the encoder's latent distribution tile by tile, and whole img2img
//! and inpaint generations with both halves tiled, on tiny models whose config `sample_size`
//! is smaller than the images (references from `tools/make_img2img_fixtures.py`, in
//! `vae-tiled.json` / `vae-tiled.safetensors`).

use crate::common;

use std::ops::ControlFlow;

use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use common::{fixture_path, max_abs_diff, read_png, Fixtures};
use sdserve_pipeline::image_in::image_tensor;
use sdserve_pipeline::memory::footprint::ModelShapes;
use sdserve_pipeline::memory::plan::tile_candidates;
use sdserve_pipeline::memory::VaeTiling;
use sdserve_pipeline::pipeline::{GenerationParams, InitImage, StableDiffusion};
use sdserve_pipeline::schedulers::SchedulerKind;
use sdserve_pipeline::vae::VaeConfig;
use sdserve_pipeline::vae_encoder::AutoencoderKlEncoder;

fn refs() -> (Fixtures, serde_json::Map<String, serde_json::Value>) {
    let f = Fixtures::load("vae-tiled");
    let cases = f.meta["cases"].as_object().expect("cases").clone();
    (f, cases)
}

/// The tile the memory plan picks first for `model` at `side` pixels: the VAE config's
/// `sample_size` in latent cells, as diffusers' `tile_latent_min_size`.
fn planned_tile(model: &str, side: usize) -> VaeTiling {
    let shapes = ModelShapes::from_model_dir(&fixture_path(model)).unwrap();
    let tile = tile_candidates(&shapes, side / shapes.vae_scale_factor)[0];
    VaeTiling::new(tile)
}

fn case_of<'a>(
    cases: &'a serde_json::Map<String, serde_json::Value>,
    model: &str,
) -> (&'a String, &'a serde_json::Value) {
    cases
        .iter()
        .find(|(_, c)| c["model"] == model)
        .expect("a case for the model")
}

fn check_encode(model: &str) {
    let (r, cases) = refs();
    let (_, case) = case_of(&cases, model);
    let dir = fixture_path(model);
    let cfg: VaeConfig =
        serde_json::from_str(&std::fs::read_to_string(dir.join("vae/config.json")).unwrap())
            .unwrap();
    let f = 1usize << (cfg.block_out_channels.len() - 1);
    let vb = unsafe {
        VarBuilder::from_mmaped_safetensors(
            &[dir.join("vae/diffusion_pytorch_model.safetensors")],
            DType::F32,
            &Device::Cpu,
        )
        .unwrap()
    };
    let encoder = AutoencoderKlEncoder::new(vb, &cfg).unwrap();
    let init = read_png(case["init_image"].as_str().unwrap());
    let (w, h) = (init.width as usize, init.height as usize);
    let x = image_tensor(&init, w, h, &Device::Cpu).unwrap();
    let tiling = planned_tile(model, w.max(h));
    assert_eq!(
        tiling.tile_latent as u64,
        case["tile_latent_size"].as_u64().unwrap(),
        "the plan's first tile is diffusers' tile_latent_min_size"
    );
    let tiled = encoder.encode_tiled(&x, tiling, f).unwrap();
    let whole = encoder.encode(&x).unwrap();
    let mean = r.get(&format!("mean.{model}"));
    let std = r.get(&format!("std.{model}"));
    let whole_ref = r.get(&format!("whole_mean.{model}"));
    assert_eq!(tiled.mean.dims(), mean.dims());
    let (dm, ds) = (
        max_abs_diff(&tiled.mean, mean),
        max_abs_diff(&tiled.std, std),
    );
    let dw = max_abs_diff(&whole.mean, whole_ref);
    let gap = max_abs_diff(&tiled.mean, &whole.mean);
    eprintln!(
        "{model}: tiled mean {dm:.2e}, std {ds:.2e}; whole {dw:.2e}; tiled vs whole {gap:.3}"
    );
    assert!(dm < 1e-4 && ds < 1e-4, "{model}: mean {dm}, std {ds}");
    assert!(dw < 1e-4, "{model}: untiled {dw}");
    // The tiles matter: the reference would catch an encoder that ignored them.
    assert!(gap > 1e-2, "{model}: tiling changed nothing ({gap})");
}

#[test]
fn tiled_encode_matches_diffusers_tiny_a() {
    check_encode("tiny-a");
}

#[test]
fn tiled_encode_matches_diffusers_tiny_b() {
    check_encode("tiny-b");
}

#[test]
fn tiled_encode_matches_diffusers_tiny_inpaint() {
    check_encode("tiny-inpaint");
}

/// Whole generations with the VAE tiled both ways, within the image bounds: mean
/// absolute pixel difference <= 1.0 and <= 0.5 % of values off by more than 8.
#[test]
fn tiled_img2img_and_inpaint_match_diffusers() {
    let (r, cases) = refs();
    let mut failures = Vec::new();
    for (label, case) in &cases {
        let model = case["model"].as_str().unwrap();
        let mut sd = StableDiffusion::load(&fixture_path(model), &Device::Cpu, DType::F32).unwrap();
        let (w, h) = (
            case["width"].as_u64().unwrap() as usize,
            case["height"].as_u64().unwrap() as usize,
        );
        sd.set_vae_tiling(Some(planned_tile(model, w.max(h))));
        let params = GenerationParams {
            prompt: case["prompt"].as_str().unwrap().into(),
            negative_prompt: case["negative_prompt"].as_str().unwrap().into(),
            steps: case["steps"].as_u64().unwrap() as usize,
            width: w,
            height: h,
            seed: case["seed"].as_u64().unwrap(),
            guidance_scale: case["guidance_scale"].as_f64().unwrap(),
            scheduler: Some(SchedulerKind::from_name(case["scheduler"].as_str().unwrap()).unwrap()),
            init_image: Some(InitImage {
                image: read_png(case["init_image"].as_str().unwrap()),
                mask: case["mask_image"].as_str().map(read_png),
                strength: case["strength"].as_f64().unwrap(),
            }),
            ..Default::default()
        };
        let images = sd
            .generate(&params, &mut |_| ControlFlow::Continue(()))
            .unwrap();
        let reference = r.get(&format!("image.{label}"));
        failures.extend(common::image_failure(label, &images[0].pixels, reference));
        // Untiled, the same request gives another image: the tiles are really in use.
        sd.set_vae_tiling(None);
        let whole = sd
            .generate(&params, &mut |_| ControlFlow::Continue(()))
            .unwrap();
        assert_ne!(whole[0].pixels, images[0].pixels, "{label}");
    }
    assert_eq!(cases.len(), 3);
    assert!(failures.is_empty(), "{failures:#?}");
}

/// The VAE encoder is a component like the others: offloaded (model or sequential offload) it
/// is built on the device for the request's encodes only, once for the image and the masked
/// image, and the images are those of the resident pipeline, tiled or not.
#[test]
fn offloaded_encoder_gives_the_same_images() {
    use sdserve_pipeline::memory::{MemoryPlan, Offload};
    let (_, cases) = refs();
    for (label, case) in &cases {
        let model = case["model"].as_str().unwrap();
        let (w, h) = (
            case["width"].as_u64().unwrap() as usize,
            case["height"].as_u64().unwrap() as usize,
        );
        let params = GenerationParams {
            prompt: case["prompt"].as_str().unwrap().into(),
            steps: 2,
            width: w,
            height: h,
            seed: 5,
            init_image: Some(InitImage {
                image: read_png(case["init_image"].as_str().unwrap()),
                mask: case["mask_image"].as_str().map(read_png),
                strength: 0.9,
            }),
            ..Default::default()
        };
        for tiling in [None, Some(planned_tile(model, w.max(h)))] {
            let mut want = None;
            for offload in [Offload::None, Offload::Model, Offload::Sequential] {
                let plan = MemoryPlan {
                    offload,
                    vae_tiling: tiling,
                    ..MemoryPlan::cpu(DType::F32)
                };
                let sd = StableDiffusion::load_with_plan(
                    &fixture_path(model),
                    &Device::Cpu,
                    DType::F32,
                    &plan,
                )
                .unwrap();
                let image = sd
                    .generate(&params, &mut |_| ControlFlow::Continue(()))
                    .unwrap()
                    .remove(0);
                match &want {
                    None => want = Some(image),
                    Some(w) => assert_eq!(
                        image.pixels, w.pixels,
                        "{label}: {offload:?}, tiling {tiling:?}"
                    ),
                }
            }
        }
    }
}
