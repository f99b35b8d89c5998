//! `sdserve generate`: one image to a file, with a progress bar on stderr.

use std::io::{IsTerminal, Write};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressState, ProgressStyle};
use std::ops::ControlFlow;
use std::path::Path;
use std::process::ExitCode;
use std::time::Instant;

use sdserve_pipeline::pipeline::StepProgress;
use serde_json::{json, Map, Value};

use crate::cli::GenerateArgs;
use crate::error::ApiError;

/// A file as the API takes it: base64.
fn file_base64(flag: &str, path: &Path) -> Result<Value, String> {
    use base64::Engine as _;
    let bytes = std::fs::read(path).map_err(|e| format!("{flag} {}: {e}", path.display()))?;
    Ok(json!(
        base64::engine::general_purpose::STANDARD.encode(bytes)
    ))
}

/// The flags as the native request's JSON, which the API's own validation then checks
/// (`api::request::validate_styled`).
fn request_json(a: &GenerateArgs) -> Result<Value, String> {
    let mut m = Map::new();
    if let Some(p) = &a.init_image {
        m.insert("init_image".into(), file_base64("--init-image", p)?);
    }
    if let Some(p) = &a.mask_image {
        m.insert("mask_image".into(), file_base64("--mask", p)?);
    }
    if a.controlnet_preprocessor.len() > a.controlnets.len() {
        return Err(format!(
            "--controlnet-preprocessor: {} given for {} --controlnet (one each, in order)",
            a.controlnet_preprocessor.len(),
            a.controlnets.len()
        ));
    }
    if !a.controlnets.is_empty() {
        let mut units = a
            .controlnets
            .iter()
            .map(|flag| controlnet_use(flag))
            .collect::<Result<Vec<_>, String>>()?;
        for (unit, flag) in units.iter_mut().zip(&a.controlnet_preprocessor) {
            unit["preprocessor"] = preprocessor_flag(flag)?;
        }
        m.insert("controlnets".into(), Value::Array(units));
    }
    if !a.ip_adapters.is_empty() {
        let units = a
            .ip_adapters
            .iter()
            .map(|flag| model_image_scale("--ip-adapter", flag))
            .collect::<Result<Vec<_>, String>>()?;
        m.insert("ip_adapters".into(), Value::Array(units));
    }
    m.insert("prompt".into(), json!(a.prompt));
    let opt = [
        (
            "negative_prompt",
            a.negative_prompt.as_ref().map(|v| json!(v)),
        ),
        ("steps", a.steps.map(|v| json!(v))),
        ("width", a.width.map(|v| json!(v))),
        ("height", a.height.map(|v| json!(v))),
        ("seed", a.seed.map(|v| json!(v))),
        ("guidance_scale", a.guidance_scale.map(|v| json!(v))),
        ("guidance_rule", a.guidance_rule.as_ref().map(|v| json!(v))),
        ("eta", a.eta.map(|v| json!(v))),
        ("scheduler", a.scheduler.as_ref().map(|v| json!(v))),
        ("schedule", a.schedule.as_ref().map(|v| json!(v))),
        ("batch_size", a.batch_size.map(|v| json!(v))),
        ("strength", a.strength.map(|v| json!(v))),
        ("step_rule", a.step_rule.as_ref().map(|v| json!(v))),
        ("noise_multiplier", a.noise_multiplier.map(|v| json!(v))),
        ("extra_noise", a.extra_noise.map(|v| json!(v))),
        ("sigma_churn", a.sigma_churn.map(|v| json!(v))),
        ("sigma_tmin", a.sigma_tmin.map(|v| json!(v))),
        ("sigma_tmax", a.sigma_tmax.map(|v| json!(v))),
        ("sigma_noise", a.sigma_noise.map(|v| json!(v))),
        (
            "negative_guidance_min_sigma",
            a.negative_guidance_min_sigma.map(|v| json!(v)),
        ),
        (
            "negative_guidance_all_steps",
            a.negative_guidance_all_steps.then_some(json!(true)),
        ),
        (
            "negative_guidance_skip_early",
            a.negative_guidance_skip_early.map(|v| json!(v)),
        ),
        ("resize_mode", a.resize_mode.as_ref().map(|v| json!(v))),
        ("tiling", a.tiling.then_some(json!(true))),
        (
            "restore_faces",
            a.restore_faces.map(|weight| json!({ "weight": weight })),
        ),
        ("prompt_syntax", a.prompt_syntax.as_ref().map(|v| json!(v))),
        ("clip_skip", a.clip_skip.map(|v| json!(v))),
        (
            "loras",
            (!a.loras.is_empty()).then(|| a.loras.iter().map(|l| lora_use(l)).collect()),
        ),
        ("vae", a.vae.as_ref().map(|v| json!(v))),
        ("variation_seed", a.variation_seed.map(|v| json!(v))),
        ("variation_strength", a.variation_strength.map(|v| json!(v))),
        (
            "seed_resize_from_width",
            a.seed_resize_from_width.map(|v| json!(v)),
        ),
        (
            "seed_resize_from_height",
            a.seed_resize_from_height.map(|v| json!(v)),
        ),
        ("styles", (!a.styles.is_empty()).then(|| json!(a.styles))),
    ];
    for (k, v) in opt {
        if let Some(v) = v {
            m.insert(k.into(), v);
        }
    }
    let h = &a.hires;
    let hires: Map<String, Value> = [
        ("width", h.hires_width.map(|v| json!(v))),
        ("height", h.hires_height.map(|v| json!(v))),
        ("scale", h.hires_scale.map(|v| json!(v))),
        ("upscaler", h.hires_upscaler.as_ref().map(|v| json!(v))),
        ("steps", h.hires_steps.map(|v| json!(v))),
        ("strength", h.hires_strength.map(|v| json!(v))),
        ("scheduler", h.hires_scheduler.as_ref().map(|v| json!(v))),
        ("prompt", h.hires_prompt.as_ref().map(|v| json!(v))),
        (
            "negative_prompt",
            h.hires_negative_prompt.as_ref().map(|v| json!(v)),
        ),
    ]
    .into_iter()
    .filter_map(|(k, v)| Some((k.to_string(), v?)))
    .collect();
    if !hires.is_empty() {
        m.insert("hires".into(), Value::Object(hires));
    }
    let i = &a.inpaint;
    let inpaint: Map<String, Value> = [
        ("mask_blur", i.inpaint_mask_blur.map(|v| json!(v))),
        ("mask_blur_x", i.inpaint_mask_blur_x.map(|v| json!(v))),
        ("mask_blur_y", i.inpaint_mask_blur_y.map(|v| json!(v))),
        ("mask_invert", i.inpaint_mask_invert.then_some(json!(true))),
        (
            "masked_content",
            i.inpaint_masked_content.as_ref().map(|v| json!(v)),
        ),
        ("area", i.inpaint_area.as_ref().map(|v| json!(v))),
        ("padding", i.inpaint_padding.map(|v| json!(v))),
    ]
    .into_iter()
    .filter_map(|(k, v)| Some((k.to_string(), v?)))
    .collect();
    if i.inpaint || !inpaint.is_empty() {
        m.insert("inpaint".into(), Value::Object(inpaint));
    }
    Ok(Value::Object(m))
}

