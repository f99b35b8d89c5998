//! Tests of `validate::preprocessor` (a file of their own: the module is past 600 lines with them).

use super::*;
use serde_json::json;

#[test]
fn settings_default_as_the_extension_s_sliders_and_are_checked() {
    let canny = |v: Value| read(Some(&v), 0, 0);
    assert_eq!(
        canny(json!({"type": "canny"})).unwrap(),
        Some(Preprocessor::Canny {
            low_threshold: 100.0,
            high_threshold: 200.0,
            resolution: 512
        })
    );
    assert_eq!(canny(json!({"type": "none"})).unwrap(), None);
    assert_eq!(read(None, 0, 0).unwrap(), None);
    for (v, needle) in [
        (json!({"type": "depth"}), "[0].preprocessor.type: \"depth\""),
        (json!({}), "[0].preprocessor.type"),
        (
            json!({"type": "canny", "low_threshold": 0}),
            "low_threshold: must be a number in 1..=255",
        ),
        (
            json!({"type": "canny", "high_threshold": 256}),
            "high_threshold",
        ),
        (
            json!({"type": "canny", "resolution": 63}),
            "resolution: must be an integer in 64..=2048",
        ),
        (json!({"type": "canny", "resolution": 512.5}), "resolution"),
        (json!({"type": "none", "resolution": 512}), "unknown key"),
        (json!("canny"), "must be an object"),
    ] {
        let e = canny(v).unwrap_err();
        assert!(e.contains(needle), "{needle}: {e}");
    }
    // A fraction is kept, as the extension's slider keeps it.
    let p = canny(json!({"type": "canny", "low_threshold": 7.5}))
        .unwrap()
        .unwrap();
    let described = serde_json::to_value(described(&p)).unwrap();
    assert_eq!(
        described,
        json!({"type": "canny", "low_threshold": 7.5, "high_threshold": 200.0, "resolution": 512})
    );
    assert_eq!(read(Some(&described), 0, 0).unwrap(), Some(p));
}

