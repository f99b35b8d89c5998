//! A1111's inpainting, image side (`modules/processing.py`
//! `StableDiffusionProcessingImg2Img.init` and `apply_overlay`, `modules/masking.py`,
//! `modules/images.py` `resize_image`): the mask inverted and blurred (OpenCV), "only masked"'s
//! crop around it, and the overlay that gives back the kept pixels as sent. The latent side
//! (the latent mask and the blend each step) is in `pipeline/inpaint_blend.rs`.

pub mod blur;
pub mod composite;
pub mod crop;
pub mod fill;

pub use composite::Overlay;

use crate::pipeline::{check_latent_upscale_mask, ResizeMode, RgbImage};
use crate::{PipelineError, Result};

/// A1111's `inpainting_fill`: what the masked region starts from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MaskedContent {
    /// 0: the image blurred into the hole (`masking.fill`).
    Fill,
    /// 1: the image as it is.
    Original,
    /// 2: the masked latents replaced by noise.
    LatentNoise,
    /// 3: the masked latents zeroed.
    LatentNothing,
}

impl MaskedContent {
    /// The infotext's `Masked content` value; `original` writes none.
    pub fn infotext(self) -> Option<&'static str> {
        match self {
            Self::Fill => Some("fill"),
            Self::Original => None,
            Self::LatentNoise => Some("latent noise"),
            Self::LatentNothing => Some("latent nothing"),
        }
    }
}

/// A1111's inpainting options (`StableDiffusionProcessingImg2Img`'s fields).
#[derive(Debug, Clone, PartialEq)]
pub struct A1111Inpaint {
    /// `mask_blur_x`, `mask_blur_y`: Gaussian sigmas in pixels, 0 = none.
    pub mask_blur_x: u32,
    pub mask_blur_y: u32,
    /// `inpainting_mask_invert`: repaint what the mask leaves black.
    pub invert: bool,
    pub masked_content: MaskedContent,
    /// `inpaint_full_res` ("only masked") with `inpaint_full_res_padding` pixels around the
    /// mask; `None`: the whole picture.
    pub only_masked_padding: Option<u32>,
    /// `mask_round` (A1111's default true): the latent mask (and a 9-channel UNet's
    /// conditioning mask) rounded to 0 or 1; false keeps the processed mask's grey levels,
    /// so a blurred edge blends gradually.
    pub mask_round: bool,
}

/// What the model runs on, at the processing size, and what goes back over its results.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// The image to encode, `width` x `height`.
    pub image: RgbImage,
    /// A1111's `image_mask` at `width` x `height` (grey: R = G = B); `None` when "only
    /// masked" found a blank mask: A1111 then runs plain img2img.
    pub mask: Option<RgbImage>,
    /// Composited over every result (`None` with the blank mask).
    pub overlay: Option<Overlay>,
    /// "Only masked": where a result goes in the overlay, `(x, y, w, h)`.
    pub paste_to: Option<(usize, usize, usize, usize)>,
}

/// Pillow's RGB to L (ITU-R 601-2 luma in 16-bit fixed point, rounded).
pub fn luma(image: &RgbImage) -> Vec<u8> {
    image
        .pixels
        .chunks_exact(3)
        .map(|p| {
            ((p[0] as u32 * 19595 + p[1] as u32 * 38470 + p[2] as u32 * 7471 + 0x8000) >> 16) as u8
        })
        .collect()
}

/// An L image as RGB (Pillow's `convert('RGB')`, and what a paste of L into RGB gives).
pub fn grey(values: &[u8], width: usize, height: usize) -> RgbImage {
    RgbImage {
        width: width as u32,
        height: height as u32,
        pixels: values.iter().flat_map(|&v| [v, v, v]).collect(),
    }
}

