//! What one request asks of the pipeline (`GenerationParams`) and what it gets back.

use std::ops::ControlFlow;

use candle_core::Tensor;

use super::{Hires, InitImage, ResizeMode, SeedResize, StepRule, Variation};
use crate::schedulers::{Churn, SchedulerKind, SigmaSchedule};

/// What one request asks of the pipeline (already validated by the caller). New fields keep a
/// default, so callers write `..Default::default()` for what they do not set.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationParams {
    pub prompt: String,
    pub negative_prompt: String,
    pub steps: usize,
    pub width: usize,
    pub height: usize,
    pub seed: u64,
    pub guidance_scale: f64,
    /// At which scales the negative prompt runs ([`GuidanceRule`]).
    pub guidance_rule: GuidanceRule,
    /// `None`: the model's own scheduler config.
    pub scheduler: Option<SchedulerKind>,
    /// The sigma schedule; `None`: the scheduler name's own (Karras for the `_karras` names, else
    /// uniform) or, with no scheduler either, the model's own config's.
    pub schedule: Option<SigmaSchedule>,
    /// The sampler's eta ([`Scheduler::eta`](crate::schedulers::Scheduler::eta): DDIM's, and
    /// the ancestral noise of Euler a); `None`: the sampler's default (0 for DDIM, 1 for
    /// Euler a). Ignored by samplers without one.
    pub eta: Option<f64>,
    /// k-diffusion's churn (`s_churn`, `s_tmin`, `s_tmax`, `s_noise`): Euler, Heun and DPM2
    /// take it, the other samplers ignore it (as A1111 passes it to those three only).
    pub churn: Churn,
    /// A1111's negative guidance minimum sigma (`s_min_uncond`): late evaluations skip the
    /// negative prompt.
    pub negative_guidance: NegativeGuidance,
    /// How the prompts are read: `Plain` (diffusers: 77 tokens, brackets are text) or `A1111`.
    pub prompt_syntax: PromptSyntax,
    /// A1111's "clip skip": 1 conditions on the last CLIP layer, 2 on the penultimate, ...
    pub clip_skip: usize,
    /// LoRA adapters for this request only, by name, with their weights.
    pub loras: Vec<LoraWeight>,
    /// Images made at once, as one UNet batch; image `i` uses seed `seed + i` (see
    /// [`seed_of_image`](super::seed_of_image)), so each can be made again alone.
    pub batch_size: usize,
    /// img2img (no mask) or inpainting (with a mask); `None`: text-to-image.
    pub init_image: Option<InitImage>,
    /// How the init image (and mask) is fitted to `width` x `height` (A1111's `resize_mode`).
    pub resize_mode: ResizeMode,
    /// Text-to-image only: A1111's hires fix, a second pass at a larger size.
    pub hires: Option<Hires>,
    /// A1111's `tiling` (seamless textures): every convolution of the UNet and the VAE pads
    /// circularly (torch's `padding_mode="circular"`), so the image wraps at its edges.
    pub tiling: bool,
    /// A1111's variation seed (`subseed`, `subseed_strength`): text-to-image's starting noise
    /// bent towards a second seed's. See [`image_seed`](Self::image_seed).
    pub variation: Option<Variation>,
    /// A1111's seed resize (`seed_resize_from_w`/`_h`): each image's starting noise holds, in
    /// its centre, its seed's noise drawn at this size (cropped where larger); in every mode
    /// and pass. `None`: off. See [`starting_noise`](Self::starting_noise).
    pub seed_resize_from: Option<SeedResize>,
    /// ControlNets steering text-to-image (diffusers' `StableDiffusionControlNetPipeline`;
    /// several: `MultiControlNetModel`, their residuals summed). Empty: none.
    pub controlnets: Vec<crate::controlnet::ControlNetUnit>,
    /// IP-Adapters (image prompts, diffusers' `load_ip_adapter` + `ip_adapter_image`): each
    /// adapter's image attended to in every cross-attention at its scale. Empty: none.
    pub ip_adapters: Vec<crate::ip_adapter::IpAdapterUnit>,
    /// The sd-webui-controlnet extension's reference units (no model): applied in order before
    /// every UNet evaluation they steer.
    pub references: Vec<crate::controlnet::ReferenceUnit>,
    /// Inpainting as A1111 does it (mask invert and blur, masked content, "only masked", the
    /// blend on the denoised prediction each step and the overlay of the kept pixels);
    /// `None`: diffusers' `StableDiffusionInpaintPipeline`. Only with a mask.
    pub a1111_inpaint: Option<crate::inpaint_a1111::A1111Inpaint>,
    /// Which steps an init image's strength (and the hires pass's) runs: diffusers' rule or
    /// A1111's ([`StepRule`]).
    pub step_rule: StepRule,
    /// With an init image: its starting noise times this (A1111's `initial_noise_multiplier`,
    /// img2img and inpainting; not the hires pass). 1: off.
    pub noise_multiplier: f64,
    /// With an init image and in the hires pass: `extra_noise * noise` more on the start, in
    /// k-diffusion's sigma units (A1111's `img2img_extra_noise`). 0: off.
    pub extra_noise: f64,
    /// Whether the first pass's starting noise carries an `inpaint_only+lama` unit's latents
    /// (the sd-webui-controlnet extension's noise modifier). False for A1111's `n_iter` batches
    /// after the first: the extension wraps only the first batch's RNG
    /// (`before_process_batch` clears its `noise_modifier`).
    pub lama_noise: bool,
    /// A1111's `restore_faces`: every final image's faces restored (CodeFormer) before the
    /// inpainting overlay, as A1111's `process_images` runs `restore_faces` on each decoded
    /// sample. The first pass of a hires fix is left as it is.
    pub face_restore: Option<crate::face_restore::FaceRestore>,
}

