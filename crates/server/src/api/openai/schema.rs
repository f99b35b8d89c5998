//! The OpenAPI description of `/v1` (documentation only: the handlers read JSON objects and
//! multipart forms and translate them).

use serde::Serialize;
use utoipa::{OpenApi, ToSchema};

/// Body of `POST /v1/images/generations`. OpenAI's `model`, `quality`, `style`, `user`,
/// `moderation`, `background` (not `transparent`), `output_format` (`png`) are accepted and
/// ignored; unknown parameters are a 400. Rules are the native ones, named as sent. Our extras
/// (`negative_prompt`, `seed`, `steps`, `guidance_scale`, `scheduler`, `hires`, `tiling`,
/// `variation_seed`, `variation_strength`, ...) are native fields under their native names
/// (the `openai` client sends them in `extra_body`).
#[derive(Serialize, ToSchema)]
#[schema(as = openai::ImageGenerationRequest)]
pub struct GenerationRequest {
    /// 1..=500 characters counted after cleaning (the native rule).
    #[schema(min_length = 1)]
    pub prompt: String,
    /// The native `batch_size`: image *i* uses seed + *i*.
    #[schema(default = 1, minimum = 1, maximum = 8, nullable = true)]
    pub n: Option<u32>,
    /// `"WIDTHxHEIGHT"` within the native limits (256..=768, multiples of 64), or `auto`.
    #[schema(default = "512x512", pattern = "^(auto|[0-9]{1,5}x[0-9]{1,5})$")]
    pub size: Option<String>,
    /// `b64_json`, or `url` (a link to `/v1/images/files/{id}.png`, kept 10 minutes). Default
    /// `b64_json` (`url` when `model` is a `dall-e-*` name, as OpenAI does).
    #[schema(nullable = true)]
    pub response_format: Option<ResponseFormat>,
    /// OpenAI's model names (`dall-e-*`, `gpt-image-*`) run the default model; another name is
    /// one of ours (`GET /v1/models`), as the native `model`.
    #[schema(nullable = true, example = "dall-e-3")]
    pub model: Option<String>,
    /// Our extras, as natively (at most 500 characters counted after cleaning).
    #[schema(nullable = true)]
    pub negative_prompt: Option<String>,
    #[schema(minimum = 0, maximum = 4294967295_u64, nullable = true)]
    pub seed: Option<u64>,
    #[schema(default = 20, minimum = 1, maximum = 50, nullable = true)]
    pub steps: Option<u32>,
    #[schema(default = 7.5, minimum = 0.0, maximum = 30.0, nullable = true)]
    pub guidance_scale: Option<f64>,
    /// The sampler's eta, as natively (`ddim`, `ddim_a1111`, `ddim_cfgpp`, `euler_a`; others ignore it).
    #[schema(minimum = 0.0, maximum = 1.0, nullable = true)]
    pub eta: Option<f64>,
    #[schema(nullable = true)]
    pub scheduler: Option<crate::api::SchedulerName>,
    /// The sigma schedule, as natively (`default`, `uniform`, `karras`, `exponential`, `beta`).
    #[schema(nullable = true, default = "default")]
    pub schedule: Option<crate::api::SigmaScheduleName>,
    /// Our extra hires fix, as natively (text-to-image only): `size` is the first pass's, and
    /// the images come out at the second pass's size (`{"scale": 1.5}`: 768x768 from
    /// `512x512`). A broken rule is a 400 whose `param` names `hires.<key>`.
    #[schema(nullable = true)]
    pub hires: Option<crate::api::HiresRequest>,
    /// Our extra, as natively: which steps the hires pass's strength runs (`diffusers`, the
    /// default, or A1111 1.10's `a1111`: its steps of a stretched schedule).
    #[schema(nullable = true, default = "diffusers")]
    pub step_rule: Option<crate::api::StepRuleName>,
    /// Our extra, as natively: more noise at the hires pass's start, in sigma units (A1111's
    /// `img2img_extra_noise`; 0, the default, adds none).
    #[schema(nullable = true, minimum = 0.0, maximum = 1.0, default = 0.0)]
    pub extra_noise: Option<f64>,
    /// Our extras, as natively: k-diffusion's churn (`euler`, `heun`, `dpm2`, `dpm2_a1111`) and A1111's
    /// negative guidance minimum sigma.
    #[schema(nullable = true, minimum = 0.0, maximum = 100.0, default = 0.0)]
    pub sigma_churn: Option<f64>,
    #[schema(nullable = true, minimum = 0.0, maximum = 10.0, default = 0.0)]
    pub sigma_tmin: Option<f64>,
    #[schema(nullable = true, minimum = 0.0, maximum = 999.0, default = 0.0)]
    pub sigma_tmax: Option<f64>,
    #[schema(nullable = true, minimum = 0.0, maximum = 1.1, default = 1.0)]
    pub sigma_noise: Option<f64>,
    #[schema(nullable = true, minimum = 0.0, maximum = 15.0, default = 0.0)]
    pub negative_guidance_min_sigma: Option<f64>,
    #[schema(nullable = true, default = false)]
    pub negative_guidance_all_steps: Option<bool>,
    #[schema(nullable = true, minimum = 0.0, maximum = 1.0, default = 0.0)]
    pub negative_guidance_skip_early: Option<f64>,
    /// As natively: `diffusers` (the default: no guidance at a scale of 1 or below) or `a1111`
    /// (the negative prompt runs below 1 too).
    #[schema(nullable = true, default = "diffusers")]
    pub guidance_rule: Option<crate::api::GuidanceRuleName>,
    /// Our extras as natively: A1111's prompt syntax (`a1111`, the default, or `plain`),
    /// clip skip and LoRAs.
    #[schema(nullable = true, default = "a1111")]
    pub prompt_syntax: Option<crate::api::PromptSyntaxName>,
    #[schema(minimum = 1, maximum = 4, default = 1, nullable = true)]
    pub clip_skip: Option<u32>,
    #[schema(max_items = 8, nullable = true)]
    pub loras: Option<Vec<crate::api::LoraUse>>,
    /// Seamless textures, as natively (A1111's `tiling`).
    #[schema(default = false, nullable = true)]
    pub tiling: Option<bool>,
    /// Face restoration (CodeFormer, FACE_RESTORE_DIR), as natively.
    #[schema(nullable = true)]
    pub restore_faces: Option<crate::api::RestoreFaces>,
    /// A1111's variation seed (`subseed`), as natively: the starting noise bent towards this
    /// seed's by `variation_strength`; image *i* of `n` uses variation seed + *i*, every image
    /// keeping `seed`.
    #[schema(minimum = 0, maximum = 4294967295_u64, nullable = true)]
    pub variation_seed: Option<u64>,
    /// A1111's `subseed_strength`: 0 is the seed's image, 1 the variation seed's noise.
    #[schema(minimum = 0.0, maximum = 1.0, default = 0.0, nullable = true)]
    pub variation_strength: Option<f64>,
    /// A1111's seed resize (`seed_resize_from_w`/`_h`), as natively: the size a seed's image
    /// was made at, whose noise the images keep in their centre; both or neither.
    #[schema(minimum = 64, maximum = 2048, nullable = true)]
    pub seed_resize_from_width: Option<u32>,
    #[schema(minimum = 64, maximum = 2048, nullable = true)]
    pub seed_resize_from_height: Option<u32>,
    /// Our extra: the VAE to decode with, by name (`GET /vaes`, VAE_DIR), as natively;
    /// `automatic` or absent: the model's own.
    #[schema(
        nullable = true,
        min_length = 1,
        example = "vae-ft-mse-840000-ema-pruned.safetensors"
    )]
    pub vae: Option<String>,
    /// Prompt styles by name (`GET /styles`), applied to the prompts as the native API does.
    #[schema(nullable = true)]
    pub styles: Option<Vec<String>>,
    /// Our extra: ControlNets (`GET /controlnets`, CONTROLNET_DIR) with their control images,
    /// as natively; at most 3.
    #[schema(max_items = 3, nullable = true)]
    pub controlnets: Option<Vec<crate::api::ControlNetUse>>,
    /// Our extra: IP-Adapters (`GET /ip-adapters`, IP_ADAPTER_DIR) with their image prompts, as
    /// natively; at most 3.
    #[schema(max_items = 3, nullable = true)]
    pub ip_adapters: Option<Vec<crate::api::IpAdapterUse>>,
}

