//! `sdserve generate`'s flags: the native request's fields, described from validation's rules.

use std::path::PathBuf;

use clap::Args;

use super::ModelArgs;

/// `sdserve generate`. The request flags follow the API's rules (checked by
/// `validate::parse_generate` before the model loads); their help is written by [`super::command`]
/// from the same constants.
#[derive(Debug, Clone, Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[arg(long)]
    pub prompt: String,
    #[arg(long)]
    pub negative_prompt: Option<String>,
    #[arg(long)]
    pub steps: Option<u64>,
    #[arg(long)]
    pub width: Option<u64>,
    #[arg(long)]
    pub height: Option<u64>,
    #[arg(long)]
    pub seed: Option<u64>,
    #[arg(long)]
    pub guidance_scale: Option<f64>,
    #[arg(long)]
    pub scheduler: Option<String>,
    #[arg(long)]
    pub schedule: Option<String>,
    #[arg(long)]
    pub batch_size: Option<u64>,
    #[arg(long)]
    pub init_image: Option<PathBuf>,
    #[arg(long)]
    pub strength: Option<f64>,
    #[arg(long = "mask")]
    pub mask_image: Option<PathBuf>,
    #[arg(long)]
    pub tiling: bool,
    /// The hires fix: any `--hires-*` flag asks for the second pass (the native `hires` object).
    #[command(flatten)]
    pub hires: HiresArgs,
    /// The PNG to write (a batch adds -1, -2, ... before the extension); checked before the
    /// model loads.
    #[arg(short, long, default_value = "out.png")]
    pub output: PathBuf,
}

/// `generate`'s hires fix flags: the keys of the native `hires` object, checked by the same
/// validation (errors name `hires.<key>`).
#[derive(Debug, Clone, Default, Args)]
pub struct HiresArgs {
    #[arg(long)]
    pub hires_width: Option<u64>,
    #[arg(long)]
    pub hires_height: Option<u64>,
    #[arg(long)]
    pub hires_scale: Option<f64>,
    #[arg(long)]
    pub hires_upscaler: Option<String>,
    #[arg(long)]
    pub hires_steps: Option<u64>,
    #[arg(long)]
    pub hires_strength: Option<f64>,
    #[arg(long)]
    pub hires_scheduler: Option<String>,
    #[arg(long)]
    pub hires_prompt: Option<String>,
    #[arg(long)]
    pub hires_negative_prompt: Option<String>,
}

