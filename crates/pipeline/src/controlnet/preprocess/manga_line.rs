//! The extension's `lineart_anime_denoise` (`annotator/manga_line/__init__.py`, the legacy
//! `lineart_anime_denoise` of `scripts/preprocessor/legacy/processor.py`):
//! - [`MangaLineNetwork`]: its `res_skip`, a residual U-Net on the grey image: encoder blocks
//!   0..=4 (block 0 at full size, each of 1..=4 halving the size in its last unit), decoder
//!   blocks 5..=8 (each doubling the size, nearest, in its first unit), each decoder's output
//!   plus the encoder's of the same size (`res1..res4`), block 9 and a 1x1 conv to one
//!   channel. Every unit is two `BatchNorm2d(eps=1e-3)` (eval: the running statistics) ->
//!   LeakyReLU(0.2) -> conv steps plus a shortcut (a 1x1 conv where the width or size
//!   changes). The widths (24 .. 384) and the units per block are read from the weights; the
//!   eps, the slope and which unit resamples are the class's (not in the file).
//! - [`manga_line_map`]: `MangaLineExtration.__call__` on the padded image: OpenCV's
//!   `RGB2GRAY`, the grey values (0..=255, not scaled) in, `255 - line` clipped and truncated
//!   to u8 out. The legacy function keeps that as the map (no second inversion).

use std::path::Path;
use std::sync::Arc;

use candle_core::{Device, Module, Tensor};

use super::lineart::Weights;
use super::networks::{lllyasviel, AnnotatorFile};
use crate::kernels::Conv2d;
use crate::pipeline::RgbImage;
use crate::Result;

/// The file `lineart_anime_denoise` loads (the extension's `models/manga_line/`).
pub const MANGA_LINE_FILE: &str = "erika.pth";

/// [`MangaLineNetwork`]'s file, for an [`AnnotatorNetworks`](super::AnnotatorNetworks).
pub static MANGA_LINE: AnnotatorFile = AnnotatorFile {
    name: MANGA_LINE_FILE,
    subfolder: "manga_line",
    hub: lllyasviel(MANGA_LINE_FILE),
    load: |path| Ok(Arc::new(MangaLineNetwork::load(path, &Device::Cpu)?)),
};

const RES_SKIP: &str = "manga_line res_skip";
/// `nn.BatchNorm2d(in_filters, eps=1e-3)` in `_bn_relu_conv` / `_u_bn_relu_conv`.
const BN_EPS: f64 = 1e-3;
/// `nn.LeakyReLU(0.2)` there.
const SLOPE: f64 = 0.2;

/// `_bn_relu_conv`: the eval-mode batch norm as a per-channel scale and shift, the LeakyReLU,
/// the conv (zero padding `k / 2`).
struct BnReluConv {
    scale: Tensor,
    shift: Tensor,
    conv: Conv2d,
}

impl BnReluConv {
    fn load(wts: &Weights, key: &str, input: usize, k: usize, stride: usize) -> Result<Self> {
        let bn = |name: &str| -> Result<Tensor> {
            let t = wts.get(&format!("{key}.0.{name}"), 1, RES_SKIP)?;
            if t.dims() != [input] {
                return Err(wts.bad(format!("{key}.0.{name} has shape {:?}", t.dims())));
            }
            Ok(t)
        };
        let (weight, bias) = (bn("weight")?, bn("bias")?);
        let (mean, var) = (bn("running_mean")?, bn("running_var")?);
        let scale = (weight / (var + BN_EPS)?.sqrt()?)?;
        let shift = (bias - (mean * &scale)?)?;
        let (conv, _) = wts.conv(&format!("{key}.2"), input, k, stride, k / 2, RES_SKIP)?;
        Ok(Self {
            scale: scale.reshape((1, input, 1, 1))?,
            shift: shift.reshape((1, input, 1, 1))?,
            conv,
        })
    }

    fn out(&self) -> usize {
        self.conv.weight().dims()[0]
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = x.broadcast_mul(&self.scale)?.broadcast_add(&self.shift)?;
        let x = x.maximum(&(&x * SLOPE)?)?;
        Ok(self.conv.forward(&x)?)
    }
}

