//! Heun, DPM2, DPM2 ancestral and LCM against diffusers 0.42.1 (fixtures from
//! `tools/make_sampler_fixtures.py`): schedules, whole runs on fixed model outputs (from the first
//! timestep and begun mid-run as img2img begins). The images are in sampler_images.rs.

use crate::common;

use candle_core::{DType, Device, IndexOp};
use common::{max_abs_diff, steps_of, Fixtures};
use sdserve_pipeline::rng::TorchRng;
use sdserve_pipeline::schedulers::{
    build, dpm2, heun, lcm, Scheduler, SchedulerConfig, SchedulerKind,
};

/// Timesteps, relative: integer or float32 values; the interpolated ones (KDPM2) come from a
/// float32 `_sigma_to_t` of sigmas built on torch's training sigmas, whose vectorised sqrt is not
/// always correctly rounded (1 ulp; see schedulers.rs), and DPM2 a's `sigmas_down` (a difference
/// of nearly equal squares) magnifies that: ~2e-6 of the timestep.
const TIMESTEP_RTOL: f64 = 1e-5;
/// Below timestep 1, absolute: the same 1-ulp sigma next to the smallest training sigma moves an
/// interpolated timestep by up to ~0.01 (of a UNet timestep; the image tests show no effect).
const SMALL_TIMESTEP_TOL: f64 = 0.02;
/// Sigmas and init_noise_sigma: float32 values, relative.
const SIGMA_RTOL: f64 = 2e-6;
/// Scaled inputs and samples of a whole run, max abs (samples start at sigma ~ 14.6)...
const TRAJ_TOL: f32 = 5e-5;
/// ...or relative to the largest value of the reference (linear betas start at sigma ~ 157).
const TRAJ_RTOL: f32 = 4e-6;

/// The bound for a tensor like `want`.
fn traj_tol(want: &candle_core::Tensor) -> f32 {
    let max = want
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    TRAJ_TOL.max(TRAJ_RTOL * max)
}

fn fixtures() -> &'static Fixtures {
    static F: std::sync::OnceLock<Fixtures> = std::sync::OnceLock::new();
    F.get_or_init(|| Fixtures::load("samplers"))
}

fn rel(a: f64, b: f64) -> f64 {
    if a == b {
        0.0
    } else {
        (a - b).abs() / b.abs().max(1.0)
    }
}

/// Timesteps, relative to at least 10 (an interpolated timestep near 1 moves as one near 10).
fn rel_t(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs().max(10.0)
}

/// Builds the entry's scheduler (`Class.from_config(cfg)` + `set_timesteps(steps)`).
fn build_entry(e: &serde_json::Value, cfg: &SchedulerConfig, steps: usize) -> Box<dyn Scheduler> {
    match e["scheduler"].as_str().unwrap() {
        "heun" => Box::new(heun::HeunDiscrete::new(cfg, steps).unwrap()),
        "dpm2" => Box::new(dpm2::KDpm2::new(cfg, steps).unwrap()),
        "dpm2_a" => Box::new(dpm2::KDpm2Ancestral::new(cfg, steps).unwrap()),
        "lcm" => Box::new(lcm::Lcm::new(cfg, steps).unwrap()),
        other => panic!("no scheduler {other}"),
    }
}

/// The float32 sigma arrays of a class that has them: (`sigmas`, `sigmas_interpol`).
fn sigmas_of(
    e: &serde_json::Value,
    cfg: &SchedulerConfig,
    steps: usize,
) -> Vec<(&'static str, Vec<f32>)> {
    match e["scheduler"].as_str().unwrap() {
        "heun" => {
            let s = heun::HeunDiscrete::new(cfg, steps).unwrap();
            vec![("sigmas", s.sigmas().to_vec())]
        }
        "dpm2" => {
            let s = dpm2::KDpm2::new(cfg, steps).unwrap();
            vec![
                ("sigmas", s.sigmas().to_vec()),
                ("sigmas_interpol", s.sigmas_interpol().to_vec()),
            ]
        }
        "dpm2_a" => {
            let s = dpm2::KDpm2Ancestral::new(cfg, steps).unwrap();
            vec![("sigmas", s.sigmas().to_vec())]
        }
        _ => vec![],
    }
}

