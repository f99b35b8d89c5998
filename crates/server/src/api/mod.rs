//! HTTP: the router, the request/response types (which also make the OpenAPI document), and the
//! middleware that gives every request an id, a log line, metrics and a contract-shaped error body.
//! One module per dialect translates to and from the one internal request (docs/ARCHITECTURE.md).

pub mod a1111;
mod cache_key;
mod controlnet_schema;
mod declared_types;
mod health_schema;
mod hires_schema;
mod inpaint_schema;
mod ip_adapter_schema;
mod jobs;
mod models;
mod native;
mod observe;
#[cfg(test)]
mod off_runtime_tests;
pub mod openai;
pub(crate) mod request;
pub(crate) mod resolve;
mod response_schema;
mod schema;
pub(crate) mod styles;
pub mod web;

use std::sync::Arc;
use std::time::Instant;

use axum::extract::DefaultBodyLimit;
use axum::middleware;
use axum::routing::{get, post, MethodRouter};
use axum::Router;
use utoipa::OpenApi;

use crate::cache::ResponseCache;
use crate::engine::job::{JobLinks, JobProgress};
use crate::engine::{Engine, JobStatus, JobView};
use crate::error::{ApiError, ErrorBody, FieldError};
use crate::metrics::Metrics;
use crate::security::OpenApiSecurity;

pub use controlnet_schema::*;
pub use health_schema::*;
pub use hires_schema::*;
pub use inpaint_schema::*;
pub use ip_adapter_schema::*;
pub use observe::dialect_error;
use observe::{observe, RequestStats};
pub use request::random_seed;
use request::{body_object, query_bool, rename_fields, required_body_object};
pub(crate) use request::{job_spec, off_the_runtime, prompt_syntax_name, read_generate_body};
pub use response_schema::*;
pub use schema::*;

pub struct AppState {
    pub engine: Engine,
    pub cache: Option<ResponseCache>,
    pub metrics: Arc<Metrics>,
    pub device: String,
    /// For GPU name and memory in /health.
    pub candle_device: candle_core::Device,
    pub dtype: String,
    pub started: Instant,
    pub max_body_bytes: usize,
    /// Download/conversion progress while the model loads.
    pub load_status: crate::hub::LoadStatus,
    /// AUTOMATIC1111's options and requests in flight.
    pub a1111: a1111::Dialect,
    /// Images the OpenAI dialect answered as URLs.
    pub openai_files: openai::Files,
    /// Keys, rate limits, CORS and the body deadline, applied around every route.
    pub security: Arc<crate::security::Security>,
    /// LORA_DIR and EMBEDDINGS_DIR as this process sees them: a request looks at them before
    /// it is checked and cached (`resolve::adapters_info`).
    pub adapter_dirs: crate::adapters::AdapterDirs,
    /// MODELS_DIR and the default model (`--model`): the models a request may name.
    pub models: crate::models::Catalog,
    /// VAE_DIR: the VAEs a request may decode with.
    pub vaes: crate::vaes::VaeCatalog,
    /// UPSCALERS_DIR: the ESRGAN models Extras may upscale with.
    pub upscalers: crate::upscalers::UpscalerCatalog,
    /// CONTROLNET_DIR: the ControlNets a request may name (`controlnets`).
    pub controlnets: crate::controlnets::ControlNetCatalog,
    /// IP_ADAPTER_DIR: the IP-Adapters a request may name (`ip_adapters`).
    pub ip_adapters: crate::ip_adapters::IpAdapterCatalog,
    /// STYLES_FILE: the prompt styles requests may name (`styles`).
    pub styles: crate::styles::StyleBook,
    /// FACE_RESTORE_DIR: the networks `restore_faces` and Extras' CodeFormer run.
    pub face_restore: crate::face_restorers::FaceRestoreCatalog,
}

type Shared = Arc<AppState>;

/// The body limit of routes that take no image (OpenAI `images/generations`, A1111 `options`):
/// JSON of a few fields needs far less than `MAX_BODY_BYTES`, which is sized for images.
pub const JSON_BODY_BYTES: usize = 1 << 20;

