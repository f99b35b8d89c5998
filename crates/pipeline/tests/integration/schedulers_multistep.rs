//! DPMSolverMultistep (`dpmpp_2m`, `dpmpp_2m_sde`) and UniPCMultistep (`unipc`), each also with
//! Karras sigmas (`_karras`), against
//! diffusers 0.42.1, with the fixtures of `tools/make_scheduler_fixtures.py` (SD 1.5's real
//! `scheduler_config.json`, plus v_prediction and spacing variants): timesteps exactly, the float32
//! sigmas, and every sample of a run fed with the recorded fake model outputs.

use crate::common;

use std::sync::OnceLock;

use candle_core::{DType, IndexOp, Tensor};
use common::{
    kind_of_entry, max_abs_diff, scheduler_entries, scheduler_fixtures, steps_of, Fixtures,
};
use sdserve_pipeline::rng::TorchRng;
use sdserve_pipeline::schedulers::dpm_solver::DpmSolverMultistep;
use sdserve_pipeline::schedulers::unipc::UniPcMultistep;
use sdserve_pipeline::schedulers::{build, Scheduler, SchedulerConfig, SchedulerKind};

const OURS: [&str; 6] = [
    "dpmpp_2m",
    "dpmpp_2m_karras",
    "dpmpp_2m_sde",
    "dpmpp_2m_sde_karras",
    "unipc",
    "unipc_karras",
];
/// Sigmas: float32 values, relative.
const SIGMA_RTOL: f64 = 1e-6;
/// Samples of a whole run, max abs. The fake model outputs are noise, so samples reach |x| ~ 50;
/// torch's 0-d float32 log/exp/expm1 (SLEEF) differ from libm by an ulp now and then, so we agree
/// to a few float32 ulps of those magnitudes rather than bit for bit.
const TRAJ_TOL: f32 = 5e-5;
/// The SDE solver's runs: its noise keeps samples growing (|x| ~ 80 after 25 steps, where a
/// float32 ulp is 7.6e-6) and its extra exp/sqrt scalars each differ from torch's by an ulp now
/// and then; 3e-4 is 40 ulps there (the third-order run reaches 2.2e-4). A wrong coefficient or
/// noise draw is off by whole units.
const SDE_TRAJ_TOL: f32 = 3e-4;
/// The same for the extra configs: torch's 3x3 `linalg.solve` (UniPC order 3) rounds in an
/// order we only match to an ulp, and 20-step runs amplify that.
const EXTRA_TRAJ_TOL: f32 = 1e-4;

/// This file's schedulers in the fixtures: every one in every variant (SD 1.5, v_prediction,
/// three spacings).
fn entries() -> Vec<(&'static Fixtures, &'static serde_json::Value)> {
    let ours = scheduler_entries(&OURS);
    assert!(
        ours.len() >= 34,
        "expected our schedulers in the fixtures, found {}",
        ours.len()
    );
    ours
}

fn has_nan(t: &Tensor) -> bool {
    t.flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .any(|v| v.is_nan())
}

/// Our scheduler for an API name (the class built from the config with the name's keys, as
/// `build` does), and its float32 sigmas.
fn make(name: &str, cfg: &SchedulerConfig, steps: usize) -> (Box<dyn Scheduler>, Vec<f32>) {
    let cfg = SchedulerKind::from_name(name).unwrap().config(cfg);
    match name {
        "dpmpp_2m" | "dpmpp_2m_karras" | "dpmpp_2m_sde" | "dpmpp_2m_sde_karras" => {
            make_class("dpm", &cfg, steps)
        }
        "unipc" | "unipc_karras" => make_class("unipc", &cfg, steps),
        other => panic!("not a multistep scheduler: {other}"),
    }
}

