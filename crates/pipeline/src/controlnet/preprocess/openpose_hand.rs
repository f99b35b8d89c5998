//! The extension's OpenPose hand estimator (`annotator/openpose/hand.py`, `model.py`'s
//! `handpose_model`, util.py's `handDetect`):
//! - [`CpmNetwork`]: `handpose_model`, the same layout as face.py's `FaceNet`: VGG convs with
//!   ReLU and three 2x2 max pools up to `conv5_3_CPM` (the features), `conv6_1_CPM` (ReLU) and
//!   `conv6_2_CPM` (no ReLU), then five stages of seven convs reading the previous output and
//!   the features, each stage's last conv without ReLU. The file's keys are the bare layer
//!   names `util.transfer` maps (`conv1_1.weight`); the outputs' count (22 hand heatmaps, the
//!   last the background) comes from the file.
//! - [`hand_heatmaps`]: `Hand.__call__` up to `heatmap_avg`: the crop blurred (OpenCV,
//!   sigma 0.8), at each of `scale_search` resized to a square of `scale * 368` (`smart_resize`)
//!   and padded to 8, the outputs enlarged 8 times, cropped and resized to 128 x 128, a
//!   quarter of each (float32) summed in f64.
//! - [`hand_peaks`]: per part, scipy's `gaussian_filter` (sigma 3) over 0.05, the
//!   8-connected region (skimage's `label`) holding the largest sum of the unsmoothed map, its
//!   maximum (`npmax`: the first row holding the largest value, that row's first), scaled to
//!   the crop; `(0, 0)` where nothing is over the threshold.
//! - [`hand_boxes`]: `handDetect`'s squares from each arm's shoulder, elbow and wrist.

use std::path::Path;
use std::sync::Arc;

use candle_core::{Device, Tensor};

use super::gaussian::gaussian_blur_u8;
use super::networks::{lllyasviel, AnnotatorFile};
use super::openpose::{bgr_input, conv_layer, outputs_to_image, run, smart_resize_u8, Layer, Maps};
use super::openpose_body::{gaussian_filter, numpy_sum};
use crate::pipeline::RgbImage;
use crate::Result;

/// The file the extension loads the hand network from (`annotator/downloads/openpose/`).
pub const HAND_POSE_FILE: &str = "hand_pose_model.pth";

/// [`CpmNetwork`]'s hand weights.
pub static HAND_POSE: AnnotatorFile = AnnotatorFile {
    name: HAND_POSE_FILE,
    subfolder: "openpose",
    hub: lllyasviel(HAND_POSE_FILE),
    load: |path| Ok(Arc::new(HandNetwork(CpmNetwork::load(path, &Device::Cpu)?))),
};

/// The hand estimator's network (the type the hand file loads as).
#[derive(Debug)]
pub struct HandNetwork(pub CpmNetwork);

/// `Hand.__call__`'s constants: `scale_search`, `boxsize`, the heatmaps' side `wsize`, the
/// peak threshold `thre`, and the blur's sigma.
const SCALE_SEARCH: [f64; 4] = [0.5, 1.0, 1.5, 2.0];
const BOXSIZE: f64 = 368.0;
const WSIZE: usize = 128;
const THRE: f64 = 0.05;
const BLUR_SIGMA: f64 = 0.8;
/// The hand's 21 keypoints (the 22nd heatmap is the background).
pub const HAND_PARTS: usize = 21;

/// The VGG features' layers (name; `pool` for the 2x2 max pools), in order.
const FEATURES: [&str; 18] = [
    "conv1_1",
    "conv1_2",
    "pool",
    "conv2_1",
    "conv2_2",
    "pool",
    "conv3_1",
    "conv3_2",
    "conv3_3",
    "conv3_4",
    "pool",
    "conv4_1",
    "conv4_2",
    "conv4_3",
    "conv4_4",
    "conv5_1",
    "conv5_2",
    "conv5_3_CPM",
];

/// `handpose_model` (and `FaceNet`) with its weights, in f32.
pub struct CpmNetwork {
    features: Vec<Layer>,
    /// Stage 1's head, then stages 2..=6.
    stages: Vec<Vec<Layer>>,
    device: Device,
}

