//! The extension's PiDiNet modules (`annotator/pidinet/`, the legacy `pidinet`,
//! `pidinet_safe` and `scribble_pidinet` of `scripts/preprocessor/legacy/processor.py`):
//! - [`PidiNetwork`]: `pidinet()`, the `carv4` table-5 network (`PiDiNet(60, dil=24,
//!   sa=True)`): an initial 3x3 conv, 15 blocks (a depthwise pixel-difference conv, ReLU, a
//!   1x1 conv, the residual; blocks 2_1, 3_1, 4_1 first halve with a 2x2 max pool and widen the
//!   residual with a 1x1 `shortcut`) in four stages of widths C, 2C, 4C, 4C, and on each
//!   stage's output a `CDCM` (1x1 to `dil` channels, four 3x3 convs dilated 5, 7, 9, 11,
//!   summed), a `CSAM` (a one-channel attention: ReLU, 1x1 to 4, 3x3 to 1, sigmoid, times the
//!   input) and a 1x1 `MapReduce` to one channel. The four maps, resized bilinearly to the
//!   image's size, go through a 1x1 `classifier` and a sigmoid. C and `dil` (60, 24 in
//!   `table5_pidinet.pth`) are read from the weights' shapes.
//! - The pixel-difference convs (`cd`, `ad`, `rd` in carv4's order) are linear in their
//!   weights, so each is turned into a plain conv when the file is read, as the PiDiNet
//!   authors' `convert_pidinet` does: `cd` (central difference) subtracts the kernel's sum at
//!   its centre, `ad` (angular) subtracts the kernel rotated one step clockwise, `rd` (radial)
//!   spreads the 3x3 kernel's ring over a 5x5 one, outer ring minus inner.
//! - [`pidinet_edges`] (`apply_pidinet`): the input is the padded image as BGR in 0..=1; the
//!   sigmoid of the fused map (f32); with `safe`, `safe_step`; times 255 in f32, clipped,
//!   truncated to u8. `scribble_pidinet` thins and thickens the cropped map as `scribble_hed`.

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Module, Tensor};

use super::hed::resize_linear_f32;
use super::networks::{lllyasviel, AnnotatorFile};
use crate::kernels::{depthwise_conv2d, Conv2d};
use crate::pipeline::RgbImage;
use crate::{PipelineError, Result};

/// The file the extension loads the network from (`annotator/downloads/pidinet/`).
pub const PIDINET_FILE: &str = "table5_pidinet.pth";

/// [`PidiNetwork`]'s weights file, for an [`AnnotatorNetworks`](super::AnnotatorNetworks).
pub static PIDINET: AnnotatorFile = AnnotatorFile {
    name: PIDINET_FILE,
    subfolder: "pidinet",
    hub: lllyasviel(PIDINET_FILE),
    load: |path| Ok(Arc::new(PidiNetwork::load(path, &Device::Cpu)?)),
};

/// A pixel-difference convolution's kind (`createConvFunc`).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Pdc {
    /// Vanilla.
    Cv,
    /// Central difference.
    Cd,
    /// Angular difference.
    Ad,
    /// Radial difference (a 5x5 kernel).
    Rd,
}

/// `nets['carv4']`: the init block's kind, then the 15 blocks'.
const CARV4: [Pdc; 16] = {
    use Pdc::*;
    [
        Cd, Ad, Rd, Cv, Cd, Ad, Rd, Cv, Cd, Ad, Rd, Cv, Cd, Ad, Rd, Cv,
    ]
};

/// The blocks' names, by stage; the first of stages 2..=4 halves the size.
const STAGES: [&[&str]; 4] = [
    &["block1_1", "block1_2", "block1_3"],
    &["block2_1", "block2_2", "block2_3", "block2_4"],
    &["block3_1", "block3_2", "block3_3", "block3_4"],
    &["block4_1", "block4_2", "block4_3", "block4_4"],
];

/// `CDCM`'s dilations.
const DILATIONS: [usize; 4] = [5, 7, 9, 11];

