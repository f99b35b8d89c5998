//! The rules that depend on the loaded model: the device memory budget, the LoRAs it has, and
//! what its configs allow (clip skip, sizes).

use sdserve_pipeline::pipeline::{GenerationParams, ModelLimits};

use super::ValidRequest;
use crate::error::{ApiError, FieldError};

/// Refuses a request whose images cannot fit the device memory budget under any memory plan
/// (estimated; a large batch at a large size on a small budget), before it is queued: a 422
/// rather than a 503, since the same request would never fit later either, and naming
/// `batch_size` with the largest that fits (or `width`/`height` when not even one image does).
pub fn check_memory(
    params: &GenerationParams,
    budget: Option<&crate::gpu::MemoryBudget>,
) -> Result<(), ApiError> {
    let Some(budget) = budget else {
        return Ok(());
    };
    // The hires pass runs at its own, larger size: that one must fit.
    let (w, h) = params.output_size();
    let n = params.batch_size;
    // AND parts are UNet rows too: one per part and one for the negative prompt, guided or not.
    let rows_as_batch = params.guided_batch_equivalent();
    let guided = params.any_pass_runs_negative_prompt() || params.composed_parts().is_some();
    let controlnets = crate::gpu::controlnet_load(params, budget.request.dtype);
    match budget.check(w, h, rows_as_batch, guided, controlnets) {
        Ok(()) => Ok(()),
        Err(over) if rows_as_batch != n => {
            let parts = params.composed_parts().unwrap_or(1);
            Err(ApiError::Validation(
                ["prompt", "batch_size"]
                    .iter()
                    .map(|f| FieldError {
                        field: f.to_string(),
                        rule: format!(
                            "its {parts} AND parts run {} UNet rows per image at every step, \
                             what a batch of {rows_as_batch} guided images runs: {}",
                            parts + 1,
                            over.describe(w, h, rows_as_batch)
                        ),
                    })
                    .collect(),
            ))
        }
        Err(over) => {
            let mut rule = over.describe(w, h, n);
            if controlnets.units > 0 {
                rule.push_str(&format!(
                    " (counting its {} ControlNet unit(s): {} MiB of weights on the device, \
                     and their residuals)",
                    controlnets.units,
                    (controlnets.params * budget.request.dtype.size_in_bytes() as u64)
                        .div_ceil(1 << 20)
                ));
            }
            let images = controlnets.image_prompts.params;
            if images > 0 {
                rule.push_str(&format!(
                    " (counting its IP-Adapters' image encoder and adapter: {} MiB on the \
                     device while their images are encoded)",
                    (images * budget.request.dtype.size_in_bytes() as u64).div_ceil(1 << 20)
                ));
            }
            let fields: &[&str] = if over.largest_batch_size > 0 {
                &["batch_size"]
            } else {
                &["width", "height"]
            };
            Err(ApiError::Validation(
                fields
                    .iter()
                    .map(|f| FieldError {
                        field: f.to_string(),
                        rule: rule.clone(),
                    })
                    .collect(),
            ))
        }
    }
}

/// The LoRAs a request names must be among the loaded model's, and fit it (`GET /loras`).
pub fn check_loras(
    req: &ValidRequest,
    adapters: &crate::adapters::Adapters,
) -> Result<(), ApiError> {
    match req.loras.iter().find_map(|(n, _)| adapters.lora_problem(n)) {
        Some(problem) => Err(ApiError::validation("loras", problem)),
        None => Ok(()),
    }
}

/// What the model's configs allow (`ModelLimits`; `None`: not known here, the run checks): a
/// clip skip within its text encoder (A1111 and diffusers index `hidden_states`, the embeddings
/// and each layer's output: at most layers + 1), and image sides, the hires pass's too, in
/// whole latent cells of its VAE (and multiples of 8, as diffusers asks). The run refuses
/// the same; here it is a 422 naming the field before the job is queued.
pub fn check_limits(req: &ValidRequest, limits: Option<&ModelLimits>) -> Result<(), ApiError> {
    let Some(l) = limits else {
        return Ok(());
    };
    let mut broken = Vec::new();
    let mut fail = |field: &str, rule: String| {
        broken.push(FieldError {
            field: field.to_string(),
            rule,
        })
    };
    if req.clip_skip > l.clip_skip_max() {
        fail(
            "clip_skip",
            format!(
                "at most {} for this model: its text encoder has {} layers (1 is the last \
                 layer's output, {} the embeddings under them), got {}",
                l.clip_skip_max(),
                l.text_encoder_layers,
                l.clip_skip_max(),
                req.clip_skip
            ),
        );
    }
    let m = l.size_multiple();
    let vae = format!(
        "must be a multiple of {m} for this model (its VAE's downscale factor is {})",
        l.vae_scale_factor
    );
    for (field, side) in [("width", req.width), ("height", req.height)] {
        if side % m != 0 {
            fail(field, format!("{vae}, got {side}"));
        }
    }
    if let Some(h) = &req.hires {
        let p = &h.params;
        // The upscale may be any size (A1111's: the VAE encoder floors it to whole cells).
        if [p.width, p.height].iter().any(|s| s % m != 0) {
            for field in h.size_fields {
                fail(
                    field,
                    format!(
                        "the hires pass's size {}x{} (upscaled to {}x{} first) {vae}",
                        p.width, p.height, p.upscale_width, p.upscale_height
                    ),
                );
            }
        }
    }
    if broken.is_empty() {
        Ok(())
    } else {
        Err(ApiError::Validation(broken))
    }
}
