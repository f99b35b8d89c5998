//! AUTOMATIC1111 request and answer shapes, translated to and from the native request.
//!
//! Nothing here checks a rule of its own: an A1111 body becomes a native `/generate` JSON object
//! (A1111's names and defaults mapped onto ours), which `validate` then checks like any other
//! request; its errors are renamed back to the field the client sent.

use serde_json::{json, Map, Value};

use crate::api::declared_types::DeclaredTypes;
use crate::error::ApiError;
use crate::validate::{DialectRules, ValidRequest};

pub use super::samplers::{resolve_sampler, Resolved, SAMPLERS, SCHEDULES};

/// A1111's defaults for absent fields (its `StableDiffusionProcessing` defaults).
pub const STEPS_DEFAULT: u64 = 50;
pub const CFG_DEFAULT: f64 = 7.0;
pub const SIZE_DEFAULT: u64 = 512;
pub const SAMPLER_DEFAULT: &str = "Euler";
pub const DENOISING_DEFAULT: f64 = 0.75;
/// `n_iter` runs batches one after another; bounded like `batch_size`.
pub const N_ITER_MAX: u64 = 8;

/// Which A1111 route a body came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Txt2Img,
    Img2Img,
}

/// An A1111 request in native terms.
#[derive(Debug, Clone, PartialEq)]
pub struct Translated {
    /// The native `/generate` body (its `seed` is the request's seed, drawn for `-1`).
    pub native: Map<String, Value>,
    /// The same, validated: the first batch's request.
    pub valid: ValidRequest,
    /// The resolved seed (A1111 draws a random one for `-1` before any batch runs).
    pub seed: u32,
    /// Batches run one after another; batch *k* starts at seed + k * batch_size.
    pub n_iter: u32,
    pub batch_size: u32,
    pub sampler: Resolved,
    /// What A1111 echoes as `parameters`: the body with its defaults filled in.
    pub parameters: Map<String, Value>,
    /// A1111 fields that were sent with a value we cannot honour, ignored as A1111 ignores
    /// fields it does not know (for the log).
    pub ignored: Vec<String>,
    /// The styles the prompts were given (`styles`, applied before translation:
    /// `crate::styles`), for `info`.
    pub styles: Vec<String>,
    /// Each of `valid.controlnets`' index in `alwayson_scripts.controlnet.args`.
    pub controlnet_args: Vec<usize>,
}

/// Native field names and the A1111 names clients send, for error messages.
pub const FIELD_NAMES: [(&str, &str); 26] = [
    // The object comes with the mask: a mask that failed its rules leaves it nothing to do.
    ("inpaint", "mask"),
    ("inpaint.mask_blur", "mask_blur"),
    ("inpaint.mask_blur_x", "mask_blur_x"),
    ("inpaint.mask_blur_y", "mask_blur_y"),
    ("inpaint.mask_invert", "inpainting_mask_invert"),
    ("inpaint.masked_content", "inpainting_fill"),
    ("inpaint.area", "inpaint_full_res"),
    ("inpaint.padding", "inpaint_full_res_padding"),
    ("inpaint.mask_round", "mask_round"),
    ("variation_seed", "subseed"),
    ("variation_strength", "subseed_strength"),
    ("seed_resize_from_width", "seed_resize_from_w"),
    ("seed_resize_from_height", "seed_resize_from_h"),
    ("guidance_scale", "cfg_scale"),
    ("eta", "eta"),
    ("scheduler", "sampler_name"),
    ("init_image", "init_images"),
    ("mask_image", "mask"),
    ("strength", "denoising_strength"),
    ("clip_skip", "override_settings.CLIP_stop_at_last_layers"),
    ("batch_size", "batch_size"),
    ("vae", "override_settings.sd_vae"),
    ("noise_multiplier", "initial_noise_multiplier"),
    ("extra_noise", "override_settings.img2img_extra_noise"),
    (
        "restore_faces.weight",
        "override_settings.code_former_weight",
    ),
    ("controlnets", super::controlnet::FIELD),
];

