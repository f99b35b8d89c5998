//! The VAE decoder against diffusers' `vae.decode(latents).sample` on the tiny models
//! (references from `tools/make_tiny_models.py`, see `tests/fixtures/README.md`).

use crate::common;

use common::max_abs_diff;

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use sdserve_pipeline::error::read_json;
use sdserve_pipeline::rng::TorchRng;
use sdserve_pipeline::vae::{AutoencoderKlDecoder, VaeConfig};

/// f32 on both sides; the differences are summation order in convolutions and attention.
const TOL: f32 = 2e-5;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn weights_path(model: &str) -> PathBuf {
    fixtures()
        .join(model)
        .join("vae/diffusion_pytorch_model.safetensors")
}

fn config(model: &str) -> VaeConfig {
    read_json(&fixtures().join(model).join("vae/config.json")).unwrap()
}

fn load(model: &str, dtype: DType) -> AutoencoderKlDecoder {
    let vb = unsafe {
        VarBuilder::from_mmaped_safetensors(&[weights_path(model)], dtype, &Device::Cpu).unwrap()
    };
    AutoencoderKlDecoder::new(vb, &config(model)).unwrap()
}

fn references(model: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(
        fixtures().join(format!("{model}.safetensors")),
        &Device::Cpu,
    )
    .unwrap()
}
fn check_model(model: &str) {
    let refs = references(model);
    let (latents, want) = (&refs["vae.latents"], &refs["vae.output"]);
    let vae = load(model, DType::F32);
    let got = vae.decode(latents).unwrap();
    let d = max_abs_diff(&got, want);
    eprintln!(
        "{model}: vae decode {:?} -> {:?}, max abs diff {d:e}",
        latents.dims(),
        got.dims()
    );
    assert!(d <= TOL, "{model}: max abs diff {d}");

    // The attention computed a few query rows at a time gives the same image.
    let sliced = load(model, DType::F32)
        .with_attention_slice(Some(7))
        .decode(latents)
        .unwrap();
    let ds = max_abs_diff(&sliced, want);
    eprintln!("{model}: sliced attention (7 rows), max abs diff {ds:e}");
    assert!(ds <= TOL, "{model}: sliced max abs diff {ds}");

    let (_, _, h, w) = latents.dims4().unwrap();
    let (_, _, oh, ow) = want.dims4().unwrap();
    assert_eq!(
        (oh / h, ow / w),
        (vae.downscale_factor(), vae.downscale_factor())
    );
    assert_eq!(vae.scaling_factor(), config(model).scaling_factor);
}

#[test]
fn tiny_a_decode_matches_diffusers() {
    check_model("tiny-a");
}

/// tiny-b: legacy `query/key/value/proj_attn` names, 3 blocks, another scaling factor.
#[test]
fn tiny_b_decode_matches_diffusers() {
    check_model("tiny-b");
    assert_eq!(load("tiny-b", DType::F32).downscale_factor(), 4);
}

/// The references' latents are `randn(..., seed 12) / scaling_factor`: our RNG reproduces them.
#[test]
fn reference_latents_come_from_torch_rng() {
    for model in ["tiny-a", "tiny-b"] {
        let refs = references(model);
        let latents = &refs["vae.latents"];
        let sf = config(model).scaling_factor;
        let ours = TorchRng::new(12)
            .randn_tensor(latents.shape(), &Device::Cpu, DType::F32)
            .unwrap();
        let ours = (ours / sf).unwrap();
        let d = max_abs_diff(&ours, latents);
        assert!(d <= 1e-4, "{model}: {d}");
    }
}

/// Old checkpoints store the legacy attention projections as 1x1 convolutions.
#[test]
fn legacy_conv_shaped_attention_weights_load() {
    let model = "tiny-b";
    let mut tensors = candle_core::safetensors::load(weights_path(model), &Device::Cpu).unwrap();
    let prefix = "decoder.mid_block.attentions.0";
    let mut reshaped = 0;
    for name in ["query", "key", "value", "proj_attn"] {
        let key = format!("{prefix}.{name}.weight");
        let w = tensors.remove(&key).unwrap();
        let (o, i) = w.dims2().unwrap();
        tensors.insert(key, w.reshape((o, i, 1, 1)).unwrap());
        reshaped += 1;
    }
    assert_eq!(reshaped, 4);
    let vb = VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
    let vae = AutoencoderKlDecoder::new(vb, &config(model)).unwrap();
    let refs = references(model);
    let d = max_abs_diff(
        &vae.decode(&refs["vae.latents"]).unwrap(),
        &refs["vae.output"],
    );
    assert!(d <= TOL, "max abs diff {d}");
}

/// A missing tensor is an error naming it, not a panic.
#[test]
fn missing_tensor_is_reported() {
    let mut tensors = candle_core::safetensors::load(weights_path("tiny-a"), &Device::Cpu).unwrap();
    tensors
        .remove("decoder.mid_block.attentions.0.to_v.bias")
        .unwrap();
    let vb = VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
    let err = AutoencoderKlDecoder::new(vb, &config("tiny-a"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("to_v.bias"), "{err}");
}

/// Half-precision weights: norms and softmax in f32, the rest in f16; close to the f32 result.
#[test]
fn f16_weights_decode_close_to_reference() {
    let refs = references("tiny-a");
    let got = load("tiny-a", DType::F16)
        .decode(&refs["vae.latents"])
        .unwrap();
    assert_eq!(got.dtype(), DType::F16);
    let d = max_abs_diff(&got, &refs["vae.output"]);
    eprintln!("tiny-a f16: max abs diff {d:e}");
    assert!(d <= 2e-2, "max abs diff {d}");
}
