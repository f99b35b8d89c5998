//! What img2img gives the sd-webui-controlnet extension's units (its `scripts/controlnet.py`):
//! a unit without an image of its own takes the init image (`choose_input_image`; its resize
//! mode then A1111's `resize_mode`, `resize_mode_from_value`), and
//! with a mask and "only masked" (`inpaint_full_res`, A1111's default) each unit's image is
//! cut to the region A1111 repaints before its preprocessor runs
//! (`try_crop_image_with_a1111_mask`, while the unit's `inpaint_crop_input_image`, true by
//! default): the mask as the extension prepares it (`prepare_mask`: luminance, inverted with
//! `inpainting_mask_invert`, OpenCV's blur by `mask_blur_x`/`_y`), its region
//! (`masking.get_crop_region` grown by `inpaint_full_res_padding`, then
//! `expand_crop_region` to the request's aspect), the image brought to the mask's size by the
//! unit's resize mode (A1111's `images.resize_image`), cropped there and fitted to the
//! request's size by `resize_image` 2 (resize and fill).

use serde_json::{Map, Value};

use crate::error::ApiError;
use sdserve_pipeline::inpaint_a1111::{blur, crop, luma};
use sdserve_pipeline::pipeline::RgbImage;

use super::controlnet::ResizeMode;

/// The init image and, with a mask and "only masked", the region the units' images are cut
/// to.
pub struct Img2ImgInput {
    pub init: RgbImage,
    /// How a unit without an image fits `init`: A1111's `resize_mode` as the extension reads
    /// it (`resize_mode_from_value(p.resize_mode)`).
    pub init_fit: ResizeMode,
    pub crop: Option<MaskCrop>,
    /// A1111's inpainting mask as the extension prepares it (`prepare_mask`), grey, at the
    /// mask's size: the alpha an inpaint unit without an image of its own takes with `init`.
    pub mask: Option<RgbImage>,
}

/// "Only masked"'s region, in the mask's pixels, and the mask's size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaskCrop {
    pub mask_size: (usize, usize),
    pub region: crop::Region,
}

impl MaskCrop {
    /// `try_crop_image_with_a1111_mask`'s image: `resize_image(mode, image, mask size)`,
    /// cropped to the region, then `resize_image(2, .., width, height)`. The extension works
    /// channel by channel; Pillow resamples each channel of an RGB image alike.
    pub fn apply(
        &self,
        image: &RgbImage,
        mode: ResizeMode,
        width: usize,
        height: usize,
    ) -> RgbImage {
        let (mw, mh) = self.mask_size;
        let whole = crop::resize_image(mode.a1111_index(), image, mw, mh);
        crop::resize_image(2, &crop::crop(&whole, self.region), width, height)
    }
}

/// The body's init image and "only masked" region (A1111's inpainting options as the
/// translation read them, `inpaint`: the native object), for a request with units.
pub fn input(
    body: &Map<String, Value>,
    inpaint: Option<&Value>,
    width: usize,
    height: usize,
    init_fit: ResizeMode,
) -> Result<Img2ImgInput, ApiError> {
    let decode = |field: &str, v: Option<&Value>| {
        let text = v.and_then(Value::as_str).unwrap_or_default();
        crate::images::decode_base64(text)
            .map(|i| i.image)
            .map_err(|e| ApiError::validation(field, e))
    };
    let init = decode(
        "init_images",
        body.get("init_images").and_then(|a| a.get(0)),
    )?;
    let Some(options) = inpaint.filter(|_| body.get("mask").is_some_and(|m| !m.is_null())) else {
        return Ok(Img2ImgInput {
            init,
            init_fit,
            crop: None,
            mask: None,
        });
    };
    let mask = decode("mask", body.get("mask"))?;
    let (mw, mh) = (mask.width as usize, mask.height as usize);
    let prepared = prepare_mask(&mask, options);
    let crop = match options["area"] == "only_masked" {
        false => None,
        true => Some(mask_crop(&prepared, (mw, mh), options, width, height)?),
    };
    Ok(Img2ImgInput {
        init,
        init_fit,
        crop,
        mask: Some(sdserve_pipeline::inpaint_a1111::grey(&prepared, mw, mh)),
    })
}

/// The extension's `prepare_mask`: luminance, inverted with `mask_invert`, OpenCV's blur by
/// `mask_blur_x`/`_y` (or `mask_blur`).
fn prepare_mask(mask: &RgbImage, options: &Value) -> Vec<u8> {
    let (mw, mh) = (mask.width as usize, mask.height as usize);
    let mut m = luma(mask);
    if options["mask_invert"] == true {
        m.iter_mut().for_each(|v| *v = 255 - *v);
    }
    let sigma = |k: &str| {
        options
            .get(k)
            .or_else(|| options.get("mask_blur"))
            .and_then(Value::as_u64)
            .unwrap_or(0) as u32
    };
    let (bx, by) = (sigma("mask_blur_x"), sigma("mask_blur_y"));
    if bx > 0 {
        blur::blur_horizontal(&mut m, mw, mh, bx);
    }
    if by > 0 {
        blur::blur_vertical(&mut m, mw, mh, by);
    }
    m
}

