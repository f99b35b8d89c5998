//! The extension's `lineart_anime` (`annotator/lineart_anime/__init__.py`, the legacy
//! `lineart_anime` of `scripts/preprocessor/legacy/processor.py`):
//! - [`LineartAnimeNetwork`]: its `UnetGenerator(3, 1, 8, 64)` with `InstanceNorm2d` (no
//!   weights, so every conv has a bias): eight levels of 4x4 stride-2 convs down and 4x4
//!   stride-2 transposed convs up, each inner level's output its input (after the in-place
//!   LeakyReLU(0.2) of its down path, as pix2pix's skip carries it; the ReLU the up path
//!   starts with makes that no different) joined to its up path; the outermost level ends in
//!   tanh. Widths (64 .. 512) and depth are read from the weights.
//! - [`lineart_anime_map`]: `LineartAnimeDetector.__call__` on the padded image: resized
//!   (cubic) to multiples of 256, `/ 127.5 - 1`, the line `* 127.5 + 127.5` resized (cubic,
//!   f32) back, clipped, truncated to u8; then the legacy function's `255 - line`.

use std::path::Path;
use std::sync::Arc;

use candle_core::{Device, Module, Tensor};

use super::lineart::{image_tensor, instance_norm, ConvTranspose, Weights};
use super::networks::{lllyasviel, AnnotatorFile};
use super::resize::{cubic_taps, resize_cubic};
use crate::kernels::Conv2d;
use crate::pipeline::RgbImage;
use crate::Result;

/// The file `lineart_anime` loads (`annotator/downloads/lineart_anime/`).
pub const LINEART_ANIME_FILE: &str = "netG.pth";

/// [`LineartAnimeNetwork`]'s file, for an [`AnnotatorNetworks`](super::AnnotatorNetworks).
pub static LINEART_ANIME: AnnotatorFile = AnnotatorFile {
    name: LINEART_ANIME_FILE,
    subfolder: "lineart_anime",
    hub: lllyasviel(LINEART_ANIME_FILE),
    load: |path| Ok(Arc::new(LineartAnimeNetwork::load(path, &Device::Cpu)?)),
};

const UNET: &str = "lineart_anime UnetGenerator";

/// One `UnetSkipConnectionBlock`: its down conv and its up (transposed) conv.
struct Level {
    down: Conv2d,
    up: ConvTranspose,
}

/// The `UnetGenerator` of `annotator/lineart_anime` with its weights, on one device in f32;
/// `levels[0]` the outermost.
pub struct LineartAnimeNetwork {
    levels: Vec<Level>,
    widths: Vec<usize>,
}

impl std::fmt::Debug for LineartAnimeNetwork {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LineartAnimeNetwork")
            .field("widths", &self.widths)
            .finish()
    }
}

