//! The stages that start from an image: img2img (diffusers' `StableDiffusionImg2ImgPipeline`)
//! and inpainting (`StableDiffusionInpaintPipeline`, with a regular 4-channel UNet or a
//! 9-channel inpainting UNet). Text-to-image's stages are in the sibling files; these replace
//! `prepare_latents` and add the inpainting inputs to `denoise`.

use candle_core::{DType, Tensor};

use super::inpaint_blend::{latent_mask, A1111Blend};
use super::{GenerationParams, ResizeMode, RgbImage, StableDiffusion};
use crate::image_in;
use crate::inpaint_a1111::MaskedContent;
use crate::rng::TorchRng;
use crate::schedulers::Scheduler;
use crate::{PipelineError, Result};

/// An image to start from: img2img without a mask, inpainting with one.
#[derive(Debug, Clone, PartialEq)]
pub struct InitImage {
    /// Any size: resized (Lanczos) to the request's width and height.
    pub image: RgbImage,
    /// White = repaint, black = keep; grey is binarised at 0.5. Resized like the image.
    pub mask: Option<RgbImage>,
    /// How much of the schedule runs: `int(steps * strength)` steps, from the noise level of
    /// the first of them (A1111's rule: [`super::StepRule`]). 1.0 starts from pure noise for
    /// diffusers' inpainting.
    pub strength: f64,
}

/// What a request does, as the API's metadata names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Txt2Img,
    Img2Img,
    Inpaint,
}

impl Mode {
    pub fn of(params: &GenerationParams) -> Self {
        match &params.init_image {
            None => Self::Txt2Img,
            Some(InitImage { mask: None, .. }) => Self::Img2Img,
            Some(_) => Self::Inpaint,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Txt2Img => "txt2img",
            Self::Img2Img => "img2img",
            Self::Inpaint => "inpaint",
        }
    }
}

/// The seed of image `index` of a batch: `seed + index` (A1111's convention), kept in torch's
/// 32-bit seed space so that the number reported is one a request can send back.
pub fn seed_of_image(seed: u64, index: usize) -> u64 {
    (seed + index as u64) & 0xFFFF_FFFF
}

/// The latents the denoising loop starts from, and for inpainting what each step needs.
pub(super) struct Start {
    pub latents: Tensor,
    pub inpaint: Option<InpaintState>,
}

/// Inpainting's per-step inputs, all at latent size for the whole batch.
pub(super) struct InpaintState {
    /// `[n, 1, h, w]`, 1 = repaint.
    mask: Tensor,
    kind: InpaintKind,
}

enum InpaintKind {
    /// 9-channel UNet: `[latents, mask, masked_image_latents]` is its input.
    Channels { masked_image_latents: Tensor },
    /// 4-channel UNet: after each step the known region is put back at the next noise level.
    Blend {
        image_latents: Tensor,
        noise: Tensor,
    },
    /// A1111's blend on the prediction (either UNet; a 9-channel one also takes its masked
    /// image latents).
    A1111 {
        blend: A1111Blend,
        masked_image_latents: Option<Tensor>,
    },
}

impl InpaintState {
    /// The UNet's input for the (already scaled) latents.
    pub(super) fn unet_input(&self, scaled: Tensor) -> Result<Tensor> {
        Ok(match &self.kind {
            InpaintKind::Channels {
                masked_image_latents,
            }
            | InpaintKind::A1111 {
                masked_image_latents: Some(masked_image_latents),
                ..
            } => Tensor::cat(
                &[
                    &scaled,
                    &self.mask.to_dtype(scaled.dtype())?,
                    masked_image_latents,
                ],
                1,
            )?,
            InpaintKind::Blend { .. } | InpaintKind::A1111 { .. } => scaled,
        })
    }

    /// What the UNet (and the ControlNets) evaluate instead of `latents` (before scaling):
    /// A1111's blend of the input on its timestep samplers ([`Scheduler::blends_model_input`]);
    /// `None` elsewhere.
    pub(super) fn blended_input(
        &self,
        latents: &Tensor,
        scheduler: &dyn Scheduler,
    ) -> Result<Option<Tensor>> {
        match &self.kind {
            InpaintKind::A1111 { blend, .. } if scheduler.blends_model_input() => {
                Ok(Some(blend.blend_latents(latents)?))
            }
            _ => Ok(None),
        }
    }

