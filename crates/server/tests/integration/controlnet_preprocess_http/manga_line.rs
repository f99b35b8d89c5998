//! lineart_anime_denoise with the tiny `erika.pth` of `tools/make_manga_line_fixtures.py` in
//! ANNOTATOR_DIR (without it: `missing_networks.rs`).

use serde_json::json;

use sdserve_pipeline::controlnet::preprocess::{LoadedNetworks, Preprocessor, MANGA_LINE};

use super::{annotator_server, detect_is, fixtures, native_unit_is_its_map, photo};

#[test]
fn lineart_anime_denoise_runs_with_annotator_dir() {
    let annotators = fixtures().join("manga_line");
    let s = annotator_server(&annotators);
    let (photo, _) = photo();
    let nets = LoadedNetworks::default()
        .read(&MANGA_LINE, &annotators.join(MANGA_LINE.name))
        .unwrap();
    // /controlnet/detect (name and label are one): the map made here, at two resolutions.
    for res in [64, 96] {
        let want = Preprocessor::LineartAnimeDenoise { resolution: res }
            .run_with(&photo, &nets)
            .unwrap();
        let settings = json!({"controlnet_processor_res": res});
        let levels = detect_is(&s, "lineart_anime_denoise", settings, &want);
        assert!(levels >= 16, "{res}: {levels} levels");
    }
    let map = Preprocessor::LineartAnimeDenoise { resolution: 64 }
        .run_with(&photo, &nets)
        .unwrap();
    let settings = json!({"type": "lineart_anime_denoise", "resolution": 64});
    native_unit_is_its_map(&s, settings, &map, "Threshold A: 0.5, Threshold B: 0.5");
}
