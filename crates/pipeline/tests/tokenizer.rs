//! The CLIP tokenizer against transformers' `CLIPTokenizer` (references written by
//! `tools/make_tokenizer_fixtures.py`).

use std::path::PathBuf;

use sdserve_pipeline::tokenizer::ClipTokenizer;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

#[derive(serde::Deserialize)]
struct Case {
    prompt: String,
    ids: Vec<u32>,
}

#[test]
fn real_clip_tokenizer_matches_transformers_on_every_case() {
    let tok = ClipTokenizer::from_dir(&fixtures().join("clip-tokenizer")).unwrap();
    let text = std::fs::read_to_string(fixtures().join("tokenizer_cases.json")).unwrap();
    let cases: Vec<Case> = serde_json::from_str(&text).unwrap();
    assert!(cases.len() >= 25, "only {} cases", cases.len());
    let mut failures = Vec::new();
    for case in &cases {
        let ids = tok.encode(&case.prompt).unwrap();
        if ids != case.ids {
            failures.push(format!(
                "{:?}\n  ours:         {:?}\n  transformers: {:?}",
                case.prompt, ids, case.ids
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases differ:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

/// The tiny models' synthetic tokenizers (tiny-b pads with "!", as SD 2 does, and its prompt
/// is truncated) against the ids transformers gave when `tools/make_tiny_models.py` ran.
#[test]
fn tiny_model_tokenizers_match_reference_ids() {
    for model in ["tiny-a", "tiny-b"] {
        let prompt = reference_prompt(model);
        let refs = candle_core::safetensors::load(
            fixtures().join(format!("{model}.safetensors")),
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let want: Vec<i64> = refs["text.input_ids"]
            .squeeze(0)
            .unwrap()
            .to_vec1()
            .unwrap();
        let want: Vec<u32> = want
            .into_iter()
            .map(|i| u32::try_from(i).unwrap())
            .collect();
        let tok = ClipTokenizer::from_dir(&fixtures().join(model).join("tokenizer")).unwrap();
        assert_eq!(tok.encode(&prompt).unwrap(), want, "{model}: {prompt:?}");
    }
}

/// `text.prompt` from `tiny-X.json`. Python's json writes `-Infinity` for some scheduler
/// fields, which is not JSON; those tokens are nulled before parsing.
fn reference_prompt(model: &str) -> String {
    let text = std::fs::read_to_string(fixtures().join(format!("{model}.json"))).unwrap();
    let text = text
        .replace("-Infinity", "null")
        .replace("Infinity", "null")
        .replace("NaN", "null");
    let meta: serde_json::Value = serde_json::from_str(&text).unwrap();
    meta["text"]["prompt"].as_str().unwrap().to_owned()
}
