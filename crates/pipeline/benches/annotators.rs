//! ControlNet network annotator timings on the CPU, printed as a table and as JSON (the schema
//! of the `stages` bench), to set beside the extension's own detector calls on torch
//! (tools/bench_annotators.py; both through tools/bench_compare_annotators.sh).
//!
//! `ANNOTATOR_DIR=/tmp/annotators cargo bench -p sdserve-pipeline --bench annotators --
//! [--modules mlsd,softedge_teed] [--repeats 3] [--resolution 512] [--json out.json]`
//!
//! The folder is tools/make_random_annotators.py's (every network at its real widths with random
//! weights, in the extension's subfolders, and `bench_photo.png`, the 512 x 512 image). Stages,
//! one network module each at its default settings: `<module>` is the whole map
//! (`Preprocessor::run_with`: resize with pad, the network and its steps, the crop) and
//! `<module>_net` the network alone on the padded image. Each runs once untimed first (as
//! the Python side does), then `--repeats` times.

use std::path::Path;

use candle_core::Tensor;
use sdserve_pipeline::controlnet::preprocess::{
    body_maps, body_pose, depth_anything_depth, face_peaks, hand_heatmaps, hand_inputs, hand_peaks,
    leres_depth, midas_depth, network, normal_bae_normals, resize_image_with_pad, rgb_to_grey,
    AnnotatorFile, BodyNetwork, DepthAnythingNetwork, FaceNetwork, HandNetwork, HedNetwork,
    LeresNetwork, LineartAnimeNetwork, LineartNetwork, LoadedNetworks, MangaLineNetwork,
    MidasNetwork, MlsdNetwork, NormalBaeNetwork, PidiNetwork, Preprocessor, TeedNetwork, BODY_POSE,
    DEPTH_ANYTHING, DEPTH_ANYTHING_V2, FACENET, HAND_POSE, HED, LERES, LINEART, LINEART_ANIME,
    LINEART_COARSE, MANGA_LINE, MIDAS, MLSD, NORMAL_BAE, PIDINET, TEED,
};
use sdserve_pipeline::pipeline::RgbImage;

#[path = "stages/stats.rs"]
mod stats;
use stats::{measure, report};

fn read_png(path: &Path) -> RgbImage {
    let file = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut reader = png::Decoder::new(std::io::BufReader::new(file))
        .read_info()
        .expect("a PNG");
    let mut buf = vec![0; reader.output_buffer_size().expect("its size")];
    let info = reader.next_frame(&mut buf).expect("its pixels");
    assert_eq!(info.color_type, png::ColorType::Rgb, "an RGB PNG");
    buf.truncate(info.buffer_size());
    RgbImage {
        width: info.width,
        height: info.height,
        pixels: buf,
    }
}

/// Each network module at the extension's default settings, with its file.
fn modules(resolution: u32) -> Vec<(Preprocessor, &'static AnnotatorFile)> {
    vec![
        (Preprocessor::SoftedgeHed { resolution }, &HED),
        (Preprocessor::SoftedgePidinet { resolution }, &PIDINET),
        (Preprocessor::LineartRealistic { resolution }, &LINEART),
        (Preprocessor::LineartCoarse { resolution }, &LINEART_COARSE),
        (Preprocessor::LineartAnime { resolution }, &LINEART_ANIME),
        (
            Preprocessor::LineartAnimeDenoise { resolution },
            &MANGA_LINE,
        ),
        (
            Preprocessor::SoftedgeTeed {
                safe_steps: 2.0,
                resolution,
            },
            &TEED,
        ),
        (
            Preprocessor::Mlsd {
                value_threshold: 0.1,
                distance_threshold: 0.1,
                resolution,
            },
            &MLSD,
        ),
        (
            Preprocessor::DepthAnythingV2 { resolution },
            &DEPTH_ANYTHING_V2,
        ),
        (Preprocessor::DepthAnything { resolution }, &DEPTH_ANYTHING),
        (Preprocessor::DepthMidas { resolution }, &MIDAS),
        (Preprocessor::NormalBae { resolution }, &NORMAL_BAE),
        (
            Preprocessor::DepthLeres {
                remove_near: 0.0,
                remove_background: 0.0,
                resolution,
            },
            &LERES,
        ),
    ]
}

