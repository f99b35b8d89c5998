//! Every rule of `POST /generate` (the contract: README's field table, `/openapi.json`), in one place.
//!
//! The body is parsed to a JSON value first and each field checked by hand, so every error can
//! name its field. Status choice (documented in the OpenAPI description too):
//! - 400 `invalid_json`: not JSON at all, not an object, or not sent as `application/json`;
//! - 422 `validation_error`: everything about fields: missing, wrong type, out of range, and
//!   unknown fields. Every broken field is reported at once: `details` names them all and the
//!   body's `fields` lists them (see [`FieldReader`]). `null` means the default for every
//!   optional field.

use sdserve_pipeline::image_in::resize_lanczos;
use sdserve_pipeline::pipeline::{GenerationParams, InitImage, LoraWeight, PromptSyntax};
use sdserve_pipeline::prompt::parse_attention;
use sdserve_pipeline::schedulers::SchedulerKind;
use serde_json::{Map, Value};

use crate::error::{ApiError, FieldError};
use crate::images::RequestImage;

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

/// The fields of `POST /generate`; anything else is a 422 naming it. The OpenAPI schema's
/// properties must be these (tested).
pub const FIELDS: [&str; 15] = [
    "prompt",
    "negative_prompt",
    "steps",
    "width",
    "height",
    "seed",
    "guidance_scale",
    "scheduler",
    "prompt_syntax",
    "clip_skip",
    "loras",
    "batch_size",
    "init_image",
    "strength",
    "mask_image",
];
pub const CLIP_SKIP_MAX: u64 = 4;
pub const LORAS_MAX: usize = 8;
pub const LORA_WEIGHT_MIN: f64 = -4.0;
pub const LORA_WEIGHT_MAX: f64 = 4.0;

/// A request that passed every rule, with defaults filled (seed and scheduler stay optional:
/// they are resolved later, from the RNG and the loaded model).
#[derive(Debug, Clone, PartialEq)]
pub struct ValidRequest {
    pub prompt: String,
    pub negative_prompt: String,
    pub steps: usize,
    pub width: usize,
    pub height: usize,
    pub seed: Option<u32>,
    pub guidance_scale: f64,
    pub scheduler: Option<SchedulerKind>,
    pub prompt_syntax: PromptSyntax,
    pub clip_skip: usize,
    /// From `loras` and the prompt's `<lora:name:weight>` tags (taken out of `prompt`).
    pub loras: Vec<(String, f64)>,
    /// Images in one run; image i uses seed + i.
    pub batch_size: usize,
    /// img2img / inpainting: the decoded image, resized to `width` x `height` (which default to
    /// its own size); `sha256` is the upload's.
    pub init_image: Option<RequestImage>,
    /// Inpainting: white = repaint; uploaded at the size of `init_image`, resized like it.
    pub mask_image: Option<RequestImage>,
    /// With an init image: how much of the schedule runs.
    pub strength: f64,
}

impl ValidRequest {
    /// The pipeline's parameters for this request with its seed and scheduler resolved.
    pub fn generation_params(&self, seed: u64, scheduler: SchedulerKind) -> GenerationParams {
        GenerationParams {
            prompt: self.prompt.clone(),
            negative_prompt: self.negative_prompt.clone(),
            steps: self.steps,
            width: self.width,
            height: self.height,
            seed,
            guidance_scale: self.guidance_scale,
            scheduler: Some(scheduler),
            prompt_syntax: self.prompt_syntax,
            clip_skip: self.clip_skip,
            loras: self
                .loras
                .iter()
                .map(|(name, weight)| LoraWeight {
                    name: name.clone(),
                    weight: *weight,
                })
                .collect(),
            batch_size: self.batch_size,
            init_image: self.init_image.as_ref().map(|init| InitImage {
                image: init.image.clone(),
                mask: self.mask_image.as_ref().map(|m| m.image.clone()),
                strength: self.strength,
            }),
        }
    }
}

/// The rule that depends on the loaded model: an inpainting model (9-channel UNet) runs only
/// requests with an init image and a mask.
pub fn check_for_model(req: &ValidRequest, inpainting_model: bool) -> Result<(), ApiError> {
    if inpainting_model && req.mask_image.is_none() {
        return Err(ApiError::validation(
            "mask_image",
            "is required: the loaded model is an inpainting model (its UNet takes the mask), \
             it needs init_image and mask_image",
        ));
    }
    Ok(())
}