#[test]
fn the_other_modules_read_their_settings_and_describe_themselves_back() {
    let read1 = |v: Value| read(Some(&v), 2, 99);
    for (v, want) in [
        (json!({"type": "invert"}), Preprocessor::Invert),
        (
            json!({"type": "threshold"}),
            Preprocessor::Threshold {
                threshold: 127.0,
                resolution: 512,
            },
        ),
        (
            json!({"type": "threshold", "threshold": 127.5, "resolution": 64}),
            Preprocessor::Threshold {
                threshold: 127.5,
                resolution: 64,
            },
        ),
        (
            json!({"type": "scribble_xdog", "threshold": 64}),
            Preprocessor::ScribbleXdog {
                threshold: 64.0,
                resolution: 512,
            },
        ),
        (
            json!({"type": "lineart_standard", "resolution": 768}),
            Preprocessor::LineartStandard { resolution: 768 },
        ),
        (
            json!({"type": "blur_gaussian", "sigma": 0.01}),
            Preprocessor::BlurGaussian {
                sigma: 0.01,
                resolution: 512,
            },
        ),
        (
            json!({"type": "tile_resample", "down_sampling_rate": 2.5}),
            Preprocessor::TileResample {
                down_sampling_rate: 2.5,
            },
        ),
        (
            json!({"type": "color", "resolution": 64}),
            Preprocessor::Color { resolution: 64 },
        ),
        (
            json!({"type": "lineart_realistic"}),
            Preprocessor::LineartRealistic { resolution: 512 },
        ),
        (
            json!({"type": "lineart_coarse", "resolution": 640}),
            Preprocessor::LineartCoarse { resolution: 640 },
        ),
        (
            json!({"type": "lineart_anime", "resolution": 64}),
            Preprocessor::LineartAnime { resolution: 64 },
        ),
        (
            json!({"type": "depth_anything_v2"}),
            Preprocessor::DepthAnythingV2 { resolution: 512 },
        ),
        (
            json!({"type": "depth_anything", "resolution": 448}),
            Preprocessor::DepthAnything { resolution: 448 },
        ),
        (
            json!({"type": "depth_midas", "resolution": 384}),
            Preprocessor::DepthMidas { resolution: 384 },
        ),
        (
            json!({"type": "recolor_luminance"}),
            Preprocessor::RecolorLuminance { gamma: 1.0 },
        ),
        (
            json!({"type": "recolor_intensity", "gamma": 0.35}),
            Preprocessor::RecolorIntensity { gamma: 0.35 },
        ),
        (
            json!({"type": "normal_midas"}),
            Preprocessor::NormalMidas {
                background_threshold: 0.4,
                resolution: 512,
            },
        ),
        (
            json!({"type": "normal_midas", "background_threshold": 0.05, "resolution": 256}),
            Preprocessor::NormalMidas {
                background_threshold: 0.05,
                resolution: 256,
            },
        ),
        (
            json!({"type": "normal_bae", "resolution": 576}),
            Preprocessor::NormalBae { resolution: 576 },
        ),
        (
            json!({"type": "depth_leres"}),
            Preprocessor::DepthLeres {
                remove_near: 0.0,
                remove_background: 0.0,
                resolution: 512,
            },
        ),
        (
            json!({"type": "depth_leres", "remove_near": 12.5, "remove_background": 100,
                   "resolution": 320}),
            Preprocessor::DepthLeres {
                remove_near: 12.5,
                remove_background: 100.0,
                resolution: 320,
            },
        ),
        (
            json!({"type": "openpose", "resolution": 320}),
            Preprocessor::Openpose { resolution: 320 },
        ),
        (
            json!({"type": "openpose_hand", "resolution": 256}),
            Preprocessor::OpenposeHand { resolution: 256 },
        ),
        (
            json!({"type": "openpose_face"}),
            Preprocessor::OpenposeFace { resolution: 512 },
        ),
        (
            json!({"type": "openpose_faceonly", "resolution": 640}),
            Preprocessor::OpenposeFaceonly { resolution: 640 },
        ),
        (
            json!({"type": "openpose_full", "resolution": 768}),
            Preprocessor::OpenposeFull { resolution: 768 },
        ),
        (
            json!({"type": "lineart_anime_denoise", "resolution": 96}),
            Preprocessor::LineartAnimeDenoise { resolution: 96 },
        ),
        (
            json!({"type": "softedge_pidinet"}),
            Preprocessor::SoftedgePidinet { resolution: 512 },
        ),
        (
            json!({"type": "softedge_pidisafe", "resolution": 640}),
            Preprocessor::SoftedgePidisafe { resolution: 640 },
        ),
        (
            json!({"type": "scribble_pidinet", "resolution": 64}),
            Preprocessor::ScribblePidinet { resolution: 64 },
        ),
        (
            json!({"type": "mlsd"}),
            Preprocessor::Mlsd {
                value_threshold: 0.1,
                distance_threshold: 0.1,
                resolution: 512,
            },
        ),
        (
            json!({"type": "mlsd", "value_threshold": 0.27, "distance_threshold": 7.5, "resolution": 640}),
            Preprocessor::Mlsd {
                value_threshold: 0.27,
                distance_threshold: 7.5,
                resolution: 640,
            },
        ),
        // The request's seed where the unit names none.
        (
            json!({"type": "shuffle"}),
            Preprocessor::Shuffle {
                resolution: 512,
                seed: 99,
            },
        ),
        (
            json!({"type": "shuffle", "seed": 4294967295_u32, "resolution": 256}),
            Preprocessor::Shuffle {
                resolution: 256,
                seed: u32::MAX,
            },
        ),
    ] {
        let got = read1(v.clone()).unwrap().unwrap();
        assert_eq!(got, want, "{v}");
        let back = serde_json::to_value(described(&got)).unwrap();
        assert_eq!(read1(back).unwrap(), Some(got), "{v}");
    }
    assert_eq!(
        serde_json::to_value(described(&Preprocessor::BlurGaussian {
            sigma: 2.5,
            resolution: 64
        }))
        .unwrap(),
        json!({"type": "blur_gaussian", "sigma": 2.5, "resolution": 64})
    );
    for (v, needle) in [
        (
            json!({"type": "threshold", "threshold": 256}),
            "[2].preprocessor.threshold: must be a number in 0..=255",
        ),
        (
            json!({"type": "scribble_xdog", "threshold": 0}),
            "[2].preprocessor.threshold: must be a number in 1..=64",
        ),
        (
            json!({"type": "blur_gaussian", "sigma": 0}),
            "[2].preprocessor.sigma: must be a number in 0.01..=64",
        ),
        (
            json!({"type": "tile_resample", "down_sampling_rate": 8.5}),
            "[2].preprocessor.down_sampling_rate: must be a number in 1..=8",
        ),
        (
            json!({"type": "mlsd", "value_threshold": 0}),
            "[2].preprocessor.value_threshold: must be a number in 0.01..=2",
        ),
        (
            json!({"type": "mlsd", "distance_threshold": 20.5}),
            "[2].preprocessor.distance_threshold: must be a number in 0.01..=20",
        ),
        (
            json!({"type": "tile_resample", "resolution": 512}),
            "unknown key \"resolution\" for \"tile_resample\"",
        ),
        (json!({"type": "invert", "threshold": 1}), "unknown key"),
        (
            json!({"type": "shuffle", "seed": 4294967296_u64}),
            "[2].preprocessor.seed: must be an integer in 0..=4294967295",
        ),
        (
            json!({"type": "shuffle", "seed": -1}),
            "[2].preprocessor.seed: must be an integer",
        ),
        (
            json!({"type": "color", "resolution": 63}),
            "[2].preprocessor.resolution: must be an integer in 64..=2048",
        ),
        (
            json!({"type": "lineart_anime", "resolution": 2056}),
            "[2].preprocessor.resolution: must be an integer in 64..=2048",
        ),
        (
            json!({"type": "lineart_anime_denoise", "resolution": 32}),
            "[2].preprocessor.resolution: must be an integer in 64..=2048",
        ),
        (
            json!({"type": "depth_anything_v2", "colored": true}),
            "unknown key \"colored\" for \"depth_anything_v2\"",
        ),
        (
            json!({"type": "depth_anything", "colored": true}),
            "unknown key \"colored\" for \"depth_anything\"",
        ),
        (
            json!({"type": "depth_midas", "background_threshold": 0.1}),
            "unknown key \"background_threshold\" for \"depth_midas\"",
        ),
        (
            json!({"type": "normal_midas", "background_threshold": 1.5}),
            "[2].preprocessor.background_threshold: must be a number in 0..=1",
        ),
        (
            json!({"type": "depth_leres", "remove_near": 100.1}),
            "[2].preprocessor.remove_near: must be a number in 0..=100",
        ),
        (
            json!({"type": "depth_leres", "remove_background": -1}),
            "[2].preprocessor.remove_background: must be a number in 0..=100",
        ),
        (
            json!({"type": "depth_leres", "background_threshold": 0.1}),
            "unknown key \"background_threshold\" for \"depth_leres\"",
        ),
        (
            json!({"type": "openpose_full", "include_hand": true}),
            "unknown key \"include_hand\" for \"openpose_full\"",
        ),
        (
            json!({"type": "lineart_anime_denoise", "sigma": 2}),
            "unknown key \"sigma\" for \"lineart_anime_denoise\"",
        ),
        (
            json!({"type": "lineart_coarse", "threshold": 10}),
            "unknown key \"threshold\" for \"lineart_coarse\"",
        ),
        (
            json!({"type": "depth_zoe"}),
            "is not a preprocessor this server runs",
        ),
        (
            json!({"type": "recolor_luminance", "gamma": 2.5}),
            "[2].preprocessor.gamma: must be a number in 0.1..=2",
        ),
        (
            json!({"type": "recolor_intensity", "gamma": 0.05}),
            "[2].preprocessor.gamma: must be a number in 0.1..=2",
        ),
        (
            json!({"type": "recolor_intensity", "resolution": 512}),
            "unknown key \"resolution\" for \"recolor_intensity\"",
        ),
    ] {
        let e = read1(v).unwrap_err();
        assert!(e.contains(needle), "{needle}: {e}");
    }
    // A side shorter than the rate shrinks to nothing: refused, not OpenCV's error.
    let tiny = RgbImage {
        width: 30,
        height: 3,
        pixels: vec![5; 30 * 3 * 3],
    };
    let rate = |r| Preprocessor::TileResample {
        down_sampling_rate: r,
    };
    let e = run(&rate(4.0), &tiny, 0).unwrap_err();
    assert!(e.starts_with("[0].preprocessor.down_sampling_rate"), "{e}");
    assert_eq!(run(&rate(3.0), &tiny, 0).unwrap().width, 10);
    assert_eq!(run(&Preprocessor::Invert, &tiny, 0).unwrap().pixels[0], 250);
}

