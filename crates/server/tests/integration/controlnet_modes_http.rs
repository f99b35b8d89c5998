//! ControlNet control modes over real HTTP against the real binary (tiny-a-vae8, the pipeline's
//! tiny ControlNets as CONTROLNET_DIR): the native `control_mode` runs the pipeline's mode
//! (which `crates/pipeline/tests/integration/controlnet_modes.rs` holds to the extension's formulas), is
//! recorded in the metadata and the PNG's parameters, a bad one is a 422; A1111 units' modes (by
//! value and index) are the native ones, and a canny unit steers the hires pass.

use crate::common;

use std::path::PathBuf;
use std::sync::Arc;

use base64::Engine as _;
use common::{copy_tree, decode_png, post_json_to};
use sdserve_pipeline::controlnet::{ControlMode, ControlNet, ControlNetUnit};
use sdserve_pipeline::pipeline::{GenerationParams, PromptSyntax, RgbImage, StableDiffusion};
use sdserve_pipeline::schedulers::SchedulerKind;
use serde_json::{json, Value};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../pipeline/tests/fixtures")
}

fn control_png() -> String {
    let bytes = std::fs::read(fixtures().join("images/control-64.png")).unwrap();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[test]
fn control_modes_run_are_recorded_and_translated_from_a1111() {
    let dir = std::env::temp_dir().join(format!("sdserve-cn-modes-http-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    copy_tree(&fixtures().join("controlnet"), &dir);
    let s = common::tiny_a_vae8_server(&[("CONTROLNET_DIR", &dir)]);

    let body = |mode: Option<&str>| {
        let mut unit = json!({"model": "cn-a", "image": control_png(), "scale": 0.9});
        if let Some(m) = mode {
            unit["control_mode"] = json!(m);
        }
        json!({"prompt": "a house by a lake", "steps": 3, "width": 256, "height": 256,
               "seed": 11, "scheduler": "euler", "prompt_syntax": "plain",
               "controlnets": [unit]})
    };
    let run = |body: &Value| {
        let r = s.post_json(body);
        assert_eq!(r.status, 200, "{}", r.text());
        let j = r.json();
        let (_, _, px, text) = decode_png(j["image_base64"].as_str().unwrap());
        (px, j["metadata"]["controlnets"][0].clone(), text.unwrap())
    };
    let (balanced, meta, text) = run(&body(None));
    assert_eq!(meta["control_mode"], "balanced", "{meta}");
    assert_eq!(meta["hr_option"], "both", "{meta}");
    assert!(text.contains("Control Mode: Balanced\""), "{text}");
    let (strong, meta, text) = run(&body(Some("controlnet")));
    assert_eq!(meta["control_mode"], "controlnet", "{meta}");
    assert!(
        text.contains("Control Mode: ControlNet is more important\""),
        "{text}"
    );
    assert!(balanced != strong, "the mode changes the image");
    let (soft, meta, _) = run(&body(Some("prompt")));
    assert_eq!(meta["control_mode"], "prompt", "{meta}");
    assert!(soft != strong && soft != balanced);

    // The pipeline's own image in that mode (the control image resized to 256x256 by the
    // server first, as for any native unit).
    let sd = StableDiffusion::load(
        &fixtures().join("tiny-a-vae8"),
        &candle_core::Device::Cpu,
        candle_core::DType::F32,
    )
    .unwrap();
    let (w, h, px, _) = decode_png(&control_png());
    let image = RgbImage {
        width: w,
        height: h,
        pixels: px,
    };
    let params = GenerationParams {
        prompt: "a house by a lake".into(),
        steps: 3,
        width: 256,
        height: 256,
        seed: 11,
        scheduler: Some(SchedulerKind::Euler),
        prompt_syntax: PromptSyntax::Plain,
        controlnets: vec![ControlNetUnit {
            model: Arc::new(ControlNet::new("cn-a", dir.join("cn-a"))),
            image: sdserve_pipeline::image_in::resize_lanczos(&image, 256, 256),
            preprocessor: None,
            scale: 0.9,
            guidance_start: 0.0,
            guidance_end: 1.0,
            hires_image: None,
            hr_option: Default::default(),
            inpaint_crop: true,
            control_mode: ControlMode::ControlNet,
            mask: None,
            hires_mask: None,
            infotext: None,
        }],
        ..Default::default()
    };
    let own = sd
        .generate(&params, &mut |_| std::ops::ControlFlow::Continue(()))
        .unwrap()
        .remove(0);
    assert!(own.pixels == strong, "the server's image is the pipeline's");

    for bad in [
        json!("ControlNet is more important"),
        json!(2),
        json!("Prompt"),
    ] {
        let mut b = body(None);
        b["controlnets"][0]["control_mode"] = bad.clone();
        let r = s.post_json(&b);
        let e = r.error(422, "validation_error").to_string();
        assert!(r.broken_fields().iter().any(|f| f == "controlnets"), "{e}");
        assert!(e.contains("[0].control_mode"), "{bad}: {e}");
    }

    // A1111 units: the extension's value or index is the native mode, its label in the
    // infotext; a canny unit steering the hires pass runs (soft weights forced there).
    let a1111 = |unit: Value, hires: bool| {
        let mut body = json!({"prompt": "a house by a lake", "steps": 2, "width": 256,
                              "height": 256, "seed": 11, "sampler_name": "Euler",
                              "alwayson_scripts": {"controlnet": {"args": [unit]}}});
        if hires {
            body["enable_hr"] = json!(true);
            body["hr_scale"] = json!(1.25);
            body["denoising_strength"] = json!(0.6);
        }
        let r = post_json_to(s.addr, "/sdapi/v1/txt2img", &body);
        assert_eq!(r.status, 200, "{}", r.text());
        let j = r.json();
        let (_, _, px, _) = decode_png(j["images"][0].as_str().unwrap());
        let info: Value = serde_json::from_str(j["info"].as_str().unwrap()).unwrap();
        (px, info["infotexts"][0].as_str().unwrap().to_string())
    };
    let unit = |mode: Value| {
        json!({"model": "cn-a", "image": control_png(), "control_mode": mode,
               "resize_mode": "Just Resize"})
    };
    let (by_label, info) = a1111(unit(json!("My prompt is more important")), false);
    assert!(
        info.contains("Control Mode: My prompt is more important\""),
        "{info}"
    );
    let (by_index, _) = a1111(unit(json!(1)), false);
    assert!(by_label == by_index);
    let (balanced, info) = a1111(unit(json!(0)), false);
    assert!(info.contains("Control Mode: Balanced\""), "{info}");
    assert!(balanced != by_label);
    let r = post_json_to(
        s.addr,
        "/sdapi/v1/txt2img",
        &json!({"prompt": "x", "steps": 1, "alwayson_scripts": {"controlnet": {"args": [
            unit(json!("Creative"))]}}}),
    );
    let e = r.error(422, "validation_error").to_string();
    assert!(e.contains("[0].control_mode"), "{e}");
    let mut canny = unit(json!("Balanced"));
    canny["module"] = json!("canny");
    let (hires, info) = a1111(canny, true);
    assert_eq!(hires.len(), 320 * 320 * 3);
    assert!(info.contains("Module: canny"), "{info}");
    std::fs::remove_dir_all(&dir).unwrap();
}
