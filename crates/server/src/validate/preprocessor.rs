//! `controlnets[i].preprocessor`: a model-free preprocessor of the sd-webui-controlnet
//! extension (`sdserve_pipeline::controlnet::preprocess`), its settings in the ranges of the
//! extension's sliders (`PreprocessorCanny` and the other model-free classes, the legacy
//! modules' `slider_1`, the class's `slider_resolution`), and the run that turns the uploaded
//! image into the control map at validation; the model-based ones (HED, lineart, PiDiNet, TEED) take
//! their network from ANNOTATOR_DIR (`crate::annotators`).

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
/// The other modules' first sliders: (min, max, default).
pub const BINARY_THRESHOLD: (f64, f64, f64) = (0.0, 255.0, 127.0);
pub const XDOG_THRESHOLD: (f64, f64, f64) = (1.0, 64.0, 32.0);
pub const BLUR_SIGMA: (f64, f64, f64) = (0.01, 64.0, 9.0);
pub const TILE_RATE: (f64, f64, f64) = (1.0, 8.0, 1.0);
/// The legacy `mlsd`'s `slider_1` (MLSD Value Threshold) and `slider_2` (MLSD Distance
/// Threshold): (min, max, default).
pub const MLSD_VALUE: (f64, f64, f64) = (0.01, 2.0, 0.1);
pub const MLSD_DISTANCE: (f64, f64, f64) = (0.01, 20.0, 0.1);

/// softedge_teed's `Safe Steps` (`PreprocessorTEED.slider_1`, step 1).
pub const SAFE_STEPS: (f64, f64, f64) = (0.0, 10.0, 2.0);

/// The `type`s, for messages.
pub const TYPES: &str = "\"canny\", \"invert\", \"threshold\", \"lineart_standard\", \"scribble_xdog\", \"blur_gaussian\", \"tile_resample\", \"color\", \"shuffle\", \"softedge_hed\", \"softedge_hedsafe\", \"scribble_hed\", \"lineart_realistic\", \"lineart_coarse\", \"lineart_anime\", \"lineart_anime_denoise\", \"softedge_pidinet\", \"softedge_pidisafe\", \"scribble_pidinet\", \"softedge_teed\", \"mlsd\", \"none\"";

