//! Every rule of `POST /generate` (the contract: README's field table, `/openapi.json`), in one place.
//!
//! The body is parsed to a JSON value first and each field checked by hand, so every error can
//! name its field. Status choice (documented in the OpenAPI description too):
//! - 400 `invalid_json`: not JSON at all, not an object, or not sent as `application/json`;
//! - 422 `validation_error`: everything about fields: missing, wrong type, out of range, and
//!   unknown fields. Every broken field is reported at once: `details` names them all and the
//!   body's `fields` lists them (see [`FieldReader`]). `null` means the default for every
//!   optional field.

use sdserve_pipeline::controlnet::preprocess::Preprocessor;
use sdserve_pipeline::image_in::resize_lanczos;
use sdserve_pipeline::pipeline::{GuidanceRule, PromptSyntax, RgbImage, SeedResize};
use sdserve_pipeline::prompt::parse_attention;
use sdserve_pipeline::schedulers::{SchedulerKind, SigmaSchedule};
use serde_json::{Map, Value};

use crate::error::ApiError;
use crate::images::RequestImage;

mod controlnets;
pub mod extras;
mod fields;
mod for_model;
pub mod hires;
mod ip_adapters;
mod native_hires;
pub mod native_inpaint;
pub mod preprocessor;
pub mod resize_mode;
pub mod sampler_params;
mod schedule;
pub mod steps;
#[cfg(test)]
mod tests;
mod valid_request;

pub use controlnets::ValidControlNet;
use fields::FieldReader;
pub use for_model::{check_limits, check_loras, check_memory};
#[cfg(test)]
pub use ip_adapters::{extension_run, first_channel};
pub use ip_adapters::{A1111IpUnit, IpAdapterFiles, ValidIpAdapter, IP_ADAPTERS_MAX};
/// The keys of the native `hires` object.
#[cfg(test)]
pub use native_hires::FIELDS as HIRES_FIELDS;
pub use schedule::check_prompts_for_model;
pub use valid_request::ValidRequest;

pub const PROMPT_MAX_CHARS: usize = 500;
pub const STEPS_MIN: u64 = 1;
pub const STEPS_MAX: u64 = 50;
pub const STEPS_DEFAULT: usize = 20;
pub const SIZE_MIN: u64 = 256;
pub const SIZE_MAX: u64 = 768;
pub const SIZE_MULTIPLE: u64 = 64;
pub const SIZE_DEFAULT: usize = 512;
pub const SEED_MAX: u64 = u32::MAX as u64;
pub const GUIDANCE_MIN: f64 = 0.0;
pub const GUIDANCE_MAX: f64 = 30.0;
pub const GUIDANCE_DEFAULT: f64 = 7.5;
pub const BATCH_MIN: u64 = 1;
pub const BATCH_MAX: u64 = 8;
pub const STRENGTH_DEFAULT: f64 = 0.8;
/// `guidance_rule`'s names.
const GUIDANCE_RULES: [(&str, GuidanceRule); 2] = [
    ("diffusers", GuidanceRule::Diffusers),
    ("a1111", GuidanceRule::A1111),
];

/// The fields of `POST /generate`; anything else is a 422 naming it. The OpenAPI schema's
/// properties must be these (tested).
pub const FIELDS: [&str; 42] = [
    "prompt",
    "negative_prompt",
    "steps",
    "width",
    "height",
    "seed",
    "guidance_scale",
    "guidance_rule",
    "eta",
    "scheduler",
    "schedule",
    "prompt_syntax",
    "clip_skip",
    "loras",
    "batch_size",
    "init_image",
    "strength",
    "mask_image",
    "resize_mode",
    "hires",
    "model",
    "vae",
    "tiling",
    "variation_seed",
    "variation_strength",
    "seed_resize_from_width",
    "seed_resize_from_height",
    "controlnets",
    "ip_adapters",
    "inpaint",
    "step_rule",
    "noise_multiplier",
    "extra_noise",
    "sigma_churn",
    "sigma_tmin",
    "sigma_tmax",
    "sigma_noise",
    "negative_guidance_min_sigma",
    "negative_guidance_all_steps",
    "negative_guidance_skip_early",
    "restore_faces",
    // Applied to the prompts before validation (crate::styles).
    "styles",
];
/// The longest model name a request may give (a file or folder name).
pub const MODEL_NAME_MAX_CHARS: usize = 255;
pub const CLIP_SKIP_MAX: u64 = 4;
/// A1111's own clip skip range (its `CLIP_stop_at_last_layers` slider, 1..=12, in
/// `modules/shared_options.py`), which its dialect takes; the model's limit still holds.
pub const A1111_CLIP_SKIP_MAX: u64 = 12;
pub const LORAS_MAX: usize = 8;
pub const LORA_WEIGHT_MIN: f64 = -4.0;
pub const LORA_WEIGHT_MAX: f64 = 4.0;
/// A seed resize's "from" sides: the sizes A1111's UI makes (its width and height sliders).
pub const SEED_RESIZE_MIN: u64 = 64;
pub const SEED_RESIZE_MAX: u64 = 2048;

