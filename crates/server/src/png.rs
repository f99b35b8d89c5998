//! PNG encoding with the generation parameters in a `parameters` tEXt chunk (AUTOMATIC1111 style,
//! which image viewers and UIs such as A1111/ComfyUI read back).

use sdserve_pipeline::controlnet::preprocess::Preprocessor;
use sdserve_pipeline::pipeline::{
    seed_of_image, GenerationParams, GuidanceSkips, Mode, RgbImage, Variation,
};
use sdserve_pipeline::schedulers::SchedulerKind;

/// A1111's names for a scheduler: its sampler (`DPM++ 2M`) and, for the samplers that have a
/// schedule choice, the schedule (`Karras`, `Uniform`), as A1111 1.9+ writes them in
/// `Sampler: DPM++ 2M, Schedule type: Karras` (and reads the older `DPM++ 2M Karras` too).
pub(crate) fn a1111_sampler(kind: SchedulerKind) -> (&'static str, Option<&'static str>) {
    crate::api::a1111::samplers::a1111_names(kind)
}

/// tEXt is Latin-1 only; anything else becomes `?` (the JSON metadata carries the exact text).
fn latin1(s: &str) -> String {
    s.chars()
        .map(|c| {
            if (c as u32) < 256 && c != '\0' {
                c
            } else {
                '?'
            }
        })
        .collect()
}

/// A1111's `infotext_utils.quote`: JSON-quoted when it holds `,`, `:` or a newline.
pub fn quote(text: &str) -> String {
    if text.contains([',', ':', '\n']) {
        serde_json::Value::String(text.to_string()).to_string()
    } else {
        text.to_string()
    }
}

