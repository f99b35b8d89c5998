//! The native `controlnets` field: `[{model, image, preprocessor, scale, guidance_start,
//! guidance_end}]`, diffusers' `StableDiffusionControlNetPipeline` arguments (`controlnet`,
//! `image`, `controlnet_conditioning_scale`, `control_guidance_start`, `control_guidance_end`),
//! one object per ControlNet (several: `MultiControlNetModel`); a `preprocessor` makes the
//! control map from `image` here, at validation (`super::preprocessor`), and the sd-webui-controlnet
//! extension's `hr_option` for a hires request's passes, its `inpaint_crop_input_image`
//! (`inpaint_crop`) for A1111's "only masked" inpainting, and its `control_mode`
//! (`sdserve_pipeline::controlnet::modes`).

use serde_json::Value;

use sdserve_pipeline::controlnet::preprocess::Preprocessor;

use crate::images::RequestImage;
use sdserve_pipeline::controlnet::{ControlMode, HiresOption};

/// ControlNets one request may use (each holds a UNet encoder's weights on the device).
pub const CONTROLNETS_MAX: usize = 3;
/// `scale`: the sd-webui-controlnet extension's weight slider range.
pub const SCALE_MIN: f64 = 0.0;
pub const SCALE_MAX: f64 = 2.0;
/// The longest model name (a file or folder name).
const NAME_MAX: usize = 255;

/// One ControlNet of a request.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidControlNet {
    /// A name of CONTROLNET_DIR (`GET /controlnets`), checked before the job is queued;
    /// empty for a reference unit (no model).
    pub model: String,
    /// The control map: the upload, or what `preprocessor` made of it (resized to the
    /// request's size once that is known).
    pub image: RequestImage,
    /// The preprocessor already run on the upload, for the metadata.
    pub preprocessor: Option<Preprocessor>,
    pub scale: f64,
    pub guidance_start: f64,
    pub guidance_end: f64,
    /// The passes of a hires request it steers (`hr_option`).
    pub hr_option: HiresOption,
    /// The extension's control mode (`control_mode`).
    pub control_mode: ControlMode,
    /// The hires pass's control image, where a dialect fits the upload to that size itself
    /// (A1111's resize modes); `None`: `image`, resized by the pipeline.
    pub hires_image: Option<RequestImage>,
    /// With `inpaint.area` `only_masked`: the image cropped as the init image (true), or
    /// used whole (`inpaint_crop`).
    pub inpaint_crop: bool,
    /// The inpaint preprocessors' mask (`mask`, else the request's `mask_image`), at the
    /// image's size; `None` for the other preprocessors.
    pub mask: Option<RequestImage>,
    /// The hires pass's mask, where a dialect fits it with `hires_image`; `None`: `mask`.
    pub hires_mask: Option<RequestImage>,
    /// Its infotext entry, where a dialect writes its own (A1111's units: the extension's
    /// `ControlNetUnit.serialize` of the unit sent); `None`: the native entry (`png`).
    pub infotext: Option<String>,
    /// The model's file as CONTROLNET_DIR's check before queueing found it (the memory check
    /// counts its weights); the worker finds it again by name when the job runs.
    pub file: Option<std::path::PathBuf>,
}

fn number(
    obj: &serde_json::Map<String, Value>,
    key: &str,
    i: usize,
    min: f64,
    max: f64,
    default: f64,
) -> Result<f64, String> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(v) => v
            .as_f64()
            .filter(|x| (min..=max).contains(x))
            .ok_or_else(|| format!("[{i}].{key}: must be a number between {min} and {max}")),
    }
}

