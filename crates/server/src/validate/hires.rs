//! The rules of A1111's hires fix (`enable_hr`: a second, img2img pass at a larger size; only
//! the A1111 dialect asks for it, so errors name its fields). The sizes are A1111's
//! (`StableDiffusionProcessingTxt2Img.calculate_target_resolution` and `sample_hr_pass`): the
//! upscale to `hr_upscale_to_x/y`, its whole latent cells less `truncate_x/y`, so the pass
//! runs at whole cells of 8 pixels (not the native grid of 64), held to the native range.

use sdserve_pipeline::interpolate::{Interpolation, InterpolationMode};
use std::sync::Arc;

use crate::api::a1111::controlnet_infotext::py_float;
use sdserve_pipeline::pipeline::{Hires, PromptSyntax, Upscaler};
use sdserve_pipeline::prompt::parse_attention;
use sdserve_pipeline::schedulers::{SchedulerKind, SigmaSchedule};
use sdserve_pipeline::upscale::ModelUpscaler;
use serde_json::{Map, Value};

use super::fields::FieldReader;
use super::{ValidRequest, PROMPT_MAX_CHARS, SIZE_MAX, SIZE_MIN, STEPS_MAX};
use crate::error::ApiError;

/// The A1111 fields of the second pass (`enable_hr` itself is the dialect's switch).
pub const FIELDS: [&str; 8] = [
    "hr_scale",
    "hr_resize_x",
    "hr_resize_y",
    "hr_upscaler",
    "hr_second_pass_steps",
    "denoising_strength",
    "hr_prompt",
    "hr_negative_prompt",
];

/// A1111's defaults (`StableDiffusionProcessingTxt2Img`; an absent `hr_upscaler` is
/// `shared.latent_upscale_default_mode`).
pub const HR_SCALE_DEFAULT: f64 = 2.0;
pub const DENOISING_DEFAULT: f64 = 0.75;
pub const UPSCALER_DEFAULT: &str = "Latent";

const fn latent(mode: InterpolationMode, antialias: bool) -> Upscaler {
    Upscaler::Latent(Interpolation { mode, antialias })
}

/// A1111's built-in image upscalers (`shared.sd_upscalers`: `None`, `Lanczos`, `Nearest`);
/// UPSCALERS_DIR's ESRGAN models come after them (`GET /sdapi/v1/upscalers`).
pub const IMAGE_UPSCALERS: [(&str, Upscaler); 3] = [
    ("None", Upscaler::Resize),
    ("Lanczos", Upscaler::Lanczos),
    ("Nearest", Upscaler::Nearest),
];

/// The longest upscaler name read (a file stem).
const UPSCALER_NAME_MAX: usize = 255;

/// A1111's `shared.latent_upscale_modes`, all of them.
pub const LATENT_UPSCALERS: [(&str, Upscaler); 6] = [
    ("Latent", latent(InterpolationMode::Bilinear, false)),
    (
        "Latent (antialiased)",
        latent(InterpolationMode::Bilinear, true),
    ),
    (
        "Latent (bicubic)",
        latent(InterpolationMode::Bicubic, false),
    ),
    (
        "Latent (bicubic antialiased)",
        latent(InterpolationMode::Bicubic, true),
    ),
    (
        "Latent (nearest)",
        latent(InterpolationMode::Nearest, false),
    ),
    (
        "Latent (nearest-exact)",
        latent(InterpolationMode::NearestExact, false),
    ),
];

/// The built-in upscalers by their A1111 names (the latent modes, then the image ones).
pub fn upscalers() -> impl Iterator<Item = (&'static str, Upscaler)> {
    LATENT_UPSCALERS.into_iter().chain(IMAGE_UPSCALERS)
}

/// The upscaler a name asks for: a built-in one, else an UPSCALERS_DIR model by that name
/// (checked against the folder when the request is submitted, found again where it runs).
pub fn upscaler_named(name: &str) -> Upscaler {
    upscalers().find(|(n, _)| *n == name).map_or_else(
        || Upscaler::Model(Arc::new(ModelUpscaler::named(name))),
        |(_, u)| u,
    )
}

