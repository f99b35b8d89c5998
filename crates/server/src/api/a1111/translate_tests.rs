//! The A1111 translation's tests (`translate`), in a file of their own.

use super::*;
use sdserve_pipeline::schedulers::{SchedulerKind, SigmaSchedule};

fn field_of(e: ApiError) -> String {
    match e.fields() {
        [first, ..] => first.field.clone(),
        _ => panic!("expected a validation error, got {e:?}"),
    }
}

fn tr(body: Value, mode: Mode) -> Result<Translated, ApiError> {
    translate(body.as_object().unwrap(), mode, &Map::new(), || 1234)
}

#[test]
fn a1111_defaults_apply_to_absent_and_null_fields() {
    let t = tr(json!({"prompt": "a cat", "negative_prompt": null, "steps": null, "seed": -1, "sampler_name": null, "enable_hr": false, "styles": []}), Mode::Txt2Img).unwrap();
    assert_eq!(
        Value::Object(t.native.clone()),
        json!({"prompt": "a cat", "steps": 50, "guidance_scale": 7.0, "width": 512, "height": 512, "seed": 1234, "scheduler": "euler", "schedule": "uniform", "guidance_rule": "a1111"})
    );
    assert_eq!((t.seed, t.n_iter, t.batch_size), (1234, 1, 1));
    assert!(t.ignored.is_empty(), "{:?}", t.ignored);
    assert_eq!(t.parameters["steps"], 50);
    assert_eq!(t.parameters["seed"], -1);
    let v = &t.valid;
    assert_eq!((v.steps, v.guidance_scale, v.seed), (50, 7.0, Some(1234)));
    let a1111 = sdserve_pipeline::pipeline::GuidanceRule::A1111;
    assert_eq!(v.guidance_rule, a1111);
}

#[test]
fn seed_resize_is_on_when_both_sides_are_above_0_as_in_a1111() {
    let t = tr(
        json!({"prompt": "p", "seed_resize_from_w": 512, "seed_resize_from_h": 768}),
        Mode::Txt2Img,
    )
    .unwrap();
    assert_eq!(t.native["seed_resize_from_width"], 512);
    assert_eq!(t.native["seed_resize_from_height"], 768);
    let from = t.valid.seed_resize_from.expect("a seed resize");
    assert_eq!((from.width, from.height), (512, 768));
    for (w, h) in [(0, 512), (512, -1), (-1, -1), (0, 0), (-7, 64)] {
        let body = json!({"prompt": "p", "seed_resize_from_w": w, "seed_resize_from_h": h});
        let t = tr(body, Mode::Txt2Img).unwrap();
        assert_eq!(t.valid.seed_resize_from, None, "{w}x{h}");
        assert!(!t.native.contains_key("seed_resize_from_width"));
    }
    assert_eq!(t.parameters["seed_resize_from_w"], 512);
    let absent = tr(json!({"prompt": "p"}), Mode::Txt2Img).unwrap();
    assert_eq!(absent.parameters["seed_resize_from_h"], -1);
    // The native rules, named as sent.
    for (body, field) in [
        (
            json!({"seed_resize_from_w": 4096, "seed_resize_from_h": 512}),
            "seed_resize_from_w",
        ),
        (
            json!({"seed_resize_from_w": 512, "seed_resize_from_h": 32}),
            "seed_resize_from_h",
        ),
        (json!({"seed_resize_from_w": "512"}), "seed_resize_from_w"),
        (json!({"seed_resize_from_h": 1.5}), "seed_resize_from_h"),
    ] {
        let mut body = body;
        body["prompt"] = json!("p");
        let e = tr(body.clone(), Mode::Txt2Img).unwrap_err();
        assert_eq!(field_of(e), field, "{body}");
    }
}

