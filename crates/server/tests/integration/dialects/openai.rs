//! The OpenAI (`/v1`) dialect: generations, edits and variations translated to the native request, its
//! error shape, and where its retries can help.

use super::*;

#[test]
fn openai_generations_translate_and_errors_take_openai_shape() {
    let s = ready("step_ms=0", &[]);
    let r = post(
        &s,
        "/v1/images/generations",
        &json!({"prompt": "a cat", "n": 1, "size": "256x320", "response_format": "b64_json",
                "model": "dall-e-3", "quality": "standard", "seed": 4, "steps": 2,
                "negative_prompt": "dog", "guidance_scale": 5, "scheduler": "ddim"}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let j = r.json();
    assert!(j["created"].as_u64().unwrap() > 1_700_000_000);
    let data = j["data"].as_array().unwrap();
    assert_eq!(data.len(), 1);
    assert_eq!(data[0]["revised_prompt"], "a cat");
    let want = native_pixels(
        &s,
        json!({"prompt": "a cat", "negative_prompt": "dog", "seed": 4, "steps": 2,
               "guidance_scale": 5, "width": 256, "height": 320, "scheduler": "ddim"}),
    );
    assert_eq!(decode_png(data[0]["b64_json"].as_str().unwrap()).2, want);

    // url: a link back here that serves the same PNG.
    let r = post(
        &s,
        "/v1/images/generations",
        &json!({"prompt": "a cat", "size": "256x320", "response_format": "url", "seed": 4, "steps": 2, "negative_prompt": "dog", "guidance_scale": 5, "scheduler": "ddim"}),
    );
    let url = r.json()["data"][0]["url"].as_str().unwrap().to_string();
    let path = url.strip_prefix("http://test").expect(&url);
    let png = s.get(path);
    assert_eq!(png.header("content-type"), Some("image/png"));
    use base64::Engine as _;
    assert_eq!(
        decode_png(&base64::engine::general_purpose::STANDARD.encode(&png.body)).2,
        want
    );

    // Native 422s are OpenAI 400s naming OpenAI's parameter; no retry.
    let r = post(
        &s,
        "/v1/images/generations",
        &json!({"prompt": "x", "size": "1024x1024"}),
    );
    let e = openai_error(&r, 400, Some("size"));
    assert_eq!(e["type"], "invalid_request_error");
    assert!(e["message"].as_str().unwrap().contains("768"), "{e}");
    assert_eq!(r.header("x-should-retry"), Some("false"));
    openai_error(
        &post(&s, "/v1/images/generations", &json!({"prompt": ""})),
        400,
        Some("prompt"),
    );
    openai_error(
        &post(
            &s,
            "/v1/images/generations",
            &json!({"prompt": "x", "width": 256}),
        ),
        400,
        Some("width"),
    );
    openai_error(
        &post(
            &s,
            "/v1/images/generations",
            &json!({"prompt": "x", "response_format": "png"}),
        ),
        400,
        Some("response_format"),
    );
    let r = s.request("POST", "/v1/images/generations", &[], b"{oops");
    assert_eq!(openai_error(&r, 400, None)["code"], "invalid_json");
    // Errors axum makes itself, and unknown routes, in OpenAI's shape too.
    openai_error(&s.get("/v1/images/generations"), 405, None);
    openai_error(&s.get("/v1/nothing"), 404, None);
    openai_error(&s.get("/v1/images/files/0000.png"), 404, None);

    let models = s.get("/v1/models").json();
    assert_eq!(models["data"][0]["id"], "fake@0");
    assert_eq!(s.get("/v1/models/fake@0").json()["object"], "model");
    openai_error(&s.get("/v1/models/dall-e-3"), 404, None);
}

#[test]
fn openai_retries_only_where_they_can_help() {
    let s = ready(
        "step_ms=50",
        &[
            ("GENERATION_TIMEOUT_SECONDS", "1"),
            ("MAX_CONCURRENT_REQUESTS", "1"),
        ],
    );
    let addr = s.addr;
    let long = std::thread::spawn(move || {
        common::post_json_to(
            addr,
            "/v1/images/generations",
            &json!({"prompt": "x", "steps": 50, "size": "256x256"}),
        )
    });
    std::thread::sleep(Duration::from_millis(200));
    // Busy: 429 with Retry-After, and the client may retry.
    let r = post(
        &s,
        "/v1/images/generations",
        &json!({"prompt": "x", "steps": 1, "size": "256x256"}),
    );
    let e = openai_error(&r, 429, None);
    assert_eq!(e["code"], "overloaded");
    assert!(r.header("retry-after").is_some());
    assert_eq!(r.header("x-should-retry"), None);
    // Past the deadline: the same request would time out again.
    let r = long.join().unwrap();
    assert_eq!(openai_error(&r, 408, None)["code"], "timeout");
    assert_eq!(r.header("x-should-retry"), Some("false"));
}

/// A multipart body as the `openai` client writes it.
fn multipart(parts: &[(&str, Option<&str>, &[u8])]) -> (String, Vec<u8>) {
    let boundary = "2497c335d9b3187bba2b0e2600312b6e";
    let mut body = Vec::new();
    for (name, file, data) in parts {
        body.extend_from_slice(format!("--{boundary}\r\n").as_bytes());
        match file {
            Some(f) => body.extend_from_slice(
                format!("Content-Disposition: form-data; name=\"{name}\"; filename=\"{f}\"\r\nContent-Type: image/png\r\n\r\n").as_bytes(),
            ),
            None => body.extend_from_slice(
                format!("Content-Disposition: form-data; name=\"{name}\"\r\n\r\n").as_bytes(),
            ),
        }
        body.extend_from_slice(data);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

#[test]
fn openai_edits_read_multipart_and_name_what_is_wrong() {
    let s = ready("step_ms=0", &[]);
    let edit = |parts: &[(&str, Option<&str>, &[u8])]| {
        let (ct, body) = multipart(parts);
        s.request("POST", "/v1/images/edits", &[("Content-Type", &ct)], &body)
    };
    let r = edit(&[("prompt", None, b"p"), ("n", None, b"1")]);
    openai_error(&r, 400, Some("image"));
    let r = edit(&[
        ("prompt", None, b"p"),
        ("image", Some("a.png"), b"x"),
        ("image", Some("b.png"), b"y"),
    ]);
    openai_error(&r, 400, Some("image"));
    // JSON is not a form.
    let r = post(&s, "/v1/images/edits", &json!({"prompt": "p"}));
    assert_eq!(openai_error(&r, 400, None)["code"], "invalid_json");
}

/// Our extras `tiling`, `variation_seed`, `variation_strength` (and the prompt ones) pass
/// through `images/generations` as the native request; a broken rule is a 400 naming them.
#[test]
fn openai_generations_take_tiling_and_variation_seeds() {
    let s = ready("step_ms=0", &[]);
    let extras = json!({"seed": 6, "steps": 2, "tiling": true, "variation_seed": 77,
                        "variation_strength": 0.4, "prompt_syntax": "plain", "clip_skip": 2});
    let mut body = json!({"prompt": "tiles", "n": 2, "size": "256x256"});
    let mut native = json!({"prompt": "tiles", "batch_size": 2, "width": 256, "height": 256});
    for (k, v) in extras.as_object().unwrap() {
        body[k] = v.clone();
        native[k] = v.clone();
    }
    let r = post(&s, "/v1/images/generations", &body);
    assert_eq!(r.status, 200, "{}", r.text());
    let native = s.post_json(&native);
    assert_eq!(native.status, 200, "{}", native.text());
    let want: Vec<Vec<u8>> = native.json()["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| decode_png(b.as_str().unwrap()).2)
        .collect();
    let got: Vec<Vec<u8>> = r.json()["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| decode_png(d["b64_json"].as_str().unwrap()).2)
        .collect();
    assert_eq!(got, want);
    // The extras changed the request: without them the images differ.
    let plain = post(
        &s,
        "/v1/images/generations",
        &json!({"prompt": "tiles", "n": 2, "size": "256x256", "seed": 6, "steps": 2}),
    );
    assert_ne!(
        decode_png(plain.json()["data"][0]["b64_json"].as_str().unwrap()).2,
        got[0]
    );
    for (k, v) in [
        ("tiling", json!("yes")),
        ("variation_strength", json!(1.5)),
        ("variation_seed", json!(-1)),
    ] {
        let mut bad = json!({"prompt": "tiles", "size": "256x256"});
        bad[k] = v;
        openai_error(&post(&s, "/v1/images/generations", &bad), 400, Some(k));
    }
}

/// `images/variations`: img2img of the form's image, at strength 0.75 unless sent, no prompt
/// unless sent, URLs unless `response_format` says otherwise; a mask or no image is a 400.
#[test]
fn openai_variations_are_img2img_of_the_image() {
    use base64::Engine as _;
    let s = ready("step_ms=0", &[]);
    let init = init_png(&s);
    let png = base64::engine::general_purpose::STANDARD
        .decode(&init)
        .unwrap();
    let vary = |parts: &[(&str, Option<&str>, &[u8])]| {
        let (ct, body) = multipart(parts);
        s.request(
            "POST",
            "/v1/images/variations",
            &[("Content-Type", &ct)],
            &body,
        )
    };
    let images = |r: &Resp| -> Vec<Vec<u8>> {
        assert_eq!(r.status, 200, "{}", r.text());
        let data = r.json()["data"].as_array().unwrap().clone();
        let b64 = |d: &Value| d["b64_json"].as_str().unwrap().to_string();
        data.iter().map(|d| decode_png(&b64(d)).2).collect()
    };
    let base: [(&str, Option<&str>, &[u8]); 5] = [
        ("image", Some("i.png"), &png),
        ("n", None, b"2"),
        ("seed", None, b"5"),
        ("steps", None, b"2"),
        ("response_format", None, b"b64_json"),
    ];
    let plain = images(&vary(&base));
    assert_eq!(plain.len(), 2);
    // The default strength is 0.75: sending it changes nothing, another value does.
    let with = |extra: (&'static str, &'static [u8])| {
        let mut parts = base.to_vec();
        parts.push((extra.0, None, extra.1));
        images(&vary(&parts))
    };
    assert_eq!(with(("strength", b"0.75")), plain);
    assert_ne!(with(("strength", b"0.5")), plain);
    // With a prompt: the native img2img of the image, image i from seed + i.
    let steered = with(("prompt", b"a boat"));
    assert_ne!(steered, plain);
    for (i, got) in steered.iter().enumerate() {
        let native = json!({"prompt": "a boat", "init_image": init, "strength": 0.75,
                            "seed": 5 + i, "steps": 2});
        assert_eq!(got, &native_pixels(&s, native), "image {i}");
    }
    // DALL-E 2's default answer is a URL to the PNG.
    let r = vary(&base[..4]);
    assert_eq!(r.status, 200, "{}", r.text());
    let url = r.json()["data"][0]["url"].as_str().unwrap().to_string();
    let path = &url[url.find("/v1/").unwrap()..];
    let file = s.get(path);
    assert_eq!(file.status, 200);
    // Refusals name the parameter.
    let mut masked = base.to_vec();
    masked.push(("mask", Some("m.png"), &png));
    openai_error(&vary(&masked), 400, Some("mask"));
    openai_error(&vary(&base[1..]), 400, Some("image"));
    openai_error(
        &vary(&[base[0], ("strength", None, b"2")]),
        400,
        Some("strength"),
    );
}
