//! The sd-webui-controlnet extension's preprocessors ("modules") this server runs, as its API
//! names and sets them: a unit's `module`, `processor_res`, `threshold_a`, `threshold_b` and
//! `pixel_perfect`, and `GET /controlnet/module_list`.
//!
//! A module is found by name or label, as `Preprocessor.get_preprocessor` (here without
//! case). Settings follow the unit's `bound_check_params`: -1 (the API's default) or a value
//! outside the preprocessor's slider is the slider's default; the thresholds are then truncated
//! to integers (`int(slider_1)`). `pixel_perfect` replaces the resolution by
//! `external_code.pixel_perfect_resolution` of the uploaded image and the request's size, kept
//! within 64..=2048 here (the native rule; the extension does not bound it).

use axum::extract::RawQuery;
use axum::Json;
use serde_json::{json, Map, Value};

use sdserve_pipeline::controlnet::preprocess::Preprocessor;

use crate::api::query_bool;
use crate::error::ApiError;
use crate::validate::preprocessor::{
    HIGH_DEFAULT, LOW_DEFAULT, RESOLUTION_DEFAULT, RESOLUTION_MAX, RESOLUTION_MIN, THRESHOLD_MAX,
    THRESHOLD_MIN,
};

/// A preprocessor's slider (`PreprocessorParameter.api_json`).
struct Slider {
    name: &'static str,
    value: u32,
    min: u32,
    max: u32,
    step: u32,
}

/// `Preprocessor.slider_resolution` (the class default every preprocessor here keeps).
const RESOLUTION: Slider = Slider {
    name: "Resolution",
    value: RESOLUTION_DEFAULT,
    min: RESOLUTION_MIN,
    max: RESOLUTION_MAX,
    step: 8,
};

/// One module: its name, UI label and visible sliders (resolution, slider 1, slider 2).
struct Module {
    name: &'static str,
    label: &'static str,
    sliders: [Option<Slider>; 3],
}

/// In `get_sorted_preprocessors` order: `none`, then by priority and label, descending.
const MODULES: [Module; 2] = [
    Module {
        name: "none",
        label: "none",
        sliders: [Some(RESOLUTION), None, None],
    },
    Module {
        name: "canny",
        label: "canny",
        sliders: [
            Some(RESOLUTION),
            Some(Slider {
                name: "Low Threshold",
                value: LOW_DEFAULT,
                min: THRESHOLD_MIN,
                max: THRESHOLD_MAX,
                step: 1,
            }),
            Some(Slider {
                name: "High Threshold",
                value: HIGH_DEFAULT,
                min: THRESHOLD_MIN,
                max: THRESHOLD_MAX,
                step: 1,
            }),
        ],
    },
];

fn find(module: &str) -> Option<&'static Module> {
    MODULES
        .iter()
        .find(|m| m.name.eq_ignore_ascii_case(module) || m.label.eq_ignore_ascii_case(module))
}

/// The names, for messages.
fn names() -> String {
    MODULES
        .iter()
        .map(|m| format!("{:?}", m.name))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A slider's value as the unit's `bound_check_params` sets it: absent, null, -1 or out of
/// range is the default. `key` names the field in errors.
fn slider(v: Option<&Value>, s: &Slider, key: &str) -> Result<f64, String> {
    let x = match v {
        None | Some(Value::Null) => -1.0,
        Some(v) => v
            .as_f64()
            .ok_or_else(|| format!("{key}: must be a number (-1 for the default)"))?,
    };
    Ok(if x < f64::from(s.min) || x > f64::from(s.max) {
        f64::from(s.value)
    } else {
        x
    })
}

/// The preprocessor of `module` with the A1111 settings (`None` for `none`); `prefix` is
/// prepended to the names in errors (`[0].` for a unit, `controlnet_` for `/detect`).
pub(super) fn preprocessor(
    module: &str,
    processor_res: Option<&Value>,
    threshold_a: Option<&Value>,
    threshold_b: Option<&Value>,
    prefix: &str,
) -> Result<Option<Preprocessor>, String> {
    let found = find(module).ok_or_else(|| {
        format!(
            "{prefix}module: the preprocessor {module:?} is not run here; one of {} (model-based ones such as depth, openpose, hed: send their map as the image with module \"none\")",
            names()
        )
    })?;
    let [res, a, b] = &found.sliders;
    let value = |v, s: &Option<Slider>, key: &str| -> Result<u32, String> {
        let s = s.as_ref().expect("the module's slider");
        // `int(...)`: pydantic's for the resolution, the preprocessor's for the thresholds.
        Ok(slider(v, s, &format!("{prefix}{key}"))?.trunc() as u32)
    };
    Ok(match found.name {
        "canny" => Some(Preprocessor::Canny {
            resolution: value(processor_res, res, "processor_res")?,
            low_threshold: value(threshold_a, a, "threshold_a")?,
            high_threshold: value(threshold_b, b, "threshold_b")?,
        }),
        _ => None,
    })
}

/// `external_code.pixel_perfect_resolution`: the resolution at which the map comes out at the
/// request's size (`k = max(h / H, w / W)`, `min` for `Resize and Fill`, times the image's
/// shorter side, `int(np.round(...))`), kept within the native 64..=2048.
pub(super) fn pixel_perfect_resolution(
    image: (u32, u32),
    target: (u64, u64),
    outer_fit: bool,
) -> u32 {
    let (raw_w, raw_h) = (f64::from(image.0), f64::from(image.1));
    let (k0, k1) = (target.1 as f64 / raw_h, target.0 as f64 / raw_w);
    let k = if outer_fit { k0.min(k1) } else { k0.max(k1) };
    let estimation = (k * raw_w.min(raw_h)).round_ties_even();
    estimation.clamp(f64::from(RESOLUTION_MIN), f64::from(RESOLUTION_MAX)) as u32
}

/// `p` at `resolution`.
pub(super) fn at_resolution(p: Preprocessor, resolution: u32) -> Preprocessor {
    match p {
        Preprocessor::Canny {
            low_threshold,
            high_threshold,
            ..
        } => Preprocessor::Canny {
            low_threshold,
            high_threshold,
            resolution,
        },
    }
}

/// `{"module_list": [...], "module_detail": {name: {model_free, sliders}}}`.
#[utoipa::path(get, path = "/controlnet/module_list", tag = "a1111",
    params(("alias_names" = Option<bool>, Query, description = "The UI labels instead of the names (the extension's parameter)")),
    responses((status = 200, description = "`{module_list, module_detail}`: the preprocessors this server runs (`none`: the image is the control map; `canny`), with the extension's sliders (`name`, `value`, `min`, `max`, `step`)"),
        (status = 422, description = "`alias_names` is not a boolean", body = crate::error::ErrorBody)))]
