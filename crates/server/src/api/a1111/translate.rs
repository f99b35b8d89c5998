//! AUTOMATIC1111 request and answer shapes, translated to and from the native request.
//!
//! Nothing here checks a rule of its own: an A1111 body becomes a native `/generate` JSON object
//! (A1111's names and defaults mapped onto ours), which `validate` then checks like any other
//! request; its errors are renamed back to the field the client sent.

use sdserve_pipeline::schedulers::SigmaSchedule;
use serde_json::{json, Map, Value};

use crate::api::declared_types::DeclaredTypes;
use crate::error::ApiError;
use crate::validate::{PromptRule, ValidRequest};

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
}

/// Native field names and the A1111 names clients send, for error messages.
pub const FIELD_NAMES: [(&str, &str); 11] = [
    ("variation_seed", "subseed"),
    ("variation_strength", "subseed_strength"),
    ("seed_resize_from_width", "seed_resize_from_w"),
    ("seed_resize_from_height", "seed_resize_from_h"),
    ("guidance_scale", "cfg_scale"),
    ("scheduler", "sampler_name"),
    ("init_image", "init_images"),
    ("mask_image", "mask"),
    ("strength", "denoising_strength"),
    ("clip_skip", "override_settings.CLIP_stop_at_last_layers"),
    ("batch_size", "batch_size"),
];

/// Fields whose values we use; every other A1111 field is accepted and ignored.
const USED: [&str; 33] = [
    "enable_hr",
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
    "tiling",
    "subseed",
    "subseed_strength",
    "seed_resize_from_w",
    "seed_resize_from_h",
    "styles",
];

/// Treats explicit `null` as absent, as A1111's pydantic models do for optional fields.
fn get<'a>(body: &'a Map<String, Value>, field: &str) -> Option<&'a Value> {
    body.get(field).filter(|v| !v.is_null())
}

fn opt_str<'a>(body: &'a Map<String, Value>, field: &str) -> Result<Option<&'a str>, ApiError> {
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

/// Translates an A1111 `txt2img`/`img2img` body. `clip_skip_option` is the server-wide
/// `CLIP_stop_at_last_layers` set through `POST options` (A1111 applies it to every request).
pub fn translate(
    body: &Map<String, Value>,
    mode: Mode,
    clip_skip_option: Option<&Value>,
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

    let clip_skip = get(body, "override_settings")
        .and_then(|o| o.get("CLIP_stop_at_last_layers"))
        .filter(|v| !v.is_null())
        .or(clip_skip_option);
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
            if get(body, "inpainting_mask_invert").and_then(Value::as_f64) == Some(1.0) {
                return Err(not_supported(
                    "inpainting_mask_invert",
                    "an inverted mask (1)",
                ));
            }
            native.insert("mask_image".into(), mask.clone());
        }
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

    // `tiling` is the native field of the same name (A1111: circular padding in every Conv2d).
    if let Some(v) = get(body, "tiling") {
        native.insert("tiling".into(), v.clone());
    }

    let enable_hr = match get(body, "enable_hr") {
        None => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(ApiError::validation("enable_hr", "must be true or false")),
    };

    // A1111's prompt defaults to "" (webuiapi sends that): empty is fine here, not natively.
    let mut valid =
        crate::validate::validate_request(&native, PromptRule::MayBeEmpty).map_err(a1111_names)?;
    // Hires fix is txt2img's (A1111's img2img has no such pass).
    if enable_hr && mode == Mode::Txt2Img {
        valid.hires = Some(hires(body, &valid, &sampler)?);
    }
    let ignored = body
        .iter()
        .filter(|(k, v)| !USED.contains(&k.as_str()) && !is_default_like(v))
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

