//! softedge_teed with the `7_model.pth` of `tools/make_teed_fixtures.py` in ANNOTATOR_DIR
//! (without it: `missing_networks.rs`).

use serde_json::json;

use sdserve_pipeline::controlnet::preprocess::{LoadedNetworks, Preprocessor, TEED};

use super::{annotator_server, detect_is, fixtures, native_unit_is_its_map, photo};

#[test]
fn softedge_teed_runs_with_annotator_dir() {
    // The fixture folder holds 7_model.pth at its top (`tools/make_teed_fixtures.py`).
    let annotators = fixtures().join("teed");
    let s = annotator_server(&annotators);
    let (photo, photo_b64) = photo();
    let net = LoadedNetworks::default()
        .read(&TEED, &annotators.join("7_model.pth"))
        .unwrap();
    let teed = |safe_steps: f64| Preprocessor::SoftedgeTeed {
        safe_steps,
        resolution: 64,
    };
    // /controlnet/detect: threshold_a is Safe Steps (-1 its default, 2; 0 soft; 10 the most).
    for (threshold_a, steps, levels) in [
        (-1.0, 2.0, 2..=3),
        (0.0, 0.0, 16..=256),
        (10.0, 10.0, 4..=11),
    ] {
        let want = teed(steps).run_with(&photo, &net).unwrap();
        let settings =
            json!({"controlnet_processor_res": 64, "controlnet_threshold_a": threshold_a});
        let n = detect_is(&s, "softedge_teed", settings, &want);
        assert!(levels.contains(&n), "{threshold_a}: {n} levels");
    }
    // Native: the slider's number kept as sent, its integer part run.
    let map = teed(1.0).run_with(&photo, &net).unwrap();
    let settings = json!({"type": "softedge_teed", "safe_steps": 1.5, "resolution": 64});
    native_unit_is_its_map(&s, settings, &map, "Threshold A: 1.5, Threshold B: 0.5");
    let b = json!({"prompt": "a house by a lake", "steps": 1, "width": 256, "height": 256,
                   "seed": 11, "scheduler": "euler", "prompt_syntax": "plain",
                   "controlnets": [{"model": "cn-a", "image": photo_b64,
                                    "preprocessor": {"type": "softedge_teed", "safe_steps": 11}}]});
    let e = s.post_json(&b).error(422, "validation_error").to_string();
    assert!(
        e.contains("[0].preprocessor.safe_steps: must be a number in 0..=10"),
        "{e}"
    );
}
