//! `step_rule`: which steps an init image's strength, and the hires pass's, runs (the
//! pipeline's `StepRule`: diffusers' or A1111 1.10's), and the strength rule each one has.

use sdserve_pipeline::pipeline::StepRule;

/// The field's values, for `FieldReader::choice`.
pub(super) const CHOICES: [(&str, StepRule); 3] = [
    ("diffusers", StepRule::Diffusers),
    ("a1111", StepRule::A1111),
    ("a1111_fix_steps", StepRule::A1111FixSteps),
];

/// The rule a pass of `steps` at `strength` breaks under `rule` (for the hires pass: the rule
/// its request's rule gives it, `StepRule::for_hires`), with the fields named as the request
/// names them; `None` when steps run. diffusers: `int(steps * strength)` must be at least 1;
/// A1111's stretched schedule (`int(steps / strength)` steps) needs a strength above 0; A1111's
/// img2img always runs one step at least.
pub fn strength_rule(
    rule: StepRule,
    (steps_name, steps): (&str, usize),
    (strength_name, strength): (&str, f64),
) -> Option<String> {
    match rule {
        StepRule::Diffusers => ((steps as f64 * strength) < 1.0).then(|| {
            format!(
                "int({steps_name} * {strength_name}) must be at least 1 ({steps_name} {steps}, \
                 {strength_name} {strength})"
            )
        }),
        StepRule::A1111 => None,
        StepRule::A1111FixSteps => (strength <= 0.0).then(|| {
            format!(
                "must be above 0: A1111's rule runs {steps_name} ({steps}) steps of a schedule \
                 stretched to int({steps_name} / {strength_name})"
            )
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choices_are_the_pipeline_s_names() {
        for (name, rule) in CHOICES {
            assert_eq!(rule.name(), name);
        }
    }

    #[test]
    fn each_rule_has_its_strength_rule() {
        let check =
            |rule, steps, strength| strength_rule(rule, ("steps", steps), ("strength", strength));
        assert!(check(StepRule::Diffusers, 3, 0.3)
            .unwrap()
            .contains("at least 1"));
        assert_eq!(check(StepRule::Diffusers, 4, 0.25), None);
        // A1111's img2img runs int(min(strength, 0.999) * steps) + 1 >= 1 steps.
        assert_eq!(check(StepRule::A1111, 3, 0.0), None);
        assert!(check(StepRule::A1111FixSteps, 3, 0.0)
            .unwrap()
            .contains("above 0"));
        assert_eq!(check(StepRule::A1111FixSteps, 3, 0.01), None);
    }
}
