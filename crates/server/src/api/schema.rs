//! The native API's request types (their OpenAPI schemas are these; the response is in
//! response_schema.rs, and the hires, inpaint and ControlNet parts and /health's have files of
//! their own).

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::controlnet_schema::ControlNetUse;
use super::hires_schema::HiresRequest;
use super::inpaint_schema::InpaintRequest;

/// Scheduler names of the API.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema)]
pub enum SchedulerName {
    #[serde(rename = "pndm")]
    Pndm,
    #[serde(rename = "ddim")]
    Ddim,
    #[serde(rename = "euler")]
    Euler,
    #[serde(rename = "euler_karras")]
    EulerKarras,
    #[serde(rename = "euler_a")]
    EulerA,
    #[serde(rename = "euler_a_karras")]
    EulerAKarras,
    #[serde(rename = "dpmpp_2m")]
    DpmPp2m,
    #[serde(rename = "dpmpp_2m_karras")]
    DpmPp2mKarras,
    #[serde(rename = "dpmpp_2m_sde")]
    DpmPp2mSde,
    #[serde(rename = "dpmpp_2m_sde_karras")]
    DpmPp2mSdeKarras,
    #[serde(rename = "dpmpp_2m_sde_heun")]
    DpmPp2mSdeHeun,
    #[serde(rename = "dpmpp_2m_sde_heun_karras")]
    DpmPp2mSdeHeunKarras,
    #[serde(rename = "dpmpp_2m_sde_brownian")]
    DpmPp2mSdeBrownian,
    #[serde(rename = "dpmpp_2m_sde_brownian_karras")]
    DpmPp2mSdeBrownianKarras,
    #[serde(rename = "dpmpp_2m_sde_heun_brownian")]
    DpmPp2mSdeHeunBrownian,
    #[serde(rename = "dpmpp_2m_sde_heun_brownian_karras")]
    DpmPp2mSdeHeunBrownianKarras,
    #[serde(rename = "dpmpp_sde")]
    DpmPpSde,
    #[serde(rename = "dpmpp_sde_karras")]
    DpmPpSdeKarras,
    #[serde(rename = "dpmpp_2s_ancestral")]
    DpmPp2sAncestral,
    #[serde(rename = "dpmpp_2s_ancestral_karras")]
    DpmPp2sAncestralKarras,
    #[serde(rename = "dpmpp_3m_sde")]
    DpmPp3mSde,
    #[serde(rename = "dpmpp_3m_sde_karras")]
    DpmPp3mSdeKarras,
    #[serde(rename = "lms")]
    Lms,
    #[serde(rename = "lms_karras")]
    LmsKarras,
    #[serde(rename = "unipc")]
    UniPc,
    #[serde(rename = "unipc_karras")]
    UniPcKarras,
    #[serde(rename = "heun")]
    Heun,
    #[serde(rename = "heun_karras")]
    HeunKarras,
    #[serde(rename = "dpm2")]
    Dpm2,
    #[serde(rename = "dpm2_karras")]
    Dpm2Karras,
    #[serde(rename = "dpm2_a")]
    Dpm2A,
    #[serde(rename = "dpm2_a_karras")]
    Dpm2AKarras,
    /// k-diffusion's DPM2 as A1111's `DPM2` runs it (the next-to-last sigma dropped).
    #[serde(rename = "dpm2_a1111")]
    Dpm2A1111,
    /// k-diffusion's DPM2 ancestral as A1111's `DPM2 a` runs it.
    #[serde(rename = "dpm2_a_a1111")]
    Dpm2AA1111,
    #[serde(rename = "lcm")]
    Lcm,
    /// A1111's own DDIM (its timesteps and img2img start), not diffusers'.
    #[serde(rename = "ddim_a1111")]
    DdimA1111,
    /// A1111's DDIM CFG++ (the update along the negative prompt's prediction, the guidance
    /// scale over 12.5).
    #[serde(rename = "ddim_cfgpp")]
    DdimCfgpp,
    /// A1111's own PLMS, not diffusers' PNDM.
    #[serde(rename = "plms_a1111")]
    PlmsA1111,
    /// A1111's own UniPC (bh1, order 3, its times), not diffusers' `unipc`.
    #[serde(rename = "unipc_a1111")]
    UniPcA1111,
    /// A1111's own Restart (Heun steps; from 20 steps a restart with fresh noise).
    #[serde(rename = "restart")]
    Restart,
    #[serde(rename = "restart_karras")]
    RestartKarras,
    /// k-diffusion's DPM-Solver-Fast (A1111's DPM fast).
    #[serde(rename = "dpm_fast")]
    DpmFast,
    /// k-diffusion's DPM-Solver-23 with adaptive steps (A1111's DPM adaptive).
    #[serde(rename = "dpm_adaptive")]
    DpmAdaptive,
}

