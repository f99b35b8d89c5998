//! What several pipeline test files share: reading the committed diffusers fixtures and comparing
//! tensors. Each test binary uses part of it.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use sdserve_pipeline::pipeline::{GenerationParams, RgbImage, StableDiffusion};
use sdserve_pipeline::schedulers::{SchedulerConfig, SchedulerKind};

pub mod a1111_guidance;
pub mod fuzz;
pub mod lora_reference;

/// `crates/pipeline/tests/fixtures/<name>`.
pub fn fixture_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// A fresh directory of its own (per process, tag and test thread) under the system's temporary
/// directory, removed on drop.
pub struct ScratchDir(pub PathBuf);

impl ScratchDir {
    pub fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "sdserve-{tag}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    /// Writes `bytes` to `file` in the directory; returns the directory.
    pub fn put(&self, file: &str, bytes: &[u8]) -> &Path {
        std::fs::write(self.0.join(file), bytes).unwrap();
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `fixtures/<name>.json` of a tiny model (`tools/make_tiny_models.py`), read as Python's json
/// wrote it (`config_json`): its recorded scheduler configs hold `-Infinity`, which reads as null
/// in a `serde_json::Value`.
pub fn tiny_model_json(name: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(fixture_path(&format!("{name}.json")))
        .unwrap_or_else(|e| panic!("{name}.json: {e}"));
    sdserve_pipeline::config_json::from_str(&text).unwrap_or_else(|e| panic!("{name}.json: {e}"))
}

/// The generation a recorded request describes: prompts (no negative prompt: ""), steps, size,
/// seed, guidance and the scheduler's API name (null: the model's own scheduler config).
pub fn request_params(request: &serde_json::Value) -> GenerationParams {
    GenerationParams {
        prompt: request["prompt"].as_str().unwrap().to_string(),
        negative_prompt: request["negative_prompt"]
            .as_str()
            .unwrap_or("")
            .to_string(),
        steps: request["steps"].as_u64().unwrap() as usize,
        width: request["width"].as_u64().unwrap() as usize,
        height: request["height"].as_u64().unwrap() as usize,
        seed: request["seed"].as_u64().unwrap(),
        guidance_scale: request["guidance_scale"].as_f64().unwrap(),
        scheduler: request["scheduler"]
            .as_str()
            .map(|name| SchedulerKind::from_name(name).expect("known scheduler")),
        ..Default::default()
    }
}

/// A sampler fixture case's request (tools/make_*_sampler*_fixtures.py): [`request_params`] with
/// its `batch_size`, and its init image (`init_image`, `strength`, `step_rule`) where it has one.
pub fn sampler_case_params(case: &serde_json::Value) -> GenerationParams {
    let params = GenerationParams {
        batch_size: case["batch_size"].as_u64().unwrap() as usize,
        ..request_params(case)
    };
    match case.get("init_image") {
        None => params,
        Some(image) => GenerationParams {
            init_image: Some(sdserve_pipeline::pipeline::InitImage {
                image: read_png(image.as_str().unwrap()),
                mask: None,
                strength: case["strength"].as_f64().unwrap(),
            }),
            step_rule: sdserve_pipeline::pipeline::StepRule::from_name(
                case["step_rule"].as_str().unwrap(),
            )
            .unwrap(),
            ..params
        },
    }
}

/// The images `params` generates, run to the end.
pub fn generate(model: &StableDiffusion, params: &GenerationParams) -> Vec<RgbImage> {
    model
        .generate(params, &mut |_| std::ops::ControlFlow::Continue(()))
        .expect("generates")
}

/// The first image `params` generates, run to the end.
pub fn generate_one(model: &StableDiffusion, params: &GenerationParams) -> RgbImage {
    generate(model, params).remove(0)
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

/// `schedulers.{json,safetensors}` (`tools/make_scheduler_fixtures.py`), loaded once per test
/// binary.
pub fn scheduler_fixtures() -> &'static Fixtures {
    static F: std::sync::OnceLock<Fixtures> = std::sync::OnceLock::new();
    F.get_or_init(|| Fixtures::load("schedulers"))
}

/// The scheduler fixtures of every API name: `schedulers` and `schedulers-karras` (the names
/// added later, in a file of their own: see tools/make_scheduler_fixtures.py).
pub fn all_scheduler_fixtures() -> [&'static Fixtures; 2] {
    static F: std::sync::OnceLock<Fixtures> = std::sync::OnceLock::new();
    [
        scheduler_fixtures(),
        F.get_or_init(|| Fixtures::load("schedulers-karras")),
    ]
}

/// The entries of `names` in every scheduler fixture file, with their file.
pub fn scheduler_entries(names: &[&str]) -> Vec<(&'static Fixtures, &'static serde_json::Value)> {
    all_scheduler_fixtures()
        .into_iter()
        .flat_map(|f| f.entries_for(names).into_iter().map(move |e| (f, e)))
        .collect()
}

/// The API name a fixture entry's scheduler is: its `scheduler`, or that sampler's Karras name
/// when the entry's overrides set `use_karras_sigmas` (as `default_for` reads a model's file).
pub fn kind_of_entry(e: &serde_json::Value) -> SchedulerKind {
    let kind = SchedulerKind::from_name(e["scheduler"].as_str().unwrap()).unwrap();
    match e["overrides"]["use_karras_sigmas"].as_bool() {
        Some(karras) => SchedulerKind::of(kind.sampler(), karras).unwrap(),
        None => kind,
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

/// The bounds every end-to-end image test holds against diffusers' image (`reference`, a u8
/// tensor of the image's shape): a mean absolute difference of at most 1/255 and at most 0.5 % of
/// values off by more than 8. Prints the figures; returns the failure to report, if any.
pub fn image_failure(label: &str, ours: &[u8], reference: &Tensor) -> Option<String> {
    let reference: Vec<u8> = reference.flatten_all().unwrap().to_vec1().unwrap();
    let (mean, over) = pixel_difference(ours, &reference);
    eprintln!("{label}: mean abs diff {mean:.4}, fraction > 8: {over:.5}");
    (mean > 1.0 || over > 0.005).then(|| format!("{label}: mean {mean:.3}, >8 {over:.4}"))
}

/// Every case of an image fixture run on its tiny model (`case["model"]`, each loaded once), its
/// images held to [`image_failure`] against `want(label)` (a u8 tensor, one row per image of
/// the batch): the failures to report, and how many images were compared.
pub fn image_case_failures(
    cases: &serde_json::Map<String, serde_json::Value>,
    params_of: impl Fn(&serde_json::Value) -> GenerationParams,
    want: impl Fn(&str) -> Tensor,
) -> (Vec<String>, usize) {
    let mut models: HashMap<String, StableDiffusion> = HashMap::new();
    let (mut failures, mut images) = (Vec::new(), 0);
    for (label, case) in cases {
        let name = case["model"].as_str().unwrap();
        let model = models.entry(name.to_string()).or_insert_with(|| {
            StableDiffusion::load(&fixture_path(name), &Device::Cpu, DType::F32).unwrap()
        });
        let params = params_of(case);
        let got = model
            .generate(&params, &mut |_| std::ops::ControlFlow::Continue(()))
            .unwrap();
        failures.extend(batch_failures(label, &got, &want(label)));
        images += got.len();
    }
    (failures, images)
}

/// A batch's images held to [`image_failure`], image `i` against row `i` of `want` (a u8
/// tensor, one row per image): the failures to report. The counts must agree.
pub fn batch_failures(label: &str, got: &[RgbImage], want: &Tensor) -> Vec<String> {
    assert_eq!(got.len(), want.dim(0).unwrap(), "{label}: image count");
    got.iter()
        .enumerate()
        .filter_map(|(i, image)| {
            let row = want.get(i).unwrap();
            image_failure(&format!("{label}[{i}]"), &image.pixels, &row)
        })
        .collect()
}

/// A batch's images held to a sampler test's tight bounds against the same sampler's reference
/// run (image `i` against row `i` of `want`, a u8 tensor): every value within `max_bound` and a
/// mean absolute difference of at most `mean_bound`. Prints the figures; returns the failures.
pub fn tight_batch_failures(
    label: &str,
    got: &[RgbImage],
    want: &Tensor,
    max_bound: i32,
    mean_bound: f64,
) -> Vec<String> {
    assert_eq!(got.len(), want.dim(0).unwrap(), "{label}: image count");
    let mut failures = Vec::new();
    for (i, image) in got.iter().enumerate() {
        let row: Vec<u8> = want
            .get(i)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let (mean, _) = pixel_difference(&image.pixels, &row);
        let max = image
            .pixels
            .iter()
            .zip(&row)
            .map(|(&a, &b)| (a as i32 - b as i32).abs())
            .max()
            .unwrap();
        eprintln!("{label}[{i}]: max {max}, mean abs diff {mean:.4}");
        if max > max_bound || mean > mean_bound {
            failures.push(format!("{label}[{i}]: max {max}, mean {mean:.4}"));
        }
    }
    failures
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

/// The image as A1111 hands it to an upscaler network (tests/integration/esrgan.rs, tests/integration/swinir.rs): BGR, `/ 255` in float64, then float32.
pub fn a1111_input(image: &RgbImage) -> Tensor {
    let (w, h) = (image.width as usize, image.height as usize);
    let mut v = vec![0f32; 3 * w * h];
    for (i, p) in image.pixels.chunks(3).enumerate() {
        for c in 0..3 {
            v[c * w * h + i] = (p[2 - c] as f64 / 255.0) as f32;
        }
    }
    Tensor::from_vec(v, (1, 3, h, w), &Device::Cpu).unwrap()
}
