//! A1111's seed resize over real HTTP on the real pipeline (tiny model `tiny-b`): the native
//! `seed_resize_from_width`/`_height` give the images of diffusers run on A1111's own
//! `ImageRNG` noise (`tools/make_seed_resize_images.py`, case `tiny-b.txt2img.euler.http`, a
//! batch of 2); A1111's `seed_resize_from_w`/`_h` give the same pixels, its `info` and
//! infotexts say so, `png-info` reads it back; image 1 of the batch is its seed's alone; jobs
//! carry the fields; broken values are 422s naming the field as sent.

use crate::common;

use common::{decode_png, post_json_to, Server};
use serde_json::{json, Value};

fn with(base: &Value, extra: Value) -> Value {
    let mut body = base.clone();
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

/// The reference images of the case, one `[H, W, 3]` u8 buffer per image.
fn reference_images(label: &str) -> Vec<Vec<u8>> {
    let path = common::tiny_b()
        .parent()
        .unwrap()
        .join("seed-resize-images.safetensors");
    let tensors = candle_core::safetensors::load(&path, &candle_core::Device::Cpu).unwrap();
    let t = &tensors[&format!("image.{label}")];
    (0..t.dim(0).unwrap())
        .map(|i| t.get(i).unwrap().flatten_all().unwrap().to_vec1().unwrap())
        .collect()
}

/// The image tests' bound against diffusers: mean absolute difference at most 1/255, at most
/// 0.5 % of values off by more than 8.
fn assert_close(label: &str, ours: &[u8], want: &[u8]) -> f64 {
    assert_eq!(ours.len(), want.len(), "{label}");
    let diffs: Vec<u32> = ours
        .iter()
        .zip(want)
        .map(|(&a, &b)| a.abs_diff(b) as u32)
        .collect();
    let mean = diffs.iter().sum::<u32>() as f64 / diffs.len() as f64;
    let over = diffs.iter().filter(|&&d| d > 8).count() as f64 / diffs.len() as f64;
    eprintln!("{label}: mean abs diff {mean:.4}, fraction > 8: {over:.5}");
    assert!(
        mean <= 1.0 && over <= 0.005,
        "{label}: mean {mean}, > 8: {over}"
    );
    mean
}

fn images_of(r: &common::Resp, key: &str) -> Vec<(Vec<u8>, String)> {
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()[key]
        .as_array()
        .unwrap()
        .iter()
        .map(|b64| {
            let (_, _, pixels, text) = decode_png(b64.as_str().unwrap());
            (pixels, text.unwrap())
        })
        .collect()
}

#[test]
fn seed_resize_matches_a1111_noise_natively_and_through_a1111() {
    let s: Server = common::tiny_server("seed-resize", &[("RESPONSE_CACHE_MB", "0")]);
    let label = "tiny-b.txt2img.euler.http";
    let want = reference_images(label);
    let native = json!({"prompt": "a lighthouse", "steps": 2, "width": 256, "height": 256,
                        "guidance_scale": 5.0, "scheduler": "euler", "seed": 11,
                        "batch_size": 2, "seed_resize_from_width": 320,
                        "seed_resize_from_height": 192});
    let r = s.post_json(&native);
    let images = images_of(&r, "images");
    let meta = r.json()["metadata"].clone();
    assert_eq!(images.len(), 2);
    for (i, (pixels, text)) in images.iter().enumerate() {
        assert_close(&format!("native {label}[{i}]"), pixels, &want[i]);
        assert!(
            text.contains(&format!(
                "Seed: {}, Size: 256x256, Seed resize from: 320x192,",
                11 + i
            )),
            "{text}"
        );
    }
    assert_eq!(meta["seeds"], json!([11, 12]));
    assert_eq!(
        (
            &meta["seed_resize_from_width"],
            &meta["seed_resize_from_height"]
        ),
        (&json!(320), &json!(192))
    );
    // Without the resize the same request is far from the reference.
    let plain = images_of(
        &s.post_json(&with(
            &native,
            json!({"seed_resize_from_width": null, "seed_resize_from_height": null}),
        )),
        "images",
    );
    let diff = plain[0]
        .0
        .iter()
        .zip(&want[0])
        .map(|(&a, &b)| a.abs_diff(b) as f64)
        .sum::<f64>()
        / want[0].len() as f64;
    assert!(diff > 4.0, "the resize changed little: {diff}");
    assert!(!plain[0].1.contains("Seed resize from"), "{}", plain[0].1);

    // Image 1 of the batch is seed 12's alone.
    let alone = images_of(
        &s.post_json(&with(&native, json!({"seed": 12, "batch_size": 1}))),
        "images",
    );
    assert!(alone[0].0 == images[1].0, "image 1 is its seed's alone");

    // A1111: the same pixels; info and infotexts as A1111 writes them; png-info reads it back.
    let a1111 = json!({"prompt": "a lighthouse", "steps": 2, "width": 256, "height": 256,
                       "cfg_scale": 5.0, "sampler_name": "Euler", "seed": 11, "batch_size": 2,
                       "seed_resize_from_w": 320, "seed_resize_from_h": 192});
    let r = post_json_to(s.addr, "/sdapi/v1/txt2img", &a1111);
    let a1111_images = images_of(&r, "images");
    for (i, ((ours, _), (theirs, _))) in images.iter().zip(&a1111_images).enumerate() {
        assert!(ours == theirs, "A1111 image {i} equals the native one");
    }
    let info: Value = serde_json::from_str(r.json()["info"].as_str().unwrap()).unwrap();
    assert_eq!(
        (&info["seed_resize_from_w"], &info["seed_resize_from_h"]),
        (&json!(320), &json!(192))
    );
    assert!(
        info["infotexts"][1]
            .as_str()
            .unwrap()
            .contains("Seed: 12, Size: 256x256, Seed resize from: 320x192,"),
        "{info}"
    );
    let r = post_json_to(
        s.addr,
        "/sdapi/v1/png-info",
        &json!({"image": r.json()["images"][0]}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let parameters = &r.json()["parameters"];
    assert_eq!(
        (
            &parameters["Seed resize from-1"],
            &parameters["Seed resize from-2"]
        ),
        (&json!("320"), &json!("192")),
        "{parameters}"
    );
    // One side at 0 or -1 is off, as in A1111: the plain image, nothing in the infotext.
    let r = post_json_to(
        s.addr,
        "/sdapi/v1/txt2img",
        &with(&a1111, json!({"seed_resize_from_h": 0})),
    );
    let off = images_of(&r, "images");
    assert!(off[0].0 == plain[0].0, "one side at 0 resizes nothing");
    assert!(!off[0].1.contains("Seed resize from"), "{}", off[0].1);

    // Jobs carry it.
    let r = common::request(
        s.addr,
        "POST",
        "/jobs",
        &[("Content-Type", "application/json")],
        with(&native, json!({"batch_size": 1}))
            .to_string()
            .as_bytes(),
    );
    assert_eq!(r.status, 202, "{}", r.text());
    let id = r.json()["id"].as_str().unwrap().to_string();
    let job = s.get(&format!("/jobs/{id}")).json();
    assert_eq!(
        (
            &job["request"]["seed_resize_from_width"],
            &job["request"]["seed_resize_from_height"]
        ),
        (&json!(320), &json!(192)),
        "{job}"
    );

    // Broken values: 422s naming the field as the client sent it.
    for (body, field) in [
        (
            with(&native, json!({"seed_resize_from_height": null})),
            "seed_resize_from_height",
        ),
        (
            with(&native, json!({"seed_resize_from_width": 4096})),
            "seed_resize_from_width",
        ),
        (
            with(&native, json!({"seed_resize_from_height": 0})),
            "seed_resize_from_height",
        ),
    ] {
        let r = s.post_json(&body);
        assert_eq!(r.status, 422, "{}", r.text());
        assert_eq!(
            r.json()["details"].as_str().map(|d| d.contains(field)),
            Some(true),
            "{}",
            r.text()
        );
        assert_eq!(r.broken_fields(), vec![field.to_string()], "{}", r.text());
    }
    let r = post_json_to(
        s.addr,
        "/sdapi/v1/txt2img",
        &with(&a1111, json!({"seed_resize_from_w": 4096})),
    );
    assert_eq!(r.status, 422, "{}", r.text());
    assert_eq!(
        r.broken_fields(),
        vec!["seed_resize_from_w".to_string()],
        "{}",
        r.text()
    );
    let r = post_json_to(
        s.addr,
        "/sdapi/v1/txt2img",
        &with(&a1111, json!({"seed_resize_from_h": "192"})),
    );
    assert_eq!(r.status, 422, "{}", r.text());
    assert_eq!(
        r.broken_fields(),
        vec!["seed_resize_from_h".to_string()],
        "{}",
        r.text()
    );
}
