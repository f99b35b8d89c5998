//! A1111's VAE choice: `GET sd-vae` lists VAE_DIR's VAEs and MODELS_DIR's `*.vae.*` files as
//! A1111 lists its `vae_dict`, and `sd_vae` (in `override_settings` or `POST options`) names one
//! as A1111's `sd_vae.resolve_vae` does: `Automatic` (its default) is the VAE near a single-file
//! checkpoint (`vaes::VaeCatalog::near_checkpoint`) else the model's own, `None` the model's
//! own, else the file name exactly; a name that is not there falls back to the model's own
//! with a warning, as A1111 falls back ("Couldn't find VAE named ...; using None instead").

use serde_json::{json, Map, Value};

use super::lock;
use crate::api::AppState;
use crate::error::ApiError;

/// `sd_vae`'s default, as A1111's options say it.
pub(super) const AUTOMATIC: &str = "Automatic";

/// `[{model_name, filename}]`: A1111's `get_sd_vaes` (`filename` is the name: no paths leave
/// the server). Blocking (reads the folder).
pub(super) fn listing(app: &AppState) -> Value {
    Value::Array(
        app.vaes
            .scan()
            .into_iter()
            .map(|e| json!({"model_name": e.name, "filename": e.name}))
            .collect(),
    )
}

/// The request's `vae` for an A1111 request's `override_settings.sd_vae`, else the one `POST
/// options` set: `None` for `Automatic` (and neither set), `None` the model's own (also for
/// a name that is not there), else the name.
pub(super) async fn requested(
    app: &AppState,
    body: &Map<String, Value>,
) -> Result<Option<String>, ApiError> {
    let asked = body
        .get("override_settings")
        .and_then(|o| o.get("sd_vae"))
        .and_then(Value::as_str)
        .map(str::to_string)
        .or_else(|| {
            lock(&app.a1111.options)
                .get("sd_vae")
                .and_then(Value::as_str)
                .map(str::to_string)
        });
    let Some(asked) = asked.filter(|a| !crate::vaes::means_automatic(a)) else {
        return Ok(None);
    };
    if crate::vaes::means_none(&asked) {
        return Ok(Some(NONE.to_string()));
    }
    let vaes = app.vaes.clone();
    let name = asked.clone();
    let found = crate::api::off_the_runtime(move || Ok::<_, ApiError>(vaes.find(&name))).await?;
    if found.is_none() {
        tracing::warn!(requested = %asked, "A1111 request names a VAE that is not in VAE_DIR; using the model's own");
    }
    Ok(Some(found.map_or(NONE.to_string(), |e| e.name)))
}

/// `sd_vae`'s `None`: the model's own VAE.
const NONE: &str = "None";

/// `POST options {sd_vae}`: `Automatic`, `None` or a VAE of VAE_DIR; anything else is a 422.
pub(super) async fn check_option(app: &AppState, v: &Value) -> Result<(), ApiError> {
    let bad = || {
        ApiError::validation(
            "sd_vae",
            format!("no VAE {v} here: `Automatic`, `None` or a name GET /sdapi/v1/sd-vae lists"),
        )
    };
    let name = v.as_str().ok_or_else(bad)?.to_string();
    if crate::vaes::means_automatic(&name) || crate::vaes::means_none(&name) {
        return Ok(());
    }
    let vaes = app.vaes.clone();
    let found = crate::api::off_the_runtime(move || Ok::<_, ApiError>(vaes.find(&name))).await?;
    found.map(|_| ()).ok_or_else(bad)
}
