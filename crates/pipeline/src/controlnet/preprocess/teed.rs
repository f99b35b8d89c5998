//! The extension's TEED module (`softedge_teed`: `scripts/preprocessor/teed.py`,
//! `annotator/teed/`):
//! - [`TeedNetwork`]: `TED`, the Tiny and Efficient Edge Detector. The activation everywhere is
//!   smish, `x * tanh(ln(1 + sigmoid(x)))`. `block_1` (3x3 convs: stride 2 to 16 channels,
//!   smish, 16, smish) at half size; `block_2` (3x3 to 32, smish, 3x3, no activation); its
//!   3x3 / stride 2 / pad 1 max pool plus `side_1` (1x1, stride 2, of `block_1`) feeds the one
//!   dense layer of `dblock_3` (smish, 3x3 pad 2, smish, 3x3 pad 0; averaged with
//!   `pre_dense_3`, a 1x1 of the pooled `block_2`) at quarter size. Each of the three goes
//!   through an upsampling block (1x1, smish, a stride-2 transposed conv; twice for the third)
//!   to one channel at the image's size, and `block_cat` (`DoubleFusion`: smish, a grouped
//!   3x3 to 24, smish, a depthwise 3x3, the two summed over channels, smish) fuses the three.
//! - [`teed_edges`] (`TEEDDetector.__call__` on the padded image, RGB in 0..=255 as it is):
//!   the four maps' mean (f32; `cv2.resize` to their own size leaves them), the sigmoid in
//!   f64; with `safe_steps` above 0, `safe_step(x, safe_steps)` (f32); times 255, clipped,
//!   truncated to u8.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Module, Tensor};

use super::lineart::ConvTranspose;
use super::networks::{AnnotatorFile, HubFile};
use crate::kernels::{depthwise_conv2d, Conv2d};
use crate::pipeline::RgbImage;
use crate::{PipelineError, Result};

/// The file the extension loads the network from (`annotator/downloads/TEED/`).
pub const TEED_FILE: &str = "7_model.pth";

/// [`TeedNetwork`]'s weights file, for an [`AnnotatorNetworks`](super::AnnotatorNetworks).
pub static TEED: AnnotatorFile = AnnotatorFile {
    name: TEED_FILE,
    subfolder: "TEED",
    // `load_teed_model`'s remote_url (not in lllyasviel/Annotators).
    hub: HubFile {
        repo: "bdsqlsz/qinglong_controlnet-lllite",
        path: "Annotators/7_model.pth",
    },
    load: |path| Ok(Arc::new(TeedNetwork::load(path, &Device::Cpu)?)),
};

/// `smish` (`Fsmish.py`): `x * tanh(ln(1 + sigmoid(x)))`, in one pass over the values (as
/// five candle ops it was a fifth of the network's time): the same f32 steps in the same
/// order as candle's sigmoid (`1 / (exp(-x) + 1)`), affine, log, tanh and product.
fn smish(x: &Tensor) -> Result<Tensor> {
    use rayon::prelude::*;
    if x.dtype() != DType::F32 || !x.device().is_cpu() {
        let s = candle_nn::ops::sigmoid(x)?;
        return Ok((x * (s + 1.0)?.log()?.tanh()?)?);
    }
    let mut v = x.flatten_all()?.to_vec1::<f32>()?;
    v.par_chunks_mut(1 << 14).for_each(|c| {
        for x in c {
            let s = 1.0 / ((-*x).exp() + 1.0);
            *x *= (s + 1.0).ln().tanh();
        }
    });
    Ok(Tensor::from_vec(v, x.dims(), x.device())?)
}

/// A grouped 3x3 conv with its bias whose groups read one input channel each (`DoubleFusion`'s
/// two: 3 groups of 8 outputs, and the depthwise 24): each input channel repeated over its
/// group's outputs, then our depthwise kernel (candle's grouped conv ran one conv per group).
struct Grouped {
    weight: Tensor,
    bias: Tensor,
    padding: usize,
    groups: usize,
}

impl Grouped {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (_, cin, _, _) = x.dims4()?;
        let cout = self.weight.dim(0)?;
        if cin != self.groups {
            return Err(PipelineError::InvalidRequest(format!(
                "TEED's grouped conv has {} groups of one channel, the input {cin} channels",
                self.groups
            )));
        }
        let x = if cin == cout {
            x.clone()
        } else {
            // Output o is group o / (cout / groups)'s, which reads input channel o / per.
            let per = cout / cin;
            let idx: Vec<u32> = (0..cout).map(|o| (o / per) as u32).collect();
            x.index_select(&Tensor::new(idx, x.device())?, 1)?
        };
        Ok(depthwise_conv2d(
            &x,
            &self.weight,
            Some(&self.bias),
            1,
            self.padding,
            1,
        )?)
    }
}

