//! The extension's LeReS module (the legacy `leres` of `scripts/preprocessor/legacy/
//! processor.py` with `boost=False` = depth_leres; `annotator/leres/`: `__init__.py`'s
//! `apply_leres`, `leres/depthmap.py`'s `estimateleres`, `leres/network_auxi.py`,
//! `leres/Resnext_torch.py`, `leres/multi_depth_model_woauxi.py`).
//! - [`LeresNetwork`]: `RelDepthModel(backbone="resnext101")`'s `depth_model`: the ResNeXt-101
//!   32x8d encoder (`leres/resnext.rs`) and `network_auxi.Decoder`: `FTB` on the deepest
//!   features (a 3x3 conv and a ReLU, that plus a branch of 3x3 conv, BatchNorm, ReLU, 3x3
//!   conv, all through a ReLU), a 3x3 conv, a 2x bilinear resize with corners aligned,
//!   three `FFM`s (an `FTB` of the finer features plus the coarser, an `FTB`, the 2x resize)
//!   and `AO` (3x3 conv, BatchNorm, ReLU, 3x3 conv to one channel, the 2x resize). Widths are
//!   read from the file. The extension never calls the model's `eval()`: every BatchNorm
//!   normalises by the image's own per-channel mean and variance (training mode).
//! - [`leres_depth`] (`estimateleres`): the padded image with its channels reversed, each
//!   value `(v - mean) / std` with ImageNet's statistics in that (now B, G, R) order and no
//!   `/ 255` (torchvision's `ToTensor` scales only uint8 arrays; the extension hands it float
//!   values 0..255). Its `cv2.resize` to the image's own size and the cubic one back are
//!   copies: the padded image's sides are multiples of 64, the network's output its input's.
//! - [`depth_leres_map`]: the depth min-max scaled to 65535 in f32, truncated to 16 bits,
//!   `convertScaleAbs` to 8 bits (rounded), Remove Near (values not above the floor of its
//!   share of 255 zeroed), inverted, Remove Background (the same on the inverted map).

mod resnext;

use std::path::Path;
use std::sync::Arc;

use candle_core::{Device, Tensor};

use super::depth_anything::{bilinear, State};
use super::networks::{lllyasviel, AnnotatorFile};
use super::resize::Padded;
use crate::pipeline::RgbImage;
use crate::Result;
use resnext::{ConvBn, ResNext};

/// The file the extension loads LeReS from (`annotator/downloads/leres/`).
pub const LERES_FILE: &str = "res101.pth";

/// [`LeresNetwork`]'s weights file, for an [`AnnotatorNetworks`](super::AnnotatorNetworks).
pub static LERES: AnnotatorFile = AnnotatorFile {
    name: LERES_FILE,
    subfolder: "leres",
    hub: lllyasviel(LERES_FILE),
    load: |path| Ok(Arc::new(LeresNetwork::load(path, &Device::Cpu)?)),
};

/// `depthmap.py`'s `scale_torch`: `transforms.Normalize`'s ImageNet mean and std.
const MEAN: [f32; 3] = [0.485, 0.456, 0.406];
const STD: [f32; 3] = [0.229, 0.224, 0.225];
/// The network's coarsest features are 1/32 of its input.
const STRIDE: usize = 32;

/// `FTB`: `conv1`, then `conv_branch` (ReLU, conv, BatchNorm, ReLU, conv) added, a ReLU. The
/// branch's first ReLU is in place: `x + self.conv_branch(x)` adds the branch to the ReLU'd
/// `x`.
struct Ftb {
    conv1: ConvBn,
    branch: [ConvBn; 2],
}

impl Ftb {
    fn load(s: &State, key: &str, cin: usize) -> Result<Self> {
        let conv1 = ConvBn::load(s, &format!("{key}.conv1"), None, cin, 1, true)?;
        let mid = conv1.cout();
        let k = |n: &str| format!("{key}.conv_branch.{n}");
        let branch = [
            ConvBn::load(s, &k("1"), Some(&k("2")), mid, 1, true)?,
            ConvBn::load(s, &k("4"), None, mid, 1, true)?,
        ];
        Ok(Self { conv1, branch })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = self.conv1.forward(x)?.relu()?;
        let b = self.branch[0].forward(&x)?.relu()?;
        let b = self.branch[1].forward(&b)?;
        Ok((x + b)?.relu()?)
    }
}

