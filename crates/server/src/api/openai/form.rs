//! The multipart forms of `images/edits` and `images/variations`: the image files, and every
//! other part as a parameter (JSON where it parses, text for the native text fields).

use axum::extract::Multipart;
use axum::http::StatusCode;
use serde_json::{Map, Value};

use super::MAX_PARTS;
use crate::error::ApiError;

/// Native fields whose multipart text stays text (every other value is read as JSON: numbers,
/// lists, `null`).
const TEXT_FIELDS: [&str; 6] = [
    "prompt",
    "negative_prompt",
    "scheduler",
    "schedule",
    "prompt_syntax",
    "size",
];

/// A form's parameters, its `image` file and its `mask` file.
pub(super) struct ImageForm {
    pub params: Map<String, Value>,
    pub image: Option<Vec<u8>>,
    pub mask: Option<Vec<u8>>,
}

/// Reads a form of at most [`MAX_PARTS`] parts: `image` (or `image[]`) and `mask` at most once
/// each; a body past `max_body_bytes` is a 413.
pub(super) async fn read(
    multipart: Result<Multipart, axum::extract::multipart::MultipartRejection>,
    max_body_bytes: usize,
) -> Result<ImageForm, ApiError> {
    let mut multipart = multipart.map_err(|e| {
        ApiError::InvalidJson(format!("expected multipart/form-data: {}", e.body_text()))
    })?;
    let too_large = |e: axum::extract::multipart::MultipartError| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge(max_body_bytes)
        } else {
            ApiError::InvalidJson(format!("malformed multipart body: {}", e.body_text()))
        }
    };
    let mut form = ImageForm {
        params: Map::new(),
        image: None,
        mask: None,
    };
    let mut parts = 0;
    while let Some(field) = multipart.next_field().await.map_err(too_large)? {
        parts += 1;
        if parts > MAX_PARTS {
            return Err(ApiError::InvalidJson(format!(
                "a multipart form of at most {MAX_PARTS} parts is accepted"
            )));
        }
        let name = field.name().unwrap_or_default().to_string();
        match name.as_str() {
            "image" | "image[]" => {
                let bytes = field.bytes().await.map_err(too_large)?;
                if form.image.replace(bytes.to_vec()).is_some() {
                    return Err(ApiError::validation("image", "one image only"));
                }
            }
            "mask" => {
                let bytes = field.bytes().await.map_err(too_large)?;
                if form.mask.replace(bytes.to_vec()).is_some() {
                    return Err(ApiError::validation("mask", "one mask only"));
                }
            }
            _ => {
                let text = field.text().await.map_err(too_large)?;
                let value = if TEXT_FIELDS.contains(&name.as_str()) {
                    Value::String(text)
                } else {
                    serde_json::from_str(&text).unwrap_or(Value::String(text))
                };
                form.params.insert(name, value);
            }
        }
    }
    Ok(form)
}
