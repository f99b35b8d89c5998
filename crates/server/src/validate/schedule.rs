//! Limits on A1111's prompt scheduling and AND (composable diffusion), which A1111 itself does
//! not cap: every AND part is one more UNet batch row per image at every step, and every
//! distinct text of a schedule one more text-encoder pass.

use sdserve_pipeline::pipeline::{GenerationParams, PromptSyntax};
use sdserve_pipeline::prompt_schedule::{and_parts, PromptPlan};

use crate::error::{ApiError, FieldError};
use crate::generator::ModelInfo;
#[cfg(test)]
use sdserve_pipeline::schedulers::SchedulerKind;

/// AND parts of one prompt: composable prompts in use have 2-4; 8 parts cost a step what a batch
/// of 4.5 guided images costs (9 UNet rows per image with the negative prompt).
pub const AND_PARTS_MAX: usize = 8;
/// Distinct texts a pass encodes for its prompt and negative prompt: alternations of 2-4
/// options and a handful of edits make well under this; each is one text-encoder pass per 75
/// tokens.
pub const SCHEDULE_TEXTS_MAX: usize = 32;

/// The broken rules of a prompt's AND parts read with A1111's syntax: too many parts, a weight
/// past float32. (Its scheduled texts depend on the model's scheduler: [`check_prompts_for_model`].)
pub fn and_rules(prompt: &str) -> Vec<String> {
    let parts = and_parts(prompt);
    if parts.len() > AND_PARTS_MAX {
        return vec![format!(
            "at most {AND_PARTS_MAX} AND parts (got {}): each is one more UNet batch row per image at every step",
            parts.len()
        )];
    }
    parts
        .iter()
        .find(|p| !(p.weight as f32).is_finite())
        .map(|p| {
            format!(
                "an AND part's weight must stay a finite float32 number (got {:e})",
                p.weight
            )
        })
        .into_iter()
        .collect()
}

/// The prompt rules that depend on the model, for each pass (the hires pass's prompt is
/// `hires_prompt_field` when it has its own): a guidance-distilled (LCM) model runs no AND parts
/// (they combine guided predictions; it makes none), and a pass's prompt schedule has at most
/// [`SCHEDULE_TEXTS_MAX`] distinct texts over the steps A1111 counts for it: the steps times the
/// evaluations per step of the scheduler that runs it (the model's own when none is named), as
/// the model's `ModelSchedules` counts them.
pub fn check_prompts_for_model(
    params: &GenerationParams,
    hires_prompt_field: &str,
    info: &ModelInfo,
) -> Result<(), ApiError> {
    if params.prompt_syntax != PromptSyntax::A1111 {
        return Ok(());
    }
    let (first_steps, hires_steps) = prompt_steps(params, info);
    // (field, prompt, negative prompt, steps, hires steps) of each pass's prompt schedule.
    let mut passes = vec![(
        "prompt",
        params.prompt.as_str(),
        params.negative_prompt.as_str(),
        first_steps,
        None,
    )];
    if let (Some(h), Some(hires_steps)) = (&params.hires, hires_steps) {
        passes.push((
            if h.prompt.is_some() {
                hires_prompt_field
            } else {
                "prompt"
            },
            h.prompt.as_deref().unwrap_or(&params.prompt),
            h.negative_prompt
                .as_deref()
                .unwrap_or(&params.negative_prompt),
            first_steps,
            Some(hires_steps),
        ));
    }
    let mut broken: Vec<FieldError> = Vec::new();
    for (field, prompt, negative, steps, hires) in passes {
        let mut rules = Vec::new();
        if info.guidance_distilled && PromptPlan::new(prompt, None, steps, hires).composed() {
            rules.push(
                "AND parts and AND weights combine classifier-free guidance predictions; the \
                 loaded model is guidance-distilled (LCM) and makes none"
                    .to_string(),
            );
        }
        let texts = PromptPlan::new(prompt, Some(negative), steps, hires)
            .texts
            .len();
        if texts > SCHEDULE_TEXTS_MAX {
            let span = hires.map_or(steps, |h| steps + h);
            rules.push(format!(
                "prompt editing and alternation make {texts} distinct texts over the {span} \
                 sampler steps they are scheduled on, at most {SCHEDULE_TEXTS_MAX} (with the \
                 negative prompt's)"
            ));
        }
        for rule in rules {
            if !broken.iter().any(|e| e.field == field && e.rule == rule) {
                broken.push(FieldError {
                    field: field.to_string(),
                    rule,
                });
            }
        }
    }
    match broken.is_empty() {
        true => Ok(()),
        false => Err(ApiError::Validation(broken)),
    }
}

