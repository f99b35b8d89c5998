//! The M-LSD module (mlsd) against the extension's own `MobileV2_MLSD_Large` modules,
//! `pred_lines`, `apply_mlsd` and legacy `mlsd` (`tools/make_mlsd_fixtures.py`: the network
//! at reduced widths wired as the class wires it, seeded random weights, saved as the real
//! `mlsd_large_512_fp32.pth` is: its state_dict). The network's output agrees to float noise;
//! the decoded segments and the maps are compared whole; OpenCV's `cv2.line` alone on
//! segments across, along and off small canvases, pixel for pixel.

use std::sync::Arc;

use sdserve_pipeline::controlnet::preprocess::{
    decode_lines, draw_line, draw_segments, mlsd_lines, network, resize_image_with_pad,
    LoadedNetworks, MlsdNetwork, Preprocessor, MLSD,
};

use super::common::fixture_path;
use super::Refs;

fn net() -> (LoadedNetworks, Arc<MlsdNetwork>) {
    let path = fixture_path("mlsd/mlsd_large_512_fp32.pth");
    let nets = LoadedNetworks::default().read(&MLSD, &path).unwrap();
    let mlsd = network::<MlsdNetwork>(&nets, &MLSD).unwrap();
    (nets, mlsd)
}

#[test]
fn the_network_reads_its_widths_and_its_output_agrees_to_float_noise() {
    let (_, net) = net();
    assert_eq!(net.widths(), (8, 12, 8));
    let t = Refs::load("mlsd/mlsd");
    let mut worst = 0f32;
    let keys: Vec<_> = t
        .tensors
        .keys()
        .filter(|k| k.starts_with("output."))
        .collect();
    assert_eq!(keys.len(), 3);
    for key in keys {
        let rest = key.strip_prefix("output.").unwrap();
        let padded = t.image(&format!("padded.{rest}"));
        let want = t.floats(key);
        let (ow, oh, got) = net.output(&padded).unwrap();
        assert_eq!(
            (ow, oh),
            (padded.width as usize / 2, padded.height as usize / 2)
        );
        assert_eq!(got.len(), want.len(), "{key}");
        let spread = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!(spread > 4.0, "{key}: output up to {spread}, too flat");
        for (g, w) in got.iter().zip(&want) {
            worst = worst.max((g - w).abs());
        }
    }
    println!("M-LSD output: largest difference {worst:e}");
    assert!(worst < 1e-4, "the output differs by {worst}");
}

/// The case's settings: (value threshold, distance threshold).
fn thresholds(c: &serde_json::Value) -> (f64, f64) {
    (
        c["value_threshold"].as_f64().unwrap(),
        c["distance_threshold"].as_f64().unwrap(),
    )
}

#[test]
fn decoding_the_reference_output_gives_its_segments() {
    let t = Refs::load("mlsd/mlsd");
    let mut checked = 0;
    for c in &t.cases {
        let (name, res) = (
            c["image"].as_str().unwrap(),
            c["resolution"].as_u64().unwrap(),
        );
        let Some(out) = t.tensors.get(&format!("output.{name}.{res}")) else {
            continue;
        };
        let (_, oh, ow) = out.dims3().unwrap();
        let (v, d) = thresholds(c);
        let got = decode_lines(&t.floats(&format!("output.{name}.{res}")), ow, oh, v, d);
        let key = format!("lines.{}", c["key"].as_str().unwrap());
        let want = t.tensors[&key].to_vec2::<f64>().unwrap();
        assert!(!want.is_empty(), "{key}: no lines to test");
        // The same segments in the same order (topk's, highest centre first), to the bit.
        let want: Vec<[f64; 4]> = want.iter().map(|r| [r[0], r[1], r[2], r[3]]).collect();
        assert_eq!(got, want, "{key}");
        checked += 1;
    }
    assert_eq!(checked, 9);
}

#[test]
fn cv2_line_draws_opencv_s_pixels() {
    let t = Refs::load("mlsd/mlsd");
    for k in 0..3 {
        let segs = t.tensors[&format!("segments.{k}")]
            .to_vec2::<i64>()
            .unwrap();
        let canvas = &t.tensors[&format!("canvas.{k}")];
        let (n, h, w) = canvas.dims3().unwrap();
        assert_eq!(n, segs.len());
        let want = canvas.flatten_all().unwrap().to_vec1::<u8>().unwrap();
        let mut drawn = 0;
        for (i, s) in segs.iter().enumerate() {
            let mut got = vec![0u8; w * h];
            draw_line(&mut got, w, h, (s[0], s[1]), (s[2], s[3]), 255);
            let want = &want[i * w * h..][..w * h];
            assert!(got == want, "canvas {k} ({w}x{h}): segment {s:?} differs");
            drawn += usize::from(want.contains(&255));
        }
        // Many cross the canvas, some miss it.
        println!("canvas {k}: {drawn} of {n} segments drawn");
        assert!(drawn >= 10 && drawn < n, "{k}: {drawn}");
    }
}

#[test]
fn mlsd_makes_the_extension_s_maps() {
    let (nets, net) = net();
    let t = Refs::load("mlsd/mlsd");
    assert_eq!(t.cases.len(), 21);
    for c in &t.cases {
        let name = c["image"].as_str().unwrap();
        let res = c["resolution"].as_u64().unwrap() as u32;
        let (v, d) = thresholds(c);
        let key = c["key"].as_str().unwrap();
        let photo = t.image(&format!("image.{name}"));
        let want = t.image(&format!("mlsd.{key}"));
        // On the reference's padded image (the cubic enlarging resize is matched within a
        // level elsewhere): the segments, then the map.
        let mut ours = resize_image_with_pad(&photo, res);
        ours.image = t.image(&format!("padded.{name}.{res}"));
        let lines = mlsd_lines(&net, &ours.image, v, d).unwrap();
        let want_lines = t.tensors[&format!("lines.{key}")].to_vec2::<f64>().unwrap();
        assert_eq!(lines.len(), want_lines.len(), "{key}: segments");
        let worst = lines
            .iter()
            .zip(&want_lines)
            .flat_map(|(g, w)| g.iter().zip(w).map(|(a, b)| (a - b).abs()))
            .fold(0f64, f64::max);
        assert!(worst < 1e-3, "{key}: segment ends differ by {worst}");
        let (pw, ph) = (ours.image.width as usize, ours.image.height as usize);
        let map = ours.crop_gray_to_rgb(&draw_segments(&lines, pw, ph));
        let (differing, _) = super::compare(&map, &want, key);
        println!(
            "{key}: {} segments, ends within {worst:e}, {differing} values differ",
            lines.len()
        );
        assert_eq!(differing, 0, "{key}");
        assert!(want.pixels.contains(&255), "{key}: an empty map");
        // Whole, from the photo, where the area resize runs: the same map.
        if res <= photo.width.min(photo.height) {
            let p = Preprocessor::Mlsd {
                value_threshold: v,
                distance_threshold: d,
                resolution: res,
            };
            assert!(
                p.run_with(&photo, &nets).unwrap() == want,
                "{key}: whole run"
            );
        }
    }
}
