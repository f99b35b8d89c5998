//! CLIP's image processor as diffusers runs it for an IP-Adapter: transformers 5's
//! `CLIPImageProcessor` (its torchvision backend): resize so the shortest side is
//! `size.shortest_edge` (the other `int(size * long / short)`), bicubic with antialiasing on
//! the u8 pixels, center crop (`int((h - ch) / 2)` from the top, padding with zeros when the
//! crop is larger), then `(x / 255 - mean) / std` per channel.
//!
//! The resize is torch's u8 antialiased kernel, not PIL's: its weights are rounded to int16
//! at a precision chosen from the largest weight (PIL keeps 22 bits), horizontal pass first,
//! each pass rounded to u8. The two differ by a level or two on a few pixels.

use std::path::Path;

use candle_core::{Device, Tensor};
use serde::Deserialize;

use crate::error::{PipelineError, Result};
use crate::pipeline::RgbImage;

/// OpenAI CLIP's normalisation (transformers' `OPENAI_CLIP_MEAN` / `OPENAI_CLIP_STD`), the
/// processor's defaults.
const CLIP_MEAN: [f64; 3] = [0.48145466, 0.4578275, 0.40821073];
const CLIP_STD: [f64; 3] = [0.26862954, 0.26130258, 0.27577711];
/// PIL's `Image.BICUBIC`, the only resampling read here.
const BICUBIC: u32 = 3;

#[derive(Debug, Clone, PartialEq, Deserialize)]
struct SizeDict {
    shortest_edge: Option<usize>,
    height: Option<usize>,
    width: Option<usize>,
}

/// `preprocessor_config.json` of a `CLIPImageProcessor`: the keys it reads.
#[derive(Debug, Clone, PartialEq, Deserialize)]
struct ProcessorFile {
    #[serde(default = "yes")]
    do_resize: bool,
    size: Option<SizeDict>,
    #[serde(default = "d_resample")]
    resample: u32,
    #[serde(default = "yes")]
    do_center_crop: bool,
    crop_size: Option<SizeDict>,
    #[serde(default = "yes")]
    do_rescale: bool,
    #[serde(default = "d_rescale")]
    rescale_factor: f64,
    #[serde(default = "yes")]
    do_normalize: bool,
    image_mean: Option<[f64; 3]>,
    image_std: Option<[f64; 3]>,
}

fn yes() -> bool {
    true
}
fn d_resample() -> u32 {
    BICUBIC
}
fn d_rescale() -> f64 {
    1.0 / 255.0
}

/// What the processor does to an image.
#[derive(Debug, Clone, PartialEq)]
pub struct ClipImageProcessor {
    /// The shortest side after resizing; `None`: no resize.
    pub shortest_edge: Option<usize>,
    /// (height, width) of the center crop; `None`: no crop.
    pub crop: Option<(usize, usize)>,
    /// Multiplies the u8 values; `None`: kept as they are.
    pub rescale: Option<f64>,
    /// (mean, std) per channel; `None`: not normalised.
    pub normalize: Option<([f64; 3], [f64; 3])>,
}

impl ClipImageProcessor {
    /// What diffusers' `load_ip_adapter` builds without a processor of the pipeline:
    /// `CLIPImageProcessor(size=image_size, crop_size=image_size)`, every other setting its
    /// default.
    pub fn for_image_size(image_size: usize) -> Self {
        Self {
            shortest_edge: Some(image_size),
            crop: Some((image_size, image_size)),
            rescale: Some(1.0 / 255.0),
            normalize: Some((CLIP_MEAN, CLIP_STD)),
        }
    }

