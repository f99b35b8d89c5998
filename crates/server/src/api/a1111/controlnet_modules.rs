//! The sd-webui-controlnet extension's preprocessors ("modules") this server runs, as its API
//! names and sets them: a unit's `module`, `processor_res`, `threshold_a`, `threshold_b` and
//! `pixel_perfect`, and `GET /controlnet/module_list`.
//!
//! A module is found by name or label, as `Preprocessor.get_preprocessor` (here without
//! case). Settings follow the unit's `bound_check_params`: -1 (the API's default) or a value
//! outside the preprocessor's slider is the slider's default; the thresholds of canny,
//! `threshold` and `scribble_xdog` stay numbers as the unit keeps them (the infotext writes
//! e.g. 127.5; canny runs on `int(slider_1)`, and compared with 8-bit values
//! only the integer part counts), as do blur_gaussian's sigma and tile_resample's rate. Modules: `none`, `canny`, `invert`, `threshold`,
//! `lineart_standard`, `scribble_xdog`, `blur_gaussian`, `tile_resample`, `color`, `shuffle`,
//! the HED ones `hed` (`softedge_hed`), `hed_safe` (`softedge_hedsafe`), `scribble_hed`, the
//! lineart ones `lineart` (`lineart_realistic`), `lineart_coarse`, `lineart_anime`,
//! `lineart_anime_denoise`, and the
//! PiDiNet ones `pidinet` (`softedge_pidinet`), `pidinet_safe` (`softedge_pidisafe`),
//! `pidinet_scribble` (`scribble_pidinet`), `softedge_teed` (TEED; its `Safe Steps` slider
//! kept as a number as the others, `int(slider_1)` runs), `softedge_anyline` (Anyline: TEED with
//! MistoLine's weights and lineart_standard's faint lines; its own Resolution slider, 1280 by
//! default, and Safe Steps), `mlsd` (its thresholds kept as numbers), `depth_anything_v2`,
//! `depth_anything`, `depth` (`depth_midas`), `normal_map` (`normal_midas`, its Normal
//! Background Threshold slider kept as a number), `normal_bae`, `depth_leres` (Remove Near % and Remove
//! Background % as threshold_a and threshold_b, kept as numbers) and the OpenPose ones `openpose` (bodies), `openpose_hand`,
//! `openpose_face`, `openpose_faceonly`, `openpose_full` (no sliders but the resolution) (their weights from ANNOTATOR_DIR; listed without
//! them, as the extension lists its model-based modules), `recolor_luminance` and
//! `recolor_intensity` (no resolution; their Gamma Correction slider, 0.1..=2, is threshold_a,
//! kept as a number; a unit with one also recolours the decoded images, as the extension's
//! post-processing does), their names and labels and sliders
//! copied from the extension's
//! `model_free_preprocessors.py`, `teed.py` and
//! `legacy/preprocessor_compiled.py`. `pixel_perfect` replaces the resolution by
//! `external_code.pixel_perfect_resolution` of the uploaded image and the request's size, kept
//! within 64..=2048 here (the native rule; the extension does not bound it).

use axum::extract::RawQuery;
use axum::Json;
use serde_json::{json, Map, Value};

use sdserve_pipeline::controlnet::preprocess::Preprocessor;

use crate::api::query_bool;
use crate::error::ApiError;
use crate::validate::preprocessor::{
    ANYLINE_RESOLUTION_DEFAULT, BINARY_THRESHOLD, BLUR_SIGMA, HIGH_DEFAULT, LERES_REMOVE,
    LOW_DEFAULT, MLSD_DISTANCE, MLSD_VALUE, NORMAL_BACKGROUND, RECOLOR_GAMMA, RESOLUTION_DEFAULT,
    RESOLUTION_MAX, RESOLUTION_MIN, SAFE_STEPS, STYLE_FIDELITY, THRESHOLD_MAX, THRESHOLD_MIN,
    TILE_RATE, XDOG_THRESHOLD,
};
use sdserve_pipeline::controlnet::ReferenceKind;

