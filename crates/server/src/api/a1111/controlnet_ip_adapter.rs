//! ControlNet units with an ip-adapter module (`alwayson_scripts.controlnet.args`), run as the
//! sd-webui-controlnet extension runs them: the adapter is a name of IP_ADAPTER_DIR (with or
//! without the extension's ` [hash]`), the module `ip-adapter_clip_sd15` (label
//! `ip-adapter_clip_h`, ViT-H: SD 1.5's adapters) or `ip-adapter-auto` (the extension's
//! `IPAdapterPreset.match_model`: the preset of the model's stem picks the module).
//!
//! Its images are what `get_input_images_rgba` reads (`image` or `input_image` as base64 with
//! `mask`, `{image, mask}`, `[image, mask]`, or a list of `{image, mask}` objects: several
//! images, whose tokens are averaged), each with its mask's first channel as the alpha the
//! `clip` preprocessor reads (none: 0); on img2img a unit without one takes the init image,
//! and with "only masked" a single image is cut to A1111's region first
//! (`try_crop_image_with_a1111_mask`). Nothing is fitted to the request's size (the
//! preprocessor returns embeddings, not an image). `weight` is the scale,
//! `guidance_start`/`guidance_end` the window of sampling steps.

use serde_json::{Map, Value};

use crate::error::ApiError;
use crate::images::RequestImage;
use crate::validate::{A1111IpUnit, ValidIpAdapter};
use sdserve_pipeline::pipeline::RgbImage;

use super::controlnet::{bad, model_name};
use super::controlnet_fit::resize_mode;
use super::controlnet_img2img::Img2ImgInput;
use super::controlnet_infotext::{self as infotext, UnitRecord};
use super::controlnet_input::{own_image, rgba_feed, Source};
use super::controlnet_modules::{module, Module, RESOLUTION};

/// The modules routed here (name, label): the extension's `ip-adapter_clip_sd15` and
/// `ip-adapter-auto`.
pub(super) const MODULES: [(&str, &str); 2] = [
    ("ip-adapter_clip_sd15", "ip-adapter_clip_h"),
    ("ip-adapter-auto", "ip-adapter-auto"),
];

/// `ip-adapter_clip_sd15`'s label: the module `IPAdapterPreset` names for ViT-H adapters.
const CLIP_H: &str = "ip-adapter_clip_h";

/// The extension's `ipadapter_presets` (`scripts/ipadapter/presets.py`): model stem and module.
const PRESETS: [(&str, &str); 22] = [
    ("ip-adapter_sd15_light", CLIP_H),
    ("ip-adapter_sd15_light_v11", CLIP_H),
    ("ip-adapter_sd15_vit-G", "ip-adapter_clip_g"),
    ("ip-adapter_sd15", CLIP_H),
    ("ip-adapter-plus_sd15", CLIP_H),
    ("ip-adapter_sd15_plus", CLIP_H),
    ("ip-adapter_plus_composition_sd15", CLIP_H),
    ("ip-adapter-plus-face_sd15", CLIP_H),
    ("ip-adapter-full-face_sd15", CLIP_H),
    ("ip-adapter-faceid_sd15", "ip-adapter_face_id"),
    ("ip-adapter-faceid-plus_sd15", "ip-adapter_face_id_plus"),
    ("ip-adapter-faceid-plusv2_sd15", "ip-adapter_face_id_plus"),
    ("ip-adapter-faceid-portrait_sd15", "ip-adapter_face_id"),
    ("ip-adapter-faceid-portrait-v11_sd15", "ip-adapter_face_id"),
    ("ip-adapter_sdxl", "ip-adapter_clip_g"),
    ("ip-adapter_sdxl_vit-h", CLIP_H),
    ("ip-adapter-plus_sdxl_vit-h", CLIP_H),
    ("ip-adapter_plus_composition_sdxl", CLIP_H),
    ("ip-adapter-plus-face_sdxl_vit-h", CLIP_H),
    ("ip-adapter-faceid_sdxl", "ip-adapter_face_id"),
    ("ip-adapter-faceid-plusv2_sdxl", "ip-adapter_face_id_plus"),
    ("ip-adapter-faceid-portrait_sdxl", "ip-adapter_face_id"),
];

/// Whether `module` is one of [`MODULES`] (by name or label, without case).
pub(super) fn is_ip_adapter(module: &str) -> bool {
    MODULES.iter().any(|(name, label)| {
        module.eq_ignore_ascii_case(name) || module.eq_ignore_ascii_case(label)
    })
}

