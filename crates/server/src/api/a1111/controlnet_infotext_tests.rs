//! The entries against the extension's own `ControlNetUnit.from_dict(unit).serialize()`
//! (tools/make_controlnet_infotext_fixtures.py).

use serde_json::{json, Value};

use super::*;

#[test]
fn floats_are_written_as_python_s_str() {
    for (x, python) in [
        (1.0, "1.0"),
        (0.35, "0.35"),
        (-0.0, "-0.0"),
        (100.7, "100.7"),
        (0.0001, "0.0001"),
        (0.00001, "1e-05"),
        (0.000015, "1.5e-05"),
        (123456789012345.6, "123456789012345.6"),
        (1e16, "1e+16"),
        (2.5e17, "2.5e+17"),
        (1.0 / 3.0, "0.3333333333333333"),
    ] {
        assert_eq!(py_float(x), python, "{x:?}");
    }
    assert_eq!(PyNumber::Int(512).to_string(), "512");
    assert_eq!(PyNumber::Float(512.0).to_string(), "512.0");
}

/// Every module's defaults (absent and -1), values within its sliders (ints made floats,
/// floats made ints), values outside them; the general fields' forms (a model's hash,
/// weights, the guidance alias, resize mode aliases, pixel perfect, control modes).
#[test]
fn entries_are_the_extension_s_serialisation_of_the_unit_sent() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/controlnet-infotext/units.json"
    );
    let rows: Vec<Value> = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    assert!(rows.len() > 150, "{}", rows.len());
    let wrong: Vec<String> = rows
        .iter()
        .filter_map(|row| {
            let unit = row["unit"].as_object().unwrap();
            let mode = super::super::controlnet::control_mode(unit.get("control_mode"), 0);
            let got = entry(unit, 0, mode.unwrap()).unwrap();
            let want = row["infotext"].as_str().unwrap();
            (got != want).then(|| format!("{}\n  ours:   {got}\n  theirs: {want}", json!(unit)))
        })
        .collect();
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn a_value_outside_the_slider_is_its_default_and_processor_res_an_int() {
    let canny = module_bounds("canny").unwrap();
    let unit =
        json!({"module": "canny", "processor_res": 640.9, "threshold_a": 300, "threshold_b": 20})
            .as_object()
            .unwrap()
            .clone();
    let r = UnitRecord::of_sent(
        &unit,
        canny,
        (1.0, (0.0, 1.0)),
        ResizeMode::CropAndResize,
        ControlMode::Balanced,
    );
    // int(640.9); 300 is above the slider's 255: its default, an int in the source.
    assert_eq!(r.processor_res, PyNumber::Int(640));
    assert_eq!(r.threshold_a, PyNumber::Int(100));
    assert_eq!(r.threshold_b, PyNumber::Float(20.0));
    assert_eq!(r.model, "None");
}