/// A preprocessor's slider (`PreprocessorParameter.api_json`); the extension's
/// `PreprocessorParameter` step is 0.01 where a module does not set one.
pub(super) struct Slider {
    name: &'static str,
    pub(super) value: f64,
    pub(super) min: f64,
    pub(super) max: f64,
    step: f64,
}

const fn slider(name: &'static str, (min, max, value): (f64, f64, f64), step: f64) -> Slider {
    Slider {
        name,
        value,
        min,
        max,
        step,
    }
}

/// `Preprocessor.slider_resolution` (the class default every module here keeps visible but
/// `invert`; the legacy modules set a `resolution` attribute the list never reads).
pub(super) const RESOLUTION: Slider = slider(
    "Resolution",
    (
        RESOLUTION_MIN as f64,
        RESOLUTION_MAX as f64,
        RESOLUTION_DEFAULT as f64,
    ),
    8.0,
);

/// `PreprocessorAnyline.slider_resolution`: the class default's range and step, 1280.
const ANYLINE_RESOLUTION: Slider = slider(
    "Resolution",
    (
        RESOLUTION_MIN as f64,
        RESOLUTION_MAX as f64,
        ANYLINE_RESOLUTION_DEFAULT as f64,
    ),
    8.0,
);

/// One module: its name, UI label and sliders (resolution, slider 1, slider 2), `None` where
/// the extension hides one.
pub(super) struct Module {
    pub(super) name: &'static str,
    pub(super) label: &'static str,
    pub(super) sliders: [Option<Slider>; 3],
}

pub(super) const fn module(
    name: &'static str,
    label: &'static str,
    sliders: [Option<Slider>; 3],
) -> Module {
    Module {
        name,
        label,
        sliders,
    }
}

