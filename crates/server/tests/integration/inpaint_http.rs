//! A1111's inpainting over real HTTP on the real pipeline (tiny model `tiny-b`), against A1111's
//! own preprocessing and overlay around diffusers' sampling with its blend
//! (`tools/make_inpaint_a1111_fixtures.py`, cases `http.*`): `/sdapi/v1/img2img` with a mask
//! and A1111's API defaults ("fill", "only masked" with padding 0, blur 4) gives A1111's image
//! at the init image's own size, its infotext keys and `parameters`; the native `inpaint`
//! object (with `step_rule: a1111`, as the A1111 route runs) gives the same pixels, and `{}` the web UI's defaults (whole picture, original);
//! kept pixels come back exactly as sent; jobs carry the options; broken ones are 422s.

use crate::common;

use std::path::PathBuf;

use base64::Engine as _;
use common::{decode_png, ok, post_json_to, Server};
use serde_json::{json, Value};

fn fixtures() -> PathBuf {
    common::tiny_b().parent().unwrap().to_path_buf()
}

fn file_b64(name: &str) -> String {
    let bytes = std::fs::read(fixtures().join("a1111-inpaint").join(name)).unwrap();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// A case's reference image (`[H, W, 3]` u8) and its size.
fn reference(label: &str) -> (Vec<u8>, usize, usize) {
    let path = fixtures().join("a1111-inpaint.safetensors");
    let tensors = candle_core::safetensors::load(&path, &candle_core::Device::Cpu).unwrap();
    let t = tensors[&format!("result.{label}")].get(0).unwrap();
    let (h, w, _) = t.dims3().unwrap();
    (t.flatten_all().unwrap().to_vec1().unwrap(), w, h)
}

fn mean_abs_diff(a: &[u8], b: &[u8]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(&a, &b)| a.abs_diff(b) as f64)
        .sum::<f64>()
        / b.len() as f64
}

/// Within float noise of the reference: the pipeline's own test holds 0.05 mean abs diff.
fn assert_matches(label: &str, ours: &[u8], want: &[u8]) {
    assert_eq!(ours.len(), want.len(), "{label}: size");
    let mean = mean_abs_diff(ours, want);
    eprintln!("{label}: mean abs diff {mean:.4}");
    assert!(mean <= 0.05, "{label}: mean abs diff {mean}");
}

fn first_image(r: &common::Resp, key: &str) -> (u32, u32, Vec<u8>, String) {
    let body = ok(r);
    let b64 = match key {
        "images" => body["images"][0].as_str().unwrap().to_string(),
        _ => body[key].as_str().unwrap().to_string(),
    };
    let (w, h, pixels, text) = decode_png(&b64);
    (w, h, pixels, text.unwrap_or_default())
}

fn native_base(seed: u64, inpaint: Value) -> Value {
    json!({"prompt": "a watercolor painting of a lighthouse at sunset",
           "init_image": file_b64("init-384x320.png"), "mask_image": file_b64("mask-384x320.png"),
           "width": 256, "height": 256, "steps": 3, "guidance_scale": 1.0, "scheduler": "euler",
           "seed": seed, "strength": 0.75, "inpaint": inpaint, "step_rule": "a1111"})
}

