//! A1111's checkpoints: `GET sd-models` lists the default model and MODELS_DIR's models in
//! A1111's shape, and a `sd_model_checkpoint` (in `override_settings` or `POST options`) is
//! resolved as A1111's `get_closet_checkpoint_match` does: an exact id (title, name,
//! model_name, short hash, sha256), else the shortest title containing it, else the same
//! with a trailing ` [hash]` taken off.

use serde_json::{json, Map, Value};

use axum::extract::State;
use axum::Json;

use super::lock;
use crate::api::{AppState, Shared};
use crate::engine::ModelAsk;
use crate::error::ApiError;
use crate::generator::ModelInfo;
use crate::models::{Catalog, ModelKind};

/// One checkpoint as A1111 lists it.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Checkpoint {
    /// The MODELS_DIR model; `None`: the default model.
    pub target: Option<String>,
    pub title: String,
    pub name: String,
    pub model_name: String,
    /// The first 10 hex digits of `sha256`, once known.
    pub hash: Option<String>,
    pub sha256: Option<String>,
}

impl Checkpoint {
    /// `sd-models`' entry (`filename` is the name: no paths leave the server).
    pub fn listing(&self) -> Value {
        json!({
            "title": self.title,
            "model_name": self.model_name,
            "hash": self.hash,
            "sha256": self.sha256,
            "filename": self.name,
            "config": null,
        })
    }

    fn ids(&self) -> Vec<String> {
        let mut ids = vec![
            self.title.clone(),
            self.name.clone(),
            self.model_name.clone(),
        ];
        if let Some(h) = &self.hash {
            ids.push(h.clone());
            ids.push(format!("{} [{h}]", self.name));
            ids.push(format!("{} [{h}]", self.model_name));
        }
        ids.extend(self.sha256.clone());
        ids
    }
}

/// A1111's title and short hash of a model version (`name@sha256:<hex>`): the default
/// model's names, as this dialect always gave them.
pub(super) fn version_names(model_version: &str) -> (String, String) {
    let hash = model_version
        .split_once('@')
        .map(|(_, rev)| rev.trim_start_matches("sha256:"))
        .unwrap_or_default()
        .chars()
        .take(10)
        .collect();
    (model_version.to_string(), hash)
}

/// Every checkpoint: the default model first (titled by its version), then MODELS_DIR's
/// (titled `name [hash]` once hashed, as A1111 titles them). Blocking (reads the folder).
pub(super) fn checkpoints(catalog: &Catalog, default: &ModelInfo) -> Vec<Checkpoint> {
    let (title, hash) = version_names(&default.model_version);
    let mut out = vec![Checkpoint {
        target: None,
        model_name: title.split('@').next().unwrap_or_default().to_string(),
        name: catalog.default_name(),
        title,
        hash: (!hash.is_empty()).then_some(hash),
        sha256: None,
    }];
    for e in catalog.scan() {
        if catalog.is_default(&e) {
            continue;
        }
        let sha256 = catalog.known_sha256(&e);
        let hash = sha256.as_ref().map(|s| s[..10].to_string());
        let model_name = match e.kind {
            ModelKind::File => std::path::Path::new(&e.name)
                .file_stem()
                .map_or_else(|| e.name.clone(), |s| s.to_string_lossy().into_owned()),
            _ => e.name.clone(),
        };
        out.push(Checkpoint {
            title: hash
                .as_ref()
                .map_or_else(|| e.name.clone(), |h| format!("{} [{h}]", e.name)),
            target: Some(e.name.clone()),
            name: e.name,
            model_name,
            hash,
            sha256,
        });
    }
    out
}

/// The checkpoint `search` names, as A1111 resolves it; `None` when none matches.
pub(super) fn resolve<'a>(all: &'a [Checkpoint], search: &str) -> Option<&'a Checkpoint> {
    if let Some(c) = all.iter().find(|c| c.ids().iter().any(|id| id == search)) {
        return Some(c);
    }
    let containing = |s: &str| {
        all.iter()
            .filter(|c| c.title.contains(s))
            .min_by_key(|c| c.title.len())
    };
    if let Some(c) = containing(search) {
        return Some(c);
    }
    let stripped = strip_hash(search);
    (stripped != search && !stripped.is_empty())
        .then(|| containing(stripped))
        .flatten()
}

/// `search` without a trailing ` [0123456789]` (A1111's `\s*\[[a-fA-F0-9]{10}\]\s*$`).
fn strip_hash(search: &str) -> &str {
    let t = search.trim_end();
    let Some(inner) = t.strip_suffix(']') else {
        return search;
    };
    match inner.rsplit_once('[') {
        Some((head, hex)) if hex.len() == 10 && hex.chars().all(|c| c.is_ascii_hexdigit()) => {
            head.trim_end()
        }
        _ => search,
    }
}

/// Every checkpoint (`checkpoints`), read off the runtime's threads.
pub(super) async fn all(app: &AppState, default: &ModelInfo) -> Result<Vec<Checkpoint>, ApiError> {
    let (catalog, default) = (app.models.clone(), default.clone());
    crate::api::off_the_runtime(move || Ok(checkpoints(&catalog, &default))).await
}

