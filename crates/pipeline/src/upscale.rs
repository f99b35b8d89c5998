//! A1111's "Extras" upscale (`scripts/postprocessing_upscale.py`) with its built-in image
//! upscalers `Lanczos` and `Nearest` (`modules/upscaler.py`: Pillow resizes), step for step:
//! the upscaler's own resize to `int(side * scale)`, a Lanczos resize to
//! `side * scale // 8 * 8` where that differs, the target size's centred paste onto black,
//! and a second upscaler blended in as `Image.blend` does. An ESRGAN model
//! ([`crate::upscaler`]) upscales as A1111's `UpscalerESRGAN` does: the model's rounds, then
//! the same Lanczos resize.

use std::path::PathBuf;
use std::sync::Arc;

use candle_core::{DType, Device};

use crate::image_in::{resize_lanczos, resize_nearest};
use crate::named_file::NamedFile;
use crate::pipeline::RgbImage;
use crate::upscaler::Network;

/// An image upscaler: A1111's built-in ones, or an ESRGAN model (`None` is "no upscaler":
/// see [`ExtrasUpscale`]).
#[derive(Debug, Clone, PartialEq)]
pub enum ImageUpscaler {
    Lanczos,
    Nearest,
    Model(Arc<ModelUpscaler>),
}

/// An ESRGAN-family or SwinIR model file by its upscaler name, read the first time it is
/// needed or handed over already loaded (the server's cache of networks).
pub type ModelUpscaler = NamedFile<Network>;

impl NamedFile<Network> {
    /// The model with its network already read (from `path`).
    pub fn with_network(
        name: impl Into<String>,
        path: impl Into<PathBuf>,
        network: Arc<Network>,
    ) -> Self {
        Self::with_loaded(name, path, network)
    }

    /// The network (read on the CPU in f32 on first use; blocking), or why the file is not
    /// one, naming it.
    pub fn load(&self) -> Result<&Network, String> {
        self.load_on(&Device::Cpu, DType::F32)
    }

    /// The network, read onto `device` in `dtype` on first use; one handed over
    /// ([`Self::with_network`]) or read before is used where it is.
    pub fn load_on(&self, device: &Device, dtype: DType) -> Result<&Network, String> {
        self.get_or_read("upscaler", "an upscaler folder", |path| {
            Network::load(path, device, dtype).map_err(|e| e.to_string())
        })
        .map(|n| n.as_ref())
    }

    /// The model's factor (1 until it is read: [`Self::load`] first).
    fn scale(&self) -> usize {
        self.load().map_or(1, Network::scale)
    }
}

/// The dtype an upscaling network runs in, whatever the pipeline's: float32. A1111's
/// `UpscalerESRGAN` (its `models/ESRGAN` folder, which UPSCALERS_DIR is) loads with
/// `load_spandrel_model`'s `prefer_half=False` and runs each tile outside autocast, so in the
/// weights' float32 (only its built-in Real-ESRGAN and DAT upscalers prefer half); SwinIR
/// has no half type in spandrel.
pub const NETWORK_DTYPE: DType = DType::F32;

impl ImageUpscaler {
    pub fn name(&self) -> &str {
        match self {
            Self::Lanczos => "Lanczos",
            Self::Nearest => "Nearest",
            Self::Model(m) => &m.name,
        }
    }

    /// `do_upscale`: Pillow's `img.resize((int(w * scale), int(h * scale)), filter)`.
    fn resize(&self, image: &RgbImage, width: usize, height: usize) -> RgbImage {
        match self {
            Self::Lanczos | Self::Model(_) => resize_lanczos(image, width, height),
            Self::Nearest => resize_nearest(image, width, height),
        }
    }

    /// The size of the largest image `Upscaler.upscale` makes before its final resize.
    fn largest(&self, width: u32, height: u32, scale: f64) -> (usize, usize) {
        match self {
            Self::Model(m) => {
                crate::upscaler::rounds(m.scale(), width as usize, height as usize, scale)
                    .last()
                    .copied()
                    .unwrap_or((width as usize, height as usize))
            }
            _ => (
                (width as f64 * scale) as usize,
                (height as f64 * scale) as usize,
            ),
        }
    }
}

