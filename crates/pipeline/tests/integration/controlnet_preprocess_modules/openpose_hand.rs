//! The OpenPose hand and face modules (openpose_hand, openpose_face, openpose_faceonly,
//! openpose_full) against the extension's own annotator/openpose code
//! (`tools/make_openpose_hand_fixtures.py`): `draw_handpose`, `draw_facepose` and 2-pixel
//! `cv2.line`s on random inputs, byte for byte; the whole detector with crafted body, hand and
//! face outputs (keypoints and pose JSON exactly, the maps byte for byte); `Hand.__call__`'s
//! heatmaps of a photo crop through a network that is a formula of its input; and the two
//! networks at their real widths with formula weights, to float noise.

use candle_core::{Device, Tensor};
use sdserve_pipeline::controlnet::preprocess::{
    body_pose, detect_people, draw_facepose, draw_handpose, draw_poses, face_box, hand_boxes,
    hand_heatmaps, hand_peaks, network, outputs_to_image, poses_json, thick_line, Canvas,
    CpmNetwork, FaceNetwork, HandNetwork, Include, LoadedNetworks, Maps, Outputs, Preprocessor,
    FACENET, HAND_POSE,
};
use sdserve_pipeline::pipeline::RgbImage;
use sdserve_pipeline::Result;

use super::openpose::formula_network;
use super::{compare, Refs};

fn floats(v: &serde_json::Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

fn points(v: &serde_json::Value) -> Vec<(f32, f32)> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let p = floats(p);
            (p[0] as f32, p[1] as f32)
        })
        .collect()
}

#[test]
fn hands_faces_and_thick_lines_are_drawn_as_opencv_draws_them() {
    let t = Refs::load("openpose/openpose-hand-draw");
    let canvases = t.json["canvases"].as_array().unwrap();
    assert!(canvases.len() >= 10);
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
            if op.get("hand").is_some() {
                draw_handpose(&mut canvas, &points(&op["hand"]));
            } else if op.get("face").is_some() {
                draw_facepose(&mut canvas, &points(&op["face"]));
            } else {
                let ends = op["line"].as_array().unwrap();
                let end = |k: usize| {
                    let p = floats(&ends[k]);
                    (p[0] as i64, p[1] as i64)
                };
                let c = floats(&op["color"]);
                let color = [c[0] as u8, c[1] as u8, c[2] as u8];
                thick_line(&mut canvas, end(0), end(1), 2, color);
            }
        }
        let got = RgbImage {
            width: w as u32,
            height: h as u32,
            pixels,
        };
        assert_eq!(compare(&got, &want, "canvas"), (0, 0), "canvas {i}");
    }
}

fn maps(t: &Tensor) -> Maps {
    let (_, h, w) = t.dims3().unwrap();
    Maps {
        width: w,
        height: h,
        data: t.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
    }
}

/// The script's `blobs`: a Gaussian per spec `(fx, fy, amplitude, sigma)` on a `gw` x `gh`
/// grid (`second`: another blob on channel 1, the larger of the two kept), the last channel
/// `background` (b0, b1): b0 - b1 (x + y).
fn blobs(
    gh: usize,
    gw: usize,
    specs: &[Vec<f64>],
    background: &[f64],
    second: Option<&[f64]>,
) -> Tensor {
    let blob = |s: &[f64], x: usize, y: usize| {
        let (dx, dy) = (x as f64 - s[0] * gw as f64, y as f64 - s[1] * gh as f64);
        s[2] * (-(dx * dx + dy * dy) / (2.0 * s[3] * s[3])).exp()
    };
    let mut out = Vec::new();
    for (c, s) in specs.iter().enumerate() {
        for y in 0..gh {
            for x in 0..gw {
                let mut v = blob(s, x, y);
                if let (1, Some(s2)) = (c, second) {
                    v = v.max(blob(s2, x, y));
                }
                out.push(v as f32);
            }
        }
    }
    for y in 0..gh {
        for x in 0..gw {
            out.push((background[0] - background[1] * (x + y) as f64) as f32);
        }
    }
    Tensor::from_vec(out, (1, specs.len() + 1, gh, gw), &Device::Cpu).unwrap()
}

