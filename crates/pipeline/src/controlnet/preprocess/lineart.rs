//! The extension's lineart networks (`annotator/lineart/__init__.py`, the legacy `lineart`
//! (`lineart_realistic`) and `lineart_coarse` of `scripts/preprocessor/legacy/processor.py`):
//! - [`LineartNetwork`]: its `Generator(3, 1, 3)`, a CycleGAN-style generator: a 7x7 conv
//!   after a reflection pad of 3, two stride-2 3x3 convs, residual blocks (reflection pad,
//!   3x3 conv, twice), two stride-2 transposed 3x3 convs, a 7x7 conv to one channel and the
//!   sigmoid; every conv but the last followed by an `InstanceNorm2d` without weights (eps
//!   1e-5) and ReLU. The widths (64, 128, 256 in `sk_model.pth` and `sk_model2.pth`) and the
//!   number of residual blocks (3) are read from the weights.
//! - [`lineart_map`]: `LineartDetector.__call__` on the padded image (RGB / 255), the line
//!   times 255, clipped, truncated to u8, then the legacy functions' `255 - line`.
//!
//! The shared layers (reflection pad, instance norm, transposed conv) are here too, for the
//! anime network of `lineart_anime`.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Module, Tensor};

use super::networks::{lllyasviel, AnnotatorFile};
use crate::kernels::Conv2d;
use crate::pipeline::RgbImage;
use crate::{PipelineError, Result};

/// The file `lineart_realistic` (the extension's `lineart`) loads (`annotator/downloads/lineart/`).
pub const LINEART_FILE: &str = "sk_model.pth";
/// The file `lineart_coarse` loads, beside [`LINEART_FILE`].
pub const LINEART_COARSE_FILE: &str = "sk_model2.pth";

/// [`LineartNetwork`]'s file for `lineart_realistic`, for an
/// [`AnnotatorNetworks`](super::AnnotatorNetworks).
pub static LINEART: AnnotatorFile = AnnotatorFile {
    name: LINEART_FILE,
    subfolder: "lineart",
    hub: lllyasviel(LINEART_FILE),
    load: |path| Ok(Arc::new(LineartNetwork::load(path, &Device::Cpu)?)),
};

/// [`LineartNetwork`]'s file for `lineart_coarse`.
pub static LINEART_COARSE: AnnotatorFile = AnnotatorFile {
    name: LINEART_COARSE_FILE,
    subfolder: "lineart",
    hub: lllyasviel(LINEART_COARSE_FILE),
    load: |path| Ok(Arc::new(LineartNetwork::load(path, &Device::Cpu)?)),
};

/// A state dict read by [`crate::upscaler::read_state`], its tensors taken by name onto a
/// device in f32; errors name the file.
pub(super) struct Weights<'a> {
    pub path: &'a Path,
    pub state: HashMap<String, Tensor>,
    pub device: &'a Device,
}

impl<'a> Weights<'a> {
    pub fn read(path: &'a Path, device: &'a Device) -> Result<Self> {
        Ok(Self {
            path,
            state: crate::upscaler::read_state(path)?,
            device,
        })
    }

    pub fn bad(&self, message: String) -> PipelineError {
        PipelineError::Weights {
            path: self.path.to_path_buf(),
            message,
        }
    }

    pub fn has(&self, key: &str) -> bool {
        self.state.contains_key(key)
    }

    /// The tensor `key`, of `rank` dimensions; `what` names the network in the error.
    pub fn get(&self, key: &str, rank: usize, what: &str) -> Result<Tensor> {
        let t = self
            .state
            .get(key)
            .ok_or_else(|| self.bad(format!("{key} is missing (not a {what} network)")))?;
        if t.rank() != rank {
            return Err(self.bad(format!("{key} has shape {:?}", t.dims())));
        }
        Ok(t.to_dtype(DType::F32)?.to_device(self.device)?)
    }