/// `controlnets`: at most [`CONTROLNETS_MAX`] objects; `model` a name (1..=255 characters),
/// `image` a base64 PNG/JPEG/WebP, `scale` 0..=2 (1), `guidance_start` 0..=1 (0) below
/// `guidance_end` 0..=1 (1), as diffusers requires (`start < end`); `inpaint_crop` a boolean
/// (true); `mask` an image of `image`'s size, only with the inpaint preprocessors (the
/// request's `mask_image` stands in for a missing one: [`masks_from_request`]). `numpy_seed`
/// seeds `shuffle` where the unit gives no seed.
pub fn read(v: &Value, numpy_seed: u32) -> Result<Vec<ValidControlNet>, String> {
    let rule = format!(
        "must be an array of at most {CONTROLNETS_MAX} objects {{\"model\": string (none with a reference preprocessor), \"image\": base64 image, \"preprocessor\": {{\"type\": {}, ...}} or null, \"scale\": {SCALE_MIN}..={SCALE_MAX}, \"guidance_start\": 0..=1, \"guidance_end\": 0..=1, \"hr_option\": \"both\"|\"low_res_only\"|\"high_res_only\", \"inpaint_crop\": boolean, \"control_mode\": \"balanced\"|\"prompt\"|\"controlnet\"}}",
        super::preprocessor::TYPES
    );
    let items = v.as_array().ok_or_else(|| rule.clone())?;
    if items.len() > CONTROLNETS_MAX {
        return Err(rule);
    }
    let mut out = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let obj = item.as_object().ok_or_else(|| format!("[{i}]: {rule}"))?;
        const KEYS: [&str; 10] = [
            "model",
            "image",
            "preprocessor",
            "scale",
            "guidance_start",
            "guidance_end",
            "hr_option",
            "inpaint_crop",
            "control_mode",
            "mask",
        ];
        if let Some(k) = obj.keys().find(|k| !KEYS.contains(&k.as_str())) {
            return Err(format!("[{i}]: unknown key {k:?}; {rule}"));
        }
        let image = obj
            .get("image")
            .and_then(Value::as_str)
            .ok_or_else(|| format!("[{i}].image: a base64 image is required"))?;
        let preprocessor = super::preprocessor::read(obj.get("preprocessor"), i, numpy_seed)?;
        // The reference modules run no ControlNet: their units have no model.
        let reference = preprocessor.is_some_and(|p| p.reference().is_some());
        let model = match obj.get("model") {
            None | Some(Value::Null) if reference => String::new(),
            Some(_) if reference => {
                return Err(format!(
                "[{i}].model: the reference preprocessors take no ControlNet model (leave it out)"
            ))
            }
            v => v
                .and_then(Value::as_str)
                .map(super::fields::sanitize_text)
                .filter(|n| !n.is_empty() && n.chars().count() <= NAME_MAX)
                .ok_or_else(|| {
                    format!("[{i}].model: a name of 1..={NAME_MAX} characters is required")
                })?,
        };
        let mut image =
            crate::images::decode_base64(image).map_err(|e| format!("[{i}].image: {e}"))?;
        let mask = match obj.get("mask") {
            None | Some(Value::Null) => None,
            Some(v) => {
                let text = v
                    .as_str()
                    .ok_or_else(|| format!("[{i}].mask: a base64 image is required"))?;
                let mask =
                    crate::images::decode_base64(text).map_err(|e| format!("[{i}].mask: {e}"))?;
                if !preprocessor.is_some_and(|p| p.takes_mask()) {
                    return Err(format!(
                        "[{i}].mask: only with the \"inpaint\", \"inpaint_only\" and \"inpaint_only+lama\" preprocessors"
                    ));
                }
                let (m, im) = (&mask.image, &image.image);
                if (m.width, m.height) != (im.width, im.height) {
                    return Err(format!(
                        "[{i}].mask: {}x{}, its image {}x{}: they must be the same size",
                        m.width, m.height, im.width, im.height
                    ));
                }
                Some(mask)
            }
        };
        let scale = number(obj, "scale", i, SCALE_MIN, SCALE_MAX, 1.0)?;
        let guidance_start = number(obj, "guidance_start", i, 0.0, 1.0, 0.0)?;
        let guidance_end = number(obj, "guidance_end", i, 0.0, 1.0, 1.0)?;
        if guidance_start >= guidance_end {
            return Err(format!(
                "[{i}]: guidance_start ({guidance_start}) must be below guidance_end ({guidance_end})"
            ));
        }
        // inpaint_only+lama's map needs the mask, which may be the request's: made with it
        // (`lama_maps`).
        if let Some(p) = preprocessor.filter(|p| *p != Preprocessor::InpaintOnlyLama) {
            let map = super::preprocessor::run(&p, &image.image, i)?;
            image = RequestImage {
                sha256: crate::images::digest(&map),
                image: map,
            };
        }
        let hr_option = match obj.get("hr_option") {
            None | Some(Value::Null) => HiresOption::Both,
            Some(v) => v.as_str().and_then(HiresOption::from_name).ok_or_else(|| {
                format!("[{i}].hr_option: one of \"both\", \"low_res_only\", \"high_res_only\"")
            })?,
        };
        let inpaint_crop = match obj.get("inpaint_crop") {
            None | Some(Value::Null) => true,
            Some(v) => v
                .as_bool()
                .ok_or_else(|| format!("[{i}].inpaint_crop: must be true or false"))?,
        };
        let control_mode = match obj.get("control_mode") {
            None | Some(Value::Null) => ControlMode::Balanced,
            Some(v) => v.as_str().and_then(ControlMode::from_name).ok_or_else(|| {
                format!("[{i}].control_mode: one of \"balanced\", \"prompt\", \"controlnet\"")
            })?,
        };
        out.push(ValidControlNet {
            model,
            image,
            preprocessor,
            scale,
            guidance_start,
            guidance_end,
            hr_option,
            control_mode,
            hires_image: None,
            inpaint_crop,
            mask,
            hires_mask: None,
            infotext: None,
            file: None,
        });
    }
    Ok(out)
}

