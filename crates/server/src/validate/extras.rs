//! The rules of A1111's Extras (`POST /sdapi/v1/extra-single-image`, `extra-batch-images`):
//! its `ExtrasBaseRequest` fields (modules/api/models.py) with A1111's defaults, our upscalers
//! (A1111's built-in ones and UPSCALERS_DIR's ESRGAN models), and the size of what an upscale
//! may make (a model's rounds included: a 4x model asked for 8x makes 16x before its resize).
//!
//! A1111 has no cap on the result; here it is held to the size of the images requests may
//! send (4096 px a side, 16 MP): a result can be sent back as an init image or upscaled again,
//! and one upscale stays within a few CPU-seconds and ~50 MB a buffer. A batch makes at most
//! [`BATCH_MAX_PIXELS`] in all, which bounds the answer's memory.

use std::sync::Arc;

use candle_core::{DType, Device};
use sdserve_pipeline::upscale::{ExtrasUpscale, ImageUpscaler, ModelUpscaler, UpscaleTarget};
use serde_json::{Map, Value};

use super::fields::FieldReader;
use crate::error::ApiError;
use crate::images::{MAX_PIXELS, MAX_SIDE};
use crate::upscalers::NetworkCache;

/// The fields of A1111's `ExtrasBaseRequest`; others are ignored, as A1111's pydantic model
/// ignores them (`image` and `imageList` are the routes' own).
pub const FIELDS: [&str; 13] = [
    "resize_mode",
    "show_extras_results",
    "gfpgan_visibility",
    "codeformer_visibility",
    "codeformer_weight",
    "upscaling_resize",
    "upscaling_resize_w",
    "upscaling_resize_h",
    "upscaling_crop",
    "upscaler_1",
    "upscaler_2",
    "extras_upscaler_2_visibility",
    "upscale_first",
];

/// A1111's built-in upscalers, by the names `GET /sdapi/v1/upscalers` lists.
pub const UPSCALERS: [(&str, Option<ImageUpscaler>); 3] = [
    ("None", None),
    ("Lanczos", Some(ImageUpscaler::Lanczos)),
    ("Nearest", Some(ImageUpscaler::Nearest)),
];

/// Images in one `extra-batch-images` request.
pub const BATCH_MAX_IMAGES: usize = 64;
/// Pixels all results of one `extra-batch-images` request may hold together (64 MP).
pub const BATCH_MAX_PIXELS: u64 = 4 * MAX_PIXELS;

/// Reads an Extras body (its `ExtrasBaseRequest` fields; `null` is the default); `models` are
/// UPSCALERS_DIR's (not read yet: [`load_models`]). Every broken field is named in one 422.
pub fn validate_extras(
    body: &Map<String, Value>,
    models: &[crate::upscalers::UpscalerEntry],
) -> Result<ExtrasUpscale, ApiError> {
    let known: Map<String, Value> = body
        .iter()
        .filter(|(k, _)| FIELDS.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let mut r = FieldReader::new(&known, &FIELDS);
    let resize_mode = r.int("resize_mode", 0, 1).unwrap_or(0);
    let by = r
        .with("upscaling_resize", |v| {
            let rule = "must be a number above 0 (the factor, with resize_mode 0)";
            match v.as_f64() {
                Some(f) if f > 0.0 && f.is_finite() => Ok(f),
                _ => Err(format!("{rule} (got {v})")),
            }
        })
        .unwrap_or(2.0);
    let side = MAX_SIDE as u64;
    let w = r.int("upscaling_resize_w", 1, side).unwrap_or(512) as u32;
    let h = r.int("upscaling_resize_h", 1, side).unwrap_or(512) as u32;
    let crop = r.with("upscaling_crop", bool_rule).unwrap_or(true);
    for field in ["show_extras_results", "upscale_first"] {
        r.with(field, bool_rule);
    }
    if r.number("gfpgan_visibility", 0.0, 1.0)
        .is_some_and(|v| v > 0.0)
    {
        r.fail(
            "gfpgan_visibility",
            "must be 0: GFPGAN does not run here (CodeFormer does: codeformer_visibility)",
        );
    }
    r.number("codeformer_visibility", 0.0, 1.0);
    r.number("codeformer_weight", 0.0, 1.0);
    // Built-ins by index, then the models (the index past them).
    let options: Vec<(&str, usize)> = UPSCALERS
        .iter()
        .map(|(n, _)| *n)
        .chain(models.iter().map(|m| m.name.as_str()))
        .enumerate()
        .map(|(i, n)| (n, i))
        .collect();
    let pick = |i: usize| -> Option<ImageUpscaler> {
        match UPSCALERS.get(i) {
            Some((_, builtin)) => builtin.clone(),
            None => {
                let m = &models[i - UPSCALERS.len()];
                Some(ImageUpscaler::Model(Arc::new(ModelUpscaler::new(
                    &m.name, &m.path,
                ))))
            }
        }
    };
    let first = r.choice("upscaler_1", &options).and_then(pick);
    let second = r.choice("upscaler_2", &options).and_then(pick);
    let visibility = r
        .number("extras_upscaler_2_visibility", 0.0, 1.0)
        .unwrap_or(0.0);
    r.finish()?;
    let target = if resize_mode == 1 {
        UpscaleTarget::To {
            width: w,
            height: h,
            crop,
        }
    } else {
        UpscaleTarget::By(by)
    };
    Ok(ExtrasUpscale {
        target,
        upscaler: first,
        second: second.map(|u| (u, visibility)),
    })
}

/// Extras' CodeFormer (A1111's `postprocessing_codeformer.py`, after the upscale): the
/// restored image blended over the upscaled one by `visibility` (Pillow's `Image.blend`
/// below 1), at `weight`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ExtrasCodeFormer {
    pub visibility: f64,
    pub weight: f64,
}

