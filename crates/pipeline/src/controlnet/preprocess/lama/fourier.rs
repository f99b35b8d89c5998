//! LaMa's `FourierUnit` (`saicinpainting/training/modules/ffc.py`, as config.yaml builds it:
//! no spatial scale, no spectral position encoding, no SE, `fft_norm='ortho'`):
//! `torch.fft.rfftn` over H and W, the real and imaginary parts stacked as channels (channel
//! `2c` is channel c's real part, `2c + 1` its imaginary part: `stack(dim=-1)` then
//! `permute(0, 1, 4, 2, 3)`), a 1x1 conv without bias, BatchNorm (folded into the conv), ReLU,
//! and `irfftn` back to H x W.
//!
//! The transforms run on the host with `realfft` / `rustfft` (f32, as torch's): the real
//! transform along each row (W), the complex one along each column (H), each scaled by
//! `1 / sqrt(n)` (ortho); the inverse the other way round. `irfftn`'s last step, the
//! complex-to-real transform of each row, reads only the real part of the first bin (and of
//! the last, for an even W): the imaginary parts the conv puts there are dropped, as
//! pocketfft and MKL drop them. The network's activations are copied to the host and back for
//! it (a GPU build pays that copy; the preprocessors run on the CPU).

use std::sync::Arc;

use candle_core::{Device, Module, Tensor};
use rayon::prelude::*;
use realfft::num_complex::Complex;
use realfft::{ComplexToReal, RealFftPlanner, RealToComplex};
use rustfft::{Fft, FftPlanner};

use crate::kernels::Conv2d;
use crate::Result;

/// `FourierUnit`: the spectral conv (BN folded into it).
pub(super) struct FourierUnit {
    pub(super) conv: Conv2d,
}

/// The four transforms of one H x W plane.
struct Plans {
    row: Arc<dyn RealToComplex<f32>>,
    row_inverse: Arc<dyn ComplexToReal<f32>>,
    column: Arc<dyn Fft<f32>>,
    column_inverse: Arc<dyn Fft<f32>>,
}

impl Plans {
    fn new(h: usize, w: usize) -> Self {
        let mut real = RealFftPlanner::<f32>::new();
        let mut complex = FftPlanner::<f32>::new();
        Self {
            row: real.plan_fft_forward(w),
            row_inverse: real.plan_fft_inverse(w),
            column: complex.plan_fft_forward(h),
            column_inverse: complex.plan_fft_inverse(h),
        }
    }
}

