//! The sd-webui-controlnet extension's reference units (reference_only, reference_adain,
//! reference_adain+attn). References: `tools/make_reference_fixtures.py` (hook.py's attention
//! and AdaIN hooks written out on diffusers' UNet, tiny-ref: an SD 1.5-shaped random UNet);
//! `plain.<case>` is the same run without the unit. Each mechanism is shown to matter: without
//! the unit, with another style fidelity (the negative prompt's rows mixed otherwise), another
//! weight (other modules banked), the whole guidance window, another `hr_option` or without a
//! request's second unit the images leave the bounds. Cases: each module, a 9-channel
//! (inpainting) UNet (tiny-ref-inpaint, the extension's Inpaint Hijack), two units, the hires
//! fix (both passes, the second at style fidelity 0; the second pass alone). The reference pass's noise is a stream of its own: a unit that
//! banks nothing leaves an ancestral sampler's image as it is without the unit, bit for bit.

use crate::common;

use candle_core::{DType, Device};
use common::{fixture_path, image_case_failures, read_png, request_params, Fixtures};
use sdserve_pipeline::controlnet::{ControlMode, HiresOption, ReferenceKind, ReferenceUnit};
use sdserve_pipeline::pipeline::{GenerationParams, Hires, StableDiffusion, Upscaler};

fn unit_of(u: &serde_json::Value) -> ReferenceUnit {
    ReferenceUnit {
        kind: ReferenceKind::from_name(u["module"].as_str().unwrap()).unwrap(),
        image: read_png(u["image"].as_str().unwrap()),
        hires_image: None,
        weight: u["weight"].as_f64().unwrap(),
        style_fidelity: u["style_fidelity"].as_f64().unwrap(),
        guidance_start: u["guidance_start"].as_f64().unwrap(),
        guidance_end: u["guidance_end"].as_f64().unwrap(),
        hr_option: u
            .get("hr_option")
            .map(|o| HiresOption::from_name(o.as_str().unwrap()).unwrap())
            .unwrap_or_default(),
        control_mode: ControlMode::from_name(u["control_mode"].as_str().unwrap()).unwrap(),
        request_index: None,
        infotext: None,
    }
}

fn params_with(case: &serde_json::Value, edit: impl Fn(&mut ReferenceUnit)) -> GenerationParams {
    let references = case["references"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| {
            let mut unit = unit_of(u);
            edit(&mut unit);
            unit
        })
        .collect();
    // The hires fix on sdserve's default step rule, as the fixture script runs it.
    let hires = case.get("hires").map(|h| {
        let n = |k: &str| h[k].as_u64().unwrap() as usize;
        assert_eq!(h["upscaler"], "nearest");
        Hires {
            width: n("width"),
            height: n("height"),
            upscale_width: n("width"),
            upscale_height: n("height"),
            upscaler: Upscaler::Nearest,
            steps: n("steps"),
            strength: h["strength"].as_f64().unwrap(),
            scheduler: None,
            schedule: None,
            prompt: None,
            negative_prompt: None,
        }
    });
    GenerationParams {
        batch_size: case["batch_size"].as_u64().unwrap() as usize,
        references,
        hires,
        ..request_params(case)
    }
}

#[test]
fn reference_units_follow_the_extensions_hooks() {
    let f = Fixtures::load("reference");
    let cases = f.meta["cases"].as_object().unwrap().clone();
    let want = |label: &str| f.get(&format!("image.{label}")).clone();
    let (failures, images) = image_case_failures(&cases, |c| params_with(c, |_| ()), want);
    assert!(failures.is_empty(), "{failures:#?}");
    assert_eq!(images, 15);

    // Without the units the images are the plain runs', far from the references.
    let (without, _) = image_case_failures(&cases, |c| params_with(c, |u| u.weight = 0.0), want);
    assert_eq!(without.len(), 15, "{without:#?}");
}

