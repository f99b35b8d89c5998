//! A1111 prompt syntax (emphasis, escapes, BREAK, long prompts, clip skip) against the reference
//! conditioning of `tools/make_prompt_fixtures.py` (transformers' CLIP) on tiny-a with a text
//! encoder whose final layer norm has a bias, and whole images through diffusers' loop.

use crate::common;

use common::{max_abs_diff, pixel_difference};

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use candle_core::{DType, Device, Tensor};
use sdserve_pipeline::pipeline::{Conditioning, GenerationParams, PromptSyntax, StableDiffusion};
use sdserve_pipeline::prompt::{chunks, parse_attention};
use sdserve_pipeline::schedulers::SchedulerKind;
use sdserve_pipeline::tokenizer::ClipTokenizer;
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// tiny-a with the fixture text encoder: a folder of links to tiny-a's parts.
fn model_dir() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("sdserve-prompts-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let base = fixtures().join("tiny-a");
        for part in ["model_index.json", "scheduler", "tokenizer", "unet", "vae"] {
            std::os::unix::fs::symlink(base.join(part), dir.join(part)).unwrap();
        }
        std::os::unix::fs::symlink(
            fixtures().join("prompts/text_encoder"),
            dir.join("text_encoder"),
        )
        .unwrap();
        dir
    })
    .clone()
}

struct Reference {
    model: StableDiffusion,
    meta: Value,
    tensors: HashMap<String, Tensor>,
}

fn reference() -> &'static Reference {
    static R: OnceLock<Reference> = OnceLock::new();
    R.get_or_init(|| {
        let dir = fixtures().join("prompts");
        let text = std::fs::read_to_string(dir.join("prompts.json")).unwrap();
        Reference {
            model: StableDiffusion::load(&model_dir(), &Device::Cpu, DType::F32).unwrap(),
            meta: serde_json::from_str(&text).unwrap(),
            tensors: candle_core::safetensors::load(dir.join("prompts.safetensors"), &Device::Cpu)
                .unwrap(),
        }
    })
}

fn params_of(case: &Value) -> GenerationParams {
    GenerationParams {
        prompt: case["prompt"].as_str().unwrap().into(),
        negative_prompt: case["negative_prompt"].as_str().unwrap().into(),
        clip_skip: case["clip_skip"].as_u64().unwrap() as usize,
        prompt_syntax: match case["prompt_syntax"].as_str().unwrap() {
            "plain" => PromptSyntax::Plain,
            _ => PromptSyntax::A1111,
        },
        guidance_scale: 7.5,
        ..Default::default()
    }
}
#[test]
fn pieces_and_chunks_match_the_reference() {
    let r = reference();
    let tokenizer = ClipTokenizer::from_dir(&fixtures().join("tiny-a/tokenizer")).unwrap();
    for (name, case) in r.meta["cases"].as_object().unwrap() {
        if case["prompt_syntax"] != "a1111" {
            continue;
        }
        for (text, pieces_key, chunks_key) in [
            (&case["prompt"], "pieces", "chunks"),
            (
                &case["negative_prompt"],
                "negative_pieces",
                "negative_chunks",
            ),
        ] {
            let pieces = parse_attention(text.as_str().unwrap());
            let want: Vec<(String, f64)> = case[pieces_key]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| (p[0].as_str().unwrap().into(), p[1].as_f64().unwrap()))
                .collect();
            let got: Vec<(String, f64)> =
                pieces.iter().map(|p| (p.text.clone(), p.weight)).collect();
            // serde_json's float parsing may be one ulp off Python's repr: compare closely.
            assert_eq!(got.len(), want.len(), "{name}: pieces of {text}: {got:?}");
            for ((gt, gw), (wt, ww)) in got.iter().zip(&want) {
                assert!(
                    gt == wt && (gw - ww).abs() < 1e-12,
                    "{name}: {got:?} != {want:?}"
                );
            }
            let got = chunks(&tokenizer, &pieces).unwrap();
            let want = case[chunks_key].as_array().unwrap();
            assert_eq!(got.len(), want.len(), "{name}: chunk count of {text}");
            for (g, w) in got.iter().zip(want) {
                let ids: Vec<u32> = serde_json::from_value(w["ids"].clone()).unwrap();
                let weights: Vec<f64> = serde_json::from_value(w["weights"].clone()).unwrap();
                assert_eq!(g.ids, ids, "{name}: ids of {text}");
                let gw: Vec<f64> = g.weights.iter().map(|&x| x as f64).collect();
                let ww: Vec<f64> = weights.iter().map(|&x| x as f32 as f64).collect();
                for (a, b) in gw.iter().zip(&ww) {
                    assert!(
                        (a - b).abs() < 1e-6,
                        "{name}: weights of {text}: {gw:?} != {ww:?}"
                    );
                }
            }
        }
    }
}

