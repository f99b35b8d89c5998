//! The HED, PiDiNet and lineart modules with the tiny networks of `tools/make_hed_fixtures.py`,
//! `make_pidinet_fixtures.py` and `make_lineart_fixtures.py` in ANNOTATOR_DIR: detect by name
//! and by label, and a native unit with the module equals one sending its map.

use serde_json::json;

use sdserve_pipeline::controlnet::preprocess::{
    LoadedNetworks, Preprocessor, HED, LINEART, LINEART_ANIME, LINEART_COARSE, PIDINET,
};

use super::{annotator_server, detect_is, fixtures, native_unit_is_its_map, photo};

#[test]
fn hed_and_pidinet_modules_run_with_annotator_dir() {
    // The extension's layout: each file in its own subfolder.
    let annotators =
        std::env::temp_dir().join(format!("sdserve-annotators-http-{}", std::process::id()));
    for (sub, file) in [
        ("hed", "ControlNetHED.pth"),
        ("pidinet", "table5_pidinet.pth"),
    ] {
        std::fs::create_dir_all(annotators.join(sub)).unwrap();
        std::fs::copy(
            fixtures().join(sub).join(file),
            annotators.join(sub).join(file),
        )
        .unwrap();
    }
    let s = annotator_server(&annotators);
    let (photo, _) = photo();
    // The tiny networks of `tools/make_hed_fixtures.py` and `make_pidinet_fixtures.py`, as
    // the server reads them.
    let net = LoadedNetworks::default()
        .read(&HED, &annotators.join("hed/ControlNetHED.pth"))
        .unwrap()
        .read(&PIDINET, &annotators.join("pidinet/table5_pidinet.pth"))
        .unwrap();
    // /controlnet/detect by name and by label: the maps made here.
    for (module, p) in [
        ("hed", Preprocessor::SoftedgeHed { resolution: 64 }),
        (
            "softedge_hedsafe",
            Preprocessor::SoftedgeHedsafe { resolution: 64 },
        ),
        ("scribble_hed", Preprocessor::ScribbleHed { resolution: 64 }),
        ("pidinet", Preprocessor::SoftedgePidinet { resolution: 64 }),
        (
            "softedge_pidisafe",
            Preprocessor::SoftedgePidisafe { resolution: 64 },
        ),
        (
            "scribble_pidinet",
            Preprocessor::ScribblePidinet { resolution: 64 },
        ),
    ] {
        let want = p.run_with(&photo, &net).unwrap();
        let levels = detect_is(&s, module, json!({"controlnet_processor_res": 64}), &want);
        assert!(levels >= 2, "{module}: {levels} levels");
    }
    let map = Preprocessor::SoftedgeHed { resolution: 64 }
        .run_with(&photo, &net)
        .unwrap();
    let settings = json!({"type": "softedge_hed", "resolution": 64});
    native_unit_is_its_map(&s, settings, &map, "Threshold A: 0.5, Threshold B: 0.5");
}

#[test]
fn lineart_modules_run_with_annotator_dir() {
    let annotators = fixtures().join("lineart");
    let s = annotator_server(&annotators);
    let (photo, _) = photo();
    // The tiny networks of `tools/make_lineart_fixtures.py`, as the server reads them.
    let mut nets = LoadedNetworks::default();
    for f in [&LINEART, &LINEART_COARSE, &LINEART_ANIME] {
        nets = nets.read(f, &annotators.join(f.name)).unwrap();
    }
    // /controlnet/detect by name and by label: the maps made here.
    let realistic = Preprocessor::LineartRealistic { resolution: 64 };
    for (module, p) in [
        ("lineart", realistic),
        ("lineart_realistic", realistic),
        (
            "lineart_coarse",
            Preprocessor::LineartCoarse { resolution: 64 },
        ),
        (
            "lineart_anime",
            Preprocessor::LineartAnime { resolution: 64 },
        ),
    ] {
        let want = p.run_with(&photo, &nets).unwrap();
        let levels = detect_is(&s, module, json!({"controlnet_processor_res": 64}), &want);
        assert!(levels >= 16, "{module}: {levels} levels");
    }
    let map = Preprocessor::LineartAnime { resolution: 64 }
        .run_with(&photo, &nets)
        .unwrap();
    let settings = json!({"type": "lineart_anime", "resolution": 64});
    native_unit_is_its_map(&s, settings, &map, "Threshold A: 0.5, Threshold B: 0.5");
}
