//! The sd-webui-controlnet extension's inpaint modules over real HTTP (tiny-a-vae8 with cn-h,
//! the pipeline's ControlNet whose hint encoder sees the image): a native `inpaint_only` unit
//! makes the pipeline's own image (which `crates/pipeline/tests/integration/controlnet_inpaint.rs`
//! holds to the extension's formulas), the unit's image kept outside the mask; an A1111 unit
//! with `module: inpaint_only` and its mask (any of the extension's forms) makes the same
//! image natively sent; img2img inpainting takes the request's mask; the refusals.
//! `inpaint_only+lama` (the narrowed LaMa of `tools/make_lama_fixtures.py` in ANNOTATOR_DIR)
//! the same way: the pipeline's image of the unit's image painted by LaMa, in both dialects,
//! and `/controlnet/detect`'s LaMa image.

use crate::common;

use std::path::PathBuf;
use std::sync::Arc;

use base64::Engine as _;
use common::{decode_png, post_json_to};
use sdserve_pipeline::controlnet::preprocess::Preprocessor;
use sdserve_pipeline::controlnet::{ControlNet, ControlNetUnit};
use sdserve_pipeline::image_in::resize_lanczos;
use sdserve_pipeline::pipeline::{GenerationParams, PromptSyntax, RgbImage, StableDiffusion};
use sdserve_pipeline::schedulers::SchedulerKind;
use serde_json::{json, Value};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../pipeline/tests/fixtures")
}

fn read(name: &str) -> RgbImage {
    let bytes = std::fs::read(fixtures().join("images").join(name)).unwrap();
    let img = image::load_from_memory(&bytes).unwrap().to_rgb8();
    RgbImage {
        width: img.width(),
        height: img.height(),
        pixels: img.into_raw(),
    }
}

fn png(image: &RgbImage) -> String {
    let mut out = Vec::new();
    image::RgbImage::from_raw(image.width, image.height, image.pixels.clone())
        .unwrap()
        .write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
        .unwrap();
    base64::engine::general_purpose::STANDARD.encode(out)
}