/// The steps each pass's prompt schedule spans: the model's `ModelSchedules` count; where it is
/// not known here (an API replica, the fake generator) or refuses the request (the run will say
/// why), the resolved schedulers' evaluations per step, which that count equals.
fn prompt_steps(params: &GenerationParams, info: &ModelInfo) -> (usize, Option<usize>) {
    if let Some(Ok(steps)) = info.schedules.as_ref().map(|s| s.prompt_steps(params)) {
        return steps;
    }
    let per_step = |kind: Option<sdserve_pipeline::schedulers::SchedulerKind>| {
        kind.unwrap_or(info.default_scheduler)
            .sampler()
            .evaluations_per_step()
    };
    let first = params.steps * per_step(params.scheduler);
    let hires = params
        .hires
        .as_ref()
        .map(|h| h.steps * per_step(h.scheduler.or(params.scheduler)));
    (first, hires)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn and_caps_and_weights() {
        assert!(and_rules("a AND b :0.5").is_empty());
        let many = ["a"; AND_PARTS_MAX + 1].join(" AND ");
        assert!(and_rules(&many)[0].contains("at most 8 AND parts"));
        let huge = format!("a AND b :{}", "9".repeat(40));
        assert!(and_rules(&huge)[0].contains("finite float32"));
    }

    /// `model`'s info with its real scheduler config (`ModelSchedules`) and nothing else.
    fn info(model: &str, guidance_distilled: bool) -> ModelInfo {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../pipeline/tests/fixtures")
            .join(model);
        let cfg = sdserve_pipeline::error::read_json(&dir.join("scheduler/scheduler_config.json"))
            .unwrap();
        let schedules = sdserve_pipeline::pipeline::ModelSchedules::from_config(cfg).unwrap();
        ModelInfo {
            model_version: model.into(),
            default_scheduler: schedules.default_scheduler(),
            default_schedule: schedules.default_schedule(),
            adapters: Default::default(),
            guidance_distilled,
            memory: None,
            schedules: Some(std::sync::Arc::new(schedules)),
            limits: None,
        }
    }

    fn params(prompt: &str, steps: usize, scheduler: Option<SchedulerKind>) -> GenerationParams {
        GenerationParams {
            prompt: prompt.into(),
            steps,
            scheduler,
            prompt_syntax: PromptSyntax::A1111,
            ..Default::default()
        }
    }

    fn fields(r: Result<(), ApiError>) -> Vec<(String, String)> {
        match r {
            Ok(()) => vec![],
            Err(ApiError::Validation(e)) => e.into_iter().map(|e| (e.field, e.rule)).collect(),
            Err(e) => panic!("{e:?}"),
        }
    }

    #[test]
    fn scheduled_texts_are_counted_with_the_model_s_scheduler() {
        // 4 x 9 alternations: a new text at each of 36 evaluations (and the negative prompt's).
        let many_texts = "[a|b|c|d] [e|f|g|h|i|j|k|l|m]";
        let pndm = info("tiny-a", false);
        // The model's own PNDM counts one evaluation per step: 18 texts and the negative.
        assert!(fields(check_prompts_for_model(
            &params(many_texts, 18, None),
            "hr_prompt",
            &pndm
        ))
        .is_empty());
        let heun = params(many_texts, 18, Some(SchedulerKind::Heun));
        let broken = fields(check_prompts_for_model(&heun, "hr_prompt", &pndm));
        assert_eq!(broken.len(), 1, "{broken:?}");
        assert_eq!(broken[0].0, "prompt");
        assert!(
            broken[0]
                .1
                .contains("37 distinct texts over the 36 sampler steps"),
            "{broken:?}"
        );
        // Without the model's schedules (an API replica): the resolved scheduler's count.
        let mut replica = pndm.clone();
        replica.schedules = None;
        assert!(fields(check_prompts_for_model(
            &params(many_texts, 18, None),
            "hr_prompt",
            &replica
        ))
        .is_empty());
        assert_eq!(
            fields(check_prompts_for_model(&heun, "hr_prompt", &replica)),
            broken
        );
        // The plain syntax schedules nothing.
        let mut plain = heun.clone();
        plain.prompt_syntax = PromptSyntax::Plain;
        assert!(fields(check_prompts_for_model(&plain, "hr_prompt", &pndm)).is_empty());
    }

    #[test]
    fn a_distilled_model_refuses_and_parts_in_either_pass() {
        let lcm = info("tiny-lcm", true);
        for prompt in ["a AND b", "a :0.5"] {
            let broken = fields(check_prompts_for_model(
                &params(prompt, 4, None),
                "hr_prompt",
                &lcm,
            ));
            assert_eq!(broken.len(), 1, "{prompt}: {broken:?}");
            assert_eq!(broken[0].0, "prompt");
            assert!(
                broken[0].1.contains("guidance-distilled (LCM)"),
                "{broken:?}"
            );
        }
        // Weighted text without AND is emphasis, not a part; and a model that guides is fine.
        assert!(fields(check_prompts_for_model(
            &params("(a:1.2) b", 4, None),
            "hr_prompt",
            &lcm
        ))
        .is_empty());
        assert!(fields(check_prompts_for_model(
            &params("a AND b", 4, None),
            "hr_prompt",
            &info("tiny-a", false)
        ))
        .is_empty());
        // The hires pass's own prompt names its field.
        let mut hires = params("a cat", 4, None);
        hires.hires = Some(sdserve_pipeline::pipeline::Hires {
            width: 64,
            height: 64,
            upscale_width: 64,
            upscale_height: 64,
            upscaler: sdserve_pipeline::pipeline::Upscaler::Lanczos,
            steps: 2,
            strength: 0.5,
            scheduler: None,
            schedule: None,
            prompt: Some("a cat AND a dog".into()),
            negative_prompt: None,
        });
        let broken = fields(check_prompts_for_model(&hires, "hires.prompt", &lcm));
        assert_eq!(broken.len(), 1, "{broken:?}");
        assert_eq!(broken[0].0, "hires.prompt");
    }
}
