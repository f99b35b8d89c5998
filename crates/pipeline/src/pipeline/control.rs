//! ControlNets in the denoising loop, as diffusers' `StableDiffusionControlNetPipeline`: each
//! control image prepared once (`prepare_image`: `VaeImageProcessor` with `do_normalize=False`,
//! PIL Lanczos to the request's size, `[0, 1]` RGB), and before every UNet evaluation each
//! ControlNet run on the UNet's own input rows (both halves of a guided batch, not guess mode)
//! with `conditioning_scale * controlnet_keep[i]`; several ControlNets' residuals summed
//! (`MultiControlNetModel`). A ControlNet outside its `[guidance_start, guidance_end]` is
//! skipped: diffusers runs it with scale 0, which adds exact zeros. With an init image (no
//! mask) this is `StableDiffusionControlNetImg2ImgPipeline`: the window counts the steps that
//! run (`controlnet_keep` over the strength's timesteps).

use std::sync::Arc;

use candle_core::Tensor;

use super::{GenerationParams, StableDiffusion};
use crate::controlnet::{ControlNetModel, ControlNetUnit};
use crate::unet::{AdditionalResiduals, UNet2DConditionModel};
use crate::{PipelineError, Result};

/// The request's ControlNets, loaded, with their images as tensors.
pub(super) struct ControlState {
    units: Vec<(ControlNetUnit, Arc<ControlNetModel>, Tensor)>,
}

/// The ControlNets at one step: which step of how many (diffusers' `i` and `len(timesteps)`).
#[derive(Clone, Copy)]
pub(super) struct StepControl<'a> {
    pub state: &'a ControlState,
    pub step: usize,
    pub steps: usize,
}

/// A control image as diffusers' control image processor makes it: `[1, 3, height, width]`
/// in `[0, 1]`.
fn control_image(unit: &ControlNetUnit, width: usize, height: usize) -> Result<Tensor> {
    let image = crate::image_in::resize_lanczos(&unit.image, width, height);
    let plane = width * height;
    let mut chw = vec![0f32; 3 * plane];
    for (i, px) in image.pixels.chunks_exact(3).enumerate() {
        for c in 0..3 {
            chw[c * plane + i] = px[c] as f32 / 255.0;
        }
    }
    Ok(Tensor::from_vec(
        chw,
        (1, 3, height, width),
        &candle_core::Device::Cpu,
    )?)
}

impl StableDiffusion {
    /// Loads the request's ControlNets (each handed over or read onto the pipeline's device in
    /// its dtype) and prepares their images; `None` without any. Refuses what the pipeline does
    /// not do with one: an inpainting mask (diffusers' ControlNet inpainting pipeline is not
    /// implemented), a hires pass, a ControlNet for another UNet, an empty image.
    pub(super) fn prepare_control(
        &self,
        params: &GenerationParams,
    ) -> Result<Option<ControlState>> {
        if params.controlnets.is_empty() {
            return Ok(None);
        }
        let refuse = |what: &str| {
            Err(PipelineError::InvalidRequest(format!(
                "ControlNets steer text-to-image and img2img only: {what} with a ControlNet is \
                 not supported"
            )))
        };
        if params.init_image.as_ref().is_some_and(|i| i.mask.is_some()) {
            return refuse("inpainting (an init image with a mask)");
        }
        if params.hires.is_some() {
            return refuse("the hires fix");
        }
        let mut units = Vec::with_capacity(params.controlnets.len());
        for unit in &params.controlnets {
            let name = &unit.model.name;
            let model = unit
                .model
                .load_on(&self.unet_config, &self.device, self.dtype)
                .map_err(|e| {
                    PipelineError::InvalidRequest(format!("the ControlNet {name:?}: {e}"))
                })?;
            model.fits(&self.unet_config).map_err(|e| {
                PipelineError::InvalidRequest(format!("the ControlNet {name:?} does not fit: {e}"))
            })?;
            let f = model.image_scale_factor();
            if f != self.vae_scale_factor {
                return Err(PipelineError::InvalidRequest(format!(
                    "the ControlNet {name:?} does not fit: its hint encoder scales images by \
                     1/{f}, the model's VAE by 1/{}",
                    self.vae_scale_factor
                )));
            }
            if unit.image.width == 0 || unit.image.height == 0 {
                return Err(PipelineError::InvalidRequest(format!(
                    "the ControlNet {name:?}'s image is empty"
                )));
            }
            let image = control_image(unit, params.width, params.height)?;
            units.push((unit.clone(), model, image));
        }
        Ok(Some(ControlState { units }))
    }
}

impl StepControl<'_> {
    /// The summed residuals of the ControlNets that steer this step, for a UNet input `x`
    /// (`rows` rows: the control image repeated) at `t` with `embeddings`; `None` when none
    /// steers.
    pub(super) fn residuals(
        &self,
        unet: &UNet2DConditionModel,
        x: &Tensor,
        t: &Tensor,
        embeddings: &Tensor,
    ) -> Result<Option<AdditionalResiduals>> {
        let rows = x.dim(0)?;
        let mut sum: Option<AdditionalResiduals> = None;
        for (unit, model, image) in &self.state.units {
            if !unit.steers(self.step, self.steps) {
                continue;
            }
            let cond = Tensor::cat(&vec![image; rows], 0)?;
            let r = model.forward(
                x,
                t,
                embeddings,
                &cond,
                unit.scale,
                unet.attention_slicing(),
            )?;
            sum = Some(match sum {
                None => r,
                Some(s) => s.add(&r)?,
            });
        }
        Ok(sum)
    }
}

/// `unet(x, t, embeddings, timestep_cond)` with the step's ControlNet residuals, if any.
pub(super) fn unet_forward(
    unet: &UNet2DConditionModel,
    x: &Tensor,
    t: &Tensor,
    embeddings: &Tensor,
    timestep_cond: Option<&Tensor>,
    control: Option<StepControl<'_>>,
) -> Result<Tensor> {
    let residuals = match control {
        Some(c) => c.residuals(unet, x, t, embeddings)?,
        None => None,
    };
    unet.forward_with_residuals(x, t, embeddings, timestep_cond, residuals.as_ref())
}
