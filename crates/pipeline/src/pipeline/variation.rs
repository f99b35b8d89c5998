//! A1111's variation seeds (`subseed`, `subseed_strength`): each image's starting noise is its
//! seed's noise bent towards a second seed's by spherical interpolation (A1111's
//! `modules/rng.py` `ImageRNG.first` and `slerp`). The generator that later noise (ancestral
//! steps) comes from stays the main seed's, as in A1111. A1111's seed resize
//! (`seed_resize_from_w`/`_h`) draws the seed's noise at another size and centres it in the
//! image's ([`resized_image_noise`]); [`GenerationParams::starting_noise`] applies both.

use candle_core::{DType, Device, Tensor};

use super::GenerationParams;
use crate::rng::TorchRng;
use crate::Result;

/// A second seed and how far the noise goes towards it (0: the seed's noise, 1: the variation
/// seed's, when the two are not nearly parallel).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Variation {
    /// Image `i` of a batch uses `seed + i` (A1111's `all_subseeds`).
    pub seed: u64,
    pub strength: f64,
}

/// A1111's seed resize: the size (pixels) a seed's image was made at, whose noise the request's
/// images keep in their centre, so that a seed keeps its composition at another size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeedResize {
    pub width: usize,
    pub height: usize,
}

impl GenerationParams {
    /// Image `i`'s starting noise `[1, C, H, W]` (f32, on `device`) of `shape` `[C, H, W]`,
    /// the next draw of its generator `rng`, as A1111's `ImageRNG.first`: bent by the
    /// variation seed, and with a seed resize the seed's noise at the "from" size (its pixels
    /// over the VAE's `vae_scale_factor`, as A1111's `// 8`) centred in it. The same for
    /// every pass and mode (A1111 builds the same `ImageRNG` for the hires pass).
    pub(super) fn starting_noise(
        &self,
        i: usize,
        rng: &mut TorchRng,
        shape: (usize, usize, usize),
        vae_scale_factor: usize,
        device: &Device,
    ) -> Result<Tensor> {
        let variation = self.image_variation(i);
        match self.seed_resize_from {
            None => image_noise(rng, variation, shape, device),
            Some(from) => {
                let cells = (
                    from.height / vae_scale_factor,
                    from.width / vae_scale_factor,
                );
                let seed = self.image_seed(i);
                resized_image_noise(rng, seed, variation, cells, shape, device)
            }
        }
    }
}

/// A1111's `slerp(val, low, high)` on one image's noise `[C, H, W]` (flat, row-major): the norms
/// and dot products run over dim 1 (H), so each channel's each column is interpolated on its
/// own; where the mean dot product passes 0.9995 A1111 mixes linearly, `low * val + high *
/// (1 - val)` (its formula, weights as written). float32 as torch computes it.
pub fn slerp(val: f64, low: &[f32], high: &[f32], dims: (usize, usize, usize)) -> Vec<f32> {
    let (c, h, w) = dims;
    assert_eq!(low.len(), c * h * w);
    assert_eq!(high.len(), low.len());
    let at = |ci: usize, y: usize, x: usize| (ci * h + y) * w + x;
    let norm = |v: &[f32], ci: usize, x: usize| {
        ((0..h)
            .map(|y| (v[at(ci, y, x)] as f64).powi(2))
            .sum::<f64>()
            .sqrt()) as f32
    };
    let mut dot = vec![0f32; c * w];
    for ci in 0..c {
        for x in 0..w {
            let (nl, nh) = (norm(low, ci, x), norm(high, ci, x));
            dot[ci * w + x] = (0..h)
                .map(|y| ((low[at(ci, y, x)] / nl) * (high[at(ci, y, x)] / nh)) as f64)
                .sum::<f64>() as f32;
        }
    }
    let mean = (dot.iter().map(|&d| d as f64).sum::<f64>() / dot.len() as f64) as f32;
    let (v, one_minus) = (val as f32, (1.0 - val) as f32);
    let mut out = vec![0f32; low.len()];
    if mean > 0.9995 {
        for (o, (&l, &hi)) in out.iter_mut().zip(low.iter().zip(high)) {
            *o = l * v + hi * one_minus;
        }
        return out;
    }
    for ci in 0..c {
        for x in 0..w {
            let omega = dot[ci * w + x].acos();
            let so = omega.sin();
            let a = (one_minus * omega).sin() / so;
            let b = (v * omega).sin() / so;
            for y in 0..h {
                let i = at(ci, y, x);
                out[i] = a * low[i] + b * high[i];
            }
        }
    }
    out
}