/// Refuses a request whose images cannot fit the device memory budget under any memory plan
/// (estimated; a large batch at a large size on a small budget), before it is queued: a 422
/// rather than a 503, since the same request would never fit later either, and naming
/// `batch_size` with the largest that fits (or `width`/`height` when not even one image does).
pub fn check_memory(
    params: &GenerationParams,
    budget: Option<&crate::gpu::MemoryBudget>,
) -> Result<(), ApiError> {
    let Some(budget) = budget else {
        return Ok(());
    };
    let (w, h, n) = (params.width, params.height, params.batch_size);
    match budget.check(w, h, n, params.guidance_scale > 1.0) {
        Ok(()) => Ok(()),
        Err(over) => {
            let rule = over.describe(w, h, n);
            let fields: &[&str] = if over.largest_batch_size > 0 {
                &["batch_size"]
            } else {
                &["width", "height"]
            };
            Err(ApiError::Validation(
                fields
                    .iter()
                    .map(|f| FieldError {
                        field: f.to_string(),
                        rule: rule.clone(),
                    })
                    .collect(),
            ))
        }
    }
}

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

/// Parses and validates a `/generate` body.
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

/// Every rule of `/generate` on a parsed object; a 422 lists every broken field.
pub fn validate_object(map: &Map<String, Value>) -> Result<ValidRequest, ApiError> {
    validate_request(map, PromptRule::Required)
}

