//! ControlNet preprocessors over real HTTP (tiny-a-vae8, the pipeline's tiny ControlNets): a
//! photo with the native `preprocessor` makes the image its map makes (the map made by
//! `sdserve_pipeline::controlnet::preprocess`, which `crates/pipeline/tests/integration/controlnet_preprocess.rs`
//! holds to the extension's OpenCV calls), metadata and PNG parameters name it; A1111 units
//! with `module: "canny"` (processor_res, pixel_perfect, the resize mode after the
//! preprocessor) and `invert` equal units sending that map; scribble_xdog natively;
//! `/controlnet/module_list`; refusals. The HED, lineart and PiDiNet modules with the pipeline's tiny
//! networks in ANNOTATOR_DIR (lineart_anime_denoise in `manga_line.rs`, softedge_teed in
//! `teed.rs`, softedge_anyline in `anyline.rs`, mlsd in `mlsd.rs`, depth_anything_v2 and
//! depth_anything in `depth_anything.rs`, depth_midas and normal_midas in `midas.rs`, normal_bae in `normalbae.rs`, depth_leres in `leres.rs`, hed, pidinet and lineart in `hed_lineart.rs`, the model-free recolor ones and their post-processing in `recolor.rs`: each through `detect_is` and `native_unit_is_its_map`); every network
//! module without its file in
//! `missing_networks.rs`.

#[path = "controlnet_preprocess_http/anyline.rs"]
mod anyline;
use crate::common;
#[path = "controlnet_preprocess_http/depth_anything.rs"]
mod depth_anything;
#[path = "controlnet_preprocess_http/hed_lineart.rs"]
mod hed_lineart;
#[path = "controlnet_preprocess_http/leres.rs"]
mod leres;
#[path = "controlnet_preprocess_http/manga_line.rs"]
mod manga_line;
#[path = "controlnet_preprocess_http/midas.rs"]
mod midas;
#[path = "controlnet_preprocess_http/missing_networks.rs"]
mod missing_networks;
#[path = "controlnet_preprocess_http/mlsd.rs"]
mod mlsd;
#[path = "controlnet_preprocess_http/normalbae.rs"]
mod normalbae;
#[path = "controlnet_preprocess_http/recolor.rs"]
mod recolor;
#[path = "controlnet_preprocess_http/teed.rs"]
mod teed;

use std::path::{Path, PathBuf};

use base64::Engine as _;
use common::{decode_png, post_json_to};
use sdserve_pipeline::controlnet::preprocess::Preprocessor;
use sdserve_pipeline::image_in::resize_lanczos;
use sdserve_pipeline::pipeline::RgbImage;
use serde_json::{json, Value};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../pipeline/tests/fixtures")
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn png(image: &RgbImage) -> String {
    let mut out = Vec::new();
    image::RgbImage::from_raw(image.width, image.height, image.pixels.clone())
        .unwrap()
        .write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
        .unwrap();
    b64(&out)
}

/// A small photo-like image (50x35) and its base64 PNG.
fn photo() -> (RgbImage, String) {
    let bytes = std::fs::read(fixtures().join("images/init-50x35.png")).unwrap();
    let img = image::load_from_memory(&bytes).unwrap().to_rgb8();
    let image = RgbImage {
        width: img.width(),
        height: img.height(),
        pixels: img.into_raw(),
    };
    (image, b64(&bytes))
}

/// A server with the tiny ControlNets and `annotators` as its ANNOTATOR_DIR.
fn annotator_server(annotators: &Path) -> common::Server {
    common::tiny_a_vae8_server(&[
        ("CONTROLNET_DIR", &fixtures().join("controlnet")),
        ("ANNOTATOR_DIR", annotators),
    ])
}

