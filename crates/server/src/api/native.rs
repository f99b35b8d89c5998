//! The native routes: `/generate`, `/health`, `/metrics`, `/openapi.json`, `/docs`.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{Html, IntoResponse, Response};

use super::cache_key::cache_key;
use super::{
    job_spec, openapi_string, read_generate_body, AppState, GenerateRequest, GenerateResponse,
    GpuInfo, HealthResponse, HealthStatus, QueueInfo, RequestStats, Shared,
};
use crate::cache::{CachedBody, ResponseCache};
use crate::engine::{ModelHold, ModelState};
use crate::error::{ApiError, ErrorBody};

fn json_bytes(body: Bytes, cache: &'static str, stats: RequestStats) -> Response {
    let mut resp = (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response();
    resp.headers_mut()
        .insert("x-cache", HeaderValue::from_static(cache));
    resp.extensions_mut().insert(stats);
    resp
}

/// Generate one image.
#[utoipa::path(
    post,
    path = "/generate",
    tag = "native",
    request_body = GenerateRequest,
    responses(
        (status = 200, description = "The image and its parameters; header `x-cache: hit|miss`", body = GenerateResponse),
        (status = 400, description = "`invalid_json`: not a JSON object, or not application/json", body = ErrorBody),
        (status = 408, description = "`timeout`: queue wait plus generation passed GENERATION_TIMEOUT_SECONDS; the run was stopped", body = ErrorBody),
        (status = 413, description = "`payload_too_large`", body = ErrorBody),
        (status = 422, description = "`validation_error`: `details` names every broken field and its rule, `fields` lists them", body = ErrorBody),
        (status = 429, description = "`overloaded`: MAX_CONCURRENT_REQUESTS already admitted; see `Retry-After`", body = ErrorBody),
        (status = 500, description = "`internal_error`", body = ErrorBody),
        (status = 503, description = "`model_unavailable` (loading, failed, shutting down), `out_of_memory`, or `queue_unavailable` (QUEUE_URL's Redis cannot be reached)", body = ErrorBody),
    )
)]
pub(super) async fn generate(
    State(app): State<Shared>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    generate_inner(&app, &headers, body)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn generate_inner(
    app: &AppState,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let req = read_generate_body(app, headers, body).await?;
    let out = run(app, req).await?;
    Ok(json_bytes(out.body, out.cache, out.stats))
}

/// A finished `/generate`: the 200 body as sent, and figures for the request log.
pub(super) struct Generated {
    pub body: Bytes,
    /// `hit` or `miss`.
    pub cache: &'static str,
    pub stats: RequestStats,
}

impl Generated {
    fn value(&self) -> Result<serde_json::Value, ApiError> {
        serde_json::from_slice(&self.body).map_err(|e| ApiError::Internal(e.to_string()))
    }

    /// `metadata.model_version`: the model that made the images.
    pub fn model_version(&self) -> Option<String> {
        let v = self.value().ok()?;
        v["metadata"]["model_version"].as_str().map(str::to_string)
    }

    /// Every image of the answer (base64 PNGs) with its seed, in order.
    pub fn images(&self) -> Result<Vec<(String, u64)>, ApiError> {
        let v = self.value()?;
        let images: Vec<String> = match v.get("images").and_then(|i| i.as_array()) {
            Some(all) => all
                .iter()
                .filter_map(|i| i.as_str().map(str::to_string))
                .collect(),
            None => vec![v["image_base64"].as_str().unwrap_or_default().to_string()],
        };
        let first = v["metadata"]["seed"].as_u64().unwrap_or_default();
        let seeds = v["metadata"]
            .get("seeds")
            .and_then(|s| s.as_array())
            .map(|s| s.iter().filter_map(|x| x.as_u64()).collect::<Vec<_>>());
        Ok(images
            .into_iter()
            .enumerate()
            .map(|(i, b64)| {
                let seed = seeds
                    .as_ref()
                    .and_then(|s| s.get(i).copied())
                    .unwrap_or(first + i as u64);
                (b64, seed)
            })
            .collect())
    }

    /// The prompt as the model saw it (cleaned).
    pub fn prompt(&self) -> Result<String, ApiError> {
        Ok(self.value()?["metadata"]["prompt"]
            .as_str()
            .unwrap_or_default()
            .to_string())
    }
}

/// The shared cache's key of an entry: `CachedBody::to_wire` bytes (`v2`), apart from the
/// whole bodies older replicas keep under the plain key.
fn shared_key(key: &str) -> String {
    format!("v2\u{0}{key}")
}

/// Runs one validated request, whichever dialect it came in: the response cache, the engine,
/// the `/generate` answer.
pub(super) async fn run(
    app: &AppState,
    req: crate::validate::ValidRequest,
) -> Result<Generated, ApiError> {
    run_watched(app, req, |_| {}).await
}

/// `run`, handing the job's id to `queued` once it is queued (a cache hit runs no job).
pub(super) async fn run_watched(
    app: &AppState,
    req: crate::validate::ValidRequest,
    queued: impl FnOnce(&str) + Send,
) -> Result<Generated, ApiError> {
    run_on_model(app, req, "model", queued).await
}

/// `run_watched`, with `model_field` the field that named the model (for its 422).
pub(super) async fn run_on_model(
    app: &AppState,
    mut req: crate::validate::ValidRequest,
    model_field: &'static str,
    queued: impl FnOnce(&str) + Send,
) -> Result<Generated, ApiError> {
    let info = app
        .engine
        .model_info()
        .map_err(|e| match app.load_status.waiting() {
            Some(w) => ApiError::ModelUnavailable(format!(
                "the model is not available yet: {}",
                w.describe()
            )),
            None => e,
        })?;
    let patience = app.engine.config().timeout;
    let (info, cacheable) = super::resolve::adapters_info(app, info, &req, Some(patience)).await;
    let info = super::resolve::named_model(app, info, &mut req, model_field).await?;
    let vae = super::resolve::named_vae(app, &req, "vae", info.limits).await?;
    let upscaler_file = super::resolve::named_upscaler(app, &req).await?;
    let face_restore_files = super::resolve::face_restorer(app, &req).await?;
    let controlnet_files = super::resolve::named_controlnets(app, &mut req, "controlnets").await?;
    let ip_adapter_files = super::resolve::named_ip_adapters(app, &mut req, "ip_adapters").await?;
    let seeded = req.seed.is_some() && cacheable;
    // The VAE decodes the image: a request with another VAE is another entry.
    let mut cache_model = match &vae {
        Some(v) => format!("{}\u{0}vae {} {}", info.model_version, v.name, v.hash),
        None => info.model_version.clone(),
    };
    // So does a hires upscaler model replaced under its name.
    // And ControlNets and IP-Adapters replaced under their names.
    // And the face restorer's networks replaced.
    let files = upscaler_file
        .into_iter()
        .chain(face_restore_files)
        .chain(controlnet_files);
    for file in files.chain(ip_adapter_files) {
        cache_model = format!("{cache_model}\u{0}{file}");
    }
    let spec = job_spec(
        req,
        vae,
        &info,
        app.engine.config().timeout,
        crate::error::DeadlineSetting::Generation,
    )?;
    let params = spec.params.clone();
    let mut stats = RequestStats {
        steps: Some(params.steps),
        size: Some(format!("{}x{}", params.width, params.height)),
        ..Default::default()
    };
    // Only seeded requests are deterministic, so only they are cached.
    let key = match (&app.cache, seeded) {
        (Some(_), true) => Some(cache_key(&params, &cache_model, &info.adapters.fingerprint)),
        _ => None,
    };
    if let (Some(cache), Some(key)) = (&app.cache, &key) {
        // With QUEUE_URL the replicas share one cache in Redis (under its own key, as older
        // replicas stored whole bodies there).
        let hit = match app.engine.shared_cache_get(&shared_key(key)) {
            Some(shared) => shared.as_deref().and_then(CachedBody::from_wire),
            None => cache.get(key),
        };
        if let Some(hit) = hit {
            app.metrics.cache_hits.inc();
            stats.cache = Some("hit");
            return Ok(Generated {
                body: hit.body(),
                cache: "hit",
                stats,
            });
        }
        app.metrics.cache_misses.inc();
    }
    let out = app.engine.run(spec, queued).await?;
    let resp = out.result?;
    let bytes =
        Bytes::from(serde_json::to_vec(&*resp).map_err(|e| ApiError::Internal(e.to_string()))?);
    if let (Some(cache), Some(key)) = (&app.cache, key) {
        let held = CachedBody::of(&bytes);
        if !app
            .engine
            .shared_cache_put(&shared_key(&key), &held.to_wire())
        {
            cache.insert(key, held);
        }
    }
    stats.queue_secs = Some(out.queue_secs);
    stats.gen_secs = Some(out.gen_secs);
    stats.cache = Some("miss");
    Ok(Generated {
        body: bytes,
        cache: "miss",
        stats,
    })
}

/// Readiness and load: 200 when the model is ready, 503 while it loads or after it failed.
#[utoipa::path(
    get,
    path = "/health",
    tag = "native",
    responses(
        (status = 200, description = "Ready (`ok`, or `degraded` while the out-of-memory breaker is open, this process's run is stuck past its deadline, or, with QUEUE_URL, no worker is seen or every worker is `stuck`; `detail` says which)", body = HealthResponse),
        (status = 503, description = "`loading`, or `unavailable` (load failed, waiting to try the hub again, or QUEUE_URL's Redis unreachable; `detail` says why and when)", body = HealthResponse),
    )
)]
pub(super) async fn health(State(app): State<Shared>) -> Response {
    let g = app.engine.gauges();
    let cluster = app.engine.cluster();
    let (status, model_version, detail) = match app.engine.state() {
        // Waiting to try the hub again: not loading, but not given up either.
        ModelState::Loading if app.load_status.waiting().is_some() => {
            (HealthStatus::Unavailable, None, app.load_status.describe())
        }
        ModelState::Loading => (HealthStatus::Loading, None, app.load_status.describe()),
        ModelState::Failed(why) => (HealthStatus::Unavailable, None, Some(why)),
        ModelState::Ready(info) => match app.engine.degraded(cluster.as_ref()) {
            Some(why) => (HealthStatus::Degraded, Some(info.model_version), Some(why)),
            // Unloaded on request, the server still takes jobs: they load the model first.
            None => (
                HealthStatus::Ok,
                Some(info.model_version),
                app.engine.model_hold().map(|hold| match hold {
                    ModelHold::Unloaded => "the model is unloaded (unload-checkpoint): the next job loads it again first (its `loading` event), or reload-checkpoint does now".to_string(),
                    ModelHold::Reloading => "the model is being loaded again (reload-checkpoint)".to_string(),
                }),
            ),
        },
    };
    // Without its queue a replica can take no job, whatever its model does.
    let (status, detail) = match cluster.as_ref().and_then(|c| c.unreachable.clone()) {
        Some(why) => (
            HealthStatus::Unavailable,
            Some(format!("QUEUE_URL's Redis cannot be reached: {why}")),
        ),
        None => (status, detail),
    };
    let code = match status {
        HealthStatus::Ok | HealthStatus::Degraded => StatusCode::OK,
        HealthStatus::Loading | HealthStatus::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
    };
    let device_memory = app.metrics.device_memory();
    let body = HealthResponse {
        status,
        model_version,
        device: app.device.clone(),
        dtype: app.dtype.clone(),
        gpu: crate::gpu::health_gpu(&app.candle_device).map(|g| GpuInfo {
            name: g.name,
            memory_total_mb: g.memory_total_mb,
            memory_used_mb: g.memory_used_mb,
            memory_free_mb: g.memory_free_mb,
            last_request_peak_mb: device_memory.map(|d| d.last.peak_used_bytes >> 20),
            peak_mb: device_memory.map(|d| d.max_peak_used_bytes >> 20),
        }),
        memory_plan: app.engine.memory_plan(),
        queue: QueueInfo {
            running: g.running,
            waiting: g.waiting,
            capacity: g.capacity,
        },
        uptime_seconds: (app.started.elapsed().as_secs_f64() * 10.0).round() / 10.0,
        version: env!("CARGO_PKG_VERSION").to_string(),
        detail,
        loaded_model: super::models::loaded(&app),
        workers: cluster.map(|c| c.workers),
    };
    (code, axum::Json(body)).into_response()
}

