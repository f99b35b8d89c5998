//! The native `hires` object of `POST /generate` and `POST /jobs` over real HTTP on the real
//! tiny model (`tiny-b`, 256 -> 384): the same second pass as A1111's `enable_hr` (pixel for
//! pixel), the final size in `metadata.hires` and in the PNG, and its rules as 422s naming
//! `hires.<key>`.

use crate::common;

use std::path::PathBuf;

use common::hires::{a1111, native};
use common::{decode_png, ok, post_json_to, Server};
use serde_json::{json, Value};

/// Every request here must run: the A1111 one must not be the native one's cached answer.
fn tiny_server() -> Server {
    common::tiny_server("hires", &[("RESPONSE_CACHE_MB", "0")])
}

#[test]
fn native_hires_is_a1111_s_second_pass_and_says_its_size() {
    let s = tiny_server();
    for (hires, hr) in [
        (
            json!({"width": 384, "height": 384, "steps": 3, "strength": 0.7}),
            json!({"hr_resize_x": 384, "hr_resize_y": 384, "hr_second_pass_steps": 3,
                   "denoising_strength": 0.7}),
        ),
        (
            json!({"scale": 1.5, "upscaler": "Lanczos"}),
            json!({"hr_scale": 1.5, "hr_upscaler": "Lanczos"}),
        ),
    ] {
        let body = ok(&s.post_json(&native(hires.clone())));
        let (w, h, pixels, text) = decode_png(body["image_base64"].as_str().unwrap());
        assert_eq!((w, h), (384, 384), "{hires}");
        let m = &body["metadata"];
        // The first pass's size, and the second pass's: the image's, which image_width and
        // image_height name.
        assert_eq!((&m["width"], &m["height"]), (&json!(256), &json!(256)));
        assert_eq!(
            (&m["hires"]["width"], &m["hires"]["height"]),
            (&json!(w), &json!(h))
        );
        assert_eq!(
            (&m["image_width"], &m["image_height"]),
            (&json!(w), &json!(h)),
            "{m}"
        );
        let a = ok(&post_json_to(
            s.addr,
            "/sdapi/v1/txt2img",
            &a1111(hr.clone()),
        ));
        let (aw, ah, a_pixels, _) = decode_png(a["images"][0].as_str().unwrap());
        assert_eq!((aw, ah), (w, h));
        assert!(pixels == a_pixels, "native {hires} and A1111 {hr} differ");
        // The PNG's parameters carry the pass (A1111's infotext keys).
        let text = text.unwrap();
        assert!(text.contains("Denoising strength:"), "{text}");
        if hires.get("scale").is_some() {
            assert_eq!(m["hires"]["upscaler"], "Lanczos");
            assert_eq!(
                (&m["hires"]["steps"], &m["hires"]["strength"]),
                (&json!(2), &json!(0.75))
            );
            assert!(text.contains("Hires upscale: 1.5"), "{text}");
        } else {
            assert_eq!(m["hires"]["upscaler"], "Latent");
            assert_eq!(
                (&m["hires"]["steps"], &m["hires"]["strength"]),
                (&json!(3), &json!(0.7))
            );
            assert!(text.contains("Hires resize: 384x384"), "{text}");
        }
    }

    // The pass's own scheduler and prompts: A1111's hr_sampler_name ("DPM++ 2M": its automatic
    // schedule is Karras), hr_prompt, hr_negative_prompt; and they change the image.
    let same = json!({"scale": 1.5, "steps": 3, "strength": 0.7});
    let mut own = same.clone();
    own["scheduler"] = json!("dpmpp_2m_karras");
    own["prompt"] = json!("a lighthouse, (sharp:1.2)");
    own["negative_prompt"] = json!("fog");
    let body = ok(&s.post_json(&native(own.clone())));
    let (_, _, pixels, text) = decode_png(body["image_base64"].as_str().unwrap());
    let a = ok(&post_json_to(
        s.addr,
        "/sdapi/v1/txt2img",
        &a1111(
            json!({"hr_scale": 1.5, "hr_second_pass_steps": 3, "denoising_strength": 0.7,
                      "hr_sampler_name": "DPM++ 2M", "hr_prompt": "a lighthouse, (sharp:1.2)",
                      "hr_negative_prompt": "fog"}),
        ),
    ));
    assert!(
        pixels == decode_png(a["images"][0].as_str().unwrap()).2,
        "native {own} and A1111 differ"
    );
    let m = &body["metadata"]["hires"];
    assert_eq!(
        (
            &m["scheduler"],
            &m["schedule"],
            &m["prompt"],
            &m["negative_prompt"]
        ),
        (
            &json!("dpmpp_2m_karras"),
            &json!("karras"),
            &json!("a lighthouse, (sharp:1.2)"),
            &json!("fog")
        ),
        "{m}"
    );
    let text = text.unwrap();
    assert!(
        text.contains("Hires sampler: DPM++ 2M, Hires schedule type: Karras"),
        "{text}"
    );
    let plain = ok(&s.post_json(&native(same)));
    assert!(
        pixels != decode_png(plain["image_base64"].as_str().unwrap()).2,
        "the overrides changed nothing"
    );
    // Without a scheduler of its own the pass runs the first pass's (`metadata.schedule`).
    let m = &plain["metadata"];
    assert_eq!(
        (
            &m["hires"]["scheduler"],
            &m["hires"]["schedule"],
            &m["schedule"]
        ),
        (&Value::Null, &Value::Null, &json!("uniform")),
        "{m}"
    );
    // A1111's hr_scheduler alone: the first pass's sampler on another schedule; its job's
    // result says which.
    ok(&post_json_to(
        s.addr,
        "/sdapi/v1/txt2img",
        &a1111(
            json!({"hr_scale": 1.5, "hr_second_pass_steps": 3, "denoising_strength": 0.7,
                      "hr_scheduler": "Exponential"}),
        ),
    ));
    let jobs = s.get("/jobs").json();
    let job = jobs["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["request"]["hires"]["schedule"] == "exponential")
        .unwrap_or_else(|| panic!("no job ran the exponential schedule: {jobs}"));
    // Its record says the size was asked as a scale (a client asking again asks the same).
    assert_eq!(job["request"]["hires"]["scale"], 1.5, "{job}");
    let m = &job["result"]["metadata"]["hires"];
    assert_eq!(
        (&m["scheduler"], &m["schedule"]),
        (&json!("euler"), &json!("exponential")),
        "{m}"
    );

    // Without hires: no second pass, `metadata.hires` null, the image the first pass's size.
    let body = ok(&s.post_json(&native(Value::Null)));
    assert_eq!(decode_png(body["image_base64"].as_str().unwrap()).0, 256);
    let m = &body["metadata"];
    assert!(m["hires"].is_null(), "{m}");
    assert_eq!(
        (&m["image_width"], &m["image_height"]),
        (&json!(256), &json!(256))
    );

    // POST /jobs: the same request, its record and result.
    let job = common::job_to_end(
        &s,
        &native(json!({"width": 320, "height": 384, "upscaler": "Nearest"})),
    );
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["request"]["hires"]["width"], 320, "{job}");
    assert!(
        job["request"]["hires"]["scale"].is_null(),
        "asked by size: {job}"
    );
    let result = &job["result"];
    let (w, h, _, _) = decode_png(result["image_base64"].as_str().unwrap());
    assert_eq!((w, h), (320, 384));
    assert_eq!(result["metadata"]["hires"]["upscaler"], "Nearest");
    assert_eq!(
        (
            &result["metadata"]["image_width"],
            &result["metadata"]["image_height"]
        ),
        (&json!(320), &json!(384))
    );
    assert_eq!(
        (
            &result["metadata"]["hires"]["width"],
            &result["metadata"]["hires"]["height"]
        ),
        (&json!(320), &json!(384))
    );
}

