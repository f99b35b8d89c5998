//! `init_image`, `mask_image`, `strength` and `batch_size` over real HTTP against the real binary:
//! the rules with the fake generator, and the real pipeline on the tiny 9-channel inpainting model.

use crate::common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::{decode_png, fake, Server};
use serde_json::json;

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// A `w`x`h` RGB PNG with a gradient (or one grey value), encoded by the png crate.
fn png(w: u32, h: u32, grey: Option<u8>) -> Vec<u8> {
    let pixels: Vec<u8> = (0..w * h * 3)
        .map(|i| grey.unwrap_or(((i / 3) % w * 255 / w.max(1)) as u8))
        .collect();
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, w, h);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut wr = enc.write_header().unwrap();
        wr.write_image_data(&pixels).unwrap();
    }
    out
}

fn started(env: Vec<(String, String)>, within: Duration) -> Server {
    let s = Server::start(&env);
    s.wait_ready(within);
    s
}

#[test]
fn bad_images_and_image_rules_are_422s_naming_the_field() {
    let mut env = fake("step_ms=0");
    env.push(("MAX_CONCURRENT_REQUESTS".into(), "8".into()));
    let s = started(env, Duration::from_secs(10));
    let init = b64(&png(256, 256, None));
    let base = json!({"prompt": "x", "steps": 4, "init_image": init});
    let with = |extra: serde_json::Value| {
        let mut body = base.clone();
        for (k, v) in extra.as_object().unwrap() {
            if v.is_null() {
                body.as_object_mut().unwrap().remove(k);
            } else {
                body[k] = v.clone();
            }
        }
        body
    };
    // A few bytes of valid PNG header claiming 60000x60000 pixels.
    let mut huge = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut huge, 60000, 60000);
        enc.set_color(png::ColorType::Rgb);
        let mut w = enc.write_header().unwrap();
        // One tiny IDAT (an empty zlib stream): the file is well formed up to its data.
        w.write_chunk(
            png::chunk::IDAT,
            &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01],
        )
        .unwrap();
    }
    let full = png(256, 256, None);
    let bad = [
        (
            with(json!({"init_image": "%%% not base64 %%%"})),
            "init_image",
        ),
        (
            with(json!({"init_image": b64(b"just some text")})),
            "init_image",
        ),
        (with(json!({"init_image": b64(&huge)})), "init_image"),
        (
            with(json!({"init_image": b64(&full[..full.len() / 2])})),
            "init_image",
        ),
        (with(json!({"init_image": 5})), "init_image"),
        (
            with(json!({"init_image": b64(&png(5000, 8, None))})),
            "init_image",
        ),
        (
            json!({"prompt": "x", "mask_image": b64(&png(256, 256, Some(255)))}),
            "mask_image",
        ),
        (
            with(json!({"mask_image": b64(&png(256, 320, Some(255)))})),
            "mask_image",
        ),
        (with(json!({"mask_image": b64(b"GIF89a")})), "mask_image"),
        (with(json!({"strength": 1.01})), "strength"),
        (with(json!({"strength": -0.1})), "strength"),
        (with(json!({"strength": "high"})), "strength"),
        // int(4 * 0.2) = 0 steps; the default 0.8 with one step too.
        (with(json!({"strength": 0.2})), "strength"),
        (with(json!({"steps": 1})), "strength"),
        (with(json!({"batch_size": 0})), "batch_size"),
        (with(json!({"batch_size": 9})), "batch_size"),
    ];
    // Peak resident memory of the server: a decoder that allocated for the 60000x60000 header
    // (10 GB of RGB) or for any bad image would raise it.
    let peak_kb = || {
        let status = std::fs::read_to_string(format!("/proc/{}/status", s.pid())).ok()?;
        status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))?
            .split_whitespace()
            .nth(1)?
            .parse::<u64>()
            .ok()
    };
    let peak_before = peak_kb();
    for (body, field) in bad {
        let t = Instant::now();
        let r = s.post_json(&body);
        let elapsed = t.elapsed();
        assert_eq!(r.status, 422, "{field}: {}", r.text());
        r.error(422, "validation_error");
        assert_eq!(r.broken_fields(), [field], "{}", r.text());
        assert!(elapsed < Duration::from_secs(2), "{field} took {elapsed:?}");
    }
    // Nothing left behind: no job queued or running, and at most a few MB more at the peak
    // (the request bodies and one 256x256 decode), not an image buffer of the claimed size.
    if let (Some(before), Some(after)) = (peak_before, peak_kb()) {
        eprintln!("server peak RSS {before} kB before the bad images, {after} kB after");
        assert!(after < before + 64 * 1024, "{before} kB -> {after} kB");
    }
    let health = s.get("/health");
    assert_eq!(health.status, 200);
    let queue = &health.json()["queue"];
    assert_eq!(
        (queue["running"].as_u64(), queue["waiting"].as_u64()),
        (Some(0), Some(0)),
        "{queue}"
    );
    // Still healthy, and the same image with good values works.
    let ok = s.post_json(&with(json!({"strength": 0.25})));
    assert_eq!(ok.status, 200, "{}", ok.text());
}