/// The A1111 "parameters" string; `skips`: the negative guidance rules that skipped some
/// evaluation of the run (their entries are written only then).
pub fn parameters_text(
    p: &GenerationParams,
    model_version: &str,
    vae: Option<&crate::vaes::VaeUse>,
    skips: GuidanceSkips,
) -> String {
    // A1111 keeps the LoRA tags in the prompt line.
    let mut s = p.prompt.clone();
    for l in &p.loras {
        s.push_str(&format!(" <lora:{}:{}>", l.name, l.weight));
    }
    if !p.negative_prompt.is_empty() {
        s.push_str("\nNegative prompt: ");
        s.push_str(&p.negative_prompt);
    }
    // The schedule type is the one the run used (`Exponential` for `euler` + `exponential`).
    let sampler = match p.scheduler.map(|k| (a1111_sampler(k), k)) {
        Some(((name, Some(_)), kind)) => {
            let schedule = p.schedule.unwrap_or(kind.schedule());
            format!(
                "{name}, Schedule type: {}",
                crate::api::a1111::samplers::schedule_label(schedule)
            )
        }
        Some(((name, None), _)) => name.to_string(),
        None => "default".to_string(),
    };
    let scheduler = p.scheduler.map(|k| k.name()).unwrap_or("default");
    let sampler_params = crate::validate::sampler_params::infotext(p, skips);
    // A1111 writes a sampler's eta where it is not the default: `Eta DDIM` for its timestep
    // samplers, `Eta` for k-diffusion's.
    let eta = match (p.scheduler.and_then(|k| Some((k, k.eta_default()?))), p.eta) {
        (Some((kind, default)), Some(eta)) if eta != default => {
            use sdserve_pipeline::schedulers::Sampler;
            let ddim = matches!(
                kind.sampler(),
                Sampler::DdimA1111 | Sampler::DdimCfgpp | Sampler::Ddim
            );
            format!(", Eta{}: {eta:?}", if ddim { " DDIM" } else { "" })
        }
        _ => String::new(),
    };
    let clip_skip = match p.clip_skip {
        1 => String::new(),
        n => format!(", Clip skip: {n}"),
    };
    let syntax = match p.prompt_syntax {
        sdserve_pipeline::pipeline::PromptSyntax::A1111 => "",
        sdserve_pipeline::pipeline::PromptSyntax::Plain => ", Prompt syntax: plain",
    };
    // A1111 writes `Tiling: True` for a tiling run and nothing otherwise.
    let tiling = if p.tiling { ", Tiling: True" } else { "" };
    // A1111 writes the face restorer's name after the seed (`Face restoration: CodeFormer`).
    let faces = match &p.face_restore {
        Some(_) => format!(
            ", Face restoration: {}",
            sdserve_pipeline::face_restore::restorer::NAME
        ),
        None => String::new(),
    };
    // A1111 writes these only for a non-zero strength; the seed is this image's.
    let variation = p
        .image_variation(0)
        .map(|(seed, strength)| {
            format!(", Variation seed: {seed}, Variation seed strength: {strength}")
        })
        .unwrap_or_default();
    // A1111 writes it after the variation seed, when both sides are set.
    let resize = p
        .seed_resize_from
        .map(|r| format!(", Seed resize from: {}x{}", r.width, r.height))
        .unwrap_or_default();
    // A1111 writes the VAE after the model, only when one was chosen.
    let vae = vae
        .map(|v| format!(", VAE hash: {}, VAE: {}", v.hash, v.name))
        .unwrap_or_default();
    // A1111's `extra_generation_params` as `sample` and `sample_img2img` add them, before Eta.
    let mut noise = String::new();
    if p.init_image.is_some() && p.noise_multiplier != 1.0 {
        noise.push_str(&format!(", Noise multiplier: {:?}", p.noise_multiplier));
    }
    if (p.init_image.is_some() || p.hires.is_some()) && p.extra_noise != 0.0 {
        noise.push_str(&format!(", Extra noise: {:?}", p.extra_noise));
    }
    // The sd-webui-controlnet extension's entries: one quoted list per unit, numbered in the
    // request's order (a reference unit where it was sent among the ControlNets).
    let units = p.units_with_references();
    let mut entries: Vec<String> = units
        .iter()
        .map(|c| c.infotext.clone().unwrap_or_else(|| native_entry(c)))
        .collect();
    // A1111's ip-adapter units (their entries written by the dialect) at their places among
    // the request's units.
    let mut placed: Vec<_> = p
        .ip_adapters
        .iter()
        .filter_map(|u| u.extension.as_ref()?.record.as_ref())
        .collect();
    placed.sort_by_key(|r| r.position);
    for r in placed {
        entries.insert(r.position.min(entries.len()), r.infotext.clone());
    }
    // The native IP-Adapters as the extension writes an ip-adapter unit (module
    // ip-adapter_clip_sd15), after the units.
    entries.extend(
        p.ip_adapters
            .iter()
            .filter(|u| u.extension.is_none())
            .map(|u| {
                format!(
                    "Module: ip-adapter_clip_sd15, Model: {}, Weight: {}, Guidance Start: 0.0, Guidance End: 1.0",
                    u.model.name, u.scale
                )
            }),
    );
    let controlnets: String = entries
        .iter()
        .enumerate()
        .map(|(i, e)| format!(", ControlNet {i}: {}", quote(e)))
        .collect();
    s.push_str(&format!(
        "\nSteps: {}, Sampler: {sampler}, Scheduler: {scheduler}, CFG scale: {}, Seed: {}{faces}, Size: {}x{}{variation}{resize}{clip_skip}{syntax}{tiling}, Model: {model_version}{vae}{controlnets}{noise}{eta}{sampler_params}, Version: sdserve {}",
        p.steps,
        p.guidance_scale,
        p.seed,
        p.width,
        p.height,
        env!("CARGO_PKG_VERSION"),
    ));
    // A1111 names img2img's strength "Denoising strength"; the mode says what the image is.
    let mode = Mode::of(p);
    if let Some(init) = &p.init_image {
        s.push_str(&format!(
            ", Denoising strength: {}, Mode: {}",
            init.strength,
            mode.name()
        ));
    }
    if let Some(o) = p.a1111_inpaint.as_ref().filter(|_| mode == Mode::Inpaint) {
        s.push_str(&a1111_inpaint_text(o));
    }
    // As A1111 strips its infotext: an empty prompt leaves no empty first line.
    s.trim_start().to_string()
}

/// What A1111's `init` adds to the infotext for its inpainting options, in its order: `Mask
/// mode` (inverted), `Mask blur` (when on and the same both ways; A1111 leaves it out
/// otherwise), `Inpaint area` and `Masked area padding` ("only masked"), `Masked content` (all
/// but original).
fn a1111_inpaint_text(o: &sdserve_pipeline::inpaint_a1111::A1111Inpaint) -> String {
    let mut s = String::new();
    if o.invert {
        s.push_str(", Mask mode: Inpaint not masked");
    }
    if (o.mask_blur_x > 0 || o.mask_blur_y > 0) && o.mask_blur_x == o.mask_blur_y {
        s.push_str(&format!(", Mask blur: {}", o.mask_blur_x));
    }
    if let Some(padding) = o.only_masked_padding {
        s.push_str(&format!(
            ", Inpaint area: Only masked, Masked area padding: {padding}"
        ));
    }
    if let Some(content) = o.masked_content.infotext() {
        s.push_str(&format!(", Masked content: {content}"));
    }
    s
}

