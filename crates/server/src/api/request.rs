//! Reading a request: the dialects' JSON object bodies and their field names, validation off
//! the runtime's threads, and the job a validated request becomes.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::http::{header, HeaderMap, StatusCode};
use sdserve_pipeline::pipeline::{GenerationParams, PromptSyntax};

use super::AppState;
use crate::engine::JobSpec;
use crate::error::ApiError;
use crate::generator::ModelInfo;
use crate::validate::{self, ValidRequest};

/// A JSON object body for the dialects (which, like their clients, do not insist on a
/// `Content-Type`); an empty body is an empty object. `limit` is the route's body limit (for
/// the 413's message).
pub(super) fn body_object(
    limit: usize,
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<serde_json::Map<String, serde_json::Value>, ApiError> {
    read_object(limit, body, false)
}

/// As `body_object`, for routes whose schema requires a body (A1111's, like FastAPI's, answers
/// an empty one with an error): an empty body is an error, `{}` takes every default.
pub(super) fn required_body_object(
    limit: usize,
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<serde_json::Map<String, serde_json::Value>, ApiError> {
    read_object(limit, body, true)
}

fn read_object(
    limit: usize,
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
    required: bool,
) -> Result<serde_json::Map<String, serde_json::Value>, ApiError> {
    let body = body.map_err(|rej| {
        if rej.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge(limit)
        } else {
            ApiError::InvalidJson(rej.body_text())
        }
    })?;
    if body.iter().all(u8::is_ascii_whitespace) {
        if required {
            return Err(ApiError::InvalidJson(
                "the body is empty: send a JSON object ({} takes every default)".into(),
            ));
        }
        return Ok(serde_json::Map::new());
    }
    match serde_json::from_slice(&body) {
        Ok(serde_json::Value::Object(map)) => Ok(map),
        Ok(_) => Err(ApiError::InvalidJson(
            "the body must be a JSON object".into(),
        )),
        Err(e) => Err(ApiError::InvalidJson(e.to_string())),
    }
}

/// A boolean query parameter as FastAPI (pydantic) reads one: `true/false`, `1/0`, `yes/no`,
/// `on/off`, `t/f`, `y/n` in any case; given twice, the last wins; anything else is a 422
/// naming it. `None` when absent.
pub(super) fn query_bool(query: Option<&str>, name: &str) -> Result<Option<bool>, ApiError> {
    let Some(value) = form_urlencoded::parse(query.unwrap_or("").as_bytes())
        .filter(|(k, _)| k == name)
        .map(|(_, v)| v.to_ascii_lowercase())
        .last()
    else {
        return Ok(None);
    };
    match value.as_str() {
        "true" | "1" | "yes" | "on" | "t" | "y" => Ok(Some(true)),
        "false" | "0" | "no" | "off" | "f" | "n" => Ok(Some(false)),
        _ => Err(ApiError::validation(
            name,
            "must be a boolean (true or false)",
        )),
    }
}

/// Renames the fields of a validation error from native names to a dialect's (`(native,
/// dialect)` pairs), so the error names what the client sent.
/// The job's churn (`sigma_tmax` 0: no bound) and negative guidance, as the native fields.
fn sampler_params_json(
    p: &sdserve_pipeline::pipeline::GenerationParams,
) -> serde_json::Map<String, serde_json::Value> {
    let (c, g) = (p.churn, p.negative_guidance);
    serde_json::json!({
        "sigma_churn": c.churn,
        "sigma_tmin": c.tmin,
        "sigma_tmax": if c.tmax.is_finite() { c.tmax } else { 0.0 },
        "sigma_noise": c.noise,
        "negative_guidance_min_sigma": g.min_sigma,
        "negative_guidance_all_steps": g.all_steps,
        "negative_guidance_skip_early": g.skip_early,
    })
    .as_object()
    .cloned()
    .unwrap_or_default()
}

pub(super) fn rename_fields(e: ApiError, names: &[(&str, &str)]) -> ApiError {
    match e {
        ApiError::Validation(mut fields) => {
            for f in &mut fields {
                if let Some((_, theirs)) = names.iter().find(|(ours, _)| *ours == f.field) {
                    f.field = theirs.to_string();
                }
            }
            // `width` and `height` may both become `size`: name it once.
            fields.dedup_by(|a, b| a.field == b.field && a.rule == b.rule);
            ApiError::Validation(fields)
        }
        other => other,
    }
}

pub fn random_seed() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish() as u32
}

