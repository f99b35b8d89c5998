//! CodeFormer (`sdserve_pipeline::face_restore`) against spandrel's network
//! (`tools/make_face_restore_fixtures.py`: a random CodeFormer with a narrowed VQGAN, its
//! output on a 512x512 face at weights 0, 0.5 and 1): the sizes read from the weights, the
//! code logits and restored face within float noise of spandrel's, A1111's bytes of it, and
//! the fusion weight mattering as much as it does there.

use std::sync::OnceLock;

use crate::common;

use candle_core::{Device, Tensor};
use common::{fixture_path, max_abs_diff, read_png};
use sdserve_pipeline::face_restore::{crop_input, crop_output, CodeFormer};
use serde_json::Value;

/// Largest difference allowed from spandrel's float output (values of std 0.6 up to 9;
/// measured: 1.4e-4 at most, 3.5e-6 on average).
const TOLERANCE: f32 = 1e-3;

fn meta() -> Value {
    let text = std::fs::read_to_string(fixture_path("codeformer").join("codeformer.json"));
    serde_json::from_str(&text.unwrap()).unwrap()
}

fn reference() -> std::collections::HashMap<String, Tensor> {
    candle_core::safetensors::load(
        fixture_path("codeformer").join("codeformer.safetensors"),
        &Device::Cpu,
    )
    .unwrap()
}

fn model() -> &'static CodeFormer {
    static MODEL: OnceLock<CodeFormer> = OnceLock::new();
    MODEL.get_or_init(|| {
        CodeFormer::load(
            &fixture_path("codeformer").join("codeformer.pth"),
            &Device::Cpu,
        )
        .unwrap()
    })
}

/// The weights, each with our (face, logits); run once for the module's tests.
fn outputs() -> &'static Vec<(&'static str, Tensor, Tensor)> {
    static OUT: OnceLock<Vec<(&'static str, Tensor, Tensor)>> = OnceLock::new();
    OUT.get_or_init(|| {
        let face = read_png("../codeformer/input.png");
        let x = crop_input(&face, &Device::Cpu).unwrap();
        [(0.0, "0"), (0.5, "0_5"), (1.0, "1")]
            .into_iter()
            .map(|(w, tag)| {
                let (out, logits) = model().forward_with_logits(&x, w).unwrap();
                (tag, out, logits)
            })
            .collect()
    })
}

/// Every `stride`-th row and column of `[1, C, H, W]`, as the fixture keeps them.
fn strided(t: &Tensor, stride: usize) -> Tensor {
    let (_, _, h, w) = t.dims4().unwrap();
    let rows: Vec<u32> = (0..h).step_by(stride).map(|i| i as u32).collect();
    let cols: Vec<u32> = (0..w).step_by(stride).map(|i| i as u32).collect();
    t.index_select(&Tensor::new(rows.as_slice(), &Device::Cpu).unwrap(), 2)
        .unwrap()
        .index_select(&Tensor::new(cols.as_slice(), &Device::Cpu).unwrap(), 3)
        .unwrap()
}

fn mean_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .mean_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
fn the_loader_reads_every_size_from_the_weights() {
    let hyper = &meta()["hyper"];
    let m = model();
    let n = |k: &str| hyper[k].as_u64().unwrap() as usize;
    assert_eq!(
        (m.dim_embd, m.n_layers, m.codebook_size, m.latent_size),
        (
            n("dim_embd"),
            n("n_layers"),
            n("codebook_size"),
            n("latent_size")
        )
    );
    assert_eq!((m.emb_dim, m.nf), (n("emb_dim"), n("nf")));
    let list = |k: &str| -> Vec<usize> {
        hyper[k]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| match v {
                Value::String(s) => s.parse().unwrap(),
                v => v.as_u64().unwrap() as usize,
            })
            .collect()
    };
    assert_eq!(m.ch_mult, list("ch_mult"));
    assert_eq!(m.connect_list, list("connect_list"));
    assert_eq!(hyper["n_head"], 8);
}

#[test]
fn each_weight_is_spandrels_network() {
    let want = reference();
    let stride = meta()["stride"].as_u64().unwrap() as usize;
    for (tag, out, logits) in outputs() {
        // The logits come before the fusion: the same for every weight.
        let d = max_abs_diff(logits, &want["logits"]);
        assert!(d < 1e-4, "w{tag}: logits differ by {d}");
        let got = strided(out, stride);
        let reference = &want[&format!("out.w{tag}")];
        let (max, mean) = (
            max_abs_diff(&got, reference),
            mean_abs_diff(&got, reference),
        );
        eprintln!("w{tag}: max difference {max:.3e}, mean {mean:.3e}");
        assert!(max < TOLERANCE, "w{tag}: max difference {max}");

        // A1111's bytes: each within 1 of its (a value on a byte's edge may truncate either
        // way), nearly all equal.
        let bytes = crop_output(out).unwrap();
        let (w, h) = (bytes.width as usize, bytes.height as usize);
        let face = &want[&format!("face.w{tag}")];
        let face = face.flatten_all().unwrap().to_vec1::<u8>().unwrap();
        let (mut i, mut off) = (0, 0);
        for y in (0..h).step_by(stride) {
            for x in (0..w).step_by(stride) {
                for c in 0..3 {
                    let ours = bytes.pixels[(y * w + x) * 3 + c] as i32;
                    let d = (ours - face[i] as i32).abs();
                    assert!(d <= 1, "w{tag}: byte ({x}, {y}, {c}) differs by {d}");
                    off += (d > 0) as usize;
                    i += 1;
                }
            }
        }
        assert_eq!(i, face.len());
        assert!(off * 100 <= i, "w{tag}: {off} of {i} bytes differ");
    }
}

#[test]
fn the_fusion_weight_changes_the_face_as_in_spandrel() {
    // A fusion block wired wrong (or skipped, or its weight ignored) shows here: w 0 keeps only
    // the codes, w 1 mixes the encoder's features in at every connected size.
    let out = outputs();
    let (w0, w1) = (&out[0].1, &out[2].1);
    let spread = mean_abs_diff(w0, w1);
    let want = meta()["mean_abs_w0_minus_w1"].as_f64().unwrap() as f32;
    eprintln!("mean |w0 - w1|: ours {spread:.4}, spandrel's {want:.4}");
    assert!(spread > 0.1, "w 0 and 1 barely differ: {spread}");
    assert!(
        (spread - want).abs() < 0.01 * want,
        "{spread} against {want}"
    );
    // Each weight's face is spandrel's for that weight, not another's.
    let want = reference();
    let stride = meta()["stride"].as_u64().unwrap() as usize;
    let d01 = max_abs_diff(&strided(w0, stride), &want["out.w1"]);
    assert!(d01 > 100.0 * TOLERANCE, "w 0 against spandrel's w 1: {d01}");
}

#[test]
fn other_files_and_sizes_are_refused() {
    let err = CodeFormer::load(
        &fixture_path("esrgan").join("not-rrdbnet.pth"),
        &Device::Cpu,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("not a CodeFormer"), "{err}");
    // A 256x256 crop makes an 8x8 grid: 64 positions where the transformer has 256.
    let x = Tensor::zeros((1, 3, 256, 256), candle_core::DType::F32, &Device::Cpu).unwrap();
    let err = model().forward(&x, 0.5).unwrap_err().to_string();
    assert!(err.contains("8x8 grid"), "{err}");
}
