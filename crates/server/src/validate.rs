//! Every rule of `POST /generate` (DESIGN.md §1), in one place.
//!
//! The body is parsed to a JSON value first and each field checked by hand, so every error can
//! name its field. Status choice (documented in the OpenAPI description too):
//! - 400 `invalid_json`: not JSON at all, not an object, or not sent as `application/json`;
//! - 422 `validation_error`: everything about fields: missing, wrong type, out of range, and
//!   unknown fields (`details` names the field).

use sdserve_pipeline::schedulers::SchedulerKind;
use serde_json::{Map, Value};

use crate::error::ApiError;

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

const FIELDS: [&str; 8] = [
    "prompt",
    "negative_prompt",
    "steps",
    "width",
    "height",
    "seed",
    "guidance_scale",
    "scheduler",
];

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

/// Parses and validates a `/generate` body.
pub fn parse_generate(body: &[u8]) -> Result<ValidRequest, ApiError> {
    let value: Value =
        serde_json::from_slice(body).map_err(|e| ApiError::InvalidJson(e.to_string()))?;
    let Value::Object(map) = value else {
        return Err(ApiError::InvalidJson(
            "the body must be a JSON object".into(),
        ));
    };
    validate_object(&map)
}

fn validate_object(map: &Map<String, Value>) -> Result<ValidRequest, ApiError> {
    // Unknown fields first: a misspelt field should not hide behind another error.
    if let Some(unknown) = map.keys().find(|k| !FIELDS.contains(&k.as_str())) {
        return Err(ApiError::validation(
            unknown,
            format!("unknown field; allowed fields: {}", FIELDS.join(", ")),
        ));
    }
    let prompt = match map.get("prompt") {
        None | Some(Value::Null) => return Err(ApiError::validation("prompt", "is required")),
        Some(v) => text_field("prompt", v, 1)?,
    };
    let negative_prompt = match map.get("negative_prompt") {
        None => String::new(),
        Some(v) => text_field("negative_prompt", v, 0)?,
    };
    let steps = int_field(map, "steps", STEPS_MIN, STEPS_MAX, |_| None)?
        .map_or(STEPS_DEFAULT, |v| v as usize);
    let size_rule = |v: u64| {
        (!v.is_multiple_of(SIZE_MULTIPLE)).then(|| format!("must be a multiple of {SIZE_MULTIPLE}"))
    };
    let width = int_field(map, "width", SIZE_MIN, SIZE_MAX, size_rule)?
        .map_or(SIZE_DEFAULT, |v| v as usize);
    let height = int_field(map, "height", SIZE_MIN, SIZE_MAX, size_rule)?
        .map_or(SIZE_DEFAULT, |v| v as usize);
    let seed = match map.get("seed") {
        None | Some(Value::Null) => None,
        Some(_) => int_field(map, "seed", 0, SEED_MAX, |_| None)?.map(|v| v as u32),
    };
    let guidance_scale = match map.get("guidance_scale") {
        None => GUIDANCE_DEFAULT,
        Some(v) => {
            let rule = format!("must be a number between {GUIDANCE_MIN} and {GUIDANCE_MAX}");
            let g = v
                .as_f64()
                .ok_or_else(|| ApiError::validation("guidance_scale", rule.clone()))?;
            if !(GUIDANCE_MIN..=GUIDANCE_MAX).contains(&g) {
                return Err(ApiError::validation(
                    "guidance_scale",
                    format!("{rule} (got {g})"),
                ));
            }
            g
        }
    };
    let scheduler = match map.get("scheduler") {
        None | Some(Value::Null) => None,
        Some(v) => {
            let names: Vec<&str> = SchedulerKind::ALL.iter().map(|k| k.name()).collect();
            let rule = format!("must be one of {}", names.join(", "));
            let name = v
                .as_str()
                .ok_or_else(|| ApiError::validation("scheduler", rule.clone()))?;
            Some(SchedulerKind::from_name(name).ok_or_else(|| {
                ApiError::validation("scheduler", format!("{rule} (got {name:?})"))
            })?)
        }
    };
    Ok(ValidRequest {
        prompt,
        negative_prompt,
        steps,
        width,
        height,
        seed,
        guidance_scale,
        scheduler,
    })
}

/// Removes control characters other than whitespace, then trims.
pub fn sanitize_text(s: &str) -> String {
    let kept: String = s
        .chars()
        .filter(|c| !c.is_control() || c.is_whitespace())
        .collect();
    kept.trim().to_string()
}

fn text_field(field: &str, v: &Value, min: usize) -> Result<String, ApiError> {
    let s = v
        .as_str()
        .ok_or_else(|| ApiError::validation(field, "must be a string"))?;
    let clean = sanitize_text(s);
    let n = clean.chars().count();
    if n < min {
        return Err(ApiError::validation(
            field,
            "must not be empty (after trimming and removing control characters)",
        ));
    }
    if n > PROMPT_MAX_CHARS {
        return Err(ApiError::validation(
            field,
            format!("must be at most {PROMPT_MAX_CHARS} characters (got {n})"),
        ));
    }
    Ok(clean)
}

/// An optional integer field in `min..=max`; `extra` adds a rule (returns the broken rule).
/// Numbers written with a zero fraction (`20.0`) count as integers, as JSON does not tell them apart.
fn int_field(
    map: &Map<String, Value>,
    field: &str,
    min: u64,
    max: u64,
    extra: impl Fn(u64) -> Option<String>,
) -> Result<Option<u64>, ApiError> {
    let Some(v) = map.get(field) else {
        return Ok(None);
    };
    let range = format!("must be an integer between {min} and {max}");
    let out_of_range =
        |shown: String| ApiError::validation(field, format!("{range} (got {shown})"));
    let n = match v {
        Value::Number(n) => {
            if let Some(u) = n.as_u64() {
                u
            } else if let Some(i) = n.as_i64() {
                return Err(out_of_range(i.to_string()));
            } else {
                let f = n.as_f64().unwrap_or(f64::NAN);
                if f.fract() != 0.0 || !f.is_finite() {
                    return Err(ApiError::validation(
                        field,
                        format!("{range} (got {n}, not an integer)"),
                    ));
                }
                if f < 0.0 || f > u64::MAX as f64 {
                    return Err(out_of_range(n.to_string()));
                }
                f as u64
            }
        }
        _ => return Err(ApiError::validation(field, range)),
    };
    if !(min..=max).contains(&n) {
        return Err(out_of_range(n.to_string()));
    }
    if let Some(rule) = extra(n) {
        return Err(ApiError::validation(field, format!("{rule} (got {n})")));
    }
    Ok(Some(n))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<ValidRequest, ApiError> {
        parse_generate(s.as_bytes())
    }

    fn field_of(e: ApiError) -> String {
        match e {
            ApiError::Validation { field, .. } => field,
            other => panic!("expected a validation error, got {other:?}"),
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
                vec!["0", "51", "-1", "2.5", "\"20\"", "true", "null"],
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
}
