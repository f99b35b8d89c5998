//! A1111's "Extras": `POST /sdapi/v1/extra-single-image` and `extra-batch-images` (webuiapi's
//! `extra_single_image` / `extra_batch_images`), upscaling with A1111's built-in upscalers and
//! UPSCALERS_DIR's ESRGAN models as its `run_extras` does (`sdserve_pipeline::upscale`; the
//! rules in `validate::extras`).
//!
//! No job: it is CPU work on the images alone (an ESRGAN model runs on the CPU in f32, in
//! A1111's 192 px tiles, read once into the process's `upscalers::NetworkCache`; on the CPU
//! because it runs outside the worker's queue and device memory plan), so it runs beside generation
//! (also while the model loads). It runs off the async runtime (tokio's blocking pool), at
//! most [`AT_ONCE`] requests at a time, later ones waiting their turn as A1111's queue lock
//! makes them wait; the wait and the work together are held to GENERATION_TIMEOUT_SECONDS
//! (408 `timeout`). Each answer PNG carries A1111's `postprocessing` text (the upscale's
//! infotext) and the sent PNG's `parameters` text, as A1111 keeps it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::Json;
use base64::Engine as _;
use candle_core::Device;
use sdserve_pipeline::upscale::{python_float, ExtrasUpscale};
use serde_json::{json, Map, Value};
use tokio::sync::Semaphore;

use crate::api::{required_body_object, AppState, Shared};
use crate::error::{ApiError, TimeoutInfo};
use crate::face_restorers::FaceRestoreCatalog;
use crate::validate::extras::{
    check_size, codeformer, load_models, validate_extras, ExtrasCodeFormer, BATCH_MAX_IMAGES,
    BATCH_MAX_PIXELS,
};

/// Extras' CodeFormer step with the folder its networks come from.
type Restore = Option<(FaceRestoreCatalog, ExtrasCodeFormer)>;

/// Extras requests working at once; more wait for a slot.
pub const AT_ONCE: usize = 2;

/// The slots Extras requests take turns in.
pub struct Slots(Arc<Semaphore>);

impl Default for Slots {
    fn default() -> Self {
        Self(Arc::new(Semaphore::new(AT_ONCE)))
    }
}

/// One image of a request: the field it came in (for errors) and its base64.
struct Sent {
    field: String,
    b64: String,
}

/// The answer PNGs (base64) and the last one's infotext (A1111's `html_info` shows the last).
struct Done {
    images: Vec<String>,
    infotext: String,
}

/// Upscales the images in a slot, off the runtime, within the deadline.
async fn run(
    app: &AppState,
    spec: ExtrasUpscale,
    restore: Restore,
    sent: Vec<Sent>,
) -> Result<Done, ApiError> {
    let deadline = app.engine.config().timeout;
    let until = Instant::now() + deadline;
    let slots = app.a1111.extras.0.clone();
    let work = async move {
        let permit = slots
            .acquire_owned()
            .await
            .map_err(|e| ApiError::Internal(format!("extras slots closed: {e}")))?;
        // The slot goes with the work: a request given up at its deadline still holds it
        // until its work ends (bounded: a model stops at the next tile).
        crate::api::off_the_runtime(move || {
            let _slot = permit;
            upscale_all(spec, restore, sent, (until, deadline))
        })
        .await
    };
    match tokio::time::timeout(deadline, work).await {
        Ok(done) => done,
        Err(_) => Err(ApiError::Timeout(TimeoutInfo::from(deadline.as_secs()))),
    }
}

