//! Diffusers folders whose weights are PyTorch pickle `.bin` files (`tools/make_weights_bin.py`:
//! `tiny-inpaint-bin` and `taesd/taesd-a-bin`, re-saved from the safetensors fixtures by
//! diffusers/torch): they load through the safe pickle reader and give bit-identical results;
//! a malicious `.bin` is refused naming its global; a `.bin` beside safetensors is never read.

use crate::common;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use common::{fixture_path, generate_one, read_png, request_params, ScratchDir};
use sdserve_pipeline::memory::footprint::WeightCounts;
use sdserve_pipeline::memory::{MemoryPlan, Offload};
use sdserve_pipeline::pipeline::{
    component_weight_files, GenerationParams, InitImage, StableDiffusion,
};
use sdserve_pipeline::taesd::Taesd;

/// The 9-channel inpainting request of one recorded case (32x32, 10 steps).
fn inpaint_params() -> GenerationParams {
    let text = std::fs::read_to_string(fixture_path("img2img.json")).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    let case = &json["cases"]["tiny-inpaint.inpaint.ddim.0.6"];
    GenerationParams {
        init_image: Some(InitImage {
            image: read_png(case["init_image"].as_str().unwrap()),
            mask: Some(read_png(case["mask_image"].as_str().unwrap())),
            strength: case["strength"].as_f64().unwrap(),
        }),
        ..request_params(case)
    }
}

fn file_names(files: &[PathBuf]) -> Vec<String> {
    files
        .iter()
        .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
        .collect()
}

/// Copies `src` (a fixture folder, two levels deep) into `dst`.
fn copy_folder(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for entry in std::fs::read_dir(src).unwrap() {
        let p = entry.unwrap().path();
        let to = dst.join(p.file_name().unwrap());
        if p.is_dir() {
            copy_folder(&p, &to);
        } else {
            std::fs::copy(&p, &to).unwrap();
        }
    }
}

#[test]
fn a_bin_folder_gives_the_images_of_the_safetensors_folder_it_was_saved_from() {
    let bin = fixture_path("tiny-inpaint-bin");
    // The pickle files are what the loader picks (the sharded text encoder through its index).
    let f32_files = |c: &str, stem: &str| {
        file_names(&component_weight_files(&bin, c, stem, DType::F32).unwrap())
    };
    assert_eq!(
        f32_files("unet", "diffusion_pytorch_model"),
        ["diffusion_pytorch_model.bin"]
    );
    assert_eq!(
        f32_files("vae", "diffusion_pytorch_model"),
        ["diffusion_pytorch_model.bin"]
    );
    assert_eq!(
        f32_files("text_encoder", "model"),
        [
            "pytorch_model-00001-of-00002.bin",
            "pytorch_model-00002-of-00002.bin"
        ]
    );

    let params = inpaint_params();
    let from_safetensors =
        StableDiffusion::load(&fixture_path("tiny-inpaint"), &Device::Cpu, DType::F32)
            .expect("safetensors folder loads");
    let from_pickles =
        StableDiffusion::load(&bin, &Device::Cpu, DType::F32).expect("the .bin folder loads");
    let want = generate_one(&from_safetensors, &params);
    let got = generate_one(&from_pickles, &params);
    assert_eq!((got.width, got.height), (want.width, want.height));
    assert!(
        want.pixels.iter().any(|&p| p != want.pixels[0]),
        "the image is flat"
    );
    assert!(got.pixels == want.pixels, "the .bin folder's image differs");
    // Offloaded components are built from the pickles again for each stage; the sequentially
    // offloaded UNet streams its parts from them.
    for offload in [Offload::Model, Offload::Sequential] {
        let plan = MemoryPlan {
            offload,
            ..MemoryPlan::cpu(DType::F32)
        };
        let sd = StableDiffusion::load_with_plan(&bin, &Device::Cpu, DType::F32, &plan).unwrap();
        assert!(
            generate_one(&sd, &params).pixels == want.pixels,
            "{offload:?}: the image differs"
        );
    }

    // The memory planner counts the same weights from the pickles' tensor tables.
    assert_eq!(
        WeightCounts::from_model_dir(&bin, DType::F32).unwrap(),
        WeightCounts::from_model_dir(&fixture_path("tiny-inpaint"), DType::F32).unwrap()
    );
}