#[test]
fn schedules_match_diffusers() {
    let f = fixtures();
    let (mut worst_t, mut worst_small, mut worst_s, mut cases) = (0f64, 0f64, 0f64, 0);
    for e in f.meta["entries"].as_array().unwrap() {
        let prefix = e["prefix"].as_str().unwrap();
        let cfg = f.scheduler_config(&e["overrides"]);
        for steps in steps_of(&e["schedule_steps"]) {
            let key = format!("{prefix}.{steps}");
            let s = build_entry(e, &cfg, steps);
            assert_eq!(
                s.order() as u64,
                e["order"].as_u64().unwrap(),
                "{key}: order"
            );
            let want = f.f64s(&format!("{key}.timesteps"));
            assert_eq!(
                s.timesteps().len(),
                want.len(),
                "{key}: timesteps {:?} vs {want:?}",
                s.timesteps()
            );
            for (a, b) in s.timesteps().iter().zip(&want) {
                let d = rel_t(*a, *b);
                if b.abs() < 1.0 {
                    let d = (a - b).abs();
                    assert!(
                        d <= SMALL_TIMESTEP_TOL,
                        "{key}.timesteps: {:?} vs {want:?}",
                        s.timesteps()
                    );
                    worst_small = worst_small.max(d);
                    continue;
                }
                assert!(
                    d <= TIMESTEP_RTOL,
                    "{key}.timesteps: {:?} vs {want:?}",
                    s.timesteps()
                );
                worst_t = worst_t.max(d);
            }
            let want_ins = f.f64s(&format!("{key}.init_noise_sigma"))[0];
            let d = rel(s.init_noise_sigma(), want_ins);
            assert!(
                d <= SIGMA_RTOL,
                "{key}.init_noise_sigma {} vs {want_ins}",
                s.init_noise_sigma()
            );
            for (name, ours) in sigmas_of(e, &cfg, steps) {
                let want = f.f64s(&format!("{key}.{name}"));
                assert_eq!(ours.len(), want.len(), "{key}.{name} length");
                for (a, b) in ours.iter().zip(&want) {
                    // The never-read first interpolated sigma of KDPM2 is NaN in both.
                    if b.is_nan() {
                        assert!(a.is_nan(), "{key}.{name}: {ours:?} vs {want:?}");
                        continue;
                    }
                    let d = rel(*a as f64, *b);
                    assert!(d <= SIGMA_RTOL, "{key}.{name}: {ours:?} vs {want:?}");
                    worst_s = worst_s.max(d);
                }
            }
            cases += 1;
        }
    }
    assert!(cases >= 80, "only {cases} schedule cases");
    eprintln!(
        "schedules: {cases} cases, timesteps max rel diff {worst_t:e} (below 1: abs {worst_small:e}), \
         sigmas {worst_s:e}"
    );
}

/// Runs `s` from `begin` over the fixture's model outputs and compares every scaled input and
/// sample; returns the largest difference.
fn run_trajectory(f: &Fixtures, key: &str, s: &mut dyn Scheduler, begin: usize) -> f32 {
    let outputs = f.get(&format!("{key}.model_outputs"));
    let scaled = f.get(&format!("{key}.scaled_inputs"));
    let samples = f.get(&format!("{key}.samples"));
    let n = s.timesteps().len() - begin;
    assert_eq!(outputs.dim(0).unwrap(), n, "{key}: model output count");
    s.set_begin_index(begin);
    let mut rng = TorchRng::new(f.meta["step_seed"].as_u64().unwrap());
    // The run continues from our own samples, so errors compound as in a real run.
    let mut sample = samples.i(0).unwrap();
    let mut d_max = 0f32;
    for i in 0..n {
        let x = s.scale_model_input(&sample, begin + i).unwrap();
        let want = scaled.i(i).unwrap();
        let d = max_abs_diff(&x, &want);
        assert!(d <= traj_tol(&want), "{key}: scaled input {i} off by {d}");
        d_max = d_max.max(d);
        sample = s
            .step(
                &outputs.i(i).unwrap(),
                begin + i,
                &sample,
                std::slice::from_mut(&mut rng),
            )
            .unwrap();
        let want = samples.i(i + 1).unwrap();
        let d = max_abs_diff(&sample, &want);
        assert!(
            d <= traj_tol(&want),
            "{key}: sample after step {i} off by {d}"
        );
        d_max = d_max.max(d);
    }
    d_max
}

#[test]
fn trajectories_match_diffusers() {
    let f = fixtures();
    let mut worst: Vec<(String, f32)> = Vec::new();
    for e in f.meta["entries"].as_array().unwrap() {
        let prefix = e["prefix"].as_str().unwrap();
        let cfg = f.scheduler_config(&e["overrides"]);
        for steps in steps_of(&e["trajectory_steps"]) {
            let key = format!("{prefix}.{steps}");
            let d = run_trajectory(f, &key, build_entry(e, &cfg, steps).as_mut(), 0);
            worst.push((key, d));
        }
    }
    assert!(worst.len() >= 30, "only {} trajectories", worst.len());
    for (k, d) in &worst {
        eprintln!("  {k}: max abs diff {d:e}");
    }
    let overall = worst.iter().map(|w| w.1).fold(0f32, f32::max);
    eprintln!(
        "trajectories: {} runs, max abs diff {overall:e}",
        worst.len()
    );
}

