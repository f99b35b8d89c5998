//! The validated request: what every dialect's body becomes, and its translation to the
//! pipeline's parameters.

use sdserve_pipeline::controlnet::{ControlNet, ControlNetUnit};
use sdserve_pipeline::inpaint_a1111::A1111Inpaint;
use sdserve_pipeline::pipeline::{
    GenerationParams, GuidanceRule, InitImage, LoraWeight, NegativeGuidance, PromptSyntax,
    ResizeMode, SeedResize, StepRule, Variation,
};
use sdserve_pipeline::schedulers::{Churn, SchedulerKind, SigmaSchedule};

use super::{hires, ValidControlNet};
use crate::error::ApiError;
use crate::images::RequestImage;

/// A request that passed every rule, with defaults filled (seed and scheduler stay optional:
/// they are resolved later, from the RNG and the loaded model).
#[derive(Debug, Clone, PartialEq)]
pub struct ValidRequest {
    pub prompt: String,
    pub negative_prompt: String,
    pub steps: usize,
    pub width: usize,
    pub height: usize,
    pub seed: Option<u32>,
    pub guidance_scale: f64,
    /// At which scales the negative prompt runs (`guidance_rule`).
    pub guidance_rule: GuidanceRule,
    /// The sampler's eta; `None`: its default.
    pub eta: Option<f64>,
    /// k-diffusion's churn and A1111's negative guidance minimum sigma (`sampler_params`).
    pub churn: Churn,
    pub negative_guidance: NegativeGuidance,
    pub scheduler: Option<SchedulerKind>,
    /// The sigma schedule; `None` (`default`): the scheduler name's own, or with no scheduler
    /// the model's (resolved with the scheduler, [`Self::resolve_schedule`]).
    pub schedule: Option<SigmaSchedule>,
    pub prompt_syntax: PromptSyntax,
    pub clip_skip: usize,
    /// From `loras` and the prompt's `<lora:name:weight>` tags (taken out of `prompt`).
    pub loras: Vec<(String, f64)>,
    /// How many of `loras`, from the first, the `loras` field listed (the rest are the
    /// prompt's tags): the job's record keeps them apart for a client that sends the prompt
    /// as written again.
    pub loras_listed: usize,
    /// Images in one run; image i uses seed + i.
    pub batch_size: usize,
    /// img2img / inpainting: the decoded image, fitted to `width` x `height` (which default to
    /// its own size) by `resize_mode` (A1111's inpainting and the latent upscale: as sent);
    /// `sha256` is the upload's.
    pub init_image: Option<RequestImage>,
    /// Inpainting: white = repaint; uploaded at the size of `init_image`, resized like it.
    pub mask_image: Option<RequestImage>,
    /// How `init_image` (and `mask_image`) is fitted to `width` x `height` (`resize_mode`).
    pub resize_mode: ResizeMode,
    /// With an init image: how much of the schedule runs, by `step_rule`.
    pub strength: f64,
    /// Which steps `strength` (and the hires pass's) runs: diffusers' rule or A1111's.
    pub step_rule: StepRule,
    /// With an init image: its starting noise times this (`noise_multiplier`).
    pub noise_multiplier: f64,
    /// With an init image or the hires fix: more noise at the start (`extra_noise`).
    pub extra_noise: f64,
    /// Whether an `inpaint_only+lama` unit's latents start the first pass's noise (the
    /// extension's noise modifier); the A1111 dialect clears it for `n_iter` batches after the
    /// first, as the extension wraps only the first batch's RNG.
    pub lama_noise: bool,
    /// The hires fix: a second pass at a larger size (text-to-image only; from the native
    /// `hires` object or A1111's `enable_hr`, both through [`hires::validate_hires`]).
    pub hires: Option<hires::ValidHires>,
    /// The model asked for by name (`model`, A1111's `sd_model_checkpoint`, OpenAI's `model`);
    /// once resolved (`api::resolve::named_model`), the MODELS_DIR model it runs on, `None`
    /// for the default model.
    pub model: Option<String>,
    /// The VAE_DIR VAE asked for by name (`vae`, A1111's `sd_vae`); `None`, `automatic` or
    /// `none`: the model's own. Resolved by `api::resolve::named_vae`.
    pub vae: Option<String>,
    /// A1111's `tiling`: the image wraps at its edges (circular padding in every convolution).
    pub tiling: bool,
    /// Face restoration of the final images (`restore_faces`, A1111's `restore_faces`):
    /// CodeFormer's weight; `None`: off.
    pub restore_faces: Option<f64>,
    /// A1111's variation seed (`subseed`): random when absent and `variation_strength` > 0
    /// (drawn with the seed).
    pub variation_seed: Option<u32>,
    /// A1111's `subseed_strength`: 0 leaves the seed's noise as it is.
    pub variation_strength: f64,
    /// A1111's seed resize (`seed_resize_from_w`/`_h`): the size whose noise the images keep
    /// in their centre; `None`: off.
    pub seed_resize_from: Option<SeedResize>,
    /// ControlNets steering text-to-image (`controlnets`), their images at the request's size.
    pub controlnets: Vec<ValidControlNet>,
    /// IP-Adapters (`ip_adapters`): image prompts by adapter name.
    pub ip_adapters: Vec<super::ValidIpAdapter>,
    /// Inpainting as A1111 does it (the `inpaint` object); `None`: diffusers'. The init image
    /// and mask then stay at their uploaded size (A1111 blurs and crops there).
    pub inpaint: Option<A1111Inpaint>,
    /// The styles applied to the prompts (before validation) and the prompts as written;
    /// `None` without styles. Set by the routes that apply them.
    pub as_written: Option<crate::styles::AsWritten>,
}