/// The plain kernel (and its padding) of a pixel-difference conv's `[o, i, 3, 3]` weights.
fn plain_kernel(pdc: Pdc, weight: &Tensor) -> Result<(Tensor, usize)> {
    let (o, i, _, _) = weight.dims4()?;
    let w = weight.flatten_all()?.to_vec1::<f32>()?;
    let (size, padding) = if pdc == Pdc::Rd { (25, 2) } else { (9, 1) };
    let mut out = Vec::with_capacity(o * i * size);
    for k in w.chunks(9) {
        match pdc {
            Pdc::Cv => out.extend_from_slice(k),
            Pdc::Cd => {
                // conv(x, w) - conv(x, sum(w)) at the same pixel: the centre carries the sum.
                let sum: f32 = k.iter().sum();
                out.extend(
                    k.iter()
                        .enumerate()
                        .map(|(j, &v)| if j == 4 { v - sum } else { v }),
                );
            }
            Pdc::Ad => {
                // Each ring tap minus the one before it, going clockwise.
                const FROM: [usize; 9] = [3, 0, 1, 6, 4, 2, 7, 8, 5];
                out.extend((0..9).map(|j| k[j] - k[FROM[j]]));
            }
            Pdc::Rd => {
                // The ring taps (all but the centre) on the 5x5's outer ring, minus on its inner.
                const OUTER: [usize; 8] = [0, 2, 4, 10, 14, 20, 22, 24];
                const INNER: [usize; 8] = [6, 7, 8, 11, 13, 16, 17, 18];
                let mut k5 = [0f32; 25];
                for (t, &v) in k[1..].iter().enumerate() {
                    k5[OUTER[t]] = v;
                    k5[INNER[t]] = -v;
                }
                out.extend_from_slice(&k5);
            }
        }
    }
    let side = if pdc == Pdc::Rd { 5 } else { 3 };
    let t = Tensor::from_vec(out, (o, i, side, side), &Device::Cpu)?.to_device(weight.device())?;
    Ok((t, padding))
}

/// A depthwise conv (one kernel per channel; our kernel: candle's grouped conv runs one conv
/// per channel).
struct Depthwise {
    weight: Tensor,
    padding: usize,
}

impl Depthwise {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(depthwise_conv2d(x, &self.weight, None, 1, self.padding, 1)?)
    }
}

/// `PDCBlock`.
struct Block {
    /// The stage's first block past the first stage: the pool and the residual's 1x1.
    shortcut: Option<Conv2d>,
    depthwise: Depthwise,
    pointwise: Conv2d,
}

impl Block {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = match self.shortcut {
            Some(_) => x.max_pool2d((2, 2))?,
            None => x.clone(),
        };
        let y = self.depthwise.forward(&x)?.relu()?;
        let y = self.pointwise.forward(&y)?;
        let x = match &self.shortcut {
            Some(s) => s.forward(&x)?,
            None => x,
        };
        Ok((y + x)?)
    }
}

/// One stage's side output: `CDCM`, `CSAM`, `MapReduce`.
struct Side {
    cdcm_in: Conv2d,
    /// `[dil, dil, 3, 3]`, dilated as [`DILATIONS`].
    cdcm: [Tensor; 4],
    attention_in: Conv2d,
    attention_out: Conv2d,
    reduce: Conv2d,
}

impl Side {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = self.cdcm_in.forward(&x.relu()?)?;
        let mut sum: Option<Tensor> = None;
        for (w, &d) in self.cdcm.iter().zip(&DILATIONS) {
            let y = x.conv2d(w, d, 1, d, 1)?;
            sum = Some(match sum {
                Some(s) => (s + y)?,
                None => y,
            });
        }
        let x = sum.expect("four dilations");
        let a = self.attention_in.forward(&x.relu()?)?;
        let a = candle_nn::ops::sigmoid(&self.attention_out.forward(&a)?)?;
        Ok(self.reduce.forward(&x.broadcast_mul(&a)?)?)
    }
}

/// `pidinet()` (carv4, with `CDCM` and `CSAM`) with its weights, on one device in f32.
pub struct PidiNetwork {
    init: Conv2d,
    stages: Vec<Vec<Block>>,
    sides: Vec<Side>,
    /// `classifier`: the four maps' weights and the bias.
    classifier: ([f32; 4], f32),
    dil: usize,
}

impl std::fmt::Debug for PidiNetwork {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PidiNetwork")
            .field("widths", &self.widths())
            .finish()
    }
}

