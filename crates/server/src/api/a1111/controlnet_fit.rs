//! The sd-webui-controlnet extension's resize modes (`ResizeMode`, `resize_mode_from_value`)
//! and the geometry its `detectmap_proc` fits a unit's image or map to the request's size with.

use serde_json::Value;

use crate::error::ApiError;
use sdserve_pipeline::image_in::resize_lanczos;
use sdserve_pipeline::pipeline::RgbImage;

fn bad(rule: String) -> ApiError {
    ApiError::validation(super::controlnet::FIELD, rule)
}

/// The extension's `ResizeMode`, from its names, aliases or index
/// (`external_code.resize_mode_from_value`; 3, `Just Resize (Latent upscale)`, is a plain resize).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ResizeMode {
    Resize,
    CropAndResize,
    ResizeAndFill,
}

impl ResizeMode {
    /// The extension's name (`ResizeMode.value`), as its infotext writes it.
    pub(super) fn label(self) -> &'static str {
        match self {
            Self::Resize => "Just Resize",
            Self::CropAndResize => "Crop and Resize",
            Self::ResizeAndFill => "Resize and Fill",
        }
    }

    /// The mode as A1111's `images.resize_image` numbers it (the extension's `int_value`).
    pub(super) fn a1111_index(self) -> u8 {
        match self {
            Self::Resize => 0,
            Self::CropAndResize => 1,
            Self::ResizeAndFill => 2,
        }
    }
}

pub(super) fn resize_mode(v: Option<&Value>, i: usize) -> Result<ResizeMode, ApiError> {
    let mode = match v {
        None | Some(Value::Null) => return Ok(ResizeMode::CropAndResize),
        Some(Value::String(s)) => match s.as_str() {
            "Just Resize" => Some(ResizeMode::Resize),
            "Crop and Resize" | "Inner Fit (Scale to Fit)" | "Scale to Fit (Inner Fit)" => {
                Some(ResizeMode::CropAndResize)
            }
            "Resize and Fill" | "Outer Fit (Shrink to Fit)" | "Envelope (Outer Fit)" => {
                Some(ResizeMode::ResizeAndFill)
            }
            _ => None,
        },
        Some(n) => match n.as_i64() {
            Some(0) | Some(3) => Some(ResizeMode::Resize),
            Some(1) => Some(ResizeMode::CropAndResize),
            Some(2) => Some(ResizeMode::ResizeAndFill),
            // The extension falls back to a plain resize for larger numbers.
            Some(n) if n > 3 => Some(ResizeMode::Resize),
            _ => None,
        },
    };
    mode.ok_or_else(|| {
        bad(format!(
            "[{i}].resize_mode: one of \"Just Resize\", \"Crop and Resize\", \"Resize and Fill\" (or 0, 1, 2)"
        ))
    })
}

/// `int(np.round(x))`: halves to even.
fn safeint(x: f64) -> usize {
    x.round_ties_even().max(1.0) as usize
}

/// The extension's `detectmap_proc` geometry for a `w` x `h` request.
pub(super) fn fit(image: &RgbImage, mode: ResizeMode, w: usize, h: usize) -> RgbImage {
    fit_filled(image, mode, w, h, None)
}

/// An inpaint unit's mask (its RGBA feed's alpha) fitted as its image: "Resize and Fill"
/// fills the border with 255, masked (the extension's "Inpaint hijack": outpainting).
pub(super) fn fit_mask(mask: &RgbImage, mode: ResizeMode, w: usize, h: usize) -> RgbImage {
    fit_filled(mask, mode, w, h, Some([255; 3]))
}