/// `nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)`.
fn up2(x: &Tensor) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    bilinear(x, 2 * h, 2 * w, true)
}

/// `FFM`: `ftb1` of the finer features plus the coarser, `ftb2`, the 2x resize.
struct Ffm {
    ftb1: Ftb,
    ftb2: Ftb,
}

impl Ffm {
    fn load(s: &State, key: &str, cin: usize) -> Result<Self> {
        let ftb1 = Ftb::load(s, &format!("{key}.ftb1"), cin)?;
        let mid = ftb1.conv1.cout();
        Ok(Self {
            ftb1,
            ftb2: Ftb::load(s, &format!("{key}.ftb2"), mid)?,
        })
    }

    fn forward(&self, low: &Tensor, high: &Tensor) -> Result<Tensor> {
        let x = (self.ftb1.forward(low)? + high)?;
        up2(&self.ftb2.forward(&x)?)
    }
}

/// `RelDepthModel`'s `depth_model` with its weights, on one device in f32.
pub struct LeresNetwork {
    encoder: ResNext,
    /// `Decoder.conv` and `Decoder.conv1`.
    top: (Ftb, ConvBn),
    /// `ffm2`, `ffm1`, `ffm0`: from the 1/16 features to the 1/4.
    ffms: [Ffm; 3],
    /// `AO.adapt_conv`'s two convs (the first with its BatchNorm).
    out: [ConvBn; 2],
}

impl std::fmt::Debug for LeresNetwork {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeresNetwork")
            .field("encoder", &self.encoder.widths())
            .finish()
    }
}

impl LeresNetwork {
    /// Reads `res101.pth` (its `depth_model` dict, `module.` dropped; or a safetensors file of
    /// those keys) onto `device` in f32.
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let s = State {
            path,
            tensors: crate::upscaler::read_state_under(path, Some("depth_model"))?,
            device,
            what: "LeReS depth",
        };
        let encoder = ResNext::load(&s, "depth_model.encoder_modules.encoder")?;
        let widths = encoder.widths();
        let d = |n: &str| format!("depth_model.decoder_modules.{n}");
        let ftb = Ftb::load(&s, &d("conv"), widths[3])?;
        let conv1 = ConvBn::load(&s, &d("conv1"), None, ftb.conv1.cout(), 1, true)?;
        let ffms = [
            Ffm::load(&s, &d("ffm2"), widths[2])?,
            Ffm::load(&s, &d("ffm1"), widths[1])?,
            Ffm::load(&s, &d("ffm0"), widths[0])?,
        ];
        // Each level's sum needs the coarser level's width.
        let mut coarser = conv1.cout();
        for (ffm, name) in ffms.iter().zip(["ffm2", "ffm1", "ffm0"]) {
            if ffm.ftb1.conv1.cout() != coarser {
                return Err(s.bad(format!(
                    "{name} is {} wide, the level above {coarser}",
                    ffm.ftb1.conv1.cout()
                )));
            }
            coarser = ffm.ftb2.conv1.cout();
        }
        let a = |n: &str| d(&format!("outconv.adapt_conv.{n}"));
        let first = ConvBn::load(&s, &a("0"), Some(&a("1")), coarser, 1, true)?;
        let last = ConvBn::load(&s, &a("3"), None, first.cout(), 1, true)?;
        if last.cout() != 1 {
            return Err(s.bad(format!("the output has {} channels, not 1", last.cout())));
        }
        Ok(Self {
            encoder,
            top: (ftb, conv1),
            ffms,
            out: [first, last],
        })
    }

    /// `DepthModel.forward` on a normalised `[1, 3, H, W]` input (sides multiples of 32).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let f = self.encoder.forward(x)?;
        let mut x = up2(&self.top.1.forward(&self.top.0.forward(&f[3])?)?)?;
        for (ffm, low) in self.ffms.iter().zip([&f[2], &f[1], &f[0]]) {
            x = ffm.forward(low, &x)?;
        }
        let x = self.out[0].forward(&x)?.relu()?;
        up2(&self.out[1].forward(&x)?)
    }
}

