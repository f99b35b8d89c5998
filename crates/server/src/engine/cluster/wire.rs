//! What replicas write to Redis: the job record, the job spec and events as JSON,
//! worker heartbeats (key names are in `keys.rs`, the Lua scripts that make each multi-key step
//! atomic in `scripts.rs`).

use std::time::Duration;

use base64::Engine as _;
use sdserve_pipeline::controlnet::preprocess::Preprocessor;
use sdserve_pipeline::inpaint_a1111::{A1111Inpaint, MaskedContent};
use sdserve_pipeline::ip_adapter::{ExtensionImage, ExtensionRecord, ExtensionRun};
use sdserve_pipeline::pipeline::{
    GenerationParams, GuidanceRule, InitImage, LoraWeight, NegativeGuidance, PromptSyntax,
    ResizeMode, RgbImage, StepRule,
};

/// `inpainting_fill`'s values in order, as the wire carries them.
const MASKED_CONTENT: [MaskedContent; 4] = [
    MaskedContent::Fill,
    MaskedContent::Original,
    MaskedContent::LatentNoise,
    MaskedContent::LatentNothing,
];
use sdserve_pipeline::schedulers::{Churn, SchedulerKind, SigmaSchedule};
use serde::{Deserialize, Serialize};

pub use super::keys::{now_ms, time_of_ms, unix_ms, Keys};
use super::wire_hires::WireHires;
pub use super::wire_record::{event_message, parse_event, Heartbeat, Record, WireError, WireInfo};
use crate::engine::job::JobSpec;
use crate::error::DeadlineSetting;

/// An image as JSON: size and base64 RGB8 pixels.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WireImage {
    width: u32,
    height: u32,
    rgb_base64: String,
}

impl WireImage {
    fn of(i: &RgbImage) -> Self {
        Self {
            width: i.width,
            height: i.height,
            rgb_base64: base64::engine::general_purpose::STANDARD.encode(&i.pixels),
        }
    }
    fn image(&self) -> Result<RgbImage, String> {
        let pixels = base64::engine::general_purpose::STANDARD
            .decode(&self.rgb_base64)
            .map_err(|e| e.to_string())?;
        Ok(RgbImage {
            width: self.width,
            height: self.height,
            pixels,
        })
    }
}

/// An IP-Adapter's A1111 unit: its images with their alphas (base64 bytes), window, place
/// among the units and infotext entry; the Plus negative side's file is the worker's own.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct WireIpUnit {
    images: Vec<(WireImage, Option<String>)>,
    guidance_start: f64,
    guidance_end: f64,
    position: usize,
    infotext: String,
}

impl WireIpUnit {
    fn of(run: &ExtensionRun) -> Self {
        let b64 = &base64::engine::general_purpose::STANDARD;
        Self {
            images: run
                .images
                .iter()
                .map(|i| {
                    (
                        WireImage::of(&i.image),
                        i.alpha.as_ref().map(|a| b64.encode(a)),
                    )
                })
                .collect(),
            guidance_start: run.guidance_start,
            guidance_end: run.guidance_end,
            position: run.record.as_ref().map_or(0, |r| r.position),
            infotext: run
                .record
                .as_ref()
                .map(|r| r.infotext.clone())
                .unwrap_or_default(),
        }
    }

    fn run(&self) -> Result<ExtensionRun, String> {
        let b64 = &base64::engine::general_purpose::STANDARD;
        let images = self
            .images
            .iter()
            .map(|(image, alpha)| {
                Ok(ExtensionImage {
                    image: image.image()?,
                    alpha: match alpha {
                        Some(a) => Some(b64.decode(a).map_err(|e| e.to_string())?),
                        None => None,
                    },
                })
            })
            .collect::<Result<_, String>>()?;
        Ok(ExtensionRun {
            images,
            guidance_start: self.guidance_start,
            guidance_end: self.guidance_end,
            plus_uncond: None,
            record: Some(ExtensionRecord {
                position: self.position,
                infotext: self.infotext.clone(),
            }),
        })
    }
}