/// Every image's size is checked from its header before any is decoded; then one at a time:
/// decoded, upscaled, encoded.
/// A model's work stops at `deadline` (the request has had its 408 by then) rather than run
/// on in its slot.
fn upscale_all(
    mut spec: ExtrasUpscale,
    restore: Restore,
    sent: Vec<Sent>,
    (until, deadline): (Instant, Duration),
) -> Result<Done, ApiError> {
    load_models(&mut spec)?;
    // CodeFormer's networks on the CPU in f32, as the upscalers' (outside the worker's plan).
    let restore = match restore {
        Some((catalog, step)) => Some((
            crate::face_restorers::loaded(&catalog, step.weight, &Device::Cpu)
                .map_err(|why| ApiError::validation("codeformer_visibility", why))?,
            step,
        )),
        None => None,
    };
    let mut files = Vec::with_capacity(sent.len());
    let mut pixels = 0u64;
    for s in sent {
        let bytes =
            crate::images::base64_bytes(&s.b64).map_err(|e| ApiError::validation(&s.field, e))?;
        let (_, w, h) =
            crate::images::header(&bytes).map_err(|e| ApiError::validation(&s.field, e))?;
        pixels += check_size(&spec, w, h, &s.field)?;
        files.push((s.field, bytes));
    }
    if pixels > BATCH_MAX_PIXELS {
        return Err(ApiError::validation(
            "imageList",
            format!(
                "the results would hold {} MP together; at most {} MP a request",
                pixels >> 20,
                BATCH_MAX_PIXELS >> 20
            ),
        ));
    }
    let mut images = Vec::with_capacity(files.len());
    let mut infotext = String::new();
    for (field, bytes) in files {
        let image =
            crate::images::decode_bytes(&bytes).map_err(|e| ApiError::validation(&field, e))?;
        let (up, info) = spec
            .run_until(&image.image, Some(until))
            .map_err(|e| match e {
                sdserve_pipeline::PipelineError::InvalidRequest(why) => {
                    ApiError::validation(&field, why)
                }
                sdserve_pipeline::PipelineError::Cancelled => {
                    ApiError::Timeout(TimeoutInfo::from(deadline.as_secs()))
                }
                e => ApiError::Internal(format!("upscaling {field}: {e}")),
            })?;
        let (up, info) = match &restore {
            Some((faces, step)) => {
                let restored = faces
                    .run(&up, &Device::Cpu)
                    .map_err(|e| ApiError::Internal(format!("restoring faces in {field}: {e}")))?;
                let restored = if step.visibility < 1.0 {
                    sdserve_pipeline::upscale::blend(&up, &restored, step.visibility)
                } else {
                    restored
                };
                let mut info = info;
                // A1111's `round(x, 3)`, written as Python writes a float.
                let round3 = |x: f64| python_float((x * 1000.0).round() / 1000.0);
                info.push(("CodeFormer visibility".into(), round3(step.visibility)));
                info.push(("CodeFormer weight".into(), round3(step.weight)));
                (restored, info)
            }
            None => (up, info),
        };
        infotext = info
            .iter()
            .map(|(k, v)| format!("{k}: {v}"))
            .collect::<Vec<_>>()
            .join(", ");
        let parameters = crate::png::read_parameters(&bytes);
        let mut texts = Vec::new();
        if let Some(p) = &parameters {
            texts.push(("parameters", p.as_str()));
        }
        texts.push(("postprocessing", infotext.as_str()));
        let png = crate::png::encode_with_text(&up, &texts).map_err(ApiError::Internal)?;
        images.push(base64::engine::general_purpose::STANDARD.encode(png));
    }
    Ok(Done { images, infotext })
}

/// A1111's `plaintext_to_html` (modules/ui_common.py): escaped lines joined by `<br>`.
pub fn html_info(text: &str) -> String {
    let escape = |line: &str| {
        line.replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;")
            .replace('"', "&quot;")
            .replace('\'', "&#x27;")
    };
    let lines: Vec<String> = text.split('\n').map(escape).collect();
    format!("<p>{}</p>", lines.join("<br>\n"))
}

/// The request's CodeFormer step, its folder checked now (a 422 naming
/// `codeformer_visibility` without FACE_RESTORE_DIR or its files).
async fn face_restore(app: &AppState, body: &Map<String, Value>) -> Result<Restore, ApiError> {
    let Some(step) = codeformer(body) else {
        return Ok(None);
    };
    let catalog = app.face_restore.clone();
    crate::api::off_the_runtime(move || {
        catalog
            .files()
            .map(|_| Some((catalog, step)))
            .map_err(|why| ApiError::validation("codeformer_visibility", why))
    })
    .await
}

/// UPSCALERS_DIR's models, read now.
async fn models(app: &AppState) -> Result<Vec<crate::upscalers::UpscalerEntry>, ApiError> {
    let catalog = app.upscalers.clone();
    crate::api::off_the_runtime(move || Ok::<_, ApiError>(catalog.scan())).await
}

fn image_text(v: Option<&Value>, field: &str) -> Result<String, ApiError> {
    match v {
        Some(Value::String(s)) if !s.trim().is_empty() => Ok(s.clone()),
        Some(Value::String(_)) | Some(Value::Null) | None => Err(ApiError::validation(
            field,
            "is required: a base64 PNG, JPEG or WebP image",
        )),
        Some(_) => Err(ApiError::validation(
            field,
            "must be a string: a base64 PNG, JPEG or WebP image",
        )),
    }
}

