//! depth_midas and normal_midas against the extension's own `annotator/midas` (DPT-Hybrid on
//! timm 1.0.31's R50+ViT-B/16) and legacy `midas` / `midas_normal`
//! (`tools/make_midas_fixtures.py`): reduced widths (ResNet stem 32, three stages of one
//! bottleneck 128 wide, ViT 16 wide with 2 heads and 12 blocks, features 8), seeded random
//! weights in the real file's key layout and format. The depth agrees to float noise; the u8
//! maps are compared value by value.

use std::sync::Arc;

use candle_core::Device;
use sdserve_pipeline::controlnet::preprocess::{
    depth_midas_map, midas_depth, midas_module, network, normal_midas_map, resize_image_with_pad,
    AnnotatorFile, LoadedNetworks, MidasNetwork, Padded, MIDAS,
};
use sdserve_pipeline::pipeline::RgbImage;

use super::common::fixture_path;
use super::Refs;

/// The fixture's file as the real one is named, read with its 2 heads (the real file's
/// 64-wide heads would make one of its 16 channels).
static FIXTURE: AnnotatorFile = AnnotatorFile {
    load: |path| {
        Ok(Arc::new(MidasNetwork::load_with_heads(
            path,
            &Device::Cpu,
            Some(2),
        )?))
    },
    ..MIDAS
};

fn net() -> (LoadedNetworks, Arc<MidasNetwork>) {
    let path = fixture_path("midas/dpt_hybrid-midas-501f0c75.pt");
    let nets = LoadedNetworks::default().read(&FIXTURE, &path).unwrap();
    let net = network::<MidasNetwork>(&nets, &MIDAS).unwrap();
    (nets, net)
}

#[test]
fn midas_depth_agrees_to_float_noise() {
    let (_, net) = net();
    let t = Refs::load("midas/midas");
    let stride = t.json["stride"].as_u64().unwrap() as usize;
    let mut worst = 0f32;
    for c in &t.cases {
        let name = c["image"].as_str().unwrap();
        let res = c["resolution"].as_u64().unwrap();
        let padded = t.image(&format!("padded.{name}.{res}"));
        let (w, h) = (padded.width as usize, padded.height as usize);
        let depth = midas_depth(&net, &padded).unwrap();
        assert_eq!(depth.len(), w * h);
        let want = t.floats(c["depth"].as_str().unwrap());
        let top = want.iter().fold(0f32, |m, &v| m.max(v));
        let zeros = want.iter().filter(|&&v| v == 0.0).count();
        let diff = super::largest_difference_at_stride(&depth, &want, (1, h, w), stride);
        println!("{name} {res}: depth up to {top:e} ({zeros} zero), largest difference {diff:e}");
        worst = worst.max(diff / top);
    }
    println!("midas: largest difference {worst:e} of the largest depth");
    assert!(worst < 1e-4, "depth differs by {worst} of its range");
}

#[test]
fn depth_midas_and_normal_midas_make_the_extension_s_maps() {
    let (_, net) = net();
    let t = Refs::load("midas/midas");
    assert_eq!(t.cases.len(), 6);
    let (mut total, mut values, mut whole) = (0, 0, 0);
    for c in &t.cases {
        let name = c["image"].as_str().unwrap();
        let res = c["resolution"].as_u64().unwrap() as u32;
        let photo = t.image(&format!("image.{name}"));
        // On the reference's padded image (the cubic enlarging resize is matched within a
        // level elsewhere, so this isolates the network and its steps).
        let mut ours = resize_image_with_pad(&photo, res);
        ours.image = t.image(&format!("padded.{name}.{res}"));
        let (w, h) = (ours.image.width as usize, ours.image.height as usize);
        let depth = midas_depth(&net, &ours.image).unwrap();
        let want = t.image(c["depth_map"].as_str().unwrap());
        let label = format!("depth_midas {name} {res}");
        let got = ours.crop_gray_to_rgb(&depth_midas_map(&depth));
        total += super::check_one_level(&got, &want, &label);
        values += want.pixels.len();
        // Whole, from the photo, where the area resize runs: the same map.
        let area = res <= photo.width.min(photo.height);
        if area {
            let run = midas_module(&net, &resize_image_with_pad(&photo, res), None).unwrap();
            assert!(run == got, "{label}: whole run differs");
            whole += 1;
        }
        let mut seen = Vec::new();
        for (bg, key) in c["normal_maps"].as_object().unwrap() {
            let bg: f64 = bg.parse().unwrap();
            let want = t.image(key.as_str().unwrap());
            let label = format!("normal_midas {name} {res} bg {bg}");
            let normal = Padded {
                image: RgbImage {
                    width: w as u32,
                    height: h as u32,
                    pixels: normal_midas_map(&depth, w, h, bg),
                },
                ..ours.clone()
            };
            let got = normal.crop_rgb();
            total += super::check_one_level(&got, &want, &label);
            values += want.pixels.len();
            if area {
                let padded = resize_image_with_pad(&photo, res);
                assert!(
                    midas_module(&net, &padded, Some(bg)).unwrap() == got,
                    "{label}"
                );
            }
            seen.push(want);
        }
        // The two thresholds make different maps: the threshold is tested.
        assert!(seen[0] != seen[1], "{name} {res}: thresholds alike");
    }
    assert!(whole >= 2, "{whole} whole runs");
    println!("midas: maps {total} of {values} values differ in all");
}

