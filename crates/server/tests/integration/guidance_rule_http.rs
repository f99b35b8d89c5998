//! `guidance_rule` over real HTTP on the real tiny model (`tiny-b`): below a scale of 1 A1111's
//! rule runs the negative prompt (`uncond + (cond - uncond) * scale`) and diffusers' does not;
//! A1111's txt2img (and its hires pass) runs A1111's rule, pixel for pixel the native request
//! with `guidance_rule: a1111`; at exactly 1 both rules make the prompt's image. The images
//! themselves are checked against A1111's code in the pipeline's tests
//! (crates/pipeline/tests/integration/a1111_cfg_below_one.rs).

use crate::common;

use common::{decode_png, ok, post_json_to, Server};
use serde_json::{json, Value};

/// Every request here must run, not be another's cached answer.
fn tiny_server() -> Server {
    common::tiny_server("guidance-rule", &[("RESPONSE_CACHE_MB", "0")])
}

fn native(scale: f64, extra: Value) -> Value {
    let mut body = json!({"prompt": "a lighthouse", "negative_prompt": "blurry", "seed": 5,
                          "steps": 4, "width": 256, "height": 256, "guidance_scale": scale,
                          "scheduler": "euler_a", "prompt_syntax": "a1111"});
    body.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    body
}

fn a1111(scale: f64, extra: Value) -> Value {
    let mut body = json!({"prompt": "a lighthouse", "negative_prompt": "blurry", "seed": 5,
                          "steps": 4, "width": 256, "height": 256, "cfg_scale": scale,
                          "sampler_name": "Euler a", "scheduler": "Automatic"});
    body.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    body
}

/// A native answer's pixels and metadata.
fn generate(s: &Server, body: &Value) -> (Vec<u8>, Value) {
    let r = ok(&s.post_json(body));
    let (_, _, pixels, _) = decode_png(r["image_base64"].as_str().unwrap());
    (pixels, r["metadata"].clone())
}

fn txt2img(s: &Server, body: &Value) -> Vec<u8> {
    let r = ok(&post_json_to(s.addr, "/sdapi/v1/txt2img", body));
    decode_png(r["images"][0].as_str().unwrap()).2
}

#[test]
fn a1111_s_txt2img_guides_below_1_as_the_native_a1111_rule() {
    let s = tiny_server();
    let a1111_rule = json!({"guidance_rule": "a1111"});
    let (prompt_alone, meta) = generate(&s, &native(0.5, json!({})));
    assert!(meta.get("guidance_rule").is_none(), "{meta}");
    let (half, meta) = generate(&s, &native(0.5, a1111_rule.clone()));
    assert_eq!(meta["guidance_rule"], "a1111");
    assert!(half != prompt_alone, "the negative prompt changed nothing");
    let (zero, _) = generate(&s, &native(0.0, a1111_rule.clone()));
    assert!(zero != half && zero != prompt_alone);
    assert!(txt2img(&s, &a1111(0.5, json!({}))) == half);
    assert!(txt2img(&s, &a1111(0.0, json!({}))) == zero);
    // At exactly 1 both rules are the prompt's prediction, which diffusers' rule gives at 0.5.
    assert!(generate(&s, &native(1.0, a1111_rule.clone())).0 == prompt_alone);
    assert!(txt2img(&s, &a1111(1.0, json!({}))) == prompt_alone);

    // The hires pass guides as the first.
    let hires = json!({"scale": 1.5, "upscaler": "Lanczos"});
    let mut body = common::hires::native(hires);
    body["guidance_scale"] = json!(0.5);
    body["guidance_rule"] = json!("a1111");
    let (hr, _) = generate(&s, &body);
    body["guidance_rule"] = json!("diffusers");
    assert!(generate(&s, &body).0 != hr);
    let mut body = common::hires::a1111(json!({"hr_scale": 1.5, "hr_upscaler": "Lanczos"}));
    body["cfg_scale"] = json!(0.5);
    assert!(txt2img(&s, &body) == hr);
}

#[test]
fn an_unknown_rule_is_a_422_naming_it() {
    let s = tiny_server();
    let r = s.post_json(&native(0.5, json!({"guidance_rule": "comfy"})));
    assert_eq!(r.status, 422, "{}", r.text());
    assert_eq!(r.broken_fields(), vec!["guidance_rule"]);
}
