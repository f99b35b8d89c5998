//! `sdserve generate`'s flags: the native request's fields, described from validation's rules.

use std::path::PathBuf;

use clap::Args;

use super::ModelArgs;

/// `sdserve generate`. The request flags are the native request's fields under the API's rules
/// (checked by the same validation before the model loads, errors naming the flag); their help
/// is written by [`super::command`] from the same constants.
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
    pub guidance_rule: Option<String>,
    #[arg(long)]
    pub eta: Option<f64>,
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
    #[arg(long)]
    pub step_rule: Option<String>,
    #[arg(long)]
    pub noise_multiplier: Option<f64>,
    #[arg(long)]
    pub extra_noise: Option<f64>,
    #[arg(long)]
    pub sigma_churn: Option<f64>,
    #[arg(long)]
    pub sigma_tmin: Option<f64>,
    #[arg(long)]
    pub sigma_tmax: Option<f64>,
    #[arg(long)]
    pub sigma_noise: Option<f64>,
    #[arg(long)]
    pub negative_guidance_min_sigma: Option<f64>,
    #[arg(long)]
    pub negative_guidance_all_steps: bool,
    #[arg(long)]
    pub negative_guidance_skip_early: Option<f64>,
    #[arg(long)]
    pub resize_mode: Option<String>,
    #[arg(long, visible_alias = "mask")]
    pub mask_image: Option<PathBuf>,
    #[arg(long)]
    pub tiling: bool,
    #[arg(long, num_args = 0..=1, default_missing_value = "0.5", value_name = "WEIGHT")]
    pub restore_faces: Option<f64>,
    #[arg(long)]
    pub prompt_syntax: Option<String>,
    #[arg(long)]
    pub clip_skip: Option<u64>,
    #[arg(long, visible_alias = "lora", value_name = "NAME[:WEIGHT]")]
    pub loras: Vec<String>,
    #[arg(long)]
    pub vae: Option<String>,
    #[arg(long)]
    pub variation_seed: Option<u64>,
    #[arg(long)]
    pub variation_strength: Option<f64>,
    #[arg(long)]
    pub seed_resize_from_width: Option<u64>,
    #[arg(long)]
    pub seed_resize_from_height: Option<u64>,
    #[arg(long, value_name = "NAME")]
    pub styles: Vec<String>,
    #[arg(long, visible_alias = "controlnet", value_name = "MODEL:IMAGE[:SCALE]")]
    pub controlnets: Vec<String>,
    /// The preprocessor of the --controlnet at the same position (the first for the first):
    /// `canny` makes the control map from the image (OpenCV's Canny edges as the
    /// sd-webui-controlnet extension runs it; thresholds 1..=255, 100 and 200 when left out;
    /// processor resolution 64..=2048, 512), `none` takes the image as the map [default: none].
    #[arg(long, value_name = "canny[:LOW:HIGH[:RESOLUTION]]|none")]
    pub controlnet_preprocessor: Vec<String>,
    #[arg(long, visible_alias = "ip-adapter", value_name = "MODEL:IMAGE[:SCALE]")]
    pub ip_adapters: Vec<String>,
    /// AUTOMATIC1111's prompt styles file (`styles.csv`: columns `name`, `prompt`,
    /// `negative_prompt`) that `--styles` names, as `serve`'s.
    #[arg(long, env = "STYLES_FILE")]
    pub styles_file: Option<PathBuf>,
    /// The hires fix: any `--hires-*` flag asks for the second pass (the native `hires` object).
    #[command(flatten)]
    pub hires: HiresArgs,
    /// A1111's inpainting: `--inpaint` or any `--inpaint-*` flag (the native `inpaint` object).
    #[command(flatten)]
    pub inpaint: InpaintArgs,
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

