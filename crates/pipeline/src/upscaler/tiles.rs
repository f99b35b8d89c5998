//! A1111's way of running an upscaling network on an image (modules/upscaler_utils.py
//! `upscale_with_model`, with `images.split_grid` / `combine_grid`; A1111 1.8+ to master,
//! 1.10.1): square tiles of `ESRGAN_tile` px overlapping by `ESRGAN_tile_overlap`, each run
//! alone (so memory is bounded by one tile), then joined with a linear ramp over the overlap,
//! in Pillow's integer blend. Each tile goes in as `upscale_pil_patch` sends it
//! (`pil_image_to_torch_bgr`): BGR (the channels reversed), `/ 255` in float64, then the
//! weights' dtype; it comes out as `torch_bgr_to_pil_image` makes it: clamped to 0..1 in
//! float32, times 255, rounded half to even to bytes (A1111 1.7 truncated there). A tile
//! that reaches past the image (an image smaller than a tile) is padded with black, as
//! Pillow's `crop` pads it.

use candle_core::{DType, Device, Tensor};

use super::Network;
use crate::pipeline::RgbImage;
use crate::Result;

/// A1111's `ESRGAN_tile` and `ESRGAN_tile_overlap` defaults.
pub const TILE: usize = 192;
pub const TILE_OVERLAP: usize = 8;

/// One row of tiles: its top, and each tile's left and image (`tile` px square).
struct Row {
    y: i64,
    tiles: Vec<(i64, RgbImage)>,
}

/// `images.split_grid(image, tile, tile, overlap)`: the tiles' origins, spread evenly so the
/// last one ends at the image's edge.
fn origins(side: usize, tile: usize, overlap: usize) -> Vec<i64> {
    let (side, tile, overlap) = (side as i64, tile as i64, overlap as i64);
    // math.ceil((w - overlap) / (tile - overlap)); none when the side is no larger than the
    // overlap (A1111 then fails; callers keep sides above it).
    let n = if side <= overlap {
        0
    } else {
        (side - overlap + (tile - overlap) - 1) / (tile - overlap)
    };
    let step = if n > 1 {
        (side - tile) as f64 / (n - 1) as f64
    } else {
        0.0
    };
    (0..n)
        .map(|i| {
            let at = (i as f64 * step) as i64;
            if at + tile >= side {
                side - tile
            } else {
                at
            }
        })
        .collect()
}

/// Pillow's `crop((x, y, x + w, y + h))`: black where the box leaves the image.
fn crop(image: &RgbImage, x: i64, y: i64, w: usize, h: usize) -> RgbImage {
    let (iw, ih) = (image.width as i64, image.height as i64);
    let mut pixels = vec![0u8; w * h * 3];
    for row in 0..h as i64 {
        let sy = y + row;
        if !(0..ih).contains(&sy) {
            continue;
        }
        let x0 = x.max(0);
        let x1 = (x + w as i64).min(iw);
        if x0 >= x1 {
            continue;
        }
        let src = ((sy * iw + x0) * 3) as usize;
        let dst = ((row * w as i64 + (x0 - x)) * 3) as usize;
        let n = ((x1 - x0) * 3) as usize;
        pixels[dst..dst + n].copy_from_slice(&image.pixels[src..src + n]);
    }
    RgbImage {
        width: w as u32,
        height: h as u32,
        pixels,
    }
}

