//! The OpenPose body module (openpose) against the extension's own annotator/openpose code
//! (`tools/make_openpose_fixtures.py`): OpenCV's rasterisers and resizes on random inputs;
//! `Body.__call__` and the detector on crafted network outputs (one or two people), keypoints
//! and subsets compared exactly and the drawn maps byte for byte; and the real body network
//! with weights from a formula both sides compute, its outputs to float noise.

use candle_core::{Device, Tensor};
use sdserve_pipeline::controlnet::preprocess::{
    body_outputs, body_pose, draw_poses, ellipse2poly, fill_circle, fill_convex_poly, network,
    outputs_to_image, resize_area_f32, resize_lanczos4_f32, resize_lanczos4_u8, BodyNetwork,
    Canvas, Include, LoadedNetworks, Maps, Person, Preprocessor, BODY_POSE,
};
use sdserve_pipeline::pipeline::RgbImage;

use super::{compare, Refs};

fn ints(v: &serde_json::Value) -> Vec<i64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_i64().unwrap())
        .collect()
}

#[test]
fn ellipse2poly_fill_convex_poly_and_circle_are_opencv_s_pixel_for_pixel() {
    let t = Refs::load("openpose/openpose-draw");
    let polys: Vec<Vec<(i64, i64)>> = t.json["polys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let (c, a) = (ints(&p["center"]), ints(&p["axes"]));
            let got = ellipse2poly(
                (c[0], c[1]),
                (a[0], a[1]),
                p["angle"].as_i64().unwrap(),
                0,
                360,
                1,
            );
            let want: Vec<(i64, i64)> = p["points"]
                .as_array()
                .unwrap()
                .iter()
                .map(|q| (q[0].as_i64().unwrap(), q[1].as_i64().unwrap()))
                .collect();
            assert_eq!(got, want, "ellipse2Poly{p}");
            got
        })
        .collect();
    assert!(polys.len() >= 90);
    let canvases = t.json["canvases"].as_array().unwrap();
    for (i, ops) in canvases.iter().enumerate() {
        let want = t.image(&format!("canvas.{i}"));
        let (w, h) = (want.width as usize, want.height as usize);
        let mut pixels = vec![0u8; w * h * 3];
        let mut canvas = Canvas {
            pixels: &mut pixels,
            width: w,
            height: h,
        };
        for op in ops.as_array().unwrap() {
            let c = ints(&op["color"]);
            let color = [c[0] as u8, c[1] as u8, c[2] as u8];
            if let Some(p) = op["poly"].as_u64() {
                fill_convex_poly(&mut canvas, &polys[p as usize], color);
            } else {
                let at = ints(&op["circle"]);
                fill_circle(
                    &mut canvas,
                    (at[0], at[1]),
                    op["radius"].as_i64().unwrap(),
                    color,
                );
            }
        }
        let got = RgbImage {
            width: w as u32,
            height: h as u32,
            pixels,
        };
        assert_eq!(compare(&got, &want, "canvas"), (0, 0), "canvas {i}: {ops}");
    }
}

#[test]
fn lanczos4_and_float_area_resizes_agree_with_opencv() {
    let t = Refs::load("openpose/openpose-draw");
    for r in t.json["resizes"].as_array().unwrap() {
        let key = r["key"].as_str().unwrap();
        let input = &t.tensors[&format!("{key}.in")];
        let (sh, sw) = input.dims2().unwrap();
        let (dh, dw) = t.tensors[&format!("{key}.out")].dims2().unwrap();
        let src = t.floats(&format!("{key}.in"));
        let want = t.floats(&format!("{key}.out"));
        let got = if r["kind"] == "area" {
            resize_area_f32(&src, sw, sh, dw, dh)
        } else {
            resize_lanczos4_f32(&src, sw, sh, dw, dh)
        };
        let worst = got
            .iter()
            .zip(&want)
            .fold(0f32, |m, (g, w)| m.max((g - w).abs()));
        println!("{key} ({}): largest difference {worst:e}", r["kind"]);
        assert!(worst <= 2e-6, "{key}: {worst}");
    }
    let src = t.image("resize_u8.in");
    let want = t.image("resize_u8.out");
    let got = resize_lanczos4_u8(&src, want.width as usize, want.height as usize);
    let (differing, max) = compare(&got, &want, "lanczos4 u8");
    println!(
        "8-bit Lanczos-4: {differing} of {} values differ, by at most {max}",
        want.pixels.len()
    );
    assert!(
        max <= 1 && differing * 100 <= want.pixels.len(),
        "{differing} by {max}"
    );
}