/// How large the result is asked to be (A1111's `resize_mode` 0 and 1).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum UpscaleTarget {
    /// `upscaling_resize`: a factor above 0.
    By(f64),
    /// `upscaling_resize_w` x `upscaling_resize_h`: scaled to cover it (aspect kept), then,
    /// with `crop`, pasted centred onto a black canvas of exactly that size.
    To { width: u32, height: u32, crop: bool },
}

/// One Extras request's upscale.
#[derive(Debug, Clone, PartialEq)]
pub struct ExtrasUpscale {
    pub target: UpscaleTarget,
    /// `None`: A1111's `None` upscaler, the image is left as it is (and the second ignored).
    pub upscaler: Option<ImageUpscaler>,
    /// The second upscaler and its visibility (0..=1; at 0 it is not run).
    pub second: Option<(ImageUpscaler, f64)>,
}

/// `int((side * scale) // 8 * 8)`, A1111's size after `Upscaler.upscale`.
pub(crate) fn dest_side(side: u32, scale: f64) -> usize {
    ((side as f64 * scale / 8.0).floor() * 8.0) as usize
}

impl ExtrasUpscale {
    /// The factor A1111 upscales an image of `width` x `height` by.
    pub fn scale(&self, width: u32, height: u32) -> f64 {
        match self.target {
            UpscaleTarget::By(s) => s,
            UpscaleTarget::To {
                width: w,
                height: h,
                ..
            } => (w as f64 / width as f64).max(h as f64 / height as f64),
        }
    }

    /// The sizes this makes of an image of `width` x `height`, before any pixel is touched:
    /// the largest intermediate (the upscaler's own resize, `int(side * scale)`) and the
    /// result. A side of 0 means Pillow would refuse the resize (A1111 fails there).
    pub fn sizes(&self, width: u32, height: u32) -> ((usize, usize), (usize, usize)) {
        let Some(upscaler) = &self.upscaler else {
            let same = (width as usize, height as usize);
            return (same, same);
        };
        let s = self.scale(width, height);
        let mut first = upscaler.largest(width, height, s);
        if let Some((second, v)) = &self.second {
            if *v > 0.0 {
                let other = second.largest(width, height, s);
                first = (first.0.max(other.0), first.1.max(other.1));
            }
        }
        let dest = (dest_side(width, s), dest_side(height, s));
        let result = match self.target {
            UpscaleTarget::To {
                width,
                height,
                crop: true,
            } => (width as usize, height as usize),
            _ => dest,
        };
        (
            (
                first.0.max(dest.0).max(result.0),
                first.1.max(dest.1).max(result.1),
            ),
            result,
        )
    }

    /// The upscaled image and A1111's info for it (`Postprocess upscale by: 2.0`, ...), in
    /// its order, values as Python writes them. Sides must be above 0 ([`sizes`](Self::sizes)).
    /// Fails only where a model does (a file that is not one, a device error).
    pub fn run(&self, image: &RgbImage) -> crate::Result<(RgbImage, Vec<(String, String)>)> {
        self.run_until(image, None)
    }

