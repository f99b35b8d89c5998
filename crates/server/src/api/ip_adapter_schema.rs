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
}
