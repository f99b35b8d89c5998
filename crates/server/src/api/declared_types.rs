//! The JSON types and numeric bounds a dialect's OpenAPI schema declares for its request fields,
//! checked before translation. A dialect accepts and ignores fields it does not use (as A1111
//! does), but a field the schema lists must still have the type and range the schema gives it,
//! used or not: otherwise a client reading our schema is told one thing and the server does
//! another (schemathesis checks this).

use std::collections::HashMap;

use serde_json::{Map, Value};
use utoipa::PartialSchema;

use crate::error::{ApiError, FieldError};

/// A field's declared JSON type (arrays with their items' type when that is a plain one).
#[derive(Debug, Clone, PartialEq)]
enum Declared {
    String,
    Integer,
    Number,
    Boolean,
    Object,
    Array(Option<Box<Declared>>),
}

/// A field's declared type and numeric bounds.
#[derive(Debug, Clone, PartialEq)]
struct Field {
    kind: Declared,
    minimum: Option<f64>,
    maximum: Option<f64>,
    exclusive_minimum: Option<f64>,
    exclusive_maximum: Option<f64>,
}

/// The declared types of a schema's top-level properties (those with a plain type).
pub struct DeclaredTypes(HashMap<String, Field>);

impl DeclaredTypes {
    pub fn of<T: PartialSchema>() -> Self {
        let schema = serde_json::to_value(T::schema()).unwrap_or_default();
        let fields = schema
            .get("properties")
            .and_then(Value::as_object)
            .into_iter()
            .flatten()
            .filter_map(|(name, s)| {
                let bound = |key: &str| s.get(key).and_then(Value::as_f64);
                // An integer's `format` bounds it too (JSON Schema tools read it so).
                let (format_min, format_max) = match s.get("format").and_then(Value::as_str) {
                    Some("int32") => (Some(f64::from(i32::MIN)), Some(f64::from(i32::MAX))),
                    Some("int64") => (Some(i64::MIN as f64), Some(i64::MAX as f64)),
                    _ => (None, None),
                };
                let field = Field {
                    kind: declared(s)?,
                    minimum: bound("minimum").or(format_min),
                    maximum: bound("maximum").or(format_max),
                    exclusive_minimum: bound("exclusiveMinimum"),
                    exclusive_maximum: bound("exclusiveMaximum"),
                };
                Some((name.clone(), field))
            })
            .collect();
        Self(fields)
    }

    /// A 422 naming every field whose value is not of its declared type or is outside its
    /// declared bounds; `null` is absent (A1111 and our schemas make every optional field
    /// nullable).
    pub fn check(&self, body: &Map<String, Value>) -> Result<(), ApiError> {
        let broken: Vec<FieldError> = body
            .iter()
            .filter(|(_, value)| !value.is_null())
            .filter_map(|(name, value)| {
                let want = self.0.get(name)?;
                let rule = if fits(&want.kind, value) {
                    value.as_f64().and_then(|x| want.out_of_bounds(x))?
                } else {
                    format!("must be {}", noun(&want.kind))
                };
                Some(FieldError {
                    field: name.clone(),
                    rule,
                })
            })
            .collect();
        if broken.is_empty() {
            Ok(())
        } else {
            Err(ApiError::Validation(broken))
        }
    }
}

impl Field {
    /// The bounds as a rule, when `x` breaks one.
    fn out_of_bounds(&self, x: f64) -> Option<String> {
        let low =
            self.minimum.is_some_and(|m| x < m) || self.exclusive_minimum.is_some_and(|m| x <= m);
        let high =
            self.maximum.is_some_and(|m| x > m) || self.exclusive_maximum.is_some_and(|m| x >= m);
        if !low && !high {
            return None;
        }
        let mut parts = Vec::new();
        if let Some(m) = self.minimum {
            parts.push(format!("at least {m}"));
        }
        if let Some(m) = self.exclusive_minimum {
            parts.push(format!("above {m}"));
        }
        if let Some(m) = self.maximum {
            parts.push(format!("at most {m}"));
        }
        if let Some(m) = self.exclusive_maximum {
            parts.push(format!("below {m}"));
        }
        Some(format!("must be {}", parts.join(" and ")))
    }
}

