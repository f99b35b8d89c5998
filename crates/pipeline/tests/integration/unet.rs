//! UNet against diffusers: the tiny fixture models' `unet.output` references
//! (written by `tools/make_tiny_models.py`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use sdserve_pipeline::error::read_json;
use sdserve_pipeline::unet::{AttentionSlicing, UNet2DConditionModel, UNetConfig};
use sdserve_pipeline::PipelineError;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn load_config(model: &str) -> UNetConfig {
    read_json(&fixtures().join(model).join("unet/config.json")).unwrap()
}

fn load_unet(model: &str, dtype: DType) -> UNet2DConditionModel {
    let weights = fixtures()
        .join(model)
        .join("unet/diffusion_pytorch_model.safetensors");
    // SAFETY: the fixture file is not modified while mapped.
    let vb =
        unsafe { VarBuilder::from_mmaped_safetensors(&[weights], dtype, &Device::Cpu) }.unwrap();
    UNet2DConditionModel::new(vb, &load_config(model)).unwrap()
}

fn refs(model: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(
        fixtures().join(format!("{model}.safetensors")),
        &Device::Cpu,
    )
    .unwrap()
}

fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Runs the fixture's UNet on its reference inputs; returns (max abs diff, max abs reference).
fn run_reference(model: &str, unet: &UNet2DConditionModel) -> (f32, f32) {
    let r = refs(model);
    let out = unet
        .forward(
            &r["unet.sample"],
            &r["unet.timesteps"],
            &r["unet.encoder_hidden_states"],
        )
        .unwrap();
    let want = &r["unet.output"];
    assert_eq!(out.dims(), want.dims());
    let out = out.to_dtype(DType::F32).unwrap();
    (max_abs(&(out - want).unwrap()), max_abs(want))
}

fn check_f32(model: &str, slicing: AttentionSlicing) {
    let mut unet = load_unet(model, DType::F32);
    unet.set_attention_slicing(slicing);
    let (diff, scale) = run_reference(model, &unet);
    eprintln!("{model} f32 {slicing:?}: max abs diff {diff:e} (output max abs {scale})");
    assert!(
        diff < 1e-4 * scale,
        "{model}: max abs diff {diff} vs diffusers"
    );
}

// tiny-a: head count given as a list ([2, 4]), 1x1-conv projections, 2 layers per block.
#[test]
fn tiny_a_matches_diffusers() {
    check_f32("tiny-a", AttentionSlicing::Auto);
}

// tiny-b: head count given as a number (8), linear projections, 3 blocks, non-square latents.
#[test]
fn tiny_b_matches_diffusers() {
    check_f32("tiny-b", AttentionSlicing::Auto);
}

#[test]
fn attention_slicing_does_not_change_the_result() {
    check_f32("tiny-a", AttentionSlicing::Heads(1));
    check_f32("tiny-b", AttentionSlicing::Off);
}

// f16 weights (GPU use later) against the f32 reference: rounding only, no overflow.
// (bf16 matmul is not available on candle's CPU backend.)
#[test]
fn f16_weights_stay_close() {
    for model in ["tiny-a", "tiny-b"] {
        let unet = load_unet(model, DType::F16);
        let (diff, scale) = run_reference(model, &unet);
        eprintln!("{model} F16: max abs diff {diff:e} (output max abs {scale})");
        assert!(
            diff.is_finite() && diff < 1e-2 * scale,
            "{model} f16: {diff}"
        );
    }
}

#[test]
fn batch_items_are_independent_and_take_their_own_timestep() {
    let unet = load_unet("tiny-b", DType::F32);
    let r = refs("tiny-b");
    let full = unet
        .forward(
            &r["unet.sample"],
            &r["unet.timesteps"],
            &r["unet.encoder_hidden_states"],
        )
        .unwrap();
    for i in 0..2 {
        let one = unet
            .forward(
                &r["unet.sample"].narrow(0, i, 1).unwrap(),
                &r["unet.timesteps"].narrow(0, i, 1).unwrap(),
                &r["unet.encoder_hidden_states"].narrow(0, i, 1).unwrap(),
            )
            .unwrap();
        let d = max_abs(&(one - full.narrow(0, i, 1).unwrap()).unwrap());
        assert!(d < 1e-4, "item {i}: {d}");
    }
}

