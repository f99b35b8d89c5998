//! One text-to-image call, staged as diffusers' `StableDiffusionPipeline.__call__`.
//!
//! `generate` runs the stages in order; each lives in its own file: `encode_prompt`,
//! `prepare` (`prepare_timesteps`, `prepare_latents`), `denoise`, `decode` (`decode_latents`,
//! `postprocess`); `images_in` starts from an image instead. `load` reads a model folder
//! (`weight_files`: which files hold each component's weights), `memory_levers` switches
//! offload/slicing/tiling, `adapters` holds LoRAs and embeddings, `params` what a request asks
//! and gets back, `vae_choice` which VAE decodes.

use candle_core::{DType, Device, Tensor};

use crate::clip::ClipTextModel;
use crate::embeddings::EmbeddingLibrary;
use crate::lora::{LoraLibrary, LoraState};
use crate::memory::offload::Component;
use crate::memory::{classify_oom, MemoryPlan, MemoryTracker, MemoryUsage};
use crate::rng::TorchRng;
use crate::schedulers::{SchedulerKind, SigmaSchedule};
use crate::tokenizer::ClipTokenizer;
use crate::unet::{UNet2DConditionModel, UNetConfig};
use crate::vae::AutoencoderKlDecoder;
use crate::vae_encoder::AutoencoderKlEncoder;
use crate::{PipelineError, Result};

mod adapters;
mod control;
mod control_inpaint;
mod control_inpaint_channels;
mod control_reference;
mod decode;
mod denoise;
mod encode_prompt;
mod hires;
mod images_in;
mod inpaint_blend;
mod limits;
mod load;
mod memory_levers;
mod params;
mod prepare;
mod resize_mode;
mod steps;
mod vae_choice;
mod variation;
mod weight_files;

pub use adapters::{LoraDeltaStats, DEFAULT_LORA_DELTA_LIMIT};
pub(crate) use decode::postprocess;
pub use decode::postprocess_truncated;
pub use encode_prompt::{Conditioning, ScheduledConditioning};
pub use hires::{Hires, Upscaler};
pub use images_in::{seed_of_image, InitImage, Mode};
pub use limits::ModelLimits;
pub use params::{
    GenerationParams, GuidanceRule, GuidanceSkips, LoraWeight, NegativeGuidance, PromptSyntax,
    RgbImage, SkipRule, StepHook, StepProgress,
};
pub use prepare::ModelSchedules;
pub use resize_mode::{check_latent_upscale_mask, ResizeMode};
pub use steps::{ScheduleSlice, StepRule};
pub use variation::{image_noise, resized_image_noise, slerp, SeedResize, Variation};
pub use weight_files::component_weight_files;

/// A loaded Stable Diffusion model: everything `generate` needs, read from a diffusers folder.
pub struct StableDiffusion {
    tokenizer: ClipTokenizer,
    // Components are resident on `device`, or offloaded (built there for their stage) when the
    // memory plan says so; see `memory::offload`. Under sequential offload the UNet is resident
    // in host memory and streams its parts to `device` (see `unet_component`).
    text_encoder: Component<ClipTextModel>,
    unet: Component<UNet2DConditionModel>,
    unet_config: UNetConfig,
    unet_in_channels: usize,
    vae: Component<AutoencoderKlDecoder>,
    /// The VAE's encoder half, for init images (img2img, inpainting).
    vae_encoder: Component<AutoencoderKlEncoder>,
    vae_latent_channels: usize,
    /// The VAE in f32, built only to redo a half-precision decode that produced NaN/Inf.
    vae_f32: Option<Component<AutoencoderKlDecoder>>,
    /// The weights `vae`, `vae_encoder` and `vae_f32` are built from: the model's own
    /// (`own_vae`) or an external VAE swapped in (`set_vae`).
    vae_weights: vae_choice::VaeWeights,
    own_vae: vae_choice::VaeWeights,
    plan: MemoryPlan,
    last_memory: std::sync::Mutex<Option<MemoryUsage>>,
    last_decode_retried: std::sync::atomic::AtomicBool,
    vae_scaling_factor: f64,
    vae_scale_factor: usize,
    /// What requests must fit (clip skip, sizes, external VAEs), from the configs.
    limits: ModelLimits,
    /// The model's scheduler config and the scheduler and schedule it names.
    schedules: ModelSchedules,
    device: Device,
    dtype: DType,
    /// LoRA files requests may name (`LORA_DIR`).
    loras: LoraLibrary,
    /// Textual-inversion embeddings prompts may name (`EMBEDDINGS_DIR`), their vectors stacked
    /// (`[rows, hidden]` on the device) for the ids past the text encoder's vocabulary.
    embeddings: EmbeddingLibrary,
    embedding_vectors: Option<Tensor>,
    /// The tokenizer as loaded, before embedding names were added.
    base_tokenizer: ClipTokenizer,
    text_vocab_size: usize,
    text_hidden_size: usize,
    /// Which LoRAs are merged into the resident weights now (held for a whole run).
    lora_state: std::sync::Mutex<LoraState>,
    /// The LoRA deltas an offloaded text encoder or UNet takes when built for its stage.
    build_deltas: std::sync::RwLock<Option<adapters::BuildDeltas>>,
    /// The most bytes `build_deltas` may hold.
    lora_delta_limit: usize,
    lora_counters: adapters::LoraCounters,
    /// LoRA targets (paths, dims) of offloaded parts, from their first build.
    lora_shapes: std::sync::Mutex<crate::lora::TargetShapes>,
}