    /// [`run`](Self::run), a model's work given up (`Cancelled`) before a tile that would
    /// start after `deadline`.
    pub fn run_until(
        &self,
        image: &RgbImage,
        deadline: Option<std::time::Instant>,
    ) -> crate::Result<(RgbImage, Vec<(String, String)>)> {
        let mut info = Vec::new();
        let Some(first) = &self.upscaler else {
            return Ok((image.clone(), info));
        };
        let scale = self.scale(image.width, image.height);
        match self.target {
            UpscaleTarget::By(s) => info.push(("Postprocess upscale by".into(), python_float(s))),
            UpscaleTarget::To { width, height, .. } => {
                info.push(("Postprocess upscale to".into(), format!("{width}x{height}")))
            }
        }
        let mut out = self.upscale_one(image, first, scale, deadline)?;
        if let UpscaleTarget::To { crop: true, .. } = self.target {
            info.push((
                "Postprocess crop to".into(),
                format!("{}x{}", out.width, out.height),
            ));
        }
        info.push(("Postprocess upscaler".into(), first.name().into()));
        if let Some((second, visibility)) = self.second.as_ref().filter(|(_, v)| *v > 0.0) {
            let other = self.upscale_one(image, second, scale, deadline)?;
            out = blend(&out, &other, *visibility);
            info.push(("Postprocess upscaler 2".into(), second.name().into()));
        }
        Ok((out, info))
    }

    /// `ScriptPostprocessingUpscale.upscale` for one upscaler: `Upscaler.upscale`, then the
    /// centred paste when cropping to a target size.
    fn upscale_one(
        &self,
        image: &RgbImage,
        upscaler: &ImageUpscaler,
        scale: f64,
        deadline: Option<std::time::Instant>,
    ) -> crate::Result<RgbImage> {
        let up = match upscaler {
            ImageUpscaler::Model(m) => {
                let model = m.load().map_err(crate::PipelineError::InvalidRequest)?;
                crate::upscaler::upscale_by_until(model, image, scale, deadline)?
            }
            _ => upscale(image, upscaler, scale),
        };
        Ok(match self.target {
            UpscaleTarget::To {
                width,
                height,
                crop: true,
            } => paste_centred(&up, width as usize, height as usize),
            _ => up,
        })
    }
}

/// A1111's `Upscaler.upscale(img, scale)` for the built-in upscalers: their resize to
/// `int(side * scale)` where the image is below `side * scale // 8 * 8` on a side or `scale`
/// is exactly 1 (the loop's first round; it ends there, as that size is never below the
/// destination), then Lanczos to `side * scale // 8 * 8` where that differs. (A model
/// resizes as Lanczos here; its own rounds are [`crate::upscaler::upscale_by`].)
pub fn upscale(image: &RgbImage, upscaler: &ImageUpscaler, scale: f64) -> RgbImage {
    let (w, h) = (image.width as f64, image.height as f64);
    let dest = (
        dest_side(image.width, scale),
        dest_side(image.height, scale),
    );
    let below = (image.width as usize) < dest.0 || (image.height as usize) < dest.1;
    if !below && scale != 1.0 {
        return resize_lanczos(image, dest.0, dest.1);
    }
    let scaled = upscaler.resize(image, (w * scale) as usize, (h * scale) as usize);
    resize_lanczos(&scaled, dest.0, dest.1)
}

/// `Image.new("RGB", (width, height))` with `image` pasted at
/// `(width // 2 - w // 2, height // 2 - h // 2)`: cropped where it is larger, black where
/// it does not reach.
fn paste_centred(image: &RgbImage, width: usize, height: usize) -> RgbImage {
    let (iw, ih) = (image.width as i64, image.height as i64);
    let left = width as i64 / 2 - iw / 2;
    let top = height as i64 / 2 - ih / 2;
    let mut pixels = vec![0u8; width * height * 3];
    for y in 0..height as i64 {
        let sy = y - top;
        if !(0..ih).contains(&sy) {
            continue;
        }
        let x0 = left.max(0);
        let x1 = (left + iw).min(width as i64);
        if x0 >= x1 {
            continue;
        }
        let src = ((sy * iw + (x0 - left)) * 3) as usize;
        let dst = ((y * width as i64 + x0) * 3) as usize;
        let n = ((x1 - x0) * 3) as usize;
        pixels[dst..dst + n].copy_from_slice(&image.pixels[src..src + n]);
    }
    RgbImage {
        width: width as u32,
        height: height as u32,
        pixels,
    }
}

