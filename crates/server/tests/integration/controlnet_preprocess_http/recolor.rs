//! recolor_luminance and recolor_intensity: listed where the extension lists them with their
//! Gamma Correction slider; `/controlnet/detect` makes the pipeline's map; a native unit with
//! one recolours the result as the extension's post-processing does (each image's HSV V is
//! the unit's map resized to the request's size, exactly; Lab's L within two levels where the
//! colour stays in gamut); a gamma outside 0.1..=2 is a 422.

use serde_json::json;

use sdserve_pipeline::controlnet::preprocess::{rgb_to_hsv, rgb_to_lab, Preprocessor};
use sdserve_pipeline::image_in::resize_lanczos;

use super::{common, detect_is, fixtures, photo};
use common::{decode_png, post_json_to};

#[test]
fn recolor_maps_and_their_post_processing() {
    let s = common::tiny_a_vae8_server(&[("CONTROLNET_DIR", &fixtures().join("controlnet"))]);
    let (photo, photo_b64) = photo();
    // recolor_luminance (priority 100) after reference_only's label, before openpose_full;
    // recolor_intensity (priority 0) after reference_adain, before openpose_hand.
    let listed = s.get("/controlnet/module_list").json();
    let names = listed["module_list"].as_array().unwrap();
    let around = |name: &str| {
        let at = names.iter().position(|n| n == name).unwrap();
        (names[at - 1].clone(), names[at + 1].clone())
    };
    assert_eq!(
        around("recolor_luminance"),
        (json!("reference_only"), json!("openpose_full"))
    );
    assert_eq!(
        around("recolor_intensity"),
        (json!("reference_adain"), json!("openpose_hand"))
    );
    let gamma =
        json!({"name": "Gamma Correction", "value": 1, "min": 0.1, "max": 2, "step": 0.001});
    assert_eq!(
        listed["module_detail"]["recolor_intensity"],
        json!({"model_free": false, "sliders": [gamma]})
    );

    // /controlnet/detect: the map at the image's own size, the gamma as threshold_a.
    let luminance = Preprocessor::RecolorLuminance { gamma: 0.6 }
        .run(&photo)
        .unwrap();
    let intensity = Preprocessor::RecolorIntensity { gamma: 1.0 }
        .run(&photo)
        .unwrap();
    assert_eq!((luminance.width, luminance.height), (50, 35));
    assert!(luminance != intensity);
    detect_is(
        &s,
        "recolor_luminance",
        json!({"controlnet_threshold_a": 0.6}),
        &luminance,
    );
    detect_is(
        &s,
        "recolor_intensity",
        json!({"controlnet_threshold_a": -1}),
        &intensity,
    );

    // Native units: the result's V is the map (resized to 256x256 as the ControlNet sees it)
    // at every pixel; L within two levels at most pixels. A unit sending the same map as
    // its image (no recolor preprocessor) has no post-processing and meets neither.
    let run = |unit: serde_json::Value| {
        let b = json!({"prompt": "a house by a lake", "steps": 2, "width": 256, "height": 256,
                       "seed": 11, "scheduler": "euler", "prompt_syntax": "plain",
                       "controlnets": [unit]});
        let r = s.post_json(&b);
        assert_eq!(r.status, 200, "{}", r.text());
        let j = r.json();
        let (w, h, px, text) = decode_png(j["image_base64"].as_str().unwrap());
        assert_eq!((w, h), (256, 256));
        (
            px,
            j["metadata"]["controlnets"][0].clone(),
            text.unwrap_or_default(),
        )
    };
    let levels = |map: &sdserve_pipeline::pipeline::RgbImage| -> Vec<u8> {
        let m = resize_lanczos(map, 256, 256);
        m.pixels.chunks_exact(3).map(|p| p[0]).collect()
    };
    let v_matches = |px: &[u8], want: &[u8]| {
        px.chunks_exact(3)
            .zip(want)
            .filter(|(p, &l)| rgb_to_hsv([p[0], p[1], p[2]])[2] == l)
            .count()
    };
    let l_close = |px: &[u8], want: &[u8]| {
        px.chunks_exact(3)
            .zip(want)
            .filter(|(p, &l)| rgb_to_lab([p[0], p[1], p[2]])[0].abs_diff(l) <= 2)
            .count()
    };
    let settings = json!({"type": "recolor_intensity", "gamma": 1.0});
    let (px, meta, text) =
        run(json!({"model": "cn-a", "image": photo_b64, "preprocessor": settings}));
    let want = levels(&intensity);
    assert_eq!(v_matches(&px, &want), 256 * 256, "V is the map everywhere");
    assert_eq!(meta["preprocessor"], settings);
    assert!(
        text.contains("Module: recolor_intensity, Model: cn-a, Weight: 1.0, Resize Mode: Just Resize, Processor Res: 512, Threshold A: 1.0, Threshold B: 0.5,"),
        "{text}"
    );
    let (plain, _, _) = run(json!({"model": "cn-a", "image": super::png(&intensity)}));
    assert!(
        v_matches(&plain, &want) < 256 * 256 / 2,
        "no post-processing without the module"
    );

    let settings = json!({"type": "recolor_luminance", "gamma": 0.6});
    let (px, _, _) = run(json!({"model": "cn-a", "image": photo_b64, "preprocessor": settings}));
    let want = levels(&luminance);
    let close = l_close(&px, &want);
    // The tiny model's saturated colours often leave the gamut at the map's lightness, where
    // Lab's way back clips (as it does in A1111); most pixels keep it.
    assert!(close > 256 * 256 * 3 / 4, "L follows the map: {close}");
    let (plain, _, _) = run(json!({"model": "cn-a", "image": super::png(&luminance)}));
    let plain_close = l_close(&plain, &want);
    assert!(plain_close < close / 2, "{plain_close} {close}");

    // A gamma outside the slider's range is a 422 naming it.
    let b = json!({"prompt": "a house by a lake", "steps": 1, "width": 256, "height": 256,
                   "controlnets": [{"model": "cn-a", "image": photo_b64,
                                    "preprocessor": {"type": "recolor_luminance", "gamma": 2.5}}]});
    let e = s.post_json(&b).error(422, "validation_error").to_string();
    assert!(
        e.contains("[0].preprocessor.gamma: must be a number in 0.1..=2"),
        "{e}"
    );
}