/// A `JobSpec` as JSON, whole (init images included), so any worker can run it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WireSpec {
    prompt: String,
    negative_prompt: String,
    pub(super) steps: usize,
    width: usize,
    height: usize,
    seed: u64,
    guidance_scale: f64,
    /// The guidance rule's API name (absent from older replicas' jobs: diffusers').
    #[serde(default)]
    guidance_rule: Option<String>,
    /// Absent from older API processes: the sampler's default.
    #[serde(default)]
    eta: Option<f64>,
    scheduler: Option<String>,
    /// Absent from older API processes: the scheduler name's own.
    #[serde(default)]
    schedule: Option<String>,
    a1111_syntax: bool,
    clip_skip: usize,
    loras: Vec<(String, f64)>,
    batch_size: usize,
    init_image: Option<(WireImage, Option<WireImage>, f64)>,
    /// The hires pass (absent from older replicas' jobs: none).
    #[serde(default)]
    hires: Option<WireHires>,
    /// Circular padding (absent from older replicas' jobs: off).
    #[serde(default)]
    tiling: bool,
    /// Face restoration's CodeFormer weight (absent from older replicas' jobs: none).
    #[serde(default)]
    face_restore: Option<f64>,
    /// Variation seed and strength (absent from older replicas' jobs: none).
    #[serde(default)]
    variation: Option<(u64, f64)>,
    /// Seed resize's width and height (absent from older replicas' jobs: none).
    #[serde(default)]
    seed_resize_from: Option<(usize, usize)>,
    /// ControlNets by name (each worker finds the name in its own CONTROLNET_DIR), their
    /// images, scale, guidance start and end (absent from older replicas' jobs: none).
    #[serde(default)]
    controlnets: Vec<(String, WireImage, f64, f64, f64)>,
    /// Each ControlNet's preprocessor, already run (`controlnets`' images are its maps), for
    /// the metadata (absent from older replicas' jobs: none).
    #[serde(default)]
    controlnet_preprocessors: Vec<Option<Preprocessor>>,
    /// Each ControlNet's hires image and `hr_option` name, in `controlnets`' order (absent
    /// from older replicas' jobs: none, both).
    #[serde(default)]
    controlnet_hires: Vec<(Option<WireImage>, String)>,
    /// Each ControlNet's `inpaint_crop`, in `controlnets`' order (absent from older replicas'
    /// jobs: true).
    #[serde(default)]
    controlnet_inpaint_crop: Vec<bool>,
    /// Each ControlNet's control mode name, in `controlnets`' order (absent from older
    /// replicas' jobs: balanced).
    #[serde(default)]
    controlnet_modes: Vec<String>,
    /// Each ControlNet's inpaint mask and hires mask, in `controlnets`' order (absent from
    /// older replicas' jobs: none).
    #[serde(default)]
    controlnet_masks: Vec<(Option<WireImage>, Option<WireImage>)>,
    /// Each ControlNet's infotext entry where a dialect wrote one, in `controlnets`' order
    /// (absent from older replicas' jobs: none, the native entry).
    #[serde(default)]
    controlnet_infotexts: Vec<Option<String>>,
    /// IP-Adapters by name (each worker finds the name and the image encoder in its own
    /// IP_ADAPTER_DIR), their images and scales (absent from older replicas' jobs: none).
    #[serde(default)]
    ip_adapters: Vec<(String, WireImage, f64)>,
    /// Each IP-Adapter's A1111 unit (the extension's run), in `ip_adapters`' order (absent
    /// from older replicas' jobs: none).
    #[serde(default)]
    ip_adapter_units: Vec<Option<WireIpUnit>>,
    /// A1111's inpainting: blur x, blur y, invert, `inpainting_fill` (0..=3), "only masked"
    /// padding (absent from older replicas' jobs: diffusers' inpainting).
    #[serde(default)]
    inpaint: Option<(u32, u32, bool, u8, Option<u32>)>,
    /// A1111's `mask_round` with `inpaint` (absent from older replicas' jobs: true, A1111's
    /// default and all they ran).
    #[serde(default)]
    inpaint_mask_round: Option<bool>,
    /// A1111's `resize_mode` 0..=3 for the init image (absent from older replicas' jobs: 0).
    #[serde(default)]
    resize_mode: u8,
    /// The step rule's API name (absent from older replicas' jobs: diffusers').
    #[serde(default)]
    step_rule: Option<String>,
    /// Absent from older replicas' jobs: 1 and 0, what they ran.
    #[serde(default = "one")]
    noise_multiplier: f64,
    #[serde(default)]
    extra_noise: f64,
    /// k-diffusion's churn (`sigma_tmax` 0: no bound) and the negative guidance minimum
    /// sigma and early skip; absent from older replicas' jobs: none, what they ran.
    #[serde(default)]
    sigma_churn: f64,
    #[serde(default)]
    sigma_tmin: f64,
    #[serde(default)]
    sigma_tmax: f64,
    #[serde(default = "one")]
    sigma_noise: f64,
    #[serde(default)]
    negative_guidance_min_sigma: f64,
    #[serde(default)]
    negative_guidance_all_steps: bool,
    #[serde(default)]
    negative_guidance_skip_early: f64,
    /// Whether an `inpaint_only+lama` unit's latents start the noise (false for A1111's later
    /// `n_iter` batches; absent from older replicas' jobs: true, all they ran).
    #[serde(default = "yes")]
    lama_noise: bool,
    request: serde_json::Value,
    png_texts: Vec<String>,
    /// 0 in records written before it was carried: steps (+ hires steps) then.
    #[serde(default)]
    progress_total: usize,
    model_version: String,
    /// The MODELS_DIR model the job runs on (absent from older replicas' jobs: the default);
    /// every worker sees the same MODELS_DIR.
    #[serde(default)]
    model: Option<String>,
    /// The VAE_DIR VAE (name, hash) the job decodes with (absent from older replicas' jobs:
    /// the model's own); every worker sees the same VAE_DIR.
    #[serde(default)]
    vae: Option<(String, String)>,
    #[serde(default)]
    pub(super) timeout_setting: DeadlineSetting,
    pub(super) timeout_ms: u64,
}

