//! Face detection as A1111 asks facexlib 0.3.0 for it: `FaceRestoreHelper.get_face_landmarks_5(
//! only_center_face=False, resize=640, eye_dist_threshold=5)` on the picture as BGR, which runs
//! `RetinaFace.detect_faces(picture, 0.97)`:
//!
//! 1. the picture resized so that its short side is 640 (`scale = min(h, w) / 640`, each side
//!    `int(side / scale)`; `cv2.resize(..., interpolation=cv2.INTER_LANCZOS4)`, enlarging
//!    too; a picture already that size is copied);
//! 2. as float32 BGR less the mean (104, 117, 123), through the network ([`RetinaNet`]) at that
//!    size (`use_origin_size=True`: no further resize);
//! 3. the `PriorBox` anchors (per level: `min_sizes` [16, 32], [64, 128], [256, 512] at steps
//!    8, 16, 32; centres `(j + 0.5) * step / W`, sizes `min_size / W` and `/ H`, computed in
//!    float64 and stored float32), boxes and landmarks decoded with the variances (0.1, 0.2)
//!    in float32 and scaled to the resized picture's pixels;
//! 4. the anchors whose face score is above 0.97, by score (highest first), through
//!    torchvision's `nms` at IoU 0.4 (areas `(x2 - x1) * (y2 - y1)`, no +1; a box is dropped
//!    when its IoU with a kept one is above the threshold);
//! 5. every row times `scale` (back to the picture's pixels, in float64: the score too, in
//!    facexlib's `det_faces`; [`DetectedFace::score`] keeps the network's), and the faces
//!    whose eyes (landmarks 0 and 1) are less than 5 pixels apart dropped.

use std::path::Path;

use candle_core::{Device, Tensor};

use super::retinaface::{Outputs, RetinaNet};
use crate::controlnet::preprocess::resize_lanczos4_u8;
use crate::pipeline::RgbImage;
use crate::{PipelineError, Result};

/// facexlib's `cfg_re50['min_sizes']`: each level's anchor sizes.
pub const MIN_SIZES: [[f64; 2]; 3] = [[16.0, 32.0], [64.0, 128.0], [256.0, 512.0]];
/// `cfg_re50['steps']`.
pub const STEPS: [usize; 3] = [8, 16, 32];
/// `cfg_re50['variance']`.
pub const VARIANCE: [f32; 2] = [0.1, 0.2];
/// The BGR mean `detect_faces` subtracts.
pub const MEAN_BGR: [f32; 3] = [104.0, 117.0, 123.0];
/// `get_face_landmarks_5` calls `detect_faces(input_img, 0.97)`.
pub const CONFIDENCE: f32 = 0.97;
/// `detect_faces`' `nms_threshold` default.
pub const NMS_IOU: f64 = 0.4;
/// A1111's `resize=640`: the short side the detector sees.
pub const DETECT_SIDE: f64 = 640.0;
/// A1111's `eye_dist_threshold=5`.
pub const EYE_DIST: f64 = 5.0;

/// One face as facexlib keeps it, in the original picture's pixels.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DetectedFace {
    /// `x1, y1, x2, y2`.
    pub bbox: [f32; 4],
    /// The network's face score (facexlib's `det_faces` row holds it times the resize scale).
    pub score: f32,
    /// Left eye, right eye, nose, left and right mouth corners (facexlib's order), `[x, y]`.
    pub landmarks: [[f32; 2]; 5],
}

/// One row of `detect_faces(...) * scale` (float64 as facexlib has it), before the eye
/// distance filter: box, score times the scale, landmarks.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Detection {
    pub row: [f64; 15],
    /// The network's score, before the scaling.
    pub score: f32,
}

impl Detection {
    /// The distance between the eyes (`np.linalg.norm([b5 - b7, b6 - b8])`).
    pub fn eye_distance(&self) -> f64 {
        let r = &self.row;
        (r[5] - r[7]).hypot(r[6] - r[8])
    }