/// `preprocessor` of unit `i`: `None` when absent, null or `{"type": "none"}`; `numpy_seed`
/// is `shuffle`'s seed where it names none.
pub fn read(v: Option<&Value>, i: usize, numpy_seed: u32) -> Result<Option<Preprocessor>, String> {
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
        "none" | "invert" => &["type"],
        "canny" => &["type", "low_threshold", "high_threshold", "resolution"],
        "threshold" | "scribble_xdog" => &["type", "threshold", "resolution"],
        "lineart_standard" | "color" | "softedge_hed" | "softedge_hedsafe" | "scribble_hed"
        | "lineart_realistic" | "lineart_coarse" | "lineart_anime" | "lineart_anime_denoise"
        | "softedge_pidinet" | "softedge_pidisafe" | "scribble_pidinet" => &["type", "resolution"],
        "blur_gaussian" => &["type", "sigma", "resolution"],
        "tile_resample" => &["type", "down_sampling_rate"],
        "shuffle" => &["type", "seed", "resolution"],
        "softedge_teed" => &["type", "safe_steps", "resolution"],
        "mlsd" => &[
            "type",
            "value_threshold",
            "distance_threshold",
            "resolution",
        ],
        other => {
            return Err(format!(
                "{field}.type: {other:?} is not a preprocessor this server runs; one of {TYPES} (other model-based ones such as depth, openpose: send their map as the image)"
            ))
        }
    };
    if let Some(k) = obj.keys().find(|k| !keys.contains(&k.as_str())) {
        return Err(format!(
            "{field}: unknown key {k:?} for {kind:?} (its keys: {})",
            keys.join(", ")
        ));
    }
    let int = |key: &str, min: u32, max: u32, default: u32| match obj.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(v) => v
            .as_u64()
            .filter(|n| (u64::from(min)..=u64::from(max)).contains(n))
            .map(|n| n as u32)
            .ok_or_else(|| format!("{field}.{key}: must be an integer in {min}..={max}")),
    };
    let number = |key: &str, (min, max, default): (f64, f64, f64)| match obj.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(v) => v
            .as_f64()
            .filter(|x| (min..=max).contains(x))
            .ok_or_else(|| format!("{field}.{key}: must be a number in {min}..={max}")),
    };
    let resolution = || {
        int(
            "resolution",
            RESOLUTION_MIN,
            RESOLUTION_MAX,
            RESOLUTION_DEFAULT,
        )
    };
    // The extension's float sliders: the value kept as sent (only its integer part counts).
    let threshold = |slider: (f64, f64, f64)| number("threshold", slider);
    let canny_threshold = |key: &str, default: u32| {
        let (min, max) = (f64::from(THRESHOLD_MIN), f64::from(THRESHOLD_MAX));
        number(key, (min, max, f64::from(default)))
    };
    Ok(Some(match kind {
        "none" => return Ok(None),
        "canny" => Preprocessor::Canny {
            low_threshold: canny_threshold("low_threshold", LOW_DEFAULT)?,
            high_threshold: canny_threshold("high_threshold", HIGH_DEFAULT)?,
            resolution: resolution()?,
        },
        "invert" => Preprocessor::Invert,
        "threshold" => Preprocessor::Threshold {
            threshold: threshold(BINARY_THRESHOLD)?,
            resolution: resolution()?,
        },
        "lineart_standard" => Preprocessor::LineartStandard {
            resolution: resolution()?,
        },
        "scribble_xdog" => Preprocessor::ScribbleXdog {
            threshold: threshold(XDOG_THRESHOLD)?,
            resolution: resolution()?,
        },
        "color" => Preprocessor::Color {
            resolution: resolution()?,
        },
        "shuffle" => Preprocessor::Shuffle {
            resolution: resolution()?,
            seed: match obj.get("seed") {
                None | Some(Value::Null) => numpy_seed,
                Some(v) => v
                    .as_u64()
                    .and_then(|n| u32::try_from(n).ok())
                    .ok_or_else(|| format!("{field}.seed: must be an integer in 0..=4294967295"))?,
            },
        },
        "softedge_hed" => Preprocessor::SoftedgeHed {
            resolution: resolution()?,
        },
        "softedge_hedsafe" => Preprocessor::SoftedgeHedsafe {
            resolution: resolution()?,
        },
        "scribble_hed" => Preprocessor::ScribbleHed {
            resolution: resolution()?,
        },
        "lineart_realistic" => Preprocessor::LineartRealistic {
            resolution: resolution()?,
        },
        "lineart_coarse" => Preprocessor::LineartCoarse {
            resolution: resolution()?,
        },
        "lineart_anime" => Preprocessor::LineartAnime {
            resolution: resolution()?,
        },
        "lineart_anime_denoise" => Preprocessor::LineartAnimeDenoise {
            resolution: resolution()?,
        },
        "softedge_pidinet" => Preprocessor::SoftedgePidinet {
            resolution: resolution()?,
        },
        "softedge_pidisafe" => Preprocessor::SoftedgePidisafe {
            resolution: resolution()?,
        },
        "scribble_pidinet" => Preprocessor::ScribblePidinet {
            resolution: resolution()?,
        },
        "softedge_teed" => Preprocessor::SoftedgeTeed {
            safe_steps: number("safe_steps", SAFE_STEPS)?,
            resolution: resolution()?,
        },
        "mlsd" => Preprocessor::Mlsd {
            value_threshold: number("value_threshold", MLSD_VALUE)?,
            distance_threshold: number("distance_threshold", MLSD_DISTANCE)?,
            resolution: resolution()?,
        },
        "blur_gaussian" => Preprocessor::BlurGaussian {
            sigma: number("sigma", BLUR_SIGMA)?,
            resolution: resolution()?,
        },
        _ => Preprocessor::TileResample {
            down_sampling_rate: number("down_sampling_rate", TILE_RATE)?,
        },
    }))
}

