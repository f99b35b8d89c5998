//! End to end on the real pipeline with the tiny random-weight model `tiny-b` (VAE factor 4,
//! no attention at the top UNet level, so 256x256 stays cheap on CPU): the served PNG must hold
//! exactly the pixels the pipeline gives for the same parameters, a returned seed must reproduce
//! the image, the cache must answer the repeat, and `sdserve generate` must write the same image.

use crate::common;

use std::ops::ControlFlow;
use std::path::PathBuf;
use std::time::Duration;

use common::{decode_png, Server};
use sdserve_pipeline::pipeline::{GenerationParams, StableDiffusion};
use sdserve_pipeline::schedulers::SchedulerKind;
use serde_json::json;

fn tiny_b() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../pipeline/tests/fixtures/tiny-b"
    ))
}

/// A scratch model cache (the hub module memoises digests there).
fn cache_dir() -> String {
    let d = std::env::temp_dir().join(format!("sdserve-e2e-cache-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.to_string_lossy().into_owned()
}

const PROMPT: &str = "a photo of an astronaut riding a horse on mars";
const NEGATIVE: &str = "blurry";

/// The same request straight through the pipeline.
fn direct(seed: u64) -> Vec<u8> {
    direct_with(seed, 1, SchedulerKind::EulerAncestral)
}

/// [`direct`] with another step count and scheduler.
fn direct_with(seed: u64, steps: usize, scheduler: SchedulerKind) -> Vec<u8> {
    let sd = StableDiffusion::load(
        &tiny_b(),
        &candle_core::Device::Cpu,
        candle_core::DType::F32,
    )
    .unwrap();
    let params = GenerationParams {
        prompt: PROMPT.into(),
        negative_prompt: NEGATIVE.into(),
        steps,
        width: 256,
        height: 256,
        seed,
        guidance_scale: 5.0,
        scheduler: Some(scheduler),
        ..Default::default()
    };
    sd.generate(&params, &mut |_| ControlFlow::Continue(()))
        .unwrap()
        .remove(0)
        .pixels
}

#[test]
fn served_image_is_the_pipelines_and_the_seed_reproduces_it() {
    let env = vec![
        (
            "MODEL_ID".to_string(),
            tiny_b().to_string_lossy().into_owned(),
        ),
        ("GENERATION_TIMEOUT_SECONDS".to_string(), "600".to_string()),
        ("MODEL_CACHE_DIR".to_string(), cache_dir()),
    ];
    let s = Server::start(&env);
    s.wait_ready(Duration::from_secs(120));
    let health = s.get("/health").json();
    assert_eq!(health["status"], "ok");
    // The memory plan chosen at load time is reported (on the CPU: no device budget).
    let plan = health["memory_plan"].as_str().unwrap_or_default();
    assert!(plan.contains("levers:"), "{health}");
    let version = health["model_version"].as_str().unwrap().to_string();
    assert!(version.starts_with("tiny-b@"), "{version}");
    s.wait_log(
        &["model ready", "load_seconds", "model_version"],
        Duration::from_secs(5),
    );
    // The start-up log names the device, dtype and memory plan.
    s.wait_log(
        &["device cpu dtype f32; memory plan: levers:"],
        Duration::from_secs(5),
    );
    // On the CPU, a measured step says what fits the deadline; the
    // probe runs once the worker has been idle for a few seconds, after /health said ready.
    let speed = s.wait_log(
        &["CPU speed: a step at 256x256 takes", "step_seconds"],
        Duration::from_secs(120),
    );
    // What fits depends on the machine's load, so only the line's shape is checked here
    // (speed::tests checks the verdicts against given timings).
    assert!(
        speed.contains("GENERATION_TIMEOUT_SECONDS=600 a lone request may be 256x256: ")
            && speed.contains(", 768x768: ")
            && speed.contains("(512x512, 20 steps) needs about"),
        "{speed}"
    );

    let body = json!({"prompt": PROMPT, "negative_prompt": NEGATIVE, "steps": 1, "width": 256, "height": 256,
                      "guidance_scale": 5.0, "scheduler": "euler_a"});
    let first = s.post_json(&body);
    assert_eq!(first.status, 200, "{}", first.text());
    assert_eq!(first.header("x-cache"), Some("miss"));
    let j = first.json();
    let m = &j["metadata"];
    assert_eq!(m["model_version"], version.as_str());
    assert_eq!(
        (m["steps"].as_u64(), m["scheduler"].as_str()),
        (Some(1), Some("euler_a"))
    );
    let seed = m["seed"].as_u64().unwrap();
    let (w, h, pixels, text) = decode_png(j["image_base64"].as_str().unwrap());
    assert_eq!((w, h), (256, 256));
    let text = text.unwrap();
    assert!(
        text.contains(&format!(
            "Negative prompt: {NEGATIVE}\nSteps: 1, Sampler: Euler a"
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!("Seed: {seed}, Size: 256x256, Model: {version}")),
        "{text}"
    );
    // Not a flat image: the model really ran.
    assert!(pixels.iter().any(|&p| p != pixels[0]));

    // The returned seed reproduces it (unseeded answers are not cached, so this one is generated).
    let mut seeded = body.clone();
    seeded["seed"] = json!(seed);
    let second = s.post_json(&seeded);
    assert_eq!(
        (second.status, second.header("x-cache")),
        (200, Some("miss"))
    );
    let (_, _, pixels2, _) = decode_png(second.json()["image_base64"].as_str().unwrap());
    assert_eq!(pixels, pixels2);
    // The repeat is a cache hit with the same body.
    let third = s.post_json(&seeded);
    assert_eq!((third.status, third.header("x-cache")), (200, Some("hit")));
    assert_eq!(third.body, second.body);

    // Exactly the pipeline's pixels for these parameters.
    assert!(
        direct(seed) == pixels,
        "served image differs from the pipeline's"
    );

    // A1111's one-word `DPM++ SDE Karras` (two UNet evaluations per step, a Brownian tree
    // seeded with the image's seed): the pipeline's dpmpp_sde_karras image, named as A1111 does.
    let r = common::post_json_to(
        s.addr,
        "/sdapi/v1/txt2img",
        &json!({"prompt": PROMPT, "negative_prompt": NEGATIVE, "seed": 77, "steps": 2,
                "cfg_scale": 5.0, "width": 256, "height": 256,
                "sampler_name": "DPM++ SDE Karras"}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let j = r.json();
    let info: serde_json::Value = serde_json::from_str(j["info"].as_str().unwrap()).unwrap();
    assert_eq!(info["sampler_name"], "DPM++ SDE", "{info}");
    let (_, _, sde_pixels, text) = decode_png(j["images"][0].as_str().unwrap());
    assert!(
        text.unwrap()
            .contains("Steps: 2, Sampler: DPM++ SDE, Schedule type: Karras"),
        "{info}"
    );
    assert!(
        direct_with(77, 2, SchedulerKind::DpmPpSdeKarras) == sde_pixels,
        "served DPM++ SDE Karras image differs from the pipeline's"
    );
}

#[test]
fn generate_command_writes_the_same_image() {
    let out = std::env::temp_dir().join(format!("sdserve-e2e-{}.png", std::process::id()));
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_sdserve"))
        .args(["generate", "--model"])
        .arg(tiny_b())
        .args([
            "--prompt",
            PROMPT,
            "--negative-prompt",
            NEGATIVE,
            "--steps",
            "1",
            "--width",
            "256",
        ])
        .args([
            "--height",
            "256",
            "--seed",
            "1234",
            "--guidance-scale",
            "5.0",
            "--scheduler",
            "euler_a",
            "-o",
        ])
        .arg(&out)
        .env_remove("MODEL_ID")
        .env("MODEL_CACHE_DIR", cache_dir())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&status.stderr);
    assert!(status.status.success(), "{stderr}");
    assert!(
        stderr.contains("1/1 steps") && stderr.contains("seed 1234"),
        "{stderr}"
    );
    // stderr is a pipe here, not a terminal: whole lines, no `\r` redraws.
    assert!(!stderr.contains('\r'), "{stderr:?}");
    use base64::Engine as _;
    let png = std::fs::read(&out).unwrap();
    let (w, h, pixels, text) = decode_png(&base64::engine::general_purpose::STANDARD.encode(png));
    assert_eq!((w, h), (256, 256));
    assert!(text.unwrap().contains("Seed: 1234"));
    assert!(
        direct(1234) == pixels,
        "CLI image differs from the pipeline's"
    );
    let _ = std::fs::remove_file(out);

    // Validation is the API's: a bad size is refused before loading anything.
    let bad = std::process::Command::new(env!("CARGO_BIN_EXE_sdserve"))
        .args(["generate", "--model"])
        .arg(tiny_b())
        .args(["--prompt", "x", "--width", "300"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("width: must be a multiple of 64"));

    // So are an unwritable output and f16 on the CPU, before the model loads.
    let refused = |extra: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_sdserve"))
            .args(["generate", "--device", "cpu", "--model"])
            .arg(tiny_b())
            .args(["--prompt", "x"])
            .args(extra)
            .env_remove("DTYPE")
            .output()
            .unwrap();
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!stderr.contains("loading"), "{stderr}");
        stderr
    };
    let stderr = refused(&["-o", "/nonexistent-sdserve-dir/out.png"]);
    assert!(
        stderr.contains("/nonexistent-sdserve-dir does not exist"),
        "{stderr}"
    );
    let stderr = refused(&["--dtype", "f16"]);
    assert!(
        stderr.contains("DTYPE=f16 is refused on the CPU"),
        "{stderr}"
    );
}

#[test]
fn bench_command_reports_json_and_keeps_the_pipelines_image() {
    let dir = std::env::temp_dir().join(format!("sdserve-e2e-bench-{}", std::process::id()));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sdserve"))
        .args(["bench", "--device", "cpu", "--model"])
        .arg(tiny_b())
        .args(["--prompt", PROMPT, "--negative-prompt", NEGATIVE])
        .args(["--sizes", "256", "--steps", "1", "--repeats", "2"])
        .args(["--seeds", "1234,7", "--schedulers", "euler_a"])
        .args(["--guidance-scale", "5.0", "--png-dir"])
        .arg(&dir)
        .env_remove("MODEL_ID")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["device"], "cpu");
    assert_eq!(report["dtype"], "f32");
    let cases = report["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 1);
    assert_eq!(cases[0]["size"], 256);
    assert_eq!(cases[0]["scheduler"], "euler_a");
    let runs = cases[0]["runs"].as_array().unwrap();
    let seeds: Vec<u64> = runs.iter().map(|r| r["seed"].as_u64().unwrap()).collect();
    assert_eq!(seeds, [1234, 7]);
    for r in runs {
        let (wall, step) = (
            r["wall_s"].as_f64().unwrap(),
            r["step_median_s"].as_f64().unwrap(),
        );
        assert!(step > 0.0 && step <= wall, "{r}");
        // No device memory on the CPU.
        assert!(r["peak_used_mb"].is_null(), "{r}");
    }
    use base64::Engine as _;
    let png = std::fs::read(dir.join("256_euler_a_1234.png")).unwrap();
    let (w, h, pixels, _) = decode_png(&base64::engine::general_purpose::STANDARD.encode(png));
    assert_eq!((w, h), (256, 256));
    assert!(
        direct(1234) == pixels,
        "bench image differs from the pipeline's"
    );
    assert!(dir.join("256_euler_a_7.png").exists());
    let _ = std::fs::remove_dir_all(&dir);

    // A size the pipeline refuses fails the command with the reason.
    let bad = std::process::Command::new(env!("CARGO_BIN_EXE_sdserve"))
        .args(["bench", "--device", "cpu", "--model"])
        .arg(tiny_b())
        .args(["--sizes", "300", "--steps", "1", "--repeats", "1"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("multiple of"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
}