fn specs(v: &serde_json::Value) -> Vec<Vec<f64>> {
    v.as_array().unwrap().iter().map(floats).collect()
}

#[test]
fn crafted_networks_give_the_extension_s_hands_faces_maps_and_pose_json() {
    let t = Refs::load("openpose/openpose-hand-crafted");
    let body = Refs::load("openpose/openpose-crafted");
    let hand_specs = specs(&t.json["hand_blobs"]["parts"]);
    let second = floats(&t.json["hand_blobs"]["second"]);
    let face_specs = specs(&t.json["face_blobs"]["parts"]);
    let face_background = floats(&t.json["face_blobs"]["background"]);
    // Sigmas in grid widths for the hands, in cells for the face.
    let hand = |x: &Tensor| -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let (gh, gw) = (h / 8, w / 8);
        let scaled = |s: &[f64]| vec![s[0], s[1], s[2], s[3] * gw as f64];
        let parts: Vec<Vec<f64>> = hand_specs.iter().map(|s| scaled(s)).collect();
        Ok(blobs(gh, gw, &parts, &[0.0, 0.0], Some(&scaled(&second))))
    };
    let face = |x: &Tensor| -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        Ok(blobs(h / 8, w / 8, &face_specs, &face_background, None))
    };
    let mut hands_found = 0;
    for case in t.json["crafted"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let (h0, w0) = (
            case["height"].as_u64().unwrap() as usize,
            case["width"].as_u64().unwrap() as usize,
        );
        let scaled = floats(&case["scaled"]);
        let (h, w) = (scaled[0] as usize, scaled[1] as usize);
        let out = |key: &str| {
            outputs_to_image(
                &maps(&body.tensors[&format!("crafted.{name}.{key}")]),
                w,
                h,
                w0,
                h0,
            )
        };
        let bodies = body_pose(&out("paf"), &out("heat"));
        let black = RgbImage {
            width: w0 as u32,
            height: h0 as u32,
            pixels: vec![0; w0 * h0 * 3],
        };
        for run in case["runs"].as_array().unwrap() {
            let module = run["module"].as_str().unwrap();
            let include = match module {
                "openpose_hand" => Include {
                    body: true,
                    hand: true,
                    face: false,
                },
                "openpose_face" => Include {
                    body: true,
                    hand: false,
                    face: true,
                },
                "openpose_faceonly" => Include {
                    body: false,
                    hand: false,
                    face: true,
                },
                "openpose_full" => Include {
                    body: true,
                    hand: true,
                    face: true,
                },
                m => panic!("{m}"),
            };
            let people = detect_people(
                &black,
                bodies.clone(),
                include.hand.then_some(&hand as Outputs),
                include.face.then_some(&face as Outputs),
            )
            .unwrap();
            let label = format!("{name} {module}");
            let poses = poses_json(&people, w0 as u32, h0 as u32);
            let want_people = run["pose"]["people"].as_array().unwrap();
            assert_eq!(poses.people.len(), want_people.len(), "{label}");
            for (got, want) in poses.people.iter().zip(want_people) {
                for (key, got) in [
                    ("hand_left_keypoints_2d", &got.hand_left),
                    ("hand_right_keypoints_2d", &got.hand_right),
                    ("face_keypoints_2d", &got.face),
                ] {
                    match (got, want[key].as_array()) {
                        (None, None) => {}
                        (Some(got), Some(_)) => {
                            // float32 values (serde_json's parse may be a unit in the
                            // last place of the f64 off: compared as the f32s they are).
                            let want: Vec<f32> =
                                floats(&want[key]).iter().map(|&v| v as f32).collect();
                            let got: Vec<f32> =
                                got.iter().flat_map(|&(x, y)| [x, y, 1.0]).collect();
                            assert_eq!(got, want, "{label} {key}");
                            hands_found += usize::from(key.starts_with("hand"));
                        }
                        (g, w) => panic!("{label} {key}: {g:?} against {w:?}"),
                    }
                }
            }
            let want = t.image(&format!("crafted.{name}.{module}"));
            let got = draw_poses(&people, w0 as u32, h0 as u32, include);
            let (differing, max) = compare(&got, &want, &label);
            println!("crafted {label}: map {differing} values differ (max {max})");
            assert_eq!((differing, max), (0, 0), "{label}: the map");
        }
    }
    assert!(hands_found >= 4, "{hands_found} hands");
}