impl ValidRequest {
    /// The scheduler and sigma schedule this request runs on a model whose own are `default`:
    /// the named scheduler on `schedule` (or on its name's own), or the model's scheduler on
    /// `schedule` (or on the model's own). A pair that cannot run is a 422 on `schedule`.
    pub fn resolve_schedule(
        &self,
        default: (SchedulerKind, SigmaSchedule),
    ) -> Result<(SchedulerKind, SigmaSchedule), ApiError> {
        let (kind, schedule) = match self.scheduler {
            Some(kind) => (kind, self.schedule.unwrap_or(kind.schedule())),
            None => (default.0, self.schedule.unwrap_or(default.1)),
        };
        kind.check_schedule(schedule).map_err(|rule| {
            let rule = if self.scheduler.is_none() {
                format!("{rule} (the model's own scheduler; name one in `scheduler`)")
            } else {
                rule
            };
            ApiError::validation("schedule", rule)
        })?;
        Ok((kind, schedule))
    }

    /// The pipeline's parameters for this request with its seed, scheduler and schedule resolved.
    pub fn generation_params(
        &self,
        seed: u64,
        scheduler: SchedulerKind,
        schedule: SigmaSchedule,
    ) -> GenerationParams {
        let mut params = GenerationParams {
            prompt: self.prompt.clone(),
            negative_prompt: self.negative_prompt.clone(),
            steps: self.steps,
            width: self.width,
            height: self.height,
            seed,
            guidance_scale: self.guidance_scale,
            guidance_rule: self.guidance_rule,
            eta: self.eta,
            churn: self.churn,
            negative_guidance: self.negative_guidance,
            scheduler: Some(scheduler),
            schedule: Some(schedule),
            prompt_syntax: self.prompt_syntax,
            clip_skip: self.clip_skip,
            loras: self
                .loras
                .iter()
                .map(|(name, weight)| LoraWeight {
                    name: name.clone(),
                    weight: *weight,
                })
                .collect(),
            batch_size: self.batch_size,
            init_image: self.init_image.as_ref().map(|init| InitImage {
                image: init.image.clone(),
                mask: self.mask_image.as_ref().map(|m| m.image.clone()),
                strength: self.strength,
            }),
            resize_mode: self.resize_mode,
            hires: self.hires.as_ref().map(|h| h.params.clone()),
            tiling: self.tiling,
            face_restore: self.restore_faces.map(crate::face_restorers::named),
            variation: (self.variation_strength > 0.0).then(|| Variation {
                seed: u64::from(self.variation_seed.unwrap_or_else(crate::api::random_seed)),
                strength: self.variation_strength,
            }),
            seed_resize_from: self.seed_resize_from,
            controlnets: self
                .controlnets
                .iter()
                .map(|c| ControlNetUnit {
                    model: std::sync::Arc::new(match &c.file {
                        Some(path) => ControlNet::new(&c.model, path),
                        None => ControlNet::named(&c.model),
                    }),
                    image: c.image.image.clone(),
                    preprocessor: c.preprocessor,
                    scale: c.scale,
                    guidance_start: c.guidance_start,
                    guidance_end: c.guidance_end,
                    hires_image: c.hires_image.as_ref().map(|i| i.image.clone()),
                    hr_option: c.hr_option,
                    inpaint_crop: c.inpaint_crop,
                    control_mode: c.control_mode,
                    mask: c.mask.as_ref().map(|i| i.image.clone()),
                    hires_mask: c.hires_mask.as_ref().map(|i| i.image.clone()),
                    infotext: c.infotext.clone(),
                })
                .collect(),
            ip_adapters: self
                .ip_adapters
                .iter()
                .map(|u| {
                    use sdserve_pipeline::ip_adapter::{ImageEncoder, IpAdapter};
                    let encoder = crate::ip_adapters::IMAGE_ENCODER;
                    let (model, image_encoder) = match &u.files {
                        Some(f) => (
                            IpAdapter::new(u.model.clone(), f.adapter.clone()),
                            ImageEncoder::new(encoder, f.image_encoder.clone()),
                        ),
                        None => (IpAdapter::named(&u.model), ImageEncoder::named(encoder)),
                    };
                    sdserve_pipeline::ip_adapter::IpAdapterUnit {
                        model: std::sync::Arc::new(model),
                        image_encoder: std::sync::Arc::new(image_encoder),
                        image: u.image.image.clone(),
                        scale: u.scale,
                        extension: u.a1111.as_ref().map(super::ip_adapters::extension_run),
                    }
                })
                .collect(),
            // The reference units, split from `controlnets` below.
            references: Vec::new(),
            a1111_inpaint: self.inpaint.clone(),
            step_rule: self.step_rule,
            noise_multiplier: self.noise_multiplier,
            extra_noise: self.extra_noise,
            lama_noise: self.lama_noise,
        };
        params.split_references();
        params
    }
}
