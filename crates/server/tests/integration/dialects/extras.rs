//! A1111's Extras (`/sdapi/v1/extra-single-image`, `extra-batch-images`) over HTTP: each case
//! of `tools/make_extras_fixtures.py` (A1111's own upscale code run with Pillow on real PNGs)
//! gives A1111's pixels and `html_info`; the answer PNG keeps the sent `parameters` and adds
//! `postprocessing`; broken fields are 422s naming them.

use super::*;
use base64::Engine as _;

fn fixtures() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../pipeline/tests/fixtures/extras")
}

fn b64_file(name: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(std::fs::read(fixtures().join(name)).unwrap())
}

/// A text chunk of a base64 PNG.
fn png_text(b64: &str, keyword: &str) -> Option<String> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap();
    let dec = png::Decoder::new(std::io::Cursor::new(bytes))
        .read_info()
        .unwrap();
    dec.info()
        .uncompressed_latin1_text
        .iter()
        .find(|t| t.keyword == keyword)
        .map(|t| t.text.clone())
}

#[test]
fn extras_give_a1111s_pixels_and_info() {
    let s = ready("step_ms=0", &[]);
    let meta: Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("extras.json")).unwrap())
            .unwrap();
    let cases = meta["cases"].as_object().unwrap();
    assert_eq!(cases.len(), 13);
    let mut batch = Vec::new();
    for (label, case) in cases {
        let mut body = case["fields"].clone();
        let input = case["input"].as_str().unwrap();
        // webuiapi sends a data URL.
        body["image"] = json!(format!(
            "data:image/png;base64,{}",
            b64_file(&format!("input.{input}.png"))
        ));
        let r = post(&s, "/sdapi/v1/extra-single-image", &body);
        assert_eq!(r.status, 200, "{label}: {}", r.text());
        let j = r.json();
        assert_eq!(j["html_info"], case["html_info"], "{label}");
        let got = j["image"].as_str().unwrap();
        let want = decode_png(&b64_file(&format!("output.{label}.png")));
        let (w, h, pixels, _) = decode_png(got);
        assert_eq!((w, h), (want.0, want.1), "{label}");
        assert!(pixels == want.2, "{label}: pixels differ from A1111's");
        assert_eq!(
            png_text(got, "postprocessing").as_deref(),
            case["infotext"].as_str(),
            "{label}"
        );
        if input == "rgb" {
            batch.push((label.clone(), case.clone()));
        }
    }

    // A batch of cases with the same fields: each image as alone, html_info the last one's.
    let (label, case) = &batch[0];
    let mut body = case["fields"].clone();
    body["imageList"] = json!([
        {"data": b64_file("input.rgb.png"), "name": "a"},
        {"data": b64_file("input.grey.png"), "name": "b"},
    ]);
    let r = post(&s, "/sdapi/v1/extra-batch-images", &body);
    assert_eq!(r.status, 200, "{}", r.text());
    let j = r.json();
    let images = j["images"].as_array().unwrap();
    assert_eq!(images.len(), 2);
    let want = decode_png(&b64_file(&format!("output.{label}.png")));
    assert!(
        decode_png(images[0].as_str().unwrap()).2 == want.2,
        "{label}"
    );
    assert_eq!(j["html_info"], case["html_info"]);
    let r = post(
        &s,
        "/sdapi/v1/extra-batch-images",
        &json!({"imageList": []}),
    );
    assert_eq!(r.json(), json!({"html_info": "<p></p>", "images": []}));
}

