//! ParseNet (`parsing_parsenet.pth`), the face parser facexlib's `FaceRestoreHelper` runs
//! with `use_parse=True` to mask each restored face before pasting it back
//! (`facexlib/parsing/parsenet.py`, from PSFRGAN; `init_parsing_model('parsenet')`:
//! `ParseNet(in_size=512, out_size=512, parsing_ch=19)`): on a 512x512 face in [-1, 1],
//!
//! 1. the encoder: a 3x3 conv, then residual blocks each halving the size;
//! 2. the body: residual blocks at the smallest size, added to their input;
//! 3. the decoder: residual blocks each doubling the size (nearest, then the convs);
//! 4. `out_mask_conv`, a 3x3 conv to the 19 classes' logits (`out_img_conv`'s image is not
//!    used by facexlib's paste and is not run).
//!
//! Every conv is facexlib's `ConvLayer`: a reflection pad of 1, the conv (stride 2 where it
//! downsamples), a BatchNorm (eval: running statistics, eps 1e-5) in the residual blocks'
//! convs, and a LeakyReLU (slope 0.2) after a block's first conv. A block's shortcut is the
//! input where it keeps the size and width, else a plain `ConvLayer` resampling as the block.
//! The numbers of blocks and every width are read from the names and shapes, as
//! `load_state_dict(strict=True)` would hold them to the file; the resampling of each block
//! comes from where it sits (facexlib's constructor fixes it, the file cannot say it).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Module, Tensor};

use crate::kernels::Conv2d;
use crate::pipeline::RgbImage;
use crate::upscaler::state::{checked_tensor, seq_len};
use crate::{PipelineError, Result};

/// `nn.BatchNorm2d`'s default eps (facexlib's `NormLayer('bn')`).
const BN_EPS: f64 = 1e-5;
/// facexlib's `ReluLayer('LeakyReLU')`: `nn.LeakyReLU(0.2)`.
const LEAKY_SLOPE: f64 = 0.2;
/// The face size facexlib parses (`cv2.resize(restored_face, (512, 512))`).
pub const PARSE_SIZE: usize = 512;

/// The state dict's tensors as the loader reads them: checked shapes, on the device.
struct Weights<'a> {
    path: &'a Path,
    state: &'a HashMap<String, Tensor>,
    device: &'a Device,
}

impl Weights<'_> {
    fn bad(&self, message: impl std::fmt::Display) -> PipelineError {
        PipelineError::Weights {
            path: self.path.to_path_buf(),
            message: message.to_string(),
        }
    }

    fn has(&self, key: &str) -> bool {
        self.state.contains_key(key)
    }

    fn dims(&self, key: &str) -> Result<&[usize]> {
        Ok(checked_tensor(self.path, self.state, key, None)?.dims())
    }

    fn get(&self, key: &str, shape: &[usize]) -> Result<Tensor> {
        Ok(checked_tensor(self.path, self.state, key, Some(shape))?.to_device(self.device)?)
    }
}

/// How a conv layer resamples (facexlib's `scale`).
#[derive(Clone, Copy, Debug, PartialEq)]
enum Scale {
    None,
    Down,
    Up,
}

/// facexlib's `ConvLayer`, its BatchNorm (if any) folded into the conv.
struct ConvLayer {
    conv: Conv2d,
    scale: Scale,
    leaky: bool,
}

impl ConvLayer {
    /// `{name}.conv2d`, with `{name}.norm.norm` folded in where the file has it.
    fn load(w: &Weights, name: &str, scale: Scale, leaky: bool) -> Result<Self> {
        let dims = w.dims(&format!("{name}.conv2d.weight"))?.to_vec();
        let [cout, cin, k, k2] = dims[..] else {
            return Err(w.bad(format!("{name}.conv2d.weight has shape {dims:?}")));
        };
        if k != 3 || k2 != 3 {
            return Err(w.bad(format!("{name} is a {k}x{k2} conv; ParseNet's are 3x3")));
        }
        let weight = w.get(&format!("{name}.conv2d.weight"), &[cout, cin, k, k])?;
        let norm = format!("{name}.norm.norm");
        let (weight, bias) = if w.has(&format!("{norm}.running_mean")) {
            // facexlib drops the conv's bias where a BatchNorm follows.
            let get = |p: &str| w.get(&format!("{norm}.{p}"), &[cout]);
            let scale = (get("weight")? / (get("running_var")? + BN_EPS)?.sqrt()?)?;
            let shift = (get("bias")? - (get("running_mean")? * &scale)?)?;
            let weight = weight.broadcast_mul(&scale.reshape((cout, 1, 1, 1))?)?;
            (weight, shift)
        } else {
            (weight, w.get(&format!("{name}.conv2d.bias"), &[cout])?)
        };
        let stride = if scale == Scale::Down { 2 } else { 1 };
        Ok(Self {
            conv: Conv2d::new(weight, Some(bias), stride, 0),
            scale,
            leaky,
        })
    }

