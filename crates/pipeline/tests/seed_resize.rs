//! A1111's seed resize (`seed_resize_from_w`/`_h`): our starting noise against A1111's own
//! `ImageRNG` run by torch on the CPU noise of the same seeds
//! (`tools/make_seed_resize_fixtures.py`): `first()` for each image, and the draw after it
//! (`next()`), which shows each image's generator goes on from the same place.

mod common;

use common::{max_abs_diff, Fixtures};

use candle_core::{DType, Device};
use sdserve_pipeline::pipeline::{image_noise, resized_image_noise};
use sdserve_pipeline::rng::TorchRng;

#[test]
fn seed_resize_noise_matches_a1111_image_rng() {
    let fixtures = Fixtures::load("seed_resize");
    let cases = fixtures.meta["cases"].as_object().unwrap();
    assert_eq!(cases.len(), 8);
    for (label, case) in cases {
        let ints = |k: &str| -> Vec<i64> {
            case[k]
                .as_array()
                .map(|a| a.iter().map(|v| v.as_i64().unwrap()).collect())
                .unwrap_or_default()
        };
        let (seeds, subseeds, dims) = (ints("seeds"), ints("subseeds"), ints("shape"));
        let strength = case["subseed_strength"].as_f64().unwrap();
        let from_w = case["seed_resize_from_w"].as_i64().unwrap();
        let from_h = case["seed_resize_from_h"].as_i64().unwrap();
        let shape = (dims[0] as usize, dims[1] as usize, dims[2] as usize);
        let noise = fixtures.get(&format!("noise.{label}"));
        let next = fixtures.get(&format!("next.{label}"));
        for (i, &seed) in seeds.iter().enumerate() {
            let seed = seed as u64;
            let variation = subseeds.get(i).map(|&s| (s as u64, strength));
            let mut rng = TorchRng::new(seed);
            // A1111: on when both sides are above 0; `from // 8` latent cells.
            let ours = if from_w > 0 && from_h > 0 {
                let from = ((from_h / 8) as usize, (from_w / 8) as usize);
                resized_image_noise(&mut rng, seed, variation, from, shape, &Device::Cpu)
            } else {
                image_noise(&mut rng, variation, shape, &Device::Cpu)
            }
            .unwrap()
            .squeeze(0)
            .unwrap();
            let want = noise.get(i).unwrap();
            let d = max_abs_diff(&ours, &want);
            eprintln!("{label} image {i}: max |ours - A1111| = {d:e}");
            // torch's CPU normals to ~2e-6 (libm's log/sin/cos against torch's), a variation's
            // float32 slerp a few ulps more (as tests/variation.rs).
            assert!(d < 2e-5, "{label} image {i}: {d}");
            let after = rng
                .randn_tensor(&[shape.0, shape.1, shape.2][..], &Device::Cpu, DType::F32)
                .unwrap();
            let d = max_abs_diff(&after, &next.get(i).unwrap());
            assert!(d < 2e-5, "{label} next {i}: {d}");
        }
    }
}