fn fit_filled(
    image: &RgbImage,
    mode: ResizeMode,
    w: usize,
    h: usize,
    fill: Option<[u8; 3]>,
) -> RgbImage {
    let (ow, oh) = (image.width as f64, image.height as f64);
    let (k0, k1) = (h as f64 / oh, w as f64 / ow);
    match mode {
        ResizeMode::Resize => resize_lanczos(image, w, h),
        ResizeMode::CropAndResize => {
            let k = k0.max(k1);
            let (nw, nh) = (safeint(ow * k), safeint(oh * k));
            let scaled = resize_lanczos(image, nw, nh);
            let (pad_h, pad_w) = (nh.saturating_sub(h) / 2, nw.saturating_sub(w) / 2);
            let (cw, ch) = (w.min(nw - pad_w), h.min(nh - pad_h));
            let mut pixels = Vec::with_capacity(cw * ch * 3);
            for y in pad_h..pad_h + ch {
                let row = (y * nw + pad_w) * 3;
                pixels.extend_from_slice(&scaled.pixels[row..row + cw * 3]);
            }
            RgbImage {
                width: cw as u32,
                height: ch as u32,
                pixels,
            }
        }
        ResizeMode::ResizeAndFill => {
            let k = k0.min(k1);
            let (nw, nh) = (safeint(ow * k), safeint(oh * k));
            let scaled = resize_lanczos(image, nw, nh);
            let fill = fill.unwrap_or_else(|| border_median(image));
            let mut pixels: Vec<u8> = fill.iter().copied().cycle().take(w * h * 3).collect();
            let (pad_h, pad_w) = (h.saturating_sub(nh) / 2, w.saturating_sub(nw) / 2);
            for y in 0..nh.min(h - pad_h) {
                let cols = nw.min(w - pad_w);
                let src = y * nw * 3;
                let dst = ((y + pad_h) * w + pad_w) * 3;
                pixels[dst..dst + cols * 3].copy_from_slice(&scaled.pixels[src..src + cols * 3]);
            }
            RgbImage {
                width: w as u32,
                height: h as u32,
                pixels,
            }
        }
    }
}

/// `np.median(concat(top row, bottom row, left column, right column), axis=0)` cast to u8
/// (truncating), per channel.
fn border_median(image: &RgbImage) -> [u8; 3] {
    let (w, h) = (image.width as usize, image.height as usize);
    let px = |x: usize, y: usize, c: usize| image.pixels[(y * w + x) * 3 + c];
    let mut out = [0u8; 3];
    for (c, o) in out.iter_mut().enumerate() {
        let mut v: Vec<u8> = (0..w).map(|x| px(x, 0, c)).collect();
        v.extend((0..w).map(|x| px(x, h - 1, c)));
        v.extend((0..h).map(|y| px(0, y, c)));
        v.extend((0..h).map(|y| px(w - 1, y, c)));
        v.sort_unstable();
        let n = v.len();
        let m = if n % 2 == 1 {
            f64::from(v[n / 2])
        } else {
            (f64::from(v[n / 2 - 1]) + f64::from(v[n / 2])) / 2.0
        };
        *o = m as u8;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(w: u32, h: u32) -> RgbImage {
        let pixels = (0..w * h * 3).map(|i| (i * 7 % 251) as u8).collect();
        RgbImage {
            width: w,
            height: h,
            pixels,
        }
    }

    #[test]
    fn crop_and_fill_keep_the_extension_s_geometry() {
        // 100x50 into 64x64: cover (k = 1.28, 128x64) and crop 32 px off each side.
        let src = image(100, 50);
        let c = fit(&src, ResizeMode::CropAndResize, 64, 64);
        assert_eq!((c.width, c.height), (64, 64));
        let scaled = resize_lanczos(&src, 128, 64);
        assert_eq!(&c.pixels[..64 * 3], &scaled.pixels[32 * 3..96 * 3]);
        // Fit (k = 0.64, 64x32), centred with 16 rows of the border median above and below.
        let f = fit(&src, ResizeMode::ResizeAndFill, 64, 64);
        assert_eq!((f.width, f.height), (64, 64));
        let m = border_median(&src);
        assert_eq!(&f.pixels[..3], &m);
        let scaled = resize_lanczos(&src, 64, 32);
        assert_eq!(
            &f.pixels[16 * 64 * 3..17 * 64 * 3],
            &scaled.pixels[..64 * 3]
        );
        assert_eq!(&f.pixels[48 * 64 * 3..48 * 64 * 3 + 3], &m);
    }

    #[test]
    fn an_inpaint_mask_is_filled_masked_where_the_image_is_filled() {
        // "Resize and Fill": the image's border is its median, the mask's 255 (outpainting).
        let black = RgbImage {
            width: 100,
            height: 50,
            pixels: vec![0; 100 * 50 * 3],
        };
        let m = fit_mask(&black, ResizeMode::ResizeAndFill, 64, 64);
        assert_eq!(&m.pixels[..3], &[255; 3]);
        assert_eq!(m.pixels[(32 * 64 + 32) * 3], 0);
        assert_eq!(m.pixels[(63 * 64) * 3], 255);
        let f = fit(&black, ResizeMode::ResizeAndFill, 64, 64);
        assert_eq!(&f.pixels[..3], &[0; 3]);
        // The other modes fit the mask as the image.
        for mode in [ResizeMode::Resize, ResizeMode::CropAndResize] {
            assert_eq!(fit_mask(&black, mode, 64, 64), fit(&black, mode, 64, 64));
        }
    }
}
