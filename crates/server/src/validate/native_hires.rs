//! The native `hires` object of `POST /generate`: the hires fix's second pass, asked the way
//! native sizes are (explicit, no A1111 rounding). The target is `width` and `height` (multiples
//! of 64 in 256..=768, as the first pass's) or `scale`, which must land on such a size exactly;
//! its fields become A1111's so that [`super::hires::validate_hires`] builds the pass, as for
//! `enable_hr`. `scheduler`, `prompt` and `negative_prompt` are the pass's own (A1111's
//! `hr_sampler_name`, `hr_prompt`, `hr_negative_prompt`). Errors name `hires.<field>`.

use sdserve_pipeline::schedulers::SchedulerKind;
use serde_json::{json, Map, Value};

use super::fields::FieldReader;
use super::hires::{upscaler_rule, validate_hires, HiresSampler, ValidHires, DENOISING_DEFAULT};
use super::{ValidRequest, PROMPT_MAX_CHARS, SIZE_MAX, SIZE_MIN, SIZE_MULTIPLE, STEPS_MAX};
use crate::error::{ApiError, FieldError};

/// The keys of the `hires` object.
pub const FIELDS: [&str; 9] = [
    "width",
    "height",
    "scale",
    "upscaler",
    "steps",
    "strength",
    "scheduler",
    "prompt",
    "negative_prompt",
];
/// The largest scale that can still fit: 256 * 3 = 768.
pub const SCALE_MAX: f64 = 3.0;

/// Each native key and the A1111 field it becomes.
const A1111_NAMES: [(&str, &str); 8] = [
    ("width", "hr_resize_x"),
    ("height", "hr_resize_y"),
    ("scale", "hr_scale"),
    ("upscaler", "hr_upscaler"),
    ("steps", "hr_second_pass_steps"),
    ("strength", "denoising_strength"),
    ("prompt", "hr_prompt"),
    ("negative_prompt", "hr_negative_prompt"),
];

/// The read `hires` object: its A1111 fields, and its own scheduler (native names).
pub(super) struct ReadHires {
    fields: Map<String, Value>,
    scheduler: Option<SchedulerKind>,
}

/// What the first pass is, as far as it is valid: `size` is `None` when width or height broke
/// their rules (rules that need it are then skipped).
pub(super) struct FirstPass {
    pub size: Option<(u64, u64)>,
    pub steps: usize,
    pub has_init_image: bool,
    /// The request's step rule (the pass runs `StepRule::for_hires` of it).
    pub step_rule: sdserve_pipeline::pipeline::StepRule,
}