#[test]
fn extras_keep_the_parameters_and_name_what_is_wrong() {
    let s = ready("step_ms=0", &[]);
    // A generated PNG: its parameters text stays in the upscaled one.
    let r = s
        .post_json(&json!({"prompt": "a cat", "seed": 3, "steps": 2, "width": 256, "height": 256}));
    let generated = r.json()["image_base64"].as_str().unwrap().to_string();
    let parameters = decode_png(&generated).3.unwrap();
    let r = post(
        &s,
        "/sdapi/v1/extra-single-image",
        &json!({"image": generated, "upscaler_1": "Lanczos", "upscaling_resize": 1.5}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let up = r.json()["image"].as_str().unwrap().to_string();
    let (w, h, _, text) = decode_png(&up);
    assert_eq!((w, h), (384, 384));
    assert_eq!(text.unwrap(), parameters);
    assert_eq!(
        png_text(&up, "postprocessing").unwrap(),
        "Postprocess upscale by: 1.5, Postprocess upscaler: Lanczos"
    );

    let small = b64_file("input.rgb.png");
    let named = |body: Value, field: &str| {
        let r = post(&s, "/sdapi/v1/extra-single-image", &body);
        assert_eq!(r.status, 422, "{body}: {}", r.text());
        let details = r.json()["details"].as_str().unwrap().to_string();
        assert!(details.contains(field), "{field}: {details}");
        details
    };
    let d = named(
        json!({"image": small, "upscaler_1": "R-ESRGAN 4x+"}),
        "upscaler_1",
    );
    assert!(d.contains("None, Lanczos, Nearest"), "{d}");
    named(
        json!({"image": small, "gfpgan_visibility": 0.5}),
        "gfpgan_visibility",
    );
    named(
        json!({"image": small, "codeformer_visibility": 1}),
        "codeformer_visibility",
    );
    named(
        json!({"image": small, "upscaler_1": "Lanczos", "upscaling_resize": 100}),
        "upscaling_resize",
    );
    named(
        json!({"image": small, "upscaler_1": "Lanczos", "upscaling_resize": 0.05}),
        "upscaling_resize",
    );
    named(
        json!({"image": small, "upscaling_resize": -1}),
        "upscaling_resize",
    );
    named(json!({"image": small, "resize_mode": 2}), "resize_mode");
    named(json!({"image": "not base64!"}), "image");
    named(
        json!({"image": base64::engine::general_purpose::STANDARD.encode(b"GIF89a")}),
        "image",
    );
    named(json!({"upscaler_1": "Lanczos"}), "image");
    // A header claiming more than 4096 px a side is refused before decoding.
    let huge = {
        let mut png = Vec::new();
        let mut enc = png::Encoder::new(&mut png, 5000, 8);
        enc.set_color(png::ColorType::Rgb);
        let mut w = enc.write_header().unwrap();
        w.write_image_data(&vec![0; 5000 * 8 * 3]).unwrap();
        w.finish().unwrap();
        base64::engine::general_purpose::STANDARD.encode(png)
    };
    named(json!({"image": huge}), "image");
    let r = post(
        &s,
        "/sdapi/v1/extra-batch-images",
        &json!({"imageList": [{"data": small, "name": "a"}, {"data": "x", "name": "b"}]}),
    );
    assert_eq!(r.status, 422, "{}", r.text());
    assert!(r.json()["details"]
        .as_str()
        .unwrap()
        .contains("imageList[1].data"));
    let r = post(
        &s,
        "/sdapi/v1/extra-batch-images",
        &json!({"imageList": [{"data": small}]}),
    );
    assert!(r.json()["details"]
        .as_str()
        .unwrap()
        .contains("imageList[0].name"));
}

fn esrgan_fixtures() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../pipeline/tests/fixtures/esrgan")
}

/// An RGB PNG of `w` x `h` (base64).
fn png_of(w: u32, h: u32) -> String {
    let mut png = Vec::new();
    let mut enc = png::Encoder::new(&mut png, w, h);
    enc.set_color(png::ColorType::Rgb);
    let mut writer = enc.write_header().unwrap();
    let pixels: Vec<u8> = (0..w * h * 3).map(|i| (i * 7 % 256) as u8).collect();
    writer.write_image_data(&pixels).unwrap();
    writer.finish().unwrap();
    base64::engine::general_purpose::STANDARD.encode(png)
}

#[test]
fn upscalers_dir_models_upscale_as_the_pipeline_and_a1111() {
    let dir = std::env::temp_dir().join(format!("sdserve-upscalers-http-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let fx = esrgan_fixtures();
    std::fs::copy(fx.join("x4-old.pth"), dir.join("4x-Tiny.pth")).unwrap();
    std::fs::copy(
        fx.join("x2-unshuffle.pth"),
        dir.join("RealESRGAN_x2plus.pth"),
    )
    .unwrap();
    std::fs::copy(fx.join("not-rrdbnet.pth"), dir.join("Broken.pth")).unwrap();
    let whole = std::fs::read(fx.join("x4-new.safetensors")).unwrap();
    std::fs::write(dir.join("Cut.safetensors"), &whole[..whole.len() / 2]).unwrap();
    let s = ready("step_ms=0", &[("UPSCALERS_DIR", dir.to_str().unwrap())]);

    // Listed after the built-ins, in A1111's shape.
    let listed = s.get("/sdapi/v1/upscalers").json();
    let names: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "None",
            "Lanczos",
            "Nearest",
            "4x-Tiny",
            "Broken",
            "Cut",
            "RealESRGAN_x2plus"
        ]
    );
    assert_eq!(listed[3]["model_path"], "4x-Tiny.pth");
    assert_eq!(listed[3]["model_name"], "ESRGAN_4x");
    let native = s.get("/upscalers").json();
    assert_eq!(native["upscalers"].as_array().unwrap().len(), 7);
    assert_eq!(
        native["upscalers"][1],
        json!({"name": "Lanczos", "kind": "builtin", "file": null})
    );
    assert_eq!(
        native["upscalers"][3],
        json!({"name": "4x-Tiny", "kind": "esrgan", "file": "4x-Tiny.pth"})
    );

    // A1111's result (tools/make_esrgan_fixtures.py: Upscaler.upscale with the x4 model to
    // 2.5), within one level of float noise; and exactly what the pipeline makes.
    let input = base64::engine::general_purpose::STANDARD
        .encode(std::fs::read(fx.join("input.tall.png")).unwrap());
    let got = extras_by_model(
        &s,
        &input,
        ("4x-Tiny", &dir.join("4x-Tiny.pth")),
        2.5,
        &fx.join("upscale.x4_by_2_5.png"),
    );
    assert_eq!(
        png_text(&got, "postprocessing").unwrap(),
        "Postprocess upscale by: 2.5, Postprocess upscaler: 4x-Tiny"
    );

    // Blended with a built-in, and the Real-ESRGAN x2 layout, by size.
    let r = post(
        &s,
        "/sdapi/v1/extra-single-image",
        &json!({"image": input, "upscaler_1": "Lanczos", "upscaler_2": "RealESRGAN_x2plus",
                "extras_upscaler_2_visibility": 0.5, "resize_mode": 1,
                "upscaling_resize_w": 80, "upscaling_resize_h": 300}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let got = r.json()["image"].as_str().unwrap().to_string();
    assert_eq!(decode_png(&got).0, 80);
    assert!(png_text(&got, "postprocessing")
        .unwrap()
        .ends_with("Postprocess upscaler 2: RealESRGAN_x2plus"));

    let named = |body: Value, field: &str| {
        let r = post(&s, "/sdapi/v1/extra-single-image", &body);
        assert_eq!(r.status, 422, "{body}: {}", r.text());
        let details = r.json()["details"].as_str().unwrap().to_string();
        assert!(details.contains(field), "{field}: {details}");
        details
    };
    let d = named(
        json!({"image": input, "upscaler_1": "Broken"}),
        "upscaler_1",
    );
    assert!(
        d.contains("Broken.pth")
            && d.contains("not an upscaler network")
            && d.contains("Real-ESRGAN Compact"),
        "{d}"
    );
    let d = named(json!({"image": input, "upscaler_1": "Cut"}), "upscaler_1");
    assert!(d.contains("Cut.safetensors"), "{d}");
    let d = named(
        json!({"image": input, "upscaler_1": "ESRGAN_4x"}),
        "upscaler_1",
    );
    assert!(d.contains("4x-Tiny, Broken, Cut, RealESRGAN_x2plus"), "{d}");
    // The model's own round makes 4400 px a side, past the cap, though 1.1x would not.
    let d = named(
        json!({"image": png_of(1100, 20), "upscaler_1": "4x-Tiny", "upscaling_resize": 1.1}),
        "upscaling_resize",
    );
    assert!(d.contains("4400x80"), "{d}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A Real-ESRGAN Compact model (SRVGGNetCompact) in UPSCALERS_DIR: listed by its name, and
/// Extras with it gives A1111's image (tools/make_esrgan_fixtures.py: `Upscaler.upscale` with
/// the x2 compact network to 3, through spandrel) and exactly the pipeline's.
#[test]
fn compact_models_upscale_as_the_pipeline_and_a1111() {
    let dir = std::env::temp_dir().join(format!("sdserve-compact-http-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let fx = esrgan_fixtures();
    let file = dir.join("2x-Compact.safetensors");
    std::fs::copy(fx.join("compact-x2.safetensors"), &file).unwrap();
    let s = ready("step_ms=0", &[("UPSCALERS_DIR", dir.to_str().unwrap())]);
    let listed = s.get("/sdapi/v1/upscalers").json();
    assert_eq!(listed[3]["name"], "2x-Compact");
    assert_eq!(listed[3]["model_path"], "2x-Compact.safetensors");
    let native = s.get("/upscalers").json();
    assert_eq!(native["upscalers"][3]["name"], "2x-Compact");

    let input = base64::engine::general_purpose::STANDARD
        .encode(std::fs::read(fx.join("input.small.png")).unwrap());
    extras_by_model(
        &s,
        &input,
        ("2x-Compact", &file),
        3.0,
        &fx.join("upscale.compact_x2_by_3.png"),
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// SwinIR models in UPSCALERS_DIR (A1111's `models/SwinIR`): listed as `swinir` (A1111:
/// `SwinIR 4x`), and Extras with one gives A1111's image (tools/make_swinir_fixtures.py:
/// `Upscaler.upscale` with its SwinIR tiles, the x2 pixelshuffle network to 3) and exactly
/// the pipeline's; in a batch too.
#[test]
fn swinir_models_upscale_as_the_pipeline_and_a1111() {
    let dir = std::env::temp_dir().join(format!("sdserve-swinir-http-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let fx =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../pipeline/tests/fixtures/swinir");
    let file = dir.join("SwinIR-Tiny.safetensors");
    std::fs::copy(fx.join("ps-x2.safetensors"), &file).unwrap();
    std::fs::copy(
        esrgan_fixtures().join("x2-old.safetensors"),
        dir.join("2x-Esrgan.safetensors"),
    )
    .unwrap();
    let s = ready("step_ms=0", &[("UPSCALERS_DIR", dir.to_str().unwrap())]);
    let listed = s.get("/sdapi/v1/upscalers").json();
    assert_eq!(
        (&listed[4]["name"], &listed[4]["model_name"]),
        (&json!("SwinIR-Tiny"), &json!("SwinIR 4x"))
    );
    assert_eq!(listed[3]["model_name"], "ESRGAN_4x");
    let native = s.get("/upscalers").json();
    assert_eq!(
        native["upscalers"][4],
        json!({"name": "SwinIR-Tiny", "kind": "swinir", "file": "SwinIR-Tiny.safetensors"})
    );
    assert_eq!(native["upscalers"][3]["kind"], "esrgan");

    let input = base64::engine::general_purpose::STANDARD
        .encode(std::fs::read(fx.join("input.small.png")).unwrap());
    let single = extras_by_model(
        &s,
        &input,
        ("SwinIR-Tiny", &file),
        3.0,
        &fx.join("upscale.ps_x2_by_3.png"),
    );
    let r = post(
        &s,
        "/sdapi/v1/extra-batch-images",
        &json!({"imageList": [{"data": input, "name": "a.png"}], "upscaler_1": "SwinIR-Tiny",
                "upscaling_resize": 3.0}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(decode_png(r.json()["images"][0].as_str().unwrap()).2 == decode_png(&single).2);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A1111's Extras upscale of `input` (base64 PNG) by `factor` with the UPSCALERS_DIR model
/// `(name, file)`: within one level of `want` (A1111's image, tools/make_esrgan_fixtures.py or
/// tools/make_swinir_fixtures.py)
/// and exactly what the pipeline makes of it. Answers the PNG (base64).
fn extras_by_model(
    s: &Server,
    input: &str,
    (name, file): (&str, &std::path::Path),
    factor: f64,
    want: &std::path::Path,
) -> String {
    use sdserve_pipeline::upscale::{ExtrasUpscale, ImageUpscaler, ModelUpscaler, UpscaleTarget};
    let r = post(
        s,
        "/sdapi/v1/extra-single-image",
        &json!({"image": input, "upscaler_1": name, "upscaling_resize": factor}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let got = r.json()["image"].as_str().unwrap().to_string();
    let (w, h, pixels, _) = decode_png(&got);
    let (ww, wh, want, _) =
        decode_png(&base64::engine::general_purpose::STANDARD.encode(std::fs::read(want).unwrap()));
    assert_eq!((w, h), (ww, wh));
    assert!(pixels.iter().zip(&want).all(|(a, b)| a.abs_diff(*b) <= 1));
    let (iw, ih, sent, _) = decode_png(input);
    let spec = ExtrasUpscale {
        target: UpscaleTarget::By(factor),
        upscaler: Some(ImageUpscaler::Model(std::sync::Arc::new(
            ModelUpscaler::new(name, file),
        ))),
        second: None,
    };
    let image = sdserve_pipeline::pipeline::RgbImage {
        width: iw,
        height: ih,
        pixels: sent,
    };
    assert!(spec.run(&image).unwrap().0.pixels == pixels);
    got
}