    fn out_channels(&self) -> usize {
        self.conv.weight().dims()[0]
    }

    fn in_channels(&self) -> usize {
        self.conv.weight().dims()[1]
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = match self.scale {
            Scale::Up => {
                let (_, _, h, w) = x.dims4()?;
                x.upsample_nearest2d(2 * h, 2 * w)?
            }
            _ => x.clone(),
        };
        let y = self.conv.forward(&reflection_pad_1(&x)?)?;
        if !self.leaky {
            return Ok(y);
        }
        match crate::kernels::act::leaky_relu(&y, LEAKY_SLOPE as f32)? {
            Some(y) => Ok(y),
            None => Ok(y.maximum(&(&y * LEAKY_SLOPE)?)?),
        }
    }
}

/// facexlib's `ResidualBlock`.
struct ResBlock {
    shortcut: Option<ConvLayer>,
    conv1: ConvLayer,
    conv2: ConvLayer,
}

impl ResBlock {
    /// The block `name`, resampling by `scale` (the first conv upsamples, the second
    /// downsamples, as facexlib's `scale_config_dict`).
    fn load(w: &Weights, name: &str, scale: Scale) -> Result<Self> {
        let (s1, s2) = match scale {
            Scale::Up => (Scale::Up, Scale::None),
            Scale::Down => (Scale::None, Scale::Down),
            Scale::None => (Scale::None, Scale::None),
        };
        let conv1 = ConvLayer::load(w, &format!("{name}.conv1"), s1, true)?;
        let conv2 = ConvLayer::load(w, &format!("{name}.conv2"), s2, false)?;
        let shortcut_name = format!("{name}.shortcut_func");
        let needs_shortcut = scale != Scale::None || conv1.in_channels() != conv1.out_channels();
        let shortcut = match w.has(&format!("{shortcut_name}.conv2d.weight")) {
            true => Some(ConvLayer::load(w, &shortcut_name, scale, false)?),
            false if needs_shortcut => {
                return Err(w.bad(format!("{shortcut_name} is missing")));
            }
            false => None,
        };
        if conv2.in_channels() != conv1.out_channels() {
            return Err(w.bad(format!("{name}'s convs do not chain")));
        }
        Ok(Self {
            shortcut,
            conv1,
            conv2,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let identity = match &self.shortcut {
            Some(s) => s.forward(x)?,
            None => x.clone(),
        };
        let res = self.conv2.forward(&self.conv1.forward(x)?)?;
        Ok((identity + res)?)
    }
}

/// `nn.ReflectionPad2d(1)` on `[N, C, H, W]`: the edge rows and columns mirrored, the edge
/// itself not repeated.
fn reflection_pad_1(x: &Tensor) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    if h < 2 || w < 2 {
        return Err(PipelineError::InvalidRequest(format!(
            "ParseNet cannot reflect a {w}x{h} feature map"
        )));
    }
    let index = |n: usize| -> Result<Tensor> {
        let idx: Vec<u32> = std::iter::once(1)
            .chain(0..n as u32)
            .chain(std::iter::once(n as u32 - 2))
            .collect();
        Ok(Tensor::new(idx, x.device())?)
    };
    let x = x.contiguous()?.index_select(&index(h)?, 2)?;
    Ok(x.index_select(&index(w)?, 3)?)
}

/// A loaded ParseNet (f32, on the device it was loaded to).
pub struct ParseNet {
    stem: ConvLayer,
    encoder: Vec<ResBlock>,
    body: Vec<ResBlock>,
    decoder: Vec<ResBlock>,
    mask_conv: ConvLayer,
    /// The parsing classes (facexlib: 19).
    pub classes: usize,
    /// The first conv's width (facexlib: `base_ch` 64).
    pub base_channels: usize,
    /// The residual blocks of the encoder, body and decoder (facexlib: 4, 10, 4).
    pub depths: [usize; 3],
}

impl std::fmt::Debug for ParseNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ParseNet")
            .field("classes", &self.classes)
            .field("base_channels", &self.base_channels)
            .field("depths", &self.depths)
            .finish()
    }
}

