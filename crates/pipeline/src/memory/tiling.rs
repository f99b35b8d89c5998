//! Tiled VAE decoding and encoding, as diffusers' `AutoencoderKL.tiled_decode` and
//! `_tiled_encode` (0.42). Decoding: the latent is cut into
//! `tile` x `tile` tiles that overlap by `overlap` of a tile; each tile is decoded alone, and
//! each decoded tile is blended linearly into the one above and the one to its left across
//! `blend = tile * f * overlap` pixels before being cropped to `tile * f - blend` pixels.
//! Encoding mirrors it: image tiles of `tile * f` pixels, their moments blended across
//! `tile * overlap` latent cells. Peak memory follows the tile size, not the image size. The
//! VAE's group norms see one tile's statistics, so the result differs a little from an untiled
//! pass (as in diffusers).

use candle_core::{DType, Tensor};

use super::plan::VaeTiling;
use crate::Result;

/// `b` with its first `extent` rows (`axis` 2) or columns (`axis` 3) faded in from the last
/// `extent` of `a`: `a[-extent + y] * (1 - y / extent) + b[y] * (y / extent)`.
fn blend(a: &Tensor, b: &Tensor, extent: usize, axis: usize) -> Result<Tensor> {
    let extent = extent.min(a.dim(axis)?).min(b.dim(axis)?);
    if extent == 0 {
        return Ok(b.clone());
    }
    let dtype = b.dtype();
    let weights: Vec<f32> = (0..extent).map(|y| y as f32 / extent as f32).collect();
    let mut shape = vec![1usize; 4];
    shape[axis] = extent;
    let w = Tensor::from_vec(weights, shape, b.device())?;
    let a_tail = a
        .narrow(axis, a.dim(axis)? - extent, extent)?
        .to_dtype(DType::F32)?;
    let b_head = b.narrow(axis, 0, extent)?.to_dtype(DType::F32)?;
    let one_minus = w.affine(-1.0, 1.0)?;
    let mixed = (a_tail.broadcast_mul(&one_minus)? + b_head.broadcast_mul(&w)?)?.to_dtype(dtype)?;
    let rest = b.narrow(axis, extent, b.dim(axis)? - extent)?;
    Ok(Tensor::cat(&[&mixed, &rest], axis)?)
}