#[test]
fn a_unit_that_banks_nothing_moves_no_sampler_draw() {
    // euler_a draws its ancestral noise from each image's generator after every step; a unit
    // at weight 0 runs its pass at every evaluation (drawing predict_q_sample's noise) and
    // banks nothing, so the images are those of the request without it, to the bit.
    let f = Fixtures::load("reference");
    let case = &f.meta["cases"]["adain_attn_batch"];
    assert_eq!(case["scheduler"], "euler_a");
    let with_unit = params_with(case, |u| u.weight = 0.0);
    let without = GenerationParams {
        references: Vec::new(),
        ..with_unit.clone()
    };
    let model = StableDiffusion::load(&fixture_path("tiny-ref"), &Device::Cpu, DType::F32).unwrap();
    let run = |p: &GenerationParams| {
        model
            .generate(p, &mut |_| std::ops::ControlFlow::Continue(()))
            .unwrap()
    };
    let (a, b) = (run(&with_unit), run(&without));
    assert_eq!(a.len(), 2);
    for (i, (a, b)) in a.iter().zip(&b).enumerate() {
        assert!(a.pixels == b.pixels, "image {i} moved");
    }
}

#[test]
fn the_guidance_window_the_hires_option_and_a_second_unit_matter() {
    let f = Fixtures::load("reference");
    let all = f.meta["cases"].as_object().unwrap().clone();
    let pick = |labels: &[&str]| -> serde_json::Map<String, serde_json::Value> {
        all.iter()
            .filter(|(l, _)| labels.contains(&l.as_str()))
            .map(|(l, c)| (l.clone(), c.clone()))
            .collect()
    };
    let want = |label: &str| f.get(&format!("image.{label}")).clone();
    // The windows (steps 1..8 of 8, and step 0 alone) run on every step leave the bounds.
    let windows = pick(&["adain_attn_window_late", "adain_attn_window_early"]);
    let (failures, _) = image_case_failures(
        &windows,
        |c| {
            params_with(c, |u| {
                u.guidance_start = 0.0;
                u.guidance_end = 1.0;
            })
        },
        want,
    );
    assert_eq!(failures.len(), 2, "{failures:#?}");
    // Without its second unit the two-unit request leaves them.
    let two = pick(&["two_units"]);
    let (failures, _) = image_case_failures(
        &two,
        |c| {
            let mut p = params_with(c, |_| ());
            p.references.truncate(1);
            p
        },
        want,
    );
    assert_eq!(failures.len(), 1, "{failures:#?}");
    // The hires fix: the unit of both passes in the first alone, the second pass's unit in
    // both.
    let hires = pick(&["hires_adain_attn", "hires_only_high_res"]);
    let (failures, _) = image_case_failures(
        &hires,
        |c| {
            params_with(c, |u| {
                u.hr_option = match u.hr_option {
                    HiresOption::Both => HiresOption::LowResOnly,
                    _ => HiresOption::Both,
                }
            })
        },
        want,
    );
    assert_eq!(failures.len(), 2, "{failures:#?}");
}

#[test]
fn the_uc_rows_mixing_and_the_weight_thresholds_matter() {
    let f = Fixtures::load("reference");
    let all = f.meta["cases"].as_object().unwrap().clone();
    let pick = |labels: &[&str]| -> serde_json::Map<String, serde_json::Value> {
        all.iter()
            .filter(|(l, _)| labels.contains(&l.as_str()))
            .map(|(l, c)| (l.clone(), c.clone()))
            .collect()
    };
    let want = |label: &str| f.get(&format!("image.{label}")).clone();
    // Another style fidelity mixes the negative prompt's rows otherwise.
    let balanced = pick(&["only", "adain"]);
    let (failures, _) = image_case_failures(
        &balanced,
        |c| params_with(c, |u| u.style_fidelity = 1.0 - u.style_fidelity + 0.4),
        want,
    );
    assert_eq!(failures.len(), 2, "{failures:#?}");
    // Another weight banks other modules.
    let weighted = pick(&["adain_attn_weight_half"]);
    let (failures, _) =
        image_case_failures(&weighted, |c| params_with(c, |u| u.weight = 1.0), want);
    assert_eq!(failures.len(), 1, "{failures:#?}");
}