/// The body of `GET /loras`.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct LoraList {
    /// The model each `error` was judged against, named as `GET /models` names it: the
    /// default model (`--model`), whichever model the worker holds; a request naming another
    /// in `model` has its LoRAs checked against that one when submitted.
    pub model: String,
    pub loras: Vec<crate::adapters::LoraListing>,
}

/// The LoRA files of `LORA_DIR` (empty when unset or while the model loads).
#[utoipa::path(get, path = "/loras", responses((status = 200, description = "kohya/A1111 and PEFT LoRA and LoCon, and LyCORIS LoHa, LoKr, IA3, GLoRA, OFT/BOFT, norm and full diffs, with DoRA (`types`); `error` says why a file cannot be used (does not fit `model`, the default model; a part not applied such as a LoHa's bias diff; cannot be read)", body = LoraList)))]
pub(super) async fn loras(State(app): State<Shared>) -> axum::Json<LoraList> {
    let loras = super::resolve::listed_adapters(&app).await.loras;
    axum::Json(LoraList {
        model: app.models.default_name(),
        loras,
    })
}

/// Reads LORA_DIR and EMBEDDINGS_DIR again now (A1111's `refresh-loras`); answers both lists.
/// The worker reads them between jobs, so this waits for a running job. Changes are picked up
/// without it too: within a second while idle, and before every job.
#[utoipa::path(post, path = "/adapters/refresh", responses((status = 200, description = "`{model, loras: [...], embeddings: [...]}` as `GET /loras` and `GET /embeddings` list them"), (status = 503, description = "`model_unavailable`: the model is not loaded, or the worker did not get to it within GENERATION_TIMEOUT_SECONDS", body = ErrorBody)))]
pub(super) async fn refresh_adapters(State(app): State<Shared>) -> Result<Response, ApiError> {
    let info = super::resolve::fresh_adapters(&app, true, app.engine.config().timeout).await?;
    Ok(axum::Json(serde_json::json!({
        "model": app.models.default_name(),
        "loras": info.adapters.loras,
        "embeddings": info.adapters.embeddings,
    }))
    .into_response())
}

