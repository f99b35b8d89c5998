//! Every network module on a server without its weights file: a 422 naming the module, the file
//! and the command that fetches it, natively, in A1111's units and through /controlnet/detect.

use serde_json::json;

use sdserve_pipeline::controlnet::preprocess::{
    BODY_POSE_FILE, DEPTH_ANYTHING_FILE, DEPTH_ANYTHING_V2_FILE, FACENET_FILE, HAND_POSE_FILE,
    HED_FILE, LERES_FILE, LINEART_ANIME_FILE, LINEART_COARSE_FILE, LINEART_FILE, MANGA_LINE_FILE,
    MIDAS_FILE, MLSD_FILE, MTEED_FILE, NORMAL_BAE_FILE, PIDINET_FILE, TEED_FILE,
};

use super::common::{self, post_json_to};
use super::{fixtures, photo};

/// (native `preprocessor.type`, A1111 module name, the (first) file it needs).
const NETWORK_MODULES: [(&str, &str, &str); 24] = [
    ("softedge_hed", "hed", HED_FILE),
    ("softedge_hedsafe", "hed_safe", HED_FILE),
    ("scribble_hed", "scribble_hed", HED_FILE),
    ("lineart_realistic", "lineart", LINEART_FILE),
    ("lineart_coarse", "lineart_coarse", LINEART_COARSE_FILE),
    ("lineart_anime", "lineart_anime", LINEART_ANIME_FILE),
    (
        "lineart_anime_denoise",
        "lineart_anime_denoise",
        MANGA_LINE_FILE,
    ),
    ("softedge_pidinet", "pidinet", PIDINET_FILE),
    ("softedge_pidisafe", "pidinet_safe", PIDINET_FILE),
    ("scribble_pidinet", "pidinet_scribble", PIDINET_FILE),
    ("softedge_teed", "softedge_teed", TEED_FILE),
    ("softedge_anyline", "softedge_anyline", MTEED_FILE),
    ("mlsd", "mlsd", MLSD_FILE),
    (
        "depth_anything_v2",
        "depth_anything_v2",
        DEPTH_ANYTHING_V2_FILE,
    ),
    ("depth_anything", "depth_anything", DEPTH_ANYTHING_FILE),
    ("depth_midas", "depth", MIDAS_FILE),
    ("normal_midas", "normal_map", MIDAS_FILE),
    ("normal_bae", "normal_bae", NORMAL_BAE_FILE),
    ("depth_leres", "depth_leres", LERES_FILE),
    ("openpose", "openpose", BODY_POSE_FILE),
    ("openpose_hand", "openpose_hand", BODY_POSE_FILE),
    ("openpose_face", "openpose_face", BODY_POSE_FILE),
    ("openpose_faceonly", "openpose_faceonly", BODY_POSE_FILE),
    ("openpose_full", "openpose_full", BODY_POSE_FILE),
];

/// The other files a module needs, each named in the same refusal.
fn also_needs(native: &str) -> &'static [&'static str] {
    match native {
        "openpose_hand" => &[HAND_POSE_FILE],
        "openpose_face" | "openpose_faceonly" => &[FACENET_FILE],
        "openpose_full" => &[HAND_POSE_FILE, FACENET_FILE],
        _ => &[],
    }
}

#[test]
fn every_network_module_without_its_weights_is_a_422_naming_its_file() {
    let bare = common::tiny_a_vae8_server(&[("CONTROLNET_DIR", &fixtures().join("controlnet"))]);
    let (_, photo_b64) = photo();
    let base = json!({"prompt": "a house by a lake", "steps": 1, "width": 256, "height": 256,
                      "seed": 11, "scheduler": "euler", "prompt_syntax": "plain"});
    for (native, module, file) in NETWORK_MODULES {
        let mut b = base.clone();
        b["controlnets"] = json!([{"model": "cn-a", "image": photo_b64,
                                   "preprocessor": {"type": native}}]);
        let e = bare.post_json(&b).error(422, "validation_error");
        let text = e.to_string();
        assert!(
            text.contains(&format!(
                "[0].preprocessor.type: \\\"{native}\\\" needs {file}"
            )) && text.contains("sdserve download --annotators"),
            "{native}: {e}"
        );
        for other in also_needs(native) {
            assert!(text.contains(&format!("needs {other}")), "{native}: {e}");
        }

        let r = post_json_to(
            bare.addr,
            "/sdapi/v1/txt2img",
            &json!({"prompt": "x", "steps": 1, "alwayson_scripts": {"controlnet": {"args": [
                {"image": photo_b64, "model": "cn-a", "module": module}]}}}),
        );
        let e = r.error(422, "validation_error");
        let rule = e["fields"][0]["rule"].as_str().unwrap_or_default();
        // A1111 names the unit's module by its label (hed: softedge_hed).
        assert!(
            rule.starts_with(&format!("[0].module: \"{native}\" needs {file}")),
            "{module}: {e}"
        );

        let r = post_json_to(
            bare.addr,
            "/controlnet/detect",
            &json!({"controlnet_module": module, "controlnet_input_images": [photo_b64]}),
        );
        let e = r.error(422, "validation_error");
        assert_eq!(
            e["fields"][0]["field"], "controlnet_module",
            "{module}: {e}"
        );
        assert!(e.to_string().contains(file), "{module}: {e}");
    }

    // No other listed module needs a file: each runs on the bare server or is refused for
    // another reason.
    let r = bare.get("/controlnet/module_list");
    let listed = r.json()["module_list"].as_array().unwrap().clone();
    assert!(listed.len() > NETWORK_MODULES.len());
    for module in listed.iter().map(|m| m.as_str().unwrap()) {
        if NETWORK_MODULES.iter().any(|&(_, m, _)| m == module) {
            continue;
        }
        let r = post_json_to(
            bare.addr,
            "/controlnet/detect",
            &json!({"controlnet_module": module, "controlnet_input_images": [photo_b64]}),
        );
        assert!(
            !r.text().contains("sdserve download --annotators"),
            "{module} needs a network file: {}",
            r.text()
        );
    }
}
