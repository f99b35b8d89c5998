//! The lists A1111 clients fill their menus from: LoRAs and embeddings (from `LORA_DIR` and
//! `EMBEDDINGS_DIR`, read again by `refresh-loras` / `refresh-embeddings`), memory, and the
//! menus of features this server does not have (answered empty, in A1111's shape, so that the
//! clients carry on).

use axum::extract::State;
use axum::Json;
use serde_json::{json, Map, Value};

use crate::api::Shared;
use crate::error::ApiError;

/// `[{name, alias, path, metadata}]`, A1111's `create_lora_json`: every `.safetensors` of
/// LORA_DIR, as A1111 lists every file of its folder, also those that do not fit the model
/// (a request naming one is a 422 saying why; `GET /loras` gives the reason as `error`).
#[utoipa::path(get, path = "/sdapi/v1/loras", tag = "a1111", responses((status = 200, description = "`[{name, alias, path, metadata}]`: `name` is what `<lora:name:weight>` takes, `alias` the trainer's `ss_output_name` (else the name), `metadata` the file's safetensors metadata")))]
pub(super) async fn loras(State(app): State<Shared>) -> Json<Value> {
    let loras = crate::api::resolve::listed_adapters(&app).await.loras;
    Json(Value::Array(loras.iter().map(lora_json).collect()))
}

fn lora_json(l: &crate::adapters::LoraListing) -> Value {
    json!({
        "name": l.name,
        "alias": l.alias,
        "path": l.file,
        "metadata": l.metadata,
    })
}

/// `{loaded: {name: {step, sd_checkpoint, sd_checkpoint_name, shape, vectors}}, skipped: {...}}`:
/// `skipped` holds the embeddings whose vectors do not fit this text encoder (as A1111 sorts
/// them); files that cannot be read are left out, as A1111 leaves them out.
#[utoipa::path(get, path = "/sdapi/v1/embeddings", tag = "a1111", responses((status = 200, description = "`{loaded, skipped}`, each by name: `{step, sd_checkpoint, sd_checkpoint_name, shape, vectors}`")))]
pub(super) async fn embeddings(State(app): State<Shared>) -> Json<Value> {
    let embeddings = crate::api::resolve::listed_adapters(&app).await.embeddings;
    let (mut loaded, mut skipped) = (Map::new(), Map::new());
    for e in embeddings.iter().filter(|e| e.vectors > 0) {
        let entry = json!({
            "step": e.step,
            "sd_checkpoint": e.sd_checkpoint,
            "sd_checkpoint_name": e.sd_checkpoint_name,
            "shape": e.shape,
            "vectors": e.vectors,
        });
        match e.error {
            None => loaded.insert(e.name.clone(), entry),
            Some(_) => skipped.insert(e.name.clone(), entry),
        };
    }
    Json(json!({"loaded": loaded, "skipped": skipped}))
}

/// Reads LORA_DIR again now (the worker does it between jobs, so this waits for a running
/// job); answers `null`, as A1111 does. Changes are also picked up without it, within a
/// second while idle and before every job.
#[utoipa::path(post, path = "/sdapi/v1/refresh-loras", tag = "a1111", responses((status = 200, description = "`null`, once the folder has been read again"), (status = 503, description = "`model_unavailable`: the model is not loaded, or the worker did not get to it in time", body = crate::error::ErrorBody)))]
pub(super) async fn refresh_loras(State(app): State<Shared>) -> Result<Json<Value>, ApiError> {
    crate::api::resolve::fresh_adapters(&app, true, app.engine.config().timeout).await?;
    Ok(Json(Value::Null))
}

/// Reads EMBEDDINGS_DIR again now, as `refresh-loras` does; answers `null`, as A1111 does.
#[utoipa::path(post, path = "/sdapi/v1/refresh-embeddings", tag = "a1111", responses((status = 200, description = "`null`, once the folder has been read again"), (status = 503, description = "`model_unavailable`", body = crate::error::ErrorBody)))]
pub(super) async fn refresh_embeddings(State(app): State<Shared>) -> Result<Json<Value>, ApiError> {
    crate::api::resolve::fresh_adapters(&app, true, app.engine.config().timeout).await?;
    Ok(Json(Value::Null))
}

