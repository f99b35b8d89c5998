//! The extension's other model-free preprocessors (invert, threshold, lineart_standard,
//! scribble_xdog, blur_gaussian, tile_resample, color, shuffle) against its own functions on OpenCV 4.10
//! (`tools/make_preprocess_module_fixtures.py`). Each module twice: on the reference's own
//! padded image (the operation alone: exact for the integer ones, within a stated bound for
//! the float blurs), and whole from the photo (exact where the area resize runs; where the
//! image is enlarged, IPP's cubic resize is matched within a level, so within a bound).
//! The model-based modules in `controlnet_preprocess_modules/`: `hed.rs`, `lineart.rs`,
//! `manga_line.rs`, `openpose.rs`, `pidinet.rs`, `teed.rs`, `anyline.rs`, `mlsd.rs`, `depth_anything.rs`, `midas.rs`, `normalbae.rs`,
//! `leres.rs`, `lama.rs`.

#[path = "controlnet_preprocess_modules/anyline.rs"]
mod anyline;
use crate::common;
#[path = "controlnet_preprocess_modules/depth_anything.rs"]
mod depth_anything;
#[path = "controlnet_preprocess_modules/hed.rs"]
mod hed;
#[path = "controlnet_preprocess_modules/lama.rs"]
mod lama;
#[path = "controlnet_preprocess_modules/leres.rs"]
mod leres;
#[path = "controlnet_preprocess_modules/lineart.rs"]
mod lineart;
#[path = "controlnet_preprocess_modules/manga_line.rs"]
mod manga_line;
#[path = "controlnet_preprocess_modules/midas.rs"]
mod midas;
#[path = "controlnet_preprocess_modules/mlsd.rs"]
mod mlsd;
#[path = "controlnet_preprocess_modules/normalbae.rs"]
mod normalbae;
#[path = "controlnet_preprocess_modules/openpose.rs"]
mod openpose;
#[path = "controlnet_preprocess_modules/openpose_hand.rs"]
mod openpose_hand;
#[path = "controlnet_preprocess_modules/pidinet.rs"]
mod pidinet;
#[path = "controlnet_preprocess_modules/teed.rs"]
mod teed;

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use common::fixture_path;
use sdserve_pipeline::controlnet::preprocess::{
    blur_gaussian, lineart_standard, scribble_xdog, threshold, Padded, Preprocessor,
};
use sdserve_pipeline::pipeline::RgbImage;

struct Refs {
    tensors: HashMap<String, Tensor>,
    cases: Vec<serde_json::Value>,
    json: serde_json::Value,
}

fn refs() -> Refs {
    Refs::load("preprocess-modules")
}

impl Refs {
    /// A fixture's tensors and cases: `<name>.safetensors` and `<name>.json`, as a
    /// `tools/make_*_fixtures.py` script writes them (`hed/hed` for tools/make_hed_fixtures.py).
    fn load(name: &str) -> Refs {
        let tensors = candle_core::safetensors::load(
            fixture_path(&format!("{name}.safetensors")),
            &Device::Cpu,
        )
        .expect("the fixture script's output");
        let json: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(fixture_path(&format!("{name}.json"))).unwrap(),
        )
        .unwrap();
        let cases = json["cases"].as_array().unwrap().clone();
        Refs {
            tensors,
            cases,
            json,
        }
    }

    /// An 8-bit HxWx3 tensor, or an HxW map (a module's three equal channels), as an image.
    fn image(&self, key: &str) -> RgbImage {
        let t = &self.tensors[key];
        let pixels = t.flatten_all().unwrap().to_vec1::<u8>().unwrap();
        let (h, w, pixels) = match *t.dims() {
            [h, w, 3] => (h, w, pixels),
            [h, w] => (h, w, pixels.iter().flat_map(|&v| [v, v, v]).collect()),
            ref d => panic!("{key}: {d:?}"),
        };
        RgbImage {
            width: w as u32,
            height: h as u32,
            pixels,
        }
    }

    fn floats(&self, key: &str) -> Vec<f32> {
        self.tensors[key]
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    }

    /// The reference's padded image and the size the pad is cropped to.
    fn padded(&self, name: &str, res: u32, map: &RgbImage) -> Padded {
        Padded {
            image: self.image(&format!("padded.{name}.{res}")),
            width: map.width as usize,
            height: map.height as usize,
        }
    }

    fn of(&self, module: &str) -> Vec<Case> {
        let cases: Vec<Case> = self
            .cases
            .iter()
            .filter(|c| c["module"] == module)
            .map(|c| {
                let name = c["image"].as_str().unwrap().to_string();
                Case {
                    image: self.image(&format!("image.{name}")),
                    want: self.image(c["key"].as_str().unwrap()),
                    resolution: c["resolution"].as_u64().unwrap() as u32,
                    setting: c["setting"].as_f64(),
                    name,
                }
            })
            .collect();
        assert!(cases.len() >= 4, "{module}: {} cases", cases.len());
        cases
    }
}

