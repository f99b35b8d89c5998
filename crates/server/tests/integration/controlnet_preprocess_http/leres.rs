//! depth_leres with the `res101.pth` of `tools/make_leres_fixtures.py` in ANNOTATOR_DIR
//! (without it: `missing_networks.rs`): listed where the extension lists it with its sliders;
//! `/controlnet/detect` and native units make the map `run_with` makes with Remove Near % and
//! Remove Background % as sent; the metadata and the infotext carry them.

use serde_json::json;

use sdserve_pipeline::controlnet::preprocess::{LoadedNetworks, Preprocessor, LERES};

use super::{annotator_server, detect_is, fixtures, native_unit_is_its_map, photo};

#[test]
fn depth_leres_runs_with_annotator_dir() {
    let annotators = fixtures().join(LERES.subfolder);
    let s = annotator_server(&annotators);
    let (photo, photo_b64) = photo();
    let net = LoadedNetworks::default()
        .read(&LERES, &annotators.join(LERES.name))
        .unwrap();
    // Priority 0, by label: after inpaint (inpaint_global_harmonious), before depth_anything_v2.
    let listed = s.get("/controlnet/module_list").json();
    let names = listed["module_list"].as_array().unwrap();
    let at = names.iter().position(|n| n == "depth_leres").unwrap();
    assert_eq!(
        (&names[at - 1], &names[at + 1]),
        (&json!("inpaint"), &json!("depth_anything_v2"))
    );
    let resolution = json!({"name": "Resolution", "value": 512, "min": 64, "max": 2048, "step": 8});
    let remove = |name: &str| json!({"name": name, "value": 0, "min": 0, "max": 100, "step": 0.1});
    assert_eq!(
        listed["module_detail"]["depth_leres"],
        json!({"model_free": false,
               "sliders": [resolution, remove("Remove Near %"), remove("Remove Background %")]})
    );

    let leres = |remove_near: f64, remove_background: f64| {
        Preprocessor::DepthLeres {
            remove_near,
            remove_background,
            resolution: 64,
        }
        .run_with(&photo, &net)
        .unwrap()
    };
    let (plain, removed) = (leres(0.0, 0.0), leres(30.5, 20.5));
    assert!(plain != removed, "the sliders change the map");
    // -1 (and outside 0..=100) is the sliders' default, 0.
    for (a, b, want) in [
        (json!(-1), json!(-1), &plain),
        (json!(30.5), json!(20.5), &removed),
    ] {
        let settings = json!({"controlnet_processor_res": 64, "controlnet_threshold_a": a,
                              "controlnet_threshold_b": b});
        let n = detect_is(&s, "depth_leres", settings, want);
        assert!(n >= 32, "{n} levels");
    }

    let settings = json!({"type": "depth_leres", "remove_near": 30.5,
                          "remove_background": 20.5, "resolution": 64});
    native_unit_is_its_map(
        &s,
        settings,
        &removed,
        "Threshold A: 30.5, Threshold B: 20.5",
    );
    let b = json!({"prompt": "a house by a lake", "steps": 1, "width": 256, "height": 256,
                   "seed": 11, "scheduler": "euler", "prompt_syntax": "plain",
                   "controlnets": [{"model": "cn-a", "image": photo_b64,
                                    "preprocessor": {"type": "depth_leres",
                                                     "remove_background": 101}}]});
    let e = s.post_json(&b).error(422, "validation_error").to_string();
    assert!(
        e.contains("[0].preprocessor.remove_background: must be a number in 0..=100"),
        "{e}"
    );
}
