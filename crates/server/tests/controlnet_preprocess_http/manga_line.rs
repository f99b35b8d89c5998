//! lineart_anime_denoise with the tiny `erika.pth` of `tools/make_manga_line_fixtures.py` in
//! ANNOTATOR_DIR (without it: `missing_networks.rs`).

use serde_json::json;

use sdserve_pipeline::controlnet::preprocess::{LoadedNetworks, Preprocessor, MANGA_LINE};

use super::common::{self, decode_png, post_json_to};
use super::{fixtures, photo};

#[test]
fn lineart_anime_denoise_runs_with_annotator_dir() {
    let annotators = fixtures().join("manga_line");
    let s = common::tiny_a_vae8_server(&[
        ("CONTROLNET_DIR", &fixtures().join("controlnet")),
        ("ANNOTATOR_DIR", &annotators),
    ]);
    let (photo, photo_b64) = photo();
    let nets = LoadedNetworks::default()
        .read(&MANGA_LINE, &annotators.join(MANGA_LINE.name))
        .unwrap();
    // /controlnet/detect (name and label are one): the map made here, at two resolutions.
    for res in [64, 96] {
        let r = post_json_to(
            s.addr,
            "/controlnet/detect",
            &json!({"controlnet_module": "lineart_anime_denoise",
                    "controlnet_input_images": [photo_b64], "controlnet_processor_res": res}),
        );
        assert_eq!(r.status, 200, "{res}: {}", r.text());
        let (w, h, px, _) = decode_png(r.json()["images"][0].as_str().unwrap());
        let want = Preprocessor::LineartAnimeDenoise { resolution: res }
            .run_with(&photo, &nets)
            .unwrap();
        assert_eq!((w, h), (want.width, want.height), "{res}");
        assert!(px == want.pixels, "{res}");
        let levels: std::collections::BTreeSet<u8> = px.iter().copied().collect();
        assert!(levels.len() >= 16, "{res}: {levels:?}");
    }
    // Native: the metadata and parameters name the module.
    let mut b = json!({"prompt": "a house by a lake", "steps": 1, "width": 256, "height": 256,
                       "seed": 11, "scheduler": "euler", "prompt_syntax": "plain"});
    let settings = json!({"type": "lineart_anime_denoise", "resolution": 64});
    b["controlnets"] = json!([{"model": "cn-a", "image": photo_b64, "preprocessor": settings}]);
    let r = s.post_json(&b);
    assert_eq!(r.status, 200, "{}", r.text());
    let j = r.json();
    assert_eq!(j["metadata"]["controlnets"][0]["preprocessor"], settings);
    let (_, _, _, text) = decode_png(j["image_base64"].as_str().unwrap());
    assert!(
        text.unwrap_or_default()
            .contains("Module: lineart_anime_denoise, Model: cn-a, Weight: 1, Processor Res: 64,"),
        "{j}"
    );
}
