//! `inpaint_only+lama` units of A1111 requests, painted in the extension's order
//! (controlnet.py's `get_control` and its `preprocess_input_image`): the unit's RGBA feed, cut
//! to "only masked"'s region where it is, goes to LaMa whole; only "Resize and Fill" fits it
//! first (the extension's "outpaint fix"), to the hires pass's size when there is one (its
//! `hr_y`, `hr_x`), else the request's; then each pass's image and mask is LaMa's map fitted
//! by the unit's resize mode (`detectmap_proc` at that pass's size), so "Crop and Resize"
//! crops the painted image, and the hires pass takes the painted map too. Run once the hires
//! size is known, after validation (the native unit was validated as `inpaint_only` with the
//! fitted feed, and takes LaMa's preprocessor here).

use sdserve_pipeline::controlnet::preprocess::Preprocessor;
use sdserve_pipeline::pipeline::RgbImage;

use super::controlnet::bad;
use super::controlnet_fit::{fit, fit_mask, ResizeMode};
use crate::error::ApiError;
use crate::images::RequestImage;

/// One `inpaint_only+lama` unit's feed, kept to be painted.
#[derive(Debug)]
pub(super) struct LamaFeed {
    /// Its native index; `arg`: its index in the list (errors name it).
    pub(super) index: usize,
    pub(super) arg: usize,
    pub(super) rgb: RgbImage,
    /// The feed's alpha (the mask), grey in three channels, at `rgb`'s size.
    pub(super) alpha: RgbImage,
    pub(super) mode: ResizeMode,
}

fn request_image(image: RgbImage) -> RequestImage {
    RequestImage {
        sha256: crate::images::digest(&image),
        image,
    }
}

/// Paints each feed and gives its unit the map and mask at the first pass's size (`valid`'s)
/// and, with a hires pass of size `hires`, at that size.
pub(super) fn paint(
    feeds: &[LamaFeed],
    valid: &mut crate::validate::ValidRequest,
    hires: Option<(usize, usize)>,
) -> Result<(), ApiError> {
    let size = (valid.width, valid.height);
    for f in feeds {
        let Some(unit) = valid.controlnets.get_mut(f.index) else {
            continue;
        };
        let (rgb, alpha) = match f.mode {
            ResizeMode::ResizeAndFill => {
                let (w, h) = hires.unwrap_or(size);
                (fit(&f.rgb, f.mode, w, h), fit_mask(&f.alpha, f.mode, w, h))
            }
            _ => (f.rgb.clone(), f.alpha.clone()),
        };
        let first: Vec<u8> = alpha.pixels.iter().step_by(3).copied().collect();
        let lama = Preprocessor::InpaintOnlyLama;
        let map = crate::validate::preprocessor::run_with_mask(&lama, &rgb, &first, f.arg)
            .map_err(|e| bad(e.replace("].preprocessor.type", "].module")))?;
        let at = |(w, h): (usize, usize)| {
            (
                request_image(fit(&map, f.mode, w, h)),
                request_image(fit_mask(&alpha, f.mode, w, h)),
            )
        };
        let (image, mask) = at(size);
        unit.image = image;
        unit.mask = Some(mask);
        (unit.hires_image, unit.hires_mask) = match hires.map(at) {
            Some((image, mask)) => (Some(image), Some(mask)),
            None => (None, None),
        };
        unit.preprocessor = Some(lama);
    }
    Ok(())
}
