//! The extension's HED modules (`annotator/hed/__init__.py`, the legacy `hed`, `hed_safe` and
//! `scribble_hed` of `scripts/preprocessor/legacy/processor.py`):
//! - [`HedNetwork`]: `ControlNetHED_Apache2`, five blocks of 3x3 convs with ReLU (2, 2, 3, 3,
//!   3 of them; each block after the first starts with a 2x2 max pool), each block's 1x1
//!   `projection` to one channel; the input is the RGB image in 0..=255 minus `norm`. The
//!   widths (64, 128, 256, 512, 512 in `ControlNetHED.pth`) are read from the weights' shapes.
//! - [`hed_edges`] (`apply_hed` on the padded image): each projection resized to the image's
//!   size with OpenCV's `INTER_LINEAR` in f32, their mean (f32), the sigmoid in f64; with
//!   `safe`, `safe_step` (`int(x * 3) / 2` in f32); times 255, clipped, truncated to u8.
//! - [`scribble_hed`]: the cropped map through `nms(map, 127, 3.0)` (a float Gaussian blur
//!   with σ 3, kept where it is the maximum of its horizontal, vertical or either diagonal
//!   3-neighbourhood, white above 127), then an 8-bit Gaussian blur with σ 3, white above 4.

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Module, Tensor};

use super::gaussian::{gaussian_blur_f32, gaussian_blur_u8};
use super::networks::{lllyasviel, AnnotatorFile};
use crate::kernels::Conv2d;
use crate::pipeline::RgbImage;
use crate::{PipelineError, Result};

/// The file the extension loads the network from (`annotator/downloads/hed/`).
pub const HED_FILE: &str = "ControlNetHED.pth";

/// [`HedNetwork`]'s weights file, for an [`AnnotatorNetworks`](super::AnnotatorNetworks).
pub static HED: AnnotatorFile = AnnotatorFile {
    name: HED_FILE,
    subfolder: "hed",
    hub: lllyasviel(HED_FILE),
    load: |path| Ok(Arc::new(HedNetwork::load(path, &Device::Cpu)?)),
};

/// Convs in each of the five blocks.
const BLOCK_CONVS: [usize; 5] = [2, 2, 3, 3, 3];

/// `DoubleConvBlock`: 3x3 convs (padding 1) each followed by ReLU, and the 1x1 projection.
struct Block {
    convs: Vec<Conv2d>,
    projection: Conv2d,
}

/// `ControlNetHED_Apache2` with its weights, on one device in f32.
pub struct HedNetwork {
    /// `[1, 3, 1, 1]`: subtracted from the 0..=255 input.
    norm: Tensor,
    blocks: Vec<Block>,
}

impl std::fmt::Debug for HedNetwork {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HedNetwork")
            .field("widths", &self.widths())
            .finish()
    }
}

