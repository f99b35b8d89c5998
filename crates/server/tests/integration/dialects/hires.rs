//! A1111's hires fix (`enable_hr`) through `/sdapi/v1/txt2img`: the target size, its rules
//! (422s naming A1111's fields), the infotext keys, the progress over both passes and the
//! upscaler menus. The pixels of the real pass are the pipeline tests' (tests/integration/hires.rs) and
//! the real client's (tests/clients).

use super::*;

fn hires(extra: Value) -> Value {
    let mut body = json!({"prompt": "a cat", "seed": 3, "steps": 4, "width": 256,
                          "height": 256, "sampler_name": "Euler", "enable_hr": true});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

#[test]
fn a1111_hires_fix_makes_the_larger_image_and_says_so_in_its_infotext() {
    let s = ready("step_ms=0", &[]);
    let r = post(
        &s,
        "/sdapi/v1/txt2img",
        &hires(
            json!({"hr_scale": 2, "hr_upscaler": "Latent", "denoising_strength": 0.7,
                       "hr_second_pass_steps": 6}),
        ),
    );
    let info = info_of(&r);
    let (w, h, _, text) = decode_png(r.json()["images"][0].as_str().unwrap());
    assert_eq!((w, h), (512, 512));
    let text = text.unwrap();
    for key in [
        "Size: 256x256",
        "Denoising strength: 0.7",
        "Hires upscale: 2.0",
        "Hires steps: 6",
        "Hires upscaler: Latent",
    ] {
        assert!(text.contains(key), "{key:?} not in {text:?}");
    }
    assert_eq!(info["infotexts"][0], text);
    assert_eq!(info["denoising_strength"], 0.7);
    assert_eq!(info["extra_generation_params"]["Hires upscaler"], "Latent");
    // A1111's size in info is the first pass's.
    assert_eq!(
        (&info["width"], &info["height"]),
        (&json!(256), &json!(256))
    );

    // hr_resize_x alone keeps the aspect; A1111's defaults (Latent, strength 0.75) when
    // absent, without "Hires upscaler" (A1111 writes it only when sent).
    let r = post(
        &s,
        "/sdapi/v1/txt2img",
        &hires(json!({"height": 320, "hr_resize_x": 512})),
    );
    let (w, h, _, text) = decode_png(r.json()["images"][0].as_str().unwrap());
    assert_eq!((w, h), (512, 640));
    let text = text.unwrap();
    assert!(text.contains("Hires resize: 512x0"), "{text}");
    assert!(text.contains("Denoising strength: 0.75"), "{text}");
    assert!(!text.contains("Hires upscaler"), "{text}");

    // Off (or on the img2img route): the first pass only.
    let r = post(&s, "/sdapi/v1/txt2img", &hires(json!({"enable_hr": false})));
    let (w, _, _, text) = decode_png(r.json()["images"][0].as_str().unwrap());
    assert_eq!(w, 256);
    assert!(!text.unwrap().contains("Hires"));

    // The hires fields are part of the request: another strength is another image.
    let a = post(
        &s,
        "/sdapi/v1/txt2img",
        &hires(json!({"denoising_strength": 0.5})),
    );
    let b = post(
        &s,
        "/sdapi/v1/txt2img",
        &hires(json!({"denoising_strength": 0.6})),
    );
    assert_ne!(
        decode_png(a.json()["images"][0].as_str().unwrap()).2,
        decode_png(b.json()["images"][0].as_str().unwrap()).2
    );
}

#[test]
fn a1111_hires_rules_are_422s_naming_its_fields() {
    let s = ready("step_ms=0", &[]);
    for (extra, field, says) in [
        // 256 * 4 = 1024: past 768.
        (json!({"hr_scale": 4}), "hr_scale", "768"),
        (json!({"hr_resize_x": 1024}), "hr_resize_x", "768"),
        (json!({"hr_resize_y": 128}), "hr_resize_y", "256"),
        (
            json!({"hr_upscaler": "R-ESRGAN 4x+"}),
            "hr_upscaler",
            "Latent (nearest-exact)",
        ),
        (
            json!({"hr_upscaler": "ESRGAN_4x"}),
            "hr_upscaler",
            "Lanczos",
        ),
        // A1111 stretches the pass's schedule to int(steps / strength).
        (
            json!({"denoising_strength": 0, "hr_second_pass_steps": 5}),
            "denoising_strength",
            "above 0",
        ),
        (
            json!({"denoising_strength": 1.5}),
            "denoising_strength",
            "1",
        ),
        (
            json!({"hr_sampler_name": "DPM++ 4M"}),
            "hr_sampler_name",
            "Euler a",
        ),
        (json!({"enable_hr": "yes"}), "enable_hr", "true or false"),
    ] {
        let r = post(&s, "/sdapi/v1/txt2img", &hires(extra.clone()));
        assert_eq!(r.broken_fields(), [field], "{extra}");
        assert!(r.text().contains(says), "{extra}: {}", r.text());
    }
}

#[test]
fn a1111_hires_progress_counts_both_passes() {
    let s = ready("step_ms=30", &[("GENERATION_TIMEOUT_SECONDS", "60")]);
    let addr = s.addr;
    // 4 steps, then A1111's 10 of the second pass (of a schedule of int(10 / 0.5) = 20;
    // diffusers' rule would run int(10 * 0.5) = 5).
    let body = hires(json!({"hr_second_pass_steps": 10, "denoising_strength": 0.5}));
    let run = std::thread::spawn(move || common::post_json_to(addr, "/sdapi/v1/txt2img", &body));
    let t = Instant::now();
    let mut seen = Vec::new();
    while !run.is_finished() {
        let p = s.get("/sdapi/v1/progress").json();
        if p["state"]["sampling_steps"].as_u64().unwrap_or(0) > 0 {
            seen.push((
                p["state"]["sampling_step"].as_u64().unwrap(),
                p["state"]["sampling_steps"].as_u64().unwrap(),
            ));
        }
        assert!(t.elapsed() < Duration::from_secs(20));
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(run.join().unwrap().status, 200);
    assert!(!seen.is_empty());
    assert!(seen.iter().all(|&(_, total)| total == 14), "{seen:?}");
    assert!(seen.iter().any(|&(step, _)| step > 4), "{seen:?}");
}

#[test]
fn a1111_upscaler_menus_list_what_hires_takes() {
    let s = ready("step_ms=0", &[]);
    let names = |path: &str| -> Vec<String> {
        s.get(path)
            .json()
            .as_array()
            .unwrap()
            .iter()
            .map(|u| u["name"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(names("/sdapi/v1/upscalers"), ["None", "Lanczos", "Nearest"]);
    let modes = names("/sdapi/v1/latent-upscale-modes");
    assert_eq!(
        modes,
        [
            "Latent",
            "Latent (antialiased)",
            "Latent (bicubic)",
            "Latent (bicubic antialiased)",
            "Latent (nearest)",
            "Latent (nearest-exact)"
        ]
    );
    // Every listed name is taken.
    for name in modes.iter().chain(&names("/sdapi/v1/upscalers")) {
        let r = post(
            &s,
            "/sdapi/v1/txt2img",
            &hires(json!({"hr_upscaler": name, "steps": 1,
                                                           "denoising_strength": 1.0})),
        );
        assert_eq!(r.status, 200, "{name}: {}", r.text());
    }
}
