//! The CLIP tokenizer against transformers' `CLIPTokenizer` (references written by
//! `tools/make_tokenizer_fixtures.py`).

use crate::common;

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
    /// When present, a `tokenizer.json` (same vocabulary and merges) with these added tokens
    /// was beside the configs.
    #[serde(default)]
    tokenizer_json_added_tokens: Option<serde_json::Value>,
}

impl Case {
    fn same_setup(&self, other: &Case) -> bool {
        self.tokenizer_config == other.tokenizer_config
            && self.special_tokens_map == other.special_tokens_map
            && self.tokenizer_json_added_tokens == other.tokenizer_json_added_tokens
    }
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
/// normalized or not, "!" as pad, special_tokens_map.json overriding, a shorter max length,
/// a tokenizer.json whose added tokens take precedence).
#[test]
fn special_token_config_variants_match_transformers() {
    let src = fixtures().join("clip-tokenizer");
    let cases = load_cases();
    let variants: Vec<&Case> = cases
        .iter()
        .filter(|c| c.tokenizer_config.is_some())
        .collect();
    assert!(variants.len() >= 8, "only {} variant cases", variants.len());
    assert!(variants
        .iter()
        .any(|c| c.tokenizer_json_added_tokens.is_some()));
    let dir = std::env::temp_dir().join(format!("sdserve-tok-variants-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["vocab.json", "merges.txt"] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    let write_or_remove = |name: &str, value: &Option<serde_json::Value>| {
        let path = dir.join(name);
        match value {
            Some(v) if !v.is_null() => std::fs::write(&path, v.to_string()).unwrap(),
            _ => {
                let _ = std::fs::remove_file(&path);
            }
        }
    };
    let mut failures = Vec::new();
    let mut bpe_model: Option<serde_json::Value> = None;
    let mut i = 0;
    while i < variants.len() {
        let case = variants[i];
        let same: Vec<&Case> = variants[i..]
            .iter()
            .take_while(|c| c.same_setup(case))
            .copied()
            .collect();
        i += same.len();
        write_or_remove("tokenizer_config.json", &case.tokenizer_config);
        write_or_remove("special_tokens_map.json", &case.special_tokens_map);
        let tokenizer_json = case.tokenizer_json_added_tokens.as_ref().map(|added| {
            let model = bpe_model.get_or_insert_with(|| {
                let vocab: serde_json::Value =
                    serde_json::from_str(&std::fs::read_to_string(src.join("vocab.json")).unwrap())
                        .unwrap();
                let merges: Vec<Vec<String>> = std::fs::read_to_string(src.join("merges.txt"))
                    .unwrap()
                    .lines()
                    .skip(1)
                    .filter(|l| !l.is_empty())
                    .map(|l| l.split(' ').map(str::to_owned).collect())
                    .collect();
                serde_json::json!({"type": "BPE", "vocab": vocab, "merges": merges})
            });
            serde_json::json!({"added_tokens": added, "model": model})
        });
        write_or_remove("tokenizer.json", &tokenizer_json);
        let tok = ClipTokenizer::from_dir(&dir).unwrap();
        let setup = format!(
            "config {}, map {:?}, tokenizer.json added {:?}",
            case.tokenizer_config.as_ref().unwrap(),
            case.special_tokens_map,
            case.tokenizer_json_added_tokens
        );
        failures.extend(
            check(&tok, &same)
                .into_iter()
                .map(|f| format!("{setup}:\n{f}")),
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

/// `text.prompt` from `tiny-X.json`.
fn reference_prompt(model: &str) -> String {
    common::tiny_model_json(model)["text"]["prompt"]
        .as_str()
        .unwrap()
        .to_owned()
}
