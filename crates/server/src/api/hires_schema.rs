//! The native `hires` object (the hires fix's second pass) in the request and the metadata.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::schema::SchedulerName;

/// The hires fix's second pass: the target is `width` and `height`, or `scale` (one of the
/// two); in another aspect than the first pass the upscaled image covers the target and is
/// cropped to it (A1111's resize). Each broken rule is a 422 naming `hires.<key>`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct HiresRequest {
    /// Final width in pixels (with `height`).
    #[schema(minimum = 256, maximum = 768, multiple_of = 64, example = 768)]
    pub width: Option<u32>,
    /// Final height in pixels (with `width`).
    #[schema(minimum = 256, maximum = 768, multiple_of = 64, example = 768)]
    pub height: Option<u32>,
    /// Instead of width and height: both sides times `scale`, which must come out a multiple
    /// of 64 in 256..=768 exactly (512 x 1.5 = 768; 512 x 1.3 is a 422).
    #[schema(minimum = 1.0, maximum = 3.0, example = 1.5)]
    pub scale: Option<f64>,
    /// How the first image is enlarged, by A1111's names (`GET /sdapi/v1/latent-upscale-modes`
    /// and `/sdapi/v1/upscalers`): `Latent`, `Latent (antialiased)`, `Latent (bicubic)`,
    /// `Latent (bicubic antialiased)`, `Latent (nearest)`, `Latent (nearest-exact)` (the
    /// latents), `None`, `Lanczos`, `Nearest` (the decoded image, encoded again), or an
    /// UPSCALERS_DIR ESRGAN model by its name (`GET /upscalers`; the decoded image through the
    /// model, as A1111's `resize_image`). An unknown name is a 422 listing the names.
    #[schema(default = "Latent", example = "Lanczos")]
    pub upscaler: Option<String>,
    /// Steps of the second pass's schedule; 0 or absent: the request's `steps`.
    #[schema(minimum = 0, maximum = 50, default = 0)]
    pub steps: Option<u32>,
    /// How much of the second pass's schedule runs: `int(steps * strength)` steps (at least 1)
    /// under the request's `step_rule` `diffusers`; A1111's rules run `steps` of a schedule
    /// stretched to `int(steps / min(strength, 0.999))` (strength above 0).
    #[schema(minimum = 0.0, maximum = 1.0, default = 0.75)]
    pub strength: Option<f64>,
    /// The second pass's own scheduler (A1111's `hr_sampler_name`); absent or null: the
    /// first pass's.
    #[schema(nullable = true)]
    pub scheduler: Option<SchedulerName>,
    /// The second pass's own prompt (A1111's `hr_prompt`); absent, null or empty: the
    /// request's. Its `<lora:...>` tags may only repeat the request's (one set of LoRAs runs
    /// both passes). At most 500 characters counted after cleaning.
    #[schema(nullable = true)]
    pub prompt: Option<String>,
    /// The second pass's own negative prompt (A1111's `hr_negative_prompt`); absent, null or
    /// empty: the request's. At most 500 characters counted after cleaning.
    #[schema(nullable = true)]
    pub negative_prompt: Option<String>,
}

/// The second pass as it ran; `width` x `height` is the returned images' size.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct HiresMetadata {
    pub width: u32,
    pub height: u32,
    /// A1111's name of the upscaler.
    pub upscaler: String,
    /// The second pass's schedule (it runs `int(steps * strength)` of them).
    pub steps: u32,
    pub strength: f64,
    /// The second pass's own scheduler (A1111's `hr_sampler_name`); null: the first pass's.
    pub scheduler: Option<String>,
    /// The sigma schedule that scheduler ran on (`uniform`, `karras`, `exponential`, `beta`:
    /// A1111's `hr_scheduler`, else the scheduler name's own); null with `scheduler` (the
    /// first pass's, `metadata.schedule`), as in results an older version recorded.
    #[serde(default)]
    #[schema(example = "karras")]
    pub schedule: Option<String>,
    /// The second pass's own prompts (A1111's `hr_prompt`, `hr_negative_prompt`); null: the
    /// request's.
    pub prompt: Option<String>,
    pub negative_prompt: Option<String>,
}