/// Pillow's `paste(src, (x, y), mask)` of a region of `src` (columns `sx..sx + w`, rows
/// `sy..sy + h`) onto `dst`, clipped to `dst`; `mask(col, row)` is the L mask's value at the
/// region's pixel (`None`: opaque). Blending is Pillow's `BLEND`: `DIV255(out * (255 - m) +
/// in * m)` with its rounding.
#[allow(clippy::too_many_arguments)]
fn paste(
    dst: &mut RgbImage,
    src: &RgbImage,
    (sx, sy, w, h): (usize, usize, usize, usize),
    x: i64,
    y: i64,
    mask: Option<&dyn Fn(usize, usize) -> u8>,
) {
    let (dw, dh) = (dst.width as i64, dst.height as i64);
    for row in 0..h {
        let ty = y + row as i64;
        if !(0..dh).contains(&ty) {
            continue;
        }
        for col in 0..w {
            let tx = x + col as i64;
            if !(0..dw).contains(&tx) {
                continue;
            }
            let s = ((sy + row) * src.width as usize + sx + col) * 3;
            let d = (ty as usize * dst.width as usize + tx as usize) * 3;
            match mask {
                None => dst.pixels[d..d + 3].copy_from_slice(&src.pixels[s..s + 3]),
                Some(m) => {
                    let a = m(col, row) as u32;
                    for c in 0..3 {
                        let v = dst.pixels[d + c] as u32 * (255 - a) + src.pixels[s + c] as u32 * a;
                        let t = v + 128;
                        dst.pixels[d + c] = (((t >> 8) + t) >> 8) as u8;
                    }
                }
            }
        }
    }
}

/// `combine_grid`'s ramp: `(i * 255 / overlap)` as float32, truncated to a byte.
fn ramp(i: usize, overlap: usize) -> u8 {
    (i as f32 * 255.0 / overlap as f32) as u8
}

/// `upscale_pil_patch`: one tile through the network.
fn run_tile(model: &Network, tile: &RgbImage) -> Result<RgbImage> {
    let (w, h) = (tile.width as usize, tile.height as usize);
    let plane = w * h;
    let mut input = vec![0f32; 3 * plane];
    for (i, px) in tile.pixels.chunks_exact(3).enumerate() {
        for c in 0..3 {
            // BGR: channel c holds the image's channel 2 - c.
            input[c * plane + i] = (px[2 - c] as f64 / 255.0) as f32;
        }
    }
    let x = Tensor::from_vec(input, (1, 3, h, w), &Device::Cpu)?
        .to_device(model.device())?
        .to_dtype(model.dtype())?;
    let y = model.forward(&x)?;
    let (_, _, oh, ow) = y.dims4()?;
    let out: Vec<f32> = y
        .to_dtype(DType::F32)?
        .clamp(0f32, 1f32)?
        .flatten_all()?
        .to_device(&Device::Cpu)?
        .to_vec1()?;
    let plane = oh * ow;
    let mut pixels = vec![0u8; 3 * plane];
    for i in 0..plane {
        for c in 0..3 {
            // `(255.0 * arr).round().astype(np.uint8)` on float32: numpy rounds half to even.
            pixels[i * 3 + (2 - c)] = (255f32 * out[c * plane + i]).round_ties_even() as u8;
        }
    }
    Ok(RgbImage {
        width: ow as u32,
        height: oh as u32,
        pixels,
    })
}

/// `upscale_with_model(model, image, tile_size=tile, tile_overlap=overlap)`: the image
/// `model.scale()` times larger. Sides must exceed `overlap`.
pub fn upscale_tiled(
    model: &Network,
    image: &RgbImage,
    tile: usize,
    overlap: usize,
) -> Result<RgbImage> {
    upscale_tiled_until(model, image, tile, overlap, None)
}

/// [`upscale_tiled`], giving up with [`crate::PipelineError::Cancelled`] before any tile
/// that would start after `deadline` (a large image through a large model can take minutes
/// on a CPU; the caller has answered by then).
pub fn upscale_tiled_until(
    model: &Network,
    image: &RgbImage,
    tile: usize,
    overlap: usize,
    deadline: Option<std::time::Instant>,
) -> Result<RgbImage> {
    upscale_tiled_checked(model, image, tile, overlap, &mut past(deadline))
}

/// A check that breaks once `deadline` has passed.
pub(crate) fn past(
    deadline: Option<std::time::Instant>,
) -> impl FnMut() -> std::ops::ControlFlow<()> {
    move || match deadline {
        Some(d) if std::time::Instant::now() >= d => std::ops::ControlFlow::Break(()),
        _ => std::ops::ControlFlow::Continue(()),
    }
}