impl HedNetwork {
    /// The network of a `ControlNetHED.pth` (a torch pickle, read without running it) or a
    /// `.safetensors` file of the same names, onto `device` in f32.
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let state = crate::upscaler::read_state(path)?;
        let bad = |message: String| PipelineError::Weights {
            path: path.to_path_buf(),
            message,
        };
        let get = |key: &str| -> Result<Tensor> {
            let t = state
                .get(key)
                .ok_or_else(|| bad(format!("{key} is missing (not a ControlNetHED network)")))?;
            Ok(t.to_dtype(DType::F32)?.to_device(device)?)
        };
        let norm = get("norm")?;
        if norm.dims() != [1, 3, 1, 1] {
            return Err(bad(format!(
                "norm has shape {:?}, not [1, 3, 1, 1]",
                norm.dims()
            )));
        }
        let mut blocks = Vec::with_capacity(BLOCK_CONVS.len());
        let mut channels = 3;
        for (b, &n) in BLOCK_CONVS.iter().enumerate() {
            let mut convs = Vec::with_capacity(n);
            for i in 0..n {
                let key = format!("block{}.convs.{i}", b + 1);
                let weight = get(&format!("{key}.weight"))?;
                let bias = get(&format!("{key}.bias"))?;
                let out = match *weight.dims() {
                    [out, c, 3, 3] if c == channels && bias.dims() == [out] => out,
                    ref d => {
                        return Err(bad(format!(
                            "{key}.weight has shape {d:?} (bias {:?}); the block needs a 3x3 conv from {channels} channels",
                            bias.dims()
                        )))
                    }
                };
                convs.push(Conv2d::new(weight, Some(bias), 1, 1));
                channels = out;
            }
            let key = format!("block{}.projection", b + 1);
            let weight = get(&format!("{key}.weight"))?;
            let bias = get(&format!("{key}.bias"))?;
            if weight.dims() != [1, channels, 1, 1] || bias.dims() != [1] {
                return Err(bad(format!(
                    "{key}.weight has shape {:?}; the block needs [1, {channels}, 1, 1]",
                    weight.dims()
                )));
            }
            blocks.push(Block {
                convs,
                projection: Conv2d::new(weight, Some(bias), 1, 0),
            });
        }
        Ok(Self { norm, blocks })
    }

    /// The blocks' widths (64, 128, 256, 512, 512 for the extension's file).
    pub fn widths(&self) -> Vec<usize> {
        self.blocks
            .iter()
            .map(|b| b.projection.weight().dims()[1])
            .collect()
    }

    fn device(&self) -> &Device {
        self.norm.device()
    }

    /// The five projections of `image` (its sides multiples of 16, as the padded image's
    /// are), each `(width, height, values)`, the first at the image's size, each next at half.
    pub fn projections(&self, image: &RgbImage) -> Result<Vec<(usize, usize, Vec<f32>)>> {
        let (w, h) = (image.width as usize, image.height as usize);
        let hwc: Vec<f32> = image.pixels.iter().map(|&v| f32::from(v)).collect();
        let x = Tensor::from_vec(hwc, (h, w, 3), &Device::Cpu)?
            .permute((2, 0, 1))?
            .unsqueeze(0)?
            .to_device(self.device())?;
        let mut x = x.broadcast_sub(&self.norm)?;
        let mut out = Vec::with_capacity(self.blocks.len());
        for (b, block) in self.blocks.iter().enumerate() {
            if b > 0 {
                x = x.max_pool2d((2, 2))?;
            }
            for conv in &block.convs {
                x = conv.forward(&x)?.relu()?;
            }
            let p = block.projection.forward(&x)?;
            let (_, _, ph, pw) = p.dims4()?;
            out.push((pw, ph, p.flatten_all()?.to_vec1::<f32>()?));
        }
        Ok(out)
    }
}

/// `cv2.resize(src, (dw, dh), interpolation=INTER_LINEAR)` of a one-channel f32 image: pixel
/// centres aligned, the weights in f32 (a source index past an edge clamps to it with weight
/// 1), the horizontal pass then the vertical.
pub fn resize_linear_f32(src: &[f32], sw: usize, sh: usize, dw: usize, dh: usize) -> Vec<f32> {
    if (sw, sh) == (dw, dh) {
        return src.to_vec();
    }
    // OpenCV's `resize`: `fx = (float)((dx + 0.5) * scale - 0.5)`, `sx = floor(fx)`, the
    // fraction zeroed where `sx` falls off either end.
    let taps = |s: usize, d: usize| -> Vec<(usize, usize, f32, f32)> {
        let scale = s as f64 / d as f64;
        (0..d)
            .map(|i| {
                let f = ((i as f64 + 0.5) * scale - 0.5) as f32;
                let mut x = f.floor() as isize;
                let mut frac = f - x as f32;
                if x < 0 {
                    (x, frac) = (0, 0.0);
                }
                if x >= s as isize - 1 {
                    (x, frac) = (s as isize - 1, 0.0);
                }
                let x = x as usize;
                (x, (x + 1).min(s - 1), 1.0 - frac, frac)
            })
            .collect()
    };
    let xs = taps(sw, dw);
    let ys = taps(sh, dh);
    let rows: Vec<Vec<f32>> = (0..sh)
        .map(|y| {
            let row = &src[y * sw..][..sw];
            xs.iter()
                .map(|&(a, b, wa, wb)| row[a] * wa + row[b] * wb)
                .collect()
        })
        .collect();
    let mut out = Vec::with_capacity(dw * dh);
    for &(a, b, wa, wb) in &ys {
        out.extend(
            rows[a]
                .iter()
                .zip(&rows[b])
                .map(|(&r0, &r1)| r0 * wa + r1 * wb),
        );
    }
    out
}

/// `apply_hed`'s edge logits on the padded image: the mean of the projections resized to it.
pub fn hed_logits(net: &HedNetwork, padded: &RgbImage) -> Result<Vec<f32>> {
    let (w, h) = (padded.width as usize, padded.height as usize);
    let resized: Vec<Vec<f32>> = net
        .projections(padded)?
        .into_iter()
        .map(|(pw, ph, p)| resize_linear_f32(&p, pw, ph, w, h))
        .collect();
    let n = resized.len() as f32;
    // numpy's f32 mean over the stacked maps: summed in order, divided in f32.
    Ok((0..w * h)
        .map(|i| resized.iter().fold(0f32, |s, m| s + m[i]) / n)
        .collect())
}

