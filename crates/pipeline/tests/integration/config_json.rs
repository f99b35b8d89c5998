//! Config files as diffusers' `save_config` writes them (`-Infinity` and friends bare), read as
//! Python's `json` reads them (`tools/make_config_json_fixtures.py`): every value with its Python
//! type, each scheduler class's saved config building diffusers' timesteps (DPM's default
//! `lambda_min_clipped: -Infinity` and a finite one), and a tiny model whose own scheduler config
//! is such a file loading and generating diffusers' image.

use crate::common;

use std::ops::ControlFlow;
use std::path::Path;

use candle_core::{DType, Device};
use common::{fixture_path, request_params, tiny_model_json, ScratchDir};
use sdserve_pipeline::config_json;
use sdserve_pipeline::error::read_json;
use sdserve_pipeline::pipeline::StableDiffusion;
use sdserve_pipeline::schedulers::{build_with, SchedulerConfig, SchedulerKind};
use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{json, Value};

/// A value with the Python type `json.load` gives it, tagged as the fixture script tags it.
struct Tagged(Value);

impl<'de> Deserialize<'de> for Tagged {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Tagged;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_unit<E>(self) -> Result<Tagged, E> {
                Ok(Tagged(json!({"null": null})))
            }
            fn visit_bool<E>(self, b: bool) -> Result<Tagged, E> {
                Ok(Tagged(json!({ "bool": b })))
            }
            fn visit_u64<E>(self, i: u64) -> Result<Tagged, E> {
                Ok(Tagged(json!({ "int": i })))
            }
            fn visit_i64<E>(self, i: i64) -> Result<Tagged, E> {
                Ok(Tagged(json!({ "int": i })))
            }
            fn visit_f64<E>(self, x: f64) -> Result<Tagged, E> {
                // Python's repr of the non-finite ones.
                let v = match x {
                    x if x.is_nan() => json!("nan"),
                    f64::INFINITY => json!("inf"),
                    f64::NEG_INFINITY => json!("-inf"),
                    x => json!(x),
                };
                Ok(Tagged(json!({ "float": v })))
            }
            fn visit_str<E>(self, s: &str) -> Result<Tagged, E> {
                Ok(Tagged(json!({ "str": s })))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Tagged, A::Error> {
                let mut items = Vec::new();
                while let Some(Tagged(v)) = seq.next_element()? {
                    items.push(v);
                }
                Ok(Tagged(json!({ "list": items })))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Tagged, A::Error> {
                let mut pairs = Vec::new();
                while let Some((k, Tagged(v))) = map.next_entry::<String, Tagged>()? {
                    pairs.push(json!([k, v]));
                }
                Ok(Tagged(json!({ "dict": pairs })))
            }
        }
        d.deserialize_any(V)
    }
}

fn dir() -> std::path::PathBuf {
    fixture_path("config-json")
}

fn expected() -> Value {
    let text = std::fs::read_to_string(dir().join("expected.json")).unwrap();
    // Strict JSON, its floats rounded as Python rounds them (serde_json's default parse may not).
    config_json::from_str(&text).unwrap()
}

