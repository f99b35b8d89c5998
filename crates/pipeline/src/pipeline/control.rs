//! ControlNets in the denoising loop, as diffusers' `StableDiffusionControlNetPipeline`: each
//! control image prepared once (`prepare_image`: `VaeImageProcessor` with `do_normalize=False`,
//! PIL Lanczos to the request's size, `[0, 1]` RGB), and before every UNet evaluation each
//! ControlNet run on the UNet's own input rows (both halves of a guided batch, not guess mode)
//! with `conditioning_scale * controlnet_keep[i]`; several ControlNets' residuals summed
//! (`MultiControlNetModel`). A ControlNet outside its `[guidance_start, guidance_end]` is
//! skipped: diffusers runs it with scale 0, which adds exact zeros. With an init image (no
//! mask) this is `StableDiffusionControlNetImg2ImgPipeline`: the window counts the steps that
//! run (`controlnet_keep` over the strength's timesteps); with a mask
//! `StableDiffusionControlNetInpaintPipeline` (the ControlNet sees the noisy latents, not a
//! 9-channel UNet's mask and masked image). A1111's inpainting runs them as the
//! sd-webui-controlnet extension does (the same residuals; "only masked" crops the control
//! image as the init image). The hires fix runs them in both passes, each at its size, as the
//! extension's `hr_option` says ([`ControlPass`]). The extension's control modes weight each
//! unit's residuals and choose the rows of the batch they steer (`crate::controlnet::modes`):
//! the guided batch `[uncond x n, cond x n]` has the prompt from row `n` on; of two passes
//! (prompts of different lengths) the negative prompt's has none, the prompt's all.

use std::sync::Arc;

use candle_core::Tensor;

use super::{control_inpaint, GenerationParams, RgbImage, StableDiffusion};
use crate::controlnet::modes::residual_weights;
use crate::controlnet::preprocess::{recolor_post_process, Preprocessor, RecolorChannel};
use crate::controlnet::{CondRows, ControlNetModel, ControlNetUnit};
use crate::image_in::resize_lanczos;
use crate::ip_adapter::ImagePrompts;
use crate::unet::{AdditionalResiduals, UNet2DConditionModel};
use crate::{PipelineError, Result};

/// The request's ControlNets, loaded, with their images as tensors, for one pass.
pub(super) struct ControlState {
    units: Vec<(ControlNetUnit, Arc<ControlNetModel>, Tensor)>,
    /// The hires fix's second pass (where the extension forces soft weights on some units).
    hires: bool,
    /// The `inpaint_only` units' restores, in unit order (every step, whichever passes and
    /// steps the unit steers, as the extension's hook runs them).
    restores: Vec<super::control_inpaint::Restore>,
    /// The last `inpaint_only+lama` unit's image latents, in the first pass (the extension's
    /// `noise_modifier`, which each such unit sets in turn).
    noise_modifier: Option<Tensor>,
    /// The IP-Adapters' image keys and values (every step of every pass).
    image_prompts: Option<ImagePrompts>,
    /// An inpainting UNet's mask and masked-image channels from the last inpaint unit (see
    /// control_inpaint_channels.rs), on every evaluation of the pass.
    inpaint_channels: Option<Tensor>,
    /// The reference units that steer the pass (control_reference.rs).
    references: Option<super::control_reference::References>,
}

impl ControlState {
    /// Whether a UNet output needs [`StepControl::sigma`] (an `inpaint_only` unit's restore).
    pub(super) fn restores(&self) -> bool {
        !self.restores.is_empty()
    }

    /// Whether a UNet evaluation needs [`StepControl::sigma`] (a restore or a reference unit).
    pub(super) fn needs_sigma(&self) -> bool {
        self.restores() || self.references.is_some()
    }

    /// The latents `inpaint_only+lama` mixes into the starting noise, if any.
    pub(super) fn noise_modifier(&self) -> Option<&Tensor> {
        self.noise_modifier.as_ref()
    }

    /// An inpainting UNet's input (`[n, 9, h, w]`) with an inpaint unit's mask and masked
    /// image in place of the request's; as it is without such a unit.
    pub(super) fn unet_input(&self, input: Tensor, latent_channels: usize) -> Result<Tensor> {
        match &self.inpaint_channels {
            Some(c) => {
                super::control_inpaint_channels::with_unit_channels(&input, c, latent_channels)
            }
            None => Ok(input),
        }
    }
}

