//! A1111's variation seeds: our starting noise for (seed, variation seed, strength) against
//! A1111's own `slerp` run by torch on torch's CPU noise of the same seeds
//! (`tools/make_variation_fixtures.py`).

use crate::common;

use common::{max_abs_diff, Fixtures};

use candle_core::{Device, Tensor};
use sdserve_pipeline::pipeline::image_noise;
use sdserve_pipeline::rng::TorchRng;

#[test]
fn variation_noise_matches_a1111_slerp() {
    let fixtures = Fixtures::load("variation");
    let cases = fixtures.meta["cases"].as_object().unwrap();
    assert_eq!(cases.len(), 7);
    for (label, case) in cases {
        let seed = case["seed"].as_u64().unwrap();
        let variation_seed = case["variation_seed"].as_u64().unwrap();
        let strength = case["strength"].as_f64().unwrap();
        let dims: Vec<usize> = case["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect();
        let shape = (dims[0], dims[1], dims[2]);
        let mut rng = TorchRng::new(seed);
        let ours = image_noise(
            &mut rng,
            Some((variation_seed, strength)),
            shape,
            &Device::Cpu,
        )
        .unwrap()
        .squeeze(0)
        .unwrap();
        let want = fixtures.get(&format!("noise.{label}"));
        let d = max_abs_diff(&ours, want);
        eprintln!("{label}: max |ours - A1111| = {d:e}");
        // torch's float32 norms, sums, acos and sin against ours (f64 sums rounded once):
        // a few ulps of values about 1-4.
        assert!(d < 2e-5, "{label}: max |ours - A1111| = {d}");
        // The ends are either seed's noise exactly.
        let plain = |s: u64| {
            let t: Tensor = TorchRng::new(s)
                .randn_tensor(dims.as_slice(), &Device::Cpu, candle_core::DType::F32)
                .unwrap();
            t
        };
        if strength == 0.0 {
            assert_eq!(max_abs_diff(&ours, &plain(seed)), 0.0, "{label}");
        }
        if strength == 1.0 {
            assert_eq!(max_abs_diff(&ours, &plain(variation_seed)), 0.0, "{label}");
        }
    }
}
