//! Rules a request must meet in the model it runs on, checked when it is submitted (a 422
//! naming the field, OpenAI's 400) rather than by the worker once it runs (a job that fails
//! later): a clip skip past the text encoder's layers, hires sizes the VAE cannot take in whole
//! latent cells, an external VAE folder whose latents the model cannot take. Real binary, real
//! tiny models in a MODELS_DIR (the default, `tiny-a-vae8`: 2 text layers, VAE factor 8;
//! `tiny-b`: 3 text layers; `vae16`: tiny-a-vae8 with a VAE of factor 16), so the rules are
//! the named model's, read from its configs before it is loaded.

use crate::common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{copy_tree, post_json_to, Server};
use serde_json::{json, Value};

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

/// The server on tiny-a-vae8 with MODELS_DIR (tiny-a-vae8, tiny-b, vae16, and tiny-a as the
/// single files `tiny-a.safetensors` and `tiny-a-pickle.ckpt`), VAE_DIR
/// (`factor16`: the factor-16 VAE folder) and LORA_DIR (the LoRA fixtures, made for tiny-a),
/// its response cache off.
fn server(tag: &str) -> (Folder, Server) {
    server_on(tag, "tiny-a-vae8")
}

/// [`server`] with `default` (one of the MODELS_DIR models) as `--model`.
fn server_on(tag: &str, default: &str) -> (Folder, Server) {
    let root = std::env::temp_dir().join(format!("sdserve-rules-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let (models, vaes, cache) = (root.join("models"), root.join("vaes"), root.join("cache"));
    for m in ["tiny-a-vae8", "tiny-b"] {
        copy_tree(&fixture(m), &models.join(m));
    }
    copy_tree(&fixture("tiny-a-vae8"), &models.join("vae16"));
    std::fs::remove_dir_all(models.join("vae16/vae")).unwrap();
    copy_tree(
        &fixture("vae/factor16-diffusers"),
        &models.join("vae16/vae"),
    );
    copy_tree(&fixture("vae/factor16-diffusers"), &vaes.join("factor16"));
    // tiny-a's weights as single files (LDM names): safetensors and a pickle.
    for (from, to) in [
        ("single-file/tiny-a.safetensors", "tiny-a.safetensors"),
        ("single-file/tiny-a-fp16.ckpt", "tiny-a-pickle.ckpt"),
    ] {
        std::fs::copy(fixture(from), models.join(to)).unwrap();
    }
    std::fs::create_dir_all(&cache).unwrap();
    let path = |p: &Path| p.to_string_lossy().into_owned();
    let env: Vec<(String, String)> = [
        ("MODEL_ID", path(&models.join(default))),
        ("LORA_DIR", path(&fixture("adapters/loras"))),
        ("EMBEDDINGS_DIR", path(&fixture("adapters/embeddings"))),
        ("MODELS_DIR", path(&models)),
        ("VAE_DIR", path(&vaes)),
        ("MODEL_CACHE_DIR", path(&cache)),
        ("RESPONSE_CACHE_MB", "0".into()),
        ("GENERATION_TIMEOUT_SECONDS", "600".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let s = Server::start(&env);
    s.wait_ready(Duration::from_secs(120));
    (Folder(root), s)
}

/// `body` with `extra`'s fields set over it.
fn with(mut body: Value, extra: Value) -> Value {
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

fn native(extra: Value) -> Value {
    let body = json!({"prompt": "a red boat", "seed": 5, "steps": 1, "width": 256,
                      "height": 256, "scheduler": "euler"});
    with(body, extra)
}

fn a1111(extra: Value) -> Value {
    let body = json!({"prompt": "a red boat", "seed": 5, "steps": 1, "width": 256,
                      "height": 256, "sampler_name": "Euler"});
    with(body, extra)
}

fn openai(extra: Value) -> Value {
    let body = json!({"prompt": "a red boat", "size": "256x256", "seed": 5, "steps": 1,
                      "response_format": "b64_json"});
    with(body, extra)
}

/// A 422's broken fields and their rules, one string each.
fn refused(r: &common::Resp) -> Vec<String> {
    r.error(422, "validation_error")["fields"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            format!(
                "{}: {}",
                f["field"].as_str().unwrap(),
                f["rule"].as_str().unwrap()
            )
        })
        .collect()
}

/// OpenAI's 400: the parameter named and the message.
fn openai_refused(r: &common::Resp) -> (String, String) {
    assert_eq!(r.status, 400, "{}", r.text());
    let e = &r.json()["error"];
    assert_eq!(e["type"], "invalid_request_error", "{e}");
    (
        e["param"].as_str().unwrap_or_default().to_string(),
        e["message"].as_str().unwrap_or_default().to_string(),
    )
}

/// `POST /jobs` answers 422 naming `fields` (each rule saying `says`), and queues nothing.
fn jobs_refuse(s: &Server, body: &Value, fields: &[&str], says: &str) {
    let before = s.get("/jobs").json()["jobs"].as_array().unwrap().len();
    let r = post_json_to(s.addr, "/jobs", body);
    let rules = refused(&r);
    assert_eq!(rules.len(), fields.len(), "{body}: {rules:?}");
    for (rule, field) in rules.iter().zip(fields) {
        assert!(
            rule.starts_with(&format!("{field}: ")) && rule.contains(says),
            "{body}: {rules:?}"
        );
    }
    let after = s.get("/jobs").json()["jobs"].as_array().unwrap().len();
    assert_eq!(before, after, "a refused request made a job");
}

#[test]
fn a_clip_skip_past_the_text_encoder_is_refused_at_submit_in_every_dialect() {
    let (_root, s) = server("clip");
    // tiny-a-vae8's text encoder has 2 layers: hidden_states holds 3 (the embeddings and each
    // layer's output), so A1111's clip skip goes to 3; 4 is past it (the run would refuse it).
    jobs_refuse(
        &s,
        &native(json!({"clip_skip": 4})),
        &["clip_skip"],
        "at most 3",
    );
    let r = s.post_json(&native(json!({"clip_skip": 4})));
    assert!(refused(&r)[0].contains("2 layers"), "{}", r.text());
    let field = "override_settings.CLIP_stop_at_last_layers";
    let r = post_json_to(
        s.addr,
        "/sdapi/v1/txt2img",
        &a1111(json!({"override_settings": {"CLIP_stop_at_last_layers": 4}})),
    );
    assert!(refused(&r)[0].starts_with(field), "{}", r.text());
    // A1111's own range goes to 12 (its slider), past the native 1..=4: what refuses 12 here
    // is this model's limit.
    let r = post_json_to(
        s.addr,
        "/sdapi/v1/txt2img",
        &a1111(json!({"override_settings": {"CLIP_stop_at_last_layers": 12}})),
    );
    let rule = &refused(&r)[0];
    assert!(
        rule.starts_with(field) && rule.contains("at most 3"),
        "{}",
        r.text()
    );
    // The server-wide option too (A1111 applies it to every request).
    let set = |v: u32| {
        let r = post_json_to(
            s.addr,
            "/sdapi/v1/options",
            &json!({"CLIP_stop_at_last_layers": v}),
        );
        assert_eq!(r.status, 200, "{}", r.text());
    };
    for v in [4, 12] {
        set(v);
        let r = post_json_to(s.addr, "/sdapi/v1/txt2img", &a1111(json!({})));
        assert!(refused(&r)[0].starts_with(field), "{}", r.text());
    }
    set(1);
    let (param, message) = openai_refused(&post_json_to(
        s.addr,
        "/v1/images/generations",
        &openai(json!({"clip_skip": 4})),
    ));
    assert_eq!(param, "clip_skip", "{message}");
    assert!(message.contains("at most 3"), "{message}");

    // The largest runs: the embeddings through the final layer norm.
    let r = s.post_json(&native(json!({"clip_skip": 3})));
    assert_eq!(r.status, 200, "{}", r.text());
    // A model named by the request has its own limit, read before it is loaded: tiny-b's
    // text encoder has 3 layers.
    let r = s.post_json(&native(json!({"clip_skip": 4, "model": "tiny-b"})));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["metadata"]["clip_skip"], 4);
}

#[test]
fn sizes_and_vaes_the_model_cannot_take_are_refused_at_submit_in_every_dialect() {
    let (_root, s) = server("sizes");
    // A1111's hr_resize_x 328 from 256x256: 328x328, 41 cells of 8, whole cells of a factor-8
    // VAE but not of vae16's factor 16.
    let a1111_hires = |model: &str| {
        a1111(
            json!({"enable_hr": true, "hr_resize_x": 328, "hr_second_pass_steps": 2,
                     "override_settings": {"sd_model_checkpoint": model}}),
        )
    };
    let r = post_json_to(s.addr, "/sdapi/v1/txt2img", &a1111_hires("vae16"));
    let rules = refused(&r);
    assert_eq!(rules.len(), 1, "{rules:?}");
    assert!(
        rules[0].starts_with("hr_resize_x: ") && rules[0].contains("multiple of 16"),
        "{rules:?}"
    );
    // Native sizes are multiples of 64: whole cells of 16. 320x384 to 448x448 is upscaled to
    // 448x537 first (A1111's cover; any size, the encoder floors it to whole cells), then
    // cropped in latent cells: vae16 takes it.
    let hires = json!({"width": 320, "height": 384,
                       "hires": {"width": 448, "height": 448, "steps": 2}});
    let mut on_vae16 = hires.clone();
    on_vae16["model"] = json!("vae16");
    for body in [native(on_vae16), native(hires)] {
        // Queued (and cancelled: it need not run).
        let r = post_json_to(s.addr, "/jobs", &body);
        assert_eq!(r.status, 202, "{}", r.text());
        let id = r.json()["id"].as_str().unwrap().to_string();
        let r = s.request("DELETE", &format!("/jobs/{id}"), &[], b"");
        assert_eq!(r.status, 200, "{}", r.text());
    }

    // A VAE folder of factor 16 cannot decode the default's factor-8 latents.
    jobs_refuse(
        &s,
        &native(json!({"vae": "factor16"})),
        &["vae"],
        "its downscale factor is 16, the model's 8",
    );
    let r = post_json_to(
        s.addr,
        "/sdapi/v1/txt2img",
        &a1111(json!({"override_settings": {"sd_vae": "factor16"}})),
    );
    assert!(
        refused(&r)[0].starts_with("override_settings.sd_vae: "),
        "{}",
        r.text()
    );
    let (param, _) = openai_refused(&post_json_to(
        s.addr,
        "/v1/images/generations",
        &openai(json!({"vae": "factor16"})),
    ));
    assert_eq!(param, "vae");
    // It is vae16's own factor: there it fits.
    let r = post_json_to(
        s.addr,
        "/jobs",
        &native(json!({"vae": "factor16", "model": "vae16"})),
    );
    assert_eq!(r.status, 202, "{}", r.text());
}

#[test]
fn a_lora_that_does_not_fit_the_named_model_is_refused_at_submit_in_every_dialect() {
    let (_root, s) = server("loras");
    // The fixtures fit the loaded tiny-a-vae8 (tiny-a's UNet and text encoder)...
    let listed = s.get("/loras").json();
    assert!(
        listed["loras"]
            .as_array()
            .unwrap()
            .iter()
            .all(|l| l["error"].is_null()),
        "{listed}"
    );
    // ... not tiny-b, whose shapes are read from its headers before it is loaded: the LoRA
    // and its first layer without a weight of its shape are named.
    let ink = json!([{"name": "ink_kohya", "weight": 0.5}]);
    jobs_refuse(
        &s,
        &native(json!({"model": "tiny-b", "loras": ink})),
        &["loras"],
        "\"ink_kohya\"",
    );
    let r = s.post_json(&native(
        json!({"model": "tiny-b", "prompt": "a boat <lora:ink_kohya:0.5>"}),
    ));
    let rule = &refused(&r)[0];
    // Its first layer: tiny-b's first down block has no attention (no such weight at all).
    assert!(
        rule.contains("layer lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight")
            && rule.contains("no matching unet weight"),
        "{rule}"
    );
    let r = post_json_to(
        s.addr,
        "/sdapi/v1/txt2img",
        &a1111(json!({"prompt": "a boat <lora:ink_kohya:0.5>",
                      "override_settings": {"sd_model_checkpoint": "tiny-b"}})),
    );
    assert!(refused(&r)[0].contains("\"ink_kohya\""), "{}", r.text());
    let (param, message) = openai_refused(&post_json_to(
        s.addr,
        "/v1/images/generations",
        &openai(json!({"model": "tiny-b", "loras": ink})),
    ));
    assert_eq!(param, "loras", "{message}");
    // vae16 has tiny-a's UNet and text encoder: it fits there.
    let r = post_json_to(
        s.addr,
        "/jobs",
        &native(json!({"model": "vae16", "loras": ink})),
    );
    assert_eq!(r.status, 202, "{}", r.text());
    drop(s);

    // On a server whose loaded model they do not fit, a named model they fit runs them.
    let (_root, s) = server_on("loras-b", "tiny-b");
    let listed = s.get("/loras").json();
    assert_eq!(listed["model"], "tiny-b", "{listed}");
    assert!(
        listed["loras"]
            .as_array()
            .unwrap()
            .iter()
            .all(|l| l["error"].is_string()),
        "{listed}"
    );
    let r = s.post_json(&native(json!({"model": "tiny-a-vae8", "loras": ink})));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["metadata"]["loras"], ink);
    jobs_refuse(
        &s,
        &native(json!({"loras": ink})),
        &["loras"],
        "\"ink_kohya\"",
    );
}

#[test]
fn lora_verdicts_stay_the_default_model_s_while_the_worker_holds_another() {
    let (_root, s) = server("held");
    let ink = json!([{"name": "ink_kohya", "weight": 0.5}]);
    let fits_all = |listed: &Value| {
        listed["loras"]
            .as_array()
            .unwrap()
            .iter()
            .all(|l| l["error"].is_null())
    };
    // A job on tiny-b (which the LoRA fixtures do not fit): the worker holds it after.
    let r = s.post_json(&native(json!({"model": "tiny-b"})));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(s.get("/health").json()["loaded_model"]["name"], "tiny-b");
    // LORA_DIR read again now, by A1111's refresh and the native one: the verdicts are still
    // the default model's, which requests naming no model run on.
    let r = post_json_to(s.addr, "/sdapi/v1/refresh-loras", &json!({}));
    assert_eq!(r.status, 200, "{}", r.text());
    let listed = s.get("/loras").json();
    assert!(fits_all(&listed), "{listed}");
    // The listing names the model it judged against: the default, not the one held.
    assert_eq!(listed["model"], "tiny-a-vae8", "{listed}");
    let r = post_json_to(s.addr, "/adapters/refresh", &json!({}));
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(fits_all(&r.json()), "{}", r.text());
    assert_eq!(r.json()["model"], "tiny-a-vae8", "{}", r.text());
    // The embeddings too: vectors of tiny-a's width (32) fit the default model, though not
    // tiny-b's 48-wide text encoder, which the worker holds.
    let embeddings = r.json()["embeddings"].clone();
    assert_eq!(embeddings.as_array().unwrap().len(), 2, "{embeddings}");
    for e in embeddings.as_array().unwrap() {
        assert_eq!(e["shape"], 32, "{e}");
        assert!(e["error"].is_null(), "{e}");
    }
    let a1111 = s.get("/sdapi/v1/embeddings").json();
    assert_eq!(a1111["skipped"], json!({}), "{a1111}");
    assert_eq!(a1111["loaded"].as_object().unwrap().len(), 2, "{a1111}");
    // So such a request with a LoRA is queued and runs (on the default model again).
    let r = s.post_json(&native(json!({"loras": ink})));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["metadata"]["loras"], ink);
    // And one naming tiny-b is still refused at submit.
    jobs_refuse(
        &s,
        &native(json!({"model": "tiny-b", "loras": ink})),
        &["loras"],
        "\"ink_kohya\"",
    );
}

#[test]
fn single_file_models_are_checked_at_submit_from_their_names_and_shapes() {
    // On tiny-b (3 text layers; the LoRA fixtures, made for tiny-a, do not fit it).
    let (_root, s) = server_on("single", "tiny-b");
    let ink = json!([{"name": "ink_kohya", "weight": 0.5}]);
    for model in ["tiny-a.safetensors", "tiny-a-pickle.ckpt"] {
        // tiny-a's text encoder has 2 layers: clip skip 4 is past it, read from the file's
        // names before it is converted or loaded (the worker would have refused it later).
        jobs_refuse(
            &s,
            &native(json!({"clip_skip": 4, "model": model})),
            &["clip_skip"],
            "at most 3",
        );
        // The LoRAs fit it, though not the loaded tiny-b: queued (and cancelled).
        let r = post_json_to(
            s.addr,
            "/jobs",
            &native(json!({"model": model, "loras": ink})),
        );
        assert_eq!(r.status, 202, "{model}: {}", r.text());
        let id = r.json()["id"].as_str().unwrap().to_string();
        let r = s.request("DELETE", &format!("/jobs/{id}"), &[], b"");
        assert_eq!(r.status, 200, "{}", r.text());
    }
}
