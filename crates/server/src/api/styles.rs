//! `GET /styles`: the prompt styles of STYLES_FILE that requests may name (`styles`).

use axum::extract::State;
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;

use super::Shared;
use crate::styles::Style;

/// The styles, in the file's order; `error` says why the file could not be read (then
/// `styles` is empty).
#[derive(Debug, Serialize, ToSchema)]
pub struct StyleList {
    pub styles: Vec<Style>,
    #[schema(nullable = true)]
    pub error: Option<String>,
}

/// Read now (an edited file is listed at once), off the runtime's threads.
pub(super) async fn read(app: &super::AppState) -> StyleList {
    let book = app.styles.clone();
    let read = tokio::task::spawn_blocking(move || book.styles()).await;
    match read.unwrap_or_else(|e| Err(e.to_string())) {
        Ok(styles) => StyleList {
            styles,
            error: None,
        },
        Err(why) => StyleList {
            styles: Vec::new(),
            error: Some(why),
        },
    }
}

/// STYLES_FILE's styles (A1111's `styles.csv`): `{styles: [{name, prompt, negative_prompt}],
/// error}`. Without a file: none.
#[utoipa::path(get, path = "/styles", responses((status = 200, body = StyleList)))]
pub(super) async fn list(State(app): State<Shared>) -> Json<StyleList> {
    Json(read(&app).await)
}
