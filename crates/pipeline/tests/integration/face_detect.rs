//! Face detection and alignment (`sdserve_pipeline::face_restore::{detect, align, warp}`)
//! against facexlib 0.3.0's `FaceRestoreHelper` as A1111 runs it
//! (`tools/make_face_detect_fixtures.py`: a random narrowed RetinaFace ResNet-50, three
//! pictures whose short side is above, below and at 640): the network's outputs, the
//! detections before and after the eye-distance filter, the affine matrices
//! (`cv2.estimateAffinePartial2D(..., LMEDS)`) and the 512x512 crops (`cv2.warpAffine`).

use std::collections::HashMap;
use std::sync::OnceLock;

use crate::common;

use candle_core::{DType, Device, Tensor};
use common::{fixture_path, read_png};
use sdserve_pipeline::face_restore::align::warp_face;
use sdserve_pipeline::face_restore::align::{align_face, detect_and_align, FACE_SIZE};
use sdserve_pipeline::face_restore::detect::{Detection, RetinaFace};
use sdserve_pipeline::pipeline::RgbImage;
use serde_json::Value;

/// Largest difference of the network's raw outputs at the top anchors from torch's (box and
/// landmark regressions of std ~1-5, softmaxed scores; measured 2.8e-5).
const RAW_TOLERANCE: f32 = 2e-4;
/// Largest difference of a decoded box or landmark, in the picture's pixels (measured 7.2e-4).
const PIXEL_TOLERANCE: f64 = 5e-3;
/// Largest difference of an affine matrix entry computed from the reference's landmarks,
/// relative to the entry (or absolute below 1; measured 1.9e-10).
const AFFINE_TOLERANCE: f64 = 1e-9;

fn meta() -> Value {
    let text = std::fs::read_to_string(fixture_path("face_detect").join("face_detect.json"));
    serde_json::from_str(&text.unwrap()).unwrap()
}

fn reference() -> &'static HashMap<String, Tensor> {
    static REF: OnceLock<HashMap<String, Tensor>> = OnceLock::new();
    REF.get_or_init(|| {
        candle_core::safetensors::load(
            fixture_path("face_detect").join("face_detect.safetensors"),
            &Device::Cpu,
        )
        .unwrap()
    })
}

fn model() -> &'static RetinaFace {
    static MODEL: OnceLock<RetinaFace> = OnceLock::new();
    MODEL.get_or_init(|| {
        RetinaFace::load(
            &fixture_path("face_detect").join("retinaface.pth"),
            &Device::Cpu,
        )
        .unwrap()
    })
}

fn names() -> Vec<String> {
    meta()["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap().to_string())
        .collect()
}

fn picture(name: &str) -> RgbImage {
    read_png(&format!("../face_detect/{name}.png"))
}

fn rows(key: &str) -> Vec<Vec<f64>> {
    let t = &reference()[key];
    let n = t.dim(0).unwrap();
    let flat = t.flatten_all().unwrap().to_dtype(DType::F64).unwrap();
    let v = flat.to_vec1::<f64>().unwrap();
    if n == 0 {
        return Vec::new();
    }
    v.chunks(v.len() / n).map(<[f64]>::to_vec).collect()
}

/// Our detections per picture, computed once.
fn detections() -> &'static HashMap<String, Vec<Detection>> {
    static DET: OnceLock<HashMap<String, Vec<Detection>>> = OnceLock::new();
    DET.get_or_init(|| {
        names()
            .into_iter()
            .map(|n| {
                let d = model().detections(&picture(&n)).unwrap();
                (n, d)
            })
            .collect()
    })
}

#[test]
fn the_loader_reads_the_narrowed_widths() {
    let net = &model().net;
    assert_eq!(
        net.out_channel as u64,
        meta()["out_channel"].as_u64().unwrap()
    );
    // torchvision's ResNet-50 block counts, read from the names; facexlib's ReLU above 64.
    assert_eq!(net.blocks, vec![3, 4, 6, 3]);
    assert_eq!(net.slope, 0.0);
}

#[test]
fn the_network_matches_torch_at_the_top_anchors() {
    let mut worst = 0f32;
    for name in names() {
        let (out, _) = model().outputs(&picture(&name)).unwrap();
        let index: Vec<i64> = reference()[&format!("{name}.raw.index")]
            .to_vec1::<i64>()
            .unwrap();
        for (key, per, ours) in [
            ("loc", 4, &out.loc),
            ("conf", 2, &out.conf),
            ("landm", 10, &out.landm),
        ] {
            let want = reference()[&format!("{name}.raw.{key}")]
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            for (k, &a) in index.iter().enumerate() {
                for c in 0..per {
                    let d = (ours[a as usize * per + c] - want[k * per + c]).abs();
                    worst = worst.max(d);
                    assert!(
                        d < RAW_TOLERANCE,
                        "{name} {key} anchor {a}[{c}]: off by {d}"
                    );
                }
            }
        }
    }
    eprintln!("raw outputs: max abs diff {worst}");
}