impl PidiNetwork {
    /// The network of a `table5_pidinet.pth` (a torch pickle, read without running it; its
    /// `state_dict`, names without `module.`) or a `.safetensors` file of the same names,
    /// onto `device` in f32.
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let state = crate::upscaler::read_state(path)?;
        let bad = |message: String| PipelineError::Weights {
            path: path.to_path_buf(),
            message,
        };
        let get = |key: &str, shape: &[usize]| -> Result<Tensor> {
            let t = state
                .get(key)
                .ok_or_else(|| bad(format!("{key} is missing (not a PiDiNet network)")))?;
            if t.dims() != shape {
                return Err(bad(format!(
                    "{key} has shape {:?}, the network needs {shape:?}",
                    t.dims()
                )));
            }
            Ok(t.to_dtype(DType::F32)?.to_device(device)?)
        };
        let c = match state.get("init_block.weight").map(|t| t.dims().to_vec()) {
            Some(d) if d.len() == 4 && d[1] == 3 => d[0],
            _ => {
                return Err(bad(
                    "init_block.weight: missing or not [C, 3, 3, 3] (not a PiDiNet network)".into(),
                ))
            }
        };
        let dil =
            match state
                .get("dilations.0.conv1.weight")
                .map(|t| t.dims().to_vec())
            {
                Some(d) if d.len() == 4 => d[0],
                _ => return Err(bad(
                    "dilations.0.conv1.weight is missing (not a PiDiNet network with dil and sa)"
                        .into(),
                )),
            };
        let conv = |key: &str, o: usize, i: usize, bias: bool, padding: usize, k: usize| {
            let weight = get(&format!("{key}.weight"), &[o, i, k, k])?;
            let bias = if bias {
                Some(get(&format!("{key}.bias"), &[o])?)
            } else {
                None
            };
            Ok::<_, PipelineError>(Conv2d::new(weight, bias, 1, padding))
        };
        let (init_w, init_pad) = plain_kernel(CARV4[0], &get("init_block.weight", &[c, 3, 3, 3])?)?;
        let init = Conv2d::new(init_w, None, 1, init_pad);
        let widths = [c, 2 * c, 4 * c, 4 * c];
        let mut stages = Vec::with_capacity(4);
        let mut channels = c;
        let mut layer = 1;
        for (s, names) in STAGES.iter().enumerate() {
            let mut blocks = Vec::with_capacity(names.len());
            for (b, name) in names.iter().enumerate() {
                let out = widths[s];
                let shortcut = if s > 0 && b == 0 {
                    Some(conv(
                        &format!("{name}.shortcut"),
                        out,
                        channels,
                        true,
                        0,
                        1,
                    )?)
                } else {
                    None
                };
                let (weight, padding) = plain_kernel(
                    CARV4[layer],
                    &get(&format!("{name}.conv1.weight"), &[channels, 1, 3, 3])?,
                )?;
                let pointwise = conv(&format!("{name}.conv2"), out, channels, false, 0, 1)?;
                blocks.push(Block {
                    shortcut,
                    depthwise: Depthwise { weight, padding },
                    pointwise,
                });
                channels = out;
                layer += 1;
            }
            stages.push(blocks);
        }
        let mut sides = Vec::with_capacity(4);
        for (i, &w) in widths.iter().enumerate() {
            let cdcm = |j: usize| {
                get(
                    &format!("dilations.{i}.conv2_{j}.weight"),
                    &[dil, dil, 3, 3],
                )
            };
            sides.push(Side {
                cdcm_in: conv(&format!("dilations.{i}.conv1"), dil, w, true, 0, 1)?,
                cdcm: [cdcm(1)?, cdcm(2)?, cdcm(3)?, cdcm(4)?],
                attention_in: conv(&format!("attentions.{i}.conv1"), 4, dil, true, 0, 1)?,
                attention_out: conv(&format!("attentions.{i}.conv2"), 1, 4, false, 1, 3)?,
                reduce: conv(&format!("conv_reduces.{i}.conv"), 1, dil, true, 0, 1)?,
            });
        }
        let cw = get("classifier.weight", &[1, 4, 1, 1])?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let cb = get("classifier.bias", &[1])?.to_vec1::<f32>()?[0];
        Ok(Self {
            init,
            stages,
            sides,
            classifier: ([cw[0], cw[1], cw[2], cw[3]], cb),
            dil,
        })
    }

    /// The first stage's width and `dil` (60 and 24 for the extension's file).
    pub fn widths(&self) -> (usize, usize) {
        (self.init.weight().dims()[0], self.dil)
    }

    fn device(&self) -> &Device {
        self.init.weight().device()
    }

    /// The four side maps of `image` (its sides multiples of 8, as the padded image's are),
    /// each `(width, height, values)`, the first at the image's size, each next at half (the
    /// last at the third's size).
    pub fn side_maps(&self, image: &RgbImage) -> Result<Vec<(usize, usize, Vec<f32>)>> {
        let (w, h) = (image.width as usize, image.height as usize);
        // `input_image[:, :, ::-1] / 255.0`: BGR in 0..=1.
        let bgr: Vec<f32> = image
            .pixels
            .chunks(3)
            .flat_map(|p| [p[2], p[1], p[0]])
            .map(|v| f32::from(v) / 255.0)
            .collect();
        let x = Tensor::from_vec(bgr, (h, w, 3), &Device::Cpu)?
            .permute((2, 0, 1))?
            .unsqueeze(0)?
            .to_device(self.device())?;
        let mut x = self.init.forward(&x)?;
        let mut out = Vec::with_capacity(4);
        for (blocks, side) in self.stages.iter().zip(&self.sides) {
            for block in blocks {
                x = block.forward(&x)?;
            }
            let e = side.forward(&x)?;
            let (_, _, eh, ew) = e.dims4()?;
            out.push((ew, eh, e.flatten_all()?.to_vec1::<f32>()?));
        }
        Ok(out)
    }
}