/// `latmask`: `image_mask.convert('RGB').resize((w, h))` (Pillow's default, bicubic), its
/// first channel `/ 255`, `np.around` when `round` (`mask_round`): 1 = repaint, row-major `h`
/// x `w`.
pub fn latent_mask(mask: &RgbImage, w: usize, h: usize, round: bool) -> Vec<f32> {
    let small = crate::image_in::resize_with(mask, w, h, crate::image_in::Filter::Bicubic, None);
    // k / 255 is never exactly one half: rounding is a threshold.
    small
        .pixels
        .chunks_exact(3)
        .map(|p| p[0] as f32 / 255.0)
        .map(|v| if round { v.round() } else { v })
        .collect()
}

/// `if self.inpainting_fill != 1: image = masking.fill(image, latent_mask)`: every masked
/// content but "original" starts from the filled image (the latent ones change the latents
/// after).
fn fill_unless_original(image: RgbImage, mask: &RgbImage, content: MaskedContent) -> RgbImage {
    match content {
        MaskedContent::Original => image,
        _ => {
            let l: Vec<u8> = mask.pixels.chunks_exact(3).map(|p| p[0]).collect();
            fill::fill(&image, &l)
        }
    }
}

/// `StableDiffusionProcessingImg2Img.init`'s image side for one init image and its mask
/// (same size), to the processing size `width` x `height`. Over the whole picture both are
/// fitted by `resize_mode` after the mask's blur; "only masked" crops at the upload's size.
pub fn prepare(
    image: &RgbImage,
    mask: &RgbImage,
    width: usize,
    height: usize,
    options: &A1111Inpaint,
    resize_mode: ResizeMode,
) -> Result<Prepared> {
    if (image.width, image.height) != (mask.width, mask.height) {
        return Err(PipelineError::InvalidRequest(format!(
            "the mask is {}x{}, the image {}x{}: they must be the same size",
            mask.width, mask.height, image.width, image.height
        )));
    }
    let (mw, mh) = (mask.width as usize, mask.height as usize);
    let mut m = luma(mask);
    if options.invert {
        m.iter_mut().for_each(|v| *v = 255 - *v);
    }
    if options.mask_blur_x > 0 {
        blur::blur_horizontal(&mut m, mw, mh, options.mask_blur_x);
    }
    if options.mask_blur_y > 0 {
        blur::blur_vertical(&mut m, mw, mh, options.mask_blur_y);
    }
    let Some(padding) = options.only_masked_padding else {
        if resize_mode == ResizeMode::LatentUpscale {
            // At the request's size (the only one A1111 runs) the latent upscale is a no-op.
            check_latent_upscale_mask((image.width, image.height), width, height)
                .map_err(PipelineError::InvalidRequest)?;
        }
        let mode = resize_mode.image_index();
        let image_mask = crop::resize_image(mode, &grey(&m, mw, mh), width, height);
        // mask_for_overlay: the resized mask doubled (clipped), so the overlay keeps only
        // what the mask left well outside.
        let doubled: Vec<u8> = image_mask
            .pixels
            .chunks_exact(3)
            .map(|p| (p[0] as u32 * 2).min(255) as u8)
            .collect();
        let image = crop::resize_image(mode, image, width, height);
        return Ok(Prepared {
            overlay: Some(Overlay::new(&image, &doubled)),
            image: fill_unless_original(image, &image_mask, options.masked_content),
            mask: Some(image_mask),
            paste_to: None,
        });
    };
    let Some(region) = crop::crop_region(&m, mw, mh, padding) else {
        return Ok(Prepared {
            image: crop::resize_image(0, image, width, height),
            mask: None,
            overlay: None,
            paste_to: None,
        });
    };
    let region = crop::expand_crop_region(region, width, height, mw, mh);
    let (x1, y1, x2, y2) = region;
    let image_mask = crop::resize_image(2, &crop::crop(&grey(&m, mw, mh), region), width, height);
    let overlay = Overlay::new(image, &m);
    let image = crop::resize_image(2, &crop::crop(image, region), width, height);
    Ok(Prepared {
        image: fill_unless_original(image, &image_mask, options.masked_content),
        mask: Some(image_mask),
        overlay: Some(overlay),
        paste_to: Some((
            x1 as usize,
            y1 as usize,
            (x2 - x1) as usize,
            (y2 - y1) as usize,
        )),
    })
}