/// The network alone on the padded image, as the module's map feeds it.
fn forward(nets: &LoadedNetworks, file: &'static AnnotatorFile, padded: &RgbImage) {
    let done = match file.name {
        n if n == HED.name => network::<HedNetwork>(nets, &HED)
            .and_then(|net| net.projections(padded))
            .map(drop),
        n if n == PIDINET.name => network::<PidiNetwork>(nets, &PIDINET)
            .and_then(|net| net.side_maps(padded))
            .map(drop),
        n if n == LINEART.name || n == LINEART_COARSE.name => {
            network::<LineartNetwork>(nets, file).and_then(|net| net.line(padded).map(drop))
        }
        n if n == LINEART_ANIME.name => network::<LineartAnimeNetwork>(nets, &LINEART_ANIME)
            .and_then(|net| net.line(padded))
            .map(drop),
        n if n == MANGA_LINE.name => network::<MangaLineNetwork>(nets, &MANGA_LINE)
            .and_then(|net| {
                let (w, h) = (padded.width as usize, padded.height as usize);
                net.line(&rgb_to_grey(padded), w, h)
            })
            .map(drop),
        n if n == TEED.name => network::<TeedNetwork>(nets, &TEED)
            .and_then(|net| net.maps(padded))
            .map(drop),
        n if n == MLSD.name => network::<MlsdNetwork>(nets, &MLSD)
            .and_then(|net| net.output(padded))
            .map(drop),
        // The detector's input steps and the model (`depth_anything_depth`), as the Python side's
        // network stage has the model alone: the input steps are a few ms of 18+ s.
        n if n == DEPTH_ANYTHING_V2.name || n == DEPTH_ANYTHING.name => {
            network::<DepthAnythingNetwork>(nets, file)
                .and_then(|net| depth_anything_depth(&net, padded))
                .map(drop)
        }
        // apply_midas's input (/ 127.5 - 1) and the model.
        n if n == MIDAS.name => network::<MidasNetwork>(nets, &MIDAS)
            .and_then(|net| midas_depth(&net, padded))
            .map(drop),
        // The detector's input (/ 255, Normalize) and the model.
        n if n == NORMAL_BAE.name => network::<NormalBaeNetwork>(nets, &NORMAL_BAE)
            .and_then(|net| normal_bae_normals(&net, padded))
            .map(drop),
        // estimateleres's input (channels reversed, ImageNet's statistics) and the model.
        n if n == LERES.name => network::<LeresNetwork>(nets, &LERES)
            .and_then(|net| leres_depth(&net, padded))
            .map(drop),
        n => panic!("no network stage for {n}"),
    };
    done.expect("forward");
}

/// A timed stage's body.
type Stage<'a> = Box<dyn Fn() + 'a>;

