//! The native `ip_adapters` field's items and their metadata, as the OpenAPI document shows
//! them (the rules are checked in `validate::ip_adapters`).

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// One IP-Adapter of a request and its image prompt.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct IpAdapterUse {
    /// An adapter of IP_ADAPTER_DIR by name (`GET /ip-adapters`): a file's stem. 1..=255
    /// characters.
    #[schema(min_length = 1, example = "ip-adapter_sd15")]
    pub model: String,
    /// The image prompt: base64 PNG, JPEG or WebP (a `data:image/...;base64,` prefix is
    /// allowed), at most 4096 pixels a side and 16 MP, any size: CLIP's image processor
    /// resizes its shortest side to the encoder's size (bicubic) and crops the centre.
    #[schema(example = "iVBORw0KGgoAAAANSUhEUgAA...")]
    pub image: String,
    /// diffusers' `set_ip_adapter_scale`: the image attention's weight (0 adds nothing).
    #[schema(minimum = 0.0, maximum = 2.0, default = 1.0, nullable = true)]
    pub scale: Option<f64>,
}

/// An IP-Adapter a result was made with.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct IpAdapterMetadata {
    pub model: String,
    pub scale: f64,
    /// An A1111 ControlNet unit's (run as the sd-webui-controlnet extension runs it): the
    /// window of sampling steps it steers, its image count and its infotext entry; absent
    /// for the native field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub a1111_unit: Option<A1111IpUnitMetadata>,
}

/// An A1111 ip-adapter unit a result was made with.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct A1111IpUnitMetadata {
    pub guidance_start: f64,
    pub guidance_end: f64,
    /// The unit's images (their tokens averaged).
    pub images: usize,
    /// The unit's infotext entry (`ControlNet N: "..."` in `parameters`).
    pub infotext: String,
}