#[test]
fn img2img_batches_answer_every_image_with_its_seed() {
    let mut env = fake("step_ms=0");
    env.push(("RESPONSE_CACHE_MB".into(), "16".into()));
    let s = started(env, Duration::from_secs(10));
    // 700x300: the size defaults to 640x256 (floored to 64, clamped), from a data: URL.
    let init = format!("data:image/png;base64,{}", b64(&png(700, 300, None)));
    let body = json!({"prompt": "x", "steps": 4, "seed": 11, "init_image": init,
                      "strength": 0.5, "batch_size": 3});
    let r = s.post_json(&body);
    assert_eq!(r.status, 200, "{}", r.text());
    let j = r.json();
    let m = &j["metadata"];
    assert_eq!(
        (m["width"].as_u64(), m["height"].as_u64()),
        (Some(640), Some(256))
    );
    assert_eq!(m["mode"], "img2img");
    assert_eq!(m["strength"].as_f64(), Some(0.5));
    assert_eq!(m["batch_size"].as_u64(), Some(3));
    assert_eq!(m["seeds"], json!([11, 12, 13]));
    let images = j["images"].as_array().unwrap();
    assert_eq!(images.len(), 3);
    assert_eq!(images[0], j["image_base64"]);
    let mut pixels = Vec::new();
    for (i, img) in images.iter().enumerate() {
        let (w, h, px, text) = decode_png(img.as_str().unwrap());
        assert_eq!((w, h), (640, 256));
        let text = text.unwrap();
        assert!(text.contains(&format!("Seed: {}", 11 + i)), "{text}");
        assert!(
            text.contains("Denoising strength: 0.5, Mode: img2img"),
            "{text}"
        );
        pixels.push(px);
    }
    assert_ne!(pixels[0], pixels[1]);
    // Image 1 alone, from its own seed: the same picture.
    let one = s.post_json(
        &json!({"prompt": "x", "steps": 4, "seed": 12, "init_image": init,
                                  "strength": 0.5}),
    );
    let (_, _, px, _) = decode_png(one.json()["image_base64"].as_str().unwrap());
    assert_eq!(px, pixels[1]);
    // The cache key covers the image: the same request hits, another image misses.
    assert_eq!(s.post_json(&body).header("x-cache"), Some("hit"));
    let mut other = body.clone();
    other["init_image"] = json!(b64(&png(700, 300, Some(9))));
    assert_eq!(s.post_json(&other).header("x-cache"), Some("miss"));
    // Text-to-image says so.
    let t = s.post_json(&json!({"prompt": "x", "steps": 1, "width": 256, "height": 256}));
    let m = &t.json()["metadata"];
    assert_eq!(
        (m["mode"].as_str(), m["strength"].is_null()),
        (Some("txt2img"), true)
    );
}

/// A phone's JPEG, stored 320x256 with EXIF Orientation 6 (tools/make_exif_orientation_fixtures.py),
/// is the upright 256x320 picture Pillow's `exif_transpose` makes of it (diffusers' `load_image`,
/// A1111's `images.read`): the size defaults to it, and a mask must have it.
#[test]
fn an_init_image_with_an_exif_orientation_is_read_upright() {
    let s = started(fake("step_ms=0"), Duration::from_secs(10));
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/exif-orientation");
    let jpeg = b64(&std::fs::read(dir.join("http-jpeg-6.jpg")).unwrap());
    let body = json!({"prompt": "x", "steps": 2, "init_image": jpeg});
    let r = s.post_json(&body);
    assert_eq!(r.status, 200, "{}", r.text());
    let m = &r.json()["metadata"];
    assert_eq!(
        (m["width"].as_u64(), m["height"].as_u64()),
        (Some(256), Some(320))
    );
    let mut upright = body.clone();
    upright["mask_image"] = json!(b64(&png(256, 320, Some(255))));
    let r = s.post_json(&upright);
    assert_eq!(r.status, 200, "{}", r.text());
    let mut stored = body;
    stored["mask_image"] = json!(b64(&png(320, 256, Some(255))));
    assert_eq!(s.post_json(&stored).broken_fields(), ["mask_image"]);
}

fn tiny_inpaint() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../pipeline/tests/fixtures/tiny-inpaint")
}

