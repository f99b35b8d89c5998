//! A1111 img2img's `resize_mode` for the init image (`StableDiffusionProcessingImg2Img.init`:
//! `images.resize_image(resize_mode, image, width, height)` unless "only masked" crops it):
//! 0 stretches it to the request's size (what the native API does), 1 scales it to cover the
//! size and crops the centre, 2 scales it to fit and fills the borders with its stretched edge
//! rows or columns. Modes 1 and 2 are applied here, with A1111's own geometry and filters
//! (`inpaint_a1111::crop::resize_image`), and the native request gets the fitted image.
//! A mask painted over the whole picture would need the same mode after its blur (A1111 blurs
//! at the upload's size, then resizes): a 422 there, as is 3 (the latent upscale) without
//! "only masked", which leaves the init image's size alone.

use base64::Engine as _;
use serde_json::{Map, Value};

use super::controlnet_fit::ResizeMode;
use crate::error::ApiError;
use sdserve_pipeline::inpaint_a1111::crop;

const FIELD: &str = "resize_mode";

/// Fits `native.init_image` to `width` x `height` by the body's `resize_mode` (types and the
/// 0..=3 range are the declared schema's, checked before); answers the mode as the
/// sd-webui-controlnet extension reads it for a unit that takes the init image
/// (`resize_mode_from_value(p.resize_mode)`). An init image that does not decode, or a size the
/// native rules refuse, is left for the native validation to name.
pub fn fit_init_image(
    body: &Map<String, Value>,
    native: &mut Map<String, Value>,
    width: u64,
    height: u64,
) -> Result<ResizeMode, ApiError> {
    let mode = body.get(FIELD).and_then(Value::as_u64).unwrap_or(0);
    let unit_mode = match mode {
        1 => ResizeMode::CropAndResize,
        2 => ResizeMode::ResizeAndFill,
        _ => ResizeMode::Resize,
    };
    if mode == 0 {
        return Ok(unit_mode);
    }
    if let Some(inpaint) = native.get("inpaint") {
        if inpaint["area"] == "only_masked" {
            // The init image is cut to the mask's region at its own size: no resize to apply.
            return Ok(unit_mode);
        }
        return Err(ApiError::validation(
            FIELD,
            "with a mask and inpaint_full_res false only 0 (Just resize) is supported",
        ));
    }
    if mode == 3 {
        return Err(ApiError::validation(
            FIELD,
            "3 (Just resize (latent upscale)) is not supported; 0, 1 or 2",
        ));
    }
    let fits = |side: u64| (crate::validate::SIZE_MIN..=crate::validate::SIZE_MAX).contains(&side);
    let Some(text) = native.get("init_image").and_then(Value::as_str) else {
        return Ok(unit_mode);
    };
    let Ok(init) = crate::images::decode_base64(text) else {
        return Ok(unit_mode);
    };
    if !fits(width) || !fits(height) {
        return Ok(unit_mode);
    }
    let fitted = crop::resize_image(mode as u8, &init.image, width as usize, height as usize);
    let png = crate::png::encode_with_text(&fitted, &[]).map_err(ApiError::Internal)?;
    native.insert(
        "init_image".into(),
        Value::String(base64::engine::general_purpose::STANDARD.encode(png)),
    );
    Ok(unit_mode)
}

#[cfg(test)]
mod tests {
    use super::super::controlnet_fit::fit;
    use super::super::translate::{translate, Mode};
    use super::*;
    use sdserve_pipeline::pipeline::RgbImage;
    use serde_json::json;

    /// A 320x224 picture with a different colour in every pixel's neighbourhood, so that any
    /// other geometry shows.
    fn init() -> RgbImage {
        let (w, h) = (320u32, 224u32);
        let pixels = (0..w * h)
            .flat_map(|i| {
                let (x, y) = (i % w, i / w);
                [
                    (x * 255 / w) as u8,
                    (y * 255 / h) as u8,
                    ((x * 7 + y * 13) % 256) as u8,
                ]
            })
            .collect();
        RgbImage {
            width: w,
            height: h,
            pixels,
        }
    }

    fn b64(image: &RgbImage) -> String {
        let png = crate::png::encode_with_text(image, &[]).unwrap();
        base64::engine::general_purpose::STANDARD.encode(png)
    }

    fn decoded(v: &Value) -> RgbImage {
        crate::images::decode_base64(v.as_str().unwrap())
            .unwrap()
            .image
    }

    fn run(extra: Value) -> Result<Map<String, Value>, ApiError> {
        let mut body = json!({"prompt": "p", "init_images": [b64(&init())], "width": 256,
                              "height": 384, "steps": 4});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        translate(body.as_object().unwrap(), Mode::Img2Img, &Map::new(), || 1).map(|t| t.native)
    }

    #[test]
    fn crop_and_fill_fit_the_init_image_as_a1111_s_resize_image() {
        let original = b64(&init());
        assert_eq!(run(json!({})).unwrap()["init_image"], original);
        assert_eq!(
            run(json!({"resize_mode": 0})).unwrap()["init_image"],
            original
        );
        for mode in [1u8, 2] {
            let native = run(json!({"resize_mode": mode})).unwrap();
            let got = decoded(&native["init_image"]);
            assert_eq!((got.width, got.height), (256, 384));
            assert_eq!(
                got,
                crop::resize_image(mode, &init(), 256, 384),
                "mode {mode}"
            );
            assert_ne!(got, crop::resize_image(0, &init(), 256, 384), "mode {mode}");
        }
    }

    #[test]
    fn only_masked_ignores_it_and_the_rest_is_a_422_naming_it() {
        let mask = b64(&RgbImage {
            width: 320,
            height: 224,
            pixels: vec![255; 320 * 224 * 3],
        });
        let only_masked = run(json!({"resize_mode": 1, "mask": mask})).unwrap();
        assert_eq!(only_masked["init_image"], b64(&init()));
        for extra in [
            json!({"resize_mode": 1, "mask": mask, "inpaint_full_res": false}),
            json!({"resize_mode": 3}),
        ] {
            let e = run(extra).unwrap_err();
            assert_eq!(e.fields()[0].field, "resize_mode", "{e:?}");
        }
    }

    #[test]
    fn a_unit_without_an_image_fits_the_init_image_by_the_same_mode() {
        let unit = json!({"alwayson_scripts": {"controlnet": {"args": [{"model": "c"}]}}});
        let map = |mode: u8| {
            let mut extra = unit.clone();
            extra["resize_mode"] = json!(mode);
            decoded(&run(extra).unwrap()["controlnets"][0]["image"])
        };
        assert_eq!(
            map(1),
            fit(&init(), ResizeMode::CropAndResize, 256, 384),
            "crop"
        );
        assert_eq!(
            map(2),
            fit(&init(), ResizeMode::ResizeAndFill, 256, 384),
            "fill"
        );
        assert_ne!(map(1), map(0));
    }
}
