//! The HED modules (softedge_hed, softedge_hedsafe, scribble_hed) against the extension's own
//! `ControlNetHED_Apache2`, `apply_hed` and legacy functions (`tools/make_hed_fixtures.py`: the
//! class at reduced widths with seeded random weights, saved with `torch.save` as the real
//! `ControlNetHED.pth` is). The network's logits agree to float noise; the u8 maps they make
//! are compared value by value, the few that float noise moves across a rounding step counted.

use std::sync::Arc;

use sdserve_pipeline::controlnet::preprocess::{
    hed_logits, network, resize_image_with_pad, HedNetwork, LoadedNetworks, Preprocessor, HED,
};

use super::common::fixture_path;
use super::Refs;

/// The fixture network, with the network itself.
fn net() -> (LoadedNetworks, Arc<HedNetwork>) {
    let path = fixture_path("hed/ControlNetHED.pth");
    let nets = LoadedNetworks::default().read(&HED, &path).unwrap();
    let hed = network::<HedNetwork>(&nets, &HED).unwrap();
    (nets, hed)
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
    let t = Refs::load("hed/hed");
    let mut worst = 0f32;
    for key in t.tensors.keys().filter(|k| k.starts_with("logits.")) {
        let rest = key.strip_prefix("logits.").unwrap();
        let padded = t.image(&format!("padded.{rest}"));
        let want = t.floats(key);
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
    let t = Refs::load("hed/hed");
    let cases = &t.cases;
    assert_eq!(cases.len(), 21);
    for c in cases {
        let module = c["module"].as_str().unwrap();
        let name = c["image"].as_str().unwrap();
        let res = c["resolution"].as_u64().unwrap() as u32;
        let photo = t.image(&format!("image.{name}"));
        let want = t.image(c["key"].as_str().unwrap());
        // The resize to the processor resolution is checked elsewhere (the cubic one within
        // a level): where it enlarges, start from the reference's padded image.
        let enlarged = res > photo.width.min(photo.height);
        let padded = resize_image_with_pad(&photo, res);
        if !enlarged {
            assert_eq!(padded.image, t.image(&format!("padded.{name}.{res}")));
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