/// Fields whose values we use; every other A1111 field is accepted and ignored.
const USED: [&str; 45] = [
    "enable_hr",
    "resize_mode",
    "hr_scale",
    "hr_resize_x",
    "hr_resize_y",
    "hr_upscaler",
    "hr_second_pass_steps",
    "hr_prompt",
    "hr_negative_prompt",
    "hr_sampler_name",
    "hr_scheduler",
    "prompt",
    "negative_prompt",
    "steps",
    "cfg_scale",
    "eta",
    "width",
    "height",
    "seed",
    "sampler_name",
    "sampler_index",
    "scheduler",
    "batch_size",
    "n_iter",
    "denoising_strength",
    "init_images",
    "mask",
    "override_settings",
    "inpainting_mask_invert",
    "mask_blur",
    "mask_blur_x",
    "mask_blur_y",
    "inpainting_fill",
    "inpaint_full_res",
    "inpaint_full_res_padding",
    "mask_round",
    "tiling",
    "subseed",
    "subseed_strength",
    "seed_resize_from_w",
    "seed_resize_from_h",
    "styles",
    "alwayson_scripts",
    "initial_noise_multiplier",
    "restore_faces",
];

/// Treats explicit `null` as absent, as A1111's pydantic models do for optional fields.
pub(super) fn get<'a>(body: &'a Map<String, Value>, field: &str) -> Option<&'a Value> {
    body.get(field).filter(|v| !v.is_null())
}

pub(super) fn opt_str<'a>(
    body: &'a Map<String, Value>,
    field: &str,
) -> Result<Option<&'a str>, ApiError> {
    match get(body, field) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.as_str())),
        Some(_) => Err(ApiError::validation(field, "must be a string")),
    }
}

fn count(body: &Map<String, Value>, field: &str, max: u64) -> Result<u32, ApiError> {
    match get(body, field) {
        None => Ok(1),
        Some(v) => v
            .as_f64()
            .filter(|f| f.fract() == 0.0 && (1.0..=max as f64).contains(f))
            .map(|f| f as u32)
            .ok_or_else(|| {
                ApiError::validation(field, format!("must be an integer between 1 and {max}"))
            }),
    }
}

/// Whether the native request has a field yet (fields land one helper at a time).
fn native_has(field: &str) -> bool {
    crate::validate::FIELDS.contains(&field)
}

fn not_supported(field: &str, what: &str) -> ApiError {
    ApiError::validation(field, format!("{what} is not supported by this server yet"))
}

/// A1111's inpainting fields as the native `inpaint` object, with its API's defaults
/// (`StableDiffusionProcessingImg2Img`: blur 4 both ways, `inpainting_fill` 0 "fill",
/// `inpaint_full_res` true "only masked" with padding 0, no invert, `mask_round` true). `mask_blur` sets both
/// directions over `mask_blur_x`/`_y`, as its setter does. Types and ranges are the declared
/// schema's (checked before).
fn inpaint_options(body: &Map<String, Value>) -> Value {
    let int =
        |field: &str, default: i64| get(body, field).and_then(Value::as_i64).unwrap_or(default);
    let mut o = Map::new();
    match get(body, "mask_blur") {
        Some(v) => {
            o.insert("mask_blur".into(), v.clone());
        }
        None => {
            o.insert("mask_blur_x".into(), json!(int("mask_blur_x", 4)));
            o.insert("mask_blur_y".into(), json!(int("mask_blur_y", 4)));
        }
    }
    o.insert(
        "mask_invert".into(),
        json!(int("inpainting_mask_invert", 0) == 1),
    );
    let fill = usize::try_from(int("inpainting_fill", 0)).unwrap_or(0);
    let names = crate::validate::native_inpaint::MASKED_CONTENT;
    o.insert(
        "masked_content".into(),
        json!(names.get(fill).map_or("fill", |(n, _)| n)),
    );
    let only_masked = get(body, "inpaint_full_res")
        .and_then(Value::as_bool)
        .unwrap_or(true);
    o.insert(
        "area".into(),
        json!(if only_masked { "only_masked" } else { "whole" }),
    );
    o.insert("padding".into(), json!(int("inpaint_full_res_padding", 0)));
    let round = get(body, "mask_round").and_then(Value::as_bool);
    o.insert("mask_round".into(), json!(round.unwrap_or(true)));
    Value::Object(o)
}