#[test]
fn the_prompt_may_be_empty_or_absent_as_in_a1111() {
    for body in [
        json!({}),
        json!({"prompt": ""}),
        json!({"prompt": null}),
        json!({"prompt": " \n "}),
        json!({"prompt": "", "negative_prompt": "blurry"}),
    ] {
        let t = tr(body.clone(), Mode::Txt2Img).unwrap_or_else(|e| panic!("{body}: {e:?}"));
        assert_eq!(t.valid.prompt, "", "{body}");
    }
    // The native rule is unchanged: there a prompt is required and not empty.
    for body in [json!({}), json!({"prompt": ""})] {
        let native = body.as_object().unwrap();
        let e = crate::validate::validate_object(native).unwrap_err();
        assert_eq!(field_of(e), "prompt", "{body}");
    }
}

#[test]
fn values_map_and_errors_name_a1111_fields() {
    let t = tr(json!({"prompt": "p", "cfg_scale": 3.5, "seed": 7, "steps": 4, "width": 256, "height": 320, "sampler_name": "DPM++ 2M", "scheduler": "Karras", "n_iter": 3, "enable_hr": true, "do_not_save_grid": true}), Mode::Txt2Img).unwrap();
    assert_eq!(t.native["guidance_scale"], 3.5);
    assert_eq!(t.native["scheduler"], "dpmpp_2m_karras");
    assert_eq!((t.seed, t.n_iter), (7, 3));
    assert_eq!(t.ignored, vec!["do_not_save_grid".to_string()]);
    // enable_hr: A1111's defaults (hr_scale 2, Latent) from 256x320.
    let h = t.valid.hires.as_ref().expect("a hires pass").params.clone();
    assert_eq!((h.width, h.height, h.steps), (512, 640, 4));
    assert_eq!(h.upscaler, crate::validate::hires::upscaler_named("Latent"));
    // Its own sampler only when it differs; "Use same sampler" is the first pass's.
    let hr = |extra: Value| {
        let mut body = json!({"prompt": "p", "width": 256, "height": 256, "enable_hr": true,
                              "hr_scale": 1.25, "sampler_name": "Euler"});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        tr(body, Mode::Txt2Img).map(|t| t.valid.hires.unwrap().params.scheduler)
    };
    assert_eq!(
        hr(json!({"hr_sampler_name": "Use same sampler"})).unwrap(),
        None
    );
    assert_eq!(hr(json!({"hr_sampler_name": "Euler"})).unwrap(), None);
    assert_eq!(
        hr(json!({"hr_sampler_name": "DPM++ 2M"})).unwrap(),
        Some(sdserve_pipeline::schedulers::SchedulerKind::DpmPp2mKarras)
    );
    assert_eq!(
        field_of(hr(json!({"hr_sampler_name": "X"})).unwrap_err()),
        "hr_sampler_name"
    );
    // Native rules apply; the error names cfg_scale, not guidance_scale.
    let e = tr(json!({"prompt": "p", "cfg_scale": 31}), Mode::Txt2Img).unwrap_err();
    assert_eq!(field_of(e), "cfg_scale");
    let e = tr(json!({"prompt": 5}), Mode::Txt2Img).unwrap_err();
    assert_eq!(field_of(e), "prompt");
    let long = "p".repeat(501);
    let e = tr(json!({ "prompt": long }), Mode::Txt2Img).unwrap_err();
    assert_eq!(field_of(e), "prompt");
    assert_eq!(
        field_of(tr(json!({"prompt": "p", "seed": -2}), Mode::Txt2Img).unwrap_err()),
        "seed"
    );
    assert_eq!(
        field_of(tr(json!({"prompt": "p", "n_iter": 9}), Mode::Txt2Img).unwrap_err()),
        "n_iter"
    );
    assert_eq!(
        field_of(tr(json!({"prompt": "p", "sampler_name": 3}), Mode::Txt2Img).unwrap_err()),
        "sampler_name"
    );
    assert_eq!(
        field_of(tr(json!({"prompt": "p"}), Mode::Img2Img).unwrap_err()),
        "init_images"
    );
    // Found by fuzzing: `[null]` ran text to image on the img2img route.
    for images in [json!([null]), json!([5]), json!([["x"]])] {
        let e = tr(json!({"prompt": "p", "init_images": images}), Mode::Img2Img).unwrap_err();
        assert_eq!(field_of(e), "init_images");
    }
}

