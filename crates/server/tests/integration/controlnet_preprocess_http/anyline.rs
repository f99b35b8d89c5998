//! softedge_anyline with the `MTEED.pth` of `tools/make_anyline_fixtures.py` in ANNOTATOR_DIR
//! (without it: `missing_networks.rs`): its sliders, the map `run_with` makes through
//! /controlnet/detect and a native unit, and the resolutions the extension cannot run.

use serde_json::json;

use sdserve_pipeline::controlnet::preprocess::{LoadedNetworks, Preprocessor, MTEED};

use super::common::post_json_to;
use super::{annotator_server, detect_is, fixtures, native_unit_is_its_map, photo};

#[test]
fn softedge_anyline_runs_with_annotator_dir() {
    // The fixture folder holds MTEED.pth at its top (`tools/make_anyline_fixtures.py`).
    let annotators = fixtures().join("anyline");
    let s = annotator_server(&annotators);
    let (photo, photo_b64) = photo();
    let net = LoadedNetworks::default()
        .read(&MTEED, &annotators.join("MTEED.pth"))
        .unwrap();
    let anyline = |safe_steps: f64, resolution: u32| Preprocessor::SoftedgeAnyline {
        safe_steps,
        resolution,
    };
    // `PreprocessorAnyline`'s own Resolution slider (1280) and Safe Steps.
    let listed = s.get("/controlnet/module_list").json();
    assert_eq!(
        listed["module_detail"]["softedge_anyline"],
        json!({"model_free": false, "sliders": [
            {"name": "Resolution", "value": 1280, "min": 64, "max": 2048, "step": 8},
            {"name": "Safe Steps", "value": 2, "min": 0, "max": 10, "step": 1}]})
    );
    // /controlnet/detect: threshold_a is Safe Steps (-1 its default, 2; 0 soft).
    for (threshold_a, steps, res, levels) in [
        (-1.0, 2.0, 64, 2..=4),
        (0.0, 0.0, 64, 16..=256),
        (3.0, 3.0, 128, 2..=5),
    ] {
        let want = anyline(steps, res).run_with(&photo, &net).unwrap();
        let settings =
            json!({"controlnet_processor_res": res, "controlnet_threshold_a": threshold_a});
        let n = detect_is(&s, "softedge_anyline", settings, &want);
        assert!(levels.contains(&n), "{threshold_a}: {n} levels");
    }
    // Native: the slider's number kept as sent, its integer part run.
    let map = anyline(1.0, 64).run_with(&photo, &net).unwrap();
    let settings = json!({"type": "softedge_anyline", "safe_steps": 1.5, "resolution": 64});
    native_unit_is_its_map(&s, settings, &map, "Threshold A: 1.5, Threshold B: 0.5");

    // Not a multiple of 64 (the extension's numpy fails to combine the two maps): a 422
    // naming the resolution in each dialect.
    let rule = "softedge_anyline needs a multiple of 64 (100 is not";
    let b = json!({"prompt": "a house by a lake", "steps": 1, "width": 256, "height": 256,
                   "seed": 11, "scheduler": "euler", "prompt_syntax": "plain",
                   "controlnets": [{"model": "cn-a", "image": photo_b64,
                                    "preprocessor": {"type": "softedge_anyline", "resolution": 100}}]});
    let e = s.post_json(&b).error(422, "validation_error").to_string();
    assert!(
        e.contains(&format!("[0].preprocessor.resolution: {rule}")),
        "{e}"
    );
    let r = post_json_to(
        s.addr,
        "/sdapi/v1/txt2img",
        &json!({"prompt": "x", "steps": 1, "alwayson_scripts": {"controlnet": {"args": [
            {"image": photo_b64, "model": "cn-a", "module": "softedge_anyline",
             "processor_res": 100}]}}}),
    );
    let e = r.error(422, "validation_error");
    let got = e["fields"][0]["rule"].as_str().unwrap_or_default();
    assert!(
        got.starts_with(&format!("[0].processor_res: {rule}")),
        "{e}"
    );
    let r = post_json_to(
        s.addr,
        "/controlnet/detect",
        &json!({"controlnet_module": "softedge_anyline", "controlnet_input_images": [photo_b64],
                "controlnet_processor_res": 100}),
    );
    let e = r.error(422, "validation_error");
    assert_eq!(e["fields"][0]["field"], "controlnet_processor_res", "{e}");
    assert!(e.to_string().contains(rule), "{e}");
}
