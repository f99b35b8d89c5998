//! Single-file (LDM key names) conversion and the safe `.ckpt` reader, against fixtures written
//! by `tools/make_single_file.py` from the tiny-a model (diffusers 0.42.1 / torch 2.11.0).

use crate::common;

use common::ScratchDir;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use safetensors::{Dtype, SafeTensors};
use sdserve_pipeline::ckpt::{Checkpoint, Value};
use sdserve_pipeline::pipeline::{GenerationParams, StableDiffusion};
use sdserve_pipeline::single_file::{
    checked_var_builder, convert_single_file, validate_folder, validate_safetensors,
    ConvertOptions, TEXT_ENCODER_WEIGHTS, UNET_WEIGHTS, VAE_WEIGHTS,
};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}
fn sf(name: &str) -> PathBuf {
    fixtures().join("single-file").join(name)
}

/// name -> (dtype, shape, bytes)
type Tensors = BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)>;

fn read_st(path: &Path) -> Tensors {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(n, v)| (n, (v.dtype(), v.shape().to_vec(), v.data().to_vec())))
        .collect()
}

fn assert_same(got: &Tensors, want: &Tensors, what: &str) {
    let gk: Vec<_> = got.keys().collect();
    let wk: Vec<_> = want.keys().collect();
    assert_eq!(gk, wk, "{what}: key sets differ");
    for (k, (d, s, b)) in want {
        let (gd, gs, gb) = &got[k];
        assert_eq!((gd, gs), (d, s), "{what}: {k} dtype/shape");
        assert!(gb == b, "{what}: {k} bytes differ");
    }
}

const PARTS: [&str; 3] = [UNET_WEIGHTS, VAE_WEIGHTS, TEXT_ENCODER_WEIGHTS];

fn tiny_tokenizer() -> Vec<(String, Vec<u8>)> {
    let dir = fixtures().join("tiny-a/tokenizer");
    std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| {
            let p = e.unwrap().path();
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read(&p).unwrap(),
            )
        })
        .collect()
}

#[test]
fn safetensors_single_file_converts_to_the_original_tensors() {
    let tmp = ScratchDir::new("sf-st");
    let out = tmp.0.join("model");
    let tiny = fixtures().join("tiny-a");
    let opts = ConvertOptions {
        config_dir: Some(&tiny),
        tokenizer_files: &[],
    };
    let summary = convert_single_file(&sf("tiny-a.safetensors"), &out, &opts).unwrap();
    assert_eq!(summary.ignored, 0);
    for rel in PARTS {
        assert_same(&read_st(&out.join(rel)), &read_st(&tiny.join(rel)), rel);
    }
    for rel in [
        "unet/config.json",
        "vae/config.json",
        "text_encoder/config.json",
        "tokenizer/vocab.json",
    ] {
        assert_eq!(
            std::fs::read(out.join(rel)).unwrap(),
            std::fs::read(tiny.join(rel)).unwrap(),
            "{rel}"
        );
    }
    validate_folder(&out).unwrap();
    // A second conversion into an existing folder is refused by rename, not half-overwritten.
    assert!(out.join("model_index.json").is_file());
}

#[test]
fn inferred_configs_match_what_the_shapes_say() {
    let tmp = ScratchDir::new("sf-infer");
    let out = tmp.0.join("model");
    let tok = tiny_tokenizer();
    let tok_refs: Vec<(&str, &[u8])> = tok
        .iter()
        .map(|(n, b)| (n.as_str(), b.as_slice()))
        .collect();
    let opts = ConvertOptions {
        config_dir: None,
        tokenizer_files: &tok_refs,
    };
    let s = convert_single_file(&sf("tiny-a.safetensors"), &out, &opts).unwrap();
    assert!(s.inferred_configs);
    let tiny = fixtures().join("tiny-a");
    for rel in PARTS {
        assert_same(&read_st(&out.join(rel)), &read_st(&tiny.join(rel)), rel);
    }
    let json = |p: &Path| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
    };
    let checks: [(&str, &[&str]); 3] = [
        (
            "unet/config.json",
            &[
                "block_out_channels",
                "layers_per_block",
                "down_block_types",
                "up_block_types",
                "in_channels",
                "out_channels",
                "cross_attention_dim",
                "use_linear_projection",
                "mid_block_type",
            ],
        ),
        (
            "vae/config.json",
            &[
                "block_out_channels",
                "layers_per_block",
                "latent_channels",
                "in_channels",
                "out_channels",
            ],
        ),
        (
            "text_encoder/config.json",
            &[
                "hidden_size",
                "num_hidden_layers",
                "intermediate_size",
                "vocab_size",
                "max_position_embeddings",
            ],
        ),
    ];
    for (rel, keys) in checks {
        let (got, want) = (json(&out.join(rel)), json(&tiny.join(rel)));
        for k in keys {
            assert_eq!(got[*k], want[*k], "{rel}: {k}");
        }
    }
}

