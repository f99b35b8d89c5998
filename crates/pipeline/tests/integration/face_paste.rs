//! facexlib's face parser and paste-back (`sdserve_pipeline::face_restore::{parsenet,
//! paste}`) against facexlib 0.3.0 and OpenCV 4.10 (`tools/make_face_paste_fixtures.py`: a
//! random ParseNet narrowed through its own constructor; `paste_faces_to_input_image` with
//! `use_parse=True` on one face over an image's corner and on two overlapping faces, every
//! cv2 call recorded): the logits and classes, the Gaussian kernel and blurred masks, the
//! inverse affines and both warps, and the pasted image's bytes.

use std::sync::OnceLock;

use crate::common;

use candle_core::{DType, Device, Tensor};
use common::{fixture_path, max_abs_diff, read_png};
use sdserve_pipeline::face_restore::paste::{
    blur, invert_affine, paste_faces, paste_parsed, soft_mask, warp_affine_f64, warp_affine_u8,
    Affine, ParsedFace,
};
use sdserve_pipeline::face_restore::ParseNet;
use sdserve_pipeline::pipeline::RgbImage;
use serde_json::Value;

/// Largest logit difference allowed from torch's (logits of std 8; measured: 1.9e-5).
const LOGIT_TOLERANCE: f32 = 1e-4;
/// Largest difference allowed in a float64 mask on [0, 1] (or a blur on [0, 255] / 255): the
/// fixture keeps them in f32 (3e-8 near 1); measured: 3.0e-8.
const MASK_TOLERANCE: f64 = 1e-7;

fn meta() -> &'static Value {
    static META: OnceLock<Value> = OnceLock::new();
    META.get_or_init(|| {
        let text = std::fs::read_to_string(fixture_path("face_paste").join("face_paste.json"));
        serde_json::from_str(&text.unwrap()).unwrap()
    })
}

fn reference() -> &'static std::collections::HashMap<String, Tensor> {
    static REF: OnceLock<std::collections::HashMap<String, Tensor>> = OnceLock::new();
    REF.get_or_init(|| {
        candle_core::safetensors::load(
            fixture_path("face_paste").join("face_paste.safetensors"),
            &Device::Cpu,
        )
        .unwrap()
    })
}

fn model() -> &'static ParseNet {
    static MODEL: OnceLock<ParseNet> = OnceLock::new();
    MODEL.get_or_init(|| {
        ParseNet::load(
            &fixture_path("face_paste").join("parsenet.pth"),
            &Device::Cpu,
        )
        .unwrap()
    })
}

fn png(name: &str) -> RgbImage {
    read_png(&format!("../face_paste/{name}"))
}

/// A gray PNG's values (read_png expands gray to RGB).
fn gray(name: &str) -> Vec<u8> {
    png(name).pixels.chunks_exact(3).map(|p| p[0]).collect()
}

/// A 2x3 float64 matrix of the reference tensors (bit for bit, where JSON may not be).
fn affine(key: &str) -> Affine {
    let v = f64s(&reference()[key]);
    [[v[0], v[1], v[2]], [v[3], v[4], v[5]]]
}

fn f64s(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// Each case with its faces: (case, face index, the face, the reference classes).
fn faces() -> Vec<(&'static Value, usize, RgbImage, Vec<u8>)> {
    let mut out = Vec::new();
    for case in meta()["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        for i in 0..case["faces"].as_u64().unwrap() as usize {
            out.push((
                case,
                i,
                png(&format!("{name}.face{i}.png")),
                gray(&format!("{name}.argmax{i}.png")),
            ));
        }
    }
    out
}

/// Every `stride`-th row and column of a `w`-wide row-major image.
fn strided(v: &[f64], w: usize, stride: usize) -> Vec<f64> {
    let h = v.len() / w;
    (0..h)
        .step_by(stride)
        .flat_map(|y| (0..w).step_by(stride).map(move |x| (y, x)))
        .map(|(y, x)| v[y * w + x])
        .collect()
}

fn max_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