impl AppState {
    /// The body limit of routes that take no image (never above `MAX_BODY_BYTES`).
    pub fn json_body_bytes(&self) -> usize {
        JSON_BODY_BYTES.min(self.max_body_bytes)
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "sdserve",
        description = "Stable Diffusion 1.5 text-to-image over HTTP. Every error has the body `{error, details, error_code}`."
    ),
    paths(
        native::generate,
        native::health,
        native::loras,
        native::embeddings,
        native::refresh_adapters,
        models::list,
        models::vaes,
        models::upscalers,
        models::controlnets,
        models::ip_adapters,
        styles::list,
        native::metrics,
        native::openapi_json,
        native::docs,
        jobs::create,
        jobs::list,
        jobs::get_one,
        jobs::cancel,
        jobs::events
    ),
    components(schemas(
        JobView,
        JobStatus,
        JobProgress,
        JobLinks,
        jobs::JobCreated,
        jobs::JobList,
        jobs::SseEvent,
        jobs::SseEventName,
        GenerateRequest,
        GenerateResponse,
        GenerateMetadata,
        HiresRequest,
        HiresMetadata,
        RestoreFaces,
        SchedulerName,
        SigmaScheduleName,
        PromptSyntaxName,
        StepRuleName,
        GuidanceRuleName,
        ResizeModeName,
        LoraUse,
        native::LoraList,
        crate::adapters::LoraListing,
        crate::adapters::EmbeddingListing,
        ErrorBody,
        FieldError,
        HealthResponse,
        HealthStatus,
        QueueInfo,
        crate::engine::WorkerHealth,
        crate::models::LoadedModelHealth,
        crate::models::ModelList,
        crate::models::ModelListing,
        crate::models::ModelKind,
        crate::vaes::VaeList,
        crate::vaes::VaeListing,
        crate::vaes::VaeKind,
        crate::upscalers::UpscalerList,
        crate::upscalers::UpscalerListing,
        crate::controlnets::ControlNetList,
        crate::controlnets::ControlNetListing,
        crate::ip_adapters::IpAdapterList,
        crate::ip_adapters::IpAdapterListing,
        IpAdapterUse,
        IpAdapterMetadata,
        A1111IpUnitMetadata,
        ControlNetUse,
        ControlNetPreprocessor,
        PreprocessorType,
        ControlNetMetadata,
        styles::StyleList,
        crate::styles::Style,
        GpuInfo
    ))
)]
pub struct ApiDoc;

/// Every route: path, its methods, handlers. The router is built from this table and a test
/// holds it equal to the OpenAPI document (each dialect adds its rows here).
fn routes_table() -> Vec<(&'static str, &'static [&'static str], MethodRouter<Shared>)> {
    vec![
        ("/generate", &["post"], post(native::generate)),
        ("/health", &["get"], get(native::health)),
        ("/loras", &["get"], get(native::loras)),
        ("/models", &["get"], get(models::list)),
        ("/vaes", &["get"], get(models::vaes)),
        ("/upscalers", &["get"], get(models::upscalers)),
        ("/controlnets", &["get"], get(models::controlnets)),
        ("/ip-adapters", &["get"], get(models::ip_adapters)),
        ("/styles", &["get"], get(styles::list)),
        ("/embeddings", &["get"], get(native::embeddings)),
        (
            "/adapters/refresh",
            &["post"],
            post(native::refresh_adapters),
        ),
        ("/metrics", &["get"], get(native::metrics)),
        ("/openapi.json", &["get"], get(native::openapi_json)),
        ("/docs", &["get"], get(native::docs)),
        (
            "/jobs",
            &["get", "post"],
            post(jobs::create).get(jobs::list),
        ),
        (
            "/jobs/{id}",
            &["delete", "get"],
            get(jobs::get_one).delete(jobs::cancel),
        ),
        ("/jobs/{id}/events", &["get"], get(jobs::events)),
    ]
}

/// Every route, then the layers that cover all of them (add routes to `routes()` or the
/// dialects' routers, never after `protect`: a route added outside would skip keys and rate
/// limits).
pub fn router(state: Shared) -> Router {
    let limit = state.max_body_bytes;
    let mut routes = Router::new();
    for (path, _, handlers) in routes_table() {
        routes = routes.route(path, handlers);
    }
    let routes = routes
        .merge(a1111::router(state.json_body_bytes()))
        .merge(openai::router(state.json_body_bytes()))
        .merge(web::routes())
        .fallback(|| async { ApiError::NotFound("no such route; see /docs".into()) })
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state.clone());
    crate::security::protect(routes, state.security.clone())
        .layer(middleware::from_fn_with_state(state, observe))
}

/// A worker's routes (`--role worker` with QUEUE_URL): /health and /metrics, with the same
/// keys and limits as the whole API.
pub fn worker_router(state: Shared) -> Router {
    let routes = Router::new()
        .route("/health", axum::routing::get(native::health))
        .route("/metrics", axum::routing::get(native::metrics))
        .fallback(|| async {
            ApiError::NotFound("no such route: a worker answers /health and /metrics only".into())
        })
        .with_state(state.clone());
    crate::security::protect(routes, state.security.clone())
        .layer(middleware::from_fn_with_state(state, observe))
}

