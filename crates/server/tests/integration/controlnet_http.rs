//! ControlNet over real HTTP against the real binary (tiny-a-vae8 with the pipeline's tiny
//! ControlNets as CONTROLNET_DIR): the listing, a steered image equal to the pipeline's own
//! (which `crates/pipeline/tests/integration/controlnet.rs` holds to diffusers), the single file giving the
//! folder's image, metadata and PNG parameters, and every refusal naming `controlnets`.

use crate::common;

use std::path::PathBuf;
use std::sync::Arc;

use base64::Engine as _;
use common::{copy_tree, decode_png};
use sdserve_pipeline::controlnet::{ControlNet, ControlNetUnit};
use sdserve_pipeline::pipeline::{GenerationParams, PromptSyntax, StableDiffusion};
use sdserve_pipeline::schedulers::SchedulerKind;
use serde_json::{json, Value};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../pipeline/tests/fixtures")
}

fn fixture_png(name: &str) -> String {
    let bytes = std::fs::read(fixtures().join("images").join(name)).unwrap();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn control_png() -> String {
    fixture_png("control-64.png")
}

fn init_png() -> String {
    fixture_png("cn-init-64.png")
}

#[test]
fn controlnets_steer_the_image_as_the_pipeline_does_and_bad_ones_are_refused() {
    // CONTROLNET_DIR: the fixtures plus a file that is not a ControlNet.
    let dir = std::env::temp_dir().join(format!("sdserve-cn-http-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    copy_tree(&fixtures().join("controlnet"), &dir);
    std::fs::copy(
        fixtures().join("tiny-a/text_encoder/model.safetensors"),
        dir.join("not-a-controlnet.safetensors"),
    )
    .unwrap();
    let s = common::tiny_a_vae8_server(&[("CONTROLNET_DIR", &dir)]);

    let listed = s.get("/controlnets").json();
    let names: Vec<&str> = listed["controlnets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["cn-a", "cn-a-ldm", "cn-b", "not-a-controlnet"],
        "{listed}"
    );

    let base = json!({"prompt": "a house by a lake", "steps": 3, "width": 256, "height": 256,
                      "seed": 11, "scheduler": "euler", "prompt_syntax": "plain"});
    let unit = |model: &str| {
        json!({"model": model, "image": control_png(), "scale": 0.8,
                                     "guidance_start": 0.0, "guidance_end": 0.7})
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
        let (w, h, px, text) = decode_png(j["image_base64"].as_str().unwrap());
        assert_eq!((w, h), (256, 256));
        (px, j["metadata"].clone(), text.unwrap_or_default())
    };
    let (plain, plain_meta, _) = run(&base);
    assert!(plain_meta.get("controlnets").is_none(), "{plain_meta}");
    let (steered, meta, text) = run(&with(vec![unit("cn-a")]));
    let differing = plain.iter().zip(&steered).filter(|(a, b)| a != b).count();
    assert!(
        differing > plain.len() / 4,
        "the ControlNet changes the image: {differing}"
    );
    assert_eq!(
        meta["controlnets"],
        json!([{"model": "cn-a", "scale": 0.8, "guidance_start": 0.0, "guidance_end": 0.7,
                 "hr_option": "both", "control_mode": "balanced"}])
    );
    assert!(
        text.contains(r#"ControlNet 0: "Module: none, Model: cn-a, Weight: 0.8, Resize Mode: Just Resize, Processor Res: 512, Threshold A: 0.5, Threshold B: 0.5, Guidance Start: 0.0, Guidance End: 0.7, Pixel Perfect: False, Control Mode: Balanced""#),
        "{text}"
    );
    // The single file of the same weights makes the same image.
    let (from_file, _, _) = run(&with(vec![unit("cn-a-ldm")]));
    assert!(
        from_file == steered,
        "cn-a-ldm.safetensors and the cn-a folder differ"
    );

    // The pipeline's own image for these parameters (control image resized by the server to
    // 256x256, as the pipeline would).
    let sd = StableDiffusion::load(
        &fixtures().join("tiny-a-vae8"),
        &candle_core::Device::Cpu,
        candle_core::DType::F32,
    )
    .unwrap();
    let image = {
        let (w, h, px, _) = decode_png(&control_png());
        sdserve_pipeline::pipeline::RgbImage {
            width: w,
            height: h,
            pixels: px,
        }
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
            scale: 0.8,
            guidance_start: 0.0,
            guidance_end: 0.7,
            hires_image: None,
            hr_option: Default::default(),
            inpaint_crop: true,
            control_mode: Default::default(),
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
    assert!(
        own.pixels == steered,
        "the server's image is the pipeline's"
    );

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
    refused(with(vec![unit("nope")]), "cn-a-ldm");
    let mut bad_image = unit("cn-a");
    bad_image["image"] = json!("bm90IGFuIGltYWdl");
    refused(with(vec![bad_image]), "[0].image");
    let mut window = unit("cn-a");
    window["guidance_start"] = json!(0.7);
    refused(with(vec![window]), "below guidance_end");
    refused(with(vec![unit("cn-a"); 4]), "at most 3");
    // Inpainting runs, diffusers' (`crates/pipeline/tests/integration/controlnet.rs`) and A1111's
    // (`inpaint`): the ControlNet changes the repainted pixels.
    for a1111 in [None, Some(json!({"mask_blur": 0}))] {
        let mut inpaint = base.clone();
        inpaint["init_image"] = json!(init_png());
        inpaint["mask_image"] = json!(control_png());
        if let Some(o) = &a1111 {
            inpaint["inpaint"] = o.clone();
        }
        let (alone, _, _) = run(&inpaint);
        inpaint["controlnets"] = json!([unit("cn-a")]);
        let (steered, meta, _) = run(&inpaint);
        assert_eq!(meta["controlnets"][0]["model"], "cn-a", "{meta}");
        let differing = alone.iter().zip(&steered).filter(|(a, b)| a != b).count();
        assert!(
            differing > alone.len() / 20,
            "{a1111:?}: {differing} differ"
        );
    }
    // img2img runs (diffusers' ControlNet img2img, `crates/pipeline/tests/integration/controlnet.rs`).
    let mut img2img = with(vec![unit("cn-a")]);
    img2img["init_image"] = json!(control_png());
    img2img["strength"] = json!(0.7);
    let (with_image, _, _) = run(&img2img);
    assert_eq!(with_image.len(), steered.len());
    // The hires fix runs them in both passes by default (`hr_option`).
    let hires = |option: &str| {
        let mut unit = unit("cn-a");
        unit["hr_option"] = json!(option);
        let mut b = with(vec![unit]);
        // Two steps run: the first within the unit's window (to 0.7).
        b["hires"] = json!({"width": 320, "height": 320, "steps": 4, "strength": 0.6});
        let r = s.post_json(&b);
        assert_eq!(r.status, 200, "{}", r.text());
        decode_png(r.json()["image_base64"].as_str().unwrap()).2
    };
    let (both, low) = (hires("both"), hires("low_res_only"));
    assert_eq!(both.len(), 320 * 320 * 3);
    assert!(both != low, "the second pass is steered");
    let mut bad_option = unit("cn-a");
    bad_option["hr_option"] = json!("Both");
    refused(with(vec![bad_option]), "[0].hr_option");
    // A file that is not a ControlNet fails the request when it runs, naming it.
    let r = s.post_json(&with(vec![unit("not-a-controlnet")]));
    let e = r.error(422, "validation_error").to_string();
    assert!(
        e.contains("not-a-controlnet") && e.contains("cannot be used"),
        "{e}"
    );
    assert!(!e.contains(dir.to_str().unwrap()), "no server path: {e}");
    std::fs::remove_dir_all(&dir).unwrap();
}
