//! SwinIR upscalers (`sdserve_pipeline::upscaler`, `swinir`) against spandrel's network and
//! A1111's SwinIR tiles (`tools/make_swinir_fixtures.py`): each upsampler's network within
//! float noise of spandrel's (shifted windows, the relative position bias, the padding to a
//! window multiple, img_range 255 for window 7), and A1111's `upscale_2` tiles and
//! `Upscaler.upscale` rounds within one level of a byte.

use crate::common;

use candle_core::{DType, Device};
use common::{a1111_input, fixture_path, max_abs_diff, read_png};
use sdserve_pipeline::pipeline::RgbImage;
use sdserve_pipeline::upscaler::{
    upscale_averaged_checked, upscale_by, Network, SwinIrUpsampler, Tiling, SWIN_TILE,
    SWIN_TILE_OVERLAP,
};
use serde_json::Value;

fn model(file: &str) -> Network {
    Network::load(&fixture_path("swinir").join(file), &Device::Cpu, DType::F32).unwrap()
}

fn png(name: &str) -> RgbImage {
    read_png(&format!("../swinir/{name}"))
}

#[test]
fn every_upsampler_is_spandrels_network() {
    let want = candle_core::safetensors::load(
        fixture_path("swinir").join("forward.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    // input.small.png is 21x15: a multiple of none of the windows (4, 8, 7).
    let x = a1111_input(&png("input.small.png"));
    for (file, scale, upsampler, window, img_size, depths, heads, three_conv) in [
        (
            "nc-x4.pth",
            4,
            SwinIrUpsampler::NearestConv,
            4,
            16,
            vec![2, 2],
            vec![2, 1],
            true,
        ),
        (
            "ps-x2.safetensors",
            2,
            SwinIrUpsampler::PixelShuffle,
            4,
            12,
            vec![3],
            vec![2],
            false,
        ),
        (
            "psd-x3.pth",
            3,
            SwinIrUpsampler::PixelShuffleDirect,
            8,
            64,
            vec![1, 1],
            vec![2, 4],
            false,
        ),
        (
            "dn-x1.pth",
            1,
            SwinIrUpsampler::None,
            7,
            14,
            vec![2],
            vec![3],
            false,
        ),
    ] {
        let m = model(file);
        assert_eq!(m.architecture(), "SwinIR", "{file}");
        assert_eq!(m.tiling(), Tiling::Averaged);
        let n = m.swinir().unwrap();
        assert_eq!(
            (
                m.scale(),
                n.upsampler,
                n.window,
                n.img_size,
                &n.depths,
                &n.heads,
                n.three_conv
            ),
            (scale, upsampler, window, img_size, &depths, &heads, three_conv),
            "{file}"
        );
        let got = m.forward(&x).unwrap().squeeze(0).unwrap();
        assert_eq!(got.dims(), [3, 15 * scale, 21 * scale], "{file}");
        let diff = max_abs_diff(&got, &want[file]);
        assert!(diff < 1e-4, "{file}: max difference {diff}");
    }
}

#[test]
fn swinir_runs_in_float32_where_half_is_asked_for() {
    // spandrel's SwinIR does not support half precision; A1111's prefer_half leaves it f32.
    let m = Network::load(
        &fixture_path("swinir").join("dn-x1.pth"),
        &Device::Cpu,
        DType::F16,
    )
    .unwrap();
    assert_eq!(m.dtype(), DType::F32);
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
fn tiles_and_rounds_are_a1111s_swinir() {
    let meta: Value = serde_json::from_str(
        &std::fs::read_to_string(fixture_path("swinir").join("swinir.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        (
            meta["swin_tile"].as_u64(),
            meta["swin_tile_overlap"].as_u64()
        ),
        (Some(SWIN_TILE as u64), Some(SWIN_TILE_OVERLAP as u64))
    );
    let cases = meta["cases"].as_object().unwrap();
    assert_eq!(cases.len(), 6);
    for (label, case) in cases {
        let m = model(case["model"].as_str().unwrap());
        let input = png(&format!("input.{}.png", case["input"].as_str().unwrap()));
        let (got, want) = match case["kind"].as_str().unwrap() {
            "tiled" => (
                upscale_averaged_checked(&m, &input, SWIN_TILE, SWIN_TILE_OVERLAP, &mut || {
                    std::ops::ControlFlow::Continue(())
                })
                .unwrap(),
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
fn the_architecture_is_told_from_the_names_alone() {
    for file in ["nc-x4.pth", "ps-x2.safetensors", "psd-x3.pth", "dn-x1.pth"] {
        let path = fixture_path("swinir").join(file);
        assert_eq!(
            Network::architecture_of(&path).unwrap(),
            Some("SwinIR"),
            "{file}"
        );
    }
    let esrgan = fixture_path("esrgan");
    for (file, arch) in [
        ("x4-old.pth", Some("ESRGAN")),
        ("x4-new.safetensors", Some("ESRGAN")),
        ("compact-x4.pth", Some("RealESRGAN Compact")),
        ("not-rrdbnet.pth", None),
    ] {
        assert_eq!(
            Network::architecture_of(&esrgan.join(file)).unwrap(),
            arch,
            "{file}"
        );
    }
    assert_eq!(
        Network::architecture_of(&fixture_path("swinir").join("swin2sr-x2.pth")).unwrap(),
        None
    );
}

#[test]
fn a_swin2sr_is_refused_by_its_name() {
    let path = fixture_path("swinir").join("swin2sr-x2.pth");
    let e = Network::load(&path, &Device::Cpu, DType::F32)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("swin2sr-x2.pth")
            && e.contains("a Swin2SR network")
            && e.contains(sdserve_pipeline::upscaler::SUPPORTED),
        "{e}"
    );
}

#[test]
fn a_cancelled_check_stops_the_swinir_tiles() {
    let m = model("nc-x4.pth");
    let input = png("input.wide.png");
    let mut tiles = 0;
    let e = upscale_averaged_checked(&m, &input, SWIN_TILE, SWIN_TILE_OVERLAP, &mut || {
        tiles += 1;
        if tiles > 2 {
            std::ops::ControlFlow::Break(())
        } else {
            std::ops::ControlFlow::Continue(())
        }
    })
    .unwrap_err();
    assert!(
        matches!(e, sdserve_pipeline::PipelineError::Cancelled),
        "{e}"
    );
    assert_eq!(tiles, 3, "asked before each tile, stopped at the third");
}