fn weights_without(model: &str, drop: &str, reshape: Option<&str>) -> HashMap<String, Tensor> {
    let path = fixtures()
        .join(model)
        .join("unet/diffusion_pytorch_model.safetensors");
    let mut w = candle_core::safetensors::load(path, &Device::Cpu).unwrap();
    w.remove(drop);
    if let Some(name) = reshape {
        let t = &w[name];
        let n = t.elem_count();
        let bad = Tensor::zeros(n + 1, t.dtype(), &Device::Cpu).unwrap();
        w.insert(name.to_string(), bad);
    }
    w
}

#[test]
fn missing_or_misshaped_tensor_is_named_in_the_error() {
    let cfg = load_config("tiny-a");
    let name = "down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k.weight";
    let w = weights_without("tiny-a", name, None);
    let vb = VarBuilder::from_tensors(w, DType::F32, &Device::Cpu);
    let err = UNet2DConditionModel::new(vb, &cfg).unwrap_err().to_string();
    assert!(err.contains(name), "{err}");

    let name = "up_blocks.1.resnets.2.conv_shortcut.weight";
    let w = weights_without("tiny-a", "", Some(name));
    let vb = VarBuilder::from_tensors(w, DType::F32, &Device::Cpu);
    let err = UNet2DConditionModel::new(vb, &cfg).unwrap_err().to_string();
    assert!(err.contains(name), "{err}");
}

#[test]
fn unsupported_config_is_a_config_error() {
    let mut cfg = load_config("tiny-a");
    cfg.class_embed_type = Some("timestep".into());
    let vb = VarBuilder::zeros(DType::F32, &Device::Cpu);
    match UNet2DConditionModel::new(vb, &cfg) {
        Err(PipelineError::Config { message, .. }) => assert!(message.contains("class_embed_type")),
        other => panic!("expected a config error, got {other:?}"),
    }
}

#[test]
fn head_count_list_and_number_build_the_same_model() {
    // tiny-a says [2, 4]; the same numbers given as num_attention_heads must load the same
    // weights (diffusers: heads = num_attention_heads or attention_head_dim).
    let mut cfg = load_config("tiny-a");
    cfg.num_attention_heads = Some(cfg.attention_head_dim.clone());
    cfg.attention_head_dim = sdserve_pipeline::unet::PerBlock::One(1);
    let weights = fixtures().join("tiny-a/unet/diffusion_pytorch_model.safetensors");
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[weights], DType::F32, &Device::Cpu) }
        .unwrap();
    let unet = UNet2DConditionModel::new(vb.clone(), &cfg).unwrap();
    let (diff, scale) = run_reference("tiny-a", &unet);
    assert!(diff < 1e-4 * scale, "{diff}");

    // And the head count matters: one head everywhere gives a different prediction.
    cfg.num_attention_heads = Some(sdserve_pipeline::unet::PerBlock::One(1));
    let unet = UNet2DConditionModel::new(vb, &cfg).unwrap();
    let (diff, scale) = run_reference("tiny-a", &unet);
    assert!(diff > 1e-2 * scale, "{diff}");
}

/// Config variants from `tools/make_unet_fixtures.py`: `odd` (9x7 latents needing
/// `upsample_size`, scale-shift resnets, upcast + only-cross attention, per-block transformer
/// depth, padding-0 downsampling, centred input, time-embedding activations, 1x1/5x5 in/out convs)
/// and `nomid` (no mid block, `UNetRes` block names).
#[test]
fn config_variants_match_diffusers() {
    let dir = fixtures().join("unet-variants");
    for name in ["odd", "nomid"] {
        let cfg: UNetConfig = read_json(&dir.join(name).join("config.json")).unwrap();
        let weights = dir.join(name).join("diffusion_pytorch_model.safetensors");
        // SAFETY: the fixture file is not modified while mapped.
        let vb =
            unsafe { VarBuilder::from_mmaped_safetensors(&[weights], DType::F32, &Device::Cpu) }
                .unwrap();
        let unet = UNet2DConditionModel::new(vb, &cfg).unwrap();
        let r =
            candle_core::safetensors::load(dir.join(format!("{name}.safetensors")), &Device::Cpu)
                .unwrap();
        let out = unet
            .forward(&r["sample"], &r["timesteps"], &r["encoder_hidden_states"])
            .unwrap();
        assert_eq!(out.dims(), r["output"].dims());
        let diff = max_abs(&(out - &r["output"]).unwrap());
        let scale = max_abs(&r["output"]);
        eprintln!("{name}: max abs diff {diff:e} (output max abs {scale})");
        assert!(diff < 1e-4 * scale, "{name}: max abs diff {diff}");
    }
}
