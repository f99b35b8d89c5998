//! `controlnets[i].preprocessor`: a model-free preprocessor of the sd-webui-controlnet
//! extension (`sdserve_pipeline::controlnet::preprocess`), its settings in the ranges of the
//! extension's sliders (`PreprocessorCanny` and the other model-free classes, the legacy
//! modules' `slider_1`, the class's `slider_resolution`), and the run that turns the uploaded
//! image into the control map at validation; the model-based ones (HED, lineart, PiDiNet, TEED,
//! Anyline) take
//! their network from ANNOTATOR_DIR (`crate::annotators`).

use serde_json::Value;

use sdserve_pipeline::controlnet::preprocess::{Poses, Preprocessor};
use sdserve_pipeline::controlnet::ReferenceKind;
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
/// The legacy `normal_map`'s `slider_1` (Normal Background Threshold, step 0.01).
pub const NORMAL_BACKGROUND: (f64, f64, f64) = (0.0, 1.0, 0.4);
/// The legacy `depth_leres`'s `slider_1` (Remove Near %) and `slider_2` (Remove Background %),
/// step 0.1 each.
pub const LERES_REMOVE: (f64, f64, f64) = (0.0, 100.0, 0.0);

/// The reference modules' `slider_1` (Style Fidelity, step 0.01).
pub const STYLE_FIDELITY: (f64, f64, f64) = (0.0, 1.0, 0.5);

/// The recolor modules' `slider_1` (Gamma Correction, step 0.001).
pub const RECOLOR_GAMMA: (f64, f64, f64) = (0.1, 2.0, 1.0);

/// softedge_teed's `Safe Steps` (`PreprocessorTEED.slider_1`, step 1); softedge_anyline's too.
pub const SAFE_STEPS: (f64, f64, f64) = (0.0, 10.0, 2.0);
/// softedge_anyline's own resolution slider (`PreprocessorAnyline.slider_resolution`: 64..=2048,
/// 1280, step 8).
pub const ANYLINE_RESOLUTION_DEFAULT: u32 = 1280;
/// softedge_anyline runs only at a multiple of this: it runs lineart_standard on the padded
/// image (sides multiples of 64) at the resolution, and the extension's numpy cannot combine
/// that map with TEED's when the two sizes differ.
pub const ANYLINE_RESOLUTION_STEP: u32 = 64;

