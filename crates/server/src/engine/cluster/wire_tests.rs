//! Tests of the wire format (split from wire.rs).

use std::sync::Arc;

use super::*;
use crate::engine::job::{JobEvent, JobProgress};
use crate::error::{ApiError, TimeoutInfo};
use crate::generator::ModelInfo;

#[test]
fn events_round_trip_through_their_message() {
    let id = "abc";
    for e in [
        JobEvent::Queued { position: 3 },
        JobEvent::Started,
        JobEvent::Loading {
            model: "tiny-b".into(),
        },
        JobEvent::Progress(JobProgress {
            step: 2,
            total: 5,
            eta_seconds: Some(1.5),
        }),
        JobEvent::Preview {
            step: 2,
            png_base64: Arc::new("iVBOR".into()),
        },
        JobEvent::Failed(ApiError::Timeout(60.into()).body()),
        JobEvent::Cancelled,
    ] {
        let (got_id, got) = parse_event(&event_message(id, &e)).unwrap();
        assert_eq!(got_id, id);
        assert_eq!(got.name(), e.name());
        assert_eq!(got.data(id), e.data(id));
    }
    assert!(parse_event("{\"id\":\"x\",\"event\":\"nope\"}").is_none());
}

#[test]
fn a_spec_survives_the_trip_with_its_images() {
    let img = RgbImage {
        width: 2,
        height: 1,
        pixels: vec![1, 2, 3, 4, 5, 6],
    };
    let spec = JobSpec {
        params: GenerationParams {
            prompt: "a (cat:1.2)".into(),
            seed: 7,
            scheduler: Some(SchedulerKind::Euler),
            churn: sdserve_pipeline::schedulers::Churn {
                churn: 2.0,
                tmin: 0.5,
                tmax: 9.0,
                noise: 0.9,
            },
            negative_guidance: sdserve_pipeline::pipeline::NegativeGuidance {
                min_sigma: 1.5,
                all_steps: true,
                skip_early: 0.25,
            },
            prompt_syntax: PromptSyntax::A1111,
            loras: vec![LoraWeight {
                name: "l".into(),
                weight: 0.5,
            }],
            init_image: Some(InitImage {
                image: img.clone(),
                mask: Some(img.clone()),
                strength: 0.6,
            }),
            hires: Some(sdserve_pipeline::pipeline::Hires {
                width: 512,
                height: 384,
                upscale_width: 512,
                upscale_height: 512,
                upscaler: crate::validate::hires::upscaler_named("Latent (bicubic)"),
                steps: 7,
                strength: 0.55,
                scheduler: Some(SchedulerKind::Ddim),
                schedule: Some(sdserve_pipeline::schedulers::SigmaSchedule::Uniform),
                prompt: Some("hr".into()),
                negative_prompt: None,
            }),
            tiling: true,
            variation: Some(sdserve_pipeline::pipeline::Variation {
                seed: 9,
                strength: 0.25,
            }),
            seed_resize_from: Some(sdserve_pipeline::pipeline::SeedResize {
                width: 320,
                height: 192,
            }),
            // By name: the worker finds it in its own CONTROLNET_DIR.
            controlnets: vec![sdserve_pipeline::controlnet::ControlNetUnit {
                model: Arc::new(sdserve_pipeline::controlnet::ControlNet::named("canny")),
                image: img.clone(),
                preprocessor: Some(
                    sdserve_pipeline::controlnet::preprocess::Preprocessor::Canny {
                        low_threshold: 90.0,
                        high_threshold: 180.0,
                        resolution: 640,
                    },
                ),
                scale: 0.8,
                guidance_start: 0.1,
                guidance_end: 0.9,
                hires_image: Some(img.clone()),
                hr_option: sdserve_pipeline::controlnet::HiresOption::HighResOnly,
                // Not the default: the round trip must carry it.
                inpaint_crop: false,
                control_mode: sdserve_pipeline::controlnet::ControlMode::ControlNet,
                mask: Some(img.clone()),
                hires_mask: None,
                // A dialect's entry travels with the unit.
                infotext: Some("Module: canny, Model: canny [0123abcd]".into()),
            }],
            // By name: the worker finds it and the image encoder in its own IP_ADAPTER_DIR.
            ip_adapters: vec![
                sdserve_pipeline::ip_adapter::IpAdapterUnit {
                    model: Arc::new(sdserve_pipeline::ip_adapter::IpAdapter::named(
                        "ip-adapter_sd15",
                    )),
                    image_encoder: Arc::new(sdserve_pipeline::ip_adapter::ImageEncoder::named(
                        crate::ip_adapters::IMAGE_ENCODER,
                    )),
                    image: img.clone(),
                    scale: 0.7,
                    extension: None,
                },
                sdserve_pipeline::ip_adapter::IpAdapterUnit {
                    model: Arc::new(sdserve_pipeline::ip_adapter::IpAdapter::named(
                        "ip-adapter-plus_sd15",
                    )),
                    image_encoder: Arc::new(sdserve_pipeline::ip_adapter::ImageEncoder::named(
                        crate::ip_adapters::IMAGE_ENCODER,
                    )),
                    image: img.clone(),
                    scale: 0.5,
                    // An A1111 unit: two images, one with its alpha, a window, its infotext.
                    extension: Some(sdserve_pipeline::ip_adapter::ExtensionRun {
                        images: vec![
                            sdserve_pipeline::ip_adapter::ExtensionImage {
                                image: img.clone(),
                                alpha: Some(vec![7; (img.width * img.height) as usize]),
                            },
                            sdserve_pipeline::ip_adapter::ExtensionImage {
                                image: img.clone(),
                                alpha: None,
                            },
                        ],
                        guidance_start: 0.2,
                        guidance_end: 0.7,
                        plus_uncond: None,
                        record: Some(sdserve_pipeline::ip_adapter::ExtensionRecord {
                            position: 1,
                            infotext: "Module: ip-adapter_clip_sd15".into(),
                        }),
                    }),
                },
            ],
            a1111_inpaint: Some(sdserve_pipeline::inpaint_a1111::A1111Inpaint {
                mask_blur_x: 3,
                mask_blur_y: 5,
                invert: true,
                masked_content: sdserve_pipeline::inpaint_a1111::MaskedContent::LatentNoise,
                only_masked_padding: Some(12),
                mask_round: false,
            }),
            step_rule: sdserve_pipeline::pipeline::StepRule::A1111FixSteps,
            guidance_rule: sdserve_pipeline::pipeline::GuidanceRule::A1111,
            lama_noise: false,
            ..Default::default()
        },
        request: serde_json::json!({"prompt": "a (cat:1.2)"}),
        png_texts: vec!["t".into()],
        progress_total: 9,
        model_version: "m@1".into(),
        model: Some("tiny-b".into()),
        vae: Some(crate::vaes::VaeUse {
            name: "vae-ft-mse.safetensors".into(),
            hash: "0123456789".into(),
        }),
        timeout_setting: DeadlineSetting::Job,
        timeout: Duration::from_secs(9),
    };
    let json = serde_json::to_string(&WireSpec::of(&spec)).unwrap();
    let back: WireSpec = serde_json::from_str(&json).unwrap();
    let again = back.spec(Duration::from_secs(3)).unwrap();
    assert_eq!(again.params, spec.params, "every parameter makes the trip");
    assert_eq!(again.timeout, Duration::from_secs(3));
    assert_eq!(again.png_texts, spec.png_texts);
    assert_eq!(again.progress_total, 9);
    assert_eq!(again.timeout_setting, DeadlineSetting::Job);
    assert_eq!(again.model.as_deref(), Some("tiny-b"));
    assert_eq!(again.vae, spec.vae);
    // An older replica's job names no model: the default.
    let mut old: serde_json::Value = serde_json::from_str(&json).unwrap();
    old.as_object_mut().unwrap().remove("model");
    let back: WireSpec = serde_json::from_value(old).unwrap();
    assert_eq!(back.spec(Duration::from_secs(3)).unwrap().model, None);
    // An older replica's job has no `lama_noise`: the noise modifier on, all it ran.
    let mut old: serde_json::Value = serde_json::from_str(&json).unwrap();
    old.as_object_mut().unwrap().remove("lama_noise");
    let back: WireSpec = serde_json::from_value(old).unwrap();
    assert!(back.spec(Duration::from_secs(3)).unwrap().params.lama_noise);
}