    /// A conv's weight `[out, in, k, k]` from `input` channels with its bias; its out channels.
    pub fn conv(
        &self,
        key: &str,
        input: usize,
        k: usize,
        stride: usize,
        padding: usize,
        what: &str,
    ) -> Result<(Conv2d, usize)> {
        let weight = self.get(&format!("{key}.weight"), 4, what)?;
        let bias = self.get(&format!("{key}.bias"), 1, what)?;
        match *weight.dims() {
            [out, c, kh, kw] if c == input && (kh, kw) == (k, k) && bias.dims() == [out] => Ok((
                Conv2d::new(weight, Some(bias), stride, padding),
                out,
            )),
            ref d => Err(self.bad(format!(
                "{key}.weight has shape {d:?} (bias {:?}); the layer needs a {k}x{k} conv from {input} channels",
                bias.dims()
            ))),
        }
    }

    /// A `ConvTranspose2d`'s weight `[in, out, k, k]` from `input` channels with its bias.
    pub fn conv_transpose(
        &self,
        key: &str,
        input: usize,
        k: usize,
        padding: usize,
        output_padding: usize,
        what: &str,
    ) -> Result<(ConvTranspose, usize)> {
        let weight = self.get(&format!("{key}.weight"), 4, what)?;
        let bias = self.get(&format!("{key}.bias"), 1, what)?;
        match *weight.dims() {
            [c, out, kh, kw] if c == input && (kh, kw) == (k, k) && bias.dims() == [out] => Ok((
                ConvTranspose::new(&weight, bias, padding, output_padding)?,
                out,
            )),
            ref d => Err(self.bad(format!(
                "{key}.weight has shape {d:?} (bias {:?}); the layer needs a {k}x{k} transposed conv from {input} channels",
                bias.dims()
            ))),
        }
    }
}

/// `ConvTranspose2d(stride=2)` as four stride-1 convs, one per output phase (row and column
/// parity), interleaved: output `2m + r` takes only the kernel taps of parity `r + padding`, so
/// each phase is a plain conv of the input with those taps, and the fast conv kernels do a
/// quarter of the work of a conv over the input spread with zeros (which is what it was).
pub(super) struct ConvTranspose {
    /// Per phase `(ry, rx)` (index `2 * ry + rx`): its conv, and along each axis the zeros
    /// before the input and the first padded row/column it reads.
    phases: Vec<(Conv2d, [PhaseAxis; 2])>,
    k: usize,
    padding: usize,
    output_padding: usize,
}

/// One axis of one phase: the input offset of its first tap (`d0`: output `m` reads inputs
/// `m + d0 ..`) and how many taps it has.
#[derive(Clone, Copy)]
struct PhaseAxis {
    d0: isize,
    taps: usize,
}

/// The taps `kk` of a stride-2 transposed conv that reach outputs of parity `r`, by increasing
/// input offset `(r + padding - kk) / 2`.
fn phase_taps(k: usize, padding: usize, r: usize) -> Vec<usize> {
    (0..k)
        .rev()
        .filter(|kk| (r + padding + kk).is_multiple_of(2))
        .collect()
}