/// `apply_hed(padded, is_safe=safe)`: the one-channel edge map of the padded image.
pub fn hed_edges(net: &HedNetwork, padded: &RgbImage, safe: bool) -> Result<Vec<u8>> {
    Ok(hed_logits(net, padded)?
        .into_iter()
        .map(|mean| {
            let mut edge = 1.0 / (1.0 + (-f64::from(mean)).exp());
            if safe {
                // safe_step(x, 2): f32 throughout.
                edge = f64::from(((edge as f32 * 3.0) as i32) as f32 / 2.0);
            }
            (edge * 255.0).clamp(0.0, 255.0) as u8
        })
        .collect())
}

/// A one-channel image as three equal channels, for the RGB blurs.
fn triple<T: Copy>(gray: &[T]) -> Vec<T> {
    gray.iter().flat_map(|&v| [v, v, v]).collect()
}

/// `nms(x, t, s)` of `annotator/util.py` on a one-channel u8 map: white where the blurred
/// value is a maximum along some direction and above `t`.
fn nms(map: &[u8], w: usize, h: usize, t: f32, sigma: f64) -> Vec<u8> {
    let x: Vec<f32> = gaussian_blur_f32(
        &triple(&map.iter().map(|&v| f32::from(v)).collect::<Vec<_>>()),
        w,
        h,
        sigma,
    )
    .into_iter()
    .step_by(3)
    .collect();
    let at = |y: isize, xx: isize| -> Option<f32> {
        (y >= 0 && xx >= 0 && (y as usize) < h && (xx as usize) < w)
            .then(|| x[y as usize * w + xx as usize])
    };
    // The four line kernels as (dy, dx) of the neighbours; cv2.dilate's border never wins.
    const LINES: [[(isize, isize); 2]; 4] = [
        [(0, -1), (0, 1)],
        [(-1, 0), (1, 0)],
        [(-1, -1), (1, 1)],
        [(1, -1), (-1, 1)],
    ];
    (0..h * w)
        .map(|i| {
            let (y, xx) = ((i / w) as isize, (i % w) as isize);
            let v = x[i];
            let is_max = LINES.iter().any(|line| {
                line.iter()
                    .all(|&(dy, dx)| at(y + dy, xx + dx).is_none_or(|n| n <= v))
            });
            if is_max && v > t {
                255
            } else {
                0
            }
        })
        .collect()
}

/// The legacy `scribble_hed` after `hed`: the cropped map (`w` x `h`, one channel) thinned
/// by `nms`, blurred, white above 4.
pub fn scribble_hed(map: &[u8], w: usize, h: usize) -> Vec<u8> {
    let thin = nms(map, w, h, 127.0, 3.0);
    gaussian_blur_u8(&triple(&thin), w, h, 3.0)
        .into_iter()
        .step_by(3)
        .map(|v| if v > 4 { 255 } else { 0 })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_resize_doubles_with_quarter_weights_and_clamps_the_edges() {
        let up = resize_linear_f32(&[0.0, 4.0], 2, 1, 4, 1);
        assert_eq!(up, vec![0.0, 1.0, 3.0, 4.0]);
        let same = resize_linear_f32(&[1.0, 2.0, 3.0], 3, 1, 3, 1);
        assert_eq!(same, vec![1.0, 2.0, 3.0]);
        let tall = resize_linear_f32(&[0.0, 8.0], 1, 2, 1, 4);
        assert_eq!(tall, vec![0.0, 2.0, 6.0, 8.0]);
    }

    #[test]
    fn nms_keeps_a_blob_s_peak_and_drops_the_far_field() {
        // A 7x7 blob: blurred (sigma 3) its centre stays over 127 and is the maximum of every
        // line through it; far from it the blur is under the threshold.
        let (w, h) = (21, 21);
        let mut map = vec![0u8; w * h];
        for y in 7..14 {
            for x in 7..14 {
                map[y * w + x] = 255;
            }
        }
        let thin = nms(&map, w, h, 127.0, 3.0);
        assert_eq!(thin[10 * w + 10], 255);
        assert_eq!(thin[10 * w + 2], 0);
        assert_eq!(thin[2 * w + 2], 0);
        let scribble = scribble_hed(&map, w, h);
        assert_eq!(scribble[10 * w + 10], 255);
        assert_eq!(scribble[10 * w], 0);
    }
}