/// Checks the `Content-Type` header value: JSON is required.
pub fn check_content_type(value: Option<&str>) -> Result<(), ApiError> {
    let ok = value
        .and_then(|v| v.split(';').next())
        .map(|m| {
            let m = m.trim().to_ascii_lowercase();
            m == "application/json" || (m.starts_with("application/") && m.ends_with("+json"))
        })
        .unwrap_or(false);
    if ok {
        Ok(())
    } else {
        Err(ApiError::InvalidJson(format!(
            "Content-Type must be application/json (got {})",
            value
                .map(|v| format!("{v:?}"))
                .unwrap_or_else(|| "none".into())
        )))
    }
}

/// Parses a body that must be a JSON object (else 400 `invalid_json`).
pub fn parse_object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    let value: Value =
        serde_json::from_slice(body).map_err(|e| ApiError::InvalidJson(e.to_string()))?;
    match value {
        Value::Object(map) => Ok(map),
        _ => Err(ApiError::InvalidJson(
            "the body must be a JSON object".into(),
        )),
    }
}

/// Parses and validates a `/generate` body without styles (the tests'; the routes and `sdserve
/// generate` apply STYLES_FILE first: `api::request::validate_styled`).
#[cfg(test)]
pub fn parse_generate(body: &[u8]) -> Result<ValidRequest, ApiError> {
    validate_object(&parse_object(body)?)
}

/// Whether a request may leave its prompt empty or out. The native API and OpenAI need text;
/// AUTOMATIC1111 (and webuiapi) default the prompt to "", which CLIP encodes like any text
/// (diffusers encodes "" as it encodes an empty negative prompt).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PromptRule {
    /// 1..=500 characters after cleaning (the native contract).
    Required,
    /// 0..=500 characters; absent or `null` is "".
    MayBeEmpty,
}

/// Where the rules of the dialect a request came in differ from the native contract.
#[derive(Clone, Copy, Debug)]
pub struct DialectRules {
    pub prompt: PromptRule,
    /// The largest `clip_skip` (before the model's own limit, [`check_limits`]).
    pub clip_skip_max: u64,
    /// How `mask_image` is read: as every image (`decode_base64`), or as A1111 reads its
    /// `mask`, transparency first (`decode_a1111_mask_base64`); the flag is
    /// `inpaint.mask_round`.
    pub read_mask: fn(&str, bool) -> Result<RequestImage, String>,
}

impl DialectRules {
    /// The native contract's (and OpenAI's extras').
    pub const NATIVE: Self = Self {
        prompt: PromptRule::Required,
        clip_skip_max: CLIP_SKIP_MAX,
        read_mask: |text, _| crate::images::decode_base64(text),
    };
    /// AUTOMATIC1111's: the prompt may be empty, clip skip goes to its slider's 12.
    pub const A1111: Self = Self {
        prompt: PromptRule::MayBeEmpty,
        clip_skip_max: A1111_CLIP_SKIP_MAX,
        read_mask: crate::images::decode_a1111_mask_base64,
    };
}

/// Every rule of `/generate` on a parsed object; a 422 lists every broken field.
pub fn validate_object(map: &Map<String, Value>) -> Result<ValidRequest, ApiError> {
    validate_request(map, DialectRules::NATIVE)
}

