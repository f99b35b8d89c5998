//! `controlnet_modules`' unit tests: names, labels, sliders and their defaults.

use super::*;

#[test]
fn settings_out_of_the_sliders_are_the_defaults_as_the_extension_s() {
    let canny = |res: Value, a: Value, b: Value| {
        preprocessor("Canny", Some(&res), Some(&a), Some(&b), "[0].", 0).unwrap()
    };
    let p = |resolution, low_threshold, high_threshold| {
        Some(Preprocessor::Canny {
            low_threshold,
            high_threshold,
            resolution,
        })
    };
    assert_eq!(canny(json!(-1), json!(-1), json!(-1)), p(512, 100.0, 200.0));
    assert_eq!(canny(json!(768), json!(64), json!(64)), p(768, 64.0, 64.0));
    assert_eq!(
        canny(json!(4096), json!(0.5), json!(300)),
        p(512, 100.0, 200.0)
    );
    // The unit keeps the sliders' numbers (the computation takes their integer parts).
    assert_eq!(
        canny(json!(640.9), json!(20.7), json!(254.99)),
        p(640, 20.7, 254.99)
    );
    assert_eq!(preprocessor("none", None, None, None, "", 0).unwrap(), None);
    let e = preprocessor("depth_zoe", None, None, None, "[1].", 0).unwrap_err();
    assert!(
        e.starts_with("[1].module: the preprocessor \"depth_zoe\""),
        "{e}"
    );
    assert!(
        e.contains("\"none\", \"tile_resample\", \"pidinet\", \"pidinet_scribble\", \"reference_only\", \"recolor_luminance\", \"openpose_full\", \"normal_bae\", \"mlsd\", \"lineart_standard\", \"inpaint_only\", \"depth\", \"canny\", \"invert\", \"threshold\", \"color\", \"softedge_teed\", \"pidinet_safe\", \"hed_safe\", \"hed\", \"softedge_anyline\", \"shuffle\", \"scribble_xdog\", \"scribble_hed\", \"reference_adain+attn\", \"reference_adain\", \"recolor_intensity\", \"openpose_hand\", \"openpose_faceonly\", \"openpose_face\", \"openpose\", \"normal_map\", \"lineart\", \"lineart_coarse\", \"lineart_anime_denoise\", \"lineart_anime\", \"inpaint_only+lama\", \"inpaint\", \"depth_leres\", \"depth_anything_v2\", \"depth_anything\", \"blur_gaussian\""),
        "{e}"
    );
    // The inpaint modules by name or label, without settings.
    for (m, want) in [
        ("inpaint", Preprocessor::Inpaint),
        ("Inpaint_Global_Harmonious", Preprocessor::Inpaint),
        ("inpaint_only", Preprocessor::InpaintOnly),
        ("inpaint_only+lama", Preprocessor::InpaintOnlyLama),
    ] {
        let got = preprocessor(m, Some(&json!(64)), None, None, "", 0).unwrap();
        assert_eq!(got, Some(want), "{m}");
    }
    // The reference modules' Style Fidelity is threshold_a (0..=1, 0.5); no resolution.
    let reference = |m, a: Value| {
        preprocessor(m, Some(&json!(768)), Some(&a), None, "", 0)
            .unwrap()
            .unwrap()
    };
    assert_eq!(
        reference("reference_adain+attn", json!(0.3)),
        Preprocessor::ReferenceAdainAttn {
            style_fidelity: 0.3
        }
    );
    assert_eq!(
        reference("reference_only", json!(-1)),
        Preprocessor::ReferenceOnly {
            style_fidelity: 0.5
        }
    );
    // The recolor modules' Gamma Correction is threshold_a (0.1..=2, 1.0), kept as sent.
    let recolor = |m, a: Value| {
        preprocessor(m, None, Some(&a), None, "", 0)
            .unwrap()
            .unwrap()
    };
    assert_eq!(
        recolor("recolor_luminance", json!(0.437)),
        Preprocessor::RecolorLuminance { gamma: 0.437 }
    );
    for a in [json!(-1), json!(2.5), json!(0.05)] {
        assert_eq!(
            recolor("recolor_intensity", a),
            Preprocessor::RecolorIntensity { gamma: 1.0 }
        );
    }
    let e = preprocessor("canny", Some(&json!("x")), None, None, "[0].", 0).unwrap_err();
    assert!(e.starts_with("[0].processor_res: must be a number"), "{e}");
}