/// Reads `hires`, recording each broken rule in `outer` as `hires.<key>`; the
/// pass's A1111 fields and scheduler when every rule holds.
pub(super) fn read(value: &Value, first: &FirstPass, outer: &mut FieldReader) -> Option<ReadHires> {
    if first.has_init_image {
        outer.fail(
            "hires",
            "only for text-to-image: not with init_image (A1111's img2img has no hires pass)",
        );
        return None;
    }
    let Some(obj) = value.as_object() else {
        outer.fail(
            "hires",
            "must be an object: {\"width\", \"height\"} or {\"scale\"}, with optional \
             \"upscaler\", \"steps\", \"strength\", \"scheduler\", \"prompt\", \"negative_prompt\"",
        );
        return None;
    };
    let mut r = FieldReader::new(obj, &FIELDS);
    let size_rule = |v: u64| {
        (!v.is_multiple_of(SIZE_MULTIPLE)).then(|| format!("must be a multiple of {SIZE_MULTIPLE}"))
    };
    let width = r.int_with("width", SIZE_MIN, SIZE_MAX, size_rule);
    let height = r.int_with("height", SIZE_MIN, SIZE_MAX, size_rule);
    let scale = r.number("scale", 1.0, SCALE_MAX);
    let upscaler = r.with("upscaler", upscaler_rule);
    let steps = r.int("steps", 0, STEPS_MAX);
    let strength = r.number("strength", 0.0, 1.0);
    // As the first pass's: the scheduler by its native name, the prompts' length and type here,
    // their tags and weights in validate_hires.
    let schedulers: Vec<(&str, SchedulerKind)> =
        SchedulerKind::ALL.iter().map(|k| (k.name(), *k)).collect();
    let scheduler = r.choice("scheduler", &schedulers);
    let prompt = r.text("prompt", 0, PROMPT_MAX_CHARS);
    let negative_prompt = r.text("negative_prompt", 0, PROMPT_MAX_CHARS);

    let given = |f: &str| obj.get(f).is_some_and(|v| !v.is_null());
    let (has_w, has_h, has_s) = (given("width"), given("height"), given("scale"));
    if has_s && (has_w || has_h) {
        r.fail("scale", "give either scale or width and height, not both");
    } else if !has_s && !has_w && !has_h {
        for f in ["width", "height"] {
            r.fail(f, "is required (width and height), unless scale is given");
        }
    } else if !has_s && has_w != has_h {
        let (missing, other) = if has_w {
            ("height", "width")
        } else {
            ("width", "height")
        };
        r.fail(missing, format!("is required with hires.{other}"));
    }
    if let (Some(s), Some((w, h))) = (scale, first.size) {
        let (tw, th) = (w as f64 * s, h as f64 * s);
        let fits = |t: f64| {
            t.fract() == 0.0 && (t as u64).is_multiple_of(SIZE_MULTIPLE) && {
                let t = t as u64;
                (SIZE_MIN..=SIZE_MAX).contains(&t)
            }
        };
        if !(fits(tw) && fits(th)) {
            r.fail(
                "scale",
                format!(
                    "{w}x{h} times {s} is {tw}x{th}: each side must come out a multiple of \
                     {SIZE_MULTIPLE} in {SIZE_MIN}..={SIZE_MAX} (or give width and height)"
                ),
            );
        }
    }
    // As for init_image's strength: the pass must run at least one step (the default too).
    let steps_value = match steps {
        Some(0) | None => first.steps,
        Some(s) => s as usize,
    };
    let usable = strength.or((!given("strength")).then_some(DENOISING_DEFAULT));
    let rule = first.step_rule.for_hires();
    if let Some(rule) = usable.and_then(|s| {
        super::steps::strength_rule(rule, ("hires steps", steps_value), ("strength", s))
    }) {
        r.fail("strength", rule);
    }
    if let Err(ApiError::Validation(errors)) = r.finish() {
        for e in errors {
            outer.fail(&format!("hires.{}", e.field), e.rule);
        }
        return None;
    }
    let mut fields = Map::new();
    let mut put = |k: &str, v: Value| fields.insert(k.to_string(), v);
    match (width, height, scale) {
        (Some(w), Some(h), _) => {
            put("hr_resize_x", json!(w));
            put("hr_resize_y", json!(h));
        }
        (_, _, Some(s)) => {
            put("hr_scale", json!(s));
        }
        _ => return None,
    }
    if let Some(u) = upscaler {
        put("hr_upscaler", json!(u));
    }
    if let Some(s) = steps {
        put("hr_second_pass_steps", json!(s));
    }
    if let Some(s) = strength {
        put("denoising_strength", json!(s));
    }
    if let Some(p) = prompt {
        put("hr_prompt", json!(p));
    }
    if let Some(p) = negative_prompt {
        put("hr_negative_prompt", json!(p));
    }
    Some(ReadHires { fields, scheduler })
}

/// The pass for the validated first pass `first` ([`read`]'s fields); a rule broken there names
/// the native key.
pub(super) fn build(read: &ReadHires, first: &ValidRequest) -> Result<ValidHires, ApiError> {
    // As A1111's dialect: the first pass's own scheduler named again is no override.
    let sampler = read
        .scheduler
        .filter(|&k| Some(k) != first.scheduler)
        .map(|kind| {
            let first = first
                .scheduler
                .map(|k| super::hires::a1111_sampler_of(k, first.schedule));
            HiresSampler::new(kind, None, first.map(|f| f.0), first.and_then(|f| f.1))
        });
    let mut hires = validate_hires(&read.fields, first, sampler).map_err(|e| match e {
        ApiError::Validation(errors) => ApiError::Validation(
            errors
                .into_iter()
                .map(|e| {
                    let key = A1111_NAMES
                        .iter()
                        .find(|(_, a)| *a == e.field)
                        .map_or("hires".to_string(), |(n, _)| format!("hires.{n}"));
                    FieldError {
                        field: key,
                        rule: e.rule,
                    }
                })
                .collect(),
        ),
        e => e,
    })?;
    hires.prompt_field = "hires.prompt";
    hires.upscaler_field = "hires.upscaler";
    hires.size_fields = match hires.size_fields {
        ["hr_scale"] => &["hires.scale"],
        _ => &["hires.width", "hires.height"],
    };
    Ok(hires)
}

#[cfg(test)]
mod tests {
    use sdserve_pipeline::schedulers::SchedulerKind;
    use serde_json::json;

    use super::super::validate_object;
    use crate::error::ApiError;

    fn fields(body: serde_json::Value) -> Vec<String> {
        match validate_object(body.as_object().unwrap()).unwrap_err() {
            ApiError::Validation(f) => f.into_iter().map(|f| f.field).collect(),
            e => panic!("{e:?}"),
        }
    }