/// The library's defaults: diffusers' behaviour (plain prompts, last CLIP layer, no LoRA) and
/// its call defaults (20 steps, 512x512, guidance 7.5). Callers set what they mean and take
/// the rest from here (`..Default::default()`), so new fields do not break them.
impl Default for GenerationParams {
    fn default() -> Self {
        Self {
            prompt: String::new(),
            negative_prompt: String::new(),
            steps: 20,
            width: 512,
            height: 512,
            seed: 0,
            guidance_scale: 7.5,
            guidance_rule: GuidanceRule::Diffusers,
            scheduler: None,
            schedule: None,
            eta: None,
            churn: Churn::default(),
            negative_guidance: NegativeGuidance::default(),
            batch_size: 1,
            init_image: None,
            resize_mode: ResizeMode::JustResize,
            prompt_syntax: PromptSyntax::Plain,
            clip_skip: 1,
            loras: Vec::new(),
            hires: None,
            tiling: false,
            variation: None,
            seed_resize_from: None,
            controlnets: Vec::new(),
            ip_adapters: Vec::new(),
            references: Vec::new(),
            a1111_inpaint: None,
            step_rule: StepRule::Diffusers,
            noise_multiplier: 1.0,
            extra_noise: 0.0,
            lama_noise: true,
            face_restore: None,
        }
    }
}

impl GenerationParams {
    /// Whether a variation seed changes the noise (a strength of 0 changes nothing).
    pub fn varies(&self) -> bool {
        self.variation.is_some_and(|v| v.strength != 0.0)
    }

    /// The seed of image `i`'s generator: `seed + i`; with a variation, A1111's rule: every
    /// image keeps the seed and the variation seed counts up instead (`all_seeds`,
    /// `all_subseeds` in its `processing.py`).
    pub fn image_seed(&self, i: usize) -> u64 {
        if self.varies() {
            super::seed_of_image(self.seed, 0)
        } else {
            super::seed_of_image(self.seed, i)
        }
    }

    /// Image `i`'s variation seed (`seed + i`) and strength, when a variation changes the noise.
    pub fn image_variation(&self, i: usize) -> Option<(u64, f64)> {
        self.variation
            .filter(|v| v.strength != 0.0)
            .map(|v| (super::seed_of_image(v.seed, i), v.strength))
    }

    /// The size of the images this request makes: the hires pass's when there is one.
    pub fn output_size(&self) -> (usize, usize) {
        match &self.hires {
            Some(h) => (h.width, h.height),
            None => (self.width, self.height),
        }
    }

