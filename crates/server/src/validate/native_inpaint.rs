//! The native `inpaint` object of `POST /generate`: inpainting as A1111 does it (mask blur,
//! masked content, "only masked", mask invert; the blend each step and the overlay that gives
//! back the kept pixels as sent). Absent or null: diffusers' `StableDiffusionInpaintPipeline`.
//! Its defaults are A1111's web UI's (blur 4, original, whole picture, padding 32); the A1111
//! dialect fills in its API's. Errors name `inpaint.<field>`.

use sdserve_pipeline::inpaint_a1111::{A1111Inpaint, MaskedContent};
use serde_json::Value;

use super::fields::FieldReader;
use crate::error::ApiError;

/// The keys of the `inpaint` object.
pub const FIELDS: [&str; 8] = [
    "mask_blur",
    "mask_blur_x",
    "mask_blur_y",
    "mask_invert",
    "masked_content",
    "area",
    "padding",
    "mask_round",
];
/// A1111's sliders: mask blur 0..=64, "only masked" padding 0..=256 pixels.
pub const MASK_BLUR_MAX: u64 = 64;
pub const PADDING_MAX: u64 = 256;
pub const MASK_BLUR_DEFAULT: u32 = 4;
pub const PADDING_DEFAULT: u32 = 32;
/// `masked_content`'s names, A1111's `inpainting_fill` 0..=3 in order.
pub const MASKED_CONTENT: [(&str, MaskedContent); 4] = [
    ("fill", MaskedContent::Fill),
    ("original", MaskedContent::Original),
    ("latent_noise", MaskedContent::LatentNoise),
    ("latent_nothing", MaskedContent::LatentNothing),
];

/// `masked_content`'s native name.
pub fn masked_content_name(content: MaskedContent) -> &'static str {
    MASKED_CONTENT
        .iter()
        .find(|(_, c)| *c == content)
        .map_or("original", |(n, _)| n)
}

/// Reads `inpaint`, recording each broken rule in `outer` as `inpaint.<key>`.
pub(super) fn read(value: &Value, has_mask: bool, outer: &mut FieldReader) -> Option<A1111Inpaint> {
    if !has_mask {
        outer.fail(
            "inpaint",
            "only with a valid mask_image (it says how to inpaint)",
        );
        return None;
    }
    let Some(obj) = value.as_object() else {
        outer.fail(
            "inpaint",
            "must be an object with optional \"mask_blur\" (or \"mask_blur_x\" and \
             \"mask_blur_y\"), \"mask_invert\", \"masked_content\", \"area\", \"padding\", \
             \"mask_round\"",
        );
        return None;
    };
    let mut r = FieldReader::new(obj, &FIELDS);
    let blur = r.int("mask_blur", 0, MASK_BLUR_MAX);
    let blur_x = r.int("mask_blur_x", 0, MASK_BLUR_MAX);
    let blur_y = r.int("mask_blur_y", 0, MASK_BLUR_MAX);
    if r.value("mask_blur").is_some()
        && (r.value("mask_blur_x").is_some() || r.value("mask_blur_y").is_some())
    {
        r.fail(
            "mask_blur",
            "give mask_blur (both directions) or mask_blur_x / mask_blur_y, not both",
        );
    }
    let invert = r.with("mask_invert", |v| {
        v.as_bool().ok_or_else(|| "must be true or false".into())
    });
    let masked_content = r.choice("masked_content", &MASKED_CONTENT);
    let area = r.choice("area", &[("whole", false), ("only_masked", true)]);
    let padding = r.int("padding", 0, PADDING_MAX);
    let mask_round = r.with("mask_round", |v| {
        v.as_bool().ok_or_else(|| "must be true or false".into())
    });
    if let Err(ApiError::Validation(errors)) = r.finish() {
        for e in errors {
            outer.fail(&format!("inpaint.{}", e.field), e.rule);
        }
        return None;
    }
    let default = u64::from(MASK_BLUR_DEFAULT);
    let (x, y) = match blur {
        Some(b) => (b, b),
        None => (blur_x.unwrap_or(default), blur_y.unwrap_or(default)),
    };
    Some(A1111Inpaint {
        mask_blur_x: x as u32,
        mask_blur_y: y as u32,
        invert: invert.unwrap_or(false),
        masked_content: masked_content.unwrap_or(MaskedContent::Original),
        only_masked_padding: area
            .unwrap_or(false)
            .then(|| padding.map_or(PADDING_DEFAULT, |p| p as u32)),
        mask_round: mask_round.unwrap_or(true),
    })
}
