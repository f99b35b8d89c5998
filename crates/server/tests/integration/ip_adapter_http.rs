//! IP-Adapter over real HTTP against the real binary (tiny-a-vae8, whose UNet is tiny-a's, with
//! the pipeline's tiny adapter folder as IP_ADAPTER_DIR): the listing, an image prompt's image
//! equal to the pipeline's own (which `crates/pipeline/tests/integration/ip_adapter.rs` and
//! `ip_adapter_plus.rs` hold to diffusers), for a plain and a Plus adapter, metadata and PNG
//! parameters, and the refusals naming `ip_adapters`.

use crate::common;

use std::path::PathBuf;
use std::sync::Arc;

use base64::Engine as _;
use common::{copy_tree, decode_png};
use sdserve_pipeline::ip_adapter::{ImageEncoder, IpAdapter, IpAdapterUnit};
use sdserve_pipeline::pipeline::{GenerationParams, PromptSyntax, RgbImage, StableDiffusion};
use sdserve_pipeline::schedulers::SchedulerKind;
use serde_json::{json, Value};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../pipeline/tests/fixtures")
}

fn prompt_png() -> String {
    let bytes = std::fs::read(fixtures().join("images/ip-prompt-96x72.png")).unwrap();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[test]
fn image_prompts_steer_the_image_as_the_pipeline_does_and_bad_ones_are_refused() {
    let dir = std::env::temp_dir().join(format!("sdserve-ipa-http-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    copy_tree(&fixtures().join("ip-adapter/models"), &dir);
    let s = common::tiny_a_vae8_server(&[("IP_ADAPTER_DIR", &dir)]);

    let listed = s.get("/ip-adapters").json();
    assert_eq!(
        listed,
        json!({"ip_adapters": [
                   {"name": "ip-adapter-plus-face_sd15", "file": "ip-adapter-plus-face_sd15.bin"},
                   {"name": "ip-adapter-plus_sd15", "file": "ip-adapter-plus_sd15.safetensors"},
                   {"name": "ip-adapter_sd15", "file": "ip-adapter_sd15.safetensors"}],
               "image_encoder": true})
    );

    let base = json!({"prompt": "a house by a lake", "steps": 3, "width": 256, "height": 256,
                      "seed": 11, "scheduler": "euler", "prompt_syntax": "plain"});
    let unit =
        |model: &str, scale: Value| json!({"model": model, "image": prompt_png(), "scale": scale});
    let with = |units: Vec<Value>| {
        let mut b = base.clone();
        b["ip_adapters"] = json!(units);
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
    assert!(plain_meta.get("ip_adapters").is_none(), "{plain_meta}");
    let (steered, meta, text) = run(&with(vec![unit("ip-adapter_sd15", json!(0.8))]));
    let differing = plain.iter().zip(&steered).filter(|(a, b)| a != b).count();
    assert!(
        differing > plain.len() / 4,
        "the adapter changes the image: {differing}"
    );
    assert_eq!(
        meta["ip_adapters"],
        json!([{"model": "ip-adapter_sd15", "scale": 0.8}])
    );
    assert!(
        text.contains(r#"ControlNet 0: "Module: ip-adapter_clip_sd15, Model: ip-adapter_sd15, Weight: 0.8, Guidance Start: 0.0, Guidance End: 1.0""#),
        "{text}"
    );
    // The default scale is 1; 0 is the plain image.
    let (at_one, meta, _) = run(&with(vec![
        json!({"model": "ip-adapter_sd15", "image": prompt_png()}),
    ]));
    assert_eq!(meta["ip_adapters"][0]["scale"], 1.0);
    assert!(at_one != steered);
    let (at_zero, _, _) = run(&with(vec![unit("ip-adapter_sd15", json!(0.0))]));
    assert!(at_zero == plain, "scale 0 is no adapter");

    // The pipeline's own image for these parameters.
    let sd = StableDiffusion::load(
        &fixtures().join("tiny-a-vae8"),
        &candle_core::Device::Cpu,
        candle_core::DType::F32,
    )
    .unwrap();
    let (w, h, px, _) = decode_png(&prompt_png());
    let own = |name: &str, file: &str| {
        let params = GenerationParams {
            prompt: "a house by a lake".into(),
            steps: 3,
            width: 256,
            height: 256,
            seed: 11,
            scheduler: Some(SchedulerKind::Euler),
            prompt_syntax: PromptSyntax::Plain,
            ip_adapters: vec![IpAdapterUnit {
                model: Arc::new(IpAdapter::new(name, dir.join(file))),
                image_encoder: Arc::new(ImageEncoder::new(
                    "image_encoder",
                    dir.join("image_encoder"),
                )),
                image: RgbImage {
                    width: w,
                    height: h,
                    pixels: px.clone(),
                },
                scale: 0.8,
                extension: None,
            }],
            ..Default::default()
        };
        sd.generate(&params, &mut |_| std::ops::ControlFlow::Continue(()))
            .unwrap()
            .remove(0)
            .pixels
    };
    assert!(
        own("ip-adapter_sd15", "ip-adapter_sd15.safetensors") == steered,
        "the server's image is the pipeline's"
    );
    // A Plus adapter is one more name in the folder.
    let (plus, meta, _) = run(&with(vec![unit("ip-adapter-plus_sd15", json!(0.8))]));
    assert_eq!(
        meta["ip_adapters"],
        json!([{"model": "ip-adapter-plus_sd15", "scale": 0.8}])
    );
    assert!(plus != steered && plus != plain);
    assert!(
        own("ip-adapter-plus_sd15", "ip-adapter-plus_sd15.safetensors") == plus,
        "the server's Plus image is the pipeline's"
    );

    // Refusals, each a 422 naming `ip_adapters` and its rule.
    let refused = |body: Value, needle: &str| {
        let r = s.post_json(&body);
        let e = r.error(422, "validation_error");
        let text = e.to_string();
        assert!(
            r.broken_fields().iter().any(|f| f == "ip_adapters"),
            "{text}"
        );
        assert!(text.contains(needle), "{needle}: {text}");
    };
    refused(
        with(vec![unit("nope", json!(1.0))]),
        "one of \\\"ip-adapter-plus-face_sd15\\\", \\\"ip-adapter-plus_sd15\\\", \\\"ip-adapter_sd15\\\"",
    );
    refused(
        with(vec![unit("ip-adapter_sd15", json!(2.5))]),
        "[0].scale: must be a number between 0 and 2",
    );
    refused(
        with(vec![unit("ip-adapter_sd15", json!(1.0)); 4]),
        "at most 3",
    );
    let mut bad_image = unit("ip-adapter_sd15", json!(1.0));
    bad_image["image"] = json!("bm90IGFuIGltYWdl");
    refused(with(vec![bad_image]), "[0].image");
    let mut extra = unit("ip-adapter_sd15", json!(1.0));
    extra["weight"] = json!(1.0);
    refused(with(vec![extra]), "unknown key \\\"weight\\\"");
    std::fs::remove_dir_all(&dir).unwrap();
}