/// The second pass of `enable_hr`: its fields checked by the one validation place, and its
/// sampler as A1111 runs it (`StableDiffusionProcessingTxt2Img`): `hr_sampler_name or
/// sampler_name` on `hr_scheduler`, which defaults to the first pass's `p.scheduler`, then to
/// the sampler's own (`Automatic`, in `get_sigmas`); "Use same ..." (the web UI's) is absent.
/// A sampler or schedule other than the first pass's is the pass's own.
fn hires(
    body: &Map<String, Value>,
    first: &ValidRequest,
    first_sampler: &Resolved,
) -> Result<crate::validate::hires::ValidHires, ApiError> {
    let same = |field: &str| -> Result<Option<&str>, ApiError> {
        Ok(opt_str(body, field)?.filter(|v| !v.is_empty() && !v.starts_with("Use same")))
    };
    let (name, schedule) = (same("hr_sampler_name")?, same("hr_scheduler")?);
    let sampler = match (name, schedule) {
        (None, None) => None,
        _ => {
            let first_name = opt_str(body, "sampler_name")?.or(opt_str(body, "sampler_index")?);
            let r = resolve_sampler(
                if name.is_some() {
                    "hr_sampler_name"
                } else {
                    "hr_scheduler"
                },
                name.or(first_name),
                schedule.or(first_pass_scheduler(body, first_sampler)?),
            )?;
            ((r.kind, r.sigmas) != (first_sampler.kind, first_sampler.sigmas)).then(|| {
                let (first_name, first_label) = crate::validate::hires::a1111_sampler_of(
                    first_sampler.kind,
                    Some(first_sampler.sigmas),
                );
                crate::validate::hires::HiresSampler::new(
                    r.kind,
                    Some(r.sigmas),
                    Some(first_name),
                    first_label,
                )
            })
        }
    };
    let fields: Map<String, Value> = crate::validate::hires::FIELDS
        .iter()
        .filter_map(|f| get(body, f).map(|v| (f.to_string(), v.clone())))
        .collect();
    crate::validate::hires::validate_hires(&fields, first, sampler)
}

/// The first pass's `p.scheduler` as A1111's API sets it, which an absent `hr_scheduler`
/// takes: the request's `scheduler`, else the schedule written after the sampler's name
/// (`Euler Karras`) unless it is that sampler's own (`get_sampler_and_scheduler` turns
/// `DPM++ 2M Karras` into `Automatic`); `None`: Automatic.
fn first_pass_scheduler<'a>(
    body: &'a Map<String, Value>,
    first: &Resolved,
) -> Result<Option<&'a str>, ApiError> {
    if let Some(s) = opt_str(body, "scheduler")?.filter(|s| !s.is_empty()) {
        return Ok(Some(s));
    }
    let own = SAMPLERS
        .iter()
        .find(|s| s.name == first.sampler)
        .is_some_and(|s| s.automatic != SigmaSchedule::Uniform && s.automatic == first.sigmas);
    Ok((first.schedule != "Automatic" && !own).then(|| {
        SCHEDULES
            .iter()
            .find(|(_, label)| *label == first.schedule)
            .map_or("automatic", |(name, _)| *name)
    }))
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
    super::super::rename_fields(e, &FIELD_NAMES)
}

#[cfg(test)]
mod tests {
    use super::*;
    use sdserve_pipeline::schedulers::SchedulerKind;

    fn field_of(e: ApiError) -> String {
        match e.fields() {
            [first, ..] => first.field.clone(),
            _ => panic!("expected a validation error, got {e:?}"),
        }
    }

    fn tr(body: Value, mode: Mode) -> Result<Translated, ApiError> {
        translate(body.as_object().unwrap(), mode, None, || 1234)
    }

    #[test]
    fn a1111_defaults_apply_to_absent_and_null_fields() {
        let t = tr(json!({"prompt": "a cat", "negative_prompt": null, "steps": null, "seed": -1, "sampler_name": null, "enable_hr": false, "styles": []}), Mode::Txt2Img).unwrap();
        assert_eq!(
            Value::Object(t.native.clone()),
            json!({"prompt": "a cat", "steps": 50, "guidance_scale": 7.0, "width": 512, "height": 512, "seed": 1234, "scheduler": "euler", "schedule": "uniform"})
        );
        assert_eq!((t.seed, t.n_iter, t.batch_size), (1234, 1, 1));
        assert!(t.ignored.is_empty(), "{:?}", t.ignored);
        assert_eq!(t.parameters["steps"], 50);
        assert_eq!(t.parameters["seed"], -1);
        let v = &t.valid;
        assert_eq!((v.steps, v.guidance_scale, v.seed), (50, 7.0, Some(1234)));
    }