/// inpaint_only+lama's maps: each such unit's image painted by LaMa under its mask (the
/// unit's own, or the request's `mask_image` resized to the unit's image as the stand-in
/// [`masks_from_request`] takes), before the images and masks are fitted to the request.
pub fn lama_maps(
    units: &mut [ValidControlNet],
    mask_image: Option<&RequestImage>,
    with_init: bool,
) -> Result<(), String> {
    use sdserve_pipeline::image_in::resize_lanczos;
    for (i, unit) in units.iter_mut().enumerate() {
        let Some(p) = unit
            .preprocessor
            .filter(|p| *p == Preprocessor::InpaintOnlyLama)
        else {
            continue;
        };
        let image = &unit.image.image;
        let mask = match (&unit.mask, mask_image) {
            (Some(m), _) => m.image.clone(),
            (None, Some(m)) if with_init => resize_lanczos(
                &m.image,
                image.width as usize,
                image.height as usize,
            ),
            _ => {
                return Err(format!(
                    "[{i}].mask: the \"inpaint_only+lama\" preprocessor needs a mask (the unit's `mask`, or on inpainting the request's `mask_image`)"
                ))
            }
        };
        let first: Vec<u8> = mask.pixels.iter().step_by(3).copied().collect();
        let map = super::preprocessor::run_with_mask(&p, image, &first, i)?;
        unit.image = RequestImage {
            sha256: crate::images::digest(&map),
            image: map,
        };
    }
    Ok(())
}

/// The inpaint preprocessors' masks at the request's size (and at the hires pass's, `hires`):
/// each unit's own resized with its image (Lanczos), or without one the request's
/// `mask_image` (`with_init`: there is an init image; the extension takes A1111's inpainting
/// mask so), else a 422 naming the unit.
pub fn masks_from_request(
    units: &mut [ValidControlNet],
    mask_image: Option<&RequestImage>,
    with_init: bool,
    (width, height): (usize, usize),
    hires: Option<(usize, usize)>,
) -> Result<(), String> {
    use sdserve_pipeline::image_in::resize_lanczos;
    for (i, unit) in units.iter_mut().enumerate() {
        if !unit.preprocessor.is_some_and(|p| p.takes_mask()) {
            continue;
        }
        let mask = match (&unit.mask, mask_image) {
            (Some(m), _) => m.clone(),
            (None, Some(m)) if with_init => m.clone(),
            _ => {
                return Err(format!(
                    "[{i}].mask: the {:?} preprocessor needs a mask (the unit's `mask`, or on inpainting the request's `mask_image`)",
                    unit.preprocessor.map(|p| p.module()).unwrap_or_default()
                ))
            }
        };
        let fitted = |(w, h): (usize, usize)| {
            let image = resize_lanczos(&mask.image, w, h);
            RequestImage {
                sha256: crate::images::digest(&image),
                image,
            }
        };
        unit.hires_mask = hires.map(fitted);
        unit.mask = Some(fitted((width, height)));
    }
    Ok(())
}
