//! VAE_DIR over real HTTP on real files: tiny-a-vae8 with an external VAE (`fixtures/vae`,
//! `tools/make_vae_fixtures.py`). A native and an A1111 request naming it get diffusers' image
//! with `vae=AutoencoderKL.from_single_file(...)` swapped in (txt2img, and img2img whose init
//! image it also encodes); the next request without one gets the model's own image again,
//! pixel for pixel that of a job run before any swap. Listings, infotexts, metadata, cache key,
//! A1111's options, unknown names and a VAE that does not fit.

use crate::common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use common::{copy_tree, decode_png, Server};
use serde_json::{json, Value};
use sha2::Digest as _;

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

/// The diffusers references and their requests.
struct Refs {
    tensors: std::collections::HashMap<String, candle_core::Tensor>,
    cases: Value,
}

impl Refs {
    fn load() -> Self {
        let tensors = candle_core::safetensors::load(
            fixture("vae/references.safetensors"),
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let text = std::fs::read_to_string(fixture("vae/references.json")).unwrap();
        let meta: Value = serde_json::from_str(&text).unwrap();
        Self {
            tensors,
            cases: meta["cases"].clone(),
        }
    }

    /// The native request of a case (without `vae`).
    fn native(&self, case: &str) -> Value {
        let c = &self.cases[case];
        let mut r = json!({
            "prompt": c["prompt"], "negative_prompt": c["negative_prompt"], "steps": c["steps"],
            "width": c["width"], "height": c["height"], "seed": c["seed"],
            "guidance_scale": c["guidance_scale"], "scheduler": c["scheduler"],
        });
        if let Some(init) = c["init_image"].as_str() {
            let png = std::fs::read(fixture("vae").join(init)).unwrap();
            r["init_image"] = json!(base64::engine::general_purpose::STANDARD.encode(png));
            r["strength"] = c["strength"].clone();
        }
        r
    }

    /// The same bound as the pipeline's `common::image_failure` (mean abs diff <= 1/255 of the
    /// range, at most 0.5 % of values off by more than 8).
    fn check(&self, case: &str, pixels: &[u8]) {
        let reference: Vec<u8> = self.tensors[&format!("image.{case}")]
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(pixels.len(), reference.len(), "{case}");
        let diffs: Vec<i32> = pixels
            .iter()
            .zip(&reference)
            .map(|(&a, &b)| (a as i32 - b as i32).abs())
            .collect();
        let mean = diffs.iter().map(|&d| d as f64).sum::<f64>() / diffs.len() as f64;
        let over = diffs.iter().filter(|&&d| d > 8).count() as f64 / diffs.len() as f64;
        eprintln!("{case}: mean abs diff {mean:.4}, fraction > 8: {over:.5}");
        assert!(
            mean <= 1.0 && over <= 0.005,
            "{case}: mean {mean}, >8 {over}"
        );
    }
}

/// VAE_DIR with the three forms of the external VAE and one that does not fit; a cache folder.
fn vae_folder(tag: &str) -> (Folder, PathBuf, PathBuf) {
    let root = std::env::temp_dir().join(format!("sdserve-vaes-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let vaes = root.join("vaes");
    std::fs::create_dir_all(&vaes).unwrap();
    for f in ["alt.safetensors", "alt.ckpt", "wrong-shape.safetensors"] {
        std::fs::copy(fixture("vae").join(f), vaes.join(f)).unwrap();
    }
    copy_tree(&fixture("vae/alt-diffusers"), &vaes.join("alt-diffusers"));
    std::fs::write(vaes.join("notes.txt"), b"not a VAE").unwrap();
    let cache = root.join("cache");
    std::fs::create_dir_all(&cache).unwrap();
    (Folder(root), vaes, cache)
}

fn server(vaes: &Path, cache: &Path) -> Server {
    let env = vec![
        (
            "MODEL_ID".to_string(),
            fixture("tiny-a-vae8").to_string_lossy().into_owned(),
        ),
        ("VAE_DIR".to_string(), vaes.to_string_lossy().into_owned()),
        (
            "MODEL_CACHE_DIR".to_string(),
            cache.to_string_lossy().into_owned(),
        ),
        ("GENERATION_TIMEOUT_SECONDS".to_string(), "600".to_string()),
    ];
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

/// Pixels, metadata and PNG parameters of a `/generate` 200.
fn generated(r: &common::Resp) -> (Vec<u8>, Value, String) {
    assert_eq!(r.status, 200, "{}", r.text());
    let body = r.json();
    let (_, _, px, text) = decode_png(body["image_base64"].as_str().unwrap());
    (px, body["metadata"].clone(), text.unwrap_or_default())
}

/// A job's image (jobs skip the response cache: each one runs).
fn job_pixels(s: &Server, body: &Value) -> Vec<u8> {
    let created = post(s, "/jobs", body);
    assert_eq!(created.status, 202, "{}", created.text());
    let id = created.json()["id"].as_str().unwrap().to_string();
    let stream = s.get(&format!("/jobs/{id}/events")).text();
    assert!(stream.contains("event: succeeded"), "{stream}");
    let job = s.get(&format!("/jobs/{id}")).json();
    decode_png(job["result"]["image_base64"].as_str().unwrap()).2
}

fn short_hash(path: &Path) -> String {
    let digest = sha2::Sha256::digest(std::fs::read(path).unwrap());
    digest
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<String>()[..10]
        .to_string()
}

#[test]
fn a_named_vae_decodes_as_diffusers_and_the_model_s_own_comes_back() {
    let refs = Refs::load();
    let (_root, vaes, cache) = vae_folder("native");
    let s = server(&vaes, &cache);

    let listed = s.get("/vaes").json();
    let names: Vec<&str> = listed["vaes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "alt-diffusers",
            "alt.ckpt",
            "alt.safetensors",
            "wrong-shape.safetensors"
        ],
        "{listed}"
    );
    let a1111: Value = s.get("/sdapi/v1/sd-vae").json();
    assert_eq!(
        a1111[2],
        json!({"model_name": "alt.safetensors", "filename": "alt.safetensors"})
    );

    // The model's own image, before any swap.
    let own = job_pixels(&s, &refs.native("txt2img"));

    let mut named = refs.native("txt2img");
    named["vae"] = json!("alt.safetensors");
    let r = post(&s, "/generate", &named);
    let (px, meta, text) = generated(&r);
    refs.check("txt2img", &px);
    assert_ne!(px, own);
    assert_eq!(meta["vae"], "alt.safetensors");
    let hash = short_hash(&vaes.join("alt.safetensors"));
    assert!(
        text.contains(&format!("VAE hash: {hash}, VAE: alt.safetensors")),
        "{text}"
    );
    // Listed with its hash once used.
    let listed = s.get("/vaes").json();
    assert_eq!(listed["vaes"][2]["sha256"].as_str().unwrap()[..10], hash);

    // The model's own again: the pixels of the job before the swap.
    assert_eq!(job_pixels(&s, &refs.native("txt2img")), own);

    // img2img encodes the init image with it too; as a job, with `automatic` the own again.
    let mut img2img = refs.native("img2img");
    img2img["vae"] = json!("alt.safetensors");
    let (px, _, _) = generated(&post(&s, "/generate", &img2img));
    refs.check("img2img", &px);
    let mut automatic = refs.native("txt2img");
    automatic["vae"] = json!("automatic");
    assert_eq!(job_pixels(&s, &automatic), own);

    // The .ckpt and the diffusers folder hold the same weights: the same image.
    for other in ["alt.ckpt", "alt-diffusers"] {
        let mut r = refs.native("txt2img");
        r["vae"] = json!(other);
        let (other_px, meta, _) = generated(&post(&s, "/generate", &r));
        assert!(other_px == px_of(&s, &named), "{other}");
        assert_eq!(meta["vae"], other);
    }

    // An unknown name, and a VAE whose shapes do not fit: 422s naming `vae`; the own VAE stays.
    let mut unknown = refs.native("txt2img");
    unknown["vae"] = json!("missing.safetensors");
    assert_eq!(post(&s, "/generate", &unknown).broken_fields(), ["vae"]);
    let mut wrong = refs.native("txt2img");
    wrong["vae"] = json!("wrong-shape.safetensors");
    let r = post(&s, "/generate", &wrong);
    assert_eq!(r.broken_fields(), ["vae"], "{}", r.text());
    assert!(!r.text().contains(vaes.to_str().unwrap()), "{}", r.text());
    assert!(r.text().contains("shape"), "{}", r.text());
    // Known from the file's names and shapes when it is submitted: no job is made for it.
    let jobs = |s: &Server| s.get("/jobs").json()["jobs"].as_array().unwrap().len();
    let before = jobs(&s);
    let r = post(&s, "/jobs", &wrong);
    assert_eq!(r.broken_fields(), ["vae"], "{}", r.text());
    assert!(
        r.text()
            .contains("blocks of [8, 8, 16, 8] channels, the model's VAE [8, 8, 16, 16]"),
        "{}",
        r.text()
    );
    assert_eq!(jobs(&s), before);
    assert_eq!(job_pixels(&s, &refs.native("txt2img")), own);
}

/// `/generate`'s pixels (a cache hit after the first time).
fn px_of(s: &Server, body: &Value) -> Vec<u8> {
    generated(&post(s, "/generate", body)).0
}

#[test]
fn a1111_chooses_the_vae_by_override_and_by_options() {
    let refs = Refs::load();
    let (_root, vaes, cache) = vae_folder("a1111");
    let s = server(&vaes, &cache);
    let c = &refs.cases["txt2img"];
    let request = |override_vae: Option<&str>| {
        let mut r = json!({
            "prompt": c["prompt"], "negative_prompt": c["negative_prompt"],
            "steps": c["steps"], "cfg_scale": c["guidance_scale"], "width": c["width"],
            "height": c["height"], "seed": c["seed"], "sampler_name": "Euler",
        });
        if let Some(v) = override_vae {
            r["override_settings"] = json!({"sd_vae": v});
        }
        r
    };
    let run = |body: &Value| {
        let r = post(&s, "/sdapi/v1/txt2img", body);
        assert_eq!(r.status, 200, "{}", r.text());
        let body = r.json();
        let (_, _, px, _) = decode_png(body["images"][0].as_str().unwrap());
        let info: Value = serde_json::from_str(body["info"].as_str().unwrap()).unwrap();
        (px, info)
    };
    let (own, info) = run(&request(None));
    assert_eq!(info["sd_vae_name"], Value::Null);
    assert_eq!(s.get("/sdapi/v1/options").json()["sd_vae"], "Automatic");

    let (px, info) = run(&request(Some("alt.safetensors")));
    refs.check("txt2img", &px);
    let hash = short_hash(&vaes.join("alt.safetensors"));
    assert_eq!(info["sd_vae_name"], "alt.safetensors");
    assert_eq!(info["sd_vae_hash"], hash.as_str());
    let infotext = info["infotexts"][0].as_str().unwrap();
    assert!(
        infotext.contains(&format!("VAE hash: {hash}, VAE: alt.safetensors")),
        "{infotext}"
    );

    // A name that is not there falls back to the model's own, as A1111 falls back.
    assert_eq!(run(&request(Some("missing.pt"))).0, own);
    assert_eq!(run(&request(Some("None"))).0, own);

    // POST options: for the later requests; an unknown one is a 422 naming sd_vae.
    let set = post(&s, "/sdapi/v1/options", &json!({"sd_vae": "alt-diffusers"}));
    assert_eq!(set.status, 200, "{}", set.text());
    assert_eq!(s.get("/sdapi/v1/options").json()["sd_vae"], "alt-diffusers");
    let (via_options, info) = run(&request(None));
    assert_eq!(via_options, px);
    assert_eq!(info["sd_vae_name"], "alt-diffusers");
    let bad = post(&s, "/sdapi/v1/options", &json!({"sd_vae": "missing.pt"}));
    assert_eq!(bad.broken_fields(), ["sd_vae"]);
    assert_eq!(
        post(&s, "/sdapi/v1/options", &json!({"sd_vae": "Automatic"})).status,
        200
    );
    assert_eq!(run(&request(None)).0, own);
}