    #[test]
    fn seed_resize_is_on_when_both_sides_are_above_0_as_in_a1111() {
        let t = tr(
            json!({"prompt": "p", "seed_resize_from_w": 512, "seed_resize_from_h": 768}),
            Mode::Txt2Img,
        )
        .unwrap();
        assert_eq!(t.native["seed_resize_from_width"], 512);
        assert_eq!(t.native["seed_resize_from_height"], 768);
        let from = t.valid.seed_resize_from.expect("a seed resize");
        assert_eq!((from.width, from.height), (512, 768));
        for (w, h) in [(0, 512), (512, -1), (-1, -1), (0, 0), (-7, 64)] {
            let body = json!({"prompt": "p", "seed_resize_from_w": w, "seed_resize_from_h": h});
            let t = tr(body, Mode::Txt2Img).unwrap();
            assert_eq!(t.valid.seed_resize_from, None, "{w}x{h}");
            assert!(!t.native.contains_key("seed_resize_from_width"));
        }
        assert_eq!(t.parameters["seed_resize_from_w"], 512);
        let absent = tr(json!({"prompt": "p"}), Mode::Txt2Img).unwrap();
        assert_eq!(absent.parameters["seed_resize_from_h"], -1);
        // The native rules, named as sent.
        for (body, field) in [
            (
                json!({"seed_resize_from_w": 4096, "seed_resize_from_h": 512}),
                "seed_resize_from_w",
            ),
            (
                json!({"seed_resize_from_w": 512, "seed_resize_from_h": 32}),
                "seed_resize_from_h",
            ),
            (json!({"seed_resize_from_w": "512"}), "seed_resize_from_w"),
            (json!({"seed_resize_from_h": 1.5}), "seed_resize_from_h"),
        ] {
            let mut body = body;
            body["prompt"] = json!("p");
            let e = tr(body.clone(), Mode::Txt2Img).unwrap_err();
            assert_eq!(field_of(e), field, "{body}");
        }
    }

    #[test]
    fn the_prompt_may_be_empty_or_absent_as_in_a1111() {
        for body in [
            json!({}),
            json!({"prompt": ""}),
            json!({"prompt": null}),
            json!({"prompt": " \n "}),
            json!({"prompt": "", "negative_prompt": "blurry"}),
        ] {
            let t = tr(body.clone(), Mode::Txt2Img).unwrap_or_else(|e| panic!("{body}: {e:?}"));
            assert_eq!(t.valid.prompt, "", "{body}");
        }
        // The native rule is unchanged: there a prompt is required and not empty.
        for body in [json!({}), json!({"prompt": ""})] {
            let native = body.as_object().unwrap();
            let e = crate::validate::validate_object(native).unwrap_err();
            assert_eq!(field_of(e), "prompt", "{body}");
        }
    }

    #[test]
    fn values_map_and_errors_name_a1111_fields() {
        let t = tr(json!({"prompt": "p", "cfg_scale": 3.5, "seed": 7, "steps": 4, "width": 256, "height": 320, "sampler_name": "DPM++ 2M", "scheduler": "Karras", "n_iter": 3, "enable_hr": true, "restore_faces": true}), Mode::Txt2Img).unwrap();
        assert_eq!(t.native["guidance_scale"], 3.5);
        assert_eq!(t.native["scheduler"], "dpmpp_2m_karras");
        assert_eq!((t.seed, t.n_iter), (7, 3));
        assert_eq!(t.ignored, vec!["restore_faces".to_string()]);
        // enable_hr: A1111's defaults (hr_scale 2, Latent) from 256x320.
        let h = t.valid.hires.as_ref().expect("a hires pass").params.clone();
        assert_eq!((h.width, h.height, h.steps), (512, 640, 4));
        assert_eq!(
            h.upscaler,
            crate::validate::hires::upscaler_named("Latent").unwrap()
        );
        // Its own sampler only when it differs; "Use same sampler" is the first pass's.
        let hr = |extra: Value| {
            let mut body = json!({"prompt": "p", "width": 256, "height": 256, "enable_hr": true,
                                  "hr_scale": 1.25, "sampler_name": "Euler"});
            for (k, v) in extra.as_object().unwrap() {
                body[k] = v.clone();
            }
            tr(body, Mode::Txt2Img).map(|t| t.valid.hires.unwrap().params.scheduler)
        };
        assert_eq!(
            hr(json!({"hr_sampler_name": "Use same sampler"})).unwrap(),
            None
        );
        assert_eq!(hr(json!({"hr_sampler_name": "Euler"})).unwrap(), None);
        assert_eq!(
            hr(json!({"hr_sampler_name": "DPM++ 2M"})).unwrap(),
            Some(sdserve_pipeline::schedulers::SchedulerKind::DpmPp2mKarras)
        );
        assert_eq!(
            field_of(hr(json!({"hr_sampler_name": "X"})).unwrap_err()),
            "hr_sampler_name"
        );
        // Native rules apply; the error names cfg_scale, not guidance_scale.
        let e = tr(json!({"prompt": "p", "cfg_scale": 31}), Mode::Txt2Img).unwrap_err();
        assert_eq!(field_of(e), "cfg_scale");
        let e = tr(json!({"prompt": 5}), Mode::Txt2Img).unwrap_err();
        assert_eq!(field_of(e), "prompt");
        let long = "p".repeat(501);
        let e = tr(json!({ "prompt": long }), Mode::Txt2Img).unwrap_err();
        assert_eq!(field_of(e), "prompt");
        assert_eq!(
            field_of(tr(json!({"prompt": "p", "seed": -2}), Mode::Txt2Img).unwrap_err()),
            "seed"
        );
        assert_eq!(
            field_of(tr(json!({"prompt": "p", "n_iter": 9}), Mode::Txt2Img).unwrap_err()),
            "n_iter"
        );
        assert_eq!(
            field_of(tr(json!({"prompt": "p", "sampler_name": 3}), Mode::Txt2Img).unwrap_err()),
            "sampler_name"
        );
        assert_eq!(
            field_of(tr(json!({"prompt": "p"}), Mode::Img2Img).unwrap_err()),
            "init_images"
        );
        // Found by fuzzing: `[null]` ran text to image on the img2img route.
        for images in [json!([null]), json!([5]), json!([["x"]])] {
            let e = tr(json!({"prompt": "p", "init_images": images}), Mode::Img2Img).unwrap_err();
            assert_eq!(field_of(e), "init_images");
        }
    }

