//! depth_anything_v2 against the original `depth_anything_v2` package's `DepthAnythingV2`, the
//! extension's `DepthAnythingV2Detector.__call__` and legacy `depth_anything_v2`
//! (`tools/make_depth_anything_v2_fixtures.py`: vitl's 24 blocks and its layers 4, 11, 17, 23),
//! and depth_anything (v1) against the `depth_anything` package's `DPT_DINOv2` on
//! facebookresearch/dinov2's `dinov2_vitl14`, `DepthAnythingDetector.__call__` and legacy
//! `depth_anything` (`tools/make_depth_anything_fixtures.py`: the same 24 blocks, the last four
//! taken); both at reduced widths (embed 16, 2 heads, features 8), seeded random weights in the
//! real file's key layout and format. The depth agrees to float noise; the u8 maps are compared
//! value by value.

use std::sync::Arc;

use candle_core::Device;
use sdserve_pipeline::controlnet::preprocess::{
    depth_anything_depth, depth_anything_input_size, depth_anything_map, network,
    resize_image_with_pad, AnnotatorFile, DepthAnythingNetwork, DepthAnythingVersion,
    LoadedNetworks, Preprocessor, DEPTH_ANYTHING, DEPTH_ANYTHING_V2,
};

use super::common::fixture_path;
use super::Refs;

/// The fixtures' files as the real ones are named, read with their 2 heads (the real file's
/// 64-wide heads would make one of its 16 channels).
static FIXTURE_V1: AnnotatorFile = AnnotatorFile {
    load: |path| {
        Ok(Arc::new(DepthAnythingNetwork::load_with_heads(
            path,
            &Device::Cpu,
            DepthAnythingVersion::V1,
            Some(2),
        )?))
    },
    ..DEPTH_ANYTHING
};
static FIXTURE_V2: AnnotatorFile = AnnotatorFile {
    load: |path| {
        Ok(Arc::new(DepthAnythingNetwork::load_with_heads(
            path,
            &Device::Cpu,
            DepthAnythingVersion::V2,
            Some(2),
        )?))
    },
    ..DEPTH_ANYTHING_V2
};

/// One version's fixtures.
struct Version {
    /// The weights, the references (under tests/fixtures).
    weights: &'static str,
    refs: &'static str,
    fixture: &'static AnnotatorFile,
    file: &'static AnnotatorFile,
    module: fn(u32) -> Preprocessor,
}

const V1: Version = Version {
    weights: "depth_anything/depth_anything_vitl14.pth",
    refs: "depth_anything/depth_anything",
    fixture: &FIXTURE_V1,
    file: &DEPTH_ANYTHING,
    module: |resolution| Preprocessor::DepthAnything { resolution },
};
const V2: Version = Version {
    weights: "depth_anything_v2/depth_anything_v2_vitl.safetensors",
    refs: "depth_anything_v2/depth_anything_v2",
    fixture: &FIXTURE_V2,
    file: &DEPTH_ANYTHING_V2,
    module: |resolution| Preprocessor::DepthAnythingV2 { resolution },
};

/// The fixture network, as a keeper hands it out.
fn net(v: &Version) -> (LoadedNetworks, Arc<DepthAnythingNetwork>) {
    let path = fixture_path(v.weights);
    let nets = LoadedNetworks::default().read(v.fixture, &path).unwrap();
    let net = network::<DepthAnythingNetwork>(&nets, v.file).unwrap();
    (nets, net)
}

#[test]
fn the_input_size_is_the_transform_s() {
    // Lower bound 518, multiples of 14, numpy's round to even (777 / 14 = 55.5 -> 56).
    assert_eq!(depth_anything_input_size(64, 64), (518, 518));
    assert_eq!(depth_anything_input_size(128, 64), (1036, 518));
    assert_eq!(depth_anything_input_size(128, 192), (518, 784));
    // 518 * 1.5 = 777 again, 64 * 518 / 384 = 86.3 -> raised to 518.
    assert_eq!(depth_anything_input_size(384, 576), (518, 784));
}

#[test]
fn depth_anything_v2_depth_agrees_to_float_noise() {
    depth_agrees_to_float_noise(&V2);
}

#[test]
fn depth_anything_v1_depth_agrees_to_float_noise() {
    depth_agrees_to_float_noise(&V1);
}

#[test]
fn depth_anything_v2_makes_the_extension_s_maps() {
    makes_the_extension_s_maps(&V2);
}

#[test]
fn depth_anything_v1_makes_the_extension_s_maps() {
    makes_the_extension_s_maps(&V1);
}