#[test]
fn a1111_img2img_with_a_mask_is_a1111_s_inpainting() {
    let s: Server = common::tiny_server("inpaint", &[("RESPONSE_CACHE_MB", "0")]);
    let init = file_b64("init-384x320.png");
    let (want, w, h) = reference("http.a1111_defaults");
    assert_eq!((w, h), (384, 320));

    // A1111's API defaults: blur 4, fill, only masked with padding 0.
    let a1111 = json!({"prompt": "a watercolor painting of a lighthouse at sunset",
                       "init_images": [init], "mask": file_b64("mask-384x320.png"),
                       "width": 256, "height": 256, "steps": 3, "cfg_scale": 1.0,
                       "sampler_name": "Euler", "seed": 21, "denoising_strength": 0.75});
    let r = post_json_to(s.addr, "/sdapi/v1/img2img", &a1111);
    let (iw, ih, a1111_pixels, text) = first_image(&r, "images");
    assert_eq!(
        (iw, ih),
        (384, 320),
        "only masked answers at the image's own size"
    );
    assert_matches("A1111 http.a1111_defaults", &a1111_pixels, &want);
    assert!(
        text.contains(
            "Mode: inpaint, Mask blur: 4, Inpaint area: Only masked, Masked area padding: 0, \
             Masked content: fill"
        ),
        "{text}"
    );
    let params = &r.json()["parameters"];
    assert_eq!(
        (&params["inpainting_fill"], &params["inpaint_full_res"]),
        (&json!(0), &json!(true))
    );

    // The native object with the same options: the same pixels.
    let native = native_base(
        21,
        json!({"masked_content": "fill", "area": "only_masked", "padding": 0}),
    );
    let r = s.post_json(&native);
    let (_, _, native_pixels, _) = first_image(&r, "image_base64");
    assert!(
        native_pixels == a1111_pixels,
        "native equals A1111's answer"
    );
    let meta = &r.json()["metadata"];
    assert_eq!(
        (&meta["image_width"], &meta["image_height"]),
        (&json!(384), &json!(320))
    );
    assert_eq!(
        meta["inpaint"],
        json!({"mask_blur_x": 4, "mask_blur_y": 4, "mask_invert": false,
               "masked_content": "fill", "area": "only_masked", "padding": 0,
               "mask_round": true})
    );

    // Kept pixels come back as sent: outside the blurred mask's reach the init image's own.
    let (_, _, init_pixels, _) = decode_png(&init);
    let at = |x: usize, y: usize| (y * 384 + x) * 3;
    for (x, y) in [(0, 0), (100, 300), (383, 319), (200, 60)] {
        assert_eq!(
            native_pixels[at(x, y)..at(x, y) + 3],
            init_pixels[at(x, y)..at(x, y) + 3],
            "({x}, {y})"
        );
    }
}

#[test]
fn native_inpaint_takes_the_web_ui_s_defaults_and_jobs_carry_it() {
    let s: Server = common::tiny_server("inpaint-native", &[("RESPONSE_CACHE_MB", "0")]);
    let (want, w, h) = reference("http.web_ui_defaults");
    assert_eq!((w, h), (256, 256));
    let r = s.post_json(&native_base(22, json!({})));
    let (iw, ih, pixels, text) = first_image(&r, "image_base64");
    assert_eq!((iw, ih), (256, 256));
    assert_matches("native http.web_ui_defaults", &pixels, &want);
    assert!(text.ends_with("Mode: inpaint, Mask blur: 4"), "{text}");
    // diffusers' inpainting (no `inpaint`) is another image.
    let mut plain = native_base(22, Value::Null);
    plain.as_object_mut().unwrap().remove("inpaint");
    let (_, _, diffusers, text) = first_image(&s.post_json(&plain), "image_base64");
    assert!(!text.contains("Mask blur"), "{text}");
    let diff = mean_abs_diff(&diffusers, &want);
    assert!(diff > 1.0, "diffusers' inpainting is A1111's? {diff}");
    // A1111's inpainting on diffusers' step rule (3 steps at 0.75: 2 from index 1, where
    // A1111's runs 3 from 0) is another image too.
    let mut steps = native_base(22, json!({}));
    steps.as_object_mut().unwrap().remove("step_rule");
    let (_, _, other, _) = first_image(&s.post_json(&steps), "image_base64");
    let diff = mean_abs_diff(&other, &want);
    assert!(diff > 1.0, "diffusers' step rule is A1111's? {diff}");

    // A job carries the options in its request and its result.
    let job = common::job_to_end(&s, &native_base(22, json!({"mask_invert": true})));
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["request"]["inpaint"]["mask_invert"], true);
    assert_eq!(job["request"]["step_rule"], "a1111");
    assert_eq!(job["result"]["metadata"]["step_rule"], "a1111");
    assert_eq!(job["result"]["metadata"]["inpaint"]["mask_invert"], true);
    // Text to image starts from no image: no step rule in its metadata.
    let r = s.post_json(
        &json!({"prompt": "a lighthouse", "width": 256, "height": 256,
                                "steps": 1, "seed": 22}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        r.json()["metadata"].get("step_rule").is_none(),
        "{}",
        r.text()
    );

    // Broken options are 422s naming the key; no mask, nothing to inpaint.
    let r = s.post_json(&native_base(22, json!({"masked_content": "blur"})));
    assert_eq!(r.broken_fields(), ["inpaint.masked_content"]);
    let mut no_mask = native_base(22, json!({}));
    no_mask.as_object_mut().unwrap().remove("mask_image");
    assert_eq!(s.post_json(&no_mask).broken_fields(), ["inpaint"]);
    let r = post_json_to(
        s.addr,
        "/sdapi/v1/img2img",
        &json!({"prompt": "p", "init_images": [file_b64("init-384x320.png")],
                "mask": file_b64("mask-384x320.png"), "inpainting_fill": 5}),
    );
    assert_eq!(r.broken_fields(), ["inpainting_fill"]);
}

