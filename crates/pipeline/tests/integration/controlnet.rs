//! ControlNets against diffusers (`tools/make_controlnet_fixtures.py`): the model's residuals
//! from a diffusers folder and from the original single-file names (`.safetensors` under
//! `control_model.`, a `.pth` pickle without), the UNet with them, and whole images of
//! `StableDiffusionControlNetPipeline` on tiny-a-vae8 (one ControlNet, several, a guidance
//! window, a resized control image, a batch, no CFG),
//! `StableDiffusionControlNetImg2ImgPipeline` and `StableDiffusionControlNetInpaintPipeline`
//! (tiny-a-vae8's 4-channel UNet, tiny-inpaint's 9-channel one).

use crate::common;

use std::path::PathBuf;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use common::{fixture_path, image_case_failures, image_failure, max_abs_diff, read_png, Fixtures};
use common::{generate_one, request_params};
use sdserve_pipeline::controlnet::{ControlNet, ControlNetModel, ControlNetUnit};
use sdserve_pipeline::pipeline::{GenerationParams, InitImage, StableDiffusion};
use sdserve_pipeline::unet::{AdditionalResiduals, UNet2DConditionModel, UNetConfig};
use sdserve_pipeline::PipelineError;

fn net_path(name: &str) -> PathBuf {
    let dir = fixture_path("controlnet");
    match name {
        "cn-a" => dir.join("cn-a"),
        "cn-a-ldm" => dir.join("cn-a-ldm.safetensors"),
        "cn-b" => dir.join("cn-b.pth"),
        "cn-i" => fixture_path("controlnet-inpaint/cn-i"),
        "cn-i-ldm" => fixture_path("controlnet-inpaint/cn-i-ldm.safetensors"),
        other => panic!("no ControlNet fixture {other}"),
    }
}

