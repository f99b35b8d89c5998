//! The rules that depend on the loaded model: inpainting models, the device memory budget, and
//! the LoRAs it has.

use sdserve_pipeline::pipeline::GenerationParams;

use super::ValidRequest;
use crate::error::{ApiError, FieldError};

/// The rule that depends on the loaded model: an inpainting model (9-channel UNet) runs only
/// requests with an init image and a mask.
pub fn check_for_model(req: &ValidRequest, inpainting_model: bool) -> Result<(), ApiError> {
    if inpainting_model && req.mask_image.is_none() {
        return Err(ApiError::validation(
            "mask_image",
            "is required: the loaded model is an inpainting model (its UNet takes the mask), \
             it needs init_image and mask_image",
        ));
    }
    Ok(())
}

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
    let guided = params.guidance_scale > 1.0 || params.composed_parts().is_some();
    match budget.check(w, h, rows_as_batch, guided) {
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
            let rule = over.describe(w, h, n);
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