/// `generate`'s A1111 inpainting flags: the keys of the native `inpaint` object, checked by the
/// same validation (errors name `inpaint.<key>`).
#[derive(Debug, Clone, Default, Args)]
pub struct InpaintArgs {
    #[arg(long)]
    pub inpaint: bool,
    #[arg(long)]
    pub inpaint_mask_blur: Option<u64>,
    #[arg(long)]
    pub inpaint_mask_blur_x: Option<u64>,
    #[arg(long)]
    pub inpaint_mask_blur_y: Option<u64>,
    #[arg(long)]
    pub inpaint_mask_invert: bool,
    #[arg(long)]
    pub inpaint_masked_content: Option<String>,
    #[arg(long)]
    pub inpaint_area: Option<String>,
    #[arg(long)]
    pub inpaint_padding: Option<u64>,
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
            format!("How closely to follow the prompt, {GUIDANCE_MIN}..={GUIDANCE_MAX}; at or below 1 guidance is off under --guidance-rule diffusers [default: {GUIDANCE_DEFAULT}]"),
        ),
        (
            "guidance_rule",
            "At which scales guidance runs the negative prompt: diffusers (above 1 only), a1111 (A1111 1.10: below 1 too, uncond + (cond - uncond) * scale; at 0 the negative prompt's prediction) [default: diffusers]".to_string(),
        ),
        (
            "eta",
            "0..=1: the fresh noise each step of ddim, ddim_a1111, ddim_cfgpp, euler_a, dpm2_a, dpm2_a_a1111, dpmpp_sde and dpmpp_2m_sde adds [default: the sampler's own, 0 for DDIM, 1 for the others]".to_string(),
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
            "step_rule",
            "Which steps --strength runs: diffusers (int(steps * strength) of the schedule), a1111 (A1111 1.10: int(min(strength, 0.999) * steps) + 1; the hires pass its steps of a schedule stretched to int(steps / strength)), a1111_fix_steps (img2img as the hires pass) [default: diffusers]".to_string(),
        ),
        (
            "noise_multiplier",
            "With --init-image: its starting noise times this, 0..=1.5 (A1111's initial_noise_multiplier) [default: 1]".to_string(),
        ),
        (
            "extra_noise",
            "With --init-image or the hires fix (--hires-*): this much more noise at the start, in sigma units, 0..=1 (A1111's img2img_extra_noise) [default: 0]".to_string(),
        ),
        (
            "sigma_churn",
            "k-diffusion's churn on euler, heun, dpm2 (and _karras), dpm2_a1111: each step within --sigma-tmin..--sigma-tmax first raised to sigma * (1 + min(churn / steps, sqrt 2 - 1)) with fresh noise, 0..=100 (A1111's s_churn) [default: 0]".to_string(),
        ),
        (
            "sigma_tmin",
            "The smallest sigma --sigma-churn applies at, 0..=10 (A1111's s_tmin) [default: 0]".to_string(),
        ),
        (
            "sigma_tmax",
            "The largest sigma --sigma-churn applies at, 0..=999, 0: no bound (A1111's s_tmax) [default: 0]".to_string(),
        ),
        (
            "sigma_noise",
            "The churn noise's scale, 0..=1.1 (A1111's s_noise) [default: 1]".to_string(),
        ),
        (
            "negative_guidance_min_sigma",
            "With guidance: every other UNet evaluation whose sigma is below this skips the negative prompt, 0..=15 (A1111's s_min_uncond, NGMS) [default: 0]".to_string(),
        ),
        (
            "negative_guidance_all_steps",
            "With --negative-guidance-min-sigma: every evaluation below it skips (A1111's s_min_uncond_all)".to_string(),
        ),
        (
            "negative_guidance_skip_early",
            "The share of each pass's steps, from its start, whose UNet evaluations skip the negative prompt, 0..=1 (A1111's skip_early_cond, Skip Early CFG) [default: 0]".to_string(),
        ),
        (
            "resize_mode",
            "With --init-image: how it (and --mask-image) is fitted to --width x --height, as A1111 img2img's resize_mode: just_resize (stretched, Lanczos), crop_and_resize (covers the size, centre cropped), resize_and_fill (fits, borders filled with its stretched edges), latent_upscale (encoded at its own size, 8..=768 a side, the latents resized bilinearly) [default: just_resize]".to_string(),
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
            "restore_faces",
            "Restore faces with CodeFormer at WEIGHT (0..=1, 0 restores the most) after generating, as A1111's restore_faces; needs --face-restore-dir [default: off; WEIGHT 0.5]".to_string(),
        ),
        (
            "prompt_syntax",
            "How prompts are read: a1111 (weights, BREAK, prompt editing, AND, prompts past 77 tokens) or plain (diffusers: truncated to 77 tokens, brackets are text) [default: a1111]".to_string(),
        ),
        (
            "clip_skip",
            format!("A1111's CLIP skip, 1..={CLIP_SKIP_MAX}: 1 = the last layer, 2 = the penultimate, ... [default: 1]"),
        ),
        (
            "loras",
            format!("A LoRA of --lora-dir by name, with its weight ({LORA_WEIGHT_MIN}..={LORA_WEIGHT_MAX}; 1 when left out); repeat for more, at most {LORAS_MAX} with the prompt's <lora:name:weight> tags [default: none]"),
        ),
        (
            "vae",
            "The VAE to decode (and encode --init-image) with: a file or diffusers folder of --vae-dir by name; none: the model's own; automatic: the --vae-dir file named like a single-file --model, else the model's own [default: automatic]".to_string(),
        ),
        (
            "variation_seed",
            format!("A1111's variation seed, 0..={SEED_MAX}: the starting noise is bent towards this seed's by --variation-strength; image i of a batch uses it + i (text-to-image only) [default: random when --variation-strength is above 0, printed]"),
        ),
        (
            "variation_strength",
            "How far the noise goes towards the variation seed's, 0..=1: 0 is the seed's image, 1 the variation seed's noise [default: 0]".to_string(),
        ),
        (
            "seed_resize_from_width",
            format!("A1111's seed resize, with --seed-resize-from-height: the width a seed's image was made at, {SEED_RESIZE_MIN}..={SEED_RESIZE_MAX}; the image keeps that image's composition [default: off]"),
        ),
        (
            "seed_resize_from_height",
            format!("A1111's seed resize, with --seed-resize-from-width: the height a seed's image was made at, {SEED_RESIZE_MIN}..={SEED_RESIZE_MAX} [default: off]"),
        ),
        (
            "controlnets",
            "A ControlNet of --controlnet-dir by name, its control image file (already preprocessed: an edge map, a pose, a depth map; resized to the image's size) and its scale (0..=2; 1 when left out); repeat for more, at most 3, their effects summed (text-to-image, img2img and inpainting) [default: none]".to_string(),
        ),
        (
            "ip_adapters",
            "An IP-Adapter of --ip-adapter-dir by name, its image prompt file (any size) and its scale (0..=2; 1 when left out); repeat for more, at most 3, their effects summed [default: none]".to_string(),
        ),
        (
            "styles",
            format!("A style of --styles-file by name, added to the prompts as A1111 does ({{prompt}} in a style takes the prompt); repeat for more, at most {}, applied in order [default: none]", crate::styles::STYLES_MAX),
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
            format!("Hires fix: how the first image is enlarged, one of {} or an ESRGAN model of --upscalers-dir by its file stem [default: {}]", hires::upscalers().map(|(n, _)| n).collect::<Vec<_>>().join(", "), hires::UPSCALER_DEFAULT),
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
        (
            "inpaint",
            "With --mask: inpaint as A1111 does (blurred mask, masked content, only masked, the kept pixels back as sent) with its web UI's defaults; any --inpaint-* flag implies it [default: diffusers' inpainting]".to_string(),
        ),
        (
            "inpaint_mask_blur",
            format!("A1111 inpainting: Gaussian blur of the mask in pixels, 0..={} both ways [default: {}]", native_inpaint::MASK_BLUR_MAX, native_inpaint::MASK_BLUR_DEFAULT),
        ),
        (
            "inpaint_mask_blur_x",
            format!("A1111 inpainting: the mask's blur across only, 0..={} (not with --inpaint-mask-blur) [default: {}]", native_inpaint::MASK_BLUR_MAX, native_inpaint::MASK_BLUR_DEFAULT),
        ),
        (
            "inpaint_mask_blur_y",
            format!("A1111 inpainting: the mask's blur down only, 0..={} (not with --inpaint-mask-blur) [default: {}]", native_inpaint::MASK_BLUR_MAX, native_inpaint::MASK_BLUR_DEFAULT),
        ),
        (
            "inpaint_mask_invert",
            "A1111 inpainting: repaint what the mask leaves black".to_string(),
        ),
        (
            "inpaint_masked_content",
            format!("A1111 inpainting: what the masked region starts from, one of {} [default: original]", native_inpaint::MASKED_CONTENT.map(|(n, _)| n).join(", ")),
        ),
        (
            "inpaint_area",
            "A1111 inpainting: whole (the picture at --width x --height) or only_masked (the mask's region repainted at --width x --height and pasted back into the image at its own size) [default: whole]".to_string(),
        ),
        (
            "inpaint_padding",
            format!("A1111 inpainting, only_masked: pixels around the mask's region, 0..={} [default: {}]", native_inpaint::PADDING_MAX, native_inpaint::PADDING_DEFAULT),
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

    /// The native request fields `generate` has no flag for, and why (README says the same).
    const NOT_FLAGS: [(&str, &str); 1] = [(
        "model",
        "--model is the model itself (a folder, a file or a hub id), where the native `model` names one of the server's MODELS_DIR",
    )];

    #[test]
    fn every_native_request_field_is_a_flag() {
        let cmd = command();
        let generate = cmd.find_subcommand("generate").unwrap();
        let described: Vec<&str> = request_flag_help().iter().map(|(id, _)| *id).collect();
        let hires = crate::validate::HIRES_FIELDS.map(|k| format!("hires_{k}"));
        let fields = crate::validate::FIELDS
            .iter()
            .filter(|f| **f != "hires")
            .map(|f| f.to_string())
            .chain(hires);
        for field in fields {
            if NOT_FLAGS.iter().any(|(f, _)| *f == field) {
                continue;
            }
            let arg = generate
                .get_arguments()
                .find(|a| a.get_id() == field.as_str());
            let long = arg.and_then(|a| a.get_long());
            assert_eq!(long, Some(field.replace('_', "-").as_str()), "{field}");
            assert!(described.contains(&field.as_str()), "{field} has no help");
        }
    }
}
