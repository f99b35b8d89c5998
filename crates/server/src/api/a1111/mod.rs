//! AUTOMATIC1111's `/sdapi/v1` (README "Clients that already exist"): what `webuiapi`, Krita and chat-bot
//! plugins send and parse. Each request is translated (`translate`) into the one native request
//! and run like `/generate`; the answers take A1111's shapes (`info` is a JSON *string*).
//!
//! `n_iter` batches run one after another, as in A1111, each as one job; `progress`,
//! `interrupt` and `skip` act on the A1111 requests in flight (never on other dialects' work):
//! each request knows the id of the job it runs, so `progress` reports that job's step, ETA and
//! preview, and `interrupt`/`skip` cancel exactly that job (stopped within one step, as
//! `DELETE /jobs/{id}`). An interrupted request answers 200 with the images finished before
//! the interrupt, as A1111 does.

mod checkpoints;
pub mod cmd_flags;
mod controlnet;
mod controlnet_detect;
mod controlnet_fit;
mod controlnet_img2img;
pub(crate) mod controlnet_infotext;
mod controlnet_input;
mod controlnet_ip_adapter;
mod controlnet_lama;
mod controlnet_modules;
pub mod extras;
mod img2img_resize;
pub mod info;
mod listings;
mod progress;
mod sampler_params;
pub(crate) mod samplers;
pub mod schema;
pub mod translate;
mod translate_hires;
mod vaes;

/// The field an A1111 ControlNet unit's errors name (`alwayson_scripts.controlnet.args`).
pub use controlnet::FIELD as CONTROLNET_FIELD;

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use serde_json::{json, Map, Value};
use tokio::sync::Notify;

use super::{body_object, native, random_seed, required_body_object, AppState, Shared};
use crate::error::ApiError;
use crate::generator::ModelInfo;
use translate::{Mode, SAMPLERS, SCHEDULES};

/// Bytes of options (as JSON) `POST options` may keep in all.
pub const OPTIONS_MAX_BYTES: usize = 64 << 10;

/// The dialect's own state: the options clients set, and its requests in flight.
#[derive(Default)]
pub struct Dialect {
    /// What `POST options` stored (A1111 keeps settings server-wide).
    options: Mutex<Map<String, Value>>,
    active: Mutex<Vec<Arc<Active>>>,
    /// How the process was started, for `cmd-flags`.
    flags: cmd_flags::ServerFlags,
    /// Where Extras requests take turns.
    extras: extras::Slots,
}

impl Dialect {
    pub fn new(flags: cmd_flags::ServerFlags) -> Self {
        Self {
            flags,
            ..Default::default()
        }
    }
}

/// One A1111 request in flight.
struct Active {
    n_iter: u32,
    /// The batch running now (0-based).
    job_no: AtomicU32,
    /// The id of that batch's job, once it is queued.
    job: Mutex<Option<String>>,
    started: Instant,
    interrupted: AtomicBool,
    skipped: AtomicBool,
    /// Wakes the request when it is interrupted or skipped.
    stop: Notify,
}

/// Removes a finished request from the list, however its handler ends.
struct ActiveGuard<'a> {
    dialect: &'a Dialect,
    active: Arc<Active>,
}

