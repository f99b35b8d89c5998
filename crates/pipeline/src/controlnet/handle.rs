//! A ControlNet as a request carries it: by name and file, loaded on first use or handed over
//! already loaded (the server's cache), and one unit of a request (model, image, scale, the
//! part of the schedule it steers).

use std::path::PathBuf;
use std::sync::Arc;

use candle_core::{DType, Device};

use super::modes::ControlMode;
use super::preprocess::Preprocessor;
use super::ControlNetModel;
use crate::named_file::NamedFile;
use crate::pipeline::RgbImage;
use crate::unet::UNetConfig;

/// A ControlNet file (or diffusers folder) by its name.
pub type ControlNet = NamedFile<ControlNetModel>;

impl NamedFile<ControlNetModel> {
    /// With its model already loaded (from `path`).
    pub fn with_model(
        name: impl Into<String>,
        path: impl Into<PathBuf>,
        model: Arc<ControlNetModel>,
    ) -> Self {
        Self::with_loaded(name, path, model)
    }

    /// The model, read onto `device` in `dtype` (a single file's config from `unet`) on first
    /// use; one handed over is used where it is. The error names the file.
    pub fn load_on(
        &self,
        unet: &UNetConfig,
        device: &Device,
        dtype: DType,
    ) -> Result<Arc<ControlNetModel>, String> {
        self.get_or_read("ControlNet", "a ControlNet folder", |path| {
            ControlNetModel::load(path, unet, device, dtype).map_err(|e| e.to_string())
        })
        .cloned()
    }
}

/// One ControlNet of a request: diffusers' `controlnet` (one of a `MultiControlNetModel`) with
/// its `image`, `controlnet_conditioning_scale`, `control_guidance_start` and `_end`.
#[derive(Debug, Clone, PartialEq)]
pub struct ControlNetUnit {
    pub model: Arc<ControlNet>,
    /// Any size: resized (Lanczos) to the request's width and height, as diffusers'
    /// `VaeImageProcessor` (no normalisation: `[0, 1]`).
    pub image: RgbImage,
    /// The preprocessor that made `image` from the uploaded one (already run; for the
    /// metadata and infotext), or `None` when the upload is the control map itself.
    pub preprocessor: Option<Preprocessor>,
    pub scale: f64,
    /// The fraction of the steps before which the ControlNet does not steer.
    pub guidance_start: f64,
    /// The fraction of the steps after which it does not steer.
    pub guidance_end: f64,
    /// The hires pass's control image (any size, resized to that pass's); `None`: `image`.
    pub hires_image: Option<RgbImage>,
    /// Which passes of a hires request it steers; without a hires pass it steers the one.
    pub hr_option: HiresOption,
    /// With A1111's "only masked" inpainting: whether `image` is cropped as the init image is
    /// (the sd-webui-controlnet extension's `inpaint_crop_input_image`, true there by
    /// default); false: `image` is used whole (a dialect that cropped it already).
    pub inpaint_crop: bool,
    /// The extension's control mode: how its residuals are weighted and which rows of the
    /// batch they steer ([`super::modes`]).
    pub control_mode: ControlMode,
    /// The inpaint modules' mask (the alpha of the extension's RGBA feed), at `image`'s size:
    /// its first channel, resized with the image to the ControlNet's size, repaints above 127
    /// (the extension's `> 127`); those pixels reach the ControlNet as -1. `None`: nothing
    /// masked.
    pub mask: Option<RgbImage>,
    /// The hires pass's mask, at `hires_image`'s size; `None`: `mask`.
    pub hires_mask: Option<RgbImage>,
    /// What the caller records of the unit (an A1111 unit's infotext entry, as the
    /// sd-webui-controlnet extension serialises the unit it was sent); the pipeline does not
    /// read it. `None`: the records describe the unit from its fields.
    pub infotext: Option<String>,
}

/// The sd-webui-controlnet extension's `hr_option`: the passes of a hires request a ControlNet
/// steers (`ControlParams.disabled_by_hr_option`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HiresOption {
    #[default]
    Both,
    LowResOnly,
    HighResOnly,
}

/// diffusers' `controlnet_keep[i]`: `not (i / n < start or (i + 1) / n > end)`.
pub(crate) fn in_window(i: usize, steps: usize, start: f64, end: f64) -> bool {
    let n = steps as f64;
    !((i as f64) / n < start || (i as f64 + 1.0) / n > end)
}

impl HiresOption {
    /// Whether a unit with this option steers a pass (`hires`: the hires fix's second;
    /// `with_hires`: the request has one; without, every option steers).
    pub fn steers(self, hires: bool, with_hires: bool) -> bool {
        match self {
            _ if !with_hires => true,
            Self::Both => true,
            Self::LowResOnly => !hires,
            Self::HighResOnly => hires,
        }
    }

    /// The API's name (the extension's words in snake case).
    pub fn name(self) -> &'static str {
        match self {
            Self::Both => "both",
            Self::LowResOnly => "low_res_only",
            Self::HighResOnly => "high_res_only",
        }
    }

    /// From [`name`](Self::name).
    pub fn from_name(name: &str) -> Option<Self> {
        [Self::Both, Self::LowResOnly, Self::HighResOnly]
            .into_iter()
            .find(|o| o.name() == name)
    }
}

impl ControlNetUnit {
    /// Whether it steers a pass of a request: `hires` the pass is the hires fix's second,
    /// `with_hires` the request has one (without, the extension steers with every option).
    pub fn steers_pass(&self, hires: bool, with_hires: bool) -> bool {
        self.hr_option.steers(hires, with_hires)
    }

    /// Whether its residuals take the soft weights in a pass (`hires`: the hires fix's
    /// second): in its control mode, or forced there on a unit whose preprocessor is a canny or
    /// mlsd one, as the extension's `high_res_fix_forced_soft_injection` tests the module name.
    pub fn soft_weights(&self, hires: bool) -> bool {
        let forced = hires
            && self
                .preprocessor
                .is_some_and(|p| p.module().contains("canny") || p.module().contains("mlsd"));
        self.control_mode.soft() || forced
    }

    /// diffusers' `controlnet_keep[i]`: whether step `i` of `steps` (UNet evaluations) is
    /// within `[guidance_start, guidance_end]`: `not (i / n < start or (i + 1) / n > end)`.
    pub fn steers(&self, i: usize, steps: usize) -> bool {
        in_window(i, steps, self.guidance_start, self.guidance_end)
    }
}