/// The extension's `set_numpy_seed` on A1111's seed, subseed and `all_seeds[0]`
/// (`tools/make_preprocess_module_fixtures.py`); the translated seed is the drawn one for -1.
#[test]
fn numpy_seed_is_set_numpy_seed_s() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../pipeline/tests/fixtures/preprocess-modules.json"
    );
    let json: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let cases: Vec<&Value> = json["cases"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["module"] == "shuffle")
        .collect();
    assert!(cases.len() >= 4);
    for c in cases {
        let translated = match c["a1111_seed"].as_i64().unwrap() {
            -1 => c["all_seeds_0"].clone(),
            _ => c["a1111_seed"].clone(),
        };
        assert_eq!(
            u64::from(numpy_seed(Some(&translated), Some(&c["a1111_subseed"]))),
            c["numpy_seed"].as_u64().unwrap(),
            "{c}"
        );
        if c["a1111_subseed"] == -1 {
            assert_eq!(
                numpy_seed(Some(&translated), None),
                numpy_seed(Some(&translated), Some(&c["a1111_subseed"]))
            );
        }
    }
}

#[test]
fn the_other_modules_take_their_sliders_as_the_extension_s() {
    let p = |m: &str, res: Value, a: Value| {
        preprocessor(m, Some(&res), Some(&a), None, "[0].", 0)
            .unwrap()
            .unwrap()
    };
    assert_eq!(p("invert", json!(-1), json!(-1)), Preprocessor::Invert);
    // Found by label too.
    assert_eq!(
        p("INVERT (from white bg & black line)", json!(1), json!(1)),
        Preprocessor::Invert
    );
    assert_eq!(
        p("threshold", json!(-1), json!(-1)),
        Preprocessor::Threshold {
            threshold: 127.0,
            resolution: 512
        }
    );
    assert_eq!(
        p("threshold", json!(100), json!(127.5)),
        Preprocessor::Threshold {
            threshold: 127.5,
            resolution: 100
        }
    );
    assert_eq!(
        p("scribble_xdog", json!(64), json!(0.5)),
        Preprocessor::ScribbleXdog {
            threshold: 32.0,
            resolution: 64
        }
    );
    assert_eq!(
        p("scribble_xdog", json!(64), json!(10.9)),
        Preprocessor::ScribbleXdog {
            threshold: 10.9,
            resolution: 64
        }
    );
    assert_eq!(
        p("blur_gaussian", json!(-1), json!(2.25)),
        Preprocessor::BlurGaussian {
            sigma: 2.25,
            resolution: 512
        }
    );
    assert_eq!(
        p("blur_gaussian", json!(-1), json!(65)),
        Preprocessor::BlurGaussian {
            sigma: 9.0,
            resolution: 512
        }
    );
    assert_eq!(
        p("tile_resample", json!(-1), json!(-1)),
        Preprocessor::TileResample {
            down_sampling_rate: 1.0
        }
    );
    assert_eq!(
        p(
            "lineart_standard (from white bg & black line)",
            json!(256),
            json!(3)
        ),
        Preprocessor::LineartStandard { resolution: 256 }
    );
    // `color` by its label; below the resolution slider: the default.
    assert_eq!(
        p("T2IA_Color_Grid", json!(63), json!(3)),
        Preprocessor::Color { resolution: 512 }
    );
    assert_eq!(
        p("color", json!(64), json!(-1)),
        Preprocessor::Color { resolution: 64 }
    );
    // The lineart and PiDiNet modules by name, some by label too; their resolution slider as
    // the others'.
    for (m, want) in [
        (
            "lineart",
            Preprocessor::LineartRealistic { resolution: 256 },
        ),
        (
            "LineArt_Realistic",
            Preprocessor::LineartRealistic { resolution: 256 },
        ),
        (
            "lineart_coarse",
            Preprocessor::LineartCoarse { resolution: 256 },
        ),
        (
            "lineart_anime",
            Preprocessor::LineartAnime { resolution: 256 },
        ),
        (
            "lineart_anime_denoise",
            Preprocessor::LineartAnimeDenoise { resolution: 256 },
        ),
        ("pidinet", Preprocessor::SoftedgePidinet { resolution: 256 }),
        (
            "depth_anything_v2",
            Preprocessor::DepthAnythingV2 { resolution: 256 },
        ),
        (
            "depth_anything",
            Preprocessor::DepthAnything { resolution: 256 },
        ),
        ("depth", Preprocessor::DepthMidas { resolution: 256 }),
        ("depth_midas", Preprocessor::DepthMidas { resolution: 256 }),
        (
            "normal_map",
            Preprocessor::NormalMidas {
                background_threshold: 0.4,
                resolution: 256,
            },
        ),
        ("normal_bae", Preprocessor::NormalBae { resolution: 256 }),
        ("openpose", Preprocessor::Openpose { resolution: 256 }),
        (
            "openpose_hand",
            Preprocessor::OpenposeHand { resolution: 256 },
        ),
        (
            "openpose_face",
            Preprocessor::OpenposeFace { resolution: 256 },
        ),
        (
            "openpose_faceonly",
            Preprocessor::OpenposeFaceonly { resolution: 256 },
        ),
        (
            "openpose_full",
            Preprocessor::OpenposeFull { resolution: 256 },
        ),
        (
            "softedge_teed",
            Preprocessor::SoftedgeTeed {
                safe_steps: 2.0,
                resolution: 256,
            },
        ),
        (
            "softedge_pidisafe",
            Preprocessor::SoftedgePidisafe { resolution: 256 },
        ),
        (
            "pidinet_scribble",
            Preprocessor::ScribblePidinet { resolution: 256 },
        ),
        (
            "Scribble_PiDiNet",
            Preprocessor::ScribblePidinet { resolution: 256 },
        ),
    ] {
        assert_eq!(p(m, json!(256), json!(-1)), want, "{m}");
        assert_eq!(
            p(m, json!(4096), json!(-1)),
            want.with_resolution(512),
            "{m}"
        );
    }
    // softedge_teed's Safe Steps (threshold_a, 0..=10): kept as sent, outside it the default 2.
    for (a, steps) in [
        (json!(0), 0.0),
        (json!(3.7), 3.7),
        (json!(10), 10.0),
        (json!(10.5), 2.0),
    ] {
        let want = Preprocessor::SoftedgeTeed {
            safe_steps: steps,
            resolution: 64,
        };
        assert_eq!(p("softedge_teed", json!(64), a.clone()), want, "{a}");
    }
    // softedge_anyline: its own resolution slider (1280 by default, outside 64..=2048 too) and
    // Safe Steps as softedge_teed's.
    let anyline = |res: Value, a: Value| {
        preprocessor("softedge_anyline", Some(&res), Some(&a), None, "[0].", 0)
            .unwrap()
            .unwrap()
    };
    let want = |safe_steps: f64, resolution: u32| Preprocessor::SoftedgeAnyline {
        safe_steps,
        resolution,
    };
    assert_eq!(anyline(json!(-1), json!(-1)), want(2.0, 1280));
    assert_eq!(anyline(json!(256), json!(3.5)), want(3.5, 256));
    assert_eq!(anyline(json!(4096), json!(11)), want(2.0, 1280));
    assert_eq!(
        preprocessor("softedge_anyline", None, None, None, "", 0).unwrap(),
        Some(want(2.0, 1280))
    );
    // mlsd's two float sliders, kept as sent; -1 or outside them their defaults (0.1, 0.1).
    let mlsd = |a: Value, b: Value| {
        preprocessor("mlsd", Some(&json!(320)), Some(&a), Some(&b), "[0].", 0)
            .unwrap()
            .unwrap()
    };
    let want = |v: f64, d: f64| Preprocessor::Mlsd {
        value_threshold: v,
        distance_threshold: d,
        resolution: 320,
    };
    assert_eq!(mlsd(json!(0.35), json!(12.5)), want(0.35, 12.5));
    assert_eq!(mlsd(json!(-1), json!(-1)), want(0.1, 0.1));
    assert_eq!(mlsd(json!(2.5), json!(20.01)), want(0.1, 0.1));
    assert_eq!(mlsd(json!(2.0), json!(0.01)), want(2.0, 0.01));
    // depth_leres's Remove Near % and Remove Background % (0..=100, 0), kept as sent.
    let leres = |a: Value, b: Value| {
        preprocessor(
            "depth_leres",
            Some(&json!(-1)),
            Some(&a),
            Some(&b),
            "[0].",
            0,
        )
        .unwrap()
        .unwrap()
    };
    let want = |remove_near: f64, remove_background: f64| Preprocessor::DepthLeres {
        remove_near,
        remove_background,
        resolution: 512,
    };
    assert_eq!(leres(json!(-1), json!(-1)), want(0.0, 0.0));
    assert_eq!(leres(json!(12.3), json!(100)), want(12.3, 100.0));
    assert_eq!(leres(json!(100.5), json!(-0.1)), want(0.0, 0.0));
    // shuffle's hidden resolution slider: anything but 0..=1 is 512; the seed is given.
    for res in [json!(-1), json!(64), json!(1024)] {
        assert_eq!(
            preprocessor("shuffle", Some(&res), None, None, "[0].", 77).unwrap(),
            Some(Preprocessor::Shuffle {
                resolution: 512,
                seed: 77
            })
        );
    }
    let e = preprocessor("shuffle", Some(&json!(1)), None, None, "[0].", 7).unwrap_err();
    assert!(e.starts_with("[0].processor_res: shuffle's"), "{e}");
    // Pixel perfect leaves the modules without a resolution as they are.
    assert_eq!(
        at_resolution(Preprocessor::Invert, 300),
        Preprocessor::Invert
    );
    assert_eq!(
        at_resolution(p("threshold", json!(-1), json!(9)), 300),
        Preprocessor::Threshold {
            threshold: 9.0,
            resolution: 300
        }
    );
}

