//! The M-LSD module (`mlsd`) over real HTTP (tiny-a-vae8, the pipeline's tiny ControlNets),
//! with the pipeline's tiny M-LSD network (`tools/make_mlsd_fixtures.py`) in ANNOTATOR_DIR's
//! `mlsd/` subfolder: `/controlnet/detect` and a native unit make the map `run_with` makes
//! with the thresholds sent; the metadata and the infotext carry them (without the file:
//! `missing_networks.rs`).

use serde_json::json;

use sdserve_pipeline::controlnet::preprocess::{LoadedNetworks, Preprocessor, MLSD};

use super::{annotator_server, detect_is, fixtures, native_unit_is_its_map, photo};

#[test]
fn mlsd_runs_with_annotator_dir() {
    let annotators =
        std::env::temp_dir().join(format!("sdserve-annotators-mlsd-{}", std::process::id()));
    let file = "mlsd_large_512_fp32.pth";
    std::fs::create_dir_all(annotators.join("mlsd")).unwrap();
    std::fs::copy(
        fixtures().join("mlsd").join(file),
        annotators.join("mlsd").join(file),
    )
    .unwrap();
    let s = annotator_server(&annotators);
    let (photo, _) = photo();
    let net = LoadedNetworks::default()
        .read(&MLSD, &annotators.join("mlsd").join(file))
        .unwrap();
    let mlsd = |v: f64, d: f64| Preprocessor::Mlsd {
        value_threshold: v,
        distance_threshold: d,
        resolution: 64,
    };
    // Listed with the extension's sliders (preprocessor_compiled.py's `mlsd`).
    let listed = s.get("/controlnet/module_list").json();
    assert_eq!(
        listed["module_detail"]["mlsd"],
        json!({"model_free": false, "sliders": [
            {"name": "Resolution", "value": 512, "min": 64, "max": 2048, "step": 8},
            {"name": "MLSD Value Threshold", "value": 0.1, "min": 0.01, "max": 2, "step": 0.01},
            {"name": "MLSD Distance Threshold", "value": 0.1, "min": 0.01, "max": 20, "step": 0.01}]})
    );
    // /controlnet/detect: the thresholds as threshold_a and threshold_b; the extension's
    // defaults (0.1, 0.1) for -1.
    let mut whites = Vec::new();
    for (a, b, want) in [
        (json!(-1), json!(-1), mlsd(0.1, 0.1)),
        (json!(0.3), json!(8.5), mlsd(0.3, 8.5)),
    ] {
        let map = want.run_with(&photo, &net).unwrap();
        let settings = json!({"controlnet_processor_res": 64, "controlnet_threshold_a": a,
                              "controlnet_threshold_b": b});
        // detect_is: the same pixels as `map`.
        assert_eq!(detect_is(&s, "mlsd", settings, &map), 2, "{want:?}");
        whites.push(map.pixels.iter().filter(|&&v| v == 255).count());
        assert!(map.pixels.iter().all(|&v| v == 0 || v == 255));
    }
    // Lines drawn, fewer at the stricter thresholds.
    assert!(whites[0] > whites[1] && whites[1] > 0, "{whites:?}");

    // Native: metadata and infotext carry the thresholds.
    let settings = json!({"type": "mlsd", "value_threshold": 0.3, "distance_threshold": 8.5,
                          "resolution": 64});
    let map = mlsd(0.3, 8.5).run_with(&photo, &net).unwrap();
    native_unit_is_its_map(&s, settings, &map, "Threshold A: 0.3, Threshold B: 8.5");
}