/// `mask_round` false (A1111's field, the native `inpaint.mask_round`): the blurred mask's grey
/// levels stay in the latent mask, as A1111's own `init` and blend give them (`http.unrounded`).
#[test]
fn mask_round_false_keeps_the_mask_s_grey_levels() {
    let s: Server = common::tiny_server("inpaint-unrounded", &[("RESPONSE_CACHE_MB", "0")]);
    let (want, w, h) = reference("http.unrounded");
    assert_eq!((w, h), (256, 256));
    let a1111 = |round: Value| {
        json!({"prompt": "a watercolor painting of a lighthouse at sunset",
               "init_images": [file_b64("init-384x320.png")],
               "mask": file_b64("mask-384x320.png"), "width": 256, "height": 256, "steps": 3,
               "cfg_scale": 1.0, "sampler_name": "Euler", "seed": 23,
               "denoising_strength": 0.75, "mask_blur": 12, "inpainting_fill": 1,
               "inpaint_full_res": false, "mask_round": round})
    };
    let r = post_json_to(s.addr, "/sdapi/v1/img2img", &a1111(json!(false)));
    let (_, _, unrounded, _) = first_image(&r, "images");
    assert_matches("A1111 http.unrounded", &unrounded, &want);
    assert_eq!(r.json()["parameters"]["mask_round"], false);
    // Rounded (A1111's default, also for null) is another image.
    let r = post_json_to(s.addr, "/sdapi/v1/img2img", &a1111(Value::Null));
    let (_, _, rounded, _) = first_image(&r, "images");
    let diff = mean_abs_diff(&rounded, &want);
    assert!(diff > 0.2, "rounding changes nothing? {diff}");

    // The native object: the same pixels, and the metadata says so.
    let r = s.post_json(&native_base(
        23,
        json!({"mask_blur": 12, "mask_round": false}),
    ));
    let (_, _, native, _) = first_image(&r, "image_base64");
    assert!(native == unrounded, "native equals A1111's answer");
    assert_eq!(r.json()["metadata"]["inpaint"]["mask_round"], false);

    // Not a boolean: a 422 naming the field as each dialect names it.
    let r = s.post_json(&native_base(23, json!({"mask_round": "no"})));
    assert_eq!(r.broken_fields(), ["inpaint.mask_round"]);
    let r = post_json_to(s.addr, "/sdapi/v1/img2img", &a1111(json!("no")));
    assert_eq!(r.broken_fields(), ["mask_round"]);
}

