//! depth_anything_v2 and depth_anything (v1) with the `depth_anything_v2_vitl.safetensors` of
//! `tools/make_depth_anything_v2_fixtures.py` and the `depth_anything_vitl14.pth` of
//! `tools/make_depth_anything_fixtures.py` in ANNOTATOR_DIR (without them:
//! `missing_networks.rs`).

use serde_json::json;

use sdserve_pipeline::controlnet::preprocess::{
    AnnotatorFile, LoadedNetworks, Preprocessor, DEPTH_ANYTHING, DEPTH_ANYTHING_V2,
};

use super::{annotator_server, detect_is, fixtures, native_unit_is_its_map, photo};

#[test]
fn depth_anything_v2_runs_with_annotator_dir() {
    // Listed after depth_leres (priority 0, labels descending), with only the resolution.
    runs_with_annotator_dir(
        &DEPTH_ANYTHING_V2,
        |resolution| Preprocessor::DepthAnythingV2 { resolution },
        ("depth_leres", "depth_anything"),
    );
}

#[test]
fn depth_anything_runs_with_annotator_dir() {
    // After its longer name depth_anything_v2, before blur_gaussian.
    runs_with_annotator_dir(
        &DEPTH_ANYTHING,
        |resolution| Preprocessor::DepthAnything { resolution },
        ("depth_anything_v2", "blur_gaussian"),
    );
}

fn runs_with_annotator_dir(
    file: &'static AnnotatorFile,
    module: fn(u32) -> Preprocessor,
    neighbours: (&str, &str),
) {
    let name = module(512).module();
    let annotators = fixtures().join(file.subfolder);
    let s = annotator_server(&annotators);
    let (photo, photo_b64) = photo();
    let net = LoadedNetworks::default()
        .read(file, &annotators.join(file.name))
        .unwrap();
    let listed = s.get("/controlnet/module_list").json();
    let names = listed["module_list"].as_array().unwrap();
    let at = names.iter().position(|n| n == name).unwrap();
    assert_eq!(
        (&names[at - 1], &names[at + 1]),
        (&json!(neighbours.0), &json!(neighbours.1))
    );
    assert_eq!(
        listed["module_detail"][name],
        json!({"model_free": false, "sliders": [
            {"name": "Resolution", "value": 512, "min": 64, "max": 2048, "step": 8}]})
    );
    // /controlnet/detect: the pipeline's map; the thresholds (no sliders) change nothing.
    let map = module(64).run_with(&photo, &net).unwrap();
    for threshold_a in [-1.0, 7.0] {
        let settings =
            json!({"controlnet_processor_res": 64, "controlnet_threshold_a": threshold_a});
        let n = detect_is(&s, name, settings, &map);
        assert!(n >= 64, "{name} {threshold_a}: {n} levels");
    }
    // Native: the map steers as the map sent; metadata and infotext name the module.
    let settings = json!({"type": name, "resolution": 64});
    native_unit_is_its_map(&s, settings, &map, "Threshold A: 0.5, Threshold B: 0.5");
    let b = json!({"prompt": "a house by a lake", "steps": 1, "width": 256, "height": 256,
                   "seed": 11, "scheduler": "euler", "prompt_syntax": "plain",
                   "controlnets": [{"model": "cn-a", "image": photo_b64,
                                    "preprocessor": {"type": name, "resolution": 32}}]});
    let e = s.post_json(&b).error(422, "validation_error").to_string();
    assert!(
        e.contains("[0].preprocessor.resolution: must be an integer in 64..=2048"),
        "{name}: {e}"
    );
}