    /// A1111's AND parts of the prompt (`prompt_syntax: a1111`) when they combine predictions:
    /// more than one, or one weighted other than 1; `None` for a plain guided prompt.
    pub fn composed_parts(&self) -> Option<usize> {
        if self.prompt_syntax != PromptSyntax::A1111 {
            return None;
        }
        let parts = crate::prompt_schedule::and_parts(&self.prompt);
        (parts.len() != 1 || parts[0].weight != 1.0).then_some(parts.len())
    }

    /// The images' worth of guided UNet batch rows a step runs (two rows each), for memory
    /// estimates: `batch_size`, or with AND parts `batch_size * (parts + 1) / 2` rounded up
    /// (a row per part and one for the negative prompt).
    pub fn guided_batch_equivalent(&self) -> usize {
        match self.composed_parts() {
            Some(parts) => (self.batch_size * (parts + 1)).div_ceil(2),
            None => self.batch_size,
        }
    }

    /// An init image's strength and the rule its steps follow (`None`: text-to-image).
    pub fn init_start(&self) -> Option<(f64, StepRule)> {
        self.init_image
            .as_ref()
            .map(|init| (init.strength, self.step_rule))
    }

    /// Whether this pass runs the negative prompt (classifier-free guidance): above a scale of
    /// 1 under either rule; below it under [`GuidanceRule::A1111`]; at any scale on
    /// `ddim_cfgpp`, which steps along the negative prompt's prediction and, as A1111's `DDIM
    /// CFG++` (whose CFG denoiser runs it at every scale), guides at the scale over 12.5.
    pub fn runs_negative_prompt(&self) -> bool {
        negative_prompt_runs(self.guidance_scale, self.guidance_rule, self.scheduler)
    }

    /// [`Self::runs_negative_prompt`] for either pass (the hires pass may run another
    /// scheduler): what a request's memory needs count.
    pub fn any_pass_runs_negative_prompt(&self) -> bool {
        self.runs_negative_prompt()
            || self.hires.as_ref().is_some_and(|h| {
                let (scheduler, _) = super::hires::second_pass_scheduler(self, h);
                negative_prompt_runs(self.guidance_scale, self.guidance_rule, scheduler)
            })
    }

    /// The steps the first pass runs: `steps` for text-to-image; with an init image, those its
    /// strength runs under `step_rule` (A1111's: `t_enc + 1`).
    pub fn steps_run(&self) -> usize {
        self.init_start().map_or(self.steps, |(strength, rule)| {
            rule.slice(self.steps, strength)
                .map_or(self.steps, |s| s.steps_run())
        })
    }

    /// The steps the hires pass runs (0 without one): `int(steps * strength)` of its schedule
    /// under diffusers' rule, its `steps` under A1111's (of a stretched schedule).
    pub fn hires_steps(&self) -> usize {
        self.hires.as_ref().map_or(0, |h| {
            let rule = self.step_rule.for_hires();
            rule.slice(h.steps, h.strength).map_or(0, |s| s.steps_run())
        })
    }
}

/// When a UNet evaluation skips the negative prompt and runs the prompt alone, unguided (A1111's
/// CFG denoiser's `skip_uncond`). Two rules, A1111's early one first:
///
/// - "Skip Early CFG" (`skip_early_cond`): the evaluations of a pass whose share of A1111's
///   `total_steps` is at most `skip_early` (a fraction, 0..=1; 0: off).
/// - "negative guidance minimum sigma" (`s_min_uncond`, infotext `NGMS`): an evaluation whose
///   noise level (the sigma the sampler evaluates at; the timestep on A1111's DDIM, PLMS and
///   UniPC) is below `min_sigma`, on every other evaluation (the odd ones, counted from 0 in each
///   pass) or with `all_steps` (`s_min_uncond_all`) on all of them. `min_sigma` 0: off.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct NegativeGuidance {
    pub min_sigma: f64,
    pub all_steps: bool,
    pub skip_early: f64,
}

