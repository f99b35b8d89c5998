//! Upscaler network timings on the CPU (any file `upscaler::Network` reads: ESRGAN, Real-ESRGAN
//! Compact, SwinIR), printed as a table and as JSON (the schema of the `stages` bench), to set beside
//! spandrel's (tools/bench_esrgan.py; both through
//! tools/bench_compare_upscaler.sh).
//!
//! `ESRGAN=/path/4x.pth cargo bench -p sdserve-pipeline --bench upscaler -- [--tiles 64,192]
//! [--image-sizes 512] [--repeats 3] [--json out.json]`
//!
//! Stages: one forward pass of the network on a square tile of each `--tiles` side
//! (`esrgan_tile_N`; A1111 upscales in 192 px tiles, one at a time), and, at each
//! `--image-sizes` side, A1111's whole upscale of a picture by the model's factor
//! (`esrgan_upscale_N`: its tiles with their overlap, then the blend, or for a SwinIR its
//! averaged tiles; ours only). The pictures
//! are synthetic (the same formula as tools/bench_esrgan.py).

use candle_core::{DType, Device, Tensor};
use sdserve_pipeline::pipeline::RgbImage;
use sdserve_pipeline::upscaler::{upscale_once_checked, Network};

#[path = "stages/stats.rs"]
mod stats;
use stats::{measure, report};

/// Value (x, y, c) of the synthetic picture of side `side`, 0..=255.
fn picture_value(x: usize, y: usize, c: usize, side: usize) -> u8 {
    ((x * 255 / side + y * 97 / side + c * 60) % 256) as u8
}

fn picture(side: usize) -> RgbImage {
    let mut pixels = Vec::with_capacity(side * side * 3);
    for y in 0..side {
        for x in 0..side {
            pixels.extend((0..3).map(|c| picture_value(x, y, c, side)));
        }
    }
    RgbImage {
        width: side as u32,
        height: side as u32,
        pixels,
    }
}

/// The picture as the network's input: `[1, 3, side, side]`, values 0..1.
fn tile(side: usize) -> Tensor {
    let mut v = Vec::with_capacity(3 * side * side);
    for c in 0..3 {
        for y in 0..side {
            for x in 0..side {
                v.push(picture_value(x, y, c, side) as f32 / 255.0);
            }
        }
    }
    Tensor::from_vec(v, (1, 3, side, side), &Device::Cpu).expect("tile")
}

fn list(s: &str) -> Vec<usize> {
    s.split(',')
        .filter(|x| !x.is_empty())
        .map(|x| x.parse().expect("a list of integers"))
        .collect()
}

fn main() {
    let (mut tiles, mut image_sizes, mut repeats, mut json) = (vec![64, 192], vec![], 3, None);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().unwrap_or_else(|| panic!("{a} needs a value"));
        match a.as_str() {
            "--tiles" => tiles = list(&value()),
            "--image-sizes" => image_sizes = list(&value()),
            "--repeats" => repeats = value().parse().expect("--repeats N"),
            "--json" => json = Some(value()),
            // cargo bench passes --bench.
            _ => {}
        }
    }
    let path = std::env::var("ESRGAN").expect("set ESRGAN to an ESRGAN model file");
    let threads = std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "default".into());
    let start = std::time::Instant::now();
    let model = Network::load(std::path::Path::new(&path), &Device::Cpu, DType::F32)
        .expect("the model loads");
    let load_s = start.elapsed().as_secs_f64();
    eprintln!(
        "loaded {path} in {load_s:.2} s: {} (threads {threads})",
        model.describe()
    );
    let mut stats = Vec::new();
    for side in tiles {
        let x = tile(side);
        stats.push(measure(&format!("esrgan_tile_{side}"), repeats, || {
            model.forward(&x).expect("forward");
        }));
    }
    for side in image_sizes {
        let image = picture(side);
        stats.push(measure(&format!("esrgan_upscale_{side}"), repeats, || {
            upscale_once_checked(&model, &image, &mut || std::ops::ControlFlow::Continue(()))
                .expect("upscale");
        }));
    }
    let fields = format!("\"model\":\"{path}\",\"threads\":\"{threads}\",\"load_s\":{load_s:.3}");
    report(&fields, &stats, json);
}