/// One 512 map at the real widths (`make_midas_fixtures.py --full-width PATH`, random
/// weights), timed on the CPU; run with `MIDAS_FULL=PATH cargo test ... -- --ignored`. With
/// `MIDAS_FULL_REF=DIR` also held to the extension's run of the same file on `image.wide` at
/// 512, as the fixtures are (raw arrays: `padded_512.bin`, its padded image; `depth_512.f32`,
/// the model's depth on it in float64 rounded to f32; `depth_512.bin` and `normal_512.bin`,
/// its legacy `midas` and `midas_normal` maps at bg_th 0.4).
#[test]
#[ignore]
fn midas_at_real_widths() {
    let path = std::env::var("MIDAS_FULL").expect("MIDAS_FULL");
    let t0 = std::time::Instant::now();
    let nets = LoadedNetworks::default()
        .read(&MIDAS, std::path::Path::new(&path))
        .unwrap();
    let loaded = t0.elapsed();
    let t = Refs::load("midas/midas");
    let photo = t.image("image.wide");
    let t0 = std::time::Instant::now();
    let net = network::<MidasNetwork>(&nets, &MIDAS).unwrap();
    let mut padded = resize_image_with_pad(&photo, 512);
    let map = midas_module(&net, &padded, None).unwrap();
    println!(
        "{MIDAS_FILE}: read in {loaded:.1?}; a {}x{} map in {:.1?}",
        map.width,
        map.height,
        t0.elapsed(),
        MIDAS_FILE = MIDAS.name
    );
    assert_eq!(map.height, 512);
    let Ok(dir) = std::env::var("MIDAS_FULL_REF") else {
        return;
    };
    let dir = std::path::Path::new(&dir);
    let read = |name: &str| std::fs::read(dir.join(name)).unwrap();
    // The reference's padded image (its enlarging cubic resize is ours within a level).
    padded.image.pixels = read("padded_512.bin");
    let want: Vec<f32> = read("depth_512.f32")
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    let got = midas_depth(&net, &padded.image).unwrap();
    let (w, h) = (padded.image.width as usize, padded.image.height as usize);
    let top = want.iter().fold(0f32, |m, &v| m.max(v));
    let diff = super::largest_difference_at_stride(&got, &want, (1, h, w), 1);
    println!("midas 512: depth up to {top:e}, largest difference {diff:e}");
    assert!(diff < 1e-4 * top, "depth differs by {diff}");
    let image = |pixels: Vec<u8>| RgbImage {
        width: map.width,
        height: map.height,
        pixels,
    };
    let depth_map = read("depth_512.bin")
        .iter()
        .flat_map(|&v| [v, v, v])
        .collect();
    let got = midas_module(&net, &padded, None).unwrap();
    super::check_one_level(&got, &image(depth_map), "depth_midas 512");
    // The normal is the raw depth's Sobel slope against z = 2 pi: at these widths the depth
    // runs to thousands, and its float noise (torch's own f32 is 3e-5 of the range from its
    // float64) tilts a flat region's normal by up to two levels.
    let normal = midas_module(&net, &padded, Some(0.4)).unwrap();
    let label = "normal_midas 512 bg 0.4";
    let (differing, max) = super::compare(&normal, &image(read("normal_512.bin")), label);
    println!("{label}: {differing} values differ, by at most {max}");
    assert!(
        max <= 2 && differing * 200 <= normal.pixels.len(),
        "{label}"
    );
}
