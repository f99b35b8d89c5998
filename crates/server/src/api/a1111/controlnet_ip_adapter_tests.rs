use serde_json::json;

use super::super::controlnet::native_units;
use super::*;

fn png(width: u32, height: u32, value: u8) -> String {
    let image = RgbImage {
        width,
        height,
        pixels: vec![value; (width * height * 3) as usize],
    };
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD
        .encode(crate::png::encode_with_text(&image, &[]).unwrap())
}

fn body(units: Value) -> Map<String, Value> {
    json!({"alwayson_scripts": {"controlnet": {"args": units}}})
        .as_object()
        .unwrap()
        .clone()
}

fn translate(units: Value) -> Result<super::super::controlnet::Units, ApiError> {
    native_units(&body(units), 0, false, Some(64), Some(64), None).map(Option::unwrap)
}

fn adapters(units: Value) -> Vec<ValidIpAdapter> {
    let u = translate(units).unwrap();
    let mut valid = crate::validate::validate_request(
        &json!({"prompt": "x"}).as_object().unwrap().clone(),
        crate::validate::DialectRules::A1111,
    )
    .unwrap();
    u.name_preprocessors(&mut valid);
    valid.ip_adapters
}

#[test]
fn an_ip_adapter_unit_becomes_an_extension_run_with_its_infotext() {
    let (image, mask) = (png(40, 30, 200), png(40, 30, 255));
    let got = adapters(json!([
        {"module": "canny", "model": "control_canny [01234567]", "image": png(8, 8, 0), "enabled": false},
        {"module": "ip-adapter_clip_sd15", "model": "ip-adapter-plus_sd15 [0123abcd]",
         "image": image, "mask": mask, "weight": 0.6, "guidance_start": 0.2, "guidance_end": 0.7},
    ]));
    assert_eq!(got.len(), 1);
    let u = &got[0];
    assert_eq!(u.model, "ip-adapter-plus_sd15");
    assert_eq!(u.scale, 0.6);
    let a = u.a1111.as_ref().unwrap();
    // Its index in the list for errors; its place among the enabled units for the infotext.
    assert_eq!((a.arg, a.position), (1, 0));
    assert_eq!((a.guidance_start, a.guidance_end), (0.2, 0.7));
    assert_eq!(a.images.len(), 1);
    let (rgb, alpha) = &a.images[0];
    // Kept at its size (the preprocessor stretches it), the mask's first channel as alpha.
    assert_eq!((rgb.image.width, rgb.image.height), (40, 30));
    assert!(rgb.image.pixels.iter().all(|&p| p == 200));
    let alpha = crate::validate::first_channel(&alpha.as_ref().unwrap().image);
    assert_eq!(alpha, vec![255; 40 * 30]);
    // `ControlNetUnit.serialize`: every infotext field, bound-checked sliders.
    assert_eq!(
        a.infotext,
        "Module: ip-adapter_clip_sd15, Model: ip-adapter-plus_sd15 [0123abcd], Weight: 0.6, Resize Mode: Crop and Resize, Processor Res: 512, Threshold A: 0.5, Threshold B: 0.5, Guidance Start: 0.2, Guidance End: 0.7, Pixel Perfect: False, Control Mode: Balanced"
    );
    let run = crate::validate::extension_run(a);
    assert_eq!(run.images[0].alpha.as_deref(), Some(&[255u8; 40 * 30][..]));
    assert_eq!(run.record.unwrap().position, 0);
}