/// The request's CodeFormer step, `None` at visibility 0 (A1111's defaults: visibility 0,
/// weight 0). The body passed [`validate_extras`], which checked both numbers.
pub fn codeformer(body: &Map<String, Value>) -> Option<ExtrasCodeFormer> {
    let number = |f: &str| body.get(f).and_then(Value::as_f64).unwrap_or(0.0);
    let visibility = number("codeformer_visibility");
    (visibility > 0.0).then(|| ExtrasCodeFormer {
        visibility,
        weight: number("codeformer_weight"),
    })
}

fn bool_rule(v: &Value) -> Result<bool, String> {
    v.as_bool().ok_or_else(|| "must be true or false".into())
}

/// Reads the request's models (blocking) through the process's [`NetworkCache`] (on the CPU
/// in f32: Extras runs beside the worker, outside its queue and memory plan) and hands them
/// over to `spec`; a file of no supported architecture is a 422 naming the field and the file.
pub fn load_models(spec: &mut ExtrasUpscale) -> Result<(), ApiError> {
    let second_runs = spec.second.as_ref().is_some_and(|(_, v)| *v > 0.0);
    let mut r = Vec::new();
    let slots = [
        ("upscaler_1", spec.upscaler.as_mut()),
        (
            "upscaler_2",
            spec.second.as_mut().filter(|_| second_runs).map(|(u, _)| u),
        ),
    ];
    for (field, upscaler) in slots {
        let Some(ImageUpscaler::Model(m)) = upscaler else {
            continue;
        };
        match NetworkCache::shared().get(&m.path, &Device::Cpu, DType::F32) {
            Ok(net) => {
                *m = Arc::new(ModelUpscaler::with_network(m.name.clone(), &m.path, net));
            }
            Err(why) => r.push(crate::error::FieldError {
                field: field.into(),
                rule: format!("names {:?}, which cannot be used: {why}", m.name),
            }),
        }
    }
    if r.is_empty() {
        Ok(())
    } else {
        Err(ApiError::Validation(r))
    }
}

/// The field an upscale's size comes from, for its errors.
fn size_field(spec: &ExtrasUpscale) -> &'static str {
    match spec.target {
        UpscaleTarget::By(_) => "upscaling_resize",
        UpscaleTarget::To { .. } => "upscaling_resize_w",
    }
}