#[test]
fn a_malicious_bin_fails_the_load_naming_its_global_and_is_never_read_beside_safetensors() {
    let expected: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture_path("single-file/malicious.json")).unwrap())
            .unwrap();
    let want = &expected["malicious-os-system.ckpt"];
    let (global, marker) = (
        want["global"].as_str().unwrap(),
        PathBuf::from(want["marker"].as_str().unwrap()),
    );
    let _ = std::fs::remove_file(&marker);
    for target in [
        "unet/diffusion_pytorch_model.bin",
        "text_encoder/pytorch_model-00002-of-00002.bin",
    ] {
        let tmp = ScratchDir::new("evil-bin");
        let model = tmp.0.join("model");
        copy_folder(&fixture_path("tiny-inpaint-bin"), &model);
        std::fs::copy(
            fixture_path("single-file/malicious-os-system.ckpt"),
            model.join(target),
        )
        .unwrap();
        let e = StableDiffusion::load(&model, &Device::Cpu, DType::F32)
            .err()
            .expect("refused")
            .to_string();
        assert!(
            e.contains(&format!("`{global}`")) && e.contains("refused"),
            "{target}: {e}"
        );
        assert!(e.contains(target), "the error names the file: {e}");
        // The memory planner reads the pickles too: it refuses the same way.
        let e = WeightCounts::from_model_dir(&model, DType::F32)
            .unwrap_err()
            .to_string();
        assert!(e.contains(global), "{e}");
        assert!(!marker.exists(), "the payload ran");
    }

    // diffusers' precedence: safetensors first. The same `.bin`s beside safetensors are never
    // read: the folder loads and gives the safetensors' image.
    let tmp = ScratchDir::new("both-formats");
    let model = tmp.0.join("model");
    copy_folder(&fixture_path("tiny-inpaint"), &model);
    for target in [
        "unet/diffusion_pytorch_model.bin",
        "text_encoder/pytorch_model.bin",
        "vae/diffusion_pytorch_model.bin",
    ] {
        std::fs::copy(
            fixture_path("single-file/malicious-os-system.ckpt"),
            model.join(target),
        )
        .unwrap();
    }
    let sd =
        StableDiffusion::load(&model, &Device::Cpu, DType::F32).expect("loads the safetensors");
    let want =
        StableDiffusion::load(&fixture_path("tiny-inpaint"), &Device::Cpu, DType::F32).unwrap();
    let params = GenerationParams {
        steps: 2,
        ..inpaint_params()
    };
    assert!(generate_one(&sd, &params).pixels == generate_one(&want, &params).pixels);
    assert!(!marker.exists(), "the payload ran");
}

fn same(a: &Tensor, b: &Tensor) -> bool {
    let (a, b): (Vec<f32>, Vec<f32>) = (
        a.flatten_all().unwrap().to_vec1().unwrap(),
        b.flatten_all().unwrap().to_vec1().unwrap(),
    );
    a.len() == b.len() && a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits())
}

/// TAESD from `.bin`: the plain file is an older diffusers save (a whole `state_dict()`, whose
/// pickle sets the `OrderedDict`'s `_metadata`), the `.fp16.bin` variant a current one; each
/// decodes exactly as its safetensors twin.
#[test]
fn taesd_loads_from_bin_and_its_fp16_variant() {
    let taesd = fixture_path("taesd");
    for (dtype, file) in [
        (DType::F32, "diffusion_pytorch_model.bin"),
        (DType::F16, "diffusion_pytorch_model.fp16.bin"),
    ] {
        let from_bin = Taesd::load(&taesd.join("taesd-a-bin"), &Device::Cpu, dtype).unwrap();
        assert_eq!(file_names(from_bin.files()), [file], "{dtype:?}");
        let from_safetensors = Taesd::load(&taesd.join("taesd-a"), &Device::Cpu, dtype).unwrap();
        let latents = Tensor::randn(0f32, 1.0, (1, 4, 5, 7), &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let a = from_bin
            .decode(&latents)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        let b = from_safetensors
            .decode(&latents)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        assert!(same(&a, &b), "{dtype:?}: decodes differ");
    }
}

/// A NaN written over one tensor's first element in a copy of `tiny-inpaint-bin` fails the load
/// with an error naming the file and the tensor, whichever way the tensor is read: straight
/// into place (f32 kept as f32), transposed (a linear weight on the CPU), or converted (f16).
#[test]
fn a_nan_in_a_bin_fails_the_load_naming_the_tensor() {
    use sdserve_pipeline::ckpt::Checkpoint;
    use std::io::{Seek, SeekFrom, Write};
    let cases = [
        (
            DType::F32,
            "vae/diffusion_pytorch_model.bin",
            "decoder.conv_in.weight",
        ),
        (
            DType::F32,
            "text_encoder/pytorch_model-00002-of-00002.bin",
            "text_model.encoder.layers.0.self_attn.q_proj.weight",
        ),
        (
            DType::F16,
            "text_encoder/pytorch_model-00002-of-00002.bin",
            "text_model.encoder.layers.0.self_attn.q_proj.weight",
        ),
    ];
    for (dtype, file, tensor) in cases {
        let tmp = ScratchDir::new("nan-bin");
        let model = tmp.0.join("model");
        copy_folder(&fixture_path("tiny-inpaint-bin"), &model);
        let path = model.join(file);
        let ck = Checkpoint::open(&path).unwrap();
        let (_, t) = ck
            .state_dict()
            .unwrap()
            .into_iter()
            .find(|(n, _)| n == tensor)
            .expect("tensor in the file");
        let (at, _) = ck.contiguous_bytes(&t).unwrap().expect("contiguous");
        let mut f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.seek(SeekFrom::Start(at)).unwrap();
        f.write_all(&f32::NAN.to_le_bytes()).unwrap();
        drop(f);
        let e = StableDiffusion::load(&model, &Device::Cpu, dtype)
            .err()
            .expect("refused")
            .to_string();
        assert!(
            e.contains("NaN") && e.contains(&format!("`{tensor}`")) && e.contains(file),
            "{dtype:?} {tensor}: {e}"
        );
    }
}