/// The hires pass's scheduler, sigma schedule and infotext keys for `first` + `extra`.
fn hires_run(
    first: Value,
    extra: Value,
) -> (
    Option<SchedulerKind>,
    Option<SigmaSchedule>,
    Vec<(&'static str, String)>,
) {
    let mut body = json!({"prompt": "p", "width": 256, "height": 256, "enable_hr": true,
                          "hr_scale": 1.25});
    for (k, v) in first
        .as_object()
        .unwrap()
        .iter()
        .chain(extra.as_object().unwrap())
    {
        body[k] = v.clone();
    }
    let h = tr(body, Mode::Txt2Img).unwrap().valid.hires.unwrap();
    let keys = h
        .infotext
        .into_iter()
        .filter(|(k, _)| k.starts_with("Hires s"))
        .collect();
    (h.params.scheduler, h.params.schedule, keys)
}

#[test]
fn the_hires_schedule_is_a1111_s_hr_scheduler() {
    use SchedulerKind as K;
    use SigmaSchedule as S;
    let euler = json!({"sampler_name": "Euler"});
    let label = |k: &'static str, v: &str| vec![(k, v.to_string())];
    // The first pass's sampler on another schedule type runs on that schedule (it fell
    // back to the first pass's uniform sigmas), with A1111's `Hires schedule type` only.
    assert_eq!(
        hires_run(
            euler.clone(),
            json!({"hr_sampler_name": "Euler", "hr_scheduler": "Exponential"})
        ),
        (
            Some(K::Euler),
            Some(S::Exponential),
            label("Hires schedule type", "Exponential")
        )
    );
    assert_eq!(
        hires_run(euler.clone(), json!({"hr_scheduler": "Karras"})),
        (
            Some(K::EulerKarras),
            Some(S::Karras),
            label("Hires schedule type", "Karras")
        )
    );
    assert_eq!(
        hires_run(
            euler.clone(),
            json!({"hr_sampler_name": "Euler", "hr_scheduler": "Automatic"})
        ),
        (None, None, vec![])
    );
    // An absent hr_scheduler is the first pass's `scheduler`...
    let euler_exp = json!({"sampler_name": "Euler", "scheduler": "Exponential"});
    assert_eq!(
        hires_run(euler_exp.clone(), json!({"hr_sampler_name": "DPM++ 2M"})),
        (
            Some(K::DpmPp2m),
            Some(S::Exponential),
            label("Hires sampler", "DPM++ 2M")
        )
    );
    assert_eq!(
        hires_run(euler_exp, json!({"hr_sampler_name": "Euler"})),
        (None, None, vec![])
    );
    // ... or the schedule in its sampler's name, unless it is that sampler's own.
    assert_eq!(
        hires_run(
            json!({"sampler_name": "Euler Karras"}),
            json!({"hr_sampler_name": "LMS"})
        )
        .0,
        Some(K::LmsKarras)
    );
    let (kind, schedule, keys) = hires_run(
        json!({"sampler_name": "DPM++ 2M Karras"}),
        json!({"hr_sampler_name": "Euler"}),
    );
    assert_eq!((kind, schedule), (Some(K::Euler), Some(S::Uniform)));
    assert_eq!(
        keys,
        [
            ("Hires sampler", "Euler".to_string()),
            ("Hires schedule type", "Uniform".to_string())
        ]
    );
    // The first pass's own automatic schedule named again: no pass of its own.
    assert_eq!(
        hires_run(
            json!({"sampler_name": "DPM++ 2M"}),
            json!({"hr_scheduler": "Karras"})
        ),
        (None, None, vec![])
    );
}

#[test]
fn clip_skip_takes_a1111s_range_where_the_native_rule_stops_at_4() {
    // A1111's slider (`modules/shared_options.py`): 1..=12, in an override or the option.
    let field = "override_settings.CLIP_stop_at_last_layers";
    for v in [1, 2, 5, 12] {
        let body = json!({"prompt": "p", "override_settings": {"CLIP_stop_at_last_layers": v}});
        let t = tr(body, Mode::Txt2Img).unwrap_or_else(|e| panic!("{v}: {e:?}"));
        assert_eq!(t.valid.clip_skip, v, "{v}");
        let option = Map::from_iter([("CLIP_stop_at_last_layers".to_string(), json!(v))]);
        let t = translate(
            json!({"prompt": "p"}).as_object().unwrap(),
            Mode::Txt2Img,
            &option,
            || 1,
        )
        .unwrap();
        assert_eq!(t.valid.clip_skip, v, "option {v}");
    }
    for v in [json!(0), json!(13), json!(-1), json!(2.5)] {
        let body = json!({"prompt": "p", "override_settings": {"CLIP_stop_at_last_layers": v}});
        let e = tr(body, Mode::Txt2Img).expect_err(&v.to_string());
        assert_eq!(field_of(e.clone()), field, "{v}");
        if v == json!(13) {
            assert!(e.fields()[0].rule.contains("12"), "{e:?}");
        }
    }
    // The native contract keeps its 1..=4.
    let native = json!({"prompt": "p", "clip_skip": 5});
    let e = crate::validate::validate_object(native.as_object().unwrap()).unwrap_err();
    assert_eq!(field_of(e), "clip_skip");
}

#[test]
fn a_mask_is_a1111_s_inpainting_with_its_api_s_defaults() {
    use base64::Engine;
    let img = sdserve_pipeline::pipeline::RgbImage {
        width: 64,
        height: 64,
        pixels: vec![128; 64 * 64 * 3],
    };
    let img =
        base64::engine::general_purpose::STANDARD.encode(crate::png::encode(&img, "").unwrap());
    let body = json!({"prompt": "p", "init_images": [img], "mask": img, "width": 256,
                      "height": 256, "inpainting_mask_invert": 1});
    let body_with_mask = body.clone();
    let t = tr(body, Mode::Img2Img).unwrap();
    assert_eq!(t.native["inpaint"]["mask_invert"], true);
    let o = t.valid.inpaint.expect("A1111's inpainting");
    assert_eq!((o.mask_blur_x, o.only_masked_padding), (4, Some(0)));
    // `parameters` echoes A1111's defaults on img2img.
    assert_eq!(t.parameters["inpainting_fill"], 0);
    assert_eq!(t.parameters["inpaint_full_res"], true);
    assert_eq!(t.parameters["mask_blur_x"], 4);
    // ControlNet units with a mask run, their images cut to "only masked"'s region
    // (controlnet_img2img_tests.rs); disabled ones change nothing.
    let mut with_units = body_with_mask.clone();
    with_units["alwayson_scripts"] =
        json!({"controlnet": {"args": [{"model": "c", "image": img}]}});
    let t = tr(with_units.clone(), Mode::Img2Img).unwrap();
    assert_eq!(t.native["controlnets"][0]["inpaint_crop"], false);
    with_units["alwayson_scripts"]["controlnet"]["args"][0]["enabled"] = json!(false);
    assert!(tr(with_units, Mode::Img2Img)
        .unwrap()
        .native
        .get("controlnets")
        .is_none());
    let native = |body: Value| {
        let mut n = Map::new();
        n.insert("inpaint".into(), inpaint_options(body.as_object().unwrap()));
        n["inpaint"].clone()
    };
    assert_eq!(
        native(json!({})),
        json!({"mask_blur_x": 4, "mask_blur_y": 4, "mask_invert": false,
               "masked_content": "fill", "area": "only_masked", "padding": 0,
               "mask_round": true})
    );
    assert_eq!(
        native(
            json!({"mask_blur": 8, "mask_blur_x": 1, "inpainting_fill": 3,
                      "inpaint_full_res": false, "inpaint_full_res_padding": 32,
                      "inpainting_mask_invert": 1, "mask_round": false})
        ),
        json!({"mask_blur": 8, "mask_invert": true, "masked_content": "latent_nothing",
               "area": "whole", "padding": 32, "mask_round": false})
    );
    assert_eq!(
        native(json!({"mask_blur_x": 2, "mask_blur_y": 0, "inpainting_fill": 1}))["mask_blur_y"],
        0
    );
    // Out of the declared ranges: a 422 naming A1111's field.
    for (field, v) in [
        ("inpainting_fill", json!(4)),
        ("mask_blur", json!(65)),
        ("inpaint_full_res_padding", json!(-1)),
        ("inpainting_mask_invert", json!(2)),
        ("inpaint_full_res", json!("yes")),
        ("mask_round", json!(1)),
    ] {
        let mut body = json!({"prompt": "p"});
        body[field] = v;
        let e = tr(body, Mode::Img2Img).unwrap_err();
        assert_eq!(field_of(e), field);
    }
}

#[test]
fn a1111_requests_run_a1111_s_step_rule_and_img2img_fix_steps_stretches_it() {
    use sdserve_pipeline::pipeline::StepRule;
    let body = json!({"prompt": "p", "enable_hr": true, "width": 256, "height": 256});
    let t = tr(body.clone(), Mode::Txt2Img).unwrap();
    assert_eq!(t.valid.step_rule, StepRule::A1111);
    assert_eq!(t.native["step_rule"], "a1111");
    // Plain text-to-image runs no strength: the native request as it is.
    let plain = tr(json!({"prompt": "p"}), Mode::Txt2Img).unwrap();
    assert_eq!(plain.native.get("step_rule"), None);
    let option = |v: Value| Map::from_iter([("img2img_fix_steps".to_string(), v)]);
    let run = |body: &Value, options: &Map<String, Value>| {
        translate(body.as_object().unwrap(), Mode::Txt2Img, options, || 1)
    };
    // The option (`POST options`), and `override_settings` over it.
    let t = run(&body, &option(json!(true))).unwrap();
    assert_eq!(t.valid.step_rule, StepRule::A1111FixSteps);
    let mut over = body.clone();
    over["override_settings"] = json!({"img2img_fix_steps": false});
    let t = run(&over, &option(json!(true))).unwrap();
    assert_eq!(t.valid.step_rule, StepRule::A1111);
    let mut over = body.clone();
    over["override_settings"] = json!({"img2img_fix_steps": true});
    assert_eq!(
        run(&over, &Map::new()).unwrap().valid.step_rule,
        StepRule::A1111FixSteps
    );
    let e = run(&body, &option(json!("yes"))).unwrap_err();
    assert_eq!(field_of(e), "override_settings.img2img_fix_steps");
    // A1111 runs denoising 0 (one step, the last); its stretched hires pass cannot.
    let zero = json!({"prompt": "p", "enable_hr": true, "denoising_strength": 0, "width": 256,
                      "height": 256});
    let e = tr(zero, Mode::Txt2Img).unwrap_err();
    assert_eq!(field_of(e.clone()), "denoising_strength", "{e:?}");
    assert!(e.fields()[0].rule.contains("above 0"), "{e:?}");
    // diffusers' rule refuses 5 hires steps at 0.1; A1111's runs them (of 50).
    let low = json!({"prompt": "p", "enable_hr": true, "denoising_strength": 0.1,
                     "hr_second_pass_steps": 5, "width": 256, "height": 256});
    let t = tr(low, Mode::Txt2Img).unwrap();
    assert_eq!(t.valid.hires.unwrap().params.steps, 5);
}

#[test]
fn enable_hr_fits_each_unit_again_at_the_hires_size() {
    // The extension's `hr_control`: `detectmap_proc` at the hires size from the same upload
    // (a crop-and-resize unit); `hr_option` maps to the native field; a canny unit steers
    // the hires pass (the pipeline forces the soft weights there from its preprocessor).
    use base64::Engine;
    let img = sdserve_pipeline::pipeline::RgbImage {
        width: 100,
        height: 50,
        pixels: (0..100 * 50 * 3).map(|i| (i * 7 % 251) as u8).collect(),
    };
    let png =
        base64::engine::general_purpose::STANDARD.encode(crate::png::encode(&img, "").unwrap());
    let body = |unit: Value| {
        json!({"prompt": "p", "width": 256, "height": 256, "enable_hr": true, "hr_scale": 1.5,
               "alwayson_scripts": {"controlnet": {"args": [unit]}}})
    };
    let t = tr(
        body(json!({"model": "c", "image": png, "hr_option": "Low res only"})),
        Mode::Txt2Img,
    )
    .unwrap();
    assert_eq!(t.native["controlnets"][0]["hr_option"], "low_res_only");
    let unit = &t.valid.controlnets[0];
    assert_eq!(
        unit.hr_option,
        sdserve_pipeline::controlnet::HiresOption::LowResOnly
    );
    let hires = unit
        .hires_image
        .as_ref()
        .expect("a hires image")
        .image
        .clone();
    assert_eq!((hires.width, hires.height), (384, 384));
    // Cover 384x384 (768x384) and crop the centre, as the first pass's 256x256 from 512x256.
    let scaled = sdserve_pipeline::image_in::resize_lanczos(&img, 768, 384);
    assert_eq!(&hires.pixels[..384 * 3], &scaled.pixels[192 * 3..576 * 3]);
    // Just Resize: the upload itself resized to each pass's size (not the first pass's image
    // enlarged again).
    let t = tr(
        body(json!({"model": "c", "image": png, "resize_mode": "Just Resize"})),
        Mode::Txt2Img,
    )
    .unwrap();
    let unit = &t.valid.controlnets[0];
    let hires = &unit.hires_image.as_ref().expect("a hires image").image;
    assert!(*hires == sdserve_pipeline::image_in::resize_lanczos(&img, 384, 384));
    assert!(unit.image.image == sdserve_pipeline::image_in::resize_lanczos(&img, 256, 256));
    assert!(t.native["controlnets"][0].get("hr_option").is_none());
    let e = tr(
        body(json!({"model": "c", "image": png, "hr_option": "both"})),
        Mode::Txt2Img,
    )
    .unwrap_err();
    assert_eq!(field_of(e), "alwayson_scripts.controlnet.args");
    for hr_option in ["Both", "High res only", "Low res only"] {
        let unit = json!({"model": "c", "image": png, "module": "canny", "hr_option": hr_option,
                          "control_mode": "My prompt is more important"});
        let t = tr(body(unit), Mode::Txt2Img).unwrap();
        let unit = &t.valid.controlnets[0];
        assert_eq!(
            unit.preprocessor.map(|p| p.module()),
            Some("canny"),
            "{hr_option}"
        );
        assert_eq!(
            unit.control_mode,
            sdserve_pipeline::controlnet::ControlMode::Prompt
        );
    }
    // img2img has no hires pass (A1111 ignores `enable_hr` there): a canny unit runs.
    let mut img2img = body(json!({"model": "c", "image": png, "module": "canny"}));
    img2img["init_images"] = json!([png]);
    let t = tr(img2img, Mode::Img2Img).unwrap();
    assert!(t.valid.controlnets[0].hires_image.is_none());
}

/// `DDIM`, `PLMS` and `UniPC` run A1111's own timestep samplers (`ddim_a1111`,
/// `plms_a1111`, `unipc_a1111`), not diffusers' `ddim`, `pndm` and `unipc`; the infotext
/// keeps A1111's names.
#[test]
fn ddim_plms_and_unipc_are_a1111_s_own() {
    for (name, native) in [
        ("DDIM", "ddim_a1111"),
        ("ddim", "ddim_a1111"),
        ("PLMS", "plms_a1111"),
        ("UniPC", "unipc_a1111"),
        ("unipc", "unipc_a1111"),
    ] {
        let t = tr(json!({"prompt": "p", "sampler_name": name}), Mode::Txt2Img).unwrap();
        assert_eq!(t.native["scheduler"], native, "{name}");
        assert_eq!(t.valid.scheduler.map(|k| k.name()), Some(native), "{name}");
    }
    for (kind, name) in [
        (SchedulerKind::PlmsA1111, "PLMS"),
        (SchedulerKind::UniPcA1111, "UniPC"),
    ] {
        assert_eq!(crate::api::a1111::samplers::a1111_names(kind), (name, None));
    }
    // A1111's UniPC has no schedule choice: Karras is a 422 naming `scheduler`.
    for body in [
        json!({"prompt": "p", "sampler_name": "UniPC", "scheduler": "Karras"}),
        json!({"prompt": "p", "sampler_name": "UniPC Karras"}),
    ] {
        let e = tr(body, Mode::Txt2Img).unwrap_err();
        assert!(e.body().details.unwrap().starts_with("scheduler"), "{e:?}");
    }
    // diffusers' classes keep A1111's nearest names in infotexts.
    assert_eq!(
        crate::api::a1111::samplers::a1111_names(SchedulerKind::Pndm),
        ("PLMS", None)
    );
}

#[test]
fn eta_goes_to_the_sampler_as_a1111_gives_it() {
    // webuiapi sends eta 1.0 with every request: A1111's DDIM then runs with eta 1.
    let t = tr(
        json!({"prompt": "p", "sampler_name": "DDIM", "eta": 1.0}),
        Mode::Txt2Img,
    )
    .unwrap();
    assert_eq!(t.native["eta"], 1.0);
    assert_eq!(t.valid.eta, Some(1.0));
    assert!(t.ignored.is_empty(), "{:?}", t.ignored);
    // Absent or null: each sampler's default.
    for body in [json!({"prompt": "p"}), json!({"prompt": "p", "eta": null})] {
        let t = tr(body, Mode::Txt2Img).unwrap();
        assert!(!t.native.contains_key("eta"));
        assert_eq!(t.valid.eta, None);
    }
    for eta in [json!(1.5), json!(-0.1), json!("high")] {
        let e = tr(json!({"prompt": "p", "eta": eta}), Mode::Txt2Img).unwrap_err();
        assert_eq!(field_of(e), "eta");
    }
}

#[test]
fn noise_multiplier_and_extra_noise_go_where_a1111_applies_them() {
    use base64::Engine;
    let img = sdserve_pipeline::pipeline::RgbImage {
        width: 64,
        height: 64,
        pixels: vec![90; 64 * 64 * 3],
    };
    let img =
        base64::engine::general_purpose::STANDARD.encode(crate::png::encode(&img, "").unwrap());
    let run = |body: Value, mode: Mode, options: &Map<String, Value>| {
        translate(body.as_object().unwrap(), mode, options, || 1)
    };
    let none = Map::new();
    // img2img: the request's `initial_noise_multiplier`, else the option; `img2img_extra_noise`
    // from `override_settings` over `POST options`.
    let body = json!({"prompt": "p", "init_images": [img], "width": 256, "height": 256,
                      "initial_noise_multiplier": 1.2,
                      "override_settings": {"img2img_extra_noise": 0.3}});
    let t = run(body, Mode::Img2Img, &none).unwrap();
    assert_eq!(
        (
            t.native["noise_multiplier"].clone(),
            t.native["extra_noise"].clone()
        ),
        (json!(1.2), json!(0.3))
    );
    assert_eq!((t.valid.noise_multiplier, t.valid.extra_noise), (1.2, 0.3));
    let options = Map::from_iter([
        ("initial_noise_multiplier".to_string(), json!(0.8)),
        ("img2img_extra_noise".to_string(), json!(0.1)),
    ]);
    let body = json!({"prompt": "p", "init_images": [img], "width": 256, "height": 256});
    let t = run(body, Mode::Img2Img, &options).unwrap();
    assert_eq!((t.valid.noise_multiplier, t.valid.extra_noise), (0.8, 0.1));
    // txt2img: the multiplier is img2img's; the extra noise reaches the hires pass only.
    let hires = json!({"prompt": "p", "enable_hr": true, "width": 256, "height": 256,
                       "initial_noise_multiplier": 1.2});
    let t = run(hires, Mode::Txt2Img, &options).unwrap();
    assert_eq!((t.valid.noise_multiplier, t.valid.extra_noise), (1.0, 0.1));
    let plain = run(json!({"prompt": "p"}), Mode::Txt2Img, &options).unwrap();
    assert!(!plain.native.contains_key("extra_noise"));
    assert_eq!(plain.valid.extra_noise, 0.0);
    // Out of A1111's slider ranges: a 422 naming A1111's field.
    let bad = json!({"prompt": "p", "init_images": [img], "width": 256, "height": 256,
                     "initial_noise_multiplier": 2.0});
    assert_eq!(
        field_of(run(bad, Mode::Img2Img, &none).unwrap_err()),
        "initial_noise_multiplier"
    );
    let bad = json!({"prompt": "p", "init_images": [img], "width": 256, "height": 256,
                     "override_settings": {"img2img_extra_noise": "lots"}});
    assert_eq!(
        field_of(run(bad, Mode::Img2Img, &none).unwrap_err()),
        "override_settings.img2img_extra_noise"
    );
}

#[test]
fn restore_faces_runs_codeformer_at_the_options_weight() {
    let with = |body: Value, options: Value| {
        translate(
            body.as_object().unwrap(),
            Mode::Txt2Img,
            options.as_object().unwrap(),
            || 1,
        )
    };
    // Off by default, and when sent false over the option.
    let t = with(json!({"prompt": "p"}), json!({})).unwrap();
    assert_eq!(t.valid.restore_faces, None);
    let t = with(
        json!({"prompt": "p", "restore_faces": false}),
        json!({"face_restoration": true}),
    )
    .unwrap();
    assert_eq!(t.valid.restore_faces, None);
    // On: A1111's default weight, the option's, override_settings' over the option's; null
    // takes the `face_restoration` option.
    let t = with(json!({"prompt": "p", "restore_faces": true}), json!({})).unwrap();
    assert_eq!(t.valid.restore_faces, Some(0.5));
    assert!(t.ignored.is_empty(), "{:?}", t.ignored);
    let t = with(
        json!({"prompt": "p", "restore_faces": null}),
        json!({"face_restoration": true, "code_former_weight": 0.25}),
    )
    .unwrap();
    assert_eq!(t.valid.restore_faces, Some(0.25));
    let t = with(
        json!({"prompt": "p", "restore_faces": true, "override_settings": {"code_former_weight": 1}}),
        json!({"code_former_weight": 0.25}),
    )
    .unwrap();
    assert_eq!(t.valid.restore_faces, Some(1.0));
    // Broken values name A1111's fields.
    let e = with(json!({"prompt": "p", "restore_faces": true, "override_settings": {"code_former_weight": 2}}), json!({})).unwrap_err();
    assert_eq!(field_of(e), "override_settings.code_former_weight");
    let e = with(
        json!({"prompt": "p", "restore_faces": true}),
        json!({"face_restoration_model": "GFPGAN"}),
    )
    .unwrap_err();
    assert_eq!(field_of(e), "override_settings.face_restoration_model");
    let e = with(json!({"prompt": "p", "restore_faces": "yes"}), json!({})).unwrap_err();
    assert_eq!(field_of(e), "restore_faces");
    // Off, the other settings are not read (A1111 reads them only where it restores).
    let t = with(
        json!({"prompt": "p"}),
        json!({"face_restoration_model": "GFPGAN", "code_former_weight": 7}),
    )
    .unwrap();
    assert_eq!(t.valid.restore_faces, None);
}
