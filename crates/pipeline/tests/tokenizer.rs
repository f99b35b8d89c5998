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
    /// When present, the case was made with `tokenizer_config.json` replaced by this.
    #[serde(default)]
    tokenizer_config: Option<serde_json::Value>,
    /// With `tokenizer_config`: `special_tokens_map.json`'s content, null for no such file.
    #[serde(default)]
    special_tokens_map: Option<serde_json::Value>,
}

fn load_cases() -> Vec<Case> {
    let text = std::fs::read_to_string(fixtures().join("tokenizer_cases.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn check(tok: &ClipTokenizer, cases: &[&Case]) -> Vec<String> {
    cases
        .iter()
        .filter_map(|case| {
            let ids = tok.encode(&case.prompt).unwrap();
            (ids != case.ids).then(|| {
                format!(
                    "{:?}\n  ours:         {:?}\n  transformers: {:?}",
                    case.prompt, ids, case.ids
                )
            })
        })
        .collect()
}

#[test]
fn real_clip_tokenizer_matches_transformers_on_every_case() {
    let tok = ClipTokenizer::from_dir(&fixtures().join("clip-tokenizer")).unwrap();
    let cases = load_cases();
    let cases: Vec<&Case> = cases
        .iter()
        .filter(|c| c.tokenizer_config.is_none())
        .collect();
    assert!(cases.len() >= 25, "only {} cases", cases.len());
    let failures = check(&tok, &cases);
    assert!(
        failures.is_empty(),
        "{} of {} cases differ:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

/// Other spellings of the special tokens in the config files (plain strings or AddedTokens,
/// normalized or not, "!" as pad, special_tokens_map.json overriding, a shorter max length).
#[test]
fn special_token_config_variants_match_transformers() {
    let src = fixtures().join("clip-tokenizer");
    let cases = load_cases();
    let variants: Vec<&Case> = cases
        .iter()
        .filter(|c| c.tokenizer_config.is_some())
        .collect();
    assert!(variants.len() >= 8, "only {} variant cases", variants.len());
    let dir = std::env::temp_dir().join(format!("sdserve-tok-variants-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["vocab.json", "merges.txt"] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    let mut failures = Vec::new();
    for (i, case) in variants.iter().enumerate() {
        // Cases sharing a config are adjacent; rebuild only when it changes.
        if i > 0
            && variants[i - 1].tokenizer_config == case.tokenizer_config
            && variants[i - 1].special_tokens_map == case.special_tokens_map
        {
            continue;
        }
        let config = case.tokenizer_config.as_ref().unwrap();
        std::fs::write(dir.join("tokenizer_config.json"), config.to_string()).unwrap();
        let map_path = dir.join("special_tokens_map.json");
        match &case.special_tokens_map {
            Some(m) if !m.is_null() => std::fs::write(&map_path, m.to_string()).unwrap(),
            _ => {
                let _ = std::fs::remove_file(&map_path);
            }
        }
        let tok = ClipTokenizer::from_dir(&dir).unwrap();
        let same: Vec<&Case> = variants[i..]
            .iter()
            .take_while(|c| {
                c.tokenizer_config == case.tokenizer_config
                    && c.special_tokens_map == case.special_tokens_map
            })
            .copied()
            .collect();
        failures.extend(
            check(&tok, &same)
                .into_iter()
                .map(|f| format!("config {config}:\n{f}")),
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
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