#[test]
fn several_images_and_the_auto_module_are_read_as_the_extension_reads_them() {
    let got = adapters(json!([
        {"module": "canny", "model": "control_canny", "image": png(8, 8, 0)},
        {"module": "ip-adapter-auto", "model": "ip-adapter_sd15",
         "image": [{"image": png(8, 8, 10)}, {"image": png(6, 4, 20), "mask": png(6, 4, 9)}],
         "processor_res": 640, "threshold_a": 3, "pixel_perfect": true, "control_mode": 2,
         "guidance": 0.5, "resize_mode": "Just Resize"},
    ]));
    let a = got[0].a1111.as_ref().unwrap();
    assert_eq!((a.arg, a.position, a.guidance_end), (1, 1, 0.5));
    assert_eq!(a.images.len(), 2);
    assert!(a.images[0].1.is_none());
    assert_eq!(a.images[1].0.image.width, 6);
    assert!(a.images[1].1.is_some());
    assert_eq!(
        a.infotext,
        "Module: ip-adapter-auto, Model: ip-adapter_sd15, Weight: 1.0, Resize Mode: Just Resize, Processor Res: 640, Threshold A: 0.5, Threshold B: 0.5, Guidance Start: 0.0, Guidance End: 0.5, Pixel Perfect: True, Control Mode: ControlNet is more important"
    );
    // The ControlNet unit stays one, its index kept for errors.
    let u = translate(json!([
        {"module": "ip-adapter_clip_h", "model": "ip-adapter_sd15", "image": png(8, 8, 1)},
        {"module": "none", "model": "control_canny", "image": png(8, 8, 0)},
    ]))
    .unwrap();
    assert_eq!(u.native.as_array().unwrap().len(), 1);
    assert_eq!(u.args, [1]);
}

#[test]
fn broken_ip_adapter_units_are_422s_naming_their_field() {
    let image = png(8, 8, 1);
    for (unit, needle) in [
        (
            json!({"module": "ip-adapter_clip_sd15", "image": image}),
            "[0].model",
        ),
        (
            json!({"module": "ip-adapter_clip_sd15", "model": "None", "image": image}),
            "[0].model",
        ),
        (
            json!({"module": "ip-adapter_clip_sd15", "model": "ip-adapter_sd15"}),
            "[0].image",
        ),
        (
            json!({"module": "ip-adapter-auto", "model": "my_adapter", "image": image}),
            "[0].module: ip-adapter-auto: ",
        ),
        (
            json!({"module": "ip-adapter-auto", "model": "ip-adapter-faceid_sd15 [01234567]", "image": image}),
            "picks ip-adapter_face_id",
        ),
        (
            json!({"module": "ip-adapter_clip_sd15", "model": "ip-adapter_sd15", "image": image, "weight": 3}),
            "[0].weight",
        ),
        (
            json!({"module": "ip-adapter_clip_sd15", "model": "ip-adapter_sd15", "image": image,
                   "guidance_start": 0.8, "guidance_end": 0.2}),
            "[0].guidance_start",
        ),
        (
            json!({"module": "ip-adapter_clip_sd15", "model": "ip-adapter_sd15", "image": image,
                   "ipadapter_input": "AAAA"}),
            "[0].ipadapter_input",
        ),
        (
            json!({"module": "ip-adapter_clip_sd15", "model": "ip-adapter_sd15", "image": image,
                   "mask": png(4, 4, 255)}),
            "[0].mask",
        ),
        (
            json!({"module": "ip-adapter_clip_sd15", "model": "ip-adapter_sd15",
                   "image": [{"mask": image}]}),
            "[0].image[0].image",
        ),
    ] {
        let e = translate(json!([unit])).unwrap_err();
        let text = format!("{:?}", e.body());
        assert!(text.contains(super::super::controlnet::FIELD), "{text}");
        assert!(text.contains(needle), "{needle}: {text}");
    }
}

/// A request takes as many ip-adapter units as the native `ip_adapters` (3), a unit at most
/// `IMAGES_MAX` images: each image runs the encoder, each unit attends at every step.
#[test]
fn ip_adapter_units_and_their_images_are_bounded() {
    let image = png(8, 8, 1);
    let unit =
        json!({"module": "ip-adapter_clip_sd15", "model": "ip-adapter_sd15", "image": image});
    assert_eq!(adapters(json!([unit, unit, unit])).len(), 3);
    let e = translate(json!([unit, unit, unit, unit])).unwrap_err();
    let text = format!("{:?}", e.body());
    assert!(text.contains("[3]: at most 3 ip-adapter units"), "{text}");
    let list = |n: usize| {
        let items: Vec<Value> = (0..n).map(|_| json!({"image": image})).collect();
        json!([{"module": "ip-adapter_clip_sd15", "model": "ip-adapter_sd15", "image": items}])
    };
    assert!(translate(list(IMAGES_MAX)).is_ok());
    let e = translate(list(IMAGES_MAX + 1)).unwrap_err();
    let text = format!("{:?}", e.body());
    assert!(text.contains("[0].image: at most 8 images"), "{text}");
}
