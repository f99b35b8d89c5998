//! `GET /models`: the models a request may name (MODELS_DIR and the default), and which one
//! the worker holds; `GET /vaes`: the VAEs it may decode with (VAE_DIR); `GET /upscalers`: the
//! image upscalers of A1111's Extras (UPSCALERS_DIR's ESRGAN models among them).

use axum::extract::State;
use axum::Json;

use super::Shared;
use crate::models::{LoadedModelHealth, ModelList};
use crate::vaes::VaeList;

/// The model this process's worker holds, named as `GET /models` names it.
pub(super) fn loaded(app: &super::AppState) -> Option<LoadedModelHealth> {
    let held = app.engine.loaded_model()?;
    Some(LoadedModelHealth {
        name: held.name.unwrap_or_else(|| app.models.default_name()),
        model_version: held.model_version,
    })
}

/// The default model (`--model`) and every diffusers folder and single-file checkpoint of
/// MODELS_DIR (read now: files added later are listed), with the one the worker holds.
#[utoipa::path(get, path = "/models", responses((status = 200, body = ModelList)))]
pub(super) async fn list(State(app): State<Shared>) -> Json<ModelList> {
    let held = loaded(&app).map(|l| l.name);
    let models = app.models.clone();
    let listing = tokio::task::spawn_blocking(move || models.listing(held.as_deref())).await;
    Json(listing.unwrap_or_else(|_| app.models.listing(None)))
}

/// Every VAE file and diffusers VAE folder of VAE_DIR (read now: files added later are
/// listed) a request may name in `vae`; `sha256` once a request used it.
#[utoipa::path(get, path = "/vaes", responses((status = 200, body = VaeList)))]
pub(super) async fn vaes(State(app): State<Shared>) -> Json<VaeList> {
    let vaes = app.vaes.clone();
    let listing = tokio::task::spawn_blocking(move || vaes.listing()).await;
    Json(listing.unwrap_or(VaeList { vaes: Vec::new() }))
}

/// CONTROLNET_DIR's ControlNets (read now: files added later are listed), by the names
/// `controlnets[i].model` takes.
#[utoipa::path(get, path = "/controlnets", responses((status = 200, body = crate::controlnets::ControlNetList)))]
pub(super) async fn controlnets(
    State(app): State<Shared>,
) -> Json<crate::controlnets::ControlNetList> {
    let catalog = app.controlnets.clone();
    let listing = tokio::task::spawn_blocking(move || catalog.listing()).await;
    Json(listing.unwrap_or_else(|_| crate::controlnets::ControlNetCatalog::default().listing()))
}

/// IP_ADAPTER_DIR's adapters (read now: files added later are listed), by the names
/// `ip_adapters[i].model` takes, and whether its image encoder is there.
#[utoipa::path(get, path = "/ip-adapters", responses((status = 200, body = crate::ip_adapters::IpAdapterList)))]
pub(super) async fn ip_adapters(
    State(app): State<Shared>,
) -> Json<crate::ip_adapters::IpAdapterList> {
    let catalog = app.ip_adapters.clone();
    let listing = tokio::task::spawn_blocking(move || catalog.listing()).await;
    Json(listing.unwrap_or_else(|_| crate::ip_adapters::IpAdapterCatalog::default().listing()))
}

/// The image upscalers A1111's Extras (`/sdapi/v1/extra-single-image`: `upscaler_1`,
/// `upscaler_2`) and the hires fix (`hires.upscaler`, beside the latent modes) take: the
/// built-ins, then UPSCALERS_DIR's ESRGAN models (read now: files added later are listed).
#[utoipa::path(get, path = "/upscalers", responses((status = 200, body = crate::upscalers::UpscalerList)))]
pub(super) async fn upscalers(State(app): State<Shared>) -> Json<crate::upscalers::UpscalerList> {
    let catalog = app.upscalers.clone();
    let listing = tokio::task::spawn_blocking(move || catalog.listing()).await;
    Json(listing.unwrap_or_else(|_| crate::upscalers::UpscalerCatalog::default().listing()))
}