#[test]
fn detections_are_facexlibs() {
    let mut worst = 0f64;
    for name in names() {
        let want = rows(&format!("{name}.detections"));
        let ours = &detections()[&name];
        assert_eq!(ours.len(), want.len(), "{name}: detections after NMS");
        for (d, w) in ours.iter().zip(&want) {
            for (k, (ours, want)) in d.row.iter().zip(w).enumerate() {
                let diff = (ours - want).abs();
                if k != 4 {
                    worst = worst.max(diff);
                }
                let tol = if k == 4 { 1e-4 } else { PIXEL_TOLERANCE };
                assert!(diff < tol, "{name} row {k}: {ours} vs {want}");
            }
        }
    }
    eprintln!("detections: max abs diff {worst} px");
}

#[test]
fn the_eye_distance_filter_keeps_facexlibs_faces() {
    let mut dropped = 0;
    for name in names() {
        let want = rows(&format!("{name}.det_faces"));
        let marks = rows(&format!("{name}.landmarks"));
        let faces = model().detect(&picture(&name)).unwrap();
        assert_eq!(faces.len(), want.len(), "{name}: faces kept");
        dropped += detections()[&name].len() - faces.len();
        for ((f, w), l) in faces.iter().zip(&want).zip(&marks) {
            for (ours, want) in f.bbox.iter().zip(w) {
                assert!((f64::from(*ours) - want).abs() < PIXEL_TOLERANCE);
            }
            // facexlib's det_faces holds the score times the resize scale.
            let scale = w[4] / f64::from(f.score);
            assert!(scale > 0.5 && scale < 1.1, "{name}: score scale {scale}");
            for p in 0..5 {
                for c in 0..2 {
                    let d = (f64::from(f.landmarks[p][c]) - l[2 * p + c]).abs();
                    assert!(d < PIXEL_TOLERANCE, "{name} landmark {p}: off by {d}");
                }
            }
        }
    }
    // The fixture has faces the filter drops.
    assert!(dropped > 0);
}

fn landmarks_of(row: &[f64]) -> [[f32; 2]; 5] {
    std::array::from_fn(|p| [row[2 * p] as f32, row[2 * p + 1] as f32])
}

#[test]
fn affine_matrices_are_opencvs() {
    let mut worst = 0f64;
    for name in names() {
        let marks = rows(&format!("{name}.landmarks"));
        let want = rows(&format!("{name}.affine"));
        assert_eq!(marks.len(), want.len());
        for (l, w) in marks.iter().zip(&want) {
            let m = align_face(&landmarks_of(l));
            for r in 0..2 {
                for k in 0..3 {
                    let d = (m[r][k] - w[3 * r + k]).abs() / w[3 * r + k].abs().max(1.0);
                    worst = worst.max(d);
                    assert!(d < AFFINE_TOLERANCE, "{name}: {m:?} vs {w:?}");
                }
            }
        }
    }
    eprintln!("affine: max relative diff {worst:e}");
}

/// Bytes differing by more than one level, and the share differing at all.
fn compare(a: &RgbImage, b: &RgbImage) -> (usize, f64) {
    assert_eq!((a.width, a.height), (b.width, b.height));
    let over = a
        .pixels
        .iter()
        .zip(&b.pixels)
        .filter(|(x, y)| x.abs_diff(**y) > 1)
        .count();
    let differ = a
        .pixels
        .iter()
        .zip(&b.pixels)
        .filter(|(x, y)| x != y)
        .count();
    (over, differ as f64 / a.pixels.len() as f64)
}

#[test]
fn crops_are_opencvs_warp() {
    let mut share = 0f64;
    for name in names() {
        let image = picture(&name);
        let want = rows(&format!("{name}.affine"));
        for (i, w) in want.iter().enumerate() {
            let m = [[w[0], w[1], w[2]], [w[3], w[4], w[5]]];
            let crop = warp_face(&image, &m, FACE_SIZE);
            let reference = read_png(&format!("../face_detect/{name}.crop{i}.png"));
            let (over, differ) = compare(&crop, &reference);
            assert_eq!(over, 0, "{name} crop {i}: bytes off by more than 1");
            share = share.max(differ);
        }
    }
    // Measured: every byte equal.
    eprintln!("warp: at most {:.4}% of bytes differ (by 1)", share * 100.0);
    assert!(share < 1e-4, "{share}");
}

#[test]
fn detect_and_align_end_to_end() {
    let mut share = 0f64;
    for name in names() {
        let image = picture(&name);
        let aligned = detect_and_align(model(), &image).unwrap();
        let want = rows(&format!("{name}.affine"));
        assert_eq!(aligned.len(), want.len());
        for (i, a) in aligned.iter().enumerate() {
            let reference = read_png(&format!("../face_detect/{name}.crop{i}.png"));
            let (over, differ) = compare(&a.crop, &reference);
            share = share.max(differ);
            assert!(
                over * 1000 < a.crop.pixels.len(),
                "{name} crop {i}: {over} bytes off by more than 1"
            );
        }
    }
    // Our landmarks differ from torch's by < 1e-3 px, which moves a few crop bytes (measured:
    // 0.19% at most, none by more than 1).
    eprintln!(
        "end to end: at most {:.4}% of crop bytes differ",
        share * 100.0
    );
    assert!(share < 0.01, "{share}");
}