    /// Reads a `preprocessor_config.json`; keys absent take `CLIPImageProcessor`'s defaults
    /// (shortest side 224, crop 224). Only bicubic resampling and a shortest-side resize are
    /// read; anything else is refused naming the file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let f: ProcessorFile = crate::error::read_json(path)?;
        let bad = |m: String| PipelineError::config(path, m);
        if f.do_resize && f.resample != BICUBIC {
            return Err(bad(format!(
                "resample {} is not bicubic (3), the only one read",
                f.resample
            )));
        }
        let shortest_edge = match (f.do_resize, &f.size) {
            (false, _) => None,
            (true, None) => Some(224),
            (
                true,
                Some(SizeDict {
                    shortest_edge: Some(s),
                    ..
                }),
            ) => Some(*s),
            (true, Some(_)) => {
                return Err(bad("size without shortest_edge is not read".into()));
            }
        };
        let crop = match (f.do_center_crop, &f.crop_size) {
            (false, _) => None,
            (true, None) => Some((224, 224)),
            (
                true,
                Some(SizeDict {
                    height: Some(h),
                    width: Some(w),
                    ..
                }),
            ) => Some((*h, *w)),
            (true, Some(_)) => return Err(bad("crop_size needs height and width".into())),
        };
        if shortest_edge == Some(0) || crop.is_some_and(|(h, w)| h == 0 || w == 0) {
            return Err(bad("a size of 0".into()));
        }
        Ok(Self {
            shortest_edge,
            crop,
            rescale: f.do_rescale.then_some(f.rescale_factor),
            normalize: f.do_normalize.then(|| {
                (
                    f.image_mean.unwrap_or(CLIP_MEAN),
                    f.image_std.unwrap_or(CLIP_STD),
                )
            }),
        })
    }

    /// The encoder's input for `image`: `[1, 3, h, w]` f32 on `device`.
    pub fn preprocess(&self, image: &RgbImage, device: &Device) -> Result<Tensor> {
        let (w0, h0) = (image.width as usize, image.height as usize);
        if w0 == 0 || h0 == 0 || image.pixels.len() != w0 * h0 * 3 {
            return Err(PipelineError::InvalidRequest(
                "the IP-Adapter image is empty".into(),
            ));
        }
        let resized = match self.shortest_edge {
            Some(size) => {
                let (w, h) = shortest_edge_size(w0, h0, size);
                resize_bicubic_aa_u8(image, w, h)
            }
            None => image.clone(),
        };
        let cropped = match self.crop {
            Some((ch, cw)) => center_crop(&resized, ch, cw),
            None => resized,
        };
        let (w, h) = (cropped.width as usize, cropped.height as usize);
        let mut values = vec![0f32; 3 * h * w];
        for c in 0..3 {
            for i in 0..h * w {
                let mut v = cropped.pixels[i * 3 + c] as f64;
                if let Some(r) = self.rescale {
                    v *= r;
                }
                if let Some((mean, std)) = self.normalize {
                    v = (v - mean[c]) / std[c];
                }
                values[c * h * w + i] = v as f32;
            }
        }
        Ok(Tensor::from_vec(values, (1, 3, h, w), device)?)
    }
}

/// transformers' `get_resize_output_image_size(size, default_to_square=False)`: (width,
/// height) with the shortest side `size`, the longest `int(size * long / short)`.
fn shortest_edge_size(w: usize, h: usize, size: usize) -> (usize, usize) {
    let (short, long) = if w <= h { (w, h) } else { (h, w) };
    let new_long = (size as f64 * long as f64 / short as f64) as usize;
    if w <= h {
        (size, new_long)
    } else {
        (new_long, size)
    }
}

/// The processor's center crop: from `int((h - ch) / 2)`, `int((w - cw) / 2)`; a crop larger
/// than the image pads it with zeros first (left/top `(c - s) / 2`, the rest right/bottom).
fn center_crop(image: &RgbImage, ch: usize, cw: usize) -> RgbImage {
    let (w, h) = (image.width as usize, image.height as usize);
    let (pad_l, pad_t) = (cw.saturating_sub(w) / 2, ch.saturating_sub(h) / 2);
    let (pw, ph) = (w.max(cw), h.max(ch));
    let (top, left) = ((ph - ch) / 2, (pw - cw) / 2);
    let mut pixels = vec![0u8; cw * ch * 3];
    for y in 0..ch {
        for x in 0..cw {
            // Position in the padded image, then in the source.
            let (py, px) = (y + top, x + left);
            if py < pad_t || px < pad_l || py - pad_t >= h || px - pad_l >= w {
                continue;
            }
            let src = ((py - pad_t) * w + (px - pad_l)) * 3;
            pixels[(y * cw + x) * 3..(y * cw + x) * 3 + 3]
                .copy_from_slice(&image.pixels[src..src + 3]);
        }
    }
    RgbImage {
        width: cw as u32,
        height: ch as u32,
        pixels,
    }
}

/// Keys' cubic convolution with a = -0.5, as torch's antialiased bicubic filter writes it.
fn cubic_aa(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A
    } else {
        0.0
    }
}