impl StableDiffusion {
    /// The scheduler named by the model's own `scheduler_config.json`.
    pub fn default_scheduler(&self) -> SchedulerKind {
        self.schedules.default_scheduler()
    }

    /// The sigma schedule the model's own `scheduler_config.json` asks for (its
    /// `use_karras_sigmas` / `use_exponential_sigmas` / `use_beta_sigmas`, where its class reads them).
    pub fn default_schedule(&self) -> SigmaSchedule {
        self.schedules.default_schedule()
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The UNet's config (what a ControlNet must fit; a single-file ControlNet's config).
    pub fn unet_config(&self) -> &UNetConfig {
        &self.unet_config
    }

    /// Latent channels the UNet takes.
    pub fn unet_in_channels(&self) -> usize {
        self.unet_in_channels
    }

    /// The width of the text encoder's vectors (an embedding's must match it).
    pub fn text_hidden_size(&self) -> usize {
        self.text_hidden_size
    }

    /// True for an inpainting model: its UNet takes the latents, the mask and the masked
    /// image's latents (9 channels for SD 1.5); without a mask it repaints the whole image.
    pub fn is_inpainting(&self) -> bool {
        self.unet_in_channels == 2 * self.vae_latent_channels + 1
    }

    /// True for a guidance-distilled (LCM) model: its UNet takes the guidance scale as an
    /// embedding (`time_cond_proj_dim`) and no unguided prediction is made, so a prompt cannot
    /// have AND parts (they combine guided predictions).
    pub fn is_guidance_distilled(&self) -> bool {
        self.unet_config.time_cond_proj_dim.is_some()
    }

    /// Pixels per latent cell along each axis (8 for SD 1.5).
    pub fn vae_scale_factor(&self) -> usize {
        self.vae_scale_factor
    }

    /// What a request must fit in this model, as its configs say (the model's own VAE).
    pub fn limits(&self) -> ModelLimits {
        self.limits
    }

    /// Runs one request: `batch_size` images, in order. `on_step` is called after every
    /// denoising step (once for the whole batch); breaking cancels the run
    /// (`PipelineError::Cancelled`) before the next step, and every tensor of the run is dropped.
    ///
    /// A device allocation failure comes back as [`PipelineError::OutOfMemory`]; the tensors of
    /// the run are dropped and the allocator's cached memory returned before this returns.
    pub fn generate(&self, params: &GenerationParams, on_step: StepHook) -> Result<Vec<RgbImage>> {
        let mut tracker = MemoryTracker::start(&self.device);
        let result = self.generate_tracked(params, on_step, &mut tracker);
        let usage = tracker.finish();
        *self.last_memory.lock().unwrap_or_else(|e| e.into_inner()) = usage;
        result.map_err(classify_oom)
    }

