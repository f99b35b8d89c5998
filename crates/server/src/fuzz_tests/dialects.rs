//! The dialects' JSON routes through the real router: A1111 `txt2img`/`img2img` and OpenAI
//! `images/generations`, with random bytes, arbitrary JSON and near-valid objects built from
//! each dialect's own fields. Properties: no panic and no 5xx; a rejection has the dialect's
//! status and error shape and names a field the client sent (in the client's name); whatever
//! is accepted reaches the generator obeying every native rule.

use std::collections::BTreeSet;

use base64::Engine as _;
use proptest::prelude::*;
use serde_json::{json, Map, Value};

use super::harness::{
    assert_native_error, assert_native_rules, assert_openai_error, assert_rules, harness,
};
use super::{any_json, cases};
use crate::validate;

/// A 64x64 PNG, base64: a valid init image (and mask).
pub(super) fn png_b64(w: u32, h: u32) -> String {
    let img = sdserve_pipeline::pipeline::RgbImage {
        width: w,
        height: h,
        pixels: (0..w * h * 3).map(|i| (i * 7 % 256) as u8).collect(),
    };
    base64::engine::general_purpose::STANDARD.encode(crate::png::encode(&img, "").unwrap())
}

fn ints() -> impl Strategy<Value = Value> + Clone {
    prop_oneof![
        Just(json!(-1)),
        Just(json!(0)),
        Just(json!(1)),
        Just(json!(2)),
        Just(json!(8)),
        Just(json!(9)),
        Just(json!(50)),
        Just(json!(51)),
        Just(json!(256)),
        Just(json!(320)),
        Just(json!(500)),
        Just(json!(512)),
        Just(json!(768)),
        Just(json!(1024)),
        Just(json!(4294967295u64)),
        Just(json!(4294967296u64)),
        Just(json!(u64::MAX)),
        Just(json!(i64::MIN)),
        Just(json!(2.0)),
        Just(json!(2.5)),
        Just(json!(-0.0)),
        Just(json!(1e300)),
        Just(json!("2")),
        Just(json!(true)),
        Just(json!([1])),
        Just(Value::Null),
        any::<i32>().prop_map(|v| json!(v)),
    ]
}

fn floats() -> impl Strategy<Value = Value> + Clone {
    prop_oneof![
        Just(json!(0.0)),
        Just(json!(1.0)),
        Just(json!(7.5)),
        Just(json!(30.0)),
        Just(json!(30.5)),
        Just(json!(-1)),
        Just(json!(0.75)),
        Just(json!(1.5)),
        Just(json!("0.5")),
        Just(Value::Null),
        any::<f64>().prop_map(|v| json!(v)),
    ]
}

fn texts() -> impl Strategy<Value = Value> + Clone {
    prop_oneof![
        4 => "[a-z ]{1,20}".prop_map(Value::String),
        1 => ".{0,20}".prop_map(Value::String),
        1 => Just(json!("")),
        1 => Just(json!("   ")),
        1 => Just(json!("a <lora:ink:0.5> b")),
        1 => Just(json!("<lora:x:nan>")),
        1 => Just(json!("\u{0}\u{1b}[31m a")),
        1 => Just(json!("ж".repeat(500))),
        1 => Just(json!("ж".repeat(501))),
        1 => Just(Value::Null),
        1 => Just(json!(5)),
        1 => Just(json!(["a"])),
    ]
}

/// Base64 images as clients send them, and what clients get wrong.
fn images() -> impl Strategy<Value = Value> + Clone {
    let png = png_b64(64, 64);
    prop_oneof![
        3 => Just(json!(png.clone())),
        1 => Just(json!(format!("data:image/png;base64,{png}"))),
        1 => Just(json!(format!("data:text/plain;base64,{png}"))),
        1 => Just(json!(png_b64(48, 80))),
        1 => Just(json!(png[..png.len() / 2].to_string())),
        1 => Just(json!("")),
        1 => Just(json!("not base64 at all!")),
        1 => Just(json!("aGVsbG8=")),
        1 => Just(json!(5)),
        1 => Just(Value::Null),
    ]
}