pub(super) async fn module_list(RawQuery(query): RawQuery) -> Result<Json<Value>, ApiError> {
    let alias_names = query_bool(query.as_deref(), "alias_names")?.unwrap_or(false);
    let name = |m: &Module| if alias_names { m.label } else { m.name };
    let mut detail = Map::new();
    for m in &MODULES {
        let sliders: Vec<Value> = m
            .sliders
            .iter()
            .flatten()
            .map(|s| json!({"name": s.name, "value": s.value, "min": s.min, "max": s.max, "step": s.step}))
            .collect();
        // `model_free` is the extension's `do_not_need_model`: false for these.
        detail.insert(
            name(m).into(),
            json!({"model_free": false, "sliders": sliders}),
        );
    }
    Ok(Json(json!({
        "module_list": MODULES.iter().map(name).collect::<Vec<_>>(),
        "module_detail": detail,
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_out_of_the_sliders_are_the_defaults_as_the_extension_s() {
        let canny = |res: Value, a: Value, b: Value| {
            preprocessor("Canny", Some(&res), Some(&a), Some(&b), "[0].").unwrap()
        };
        let p = |resolution, low_threshold, high_threshold| {
            Some(Preprocessor::Canny {
                low_threshold,
                high_threshold,
                resolution,
            })
        };
        assert_eq!(canny(json!(-1), json!(-1), json!(-1)), p(512, 100, 200));
        assert_eq!(canny(json!(768), json!(64), json!(64)), p(768, 64, 64));
        assert_eq!(canny(json!(4096), json!(0.5), json!(300)), p(512, 100, 200));
        assert_eq!(
            canny(json!(640.9), json!(20.7), json!(254.99)),
            p(640, 20, 254)
        );
        assert_eq!(preprocessor("none", None, None, None, "").unwrap(), None);
        let e = preprocessor("depth_midas", None, None, None, "[1].").unwrap_err();
        assert!(
            e.starts_with("[1].module: the preprocessor \"depth_midas\""),
            "{e}"
        );
        assert!(e.contains("\"none\", \"canny\""), "{e}");
        let e = preprocessor("canny", Some(&json!("x")), None, None, "[0].").unwrap_err();
        assert!(e.starts_with("[0].processor_res: must be a number"), "{e}");
    }

    #[test]
    fn pixel_perfect_is_the_extension_s_estimate() {
        // 1000x500 into 512x512: cover k = max(512/500, 512/1000) = 1.024, x 500 = 512.
        assert_eq!(
            pixel_perfect_resolution((1000, 500), (512, 512), false),
            512
        );
        // Fit: k = 0.512, x 500 = 256.
        assert_eq!(pixel_perfect_resolution((1000, 500), (512, 512), true), 256);
        // 300x200 into 768x512: k = max(2.56, 2.56), x 200 = 512.
        assert_eq!(pixel_perfect_resolution((300, 200), (768, 512), false), 512);
        // Beyond the native range: kept within it.
        assert_eq!(pixel_perfect_resolution((4000, 40), (512, 512), true), 64);
    }
}
