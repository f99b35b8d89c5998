//! Sequential offload: the UNet's weights in host memory and its parts built on the device one at
//! a time during each forward pass. On the CPU the "device" is the CPU too, which still runs the
//! whole streaming path (host map, per-part builds, drops); the results must not change at all.

use crate::common;

use common::{generate_one, request_params, tiny_model_json};

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use sdserve_pipeline::attention::AttentionSlicing;
use sdserve_pipeline::error::read_json;
use sdserve_pipeline::memory::{MemoryPlan, Offload, VaeTiling};
use sdserve_pipeline::pipeline::{GenerationParams, StableDiffusion};
use sdserve_pipeline::unet::{StreamStats, UNet2DConditionModel, UNetConfig};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// A UNet fixture: its folder (config + weights) and its reference inputs.
struct UNetCase {
    name: &'static str,
    dir: PathBuf,
    inputs: [Tensor; 3],
}

fn unet_cases() -> Vec<UNetCase> {
    let load = |p: PathBuf| candle_core::safetensors::load(p, &Device::Cpu).unwrap();
    let mut cases = Vec::new();
    // tiny-a: 2 levels with a mid block; tiny-b: 3 levels, non-square latents.
    for name in ["tiny-a", "tiny-b"] {
        let r = load(fixtures().join(format!("{name}.safetensors")));
        cases.push(UNetCase {
            name,
            dir: fixtures().join(name).join("unet"),
            inputs: [
                r["unet.sample"].clone(),
                r["unet.timesteps"].clone(),
                r["unet.encoder_hidden_states"].clone(),
            ],
        });
    }
    // odd: 9x7 latents (upsample sizes passed down); nomid: no mid block (one part fewer).
    let variants = fixtures().join("unet-variants");
    for name in ["odd", "nomid"] {
        let r = load(variants.join(format!("{name}.safetensors")));
        cases.push(UNetCase {
            name,
            dir: variants.join(name),
            inputs: [
                r["sample"].clone(),
                r["timesteps"].clone(),
                r["encoder_hidden_states"].clone(),
            ],
        });
    }
    cases
}

fn var_builder(dir: &Path, dtype: DType) -> VarBuilder<'static> {
    let weights = dir.join("diffusion_pytorch_model.safetensors");
    // SAFETY: the fixture file is not modified while mapped.
    unsafe { VarBuilder::from_mmaped_safetensors(&[weights], dtype, &Device::Cpu) }.unwrap()
}

fn forward(unet: &UNet2DConditionModel, inputs: &[Tensor; 3]) -> Vec<f32> {
    unet.forward(&inputs[0], &inputs[1], &inputs[2])
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// Parts one forward pass runs: stem, each down block, the mid block if any, each up block, head.
fn expected_parts(config: &UNetConfig) -> usize {
    2 + 2 * config.block_out_channels.len() + usize::from(config.mid_block_type.is_some())
}

/// Max abs difference, 0 only when every element is equal (NaN counts as different).
fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| {
            if x == y {
                0.0
            } else {
                (x - y).abs().max(f32::MIN_POSITIVE)
            }
        })
        .fold(0.0, f32::max)
}

#[test]
fn streamed_unet_equals_resident_unet_and_builds_each_part_once_per_forward() {
    for case in unet_cases() {
        let config: UNetConfig = read_json(&case.dir.join("config.json")).unwrap();
        let resident =
            UNet2DConditionModel::new(var_builder(&case.dir, DType::F32), &config).unwrap();
        let streamed = UNet2DConditionModel::streamed(
            var_builder(&case.dir, DType::F32),
            &config,
            &Device::Cpu,
        )
        .unwrap();
        assert!(streamed.is_streamed() && !resident.is_streamed());
        assert_eq!(resident.stream_stats(), None);
        let parts = expected_parts(&config);
        // Nothing is built on the device before the first forward pass.
        assert_eq!(
            streamed.stream_stats(),
            Some(StreamStats {
                parts_per_forward: parts,
                forwards: 0,
                part_builds: 0,
                peak_parts_on_device: 0,
            })
        );

        let want = forward(&resident, &case.inputs);
        for pass in 1..=2 {
            let got = forward(&streamed, &case.inputs);
            let diff = max_abs_diff(&got, &want);
            assert_eq!(diff, 0.0, "{}: pass {pass}: max abs diff {diff}", case.name);
            // Every part built once per pass, and dropped before the next one was built.
            assert_eq!(
                streamed.stream_stats(),
                Some(StreamStats {
                    parts_per_forward: parts,
                    forwards: pass,
                    part_builds: pass * parts,
                    peak_parts_on_device: 1,
                }),
                "{}",
                case.name
            );
        }
        eprintln!("{}: {parts} parts per forward, identical output", case.name);
    }
}

