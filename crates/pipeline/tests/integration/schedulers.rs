//! Schedulers against diffusers 0.42.1 (fixtures from `tools/make_scheduler_fixtures.py`): each is
//! built from SD 1.5's real `scheduler_config.json` (plus the variant's keys) and must give the same
//! timesteps, sigmas, `init_noise_sigma`, scaled inputs and every sample of a run.

use crate::common;

use candle_core::{Device, IndexOp, Tensor};
use common::{
    kind_of_entry, max_abs_diff, scheduler_entries, scheduler_fixtures, steps_of, Fixtures,
};
use sdserve_pipeline::rng::TorchRng;
use sdserve_pipeline::schedulers::common::{ClassDefaults, ResolvedConfig};
use sdserve_pipeline::schedulers::{build, euler, lms, Sampler, SchedulerConfig, SchedulerKind};

/// The schedulers this file checks (dpm_solver/unipc have their own tests).
const OURS: [&str; 8] = [
    "pndm",
    "ddim",
    "euler",
    "euler_karras",
    "euler_a",
    "euler_a_karras",
    "lms",
    "lms_karras",
];
/// Timesteps: numpy float64 (or float32) values reproduced exactly.
const TIMESTEP_TOL: f64 = 1e-9;
/// Karras timesteps: `_sigma_to_t` interpolates between the float32 logs of neighbouring training
/// sigmas; two float32 ulps of such a log (2 * 2.4e-7, |log sigma| < 4 for SD 1.5) over the
/// smallest gap between neighbours (0.0033) is 1.5e-4 of a training timestep.
const KARRAS_TIMESTEP_TOL: f64 = 1.5e-4;
/// Sigmas and init_noise_sigma: float32 values, relative.
const SIGMA_RTOL: f64 = 1e-6;
/// Scaled inputs and samples of a whole run, max abs (samples start at sigma ~ 14.6).
const TRAJ_TOL: f32 = 5e-5;

fn seed(f: &Fixtures, key: &str) -> u64 {
    f.meta[key].as_u64().unwrap()
}

fn rel(a: f64, b: f64) -> f64 {
    if a == b {
        0.0
    } else {
        (a - b).abs() / b.abs().max(1e-30)
    }
}

/// The float32 sigmas of the schedulers that have them (built from the config with the name's
/// keys, as `build` does).
fn sigmas_of(kind: SchedulerKind, cfg: &SchedulerConfig, steps: usize) -> Option<Vec<f64>> {
    let cfg = &kind.config(cfg);
    let s: Vec<f32> = match kind.sampler() {
        Sampler::Euler => euler::EulerDiscrete::new(cfg, steps)
            .unwrap()
            .sigmas()
            .to_vec(),
        Sampler::EulerAncestral => euler::EulerAncestral::new(cfg, steps)
            .unwrap()
            .sigmas()
            .to_vec(),
        Sampler::Lms => lms::LmsDiscrete::new(cfg, steps).unwrap().sigmas().to_vec(),
        _ => return None,
    };
    Some(s.into_iter().map(f64::from).collect())
}

