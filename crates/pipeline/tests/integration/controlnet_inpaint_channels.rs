//! A ControlNet inpaint unit on an inpainting (9-channel) UNet: the sd-webui-controlnet
//! extension replaces the UNet's mask and masked-image channels with the unit's on every
//! evaluation (its "inpaint hijack"). References: `tools/make_cn_inpaint_channels_fixtures.py`
//! (diffusers' ControlNet pipeline on tiny-inpaint with cn-i, the UNet fed the unit's channels
//! as hook.py makes them), text-to-image; `plain.<case>` is the same run fed the text-to-image
//! conditioning instead (a mask of ones, a grey image), which ours must not be.

use crate::common;

use std::sync::Arc;

use common::{fixture_path, image_case_failures, read_png, request_params, Fixtures};
use sdserve_pipeline::controlnet::preprocess::Preprocessor;
use sdserve_pipeline::controlnet::{ControlNet, ControlNetUnit};
use sdserve_pipeline::pipeline::GenerationParams;

fn params_of(case: &serde_json::Value) -> GenerationParams {
    let controlnets = case["controlnets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| {
            assert_eq!(u["module"], "inpaint");
            ControlNetUnit {
                model: Arc::new(ControlNet::new(
                    "cn-i",
                    fixture_path("controlnet-inpaint/cn-i"),
                )),
                image: read_png(u["image"].as_str().unwrap()),
                preprocessor: Some(Preprocessor::Inpaint),
                scale: u["scale"].as_f64().unwrap(),
                guidance_start: u["guidance_start"].as_f64().unwrap(),
                guidance_end: u["guidance_end"].as_f64().unwrap(),
                hires_image: None,
                hr_option: Default::default(),
                inpaint_crop: true,
                control_mode: Default::default(),
                mask: Some(read_png(u["mask"].as_str().unwrap())),
                hires_mask: None,
                infotext: None,
            }
        })
        .collect();
    GenerationParams {
        batch_size: case["batch_size"].as_u64().unwrap() as usize,
        controlnets,
        ..request_params(case)
    }
}

#[test]
fn the_units_mask_and_image_replace_the_inpainting_unets_channels() {
    let f = Fixtures::load("controlnet_inpaint_channels");
    let cases = f.meta["cases"].as_object().unwrap().clone();
    let (failures, images) = image_case_failures(&cases, params_of, |label| {
        f.get(&format!("image.{label}")).clone()
    });
    assert!(failures.is_empty(), "{failures:#?}");
    assert_eq!(images, 3);
    // Without the unit's channels the references are elsewhere: every image leaves the bounds.
    let (without, _) = image_case_failures(&cases, params_of, |label| {
        f.get(&format!("plain.{label}")).clone()
    });
    assert_eq!(without.len(), 3, "{without:#?}");
}