/// Pillow's `Image.blend(a, b, alpha)` for alpha in 0..=1 (`libImaging/Blend.c`): per byte
/// `(UINT8)(a + alpha * (b - a))` in C `float`, truncated.
pub fn blend(a: &RgbImage, b: &RgbImage, alpha: f64) -> RgbImage {
    assert_eq!((a.width, a.height), (b.width, b.height));
    let alpha = alpha as f32;
    let pixels = a
        .pixels
        .iter()
        .zip(&b.pixels)
        .map(|(&x, &y)| (x as f32 + alpha * (y as i32 - x as i32) as f32) as u8)
        .collect();
    RgbImage {
        width: a.width,
        height: a.height,
        pixels,
    }
}

/// `str(x)` of a Python float: the shortest repr, with `.0` on whole numbers and Python's
/// exponent form outside 1e-4..1e16.
pub fn python_float(x: f64) -> String {
    if !x.is_finite() {
        return if x.is_nan() {
            "nan".into()
        } else if x > 0.0 {
            "inf".into()
        } else {
            "-inf".into()
        };
    }
    let a = x.abs();
    if a != 0.0 && !(1e-4..1e16).contains(&a) {
        // Rust: `1e-5`, `1.5e16`; Python: `1e-05`, `1.5e+16`.
        let s = format!("{x:e}");
        let (mantissa, exp) = s.split_once('e').unwrap_or((&s, "0"));
        let exp: i32 = exp.parse().unwrap_or(0);
        let sign = if exp < 0 { '-' } else { '+' };
        return format!("{mantissa}e{sign}{:02}", exp.abs());
    }
    let s = format!("{x}");
    if s.contains('.') {
        s
    } else {
        format!("{s}.0")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(w: u32, h: u32) -> RgbImage {
        RgbImage {
            width: w,
            height: h,
            pixels: (0..w * h * 3).map(|i| (i * 37 % 256) as u8).collect(),
        }
    }

    #[test]
    fn python_writes_floats_so() {
        for (x, s) in [
            (2.0, "2.0"),
            (0.45, "0.45"),
            (1.7, "1.7"),
            (100.0, "100.0"),
            (1e-5, "1e-05"),
            (2.5e16, "2.5e+16"),
            (0.0001, "0.0001"),
        ] {
            assert_eq!(python_float(x), s, "{x}");
        }
    }

    #[test]
    fn the_paste_crops_and_leaves_black_where_it_does_not_reach() {
        let img = image(6, 4);
        // Larger target: centred with black around.
        let out = paste_centred(&img, 8, 6);
        assert_eq!(&out.pixels[..3], &[0, 0, 0]);
        let at = |im: &RgbImage, x: usize, y: usize| {
            let i = (y * im.width as usize + x) * 3;
            im.pixels[i..i + 3].to_vec()
        };
        assert_eq!(at(&out, 1, 1), at(&img, 0, 0));
        assert_eq!(at(&out, 6, 4), at(&img, 5, 3));
        // Smaller target: the middle of the image.
        let out = paste_centred(&img, 2, 2);
        assert_eq!(at(&out, 0, 0), at(&img, 2, 1));
    }

    #[test]
    fn sizes_follow_a1111s_rounding() {
        let spec = ExtrasUpscale {
            target: UpscaleTarget::To {
                width: 150,
                height: 150,
                crop: false,
            },
            upscaler: Some(ImageUpscaler::Nearest),
            second: None,
        };
        // 40x56 by 3.75: 150x210, floored to multiples of 8.
        assert_eq!(spec.sizes(40, 56), ((150, 210), (144, 208)));
        let none = ExtrasUpscale {
            upscaler: None,
            ..spec.clone()
        };
        assert_eq!(none.sizes(40, 56), ((40, 56), (40, 56)));
        let tiny = ExtrasUpscale {
            target: UpscaleTarget::By(0.1),
            ..spec
        };
        assert_eq!(tiny.sizes(40, 56).1, (0, 0));
    }
}
