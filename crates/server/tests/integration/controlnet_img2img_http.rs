//! A1111 img2img and inpainting with ControlNet units over real HTTP (tiny-a-vae8, the
//! pipeline's tiny ControlNets): "only masked" cuts each unit's image as the
//! sd-webui-controlnet extension does (its map committed by
//! tools/make_cn_inpaint_crop_fixtures.py), so `/sdapi/v1/img2img` makes the image of the
//! native request sending that map with `inpaint_crop: false`; the native `inpaint_crop: true`
//! cuts as the pipeline's own crop; a unit without an image takes the init image.

use crate::common;

use std::path::PathBuf;

use base64::Engine as _;
use common::{decode_png, post_json_to};
use sdserve_pipeline::inpaint_a1111::crop;
use sdserve_pipeline::pipeline::RgbImage;
use serde_json::{json, Value};

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/cn-inpaint-crop")
}

fn pipeline_fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../pipeline/tests/fixtures")
}

fn b64(path: PathBuf) -> String {
    base64::engine::general_purpose::STANDARD.encode(std::fs::read(path).unwrap())
}

fn png(image: &RgbImage) -> String {
    let mut out = Vec::new();
    image::RgbImage::from_raw(image.width, image.height, image.pixels.clone())
        .unwrap()
        .write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
        .unwrap();
    base64::engine::general_purpose::STANDARD.encode(out)
}

fn decoded(text: &str) -> RgbImage {
    let (width, height, pixels, _) = decode_png(text);
    RgbImage {
        width,
        height,
        pixels,
    }
}

#[test]
fn img2img_units_take_the_extension_s_images_and_only_masked_cuts_them() {
    let s =
        common::tiny_a_vae8_server(&[("CONTROLNET_DIR", &pipeline_fixtures().join("controlnet"))]);
    let cases: Value =
        serde_json::from_slice(&std::fs::read(dir().join("cases.json")).unwrap()).unwrap();
    let (init, mask) = (b64(dir().join("init.png")), b64(dir().join("mask.png")));
    let control = b64(pipeline_fixtures().join("images/control-80x48.png"));
    let native = |body: &Value| {
        let r = s.post_json(body);
        assert_eq!(r.status, 200, "{}", r.text());
        decode_png(r.json()["image_base64"].as_str().unwrap()).2
    };
    let a1111 = |body: &Value| {
        let r = post_json_to(s.addr, "/sdapi/v1/img2img", body);
        assert_eq!(r.status, 200, "{}", r.text());
        decode_png(r.json()["images"][0].as_str().unwrap()).2
    };
    // The same request in both dialects: Euler, A1111's step rule and prompt syntax.
    let a1111_body = |case: &Value, unit: Value| {
        json!({"prompt": "a house by a lake", "steps": 4, "cfg_scale": 7, "seed": 11,
               "sampler_name": "Euler", "width": 256, "height": 256, "denoising_strength": 0.8,
               "init_images": [init], "mask": mask, "mask_blur": case["blur"],
               "inpaint_full_res_padding": case["padding"],
               "inpainting_mask_invert": case["invert"],
               "alwayson_scripts": {"controlnet": {"args": [unit]}}})
    };
    let native_body = |case: &Value, unit: Value| {
        json!({"prompt": "a house by a lake", "steps": 4, "guidance_scale": 7, "seed": 11,
               "scheduler": "euler", "width": 256, "height": 256, "strength": 0.8,
               "step_rule": "a1111", "init_image": init, "mask_image": mask,
               "inpaint": {"mask_blur": case["blur"], "padding": case["padding"],
                           "mask_invert": case["invert"] == 1, "area": "only_masked",
                           "masked_content": "fill"},
               "controlnets": [unit]})
    };

    for name in ["own-crop", "init", "scribble"] {
        let case = &cases["cases"][name];
        let mut unit = json!({"model": "cn-a", "weight": 0.9,
                              "resize_mode": case["resize_mode"]});
        if case["unit"] != "init" {
            unit["image"] = json!(control);
        }
        if case["unit"] == "scribble" {
            unit["mask"] = json!(b64(dir().join("unit-mask.png")));
        }
        let got = a1111(&a1111_body(case, unit));
        let map = b64(dir().join(format!("map-{name}.png")));
        let want = native(&native_body(
            case,
            json!({"model": "cn-a", "scale": 0.9, "image": map, "inpaint_crop": false}),
        ));
        assert!(got == want, "{name}: the extension's map, uncut");
        // The map matters: the native unit cutting it again makes another image.
        let twice = native(&native_body(
            case,
            json!({"model": "cn-a", "scale": 0.9, "image": map}),
        ));
        let differ = twice.iter().zip(&want).filter(|(a, b)| a != b).count();
        assert!(differ > 0, "{name}: cutting again changes the image");
    }

    // The native `inpaint_crop: true`: the pipeline cuts the image (resized to the request's
    // size) to "only masked"'s region, as sending that cut with `inpaint_crop: false`.
    let case = &cases["cases"]["own-crop"];
    let cut_here = native(&native_body(
        case,
        json!({"model": "cn-a", "image": control}),
    ));
    let region = case["region"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_i64().unwrap())
        .collect::<Vec<_>>();
    let at_size = sdserve_pipeline::image_in::resize_lanczos(&decoded(&control), 256, 256);
    let whole = crop::resize_image(0, &at_size, 320, 224);
    let cut = crop::resize_image(
        2,
        &crop::crop(&whole, (region[0], region[1], region[2], region[3])),
        256,
        256,
    );
    let sent_cut = native(&native_body(
        case,
        json!({"model": "cn-a", "image": png(&cut), "inpaint_crop": false}),
    ));
    assert!(cut_here == sent_cut, "the pipeline cuts to the same region");

    // Plain img2img: a unit without an image steers with the init image.
    let plain = |body: &mut Value| {
        for k in [
            "mask",
            "mask_blur",
            "inpaint_full_res_padding",
            "inpainting_mask_invert",
        ] {
            body.as_object_mut().unwrap().remove(k);
        }
    };
    let mut body = a1111_body(case, json!({"model": "cn-a"}));
    plain(&mut body);
    let got = a1111(&body);
    let mut body = native_body(case, json!({"model": "cn-a", "image": init}));
    for k in ["mask_image", "inpaint"] {
        body.as_object_mut().unwrap().remove(k);
    }
    assert!(got == native(&body), "the init image steers");
    body["controlnets"][0]["image"] = json!(control);
    assert!(got != native(&body), "another image steers otherwise");
}
