//! Exponential and beta sigma schedules against diffusers 0.42.1 (fixtures from
//! `tools/make_sigma_schedule_fixtures.py`): for every sampler whose class has
//! `use_exponential_sigmas` / `use_beta_sigmas`, the schedules (timesteps, float32 sigmas,
//! init_noise_sigma) and whole runs on fixed model outputs, built as the server builds a scheduler
//! name plus a `schedule`; then whole images on the tiny models.

use crate::common;

use candle_core::{IndexOp, Tensor};
use common::{max_abs_diff, read_png, request_params, steps_of, Fixtures};
use sdserve_pipeline::pipeline::{GenerationParams, InitImage};
use sdserve_pipeline::rng::TorchRng;
use sdserve_pipeline::schedulers::{
    build_with, dpm2, dpm_sde, dpm_solver, euler, heun, lms, unipc, Scheduler, SchedulerConfig,
    SchedulerKind, SigmaSchedule,
};

/// Timesteps, relative to at least 10: float32 or float64 `_sigma_to_t` values over torch's
/// training sigmas (1 ulp off now and then, see samplers.rs), or integers.
const TIMESTEP_RTOL: f64 = 1e-5;
/// Below timestep 1, absolute: samplers.rs's bound (that 1-ulp sigma next to the smallest
/// training sigma moves KDPM2's interpolated timesteps by up to ~0.01 there).
const SMALL_TIMESTEP_TOL: f64 = 0.02;
/// Sigmas and init_noise_sigma: float32 values, relative.
const SIGMA_RTOL: f64 = 2e-6;
/// Scaled inputs and samples of a whole run, max abs, or relative to the reference's largest
/// value (the bounds of samplers.rs and schedulers_multistep.rs's SDE runs).
const TRAJ_TOL: f32 = 5e-5;
const TRAJ_RTOL: f32 = 4e-6;
const SDE_TRAJ_TOL: f32 = 3e-4;
/// ...or, where its samples grow past |x| ~ 60 (beta sigmas crowd the last steps), the same
/// 40 float32 ulps of the reference's largest value.
const SDE_TRAJ_ULPS: f32 = 40.0;
/// DPM2 a on beta sigmas: its last interior step goes from sigma ~2.6 to sigma_min ~0.029, so
/// `sigma_down` is ~3e-4 and the second half's `(sample - x0) / sigma_interpol` divides a
/// float32 difference of two |x| ~ 56 values by sigma_interpol ~0.029: each ulp of the sample
/// becomes ~90 ulps after `dt` ~ -2.6, in diffusers' own arithmetic as in ours.
const DPM2_A_BETA_TRAJ_ULPS: f32 = 100.0;

fn fixtures() -> &'static Fixtures {
    static F: std::sync::OnceLock<Fixtures> = std::sync::OnceLock::new();
    F.get_or_init(|| Fixtures::load("sigma-schedules"))
}

fn kind_and_schedule(e: &serde_json::Value) -> (SchedulerKind, SigmaSchedule) {
    let kind = SchedulerKind::from_name(e["scheduler"].as_str().unwrap()).unwrap();
    let schedule = SigmaSchedule::from_name(e["schedule"].as_str().unwrap()).unwrap();
    (kind, schedule)
}

/// The entry's scheduler as the server builds it (`build_with`) and its float32 sigmas, from
/// the same class built on the same config.
fn make(
    e: &serde_json::Value,
    cfg: &SchedulerConfig,
    steps: usize,
) -> (Box<dyn Scheduler>, Vec<f32>) {
    let (kind, schedule) = kind_and_schedule(e);
    let built = build_with(kind, schedule, cfg, steps).unwrap();
    let cfg = &kind.config_with(schedule, cfg).unwrap();
    let sigmas = match e["scheduler"].as_str().unwrap() {
        "euler" => euler::EulerDiscrete::new(cfg, steps)
            .unwrap()
            .sigmas()
            .to_vec(),
        "lms" => lms::LmsDiscrete::new(cfg, steps).unwrap().sigmas().to_vec(),
        "dpmpp_2m" | "dpmpp_2m_sde" => dpm_solver::DpmSolverMultistep::new(cfg, steps)
            .unwrap()
            .sigmas()
            .to_vec(),
        "unipc" => unipc::UniPcMultistep::new(cfg, steps)
            .unwrap()
            .sigmas()
            .to_vec(),
        "heun" => heun::HeunDiscrete::new(cfg, steps)
            .unwrap()
            .sigmas()
            .to_vec(),
        "dpm2" => dpm2::KDpm2::new(cfg, steps).unwrap().sigmas().to_vec(),
        "dpm2_a" => dpm2::KDpm2Ancestral::new(cfg, steps)
            .unwrap()
            .sigmas()
            .to_vec(),
        "dpmpp_sde" => dpm_sde::DpmSolverSde::new(cfg, steps)
            .unwrap()
            .sigmas()
            .to_vec(),
        other => panic!("no scheduler {other}"),
    };
    (built, sigmas)
}

fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs().max(1.0)
}

#[test]
fn schedules_match_diffusers() {
    let f = fixtures();
    let (mut worst_t, mut worst_s, mut cases) = (0f64, 0f64, 0);
    let mut seen = std::collections::HashSet::new();
    for e in f.meta["entries"].as_array().unwrap() {
        let prefix = e["prefix"].as_str().unwrap();
        let cfg = f.scheduler_config(&e["overrides"]);
        seen.insert(kind_and_schedule(e));
        for steps in steps_of(&e["schedule_steps"]) {
            let key = format!("{prefix}.{steps}");
            let (s, sigmas) = make(e, &cfg, steps);
            let want = f.f64s(&format!("{key}.timesteps"));
            let got = s.timesteps();
            assert_eq!(got.len(), want.len(), "{key}: {got:?} vs {want:?}");
            for (a, b) in got.iter().zip(&want) {
                if b.abs() < 1.0 {
                    let d = (a - b).abs();
                    assert!(
                        d <= SMALL_TIMESTEP_TOL,
                        "{key}.timesteps: {got:?} vs {want:?}"
                    );
                    continue;
                }
                let d = (a - b).abs() / b.abs().max(10.0);
                assert!(d <= TIMESTEP_RTOL, "{key}.timesteps: {got:?} vs {want:?}");
                worst_t = worst_t.max(d);
            }
            let want = f.f64s(&format!("{key}.sigmas"));
            assert_eq!(sigmas.len(), want.len(), "{key}: {sigmas:?} vs {want:?}");
            for (a, b) in sigmas.iter().zip(&want) {
                let d = rel(*a as f64, *b);
                assert!(d <= SIGMA_RTOL, "{key}.sigmas: {sigmas:?} vs {want:?}");
                worst_s = worst_s.max(d);
            }
            let want = f.f64s(&format!("{key}.init_noise_sigma"))[0];
            let d = rel(s.init_noise_sigma(), want);
            assert!(
                d <= SIGMA_RTOL,
                "{key}.init_noise_sigma {}",
                s.init_noise_sigma()
            );
            cases += 1;
        }
    }
    // Every sampler that has the keys, on both schedules.
    assert_eq!(seen.len(), 18, "{seen:?}");
    assert!(cases >= 290, "only {cases} schedule cases");
    eprintln!("schedules: {cases} cases, timesteps max rel diff {worst_t:e}, sigmas {worst_s:e}");
}

#[test]
fn trajectories_match_diffusers() {
    let f = fixtures();
    let mut worst = (String::new(), 0f32);
    let mut runs = 0;
    for e in f.meta["entries"].as_array().unwrap() {
        let prefix = e["prefix"].as_str().unwrap();
        let cfg = f.scheduler_config(&e["overrides"]);
        let sde = e["scheduler"].as_str() == Some("dpmpp_2m_sde");
        let dpm2_a_beta = e["scheduler"].as_str() == Some("dpm2_a") && e["schedule"] == "beta";
        for steps in steps_of(&e["trajectory_steps"]) {
            let key = format!("{prefix}.{steps}");
            let outputs = f.get(&format!("{key}.model_outputs"));
            let scaled = f.get(&format!("{key}.scaled_inputs"));
            let samples = f.get(&format!("{key}.samples"));
            let (mut s, _) = make(e, &cfg, steps);
            let n = s.timesteps().len();
            assert_eq!(outputs.dim(0).unwrap(), n, "{key}: model output count");
            let mut rng = TorchRng::new(f.meta["step_seed"].as_u64().unwrap());
            let tol = |want: &Tensor| {
                let max = want.abs().unwrap().max_all().unwrap();
                let max = max.to_scalar::<f32>().unwrap();
                if sde {
                    SDE_TRAJ_TOL.max(SDE_TRAJ_ULPS * f32::EPSILON * max)
                } else if dpm2_a_beta {
                    TRAJ_TOL.max(DPM2_A_BETA_TRAJ_ULPS * f32::EPSILON * max)
                } else {
                    TRAJ_TOL.max(TRAJ_RTOL * max)
                }
            };
            // The run continues from our own samples, so errors compound as in a real run.
            let mut sample = samples.i(0).unwrap();
            for i in 0..n {
                let x = s.scale_model_input(&sample, i).unwrap();
                let want = scaled.i(i).unwrap();
                let d = max_abs_diff(&x, &want);
                assert!(d <= tol(&want), "{key}: scaled input {i} off by {d}");
                sample = s
                    .step(
                        &outputs.i(i).unwrap(),
                        i,
                        &sample,
                        std::slice::from_mut(&mut rng),
                    )
                    .unwrap();
                let want = samples.i(i + 1).unwrap();
                let d = max_abs_diff(&sample, &want);
                assert!(d <= tol(&want), "{key}: sample after step {i} off by {d}");
                if d > worst.1 {
                    worst = (key.clone(), d);
                }
            }
            runs += 1;
        }
    }
    assert!(runs >= 100, "only {runs} trajectories");
    eprintln!(
        "trajectories: {runs} runs, max abs diff {:e} ({})",
        worst.1, worst.0
    );
}