/// `/controlnet/detect` of the photo with `module` and the `controlnet_*` settings of
/// `settings` makes `want` (its size and pixels); the number of distinct values in it.
fn detect_is(s: &common::Server, module: &str, settings: Value, want: &RgbImage) -> usize {
    let (_, photo_b64) = photo();
    let mut body = json!({"controlnet_module": module, "controlnet_input_images": [photo_b64]});
    let fields = settings.as_object().expect("controlnet_* settings").clone();
    body.as_object_mut().unwrap().extend(fields);
    let r = post_json_to(s.addr, "/controlnet/detect", &body);
    assert_eq!(r.status, 200, "{module} {settings}: {}", r.text());
    let (w, h, px, _) = decode_png(r.json()["images"][0].as_str().unwrap());
    assert_eq!((w, h), (want.width, want.height), "{module} {settings}");
    assert!(px == want.pixels, "{module} {settings}");
    px.iter()
        .copied()
        .collect::<std::collections::BTreeSet<u8>>()
        .len()
}

/// Native: the photo with `settings` as its unit's preprocessor makes the image that a unit
/// sending `map` makes; the metadata holds `settings` as sent; the infotext names the module,
/// its resolution and `thresholds` (`Threshold A: .., Threshold B: ..`).
fn native_unit_is_its_map(s: &common::Server, settings: Value, map: &RgbImage, thresholds: &str) {
    let (_, photo_b64) = photo();
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
    let (got, meta, text) =
        run(json!({"model": "cn-a", "image": photo_b64, "preprocessor": settings}));
    let (want, _, _) = run(json!({"model": "cn-a", "image": png(map)}));
    assert!(got == want, "{settings}: the map steers as its map");
    assert_eq!(meta["controlnets"][0]["preprocessor"], settings);
    let unit = format!(
        "Module: {}, Model: cn-a, Weight: 1.0, Resize Mode: Just Resize, Processor Res: {}, {thresholds},",
        settings["type"].as_str().unwrap(),
        settings["resolution"]
    );
    assert!(text.contains(&unit), "{unit}: {text}");
}

fn canny(low: f64, high: f64, resolution: u32) -> Preprocessor {
    Preprocessor::Canny {
        low_threshold: low,
        high_threshold: high,
        resolution,
    }
}