/// The request flags of `generate`: (flag id, help), from the API's rules and defaults.
pub(super) fn request_flag_help() -> Vec<(&'static str, String)> {
    use crate::validate::*;
    let schedulers: Vec<&str> = sdserve_pipeline::schedulers::SchedulerKind::ALL
        .iter()
        .map(|k| k.name())
        .collect();
    vec![
        (
            "prompt",
            format!("What to draw: 1..={PROMPT_MAX_CHARS} characters after trimming"),
        ),
        (
            "negative_prompt",
            format!("What to keep out of the image: 0..={PROMPT_MAX_CHARS} characters [default: none]"),
        ),
        (
            "steps",
            format!("Denoising steps, {STEPS_MIN}..={STEPS_MAX}; time grows with them [default: {STEPS_DEFAULT}]"),
        ),
        (
            "width",
            format!("Image width in pixels, {SIZE_MIN}..={SIZE_MAX} and a multiple of {SIZE_MULTIPLE} [default: {SIZE_DEFAULT}]"),
        ),
        (
            "height",
            format!("Image height in pixels, {SIZE_MIN}..={SIZE_MAX} and a multiple of {SIZE_MULTIPLE} [default: {SIZE_DEFAULT}]"),
        ),
        (
            "seed",
            format!("0..={SEED_MAX}; the same seed and settings give the same image [default: random, printed]"),
        ),
        (
            "guidance_scale",
            format!("How closely to follow the prompt, {GUIDANCE_MIN}..={GUIDANCE_MAX}; at or below 1 guidance is off [default: {GUIDANCE_DEFAULT}]"),
        ),
        (
            "scheduler",
            format!("One of {} [default: the model's own]", schedulers.join(", ")),
        ),
        (
            "schedule",
            format!(
                "Sigma schedule: default, {}; not every scheduler has every one [default: the scheduler's own, or the model's]",
                sdserve_pipeline::schedulers::SigmaSchedule::ALL.map(|s| s.name()).join(", ")
            ),
        ),
        (
            "batch_size",
            format!("Images made at once, {BATCH_MIN}..={BATCH_MAX}; image i uses seed + i and is written to out-i.png [default: 1]"),
        ),
        (
            "init_image",
            "img2img: a PNG, JPEG or WebP file to start from; width and height default to its size [default: none]".to_string(),
        ),
        (
            "strength",
            format!("With --init-image: how much to change it, 0..=1; int(steps * strength) steps run [default: {STRENGTH_DEFAULT}]"),
        ),
        (
            "mask_image",
            "Inpainting, with --init-image: a mask of the same size, white = repaint, black = keep [default: none]".to_string(),
        ),
        (
            "tiling",
            "Seamless texture: the image continues across its edges (A1111's tiling: circular padding in every convolution)".to_string(),
        ),
        (
            "hires_width",
            format!("Hires fix (text-to-image): a second pass at this width, with --hires-height; {SIZE_MIN}..={SIZE_MAX}, a multiple of {SIZE_MULTIPLE} [default: no second pass]"),
        ),
        (
            "hires_height",
            format!("Hires fix: the second pass's height, with --hires-width; {SIZE_MIN}..={SIZE_MAX}, a multiple of {SIZE_MULTIPLE}"),
        ),
        (
            "hires_scale",
            format!("Hires fix: instead of --hires-width/--hires-height, both sides times this; it must land on a multiple of {SIZE_MULTIPLE} in {SIZE_MIN}..={SIZE_MAX} exactly"),
        ),
        (
            "hires_upscaler",
            format!("Hires fix: how the first image is enlarged, one of {} [default: {}]", hires::upscalers().map(|(n, _)| n).collect::<Vec<_>>().join(", "), hires::UPSCALER_DEFAULT),
        ),
        (
            "hires_steps",
            format!("Hires fix: the second pass's schedule, 0..={STEPS_MAX}; 0: --steps [default: 0]"),
        ),
        (
            "hires_strength",
            format!("Hires fix: how much of the second pass's schedule runs, 0..=1 [default: {}]", hires::DENOISING_DEFAULT),
        ),
        (
            "hires_scheduler",
            format!("Hires fix: the second pass's own scheduler, one of {} [default: --scheduler's]", schedulers.join(", ")),
        ),
        (
            "hires_prompt",
            format!("Hires fix: the second pass's own prompt, 0..={PROMPT_MAX_CHARS} characters [default: --prompt]"),
        ),
        (
            "hires_negative_prompt",
            format!("Hires fix: the second pass's own negative prompt, 0..={PROMPT_MAX_CHARS} characters [default: --negative-prompt]"),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::command;

    #[test]
    fn generate_help_states_every_rule_and_default() {
        use crate::validate::*;
        let mut cmd = command();
        let help = cmd
            .find_subcommand_mut("generate")
            .unwrap()
            .render_long_help()
            .to_string();
        for want in [
            format!("1..={PROMPT_MAX_CHARS} characters"),
            format!("{STEPS_MIN}..={STEPS_MAX}"),
            format!("[default: {STEPS_DEFAULT}]"),
            format!("{SIZE_MIN}..={SIZE_MAX} and a multiple of {SIZE_MULTIPLE} [default: {SIZE_DEFAULT}]"),
            format!("{GUIDANCE_MIN}..={GUIDANCE_MAX}"),
            format!("[default: {GUIDANCE_DEFAULT}]"),
            format!("0..={SEED_MAX}"),
            "dpmpp_2m_karras".to_string(),
            "[default: out.png]".to_string(),
        ] {
            assert!(help.contains(&want), "{want:?} missing from:\n{help}");
        }
        // Every request flag has a description.
        let generate = cmd.find_subcommand("generate").unwrap();
        for (id, _) in request_flag_help() {
            let arg = generate.get_arguments().find(|a| a.get_id() == id);
            assert!(arg.is_some_and(|a| a.get_help().is_some()), "{id}");
        }
    }
}
