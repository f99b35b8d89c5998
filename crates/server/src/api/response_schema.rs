//! The native API's response: the images and the metadata that says how they were made.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::controlnet_schema::ControlNetMetadata;
use super::hires_schema::HiresMetadata;
use super::inpaint_schema::InpaintMetadata;
use super::schema::LoraUse;

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct GenerateMetadata {
    pub prompt: String,
    pub negative_prompt: String,
    pub steps: u32,
    /// The first pass's size, as the request's `width` and `height` (and A1111's `Size`). The
    /// images have this size unless the hires fix ran (then `hires.width` x `hires.height`);
    /// `image_width` x `image_height` always say the images' size.
    pub width: u32,
    pub height: u32,
    /// The returned images' size: `width` x `height`, or with the hires fix its pass's.
    /// Absent only from results that an older version recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(example = 768)]
    pub image_width: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(example = 768)]
    pub image_height: Option<u32>,
    pub seed: u64,
    pub guidance_scale: f64,
    /// The request's `guidance_rule` where it is `a1111` (absent: `diffusers`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(example = "a1111")]
    pub guidance_rule: Option<String>,
    /// The request's `eta`, where it gave one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta: Option<f64>,
    /// The scheduler actually used (the model's own when the request named none).
    pub scheduler: String,
    /// The sigma schedule it ran on (`uniform`, `karras`, `exponential`, `beta`).
    #[serde(default)]
    pub schedule: String,
    /// `a1111` or `plain`.
    pub prompt_syntax: String,
    pub clip_skip: u32,
    /// The LoRAs applied (from `loras` and the prompt's tags).
    pub loras: Vec<LoraUse>,
    pub generation_time_seconds: f64,
    /// Model name and revision or content digest.
    pub model_version: String,
    /// The VAE (of VAE_DIR or MODELS_DIR) that decoded the images; null: the model's own.
    #[serde(default)]
    pub vae: Option<String>,
    /// The seed of each image, in order: seed + i.
    pub seeds: Vec<u64>,
    pub batch_size: u32,
    /// With an init image; null for text-to-image.
    pub strength: Option<f64>,
    /// How the init image was fitted to `width` x `height` (the request's `resize_mode`:
    /// `just_resize`, `crop_and_resize`, `resize_and_fill` or `latent_upscale`); null for
    /// text-to-image and in results an older version recorded.
    #[serde(default)]
    #[schema(example = "just_resize")]
    pub resize_mode: Option<String>,
    /// `txt2img`, `img2img` or `inpaint`.
    #[schema(example = "img2img")]
    pub mode: String,
    /// Which steps `strength` ran (the request's `step_rule`: `diffusers`, `a1111` or
    /// `a1111_fix_steps`), with an init image or the hires fix; absent otherwise (no pass
    /// started from an image) and in results an older version recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(example = "a1111")]
    pub step_rule: Option<String>,
    /// The request's `noise_multiplier` where it applied (an init image) and is not 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub noise_multiplier: Option<f64>,
    /// The request's `extra_noise` where it applied (an init image or the hires fix) and is
    /// not 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extra_noise: Option<f64>,
    /// The churn values the sampler took, each where it is not its default (`sigma_tmax` null:
    /// no bound); absent where it took none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sigma_churn: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sigma_tmin: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sigma_tmax: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sigma_noise: Option<f64>,
    /// The request's negative guidance minimum sigma where it is on (with guidance), and
    /// whether every evaluation below it skips.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub negative_guidance_min_sigma: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub negative_guidance_all_steps: Option<bool>,
    /// The request's `negative_guidance_skip_early` where it is on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub negative_guidance_skip_early: Option<f64>,
    /// With the hires fix: its second pass, whose size the images have; null without.
    #[serde(default)]
    pub hires: Option<HiresMetadata>,
    /// Whether the image was made to tile (`tiling`). False in results an older version
    /// recorded.
    #[serde(default)]
    pub tiling: bool,
    /// Face restoration as it ran (`restore_faces`); null without.
    #[serde(default)]
    pub restore_faces: Option<super::schema::RestoreFaces>,
    /// The variation seed of the first image (image i: + i) when `variation_strength` > 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variation_seed: Option<u64>,
    /// 0 without a variation.
    #[serde(default)]
    pub variation_strength: f64,
    /// The seed resize's width (`seed_resize_from_width`); absent without one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed_resize_from_width: Option<u32>,
    /// The seed resize's height; absent without one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed_resize_from_height: Option<u32>,
    /// The ControlNets that steered the images (`controlnets`); absent without any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub controlnets: Vec<ControlNetMetadata>,
    /// The IP-Adapters that steered the images (`ip_adapters`); absent without any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ip_adapters: Vec<crate::api::IpAdapterMetadata>,
    /// A1111's inpainting (the request's `inpaint`, defaults filled); absent without it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inpaint: Option<InpaintMetadata>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct GenerateResponse {
    /// The first PNG, base64 (standard alphabet, padded). Each PNG carries its parameters
    /// (its own seed, and mode and strength with an init image) in a `parameters` tEXt chunk
    /// (AUTOMATIC1111 style).
    #[schema(value_type = String)]
    pub image_base64: Arc<str>,
    /// Every image of the batch, in order (the first is `image_base64`).
    #[schema(value_type = Vec<String>)]
    pub images: Vec<Arc<str>>,
    pub metadata: GenerateMetadata,
}

impl GenerateResponse {
    /// `image_base64` and `images[0]` as one allocation (held once in job records), when they
    /// are the same image; a response read back from JSON (the cluster's records) has two.
    pub fn share_first_image(mut self) -> Self {
        if let Some(first) = self.images.first() {
            if *first == self.image_base64 {
                self.image_base64 = first.clone();
            }
        }
        self
    }

    /// Bytes of base64 the images hold, each allocation once.
    pub fn image_bytes(&self) -> usize {
        let shared = self
            .images
            .first()
            .is_some_and(|f| Arc::ptr_eq(f, &self.image_base64));
        let first = if shared { 0 } else { self.image_base64.len() };
        first + self.images.iter().map(|i| i.len()).sum::<usize>()
    }
}
