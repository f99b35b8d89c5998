//! png.rs's tests: the infotext A1111 writes and reads, and the tEXt/zTXt chunks.

use super::*;

/// The parameters text as a run with every negative guidance rule on that skipped would write it.
fn text_of(p: &GenerationParams, model_version: &str) -> String {
    let skips = crate::validate::sampler_params::skips_where_on(p);
    parameters_text(p, model_version, None, skips)
}

#[test]
fn a1111_inpainting_writes_a1111_s_keys_in_its_order() {
    use sdserve_pipeline::inpaint_a1111::{A1111Inpaint, MaskedContent};
    use sdserve_pipeline::pipeline::InitImage;
    let img = RgbImage {
        width: 1,
        height: 1,
        pixels: vec![0; 3],
    };
    let mut p = GenerationParams {
        prompt: "p".into(),
        init_image: Some(InitImage {
            image: img.clone(),
            mask: Some(img),
            strength: 0.75,
        }),
        a1111_inpaint: Some(A1111Inpaint {
            mask_blur_x: 4,
            mask_blur_y: 4,
            invert: true,
            masked_content: MaskedContent::Fill,
            only_masked_padding: Some(32),
            mask_round: true,
        }),
        ..Default::default()
    };
    let text = text_of(&p, "m");
    assert!(
        text.ends_with(
            "Denoising strength: 0.75, Mode: inpaint, Mask mode: Inpaint not masked, \
             Mask blur: 4, Inpaint area: Only masked, Masked area padding: 32, \
             Masked content: fill"
        ),
        "{text}"
    );
    // Blur differing across and down, whole picture, original content: none of those.
    p.a1111_inpaint = Some(A1111Inpaint {
        mask_blur_x: 4,
        mask_blur_y: 2,
        invert: false,
        masked_content: MaskedContent::Original,
        only_masked_padding: None,
        mask_round: true,
    });
    assert!(text_of(&p, "m").ends_with("Mode: inpaint"));
}

/// The extension's float sliders written as it writes them (`str()` of the unit's
/// float): a fraction kept, a whole value with `.0`, hidden sliders 0.5.
#[test]
fn unit_settings_write_the_float_sliders_as_sent() {
    let text = |p| {
        let [res, a, b] = unit_settings(&p);
        format!(", Processor Res: {res}, Threshold A: {a}, Threshold B: {b}")
    };
    assert_eq!(
        text(Preprocessor::Canny {
            low_threshold: 100.7,
            high_threshold: 200.0,
            resolution: 512
        }),
        ", Processor Res: 512, Threshold A: 100.7, Threshold B: 200.0"
    );
    assert_eq!(
        text(Preprocessor::Threshold {
            threshold: 127.5,
            resolution: 512
        }),
        ", Processor Res: 512, Threshold A: 127.5, Threshold B: 0.5"
    );
    assert_eq!(
        text(Preprocessor::ScribbleXdog {
            threshold: 32.0,
            resolution: 64
        }),
        ", Processor Res: 64, Threshold A: 32.0, Threshold B: 0.5"
    );
    assert_eq!(
        text(Preprocessor::Shuffle {
            resolution: 512,
            seed: 3
        }),
        ", Processor Res: 512, Threshold A: 0.5, Threshold B: 0.5"
    );
}