/// [`validate_object`] with the rules of the dialect the request came in.
pub fn validate_request(
    map: &Map<String, Value>,
    dialect: DialectRules,
) -> Result<ValidRequest, ApiError> {
    let mut r = FieldReader::new(map, &FIELDS);
    let prompt = match dialect.prompt {
        PromptRule::Required => r
            .require("prompt")
            .then(|| r.text("prompt", 1, PROMPT_MAX_CHARS))
            .flatten(),
        PromptRule::MayBeEmpty if r.value("prompt").is_none() => Some(String::new()),
        PromptRule::MayBeEmpty => r.text("prompt", 0, PROMPT_MAX_CHARS),
    };
    let negative_prompt = r.text("negative_prompt", 0, PROMPT_MAX_CHARS);
    let steps = r.int("steps", STEPS_MIN, STEPS_MAX);
    let size_rule = |v: u64| {
        (!v.is_multiple_of(SIZE_MULTIPLE)).then(|| format!("must be a multiple of {SIZE_MULTIPLE}"))
    };
    let width = r.int_with("width", SIZE_MIN, SIZE_MAX, size_rule);
    let height = r.int_with("height", SIZE_MIN, SIZE_MAX, size_rule);
    let seed = r.int("seed", 0, SEED_MAX);
    let guidance_scale = r.number("guidance_scale", GUIDANCE_MIN, GUIDANCE_MAX);
    let guidance_rule = r
        .choice("guidance_rule", &GUIDANCE_RULES)
        .unwrap_or_default();
    let eta = r.number("eta", 0.0, 1.0);
    // Ignored by samplers that take none, as eta.
    let (churn, negative_guidance) = sampler_params::read(&mut r);
    let schedulers: Vec<(&str, SchedulerKind)> =
        SchedulerKind::ALL.iter().map(|k| (k.name(), *k)).collect();
    let scheduler = r.choice("scheduler", &schedulers);
    let mut schedules = vec![("default", None)];
    schedules.extend(SigmaSchedule::ALL.map(|s| (s.name(), Some(s))));
    let schedule = r.choice("schedule", &schedules).flatten();
    if let (Some(kind), Some(schedule)) = (scheduler, schedule) {
        if let Err(rule) = kind.check_schedule(schedule) {
            r.fail("schedule", rule);
        }
    }
    let prompt_syntax = r.choice(
        "prompt_syntax",
        &[
            ("a1111", PromptSyntax::A1111),
            ("plain", PromptSyntax::Plain),
        ],
    );
    let clip_skip = r.int("clip_skip", 1, dialect.clip_skip_max);
    let mut loras = r.with("loras", lora_list).unwrap_or_default();
    let loras_listed = loras.len();
    // `<lora:name:weight>` tags do what `loras` does and leave the prompt.
    let prompt = prompt.map(|p| {
        let (text, tagged) = sdserve_pipeline::lora::extract_lora_tags(&p);
        for (name, weight) in tagged {
            if !(LORA_WEIGHT_MIN..=LORA_WEIGHT_MAX).contains(&weight) {
                r.fail(
                    "prompt",
                    format!("<lora:{name}:{weight}>: the weight must be between {LORA_WEIGHT_MIN} and {LORA_WEIGHT_MAX}"),
                );
            }
            loras.push((name, weight));
        }
        text.trim().to_string()
    });
    if loras.len() > LORAS_MAX {
        r.fail(
            "loras",
            format!("at most {LORAS_MAX} LoRAs (with the prompt's <lora:...> tags)"),
        );
    }
    // Emphasis multiplies weights, and `(a:999...9)` or nested `((a:1e30):1e30)` leave float32,
    // in which the embeddings are weighted: the image would be NaN. Refused here instead.
    if prompt_syntax.unwrap_or(PromptSyntax::A1111) == PromptSyntax::A1111 {
        for (field, text) in [("prompt", &prompt), ("negative_prompt", &negative_prompt)] {
            let pieces = text.as_deref().map(parse_attention).unwrap_or_default();
            if let Some(w) = pieces
                .iter()
                .map(|p| p.weight)
                .find(|&w| !(w as f32).is_finite())
            {
                r.fail(
                    field,
                    format!("an emphasis weight must stay a finite float32 number (got {w:e})"),
                );
            }
        }
    }
    let batch_size = r.int("batch_size", BATCH_MIN, BATCH_MAX);
    let model = r.text("model", 1, MODEL_NAME_MAX_CHARS);
    let vae = r.text("vae", 1, MODEL_NAME_MAX_CHARS);
    let image = |read: fn(&str) -> Result<RequestImage, String>| {
        move |v: &Value| read(v.as_str().ok_or("must be a base64 string")?)
    };
    let init_image = r.with("init_image", image(crate::images::decode_base64));
    // `inpaint.mask_round` as sent (its rule is checked with the object's): false keeps a
    // transparent A1111 mask's alpha levels.
    let round = map
        .get("inpaint")
        .and_then(|o| o.get("mask_round"))
        .and_then(Value::as_bool)
        .unwrap_or(true);
    let mask_image = r.with("mask_image", |v: &Value| {
        (dialect.read_mask)(v.as_str().ok_or("must be a base64 string")?, round)
    });
    let strength = r.number("strength", 0.0, 1.0);
    let step_rule = r.choice("step_rule", &steps::CHOICES).unwrap_or_default();
    let has_init = r.value("init_image").is_some();
    // A1111's slider ranges; ignored where nothing starts from an image, as strength.
    let noise_multiplier = r.number("noise_multiplier", 0.0, 1.5);
    let extra_noise = r.number("extra_noise", 0.0, 1.0);
    // Ignored without init_image, as strength (the schema's every value is a valid request).
    let resize_mode = r
        .choice("resize_mode", &resize_mode::CHOICES)
        .unwrap_or_default();
    let steps = steps.map_or(STEPS_DEFAULT, |v| v as usize);
    if let (Some(p), PromptSyntax::A1111) = (&prompt, prompt_syntax.unwrap_or(PromptSyntax::A1111))
    {
        for rule in schedule::and_rules(p) {
            r.fail("prompt", rule);
        }
    }
    // A mask without an image to repaint is a mistake; a strength without one is ignored
    // (A1111 clients send denoising_strength with every txt2img request).
    if !has_init && r.value("mask_image").is_some() {
        r.fail("mask_image", "only with init_image");
    }
    if let (Some(init), Some(mask)) = (&init_image, &mask_image) {
        let (a, b) = (&init.image, &mask.image);
        if (a.width, a.height) != (b.width, b.height) {
            r.fail(
                "mask_image",
                format!(
                    "must be the size of init_image ({}x{}), got {}x{}",
                    a.width, a.height, b.width, b.height
                ),
            );
        }
    }
    // A mask that failed its own rules leaves nothing to inpaint either.
    let has_mask = mask_image.is_some();
    let inpaint = r
        .value("inpaint")
        .and_then(|v| native_inpaint::read(v, has_mask, &mut r));
    // The default strength counts too (steps 1 at 0.8 runs no step); a broken strength is
    // reported once, by its own rule.
    let usable = strength.or((r.value("strength").is_none()).then_some(STRENGTH_DEFAULT));
    if let (true, Some(s)) = (has_init, usable) {
        if let Some(rule) = steps::strength_rule(step_rule, ("steps", steps), ("strength", s)) {
            r.fail("strength", rule);
        }
    }
    // The second pass needs the first's size (absent: the default; broken: unknown).
    let known = |v: Option<u64>, f: &str| v.or(r.value(f).is_none().then_some(SIZE_DEFAULT as u64));
    let first_size = known(width, "width").zip(known(height, "height"));
    let hires = r.value("hires").and_then(|v| {
        let first = native_hires::FirstPass {
            size: first_size,
            steps,
            has_init_image: has_init,
            step_rule,
        };
        native_hires::read(v, &first, &mut r)
    });
    let variation_seed = r.int("variation_seed", 0, SEED_MAX);
    let variation_strength = r.number("variation_strength", 0.0, 1.0);
    if has_init && variation_strength.is_some_and(|s| s > 0.0) {
        r.fail(
            "variation_strength",
            "a variation seed is for text-to-image only (not with init_image)",
        );
    }
    let seed_resize = seed_resize_from(&mut r);
    // `shuffle`'s default seed: the extension's `set_numpy_seed` of the generation's seed
    // (seed plus variation seed, the seed again without one, mod 2^32). A request that
    // leaves the seed to chance has it drawn here when a shuffle map is made, so the map and
    // the images follow the one seed the metadata reports.
    let generation_seed = seed.unwrap_or_else(|| u64::from(crate::api::random_seed()));
    let numpy_seed = (generation_seed + variation_seed.unwrap_or(generation_seed)) as u32;
    let controlnets = r
        .with("controlnets", |v| controlnets::read(v, numpy_seed))
        .unwrap_or_default();
    let ip_adapters = r.with("ip_adapters", ip_adapters::read).unwrap_or_default();
    let shuffles = controlnets
        .iter()
        .any(|c| matches!(c.preprocessor, Some(Preprocessor::Shuffle { .. })));
    let seed = seed.or(shuffles.then_some(generation_seed));
    let tiling = r.with("tiling", |v| {
        v.as_bool().ok_or_else(|| "must be true or false".into())
    });
    let restore_faces = r
        .value("restore_faces")
        .and_then(|v| read_restore_faces(v, &mut r));
    r.finish()?;
    // With an init image the size defaults to its own, floored to the multiple and clamped.
    let side = |given: Option<u64>, of_image: Option<u32>| match (given, of_image) {
        (Some(v), _) => v as usize,
        (None, Some(px)) => crate::images::default_side(px, SIZE_MIN, SIZE_MAX, SIZE_MULTIPLE),
        (None, None) => SIZE_DEFAULT,
    };
    let init_size = init_image.as_ref().map(|i| (i.image.width, i.image.height));
    let width = side(width, init_size.map(|s| s.0));
    let height = side(height, init_size.map(|s| s.1));
    if let Some(init) = &init_image {
        let whole = mask_image.is_some().then(|| {
            inpaint
                .as_ref()
                .is_none_or(|o| o.only_masked_padding.is_none())
        });
        let size = (init.image.width, init.image.height);
        if let Some(rule) = resize_mode::rule(resize_mode, size, whole, width, height) {
            return Err(ApiError::validation("resize_mode", rule));
        }
    }
    // The pipeline fits both images to the request's size by the same mode (a no-op at that
    // size), so fitting here gives identical pixels; a queued job then holds the small image,
    // not the upload's full decode (48 MB for a 4096x4096 one). A1111's inpainting blurs the
    // mask and crops "only masked" at the upload's size: kept as sent.
    let fit = |i: Option<RequestImage>| {
        i.map(|mut i| {
            if inpaint.is_none() {
                i.image = resize_mode::fit(&i.image, resize_mode, width, height);
            }
            i
        })
    };
    let (init_image, mask_image) = (fit(init_image), fit(mask_image));
    let mut valid = ValidRequest {
        prompt: prompt.unwrap_or_default(),
        negative_prompt: negative_prompt.unwrap_or_default(),
        steps,
        width,
        height,
        seed: seed.map(|v| v as u32),
        guidance_scale: guidance_scale.unwrap_or(GUIDANCE_DEFAULT),
        guidance_rule,
        eta,
        churn,
        negative_guidance,
        scheduler,
        schedule,
        prompt_syntax: prompt_syntax.unwrap_or(PromptSyntax::A1111),
        clip_skip: clip_skip.map_or(1, |v| v as usize),
        loras,
        loras_listed,
        batch_size: batch_size.map_or(1, |v| v as usize),
        init_image,
        mask_image,
        resize_mode,
        strength: strength.unwrap_or(STRENGTH_DEFAULT),
        step_rule,
        noise_multiplier: noise_multiplier.unwrap_or(1.0),
        extra_noise: extra_noise.unwrap_or(0.0),
        lama_noise: true,
        hires: None,
        model,
        vae,
        tiling: tiling.unwrap_or(false),
        restore_faces,
        variation_seed: variation_seed.map(|v| v as u32),
        variation_strength: variation_strength.unwrap_or(0.0),
        seed_resize_from: seed_resize,
        controlnets,
        ip_adapters,
        inpaint,
        as_written: None,
    };
    if let Some(read) = hires {
        valid.hires = Some(native_hires::build(&read, &valid)?);
    }
    fit_control_images(&mut valid)?;
    Ok(valid)
}

