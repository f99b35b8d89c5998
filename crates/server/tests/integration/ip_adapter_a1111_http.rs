//! A1111 ControlNet units with an ip-adapter module over real HTTP against the real binary
//! (tiny-a-vae8, the pipeline's tiny adapter folder as IP_ADAPTER_DIR with the stand-in
//! `clip_vision_h_uc.data`, a tiny ControlNet folder): the unit's image equals the pipeline's
//! extension run for the same inputs (which `crates/pipeline/tests/integration/ip_adapter_a1111.rs`
//! holds to the extension's code around diffusers), a masked and a windowed unit differ from
//! it, the infotext and metadata, the listings, and the 422s naming the unit's field.

use crate::common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::Engine as _;
use common::{copy_tree, decode_png, post_json_to, Resp};
use sdserve_pipeline::ip_adapter::{
    ExtensionImage, ExtensionRun, ImageEncoder, IpAdapter, IpAdapterUnit,
};
use sdserve_pipeline::pipeline::{GenerationParams, RgbImage, StableDiffusion};
use sdserve_pipeline::schedulers::SchedulerKind;
use serde_json::{json, Value};

const FIELD: &str = "alwayson_scripts.controlnet.args";

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../pipeline/tests/fixtures")
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn prompt_png() -> String {
    b64(&std::fs::read(fixtures().join("images/ip-prompt-96x72.png")).unwrap())
}

/// A 96x72 mask: its left half white (the extension's clip preprocessor zeroes it).
fn mask_png() -> (String, Vec<u8>) {
    let (w, h) = (96usize, 72usize);
    let alpha: Vec<u8> = (0..w * h)
        .map(|i| if i % w < w / 2 { 255 } else { 0 })
        .collect();
    let image = image::GrayImage::from_raw(w as u32, h as u32, alpha.clone()).unwrap();
    let mut png = Vec::new();
    image
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .unwrap();
    (b64(&png), alpha)
}

fn txt2img(addr: std::net::SocketAddr, units: Value) -> Resp {
    let body = json!({"prompt": "a house by a lake", "negative_prompt": "blurry", "steps": 3,
        "width": 256, "height": 256, "seed": 11, "sampler_name": "Euler", "cfg_scale": 7.5,
        "alwayson_scripts": {"controlnet": {"args": units}}});
    post_json_to(addr, "/sdapi/v1/txt2img", &body)
}

/// The pipeline's image for the request above with one extension unit.
fn own(sd: &StableDiffusion, dir: &Path, model: &str, run: ExtensionRun, scale: f64) -> Vec<u8> {
    let file = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.file_stem().is_some_and(|s| s == model))
        .unwrap();
    let params = GenerationParams {
        prompt: "a house by a lake".into(),
        negative_prompt: "blurry".into(),
        steps: 3,
        width: 256,
        height: 256,
        seed: 11,
        guidance_scale: 7.5,
        scheduler: Some(SchedulerKind::Euler),
        ip_adapters: vec![IpAdapterUnit {
            model: Arc::new(IpAdapter::new(model, file)),
            image_encoder: Arc::new(ImageEncoder::new(
                "image_encoder",
                dir.join("image_encoder"),
            )),
            image: run.images[0].image.clone(),
            scale,
            extension: Some(run),
        }],
        ..Default::default()
    };
    sd.generate(&params, &mut |_| std::ops::ControlFlow::Continue(()))
        .unwrap()
        .remove(0)
        .pixels
}