/// A1111's face restoration as the native `restore_faces`, or `None` when off. On when
/// `restore_faces` is true, or absent (null) and the `face_restoration` option is (A1111's
/// `process_images`); CodeFormer's weight is the `code_former_weight` option (A1111 1.9+
/// passes it as `weight=`; 1.8's `w=` was ignored, every weight running as 0.5). The
/// `face_restoration_model` option must name CodeFormer, the one restorer here.
fn restore_faces<'a>(
    sent: Option<&Value>,
    setting: impl Fn(&str) -> Option<&'a Value>,
) -> Result<Option<Value>, ApiError> {
    let on = match sent {
        Some(Value::Bool(b)) => *b,
        Some(_) => {
            return Err(ApiError::validation(
                "restore_faces",
                "must be true or false",
            ))
        }
        None => match setting("face_restoration") {
            None => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => {
                return Err(ApiError::validation(
                    "override_settings.face_restoration",
                    "must be true or false",
                ))
            }
        },
    };
    if !on {
        return Ok(None);
    }
    let name = sdserve_pipeline::face_restore::restorer::NAME;
    if let Some(model) = setting("face_restoration_model") {
        if model.as_str() != Some(name) {
            return Err(ApiError::validation(
                "override_settings.face_restoration_model",
                format!("must be {name:?}, the face restorer this server runs (got {model})"),
            ));
        }
    }
    let mut restore = Map::new();
    if let Some(weight) = setting("code_former_weight") {
        restore.insert("weight".into(), weight.clone());
    }
    Ok(Some(Value::Object(restore)))
}