/// Mostly one of `valid`, sometimes something `weird`: most bodies get past most rules, so
/// the later rules and the accepted path are exercised too.
fn field(valid: Vec<Value>, weird: impl Strategy<Value = Value> + 'static) -> BoxedStrategy<Value> {
    prop_oneof![4 => prop::sample::select(valid), 1 => weird].boxed()
}

fn js<T: Into<Value> + Clone>(v: &[T]) -> Vec<Value> {
    v.iter().cloned().map(Into::into).collect()
}

fn prompt() -> BoxedStrategy<Value> {
    prop_oneof![4 => "[a-z][a-z ]{0,19}".prop_map(Value::String), 1 => texts()].boxed()
}

fn pick(v: &[&str]) -> impl Strategy<Value = Value> + Clone {
    let mut all: Vec<Value> = v.iter().map(|s| json!(s)).collect();
    all.extend([Value::Null, json!(3), json!("")]);
    prop::sample::select(all)
}

/// Sets each present field; `extra` adds any other key with any value.
fn object(fields: Vec<(&'static str, Option<Value>)>, extra: Option<(String, Value)>) -> Value {
    let mut m = Map::new();
    for (k, v) in fields {
        if let Some(v) = v {
            m.insert(k.to_string(), v);
        }
    }
    if let Some((k, v)) = extra {
        m.insert(k, v);
    }
    Value::Object(m)
}

const SAMPLERS: &[&str] = &[
    "Euler a",
    "Euler",
    "DPM++ 2M",
    "DPM++ 2M Karras",
    "DPM++ 2M Uniform",
    "Euler Karras",
    "DDIM",
    "DDIM CFG++",
    "PLMS",
    "LMS",
    "UniPC",
    "k_euler_a",
    "k_dpmpp_2m",
    "euler",
    "DPM++ SDE",
    " Karras",
    "Karras",
];
const SCHEDULES: &[&str] = &[
    "automatic",
    "Automatic",
    "uniform",
    "Uniform",
    "karras",
    "Karras",
    "Exponential",
];

fn a1111_body() -> impl Strategy<Value = Value> {
    let o = |s: BoxedStrategy<Value>| prop::option::weighted(0.5, s);
    let clip = prop_oneof![
        Just(json!({"CLIP_stop_at_last_layers": 2})),
        Just(json!({"CLIP_stop_at_last_layers": 5})),
        Just(json!({"CLIP_stop_at_last_layers": 13})),
        Just(json!({"CLIP_stop_at_last_layers": null, "sd_model_checkpoint": "other"})),
        Just(json!({"CLIP_stop_at_last_layers": "2"})),
        Just(json!("not an object")),
        Just(json!({})),
    ];
    let init_images = prop_oneof![
        3 => images().prop_map(|i| json!([i])),
        1 => Just(json!([])),
        1 => (images(), images()).prop_map(|(a, b)| json!([a, b])),
        1 => images(),
    ];
    (
        (
            prop::option::weighted(0.95, prompt()),
            o(texts().boxed()),
            o(field(js(&[1, 2, 3, 20, 50]), ints())),
            o(field(js(&[0.0, 1.0, 7.0, 7.5, 30.0]), floats())),
            o(field(js(&[256, 320, 512, 768]), ints())),
            o(field(js(&[256, 384, 512, 768]), ints())),
            o(field(js(&[-1i64, 0, 7, 4294967295]), ints())),
        ),
        (
            o(field(js(&SAMPLERS[..11]), pick(SAMPLERS))),
            prop::option::weighted(0.2, pick(SAMPLERS)),
            o(field(
                js(&["automatic", "Automatic", "uniform", "Uniform"]),
                pick(SCHEDULES),
            )),
            o(field(js(&[1, 2, 8]), ints())),
            o(field(js(&[1, 2, 3]), ints())),
            o(field(js(&[0.5, 0.75, 1.0]), floats())),
        ),
        (
            prop::option::weighted(0.9, init_images),
            prop::option::weighted(0.2, field(vec![json!(png_b64(64, 64))], images())),
            prop::option::weighted(0.2, clip),
            prop::option::weighted(0.1, ints()),
            prop::option::weighted(0.3, ("[a-z_]{1,12}", any_json())),
        ),
    )
        .prop_map(
            |(
                (p, n, steps, cfg, w, h, seed),
                (sn, si, sch, bs, ni, ds),
                (ii, mask, ov, inv, extra),
            )| {
                object(
                    vec![
                        ("prompt", p),
                        ("negative_prompt", n),
                        ("steps", steps),
                        ("cfg_scale", cfg),
                        ("width", w),
                        ("height", h),
                        ("seed", seed),
                        ("sampler_name", sn),
                        ("sampler_index", si),
                        ("scheduler", sch),
                        ("batch_size", bs),
                        ("n_iter", ni),
                        ("denoising_strength", ds),
                        ("init_images", ii),
                        ("mask", mask),
                        ("override_settings", ov),
                        ("inpainting_mask_invert", inv),
                    ],
                    extra,
                )
            },
        )
}

/// Fields an A1111 rejection may name although the client did not send them: the required
/// prompt and init image, the schedule a sampler name implies, a sampler's default schedule.
const A1111_IMPLIED: &[&str] = &[
    "prompt",
    "init_images",
    "scheduler",
    "sampler_name",
    "denoising_strength",
    // `<lora:...>` tags in the prompt name LoRAs too.
    "loras",
];
/// Native names the A1111 dialect must have renamed.
const NATIVE_ONLY: &[&str] = &[
    "guidance_scale",
    "init_image",
    "mask_image",
    "strength",
    "clip_skip",
];

fn check_a1111(path: &str, body: Vec<u8>, sent: Option<&Map<String, Value>>) {
    let a = harness().send("POST", path, Some("application/json"), body);
    match a.status.as_u16() {
        200 => {
            let j = a.json();
            let info: Value =
                serde_json::from_str(j["info"].as_str().expect("info is a string")).unwrap();
            assert!(info.is_object(), "{info}");
            assert!(j["parameters"].is_object(), "{j}");
            let images = j["images"].as_array().expect("images");
            assert!(!a.generated.is_empty());
            let per_run: usize = a.generated.iter().map(|p| p.batch_size).sum();
            assert_eq!(images.len(), per_run, "{j}");
            for p in &a.generated {
                assert_rules(p, validate::DialectRules::A1111);
                assert_eq!(p.init_image.is_some(), path.ends_with("img2img"));
            }
        }
        400 | 413 | 422 => {
            assert!(a.generated.is_empty());
            for f in assert_native_error(&a) {
                assert!(!NATIVE_ONLY.contains(&f.as_str()), "{f}");
                if let Some(sent) = sent {
                    let top = f.split(['.', '[']).next().unwrap_or_default();
                    assert!(
                        sent.contains_key(top) || A1111_IMPLIED.contains(&top) || f.is_empty(),
                        "names {f:?}, not sent: {sent:?}"
                    );
                }
            }
        }
        s => panic!("{path}: {s}: {}", String::from_utf8_lossy(&a.body)),
    }
}

fn openai_body() -> impl Strategy<Value = Value> {
    let o = |s: BoxedStrategy<Value>| prop::option::weighted(0.5, s);
    let sizes = pick(&[
        "256x256",
        "512x512",
        "768x768",
        "320x256",
        "1024x1024",
        "auto",
        "512X512",
        "512x",
        "x512",
        "0x0",
        "-256x256",
        "256x256x256",
        " 256x256",
        "256 x 256",
        "18446744073709551616x256",
        "٣٢٠x256",
        "+256x+256",
    ]);
    (
        (
            prop::option::weighted(0.95, prompt()),
            o(field(js(&[1, 2, 8]), ints())),
            o(field(js(&["256x256", "512x512", "320x768", "auto"]), sizes)),
            o(field(js(&["b64_json", "url"]), pick(&["png"]))),
            o(pick(&["dall-e-2", "dall-e-3", "gpt-image-1"]).boxed()),
            o(field(js(&["png"]), pick(&["jpeg", "webp"]))),
            o(field(js(&["opaque", "auto"]), pick(&["transparent"]))),
        ),
        (
            o(field(
                js(&[false]),
                prop_oneof![Just(json!(true)), Just(json!("true"))],
            )),
            o(texts().boxed()),
            o(field(js(&[0, 1, 4294967295u64]), ints())),
            o(field(js(&[1, 20, 50]), ints())),
            o(field(js(&[0.0, 7.5, 30.0]), floats())),
            o(field(
                js(&["euler", "dpmpp_2m_karras", "unipc"]),
                pick(&["EULER"]),
            )),
            o(pick(&["hd", "standard"]).boxed()),
        ),
        (
            prop::option::weighted(0.05, ints()),
            prop::option::weighted(0.05, images()),
            prop::option::weighted(0.3, ("[a-z_]{1,12}", any_json())),
        ),
    )
        .prop_map(
            |(
                (p, n, size, rf, model, of, bg),
                (stream, neg, seed, steps, g, sch, q),
                (w, img, extra),
            )| {
                object(
                    vec![
                        ("prompt", p),
                        ("n", n),
                        ("size", size),
                        ("response_format", rf),
                        ("model", model),
                        ("output_format", of),
                        ("background", bg),
                        ("stream", stream),
                        ("negative_prompt", neg),
                        ("seed", seed),
                        ("steps", steps),
                        ("guidance_scale", g),
                        ("scheduler", sch),
                        ("quality", q),
                        ("width", w),
                        ("init_image", img),
                    ],
                    extra,
                )
            },
        )
}

fn check_openai_generations(body: Vec<u8>, sent: Option<&Map<String, Value>>) {
    let a = harness().send(
        "POST",
        "/v1/images/generations",
        Some("application/json"),
        body,
    );
    match a.status.as_u16() {
        200 => {
            let j = a.json();
            assert!(j["created"].is_u64(), "{j}");
            let data = j["data"].as_array().expect("data");
            assert_eq!(a.generated.len(), 1);
            let p = &a.generated[0];
            assert_native_rules(p);
            assert!(p.init_image.is_none());
            assert_eq!(data.len(), p.batch_size, "{j}");
            let url = sent.and_then(|s| s.get("response_format")) == Some(&json!("url"))
                || (sent
                    .and_then(|s| s.get("response_format"))
                    .is_none_or(Value::is_null)
                    && sent
                        .and_then(|s| s.get("model"))
                        .and_then(Value::as_str)
                        .is_some_and(|m| m.starts_with("dall-e")));
            for d in data {
                let keys: BTreeSet<&str> =
                    d.as_object().unwrap().keys().map(String::as_str).collect();
                let want = if url { "url" } else { "b64_json" };
                assert_eq!(keys, BTreeSet::from([want, "revised_prompt"]), "{j}");
            }
        }
        400 | 413 => {
            assert!(a.generated.is_empty());
            let param = assert_openai_error(&a);
            if let (Some(param), Some(sent)) = (param, sent) {
                assert!(
                    !["width", "height", "batch_size", "init_image", "mask_image"]
                        .contains(&param.as_str())
                        || sent.contains_key(&param),
                    "native name {param:?} leaked"
                );
                assert!(
                    sent.contains_key(&param)
                        || ["prompt", "size", "n", "loras"].contains(&param.as_str()),
                    "names {param:?}, not sent: {sent:?}"
                );
            }
        }
        s => panic!("{s}: {}", String::from_utf8_lossy(&a.body)),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn a1111_near_valid_bodies(v in a1111_body(), img2img in any::<bool>()) {
        let path = if img2img { "/sdapi/v1/img2img" } else { "/sdapi/v1/txt2img" };
        check_a1111(path, v.to_string().into_bytes(), v.as_object());
    }

    #[test]
    fn a1111_any_json_and_bytes(v in any_json(), bytes in prop::collection::vec(any::<u8>(), 0..128), img2img in any::<bool>()) {
        let path = if img2img { "/sdapi/v1/img2img" } else { "/sdapi/v1/txt2img" };
        check_a1111(path, v.to_string().into_bytes(), v.as_object());
        check_a1111(path, bytes, None);
    }

    #[test]
    fn openai_near_valid_bodies(v in openai_body()) {
        check_openai_generations(v.to_string().into_bytes(), v.as_object());
    }

    #[test]
    fn openai_any_json_and_bytes(v in any_json(), bytes in prop::collection::vec(any::<u8>(), 0..128)) {
        check_openai_generations(v.to_string().into_bytes(), v.as_object());
        check_openai_generations(bytes, None);
    }
}

/// The near-valid generators do reach the generator: most of the checks above are on accepted
/// requests, not only on rejections.
#[test]
fn near_valid_bodies_are_often_accepted() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let mut runner = TestRunner::deterministic();
    let (mut a1111, mut openai) = (0, 0);
    for _ in 0..200 {
        let v = a1111_body().new_tree(&mut runner).unwrap().current();
        let a = harness().send(
            "POST",
            "/sdapi/v1/txt2img",
            None,
            v.to_string().into_bytes(),
        );
        a1111 += usize::from(a.status == 200);
        let v = openai_body().new_tree(&mut runner).unwrap().current();
        let a = harness().send(
            "POST",
            "/v1/images/generations",
            None,
            v.to_string().into_bytes(),
        );
        openai += usize::from(a.status == 200);
    }
    eprintln!("near-valid bodies accepted: a1111 {a1111} of 200, openai {openai} of 200");
    assert!(
        a1111 >= 5 && openai >= 5,
        "accepted: a1111 {a1111}, openai {openai} of 200"
    );
}

/// Routes without images have the small body limit; routes with images the large one; A1111's
/// kept options are bounded.
#[test]
fn body_limits_follow_the_route() {
    let big = json!({"prompt": "a", "user": "x".repeat(crate::api::JSON_BODY_BYTES)}).to_string();
    let a = harness().send("POST", "/v1/images/generations", None, big.into_bytes());
    assert_eq!(a.status, 413, "{}", String::from_utf8_lossy(&a.body));
    assert_eq!(a.json()["error"]["code"], "payload_too_large");
    // The same size where images go: past the size check, to the fields' rules.
    let big = json!({"steps": 0, "styles": ["x".repeat(crate::api::JSON_BODY_BYTES)]}).to_string();
    let a = harness().send("POST", "/sdapi/v1/txt2img", None, big.into_bytes());
    assert_eq!(a.status, 422, "{}", String::from_utf8_lossy(&a.body));
    let big = json!({"k": "x".repeat(crate::api::JSON_BODY_BYTES)}).to_string();
    let a = harness().send("POST", "/sdapi/v1/options", None, big.into_bytes());
    assert_eq!(a.status, 413);
    // Options stay bounded however many requests add to them.
    let mut refused = 0;
    for i in 0..40 {
        let body = json!({format!("opt{i}"): "y".repeat(4000)}).to_string();
        let a = harness().send("POST", "/sdapi/v1/options", None, body.into_bytes());
        if a.status == 422 {
            assert_eq!(assert_native_error(&a), ["options"]);
            refused += 1;
        } else {
            assert_eq!(a.status, 200);
        }
    }
    assert!(refused > 0);
    let a = harness().send("GET", "/sdapi/v1/options", None, Vec::new());
    assert!(a.body.len() < crate::api::a1111::OPTIONS_MAX_BYTES + 4096);
}

/// Nesting far past serde_json's recursion limit is a clean 400 on every JSON route, in each
/// dialect's shape (the native parser has its own test in `fuzz_tests`).
#[test]
fn deep_json_is_refused_on_every_json_route() {
    for depth in [129usize, 100_000] {
        let body = format!("{{\"prompt\":{}1{}}}", "[".repeat(depth), "]".repeat(depth));
        for path in [
            "/sdapi/v1/txt2img",
            "/sdapi/v1/img2img",
            "/sdapi/v1/options",
            "/sdapi/v1/png-info",
            "/generate",
            "/jobs",
        ] {
            let a = harness().send(
                "POST",
                path,
                Some("application/json"),
                body.clone().into_bytes(),
            );
            assert_eq!(
                a.status,
                400,
                "{path}: {}",
                String::from_utf8_lossy(&a.body)
            );
            assert_native_error(&a);
        }
        let a = harness().send(
            "POST",
            "/v1/images/generations",
            Some("application/json"),
            body.into_bytes(),
        );
        assert_eq!(a.status, 400);
        assert_eq!(assert_openai_error(&a), None);
    }
}
