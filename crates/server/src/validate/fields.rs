//! Reading a request object field by field: typed readers that collect every broken rule.

use serde_json::{Map, Value};

use crate::error::{ApiError, FieldError};

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
        // The number as the client wrote it (`1e+308`), not f64's Display (309 digits).
        return Err(format!("{rule} (got {v})"));
    }
    Ok(g)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn out_of_range_numbers_are_quoted_as_written() {
        let e = check_number(&json!(1e308), 1.0, 3.0).unwrap_err();
        assert_eq!(e, "must be a number between 1 and 3 (got 1e+308)");
        let e = check_number(&json!(-0.5), 0.0, 1.0).unwrap_err();
        assert_eq!(e, "must be a number between 0 and 1 (got -0.5)");
        let e = check_int(&json!(1e20), 0, 10).unwrap_err();
        assert_eq!(e, "must be an integer between 0 and 10 (got 1e+20)");
    }
}
