//! ControlNet preprocessors that need no model, as the sd-webui-controlnet extension runs them
//! (`scripts/preprocessor/model_free_preprocessors.py`, `scripts/utils.py`): pure functions
//! from the uploaded RGB image to the control map the ControlNet is given.
//!
//! Files: `resize` (the extension's `resize_image_with_pad`: OpenCV's cubic and area resizes,
//! the pad to 64), `canny` (OpenCV's `Canny`).

mod canny;
mod resize;

use serde::{Deserialize, Serialize};

pub use canny::canny;
pub use resize::{resize_image_with_pad, Padded};

use crate::pipeline::RgbImage;

/// A preprocessor with its settings, as a request names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Preprocessor {
    /// `PreprocessorCanny`: OpenCV's Canny at the processor resolution (the extension's
    /// sliders: thresholds 1..=255, 100 and 200 by default; resolution 512).
    Canny {
        low_threshold: u32,
        high_threshold: u32,
        resolution: u32,
    },
}

impl Preprocessor {
    /// The extension's module name (`module` of a unit, `Module:` of the infotext).
    pub fn module(&self) -> &'static str {
        match self {
            Self::Canny { .. } => "canny",
        }
    }

    /// The processor resolution: the shorter side of the image the map is made at.
    pub fn resolution(&self) -> u32 {
        match *self {
            Self::Canny { resolution, .. } => resolution,
        }
    }

    /// The control map of `image` (RGB; a one-channel result in all three channels, as the
    /// extension's `GRAY2RGB`), at the processor resolution's size.
    pub fn run(&self, image: &RgbImage) -> RgbImage {
        match *self {
            Self::Canny {
                low_threshold,
                high_threshold,
                resolution,
            } => {
                let padded = resize_image_with_pad(image, resolution);
                let edges = canny(&padded.image, low_threshold, high_threshold);
                gray_to_rgb(padded.width, padded.height, &padded.crop_gray(&edges))
            }
        }
    }
}

/// `cv2.COLOR_GRAY2RGB`.
fn gray_to_rgb(width: usize, height: usize, gray: &[u8]) -> RgbImage {
    RgbImage {
        width: width as u32,
        height: height as u32,
        pixels: gray.iter().flat_map(|&v| [v, v, v]).collect(),
    }
}