impl NegativeGuidance {
    /// Whether evaluation `evaluation` (from 0) of a pass A1111 counts as `total_steps` skips
    /// (`sigma`: its noise level, asked for only where NGMS is on). A1111 1.10:
    /// `skip_early_cond != 0 and step / total_steps <= skip_early_cond`, else `(step % 2 or
    /// s_min_uncond_all) and s_min_uncond > 0 and sigma < s_min_uncond`, the sigma comparison in
    /// float32 (the sigma tensor's dtype).
    pub fn skips(
        &self,
        evaluation: usize,
        total_steps: usize,
        sigma: impl FnOnce() -> crate::Result<f64>,
    ) -> crate::Result<bool> {
        Ok(self.skip_rule(evaluation, total_steps, sigma)?.is_some())
    }

    /// [`Self::skips`], saying which rule skipped (A1111 writes each rule's infotext entry
    /// where that rule skipped an evaluation).
    pub fn skip_rule(
        &self,
        evaluation: usize,
        total_steps: usize,
        sigma: impl FnOnce() -> crate::Result<f64>,
    ) -> crate::Result<Option<SkipRule>> {
        if self.skip_early != 0.0 && evaluation as f64 / total_steps as f64 <= self.skip_early {
            return Ok(Some(SkipRule::Early));
        }
        let ngms = self.min_sigma > 0.0
            && (evaluation % 2 == 1 || self.all_steps)
            && (sigma()? as f32) < self.min_sigma as f32;
        Ok(ngms.then_some(SkipRule::MinSigma))
    }
}

/// Which of [`NegativeGuidance`]'s rules skipped an evaluation's negative prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SkipRule {
    /// "Skip Early CFG".
    Early,
    /// The negative guidance minimum sigma (NGMS).
    MinSigma,
}

/// Whether each of [`NegativeGuidance`]'s rules skips the negative prompt on some UNet
/// evaluation of a request: A1111 writes `Skip Early CFG` and `NGMS` in the infotext only then.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GuidanceSkips {
    pub early: bool,
    pub min_sigma: bool,
}

/// [`GenerationParams::runs_negative_prompt`] for a pass of `scheduler` at `guidance_scale`.
fn negative_prompt_runs(
    guidance_scale: f64,
    rule: GuidanceRule,
    scheduler: Option<SchedulerKind>,
) -> bool {
    let cfgpp = |k: SchedulerKind| k.sampler() == crate::schedulers::Sampler::DdimCfgpp;
    // At exactly 1 A1111's `uncond + (cond - uncond) * 1` is the prompt's prediction (up to
    // rounding): the prompt alone makes it without the negative prompt's rows.
    let a1111_below = rule == GuidanceRule::A1111 && guidance_scale < 1.0;
    guidance_scale > 1.0 || a1111_below || scheduler.is_some_and(cfgpp)
}

/// At which guidance scales classifier-free guidance runs the negative prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GuidanceRule {
    /// diffusers' `do_classifier_free_guidance`: above 1 only; at or below 1 the prompt's
    /// prediction alone.
    #[default]
    Diffusers,
    /// A1111's CFG denoiser: at every scale, `uncond + (cond - uncond) * scale`, so below 1 the
    /// prediction moves towards the negative prompt's (at 0 it is the negative prompt's).
    A1111,
}

impl GuidanceRule {
    /// The request's name for it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Diffusers => "diffusers",
            Self::A1111 => "a1111",
        }
    }

    /// The rule a name means (`None`: not a rule).
    pub fn from_name(name: &str) -> Option<Self> {
        [Self::Diffusers, Self::A1111]
            .into_iter()
            .find(|r| r.name() == name)
    }
}

/// How prompt text becomes CLIP conditioning.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PromptSyntax {
    /// diffusers: the text as is, truncated to the tokenizer's 77 tokens.
    #[default]
    Plain,
    /// AUTOMATIC1111: `(word:1.3)`, `((word))`, `[word]`, escapes, `BREAK`, prompts of any length.
    A1111,
}

/// One LoRA adapter asked for by a request.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraWeight {
    pub name: String,
    pub weight: f64,
}

/// An RGB8 image, row-major.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RgbImage {
    pub width: u32,
    pub height: u32,
    pub pixels: Vec<u8>,
}