/// The post-processing takes the last pass's map and every image: with the hires fix (256 to
/// 384) each image of a batch of two has the map fitted to 384 as its V, at every pixel; and
/// A1111's txt2img with the unit in `alwayson_scripts` ("Just Resize": its map resized plainly)
/// recolours as the native unit does.
#[test]
fn recolor_follows_the_hires_pass_every_image_of_a_batch_and_a1111() {
    let s = common::tiny_a_vae8_server(&[("CONTROLNET_DIR", &fixtures().join("controlnet"))]);
    let (photo, photo_b64) = photo();
    let intensity = Preprocessor::RecolorIntensity { gamma: 0.8 }
        .run(&photo)
        .unwrap();
    let v_is_the_map = |png_b64: &str, side: u32| {
        let (w, h, px, _) = decode_png(png_b64);
        assert_eq!((w, h), (side, side));
        let map = resize_lanczos(&intensity, side as usize, side as usize);
        let same = px
            .chunks_exact(3)
            .zip(map.pixels.chunks_exact(3))
            .filter(|(p, m)| rgb_to_hsv([p[0], p[1], p[2]])[2] == m[0])
            .count();
        (same, px)
    };
    let unit = json!({"model": "cn-a", "image": photo_b64,
                      "preprocessor": {"type": "recolor_intensity", "gamma": 0.8}});
    let b = json!({"prompt": "a house by a lake", "steps": 2, "width": 256, "height": 256,
                   "seed": 11, "scheduler": "euler", "prompt_syntax": "plain", "batch_size": 2,
                   "hires": {"scale": 1.5, "steps": 2}, "controlnets": [unit]});
    let r = s.post_json(&b);
    assert_eq!(r.status, 200, "{}", r.text());
    let images = r.json()["images"].as_array().unwrap().clone();
    assert_eq!(images.len(), 2);
    let mut seen = Vec::new();
    for (i, image) in images.iter().enumerate() {
        let (same, px) = v_is_the_map(image.as_str().unwrap(), 384);
        assert_eq!(same, 384 * 384, "image {i}: V is the hires map everywhere");
        seen.push(px);
    }
    assert!(seen[0] != seen[1], "two images, not one twice");

    let body = json!({"prompt": "a house by a lake", "steps": 2, "width": 256, "height": 256,
                      "seed": 11, "sampler_name": "Euler", "alwayson_scripts": {"controlnet":
                      {"args": [{"image": photo_b64, "model": "cn-a",
                                 "module": "recolor_intensity", "threshold_a": 0.8,
                                 "resize_mode": "Just Resize"}]}}});
    let r = post_json_to(s.addr, "/sdapi/v1/txt2img", &body);
    assert_eq!(r.status, 200, "{}", r.text());
    let first = r.json()["images"][0].as_str().unwrap().to_string();
    let (same, _) = v_is_the_map(&first, 256);
    assert_eq!(same, 256 * 256, "A1111's image: V is the map everywhere");
}
