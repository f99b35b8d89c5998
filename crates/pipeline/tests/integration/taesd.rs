//! TAESD (`sdserve_pipeline::taesd`) against diffusers' `AutoencoderTiny` on two tiny random
//! models (references from `tools/make_taesd_fixtures.py`, see `tests/fixtures/README.md`).

use crate::common;

use common::max_abs_diff;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use sdserve_pipeline::pipeline::RgbImage;
use sdserve_pipeline::taesd::Taesd;
use sdserve_pipeline::PipelineError;

/// f32 on both sides; the differences are summation order in the convolutions and `tanh`.
const TOL: f32 = 2e-5;
/// The fp16 weights and activations against the f32 reference (values span about [-1.5, 1.5]).
const TOL_F16: f32 = 3e-2;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/taesd")
}

fn references() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures().join("references.safetensors"), &Device::Cpu).unwrap()
}

fn load(name: &str, dtype: DType) -> Taesd {
    Taesd::load(&fixtures().join(name), &Device::Cpu, dtype).unwrap()
}
/// Our RGB8 images against diffusers' `[B, H, W, 3]` u8: (largest difference, differing bytes).
fn compare_images(ours: &[RgbImage], want: &Tensor) -> (u8, usize) {
    let (b, h, w, c) = want.dims4().unwrap();
    assert_eq!((ours.len(), c), (b, 3));
    let want: Vec<u8> = want.flatten_all().unwrap().to_vec1().unwrap();
    let mut worst = 0u8;
    let mut differing = 0;
    for (i, img) in ours.iter().enumerate() {
        assert_eq!((img.width as usize, img.height as usize), (w, h));
        let reference = &want[i * h * w * 3..(i + 1) * h * w * 3];
        for (a, b) in img.pixels.iter().zip(reference) {
            let d = a.abs_diff(*b);
            worst = worst.max(d);
            differing += usize::from(d > 0);
        }
    }
    (worst, differing)
}

fn check_decode(name: &str) {
    let refs = references();
    let taesd = load(name, DType::F32);
    let latents = &refs[&format!("{name}.latents")];
    let want = &refs[&format!("{name}.decoded")];
    let sf = taesd.config().scaling_factor;
    let got = taesd.decode(&(latents / sf).unwrap()).unwrap();
    let d = max_abs_diff(&got, want);
    let (_, _, h, w) = latents.dims4().unwrap();
    let (_, _, oh, ow) = got.dims4().unwrap();
    eprintln!(
        "{name}: decode {:?} -> {:?}, max abs diff {d:e}",
        latents.dims(),
        got.dims()
    );
    assert!(d <= TOL, "{name}: max abs diff {d}");
    let f = taesd.config().upscale_factor();
    assert_eq!((oh, ow), (h * f, w * f));

    // The preview: decode(latents / scaling_factor), then diffusers' postprocess, per image.
    let images = taesd.decode_preview(latents).unwrap();
    let (worst, differing) = compare_images(&images, &refs[&format!("{name}.image")]);
    eprintln!("{name}: preview images: largest difference {worst}/255, {differing} bytes differ");
    assert!(worst <= 1, "{name}: a pixel is {worst}/255 off");
}

/// taesd-a: madebyollin/taesd's shape (4 levels, relu, 2x upsampling: 8x), scaling_factor 1.
#[test]
fn taesd_a_decode_matches_diffusers() {
    check_decode("taesd-a");
    assert_eq!(load("taesd-a", DType::F32).config().upscale_factor(), 8);
}

/// taesd-b: 3 levels, silu, 3x upsampling (9x), two blocks on the first level, scaling_factor 0.5.
#[test]
fn taesd_b_decode_matches_diffusers() {
    check_decode("taesd-b");
    let b = load("taesd-b", DType::F32);
    assert_eq!(b.config().upscale_factor(), 9);
    assert_eq!(b.config().scaling_factor, 0.5);
}

#[test]
fn encode_matches_diffusers() {
    let refs = references();
    for name in ["taesd-a", "taesd-b"] {
        let taesd = load(name, DType::F32);
        assert!(taesd.has_encoder());
        let got = taesd
            .encode(&refs[&format!("{name}.encoder_input")])
            .unwrap();
        let d = max_abs_diff(&got, &refs[&format!("{name}.encoded")]);
        eprintln!("{name}: encode -> {:?}, max abs diff {d:e}", got.dims());
        assert!(d <= TOL, "{name}: max abs diff {d}");
    }
}

/// A real StableDiffusionPipeline (tiny-a, 2 steps) with taesd-a as its VAE: its final latents
/// through `decode_preview` give the pipeline's own image.
#[test]
fn preview_is_what_a_pipeline_with_taesd_returns() {
    let refs = references();
    let taesd = load("taesd-a", DType::F32);
    let images = taesd.decode_preview(&refs["pipe.latents"]).unwrap();
    let (worst, differing) = compare_images(&images, &refs["pipe.image"]);
    eprintln!(
        "pipeline {:?}: largest difference {worst}/255, {differing} bytes differ",
        refs["pipe.latents"].dims()
    );
    assert!(worst <= 1, "a pixel is {worst}/255 off");
    assert_eq!((images[0].width, images[0].height), (64, 48));
}