/// The real pipeline on the 9-channel model: without a mask it repaints the whole image, so
/// text-to-image runs (the same pixels as the pipeline run in-process: A1111's conditioning of
/// an inpainting model, checked against diffusers in tests/integration/img2img_images.rs, as
/// img2img without a mask is); with one, it inpaints, and a JPEG init image works as a PNG
/// does.
#[test]
fn an_inpainting_model_runs_with_and_without_a_mask() {
    let env = vec![
        (
            "MODEL_ID".to_string(),
            tiny_inpaint().to_string_lossy().into_owned(),
        ),
        ("GENERATION_TIMEOUT_SECONDS".to_string(), "600".to_string()),
    ];
    let s = started(env, Duration::from_secs(300));
    let body = json!({"prompt": "a bench", "steps": 2, "seed": 5, "guidance_scale": 7.5,
                      "width": 256, "height": 256});
    let r = s.post_json(&body);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["metadata"]["mode"], "txt2img");
    let (w, h, pixels, _) = decode_png(r.json()["image_base64"].as_str().unwrap());
    assert_eq!((w, h), (256, 256));
    let sd = sdserve_pipeline::pipeline::StableDiffusion::load(
        &tiny_inpaint(),
        &candle_core::Device::Cpu,
        candle_core::DType::F32,
    )
    .expect("the 9-channel model loads");
    let params = sdserve_pipeline::pipeline::GenerationParams {
        prompt: "a bench".into(),
        steps: 2,
        seed: 5,
        width: 256,
        height: 256,
        guidance_scale: 7.5,
        ..Default::default()
    };
    let own = sd
        .generate(&params, &mut |_| std::ops::ControlFlow::Continue(()))
        .expect("the pipeline runs it");
    assert!(
        pixels == own[0].pixels,
        "the server's image is the pipeline's"
    );

    let mut jpeg = std::io::Cursor::new(Vec::new());
    image::DynamicImage::ImageRgb8(image::RgbImage::from_fn(256, 256, |x, y| {
        image::Rgb([x as u8, y as u8, 128])
    }))
    .write_to(&mut jpeg, image::ImageFormat::Jpeg)
    .unwrap();
    let body = json!({"prompt": "a bench", "steps": 2, "seed": 3, "init_image": b64(jpeg.get_ref()),
                      "mask_image": b64(&png(256, 256, Some(255))), "strength": 1.0});
    let r = s.post_json(&body);
    assert_eq!(r.status, 200, "{}", r.text());
    let m = &r.json()["metadata"];
    assert_eq!(
        (m["mode"].as_str(), m["width"].as_u64()),
        (Some("inpaint"), Some(256))
    );
    let (w, h, _, text) = decode_png(r.json()["image_base64"].as_str().unwrap());
    assert_eq!((w, h), (256, 256));
    assert!(text.unwrap().contains("Mode: inpaint"));
}

/// `sdserve generate --init-image F --strength S --batch-size N` on the real pipeline (tiny-b):
/// `out.png`, `out-1.png`, each image's seed printed and in its PNG text, the mode img2img, and
/// the size taken from the init image (300x200: floored to 64s and clamped, 256x256).
#[test]
fn the_cli_writes_numbered_files_and_prints_each_seed() {
    let dir = std::env::temp_dir().join(format!("sdserve-cli-img2img-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let init = dir.join("init.png");
    std::fs::write(&init, png(300, 200, None)).unwrap();
    let out = dir.join("out.png");
    let tiny_b =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../pipeline/tests/fixtures/tiny-b");
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_sdserve"))
        .args(["generate", "--device", "cpu", "--model"])
        .arg(&tiny_b)
        .args(["--prompt", "a boat", "--steps", "2", "--seed", "41"])
        .args(["--strength", "0.5", "--batch-size", "2", "--init-image"])
        .arg(&init)
        .arg("-o")
        .arg(&out)
        .env_remove("MODEL_ID")
        .env_remove("DTYPE")
        .env("MODEL_CACHE_DIR", dir.join("cache"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stderr}");
    for (i, (name, seed)) in [("out.png", 41), ("out-1.png", 42)].into_iter().enumerate() {
        let path = dir.join(name);
        assert!(
            stderr.contains(&format!("wrote {} (256x256), seed {seed}", path.display())),
            "image {i}: {stderr}"
        );
        let (w, h, pixels, text) = decode_png(&b64(&std::fs::read(&path).unwrap()));
        assert_eq!((w, h), (256, 256));
        assert!(pixels.iter().any(|&p| p != pixels[0]), "{name} is flat");
        let text = text.unwrap();
        assert!(
            text.contains(&format!("Seed: {seed}")) && text.contains("Mode: img2img"),
            "{name}: {text}"
        );
    }
    assert!(!dir.join("out-2.png").exists());
    // A mask without an init image is refused before the model loads, naming the flag's field.
    let refused = std::process::Command::new(env!("CARGO_BIN_EXE_sdserve"))
        .args(["generate", "--device", "cpu", "--model"])
        .arg(&tiny_b)
        .args(["--prompt", "x", "--mask"])
        .arg(&init)
        .env_remove("MODEL_ID")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(
        stderr.contains("--mask-image: only with init_image"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