/// `ip-adapter-auto`'s check (`get_preprocessor_by_model`): the model's stem (before any `[`)
/// must be a preset whose module is `ip-adapter_clip_h`.
fn auto_module(model: &str, i: usize) -> Result<(), ApiError> {
    let stem = model.split('[').next().unwrap_or_default().trim();
    match PRESETS.iter().find(|(m, _)| *m == stem) {
        Some((_, CLIP_H)) => Ok(()),
        Some((_, module)) => Err(bad(format!(
            "[{i}].module: ip-adapter-auto picks {module} for {stem:?}, which is not run here (only ip-adapter_clip_sd15 is)"
        ))),
        None => Err(bad(format!(
            "[{i}].module: ip-adapter-auto: {stem:?} is not among the extension's IP-Adapter presets; pick the preprocessor (ip-adapter_clip_sd15)"
        ))),
    }
}

/// Images one unit may average (each runs the image encoder once; the extension sets no
/// bound, a request must).
pub(super) const IMAGES_MAX: usize = 8;

/// The unit's own images as `get_input_images_rgba` reads them: a list of `{image, mask}`
/// objects (at most [`IMAGES_MAX`]), or one image in the forms [`own_image`] reads.
fn own_images(unit: &Map<String, Value>, i: usize) -> Result<Vec<(&str, Option<&str>)>, ApiError> {
    let listed = match unit.get("image").or_else(|| unit.get("input_image")) {
        Some(Value::Array(a)) if a.first().is_some_and(Value::is_object) => a,
        _ => return Ok(own_image(unit, i)?.into_iter().collect()),
    };
    if listed.len() > IMAGES_MAX {
        return Err(bad(format!(
            "[{i}].image: at most {IMAGES_MAX} images in one ip-adapter unit, got {}",
            listed.len()
        )));
    }
    fn text(v: Option<&Value>, i: usize, k: String) -> Result<Option<&str>, ApiError> {
        match v {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) if !s.is_empty() => Ok(Some(s.as_str())),
            _ => Err(bad(format!("[{i}].{k}: a base64 image is required"))),
        }
    }
    listed
        .iter()
        .enumerate()
        .map(|(k, item)| {
            let image =
                text(item.get("image"), i, format!("image[{k}].image"))?.ok_or_else(|| {
                    bad(format!(
                        "[{i}].image[{k}].image: a base64 image is required"
                    ))
                })?;
            Ok((
                image,
                text(item.get("mask"), i, format!("image[{k}].mask"))?,
            ))
        })
        .collect()
}

/// A number of `unit` within `min..=max`, `default` when absent or null.
fn number(
    unit: &Map<String, Value>,
    key: &str,
    i: usize,
    (min, max, default): (f64, f64, f64),
) -> Result<f64, ApiError> {
    match unit.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(v) => v
            .as_f64()
            .filter(|x| (min..=max).contains(x))
            .ok_or_else(|| {
                bad(format!(
                    "[{i}].{key}: must be a number between {min} and {max}"
                ))
            }),
    }
}

/// An ip-adapter unit (`module` one of [`MODULES`]) at `arg` in the list, the `position`-th
/// enabled unit, as the request's IP-Adapter run the extension's way.
pub(super) fn ip_adapter_unit(
    unit: &Map<String, Value>,
    arg: usize,
    position: usize,
    module: &str,
    img2img: Option<&Img2ImgInput>,
    size: Option<(usize, usize)>,
) -> Result<ValidIpAdapter, ApiError> {
    let i = arg;
    let sent = unit
        .get("model")
        .and_then(Value::as_str)
        .filter(|m| !m.is_empty() && *m != "None")
        .ok_or_else(|| {
            bad(format!(
                "[{i}].model: an IP-Adapter of IP_ADAPTER_DIR is required (/controlnet/model_list)"
            ))
        })?;
    if module.eq_ignore_ascii_case("ip-adapter-auto") {
        auto_module(sent, i)?;
    }
    if unit.get("ipadapter_input").is_some_and(|v| !v.is_null()) {
        return Err(bad(format!(
            "[{i}].ipadapter_input: precomputed embeddings are not read here; send the image"
        )));
    }
    let mode = resize_mode(unit.get("resize_mode"), i)?;
    let own = own_images(unit, i)?;
    let images = match (own.as_slice(), img2img) {
        ([], Some(input)) => {
            // The init image, no alpha; cut to "only masked"'s region with img2img's fit.
            let image = match (input.crop, size) {
                (Some(c), Some((w, h))) => c.apply(&input.init, input.init_fit, w, h),
                _ => input.init.clone(),
            };
            vec![(image, None)]
        }
        ([], None) => return Err(bad(format!("[{i}].image: a base64 image is required"))),
        _ => {
            let single = own.len() == 1;
            let crop = img2img.and_then(|input| input.crop).filter(|_| {
                single
                    && unit
                        .get("inpaint_crop_input_image")
                        .and_then(Value::as_bool)
                        != Some(false)
            });
            let mut images = Vec::with_capacity(own.len());
            for &(text, mask) in &own {
                let (rgb, alpha) = rgba_feed(&Source::Own((text, mask)), None, i)?;
                let (rgb, alpha) = match (crop, size) {
                    (Some(c), Some((w, h))) => {
                        (c.apply(&rgb, mode, w, h), c.apply(&alpha, mode, w, h))
                    }
                    _ => (rgb, alpha),
                };
                images.push((rgb, mask.map(|_| alpha)));
            }
            images
        }
    };
    let weight = number(unit, "weight", i, (0.0, 2.0, 1.0))?;
    let guidance_start = number(unit, "guidance_start", i, (0.0, 1.0, 0.0))?;
    let end_key = match unit.get("guidance_end") {
        None | Some(Value::Null) if unit.get("guidance").is_some() => "guidance",
        _ => "guidance_end",
    };
    let guidance_end = number(unit, end_key, i, (0.0, 1.0, 1.0))?;
    if guidance_start > guidance_end {
        return Err(bad(format!(
            "[{i}].guidance_start: {guidance_start} is after guidance_end ({guidance_end})"
        )));
    }
    let control_mode = super::controlnet::control_mode(unit.get("control_mode"), i)?;
    let record = UnitRecord::of_sent(
        unit,
        [infotext::RESOLUTION, infotext::HIDDEN, infotext::HIDDEN],
        (weight, (guidance_start, guidance_end)),
        mode,
        control_mode,
    );
    let request_image = |image: RgbImage| RequestImage {
        sha256: crate::images::digest(&image),
        image,
    };
    let images: Vec<_> = images
        .into_iter()
        .map(|(image, alpha)| (request_image(image), alpha.map(request_image)))
        .collect();
    Ok(ValidIpAdapter {
        model: model_name(sent).to_string(),
        image: images[0].0.clone(),
        scale: weight,
        a1111: Some(A1111IpUnit {
            arg,
            images,
            guidance_start,
            guidance_end,
            position,
            infotext: record.infotext(),
        }),
        files: None,
    })
}

