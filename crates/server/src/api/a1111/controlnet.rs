//! The sd-webui-controlnet extension's API (its `scripts/api.py` and `external_code.py`, API
//! version 2): units in `alwayson_scripts.controlnet.args` on txt2img and img2img, translated to
//! the native `controlnets`, and `GET /controlnet/version`, `/controlnet/model_list`,
//! `/controlnet/module_list`.
//!
//! A unit (`external_code.to_processing_unit`: a dict, `input_image` for `image`, `guidance`
//! for `guidance_end`) runs when `enabled` (default true). Preprocessor `module`: `none` (the
//! image is the control map itself) or a model-free one this server runs (`controlnet_modules`:
//! `canny`, `invert`, `threshold`, `lineart_standard`, `scribble_xdog`, `blur_gaussian`,
//! `tile_resample`, HED's `hed`, `hed_safe`, `scribble_hed`, the lineart ones and PiDiNet's
//! `pidinet`, `pidinet_safe`, `pidinet_scribble`, `mlsd`, `depth_anything_v2`, `depth_anything`,
//! `depth` and `normal_map` (MiDaS), `normal_bae`, `depth_leres`, the OpenPose ones (`openpose`, `openpose_hand`, `openpose_face`, `openpose_faceonly`,
//! `openpose_full`) with
//! ANNOTATOR_DIR, with
//! `processor_res`, `threshold_a/b`, `pixel_perfect`), whose map is made here
//! and then fitted by the resize mode below (the native unit gets the map, its validated unit
//! the preprocessor); others are a 422 naming the module. `control_mode` (the extension's
//! `ControlMode` value or index): `Balanced` (0), `My prompt is more important` (1),
//! `ControlNet is more important` (2): the native `control_mode` (`balanced`, `prompt`,
//! `controlnet`). `resize_mode` (default `Crop and Resize`, as the extension's) is its `detectmap_proc`
//! geometry: `Crop and Resize` scales the image to cover the request's size (`k = max(h / H, w
//! / W)`, sides `round(W * k)`, `round(H * k)`) and crops the centre; `Resize and Fill` scales
//! it to fit (`k = min`) and centres it on the median colour of its border pixels; `Just
//! Resize` stretches it. The resampling is the native API's Lanczos, not the extension's
//! OpenCV filters. `weight`, `guidance_start`, `guidance_end` are the native `scale` and its
//! window; `low_vram` changes nothing here. With `enable_hr` the units steer both passes as
//! their `hr_option` says (`Both`, `Low res only`, `High res only`: the native `hr_option`),
//! each unit's image fitted again at the hires size from the upload (`Units::fit_hires`); a canny unit
//! takes the soft weights in the hires pass, as the extension forces them there (the pipeline
//! does it from the unit's preprocessor). A `model` is a CONTROLNET_DIR name, with or without the extension's ` [hash]` suffix.
//!
//! The image (`get_input_images_rgba`): base64, `{image, mask}` or `[image, mask]`, with the
//! unit's `mask` (or `mask_image`) as the extension's canvas scribble (`from_rgba_to_input`). On
//! img2img a unit without one takes the init image, and with a mask and "only masked" every
//! unit's image is cut to A1111's region before its preprocessor (`controlnet_img2img`); the
//! native unit then says `inpaint_crop: false`. The inpaint modules (`inpaint`, label
//! inpaint_global_harmonious, `inpaint_only` and `inpaint_only+lama`) take the extension's RGBA feed instead
//! (`choose_input_image`): the unit's image with its mask's first channel (none: nothing
//! masked; a mask of another size is refused), or on img2img the init image with A1111's mask
//! as `prepare_mask` makes it; the two are cut and fitted together ("Resize and Fill" fills
//! the mask's border with 255: outpainting) and become the native unit's `image` and `mask`
//! with the preprocessor of that name (`inpaint_only+lama`'s LaMa runs here in the
//! extension's order once the hires size is known: `controlnet_lama`).

use std::path::Path;

use axum::extract::State;
use axum::Json;
use base64::Engine as _;
use serde_json::{json, Map, Value};

use crate::api::Shared;
use crate::error::ApiError;
use sdserve_pipeline::controlnet::preprocess::Preprocessor;
use sdserve_pipeline::controlnet::{ControlMode, HiresOption};
use sdserve_pipeline::pipeline::RgbImage;