impl ConvTranspose {
    pub(super) fn new(
        weight: &Tensor,
        bias: Tensor,
        padding: usize,
        output_padding: usize,
    ) -> Result<Self> {
        let (cin, cout, k, _) = weight.dims4()?;
        let w = weight
            .to_device(&Device::Cpu)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let mut phases = Vec::with_capacity(4);
        for (ry, rx) in [(0, 0), (0, 1), (1, 0), (1, 1)] {
            let (ty, tx) = (phase_taps(k, padding, ry), phase_taps(k, padding, rx));
            // [in, out, k, k] -> [out, in, ty, tx], taps in increasing input offset.
            let mut pw = vec![0f32; cout * cin * ty.len() * tx.len()];
            for o in 0..cout {
                for i in 0..cin {
                    for (u, &ky) in ty.iter().enumerate() {
                        for (v, &kx) in tx.iter().enumerate() {
                            pw[((o * cin + i) * ty.len() + u) * tx.len() + v] =
                                w[((i * cout + o) * k + ky) * k + kx];
                        }
                    }
                }
            }
            let pw = Tensor::from_vec(pw, (cout, cin, ty.len(), tx.len()), weight.device())?;
            let axis = |r: usize, taps: &[usize]| PhaseAxis {
                d0: (r + padding) as isize / 2 - taps[0] as isize / 2,
                taps: taps.len(),
            };
            let axes = [axis(ry, &ty), axis(rx, &tx)];
            phases.push((Conv2d::new(pw, Some(bias.clone()), 1, 0), axes));
        }
        Ok(Self {
            phases,
            k,
            padding,
            output_padding,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let size = |n: usize| 2 * (n - 1) + self.k + self.output_padding - 2 * self.padding;
        let (oh, ow) = (size(h), size(w));
        // Every phase computes ceil(out / 2) rows and columns; the interleave is cropped.
        let (mh, mw) = (oh.div_ceil(2), ow.div_ceil(2));
        let mut ys = Vec::with_capacity(4);
        for (conv, [ay, ax]) in &self.phases {
            // Input rows d0 .. d0 + m + taps - 1, zeros outside the image.
            let window = |x: Tensor, dim: usize, n: usize, m: usize, a: PhaseAxis| {
                let before = (-a.d0).max(0) as usize;
                let end = a.d0 + (m + a.taps - 1) as isize;
                let after = (end - n as isize).max(0) as usize;
                let x = x.pad_with_zeros(dim, before, after)?;
                x.narrow(dim, (a.d0 + before as isize) as usize, m + a.taps - 1)
            };
            let xp = window(x.clone(), 2, h, mh, *ay)?;
            let xp = window(xp, 3, w, mw, *ax)?;
            ys.push(conv.forward(&xp)?);
        }
        // [n, c, mh, mw] x 4 -> columns interleaved per row parity, then the rows.
        let (n, c) = (ys[0].dim(0)?, ys[0].dim(1)?);
        let row = |a: &Tensor, b: &Tensor| -> candle_core::Result<Tensor> {
            Tensor::stack(&[a, b], 4)?.reshape((n, c, mh, 2 * mw))
        };
        let (even, odd) = (row(&ys[0], &ys[1])?, row(&ys[2], &ys[3])?);
        let y = Tensor::stack(&[&even, &odd], 3)?.reshape((n, c, 2 * mh, 2 * mw))?;
        Ok(y.narrow(2, 0, oh)?.narrow(3, 0, ow)?)
    }
}

/// `nn.ReflectionPad2d(p)`: the edge rows and columns mirrored, the edge itself not repeated.
pub(super) fn reflection_pad(x: &Tensor, p: usize) -> Result<Tensor> {
    let indices = |n: usize| -> Result<Tensor> {
        let idx: Vec<u32> = (0..n + 2 * p)
            .map(|i| {
                let i = i as isize - p as isize;
                let r = if i < 0 {
                    -i
                } else if i >= n as isize {
                    2 * (n as isize - 1) - i
                } else {
                    i
                };
                r as u32
            })
            .collect();
        Ok(Tensor::new(idx, x.device())?)
    };
    let (_, _, h, w) = x.dims4()?;
    Ok(x.contiguous()?
        .index_select(&indices(h)?, 2)?
        .index_select(&indices(w)?, 3)?)
}

/// `InstanceNorm2d` without weights or running statistics (eps 1e-5): each channel of each
/// image to mean 0, (biased) variance 1.
pub(super) fn instance_norm(x: &Tensor) -> Result<Tensor> {
    plane_norm(x, None)
}

/// `BatchNorm2d` in training mode (eps 1e-5) on a one-image batch: each channel normalised
/// by its own mean and (biased) variance, as [`instance_norm`], then times `weight` plus
/// `bias` (torch's CPU kernel: `alpha = invstd * weight`, `beta = bias - mean * alpha`, in f32).
/// The running statistics are not read (LeReS's network is never put in eval mode).
pub(super) fn batch_norm_of_batch(x: &Tensor, weight: &[f32], bias: &[f32]) -> Result<Tensor> {
    let (n, c, _, _) = x.dims4()?;
    if n != 1 || weight.len() != c || bias.len() != c {
        return Err(crate::PipelineError::InvalidRequest(format!(
            "batch norm of {n} images of {c} channels with {} weights",
            weight.len()
        )));
    }
    plane_norm(x, Some((weight, bias)))
}

fn plane_norm(x: &Tensor, affine: Option<(&[f32], &[f32])>) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    if x.dtype() == DType::F32 && x.device().is_cpu() && h * w > 0 {
        let mut v = x.flatten_all()?.to_vec1::<f32>()?;
        instance_norm_f32(&mut v, h * w, affine);
        return Ok(Tensor::from_vec(v, (n, c, h, w), &Device::Cpu)?);
    }
    let flat = x.reshape((n, c, h * w))?;
    let mean = flat.mean_keepdim(2)?;
    let centred = flat.broadcast_sub(&mean)?;
    let var = centred.sqr()?.mean_keepdim(2)?;
    let y = centred.broadcast_div(&(var + 1e-5)?.sqrt()?)?;
    let y = match affine {
        Some((weight, bias)) => {
            let t = |v: &[f32]| Tensor::from_slice(v, (1, c, 1), x.device());
            y.broadcast_mul(&t(weight)?)?.broadcast_add(&t(bias)?)?
        }
        None => y,
    };
    Ok(y.reshape((n, c, h, w))?)
}

/// [`instance_norm`] in place on each `plane` values, in parallel, with torch's CPU arithmetic
/// (its training-mode batch norm, which InstanceNorm2d runs): mean and biased variance summed
/// in f64 (two passes), mean and `1 / sqrt(var + eps)` rounded to f32, then
/// `x * invstd + (-mean * invstd)` in f32 (candle's ops made six passes on one thread); with
/// `affine`, the plane's channel's weight and bias folded into those two factors first.
fn instance_norm_f32(values: &mut [f32], plane: usize, affine: Option<(&[f32], &[f32])>) {
    use rayon::prelude::*;
    values.par_chunks_mut(plane).enumerate().for_each(|(i, p)| {
        let n = p.len() as f64;
        let mean = p.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
        let var = p
            .iter()
            .map(|&v| (f64::from(v) - mean) * (f64::from(v) - mean))
            .sum::<f64>()
            / n;
        let invstd = (1.0 / (var + 1e-5).sqrt()) as f32;
        let (alpha, beta) = match affine {
            Some((weight, bias)) => {
                let c = i % weight.len();
                let alpha = invstd * weight[c];
                (alpha, bias[c] - mean as f32 * alpha)
            }
            None => (invstd, -(mean as f32) * invstd),
        };
        for v in p {
            *v = *v * alpha + beta;
        }
    });
}

/// `ResidualBlock`: `x` plus two reflection-padded 3x3 convs, each instance-normed (ReLU
/// between).
struct Residual {
    first: Conv2d,
    second: Conv2d,
}

/// The `Generator(3, 1, n)` of `annotator/lineart` with its weights, on one device in f32.
pub struct LineartNetwork {
    head: Conv2d,
    down: Vec<Conv2d>,
    residuals: Vec<Residual>,
    up: Vec<ConvTranspose>,
    tail: Conv2d,
}

impl std::fmt::Debug for LineartNetwork {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LineartNetwork")
            .field("widths", &self.widths())
            .field("residual_blocks", &self.residuals.len())
            .finish()
    }
}