/// img2img's start: `add_noise` at `timesteps[begin]`, then `set_begin_index(begin)`; a
/// second-order scheduler begins at `t_start * 2`, in the first half of a step.
#[test]
fn runs_begun_mid_schedule_match_diffusers() {
    let f = fixtures();
    let mut runs = 0;
    for e in f.meta["entries"].as_array().unwrap() {
        let Some(steps) = e["begins"]["steps"].as_u64() else {
            continue;
        };
        let prefix = e["prefix"].as_str().unwrap();
        let cfg = f.scheduler_config(&e["overrides"]);
        for begin in steps_of(&e["begins"]["starts"]) {
            let key = format!("{prefix}.{steps}.from{begin}");
            let mut s = build_entry(e, &cfg, steps as usize);
            // samples[0] is diffusers' add_noise(randn(seed), randn(seed + 1), timesteps[begin]).
            let seed = f.meta["sample_seed"].as_u64().unwrap();
            let randn = |seed| {
                TorchRng::new(seed)
                    .randn_tensor((1, 4, 8, 8), &Device::Cpu, DType::F32)
                    .unwrap()
            };
            let start = s.add_noise(&randn(seed), &randn(seed + 1), begin).unwrap();
            let want = f.get(&format!("{key}.samples")).i(0).unwrap();
            let d = max_abs_diff(&start, &want);
            assert!(d <= 1e-5, "{key}: add_noise off by {d}");
            let d = run_trajectory(f, &key, s.as_mut(), begin);
            eprintln!("  {key}: max abs diff {d:e}");
            runs += 1;
        }
    }
    assert!(runs >= 5, "only {runs} runs begun mid-schedule");
}

#[test]
fn bad_step_counts_and_configs_are_errors() {
    let f = fixtures();
    let cfg = f.scheduler_config(&serde_json::json!({}));
    assert!(heun::HeunDiscrete::new(&cfg, 0).is_err());
    assert!(dpm2::KDpm2::new(&cfg, 0).is_err());
    assert!(dpm2::KDpm2Ancestral::new(&cfg, 0).is_err());
    assert!(lcm::Lcm::new(&cfg, 0).is_err());
    // LCM picks its steps from the 50 of `original_inference_steps`: 51 is too many.
    let err = lcm::Lcm::new(&cfg, 51).err().expect("51 LCM steps");
    assert!(
        err.to_string().contains("original_inference_steps"),
        "{err}"
    );
    let cfg25 = f.scheduler_config(&serde_json::json!({"original_inference_steps": 25}));
    assert!(lcm::Lcm::new(&cfg25, 25).is_ok());
    assert!(lcm::Lcm::new(&cfg25, 26).is_err());
    let sample = f.scheduler_config(&serde_json::json!({"prediction_type": "sample"}));
    assert!(
        dpm2::KDpm2::new(&sample, 5).is_err(),
        "KDPM2 has no sample prediction"
    );
    assert!(dpm2::KDpm2Ancestral::new(&sample, 5).is_err());
    // Exponential and beta sigmas are tests/integration/sigma_schedules.rs's; two schedules at once are an
    // error naming the keys, as diffusers' `__init__` refuses them.
    let two = f.scheduler_config(
        &serde_json::json!({"use_karras_sigmas": true, "use_exponential_sigmas": true}),
    );
    let err = heun::HeunDiscrete::new(&two, 5)
        .err()
        .expect("two schedules");
    assert!(err.to_string().contains("use_exponential_sigmas"), "{err}");
    assert!(dpm2::KDpm2::new(&two, 5).is_err());
    assert!(dpm2::KDpm2Ancestral::new(&two, 5).is_err());
    let thresholding = f.scheduler_config(&serde_json::json!({"thresholding": true}));
    assert!(lcm::Lcm::new(&thresholding, 4).is_err());
}

/// The API names build these classes from the model's own config: `<name>` uniform even when
/// the file asks for Karras sigmas, `<name>_karras` with them (`SchedulerKind::config`).
#[test]
fn api_names_build_the_recorded_schedules() {
    let f = fixtures();
    let base = f.scheduler_config(&serde_json::json!({}));
    let karras_file = f.scheduler_config(&serde_json::json!({"use_karras_sigmas": true}));
    let mut checked = 0;
    for e in f.meta["entries"].as_array().unwrap() {
        let over = e["overrides"].as_object().unwrap();
        let karras = match over.len() {
            0 => false,
            1 if over.get("use_karras_sigmas") == Some(&serde_json::json!(true)) => true,
            _ => continue,
        };
        let name = e["scheduler"].as_str().unwrap();
        let api = if karras {
            format!("{name}_karras")
        } else {
            name.to_string()
        };
        let kind = SchedulerKind::from_name(&api).unwrap_or_else(|| panic!("no API name {api}"));
        assert_eq!(kind.karras(), karras, "{api}");
        for steps in steps_of(&e["schedule_steps"]) {
            let want = f.f64s(&format!(
                "{}.{steps}.timesteps",
                e["prefix"].as_str().unwrap()
            ));
            // The plain name ignores a file's Karras key; the Karras name needs none.
            for cfg in [&base, &karras_file] {
                let s = build(kind, cfg, steps).unwrap();
                assert_eq!(s.timesteps().len(), want.len(), "{api}.{steps}");
                for (a, b) in s.timesteps().iter().zip(&want) {
                    assert!(
                        (a - b).abs() <= 0.02_f64.max(1e-5 * b.abs()),
                        "{api}.{steps}: {a} vs {b}"
                    );
                }
            }
            checked += 1;
        }
    }
    assert!(checked >= 30, "only {checked} API-name schedules");
}