/// Found by fuzzing review: `get_text` inflated a zTXt chunk without bound, so a small PNG
/// sent to `/sdapi/v1/png-info` could ask for gigabytes.
#[test]
fn compressed_text_is_read_within_the_budget() {
    let bomb = "a".repeat(16 << 20);
    let mut png_bytes = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut png_bytes, 1, 1);
        enc.set_color(png::ColorType::Grayscale);
        enc.add_text_chunk("parameters".into(), "a cat".into())
            .unwrap();
        enc.add_ztxt_chunk("bomb".into(), bomb.clone()).unwrap();
        let mut w = enc.write_header().unwrap();
        let mut itxt = png::text_metadata::ITXtChunk::new("bomb2", bomb);
        itxt.compressed = true;
        w.write_text_chunk(&itxt).unwrap();
        w.write_image_data(&[0]).unwrap();
    }
    assert!(png_bytes.len() < 200 << 10, "{}", png_bytes.len());
    let (chunks, peak) = crate::fuzz_tests::peak_during(|| read_text_chunks(&png_bytes));
    assert_eq!(
        chunks.get("parameters").and_then(|v| v.as_str()),
        Some("a cat")
    );
    assert!(!chunks.contains_key("bomb") && !chunks.contains_key("bomb2"));
    assert!(peak < 4 * TEXT_BUDGET, "{peak} bytes");
    // Text within the budget is still read, compressed or not.
    let mut small = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut small, 1, 1);
        enc.set_color(png::ColorType::Grayscale);
        enc.add_ztxt_chunk("z".into(), "zipped".into()).unwrap();
        enc.add_itxt_chunk("i".into(), "ünï".into()).unwrap();
        let mut w = enc.write_header().unwrap();
        w.write_image_data(&[0]).unwrap();
    }
    let chunks = read_text_chunks(&small);
    assert_eq!(chunks["z"], "zipped");
    assert_eq!(chunks["i"], "ünï");
}