/// `estimateleres` on the padded image: the depth, row by row at the image's size.
pub fn leres_depth(net: &LeresNetwork, padded: &RgbImage) -> Result<Vec<f32>> {
    let (w, h) = (padded.width as usize, padded.height as usize);
    if w % STRIDE != 0 || h % STRIDE != 0 {
        return Err(crate::PipelineError::InvalidRequest(format!(
            "LeReS takes sides that are multiples of {STRIDE}, not {w}x{h}"
        )));
    }
    let mut input = vec![0f32; 3 * w * h];
    for (c, plane) in input.chunks_exact_mut(w * h).enumerate() {
        // `img[:, :, ::-1]`: the tensor's first channel is the image's last.
        for (v, p) in plane.iter_mut().zip(padded.pixels.chunks_exact(3)) {
            *v = (f32::from(p[2 - c]) - MEAN[c]) / STD[c];
        }
    }
    let device = net.top.1.device();
    let x = Tensor::from_vec(input, (1, 3, h, w), device)?;
    let depth = net.forward(&x)?.flatten_all()?.to_device(&Device::Cpu)?;
    Ok(depth.to_vec1::<f32>()?)
}

/// OpenCV's `THRESH_TOZERO` at `percent` of 255 on 8-bit values: kept where above the floor
/// of the threshold, else 0 (`apply_leres` skips it at 0).
fn to_zero(map: &mut [u8], percent: f64) {
    if percent == 0.0 {
        return;
    }
    let t = (percent / 100.0 * 255.0).floor();
    for v in map {
        if f64::from(*v) <= t {
            *v = 0;
        }
    }
}

/// `apply_leres`'s map of the depth: Remove Near `near` and Remove Background `background`
/// (percent, 0 for off).
pub fn depth_leres_map(depth: &[f32], near: f64, background: f64) -> Vec<u8> {
    let lo = depth.iter().fold(f32::INFINITY, |m, &v| m.min(v));
    let hi = depth.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let range = hi - lo;
    // convertScaleAbs's alpha, as the float its kernel multiplies by.
    let alpha = (255.0f64 / 65535.0) as f32;
    let mut map: Vec<u8> = depth
        .iter()
        .map(|&v| {
            let wide = match f64::from(range) > f64::EPSILON {
                true => (65535.0 * (v - lo) / range) as u16,
                false => 0,
            };
            (f32::from(wide) * alpha).round_ties_even().min(255.0) as u8
        })
        .collect();
    to_zero(&mut map, near);
    for v in &mut map {
        *v = !*v;
    }
    to_zero(&mut map, background);
    map
}

/// depth_leres's map of the padded image, the pad removed.
pub fn leres_module(
    net: &LeresNetwork,
    padded: &Padded,
    near: f64,
    background: f64,
) -> Result<RgbImage> {
    let depth = leres_depth(net, &padded.image)?;
    Ok(padded.crop_gray_to_rgb(&depth_leres_map(&depth, near, background)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flat_depth_is_white() {
        // No range: 0, inverted.
        assert!(depth_leres_map(&[2.0; 6], 0.0, 0.0)
            .iter()
            .all(|&v| v == 255));
    }

    #[test]
    fn the_map_is_inverted_and_thresholded_before_and_after() {
        // 0, 1/3, 2/3, 1 of the range: 0, 85, 170, 255, inverted 255, 170, 85, 0.
        let depth = [1.0f32, 2.0, 3.0, 4.0];
        assert_eq!(depth_leres_map(&depth, 0.0, 0.0), [255, 170, 85, 0]);
        // Near 33.4% = 85.17: 0 and 85 are not above 85, zeroed before inverting (255).
        assert_eq!(depth_leres_map(&depth, 33.4, 0.0), [255, 255, 85, 0]);
        // Background 66.7% = 170.08 on the inverted map: 170 and below zeroed.
        assert_eq!(depth_leres_map(&depth, 0.0, 66.7), [255, 0, 0, 0]);
        assert_eq!(depth_leres_map(&depth, 100.0, 100.0), [0, 0, 0, 0]);
    }
}
