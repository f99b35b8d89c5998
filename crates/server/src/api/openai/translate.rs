//! OpenAI image request and error shapes, translated to and from the native request.
//!
//! A body becomes a native `/generate` JSON object (`n` is `batch_size`, `size` is width and
//! height, our extras pass through under their native names), which `validate` checks like any
//! other request; errors are renamed to the parameter the client sent and put in OpenAI's shape.

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Map, Value};

use crate::error::{ApiError, ErrorCode};

/// Parameters of OpenAI's image routes that we accept and do not use: they choose among
/// OpenAI's models, formats and policies, and have no meaning for one local model.
const IGNORED: [&str; 9] = [
    "model",
    "quality",
    "style",
    "user",
    "safety_identifier",
    "moderation",
    "output_compression",
    "input_fidelity",
    "partial_images",
];

/// OpenAI's image models (`dall-e-2`, `dall-e-3`, `gpt-image-1`, ...): clients send them by
/// habit; they run the default model, as before this server had others.
pub fn is_openai_model(name: &str) -> bool {
    name.is_empty() || name.starts_with("dall-e") || name.starts_with("gpt-image")
}

/// Native names and the OpenAI parameters clients send, for error messages.
pub const FIELD_NAMES: [(&str, &str); 5] = [
    ("batch_size", "n"),
    ("width", "size"),
    ("height", "size"),
    ("init_image", "image"),
    ("mask_image", "mask"),
];

