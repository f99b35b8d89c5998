//! A ControlNet unit's infotext entry (`ControlNet N: "..."`) as the sd-webui-controlnet
//! extension writes it: `ControlNetUnit.serialize`, `Field: str(value)` for each of its
//! `infotext_fields` in their order, joined by `, ` (Python's `str` of the floats, `True` /
//! `False`, the enums' values), written when the units are read, before any preprocessing.
//! For a unit an A1111 client sent, the values are the unit's as the extension's pydantic model
//! holds them: `module` and `model` as sent (a model's ` [hash]` with it), `processor_res`
//! an int and the thresholds floats, each the preprocessor's slider default (as the
//! extension's source writes it: `value=100` is an int) when absent, -1 or outside the slider
//! (`bound_check_params`). Checked against the extension's own serialisation by
//! tools/make_controlnet_infotext_fixtures.py.

use std::fmt;

use serde_json::{Map, Value};

use sdserve_pipeline::controlnet::ControlMode;

use super::controlnet_fit::ResizeMode;

/// Python's `str(float)` (its shortest round-trip repr): `1.0`, `0.35`, `1e-05`, `1e+16`.
pub(crate) fn py_float(x: f64) -> String {
    if !x.is_finite() {
        return match x {
            x if x.is_nan() => "nan".into(),
            x if x > 0.0 => "inf".into(),
            _ => "-inf".into(),
        };
    }
    // Rust's `{:e}` gives the same shortest digits: `-1.25e-5`.
    let sci = format!("{x:e}");
    let (mantissa, exp) = sci.split_once('e').expect("`{:e}` has an exponent");
    let exp: i32 = exp.parse().expect("an integer exponent");
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mantissa),
    };
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    // `float_repr_style` "short": scientific below 1e-4 and from 1e16.
    if !(-4..16).contains(&exp) {
        let m = match digits.len() {
            1 => digits,
            _ => format!("{}.{}", &digits[..1], &digits[1..]),
        };
        let e_sign = if exp < 0 { '-' } else { '+' };
        return format!("{sign}{m}e{e_sign}{:02}", exp.abs());
    }
    let point = exp + 1;
    let body = if point <= 0 {
        format!("0.{}{digits}", "0".repeat(point.unsigned_abs() as usize))
    } else if point as usize >= digits.len() {
        format!("{digits}{}.0", "0".repeat(point as usize - digits.len()))
    } else {
        let at = point as usize;
        format!("{}.{}", &digits[..at], &digits[at..])
    };
    format!("{sign}{body}")
}

/// A number as the unit holds it: an int (pydantic's for `processor_res`, or a slider default
/// the source writes as one) or a float.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum PyNumber {
    Int(i64),
    Float(f64),
}

impl fmt::Display for PyNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PyNumber::Int(i) => write!(f, "{i}"),
            PyNumber::Float(x) => f.write_str(&py_float(*x)),
        }
    }
}

/// A slider `bound_check_params` checks a field against: its range and default.
#[derive(Debug, Clone, Copy)]
pub(super) struct Bound {
    pub(super) min: f64,
    pub(super) max: f64,
    pub(super) default: PyNumber,
}

/// `PreprocessorParameter(visible=False)`: 0..=1, 0.5.
pub(super) const HIDDEN: Bound = Bound {
    min: 0.0,
    max: 1.0,
    default: PyNumber::Float(0.5),
};

/// The class's resolution slider (`Preprocessor.slider_resolution`): 64..=2048, 512.
pub(super) const RESOLUTION: Bound = Bound {
    min: crate::validate::preprocessor::RESOLUTION_MIN as f64,
    max: crate::validate::preprocessor::RESOLUTION_MAX as f64,
    default: PyNumber::Int(crate::validate::preprocessor::RESOLUTION_DEFAULT as i64),
};

/// The sliders whose default the extension's source writes as an int (`value=100`,
/// `"value": 127`), by module and slider (1, 2); every visible resolution slider's is one.
const INT_DEFAULTS: [(&str, usize); 8] = [
    ("canny", 1),
    ("canny", 2),
    ("threshold", 1),
    ("scribble_xdog", 1),
    ("softedge_teed", 1),
    ("softedge_anyline", 1),
    ("depth_leres", 1),
    ("depth_leres", 2),
];

/// The legacy modules (`legacy_preprocessors.py`) without a resolution: they set a
/// `resolution` attribute the check never reads and keep the class's `slider_resolution`.
const LEGACY_HIDDEN_RESOLUTION: [&str; 5] = [
    "reference_only",
    "reference_adain",
    "reference_adain+attn",
    "recolor_luminance",
    "recolor_intensity",
];