impl FourierUnit {
    /// `[1, C, H, W]` to `[1, C, H, W]`.
    pub(super) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (n, c, h, w) = x.dims4()?;
        assert_eq!(n, 1, "one image at a time");
        let device = x.device().clone();
        let plans = Plans::new(h, w);
        let planes = x.to_device(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?;
        let wf = w / 2 + 1;
        let spectrum = rfft2(&planes, c, h, w, &plans);
        let y = Tensor::from_vec(spectrum, (1, 2 * c, h, wf), &Device::Cpu)?.to_device(&device)?;
        let y = self.conv.forward(&y)?.relu()?;
        let (_, c2, _, _) = y.dims4()?;
        let spectrum = y.to_device(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?;
        let out = irfft2(&spectrum, c2 / 2, h, w, &plans);
        Ok(Tensor::from_vec(out, (1, c2 / 2, h, w), &Device::Cpu)?.to_device(&device)?)
    }
}

/// `rfftn(x, dim=(-2, -1), norm='ortho')` of `c` planes `h` x `w`, as `2c` planes `h` x
/// `w / 2 + 1`: each channel's real part, then its imaginary part.
fn rfft2(planes: &[f32], c: usize, h: usize, w: usize, plans: &Plans) -> Vec<f32> {
    let wf = w / 2 + 1;
    let scale = 1.0 / ((h * w) as f32).sqrt();
    let mut out = vec![0f32; 2 * c * h * wf];
    out.par_chunks_mut(2 * h * wf)
        .zip(planes.par_chunks(h * w))
        .for_each(|(out, plane)| {
            let mut bins = vec![Complex::new(0f32, 0.0); h * wf];
            let mut row = vec![0f32; w];
            for (y, bins) in bins.chunks_mut(wf).enumerate() {
                row.copy_from_slice(&plane[y * w..(y + 1) * w]);
                plans
                    .row
                    .process(&mut row, bins)
                    .expect("sizes from the plan");
            }
            let mut column = vec![Complex::new(0f32, 0.0); h];
            for k in 0..wf {
                for (y, v) in column.iter_mut().enumerate() {
                    *v = bins[y * wf + k];
                }
                plans.column.process(&mut column);
                for (y, v) in column.iter().enumerate() {
                    out[y * wf + k] = v.re * scale;
                    out[h * wf + y * wf + k] = v.im * scale;
                }
            }
        });
    out
}

/// `irfftn(complex(re, im), s=(h, w), dim=(-2, -1), norm='ortho')` of `c` channels given as
/// `2c` planes `h` x `w / 2 + 1` (real part, imaginary part).
fn irfft2(spectrum: &[f32], c: usize, h: usize, w: usize, plans: &Plans) -> Vec<f32> {
    let wf = w / 2 + 1;
    let scale = 1.0 / ((h * w) as f32).sqrt();
    let mut out = vec![0f32; c * h * w];
    out.par_chunks_mut(h * w)
        .zip(spectrum.par_chunks(2 * h * wf))
        .for_each(|(out, planes)| {
            let (re, im) = planes.split_at(h * wf);
            let mut bins = vec![Complex::new(0f32, 0.0); h * wf];
            let mut column = vec![Complex::new(0f32, 0.0); h];
            for k in 0..wf {
                for (y, v) in column.iter_mut().enumerate() {
                    *v = Complex::new(re[y * wf + k], im[y * wf + k]);
                }
                plans.column_inverse.process(&mut column);
                for (y, v) in column.iter().enumerate() {
                    bins[y * wf + k] = *v;
                }
            }
            let mut row = vec![0f32; w];
            for (y, bins) in bins.chunks_mut(wf).enumerate() {
                // The parts a real signal's spectrum cannot have, which the c2r step ignores.
                bins[0].im = 0.0;
                if w.is_multiple_of(2) {
                    bins[wf - 1].im = 0.0;
                }
                plans
                    .row_inverse
                    .process(bins, &mut row)
                    .expect("sizes from the plan, no imaginary part at the ends");
                for (o, v) in out[y * w..(y + 1) * w].iter_mut().zip(&row) {
                    *o = v * scale;
                }
            }
        });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The 2-D DFT by its definition (f64), ortho-scaled.
    fn dft(plane: &[f32], h: usize, w: usize) -> Vec<(f64, f64)> {
        let wf = w / 2 + 1;
        let mut out = Vec::new();
        for u in 0..h {
            for k in 0..wf {
                let (mut re, mut im) = (0f64, 0f64);
                for y in 0..h {
                    for x in 0..w {
                        let a = -2.0
                            * std::f64::consts::PI
                            * ((u * y) as f64 / h as f64 + (k * x) as f64 / w as f64);
                        re += f64::from(plane[y * w + x]) * a.cos();
                        im += f64::from(plane[y * w + x]) * a.sin();
                    }
                }
                let s = ((h * w) as f64).sqrt();
                out.push((re / s, im / s));
            }
        }
        out
    }

    #[test]
    fn the_ortho_transform_is_the_dft_and_the_inverse_gives_the_plane_back() {
        for (h, w) in [(4, 6), (5, 7), (3, 8)] {
            let plane: Vec<f32> = (0..h * w).map(|i| ((i * 37 % 11) as f32) - 4.5).collect();
            let plans = Plans::new(h, w);
            let spectrum = rfft2(&plane, 1, h, w, &plans);
            let wf = w / 2 + 1;
            for (i, (re, im)) in dft(&plane, h, w).into_iter().enumerate() {
                assert!((f64::from(spectrum[i]) - re).abs() < 1e-4, "{h}x{w} re {i}");
                assert!(
                    (f64::from(spectrum[h * wf + i]) - im).abs() < 1e-4,
                    "{h}x{w} im {i}"
                );
            }
            let back = irfft2(&spectrum, 1, h, w, &plans);
            for (a, b) in back.iter().zip(&plane) {
                assert!((a - b).abs() < 1e-4, "{h}x{w}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn the_inverse_drops_the_imaginary_parts_of_each_row_s_end_bins() {
        // The same imaginary part in column 0 (and the last, W even) of every row of the
        // spectrum is, after the column transform, purely imaginary in row 0: c2r drops it, so
        // the plane comes back unchanged. A real part there would change it.
        let (h, w) = (4, 6);
        let wf = w / 2 + 1;
        let plane: Vec<f32> = (0..h * w).map(|i| (i as f32 * 0.7).sin()).collect();
        let plans = Plans::new(h, w);
        let mut spectrum = rfft2(&plane, 1, h, w, &plans);
        for u in 0..h {
            spectrum[h * wf + u * wf] += 3.0;
            spectrum[h * wf + u * wf + wf - 1] -= 2.0;
        }
        let back = irfft2(&spectrum, 1, h, w, &plans);
        for (a, b) in back.iter().zip(&plane) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
        // The DC bin's real part: every pixel moves by it over sqrt(h * w) (ortho).
        spectrum[0] += 3.0;
        let moved = irfft2(&spectrum, 1, h, w, &plans);
        let shift = 3.0 / ((h * w) as f32).sqrt();
        assert!(moved
            .iter()
            .zip(&plane)
            .all(|(a, b)| (a - b - shift).abs() < 1e-5));
    }
}
