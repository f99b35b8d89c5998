//! `sdserve generate` against the HTTP API, flag by flag: for the same request the real binary
//! writes the PNG `/generate` answers, pixel for pixel, with the same `parameters` text; a
//! refused value names its flag. The model is tiny-a-vae8 (the LoRA fixtures fit its UNet and
//! text encoder, `fixtures/vae`'s VAEs its latents), with the LoRA, VAE and styles folders the
//! server has too.

use crate::common;

use std::path::PathBuf;
use std::process::Output;
use std::time::Duration;

use common::{decode_png, Server};
use serde_json::{json, Value};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../pipeline/tests/fixtures")
}

fn styles_file() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/styles/styles.csv")
}

/// A test's scratch folder (model cache and PNGs), removed at the end.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("sdserve-generate-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("cache")).unwrap();
        Self(dir)
    }

    fn cache(&self) -> PathBuf {
        self.0.join("cache")
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What the server and the command line share: the model and its folders.
fn folders() -> [(&'static str, &'static str, PathBuf); 4] {
    [
        ("MODEL_ID", "--model", fixtures().join("tiny-a-vae8")),
        ("LORA_DIR", "--lora-dir", fixtures().join("adapters/loras")),
        ("VAE_DIR", "--vae-dir", fixtures().join("vae")),
        ("STYLES_FILE", "--styles-file", styles_file()),
    ]
}

fn server(scratch: &Scratch) -> Server {
    let mut env: Vec<(String, String)> = folders()
        .into_iter()
        .map(|(k, _, v)| (k.to_string(), v.to_string_lossy().into_owned()))
        .collect();
    env.extend([
        (
            "MODEL_CACHE_DIR".to_string(),
            scratch.cache().to_string_lossy().into_owned(),
        ),
        ("RESPONSE_CACHE_MB".to_string(), "0".to_string()),
        ("GENERATION_TIMEOUT_SECONDS".to_string(), "300".to_string()),
    ]);
    let s = Server::start(&env);
    s.wait_ready(Duration::from_secs(300));
    s
}

/// The request every case starts from, as JSON and as flags.
fn base() -> Value {
    json!({"prompt": "a red house on a hill", "negative_prompt": "fog", "steps": 2,
           "width": 256, "height": 256, "seed": 5, "guidance_scale": 6.0, "scheduler": "euler"})
}

/// `base()` as flags, with `prompt` for its prompt.
fn base_flags(prompt: &str) -> Vec<String> {
    let mut flags = vec!["--prompt".to_string(), prompt.to_string()];
    for (flag, value) in [
        ("--negative-prompt", "fog"),
        ("--steps", "2"),
        ("--width", "256"),
        ("--height", "256"),
        ("--seed", "5"),
        ("--guidance-scale", "6.0"),
        ("--scheduler", "euler"),
    ] {
        flags.extend([flag.to_string(), value.to_string()]);
    }
    flags
}

/// Runs `sdserve generate` with the base flags for `prompt` and `flags`, writing `out.png`
/// in the scratch folder.
fn run_cli(scratch: &Scratch, prompt: &str, flags: &[&str]) -> Output {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_sdserve"));
    cmd.args(["generate", "--device", "cpu"]);
    for (_, flag, path) in folders() {
        cmd.arg(flag).arg(path);
    }
    cmd.args(base_flags(prompt))
        .args(flags)
        .arg("-o")
        .arg(scratch.0.join("out.png"))
        .env_clear()
        .env("MODEL_CACHE_DIR", scratch.cache())
        .output()
        .unwrap()
}

/// A base64 PNG's pixels and parameters text.
fn png(b64: &str) -> (Vec<u8>, String) {
    let (_, _, pixels, text) = decode_png(b64);
    (pixels, text.expect("a parameters chunk"))
}

/// The PNG `generate` wrote.
fn written(scratch: &Scratch) -> (Vec<u8>, String) {
    use base64::Engine as _;
    let bytes = std::fs::read(scratch.0.join("out.png")).unwrap();
    png(&base64::engine::general_purpose::STANDARD.encode(bytes))
}

/// `/generate`'s image for `base()` with `fields`.
fn http_image(scratch: &Scratch, fields: &Value) -> (Vec<u8>, String) {
    let s = server(scratch);
    let mut body = base();
    for (k, v) in fields.as_object().unwrap() {
        body[k] = v.clone();
    }
    let r = s.post_json(&body);
    assert_eq!(r.status, 200, "{}", r.text());
    png(r.json()["image_base64"].as_str().unwrap())
}

/// `/generate` for `base()` plus `fields`, and `generate` with the base flags (the prompt of
/// `fields` if it has one) plus `flags`: the same pixels and the same parameters text, which
/// is returned.
fn same_as_http(tag: &str, fields: Value, flags: &[&str]) -> String {
    let scratch = Scratch::new(tag);
    let (http_pixels, http_text) = http_image(&scratch, &fields);
    let prompt = fields["prompt"]
        .as_str()
        .unwrap_or(base()["prompt"].as_str().unwrap())
        .to_string();
    let run = run_cli(&scratch, &prompt, flags);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{flags:?}: {stderr}");
    let (cli_pixels, cli_text) = written(&scratch);
    assert_eq!(
        cli_text, http_text,
        "{flags:?}: the parameters text differs"
    );
    assert!(
        cli_pixels == http_pixels,
        "{flags:?}: the image differs from /generate's"
    );
    cli_text
}

/// `generate` with `flags` fails, and its message is returned.
fn refused(tag: &str, flags: &[&str]) -> String {
    let scratch = Scratch::new(tag);
    let run = run_cli(&scratch, "a red house on a hill", flags);
    assert!(!run.status.success(), "{flags:?} was accepted");
    assert!(!scratch.0.join("out.png").exists());
    String::from_utf8_lossy(&run.stderr).into_owned()
}

#[test]
fn prompt_syntax_flag() {
    // The base prompt has no brackets, which both syntaxes read alike.
    let text = same_as_http(
        "syntax",
        json!({"prompt": "a (red:1.6) house [on a hill]", "prompt_syntax": "plain"}),
        &["--prompt-syntax", "plain"],
    );
    assert!(text.contains("Prompt syntax: plain"), "{text}");
    let e = refused("syntax-bad", &["--prompt-syntax", "comfy"]);
    assert!(e.contains("--prompt-syntax: must be one of"), "{e}");
}

#[test]
fn clip_skip_flag() {
    let text = same_as_http("clip", json!({"clip_skip": 2}), &["--clip-skip", "2"]);
    assert!(text.contains("Clip skip: 2"), "{text}");
    let e = refused("clip-bad", &["--clip-skip", "9"]);
    assert!(
        e.contains("--clip-skip: must be an integer between 1 and 4 (got 9)"),
        "{e}"
    );
}

#[test]
fn loras_flag() {
    let text = same_as_http(
        "loras",
        json!({"loras": [{"name": "ink_kohya", "weight": 0.7}, {"name": "soft_peft"}]}),
        &["--loras", "ink_kohya:0.7", "--lora", "soft_peft"],
    );
    assert!(
        text.contains("<lora:ink_kohya:0.7> <lora:soft_peft:1>"),
        "{text}"
    );
    let e = refused("loras-bad", &["--loras", "nothing_here"]);
    assert!(e.contains("--loras: ") && e.contains("nothing_here"), "{e}");
    let e = refused("loras-weight", &["--loras", "ink_kohya:9"]);
    assert!(e.contains("--loras: [0].weight"), "{e}");
}

#[test]
fn vae_flag() {
    let text = same_as_http(
        "vae",
        json!({"vae": "alt.safetensors"}),
        &["--vae", "alt.safetensors"],
    );
    assert!(text.contains(", VAE: alt.safetensors"), "{text}");
    let e = refused("vae-bad", &["--vae", "missing.safetensors"]);
    assert!(
        e.contains("--vae: no VAE named \"missing.safetensors\""),
        "{e}"
    );
    assert!(
        !e.contains("loading"),
        "refused before the model loads: {e}"
    );
}

#[test]
fn variation_seed_flags() {
    let text = same_as_http(
        "variation",
        json!({"variation_seed": 22, "variation_strength": 0.5}),
        &["--variation-seed", "22", "--variation-strength", "0.5"],
    );
    assert!(
        text.contains("Variation seed: 22, Variation seed strength: 0.5"),
        "{text}"
    );
    let e = refused("variation-bad", &["--variation-strength", "1.5"]);
    assert!(e.contains("--variation-strength: "), "{e}");
}

#[test]
fn seed_resize_flags() {
    let text = same_as_http(
        "resize",
        json!({"seed_resize_from_width": 320, "seed_resize_from_height": 192}),
        &[
            "--seed-resize-from-width",
            "320",
            "--seed-resize-from-height",
            "192",
        ],
    );
    assert!(text.contains("Seed resize from: 320x192"), "{text}");
    // Both or neither.
    let e = refused("resize-half", &["--seed-resize-from-width", "320"]);
    assert!(
        e.contains("--seed-resize-from-height: required with"),
        "{e}"
    );
}

#[test]
fn styles_flag() {
    let text = same_as_http(
        "styles",
        json!({"styles": ["Cinematic", "Appended"]}),
        &["--styles", "Cinematic", "--styles", "Appended"],
    );
    assert!(
        text.starts_with(
            "cinematic film still a red house on a hill . shallow depth of field, vignette, masterpiece, best quality\n"
        ),
        "{text}"
    );
    let e = refused("styles-bad", &["--styles", "Nope"]);
    assert!(e.contains("--styles: unknown style \"Nope\""), "{e}");
}

#[test]
fn mask_image_flag_and_its_old_name() {
    let scratch = Scratch::new("mask");
    let init = fixtures().join("vae/init-256.png");
    let mask = scratch.0.join("mask.png");
    // The right half repainted.
    let mut m = image::RgbImage::new(256, 256);
    for (x, _, p) in m.enumerate_pixels_mut() {
        *p = image::Rgb(if x >= 128 { [255; 3] } else { [0; 3] });
    }
    m.save(&mask).unwrap();
    use base64::Engine as _;
    let b64 =
        |p: &PathBuf| base64::engine::general_purpose::STANDARD.encode(std::fs::read(p).unwrap());
    let fields = json!({"init_image": b64(&init), "mask_image": b64(&mask), "strength": 0.75});
    let (http_pixels, http_text) = http_image(&scratch, &fields);
    for name in ["--mask-image", "--mask"] {
        let run = run_cli(
            &scratch,
            "a red house on a hill",
            &[
                "--init-image",
                init.to_str().unwrap(),
                name,
                mask.to_str().unwrap(),
                "--strength",
                "0.75",
            ],
        );
        assert!(
            run.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&run.stderr)
        );
        let (pixels, text) = written(&scratch);
        assert_eq!(text, http_text, "{name}");
        assert!(text.contains("Mode: inpaint"), "{text}");
        assert!(
            pixels == http_pixels,
            "{name}: the image differs from /generate's"
        );
    }
    let e = refused("mask-alone", &["--mask-image", mask.to_str().unwrap()]);
    assert!(e.contains("--mask-image: only with init_image"), "{e}");
}

#[test]
fn tiling_and_schedule_flags() {
    let text = same_as_http(
        "tiling",
        json!({"tiling": true, "schedule": "karras"}),
        &["--tiling", "--schedule", "karras"],
    );
    assert!(
        text.contains("Schedule type: Karras") && text.contains("Tiling: True"),
        "{text}"
    );
    let e = refused("schedule-bad", &["--schedule", "fancy"]);
    assert!(e.contains("--schedule: must be one of"), "{e}");
}