/// torch's int16 weights for one axis (`_compute_index_ranges_int16_weights`): per output
/// index its first input index and weights, and the precision (bits) they are scaled by.
fn int16_weights(in_size: usize, out_size: usize) -> (u32, Vec<(usize, Vec<i32>)>) {
    let scale = in_size as f64 / out_size as f64;
    let support = if scale >= 1.0 { 2.0 * scale } else { 2.0 };
    let invscale = if scale >= 1.0 { 1.0 / scale } else { 1.0 };
    let mut max = 0f64;
    let float: Vec<(usize, Vec<f64>)> = (0..out_size)
        .map(|i| {
            let center = scale * (i as f64 + 0.5);
            // C casts truncate toward zero.
            let xmin = ((center - support + 0.5) as i64).max(0);
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64);
            let mut w: Vec<f64> = (xmin..xmax.max(xmin))
                .map(|j| cubic_aa((j as f64 - center + 0.5) * invscale))
                .collect();
            let total: f64 = w.iter().sum();
            if total != 0.0 {
                for v in &mut w {
                    *v /= total;
                    max = max.max(*v);
                }
            }
            (xmin as usize, w)
        })
        .collect();
    let mut precision = 0u32;
    while precision < 22 {
        let next = (0.5 + max * (1u64 << (precision + 1)) as f64) as i64;
        if next >= 1 << 15 {
            break;
        }
        precision += 1;
    }
    let unit = (1u64 << precision) as f64;
    let fixed = float
        .into_iter()
        .map(|(xmin, w)| {
            let k = w
                .iter()
                .map(|&v| {
                    let v = v * unit;
                    (if v < 0.0 { -0.5 + v } else { 0.5 + v }) as i32 as i16 as i32
                })
                .collect();
            (xmin, k)
        })
        .collect();
    (precision, fixed)
}

fn round_shift(acc: i32, precision: u32) -> u8 {
    (acc >> precision).clamp(0, 255) as u8
}

/// torch's `interpolate(mode="bicubic", antialias=True)` on an RGB u8 image on the CPU, as
/// torchvision's `resize` runs it: horizontal pass, then vertical, each in int32 with int16
/// weights and rounded to u8.
pub fn resize_bicubic_aa_u8(image: &RgbImage, width: usize, height: usize) -> RgbImage {
    let (w0, h0) = (image.width as usize, image.height as usize);
    if (w0, h0) == (width, height) {
        return image.clone();
    }
    let mut pixels = image.pixels.clone();
    let mut w = w0;
    if width != w0 {
        let (p, k) = int16_weights(w0, width);
        let round = 1i32 << p.saturating_sub(1);
        let mut out = vec![0u8; width * h0 * 3];
        for y in 0..h0 {
            for (xx, (xmin, wts)) in k.iter().enumerate() {
                for c in 0..3 {
                    let acc = wts.iter().enumerate().fold(round, |a, (i, &wt)| {
                        a + pixels[(y * w0 + xmin + i) * 3 + c] as i32 * wt
                    });
                    out[(y * width + xx) * 3 + c] = round_shift(acc, p);
                }
            }
        }
        pixels = out;
        w = width;
    }
    if height != h0 {
        let (p, k) = int16_weights(h0, height);
        let round = 1i32 << p.saturating_sub(1);
        let mut out = vec![0u8; w * height * 3];
        for (yy, (ymin, wts)) in k.iter().enumerate() {
            for x in 0..w * 3 {
                let acc = wts.iter().enumerate().fold(round, |a, (i, &wt)| {
                    a + pixels[(ymin + i) * w * 3 + x] as i32 * wt
                });
                out[yy * w * 3 + x] = round_shift(acc, p);
            }
        }
        pixels = out;
    }
    RgbImage {
        width: width as u32,
        height: height as u32,
        pixels,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shortest_side_and_crop_follow_transformers() {
        assert_eq!(shortest_edge_size(96, 72, 32), (42, 32));
        assert_eq!(shortest_edge_size(50, 70, 32), (32, 44));
        let img = RgbImage {
            width: 3,
            height: 2,
            pixels: (0..18).collect(),
        };
        // Larger crop: padded with zeros around, the image at (left 0, top 1).
        let c = center_crop(&img, 4, 4);
        assert_eq!(&c.pixels[12..21], &img.pixels[0..9]);
        assert!(c.pixels[..12].iter().all(|&v| v == 0));
        // Smaller: from the middle, rounding down.
        let c = center_crop(&img, 1, 1);
        assert_eq!(c.pixels, img.pixels[3..6]);
    }

    #[test]
    fn a_flat_image_stays_flat() {
        let img = RgbImage {
            width: 37,
            height: 23,
            pixels: [10u8, 128, 250].repeat(37 * 23),
        };
        let r = resize_bicubic_aa_u8(&img, 12, 9);
        assert!(r.pixels.chunks(3).all(|p| p == [10, 128, 250]));
    }
}
