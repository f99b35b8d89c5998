//! An external VAE swapped into a loaded model (`StableDiffusion::set_vae`) against diffusers
//! with `vae=AutoencoderKL.from_single_file(file, config=<model>/vae)` swapped into its
//! pipeline (references: `tools/make_vae_fixtures.py`, `fixtures/vae/`): txt2img decodes and
//! img2img also encodes with it; the `.ckpt` and the diffusers folder forms give the same
//! pixels as the `.safetensors`; the model's own VAE comes back pixel for pixel; a VAE whose
//! shapes do not fit is refused with the model's own left in place; offloaded VAEs swap too.

use crate::common;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use common::{generate_one, request_params, Fixtures};
use sdserve_pipeline::memory::{MemoryPlan, Offload};
use sdserve_pipeline::pipeline::{GenerationParams, InitImage, RgbImage, StableDiffusion};
use sdserve_pipeline::PipelineError;

fn vae_fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/vae")
        .join(name)
}

fn load(offload: Offload) -> StableDiffusion {
    let mut plan = MemoryPlan::cpu(DType::F32);
    plan.offload = offload;
    StableDiffusion::load_with_plan(
        &common::fixture_path("tiny-a-vae8"),
        &Device::Cpu,
        DType::F32,
        &plan,
    )
    .expect("model loads")
}

fn read_png(path: &Path) -> RgbImage {
    let img = image_rgb(path);
    RgbImage {
        width: img.0,
        height: img.1,
        pixels: img.2,
    }
}

fn image_rgb(path: &Path) -> (u32, u32, Vec<u8>) {
    let file = std::fs::File::open(path).unwrap();
    let decoder = png::Decoder::new(std::io::BufReader::new(file));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    assert_eq!(info.color_type, png::ColorType::Rgb);
    (info.width, info.height, buf[..info.buffer_size()].to_vec())
}

struct Refs {
    fixtures: Fixtures,
}

impl Refs {
    fn load() -> Self {
        Self {
            fixtures: Fixtures::load("vae/references"),
        }
    }

    fn params(&self, case: &str) -> GenerationParams {
        let c = &self.fixtures.meta["cases"][case];
        let init_image = c["init_image"].as_str().map(|name| InitImage {
            image: read_png(&vae_fixture(name)),
            mask: None,
            strength: c["strength"].as_f64().unwrap(),
        });
        GenerationParams {
            init_image,
            ..request_params(c)
        }
    }

    fn image(&self, case: &str) -> &Tensor {
        self.fixtures.get(&format!("image.{case}"))
    }
}

#[test]
fn an_external_vae_decodes_and_encodes_as_diffusers_with_it_swapped_in() {
    let refs = Refs::load();
    let mut model = load(Offload::None);
    let own = generate_one(&model, &refs.params("txt2img"));
    let path = vae_fixture("alt.safetensors");
    model.set_vae(Some(&path)).expect("the VAE fits");
    assert_eq!(model.vae_in_use(), Some(path.as_path()));
    let mut failures = Vec::new();
    let mut images = Vec::new();
    for case in ["txt2img", "img2img"] {
        let image = generate_one(&model, &refs.params(case));
        failures.extend(common::image_failure(case, &image.pixels, refs.image(case)));
        images.push(image);
    }
    assert!(failures.is_empty(), "differ from diffusers: {failures:?}");
    assert_ne!(images[0].pixels, own.pixels, "the swap changed nothing");

    // The same weights as a .ckpt (state_dict, EMA keys) and as a diffusers folder.
    for other in ["alt.ckpt", "alt-diffusers"] {
        model.set_vae(Some(&vae_fixture(other))).expect(other);
        for (case, expected) in ["txt2img", "img2img"].iter().zip(&images) {
            let image = generate_one(&model, &refs.params(case));
            assert!(image.pixels == expected.pixels, "{other} {case}");
        }
    }

    // The model's own VAE again: the pixels of a model that never swapped.
    model.set_vae(None).unwrap();
    assert_eq!(model.vae_in_use(), None);
    let back = generate_one(&model, &refs.params("txt2img"));
    assert!(
        back.pixels == own.pixels,
        "the model's own VAE did not come back"
    );
}

#[test]
fn a_vae_that_does_not_fit_is_refused_and_the_model_s_own_stays() {
    let refs = Refs::load();
    let mut model = load(Offload::None);
    let own = generate_one(&model, &refs.params("txt2img"));
    model
        .set_vae(Some(&vae_fixture("alt.safetensors")))
        .unwrap();
    let err = model
        .set_vae(Some(&vae_fixture("wrong-shape.safetensors")))
        .unwrap_err();
    assert!(matches!(err, PipelineError::Weights { .. }), "{err:?}");
    assert!(err.to_string().contains("wrong-shape"), "{err}");
    assert_eq!(model.vae_in_use(), None);
    let after = generate_one(&model, &refs.params("txt2img"));
    assert!(after.pixels == own.pixels);
    // A file that is no VAE at all.
    let err = model
        .set_vae(Some(&common::fixture_path(
            "tiny-a-vae8/unet/diffusion_pytorch_model.safetensors",
        )))
        .unwrap_err();
    assert!(err.to_string().contains("is not a VAE weight"), "{err}");
}

#[test]
fn offloaded_vaes_swap_too() {
    let refs = Refs::load();
    let mut model = load(Offload::Model);
    model
        .set_vae(Some(&vae_fixture("alt.safetensors")))
        .unwrap();
    for case in ["txt2img", "img2img"] {
        let image = generate_one(&model, &refs.params(case));
        let failure = common::image_failure(case, &image.pixels, refs.image(case));
        assert!(failure.is_none(), "{failure:?}");
    }
    // Moving it onto the device and back keeps the external VAE.
    model.set_offload(Offload::None).unwrap();
    let image = generate_one(&model, &refs.params("txt2img"));
    assert!(common::image_failure("resident", &image.pixels, refs.image("txt2img")).is_none());
}