/// The `type`s, for messages.
pub const TYPES: &str = "\"canny\", \"invert\", \"threshold\", \"lineart_standard\", \"scribble_xdog\", \"blur_gaussian\", \"tile_resample\", \"color\", \"shuffle\", \"softedge_hed\", \"softedge_hedsafe\", \"scribble_hed\", \"lineart_realistic\", \"lineart_coarse\", \"lineart_anime\", \"lineart_anime_denoise\", \"softedge_pidinet\", \"softedge_pidisafe\", \"scribble_pidinet\", \"softedge_teed\", \"softedge_anyline\", \"mlsd\", \"depth_anything\", \"depth_anything_v2\", \"depth_midas\", \"normal_midas\", \"normal_bae\", \"depth_leres\", \"openpose\", \"openpose_hand\", \"openpose_face\", \"openpose_faceonly\", \"openpose_full\", \"recolor_luminance\", \"recolor_intensity\", \"inpaint\", \"inpaint_only\", \"inpaint_only+lama\", \"reference_only\", \"reference_adain\", \"reference_adain+attn\", \"none\"";

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
        "none" | "invert" | "inpaint" | "inpaint_only" | "inpaint_only+lama" => &["type"],
        "canny" => &["type", "low_threshold", "high_threshold", "resolution"],
        "threshold" | "scribble_xdog" => &["type", "threshold", "resolution"],
        "blur_gaussian" => &["type", "sigma", "resolution"],
        "tile_resample" => &["type", "down_sampling_rate"],
        "shuffle" => &["type", "seed", "resolution"],
        "softedge_teed" | "softedge_anyline" => &["type", "safe_steps", "resolution"],
        "mlsd" => &[
            "type",
            "value_threshold",
            "distance_threshold",
            "resolution",
        ],
        "normal_midas" => &["type", "background_threshold", "resolution"],
        "recolor_luminance" | "recolor_intensity" => &["type", "gamma"],
        "reference_only" | "reference_adain" | "reference_adain+attn" => {
            &["type", "style_fidelity"]
        }
        "depth_leres" => &["type", "remove_near", "remove_background", "resolution"],
        other if Preprocessor::resolution_only(other, 0).is_some() => &["type", "resolution"],
        other => {
            return Err(format!(
                "{field}.type: {other:?} is not a preprocessor this server runs; one of {TYPES} (other model-based ones such as depth_zoe, dw_openpose_full: send their map as the image)"
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
        "scribble_xdog" => Preprocessor::ScribbleXdog {
            threshold: threshold(XDOG_THRESHOLD)?,
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
        "softedge_teed" => Preprocessor::SoftedgeTeed {
            safe_steps: number("safe_steps", SAFE_STEPS)?,
            resolution: resolution()?,
        },
        "softedge_anyline" => {
            let resolution = int(
                "resolution",
                RESOLUTION_MIN,
                RESOLUTION_MAX,
                ANYLINE_RESOLUTION_DEFAULT,
            )?;
            anyline_resolution(resolution, &field)?;
            Preprocessor::SoftedgeAnyline {
                safe_steps: number("safe_steps", SAFE_STEPS)?,
                resolution,
            }
        }
        "mlsd" => Preprocessor::Mlsd {
            value_threshold: number("value_threshold", MLSD_VALUE)?,
            distance_threshold: number("distance_threshold", MLSD_DISTANCE)?,
            resolution: resolution()?,
        },
        "normal_midas" => Preprocessor::NormalMidas {
            background_threshold: number("background_threshold", NORMAL_BACKGROUND)?,
            resolution: resolution()?,
        },
        "inpaint" => Preprocessor::Inpaint,
        "inpaint_only" => Preprocessor::InpaintOnly,
        "inpaint_only+lama" => Preprocessor::InpaintOnlyLama,
        "reference_only" | "reference_adain" | "reference_adain+attn" => {
            Preprocessor::of_reference(
                ReferenceKind::from_name(kind).expect("a reference module"),
                number("style_fidelity", STYLE_FIDELITY)?,
            )
        }
        "recolor_luminance" => Preprocessor::RecolorLuminance {
            gamma: number("gamma", RECOLOR_GAMMA)?,
        },
        "recolor_intensity" => Preprocessor::RecolorIntensity {
            gamma: number("gamma", RECOLOR_GAMMA)?,
        },
        "depth_leres" => Preprocessor::DepthLeres {
            remove_near: number("remove_near", LERES_REMOVE)?,
            remove_background: number("remove_background", LERES_REMOVE)?,
            resolution: resolution()?,
        },
        "blur_gaussian" => Preprocessor::BlurGaussian {
            sigma: number("sigma", BLUR_SIGMA)?,
            resolution: resolution()?,
        },
        "tile_resample" => Preprocessor::TileResample {
            down_sampling_rate: number("down_sampling_rate", TILE_RATE)?,
        },
        // The key check above let through only the types this server runs.
        other => Preprocessor::resolution_only(other, resolution()?)
            .ok_or_else(|| format!("{field}.type: {other:?} is not a preprocessor"))?,
    }))
}

/// softedge_anyline's rule on its resolution (`field` the unit's `[i].preprocessor`).
fn anyline_resolution(resolution: u32, field: &str) -> Result<(), String> {
    if resolution.is_multiple_of(ANYLINE_RESOLUTION_STEP) {
        return Ok(());
    }
    Err(format!(
        "{field}.resolution: softedge_anyline needs a multiple of {ANYLINE_RESOLUTION_STEP} ({resolution} is not; the extension fails there: it runs lineart_standard on the image padded to multiples of 64 at this resolution, and that map's size differs from TEED's)"
    ))
}

