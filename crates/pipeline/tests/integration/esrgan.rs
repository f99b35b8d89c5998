//! Upscaler networks (`sdserve_pipeline::upscaler`: ESRGAN in every layout, ESRGAN+, x8 and
//! "3x" RRDBNets, Real-ESRGAN Compact) against spandrel's network and A1111's tiled upscale
//! (`tools/make_esrgan_fixtures.py`): the network's output within float noise for each, and
//! A1111's tiles, blend, rounding to bytes and `Upscaler.upscale` rounds within one level of
//! a byte (the float noise carrying a value across a half).

use crate::common;

use candle_core::{DType, Device, Tensor};
use common::{a1111_input, fixture_path, max_abs_diff, read_png};
use sdserve_pipeline::pipeline::RgbImage;
use sdserve_pipeline::upscaler::{rounds, upscale_by, upscale_tiled, Network, TILE, TILE_OVERLAP};
use serde_json::Value;

fn model(file: &str) -> Network {
    Network::load(&fixture_path("esrgan").join(file), &Device::Cpu, DType::F32).unwrap()
}

fn png(name: &str) -> RgbImage {
    read_png(&format!("../esrgan/{name}"))
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
        // A "3x" file's length reads as one x2 upsampling in spandrel, which runs it as 2x.
        ("x3-old.pth", "x3-old.pth", 2, 1),
    ] {
        let m = model(file);
        assert_eq!(m.architecture(), "ESRGAN", "{file}");
        let n = m.esrgan().unwrap();
        assert_eq!(
            (m.scale(), n.blocks(), n.features, n.growth),
            (scale, blocks, 8, 4)
        );
        let got = m.forward(&x).unwrap().squeeze(0).unwrap();
        let diff = max_abs_diff(&got, &want[reference]);
        assert!(diff < 1e-4, "{file}: max difference {diff}");
    }
}

/// The network's output for `input.small.png` (or the crop of it esrgan.json names) within
/// float noise of spandrel's.
fn assert_forward_is_spandrels(file: &str) -> Network {
    let want = candle_core::safetensors::load(
        fixture_path("esrgan").join("forward.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let meta: Value = serde_json::from_str(
        &std::fs::read_to_string(fixture_path("esrgan").join("esrgan.json")).unwrap(),
    )
    .unwrap();
    let mut x = a1111_input(&png("input.small.png"));
    if let Some(crop) = meta["forward_crop"][file].as_array() {
        let (rows, cols) = (crop[0].as_u64().unwrap(), crop[1].as_u64().unwrap());
        x = x
            .narrow(2, 0, rows as usize)
            .unwrap()
            .narrow(3, 0, cols as usize)
            .unwrap();
    }
    let m = model(file);
    let got = m.forward(&x).unwrap().squeeze(0).unwrap();
    let diff = max_abs_diff(&got, &want[file]);
    assert!(diff < 1e-4, "{file}: max difference {diff}");
    m
}

#[test]
fn esrgan_plus_runs_its_shortcuts() {
    let m = assert_forward_is_spandrels("plus-x4.pth");
    assert_eq!(m.architecture(), "ESRGAN+");
    assert_eq!((m.scale(), m.esrgan().unwrap().blocks()), (4, 1));
}

#[test]
fn an_x8_rrdbnet_upsamples_three_times() {
    let m = assert_forward_is_spandrels("x8-old.pth");
    assert_eq!((m.architecture(), m.scale()), ("ESRGAN", 8));
}

#[test]
fn real_esrgan_compact_is_spandrels() {
    for (file, scale, convs) in [
        ("compact-x4.pth", 4, 3),
        ("compact-x2.safetensors", 2, 2),
        ("compact-x1.pth", 1, 1),
    ] {
        let m = assert_forward_is_spandrels(file);
        assert_eq!(m.architecture(), "RealESRGAN Compact");
        let n = m.compact().unwrap();
        assert_eq!(
            (m.scale(), n.convs(), n.features),
            (scale, convs, 8),
            "{file}"
        );
        assert!(m.esrgan().is_none());
    }
}

/// Every byte within 1 of A1111's, and at most `per_10000` in 10000 off at all.
fn assert_close(label: &str, got: &RgbImage, want: &RgbImage, per_10000: usize) {
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
    eprintln!("{label}: {off} of {} bytes differ", got.pixels.len());
    assert!(
        off * 10000 <= got.pixels.len() * per_10000,
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
    assert_eq!(cases.len(), 11);
    for (label, case) in cases {
        let m = model(case["model"].as_str().unwrap());
        let input = png(&format!("input.{}.png", case["input"].as_str().unwrap()));
        let (got, want, passes) = match case["kind"].as_str().unwrap() {
            "tiled" => (
                upscale_tiled(&m, &input, TILE, TILE_OVERLAP).unwrap(),
                png(&format!("tiled.{label}.png")),
                1,
            ),
            _ => {
                let scale = case["scale"].as_f64().unwrap();
                let (w, h) = (input.width as usize, input.height as usize);
                (
                    upscale_by(&m, &input, scale).unwrap(),
                    png(&format!("upscale.{label}.png")),
                    rounds(m.scale(), w, h, scale).len(),
                )
            }
        };
        // One pass: a byte is off only where A1111's own value lies within float noise
        // (~1e-4 of a level) of a half. A byte off after the first of several passes goes
        // into the next one's network, which spreads it over its neighbours (x2_by_3: 1 byte
        // of its first pass, 9 of the result).
        assert_close(label, &got, &want, if passes > 1 { 20 } else { 1 });
    }
}

#[test]
fn files_that_are_not_rrdbnets_are_refused_by_name() {
    let dir = fixture_path("esrgan");
    let err = |path: &std::path::Path| {
        Network::load(path, &Device::Cpu, DType::F32)
            .unwrap_err()
            .to_string()
    };
    let e = err(&dir.join("not-rrdbnet.pth"));
    assert!(
        e.contains("not-rrdbnet.pth")
            && e.contains("not an upscaler network")
            && e.contains(sdserve_pipeline::upscaler::SUPPORTED)
            && e.contains("the layer names are none of them"),
        "{e}"
    );
    // An architecture spandrel loads and this server does not is named (its int64
    // relative_position_index buffer is no obstacle).
    let e = err(&fixture_path("swinir").join("swin2sr-x2.pth"));
    assert!(
        e.contains("swin2sr-x2.pth")
            && e.contains("a Swin2SR network")
            && e.contains(sdserve_pipeline::upscaler::SUPPORTED),
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
