//! The PiDiNet modules (softedge_pidinet, softedge_pidisafe, scribble_pidinet) against the
//! extension's own `pidinet` model, `apply_pidinet` and legacy functions
//! (`tools/make_pidinet_fixtures.py`: the extension's `PiDiNet` with `pidinet()`'s carv4 config
//! at reduced widths, seeded random weights, saved as the real `table5_pidinet.pth` is: a
//! `state_dict` of `module.` names). Our network turns the pixel-difference convolutions into
//! plain ones when it reads them; the logits agree to float noise, and the u8 maps are
//! compared value by value, the few that float noise moves across a rounding step counted.

use std::sync::Arc;

use sdserve_pipeline::controlnet::preprocess::{
    network, pidinet_edges, pidinet_logits, resize_image_with_pad, scribble_hed, LoadedNetworks,
    PidiNetwork, Preprocessor, PIDINET,
};
use sdserve_pipeline::pipeline::RgbImage;

use super::common::fixture_path;
use super::Refs;

/// The fixture network, as a keeper hands it out.
fn net() -> (LoadedNetworks, Arc<PidiNetwork>) {
    let path = fixture_path("pidinet/table5_pidinet.pth");
    let nets = LoadedNetworks::default().read(&PIDINET, &path).unwrap();
    let pidi = network::<PidiNetwork>(&nets, &PIDINET).unwrap();
    (nets, pidi)
}

fn preprocessor(module: &str, resolution: u32) -> Preprocessor {
    match module {
        "softedge_pidinet" => Preprocessor::SoftedgePidinet { resolution },
        "softedge_pidisafe" => Preprocessor::SoftedgePidisafe { resolution },
        "scribble_pidinet" => Preprocessor::ScribblePidinet { resolution },
        other => panic!("{other}"),
    }
}

#[test]
fn the_network_reads_its_widths_and_its_logits_agree_to_float_noise() {
    let (_, net) = net();
    assert_eq!(net.widths(), (4, 8));
    let t = Refs::load("pidinet/pidinet");
    let mut worst = 0f32;
    for key in t.tensors.keys().filter(|k| k.starts_with("logits.")) {
        let rest = key.strip_prefix("logits.").unwrap();
        let padded = t.image(&format!("padded.{rest}"));
        let want = t.floats(key);
        let got = pidinet_logits(&net, &padded).unwrap();
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
    println!("PiDiNet logits: largest difference {worst:e}");
    assert!(worst < 2e-5, "logits differ by {worst}");
}

#[test]
fn pidinet_modules_make_the_extension_s_maps() {
    let (nets, net) = net();
    let t = Refs::load("pidinet/pidinet");
    let cases = &t.cases;
    assert_eq!(cases.len(), 21);
    let mut total = 0;
    for c in cases {
        let module = c["module"].as_str().unwrap();
        let name = c["image"].as_str().unwrap();
        let res = c["resolution"].as_u64().unwrap() as u32;
        let photo = t.image(&format!("image.{name}"));
        let want = t.image(c["key"].as_str().unwrap());
        let label = format!("{module} {name} {res}");
        // The module's steps on the reference's padded image (the cubic enlarging resize is
        // matched within a level elsewhere, so this isolates the network and its steps).
        let mut ours = resize_image_with_pad(&photo, res);
        ours.image = t.image(&format!("padded.{name}.{res}"));
        let edges = pidinet_edges(&net, &ours.image, module == "softedge_pidisafe").unwrap();
        let from_padded = if module == "scribble_pidinet" {
            let map = scribble_hed(&ours.crop_gray(&edges), ours.width, ours.height);
            RgbImage {
                width: ours.width as u32,
                height: ours.height as u32,
                pixels: map.iter().flat_map(|&v| [v, v, v]).collect(),
            }
        } else {
            ours.crop_gray_to_rgb(&edges)
        };
        let (differing, max) = super::compare(&from_padded, &want, &label);
        println!(
            "{label}: {differing} of {} values differ, by at most {max}",
            want.pixels.len()
        );
        // Float noise in the logits can move a value across a truncation step: one level for
        // the soft map; the thresholded maps exact.
        match module {
            "softedge_pidinet" => assert!(max <= 1 && differing <= 3 * 6, "{label}"),
            _ => assert_eq!(differing, 0, "{label}: max {max}"),
        }
        total += differing;
        // Whole, from the photo, where the area resize runs: the same map.
        if res <= photo.width.min(photo.height) {
            let got = preprocessor(module, res).run_with(&photo, &nets).unwrap();
            assert!(got == from_padded, "{label}: whole run differs");
        }
    }
    println!("PiDiNet maps: {total} values differ in all");
}