#[test]
fn bundled_clip_tokenizer_larger_than_the_embedding_table_is_refused() {
    let tmp = ScratchDir::new("sf-vocab");
    let dir = fixtures().join("clip-tokenizer");
    let files: Vec<(String, Vec<u8>)> = [
        "vocab.json",
        "merges.txt",
        "tokenizer_config.json",
        "special_tokens_map.json",
    ]
    .iter()
    .map(|n| (n.to_string(), std::fs::read(dir.join(n)).unwrap()))
    .collect();
    let refs: Vec<(&str, &[u8])> = files
        .iter()
        .map(|(n, b)| (n.as_str(), b.as_slice()))
        .collect();
    let out = tmp.0.join("model");
    let opts = ConvertOptions {
        config_dir: None,
        tokenizer_files: &refs,
    };
    let e = convert_single_file(&sf("tiny-a.safetensors"), &out, &opts)
        .unwrap_err()
        .to_string();
    assert!(e.contains("1002") && e.contains("49408"), "{e}");
    assert!(!out.exists(), "no half-written folder is left behind");
}

#[test]
fn torch_zip_ckpt_converts_to_the_original_tensors_in_fp16() {
    let tmp = ScratchDir::new("sf-ckpt");
    let out = tmp.0.join("model");
    let tiny = fixtures().join("tiny-a");
    let ck = Checkpoint::open(&sf("tiny-a-fp16.ckpt")).unwrap();
    assert_eq!(ck.root().get("global_step"), Some(&Value::Int(7)));
    let opts = ConvertOptions {
        config_dir: Some(&tiny),
        tokenizer_files: &[],
    };
    let s = convert_single_file(&sf("tiny-a-fp16.ckpt"), &out, &opts).unwrap();
    assert_eq!(s.tensors.iter().sum::<usize>(), 465);
    for rel in PARTS {
        let want = candle_core::safetensors::load(tiny.join(rel), &Device::Cpu).unwrap();
        let got = candle_core::safetensors::load(out.join(rel), &Device::Cpu).unwrap();
        assert_eq!(got.len(), want.len(), "{rel}");
        for (k, w) in want {
            let g = &got[&k];
            // torch's .half() and candle's f32 -> f16 both round to nearest even: exact.
            let w = if w.dtype() == DType::F32 {
                w.to_dtype(DType::F16).unwrap()
            } else {
                w
            };
            assert_eq!(g.dtype(), w.dtype(), "{k}");
            assert_eq!(g.dims(), w.dims(), "{k}");
            let diff = g
                .to_dtype(DType::F64)
                .unwrap()
                .sub(&w.to_dtype(DType::F64).unwrap())
                .unwrap();
            let max = diff
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f64>()
                .unwrap();
            assert_eq!(max, 0.0, "{rel}: {k}");
        }
    }
}

fn check_features(file: &str) {
    let ck = Checkpoint::open(&sf(file)).unwrap();
    let want = read_st(&sf("features.safetensors"));
    let got: Tensors = ck
        .state_dict()
        .unwrap()
        .into_iter()
        .map(|(n, t)| {
            let bytes = ck.read_tensor(&t).unwrap();
            (n, (t.dtype, t.shape.clone(), bytes))
        })
        .collect();
    assert_same(&got, &want, file);
    let plain: serde_json::Value =
        serde_json::from_slice(&std::fs::read(sf("features.json")).unwrap()).unwrap();
    let root = ck.root().to_json();
    for (k, v) in plain.as_object().unwrap() {
        assert_eq!(&root[k], v, "{file}: {k}");
    }
}

#[test]
fn zip_ckpt_reads_views_strides_shared_storages_and_dtypes() {
    check_features("features.ckpt");
}

