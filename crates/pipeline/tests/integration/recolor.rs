//! The recolor modules against tools/make_recolor_fixtures.py: OpenCV 4.10's 8-bit Lab and
//! HSV conversions on every input (the sha256 of each whole output, a sample to show what
//! differs), the extension's recolor_luminance / recolor_intensity maps, and its
//! post-processing of decoded images.

use base64::Engine;
use candle_core::{Device, Tensor};
use sdserve_pipeline::controlnet::preprocess::{
    hsv_to_rgb_row, lab_to_rgb, recolor_post_process, rgb_to_hsv, rgb_to_lab, Preprocessor,
    RecolorChannel,
};
use sdserve_pipeline::pipeline::{postprocess_truncated, RgbImage};
use serde_json::Value;
use sha2::{Digest, Sha256};

fn fixture() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/recolor.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn bytes(v: &Value) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD
        .decode(v.as_str().unwrap())
        .unwrap()
}

fn dim(v: &Value, key: &str) -> usize {
    v[key].as_u64().unwrap() as usize
}

/// Every input of a conversion as the fixture laid it out (4096 pixels a row).
fn every_input(name: &str, n: usize) -> Vec<u8> {
    if name == "hsv2rgb" {
        (0..180u8)
            .flat_map(|h| (0..=255u8).flat_map(move |s| (0..=255u8).flat_map(move |v| [h, s, v])))
            .collect()
    } else {
        (0..n as u32)
            .flat_map(|k| [(k >> 16) as u8, (k >> 8) as u8, k as u8])
            .collect()
    }
}

fn convert(name: &str, input: &[u8], width: usize) -> Vec<u8> {
    let pixel = |f: fn([u8; 3]) -> [u8; 3]| -> Vec<u8> {
        input
            .chunks_exact(3)
            .flat_map(|p| f([p[0], p[1], p[2]]))
            .collect()
    };
    match name {
        "rgb2lab" => pixel(rgb_to_lab),
        "rgb2hsv" => pixel(rgb_to_hsv),
        "lab2rgb" => pixel(lab_to_rgb),
        "hsv2rgb" => {
            let mut out = vec![0u8; input.len()];
            for (src, dst) in input.chunks(width * 3).zip(out.chunks_mut(width * 3)) {
                hsv_to_rgb_row(src, dst);
            }
            out
        }
        _ => unreachable!(),
    }
}

#[test]
fn conversions_are_opencv_s_on_every_input() {
    let f = fixture();
    let mut failures = Vec::new();
    for name in ["rgb2lab", "rgb2hsv", "lab2rgb", "hsv2rgb"] {
        let case = &f["conversions"][name];
        let (w, h) = (dim(case, "width"), dim(case, "height"));
        // The sample first: a mismatch there names pixels.
        let (sin, sout) = (bytes(&case["sample_in"]), bytes(&case["sample_out"]));
        let got = convert(name, &sin, usize::MAX / 3);
        let wrong = got
            .chunks_exact(3)
            .zip(sout.chunks_exact(3))
            .zip(sin.chunks_exact(3))
            .filter(|((g, e), _)| g != e)
            .map(|((g, e), i)| format!("{i:?}: {g:?} vs {e:?}"))
            .collect::<Vec<_>>();
        // The sample's pixels are converted outside their rows: only HSV2RGB's path differs.
        if name != "hsv2rgb" && !wrong.is_empty() {
            failures.push(format!(
                "{name}: {} of 4096 sampled differ: {:?}",
                wrong.len(),
                &wrong[..wrong.len().min(5)]
            ));
            continue;
        }
        let out = convert(name, &every_input(name, w * h), w);
        let digest: String = Sha256::digest(&out)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        if digest != case["sha256"].as_str().unwrap() {
            failures.push(format!("{name}: the {w}x{h} output's sha256 differs"));
        }
    }
    // HSV2RGB's scalar tail (8 pixels a row at width 520) rounds where the vector body truncates.
    let case = &f["conversions"]["hsv2rgb_520"];
    let (input, expected) = (bytes(&case["in"]), bytes(&case["out"]));
    let got = convert("hsv2rgb", &input, dim(case, "width"));
    let differ = got.iter().zip(&expected).filter(|(a, b)| a != b).count();
    if differ != 0 {
        failures.push(format!("hsv2rgb at width 520: {differ} values differ"));
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

#[test]
fn recolor_maps_are_the_extension_s() {
    let f = fixture();
    let mut failures = Vec::new();
    for case in f["maps"].as_array().unwrap() {
        let image = &f["images"][case["image"].as_str().unwrap()];
        let image = RgbImage {
            width: dim(image, "width") as u32,
            height: dim(image, "height") as u32,
            pixels: bytes(&image["rgb"]),
        };
        let gamma = case["gamma"].as_f64().unwrap();
        let p = match case["module"].as_str().unwrap() {
            "recolor_luminance" => Preprocessor::RecolorLuminance { gamma },
            _ => Preprocessor::RecolorIntensity { gamma },
        };
        let map = p.run(&image).unwrap();
        assert_eq!((map.width, map.height), (image.width, image.height));
        let expected = bytes(&case["map"]);
        let differ = map
            .pixels
            .iter()
            .zip(&expected)
            .filter(|(a, b)| a != b)
            .count();
        if differ != 0 {
            failures.push(format!(
                "{} {} gamma {gamma}: {differ} differ",
                case["module"], case["image"]
            ));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

#[test]
fn post_processing_is_the_extension_s_on_decoded_images() {
    let f = fixture();
    for case in f["post"].as_array().unwrap() {
        let (w, h) = (dim(case, "width"), dim(case, "height"));
        let decoded: Vec<f32> = bytes(&case["decoded"])
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let decoded = Tensor::from_vec(decoded, (1, 3, h, w), &Device::Cpu).unwrap();
        let image = postprocess_truncated(&decoded).unwrap();
        let feed = bytes(&case["feed"]);
        let map = RgbImage {
            width: w as u32,
            height: h as u32,
            pixels: feed.iter().flat_map(|&v| [v, 0, 0]).collect(),
        };
        let channel = if case["luminance"].as_bool().unwrap() {
            RecolorChannel::Luminance
        } else {
            RecolorChannel::Intensity
        };
        let out = recolor_post_process(&image, &map, channel);
        assert_eq!(out.pixels, bytes(&case["out"]), "{channel:?} {w}x{h}");
    }
}