const GENERATOR: &str = "lineart Generator";

impl LineartNetwork {
    /// The network of an `sk_model.pth` / `sk_model2.pth` (a torch pickle, read without
    /// running it) or a `.safetensors` file of the same names, onto `device` in f32.
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let wts = Weights::read(path, device)?;
        let (head, mut c) = wts.conv("model0.1", 3, 7, 1, 0, GENERATOR)?;
        let mut down = Vec::with_capacity(2);
        for key in ["model1.0", "model1.3"] {
            let (conv, out) = wts.conv(key, c, 3, 2, 1, GENERATOR)?;
            down.push(conv);
            c = out;
        }
        let mut residuals = Vec::new();
        while wts.has(&format!("model2.{}.conv_block.1.weight", residuals.len())) {
            let key = format!("model2.{}.conv_block", residuals.len());
            let (first, a) = wts.conv(&format!("{key}.1"), c, 3, 1, 0, GENERATOR)?;
            let (second, b) = wts.conv(&format!("{key}.5"), a, 3, 1, 0, GENERATOR)?;
            if (a, b) != (c, c) {
                return Err(wts.bad(format!("{key} changes the width {c} (to {a}, {b})")));
            }
            residuals.push(Residual { first, second });
        }
        let mut up = Vec::with_capacity(2);
        for key in ["model3.0", "model3.3"] {
            let (conv, out) = wts.conv_transpose(key, c, 3, 1, 1, GENERATOR)?;
            up.push(conv);
            c = out;
        }
        let (tail, out) = wts.conv("model4.1", c, 7, 1, 0, GENERATOR)?;
        if out != 1 {
            return Err(wts.bad(format!("model4.1 makes {out} channels, not 1")));
        }
        Ok(Self {
            head,
            down,
            residuals,
            up,
            tail,
        })
    }

    /// The widths: the head's, after each downsampling (64, 128, 256 for the extension's files).
    pub fn widths(&self) -> Vec<usize> {
        std::iter::once(&self.head)
            .chain(&self.down)
            .map(|c| c.weight().dims()[0])
            .collect()
    }

    /// The sigmoid line of `image` (its sides multiples of 4, as the padded image's are), one
    /// value per pixel in 0..=1.
    pub fn line(&self, image: &RgbImage) -> Result<Vec<f32>> {
        let x = image_tensor(image, self.head.weight().device(), |v| v / 255.0)?;
        let block = |x: Tensor, conv: &Conv2d| -> Result<Tensor> {
            Ok(instance_norm(&conv.forward(&x)?)?.relu()?)
        };
        let mut x = block(reflection_pad(&x, 3)?, &self.head)?;
        for conv in &self.down {
            x = block(x, conv)?;
        }
        for r in &self.residuals {
            let y = block(reflection_pad(&x, 1)?, &r.first)?;
            let y = instance_norm(&r.second.forward(&reflection_pad(&y, 1)?)?)?;
            x = (x + y)?;
        }
        for conv in &self.up {
            x = instance_norm(&conv.forward(&x)?)?.relu()?;
        }
        let line = candle_nn::ops::sigmoid(&self.tail.forward(&reflection_pad(&x, 3)?)?)?;
        Ok(line.flatten_all()?.to_vec1::<f32>()?)
    }
}

