//! OpenAI's image API under `/v1` (README "Clients that already exist"): what the `openai` client sends
//! and parses. `images/generations` (JSON), `images/edits` and `images/variations` (multipart,
//! `form`) are translated (`translate`) into the one native request and run like `/generate`;
//! every error on `/v1` takes OpenAI's shape.
//!
//! `response_format: url` answers links to `/v1/images/files/{id}.png`, kept like finished
//! jobs (the last `KEPT_FILES`, at most `FILE_TTL`).

mod form;
pub mod schema;
pub mod translate;

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Multipart, Path, Request, State};
use axum::http::{header, HeaderMap};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use serde_json::{json, Map, Value};

use super::{body_object, native, random_seed, AppState, Shared};
use crate::error::{ApiError, ErrorCode};
use crate::validate::DialectRules;
use translate::{OpenAiError, ResponseFormat};

const KEPT_FILES: usize = 64;
/// Parts an `images/edits` or `images/variations` form may have: OpenAI's parameters and our extras are about twenty,
/// so a form of hundreds of tiny parts is refused by count, before its size limit.
pub const MAX_PARTS: usize = 64;
const FILE_TTL: Duration = Duration::from_secs(600);

/// Images answered as URLs, newest last.
#[derive(Default)]
pub struct Files(Mutex<VecDeque<(String, Instant, Bytes)>>);

impl Files {
    fn put(&self, png: Bytes) -> String {
        let id = format!(
            "{:08x}{:08x}{:08x}",
            random_seed(),
            random_seed(),
            random_seed()
        );
        let mut q = self.0.lock().unwrap_or_else(|e| e.into_inner());
        q.retain(|(_, at, _)| at.elapsed() < FILE_TTL);
        while q.len() >= KEPT_FILES {
            q.pop_front();
        }
        q.push_back((id.clone(), Instant::now(), png));
        id
    }

    fn get(&self, id: &str) -> Option<Bytes> {
        let q = self.0.lock().unwrap_or_else(|e| e.into_inner());
        q.iter()
            .find(|(i, at, _)| i == id && at.elapsed() < FILE_TTL)
            .map(|(_, _, png)| png.clone())
    }
}

/// `json_limit`: the body limit of `images/generations` (no image in it).
pub fn router(json_limit: usize) -> Router<Shared> {
    Router::new()
        .route(
            "/v1/images/generations",
            post(generations).layer(DefaultBodyLimit::max(json_limit)),
        )
        .route("/v1/images/edits", post(edits))
        .route("/v1/images/variations", post(variations))
        .route("/v1/images/files/{name}", get(file))
        .route("/v1/models", get(models))
        .route("/v1/models/{id}", get(model))
        .route("/v1/{*rest}", axum::routing::any(not_found))
        .layer(middleware::from_fn(openai_errors))
}

async fn not_found() -> OpenAiError {
    OpenAiError(ApiError::NotFound(
        "no such route under /v1; see /docs".into(),
    ))
}

/// Errors axum answers by itself on `/v1` routes (405, rejected bodies) in OpenAI's shape too.
async fn openai_errors(req: Request, next: Next) -> Response {
    let resp = next.run(req).await;
    let status = resp.status();
    if (status.is_client_error() || status.is_server_error())
        && resp.extensions().get::<ErrorCode>().is_none()
    {
        let (parts, _) = resp.into_parts();
        let mut out = OpenAiError(ApiError::from_status(status)).into_response();
        *out.status_mut() = status;
        for (k, v) in parts.headers.iter() {
            if k != header::CONTENT_TYPE && k != header::CONTENT_LENGTH {
                out.headers_mut().insert(k.clone(), v.clone());
            }
        }
        return out;
    }
    resp
}