    pub fn face(&self) -> DetectedFace {
        let r = &self.row;
        let mut landmarks = [[0f32; 2]; 5];
        for (i, l) in landmarks.iter_mut().enumerate() {
            *l = [r[5 + 2 * i] as f32, r[6 + 2 * i] as f32];
        }
        DetectedFace {
            bbox: [r[0] as f32, r[1] as f32, r[2] as f32, r[3] as f32],
            score: self.score,
            landmarks,
        }
    }
}

/// `PriorBox(cfg, image_size=(h, w)).forward()`: `[cx, cy, w, h]` per anchor, relative to
/// the picture, in facexlib's order (level, row, column, size).
pub fn priors(h: usize, w: usize) -> Vec<[f32; 4]> {
    let mut out = Vec::new();
    for (sizes, &step) in MIN_SIZES.iter().zip(&STEPS) {
        let (fh, fw) = (h.div_ceil(step), w.div_ceil(step));
        for i in 0..fh {
            for j in 0..fw {
                for &s in sizes {
                    let cx = (j as f64 + 0.5) * step as f64 / w as f64;
                    let cy = (i as f64 + 0.5) * step as f64 / h as f64;
                    out.push([
                        cx as f32,
                        cy as f32,
                        (s / w as f64) as f32,
                        (s / h as f64) as f32,
                    ]);
                }
            }
        }
    }
    out
}

/// `decode`: a box `[x1, y1, x2, y2]` from its anchor and regression, in float32 in torch's
/// order (`prior_c + loc * v0 * prior_s`, `prior_s * exp(loc * v1)`, then the corners).
pub fn decode_box(loc: &[f32], p: &[f32; 4]) -> [f32; 4] {
    let cx = p[0] + loc[0] * VARIANCE[0] * p[2];
    let cy = p[1] + loc[1] * VARIANCE[0] * p[3];
    let w = p[2] * (loc[2] * VARIANCE[1]).exp();
    let h = p[3] * (loc[3] * VARIANCE[1]).exp();
    let (x1, y1) = (cx - w / 2.0, cy - h / 2.0);
    [x1, y1, w + x1, h + y1]
}

/// `decode_landm`: five points `prior_c + pre * v0 * prior_s`.
pub fn decode_landmarks(pre: &[f32], p: &[f32; 4]) -> [f32; 10] {
    let mut out = [0f32; 10];
    for k in 0..5 {
        out[2 * k] = p[0] + pre[2 * k] * VARIANCE[0] * p[2];
        out[2 * k + 1] = p[1] + pre[2 * k + 1] * VARIANCE[0] * p[3];
    }
    out
}

/// torchvision's `nms` (CPU kernel): `boxes` already by score, highest first (ties keep
/// their order, its stable sort); the indices kept, in that order.
pub fn nms(boxes: &[[f32; 4]], iou_threshold: f64) -> Vec<usize> {
    let area = |b: &[f32; 4]| (b[2] - b[0]) * (b[3] - b[1]);
    let mut suppressed = vec![false; boxes.len()];
    let mut keep = Vec::new();
    for i in 0..boxes.len() {
        if suppressed[i] {
            continue;
        }
        keep.push(i);
        let a = &boxes[i];
        let ia = area(a);
        for j in i + 1..boxes.len() {
            if suppressed[j] {
                continue;
            }
            let b = &boxes[j];
            let w = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
            let h = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
            let inter = w * h;
            let iou = inter / (ia + area(b) - inter);
            if f64::from(iou) > iou_threshold {
                suppressed[j] = true;
            }
        }
    }
    keep
}

/// `get_face_landmarks_5(resize=640)`'s size: `(width, height)` and the scale back.
pub fn detect_size(width: u32, height: u32) -> (usize, usize, f64) {
    let scale = f64::from(width.min(height)) / DETECT_SIDE;
    let w = (f64::from(width) / scale) as usize;
    let h = (f64::from(height) / scale) as usize;
    (w, h, scale)
}