/// A transposed conv with its bias (`nn.ConvTranspose2d`, stride 2), as lineart's: four
/// stride-1 convs on our kernels, one per output phase (candle's CPU transposed conv takes a
/// dot product per output value).
struct Up(ConvTranspose);

impl Up {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.0.forward(x)
    }
}

/// `UpConvBlock`: per doubling, a 1x1 conv, smish and the transposed conv.
struct UpBlock(Vec<(Conv2d, Up)>);

impl UpBlock {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = x.clone();
        for (conv, up) in &self.0 {
            x = up.forward(&smish(&conv.forward(&x)?)?)?;
        }
        Ok(x)
    }
}

/// `TED` with its weights, on one device in f32.
pub struct TeedNetwork {
    block_1: [Conv2d; 2],
    block_2: [Conv2d; 2],
    side_1: Conv2d,
    pre_dense_3: Conv2d,
    dense: [Conv2d; 2],
    up: [UpBlock; 3],
    fusion: [Grouped; 2],
}

impl std::fmt::Debug for TeedNetwork {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TeedNetwork").finish_non_exhaustive()
    }
}

/// The state dict and where it came from, for errors naming the file and key.
struct State<'a> {
    path: &'a Path,
    tensors: HashMap<String, Tensor>,
    device: &'a Device,
}

impl State<'_> {
    fn bad(&self, message: String) -> PipelineError {
        PipelineError::Weights {
            path: self.path.to_path_buf(),
            message,
        }
    }

    fn get(&self, key: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self
            .tensors
            .get(key)
            .ok_or_else(|| self.bad(format!("{key} is missing (not a TEED network)")))?;
        if t.dims() != shape {
            return Err(self.bad(format!(
                "{key} has shape {:?}, the network needs {shape:?}",
                t.dims()
            )));
        }
        Ok(t.to_dtype(DType::F32)?.to_device(self.device)?)
    }

    /// `key`'s `[o, i, k, k]` conv with its bias.
    fn conv(&self, key: &str, shape: [usize; 4], stride: usize, padding: usize) -> Result<Conv2d> {
        let weight = self.get(&format!("{key}.weight"), &shape)?;
        let bias = self.get(&format!("{key}.bias"), &shape[..1])?;
        Ok(Conv2d::new(weight, Some(bias), stride, padding))
    }

    fn grouped(&self, key: &str, shape: [usize; 4], groups: usize) -> Result<Grouped> {
        Ok(Grouped {
            weight: self.get(&format!("{key}.weight"), &shape)?,
            bias: self.get(&format!("{key}.bias"), &shape[..1])?,
            padding: 1,
            groups,
        })
    }

    /// `UpConvBlock(input, up_scale)`: `features.{3i}` the 1x1 conv, `features.{3i + 2}` the
    /// transposed conv (kernel `2^up_scale`, padding `all_pads[up_scale]`), 16 channels but
    /// the last, which has one.
    fn up(&self, key: &str, input: usize, up_scale: usize) -> Result<UpBlock> {
        const ALL_PADS: [usize; 5] = [0, 0, 1, 3, 7];
        let (k, padding) = (1 << up_scale, ALL_PADS[up_scale]);
        let mut layers = Vec::with_capacity(up_scale);
        let mut input = input;
        for i in 0..up_scale {
            let out = if i == up_scale - 1 { 1 } else { 16 };
            let conv = self.conv(
                &format!("{key}.features.{}", 3 * i),
                [out, input, 1, 1],
                1,
                0,
            )?;
            let t = format!("{key}.features.{}", 3 * i + 2);
            let up = Up(ConvTranspose::new(
                &self.get(&format!("{t}.weight"), &[out, out, k, k])?,
                self.get(&format!("{t}.bias"), &[out])?,
                padding,
                0,
            )?);
            layers.push((conv, up));
            input = out;
        }
        Ok(UpBlock(layers))
    }
}