impl WireSpec {
    pub fn of(s: &JobSpec) -> Self {
        let p = &s.params;
        // The reference units travel as units of `controlnets` (no model).
        let units = p.units_with_references();
        Self {
            prompt: p.prompt.clone(),
            negative_prompt: p.negative_prompt.clone(),
            steps: p.steps,
            width: p.width,
            height: p.height,
            seed: p.seed,
            guidance_scale: p.guidance_scale,
            guidance_rule: Some(p.guidance_rule.name().to_string()),
            eta: p.eta,
            scheduler: p.scheduler.map(|k| k.name().to_string()),
            schedule: p.schedule.map(|s| s.name().to_string()),
            a1111_syntax: p.prompt_syntax == PromptSyntax::A1111,
            clip_skip: p.clip_skip,
            loras: p.loras.iter().map(|l| (l.name.clone(), l.weight)).collect(),
            batch_size: p.batch_size,
            init_image: p.init_image.as_ref().map(|i| {
                (
                    WireImage::of(&i.image),
                    i.mask.as_ref().map(WireImage::of),
                    i.strength,
                )
            }),
            hires: p.hires.as_ref().map(WireHires::of),
            tiling: p.tiling,
            face_restore: p.face_restore.as_ref().map(|f| f.weight),
            variation: p.variation.map(|v| (v.seed, v.strength)),
            seed_resize_from: p.seed_resize_from.map(|r| (r.width, r.height)),
            controlnets: units
                .iter()
                .map(|c| {
                    (
                        c.model.name.clone(),
                        WireImage::of(&c.image),
                        c.scale,
                        c.guidance_start,
                        c.guidance_end,
                    )
                })
                .collect(),
            controlnet_preprocessors: units.iter().map(|c| c.preprocessor).collect(),
            controlnet_hires: units
                .iter()
                .map(|c| {
                    (
                        c.hires_image.as_ref().map(WireImage::of),
                        c.hr_option.name().to_string(),
                    )
                })
                .collect(),
            controlnet_inpaint_crop: units.iter().map(|c| c.inpaint_crop).collect(),
            controlnet_modes: units
                .iter()
                .map(|c| c.control_mode.name().to_string())
                .collect(),
            controlnet_masks: units
                .iter()
                .map(|c| {
                    (
                        c.mask.as_ref().map(WireImage::of),
                        c.hires_mask.as_ref().map(WireImage::of),
                    )
                })
                .collect(),
            controlnet_infotexts: units.iter().map(|c| c.infotext.clone()).collect(),
            ip_adapters: p
                .ip_adapters
                .iter()
                .map(|u| (u.model.name.clone(), WireImage::of(&u.image), u.scale))
                .collect(),
            ip_adapter_units: p
                .ip_adapters
                .iter()
                .map(|u| u.extension.as_ref().map(WireIpUnit::of))
                .collect(),
            inpaint: p.a1111_inpaint.as_ref().map(|o| {
                let fill = MASKED_CONTENT.iter().position(|c| *c == o.masked_content);
                (
                    o.mask_blur_x,
                    o.mask_blur_y,
                    o.invert,
                    fill.unwrap_or(1) as u8,
                    o.only_masked_padding,
                )
            }),
            inpaint_mask_round: p.a1111_inpaint.as_ref().map(|o| o.mask_round),
            resize_mode: p.resize_mode.a1111_index(),
            step_rule: Some(p.step_rule.name().to_string()),
            noise_multiplier: p.noise_multiplier,
            extra_noise: p.extra_noise,
            sigma_churn: p.churn.churn,
            sigma_tmin: p.churn.tmin,
            sigma_tmax: if p.churn.tmax.is_finite() {
                p.churn.tmax
            } else {
                0.0
            },
            sigma_noise: p.churn.noise,
            negative_guidance_min_sigma: p.negative_guidance.min_sigma,
            negative_guidance_all_steps: p.negative_guidance.all_steps,
            negative_guidance_skip_early: p.negative_guidance.skip_early,
            lama_noise: p.lama_noise,
            request: s.request.clone(),
            png_texts: s.png_texts.clone(),
            progress_total: s.progress_total,
            model_version: s.model_version.clone(),
            model: s.model.clone(),
            vae: s.vae.as_ref().map(|v| (v.name.clone(), v.hash.clone())),
            timeout_setting: s.timeout_setting,
            timeout_ms: s.timeout.as_millis() as u64,
        }
    }