#[test]
fn conditioning_matches_the_reference() {
    let r = reference();
    for (name, case) in r.meta["cases"].as_object().unwrap() {
        let params = params_of(case);
        let cond = &r.tensors[&format!("{name}.cond")];
        let uncond = &r.tensors[&format!("{name}.uncond")];
        let (u, c, joint) = match r.model.encode_conditioning(&params).unwrap() {
            Conditioning::Joint(z) => {
                (z.narrow(0, 0, 1).unwrap(), z.narrow(0, 1, 1).unwrap(), true)
            }
            Conditioning::Separate { uncond, cond } => (uncond, cond, false),
            Conditioning::Cond(_) => panic!("{name}: guidance is on"),
        };
        assert_eq!(
            joint,
            cond.dims() == uncond.dims(),
            "{name}: one batch iff equal lengths"
        );
        let d = max_abs_diff(&c, cond).max(max_abs_diff(&u, uncond));
        eprintln!(
            "{name}: {:?} / {:?}, max abs diff {d:.2e}",
            c.dims(),
            u.dims()
        );
        assert!(
            d < 2e-5,
            "{name}: conditioning differs from the reference by {d}"
        );
    }
}

#[test]
fn unweighted_short_prompts_are_exactly_plain() {
    let r = reference();
    for (prompt, negative) in [
        (
            "a photo of an astronaut riding a horse on mars",
            "blurry, low quality",
        ),
        ("a cat", ""),
    ] {
        let mut params = GenerationParams {
            prompt: prompt.into(),
            negative_prompt: negative.into(),
            ..Default::default()
        };
        let plain = r.model.encode_conditioning(&params).unwrap();
        params.prompt_syntax = PromptSyntax::A1111;
        let a1111 = r.model.encode_conditioning(&params).unwrap();
        match (plain, a1111) {
            (Conditioning::Joint(p), Conditioning::Joint(a)) => {
                assert_eq!(max_abs_diff(&p, &a), 0.0, "{prompt}");
            }
            _ => panic!("both are one batch"),
        }
    }
    // Guidance off: only the prompt.
    let params = GenerationParams {
        prompt: "(a cat:1.2)".into(),
        guidance_scale: 1.0,
        prompt_syntax: PromptSyntax::A1111,
        ..Default::default()
    };
    assert!(matches!(
        r.model.encode_conditioning(&params).unwrap(),
        Conditioning::Cond(_)
    ));
}

/// An empty prompt (A1111's default) is ordinary CLIP input: BOS, EOS and padding, encoded as
/// diffusers encodes the empty negative prompt of the reference, in both syntaxes.
#[test]
fn an_empty_prompt_encodes_like_the_references_empty_negative_prompt() {
    let r = reference();
    let (name, _) = r.meta["cases"]
        .as_object()
        .unwrap()
        .iter()
        .find(|(_, c)| c["negative_prompt"] == "" && c["clip_skip"] == 1)
        .expect("a reference case with an empty negative prompt");
    let want = &r.tensors[&format!("{name}.uncond")];
    for syntax in [PromptSyntax::Plain, PromptSyntax::A1111] {
        let params = GenerationParams {
            prompt: String::new(),
            negative_prompt: String::new(),
            prompt_syntax: syntax,
            guidance_scale: 7.5,
            ..Default::default()
        };
        let Conditioning::Joint(z) = r.model.encode_conditioning(&params).unwrap() else {
            panic!("{syntax:?}: two empty prompts are one batch");
        };
        for row in 0..2 {
            let d = max_abs_diff(&z.narrow(0, row, 1).unwrap(), want);
            assert!(d < 2e-5, "{syntax:?} row {row}: {d}");
        }
    }
}

#[test]
fn clip_skip_beyond_the_encoder_is_refused() {
    let r = reference();
    let params = GenerationParams {
        prompt: "a cat".into(),
        clip_skip: 4, // the tiny encoder has 2 layers: 1..=3
        ..Default::default()
    };
    let err = r.model.encode_conditioning(&params).unwrap_err();
    assert!(err.to_string().contains("clip_skip"), "{err}");
}

#[test]
fn images_match_the_reference_loop() {
    let r = reference();
    for (name, image) in r.meta["images"].as_object().unwrap() {
        let params = GenerationParams {
            steps: image["steps"].as_u64().unwrap() as usize,
            width: image["width"].as_u64().unwrap() as usize,
            height: image["height"].as_u64().unwrap() as usize,
            seed: image["seed"].as_u64().unwrap(),
            guidance_scale: image["guidance_scale"].as_f64().unwrap(),
            scheduler: Some(
                SchedulerKind::from_name(image["scheduler"].as_str().unwrap()).unwrap(),
            ),
            ..params_of(&r.meta["cases"][name])
        };
        let got = r
            .model
            .generate(&params, &mut |_| ControlFlow::Continue(()))
            .unwrap()
            .remove(0);
        let want = r.tensors[&format!("image.{name}")]
            .flatten_all()
            .unwrap()
            .to_vec1::<u8>()
            .unwrap();
        let (mean, over) = pixel_difference(&got.pixels, &want);
        eprintln!("image.{name}: mean abs diff {mean:.4}, fraction > 8: {over:.5}");
        assert!(
            mean <= 1.0 && over <= 0.005,
            "image.{name}: mean {mean}, >8 {over}"
        );
    }
}