/// The textual-inversion embeddings of `EMBEDDINGS_DIR` (empty when unset or while loading).
#[utoipa::path(get, path = "/embeddings", responses((status = 200, description = "`{embeddings: [{name, file, format, vectors, shape, step, sd_checkpoint, sd_checkpoint_name, error}]}`; `error` says why prompts cannot use one")))]
pub(super) async fn embeddings(State(app): State<Shared>) -> Response {
    let embeddings = super::resolve::listed_adapters(&app).await.embeddings;
    axum::Json(serde_json::json!({ "embeddings": embeddings })).into_response()
}

/// Prometheus metrics (text exposition format 0.0.4).
#[utoipa::path(get, path = "/metrics", tag = "native", responses((status = 200, description = "Prometheus text", content_type = "text/plain")))]
pub(super) async fn metrics(State(app): State<Shared>) -> Response {
    let mut gauges = app.engine.gauges();
    gauges.cache = app.cache.as_ref().map(ResponseCache::len_and_bytes);
    let text = app.metrics.render(&gauges);
    ([(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], text).into_response()
}

/// This document (OpenAPI 3.1): every route and schema, the dialects' too.
#[utoipa::path(get, path = "/openapi.json", tag = "native", responses((status = 200, description = "The OpenAPI document", content_type = "application/json")))]
pub(super) async fn openapi_json() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        openapi_string(),
    )
        .into_response()
}

/// A self-contained page (no CDN, works offline) that renders /openapi.json and can call /generate.
#[utoipa::path(get, path = "/docs", tag = "native", responses((status = 200, description = "An HTML page", content_type = "text/html")))]
pub(super) async fn docs() -> Html<&'static str> {
    Html(include_str!("docs.html"))
}