    /// The spec again, with `timeout` (what is left of its deadline).
    pub fn spec(&self, timeout: Duration) -> Result<JobSpec, String> {
        let scheduler = match &self.scheduler {
            Some(n) => Some(SchedulerKind::from_name(n).ok_or(format!("scheduler {n:?}"))?),
            None => None,
        };
        let schedule = match &self.schedule {
            Some(n) => Some(SigmaSchedule::from_name(n).ok_or(format!("schedule {n:?}"))?),
            None => None,
        };
        let init_image = match &self.init_image {
            Some((image, mask, strength)) => Some(InitImage {
                image: image.image()?,
                mask: mask.as_ref().map(WireImage::image).transpose()?,
                strength: *strength,
            }),
            None => None,
        };
        let mut spec = JobSpec {
            params: GenerationParams {
                prompt: self.prompt.clone(),
                negative_prompt: self.negative_prompt.clone(),
                steps: self.steps,
                width: self.width,
                height: self.height,
                seed: self.seed,
                guidance_scale: self.guidance_scale,
                guidance_rule: match &self.guidance_rule {
                    None => GuidanceRule::Diffusers,
                    Some(name) => {
                        GuidanceRule::from_name(name).ok_or(format!("guidance rule {name:?}"))?
                    }
                },
                eta: self.eta,
                scheduler,
                schedule,
                prompt_syntax: if self.a1111_syntax {
                    PromptSyntax::A1111
                } else {
                    PromptSyntax::Plain
                },
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
                init_image,
                hires: self.hires.as_ref().map(WireHires::hires).transpose()?,
                tiling: self.tiling,
                face_restore: self.face_restore.map(crate::face_restorers::named),
                variation: self.variation.map(|(seed, strength)| {
                    sdserve_pipeline::pipeline::Variation { seed, strength }
                }),
                seed_resize_from: self.seed_resize_from.map(|(width, height)| {
                    sdserve_pipeline::pipeline::SeedResize { width, height }
                }),
                controlnets: self
                    .controlnets
                    .iter()
                    .enumerate()
                    .map(|(i, (name, image, scale, start, end))| {
                        let (hires_image, hr_option) = match self.controlnet_hires.get(i) {
                            None => (None, Default::default()),
                            Some((image, option)) => (
                                image.as_ref().map(WireImage::image).transpose()?,
                                sdserve_pipeline::controlnet::HiresOption::from_name(option)
                                    .ok_or_else(|| format!("unknown hr_option {option:?}"))?,
                            ),
                        };
                        let control_mode = match self.controlnet_modes.get(i) {
                            None => Default::default(),
                            Some(mode) => {
                                sdserve_pipeline::controlnet::ControlMode::from_name(mode)
                                    .ok_or_else(|| format!("unknown control_mode {mode:?}"))?
                            }
                        };
                        let (mask, hires_mask) = match self.controlnet_masks.get(i) {
                            None => (None, None),
                            Some((m, h)) => (
                                m.as_ref().map(WireImage::image).transpose()?,
                                h.as_ref().map(WireImage::image).transpose()?,
                            ),
                        };
                        Ok(sdserve_pipeline::controlnet::ControlNetUnit {
                            model: std::sync::Arc::new(
                                sdserve_pipeline::controlnet::ControlNet::named(name),
                            ),
                            image: image.image()?,
                            preprocessor: self.controlnet_preprocessors.get(i).copied().flatten(),
                            scale: *scale,
                            guidance_start: *start,
                            guidance_end: *end,
                            hires_image,
                            hr_option,
                            inpaint_crop: self
                                .controlnet_inpaint_crop
                                .get(i)
                                .copied()
                                .unwrap_or(true),
                            control_mode,
                            mask,
                            hires_mask,
                            infotext: self.controlnet_infotexts.get(i).cloned().flatten(),
                        })
                    })
                    .collect::<Result<_, String>>()?,
                ip_adapters: self
                    .ip_adapters
                    .iter()
                    .enumerate()
                    .map(|(i, (name, image, scale))| {
                        use sdserve_pipeline::ip_adapter::{
                            ImageEncoder, IpAdapter, IpAdapterUnit,
                        };
                        let extension = match self.ip_adapter_units.get(i) {
                            Some(Some(unit)) => Some(unit.run()?),
                            _ => None,
                        };
                        Ok(IpAdapterUnit {
                            model: std::sync::Arc::new(IpAdapter::named(name)),
                            image_encoder: std::sync::Arc::new(ImageEncoder::named(
                                crate::ip_adapters::IMAGE_ENCODER,
                            )),
                            image: image.image()?,
                            scale: *scale,
                            extension,
                        })
                    })
                    .collect::<Result<_, String>>()?,
                // The reference units travel in `controlnets`: split below.
                references: Vec::new(),
                a1111_inpaint: match self.inpaint {
                    Some((x, y, invert, fill, padding)) => Some(A1111Inpaint {
                        mask_blur_x: x,
                        mask_blur_y: y,
                        invert,
                        masked_content: *MASKED_CONTENT
                            .get(fill as usize)
                            .ok_or(format!("masked content {fill}"))?,
                        only_masked_padding: padding,
                        mask_round: self.inpaint_mask_round.unwrap_or(true),
                    }),
                    None => None,
                },
                resize_mode: ResizeMode::from_a1111_index(u64::from(self.resize_mode))
                    .ok_or(format!("resize mode {}", self.resize_mode))?,
                step_rule: match &self.step_rule {
                    None => StepRule::Diffusers,
                    Some(name) => StepRule::from_name(name).ok_or(format!("step rule {name:?}"))?,
                },
                noise_multiplier: self.noise_multiplier,
                extra_noise: self.extra_noise,
                churn: Churn {
                    churn: self.sigma_churn,
                    tmin: self.sigma_tmin,
                    tmax: if self.sigma_tmax == 0.0 {
                        f64::INFINITY
                    } else {
                        self.sigma_tmax
                    },
                    noise: self.sigma_noise,
                },
                negative_guidance: NegativeGuidance {
                    min_sigma: self.negative_guidance_min_sigma,
                    all_steps: self.negative_guidance_all_steps,
                    skip_early: self.negative_guidance_skip_early,
                },
                lama_noise: self.lama_noise,
            },
            request: self.request.clone(),
            png_texts: self.png_texts.clone(),
            progress_total: self.progress_total,
            model_version: self.model_version.clone(),
            model: self.model.clone(),
            vae: self.vae.as_ref().map(|(name, hash)| crate::vaes::VaeUse {
                name: name.clone(),
                hash: hash.clone(),
            }),
            timeout_setting: self.timeout_setting,
            timeout,
        };
        if spec.progress_total == 0 {
            spec.progress_total = spec.params.steps + spec.params.hires_steps();
        }
        spec.params.split_references();
        Ok(spec)
    }
}

#[cfg(test)]
#[path = "wire_tests.rs"]
mod tests;

/// serde's default for a multiplier absent from an older replica's job.
fn one() -> f64 {
    1.0
}

/// serde's default for a switch that older replicas' jobs always had on.
fn yes() -> bool {
    true
}