/// Sigma schedules of the API (`schedule`): `default` is the scheduler name's own (Karras for
/// the `_karras` names, else uniform) or, with no scheduler, the model's own config's.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema)]
pub enum SigmaScheduleName {
    #[serde(rename = "default")]
    Default,
    #[serde(rename = "uniform")]
    Uniform,
    #[serde(rename = "karras")]
    Karras,
    #[serde(rename = "exponential")]
    Exponential,
    #[serde(rename = "beta")]
    Beta,
}

/// Body of `POST /generate`. Unknown fields are rejected (422 `validation_error`, `details` names
/// the field); a body that is not a JSON object, or not sent as `application/json`, gets 400
/// `invalid_json`. Text fields are cleaned first: control characters other than whitespace are
/// removed, then surrounding whitespace is trimmed; lengths count Unicode scalar values.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GenerateRequest {
    /// 1..=500 characters counted after cleaning (control characters and surrounding whitespace
    /// do not count, so the schema states no maxLength): what to draw.
    #[schema(
        min_length = 1,
        example = "a watercolor painting of a lighthouse at dawn"
    )]
    pub prompt: String,
    /// At most 500 characters counted after cleaning: what to keep out of the image.
    #[schema(default = "")]
    pub negative_prompt: Option<String>,
    #[schema(minimum = 1, maximum = 50, default = 20)]
    /// Denoising steps; time grows with them.
    pub steps: Option<u32>,
    /// Image width in pixels.
    #[schema(minimum = 256, maximum = 768, multiple_of = 64, default = 512)]
    pub width: Option<u32>,
    /// Image height in pixels.
    #[schema(minimum = 256, maximum = 768, multiple_of = 64, default = 512)]
    pub height: Option<u32>,
    /// Random when absent or null, and returned in the metadata. Requests with a seed are
    /// deterministic and may be answered from the response cache (`x-cache: hit`).
    #[schema(minimum = 0, maximum = 4294967295_u64, nullable = true)]
    pub seed: Option<u64>,
    /// At or below 1.0 classifier-free guidance is off under `guidance_rule: diffusers`;
    /// below 1 under `a1111` it runs, and with `ddim_cfgpp` at every scale. A guidance-distilled model (a full LCM
    /// model: `time_cond_proj_dim` in its UNet config) never runs classifier-free guidance: its
    /// UNet takes the scale as an embedding instead (as diffusers), and the negative prompt has
    /// no effect.
    #[schema(minimum = 0.0, maximum = 30.0, default = 7.5)]
    pub guidance_scale: Option<f64>,
    /// At which scales classifier-free guidance runs the negative prompt. `diffusers`: above 1
    /// only; at or below 1 the prompt's prediction alone. `a1111` (AUTOMATIC1111 1.10's CFG
    /// denoiser, what its dialect runs): below 1 too, `uncond + (cond - uncond) * scale`, so
    /// at 0.5 the prediction is halfway between the negative prompt's and the prompt's and at
    /// 0 it is the negative prompt's; at exactly 1 that is the prompt's, which runs alone.
    #[schema(nullable = true, default = "diffusers")]
    pub guidance_rule: Option<GuidanceRuleName>,
    /// The sampler's eta: how much of each step's noise level is fresh noise from the seed.
    /// `ddim`, `ddim_a1111` and `ddim_cfgpp` (the DDIM paper's eta, diffusers' and A1111's); the ancestral and
    /// SDE samplers `euler_a`, `dpm2_a`, `dpm2_a_a1111`, `dpmpp_sde`, `dpmpp_2m_sde`, `dpmpp_2m_sde_heun`,
    /// `dpmpp_2s_ancestral` and `dpmpp_3m_sde` and their `_karras` names, `dpm_fast` and
    /// `dpm_adaptive` (k-diffusion's eta, what A1111's `Euler a`, `DPM2 a`, `DPM++ SDE`,
    /// `DPM++ 2M SDE`, `DPM++ 2M SDE Heun`, `DPM++ 2S a`, `DPM++ 3M SDE`, `DPM fast` and
    /// `DPM adaptive` take); other schedulers have none and ignore it, as
    /// diffusers and A1111 do. Absent or null: the sampler's default, 0 for DDIM, 1 for the others (diffusers'
    /// schedulers).
    #[schema(minimum = 0.0, maximum = 1.0, nullable = true)]
    pub eta: Option<f64>,
    /// Absent or null: the model's own scheduler config. `_karras` names use Karras et al.'s
    /// sigmas; `euler_a`, `dpmpp_2m_sde`, `dpmpp_sde`, `dpm2_a`, `dpmpp_2s_ancestral`,
    /// `dpmpp_3m_sde` and `lcm` add noise drawn from the seed at every step; `dpmpp_sde`, `heun`,
    /// `dpm2`, `dpm2_a`, their `_a1111` names and `dpmpp_2s_ancestral` run the UNet twice per
    /// step but the last (2 * steps - 1 evaluations, which progress counts); `dpm2_a1111` and
    /// `dpm2_a_a1111` are k-diffusion's DPM2 and DPM2 ancestral as A1111's `DPM2` and `DPM2 a`
    /// run them: on A1111's schedule of `steps + 1` sigmas with the next-to-last dropped (any
    /// `schedule`), where diffusers' `dpm2` and `dpm2_a` keep it; `dpmpp_2s_ancestral` and
    /// `dpmpp_3m_sde` are k-diffusion's samplers on A1111's sigmas (3M SDE drops the
    /// next-to-last sigma as A1111 does, and its noise is a Brownian tree per image, as
    /// `dpmpp_sde`'s); the `_brownian` names are `dpmpp_2m_sde` and `dpmpp_2m_sde_heun` with
    /// that noise (A1111's, which its `DPM++ 2M SDE` and Heun run) instead of the seed's
    /// generator draws; `lcm` is for LCM
    /// models (4-8 steps, guidance about 8) and LCM-LoRAs (guidance 1-2); `ddim_a1111` and
    /// `plms_a1111` are A1111's own DDIM and PLMS (its timesteps, `steps - 1` updates when
    /// `steps` divides 1000, its img2img start with `step_rule` `a1111`), not diffusers' `ddim`
    /// and `pndm`; `ddim_cfgpp` is A1111's `DDIM CFG++` (CFG++, Chung et al. 2024): A1111's DDIM
    /// whose update points back along the negative prompt's prediction instead of the guided
    /// one, the guidance scale divided by 12.5 (7.5 guides as 0.6 does; as A1111's, it runs the
    /// negative prompt at every scale: 1 guides as 0.08 does, 0 follows the negative prompt);
    /// `unipc_a1111` is A1111's own UniPC (bh1, order 3, its continuous times:
    /// `steps + 1` evaluations where `steps` does not divide 1000; img2img with `step_rule`
    /// `a1111` runs `int(steps * strength)` evaluations), not diffusers' `unipc`; `restart` is
    /// A1111's Restart (Heun steps, `2 * steps - 1` evaluations; from 20 steps it moves 9 of
    /// them (from 36, `2 * (steps / 4)`) into a restart: back up from sigma 0.1 to 2 with fresh
    /// noise from the seed, and down again); `dpm_fast` is k-diffusion's DPM-Solver-Fast as
    /// A1111's `DPM fast` runs it (`steps` evaluations in `steps / 3 + 1` steps of up to third
    /// order from the largest training sigma to the smallest, not to 0; with eta, noise from
    /// the seed after each step); `dpm_adaptive` is k-diffusion's DPM-Solver-23 with adaptive
    /// steps as A1111's `DPM adaptive` runs it (between the same ends; `steps` only sets the
    /// starting noise and img2img's start: its error control decides the evaluations, three per
    /// try, so the progress total is an estimate until it ends).
    #[schema(nullable = true)]
    pub scheduler: Option<SchedulerName>,
    /// The sigmas the scheduler steps through (diffusers' `use_karras_sigmas`,
    /// `use_exponential_sigmas`, `use_beta_sigmas`; A1111's schedule types). `default`, absent or
    /// null: the scheduler name's own (Karras for the `_karras` names, else `uniform`, the
    /// training schedule's) or, with no `scheduler`, the model's own config's. `karras` with a
    /// plain name is its `_karras` name; `exponential` (evenly spaced in log sigma) and `beta`
    /// (Beta(0.6, 0.6) quantiles) run with `euler`, `lms`, `dpmpp_2m`, `dpmpp_2m_sde`,
    /// `dpmpp_sde`, `unipc`, `heun`, `dpm2`, `dpm2_a`, `dpm2_a1111`, `dpm2_a_a1111`, `restart`,
    /// `dpm_fast`, `dpm_adaptive` (`dpm2_a1111`, `dpm2_a_a1111`, `dpm_fast` and `dpm_adaptive`
    /// with `karras` too, having no `_karras` names; `dpm_fast` and `dpm_adaptive` start from the
    /// training sigmas' ends whatever the schedule, which sets the starting noise and img2img's
    /// ends, as A1111); `euler_a` has `uniform` and `karras`;
    /// `pndm`, `ddim`, `ddim_a1111`, `ddim_cfgpp`, `plms_a1111`, `unipc_a1111` and `lcm` only
    /// `uniform`.
    /// Another combination (a `_karras` name with another schedule too) is a 422 naming
    /// `schedule`.
    #[schema(nullable = true, default = "default")]
    pub schedule: Option<SigmaScheduleName>,
    /// `a1111`: `(word:1.3)`, `((word))`, `[word]`, `\\(` escapes, `BREAK`, prompts past 77
    /// tokens, prompt editing `[from:to:when]`, alternation `[a|b]`, `AND` with weights (at
    /// most 8 parts, at most 32 distinct scheduled texts); `plain`: diffusers (truncated to 77
    /// tokens, brackets are text).
    #[schema(nullable = true, default = "a1111")]
    pub prompt_syntax: Option<PromptSyntaxName>,
    /// A1111's count: 1 = the last CLIP layer, 2 = the penultimate, and so on; at most the
    /// model's text encoder layers plus one (its `hidden_states` hold the embeddings and each
    /// layer's output, as A1111 and diffusers index them): past that, a 422 before the job is
    /// queued.
    #[schema(minimum = 1, maximum = 4, default = 1, nullable = true)]
    pub clip_skip: Option<u32>,
    /// LoRAs for this request (names from `GET /loras`); `<lora:name:weight>` tags in the
    /// prompt do the same and are removed from its text. At most 8 in all. One that does not
    /// fit the model the request runs on (`GET /loras` says so of the default one; a MODELS_DIR
    /// folder or single file named by `model` is checked from its weights' names and shapes
    /// and the LoRA's, before it loads) is a 422 naming the LoRA and its first layer without a
    /// weight of its shape.
    #[schema(max_items = 8, nullable = true)]
    pub loras: Option<Vec<LoraUse>>,
    /// Images made at once (one UNet batch); image i uses seed + i, so each can be made again
    /// alone. On a GPU, a batch that fits VRAM_LIMIT_MB at this size under no memory plan is
    /// refused up front (422 naming batch_size and the largest that fits).
    #[schema(minimum = 1, maximum = 8, default = 1, example = 2)]
    pub batch_size: Option<u32>,
    /// img2img: base64 PNG, JPEG or WebP (a `data:image/...;base64,` prefix is allowed), at
    /// most 4096 pixels a side and 16 MP. Width and height default to its size (floored to a
    /// multiple of 64, clamped to 256..=768); it is resized (Lanczos) to them.
    #[schema(nullable = true, example = "iVBORw0KGgoAAAANSUhEUgAA...")]
    pub init_image: Option<String>,
    /// With init_image: how much of the schedule runs, by `step_rule` (diffusers':
    /// `int(steps * strength)` steps, at least 1); 1.0 keeps nothing of the image but what
    /// inpainting's mask keeps (A1111's rules: 0.999). Ignored without init_image.
    #[schema(minimum = 0.0, maximum = 1.0, default = 0.8, example = 0.75)]
    pub strength: Option<f64>,
    /// Which steps `strength` runs, for init_image and the hires pass. `diffusers`: the last
    /// `int(steps * strength)` of a `steps` schedule. `a1111` (AUTOMATIC1111 1.10, what its
    /// dialect runs): img2img keeps the `steps` schedule and runs `int(min(strength, 0.999) *
    /// steps) + 1` steps (20 at 0.75: 16 from sigma index 4), from the noise level of the
    /// first; the hires pass runs its `steps` of a schedule stretched to `int(steps /
    /// min(strength, 0.999))` (then strength must be above 0). `a1111_fix_steps`: img2img as
    /// the hires pass (A1111's option `img2img_fix_steps`).
    #[schema(nullable = true, default = "diffusers")]
    pub step_rule: Option<StepRuleName>,
    /// With init_image: its starting noise times this (A1111's `initial_noise_multiplier`;
    /// not the hires pass). Ignored without init_image.
    #[schema(
        nullable = true,
        minimum = 0.0,
        maximum = 1.5,
        default = 1.0,
        example = 1.05
    )]
    pub noise_multiplier: Option<f64>,
    /// With init_image and in the hires pass: this much more of the starting noise on top, in
    /// sigma units (A1111's `img2img_extra_noise`: `x + (sigma + extra_noise) * noise` at the
    /// first step; on DDIM, PLMS and UniPC `sqrt(alphas_cumprod)` times it). 0: none. Ignored
    /// without either.
    #[schema(
        nullable = true,
        minimum = 0.0,
        maximum = 1.0,
        default = 0.0,
        example = 0.05
    )]
    pub extra_noise: Option<f64>,
    /// k-diffusion's churn (A1111's `s_churn`): each step whose sigma is within
    /// `sigma_tmin..=sigma_tmax` first raises the sample to `sigma * (1 + gamma)` with fresh noise
    /// from the seed, `gamma = min(sigma_churn / steps, sqrt(2) - 1)` (steps: those the pass
    /// runs). `euler`, `heun`, `dpm2` and their `_karras` names and `dpm2_a1111` only, the
    /// samplers A1111 passes it to (`Euler`, `Heun`, `DPM2`); the others ignore it. 0: off.
    #[schema(
        nullable = true,
        minimum = 0.0,
        maximum = 100.0,
        default = 0.0,
        example = 1.0
    )]
    pub sigma_churn: Option<f64>,
    /// The smallest sigma `sigma_churn` applies at (A1111's `s_tmin`).
    #[schema(nullable = true, minimum = 0.0, maximum = 10.0, default = 0.0)]
    pub sigma_tmin: Option<f64>,
    /// The largest sigma `sigma_churn` applies at (A1111's `s_tmax`); 0: no bound.
    #[schema(nullable = true, minimum = 0.0, maximum = 999.0, default = 0.0)]
    pub sigma_tmax: Option<f64>,
    /// The churn noise's scale (A1111's `s_noise`; only with `sigma_churn`, on the same
    /// samplers).
    #[schema(nullable = true, minimum = 0.0, maximum = 1.1, default = 1.0)]
    pub sigma_noise: Option<f64>,
    /// A1111's negative guidance minimum sigma (`s_min_uncond`, infotext `NGMS`): with guidance
    /// on, every other UNet evaluation (the second, fourth, ... of each pass) whose noise level
    /// is below this runs the prompt alone, unguided, skipping the negative prompt's half of the
    /// batch. The noise level is the sampler's sigma; on `ddim_a1111`, `ddim_cfgpp`, `plms_a1111`
    /// and `unipc_a1111` the timestep, as A1111 compares it. 0: off.
    #[schema(
        nullable = true,
        minimum = 0.0,
        maximum = 15.0,
        default = 0.0,
        example = 0.5
    )]
    pub negative_guidance_min_sigma: Option<f64>,
    /// With `negative_guidance_min_sigma`: every evaluation below it skips, not every other
    /// (A1111's `s_min_uncond_all`).
    #[schema(nullable = true, default = false)]
    pub negative_guidance_all_steps: Option<bool>,
    /// A1111's "Skip Early CFG" (its option `skip_early_cond`): with guidance on, the UNet
    /// evaluations at the start of each pass (the first pass and the hires pass, each counted
    /// from 0) whose number over A1111's step count of the pass is at most this run the prompt
    /// alone, unguided, skipping the negative prompt's half of the batch; the first evaluation
    /// always skips. The step count is the steps the pass runs (with init_image, those
    /// `strength` runs), twice that for the samplers that evaluate twice per step. It comes
    /// before `negative_guidance_min_sigma`'s rule. 0: off.
    #[schema(
        nullable = true,
        minimum = 0.0,
        maximum = 1.0,
        default = 0.0,
        example = 0.25
    )]
    pub negative_guidance_skip_early: Option<f64>,
    /// With init_image: how it (and mask_image) is fitted to width x height, as A1111
    /// img2img's `resize_mode`: `just_resize` stretches it (Lanczos), `crop_and_resize` covers
    /// the size and crops the centre, `resize_and_fill` fits it and fills the borders with its
    /// stretched edges, `latent_upscale` encodes it at its own size (8..=768 a side) and
    /// resizes the latents (bilinear). With `inpaint` the mask is blurred first, then both are
    /// fitted; "only masked" ignores the mode; the latent upscale with a mask over the whole
    /// picture needs the image at width x height (at another, A1111 fails or pastes its
    /// overlay over the result's corner). Ignored without init_image.
    #[schema(nullable = true, default = "just_resize")]
    pub resize_mode: Option<ResizeModeName>,
    /// Only with init_image, same size: inpainting. White = repaint, black = keep; grey is
    /// binarised at 0.5. Without it an inpainting model (9-channel UNet) repaints the whole
    /// image, in text-to-image too (A1111's conditioning of one: a mask of ones).
    #[schema(nullable = true, example = "iVBORw0KGgoAAAANSUhEUgAA...")]
    pub mask_image: Option<String>,
    /// Hires fix (text-to-image only): a second, img2img pass at a larger size over the
    /// upscaled first image, as A1111's `enable_hr`. The PNG comes out at the pass's size
    /// (`metadata.hires`, and `metadata.image_width`/`image_height`); `metadata.width`/`height`
    /// stay the first pass's.
    #[schema(nullable = true)]
    pub hires: Option<HiresRequest>,
    /// The model to run on, by name (`GET /models`): a model of MODELS_DIR, or the default's
    /// name. Absent or null: the default model (`--model`). A job naming another model than
    /// the loaded one waits its turn, then the worker loads it (the job's `loading`); an
    /// unknown name is a 422. A name is 1..=255 characters (not stated as a maxLength: a
    /// string within it is still no model unless the folder has it).
    #[schema(nullable = true, min_length = 1, example = "dreamshaper_8.safetensors")]
    pub model: Option<String>,
    /// The VAE to decode with (and to encode `init_image` with), by name (`GET /vaes`): a
    /// file or diffusers folder of VAE_DIR, or a `*.vae.*` file of MODELS_DIR. Absent, null or
    /// `automatic`: A1111's VAE near a single-file checkpoint (the first VAE file, in natural
    /// name order, whose name starts with the checkpoint's name less its extension, e.g.
    /// `model.vae.safetensors` for `model.safetensors`), else the model's own; `none`: the
    /// model's own. The worker swaps it between jobs; a diffusers folder whose config makes
    /// other latents than the model's (latent channels, downscale factor) is a 422 naming `vae`
    /// before the job is queued, and so is a file whose weights' shapes (read from its names
    /// and shapes) make another VAE than the model's (latents, block widths, layers per block);
    /// an unknown name is a 422. 1..=255 characters.
    #[schema(
        nullable = true,
        min_length = 1,
        example = "vae-ft-mse-840000-ema-pruned.safetensors"
    )]
    pub vae: Option<String>,
    /// Seamless textures (A1111's `tiling`): every convolution of the UNet and the VAE pads
    /// circularly, so the image continues across its edges and tiles without seams.
    #[schema(default = false, nullable = true)]
    pub tiling: Option<bool>,
    /// Face restoration of the final images, as A1111's `restore_faces` runs it: every face
    /// RetinaFace finds is aligned to 512x512, restored by CodeFormer and pasted back under a
    /// ParseNet mask (after the hires pass, before an inpainting overlay). Needs
    /// FACE_RESTORE_DIR (a 422 naming `restore_faces` without it or its files). `{}` takes the
    /// default weight. Absent or null: off.
    #[schema(nullable = true)]
    pub restore_faces: Option<RestoreFaces>,
    /// A1111's variation seed (`subseed`): the starting noise is the seed's bent towards this
    /// seed's by `variation_strength` (A1111's slerp). Random when absent or null and the
    /// strength is above 0, and returned in the metadata. With a batch, as A1111: every image
    /// keeps `seed` and image i uses variation seed + i. Text-to-image only.
    #[schema(minimum = 0, maximum = 4294967295_u64, nullable = true)]
    pub variation_seed: Option<u64>,
    /// How far the noise goes towards the variation seed's (A1111's `subseed_strength`): 0 is
    /// the seed's image, 1 the variation seed's noise.
    #[schema(minimum = 0.0, maximum = 1.0, default = 0.0, nullable = true)]
    pub variation_strength: Option<f64>,
    /// A1111's seed resize (`seed_resize_from_w`): the width in pixels a seed's image was made
    /// at, to keep its composition at this request's size. Each image's starting noise holds,
    /// centred, its seed's noise drawn at that size (in latent cells: each side over the
    /// VAE's factor, 8 for SD 1.5, floored; cropped where larger), also in img2img, inpainting and the hires
    /// pass, and bent by a variation seed at that size. Both or neither of
    /// `seed_resize_from_width` and `seed_resize_from_height`; absent or null: off (A1111's 0
    /// or -1); the image's own size changes nothing. The infotext says `Seed resize from: WxH`.
    #[schema(minimum = 64, maximum = 2048, nullable = true, example = 512)]
    pub seed_resize_from_width: Option<u32>,
    /// A1111's `seed_resize_from_h`: the height in pixels, with `seed_resize_from_width`.
    #[schema(minimum = 64, maximum = 2048, nullable = true, example = 512)]
    pub seed_resize_from_height: Option<u32>,
    /// With mask_image: inpaint as AUTOMATIC1111 does (its `img2img` with a mask): the mask
    /// inverted and blurred, the masked region's start (`masked_content`), "only masked"
    /// (`area`), the denoised prediction mixed with the init image's latents in the kept
    /// region after every step, and the original composited over the result through the
    /// blurred mask, so kept pixels come back exactly as sent. `{}` takes A1111's web UI
    /// defaults. Absent or null: diffusers' inpainting (mask binarised at 0.5, the known region
    /// re-noised each step, the whole image decoded as generated).
    #[schema(nullable = true)]
    pub inpaint: Option<InpaintRequest>,
    /// Prompt styles by name (`GET /styles`; STYLES_FILE, A1111's `styles.csv`), at most 16,
    /// applied in order as A1111 applies them: a style text holding `{prompt}` takes the
    /// prompt in its place, any other is appended after ", "; the same for the negative
    /// prompt and the hires pass's own prompts. The prompts' rules (500 characters) hold for
    /// the styled text. An unknown name is a 422.
    #[schema(nullable = true, example = json!(["Cinematic"]))]
    pub styles: Option<Vec<String>>,
    /// ControlNets steering the composition (text-to-image, img2img, inpainting, both passes
    /// of `hires` unless a unit's `hr_option` says otherwise): diffusers' `StableDiffusionControlNetPipeline` (with `init_image` its
    /// `...Img2ImgPipeline`, with `mask_image` its `...InpaintPipeline`; with `inpaint`, A1111's
    /// inpainting with the sd-webui-controlnet extension's residuals, "only masked" cropping
    /// the control image as the init image), several summed as its `MultiControlNetModel`. At most 3. A model is a name of CONTROLNET_DIR (`GET
    /// /controlnets`; unknown: a 422 listing the names); one that is not a ControlNet for the
    /// model's UNet fails the request (422 naming it).
    #[schema(max_items = 3, nullable = true)]
    pub controlnets: Option<Vec<ControlNetUse>>,
    /// IP-Adapters: image prompts (diffusers' `load_ip_adapter`, `ip_adapter_image`,
    /// `set_ip_adapter_scale`): each image's CLIP embeds (a Plus adapter: the encoder's
    /// penultimate hidden states through its Resampler), projected to tokens, attended to by
    /// every cross-attention of the UNet beside the prompt's, the negative side taking zero
    /// embeds (Plus: the zero image's states); several add up. In every mode and pass. At most
    /// 3. A model is a name of
    /// IP_ADAPTER_DIR (`GET /ip-adapters`; unknown: a 422 listing the names); one that is not
    /// an adapter for the model's UNet fails the request (422 naming it).
    #[schema(max_items = 3, nullable = true)]
    pub ip_adapters: Option<Vec<crate::api::IpAdapterUse>>,
}

