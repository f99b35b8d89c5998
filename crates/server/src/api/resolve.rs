//! Resolving a validated request's names against the folders before it is queued: the model,
//! the VAE, the upscaler, ControlNets, IP-Adapters, and the LoRA/embedding folders' state the
//! check must agree with.

use super::request::off_the_runtime;
use super::AppState;
use crate::error::ApiError;
use crate::generator::ModelInfo;
use crate::validate::ValidRequest;

/// How long a request waits for the worker to look at LORA_DIR/EMBEDDINGS_DIR when they
/// changed since its last read (it looks between jobs, so a running job can hold it up).
pub const ADAPTERS_LOOK_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// The model's description to check and cache `req` with, and whether its answer may be
/// cached. When the folders changed since the worker last read them (a file dropped in,
/// replaced, removed), or `req` names a LoRA that read does not have, the worker looks first
/// (within `ADAPTERS_LOOK_WAIT`), so that validation and the image agree with the files. A
/// LoRA named that the read lacks but whose file this process sees (dropped in while a job
/// runs, which holds the worker) is waited for up to `patience` when given: a client that
/// waits for its image (`/generate`) would wait behind that job anyway. A request checked
/// against an older read than the folders' state now is not cached.
pub(crate) async fn adapters_info(
    app: &AppState,
    info: ModelInfo,
    req: &ValidRequest,
    patience: Option<std::time::Duration>,
) -> (ModelInfo, bool) {
    let unknown: Vec<&str> = req
        .loras
        .iter()
        .filter(|(name, _)| info.adapters.lora(name).is_none())
        .map(|(name, _)| name.as_str())
        .collect();
    if !adapters_stale(app, &info) && unknown.is_empty() {
        return (info, true);
    }
    let on_disk = |name: &str| {
        app.adapter_dirs
            .lora_dir
            .as_ref()
            .is_some_and(|d| d.join(format!("{name}.safetensors")).is_file())
    };
    let wait = match patience {
        Some(p) if unknown.iter().any(|n| on_disk(n)) => p.max(ADAPTERS_LOOK_WAIT),
        _ => ADAPTERS_LOOK_WAIT,
    };
    let info = fresh_adapters(app, false, wait).await.unwrap_or(info);
    let cacheable = !adapters_stale(app, &info);
    (info, cacheable)
}

/// What the listings show: the last read of the adapter folders, after the worker looked at
/// them when they changed since (within `ADAPTERS_LOOK_WAIT`), so that a file just dropped in
/// is listed as it will be used. Empty while the model loads.
pub(crate) async fn listed_adapters(app: &AppState) -> crate::adapters::Adapters {
    let Ok(info) = app.engine.model_info() else {
        return Default::default();
    };
    if !adapters_stale(app, &info) {
        return info.adapters;
    }
    fresh_adapters(app, false, ADAPTERS_LOOK_WAIT)
        .await
        .unwrap_or(info)
        .adapters
}

/// True when this process sees LORA_DIR/EMBEDDINGS_DIR other than `info`'s read of them.
fn adapters_stale(app: &AppState, info: &ModelInfo) -> bool {
    app.adapter_dirs
        .fingerprint()
        .is_some_and(|now| now != info.adapters.fingerprint)
}

/// The model's description once the worker(s) looked at the adapter folders (read them again,
/// with `force`). Where no worker can be asked directly (an API replica, QUEUE_URL), it waits
/// for the workers' announced read to match the folders as this process sees them, if it sees
/// them (LORA_DIR set here too), within `within`.
pub(crate) async fn fresh_adapters(
    app: &AppState,
    force: bool,
    within: std::time::Duration,
) -> Result<ModelInfo, ApiError> {
    let until = tokio::time::Instant::now() + within;
    let mut info = app.engine.rescan_adapters(force, within).await?;
    while adapters_stale(app, &info) && tokio::time::Instant::now() < until {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        info = app.engine.model_info()?;
    }
    Ok(info)
}

