//! DPM++ SDE against diffusers 0.42.1 `DPMSolverSDEScheduler` and the noise it draws from torchsde
//! 0.2.6 (fixtures from `tools/make_sde_fixtures.py`): numpy's `SeedSequence`, Python's
//! `round(x, 6)`, the Brownian tree's increments in a run's query order, and the noise sampler.

mod common;

use candle_core::{Device, Tensor};
use common::{max_abs_diff, Fixtures};
use sdserve_pipeline::schedulers::brownian::{round6, BrownianNoise, BrownianTree};
use sdserve_pipeline::schedulers::seed_sequence::SeedSequence;

/// Brownian increments and unit noise: float32 values of order 1 built from torch normals, whose
/// Box-Muller differs from ours by about 1e-6 (rng.rs).
const NOISE_TOL: f32 = 1e-5;

fn fixtures() -> &'static Fixtures {
    static F: std::sync::OnceLock<Fixtures> = std::sync::OnceLock::new();
    F.get_or_init(|| Fixtures::load("sde"))
}

/// Python's `float.hex()` text (`-0x1.8p-3`) as the exact double.
fn from_hex(text: &str) -> f64 {
    let (sign, rest) = match text.strip_prefix('-') {
        Some(r) => (-1.0, r),
        None => (1.0, text),
    };
    let rest = rest.strip_prefix("0x").expect("0x");
    let (mantissa, exp) = rest.split_once('p').expect("p");
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let digits = format!("{int}{frac}");
    let m = u64::from_str_radix(&digits, 16).expect("hex digits");
    let e: i32 = exp.parse().expect("exponent");
    sign * (m as f64) * 2f64.powi(e - 4 * frac.len() as i32)
}

fn u128_of(v: &serde_json::Value) -> u128 {
    v.as_str().expect("decimal string").parse().expect("u128")
}

fn seeds_of(v: &serde_json::Value) -> Vec<u64> {
    match v.as_array() {
        Some(list) => list.iter().map(|s| s.as_u64().unwrap()).collect(),
        None => vec![v.as_u64().unwrap()],
    }
}

#[test]
fn seed_sequences_match_numpy() {
    let cases = fixtures().meta["seed_sequences"].as_array().unwrap();
    for case in cases {
        let key: Vec<u128> = case["spawn_key"]
            .as_array()
            .unwrap()
            .iter()
            .map(u128_of)
            .collect();
        let expected: Vec<u32> = case["state"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let pool = case["pool_size"].as_u64().unwrap() as usize;
        let ours =
            SeedSequence::new(u128_of(&case["entropy"]), &key, pool).generate_state(expected.len());
        assert_eq!(ours, expected, "{case}");
    }
    assert!(cases.len() >= 8);
}

#[test]
fn round6_matches_python() {
    let cases = fixtures().meta["round6"].as_array().unwrap();
    for case in cases {
        let (x, expected) = (
            from_hex(case[0].as_str().unwrap()),
            case[1].as_str().unwrap(),
        );
        assert_eq!(round6(x), from_hex(expected), "round({x:e}, 6)");
    }
    assert!(cases.len() > 500);
}

/// The run's tree queries in its own order, then in reverse on a fresh tree without a cache:
/// both give torchsde's increments.
#[test]
fn tree_increments_match_torchsde_in_any_query_order() {
    let f = fixtures();
    let trees = f.meta["trees"].as_object().unwrap();
    let mut checked = 0;
    let mut worst = 0f32;
    for (label, tree) in trees {
        let (t0, t1) = (tree["t0"].as_f64().unwrap(), tree["t1"].as_f64().unwrap());
        let seeds = seeds_of(&tree["seeds"]);
        let queries: Vec<(f64, f64)> = tree["queries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|q| (q[0].as_f64().unwrap(), q[1].as_f64().unwrap()))
            .collect();
        if queries.is_empty() {
            continue; // a one-step run never draws noise
        }
        let expected: Vec<&Tensor> = (0..queries.len())
            .map(|i| f.get(&format!("tree.{label}.{i}")))
            .collect();
        let per_image = expected[0].elem_count() / seeds.len();
        for (order, cache) in [("forward", 45), ("reverse", 0)] {
            let mut ours: Vec<BrownianTree> = seeds
                .iter()
                .map(|&s| BrownianTree::with_cache(t0, t1, per_image, s.into(), cache).unwrap())
                .collect();
            let mut indices: Vec<usize> = (0..queries.len()).collect();
            if order == "reverse" {
                indices.reverse();
            }
            for i in indices {
                let (ta, tb) = queries[i];
                let w: Vec<f32> = ours
                    .iter_mut()
                    .flat_map(|t| t.increment(ta, tb).unwrap())
                    .collect();
                let w = Tensor::from_vec(w, expected[i].shape(), &Device::Cpu).unwrap();
                let d = max_abs_diff(&w, expected[i]);
                worst = worst.max(d);
                assert!(d < NOISE_TOL, "{label} query {i} ({order}): max diff {d}");
                checked += 1;
            }
        }
    }
    eprintln!("{checked} increments, worst max abs diff {worst:e}");
    assert!(checked >= 100);
}

#[test]
fn noise_sampler_matches_diffusers() {
    let f = fixtures();
    let mut checked = 0;
    for (label, sampler) in f.meta["samplers"].as_object().unwrap() {
        let calls = sampler["calls"].as_array().unwrap();
        if calls.is_empty() {
            continue;
        }
        let bounds = sampler["bounds"].as_array().unwrap();
        let traj = label.rsplit_once('.').unwrap().0;
        let seeds = f.meta["trajectories"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["prefix"] == traj)
            .map(|t| seeds_of(&t["seeds"]))
            .unwrap();
        let first = f.get(&format!("sampler.{label}.0"));
        let per_image = first.elem_count() / seeds.len();
        let mut noise = BrownianNoise::new(
            bounds[0].as_f64().unwrap() as f32,
            bounds[1].as_f64().unwrap() as f32,
            &seeds,
            per_image,
        )
        .unwrap();
        for (i, call) in calls.iter().enumerate() {
            let expected = f.get(&format!("sampler.{label}.{i}"));
            let (sigma, next) = (call[0].as_f64().unwrap(), call[1].as_f64().unwrap());
            let ours = noise.sample(sigma as f32, next as f32).unwrap();
            let ours = Tensor::from_vec(ours, expected.shape(), &Device::Cpu).unwrap();
            let d = max_abs_diff(&ours, expected);
            assert!(d < NOISE_TOL, "{label} call {i}: max diff {d}");
            checked += 1;
        }
    }
    assert!(checked >= 50, "{checked}");
}