/// Decodes `z` `[B, C, h, w]` tile by tile with `decode` (latent tile -> image tile, `f` times
/// larger) and stitches the tiles as diffusers does. `f` is the VAE's scale factor.
pub fn decode_tiled(
    z: &Tensor,
    tiling: VaeTiling,
    f: usize,
    decode: impl FnMut(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let tile = tiling.tile_latent.max(1);
    // diffusers: stride int(tile_latent * (1 - overlap)), blend int(tile_sample * overlap),
    // crop tile_sample - blend. When tile * overlap is not whole those disagree (the stitched
    // image would not be f * the latent); taking crop = stride * f keeps it exact, and equals
    // diffusers' numbers whenever they agree (e.g. 64 latent cells, 0.25: 48, 128 px, 384 px).
    let stride = latent_stride(tiling);
    let grid = Grid {
        tile_in: tile,
        stride_in: stride,
        row_limit: stride * f,
        blend: (tile - stride) * f,
    };
    run_tiled(z, grid, decode)
}

/// Encodes images `x` `[B, 3, H, W]` tile by tile with `encode` (image tile -> moments tile,
/// `f` times smaller) and stitches the moments as diffusers' `AutoencoderKL._tiled_encode`
/// (0.42): tiles of `tile_latent * f` pixels every `int(tile_px * (1 - overlap))` pixels, each
/// blended into its upper and left neighbours across `int(tile_latent * overlap)` latent cells
/// and cropped to `tile_latent - blend` cells. The blend is of the moments (mean and
/// log-variance), before the log-variance is clamped, as there.
pub fn encode_tiled(
    x: &Tensor,
    tiling: VaeTiling,
    f: usize,
    encode: impl FnMut(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let tile = tiling.tile_latent.max(1);
    // Same whole-cell choice as `decode_tiled`: equal to diffusers' numbers whenever
    // `tile * overlap` is whole (64 cells: 384 px stride, 16 cells blend, 48 cells crop).
    let stride = latent_stride(tiling);
    let grid = Grid {
        tile_in: tile * f,
        stride_in: stride * f,
        row_limit: stride,
        blend: tile - stride,
    };
    run_tiled(x, grid, encode)
}

/// `int(tile_latent * (1 - overlap))`, at least one cell.
fn latent_stride(tiling: VaeTiling) -> usize {
    let tile = tiling.tile_latent.max(1);
    ((tile as f64 * (1.0 - tiling.overlap)) as usize).clamp(1, tile)
}

/// Where tiles start and how their outputs are stitched: input tiles of `tile_in` every
/// `stride_in` (input units); outputs blended across `blend` and cropped to `row_limit`
/// (output units).
#[derive(Debug, Clone, Copy)]
struct Grid {
    tile_in: usize,
    stride_in: usize,
    row_limit: usize,
    blend: usize,
}

fn run_tiled(
    x: &Tensor,
    grid: Grid,
    mut run: impl FnMut(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let Grid {
        tile_in,
        stride_in,
        row_limit,
        blend: blend_extent,
    } = grid;
    let mut rows: Vec<Vec<Tensor>> = Vec::new();
    for i in (0..h).step_by(stride_in) {
        let mut row = Vec::new();
        for j in (0..w).step_by(stride_in) {
            let t = x
                .narrow(2, i, tile_in.min(h - i))?
                .narrow(3, j, tile_in.min(w - j))?;
            row.push(run(&t)?);
        }
        rows.push(row);
    }
    // Blend in place, in order, so that each tile blends with already-blended neighbours.
    let mut out_rows = Vec::with_capacity(rows.len());
    for i in 0..rows.len() {
        let mut cropped = Vec::with_capacity(rows[i].len());
        for j in 0..rows[i].len() {
            let mut t = rows[i][j].clone();
            if i > 0 {
                t = blend(&rows[i - 1][j], &t, blend_extent, 2)?;
            }
            if j > 0 {
                t = blend(&rows[i][j - 1], &t, blend_extent, 3)?;
            }
            rows[i][j] = t.clone();
            let (_, _, th, tw) = t.dims4()?;
            cropped.push(
                t.narrow(2, 0, row_limit.min(th))?
                    .narrow(3, 0, row_limit.min(tw))?,
            );
        }
        out_rows.push(Tensor::cat(&cropped, 3)?);
    }
    Ok(Tensor::cat(&out_rows, 2)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::max_abs_diff;
    use candle_core::{Device, IndexOp};

    /// Row 0 of channel 0 of image 0.
    fn first_row(t: &Tensor) -> Vec<f32> {
        t.i((0, 0, 0)).unwrap().to_vec1().unwrap()
    }

    #[test]
    fn local_decoder_is_reproduced_exactly() {
        // A decoder that is a pure per-pixel function (nearest upsampling of an affine map):
        // blending identical overlaps must give back exactly the untiled result.
        let f = 4;
        let decode = |t: &Tensor| -> Result<Tensor> {
            let (_, _, h, w) = t.dims4()?;
            Ok(t.affine(2.0, 0.5)?.upsample_nearest2d(h * f, w * f)?)
        };
        let z = Tensor::randn(0f32, 1.0, (1, 3, 23, 17), &Device::Cpu).unwrap();
        let full = decode(&z).unwrap();
        for tile in [4, 8, 9, 16] {
            let tiled = decode_tiled(&z, VaeTiling::new(tile), f, decode).unwrap();
            assert_eq!(tiled.dims(), full.dims(), "tile {tile}");
            assert!(max_abs_diff(&tiled, &full) < 1e-5, "tile {tile}");
        }
    }

    #[test]
    fn seams_are_blended_linearly() {
        // Every tile decodes to a constant equal to its own index: across a seam the result
        // must ramp from the left tile's value to the right one's over `blend_extent` pixels.
        let z = Tensor::zeros((1, 1, 4, 8), DType::F32, &Device::Cpu).unwrap();
        let mut n = 0f64;
        let tiles = decode_tiled(&z, VaeTiling::new(4), 2, |t| {
            let (_, _, h, w) = t.dims4()?;
            n += 1.0;
            Ok((Tensor::ones((1, 1, h * 2, w * 2), DType::F32, &Device::Cpu)? * n)?)
        })
        .unwrap();
        // tile 4 -> 8 px, stride 3 latent, blend 2 px, crop 6 px; columns: tiles at 0, 3, 6.
        assert_eq!(tiles.dims(), &[1, 1, 8, 16]);
        let row = first_row(&tiles);
        // Tile 1 for px 0..6, then tile 2 entering at weights 0, 1/2, then pure 2.
        assert_eq!(&row[..8], &[1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.5]);
        assert_eq!(row[8], 2.0);
    }

    #[test]
    fn local_encoder_is_reproduced_exactly() {
        // An "encoder" that is a pure per-cell function (average pooling by f, then an affine
        // map): the stitched moments must equal the untiled ones, and have the latent's size.
        let f = 2;
        let encode = |t: &Tensor| -> Result<Tensor> { Ok(t.avg_pool2d(f)?.affine(3.0, -1.0)?) };
        let x = Tensor::randn(0f32, 1.0, (2, 3, 46, 34), &Device::Cpu).unwrap();
        let full = encode(&x).unwrap();
        for tile in [4, 8, 12, 16] {
            let tiled = encode_tiled(&x, VaeTiling::new(tile), f, encode).unwrap();
            assert_eq!(tiled.dims(), full.dims(), "tile {tile}");
            assert!(max_abs_diff(&tiled, &full) < 1e-5, "tile {tile}");
        }
    }

    #[test]
    fn encoder_tiles_follow_diffusers_grid() {
        // diffusers, tile_sample 16 px, tile_latent 8, overlap 0.25: tiles start every
        // int(16 * 0.75) = 12 px; blend int(8 * 0.25) = 2 cells; crop 8 - 2 = 6 cells.
        let x = Tensor::zeros((1, 1, 16, 40), DType::F32, &Device::Cpu).unwrap();
        let mut starts = Vec::new();
        let mut n = 0f64;
        let out = encode_tiled(&x, VaeTiling::new(8), 2, |t| {
            let (_, _, h, w) = t.dims4()?;
            starts.push(w);
            n += 1.0;
            Ok((Tensor::ones((1, 1, h / 2, w / 2), DType::F32, &Device::Cpu)? * n)?)
        })
        .unwrap();
        // Columns start at 0, 12, 24, 36 px: widths 16, 16, 16, 4; rows at 0 and 12: 2 rows.
        assert_eq!(starts, [16, 16, 16, 4, 16, 16, 16, 4]);
        assert_eq!(out.dims(), &[1, 1, 8, 20]);
        let row = first_row(&out);
        // Tile 1 for cells 0..6, then tile 2 fading in at weights 0 and 1/2.
        assert_eq!(&row[..8], &[1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.5]);
        assert_eq!(row[8], 2.0);
    }
}