impl std::fmt::Debug for CpmNetwork {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CpmNetwork")
            .field("stages", &self.stages.len())
            .finish()
    }
}

impl CpmNetwork {
    /// The network of a `.pth` (a torch pickle, read without running it) or a `.safetensors`
    /// file with the bare layer names, onto `device` in f32.
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let state = crate::upscaler::read_state(path)?;
        let conv = |name: &str, relu: bool| conv_layer(&state, path, name, relu, device);
        let mut features = Vec::new();
        for name in FEATURES {
            features.push(if name == "pool" {
                Layer::Pool
            } else {
                conv(name, true)?
            });
        }
        let mut stages = vec![vec![
            conv("conv6_1_CPM", true)?,
            conv("conv6_2_CPM", false)?,
        ]];
        for s in 2..=6 {
            let stage = (1..=7)
                .map(|i| conv(&format!("Mconv{i}_stage{s}"), i != 7))
                .collect::<Result<Vec<_>>>()?;
            stages.push(stage);
        }
        Ok(Self {
            features,
            stages,
            device: device.clone(),
        })
    }

    /// The last stage's heatmaps `[1, parts, h / 8, w / 8]` of an NCHW input.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let features = run(&self.features, &x.to_device(&self.device)?)?;
        let mut out = run(&self.stages[0], &features)?;
        for stage in &self.stages[1..] {
            out = run(stage, &Tensor::cat(&[&out, &features], 1)?)?;
        }
        Ok(out)
    }
}

/// A hand's or a face's keypoints, normalized (float32, as the extension keeps them).
pub type Keypoints = Vec<(f32, f32)>;

/// A network's outputs for an input: the real one or, in tests, crafted ones.
pub type Outputs<'a> = &'a dyn Fn(&Tensor) -> Result<Tensor>;

/// The network's inputs for a crop, one per `scale_search`, with their unpadded sizes: the
/// crop blurred, resized to a square of `scale * 368` and padded to 8.
pub fn hand_inputs(crop: &RgbImage) -> Result<Vec<(Tensor, usize, usize)>> {
    let (w0, h0) = (crop.width as usize, crop.height as usize);
    let blurred = RgbImage {
        pixels: gaussian_blur_u8(&crop.pixels, w0, h0, BLUR_SIGMA),
        ..crop.clone()
    };
    SCALE_SEARCH
        .iter()
        .map(|s| {
            let side = (s * BOXSIZE) as usize;
            bgr_input(&smart_resize_u8(&blurred, side, side))
        })
        .collect()
}