#[test]
fn files_read_as_python_reads_them() {
    let expected = expected();
    let files = expected["files"].as_object().unwrap();
    assert!(files.len() >= 14, "{} files", files.len());
    for (name, want) in files {
        let text = std::fs::read_to_string(dir().join(name)).unwrap();
        let Tagged(got) = config_json::from_str(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(got, want["loaded"], "{name}");
    }
    // The DPM file holds the bare token; serde_json alone refuses it.
    let dpm = std::fs::read_to_string(dir().join("DPMSolverMultistepScheduler.json")).unwrap();
    assert!(dpm.contains("\"lambda_min_clipped\": -Infinity"));
    assert!(serde_json::from_str::<Value>(&dpm).is_err());
}

#[test]
fn strings_spelling_the_tokens_stay_strings() {
    let path = dir().join("strings.json");
    let v: Value = read_json(&path).unwrap();
    assert_eq!(v["note"], "Infinity, -Infinity and NaN stay text");
    assert_eq!(v["quoted"], "say \"-Infinity\", then \\NaN");
    assert_eq!(v["Infinity"], "a key");
    assert_eq!(v["nested"]["values"][5], "NaN");
    // A serde_json Value has no non-finite number: null.
    assert_eq!(v["lambda_min_clipped"], Value::Null);
    let cfg: SchedulerConfig = read_json(&path).unwrap();
    assert_eq!(cfg.lambda_min_clipped, Some(f64::NEG_INFINITY));
    assert_eq!(cfg.timestep_spacing.as_deref(), Some("leading"));
}

/// The model's own scheduler of a config: its class, on the schedule the file asks for.
fn own_timesteps(path: &Path, steps: usize) -> Vec<f64> {
    let cfg: SchedulerConfig = read_json(path).unwrap_or_else(|e| panic!("{e}"));
    let kind = SchedulerKind::default_for(&cfg).unwrap();
    let schedule = SchedulerKind::default_schedule_for(&cfg).unwrap();
    build_with(kind, schedule, &cfg, steps)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .timesteps()
        .to_vec()
}

#[test]
fn saved_scheduler_configs_build_diffusers_timesteps() {
    let expected = expected();
    let steps = expected["steps"].as_u64().unwrap() as usize;
    let mut checked = 0;
    for (name, want) in expected["files"].as_object().unwrap() {
        let Some(want) = want["timesteps"].as_array() else {
            continue;
        };
        let want: Vec<f64> = want.iter().map(|t| t.as_f64().unwrap()).collect();
        let got = own_timesteps(&dir().join(name), steps);
        assert_eq!(got.len(), want.len(), "{name}: {got:?} vs {want:?}");
        for (a, b) in got.iter().zip(&want) {
            // Integer schedules exactly; the sigma-derived ones (KDPM2, DPM SDE) to float32.
            assert!(
                (a - b).abs() <= 1e-4 * b.abs().max(1.0),
                "{name}: {got:?} vs {want:?}"
            );
        }
        checked += 1;
    }
    assert_eq!(checked, 13);
}

#[test]
fn a_model_whose_scheduler_config_holds_minus_infinity_loads_and_generates() {
    // tiny-a with DPMSolverMultistepScheduler's saved config as its own scheduler: diffusers'
    // `dpmpp_2m` image of tiny-a is that class from tiny-a's config, the same file's values.
    let scratch = ScratchDir::new("config-json-model");
    let model_dir = scratch.0.join("tiny-a-dpm");
    std::fs::create_dir_all(model_dir.join("scheduler")).unwrap();
    let source = fixture_path("tiny-a");
    for part in [
        "model_index.json",
        "text_encoder",
        "tokenizer",
        "unet",
        "vae",
    ] {
        std::os::unix::fs::symlink(source.join(part), model_dir.join(part)).unwrap();
    }
    std::fs::copy(
        dir().join("DPMSolverMultistepScheduler.json"),
        model_dir.join("scheduler/scheduler_config.json"),
    )
    .unwrap();
    let model = StableDiffusion::load(&model_dir, &Device::Cpu, DType::F32).expect("loads");
    let request = &tiny_model_json("tiny-a")["images"]["dpmpp_2m"];
    let mut params = request_params(request);
    params.scheduler = None;
    let image = model
        .generate(&params, &mut |_| ControlFlow::Continue(()))
        .expect("generates")
        .remove(0);
    let reference =
        candle_core::safetensors::load(fixture_path("tiny-a.safetensors"), &Device::Cpu)
            .unwrap()
            .remove("image.dpmpp_2m")
            .unwrap();
    let failure = common::image_failure("tiny-a, own DPM config", &image.pixels, &reference);
    assert!(failure.is_none(), "{failure:?}");
}