/// Translates an A1111 `txt2img`/`img2img` body. `options` are the server-wide options set
/// through `POST options` (A1111 applies them to every request; `override_settings` wins):
/// `CLIP_stop_at_last_layers` and `img2img_fix_steps` are read.
pub fn translate(
    body: &Map<String, Value>,
    mode: Mode,
    options: &Map<String, Value>,
    random_seed: impl FnOnce() -> u32,
) -> Result<Translated, ApiError> {
    static TYPES: std::sync::LazyLock<DeclaredTypes> =
        std::sync::LazyLock::new(DeclaredTypes::of::<super::schema::A1111Request>);
    TYPES.check(body)?;
    let mut native = Map::new();
    let mut parameters = body.clone();
    let mut fill = |k: &str, v: Value| {
        if get(&parameters, k).is_none() {
            parameters.insert(k.to_string(), v);
        }
    };
    fill("steps", json!(STEPS_DEFAULT));
    fill("cfg_scale", json!(CFG_DEFAULT));
    fill("width", json!(SIZE_DEFAULT));
    fill("height", json!(SIZE_DEFAULT));
    fill("seed", json!(-1));
    fill("batch_size", json!(1));
    fill("n_iter", json!(1));
    fill("seed_resize_from_w", json!(-1));
    fill("seed_resize_from_h", json!(-1));
    if mode == Mode::Img2Img {
        fill("denoising_strength", json!(DENOISING_DEFAULT));
        // `StableDiffusionProcessingImg2Img`'s inpainting defaults (`mask_blur` stays null).
        fill("mask_blur_x", json!(4));
        fill("mask_blur_y", json!(4));
        fill("inpainting_fill", json!(0));
        fill("inpaint_full_res", json!(true));
        fill("inpaint_full_res_padding", json!(0));
        fill("inpainting_mask_invert", json!(0));
        fill("mask_round", json!(true));
    }

    native.insert(
        "prompt".into(),
        get(body, "prompt").cloned().unwrap_or(json!("")),
    );
    if let Some(v) = get(body, "negative_prompt") {
        native.insert("negative_prompt".into(), v.clone());
    }
    for (ours, theirs, default) in [
        ("steps", "steps", json!(STEPS_DEFAULT)),
        ("guidance_scale", "cfg_scale", json!(CFG_DEFAULT)),
        ("width", "width", json!(SIZE_DEFAULT)),
        ("height", "height", json!(SIZE_DEFAULT)),
    ] {
        native.insert(ours.into(), get(body, theirs).cloned().unwrap_or(default));
    }
    // A1111's CFG denoiser runs the negative prompt at every scale (its API takes cfg_scale 0).
    native.insert("guidance_rule".into(), json!("a1111"));

    // `eta` (webuiapi always sends 1.0): A1111 gives it to the samplers that take one; absent
    // or null, each sampler's default (its eta_ddim and eta_ancestral options).
    if let Some(v) = get(body, "eta") {
        native.insert("eta".into(), v.clone());
    }

    // Seed: -1 (or absent) draws one now, so every batch of the request follows from it;
    // anything else is the native rule's to check.
    match get(body, "seed") {
        Some(v) if v.as_f64() != Some(-1.0) => native.insert("seed".into(), v.clone()),
        _ => native.insert("seed".into(), json!(random_seed())),
    };

    let sampler_field = if get(body, "sampler_name").is_some() {
        "sampler_name"
    } else {
        "sampler_index"
    };
    let sampler = resolve_sampler(
        sampler_field,
        opt_str(body, "sampler_name")?.or(opt_str(body, "sampler_index")?),
        opt_str(body, "scheduler")?,
    )?;
    native.insert("scheduler".into(), json!(sampler.kind.name()));
    native.insert("schedule".into(), json!(sampler.sigmas.name()));

    let batch_size = count(body, "batch_size", u64::MAX)?;
    if batch_size != 1 {
        if !native_has("batch_size") {
            return Err(not_supported("batch_size", "batch_size above 1"));
        }
        native.insert("batch_size".into(), json!(batch_size));
    }
    let n_iter = count(body, "n_iter", N_ITER_MAX)?;

    let setting = |name: &str| {
        get(body, "override_settings")
            .and_then(|o| o.get(name))
            .filter(|v| !v.is_null())
            .or(options.get(name).filter(|v| !v.is_null()))
    };
    let clip_skip = setting("CLIP_stop_at_last_layers");
    if let Some(v) = clip_skip {
        if v.as_f64() != Some(1.0) {
            if !native_has("clip_skip") {
                return Err(not_supported(
                    "override_settings.CLIP_stop_at_last_layers",
                    "CLIP skip",
                ));
            }
            native.insert("clip_skip".into(), v.clone());
        }
    }

    // How a ControlNet unit without an image fits the init image (A1111's `resize_mode`).
    let mut init_fit = super::controlnet_fit::ResizeMode::Resize;
    if mode == Mode::Img2Img {
        let images = match get(body, "init_images") {
            Some(Value::Array(a)) => a,
            Some(_) => {
                return Err(ApiError::validation(
                    "init_images",
                    "must be a list of base64 images",
                ))
            }
            None => {
                return Err(ApiError::validation(
                    "init_images",
                    "is required (one base64 image)",
                ))
            }
        };
        if images.len() != 1 {
            return Err(ApiError::validation(
                "init_images",
                format!("must hold exactly one image (got {})", images.len()),
            ));
        }
        if !native_has("init_image") {
            return Err(not_supported("init_images", "img2img"));
        }
        // A null here would read as "no init image" natively: img2img would silently run
        // text to image.
        if !images[0].is_string() {
            return Err(ApiError::validation(
                "init_images",
                "must hold one base64 image (a string)",
            ));
        }
        native.insert("init_image".into(), images[0].clone());
        native.insert(
            "strength".into(),
            get(body, "denoising_strength")
                .cloned()
                .unwrap_or(json!(DENOISING_DEFAULT)),
        );
        if let Some(mask) = get(body, "mask") {
            if !native_has("mask_image") {
                return Err(not_supported("mask", "inpainting"));
            }
            native.insert("mask_image".into(), mask.clone());
            native.insert("inpaint".into(), inpaint_options(body));
        }
        init_fit = super::img2img_resize::fit_init_image(body, &mut native);
    }

    // Variation seed: `subseed` -1 (or absent) draws one now, as A1111's `fix_seed` does;
    // only a non-zero `subseed_strength` uses it (A1111 ignores the subseed otherwise; its
    // type and range are checked either way, by `TYPES`).
    if let Some(strength) = get(body, "subseed_strength") {
        native.insert("variation_strength".into(), strength.clone());
        if strength.as_f64().is_some_and(|s| s != 0.0) {
            match get(body, "subseed") {
                Some(v) if v.as_f64() != Some(-1.0) => {
                    native.insert("variation_seed".into(), v.clone())
                }
                _ => native.insert("variation_seed".into(), json!(crate::api::random_seed())),
            };
        }
    }
    // Seed resize: on when both sides are above 0, as A1111's `ImageRNG` (0 or -1 on either
    // side is off there, and so here); then the native fields' rules hold.
    let resize_side = |field: &str| match get(body, field) {
        None => Ok(None),
        Some(v) => match v.as_i64() {
            Some(n) => Ok((n > 0).then(|| v.clone())),
            None => Err(ApiError::validation(field, "must be an integer")),
        },
    };
    let resize_w = resize_side("seed_resize_from_w")?;
    if let (Some(w), Some(h)) = (resize_w, resize_side("seed_resize_from_h")?) {
        native.insert("seed_resize_from_width".into(), w);
        native.insert("seed_resize_from_height".into(), h);
    }

    // The sd-webui-controlnet extension's units, their images fitted to the request's size
    // (in img2img: the init image for a unit without one, and "only masked"'s crop).
    let side = |k: &str| native.get(k).and_then(Value::as_u64);
    let hires_pass = mode == Mode::Txt2Img && get(body, "enable_hr") == Some(&Value::Bool(true));
    let img2img = match mode {
        Mode::Img2Img if super::controlnet::has_units(body) => {
            // A broken size is the native rule's to report: any size does meanwhile.
            let size = |k: &str| side(k).unwrap_or(SIZE_DEFAULT) as usize;
            Some(super::controlnet_img2img::input(
                body,
                native.get("inpaint"),
                size("width"),
                size("height"),
                init_fit,
            )?)
        }
        _ => None,
    };
    let units = super::controlnet::native_units(
        body,
        super::controlnet_modules::numpy_seed(native.get("seed"), get(body, "subseed")),
        hires_pass,
        side("width"),
        side("height"),
        img2img.as_ref(),
    )?;
    if let Some(u) = units
        .as_ref()
        .filter(|u| u.native.as_array().is_some_and(|a| !a.is_empty()))
    {
        native.insert("controlnets".into(), u.native.clone());
    }

    // A1111 1.10's step rule for img2img and the hires pass (`setup_img2img_steps`):
    // `img2img_fix_steps` runs img2img as the hires pass, exactly `steps` steps.
    let fix_steps = match setting("img2img_fix_steps") {
        None | Some(Value::Bool(false)) => false,
        Some(Value::Bool(true)) => true,
        Some(_) => {
            return Err(ApiError::validation(
                "override_settings.img2img_fix_steps",
                "must be true or false",
            ))
        }
    };

    // `tiling` is the native field of the same name (A1111: circular padding in every Conv2d).
    if let Some(v) = get(body, "tiling") {
        native.insert("tiling".into(), v.clone());
    }

    if let Some(restore) = restore_faces(get(body, "restore_faces"), setting)? {
        native.insert("restore_faces".into(), restore);
    }

    let enable_hr = match get(body, "enable_hr") {
        None => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(ApiError::validation("enable_hr", "must be true or false")),
    };

    // Where a strength runs (plain text-to-image stays the native request as it is).
    if mode == Mode::Img2Img || enable_hr {
        let rule = if fix_steps {
            "a1111_fix_steps"
        } else {
            "a1111"
        };
        native.insert("step_rule".into(), json!(rule));
        // A1111 1.10's `img2img_extra_noise` (both `sample_img2img`s: img2img and the hires
        // pass) and img2img's `initial_noise_multiplier` (the request's, else the option's).
        if let Some(v) = setting("img2img_extra_noise") {
            native.insert("extra_noise".into(), v.clone());
        }
        let multiplier =
            get(body, "initial_noise_multiplier").or_else(|| setting("initial_noise_multiplier"));
        if let (Mode::Img2Img, Some(v)) = (mode, multiplier) {
            native.insert("noise_multiplier".into(), v.clone());
        }
    }

    super::sampler_params::add_native(|f| get(body, f), setting, &mut native);

    // A1111's prompt defaults to "" (webuiapi sends that): empty is fine here, not natively.
    let mut valid =
        crate::validate::validate_request(&native, DialectRules::A1111).map_err(a1111_names)?;
    if let Some(u) = &units {
        u.name_preprocessors(&mut valid);
    }
    // Hires fix is txt2img's (A1111's img2img has no such pass).
    let mut hires_size = None;
    if enable_hr && mode == Mode::Txt2Img {
        let second = super::translate_hires::hires(body, &valid, &sampler)?;
        if let Some(u) = &units {
            u.fit_hires(&mut valid, second.params.width, second.params.height);
        }
        hires_size = Some((second.params.width, second.params.height));
        valid.hires = Some(second);
    }
    if let Some(u) = &units {
        u.paint_lama(&mut valid, hires_size)?;
    }
    let ignored = body
        .iter()
        .filter(|(k, v)| {
            !USED.contains(&k.as_str())
                && !super::sampler_params::FIELDS.contains(&k.as_str())
                && !is_default_like(v)
        })
        .map(|(k, _)| k.clone())
        .collect();
    Ok(Translated {
        seed: valid.seed.unwrap_or_default(),
        valid,
        native,
        n_iter,
        batch_size,
        sampler,
        parameters,
        ignored,
        controlnet_args: units.map(|u| u.args).unwrap_or_default(),
        styles: body
            .get("styles")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default(),
    })
}

/// Values A1111 clients send for features left off (`false`, `0`, `""`, `[]`, `{}`, `null`).
fn is_default_like(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Bool(b) => !b,
        Value::Number(n) => n.as_f64() == Some(0.0),
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
    }
}

/// Renames native field names in a validation error to the A1111 names the client sent.
pub fn a1111_names(e: ApiError) -> ApiError {
    let e = super::super::rename_fields(e, &FIELD_NAMES);
    super::super::rename_fields(e, &super::sampler_params::FIELD_NAMES)
}

#[cfg(test)]
#[path = "translate_tests.rs"]
mod tests;
