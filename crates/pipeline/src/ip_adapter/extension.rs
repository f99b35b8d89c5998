//! IP-Adapter units as the sd-webui-controlnet extension runs them (A1111 requests), where it
//! differs from diffusers (`scripts/ipadapter/`, `annotator/clipvision`):
//! - the `clip` preprocessor stretches the image to the encoder's square with OpenCV's
//!   `INTER_AREA` (no centre crop: the aspect is not kept), and an RGBA input's mask
//!   (`255 - alpha`) multiplies the normalised pixel values;
//! - several images of a unit average their tokens (`ImageEmbed.average_of`), the negative
//!   side's too;
//! - a Plus adapter's negative side is the Resampler of `clip_vision_h_uc`, hidden states the
//!   extension ships precomputed (a torch pickle `{"uc": [1, 257, 1280]}`), not of a zero image;
//! - the unit adds its term only while the sampling percent (step / steps) is within
//!   `[guidance_start, guidance_end]` (`patch_forward`).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use super::{ImageEncoderModel, IpAdapterModel};
use crate::pipeline::RgbImage;
use crate::{PipelineError, Result};

/// One image of an extension unit, with its RGBA input's alpha where the unit had a mask.
#[derive(Debug, Clone, PartialEq)]
pub struct ExtensionImage {
    pub image: RgbImage,
    /// `[height * width]`, the alpha channel the extension's `clip` preprocessor reads.
    pub alpha: Option<Vec<u8>>,
}

/// How the extension runs a unit; its `IpAdapterUnit::image` is not used then.
#[derive(Debug, Clone, PartialEq)]
pub struct ExtensionRun {
    /// The unit's images (at least one): their tokens are averaged.
    pub images: Vec<ExtensionImage>,
    pub guidance_start: f64,
    pub guidance_end: f64,
    /// The extension's `clip_vision_h_uc.data` for a Plus adapter's negative side; `None`:
    /// the hidden states of zero pixel values (diffusers').
    pub plus_uncond: Option<PathBuf>,
    /// What the caller records of the unit (its infotext entry); the pipeline does not read it.
    pub record: Option<ExtensionRecord>,
}

/// An A1111 unit's place among the request's enabled ControlNet units (the infotext numbers
/// them in request order) and its infotext entry (`ControlNetUnit.serialize`).
#[derive(Debug, Clone, PartialEq)]
pub struct ExtensionRecord {
    pub position: usize,
    pub infotext: String,
}

/// `patch_forward`'s test: a unit adds nothing when `step / steps` (the sampling percent) is
/// outside its window `(guidance_start, guidance_end)`.
pub(super) fn steers(window: (f64, f64), step: usize, steps: usize) -> bool {
    let percent = step as f64 / steps.max(1) as f64;
    !(percent < window.0 || percent > window.1)
}

impl ImageEncoderModel {
    /// The extension's `clip` preprocessor (`ClipVisionDetector.__call__`) up to the encoder:
    /// `cv2.resize` with `INTER_AREA` to the encoder's square, CLIP's processor (its resize and
    /// crop are the identity there), then the pixel values times `(255 - alpha) / 255`.
    pub fn extension_pixels(&self, input: &ExtensionImage) -> Result<Tensor> {
        let size = self.model.config().image_size;
        let (w, h) = (input.image.width as usize, input.image.height as usize);
        if w == 0 || h == 0 || input.image.pixels.len() != w * h * 3 {
            return Err(PipelineError::InvalidRequest(
                "the IP-Adapter image is empty".into(),
            ));
        }
        let resize = crate::controlnet::preprocess::resize_area_any;
        let square = resize(&input.image, size, size);
        let pixels = self.processor.preprocess(&square, &Device::Cpu)?;
        let Some(alpha) = &input.alpha else {
            return Ok(pixels);
        };
        if alpha.len() != w * h {
            return Err(PipelineError::InvalidRequest(format!(
                "the IP-Adapter mask has {} values, the image {w}x{h}",
                alpha.len()
            )));
        }
        // OpenCV resizes the alpha channel with the colours, each channel alike.
        let grey = RgbImage {
            width: w as u32,
            height: h as u32,
            pixels: alpha.iter().flat_map(|&a| [a, a, a]).collect(),
        };
        let kept: Vec<f32> = resize(&grey, size, size)
            .pixels
            .chunks(3)
            .map(|p| f32::from(255 - p[0]) / 255.0)
            .collect();
        let kept = Tensor::from_vec(kept, (1, 1, size, size), &Device::Cpu)?;
        Ok(pixels.broadcast_mul(&kept)?)
    }
}

/// The extension's `uc` tensor (`torch.load(path)["uc"]`), f32 on the CPU.
pub fn read_uncond_states(path: &Path) -> Result<Tensor> {
    let state = crate::upscaler::state::read_state(path)?;
    let uc = state.get("uc").ok_or_else(|| PipelineError::Weights {
        path: path.to_path_buf(),
        message: "no \"uc\" tensor (the extension's clip_vision_h_uc.data holds one)".into(),
    })?;
    Ok(uc.to_dtype(DType::F32)?)
}

/// A unit's `[uncond, cond]` tokens as the extension makes them (`_get_image_embeds` of each
/// image, then `ImageEmbed.average_of`): `[2, tokens, cross_attention_dim]`.
pub fn unit_tokens(
    adapter: &IpAdapterModel,
    encoder: &ImageEncoderModel,
    run: &ExtensionRun,
) -> Result<Tensor> {
    let (device, dtype) = (adapter.device(), adapter.dtype());
    let on = |t: &Tensor| t.to_device(device)?.to_dtype(dtype);
    let plus_uncond = match (&run.plus_uncond, adapter.takes_hidden_states()) {
        (Some(path), true) => Some(on(&read_uncond_states(path)?)?),
        _ => None,
    };
    // The zero image's states (the Plus negative side without the `uc` file) are the same for
    // every image of the unit: encoded once, when first needed.
    let mut zero_states: Option<Tensor> = None;
    let mut sum: Option<Tensor> = None;
    for input in &run.images {
        let pixels = encoder.extension_pixels(input)?;
        let out = encoder
            .model
            .forward(&pixels, adapter.takes_hidden_states())?;
        let (cond, uncond) = match (out.penultimate, &plus_uncond) {
            (Some(states), Some(uc)) => (on(&states)?, uc.clone()),
            (Some(states), None) => {
                let zero = match &zero_states {
                    Some(z) => z.clone(),
                    None => on(&encoder.penultimate(&pixels.zeros_like()?)?)?,
                };
                zero_states = Some(zero.clone());
                (on(&states)?, zero)
            }
            (None, _) => {
                let embeds = on(&out.image_embeds)?;
                (embeds.clone(), embeds.zeros_like()?)
            }
        };
        let tokens = adapter.image_tokens(&Tensor::cat(&[&uncond, &cond], 0)?)?;
        sum = Some(match sum {
            Some(s) => (s + tokens)?,
            None => tokens,
        });
    }
    let sum = sum.ok_or_else(|| {
        PipelineError::InvalidRequest("an IP-Adapter unit without an image".into())
    })?;
    Ok((sum / run.images.len() as f64)?)
}