impl Drop for ActiveGuard<'_> {
    fn drop(&mut self) {
        lock(&self.dialect.active).retain(|a| !Arc::ptr_eq(a, &self.active));
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// `json_limit`: the body limit of the routes that take no image.
pub fn router(json_limit: usize) -> Router<Shared> {
    Router::new()
        .route("/sdapi/v1/txt2img", post(txt2img))
        .route("/sdapi/v1/img2img", post(img2img))
        .route("/sdapi/v1/progress", get(progress::progress))
        .route("/sdapi/v1/interrupt", post(progress::interrupt))
        .route("/sdapi/v1/skip", post(progress::skip))
        .route("/sdapi/v1/samplers", get(samplers))
        .route("/sdapi/v1/schedulers", get(schedulers))
        .route("/sdapi/v1/sd-models", get(sd_models))
        .route(
            "/sdapi/v1/options",
            get(get_options)
                .post(set_options)
                .layer(DefaultBodyLimit::max(json_limit)),
        )
        .route("/sdapi/v1/loras", get(listings::loras))
        .route("/sdapi/v1/refresh-loras", post(listings::refresh_loras))
        .route("/sdapi/v1/embeddings", get(listings::embeddings))
        .route(
            "/sdapi/v1/refresh-embeddings",
            post(listings::refresh_embeddings),
        )
        .route("/sdapi/v1/png-info", post(png_info))
        .route("/controlnet/version", get(controlnet::version))
        .route("/controlnet/model_list", get(controlnet::model_list))
        .route(
            "/controlnet/module_list",
            get(controlnet_modules::module_list),
        )
        .route("/controlnet/detect", post(controlnet_detect::detect))
        .route("/sdapi/v1/cmd-flags", get(cmd_flags::cmd_flags))
        .route(
            "/sdapi/v1/extra-single-image",
            post(extras::extra_single_image),
        )
        .route(
            "/sdapi/v1/extra-batch-images",
            post(extras::extra_batch_images),
        )
        .route("/sdapi/v1/memory", get(listings::memory))
        .route("/sdapi/v1/hypernetworks", get(listings::hypernetworks))
        .route("/sdapi/v1/face-restorers", get(listings::face_restorers))
        .route(
            "/sdapi/v1/realesrgan-models",
            get(listings::realesrgan_models),
        )
        .route("/sdapi/v1/scripts", get(listings::scripts))
        .route("/sdapi/v1/script-info", get(listings::script_info))
        .route("/sdapi/v1/extensions", get(listings::extensions))
        .route("/sdapi/v1/upscalers", get(listings::upscalers))
        .route(
            "/sdapi/v1/latent-upscale-modes",
            get(listings::latent_upscale_modes),
        )
        .route("/sdapi/v1/sd-vae", get(listings::sd_vae))
        .route("/sdapi/v1/prompt-styles", get(listings::prompt_styles))
        .route(
            "/sdapi/v1/refresh-checkpoints",
            post(listings::refresh_checkpoints),
        )
        .route("/sdapi/v1/refresh-vae", post(listings::refresh_vae))
        .route("/sdapi/v1/unload-checkpoint", post(checkpoints::unload))
        .route("/sdapi/v1/reload-checkpoint", post(checkpoints::reload))
}

/// Whether a path is this dialect's: A1111's `/sdapi/v1` and the sd-webui-controlnet
/// extension's `/controlnet/*` (the route tests tell the dialects' paths apart with it).
#[cfg(test)]
pub fn is_dialect_path(path: &str) -> bool {
    path.starts_with("/sdapi/") || path.starts_with("/controlnet/")
}

/// A1111's names for the default model: title, short hash.
fn model_names(info: &ModelInfo) -> (String, String) {
    checkpoints::version_names(&info.model_version)
}

fn job_timestamp() -> String {
    // A1111's `%Y%m%d%H%M%S`, in UTC.
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}{m:02}{d:02}{:02}{:02}{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[utoipa::path(post, path = "/sdapi/v1/txt2img", tag = "a1111", request_body = schema::A1111Request,
    responses((status = 200, body = schema::A1111Response), (status = 400, description = "`invalid_json`: not a JSON object", body = crate::error::ErrorBody), (status = 422, description = "A field breaks a native rule (named as sent), or an unknown sampler (the names listed)", body = crate::error::ErrorBody), (status = 408, description = "`timeout`", body = crate::error::ErrorBody), (status = 413, description = "`payload_too_large`", body = crate::error::ErrorBody), (status = 429, description = "`overloaded`", body = crate::error::ErrorBody), (status = 503, description = "`model_unavailable` or `out_of_memory`", body = crate::error::ErrorBody)))]
async fn txt2img(State(app): State<Shared>, body: Result<Bytes, BytesRejection>) -> Response {
    generate(&app, body, Mode::Txt2Img)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

#[utoipa::path(post, path = "/sdapi/v1/img2img", tag = "a1111", request_body = schema::A1111Request,
    responses((status = 200, body = schema::A1111Response), (status = 400, description = "`invalid_json`: not a JSON object", body = crate::error::ErrorBody), (status = 422, body = crate::error::ErrorBody), (status = 408, description = "`timeout`", body = crate::error::ErrorBody), (status = 413, description = "`payload_too_large`", body = crate::error::ErrorBody), (status = 429, description = "`overloaded`", body = crate::error::ErrorBody), (status = 503, description = "`model_unavailable` or `out_of_memory`", body = crate::error::ErrorBody)))]
async fn img2img(State(app): State<Shared>, body: Result<Bytes, BytesRejection>) -> Response {
    generate(&app, body, Mode::Img2Img)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn generate(
    app: &AppState,
    body: Result<Bytes, BytesRejection>,
    mode: Mode,
) -> Result<Response, ApiError> {
    let mut body = required_body_object(app.max_body_bytes, body)?;
    let info = app.engine.model_info()?;
    let options = lock(&app.a1111.options).clone();
    // Off the runtime's threads: validation decodes init_images and mask.
    let styles = app.styles.clone();
    let (t, body) = crate::api::off_the_runtime(move || {
        // Styles first, as A1111's setup_prompts: their texts are prompt text like any other.
        let written = crate::styles::AsWritten::read(&body);
        let styled = styles.apply(&mut body, crate::styles::Dialect::A1111);
        let t = translate::translate(&body, mode, &options, random_seed);
        let (mut t, as_written) = crate::styles::with_styles(styled, written, t)?;
        t.valid.as_written = as_written;
        Ok((t, body))
    })
    .await?;
    if !t.ignored.is_empty() {
        tracing::debug!(fields = ?t.ignored, "A1111 fields with no equivalent here, ignored");
    }
    // Ip-adapter units: a module and model of different kinds is the unit's error. (The
    // infotext names the model as the unit sent it, ` [hash]` or not, as the extension's
    // `parse_remote_call` leaves `unit.model` before `write_infotext`.)
    let (controlnets, adapters) = (app.controlnets.clone(), app.ip_adapters.clone());
    let t = crate::api::off_the_runtime(move || {
        controlnet_ip_adapter::check_kinds(&controlnets, &adapters, &t.valid, &t.controlnet_args)?;
        Ok(t)
    })
    .await?;
    let checkpoint = checkpoints::requested(app, &info, &body).await?;
    let vae = vaes::requested(app, &body).await?;
    // The VAE's name and hash for `info` (the worker checks that it fits the model).
    let vae_used = {
        let mut probe = t.valid.clone();
        probe.vae.clone_from(&vae);
        // `Automatic` finds the VAE near the checkpoint the request runs on.
        probe.model.clone_from(&checkpoint);
        // The model's limits are checked where it runs (`run_on_model`), once it is resolved.
        crate::api::resolve::named_vae(app, &probe, "override_settings.sd_vae", None).await?
    };
    // The infotexts name the model that made the images.
    let mut used_version = info.model_version.clone();

    let active = Arc::new(Active {
        n_iter: t.n_iter,
        job_no: AtomicU32::new(0),
        job: Mutex::new(None),
        started: Instant::now(),
        interrupted: AtomicBool::new(false),
        skipped: AtomicBool::new(false),
        stop: Notify::new(),
    });
    lock(&app.a1111.active).push(active.clone());
    let _guard = ActiveGuard {
        dialect: &app.a1111,
        active: active.clone(),
    };

    let mut images = Vec::new();
    let mut infos = Vec::new();
    for k in 0..t.n_iter {
        if active.interrupted.load(Ordering::SeqCst) {
            break;
        }
        // The old job goes first: `progress` never pairs the new batch with the old job.
        *lock(&active.job) = None;
        active.job_no.store(k, Ordering::SeqCst);
        active.skipped.store(false, Ordering::SeqCst);
        let mut req = t.valid.clone();
        // With a variation, A1111 keeps the seed for every image and counts the variation
        // seed up instead (`all_seeds`, `all_subseeds`).
        if req.variation_strength > 0.0 {
            req.variation_seed = req
                .variation_seed
                .map(|v| info::batch_seed(v, k, t.batch_size));
        } else {
            req.seed = Some(info::batch_seed(t.seed, k, t.batch_size));
        }
        req.model.clone_from(&checkpoint);
        req.vae.clone_from(&vae);
        // The extension's `before_process_batch` wraps only the first batch's RNG with an
        // `inpaint_only+lama` unit's latents, then clears its `noise_modifier` (without such
        // a unit the request stays the native one: the flag is left as validation set it).
        let lama = sdserve_pipeline::controlnet::preprocess::Preprocessor::InpaintOnlyLama;
        if req.controlnets.iter().any(|c| c.preprocessor == Some(lama)) {
            req.lama_noise = k == 0;
        }
        // Interrupt and skip cancel the job by its id; dropping the run cancels it too.
        let known = active.clone();
        let field = "override_settings.sd_model_checkpoint";
        let run = native::run_on_model(app, req, field, move |id| {
            *lock(&known.job) = Some(id.to_string());
        });
        let out = tokio::select! {
            out = run => out,
            _ = active.stop.notified() => continue,
        };
        let out = match out {
            Ok(out) => out,
            // Its job was cancelled by interrupt or skip: stopped, not failed.
            Err(_) if active.interrupted.load(Ordering::SeqCst) => break,
            Err(_) if active.skipped.load(Ordering::SeqCst) => continue,
            // Rules checked against the model name the fields the client sent.
            Err(e) => return Err(translate::a1111_names(e)),
        };
        if let Some(v) = out.model_version() {
            used_version = v;
        }
        for (b64, seed) in out.images()? {
            let infotext = base64::engine::general_purpose::STANDARD
                .decode(&b64)
                .ok()
                .and_then(|png| crate::png::read_parameters(&png))
                .unwrap_or_default();
            infos.push(info::ImageInfo { seed, infotext });
            images.push(b64);
        }
    }
    let (title, hash) = checkpoints::version_names(&used_version);
    let info_string = info::info_string(
        &t,
        &infos,
        &title,
        &hash,
        vae_used.as_ref(),
        &job_timestamp(),
    );
    Ok(Json(json!({
        "images": images,
        "parameters": t.parameters,
        "info": info_string,
    }))
    .into_response())
}

/// `[{name, aliases, options}]`
#[utoipa::path(get, path = "/sdapi/v1/samplers", tag = "a1111", responses((status = 200, description = "The samplers")))]
async fn samplers() -> Json<Value> {
    Json(Value::Array(
        SAMPLERS
            .iter()
            .map(|s| {
                let options = match s.automatic {
                    sdserve_pipeline::schedulers::SigmaSchedule::Uniform => json!({}),
                    other => json!({"scheduler": other.name()}),
                };
                json!({"name": s.name, "aliases": s.aliases, "options": options})
            })
            .collect(),
    ))
}

/// `[{name, label, aliases, default_rho, need_inner_model}]`: automatic, uniform, karras,
/// exponential, beta (A1111's values for each).
#[utoipa::path(get, path = "/sdapi/v1/schedulers", tag = "a1111", responses((status = 200, description = "The schedules")))]
async fn schedulers() -> Json<Value> {
    Json(Value::Array(
        SCHEDULES
            .iter()
            .map(|(name, label)| {
                json!({
                    "name": name,
                    "label": label,
                    "aliases": null,
                    "default_rho": if *name == "karras" { 7.0 } else { -1.0 },
                    "need_inner_model": matches!(*name, "uniform" | "beta"),
                })
            })
            .collect(),
    ))
}

/// `[{title, model_name, hash, sha256, filename, config}]`: the default model (titled by its
/// version), then every model of MODELS_DIR (titled `name [hash]` once hashed, else `name`;
/// `sha256` null until then, as A1111 lists checkpoints it has not hashed; `filename` the
/// file or folder name).
#[utoipa::path(get, path = "/sdapi/v1/sd-models", tag = "a1111", responses((status = 200, description = "The default model, then MODELS_DIR's")))]
async fn sd_models(State(app): State<Shared>) -> Result<Json<Value>, ApiError> {
    let info = app.engine.model_info()?;
    let all = checkpoints::all(&app, &info).await?;
    Ok(Json(Value::Array(
        all.iter().map(checkpoints::Checkpoint::listing).collect(),
    )))
}

/// GET: `sd_model_checkpoint`, `sd_checkpoint_hash`, `CLIP_stop_at_last_layers`, `sd_vae` and
/// whatever was posted. POST: stores options (server-wide, as in A1111; `CLIP_stop_at_last_layers`
/// becomes the default clip skip of later A1111 requests, `sd_vae` their VAE); a
/// `sd_model_checkpoint` or `sd_vae` that is not here is a 422. Answers `{}`.
#[utoipa::path(get, path = "/sdapi/v1/options", tag = "a1111", responses((status = 200, description = "The options")))]
async fn get_options(State(app): State<Shared>) -> Result<Json<Value>, ApiError> {
    let info = app.engine.model_info()?;
    let (title, hash) = model_names(&info);
    let mut out = Map::new();
    out.insert("sd_model_checkpoint".into(), json!(title));
    out.insert("sd_checkpoint_hash".into(), json!(hash));
    out.insert("CLIP_stop_at_last_layers".into(), json!(1));
    out.insert("img2img_fix_steps".into(), json!(false));
    // The sampler parameters' defaults (shared_options.py).
    for (name, default) in [
        ("s_churn", json!(0.0)),
        ("s_tmin", json!(0.0)),
        ("s_tmax", json!(0.0)),
        ("s_noise", json!(1.0)),
        ("s_min_uncond", json!(0.0)),
        ("s_min_uncond_all", json!(false)),
        ("skip_early_cond", json!(0.0)),
        // Face restoration's (CodeFormer, the one restorer here).
        ("face_restoration", json!(false)),
        (
            "face_restoration_model",
            json!(sdserve_pipeline::face_restore::restorer::NAME),
        ),
        (
            "code_former_weight",
            json!(sdserve_pipeline::face_restore::restorer::WEIGHT_DEFAULT),
        ),
    ] {
        out.insert(name.into(), default);
    }
    out.insert("sd_vae".into(), json!(vaes::AUTOMATIC));
    out.extend(lock(&app.a1111.options).clone());
    // A checkpoint set by `POST options`: its hash (null until hashed), as A1111 says it.
    if let Some(set) = out.get("sd_model_checkpoint").and_then(Value::as_str) {
        if set != title {
            let all = checkpoints::all(&app, &info).await?;
            let hash = checkpoints::resolve(&all, set).and_then(|c| c.hash.clone());
            out.insert("sd_checkpoint_hash".into(), json!(hash));
        }
    }
    Ok(Json(Value::Object(out)))
}

#[utoipa::path(post, path = "/sdapi/v1/options", tag = "a1111", responses((status = 200, description = "`{}`"), (status = 400, description = "`invalid_json`", body = crate::error::ErrorBody), (status = 422, body = crate::error::ErrorBody)))]
async fn set_options(
    State(app): State<Shared>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let body = body_object(app.json_body_bytes(), body)?;
    let info = app.engine.model_info()?;
    // The checkpoint later A1111 requests run on (by title), `None` for the default model.
    let mut checkpoint = None;
    if let Some(v) = body.get("sd_model_checkpoint") {
        let all = checkpoints::all(&app, &info).await?;
        let found = v.as_str().and_then(|s| checkpoints::resolve(&all, s));
        let Some(c) = found else {
            return Err(ApiError::validation(
                "sd_model_checkpoint",
                format!("no checkpoint {v} here (GET /sdapi/v1/sd-models lists them)"),
            ));
        };
        checkpoint = Some(c.target.as_ref().map(|_| c.title.clone()));
    }
    if let Some(v) = body.get("sd_vae") {
        vaes::check_option(&app, v).await?;
    }
    // Checked now, by the native rules, rather than at the next txt2img.
    let probe = json!({"prompt": "x"});
    for name in [
        "CLIP_stop_at_last_layers",
        "img2img_fix_steps",
        "s_churn",
        "s_tmin",
        "s_tmax",
        "s_noise",
        "s_min_uncond",
        "s_min_uncond_all",
        "skip_early_cond",
        "face_restoration",
        "face_restoration_model",
        "code_former_weight",
    ] {
        if let Some(v) = body.get(name) {
            let mut option = Map::from_iter([(name.to_string(), v.clone())]);
            // The face restorer's settings are read only where it runs.
            if name.starts_with("face_restoration_") || name == "code_former_weight" {
                option.insert("face_restoration".into(), json!(true));
            }
            translate::translate(probe.as_object().unwrap(), Mode::Txt2Img, &option, || 0)
                .map_err(|e| {
                    super::rename_fields(e, &[(&format!("override_settings.{name}"), name)])
                })?;
        }
    }
    let mut options = lock(&app.a1111.options);
    let mut merged = options.clone();
    for (k, v) in body {
        if k != "sd_model_checkpoint" {
            merged.insert(k, v);
        }
    }
    match checkpoint {
        Some(Some(title)) => {
            merged.insert("sd_model_checkpoint".into(), json!(title));
        }
        Some(None) => {
            merged.remove("sd_model_checkpoint");
        }
        None => {}
    }
    // Options are kept for the server's life: bounded, so clients cannot grow its memory.
    if serde_json::to_vec(&merged).map_or(usize::MAX, |v| v.len()) > OPTIONS_MAX_BYTES {
        return Err(ApiError::validation(
            "options",
            format!("at most {OPTIONS_MAX_BYTES} bytes of options (as JSON) are kept"),
        ));
    }
    *options = merged;
    Ok(Json(json!({})))
}

/// A1111's `png-info`: the `parameters` text of a PNG, the other text chunks, and the
/// parameters parsed. An image without parameters answers `info: ""`.
#[utoipa::path(post, path = "/sdapi/v1/png-info", tag = "a1111", responses((status = 200, description = "The parameters"), (status = 400, description = "`invalid_json`", body = crate::error::ErrorBody), (status = 422, body = crate::error::ErrorBody)))]
async fn png_info(
    State(app): State<Shared>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let body = body_object(app.max_body_bytes, body)?;
    let b64 = body
        .get("image")
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::validation("image", "is required: a base64 image"))?;
    let b64 = match b64.split_once(";base64,") {
        Some((prefix, rest)) if prefix.starts_with("data:") => rest,
        _ => b64,
    };
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .map_err(|e| ApiError::validation("image", format!("not base64: {e}")))?;
    let mut items = crate::png::read_text_chunks(&bytes);
    let info = items
        .remove("parameters")
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default();
    let parameters = if info.is_empty() {
        Map::new()
    } else {
        info::parse_infotext(&info)
    };
    Ok(Json(json!({
        "info": info,
        "items": items,
        "parameters": parameters,
    })))
}