/// (largest difference, values that differ, values) of two byte images.
fn byte_diff(ours: &[u8], reference: &[u8]) -> (i32, usize, usize) {
    assert_eq!(ours.len(), reference.len());
    let d = ours
        .iter()
        .zip(reference)
        .map(|(&a, &b)| (a as i32 - b as i32).abs());
    let (max, off) = d.fold((0, 0), |(m, n), d| (m.max(d), n + (d > 0) as usize));
    (max, off, ours.len())
}

#[test]
fn the_loader_reads_the_sizes_from_the_weights() {
    let m = model();
    let depths: Vec<usize> = meta()["depths"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as usize)
        .collect();
    assert_eq!(m.depths.to_vec(), depths);
    assert_eq!(m.classes as u64, meta()["classes"].as_u64().unwrap());
    assert_eq!(
        m.base_channels as u64,
        meta()["narrow"]["base_ch"].as_u64().unwrap()
    );
    let err = ParseNet::load(
        &fixture_path("codeformer").join("codeformer.pth"),
        &Device::Cpu,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("not a ParseNet"), "{err}");
}

#[test]
fn logits_and_classes_are_facexlibs() {
    let stride = meta()["logit_stride"].as_u64().unwrap() as usize;
    for (case, i, face, want_classes) in faces() {
        let name = case["name"].as_str().unwrap();
        let x = ParseNet::input(&face, &Device::Cpu).unwrap();
        let logits = model().forward(&x).unwrap();
        let idx = |n: usize| {
            let v: Vec<u32> = (0..n as u32).step_by(stride).collect();
            Tensor::new(v, &Device::Cpu).unwrap()
        };
        let got = logits
            .index_select(&idx(512), 2)
            .unwrap()
            .index_select(&idx(512), 3)
            .unwrap();
        let d = max_abs_diff(&got, &reference()[&format!("{name}.logits{i}")]);
        let classes = model().classes_of(&face).unwrap();
        let off = classes
            .iter()
            .zip(&want_classes)
            .filter(|(a, b)| a != b)
            .count();
        let margins = &case["parse"][i];
        eprintln!(
            "{name} face {i}: logits within {d:.3e}; {off} of {} classes differ ({} pixels' \
             top two logits within 1e-4 in torch)",
            classes.len(),
            margins["pixels_under_1e-4"]
        );
        assert!(d < LOGIT_TOLERANCE, "{name} face {i}: logits differ by {d}");
        // Only pixels whose top two logits tie within the float noise may flip.
        assert!(
            off as u64 <= margins["pixels_under_1e-4"].as_u64().unwrap(),
            "{name} face {i}: {off} classes differ"
        );
    }
}

#[test]
fn the_blur_and_mask_are_opencvs() {
    let want = f64s(&reference()["gaussian_kernel_101_11"]);
    let kernel = blur::gaussian_kernel(101, 11.0);
    let exact = kernel.iter().zip(&want).filter(|(a, b)| a == b).count();
    let d = max_diff(&kernel, &want);
    eprintln!("getGaussianKernel(101, 11): {exact} of 101 taps equal, within {d:.1e}");
    assert!(d < 1e-17, "{d}");

    let (s1, s) = (
        meta()["blur1_stride"].as_u64().unwrap() as usize,
        meta()["mask_stride"].as_u64().unwrap() as usize,
    );
    for (case, i, _, classes) in faces() {
        let name = case["name"].as_str().unwrap();
        // From facexlib's own classes: the blur alone.
        let once = blur::gaussian_blur_f64(
            &sdserve_pipeline::face_restore::paste::parse_mask(&classes),
            512,
            512,
            &kernel,
        );
        let d1 = max_diff(
            &strided(&once, 512, s1),
            &f64s(&reference()[&format!("{name}.blur1_{i}")]),
        ) / 255.0;
        let mask = soft_mask(&classes, 512);
        let d2 = max_diff(
            &strided(&mask, 512, s),
            &f64s(&reference()[&format!("{name}.mask{i}")]),
        );
        eprintln!("{name} face {i}: first blur within {d1:.2e} (/255), mask within {d2:.2e}");
        assert!(d1 < MASK_TOLERANCE && d2 < MASK_TOLERANCE, "{d1} {d2}");
    }
}