/// An A1111 mask with transparency is its alpha, as A1111's `create_binary_mask` reads it (the
/// file kinds: `images.rs`' test on tools/make_a1111_mask_alpha_fixtures.py's references);
/// the native `mask_image` keeps its documented rule, the colours' luminance.
#[test]
fn an_a1111_mask_with_transparency_is_its_alpha() {
    let s: Server = common::tiny_server("inpaint-alpha", &[("RESPONSE_CACHE_MB", "0")]);
    let grey = file_b64("mask-384x320.png");
    // White everywhere (its luminance: repaint all), the grey mask as the alpha channel.
    let (w, h, pixels, _) = decode_png(&grey);
    let alpha = image::RgbaImage::from_fn(w, h, |x, y| {
        image::Rgba([255, 255, 255, pixels[((y * w + x) * 3) as usize]])
    });
    let mut png = std::io::Cursor::new(Vec::new());
    alpha.write_to(&mut png, image::ImageFormat::Png).unwrap();
    let rgba = base64::engine::general_purpose::STANDARD.encode(png.into_inner());
    let a1111 = |mask: &str| {
        json!({"prompt": "a lighthouse", "init_images": [file_b64("init-384x320.png")],
               "mask": mask, "width": 256, "height": 256, "steps": 2, "cfg_scale": 1.0,
               "sampler_name": "Euler", "seed": 23, "inpaint_full_res": false})
    };
    let image = |path: &str, body: &Value| {
        let key = if path == "/generate" {
            "image_base64"
        } else {
            "images"
        };
        first_image(&post_json_to(s.addr, path, body), key).2
    };
    let by_alpha = image("/sdapi/v1/img2img", &a1111(&rgba));
    assert!(by_alpha == image("/sdapi/v1/img2img", &a1111(&grey)));
    // The native API reads the same file's colours: all white, all repainted.
    let native = |mask: &str| {
        let mut body = native_base(23, json!({}));
        body["mask_image"] = json!(mask);
        image("/generate", &body)
    };
    let white = native(&rgba);
    assert!(
        white != native(&grey),
        "the native mask is the colours' luminance"
    );
    let all_white = image::RgbImage::from_pixel(w, h, image::Rgb([255, 255, 255]));
    let mut png = std::io::Cursor::new(Vec::new());
    all_white
        .write_to(&mut png, image::ImageFormat::Png)
        .unwrap();
    let all = base64::engine::general_purpose::STANDARD.encode(png.into_inner());
    assert!(white == native(&all));
}

