//! `controlnets[i].preprocessor`: a model-free preprocessor of the sd-webui-controlnet
//! extension (`sdserve_pipeline::controlnet::preprocess`), its settings in the ranges of the
//! extension's sliders (`PreprocessorCanny`, the class's `slider_resolution`), and the run that
//! turns the uploaded image into the control map at validation.

use serde_json::Value;

use sdserve_pipeline::controlnet::preprocess::Preprocessor;
use sdserve_pipeline::pipeline::RgbImage;

use crate::api::{ControlNetPreprocessor, PreprocessorType};

/// The processor resolution's slider: 64..=2048, 512.
pub const RESOLUTION_MIN: u32 = 64;
pub const RESOLUTION_MAX: u32 = 2048;
pub const RESOLUTION_DEFAULT: u32 = 512;
/// Canny's threshold sliders: 1..=255, 100 (low) and 200 (high).
pub const THRESHOLD_MIN: u32 = 1;
pub const THRESHOLD_MAX: u32 = 255;
pub const LOW_DEFAULT: u32 = 100;
pub const HIGH_DEFAULT: u32 = 200;

/// The `type`s, for messages.
pub const TYPES: &str = "\"canny\", \"none\"";

/// `preprocessor` of unit `i`: `None` when absent, null or `{"type": "none"}`.
pub fn read(v: Option<&Value>, i: usize) -> Result<Option<Preprocessor>, String> {
    let field = format!("[{i}].preprocessor");
    let obj = match v {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Object(o)) => o,
        Some(_) => {
            return Err(format!(
                "{field}: must be an object {{\"type\": {TYPES}, ...}} or null"
            ))
        }
    };
    let kind = obj.get("type").and_then(Value::as_str).unwrap_or_default();
    let keys: &[&str] = match kind {
        "none" => &["type"],
        "canny" => &["type", "low_threshold", "high_threshold", "resolution"],
        other => {
            return Err(format!(
                "{field}.type: {other:?} is not a preprocessor this server runs; one of {TYPES} (model-based ones such as depth, openpose, hed: send their map as the image)"
            ))
        }
    };
    if let Some(k) = obj.keys().find(|k| !keys.contains(&k.as_str())) {
        return Err(format!(
            "{field}: unknown key {k:?} for {kind:?} (its keys: {})",
            keys.join(", ")
        ));
    }
    if kind == "none" {
        return Ok(None);
    }
    let int = |key: &str, min: u32, max: u32, default: u32| match obj.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(v) => v
            .as_u64()
            .filter(|n| (u64::from(min)..=u64::from(max)).contains(n))
            .map(|n| n as u32)
            .ok_or_else(|| format!("{field}.{key}: must be an integer in {min}..={max}")),
    };
    Ok(Some(Preprocessor::Canny {
        low_threshold: int("low_threshold", THRESHOLD_MIN, THRESHOLD_MAX, LOW_DEFAULT)?,
        high_threshold: int("high_threshold", THRESHOLD_MIN, THRESHOLD_MAX, HIGH_DEFAULT)?,
        resolution: int(
            "resolution",
            RESOLUTION_MIN,
            RESOLUTION_MAX,
            RESOLUTION_DEFAULT,
        )?,
    }))
}

/// The control map of unit `i`'s `image`; the image scaled to the processor resolution must
/// keep the request image rule (the extension has none: a long thin image would be huge).
pub fn run(p: &Preprocessor, image: &RgbImage, i: usize) -> Result<RgbImage, String> {
    let resolution = p.resolution();
    let (w, h) = (f64::from(image.width), f64::from(image.height));
    let k = f64::from(resolution) / w.min(h);
    let (sw, sh) = ((w * k).round_ties_even(), (h * k).round_ties_even());
    let checked = if sw <= f64::from(u32::MAX) && sh <= f64::from(u32::MAX) {
        crate::images::check_dimensions(sw as u32, sh as u32)
    } else {
        Err("is too large".into())
    };
    if let Err(why) = checked {
        return Err(format!(
            "[{i}].preprocessor.resolution: the {}x{} image scaled to {resolution} on its shorter side {why}",
            image.width, image.height
        ));
    }
    Ok(p.run(image))
}

/// The metadata's and the wire's form, every setting written.
pub fn described(p: &Preprocessor) -> ControlNetPreprocessor {
    match *p {
        Preprocessor::Canny {
            low_threshold,
            high_threshold,
            resolution,
        } => ControlNetPreprocessor {
            kind: PreprocessorType::Canny,
            low_threshold: Some(low_threshold),
            high_threshold: Some(high_threshold),
            resolution: Some(resolution),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn settings_default_as_the_extension_s_sliders_and_are_checked() {
        let canny = |v: Value| read(Some(&v), 0);
        assert_eq!(
            canny(json!({"type": "canny"})).unwrap(),
            Some(Preprocessor::Canny {
                low_threshold: 100,
                high_threshold: 200,
                resolution: 512
            })
        );
        assert_eq!(canny(json!({"type": "none"})).unwrap(), None);
        assert_eq!(read(None, 0).unwrap(), None);
        for (v, needle) in [
            (json!({"type": "depth"}), "[0].preprocessor.type: \"depth\""),
            (json!({}), "[0].preprocessor.type"),
            (
                json!({"type": "canny", "low_threshold": 0}),
                "low_threshold: must be an integer in 1..=255",
            ),
            (
                json!({"type": "canny", "high_threshold": 256}),
                "high_threshold",
            ),
            (
                json!({"type": "canny", "resolution": 63}),
                "resolution: must be an integer in 64..=2048",
            ),
            (json!({"type": "canny", "resolution": 512.5}), "resolution"),
            (json!({"type": "none", "resolution": 512}), "unknown key"),
            (json!("canny"), "must be an object"),
        ] {
            let e = canny(v).unwrap_err();
            assert!(e.contains(needle), "{needle}: {e}");
        }
        let p = canny(json!({"type": "canny", "low_threshold": 7}))
            .unwrap()
            .unwrap();
        let described = serde_json::to_value(described(&p)).unwrap();
        assert_eq!(
            described,
            json!({"type": "canny", "low_threshold": 7, "high_threshold": 200, "resolution": 512})
        );
        assert_eq!(read(Some(&described), 0).unwrap(), Some(p));
    }

    #[test]
    fn a_long_thin_image_at_a_high_resolution_is_refused() {
        let p = Preprocessor::Canny {
            low_threshold: 100,
            high_threshold: 200,
            resolution: 2048,
        };
        let thin = RgbImage {
            width: 3000,
            height: 10,
            pixels: vec![0; 3000 * 10 * 3],
        };
        let e = run(&p, &thin, 1).unwrap_err();
        assert!(
            e.starts_with("[1].preprocessor.resolution: the 3000x10 image"),
            "{e}"
        );
        let small = RgbImage {
            width: 30,
            height: 20,
            pixels: vec![9; 30 * 20 * 3],
        };
        let map = run(&p, &small, 0).unwrap();
        assert_eq!((map.width, map.height), (3072, 2048));
    }
}