fn params_of(case: &serde_json::Value) -> GenerationParams {
    let init_image = case["init_image"].as_str().map(|name| InitImage {
        image: read_png(name),
        mask: None,
        strength: case["strength"].as_f64().unwrap(),
    });
    GenerationParams {
        batch_size: case["batch_size"].as_u64().unwrap() as usize,
        schedule: Some(SigmaSchedule::from_name(case["schedule"].as_str().unwrap()).unwrap()),
        init_image,
        ..request_params(case)
    }
}

#[test]
fn images_match_diffusers() {
    let f = fixtures();
    let cases = f.meta["cases"].as_object().unwrap();
    assert!(cases.len() >= 12, "{} cases", cases.len());
    let (failures, images) = common::image_case_failures(cases, params_of, |label| {
        f.get(&format!("image.{label}")).clone()
    });
    assert!(
        failures.is_empty(),
        "images differ from diffusers: {failures:?}"
    );
    eprintln!("{images} images match");
}

/// A model whose own file asks for exponential (or beta) sigmas runs on them when the request
/// names neither scheduler nor schedule, as diffusers' pipeline runs the file's scheduler.
#[test]
fn the_model_file_decides_the_default_schedule() {
    let f = fixtures();
    let cfg = |over: serde_json::Value| {
        let mut c = f.scheduler_config(&over);
        c.class_name = Some("DPMSolverMultistepScheduler".into());
        c
    };
    for schedule in [SigmaSchedule::Exponential, SigmaSchedule::Beta] {
        let mut file = cfg(serde_json::json!({}));
        schedule.set_in(&mut file);
        assert_eq!(
            SchedulerKind::default_for(&file).unwrap(),
            SchedulerKind::DpmPp2m
        );
        assert_eq!(
            SchedulerKind::default_schedule_for(&file).unwrap(),
            schedule
        );
    }
    // Two schedules at once: diffusers refuses the file, and so do we, naming both keys.
    let both = cfg(serde_json::json!({"use_exponential_sigmas": true, "use_beta_sigmas": true}));
    let err = SchedulerKind::default_schedule_for(&both)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("use_exponential_sigmas") && err.contains("use_beta_sigmas"),
        "{err}"
    );
    // A class without the keys ignores them, as diffusers' does.
    let mut pndm = both.clone();
    pndm.class_name = Some("PNDMScheduler".into());
    assert_eq!(
        SchedulerKind::default_schedule_for(&pndm).unwrap(),
        SigmaSchedule::Uniform
    );
}

/// The plain name with `karras` is the `_karras` name; other combinations the sampler lacks are
/// errors that say so.
#[test]
fn names_and_schedules_combine_as_documented() {
    let f = fixtures();
    let cfg = f.scheduler_config(&serde_json::json!({}));
    for k in SchedulerKind::ALL.into_iter().filter(|k| k.karras()) {
        let plain = SchedulerKind::of(k.sampler(), false).unwrap();
        let a = build_with(plain, SigmaSchedule::Karras, &cfg, 7).unwrap();
        let b = build_with(k, SigmaSchedule::Karras, &cfg, 7).unwrap();
        assert_eq!(a.timesteps(), b.timesteps(), "{k}");
        let err = build_with(k, SigmaSchedule::Exponential, &cfg, 7)
            .err()
            .unwrap();
        assert!(err.to_string().contains(k.name()), "{err}");
    }
    for (kind, schedule) in [
        (SchedulerKind::Pndm, SigmaSchedule::Exponential),
        (SchedulerKind::Ddim, SigmaSchedule::Karras),
        (SchedulerKind::Lcm, SigmaSchedule::Beta),
        (SchedulerKind::EulerAncestral, SigmaSchedule::Exponential),
    ] {
        let err = kind.check_schedule(schedule).unwrap_err();
        assert!(
            err.contains(schedule.name()) && err.contains(kind.name()),
            "{err}"
        );
        assert!(build_with(kind, schedule, &cfg, 7).is_err());
    }
    // A plain name on the model's file asking for beta sigmas stays uniform, as with Karras.
    let mut beta_file = cfg.clone();
    beta_file.use_beta_sigmas = Some(true);
    let plain = build_with(SchedulerKind::Euler, SigmaSchedule::Uniform, &cfg, 7).unwrap();
    let on_file = build_with(SchedulerKind::Euler, SigmaSchedule::Uniform, &beta_file, 7).unwrap();
    assert_eq!(plain.timesteps(), on_file.timesteps());
}