#[test]
fn inpaint_units_in_both_dialects() {
    let s = common::tiny_a_vae8_server(&[("CONTROLNET_DIR", &fixtures().join("controlnet-hint"))]);
    // The request's size, so neither dialect resizes them.
    let image = resize_lanczos(&read("cn-init-64.png"), 256, 256);
    let mask = resize_lanczos(&read("cn-mask-64.png"), 256, 256);
    let base = json!({"prompt": "a house by a lake", "steps": 3, "width": 256, "height": 256,
                      "seed": 11, "scheduler": "euler", "prompt_syntax": "plain"});
    let unit = |module: &str| {
        json!({"model": "cn-h", "image": png(&image), "mask": png(&mask),
               "preprocessor": {"type": module}})
    };
    let with = |units: Vec<Value>| {
        let mut b = base.clone();
        b["controlnets"] = json!(units);
        b
    };
    let run = |body: &Value| {
        let r = s.post_json(body);
        assert_eq!(r.status, 200, "{}", r.text());
        let j = r.json();
        let (_, _, px, text) = decode_png(j["image_base64"].as_str().unwrap());
        (px, j["metadata"].clone(), text.unwrap_or_default())
    };
    let (only, meta, text) = run(&with(vec![unit("inpaint_only")]));
    assert_eq!(
        meta["controlnets"][0]["preprocessor"],
        json!({"type": "inpaint_only"})
    );
    assert!(text.contains("Module: inpaint_only"), "{text}");
    // The pipeline's own image.
    let sd = StableDiffusion::load(
        &fixtures().join("tiny-a-vae8"),
        &candle_core::Device::Cpu,
        candle_core::DType::F32,
    )
    .unwrap();
    let params = GenerationParams {
        prompt: "a house by a lake".into(),
        steps: 3,
        width: 256,
        height: 256,
        seed: 11,
        scheduler: Some(SchedulerKind::Euler),
        prompt_syntax: PromptSyntax::Plain,
        controlnets: vec![ControlNetUnit {
            model: Arc::new(ControlNet::new(
                "cn-h",
                fixtures().join("controlnet-hint/cn-h"),
            )),
            image: image.clone(),
            preprocessor: Some(Preprocessor::InpaintOnly),
            scale: 1.0,
            guidance_start: 0.0,
            guidance_end: 1.0,
            hires_image: None,
            hr_option: Default::default(),
            inpaint_crop: true,
            control_mode: Default::default(),
            mask: Some(mask.clone()),
            hires_mask: None,
            infotext: None,
        }],
        ..Default::default()
    };
    let own = sd
        .generate(&params, &mut |_| std::ops::ControlFlow::Continue(()))
        .unwrap()
        .remove(0);
    assert!(own.pixels == only, "the server's image is the pipeline's");
    // Far from the mask the result is the unit's image.
    let corner = (250 * 256) * 3;
    assert_eq!(only[corner..corner + 18], image.pixels[corner..corner + 18]);
    let (harmonious, meta, _) = run(&with(vec![unit("inpaint")]));
    assert_eq!(meta["controlnets"][0]["preprocessor"]["type"], "inpaint");
    assert!(harmonious != only);

    // A1111: the unit's image and mask (as `image` + `mask` or `{image, mask}`), Just Resize.
    let a1111 = |unit: Value| {
        let body = json!({"prompt": "a house by a lake", "steps": 3, "width": 256,
            "height": 256, "seed": 11, "sampler_name": "Euler", "cfg_scale": 7.5,
            "alwayson_scripts": {"controlnet": {"args": [unit]}}});
        post_json_to(s.addr, "/sdapi/v1/txt2img", &body)
    };
    let a1111_image = |unit: Value| {
        let r = a1111(unit);
        assert_eq!(r.status, 200, "{}", r.text());
        let j = r.json();
        let info: Value = serde_json::from_str(j["info"].as_str().unwrap()).unwrap();
        let (_, _, px, _) = decode_png(j["images"][0].as_str().unwrap());
        (px, info["infotexts"][0].as_str().unwrap().to_string())
    };
    let (flat, infotext) = a1111_image(json!({"model": "cn-h", "module": "inpaint_only",
        "image": png(&image), "mask": png(&mask), "resize_mode": "Just Resize"}));
    assert!(infotext.contains("Module: inpaint_only"), "{infotext}");
    let (object, _) = a1111_image(json!({"model": "cn-h", "module": "inpaint_only",
        "image": {"image": png(&image), "mask": png(&mask)}, "resize_mode": "Just Resize"}));
    assert!(flat == object, "`mask` and `{{image, mask}}` differ");
    assert_eq!(flat[corner..corner + 18], image.pixels[corner..corner + 18]);
    // Without a mask nothing is masked: the unit's image reaches the ControlNet whole.
    let (unmasked, _) = a1111_image(json!({"model": "cn-h", "module": "inpaint",
        "image": png(&image), "resize_mode": "Just Resize"}));
    let (masked, infotext) = a1111_image(json!({"model": "cn-h",
        "module": "inpaint_global_harmonious", "image": png(&image), "mask": png(&mask),
        "resize_mode": "Just Resize"}));
    // The module as sent (the extension's serialisation of the unit).
    assert!(
        infotext.contains("\"Module: inpaint_global_harmonious, Model: cn-h, Weight: 1.0, Resize Mode: Just Resize, Processor Res: 0.5, Threshold A: 0.5,"),
        "{infotext}"
    );
    assert!(unmasked != masked);
    // inpaint_only+lama without its network (no ANNOTATOR_DIR here): a 422 naming it.
    let r = a1111(json!({"model": "cn-h", "module": "inpaint_only+lama", "image": png(&image)}));
    let e = r.error(422, "validation_error").to_string();
    assert!(
        e.contains("inpaint_only+lama") && e.contains("ControlNetLama.pth"),
        "{e}"
    );
    let small = resize_lanczos(&mask, 128, 128);
    let r = a1111(
        json!({"model": "cn-h", "module": "inpaint", "image": png(&image),
        "mask": png(&small)}),
    );
    let e = r.error(422, "validation_error").to_string();
    assert!(e.contains("[0].mask"), "{e}");

    // Native img2img inpainting: a unit without a mask takes the request's; inpaint_only
    // acts as inpaint there.
    let mut inpainting = with(vec![json!({"model": "cn-h", "image": png(&image),
        "preprocessor": {"type": "inpaint_only"}})]);
    inpainting["init_image"] = json!(png(&image));
    inpainting["mask_image"] = json!(png(&mask));
    let (by_request, _, _) = run(&inpainting);
    let mut own_mask = inpainting.clone();
    own_mask["controlnets"][0]["mask"] = json!(png(&mask));
    own_mask["controlnets"][0]["preprocessor"]["type"] = json!("inpaint");
    assert!(run(&own_mask).0 == by_request);

    // Refusals, each a 422 naming `controlnets`.
    let refused = |body: Value, needle: &str| {
        let r = s.post_json(&body);
        let e = r.error(422, "validation_error");
        let text = e.to_string();
        assert!(
            r.broken_fields().iter().any(|f| f == "controlnets"),
            "{text}"
        );
        assert!(text.contains(needle), "{needle}: {text}");
    };
    let mut no_mask = unit("inpaint");
    no_mask["mask"] = Value::Null;
    refused(with(vec![no_mask]), "needs a mask");
    let mut wrong_size = unit("inpaint_only");
    wrong_size["mask"] = json!(png(&small));
    refused(with(vec![wrong_size]), "same size");
    let mut canny = unit("inpaint");
    canny["preprocessor"] = json!({"type": "canny"});
    refused(with(vec![canny]), "only with the \\\"inpaint\\\"");
}

