//! Tests of the GPU setup on the CPU: DEVICE/DTYPE resolution, budgets, the OOM guard.

use std::time::Duration;

use clap::Parser;
use sdserve_pipeline::memory::breaker::BreakerConfig;

use super::*;

fn fixture() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../pipeline/tests/fixtures/tiny-a")
}

fn args(extra: &[&str]) -> ModelArgs {
    #[derive(Parser)]
    struct A {
        #[command(flatten)]
        m: ModelArgs,
    }
    let mut argv = vec!["x"];
    argv.extend_from_slice(extra);
    A::parse_from(argv).m
}

#[test]
fn cpu_setup_has_no_budget() {
    let s = resolve(&args(&["--device", "cpu"]), &fixture()).unwrap();
    assert!(s.device.is_cpu());
    assert_eq!(s.dtype, DType::F32);
    assert_eq!(s.plan.budget_bytes, None);
    assert!(s.describe().contains("device cpu dtype f32"));
    assert_eq!(health_gpu(&s.device), None);
}

#[test]
fn auto_on_a_cpu_build_is_cpu() {
    let s = resolve(&args(&["--device", "auto"]), &fixture()).unwrap();
    if !sdserve_pipeline::device::cuda_compiled() {
        assert!(s.device.is_cpu());
        assert!(s.warnings.is_empty());
    }
}

#[test]
fn explicit_cuda_without_cuda_is_an_error() {
    if sdserve_pipeline::device::cuda_compiled() {
        return;
    }
    let e = resolve(&args(&["--device", "cuda:0"]), &fixture()).unwrap_err();
    assert!(e.contains("without CUDA"), "{e}");
    assert!(resolve(&args(&["--device", "tpu"]), &fixture()).is_err());
}

#[test]
fn oom_guard_without_pipeline_opens_after_repeated_ooms() {
    let guard = OomGuard::new(BreakerConfig {
        threshold: 2,
        ..Default::default()
    });
    // A candle error whose text says out of memory counts, like the classified variant.
    let oom: Result<(), _> = Err(PipelineError::Candle(candle_core::Error::Msg(
        "CUDA_ERROR_OUT_OF_MEMORY: out of memory".into(),
    )));
    let other: Result<(), _> = Err(PipelineError::Cancelled);
    assert_eq!(guard.record_without_pipeline(&other), OomOutcome::NotOom);
    assert_eq!(guard.record_without_pipeline(&oom), OomOutcome::Failed);
    assert!(!guard.is_open());
    assert!(guard.admit(&Device::Cpu).is_ok());
    match guard.record_without_pipeline(&oom) {
        OomOutcome::Paused { retry_after } => assert!(retry_after > Duration::ZERO),
        o => panic!("{o:?}"),
    }
    assert!(guard.is_open());
    assert!(guard.admit(&Device::Cpu).unwrap_err() >= Duration::from_secs(1));
}

#[test]
fn an_abandoned_probe_does_not_keep_the_breaker_half_open() {
    let guard = OomGuard::new(BreakerConfig {
        threshold: 1,
        cooldown: Duration::from_millis(10),
        ..Default::default()
    });
    let oom: Result<(), _> = Err(PipelineError::OutOfMemory("test".into()));
    assert!(matches!(
        guard.record_without_pipeline(&oom),
        OomOutcome::Paused { .. }
    ));
    std::thread::sleep(Duration::from_millis(20));
    assert!(guard.admit(&Device::Cpu).is_ok()); // the probe
    assert!(guard.admit(&Device::Cpu).is_err()); // half-open: one probe at a time
    guard.release_probe(); // e.g. its client went away before it started
    assert!(!guard.is_open());
    assert!(guard.admit(&Device::Cpu).is_ok());
}