/// Distance in units in the last place between two finite f32 of the same sign.
fn ulps(a: f32, b: f32) -> u32 {
    (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs() as u32
}

#[test]
fn training_schedules_match_torch() {
    let f = scheduler_fixtures();
    let mut n = 0;
    for (case, over) in f.meta["train"].as_object().unwrap() {
        let cfg = f.scheduler_config(over);
        // The fixtures come from DDIMScheduler; betas do not depend on the class's spacing.
        let r = ResolvedConfig::resolve(&cfg, &ClassDefaults::with_spacing("leading")).unwrap();
        let betas: Vec<f32> = r.betas().unwrap();
        let ac: Vec<f32> = r.alphas_cumprod().unwrap();
        let want_b: Vec<f32> = f.get(&format!("train.{case}.betas")).to_vec1().unwrap();
        let want_ac: Vec<f32> = f
            .get(&format!("train.{case}.alphas_cumprod"))
            .to_vec1()
            .unwrap();
        assert_eq!(betas.len(), want_b.len());
        let worst_b = betas
            .iter()
            .zip(&want_b)
            .map(|(a, b)| ulps(*a, *b))
            .max()
            .unwrap();
        let worst_ac = ac
            .iter()
            .zip(&want_ac)
            .map(|(a, b)| ulps(*a, *b))
            .max()
            .unwrap();
        if case == "zsnr" {
            // rescale_betas_zero_snr takes the square root of a vector, which torch's vectorised
            // CPU kernel rounds to within 1 ulp (not always to nearest); betas = 1 - alphas then
            // carry those few ulps of alphas (up to ~2.4e-7 near 1) as an absolute error.
            let abs = |x: &[f32], y: &[f32]| {
                x.iter()
                    .zip(y)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max)
            };
            let (db, dac) = (abs(&betas, &want_b), abs(&ac, &want_ac));
            assert!(
                db <= 5e-7 && dac <= 5e-7,
                "train.zsnr: betas off by {db}, alphas_cumprod by {dac}"
            );
            eprintln!("train.{case}: betas max abs diff {db:e}, alphas_cumprod {dac:e}");
        } else {
            assert!(worst_b == 0, "train.{case}.betas: {worst_b} ulp off");
            assert!(
                worst_ac == 0,
                "train.{case}.alphas_cumprod: {worst_ac} ulp off"
            );
            eprintln!("train.{case}: betas and alphas_cumprod bit-exact");
        }
        n += 1;
    }
    assert!(n >= 5);
}

#[test]
fn schedules_match_diffusers() {
    let (mut worst_t, mut worst_tk, mut worst_s, mut cases) = (0f64, 0f64, 0f64, 0);
    for (f, e) in scheduler_entries(&OURS) {
        let prefix = e["prefix"].as_str().unwrap();
        let kind = kind_of_entry(e);
        let cfg = f.scheduler_config(&e["overrides"]);
        for steps in steps_of(&e["schedule_steps"]) {
            let key = format!("{prefix}.{steps}");
            let s = build(kind, &cfg, steps).unwrap_or_else(|err| panic!("{key}: {err}"));
            let want = f.f64s(&format!("{key}.timesteps"));
            assert_eq!(
                s.timesteps().len(),
                want.len(),
                "{key}: timesteps {:?} vs {want:?}",
                s.timesteps()
            );
            for (a, b) in s.timesteps().iter().zip(&want) {
                let d = (a - b).abs();
                // Karras timesteps come from np.log of float32 sigmas (numpy's own SIMD log,
                // which differs between CPUs by an ulp or two) and are float32.
                let tol = if prefix.contains("karras") {
                    KARRAS_TIMESTEP_TOL.max(b.abs() * 2.4e-7)
                } else {
                    TIMESTEP_TOL
                };
                assert!(d <= tol, "{key}.timesteps: {:?} vs {want:?}", s.timesteps());
                if prefix.contains("karras") {
                    worst_tk = worst_tk.max(d);
                } else {
                    worst_t = worst_t.max(d);
                }
            }
            let want_ins = f.f64s(&format!("{key}.init_noise_sigma"))[0];
            let d = rel(s.init_noise_sigma(), want_ins);
            assert!(
                d <= SIGMA_RTOL,
                "{key}.init_noise_sigma {} vs {want_ins}",
                s.init_noise_sigma()
            );
            worst_s = worst_s.max(d);
            if let Some(sig) = sigmas_of(kind, &cfg, steps) {
                let want = f.f64s(&format!("{key}.sigmas"));
                assert_eq!(sig.len(), want.len(), "{key}.sigmas length");
                for (a, b) in sig.iter().zip(&want) {
                    let d = rel(*a, *b);
                    assert!(d <= SIGMA_RTOL, "{key}.sigmas: {sig:?} vs {want:?}");
                    worst_s = worst_s.max(d);
                }
            }
            cases += 1;
        }
    }
    assert!(cases >= 100, "only {cases} schedule cases");
    eprintln!(
        "schedules: {cases} cases, timesteps max abs diff {worst_t:e} \
         (karras {worst_tk:e}), sigmas and init_noise_sigma max rel diff {worst_s:e}"
    );
}