/// A1111's `extra-single-image`: the image upscaled (`upscaler_1`, blended with `upscaler_2`
/// by `extras_upscaler_2_visibility`), by `upscaling_resize` or to `upscaling_resize_w` x
/// `upscaling_resize_h` (`resize_mode` 1, `upscaling_crop`). `{html_info, image}`.
#[utoipa::path(post, path = "/sdapi/v1/extra-single-image", tag = "a1111", request_body = super::schema::ExtrasSingleImageRequest,
    responses((status = 200, body = super::schema::ExtrasSingleImageResponse), (status = 400, description = "`invalid_json`: not a JSON object", body = crate::error::ErrorBody), (status = 408, description = "`timeout`: the wait for a slot and the work passed GENERATION_TIMEOUT_SECONDS", body = crate::error::ErrorBody), (status = 413, description = "`payload_too_large`", body = crate::error::ErrorBody), (status = 422, description = "A field breaks a rule: an unknown upscaler (the names listed), face restoration asked for, an image that is not one or is too large, a result (or a model's round) over 4096 px a side or 16 MP, an UPSCALERS_DIR file of no supported architecture (ESRGAN, ESRGAN+, Real-ESRGAN Compact, SwinIR)", body = crate::error::ErrorBody)))]
pub(super) async fn extra_single_image(
    State(app): State<Shared>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let body = required_body_object(app.max_body_bytes, body)?;
    let spec = validate_extras(&body, &models(&app).await?)?;
    let restore = face_restore(&app, &body).await?;
    let b64 = image_text(body.get("image"), "image")?;
    let field = "image".to_string();
    let done = run(&app, spec, restore, vec![Sent { field, b64 }]).await?;
    let image = done.images.into_iter().next().unwrap_or_default();
    Ok(Json(
        json!({"html_info": html_info(&done.infotext), "image": image}),
    ))
}

/// A1111's `extra-batch-images`: each of `imageList` (`{data, name}`) as `extra-single-image`
/// does one, in order; `html_info` is the last one's, as A1111's.
#[utoipa::path(post, path = "/sdapi/v1/extra-batch-images", tag = "a1111", request_body = super::schema::ExtrasBatchImagesRequest,
    responses((status = 200, body = super::schema::ExtrasBatchImagesResponse), (status = 400, description = "`invalid_json`: not a JSON object", body = crate::error::ErrorBody), (status = 408, description = "`timeout`", body = crate::error::ErrorBody), (status = 413, description = "`payload_too_large`", body = crate::error::ErrorBody), (status = 422, description = "As `extra-single-image`, naming `imageList[i].data`; more than 64 images, or results over 64 MP together", body = crate::error::ErrorBody)))]
pub(super) async fn extra_batch_images(
    State(app): State<Shared>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let body = required_body_object(app.max_body_bytes, body)?;
    let spec = validate_extras(&body, &models(&app).await?)?;
    let restore = face_restore(&app, &body).await?;
    let list = match body.get("imageList") {
        Some(Value::Array(a)) => a,
        None | Some(Value::Null) => {
            return Err(ApiError::validation(
                "imageList",
                "is required: a list of {data, name} (data a base64 image)",
            ))
        }
        Some(_) => {
            return Err(ApiError::validation(
                "imageList",
                "must be a list of {data, name} (data a base64 image)",
            ))
        }
    };
    if list.len() > BATCH_MAX_IMAGES {
        return Err(ApiError::validation(
            "imageList",
            format!(
                "at most {BATCH_MAX_IMAGES} images a request (got {})",
                list.len()
            ),
        ));
    }
    let mut sent = Vec::with_capacity(list.len());
    for (i, item) in list.iter().enumerate() {
        let empty = Map::new();
        let item = item.as_object().unwrap_or(&empty);
        let field = format!("imageList[{i}].data");
        let b64 = image_text(item.get("data"), &field)?;
        // A1111's FileData requires the name (which names saved files there).
        if !item.get("name").is_some_and(Value::is_string) {
            return Err(ApiError::validation(
                &format!("imageList[{i}].name"),
                "is required: a string",
            ));
        }
        sent.push(Sent { field, b64 });
    }
    let done = run(&app, spec, restore, sent).await?;
    Ok(Json(
        json!({"html_info": html_info(&done.infotext), "images": done.images}),
    ))
}

#[cfg(test)]
mod tests {
    use super::html_info;

    #[test]
    fn html_info_is_a1111s_plaintext_to_html() {
        assert_eq!(html_info(""), "<p></p>");
        assert_eq!(
            html_info("Postprocess upscale by: 2.0, Postprocess upscaler: Lanczos"),
            "<p>Postprocess upscale by: 2.0, Postprocess upscaler: Lanczos</p>"
        );
        assert_eq!(
            html_info("a<b\n\"c\" & 'd'"),
            "<p>a&lt;b<br>\n&quot;c&quot; &amp; &#x27;d&#x27;</p>"
        );
    }
}
