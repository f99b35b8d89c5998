//! A ControlNet as a request carries it: by name and file, loaded on first use or handed over
//! already loaded (the server's cache), and one unit of a request (model, image, scale, the
//! part of the schedule it steers).

use std::path::PathBuf;
use std::sync::Arc;

use candle_core::{DType, Device};

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
    pub scale: f64,
    /// The fraction of the steps before which the ControlNet does not steer.
    pub guidance_start: f64,
    /// The fraction of the steps after which it does not steer.
    pub guidance_end: f64,
}

impl ControlNetUnit {
    /// diffusers' `controlnet_keep[i]`: whether step `i` of `steps` (UNet evaluations) is
    /// within `[guidance_start, guidance_end]`: `not (i / n < start or (i + 1) / n > end)`.
    pub fn steers(&self, i: usize, steps: usize) -> bool {
        let n = steps as f64;
        !((i as f64) / n < self.guidance_start || (i as f64 + 1.0) / n > self.guidance_end)
    }
}