/// The fused edge logits of the padded image (the classifier's output, before the sigmoid):
/// the side maps resized to it (`F.interpolate`, bilinear, pixel centres aligned) and weighed.
pub fn pidinet_logits(net: &PidiNetwork, padded: &RgbImage) -> Result<Vec<f32>> {
    let (w, h) = (padded.width as usize, padded.height as usize);
    let maps: Vec<Vec<f32>> = net
        .side_maps(padded)?
        .into_iter()
        .map(|(mw, mh, m)| resize_linear_f32(&m, mw, mh, w, h))
        .collect();
    let (weights, bias) = net.classifier;
    Ok((0..w * h)
        .map(|i| {
            maps.iter()
                .zip(weights)
                .fold(0f32, |s, (m, k)| s + m[i] * k)
                + bias
        })
        .collect())
}

/// `apply_pidinet(padded, is_safe=safe)`: the one-channel edge map of the padded image.
pub fn pidinet_edges(net: &PidiNetwork, padded: &RgbImage, safe: bool) -> Result<Vec<u8>> {
    Ok(pidinet_logits(net, padded)?
        .into_iter()
        .map(|logit| {
            let mut edge = 1.0 / (1.0 + (-logit).exp());
            if safe {
                // safe_step(x, 2): f32 throughout.
                edge = ((edge * 3.0) as i32) as f32 / 2.0;
            }
            (edge * 255.0).clamp(0.0, 255.0) as u8
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kernel(pdc: Pdc, k: [f32; 9]) -> Vec<f32> {
        let t = Tensor::from_vec(k.to_vec(), (1, 1, 3, 3), &Device::Cpu).unwrap();
        let (p, _) = plain_kernel(pdc, &t).unwrap();
        p.flatten_all().unwrap().to_vec1().unwrap()
    }

    #[test]
    fn pixel_difference_kernels_become_plain_ones() {
        let k = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0];
        assert_eq!(kernel(Pdc::Cv, k), k);
        // The centre minus the sum (45): a flat image gives 0.
        assert_eq!(
            kernel(Pdc::Cd, k),
            [1.0, 2.0, 3.0, 4.0, -40.0, 6.0, 7.0, 8.0, 9.0]
        );
        // w - w[[3, 0, 1, 6, 4, 2, 7, 8, 5]].
        assert_eq!(
            kernel(Pdc::Ad, k),
            [-3.0, 1.0, 1.0, -3.0, 0.0, 3.0, -1.0, -1.0, 3.0]
        );
        let rd = kernel(Pdc::Rd, k);
        assert_eq!(rd.len(), 25);
        assert_eq!((rd[0], rd[2], rd[4], rd[24]), (2.0, 3.0, 4.0, 9.0));
        assert_eq!((rd[6], rd[7], rd[18], rd[12]), (-2.0, -3.0, -9.0, 0.0));
        assert_eq!(rd.iter().sum::<f32>(), 0.0);
    }
}
