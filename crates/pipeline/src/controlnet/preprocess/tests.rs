//! `Preprocessor`: which modules build from a resolution alone, and which need a network file.

use super::*;

#[test]
fn resolution_only_builds_the_module_it_names_and_only_those_without_sliders() {
    let names = [
        "lineart_standard",
        "color",
        "softedge_hed",
        "softedge_hedsafe",
        "scribble_hed",
        "lineart_realistic",
        "lineart_coarse",
        "lineart_anime",
        "lineart_anime_denoise",
        "softedge_pidinet",
        "softedge_pidisafe",
        "scribble_pidinet",
        "depth_anything",
        "depth_anything_v2",
        "depth_midas",
        "normal_bae",
        "openpose",
        "openpose_hand",
        "openpose_face",
        "openpose_faceonly",
        "openpose_full",
    ];
    for name in names {
        let p = Preprocessor::resolution_only(name, 321).unwrap();
        assert_eq!((p.module(), p.resolution()), (name, Some(321)));
    }
    // The modules with sliders, or no resolution, are built by their dialects.
    for name in [
        "canny",
        "invert",
        "threshold",
        "scribble_xdog",
        "blur_gaussian",
        "tile_resample",
        "shuffle",
        "softedge_teed",
        "softedge_anyline",
        "mlsd",
        "normal_midas",
        "recolor_luminance",
        "recolor_intensity",
        "depth_leres",
        "none",
        "hed",
    ] {
        assert_eq!(Preprocessor::resolution_only(name, 321), None, "{name}");
    }
}

#[test]
fn run_refuses_a_network_module_naming_its_file_and_runs_a_model_free_one() {
    let image = RgbImage {
        width: 8,
        height: 8,
        pixels: vec![200; 8 * 8 * 3],
    };
    let e = Preprocessor::SoftedgePidinet { resolution: 64 }
        .run(&image)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("softedge_pidinet") && e.contains(PIDINET_FILE),
        "{e}"
    );
    let inverted = Preprocessor::Invert.run(&image).unwrap();
    assert!(inverted.pixels.iter().all(|&v| v == 55));
}
