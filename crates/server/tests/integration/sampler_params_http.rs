//! A1111's sampler parameters over real HTTP on the real tiny model (`tiny-b`): the native
//! `sigma_churn` & co. and `negative_guidance_min_sigma` change the image, say so in the
//! metadata and the infotext, and are what A1111's `s_churn` (request or option) and
//! `s_min_uncond` give, pixel for pixel; Euler a takes no churn (A1111 passes it none); broken
//! values are 422s naming the field as sent. "Skip Early CFG" (`negative_guidance_skip_early`,
//! A1111's option `skip_early_cond`) likewise. The images themselves are checked against A1111's
//! code in the pipeline's tests (crates/pipeline/tests/integration/a1111_sampler_params.rs).

use crate::common;

use common::{decode_png, ok, post_json_to, Server};
use serde_json::{json, Value};

/// Every request here must run, not be another's cached answer.
fn tiny_server() -> Server {
    common::tiny_server("sampler-params", &[("RESPONSE_CACHE_MB", "0")])
}

fn native(scheduler: &str, extra: Value) -> Value {
    let mut body = json!({"prompt": "a lighthouse", "negative_prompt": "blurry", "seed": 5,
                          "steps": 4, "width": 256, "height": 256, "guidance_scale": 6.0,
                          "scheduler": scheduler});
    body.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    body
}

fn a1111(sampler: &str, extra: Value) -> Value {
    let mut body = json!({"prompt": "a lighthouse", "negative_prompt": "blurry", "seed": 5,
                          "steps": 4, "width": 256, "height": 256, "cfg_scale": 6.0,
                          "sampler_name": sampler, "scheduler": "Automatic"});
    body.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    body
}

/// A native answer's pixels, metadata and infotext.
fn generate(s: &Server, body: &Value) -> (Vec<u8>, Value, String) {
    let r = ok(&s.post_json(body));
    let (_, _, pixels, text) = decode_png(r["image_base64"].as_str().unwrap());
    (pixels, r["metadata"].clone(), text.unwrap())
}

fn txt2img(s: &Server, body: &Value) -> Vec<u8> {
    let r = ok(&post_json_to(s.addr, "/sdapi/v1/txt2img", body));
    decode_png(r["images"][0].as_str().unwrap()).2
}

#[test]
fn churn_and_negative_guidance_run_as_a1111_s_fields() {
    let s = tiny_server();
    let (plain, meta, _) = generate(&s, &native("euler", json!({})));
    assert!(meta.get("sigma_churn").is_none(), "{meta}");

    let churn = json!({"sigma_churn": 3.0, "sigma_tmax": 10.0, "sigma_noise": 0.9});
    let (churned, meta, text) = generate(&s, &native("euler", churn));
    assert!(churned != plain, "the churn changed nothing");
    assert_eq!(
        (
            &meta["sigma_churn"],
            &meta["sigma_tmax"],
            &meta["sigma_noise"]
        ),
        (&json!(3.0), &json!(10.0), &json!(0.9))
    );
    assert!(
        text.contains(", Sigma churn: 3.0, Sigma tmax: 10.0, Sigma noise: 0.9"),
        "{text}"
    );
    // A1111's request fields, and its options (override_settings) over the request's.
    let fields = json!({"s_churn": 3, "s_tmax": 10, "s_noise": 0.9});
    assert!(txt2img(&s, &a1111("Euler", fields)) == churned);
    let options = json!({"s_churn": 50, "override_settings":
                         {"s_churn": 3, "s_tmax": 10, "s_noise": 0.9}});
    assert!(txt2img(&s, &a1111("Euler", options)) == churned);

    // Euler a takes none, natively and in A1111.
    let (euler_a, _, _) = generate(&s, &native("euler_a", json!({})));
    let (with, meta, text) = generate(&s, &native("euler_a", json!({"sigma_noise": 0.5})));
    assert!(
        with == euler_a && meta.get("sigma_noise").is_none(),
        "{meta}"
    );
    assert!(!text.contains("Sigma noise"), "{text}");
    assert!(txt2img(&s, &a1111("Euler a", json!({"s_noise": 0.5}))) == euler_a);

    // The negative guidance minimum sigma: every other evaluation below it runs unguided.
    let ngms = json!({"negative_guidance_min_sigma": 15.0});
    let (skipped, meta, text) = generate(&s, &native("euler", ngms));
    assert!(
        skipped != plain,
        "skipping the negative prompt changed nothing"
    );
    assert_eq!(meta["negative_guidance_min_sigma"], json!(15.0));
    assert!(text.contains(", NGMS: 15.0"), "{text}");
    assert!(txt2img(&s, &a1111("Euler", json!({"s_min_uncond": 15}))) == skipped);
}

