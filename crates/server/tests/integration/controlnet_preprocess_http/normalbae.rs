//! normal_bae with the `scannet.pt` of `tools/make_normalbae_fixtures.py` in ANNOTATOR_DIR
//! (without it: `missing_networks.rs`): listed where the extension lists it with its one
//! slider; `/controlnet/detect` and a native unit make the map `run_with` makes.

use serde_json::json;

use sdserve_pipeline::controlnet::preprocess::{LoadedNetworks, Preprocessor, NORMAL_BAE};

use super::{annotator_server, detect_is, fixtures, native_unit_is_its_map, photo};

#[test]
fn normal_bae_runs_with_annotator_dir() {
    let annotators = fixtures().join("normalbae");
    let s = annotator_server(&annotators);
    let (photo, _) = photo();
    let net = LoadedNetworks::default()
        .read(&NORMAL_BAE, &annotators.join(NORMAL_BAE.name))
        .unwrap();
    // Priority 100: after openpose_full's label, before mlsd's.
    let listed = s.get("/controlnet/module_list").json();
    let names = listed["module_list"].as_array().unwrap();
    let at = names.iter().position(|n| n == "normal_bae").unwrap();
    assert_eq!(
        (&names[at - 1], &names[at + 1]),
        (&json!("openpose_full"), &json!("mlsd"))
    );
    let resolution = json!({"name": "Resolution", "value": 512, "min": 64, "max": 2048, "step": 8});
    assert_eq!(
        listed["module_detail"]["normal_bae"],
        json!({"model_free": false, "sliders": [resolution]})
    );

    // /controlnet/detect (its thresholds ignored) and a native unit: the pipeline's map.
    let map = Preprocessor::NormalBae { resolution: 64 }
        .run_with(&photo, &net)
        .unwrap();
    let settings = json!({"controlnet_processor_res": 64, "controlnet_threshold_a": 0.1});
    let n = detect_is(&s, "normal_bae", settings, &map);
    assert!(n >= 64, "normal_bae: {n} levels");
    let settings = json!({"type": "normal_bae", "resolution": 64});
    native_unit_is_its_map(&s, settings, &map, "Threshold A: 0.5, Threshold B: 0.5");
    let b = json!({"prompt": "a house", "steps": 1, "width": 256, "height": 256,
                   "controlnets": [{"model": "cn-a", "image": super::photo().1,
                                    "preprocessor": {"type": "normal_bae", "threshold": 0.5}}]});
    let e = s.post_json(&b).error(422, "validation_error");
    let rule = e["fields"][0]["rule"].as_str().unwrap_or_default();
    assert!(
        rule.contains("unknown key \"threshold\" for \"normal_bae\""),
        "{e}"
    );
}
