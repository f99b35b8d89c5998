//! Face restoration as A1111 runs it (`modules/face_restoration_utils.py`): each face, found
//! and aligned to a 512x512 crop by facexlib's `FaceRestoreHelper`, goes through a restoring
//! network and is pasted back. This module holds the networks ([`CodeFormer`], A1111's
//! default) and A1111's conversion of a crop to the network's input and back
//! ([`crop_input`], [`crop_output`], [`restore_crop`]); facexlib's face parser ([`ParseNet`])
//! and paste-back ([`paste::paste_faces`]); detection and alignment: [`detect::RetinaFace`]
//! (facexlib's RetinaFace ResNet-50, the network in [`retinaface`]) and
//! [`align::detect_and_align`] (the FFHQ-template crops, warped as [`paste::warp`] warps). [`restorer`] runs them
//! together as A1111's `restore_with_face_helper` does ([`FaceRestorer`]).

pub mod align;
pub mod codeformer;
pub mod detect;
pub mod parsenet;
pub mod paste;
pub mod restorer;
pub mod retinaface;

use candle_core::{Device, Tensor};

pub use align::detect_and_align;
pub use codeformer::CodeFormer;
pub use detect::RetinaFace;
pub use parsenet::ParseNet;
pub use paste::paste_faces;
pub use restorer::{FaceRestore, FaceRestorer};

use crate::pipeline::RgbImage;
use crate::{PipelineError, Result};

/// A1111's crop as the network's input, `[1, 3, H, W]` f32 on `device`: the crop / 255 (in
/// float64, then float32, `bgr_image_to_rgb_tensor`), then torchvision's
/// `normalize(mean 0.5, std 0.5)`: `(x - 0.5) / 0.5` in float32.
pub fn crop_input(face: &RgbImage, device: &Device) -> Result<Tensor> {
    let (w, h) = (face.width as usize, face.height as usize);
    let mut v = vec![0f32; 3 * w * h];
    for (i, px) in face.pixels.chunks_exact(3).enumerate() {
        for (c, &byte) in px.iter().enumerate() {
            let x = (byte as f64 / 255.0) as f32;
            v[c * w * h + i] = (x - 0.5) / 0.5;
        }
    }
    Ok(Tensor::from_vec(v, (1, 3, h, w), device)?)
}

/// A1111's bytes of the network's output (`rgb_tensor_to_bgr_image(min_max=(-1, 1))`, then
/// `(img * 255.0).astype('uint8')`): clamped to [-1, 1], `(x + 1) / 2`, times 255 and
/// truncated (not rounded), all in float32.
pub fn crop_output(out: &Tensor) -> Result<RgbImage> {
    let out = out.squeeze(0)?.to_dtype(candle_core::DType::F32)?;
    let (c, h, w) = out.dims3()?;
    if c != 3 {
        return Err(PipelineError::InvalidRequest(format!(
            "a face restorer's output of {c} channels"
        )));
    }
    let v = out.flatten_all()?.to_vec1::<f32>()?;
    let mut pixels = vec![0u8; 3 * w * h];
    for (i, px) in pixels.chunks_exact_mut(3).enumerate() {
        for (ch, byte) in px.iter_mut().enumerate() {
            let x = v[ch * w * h + i].clamp(-1.0, 1.0);
            *byte = ((x + 1.0) / 2.0 * 255.0) as u8;
        }
    }
    Ok(RgbImage {
        width: w as u32,
        height: h as u32,
        pixels,
    })
}

/// One aligned face through CodeFormer as A1111's `FaceRestorerCodeFormer.restore` runs it
/// for each crop: [`crop_input`], the network at `weight`, [`crop_output`].
pub fn restore_crop(net: &CodeFormer, face: &RgbImage, weight: f64) -> Result<RgbImage> {
    let x = crop_input(face, net.device())?;
    crop_output(&net.forward(&x, weight)?)
}