/// The listed modules: [`MODULES`] and the ip-adapter ones (`controlnet_ip_adapter`, which
/// units route to the request's IP-Adapters) in `get_sorted_preprocessors` order:
/// `ip-adapter-auto` (priority 1000) first after `none`, `ip-adapter_clip_sd15` (priority 100,
/// label `ip-adapter_clip_h`) after `lineart_standard`; both with the class's resolution
/// slider, needing a model.
pub(super) fn listed() -> Vec<&'static Module> {
    const AUTO: Module = module(
        "ip-adapter-auto",
        "ip-adapter-auto",
        [Some(RESOLUTION), None, None],
    );
    const CLIP_SD15: Module = module(
        "ip-adapter_clip_sd15",
        "ip-adapter_clip_h",
        [Some(RESOLUTION), None, None],
    );
    debug_assert!(MODULES.iter().all(|&(n, l)| [&AUTO, &CLIP_SD15]
        .iter()
        .any(|m| m.name == n && m.label == l)));
    let mut out: Vec<&'static Module> = super::controlnet_modules::MODULES.iter().collect();
    out.insert(1, &AUTO);
    let at = out
        .iter()
        .position(|m| m.name == "inpaint_only")
        .unwrap_or(out.len());
    out.insert(at, &CLIP_SD15);
    out
}

/// Units whose module and model disagree, a 422 naming the unit's model: an ip-adapter module
/// with a name CONTROLNET_DIR has and IP_ADAPTER_DIR has not, or another module with an
/// adapter's name that CONTROLNET_DIR has not (`args`: each ControlNet unit's index in the
/// list). Blocking: reads both folders.
pub(super) fn check_kinds(
    controlnets: &crate::controlnets::ControlNetCatalog,
    adapters: &crate::ip_adapters::IpAdapterCatalog,
    valid: &crate::validate::ValidRequest,
    args: &[usize],
) -> Result<(), ApiError> {
    if valid.ip_adapters.iter().all(|u| u.a1111.is_none()) && valid.controlnets.is_empty() {
        return Ok(());
    }
    let (nets, ips) = (controlnets.scan(), adapters.scan());
    let is_net = |name: &str| nets.iter().any(|e| e.name == name);
    let is_ip = |name: &str| ips.iter().any(|e| e.name == name);
    for unit in &valid.ip_adapters {
        let Some(a) = &unit.a1111 else { continue };
        if !is_ip(&unit.model) && is_net(&unit.model) {
            return Err(bad(format!(
                "[{}].model: {:?} is a ControlNet (CONTROLNET_DIR); an ip-adapter module takes an IP-Adapter of IP_ADAPTER_DIR",
                a.arg, unit.model
            )));
        }
    }
    for (unit, arg) in valid.controlnets.iter().zip(args) {
        if !unit.model.is_empty() && !is_net(&unit.model) && is_ip(&unit.model) {
            return Err(bad(format!(
                "[{arg}].model: {:?} is an IP-Adapter (IP_ADAPTER_DIR); it runs with module ip-adapter_clip_sd15 or ip-adapter-auto",
                unit.model
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
#[path = "controlnet_ip_adapter_tests.rs"]
mod tests;