/// Each ControlNet image (its map, where a preprocessor made one) fitted to the first pass's
/// size as the pipeline fits it (a no-op there), so a queued job holds the small image; with a
/// hires pass, fitted to that pass's size too, from the map itself: as the extension's
/// `hr_control`, not the first pass's image enlarged again. The inpaint units' masks likewise
/// ([`controlnets::masks_from_request`]).
fn fit_control_images(valid: &mut ValidRequest) -> Result<(), ApiError> {
    let size = (valid.width, valid.height);
    let hires = valid
        .hires
        .as_ref()
        .map(|h| (h.params.width, h.params.height));
    let fitted = |image: &RgbImage, (w, h): (usize, usize)| {
        let image = resize_lanczos(image, w, h);
        RequestImage {
            sha256: crate::images::digest(&image),
            image,
        }
    };
    let (mask, with_init) = (valid.mask_image.as_ref(), valid.init_image.is_some());
    controlnets::lama_maps(&mut valid.controlnets, mask, with_init)
        .map_err(|rule| ApiError::validation("controlnets", rule))?;
    for c in &mut valid.controlnets {
        c.hires_image = hires.map(|to| fitted(&c.image.image, to));
        c.image.image = resize_lanczos(&c.image.image, size.0, size.1);
    }
    controlnets::masks_from_request(&mut valid.controlnets, mask, with_init, size, hires)
        .map_err(|rule| ApiError::validation("controlnets", rule))
}