#[test]
fn legacy_ckpt_reads_the_same() {
    check_features("features-legacy.ckpt");
}

#[test]
fn malicious_ckpts_are_refused_and_run_nothing() {
    // The global each pickle names, as the generator recorded it.
    let expected: serde_json::Value =
        serde_json::from_slice(&std::fs::read(sf("malicious.json")).unwrap()).unwrap();
    assert_eq!(expected.as_object().unwrap().len(), 3);
    for (file, want) in expected.as_object().unwrap() {
        let global = want["global"].as_str().unwrap();
        let marker = PathBuf::from(want["marker"].as_str().unwrap());
        let name = file.as_str();
        let _ = std::fs::remove_file(&marker);
        let path = sf(file);
        let e = Checkpoint::open(&path)
            .err()
            .expect("must be refused")
            .to_string();
        assert!(
            e.contains(&format!("`{global}`")) && e.contains("refused"),
            "{name}: {e}"
        );
        assert!(
            e.contains(&path.display().to_string()),
            "error names the file: {e}"
        );
        // The conversion entry point refuses it the same way.
        let tmp = ScratchDir::new(&format!("sf-evil-{name}"));
        let e2 =
            convert_single_file(&path, &tmp.0.join("m"), &ConvertOptions::default()).unwrap_err();
        assert!(e2.to_string().contains(global));
        assert!(!marker.exists(), "{name}: the payload ran");
    }
}

#[test]
fn validation_names_file_and_tensor() {
    let tmp = ScratchDir::new("sf-nan");
    let p = tmp.0.join("w.safetensors");
    let vals = [1.0f32, 2.0, f32::NAN, 4.0];
    let bytes: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
    let view = safetensors::tensor::TensorView::new(Dtype::F32, vec![2, 2], &bytes).unwrap();
    safetensors::serialize_to_file([("down.weight", view)], None, &p).unwrap();
    let e = validate_safetensors(&p).unwrap_err().to_string();
    assert!(
        e.contains("down.weight") && e.contains("NaN") && e.contains("w.safetensors"),
        "{e}"
    );

    // The checked VarBuilder: missing tensors and wrong shapes name the tensor and the file.
    let tiny = fixtures().join("tiny-a/vae/diffusion_pytorch_model.safetensors");
    let vb = checked_var_builder(std::slice::from_ref(&tiny), DType::F32, &Device::Cpu).unwrap();
    let dims = read_st(&tiny)["decoder.conv_out.weight"].1.clone();
    let ok = vb.get(dims.clone(), "decoder.conv_out.weight").unwrap();
    assert_eq!(ok.dims(), dims.as_slice());
    let mut wrong = dims.clone();
    wrong[1] += 1;
    let e = vb
        .get(wrong, "decoder.conv_out.weight")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("decoder.conv_out.weight")
            && e.contains(&format!("{dims:?}"))
            && e.contains("diffusion_pytorch_model"),
        "{e}"
    );
    let e = vb.get(4, "decoder.nope.bias").unwrap_err().to_string();
    assert!(
        e.contains("decoder.nope.bias") && e.contains("missing"),
        "{e}"
    );
}

#[test]
fn a_converted_single_file_generates_the_same_image() {
    let tmp = ScratchDir::new("sf-image");
    let out = tmp.0.join("model");
    let tiny = fixtures().join("tiny-a");
    let opts = ConvertOptions {
        config_dir: Some(&tiny),
        tokenizer_files: &[],
    };
    convert_single_file(&sf("tiny-a.safetensors"), &out, &opts).unwrap();
    // The first recorded request of the tiny-a image references (size, seed, prompts).
    let json = common::tiny_model_json("tiny-a");
    let (_, r) = json["images"].as_object().unwrap().iter().next().unwrap();
    let params = GenerationParams {
        // Two steps are enough to compare the two folders (speed in unoptimised test builds).
        steps: 2,
        ..common::request_params(r)
    };
    let run = |dir: &Path| {
        let sd = StableDiffusion::load(dir, &Device::Cpu, DType::F32).unwrap();
        sd.generate(&params, &mut |_| std::ops::ControlFlow::Continue(()))
            .unwrap()
            .remove(0)
    };
    let (a, b) = (run(&tiny), run(&out));
    assert_eq!((a.width, a.height), (b.width, b.height));
    assert!(
        a.pixels == b.pixels,
        "the converted model draws a different image"
    );
}
