//! What several pipeline test files share: reading the committed diffusers fixtures and comparing
//! tensors. Each test binary uses part of it.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use sdserve_pipeline::schedulers::SchedulerConfig;

/// `crates/pipeline/tests/fixtures/<name>`.
pub fn fixture_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// A fixture pair written by a `tools/make_*_fixtures.py` script: tensors in `<stem>.safetensors`,
/// the cases and their parameters in `<stem>.json`.
pub struct Fixtures {
    pub tensors: HashMap<String, Tensor>,
    pub meta: serde_json::Value,
}

impl Fixtures {
    pub fn load(stem: &str) -> Fixtures {
        let tensors = candle_core::safetensors::load(
            fixture_path(&format!("{stem}.safetensors")),
            &Device::Cpu,
        )
        .unwrap_or_else(|e| panic!("{stem}.safetensors: {e}"));
        let json = std::fs::read_to_string(fixture_path(&format!("{stem}.json")))
            .unwrap_or_else(|e| panic!("{stem}.json: {e}"));
        let meta = serde_json::from_str(&json).unwrap_or_else(|e| panic!("{stem}.json: {e}"));
        Fixtures { tensors, meta }
    }

    pub fn get(&self, key: &str) -> &Tensor {
        self.tensors
            .get(key)
            .unwrap_or_else(|| panic!("fixture {key} missing"))
    }

    pub fn f64s(&self, key: &str) -> Vec<f64> {
        self.get(key)
            .to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    /// The `entries` whose `scheduler` is one of `names`.
    pub fn entries_for(&self, names: &[&str]) -> Vec<&serde_json::Value> {
        self.meta["entries"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| names.contains(&e["scheduler"].as_str().unwrap()))
            .collect()
    }

    /// The fixture's base scheduler config with `overrides` on top, as `from_config` gets it.
    pub fn scheduler_config(&self, overrides: &serde_json::Value) -> SchedulerConfig {
        let mut cfg = self.meta["config"].clone();
        for (k, v) in overrides.as_object().unwrap() {
            cfg[k] = v.clone();
        }
        serde_json::from_value(cfg).unwrap()
    }
}

/// A JSON list of step indices.
pub fn steps_of(v: &serde_json::Value) -> Vec<usize> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as usize)
        .collect()
}

/// Largest absolute difference of two float32 tensors of the same shape.
pub fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}
