//! A1111's "hires fix" (`StableDiffusionProcessingTxt2Img.sample_hr_pass`) as stages after
//! text-to-image's `denoise`: the latents are upscaled (in latent space with torch's
//! `interpolate`, or decoded to 8 bits as A1111 truncates them, resized as an image and
//! encoded again), cropped in latent cells (`truncate_x/y`), and denoised once more at the
//! larger size as img2img (this crate's `images_in`, on the request's `StepRule`), each image with a
//! generator seeded like the first pass's. References: `tools/make_hires_fixtures.py`.

use std::ops::ControlFlow;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use super::{
    decode::postprocess_truncated,
    images_in::{self, LatentCrop},
    GenerationParams, RgbImage, StableDiffusion, StepHook, StepProgress,
};
use crate::image_in::{self, resize_lanczos};
use crate::interpolate::{interpolate, Interpolation};
use crate::rng::TorchRng;
use crate::schedulers::{Scheduler, SchedulerKind};
use crate::upscale::{ImageUpscaler, ModelUpscaler, NETWORK_DTYPE};
use crate::{PipelineError, Result};

/// The second pass of a text-to-image request.
#[derive(Debug, Clone, PartialEq)]
pub struct Hires {
    /// The size of the final image: whole latent cells.
    pub width: usize,
    pub height: usize,
    /// The size upscaled to (A1111's `hr_upscale_to_x/y`, any size): the latents are
    /// interpolated to its whole cells, or the image resized to it exactly and encoded (the
    /// VAE floors it to whole cells); then A1111's crop to `width` x `height`: of the
    /// `truncate = upscale / f - width / f` cells too many, `truncate / 2` go off the left
    /// (top), the rest off the right (bottom).
    pub upscale_width: usize,
    pub upscale_height: usize,
    pub upscaler: Upscaler,
    /// The second pass's steps and img2img strength: under diffusers' rule a schedule of
    /// `steps` of which `int(steps * strength)` run; under A1111's (`GenerationParams::
    /// step_rule`) `steps` of a schedule stretched to `int(steps / min(strength, 0.999))`.
    pub steps: usize,
    pub strength: f64,
    /// `None`: the first pass's scheduler (and sigma schedule); a scheduler given here runs on
    /// `schedule`, or on its name's own schedule.
    pub scheduler: Option<SchedulerKind>,
    /// The sigma schedule of the pass's own `scheduler` (A1111's `hr_scheduler`: the first
    /// pass's sampler on another schedule type is a scheduler of its own); ignored without one.
    pub schedule: Option<crate::schedulers::SigmaSchedule>,
    /// `None`: the first pass's prompt (and negative prompt).
    pub prompt: Option<String>,
    pub negative_prompt: Option<String>,
}

/// How the first pass's result is brought to the larger size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Upscaler {
    /// A1111's `None`: the decoded image resized with Lanczos (`images.resize_image`).
    Resize,
    /// A1111's `Lanczos` / `Nearest` upscalers (`Upscaler.upscale`, [`crate::upscale::upscale`]):
    /// the decoded image scaled by `max(w / w0, h / h0)` with that filter (where it is below
    /// that size floored to a multiple of 8), then Lanczos to that multiple of 8 and to the
    /// size where those differ.
    Lanczos,
    Nearest,
    /// A1111's `Latent ...` modes: the latents themselves, interpolated.
    Latent(Interpolation),
    /// An ESRGAN model (A1111's `UpscalerESRGAN`): the decoded image through the model's
    /// rounds (`Upscaler.upscale`, [`crate::upscaler::upscale_by`]) by `max(w / w0, h / h0)`,
    /// then Lanczos to the size where those differ (`images.resize_image`). Its network runs
    /// where it was loaded (one handed over), else it is read onto the pipeline's device.
    Model(Arc<ModelUpscaler>),
}

impl Upscaler {
    fn on_image(&self) -> bool {
        !matches!(self, Self::Latent(_))
    }
}