/// `basic_block` / `_u_basic_block`: `residual(conv1(x))` plus the shortcut (`x`, or its 1x1
/// conv), both doubled (nearest) after their convs in an upsampling unit.
struct Unit {
    conv1: BnReluConv,
    residual: BnReluConv,
    shortcut: Option<Conv2d>,
    up: bool,
}

impl Unit {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self
            .residual
            .forward(&double(self.conv1.forward(x)?, self.up)?)?;
        let s = match &self.shortcut {
            Some(conv) => double(conv.forward(x)?, self.up)?,
            None => x.clone(),
        };
        Ok((s + y)?)
    }
}

fn double(x: Tensor, up: bool) -> Result<Tensor> {
    if !up {
        return Ok(x);
    }
    let (_, _, h, w) = x.dims4()?;
    Ok(x.upsample_nearest2d(2 * h, 2 * w)?)
}

/// Where a block resamples: `_residual_block` halves in its last unit (not with
/// `is_first_layer`), `_upsampling_residual_block` doubles in its first.
#[derive(Clone, Copy, PartialEq)]
enum Resample {
    None,
    Half,
    Double,
}

/// A block's units; its output width.
fn block(wts: &Weights, b: usize, input: usize, resample: Resample) -> Result<(Vec<Unit>, usize)> {
    let units = (0..)
        .take_while(|i| wts.has(&format!("block{b}.model.{i}.conv1.model.2.weight")))
        .count();
    if units == 0 {
        return Err(wts.bad(format!(
            "block{b}.model.0.conv1.model.2.weight is missing (not a {RES_SKIP} network)"
        )));
    }
    let mut c = input;
    let mut out = Vec::with_capacity(units);
    for i in 0..units {
        let p = format!("block{b}.model.{i}");
        let stride = if resample == Resample::Half && i == units - 1 {
            2
        } else {
            1
        };
        let up = resample == Resample::Double && i == 0;
        let conv1 = BnReluConv::load(wts, &format!("{p}.conv1.model"), c, 3, stride)?;
        let n = conv1.out();
        let residual = BnReluConv::load(wts, &format!("{p}.residual.model"), n, 3, 1)?;
        if residual.out() != n {
            return Err(wts.bad(format!(
                "{p}.residual makes {} channels, not {n}",
                residual.out()
            )));
        }
        let key = format!("{p}.shortcut.model.0");
        let shortcut = if wts.has(&format!("{key}.weight")) {
            let (conv, m) = wts.conv(&key, c, 1, stride, 0, RES_SKIP)?;
            if m != n {
                return Err(wts.bad(format!("{key} makes {m} channels, not {n}")));
            }
            Some(conv)
        } else if c != n || stride != 1 || up {
            return Err(wts.bad(format!("{key} is missing: {p} changes its input's shape")));
        } else {
            None
        };
        out.push(Unit {
            conv1,
            residual,
            shortcut,
            up,
        });
        c = n;
    }
    Ok((out, c))
}

/// The `res_skip` of `annotator/manga_line` with its weights, on one device in f32.
pub struct MangaLineNetwork {
    /// `block0` ..= `block9`.
    blocks: Vec<Vec<Unit>>,
    /// `res1` ..= `res4`: the encoder's output added to the decoder's (through a 1x1 conv
    /// where their widths differ; not in `res_skip`'s own widths).
    res: Vec<Option<Conv2d>>,
    conv15: BnReluConv,
    widths: Vec<usize>,
}

impl std::fmt::Debug for MangaLineNetwork {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MangaLineNetwork")
            .field("widths", &self.widths)
            .field("units", &self.units())
            .finish()
    }
}