/// `type` may be a name or a list with "null" (utoipa's nullable).
fn declared(schema: &Value) -> Option<Declared> {
    let name = match schema.get("type")? {
        Value::String(t) => t.as_str(),
        Value::Array(ts) => {
            let mut names = ts.iter().filter_map(Value::as_str).filter(|t| *t != "null");
            let one = names.next()?;
            if names.next().is_some() {
                return None;
            }
            one
        }
        _ => return None,
    };
    Some(match name {
        "string" => Declared::String,
        "integer" => Declared::Integer,
        "number" => Declared::Number,
        "boolean" => Declared::Boolean,
        "object" => Declared::Object,
        "array" => Declared::Array(schema.get("items").and_then(declared).map(Box::new)),
        _ => return None,
    })
}

fn fits(want: &Declared, value: &Value) -> bool {
    match (want, value) {
        (Declared::String, Value::String(_))
        | (Declared::Number, Value::Number(_))
        | (Declared::Boolean, Value::Bool(_))
        | (Declared::Object, Value::Object(_)) => true,
        // JSON Schema's integer: any number without a fractional part (5.0 included).
        (Declared::Integer, Value::Number(n)) => {
            n.is_i64() || n.is_u64() || n.as_f64().is_some_and(|f| f.fract() == 0.0)
        }
        (Declared::Array(items), Value::Array(values)) => items
            .as_deref()
            .is_none_or(|item| values.iter().all(|v| fits(item, v))),
        _ => false,
    }
}

fn noun(want: &Declared) -> String {
    match want {
        Declared::String => "a string".into(),
        Declared::Integer => "an integer".into(),
        Declared::Number => "a number".into(),
        Declared::Boolean => "true or false".into(),
        Declared::Object => "an object".into(),
        Declared::Array(None) => "an array".into(),
        Declared::Array(Some(item)) => format!("an array of which each item is {}", noun(item)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[derive(serde::Serialize, utoipa::ToSchema)]
    #[allow(dead_code)]
    struct Probe {
        text: Option<String>,
        count: Option<u32>,
        scale: Option<f64>,
        flag: Option<bool>,
        names: Option<Vec<String>>,
        #[schema(value_type = Object, nullable = true)]
        settings: Option<Value>,
        #[schema(minimum = -1, maximum = 8)]
        bounded: Option<i64>,
        wide: Option<u32>,
        #[schema(exclusive_minimum = 0.0)]
        positive: Option<f64>,
    }

    #[test]
    fn declared_types_accept_their_values_and_name_every_wrong_field() {
        let types = DeclaredTypes::of::<Probe>();
        let ok = json!({"text": "a", "count": 3.0, "scale": 1, "flag": false,
            "names": ["x"], "settings": {}, "unknown": [1], "text2": 5, "bounded": -1,
            "positive": 1e-9});
        types.check(ok.as_object().unwrap()).unwrap();
        let nulls = json!({"text": null, "count": null, "names": null, "settings": null});
        types.check(nulls.as_object().unwrap()).unwrap();
        for (body, field) in [
            (json!({"text": {}}), "text"),
            (json!({"count": 2.5}), "count"),
            (json!({"count": "3"}), "count"),
            (json!({"scale": "1"}), "scale"),
            (json!({"flag": 0}), "flag"),
            (json!({"names": "x"}), "names"),
            (json!({"names": ["x", 1]}), "names"),
            (json!({"settings": [null]}), "settings"),
            (json!({"bounded": -2}), "bounded"),
            (json!({"bounded": 9}), "bounded"),
            (json!({"positive": 0.0}), "positive"),
            (json!({"wide": 2147483648_u64}), "wide"),
        ] {
            let e = types.check(body.as_object().unwrap()).unwrap_err();
            let ApiError::Validation(ref f) = e else {
                panic!("{body}: {e:?}")
            };
            assert_eq!(f[0].field, field, "{body}");
            assert_eq!(f.len(), 1, "{body}: {f:?}");
        }
        // Every broken field is named (in the map's order: by name).
        let two = json!({"count": "x", "text": "fine", "bounded": 100});
        let Err(ApiError::Validation(f)) = types.check(two.as_object().unwrap()) else {
            panic!("two broken fields accepted")
        };
        let names: Vec<&str> = f.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(names, ["bounded", "count"]);
    }
}