pub fn upscaler_name(upscaler: &Upscaler) -> &str {
    match upscaler {
        Upscaler::Model(m) => &m.name,
        _ => upscalers()
            .find(|(_, u)| u == upscaler)
            .map_or("None", |(n, _)| n),
    }
}

/// Every name the hires fix takes, for errors: the built-ins, then `models` (UPSCALERS_DIR's).
pub fn every_upscaler_name(models: &[crate::upscalers::UpscalerEntry]) -> String {
    upscalers()
        .map(|(n, _)| n)
        .chain(models.iter().map(|m| m.name.as_str()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A validated second pass: the pipeline's part, and what A1111's infotext says of it.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidHires {
    pub params: Hires,
    pub upscaler_name: String,
    /// The field that names the upscaler in the request's dialect (`hr_upscaler`, native
    /// `hires.upscaler`), for the submit's check of a model's name.
    pub upscaler_field: &'static str,
    /// The field that carries the pass's own prompt in the request's dialect (`hr_prompt`,
    /// or the native `hires.prompt`), for the rules checked against the model.
    pub prompt_field: &'static str,
    /// The fields that set the pass's size in the request's dialect (`hr_scale`, or
    /// `hr_resize_x`/`hr_resize_y`; natively `hires.scale` or `hires.width`/`hires.height`),
    /// for the rules checked against the model.
    pub size_fields: &'static [&'static str],
    /// The scale the size was asked as (`hr_scale`, A1111's default 2 when neither
    /// `hr_resize_x` nor `hr_resize_y` is given; natively `hires.scale`), `None` when asked by
    /// width or height: the job's record keeps it so the pass can be asked the same way again.
    pub scale: Option<f64>,
    /// A1111's infotext keys for the pass, in its order (`Denoising strength`, `Hires
    /// upscale` or `Hires resize`, `Hires steps`, `Hires upscaler`, ...), values as it writes
    /// them.
    pub infotext: Vec<(&'static str, String)>,
}

impl ValidHires {
    /// `, Key: value` for each infotext key, to follow the first pass's parameters.
    pub fn infotext_suffix(&self) -> String {
        self.infotext
            .iter()
            .map(|(k, v)| format!(", {k}: {v}"))
            .collect()
    }
}

/// The second pass's sampler when the request names one (A1111's `hr_sampler_name` /
/// `hr_scheduler`, resolved by the dialect), with its A1111 name.
pub struct HiresSampler {
    pub kind: SchedulerKind,
    /// The sigma schedule it runs on (`None`: the kind's own).
    pub sigmas: Option<SigmaSchedule>,
    /// A1111's sampler name, for `Hires sampler` when it is not the first pass's (`None`).
    pub name: Option<&'static str>,
    /// A1111's schedule label, for `Hires schedule type` when it is not the first pass's
    /// (`None`).
    pub schedule: Option<&'static str>,
}

impl HiresSampler {
    /// The pass's `kind` on `sigmas` (`None`: the kind's own), with the infotext keys A1111
    /// writes for it: `Hires sampler` when its sampler is not the first pass's (`first_name`),
    /// `Hires schedule type` when its schedule is not the first pass's (`first_label`).
    pub fn new(
        kind: SchedulerKind,
        sigmas: Option<SigmaSchedule>,
        first_name: Option<&str>,
        first_label: Option<&str>,
    ) -> Self {
        let (name, label) = a1111_sampler_of(kind, sigmas);
        Self {
            kind,
            sigmas,
            name: (Some(name) != first_name).then_some(name),
            schedule: label.filter(|&l| Some(l) != first_label),
        }
    }
}

/// A1111's sampler name and schedule label of a pass that runs `kind` on `sigmas` (`None`: its
/// own); no label for a sampler without a schedule choice.
pub fn a1111_sampler_of(
    kind: SchedulerKind,
    sigmas: Option<SigmaSchedule>,
) -> (&'static str, Option<&'static str>) {
    let (name, choice) = crate::png::a1111_sampler(kind);
    (
        name,
        choice.map(|_| {
            crate::api::a1111::samplers::schedule_label(sigmas.unwrap_or(kind.schedule()))
        }),
    )
}

/// A1111's latent cell in pixels (`opt_f`), which its hires sizes count in.
const OPT_F: u64 = 8;

/// The hires pass's sizes as A1111 makes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct A1111Target {
    /// `hr_upscale_to_x/y`: the size the image (or latents) are upscaled to.
    pub upscale: (u64, u64),
    /// `truncate_x/y`: latent cells cropped off the upscale's (both sides given in another
    /// aspect), half (rounded down) on the left or top.
    pub truncate: (u64, u64),
}

impl A1111Target {
    /// `calculate_target_resolution` from the first pass's `width` x `height`, `hr_scale`
    /// and `hr_resize_x`/`hr_resize_y` (0: not given).
    pub fn new((w, h): (u64, u64), scale: f64, (rx, ry): (u64, u64)) -> Self {
        let (upscale, truncate) = match (rx, ry) {
            (0, 0) => (
                ((w as f64 * scale) as u64, (h as f64 * scale) as u64),
                (0, 0),
            ),
            (x, 0) => ((x, x * h / w), (0, 0)),
            (0, y) => ((y * w / h, y), (0, 0)),
            (x, y) => {
                // Upscaled to cover, as A1111 compares the ratios: in floats.
                let up = if (w as f64 / h as f64) < (x as f64 / y as f64) {
                    (x, x * h / w)
                } else {
                    (y * w / h, y)
                };
                (up, ((up.0 - x) / OPT_F, (up.1 - y) / OPT_F))
            }
        };
        Self { upscale, truncate }
    }

    /// The pass's size: the upscale's whole cells less the truncated ones (the latents'
    /// shape after `sample_hr_pass`'s crop), in pixels.
    pub fn size(&self) -> (u64, u64) {
        let side = |up: u64, t: u64| (up / OPT_F).saturating_sub(t) * OPT_F;
        (
            side(self.upscale.0, self.truncate.0),
            side(self.upscale.1, self.truncate.1),
        )
    }
}

/// An upscaler's name: a built-in one's or, whatever else it is, an UPSCALERS_DIR model's
/// (which the submit checks against the folder).
pub fn upscaler_rule(v: &Value) -> Result<String, String> {
    match v.as_str() {
        Some(s) if !s.is_empty() && s.chars().count() <= UPSCALER_NAME_MAX => Ok(s.to_string()),
        _ => Err(format!(
            "must be an upscaler's name: one of {}, or an UPSCALERS_DIR model's \
             (GET /sdapi/v1/upscalers lists them)",
            every_upscaler_name(&[])
        )),
    }
}

/// Checks the hires fields (`map` holds those of [`FIELDS`] the request sent) for the
/// validated first pass `first`; `sampler` is the second pass's when it names its own.
pub fn validate_hires(
    map: &Map<String, Value>,
    first: &ValidRequest,
    sampler: Option<HiresSampler>,
) -> Result<ValidHires, ApiError> {
    let mut r = FieldReader::new(map, &FIELDS);
    let scale = r.number("hr_scale", 0.0, 16.0);
    let resize_x = r.int("hr_resize_x", 0, 16 * SIZE_MAX);
    let resize_y = r.int("hr_resize_y", 0, 16 * SIZE_MAX);
    let upscaler = r.with("hr_upscaler", upscaler_rule);
    let upscaler_sent = r.value("hr_upscaler").is_some();
    let steps = r.int("hr_second_pass_steps", 0, STEPS_MAX);
    let strength = r.number("denoising_strength", 0.0, 1.0);
    let prompt = r.text("hr_prompt", 0, PROMPT_MAX_CHARS);
    let negative_prompt = r.text("hr_negative_prompt", 0, PROMPT_MAX_CHARS);

    let (w, h) = (first.width as u64, first.height as u64);
    let scale_value = scale.unwrap_or(HR_SCALE_DEFAULT);
    let (rx, ry) = (resize_x.unwrap_or(0), resize_y.unwrap_or(0));
    // A1111's sizes, and the fields that decide them.
    let target = A1111Target::new((w, h), scale_value, (rx, ry));
    let fields: &'static [&'static str] = match (rx, ry) {
        (0, 0) => &["hr_scale"],
        (_, 0) => &["hr_resize_x"],
        (0, _) => &["hr_resize_y"],
        _ => &["hr_resize_x", "hr_resize_y"],
    };
    let (tw, th) = target.size();
    let fits = |v: u64| (SIZE_MIN..=SIZE_MAX).contains(&v);
    if !(fits(tw) && fits(th)) {
        let (ux, uy) = target.upscale;
        for f in fields {
            r.fail(
                f,
                format!(
                    "the hires size {tw}x{th} from {w}x{h} (A1111's: upscaled to {ux}x{uy}, \
                     in whole cells of {OPT_F}, cropped to cover) must be \
                     {SIZE_MIN}..={SIZE_MAX} a side"
                ),
            );
        }
    }
    let steps_value = match steps {
        Some(0) | None => first.steps,
        Some(s) => s as usize,
    };
    let strength_value = strength.unwrap_or(DENOISING_DEFAULT);
    // The default strength counts too; a broken one is reported once, by its own rule.
    let usable = strength.or(r
        .value("denoising_strength")
        .is_none()
        .then_some(DENOISING_DEFAULT));
    let rule = first.step_rule.for_hires();
    if let Some(rule) = usable.and_then(|s| {
        let (steps, strength) = (("hires steps", steps_value), ("denoising_strength", s));
        super::steps::strength_rule(rule, steps, strength)
    }) {
        r.fail("denoising_strength", rule);
    }
    // One set of LoRAs runs both passes: hr_prompt may repeat the prompt's tags, no others.
    let mut hr_prompt = None;
    if let Some(p) = prompt.filter(|p| !p.is_empty()) {
        let (text, tags) = sdserve_pipeline::lora::extract_lora_tags(&p);
        if tags
            .iter()
            .any(|(n, wt)| !first.loras.iter().any(|(m, v)| m == n && v == wt))
        {
            r.fail(
                "hr_prompt",
                "its <lora:...> tags must be the prompt's (one set of LoRAs runs both passes)",
            );
        }
        hr_prompt = Some(text.trim().to_string());
    }
    let hr_negative = negative_prompt.filter(|p| !p.is_empty());
    // As for the prompts: an emphasis weight past float32 would make the image NaN.
    if first.prompt_syntax == PromptSyntax::A1111 {
        for (field, text) in [
            ("hr_prompt", &hr_prompt),
            ("hr_negative_prompt", &hr_negative),
        ] {
            let pieces = text.as_deref().map(parse_attention).unwrap_or_default();
            if let Some(w) = pieces
                .iter()
                .map(|p| p.weight)
                .find(|&w| !(w as f32).is_finite())
            {
                r.fail(
                    field,
                    format!("an emphasis weight must stay a finite float32 number (got {w:e})"),
                );
            }
        }
        // Its scheduled texts are counted with the model's schedulers (`job_spec`).
        if let Some(p) = &hr_prompt {
            for rule in super::schedule::and_rules(p) {
                r.fail("hr_prompt", rule);
            }
        }
    }
    r.finish()?;

    let (upscale_w, upscale_h) = target.upscale;
    let upscaler_name = upscaler.unwrap_or_else(|| UPSCALER_DEFAULT.to_string());
    let upscaler = upscaler_named(&upscaler_name);
    let mut infotext = vec![("Denoising strength", py_float(strength_value))];
    if let Some(s) = &sampler {
        if let Some(name) = s.name {
            infotext.push(("Hires sampler", name.to_string()));
        }
        if let Some(schedule) = s.schedule {
            infotext.push(("Hires schedule type", schedule.to_string()));
        }
    }
    if let Some(p) = &hr_prompt {
        infotext.push(("Hires prompt", crate::png::quote(p)));
    }
    if let Some(p) = &hr_negative {
        infotext.push(("Hires negative prompt", crate::png::quote(p)));
    }
    match (rx, ry) {
        (0, 0) => infotext.push(("Hires upscale", py_float(scale_value))),
        _ => infotext.push(("Hires resize", format!("{rx}x{ry}"))),
    }
    if let Some(s) = steps.filter(|&s| s > 0) {
        infotext.push(("Hires steps", s.to_string()));
    }
    if upscaler_sent {
        infotext.push(("Hires upscaler", upscaler_name.clone()));
    }
    Ok(ValidHires {
        params: Hires {
            width: tw as usize,
            height: th as usize,
            upscale_width: upscale_w as usize,
            upscale_height: upscale_h as usize,
            upscaler,
            steps: steps_value,
            strength: strength_value,
            scheduler: sampler.as_ref().map(|s| s.kind),
            schedule: sampler.as_ref().and_then(|s| s.sigmas),
            prompt: hr_prompt,
            negative_prompt: hr_negative,
        },
        upscaler_name,
        upscaler_field: "hr_upscaler",
        prompt_field: "hr_prompt",
        size_fields: fields,
        scale: (rx == 0 && ry == 0).then_some(scale_value),
        infotext,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn first(width: usize, height: usize) -> ValidRequest {
        let body = json!({"prompt": "a cat", "width": width, "height": height, "steps": 10});
        super::super::validate_object(body.as_object().unwrap()).unwrap()
    }

    fn check(body: Value, w: usize, h: usize) -> Result<ValidHires, ApiError> {
        validate_hires(body.as_object().unwrap(), &first(w, h), None)
    }

    fn sizes(v: &ValidHires) -> [usize; 4] {
        let p = &v.params;
        [p.width, p.height, p.upscale_width, p.upscale_height]
    }

    #[test]
    fn target_sizes_follow_a1111() {
        // A1111's defaults: hr_scale 2, Latent, the first pass's steps, strength 0.75.
        let v = check(json!({}), 256, 320).unwrap();
        assert_eq!(sizes(&v), [512, 640, 512, 640]);
        assert_eq!(v.upscaler_name, "Latent");
        assert_eq!((v.params.steps, v.params.strength), (10, 0.75));
        // int(512 * 1.3) = 665: the image resized to that, its latents 83 cells of 8.
        assert_eq!(
            sizes(&check(json!({"hr_scale": 1.3}), 512, 512).unwrap()),
            [664, 664, 665, 665]
        );
        // One side given: the other keeps the aspect (integer division, as A1111).
        let v = check(json!({"hr_resize_x": 512}), 256, 320).unwrap();
        assert_eq!(sizes(&v), [512, 640, 512, 640]);
        let v = check(json!({"hr_resize_y": 384}), 384, 256).unwrap();
        assert_eq!(sizes(&v), [576, 384, 576, 384]);
        // Both, in another aspect: upscaled to cover, then cropped.
        let v = check(json!({"hr_resize_x": 512, "hr_resize_y": 384}), 256, 256).unwrap();
        assert_eq!(sizes(&v), [512, 384, 512, 512]);
        // Both, same aspect: no crop.
        let v = check(json!({"hr_resize_x": 512, "hr_resize_y": 512}), 256, 256).unwrap();
        assert_eq!(sizes(&v), [512, 512, 512, 512]);
    }

    /// A1111's own `calculate_target_resolution` on a grid of requests
    /// (`tools/make_upscale_hires_fixtures.py`); each pass that fits runs at the upscale's
    /// cells less the truncated ones.
    #[test]
    fn sizes_are_a1111s_calculate_target_resolution() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../pipeline/tests/fixtures/upscale-hires.json"
        );
        let json: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let rows = json["sizes"].as_array().unwrap();
        let (mut fitting, mut cropped) = (0, 0);
        for row in rows {
            let n = |i: usize| row[i].as_u64().unwrap();
            let (w, h, scale, rx, ry) = (n(0), n(1), row[2].as_f64().unwrap(), n(3), n(4));
            let t = A1111Target::new((w, h), scale, (rx, ry));
            assert_eq!(
                (t.upscale, t.truncate),
                ((n(5), n(6)), (n(7), n(8))),
                "{row}"
            );
            let body = json!({"hr_scale": scale, "hr_resize_x": rx, "hr_resize_y": ry});
            let (tw, th) = t.size();
            match check(body, w as usize, h as usize) {
                Ok(v) => {
                    assert_eq!(sizes(&v), [tw, th, n(5), n(6)].map(|v| v as usize), "{row}");
                    fitting += 1;
                    cropped += usize::from(t.truncate != (0, 0));
                }
                Err(_) => assert!(
                    ![tw, th].iter().all(|s| (SIZE_MIN..=SIZE_MAX).contains(s)),
                    "{row}: refused, yet {tw}x{th} fits"
                ),
            }
        }
        assert_eq!(rows.len(), 1120);
        assert!(
            fitting > 200 && cropped > 50,
            "{fitting} fit, {cropped} cropped"
        );
    }

    #[test]
    fn infotext_keys_are_a1111_s() {
        let v = check(
            json!({"hr_scale": 2, "hr_upscaler": "None", "hr_second_pass_steps": 4,
                   "denoising_strength": 0.5, "hr_prompt": "a dog, sharp"}),
            256,
            256,
        )
        .unwrap();
        assert_eq!(
            v.infotext_suffix(),
            ", Denoising strength: 0.5, Hires prompt: \"a dog, sharp\", Hires upscale: 2.0, \
             Hires steps: 4, Hires upscaler: None"
        );
        assert_eq!(v.params.upscaler, Upscaler::Resize);
        assert_eq!(v.params.prompt.as_deref(), Some("a dog, sharp"));
        let v = check(json!({"hr_resize_x": 512, "hr_prompt": ""}), 256, 256).unwrap();
        assert_eq!(
            v.infotext_suffix(),
            ", Denoising strength: 0.75, Hires resize: 512x0"
        );
        assert_eq!(v.params.prompt, None);
    }

    #[test]
    fn broken_rules_name_a1111_fields() {
        let fields = |body: Value| -> Vec<String> {
            match check(body, 512, 512).unwrap_err() {
                ApiError::Validation(f) => f.into_iter().map(|f| f.field).collect(),
                e => panic!("{e:?}"),
            }
        };
        assert_eq!(fields(json!({"hr_scale": 2})), ["hr_scale"]);
        assert_eq!(fields(json!({"hr_scale": 0.4})), ["hr_scale"]);
        assert_eq!(fields(json!({"hr_resize_x": 1024})), ["hr_resize_x"]);
        assert_eq!(
            fields(json!({"hr_resize_x": 1024, "hr_resize_y": 100})),
            ["hr_resize_x", "hr_resize_y"]
        );
        assert_eq!(
            fields(json!({"hr_scale": 1, "hr_upscaler": ""})),
            ["hr_upscaler"]
        );
        assert_eq!(
            fields(json!({"hr_scale": 1, "hr_upscaler": 4})),
            ["hr_upscaler"]
        );
        assert_eq!(
            fields(json!({"hr_scale": 1, "hr_second_pass_steps": 1, "denoising_strength": 0.5})),
            ["denoising_strength"]
        );
        assert_eq!(
            fields(json!({"hr_scale": 1, "hr_second_pass_steps": 51})),
            ["hr_second_pass_steps"]
        );
        assert_eq!(
            fields(json!({"hr_scale": 1, "hr_prompt": "x <lora:other:1>"})),
            ["hr_prompt"]
        );
        assert_eq!(
            fields(
                json!({"hr_scale": 1, "hr_negative_prompt": "((a:99999999999999999999999):99999999999999999999999)"})
            ),
            ["hr_negative_prompt"]
        );
        for (name, upscaler) in upscalers() {
            assert_eq!(upscaler_name(&upscaler), name);
            assert_eq!(upscaler_named(name), upscaler);
        }
        // Any other name is a model's, found (or refused) at submit.
        let model = upscaler_named("4x-UltraSharp");
        assert!(matches!(&model, Upscaler::Model(m) if m.name == "4x-UltraSharp"));
        assert_eq!(upscaler_name(&model), "4x-UltraSharp");
    }
}