/// `Class.from_config(cfg)`: the class key of the fixture ("dpm" or "unipc").
fn make_class(class: &str, cfg: &SchedulerConfig, steps: usize) -> (Box<dyn Scheduler>, Vec<f32>) {
    match class {
        "dpm" => {
            let s = DpmSolverMultistep::new(cfg, steps).unwrap();
            let sigmas = s.sigmas().to_vec();
            (Box::new(s), sigmas)
        }
        "unipc" => {
            let s = UniPcMultistep::new(cfg, steps).unwrap();
            let sigmas = s.sigmas().to_vec();
            (Box::new(s), sigmas)
        }
        other => panic!("unknown class {other}"),
    }
}

/// Asserts the fixture's `{key}.timesteps` (exactly) and `{key}.sigmas` (to [`SIGMA_RTOL`]);
/// returns the largest relative sigma difference.
fn check_schedule(f: &Fixtures, key: &str, s: &dyn Scheduler, sigmas: &[f32]) -> f64 {
    // Integer timesteps: exactly.
    assert_eq!(
        s.timesteps(),
        f.f64s(&format!("{key}.timesteps")).as_slice(),
        "{key} timesteps"
    );
    let want = f.f64s(&format!("{key}.sigmas"));
    assert_eq!(sigmas.len(), want.len(), "{key} sigma count");
    let mut worst = 0f64;
    for (a, b) in sigmas.iter().zip(&want) {
        let d = (*a as f64 - b).abs() / b.abs().max(1e-30);
        worst = worst.max(d);
        assert!(d <= SIGMA_RTOL, "{key}: sigma {a} vs {b} (rel {d:e})");
    }
    worst
}

#[test]
fn schedules_match_diffusers() {
    let (mut cases, mut worst_s) = (0, 0f64);
    for (f, e) in entries() {
        let (name, prefix) = (kind_of_entry(e).name(), e["prefix"].as_str().unwrap());
        let cfg = f.scheduler_config(&e["overrides"]);
        for steps in steps_of(&e["schedule_steps"]) {
            let (s, sigmas) = make(name, &cfg, steps);
            let key = format!("{prefix}.{steps}");
            worst_s = worst_s.max(check_schedule(f, &key, s.as_ref(), &sigmas));
            assert_eq!(
                s.init_noise_sigma(),
                f.f64s(&format!("{key}.init_noise_sigma"))[0],
                "{key}"
            );
            cases += 1;
        }
    }
    eprintln!("multistep schedules: {cases} cases, sigmas max rel diff {worst_s:e}");
}

#[test]
fn trajectories_match_diffusers() {
    let (mut runs, mut worst) = (0, 0f32);
    for (f, e) in entries() {
        let (name, prefix) = (kind_of_entry(e).name(), e["prefix"].as_str().unwrap());
        let cfg = f.scheduler_config(&e["overrides"]);
        for steps in steps_of(&e["trajectory_steps"]) {
            let key = format!("{prefix}.{steps}");
            let (mut s, _) = make(name, &cfg, steps);
            let outputs = f.get(&format!("{key}.model_outputs"));
            let scaled = f.get(&format!("{key}.scaled_inputs"));
            let samples = f.get(&format!("{key}.samples"));
            // The SDE solvers draw from `generator=Generator().manual_seed(step_seed)` each step.
            let mut rng = TorchRng::new(f.meta["step_seed"].as_u64().unwrap());
            let mut sample = samples.i(0).unwrap();
            let mut run_worst = 0f32;
            let tol = if name.contains("sde") {
                SDE_TRAJ_TOL
            } else {
                TRAJ_TOL
            };
            for i in 0..s.timesteps().len() {
                // Both classes leave the model input as is.
                let x = s.scale_model_input(&sample, i).unwrap();
                assert_eq!(max_abs_diff(&x, &sample), 0.0, "{key} scaled input {i}");
                assert!(
                    max_abs_diff(&x, &scaled.i(i).unwrap()) <= tol,
                    "{key} scaled input {i}"
                );
                sample = s
                    .step(
                        &outputs.i(i).unwrap(),
                        i,
                        &sample,
                        std::slice::from_mut(&mut rng),
                    )
                    .unwrap();
                let d = max_abs_diff(&sample, &samples.i(i + 1).unwrap());
                worst = worst.max(d);
                run_worst = run_worst.max(d);
                assert!(d <= tol, "{key}: sample after step {i} differs by {d:e}");
            }
            if run_worst > 0.0 {
                eprintln!("{key}: max abs diff {run_worst:e}");
            }
            runs += 1;
        }
    }
    eprintln!("multistep trajectories: {runs} runs, samples max abs diff {worst:e}");
}

