//! A1111's `tiling`: whole images with circular padding against diffusers with every Conv2d of
//! the UNet and the VAE in `padding_mode="circular"` (`tools/make_tiling_fixtures.py`), and the
//! property users ask it for: the image wraps at its edges.

use crate::common;

use common::{fixture_path, generate_one, pixel_difference, read_png, request_params, Fixtures};

use std::collections::HashMap;

use candle_core::{DType, Device};
use sdserve_pipeline::pipeline::{GenerationParams, InitImage, RgbImage, StableDiffusion};

fn model(name: &str) -> StableDiffusion {
    StableDiffusion::load(&fixture_path(name), &Device::Cpu, DType::F32).expect("model loads")
}

fn case_params(case: &serde_json::Value) -> GenerationParams {
    let mut params = request_params(case);
    params.tiling = true;
    if let Some(init) = case["init_image"].as_str() {
        params.init_image = Some(InitImage {
            image: read_png(init),
            mask: None,
            strength: case["strength"].as_f64().unwrap(),
        });
    }
    params
}

/// How well the opposite edges of `image` continue each other, relative to neighbouring columns
/// and rows inside it: the correlation of the first and last column (and row) over the mean
/// correlation of neighbouring ones. About 1 when the image continues across its edges (a
/// seamless tile), far below when not. Correlation rather than differences: the tiny models'
/// images are fine-grained, and zero padding darkens both edges alike, which brings their
/// values (not their patterns) closer.
pub fn seam_continuity(image: &RgbImage) -> f64 {
    let (w, h) = (image.width as usize, image.height as usize);
    let column = |x: usize| -> Vec<f64> {
        (0..h)
            .flat_map(|y| (0..3).map(move |c| (y * w + x) * 3 + c))
            .map(|i| image.pixels[i] as f64)
            .collect()
    };
    let row = |y: usize| -> Vec<f64> {
        image.pixels[y * w * 3..(y + 1) * w * 3]
            .iter()
            .map(|&v| v as f64)
            .collect()
    };
    let corr = |a: &[f64], b: &[f64]| {
        let (ma, mb) = (mean(a), mean(b));
        let (mut ab, mut aa, mut bb) = (0.0, 0.0, 0.0);
        for (x, y) in a.iter().zip(b) {
            ab += (x - ma) * (y - mb);
            aa += (x - ma) * (x - ma);
            bb += (y - mb) * (y - mb);
        }
        ab / (aa * bb).sqrt()
    };
    let seams = (corr(&column(0), &column(w - 1)) + corr(&row(0), &row(h - 1))) / 2.0;
    let inside: Vec<f64> = (0..w - 1)
        .map(|x| corr(&column(x), &column(x + 1)))
        .chain((0..h - 1).map(|y| corr(&row(y), &row(y + 1))))
        .collect();
    seams / mean(&inside)
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

#[test]
fn tiling_images_match_diffusers_with_circular_convolutions() {
    let fixtures = Fixtures::load("tiling");
    let mut models: HashMap<String, StableDiffusion> = HashMap::new();
    let mut failures = Vec::new();
    let cases = fixtures.meta["cases"].as_object().unwrap();
    assert_eq!(cases.len(), 4);
    for (label, case) in cases {
        let name = case["model"].as_str().unwrap();
        let model = models.entry(name.into()).or_insert_with(|| model(name));
        let params = case_params(case);
        let image = generate_one(model, &params);
        let want = fixtures.get(&format!("image.{label}"));
        let want = want.flatten_all().unwrap().to_vec1::<u8>().unwrap();
        let (mean, over) = pixel_difference(&image.pixels, &want);
        // Without circular padding the same request is far from the reference: the test
        // cannot pass on zero padding.
        let plain = generate_one(
            model,
            &GenerationParams {
                tiling: false,
                ..params.clone()
            },
        );
        let (plain_mean, _) = pixel_difference(&plain.pixels, &want);
        eprintln!("{label}: mean abs diff {mean:.4}, fraction > 8: {over:.5}; zero-padded: mean {plain_mean:.3}");
        // The bounds of the other end-to-end image tests (pipeline_images.rs).
        if mean > 1.0 || over > 0.005 {
            failures.push(format!("{label}: mean {mean:.3}, >8 {over:.4}"));
        }
        assert!(
            plain_mean > 4.0 * mean.max(0.5),
            "{label}: tiling changed little"
        );
    }
    assert!(
        failures.is_empty(),
        "tiling images differ from diffusers: {failures:?}"
    );
}

#[test]
fn tiling_images_wrap_at_their_edges() {
    let fixtures = Fixtures::load("tiling");
    let tiny_a = model("tiny-a");
    for label in ["tiny-a.txt2img.euler", "tiny-a.txt2img.euler_a"] {
        let params = case_params(&fixtures.meta["cases"][label]);
        let tiled = seam_continuity(&generate_one(&tiny_a, &params));
        let plain = seam_continuity(&generate_one(
            &tiny_a,
            &GenerationParams {
                tiling: false,
                ..params
            },
        ));
        eprintln!("{label}: seam continuity tiled {tiled:.3}, plain {plain:.3}");
        assert!(
            tiled > 0.75 && tiled > 1.8 * plain,
            "{label}: tiled {tiled:.3} vs plain {plain:.3}"
        );
    }
}