/// `seed_resize_from_width` and `seed_resize_from_height`: both or neither (A1111 resizes only
/// when both sides are set), each 64..=2048.
fn seed_resize_from(r: &mut FieldReader) -> Option<SeedResize> {
    const SIDES: [&str; 2] = ["seed_resize_from_width", "seed_resize_from_height"];
    let width = r.int(SIDES[0], SEED_RESIZE_MIN, SEED_RESIZE_MAX);
    let height = r.int(SIDES[1], SEED_RESIZE_MIN, SEED_RESIZE_MAX);
    for (given, missing) in [(SIDES[0], SIDES[1]), (SIDES[1], SIDES[0])] {
        if r.value(given).is_some() && r.value(missing).is_none() {
            r.fail(
                missing,
                format!("required with {given}: a seed resize needs both sides"),
            );
        }
    }
    Some(SeedResize {
        width: width? as usize,
        height: height? as usize,
    })
}

/// `loras`: `[{"name": str, "weight": number}]` (weight 1 when absent).
fn lora_list(v: &Value) -> Result<Vec<(String, f64)>, String> {
    let rule = format!(
        "must be an array of at most {LORAS_MAX} objects {{\"name\": string, \"weight\": number between {LORA_WEIGHT_MIN} and {LORA_WEIGHT_MAX}}}"
    );
    let items = v.as_array().ok_or_else(|| rule.clone())?;
    let mut out = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let obj = item.as_object().ok_or_else(|| format!("[{i}]: {rule}"))?;
        if let Some(k) = obj
            .keys()
            .find(|k| !matches!(k.as_str(), "name" | "weight"))
        {
            return Err(format!("[{i}]: unknown key {k:?}; {rule}"));
        }
        let name = obj
            .get("name")
            .and_then(Value::as_str)
            .filter(|n| !n.trim().is_empty())
            .ok_or_else(|| format!("[{i}].name: a non-empty string is required"))?;
        let weight = match obj.get("weight") {
            None | Some(Value::Null) => 1.0,
            Some(w) => w
                .as_f64()
                .filter(|w| (LORA_WEIGHT_MIN..=LORA_WEIGHT_MAX).contains(w))
                .ok_or_else(|| {
                    format!("[{i}].weight: must be a number between {LORA_WEIGHT_MIN} and {LORA_WEIGHT_MAX}")
                })?,
        };
        out.push((name.trim().to_string(), weight));
    }
    Ok(out)
}

/// Reads `restore_faces` (`{"weight": 0..=1}`, CodeFormer's weight, A1111's
/// `code_former_weight`: 0.5 when absent), recording a broken rule in `outer` as
/// `restore_faces.<key>`.
fn read_restore_faces(value: &Value, outer: &mut FieldReader) -> Option<f64> {
    let Some(obj) = value.as_object() else {
        outer.fail(
            "restore_faces",
            "must be an object with an optional \"weight\" (0..=1; {} restores with the defaults)",
        );
        return None;
    };
    // A key it does not have names the object (as `hires` does): its one key is `weight`.
    if let Some(k) = obj.keys().find(|k| *k != "weight") {
        outer.fail(
            "restore_faces",
            format!("unknown field {k:?} (allowed: weight)"),
        );
        return None;
    }
    let mut r = FieldReader::new(obj, &["weight"]);
    let weight = r.number("weight", 0.0, 1.0);
    if let Err(ApiError::Validation(errors)) = r.finish() {
        for e in errors {
            outer.fail(&format!("restore_faces.{}", e.field), e.rule);
        }
        return None;
    }
    Some(weight.unwrap_or(sdserve_pipeline::face_restore::restorer::WEIGHT_DEFAULT))
}