#[test]
fn factory_builds_the_same_schedules() {
    let f = scheduler_fixtures();
    let cfg = f.scheduler_config(&serde_json::json!({}));
    for name in OURS {
        let kind = SchedulerKind::from_name(name).unwrap();
        for steps in [1, 7, 20, 50] {
            let built = build(kind, &cfg, steps).unwrap();
            let (direct, _) = make(name, &cfg, steps);
            assert_eq!(built.timesteps(), direct.timesteps(), "{name} {steps}");
            assert_eq!(built.timesteps().len(), steps, "{name} {steps}");
        }
    }
    // A model whose file asks for Karras sigmas defaults to the Karras name; the plain name is
    // uniform there too (`from_config(cfg, use_karras_sigmas=False)`).
    let karras_cfg: SchedulerConfig = serde_json::from_value(serde_json::json!({
        "_class_name": "DPMSolverMultistepScheduler", "beta_schedule": "scaled_linear",
        "beta_start": 0.00085, "beta_end": 0.012, "use_karras_sigmas": true
    }))
    .unwrap();
    assert_eq!(
        SchedulerKind::default_for(&karras_cfg).unwrap(),
        SchedulerKind::DpmPp2mKarras
    );
    let own = DpmSolverMultistep::new(&karras_cfg, 20).unwrap();
    let karras = build(SchedulerKind::DpmPp2mKarras, &karras_cfg, 20).unwrap();
    let plain = build(SchedulerKind::DpmPp2m, &karras_cfg, 20).unwrap();
    assert_eq!(own.timesteps(), karras.timesteps());
    assert_ne!(plain.timesteps(), karras.timesteps());
    let uniform = build(SchedulerKind::DpmPp2m, &cfg, 20).unwrap();
    assert_eq!(plain.timesteps(), uniform.timesteps());
}

#[test]
fn half_precision_inputs_come_back_in_their_dtype() {
    let f = scheduler_fixtures();
    let cfg = f.scheduler_config(&serde_json::json!({}));
    let key = "unipc.5";
    let outputs = f.get(&format!("{key}.model_outputs"));
    let samples = f.get(&format!("{key}.samples"));
    for name in OURS {
        let (mut s, _) = make(name, &cfg, 5);
        let mut rng = TorchRng::new(0);
        let mut sample = samples.i(0).unwrap().to_dtype(DType::F16).unwrap();
        for i in 0..5 {
            let mo = outputs.i(i).unwrap().to_dtype(DType::F16).unwrap();
            sample = s
                .step(&mo, i, &sample, std::slice::from_mut(&mut rng))
                .unwrap();
            assert_eq!(sample.dtype(), DType::F16, "{name}");
        }
        let v: Vec<f32> = sample
            .to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!(v.iter().all(|x| x.is_finite()), "{name}");
    }
}