/// The ControlNets at one step: which step of how many (diffusers' `i` and `len(timesteps)`).
#[derive(Clone, Copy)]
pub(super) struct StepControl<'a> {
    pub state: &'a ControlState,
    pub step: usize,
    pub steps: usize,
    /// The training noise level at the step's timestep rounded (the restore's `t`), when
    /// [`ControlState::needs_sigma`].
    pub sigma: f64,
}

/// The pass a [`ControlState`] is prepared for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ControlPass {
    /// A request without a hires pass: every ControlNet steers it.
    Only,
    /// A hires request's first pass, or its second: each ControlNet as its `hr_option` says,
    /// the second with the unit's hires image (else its image) at the pass's size.
    First,
    Hires,
}

/// A1111's "only masked" inpainting: the init image's size and the region of it that is
/// repainted at the request's size.
#[derive(Debug, Clone, Copy)]
pub(super) struct MaskedCrop {
    pub image_size: (usize, usize),
    pub region: crate::inpaint_a1111::crop::Region,
}

impl MaskedCrop {
    /// The sd-webui-controlnet extension's `try_crop_image_with_a1111_mask` (its default
    /// `inpaint_crop_input_image`): the control image resized to the init image's size
    /// (`resize_image` 0: the native Just Resize), cropped to the region and fitted to the
    /// request's size by `resize_image` 2 (resize and fill), as A1111 crops the init image.
    pub(super) fn apply(&self, image: &RgbImage, width: usize, height: usize) -> RgbImage {
        use crate::inpaint_a1111::crop;
        let (iw, ih) = self.image_size;
        let whole = crop::resize_image(0, image, iw, ih);
        crop::resize_image(2, &crop::crop(&whole, self.region), width, height)
    }
}

/// The crop of A1111's "only masked" inpainting (`prepared`), if it crops.
pub(super) fn masked_crop(
    params: &GenerationParams,
    prepared: Option<&crate::inpaint_a1111::Prepared>,
) -> Option<MaskedCrop> {
    let (x, y, w, h) = prepared?.paste_to?;
    let init = &params.init_image.as_ref()?.image;
    let at = |v: usize| v as i64;
    Some(MaskedCrop {
        image_size: (init.width as usize, init.height as usize),
        region: (at(x), at(y), at(x + w), at(y + h)),
    })
}

impl StableDiffusion {
    /// The UNet config a ControlNet for this model has (what it must fit; a single file's
    /// config): the UNet's, taking the VAE's latent channels. A 9-channel inpainting UNet's
    /// ControlNets see only the noisy latents, as diffusers' ControlNet inpaint pipeline feeds
    /// them (`control_model_input` before the mask and masked image join) and the extension
    /// cuts them (`x[:, :4]`).
    pub fn controlnet_unet_config(&self) -> crate::unet::UNetConfig {
        crate::unet::UNetConfig {
            in_channels: self.vae_latent_channels,
            ..self.unet_config.clone()
        }
    }

    /// The request's IP-Adapters' keys and values: each adapter and its image encoder read
    /// onto the pipeline's device in its dtype, the images encoded once for every pass (the
    /// hires pass reuses them: they do not depend on the pass's size). `None` without any.
    pub(super) fn prepare_image_prompts(
        &self,
        params: &GenerationParams,
    ) -> Result<Option<ImagePrompts>> {
        ImagePrompts::prepare(
            &params.ip_adapters,
            &self.unet_config,
            &self.device,
            self.dtype,
        )
    }