#[test]
fn oom_guard_counts_only_oom_and_steps_down() {
    let dir = fixture();
    let mut setup = resolve(&args(&["--device", "cpu"]), &dir).unwrap();
    // Simulate a GPU setup on the CPU: a plan with a budget and a footprint.
    let fp = Footprint::from_model_dir(&dir, DType::F32).unwrap();
    let req = PlanRequest {
        budget_bytes: 1 << 30,
        max_width: 64,
        max_height: 64,
        batch: 2,
        dtype: DType::F32,
        overrides: LeverOverrides::default(),
        controlnets: Default::default(),
    };
    setup.plan = plan(&fp, &req);
    setup.footprint = Some(fp);
    setup.plan_request = Some(req);
    let mut sd = load(&setup, &dir).unwrap();
    let guard = OomGuard::new(BreakerConfig {
        threshold: 2,
        ..Default::default()
    });
    let oom: Result<(), _> = Err(PipelineError::OutOfMemory("test".into()));
    let other: Result<(), _> = Err(PipelineError::Cancelled);
    assert_eq!(
        guard.record(&other, &mut sd, &mut setup),
        OomOutcome::NotOom
    );
    assert_eq!(guard.record(&oom, &mut sd, &mut setup), OomOutcome::Failed);
    let before = setup.plan.clone();
    match guard.record(&oom, &mut sd, &mut setup) {
        OomOutcome::SwitchedPlan(s) => assert!(!s.contains("failed"), "{s}"),
        o => panic!("{o:?}"),
    }
    assert_ne!(setup.plan, before);
    assert_eq!(sd.memory_plan().offload, setup.plan.offload);
    assert!(guard.admit(&Device::Cpu).is_ok());
    // The pipeline still generates after the switch.
    warm_up(&sd).unwrap();
}

#[test]
fn each_request_gets_the_levers_its_batch_needs() {
    let dir = fixture();
    let mut setup = resolve(&args(&["--device", "cpu"]), &dir).unwrap();
    // A GPU setup simulated on the CPU: tiny-a (VAE factor 2, so 768 px is a 384x384
    // latent) planned for one image with guidance at 256 under 2 GB: sliced attention.
    let fp = Footprint::from_model_dir(&dir, DType::F32).unwrap();
    let req = PlanRequest {
        budget_bytes: 2048 << 20,
        max_width: 256,
        max_height: 256,
        batch: 2,
        dtype: DType::F32,
        overrides: LeverOverrides::default(),
        controlnets: Default::default(),
    };
    setup.plan = plan(&fp, &req);
    setup.footprint = Some(fp.clone());
    setup.plan_request = Some(req);
    let mut sd = load(&setup, &dir).unwrap();
    let levers = |sd: &StableDiffusion| {
        let p = sd.memory_plan();
        (p.attention, p.vae_tiling, p.offload)
    };
    let start = levers(&sd);
    let params = |batch_size, side| GenerationParams {
        prompt: "x".into(),
        batch_size,
        width: side,
        height: side,
        ..Default::default()
    };
    // A side where eight images need more than the start-up plan but still fit.
    let side = [768, 704, 640, 576, 512, 448, 384, 320, 256]
        .into_iter()
        .find(|&s| {
            matches!(plan_for_request(&fp, &req, &setup.plan, s, s, 8, true),
                Ok(p) if (p.attention, p.vae_tiling, p.offload) != start)
        })
        .expect("a size where a batch of 8 needs more levers");
    plan_request(&mut sd, &setup, &params(8, side)).unwrap();
    let big = levers(&sd);
    assert_ne!(big, start);
    assert!(
        big.2 >= start.2,
        "never a faster offload than the plan in use"
    );
    // One image again: back to the start-up plan.
    plan_request(&mut sd, &setup, &params(1, side)).unwrap();
    assert_eq!(levers(&sd), start);
    // Eight at 768 fit under no plan: refused before anything runs, the plan untouched.
    let e = plan_request(&mut sd, &setup, &params(8, 768)).unwrap_err();
    assert!(
        matches!(&e, PipelineError::InvalidRequest(m) if m.contains("batch_size 8")),
        "{e}"
    );
    assert_eq!(levers(&sd), start);
    // The CPU setup has no budget: nothing changes.
    let cpu = resolve(&args(&["--device", "cpu"]), &dir).unwrap();
    plan_request(&mut sd, &cpu, &params(8, 768)).unwrap();
    assert_eq!(levers(&sd), start);
}

