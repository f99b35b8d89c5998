//! ESRGAN upscalers (`sdserve_pipeline::upscaler`) against spandrel's network and A1111's
//! tiled upscale (`tools/make_esrgan_fixtures.py`): the network's output within float noise
//! for every layout, and A1111's tiles, blend and `Upscaler.upscale` rounds within one level
//! of a byte (the float noise crossing a truncation).

mod common;

use candle_core::{DType, Device, Tensor};
use common::{fixture_path, max_abs_diff, read_png};
use sdserve_pipeline::pipeline::RgbImage;
use sdserve_pipeline::upscaler::{upscale_by, upscale_tiled, Esrgan, TILE, TILE_OVERLAP};
use serde_json::Value;

fn model(file: &str) -> Esrgan {
    Esrgan::load(&fixture_path("esrgan").join(file), &Device::Cpu, DType::F32).unwrap()
}

fn png(name: &str) -> RgbImage {
    read_png(&format!("../esrgan/{name}"))
}

/// The image as A1111 hands it to the network: BGR, `/ 255` in float64, then float32.
fn a1111_input(image: &RgbImage) -> Tensor {
    let (w, h) = (image.width as usize, image.height as usize);
    let mut v = vec![0f32; 3 * w * h];
    for (i, p) in image.pixels.chunks(3).enumerate() {
        for c in 0..3 {
            v[c * w * h + i] = (p[2 - c] as f64 / 255.0) as f32;
        }
    }
    Tensor::from_vec(v, (1, 3, h, w), &Device::Cpu).unwrap()
}

#[test]
fn the_network_is_spandrels_in_every_layout() {
    let want = candle_core::safetensors::load(
        fixture_path("esrgan").join("forward.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let x = a1111_input(&png("input.small.png"));
    for (file, reference, scale, blocks) in [
        ("x4-old.pth", "x4-old.pth", 4, 2),
        ("x4-new.safetensors", "x4-old.pth", 4, 2),
        ("x2-unshuffle.pth", "x2-unshuffle.pth", 2, 1),
        ("x2-old.safetensors", "x2-old.safetensors", 2, 1),
    ] {
        let m = model(file);
        assert_eq!(
            (m.scale(), m.blocks(), m.features, m.growth),
            (scale, blocks, 8, 4)
        );
        let got = m.forward(&x).unwrap().squeeze(0).unwrap();
        let diff = max_abs_diff(&got, &want[reference]);
        assert!(diff < 1e-4, "{file}: max difference {diff}");
    }
}

/// Every byte within 1 of A1111's, and nearly all equal.
fn assert_close(label: &str, got: &RgbImage, want: &RgbImage) {
    assert_eq!(
        (got.width, got.height),
        (want.width, want.height),
        "{label}"
    );
    let mut off = 0;
    for (a, b) in got.pixels.iter().zip(&want.pixels) {
        let d = (*a as i32 - *b as i32).abs();
        assert!(d <= 1, "{label}: a byte differs by {d}");
        off += (d > 0) as usize;
    }
    assert!(
        off * 1000 <= got.pixels.len(),
        "{label}: {off} of {} bytes differ",
        got.pixels.len()
    );
}

#[test]
fn tiles_and_rounds_are_a1111s() {
    let meta: Value = serde_json::from_str(
        &std::fs::read_to_string(fixture_path("esrgan").join("esrgan.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        (meta["tile"].as_u64(), meta["overlap"].as_u64()),
        (Some(TILE as u64), Some(TILE_OVERLAP as u64))
    );
    let cases = meta["cases"].as_object().unwrap();
    assert_eq!(cases.len(), 5);
    for (label, case) in cases {
        let m = model(case["model"].as_str().unwrap());
        let input = png(&format!("input.{}.png", case["input"].as_str().unwrap()));
        let (got, want) = match case["kind"].as_str().unwrap() {
            "tiled" => (
                upscale_tiled(&m, &input, TILE, TILE_OVERLAP).unwrap(),
                png(&format!("tiled.{label}.png")),
            ),
            _ => (
                upscale_by(&m, &input, case["scale"].as_f64().unwrap()).unwrap(),
                png(&format!("upscale.{label}.png")),
            ),
        };
        assert_close(label, &got, &want);
    }
}

#[test]
fn files_that_are_not_rrdbnets_are_refused_by_name() {
    let dir = fixture_path("esrgan");
    let err = |path: &std::path::Path| {
        Esrgan::load(path, &Device::Cpu, DType::F32)
            .unwrap_err()
            .to_string()
    };
    let e = err(&dir.join("not-rrdbnet.pth"));
    assert!(
        e.contains("not-rrdbnet.pth") && e.contains("not an ESRGAN"),
        "{e}"
    );
    // Cut short: the zip's directory (or the safetensors header's tensors) are gone.
    let scratch = std::env::temp_dir().join(format!("sdserve-esrgan-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).unwrap();
    for file in ["x4-old.pth", "x4-new.safetensors"] {
        let bytes = std::fs::read(dir.join(file)).unwrap();
        let cut = scratch.join(file);
        std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
        let e = err(&cut);
        assert!(e.contains(file), "{e}");
    }
    // A tensor of the wrong shape is named.
    let mut tensors =
        candle_core::safetensors::load(dir.join("x4-new.safetensors"), &Device::Cpu).unwrap();
    tensors.insert(
        "conv_body.weight".into(),
        Tensor::zeros((8, 7, 3, 3), DType::F32, &Device::Cpu).unwrap(),
    );
    let bad = scratch.join("bad-shape.safetensors");
    candle_core::safetensors::save(&tensors, &bad).unwrap();
    let e = err(&bad);
    assert!(
        e.contains("conv_body.weight") && e.contains("[8, 7, 3, 3]"),
        "{e}"
    );
    std::fs::remove_dir_all(&scratch).unwrap();
}

#[test]
fn a_deadline_stops_the_work_between_tiles() {
    use sdserve_pipeline::upscaler::upscale_tiled_until;
    let m = model("x2-old.safetensors");
    let input = png("input.wide.png");
    let past = std::time::Instant::now();
    let e = upscale_tiled_until(&m, &input, TILE, TILE_OVERLAP, Some(past)).unwrap_err();
    assert!(
        matches!(e, sdserve_pipeline::PipelineError::Cancelled),
        "{e}"
    );
    let later = past + std::time::Duration::from_secs(3600);
    let done = upscale_tiled_until(&m, &input, TILE, TILE_OVERLAP, Some(later)).unwrap();
    assert_eq!(done, upscale_tiled(&m, &input, TILE, TILE_OVERLAP).unwrap());
}