#[test]
fn inpaint_only_lama_in_both_dialects_and_detect() {
    use sdserve_pipeline::controlnet::preprocess::{inpaint_only_lama, LamaNetwork};
    let s = common::tiny_a_vae8_server(&[
        ("CONTROLNET_DIR", &fixtures().join("controlnet-hint")),
        ("ANNOTATOR_DIR", &fixtures().join("lama")),
    ]);
    let image = resize_lanczos(&read("cn-init-64.png"), 256, 256);
    let mask = resize_lanczos(&read("cn-mask-64.png"), 256, 256);
    let net = LamaNetwork::load(
        &fixtures().join("lama/ControlNetLama.pth"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let first: Vec<u8> = mask.pixels.iter().step_by(3).copied().collect();
    let painted = inpaint_only_lama(&net, &image, &first).unwrap();
    assert!(painted != image, "LaMa paints the masked area");
    let body = json!({"prompt": "a house by a lake", "steps": 3, "width": 256, "height": 256,
        "seed": 11, "scheduler": "euler", "prompt_syntax": "plain",
        "controlnets": [{"model": "cn-h", "image": png(&image), "mask": png(&mask),
                         "preprocessor": {"type": "inpaint_only+lama"}}]});
    let r = s.post_json(&body);
    assert_eq!(r.status, 200, "{}", r.text());
    let j = r.json();
    assert_eq!(
        j["metadata"]["controlnets"][0]["preprocessor"],
        json!({"type": "inpaint_only+lama"})
    );
    let (_, _, native, text) = decode_png(j["image_base64"].as_str().unwrap());
    assert!(
        text.unwrap_or_default()
            .contains("Module: inpaint_only+lama"),
        "the infotext names the module"
    );
    // The pipeline's own image of LaMa's map, with the noise modifier and the restore.
    let sd = StableDiffusion::load(
        &fixtures().join("tiny-a-vae8"),
        &candle_core::Device::Cpu,
        candle_core::DType::F32,
    )
    .unwrap();
    let params = GenerationParams {
        prompt: "a house by a lake".into(),
        steps: 3,
        width: 256,
        height: 256,
        seed: 11,
        scheduler: Some(SchedulerKind::Euler),
        prompt_syntax: PromptSyntax::Plain,
        controlnets: vec![ControlNetUnit {
            model: Arc::new(ControlNet::new(
                "cn-h",
                fixtures().join("controlnet-hint/cn-h"),
            )),
            image: painted.clone(),
            preprocessor: Some(Preprocessor::InpaintOnlyLama),
            scale: 1.0,
            guidance_start: 0.0,
            guidance_end: 1.0,
            hires_image: None,
            hr_option: Default::default(),
            inpaint_crop: true,
            control_mode: Default::default(),
            mask: Some(mask.clone()),
            hires_mask: None,
            infotext: None,
        }],
        ..Default::default()
    };
    let own = sd
        .generate(&params, &mut |_| std::ops::ControlFlow::Continue(()))
        .unwrap()
        .remove(0);
    assert!(own.pixels == native, "the server's image is the pipeline's");
    // A1111, Just Resize at the request's size: the same image; two batches (`n_iter`).
    let body = json!({"prompt": "a house by a lake", "steps": 3, "width": 256,
        "height": 256, "seed": 11, "sampler_name": "Euler", "cfg_scale": 7.5, "n_iter": 2,
        "alwayson_scripts": {"controlnet": {"args": [{"model": "cn-h",
            "module": "inpaint_only+lama", "image": png(&image), "mask": png(&mask),
            "resize_mode": "Just Resize"}]}}});
    let r = post_json_to(s.addr, "/sdapi/v1/txt2img", &body);
    assert_eq!(r.status, 200, "{}", r.text());
    let j = r.json();
    let info: Value = serde_json::from_str(j["info"].as_str().unwrap()).unwrap();
    assert!(info["infotexts"][0]
        .as_str()
        .unwrap()
        .contains("Module: inpaint_only+lama"));
    let (_, _, a1111, _) = decode_png(j["images"][0].as_str().unwrap());
    assert!(a1111 == native, "A1111's image is the native one");
    // The second batch (seed 12) starts from plain noise: the extension's
    // `before_process_batch` wraps only the first batch's RNG, then clears its noise modifier.
    let (_, _, second, _) = decode_png(j["images"][1].as_str().unwrap());
    let at_12 = |lama_noise: bool| {
        let p = GenerationParams {
            seed: 12,
            lama_noise,
            ..params.clone()
        };
        let mut run = sd.generate(&p, &mut |_| std::ops::ControlFlow::Continue(()));
        run.as_mut().unwrap().remove(0).pixels
    };
    assert!(
        second == at_12(false),
        "the second batch has no noise modifier"
    );
    assert!(second != at_12(true), "the noise modifier moves the image");
    // "Crop and Resize" of a wider feed: LaMa paints it whole, then the centre is cropped
    // (k = 1 here: a crop alone), as the extension's `get_control` orders them.
    let (wide, wide_mask) = (
        resize_lanczos(&read("cn-init-64.png"), 384, 256),
        resize_lanczos(&read("cn-mask-64.png"), 384, 256),
    );
    let centre = |i: &RgbImage| {
        let mut pixels = Vec::with_capacity(256 * 256 * 3);
        for row in i.pixels.chunks_exact(384 * 3) {
            pixels.extend_from_slice(&row[64 * 3..320 * 3]);
        }
        RgbImage {
            width: 256,
            height: 256,
            pixels,
        }
    };
    let first_of = |m: &RgbImage| m.pixels.iter().step_by(3).copied().collect::<Vec<u8>>();
    let painted_then_cut = centre(&inpaint_only_lama(&net, &wide, &first_of(&wide_mask)).unwrap());
    let cut_then_painted =
        inpaint_only_lama(&net, &centre(&wide), &first_of(&centre(&wide_mask))).unwrap();
    // How far the old order (crop, then LaMa) was from the extension's, in levels.
    let off = painted_then_cut
        .pixels
        .iter()
        .zip(&cut_then_painted.pixels)
        .map(|(a, b)| a.abs_diff(*b))
        .max()
        .unwrap();
    eprintln!("crop then LaMa is up to {off} levels off LaMa then crop");
    assert!(
        off > 16,
        "the orders paint differently: at most {off} levels apart"
    );
    let body = json!({"prompt": "a house by a lake", "steps": 3, "width": 256,
        "height": 256, "seed": 11, "sampler_name": "Euler", "cfg_scale": 7.5,
        "alwayson_scripts": {"controlnet": {"args": [{"model": "cn-h",
            "module": "inpaint_only+lama", "image": png(&wide), "mask": png(&wide_mask),
            "resize_mode": "Crop and Resize"}]}}});
    let r = post_json_to(s.addr, "/sdapi/v1/txt2img", &body);
    assert_eq!(r.status, 200, "{}", r.text());
    let (_, _, cropped, _) = decode_png(r.json()["images"][0].as_str().unwrap());
    let with_image = |image: &RgbImage| {
        let mut p = params.clone();
        p.controlnets[0].image = image.clone();
        p.controlnets[0].mask = Some(centre(&wide_mask));
        let mut run = sd.generate(&p, &mut |_| std::ops::ControlFlow::Continue(()));
        run.as_mut().unwrap().remove(0).pixels
    };
    assert!(
        cropped == with_image(&painted_then_cut),
        "LaMa paints the whole feed, then it is cropped"
    );
    assert!(
        cropped != with_image(&cut_then_painted),
        "not the cropped feed painted ({off} levels off)"
    );
    // /controlnet/detect answers LaMa's image; without a mask, a 422.
    let body = json!({"controlnet_module": "inpaint_only+lama",
        "controlnet_input_images": [png(&image)], "controlnet_masks": [png(&mask)]});
    let r = post_json_to(s.addr, "/controlnet/detect", &body);
    assert_eq!(r.status, 200, "{}", r.text());
    let (_, _, detected, _) = decode_png(r.json()["images"][0].as_str().unwrap());
    assert!(detected == painted.pixels, "detect's image is LaMa's");
    let body = json!({"controlnet_module": "inpaint_only+lama",
        "controlnet_input_images": [png(&image)]});
    let r = post_json_to(s.addr, "/controlnet/detect", &body);
    let e = r.error(422, "validation_error").to_string();
    assert!(e.contains("controlnet_masks"), "{e}");
}