pub(super) use super::controlnet_fit::ResizeMode;
use super::controlnet_fit::{fit, fit_mask, resize_mode};
use super::controlnet_img2img::Img2ImgInput;
use super::controlnet_input::{own_image, read_hwc3, rgba_feed, Source};
use super::controlnet_lama::LamaFeed;

/// The field errors name (the extension's list), as sent.
pub const FIELD: &str = "alwayson_scripts.controlnet.args";

/// `external_code.get_api_version()`.
const API_VERSION: u32 = 2;

pub(super) fn bad(rule: String) -> ApiError {
    ApiError::validation(FIELD, rule)
}

/// Unit fields the extension reads that change the image and are not followed here: sent
/// with a value, a 422 rather than an image made without them (`null`, `""` and `[]`: unset).
const UNFOLLOWED: [(&str, &str); 2] = [
    (
        "effective_region_mask",
        "restricting a unit to a region is not supported here",
    ),
    (
        "advanced_weighting",
        "per-layer weights are not supported here (`weight` applies to every layer)",
    ),
];

fn refuse_unfollowed(unit: &Map<String, Value>, i: usize) -> Result<(), ApiError> {
    let set = |v: &Value| match v {
        Value::Null => false,
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        _ => true,
    };
    match UNFOLLOWED
        .iter()
        .find(|(k, _)| unit.get(*k).is_some_and(set))
    {
        Some((k, rule)) => Err(bad(format!("[{i}].{k}: {rule}"))),
        None => Ok(()),
    }
}

/// The extension's `ControlMode`, from its value or its index (the order of its radio
/// buttons, which older API clients send).
pub(super) fn control_mode(v: Option<&Value>, i: usize) -> Result<ControlMode, ApiError> {
    let mode = match v {
        None | Some(Value::Null) => return Ok(ControlMode::Balanced),
        Some(Value::String(s)) => ControlMode::ALL.into_iter().find(|m| m.label() == s),
        Some(n) => n
            .as_u64()
            .and_then(|n| ControlMode::ALL.get(n as usize).copied()),
    };
    mode.ok_or_else(|| {
        bad(format!(
            "[{i}].control_mode: one of \"Balanced\", \"My prompt is more important\", \"ControlNet is more important\" (or 0, 1, 2)"
        ))
    })
}

/// The model name without the extension's ` [hash]` suffix.
pub(super) fn model_name(s: &str) -> &str {
    match s.rsplit_once(" [") {
        Some((name, hash))
            if hash.len() == 9
                && hash.ends_with(']')
                && hash[..8].chars().all(|c| c.is_ascii_hexdigit()) =>
        {
            name
        }
        _ => s,
    }
}

/// Whether the body has enabled ControlNet units.
pub fn has_units(body: &Map<String, Value>) -> bool {
    body.get("alwayson_scripts")
        .and_then(Value::as_object)
        .and_then(|s| s.iter().find(|(k, _)| k.eq_ignore_ascii_case("controlnet")))
        .and_then(|(_, v)| v.get("args"))
        .and_then(Value::as_array)
        .is_some_and(|a| {
            a.iter()
                .any(|u| u.is_object() && u.get("enabled").and_then(Value::as_bool) != Some(false))
        })
}

/// A request's units as native `controlnets` (a preprocessed unit's image is its map, made
/// and fitted here), and the preprocessors that made maps.
#[derive(Debug)]
pub struct Units {
    pub native: Value,
    /// (native index, preprocessor) of each unit whose map was made here.
    made: Vec<(usize, Preprocessor)>,
    /// With `enable_hr`: (native index, image or map, mode, an inpaint unit's mask) of each
    /// unit, to fit again at the hires size (the extension's `hr_control`).
    hires: Vec<(usize, RgbImage, ResizeMode, Option<RgbImage>)>,
    /// The ip-adapter units, as the request's IP-Adapters (`controlnet_ip_adapter`).
    ip_adapters: Vec<crate::validate::ValidIpAdapter>,
    /// Each native unit's index in the list (errors name it).
    pub args: Vec<usize>,
    /// Each native unit's infotext entry (`controlnet_infotext`).
    infotexts: Vec<String>,
    /// The `inpaint_only+lama` units' feeds, painted once the hires size is known.
    lama: Vec<LamaFeed>,
}