#[test]
fn bad_configs_are_errors() {
    let cfg = |v: serde_json::Value| -> SchedulerConfig { serde_json::from_value(v).unwrap() };
    assert!(DpmSolverMultistep::new(&cfg(serde_json::json!({})), 0).is_err());
    assert!(UniPcMultistep::new(&cfg(serde_json::json!({})), 0).is_err());
    // The noise-prediction SDE solver is not one of ours (sde-dpmsolver++ is).
    assert!(DpmSolverMultistep::new(
        &cfg(
            serde_json::json!({"algorithm_type": "sde-dpmsolver", "final_sigmas_type": "sigma_min"})
        ),
        5
    )
    .is_err());
    // diffusers refuses a zero final sigma with the noise-prediction solver.
    assert!(
        DpmSolverMultistep::new(&cfg(serde_json::json!({"algorithm_type": "dpmsolver"})), 5)
            .is_err()
    );
    assert!(DpmSolverMultistep::new(&cfg(serde_json::json!({"solver_type": "rk4"})), 5).is_err());
    assert!(UniPcMultistep::new(&cfg(serde_json::json!({"solver_type": "bh3"})), 5).is_err());
    // diffusers' noise-form UniPC ends in NaN with a zero final sigma; we refuse the config.
    assert!(UniPcMultistep::new(&cfg(serde_json::json!({"predict_x0": false})), 5).is_err());
    assert!(
        UniPcMultistep::new(&cfg(serde_json::json!({"timestep_spacing": "cosine"})), 5).is_err()
    );
    assert!(UniPcMultistep::new(&cfg(serde_json::json!({"prediction_type": "flow"})), 5).is_err());
}

// ---------------------------------------------------------------------------------------------
// Configs a model's own scheduler_config.json may carry (`tools/make_multistep_fixtures.py`).
// ---------------------------------------------------------------------------------------------

fn extra() -> &'static Fixtures {
    static F: OnceLock<Fixtures> = OnceLock::new();
    F.get_or_init(|| Fixtures::load("multistep"))
}

#[test]
fn extra_configs_match_diffusers() {
    let f = extra();
    let entries = f.meta["entries"].as_array().unwrap();
    assert!(
        entries.len() >= 20,
        "multistep.json lists {} cases",
        entries.len()
    );
    let (mut schedules, mut runs, mut worst_s, mut worst, mut nan_refs) = (0, 0, 0f64, 0f32, 0);
    for e in entries {
        let (case, class) = (e["case"].as_str().unwrap(), e["class"].as_str().unwrap());
        let cfg = f.scheduler_config(&e["overrides"]);
        for steps in steps_of(&e["schedule_steps"]) {
            let key = format!("{case}.{steps}");
            let (s, sigmas) = make_class(class, &cfg, steps);
            worst_s = worst_s.max(check_schedule(f, &key, s.as_ref(), &sigmas));
            schedules += 1;
        }
        for steps in steps_of(&e["trajectory_steps"]) {
            let key = format!("{case}.{steps}");
            let (mut s, _) = make_class(class, &cfg, steps);
            let outputs = f.get(&format!("{key}.model_outputs"));
            let samples = f.get(&format!("{key}.samples"));
            let mut rng = TorchRng::new(0);
            let mut sample = samples.i(0).unwrap();
            let mut run_worst = 0f32;
            for i in 0..steps {
                sample = s
                    .step(
                        &outputs.i(i).unwrap(),
                        i,
                        &sample,
                        std::slice::from_mut(&mut rng),
                    )
                    .unwrap();
                let want = samples.i(i + 1).unwrap();
                if has_nan(&want) {
                    // diffusers' UniPC bh1 with a zero final sigma: its last step multiplies
                    // B(h) = -inf by the Python 0 of an absent higher-order term. We keep the
                    // finite first-order update instead.
                    assert!(
                        cfg.solver_type.as_deref() == Some("bh1") && i + 1 == steps,
                        "{key}: unexpected NaN in the reference at step {i}"
                    );
                    assert!(!has_nan(&sample), "{key}: our last sample has NaN");
                    nan_refs += 1;
                    continue;
                }
                let d = max_abs_diff(&sample, &want);
                run_worst = run_worst.max(d);
                assert!(
                    d <= EXTRA_TRAJ_TOL,
                    "{key}: sample after step {i} differs by {d:e}"
                );
            }
            if run_worst > 0.0 {
                eprintln!("{key}: max abs diff {run_worst:e}");
            }
            worst = worst.max(run_worst);
            runs += 1;
        }
    }
    // The bh1 cases with a zero final sigma: 4 step counts each.
    assert_eq!(nan_refs, 8, "bh1 NaN references");
    eprintln!("extra multistep: {schedules} schedules (sigmas max rel {worst_s:e}), {runs} runs (max abs {worst:e})");
}