#[test]
fn native_hires_rules_are_422s_naming_the_key() {
    let s = tiny_server();
    for (hires, field, says) in [
        (
            json!({"width": 400, "height": 384}),
            "hires.width",
            "multiple of 64",
        ),
        (json!({"width": 384, "height": 832}), "hires.height", "768"),
        (json!({"width": 384}), "hires.height", "required"),
        (
            json!({"scale": 1.5, "width": 384}),
            "hires.scale",
            "not both",
        ),
        // 256 * 1.3 = 332.8: no rounding, a 422 instead.
        (json!({"scale": 1.3}), "hires.scale", "332.8"),
        (
            json!({"scale": 1.5, "upscaler": "ESRGAN_4x"}),
            "hires.upscaler",
            "Lanczos",
        ),
        (json!({"scale": 1.5, "steps": 51}), "hires.steps", "50"),
        // A1111's rule (`native` sends `step_rule: a1111`) stretches the schedule.
        (
            json!({"scale": 1.5, "steps": 1, "strength": 0.0}),
            "hires.strength",
            "above 0",
        ),
        (
            json!({"scale": 1.5, "denoise": 0.5}),
            "hires.denoise",
            "unknown",
        ),
        (
            json!({"scale": 1.5, "scheduler": "DPM++ 2M"}),
            "hires.scheduler",
            "dpmpp_2m",
        ),
        (
            json!({"scale": 1.5, "prompt": "x <lora:other:1>"}),
            "hires.prompt",
            "<lora:",
        ),
        (
            json!({"scale": 1.5, "negative_prompt": 7}),
            "hires.negative_prompt",
            "string",
        ),
        (json!("yes"), "hires", "object"),
    ] {
        let r = s.post_json(&native(hires.clone()));
        assert_eq!(r.broken_fields(), [field], "{hires}");
        let details = r.json()["details"].as_str().unwrap().to_string();
        assert!(details.contains(says), "{hires}: {details}");
    }
    // Every broken field at once, the first pass's and the second's.
    let mut body = native(json!({"scale": 1.5, "steps": 99}));
    body["steps"] = json!(0);
    assert_eq!(s.post_json(&body).broken_fields(), ["steps", "hires.steps"]);
}

