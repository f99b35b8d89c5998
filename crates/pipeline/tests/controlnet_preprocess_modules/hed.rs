//! The HED modules (softedge_hed, softedge_hedsafe, scribble_hed) against the extension's own
//! `ControlNetHED_Apache2`, `apply_hed` and legacy functions (`tools/make_hed_fixtures.py`: the
//! class at reduced widths with seeded random weights, saved with `torch.save` as the real
//! `ControlNetHED.pth` is). The network's logits agree to float noise; the u8 maps they make
//! are compared value by value, the few that float noise moves across a rounding step counted.

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{Device, Tensor};
use sdserve_pipeline::controlnet::preprocess::{
    hed_logits, network, resize_image_with_pad, HedNetwork, LoadedNetworks, Preprocessor, HED,
};
use sdserve_pipeline::pipeline::RgbImage;

use super::common::fixture_path;

/// The fixture network, with the network itself.
fn net() -> (LoadedNetworks, Arc<HedNetwork>) {
    let path = fixture_path("hed/ControlNetHED.pth");
    let nets = LoadedNetworks::default().read(&HED, &path).unwrap();
    let hed = network::<HedNetwork>(&nets, &HED).unwrap();
    (nets, hed)
}

fn tensors() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture_path("hed/hed.safetensors"), &Device::Cpu)
        .expect("tools/make_hed_fixtures.py output")
}

fn cases() -> Vec<serde_json::Value> {
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture_path("hed/hed.json")).unwrap())
            .unwrap();
    json["cases"].as_array().unwrap().clone()
}

fn image(t: &HashMap<String, Tensor>, key: &str) -> RgbImage {
    let t = &t[key];
    let (h, w, _) = t.dims3().unwrap();
    RgbImage {
        width: w as u32,
        height: h as u32,
        pixels: t.flatten_all().unwrap().to_vec1::<u8>().unwrap(),
    }
}

fn preprocessor(module: &str, resolution: u32) -> Preprocessor {
    match module {
        "softedge_hed" => Preprocessor::SoftedgeHed { resolution },
        "softedge_hedsafe" => Preprocessor::SoftedgeHedsafe { resolution },
        "scribble_hed" => Preprocessor::ScribbleHed { resolution },
        other => panic!("{other}"),
    }
}

#[test]
fn the_network_reads_its_widths_and_its_logits_agree_to_float_noise() {
    let net = net();
    assert_eq!(net.1.widths(), [4, 8, 16, 32, 32]);
    let t = tensors();
    let mut worst = 0f32;
    for key in t.keys().filter(|k| k.starts_with("logits.")) {
        let rest = key.strip_prefix("logits.").unwrap();
        let padded = image(&t, &format!("padded.{rest}"));
        let want = t[key].flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let got = hed_logits(&net.1, &padded).unwrap();
        assert_eq!(got.len(), want.len(), "{key}");
        let spread = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!(
            spread > 4.0,
            "{key}: logits up to {spread}, too flat to test"
        );
        for (g, w) in got.iter().zip(&want) {
            worst = worst.max((g - w).abs());
        }
    }
    println!("largest logit difference: {worst:e}");
    assert!(worst < 1e-4, "{worst}");
}

#[test]
fn hed_modules_make_the_extension_s_maps() {
    let net = net();
    let t = tensors();
    let cases = cases();
    assert_eq!(cases.len(), 21);
    for c in cases {
        let module = c["module"].as_str().unwrap();
        let name = c["image"].as_str().unwrap();
        let res = c["resolution"].as_u64().unwrap() as u32;
        let photo = image(&t, &format!("image.{name}"));
        let want = image(&t, c["key"].as_str().unwrap());
        // The resize to the processor resolution is checked elsewhere (the cubic one within
        // a level): where it enlarges, start from the reference's padded image.
        let enlarged = res > photo.width.min(photo.height);
        let padded = resize_image_with_pad(&photo, res);
        if !enlarged {
            assert_eq!(padded.image, image(&t, &format!("padded.{name}.{res}")));
        }
        let got = preprocessor(module, res).run_with(&photo, &net.0).unwrap();
        let label = format!("{module} {name} {res}");
        let (differing, max) = super::compare(&got, &want, &label);
        println!(
            "{label}: {differing} of {} values differ, by at most {max}",
            got.pixels.len()
        );
        if !enlarged {
            assert_eq!(differing, 0, "{label}: max {max}");
        }
    }
}