#[test]
fn a_long_thin_image_at_a_high_resolution_is_refused() {
    let p = Preprocessor::Canny {
        low_threshold: 100.0,
        high_threshold: 200.0,
        resolution: 2048,
    };
    let thin = RgbImage {
        width: 3000,
        height: 10,
        pixels: vec![0; 3000 * 10 * 3],
    };
    let e = run(&p, &thin, 1).unwrap_err();
    assert!(
        e.starts_with("[1].preprocessor.resolution: the 3000x10 image"),
        "{e}"
    );
    let small = RgbImage {
        width: 30,
        height: 20,
        pixels: vec![9; 30 * 20 * 3],
    };
    let map = run(&p, &small, 0).unwrap();
    assert_eq!((map.width, map.height), (3072, 2048));
}

#[test]
fn softedge_anyline_takes_its_own_resolution_default_and_only_multiples_of_64() {
    let anyline = |v: Value| read(Some(&v), 0, 0);
    let want = |safe_steps: f64, resolution: u32| {
        Some(Preprocessor::SoftedgeAnyline {
            safe_steps,
            resolution,
        })
    };
    assert_eq!(
        anyline(json!({"type": "softedge_anyline"})).unwrap(),
        want(2.0, 1280)
    );
    assert_eq!(
        anyline(json!({"type": "softedge_anyline", "safe_steps": 0.5, "resolution": 64})).unwrap(),
        want(0.5, 64)
    );
    for (v, needle) in [
        (
            json!({"type": "softedge_anyline", "resolution": 1000}),
            "[0].preprocessor.resolution: softedge_anyline needs a multiple of 64 (1000 is not",
        ),
        (
            json!({"type": "softedge_anyline", "resolution": 2112}),
            "[0].preprocessor.resolution: must be an integer in 64..=2048",
        ),
        (
            json!({"type": "softedge_anyline", "safe_steps": 11}),
            "[0].preprocessor.safe_steps: must be a number in 0..=10",
        ),
        (
            json!({"type": "softedge_anyline", "threshold": 1}),
            "unknown key \"threshold\"",
        ),
    ] {
        let e = anyline(v.clone()).unwrap_err();
        assert!(e.contains(needle), "{v}: {e}");
    }
    // pixel_perfect's resolution is checked at the run, before any network is asked for.
    let image = RgbImage {
        width: 8,
        height: 8,
        pixels: vec![200; 8 * 8 * 3],
    };
    let p = Preprocessor::SoftedgeAnyline {
        safe_steps: 2.0,
        resolution: 100,
    };
    let e = run(&p, &image, 1).unwrap_err();
    assert!(
        e.starts_with("[1].preprocessor.resolution: softedge_anyline needs a multiple of 64"),
        "{e}"
    );
    let d = described(&p);
    assert_eq!(
        (d.kind, d.safe_steps, d.resolution),
        (PreprocessorType::SoftedgeAnyline, Some(2.0), Some(100))
    );
}

