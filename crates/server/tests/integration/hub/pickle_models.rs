//! Local diffusers folders with PyTorch pickle `.bin` weights, served by the real binary: one
//! whose UNet `.bin` names `posix.system` fails to load, and the server stays up answering 503
//! `model_unavailable` with the refused global in the detail; one whose text encoder is sharded
//! `.bin` answers over HTTP with the pixels of its safetensors twin.

use super::*;

fn serve(model: &Path, cache: &Path) -> common::Server {
    let env: Vec<(String, String)> = [
        ("MODEL_ID", model.to_str().unwrap()),
        ("MODEL_CACHE_DIR", cache.to_str().unwrap()),
        ("DEVICE", "cpu"),
        ("GENERATION_TIMEOUT_SECONDS", "600"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    common::Server::start(&env)
}

#[test]
fn a_malicious_bin_is_a_503_naming_its_global_and_a_bin_text_encoder_serves() {
    let cache = Scratch::new("pickle-models");
    let evil = cache.0.join("evil-model");
    common::copy_tree(&fixtures().join("tiny-inpaint-bin"), &evil);
    let malicious: serde_json::Value = serde_json::from_slice(
        &std::fs::read(fixtures().join("single-file/malicious.json")).unwrap(),
    )
    .unwrap();
    let global = malicious["malicious-os-system.ckpt"]["global"]
        .as_str()
        .unwrap();
    let marker = PathBuf::from(
        malicious["malicious-os-system.ckpt"]["marker"]
            .as_str()
            .unwrap(),
    );
    let _ = std::fs::remove_file(&marker);
    std::fs::copy(
        fixtures().join("single-file/malicious-os-system.ckpt"),
        evil.join("unet/diffusion_pytorch_model.bin"),
    )
    .unwrap();
    let bad = serve(&evil, &cache.0);
    let t = std::time::Instant::now();
    let health = loop {
        let h = bad.get("/health");
        if h.json()["status"] == "unavailable" || t.elapsed() > Duration::from_secs(60) {
            break h;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(health.status, 503, "{}", health.text());
    let detail = health.json()["detail"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(detail.contains(global), "{}", health.text());
    let e = bad
        .post_json(&serde_json::json!({"prompt": "x"}))
        .error(503, "model_unavailable");
    assert!(e["details"].as_str().unwrap().contains(global), "{e}");
    // Still up: a second request gets the same answer.
    bad.post_json(&serde_json::json!({"prompt": "x"}))
        .error(503, "model_unavailable");
    assert!(!marker.exists(), "the payload ran");
    drop(bad);

    // tiny-a-vae8 (factor 8: cheap at 256x256) with its text encoder as the `.bin` shards of
    // tiny-inpaint-bin (the same tensors, re-saved by torch) answers with the same pixels as
    // with its safetensors.
    let mixed = cache.0.join("mixed-model");
    common::copy_tree(&fixtures().join("tiny-a-vae8"), &mixed);
    std::fs::remove_file(mixed.join("text_encoder/model.safetensors")).unwrap();
    common::copy_tree(
        &fixtures().join("tiny-inpaint-bin/text_encoder"),
        &mixed.join("text_encoder"),
    );
    let body = serde_json::json!({"prompt": "a red boat", "width": 256, "height": 256, "steps": 2, "seed": 7});
    let pixels = |model: &Path| {
        let server = serve(model, &cache.0);
        server.wait_ready(Duration::from_secs(120));
        let r = server.post_json(&body);
        assert_eq!(r.status, 200, "{}", r.text());
        let (w, h, pixels, _) = common::decode_png(r.json()["image_base64"].as_str().unwrap());
        assert_eq!((w, h), (256, 256));
        pixels
    };
    let from_bin = pixels(&mixed);
    assert!(from_bin.iter().any(|&p| p != from_bin[0]), "flat image");
    assert!(
        from_bin == pixels(&fixtures().join("tiny-a-vae8")),
        "the .bin text encoder's image differs"
    );
}