/// The model `req` names and what it is checked and cached against: `req.model` becomes the
/// MODELS_DIR model it runs on (`None`: the default model, also when it names the default) and
/// the description is that model's (`models::Catalog::probe`; `base`, the default's, has the
/// adapters). An unknown name is a 422 naming `field` (as the client sent it).
pub(crate) async fn named_model(
    app: &AppState,
    base: ModelInfo,
    req: &mut ValidRequest,
    field: &'static str,
) -> Result<ModelInfo, ApiError> {
    let Some(name) = req.model.take() else {
        return Ok(base);
    };
    let catalog = app.models.clone();
    let loras: Vec<String> = req.loras.iter().map(|(n, _)| n.clone()).collect();
    let (model, info) = off_the_runtime(move || {
        if name == catalog.default_name() || name == base.model_version {
            return Ok((None, base));
        }
        let entry = catalog.find(&name).ok_or_else(|| {
            ApiError::validation(
                field,
                format!("no model named {name:?} (GET /models lists them)"),
            )
        })?;
        if catalog.is_default(&entry) {
            return Ok((None, base));
        }
        match catalog.probe(&entry, &base) {
            Ok(mut info) => {
                // The listing's verdicts are the loaded model's; the request's LoRAs are
                // checked against this one's shapes (a folder's or a single file's).
                if !loras.is_empty() {
                    info.adapters = info.adapters.fitted_to_model(&loras, &entry.path);
                }
                Ok((Some(entry.name), info))
            }
            Err(why) => {
                tracing::warn!(model = %name, error = %why, "a model of MODELS_DIR cannot be read");
                Err(ApiError::ModelUnavailable(format!(
                    "model {name:?} cannot be read (the server log says why)"
                )))
            }
        }
    })
    .await?;
    req.model = model;
    Ok(info)
}

/// The VAE `req` decodes with, with its hash (computed once per file, remembered): the one it
/// names; for `automatic` (or none named) A1111's VAE near its single-file checkpoint
/// (`vaes::VaeCatalog::near_checkpoint`), else `None`, the model's own, as for `none`. An
/// unknown name is a 422 naming `field`, and so is a diffusers VAE folder whose config does
/// not fit `fits` (the limits of the model it runs on, when known: the swap would refuse it).
/// After [`named_model`] (`req.model` is resolved).
pub(crate) async fn named_vae(
    app: &AppState,
    req: &ValidRequest,
    field: &'static str,
    fits: Option<sdserve_pipeline::pipeline::ModelLimits>,
) -> Result<Option<crate::vaes::VaeUse>, ApiError> {
    let catalog = app.vaes.clone();
    let models = app.models.clone();
    let (vae, model) = (req.vae.clone(), req.model.clone());
    off_the_runtime(move || {
        let checkpoint = || models.checkpoint_file(model.as_deref());
        resolve_vae(&catalog, vae.as_deref(), checkpoint, field, fits)
    })
    .await
}

/// [`named_vae`]'s look-up of a request's `vae` in `catalog` (blocking: it may hash the
/// file); `checkpoint` gives the single-file checkpoint the request runs on, if any; `fits`
/// the limits of the model it runs on, when known. Also `sdserve generate`'s.
pub(crate) fn resolve_vae(
    catalog: &crate::vaes::VaeCatalog,
    vae: Option<&str>,
    checkpoint: impl FnOnce() -> Option<std::path::PathBuf>,
    field: &'static str,
    fits: Option<sdserve_pipeline::pipeline::ModelLimits>,
) -> Result<Option<crate::vaes::VaeUse>, ApiError> {
    let name = match vae {
        Some(n) if crate::vaes::means_none(n) => return Ok(None),
        Some(n) if !crate::vaes::means_automatic(n) => n.to_string(),
        _ => match checkpoint().and_then(|ckpt| catalog.near_checkpoint(&ckpt)) {
            Some(entry) => entry.name,
            None => return Ok(None),
        },
    };
    let entry = catalog.find(&name).ok_or_else(|| {
        ApiError::validation(
            field,
            format!("no VAE named {name:?} (GET /vaes lists them; `automatic` is the model's own)"),
        )
    })?;
    // A folder brings its own config: one whose latents the model cannot take would fail the
    // swap (`set_vae`). A file is built on the model's VAE config: the config its weights'
    // shapes imply (read from their names and shapes, no tensor data) must be the model's.
    if let Some(limits) = fits {
        let unreadable = |why: String| {
            tracing::warn!(vae = %name, error = %why, "a VAE's config cannot be read");
            ApiError::validation(field, format!("VAE {name:?} cannot be read"))
        };
        let problem = match &entry.kind {
            crate::vaes::VaeKind::Folder => {
                let config: sdserve_pipeline::vae::VaeConfig =
                    sdserve_pipeline::error::read_json(&entry.path.join("config.json"))
                        .map_err(|e| unreadable(e.to_string()))?;
                limits.external_vae_problem(&config)
            }
            _ => {
                let config = sdserve_pipeline::single_file::vae_file_config(&entry.path)
                    .map_err(|e| unreadable(e.to_string()))?;
                limits.vae_file_problem(&config)
            }
        };
        if let Some(why) = problem {
            return Err(ApiError::validation(
                field,
                format!("VAE {name:?} does not fit this model: {why}"),
            ));
        }
    }
    let sha256 = catalog.sha256(&entry).map_err(|why| {
        tracing::warn!(vae = %name, error = %why, "a VAE of VAE_DIR or MODELS_DIR cannot be read");
        ApiError::validation(field, format!("VAE {name:?} cannot be read"))
    })?;
    Ok(Some(crate::vaes::VaeUse {
        name: entry.name,
        hash: sha256[..10].to_string(),
    }))
}