#[test]
fn preprocessors_make_the_map_at_submit_natively_and_through_a1111_units() {
    let s = common::tiny_a_vae8_server(&[("CONTROLNET_DIR", &fixtures().join("controlnet"))]);
    let (photo, photo_b64) = photo();

    // Native: the photo with canny is the map made here, sent as the image.
    let base = json!({"prompt": "a house by a lake", "steps": 2, "width": 256, "height": 256,
                      "seed": 11, "scheduler": "euler", "prompt_syntax": "plain"});
    let with = |unit: Value| {
        let mut b = base.clone();
        b["controlnets"] = json!([unit]);
        b
    };
    let run = |body: &Value| {
        let r = s.post_json(body);
        assert_eq!(r.status, 200, "{}", r.text());
        let j = r.json();
        let (_, _, px, text) = decode_png(j["image_base64"].as_str().unwrap());
        (px, j["metadata"].clone(), text.unwrap_or_default())
    };
    // The sliders' numbers kept (metadata, infotext); Canny runs on their integer parts.
    let settings =
        json!({"type": "canny", "low_threshold": 50.5, "high_threshold": 100.7, "resolution": 64});
    let (got, meta, text) = run(&with(
        json!({"model": "cn-a", "image": photo_b64, "preprocessor": settings}),
    ));
    let map = canny(50.0, 100.0, 64).run(&photo).unwrap();
    assert_eq!((map.width, map.height), (91, 64));
    let edges = map.pixels.iter().filter(|&&v| v == 255).count();
    assert!(edges > 300, "the photo has edges: {edges}");
    let (want, want_meta, _) = run(&with(json!({"model": "cn-a", "image": png(&map)})));
    assert!(got == want, "the preprocessed photo steers as its map");
    let (plain, _, _) = run(&with(json!({"model": "cn-a", "image": photo_b64})));
    assert!(
        plain != got,
        "without the preprocessor the photo is the map"
    );
    assert_eq!(meta["controlnets"][0]["preprocessor"], settings);
    assert!(want_meta["controlnets"][0].get("preprocessor").is_none());
    assert!(
        text.contains(r#"ControlNet 0: "Module: canny, Model: cn-a, Weight: 1.0, Resize Mode: Just Resize, Processor Res: 64, Threshold A: 50.5, Threshold B: 100.7, Guidance Start: 0.0, Guidance End: 1.0, Pixel Perfect: False, Control Mode: Balanced""#),
        "{text}"
    );
    // Another module: its settings in the metadata, its map steering as the map would.
    let xdog = json!({"type": "scribble_xdog", "threshold": 20.5, "resolution": 64});
    let (got, meta, text) = run(&with(
        json!({"model": "cn-a", "image": photo_b64, "preprocessor": xdog}),
    ));
    let xdog_map = Preprocessor::ScribbleXdog {
        threshold: 20.5,
        resolution: 64,
    }
    .run(&photo)
    .unwrap();
    let (want, _, _) = run(&with(json!({"model": "cn-a", "image": png(&xdog_map)})));
    assert!(got == want, "the xdog map steers as its map");
    assert_eq!(meta["controlnets"][0]["preprocessor"], xdog);
    assert!(
        text.contains("Module: scribble_xdog, Model: cn-a, Weight: 1.0, Resize Mode: Just Resize, Processor Res: 64, Threshold A: 20.5, Threshold B: 0.5,"),
        "{text}"
    );
    // shuffle: seeded as the extension seeds numpy (seed 11 and no variation seed: 22), the
    // seed in the metadata; a seed of the unit's own wins.
    let (got, meta, text) = run(&with(json!({"model": "cn-a", "image": photo_b64,
        "preprocessor": {"type": "shuffle", "resolution": 64}})));
    let shuffled = Preprocessor::Shuffle {
        resolution: 64,
        seed: 22,
    }
    .run(&photo)
    .unwrap();
    let (want, _, _) = run(&with(json!({"model": "cn-a", "image": png(&shuffled)})));
    assert!(got == want, "the shuffled map steers as its map");
    assert_eq!(
        meta["controlnets"][0]["preprocessor"],
        json!({"type": "shuffle", "seed": 22, "resolution": 64})
    );
    assert!(
        text.contains("Module: shuffle, Model: cn-a, Weight: 1.0, Resize Mode: Just Resize, Processor Res: 64, Threshold A: 0.5, Threshold B: 0.5,"),
        "{text}"
    );
    let (_, meta, _) = run(&with(json!({"model": "cn-a", "image": photo_b64,
        "preprocessor": {"type": "shuffle", "resolution": 64, "seed": 5}})));
    assert_eq!(meta["controlnets"][0]["preprocessor"]["seed"], 5);
    // A request that leaves the seed to chance: the map follows the drawn seed as well.
    let mut unseeded = with(json!({"model": "cn-a", "image": photo_b64,
        "preprocessor": {"type": "shuffle", "resolution": 64}}));
    unseeded.as_object_mut().unwrap().remove("seed");
    let (got, meta, _) = run(&unseeded);
    let seed = meta["seed"].as_u64().unwrap();
    let numpy_seed = (2 * seed) as u32;
    assert_eq!(
        meta["controlnets"][0]["preprocessor"]["seed"], numpy_seed,
        "seed {seed}"
    );
    let mut seeded = unseeded.clone();
    seeded["seed"] = json!(seed);
    assert!(run(&seeded).0 == got, "the drawn seed reproduces the image");
    for (preprocessor, needle) in [
        (json!({"type": "depth_zoe"}), "[0].preprocessor.type"),
        (
            json!({"type": "blur_gaussian", "sigma": 65}),
            "[0].preprocessor.sigma: must be a number in 0.01..=64",
        ),
        (
            json!({"type": "canny", "low_threshold": 0}),
            "[0].preprocessor.low_threshold: must be a number in 1..=255",
        ),
        (
            json!({"type": "canny", "resolution": 4096}),
            "[0].preprocessor.resolution",
        ),
    ] {
        let r = s.post_json(&with(
            json!({"model": "cn-a", "image": photo_b64, "preprocessor": preprocessor}),
        ));
        let text = r.error(422, "validation_error").to_string();
        assert!(
            r.broken_fields().iter().any(|f| f == "controlnets"),
            "{text}"
        );
        assert!(text.contains(needle), "{needle}: {text}");
    }

    // A1111 units: the map made at processor_res, then fitted by the resize mode, equals a
    // unit sending that fitted map with module none.
    let a1111 = |unit: Value| {
        let body = json!({"prompt": "a house by a lake", "steps": 2, "width": 256,
                          "height": 256, "seed": 11, "sampler_name": "Euler",
                          "alwayson_scripts": {"controlnet": {"args": [unit]}}});
        let r = post_json_to(s.addr, "/sdapi/v1/txt2img", &body);
        assert_eq!(r.status, 200, "{}", r.text());
        let j = r.json();
        let (_, _, px, _) = decode_png(j["images"][0].as_str().unwrap());
        (px, j["info"].as_str().unwrap_or_default().to_string())
    };
    // Crop and Resize: k = max(256 / 64, 256 / 91) = 4, 364x256, 54 columns off each side.
    let (got, info) = a1111(
        json!({"image": photo_b64, "model": "cn-a", "module": "canny",
                                   "processor_res": 64, "threshold_a": 50, "threshold_b": 100,
                                   "resize_mode": "Crop and Resize"}),
    );
    assert!(info.contains("Module: canny"), "{info}");
    let scaled = resize_lanczos(&map, 364, 256);
    let cropped = RgbImage {
        width: 256,
        height: 256,
        pixels: (0..256)
            .flat_map(|y| scaled.pixels[(y * 364 + 54) * 3..][..256 * 3].to_vec())
            .collect(),
    };
    let (want, _) = a1111(
        json!({"image": png(&cropped), "model": "cn-a", "module": "none",
                                 "resize_mode": "Just Resize"}),
    );
    assert!(got == want, "the map is fitted after the preprocessor");
    // Pixel perfect: max(256 / 35, 256 / 50) x 35 = 256, the processor_res ignored; the
    // extension's defaults for -1 thresholds (100, 200).
    let (got, _) = a1111(
        json!({"image": photo_b64, "model": "cn-a", "module": "Canny",
                                "processor_res": 64, "threshold_a": -1, "threshold_b": -1,
                                "pixel_perfect": true, "resize_mode": "Just Resize"}),
    );
    let map = canny(100.0, 200.0, 256).run(&photo).unwrap();
    let (want, _) = a1111(
        json!({"image": png(&map), "model": "cn-a", "module": "none",
                                 "resize_mode": "Just Resize"}),
    );
    assert!(got == want, "pixel perfect");
    // A module without a resolution: pixel perfect changes nothing; the label finds it.
    let (got, info) = a1111(
        json!({"image": photo_b64, "model": "cn-a", "module": "invert (from white bg & black line)",
               "pixel_perfect": true, "resize_mode": "Just Resize"}),
    );
    assert!(info.contains("Module: invert"), "{info}");
    let (want, _) = a1111(
        json!({"image": png(&Preprocessor::Invert.run(&photo).unwrap()), "model": "cn-a",
               "module": "none", "resize_mode": "Just Resize"}),
    );
    assert!(got == want, "invert");
    // shuffle's numpy seed is seed + subseed, the seed again without one (set_numpy_seed): 22.
    let (got, info) = a1111(
        json!({"image": photo_b64, "model": "cn-a", "module": "shuffle",
        "processor_res": -1, "resize_mode": "Just Resize"}),
    );
    assert!(info.contains("Module: shuffle"), "{info}");
    let (want, _) = a1111(
        json!({"image": png(&Preprocessor::Shuffle { resolution: 512, seed: 22 }.run(&photo).unwrap()),
        "model": "cn-a", "module": "none", "resize_mode": "Just Resize"}),
    );
    assert!(got == want, "shuffle with the request's seed");
    let r = post_json_to(
        s.addr,
        "/sdapi/v1/txt2img",
        &json!({"prompt": "x", "steps": 1, "alwayson_scripts": {"controlnet": {"args": [
            {"image": photo_b64, "model": "cn-a", "module": "dw_openpose_full"}]}}}),
    );
    let e = r.error(422, "validation_error");
    let rule = e["fields"][0]["rule"].as_str().unwrap_or_default();
    assert!(
        rule.starts_with("[0].module") && rule.contains("\"canny\", \"invert\""),
        "{e}"
    );

    let listed = s.get("/controlnet/module_list").json();
    // The extension's order (`get_sorted_preprocessors`: priority, then label, descending).
    assert_eq!(
        listed["module_list"],
        json!([
            "none",
            "ip-adapter-auto",
            "tile_resample",
            "pidinet",
            "pidinet_scribble",
            "reference_only",
            "recolor_luminance",
            "openpose_full",
            "normal_bae",
            "mlsd",
            "lineart_standard",
            "ip-adapter_clip_sd15",
            "inpaint_only",
            "depth",
            "canny",
            "invert",
            "threshold",
            "color",
            "softedge_teed",
            "pidinet_safe",
            "hed_safe",
            "hed",
            "softedge_anyline",
            "shuffle",
            "scribble_xdog",
            "scribble_hed",
            "reference_adain+attn",
            "reference_adain",
            "recolor_intensity",
            "openpose_hand",
            "openpose_faceonly",
            "openpose_face",
            "openpose",
            "normal_map",
            "lineart",
            "lineart_coarse",
            "lineart_anime_denoise",
            "lineart_anime",
            "inpaint_only+lama",
            "inpaint",
            "depth_leres",
            "depth_anything_v2",
            "depth_anything",
            "blur_gaussian"
        ])
    );
    let aliases = s.get("/controlnet/module_list?alias_names=true").json();
    assert_eq!(aliases["module_list"][17], "t2ia_color_grid");
    assert_eq!(
        aliases["module_detail"]["t2ia_color_grid"],
        json!({"model_free": false, "sliders": [
            {"name": "Resolution", "value": 512, "min": 64, "max": 2048, "step": 8}]})
    );
    // Listed without their weights (this server has no ANNOTATOR_DIR), as the extension does.
    assert_eq!(
        listed["module_detail"]["hed"],
        json!({"model_free": false, "sliders": [
            {"name": "Resolution", "value": 512, "min": 64, "max": 2048, "step": 8}]})
    );
    for module in [
        "lineart",
        "lineart_coarse",
        "lineart_anime",
        "lineart_anime_denoise",
        "pidinet",
        "pidinet_safe",
        "pidinet_scribble",
    ] {
        assert_eq!(
            listed["module_detail"][module], listed["module_detail"]["hed"],
            "{module}"
        );
    }
    assert_eq!(
        listed["module_detail"]["invert"],
        json!({"model_free": false, "sliders": []})
    );
    assert_eq!(
        listed["module_detail"]["blur_gaussian"]["sliders"][1],
        json!({"name": "Sigma", "value": 9, "min": 0.01, "max": 64, "step": 0.01})
    );
    assert_eq!(
        listed["module_detail"]["canny"],
        json!({"model_free": false, "sliders": [
            {"name": "Resolution", "value": 512, "min": 64, "max": 2048, "step": 8},
            {"name": "Low Threshold", "value": 100, "min": 1, "max": 255, "step": 1},
            {"name": "High Threshold", "value": 200, "min": 1, "max": 255, "step": 1}]})
    );
    let labels = s.get("/controlnet/module_list?alias_names=true").json();
    // The extension's `Preprocessor.label`s: two differ from the names.
    assert_eq!(
        labels["module_list"][10],
        "lineart_standard (from white bg & black line)"
    );
    assert_eq!(
        labels["module_list"][15],
        "invert (from white bg & black line)"
    );
    assert_eq!(labels["module_list"][3], "softedge_pidinet");
    // The inpaint modules: inpaint_only priority 100, inpaint_only+lama and inpaint (its
    // label inpaint_global_harmonious) 0, in that label order; no sliders.
    assert_eq!(labels["module_list"][12], "inpaint_only");
    assert_eq!(labels["module_list"][38], "inpaint_only+lama");
    assert_eq!(labels["module_list"][39], "inpaint_global_harmonious");
    for m in ["inpaint", "inpaint_only", "inpaint_only+lama"] {
        assert_eq!(
            listed["module_detail"][m],
            json!({"model_free": false, "sliders": []}),
            "{m}"
        );
    }
    assert_eq!(labels["module_list"][4], "scribble_pidinet");
    // recolor_luminance is priority 100, recolor_intensity 0 (preprocessor_compiled.py).
    assert_eq!(labels["module_list"][6], "recolor_luminance");
    assert_eq!(labels["module_list"][28], "recolor_intensity");
    // openpose_full's priority is 100 (preprocessor_compiled.py), the other OpenPose ones' 0.
    assert_eq!(labels["module_list"][7], "openpose_full");
    // normal_bae is priority 100: its label after openpose_full's, before mlsd.
    assert_eq!(labels["module_list"][8], "normal_bae");
    assert_eq!(labels["module_list"][9], "mlsd");
    // depth (label depth_midas) is priority 100 too; normal_map (normal_midas) 0.
    assert_eq!(labels["module_list"][13], "depth_midas");
    assert_eq!(labels["module_list"][14], "canny");
    assert_eq!(labels["module_list"][18], "softedge_teed");
    assert_eq!(labels["module_list"][19], "softedge_pidisafe");
    assert_eq!(labels["module_list"][20], "softedge_hedsafe");
    assert_eq!(labels["module_list"][21], "softedge_hed");
    assert_eq!(labels["module_list"][22], "softedge_anyline");
    assert_eq!(labels["module_list"][29], "openpose_hand");
    assert_eq!(labels["module_list"][30], "openpose_faceonly");
    assert_eq!(labels["module_list"][31], "openpose_face");
    assert_eq!(labels["module_list"][32], "openpose");
    assert_eq!(labels["module_list"][33], "normal_midas");
    assert_eq!(labels["module_list"][34], "lineart_realistic");
    for m in [
        "openpose_hand",
        "openpose_face",
        "openpose_faceonly",
        "openpose_full",
    ] {
        assert_eq!(
            listed["module_detail"][m],
            json!({"model_free": false, "sliders": [
                {"name": "Resolution", "value": 512, "min": 64, "max": 2048, "step": 8}]}),
            "{m}"
        );
    }
    assert_eq!(
        listed["module_detail"]["openpose"],
        json!({"model_free": false, "sliders": [
            {"name": "Resolution", "value": 512, "min": 64, "max": 2048, "step": 8}]})
    );
    // `PreprocessorTEED`'s sliders: the class's resolution and `Safe Steps`.
    assert_eq!(
        listed["module_detail"]["softedge_teed"],
        json!({"model_free": false, "sliders": [
            {"name": "Resolution", "value": 512, "min": 64, "max": 2048, "step": 8},
            {"name": "Safe Steps", "value": 2, "min": 0, "max": 10, "step": 1}]})
    );
    assert_eq!(
        labels["module_detail"]["invert (from white bg & black line)"],
        listed["module_detail"]["invert"]
    );
    // Not a boolean (schemathesis sent `alias_names=null` twice): a 422 naming it, not a 400.
    let e = s
        .get("/controlnet/module_list?alias_names=null&alias_names=null")
        .error(422, "validation_error");
    assert_eq!(e["fields"][0]["field"], "alias_names", "{e}");
}