    /// Loads the request's ControlNets that steer `pass` (each handed over or read onto the
    /// pipeline's device in its dtype) and prepares their images at `params`' size (the
    /// pass's), cropped as A1111's "only masked" inpainting crops the init image (each unit
    /// whose `inpaint_crop` says so), beside the request's `image_prompts` (the same in every
    /// pass: [`StableDiffusion::prepare_image_prompts`]); `None` without any. Refuses a
    /// ControlNet for another UNet and an empty image.
    pub(super) fn prepare_control(
        &self,
        params: &GenerationParams,
        pass: ControlPass,
        crop: Option<MaskedCrop>,
        image_prompts: Option<&ImagePrompts>,
    ) -> Result<Option<ControlState>> {
        let config = self.controlnet_unet_config();
        let mut units = Vec::with_capacity(params.controlnets.len());
        let mut restores = Vec::new();
        let mut noise_modifier = None;
        let mut inpaint_channels = None;
        for unit in &params.controlnets {
            let name = &unit.model.name;
            let model = unit
                .model
                .load_on(&config, &self.device, self.dtype)
                .map_err(|e| {
                    PipelineError::InvalidRequest(format!("the ControlNet {name:?}: {e}"))
                })?;
            model.fits(&config).map_err(|e| {
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
            let image = match (pass, &unit.hires_image) {
                (ControlPass::Hires, Some(hires)) => hires,
                _ => &unit.image,
            };
            if image.width == 0 || image.height == 0 {
                return Err(PipelineError::InvalidRequest(format!(
                    "the ControlNet {name:?}'s image is empty"
                )));
            }
            let (fitted, mask) = control_inpaint::fitted_feed(unit, pass, crop, params);
            if let Some(m) = mask
                .as_deref()
                .filter(|_| control_inpaint::restores(unit, params))
            {
                let restore = self.restore_of(unit, &fitted, m)?;
                let lama = unit.preprocessor == Some(Preprocessor::InpaintOnlyLama);
                if lama && pass != ControlPass::Hires && params.lama_noise {
                    noise_modifier = Some(restore.latents().clone());
                }
                restores.push(restore);
            }
            if let Some(m) = mask.as_deref().filter(|_| self.is_inpainting()) {
                inpaint_channels = Some(self.unit_inpaint_channels(&fitted, m)?);
            }
            if !unit.steers_pass(pass == ControlPass::Hires, pass != ControlPass::Only) {
                continue;
            }
            let image = control_inpaint::hint(&fitted, mask.as_deref())?;
            units.push((unit.clone(), model, image));
        }
        let image_prompts = image_prompts.cloned();
        let references = self.prepare_references(params, pass)?;
        let any = !units.is_empty()
            || !restores.is_empty()
            || image_prompts.is_some()
            || inpaint_channels.is_some()
            || references.is_some();
        Ok(any.then_some(ControlState {
            units,
            hires: pass == ControlPass::Hires,
            restores,
            noise_modifier,
            image_prompts,
            inpaint_channels,
            references,
        }))
    }
}

/// The recolor units' final control maps (the extension's `hr_control` after a hires pass,
/// else `control`), each with the channel its post-processing replaces: the unit's image (its
/// hires image in the hires pass) fitted to `params`' size as [`StableDiffusion::prepare_control`]
/// fits it, whichever passes the unit steers (the extension makes both maps regardless).
fn recolor_maps(
    params: &GenerationParams,
    pass: ControlPass,
    crop: Option<MaskedCrop>,
) -> Vec<(RecolorChannel, RgbImage)> {
    let (w, h) = (params.width, params.height);
    params
        .controlnets
        .iter()
        .filter_map(|unit| {
            let channel = unit.preprocessor.as_ref()?.recolor_channel()?;
            let image = match (pass, &unit.hires_image) {
                (ControlPass::Hires, Some(hires)) => hires,
                _ => &unit.image,
            };
            let map = match crop {
                Some(c) if unit.inpaint_crop => resize_lanczos(&c.apply(image, w, h), w, h),
                _ => resize_lanczos(image, w, h),
            };
            Some((channel, map))
        })
        .collect()
}

/// The post-processing of decoded images: the `inpaint_only` units' feeds (image, blurred
/// mask) and the recolor units' maps, for [`to_rgb8_post_processed`].
pub(super) struct PostProcessing {
    inpaint: Vec<(RgbImage, Vec<f32>)>,
    recolor: Vec<(RecolorChannel, RgbImage)>,
}

impl PostProcessing {
    /// The request's post-processing after `pass` (the extension's `hr_control` after a
    /// hires pass).
    pub(super) fn of(
        params: &GenerationParams,
        pass: ControlPass,
        crop: Option<MaskedCrop>,
    ) -> Self {
        Self {
            inpaint: control_inpaint::post_feeds(params, pass, crop),
            recolor: recolor_maps(params, pass, crop),
        }
    }
}

/// A decoded image (`[1, 3, h, w]` in `[-1, 1]`) to RGB8: diffusers' rounding, or with
/// post-processing units A1111's truncation after the `inpaint_only` units' (on the clamped
/// floats), followed by each recolor unit's in order (the extension's `postprocess_batch`;
/// every image of a batch takes the unit's one map). The extension runs its post-processors
/// in unit order; here `inpaint_only`'s come first.
pub(super) fn to_rgb8_post_processed(decoded: &Tensor, post: &PostProcessing) -> Result<RgbImage> {
    if post.inpaint.is_empty() && post.recolor.is_empty() {
        return super::postprocess(decoded);
    }
    let mut image = match post.inpaint.is_empty() {
        true => super::decode::postprocess_truncated(decoded)?,
        false => {
            let (_, _, h, w) = decoded.dims4()?;
            let values = control_inpaint::post_process(decoded, &post.inpaint)?;
            RgbImage {
                width: w as u32,
                height: h as u32,
                pixels: values.into_iter().map(|v| (255.0 * v) as u8).collect(),
            }
        }
    };
    for (channel, map) in &post.recolor {
        image = recolor_post_process(&image, map, *channel);
    }
    Ok(image)
}

impl StepControl<'_> {
    /// The summed residuals of the ControlNets that steer this step, for a UNet input `x`
    /// (its rows: the control image repeated) at `t` with `embeddings`, whose rows `cond`
    /// carry the prompt; `None` when none steers. Each unit's residuals are weighted as its
    /// control mode says; one that steers the prompt's rows only (the extension's
    /// `cfg_injection`, or a pooling ControlNet) runs on those rows alone, zeros on the
    /// others, as `control * cond_mark` leaves them.
    pub(super) fn residuals(
        &self,
        unet: &UNet2DConditionModel,
        x: &Tensor,
        t: &Tensor,
        embeddings: &Tensor,
        cond: CondRows,
    ) -> Result<Option<AdditionalResiduals>> {
        let rows = x.dim(0)?;
        let mut sum: Option<AdditionalResiduals> = None;
        for (unit, model, image) in &self.state.units {
            if !unit.steers(self.step, self.steps) {
                continue;
            }
            let cond_only = unit.control_mode.cond_only() || model.config().global_pool_conditions;
            let first = match cond_only {
                false => 0,
                true => match cond.first(rows) {
                    Some(first) => first,
                    None => continue,
                },
            };
            let n = rows - first;
            let weights = residual_weights(
                unit.scale,
                model.residual_count(),
                unit.soft_weights(self.state.hires),
            )?;
            let image = Tensor::cat(&vec![image; n], 0)?;
            // The noisy latents alone: a 9-channel UNet's input also holds the mask and the
            // masked image's latents after them.
            let latents = x
                .narrow(0, first, n)?
                .narrow(1, 0, model.config().unet.in_channels.min(x.dim(1)?))?
                .contiguous()?;
            let r = model
                .forward_weighted(
                    &latents,
                    &t.narrow(0, first, n)?,
                    &embeddings.narrow(0, first, n)?,
                    &image,
                    &weights,
                    unet.attention_slicing(),
                )?
                .after_zero_rows(first)?;
            sum = Some(match sum {
                None => r,
                Some(s) => s.add(&r)?,
            });
        }
        Ok(sum)
    }
}

/// `unet(x, t, embeddings, timestep_cond)` with the step's ControlNet residuals and image
/// prompts, if any; `cond`: the rows of `x` that carry the prompt.
pub(super) fn unet_forward(
    unet: &UNet2DConditionModel,
    x: &Tensor,
    t: &Tensor,
    embeddings: &Tensor,
    timestep_cond: Option<&Tensor>,
    control: Option<StepControl<'_>>,
    cond: CondRows,
) -> Result<Tensor> {
    let residuals = match control {
        Some(c) => c.residuals(unet, x, t, embeddings, cond)?,
        None => None,
    };
    let tokens = match control.and_then(|c| c.state.image_prompts.as_ref()) {
        Some(prompts) => {
            let step = control.map(|c| (c.step, c.steps));
            Some(prompts.for_step(x.dim(0)?, cond, step)?)
        }
        None => None,
    };
    let banks = match control {
        Some(c) => match &c.state.references {
            Some(refs) => {
                let e = super::control_reference::Evaluation {
                    unet,
                    x,
                    t,
                    embeddings,
                    timestep_cond,
                    cond,
                    step: c.step,
                    steps: c.steps,
                    sigma: c.sigma,
                };
                refs.write(&e)?
            }
            None => None,
        },
        None => None,
    };
    let out = unet.forward_hooked(
        x,
        t,
        embeddings,
        timestep_cond,
        (residuals.as_ref(), tokens.as_ref()),
        banks,
    )?;
    match control {
        Some(c) if c.state.restores() => {
            control_inpaint::restore(&c.state.restores, x, &out, c.sigma)
        }
        _ => Ok(out),
    }
}
