//! Face restorer timings on the CPU: CodeFormer on one 512x512 face (A1111 restores each
//! aligned face alone), printed as a table and as JSON (the schema of the `stages` bench), to
//! set beside spandrel's (`tools/make_face_restore_fixtures.py --bench`).
//!
//! `CODEFORMER=/path/codeformer.pth cargo bench -p sdserve-pipeline --bench face_restore --
//! [--repeats 3] [--weight 0.5] [--reference ref.safetensors] [--json out.json]`
//!
//! The face is the fixtures' `tests/fixtures/codeformer/input.png` as A1111 feeds it. With
//! `--reference` (the tool's `--reference` output of spandrel on the same file), it also
//! prints how far our output is from spandrel's.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use sdserve_pipeline::face_restore::{crop_input, CodeFormer};
use sdserve_pipeline::pipeline::RgbImage;

#[path = "stages/stats.rs"]
mod stats;
use stats::{measure, report};

fn read_png(path: &Path) -> RgbImage {
    let file = std::fs::File::open(path).expect("the fixture's input.png");
    let decoder = png::Decoder::new(std::io::BufReader::new(file));
    let mut reader = decoder.read_info().expect("a PNG");
    let mut buf = vec![0; reader.output_buffer_size().expect("its size")];
    let info = reader.next_frame(&mut buf).expect("its frame");
    assert_eq!(info.color_type, png::ColorType::Rgb, "an RGB PNG");
    RgbImage {
        width: info.width,
        height: info.height,
        pixels: buf[..info.buffer_size()].to_vec(),
    }
}

fn abs_diff(a: &Tensor, b: &Tensor) -> (f32, f32) {
    let d = (a - b).and_then(|d| d.abs()).expect("same shapes");
    let max = d.max_all().and_then(|m| m.to_scalar::<f32>());
    let mean = d.mean_all().and_then(|m| m.to_scalar::<f32>());
    (max.expect("max"), mean.expect("mean"))
}

fn main() {
    let (mut repeats, mut weight, mut reference, mut json) = (3, 0.5, None, None);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().unwrap_or_else(|| panic!("{a} needs a value"));
        match a.as_str() {
            "--repeats" => repeats = value().parse().expect("--repeats N"),
            "--weight" => weight = value().parse().expect("--weight W"),
            "--reference" => reference = Some(value()),
            "--json" => json = Some(value()),
            // cargo bench passes --bench.
            _ => {}
        }
    }
    let path = std::env::var("CODEFORMER").expect("set CODEFORMER to a CodeFormer .pth");
    let threads = std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "default".into());
    let start = std::time::Instant::now();
    let model = CodeFormer::load(Path::new(&path), &Device::Cpu).expect("the model loads");
    let load_s = start.elapsed().as_secs_f64();
    eprintln!("loaded {path} in {load_s:.2} s: {model:?} (threads {threads})");
    let input = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/codeformer/input.png");
    let x = crop_input(&read_png(&input), &Device::Cpu).expect("the input");
    let stats = [measure("codeformer_512", repeats, || {
        model.forward(&x, weight).expect("forward");
    })];
    if let Some(r) = reference {
        let want = candle_core::safetensors::load(&r, &Device::Cpu).expect("the reference");
        let (out, logits) = model.forward_with_logits(&x, weight).expect("forward");
        let (max, mean) = abs_diff(&out, &want["out"].to_dtype(DType::F32).expect("f32"));
        let (lmax, _) = abs_diff(&logits, &want["logits"]);
        eprintln!("against spandrel: out max {max:.3e} mean {mean:.3e}; logits max {lmax:.3e}");
    }
    let fields = format!("\"model\":\"{path}\",\"threads\":\"{threads}\",\"load_s\":{load_s:.3}");
    report(&fields, &stats, json);
}