impl TeedNetwork {
    /// The network of a `7_model.pth` (a torch pickle of the state dict, read without running
    /// it) or a `.safetensors` file of the same names, onto `device` in f32.
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let s = State {
            path,
            tensors: crate::upscaler::read_state(path)?,
            device,
        };
        Ok(Self {
            block_1: [
                s.conv("block_1.conv1", [16, 3, 3, 3], 2, 1)?,
                s.conv("block_1.conv2", [16, 16, 3, 3], 1, 1)?,
            ],
            block_2: [
                s.conv("block_2.conv1", [32, 16, 3, 3], 1, 1)?,
                s.conv("block_2.conv2", [32, 32, 3, 3], 1, 1)?,
            ],
            side_1: s.conv("side_1.conv", [32, 16, 1, 1], 2, 0)?,
            pre_dense_3: s.conv("pre_dense_3.conv", [48, 32, 1, 1], 1, 0)?,
            dense: [
                s.conv("dblock_3.denselayer1.conv1", [48, 32, 3, 3], 1, 2)?,
                s.conv("dblock_3.denselayer1.conv2", [48, 48, 3, 3], 1, 0)?,
            ],
            up: [
                s.up("up_block_1", 16, 1)?,
                s.up("up_block_2", 32, 1)?,
                s.up("up_block_3", 48, 2)?,
            ],
            fusion: [
                s.grouped("block_cat.DWconv1", [24, 1, 3, 3], 3)?,
                s.grouped("block_cat.DWconv2", [24, 1, 3, 3], 24)?,
            ],
        })
    }

    fn device(&self) -> &Device {
        self.side_1.weight().device()
    }

    /// `TED.forward`: the three upsampled maps and the fused one, each `height x width` f32
    /// (the image's sides even, as the padded image's are: multiples of 64).
    pub fn maps(&self, image: &RgbImage) -> Result<Vec<Vec<f32>>> {
        let (w, h) = (image.width as usize, image.height as usize);
        let rgb: Vec<f32> = image.pixels.iter().map(|&v| f32::from(v)).collect();
        let x = Tensor::from_vec(rgb, (h, w, 3), &Device::Cpu)?
            .permute((2, 0, 1))?
            .unsqueeze(0)?
            .to_device(self.device())?;
        let b1 = smish(&self.block_1[0].forward(&x)?)?;
        let b1 = smish(&self.block_1[1].forward(&b1)?)?;
        let side = self.side_1.forward(&b1)?;
        let b2 = smish(&self.block_2[0].forward(&b1)?)?;
        let b2 = self.block_2[1].forward(&b2)?;
        // MaxPool2d(3, 2, padding 1): an edge copy as the padding is never above the window's
        // own edge pixel, so it pools as torch's -inf padding does.
        let down = b2
            .pad_with_same(2, 1, 1)?
            .pad_with_same(3, 1, 1)?
            .max_pool2d_with_stride(3, 2)?;
        let added = (&down + &side)?;
        let pre = self.pre_dense_3.forward(&down)?;
        let d = self.dense[0].forward(&smish(&added)?)?;
        let d = self.dense[1].forward(&smish(&d)?)?;
        let b3 = ((d + pre)? * 0.5)?;
        let outs = [
            self.up[0].forward(&b1)?,
            self.up[1].forward(&b2)?,
            self.up[2].forward(&b3)?,
        ];
        let cat = Tensor::cat(&outs, 1)?;
        let a1 = self.fusion[0].forward(&smish(&cat)?)?;
        let a2 = self.fusion[1].forward(&smish(&a1)?)?;
        let fused = smish(&(a2 + a1)?.sum_keepdim(1)?)?;
        let mut maps = Vec::with_capacity(4);
        for m in outs.iter().chain([&fused]) {
            let (_, _, mh, mw) = m.dims4()?;
            if (mw, mh) != (w, h) {
                return Err(PipelineError::InvalidRequest(format!(
                    "TEED needs even sides, a map came out {mw}x{mh} of a {w}x{h} image"
                )));
            }
            maps.push(m.flatten_all()?.to_vec1::<f32>()?);
        }
        Ok(maps)
    }
}

/// The mean of the four maps (f32, as numpy's mean of float32), before the sigmoid.
pub fn teed_logits(net: &TeedNetwork, padded: &RgbImage) -> Result<Vec<f32>> {
    let maps = net.maps(padded)?;
    Ok((0..maps[0].len())
        .map(|i| maps.iter().fold(0f32, |s, m| s + m[i]) / maps.len() as f32)
        .collect())
}

/// `TEEDDetector(padded, safe_steps)`: the one-channel edge map of the padded image.
pub fn teed_edges(net: &TeedNetwork, padded: &RgbImage, safe_steps: u32) -> Result<Vec<u8>> {
    Ok(teed_logits(net, padded)?
        .into_iter()
        .map(|logit| {
            let edge = 1.0 / (1.0 + (-f64::from(logit)).exp());
            if safe_steps == 0 {
                (edge * 255.0).clamp(0.0, 255.0) as u8
            } else {
                // safe_step(x, safe_steps): f32 throughout, then times 255 in f32.
                let step = safe_steps as f32;
                let y = ((edge as f32 * (step + 1.0)) as i32) as f32 / step;
                (y * 255.0).clamp(0.0, 255.0) as u8
            }
        })
        .collect())
}
