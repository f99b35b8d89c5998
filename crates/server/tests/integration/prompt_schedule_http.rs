//! A1111's prompt editing, alternation and AND over real HTTP on the real pipeline (tiny model
//! `tiny-b`): the A1111 dialect and the native API give the same image for such a prompt, not
//! the image of its first text; the infotext and metadata keep the prompt as written; a prompt
//! A1111's grammar refuses is read as written; past the caps it is a 422 naming `prompt`. The
//! images themselves are checked against diffusers in the pipeline's tests/integration/prompt_edit_images.rs.

use crate::common;

use common::{decode_png, post_json_to, Server};
use serde_json::{json, Value};

fn start() -> Server {
    common::tiny_server("prompt-schedule", &[])
}

const PROMPT: &str = "a [lighthouse:castle:0.5] at [dawn|dusk] AND stormy sea :0.7";

fn native(s: &Server, prompt: &str) -> (Vec<u8>, String, Value) {
    let body = json!({"prompt": prompt, "negative_prompt": "[blurry:grainy:2]", "steps": 4,
                      "width": 256, "height": 256, "guidance_scale": 5.0,
                      "scheduler": "euler", "seed": 11});
    let r = s.post_json(&body);
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    let (_, _, pixels, text) = decode_png(v["image_base64"].as_str().unwrap());
    (pixels, text.unwrap(), v["metadata"].clone())
}

#[test]
fn scheduled_prompts_over_both_dialects() {
    let s = start();
    let (scheduled, text, meta) = native(&s, PROMPT);
    assert_eq!(meta["prompt"], json!(PROMPT));
    assert!(text.starts_with(PROMPT), "{text}");
    let (first_text, _, _) = native(&s, "a lighthouse at dawn");
    assert!(
        scheduled != first_text,
        "the schedule and AND change the image"
    );

    let body = json!({"prompt": PROMPT, "negative_prompt": "[blurry:grainy:2]", "steps": 4,
                      "width": 256, "height": 256, "cfg_scale": 5.0, "sampler_name": "Euler",
                      "seed": 11});
    let r = post_json_to(s.addr, "/sdapi/v1/txt2img", &body);
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    let info: Value = serde_json::from_str(v["info"].as_str().unwrap()).unwrap();
    let (_, _, pixels, png_text) = decode_png(v["images"][0].as_str().unwrap());
    assert!(
        pixels == scheduled,
        "A1111's dialect gives the native image"
    );
    assert_eq!(info["prompt"], json!(PROMPT));
    let infotext = info["infotexts"][0].as_str().unwrap();
    assert!(infotext.starts_with(PROMPT), "{infotext}");
    assert!(png_text.unwrap().starts_with(PROMPT));

    // A1111's grammar refuses a `|` outside brackets: the prompt is read as written (200).
    let (_, text, _) = native(&s, "a lighthouse | [castle:0.5]");
    assert!(text.starts_with("a lighthouse | [castle:0.5]"), "{text}");
}

#[test]
fn caps_are_422_naming_the_prompt() {
    let s = start();
    let parts = ["a"; 9].join(" AND ");
    let r = s.post_json(&json!({"prompt": parts, "steps": 2, "width": 256, "height": 256}));
    assert_eq!(r.status, 422, "{}", r.text());
    let v = r.json();
    assert_eq!(v["fields"][0]["field"], json!("prompt"), "{v}");
    assert!(v["details"].as_str().unwrap().contains("AND parts"), "{v}");
    let r = post_json_to(
        s.addr,
        "/sdapi/v1/txt2img",
        &json!({"prompt": format!("a AND b :{}", "9".repeat(40)), "steps": 2}),
    );
    assert_eq!(r.status, 422, "{}", r.text());
    assert!(r.text().contains("finite float32"), "{}", r.text());
}

/// 4 x 9 alternations: a new text at each of 36 sampler evaluations.
const MANY_TEXTS: &str = "[a|b|c|d] [e|f|g|h|i|j|k|l|m]";

#[test]
fn scheduled_texts_are_counted_with_the_model_s_own_scheduler() {
    let s = start();
    // No scheduler named: tiny-b's own DDIM counts 16 evaluations (17 texts with the negative
    // prompt's), not the 32 of a second-order sampler (33, past the cap of 32).
    let body = json!({"prompt": MANY_TEXTS, "steps": 16, "width": 256, "height": 256, "seed": 1});
    let r = s.post_json(&body);
    assert_eq!(r.status, 200, "{}", r.text());
    // Heun runs 2 per step: 33 texts, before queueing.
    let mut heun = body.clone();
    heun["scheduler"] = json!("heun");
    let r = post_json_to(s.addr, "/jobs", &heun);
    assert_eq!(r.status, 422, "{}", r.text());
    let v = r.json();
    assert_eq!(v["fields"][0]["field"], json!("prompt"), "{v}");
    assert!(
        v["details"].as_str().unwrap().contains("33 distinct texts"),
        "{v}"
    );
}

#[test]
fn and_parts_on_a_distilled_model_are_422_before_queueing() {
    let lcm = common::tiny_b().with_file_name("tiny-lcm");
    let s = common::tiny_server(
        "prompt-schedule-lcm",
        &[("MODEL_ID", lcm.to_str().unwrap())],
    );
    let field_of = |path: &str, body: Value| {
        let r = post_json_to(s.addr, path, &body);
        assert_eq!(r.status, 422, "{path}: {}", r.text());
        let v = r.json();
        assert!(
            v["details"]
                .as_str()
                .unwrap()
                .contains("guidance-distilled"),
            "{v}"
        );
        v["fields"][0]["field"].as_str().unwrap().to_string()
    };
    // Submitted as a job, it was accepted and then failed naming `request`.
    let job = json!({"prompt": "a cat AND a dog", "steps": 4, "width": 256, "height": 256});
    assert_eq!(field_of("/jobs", job), "prompt");
    let native_hires = json!({"prompt": "a cat", "steps": 4, "width": 256, "height": 256,
                              "hires": {"scale": 2, "prompt": "a cat :0.5"}});
    assert_eq!(field_of("/jobs", native_hires), "hires.prompt");
    let a1111 = json!({"prompt": "a cat", "steps": 4, "width": 256, "height": 256,
                       "enable_hr": true, "hr_scale": 2, "hr_prompt": "a cat AND a dog"});
    assert_eq!(field_of("/sdapi/v1/txt2img", a1111), "hr_prompt");
    // Without AND parts the model runs.
    let r = s.post_json(&json!({"prompt": "a cat", "steps": 2, "width": 256, "height": 256}));
    assert_eq!(r.status, 200, "{}", r.text());
}
