//! depth_midas and normal_midas (A1111's `depth` and `normal_map`) with the
//! `dpt_hybrid-midas-501f0c75.pt` of `tools/make_midas_fixtures.py` in ANNOTATOR_DIR (without
//! it: `missing_networks.rs`): listed where the extension lists them with its sliders;
//! `/controlnet/detect` and native units make the map `run_with` makes, normal_midas with the
//! background threshold sent; the metadata and the infotext carry it.

use serde_json::json;

use sdserve_pipeline::controlnet::preprocess::{LoadedNetworks, Preprocessor, MIDAS};

use super::{annotator_server, detect_is, fixtures, native_unit_is_its_map, photo};

#[test]
fn depth_midas_and_normal_midas_run_with_annotator_dir() {
    let annotators = fixtures().join(MIDAS.subfolder);
    let s = annotator_server(&annotators);
    let (photo, photo_b64) = photo();
    let net = LoadedNetworks::default()
        .read(&MIDAS, &annotators.join(MIDAS.name))
        .unwrap();
    // depth_midas (priority 100) after inpaint_only's label, before canny; normal_midas
    // (priority 0) after openpose, before lineart_realistic.
    let listed = s.get("/controlnet/module_list").json();
    let names = listed["module_list"].as_array().unwrap();
    let around = |name: &str| {
        let at = names.iter().position(|n| n == name).unwrap();
        (names[at - 1].clone(), names[at + 1].clone())
    };
    assert_eq!(around("depth"), (json!("inpaint_only"), json!("canny")));
    assert_eq!(around("normal_map"), (json!("openpose"), json!("lineart")));
    let resolution = json!({"name": "Resolution", "value": 512, "min": 64, "max": 2048, "step": 8});
    assert_eq!(
        listed["module_detail"]["depth"],
        json!({"model_free": false, "sliders": [resolution]})
    );
    assert_eq!(
        listed["module_detail"]["normal_map"],
        json!({"model_free": false, "sliders": [resolution,
            {"name": "Normal Background Threshold", "value": 0.4, "min": 0, "max": 1, "step": 0.01}]})
    );

    // /controlnet/detect by name and label: the pipeline's maps.
    let depth = Preprocessor::DepthMidas { resolution: 64 }
        .run_with(&photo, &net)
        .unwrap();
    for module in ["depth", "depth_midas"] {
        let settings = json!({"controlnet_processor_res": 64, "controlnet_threshold_a": 0.1});
        let n = detect_is(&s, module, settings, &depth);
        assert!(n >= 64, "{module}: {n} levels");
    }
    let normal = |bg: f64| {
        Preprocessor::NormalMidas {
            background_threshold: bg,
            resolution: 64,
        }
        .run_with(&photo, &net)
        .unwrap()
    };
    let (default, low) = (normal(0.4), normal(0.1));
    assert!(default != low, "the threshold changes the map");
    for (module, a, want) in [
        ("normal_map", json!(-1), &default),
        ("normal_midas", json!(0.1), &low),
    ] {
        let settings = json!({"controlnet_processor_res": 64, "controlnet_threshold_a": a});
        detect_is(&s, module, settings, want);
    }

    // Native: the maps steer as the maps sent; metadata and infotext carry the threshold.
    let settings = json!({"type": "normal_midas", "background_threshold": 0.1, "resolution": 64});
    native_unit_is_its_map(&s, settings, &low, "Threshold A: 0.1, Threshold B: 0.5");
    let settings = json!({"type": "depth_midas", "resolution": 64});
    native_unit_is_its_map(&s, settings, &depth, "Threshold A: 0.5, Threshold B: 0.5");
    let b = json!({"prompt": "a house by a lake", "steps": 1, "width": 256, "height": 256,
                   "seed": 11, "scheduler": "euler", "prompt_syntax": "plain",
                   "controlnets": [{"model": "cn-a", "image": photo_b64,
                                    "preprocessor": {"type": "normal_midas",
                                                     "background_threshold": -0.5}}]});
    let e = s.post_json(&b).error(422, "validation_error").to_string();
    assert!(
        e.contains("[0].preprocessor.background_threshold: must be a number in 0..=1"),
        "{e}"
    );
}