/// The control map of unit `i`'s `image`; the image scaled to the processor resolution must
/// keep the request image rule (the extension has none: a long thin image would be huge), and
/// tile_resample's shrink must leave a pixel a side (OpenCV refuses an empty size); a
/// model-based module needs its file in ANNOTATOR_DIR (`[i].preprocessor.type` names both).
pub fn run(p: &Preprocessor, image: &RgbImage, i: usize) -> Result<RgbImage, String> {
    let (w, h) = p.map_size(image.width, image.height);
    if let Preprocessor::TileResample { down_sampling_rate } = p {
        if w == 0 || h == 0 {
            return Err(format!(
                "[{i}].preprocessor.down_sampling_rate: the {}x{} image shrunk by {down_sampling_rate} has no pixels (int(side / rate) is 0)",
                image.width, image.height
            ));
        }
    }
    if let Some(resolution) = p.resolution() {
        let checked = match (u32::try_from(w), u32::try_from(h)) {
            (Ok(w), Ok(h)) => crate::images::check_dimensions(w, h),
            _ => Err("is too large".into()),
        };
        if let Err(why) = checked {
            return Err(format!(
                "[{i}].preprocessor.resolution: the {}x{} image scaled to {resolution} on its shorter side {why}",
                image.width, image.height
            ));
        }
    }
    p.run_with(image, crate::annotators::AnnotatorStore::shared())
        .map_err(|e| {
            let why = match e {
                sdserve_pipeline::PipelineError::InvalidRequest(why) => why,
                other => other.to_string(),
            };
            format!("[{i}].preprocessor.type: {:?} {why}", p.module())
        })
}