#[test]
fn streamed_unet_keeps_attention_slicing_and_half_precision_results() {
    let case = &unet_cases()[0];
    let config: UNetConfig = read_json(&case.dir.join("config.json")).unwrap();
    for slicing in [AttentionSlicing::Off, AttentionSlicing::Heads(1)] {
        let mut resident =
            UNet2DConditionModel::new(var_builder(&case.dir, DType::F32), &config).unwrap();
        let mut streamed = UNet2DConditionModel::streamed(
            var_builder(&case.dir, DType::F32),
            &config,
            &Device::Cpu,
        )
        .unwrap();
        resident.set_attention_slicing(slicing);
        streamed.set_attention_slicing(slicing);
        let diff = max_abs_diff(
            &forward(&streamed, &case.inputs),
            &forward(&resident, &case.inputs),
        );
        assert_eq!(diff, 0.0, "{slicing:?}: max abs diff {diff}");
    }

    // f16: the host copy is converted once when streamed() reads it (half the bytes of the f32
    // copy) and computes exactly as the resident f16 model.
    let resident16 =
        UNet2DConditionModel::new(var_builder(&case.dir, DType::F16), &config).unwrap();
    let streamed16 =
        UNet2DConditionModel::streamed(var_builder(&case.dir, DType::F16), &config, &Device::Cpu)
            .unwrap();
    let streamed32 =
        UNet2DConditionModel::streamed(var_builder(&case.dir, DType::F32), &config, &Device::Cpu)
            .unwrap();
    assert_eq!(streamed16.dtype(), DType::F16);
    let (b16, b32) = (
        streamed16.host_weight_bytes().unwrap(),
        streamed32.host_weight_bytes().unwrap(),
    );
    assert!(b32 > 0 && 2 * b16 == b32, "host bytes f16 {b16}, f32 {b32}");
    let diff = max_abs_diff(
        &forward(&streamed16, &case.inputs),
        &forward(&resident16, &case.inputs),
    );
    assert_eq!(diff, 0.0, "f16: max abs diff {diff}");
}

