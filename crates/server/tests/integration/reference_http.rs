//! The sd-webui-controlnet extension's reference units over real HTTP against the real binary:
//! tiny-ref's SD 1.5-shaped UNet (whose images `crates/pipeline/tests/integration/reference.rs`
//! holds to the extension's hooks) with tiny-a-vae8's VAE (a factor of 8 keeps 256x256 quick).
//! The native unit without a model equals the pipeline's own image; metadata and PNG parameters
//! as the extension writes the unit; the A1111 unit (model "None") steers its image; the
//! module list; the refusals naming `controlnets`.

use crate::common;

use std::path::PathBuf;
use std::time::Duration;

use base64::Engine as _;
use common::{copy_tree, decode_png, post_json_to, Server};
use sdserve_pipeline::controlnet::{ControlMode, ReferenceKind, ReferenceUnit};
use sdserve_pipeline::pipeline::{GenerationParams, PromptSyntax, RgbImage, StableDiffusion};
use sdserve_pipeline::schedulers::SchedulerKind;
use serde_json::{json, Value};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../pipeline/tests/fixtures")
}

fn reference_png() -> String {
    let bytes = std::fs::read(fixtures().join("images/ip-prompt-96x72.png")).unwrap();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[test]
fn reference_units_steer_the_image_as_the_pipeline_does_and_bad_ones_are_refused() {
    let model = std::env::temp_dir().join(format!("sdserve-ref-http-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&model);
    copy_tree(&fixtures().join("tiny-ref"), &model);
    std::fs::remove_dir_all(model.join("vae")).unwrap();
    copy_tree(&fixtures().join("tiny-a-vae8/vae"), &model.join("vae"));
    let env: Vec<(String, String)> = [
        ("MODEL_ID", model.to_string_lossy().into_owned()),
        ("RESPONSE_CACHE_MB", "0".into()),
        ("GENERATION_TIMEOUT_SECONDS", "300".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let s = Server::start(&env);
    s.wait_ready(Duration::from_secs(300));

    let base = json!({"prompt": "a house by a lake", "negative_prompt": "blurry", "steps": 3,
                      "width": 256, "height": 256, "seed": 11, "scheduler": "euler",
                      "prompt_syntax": "plain"});
    let unit = json!({"image": reference_png(), "scale": 0.8,
                      "preprocessor": {"type": "reference_adain+attn", "style_fidelity": 0.3}});
    let with = |units: Value| {
        let mut b = base.clone();
        b["controlnets"] = units;
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
    let (plain, _, _) = run(&base);
    let (steered, meta, text) = run(&with(json!([unit.clone()])));
    let differing = plain.iter().zip(&steered).filter(|(a, b)| a != b).count();
    assert!(
        differing > plain.len() / 4,
        "the reference changes the image: {differing}"
    );
    let m = &meta["controlnets"][0];
    assert_eq!(m["model"], "None", "{meta}");
    assert_eq!(m["preprocessor"]["type"], "reference_adain+attn");
    assert_eq!(m["preprocessor"]["style_fidelity"], 0.3);
    assert_eq!(m["scale"], 0.8);
    assert!(
        text.contains(r#"ControlNet 0: "Module: reference_adain+attn, Model: None, Weight: 0.8, Resize Mode: Just Resize, Processor Res: 512, Threshold A: 0.3, Threshold B: 0.5, Guidance Start: 0.0, Guidance End: 1.0, Pixel Perfect: False, Control Mode: Balanced""#),
        "{text}"
    );

    // The pipeline's own image for these parameters.
    let sd =
        StableDiffusion::load(&model, &candle_core::Device::Cpu, candle_core::DType::F32).unwrap();
    let (w, h, px, _) = decode_png(&reference_png());
    let params = GenerationParams {
        prompt: "a house by a lake".into(),
        negative_prompt: "blurry".into(),
        steps: 3,
        width: 256,
        height: 256,
        seed: 11,
        scheduler: Some(SchedulerKind::Euler),
        prompt_syntax: PromptSyntax::Plain,
        references: vec![ReferenceUnit {
            kind: ReferenceKind::AdainAttn,
            image: RgbImage {
                width: w,
                height: h,
                pixels: px,
            },
            hires_image: None,
            weight: 0.8,
            style_fidelity: 0.3,
            guidance_start: 0.0,
            guidance_end: 1.0,
            hr_option: Default::default(),
            control_mode: ControlMode::Balanced,
            request_index: None,
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

    // A1111: module reference_adain+attn, model "None", threshold_a the style fidelity.
    let list = s.get("/controlnet/module_list").json();
    let modules: Vec<&str> = list["module_list"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_str().unwrap())
        .collect();
    for name in ["reference_only", "reference_adain", "reference_adain+attn"] {
        assert!(modules.contains(&name), "{list}");
        let d = &list["module_detail"][name];
        assert_eq!(d["model_free"], true, "{d}");
        assert_eq!(
            d["sliders"][0]["name"],
            "Style Fidelity (only for Balanced mode)"
        );
        assert_eq!(d["sliders"][0]["value"], 0.5);
    }
    let a1111 = |units: Value| {
        let body = json!({"prompt": "a house by a lake", "negative_prompt": "blurry",
            "steps": 3, "width": 256, "height": 256, "seed": 11, "sampler_name": "Euler",
            "cfg_scale": 7.5, "alwayson_scripts": {"controlnet": {"args": units}}});
        let r = post_json_to(s.addr, "/sdapi/v1/txt2img", &body);
        assert_eq!(r.status, 200, "{}", r.text());
        let j = r.json();
        let info: Value = serde_json::from_str(j["info"].as_str().unwrap()).unwrap();
        let (_, _, px, _) = decode_png(j["images"][0].as_str().unwrap());
        (px, info["infotexts"][0].as_str().unwrap().to_string())
    };
    let (a_plain, _) = a1111(json!([]));
    let (a_steered, infotext) = a1111(json!([{"module": "reference_adain+attn",
        "model": "None", "image": reference_png(), "weight": 0.8, "threshold_a": 0.3,
        "resize_mode": "Just Resize"}]));
    assert!(a_plain != a_steered);
    assert!(
        // The extension's serialisation of the unit sent (its resize mode, the class's
        // resolution slider's 512 for the absent processor_res).
        infotext.contains(r#""Module: reference_adain+attn, Model: None, Weight: 0.8, Resize Mode: Just Resize, Processor Res: 512, Threshold A: 0.3, Threshold B: 0.5, Guidance Start: 0.0, Guidance End: 1.0, Pixel Perfect: False, Control Mode: Balanced""#),
        "{infotext}"
    );

    // Refusals, each a 422 naming `controlnets` and its rule.
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
    let mut named = unit.clone();
    named["model"] = json!("cn-a");
    refused(with(json!([named])), "take no ControlNet model");
    let mut bad = unit.clone();
    bad["preprocessor"]["style_fidelity"] = json!(1.5);
    refused(with(json!([bad])), "style_fidelity");
    let mut unknown = unit.clone();
    unknown["preprocessor"]["resolution"] = json!(512);
    refused(with(json!([unknown])), "unknown key");
    let _ = std::fs::remove_dir_all(&model);
}