/// The control map of unit `i`'s `image`; the image scaled to the processor resolution must
/// keep the request image rule (the extension has none: a long thin image would be huge), and
/// tile_resample's shrink must leave a pixel a side (OpenCV refuses an empty size); a
/// model-based module needs its file in ANNOTATOR_DIR (`[i].preprocessor.type` names both).
pub fn run(p: &Preprocessor, image: &RgbImage, i: usize) -> Result<RgbImage, String> {
    run_with_poses(p, image, i).map(|(map, _)| map)
}

/// [`run`] for a module that takes the unit's mask (`mask`: its first channel, one value a
/// pixel at `image`'s size): `inpaint_only+lama`'s LaMa.
pub fn run_with_mask(
    p: &Preprocessor,
    image: &RgbImage,
    mask: &[u8],
    i: usize,
) -> Result<RgbImage, String> {
    // LaMa runs at 256 on the shorter side: a long thin image would be huge there.
    if *p == Preprocessor::InpaintOnlyLama {
        let res = f64::from(sdserve_pipeline::controlnet::preprocess::LAMA_RESOLUTION);
        let (w, h) = (f64::from(image.width), f64::from(image.height));
        let k = res / w.min(h);
        let side = |s: f64| (s * k).round_ties_even().min(f64::from(u32::MAX)) as u32;
        crate::images::check_dimensions(side(w), side(h)).map_err(|why| {
            format!(
                "[{i}].image: the {}x{} image scaled to {res} on its shorter side (LaMa's size) {why}",
                image.width, image.height
            )
        })?;
    }
    p.run_with_mask(image, mask, crate::annotators::AnnotatorStore::shared())
        .map_err(|e| {
            let why = match e {
                sdserve_pipeline::PipelineError::InvalidRequest(why) => why,
                other => other.to_string(),
            };
            format!("[{i}].preprocessor.type: {:?} {why}", p.module())
        })
}

/// [`run`], and the OpenPose modules' people as the extension's pose JSON ([`pose_json`]).
pub fn run_with_poses(
    p: &Preprocessor,
    image: &RgbImage,
    i: usize,
) -> Result<(RgbImage, Option<Value>), String> {
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
    // pixel_perfect sets any resolution: checked again here.
    if let Preprocessor::SoftedgeAnyline { resolution, .. } = p {
        anyline_resolution(*resolution, &format!("[{i}].preprocessor"))?;
    }
    let (map, poses) = p
        .run_with_poses(image, crate::annotators::AnnotatorStore::shared())
        .map_err(|e| {
            let why = match e {
                sdserve_pipeline::PipelineError::InvalidRequest(why) => why,
                other => other.to_string(),
            };
            format!("[{i}].preprocessor.type: {:?} {why}", p.module())
        })?;
    Ok((map, poses.as_ref().map(pose_json)))
}

