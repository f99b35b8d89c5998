//! softedge_teed with the `7_model.pth` of `tools/make_teed_fixtures.py` in ANNOTATOR_DIR
//! (without it: `missing_networks.rs`).

use serde_json::{json, Value};

use sdserve_pipeline::controlnet::preprocess::{LoadedNetworks, Preprocessor, TEED};

use super::common::{self, decode_png, post_json_to};
use super::{fixtures, photo, png};

#[test]
fn softedge_teed_runs_with_annotator_dir() {
    // The fixture folder holds 7_model.pth at its top (`tools/make_teed_fixtures.py`).
    let annotators = fixtures().join("teed");
    let s = common::tiny_a_vae8_server(&[
        ("CONTROLNET_DIR", &fixtures().join("controlnet")),
        ("ANNOTATOR_DIR", &annotators),
    ]);
    let (photo, photo_b64) = photo();
    let net = LoadedNetworks::default()
        .read(&TEED, &annotators.join("7_model.pth"))
        .unwrap();
    // /controlnet/detect: threshold_a is Safe Steps (-1 its default, 2; 0 soft; 10 the most).
    for (threshold_a, steps, levels) in [
        (-1.0, 2.0, 2..=3),
        (0.0, 0.0, 16..=256),
        (10.0, 10.0, 4..=11),
    ] {
        let r = post_json_to(
            s.addr,
            "/controlnet/detect",
            &json!({"controlnet_module": "softedge_teed", "controlnet_input_images": [photo_b64],
                    "controlnet_processor_res": 64, "controlnet_threshold_a": threshold_a}),
        );
        assert_eq!(r.status, 200, "{threshold_a}: {}", r.text());
        let (w, h, px, _) = decode_png(r.json()["images"][0].as_str().unwrap());
        let want = Preprocessor::SoftedgeTeed {
            safe_steps: steps,
            resolution: 64,
        }
        .run_with(&photo, &net)
        .unwrap();
        assert_eq!((w, h), (want.width, want.height), "{threshold_a}");
        assert!(px == want.pixels, "{threshold_a}");
        let n = px
            .iter()
            .copied()
            .collect::<std::collections::BTreeSet<u8>>()
            .len();
        assert!(levels.contains(&n), "{threshold_a}: {n} levels");
    }
    // Native: the map steers as the map sent; metadata and infotext name the setting.
    let base = json!({"prompt": "a house by a lake", "steps": 2, "width": 256, "height": 256,
                      "seed": 11, "scheduler": "euler", "prompt_syntax": "plain"});
    let run = |unit: Value| {
        let mut b = base.clone();
        b["controlnets"] = json!([unit]);
        let r = s.post_json(&b);
        assert_eq!(r.status, 200, "{}", r.text());
        let j = r.json();
        let (_, _, px, text) = decode_png(j["image_base64"].as_str().unwrap());
        (px, j["metadata"].clone(), text.unwrap_or_default())
    };
    let settings = json!({"type": "softedge_teed", "safe_steps": 1.5, "resolution": 64});
    let (got, meta, text) =
        run(json!({"model": "cn-a", "image": photo_b64, "preprocessor": settings}));
    let map = Preprocessor::SoftedgeTeed {
        safe_steps: 1.0,
        resolution: 64,
    }
    .run_with(&photo, &net)
    .unwrap();
    let (want, _, _) = run(json!({"model": "cn-a", "image": png(&map)}));
    assert!(got == want, "the TEED map steers as its map");
    assert_eq!(meta["controlnets"][0]["preprocessor"], settings);
    assert!(
        text.contains("Module: softedge_teed, Model: cn-a, Weight: 1, Processor Res: 64, Threshold A: 1.5, Threshold B: 0.5,"),
        "{text}"
    );
    let mut b = base.clone();
    b["controlnets"] = json!([{"model": "cn-a", "image": photo_b64,
                               "preprocessor": {"type": "softedge_teed", "safe_steps": 11}}]);
    let e = s.post_json(&b).error(422, "validation_error").to_string();
    assert!(
        e.contains("[0].preprocessor.safe_steps: must be a number in 0..=10"),
        "{e}"
    );
}