/// In `get_sorted_preprocessors` order: `none`, then by `sorting_priority` (canny,
/// lineart_standard, tile_resample, softedge_pidinet, scribble_pidinet, recolor_luminance,
/// reference_only, openpose_full, normal_bae, mlsd, inpaint_only, depth_midas 100; invert 20;
/// the others 0) and
/// label, descending (`inpaint` by its label, `inpaint_global_harmonious`)
/// (`color` sorts by its label, `t2ia_color_grid`; `lineart_anime_denoise` before its prefix
/// `lineart_anime`, and `openpose_faceonly` before `openpose_face`; softedge_teed,
/// softedge_anyline, depth_leres, depth_anything_v2, depth_anything and the OpenPose ones by
/// their names; `depth_anything_v2` before its prefix `depth_anything`).
pub(super) const MODULES: [Module; 42] = [
    module("none", "none", [Some(RESOLUTION), None, None]),
    module(
        "tile_resample",
        "tile_resample",
        [
            Some(RESOLUTION),
            Some(slider("Down Sampling Rate", TILE_RATE, 0.01)),
            None,
        ],
    ),
    module(
        "pidinet",
        "softedge_pidinet",
        [Some(RESOLUTION), None, None],
    ),
    module(
        "pidinet_scribble",
        "scribble_pidinet",
        [Some(RESOLUTION), None, None],
    ),
    module(
        "reference_only",
        "reference_only",
        [None, Some(FIDELITY), None],
    ),
    module(
        "recolor_luminance",
        "recolor_luminance",
        [
            None,
            Some(slider("Gamma Correction", RECOLOR_GAMMA, 0.001)),
            None,
        ],
    ),
    module(
        "openpose_full",
        "openpose_full",
        [Some(RESOLUTION), None, None],
    ),
    module("normal_bae", "normal_bae", [Some(RESOLUTION), None, None]),
    module(
        "mlsd",
        "mlsd",
        [
            Some(RESOLUTION),
            Some(slider("MLSD Value Threshold", MLSD_VALUE, 0.01)),
            Some(slider("MLSD Distance Threshold", MLSD_DISTANCE, 0.01)),
        ],
    ),
    module(
        "lineart_standard",
        "lineart_standard (from white bg & black line)",
        [Some(RESOLUTION), None, None],
    ),
    // The inpaint modules hide every slider (`slider_resolution` invisible).
    module("inpaint_only", "inpaint_only", [None, None, None]),
    module("depth", "depth_midas", [Some(RESOLUTION), None, None]),
    module(
        "canny",
        "canny",
        [
            Some(RESOLUTION),
            Some(slider(
                "Low Threshold",
                (
                    THRESHOLD_MIN as f64,
                    THRESHOLD_MAX as f64,
                    LOW_DEFAULT as f64,
                ),
                1.0,
            )),
            Some(slider(
                "High Threshold",
                (
                    THRESHOLD_MIN as f64,
                    THRESHOLD_MAX as f64,
                    HIGH_DEFAULT as f64,
                ),
                1.0,
            )),
        ],
    ),
    module(
        "invert",
        "invert (from white bg & black line)",
        [None, None, None],
    ),
    module(
        "threshold",
        "threshold",
        [
            Some(RESOLUTION),
            Some(slider("Binarization Threshold", BINARY_THRESHOLD, 0.01)),
            None,
        ],
    ),
    module("color", "t2ia_color_grid", [Some(RESOLUTION), None, None]),
    module(
        "softedge_teed",
        "softedge_teed",
        [
            Some(RESOLUTION),
            Some(slider("Safe Steps", SAFE_STEPS, 1.0)),
            None,
        ],
    ),
    module(
        "pidinet_safe",
        "softedge_pidisafe",
        [Some(RESOLUTION), None, None],
    ),
    module(
        "hed_safe",
        "softedge_hedsafe",
        [Some(RESOLUTION), None, None],
    ),
    module("hed", "softedge_hed", [Some(RESOLUTION), None, None]),
    module(
        "softedge_anyline",
        "softedge_anyline",
        [
            Some(ANYLINE_RESOLUTION),
            Some(slider("Safe Steps", SAFE_STEPS, 1.0)),
            None,
        ],
    ),
    // Its resolution slider is hidden (`PreprocessorParameter(value=512, visible=False)`).
    module("shuffle", "shuffle", [None, None, None]),
    module(
        "scribble_xdog",
        "scribble_xdog",
        [
            Some(RESOLUTION),
            Some(slider("XDoG Threshold", XDOG_THRESHOLD, 0.01)),
            None,
        ],
    ),
    module(
        "scribble_hed",
        "scribble_hed",
        [Some(RESOLUTION), None, None],
    ),
    module(
        "reference_adain+attn",
        "reference_adain+attn",
        [None, Some(FIDELITY), None],
    ),
    module(
        "reference_adain",
        "reference_adain",
        [None, Some(FIDELITY), None],
    ),
    module(
        "recolor_intensity",
        "recolor_intensity",
        [
            None,
            Some(slider("Gamma Correction", RECOLOR_GAMMA, 0.001)),
            None,
        ],
    ),
    module(
        "openpose_hand",
        "openpose_hand",
        [Some(RESOLUTION), None, None],
    ),
    module(
        "openpose_faceonly",
        "openpose_faceonly",
        [Some(RESOLUTION), None, None],
    ),
    module(
        "openpose_face",
        "openpose_face",
        [Some(RESOLUTION), None, None],
    ),
    module("openpose", "openpose", [Some(RESOLUTION), None, None]),
    module(
        "normal_map",
        "normal_midas",
        [
            Some(RESOLUTION),
            Some(slider(
                "Normal Background Threshold",
                NORMAL_BACKGROUND,
                0.01,
            )),
            None,
        ],
    ),
    module(
        "lineart",
        "lineart_realistic",
        [Some(RESOLUTION), None, None],
    ),
    module(
        "lineart_coarse",
        "lineart_coarse",
        [Some(RESOLUTION), None, None],
    ),
    module(
        "lineart_anime_denoise",
        "lineart_anime_denoise",
        [Some(RESOLUTION), None, None],
    ),
    module(
        "lineart_anime",
        "lineart_anime",
        [Some(RESOLUTION), None, None],
    ),
    // Priority 0, its label above inpaint_global_harmonious's.
    module("inpaint_only+lama", "inpaint_only+lama", [None, None, None]),
    module("inpaint", "inpaint_global_harmonious", [None, None, None]),
    module(
        "depth_leres",
        "depth_leres",
        [
            Some(RESOLUTION),
            Some(slider("Remove Near %", LERES_REMOVE, 0.1)),
            Some(slider("Remove Background %", LERES_REMOVE, 0.1)),
        ],
    ),
    module(
        "depth_anything_v2",
        "depth_anything_v2",
        [Some(RESOLUTION), None, None],
    ),
    module(
        "depth_anything",
        "depth_anything",
        [Some(RESOLUTION), None, None],
    ),
    module(
        "blur_gaussian",
        "blur_gaussian",
        [
            Some(RESOLUTION),
            Some(slider("Sigma", BLUR_SIGMA, 0.01)),
            None,
        ],
    ),
];

