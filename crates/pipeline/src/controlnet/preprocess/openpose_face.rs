//! The extension's OpenPose face estimator (`annotator/openpose/face.py`, util.py's
//! `faceDetect`): `FaceNet` is [`CpmNetwork`]'s layout with 71 outputs (70 landmarks and the
//! background); the crop is resized to 384 x 384 (`smart_resize`) and fed as the hands' are
//! (BGR, `v / 256 - 0.5`), the last stage's heatmaps resized to the crop bilinearly with
//! aligned corners (torch's `F.interpolate`, float32), and each of the 71 maps gives its
//! largest value over 0.05 (the first in raster order), a map with none giving no point.

use std::sync::Arc;

use candle_core::{DType, Device};

use super::networks::{lllyasviel, AnnotatorFile};
use super::openpose::{bgr_input, smart_resize_u8};
use super::openpose_hand::{crop, normalized, CpmNetwork, Outputs};
use crate::pipeline::RgbImage;
use crate::Result;

/// The file the extension loads the face network from (`annotator/downloads/openpose/`).
pub const FACENET_FILE: &str = "facenet.pth";

/// [`CpmNetwork`]'s face weights.
pub static FACENET: AnnotatorFile = AnnotatorFile {
    name: FACENET_FILE,
    subfolder: "openpose",
    hub: lllyasviel(FACENET_FILE),
    load: |path| Ok(Arc::new(FaceNetwork(CpmNetwork::load(path, &Device::Cpu)?))),
};

/// The face estimator's network (the type the face file loads as).
#[derive(Debug)]
pub struct FaceNetwork(pub CpmNetwork);

/// `Face.__call__`'s input side and `compute_peaks_from_heatmaps`' threshold.
const INPUT_SIDE: usize = 384;
const THRESHOLD: f32 = 0.05;

/// `faceDetect`: the square around the nose (keypoint 0) reaching 3 times its largest
/// offset (along x or y) to an eye, 1.5 times to an ear, as util.py clips it (its corner at
/// least 0; its side twice that reach, cut to the image only where the reach itself passes
/// the edge); kept from 20 pixels. `None` without the nose or any of the eyes and ears.
pub fn face_box(
    keypoints: &[Option<(f64, f64)>],
    width: usize,
    height: usize,
) -> Option<(usize, usize, usize)> {
    let (x0, y0) = keypoints[0]?;
    let mut reach: f64 = 0.0;
    let mut any = false;
    for (k, factor) in [(14, 3.0), (15, 3.0), (16, 1.5), (17, 1.5)] {
        if let Some((x1, y1)) = keypoints[k] {
            any = true;
            reach = reach.max((x0 - x1).abs().max((y0 - y1).abs()) * factor);
        }
    }
    if !any {
        return None;
    }
    let (x, y) = ((x0 - reach).max(0.0), (y0 - reach).max(0.0));
    let (mut side1, mut side2) = (reach * 2.0, reach * 2.0);
    if x + reach > width as f64 {
        side1 = width as f64 - x;
    }
    if y + reach > height as f64 {
        side2 = height as f64 - y;
    }
    let side = side1.min(side2);
    (side >= 20.0).then_some((x as usize, y as usize, side as usize))
}

/// `F.interpolate(maps, (h, w), mode='bilinear', align_corners=True)` of channel-major
/// f32 maps, each output the rows' blend of the columns' blends.
fn resize_bilinear_aligned(maps: &[f32], sw: usize, sh: usize, w: usize, h: usize) -> Vec<f32> {
    let axis = |src: usize, dst: usize| -> Vec<(usize, usize, f32, f32)> {
        let scale = if dst > 1 {
            (src - 1) as f32 / (dst - 1) as f32
        } else {
            0.0
        };
        (0..dst)
            .map(|i| {
                let real = scale * i as f32;
                let i0 = real as usize;
                let i1 = i0 + usize::from(i0 < src - 1);
                let l1 = (real - i0 as f32).clamp(0.0, 1.0);
                (i0, i1, 1.0 - l1, l1)
            })
            .collect()
    };
    let (xs, ys) = (axis(sw, w), axis(sh, h));
    let channels = maps.len() / (sw * sh);
    let mut out = Vec::with_capacity(channels * w * h);
    for c in 0..channels {
        let m = &maps[c * sw * sh..(c + 1) * sw * sh];
        for &(y0, y1, wy0, wy1) in &ys {
            for &(x0, x1, wx0, wx1) in &xs {
                let row = |y: usize| m[y * sw + x0] * wx0 + m[y * sw + x1] * wx1;
                out.push(row(y0) * wy0 + row(y1) * wy1);
            }
        }
    }
    out
}

/// `Face.__call__` and `compute_peaks_from_heatmaps` on a crop (RGB): each heatmap's peak
/// `(x, y)` in the crop, maps without one skipped.
pub fn face_peaks(net: Outputs, crop: &RgbImage) -> Result<Vec<(i64, i64)>> {
    let (w, h) = (crop.width as usize, crop.height as usize);
    let resized = smart_resize_u8(crop, INPUT_SIDE, INPUT_SIDE);
    let (input, _, _) = bgr_input(&resized)?;
    let out = net(&input)?;
    let (_, c, oh, ow) = out.dims4()?;
    let maps = out.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let heat = resize_bilinear_aligned(&maps, ow, oh, w, h);
    let mut peaks = Vec::new();
    for part in 0..c {
        let m = &heat[part * w * h..(part + 1) * w * h];
        let mut best: Option<(usize, f32)> = None;
        for (i, &v) in m.iter().enumerate() {
            if v > THRESHOLD && best.is_none_or(|(_, b)| v > b) {
                best = Some((i, v));
            }
        }
        if let Some((i, _)) = best {
            peaks.push(((i % w) as i64, (i / w) as i64));
        }
    }
    Ok(peaks)
}

/// `detect_face`: the face's keypoints (normalized f32, `-1 / size` where a peak lies on the
/// crop's first row or column) for one body, `None` without a face box or any peak.
pub fn detect_face(
    net: Outputs,
    image: &RgbImage,
    body: &[Option<(f64, f64)>],
) -> Result<Option<Vec<(f32, f32)>>> {
    let (w, h) = (image.width as usize, image.height as usize);
    let Some((x, y, side)) = face_box(body, w, h) else {
        return Ok(None);
    };
    let part = crop(image, x, y, side, side);
    let peaks = face_peaks(net, &part)?;
    if peaks.is_empty() {
        return Ok(None);
    }
    Ok(Some(
        peaks
            .iter()
            .map(|&(px, py)| (normalized(px, x, w), normalized(py, y, h)))
            .collect(),
    ))
}