    #[test]
    fn sizes_are_explicit() {
        let v = |hires| {
            let body =
                json!({"prompt": "p", "width": 256, "height": 320, "steps": 6, "hires": hires});
            validate_object(body.as_object().unwrap())
                .unwrap()
                .hires
                .unwrap()
        };
        let h = v(json!({"width": 384, "height": 448}));
        let p = &h.params;
        assert_eq!(
            (p.width, p.height, p.steps, p.strength),
            (384, 448, 6, 0.75)
        );
        assert_eq!(h.upscaler_name, "Latent");
        // Another aspect: upscaled to cover, then cropped (A1111's resize with both sides).
        assert_eq!((p.upscale_width, p.upscale_height), (384, 480));
        let h = v(json!({"scale": 2, "upscaler": "Lanczos", "steps": 3, "strength": 0.5}));
        let p = &h.params;
        assert_eq!((p.width, p.height, p.upscale_width), (512, 640, 512));
        assert_eq!(
            (p.steps, p.strength, &*h.upscaler_name),
            (3, 0.5, "Lanczos")
        );
        assert_eq!(v(json!({"scale": 2, "steps": 0})).params.steps, 6);
        // The pass's own scheduler and prompts, as A1111's hr_sampler_name / hr_prompt /
        // hr_negative_prompt.
        let h = v(
            json!({"scale": 2, "scheduler": "dpmpp_2m_karras", "prompt": "a dog, sharp",
                         "negative_prompt": "fog"}),
        );
        assert_eq!(h.params.scheduler, Some(SchedulerKind::DpmPp2mKarras));
        assert_eq!(h.params.prompt.as_deref(), Some("a dog, sharp"));
        assert_eq!(h.params.negative_prompt.as_deref(), Some("fog"));
        assert!(
            h.infotext_suffix().contains(
                "Hires sampler: DPM++ 2M, Hires schedule type: Karras, Hires prompt: \"a dog, sharp\", Hires negative prompt: fog"
            ),
            "{}",
            h.infotext_suffix()
        );
        let h = v(json!({"scale": 2, "prompt": "", "negative_prompt": null}));
        assert_eq!((h.params.scheduler, h.params.prompt), (None, None));
        let body = json!({"prompt": "p", "hires": null});
        assert_eq!(
            validate_object(body.as_object().unwrap()).unwrap().hires,
            None
        );
    }

    #[test]
    fn broken_rules_name_the_hires_key() {
        let with = |hires| json!({"prompt": "p", "width": 256, "height": 256, "hires": hires});
        assert_eq!(
            fields(with(json!({"width": 400, "height": 384}))),
            ["hires.width"]
        );
        assert_eq!(
            fields(with(json!({"width": 832, "height": 384}))),
            ["hires.width"]
        );
        assert_eq!(fields(with(json!({"width": 384}))), ["hires.height"]);
        assert_eq!(fields(with(json!({}))), ["hires.width", "hires.height"]);
        assert_eq!(
            fields(with(json!({"scale": 2, "width": 512}))),
            ["hires.scale"]
        );
        // 256 * 1.3 = 332.8; 256 * 1.25 = 320 is fine.
        assert_eq!(fields(with(json!({"scale": 1.3}))), ["hires.scale"]);
        assert_eq!(fields(with(json!({"scale": 3.5}))), ["hires.scale"]);
        assert_eq!(
            fields(with(json!({"scale": 1.25, "upscaler": ["ESRGAN_4x"]}))),
            ["hires.upscaler"]
        );
        assert_eq!(
            fields(with(json!({"scale": 2, "steps": 51}))),
            ["hires.steps"]
        );
        assert_eq!(
            fields(with(json!({"scale": 2, "steps": 1, "strength": 0.5}))),
            ["hires.strength"]
        );
        assert_eq!(
            fields(with(json!({"scale": 2, "strength": 1.5}))),
            ["hires.strength"]
        );
        assert_eq!(
            fields(with(json!({"scale": 2, "sacle": 2}))),
            ["hires.sacle"]
        );
        assert_eq!(
            fields(with(json!({"scale": 2, "scheduler": "DPM++ 2M"}))),
            ["hires.scheduler"]
        );
        assert_eq!(
            fields(with(json!({"scale": 2, "prompt": "x <lora:other:1>"}))),
            ["hires.prompt"]
        );
        assert_eq!(
            fields(with(
                json!({"scale": 2, "negative_prompt": "((a:99999999999999999999999):99999999999999999999999)"})
            )),
            ["hires.negative_prompt"]
        );
        assert_eq!(
            fields(with(
                json!({"scale": 2, "prompt": 3, "negative_prompt": "x".repeat(501)})
            )),
            ["hires.prompt", "hires.negative_prompt"]
        );
        assert_eq!(fields(with(json!(2))), ["hires"]);
        // Text-to-image only; every broken field at once.
        let img = sdserve_pipeline::pipeline::RgbImage {
            width: 64,
            height: 64,
            pixels: vec![128; 64 * 64 * 3],
        };
        let png = base64::Engine::encode(
            &base64::engine::general_purpose::STANDARD,
            crate::png::encode(&img, "").unwrap(),
        );
        assert_eq!(
            fields(json!({"prompt": "p", "steps": 0, "init_image": png, "hires": {"scale": 2}})),
            ["steps", "hires"]
        );
    }
}