struct Case {
    name: String,
    image: RgbImage,
    want: RgbImage,
    resolution: u32,
    setting: Option<f64>,
}

impl Case {
    fn enlarged(&self) -> bool {
        self.resolution > self.image.width.min(self.image.height)
    }

    fn label(&self) -> String {
        format!(
            "{} res {} setting {:?}",
            self.name, self.resolution, self.setting
        )
    }
}

/// Values (not pixels) that differ, and the largest difference.
fn compare(got: &RgbImage, want: &RgbImage, label: &str) -> (usize, u8) {
    assert_eq!(
        (got.width, got.height),
        (want.width, want.height),
        "{label}"
    );
    let diffs: Vec<u8> = got
        .pixels
        .iter()
        .zip(&want.pixels)
        .map(|(a, b)| a.abs_diff(*b))
        .filter(|&d| d > 0)
        .collect();
    (diffs.len(), diffs.into_iter().max().unwrap_or(0))
}

/// The largest difference of `got` (`planes` planes of `h` x `w`, one after another) from
/// `want`, the reference's values at every `stride`-th row and column of each plane (the
/// network tests' fixtures keep that sample of the full-size output).
fn largest_difference_at_stride(
    got: &[f32],
    want: &[f32],
    (planes, h, w): (usize, usize, usize),
    stride: usize,
) -> f32 {
    assert_eq!(got.len(), planes * h * w);
    let sub: Vec<f32> = (0..planes)
        .flat_map(|c| {
            (0..h)
                .step_by(stride)
                .flat_map(move |y| (0..w).step_by(stride).map(move |x| (c, y, x)))
        })
        .map(|(c, y, x)| got[(c * h + y) * w + x])
        .collect();
    assert_eq!(sub.len(), want.len());
    sub.iter()
        .zip(want)
        .fold(0f32, |m, (g, w)| m.max((g - w).abs()))
}

/// A network's map against the extension's (midas, normalbae, leres): float noise can move a
/// value across a truncation step, one level, in at most 1 in 200 values (a pixel's three
/// channels count three times). Returns how many values differ.
fn check_one_level(got: &RgbImage, want: &RgbImage, label: &str) -> usize {
    let (differing, max) = compare(got, want, label);
    println!(
        "{label}: {differing} of {} values differ, by at most {max}",
        want.pixels.len()
    );
    assert!(max <= 1, "{label}: off by {max}");
    assert!(
        differing * 200 <= want.pixels.len(),
        "{label}: {differing} differ"
    );
    differing
}

/// A TEED-based map (softedge_teed, softedge_anyline) against the extension's: float noise in
/// the logits can move a value across a truncation step (one level; a safe_step's step is
/// 255 / steps levels), in at most 1 in 1000 values (a pixel's three channels count three
/// times). Returns how many values differ.
fn check_safe_step_map(got: &RgbImage, want: &RgbImage, steps: u32, label: &str) -> usize {
    let (differing, max) = compare(got, want, label);
    println!(
        "{label}: {differing} of {} values differ, by at most {max}",
        want.pixels.len()
    );
    let bound = 255u32.checked_div(steps).map_or(1, |s| s + 1);
    assert!(u32::from(max) <= bound, "{label}: off by {max}");
    assert!(
        differing * 1000 <= want.pixels.len(),
        "{label}: {differing} differ"
    );
    differing
}

