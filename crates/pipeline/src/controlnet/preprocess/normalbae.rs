//! The extension's `normal_bae` module (the legacy `normal_bae` of
//! `scripts/preprocessor/legacy/processor.py`; `annotator/normalbae/`: `__init__.py`'s
//! `NormalBaeDetector`, `models/NNET.py`, `models/submodules/{encoder,decoder,submodules}.py`).
//! - [`NormalBaeNetwork`]: `NNET` with architecture BN in eval mode. The encoder
//!   (`normalbae/efficientnet.rs`) gives its stages' and its `conv_head`'s outputs; the decoder
//!   takes stages 0, 1, 2 and 4 and the head (`features[4, 5, 6, 8, 11]`): a 1x1 conv on the
//!   head, four `UpSampleBN`s (bilinear with corners aligned to the skip's size, concatenated
//!   with it, twice a 3x3 conv, BatchNorm (eps 1e-5, folded into the conv) and LeakyReLU 0.01),
//!   a 3x3 conv to the 1/8 prediction, then at 1/4, 1/2 and full size the previous prediction
//!   and the matching feature map each doubled (bilinear, corners aligned), concatenated and
//!   run through that level's per-pixel MLP (1x1 convs with ReLUs). Decoder.forward's default
//!   `mode='test'` runs every pixel through the MLPs; the uncertainty-guided point sampling is
//!   its training path. Every prediction is `norm_normalize`d (x, y, z over their length plus
//!   1e-10; kappa = ELU + 1.01). Widths are read from the file.
//! - [`normal_bae_normals`]: the padded image `/ 255`, normalised by ImageNet's mean and std,
//!   the full-size prediction's x, y, z. [`normal_bae_map`]: `((n + 1) * 0.5).clip(0, 1) * 255`
//!   truncated to u8, x, y, z as R, G, B. [`normal_bae_module`] removes the pad.

use std::path::Path;
use std::sync::Arc;

use candle_core::{Device, Module, Tensor};

use super::depth_anything::{bilinear, State};
use super::networks::{lllyasviel, AnnotatorFile};
use super::resize::Padded;
use crate::kernels::Conv2d;
use crate::pipeline::RgbImage;
use crate::Result;

mod efficientnet;
use efficientnet::{conv_bn, EfficientNet};

/// The file the extension loads the network from (`annotator/downloads/normal_bae/`).
pub const NORMAL_BAE_FILE: &str = "scannet.pt";

/// [`NormalBaeNetwork`]'s weights file, for an [`AnnotatorNetworks`](super::AnnotatorNetworks).
pub static NORMAL_BAE: AnnotatorFile = AnnotatorFile {
    name: NORMAL_BAE_FILE,
    subfolder: "normal_bae",
    hub: lllyasviel(NORMAL_BAE_FILE),
    load: |path| Ok(Arc::new(NormalBaeNetwork::load(path, &Device::Cpu)?)),
};

/// `nn.BatchNorm2d`'s default eps (the decoder's).
const BN_EPS: f64 = 1e-5;
/// `nn.LeakyReLU`'s default negative slope.
const LEAKY_SLOPE: f64 = 0.01;
/// `norm_normalize`'s `min_kappa` and the length's epsilon.
const MIN_KAPPA: f32 = 0.01;
const NORM_EPS: f32 = 1e-10;
/// The encoder stages the decoder reads (`features[4, 5, 6, 8]`: blocks 0, 1, 2 and 4).
const SKIPS: [usize; 4] = [0, 1, 2, 4];
/// `NormalBaeDetector`'s `transforms.Normalize` (ImageNet's).
const MEAN: [f32; 3] = [0.485, 0.456, 0.406];
const STD: [f32; 3] = [0.229, 0.224, 0.225];

/// `UpSampleBN`: two 3x3 convs (BN folded in), each followed by LeakyReLU.
struct UpSample([Conv2d; 2]);

impl UpSample {
    fn load(s: &State, key: &str, cin: usize) -> Result<Self> {
        let out = s.any(&format!("{key}._net.0.weight"))?.dim(0)?;
        let conv = |i: usize, bn: usize, cin: usize| -> Result<Conv2d> {
            let (w, b) = conv_bn(
                s,
                &format!("{key}._net.{i}"),
                &format!("{key}._net.{bn}"),
                [out, cin, 3, 3],
                true,
                BN_EPS,
            )?;
            Ok(Conv2d::new(w, Some(b), 1, 1))
        };
        Ok(Self([conv(0, 1, cin)?, conv(3, 4, out)?]))
    }

    fn out(&self) -> usize {
        self.0[0].weight().dims()[0]
    }

    fn forward(&self, x: &Tensor, skip: &Tensor) -> Result<Tensor> {
        let (_, _, h, w) = skip.dims4()?;
        let up = bilinear(x, h, w, true)?;
        let mut y = Tensor::cat(&[&up, skip], 1)?;
        for conv in &self.0 {
            y = leaky_relu(&conv.forward(&y)?)?;
        }
        Ok(y)
    }
}

