use super::*;
use sdserve_pipeline::pipeline::GenerationParams;

fn parse(s: &str) -> Result<ValidRequest, ApiError> {
    parse_generate(s.as_bytes())
}

/// The one broken field of a 422.
fn field_of(e: ApiError) -> String {
    match e.fields() {
        [one] => one.field.clone(),
        _ => panic!("expected one broken field, got {e:?}"),
    }
}

#[test]
fn defaults_are_filled() {
    let r = parse(r#"{"prompt":"  a cat  "}"#).unwrap();
    assert_eq!(r.prompt, "a cat");
    assert_eq!(
        (r.steps, r.width, r.height, r.guidance_scale),
        (20, 512, 512, 7.5)
    );
    assert_eq!(
        (r.seed, r.scheduler, r.negative_prompt.as_str()),
        (None, None, "")
    );
}

#[test]
fn edges_on_both_sides() {
    for (field, ok, bad) in [
        (
            "steps",
            vec!["1", "50", "20.0"],
            vec!["0", "51", "-1", "2.5", "\"20\"", "true"],
        ),
        (
            "width",
            vec!["256", "768", "320"],
            vec!["192", "832", "300", "255", "769"],
        ),
        ("height", vec!["256", "768"], vec!["0", "1024", "257"]),
        (
            "seed",
            vec!["0", "4294967295", "null"],
            vec!["-1", "4294967296", "1.5", "\"1\""],
        ),
        (
            "guidance_scale",
            vec!["0", "0.0", "30", "30.0", "1"],
            vec!["-0.001", "30.001", "\"7\""],
        ),
        (
            "scheduler",
            vec!["\"euler_a\"", "\"unipc\"", "null"],
            vec!["\"Euler\"", "\"foo\"", "1"],
        ),
    ] {
        for v in ok {
            parse(&format!(r#"{{"prompt":"x","{field}":{v}}}"#))
                .unwrap_or_else(|e| panic!("{field}={v}: {e:?}"));
        }
        for v in bad {
            let e = parse(&format!(r#"{{"prompt":"x","{field}":{v}}}"#))
                .expect_err(&format!("{field}={v}"));
            assert_eq!(field_of(e), field, "{field}={v}");
        }
    }
}

#[test]
fn prompt_rules() {
    let p500 = "é".repeat(500);
    assert_eq!(
        parse(&format!(r#"{{"prompt":"{p500}"}}"#))
            .unwrap()
            .prompt
            .chars()
            .count(),
        500
    );
    let p501 = "é".repeat(501);
    assert_eq!(
        field_of(parse(&format!(r#"{{"prompt":"{p501}"}}"#)).unwrap_err()),
        "prompt"
    );
    // 500 after trimming is fine.
    assert!(parse(&format!(r#"{{"prompt":"  {p500}\n"}}"#)).is_ok());
    for bad in [
        r#"{"prompt":""}"#,
        r#"{"prompt":"   "}"#,
        r#"{"prompt":"\u0001\u0007"}"#,
        r#"{}"#,
        r#"{"prompt":null}"#,
        r#"{"prompt":3}"#,
    ] {
        assert_eq!(field_of(parse(bad).unwrap_err()), "prompt", "{bad}");
    }
    let r =
        parse(r#"{"prompt":"\u0001 a\u0000b\tc\u007f ","negative_prompt":" x\u0002 "}"#).unwrap();
    assert_eq!(r.prompt, "ab\tc");
    assert_eq!(r.negative_prompt, "x");
    let n501 = "n".repeat(501);
    assert_eq!(
        field_of(parse(&format!(r#"{{"prompt":"x","negative_prompt":"{n501}"}}"#)).unwrap_err()),
        "negative_prompt"
    );
    assert!(parse(r#"{"prompt":"x","negative_prompt":""}"#).is_ok());
}

#[test]
fn shape_errors() {
    assert!(matches!(parse("{"), Err(ApiError::InvalidJson(_))));
    assert!(matches!(parse("[1]"), Err(ApiError::InvalidJson(_))));
    assert!(matches!(parse(""), Err(ApiError::InvalidJson(_))));
    assert_eq!(
        field_of(parse(r#"{"prompt":"x","sampler":"euler"}"#).unwrap_err()),
        "sampler"
    );
    assert!(check_content_type(Some("application/json; charset=utf-8")).is_ok());
    assert!(check_content_type(Some("text/plain")).is_err());
    assert!(check_content_type(None).is_err());
}

#[test]
fn null_means_the_default_for_every_optional_field() {
    let defaults = parse(r#"{"prompt":"x"}"#).unwrap();
    for field in FIELDS.iter().filter(|f| **f != "prompt") {
        let r = parse(&format!(r#"{{"prompt":"x","{field}":null}}"#))
            .unwrap_or_else(|e| panic!("{field}: null refused: {e:?}"));
        assert_eq!(r, defaults, "{field}");
    }
}

#[test]
fn every_broken_field_is_reported_in_reading_order() {
    let e = parse(
        r#"{"sampler":"x","steps":0,"width":300,"height":1024,"seed":-1,"guidance_scale":"7","scheduler":"Euler","negative_prompt":5}"#,
    )
    .unwrap_err();
    let fields: Vec<&str> = e.fields().iter().map(|f| f.field.as_str()).collect();
    assert_eq!(
        fields,
        [
            "sampler",
            "prompt",
            "negative_prompt",
            "steps",
            "width",
            "height",
            "seed",
            "guidance_scale",
            "scheduler"
        ]
    );
    let details = e.body().details.unwrap();
    assert!(
        details.contains("width: must be a multiple of 64 (got 300)"),
        "{details}"
    );
    assert!(details.contains("prompt: is required"), "{details}");
    assert_eq!(details.matches("; ").count(), fields.len() - 1, "{details}");
}

#[test]
fn request_images_are_kept_at_the_request_size_with_the_pipelines_pixels() {
    use base64::Engine;
    use sdserve_pipeline::image_in::image_tensor;
    use sdserve_pipeline::pipeline::RgbImage;
    let upload = |w: u32, h: u32, salt: u32| {
        let img = RgbImage {
            width: w,
            height: h,
            pixels: (0..w * h * 3)
                .map(|i| ((i * 7 + salt) % 253) as u8)
                .collect(),
        };
        let png = crate::png::encode(&img, "").unwrap();
        (img, base64::engine::general_purpose::STANDARD.encode(png))
    };
    let (init, init_b64) = upload(700, 300, 1);
    let (mask, mask_b64) = upload(700, 300, 2);
    let body = serde_json::json!({
        "prompt": "p", "init_image": init_b64, "mask_image": mask_b64, "height": 320
    });
    let r = parse(&body.to_string()).unwrap();
    // Width defaults to the image's, floored to a multiple of 64; height as given.
    assert_eq!((r.width, r.height), (640, 320));
    let kept = &r.init_image.as_ref().unwrap().image;
    assert_eq!((kept.width, kept.height), (640, 320));
    assert_eq!(*kept, resize_lanczos(&init, 640, 320));
    let kept_mask = &r.mask_image.as_ref().unwrap().image;
    assert_eq!(*kept_mask, resize_lanczos(&mask, 640, 320));
    // What the VAE gets is the same whether the pipeline resizes the upload or this.
    let dev = candle_core::Device::Cpu;
    let a = image_tensor(&init, 640, 320, &dev).unwrap();
    let b = image_tensor(kept, 640, 320, &dev).unwrap();
    let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap();
    assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);
}

#[test]
fn a_batch_over_the_memory_budget_is_a_422_naming_batch_size() {
    use sdserve_pipeline::memory::{Footprint, LeverOverrides, PlanRequest};
    let dir =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../pipeline/tests/fixtures/tiny-a");
    // tiny-a's VAE factor is 2: a 768 image is a 384x384 latent, a heavy UNet batch.
    let budget = crate::gpu::MemoryBudget {
        footprint: Footprint::from_model_dir(&dir, candle_core::DType::F32).unwrap(),
        request: PlanRequest {
            budget_bytes: 2048 << 20,
            max_width: 768,
            max_height: 768,
            batch: 2,
            dtype: candle_core::DType::F32,
            overrides: LeverOverrides::default(),
            controlnets: Default::default(),
        },
    };
    let params = |batch_size, side, guidance_scale| GenerationParams {
        batch_size,
        width: side,
        height: side,
        guidance_scale,
        ..Default::default()
    };
    assert!(check_memory(&params(1, 768, 7.5), Some(&budget)).is_ok());
    assert!(check_memory(&params(8, 256, 7.5), Some(&budget)).is_ok());
    let e = check_memory(&params(8, 768, 7.5), Some(&budget)).unwrap_err();
    let [f] = e.fields() else { panic!("{e:?}") };
    assert_eq!(f.field, "batch_size");
    assert!(f.rule.contains("at most batch_size"), "{}", f.rule);
    assert!(f.rule.contains("VRAM_LIMIT_MB"), "{}", f.rule);
    // AND parts are rows: one image with 8 parts runs what a batch of 5 guided images runs.
    let with_parts = |batch_size, parts: usize| GenerationParams {
        prompt: vec!["a cat"; parts].join(" AND "),
        prompt_syntax: PromptSyntax::A1111,
        ..params(batch_size, 768, 7.5)
    };
    let largest = (1..=8)
        .take_while(|&n| check_memory(&params(n, 768, 7.5), Some(&budget)).is_ok())
        .last()
        .unwrap();
    assert!(check_memory(&with_parts(largest, 1), Some(&budget)).is_ok());
    let e = check_memory(&with_parts(largest, 8), Some(&budget)).unwrap_err();
    let names: Vec<&str> = e.fields().iter().map(|f| f.field.as_str()).collect();
    assert_eq!(names, ["prompt", "batch_size"], "{e:?}");
    assert!(
        e.fields()[0].rule.contains("8 AND parts run 9 UNet rows"),
        "{e:?}"
    );
    // ControlNets count: their residuals and weights leave room for fewer images.
    let cn_dir = dir.join("../controlnet/cn-a");
    let with_controlnets = |batch_size, units: usize| GenerationParams {
        controlnets: (0..units)
            .map(|_| sdserve_pipeline::controlnet::ControlNetUnit {
                model: std::sync::Arc::new(sdserve_pipeline::controlnet::ControlNet::new(
                    "cn-a", &cn_dir,
                )),
                image: sdserve_pipeline::pipeline::RgbImage {
                    width: 8,
                    height: 8,
                    pixels: vec![0; 8 * 8 * 3],
                },
                preprocessor: None,
                scale: 1.0,
                guidance_start: 0.0,
                guidance_end: 1.0,
                hires_image: None,
                hr_option: Default::default(),
                inpaint_crop: true,
                control_mode: Default::default(),
                mask: None,
                hires_mask: None,
                infotext: None,
            })
            .collect(),
        ..params(batch_size, 768, 7.5)
    };
    let largest_with = |units| {
        (1..=8)
            .take_while(|&n| check_memory(&with_controlnets(n, units), Some(&budget)).is_ok())
            .last()
            .unwrap_or(0)
    };
    assert!(largest_with(1) < largest, "{} {largest}", largest_with(1));
    assert!(largest_with(2) <= largest_with(1));
    let e = check_memory(&with_controlnets(largest, 1), Some(&budget)).unwrap_err();
    assert!(
        e.fields()[0].rule.contains("its 1 ControlNet unit(s)"),
        "{e:?}"
    );
    // No budget (the CPU): nothing to check.
    assert!(check_memory(&params(8, 768, 7.5), None).is_ok());
    // Too small a budget for even one image names the size.
    let mut small = budget.clone();
    small.request.budget_bytes = 520 << 20;
    let e = check_memory(&params(1, 768, 7.5), Some(&small)).unwrap_err();
    let names: Vec<&str> = e.fields().iter().map(|f| f.field.as_str()).collect();
    assert_eq!(names, ["width", "height"]);
}

#[test]
fn emphasis_weights_past_float32_are_refused_naming_the_field() {
    let huge = "9".repeat(320);
    for (field, body) in [
        ("prompt", format!(r#"{{"prompt": "(cat:{huge})"}}"#)),
        (
            "prompt",
            r#"{"prompt": "(((cat:1e30)):9999999999)"}"#
                .replace("1e30", "100000000000000000000000000000"),
        ),
        (
            "negative_prompt",
            format!(r#"{{"prompt": "cat", "negative_prompt": "(dog:{huge})"}}"#),
        ),
    ] {
        let e = parse(&body).unwrap_err();
        let fields: Vec<&str> = e.fields().iter().map(|f| f.field.as_str()).collect();
        assert_eq!(fields, [field], "{body}");
        assert!(
            e.fields()[0].rule.contains("finite float32"),
            "{:?}",
            e.fields()
        );
    }
    // Large finite weights, and any text with plain syntax, are fine.
    assert!(parse(r#"{"prompt": "(cat:1000)"}"#).is_ok());
    let plain = format!(r#"{{"prompt": "(cat:{huge})", "prompt_syntax": "plain"}}"#);
    assert!(parse(&plain).is_ok());
}

#[test]
fn schedules_combine_with_the_scheduler_or_are_named() {
    use sdserve_pipeline::schedulers::SigmaSchedule;
    let r = parse(r#"{"prompt":"x","scheduler":"euler","schedule":"exponential"}"#).unwrap();
    assert_eq!(r.schedule, Some(SigmaSchedule::Exponential));
    let r = parse(r#"{"prompt":"x","schedule":"default"}"#).unwrap();
    assert_eq!(r.schedule, None);
    let r = parse(r#"{"prompt":"x","schedule":null,"scheduler":"dpm2_a"}"#).unwrap();
    assert_eq!(r.schedule, None);
    // The `_karras` names with karras only; samplers without a schedule; unknown names.
    for body in [
        r#"{"prompt":"x","scheduler":"euler_karras","schedule":"beta"}"#,
        r#"{"prompt":"x","scheduler":"dpmpp_2m_karras","schedule":"uniform"}"#,
        r#"{"prompt":"x","scheduler":"pndm","schedule":"exponential"}"#,
        r#"{"prompt":"x","scheduler":"euler_a","schedule":"beta"}"#,
        r#"{"prompt":"x","scheduler":"lcm","schedule":"karras"}"#,
        r#"{"prompt":"x","schedule":"Exponential"}"#,
        r#"{"prompt":"x","schedule":"polyexponential"}"#,
        r#"{"prompt":"x","schedule":1}"#,
    ] {
        let e = parse(body).unwrap_err();
        assert_eq!(e.status_and_code().0.as_u16(), 422, "{body}");
        assert_eq!(field_of(e), "schedule", "{body}");
    }
    let e = parse(r#"{"prompt":"x","scheduler":"ddim","schedule":"beta"}"#).unwrap_err();
    let details = e.body().details.unwrap();
    assert!(
        details.contains("ddim") && details.contains("beta"),
        "{details}"
    );
}

#[test]
fn schedules_resolve_against_the_model_s_own() {
    use sdserve_pipeline::schedulers::{SchedulerKind, SigmaSchedule};
    let model = (SchedulerKind::DpmPp2m, SigmaSchedule::Exponential);
    let resolve = |body: &str| parse(body).unwrap().resolve_schedule(model);
    // Nothing named: the model's scheduler on the model's schedule.
    assert_eq!(resolve(r#"{"prompt":"x"}"#).unwrap(), model);
    // A name alone: its own schedule, whatever the model's file says.
    assert_eq!(
        resolve(r#"{"prompt":"x","scheduler":"dpmpp_2m"}"#).unwrap(),
        (SchedulerKind::DpmPp2m, SigmaSchedule::Uniform)
    );
    assert_eq!(
        resolve(r#"{"prompt":"x","scheduler":"lms_karras"}"#).unwrap(),
        (SchedulerKind::LmsKarras, SigmaSchedule::Karras)
    );
    // A schedule alone: the model's scheduler on it.
    assert_eq!(
        resolve(r#"{"prompt":"x","schedule":"beta"}"#).unwrap(),
        (SchedulerKind::DpmPp2m, SigmaSchedule::Beta)
    );
    // ... which a model whose own scheduler lacks it refuses, naming `schedule`.
    let pndm = (SchedulerKind::Pndm, SigmaSchedule::Uniform);
    let e = parse(r#"{"prompt":"x","schedule":"beta"}"#)
        .unwrap()
        .resolve_schedule(pndm)
        .unwrap_err();
    assert_eq!(e.status_and_code().0.as_u16(), 422);
    assert_eq!(field_of(e), "schedule");
}

#[test]
fn seed_resize_takes_both_sides_within_a1111_s_sizes() {
    let body = |fields: &str| format!(r#"{{"prompt":"x",{fields}}}"#);
    let r = parse(&body(
        r#""seed_resize_from_width":64,"seed_resize_from_height":2048"#,
    ))
    .unwrap();
    let want = SeedResize {
        width: 64,
        height: 2048,
    };
    assert_eq!(r.seed_resize_from, Some(want));
    assert_eq!(
        r.generation_params(1, SchedulerKind::Euler, SigmaSchedule::Uniform)
            .seed_resize_from,
        Some(want)
    );
    let off = parse(&body(
        r#""seed_resize_from_width":null,"seed_resize_from_height":null"#,
    ))
    .unwrap();
    assert_eq!(off.seed_resize_from, None);
    // With an init image too (A1111 resizes img2img's noise the same way).
    let init = {
        use base64::Engine;
        let img = sdserve_pipeline::pipeline::RgbImage {
            width: 8,
            height: 8,
            pixels: (0..8 * 8 * 3).map(|i| (i % 251) as u8).collect(),
        };
        base64::engine::general_purpose::STANDARD.encode(crate::png::encode(&img, "").unwrap())
    };
    let r = parse(&body(&format!(
        r#""init_image":"{init}","width":256,"height":256,"seed_resize_from_width":512,"seed_resize_from_height":512"#
    )))
    .unwrap();
    assert!(r.seed_resize_from.is_some());
    for (fields, field) in [
        (r#""seed_resize_from_width":512"#, "seed_resize_from_height"),
        (r#""seed_resize_from_height":512"#, "seed_resize_from_width"),
        (
            r#""seed_resize_from_width":512,"seed_resize_from_height":null"#,
            "seed_resize_from_height",
        ),
        (
            r#""seed_resize_from_width":63,"seed_resize_from_height":512"#,
            "seed_resize_from_width",
        ),
        (
            r#""seed_resize_from_width":512,"seed_resize_from_height":2049"#,
            "seed_resize_from_height",
        ),
        (
            r#""seed_resize_from_width":0,"seed_resize_from_height":512"#,
            "seed_resize_from_width",
        ),
        (
            r#""seed_resize_from_width":-1,"seed_resize_from_height":512"#,
            "seed_resize_from_width",
        ),
        (
            r#""seed_resize_from_width":512.5,"seed_resize_from_height":512"#,
            "seed_resize_from_width",
        ),
    ] {
        let e = parse(&body(fields)).expect_err(fields);
        assert_eq!(field_of(e), field, "{fields}");
    }
}

#[test]
fn the_model_s_limits_name_each_field_past_them() {
    use sdserve_pipeline::pipeline::ModelLimits;
    let limits = |layers, factor| ModelLimits {
        text_encoder_layers: layers,
        vae_scale_factor: factor,
        vae_latent_channels: 4,
        vae_widths: [0; 8],
        vae_layers_per_block: 0,
    };
    let fields =
        |e: ApiError| -> Vec<String> { e.fields().iter().map(|f| f.field.clone()).collect() };
    let r = parse(r#"{"prompt":"a cat","clip_skip":4,"width":320,"height":256}"#).unwrap();
    // Unknown limits: the run checks.
    assert!(check_limits(&r, None).is_ok());
    // SD 1.5: 12 layers, factor 8.
    assert!(check_limits(&r, Some(&limits(12, 8))).is_ok());
    // Two layers: clip skip 1..=3.
    let e = check_limits(&r, Some(&limits(2, 8))).unwrap_err();
    assert!(e.fields()[0].rule.contains("at most 3"), "{e:?}");
    assert_eq!(fields(e), ["clip_skip"]);
    assert!(check_limits(&r, Some(&limits(3, 8))).is_ok());
    // A factor-128 VAE takes sides in whole cells of 128: 256 is, 320 is not.
    assert_eq!(
        fields(check_limits(&r, Some(&limits(12, 128))).unwrap_err()),
        ["width"]
    );
    // The hires pass's sides too, named by the fields that set them.
    let h = parse(r#"{"prompt":"a cat","width":320,"height":384,"hires":{"width":448,"height":448,"steps":2}}"#)
        .unwrap();
    // Upscaled to 448x537 first (A1111's cover): any size, the encoder floors it to cells.
    assert!(check_limits(&h, Some(&limits(12, 8))).is_ok());
    assert!(check_limits(&h, Some(&limits(12, 16))).is_ok());
    let e = check_limits(&h, Some(&limits(12, 128))).unwrap_err();
    assert!(e.fields()[1].rule.contains("448x537"), "{e:?}");
    assert_eq!(fields(e), ["width", "hires.width", "hires.height"]);
    // A scale is named as the scale: 256 x 1.25 = 320, not whole cells of 128.
    let s =
        parse(r#"{"prompt":"a cat","width":256,"height":256,"hires":{"scale":1.25,"steps":2}}"#)
            .unwrap();
    assert_eq!(
        fields(check_limits(&s, Some(&limits(12, 128))).unwrap_err()),
        ["hires.scale"]
    );
}

/// A small PNG upload, base64.
fn upload_b64(w: u32, h: u32, salt: u32) -> String {
    use base64::Engine;
    let img = sdserve_pipeline::pipeline::RgbImage {
        width: w,
        height: h,
        pixels: (0..w * h * 3)
            .map(|i| ((i * 7 + salt) % 253) as u8)
            .collect(),
    };
    base64::engine::general_purpose::STANDARD.encode(crate::png::encode(&img, "").unwrap())
}

#[test]
fn inpaint_takes_a1111_s_options_with_its_web_ui_defaults() {
    use sdserve_pipeline::inpaint_a1111::{A1111Inpaint, MaskedContent};
    let (init, mask) = (upload_b64(300, 200, 1), upload_b64(300, 200, 2));
    let body = |inpaint: serde_json::Value| {
        serde_json::json!({"prompt": "p", "init_image": init, "mask_image": mask,
                           "width": 256, "height": 256, "inpaint": inpaint})
        .to_string()
    };
    let r = parse(&body(serde_json::json!({}))).unwrap();
    assert_eq!(
        r.inpaint,
        Some(A1111Inpaint {
            mask_blur_x: 4,
            mask_blur_y: 4,
            invert: false,
            masked_content: MaskedContent::Original,
            only_masked_padding: None,
            mask_round: true,
        })
    );
    // The images stay at their uploaded size: A1111 blurs and crops there.
    let kept = &r.init_image.as_ref().unwrap().image;
    assert_eq!((kept.width, kept.height), (300, 200));
    assert_eq!(r.mask_image.as_ref().unwrap().image.width, 300);
    let all = serde_json::json!({"mask_blur_x": 0, "mask_blur_y": 9, "mask_invert": true,
                                 "masked_content": "latent_noise", "area": "only_masked"});
    let r = parse(&body(all)).unwrap().inpaint.unwrap();
    assert_eq!((r.mask_blur_x, r.mask_blur_y, r.invert), (0, 9, true));
    assert_eq!(r.masked_content, MaskedContent::LatentNoise);
    assert_eq!(r.only_masked_padding, Some(32));
    let r = parse(&body(
        serde_json::json!({"mask_blur": 7, "area": "only_masked", "padding": 0}),
    ))
    .unwrap()
    .inpaint
    .unwrap();
    assert_eq!(
        (r.mask_blur_x, r.mask_blur_y, r.only_masked_padding),
        (7, 7, Some(0))
    );
    // Absent or null: diffusers' inpainting, the images at the request's size.
    let r = parse(&body(serde_json::Value::Null)).unwrap();
    assert_eq!(r.inpaint, None);
    assert_eq!(r.init_image.unwrap().image.width, 256);
    for (bad, field) in [
        (serde_json::json!({"mask_blur": 65}), "inpaint.mask_blur"),
        (
            serde_json::json!({"mask_blur": 2, "mask_blur_y": 3}),
            "inpaint.mask_blur",
        ),
        (
            serde_json::json!({"mask_blur_x": -1}),
            "inpaint.mask_blur_x",
        ),
        (
            serde_json::json!({"masked_content": "noise"}),
            "inpaint.masked_content",
        ),
        (serde_json::json!({"area": "masked"}), "inpaint.area"),
        (serde_json::json!({"padding": 257}), "inpaint.padding"),
        (serde_json::json!({"mask_invert": 1}), "inpaint.mask_invert"),
        (serde_json::json!({"blur": 1}), "inpaint.blur"),
        (serde_json::json!(4), "inpaint"),
    ] {
        let e = parse(&body(bad.clone())).unwrap_err();
        assert_eq!(field_of(e), field, "{bad}");
    }
    // Without a mask there is nothing to inpaint.
    let no_mask = serde_json::json!({"prompt": "p", "init_image": init, "inpaint": {}});
    assert_eq!(
        field_of(parse(&no_mask.to_string()).unwrap_err()),
        "inpaint"
    );
}