/// Every listed module but `none` builds its own preprocessor: the native one its name (or the
/// extension's legacy name for it) says, never a silent "none".
#[test]
fn every_listed_module_builds_the_preprocessor_it_names() {
    let mut built = 0;
    for m in MODULES.iter().filter(|m| m.name != "none") {
        let p = preprocessor(m.name, None, None, None, "", 0).unwrap();
        let p = p.unwrap_or_else(|| panic!("{} built no preprocessor", m.name));
        assert_eq!(p.module(), native_name(m.name), "{}", m.name);
        built += 1;
    }
    assert!(built >= 29, "{built} modules");
}

/// `sdserve download --annotators` fetches the files of every model-based module listed.
#[test]
fn every_listed_module_s_network_file_is_downloaded_ahead() {
    let mut files = 0;
    for m in &MODULES {
        let p = preprocessor(m.name, None, None, None, "", 0).unwrap();
        for file in p.map(|p| p.annotator_files()).unwrap_or_default() {
            files += 1;
            assert!(
                crate::annotators::hub_repos()
                    .iter()
                    .any(|(repo, paths)| *repo == file.hub.repo && paths.contains(&file.hub.path)),
                "{}: {} is not in ANNOTATOR_FILES",
                m.name,
                file.name
            );
        }
    }
    assert!(
        files >= 20,
        "the HED, lineart, PiDiNet, TEED, Anyline and OpenPose modules at least"
    );
}

#[test]
fn pixel_perfect_is_the_extension_s_estimate() {
    // 1000x500 into 512x512: cover k = max(512/500, 512/1000) = 1.024, x 500 = 512.
    assert_eq!(
        pixel_perfect_resolution((1000, 500), (512, 512), false),
        512
    );
    // Fit: k = 0.512, x 500 = 256.
    assert_eq!(pixel_perfect_resolution((1000, 500), (512, 512), true), 256);
    // 300x200 into 768x512: k = max(2.56, 2.56), x 200 = 512.
    assert_eq!(pixel_perfect_resolution((300, 200), (768, 512), false), 512);
    // Beyond the native range: kept within it.
    assert_eq!(pixel_perfect_resolution((4000, 40), (512, 512), true), 64);
}
