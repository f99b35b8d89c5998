//! A1111's Extras upscale (`/sdapi/v1/extra-single-image`) against A1111's own code run with
//! Pillow (`tools/make_extras_fixtures.py`): every case pixel for pixel, and its info as A1111
//! writes it.

use crate::common;

use common::{fixture_path, read_png};
use sdserve_pipeline::upscale::{ExtrasUpscale, ImageUpscaler, UpscaleTarget};
use serde_json::Value;

fn upscaler(name: &str) -> Option<ImageUpscaler> {
    match name {
        "None" => None,
        "Lanczos" => Some(ImageUpscaler::Lanczos),
        "Nearest" => Some(ImageUpscaler::Nearest),
        other => panic!("no upscaler {other}"),
    }
}

#[test]
fn extras_upscale_matches_a1111_pixel_for_pixel() {
    let meta: Value = serde_json::from_str(
        &std::fs::read_to_string(fixture_path("extras").join("extras.json")).unwrap(),
    )
    .unwrap();
    let cases = meta["cases"].as_object().unwrap();
    assert_eq!(cases.len(), 13);
    for (label, case) in cases {
        let f = &case["fields"];
        let num = |k: &str, default: f64| f.get(k).and_then(Value::as_f64).unwrap_or(default);
        let target = if num("resize_mode", 0.0) == 1.0 {
            UpscaleTarget::To {
                width: num("upscaling_resize_w", 512.0) as u32,
                height: num("upscaling_resize_h", 512.0) as u32,
                crop: f["upscaling_crop"].as_bool().unwrap_or(true),
            }
        } else {
            UpscaleTarget::By(num("upscaling_resize", 2.0))
        };
        let spec = ExtrasUpscale {
            target,
            upscaler: upscaler(f["upscaler_1"].as_str().unwrap_or("None")),
            second: upscaler(f["upscaler_2"].as_str().unwrap_or("None"))
                .map(|u| (u, num("extras_upscaler_2_visibility", 0.0))),
        };
        let input = read_png(&format!(
            "../extras/input.{}.png",
            case["input"].as_str().unwrap()
        ));
        let want = read_png(&format!("../extras/output.{label}.png"));
        let (_, size) = spec.sizes(input.width, input.height);
        assert_eq!(size, (want.width as usize, want.height as usize), "{label}");
        let (got, info) = spec.run(&input).unwrap();
        assert_eq!(
            (got.width, got.height),
            (want.width, want.height),
            "{label}"
        );
        let off = got
            .pixels
            .iter()
            .zip(&want.pixels)
            .filter(|(a, b)| a != b)
            .count();
        if let Some(i) = got
            .pixels
            .iter()
            .zip(&want.pixels)
            .position(|(a, b)| a != b)
        {
            let px = i / 3;
            std::fs::write(format!("/tmp/extras_got_{label}.raw"), &got.pixels).unwrap();
            eprintln!(
                "{label}: first difference at x {} y {}: {} vs {}",
                px % got.width as usize,
                px / got.width as usize,
                got.pixels[i],
                want.pixels[i]
            );
        }
        assert_eq!(off, 0, "{label}: {off} bytes differ from A1111's");
        let text = info
            .iter()
            .map(|(k, v)| format!("{k}: {v}"))
            .collect::<Vec<_>>()
            .join(", ");
        assert_eq!(text, case["infotext"].as_str().unwrap(), "{label}");
    }
}