/// `{ram: {free, used, total}, cuda: {system: {free, used, total}} | {error}}` in bytes, as
/// A1111 answers (`used` is this process's resident memory, `free` the machine's total less
/// it). Of A1111's `cuda` it gives `system` (the device's memory); without a GPU `cuda` is
/// `{error: "unavailable"}`, as A1111's.
#[utoipa::path(get, path = "/sdapi/v1/memory", tag = "a1111", responses((status = 200, description = "`{ram, cuda}`")))]
pub(super) async fn memory(State(app): State<Shared>) -> Json<Value> {
    let total = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
        let line = m.lines().find(|l| l.starts_with("MemTotal:"))?;
        line.split_whitespace().nth(1)?.parse::<u64>().ok()
    });
    let ram = match (crate::config::rss_mb(), total) {
        (Some(rss_mb), Some(total_kb)) => {
            let (used, total) = (rss_mb << 20, total_kb << 10);
            json!({"free": total.saturating_sub(used), "used": used, "total": total})
        }
        _ => json!({"error": "memory figures unavailable on this system"}),
    };
    let cuda = match sdserve_pipeline::device::gpu_info(&app.candle_device) {
        Some(g) => json!({"system": {
            "free": g.memory_free_bytes,
            "used": g.memory_used_bytes(),
            "total": g.memory_total_bytes,
        }}),
        None => json!({"error": "unavailable"}),
    };
    Json(json!({"ram": ram, "cuda": cuda}))
}

/// `[]`: no hypernetworks (A1111's `[{name, path}]`).
#[utoipa::path(get, path = "/sdapi/v1/hypernetworks", tag = "a1111", responses((status = 200, description = "`[]`")))]
pub(super) async fn hypernetworks() -> Json<Value> {
    Json(json!([]))
}

/// `[{name: "CodeFormer", cmd_dir: null}]` when FACE_RESTORE_DIR holds its networks, else
/// `[]` (A1111's `[{name, cmd_dir}]`; GFPGAN does not run here).
#[utoipa::path(get, path = "/sdapi/v1/face-restorers", tag = "a1111", responses((status = 200, description = "CodeFormer when FACE_RESTORE_DIR holds its networks, else `[]`")))]
pub(super) async fn face_restorers(State(app): State<Shared>) -> Result<Json<Value>, ApiError> {
    let catalog = app.face_restore.clone();
    crate::api::off_the_runtime(move || Ok::<_, ApiError>(Json(catalog.listing()))).await
}

/// `[]`: no Real-ESRGAN upscaler (A1111's `[{name, path, scale}]`).
#[utoipa::path(get, path = "/sdapi/v1/realesrgan-models", tag = "a1111", responses((status = 200, description = "`[]`")))]
pub(super) async fn realesrgan_models() -> Json<Value> {
    Json(json!([]))
}

/// `{txt2img: [], img2img: []}`
#[utoipa::path(get, path = "/sdapi/v1/scripts", tag = "a1111", responses((status = 200, description = "No scripts")))]
pub(super) async fn scripts() -> Json<Value> {
    Json(json!({"txt2img": [], "img2img": []}))
}

