//! How an init image (and its mask) is fitted to the request's size: A1111 img2img's
//! `resize_mode` (`StableDiffusionProcessingImg2Img.init`, `images.resize_image`). 0 stretches
//! it, 1 covers the size and crops the centre, 2 fits it and fills the borders; 3, "Just resize
//! (latent upscale)", encodes the image at its own size and resizes the latents
//! (`torch.nn.functional.interpolate(init_latent, size=(height // 8, width // 8),
//! mode="bilinear")`).

use candle_core::Tensor;

use super::InitImage;
use crate::interpolate::{interpolate, Interpolation, InterpolationMode};
use crate::{PipelineError, Result};

/// A1111's `resize_mode` 0..=3.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum ResizeMode {
    /// 0: "Just resize" (Lanczos to the size; diffusers' behaviour too).
    #[default]
    JustResize,
    /// 1: "Crop and resize".
    CropAndResize,
    /// 2: "Resize and fill".
    ResizeAndFill,
    /// 3: "Just resize (latent upscale)".
    LatentUpscale,
}

impl ResizeMode {
    /// A1111's number for the mode.
    pub fn a1111_index(self) -> u8 {
        match self {
            Self::JustResize => 0,
            Self::CropAndResize => 1,
            Self::ResizeAndFill => 2,
            Self::LatentUpscale => 3,
        }
    }

    pub fn from_a1111_index(index: u64) -> Option<Self> {
        [
            Self::JustResize,
            Self::CropAndResize,
            Self::ResizeAndFill,
            Self::LatentUpscale,
        ]
        .get(index as usize)
        .copied()
    }

    /// The mode `images.resize_image` applies to a mask under this one: A1111 resizes the
    /// whole picture's mask with `resize_image(self.resize_mode, ...)`, whose last branch (2's
    /// fill) takes 3 too.
    pub fn image_index(self) -> u8 {
        match self {
            Self::LatentUpscale => 2,
            other => other.a1111_index(),
        }
    }
}

/// The latent upscale with a mask over the whole picture runs at the request's size only (where
/// it changes nothing): at another, A1111 keeps the image and its overlay at the upload's size
/// and the result at the request's, so `masking.fill` fails and `apply_overlay` pastes the
/// overlay over the result's corner, cropped: no picture to reproduce.
pub fn check_latent_upscale_mask(
    image: (u32, u32),
    width: usize,
    height: usize,
) -> std::result::Result<(), String> {
    if (image.0 as usize, image.1 as usize) == (width, height) {
        return Ok(());
    }
    Err(format!(
        "the latent upscale with a mask over the whole picture needs the init image at the \
         request's size ({width}x{height}, got {}x{}): at another, A1111's overlay keeps the \
         image's size and lands on the result's corner",
        image.0, image.1
    ))
}

/// The init image (and mask) fitted to `width` x `height` by `mode`, as A1111's
/// `resize_image`; an image already that size is left alone (every mode keeps it). The latent
/// upscale leaves the image at its own size (its latents are resized after encoding); with a
/// mask it needs that size already.
pub(super) fn fit_init(
    init: &InitImage,
    mode: ResizeMode,
    width: usize,
    height: usize,
) -> Result<InitImage> {
    let size = (init.image.width as usize, init.image.height as usize);
    let index = match mode {
        _ if size == (width, height) => return Ok(init.clone()),
        ResizeMode::JustResize => return Ok(init.clone()),
        ResizeMode::LatentUpscale => {
            if init.mask.is_some() {
                check_latent_upscale_mask((init.image.width, init.image.height), width, height)
                    .map_err(PipelineError::InvalidRequest)?;
            }
            return Ok(init.clone());
        }
        other => other.a1111_index(),
    };
    let fit = |im| crate::inpaint_a1111::crop::resize_image(index, im, width, height);
    Ok(InitImage {
        image: fit(&init.image),
        mask: init.mask.as_ref().map(fit),
        strength: init.strength,
    })
}

/// A1111's latent upscale of the init latents `[N, C, h, w]` to `height` x `width` latent
/// cells: torch's bilinear `interpolate` (no antialias, `align_corners=False`).
pub(super) fn upscale_latents(latents: &Tensor, height: usize, width: usize) -> Result<Tensor> {
    let how = Interpolation {
        mode: InterpolationMode::Bilinear,
        antialias: false,
    };
    let up = interpolate(
        &latents.to_dtype(candle_core::DType::F32)?,
        height,
        width,
        how,
    )?;
    Ok(up.to_dtype(latents.dtype())?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::RgbImage;

    fn image(w: u32, h: u32) -> RgbImage {
        RgbImage {
            width: w,
            height: h,
            pixels: (0..w * h * 3).map(|i| (i % 251) as u8).collect(),
        }
    }

    #[test]
    fn indices_round_trip_and_3_fits_masks_as_2() {
        for i in 0..4 {
            assert_eq!(
                ResizeMode::from_a1111_index(i).unwrap().a1111_index() as u64,
                i
            );
        }
        assert_eq!(ResizeMode::from_a1111_index(4), None);
        assert_eq!(ResizeMode::LatentUpscale.image_index(), 2);
        assert_eq!(ResizeMode::CropAndResize.image_index(), 1);
    }

    #[test]
    fn crop_and_fill_fit_image_and_mask_and_the_latent_upscale_keeps_them() {
        let init = InitImage {
            image: image(40, 24),
            mask: Some(image(40, 24)),
            strength: 0.5,
        };
        let fitted = fit_init(&init, ResizeMode::CropAndResize, 16, 16).unwrap();
        let want = crate::inpaint_a1111::crop::resize_image(1, &init.image, 16, 16);
        assert_eq!(fitted.image, want);
        assert_eq!(fitted.mask.unwrap(), want);
        let same = InitImage {
            mask: None,
            ..init.clone()
        };
        assert_eq!(
            fit_init(&same, ResizeMode::LatentUpscale, 16, 16).unwrap(),
            same
        );
        let err = fit_init(&init, ResizeMode::LatentUpscale, 16, 16).unwrap_err();
        assert!(err.to_string().contains("16x16"), "{err}");
        assert!(fit_init(&init, ResizeMode::LatentUpscale, 40, 24).is_ok());
    }
}