/// One image's starting noise `[1, C, H, W]` (f32): drawn from `rng` (the image's own
/// generator, which goes on to any later noise), then, with a variation of non-zero strength,
/// slerped towards a fresh generator's noise seeded `variation_seed` (A1111 draws it with
/// `randn(subseed, shape)` from a freshly seeded generator).
pub fn image_noise(
    rng: &mut TorchRng,
    variation: Option<(u64, f64)>,
    shape: (usize, usize, usize),
    device: &Device,
) -> Result<Tensor> {
    let (c, h, w) = shape;
    let noise = rng.randn_tensor((1, c, h, w), &Device::Cpu, DType::F32)?;
    let noise = match variation {
        Some((seed, strength)) if strength != 0.0 => {
            let sub = TorchRng::new(seed).randn_tensor((1, c, h, w), &Device::Cpu, DType::F32)?;
            let mixed = slerp(
                strength,
                &noise.flatten_all()?.to_vec1::<f32>()?,
                &sub.flatten_all()?.to_vec1::<f32>()?,
                shape,
            );
            Tensor::from_vec(mixed, (1, c, h, w), &Device::Cpu)?
        }
        _ => noise,
    };
    Ok(noise.to_device(device)?)
}

/// A1111's seed resize (`seed_resize_from_w`/`_h`, `ImageRNG.first` in `modules/rng.py`): the
/// noise is drawn at another size, `from` (latent rows and columns of the "from" size), and
/// pasted centred into the image's noise at `shape`, cropped where it is larger (offsets
/// floored as Python floors them). The target-size noise comes from `rng`, which goes on to any
/// later noise; the "from" noise from a fresh generator seeded `seed` (the image's seed), bent
/// towards the variation seed's noise at the "from" size when there is one. At the target
/// size itself this is [`image_noise`].
pub fn resized_image_noise(
    rng: &mut TorchRng,
    seed: u64,
    variation: Option<(u64, f64)>,
    from: (usize, usize),
    shape: (usize, usize, usize),
    device: &Device,
) -> Result<Tensor> {
    let (c, h, w) = shape;
    let (fh, fw) = from;
    if (fh, fw) == (h, w) {
        return image_noise(rng, variation, shape, device);
    }
    let mut x = rng.randn(c * h * w);
    let n = c * fh * fw;
    if n > 0 {
        let small = TorchRng::new(seed).randn(n);
        let small = match variation {
            Some((sub, strength)) if strength != 0.0 => {
                slerp(strength, &small, &TorchRng::new(sub).randn(n), (c, fh, fw))
            }
            _ => small,
        };
        let (h, w, fh, fw) = (h as i64, w as i64, fh as i64, fw as i64);
        let dx = (w - fw).div_euclid(2);
        let dy = (h - fh).div_euclid(2);
        let pw = if dx >= 0 { fw } else { fw + 2 * dx };
        let ph = if dy >= 0 { fh } else { fh + 2 * dy };
        let (tx, ty, sx, sy) = (dx.max(0), dy.max(0), (-dx).max(0), (-dy).max(0));
        for ci in 0..c as i64 {
            for row in 0..ph {
                let to = ((ci * h + ty + row) * w + tx) as usize;
                let at = ((ci * fh + sy + row) * fw + sx) as usize;
                x[to..to + pw as usize].copy_from_slice(&small[at..at + pw as usize]);
            }
        }
    }
    Ok(Tensor::from_vec(x, (1, c, h, w), &Device::Cpu)?.to_device(device)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strength_zero_and_one_give_either_noise_exactly() {
        let mut a = TorchRng::new(1);
        let low = a
            .randn_tensor((1, 4, 8, 6), &Device::Cpu, DType::F32)
            .unwrap();
        let low = low.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let mut b = TorchRng::new(2);
        let high = b
            .randn_tensor((1, 4, 8, 6), &Device::Cpu, DType::F32)
            .unwrap();
        let high = high.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(slerp(0.0, &low, &high, (4, 8, 6)), low);
        assert_eq!(slerp(1.0, &low, &high, (4, 8, 6)), high);
        let half = slerp(0.5, &low, &high, (4, 8, 6));
        assert!(half != low && half != high);
    }
}