/// Native fields a client may not set directly: OpenAI's own parameters stand for them.
pub(crate) const MAPPED: [&str; 6] = [
    "prompt",
    "batch_size",
    "width",
    "height",
    "init_image",
    "mask_image",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponseFormat {
    B64Json,
    Url,
}

/// An OpenAI request in native terms.
#[derive(Debug, Clone, PartialEq)]
pub struct Translated {
    pub native: Map<String, Value>,
    pub format: ResponseFormat,
}

fn bad(param: &str, rule: impl Into<String>) -> ApiError {
    ApiError::validation(param, rule)
}

/// `"WxH"` to (width, height); `auto` (or absent) leaves the native defaults.
fn parse_size(v: &Value) -> Result<Option<(u64, u64)>, ApiError> {
    let rule = "must be \"WIDTHxHEIGHT\" (for example \"512x512\") or \"auto\"";
    let s = v.as_str().ok_or_else(|| bad("size", rule))?;
    if s == "auto" {
        return Ok(None);
    }
    let (w, h) = s
        .split_once('x')
        .and_then(|(w, h)| Some((w.parse().ok()?, h.parse().ok()?)))
        .ok_or_else(|| bad("size", format!("{rule} (got {s:?})")))?;
    Ok(Some((w, h)))
}

/// Translates the JSON (generations) or form fields (edits, values already typed) of an
/// OpenAI image request. `native_fields` are the native request's field names; every one of
/// them that OpenAI has no parameter for is accepted as an extra (`seed`, `steps`, ...).
pub fn translate(
    body: &Map<String, Value>,
    native_fields: &[&str],
) -> Result<Translated, ApiError> {
    let mut native = Map::new();
    let mut format = None;
    for (k, v) in body {
        if v.is_null() {
            continue;
        }
        match k.as_str() {
            "prompt" => {
                native.insert("prompt".into(), v.clone());
            }
            "n" => {
                // n = 1 is the native default; sent only when larger, so a server without
                // batches still answers n = 1.
                if v.as_f64() != Some(1.0) {
                    if !native_fields.contains(&"batch_size") {
                        return Err(bad(
                            "n",
                            "values other than 1 are not supported by this server yet",
                        ));
                    }
                    native.insert("batch_size".into(), v.clone());
                }
            }
            "size" => {
                if let Some((w, h)) = parse_size(v)? {
                    native.insert("width".into(), json!(w));
                    native.insert("height".into(), json!(h));
                }
            }
            "response_format" => {
                format = Some(match v.as_str() {
                    Some("b64_json") => ResponseFormat::B64Json,
                    Some("url") => ResponseFormat::Url,
                    _ => return Err(bad("response_format", "must be \"b64_json\" or \"url\"")),
                })
            }
            "output_format" => {
                if v.as_str() != Some("png") {
                    return Err(bad("output_format", "only \"png\" is supported"));
                }
            }
            "background" => {
                if v.as_str() == Some("transparent") {
                    return Err(bad(
                        "background",
                        "\"transparent\" is not supported; use \"auto\" or \"opaque\"",
                    ));
                }
            }
            "stream" => {
                if v.as_bool() == Some(true) {
                    return Err(bad(
                        "stream",
                        "streaming is not supported; poll /jobs instead",
                    ));
                }
            }
            // OpenAI's own model names mean the default model; another names one of ours.
            "model" => {
                if let Some(m) = v.as_str().filter(|m| !is_openai_model(m)) {
                    native.insert("model".into(), json!(m));
                }
            }
            k if IGNORED.contains(&k) => {}
            k if native_fields.contains(&k) && !MAPPED.contains(&k) => {
                native.insert(k.to_string(), v.clone());
            }
            k => {
                let mut extras: Vec<&str> = native_fields
                    .iter()
                    .copied()
                    .filter(|f| !MAPPED.contains(f))
                    .collect();
                extras.sort_unstable();
                return Err(bad(
                    k,
                    format!(
                        "unknown parameter; besides OpenAI's (prompt, n, size, response_format, ...) this server takes {}",
                        extras.join(", ")
                    ),
                ));
            }
        }
    }
    // dall-e models answer URLs unless told otherwise; everything newer answers base64.
    let dalle = body
        .get("model")
        .and_then(Value::as_str)
        .is_some_and(|m| m.starts_with("dall-e"));
    let format = format.unwrap_or(if dalle {
        ResponseFormat::Url
    } else {
        ResponseFormat::B64Json
    });
    Ok(Translated { native, format })
}

/// Renames native field names in a validation error to the OpenAI parameters.
pub fn openai_names(e: ApiError) -> ApiError {
    super::super::rename_fields(e, &FIELD_NAMES)
}

/// An error in OpenAI's shape: `{error: {message, type, param, code}}`, 400 where the native
/// API says 422, and `x-should-retry: false` where a retry by the client cannot help (the
/// `openai` client retries 408, 409, 429 and 5xx otherwise).
#[derive(Debug)]
pub struct OpenAiError(pub ApiError);

impl From<ApiError> for OpenAiError {
    fn from(e: ApiError) -> Self {
        Self(e)
    }
}

impl OpenAiError {
    pub fn status_and_body(&self) -> (StatusCode, Value) {
        let (status, code) = self.0.status_and_code();
        let status = if status == StatusCode::UNPROCESSABLE_ENTITY {
            StatusCode::BAD_REQUEST
        } else {
            status
        };
        let body = self.0.body();
        let message = match &body.details {
            Some(d) => format!("{}: {d}", body.error),
            None => body.error.clone(),
        };
        let kind = match status.as_u16() {
            401 => "authentication_error",
            429 => "rate_limit_error",
            500..=599 => "server_error",
            _ => "invalid_request_error",
        };
        let param = first_field(&self.0);
        (
            status,
            json!({"error": {"message": message, "type": kind, "param": param, "code": code}}),
        )
    }

    /// False where the same request would fail the same way again.
    pub fn retry_helps(&self) -> bool {
        match &self.0 {
            ApiError::Overloaded { .. }
            | ApiError::ModelUnavailable(_)
            | ApiError::QueueUnavailable(_)
            | ApiError::RateLimited { .. } => true,
            ApiError::OutOfMemory {
                retry_after_secs, ..
            } => retry_after_secs.is_some(),
            _ => false,
        }
    }
}

fn first_field(e: &ApiError) -> Option<String> {
    e.fields().first().map(|f| f.field.clone())
}

impl IntoResponse for OpenAiError {
    fn into_response(self) -> Response {
        let code = self.0.status_and_code().1;
        let retry_helps = self.retry_helps();
        let (status, body) = self.status_and_body();
        // The native response carries Retry-After and the log's error code; keep both.
        let native = self.0.into_response();
        let mut resp = (status, axum::Json(body)).into_response();
        for h in [
            axum::http::header::RETRY_AFTER,
            axum::http::header::WWW_AUTHENTICATE,
        ] {
            if let Some(v) = native.headers().get(&h) {
                resp.headers_mut().insert(h, v.clone());
            }
        }
        if !retry_helps {
            resp.headers_mut()
                .insert("x-should-retry", HeaderValue::from_static("false"));
        }
        resp.extensions_mut().insert(ErrorCode(code));
        resp
    }
}

/// An OpenAI edit mask in native terms: with an alpha channel, transparent pixels are
/// repainted (grey = 255 - alpha, so the native rule binarises at half transparency); without
/// one, white is repainted, as natively. Returns a PNG for `mask_image`, or `None` when the
/// mask needs no change.
pub fn mask_from_alpha(png_bytes: &[u8], field: &str) -> Result<Option<Vec<u8>>, ApiError> {
    let Some((w, h, alpha)) = png_alpha(png_bytes, field)? else {
        return Ok(None);
    };
    let grey: Vec<u8> = alpha.iter().map(|a| 255 - a).collect();
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, w, h);
        enc.set_color(png::ColorType::Grayscale);
        enc.set_depth(png::BitDepth::Eight);
        let mut wr = enc
            .write_header()
            .map_err(|e| ApiError::Internal(format!("mask encoding: {e}")))?;
        wr.write_image_data(&grey)
            .map_err(|e| ApiError::Internal(format!("mask encoding: {e}")))?;
    }
    Ok(Some(out))
}