impl Hires {
    /// The first pass's image brought to `upscale_width` x `upscale_height` (A1111's
    /// `images.resize_image`; the crop comes after the encode). Only a model fails (its file,
    /// its device) or stops (`check` breaks before a tile: `Cancelled`); an unread model is
    /// read onto `device` in `dtype`.
    pub fn upscale_image(
        &self,
        image: &RgbImage,
        (device, dtype): (&Device, DType),
        check: &mut dyn FnMut() -> ControlFlow<()>,
    ) -> Result<RgbImage> {
        let (w, h) = (self.upscale_width, self.upscale_height);
        let (w0, h0) = (image.width as f64, image.height as f64);
        let scale = (w as f64 / w0).max(h as f64 / h0);
        Ok(match &self.upscaler {
            // `images.resize_image`'s `resize`: the upscaler only where the image grows, then
            // Lanczos to the size where it is not that already.
            Upscaler::Model(m) if scale > 1.0 => {
                let net = m
                    .load_on(device, dtype)
                    .map_err(PipelineError::InvalidRequest)?;
                let up = crate::upscaler::upscale_by_checked(net, image, scale, check)?;
                if (up.width as usize, up.height as usize) != (w, h) {
                    resize_lanczos(&up, w, h)
                } else {
                    up
                }
            }
            Upscaler::Lanczos | Upscaler::Nearest if scale > 1.0 => {
                let builtin = match self.upscaler {
                    Upscaler::Nearest => ImageUpscaler::Nearest,
                    _ => ImageUpscaler::Lanczos,
                };
                resize_lanczos(&crate::upscale::upscale(image, &builtin, scale), w, h)
            }
            _ => resize_lanczos(image, w, h),
        })
    }

    /// The latent cells kept of the upscale's, for a VAE of factor `f`: A1111's
    /// `samples[:, :, ty // 2 : h - (ty + 1) // 2, tx // 2 : w - (tx + 1) // 2]`.
    fn latent_crop(&self, f: usize) -> LatentCrop {
        let (height, width) = (self.height / f, self.width / f);
        let truncate = |up: usize, cells: usize| (up / f).saturating_sub(cells);
        LatentCrop {
            top: truncate(self.upscale_height, height) / 2,
            left: truncate(self.upscale_width, width) / 2,
            height,
            width,
        }
    }
}

/// The second pass as `generate` runs it: its parameters and schedule, known before the first
/// pass starts (so its rules are checked, and the progress counts both passes, from step 1).
pub(super) struct SecondPass<'a> {
    hires: &'a Hires,
    /// The request as an img2img of the final size (no init image: the upscale is its start).
    pub params: GenerationParams,
    pub scheduler: Box<dyn Scheduler>,
    pub begin: usize,
    /// The first pass's IP-Adapter keys and values (the images are encoded once a request).
    pub image_prompts: Option<crate::ip_adapter::ImagePrompts>,
}

impl SecondPass<'_> {
    /// UNet evaluations the second pass reports.
    pub fn steps(&self) -> usize {
        self.scheduler.timesteps().len() - self.begin
    }
}

/// The hires pass's scheduler and schedule: its own (on its `schedule`, else its name's own),
/// else the first pass's.
pub(super) fn second_pass_scheduler(
    params: &GenerationParams,
    hires: &Hires,
) -> (
    Option<crate::schedulers::SchedulerKind>,
    Option<crate::schedulers::SigmaSchedule>,
) {
    match hires.scheduler {
        Some(kind) => (Some(kind), hires.schedule),
        None => (params.scheduler, params.schedule),
    }
}