/// Runs request validation on tokio's blocking pool: it decodes and resizes request images
/// (`init_image`, `mask_image`), up to a CPU-second for a large one, which on the runtime's
/// own threads would stall every other connection meanwhile.
pub(crate) async fn off_the_runtime<T, E>(
    work: impl FnOnce() -> Result<T, E> + Send + 'static,
) -> Result<T, E>
where
    T: Send + 'static,
    E: From<ApiError> + Send + 'static,
{
    match tokio::task::spawn_blocking(work).await {
        Ok(done) => done,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => Err(ApiError::Internal(format!("request validation did not run: {e}")).into()),
    }
}

/// The body of `/generate` and `POST /jobs`, through the one validation place (off the
/// runtime's threads: it may decode images).
pub(crate) async fn read_generate_body(
    app: &AppState,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<ValidRequest, ApiError> {
    let body = body.map_err(|rej| {
        if rej.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge(app.max_body_bytes)
        } else {
            ApiError::InvalidJson(rej.body_text())
        }
    })?;
    validate::check_content_type(
        headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok()),
    )?;
    let styles = app.styles.clone();
    off_the_runtime(move || validate_styled(&styles, &body)).await
}

/// A native body through the one validation place, with `styles`' texts applied to its
/// prompts first (`/generate`, `POST /jobs`, `sdserve generate`). Blocking: it may decode
/// images.
pub(crate) fn validate_styled(
    styles: &crate::styles::StyleBook,
    body: &[u8],
) -> Result<ValidRequest, ApiError> {
    let mut map = validate::parse_object(body)?;
    let written = crate::styles::AsWritten::read(&map);
    let styled = styles.apply(&mut map, crate::styles::Dialect::Native);
    let (mut valid, as_written) =
        crate::styles::with_styles(styled, written, validate::validate_object(&map))?;
    valid.as_written = as_written;
    Ok(valid)
}