impl Units {
    /// The hires pass's control images: each unit's image (or map) fitted to the second
    /// pass's `width` x `height` by its resize mode, as the extension's `get_control` makes
    /// `hr_control` with `detectmap_proc` at the hires size, from the upload or map itself
    /// (a "Just Resize" unit's too: its native image is fitted to the first pass's size).
    pub fn fit_hires(
        &self,
        valid: &mut crate::validate::ValidRequest,
        width: usize,
        height: usize,
    ) {
        let request_image = |image: RgbImage| crate::images::RequestImage {
            sha256: crate::images::digest(&image),
            image,
        };
        for (i, image, mode, mask) in &self.hires {
            if let Some(unit) = valid.controlnets.get_mut(*i) {
                unit.hires_image = Some(request_image(fit(image, *mode, width, height)));
                unit.hires_mask = mask
                    .as_ref()
                    .map(|m| request_image(fit_mask(m, *mode, width, height)));
            }
        }
    }

    /// The `inpaint_only+lama` units' images and masks for each pass: their feeds painted in
    /// the extension's order (`controlnet_lama`); `hires`: the hires pass's size, if any.
    pub fn paint_lama(
        &self,
        valid: &mut crate::validate::ValidRequest,
        hires: Option<(usize, usize)>,
    ) -> Result<(), ApiError> {
        super::controlnet_lama::paint(&self.lama, valid, hires)
    }

    /// Records each preprocessor and infotext entry on its validated unit (the metadata and
    /// infotext name them), and adds the ip-adapter units to the request's IP-Adapters.
    pub fn name_preprocessors(&self, valid: &mut crate::validate::ValidRequest) {
        for &(i, p) in &self.made {
            if let Some(unit) = valid.controlnets.get_mut(i) {
                unit.preprocessor = Some(p);
            }
        }
        for (unit, entry) in valid.controlnets.iter_mut().zip(&self.infotexts) {
            unit.infotext = Some(entry.clone());
        }
        valid.ip_adapters.extend(self.ip_adapters.iter().cloned());
    }
}