/// `--controlnet MODEL:IMAGE[:SCALE]` as the native `controlnets` item: the model before the
/// first `:`, the scale after the last when it is a number, the image file between.
fn controlnet_use(flag: &str) -> Result<Value, String> {
    model_image_scale("--controlnet", flag)
}

/// `MODEL:IMAGE[:SCALE]` (`--controlnet`, `--ip-adapter`) as `{model, image, scale}`.
fn model_image_scale(name: &str, flag: &str) -> Result<Value, String> {
    let rule = || format!("{name} {flag:?}: MODEL:IMAGE[:SCALE] (a name, an image file)");
    let (model, rest) = flag.split_once(':').ok_or_else(rule)?;
    let (image, scale) = match rest.rsplit_once(':') {
        Some((image, s)) => match s.trim().parse::<f64>() {
            Ok(v) if v.is_finite() => (image, Some(v)),
            _ => (rest, None),
        },
        None => (rest, None),
    };
    if model.is_empty() || image.is_empty() {
        return Err(rule());
    }
    let mut unit = json!({
        "model": model,
        "image": file_base64(name, Path::new(image))?,
    });
    if let Some(s) = scale {
        unit["scale"] = json!(s);
    }
    Ok(unit)
}

/// `--controlnet-preprocessor TYPE[:LOW:HIGH[:RESOLUTION]]` as the native `preprocessor`
/// object (the API checks the type and the ranges); a type alone takes its defaults.
fn preprocessor_flag(flag: &str) -> Result<Value, String> {
    let rule = || {
        format!(
            "--controlnet-preprocessor {flag:?}: canny[:LOW:HIGH[:RESOLUTION]] (integers), or a type alone (invert, threshold, lineart_standard, scribble_xdog, blur_gaussian, tile_resample, color, shuffle, softedge_hed, softedge_hedsafe, scribble_hed, lineart_realistic, lineart_coarse, lineart_anime, lineart_anime_denoise, softedge_pidinet, softedge_pidisafe, scribble_pidinet, mlsd, depth_anything, depth_anything_v2, depth_midas, normal_midas, normal_bae, depth_leres, openpose, openpose_hand, openpose_face, openpose_faceonly, openpose_full, recolor_luminance, recolor_intensity: their defaults), or none"
        )
    };
    let mut parts = flag.split(':');
    let kind = parts.next().unwrap_or_default();
    let numbers = parts
        .map(|p| p.trim().parse::<u64>().map_err(|_| rule()))
        .collect::<Result<Vec<_>, String>>()?;
    let mut p = json!({ "type": kind });
    match numbers.as_slice() {
        [] => {}
        [low, high, rest @ ..] if rest.len() <= 1 => {
            p["low_threshold"] = json!(low);
            p["high_threshold"] = json!(high);
            if let Some(r) = rest.first() {
                p["resolution"] = json!(r);
            }
        }
        _ => return Err(rule()),
    }
    Ok(p)
}