#[test]
fn roundtrip_with_parameters_chunk() {
    let img = RgbImage {
        width: 3,
        height: 2,
        pixels: (0..18).collect(),
    };
    let params = GenerationParams {
        prompt: "a cat".into(),
        negative_prompt: "dog".into(),
        steps: 4,
        width: 3,
        height: 2,
        seed: 42,
        guidance_scale: 7.5,
        scheduler: Some(SchedulerKind::EulerAncestral),
        prompt_syntax: sdserve_pipeline::pipeline::PromptSyntax::A1111,
        ..Default::default()
    };
    let text = text_of(&params, "m@1");
    // Clip skip and LoRAs read as A1111 writes them.
    let with_adapters = GenerationParams {
        clip_skip: 2,
        loras: vec![sdserve_pipeline::pipeline::LoraWeight {
            name: "ink".into(),
            weight: 0.8,
        }],
        ..params.clone()
    };
    let adapted = text_of(&with_adapters, "m@1");
    assert!(adapted.starts_with("a cat <lora:ink:0.8>\n"), "{adapted}");
    assert!(
        adapted.contains(", Size: 3x2, Clip skip: 2, Model: m@1"),
        "{adapted}"
    );
    // A sampler's eta where it is not its default, under A1111's names.
    for (kind, eta, written) in [
        (
            SchedulerKind::DdimA1111,
            Some(1.0),
            ", Eta DDIM: 1.0, Version",
        ),
        (SchedulerKind::Ddim, Some(0.25), ", Eta DDIM: 0.25, Version"),
        (
            SchedulerKind::DdimCfgpp,
            Some(0.5),
            ", Eta DDIM: 0.5, Version",
        ),
        (SchedulerKind::DdimCfgpp, Some(0.0), ""),
        (
            SchedulerKind::EulerAncestral,
            Some(0.5),
            ", Eta: 0.5, Version",
        ),
        (
            SchedulerKind::EulerAncestralKarras,
            Some(0.0),
            ", Eta: 0.0, Version",
        ),
        (
            SchedulerKind::Dpm2Ancestral,
            Some(0.5),
            ", Eta: 0.5, Version",
        ),
        (SchedulerKind::DpmPpSde, Some(0.25), ", Eta: 0.25, Version"),
        (
            SchedulerKind::DpmPp2mSdeKarras,
            Some(0.0),
            ", Eta: 0.0, Version",
        ),
        (SchedulerKind::DpmPpSdeKarras, Some(1.0), ""),
        (SchedulerKind::DpmPp3mSde, Some(0.5), ", Eta: 0.5, Version"),
        (SchedulerKind::DpmPp2sAncestralKarras, Some(1.0), ""),
        (SchedulerKind::DpmFast, Some(0.5), ", Eta: 0.5, Version"),
        (SchedulerKind::DpmFast, None, ""),
        (SchedulerKind::DpmAdaptive, Some(0.0), ", Eta: 0.0, Version"),
        (SchedulerKind::DpmPp2m, Some(0.5), ""),
        (SchedulerKind::Dpm2, Some(0.5), ""),
        (
            SchedulerKind::Dpm2AncestralA1111,
            Some(0.5),
            ", Eta: 0.5, Version",
        ),
        (SchedulerKind::Dpm2A1111, Some(0.5), ""),
        (SchedulerKind::EulerAncestral, Some(1.0), ""),
        (SchedulerKind::DdimA1111, Some(0.0), ""),
        (SchedulerKind::DdimA1111, None, ""),
        (SchedulerKind::Euler, Some(0.5), ""),
        (SchedulerKind::PlmsA1111, Some(0.5), ""),
    ] {
        let p = GenerationParams {
            scheduler: Some(kind),
            eta,
            ..params.clone()
        };
        let text = text_of(&p, "m@1");
        assert_eq!(text.contains("Eta"), !written.is_empty(), "{text}");
        assert!(text.contains(written), "{text}");
    }
    // The schedule type is the run's sigma schedule.
    use sdserve_pipeline::schedulers::SigmaSchedule;
    for (kind, schedule, label) in [
        (
            SchedulerKind::Euler,
            SigmaSchedule::Exponential,
            "Euler, Schedule type: Exponential",
        ),
        (
            SchedulerKind::DpmPp2mSde,
            SigmaSchedule::Beta,
            "DPM++ 2M SDE, Schedule type: Beta",
        ),
        (
            SchedulerKind::DpmPp2mKarras,
            SigmaSchedule::Karras,
            "DPM++ 2M, Schedule type: Karras",
        ),
    ] {
        let p = GenerationParams {
            scheduler: Some(kind),
            schedule: Some(schedule),
            ..params.clone()
        };
        let t = text_of(&p, "m@1");
        assert!(
            t.contains(&format!("Sampler: {label}, Scheduler: {kind}")),
            "{t}"
        );
    }
    let want = format!(
        "a cat\nNegative prompt: dog\nSteps: 4, Sampler: Euler a, Schedule type: Uniform, Scheduler: euler_a, CFG scale: 7.5, Seed: 42, Size: 3x2, Model: m@1, Version: sdserve {}",
        env!("CARGO_PKG_VERSION")
    );
    assert_eq!(text, want);
    let bytes = encode(&img, &text).unwrap();
    let mut dec = png::Decoder::new(std::io::Cursor::new(bytes.clone()))
        .read_info()
        .unwrap();
    let mut buf = vec![0; dec.output_buffer_size().unwrap()];
    dec.next_frame(&mut buf).unwrap();
    assert_eq!(buf, img.pixels);
    let chunks = &dec.info().uncompressed_latin1_text;
    assert_eq!(chunks.len(), 1);
    assert_eq!(chunks[0].keyword, "parameters");
    assert_eq!(chunks[0].text, text);
    assert_eq!(read_parameters(&bytes).as_deref(), Some(text.as_str()));
    assert!(read_text_chunks(b"not a png").is_empty());
}

#[test]
fn noise_options_are_written_where_they_applied() {
    let image = RgbImage {
        width: 8,
        height: 8,
        pixels: vec![0; 8 * 8 * 3],
    };
    let init = sdserve_pipeline::pipeline::InitImage {
        image,
        mask: None,
        strength: 0.5,
    };
    let noisy = GenerationParams {
        noise_multiplier: 1.2,
        extra_noise: 0.3,
        scheduler: Some(SchedulerKind::EulerAncestral),
        eta: Some(0.5),
        ..Default::default()
    };
    // As A1111 adds them: `Noise multiplier` (processing), `Extra noise`, then `Eta`.
    let img2img = GenerationParams {
        init_image: Some(init),
        ..noisy.clone()
    };
    let text = text_of(&img2img, "m@1");
    assert!(
        text.contains(", Noise multiplier: 1.2, Extra noise: 0.3, Eta: 0.5, Version"),
        "{text}"
    );
    // Text-to-image without the hires pass starts from no image: neither applied.
    let text = text_of(&noisy, "m@1");
    assert!(
        !text.contains("Noise multiplier") && !text.contains("Extra noise"),
        "{text}"
    );
}

