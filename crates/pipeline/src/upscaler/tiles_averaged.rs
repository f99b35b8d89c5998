//! A1111's other way of running an upscaling network on an image, the one its SwinIR
//! upscaler uses (modules/upscaler_utils.py `upscale_2` / `tiled_upscale_2`, with
//! `SWIN_tile` 192 and `SWIN_tile_overlap` 8 and the model's scale): the image as one float
//! tensor (BGR, `/ 255` in float64 then float32), square tiles of `min(tile, h, w)` px
//! starting every `tile - overlap` px (the last flush with the edge), each through the network
//! as spandrel's descriptor runs it (padded up to its minimum side, the output clamped to
//! 0..1 and the padding cut off), summed into the result and divided by how many tiles
//! covered each pixel; then clamped, `* 255`, rounded half to even, to bytes.

use std::ops::ControlFlow;

use candle_core::{Device, Tensor};

use super::Network;
use crate::pipeline::RgbImage;
use crate::{PipelineError, Result};

/// A1111's `SWIN_tile` and `SWIN_tile_overlap` defaults.
pub const SWIN_TILE: usize = 192;
pub const SWIN_TILE_OVERLAP: usize = 8;

/// `list(range(0, side - tile, stride)) + [side - tile]`.
fn starts(side: usize, tile: usize, stride: usize) -> Vec<usize> {
    let mut out: Vec<usize> = (0..side - tile).step_by(stride).collect();
    out.push(side - tile);
    out
}

/// spandrel's `pad_tensor` to a minimum side: reflected (at most `side - 1`), then the edge
/// repeated, onto the bottom and right.
fn pad_to_minimum(x: &Tensor, minimum: usize) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let mut x = x.clone();
    for (dim, size) in [(2usize, h), (3usize, w)] {
        if size >= minimum {
            continue;
        }
        let pad = minimum - size;
        let reflect = pad.min(size - 1);
        // Reflected rows, then the last of them (the padded tensor's edge) repeated.
        let mut index: Vec<u32> = (0..reflect).map(|k| (size - 2 - k) as u32).collect();
        let edge = index.last().copied().unwrap_or(size as u32 - 1);
        index.extend(std::iter::repeat_n(edge, pad - reflect));
        let index = Tensor::new(index.as_slice(), x.device())?;
        x = Tensor::cat(&[&x, &x.index_select(&index, dim)?], dim)?;
    }
    Ok(x)
}

/// spandrel's `ImageModelDescriptor.__call__` on one tile: padded to the network's minimum
/// side, run, clamped to 0..1, the padding's share cut off.
fn run_descriptor(model: &Network, x: &Tensor) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let padded = pad_to_minimum(x, model.min_side())?;
    let y = model.forward(&padded)?.clamp(0f32, 1f32)?;
    let s = model.scale();
    Ok(y.narrow(2, 0, h * s)?.narrow(3, 0, w * s)?)
}

/// `upscale_2(image, model, tile_size=tile, tile_overlap=overlap, scale=model.scale)`: the
/// image `model.scale()` times larger, asking `check` before each tile (`Break`:
/// `Cancelled`). Sides must exceed `overlap`.
pub fn upscale_averaged_checked(
    model: &Network,
    image: &RgbImage,
    tile: usize,
    overlap: usize,
    check: &mut dyn FnMut() -> ControlFlow<()>,
) -> Result<RgbImage> {
    let (w, h) = (image.width as usize, image.height as usize);
    if w <= overlap || h <= overlap {
        return Err(PipelineError::InvalidRequest(format!(
            "a {w}x{h} image is too small to upscale in tiles: each side must exceed {overlap} px"
        )));
    }
    let plane = w * h;
    let mut input = vec![0f32; 3 * plane];
    for (i, px) in image.pixels.chunks_exact(3).enumerate() {
        for c in 0..3 {
            // BGR: channel c holds the image's channel 2 - c.
            input[c * plane + i] = (px[2 - c] as f64 / 255.0) as f32;
        }
    }
    let x = Tensor::from_vec(input, (1, 3, h, w), &Device::Cpu)?;
    let tile = tile.min(h).min(w);
    let stride = tile - overlap;
    let s = model.scale();
    let (ow, oh) = (w * s, h * s);
    let mut sum = vec![0f32; 3 * ow * oh];
    let mut count = vec![0f32; ow * oh];
    for y0 in starts(h, tile, stride) {
        for x0 in starts(w, tile, stride) {
            if check().is_break() {
                return Err(PipelineError::Cancelled);
            }
            let patch = x
                .narrow(2, y0, tile)?
                .narrow(3, x0, tile)?
                .contiguous()?
                .to_device(model.device())?
                .to_dtype(model.dtype())?;
            let out: Vec<f32> = run_descriptor(model, &patch)?
                .to_dtype(candle_core::DType::F32)?
                .to_device(&Device::Cpu)?
                .flatten_all()?
                .to_vec1()?;
            let ts = tile * s;
            for c in 0..3 {
                for row in 0..ts {
                    let src = &out[(c * ts + row) * ts..][..ts];
                    let at = (c * oh + y0 * s + row) * ow + x0 * s;
                    for (d, v) in sum[at..at + ts].iter_mut().zip(src) {
                        *d += v;
                    }
                }
            }
            for row in 0..ts {
                let at = (y0 * s + row) * ow + x0 * s;
                for d in &mut count[at..at + ts] {
                    *d += 1.0;
                }
            }
        }
    }
    let plane = ow * oh;
    let mut pixels = vec![0u8; 3 * plane];
    for i in 0..plane {
        for c in 0..3 {
            let v = (sum[c * plane + i] / count[i]).clamp(0.0, 1.0);
            pixels[i * 3 + (2 - c)] = (255f32 * v).round_ties_even() as u8;
        }
    }
    Ok(RgbImage {
        width: ow as u32,
        height: oh as u32,
        pixels,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiles_start_as_tiled_upscale_2_starts_them() {
        // 200 px, tile 192, stride 184: range(0, 8, 184) + [8].
        assert_eq!(starts(200, 192, 184), [0, 8]);
        // One tile exactly.
        assert_eq!(starts(30, 30, 22), [0]);
        // 200 px in 30 px tiles every 22: 0, 22, ..., 154, then 170.
        assert_eq!(starts(200, 30, 22), [0, 22, 44, 66, 88, 110, 132, 154, 170]);
    }

    #[test]
    fn small_tiles_are_padded_as_spandrel_pads_them() {
        // 3 columns to 7: reflect 2 (cols 1, 0), then col 0 repeated twice.
        let x = Tensor::new(&[1f32, 2., 3.], &Device::Cpu)
            .unwrap()
            .reshape((1, 1, 1, 3))
            .unwrap();
        let y = pad_to_minimum(&x, 7).unwrap();
        // One row to 7: nothing to reflect, the row repeated.
        assert_eq!(y.dims(), [1, 1, 7, 7]);
        assert_eq!(
            y.get(0)
                .unwrap()
                .get(0)
                .unwrap()
                .get(0)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
            [1., 2., 3., 2., 1., 1., 1.]
        );
    }
}