/// The alpha channel of a PNG, 8-bit, when it has one with a pixel below full opacity, turned
/// by the PNG's EXIF Orientation as its colours are (`images::decode_bytes`).
/// Not a PNG: `None` (the native decoder reports what is wrong with it). The size rule of
/// request images is checked from the header, before any pixel buffer exists.
pub fn png_alpha(bytes: &[u8], field: &str) -> Result<Option<(u32, u32, Vec<u8>)>, ApiError> {
    let mut dec = png::Decoder::new(std::io::Cursor::new(bytes));
    dec.set_transformations(png::Transformations::EXPAND | png::Transformations::STRIP_16);
    let Ok(mut reader) = dec.read_info() else {
        return Ok(None);
    };
    let (w, h) = (reader.info().width, reader.info().height);
    crate::images::check_dimensions(w, h).map_err(|rule| bad(field, rule))?;
    let orientation = reader
        .info()
        .exif_metadata
        .as_deref()
        .and_then(image::metadata::Orientation::from_exif_chunk);
    let Some(size) = reader.output_buffer_size() else {
        return Ok(None);
    };
    let mut buf = vec![0; size];
    let frame = reader
        .next_frame(&mut buf)
        .map_err(|e| bad(field, format!("is not a readable PNG ({e})")))?;
    let channels = match frame.color_type {
        png::ColorType::GrayscaleAlpha => 2,
        png::ColorType::Rgba => 4,
        _ => return Ok(None),
    };
    let alpha: Vec<u8> = buf[..frame.buffer_size()]
        .chunks_exact(channels)
        .map(|px| px[channels - 1])
        .collect();
    if alpha.iter().all(|&a| a == 255) {
        return Ok(None);
    }
    let Some(orientation) = orientation else {
        return Ok(Some((w, h, alpha)));
    };
    let plane = image::GrayImage::from_raw(w, h, alpha)
        .ok_or_else(|| bad(field, "has an alpha channel of the wrong length"))?;
    let mut turned = image::DynamicImage::ImageLuma8(plane);
    turned.apply_orientation(orientation);
    let (w, h) = (turned.width(), turned.height());
    Ok(Some((w, h, turned.into_luma8().into_raw())))
}

#[cfg(test)]
mod tests {
    use super::*;

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

    fn tr(v: Value) -> Result<Translated, ApiError> {
        translate(v.as_object().unwrap(), &FIELDS)
    }

    fn param(e: ApiError) -> Option<String> {
        first_field(&e)
    }

    #[test]
    fn size_n_and_extras_map_to_native() {
        let t = tr(json!({"prompt": "p", "size": "256x320", "n": 1, "seed": 3, "steps": 2, "model": "dall-e-2", "quality": "hd"})).unwrap();
        assert_eq!(
            Value::Object(t.native),
            json!({"prompt": "p", "width": 256, "height": 320, "seed": 3, "steps": 2})
        );
        assert_eq!(t.format, ResponseFormat::Url);
        let t = tr(json!({"prompt": "p", "size": "auto", "response_format": "b64_json"})).unwrap();
        assert_eq!(Value::Object(t.native), json!({"prompt": "p"}));
        assert_eq!(t.format, ResponseFormat::B64Json);
        assert_eq!(
            tr(json!({"prompt": "p"})).unwrap().format,
            ResponseFormat::B64Json
        );
    }