/// Checks what upscaling a `width` x `height` image makes, before any pixel is touched; the
/// result's pixels. `image` names the image in the error (`image`, `imageList[2].data`).
pub fn check_size(
    spec: &ExtrasUpscale,
    width: u32,
    height: u32,
    image: &str,
) -> Result<u64, ApiError> {
    let (largest, result) = spec.sizes(width, height);
    let field = size_field(spec);
    if result.0 == 0 || result.1 == 0 {
        return Err(ApiError::validation(
            field,
            format!(
                "makes nothing of the {width}x{height} {image}: the upscaled sides are floored \
                 to a multiple of 8, so each must come to at least 8 pixels"
            ),
        ));
    }
    for (what, (w, h)) in [("the upscaled image", largest), ("the result", result)] {
        if w > MAX_SIDE as usize || h > MAX_SIDE as usize || (w as u64) * (h as u64) > MAX_PIXELS {
            return Err(ApiError::validation(
                field,
                format!(
                    "makes {what} {w}x{h} of the {width}x{height} {image}; at most {MAX_SIDE} \
                     pixels a side and {} MP are made",
                    MAX_PIXELS >> 20
                ),
            ));
        }
    }
    Ok(result.0 as u64 * result.1 as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec(body: Value) -> Result<ExtrasUpscale, ApiError> {
        validate_extras(body.as_object().unwrap(), &[])
    }

    fn fields(e: ApiError) -> Vec<String> {
        e.fields().iter().map(|f| f.field.clone()).collect()
    }

    #[test]
    fn a1111s_defaults_and_what_webuiapi_sends() {
        // ExtrasBaseRequest's defaults: upscale by 2 with no upscaler (nothing happens).
        let s = spec(json!({})).unwrap();
        assert_eq!(s.target, UpscaleTarget::By(2.0));
        assert_eq!((s.upscaler, s.second), (None, None));
        let s = spec(
            json!({"resize_mode": 1, "show_extras_results": true, "gfpgan_visibility": 0,
            "codeformer_visibility": 0, "codeformer_weight": 0, "upscaling_resize": 2,
            "upscaling_resize_w": 300, "upscaling_resize_h": 200, "upscaling_crop": false,
            "upscaler_1": "Lanczos", "upscaler_2": "Nearest", "extras_upscaler_2_visibility": 0.4,
            "upscale_first": false, "image": "...", "something_else": 1}),
        )
        .unwrap();
        assert_eq!(
            s.target,
            UpscaleTarget::To {
                width: 300,
                height: 200,
                crop: false
            }
        );
        assert_eq!(s.upscaler, Some(ImageUpscaler::Lanczos));
        assert_eq!(s.second, Some((ImageUpscaler::Nearest, 0.4)));
        // Nulls are the defaults.
        assert_eq!(
            spec(json!({"upscaler_1": null, "upscaling_resize": null})).unwrap(),
            spec(json!({})).unwrap()
        );
    }

    #[test]
    fn broken_fields_are_named_together() {
        let e = spec(
            json!({"upscaler_1": "R-ESRGAN 4x+", "gfpgan_visibility": 0.5,
            "codeformer_visibility": 2, "resize_mode": 2, "upscaling_resize": 0,
            "upscaling_resize_w": 5000, "upscaling_crop": "yes",
            "extras_upscaler_2_visibility": -1}),
        )
        .unwrap_err();
        let mut got = fields(e);
        got.sort();
        assert_eq!(
            got,
            [
                "codeformer_visibility",
                "extras_upscaler_2_visibility",
                "gfpgan_visibility",
                "resize_mode",
                "upscaler_1",
                "upscaling_crop",
                "upscaling_resize",
                "upscaling_resize_w"
            ]
        );
        let e = spec(json!({"upscaler_2": "ESRGAN_4x"})).unwrap_err();
        let rule = &e.fields()[0].rule;
        assert!(rule.contains("None, Lanczos, Nearest"), "{rule}");
    }

    #[test]
    fn the_upscalers_are_those_get_upscalers_lists() {
        let listed: Vec<&str> = crate::validate::hires::IMAGE_UPSCALERS
            .iter()
            .map(|(n, _)| *n)
            .collect();
        let ours: Vec<&str> = UPSCALERS.iter().map(|(n, _)| *n).collect();
        assert_eq!(ours, listed);
    }

    #[test]
    fn sizes_are_checked_before_any_pixel() {
        let by = |s: f64| ExtrasUpscale {
            target: UpscaleTarget::By(s),
            upscaler: Some(ImageUpscaler::Lanczos),
            second: None,
        };
        assert_eq!(
            check_size(&by(2.0), 512, 512, "image").unwrap(),
            1024 * 1024
        );
        assert_eq!(
            check_size(&by(8.0), 512, 512, "image").unwrap(),
            4096 * 4096
        );
        let e = check_size(&by(8.1), 512, 512, "image").unwrap_err();
        assert_eq!(fields(e), ["upscaling_resize"]);
        // Below 8 pixels a side after the upscale: nothing would be made.
        let e = check_size(&by(0.1), 60, 512, "imageList[1].data").unwrap_err();
        assert!(e.fields()[0].rule.contains("imageList[1].data"));
        // Scale to a size: the cover may be far larger than the crop.
        let to = ExtrasUpscale {
            target: UpscaleTarget::To {
                width: 512,
                height: 512,
                crop: true,
            },
            upscaler: Some(ImageUpscaler::Nearest),
            second: None,
        };
        let e = check_size(&to, 4096, 16, "image").unwrap_err();
        assert_eq!(fields(e), ["upscaling_resize_w"]);
        // No upscaler: the image as it is.
        let none = ExtrasUpscale {
            upscaler: None,
            ..by(100.0)
        };
        assert_eq!(check_size(&none, 33, 20, "image").unwrap(), 660);
    }
}