/// The request's hires upscaler model checked against UPSCALERS_DIR before it is queued
/// (`upscalers::UpscalerCatalog::check_hires`): an unknown name is a 422; `Some` identifies the
/// file for the image cache's key.
pub(crate) async fn named_upscaler(
    app: &AppState,
    req: &ValidRequest,
) -> Result<Option<String>, ApiError> {
    let uses_model = req.hires.as_ref().is_some_and(|h| {
        matches!(
            h.params.upscaler,
            sdserve_pipeline::pipeline::Upscaler::Model(_)
        )
    });
    if !uses_model {
        return Ok(None);
    }
    let catalog = app.upscalers.clone();
    let req = req.clone();
    off_the_runtime(move || catalog.check_hires(&req)).await
}

/// The request's face restoration checked against FACE_RESTORE_DIR before it is queued: a
/// missing folder or file is a 422 naming `restore_faces`; `Some` identifies the three files
/// for the image cache's key.
pub(crate) async fn face_restorer(
    app: &AppState,
    req: &ValidRequest,
) -> Result<Option<String>, ApiError> {
    if req.restore_faces.is_none() {
        return Ok(None);
    }
    let catalog = app.face_restore.clone();
    off_the_runtime(move || {
        let files = catalog
            .files()
            .map_err(|why| ApiError::validation("restore_faces", why))?;
        let paths = [files.codeformer, files.detection, files.parsing];
        Ok(Some(crate::model_folder::identity(
            sdserve_pipeline::face_restore::restorer::NAME,
            &paths,
        )))
    })
    .await
}

/// The request's ControlNets checked against CONTROLNET_DIR before it is queued
/// (`controlnets::ControlNetCatalog::check`): an unknown name is a 422 naming `field` (the
/// dialect's name of the list); `Some` identifies the files for the image cache's key. Each
/// unit records its file (the memory check counts its weights).
pub(crate) async fn named_controlnets(
    app: &AppState,
    req: &mut ValidRequest,
    field: &'static str,
) -> Result<Option<String>, ApiError> {
    if req.controlnets.is_empty() {
        return Ok(None);
    }
    let catalog = app.controlnets.clone();
    checked_off_the_runtime(req, move |r| catalog.check(r, field)).await
}

/// The request's IP-Adapters checked against IP_ADAPTER_DIR before it is queued
/// (`ip_adapters::IpAdapterCatalog::check`): an unknown name is a 422 naming `field`; `Some`
/// identifies the files for the image cache's key. Each unit records its files (the memory
/// check counts them).
pub(crate) async fn named_ip_adapters(
    app: &AppState,
    req: &mut ValidRequest,
    field: &'static str,
) -> Result<Option<String>, ApiError> {
    if req.ip_adapters.is_empty() {
        return Ok(None);
    }
    let catalog = app.ip_adapters.clone();
    checked_off_the_runtime(req, move |r| catalog.check(r, field)).await
}

/// A folder catalog's `check` of `req` (blocking: it reads the folder and the files'
/// metadata) run off the runtime on a copy, which then replaces `req` with the files it found.
async fn checked_off_the_runtime(
    req: &mut ValidRequest,
    check: impl FnOnce(&mut ValidRequest) -> Result<Option<String>, ApiError> + Send + 'static,
) -> Result<Option<String>, ApiError> {
    let mut copy = req.clone();
    let (key, checked) = off_the_runtime(move || {
        let key = check(&mut copy)?;
        Ok::<_, ApiError>((key, copy))
    })
    .await?;
    *req = checked;
    Ok(key)
}
