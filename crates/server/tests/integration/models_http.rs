//! MODELS_DIR over real HTTP on real files: two tiny models of the fixtures (`tiny-b`, the
//! default, and `tiny-a-vae8`) and a broken checkpoint in one folder. A request naming the
//! second gets its pixels (those of a server started with it as `--model`), the next request
//! without a name the default's again; an unknown name is a 422, the broken file a 503 for
//! that job only; A1111's `sd_model_checkpoint` (override and options) and OpenAI's `model`
//! choose the same way.

use crate::common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{copy_tree, decode_png, Server};
use serde_json::{json, Value};

/// The default model (`--model`, inside MODELS_DIR) and the other one, both fast at 256x256.
const DEFAULT: &str = "tiny-b";
const OTHER: &str = "tiny-a-vae8";

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../pipeline/tests/fixtures")
        .join(name)
}

struct Folder(PathBuf);

impl Drop for Folder {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A MODELS_DIR with copies of both models and a checkpoint that is not one; and a
/// cache folder (digests, conversions).
fn models_folder(tag: &str) -> (Folder, PathBuf, PathBuf) {
    let root = std::env::temp_dir().join(format!("sdserve-models-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let models = root.join("models");
    for m in [DEFAULT, OTHER] {
        copy_tree(&fixture(m), &models.join(m));
    }
    std::fs::write(
        models.join("broken.safetensors"),
        b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}..",
    )
    .unwrap();
    let cache = root.join("cache");
    std::fs::create_dir_all(&cache).unwrap();
    (Folder(root), models, cache)
}

/// A server on `model`; `response_cache` false: every request runs.
fn server(model: &Path, models_dir: Option<&Path>, cache: &Path, response_cache: bool) -> Server {
    let mut env = vec![
        (
            "RESPONSE_CACHE_MB".to_string(),
            if response_cache { "64" } else { "0" }.to_string(),
        ),
        ("MODEL_ID".to_string(), model.to_string_lossy().into_owned()),
        (
            "MODEL_CACHE_DIR".to_string(),
            cache.to_string_lossy().into_owned(),
        ),
        ("GENERATION_TIMEOUT_SECONDS".to_string(), "600".to_string()),
    ];
    if let Some(d) = models_dir {
        env.push(("MODELS_DIR".to_string(), d.to_string_lossy().into_owned()));
    }
    let s = Server::start(&env);
    s.wait_ready(Duration::from_secs(120));
    s
}

fn post(s: &Server, path: &str, body: &Value) -> common::Resp {
    s.request(
        "POST",
        path,
        &[("Content-Type", "application/json")],
        body.to_string().as_bytes(),
    )
}

fn request(model: Option<&str>) -> Value {
    let mut r = json!({"prompt": "a red boat", "seed": 5, "steps": 2, "width": 256,
                       "height": 256, "scheduler": "euler"});
    if let Some(m) = model {
        r["model"] = json!(m);
    }
    r
}

/// The pixels and metadata of a 200 from `/generate`.
fn pixels(r: &common::Resp) -> (Vec<u8>, Value) {
    assert_eq!(r.status, 200, "{}", r.text());
    let body = r.json();
    let (_, _, px, _) = decode_png(body["image_base64"].as_str().unwrap());
    (px, body["metadata"].clone())
}

fn a1111_pixels(r: &common::Resp) -> (Vec<u8>, Value) {
    assert_eq!(r.status, 200, "{}", r.text());
    let body = r.json();
    let (_, _, px, _) = decode_png(body["images"][0].as_str().unwrap());
    let info: Value = serde_json::from_str(body["info"].as_str().unwrap()).unwrap();
    (px, info)
}

fn loaded(s: &Server) -> Value {
    s.get("/health").json()["loaded_model"]["name"].clone()
}

#[test]
fn a_request_names_its_model_and_the_next_one_gets_the_default_again() {
    let (_root, models, cache) = models_folder("switch");
    let s = server(&models.join(DEFAULT), Some(&models), &cache, false);
    let list = s.get("/models").json();
    let names: Vec<&str> = list["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, [DEFAULT, "broken.safetensors", OTHER], "{list}");
    assert_eq!(
        (&list["default"], &list["loaded"]),
        (&json!(DEFAULT), &json!(DEFAULT))
    );
    assert!(
        !list.to_string().contains(models.to_str().unwrap()),
        "{list}"
    );

    let (default_px, default_meta) = pixels(&s.post_json(&request(None)));
    let (b_px, b_meta) = pixels(&s.post_json(&request(Some(OTHER))));
    assert_eq!(loaded(&s), OTHER);
    assert_eq!(s.get("/models").json()["loaded"], OTHER);
    // The next request without a name runs on the default model again.
    let (again_px, again_meta) = pixels(&s.post_json(&request(None)));
    assert_eq!(again_px, default_px);
    assert_eq!(again_meta["model_version"], default_meta["model_version"]);
    assert!(
        b_meta["model_version"]
            .as_str()
            .unwrap()
            .starts_with(&format!("{OTHER}@sha256:")),
        "{b_meta}"
    );
    assert_ne!(b_px, default_px);
    // Naming the default by its name is the default.
    let (named_default, _) = pixels(&s.post_json(&json!({"prompt": "a red boat", "seed": 5,
        "steps": 2, "width": 256, "height": 256, "scheduler": "euler", "model": DEFAULT,
        "guidance_scale": 7.5})));
    assert_eq!(named_default, default_px);

    // The other model's own pixels: a server started with it as `--model`.
    let alone = server(&fixture(OTHER), None, &cache, false);
    let (alone_px, alone_meta) = pixels(&alone.post_json(&request(None)));
    assert_eq!(b_px, alone_px);
    assert_eq!(b_meta["model_version"], alone_meta["model_version"]);
    // Without `scheduler`, a named model runs its own (tiny-a-vae8's is PNDM, tiny-b's DDIM).
    let mut own = request(Some(OTHER));
    own["scheduler"] = Value::Null;
    let (_, meta) = pixels(&s.post_json(&own));
    assert_eq!(meta["scheduler"], "pndm");
    drop(alone);

    // An unknown name: 422 naming `model`, no path in the body.
    let r = s.post_json(&request(Some("nope.safetensors")));
    assert_eq!(r.broken_fields(), ["model"]);
    assert!(!r.text().contains(models.to_str().unwrap()), "{}", r.text());
    let r = post(&s, "/jobs", &request(Some("../tiny-a")));
    assert_eq!(r.broken_fields(), ["model"]);

    // A broken checkpoint fails its job (503 naming it); the process goes on, the previous
    // model comes back.
    let r = s.post_json(&request(Some("broken.safetensors")));
    let e = r.error(503, "model_unavailable");
    assert!(
        e["details"]
            .as_str()
            .unwrap()
            .contains("broken.safetensors"),
        "{e}"
    );
    assert!(!r.text().contains(models.to_str().unwrap()), "{}", r.text());
    let h = s.get("/health");
    assert_eq!(h.status, 200, "{}", h.text());
    assert_eq!(loaded(&s), OTHER);
    let (px, _) = pixels(&s.post_json(&request(None)));
    assert_eq!(px, default_px);
    assert_eq!(loaded(&s), DEFAULT);
}

/// Reads a job's event stream to its end.
fn events(s: &Server, id: &str) -> String {
    s.get(&format!("/jobs/{id}/events")).text()
}

#[test]
fn jobs_say_they_load_and_dialects_choose_models_as_their_clients_do() {
    let (_root, models, cache) = models_folder("dialects");
    let s = server(&models.join(DEFAULT), Some(&models), &cache, true);
    let (default_px, _) = pixels(&s.post_json(&request(None)));
    // The response cache keeps the models apart: the same request on another model runs.
    let other = s.post_json(&request(Some(OTHER)));
    assert_eq!(other.header("x-cache"), Some("miss"));
    let (b_px, b_meta) = pixels(&other);
    assert_ne!(b_px, default_px);

    // A job that needs a switch says so in its events (followed while it waits behind a
    // longer job on the other model); its result is the default's.
    let mut long = request(Some(OTHER));
    long["steps"] = json!(12);
    assert_eq!(post(&s, "/jobs", &long).status, 202);
    let created = post(&s, "/jobs", &request(None));
    assert_eq!(created.status, 202, "{}", created.text());
    let id = created.json()["id"].as_str().unwrap().to_string();
    let stream = events(&s, &id);
    assert!(stream.contains("event: loading"), "{stream}");
    assert!(stream.contains("event: succeeded"), "{stream}");
    let job = s.get(&format!("/jobs/{id}")).json();
    assert_eq!(job["request"]["model"], Value::Null);
    let px = decode_png(job["result"]["image_base64"].as_str().unwrap()).2;
    assert_eq!(px, default_px);
    assert!(job["loading"].is_null(), "{job}");

    // A1111: sd-models lists every checkpoint; override_settings picks one per request.
    let listed = s.get("/sdapi/v1/sd-models").json();
    let titles: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["model_name"].as_str().unwrap())
        .collect();
    assert_eq!(titles, [DEFAULT, "broken", OTHER], "{listed}");
    let a1111 = |checkpoint: Option<&str>| {
        let mut body = json!({"prompt": "a red boat", "seed": 5, "steps": 2, "width": 256,
                              "height": 256, "cfg_scale": 7.5, "sampler_name": "Euler"});
        if let Some(c) = checkpoint {
            body["override_settings"] = json!({"sd_model_checkpoint": c});
        }
        post(&s, "/sdapi/v1/txt2img", &body)
    };
    let (px, info) = a1111_pixels(&a1111(Some(OTHER)));
    assert_eq!(px, b_px);
    assert!(
        info["infotexts"][0].as_str().unwrap().contains(OTHER),
        "{info}"
    );
    let (px, _) = a1111_pixels(&a1111(None));
    assert_eq!(px, default_px);
    // POST options sets the checkpoint of later A1111 requests (not the native default).
    let r = post(
        &s,
        "/sdapi/v1/options",
        &json!({"sd_model_checkpoint": OTHER}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        s.get("/sdapi/v1/options").json()["sd_model_checkpoint"],
        OTHER
    );
    let (px, _) = a1111_pixels(&a1111(None));
    assert_eq!(px, b_px);
    let (px, _) = pixels(&s.post_json(&request(None)));
    assert_eq!(px, default_px);
    // The override wins over the option; an unknown option is a 422.
    let (px, _) = a1111_pixels(&a1111(Some(listed[0]["title"].as_str().unwrap())));
    assert_eq!(px, default_px);
    let r = post(
        &s,
        "/sdapi/v1/options",
        &json!({"sd_model_checkpoint": "nope"}),
    );
    assert_eq!(r.broken_fields(), ["sd_model_checkpoint"]);

    // OpenAI: `dall-e-*` is the default model; a name of ours is that model.
    let openai = |model: &str| {
        let r = s.request(
            "POST",
            "/v1/images/generations",
            &[
                ("Content-Type", "application/json"),
                ("Authorization", "Bearer k"),
            ],
            json!({"prompt": "a red boat", "size": "256x256", "seed": 5, "steps": 2,
                   "guidance_scale": 7.5, "scheduler": "euler", "model": model,
                   "response_format": "b64_json"})
            .to_string()
            .as_bytes(),
        );
        assert_eq!(r.status, 200, "{}", r.text());
        decode_png(r.json()["data"][0]["b64_json"].as_str().unwrap()).2
    };
    assert_eq!(openai("dall-e-3"), default_px);
    assert_eq!(openai(OTHER), b_px);
    let ids = s.get("/v1/models").json();
    assert_eq!(
        ids["data"][0]["id"].as_str().unwrap().split('@').next(),
        Some(DEFAULT)
    );
    assert_eq!(ids["data"][2]["id"], OTHER, "{ids}");
    assert!(b_meta["model_version"].as_str().unwrap().starts_with(OTHER));

    // A model dropped into the folder later is there at once.
    copy_tree(&fixture(OTHER), &models.join("copy"));
    let (px, meta) = pixels(&s.post_json(&request(Some("copy"))));
    assert_eq!(px, b_px);
    assert!(
        meta["model_version"].as_str().unwrap().starts_with("copy@"),
        "{meta}"
    );
}
