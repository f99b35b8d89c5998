//! OpenCV's `INTER_AREA` where one side grows and the other shrinks (and the neighbouring
//! cases: one side kept, both growing to ViT-H's 224), as the sd-webui-controlnet extension's
//! `clip` preprocessor stretches an IP-Adapter image: `resize_area_any` against
//! `tools/make_area_resize_fixtures.py`'s `cv2.resize`, bit for bit.

use crate::common;

use common::{read_png, Fixtures};
use sdserve_pipeline::controlnet::preprocess::resize_area_any;

#[test]
fn inter_area_matches_opencv_when_one_side_grows_and_the_other_shrinks() {
    let f = Fixtures::load("area-resize");
    let cases = f.meta["cases"].as_array().unwrap();
    let mut mixed = 0;
    for case in cases {
        let image = read_png(case["image"].as_str().unwrap());
        let (w, h) = (
            case["width"].as_u64().unwrap() as usize,
            case["height"].as_u64().unwrap() as usize,
        );
        let key = case["key"].as_str().unwrap();
        let want: Vec<u8> = f.get(key).flatten_all().unwrap().to_vec1().unwrap();
        let got = resize_area_any(&image, w, h);
        assert_eq!((got.width as usize, got.height as usize), (w, h), "{key}");
        let differing = got.pixels.iter().zip(&want).filter(|(a, b)| a != b).count();
        assert_eq!(
            differing, 0,
            "{key}: {}x{} -> {w}x{h}",
            image.width, image.height
        );
        let grows = |to: usize, from: u32| to > from as usize;
        if grows(w, image.width) != grows(h, image.height)
            && w != image.width as usize
            && h != image.height as usize
        {
            mixed += 1;
        }
    }
    assert!(
        mixed >= 5,
        "{mixed} cases with one side growing, the other shrinking"
    );
}