#[test]
fn ip_adapters_count_once_their_files_are_found() {
    use sdserve_pipeline::ip_adapter::{ImageEncoder, IpAdapter, IpAdapterUnit};
    let unit = |model: &str| IpAdapterUnit {
        model: std::sync::Arc::new(IpAdapter::named(model)),
        image_encoder: std::sync::Arc::new(ImageEncoder::named(crate::ip_adapters::IMAGE_ENCODER)),
        image: sdserve_pipeline::pipeline::RgbImage {
            width: 1,
            height: 1,
            pixels: vec![0, 0, 0],
        },
        scale: 0.5,
        extension: None,
    };
    let params = GenerationParams {
        ip_adapters: vec![unit("ip-adapter_sd15"), unit("ip-adapter-plus_sd15")],
        ..Default::default()
    };
    // By name only (a cluster's API process): nothing counted, as ControlNets.
    assert_eq!(
        controlnet_load(&params, DType::F16).image_prompts,
        ImagePromptLoad::default()
    );
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../pipeline/tests/fixtures/ip-adapter/models");
    let found = crate::ip_adapters::with_ip_adapter_files(&params, Some(&dir))
        .unwrap()
        .unwrap();
    let counted = controlnet_load(&found, DType::F16).image_prompts;
    // The folder's encoder and the larger (Plus) of the two adapters the request names.
    let expected = image_prompt_load_of(
        &dir.join(crate::ip_adapters::IMAGE_ENCODER),
        &[&dir.join("ip-adapter-plus_sd15.safetensors")],
        DType::F16,
    )
    .unwrap();
    assert_eq!(counted, expected);
    let without_plus = GenerationParams {
        ip_adapters: found.ip_adapters[..1].to_vec(),
        ..found.clone()
    };
    assert!(
        controlnet_load(&without_plus, DType::F16)
            .image_prompts
            .params
            < counted.params
    );
}

#[test]
fn the_submit_check_counts_the_files_the_catalogs_found() {
    use base64::Engine;
    use sdserve_pipeline::schedulers::{SchedulerKind, SigmaSchedule};
    let fixtures =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../pipeline/tests/fixtures");
    let image = sdserve_pipeline::pipeline::RgbImage {
        width: 8,
        height: 8,
        pixels: vec![128; 8 * 8 * 3],
    };
    let png = crate::png::encode(&image, "").unwrap();
    let b64 = base64::engine::general_purpose::STANDARD.encode(png);
    let body = serde_json::json!({"prompt": "x", "width": 256, "height": 256,
        "controlnets": [{"model": "cn-a", "image": b64}],
        "ip_adapters": [{"model": "ip-adapter_sd15", "image": b64}]});
    let mut req = crate::validate::parse_generate(body.to_string().as_bytes()).unwrap();
    let params = |r: &crate::validate::ValidRequest| {
        r.generation_params(1, SchedulerKind::Euler, SigmaSchedule::Uniform)
    };
    // By name alone the memory check at submit counts no weights (before: always so).
    let named = controlnet_load(&params(&req), DType::F16);
    assert_eq!((named.units, named.params), (1, 0));
    assert_eq!(named.image_prompts, ImagePromptLoad::default());
    // The catalogs' checks before queueing record the files they found.
    crate::controlnets::ControlNetCatalog::new(Some(fixtures.join("controlnet")))
        .check(&mut req, "controlnets")
        .unwrap();
    let ip_dir = fixtures.join("ip-adapter/models");
    crate::ip_adapters::IpAdapterCatalog::new(Some(ip_dir.clone()))
        .check(&mut req, "ip_adapters")
        .unwrap();
    let counted = controlnet_load(&params(&req), DType::F16);
    let cn = controlnet_weight_count(&fixtures.join("controlnet/cn-a"), DType::F16).unwrap();
    assert!(cn > 0);
    assert_eq!((counted.units, counted.params), (1, cn));
    let ip = image_prompt_load_of(
        &ip_dir.join(crate::ip_adapters::IMAGE_ENCODER),
        &[&ip_dir.join("ip-adapter_sd15.safetensors")],
        DType::F16,
    )
    .unwrap();
    assert!(ip.params > 0);
    assert_eq!(counted.image_prompts, ip);
}
