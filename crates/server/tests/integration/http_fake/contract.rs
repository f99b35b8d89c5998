//! The request contract: validation at the rules' edges, shape errors, routes and methods,
//! defaults echoed, seeds reproduced, PNG metadata.

use super::*;

#[test]
fn validation_rules_at_their_edges() {
    let s = ready(with(fake("step_ms=0"), &[("MAX_CONCURRENT_REQUESTS", "8")]));
    let ok = |extra: serde_json::Value| {
        let mut body = json!({"prompt": "x", "steps": 1, "width": 256, "height": 256});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        s.post_json(&body)
    };
    let p500 = "ж".repeat(500);
    let p501 = "ж".repeat(501);
    let good = [
        json!({"prompt": p500}),
        json!({"prompt": format!("  {p500}\t")}),
        json!({"negative_prompt": p500}),
        json!({"negative_prompt": ""}),
        json!({"steps": 1}),
        json!({"steps": 50}),
        json!({"width": 256, "height": 768}),
        json!({"width": 768, "height": 256}),
        json!({"seed": 0}),
        json!({"seed": 4294967295u64}),
        json!({"seed": null}),
        json!({"guidance_scale": 0.0}),
        json!({"guidance_scale": 30}),
        json!({"scheduler": "dpmpp_2m_karras"}),
    ];
    for extra in good {
        let r = ok(extra.clone());
        assert_eq!(r.status, 200, "{extra}: {}", r.text());
    }
    let bad = [
        (json!({"prompt": ""}), "prompt"),
        (json!({"prompt": " \n\t "}), "prompt"),
        (json!({"prompt": "\u{1}\u{7f}"}), "prompt"),
        (json!({"prompt": p501}), "prompt"),
        (json!({"prompt": 5}), "prompt"),
        (json!({"negative_prompt": p501}), "negative_prompt"),
        (json!({"steps": 0}), "steps"),
        (json!({"steps": 51}), "steps"),
        (json!({"steps": 2.5}), "steps"),
        (json!({"steps": "20"}), "steps"),
        (json!({"width": 192}), "width"),
        (json!({"width": 832}), "width"),
        (json!({"width": 320 + 1}), "width"),
        (json!({"height": 255}), "height"),
        (json!({"height": 769}), "height"),
        (json!({"seed": -1}), "seed"),
        (json!({"seed": 4294967296u64}), "seed"),
        (json!({"guidance_scale": -0.01}), "guidance_scale"),
        (json!({"guidance_scale": 30.01}), "guidance_scale"),
        (json!({"scheduler": "k_euler"}), "scheduler"),
        (json!({"sampler": "euler"}), "sampler"),
    ];
    for (extra, field) in bad {
        assert_eq!(ok(extra.clone()).broken_fields(), [field], "{extra}");
    }
    // Every broken field in one answer, so a client fixes its request in one round.
    let r = ok(json!({"steps": 0, "width": 300, "scheduler": "k_euler", "sampler": "x"}));
    assert_eq!(
        r.broken_fields(),
        ["sampler", "steps", "width", "scheduler"],
        "{}",
        r.text()
    );
    // Missing prompt.
    let j = s
        .post_json(&json!({"steps": 1}))
        .error(422, "validation_error");
    assert!(j["details"].as_str().unwrap().starts_with("prompt:"));
    // Cleaning is echoed.
    let r = ok(json!({"prompt": "\u{1} a\u{0}b\u{7} "}));
    assert_eq!(r.json()["metadata"]["prompt"], "ab");
}

#[test]
fn shape_errors_routes_and_methods() {
    let s = ready(with(fake("step_ms=0"), &[("MAX_BODY_BYTES", "4096")]));
    s.post_raw(b"{\"prompt\": ").error(400, "invalid_json");
    s.post_raw(b"[\"prompt\"]").error(400, "invalid_json");
    s.post_raw(b"").error(400, "invalid_json");
    let j = s
        .request(
            "POST",
            "/generate",
            &[("Content-Type", "text/plain")],
            br#"{"prompt":"x"}"#,
        )
        .error(400, "invalid_json");
    assert!(j["details"].as_str().unwrap().contains("application/json"));
    s.request("POST", "/generate", &[], br#"{"prompt":"x"}"#)
        .error(400, "invalid_json");
    s.get("/nope").error(404, "not_found");
    s.request("DELETE", "/health", &[], b"")
        .error(405, "method_not_allowed");
    let r = s.get("/generate");
    r.error(405, "method_not_allowed");
    assert!(
        r.header("allow").is_some_and(|a| a.contains("POST")),
        "{:?}",
        r.headers
    );
    let big = format!(r#"{{"prompt":"{}"}}"#, "a".repeat(10_000));
    s.post_raw(big.as_bytes()).error(413, "payload_too_large");
    // Just under the limit is parsed (and then fails validation on length, not size).
    let under = format!(r#"{{"prompt":"{}"}}"#, "a".repeat(4000));
    s.post_raw(under.as_bytes()).error(422, "validation_error");
}

#[test]
fn defaults_echoed_random_seed_reproduces_and_png_carries_parameters() {
    let s = ready(with(
        fake("step_ms=0,scheduler=ddim"),
        &[("RESPONSE_CACHE_MB", "0")],
    ));
    let r = s.post_json(&json!({"prompt": "a red fox"}));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-cache"), Some("miss"));
    let j = r.json();
    let m = &j["metadata"];
    assert_eq!(m["prompt"], "a red fox");
    assert_eq!(m["negative_prompt"], "");
    assert_eq!(
        (
            m["steps"].as_u64(),
            m["width"].as_u64(),
            m["height"].as_u64()
        ),
        (Some(20), Some(512), Some(512))
    );
    assert_eq!(m["guidance_scale"].as_f64(), Some(7.5));
    assert_eq!(
        m["scheduler"], "ddim",
        "the model's own scheduler is resolved and echoed"
    );
    assert_eq!(m["model_version"], "fake@0");
    assert!(m["generation_time_seconds"].as_f64().unwrap() >= 0.0);
    let seed = m["seed"].as_u64().expect("random seed returned");
    assert!(seed <= u32::MAX as u64);
    let (w, h, pixels, text) = decode_png(j["image_base64"].as_str().unwrap());
    assert_eq!((w, h, pixels.len()), (512, 512, 512 * 512 * 3));
    let text = text.expect("parameters chunk");
    assert!(
        text.starts_with("a red fox\nSteps: 20, Sampler: DDIM, Scheduler: ddim, CFG scale: 7.5, "),
        "{text}"
    );
    assert!(
        text.contains(&format!("Seed: {seed}, Size: 512x512, Model: fake@0")),
        "{text}"
    );

    // Sending the seed back reproduces the image (cache off: it is generated again).
    let again = s.post_json(&json!({"prompt": "a red fox", "seed": seed}));
    assert_eq!(again.header("x-cache"), Some("miss"));
    let (_, _, pixels2, _) = decode_png(again.json()["image_base64"].as_str().unwrap());
    assert_eq!(pixels, pixels2);
    // Another random seed differs (2^-32 chance of a false failure).
    let other = s.post_json(&json!({"prompt": "a red fox"})).json();
    assert_ne!(other["metadata"]["seed"], j["metadata"]["seed"]);
}