impl StableDiffusion {
    /// The rules the second pass must meet, and its schedule.
    pub(super) fn second_pass<'a>(
        &self,
        params: &GenerationParams,
        hires: &'a Hires,
    ) -> Result<SecondPass<'a>> {
        if params.init_image.is_some() {
            return Err(PipelineError::InvalidRequest(
                "the hires pass follows text-to-image only (no init image)".into(),
            ));
        }
        let rule = params.step_rule.for_hires();
        if let Err(PipelineError::InvalidRequest(e)) = rule.slice(hires.steps, hires.strength) {
            return Err(PipelineError::InvalidRequest(format!("hires: {e}")));
        }
        let f = self.limits.size_multiple();
        if [hires.width, hires.height]
            .iter()
            .any(|&s| s == 0 || s % f != 0)
            || hires.upscale_width / f < hires.width / f
            || hires.upscale_height / f < hires.height / f
        {
            return Err(PipelineError::InvalidRequest(format!(
                "hires: the size must be positive multiples of {f}, the upscale at least as \
                 many whole cells (got {}x{} from {}x{})",
                hires.width, hires.height, hires.upscale_width, hires.upscale_height
            )));
        }
        let second = GenerationParams {
            prompt: hires
                .prompt
                .clone()
                .unwrap_or_else(|| params.prompt.clone()),
            negative_prompt: hires
                .negative_prompt
                .clone()
                .unwrap_or_else(|| params.negative_prompt.clone()),
            steps: hires.steps,
            width: hires.width,
            height: hires.height,
            scheduler: second_pass_scheduler(params, hires).0,
            schedule: second_pass_scheduler(params, hires).1,
            hires: None,
            ..params.clone()
        };
        let (scheduler, begin) = self.schedules.schedule(
            second.scheduler,
            second.schedule,
            second.steps,
            Some((hires.strength, rule)),
            second.eta,
            second.churn,
        )?;
        Ok(SecondPass {
            hires,
            params: second,
            scheduler,
            begin,
            image_prompts: None,
        })
    }

    /// The hires pass after the first pass's `denoise`: upscale, then img2img at the final
    /// size. `first_steps` of the run's progress are done; the step hook goes on from there.
    pub(super) fn hires_pass(
        &self,
        first: &GenerationParams,
        latents: Tensor,
        mut pass: SecondPass<'_>,
        text_embeddings: super::ScheduledConditioning,
        first_steps: usize,
        on_step: StepHook,
    ) -> Result<Vec<RgbImage>> {
        let hires = pass.hires;
        let f = self.vae_scale_factor;
        let (w, h) = (hires.width, hires.height);
        let shape = (1, self.vae_latent_channels, h / f, w / f);
        // diffusers' generators again, seeded as the first pass's (A1111's `ImageRNG(seeds)`).
        let mut rngs: Vec<TorchRng> = (0..first.batch_size)
            .map(|i| TorchRng::new(first.image_seed(i)))
            .collect();
        let total = first_steps + pass.steps();
        let crop = hires.latent_crop(f);
        let start = if hires.upscaler.on_image() {
            let mut images = Vec::with_capacity(latents.dim(0)?);
            // An upscaler model's tiles ask the step hook whether to go on (no step is done).
            let mut check = || {
                on_step(StepProgress {
                    step: first_steps,
                    total,
                    latents: None,
                    between_steps: true,
                })
            };
            let net = (&self.device, NETWORK_DTYPE);
            let (uw, uh) = (hires.upscale_width, hires.upscale_height);
            for i in 0..latents.dim(0)? {
                let decoded = self.decode_latents(&latents.narrow(0, i, 1)?)?;
                let upscaled =
                    hires.upscale_image(&postprocess_truncated(&decoded)?, net, &mut check)?;
                images.push(image_in::image_tensor(&upscaled, uw, uh, &self.device)?);
            }
            drop(latents);
            self.noised_image_latents(
                &images.iter().collect::<Vec<_>>(),
                pass.scheduler.as_ref(),
                pass.begin,
                &mut rngs,
                first,
                Some(crop),
                None,
                1.0,
                // A1111's hires pass draws from a new ImageRNG: no noise modifier.
                None,
            )?
        } else {
            let Upscaler::Latent(how) = hires.upscaler.clone() else {
                unreachable!("image upscalers are handled above")
            };
            let up = interpolate(
                &latents.to_dtype(DType::F32)?,
                hires.upscale_height / f,
                hires.upscale_width / f,
                how,
            )?;
            drop(latents);
            let up = crop.apply(&up)?;
            // The upscaled latents take the VAE encoder's place: only the noise is drawn, bent
            // by a variation seed and resized as the first pass's (A1111 makes the same
            // `ImageRNG` again, at this pass's size).
            let mut noised = Vec::with_capacity(rngs.len());
            for (i, rng) in rngs.iter_mut().enumerate() {
                let (_, c, lh, lw) = shape;
                let noise = first.starting_noise(i, rng, (c, lh, lw), f, &self.device)?;
                noised.push(images_in::start_from_image(
                    pass.scheduler.as_ref(),
                    Some(&up.narrow(0, i, 1)?),
                    &noise,
                    pass.begin,
                    1.0,
                    first.extra_noise,
                )?);
            }
            Tensor::cat(&noised, 0)?.to_dtype(self.dtype)?
        };
        // A1111 schedules the hires pass's prompts on a timeline that goes on from the first
        // pass's (`hires_steps`); unscheduled prompts equal to the first pass's are reused
        // where the pass runs the negative prompt as the first did (`ddim_cfgpp` runs it at
        // any scale).
        let text_embeddings = if !text_embeddings.is_fixed()
            || pass.params.prompt != first.prompt
            || pass.params.negative_prompt != first.negative_prompt
            || pass.params.runs_negative_prompt() != first.runs_negative_prompt()
        {
            let first_steps = text_embeddings.steps();
            drop(text_embeddings);
            let hires_steps = pass.params.steps * pass.scheduler.order();
            self.encode_schedule(&pass.params, first_steps, Some(hires_steps))?
        } else {
            text_embeddings
        };
        let mut on_step = |p: StepProgress<'_>| {
            on_step(StepProgress {
                step: first_steps + p.step,
                total: first_steps + p.total,
                ..p
            })
        };
        let begin = pass.begin;
        // The ControlNets again, at this pass's size, as the extension's `hr_option` says.
        let control = self.prepare_control(
            &pass.params,
            super::control::ControlPass::Hires,
            None,
            pass.image_prompts.as_ref(),
        )?;
        // An inpainting UNet's hires pass repaints the whole image, as A1111's
        // (`txt2img_image_conditioning` at this size, its `inpainting_mask_weight` 1).
        let inpaint = match self.is_inpainting() {
            true => Some(self.unmasked_inpaint_state((w, h), &mut rngs)?),
            false => None,
        };
        let latents = self.denoise(
            images_in::Start {
                latents: start,
                inpaint,
            },
            &text_embeddings,
            pass.scheduler.as_mut(),
            begin,
            (
                pass.params.guidance_scale,
                pass.params.negative_guidance,
                first.hires_steps(),
            ),
            &mut rngs,
            control.as_ref(),
            &mut on_step,
        )?;
        drop((text_embeddings, control));
        // The units' post-processing with their maps at this pass's size (`hr_control`).
        let post = super::control::PostProcessing::of(
            &pass.params,
            super::control::ControlPass::Hires,
            None,
        );
        let mut images = Vec::with_capacity(first.batch_size);
        for i in 0..latents.dim(0)? {
            let decoded = self.decode_latents(&latents.narrow(0, i, 1)?)?;
            let image = super::control::to_rgb8_post_processed(&decoded, &post)?;
            images.push(self.restore_faces(first, image)?);
        }
        Ok(images)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image_in::resize_nearest;

    fn hires(upscaler: Upscaler, size: (usize, usize), upscale: (usize, usize)) -> Hires {
        Hires {
            width: size.0,
            height: size.1,
            upscale_width: upscale.0,
            upscale_height: upscale.1,
            upscaler,
            steps: 2,
            strength: 0.5,
            scheduler: None,
            schedule: None,
            prompt: None,
            negative_prompt: None,
        }
    }

    fn up(h: &Hires, im: &RgbImage) -> RgbImage {
        h.upscale_image(im, (&Device::Cpu, DType::F32), &mut || {
            ControlFlow::Continue(())
        })
        .unwrap()
    }

    fn image(w: u32, h: u32) -> RgbImage {
        RgbImage {
            width: w,
            height: h,
            pixels: (0..w * h * 3).map(|i| (i * 7 % 251) as u8).collect(),
        }
    }

    #[test]
    fn resize_and_lanczos_agree_on_whole_scales_and_the_upscale_is_not_cropped() {
        let im = image(16, 8);
        let a = up(&hires(Upscaler::Resize, (32, 16), (32, 16)), &im);
        let b = up(&hires(Upscaler::Lanczos, (32, 16), (32, 16)), &im);
        assert_eq!(a, b);
        assert_eq!(a, resize_lanczos(&im, 32, 16));
        // The image comes out at the upscale's size, odd sides too; the latents are cropped.
        let c = up(&hires(Upscaler::Resize, (32, 16), (50, 27)), &im);
        assert_eq!(c, resize_lanczos(&im, 50, 27));
    }

    #[test]
    fn latent_crops_are_a1111_s_truncate_halves() {
        // 50x27 is 6x3 cells of 8; 32x16 keeps 4x2: truncate 2 (one off the left) and 1
        // (none off the top, one off the bottom), as A1111's slicing.
        let h = hires(Upscaler::Resize, (32, 16), (50, 27));
        let c = h.latent_crop(8);
        assert_eq!((c.top, c.left, c.height, c.width), (0, 1, 2, 4));
        let h = hires(Upscaler::Resize, (32, 16), (75, 43));
        let c = h.latent_crop(8);
        // 9x5 cells: truncate 5 (2 off the left) and 3 (1 off the top).
        assert_eq!((c.top, c.left, c.height, c.width), (1, 2, 2, 4));
        let x = Tensor::arange(0f32, 45.0, &Device::Cpu)
            .unwrap()
            .reshape((1, 1, 5, 9))
            .unwrap();
        let kept = c
            .apply(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(kept, [11.0, 12.0, 13.0, 14.0, 20.0, 21.0, 22.0, 23.0]);
    }

    #[test]
    fn nearest_scales_by_pixels_first() {
        let im = image(8, 8);
        let n = up(&hires(Upscaler::Nearest, (16, 16), (16, 16)), &im);
        assert_eq!(n, resize_nearest(&im, 16, 16));
        assert_ne!(n, resize_lanczos(&im, 16, 16));
    }

    #[test]
    fn nearest_is_skipped_where_the_floored_size_is_reached() {
        // 8x8 to 15x15: 15 // 8 * 8 = 8, which the image already is, so A1111 1.8+'s
        // `Upscaler.upscale` runs no round and only `resize_image`'s Lanczos is left.
        let im = image(8, 8);
        let n = up(&hires(Upscaler::Nearest, (15, 15), (15, 15)), &im);
        assert_eq!(n, resize_lanczos(&im, 15, 15));
    }
}
