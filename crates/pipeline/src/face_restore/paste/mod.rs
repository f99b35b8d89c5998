//! facexlib 0.3.0's paste-back as A1111 runs it (`FaceRestoreHelper(upscale_factor=1,
//! use_parse=True)`: `get_inverse_affine`, then `paste_faces_to_input_image`). For each
//! restored 512x512 face, in the order the faces were found:
//!
//! 1. the inverse of the face's affine (`cv2.invertAffineTransform`; times the upscale 1);
//! 2. the face warped back to the image's size by it (`cv2.warpAffine`, bilinear, border 0);
//! 3. its parse mask: ParseNet's class of each pixel through `MASK_COLORMAP` (classes 0, 14
//!    and 16 to 18: 0; the others 255), in float64, `cv2.GaussianBlur(101x101, sigma 11)`
//!    twice, the outer 10 pixels zeroed, / 255, warped back as the face (`flags=3`,
//!    INTER_AREA, which warpAffine runs as bilinear);
//! 4. the image becomes `mask * face + (1 - mask) * image` in float64.
//!
//! The result is truncated to 8 bits (`astype(np.uint8)`). The background's same-size
//! LANCZOS4 resize and the face's same-size resize to 512 are copies in OpenCV.
//!
//! facexlib works on BGR images (A1111 flips the RGB image in and out, the restored faces
//! are BGR) and the parser flips its input to RGB: every step here is per channel but the
//! parser's input, so the RGB images are used as they are.

pub mod blur;
pub mod warp;

use self::blur::{gaussian_blur_f64, gaussian_kernel};
pub use self::warp::{
    invert_affine, warp_affine_f64, warp_affine_u8, warp_affine_u8_border, Affine,
};
use super::parsenet::{ParseNet, PARSE_SIZE};
use crate::pipeline::RgbImage;
use crate::{PipelineError, Result};

/// facexlib's `MASK_COLORMAP`: each of ParseNet's 19 classes' mask value.
pub const MASK_COLORMAP: [u8; 19] = [
    0, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 0, 255, 0, 0, 0,
];
/// The mask's `cv2.GaussianBlur(mask, (101, 101), 11)`, run twice.
pub const BLUR_SIZE: usize = 101;
pub const BLUR_SIGMA: f64 = 11.0;
/// "remove the black borders": the mask's outer rows and columns zeroed.
pub const MASK_BORDER: usize = 10;

/// The parse mask before the blur (`mask[out == idx] = color`; a class past the colormap
/// stays 0), float64.
pub fn parse_mask(classes: &[u8]) -> Vec<f64> {
    classes
        .iter()
        .map(|&c| MASK_COLORMAP.get(c as usize).copied().unwrap_or(0) as f64)
        .collect()
}

/// The mask of a `size` x `size` face's classes as facexlib pastes with it, before the warp:
/// [`parse_mask`], blurred twice, its border zeroed, / 255.
pub fn soft_mask(classes: &[u8], size: usize) -> Vec<f64> {
    let kernel = gaussian_kernel(BLUR_SIZE, BLUR_SIGMA);
    let once = gaussian_blur_f64(&parse_mask(classes), size, size, &kernel);
    let mut mask = gaussian_blur_f64(&once, size, size, &kernel);
    let b = MASK_BORDER.min(size);
    for (y, row) in mask.chunks_exact_mut(size).enumerate() {
        for (x, v) in row.iter_mut().enumerate() {
            let border = y < b || y >= size - b || x < b || x >= size - b;
            *v = if border { 0.0 } else { *v / 255.0 };
        }
    }
    mask
}

/// A restored face to paste: the forward affine (image -> 512 crop) facexlib stores in
/// `affine_matrices`, the restored 512x512 face (RGB) and its parse classes (row-major).
pub struct ParsedFace<'a> {
    pub affine: Affine,
    pub face: &'a RgbImage,
    pub classes: &'a [u8],
}