fn whites(m: &RgbImage) -> usize {
    m.pixels.iter().filter(|&&v| v == 255).count()
}

#[test]
fn invert_is_exact() {
    let refs = refs();
    for c in refs.of("invert") {
        let got = Preprocessor::Invert.run(&c.image).unwrap();
        assert_eq!(compare(&got, &c.want, &c.label()), (0, 0), "{}", c.label());
    }
}

#[test]
fn threshold_is_exact_on_the_padded_image_and_whole_where_the_area_resize_runs() {
    let refs = refs();
    let mut seen = 0;
    for c in refs.of("threshold") {
        let t = c.setting.unwrap().trunc() as u32;
        let op = threshold(&refs.padded(&c.name, c.resolution, &c.want), t);
        assert_eq!(compare(&op, &c.want, &c.label()), (0, 0), "{}", c.label());
        let whole = Preprocessor::Threshold {
            threshold: c.setting.unwrap(),
            resolution: c.resolution,
        }
        .run(&c.image)
        .unwrap();
        let (n, _) = compare(&whole, &c.want, &c.label());
        if c.enlarged() {
            // A cubic value one level off flips a pixel only when it sits on the threshold.
            assert!(n * 200 <= c.want.pixels.len(), "{}: {n}", c.label());
        } else {
            assert_eq!(n, 0, "{}", c.label());
        }
        seen += whites(&c.want);
    }
    assert!(seen > 1000, "{seen}");
}

#[test]
fn blur_gaussian_is_opencv_s_fixed_point_blur_bit_for_bit() {
    let refs = refs();
    for c in refs.of("blur_gaussian") {
        let sigma = c.setting.unwrap();
        let op = blur_gaussian(&refs.padded(&c.name, c.resolution, &c.want), sigma);
        assert_eq!(compare(&op, &c.want, &c.label()), (0, 0), "{}", c.label());
        let whole = Preprocessor::BlurGaussian {
            sigma,
            resolution: c.resolution,
        }
        .run(&c.image)
        .unwrap();
        let (n, worst) = compare(&whole, &c.want, &c.label());
        if c.enlarged() {
            assert!(worst <= 1, "{}: {worst}", c.label());
        } else {
            assert_eq!(n, 0, "{}", c.label());
        }
    }
}

/// A map's values that differ, and the share allowed (the whole module where the cubic
/// resize runs: its values one level off can cross a threshold).
fn binary_within(got: &RgbImage, want: &RgbImage, per_mille: usize, label: &str) {
    let (n, _) = compare(got, want, label);
    assert!(
        n * 1000 <= want.pixels.len() * per_mille,
        "{label}: {n} of {} values differ",
        want.pixels.len()
    );
}

// The float blurs: OpenCV's SIMD sums in an order of its own in places, so the code states
// a bound (a value within float rounding of a truncation or threshold can fall on the other
// side); on every case here they agree exactly, which the tests hold.

#[test]
fn scribble_xdog_is_the_extension_s() {
    let refs = refs();
    let mut seen = 0;
    for c in refs.of("scribble_xdog") {
        let t = c.setting.unwrap().trunc() as u32;
        let op = scribble_xdog(&refs.padded(&c.name, c.resolution, &c.want), t);
        assert_eq!(compare(&op, &c.want, &c.label()), (0, 0), "{}", c.label());
        let whole = Preprocessor::ScribbleXdog {
            threshold: c.setting.unwrap(),
            resolution: c.resolution,
        }
        .run(&c.image)
        .unwrap();
        if c.enlarged() {
            binary_within(&whole, &c.want, 10, &c.label());
        } else {
            assert_eq!(whole, c.want, "{}", c.label());
        }
        seen += whites(&c.want);
    }
    assert!(seen > 1000, "{seen}");
}