fn unet_config() -> UNetConfig {
    let text = std::fs::read_to_string(fixture_path("tiny-a-vae8/unet/config.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn load(name: &str) -> ControlNetModel {
    ControlNetModel::load(&net_path(name), &unet_config(), &Device::Cpu, DType::F32)
        .unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn residuals(f: &Fixtures, net: &ControlNetModel, scale: f64) -> AdditionalResiduals {
    net.forward(
        f.get("model.sample"),
        f.get("model.timesteps"),
        f.get("model.context"),
        f.get("model.cond"),
        scale,
        Default::default(),
    )
    .unwrap()
}

/// Every residual within 1e-4 of the largest reference value (f32 against torch's f32).
fn assert_residuals(label: &str, f: &Fixtures, reference: &str, got: &AdditionalResiduals) {
    let want = |k: String| f.get(&format!("model.{reference}.{k}")).clone();
    let mut pairs: Vec<(String, Tensor, &Tensor)> = got
        .down
        .iter()
        .enumerate()
        .map(|(i, t)| (format!("down.{i}"), want(format!("down.{i}")), t))
        .collect();
    assert!(
        f.tensors
            .contains_key(&format!("model.{reference}.down.{}", got.down.len()))
            .eq(&false),
        "{label}: fewer residuals than diffusers"
    );
    pairs.push(("mid".into(), want("mid".into()), &got.mid));
    for (k, want, got) in pairs {
        let scale = want
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let d = max_abs_diff(&want, got);
        assert!(scale > 1e-3, "{label} {k}: reference residual is ~0");
        assert!(
            d < 1e-4 * scale.max(1.0),
            "{label} {k}: max abs diff {d} (scale {scale})"
        );
    }
}

#[test]
fn residuals_match_diffusers_from_a_folder_and_from_single_files() {
    let f = Fixtures::load("controlnet");
    let a = load("cn-a");
    assert_eq!(a.image_scale_factor(), 8);
    assert_residuals("cn-a folder", &f, "cn-a", &residuals(&f, &a, 0.7));
    // The LDM single file (`control_model.` prefix, config from the UNet's plus the hint
    // encoder's shapes) holds the same values.
    let a_ldm = load("cn-a-ldm");
    assert_eq!(
        a_ldm.config().conditioning_embedding_out_channels,
        Some(vec![16, 32, 96, 256])
    );
    assert_residuals(
        "cn-a-ldm.safetensors",
        &f,
        "cn-a",
        &residuals(&f, &a_ldm, 0.7),
    );
    // A pickle without the prefix, another hint encoder (8, 8, 16, 16).
    let b = load("cn-b");
    assert_eq!(
        b.config().conditioning_embedding_out_channels,
        Some(vec![8, 8, 16, 16])
    );
    assert_residuals("cn-b.pth", &f, "cn-b", &residuals(&f, &b, 1.3));
}

#[test]
fn the_unet_adds_the_residuals_where_diffusers_does() {
    let f = Fixtures::load("controlnet");
    let dir = fixture_path("tiny-a-vae8/unet");
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
    let unet = UNet2DConditionModel::new(vb(), &unet_config()).unwrap();
    // Sequential offload: the streamed parts take the residuals as the resident model does.
    let streamed = UNet2DConditionModel::streamed(vb(), &unet_config(), &Device::Cpu).unwrap();
    let r = residuals(&f, &load("cn-a"), 0.7);
    let (x, t, ctx) = (
        f.get("model.sample"),
        f.get("model.timesteps"),
        f.get("model.context"),
    );
    let got = unet
        .forward_with_residuals(x, t, ctx, None, Some(&r))
        .unwrap();
    let want = f.get("model.unet.with_cn-a");
    let d = max_abs_diff(want, &got);
    assert!(d < 1e-4, "with residuals: {d}");
    let got_streamed = streamed
        .forward_with_residuals(x, t, ctx, None, Some(&r))
        .unwrap();
    assert_eq!(max_abs_diff(&got, &got_streamed), 0.0);
    // Without them the output is the plain UNet's, far from the steered one.
    let plain = unet.forward(x, t, ctx).unwrap();
    assert!(max_abs_diff(f.get("model.unet.plain"), &plain) < 1e-4);
    assert!(max_abs_diff(want, &plain) > 0.05);
}

fn params_of(case: &serde_json::Value) -> GenerationParams {
    let controlnets = case["controlnets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| {
            let name = u["model"].as_str().unwrap();
            ControlNetUnit {
                model: Arc::new(ControlNet::new(name, net_path(name))),
                image: read_png(u["image"].as_str().unwrap()),
                preprocessor: None,
                scale: u["scale"].as_f64().unwrap(),
                guidance_start: u["guidance_start"].as_f64().unwrap(),
                guidance_end: u["guidance_end"].as_f64().unwrap(),
                hires_image: None,
                hr_option: Default::default(),
                inpaint_crop: true,
                control_mode: Default::default(),
                mask: None,
                hires_mask: None,
                infotext: None,
            }
        })
        .collect();
    let init_image = case["init_image"].as_str().map(|name| InitImage {
        image: read_png(name),
        mask: case["mask_image"].as_str().map(read_png),
        strength: case["strength"].as_f64().unwrap(),
    });
    GenerationParams {
        batch_size: case["batch_size"].as_u64().unwrap() as usize,
        controlnets,
        init_image,
        ..request_params(case)
    }
}

#[test]
fn images_match_diffusers_controlnet_pipeline() {
    let f = Fixtures::load("controlnet");
    let cases = f.meta["cases"].as_object().unwrap().clone();
    let (failures, images) = image_case_failures(&cases, params_of, |label| {
        f.get(&format!("image.{label}")).clone()
    });
    assert!(failures.is_empty(), "{failures:#?}");
    assert_eq!(images, 11);
}

fn model() -> StableDiffusion {
    StableDiffusion::load(&fixture_path("tiny-a-vae8"), &Device::Cpu, DType::F32).unwrap()
}

#[test]
fn without_the_controlnet_the_image_is_not_diffusers_controlnet_image() {
    // The check above fails when the residuals are dropped: the same request without its
    // ControlNet is diffusers' plain image, outside the bounds of the steered one.
    let f = Fixtures::load("controlnet");
    let case = &f.meta["cases"]["single"];
    let sd = model();
    let plain = generate_one(
        &sd,
        &GenerationParams {
            controlnets: vec![],
            ..params_of(case)
        },
    );
    assert!(image_failure(
        "plain vs steered",
        &plain.pixels,
        &f.get("image.single").get(0).unwrap()
    )
    .is_some());
    assert!(image_failure(
        "plain",
        &plain.pixels,
        &f.get("plain.single").get(0).unwrap()
    )
    .is_none());
}

#[test]
fn inpainting_without_the_controlnets_is_not_diffusers_controlnet_inpainting() {
    // The inpainting cases fail with the residuals dropped (4- and 9-channel UNets), and a
    // 9-channel UNet's ControlNet reads the same from the original single-file names (its
    // config the UNet's, taking the VAE's 4 latent channels) as from its folder.
    let f = Fixtures::load("controlnet");
    for (label, model) in [("inpaint", "tiny-a-vae8"), ("inpaint-9ch", "tiny-inpaint")] {
        let sd = StableDiffusion::load(&fixture_path(model), &Device::Cpu, DType::F32).unwrap();
        let case = &f.meta["cases"][label];
        let want = f.get(&format!("image.{label}")).get(0).unwrap();
        let plain = generate_one(
            &sd,
            &GenerationParams {
                controlnets: vec![],
                ..params_of(case)
            },
        );
        assert!(
            image_failure(&format!("{label} without"), &plain.pixels, &want).is_some(),
            "{label}: the ControlNet changes nothing"
        );
        if model == "tiny-inpaint" {
            let folder = generate_one(&sd, &params_of(case));
            let mut single = params_of(case);
            single.controlnets[0].model =
                Arc::new(ControlNet::new("cn-i-ldm", net_path("cn-i-ldm")));
            assert_eq!(generate_one(&sd, &single), folder, "single file vs folder");
        }
    }
}

#[test]
fn what_a_controlnet_cannot_do_is_refused() {
    let f = Fixtures::load("controlnet");
    let sd = model();
    let base = params_of(&f.meta["cases"]["single"]);
    let run = |p: &GenerationParams| {
        sd.generate(p, &mut |_| std::ops::ControlFlow::Continue(()))
            .unwrap_err()
            .to_string()
    };
    // A ControlNet of another UNet (tiny-b's widths) does not fit tiny-a's.
    let tiny_b: UNetConfig = serde_json::from_str(
        &std::fs::read_to_string(fixture_path("tiny-b/unet/config.json")).unwrap(),
    )
    .unwrap();
    let foreign = ControlNetModel::load(&net_path("cn-b"), &tiny_b, &Device::Cpu, DType::F32);
    match foreign {
        Err(PipelineError::Weights { message, .. }) => {
            assert!(message.contains("does not fit"), "{message}")
        }
        Err(other) => panic!("{other}"),
        Ok(net) => assert!(net.fits(&unet_config()).is_err()),
    }
    let missing = GenerationParams {
        controlnets: vec![ControlNetUnit {
            model: Arc::new(ControlNet::named("nowhere")),
            ..base.controlnets[0].clone()
        }],
        ..base
    };
    let e = run(&missing);
    assert!(e.contains("nowhere"), "{e}");
}

#[test]
fn the_hires_pass_is_steered_as_each_unit_s_hr_option_says() {
    // The extension's `hr_option`: both passes (the second with the image at the hires size,
    // or the unit's own hires image), the first alone, the second alone. Each pair differs
    // where the pass it leaves out would be steered: dropping the second pass's residuals
    // makes `both` the `low_res_only` image.
    use sdserve_pipeline::controlnet::HiresOption;
    use sdserve_pipeline::pipeline::{Hires, Upscaler};
    let f = Fixtures::load("controlnet");
    let sd = model();
    let base = GenerationParams {
        steps: 4,
        hires: Some(Hires {
            width: 128,
            height: 128,
            upscale_width: 128,
            upscale_height: 128,
            upscaler: Upscaler::Resize,
            steps: 4,
            strength: 0.6,
            scheduler: None,
            schedule: None,
            prompt: None,
            negative_prompt: None,
        }),
        ..params_of(&f.meta["cases"]["single"])
    };
    let run = |option: Option<HiresOption>, hires_image: Option<&str>| {
        let mut p = base.clone();
        match option {
            None => p.controlnets.clear(),
            Some(o) => {
                p.controlnets[0].hr_option = o;
                p.controlnets[0].hires_image = hires_image.map(read_png);
            }
        }
        let image = generate_one(&sd, &p);
        assert_eq!((image.width, image.height), (128, 128));
        image.pixels
    };
    let none = run(None, None);
    let both = run(Some(HiresOption::Both), None);
    let low = run(Some(HiresOption::LowResOnly), None);
    let high = run(Some(HiresOption::HighResOnly), None);
    let both_own = run(Some(HiresOption::Both), Some("control-b-64.png"));
    let differ = |a: &[u8], b: &[u8]| a.iter().zip(b).filter(|(x, y)| x != y).count();
    for (what, a, b, least) in [
        (
            "both vs low_res_only (second pass)",
            &both,
            &low,
            none.len() / 10,
        ),
        (
            "low_res_only vs none (first pass)",
            &low,
            &none,
            none.len() / 10,
        ),
        (
            "high_res_only vs none (second pass)",
            &high,
            &none,
            none.len() / 10,
        ),
        (
            "high_res_only vs both (first pass)",
            &high,
            &both,
            none.len() / 10,
        ),
        // Two steps of the second pass from a steered first pass: a small change.
        ("the hires image", &both_own, &both, 1),
    ] {
        let n = differ(a, b);
        assert!(n >= least, "{what}: {n} of {} differ", a.len());
    }
    // Without a hires pass every option steers the one pass.
    let one = |o: HiresOption| {
        let mut p = params_of(&f.meta["cases"]["single"]);
        p.controlnets[0].hr_option = o;
        generate_one(&sd, &p).pixels
    };
    assert_eq!(one(HiresOption::HighResOnly), one(HiresOption::Both));
    assert_eq!(one(HiresOption::LowResOnly), one(HiresOption::Both));
}
