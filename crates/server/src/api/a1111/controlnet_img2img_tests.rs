//! A1111 img2img bodies with ControlNet units, translated: each unit's control map against
//! the extension's own (tools/make_cn_inpaint_crop_fixtures.py runs its `choose_input_image`,
//! `try_crop_image_with_a1111_mask` and `detectmap_proc` with A1111's crop and resize).

use std::path::PathBuf;

use base64::Engine as _;
use serde_json::{json, Map, Value};

use super::super::translate::{translate, Mode, Translated};
use sdserve_pipeline::pipeline::RgbImage;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/cn-inpaint-crop")
}

fn b64(path: PathBuf) -> String {
    base64::engine::general_purpose::STANDARD.encode(std::fs::read(path).unwrap())
}

fn decoded(text: &str) -> RgbImage {
    crate::images::decode_base64(text).unwrap().image
}

fn cases() -> Value {
    serde_json::from_slice(&std::fs::read(dir().join("cases.json")).unwrap()).unwrap()
}

fn control_b64() -> String {
    b64(PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../")
        .join(cases()["control"].as_str().unwrap()))
}

/// The case's A1111 img2img body (its unit `unit`, with `extra` keys).
fn body(case: &Value, extra: Value) -> Value {
    let mut unit = json!({"model": "c", "resize_mode": case["resize_mode"]});
    match case["unit"].as_str().unwrap() {
        "own" => unit["image"] = json!(control_b64()),
        "rgba" => unit["image"] = json!(b64(dir().join("unit-rgba.png"))),
        "scribble" => {
            unit["image"] = json!(control_b64());
            unit["mask"] = json!(b64(dir().join("unit-mask.png")));
        }
        _ => {}
    }
    for (k, v) in extra.as_object().unwrap() {
        unit[k] = v.clone();
    }
    json!({"prompt": "p", "width": 256, "height": 256,
           "init_images": [b64(dir().join("init.png"))], "mask": b64(dir().join("mask.png")),
           "mask_blur": case["blur"], "inpaint_full_res_padding": case["padding"],
           "inpainting_mask_invert": case["invert"],
           "alwayson_scripts": {"controlnet": {"args": [unit]}}})
}

fn tr(body: &Value, mode: Mode) -> Translated {
    translate(body.as_object().unwrap(), mode, &Map::new(), || 1).unwrap()
}

#[test]
fn only_masked_cuts_each_unit_s_image_as_the_extension() {
    let all = cases();
    for (name, case) in all["cases"].as_object().unwrap() {
        let t = tr(&body(case, json!({})), Mode::Img2Img);
        let unit = &t.native["controlnets"][0];
        assert_eq!(unit["inpaint_crop"], false, "{name}: cut here, not again");
        let got = decoded(unit["image"].as_str().unwrap());
        let want = decoded(&b64(dir().join(format!("map-{name}.png"))));
        assert_eq!((got.width, got.height), (256, 256), "{name}");
        let off = got
            .pixels
            .iter()
            .zip(&want.pixels)
            .filter(|(a, b)| a != b)
            .count();
        assert_eq!(
            off, 0,
            "{name}: {off} values differ from the extension's map"
        );
        // What the pipeline gets: that map, at the request's size.
        assert_eq!(t.valid.controlnets[0].image.image, got, "{name}");
        assert!(!t.valid.controlnets[0].inpaint_crop, "{name}");
        // The region the extension cut.
        let b = body(case, json!({}));
        let input = super::input(
            b.as_object().unwrap(),
            t.native.get("inpaint"),
            256,
            256,
            super::ResizeMode::Resize,
        )
        .unwrap();
        let (x1, y1, x2, y2) = input.crop.unwrap().region;
        assert_eq!(json!([x1, y1, x2, y2]), case["region"], "{name}");
    }
}