pub(super) fn find(module: &str) -> Option<&'static Module> {
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
fn value(v: Option<&Value>, s: &Slider, key: &str) -> Result<f64, String> {
    let x = match v {
        None | Some(Value::Null) => -1.0,
        Some(v) => v
            .as_f64()
            .ok_or_else(|| format!("{key}: must be a number (-1 for the default)"))?,
    };
    Ok(if x < s.min || x > s.max { s.value } else { x })
}

/// The reference modules' Style Fidelity (their resolution slider hidden).
const FIDELITY: Slider = slider(
    "Style Fidelity (only for Balanced mode)",
    STYLE_FIDELITY,
    0.01,
);

/// `shuffle`'s hidden resolution slider: the class default's range (0..=1) with 512.
const SHUFFLE_RESOLUTION: Slider = slider("Resolution", (0.0, 1.0, 512.0), 0.01);

/// The preprocessor of `module` with the A1111 settings (`None` for `none`); `prefix` is
/// prepended to the names in errors (`[0].` for a unit, `controlnet_` for `/detect`);
/// `numpy_seed` seeds `shuffle` (the extension's `set_numpy_seed`).
pub(super) fn preprocessor(
    module: &str,
    processor_res: Option<&Value>,
    threshold_a: Option<&Value>,
    threshold_b: Option<&Value>,
    prefix: &str,
    numpy_seed: u32,
) -> Result<Option<Preprocessor>, String> {
    let found = find(module).ok_or_else(|| {
        format!(
            "{prefix}module: the preprocessor {module:?} is not run here; one of {} (other model-based ones such as depth_zoe, dw_openpose_full: send their map as the image with module \"none\")",
            names()
        )
    })?;
    let [res, a, b] = &found.sliders;
    let setting = |v, s: &Option<Slider>, key: &str| -> Result<f64, String> {
        let s = s.as_ref().expect("the module's slider");
        value(v, s, &format!("{prefix}{key}"))
    };
    // `int(...)`: pydantic's for the resolution.
    let resolution =
        || Ok::<_, String>(setting(processor_res, res, "processor_res")?.trunc() as u32);
    Ok(Some(match found.name {
        "canny" => Preprocessor::Canny {
            resolution: resolution()?,
            low_threshold: setting(threshold_a, a, "threshold_a")?,
            high_threshold: setting(threshold_b, b, "threshold_b")?,
        },
        "invert" => Preprocessor::Invert,
        "inpaint" => Preprocessor::Inpaint,
        "inpaint_only" => Preprocessor::InpaintOnly,
        "inpaint_only+lama" => Preprocessor::InpaintOnlyLama,
        "reference_only" | "reference_adain" | "reference_adain+attn" => {
            Preprocessor::of_reference(
                ReferenceKind::from_name(found.name).expect("a reference module"),
                setting(threshold_a, a, "threshold_a")?,
            )
        }
        "threshold" => Preprocessor::Threshold {
            threshold: setting(threshold_a, a, "threshold_a")?,
            resolution: resolution()?,
        },
        "scribble_xdog" => Preprocessor::ScribbleXdog {
            threshold: setting(threshold_a, a, "threshold_a")?,
            resolution: resolution()?,
        },
        "blur_gaussian" => Preprocessor::BlurGaussian {
            sigma: setting(threshold_a, a, "threshold_a")?,
            resolution: resolution()?,
        },
        "shuffle" => {
            // The hidden slider keeps a processor_res of 0..=1, too small an image to run.
            let key = format!("{prefix}processor_res");
            let res = value(processor_res, &SHUFFLE_RESOLUTION, &key)?;
            if res < f64::from(RESOLUTION_MIN) {
                return Err(format!(
                    "{key}: shuffle's resolution slider is hidden (0..=1, 512): {res} would make an image of under a pixel; send -1 for 512"
                ));
            }
            Preprocessor::Shuffle {
                resolution: res as u32,
                seed: numpy_seed,
            }
        }
        "softedge_teed" => Preprocessor::SoftedgeTeed {
            safe_steps: setting(threshold_a, a, "threshold_a")?,
            resolution: resolution()?,
        },
        "softedge_anyline" => Preprocessor::SoftedgeAnyline {
            safe_steps: setting(threshold_a, a, "threshold_a")?,
            resolution: resolution()?,
        },
        "mlsd" => Preprocessor::Mlsd {
            value_threshold: setting(threshold_a, a, "threshold_a")?,
            distance_threshold: setting(threshold_b, b, "threshold_b")?,
            resolution: resolution()?,
        },
        "normal_map" => Preprocessor::NormalMidas {
            background_threshold: setting(threshold_a, a, "threshold_a")?,
            resolution: resolution()?,
        },
        "recolor_luminance" => Preprocessor::RecolorLuminance {
            gamma: setting(threshold_a, a, "threshold_a")?,
        },
        "recolor_intensity" => Preprocessor::RecolorIntensity {
            gamma: setting(threshold_a, a, "threshold_a")?,
        },
        "depth_leres" => Preprocessor::DepthLeres {
            remove_near: setting(threshold_a, a, "threshold_a")?,
            remove_background: setting(threshold_b, b, "threshold_b")?,
            resolution: resolution()?,
        },
        "tile_resample" => Preprocessor::TileResample {
            down_sampling_rate: setting(threshold_a, a, "threshold_a")?,
        },
        // The modules whose one setting is the resolution, by their native names.
        name => match Preprocessor::resolution_only(native_name(name), 0) {
            Some(p) => p.with_resolution(resolution()?),
            None => return Ok(None),
        },
    }))
}