    /// A model output at step `index` (the guided one, or CFG++'s unconditional one) as the
    /// scheduler takes it: with the input blended (`evaluated`), carried over to the unblended
    /// `latents`; else A1111's blend of the prediction; others' output as it is.
    pub(super) fn blend_prediction(
        &self,
        output: Tensor,
        latents: &Tensor,
        evaluated: Option<&Tensor>,
        scheduler: &dyn Scheduler,
        index: usize,
    ) -> Result<Tensor> {
        match (&self.kind, evaluated) {
            (InpaintKind::A1111 { blend, .. }, Some(evaluated)) => {
                blend.carry_output(output, evaluated, latents, scheduler, index)
            }
            (InpaintKind::A1111 { blend, .. }, None) => {
                blend.blend_prediction(&output, latents, scheduler, index)
            }
            _ => Ok(output),
        }
    }

    /// After the last step: A1111's blend of the samples with the init latents.
    pub(super) fn finish(&self, latents: Tensor) -> Result<Tensor> {
        match &self.kind {
            InpaintKind::A1111 { blend, .. } => blend.blend_latents(&latents),
            _ => Ok(latents),
        }
    }

    /// 4-channel inpainting after the step at `index`: `(1 - m) * add_noise(image_latents,
    /// noise, timesteps[index + 1]) + m * latents`, with the clean image latents after the last.
    pub(super) fn keep_known_region(
        &self,
        latents: Tensor,
        scheduler: &dyn Scheduler,
        index: usize,
    ) -> Result<Tensor> {
        let InpaintKind::Blend {
            image_latents,
            noise,
        } = &self.kind
        else {
            return Ok(latents);
        };
        let known = if index + 1 < scheduler.timesteps().len() {
            scheduler.add_noise(image_latents, noise, index + 1)?
        } else {
            image_latents.clone()
        };
        let dtype = latents.dtype();
        let m = self.mask.to_dtype(DType::F32)?;
        let keep = m.affine(-1.0, 1.0)?;
        let out = (known.to_dtype(DType::F32)?.broadcast_mul(&keep)?
            + latents.to_dtype(DType::F32)?.broadcast_mul(&m)?)?;
        Ok(out.to_dtype(dtype)?)
    }
}

/// The part of a latent image kept, in latent cells: `height` x `width` from `top`, `left`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct LatentCrop {
    pub top: usize,
    pub left: usize,
    pub height: usize,
    pub width: usize,
}

impl LatentCrop {
    /// `x[:, :, top:top + height, left:left + width]`.
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.narrow(2, self.top, self.height)?
            .narrow(3, self.left, self.width)?)
    }
}

impl StableDiffusion {
    /// The rules an image request must meet beyond the API's own (which the server checks
    /// first, naming the field): strength in range and leaving at least one step, a mask for
    /// a 9-channel (inpainting) UNet, a UNet this pipeline can feed.
    pub(super) fn check_image_inputs(&self, params: &GenerationParams) -> Result<()> {
        let unet = self.unet_in_channels;
        let latent = self.vae_latent_channels;
        let inpainting_unet = unet == 2 * latent + 1;
        // An inpainting UNet runs without a mask too (the whole image repainted:
        // `unmasked_inpaint_state`); another UNet must take the VAE's latents alone.
        if !inpainting_unet && unet != latent {
            return Err(PipelineError::InvalidRequest(format!(
                "a UNet taking {unet} channels cannot run here (VAE latents have {latent}; an \
                 inpainting UNet takes {})",
                2 * latent + 1
            )));
        }
        if let Some(init) = &params.init_image {
            params.step_rule.slice(params.steps, init.strength)?;
        }
        Ok(())
    }

    /// A1111's inpainting: the init image and mask as its preprocessing leaves them (at the
    /// request's size) and what goes back over the results; `None` without it.
    pub(super) fn a1111_inpaint_inputs(
        &self,
        params: &GenerationParams,
    ) -> Result<Option<(InitImage, crate::inpaint_a1111::Prepared)>> {
        let (Some(options), Some(init)) = (&params.a1111_inpaint, &params.init_image) else {
            return Ok(None);
        };
        let Some(mask) = &init.mask else {
            return Err(PipelineError::InvalidRequest(
                "A1111's inpainting options need a mask".into(),
            ));
        };
        if params.hires.is_some() {
            return Err(PipelineError::InvalidRequest(
                "the hires fix is for text-to-image only".into(),
            ));
        }
        let (w, h) = (params.width, params.height);
        let prepared =
            crate::inpaint_a1111::prepare(&init.image, mask, w, h, options, params.resize_mode)?;
        // A blank mask under "only masked": A1111 runs img2img (a 9-channel UNet, which
        // needs a mask, repaints everywhere).
        let mask = match (&prepared.mask, self.is_inpainting()) {
            (Some(m), _) => Some(m.clone()),
            (None, true) => Some(crate::inpaint_a1111::grey(&vec![255; w * h], w, h)),
            (None, false) => None,
        };
        let init = InitImage {
            image: prepared.image.clone(),
            mask,
            strength: init.strength,
        };
        Ok(Some((init, prepared)))
    }