/// The OpenPose detectors on the whole image (`openpose_body`: `Body.__call__`, its maps and
/// people; `openpose_hand`: `Hand.__call__` with the image as the crop, its heatmaps and peaks;
/// `openpose_face`: `Face.__call__` and its peaks) and each network alone on the inputs those
/// calls feed it (`openpose_hand_net`: the four `scale_search` squares, 184 to 736).
fn openpose(dir: &Path, image: &RgbImage, wanted: &[String], repeats: usize) -> Vec<stats::Stat> {
    let mut stats = Vec::new();
    for file in [&BODY_POSE, &HAND_POSE, &FACENET] {
        let module = match file.name {
            n if n == BODY_POSE.name => "openpose_body",
            n if n == HAND_POSE.name => "openpose_hand",
            _ => "openpose_face",
        };
        let path = dir.join(file.subfolder).join(file.name);
        if (!wanted.is_empty() && !wanted.iter().any(|m| m == module)) || !path.exists() {
            continue;
        }
        let nets = LoadedNetworks::default()
            .read(file, &path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let (run, net): (Stage, Stage) = match module {
            "openpose_body" => {
                let body = network::<BodyNetwork>(&nets, &BODY_POSE).expect("body");
                let b2 = body.clone();
                let (w, h) = (image.width as usize, image.height as usize);
                // Body.__call__'s input: the image scaled to 0.5 * 368 / H, padded to 8.
                let side = |s: usize| (s * 184 / h).div_ceil(8) * 8;
                let x = Tensor::zeros(
                    (1, 3, side(h), side(w)),
                    candle_core::DType::F32,
                    &candle_core::Device::Cpu,
                )
                .expect("input");
                (
                    Box::new(move || {
                        let (paf, heat) = body_maps(&body, image).expect("maps");
                        drop(body_pose(&paf, &heat));
                    }),
                    Box::new(move || drop(b2.forward(&x).expect("forward"))),
                )
            }
            "openpose_hand" => {
                let hand = network::<HandNetwork>(&nets, &HAND_POSE).expect("hand");
                let h2 = hand.clone();
                let inputs = hand_inputs(image).expect("inputs");
                (
                    Box::new(move || {
                        let f = |x: &Tensor| hand.0.forward(x);
                        let avg = hand_heatmaps(&f, image).expect("heatmaps");
                        drop(hand_peaks(
                            &avg,
                            image.width as usize,
                            image.height as usize,
                        ));
                    }),
                    Box::new(move || {
                        for (x, _, _) in &inputs {
                            drop(h2.0.forward(x).expect("forward"));
                        }
                    }),
                )
            }
            _ => {
                let face = network::<FaceNetwork>(&nets, &FACENET).expect("face");
                let f2 = face.clone();
                // Face.__call__'s input: the crop resized to 384 x 384.
                let x = Tensor::zeros(
                    (1, 3, 384, 384),
                    candle_core::DType::F32,
                    &candle_core::Device::Cpu,
                )
                .expect("input");
                (
                    Box::new(move || {
                        let f = |x: &Tensor| face.0.forward(x);
                        drop(face_peaks(&f, image).expect("peaks"));
                    }),
                    Box::new(move || drop(f2.0.forward(&x).expect("forward"))),
                )
            }
        };
        run();
        stats.push(measure(module, repeats, &run));
        net();
        stats.push(measure(&format!("{module}_net"), repeats, &net));
    }
    stats
}

fn main() {
    let (mut wanted, mut repeats, mut resolution, mut json) = (Vec::new(), 3, 512, None);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().unwrap_or_else(|| panic!("{a} needs a value"));
        match a.as_str() {
            "--modules" => {
                wanted = value()
                    .split(',')
                    .filter(|m| !m.is_empty())
                    .map(String::from)
                    .collect()
            }
            "--repeats" => repeats = value().parse().expect("--repeats N"),
            "--resolution" => resolution = value().parse().expect("--resolution N"),
            "--json" => json = Some(value()),
            // cargo bench passes --bench.
            _ => {}
        }
    }
    let dir = std::env::var("ANNOTATOR_DIR")
        .expect("set ANNOTATOR_DIR to tools/make_random_annotators.py's folder");
    let dir = Path::new(&dir);
    let threads = std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "default".into());
    let image = read_png(&dir.join("bench_photo.png"));
    let mut stats = Vec::new();
    for (module, file) in modules(resolution) {
        if !wanted.is_empty() && !wanted.iter().any(|m| m == module.module()) {
            continue;
        }
        let path = dir.join(file.subfolder).join(file.name);
        // The Depth Anything files are only there when their packages were given.
        if !path.exists() {
            eprintln!("{}: no {}, skipped", module.module(), path.display());
            continue;
        }
        let start = std::time::Instant::now();
        let nets = LoadedNetworks::default()
            .read(file, &path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        eprintln!(
            "{}: {} read in {:.2} s (threads {threads})",
            module.module(),
            path.display(),
            start.elapsed().as_secs_f64()
        );
        let run = || drop(module.run_with(&image, &nets).expect("the map"));
        run();
        stats.push(measure(module.module(), repeats, run));
        let padded = resize_image_with_pad(&image, resolution).image;
        let net = || forward(&nets, file, &padded);
        net();
        stats.push(measure(&format!("{}_net", module.module()), repeats, net));
    }
    stats.extend(openpose(dir, &image, &wanted, repeats));
    let fields = format!(
        "\"annotators\":\"{}\",\"threads\":\"{threads}\"",
        dir.display()
    );
    report(&fields, &stats, json);
}