#[test]
fn a1111_ip_adapter_units_run_the_extension_s_way_and_bad_ones_are_refused() {
    let root = std::env::temp_dir().join(format!("sdserve-ipa-a1111-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let (dir, nets) = (root.join("ip"), root.join("cn"));
    copy_tree(&fixtures().join("ip-adapter/models"), &dir);
    copy_tree(&fixtures().join("controlnet"), &nets);
    let s = common::tiny_a_vae8_server(&[("IP_ADAPTER_DIR", &dir), ("CONTROLNET_DIR", &nets)]);

    // Listings: the adapters beside the ControlNets as `stem [hash]`; the two modules.
    let models = s.get("/controlnet/model_list").json();
    let names: Vec<&str> = models["model_list"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_str().unwrap())
        .collect();
    let hashed = |stem: &str| {
        names
            .iter()
            .find(|n| n.starts_with(&format!("{stem} [")) && n.len() == stem.len() + 11)
            .unwrap_or_else(|| panic!("{stem} in {names:?}"))
            .to_string()
    };
    let plus = hashed("ip-adapter-plus_sd15");
    hashed("ip-adapter_sd15");
    hashed("ip-adapter-plus-face_sd15");
    assert!(names.iter().any(|n| n.starts_with("cn-a")), "{names:?}");
    let modules = s.get("/controlnet/module_list").json();
    let list: Vec<&str> = modules["module_list"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_str().unwrap())
        .collect();
    assert_eq!(&list[..2], ["none", "ip-adapter-auto"], "{list:?}");
    let at = |m: &str| list.iter().position(|x| *x == m).unwrap();
    assert_eq!(at("ip-adapter_clip_sd15") + 1, at("inpaint_only"));
    for m in ["ip-adapter-auto", "ip-adapter_clip_sd15"] {
        assert_eq!(
            modules["module_detail"][m],
            json!({"model_free": false, "sliders": [
                {"name": "Resolution", "value": 512, "min": 64, "max": 2048, "step": 8}]})
        );
    }
    let aliased = s.get("/controlnet/module_list?alias_names=true").json();
    assert!(aliased["module_list"]
        .as_array()
        .unwrap()
        .contains(&json!("ip-adapter_clip_h")));

    let run = |units: Value| {
        let r = txt2img(s.addr, units);
        assert_eq!(r.status, 200, "{}", r.text());
        let j = r.json();
        let info: Value = serde_json::from_str(j["info"].as_str().unwrap()).unwrap();
        let (_, _, px, _) = decode_png(j["images"][0].as_str().unwrap());
        (px, info["infotexts"][0].as_str().unwrap().to_string())
    };
    let (plain, _) = run(json!([]));
    let unit = json!({"module": "ip-adapter_clip_sd15", "model": plus, "image": prompt_png(),
                      "weight": 0.8});
    let (steered, infotext) = run(json!([unit]));
    assert!(steered != plain);
    assert!(
        infotext.contains(&format!(
            "ControlNet 0: \"Module: ip-adapter_clip_sd15, Model: {plus}, Weight: 0.8, Resize Mode: Crop and Resize, Processor Res: 512, Threshold A: 0.5, Threshold B: 0.5, Guidance Start: 0.0, Guidance End: 1.0, Pixel Perfect: False, Control Mode: Balanced\""
        )),
        "{infotext}"
    );

    // The pipeline's extension run of the same inputs (the uc file beside the adapters).
    let sd = StableDiffusion::load(
        &fixtures().join("tiny-a-vae8"),
        &candle_core::Device::Cpu,
        candle_core::DType::F32,
    )
    .unwrap();
    let (w, h, px, _) = decode_png(&prompt_png());
    let image = RgbImage {
        width: w,
        height: h,
        pixels: px,
    };
    let extension = |alpha: Option<Vec<u8>>, window: (f64, f64)| ExtensionRun {
        images: vec![ExtensionImage {
            image: image.clone(),
            alpha,
        }],
        guidance_start: window.0,
        guidance_end: window.1,
        plus_uncond: Some(dir.join("clip_vision_h_uc.data")),
        record: None,
    };
    let stem = "ip-adapter-plus_sd15";
    assert!(
        own(&sd, &dir, stem, extension(None, (0.0, 1.0)), 0.8) == steered,
        "the server's image is the pipeline's extension run"
    );
    // It read the uc file: without it (the zero image's states) the image is another.
    let mut zero_uncond = extension(None, (0.0, 1.0));
    zero_uncond.plus_uncond = None;
    assert!(own(&sd, &dir, stem, zero_uncond, 0.8) != steered);

    // A masked unit and a windowed one (the bare name, by ip-adapter-auto) differ from it, and
    // are the pipeline's.
    let (mask, alpha) = mask_png();
    let mut masked = unit.clone();
    masked["mask"] = json!(mask);
    let (masked_px, _) = run(json!([masked]));
    assert!(masked_px != steered);
    assert!(own(&sd, &dir, stem, extension(Some(alpha), (0.0, 1.0)), 0.8) == masked_px);
    let windowed = json!({"module": "ip-adapter-auto", "model": stem, "image": prompt_png(),
                          "weight": 0.8, "guidance_start": 0.4, "guidance_end": 1.0});
    let (windowed_px, infotext) = run(json!([windowed]));
    assert!(windowed_px != steered);
    assert!(own(&sd, &dir, stem, extension(None, (0.4, 1.0)), 0.8) == windowed_px);
    // The bare name is written as sent, as the extension writes `unit.model`.
    assert!(
        infotext.contains(&format!(
            "\"Module: ip-adapter-auto, Model: {stem}, Weight: 0.8"
        )),
        "{infotext}"
    );

    // Among ControlNet units the entries keep the request's order.
    let canny = json!({"module": "none", "model": "cn-a", "image": prompt_png(),
                       "resize_mode": "Just Resize"});
    let (_, infotext) = run(json!([unit, canny]));
    assert!(
        infotext.contains("ControlNet 0: \"Module: ip-adapter_clip_sd15")
            && infotext.contains("ControlNet 1: \"Module: none, Model: cn-a"),
        "{infotext}"
    );

    // img2img: a unit without an image takes the init image; it steers the image.
    let img2img = |units: Value| {
        let body = json!({"prompt": "a house by a lake", "steps": 3, "width": 256,
            "height": 256, "seed": 11, "sampler_name": "Euler", "denoising_strength": 0.75,
            "init_images": [prompt_png()],
            "alwayson_scripts": {"controlnet": {"args": units}}});
        let r = post_json_to(s.addr, "/sdapi/v1/img2img", &body);
        assert_eq!(r.status, 200, "{}", r.text());
        let j = r.json();
        let info: Value = serde_json::from_str(j["info"].as_str().unwrap()).unwrap();
        let (_, _, px, _) = decode_png(j["images"][0].as_str().unwrap());
        (px, info["infotexts"][0].as_str().unwrap().to_string())
    };
    let (i2i_plain, _) = img2img(json!([]));
    let (i2i_steered, infotext) = img2img(json!([{"module": "ip-adapter_clip_sd15",
        "model": stem, "weight": 0.8}]));
    assert!(i2i_plain != i2i_steered);
    assert!(
        infotext.contains(&format!(
            "ControlNet 0: \"Module: ip-adapter_clip_sd15, Model: {stem}, Weight"
        )),
        "{infotext}"
    );

    // Refusals: 422s naming the unit's field.
    let refused = |units: Value, needle: &str| {
        let r = txt2img(s.addr, units);
        let e = r.error(422, "validation_error").to_string();
        assert!(r.broken_fields().iter().any(|f| f == FIELD), "{e}");
        assert!(e.contains(needle), "{needle}: {e}");
    };
    let with = |module: &str, model: &str| json!([{"enabled": false}, {"module": module, "model": model, "image": prompt_png()}]);
    refused(
        with("ip-adapter_clip_sd15", "nope"),
        "[1].model: no IP-Adapter",
    );
    refused(
        with("ip-adapter_clip_sd15", "cn-a"),
        "is a ControlNet (CONTROLNET_DIR)",
    );
    refused(with("none", stem), "is an IP-Adapter (IP_ADAPTER_DIR)");
    refused(
        with("ip-adapter-auto", "cn-a"),
        "[1].module: ip-adapter-auto",
    );
    std::fs::remove_dir_all(dir.join("image_encoder")).unwrap();
    refused(
        with("ip-adapter_clip_sd15", stem),
        "[1].model: IP_ADAPTER_DIR has no image_encoder/",
    );
    let _ = std::fs::remove_dir_all(&root);
}