/// `--loras NAME[:WEIGHT]` as the native `loras` item: the weight after the last `:` when it
/// is a number, else the whole text is the name (weight 1).
fn lora_use(flag: &str) -> Value {
    match flag.rsplit_once(':') {
        Some((name, weight)) => match weight.trim().parse::<f64>() {
            Ok(w) if w.is_finite() => json!({"name": name, "weight": w}),
            _ => json!({"name": flag}),
        },
        None => json!({"name": flag}),
    }
}

/// A refused request as the command line reads it: each broken field named by its flag
/// (`hires.width` is `--hires-width`).
fn flag_error(e: ApiError) -> String {
    match e {
        ApiError::Validation(fields) => fields
            .iter()
            .map(|f| format!("{}: {}", flag_of(&f.field), f.rule))
            .collect::<Vec<_>>()
            .join("; "),
        ApiError::Internal(why) => why,
        other => other.body().details.unwrap_or_else(|| other.to_string()),
    }
}

/// The flag of a request field.
fn flag_of(field: &str) -> String {
    match field {
        "hires" => "--hires-*".into(),
        "request" => "the request".into(),
        f => format!("--{}", f.replace(['_', '.'], "-")),
    }
}

/// Where image `i` of a batch goes: `out.png`, then `out-1.png`, `out-2.png`, ...
pub fn batch_path(output: &Path, i: usize) -> std::path::PathBuf {
    if i == 0 {
        return output.to_path_buf();
    }
    let stem = output.file_stem().unwrap_or_default().to_string_lossy();
    let name = match output.extension() {
        Some(ext) => format!("{stem}-{i}.{}", ext.to_string_lossy()),
        None => format!("{stem}-{i}"),
    };
    output.with_file_name(name)
}

/// "2.4 s/step" for slow steps (a CPU), "7.5 steps/s" for fast ones.
fn rate_text(steps_per_sec: f64) -> String {
    if !(steps_per_sec.is_finite() && steps_per_sec > 0.0) {
        "? s/step".into()
    } else if steps_per_sec >= 1.0 {
        format!("{steps_per_sec:.1} steps/s")
    } else {
        format!("{:.1} s/step", 1.0 / steps_per_sec)
    }
}

