//! Start-up memory of the real binary: `sdserve serve` loads a model of a few hundred MB made
//! here (tiny-b with a widened text encoder and random weights), answers one request, and its
//! peak resident set through all of that (VmHWM from /proc) must stay under the weights plus
//! [`MARGIN_MB`]. Holding a second copy of the weights at any moment (mapped file pages beside
//! the loaded tensors, as the loader did before, or every transposed linear beside its original)
//! is a few hundred MB over the bound.

use crate::common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use common::Server;
use serde_json::{json, Value};

/// What the process may hold besides the weights: the binary, the runtime, the tokenizer,
/// allocator slack, one weight tensor in flight, and a 256x256 request's activations.
const MARGIN_MB: u64 = 150;

fn tiny_b() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../pipeline/tests/fixtures/tiny-b"
    ))
}

fn edit_json(path: &Path, edit: impl FnOnce(&mut serde_json::Map<String, Value>)) -> Value {
    let mut v: Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    edit(v.as_object_mut().unwrap());
    std::fs::write(path, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
    v
}

/// Writes the weights the model code asks for (names and shapes from the code itself), random.
fn random_weights(path: &Path, build: impl FnOnce(VarBuilder) -> sdserve_pipeline::Result<()>) {
    let vm = VarMap::new();
    build(VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
    for var in vm.all_vars() {
        let t = Tensor::randn(0f32, 0.05, var.shape(), &Device::Cpu).unwrap();
        var.set(&t).unwrap();
    }
    vm.save(path).unwrap();
}

/// tiny-b with a CLIP text encoder of hidden size 1024 (8 layers, ~400 MB) and the UNet's
/// cross-attention widened to match; the UNet and VAE stay small, so a 256x256 step is cheap.
fn make_model(dir: &Path) -> u64 {
    use sdserve_pipeline::clip::{ClipTextConfig, ClipTextModel};
    use sdserve_pipeline::unet::{UNet2DConditionModel, UNetConfig};
    let _ = std::fs::remove_dir_all(dir);
    common::copy_tree(&tiny_b(), dir);
    let te = edit_json(&dir.join("text_encoder/config.json"), |c| {
        c.insert("hidden_size".into(), json!(1024));
        c.insert("intermediate_size".into(), json!(4096));
        c.insert("num_hidden_layers".into(), json!(8));
        c.insert("num_attention_heads".into(), json!(16));
        c.insert("projection_dim".into(), json!(1024));
    });
    let te: ClipTextConfig = serde_json::from_value(te).unwrap();
    random_weights(&dir.join("text_encoder/model.safetensors"), |vb| {
        ClipTextModel::new(vb, &te).map(drop)
    });
    let unet = edit_json(&dir.join("unet/config.json"), |c| {
        c.insert("cross_attention_dim".into(), json!(1024));
    });
    let unet: UNetConfig = serde_json::from_value(unet).unwrap();
    random_weights(
        &dir.join("unet/diffusion_pytorch_model.safetensors"),
        |vb| UNet2DConditionModel::new(vb, &unet).map(drop),
    );
    [
        "text_encoder/model.safetensors",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
    ]
    .iter()
    .map(|f| std::fs::metadata(dir.join(f)).unwrap().len())
    .sum()
}

fn status_kb(pid: u32, key: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
}

#[test]
#[cfg(target_os = "linux")]
fn peak_rss_through_load_and_a_request_stays_under_weights_plus_margin() {
    let root = std::env::temp_dir().join(format!("sdserve-load-memory-{}", std::process::id()));
    let model = root.join("wide-b");
    let weights = make_model(&model);
    let weights_mb = weights >> 20;
    assert!(
        weights_mb > 2 * MARGIN_MB,
        "the model must be big enough to tell: {weights_mb} MB"
    );
    let env = vec![
        ("MODEL_ID".to_string(), model.to_string_lossy().into_owned()),
        ("GENERATION_TIMEOUT_SECONDS".to_string(), "600".to_string()),
        (
            "MODEL_CACHE_DIR".to_string(),
            root.join("cache").to_string_lossy().into_owned(),
        ),
        ("RAYON_NUM_THREADS".to_string(), "2".to_string()),
    ];
    let s = Server::start(&env);
    s.wait_ready(Duration::from_secs(300));
    let after_load = status_kb(s.pid(), "VmHWM:") >> 10;
    let r = s.post_json(&json!({
        "prompt": "a lighthouse at dusk", "steps": 1, "width": 256, "height": 256, "seed": 3
    }));
    assert_eq!(r.status, 200, "{}", r.text());
    let peak = status_kb(s.pid(), "VmHWM:") >> 10;
    let rss = status_kb(s.pid(), "VmRSS:") >> 10;
    eprintln!(
        "weights {weights_mb} MB; peak RSS after load {after_load} MB, after a request {peak} MB \
         (now {rss} MB); bound {} MB",
        weights_mb + MARGIN_MB
    );
    // The weights are really resident: the loaded model is not smaller than its files.
    assert!(
        rss >= weights_mb,
        "RSS {rss} MB below the weights ({weights_mb} MB)"
    );
    assert!(
        peak <= weights_mb + MARGIN_MB,
        "peak RSS {peak} MB over the weights ({weights_mb} MB) + {MARGIN_MB} MB"
    );
    drop(s);
    let _ = std::fs::remove_dir_all(&root);
}
