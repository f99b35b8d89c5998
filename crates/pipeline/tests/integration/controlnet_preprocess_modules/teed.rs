//! softedge_teed against the extension's own `TED`, `TEEDDetector.__call__` and
//! `PreprocessorTEED.__call__` (`tools/make_teed_fixtures.py`: the full-width network with
//! seeded random weights, saved as the real `7_model.pth` is: a plain state dict). The logits
//! (the four maps' mean) agree to float noise; the u8 maps are compared value by value, the
//! few that float noise moves across a truncation step counted.

use std::sync::Arc;

use sdserve_pipeline::controlnet::preprocess::{
    network, resize_image_with_pad, teed_edges, teed_logits, LoadedNetworks, Preprocessor,
    TeedNetwork, TEED,
};

use super::common::fixture_path;
use super::Refs;

/// The fixture network, as a keeper hands it out.
fn net() -> (LoadedNetworks, Arc<TeedNetwork>) {
    let path = fixture_path("teed/7_model.pth");
    let nets = LoadedNetworks::default().read(&TEED, &path).unwrap();
    let teed = network::<TeedNetwork>(&nets, &TEED).unwrap();
    (nets, teed)
}

#[test]
fn teed_logits_agree_to_float_noise() {
    let (_, net) = net();
    let t = Refs::load("teed/teed");
    let mut worst = 0f32;
    let mut keys = 0;
    for key in t.tensors.keys().filter(|k| k.starts_with("logits.")) {
        let rest = key.strip_prefix("logits.").unwrap();
        let padded = t.image(&format!("padded.{rest}"));
        let want = t.floats(key);
        let got = teed_logits(&net, &padded).unwrap();
        assert_eq!(got.len(), want.len(), "{key}");
        // Both signs, past the sigmoid's middle: the fixture tests the whole curve.
        let (lo, hi) = want
            .iter()
            .fold((0f32, 0f32), |(l, h), &v| (l.min(v), h.max(v)));
        assert!(
            lo < -1.0 && hi > 1.0,
            "{key}: logits {lo}..{hi}, too flat to test"
        );
        for (g, w) in got.iter().zip(&want) {
            worst = worst.max((g - w).abs());
        }
        keys += 1;
    }
    assert_eq!(keys, 7);
    println!("TEED logits: largest difference {worst:e}");
    assert!(worst < 2e-5, "logits differ by {worst}");
}

#[test]
fn softedge_teed_makes_the_extension_s_maps() {
    let (nets, net) = net();
    let t = Refs::load("teed/teed");
    let cases = &t.cases;
    assert_eq!(cases.len(), 28);
    let (mut total, mut values) = (0, 0);
    for c in cases {
        let name = c["image"].as_str().unwrap();
        let res = c["resolution"].as_u64().unwrap() as u32;
        let steps = c["safe_steps"].as_u64().unwrap() as u32;
        let photo = t.image(&format!("image.{name}"));
        let want = t.image(c["key"].as_str().unwrap());
        let label = format!("softedge_teed {name} {res} steps {steps}");
        // On the reference's padded image (the cubic enlarging resize is matched within a
        // level elsewhere, so this isolates the network and its steps).
        let mut ours = resize_image_with_pad(&photo, res);
        ours.image = t.image(&format!("padded.{name}.{res}"));
        let edges = teed_edges(&net, &ours.image, steps).unwrap();
        let from_padded = ours.crop_gray_to_rgb(&edges);
        let differing = super::check_safe_step_map(&from_padded, &want, steps, &label);
        total += differing;
        values += want.pixels.len();
        // Whole, from the photo, where the area resize runs: the same map; the slider's
        // fractional part is dropped (`int(slider_1)`).
        if res <= photo.width.min(photo.height) {
            let p = Preprocessor::SoftedgeTeed {
                safe_steps: f64::from(steps) + 0.75,
                resolution: res,
            };
            let got = p.run_with(&photo, &nets).unwrap();
            assert!(got == from_padded, "{label}: whole run differs");
        }
    }
    println!("TEED maps: {total} of {values} values differ in all");
}
