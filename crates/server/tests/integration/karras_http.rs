//! The Karras names and DPM++ 2M SDE over real HTTP on the real tiny model (`tiny-b`): A1111's
//! `Euler a` + `Karras` (and its one-word `Euler a Karras`) is the native `euler_a_karras` pixel
//! for pixel, says so in its infotext, and differs from the uniform schedule; `DPM++ 2M SDE` is
//! listed, its automatic schedule is A1111 1.9's (Exponential) and its noise Brownian
//! (`dpmpp_2m_sde_brownian`); `Euler` + `Exponential` / `Beta` is the native `euler` with
//! `schedule`. The images themselves are checked against diffusers in the pipeline's tests
//! (crates/pipeline/tests/integration/karras_images.rs, sigma_schedules.rs).

use crate::common;

use common::{decode_png, ok, post_json_to, Server};
use serde_json::{json, Value};

/// Every request here must run, not be another's cached answer.
fn tiny_server() -> Server {
    common::tiny_server("karras", &[("RESPONSE_CACHE_MB", "0")])
}

fn native(scheduler: &str) -> Value {
    json!({"prompt": "a lighthouse", "negative_prompt": "blurry", "seed": 5, "steps": 3,
           "width": 256, "height": 256, "guidance_scale": 6.0, "scheduler": scheduler})
}

fn a1111(sampler: &str, scheduler: Option<&str>) -> Value {
    let mut body = json!({"prompt": "a lighthouse", "negative_prompt": "blurry", "seed": 5,
                          "steps": 3, "width": 256, "height": 256, "cfg_scale": 6.0,
                          "sampler_name": sampler});
    if let Some(s) = scheduler {
        body["scheduler"] = json!(s);
    }
    body
}

/// An A1111 txt2img answer's first image (pixels) and its `info`, parsed.
fn txt2img(s: &Server, body: &Value) -> (Vec<u8>, Value) {
    let r = ok(&post_json_to(s.addr, "/sdapi/v1/txt2img", body));
    let info: Value = serde_json::from_str(r["info"].as_str().unwrap()).unwrap();
    (decode_png(r["images"][0].as_str().unwrap()).2, info)
}

#[test]
fn a1111_euler_a_with_karras_is_the_native_euler_a_karras() {
    let s = tiny_server();
    let body = ok(&s.post_json(&native("euler_a_karras")));
    assert_eq!(body["metadata"]["scheduler"], "euler_a_karras");
    let (_, _, pixels, text) = decode_png(body["image_base64"].as_str().unwrap());
    let text = text.unwrap();
    assert!(
        text.contains("Sampler: Euler a, Schedule type: Karras, Scheduler: euler_a_karras"),
        "{text}"
    );

    let (a_pixels, info) = txt2img(&s, &a1111("Euler a", Some("Karras")));
    assert!(
        a_pixels == pixels,
        "A1111 Euler a + Karras differs from euler_a_karras"
    );
    assert_eq!(info["sampler_name"], "Euler a");
    assert_eq!(info["extra_generation_params"]["Schedule type"], "Karras");
    let infotext = info["infotexts"][0].as_str().unwrap();
    assert!(
        infotext.contains("Sampler: Euler a, Schedule type: Karras"),
        "{infotext}"
    );
    // A1111's older one-word name wins over the field, as in A1111.
    let (one_word, _) = txt2img(&s, &a1111("Euler a Karras", Some("Uniform")));
    assert!(
        one_word == pixels,
        "Euler a Karras differs from euler_a_karras"
    );
    // The schedule matters: the uniform one is another image.
    let (uniform, info) = txt2img(&s, &a1111("Euler a", Some("Uniform")));
    assert!(
        uniform != pixels,
        "Karras and uniform sigmas gave the same image"
    );
    assert_eq!(info["extra_generation_params"]["Schedule type"], "Uniform");

    // DPM++ 2M SDE: listed, and its automatic schedule is Exponential, as A1111 1.9's.
    let names: Vec<Value> = s
        .get("/sdapi/v1/samplers")
        .json()
        .as_array()
        .unwrap()
        .to_vec();
    let sde = names
        .iter()
        .find(|x| x["name"] == "DPM++ 2M SDE")
        .unwrap_or_else(|| panic!("no DPM++ 2M SDE in {names:?}"));
    assert_eq!(sde["options"]["scheduler"], "exponential");
    // A1111 draws its noise from Brownian trees: the native `dpmpp_2m_sde_brownian`, not
    // diffusers' generator noise (`dpmpp_2m_sde`).
    let mut exp = native("dpmpp_2m_sde_brownian");
    exp["schedule"] = json!("exponential");
    let body = ok(&s.post_json(&exp));
    assert_eq!(body["metadata"]["schedule"], "exponential");
    let (_, _, sde_pixels, _) = decode_png(body["image_base64"].as_str().unwrap());
    let (a_sde, info) = txt2img(&s, &a1111("DPM++ 2M SDE", None));
    assert!(a_sde == sde_pixels, "DPM++ 2M SDE (automatic) differs");
    exp["scheduler"] = json!("dpmpp_2m_sde");
    let body = ok(&s.post_json(&exp));
    let (_, _, generator_pixels, _) = decode_png(body["image_base64"].as_str().unwrap());
    assert!(
        generator_pixels != sde_pixels,
        "generator noise gave A1111's Brownian image"
    );
    assert_eq!(
        info["extra_generation_params"]["Schedule type"],
        "Automatic"
    );
    assert!(
        info["infotexts"][0]
            .as_str()
            .unwrap()
            .contains("Sampler: DPM++ 2M SDE, Schedule type: Exponential"),
        "{info}"
    );
    // Samplers without a Karras form say which have one.
    let r = post_json_to(s.addr, "/sdapi/v1/txt2img", &a1111("PLMS", Some("Karras")));
    assert_eq!(r.status, 422, "{}", r.text());
    let details = r.json()["details"].as_str().unwrap().to_string();
    assert!(details.contains("Euler a, Euler, DPM++ 2M"), "{details}");
}