impl MangaLineNetwork {
    /// The network of an `erika.pth` (a torch pickle, read without running it; a `module.`
    /// prefix dropped as the extension drops it) or a `.safetensors` file of the same names,
    /// onto `device` in f32.
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let wts = Weights::read(path, device)?;
        let mut blocks = Vec::with_capacity(10);
        let mut widths = Vec::with_capacity(10);
        let mut res = Vec::with_capacity(4);
        let mut c = 1;
        for b in 0..=9 {
            let resample = match b {
                1..=4 => Resample::Half,
                5..=8 => Resample::Double,
                _ => Resample::None,
            };
            let (units, out) = block(&wts, b, c, resample)?;
            blocks.push(units);
            widths.push(out);
            c = out;
            if (5..=8).contains(&b) {
                // res(b - 4): the encoder's block (8 - b) output onto this one's.
                let key = format!("res{}.model.0", b - 4);
                let skip = widths[8 - b];
                res.push(if wts.has(&format!("{key}.weight")) {
                    let (conv, m) = wts.conv(&key, skip, 1, 1, 0, RES_SKIP)?;
                    if m != out {
                        return Err(wts.bad(format!("{key} makes {m} channels, not {out}")));
                    }
                    Some(conv)
                } else if skip != out {
                    return Err(wts.bad(format!("{key} is missing: {skip} onto {out} channels")));
                } else {
                    None
                });
            }
        }
        let conv15 = BnReluConv::load(&wts, "conv15.model", c, 1, 1)?;
        if conv15.out() != 1 {
            return Err(wts.bad(format!("conv15 makes {} channels, not 1", conv15.out())));
        }
        Ok(Self {
            blocks,
            res,
            conv15,
            widths,
        })
    }

    /// Each block's output width (24, 48, 96, 192, 384, 192, 96, 48, 24, 16 in `erika.pth`).
    pub fn widths(&self) -> &[usize] {
        &self.widths
    }

    /// The units of each block (2, 3, 5, 7, 12, 7, 5, 3, 2, 2 in `erika.pth`).
    pub fn units(&self) -> Vec<usize> {
        self.blocks.iter().map(Vec::len).collect()
    }

    /// The side multiple the network needs (each of the four halvings must be exact for the
    /// decoder's sizes to meet the encoder's): 16.
    pub fn multiple(&self) -> usize {
        16
    }

    /// The network's output on a `width` x `height` grey image (its sides multiples of
    /// [`Self::multiple`]), one value per pixel (the line, about 0..255 with lines dark).
    pub fn line(&self, grey: &[u8], width: usize, height: usize) -> Result<Vec<f32>> {
        let m = self.multiple();
        if !width.is_multiple_of(m) || !height.is_multiple_of(m) || grey.len() != width * height {
            return Err(crate::PipelineError::InvalidRequest(format!(
                "{RES_SKIP} needs sides that are multiples of {m} (got {width}x{height})"
            )));
        }
        let device = self.conv15.conv.weight().device();
        let values: Vec<f32> = grey.iter().map(|&v| f32::from(v)).collect();
        let x = Tensor::from_vec(values, (1, 1, height, width), device)?;
        let run = |units: &[Unit], x: Tensor| -> Result<Tensor> {
            units.iter().try_fold(x, |x, u| u.forward(&x))
        };
        let mut encoded = Vec::with_capacity(5);
        let mut h = x;
        for units in &self.blocks[..5] {
            h = run(units, h)?;
            encoded.push(h.clone());
        }
        for (k, units) in self.blocks[5..9].iter().enumerate() {
            let y = run(units, h)?;
            let skip = &encoded[3 - k];
            h = match &self.res[k] {
                Some(conv) => (conv.forward(skip)? + y)?,
                None => (skip + y)?,
            };
        }
        let y = self.conv15.forward(&run(&self.blocks[9], h)?)?;
        Ok(y.flatten_all()?.to_vec1::<f32>()?)
    }
}

/// OpenCV's `cvtColor(RGB2GRAY)` of an 8-bit image: 0.299 R + 0.587 G + 0.114 B in its
/// 8-bit fixed point (15 fractional bits, the weights summing to 2^15, rounded); the 14-bit
/// one of its YUV code differs in values near .5 (31 of the fixture's 36864).
pub fn rgb_to_grey(image: &RgbImage) -> Vec<u8> {
    image
        .pixels
        .chunks_exact(3)
        .map(|p| {
            let [r, g, b] = [p[0], p[1], p[2]].map(u32::from);
            ((r * 9798 + g * 19235 + b * 3735 + (1 << 14)) >> 15) as u8
        })
        .collect()
}

/// The legacy `lineart_anime_denoise` on the padded image: `255 - line`, clipped, truncated.
pub fn manga_line_map(net: &MangaLineNetwork, padded: &RgbImage) -> Result<Vec<u8>> {
    let (w, h) = (padded.width as usize, padded.height as usize);
    Ok(net
        .line(&rgb_to_grey(padded), w, h)?
        .into_iter()
        .map(|v| (255.0 - v).clamp(0.0, 255.0) as u8)
        .collect())
}
