//! A1111's variation seeds over real HTTP on the real pipeline (tiny model `tiny-b`):
//! `subseed_strength` 0 is the seed's image exactly, 1 the variation seed's image as a main
//! seed (A1111's slerp gives the variation seed's noise itself there, and Euler draws no later
//! noise), between them a third image that the native fields give too; batches keep the seed
//! and count the variation seed up (A1111's rule). The
//! noise itself is checked against A1111's own slerp in the pipeline's tests/integration/variation.rs.

use crate::common;

use common::{decode_png, post_json_to, Server};
use serde_json::{json, Value};

fn start() -> Server {
    common::tiny_server("variation", &[])
}

fn with(base: &Value, extra: Value) -> Value {
    let mut body = base.clone();
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

#[test]
fn variation_seeds_follow_a1111() {
    let s = start();
    let native = json!({"prompt": "a lighthouse", "steps": 2, "width": 256, "height": 256,
                        "guidance_scale": 5.0, "scheduler": "euler"});
    let a1111 = json!({"prompt": "a lighthouse", "steps": 2, "width": 256, "height": 256,
                       "cfg_scale": 5.0, "sampler_name": "Euler", "seed": 11});
    let native_image = |body: Value| {
        let r = s.post_json(&body);
        assert_eq!(r.status, 200, "{}", r.text());
        let v = r.json();
        let (_, _, pixels, text) = decode_png(v["image_base64"].as_str().unwrap());
        (pixels, text.unwrap(), v["metadata"].clone())
    };
    let a1111_image = |body: Value| {
        let r = post_json_to(s.addr, "/sdapi/v1/txt2img", &body);
        assert_eq!(r.status, 200, "{}", r.text());
        let v = r.json();
        let info: Value = serde_json::from_str(v["info"].as_str().unwrap()).unwrap();
        let (_, _, pixels, text) = decode_png(v["images"][0].as_str().unwrap());
        (pixels, text.unwrap(), info)
    };
    let (seed_11, _, _) = native_image(with(&native, json!({"seed": 11})));
    let (seed_22, _, _) = native_image(with(&native, json!({"seed": 22})));
    assert_ne!(seed_11, seed_22);

    let (zero, text, _) = a1111_image(with(&a1111, json!({"subseed": 22, "subseed_strength": 0})));
    assert!(zero == seed_11, "strength 0 is the seed's image");
    assert!(!text.contains("Variation seed"), "{text}");
    let (one, _, _) = a1111_image(with(&a1111, json!({"subseed": 22, "subseed_strength": 1})));
    assert!(one == seed_22, "strength 1 is the variation seed's image");

    let (half, text, info) = a1111_image(with(
        &a1111,
        json!({"subseed": 22, "subseed_strength": 0.5}),
    ));
    assert!(half != seed_11 && half != seed_22);
    assert!(
        text.contains("Seed: 11,")
            && text.contains("Variation seed: 22, Variation seed strength: 0.5"),
        "{text}"
    );
    assert_eq!(
        (&info["subseed"], &info["subseed_strength"]),
        (&json!(22), &json!(0.5))
    );
    let (native_half, native_text, meta) = native_image(with(
        &native,
        json!({"seed": 11, "variation_seed": 22, "variation_strength": 0.5}),
    ));
    assert!(native_half == half);
    assert_eq!(native_text.lines().last(), text.lines().last());
    assert_eq!(
        (&meta["variation_seed"], &meta["variation_strength"]),
        (&json!(22), &json!(0.5))
    );

    // A batch keeps the seed and counts the variation seed up: image 1 is (11, 23) alone.
    let r = s.post_json(&with(
        &native,
        json!({"seed": 11, "variation_seed": 22, "variation_strength": 0.5, "batch_size": 2}),
    ));
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["metadata"]["seeds"], json!([11, 11]));
    let (_, _, second, text) = decode_png(v["images"][1].as_str().unwrap());
    assert!(text.unwrap().contains("Variation seed: 23,"));
    let (alone, _, _) = native_image(with(
        &native,
        json!({"seed": 11, "variation_seed": 23, "variation_strength": 0.5}),
    ));
    assert!(second == alone);

    // The hires pass bends its noise too (A1111 makes the same ImageRNG again): at strength 1
    // with the latent upscaler, the variation seed's hires image.
    let hires = json!({"enable_hr": true, "hr_scale": 1.5, "hr_upscaler": "Latent",
                       "hr_second_pass_steps": 2, "denoising_strength": 0.5});
    let (varied, _, _) = a1111_image(with(
        &with(&a1111, hires.clone()),
        json!({"subseed": 22, "subseed_strength": 1}),
    ));
    let (seeded, _, _) = a1111_image(with(&with(&a1111, hires), json!({"seed": 22})));
    assert!(
        varied == seeded,
        "hires: strength 1 is the variation seed's image"
    );

    // A random variation seed is drawn and returned; -1 is A1111's "random".
    let (_, _, meta) = native_image(with(
        &native,
        json!({"seed": 11, "variation_strength": 0.3}),
    ));
    assert!(meta["variation_seed"].as_u64().is_some(), "{meta}");
    let (_, _, info) = a1111_image(with(
        &a1111,
        json!({"subseed": -1, "subseed_strength": 0.3}),
    ));
    assert!(info["subseed"].as_i64().unwrap() >= 0, "{info}");

    // Refused, not ignored: out-of-range values.
    let r = post_json_to(
        s.addr,
        "/sdapi/v1/txt2img",
        &with(&a1111, json!({"subseed_strength": 2})),
    );
    assert_eq!(r.status, 422, "{}", r.text());
    assert!(r.text().contains("subseed_strength"), "{}", r.text());
    let r = s.post_json(&with(&native, json!({"variation_seed": 4294967296_u64})));
    assert_eq!(r.status, 422, "{}", r.text());
    assert!(r.text().contains("variation_seed"), "{}", r.text());
}