/// The metadata's and the wire's form, every setting written.
pub fn described(p: &Preprocessor) -> ControlNetPreprocessor {
    let base = |kind| ControlNetPreprocessor {
        kind,
        low_threshold: None,
        high_threshold: None,
        resolution: p.resolution(),
        threshold: None,
        sigma: None,
        down_sampling_rate: None,
        value_threshold: None,
        distance_threshold: None,
        seed: None,
        safe_steps: None,
    };
    match *p {
        Preprocessor::Canny {
            low_threshold,
            high_threshold,
            ..
        } => ControlNetPreprocessor {
            low_threshold: Some(low_threshold),
            high_threshold: Some(high_threshold),
            ..base(PreprocessorType::Canny)
        },
        Preprocessor::Invert => base(PreprocessorType::Invert),
        Preprocessor::Threshold { threshold, .. } => ControlNetPreprocessor {
            threshold: Some(threshold),
            ..base(PreprocessorType::Threshold)
        },
        Preprocessor::LineartStandard { .. } => base(PreprocessorType::LineartStandard),
        Preprocessor::Color { .. } => base(PreprocessorType::Color),
        Preprocessor::Shuffle { seed, .. } => ControlNetPreprocessor {
            seed: Some(seed),
            ..base(PreprocessorType::Shuffle)
        },
        Preprocessor::ScribbleXdog { threshold, .. } => ControlNetPreprocessor {
            threshold: Some(threshold),
            ..base(PreprocessorType::ScribbleXdog)
        },
        Preprocessor::BlurGaussian { sigma, .. } => ControlNetPreprocessor {
            sigma: Some(sigma),
            ..base(PreprocessorType::BlurGaussian)
        },
        Preprocessor::TileResample { down_sampling_rate } => ControlNetPreprocessor {
            down_sampling_rate: Some(down_sampling_rate),
            ..base(PreprocessorType::TileResample)
        },
        Preprocessor::SoftedgeHed { .. } => base(PreprocessorType::SoftedgeHed),
        Preprocessor::SoftedgeHedsafe { .. } => base(PreprocessorType::SoftedgeHedsafe),
        Preprocessor::ScribbleHed { .. } => base(PreprocessorType::ScribbleHed),
        Preprocessor::LineartRealistic { .. } => base(PreprocessorType::LineartRealistic),
        Preprocessor::LineartCoarse { .. } => base(PreprocessorType::LineartCoarse),
        Preprocessor::LineartAnime { .. } => base(PreprocessorType::LineartAnime),
        Preprocessor::LineartAnimeDenoise { .. } => base(PreprocessorType::LineartAnimeDenoise),
        Preprocessor::SoftedgePidinet { .. } => base(PreprocessorType::SoftedgePidinet),
        Preprocessor::SoftedgePidisafe { .. } => base(PreprocessorType::SoftedgePidisafe),
        Preprocessor::ScribblePidinet { .. } => base(PreprocessorType::ScribblePidinet),
        Preprocessor::SoftedgeTeed { safe_steps, .. } => ControlNetPreprocessor {
            safe_steps: Some(safe_steps),
            ..base(PreprocessorType::SoftedgeTeed)
        },
        Preprocessor::Mlsd {
            value_threshold,
            distance_threshold,
            ..
        } => ControlNetPreprocessor {
            value_threshold: Some(value_threshold),
            distance_threshold: Some(distance_threshold),
            ..base(PreprocessorType::Mlsd)
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn settings_default_as_the_extension_s_sliders_and_are_checked() {
        let canny = |v: Value| read(Some(&v), 0, 0);
        assert_eq!(
            canny(json!({"type": "canny"})).unwrap(),
            Some(Preprocessor::Canny {
                low_threshold: 100.0,
                high_threshold: 200.0,
                resolution: 512
            })
        );
        assert_eq!(canny(json!({"type": "none"})).unwrap(), None);
        assert_eq!(read(None, 0, 0).unwrap(), None);
        for (v, needle) in [
            (json!({"type": "depth"}), "[0].preprocessor.type: \"depth\""),
            (json!({}), "[0].preprocessor.type"),
            (
                json!({"type": "canny", "low_threshold": 0}),
                "low_threshold: must be a number in 1..=255",
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
        // A fraction is kept, as the extension's slider keeps it.
        let p = canny(json!({"type": "canny", "low_threshold": 7.5}))
            .unwrap()
            .unwrap();
        let described = serde_json::to_value(described(&p)).unwrap();
        assert_eq!(
            described,
            json!({"type": "canny", "low_threshold": 7.5, "high_threshold": 200.0, "resolution": 512})
        );
        assert_eq!(read(Some(&described), 0, 0).unwrap(), Some(p));
    }

    #[test]
    fn the_other_modules_read_their_settings_and_describe_themselves_back() {
        let read1 = |v: Value| read(Some(&v), 2, 99);
        for (v, want) in [
            (json!({"type": "invert"}), Preprocessor::Invert),
            (
                json!({"type": "threshold"}),
                Preprocessor::Threshold {
                    threshold: 127.0,
                    resolution: 512,
                },
            ),
            (
                json!({"type": "threshold", "threshold": 127.5, "resolution": 64}),
                Preprocessor::Threshold {
                    threshold: 127.5,
                    resolution: 64,
                },
            ),
            (
                json!({"type": "scribble_xdog", "threshold": 64}),
                Preprocessor::ScribbleXdog {
                    threshold: 64.0,
                    resolution: 512,
                },
            ),
            (
                json!({"type": "lineart_standard", "resolution": 768}),
                Preprocessor::LineartStandard { resolution: 768 },
            ),
            (
                json!({"type": "blur_gaussian", "sigma": 0.01}),
                Preprocessor::BlurGaussian {
                    sigma: 0.01,
                    resolution: 512,
                },
            ),
            (
                json!({"type": "tile_resample", "down_sampling_rate": 2.5}),
                Preprocessor::TileResample {
                    down_sampling_rate: 2.5,
                },
            ),
            (
                json!({"type": "color", "resolution": 64}),
                Preprocessor::Color { resolution: 64 },
            ),
            (
                json!({"type": "lineart_realistic"}),
                Preprocessor::LineartRealistic { resolution: 512 },
            ),
            (
                json!({"type": "lineart_coarse", "resolution": 640}),
                Preprocessor::LineartCoarse { resolution: 640 },
            ),
            (
                json!({"type": "lineart_anime", "resolution": 64}),
                Preprocessor::LineartAnime { resolution: 64 },
            ),
            (
                json!({"type": "lineart_anime_denoise", "resolution": 96}),
                Preprocessor::LineartAnimeDenoise { resolution: 96 },
            ),
            (
                json!({"type": "softedge_pidinet"}),
                Preprocessor::SoftedgePidinet { resolution: 512 },
            ),
            (
                json!({"type": "softedge_pidisafe", "resolution": 640}),
                Preprocessor::SoftedgePidisafe { resolution: 640 },
            ),
            (
                json!({"type": "scribble_pidinet", "resolution": 64}),
                Preprocessor::ScribblePidinet { resolution: 64 },
            ),
            (
                json!({"type": "mlsd"}),
                Preprocessor::Mlsd {
                    value_threshold: 0.1,
                    distance_threshold: 0.1,
                    resolution: 512,
                },
            ),
            (
                json!({"type": "mlsd", "value_threshold": 0.27, "distance_threshold": 7.5, "resolution": 640}),
                Preprocessor::Mlsd {
                    value_threshold: 0.27,
                    distance_threshold: 7.5,
                    resolution: 640,
                },
            ),
            // The request's seed where the unit names none.
            (
                json!({"type": "shuffle"}),
                Preprocessor::Shuffle {
                    resolution: 512,
                    seed: 99,
                },
            ),
            (
                json!({"type": "shuffle", "seed": 4294967295_u32, "resolution": 256}),
                Preprocessor::Shuffle {
                    resolution: 256,
                    seed: u32::MAX,
                },
            ),
        ] {
            let got = read1(v.clone()).unwrap().unwrap();
            assert_eq!(got, want, "{v}");
            let back = serde_json::to_value(described(&got)).unwrap();
            assert_eq!(read1(back).unwrap(), Some(got), "{v}");
        }
        assert_eq!(
            serde_json::to_value(described(&Preprocessor::BlurGaussian {
                sigma: 2.5,
                resolution: 64
            }))
            .unwrap(),
            json!({"type": "blur_gaussian", "sigma": 2.5, "resolution": 64})
        );
        for (v, needle) in [
            (
                json!({"type": "threshold", "threshold": 256}),
                "[2].preprocessor.threshold: must be a number in 0..=255",
            ),
            (
                json!({"type": "scribble_xdog", "threshold": 0}),
                "[2].preprocessor.threshold: must be a number in 1..=64",
            ),
            (
                json!({"type": "blur_gaussian", "sigma": 0}),
                "[2].preprocessor.sigma: must be a number in 0.01..=64",
            ),
            (
                json!({"type": "tile_resample", "down_sampling_rate": 8.5}),
                "[2].preprocessor.down_sampling_rate: must be a number in 1..=8",
            ),
            (
                json!({"type": "mlsd", "value_threshold": 0}),
                "[2].preprocessor.value_threshold: must be a number in 0.01..=2",
            ),
            (
                json!({"type": "mlsd", "distance_threshold": 20.5}),
                "[2].preprocessor.distance_threshold: must be a number in 0.01..=20",
            ),
            (
                json!({"type": "tile_resample", "resolution": 512}),
                "unknown key \"resolution\" for \"tile_resample\"",
            ),
            (json!({"type": "invert", "threshold": 1}), "unknown key"),
            (
                json!({"type": "shuffle", "seed": 4294967296_u64}),
                "[2].preprocessor.seed: must be an integer in 0..=4294967295",
            ),
            (
                json!({"type": "shuffle", "seed": -1}),
                "[2].preprocessor.seed: must be an integer",
            ),
            (
                json!({"type": "color", "resolution": 63}),
                "[2].preprocessor.resolution: must be an integer in 64..=2048",
            ),
            (
                json!({"type": "lineart_anime", "resolution": 2056}),
                "[2].preprocessor.resolution: must be an integer in 64..=2048",
            ),
            (
                json!({"type": "lineart_anime_denoise", "resolution": 32}),
                "[2].preprocessor.resolution: must be an integer in 64..=2048",
            ),
            (
                json!({"type": "lineart_anime_denoise", "sigma": 2}),
                "unknown key \"sigma\" for \"lineart_anime_denoise\"",
            ),
            (
                json!({"type": "lineart_coarse", "threshold": 10}),
                "unknown key \"threshold\" for \"lineart_coarse\"",
            ),
            (
                json!({"type": "recolor_luminance"}),
                "is not a preprocessor this server runs",
            ),
        ] {
            let e = read1(v).unwrap_err();
            assert!(e.contains(needle), "{needle}: {e}");
        }
        // A side shorter than the rate shrinks to nothing: refused, not OpenCV's error.
        let tiny = RgbImage {
            width: 30,
            height: 3,
            pixels: vec![5; 30 * 3 * 3],
        };
        let rate = |r| Preprocessor::TileResample {
            down_sampling_rate: r,
        };
        let e = run(&rate(4.0), &tiny, 0).unwrap_err();
        assert!(e.starts_with("[0].preprocessor.down_sampling_rate"), "{e}");
        assert_eq!(run(&rate(3.0), &tiny, 0).unwrap().width, 10);
        assert_eq!(run(&Preprocessor::Invert, &tiny, 0).unwrap().pixels[0], 250);
    }

    #[test]
    fn a_long_thin_image_at_a_high_resolution_is_refused() {
        let p = Preprocessor::Canny {
            low_threshold: 100.0,
            high_threshold: 200.0,
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
