//! Bilinear resizing of f32 NCHW tensors on the CPU, parallel over the planes. The values are
//! candle's `upsample_bilinear2d` bit for bit (its source positions and weights in f64, each
//! value mixed in f64), which runs on one thread: at a DPT head's finest levels (256 channels
//! of 296 x 448, 128 of 518 x 784) that one thread was most of a second.

use candle_core::{DType, Device, Result, Tensor};
use rayon::prelude::*;

use super::linear::with_slice;

/// For each output index: the two source indices and the second one's weight, as candle
/// computes them (`align_corners`: `i * (n_in - 1) / (n_out - 1)`; else pixel centres,
/// `(i + 0.5) * n_in / n_out - 0.5` clamped at 0).
fn taps(n_in: usize, n_out: usize, align_corners: bool) -> Vec<(usize, usize, f64)> {
    let scale = match (align_corners, n_out > 1) {
        (true, true) => (n_in - 1) as f64 / (n_out - 1) as f64,
        (true, false) => 0.0,
        (false, _) => n_in as f64 / n_out as f64,
    };
    (0..n_out)
        .map(|i| {
            let src = match align_corners {
                true => scale * i as f64,
                false => scale * (i as f64 + 0.5) - 0.5,
            }
            .max(0.0);
            let i0 = src.floor() as usize;
            (
                i0,
                (i0 + 1).min(n_in - 1),
                (src - i0 as f64).clamp(0.0, 1.0),
            )
        })
        .collect()
}

/// `x.upsample_bilinear2d(oh, ow, align_corners)` for an f32 CPU `[B, C, H, W]` tensor; `None`
/// when the fast path does not apply.
pub fn upsample_bilinear(
    x: &Tensor,
    oh: usize,
    ow: usize,
    align_corners: bool,
) -> Result<Option<Tensor>> {
    if x.dtype() != DType::F32 || !matches!(x.device(), Device::Cpu) || x.rank() != 4 {
        return Ok(None);
    }
    let (b, c, h, w) = x.dims4()?;
    if h == 0 || w == 0 || oh == 0 || ow == 0 {
        return Ok(None);
    }
    let (ty, tx) = (taps(h, oh, align_corners), taps(w, ow, align_corners));
    let mut out = vec![0f32; b * c * oh * ow];
    with_slice(x, |xs| {
        out.par_chunks_mut(oh * ow)
            .zip(xs.par_chunks(h * w))
            .for_each(|(o, src)| {
                for (orow, &(y0, y1, wy)) in o.chunks_exact_mut(ow).zip(&ty) {
                    let (r0, r1) = (&src[y0 * w..][..w], &src[y1 * w..][..w]);
                    for (d, &(x0, x1, wx)) in orow.iter_mut().zip(&tx) {
                        let top = r0[x0] as f64 * (1.0 - wx) + r0[x1] as f64 * wx;
                        let bottom = r1[x0] as f64 * (1.0 - wx) + r1[x1] as f64 * wx;
                        *d = (top * (1.0 - wy) + bottom * wy) as f32;
                    }
                }
            })
    })?;
    Tensor::from_vec(out, (b, c, oh, ow), &Device::Cpu).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bit for bit candle's, enlarging and shrinking, both corner modes.
    #[test]
    fn equals_candle_upsample() -> Result<()> {
        let x = crate::rng::TorchRng::new(31)
            .randn_tensor((2, 3, 7, 9), &Device::Cpu, DType::F32)
            .unwrap();
        for &(oh, ow) in &[(14, 18), (37, 20), (5, 4), (7, 9), (1, 1)] {
            for align in [true, false] {
                let got = upsample_bilinear(&x, oh, ow, align)?.expect("fast path");
                let want = x.upsample_bilinear2d(oh, ow, align)?;
                let (g, w) = (
                    got.flatten_all()?.to_vec1::<f32>()?,
                    want.flatten_all()?.to_vec1::<f32>()?,
                );
                assert!(g == w, "{oh}x{ow} align {align}");
            }
        }
        // The corner modes differ (the comparison can fail).
        let a = upsample_bilinear(&x, 14, 18, true)?
            .unwrap()
            .flatten_all()?
            .to_vec1::<f32>()?;
        let b = upsample_bilinear(&x, 14, 18, false)?
            .unwrap()
            .flatten_all()?
            .to_vec1::<f32>()?;
        assert!(a != b);
        Ok(())
    }
}