/// `paste_faces_to_input_image` of faces already parsed, in order, on `image` (RGB).
pub fn paste_parsed(image: &RgbImage, faces: &[ParsedFace]) -> Result<RgbImage> {
    let (w, h) = (image.width as usize, image.height as usize);
    let mut canvas: Vec<f64> = image.pixels.iter().map(|&b| b as f64).collect();
    for f in faces {
        let (fw, fh) = (f.face.width as usize, f.face.height as usize);
        if (fw, fh) != (PARSE_SIZE, PARSE_SIZE) || f.classes.len() != fw * fh {
            return Err(PipelineError::InvalidRequest(format!(
                "a {fw}x{fh} restored face with {} classes to paste; facexlib's are \
                 {PARSE_SIZE}x{PARSE_SIZE}",
                f.classes.len()
            )));
        }
        let inverse = invert_affine(&f.affine);
        let face = warp_affine_u8(&f.face.pixels, (fw, fh, 3), &inverse, (w, h));
        let mask = warp_affine_f64(&soft_mask(f.classes, fw), (fw, fh), &inverse, (w, h));
        for (i, &m) in mask.iter().enumerate() {
            for c in 0..3 {
                let at = 3 * i + c;
                canvas[at] = m * face[at] as f64 + (1.0 - m) * canvas[at];
            }
        }
    }
    Ok(RgbImage {
        width: image.width,
        height: image.height,
        // astype(np.uint8): truncated; the blend stays within [0, 255] (up to rounding,
        // which the cast saturates as numpy's does for these values).
        pixels: canvas.into_iter().map(|v| v as u8).collect(),
    })
}

/// A1111's paste of restored faces on `image` (RGB): each face (its forward affine, image ->
/// 512 crop, as facexlib stores it, and the restored 512x512 RGB face) parsed by `parser`
/// and pasted in turn, as `paste_faces_to_input_image` with `use_parse=True`.
pub fn paste_faces(
    image: &RgbImage,
    faces: &[(Affine, RgbImage)],
    parser: &ParseNet,
) -> Result<RgbImage> {
    let classes: Vec<Vec<u8>> = faces
        .iter()
        .map(|(_, face)| parser.classes_of(face))
        .collect::<Result<_>>()?;
    let parsed: Vec<ParsedFace> = faces
        .iter()
        .zip(&classes)
        .map(|((affine, face), classes)| ParsedFace {
            affine: *affine,
            face,
            classes,
        })
        .collect();
    paste_parsed(image, &parsed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_colormap_keeps_the_face_and_drops_the_rest() {
        assert_eq!(
            parse_mask(&[0, 1, 13, 14, 15, 16, 18, 19]),
            [0.0, 255.0, 255.0, 0.0, 255.0, 0.0, 0.0, 0.0]
        );
    }

    #[test]
    fn a_full_mask_is_one_inside_and_zero_on_the_border() {
        let m = soft_mask(&vec![1u8; 64 * 64], 64);
        assert_eq!(m[0], 0.0);
        assert_eq!(m[9 * 64 + 30], 0.0);
        assert!((m[10 * 64 + 10] - 1.0).abs() < 1e-12);
        assert!((m[32 * 64 + 32] - 1.0).abs() < 1e-12);
    }

    #[test]
    fn no_faces_leave_the_image_as_it_was_and_wrong_sizes_are_refused() {
        let image = RgbImage {
            width: 3,
            height: 2,
            pixels: (0..18).map(|v| v * 14).collect(),
        };
        assert_eq!(paste_parsed(&image, &[]).unwrap().pixels, image.pixels);
        let face = RgbImage {
            width: 4,
            height: 4,
            pixels: vec![0; 48],
        };
        let err = paste_parsed(
            &image,
            &[ParsedFace {
                affine: [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]],
                face: &face,
                classes: &[0; 16],
            }],
        )
        .unwrap_err();
        assert!(err.to_string().contains("4x4"), "{err}");
    }
}
