//! lineart_anime_denoise against the extension's own `res_skip`, `MangaLineExtration` and
//! legacy function (`tools/make_manga_line_fixtures.py`: the classes at reduced widths, every
//! block and unit kept, with seeded random weights saved with `torch.save` as `erika.pth` is).
//! The grey image is exact, the network's line agrees to float noise; the u8 maps are compared
//! value by value, the few that float noise moves across a truncation step counted and bounded.

use std::sync::Arc;

use sdserve_pipeline::controlnet::preprocess::{
    network, resize_image_with_pad, rgb_to_grey, LoadedNetworks, MangaLineNetwork, Preprocessor,
    MANGA_LINE,
};

use super::common::fixture_path;
use super::Refs;

fn nets() -> (LoadedNetworks, Arc<MangaLineNetwork>) {
    let path = fixture_path(&format!("manga_line/{}", MANGA_LINE.name));
    let all = LoadedNetworks::default().read(&MANGA_LINE, &path).unwrap();
    let net = network(&all, &MANGA_LINE).unwrap();
    (all, net)
}

#[test]
fn manga_line_reads_its_widths_and_units_and_its_line_agrees_to_float_noise() {
    let (_, net) = nets();
    // The fixture's widths (tools/make_manga_line_fixtures.py's WIDTHS of 24 .. 384, 16) and
    // res_skip's units per block.
    assert_eq!(net.widths(), [2, 4, 6, 8, 12, 8, 6, 4, 2, 3]);
    assert_eq!(net.units(), [2, 3, 5, 7, 12, 7, 5, 3, 2, 2]);
    let t = Refs::load("manga_line/manga_line");
    let (mut worst, mut checked) = (0f32, 0);
    for k in t.tensors.keys().filter(|k| k.starts_with("line.")) {
        let case = &k["line.".len()..];
        let padded = t.image(&format!("padded.{case}"));
        let grey = rgb_to_grey(&padded);
        let want_grey = t.tensors[&format!("grey.{case}")]
            .flatten_all()
            .unwrap()
            .to_vec1::<u8>()
            .unwrap();
        assert_eq!(grey, want_grey, "RGB2GRAY of {case}");
        let want = t.floats(k);
        let (lo, hi) = want
            .iter()
            .fold((f32::MAX, f32::MIN), |(lo, hi), &v| (lo.min(v), hi.max(v)));
        assert!(lo < 0.0 && hi > 150.0, "{k}: {lo}..{hi}, too flat to test");
        let (w, h) = (padded.width as usize, padded.height as usize);
        let got = net.line(&grey, w, h).unwrap();
        assert_eq!(got.len(), want.len(), "{k}");
        let d = got
            .iter()
            .zip(&want)
            .fold(0f32, |m, (g, w)| m.max((g - w).abs()));
        worst = worst.max(d);
        checked += 1;
    }
    assert_eq!(checked, 7);
    println!("largest res_skip line difference: {worst:e}");
    // Lines span about -70..540 (measured: 1.5e-4).
    assert!(worst < 5e-4, "{worst}");
    // The decoder's sizes must meet the encoder's: a side not a multiple of 16 is refused.
    assert!(net.line(&[0; 24 * 16], 24, 16).is_err());
}

#[test]
fn lineart_anime_denoise_makes_the_extension_s_maps() {
    let (all, _) = nets();
    let t = Refs::load("manga_line/manga_line");
    assert_eq!(t.cases.len(), 7);
    let (mut total, mut total_differing) = (0, 0);
    for c in &t.cases {
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
        let p = Preprocessor::LineartAnimeDenoise { resolution };
        assert_eq!(p.module(), "lineart_anime_denoise");
        assert_eq!(p.model_file(), c["file"].as_str());
        let got = p.run_with(&photo, &all).unwrap();
        let label = format!("lineart_anime_denoise {name} {resolution}");
        let (differing, max) = super::compare(&got, &want, &label);
        println!(
            "{label}: {differing} of {} values differ, by at most {max}",
            got.pixels.len()
        );
        // Float noise in the line may move a value across a truncation step (measured: none
        // of the 56361 values differ); allowed: one level, in at most 1 value of 1000.
        assert!(max <= 1, "{label}: by {max}");
        total += got.pixels.len();
        total_differing += differing;
    }
    println!("all cases: {total_differing} of {total} values differ");
    assert!(
        total_differing * 1000 <= total * 5,
        "{total_differing} of {total}"
    );
}
