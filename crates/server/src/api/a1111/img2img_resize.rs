//! A1111 img2img's `resize_mode` for the init image (`StableDiffusionProcessingImg2Img.init`:
//! `images.resize_image(resize_mode, image, width, height)` unless "only masked" crops it; 3,
//! "Just resize (latent upscale)", encodes it at its own size and resizes the latents): the
//! native request's `resize_mode` by name, which fits it (with a mask, after the blur, as
//! A1111). The native rules name `resize_mode` where the mode cannot run.

use serde_json::{Map, Value};

use super::controlnet_fit::ResizeMode;

const FIELD: &str = "resize_mode";

/// Sets `native.resize_mode` from the body's `resize_mode` (types and the 0..=3 range are the
/// declared schema's, checked before; 0, the native default, is left out); answers the mode as
/// the sd-webui-controlnet extension reads it for a unit that takes the init image
/// (`resize_mode_from_value(p.resize_mode)`).
pub fn fit_init_image(body: &Map<String, Value>, native: &mut Map<String, Value>) -> ResizeMode {
    let mode = body.get(FIELD).and_then(Value::as_u64).unwrap_or(0);
    let unit_mode = match mode {
        1 => ResizeMode::CropAndResize,
        2 => ResizeMode::ResizeAndFill,
        _ => ResizeMode::Resize,
    };
    let native_mode = sdserve_pipeline::pipeline::ResizeMode::from_a1111_index(mode);
    if let Some(m) = native_mode.filter(|m| m.a1111_index() > 0) {
        let name = crate::validate::resize_mode::name(m);
        native.insert(FIELD.into(), Value::String(name.into()));
    }
    unit_mode
}

#[cfg(test)]
mod tests {
    use super::super::controlnet_fit::fit;
    use super::super::translate::{translate, Mode};
    use super::*;
    use crate::error::ApiError;
    use base64::Engine as _;
    use sdserve_pipeline::inpaint_a1111::crop;
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

    /// The translation and the native rules (A1111's, for its mask) together.
    fn valid(extra: Value) -> Result<crate::validate::ValidRequest, ApiError> {
        let native = run(extra)?;
        crate::validate::validate_request(&native, crate::validate::DialectRules::A1111)
    }

    #[test]
    fn the_mode_goes_native_by_name_and_crop_and_fill_fit_as_a1111_s_resize_image() {
        let original = b64(&init());
        for extra in [json!({}), json!({"resize_mode": 0})] {
            let native = run(extra).unwrap();
            assert_eq!(native["init_image"], original);
            assert!(!native.contains_key("resize_mode"));
        }
        for (mode, name) in [(1u8, "crop_and_resize"), (2, "resize_and_fill")] {
            let native = run(json!({"resize_mode": mode})).unwrap();
            assert_eq!(native["resize_mode"], name);
            let got = valid(json!({"resize_mode": mode})).unwrap();
            let got = got.init_image.unwrap().image;
            assert_eq!((got.width, got.height), (256, 384));
            assert_eq!(
                got,
                crop::resize_image(mode, &init(), 256, 384),
                "mode {mode}"
            );
            assert_ne!(got, crop::resize_image(0, &init(), 256, 384), "mode {mode}");
        }
        // The latent upscale keeps the image at its own size (the pipeline encodes it so).
        let latent = valid(json!({"resize_mode": 3})).unwrap();
        assert_eq!(latent.init_image.unwrap().image, init());
    }

    #[test]
    fn with_a_mask_the_mode_runs_and_a_latent_upscale_a1111_cannot_run_is_a_422() {
        let mask = |w: u32, h: u32| {
            b64(&RgbImage {
                width: w,
                height: h,
                pixels: vec![255; (w * h * 3) as usize],
            })
        };
        // A1111's inpainting keeps both as sent; the pipeline fits them after the blur.
        for (mode, whole) in [(1, false), (2, true), (3, false)] {
            let r = valid(json!({"resize_mode": mode, "mask": mask(320, 224),
                                 "inpaint_full_res": !whole}))
            .unwrap();
            assert_eq!(r.resize_mode.a1111_index(), mode, "{mode}");
            assert_eq!(r.init_image.unwrap().image, init(), "{mode}");
        }
        // Over the whole picture A1111's overlay (the upload's size) and result (the request's)
        // do not match: it fails; at the request's size it runs.
        let e = valid(json!({"resize_mode": 3, "mask": mask(320, 224),
                             "inpaint_full_res": false}))
        .unwrap_err();
        assert_eq!(e.fields()[0].field, "resize_mode", "{e:?}");
        assert!(format!("{e:?}").contains("256x384"), "{e:?}");
        let at_size = valid(json!({"resize_mode": 3, "init_images": [mask(256, 384)],
                                   "mask": mask(256, 384), "inpaint_full_res": false}));
        assert_eq!(at_size.unwrap().resize_mode.a1111_index(), 3);
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