/// facexlib's RetinaFace detector (`retinaface_resnet50`) as A1111's face restoration runs it.
#[derive(Debug)]
pub struct RetinaFace {
    pub net: RetinaNet,
}

impl RetinaFace {
    /// `detection_Resnet50_Final.pth` (or a safetensors copy), f32 on `device`.
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        Ok(Self {
            net: RetinaNet::load(path, device)?,
        })
    }

    /// The network's raw outputs on `image` (RGB) at the detector's size, and that size's
    /// `(width, height, scale)`.
    pub fn outputs(&self, image: &RgbImage) -> Result<(Outputs, (usize, usize, f64))> {
        let (w, h, scale) = detect_size(image.width, image.height);
        if w == 0 || h == 0 {
            return Err(PipelineError::InvalidRequest(format!(
                "a {}x{} picture is too small to look for faces in",
                image.width, image.height
            )));
        }
        let small = resize_lanczos4_u8(image, w, h);
        let mut v = vec![0f32; 3 * w * h];
        for (i, px) in small.pixels.chunks_exact(3).enumerate() {
            // BGR: channel 0 is the picture's blue.
            for c in 0..3 {
                v[c * w * h + i] = f32::from(px[2 - c]) - MEAN_BGR[c];
            }
        }
        let x = Tensor::from_vec(v, (1, 3, h, w), self.net.device())?;
        Ok((self.net.forward(&x)?, (w, h, scale)))
    }

    /// `detect_faces(resized, 0.97) * scale`: every row NMS keeps, before the eye filter.
    pub fn detections(&self, image: &RgbImage) -> Result<Vec<Detection>> {
        let (out, (w, h, scale)) = self.outputs(image)?;
        let priors = priors(h, w);
        let expected: Vec<(usize, usize, usize)> = STEPS
            .iter()
            .zip(&MIN_SIZES)
            .map(|(&s, m)| (h.div_ceil(s), w.div_ceil(s), m.len()))
            .collect();
        if out.maps != expected || out.conf.len() != 2 * priors.len() {
            return Err(PipelineError::InvalidRequest(format!(
                "RetinaFace's feature maps {:?} are not the anchors' {expected:?} on a {w}x{h} input",
                out.maps
            )));
        }
        let size = [w as f32, h as f32];
        let mut found: Vec<(f32, [f32; 4], [f32; 10])> = Vec::new();
        for (a, p) in priors.iter().enumerate() {
            let score = out.conf[2 * a + 1];
            if score <= CONFIDENCE {
                continue;
            }
            let b = decode_box(&out.loc[4 * a..][..4], p);
            let l = decode_landmarks(&out.landm[10 * a..][..10], p);
            found.push((
                score,
                std::array::from_fn(|k| b[k] * size[k % 2]),
                std::array::from_fn(|k| l[k] * size[k % 2]),
            ));
        }
        // numpy's argsort()[::-1]: highest first.
        found.sort_by(|a, b| b.0.total_cmp(&a.0));
        let boxes: Vec<[f32; 4]> = found.iter().map(|f| f.1).collect();
        Ok(nms(&boxes, NMS_IOU)
            .into_iter()
            .map(|i| {
                let (score, b, l) = &found[i];
                let mut row = [0f64; 15];
                for k in 0..4 {
                    row[k] = f64::from(b[k]) * scale;
                }
                row[4] = f64::from(*score) * scale;
                for k in 0..10 {
                    row[5 + k] = f64::from(l[k]) * scale;
                }
                Detection { row, score: *score }
            })
            .collect())
    }

    /// The faces `get_face_landmarks_5(only_center_face=False, resize=640,
    /// eye_dist_threshold=5)` keeps, in its order (by score).
    pub fn detect(&self, image: &RgbImage) -> Result<Vec<DetectedFace>> {
        Ok(self
            .detections(image)?
            .iter()
            .filter(|d| d.eye_distance() >= EYE_DIST)
            .map(Detection::face)
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn priors_follow_prior_box() {
        // 64x48: level 0 is 6x8 positions of 2 anchors, level 1 3x4, level 2 2x2.
        let p = priors(48, 64);
        assert_eq!(p.len(), 2 * (6 * 8 + 3 * 4 + 2 * 2));
        // The first: centre (0.5 * 8 / 64, 0.5 * 8 / 48), size 16 / 64 by 16 / 48.
        assert_eq!(p[0], [4.0 / 64.0, 4.0 / 48.0, 0.25, 16.0 / 48.0]);
        // Its twin is the 32-pixel anchor at the same place; then the next column.
        assert_eq!(p[1], [4.0 / 64.0, 4.0 / 48.0, 0.5, 32.0 / 48.0]);
        assert_eq!(p[2][0], 12.0 / 64.0);
        // The last level's last anchor: row 1, column 1 at step 32, size 512.
        let last = p[p.len() - 1];
        assert_eq!(
            last,
            [48.0 / 64.0, (48.0f64 / 48.0) as f32, 8.0, 512.0 / 48.0]
        );
        // A side that is not a multiple of the step gets ceil(side / step) positions.
        assert_eq!(priors(17, 9).len(), 2 * (3 * 2 + 2 + 1));
    }

    #[test]
    fn decoding_undoes_the_encoding() {
        let p = [0.5, 0.25, 0.1, 0.2];
        // No regression: the anchor's own box.
        let b = decode_box(&[0.0; 4], &p);
        assert!((b[0] - 0.45).abs() < 1e-7 && (b[3] - 0.35).abs() < 1e-7);
        // A log-size of 5 (times the variance 0.2) doubles... e^1 times the width.
        let b = decode_box(&[1.0, 0.0, 5.0, 0.0], &p);
        let w = 0.1 * 1f32.exp();
        assert!((b[2] - b[0] - w).abs() < 1e-6);
        assert!(((b[0] + b[2]) / 2.0 - (0.5 + 0.1 * 0.1)).abs() < 1e-6);
        let l = decode_landmarks(&[1.0, -1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 2.0], &p);
        assert!((l[0] - 0.51).abs() < 1e-7 && (l[1] - 0.23).abs() < 1e-7);
        assert!((l[9] - 0.29).abs() < 1e-7);
    }

    #[test]
    fn nms_drops_overlaps_above_the_threshold_only() {
        let a = [0.0, 0.0, 10.0, 10.0];
        // IoU with a: 50 / 100 (dropped), 25 / 175 (kept), 40 / 100: the float32 0.4 is
        // 0.4000000060 as a double, above torchvision's double threshold: dropped (as
        // torchvision.ops.nms drops it).
        let b = [0.0, 0.0, 10.0, 5.0];
        let c = [5.0, 5.0, 15.0, 15.0];
        let d = [0.0, 0.0, 10.0, 4.0];
        assert_eq!(nms(&[a, b, c, d], 0.4), vec![0, 2]);
        // A dropped box suppresses nothing: without a, b would drop d (40 / 50).
        assert_eq!(nms(&[b, d, c], 0.4), vec![0, 2]);
        assert_eq!(nms(&[a, c, [0.0, 0.0, 10.0, 3.0]], 0.35), vec![0, 1, 2]);
        // No +1 in the areas: touching boxes do not overlap.
        assert_eq!(nms(&[a, [10.0, 0.0, 20.0, 10.0]], 0.0), vec![0, 1]);
    }

    #[test]
    fn the_detector_sees_a_640_short_side() {
        // Shrunk, enlarged, kept; int() truncates.
        assert_eq!(detect_size(800, 660), (775, 640, 660.0 / 640.0));
        assert_eq!(detect_size(520, 400), (832, 640, 400.0 / 640.0));
        assert_eq!(detect_size(640, 720), (640, 720, 1.0));
    }
}