/// The sliders `bound_check_params` reads for a module of `controlnet_modules` (resolution,
/// slider 1, slider 2); `None` for another module.
pub(super) fn module_bounds(module: &str) -> Option<[Bound; 3]> {
    let m = super::controlnet_modules::find(module)?;
    let mut out = [HIDDEN; 3];
    for (k, (slider, bound)) in m.sliders.iter().zip(&mut out).enumerate() {
        *bound = match slider {
            Some(s) => Bound {
                min: s.min,
                max: s.max,
                default: match k == 0 || INT_DEFAULTS.contains(&(m.name, k)) {
                    true => PyNumber::Int(s.value as i64),
                    false => PyNumber::Float(s.value),
                },
            },
            None if k == 0 && LEGACY_HIDDEN_RESOLUTION.contains(&m.name) => RESOLUTION,
            // `PreprocessorShuffle`: `PreprocessorParameter(value=512, visible=False)`.
            None if k == 0 && m.name == "shuffle" => Bound {
                default: PyNumber::Int(512),
                ..HIDDEN
            },
            None => HIDDEN,
        };
    }
    Some(out)
}

/// One field after pydantic (`int(...)` for an int field) and `bound_check_params`: the
/// unit's default -1 when absent, the slider's default outside it.
fn bounded(v: Option<&Value>, bound: Bound, int_field: bool) -> PyNumber {
    let x = v.and_then(Value::as_f64).unwrap_or(-1.0);
    let x = if int_field { x.trunc() } else { x };
    match (x < bound.min || x > bound.max, int_field) {
        (true, _) => bound.default,
        (false, true) => PyNumber::Int(x as i64),
        (false, false) => PyNumber::Float(x),
    }
}

/// What the extension's infotext writes of a unit (`ControlNetUnit.infotext_fields`).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct UnitRecord {
    pub(crate) module: String,
    pub(crate) model: String,
    pub(crate) weight: f64,
    pub(crate) resize_mode: &'static str,
    pub(crate) processor_res: PyNumber,
    pub(crate) threshold_a: PyNumber,
    pub(crate) threshold_b: PyNumber,
    pub(crate) guidance: (f64, f64),
    pub(crate) pixel_perfect: bool,
    pub(crate) control_mode: ControlMode,
}

impl UnitRecord {
    /// A unit as an A1111 client sent it (its `module`, `model`, `processor_res`,
    /// `threshold_a/b`, `pixel_perfect`), the sliders its module's, with the fields the
    /// caller read already (`weight`, the guidance window, the modes).
    pub(super) fn of_sent(
        unit: &Map<String, Value>,
        bounds: [Bound; 3],
        (weight, guidance): (f64, (f64, f64)),
        resize_mode: ResizeMode,
        control_mode: ControlMode,
    ) -> Self {
        let text = |k: &str, default: &str| {
            unit.get(k)
                .and_then(Value::as_str)
                .unwrap_or(default)
                .to_string()
        };
        Self {
            module: text("module", "none"),
            model: text("model", "None"),
            weight,
            resize_mode: resize_mode.label(),
            processor_res: bounded(unit.get("processor_res"), bounds[0], true),
            threshold_a: bounded(unit.get("threshold_a"), bounds[1], false),
            threshold_b: bounded(unit.get("threshold_b"), bounds[2], false),
            guidance,
            pixel_perfect: unit.get("pixel_perfect").and_then(Value::as_bool) == Some(true),
            control_mode,
        }
    }

    /// `ControlNetUnit.serialize`: empty where a value holds `,` or `:` (a module or model
    /// name; the extension logs "Unexpected tokens" and writes `ControlNet N: ` with nothing).
    pub(crate) fn infotext(&self) -> String {
        if [&self.module, &self.model]
            .iter()
            .any(|v| v.contains([',', ':']))
        {
            return String::new();
        }
        let py_bool = |b: bool| if b { "True" } else { "False" };
        format!(
            "Module: {}, Model: {}, Weight: {}, Resize Mode: {}, Processor Res: {}, Threshold A: {}, Threshold B: {}, Guidance Start: {}, Guidance End: {}, Pixel Perfect: {}, Control Mode: {}",
            self.module,
            self.model,
            py_float(self.weight),
            self.resize_mode,
            self.processor_res,
            self.threshold_a,
            self.threshold_b,
            py_float(self.guidance.0),
            py_float(self.guidance.1),
            py_bool(self.pixel_perfect),
            self.control_mode.label()
        )
    }
}

/// A unit's infotext entry as the extension serialises it (its own `resize_mode`, even where
/// the unit takes img2img's init image and fit); the numbers checked natively later.
pub(super) fn entry(
    unit: &Map<String, Value>,
    i: usize,
    control_mode: ControlMode,
) -> Result<String, crate::error::ApiError> {
    let number = |k: &str| unit.get(k).and_then(Value::as_f64);
    let end = match unit.get("guidance_end") {
        None | Some(Value::Null) => number("guidance"),
        Some(v) => v.as_f64(),
    };
    let module = unit.get("module").and_then(Value::as_str).unwrap_or("none");
    // A module of `controlnet_modules` (the preprocessor read it already).
    let bounds = module_bounds(module).unwrap_or([HIDDEN; 3]);
    let record = UnitRecord::of_sent(
        unit,
        bounds,
        (
            number("weight").unwrap_or(1.0),
            (number("guidance_start").unwrap_or(0.0), end.unwrap_or(1.0)),
        ),
        super::controlnet_fit::resize_mode(unit.get("resize_mode"), i)?,
        control_mode,
    );
    Ok(record.infotext())
}

#[cfg(test)]
#[path = "controlnet_infotext_tests.rs"]
mod tests;