/// The native `schedule`: `euler` + `exponential` / `beta` are A1111's `Euler` + `Exponential` /
/// `Beta` pixel for pixel, other images than the uniform one, named in metadata and infotexts;
/// a combination the scheduler lacks is a 422 naming `schedule`.
#[test]
fn native_schedules_are_a1111_schedule_types() {
    let s = tiny_server();
    let uniform = ok(&s.post_json(&native("euler")));
    assert_eq!(uniform["metadata"]["schedule"], "uniform");
    let (_, _, uniform, _) = decode_png(uniform["image_base64"].as_str().unwrap());
    for (schedule, label) in [("exponential", "Exponential"), ("beta", "Beta")] {
        let mut body = native("euler");
        body["schedule"] = json!(schedule);
        let r = ok(&s.post_json(&body));
        assert_eq!(r["metadata"]["schedule"], schedule);
        let (_, _, pixels, text) = decode_png(r["image_base64"].as_str().unwrap());
        let text = text.unwrap();
        assert!(
            text.contains(&format!(
                "Sampler: Euler, Schedule type: {label}, Scheduler: euler"
            )),
            "{text}"
        );
        assert!(pixels != uniform, "{schedule} gave the uniform image");
        let (a_pixels, info) = txt2img(&s, &a1111("Euler", Some(label)));
        assert!(a_pixels == pixels, "A1111 Euler + {label} differs");
        assert_eq!(info["extra_generation_params"]["Schedule type"], label);
    }
    for (scheduler, schedule) in [("euler_karras", "beta"), ("ddim", "exponential")] {
        let mut body = native(scheduler);
        body["schedule"] = json!(schedule);
        let r = s.post_json(&body);
        assert_eq!(r.status, 422, "{}", r.text());
        assert!(
            r.json()["details"]
                .as_str()
                .unwrap()
                .starts_with("schedule:"),
            "{}",
            r.text()
        );
    }
    let r = post_json_to(s.addr, "/sdapi/v1/txt2img", &a1111("DDIM", Some("Beta")));
    assert_eq!(r.status, 422, "{}", r.text());
}

/// A job says from the start how many UNet evaluations its run counts (Heun: 2n - 1; PNDM:
/// n + 1), not its step count, and every progress event agrees.
#[test]
fn a_job_announces_the_evaluations_its_sampler_runs() {
    let s = tiny_server();
    for (scheduler, steps, evaluations) in [("heun", 3, 5), ("pndm", 3, 4), ("euler", 3, 3)] {
        let created = post_json_to(s.addr, "/jobs", &native(scheduler));
        assert_eq!(created.status, 202, "{}", created.text());
        let id = created.json()["id"].as_str().unwrap().to_string();
        assert_eq!(native(scheduler)["steps"], steps);
        let first = s.get(&format!("/jobs/{id}")).json();
        assert_eq!(
            first["progress"]["total"], evaluations,
            "{scheduler}: {first}"
        );
        let events = common::cluster::follow(s.addr, &id);
        let totals: Vec<&Value> = events
            .iter()
            .filter(|(name, _)| name == "progress")
            .map(|(_, data)| &data["total"])
            .collect();
        // (A stream that joins late sees fewer steps, never other totals.)
        assert!(totals.len() <= evaluations, "{scheduler}: {events:?}");
        assert!(
            totals.iter().all(|t| **t == evaluations),
            "{scheduler}: {totals:?}"
        );
    }
}
