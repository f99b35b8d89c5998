//! A1111's `tiling` through `/sdapi/v1/txt2img` and `img2img`: the native `tiling` request
//! (same image as native `/generate` with `tiling: true`, not the plain one), `Tiling: True`
//! in the infotext, and its rule (a 422 naming `tiling`). The pixels of circular padding are
//! the pipeline tests' (tests/integration/tiling.rs against diffusers).

use super::*;

#[test]
fn a1111_tiling_is_the_native_tiling_request() {
    let s = ready("step_ms=0", &[]);
    let a1111 = json!({"prompt": "stone wall", "seed": 9, "steps": 3, "width": 256,
                       "height": 256, "sampler_name": "Euler", "cfg_scale": 7.5});
    let native = json!({"prompt": "stone wall", "seed": 9, "steps": 3, "width": 256,
                        "height": 256, "scheduler": "euler", "guidance_scale": 7.5,
                        "guidance_rule": "a1111"});
    let with = |body: &Value, tiling: Value| {
        let mut body = body.clone();
        body["tiling"] = tiling;
        body
    };
    let tiled = native_pixels(&s, with(&native, json!(true)));
    let plain = native_pixels(&s, native.clone());
    assert_ne!(tiled, plain, "tiling must change the request");

    let r = post(&s, "/sdapi/v1/txt2img", &with(&a1111, json!(true)));
    let info = info_of(&r);
    let (_, _, pixels, text) = decode_png(r.json()["images"][0].as_str().unwrap());
    assert_eq!(pixels, tiled);
    let text = text.unwrap();
    assert!(text.contains(", Tiling: True"), "{text}");
    assert_eq!(info["infotexts"][0], text);

    // false and null are A1111's default: the plain image, no Tiling key.
    for off in [json!(false), Value::Null] {
        let r = post(&s, "/sdapi/v1/txt2img", &with(&a1111, off));
        let (_, _, pixels, text) = decode_png(r.json()["images"][0].as_str().unwrap());
        assert_eq!(pixels, plain);
        assert!(!text.unwrap().contains("Tiling"));
    }

    // Native: metadata and the PNG say it too.
    let r = s.post_json(&with(&native, json!(true)));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["metadata"]["tiling"], true);
    let (_, _, _, text) = decode_png(r.json()["image_base64"].as_str().unwrap());
    assert!(text.unwrap().contains(", Tiling: True"));

    // Not a boolean: a 422 naming the field, in both dialects.
    let r = post(&s, "/sdapi/v1/txt2img", &with(&a1111, json!("yes")));
    assert_eq!(r.status, 422, "{}", r.text());
    assert!(
        r.json()["details"].as_str().unwrap().contains("tiling"),
        "{}",
        r.text()
    );
    let r = s.post_json(&with(&native, json!(1)));
    assert_eq!(r.status, 422, "{}", r.text());
    assert!(
        r.json()["details"].as_str().unwrap().contains("tiling"),
        "{}",
        r.text()
    );
}