/// Channel-major maps of a `[c, h, w]` f32 tensor.
fn maps(t: &Tensor) -> Maps {
    let (_, h, w) = t.dims3().unwrap();
    Maps {
        width: w,
        height: h,
        data: t.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
    }
}

fn rows(t: &Tensor) -> Vec<Vec<f64>> {
    t.to_dtype(candle_core::DType::F64)
        .unwrap()
        .to_vec2::<f64>()
        .unwrap()
}

#[test]
fn crafted_outputs_give_the_extension_s_people_keypoints_and_map() {
    let t = Refs::load("openpose/openpose-crafted");
    for case in t.json["crafted"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let (h0, w0) = (
            case["height"].as_u64().unwrap() as usize,
            case["width"].as_u64().unwrap() as usize,
        );
        let scaled = ints(&case["scaled"]);
        let (h, w) = (scaled[0] as usize, scaled[1] as usize);
        let paf = outputs_to_image(
            &maps(&t.tensors[&format!("crafted.{name}.paf")]),
            w,
            h,
            w0,
            h0,
        );
        let heat = outputs_to_image(
            &maps(&t.tensors[&format!("crafted.{name}.heat")]),
            w,
            h,
            w0,
            h0,
        );
        let people = body_pose(&paf, &heat);
        let candidate = rows(&t.tensors[&format!("crafted.{name}.candidate")]);
        let subset = rows(&t.tensors[&format!("crafted.{name}.subset")]);
        assert_eq!(people.len(), subset.len(), "{name}: people");
        for (person, row) in people.iter().zip(&subset) {
            for (k, &idx) in person.keypoints.iter().zip(&row[..18]) {
                match k {
                    None => assert_eq!(idx, -1.0, "{name}"),
                    Some(p) => {
                        let c = &candidate[idx as usize];
                        assert_eq!(
                            (p.x as f64, p.y as f64, p.id as f64),
                            (c[0], c[1], c[3]),
                            "{name}"
                        );
                        assert!(
                            (p.score - c[2]).abs() < 1e-6,
                            "{name}: score {} {}",
                            p.score,
                            c[2]
                        );
                    }
                }
            }
            assert_eq!(person.total_parts, row[19], "{name}");
            assert!((person.total_score - row[18]).abs() < 1e-5, "{name}");
        }
        let parts: usize = people
            .iter()
            .map(|p| p.keypoints.iter().flatten().count())
            .sum();
        assert!(parts >= 15, "{name}: {parts} keypoints");
        // The pose JSON's keypoints: x / W and y / H of the same pixels.
        let json_people = case["pose"]["people"].as_array().unwrap();
        assert_eq!(json_people.len(), people.len());
        for (person, jp) in people.iter().zip(json_people) {
            let kp = jp["pose_keypoints_2d"].as_array().unwrap();
            for (i, k) in person.keypoints.iter().enumerate() {
                let (x, y, c) = (
                    kp[3 * i].as_f64().unwrap(),
                    kp[3 * i + 1].as_f64().unwrap(),
                    kp[3 * i + 2].as_f64().unwrap(),
                );
                match k {
                    None => assert_eq!((x, y, c), (0.0, 0.0, 0.0)),
                    // serde_json's float parsing may be a unit in the last place off.
                    Some(p) => {
                        let (wx, wy) = (p.x as f64 / w0 as f64, p.y as f64 / h0 as f64);
                        assert!(
                            (x - wx).abs() < 1e-15 && (y - wy).abs() < 1e-15 && c == 1.0,
                            "{name}"
                        );
                    }
                }
            }
        }
        let want = t.image(&format!("crafted.{name}.map"));
        // The body-only module's drawing: draw_poses with the bodies alone.
        let bodies: Vec<Person> = people
            .iter()
            .map(|body| Person {
                body: body.clone(),
                hand_left: None,
                hand_right: None,
                face: None,
            })
            .collect();
        let body_only = Include {
            body: true,
            hand: false,
            face: false,
        };
        let got = draw_poses(&bodies, w0 as u32, h0 as u32, body_only);
        let (differing, max) = compare(&got, &want, name);
        println!("crafted {name}: {} people, {parts} keypoints; map: {differing} values differ (max {max})", people.len());
        assert_eq!((differing, max), (0, 0), "{name}: the map");
    }
}