/// The extension's pose JSON of `poses` (`encode_poses_as_json`): `people` with
/// `pose_keypoints_2d` as x / W, y / H, 1 per keypoint (0, 0, 0 where none), and
/// `hand_left_keypoints_2d`, `hand_right_keypoints_2d` (21 points) and `face_keypoints_2d`
/// (the points found) the same way (float32 values; a point not found is there as -1 / W,
/// -1 / H, 1), null where not looked for or not found; `animals` empty; the padded image's
/// `canvas_height` and `canvas_width`.
pub fn pose_json(poses: &Poses) -> Value {
    let flat = |points: &Option<Vec<(f32, f32)>>| -> Value {
        match points {
            Some(points) if !points.is_empty() => points
                .iter()
                .flat_map(|&(x, y)| [f64::from(x), f64::from(y), 1.0])
                .collect::<Vec<f64>>()
                .into(),
            _ => Value::Null,
        }
    };
    let people: Vec<Value> = poses
        .people
        .iter()
        .map(|person| {
            let body: Vec<f64> = person
                .body
                .iter()
                .flat_map(|k| match k {
                    Some((x, y)) => [*x, *y, 1.0],
                    None => [0.0, 0.0, 0.0],
                })
                .collect();
            serde_json::json!({
                "pose_keypoints_2d": body,
                "face_keypoints_2d": flat(&person.face),
                "hand_left_keypoints_2d": flat(&person.hand_left),
                "hand_right_keypoints_2d": flat(&person.hand_right),
            })
        })
        .collect();
    serde_json::json!({
        "people": people,
        "animals": [],
        "canvas_height": poses.canvas_height,
        "canvas_width": poses.canvas_width,
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
        background_threshold: None,
        gamma: None,
        remove_near: None,
        remove_background: None,
        style_fidelity: None,
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
        Preprocessor::SoftedgeAnyline { safe_steps, .. } => ControlNetPreprocessor {
            safe_steps: Some(safe_steps),
            ..base(PreprocessorType::SoftedgeAnyline)
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
        Preprocessor::DepthAnything { .. } => base(PreprocessorType::DepthAnything),
        Preprocessor::DepthAnythingV2 { .. } => base(PreprocessorType::DepthAnythingV2),
        Preprocessor::DepthMidas { .. } => base(PreprocessorType::DepthMidas),
        Preprocessor::NormalMidas {
            background_threshold,
            ..
        } => ControlNetPreprocessor {
            background_threshold: Some(background_threshold),
            ..base(PreprocessorType::NormalMidas)
        },
        Preprocessor::NormalBae { .. } => base(PreprocessorType::NormalBae),
        Preprocessor::DepthLeres {
            remove_near,
            remove_background,
            ..
        } => ControlNetPreprocessor {
            remove_near: Some(remove_near),
            remove_background: Some(remove_background),
            ..base(PreprocessorType::DepthLeres)
        },
        Preprocessor::Openpose { .. } => base(PreprocessorType::Openpose),
        Preprocessor::OpenposeHand { .. } => base(PreprocessorType::OpenposeHand),
        Preprocessor::OpenposeFace { .. } => base(PreprocessorType::OpenposeFace),
        Preprocessor::OpenposeFaceonly { .. } => base(PreprocessorType::OpenposeFaceonly),
        Preprocessor::OpenposeFull { .. } => base(PreprocessorType::OpenposeFull),
        Preprocessor::RecolorLuminance { gamma } => ControlNetPreprocessor {
            gamma: Some(gamma),
            ..base(PreprocessorType::RecolorLuminance)
        },
        Preprocessor::RecolorIntensity { gamma } => ControlNetPreprocessor {
            gamma: Some(gamma),
            ..base(PreprocessorType::RecolorIntensity)
        },
        Preprocessor::Inpaint => base(PreprocessorType::Inpaint),
        Preprocessor::InpaintOnly => base(PreprocessorType::InpaintOnly),
        Preprocessor::InpaintOnlyLama => base(PreprocessorType::InpaintOnlyLama),
        Preprocessor::ReferenceOnly { style_fidelity }
        | Preprocessor::ReferenceAdain { style_fidelity }
        | Preprocessor::ReferenceAdainAttn { style_fidelity } => ControlNetPreprocessor {
            style_fidelity: Some(style_fidelity),
            ..base(match p {
                Preprocessor::ReferenceOnly { .. } => PreprocessorType::ReferenceOnly,
                Preprocessor::ReferenceAdain { .. } => PreprocessorType::ReferenceAdain,
                _ => PreprocessorType::ReferenceAdainAttn,
            })
        },
    }
}

#[cfg(test)]
#[path = "preprocessor_tests.rs"]
mod tests;