/// `Hand.__call__` up to `heatmap_avg`: the heatmaps (channel-major, 128 x 128 each) of a
/// crop (RGB; the extension's BGR order is taken when feeding the network).
pub fn hand_heatmaps(net: Outputs, crop: &RgbImage) -> Result<Vec<f64>> {
    let mut avg: Vec<f64> = Vec::new();
    for (input, w, h) in hand_inputs(crop)? {
        let out = net(&input)?;
        let (_, c, oh, ow) = out.dims4()?;
        let maps = Maps {
            width: ow,
            height: oh,
            data: out
                .to_dtype(candle_core::DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?,
        };
        let resized = outputs_to_image(&maps, w, h, WSIZE, WSIZE);
        if avg.is_empty() {
            avg = vec![0.0; c * WSIZE * WSIZE];
        }
        // `heatmap / len(multiplier)` in float32, added to the f64 average.
        for (a, v) in avg.iter_mut().zip(&resized.data) {
            *a += f64::from(v / SCALE_SEARCH.len() as f32);
        }
    }
    Ok(avg)
}

/// numpy's `sum` of a 1-D f64 array: pairwise, blocks of up to 128 summed eight ways.
fn pairwise_sum(a: &[f64]) -> f64 {
    if a.len() <= 128 {
        return numpy_sum(a);
    }
    let half = a.len() / 2;
    let half = half - half % 8;
    pairwise_sum(&a[..half]) + pairwise_sum(&a[half..])
}

/// 8-connected regions of `mask` (`w` x `h`), numbered from 1 in the raster order of their
/// first pixels (skimage's `label(connectivity=2)`); 0 off the mask.
fn label8(mask: &[bool], w: usize, h: usize) -> (Vec<usize>, usize) {
    let mut labels = vec![0usize; w * h];
    let mut count = 0;
    let mut stack = Vec::new();
    for start in 0..w * h {
        if !mask[start] || labels[start] != 0 {
            continue;
        }
        count += 1;
        labels[start] = count;
        stack.push(start);
        while let Some(i) = stack.pop() {
            let (x, y) = ((i % w) as i64, (i / w) as i64);
            for dy in -1..=1 {
                for dx in -1..=1 {
                    let (nx, ny) = (x + dx, y + dy);
                    if nx < 0 || ny < 0 || nx >= w as i64 || ny >= h as i64 {
                        continue;
                    }
                    let j = ny as usize * w + nx as usize;
                    if mask[j] && labels[j] == 0 {
                        labels[j] = count;
                        stack.push(j);
                    }
                }
            }
        }
    }
    (labels, count)
}

/// The first index of the largest value (numpy's `argmax`).
fn argmax(values: impl Iterator<Item = f64>) -> usize {
    let mut best = (0, f64::NEG_INFINITY);
    for (i, v) in values.enumerate() {
        if v > best.1 {
            best = (i, v);
        }
    }
    best.0
}

/// `Hand.__call__`'s peaks from `heatmap_avg`: each of the 21 parts' `(x, y)` in a crop of
/// `crop_w` x `crop_h`, `(0, 0)` where none is over the threshold.
pub fn hand_peaks(avg: &[f64], crop_w: usize, crop_h: usize) -> Vec<(i64, i64)> {
    let n = WSIZE * WSIZE;
    (0..HAND_PARTS)
        .map(|part| {
            let mut map = avg[part * n..(part + 1) * n].to_vec();
            let smooth = gaussian_filter(&map, WSIZE, WSIZE, 3.0);
            let mask: Vec<bool> = smooth.iter().map(|&v| v > THRE).collect();
            if !mask.iter().any(|&b| b) {
                return (0, 0);
            }
            let (labels, count) = label8(&mask, WSIZE, WSIZE);
            let sums = (1..=count).map(|l| {
                let values: Vec<f64> = (0..n).filter(|&i| labels[i] == l).map(|i| map[i]).collect();
                pairwise_sum(&values)
            });
            let keep = argmax(sums) + 1;
            for (v, &l) in map.iter_mut().zip(&labels) {
                if l != keep {
                    *v = 0.0;
                }
            }
            // `npmax`: each row's largest, then the first row holding the largest of those.
            let rows: Vec<&[f64]> = map.chunks(WSIZE).collect();
            let y = argmax(
                rows.iter()
                    .map(|r| r.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v))),
            );
            let x = argmax(rows[y].iter().copied());
            let scale = |v: usize, side: usize| (v as f64 * side as f64 / WSIZE as f64) as i64;
            (scale(x, crop_w), scale(y, crop_h))
        })
        .collect()
}

/// A hand's square in the image: top-left corner, side, and whether it is the left hand.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HandBox {
    pub x: usize,
    pub y: usize,
    pub side: usize,
    pub left: bool,
}