/// A1111's img2img runs A1111 1.10's step rule (the native `step_rule: a1111`): 4 steps at 0.5
/// run 3 (`int(0.5 * 4) + 1`; diffusers' 2); `img2img_fix_steps` (override or option) runs the
/// 4 steps exactly, of a schedule of 8. The jobs count them.
#[test]
fn a1111_img2img_runs_a1111_s_steps_and_its_fix_steps_option() {
    let s: Server = common::tiny_server("a1111-steps", &[("RESPONSE_CACHE_MB", "0")]);
    let init = file_b64("init-384x320.png");
    let body = |seed: u64, extra: Value| {
        let mut b = json!({"prompt": "a lighthouse", "init_images": [init], "width": 256,
                           "height": 256, "steps": 4, "cfg_scale": 1.0, "sampler_name": "Euler",
                           "seed": seed, "denoising_strength": 0.5});
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        b
    };
    let a1111 = first_image(
        &post_json_to(s.addr, "/sdapi/v1/img2img", &body(31, json!({}))),
        "images",
    );
    let native = json!({"prompt": "a lighthouse", "init_image": init, "width": 256,
                        "height": 256, "steps": 4, "guidance_scale": 1.0, "scheduler": "euler",
                        "seed": 31, "strength": 0.5, "step_rule": "a1111"});
    assert!(first_image(&s.post_json(&native), "image_base64").2 == a1111.2);
    let mut diffusers = native.clone();
    diffusers.as_object_mut().unwrap().remove("step_rule");
    assert!(first_image(&s.post_json(&diffusers), "image_base64").2 != a1111.2);

    let fix = json!({"override_settings": {"img2img_fix_steps": true}});
    ok(&post_json_to(s.addr, "/sdapi/v1/img2img", &body(32, fix)));
    let set = |v: bool| {
        let r = post_json_to(
            s.addr,
            "/sdapi/v1/options",
            &json!({"img2img_fix_steps": v}),
        );
        assert_eq!(r.status, 200, "{}", r.text());
    };
    set(true);
    assert_eq!(s.get("/sdapi/v1/options").json()["img2img_fix_steps"], true);
    ok(&post_json_to(
        s.addr,
        "/sdapi/v1/img2img",
        &body(33, json!({})),
    ));
    set(false);
    let r = post_json_to(
        s.addr,
        "/sdapi/v1/options",
        &json!({"img2img_fix_steps": "yes"}),
    );
    assert_eq!(r.broken_fields(), ["img2img_fix_steps"], "{}", r.text());

    let jobs = s.get("/jobs").json();
    let job = |seed: u64| {
        jobs["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|j| j["request"]["seed"] == seed && j["request"]["step_rule"] != "diffusers")
            .unwrap_or_else(|| panic!("no job of seed {seed}: {jobs}"))
            .clone()
    };
    for (seed, rule, total) in [
        (31, "a1111", 3),
        (32, "a1111_fix_steps", 4),
        (33, "a1111_fix_steps", 4),
    ] {
        let j = job(seed);
        assert_eq!(j["request"]["step_rule"], rule, "{j}");
        assert_eq!(j["result"]["metadata"]["step_rule"], rule, "{j}");
        assert_eq!(j["progress"]["total"], total, "{j}");
    }
}

/// A1111 img2img's `resize_mode` (and the native `resize_mode`): 2 with a mask over the whole
/// picture (blurred at the upload's size, then both fitted) and 3, the latent upscale, without
/// one, give A1111's images (`http.resize_fill`, `http.latent_upscale`); the latent upscale
/// with a mask at another size than the request's is a 422 naming the field.
#[test]
fn resize_modes_fit_the_init_image_and_mask_as_a1111() {
    let s: Server = common::tiny_server("inpaint-resize", &[("RESPONSE_CACHE_MB", "0")]);
    let a1111 = |seed: u64, mode: u64, mask: bool| {
        let mut body = json!({"prompt": "a watercolor painting of a lighthouse at sunset",
               "init_images": [file_b64("init-384x320.png")], "width": 256, "height": 256,
               "steps": 3, "cfg_scale": 1.0, "sampler_name": "Euler", "seed": seed,
               "denoising_strength": 0.75, "resize_mode": mode});
        if mask {
            body["mask"] = json!(file_b64("mask-384x320.png"));
            body["inpainting_fill"] = json!(1);
            body["inpaint_full_res"] = json!(false);
        }
        body
    };
    let (want, w, h) = reference("http.resize_fill");
    assert_eq!((w, h), (256, 256));
    let r = post_json_to(s.addr, "/sdapi/v1/img2img", &a1111(24, 2, true));
    let (_, _, filled, _) = first_image(&r, "images");
    assert_matches("A1111 http.resize_fill", &filled, &want);
    let mut native = native_base(24, json!({}));
    native["resize_mode"] = json!("resize_and_fill");
    let r = s.post_json(&native);
    let (_, _, native_filled, text) = first_image(&r, "image_base64");
    assert!(native_filled == filled, "native equals A1111's answer");
    // Metadata reports the mode; the PNG text does not (A1111's infotext has no resize mode).
    assert_eq!(r.json()["metadata"]["resize_mode"], "resize_and_fill");
    assert!(!text.to_lowercase().contains("resize"), "{text}");

    let (want, w, h) = reference("http.latent_upscale");
    assert_eq!((w, h), (256, 256));
    let r = post_json_to(s.addr, "/sdapi/v1/img2img", &a1111(25, 3, false));
    let (_, _, latent, _) = first_image(&r, "images");
    assert_matches("A1111 http.latent_upscale", &latent, &want);
    let (_, _, stretched, _) = first_image(
        &post_json_to(s.addr, "/sdapi/v1/img2img", &a1111(25, 0, false)),
        "images",
    );
    let diff = mean_abs_diff(&stretched, &want);
    assert!(diff > 0.2, "the latent upscale changes nothing? {diff}");
    let mut native = native_base(25, Value::Null);
    native.as_object_mut().unwrap().remove("mask_image");
    native["resize_mode"] = json!("latent_upscale");
    let r = s.post_json(&native);
    let (_, _, native_latent, _) = first_image(&r, "image_base64");
    assert!(native_latent == latent, "native equals A1111's answer");
    assert_eq!(r.json()["metadata"]["resize_mode"], "latent_upscale");
    // The job's record reports it as the 200 body does; A1111's default is just_resize.
    native.as_object_mut().unwrap().remove("resize_mode");
    let job = common::job_to_end(&s, &native);
    assert_eq!(
        job["result"]["metadata"]["resize_mode"], "just_resize",
        "{}",
        job["status"]
    );

    let r = post_json_to(s.addr, "/sdapi/v1/img2img", &a1111(26, 3, true));
    assert_eq!(r.broken_fields(), ["resize_mode"]);
    // Without an init image it is ignored, as strength.
    let r = s.post_json(
        &json!({"prompt": "p", "resize_mode": "crop_and_resize", "steps": 1,
                                "width": 256, "height": 256}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["metadata"]["resize_mode"], Value::Null);
}
