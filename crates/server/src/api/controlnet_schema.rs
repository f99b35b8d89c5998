//! The native `controlnets` entries (the ControlNets a request uses, their preprocessors and
//! hires passes) in the request and the metadata.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// One ControlNet of a request and its control image.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ControlNetUse {
    /// A ControlNet of CONTROLNET_DIR by name (`GET /controlnets`): a file's stem or a
    /// diffusers folder's name. 1..=255 characters.
    #[schema(min_length = 1, example = "control_v11p_sd15_canny")]
    pub model: String,
    /// The control image (an edge map, a pose, a depth map: already preprocessed), or with
    /// `preprocessor` the photo it is made from; base64 PNG, JPEG or WebP (a
    /// `data:image/...;base64,` prefix is allowed), at most 4096 pixels a side and 16 MP. The
    /// control map is resized (Lanczos) to the request's width and height and given to the
    /// ControlNet as RGB in [0, 1], as diffusers' control image processor does.
    #[schema(example = "iVBORw0KGgoAAAANSUhEUgAA...")]
    pub image: String,
    /// Makes the control map from `image` before use, as the sd-webui-controlnet extension's
    /// preprocessor of that name; absent or null: `image` is the map.
    #[schema(nullable = true)]
    pub preprocessor: Option<ControlNetPreprocessor>,
    /// diffusers' `controlnet_conditioning_scale`: the residuals' weight.
    #[schema(minimum = 0.0, maximum = 2.0, default = 1.0, nullable = true)]
    pub scale: Option<f64>,
    /// diffusers' `control_guidance_start`: the fraction of the steps before which it does
    /// not steer (below `guidance_end`).
    #[schema(minimum = 0.0, maximum = 1.0, default = 0.0, nullable = true)]
    pub guidance_start: Option<f64>,
    /// diffusers' `control_guidance_end`: the fraction of the steps after which it does not
    /// steer.
    #[schema(minimum = 0.0, maximum = 1.0, default = 1.0, nullable = true)]
    pub guidance_end: Option<f64>,
    /// With `hires`: the passes it steers (the sd-webui-controlnet extension's `hr_option`):
    /// `both` (the default: the second pass with the image resized to the hires size),
    /// `low_res_only`, `high_res_only`. Without `hires` it steers the one pass.
    #[schema(nullable = true, default = "both")]
    pub hr_option: Option<HiresOptionName>,
    /// With `inpaint.area` `only_masked` (A1111's "only masked" inpainting): true crops the
    /// control image as the init image is cropped (resized to the init image's size, cut to
    /// the mask's region, fitted to the request's size as A1111's resize and fill), the
    /// sd-webui-controlnet extension's `inpaint_crop_input_image`; false uses it whole (a map
    /// already made for the region). Otherwise it changes nothing.
    #[schema(nullable = true, default = true)]
    pub inpaint_crop: Option<bool>,
}

/// The passes of a hires request a ControlNet steers.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema)]
pub enum HiresOptionName {
    #[serde(rename = "both")]
    Both,
    #[serde(rename = "low_res_only")]
    LowResOnly,
    #[serde(rename = "high_res_only")]
    HighResOnly,
}

/// A model-free ControlNet preprocessor, as the sd-webui-controlnet extension runs it; each
/// broken rule is a 422 naming `controlnets[i].preprocessor.<key>`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ControlNetPreprocessor {
    /// `canny`: the image scaled so its shorter side is `resolution` (OpenCV's cubic
    /// enlarging, area shrinking), OpenCV's Canny edges (white on black) at that size;
    /// `none`: the image is the map. Model-based preprocessors (depth, openpose, hed, ...)
    /// are not run here: send their map as `image`.
    #[serde(rename = "type")]
    pub kind: PreprocessorType,
    /// `canny`: the hysteresis's low threshold on the L1 gradient (the extension's slider).
    #[schema(minimum = 1, maximum = 255, default = 100, nullable = true)]
    pub low_threshold: Option<u32>,
    /// `canny`: the high threshold (a pixel above it starts an edge; swapped with
    /// `low_threshold` when below it, as OpenCV does).
    #[schema(minimum = 1, maximum = 255, default = 200, nullable = true)]
    pub high_threshold: Option<u32>,
    /// `canny`: the processor resolution: the shorter side of the image the map is made at
    /// (the map is then resized to the request's size); the scaled image must keep the image
    /// rule (at most 4096 pixels a side, 16 MP).
    #[schema(minimum = 64, maximum = 2048, default = 512, nullable = true)]
    pub resolution: Option<u32>,
}

/// The preprocessors this server runs.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum PreprocessorType {
    None,
    Canny,
}

/// A ControlNet a result was made with.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ControlNetMetadata {
    pub model: String,
    /// The preprocessor that made the control map from the upload, with every setting;
    /// absent when the upload was the map.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preprocessor: Option<ControlNetPreprocessor>,
    pub scale: f64,
    pub guidance_start: f64,
    pub guidance_end: f64,
}
