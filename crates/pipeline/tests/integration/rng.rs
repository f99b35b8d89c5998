//! `TorchRng` against torch's own draws (fixtures from `tools/make_rng_fixtures.py`).

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use sdserve_pipeline::rng::TorchRng;

/// torch computes the block Box-Muller in float (Sleef); we round an f64 result once.
const TOL: f32 = 1e-5;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn load() -> (HashMap<String, Tensor>, serde_json::Value) {
    let tensors =
        candle_core::safetensors::load(fixtures().join("randn.safetensors"), &Device::Cpu)
            .expect("randn.safetensors");
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("randn.json")).unwrap())
            .unwrap();
    (tensors, meta)
}

fn max_abs_diff(ours: &[f32], want: &Tensor) -> f32 {
    let want: Vec<f32> = want.to_vec1().unwrap();
    assert_eq!(ours.len(), want.len());
    ours.iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max)
}

fn as_u64s(v: &serde_json::Value) -> Vec<u64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect()
}

#[test]
fn single_calls_match_torch() {
    let (tensors, meta) = load();
    let mut worst = 0f32;
    let mut count = 0;
    for seed in as_u64s(&meta["seeds"]) {
        for n in as_u64s(&meta["sizes"]) {
            let key = format!("randn.{seed}.{n}");
            let ours = TorchRng::new(seed).randn(n as usize);
            let d = max_abs_diff(&ours, &tensors[&key]);
            assert!(d <= TOL, "{key}: max abs diff {d}");
            worst = worst.max(d);
            count += 1;
        }
    }
    assert!(count >= 54);
    eprintln!("randn single calls: {count} cases, max abs diff {worst:e}");
}

#[test]
fn successive_calls_match_one_torch_generator() {
    let (tensors, meta) = load();
    let sequences: Vec<Vec<u64>> = meta["sequences"]
        .as_array()
        .unwrap()
        .iter()
        .map(as_u64s)
        .collect();
    let mut worst = 0f32;
    for seed in as_u64s(&meta["seeds"]) {
        for (k, calls) in sequences.iter().enumerate() {
            let key = format!("randn_seq.{seed}.{k}");
            let mut g = TorchRng::new(seed);
            let ours: Vec<f32> = calls.iter().flat_map(|&n| g.randn(n as usize)).collect();
            let d = max_abs_diff(&ours, &tensors[&key]);
            assert!(d <= TOL, "{key} {calls:?}: max abs diff {d}");
            worst = worst.max(d);
        }
    }
    eprintln!("randn sequences: max abs diff {worst:e}");
}

#[test]
fn randn_tensor_is_randn_reshaped() {
    let (tensors, _) = load();
    let t = TorchRng::new(42)
        .randn_tensor((1, 4, 8, 8), &Device::Cpu, DType::F32)
        .unwrap();
    assert_eq!(t.dims(), &[1, 4, 8, 8]);
    let flat: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
    let d = max_abs_diff(&flat, &tensors["randn.42.256"]);
    assert!(d <= TOL, "max abs diff {d}");
}