/// The native `preprocessor.type` of an A1111 module: the extension's legacy names where they
/// differ (`Preprocessor::module` gives the native ones).
fn native_name(module: &str) -> &str {
    match module {
        "hed" => "softedge_hed",
        "hed_safe" => "softedge_hedsafe",
        "lineart" => "lineart_realistic",
        "pidinet" => "softedge_pidinet",
        "pidinet_safe" => "softedge_pidisafe",
        "pidinet_scribble" => "scribble_pidinet",
        "depth" => "depth_midas",
        "normal_map" => "normal_midas",
        other => other,
    }
}

/// What the extension seeds numpy with before each unit (`set_numpy_seed`): the request's
/// seed (`all_seeds[0]`, the one drawn for -1) plus its `subseed` (the seed again for -1 or
/// none; a negative one is 0), modulo 2^32. `seed` is the translated (drawn) seed.
pub(super) fn numpy_seed(seed: Option<&Value>, subseed: Option<&Value>) -> u32 {
    let seed = seed.and_then(Value::as_u64).unwrap_or(0);
    let subseed = match subseed.and_then(Value::as_f64) {
        None | Some(-1.0) => seed,
        Some(s) => s.trunc().max(0.0) as u64,
    };
    (seed.wrapping_add(subseed) & 0xFFFF_FFFF) as u32
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

/// `p` at `resolution` (unchanged for a module that takes none).
pub(super) fn at_resolution(p: Preprocessor, resolution: u32) -> Preprocessor {
    p.with_resolution(resolution)
}

/// `{"module_list": [...], "module_detail": {name: {model_free, sliders}}}`.
#[utoipa::path(get, path = "/controlnet/module_list", tag = "a1111",
    params(("alias_names" = Option<bool>, Query, description = "The UI labels instead of the names (the extension's parameter)")),
    responses((status = 200, description = "`{module_list, module_detail}`: the preprocessors this server runs (`none`: the image is the control map; `ip-adapter-auto`, `tile_resample`, `pidinet`, `pidinet_scribble`, `reference_only`, `recolor_luminance`, `openpose_full`, `normal_bae`, `mlsd`, `lineart_standard`, `ip-adapter_clip_sd15`, `inpaint_only`, `depth`, `canny`, `invert`, `threshold`, `color`, `softedge_teed`, `pidinet_safe`, `hed_safe`, `hed`, `softedge_anyline`, `shuffle`, `scribble_xdog`, `scribble_hed`, `reference_adain+attn`, `reference_adain`, `recolor_intensity`, `openpose_hand`, `openpose_faceonly`, `openpose_face`, `openpose`, `normal_map`, `lineart`, `lineart_coarse`, `lineart_anime_denoise`, `lineart_anime`, `inpaint_only+lama`, `inpaint`, `depth_leres`, `depth_anything_v2`, `depth_anything`, `blur_gaussian`; `inpaint`, `inpaint_only` and `inpaint_only+lama` take the unit's mask; the reference modules take no model (`model_free`); the ip-adapter ones take an IP-Adapter of IP_ADAPTER_DIR and run it as the extension does; the HED ones need ControlNetHED.pth in ANNOTATOR_DIR, the lineart ones sk_model.pth, sk_model2.pth, erika.pth, netG.pth, the PiDiNet ones table5_pidinet.pth, mlsd mlsd_large_512_fp32.pth, softedge_teed 7_model.pth, softedge_anyline MTEED.pth, depth_anything_v2 depth_anything_v2_vitl.safetensors, depth_anything depth_anything_vitl14.pth, depth and normal_map dpt_hybrid-midas-501f0c75.pt, normal_bae scannet.pt, depth_leres res101.pth, inpaint_only+lama ControlNetLama.pth, the OpenPose ones body_pose_model.pth, with hand_pose_model.pth for the hands and facenet.pth for the faces), with the extension's sliders (`name`, `value`, `min`, `max`, `step`)"),
        (status = 422, description = "`alias_names` is not a boolean", body = crate::error::ErrorBody)))]