#[test]
fn the_inverse_affines_and_warps_are_opencvs() {
    for (case, i, face, classes) in faces() {
        let name = case["name"].as_str().unwrap();
        let size = &case["size"];
        let (w, h) = (
            size[0].as_u64().unwrap() as usize,
            size[1].as_u64().unwrap() as usize,
        );
        let inverse = invert_affine(&affine(&format!("{name}.affine{i}")));
        let want = affine(&format!("{name}.inverse_affine{i}"));
        assert_eq!(inverse, want, "{name} face {i}: the inverse affine");

        let warped = warp_affine_u8(&face.pixels, (512, 512, 3), &inverse, (w, h));
        let (max, off, n) = byte_diff(&warped, &png(&format!("{name}.inv_restored{i}.png")).pixels);
        eprintln!("{name} face {i}: warped face: {off} of {n} bytes differ, by {max} at most");
        assert_eq!(max, 0, "{name} face {i}: the 8-bit warp");

        let mask = warp_affine_f64(&soft_mask(&classes, 512), (512, 512), &inverse, (w, h));
        let stride = meta()["inv_mask_stride"].as_u64().unwrap() as usize;
        let d = max_diff(
            &strided(&mask, w, stride),
            &f64s(&reference()[&format!("{name}.inv_mask{i}")]),
        );
        eprintln!("{name} face {i}: warped mask within {d:.2e}");
        assert!(d < MASK_TOLERANCE, "{name} face {i}: warped mask {d}");
    }

    // A 7x5 image through a rotation and scale into 6x6, over every border path.
    let small = &meta()["small_warp"];
    let nums = |k: &str| -> Vec<f64> {
        small[k]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect()
    };
    let m = affine("small_warp.affine");
    let src: Vec<u8> = nums("src").into_iter().map(|v| v as u8).collect();
    let out: Vec<u8> = nums("out").into_iter().map(|v| v as u8).collect();
    assert_eq!(warp_affine_u8(&src, (7, 5, 3), &m, (6, 6)), out);
    let src = f64s(&reference()["small_warp.src_f64"]);
    let got = warp_affine_f64(&src, (7, 5), &m, (6, 6));
    assert_eq!(got, f64s(&reference()["small_warp.out_f64"]));
}

#[test]
fn the_pasted_image_is_facexlibs() {
    for case in meta()["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let image = png(&format!("{name}.png"));
        let want = png(&format!("{name}.out.png"));
        let n = case["faces"].as_u64().unwrap() as usize;
        let faces: Vec<(Affine, RgbImage)> = (0..n)
            .map(|i| {
                (
                    affine(&format!("{name}.affine{i}")),
                    png(&format!("{name}.face{i}.png")),
                )
            })
            .collect();
        // With facexlib's own classes: the paste alone.
        let classes: Vec<Vec<u8>> = (0..n)
            .map(|i| gray(&format!("{name}.argmax{i}.png")))
            .collect();
        let parsed: Vec<ParsedFace> = faces
            .iter()
            .zip(&classes)
            .map(|((affine, face), classes)| ParsedFace {
                affine: *affine,
                face,
                classes,
            })
            .collect();
        let alone = paste_parsed(&image, &parsed).unwrap();
        let (max_a, off_a, total) = byte_diff(&alone.pixels, &want.pixels);
        // End to end, with our ParseNet.
        let ours = paste_faces(&image, &faces, model()).unwrap();
        let (max, off, _) = byte_diff(&ours.pixels, &want.pixels);
        let changed = byte_diff(&image.pixels, &want.pixels).1;
        eprintln!(
            "{name}: facexlib changed {changed} of {total} bytes; with its classes {off_a} \
             differ (by {max_a} at most), end to end {off} (by {max} at most)"
        );
        // Measured: 0 and 3 bytes of 249000 off by 1, both ways (a blend on a byte's edge
        // truncates either way); the parser's rare flips add none here.
        assert!(max_a <= 1 && max <= 1, "{name}: {max_a} {max}");
        assert!(
            off_a * 10_000 <= total && off * 10_000 <= total,
            "{name}: {off_a} {off}"
        );
        assert!(
            changed * 10 > total,
            "{name}: the faces barely changed the image"
        );
    }
}