/// The job for a validated request: seed and scheduler resolved, `request` the request as run;
/// `vae` as [`super::resolve::named_vae`] resolved it.
pub(crate) fn job_spec(
    req: ValidRequest,
    vae: Option<crate::vaes::VaeUse>,
    info: &ModelInfo,
    timeout: std::time::Duration,
    timeout_setting: crate::error::DeadlineSetting,
) -> Result<JobSpec, ApiError> {
    validate::check_loras(&req, &info.adapters)?;
    // A tag may name a LoRA by its alias (A1111): the job runs the file's name.
    let mut req = req;
    for (name, _) in &mut req.loras {
        if let Some(l) = info.adapters.lora(name) {
            name.clone_from(&l.name);
        }
    }
    validate::check_limits(&req, info.limits.as_ref())?;
    let (scheduler, schedule) =
        req.resolve_schedule((info.default_scheduler, info.default_schedule))?;
    let params = req.generation_params(
        u64::from(req.seed.unwrap_or_else(random_seed)),
        scheduler,
        schedule,
    );
    // AND parts on a distilled model, scheduled texts over the model's own step count: a 422
    // now, not a failed job.
    let hires_prompt_field = req.hires.as_ref().map_or("hr_prompt", |h| h.prompt_field);
    validate::check_prompts_for_model(&params, hires_prompt_field, info)?;
    validate::check_memory(&params, info.memory.as_deref())?;
    let progress_total = progress_total(&params, info)?;
    // Images by digest and size: the job's record stays small and says which image it ran.
    let image = |i: &crate::images::RequestImage| {
        serde_json::json!({
            "sha256": crate::images::digest(&i.image),
            "width": i.image.width,
            "height": i.image.height,
        })
    };
    let mut request = serde_json::json!({
        "prompt": params.prompt,
        "negative_prompt": params.negative_prompt,
        "steps": params.steps,
        "width": params.width,
        "height": params.height,
        "seed": params.seed,
        "guidance_scale": params.guidance_scale,
        "guidance_rule": params.guidance_rule.name(),
        "eta": params.eta,
        "scheduler": scheduler.name(),
        "schedule": schedule.name(),
        "prompt_syntax": prompt_syntax_name(params.prompt_syntax),
        "clip_skip": params.clip_skip,
        "loras": loras_json(&req.loras),
        "batch_size": params.batch_size,
        "init_image": req.init_image.as_ref().map(image),
        "mask_image": req.mask_image.as_ref().map(image),
        "resize_mode": crate::validate::resize_mode::name(params.resize_mode),
        "strength": params.init_image.as_ref().map(|i| i.strength),
        "step_rule": params.step_rule.name(),
        "noise_multiplier": params.noise_multiplier,
        "extra_noise": params.extra_noise,
        "model": req.model,
        "vae": vae.as_ref().map(|v| &v.name),
        "hires": req.hires.as_ref().map(|h| serde_json::json!({
            "width": h.params.width,
            "height": h.params.height,
            "scale": h.scale,
            "upscaler": h.upscaler_name,
            "steps": h.params.steps,
            "strength": h.params.strength,
            "scheduler": h.params.scheduler.map(|k| k.name()),
            "schedule": h.params.schedule.map(|s| s.name()),
            "prompt": h.params.prompt,
            "negative_prompt": h.params.negative_prompt,
        })),
        "tiling": params.tiling,
        "restore_faces": req.restore_faces.map(|weight| serde_json::json!({"weight": weight})),
        "variation_seed": params.variation.map(|v| v.seed),
        "variation_strength": params.variation.map_or(0.0, |v| v.strength),
        "seed_resize_from_width": params.seed_resize_from.map(|r| r.width),
        "seed_resize_from_height": params.seed_resize_from.map(|r| r.height),
        "inpaint": params.a1111_inpaint.as_ref().map(|o| {
            let m = crate::api::InpaintMetadata::of(o);
            serde_json::json!({
                "mask_blur_x": m.mask_blur_x,
                "mask_blur_y": m.mask_blur_y,
                "mask_invert": m.mask_invert,
                "masked_content": m.masked_content,
                "area": m.area,
                "padding": m.padding,
            })
        }),
        // `prompt` and `negative_prompt` above have the styles' texts in them.
        "styles": req.as_written.as_ref().map_or(&[][..], |w| &w.styles[..]),
        "as_written": req.as_written.as_ref().map(|w| {
            let mut written = serde_json::json!({
                "prompt": w.prompt,
                "negative_prompt": w.negative_prompt,
                // Those of `loras` the `loras` field listed: the prompt's tags (its own and
                // the styles') come back with the prompt and the styles.
                "loras": loras_json(&req.loras[..req.loras_listed]),
            });
            // Only when the hires pass has prompts of its own (they were styled too).
            if w.hires_prompt.is_some() || w.hires_negative_prompt.is_some() {
                written["hires"] = serde_json::json!({
                    "prompt": w.hires_prompt,
                    "negative_prompt": w.hires_negative_prompt,
                });
            }
            written
        }),
    });
    if let Some(o) = request.as_object_mut() {
        o.extend(sampler_params_json(&params));
    }
    let skips = crate::validate::sampler_params::skips(&params, info.schedules.as_deref());
    let mut png_texts = crate::png::batch_texts(&params, &info.model_version, vae.as_ref(), skips);
    if let Some(h) = &req.hires {
        for text in &mut png_texts {
            text.push_str(&h.infotext_suffix());
        }
    }
    Ok(JobSpec {
        png_texts,
        progress_total,
        params,
        request,
        model_version: info.model_version.clone(),
        model: req.model.clone(),
        vae,
        timeout_setting,
        timeout,
    })
}

/// `[{name, weight}]`, the record's LoRAs.
fn loras_json(loras: &[(String, f64)]) -> serde_json::Value {
    loras
        .iter()
        .map(|(name, weight)| serde_json::json!({"name": name, "weight": weight}))
        .collect()
}

/// The UNet evaluations the job will count, from the model's scheduler config; a request
/// its scheduler refuses (an LCM model's `original_inference_steps` below the steps, ...) is
/// the 422 the run would end with, before it is queued. Without the config: steps (+ hires).
fn progress_total(params: &GenerationParams, info: &ModelInfo) -> Result<usize, ApiError> {
    let fallback = params.steps + params.hires_steps();
    let Some(schedules) = &info.schedules else {
        return Ok(fallback);
    };
    match schedules.unet_evaluations(params) {
        Ok(n) => Ok(n),
        Err(sdserve_pipeline::PipelineError::InvalidRequest(m)) => {
            Err(ApiError::validation("request", m))
        }
        Err(e) => {
            tracing::debug!(error = %e, "could not count the job's UNet evaluations ahead");
            Ok(fallback)
        }
    }
}

pub(crate) fn prompt_syntax_name(s: PromptSyntax) -> &'static str {
    match s {
        PromptSyntax::A1111 => "a1111",
        PromptSyntax::Plain => "plain",
    }
}
