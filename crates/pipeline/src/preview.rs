//! Cheap previews of a run in progress, made from the latents the step hook sees.
//!
//! `latent_rgb` is a fixed linear map from the 4 SD 1.x latent channels to RGB: the factors
//! Keturn fitted by least squares between SD 1.4 latents and their VAE decodes ("latent space to
//! RGB", discussed on the diffusers/A1111 trackers in 2022), which AUTOMATIC1111 uses for its
//! "Approx cheap" live preview. The result is `(x + 1) / 2` clamped to `[0, 1]`, at the latent
//! size (one pixel per latent, 1/8 of the image a side).

use candle_core::{DType, Tensor};

use crate::pipeline::RgbImage;
use crate::Result;

/// `LATENT_RGB_FACTORS[c]` is latent channel `c`'s contribution to (R, G, B).
pub const LATENT_RGB_FACTORS: [[f32; 3]; 4] = [
    [0.298, 0.207, 0.208],
    [0.187, 0.286, 0.173],
    [-0.158, 0.189, 0.264],
    [-0.184, -0.271, -0.473],
];

/// The first image of `latents` (`[B, 4, h, w]`, any float dtype and device) as an `h x w` RGB
/// preview.
pub fn latent_rgb(latents: &Tensor) -> Result<RgbImage> {
    let (_, channels, h, w) = latents.dims4()?;
    if channels != 4 {
        return Err(crate::PipelineError::InvalidRequest(format!(
            "a latent preview needs 4 latent channels, the model has {channels}"
        )));
    }
    let first = latents.get(0)?.to_dtype(DType::F32)?.flatten_all()?;
    let values = first.to_vec1::<f32>()?;
    let plane = h * w;
    let mut pixels = Vec::with_capacity(plane * 3);
    for p in 0..plane {
        let mut rgb = [0f32; 3];
        for (c, factors) in LATENT_RGB_FACTORS.iter().enumerate() {
            let v = values[c * plane + p];
            for (acc, f) in rgb.iter_mut().zip(factors) {
                *acc += v * f;
            }
        }
        pixels.extend(rgb.map(|v| (((v + 1.0) / 2.0).clamp(0.0, 1.0) * 255.0).round() as u8));
    }
    Ok(RgbImage {
        width: w as u32,
        height: h as u32,
        pixels,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn each_channel_maps_through_its_row() {
        // 2x1 latents: pixel 0 has only channel c at 1.0, pixel 1 is all zero (mid grey).
        for c in 0..4 {
            let mut data = vec![0f32; 4 * 2];
            data[c * 2] = 1.0;
            let t = Tensor::from_vec(data, (1, 4, 1, 2), &Device::Cpu).unwrap();
            let img = latent_rgb(&t).unwrap();
            assert_eq!((img.width, img.height), (2, 1));
            for (rgb, factor) in LATENT_RGB_FACTORS[c].iter().enumerate() {
                let want = ((factor + 1.0) / 2.0 * 255.0).round() as u8;
                assert_eq!(img.pixels[rgb], want, "channel {c} colour {rgb}");
                assert_eq!(img.pixels[3 + rgb], 128);
            }
        }
        let bad = Tensor::zeros((1, 9, 2, 2), DType::F32, &Device::Cpu).unwrap();
        assert!(latent_rgb(&bad).is_err());
    }
}
