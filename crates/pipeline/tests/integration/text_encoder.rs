//! CLIP text encoder on the tiny models against transformers' `CLIPTextModel`
//! (references written by `tools/make_tiny_models.py`).

use crate::common;

use common::max_abs_diff;

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use sdserve_pipeline::clip::{ClipTextConfig, ClipTextModel};
use sdserve_pipeline::tokenizer::ClipTokenizer;

/// float32 on CPU, same math as torch up to summation order.
const TOLERANCE: f32 = 2e-5;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}
fn load_model(model: &str, dtype: DType) -> ClipTextModel {
    let dir = fixtures().join(model).join("text_encoder");
    let cfg = ClipTextConfig::from_file(&dir.join("config.json")).unwrap();
    let weights =
        candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
    ClipTextModel::new(VarBuilder::from_tensors(weights, dtype, &Device::Cpu), &cfg).unwrap()
}

fn check(model: &str) {
    let refs = candle_core::safetensors::load(
        fixtures().join(format!("{model}.safetensors")),
        &Device::Cpu,
    )
    .unwrap();
    let prompt = reference_prompt(model);
    let want = &refs["text.embeddings"];

    // Our own tokenizer's ids, end to end (the tokenizer test checks they equal the reference's).
    let tok = ClipTokenizer::from_dir(&fixtures().join(model).join("tokenizer")).unwrap();
    let ids = Tensor::new(tok.encode(&prompt).unwrap(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let ref_ids = refs["text.input_ids"].to_dtype(DType::U32).unwrap();

    let enc = load_model(model, DType::F32);
    let got = enc.forward(&ids).unwrap();
    let d = max_abs_diff(&got, want);
    eprintln!("{model}: text embeddings max abs diff {d:e}");
    assert!(d < TOLERANCE, "{model}: max abs diff {d}");
    assert!(max_abs_diff(&enc.forward(&ref_ids).unwrap(), want) < TOLERANCE);

    // A batch of two gives each row its own result.
    let batch = Tensor::cat(&[&ids, &ids], 0).unwrap();
    let got2 = enc.forward(&batch).unwrap();
    assert!(max_abs_diff(&got2.narrow(0, 1, 1).unwrap(), want) < TOLERANCE);
}

#[test]
fn tiny_a_text_embeddings_match_transformers() {
    // text_model.* keys + position_ids, quick_gelu, 2 layers.
    check("tiny-a");
}

#[test]
fn tiny_b_text_embeddings_match_transformers() {
    // Unprefixed keys, exact gelu, 3 layers, truncated prompt.
    check("tiny-b");
}

#[test]
fn half_precision_weights_run_close_to_reference() {
    let refs = candle_core::safetensors::load(fixtures().join("tiny-a.safetensors"), &Device::Cpu)
        .unwrap();
    let ids = refs["text.input_ids"].to_dtype(DType::U32).unwrap();
    for dtype in [DType::F16, DType::BF16] {
        let got = load_model("tiny-a", dtype).forward(&ids).unwrap();
        assert_eq!(got.dtype(), dtype);
        let d = max_abs_diff(&got.to_dtype(DType::F32).unwrap(), &refs["text.embeddings"]);
        eprintln!("tiny-a {dtype:?}: max abs diff {d:e}");
        assert!(d.is_finite() && d < 0.1, "{dtype:?}: max abs diff {d}");
    }
}

/// `text.prompt` from `tiny-X.json`.
fn reference_prompt(model: &str) -> String {
    common::tiny_model_json(model)["text"]["prompt"]
        .as_str()
        .unwrap()
        .to_owned()
}