pub fn openapi_string() -> String {
    let mut doc = ApiDoc::openapi();
    doc.merge(a1111::schema::ApiDoc::openapi());
    doc.merge(openai::schema::ApiDoc::openapi());
    // After the merge, so every dialect's operations get the key requirement too.
    utoipa::Modify::modify(&OpenApiSecurity, &mut doc);
    let mut s = doc.to_pretty_json().expect("OpenAPI serialises");
    s.push('\n');
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The committed `crates/server/openapi.json` must match the code; run with
    /// `UPDATE_OPENAPI=1` to rewrite it.
    #[test]
    fn committed_openapi_matches_code() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("openapi.json");
        let now = openapi_string();
        if std::env::var_os("UPDATE_OPENAPI").is_some() {
            std::fs::write(&path, &now).unwrap();
        }
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            committed == now,
            "crates/server/openapi.json is stale; rerun this test with UPDATE_OPENAPI=1"
        );
    }

    /// The document lists exactly the router's native and jobs routes and methods (the
    /// methods' handlers are probed over HTTP in tests/integration/http_fake.rs).
    #[test]
    fn openapi_covers_every_route() {
        let doc: serde_json::Value = serde_json::from_str(&openapi_string()).unwrap();
        // The dialects' routes have their own test (api::a1111, api::openai).
        let documented: std::collections::BTreeMap<String, Vec<String>> = doc["paths"]
            .as_object()
            .unwrap()
            .iter()
            .filter(|(path, _)| !super::a1111::is_dialect_path(path) && !path.starts_with("/v1/"))
            .map(|(path, ops)| {
                let mut methods: Vec<String> = ops.as_object().unwrap().keys().cloned().collect();
                methods.sort();
                (path.clone(), methods)
            })
            .collect();
        let routed: std::collections::BTreeMap<String, Vec<String>> = routes_table()
            .into_iter()
            .map(|(path, methods, _)| {
                let mut m: Vec<String> = methods.iter().map(|m| m.to_string()).collect();
                m.sort();
                (path.to_string(), m)
            })
            .collect();
        assert_eq!(documented, routed);
    }

    /// A result recorded before `image_width`/`image_height` existed (a job record or event in
    /// Redis) still reads, and is answered without them rather than with a wrong size.
    #[test]
    fn metadata_recorded_without_the_image_size_still_reads() {
        let old = serde_json::json!({"prompt": "p", "negative_prompt": "", "steps": 2,
            "width": 256, "height": 256, "seed": 1, "guidance_scale": 7.5, "scheduler": "pndm",
            "prompt_syntax": "a1111", "clip_skip": 1, "loras": [], "generation_time_seconds": 1.0,
            "model_version": "m", "seeds": [1], "batch_size": 1, "strength": null,
            "mode": "txt2img"});
        let m: GenerateMetadata = serde_json::from_value(old).unwrap();
        assert_eq!((m.image_width, m.image_height), (None, None));
        let again = serde_json::to_value(&m).unwrap();
        assert!(again.get("image_width").is_none(), "{again}");
    }

    /// Every native field OpenAI has no parameter of its own for is an extra of
    /// `images/generations` (they pass through at run time): the schema lists them all.
    #[test]
    fn openai_generations_document_every_native_extra() {
        let doc: serde_json::Value = serde_json::from_str(&openapi_string()).unwrap();
        let props = doc["components"]["schemas"]["openai.ImageGenerationRequest"]["properties"]
            .as_object()
            .unwrap();
        let missing: Vec<&str> = crate::validate::FIELDS
            .iter()
            .copied()
            // `strength`, `resize_mode` and `noise_multiplier` need an image, which generations
            // have none of;
            // `inpaint` needs a mask, and edits keep diffusers' inpainting (README).
            .filter(|f| {
                !openai::translate::MAPPED.contains(f)
                    && !["strength", "resize_mode", "noise_multiplier", "inpaint"].contains(f)
            })
            .filter(|f| !props.contains_key(*f))
            .collect();
        assert!(missing.is_empty(), "undocumented extras: {missing:?}");
    }

    #[test]
    fn openapi_names_the_contract() {
        let doc: serde_json::Value = serde_json::from_str(&openapi_string()).unwrap();
        let props = &doc["components"]["schemas"]["GenerateRequest"]["properties"];
        assert_eq!(props["steps"]["maximum"], 50);
        assert_eq!(props["width"]["multipleOf"], 64);
        assert!(doc["paths"]["/generate"]["post"]["responses"]["429"].is_object());
        let names: Vec<String> =
            serde_json::from_value(doc["components"]["schemas"]["SchedulerName"]["enum"].clone())
                .unwrap();
        let want: Vec<&str> = sdserve_pipeline::schedulers::SchedulerKind::ALL
            .iter()
            .map(|k| k.name())
            .collect();
        assert_eq!(names, want);
        let names: Vec<String> = serde_json::from_value(
            doc["components"]["schemas"]["SigmaScheduleName"]["enum"].clone(),
        )
        .unwrap();
        let mut want = vec!["default"];
        want.extend(sdserve_pipeline::schedulers::SigmaSchedule::ALL.map(|s| s.name()));
        assert_eq!(names, want);
    }
}