/// f16 picks the `.fp16` variant and stays close to the f32 reference.
#[test]
fn fp16_variant_decodes_close_to_reference() {
    let refs = references();
    let taesd = load("taesd-a", DType::F16);
    assert_eq!(taesd.dtype(), DType::F16);
    let file = taesd.files()[0]
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    assert_eq!(file, "diffusion_pytorch_model.fp16.safetensors");
    let got = taesd.decode(&refs["taesd-a.latents"]).unwrap();
    let d = max_abs_diff(&got, &refs["taesd-a.decoded"]);
    eprintln!("taesd-a f16: max abs diff {d:e}");
    assert!(d <= TOL_F16, "max abs diff {d}");
    // f32 still reads the full-precision file.
    let f32_file = load("taesd-a", DType::F32).files()[0].clone();
    assert!(f32_file.ends_with("diffusion_pytorch_model.safetensors"));
}

/// A copy of `taesd-a` in a fresh temporary folder, changed by `edit`.
fn broken_copy(case: &str, edit: impl FnOnce(&Path)) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sdserve-taesd-{}-{case}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["config.json", "diffusion_pytorch_model.safetensors"] {
        std::fs::copy(fixtures().join("taesd-a").join(f), dir.join(f)).unwrap();
    }
    edit(&dir);
    dir
}

fn load_err(dir: &Path) -> (PipelineError, String) {
    let err = Taesd::load(dir, &Device::Cpu, DType::F32).unwrap_err();
    let msg = err.to_string();
    let _ = std::fs::remove_dir_all(dir);
    (err, msg)
}

fn rewrite_weights(dir: &Path, edit: impl FnOnce(&mut HashMap<String, Tensor>)) {
    let path = dir.join("diffusion_pytorch_model.safetensors");
    let mut tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    edit(&mut tensors);
    candle_core::safetensors::save(&tensors, &path).unwrap();
}

#[test]
fn bad_folders_are_clear_errors() {
    // No folder at all: the config it looked for.
    let (err, msg) = load_err(Path::new("/nonexistent/taesd"));
    assert!(matches!(err, PipelineError::Io { .. }), "{msg}");
    assert!(msg.contains("/nonexistent/taesd/config.json"), "{msg}");

    // No weight file.
    let dir = broken_copy("noweights", |d| {
        std::fs::remove_file(d.join("diffusion_pytorch_model.safetensors")).unwrap()
    });
    let (err, msg) = load_err(&dir);
    assert!(matches!(err, PipelineError::Weights { .. }), "{msg}");
    assert!(msg.contains("diffusion_pytorch_model.safetensors"), "{msg}");

    // Not a safetensors file.
    let dir = broken_copy("garbage", |d| {
        std::fs::write(
            d.join("diffusion_pytorch_model.safetensors"),
            b"not weights",
        )
        .unwrap()
    });
    let (_, msg) = load_err(&dir);
    assert!(msg.contains("diffusion_pytorch_model.safetensors"), "{msg}");

    // A config that does not describe these weights: a shape mismatch naming the tensor.
    let dir = broken_copy("shapes", |d| {
        let cfg = std::fs::read_to_string(d.join("config.json")).unwrap();
        let cfg = cfg.replace("\"latent_channels\": 4", "\"latent_channels\": 16");
        std::fs::write(d.join("config.json"), cfg).unwrap();
    });
    let (err, msg) = load_err(&dir);
    assert!(matches!(err, PipelineError::Weights { .. }), "{msg}");
    assert!(msg.contains("decoder.layers.0.weight"), "{msg}");

    // A missing decoder tensor is named.
    let dir = broken_copy("missing", |d| {
        rewrite_weights(d, |t| {
            t.remove("decoder.layers.2.conv.4.bias").unwrap();
        })
    });
    let (err, msg) = load_err(&dir);
    assert!(matches!(err, PipelineError::Weights { .. }), "{msg}");
    assert!(msg.contains("decoder.layers.2.conv.4.bias"), "{msg}");

    // The encoder's weights (e.g. the SD VAE's) are not a TAESD decoder.
    let dir = broken_copy("novae", |d| {
        rewrite_weights(d, |t| t.retain(|k, _| !k.starts_with("decoder.")))
    });
    let (_, msg) = load_err(&dir);
    assert!(msg.contains("no TAESD decoder"), "{msg}");

    // A config diffusers cannot run names its key.
    let dir = broken_copy("config", |d| {
        let cfg = std::fs::read_to_string(d.join("config.json")).unwrap();
        let cfg = cfg.replace(
            "\"upsample_fn\": \"nearest\"",
            "\"upsample_fn\": \"bicubic\"",
        );
        std::fs::write(d.join("config.json"), cfg).unwrap();
    });
    let (err, msg) = load_err(&dir);
    assert!(matches!(err, PipelineError::Config { .. }), "{msg}");
    assert!(
        msg.contains("upsample_fn") && msg.contains("config.json"),
        "{msg}"
    );
}

/// Decoder-only weights (what a preview needs) load; encoding then says what is missing.
#[test]
fn decoder_only_weights_load() {
    let dir = broken_copy("decoder-only", |d| {
        rewrite_weights(d, |t| t.retain(|k, _| k.starts_with("decoder.")))
    });
    let taesd = Taesd::load(&dir, &Device::Cpu, DType::F32).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(!taesd.has_encoder());
    let refs = references();
    let d = max_abs_diff(
        &taesd.decode(&refs["taesd-a.latents"]).unwrap(),
        &refs["taesd-a.decoded"],
    );
    assert!(d <= TOL, "{d}");
    let err = taesd.encode(&refs["taesd-a.encoder_input"]).unwrap_err();
    assert!(err.to_string().contains("no encoder"), "{err}");
}