/// The parameters text of each image of a batch: image `i` with its own seed (`seed + i`).
pub fn batch_texts(
    p: &GenerationParams,
    model_version: &str,
    vae: Option<&crate::vaes::VaeUse>,
    skips: GuidanceSkips,
) -> Vec<String> {
    (0..p.batch_size.max(1))
        .map(|i| {
            let one = GenerationParams {
                seed: p.image_seed(i),
                variation: p.variation.map(|v| Variation {
                    seed: seed_of_image(v.seed, i),
                    ..v
                }),
                ..p.clone()
            };
            parameters_text(&one, model_version, vae, skips)
        })
        .collect()
}

pub fn encode(img: &RgbImage, parameters: &str) -> Result<Vec<u8>, String> {
    encode_with_text(img, &[("parameters", parameters)])
}

/// An RGB8 PNG with these tEXt chunks (keyword, text), in order.
pub fn encode_with_text(img: &RgbImage, texts: &[(&str, &str)]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, img.width, img.height);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        for (keyword, text) in texts {
            enc.add_text_chunk(keyword.to_string(), latin1(text))
                .map_err(|e| e.to_string())?;
        }
        let mut w = enc.write_header().map_err(|e| e.to_string())?;
        w.write_image_data(&img.pixels).map_err(|e| e.to_string())?;
        w.finish().map_err(|e| e.to_string())?;
    }
    Ok(out)
}

/// Text read from one PNG, in all, decompressed: a `parameters` text is a few KB, and a
/// compressed chunk (zTXt, iTXt) of a small upload could otherwise expand a thousandfold.
pub const TEXT_BUDGET: usize = 1 << 20;

/// The text chunks of a PNG that come before its image data (where encoders put them), by
/// keyword, up to [`TEXT_BUDGET`] bytes of text (chunks past it are left out); not a PNG: none.
pub fn read_text_chunks(bytes: &[u8]) -> serde_json::Map<String, serde_json::Value> {
    let mut out = serde_json::Map::new();
    let Ok(reader) = png::Decoder::new(std::io::Cursor::new(bytes)).read_info() else {
        return out;
    };
    let info = reader.info();
    let mut budget = TEXT_BUDGET;
    let mut keep = |keyword: &str, text: String, budget: &mut usize| {
        if text.len() <= *budget {
            *budget -= text.len();
            out.insert(keyword.to_string(), text.into());
        }
    };
    for t in &info.uncompressed_latin1_text {
        keep(&t.keyword, t.text.clone(), &mut budget);
    }
    // Decompressed within what is left of the budget, never further (`get_text` alone is
    // unbounded).
    for t in &info.compressed_latin1_text {
        let mut t = t.clone();
        if t.decompress_text_with_limit(budget).is_ok() {
            if let Ok(text) = t.get_text() {
                keep(&t.keyword, text, &mut budget);
            }
        }
    }
    for t in &info.utf8_text {
        let mut t = t.clone();
        if t.decompress_text_with_limit(budget).is_ok() {
            if let Ok(text) = t.get_text() {
                keep(&t.keyword, text, &mut budget);
            }
        }
    }
    out
}

/// The `parameters` text of a PNG (what [`encode`] wrote).
pub fn read_parameters(bytes: &[u8]) -> Option<String> {
    read_text_chunks(bytes)
        .remove("parameters")
        .and_then(|v| v.as_str().map(str::to_string))
}

/// A unit's `Model:` as the extension writes it: its name, "None" for a reference unit.
pub fn unit_model_name(c: &sdserve_pipeline::controlnet::ControlNetUnit) -> &str {
    match c.model.name.as_str() {
        "" => "None",
        name => name,
    }
}

/// A native unit's entry, in the extension's form (`ControlNetUnit.serialize`, the formatting
/// A1111's units share): what it ran as. Its module the preprocessor's native name (`none`
/// without one), `Resize Mode: Just Resize` (the native API stretches the control image to
/// the request's size), `Pixel Perfect: False`, its settings from the preprocessor.
fn native_entry(c: &sdserve_pipeline::controlnet::ControlNetUnit) -> String {
    use crate::api::a1111::controlnet_infotext::{PyNumber, UnitRecord};
    let hidden = PyNumber::Float(0.5);
    let (module, [processor_res, threshold_a, threshold_b]) = match &c.preprocessor {
        None => ("none", [PyNumber::Int(512), hidden, hidden]),
        Some(p) => (p.module(), unit_settings(p)),
    };
    UnitRecord {
        module: module.to_string(),
        model: unit_model_name(c).to_string(),
        weight: c.scale,
        resize_mode: "Just Resize",
        processor_res,
        threshold_a,
        threshold_b,
        guidance: (c.guidance_start, c.guidance_end),
        pixel_perfect: false,
        control_mode: c.control_mode,
    }
    .infotext()
}

