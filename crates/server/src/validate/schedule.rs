//! Limits on A1111's prompt scheduling and AND (composable diffusion), which A1111 itself does
//! not cap: every AND part is one more UNet batch row per image at every step, and every
//! distinct text of a schedule one more text-encoder pass.

use sdserve_pipeline::prompt_schedule::{and_parts, PromptPlan};
use sdserve_pipeline::schedulers::SchedulerKind;

/// AND parts of one prompt: composable prompts in use have 2-4; 8 parts cost a step what a batch
/// of 4.5 guided images costs (9 UNet rows per image with the negative prompt).
pub const AND_PARTS_MAX: usize = 8;
/// Distinct texts a pass encodes for its prompt and negative prompt: alternations of 2-4
/// options and a handful of edits make well under this; each is one text-encoder pass per 75
/// tokens.
pub const SCHEDULE_TEXTS_MAX: usize = 32;

/// The broken rules of a prompt read with A1111's syntax, as `(field, rule)`: too many AND parts,
/// an AND weight past float32, too many distinct texts over `steps` (A1111's count is the steps
/// times the sampler's evaluations per step; without a scheduler the largest, 2, is assumed).
pub fn schedule_rules(
    prompt: &str,
    negative_prompt: &str,
    steps: usize,
    scheduler: Option<SchedulerKind>,
) -> Vec<(&'static str, String)> {
    let mut broken = Vec::new();
    let parts = and_parts(prompt);
    if parts.len() > AND_PARTS_MAX {
        broken.push((
            "prompt",
            format!(
                "at most {AND_PARTS_MAX} AND parts (got {}): each is one more UNet batch row per image at every step",
                parts.len()
            ),
        ));
        return broken;
    }
    if let Some(p) = parts.iter().find(|p| !(p.weight as f32).is_finite()) {
        broken.push((
            "prompt",
            format!(
                "an AND part's weight must stay a finite float32 number (got {:e})",
                p.weight
            ),
        ));
    }
    let per_step = scheduler.map_or(2, |k| k.sampler().evaluations_per_step());
    let plan = PromptPlan::new(prompt, Some(negative_prompt), steps * per_step, None);
    if plan.texts.len() > SCHEDULE_TEXTS_MAX {
        broken.push((
            "prompt",
            format!(
                "prompt editing and alternation make {} distinct texts over {} steps, at most {SCHEDULE_TEXTS_MAX} (with the negative prompt's)",
                plan.texts.len(),
                steps
            ),
        ));
    }
    broken
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_and_weights() {
        assert!(schedule_rules("a AND b :0.5", "[x:y:3]", 20, None).is_empty());
        let many = ["a"; AND_PARTS_MAX + 1].join(" AND ");
        assert!(schedule_rules(&many, "", 20, None)[0]
            .1
            .contains("at most 8 AND parts"));
        let huge = format!("a AND b :{}", "9".repeat(40));
        assert!(schedule_rules(&huge, "", 20, None)[0]
            .1
            .contains("finite float32"));
        // 6 distinct alternations over 50 steps: fine; 4 x 9 alternations (36 texts and the
        // negative prompt): not,
        // though over 20 Euler steps they make only 20.
        assert!(schedule_rules("[a|b|c] [d|e]", "", 50, None).is_empty());
        let many_texts = "[a|b|c|d] [e|f|g|h|i|j|k|l|m]";
        let rules = schedule_rules(many_texts, "", 50, Some(SchedulerKind::Euler));
        assert!(rules[0].1.contains("37 distinct texts"), "{rules:?}"); // with the negative prompt
        assert!(schedule_rules(many_texts, "", 20, Some(SchedulerKind::Euler)).is_empty());
    }
}