impl ParseNet {
    /// The network of `parsing_parsenet.pth` (a bare state dict, as facexlib's release ships
    /// it; `.safetensors` too), in f32 on `device`.
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let state = crate::upscaler::read_state(path)?;
        let w = Weights {
            path,
            state: &state,
            device,
        };
        for key in ["encoder.0.conv2d.weight", "out_mask_conv.conv2d.weight"] {
            if !w.has(key) {
                return Err(w.bad(format!("not a ParseNet: {key} is missing")));
            }
        }
        let stem = ConvLayer::load(&w, "encoder.0", Scale::None, false)?;
        let blocks = |prefix: &str, first: usize, scale: Scale| -> Result<Vec<ResBlock>> {
            (first..seq_len(&state, prefix))
                .map(|i| ResBlock::load(&w, &format!("{prefix}.{i}"), scale))
                .collect()
        };
        let encoder = blocks("encoder", 1, Scale::Down)?;
        let body = blocks("body", 0, Scale::None)?;
        let decoder = blocks("decoder", 0, Scale::Up)?;
        let mask_conv = ConvLayer::load(&w, "out_mask_conv", Scale::None, false)?;
        let mut width = stem.out_channels();
        for (i, block) in encoder.iter().chain(&body).chain(&decoder).enumerate() {
            if block.conv1.in_channels() != width {
                return Err(w.bad(format!(
                    "residual block {i} takes {} channels after {width}",
                    block.conv1.in_channels()
                )));
            }
            width = block.conv2.out_channels();
        }
        if stem.in_channels() != 3 || mask_conv.in_channels() != width {
            return Err(w.bad("ParseNet's layers do not chain from RGB to the mask"));
        }
        if encoder.len() != decoder.len() {
            // facexlib's paste needs the logits at the face's size (in_size == out_size).
            return Err(w.bad(format!(
                "ParseNet downsamples {} times and upsamples {} times",
                encoder.len(),
                decoder.len()
            )));
        }
        Ok(Self {
            classes: mask_conv.out_channels(),
            base_channels: stem.out_channels(),
            depths: [encoder.len(), body.len(), decoder.len()],
            stem,
            encoder,
            body,
            decoder,
            mask_conv,
        })
    }

    pub fn device(&self) -> &Device {
        self.stem.conv.weight().device()
    }

    /// The network on `[B, 3, H, W]` faces in [-1, 1]: the class logits `[B, classes, H, W]`
    /// (facexlib's `out_mask`).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = x.to_device(self.device())?.to_dtype(DType::F32)?;
        let (_, _, h, w) = x.dims4()?;
        let step = 1 << self.encoder.len();
        if h % step != 0 || w % step != 0 {
            return Err(PipelineError::InvalidRequest(format!(
                "ParseNet halves a face {} times; {w}x{h} does not divide",
                self.encoder.len()
            )));
        }
        let mut feat = self.stem.forward(&x)?;
        for block in &self.encoder {
            feat = block.forward(&feat)?;
        }
        let mut h = feat.clone();
        for block in &self.body {
            h = block.forward(&h)?;
        }
        let mut h = (feat + h)?;
        for block in &self.decoder {
            h = block.forward(&h)?;
        }
        self.mask_conv.forward(&h)
    }

    /// facexlib's input of a 512x512 restored face: the face (BGR there, to RGB by
    /// `img2tensor`; RGB here already) in float32 / 255, then `normalize(0.5, 0.5)`:
    /// `(x - 0.5) / 0.5`, all in float32.
    pub fn input(face: &RgbImage, device: &Device) -> Result<Tensor> {
        let (w, h) = (face.width as usize, face.height as usize);
        let mut v = vec![0f32; 3 * w * h];
        for (i, px) in face.pixels.chunks_exact(3).enumerate() {
            for (c, &byte) in px.iter().enumerate() {
                v[c * w * h + i] = (byte as f32 / 255.0 - 0.5) / 0.5;
            }
        }
        Ok(Tensor::from_vec(v, (1, 3, h, w), device)?)
    }

    /// Each pixel's class of a 512x512 face (`out.argmax(dim=1)`), row-major.
    pub fn classes_of(&self, face: &RgbImage) -> Result<Vec<u8>> {
        let (w, h) = (face.width as usize, face.height as usize);
        if (w, h) != (PARSE_SIZE, PARSE_SIZE) {
            // facexlib resizes to 512 first; the helper's faces are 512 (a copy there).
            return Err(PipelineError::InvalidRequest(format!(
                "a {w}x{h} face to parse; facexlib's are {PARSE_SIZE}x{PARSE_SIZE}"
            )));
        }
        let logits = self.forward(&Self::input(face, self.device())?)?;
        let classes = logits.argmax(1)?.flatten_all()?.to_vec1::<u32>()?;
        Ok(classes.into_iter().map(|c| c as u8).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reflection_pad_mirrors_without_repeating_the_edge() {
        let x = Tensor::new(&[[1f32, 2., 3.], [4., 5., 6.]], &Device::Cpu)
            .unwrap()
            .reshape((1, 1, 2, 3))
            .unwrap();
        let p = reflection_pad_1(&x).unwrap().flatten_all().unwrap();
        let want = [
            5., 4., 5., 6., 5., //
            2., 1., 2., 3., 2., //
            5., 4., 5., 6., 5., //
            2., 1., 2., 3., 2.,
        ];
        assert_eq!(p.to_vec1::<f32>().unwrap(), want);
        assert!(reflection_pad_1(&x.narrow(2, 0, 1).unwrap()).is_err());
    }

    #[test]
    fn a_folded_batch_norm_is_the_conv_then_the_norm() {
        let dev = Device::Cpu;
        let (cin, cout) = (2, 3);
        let conv_w = Tensor::randn(0f32, 1., (cout, cin, 3, 3), &dev).unwrap();
        let param = |lo: f32| (Tensor::rand(0f32, 1., cout, &dev).unwrap() + lo as f64).unwrap();
        let (gamma, beta, mean, var) = (param(0.5), param(-0.5), param(-0.5), param(0.2));
        let state: HashMap<String, Tensor> = [
            ("l.conv2d.weight", conv_w.clone()),
            ("l.norm.norm.weight", gamma.clone()),
            ("l.norm.norm.bias", beta.clone()),
            ("l.norm.norm.running_mean", mean.clone()),
            ("l.norm.norm.running_var", var.clone()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let w = Weights {
            path: Path::new("test.pth"),
            state: &state,
            device: &dev,
        };
        let layer = ConvLayer::load(&w, "l", Scale::None, false).unwrap();
        let x = Tensor::randn(0f32, 1., (1, cin, 5, 4), &dev).unwrap();
        let got = layer.forward(&x).unwrap();
        // The conv, then (y - mean) / sqrt(var + eps) * gamma + beta per channel.
        let y = Conv2d::new(conv_w, None, 1, 0)
            .forward(&reflection_pad_1(&x).unwrap())
            .unwrap();
        let c = |t: &Tensor| t.reshape((1, cout, 1, 1)).unwrap();
        let norm = (var + BN_EPS).unwrap().sqrt().unwrap();
        let want = y
            .broadcast_sub(&c(&mean))
            .unwrap()
            .broadcast_div(&c(&norm))
            .unwrap()
            .broadcast_mul(&c(&gamma))
            .unwrap()
            .broadcast_add(&c(&beta))
            .unwrap();
        assert_eq!(got.dims(), [1, cout, 5, 4]);
        let d = (got - want)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(d < 1e-5, "{d}");
    }
}
