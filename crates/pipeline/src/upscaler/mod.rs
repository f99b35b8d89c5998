//! Upscaling networks, the `models/ESRGAN/*.pth` (and `models/SwinIR`) files A1111 users
//! upscale with: ESRGAN-architecture models (RRDBNet: ESRGAN, Real-ESRGAN, 4x-UltraSharp,
//! NMKD's, ...), Real-ESRGAN Compact ones and SwinIR ones, one [`Network`] whichever the file
//! holds, run the way A1111 runs them (ESRGAN's [`tiles`], SwinIR's [`tiles_averaged`]) and
//! repeated to a factor as its `Upscaler.upscale` does.

mod compact;
mod net;
mod network;
pub(crate) mod state;
mod swinir;
pub mod tiles;
pub mod tiles_averaged;

pub use compact::Compact;
pub use net::Esrgan;
pub use network::{Network, Tiling, SUPPORTED};
/// The weights of a `.pth`/`.safetensors` network file by name (the annotators read theirs so).
pub(crate) use state::{read_state, read_state_under};
pub use swinir::{SwinIr, Upsampler as SwinIrUpsampler};
pub use tiles::{upscale_tiled, upscale_tiled_checked, upscale_tiled_until, TILE, TILE_OVERLAP};
pub use tiles_averaged::{upscale_averaged_checked, SWIN_TILE, SWIN_TILE_OVERLAP};

use crate::image_in::resize_lanczos;
use crate::pipeline::RgbImage;
use crate::Result;

/// The sizes of the image after each round of A1111's `Upscaler.upscale` loop (1.8+ to
/// master) for a model growing sides by `model_scale`: at most 3 rounds, each run only while
/// the image is below `side * scale // 8 * 8` on a side (none at all when it is not, unless
/// `scale` is exactly 1: a 1x model still runs once), ending early where a round leaves the
/// size as it was.
pub fn rounds(model_scale: usize, width: usize, height: usize, scale: f64) -> Vec<(usize, usize)> {
    let dest = (
        crate::upscale::dest_side(width as u32, scale),
        crate::upscale::dest_side(height as u32, scale),
    );
    let mut size = (width, height);
    let mut out = Vec::new();
    for i in 0..3 {
        if size.0 >= dest.0 && size.1 >= dest.1 && (i > 0 || scale != 1.0) {
            break;
        }
        let before = size;
        size = (size.0 * model_scale, size.1 * model_scale);
        out.push(size);
        if size == before {
            break;
        }
    }
    out
}

/// One pass of the network over the image as A1111's upscaler for its architecture runs it:
/// `UpscalerESRGAN.do_upscale` ([`upscale_tiled`], `ESRGAN_tile` 192, overlap 8) or
/// `UpscalerSwinIR.do_upscale` ([`upscale_averaged_checked`], `SWIN_tile` 192, overlap 8),
/// asking `check` before each tile.
pub fn upscale_once_checked(
    model: &Network,
    image: &RgbImage,
    check: &mut dyn FnMut() -> std::ops::ControlFlow<()>,
) -> Result<RgbImage> {
    match model.tiling() {
        Tiling::Grid => upscale_tiled_checked(model, image, TILE, TILE_OVERLAP, check),
        Tiling::Averaged => {
            upscale_averaged_checked(model, image, SWIN_TILE, SWIN_TILE_OVERLAP, check)
        }
    }
}

/// A1111's `Upscaler.upscale(img, scale)` with a model (its `do_upscale`:
/// [`upscale_once_checked`]): the model's rounds (see [`rounds`]), then a Lanczos resize to
/// `side * scale // 8 * 8` where that differs.
pub fn upscale_by(model: &Network, image: &RgbImage, scale: f64) -> Result<RgbImage> {
    upscale_by_until(model, image, scale, None)
}

/// [`upscale_by`], given up (`Cancelled`) before a tile that would start after `deadline`.
pub fn upscale_by_until(
    model: &Network,
    image: &RgbImage,
    scale: f64,
    deadline: Option<std::time::Instant>,
) -> Result<RgbImage> {
    upscale_by_checked(model, image, scale, &mut tiles::past(deadline))
}

/// [`upscale_by`], asking `check` before each tile of each round (`Break`: `Cancelled`).
pub fn upscale_by_checked(
    model: &Network,
    image: &RgbImage,
    scale: f64,
    check: &mut dyn FnMut() -> std::ops::ControlFlow<()>,
) -> Result<RgbImage> {
    let dest = (
        crate::upscale::dest_side(image.width, scale),
        crate::upscale::dest_side(image.height, scale),
    );
    let mut out = image.clone();
    for _ in rounds(
        model.scale(),
        image.width as usize,
        image.height as usize,
        scale,
    ) {
        out = upscale_once_checked(model, &out, check)?;
    }
    if (out.width as usize, out.height as usize) != dest {
        out = resize_lanczos(&out, dest.0, dest.1);
    }
    Ok(out)
}
