//! The hires fix with an UPSCALERS_DIR model over real HTTP on the real tiny model (`tiny-b`,
//! 256 -> 384, the tiny ESRGAN of tools/make_esrgan_fixtures.py as `4x-Tiny`): A1111's
//! `hr_upscaler` and native `hires.upscaler` make the same image, the model's (not Lanczos'),
//! (and OpenAI's `hires` extra) with `Hires upscaler: 4x-Tiny` in the infotext, the name in the
//! metadata and the job's record; an unknown name is a 422 (OpenAI: 400) at submit naming the
//! field and listing the names.

use crate::common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::hires::{a1111, native};
use common::{decode_png, ok, post_json_to, Server};
use serde_json::{json, Value};

fn server(dir: &std::path::Path) -> Server {
    common::tiny_server(
        "hires-upscaler",
        &[
            ("RESPONSE_CACHE_MB", "0"),
            ("UPSCALERS_DIR", dir.to_str().unwrap()),
        ],
    )
}

fn upscalers_dir(tag: &str) -> PathBuf {
    let fixtures = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../pipeline/tests/fixtures/esrgan")
        .join("x4-old.pth");
    let dir = std::env::temp_dir().join(format!(
        "sdserve-hires-upscalers-{tag}-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(fixtures, dir.join("4x-Tiny.pth")).unwrap();
    dir
}

#[test]
fn an_upscalers_dir_model_runs_the_hires_fix_in_every_dialect() {
    let dir = upscalers_dir("dialects");
    let s = server(&dir);
    let body = ok(&s.post_json(&native(json!({"scale": 1.5, "upscaler": "4x-Tiny"}))));
    let (w, h, pixels, text) = decode_png(body["image_base64"].as_str().unwrap());
    assert_eq!((w, h), (384, 384));
    assert_eq!(body["metadata"]["hires"]["upscaler"], "4x-Tiny");
    let text = text.unwrap();
    assert!(text.contains("Hires upscaler: 4x-Tiny"), "{text}");

    let a = ok(&post_json_to(
        s.addr,
        "/sdapi/v1/txt2img",
        &a1111(json!({"hr_scale": 1.5, "hr_upscaler": "4x-Tiny"})),
    ));
    assert!(
        pixels == decode_png(a["images"][0].as_str().unwrap()).2,
        "native and A1111 differ"
    );
    let info: Value = serde_json::from_str(a["info"].as_str().unwrap()).unwrap();
    let infotext = info["infotexts"][0].as_str().unwrap();
    assert!(infotext.contains("Hires upscaler: 4x-Tiny"), "{infotext}");

    // OpenAI's images/generations takes the native object in its extras: the same image.
    let openai = |upscaler: &str| {
        post_json_to(
            s.addr,
            "/v1/images/generations",
            &json!({"prompt": "a lighthouse", "size": "256x256", "response_format": "b64_json",
                    "negative_prompt": "blurry", "seed": 11, "steps": 2, "guidance_scale": 6.0,
                    "scheduler": "euler", "hires": {"scale": 1.5, "upscaler": upscaler},
                    "step_rule": "a1111"}),
        )
    };
    let o = openai("4x-Tiny");
    assert_eq!(o.status, 200, "{}", o.text());
    assert!(pixels == decode_png(o.json()["data"][0]["b64_json"].as_str().unwrap()).2);
    let o = openai("4x-Missing");
    assert_eq!(o.status, 400, "{}", o.text());
    let e = &o.json()["error"];
    assert_eq!(e["param"], "hires.upscaler", "{e}");
    assert!(e["message"].as_str().unwrap().contains("4x-Tiny"), "{e}");

    // The model made it: Lanczos makes another image.
    let lanczos = ok(&s.post_json(&native(json!({"scale": 1.5, "upscaler": "Lanczos"}))));
    assert!(pixels != decode_png(lanczos["image_base64"].as_str().unwrap()).2);

    // A job: its record names the upscaler, its result is the same image.
    let job = common::job_to_end(&s, &native(json!({"scale": 1.5, "upscaler": "4x-Tiny"})));
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["request"]["hires"]["upscaler"], "4x-Tiny", "{job}");
    let result = &job["result"]["image_base64"];
    assert!(pixels == decode_png(result.as_str().unwrap()).2);

    // Unknown names: a 422 before anything is queued, naming the field and the names.
    for (path, body, field) in [
        (
            "/generate",
            native(json!({"scale": 1.5, "upscaler": "4x-Missing"})),
            "hires.upscaler",
        ),
        (
            "/jobs",
            native(json!({"scale": 1.5, "upscaler": "4x-Missing"})),
            "hires.upscaler",
        ),
        (
            "/sdapi/v1/txt2img",
            a1111(json!({"hr_scale": 1.5, "hr_upscaler": "4x-Missing"})),
            "hr_upscaler",
        ),
    ] {
        let r = post_json_to(s.addr, path, &body);
        let e = r.error(422, "validation_error");
        let details = e["details"].to_string();
        assert!(details.contains(field), "{path}: {e}");
        for name in ["4x-Missing", "4x-Tiny", "Latent (bicubic)", "Lanczos"] {
            assert!(details.contains(name), "{path}: {name} in {e}");
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A random RRDBNet of the common models' widths (nf 64, gc 32, x4; `blocks` RRDBs), in
/// ESRGAN's old key names: slow enough on a CPU (seconds a tile) to be cancelled midway.
fn write_slow_esrgan(path: &std::path::Path, blocks: usize) {
    use candle_core::{Device, Tensor};
    let (nf, gc) = (64, 32);
    let mut t = std::collections::HashMap::new();
    let mut conv = |name: String, out: usize, inp: usize| {
        let w =
            (Tensor::randn(0f32, 1f32, (out, inp, 3, 3), &Device::Cpu).unwrap() * 0.02).unwrap();
        t.insert(format!("{name}.weight"), w);
        t.insert(
            format!("{name}.bias"),
            Tensor::zeros(out, candle_core::DType::F32, &Device::Cpu).unwrap(),
        );
    };
    conv("model.0".into(), nf, 3);
    for b in 0..blocks {
        for r in 1..=3 {
            for j in 1..=5 {
                let out = if j == 5 { nf } else { gc };
                conv(
                    format!("model.1.sub.{b}.RDB{r}.conv{j}.0"),
                    out,
                    nf + (j - 1) * gc,
                );
            }
        }
    }
    conv(format!("model.1.sub.{blocks}"), nf, nf);
    for i in [3, 6, 8] {
        conv(format!("model.{i}"), nf, nf);
    }
    conv("model.10".into(), 3, nf);
    candle_core::safetensors::save(&t, path).unwrap();
}

/// Cancelling a hires job while its upscaler model runs stops it before the next tile: the
/// job ends cancelled with its progress at the first pass's last step (a cancel seen only at
/// the next step would let the upscale finish and count a second-pass step first).
#[test]
fn a_cancelled_hires_job_stops_within_an_upscaler_tile() {
    let dir = upscalers_dir("cancel");
    write_slow_esrgan(&dir.join("4x-Slow.safetensors"), 8);
    let s = server(&dir);
    let r = common::request(
        s.addr,
        "POST",
        "/jobs",
        &[("Content-Type", "application/json")],
        native(json!({"scale": 1.5, "upscaler": "4x-Slow"}))
            .to_string()
            .as_bytes(),
    );
    assert_eq!(r.status, 202, "{}", r.text());
    let id = r.json()["id"].as_str().unwrap().to_string();
    let until = Instant::now() + Duration::from_secs(300);
    // The first pass's 2 steps done: the upscale (4 tiles of 192 px on the 256 px image) runs.
    loop {
        let j = s.get(&format!("/jobs/{id}")).json();
        assert!(
            j["status"] != "succeeded",
            "it ended before the upscale: {j}"
        );
        if j["progress"]["step"] == 2 || Instant::now() > until {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let cancelled_at = Instant::now();
    let r = common::request(s.addr, "DELETE", &format!("/jobs/{id}"), &[], b"");
    assert!(r.status < 300, "{}", r.text());
    let job = loop {
        let j = s.get(&format!("/jobs/{id}")).json();
        if ["succeeded", "failed", "cancelled"].contains(&j["status"].as_str().unwrap())
            || Instant::now() > until
        {
            break j;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    eprintln!(
        "cancelled {:.1}s after the DELETE",
        cancelled_at.elapsed().as_secs_f64()
    );
    assert_eq!(job["status"], "cancelled", "{job}");
    assert_eq!(job["progress"]["step"], 2, "a second-pass step ran: {job}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A SwinIR file (tools/make_swinir_fixtures.py's nearest+conv x4, as A1111's "SwinIR 4x" is)
/// runs the hires fix as an ESRGAN one does: native and A1111 make the same image, the
/// model's (not Lanczos'), named in the infotext.
#[test]
fn a_swinir_model_runs_the_hires_fix() {
    let dir = upscalers_dir("swinir");
    std::fs::copy(
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../pipeline/tests/fixtures/swinir/nc-x4.pth"),
        dir.join("SwinIR-Tiny.pth"),
    )
    .unwrap();
    let s = server(&dir);
    let image = |upscaler: &str| {
        let body = ok(&s.post_json(&native(json!({"scale": 1.5, "upscaler": upscaler}))));
        let (w, h, pixels, text) = decode_png(body["image_base64"].as_str().unwrap());
        assert_eq!((w, h), (384, 384));
        (pixels, text.unwrap())
    };
    let (pixels, text) = image("SwinIR-Tiny");
    assert!(text.contains("Hires upscaler: SwinIR-Tiny"), "{text}");
    let a = ok(&post_json_to(
        s.addr,
        "/sdapi/v1/txt2img",
        &a1111(json!({"hr_scale": 1.5, "hr_upscaler": "SwinIR-Tiny"})),
    ));
    assert!(
        pixels == decode_png(a["images"][0].as_str().unwrap()).2,
        "native and A1111 differ"
    );
    assert!(pixels != image("Lanczos").0);
    std::fs::remove_dir_all(&dir).unwrap();
}