fn depth_agrees_to_float_noise(v: &Version) {
    let (_, net) = net(v);
    let t = Refs::load(v.refs);
    let stride = t.json["stride"].as_u64().unwrap() as usize;
    let mut worst = 0f32;
    for c in &t.cases {
        let name = c["image"].as_str().unwrap();
        let res = c["resolution"].as_u64().unwrap();
        let padded = t.image(&format!("padded.{name}.{res}"));
        let (w, h, depth) = depth_anything_depth(&net, &padded).unwrap();
        assert_eq!(
            (w as u64, h as u64),
            (
                c["net_width"].as_u64().unwrap(),
                c["net_height"].as_u64().unwrap()
            ),
            "{name} {res}"
        );
        let want = t.floats(c["depth"].as_str().unwrap());
        let top = want.iter().fold(0f32, |m, &v| m.max(v));
        let zeros = want.iter().filter(|&&v| v == 0.0).count();
        // Some depth clipped by the ReLU, most not: the fixture tests both sides.
        assert!(
            zeros > 0 && zeros * 4 < want.len(),
            "{name} {res}: {zeros} zeros"
        );
        let diff = super::largest_difference_at_stride(&depth, &want, (1, h, w), stride);
        println!("{name} {res}: depth up to {top:e}, largest difference {diff:e}");
        worst = worst.max(diff / top);
    }
    println!(
        "{}: largest difference {worst:e} of the largest depth",
        v.file.name
    );
    assert!(worst < 1e-4, "depth differs by {worst} of its range");
}

fn makes_the_extension_s_maps(v: &Version) {
    let (nets, net) = net(v);
    let t = Refs::load(v.refs);
    assert_eq!(t.cases.len(), 6);
    let (mut total, mut values) = (0, 0);
    for c in &t.cases {
        let name = c["image"].as_str().unwrap();
        let res = c["resolution"].as_u64().unwrap() as u32;
        let photo = t.image(&format!("image.{name}"));
        let want = t.image(c["map"].as_str().unwrap());
        let label = format!("{} {name} {res}", (v.module)(res).module());
        // On the reference's padded image (the cubic enlarging resize is matched within a
        // level elsewhere, so this isolates the network and its steps).
        let mut ours = resize_image_with_pad(&photo, res);
        ours.image = t.image(&format!("padded.{name}.{res}"));
        let map = depth_anything_map(&net, &ours.image).unwrap();
        let from_padded = ours.crop_gray_to_rgb(&map);
        let (differing, max) = super::compare(&from_padded, &want, &label);
        println!(
            "{label}: {differing} of {} values differ, by at most {max}",
            want.pixels.len()
        );
        // Float noise can move a value across a truncation step: one level, in at most 1 in
        // 200 values (a pixel's three channels count three times).
        assert!(max <= 1, "{label}: off by {max}");
        assert!(
            differing * 200 <= want.pixels.len(),
            "{label}: {differing} differ"
        );
        total += differing;
        values += want.pixels.len();
        // Whole, from the photo, where the area resize runs: the same map.
        if res <= photo.width.min(photo.height) {
            let got = (v.module)(res).run_with(&photo, &nets).unwrap();
            assert!(got == from_padded, "{label}: whole run differs");
        }
    }
    println!(
        "{}: maps {total} of {values} values differ in all",
        v.file.name
    );
}

/// One 512 map at the real widths (vitl, features 256: `make_depth_anything_v2_fixtures.py
/// --full-width PATH`, random weights), timed on the CPU; run with
/// `DEPTH_ANYTHING_V2_FULL=PATH cargo test ... -- --ignored`.
#[test]
#[ignore]
fn depth_anything_v2_at_real_widths() {
    at_real_widths(&V2, "DEPTH_ANYTHING_V2_FULL");
}

/// The same for v1 (`make_depth_anything_fixtures.py --full-width PATH`, a `.pth`):
/// `DEPTH_ANYTHING_FULL=PATH`.
#[test]
#[ignore]
fn depth_anything_v1_at_real_widths() {
    at_real_widths(&V1, "DEPTH_ANYTHING_FULL");
}

fn at_real_widths(v: &Version, var: &str) {
    let path = std::env::var(var).expect(var);
    let t0 = std::time::Instant::now();
    let nets = LoadedNetworks::default()
        .read(v.file, std::path::Path::new(&path))
        .unwrap();
    let loaded = t0.elapsed();
    let t = Refs::load(v.refs);
    let photo = t.image("image.wide");
    let t0 = std::time::Instant::now();
    let map = (v.module)(512).run_with(&photo, &nets).unwrap();
    println!(
        "{}: read in {loaded:.1?}; a {}x{} map in {:.1?}",
        v.file.name,
        map.width,
        map.height,
        t0.elapsed()
    );
    assert_eq!(map.height, 512);
}