/// [`validate_object`] with the prompt rule of the dialect the request came in.
pub fn validate_request(
    map: &Map<String, Value>,
    prompt_rule: PromptRule,
) -> Result<ValidRequest, ApiError> {
    let mut r = FieldReader::new(map, &FIELDS);
    let prompt = match prompt_rule {
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
    let schedulers: Vec<(&str, SchedulerKind)> =
        SchedulerKind::ALL.iter().map(|k| (k.name(), *k)).collect();
    let scheduler = r.choice("scheduler", &schedulers);
    let prompt_syntax = r.choice(
        "prompt_syntax",
        &[
            ("a1111", PromptSyntax::A1111),
            ("plain", PromptSyntax::Plain),
        ],
    );
    let clip_skip = r.int("clip_skip", 1, CLIP_SKIP_MAX);
    let mut loras = r.with("loras", lora_list).unwrap_or_default();
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
    let image = |v: &Value| -> Result<RequestImage, String> {
        crate::images::decode_base64(v.as_str().ok_or("must be a base64 string")?)
    };
    let init_image = r.with("init_image", image);
    let mask_image = r.with("mask_image", image);
    let strength = r.number("strength", 0.0, 1.0);
    let has_init = r.value("init_image").is_some();
    let steps = steps.map_or(STEPS_DEFAULT, |v| v as usize);
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
    // The default strength counts too (steps 1 at 0.8 runs no step); a broken strength is
    // reported once, by its own rule.
    let usable = strength.or((r.value("strength").is_none()).then_some(STRENGTH_DEFAULT));
    if let (true, Some(s)) = (has_init, usable) {
        if (steps as f64 * s) < 1.0 {
            r.fail(
                "strength",
                format!("int(steps * strength) must be at least 1 (steps {steps}, strength {s})"),
            );
        }
    }
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
    // The pipeline resizes both images to the request's size with this same Lanczos (a no-op
    // at that size), so resizing here gives identical pixels; a queued job then holds the small
    // image, not the upload's full decode (48 MB for a 4096x4096 one).
    let fit = |i: Option<RequestImage>| {
        i.map(|mut i| {
            i.image = resize_lanczos(&i.image, width, height);
            i
        })
    };
    let (init_image, mask_image) = (fit(init_image), fit(mask_image));
    Ok(ValidRequest {
        prompt: prompt.unwrap_or_default(),
        negative_prompt: negative_prompt.unwrap_or_default(),
        steps,
        width,
        height,
        seed: seed.map(|v| v as u32),
        guidance_scale: guidance_scale.unwrap_or(GUIDANCE_DEFAULT),
        scheduler,
        prompt_syntax: prompt_syntax.unwrap_or(PromptSyntax::A1111),
        clip_skip: clip_skip.map_or(1, |v| v as usize),
        loras,
        batch_size: batch_size.map_or(1, |v| v as usize),
        init_image,
        mask_image,
        strength: strength.unwrap_or(STRENGTH_DEFAULT),
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

/// The LoRAs a request names must be among the loaded model's, and fit it (`GET /loras`).
pub fn check_loras(
    req: &ValidRequest,
    adapters: &crate::adapters::Adapters,
) -> Result<(), ApiError> {
    match req.loras.iter().find_map(|(n, _)| adapters.lora_problem(n)) {
        Some(problem) => Err(ApiError::validation("loras", problem)),
        None => Ok(()),
    }
}

/// Reads a request object field by field and collects every broken rule, so that one 422 names
/// every broken field. An explicit `null` counts as absent for every field: it means the
/// default (clients generated from the OpenAPI document, and A1111 clients, send nulls).
///
/// A new field: add its name to the allowed list, read it with a typed reader (or `with` and a
/// rule of its own), use `fail` for rules across fields, then `finish`.
pub struct FieldReader<'a> {
    map: &'a Map<String, Value>,
    errors: Vec<FieldError>,
}

impl<'a> FieldReader<'a> {
    /// Starts with the unknown fields (a misspelt field should never hide behind another error).
    pub fn new(map: &'a Map<String, Value>, allowed: &[&str]) -> Self {
        let errors = map
            .keys()
            .filter(|k| !allowed.contains(&k.as_str()))
            .map(|k| FieldError {
                field: k.clone(),
                rule: format!("unknown field (allowed: {})", allowed.join(", ")),
            })
            .collect();
        Self { map, errors }
    }

    /// The field's value; `None` when absent or `null`.
    pub fn value(&self, field: &str) -> Option<&'a Value> {
        self.map.get(field).filter(|v| !v.is_null())
    }

    /// Records a broken rule.
    pub fn fail(&mut self, field: &str, rule: impl Into<String>) {
        self.errors.push(FieldError {
            field: field.to_string(),
            rule: rule.into(),
        });
    }

    /// True when the field has a value; else records "is required".
    pub fn require(&mut self, field: &str) -> bool {
        let set = self.value(field).is_some();
        if !set {
            self.fail(field, "is required");
        }
        set
    }

    /// Runs `check` on the field's value when it has one; a broken rule is recorded.
    pub fn with<T>(
        &mut self,
        field: &str,
        check: impl FnOnce(&'a Value) -> Result<T, String>,
    ) -> Option<T> {
        let v = self.value(field)?;
        check(v).map_err(|rule| self.fail(field, rule)).ok()
    }

    /// Cleaned text (see [`sanitize_text`]) of `min..=max` characters.
    pub fn text(&mut self, field: &str, min: usize, max: usize) -> Option<String> {
        self.with(field, |v| check_text(v, min, max))
    }

    /// An integer in `min..=max`.
    pub fn int(&mut self, field: &str, min: u64, max: u64) -> Option<u64> {
        self.with(field, |v| check_int(v, min, max))
    }

    /// An integer in `min..=max` that also passes `extra` (which returns the broken rule).
    pub fn int_with(
        &mut self,
        field: &str,
        min: u64,
        max: u64,
        extra: impl Fn(u64) -> Option<String>,
    ) -> Option<u64> {
        self.with(field, |v| {
            let n = check_int(v, min, max)?;
            extra(n).map_or(Ok(n), |rule| Err(format!("{rule} (got {n})")))
        })
    }

    /// A number in `min..=max`.
    pub fn number(&mut self, field: &str, min: f64, max: f64) -> Option<f64> {
        self.with(field, |v| check_number(v, min, max))
    }

    /// One of the named options.
    pub fn choice<T: Copy>(&mut self, field: &str, options: &[(&str, T)]) -> Option<T> {
        self.with(field, |v| {
            let names: Vec<&str> = options.iter().map(|(n, _)| *n).collect();
            let rule = format!("must be one of {}", names.join(", "));
            let name = v.as_str().ok_or_else(|| rule.clone())?;
            options
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, t)| *t)
                .ok_or_else(|| format!("{rule} (got {name:?})"))
        })
    }

    /// Ok when no rule was broken; else a 422 listing every broken field.
    pub fn finish(self) -> Result<(), ApiError> {
        if self.errors.is_empty() {
            Ok(())
        } else {
            Err(ApiError::Validation(self.errors))
        }
    }
}

/// Removes control characters other than whitespace, then trims.
pub fn sanitize_text(s: &str) -> String {
    let kept: String = s
        .chars()
        .filter(|c| !c.is_control() || c.is_whitespace())
        .collect();
    kept.trim().to_string()
}

/// A string, cleaned by [`sanitize_text`], of `min..=max` characters (Unicode scalar values).
pub fn check_text(v: &Value, min: usize, max: usize) -> Result<String, String> {
    let s = v.as_str().ok_or("must be a string")?;
    let clean = sanitize_text(s);
    let n = clean.chars().count();
    if n < min {
        return Err("must not be empty (after trimming and removing control characters)".into());
    }
    if n > max {
        return Err(format!("must be at most {max} characters (got {n})"));
    }
    Ok(clean)
}

/// An integer in `min..=max`. Numbers written with a zero fraction (`20.0`) count as integers,
/// as JSON does not tell them apart.
pub fn check_int(v: &Value, min: u64, max: u64) -> Result<u64, String> {
    let range = format!("must be an integer between {min} and {max}");
    let Value::Number(n) = v else {
        return Err(range);
    };
    let out_of_range = || format!("{range} (got {n})");
    let u = if let Some(u) = n.as_u64() {
        u
    } else if n.is_i64() {
        return Err(out_of_range());
    } else {
        let f = n.as_f64().unwrap_or(f64::NAN);
        if f.fract() != 0.0 || !f.is_finite() {
            return Err(format!("{range} (got {n}, not an integer)"));
        }
        if f < 0.0 || f > u64::MAX as f64 {
            return Err(out_of_range());
        }
        f as u64
    };
    if !(min..=max).contains(&u) {
        return Err(out_of_range());
    }
    Ok(u)
}

/// A number in `min..=max`.
pub fn check_number(v: &Value, min: f64, max: f64) -> Result<f64, String> {
    let rule = format!("must be a number between {min} and {max}");
    let g = v.as_f64().ok_or_else(|| rule.clone())?;
    if !(min..=max).contains(&g) {
        return Err(format!("{rule} (got {g})"));
    }
    Ok(g)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<ValidRequest, ApiError> {
        parse_generate(s.as_bytes())
    }

    /// The one broken field of a 422.
    fn field_of(e: ApiError) -> String {
        match e.fields() {
            [one] => one.field.clone(),
            _ => panic!("expected one broken field, got {e:?}"),
        }
    }

    #[test]
    fn defaults_are_filled() {
        let r = parse(r#"{"prompt":"  a cat  "}"#).unwrap();
        assert_eq!(r.prompt, "a cat");
        assert_eq!(
            (r.steps, r.width, r.height, r.guidance_scale),
            (20, 512, 512, 7.5)
        );
        assert_eq!(
            (r.seed, r.scheduler, r.negative_prompt.as_str()),
            (None, None, "")
        );
    }

    #[test]
    fn edges_on_both_sides() {
        for (field, ok, bad) in [
            (
                "steps",
                vec!["1", "50", "20.0"],
                vec!["0", "51", "-1", "2.5", "\"20\"", "true"],
            ),
            (
                "width",
                vec!["256", "768", "320"],
                vec!["192", "832", "300", "255", "769"],
            ),
            ("height", vec!["256", "768"], vec!["0", "1024", "257"]),
            (
                "seed",
                vec!["0", "4294967295", "null"],
                vec!["-1", "4294967296", "1.5", "\"1\""],
            ),
            (
                "guidance_scale",
                vec!["0", "0.0", "30", "30.0", "1"],
                vec!["-0.001", "30.001", "\"7\""],
            ),
            (
                "scheduler",
                vec!["\"euler_a\"", "\"unipc\"", "null"],
                vec!["\"Euler\"", "\"foo\"", "1"],
            ),
        ] {
            for v in ok {
                parse(&format!(r#"{{"prompt":"x","{field}":{v}}}"#))
                    .unwrap_or_else(|e| panic!("{field}={v}: {e:?}"));
            }
            for v in bad {
                let e = parse(&format!(r#"{{"prompt":"x","{field}":{v}}}"#))
                    .expect_err(&format!("{field}={v}"));
                assert_eq!(field_of(e), field, "{field}={v}");
            }
        }
    }

    #[test]
    fn prompt_rules() {
        let p500 = "é".repeat(500);
        assert_eq!(
            parse(&format!(r#"{{"prompt":"{p500}"}}"#))
                .unwrap()
                .prompt
                .chars()
                .count(),
            500
        );
        let p501 = "é".repeat(501);
        assert_eq!(
            field_of(parse(&format!(r#"{{"prompt":"{p501}"}}"#)).unwrap_err()),
            "prompt"
        );
        // 500 after trimming is fine.
        assert!(parse(&format!(r#"{{"prompt":"  {p500}\n"}}"#)).is_ok());
        for bad in [
            r#"{"prompt":""}"#,
            r#"{"prompt":"   "}"#,
            r#"{"prompt":"\u0001\u0007"}"#,
            r#"{}"#,
            r#"{"prompt":null}"#,
            r#"{"prompt":3}"#,
        ] {
            assert_eq!(field_of(parse(bad).unwrap_err()), "prompt", "{bad}");
        }
        let r = parse(r#"{"prompt":"\u0001 a\u0000b\tc\u007f ","negative_prompt":" x\u0002 "}"#)
            .unwrap();
        assert_eq!(r.prompt, "ab\tc");
        assert_eq!(r.negative_prompt, "x");
        let n501 = "n".repeat(501);
        assert_eq!(
            field_of(
                parse(&format!(r#"{{"prompt":"x","negative_prompt":"{n501}"}}"#)).unwrap_err()
            ),
            "negative_prompt"
        );
        assert!(parse(r#"{"prompt":"x","negative_prompt":""}"#).is_ok());
    }

    #[test]
    fn shape_errors() {
        assert!(matches!(parse("{"), Err(ApiError::InvalidJson(_))));
        assert!(matches!(parse("[1]"), Err(ApiError::InvalidJson(_))));
        assert!(matches!(parse(""), Err(ApiError::InvalidJson(_))));
        assert_eq!(
            field_of(parse(r#"{"prompt":"x","sampler":"euler"}"#).unwrap_err()),
            "sampler"
        );
        assert!(check_content_type(Some("application/json; charset=utf-8")).is_ok());
        assert!(check_content_type(Some("text/plain")).is_err());
        assert!(check_content_type(None).is_err());
    }

    #[test]
    fn null_means_the_default_for_every_optional_field() {
        let defaults = parse(r#"{"prompt":"x"}"#).unwrap();
        for field in FIELDS.iter().filter(|f| **f != "prompt") {
            let r = parse(&format!(r#"{{"prompt":"x","{field}":null}}"#))
                .unwrap_or_else(|e| panic!("{field}: null refused: {e:?}"));
            assert_eq!(r, defaults, "{field}");
        }
    }

    #[test]
    fn every_broken_field_is_reported_in_reading_order() {
        let e = parse(
            r#"{"sampler":"x","steps":0,"width":300,"height":1024,"seed":-1,"guidance_scale":"7","scheduler":"Euler","negative_prompt":5}"#,
        )
        .unwrap_err();
        let fields: Vec<&str> = e.fields().iter().map(|f| f.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "sampler",
                "prompt",
                "negative_prompt",
                "steps",
                "width",
                "height",
                "seed",
                "guidance_scale",
                "scheduler"
            ]
        );
        let details = e.body().details.unwrap();
        assert!(
            details.contains("width: must be a multiple of 64 (got 300)"),
            "{details}"
        );
        assert!(details.contains("prompt: is required"), "{details}");
        assert_eq!(details.matches("; ").count(), fields.len() - 1, "{details}");
    }

    #[test]
    fn request_images_are_kept_at_the_request_size_with_the_pipelines_pixels() {
        use base64::Engine;
        use sdserve_pipeline::image_in::image_tensor;
        use sdserve_pipeline::pipeline::RgbImage;
        let upload = |w: u32, h: u32, salt: u32| {
            let img = RgbImage {
                width: w,
                height: h,
                pixels: (0..w * h * 3)
                    .map(|i| ((i * 7 + salt) % 253) as u8)
                    .collect(),
            };
            let png = crate::png::encode(&img, "").unwrap();
            (img, base64::engine::general_purpose::STANDARD.encode(png))
        };
        let (init, init_b64) = upload(700, 300, 1);
        let (mask, mask_b64) = upload(700, 300, 2);
        let body = serde_json::json!({
            "prompt": "p", "init_image": init_b64, "mask_image": mask_b64, "height": 320
        });
        let r = parse(&body.to_string()).unwrap();
        // Width defaults to the image's, floored to a multiple of 64; height as given.
        assert_eq!((r.width, r.height), (640, 320));
        let kept = &r.init_image.as_ref().unwrap().image;
        assert_eq!((kept.width, kept.height), (640, 320));
        assert_eq!(*kept, resize_lanczos(&init, 640, 320));
        let kept_mask = &r.mask_image.as_ref().unwrap().image;
        assert_eq!(*kept_mask, resize_lanczos(&mask, 640, 320));
        // What the VAE gets is the same whether the pipeline resizes the upload or this.
        let dev = candle_core::Device::Cpu;
        let a = image_tensor(&init, 640, 320, &dev).unwrap();
        let b = image_tensor(kept, 640, 320, &dev).unwrap();
        let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap();
        assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);
    }

    #[test]
    fn a_batch_over_the_memory_budget_is_a_422_naming_batch_size() {
        use sdserve_pipeline::memory::{Footprint, LeverOverrides, PlanRequest};
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../pipeline/tests/fixtures/tiny-a");
        // tiny-a's VAE factor is 2: a 768 image is a 384x384 latent, a heavy UNet batch.
        let budget = crate::gpu::MemoryBudget {
            footprint: Footprint::from_model_dir(&dir, candle_core::DType::F32).unwrap(),
            request: PlanRequest {
                budget_bytes: 2048 << 20,
                max_width: 768,
                max_height: 768,
                batch: 2,
                dtype: candle_core::DType::F32,
                overrides: LeverOverrides::default(),
            },
        };
        let params = |batch_size, side, guidance_scale| GenerationParams {
            batch_size,
            width: side,
            height: side,
            guidance_scale,
            ..Default::default()
        };
        assert!(check_memory(&params(1, 768, 7.5), Some(&budget)).is_ok());
        assert!(check_memory(&params(8, 256, 7.5), Some(&budget)).is_ok());
        let e = check_memory(&params(8, 768, 7.5), Some(&budget)).unwrap_err();
        let [f] = e.fields() else { panic!("{e:?}") };
        assert_eq!(f.field, "batch_size");
        assert!(f.rule.contains("at most batch_size"), "{}", f.rule);
        assert!(f.rule.contains("VRAM_LIMIT_MB"), "{}", f.rule);
        // No budget (the CPU): nothing to check.
        assert!(check_memory(&params(8, 768, 7.5), None).is_ok());
        // Too small a budget for even one image names the size.
        let mut small = budget.clone();
        small.request.budget_bytes = 520 << 20;
        let e = check_memory(&params(1, 768, 7.5), Some(&small)).unwrap_err();
        let names: Vec<&str> = e.fields().iter().map(|f| f.field.as_str()).collect();
        assert_eq!(names, ["width", "height"]);
    }

    #[test]
    fn emphasis_weights_past_float32_are_refused_naming_the_field() {
        let huge = "9".repeat(320);
        for (field, body) in [
            ("prompt", format!(r#"{{"prompt": "(cat:{huge})"}}"#)),
            (
                "prompt",
                r#"{"prompt": "(((cat:1e30)):9999999999)"}"#
                    .replace("1e30", "100000000000000000000000000000"),
            ),
            (
                "negative_prompt",
                format!(r#"{{"prompt": "cat", "negative_prompt": "(dog:{huge})"}}"#),
            ),
        ] {
            let e = parse(&body).unwrap_err();
            let fields: Vec<&str> = e.fields().iter().map(|f| f.field.as_str()).collect();
            assert_eq!(fields, [field], "{body}");
            assert!(
                e.fields()[0].rule.contains("finite float32"),
                "{:?}",
                e.fields()
            );
        }
        // Large finite weights, and any text with plain syntax, are fine.
        assert!(parse(r#"{"prompt": "(cat:1000)"}"#).is_ok());
        let plain = format!(r#"{{"prompt": "(cat:{huge})", "prompt_syntax": "plain"}}"#);
        assert!(parse(&plain).is_ok());
    }
}
