//! The lineart modules (lineart_realistic, lineart_coarse, lineart_anime) against the
//! extension's own `Generator`, `UnetGenerator`, detectors and legacy functions
//! (`tools/make_lineart_fixtures.py`: the classes at reduced widths with seeded random weights,
//! saved with `torch.save` as the real files are). The networks' lines agree to float noise;
//! the u8 maps they make are compared value by value, the few that float noise (or, for the
//! anime module, the cubic resizes) move across a truncation step counted and bounded.

use std::sync::Arc;

use sdserve_pipeline::controlnet::preprocess::{
    network, resize_image_with_pad, LineartAnimeNetwork, LineartNetwork, LoadedNetworks,
    Preprocessor, LINEART, LINEART_ANIME, LINEART_COARSE,
};

use super::common::fixture_path;
use super::Refs;

fn file(name: &str) -> std::path::PathBuf {
    fixture_path(&format!("lineart/{name}"))
}

/// The three fixture networks, and each typed.
struct Nets {
    all: LoadedNetworks,
    realistic: Arc<LineartNetwork>,
    coarse: Arc<LineartNetwork>,
    anime: Arc<LineartAnimeNetwork>,
}

fn nets() -> Nets {
    let mut all = LoadedNetworks::default();
    for f in [&LINEART, &LINEART_COARSE, &LINEART_ANIME] {
        all = all.read(f, &file(f.name)).unwrap();
    }
    Nets {
        realistic: network(&all, &LINEART).unwrap(),
        coarse: network(&all, &LINEART_COARSE).unwrap(),
        anime: network(&all, &LINEART_ANIME).unwrap(),
        all,
    }
}

fn largest_difference(got: &[f32], want: &[f32], key: &str) -> f32 {
    assert_eq!(got.len(), want.len(), "{key}");
    got.iter()
        .zip(want)
        .fold(0f32, |m, (g, w)| m.max((g - w).abs()))
}

#[test]
fn the_networks_read_their_widths_and_their_lines_agree_to_float_noise() {
    let nets = nets();
    assert_eq!(nets.realistic.widths(), [4, 8, 16]);
    assert_eq!(nets.anime.widths(), [2, 4, 8, 16, 16, 16, 16, 16]);
    let t = Refs::load("lineart/lineart");
    let mut worst = 0f32;
    let mut checked = 0;
    for (key, net) in [
        (LINEART.name, &nets.realistic),
        (LINEART_COARSE.name, &nets.coarse),
    ] {
        let prefix = format!("line.{key}.");
        for k in t.tensors.keys().filter(|k| k.starts_with(&prefix)) {
            let padded = t.image(&format!("padded.{}", &k[prefix.len()..]));
            let want = t.floats(k);
            let (lo, hi) = want
                .iter()
                .fold((1f32, 0f32), |(lo, hi), &v| (lo.min(v), hi.max(v)));
            assert!(lo < 0.01 && hi > 0.99, "{k}: {lo}..{hi}, too flat to test");
            worst = worst.max(largest_difference(&net.line(&padded).unwrap(), &want, k));
            checked += 1;
        }
    }
    assert_eq!(checked, 14);
    println!("largest Generator line difference: {worst:e}");
    assert!(worst < 1e-4, "{worst}");
    let feed = t.image("feed.sketch.47");
    let want = t.floats("anime.sketch.47");
    let anime = largest_difference(&nets.anime.line(&feed).unwrap(), &want, "anime");
    println!("largest UnetGenerator line difference: {anime:e}");
    assert!(anime < 1e-5, "{anime}");
}

#[test]
fn lineart_modules_make_the_extension_s_maps() {
    let nets = nets();
    let t = Refs::load("lineart/lineart");
    let cases = &t.cases;
    assert_eq!(cases.len(), 21);
    for c in cases {
        let module = c["module"].as_str().unwrap();
        let name = c["image"].as_str().unwrap();
        let resolution = c["resolution"].as_u64().unwrap() as u32;
        let photo = t.image(&format!("image.{name}"));
        let want = t.image(c["key"].as_str().unwrap());
        if resolution <= photo.width.min(photo.height) {
            let padded = resize_image_with_pad(&photo, resolution);
            assert_eq!(
                padded.image,
                t.image(&format!("padded.{name}.{resolution}"))
            );
        }
        let p = match module {
            "lineart_realistic" => Preprocessor::LineartRealistic { resolution },
            "lineart_coarse" => Preprocessor::LineartCoarse { resolution },
            "lineart_anime" => Preprocessor::LineartAnime { resolution },
            other => panic!("{other}"),
        };
        assert_eq!(p.model_file(), c["file"].as_str());
        let got = p.run_with(&photo, &nets.all).unwrap();
        let label = format!("{module} {name} {resolution}");
        let (differing, max) = super::compare(&got, &want, &label);
        println!(
            "{label}: {differing} of {} values differ, by at most {max}",
            got.pixels.len()
        );
        // The lines agree to float noise, which moves a few values across a truncation step
        // (measured: 6 of 8178 for the Generator); the anime module's cubic resizes (IPP's
        // for the feed, OpenCV's f32 one back) a few more (51 of 17280).
        let per_mille = if module == "lineart_anime" { 5 } else { 1 };
        assert!(
            max <= 1 && differing * 1000 <= got.pixels.len() * per_mille,
            "{label}: {differing} differ, by at most {max}"
        );
    }
}