pub(super) async fn module_list(RawQuery(query): RawQuery) -> Result<Json<Value>, ApiError> {
    let alias_names = query_bool(query.as_deref(), "alias_names")?.unwrap_or(false);
    let name = |m: &Module| if alias_names { m.label } else { m.name };
    let mut detail = Map::new();
    for m in &super::controlnet_ip_adapter::listed() {
        let sliders: Vec<Value> = m
            .sliders
            .iter()
            .flatten()
            .map(|s| json!({"name": s.name, "value": number(s.value), "min": number(s.min), "max": number(s.max), "step": number(s.step)}))
            .collect();
        // `model_free` is the extension's `do_not_need_model`: the reference modules'.
        let model_free = m.name.starts_with("reference");
        detail.insert(
            name(m).into(),
            json!({"model_free": model_free, "sliders": sliders}),
        );
    }
    Ok(Json(json!({
        "module_list": super::controlnet_ip_adapter::listed().into_iter().map(name).collect::<Vec<_>>(),
        "module_detail": detail,
    })))
}

/// A whole number as a JSON integer (as the extension's integer settings), else a float.
fn number(x: f64) -> Value {
    if x.fract() == 0.0 && x.abs() < 1e15 {
        json!(x as i64)
    } else {
        json!(x)
    }
}

#[cfg(test)]
#[path = "controlnet_modules_tests.rs"]
mod tests;