/// Multipart body of `POST /v1/images/edits`: `image` (PNG file), optional `mask` (PNG file:
/// transparent pixels are repainted; a mask without alpha: white is repainted; no mask and an
/// image with transparent pixels: those), and `prompt`, `n`, `size`, `response_format` and the
/// native extras (`strength`, `seed`, `steps`, ...) as text fields.
#[derive(Serialize, ToSchema)]
#[schema(as = openai::ImageEditRequest)]
pub struct EditRequest {
    #[schema(format = Binary, value_type = String)]
    pub image: Vec<u8>,
    #[schema(format = Binary, value_type = String)]
    pub mask: Option<Vec<u8>>,
    /// 1..=500 characters counted after cleaning (the native rule).
    #[schema(min_length = 1)]
    pub prompt: String,
    #[schema(default = 1, minimum = 1, maximum = 8, nullable = true)]
    pub n: Option<u32>,
    pub size: Option<String>,
    #[schema(nullable = true)]
    pub response_format: Option<ResponseFormat>,
    #[schema(default = 0.8, minimum = 0.0, maximum = 1.0, nullable = true)]
    pub strength: Option<f64>,
    /// Which steps `strength` runs, as natively: `diffusers` (the default) or A1111 1.10's
    /// `a1111` / `a1111_fix_steps`.
    #[schema(nullable = true, default = "diffusers")]
    pub step_rule: Option<crate::api::StepRuleName>,
}