#[test]
fn the_preprocessor_runs_on_the_cut_image_and_a_unit_may_keep_its_image_whole() {
    let all = cases();
    let case = &all["cases"]["own-crop"];
    let map = b64(dir().join("map-own-crop.png"));
    // canny on the cut image: as a txt2img unit sending that cut image at the request's size.
    let canny = json!({"module": "canny", "processor_res": 128});
    let t = tr(&body(case, canny.clone()), Mode::Img2Img);
    let mut txt = json!({"prompt": "p", "width": 256, "height": 256,
                         "alwayson_scripts": {"controlnet": {"args": [
                             {"model": "c", "image": map, "module": "canny",
                              "processor_res": 128, "resize_mode": case["resize_mode"]}]}}});
    let want = tr(&txt, Mode::Txt2Img);
    assert_eq!(
        t.valid.controlnets[0].image.image,
        want.valid.controlnets[0].image.image
    );
    assert!(t.valid.controlnets[0].preprocessor.is_some());
    // An RGBA upload sent whole (Just Resize, no crop) is composited over white too, as the
    // cut one (map-rgba.png) shows the extension does: not passed on as sent.
    let rgba = b64(dir().join("unit-rgba.png"));
    let just = json!({"prompt": "p", "width": 256, "height": 256,
                      "alwayson_scripts": {"controlnet": {"args": [
                          {"model": "c", "image": rgba, "resize_mode": "Just Resize"}]}}});
    let sent = tr(&just, Mode::Txt2Img).native["controlnets"][0]["image"].clone();
    assert_ne!(sent, json!(rgba));
    let composited = decoded(sent.as_str().unwrap());
    let dropped = decoded(&rgba);
    assert_eq!((composited.width, composited.height), (80, 48));
    assert!(composited.pixels[10 * 80 * 3..20 * 80 * 3]
        .iter()
        .all(|&v| v == 255));
    assert_ne!(composited, dropped);
    // `inpaint_crop_input_image` false: the whole image, fitted as in txt2img; the pipeline
    // must not cut it either.
    let whole = tr(
        &body(case, json!({"inpaint_crop_input_image": false})),
        Mode::Img2Img,
    );
    txt["alwayson_scripts"]["controlnet"]["args"][0] =
        json!({"model": "c", "image": control_b64(), "resize_mode": case["resize_mode"]});
    let want = tr(&txt, Mode::Txt2Img);
    assert_eq!(
        whole.valid.controlnets[0].image.image,
        want.valid.controlnets[0].image.image
    );
    assert_eq!(whole.native["controlnets"][0]["inpaint_crop"], false);
}

#[test]
fn img2img_units_without_an_image_take_the_init_image() {
    let init = b64(dir().join("init.png"));
    let unit = json!({"model": "c", "resize_mode": "Crop and Resize"});
    let mut b = json!({"prompt": "p", "width": 256, "height": 256, "init_images": [init],
                       "alwayson_scripts": {"controlnet": {"args": [unit]}}});
    // Plain img2img: the init image, Just Resize (A1111's for it), whatever the unit's mode.
    let t = tr(&b, Mode::Img2Img);
    assert_eq!(
        decoded(t.native["controlnets"][0]["image"].as_str().unwrap()),
        decoded(&init)
    );
    assert!(t.native["controlnets"][0].get("inpaint_crop").is_none());
    // The whole picture inpainted: the same, uncut.
    b["mask"] = json!(b64(dir().join("mask.png")));
    b["inpaint_full_res"] = json!(false);
    let t = tr(&b, Mode::Img2Img);
    assert_eq!(
        decoded(t.native["controlnets"][0]["image"].as_str().unwrap()),
        decoded(&init)
    );
    // txt2img has no init image; a unit mask needs the unit's image; a blank mask has no
    // region to cut to.
    let field = |e: crate::error::ApiError| format!("{:?}", e.body());
    let mut txt = b.clone();
    txt.as_object_mut().unwrap().remove("init_images");
    let e = translate(txt.as_object().unwrap(), Mode::Txt2Img, &Map::new(), || 1).unwrap_err();
    assert!(field(e).contains("[0].image"));
    let mut masked = b.clone();
    masked["alwayson_scripts"]["controlnet"]["args"][0]["mask"] = json!(init);
    let e = translate(
        masked.as_object().unwrap(),
        Mode::Img2Img,
        &Map::new(),
        || 1,
    )
    .unwrap_err();
    assert!(field(e).contains("[0].mask"));
    let mut blank = b.clone();
    blank["inpaint_full_res"] = json!(true);
    let black = RgbImage {
        width: 320,
        height: 224,
        pixels: vec![0; 320 * 224 * 3],
    };
    let png = crate::png::encode_with_text(&black, &[]).unwrap();
    blank["mask"] = json!(base64::engine::general_purpose::STANDARD.encode(png));
    let e = translate(blank.as_object().unwrap(), Mode::Img2Img, &Map::new(), || 1).unwrap_err();
    assert!(field(e).contains("blank"));
}
