//! A1111's inpainting on its timestep samplers (`ddim_a1111`, `plms_a1111`, `ddim_cfgpp`,
//! `unipc_a1111`) against A1111's own code (`tools/make_inpaint_a1111_timesteps_fixtures.py`,
//! cases in `a1111-inpaint-timesteps.json`): their CFG denoiser blends the model's input with
//! the init latents (`mask_before_denoising`), not the prediction as the other samplers do.

use crate::a1111_inpaint::params_of;
use crate::common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use sdserve_pipeline::pipeline::StableDiffusion;

struct Fixtures {
    cases: serde_json::Map<String, serde_json::Value>,
    tensors: HashMap<String, Tensor>,
}

fn load() -> Fixtures {
    let dir = common::fixture_path("");
    let text = std::fs::read_to_string(dir.join("a1111-inpaint-timesteps.json")).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    let tensors = candle_core::safetensors::load(
        dir.join("a1111-inpaint-timesteps.safetensors"),
        &Device::Cpu,
    )
    .expect("references");
    Fixtures {
        cases: json["cases"].as_object().unwrap().clone(),
        tensors,
    }
}

/// Every sampler of the four, v-prediction and a batch among the cases (a reference losing
/// them fails here, not silently).
fn check_coverage(cases: &serde_json::Map<String, serde_json::Value>) {
    for scheduler in ["ddim_a1111", "plms_a1111", "ddim_cfgpp", "unipc_a1111"] {
        assert!(
            cases.values().any(|c| c["scheduler"] == scheduler),
            "no case of {scheduler}"
        );
    }
    assert!(cases.values().any(|c| c["model"] == "tiny-b"));
    assert!(cases.values().any(|c| c["batch_size"].as_u64() > Some(1)));
}

/// Within the image bounds of every end-to-end test, and as close as the A1111 inpainting
/// tests hold diffusers' sampling (a mean of at most 0.05 per image).
#[test]
fn images_match_a1111s_blend_before_denoising() {
    let f = load();
    check_coverage(&f.cases);
    let mut models = HashMap::new();
    let mut failures = Vec::new();
    for (label, case) in &f.cases {
        let name = case["model"].as_str().unwrap();
        let model = models.entry(name.to_string()).or_insert_with(|| {
            StableDiffusion::load(&common::fixture_path(name), &Device::Cpu, DType::F32).unwrap()
        });
        let images = model
            .generate(&params_of(case), &mut |_| {
                std::ops::ControlFlow::Continue(())
            })
            .unwrap();
        let want = &f.tensors[&format!("result.{label}")];
        failures.extend(common::batch_failures(label, &images, want));
        for (i, image) in images.iter().enumerate() {
            let row: Vec<u8> = want
                .get(i)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let (mean, _) = common::pixel_difference(&image.pixels, &row);
            if mean > 0.05 {
                failures.push(format!("{label}[{i}]: mean {mean:.4} over 0.05"));
            }
        }
    }
    assert!(failures.is_empty(), "differ from A1111's: {failures:?}");
}

/// The blend the pipeline ran on these samplers before (the prediction's clean latents mixed
/// with the init latents, as for k-diffusion's samplers), on A1111's same sampler: every
/// image leaves the bounds the test above holds, so that test tells the two blends apart.
#[test]
fn the_x0_blend_misses_a1111s_images() {
    let f = load();
    check_coverage(&f.cases);
    for label in f.cases.keys() {
        let want = &f.tensors[&format!("result.{label}")];
        let other = &f.tensors[&format!("x0_blend.{label}")];
        for i in 0..want.dim(0).unwrap() {
            let row: Vec<u8> = other
                .get(i)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let missed =
                common::image_failure(&format!("{label}[{i}]"), &row, &want.get(i).unwrap());
            assert!(
                missed.is_some(),
                "{label}[{i}]: the x0 blend is within A1111's bounds"
            );
        }
    }
}