/// The units of `alwayson_scripts.controlnet` (the key matched without case, as A1111 matches
/// script titles) as native `controlnets`, their images (a preprocessed unit's: its map, made
/// here first, as the extension's `detectmap_proc` fits the preprocessor's result) fitted to
/// `width` x `height` by the unit's resize mode; `None` without enabled units. `hires_pass`:
/// a hires pass runs (txt2img's `enable_hr`; img2img ignores it, as A1111 does);
/// `numpy_seed`: what the extension seeds numpy with before each unit (`shuffle` draws from it).
pub fn native_units(
    body: &Map<String, Value>,
    numpy_seed: u32,
    hires_pass: bool,
    width: Option<u64>,
    height: Option<u64>,
    img2img: Option<&Img2ImgInput>,
) -> Result<Option<Units>, ApiError> {
    let Some(scripts) = body.get("alwayson_scripts").and_then(Value::as_object) else {
        return Ok(None);
    };
    let Some(script) = scripts
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("controlnet"))
        .map(|(_, v)| v)
    else {
        return Ok(None);
    };
    let args = match script.get("args") {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Array(a)) => a,
        Some(_) => return Err(bad("must be a list of ControlNet units (objects)".into())),
    };
    let mut units = Vec::new();
    let mut made = Vec::new();
    let mut hires = Vec::new();
    let mut ip_adapters = Vec::new();
    let mut unit_args = Vec::new();
    let mut infotexts = Vec::new();
    let mut lama = Vec::new();
    let enable_hr = hires_pass;
    // The enabled units, counted as the extension's infotext numbers them.
    let mut position = 0;
    for (i, unit) in args.iter().enumerate() {
        // The extension skips `None` entries; `false` is webuiapi's "no units" placeholder.
        let unit = match unit {
            Value::Null | Value::Bool(false) => continue,
            Value::Object(u) => u,
            _ => return Err(bad(format!("[{i}]: a ControlNet unit is an object"))),
        };
        if unit.get("enabled").and_then(Value::as_bool) == Some(false) {
            continue;
        }
        let text = |k: &str| unit.get(k).and_then(Value::as_str);
        refuse_unfollowed(unit, i)?;
        position += 1;
        let module = text("module").unwrap_or("none");
        if super::controlnet_ip_adapter::is_ip_adapter(module) {
            // As many as the native `ip_adapters` takes: each unit adds attention to every
            // cross-attention of every step.
            let most = crate::validate::IP_ADAPTERS_MAX;
            if ip_adapters.len() == most {
                return Err(bad(format!(
                    "[{i}]: at most {most} ip-adapter units in one request"
                )));
            }
            let size = width.zip(height).map(|(w, h)| (w as usize, h as usize));
            ip_adapters.push(super::controlnet_ip_adapter::ip_adapter_unit(
                unit,
                i,
                position - 1,
                module,
                img2img,
                size,
            )?);
            continue;
        }
        unit_args.push(i);
        let preprocessor = super::controlnet_modules::preprocessor(
            text("module").unwrap_or("none"),
            unit.get("processor_res"),
            unit.get("threshold_a"),
            unit.get("threshold_b"),
            &format!("[{i}]."),
            numpy_seed,
        )
        .map_err(bad)?;
        let control_mode = control_mode(unit.get("control_mode"), i)?;
        infotexts.push(super::controlnet_infotext::entry(unit, i, control_mode)?);
        // The reference modules run no model: the extension ignores the unit's.
        let reference = preprocessor.filter(|p| p.reference().is_some());
        let model = match reference {
            Some(_) => None,
            None => Some(
                text("model")
                    .map(model_name)
                    .filter(|m| !m.is_empty() && *m != "None")
                    .ok_or_else(|| {
                        bad(format!("[{i}].model: a ControlNet model name is required"))
                    })?,
            ),
        };
        let own = own_image(unit, i)?;
        // Without an image of its own a unit takes img2img's init image, fitted by A1111's
        // `resize_mode` as the extension reads it.
        let (image, mode) = match (own, img2img) {
            (Some(own), _) => (Source::Own(own), resize_mode(unit.get("resize_mode"), i)?),
            (None, Some(input)) => (Source::Init(&input.init), input.init_fit),
            (None, None) => return Err(bad(format!("[{i}].image: a base64 image is required"))),
        };
        // "Only masked" inpainting: the image cut to the repainted region first
        // (`inpaint_crop_input_image`, true by default).
        let crop = img2img.and_then(|input| input.crop).filter(|_| {
            unit.get("inpaint_crop_input_image")
                .and_then(Value::as_bool)
                != Some(false)
        });
        let pixel_perfect = unit.get("pixel_perfect").and_then(Value::as_bool) == Some(true);
        let fits = matches!(
            (width, height, mode),
            (
                Some(_),
                Some(_),
                ResizeMode::CropAndResize | ResizeMode::ResizeAndFill
            )
        );
        let fitted = |image: &RgbImage| match (width, height, mode) {
            (Some(w), Some(h), ResizeMode::CropAndResize | ResizeMode::ResizeAndFill) => {
                Some(fit(image, mode, w as usize, h as usize))
            }
            _ => None,
        };
        let as_png = |image: &RgbImage| -> Result<Value, ApiError> {
            let png = crate::png::encode_with_text(image, &[]).map_err(ApiError::Internal)?;
            Ok(Value::String(
                base64::engine::general_purpose::STANDARD.encode(png),
            ))
        };
        let decode_whole = || -> Result<RgbImage, ApiError> {
            let (text, mask) = match &image {
                Source::Init(init) => return Ok((*init).clone()),
                Source::Own(own) => *own,
            };
            let field = |k: &str, e: String| bad(format!("[{i}].{k}: {e}"));
            let decoded = read_hwc3(text).map_err(|e| field("image", e))?;
            match mask {
                None => Ok(decoded.image),
                Some(m) => {
                    let m = read_hwc3(m).map_err(|e| field("mask", e))?;
                    super::controlnet_img2img::apply_unit_mask(decoded.image, &m.image, i)
                }
            }
        };
        let decode = || -> Result<crate::images::RequestImage, ApiError> {
            let image = decode_whole()?;
            let image = match (crop, width, height) {
                (Some(c), Some(w), Some(h)) => c.apply(&image, mode, w as usize, h as usize),
                _ => image,
            };
            Ok(crate::images::RequestImage {
                sha256: String::new(),
                image,
            })
        };
        // An upload that is not RGBA reads the same natively (an RGBA one is composited
        // over white here, as the extension's `HWC3`).
        let passed_as_sent = || match &image {
            Source::Own((text, None))
                if crop.is_none()
                    && !matches!(crate::images::decode_hwc3_base64(text), Ok(Some(_))) =>
            {
                Some(*text)
            }
            _ => None,
        };
        let mut native = match (reference, preprocessor.filter(|p| p.takes_mask())) {
            // The extension's `identity`: the image fitted by the unit's resize mode, never
            // cut to "only masked"'s region (the extension crops no reference unit).
            (Some(p), _) => {
                let whole = decode_whole()?;
                let image = fitted(&whole).unwrap_or_else(|| whole.clone());
                if enable_hr {
                    hires.push((units.len(), whole, mode, None));
                }
                let fidelity = p.reference().map(|(_, f)| f);
                json!({"image": as_png(&image)?,
                       "preprocessor": {"type": p.module(), "style_fidelity": fidelity}})
            }
            // The extension's RGBA feed, image and mask cut and fitted together; the native
            // unit runs the pass-through preprocessor with the mask.
            (None, Some(p)) => {
                let (rgb, alpha) = rgba_feed(&image, img2img, i)?;
                let ((rgb, alpha), size) = match (crop, width, height) {
                    (Some(c), Some(w), Some(h)) => {
                        let (w, h) = (w as usize, h as usize);
                        (
                            (c.apply(&rgb, mode, w, h), c.apply(&alpha, mode, w, h)),
                            Some((w, h)),
                        )
                    }
                    _ => (
                        (rgb, alpha),
                        width.zip(height).map(|(w, h)| (w as usize, h as usize)),
                    ),
                };
                let (image, mask) = match size.filter(|_| fits) {
                    Some((w, h)) => (fit(&rgb, mode, w, h), fit_mask(&alpha, mode, w, h)),
                    None => (rgb.clone(), alpha.clone()),
                };
                // LaMa paints the feed itself, once the hires size is known
                // (`controlnet_lama`): validated as the pass-through `inpaint_only` meanwhile.
                let native_type = match p {
                    Preprocessor::InpaintOnlyLama => {
                        let index = units.len();
                        lama.push(LamaFeed {
                            index,
                            arg: i,
                            rgb,
                            alpha,
                            mode,
                        });
                        Preprocessor::InpaintOnly.module()
                    }
                    _ if enable_hr => {
                        hires.push((units.len(), rgb, mode, Some(alpha)));
                        p.module()
                    }
                    _ => p.module(),
                };
                json!({"model": model, "image": as_png(&image)?, "mask": as_png(&mask)?,
                       "preprocessor": {"type": native_type}})
            }
            (None, None) => json!({"model": model, "image": Value::Null}),
        };
        let image = match preprocessor {
            _ if !native["image"].is_null() => native["image"].clone(),
            // The map made here (the native image rule and size rule checked first), then
            // fitted; validation takes it as the image and the preprocessor for the records.
            Some(p) => {
                let decoded = decode()?;
                let p = match (width, height) {
                    (Some(w), Some(h)) if pixel_perfect => {
                        let res = super::controlnet_modules::pixel_perfect_resolution(
                            (decoded.image.width, decoded.image.height),
                            (w, h),
                            mode == ResizeMode::ResizeAndFill,
                        );
                        super::controlnet_modules::at_resolution(p, res)
                    }
                    _ => p,
                };
                let map =
                    crate::validate::preprocessor::run(&p, &decoded.image, i).map_err(|e| {
                        let e = e.replace("].preprocessor.type", "].module");
                        bad(e.replace("].preprocessor.resolution", "].processor_res"))
                    })?;
                made.push((units.len(), p));
                let png = as_png(fitted(&map).as_ref().unwrap_or(&map))?;
                if enable_hr {
                    hires.push((units.len(), map, mode, None));
                }
                png
            }
            None if fits => {
                let decoded = decode()?.image;
                let png = as_png(&fitted(&decoded).expect("a size to fit"))?;
                if enable_hr {
                    hires.push((units.len(), decoded, mode, None));
                }
                png
            }
            None => {
                if enable_hr {
                    hires.push((units.len(), decode()?.image, mode, None));
                }
                match passed_as_sent() {
                    Some(text) => Value::String(text.to_string()),
                    None => as_png(&decode()?.image)?,
                }
            }
        };
        native["image"] = image;
        if img2img.is_some_and(|input| input.crop.is_some()) {
            // Cut here already (or, `inpaint_crop_input_image` false, whole).
            native["inpaint_crop"] = json!(false);
        }
        let hr_option = match unit.get("hr_option") {
            None | Some(Value::Null) => HiresOption::Both,
            Some(v) => match v.as_str() {
                Some("Both") => HiresOption::Both,
                Some("Low res only") => HiresOption::LowResOnly,
                Some("High res only") => HiresOption::HighResOnly,
                _ => {
                    return Err(bad(format!(
                        "[{i}].hr_option: one of \"Both\", \"Low res only\", \"High res only\""
                    )))
                }
            },
        };
        if control_mode != ControlMode::Balanced {
            native["control_mode"] = json!(control_mode.name());
        }
        if hr_option != HiresOption::Both {
            native["hr_option"] = json!(hr_option.name());
        }
        for (ours, theirs) in [
            ("scale", "weight"),
            ("guidance_start", "guidance_start"),
            ("guidance_end", "guidance_end"),
        ] {
            let v = unit.get(theirs).or_else(|| {
                (theirs == "guidance_end")
                    .then(|| unit.get("guidance"))
                    .flatten()
            });
            if let Some(v) = v.filter(|v| !v.is_null()) {
                native[ours] = v.clone();
            }
        }
        units.push(native);
    }
    Ok(
        (!units.is_empty() || !ip_adapters.is_empty()).then_some(Units {
            native: Value::Array(units),
            made,
            hires,
            ip_adapters,
            args: unit_args,
            infotexts,
            lama,
        }),
    )
}