#[test]
fn streamed_unet_checks_weights_when_built() {
    let case = &unet_cases()[0];
    let config: UNetConfig = read_json(&case.dir.join("config.json")).unwrap();
    let mut weights: HashMap<String, Tensor> = candle_core::safetensors::load(
        case.dir.join("diffusion_pytorch_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    // A tensor only an up block reads: the error comes at load time, not at the first forward.
    let name = "up_blocks.1.resnets.2.conv_shortcut.weight";
    assert!(weights.remove(name).is_some());
    let vb = VarBuilder::from_tensors(weights, DType::F32, &Device::Cpu);
    let err = UNet2DConditionModel::streamed(vb, &config, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(err.contains(name), "{err}");
}

/// The recorded Euler request of a tiny model.
fn params(name: &str) -> GenerationParams {
    request_params(&tiny_model_json(name)["images"]["euler"])
}

fn load_with(name: &str, offload: Offload) -> StableDiffusion {
    let mut plan = MemoryPlan::cpu(DType::F32);
    plan.offload = offload;
    StableDiffusion::load_with_plan(&fixtures().join(name), &Device::Cpu, DType::F32, &plan)
        .unwrap()
}

#[test]
fn sequential_offload_gives_the_same_images() {
    for name in ["tiny-a", "tiny-b"] {
        let params = params(name);
        let mut base = load_with(name, Offload::None);
        let want = generate_one(&base, &params);
        assert_eq!(base.unet_stream_stats(), None);
        assert_eq!(base.unet_host_weight_bytes(), None);

        // Loaded with the plan: one UNet forward per step (CFG is one batch of two), each
        // building every part once, one part on the device at a time.
        let seq = load_with(name, Offload::Sequential);
        assert!(seq.unet_host_weight_bytes().unwrap() > 0);
        assert_eq!(
            generate_one(&seq, &params).pixels,
            want.pixels,
            "{name}: loaded sequential"
        );
        let s = seq.unet_stream_stats().expect("streamed");
        assert_eq!(s.forwards, params.steps, "{name}");
        assert_eq!(s.part_builds, params.steps * s.parts_per_forward, "{name}");
        assert_eq!(s.peak_parts_on_device, 1, "{name}");

        // Switched at run time, and back.
        base.set_offload(Offload::Sequential).unwrap();
        assert_eq!(
            generate_one(&base, &params).pixels,
            want.pixels,
            "{name}: set sequential"
        );
        assert_eq!(base.unet_stream_stats().unwrap().forwards, params.steps);
        base.set_offload(Offload::None).unwrap();
        assert_eq!(base.unet_stream_stats(), None);
        assert_eq!(
            generate_one(&base, &params).pixels,
            want.pixels,
            "{name}: back to none"
        );
    }
}

#[test]
fn sequential_offload_with_sliced_attention_and_tiled_vae() {
    let name = "tiny-a";
    let params = params(name);
    let mut base = load_with(name, Offload::None);
    let mut seq = load_with(name, Offload::Sequential);
    let latent = params.height / base.vae_scale_factor();
    for model in [&mut base, &mut seq] {
        model.set_attention_slicing(AttentionSlicing::MaxBytes(4096));
        model.set_vae_tiling(Some(VaeTiling::new(latent / 2)));
    }
    assert_eq!(
        generate_one(&seq, &params).pixels,
        generate_one(&base, &params).pixels
    );
    assert_eq!(seq.unet_stream_stats().unwrap().forwards, params.steps);
}

/// A request whose memory plan needs another offload mode switches the loaded model (a large
/// batch to sequential offload, the next request back). The UNet's files are read for the first
/// switch to sequential offload only: every later UNet, in any mode, is built from those
/// weights in host memory. The images stay the same in every mode, and LoRAs merged into the
/// host weights are written back before a switch (the next UNet starts from the base weights).
#[test]
fn offload_switches_read_the_unet_files_once() {
    use sdserve_pipeline::lora::LoraLibrary;
    use sdserve_pipeline::pipeline::LoraWeight;
    let name = "tiny-a";
    let params = params(name);
    let with_lora = GenerationParams {
        loras: vec![LoraWeight {
            name: "soft_peft".into(),
            weight: 0.8,
        }],
        ..params.clone()
    };
    let mut model = load_with(name, Offload::None);
    model
        .set_lora_library(LoraLibrary::scan(&fixtures().join("adapters/loras")).unwrap())
        .unwrap();
    let want = generate_one(&model, &params).pixels;
    let want_lora = generate_one(&model, &with_lora).pixels;
    assert_ne!(want_lora, want);
    let unet_reads = |m: &StableDiffusion| {
        let builds = m.component_builds();
        builds.iter().find(|(n, _)| *n == "unet").unwrap().1
    };
    assert_eq!(unet_reads(&model), 1, "loaded");
    model.set_offload(Offload::Sequential).unwrap();
    assert_eq!(
        unet_reads(&model),
        2,
        "the first switch to sequential reads the files"
    );
    let modes = [
        Offload::Sequential,
        Offload::None,
        Offload::Sequential,
        Offload::Model,
        Offload::Sequential,
        Offload::Model,
        Offload::None,
    ];
    for pair in modes.windows(2) {
        // LoRAs merged in the first mode (into the host weights under sequential offload).
        assert_eq!(
            generate_one(&model, &with_lora).pixels,
            want_lora,
            "{pair:?}"
        );
        model.set_offload(pair[1]).unwrap();
        assert_eq!(generate_one(&model, &params).pixels, want, "{pair:?}");
    }
    assert_eq!(unet_reads(&model), 2, "no switch read the files again");
}