/// The crop region of the prepared mask `m` (`mw` x `mh`) for a `width` x `height` request.
fn mask_crop(
    m: &[u8],
    (mw, mh): (usize, usize),
    options: &Value,
    width: usize,
    height: usize,
) -> Result<MaskCrop, ApiError> {
    let padding = options["padding"].as_u64().unwrap_or(0) as u32;
    // A blank mask leaves `get_crop_region` an inverted box, which the extension cannot crop
    // to (A1111 itself then runs plain img2img).
    let region = crop::crop_region(m, mw, mh, padding).ok_or_else(|| {
        ApiError::validation(
            "mask",
            "is blank: with inpaint_full_res (\"only masked\") and ControlNet units there is no region to crop their images to",
        )
    })?;
    Ok(MaskCrop {
        mask_size: (mw, mh),
        region: crop::expand_crop_region(region, width, height, mw, mh),
    })
}

/// A unit's own mask (`mask`, `mask_image`, or the `mask` of an `{image, mask}` object or
/// `[image, mask]` pair) as the extension reads it for a unit that is not an inpaint or CLIP
/// one (`from_rgba_to_input`): its first channel is the alpha; an alpha all at most 5 or all
/// at least 250 leaves the image as it is, any other replaces it ("canvas scribble": the
/// alpha, grey).
pub fn apply_unit_mask(image: RgbImage, mask: &RgbImage, i: usize) -> Result<RgbImage, ApiError> {
    if (mask.width, mask.height) != (image.width, image.height) {
        return Err(ApiError::validation(
            super::controlnet::FIELD,
            format!(
                "[{i}].mask: {}x{}, its image {}x{}: they must be the same size",
                mask.width, mask.height, image.width, image.height
            ),
        ));
    }
    let alpha: Vec<u8> = mask.pixels.chunks_exact(3).map(|p| p[0]).collect();
    if alpha.iter().all(|&a| a <= 5) || alpha.iter().all(|&a| a >= 250) {
        return Ok(image);
    }
    Ok(sdserve_pipeline::inpaint_a1111::grey(
        &alpha,
        image.width as usize,
        image.height as usize,
    ))
}

#[cfg(test)]
#[path = "controlnet_img2img_tests.rs"]
mod fixture_tests;

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn grey_mask(w: usize, h: usize, boxed: (usize, usize, usize, usize)) -> RgbImage {
        let (x1, y1, x2, y2) = boxed;
        let v: Vec<u8> = (0..w * h)
            .map(|k| {
                let (x, y) = (k % w, k / w);
                if (x1..x2).contains(&x) && (y1..y2).contains(&y) {
                    255
                } else {
                    0
                }
            })
            .collect();
        sdserve_pipeline::inpaint_a1111::grey(&v, w, h)
    }

    /// The region of a mask prepared as the extension's `prepare_mask`.
    fn mask_crop(mask: &RgbImage, o: &Value, w: usize, h: usize) -> Result<MaskCrop, ApiError> {
        let size = (mask.width as usize, mask.height as usize);
        super::mask_crop(&prepare_mask(mask, o), size, o, w, h)
    }

    #[test]
    fn the_region_is_the_blurred_mask_s_grown_to_the_request_s_aspect() {
        let mask = grey_mask(100, 80, (40, 30, 60, 40));
        let o = json!({"mask_blur_x": 0, "mask_blur_y": 0, "mask_invert": false, "padding": 0});
        let c = mask_crop(&mask, &o, 64, 64).unwrap();
        // 20x10 box grown to 20x20, centred on it.
        assert_eq!(c.region, (40, 25, 60, 45));
        assert_eq!(c.mask_size, (100, 80));
        // Padding, and a blur reaching past the box.
        let padded = json!({"mask_blur": 0, "mask_invert": false, "padding": 4});
        assert_eq!(
            mask_crop(&mask, &padded, 64, 64).unwrap().region,
            (36, 21, 64, 49)
        );
        let blurred = json!({"mask_blur_x": 4, "mask_blur_y": 0, "padding": 0});
        let r = mask_crop(&mask, &blurred, 64, 64).unwrap().region;
        assert!(r.0 < 40 && r.2 > 60, "{r:?}");
        // Inverted, the box is everything.
        let inverted = json!({"mask_blur": 0, "mask_invert": true, "padding": 0});
        assert_eq!(
            mask_crop(&mask, &inverted, 100, 80).unwrap().region,
            (0, 0, 100, 80)
        );
        let blank = grey_mask(100, 80, (0, 0, 0, 0));
        let e = mask_crop(&blank, &o, 64, 64).unwrap_err();
        assert!(format!("{:?}", e.body()).contains("blank"));
    }

    #[test]
    fn a_unit_mask_replaces_the_image_unless_it_is_flat() {
        let image = grey_mask(8, 8, (0, 0, 4, 8));
        let flat = grey_mask(8, 8, (0, 0, 0, 0));
        assert_eq!(apply_unit_mask(image.clone(), &flat, 0).unwrap(), image);
        let scribble = grey_mask(8, 8, (2, 2, 5, 5));
        assert_eq!(
            apply_unit_mask(image.clone(), &scribble, 0).unwrap(),
            scribble
        );
        assert!(apply_unit_mask(image, &grey_mask(4, 8, (0, 0, 1, 1)), 1).is_err());
    }
}
