//! LoRA (kohya and PEFT files, UNet, LoCon convolutions and text encoder, several at once) and
//! textual-inversion embeddings (A1111 `.pt`, `.safetensors`) against diffusers 0.42
//! `load_lora_weights` + `set_adapters` and `load_textual_inversion` on tiny-a
//! (references from `tools/make_adapter_fixtures.py`).

use crate::common;

use std::ops::ControlFlow;

use common::lora_reference::{assert_close, expected, generate, request, Reference};
use common::{fixture_path, max_abs_diff};

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use sdserve_pipeline::embeddings::EmbeddingLibrary;
use sdserve_pipeline::lora::{LoraFormat, LoraLibrary};
use sdserve_pipeline::pipeline::{
    Conditioning, GenerationParams, LoraWeight, PromptSyntax, StableDiffusion,
};

fn fixtures() -> PathBuf {
    fixture_path("")
}

/// tiny-a with the LoRA folder and the embeddings of `tools/make_adapter_fixtures.py`.
fn reference() -> Reference {
    let mut r = common::lora_reference::reference("loras", "adapters");
    r.model
        .set_embedding_library(
            EmbeddingLibrary::scan(&fixtures().join("adapters/embeddings")).unwrap(),
        )
        .unwrap();
    r
}

#[test]
fn library_lists_both_formats() {
    let r = reference();
    let lib = r.model.lora_library();
    let kohya = lib.get("ink_kohya").unwrap();
    assert_eq!(
        (kohya.format, kohya.rank, kohya.targets.clone()),
        (LoraFormat::Kohya, 4, vec!["unet".to_string()])
    );
    assert!(kohya.conv_layers > 0, "LoCon convolutions");
    let peft = lib.get("soft_peft").unwrap();
    assert_eq!(
        (peft.format, peft.rank, peft.targets.clone()),
        (
            LoraFormat::Peft,
            2,
            vec!["text_encoder".to_string(), "unet".to_string()]
        )
    );
    for name in ["ink_kohya", "soft_peft", "te_kohya"] {
        r.model.check_lora(name).unwrap();
    }
    let names: Vec<&str> = r
        .model
        .embedding_library()
        .list()
        .map(|e| e.name.as_str())
        .collect();
    assert_eq!(names, vec!["tinyneg", "tinystyle"]);
}

#[test]
fn lora_images_match_diffusers_and_base_weights_come_back() {
    let r = reference();
    let base = generate(&r, &request(&r, &[]));
    assert_close("base", &base, &expected(&r, "image.base"));
    for (name, loras) in r.meta["loras"].as_object().unwrap() {
        let loras: Vec<(&str, f64)> = loras
            .as_array()
            .unwrap()
            .iter()
            .map(|l| (l[0].as_str().unwrap(), l[1].as_f64().unwrap()))
            .collect();
        let got = generate(&r, &request(&r, &loras));
        assert_close(
            &format!("lora.{name}"),
            &got,
            &expected(&r, &format!("image.lora.{name}")),
        );
        // The same LoRAs again: the merged weights are reused, the image is the same.
        assert_eq!(generate(&r, &request(&r, &loras)), got, "{name} again");
    }
    // Without LoRA again: bit for bit the image before any LoRA.
    assert_eq!(generate(&r, &request(&r, &[])), base);
}