    #[test]
    fn bad_parameters_are_named() {
        for (body, p) in [
            (json!({"prompt": "p", "size": "big"}), "size"),
            (json!({"prompt": "p", "size": 512}), "size"),
            (
                json!({"prompt": "p", "response_format": "png"}),
                "response_format",
            ),
            (json!({"prompt": "p", "stream": true}), "stream"),
            (json!({"prompt": "p", "width": 256}), "width"),
            (json!({"prompt": "p", "colour": "red"}), "colour"),
            (
                json!({"prompt": "p", "output_format": "jpeg"}),
                "output_format",
            ),
        ] {
            assert_eq!(
                param(tr(body.clone()).unwrap_err()).as_deref(),
                Some(p),
                "{body}"
            );
        }
        // Native rules, OpenAI names.
        let t = tr(json!({"prompt": "p", "size": "1024x1024"})).unwrap();
        let e = crate::validate::validate_object(&t.native).map_err(openai_names);
        assert_eq!(param(e.unwrap_err()).as_deref(), Some("size"));
    }

    #[test]
    fn errors_take_openai_shape() {
        let e = OpenAiError::from(openai_names(ApiError::validation(
            "batch_size",
            "must be at most 8",
        )));
        let (status, body) = e.status_and_body();
        assert_eq!(status, 400);
        assert_eq!(body["error"]["type"], "invalid_request_error");
        assert_eq!(body["error"]["param"], "n");
        assert_eq!(body["error"]["code"], "validation_error");
        assert!(body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("n: must be at most 8"));
        assert!(!e.retry_helps());
        let e = OpenAiError::from(ApiError::Overloaded {
            retry_after_secs: 3,
        });
        assert!(e.retry_helps());
        let resp = e.into_response();
        assert_eq!(resp.status(), 429);
        assert_eq!(resp.headers()["retry-after"], "3");
        assert!(resp.headers().get("x-should-retry").is_none());
        let resp = OpenAiError::from(ApiError::Timeout(60.into())).into_response();
        assert_eq!(resp.status(), 408);
        assert_eq!(resp.headers()["x-should-retry"], "false");
        let (status, body) =
            OpenAiError::from(ApiError::Internal("secret".into())).status_and_body();
        assert_eq!(status, 500);
        assert_eq!(body["error"]["type"], "server_error");
        assert!(!body.to_string().contains("secret"));
    }

    fn png(color: png::ColorType, w: u32, h: u32, px: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut enc = png::Encoder::new(&mut out, w, h);
        enc.set_color(color);
        enc.set_depth(png::BitDepth::Eight);
        enc.write_header().unwrap().write_image_data(px).unwrap();
        out
    }

    #[test]
    fn transparent_means_repaint() {
        // 2x1 RGBA: opaque black, fully transparent.
        let m = png(png::ColorType::Rgba, 2, 1, &[0, 0, 0, 255, 9, 9, 9, 0]);
        let grey = mask_from_alpha(&m, "mask").unwrap().unwrap();
        let mut r = png::Decoder::new(std::io::Cursor::new(grey))
            .read_info()
            .unwrap();
        let mut buf = vec![0; r.output_buffer_size().unwrap()];
        r.next_frame(&mut buf).unwrap();
        assert_eq!(buf, [0, 255]);
        // No alpha, or all opaque: the mask is used as it is (white = repaint).
        let rgb = png(png::ColorType::Rgb, 1, 1, &[255, 255, 255]);
        assert_eq!(mask_from_alpha(&rgb, "mask").unwrap(), None);
        let opaque = png(png::ColorType::GrayscaleAlpha, 1, 1, &[255, 255]);
        assert_eq!(mask_from_alpha(&opaque, "mask").unwrap(), None);
        assert_eq!(mask_from_alpha(b"not a png", "mask").unwrap(), None);
    }
}