/// `{"version": 2}`.
#[utoipa::path(get, path = "/controlnet/version", tag = "a1111", responses((status = 200, description = "`{version}`: the sd-webui-controlnet API version this server speaks (2)")))]
pub(super) async fn version() -> Json<Value> {
    Json(json!({"version": API_VERSION}))
}

/// A1111's old short hash (`sd_models.model_hash`): the first 8 hex digits of the sha256 of
/// 64 KiB from 1 MiB into the file (of what is there).
pub(super) fn short_hash(path: &Path) -> Option<String> {
    use sha2::Digest as _;
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path).ok()?;
    f.seek(SeekFrom::Start(0x100000)).ok()?;
    let mut buf = Vec::with_capacity(0x10000);
    f.take(0x10000).read_to_end(&mut buf).ok()?;
    let digest = sha2::Sha256::digest(&buf);
    Some(digest[..4].iter().map(|b| format!("{b:02x}")).collect())
}

/// `{"model_list": ["name [hash]", ...]}`: CONTROLNET_DIR's files and IP_ADAPTER_DIR's adapters
/// as the extension names them (diffusers folders, which it does not read, by name alone),
/// sorted by file name as its `get_all_models` lists its one folder.
#[utoipa::path(get, path = "/controlnet/model_list", tag = "a1111", responses((status = 200, description = "`{model_list}`: CONTROLNET_DIR's models and IP_ADAPTER_DIR's IP-Adapters as `name [short hash]` (A1111's old 8-digit hash), by file name; a unit's `model` takes them with or without the hash (an adapter with an ip-adapter module)")))]
pub(super) async fn model_list(State(app): State<Shared>) -> Json<Value> {
    let (nets, adapters) = (app.controlnets.clone(), app.ip_adapters.clone());
    let names = tokio::task::spawn_blocking(move || {
        let files = nets.scan().into_iter().map(|e| (e.name, e.path));
        let files = files.chain(adapters.scan().into_iter().map(|e| (e.name, e.path)));
        let mut listed: Vec<(String, String)> = files
            .map(|(name, path)| {
                let file = path
                    .file_name()
                    .map_or_else(|| name.clone(), |f| f.to_string_lossy().into_owned());
                let shown = match path.is_file().then(|| short_hash(&path)).flatten() {
                    Some(h) => format!("{name} [{h}]"),
                    None => name,
                };
                (file, shown)
            })
            .collect();
        listed.sort();
        listed
            .into_iter()
            .map(|(_, shown)| shown)
            .collect::<Vec<_>>()
    })
    .await
    .unwrap_or_default();
    Json(json!({"model_list": names}))
}

#[cfg(test)]
#[path = "controlnet_tests.rs"]
mod tests;