/// `images/variations` (multipart/form-data): the `image` file (PNG, JPEG or WebP, any size the
/// native rules allow), `n`, `size` (absent: the image's own, floored to a multiple of 8),
/// `response_format` (absent: `url`, DALL-E 2's default) and the native extras (`prompt`,
/// `strength`, `seed`, `steps`, ...) as text fields. Each image is img2img of `image`.
#[derive(Serialize, ToSchema)]
#[schema(as = openai::ImageVariationRequest)]
pub struct VariationRequest {
    #[schema(format = Binary, value_type = String)]
    pub image: Vec<u8>,
    #[schema(default = 1, minimum = 1, maximum = 8, nullable = true)]
    pub n: Option<u32>,
    pub size: Option<String>,
    #[schema(nullable = true)]
    pub response_format: Option<ResponseFormat>,
    /// A prompt to steer the variations (an extra; absent: none, the image alone).
    #[schema(nullable = true)]
    pub prompt: Option<String>,
    /// How much of the image is repainted (absent: 0.75, A1111's img2img default).
    #[schema(default = 0.75, minimum = 0.0, maximum = 1.0, nullable = true)]
    pub strength: Option<f64>,
}

/// How images come back.
#[derive(Serialize, ToSchema)]
#[schema(as = openai::ResponseFormat)]
#[serde(rename_all = "snake_case")]
#[allow(dead_code)] // documentation only
pub enum ResponseFormat {
    B64Json,
    Url,
}

#[derive(Serialize, ToSchema)]
#[schema(as = openai::Image)]
pub struct Image {
    pub b64_json: Option<String>,
    pub url: Option<String>,
    /// The prompt as the model saw it.
    pub revised_prompt: String,
}

#[derive(Serialize, ToSchema)]
#[schema(as = openai::ImagesResponse)]
pub struct ImagesResponse {
    /// Unix seconds.
    pub created: u64,
    pub data: Vec<Image>,
    /// Always `png`.
    pub output_format: String,
}

#[derive(Serialize, ToSchema)]
#[schema(as = openai::ErrorDetail)]
pub struct ErrorDetail {
    /// What went wrong, with the parameter and rule.
    pub message: String,
    /// `invalid_request_error` (4xx), `authentication_error`, `rate_limit_error`, `server_error`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The parameter at fault, as sent, or null.
    pub param: Option<String>,
    /// The native `error_code` (`validation_error`, `timeout`, `overloaded`, ...).
    pub code: String,
}

/// Every error on `/v1`: 400 where the native API answers 422; `x-should-retry: false` where a
/// retry cannot help (all but 429, 503 while loading, and an open out-of-memory breaker).
#[derive(Serialize, ToSchema)]
#[schema(as = openai::ErrorBody)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(OpenApi)]
#[openapi(
    paths(super::generations, super::edits, super::variations, super::file, super::models, super::model),
    components(schemas(GenerationRequest, EditRequest, VariationRequest, ResponseFormat, Image, ImagesResponse, ErrorDetail, ErrorBody)),
    tags((name = "openai", description = "OpenAI's image API under /v1, translated into the native request"))
)]
pub struct ApiDoc;