impl LineartAnimeNetwork {
    /// The network of a `netG.pth` (a torch pickle, read without running it; the `module.`
    /// prefix of a `DataParallel` save dropped as the extension drops it) or a
    /// `.safetensors` file of the same names, onto `device` in f32.
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let wts = Weights::read(path, device)?;
        // Names: the outermost block is `model.model`, each inner one `<outer>.model.<i>`
        // with its submodule at 1 (outermost) or 3; down conv 0 (outermost) or 1; up conv 3
        // (outermost, innermost) or 5.
        let mut prefixes = vec!["model.model".to_string()];
        let mut sub = "model.model.1".to_string();
        loop {
            prefixes.push(sub.clone());
            if wts.has(&format!("{sub}.model.5.weight")) {
                sub = format!("{sub}.model.3");
            } else {
                break;
            }
        }
        let depth = prefixes.len();
        let mut downs = Vec::with_capacity(depth);
        let mut widths = Vec::with_capacity(depth);
        let mut c = 3;
        for (i, p) in prefixes.iter().enumerate() {
            let key = if i == 0 {
                format!("{p}.0")
            } else {
                format!("{p}.model.1")
            };
            let (conv, out) = wts.conv(&key, c, 4, 2, 1, UNET)?;
            downs.push(conv);
            widths.push(out);
            c = out;
        }
        // Up from the innermost: its input is the down path's output, every other level's
        // the inner level's output joined to its input.
        let mut ups = Vec::with_capacity(depth);
        for (i, p) in prefixes.iter().enumerate().rev() {
            let (key, input) = match i {
                0 => (format!("{p}.3"), 2 * widths[0]),
                _ if i == depth - 1 => (format!("{p}.model.3"), widths[i]),
                _ => (format!("{p}.model.5"), 2 * widths[i]),
            };
            let want = if i == 0 { 1 } else { widths[i - 1] };
            let (conv, out) = wts.conv_transpose(&key, input, 4, 1, 0, UNET)?;
            if out != want {
                return Err(wts.bad(format!(
                    "{key} makes {out} channels where its level needs {want}"
                )));
            }
            ups.push(conv);
        }
        ups.reverse();
        Ok(Self {
            levels: downs
                .into_iter()
                .zip(ups)
                .map(|(down, up)| Level { down, up })
                .collect(),
            widths,
        })
    }

    /// The down convs' widths (64, 128, 256, 512, 512, 512, 512, 512 for `netG.pth`).
    pub fn widths(&self) -> &[usize] {
        &self.widths
    }

    /// The tanh line (-1..=1) of `image`, whose sides are multiples of 2^depth (256).
    pub fn line(&self, image: &RgbImage) -> Result<Vec<f32>> {
        let device = self.levels[0].down.weight().device();
        let x = image_tensor(image, device, |v| v / 127.5 - 1.0)?;
        let n = self.levels.len();
        // Down: skips[i] is level i's input after its LeakyReLU (i >= 1).
        let mut skips = Vec::with_capacity(n);
        let mut h = self.levels[0].down.forward(&x)?;
        for (i, level) in self.levels.iter().enumerate().skip(1) {
            let a = leaky_relu(&h)?;
            h = level.down.forward(&a)?;
            if i < n - 1 {
                h = instance_norm(&h)?;
            }
            skips.push(a);
        }
        // Up from the innermost.
        for i in (1..n).rev() {
            let u = instance_norm(&self.levels[i].up.forward(&h.relu()?)?)?;
            h = Tensor::cat(&[&skips[i - 1], &u], 1)?;
        }
        let line = self.levels[0].up.forward(&h.relu()?)?.tanh()?;
        Ok(line.flatten_all()?.to_vec1::<f32>()?)
    }

    /// The side multiple the network needs (2^depth: 256 for `netG.pth`).
    pub fn multiple(&self) -> usize {
        1 << self.levels.len()
    }
}

/// `nn.LeakyReLU(0.2)`.
fn leaky_relu(x: &Tensor) -> Result<Tensor> {
    Ok(x.maximum(&(x * 0.2)?)?)
}

/// `cv2.resize(src, (dw, dh), interpolation=INTER_CUBIC)` of a one-channel f32 image: the
/// horizontal pass, then the vertical, in f32.
pub fn resize_cubic_f32(src: &[f32], sw: usize, sh: usize, dw: usize, dh: usize) -> Vec<f32> {
    if (sw, sh) == (dw, dh) {
        return src.to_vec();
    }
    let cols = cubic_taps(sw, dw);
    let rows = cubic_taps(sh, dh);
    let mid: Vec<f32> = (0..sh)
        .flat_map(|y| {
            let row = &src[y * sw..][..sw];
            cols.iter()
                .map(|(idx, c)| (0..4).fold(0f32, |acc, k| acc + c[k] * row[idx[k]]))
                .collect::<Vec<_>>()
        })
        .collect();
    let mut out = Vec::with_capacity(dw * dh);
    for (idx, c) in &rows {
        for x in 0..dw {
            out.push((0..4).fold(0f32, |acc, k| acc + c[k] * mid[idx[k] * dw + x]));
        }
    }
    out
}

/// `LineartAnimeDetector`'s line `* 127.5 + 127.5` of the padded image, at its size (before
/// the clip and cast).
pub fn lineart_anime_values(net: &LineartAnimeNetwork, padded: &RgbImage) -> Result<Vec<f32>> {
    let (w, h) = (padded.width as usize, padded.height as usize);
    let m = net.multiple();
    let (wn, hn) = (w.div_ceil(m) * m, h.div_ceil(m) * m);
    let feed = if (wn, hn) == (w, h) {
        padded.clone()
    } else {
        resize_cubic(padded, wn, hn)
    };
    let line: Vec<f32> = net
        .line(&feed)?
        .into_iter()
        .map(|v| v * 127.5 + 127.5)
        .collect();
    Ok(resize_cubic_f32(&line, wn, hn, w, h))
}

/// The legacy `lineart_anime` on the padded image: `255 - line`, clipped and truncated.
pub fn lineart_anime_map(net: &LineartAnimeNetwork, padded: &RgbImage) -> Result<Vec<u8>> {
    Ok(lineart_anime_values(net, padded)?
        .into_iter()
        .map(|v| 255 - v.clamp(0.0, 255.0) as u8)
        .collect())
}
