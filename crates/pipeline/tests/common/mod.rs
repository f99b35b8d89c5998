//! What several pipeline test files share: reading the committed diffusers fixtures and comparing
//! tensors. Each test binary uses part of it.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use sdserve_pipeline::pipeline::RgbImage;
use sdserve_pipeline::schedulers::SchedulerConfig;

pub mod fuzz;

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

/// Largest absolute difference of two tensors of the same shape, compared in float32.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    let a = a.to_dtype(DType::F32).unwrap();
    let b = b.to_dtype(DType::F32).unwrap();
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Mean absolute difference of two images on 0..255 and the fraction of values off by more than 8
/// (the bounds the image tests state against diffusers).
pub fn pixel_difference(ours: &[u8], reference: &[u8]) -> (f64, f64) {
    assert_eq!(ours.len(), reference.len());
    let diffs: Vec<i32> = ours
        .iter()
        .zip(reference)
        .map(|(&a, &b)| (a as i32 - b as i32).abs())
        .collect();
    let mean = diffs.iter().map(|&d| d as f64).sum::<f64>() / diffs.len() as f64;
    let over = diffs.iter().filter(|&&d| d > 8).count() as f64 / diffs.len() as f64;
    (mean, over)
}

/// A PNG fixture of `fixtures/images/` as RGB8 (grey images repeated over the three channels).
pub fn read_png(name: &str) -> RgbImage {
    let file = std::fs::File::open(fixture_path("images").join(name)).unwrap();
    let mut decoder = png::Decoder::new(std::io::BufReader::new(file));
    decoder.set_transformations(png::Transformations::EXPAND | png::Transformations::STRIP_16);
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    let data = &buf[..info.buffer_size()];
    let pixels = match info.color_type {
        png::ColorType::Rgb => data.to_vec(),
        png::ColorType::Rgba => data.chunks(4).flat_map(|p| [p[0], p[1], p[2]]).collect(),
        png::ColorType::Grayscale => data.iter().flat_map(|&g| [g, g, g]).collect(),
        png::ColorType::GrayscaleAlpha => data.chunks(2).flat_map(|p| [p[0]; 3]).collect(),
        other => panic!("unexpected PNG colour type {other:?}"),
    };
    RgbImage {
        width: info.width,
        height: info.height,
        pixels,
    }
}