/// Reported to the per-step hook after each denoising step.
#[derive(Debug, Clone, Copy)]
pub struct StepProgress<'a> {
    /// 1-based index of the step just finished (UNet evaluations: PNDM runs steps + 1).
    pub step: usize,
    pub total: usize,
    /// The latents after this step (`[B, 4, h, w]`), for previews; `None` where there are none
    /// (a fake generator).
    pub latents: Option<&'a Tensor>,
    /// A check between steps, no step done (`step` is the last one done; `latents` `None`):
    /// work between them that takes a while (the hires fix's upscaler model, before each
    /// tile) asks whether to go on. A hook that counts or times steps skips these.
    pub between_steps: bool,
}

/// The per-step hook: `ControlFlow::Break(())` cancels the run before the next step.
pub type StepHook<'a> = &'a mut dyn FnMut(StepProgress<'_>) -> ControlFlow<()>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::Upscaler;

    fn params(guidance_scale: f64, scheduler: SchedulerKind) -> GenerationParams {
        GenerationParams {
            guidance_scale,
            scheduler: Some(scheduler),
            ..Default::default()
        }
    }

    #[test]
    fn the_negative_prompt_runs_above_1_and_always_on_ddim_cfgpp() {
        assert!(!params(1.0, SchedulerKind::DdimA1111).runs_negative_prompt());
        assert!(params(1.01, SchedulerKind::Euler).runs_negative_prompt());
        for scale in [0.0, 0.5, 1.0] {
            assert!(params(scale, SchedulerKind::DdimCfgpp).runs_negative_prompt());
        }
        // A hires pass on ddim_cfgpp runs it there: the request's memory counts it.
        let hires = Hires {
            width: 128,
            height: 128,
            upscale_width: 128,
            upscale_height: 128,
            upscaler: Upscaler::Resize,
            steps: 4,
            strength: 0.5,
            scheduler: Some(SchedulerKind::DdimCfgpp),
            schedule: None,
            prompt: None,
            negative_prompt: None,
        };
        let p = GenerationParams {
            hires: Some(hires),
            ..params(1.0, SchedulerKind::Euler)
        };
        assert!(!p.runs_negative_prompt() && p.any_pass_runs_negative_prompt());
    }

    #[test]
    fn a1111_s_rule_runs_the_negative_prompt_below_1_too() {
        let a1111 = |scale| GenerationParams {
            guidance_rule: GuidanceRule::A1111,
            ..params(scale, SchedulerKind::EulerAncestral)
        };
        for scale in [0.0, 0.5, 0.99, 1.5] {
            assert!(a1111(scale).runs_negative_prompt(), "{scale}");
        }
        // At 1 the combination is the prompt's prediction: it runs alone.
        assert!(!a1111(1.0).runs_negative_prompt());
        for scale in [0.0, 0.5, 1.0] {
            assert!(!params(scale, SchedulerKind::EulerAncestral).runs_negative_prompt());
        }
        for rule in [GuidanceRule::Diffusers, GuidanceRule::A1111] {
            assert_eq!(GuidanceRule::from_name(rule.name()), Some(rule));
        }
    }

    #[test]
    fn early_skips_count_against_a1111_s_total_steps_before_ngms() {
        let g = NegativeGuidance {
            skip_early: 0.3,
            ..Default::default()
        };
        let no_sigma = || -> crate::Result<f64> { panic!("NGMS is off") };
        // 10 steps: 0/10 ..= 3/10 skip; Heun's 16 at 0.25: 0..=4.
        let skipped = |g: NegativeGuidance, total| {
            (0..total)
                .filter(|&i| g.skips(i, total, no_sigma).unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!(skipped(g, 10), vec![0, 1, 2, 3]);
        let g = NegativeGuidance {
            skip_early: 0.25,
            ..g
        };
        assert_eq!(skipped(g, 16), vec![0, 1, 2, 3, 4]);
        // NGMS after them: every other evaluation below its sigma.
        let g = NegativeGuidance {
            min_sigma: 2.0,
            skip_early: 0.2,
            ..g
        };
        let skips = |i| g.skips(i, 10, || Ok(1.0)).unwrap();
        let got: Vec<usize> = (0..10).filter(|&i| skips(i)).collect();
        assert_eq!(got, vec![0, 1, 2, 3, 5, 7, 9]);
        assert!(!NegativeGuidance::default().skips(0, 10, no_sigma).unwrap());
    }
}