/// The bar on a terminal: steps, rate and ETA, redrawn in place by indicatif.
fn bar_style() -> ProgressStyle {
    ProgressStyle::with_template(
        "[{bar:30}] {pos}/{len} steps, {rate}, {elapsed} elapsed, ETA {eta}",
    )
    .expect("a valid template")
    .with_key("rate", |s: &ProgressState, w: &mut dyn std::fmt::Write| {
        let _ = w.write_str(&rate_text(s.per_sec()));
    })
    .progress_chars("#>-")
}

/// Step progress on stderr through an indicatif bar: drawn in place on a terminal; into a file
/// or pipe the bar stays hidden and whole lines are written instead (the first step, then at
/// most one every 5 s, and the last), never `\r` redraws.
struct Progress {
    bar: ProgressBar,
    terminal: bool,
    last_line: Option<Instant>,
}

impl Progress {
    fn new(terminal: bool) -> Self {
        let target = if terminal {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        };
        Self::with_target(target, terminal)
    }

    fn with_target(target: ProgressDrawTarget, terminal: bool) -> Self {
        let bar = ProgressBar::with_draw_target(None, target);
        bar.set_style(bar_style());
        Self {
            bar,
            terminal,
            last_line: None,
        }
    }

    /// Moves the bar; off a terminal, the line to write for this step, if one is due.
    fn step(&mut self, p: StepProgress) -> Option<String> {
        if p.between_steps {
            return None;
        }
        self.bar.set_length(p.total as u64);
        self.bar.set_position(p.step as u64);
        if self.terminal {
            return None;
        }
        let due = self
            .last_line
            .is_none_or(|t| t.elapsed() >= std::time::Duration::from_secs(5));
        if !due && p.step < p.total {
            return None;
        }
        self.last_line = Some(Instant::now());
        let elapsed = self.bar.elapsed().as_secs_f64();
        // indicatif's rate is a moving average; before it has one, the mean so far.
        let per_sec = match self.bar.per_sec() {
            r if r.is_finite() && r > 0.0 => r,
            _ => p.step as f64 / elapsed.max(1e-9),
        };
        let left = p.total.saturating_sub(p.step) as f64 / per_sec;
        Some(format!(
            "{}/{} steps, {}, {elapsed:.1}s elapsed, ~{left:.1}s left\n",
            p.step,
            p.total,
            rate_text(per_sec)
        ))
    }

    /// Leaves the finished bar on its own line.
    fn finish(&self) {
        self.bar.finish();
    }
}

/// Fails before anything loads when `path` cannot be written (a missing folder, a folder in its
/// place, no permission), so a long generation is never lost at the end.
fn check_writable(path: &Path) -> Result<(), String> {
    if path.is_dir() {
        return Err(format!(
            "-o {}: is a folder; give the PNG file's path",
            path.display()
        ));
    }
    let existed = path.exists();
    match std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
    {
        Ok(_) => {
            if !existed {
                let _ = std::fs::remove_file(path);
            }
            Ok(())
        }
        Err(e) => {
            let parent = path.parent().filter(|p| !p.as_os_str().is_empty());
            let hint = match parent {
                Some(dir) if !dir.is_dir() => {
                    format!("; the folder {} does not exist", dir.display())
                }
                _ => String::new(),
            };
            Err(format!("-o {}: cannot write ({e}){hint}", path.display()))
        }
    }
}