#[test]
fn lineart_standard_is_the_extension_s() {
    let refs = refs();
    let mut lines = 0;
    for c in refs.of("lineart_standard") {
        let op = lineart_standard(&refs.padded(&c.name, c.resolution, &c.want));
        assert_eq!(compare(&op, &c.want, &c.label()), (0, 0), "{}", c.label());
        let whole = Preprocessor::LineartStandard {
            resolution: c.resolution,
        }
        .run(&c.image)
        .unwrap();
        let (n, worst) = compare(&whole, &c.want, &c.label());
        if c.enlarged() {
            // The median divides every value: a cubic level moves it a little.
            assert!(
                worst <= 4 && n * 20 <= c.want.pixels.len(),
                "{}: {n}, {worst}",
                c.label()
            );
        } else {
            assert_eq!((n, worst), (0, 0), "{}", c.label());
        }
        lines += c.want.pixels.iter().filter(|&&v| v > 100).count();
    }
    assert!(lines > 300, "{lines}");
}

#[test]
fn tile_resample_is_exact() {
    let refs = refs();
    for c in refs.of("tile_resample") {
        let got = Preprocessor::TileResample {
            down_sampling_rate: c.setting.unwrap(),
        }
        .run(&c.image)
        .unwrap();
        assert_eq!(compare(&got, &c.want, &c.label()), (0, 0), "{}", c.label());
    }
}

#[test]
fn color_is_the_extension_s_grid() {
    let refs = refs();
    let mut enlarged = 0;
    for c in refs.of("color") {
        let got = Preprocessor::Color {
            resolution: c.resolution,
        }
        .run(&c.image)
        .unwrap();
        // INTER_AREA, INTER_NEAREST and (on every case here) the cubic shrink: exact.
        assert_eq!(compare(&got, &c.want, &c.label()), (0, 0), "{}", c.label());
        if c.enlarged() {
            // The enlarging INTER_AREA (a bilinear resize) alone, before the grid.
            let scaled = refs.image(&format!("color_scaled.{}.{}", c.name, c.resolution));
            let got = sdserve_pipeline::controlnet::preprocess::resize_shortest_edge(
                &c.image,
                c.resolution,
            );
            assert_eq!(compare(&got, &scaled, &c.label()), (0, 0), "{}", c.label());
            enlarged += 1;
        }
        let cells = (c.want.width / 64) * (c.want.height / 64);
        assert!(cells >= 1, "{}", c.label());
    }
    assert!(enlarged >= 4, "{enlarged}");
}

#[test]
fn numpy_s_legacy_generator_draws_numpy_s_uniforms() {
    let refs = refs();
    let cases = refs.json["numpy_uniforms"].as_array().unwrap();
    assert!(cases.len() >= 3);
    for c in cases {
        let seed = c["seed"].as_u64().unwrap() as u32;
        let mut rng = sdserve_pipeline::rng::NumpyRandomState::new(seed);
        for want in c["draws"].as_array().unwrap() {
            assert_eq!(rng.random_sample(), want.as_f64().unwrap(), "seed {seed}");
        }
    }
}

#[test]
fn shuffle_is_the_extension_s_with_its_numpy_seed() {
    let refs = refs();
    for case in refs.cases.iter().filter(|c| c["module"] == "shuffle") {
        let seed = case["numpy_seed"].as_u64().unwrap() as u32;
        let name = case["image"].as_str().unwrap();
        let image = refs.image(&format!("image.{name}"));
        let want = refs.image(case["key"].as_str().unwrap());
        let resolution = case["resolution"].as_u64().unwrap() as u32;
        let got = Preprocessor::Shuffle { resolution, seed }
            .run(&image)
            .unwrap();
        let label = format!("{name} res {resolution} seed {seed}");
        assert_eq!(compare(&got, &want, &label), (0, 0), "{label}");
        // Another seed, another map.
        let other = Preprocessor::Shuffle {
            resolution,
            seed: seed ^ 1,
        }
        .run(&image)
        .unwrap();
        assert!(
            compare(&other, &want, &label).0 * 2 > want.pixels.len(),
            "{label}"
        );
    }
}