/// `image` as a `[1, 3, h, w]` f32 tensor on `device`, each value through `f`.
pub(super) fn image_tensor(
    image: &RgbImage,
    device: &Device,
    f: impl Fn(f32) -> f32,
) -> Result<Tensor> {
    let (w, h) = (image.width as usize, image.height as usize);
    let hwc: Vec<f32> = image.pixels.iter().map(|&v| f(f32::from(v))).collect();
    Ok(Tensor::from_vec(hwc, (h, w, 3), &Device::Cpu)?
        .permute((2, 0, 1))?
        .unsqueeze(0)?
        .to_device(device)?)
}

/// The legacy `lineart` / `lineart_coarse` on the padded image: `255 - line`, the line
/// (`LineartDetector`'s) times 255, clipped, truncated to u8.
pub fn lineart_map(net: &LineartNetwork, padded: &RgbImage) -> Result<Vec<u8>> {
    Ok(net
        .line(padded)?
        .into_iter()
        .map(|v| 255 - (v * 255.0).clamp(0.0, 255.0) as u8)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reflection_pad_mirrors_without_repeating_the_edge() {
        let x = Tensor::new(&[[[[1f32, 2.0, 3.0]]]], &Device::Cpu).unwrap();
        let x = x.broadcast_as((1, 1, 3, 3)).unwrap().contiguous().unwrap();
        let p = reflection_pad(&x, 2).unwrap();
        assert_eq!(p.dims(), [1, 1, 7, 7]);
        let row: Vec<f32> = p
            .get(0)
            .unwrap()
            .get(0)
            .unwrap()
            .get(0)
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(row, [3.0, 2.0, 1.0, 2.0, 3.0, 2.0, 1.0]);
    }

    #[test]
    fn transposed_conv_of_a_single_one_is_the_kernel() {
        // One input pixel of 1 with a 3x3 kernel 1..=9, stride 2, padding 1, output padding
        // 1: the output is 2x2, the kernel's centre and its right/lower neighbours.
        let weight = Tensor::arange(1f32, 10.0, &Device::Cpu)
            .unwrap()
            .reshape((1, 1, 3, 3))
            .unwrap();
        let bias = Tensor::new(&[0.5f32], &Device::Cpu).unwrap();
        let t = ConvTranspose::new(&weight, bias, 1, 1).unwrap();
        let x = Tensor::ones((1, 1, 1, 1), DType::F32, &Device::Cpu).unwrap();
        let y: Vec<f32> = t
            .forward(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(y, [5.5, 6.5, 8.5, 9.5]);
    }

    /// The phase split against candle's conv_transpose2d, on the Generator's (3x3, padding 1,
    /// output padding 1), netG's and TEED's (4x4, padding 1) and TEED's 2x2 (padding 0)
    /// geometries, odd and even sizes.
    #[test]
    fn transposed_conv_matches_candles() {
        let dev = Device::Cpu;
        let values = |n: usize, seed: u32| -> Vec<f32> {
            (0..n as u32)
                .map(|i| {
                    ((i.wrapping_mul(2654435761).wrapping_add(seed) >> 8) % 2001) as f32 / 1000.0
                        - 1.0
                })
                .collect()
        };
        for &(cin, cout, h, w, k, p, op) in &[
            (3, 4, 5, 7, 3, 1, 1),
            (2, 3, 6, 6, 3, 1, 1),
            (3, 2, 5, 6, 4, 1, 0),
            (4, 3, 8, 8, 4, 1, 0),
            (3, 3, 5, 6, 2, 0, 0),
            (1, 1, 7, 4, 2, 0, 0),
        ] {
            let weight =
                Tensor::from_vec(values(cin * cout * k * k, 1), (cin, cout, k, k), &dev).unwrap();
            let bias = Tensor::from_vec(values(cout, 2), cout, &dev).unwrap();
            let x = Tensor::from_vec(values(cin * h * w, 3), (1, cin, h, w), &dev).unwrap();
            let ours = ConvTranspose::new(&weight, bias.clone(), p, op)
                .unwrap()
                .forward(&x)
                .unwrap();
            let candle = x
                .conv_transpose2d(&weight, p, op, 2, 1)
                .unwrap()
                .broadcast_add(&bias.reshape((1, cout, 1, 1)).unwrap())
                .unwrap();
            assert_eq!(ours.dims(), candle.dims(), "k{k} {h}x{w}");
            let diff: f32 = (ours - candle)
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar()
                .unwrap();
            assert!(diff < 1e-5, "k{k} {h}x{w}: {diff}");
        }
    }
}