fn leaky_relu(x: &Tensor) -> Result<Tensor> {
    if let Some(y) = crate::kernels::act::leaky_relu(x, LEAKY_SLOPE as f32)? {
        return Ok(y);
    }
    // max(x, 0) + slope * min(x, 0): `x > 0 ? x : x * slope`.
    Ok(x.maximum(0f32)?.add(&(x.minimum(0f32)? * LEAKY_SLOPE)?)?)
}

/// `norm_normalize` of a `[1, 4, H, W]` prediction (f32, as torch: the length
/// `sqrt(x^2 + y^2 + z^2) + 1e-10`, kappa `ELU + 1 + 0.01`).
fn norm_normalize(x: &Tensor) -> Result<Tensor> {
    let (_, c, h, w) = x.dims4()?;
    let v = x.flatten_all()?.to_vec1::<f32>()?;
    let n = h * w;
    let mut out = vec![0f32; c * n];
    for i in 0..n {
        let (a, b, z, k) = (v[i], v[n + i], v[2 * n + i], v[3 * n + i]);
        let len = (a.powi(2) + b.powi(2) + z.powi(2)).sqrt() + NORM_EPS;
        out[i] = a / len;
        out[n + i] = b / len;
        out[2 * n + i] = z / len;
        let elu = if k > 0.0 { k } else { k.exp_m1() };
        out[3 * n + i] = elu + 1.0 + MIN_KAPPA;
    }
    Ok(Tensor::from_vec(out, (1, c, h, w), x.device())?)
}

/// One level's per-pixel MLP (`out_conv_resN`: Conv1d k=1 layers, ReLU between).
struct Mlp(Vec<Conv2d>);

impl Mlp {
    fn load(s: &State, key: &str, cin: usize) -> Result<Self> {
        let mut layers = Vec::new();
        let mut width = cin;
        // nn.Sequential's indices: conv, ReLU, conv, ReLU, ..., the last conv.
        while let Some(w) = s.tensors.get(&format!("{key}.{}.weight", 2 * layers.len())) {
            let out = w.dim(0)?;
            let i = 2 * layers.len();
            let weight = s.get(&format!("{key}.{i}.weight"), &[out, width, 1])?;
            let bias = s.get(&format!("{key}.{i}.bias"), &[out])?;
            layers.push(Conv2d::new(weight.unsqueeze(3)?, Some(bias), 1, 0));
            width = out;
        }
        if width != 4 {
            return Err(s.bad(format!("{key} ends {width} wide, not 4 (x, y, z, kappa)")));
        }
        Ok(Self(layers))
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut y = x.clone();
        for (i, layer) in self.0.iter().enumerate() {
            y = layer.forward(&y)?;
            if i + 1 < self.0.len() {
                y = y.relu()?;
            }
        }
        Ok(y)
    }
}

/// `NNET(architecture='BN')` with its weights, on one device in f32.
pub struct NormalBaeNetwork {
    encoder: EfficientNet,
    conv2: Conv2d,
    up: [UpSample; 4],
    out_res8: Conv2d,
    /// out_conv_res4, res2, res1.
    mlps: [Mlp; 3],
}

impl std::fmt::Debug for NormalBaeNetwork {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NormalBaeNetwork")
            .field("encoder_widths", &self.encoder.widths)
            .finish_non_exhaustive()
    }
}

impl NormalBaeNetwork {
    /// The network of a `scannet.pt` (a torch pickle of `{'model': state_dict}` with
    /// DataParallel's `module.` prefixes, or a safetensors file of the same keys), onto
    /// `device` in f32.
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let s = State {
            path,
            tensors: crate::upscaler::read_state(path)?,
            device,
            what: "Bae normal (NNET)",
        };
        let encoder = EfficientNet::load(&s)?;
        let d = "decoder";
        let head = encoder.head_width;
        let f0 = s.any(&format!("{d}.conv2.weight"))?.dim(0)?;
        let conv2 = s.conv(&format!("{d}.conv2"), [f0, head, 1, 1], 1, true)?;
        let mut width = f0;
        let mut up = Vec::with_capacity(4);
        for (i, &skip) in SKIPS.iter().rev().enumerate() {
            let u = UpSample::load(
                &s,
                &format!("{d}.up{}", i + 1),
                width + encoder.widths[skip],
            )?;
            width = u.out();
            up.push(u);
        }
        let widths: Vec<usize> = up.iter().map(UpSample::out).collect();
        let out_res8 = s.conv(&format!("{d}.out_conv_res8"), [4, widths[1], 3, 3], 1, true)?;
        let mlp = |n: usize, w: usize| Mlp::load(&s, &format!("{d}.out_conv_res{n}"), w + 4);
        let mlps = [mlp(4, widths[1])?, mlp(2, widths[2])?, mlp(1, widths[3])?];
        let up: [UpSample; 4] = up.try_into().map_err(|_| s.bad("four up blocks".into()))?;
        Ok(Self {
            encoder,
            conv2,
            up,
            out_res8,
            mlps,
        })
    }

    /// `NNET.forward` of a normalised `[1, 3, H, W]` input (sides multiples of 8):
    /// `out_res1[:, :3]`, the `[1, 3, H', W']` normals (`H' = 2 * ceil(H / 2)`).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let features = self.encoder.forward(x)?;
        let head = features.last().expect("the head's output");
        let mut d = self.conv2.forward(head)?;
        // x_d1..x_d4: up1 meets block 4, up2 block 2, up3 block 1, up4 block 0.
        let mut levels = Vec::with_capacity(4);
        for (up, &skip) in self.up.iter().zip(SKIPS.iter().rev()) {
            d = up.forward(&d, &features[skip])?;
            levels.push(d.clone());
        }
        let mut pred = norm_normalize(&self.out_res8.forward(&levels[1])?)?;
        // res4 from x_d2, res2 from x_d3, res1 from x_d4.
        for (mlp, feat) in self.mlps.iter().zip(&levels[1..]) {
            let double = |t: &Tensor| -> Result<Tensor> {
                let (_, _, h, w) = t.dims4()?;
                bilinear(t, 2 * h, 2 * w, true)
            };
            let input = Tensor::cat(&[&double(feat)?, &double(&pred)?], 1)?;
            pred = norm_normalize(&mlp.forward(&input)?)?;
        }
        Ok(pred.narrow(1, 0, 3)?)
    }
}