#[test]
fn trajectories_match_diffusers() {
    let mut worst: Vec<(String, f32)> = Vec::new();
    for (f, e) in scheduler_entries(&OURS) {
        let prefix = e["prefix"].as_str().unwrap();
        let kind = kind_of_entry(e);
        let cfg = f.scheduler_config(&e["overrides"]);
        for steps in steps_of(&e["trajectory_steps"]) {
            let key = format!("{prefix}.{steps}");
            let mut s = build(kind, &cfg, steps).unwrap();
            let outputs = f.get(&format!("{key}.model_outputs"));
            let scaled = f.get(&format!("{key}.scaled_inputs"));
            let samples = f.get(&format!("{key}.samples"));
            let n = s.timesteps().len();
            assert_eq!(outputs.dim(0).unwrap(), n, "{key}: model output count");
            let mut rng = TorchRng::new(seed(f, "step_seed"));
            // The run continues from our own samples, so errors would compound as in a real run.
            let mut sample = samples.i(0).unwrap();
            let mut d_max = 0f32;
            for i in 0..n {
                let x = s.scale_model_input(&sample, i).unwrap();
                let d = max_abs_diff(&x, &scaled.i(i).unwrap());
                assert!(d <= TRAJ_TOL, "{key}: scaled input {i} off by {d}");
                d_max = d_max.max(d);
                sample = s
                    .step(
                        &outputs.i(i).unwrap(),
                        i,
                        &sample,
                        std::slice::from_mut(&mut rng),
                    )
                    .unwrap();
                let d = max_abs_diff(&sample, &samples.i(i + 1).unwrap());
                assert!(d <= TRAJ_TOL, "{key}: sample after step {i} off by {d}");
                d_max = d_max.max(d);
            }
            worst.push((key, d_max));
        }
    }
    assert!(worst.len() >= 30, "only {} trajectories", worst.len());
    let overall = worst.iter().map(|w| w.1).fold(0f32, f32::max);
    for (k, d) in &worst {
        eprintln!("  {k}: max abs diff {d:e}");
    }
    eprintln!(
        "trajectories: {} runs, max abs diff {overall:e}",
        worst.len()
    );
}

#[test]
fn initial_sample_uses_init_noise_sigma() {
    // samples[0] = randn(sample_seed) * init_noise_sigma; our TorchRng gives the same normals.
    for (f, e) in scheduler_entries(&OURS) {
        let name = e["prefix"].as_str().unwrap();
        if name != e["scheduler"] {
            continue; // a variant
        }
        let noise = TorchRng::new(seed(f, "sample_seed")).randn(4 * 8 * 8);
        let noise = Tensor::from_vec(noise, (1, 4, 8, 8), &Device::Cpu).unwrap();
        let s = build(
            SchedulerKind::from_name(name).unwrap(),
            &f.scheduler_config(&serde_json::json!({})),
            25,
        )
        .unwrap();
        let ours = noise.affine(s.init_noise_sigma(), 0.0).unwrap();
        let want = f.get(&format!("{name}.25.samples")).i(0).unwrap();
        let d = max_abs_diff(&ours, &want);
        assert!(d <= 1e-4, "{name}: initial sample off by {d}");
    }
}

#[test]
fn zero_steps_and_bad_configs_are_errors() {
    let f = scheduler_fixtures();
    let cfg = f.scheduler_config(&serde_json::json!({}));
    for name in OURS {
        assert!(build(SchedulerKind::from_name(name).unwrap(), &cfg, 0).is_err());
    }
    let bad = f.scheduler_config(&serde_json::json!({"beta_schedule": "quadratic"}));
    assert!(build(SchedulerKind::Euler, &bad, 10).is_err());
    let bad = f.scheduler_config(&serde_json::json!({"timestep_spacing": "sideways"}));
    assert!(build(SchedulerKind::Ddim, &bad, 10).is_err());
    let bad = f.scheduler_config(&serde_json::json!({"prediction_type": "sample"}));
    assert!(
        build(SchedulerKind::Pndm, &bad, 10).is_err(),
        "PNDM has no sample prediction"
    );
    // SD 1.5's own scheduler is PNDM.
    assert_eq!(
        SchedulerKind::default_for(&cfg).unwrap(),
        SchedulerKind::Pndm
    );
}
