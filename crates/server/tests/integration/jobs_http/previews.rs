//! Previews: TAESD decodes of the steps' latents (fake and real pipeline), and the fallback to
//! latent previews when no TAESD can be had.

use super::*;

fn taesd_fixture() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../pipeline/tests/fixtures/taesd/taesd-a")
}

/// A decoded PNG: width, height, RGB pixels, parameters text.
type Png = (u32, u32, Vec<u8>, Option<String>);

/// The `preview` events of a finished 6-step 320x256 job (a preview every 2 steps).
fn previews_of_a_job(s: &Server) -> Vec<(u64, Png)> {
    let req = json!({"prompt": "a lighthouse", "steps": 6, "width": 320, "height": 256, "seed": 7});
    let id = submit(s, &req)["id"].as_str().unwrap().to_string();
    let events = Events::open(s.addr, &id).all();
    assert_one_terminal_last(&events, "succeeded");
    events
        .iter()
        .filter(|(e, _)| e == "preview")
        .map(|(_, d)| {
            let png = decode_png(d["image_base64"].as_str().unwrap());
            (d["step"].as_u64().unwrap(), png)
        })
        .collect()
}

/// PREVIEW=taesd: each preview is the TAESD's decode of the step's latents, at 8x the latent
/// size (the full image size), sent as a real PNG over the event stream.
#[test]
fn taesd_previews_are_full_size_decodes_of_the_latents() {
    let dir = taesd_fixture();
    // Local folders get a content digest, cached there (not in the working tree).
    let cache = std::env::temp_dir().join(format!("sdserve-taesd-ok-{}", std::process::id()));
    let s = ready(
        "step_ms=20",
        &[
            ("PREVIEW", "taesd"),
            ("PREVIEW_EVERY", "2"),
            ("PREVIEW_TAESD", dir.to_str().unwrap()),
            ("MODEL_CACHE_DIR", cache.to_str().unwrap()),
        ],
    );
    s.wait_log(&["TAESD previews ready"], Duration::from_secs(10));
    let previews = previews_of_a_job(&s);
    assert!(!previews.is_empty());
    let taesd = sdserve_pipeline::taesd::Taesd::load(
        &dir,
        &candle_core::Device::Cpu,
        candle_core::DType::F32,
    )
    .unwrap();
    for (step, (w, h, pixels, _)) in &previews {
        // 320x256 has 40x32 latents; taesd-a upscales 8x.
        assert_eq!((*w, *h), (320, 256), "step {step}");
        // The fake generator's latents at step k of 6 are all k / 6 (generator.rs).
        let latents = candle_core::Tensor::full(
            *step as f32 / 6.0,
            (1, 4, 32, 40),
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let want = taesd.decode_preview(&latents).unwrap().remove(0);
        assert!(pixels == &want.pixels, "step {step}: not the TAESD decode");
    }
    // Different latents, different previews (the decode is not a constant).
    assert_ne!(
        previews.first().unwrap().1 .2,
        previews.last().unwrap().1 .2
    );
    drop(s);
    let _ = std::fs::remove_dir_all(&cache);
}

/// A TAESD that cannot be had (no such folder; the default hub id offline with an empty cache)
/// is a warning at start-up, and previews fall back to the latent map (1/8 of the image).
#[test]
fn a_missing_taesd_falls_back_to_latent_previews() {
    let cache = std::env::temp_dir().join(format!("sdserve-taesd-cache-{}", std::process::id()));
    std::fs::create_dir_all(&cache).unwrap();
    for (spec, offline) in [("/nonexistent/taesd", "0"), ("madebyollin/taesd", "1")] {
        let s = ready(
            "step_ms=5",
            &[
                ("PREVIEW", "taesd"),
                ("PREVIEW_EVERY", "2"),
                ("PREVIEW_TAESD", spec),
                ("HF_HUB_OFFLINE", offline),
                ("MODEL_CACHE_DIR", cache.to_str().unwrap()),
            ],
        );
        let line = s.wait_log(
            &["previews fall back to the latent map"],
            Duration::from_secs(10),
        );
        assert!(line.contains(spec), "{line}");
        let previews = previews_of_a_job(&s);
        assert!(!previews.is_empty());
        for (_, (w, h, _, _)) in &previews {
            assert_eq!((*w, *h), (40, 32), "{spec}");
        }
    }
    let _ = std::fs::remove_dir_all(&cache);
}

/// The real pipeline (tiny-b) with PREVIEW=taesd: each preview is the TAESD decode of the
/// latents the pipeline has after that step (the same request run here in-process).
#[test]
fn real_pipeline_taesd_previews_decode_the_steps_latents() {
    let fixtures =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../pipeline/tests/fixtures");
    let cache = std::env::temp_dir().join(format!("sdserve-taesd-real-{}", std::process::id()));
    let env: Vec<(String, String)> = [
        ("MODEL_ID", fixtures.join("tiny-b").to_str().unwrap()),
        ("MODEL_CACHE_DIR", cache.to_str().unwrap()),
        ("PREVIEW", "taesd"),
        ("PREVIEW_EVERY", "3"),
        ("PREVIEW_TAESD", taesd_fixture().to_str().unwrap()),
        ("JOB_TIMEOUT_SECONDS", "600"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let s = Server::start(&env);
    s.wait_ready(Duration::from_secs(300));
    // A job ahead of it keeps the worker busy, so the stream opens while ours waits.
    submit(
        &s,
        &json!({"prompt": "ahead", "steps": 3, "width": 256, "height": 256, "seed": 1}),
    );
    let (prompt, steps, seed, guidance) = ("a lighthouse at dawn", 6, 11, 5.0);
    let req = json!({
        "prompt": prompt, "steps": steps, "width": 256, "height": 256, "seed": seed,
        "guidance_scale": guidance, "prompt_syntax": "plain",
    });
    let id = submit(&s, &req)["id"].as_str().unwrap().to_string();
    let events = Events::open(s.addr, &id).all();
    assert_one_terminal_last(&events, "succeeded");
    let previews: Vec<(u64, Png)> = events
        .iter()
        .filter(|(e, _)| e == "preview")
        .map(|(_, d)| {
            let png = decode_png(d["image_base64"].as_str().unwrap());
            (d["step"].as_u64().unwrap(), png)
        })
        .collect();
    // tiny-b's own scheduler (DDIM) runs `steps` UNet evaluations.
    let preview_steps: Vec<u64> = previews.iter().map(|(k, _)| *k).collect();
    assert_eq!(preview_steps, [3, 6], "{:?}", names(&events));

    // The same request in-process, keeping the latents of the preview steps.
    let device = candle_core::Device::Cpu;
    let sd = sdserve_pipeline::pipeline::StableDiffusion::load(
        &fixtures.join("tiny-b"),
        &device,
        candle_core::DType::F32,
    )
    .unwrap();
    let params = sdserve_pipeline::pipeline::GenerationParams {
        prompt: prompt.into(),
        steps,
        width: 256,
        height: 256,
        seed,
        guidance_scale: guidance,
        ..Default::default()
    };
    let mut latents = Vec::new();
    sd.generate(&params, &mut |p| {
        if preview_steps.contains(&(p.step as u64)) {
            latents.push(p.latents.unwrap().clone());
        }
        std::ops::ControlFlow::Continue(())
    })
    .unwrap();
    let taesd =
        sdserve_pipeline::taesd::Taesd::load(&taesd_fixture(), &device, candle_core::DType::F32)
            .unwrap();
    assert_eq!(latents.len(), previews.len());
    for ((step, (w, h, pixels, _)), z) in previews.iter().zip(&latents) {
        // 256x256 has 64x64 latents (tiny-b's VAE factor 4); taesd-a upscales them 8x.
        assert_eq!((*w, *h), (512, 512), "step {step}");
        let want = taesd.decode_preview(z).unwrap().remove(0);
        let worst = pixels
            .iter()
            .zip(&want.pixels)
            .map(|(a, b)| a.abs_diff(*b))
            .max()
            .unwrap();
        eprintln!("step {step}: preview vs TAESD(latents): largest difference {worst}/255");
        assert_eq!(worst, 0, "step {step}");
    }
    drop(s);
    let _ = std::fs::remove_dir_all(&cache);
}

/// Previews are made only while someone can see them: not for `/generate` (its client waits
/// for the image), nor for a job nobody follows, nor for an A1111 poller that skips
/// `current_image`; an event stream gets every one made, and an A1111 poller its latest.
#[test]
fn previews_are_made_only_while_someone_can_see_them() {
    // 40 ms steps: an A1111 run (20 steps) lasts many of its poller's rounds, under load too.
    let s = ready(
        "step_ms=40",
        &[("PREVIEW", "latent"), ("PREVIEW_EVERY", "2")],
    );
    let made = || s.metric("sdserve_previews_total");
    let req = json!({"prompt": "unseen", "steps": 10, "width": 256, "height": 256, "seed": 1});
    assert_eq!(s.post_json(&req).status, 200);
    let id = submit(&s, &req)["id"].as_str().unwrap().to_string();
    let t = Instant::now();
    while s.get(&format!("/jobs/{id}")).json()["status"] != "succeeded" {
        assert!(t.elapsed() < Duration::from_secs(20));
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(made(), 0.0, "previews made that nobody could see");

    let previews = previews_of_a_job(&s);
    assert!(!previews.is_empty());
    assert_eq!(made(), previews.len() as f64);

    // A1111: polled with skip_current_image=true, none; polled plainly, its latest.
    let a1111 = |skip| common::a1111_txt2img_polled(s.addr, skip, Duration::from_millis(15));
    let before = made();
    assert_eq!(a1111(true), None);
    assert_eq!(made(), before, "previews made for a poller that skips them");
    let image = a1111(false).expect("current_image while polled");
    assert_eq!(decode_png(&image).0, 256 / 8, "the latent preview");
    assert!(made() > before);
}

/// A stream that joins a running job gets its latest preview right after `state` (not only
/// PREVIEW_EVERY steps later), and no preview twice: after it, only later steps' previews.
#[test]
fn a_stream_joining_a_running_job_gets_its_latest_preview_first() {
    let s = ready(
        "step_ms=100",
        &[("PREVIEW", "latent"), ("PREVIEW_EVERY", "5")],
    );
    let req = json!({"prompt": "joined", "steps": 20, "width": 256, "height": 256, "seed": 2});
    let id = submit(&s, &req)["id"].as_str().unwrap().to_string();
    // The first follower makes previews be made; wait for the first one (step 5 of 20).
    let mut first = Events::open(s.addr, &id);
    while first.next().expect("a preview before the end").0 != "preview" {}

    let mut joined = Events::open(s.addr, &id);
    let (name, state) = joined.next().unwrap();
    assert_eq!(
        (name.as_str(), &state["status"]),
        ("state", &json!("running"))
    );
    let (name, preview) = joined.next().unwrap();
    assert_eq!(name, "preview", "the second event: {preview}");
    let caught_up = preview["step"].as_u64().unwrap();
    assert!(caught_up >= 5, "{preview}");
    assert_eq!(
        decode_png(preview["image_base64"].as_str().unwrap()).0,
        256 / 8
    );

    let rest = joined.all();
    let ends: Vec<&str> = names(&rest)
        .into_iter()
        .filter(|e| FINAL.contains(e))
        .collect();
    assert_eq!(ends, ["succeeded"]);
    assert_eq!(rest.last().unwrap().0, "succeeded");
    let later: Vec<u64> = rest
        .iter()
        .filter(|(e, _)| e == "preview")
        .map(|(_, d)| d["step"].as_u64().unwrap())
        .collect();
    assert!(!later.is_empty(), "the previews after joining");
    assert!(
        later.windows(2).all(|w| w[0] < w[1]) && later[0] > caught_up,
        "each preview once, after the one caught up with ({caught_up}): {later:?}"
    );
    drop(first);
}