/// Offload rebuilds the modules from their files: merged LoRAs are gone with the old modules.
/// Offloaded, the LoRAs are merged into each part as it is built for its stage (model offload),
/// or into the UNet's weights in host memory (sequential offload): the images are the resident
/// model's, bit for bit, for UNet, LoCon and text-encoder layers; without LoRA the base image
/// comes back; back to resident, the LoRAs are merged again (not taken as still merged).
#[test]
fn loras_under_offload_give_the_resident_images() {
    use sdserve_pipeline::memory::Offload;
    let mut r = reference();
    let base = generate(&r, &request(&r, &[]));
    // ink_kohya: UNet with LoCon convolutions; soft_peft: UNet and text encoder; te_kohya:
    // text encoder under kohya's names.
    let loras = request(&r, &[("ink_kohya", 0.8), ("soft_peft", 0.6)]);
    let with = generate(&r, &loras);
    let te = request(&r, &[("te_kohya", 0.9)]);
    let with_te = generate(&r, &te);
    assert_ne!(with, base);
    assert_ne!(with_te, base);
    for offload in [Offload::Model, Offload::Sequential] {
        r.model.set_offload(offload).unwrap();
        for name in ["ink_kohya", "soft_peft", "te_kohya"] {
            r.model.check_lora(name).unwrap();
        }
        assert_eq!(generate(&r, &loras), with, "{offload:?}");
        assert_eq!(
            generate(&r, &loras),
            with,
            "{offload:?}, the same LoRAs again"
        );
        assert_eq!(generate(&r, &te), with_te, "{offload:?}, text encoder only");
        assert_eq!(
            generate(&r, &request(&r, &[])),
            base,
            "{offload:?}, no LoRA"
        );
        assert_eq!(generate(&r, &loras), with, "{offload:?}, after none");
    }
    r.model.set_offload(Offload::None).unwrap();
    assert_eq!(generate(&r, &loras), with, "merged again after the rebuild");
    assert_eq!(generate(&r, &request(&r, &[])), base);

    // Offloaded before anything was built: the checks build each part once for its shapes, and
    // a file that does not fit is still refused naming the layer.
    let mut fresh = reference();
    fresh.model.set_offload(Offload::Model).unwrap();
    fresh.model.check_lora("soft_peft").unwrap();
    assert_eq!(generate(&fresh, &loras), with, "offloaded from the start");
    let mut other = StableDiffusion::load(&fixtures().join("tiny-b"), &Device::Cpu, DType::F32)
        .expect("model loads");
    other
        .set_lora_library(LoraLibrary::scan(&fixtures().join("adapters/loras")).unwrap())
        .unwrap();
    other.set_offload(Offload::Sequential).unwrap();
    let err = other.check_lora("ink_kohya").unwrap_err().to_string();
    assert!(err.contains("ink_kohya"), "{err}");
}

/// Under model offload the text encoder and the UNet are built for each run; the LoRAs' deltas
/// are computed once per set and kept between runs (bounded): a second run with the same LoRAs
/// computes nothing and gives the same image. A file replaced under the same name, or another
/// set, is computed again; past the limit, each build computes its part's deltas again, with
/// the same images.
#[test]
fn offloaded_loras_keep_their_deltas_between_runs() {
    use sdserve_pipeline::memory::Offload;
    let dir = common::ScratchDir::new("adapters-kept-deltas");
    for name in ["ink_kohya", "soft_peft"] {
        let file = format!("{name}.safetensors");
        let bytes = std::fs::read(fixtures().join("adapters/loras").join(&file)).unwrap();
        dir.put(&file, &bytes);
    }
    let mut r = reference();
    r.model
        .set_lora_library(LoraLibrary::scan(&dir.0).unwrap())
        .unwrap();
    let base = generate(&r, &request(&r, &[]));
    // ink_kohya: UNet (LoCon included); soft_peft: UNet and text encoder.
    let loras = request(&r, &[("ink_kohya", 0.8), ("soft_peft", 0.6)]);
    let with = generate(&r, &loras);
    r.model.set_offload(Offload::Model).unwrap();
    let stats = |r: &Reference| r.model.lora_delta_stats();
    let before = stats(&r);
    assert_eq!(generate(&r, &loras), with, "first run");
    let first = stats(&r);
    assert_eq!(first.sets_computed, before.sets_computed + 1);
    assert_eq!(first.builds_from_kept, before.builds_from_kept + 2);
    assert!(first.kept_bytes > 0);
    assert_eq!(generate(&r, &loras), with, "again, from the kept deltas");
    let again = stats(&r);
    assert_eq!(again.sets_computed, first.sets_computed, "nothing computed");
    assert_eq!(again.builds_from_kept, first.builds_from_kept + 2);
    assert_eq!(again.builds_recomputed, 0);

    // The same bytes written again (a newer modification time): read and computed again.
    let file = std::fs::File::options()
        .write(true)
        .open(dir.0.join("ink_kohya.safetensors"))
        .unwrap();
    file.set_modified(std::time::SystemTime::now() + std::time::Duration::from_secs(10))
        .unwrap();
    assert_eq!(generate(&r, &loras), with, "file replaced");
    assert_eq!(stats(&r).sets_computed, again.sets_computed + 1);

    // Another set evicts them.
    assert_eq!(generate(&r, &request(&r, &[])), base);
    assert_eq!(stats(&r).kept_bytes, 0);

    // Nothing may be kept: each build computes its part's deltas; the same images.
    r.model.set_lora_delta_limit(0);
    let before = stats(&r);
    for label in ["first run", "again"] {
        assert_eq!(generate(&r, &loras), with, "no limit left, {label}");
    }
    let after = stats(&r);
    assert_eq!(after.builds_recomputed, before.builds_recomputed + 4);
    assert_eq!(after.builds_from_kept, before.builds_from_kept);
    assert_eq!(after.kept_bytes, 0);
}