#[test]
fn broken_values_name_the_field_as_sent() {
    let s = tiny_server();
    let r = s.post_json(&native("euler", json!({"sigma_churn": 101})));
    assert_eq!(r.status, 422, "{}", r.text());
    assert_eq!(r.broken_fields(), vec!["sigma_churn"]);
    let r = s.post_json(&native(
        "euler",
        json!({"negative_guidance_all_steps": "yes"}),
    ));
    assert_eq!(r.broken_fields(), vec!["negative_guidance_all_steps"]);
    let r = post_json_to(
        s.addr,
        "/sdapi/v1/txt2img",
        &a1111("Euler", json!({"s_tmax": -1})),
    );
    assert_eq!(r.status, 422, "{}", r.text());
    assert_eq!(r.broken_fields(), vec!["s_tmax"]);
    let r = post_json_to(
        s.addr,
        "/sdapi/v1/txt2img",
        &a1111("Euler", json!({"override_settings": {"s_min_uncond": 16}})),
    );
    assert_eq!(r.broken_fields(), vec!["s_min_uncond"]);
}

/// A1111's "Skip Early CFG": the native field, A1111's option (`override_settings` or posted
/// to `/sdapi/v1/options`), the same pixels, the infotext entry in both, and 422s outside 0..=1.
#[test]
fn skip_early_cfg_runs_as_a1111_s_option() {
    let s = tiny_server();
    let (plain, _, _) = generate(&s, &native("euler", json!({})));
    let early = json!({"negative_guidance_skip_early": 0.5});
    let (skipped, meta, text) = generate(&s, &native("euler", early));
    assert!(
        skipped != plain,
        "skipping the negative prompt changed nothing"
    );
    assert_eq!(meta["negative_guidance_skip_early"], json!(0.5));
    assert!(text.contains(", Skip Early CFG: 0.5"), "{text}");

    let body = a1111(
        "Euler",
        json!({"override_settings": {"skip_early_cond": 0.5}}),
    );
    let r = ok(&post_json_to(s.addr, "/sdapi/v1/txt2img", &body));
    assert!(decode_png(r["images"][0].as_str().unwrap()).2 == skipped);
    let info: Value = serde_json::from_str(r["info"].as_str().unwrap()).unwrap();
    let infotext = info["infotexts"][0].as_str().unwrap();
    assert!(infotext.contains(", Skip Early CFG: 0.5"), "{infotext}");

    let set = |v: Value| post_json_to(s.addr, "/sdapi/v1/options", &json!({"skip_early_cond": v}));
    assert_eq!(set(json!(0.5)).status, 200);
    assert!(txt2img(&s, &a1111("Euler", json!({}))) == skipped);
    let r = set(json!(2));
    assert_eq!(r.status, 422, "{}", r.text());
    assert_eq!(r.broken_fields(), vec!["skip_early_cond"]);
    assert_eq!(set(json!(0.0)).status, 200);
    assert!(txt2img(&s, &a1111("Euler", json!({}))) == plain);

    let r = s.post_json(&native(
        "euler",
        json!({"negative_guidance_skip_early": 1.5}),
    ));
    assert_eq!(r.status, 422, "{}", r.text());
    assert_eq!(r.broken_fields(), vec!["negative_guidance_skip_early"]);
    let body = a1111(
        "Euler",
        json!({"override_settings": {"skip_early_cond": -0.1}}),
    );
    let r = post_json_to(s.addr, "/sdapi/v1/txt2img", &body);
    assert_eq!(r.broken_fields(), vec!["override_settings.skip_early_cond"]);
}

/// A1111 writes `NGMS` only where a call skipped the negative prompt by it: not where the sigmas
/// never fall below it, nor where "Skip Early CFG" skipped every call below it (its own entry
/// stays: the first call always skips early). The native PNG's text and A1111's infotext alike.
#[test]
fn ngms_is_written_only_where_it_skipped() {
    let s = tiny_server();
    let text_of = |body: &Value| generate(&s, body).2;
    // 4 steps on tiny-b: the smallest sigma is SD's, above 0.01.
    let unreached = json!({"negative_guidance_min_sigma": 0.01});
    let text = text_of(&native("euler", unreached));
    assert!(!text.contains("NGMS"), "{text}");
    let covered = json!({"negative_guidance_min_sigma": 15.0, "negative_guidance_skip_early": 1.0});
    let text = text_of(&native("euler", covered));
    assert!(
        text.contains(", Skip Early CFG: 1.0") && !text.contains("NGMS"),
        "{text}"
    );
    // 0.25 of 4 skips calls 0 and 1 early; call 3 is odd and below 15.
    let after = json!({"negative_guidance_min_sigma": 15.0, "negative_guidance_skip_early": 0.25});
    let text = text_of(&native("euler", after));
    assert!(
        text.contains(", Skip Early CFG: 0.25, NGMS: 15.0"),
        "{text}"
    );

    let infotext = |body: Value| {
        let r = ok(&post_json_to(s.addr, "/sdapi/v1/txt2img", &body));
        let info: Value = serde_json::from_str(r["info"].as_str().unwrap()).unwrap();
        info["infotexts"][0].as_str().unwrap().to_string()
    };
    let text = infotext(a1111("Euler", json!({"s_min_uncond": 0.01})));
    assert!(!text.contains("NGMS"), "{text}");
    let covered = json!({"s_min_uncond": 15, "override_settings": {"skip_early_cond": 1.0}});
    let text = infotext(a1111("Euler", covered));
    assert!(
        text.contains(", Skip Early CFG: 1.0") && !text.contains("NGMS"),
        "{text}"
    );
    let text = infotext(a1111("Euler", json!({"s_min_uncond": 15})));
    assert!(text.contains(", NGMS: 15.0"), "{text}");
}
