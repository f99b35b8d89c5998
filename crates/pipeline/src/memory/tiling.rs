//! Tiled VAE decoding, as diffusers' `AutoencoderKL.tiled_decode` (0.42): the latent is cut into
//! `tile` x `tile` tiles that overlap by `overlap` of a tile; each tile is decoded alone, and
//! each decoded tile is blended linearly into the one above and the one to its left across
//! `blend = tile * f * overlap` pixels before being cropped to `tile * f - blend` pixels.
//! Peak memory follows the tile size, not the image size. The VAE's group norms see one tile's
//! statistics, so the result differs a little from an untiled decode (as in diffusers).

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
    mut decode: impl FnMut(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let (_, _, h, w) = z.dims4()?;
    let tile = tiling.tile_latent.max(1);
    let tile_px = tile * f;
    // diffusers: stride int(tile_latent * (1 - overlap)), blend int(tile_sample * overlap),
    // crop tile_sample - blend. When tile * overlap is not whole those disagree (the stitched
    // image would not be f * the latent); taking crop = stride * f keeps it exact, and equals
    // diffusers' numbers whenever they agree (e.g. 64 latent cells, 0.25: 48, 128 px, 384 px).
    let stride = ((tile as f64 * (1.0 - tiling.overlap)) as usize).clamp(1, tile);
    let row_limit = stride * f;
    let blend_extent = tile_px - row_limit;

    let mut rows: Vec<Vec<Tensor>> = Vec::new();
    for i in (0..h).step_by(stride) {
        let mut row = Vec::new();
        for j in (0..w).step_by(stride) {
            let t = z
                .narrow(2, i, tile.min(h - i))?
                .narrow(3, j, tile.min(w - j))?;
            row.push(decode(&t)?);
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
    use candle_core::Device;

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
        let row: Vec<f32> = tiles
            .get(0)
            .unwrap()
            .get(0)
            .unwrap()
            .get(0)
            .unwrap()
            .to_vec1()
            .unwrap();
        // Tile 1 for px 0..6, then tile 2 entering at weights 0, 1/2, then pure 2.
        assert_eq!(&row[..8], &[1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.5]);
        assert_eq!(row[8], 2.0);
    }
}