/// `sdserve generate --hires-*`: the flags are the native `hires` object (the same PNG as
/// `/generate` with it), and its rules refuse a bad flag before the model loads, naming its flag.
#[test]
fn the_cli_writes_the_hires_pass_of_the_native_object() {
    let dir = std::env::temp_dir().join(format!("sdserve-cli-hires-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("out.png");
    let tiny_b =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../pipeline/tests/fixtures/tiny-b");
    let cli = |hires: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_sdserve"))
            .args(["generate", "--device", "cpu", "--model"])
            .arg(&tiny_b)
            .args(["--prompt", "a lighthouse", "--negative-prompt", "blurry"])
            .args([
                "--seed", "11", "--steps", "2", "--width", "256", "--height", "256",
            ])
            .args(["--guidance-scale", "6", "--scheduler", "euler"])
            // As `native` (A1111's step rule).
            .args(["--step-rule", "a1111"])
            .args(hires)
            .arg("-o")
            .arg(&out)
            .env_clear()
            .env("MODEL_CACHE_DIR", dir.join("cache"))
            .output()
            .unwrap()
    };
    let run = cli(&[
        "--hires-width",
        "320",
        "--hires-height",
        "384",
        "--hires-upscaler",
        "Lanczos",
        "--hires-steps",
        "3",
        "--hires-strength",
        "0.7",
        "--hires-scheduler",
        "dpmpp_2m_karras",
        "--hires-prompt",
        "a lighthouse, sharp",
        "--hires-negative-prompt",
        "fog",
    ]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stderr}");
    assert!(stderr.contains("(320x384), seed 11"), "{stderr}");
    let (w, h, pixels, text) = decode_png(&base64::Engine::encode(
        &base64::engine::general_purpose::STANDARD,
        std::fs::read(&out).unwrap(),
    ));
    assert_eq!((w, h), (320, 384));
    let text = text.unwrap();
    assert!(text.contains("Hires resize: 320x384"), "{text}");

    let s = tiny_server();
    let body = ok(&s.post_json(&native(json!({
        "width": 320, "height": 384, "upscaler": "Lanczos", "steps": 3, "strength": 0.7,
        "scheduler": "dpmpp_2m_karras", "prompt": "a lighthouse, sharp", "negative_prompt": "fog"
    }))));
    let (_, _, served, _) = decode_png(body["image_base64"].as_str().unwrap());
    assert!(pixels == served, "the CLI's hires image is not /generate's");

    for (flags, key) in [
        (&["--hires-scale", "1.3"][..], "--hires-scale: "),
        (&["--hires-width", "384"][..], "--hires-height: "),
        (
            &["--hires-scale", "1.5", "--hires-upscaler", "ESRGAN_4x"][..],
            "--hires-upscaler: ",
        ),
    ] {
        let refused = cli(flags);
        let stderr = String::from_utf8_lossy(&refused.stderr);
        assert!(!refused.status.success(), "{flags:?}");
        assert!(stderr.contains(key), "{flags:?}: {stderr}");
        assert!(
            !stderr.contains("loading"),
            "{flags:?} loaded the model: {stderr}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// OpenAI's `images/generations` takes the native `hires` object as one of our extras: listed in
/// its schema, the same second pass as `/generate` (pixel for pixel), its rules 400s in OpenAI's
/// shape whose `param` names `hires.<key>`.
#[test]
fn openai_generations_take_the_native_hires_object() {
    let s = tiny_server();
    let doc = s.get("/openapi.json").json();
    let listed =
        &doc["components"]["schemas"]["openai.ImageGenerationRequest"]["properties"]["hires"];
    assert!(
        listed
            .to_string()
            .contains("#/components/schemas/HiresRequest"),
        "the OpenAI schema does not list hires: {listed}"
    );

    let hires = json!({"scale": 1.5, "upscaler": "Lanczos", "steps": 3, "strength": 0.7,
                       "scheduler": "dpmpp_2m", "prompt": "a lighthouse, (sharp:1.2)",
                       "negative_prompt": "fog"});
    let openai = |hires: Value| {
        post_json_to(
            s.addr,
            "/v1/images/generations",
            &json!({"prompt": "a lighthouse", "size": "256x256", "response_format": "b64_json",
                    "negative_prompt": "blurry", "seed": 11, "steps": 2, "guidance_scale": 6.0,
                    "scheduler": "euler", "hires": hires, "step_rule": "a1111"}),
        )
    };
    let r = openai(hires.clone());
    assert_eq!(r.status, 200, "{}", r.text());
    let (w, h, pixels, text) = decode_png(r.json()["data"][0]["b64_json"].as_str().unwrap());
    // `size` is the first pass's; the image is the second pass's.
    assert_eq!((w, h), (384, 384));
    assert!(text.unwrap().contains("Hires upscale: 1.5"));
    let native_body = ok(&s.post_json(&native(hires)));
    assert!(
        pixels == decode_png(native_body["image_base64"].as_str().unwrap()).2,
        "OpenAI's hires image is not /generate's"
    );

    for (hires, param, says) in [
        (json!({"scale": 1.3}), "hires.scale", "332.8"),
        (json!({"width": 384}), "hires.height", "required"),
        (json!({"scale": 1.5, "sacle": 2}), "hires.sacle", "unknown"),
        (
            json!({"scale": 1.5, "scheduler": "DPM++ 2M"}),
            "hires.scheduler",
            "dpmpp_2m",
        ),
        (json!("yes"), "hires", "object"),
    ] {
        let r = openai(hires.clone());
        assert_eq!(r.status, 400, "{hires}: {}", r.text());
        let e = &r.json()["error"];
        assert_eq!(
            (&e["param"], &e["type"], &e["code"]),
            (
                &json!(param),
                &json!("invalid_request_error"),
                &json!("validation_error")
            ),
            "{hires}: {e}"
        );
        assert!(e["message"].as_str().unwrap().contains(says), "{e}");
        assert_eq!(r.header("x-should-retry"), Some("false"), "{hires}");
    }
}

#[test]
fn a1111_hr_scheduler_runs_the_first_pass_sampler_on_another_schedule() {
    let s = tiny_server();
    // First pass Euler / Automatic; the pass names the same sampler on another schedule type.
    let run = |extra: Value| {
        let mut hr = json!({"hr_scale": 1.5, "hr_second_pass_steps": 3, "denoising_strength": 0.7});
        for (k, v) in extra.as_object().unwrap() {
            hr[k] = v.clone();
        }
        let v = ok(&post_json_to(s.addr, "/sdapi/v1/txt2img", &a1111(hr)));
        let info: Value = serde_json::from_str(v["info"].as_str().unwrap()).unwrap();
        (
            decode_png(v["images"][0].as_str().unwrap()).2,
            info["infotexts"][0].as_str().unwrap().to_string(),
        )
    };
    let (first_schedule, _) = run(json!({}));
    let (exponential, text) =
        run(json!({"hr_sampler_name": "Euler", "hr_scheduler": "Exponential"}));
    assert!(
        exponential != first_schedule,
        "hr_scheduler fell back to the first pass's"
    );
    assert!(text.contains("Hires schedule type: Exponential"), "{text}");
    assert!(!text.contains("Hires sampler"), "{text}");
    // Karras: the native pass of its own on euler_karras, pixel for pixel.
    let (karras, text) = run(json!({"hr_scheduler": "Karras"}));
    assert!(text.contains("Hires schedule type: Karras"), "{text}");
    let body = ok(&s.post_json(&native(
        json!({"scale": 1.5, "steps": 3, "strength": 0.7, "scheduler": "euler_karras"}),
    )));
    assert!(karras == decode_png(body["image_base64"].as_str().unwrap()).2);
    assert!(karras != first_schedule && karras != exponential);
}