/// The fixture script's formula weights (its docstring), as a safetensors file.
pub(super) fn formula_network(t: &Refs, key: &str) -> std::path::PathBuf {
    let mut tensors = std::collections::HashMap::new();
    for (n, entry) in t.json[key].as_array().unwrap().iter().enumerate() {
        let name = entry[0].as_str().unwrap();
        let shape: Vec<usize> = entry[1]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect();
        let fan_in: usize = if name.ends_with(".bias") {
            let w = &t.json[key].as_array().unwrap()[n - 1][1];
            w.as_array().unwrap()[1..]
                .iter()
                .map(|v| v.as_u64().unwrap() as usize)
                .product()
        } else {
            shape[1..].iter().product()
        };
        let gain =
            2.0 * (6.0 / fan_in as f64).sqrt() * if name.ends_with(".bias") { 0.05 } else { 1.0 };
        let count: usize = shape.iter().product();
        let values: Vec<f32> = (0..count as u64)
            .map(|i| {
                let u = (i.wrapping_mul(2654435761).wrapping_add(97 * n as u64)) % (1u64 << 32);
                ((u as f64 / 4294967296.0 - 0.5) * gain) as f32
            })
            .collect();
        tensors.insert(
            name.to_string(),
            Tensor::from_vec(values, shape, &Device::Cpu).unwrap(),
        );
    }
    let path =
        std::env::temp_dir().join(format!("openpose-{key}-{}.safetensors", std::process::id()));
    candle_core::safetensors::save(&tensors, &path).unwrap();
    path
}

#[test]
fn the_body_network_with_formula_weights_agrees_to_float_noise() {
    let t = Refs::load("openpose/openpose-net");
    let path = formula_network(&t, "formula");
    let nets = LoadedNetworks::default().read(&BODY_POSE, &path).unwrap();
    let net = network::<BodyNetwork>(&nets, &BODY_POSE).unwrap();
    std::fs::remove_file(&path).unwrap();
    for case in t.json["net"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let padded = t.image(&format!("net.{name}.padded"));
        let (paf, heat, _, _) = body_outputs(&net, &padded).unwrap();
        for (got, key) in [(&paf, "paf"), (&heat, "heat")] {
            let want = t.floats(&format!("net.{name}.{key}"));
            assert_eq!(got.data.len(), want.len(), "{name} {key}");
            let spread = want.iter().fold(0f32, |m, v| m.max(v.abs()));
            let worst = got
                .data
                .iter()
                .zip(&want)
                .fold(0f32, |m, (g, w)| m.max((g - w).abs()));
            println!("net {name} {key}: largest difference {worst:e} (values up to {spread:e})");
            assert!(
                spread > 0.01 && worst <= spread * 1e-4,
                "{name} {key}: {worst}"
            );
        }
        // The whole module from the image: the extension found nobody on these weights, so
        // this holds the pad, the sizes and the crop (a black map of the resized image).
        assert!(case["pose"]["people"].as_array().unwrap().is_empty());
        let res = case["resolution"].as_u64().unwrap() as u32;
        let image = t.image(&format!("net.{name}.image"));
        let want = t.image(&format!("net.{name}.whole"));
        let (got, poses) = Preprocessor::Openpose { resolution: res }
            .run_with_poses(&image, &nets)
            .unwrap();
        let poses = poses.unwrap();
        let padded = t.image(&format!("net.{name}.padded"));
        assert_eq!(
            (poses.people.len(), poses.canvas_width, poses.canvas_height),
            (0, padded.width, padded.height)
        );
        assert_eq!(compare(&got, &want, name), (0, 0), "{name}: the map");
    }
    // One 512 map at the real widths (these weights have the real file's shapes), timed.
    let image = t.image("net.square.image");
    let start = std::time::Instant::now();
    let map = Preprocessor::Openpose { resolution: 512 }
        .run_with(&image, &nets)
        .unwrap();
    println!(
        "openpose at 512 ({}x{}): {:.2} s",
        map.width,
        map.height,
        start.elapsed().as_secs_f64()
    );
}