#[test]
fn hand_heatmaps_of_a_photo_follow_the_extension_s_blur_resizes_and_crops() {
    let t = Refs::load("openpose/openpose-hand-crafted");
    let mix = specs(&t.json["pool"]["mix"]);
    // The script's PoolMix: 8 x 8 means of the (BGR) input planes, mixed per part.
    let pool = |x: &Tensor| -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let v = x.flatten_all()?.to_vec1::<f32>()?;
        let (gh, gw) = (h / 8, w / 8);
        let mut means = vec![0f32; 3 * gh * gw];
        for k in 0..3 {
            for gy in 0..gh {
                for gx in 0..gw {
                    let mut s = 0f32;
                    for y in gy * 8..gy * 8 + 8 {
                        for x in gx * 8..gx * 8 + 8 {
                            s += v[k * h * w + y * w + x];
                        }
                    }
                    means[k * gh * gw + gy * gw + gx] = s / 64.0;
                }
            }
        }
        let mut out = Vec::new();
        for m in &mix {
            for i in 0..gh * gw {
                out.push((0..3).fold(0f32, |a, k| a + m[k] as f32 * means[k * gh * gw + i]));
            }
        }
        Ok(Tensor::from_vec(out, (1, mix.len(), gh, gw), &Device::Cpu)?)
    };
    let image = t.image("pool.image");
    let avg = hand_heatmaps(&pool, &image).unwrap();
    let want = t.floats("pool.heatmaps");
    let spread = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    let worst = avg
        .iter()
        .zip(&want)
        .fold(0f64, |m, (g, w)| m.max((g - f64::from(*w)).abs()));
    println!("pool heatmaps: largest difference {worst:e} (values up to {spread:e})");
    assert!(spread > 0.05 && worst < 1e-5, "{worst}");
    let peaks = hand_peaks(&avg, image.width as usize, image.height as usize);
    let want: Vec<(i64, i64)> = t.json["pool"]["peaks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p[0].as_i64().unwrap(), p[1].as_i64().unwrap()))
        .collect();
    assert_eq!(peaks, want);
}

#[test]
fn the_hand_and_face_networks_with_formula_weights_agree_to_float_noise() {
    let t = Refs::load("openpose/openpose-hand-net");
    for (name, file) in [("hand", &HAND_POSE), ("face", &FACENET)] {
        let path = formula_network(&t, &format!("{name}_formula"));
        let nets = LoadedNetworks::default().read(file, &path).unwrap();
        std::fs::remove_file(&path).unwrap();
        let input = t.tensors[&format!("{name}.input")].unsqueeze(0).unwrap();
        let out = if name == "hand" {
            network::<HandNetwork>(&nets, file)
                .unwrap()
                .0
                .forward(&input)
        } else {
            network::<FaceNetwork>(&nets, file)
                .unwrap()
                .0
                .forward(&input)
        }
        .unwrap();
        let got = out.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let want = t.floats(&format!("{name}.output"));
        assert_eq!(got.len(), want.len(), "{name}");
        let spread = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        let worst = got
            .iter()
            .zip(&want)
            .fold(0f32, |m, (g, w)| m.max((g - w).abs()));
        println!("net {name}: largest difference {worst:e} (values up to {spread:e})");
        assert!(spread > 0.01 && worst <= spread * 1e-4, "{name}: {worst}");
    }
}