fn created() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Text to image.
#[utoipa::path(post, path = "/v1/images/generations", tag = "openai", request_body = schema::GenerationRequest, responses((status = 200, body = schema::ImagesResponse), (status = 400, description = "A parameter breaks a rule", body = schema::ErrorBody), (status = 408, description = "Past GENERATION_TIMEOUT_SECONDS; `x-should-retry: false`", body = schema::ErrorBody), (status = 413, description = "Body too large", body = schema::ErrorBody), (status = 429, description = "Busy; `Retry-After`", body = schema::ErrorBody), (status = 503, description = "Loading, or out of memory", body = schema::ErrorBody)))]
async fn generations(
    State(app): State<Shared>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, OpenAiError> {
    let body = body_object(app.json_body_bytes(), body)?;
    let t = translate::translate(&body, &crate::validate::FIELDS)?;
    run(&app, &headers, t.native, t.format, DialectRules::NATIVE).await
}

/// Validates the native body and runs it; the answer in OpenAI's shape.
async fn run(
    app: &AppState,
    headers: &HeaderMap,
    native_body: Map<String, Value>,
    format: ResponseFormat,
    rules: DialectRules,
) -> Result<Response, OpenAiError> {
    // Off the runtime's threads: validation decodes the edit's image and mask.
    let styles = app.styles.clone();
    let req = crate::api::off_the_runtime(move || {
        let mut native_body = native_body;
        let written = crate::styles::AsWritten::read(&native_body);
        let styled = styles.apply(&mut native_body, crate::styles::Dialect::Native);
        let checked = crate::validate::validate_request(&native_body, rules);
        crate::styles::with_styles(styled, written, checked)
            .map(|(mut valid, as_written)| {
                valid.as_written = as_written;
                valid
            })
            .map_err(translate::openai_names)
    })
    .await?;
    // Rules checked against the model name OpenAI's parameters too.
    let out = native::run(app, req)
        .await
        .map_err(translate::openai_names)?;
    let prompt = out.prompt()?;
    let mut data = Vec::new();
    for (b64, _seed) in out.images()? {
        data.push(match format {
            ResponseFormat::B64Json => json!({"b64_json": b64, "revised_prompt": prompt}),
            ResponseFormat::Url => {
                let png = base64::engine::general_purpose::STANDARD
                    .decode(&b64)
                    .map_err(|e| ApiError::Internal(e.to_string()))?;
                let id = app.openai_files.put(Bytes::from(png));
                json!({"url": file_url(headers, &id), "revised_prompt": prompt})
            }
        });
    }
    let mut resp =
        Json(json!({"created": created(), "data": data, "output_format": "png"})).into_response();
    resp.extensions_mut().insert(out.stats);
    Ok(resp)
}

/// An absolute link back to this server, as the client addressed it.
fn file_url(headers: &HeaderMap, id: &str) -> String {
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("localhost");
    let scheme = headers
        .get("x-forwarded-proto")
        .and_then(|h| h.to_str().ok())
        .filter(|s| *s == "https" || *s == "http")
        .unwrap_or("http");
    format!("{scheme}://{host}/v1/images/files/{id}.png")
}

/// An image answered as a `url`.
#[utoipa::path(get, path = "/v1/images/files/{name}", tag = "openai", params(("name" = String, Path, description = "`{id}.png` from a `url` answer")), responses((status = 200, description = "The PNG", content_type = "image/png"), (status = 404, body = schema::ErrorBody)))]
async fn file(State(app): State<Shared>, Path(name): Path<String>) -> Response {
    let id = name.strip_suffix(".png").unwrap_or(&name);
    match app.openai_files.get(id) {
        Some(png) => ([(header::CONTENT_TYPE, "image/png")], png).into_response(),
        None => OpenAiError(ApiError::NotFound(format!(
            "no image {name:?}; images are kept {} s",
            FILE_TTL.as_secs()
        )))
        .into_response(),
    }
}

/// `images/edits`: multipart `image` (and `mask`) files with the other parameters as text.
#[utoipa::path(post, path = "/v1/images/edits", tag = "openai", request_body(content = schema::EditRequest, content_type = "multipart/form-data"), responses((status = 200, body = schema::ImagesResponse), (status = 400, description = "A parameter breaks a rule", body = schema::ErrorBody), (status = 408, description = "Past GENERATION_TIMEOUT_SECONDS; `x-should-retry: false`", body = schema::ErrorBody), (status = 413, description = "Body too large", body = schema::ErrorBody), (status = 429, description = "Busy; `Retry-After`", body = schema::ErrorBody), (status = 503, description = "Loading, or out of memory", body = schema::ErrorBody)))]
async fn edits(
    State(app): State<Shared>,
    headers: HeaderMap,
    multipart: Result<Multipart, axum::extract::multipart::MultipartRejection>,
) -> Result<Response, OpenAiError> {
    let form = form::read(multipart, app.max_body_bytes).await?;
    let (body, image, mask) = (form.params, form.image, form.mask);
    let image = image.ok_or_else(|| ApiError::validation("image", "is required (a PNG file)"))?;
    let t = translate::translate(&body, &crate::validate::FIELDS)?;
    let format = t.format;
    let mut native_body = t.native;
    // Off the runtime's threads: reading the alpha channel decodes the images.
    let native_body = crate::api::off_the_runtime(move || {
        let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
        // OpenAI: without a mask, the image's own transparent pixels are the ones repainted.
        let mask = match mask {
            Some(m) => Some(translate::mask_from_alpha(&m, "mask")?.unwrap_or(m)),
            None => translate::mask_from_alpha(&image, "image")?,
        };
        if let Some(m) = mask {
            native_body.insert("mask_image".into(), json!(b64(&m)));
        }
        native_body.insert("init_image".into(), json!(b64(&image)));
        Ok::<_, ApiError>(native_body)
    })
    .await?;
    run(&app, &headers, native_body, format, DialectRules::NATIVE).await
}

/// A variation's `strength` unless the form sends one: A1111's img2img default (its
/// `denoising_strength`), enough to change the details and keep the composition.
pub const VARIATION_STRENGTH: f64 = 0.75;

/// `images/variations` (DALL-E 2's): new images like the form's `image`: img2img of it (at its
/// own size unless `size` is sent) at [`VARIATION_STRENGTH`], with no prompt unless one is
/// sent; answered as URLs unless `response_format` says otherwise (DALL-E 2's default).
#[utoipa::path(post, path = "/v1/images/variations", tag = "openai", request_body(content = schema::VariationRequest, content_type = "multipart/form-data"), responses((status = 200, body = schema::ImagesResponse), (status = 400, description = "A parameter breaks a rule", body = schema::ErrorBody), (status = 408, description = "Past GENERATION_TIMEOUT_SECONDS; `x-should-retry: false`", body = schema::ErrorBody), (status = 413, description = "Body too large", body = schema::ErrorBody), (status = 429, description = "Busy; `Retry-After`", body = schema::ErrorBody), (status = 503, description = "Loading, or out of memory", body = schema::ErrorBody)))]
async fn variations(
    State(app): State<Shared>,
    headers: HeaderMap,
    multipart: Result<Multipart, axum::extract::multipart::MultipartRejection>,
) -> Result<Response, OpenAiError> {
    let form = form::read(multipart, app.max_body_bytes).await?;
    if form.mask.is_some() {
        let rule = "variations take no mask (images/edits repaints a masked area)";
        return Err(ApiError::validation("mask", rule).into());
    }
    let image = form
        .image
        .ok_or_else(|| ApiError::validation("image", "is required (a PNG file)"))?;
    let t = translate::translate(&form.params, &crate::validate::FIELDS)?;
    let format = match form.params.get("response_format") {
        Some(v) if !v.is_null() => t.format,
        _ => ResponseFormat::Url,
    };
    let mut native_body = t.native;
    native_body
        .entry("strength")
        .or_insert(json!(VARIATION_STRENGTH));
    let b64 = base64::engine::general_purpose::STANDARD.encode(&image);
    native_body.insert("init_image".into(), json!(b64));
    let rules = DialectRules {
        prompt: crate::validate::PromptRule::MayBeEmpty,
        ..DialectRules::NATIVE
    };
    run(&app, &headers, native_body, format, rules).await
}

fn model_object(id: &str) -> Value {
    json!({"id": id, "object": "model", "created": 0, "owned_by": "sdserve"})
}

/// The ids `model` may give: the default model's version, then MODELS_DIR's models by name.
async fn model_ids(app: &AppState) -> Result<Vec<String>, OpenAiError> {
    let info = app.engine.model_info()?;
    let catalog = app.models.clone();
    let mut ids = vec![info.model_version];
    let names = crate::api::off_the_runtime(move || {
        Ok::<_, ApiError>(
            catalog
                .scan()
                .into_iter()
                .filter(|e| !catalog.is_default(e))
                .map(|e| e.name)
                .collect::<Vec<_>>(),
        )
    })
    .await?;
    ids.extend(names);
    Ok(ids)
}

/// The default model (by its version), then MODELS_DIR's models (by name); `model` takes
/// these ids (OpenAI's own, `dall-e-*` and `gpt-image-*`, run the default model).
#[utoipa::path(get, path = "/v1/models", tag = "openai", responses((status = 200, description = "`{object: list, data: [{id, object: model, created, owned_by}]}`: the default model, then MODELS_DIR's")))]
async fn models(State(app): State<Shared>) -> Result<Json<Value>, OpenAiError> {
    let ids = model_ids(&app).await?;
    Ok(Json(json!({
        "object": "list",
        "data": ids.iter().map(|id| model_object(id)).collect::<Vec<_>>(),
    })))
}

/// One model of `GET /v1/models`.
#[utoipa::path(get, path = "/v1/models/{id}", tag = "openai", params(("id" = String, Path)), responses((status = 200, description = "`{id, object: model, created, owned_by}`"), (status = 404, body = schema::ErrorBody)))]
async fn model(
    State(app): State<Shared>,
    Path(id): Path<String>,
) -> Result<Json<Value>, OpenAiError> {
    if !model_ids(&app).await?.contains(&id) {
        return Err(OpenAiError(ApiError::NotFound(format!(
            "no model {id:?} (GET /v1/models lists them)"
        ))));
    }
    Ok(Json(model_object(&id)))
}