/// How prompts are read.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema)]
pub enum PromptSyntaxName {
    #[serde(rename = "a1111")]
    A1111,
    #[serde(rename = "plain")]
    Plain,
}

/// How an init image is fitted to the request's size.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ResizeModeName {
    JustResize,
    CropAndResize,
    ResizeAndFill,
    LatentUpscale,
}

/// At which scales the negative prompt runs.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema)]
pub enum GuidanceRuleName {
    #[serde(rename = "diffusers")]
    Diffusers,
    #[serde(rename = "a1111")]
    A1111,
}

/// Which steps an init image's strength runs.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema)]
pub enum StepRuleName {
    #[serde(rename = "diffusers")]
    Diffusers,
    #[serde(rename = "a1111")]
    A1111,
    #[serde(rename = "a1111_fix_steps")]
    A1111FixSteps,
}

/// A LoRA and its weight.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LoraUse {
    pub name: String,
    /// -4.0..=4.0; 1 when absent.
    #[schema(minimum = -4.0, maximum = 4.0, default = 1.0)]
    pub weight: f64,
}

/// Face restoration's setting.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RestoreFaces {
    /// CodeFormer's weight (A1111's `code_former_weight`): 0 keeps only the codebook's face
    /// (the most restoration), 1 the most of the input's own.
    #[schema(minimum = 0.0, maximum = 1.0, default = 0.5)]
    pub weight: f64,
}