    /// `latent_dist` of each image `[1, 3, H, W]` in [-1, 1] through the VAE encoder, which
    /// (offloaded) comes to the device once for all of them: tiled when the plan tiles the VAE
    /// and an image is larger than a tile (diffusers' `use_tiling` covers both halves of the
    /// VAE, as the plan's lever does).
    pub(super) fn encode_images(
        &self,
        images: &[&Tensor],
    ) -> Result<Vec<crate::vae_encoder::LatentDist>> {
        let mut encoder = self.vae_encoder.get(&self.device)?;
        if let crate::memory::offload::Held::Loaded(e) = &mut encoder {
            e.set_attention_slice(self.vae_attention_rows());
        }
        images
            .iter()
            // Whole under circular padding (`tiling`), as in `decode_with`.
            .map(|image| match self.plan.vae_tiling {
                Some(t) if !crate::kernels::conv::circular_padding_on() => {
                    encoder.encode_tiled(image, t, self.vae_scale_factor)
                }
                _ => encoder.encode(image),
            })
            .collect()
    }

    /// img2img's latents for the batch: each image's latent sample from its own generator,
    /// then that generator's noise, `add_noise`d at `begin`. `images` holds one image for the
    /// whole batch (encoded once) or one per generator. The noise is `params`'
    /// [`starting_noise`](GenerationParams::starting_noise): bent by a variation seed (the
    /// hires pass, as A1111's `ImageRNG`) and resized by a seed resize. `crop` keeps part of
    /// each image's latents before the noise is drawn at its size (the hires pass's
    /// `truncate_x/y`); `resize` resizes them to `(h, w)` latent cells instead (A1111's latent
    /// upscale of the init image, `resize_mode` 3). The noise is `multiplier` times the drawn
    /// one ([`GenerationParams::noise_multiplier`], 1 in the hires pass), carrying `lama`'s
    /// latents ([`StableDiffusion::lama_noise`]; the first pass's).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn noised_image_latents(
        &self,
        images: &[&Tensor],
        scheduler: &dyn Scheduler,
        begin: usize,
        rngs: &mut [TorchRng],
        params: &GenerationParams,
        crop: Option<LatentCrop>,
        resize: Option<(usize, usize)>,
        multiplier: f64,
        lama: Option<&Tensor>,
    ) -> Result<Tensor> {
        let dists = self.encode_images(images)?;
        let sf = self.vae_scaling_factor;
        let mut latents = Vec::with_capacity(rngs.len());
        for (i, rng) in rngs.iter_mut().enumerate() {
            let dist = &dists[i.min(dists.len() - 1)];
            let mut image_latents = (dist.sample(rng)? * sf)?;
            if let Some(c) = crop {
                image_latents = c.apply(&image_latents)?;
            }
            if let Some((h, w)) = resize {
                image_latents = super::resize_mode::upscale_latents(&image_latents, h, w)?;
            }
            let (_, c, h, w) = image_latents.dims4()?;
            let f = self.vae_scale_factor;
            let noise = params.starting_noise(i, rng, (c, h, w), f, &self.device)?;
            let noise = self.lama_noise(noise, lama)?;
            latents.push(start_from_image(
                scheduler,
                Some(&image_latents),
                &noise,
                begin,
                multiplier,
                params.extra_noise,
            )?);
        }
        Ok(Tensor::cat(&latents, 0)?.to_dtype(self.dtype)?)
    }

    /// A 9-channel (inpainting) UNet's inputs where no image or mask is given (text-to-image,
    /// the hires pass): the whole image repainted. A1111 conditions an inpainting model so in
    /// txt2img and its hires pass (`txt2img_image_conditioning`: a mask of ones and the latents
    /// of a grey image, 0 in [-1, 1]); diffusers' inpainting pipeline given an all-white mask
    /// encodes the same zeros (`image * (mask < 0.5)`). One sample of them per generator,
    /// drawn after the starting noise, as both draw it.
    pub(super) fn unmasked_inpaint_state(
        &self,
        (width, height): (usize, usize),
        rngs: &mut [TorchRng],
    ) -> Result<InpaintState> {
        let f = self.vae_scale_factor;
        let grey = Tensor::zeros((1, 3, height, width), DType::F32, &self.device)?;
        let dist = self.encode_images(&[&grey])?.remove(0);
        let sf = self.vae_scaling_factor;
        let masked = rngs
            .iter_mut()
            .map(|rng| Ok((dist.sample(rng)? * sf)?))
            .collect::<Result<Vec<_>>>()?;
        let n = rngs.len();
        Ok(InpaintState {
            mask: Tensor::ones((n, 1, height / f, width / f), DType::F32, &self.device)?,
            kind: InpaintKind::Channels {
                masked_image_latents: Tensor::cat(&masked, 0)?.to_dtype(self.dtype)?,
            },
        })
    }

    /// img2img and inpainting's `prepare_latents` (+ `prepare_mask_latents`), one generator per
    /// image. Draw order per generator, as diffusers: img2img: the image's latent sample, then
    /// the noise; inpainting: the image's sample (4-channel UNet or strength < 1), the noise,
    /// then the masked image's sample.
    pub(super) fn prepare_image_latents(
        &self,
        params: &GenerationParams,
        init: &InitImage,
        scheduler: &dyn Scheduler,
        begin: usize,
        rngs: &mut [TorchRng],
        lama: Option<&Tensor>,
    ) -> Result<Start> {
        let (w, h) = (params.width, params.height);
        let f = self.vae_scale_factor;
        let shape = (1, self.vae_latent_channels, h / f, w / f);
        let sf = self.vae_scaling_factor;
        let init = &super::resize_mode::fit_init(init, params.resize_mode, w, h)?;
        let cat = |parts: Vec<Tensor>| -> Result<Tensor> { Ok(Tensor::cat(&parts, 0)?) };

        // An inpainting UNet without a mask repaints the whole image: a white mask, as
        // A1111's `inpainting_image_conditioning` without one (a mask of ones) and diffusers'
        // inpainting pipeline given an all-white mask.
        let white;
        let mask = match &init.mask {
            None if self.is_inpainting() => {
                white = RgbImage {
                    width: w as u32,
                    height: h as u32,
                    pixels: vec![255; w * h * 3],
                };
                Some(&white)
            }
            m => m.as_ref(),
        };
        let Some(mask_image) = mask else {
            // The latent upscale encodes the image at its own size, then resizes its latents.
            let (iw, ih) = (init.image.width as usize, init.image.height as usize);
            let upscale = params.resize_mode == ResizeMode::LatentUpscale && (iw, ih) != (w, h);
            let resize = upscale.then_some((h / f, w / f));
            let (iw, ih) = if upscale { (iw, ih) } else { (w, h) };
            let image = image_in::image_tensor(&init.image, iw, ih, &self.device)?;
            return Ok(Start {
                latents: self.noised_image_latents(
                    &[&image],
                    scheduler,
                    begin,
                    rngs,
                    params,
                    None,
                    resize,
                    params.noise_multiplier,
                    lama,
                )?,
                inpaint: None,
            });
        };
        let image = image_in::image_tensor(&init.image, w, h, &self.device)?;

        let round = params.a1111_inpaint.as_ref().is_none_or(|o| o.mask_round);
        // A1111 with `mask_round` false conditions a 9-channel UNet on the processed mask's
        // grey levels (`inpainting_image_conditioning`), already at the processing size.
        let mask = match round {
            true => image_in::mask_tensor(mask_image, w, h, &self.device)?,
            false => image_in::grey_mask_tensor(mask_image, &self.device)?,
        };
        // `image * (mask < 0.5)` (A1111: `image * (1 - mask)`): the known part only.
        let masked_image = image.broadcast_mul(&mask.affine(-1.0, 1.0)?)?;
        let a1111 = params.a1111_inpaint.as_ref().map(|o| o.masked_content);
        let channels = self.unet_in_channels != self.vae_latent_channels;
        let blend = !channels && a1111.is_none();
        // diffusers starts strength 1.0 from pure noise; A1111 caps it below 1 and noises the
        // image as at any strength.
        let from_noise = init.strength == 1.0 && !params.step_rule.is_a1111();
        // The image's distribution (4-channel UNet, strength < 1, or A1111's init latents),
        // then the masked image's (a 9-channel UNet's input; diffusers draws it always).
        let with_image = !channels || !from_noise || a1111.is_some();
        let with_masked = channels || a1111.is_none();
        let mut images = Vec::new();
        images.extend(with_image.then_some(&image));
        images.extend(with_masked.then_some(&masked_image));
        let mut dists = self.encode_images(&images)?.into_iter();
        let image_dist = if with_image { dists.next() } else { None };
        let masked_dist = dists.next();
        let latent_hw = (h / f, w / f);
        let keep_mask = match a1111 {
            Some(_) => Some(
                latent_mask(mask_image, latent_hw.1, latent_hw.0, round, &self.device)?
                    .affine(-1.0, 1.0)?,
            ),
            None => None,
        };
        let (mut latents, mut image_latents, mut noises, mut masked_latents) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (i, rng) in rngs.iter_mut().enumerate() {
            let image_lat = match &image_dist {
                Some(d) => Some((d.sample(rng)? * sf)?),
                None => None,
            };
            let noise =
                params.starting_noise(i, rng, (shape.1, shape.2, shape.3), f, &self.device)?;
            // A1111's masked content in latent space: the kept region as encoded, the
            // masked one zeroed ("latent nothing") or noise ("latent noise", the image's
            // own starting noise as A1111's seeded draw is).
            let image_lat = match (image_lat, a1111, &keep_mask) {
                (Some(lat), Some(MaskedContent::LatentNothing), Some(keep)) => {
                    Some(lat.broadcast_mul(keep)?)
                }
                (Some(lat), Some(MaskedContent::LatentNoise), Some(keep)) => Some(
                    (lat.broadcast_mul(keep)? + noise.broadcast_mul(&keep.affine(-1.0, 1.0)?)?)?,
                ),
                (lat, ..) => lat,
            };
            // After A1111's latent noise fill, which draws its own (`create_random_tensors`).
            let noise = self.lama_noise(noise, lama)?;
            latents.push(start_from_image(
                scheduler,
                image_lat.as_ref().filter(|_| !from_noise),
                &noise,
                begin,
                params.noise_multiplier,
                params.extra_noise,
            )?);
            if let Some(d) = &masked_dist {
                masked_latents.push((d.sample(rng)? * sf)?);
            }
            image_latents.extend(image_lat);
            noises.push(noise);
        }
        let n = rngs.len();
        let mask = image_in::mask_to_latent_size(&mask, latent_hw.0, latent_hw.1)?;
        let mask = Tensor::cat(&vec![&mask; n], 0)?;
        let masked_image_latents = match channels {
            true => Some(cat(masked_latents)?.to_dtype(self.dtype)?),
            false => None,
        };
        let kind = match (keep_mask, blend) {
            (Some(keep), _) => InpaintKind::A1111 {
                blend: A1111Blend {
                    init: cat(image_latents)?.to_dtype(DType::F32)?,
                    nmask: Tensor::cat(&vec![&keep.affine(-1.0, 1.0)?; n], 0)?,
                    prediction: self.schedules.prediction_type()?,
                },
                masked_image_latents,
            },
            (None, true) => InpaintKind::Blend {
                image_latents: cat(image_latents)?,
                noise: cat(noises)?,
            },
            (None, false) => InpaintKind::Channels {
                masked_image_latents: masked_image_latents.expect("a 9-channel UNet"),
            },
        };
        Ok(Start {
            latents: cat(latents)?.to_dtype(self.dtype)?,
            inpaint: Some(InpaintState { mask, kind }),
        })
    }
}

