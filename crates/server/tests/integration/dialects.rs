//! The AUTOMATIC1111 (`/sdapi/v1`) and OpenAI (`/v1`) dialects over real HTTP against the real
//! binary, with the fake generator (its image is a pure function of the parameters, so "the same
//! image as native `/generate`" means "translated to the same request"). The real clients on the
//! real tiny model are driven by tests/clients (a `.ci/run` stage).

#[path = "dialects/cmd_flags.rs"]
mod cmd_flags;
use crate::common;
#[path = "dialects/extras.rs"]
mod extras;
#[path = "dialects/hires.rs"]
mod hires;
#[path = "dialects/openai.rs"]
mod openai;
#[path = "dialects/progress.rs"]
mod progress;
#[path = "dialects/tiling.rs"]
mod tiling;

use std::time::{Duration, Instant};

use common::{decode_png, fake, Resp, Server};
use serde_json::{json, Value};

fn ready(spec: &str, more: &[(&str, &str)]) -> Server {
    let mut env = fake(spec);
    env.extend(more.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    env.push(("MAX_BODY_BYTES".into(), (8 << 20).to_string()));
    let s = Server::start(&env);
    s.wait_ready(Duration::from_secs(10));
    s
}

fn post(s: &Server, path: &str, body: &Value) -> Resp {
    common::post_json_to(s.addr, path, body)
}

/// Pixels of the native `/generate` image for `body`.
fn native_pixels(s: &Server, body: Value) -> Vec<u8> {
    let r = s.post_json(&body);
    assert_eq!(r.status, 200, "{}", r.text());
    decode_png(r.json()["image_base64"].as_str().unwrap()).2
}

fn info_of(r: &Resp) -> Value {
    assert_eq!(r.status, 200, "{}", r.text());
    let info = r.json()["info"].clone();
    serde_json::from_str(info.as_str().expect("info is a JSON string")).unwrap()
}

#[test]
fn a1111_txt2img_is_the_native_request_in_a1111_terms() {
    let s = ready("step_ms=0", &[]);
    let r = post(
        &s,
        "/sdapi/v1/txt2img",
        &json!({
            "prompt": " a cat ", "negative_prompt": "dog", "seed": 5, "steps": 3,
            "cfg_scale": 6, "width": 256, "height": 320, "sampler_name": "DPM++ 2M",
            "scheduler": "Karras", "n_iter": 2, "batch_size": 1,
            // What webuiapi sends for features it leaves off, nulls included.
            "enable_hr": false, "hr_checkpoint_name": null, "styles": [], "script_args": [],
            "alwayson_scripts": {}, "sampler_index": "Euler a", "override_settings": {},
        }),
    );
    let info = info_of(&r);
    assert_eq!(info["all_seeds"], json!([5, 6]));
    assert_eq!(info["seed"], 5);
    assert_eq!(info["sampler_name"], "DPM++ 2M");
    assert_eq!(info["prompt"], "a cat");
    let images = r.json()["images"].as_array().unwrap().clone();
    assert_eq!(images.len(), 2);
    for (i, img) in images.iter().enumerate() {
        let b64 = img.as_str().unwrap();
        assert!(!b64.starts_with("data:"), "raw base64, as A1111 sends");
        let (w, h, px, text) = decode_png(b64);
        assert_eq!((w, h), (256, 320));
        let want = native_pixels(
            &s,
            json!({"prompt": "a cat", "negative_prompt": "dog", "seed": 5 + i, "steps": 3,
                   "guidance_scale": 6, "width": 256, "height": 320,
                   "scheduler": "dpmpp_2m_karras", "guidance_rule": "a1111"}),
        );
        assert_eq!(px, want, "image {i}");
        assert_eq!(info["infotexts"][i], text.unwrap());
    }
    // A1111's own defaults for absent fields: 50 steps, CFG 7, Euler, 512 (here 256 asked).
    let r = post(
        &s,
        "/sdapi/v1/txt2img",
        &json!({"prompt": "x", "width": 256, "height": 256, "seed": -1}),
    );
    let info = info_of(&r);
    assert_eq!(
        (&info["steps"], &info["cfg_scale"], &info["sampler_name"]),
        (&json!(50), &json!(7.0), &json!("Euler"))
    );
    let seed = info["seed"].as_u64().unwrap();
    assert_eq!(r.json()["parameters"]["seed"], -1);
    let want = native_pixels(
        &s,
        json!({"prompt": "x", "seed": seed, "steps": 50, "guidance_scale": 7,
               "width": 256, "height": 256, "scheduler": "euler", "guidance_rule": "a1111"}),
    );
    assert_eq!(decode_png(r.json()["images"][0].as_str().unwrap()).2, want);
}

#[test]
fn a1111_prompt_may_be_empty_or_absent_but_not_natively() {
    let s = ready("step_ms=0", &[]);
    let size = json!({"steps": 2, "width": 256, "height": 256, "seed": 3});
    let with = |extra: Value| {
        let mut body = size.clone();
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        body
    };
    let mut images = Vec::new();
    for body in [
        with(json!({})),
        with(json!({"prompt": ""})),
        with(json!({"prompt": null})),
    ] {
        let r = post(&s, "/sdapi/v1/txt2img", &body);
        let info = info_of(&r);
        assert_eq!(info["prompt"], "", "{body}");
        let (_, _, px, text) = decode_png(r.json()["images"][0].as_str().unwrap());
        // As A1111 writes it: no empty first line for the empty prompt.
        let text = text.unwrap();
        assert!(text.starts_with("Steps: 2, "), "{text}");
        assert_eq!(info["infotexts"][0], text);
        images.push(px);
    }
    assert!(images.windows(2).all(|w| w[0] == w[1]));
    // img2img too (webuiapi's img2img prompt defaults to "" as well).
    let init = init_png(&s);
    let r = post(
        &s,
        "/sdapi/v1/img2img",
        &with(json!({"init_images": [init], "denoising_strength": 0.5})),
    );
    assert_eq!(info_of(&r)["prompt"], "");
    // PNG info reads the empty prompt back.
    let r = post(
        &s,
        "/sdapi/v1/png-info",
        &json!({"image": r.json()["images"][0]}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["parameters"]["Prompt"], "", "{}", r.text());
    // The native API and OpenAI keep their contract: a prompt is required.
    for body in [with(json!({})), with(json!({"prompt": ""}))] {
        assert_eq!(s.post_json(&body).broken_fields(), ["prompt"], "{body}");
    }
    let r = post(
        &s,
        "/v1/images/generations",
        &json!({"prompt": "", "size": "256x256"}),
    );
    openai_error(&r, 400, Some("prompt"));
}

fn openai_error(r: &Resp, status: u16, param: Option<&str>) -> Value {
    assert_eq!(r.status, status, "{}", r.text());
    let j = r.json();
    let e = &j["error"];
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{j}");
    assert!(e["type"].is_string() && e["code"].is_string(), "{j}");
    assert_eq!(e["param"].as_str(), param, "{j}");
    e.clone()
}

/// A 256x256 PNG in base64 from the native route (an init image).
fn init_png(s: &Server) -> String {
    let r = s.post_json(&json!({"prompt": "init", "steps": 1, "width": 256, "height": 256}));
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()["image_base64"].as_str().unwrap().to_string()
}

/// Heun, DPM2, DPM2 a, Restart, DPM fast, DPM adaptive, DDIM CFG++ and LCM: each A1111 name (with its schedule) runs the native
/// scheduler of that name, and the infotext names both.
#[test]
fn a1111_heun_dpm2_and_lcm_are_their_native_schedulers() {
    let s = ready("step_ms=0", &[]);
    for (sampler, schedule, native, written) in [
        ("Heun", None, "heun", "Heun, Schedule type: Uniform"),
        (
            "Heun",
            Some("Karras"),
            "heun_karras",
            "Heun, Schedule type: Karras",
        ),
        // DPM2 and DPM2 a: k-diffusion's, the penultimate sigma dropped, on one name per sampler.
        (
            "DPM2 Karras",
            None,
            "dpm2_a1111",
            "DPM2, Schedule type: Karras",
        ),
        (
            "k_dpm_2_a",
            Some("Uniform"),
            "dpm2_a_a1111",
            "DPM2 a, Schedule type: Uniform",
        ),
        (
            "DPM2 a",
            Some("Karras"),
            "dpm2_a_a1111",
            "DPM2 a, Schedule type: Karras",
        ),
        // A1111 1.10 lists Restart with the Karras schedule: Automatic is Karras.
        (
            "Restart",
            None,
            "restart_karras",
            "Restart, Schedule type: Karras",
        ),
        (
            "restart",
            Some("Uniform"),
            "restart",
            "Restart, Schedule type: Uniform",
        ),
        ("LCM", Some("automatic"), "lcm", "LCM"),
        // k-diffusion's DPM-Solver-Fast and -23: one name on every schedule type.
        (
            "DPM fast",
            None,
            "dpm_fast",
            "DPM fast, Schedule type: Uniform",
        ),
        (
            "k_dpm_fast",
            Some("Karras"),
            "dpm_fast",
            "DPM fast, Schedule type: Karras",
        ),
        (
            "k_dpm_ad",
            Some("Exponential"),
            "dpm_adaptive",
            "DPM adaptive, Schedule type: Exponential",
        ),
        // A1111's DDIM CFG++ (a timesteps sampler: no schedule choice).
        ("DDIM CFG++", None, "ddim_cfgpp", "DDIM CFG++"),
        ("ddim_cfgpp", Some("Automatic"), "ddim_cfgpp", "DDIM CFG++"),
    ] {
        let r = post(
            &s,
            "/sdapi/v1/txt2img",
            &json!({"prompt": "a cat", "seed": 3, "steps": 4, "width": 256, "height": 256,
                    "sampler_name": sampler, "scheduler": schedule}),
        );
        let info = info_of(&r);
        let text = info["infotexts"][0].as_str().unwrap();
        assert!(
            text.contains(&format!("Sampler: {written}, Scheduler: {native},")),
            "{sampler} {schedule:?}: {text}"
        );
        let r = s.post_json(
            &json!({"prompt": "a cat", "seed": 3, "steps": 4, "width": 256,
                                    "height": 256, "scheduler": native}),
        );
        assert_eq!(r.status, 200, "{native}: {}", r.text());
        assert_eq!(r.json()["metadata"]["scheduler"], native);
    }
    let r = post(
        &s,
        "/sdapi/v1/txt2img",
        &json!({"prompt": "x", "sampler_name": "LCM", "scheduler": "Karras"}),
    );
    assert_eq!(r.broken_fields(), ["scheduler"]);
}

#[test]
fn a1111_errors_name_a1111_fields() {
    let s = ready("step_ms=0", &[]);
    let r = post(
        &s,
        "/sdapi/v1/txt2img",
        &json!({"prompt": "x", "sampler_name": "DPM++ 4M"}),
    );
    assert_eq!(r.broken_fields(), ["sampler_name"]);
    let details = r.json()["details"].as_str().unwrap().to_string();
    for name in ["Euler a", "DPM++ 2M Karras", "UniPC", "PLMS"] {
        assert!(details.contains(name), "{details}");
    }
    let r = post(
        &s,
        "/sdapi/v1/txt2img",
        &json!({"prompt": "x", "cfg_scale": 31, "steps": 0}),
    );
    let mut fields = r.broken_fields();
    fields.sort();
    assert_eq!(fields, ["cfg_scale", "steps"]);
    let r = post(
        &s,
        "/sdapi/v1/txt2img",
        &json!({"prompt": "x", "sampler_name": "DDIM", "scheduler": "Karras"}),
    );
    assert_eq!(r.broken_fields(), ["scheduler"]);
    let r = s.request("POST", "/sdapi/v1/txt2img", &[], b"{not json");
    r.error(400, "invalid_json");
    let r = post(&s, "/sdapi/v1/img2img", &json!({"prompt": "x"}));
    assert_eq!(r.broken_fields(), ["init_images"]);
    // A body is required (as FastAPI's A1111 does); `{}` takes every default.
    s.request("POST", "/sdapi/v1/txt2img", &[], b"")
        .error(400, "invalid_json");
    // Fields txt2img ignores still have the type and range the schema declares.
    let r = post(
        &s,
        "/sdapi/v1/txt2img",
        &json!({"prompt": "x", "mask": {}, "override_settings": [1], "hr_second_pass_steps": -1, "subseed": -2}),
    );
    let mut fields = r.broken_fields();
    fields.sort();
    assert_eq!(
        fields,
        [
            "hr_second_pass_steps",
            "mask",
            "override_settings",
            "subseed"
        ]
    );
    // progress's flag is a boolean, as FastAPI reads one.
    let r = s.get("/sdapi/v1/progress?skip_current_image=null");
    assert_eq!(r.broken_fields(), ["skip_current_image"]);
    assert_eq!(
        s.get("/sdapi/v1/progress?skip_current_image=False").status,
        200
    );
}

#[test]
fn a1111_lists_options_and_png_info() {
    let s = ready("step_ms=0", &[]);
    let names: Vec<Value> = s
        .get("/sdapi/v1/samplers")
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["name"].clone())
        .collect();
    assert_eq!(
        names,
        json!([
            "Euler a",
            "Euler",
            "DPM++ 2M",
            "DPM++ 2M SDE",
            "DPM++ 2M SDE Heun",
            "DPM++ SDE",
            "DDIM",
            "DDIM CFG++",
            "PLMS",
            "LMS",
            "UniPC",
            "Heun",
            "DPM2",
            "DPM2 a",
            "Restart",
            "LCM",
            "DPM++ 2S a",
            "DPM++ 3M SDE",
            "DPM fast",
            "DPM adaptive"
        ])
        .as_array()
        .unwrap()
        .clone()
    );
    let labels: Vec<Value> = s
        .get("/sdapi/v1/schedulers")
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["label"].clone())
        .collect();
    assert_eq!(
        labels,
        [
            json!("Automatic"),
            json!("Uniform"),
            json!("Karras"),
            json!("Exponential"),
            json!("Beta")
        ]
    );
    let models = s.get("/sdapi/v1/sd-models").json();
    let title = models[0]["title"].as_str().unwrap().to_string();
    assert_eq!(title, "fake@0");
    let opts = s.get("/sdapi/v1/options").json();
    assert_eq!(opts["sd_model_checkpoint"], title);
    assert_eq!(
        post(
            &s,
            "/sdapi/v1/options",
            &json!({"sd_model_checkpoint": title, "CLIP_stop_at_last_layers": 1})
        )
        .json(),
        json!({})
    );
    let r = post(
        &s,
        "/sdapi/v1/options",
        &json!({"sd_model_checkpoint": "v1-5-pruned.safetensors"}),
    );
    assert_eq!(r.broken_fields(), ["sd_model_checkpoint"]);
    assert_eq!(
        s.get("/sdapi/v1/scripts").json(),
        json!({"txt2img": [], "img2img": []})
    );
    // webuiapi's get_script_info, A1111's extensions list and refresh routes (null, as A1111).
    assert_eq!(s.get("/sdapi/v1/script-info").json(), json!([]));
    assert_eq!(s.get("/sdapi/v1/extensions").json(), json!([]));
    for route in ["/sdapi/v1/refresh-checkpoints", "/sdapi/v1/refresh-vae"] {
        let r = post(&s, route, &json!({}));
        assert_eq!((r.status, r.json()), (200, Value::Null), "{route}");
    }
    assert!(s.get("/sdapi/v1/loras").json().is_array());

    let r = post(
        &s,
        "/sdapi/v1/txt2img",
        &json!({"prompt": "a cat\non a mat", "negative_prompt": "dog", "seed": 77, "steps": 2, "width": 256, "height": 256, "sampler_name": "Euler a"}),
    );
    let image = r.json()["images"][0].as_str().unwrap().to_string();
    // webuiapi sends a data: URL.
    let r = post(
        &s,
        "/sdapi/v1/png-info",
        &json!({"image": format!("data:image/png;base64,{image}")}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let j = r.json();
    assert!(
        j["info"]
            .as_str()
            .unwrap()
            .starts_with("a cat\non a mat\nNegative prompt: dog\nSteps: 2, Sampler: Euler a"),
        "{j}"
    );
    assert_eq!(j["parameters"]["Prompt"], "a cat\non a mat");
    assert_eq!(j["parameters"]["Seed"], "77");
    assert_eq!(j["parameters"]["Size-1"], "256");
    assert_eq!(j["items"], json!({}));
    let r = post(&s, "/sdapi/v1/png-info", &json!({"image": "%%%"}));
    assert_eq!(r.broken_fields(), ["image"]);
}

#[test]
fn every_documented_dialect_route_is_served() {
    let s = ready("step_ms=0", &[]);
    let doc = s.get("/openapi.json").json();
    let mut seen = 0;
    for (path, ops) in doc["paths"].as_object().unwrap() {
        if !(path.starts_with("/sdapi/v1/") || path.starts_with("/v1/")) {
            continue;
        }
        let path = path
            .replace("{name}", "nothing.png")
            .replace("{id}", "fake@0");
        for method in ops.as_object().unwrap().keys() {
            let r = s.request(&method.to_ascii_uppercase(), &path, &[], b"");
            // Routed: an answer of the handler (an empty body is a 4xx of its own), not the
            // router's 404/405.
            assert_ne!(r.status, 405, "{method} {path}: {}", r.text());
            if r.status == 404 {
                assert!(
                    path.contains("nothing.png"),
                    "{method} {path}: {}",
                    r.text()
                );
            }
            seen += 1;
        }
    }
    assert!(seen >= 18, "{seen} dialect operations documented");
}