/// `NormalBaeDetector.__call__`'s normals of the padded image: `/ 255.0`, `Normalize` (less
/// the mean, over the std, in f32), the network; `[3, H, W]` row-major.
pub fn normal_bae_normals(net: &NormalBaeNetwork, padded: &RgbImage) -> Result<Vec<f32>> {
    let (w, h) = (padded.width as usize, padded.height as usize);
    let mut input = Vec::with_capacity(3 * w * h);
    for c in 0..3 {
        input.extend(
            padded.pixels[c..]
                .iter()
                .step_by(3)
                .map(|&v| (f32::from(v) / 255.0 - MEAN[c]) / STD[c]),
        );
    }
    let device = net.conv2.weight().device();
    let x = Tensor::from_vec(input, (1, 3, h, w), device)?;
    let normals = net.forward(&x)?.flatten_all()?.to_device(&Device::Cpu)?;
    Ok(normals.to_vec1::<f32>()?)
}

/// The RGB map of `[3, H, W]` normals (`h * w` pixels): each of x, y, z as
/// `((n + 1) * 0.5).clip(0, 1)`, times 255, truncated.
pub fn normal_bae_map(normals: &[f32], w: usize, h: usize) -> Vec<u8> {
    let n = w * h;
    (0..n)
        .flat_map(|i| {
            (0..3).map(move |c| {
                let v = ((normals[c * n + i] + 1.0) * 0.5).clamp(0.0, 1.0);
                (v * 255.0).clamp(0.0, 255.0) as u8
            })
        })
        .collect()
}

/// normal_bae's map of the padded image, the pad removed.
pub fn normal_bae_module(net: &NormalBaeNetwork, padded: &Padded) -> Result<RgbImage> {
    let normals = normal_bae_normals(net, &padded.image)?;
    let (w, h) = (padded.image.width, padded.image.height);
    let map = Padded {
        image: RgbImage {
            width: w,
            height: h,
            pixels: normal_bae_map(&normals, w as usize, h as usize),
        },
        ..padded.clone()
    };
    Ok(map.crop_rgb())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn norm_normalize_makes_unit_normals_and_kappa_above_one() {
        let x = Tensor::from_vec(
            vec![3f32, 0.0, 4.0, 0.0, 0.0, 0.0, -2.0, 1.0],
            (1, 4, 1, 2),
            &Device::Cpu,
        )
        .unwrap();
        let y = norm_normalize(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        // Pixel 0: (3, 4, 0) / 5; kappa ELU(-2) + 1.01. Pixel 1: zero length, 1e-10 keeps it 0.
        assert_eq!([y[0], y[2], y[4]], [0.6, 0.8, 0.0]);
        assert_eq!([y[1], y[3], y[5]], [0.0, 0.0, 0.0]);
        assert!(
            (y[6] - ((-2f32).exp() - 1.0 + 1.01)).abs() < 1e-6,
            "{}",
            y[6]
        );
        assert_eq!(y[7], 1.0 + 1.0 + 0.01);
    }

    #[test]
    fn the_map_centres_zero_and_clips_the_ends() {
        // Planes x, y, z of two pixels: (-1, 0, 1), then (-3, 0.999, 5).
        let normals = [-1.0, -3.0, 0.0, 0.999, 1.0, 5.0];
        let map = normal_bae_map(&normals, 2, 1);
        assert_eq!(map, [0, 127, 255, 0, 254, 255]);
    }
}