/// A pass's start from an image's latents `image` (`None`: pure noise,
/// `noise * init_noise_sigma`): `add_start_noise(image, multiplier * noise)`, then A1111's extra
/// noise (`img2img_extra_noise`): `extra * multiplier * noise` in k-diffusion's sigma units,
/// which each scheduler carries as it carries a clean latent (`add_start_noise(noise, 0)`: the
/// noise itself on sigma schedules, `sqrt(alphas_cumprod) * noise` on A1111's timesteps
/// samplers, `alpha_t * noise` on VP ones), as both of A1111's `sample_img2img`s add it.
pub(super) fn start_from_image(
    scheduler: &dyn Scheduler,
    image: Option<&Tensor>,
    noise: &Tensor,
    begin: usize,
    multiplier: f64,
    extra: f64,
) -> Result<Tensor> {
    let scaled;
    let noise = if multiplier == 1.0 {
        noise
    } else {
        scaled = (noise * multiplier)?;
        &scaled
    };
    let start = match image {
        Some(image) => scheduler.add_start_noise(image, noise, begin)?,
        None => (noise * scheduler.init_noise_sigma())?,
    };
    if extra == 0.0 {
        return Ok(start);
    }
    let carried = scheduler.add_start_noise(&(noise * extra)?, &noise.zeros_like()?, begin)?;
    Ok((start + carried)?)
}