    fn generate_tracked(
        &self,
        params: &GenerationParams,
        on_step: StepHook,
        tracker: &mut MemoryTracker,
    ) -> Result<Vec<RgbImage>> {
        self.check_inputs(params)?;
        // Every convolution of this run (UNet, VAE; on this thread) pads as asked, until the
        // run returns or unwinds.
        let _padding = crate::kernels::conv::circular_padding(params.tiling);
        // Held for the whole run: no other run changes the merged weights under this one.
        let _loras = self.sync_loras(&params.loras)?;
        // The hires pass's rules and schedule first: nothing runs for a request that fails them.
        let mut second = match &params.hires {
            Some(h) => Some(self.second_pass(params, h)?),
            None => None,
        };
        let (mut scheduler, begin) = self.prepare_timesteps(params)?;
        // A1111 schedules prompts over the steps times the sampler's evaluations per step
        // (`total_steps`: twice the steps for second-order samplers).
        let text_embeddings =
            self.encode_schedule(params, params.steps * scheduler.order(), None)?;
        let second_steps = second.as_ref().map_or(0, |s| s.steps());
        // diffusers' list of generators: one per image, seeded seed + i.
        let mut rngs: Vec<TorchRng> = (0..params.batch_size)
            .map(|i| TorchRng::new(params.image_seed(i)))
            .collect();
        // A1111's inpainting works on its own processed image and mask, and puts the kept
        // pixels back over each result.
        let a1111 = self.a1111_inpaint_inputs(params)?;
        let (init, overlay) = match &a1111 {
            Some((init, prepared)) => (Some(init), Some(prepared)),
            None => (params.init_image.as_ref(), None),
        };
        let control_pass = match params.hires {
            Some(_) => control::ControlPass::First,
            None => control::ControlPass::Only,
        };
        let crop = control::masked_crop(params, overlay);
        let image_prompts = self.prepare_image_prompts(params)?;
        let control = self.prepare_control(params, control_pass, crop, image_prompts.as_ref())?;
        if let Some(second) = second.as_mut() {
            second.image_prompts = image_prompts;
        }
        let lama = control.as_ref().and_then(|c| c.noise_modifier());
        let start = match init {
            None => images_in::Start {
                latents: self.prepare_latents(params, scheduler.as_ref(), &mut rngs, lama)?,
                inpaint: match self.is_inpainting() {
                    true => {
                        Some(self.unmasked_inpaint_state((params.width, params.height), &mut rngs)?)
                    }
                    false => None,
                },
            },
            Some(init) => self.prepare_image_latents(
                params,
                init,
                scheduler.as_ref(),
                begin,
                &mut rngs,
                lama,
            )?,
        };
        tracker.sample();
        let latents = {
            // The first pass's count (DPM adaptive's estimate while it runs) and the hires pass's.
            let mut on_step = |p: StepProgress<'_>| {
                tracker.sample();
                on_step(StepProgress {
                    total: p.total + second_steps,
                    ..p
                })
            };
            self.denoise(
                start,
                &text_embeddings,
                scheduler.as_mut(),
                begin,
                (
                    params.guidance_scale,
                    params.negative_guidance,
                    params.steps_run(),
                ),
                &mut rngs,
                control.as_ref(),
                &mut on_step,
            )?
        };
        // The first pass's evaluations as it ran them.
        let first_steps = scheduler.timesteps().len() - begin;
        let mut on_step = |p: StepProgress<'_>| {
            tracker.sample();
            on_step(p)
        };
        if let Some(second) = second {
            return self.hires_pass(
                params,
                latents,
                second,
                text_embeddings,
                first_steps,
                &mut on_step,
            );
        }
        drop(text_embeddings);
        // Recolor and inpaint_only units post-process each decoded image before the inpainting overlay,
        // as A1111 runs the extension's postprocess_batch before apply_overlay.
        let post = control::PostProcessing::of(params, control_pass, crop);
        // One image at a time through the VAE: its memory does not grow with the batch.
        let mut images = Vec::with_capacity(params.batch_size);
        for i in 0..latents.dim(0)? {
            let image = self.decode_latents(&latents.narrow(0, i, 1)?)?;
            tracker.sample();
            let image = control::to_rgb8_post_processed(&image, &post)?;
            let image = self.restore_faces(params, image)?;
            images.push(match overlay {
                Some(crate::inpaint_a1111::Prepared {
                    overlay: Some(o),
                    paste_to,
                    ..
                }) => o.apply(&image, *paste_to),
                _ => image,
            });
        }
        Ok(images)
    }

    /// A final image with its faces restored when the request asks (A1111's `restore_faces`,
    /// after the units' post-processing and before the overlay).
    pub(super) fn restore_faces(
        &self,
        params: &GenerationParams,
        image: RgbImage,
    ) -> Result<RgbImage> {
        match &params.face_restore {
            Some(restore) => restore.run(&image, self.device()),
            None => Ok(image),
        }
    }

    fn check_inputs(&self, params: &GenerationParams) -> Result<()> {
        if params.steps == 0 {
            return Err(PipelineError::InvalidRequest(
                "steps must be at least 1".into(),
            ));
        }
        if params.batch_size == 0 {
            return Err(PipelineError::InvalidRequest(
                "batch_size must be at least 1".into(),
            ));
        }
        self.check_image_inputs(params)?;
        if params.varies() && params.init_image.is_some() {
            return Err(PipelineError::InvalidRequest(
                "a variation seed is for text-to-image only".into(),
            ));
        }
        // diffusers requires multiples of 8; the latent grid also needs whole VAE cells.
        let multiple = self.limits.size_multiple();
        for (name, value) in [("width", params.width), ("height", params.height)] {
            if value == 0 || value % multiple != 0 {
                return Err(PipelineError::InvalidRequest(format!(
                    "{name} must be a positive multiple of {multiple}, got {value}"
                )));
            }
        }
        Ok(())
    }
}
