//! depth_leres against the extension's own `annotator/leres` (RelDepthModel("resnext101"),
//! estimateleres, apply_leres) and legacy `leres` (`tools/make_leres_fixtures.py`): reduced
//! widths (stem 16, planes 8 / 16 / 24 / 32 in 4 groups, blocks 2 / 1 / 2 / 1, decoder 12 and
//! 16 wide), seeded random weights in the real file's layout (`depth_model` with `module.`,
//! beside another network's dict). The depth agrees to float noise; the u8 maps are compared
//! value by value.

use sdserve_pipeline::controlnet::preprocess::{
    depth_leres_map, leres_depth, leres_module, network, resize_image_with_pad, LeresNetwork,
    LoadedNetworks, LERES,
};

use super::common::fixture_path;
use super::Refs;

fn net() -> std::sync::Arc<LeresNetwork> {
    let path = fixture_path("leres/res101.pth");
    let nets = LoadedNetworks::default().read(&LERES, &path).unwrap();
    network::<LeresNetwork>(&nets, &LERES).unwrap()
}

#[test]
fn leres_depth_agrees_to_float_noise() {
    let net = net();
    let t = Refs::load("leres/leres");
    let stride = t.json["stride"].as_u64().unwrap() as usize;
    let mut worst = 0f32;
    for c in &t.cases {
        let name = c["image"].as_str().unwrap();
        let res = c["resolution"].as_u64().unwrap();
        let padded = t.image(&format!("padded.{name}.{res}"));
        let (w, h) = (padded.width as usize, padded.height as usize);
        let depth = leres_depth(&net, &padded).unwrap();
        assert_eq!(depth.len(), w * h);
        let want = t.floats(c["depth"].as_str().unwrap());
        let range = want.iter().fold(0f32, |m, &v| m.max(v.abs()));
        let diff = super::largest_difference_at_stride(&depth, &want, (1, h, w), stride);
        println!(
            "{name} {res} ({w}x{h}): depth up to {range:e} in size, largest difference {diff:e}"
        );
        worst = worst.max(diff / range);
    }
    println!("leres: largest difference {worst:e} of the largest depth");
    assert!(worst < 1e-4, "depth differs by {worst} of its range");
}

#[test]
fn depth_leres_makes_the_extension_s_maps() {
    let net = net();
    let t = Refs::load("leres/leres");
    assert_eq!(t.cases.len(), 2);
    let (mut total, mut values) = (0, 0);
    for c in &t.cases {
        let name = c["image"].as_str().unwrap();
        let res = c["resolution"].as_u64().unwrap() as u32;
        let photo = t.image(&format!("image.{name}"));
        // On the reference's padded image (the cubic enlarging resize is matched within a
        // level elsewhere, so this isolates the network and its steps).
        let mut ours = resize_image_with_pad(&photo, res);
        ours.image = t.image(&format!("padded.{name}.{res}"));
        let depth = leres_depth(&net, &ours.image).unwrap();
        let mut seen = Vec::new();
        for m in c["maps"].as_array().unwrap() {
            let near = m["remove_near"].as_f64().unwrap();
            let bg = m["remove_background"].as_f64().unwrap();
            let want = t.image(m["map"].as_str().unwrap());
            let label = format!("depth_leres {name} {res} near {near} bg {bg}");
            let got = ours.crop_gray_to_rgb(&depth_leres_map(&depth, near, bg));
            total += super::check_one_level(&got, &want, &label);
            values += want.pixels.len();
            assert!(
                leres_module(&net, &ours, near, bg).unwrap() == got,
                "{label}: the module's map"
            );
            seen.push(want);
        }
        // Each setting makes its own map: the sliders are tested.
        assert!(seen[0] != seen[1] && seen[0] != seen[2] && seen[1] != seen[2]);
    }
    println!("leres: maps {total} of {values} values differ in all");
}

/// The fixture's weights as a safetensors file of the same (`depth_model.`) keys: the same
/// network.
#[test]
fn a_safetensors_file_of_the_same_keys_is_the_same_network() {
    let pth = fixture_path("leres/res101.pth");
    let dir = std::env::temp_dir().join(format!("leres-st-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let st = dir.join("res101.safetensors");
    // candle's own pickle reader, so the file is converted without our loader.
    let tensors: std::collections::HashMap<String, candle_core::Tensor> =
        candle_core::pickle::read_all_with_key(&pth, Some("depth_model"))
            .unwrap()
            .into_iter()
            .map(|(k, v)| (k.trim_start_matches("module.").to_string(), v))
            .collect();
    assert!(tensors.len() > 100, "{} tensors", tensors.len());
    candle_core::safetensors::save(&tensors, &st).unwrap();
    let a = LeresNetwork::load(&pth, &candle_core::Device::Cpu).unwrap();
    let b = LeresNetwork::load(&st, &candle_core::Device::Cpu).unwrap();
    let t = Refs::load("leres/leres");
    let padded = t.image("padded.square.64");
    assert_eq!(
        leres_depth(&a, &padded).unwrap(),
        leres_depth(&b, &padded).unwrap()
    );
    std::fs::remove_dir_all(&dir).ok();
}