    /// The hires pass's scheduler, sigma schedule and infotext keys for `first` + `extra`.
    fn hires_run(
        first: Value,
        extra: Value,
    ) -> (
        Option<SchedulerKind>,
        Option<SigmaSchedule>,
        Vec<(&'static str, String)>,
    ) {
        let mut body = json!({"prompt": "p", "width": 256, "height": 256, "enable_hr": true,
                              "hr_scale": 1.25});
        for (k, v) in first
            .as_object()
            .unwrap()
            .iter()
            .chain(extra.as_object().unwrap())
        {
            body[k] = v.clone();
        }
        let h = tr(body, Mode::Txt2Img).unwrap().valid.hires.unwrap();
        let keys = h
            .infotext
            .into_iter()
            .filter(|(k, _)| k.starts_with("Hires s"))
            .collect();
        (h.params.scheduler, h.params.schedule, keys)
    }

    #[test]
    fn the_hires_schedule_is_a1111_s_hr_scheduler() {
        use SchedulerKind as K;
        use SigmaSchedule as S;
        let euler = json!({"sampler_name": "Euler"});
        let label = |k: &'static str, v: &str| vec![(k, v.to_string())];
        // The first pass's sampler on another schedule type runs on that schedule (it fell
        // back to the first pass's uniform sigmas), with A1111's `Hires schedule type` only.
        assert_eq!(
            hires_run(
                euler.clone(),
                json!({"hr_sampler_name": "Euler", "hr_scheduler": "Exponential"})
            ),
            (
                Some(K::Euler),
                Some(S::Exponential),
                label("Hires schedule type", "Exponential")
            )
        );
        assert_eq!(
            hires_run(euler.clone(), json!({"hr_scheduler": "Karras"})),
            (
                Some(K::EulerKarras),
                Some(S::Karras),
                label("Hires schedule type", "Karras")
            )
        );
        assert_eq!(
            hires_run(
                euler.clone(),
                json!({"hr_sampler_name": "Euler", "hr_scheduler": "Automatic"})
            ),
            (None, None, vec![])
        );
        // An absent hr_scheduler is the first pass's `scheduler`...
        let euler_exp = json!({"sampler_name": "Euler", "scheduler": "Exponential"});
        assert_eq!(
            hires_run(euler_exp.clone(), json!({"hr_sampler_name": "DPM++ 2M"})),
            (
                Some(K::DpmPp2m),
                Some(S::Exponential),
                label("Hires sampler", "DPM++ 2M")
            )
        );
        assert_eq!(
            hires_run(euler_exp, json!({"hr_sampler_name": "Euler"})),
            (None, None, vec![])
        );
        // ... or the schedule in its sampler's name, unless it is that sampler's own.
        assert_eq!(
            hires_run(
                json!({"sampler_name": "Euler Karras"}),
                json!({"hr_sampler_name": "LMS"})
            )
            .0,
            Some(K::LmsKarras)
        );
        let (kind, schedule, keys) = hires_run(
            json!({"sampler_name": "DPM++ 2M Karras"}),
            json!({"hr_sampler_name": "Euler"}),
        );
        assert_eq!((kind, schedule), (Some(K::Euler), Some(S::Uniform)));
        assert_eq!(
            keys,
            [
                ("Hires sampler", "Euler".to_string()),
                ("Hires schedule type", "Uniform".to_string())
            ]
        );
        // The first pass's own automatic schedule named again: no pass of its own.
        assert_eq!(
            hires_run(
                json!({"sampler_name": "DPM++ 2M"}),
                json!({"hr_scheduler": "Karras"})
            ),
            (None, None, vec![])
        );
    }
}