/// `handDetect`: for each arm (left first) whose shoulder, elbow and wrist were found (body
/// keypoints in pixels), a square centred a third of the forearm past the wrist, 1.5 times
/// the longer of the forearm and 0.9 upper arms, clipped to the image; kept from 20 pixels.
pub fn hand_boxes(keypoints: &[Option<(f64, f64)>], width: usize, height: usize) -> Vec<HandBox> {
    const RATIO_WRIST_ELBOW: f64 = 0.33;
    let mut boxes = Vec::new();
    // Left: shoulder 5, elbow 6, wrist 7; right: 2, 3, 4.
    for (left, [s, e, w]) in [(true, [5, 6, 7]), (false, [2, 3, 4])] {
        let (Some((x1, y1)), Some((x2, y2)), Some((x3, y3))) =
            (keypoints[s], keypoints[e], keypoints[w])
        else {
            continue;
        };
        let mut x = x3 + RATIO_WRIST_ELBOW * (x3 - x2);
        let mut y = y3 + RATIO_WRIST_ELBOW * (y3 - y2);
        let wrist_elbow = ((x3 - x2).powi(2) + (y3 - y2).powi(2)).sqrt();
        let elbow_shoulder = ((x2 - x1).powi(2) + (y2 - y1).powi(2)).sqrt();
        let mut side = 1.5 * wrist_elbow.max(0.9 * elbow_shoulder);
        x -= side / 2.0;
        y -= side / 2.0;
        x = x.max(0.0);
        y = y.max(0.0);
        let (mut side1, mut side2) = (side, side);
        if x + side > width as f64 {
            side1 = width as f64 - x;
        }
        if y + side > height as f64 {
            side2 = height as f64 - y;
        }
        side = side1.min(side2);
        if side >= 20.0 {
            boxes.push(HandBox {
                x: x as usize,
                y: y as usize,
                side: side as usize,
                left,
            });
        }
    }
    boxes
}

/// The `w` x `h` part of `image` from `(x, y)`, cut at its edges as numpy's slicing cuts.
pub fn crop(image: &RgbImage, x: usize, y: usize, w: usize, h: usize) -> RgbImage {
    let (iw, ih) = (image.width as usize, image.height as usize);
    let (x1, y1) = ((x + w).min(iw), (y + h).min(ih));
    let (x, y) = (x.min(x1), y.min(y1));
    let mut pixels = Vec::with_capacity((x1 - x) * (y1 - y) * 3);
    for row in y..y1 {
        pixels.extend_from_slice(&image.pixels[(row * iw + x) * 3..(row * iw + x1) * 3]);
    }
    RgbImage {
        width: (x1 - x) as u32,
        height: (y1 - y) as u32,
        pixels,
    }
}

/// A found point `p` of a crop at `offset` in an image of side `size`, as `detect_hands` and
/// `detect_face` store it in float32: `-1` where `p` is 0 (not found), else `p + offset`,
/// over `size`.
pub fn normalized(p: i64, offset: usize, size: usize) -> f32 {
    let v = if (p as f32) < 1e-6 {
        -1.0
    } else {
        p as f32 + offset as f32
    };
    v / size as f32
}

/// `detect_hands`: each found hand's 21 keypoints (normalized f32, `-1 / size` where not
/// found) for one body, (left, right).
pub fn detect_hands(
    net: Outputs,
    image: &RgbImage,
    body: &[Option<(f64, f64)>],
) -> Result<(Option<Keypoints>, Option<Keypoints>)> {
    let (w, h) = (image.width as usize, image.height as usize);
    let (mut left, mut right) = (None, None);
    for b in hand_boxes(body, w, h) {
        let part = crop(image, b.x, b.y, b.side, b.side);
        let avg = hand_heatmaps(net, &part)?;
        let peaks = hand_peaks(&avg, part.width as usize, part.height as usize);
        let points = peaks
            .iter()
            .map(|&(px, py)| (normalized(px, b.x, w), normalized(py, b.y, h)))
            .collect();
        if b.left {
            left = Some(points);
        } else {
            right = Some(points);
        }
    }
    Ok((left, right))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// skimage's `label(connectivity=2)` joins diagonal neighbours; regions are numbered by
    /// their first pixel in raster order.
    #[test]
    fn regions_are_8_connected_and_numbered_in_raster_order() {
        let mask: Vec<bool> = [
            0, 0, 0, 1, //
            1, 0, 1, 0, //
            0, 1, 0, 0, //
            0, 0, 0, 1, //
        ]
        .iter()
        .map(|&v| v == 1)
        .collect();
        let (labels, count) = label8(&mask, 4, 4);
        // The diagonal chain from the top right reaches the left edge: one region.
        assert_eq!(count, 2);
        assert_eq!(
            labels,
            [0, 0, 0, 1, 1, 0, 1, 0, 0, 1, 0, 0, 0, 0, 0, 2].map(|v| v as usize)
        );
    }
}