/// The extension numbers its units in the request's order (`Infotext.write_infotext`
/// enumerates the enabled units), a reference unit among the ControlNets where it was sent.
#[test]
fn controlnet_entries_keep_the_request_s_unit_order() {
    use sdserve_pipeline::controlnet::{ControlNet, ControlNetUnit, ReferenceKind};
    let image = RgbImage {
        width: 1,
        height: 1,
        pixels: vec![0; 3],
    };
    let reference = Preprocessor::of_reference(ReferenceKind::Adain, 0.25);
    let canny = Preprocessor::Canny {
        low_threshold: 100.0,
        high_threshold: 200.0,
        resolution: 512,
    };
    let unit = |model: &str, preprocessor: Preprocessor, scale: f64| ControlNetUnit {
        model: std::sync::Arc::new(ControlNet::named(model)),
        image: image.clone(),
        preprocessor: Some(preprocessor),
        scale,
        guidance_start: 0.0,
        guidance_end: 1.0,
        hires_image: None,
        hr_option: Default::default(),
        inpaint_crop: false,
        control_mode: Default::default(),
        mask: None,
        hires_mask: None,
        infotext: None,
    };
    // A dialect's own entry is written as recorded, a reference unit's too.
    let recorded = "Module: reference_adain, Model: None, Weight: 0.9, Resize Mode: Resize and Fill, Processor Res: 512, Threshold A: 0.25, Threshold B: 0.5, Guidance Start: 0.0, Guidance End: 1.0, Pixel Perfect: True, Control Mode: Balanced";
    let sent = vec![
        unit("", reference, 0.7),
        unit("cn-a", canny, 0.75),
        ControlNetUnit {
            infotext: Some(recorded.into()),
            ..unit("", reference, 0.9)
        },
        unit("cn-b", canny, 0.5),
    ];
    let mut p = GenerationParams {
        prompt: "p".into(),
        controlnets: sent.clone(),
        ..Default::default()
    };
    p.split_references();
    assert_eq!((p.controlnets.len(), p.references.len()), (2, 2));
    assert_eq!(p.units_with_references(), sent);
    let text = text_of(&p, "m");
    let entry = |i: usize| {
        let at = text.find(&format!("ControlNet {i}: \"")).expect("entry");
        text[at..].split(", Guidance").next().unwrap().to_string()
    };
    // The native units as they ran: stretched to the size, the reference modules' resolution
    // the class slider's 512 as the extension writes it.
    let fidelity =
        ", Resize Mode: Just Resize, Processor Res: 512, Threshold A: 0.25, Threshold B: 0.5";
    assert_eq!(
        entry(0),
        format!("ControlNet 0: \"Module: reference_adain, Model: None, Weight: 0.7{fidelity}")
    );
    let canny =
        ", Resize Mode: Just Resize, Processor Res: 512, Threshold A: 100.0, Threshold B: 200.0";
    assert_eq!(
        entry(1),
        format!("ControlNet 1: \"Module: canny, Model: cn-a, Weight: 0.75{canny}")
    );
    assert!(
        text.contains(&format!("ControlNet 2: \"{recorded}\"")),
        "{text}"
    );
    assert_eq!(
        entry(3),
        format!("ControlNet 3: \"Module: canny, Model: cn-b, Weight: 0.5{canny}")
    );
}

#[test]
fn values_are_quoted_as_a1111_quotes_them() {
    // infotext_utils.quote: JSON only where `,`, `:` or a newline would break the line.
    assert_eq!(quote(""), "");
    assert_eq!(quote("plain text"), "plain text");
    assert_eq!(
        quote("Module: canny, Model: c"),
        "\"Module: canny, Model: c\""
    );
    assert_eq!(quote("a \"b\": c\nd"), "\"a \\\"b\\\": c\\nd\"");
}