/// The MODELS_DIR model an A1111 request runs on (`None`: the default model): its
/// `override_settings.sd_model_checkpoint`, else the one `POST options` set. A name that
/// matches no checkpoint falls back to the default model with a warning, as A1111 falls back.
pub(super) async fn requested(
    app: &AppState,
    default: &ModelInfo,
    body: &Map<String, Value>,
) -> Result<Option<String>, ApiError> {
    let asked = body
        .get("override_settings")
        .and_then(|o| o.get("sd_model_checkpoint"))
        .and_then(Value::as_str)
        .map(str::to_string)
        .or_else(|| {
            lock(&app.a1111.options)
                .get("sd_model_checkpoint")
                .and_then(Value::as_str)
                .map(str::to_string)
        });
    let Some(asked) = asked else {
        return Ok(None);
    };
    let all = all(app, default).await?;
    match resolve(&all, &asked) {
        Some(c) => Ok(c.target.clone()),
        None => {
            tracing::warn!(requested = %asked, "A1111 request names a checkpoint that is not here; using the default model");
            Ok(None)
        }
    }
}

/// How long the checkpoint routes wait for the worker: a running job may take its whole
/// deadline (JOB_TIMEOUT_SECONDS) before the worker gets to the ask, then the load itself.
fn ask_bound(app: &AppState) -> std::time::Duration {
    let cfg = app.engine.config();
    cfg.job_timeout.max(cfg.timeout) + cfg.timeout
}

/// A1111's `unload-checkpoint` (`sd_models.unload_model_weights`): the worker drops its model
/// (weights, device memory, caches) after the running job, if any, never under it; answers
/// `{}` once it has, as A1111 does. Jobs still queue: each loads the model again first (its
/// `loading` event), as after a MODELS_DIR switch.
#[utoipa::path(post, path = "/sdapi/v1/unload-checkpoint", tag = "a1111", responses(
    (status = 200, description = "`{}`, once this process's worker holds no model (`/health`: `loaded_model` null, `detail` says it is unloaded). With QUEUE_URL it acts on the worker of the replica it is sent to"),
    (status = 503, description = "`model_unavailable`: still loading, shutting down, an API replica (`--role api`, no worker), or the running job did not end in time (nothing done)", body = crate::error::ErrorBody),
))]
pub(super) async fn unload(State(app): State<Shared>) -> Result<Json<Value>, ApiError> {
    app.engine
        .ask_model(ModelAsk::Unload, ask_bound(&app))
        .await?;
    Ok(Json(json!({})))
}

/// A1111's `reload-checkpoint` (`sd_models.reload_model_weights`): the worker loads the
/// checkpoint `POST options` selected (`sd_model_checkpoint`; the default model when none is)
/// now, after the running job, if any; answers `{}` once it is loaded.
#[utoipa::path(post, path = "/sdapi/v1/reload-checkpoint", tag = "a1111", responses(
    (status = 200, description = "`{}`, once this process's worker holds the model (already held: nothing to do). With QUEUE_URL it acts on the worker of the replica it is sent to"),
    (status = 503, description = "`model_unavailable`: still loading, shutting down, an API replica (`--role api`, no worker), the model could not be loaded, the running job did not end in time (the ask is withdrawn), or the load outlasted the wait (it goes on: `/health`'s `loaded_model` says when the model is held)", body = crate::error::ErrorBody),
))]
pub(super) async fn reload(State(app): State<Shared>) -> Result<Json<Value>, ApiError> {
    let default = app.engine.model_info()?;
    let target = requested(&app, &default, &Map::new()).await?;
    app.engine
        .ask_model(ModelAsk::Reload(target), ask_bound(&app))
        .await?;
    Ok(Json(json!({})))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cp(name: &str, hash: Option<&str>) -> Checkpoint {
        Checkpoint {
            target: Some(name.into()),
            title: hash.map_or(name.to_string(), |h| format!("{name} [{h}]")),
            name: name.into(),
            model_name: name.trim_end_matches(".safetensors").into(),
            hash: hash.map(str::to_string),
            sha256: hash.map(|h| format!("{h}{}", "0".repeat(54))),
        }
    }

    #[test]
    fn names_resolve_as_a1111_resolves_them() {
        let all = [
            cp("dreamshaper_8.safetensors", Some("879db523c3")),
            cp("dreamshaper_8_inpainting.safetensors", None),
            cp("tiny-b", None),
        ];
        let to = |s: &str| resolve(&all, s).map(|c| c.name.as_str());
        assert_eq!(
            to("dreamshaper_8.safetensors [879db523c3]"),
            Some("dreamshaper_8.safetensors")
        );
        assert_eq!(to("dreamshaper_8"), Some("dreamshaper_8.safetensors"));
        assert_eq!(to("879db523c3"), Some("dreamshaper_8.safetensors"));
        assert_eq!(to("tiny-b"), Some("tiny-b"));
        // A substring: the shortest title holding it (the hash makes the first one longer).
        assert_eq!(
            to("dreamshaper"),
            Some("dreamshaper_8_inpainting.safetensors")
        );
        assert_eq!(to("shaper_8.safe"), Some("dreamshaper_8.safetensors"));
        // A stale hash in the title still finds the file.
        assert_eq!(to("tiny-b [0123456789]"), Some("tiny-b"));
        assert_eq!(to("v1-5-pruned.safetensors"), None);
        assert_eq!(strip_hash("a [0123456789] "), "a");
        assert_eq!(strip_hash("a [xyz]"), "a [xyz]");
    }
}