/// [`upscale_tiled`], asking `check` before each tile: `Break` gives up with
/// [`crate::PipelineError::Cancelled`] (a job cancelled, or past its deadline, stops within
/// a tile).
pub fn upscale_tiled_checked(
    model: &Network,
    image: &RgbImage,
    tile: usize,
    overlap: usize,
    check: &mut dyn FnMut() -> std::ops::ControlFlow<()>,
) -> Result<RgbImage> {
    let (w, h) = (image.width as usize, image.height as usize);
    if w <= overlap || h <= overlap {
        return Err(crate::PipelineError::InvalidRequest(format!(
            "a {w}x{h} image is too small to upscale in tiles: each side must exceed {overlap} px"
        )));
    }
    let xs = origins(w, tile, overlap);
    let mut rows = Vec::new();
    let mut scale = model.scale();
    for y in origins(h, tile, overlap) {
        let mut tiles = Vec::new();
        for &x in &xs {
            if check().is_break() {
                return Err(crate::PipelineError::Cancelled);
            }
            let out = run_tile(model, &crop(image, x, y, tile, tile))?;
            scale = out.width as usize / tile;
            tiles.push((x, out));
        }
        rows.push(Row { y, tiles });
    }
    // combine_grid on the scaled grid.
    let (tw, iw, ih, ov) = (tile * scale, w * scale, h * scale, overlap * scale);
    let th = tw;
    let mut combined = RgbImage {
        width: iw as u32,
        height: ih as u32,
        pixels: vec![0; iw * ih * 3],
    };
    for row in rows {
        let y = row.y * scale as i64;
        let mut line = RgbImage {
            width: iw as u32,
            height: th as u32,
            pixels: vec![0; iw * th * 3],
        };
        for (x, t) in row.tiles {
            let x = x * scale as i64;
            if x == 0 {
                paste(&mut line, &t, (0, 0, tw, th), 0, 0, None);
                continue;
            }
            let mask_w = |col: usize, _row: usize| ramp(col, ov);
            paste(&mut line, &t, (0, 0, ov, th), x, 0, Some(&mask_w));
            paste(&mut line, &t, (ov, 0, tw - ov, th), x + ov as i64, 0, None);
        }
        if y == 0 {
            paste(&mut combined, &line, (0, 0, iw, th), 0, 0, None);
            continue;
        }
        let mask_h = |_col: usize, row: usize| ramp(row, ov);
        paste(&mut combined, &line, (0, 0, iw, ov), 0, y, Some(&mask_h));
        paste(
            &mut combined,
            &line,
            (0, ov, iw, th - ov),
            0,
            y + ov as i64,
            None,
        );
    }
    Ok(combined)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiles_spread_as_split_grid_spreads_them() {
        // 500 px: ceil(492 / 184) = 3 tiles, dx = 154.
        assert_eq!(origins(500, 192, 8), [0, 154, 308]);
        // Exactly one tile, and smaller than one (the tile reaches left of the image).
        assert_eq!(origins(192, 192, 8), [0]);
        assert_eq!(origins(100, 192, 8), [-92]);
        assert_eq!(origins(8, 192, 8), Vec::<i64>::new());
        // 193 px: two tiles, the second flush with the edge.
        assert_eq!(origins(193, 192, 8), [0, 1]);
    }

    #[test]
    fn pillow_blend_rounds_as_its_div255() {
        let mut dst = RgbImage {
            width: 1,
            height: 1,
            pixels: vec![10, 200, 255],
        };
        let src = RgbImage {
            width: 1,
            height: 1,
            pixels: vec![250, 0, 0],
        };
        let m = |_: usize, _: usize| 100u8;
        paste(&mut dst, &src, (0, 0, 1, 1), 0, 0, Some(&m));
        // (10*155 + 250*100 + 128) -> 104.1 -> 104; 200*155/255 = 121.57 -> 122; 155.
        assert_eq!(dst.pixels, [104, 122, 155]);
        assert_eq!(ramp(31, 32), 247);
    }
}