/// One openpose_full map of a 512 image at the real widths (the formula weights have the
/// real files' shapes), timed: the module (bodies: none on these weights), then what each
/// person found adds, two hands (four passes each, 184 to 736) and a face (384).
#[test]
#[ignore = "minutes on a CPU: run by hand to time"]
fn openpose_full_at_512_timed() {
    let body_refs = Refs::load("openpose/openpose-net");
    let t = Refs::load("openpose/openpose-hand-net");
    let mut nets = LoadedNetworks::default();
    for (key, file, refs) in [
        (
            "formula",
            &sdserve_pipeline::controlnet::preprocess::BODY_POSE,
            &body_refs,
        ),
        ("hand_formula", &HAND_POSE, &t),
        ("face_formula", &FACENET, &t),
    ] {
        let path = formula_network(refs, key);
        nets = nets.read(file, &path).unwrap();
        std::fs::remove_file(&path).unwrap();
    }
    let image = body_refs.image("net.square.image");
    let start = std::time::Instant::now();
    Preprocessor::OpenposeFull { resolution: 512 }
        .run_with(&image, &nets)
        .unwrap();
    let module = start.elapsed().as_secs_f64();
    let hand: std::sync::Arc<HandNetwork> = network(&nets, &HAND_POSE).unwrap();
    let face: std::sync::Arc<FaceNetwork> = network(&nets, &FACENET).unwrap();
    let (hand, face): (&CpmNetwork, &CpmNetwork) = (&hand.0, &face.0);
    let h = |x: &Tensor| hand.forward(x);
    let f = |x: &Tensor| face.forward(x);
    let crop = body_refs.image("net.small.image");
    let start = std::time::Instant::now();
    hand_heatmaps(&h, &crop).unwrap();
    let one_hand = start.elapsed().as_secs_f64();
    let start = std::time::Instant::now();
    sdserve_pipeline::controlnet::preprocess::face_peaks(&f, &crop).unwrap();
    let one_face = start.elapsed().as_secs_f64();
    println!(
        "openpose_full at 512: module {module:.2} s (no people), one hand {one_hand:.2} s, one face {one_face:.2} s: a person with both hands and a face {:.2} s",
        module + 2.0 * one_hand + one_face
    );
}

#[test]
fn hand_and_face_boxes_are_handdetect_s_and_facedetect_s() {
    let t = Refs::load("openpose/openpose-hand-crafted");
    let cases = t.json["boxes"].as_array().unwrap();
    let (mut hands, mut faces) = (0, 0);
    for (i, case) in cases.iter().enumerate() {
        let (w, h) = (
            case["width"].as_u64().unwrap() as usize,
            case["height"].as_u64().unwrap() as usize,
        );
        let keypoints: Vec<Option<(f64, f64)>> = case["keypoints"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| {
                k.as_array()
                    .map(|p| (p[0].as_f64().unwrap(), p[1].as_f64().unwrap()))
            })
            .collect();
        let want: Vec<(usize, usize, usize, bool)> = case["hands"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| {
                let n = |k: usize| b[k].as_u64().unwrap() as usize;
                (n(0), n(1), n(2), b[3].as_bool().unwrap())
            })
            .collect();
        let got: Vec<(usize, usize, usize, bool)> = hand_boxes(&keypoints, w, h)
            .iter()
            .map(|b| (b.x, b.y, b.side, b.left))
            .collect();
        assert_eq!(got, want, "case {i}: hands");
        hands += got.len();
        let want = case["face"].as_array().map(|b| {
            let n = |k: usize| b[k].as_u64().unwrap() as usize;
            (n(0), n(1), n(2))
        });
        assert_eq!(face_box(&keypoints, w, h), want, "case {i}: face");
        faces += usize::from(want.is_some());
    }
    println!(
        "boxes: {hands} hands, {faces} faces in {} bodies",
        cases.len()
    );
    assert!(hands >= 40 && faces >= 30);
}