#[test]
fn pose_json_is_the_extension_s_openpose_format() {
    let mut body = vec![None; 18];
    body[0] = Some((0.25, 0.5));
    body[17] = Some((0.75, 0.125));
    // A hand's not-found point is -1 / W, -1 / H (float32), still marked 1.
    let hand: Vec<(f32, f32)> = (0..21)
        .map(|i| {
            if i == 20 {
                (-1.0 / 64.0, -1.0 / 128.0)
            } else {
                (0.1, 0.3)
            }
        })
        .collect();
    let person = sdserve_pipeline::controlnet::preprocess::PoseJson {
        body,
        hand_left: None,
        hand_right: Some(hand),
        face: Some(vec![(0.5, 0.25)]),
    };
    let poses = sdserve_pipeline::controlnet::preprocess::Poses {
        people: vec![person],
        canvas_width: 64,
        canvas_height: 128,
    };
    let mut flat = vec![0.0; 54];
    flat[..3].copy_from_slice(&[0.25, 0.5, 1.0]);
    flat[51..].copy_from_slice(&[0.75, 0.125, 1.0]);
    let mut right: Vec<f64> = (0..20)
        .flat_map(|_| [f64::from(0.1f32), f64::from(0.3f32), 1.0])
        .collect();
    right.extend([-1.0 / 64.0, -1.0 / 128.0, 1.0]);
    assert_eq!(
        pose_json(&poses),
        json!({"people": [{"pose_keypoints_2d": flat, "face_keypoints_2d": [0.5, 0.25, 1.0],
                           "hand_left_keypoints_2d": null, "hand_right_keypoints_2d": right}],
               "animals": [], "canvas_height": 128, "canvas_width": 64})
    );
}