/// A native unit's `Processor Res`, `Threshold A` and `Threshold B` as the extension's
/// infotext writes them (the thresholds floats); a slider the module hides holds the hidden
/// slider's default, 0.5, after `bound_check_params`.
fn unit_settings(p: &Preprocessor) -> [crate::api::a1111::controlnet_infotext::PyNumber; 3] {
    use crate::api::a1111::controlnet_infotext::PyNumber;
    let hidden = PyNumber::Float(0.5);
    let float = PyNumber::Float;
    let res = p
        .resolution()
        .map(|r| PyNumber::Int(r.into()))
        .unwrap_or(match p {
            // The legacy modules keep the class's visible resolution slider (512 for -1).
            Preprocessor::TileResample { .. }
            | Preprocessor::RecolorLuminance { .. }
            | Preprocessor::RecolorIntensity { .. }
            | Preprocessor::ReferenceOnly { .. }
            | Preprocessor::ReferenceAdain { .. }
            | Preprocessor::ReferenceAdainAttn { .. } => PyNumber::Int(512),
            _ => hidden,
        });
    let (a, b) = match *p {
        Preprocessor::Canny {
            low_threshold,
            high_threshold,
            ..
        } => (float(low_threshold), float(high_threshold)),
        Preprocessor::Threshold { threshold, .. }
        | Preprocessor::ScribbleXdog { threshold, .. } => (float(threshold), hidden),
        Preprocessor::BlurGaussian { sigma, .. } => (float(sigma), hidden),
        Preprocessor::SoftedgeTeed { safe_steps, .. }
        | Preprocessor::SoftedgeAnyline { safe_steps, .. } => (float(safe_steps), hidden),
        Preprocessor::NormalMidas {
            background_threshold,
            ..
        } => (float(background_threshold), hidden),
        Preprocessor::DepthLeres {
            remove_near,
            remove_background,
            ..
        } => (float(remove_near), float(remove_background)),
        Preprocessor::TileResample { down_sampling_rate } => (float(down_sampling_rate), hidden),
        Preprocessor::RecolorLuminance { gamma } | Preprocessor::RecolorIntensity { gamma } => {
            (float(gamma), hidden)
        }
        Preprocessor::ReferenceOnly { style_fidelity }
        | Preprocessor::ReferenceAdain { style_fidelity }
        | Preprocessor::ReferenceAdainAttn { style_fidelity } => (float(style_fidelity), hidden),
        Preprocessor::Invert
        | Preprocessor::LineartStandard { .. }
        | Preprocessor::Color { .. }
        | Preprocessor::Shuffle { .. }
        | Preprocessor::SoftedgeHed { .. }
        | Preprocessor::SoftedgeHedsafe { .. }
        | Preprocessor::ScribbleHed { .. }
        | Preprocessor::LineartRealistic { .. }
        | Preprocessor::LineartCoarse { .. }
        | Preprocessor::LineartAnime { .. }
        | Preprocessor::LineartAnimeDenoise { .. }
        | Preprocessor::SoftedgePidinet { .. }
        | Preprocessor::SoftedgePidisafe { .. }
        | Preprocessor::ScribblePidinet { .. }
        | Preprocessor::DepthAnything { .. }
        | Preprocessor::DepthAnythingV2 { .. }
        | Preprocessor::DepthMidas { .. }
        | Preprocessor::NormalBae { .. }
        | Preprocessor::Openpose { .. }
        | Preprocessor::OpenposeHand { .. }
        | Preprocessor::OpenposeFace { .. }
        | Preprocessor::OpenposeFaceonly { .. }
        | Preprocessor::OpenposeFull { .. }
        | Preprocessor::Inpaint
        | Preprocessor::InpaintOnly
        | Preprocessor::InpaintOnlyLama => (hidden, hidden),
        Preprocessor::Mlsd {
            value_threshold,
            distance_threshold,
            ..
        } => (float(value_threshold), float(distance_threshold)),
    };
    [res, a, b]
}

#[cfg(test)]
#[path = "png_tests.rs"]
mod tests;