/// `[{name, model_name, model_path, model_url, scale}]`: the image upscalers: A1111's built-in
/// `None`, `Lanczos`, `Nearest`, then UPSCALERS_DIR's models (all of them Extras'
/// `upscaler_1`, `upscaler_2` and the hires fix's `hr_upscaler`) as A1111's `UpscalerESRGAN`
/// lists them (`model_name` `ESRGAN_4x`) or, for a SwinIR, its `UpscalerSwinIR`
/// (`model_name` `SwinIR 4x`); `scale` 4 whatever the file's (A1111 does not read it there);
/// `model_path` is the file name (no paths leave the server).
#[utoipa::path(get, path = "/sdapi/v1/upscalers", tag = "a1111", responses((status = 200, description = "`None`, `Lanczos`, `Nearest`, then UPSCALERS_DIR's models by file stem")))]
pub(super) async fn upscalers(State(app): State<Shared>) -> Json<Value> {
    let builtin = crate::validate::hires::IMAGE_UPSCALERS.iter().map(|(name, _)| {
        json!({"name": name, "model_name": null, "model_path": null, "model_url": null, "scale": 4})
    });
    let catalog = app.upscalers.clone();
    let models = tokio::task::spawn_blocking(move || {
        catalog
            .scan()
            .into_iter()
            .map(|m| {
                let kind = crate::upscalers::kind_of(&m.path);
                (m, kind)
            })
            .collect::<Vec<_>>()
    })
    .await
    .unwrap_or_default();
    let models = models.into_iter().map(|(m, kind)| {
        let file = m.path.file_name().map(|f| f.to_string_lossy().into_owned());
        let model_name = if kind == "swinir" { "SwinIR 4x" } else { "ESRGAN_4x" };
        json!({"name": m.name, "model_name": model_name, "model_path": file, "model_url": null, "scale": 4})
    });
    Json(Value::Array(builtin.chain(models).collect()))
}

/// `[{model_name, filename}]`: the VAEs of VAE_DIR (`[]` without it), read now.
#[utoipa::path(get, path = "/sdapi/v1/sd-vae", tag = "a1111", responses((status = 200, description = "`[{model_name, filename}]`: VAE_DIR's VAEs by file or folder name (both fields the name)")))]
pub(super) async fn sd_vae(State(app): State<Shared>) -> Json<Value> {
    let listed = tokio::task::spawn_blocking(move || super::vaes::listing(&app)).await;
    Json(listed.unwrap_or_else(|_| json!([])))
}

/// `[{name}]`: the hires fix's latent upscale modes, A1111's `shared.latent_upscale_modes`.
#[utoipa::path(get, path = "/sdapi/v1/latent-upscale-modes", tag = "a1111", responses((status = 200, description = "`Latent`, `Latent (antialiased)`, `Latent (bicubic)`, `Latent (bicubic antialiased)`, `Latent (nearest)`, `Latent (nearest-exact)`")))]
pub(super) async fn latent_upscale_modes() -> Json<Value> {
    Json(Value::Array(
        crate::validate::hires::LATENT_UPSCALERS
            .iter()
            .map(|(name, _)| json!({ "name": name }))
            .collect(),
    ))
}

/// `[{name, prompt, negative_prompt}]`: STYLES_FILE's styles (A1111's `styles.csv`), which
/// `styles` in txt2img/img2img names.
#[utoipa::path(get, path = "/sdapi/v1/prompt-styles", tag = "a1111", responses((status = 200, description = "STYLES_FILE's styles")))]
pub(super) async fn prompt_styles(State(app): State<Shared>) -> Json<Value> {
    Json(json!(crate::api::styles::read(&app).await.styles))
}

/// `null`, as A1111 answers: MODELS_DIR is read again at every listing and request, so there is
/// nothing to refresh.
#[utoipa::path(post, path = "/sdapi/v1/refresh-checkpoints", tag = "a1111", responses((status = 200, description = "`null`")))]
pub(super) async fn refresh_checkpoints() -> Json<Value> {
    Json(Value::Null)
}

/// `null`, as A1111 answers: VAE_DIR is read again at every listing and request.
#[utoipa::path(post, path = "/sdapi/v1/refresh-vae", tag = "a1111", responses((status = 200, description = "`null`")))]
pub(super) async fn refresh_vae() -> Json<Value> {
    Json(Value::Null)
}

/// `[]`: A1111's `[{name, is_alwayson, is_img2img, args}]` of the scripts a request may name;
/// there are none here (as `scripts`).
#[utoipa::path(get, path = "/sdapi/v1/script-info", tag = "a1111", responses((status = 200, description = "`[]`")))]
pub(super) async fn script_info() -> Json<Value> {
    Json(json!([]))
}

/// `[]`: A1111's installed extensions; none here.
#[utoipa::path(get, path = "/sdapi/v1/extensions", tag = "a1111", responses((status = 200, description = "`[]`")))]
pub(super) async fn extensions() -> Json<Value> {
    Json(json!([]))
}