pub fn run(a: GenerateArgs) -> ExitCode {
    match run_inner(&a) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run_inner(a: &GenerateArgs) -> Result<(), String> {
    let body = serde_json::to_vec(&request_json(a)?).map_err(|e| e.to_string())?;
    // The server's steps, in its order: styles and validation, the VAE, the model's checks.
    let styles = crate::styles::StyleBook::new(a.styles_file.clone());
    crate::annotators::AnnotatorStore::shared().set_dirs(
        a.model.annotator_dir.clone(),
        Some(crate::hub::HubOptions::from_env(a.model.model_cache_dir.clone(), false).cache_dir),
    );
    let mut req = crate::api::request::validate_styled(&styles, &body).map_err(flag_error)?;
    // A hires upscaler model is looked up before the model loads.
    crate::upscalers::UpscalerCatalog::new(a.model.upscalers_dir.clone())
        .check_hires(&req)
        .map_err(flag_error)?;
    crate::controlnets::ControlNetCatalog::new(a.model.controlnet_dir.clone())
        .check(&mut req, "controlnets")
        .map_err(flag_error)?;
    crate::ip_adapters::IpAdapterCatalog::new(a.model.ip_adapter_dir.clone())
        .check(&mut req, "ip_adapters")
        .map_err(flag_error)?;
    check_writable(&a.output)?;
    let vaes =
        crate::vaes::VaeCatalog::new(a.model.vae_dir.clone(), a.model.model_cache_dir.clone());
    let model = Path::new(&a.model.model);
    let checkpoint = || model.is_file().then(|| model.to_path_buf());
    // The model's limits are known before it loads (a VAE folder that does not fit it is
    // refused now): a folder's from its configs, a single file's from its names and shapes.
    let fits = if model.is_dir() {
        sdserve_pipeline::pipeline::ModelLimits::of_folder(model).ok()
    } else if model.is_file() {
        sdserve_pipeline::single_file::SingleFileShapes::read(model)
            .ok()
            .map(|s| s.limits)
    } else {
        None
    };
    let vae = crate::api::resolve::resolve_vae(&vaes, req.vae.as_deref(), checkpoint, "vae", fits)
        .map_err(flag_error)?;
    let rt = crate::config::select_runtime(&a.model.device, a.model.dtype)?;
    for w in &rt.warnings {
        eprintln!("warning: {w}");
    }
    eprintln!(
        "loading {} on {} ({}) ...",
        a.model.model,
        rt.label,
        rt.dtype.as_str()
    );
    let t0 = Instant::now();
    let mut loaded = crate::model::load_real(
        &a.model,
        &rt,
        &crate::hub::LoadStatus::default(),
        &Default::default(),
    )?;
    eprintln!(
        "loaded {} in {:.1}s",
        loaded.info.model_version,
        t0.elapsed().as_secs_f64()
    );
    if let Some(v) = &vae {
        loaded
            .generator
            .set_vae(Some(&v.name))
            .map_err(|why| format!("--vae: {why}"))?;
        eprintln!("VAE {} ({})", v.name, v.hash);
    }
    let spec = crate::api::job_spec(
        req,
        vae,
        &loaded.info,
        std::time::Duration::MAX,
        crate::error::DeadlineSetting::Generation,
    )
    .map_err(flag_error)?;
    let params = &spec.params;
    let scheduler = params.scheduler.map_or("default", |k| k.name());
    let schedule = params.schedule.map_or("default", |s| s.name());
    let variation = params
        .variation
        .map(|v| format!(", variation seed {} at {}", v.seed, v.strength))
        .unwrap_or_default();
    eprintln!(
        "seed {}{variation}, scheduler {scheduler}, schedule {schedule}",
        params.seed
    );
    let started = Instant::now();
    let mut err = std::io::stderr();
    let mut progress = Progress::new(err.is_terminal());
    let images = loaded
        .generator
        .generate(params, &mut |p| {
            if let Some(text) = progress.step(p) {
                let _ = write!(err, "{text}");
                let _ = err.flush();
            }
            ControlFlow::Continue(())
        })
        .map_err(|e| e.to_string())?;
    progress.finish();
    for (i, (img, text)) in images.iter().zip(&spec.png_texts).enumerate() {
        let path = batch_path(&a.output, i);
        let png = crate::png::encode(img, text)?;
        std::fs::write(&path, png).map_err(|e| format!("{}: {e}", path.display()))?;
        eprintln!(
            "wrote {} ({}x{}), seed {}",
            path.display(),
            img.width,
            img.height,
            params.image_seed(i)
        );
    }
    eprintln!(
        "{} image(s) in {:.1}s",
        images.len(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

#[cfg(test)]
#[path = "generate_cmd_tests.rs"]
mod tests;