/// In f16 each summed delta is rounded to f16 once and every path merges that: resident, model
/// offload (kept deltas) and sequential offload (host weights) give the same image, bit for bit.
#[test]
fn half_precision_loras_give_the_same_images_offloaded() {
    use sdserve_pipeline::memory::Offload;
    let r = reference();
    let mut model = StableDiffusion::load(&fixtures().join("tiny-a"), &Device::Cpu, DType::F16)
        .expect("model loads");
    model
        .set_lora_library(LoraLibrary::scan(&fixtures().join("adapters/loras")).unwrap())
        .unwrap();
    let loras = GenerationParams {
        steps: 2,
        ..request(&r, &[("ink_kohya", 0.8), ("soft_peft", 0.6)])
    };
    let run = |m: &StableDiffusion| {
        m.generate(&loras, &mut |_| ControlFlow::Continue(()))
            .unwrap()
            .remove(0)
            .pixels
    };
    let resident = run(&model);
    for offload in [Offload::Model, Offload::Sequential] {
        model.set_offload(offload).unwrap();
        assert_eq!(run(&model), resident, "{offload:?}");
        assert_eq!(run(&model), resident, "{offload:?}, again");
    }
}

#[test]
fn kohya_text_encoder_names_resolve_like_peft() {
    // te_kohya holds soft_peft's text-encoder layers under kohya's names.
    let r = reference();
    let params = |lora: &str| GenerationParams {
        loras: vec![LoraWeight {
            name: lora.into(),
            weight: 0.9,
        }],
        ..request(&r, &[])
    };
    let cond = |p: &GenerationParams| -> Tensor {
        // Encoding alone does not merge LoRAs; a one-step run does, and leaves them merged.
        let mut one = p.clone();
        one.steps = 1;
        r.model
            .generate(&one, &mut |_| ControlFlow::Continue(()))
            .unwrap();
        match r.model.encode_conditioning(p).unwrap() {
            Conditioning::Joint(z) => z,
            _ => panic!("one batch"),
        }
    };
    let plain = cond(&request(&r, &[]));
    let peft = cond(&params("soft_peft"));
    let kohya = cond(&params("te_kohya"));
    let d = max_abs_diff;
    assert!(
        d(&peft, &plain) > 1e-3,
        "the text encoder LoRA changes the conditioning"
    );
    assert!(
        d(&peft, &kohya) < 1e-5,
        "kohya and PEFT names: {}",
        d(&peft, &kohya)
    );
}

#[test]
fn unknown_or_misfit_loras_are_refused_naming_them() {
    let r = reference();
    let err = r
        .model
        .generate(&request(&r, &[("nope", 1.0)]), &mut |_| {
            ControlFlow::Continue(())
        })
        .unwrap_err();
    assert!(err.to_string().contains("nope"), "{err}");
    // tiny-b has other shapes: the same file does not fit it.
    let mut other =
        StableDiffusion::load(&fixtures().join("tiny-b"), &Device::Cpu, DType::F32).unwrap();
    other
        .set_lora_library(LoraLibrary::scan(&fixtures().join("adapters/loras")).unwrap())
        .unwrap();
    let err = other.check_lora("ink_kohya").unwrap_err();
    assert!(err.to_string().contains("ink_kohya"), "{err}");
}

#[test]
fn embeddings_match_diffusers() {
    let r = reference();
    for (name, e) in r.meta["embeddings"].as_object().unwrap() {
        let params = GenerationParams {
            prompt: e["prompt"].as_str().unwrap().into(),
            negative_prompt: e["negative_prompt"].as_str().unwrap().into(),
            ..request(&r, &[])
        };
        for syntax in [PromptSyntax::Plain, PromptSyntax::A1111] {
            let z = match r
                .model
                .encode_conditioning(&GenerationParams {
                    prompt_syntax: syntax,
                    ..params.clone()
                })
                .unwrap()
            {
                Conditioning::Joint(z) => z,
                _ => panic!("one batch"),
            };
            let want = Tensor::cat(
                &[
                    &r.tensors[&format!("embedding.{name}.uncond")],
                    &r.tensors[&format!("embedding.{name}.cond")],
                ],
                0,
            )
            .unwrap();
            let d = common::max_abs_diff(&z, &want);
            eprintln!("embedding {name} {syntax:?}: max abs diff {d:.2e}");
            assert!(d < 1e-5, "{name} {syntax:?}: {d}");
        }
        let got = generate(&r, &params);
        assert_close(
            &format!("embedding.{name}"),
            &got,
            &expected(&r, &format!("image.embedding.{name}")),
        );
    }
}
