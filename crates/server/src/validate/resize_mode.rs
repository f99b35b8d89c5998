//! The native `resize_mode`: how `init_image` (and `mask_image` with it) is fitted to `width` x
//! `height`, as A1111 img2img's `resize_mode` (`images.resize_image`, and 3's latent upscale).
//! A1111's inpainting (`inpaint`) fits them in the pipeline, after the mask's blur; every other
//! request gets them fitted here.

use sdserve_pipeline::image_in::resize_lanczos;
use sdserve_pipeline::inpaint_a1111::crop;
use sdserve_pipeline::pipeline::{check_latent_upscale_mask, ResizeMode, RgbImage};

/// The names, A1111's `resize_mode` 0..=3 in order.
pub const CHOICES: [(&str, ResizeMode); 4] = [
    ("just_resize", ResizeMode::JustResize),
    ("crop_and_resize", ResizeMode::CropAndResize),
    ("resize_and_fill", ResizeMode::ResizeAndFill),
    ("latent_upscale", ResizeMode::LatentUpscale),
];

/// The latent upscale encodes the init image at its own size: at least one latent cell, and
/// no larger a side than a request's own size may be.
pub const LATENT_UPSCALE_SIDE_MIN: u32 = 8;

/// The mode's native name.
pub fn name(mode: ResizeMode) -> &'static str {
    CHOICES[mode.a1111_index() as usize].0
}

/// What the mode asks of the init image (its size `init`), if it breaks a rule: the latent
/// upscale without a mask encodes it whole (a side `LATENT_UPSCALE_SIDE_MIN..=SIZE_MAX`); with
/// a mask over the whole picture A1111 runs it only at the request's size.
pub(super) fn rule(
    mode: ResizeMode,
    init: (u32, u32),
    mask_over_whole: Option<bool>,
    width: usize,
    height: usize,
) -> Option<String> {
    if mode != ResizeMode::LatentUpscale {
        return None;
    }
    match mask_over_whole {
        // "Only masked" cuts the region at the upload's size: the mode changes nothing.
        Some(false) => None,
        Some(true) => check_latent_upscale_mask(init, width, height).err(),
        None => {
            let max = super::SIZE_MAX as u32;
            let fits = |side: u32| (LATENT_UPSCALE_SIDE_MIN..=max).contains(&side);
            (!fits(init.0) || !fits(init.1)).then(|| {
                format!(
                    "latent_upscale encodes init_image at its own size: each side \
                     {LATENT_UPSCALE_SIDE_MIN}..={max} pixels (got {}x{})",
                    init.0, init.1
                )
            })
        }
    }
}

/// `image` fitted to `width` x `height` by `mode`; the latent upscale keeps it as it is.
pub(super) fn fit(image: &RgbImage, mode: ResizeMode, width: usize, height: usize) -> RgbImage {
    match mode {
        ResizeMode::JustResize => resize_lanczos(image, width, height),
        ResizeMode::LatentUpscale => image.clone(),
        other => crop::resize_image(other.a1111_index(), image, width, height),
    }
}