#[test]
fn errors_keep_their_code_and_details() {
    let e = ApiError::Timeout(TimeoutInfo {
        limit_secs: 60,
        setting: DeadlineSetting::Job,
        queued_secs: 1.0,
        step: 3,
        total: 10,
        running_secs: 5.0,
        alone_secs: Some(80.0),
    });
    let json = serde_json::to_string(&WireError::of(&e)).unwrap();
    let back: WireError = serde_json::from_str(&json).unwrap();
    assert_eq!(back.error(), e);
}

#[test]
fn a_hires_upscaler_model_travels_by_name() {
    use sdserve_pipeline::pipeline::Upscaler;
    let hires = sdserve_pipeline::pipeline::Hires {
        width: 384,
        height: 384,
        upscale_width: 384,
        upscale_height: 384,
        upscaler: crate::validate::hires::upscaler_named("4x-UltraSharp"),
        steps: 4,
        strength: 0.5,
        scheduler: None,
        schedule: None,
        prompt: None,
        negative_prompt: None,
    };
    let json = serde_json::to_value(WireHires::of(&hires)).unwrap();
    assert_eq!(json["upscaler"], "4x-UltraSharp");
    let back: WireHires = serde_json::from_value(json).unwrap();
    let back = back.hires().unwrap();
    // The worker finds the file in its own UPSCALERS_DIR: no path travels.
    assert!(
        matches!(&back.upscaler, Upscaler::Model(m) if m.name == "4x-UltraSharp" && m.path.as_os_str().is_empty()),
        "{back:?}"
    );
    assert_eq!(back, hires);
}

#[test]
fn a_model_s_limits_go_to_the_api_replicas_and_older_workers_send_none() {
    let limits = sdserve_pipeline::pipeline::ModelLimits {
        text_encoder_layers: 12,
        vae_scale_factor: 8,
        vae_latent_channels: 4,
        vae_widths: [128, 256, 512, 512, 0, 0, 0, 0],
        vae_layers_per_block: 2,
    };
    let info = ModelInfo {
        model_version: "m@0".into(),
        default_scheduler: SchedulerKind::Pndm,
        default_schedule: SigmaSchedule::Uniform,
        adapters: Default::default(),
        guidance_distilled: false,
        memory: None,
        schedules: None,
        limits: Some(limits),
    };
    let json = serde_json::to_value(WireInfo::of(&info)).unwrap();
    let back: WireInfo = serde_json::from_value(json.clone()).unwrap();
    assert_eq!(back.info().unwrap().limits, Some(limits));
    // A worker older than the field: not known here, its run checks.
    let mut old = json;
    old.as_object_mut().unwrap().remove("limits");
    let back: WireInfo = serde_json::from_value(old).unwrap();
    assert_eq!(back.info().unwrap().limits, None);
}
