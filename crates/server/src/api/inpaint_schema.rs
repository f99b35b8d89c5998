//! The native `inpaint` object (A1111's inpainting) in the request and the metadata.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// A1111's inpainting options (`StableDiffusionProcessingImg2Img`'s fields). Each broken rule
/// is a 422 naming `inpaint.<key>`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct InpaintRequest {
    /// Gaussian blur of the mask in pixels (A1111's `mask_blur`: OpenCV, sigma = this, in both
    /// directions), 0 = none. Not with `mask_blur_x`/`mask_blur_y`.
    #[schema(minimum = 0, maximum = 64, default = 4, nullable = true, example = 4)]
    pub mask_blur: Option<u32>,
    /// The blur across (A1111's `mask_blur_x`); 4 when absent.
    #[schema(minimum = 0, maximum = 64, default = 4, nullable = true)]
    pub mask_blur_x: Option<u32>,
    /// The blur down (A1111's `mask_blur_y`); 4 when absent.
    #[schema(minimum = 0, maximum = 64, default = 4, nullable = true)]
    pub mask_blur_y: Option<u32>,
    /// Repaint what the mask leaves black instead (A1111's `inpainting_mask_invert`, "Inpaint
    /// not masked").
    #[schema(default = false, nullable = true)]
    pub mask_invert: Option<bool>,
    /// What the masked region starts from (A1111's `inpainting_fill` 0..=3): `fill` (the
    /// image's colours blurred into it), `original`, `latent_noise`, `latent_nothing`.
    #[schema(default = "original", nullable = true, example = "fill")]
    pub masked_content: Option<String>,
    /// `whole` (the picture at width x height) or `only_masked` (A1111's `inpaint_full_res`:
    /// the mask's bounding box plus `padding`, grown to width:height, is cut out, repainted at
    /// width x height and pasted back: the image comes back at init_image's own size).
    #[schema(default = "whole", nullable = true, example = "only_masked")]
    pub area: Option<String>,
    /// "Only masked": pixels around the mask's bounding box (A1111's
    /// `inpaint_full_res_padding`).
    #[schema(minimum = 0, maximum = 256, default = 32, nullable = true)]
    pub padding: Option<u32>,
    /// A1111's `mask_round`: the latent mask (and an inpainting model's conditioning mask)
    /// rounded to repaint or keep; false keeps the blurred mask's grey levels, so the edge
    /// blends gradually (and an A1111 `mask` with transparency keeps its alpha's levels).
    #[schema(default = true, nullable = true)]
    pub mask_round: Option<bool>,
}

/// The inpainting options a request ran with (the `inpaint` object, every default filled).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct InpaintMetadata {
    pub mask_blur_x: u32,
    pub mask_blur_y: u32,
    pub mask_invert: bool,
    pub masked_content: String,
    pub area: String,
    /// Only with `area` `only_masked`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub padding: Option<u32>,
    /// Records written before it was carried ran true.
    #[serde(default = "mask_round_default")]
    pub mask_round: bool,
}

fn mask_round_default() -> bool {
    true
}

impl InpaintMetadata {
    pub fn of(o: &sdserve_pipeline::inpaint_a1111::A1111Inpaint) -> Self {
        Self {
            mask_blur_x: o.mask_blur_x,
            mask_blur_y: o.mask_blur_y,
            mask_invert: o.invert,
            masked_content: crate::validate::native_inpaint::masked_content_name(o.masked_content)
                .to_string(),
            area: if o.only_masked_padding.is_some() {
                "only_masked"
            } else {
                "whole"
            }
            .to_string(),
            padding: o.only_masked_padding,
            mask_round: o.mask_round,
        }
    }
}
