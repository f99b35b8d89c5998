//! CLIP BPE tokenizer, built the way transformers 5.x's `CLIPTokenizer` builds it.
//!
//! transformers 5 has only the tokenizers-backed `CLIPTokenizer`; from a folder it takes the
//! vocabulary and merges (from `vocab.json` + `merges.txt`, or from `tokenizer.json` when that
//! is present) and always rebuilds the same pipeline around them: normalizer NFC, whitespace
//! runs -> " ", lowercase; pre-tokenizer CLIP's split regex then byte-level symbols; BPE with
//! the `</w>` end-of-word suffix; `BOS ... EOS`. We do the same on the `tokenizers` crate and
//! add diffusers' call convention (`padding="max_length"`, `truncation=True`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde_json::Value;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::replace::ReplacePattern;
use tokenizers::normalizers::{Lowercase, Replace, Sequence as NormalizerSequence, NFC};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use crate::error::{PipelineError, Result};

/// CLIP's pre-tokenizer split (transformers' `CLIPTokenizer`).
const CLIP_SPLIT_REGEX: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";
const END_OF_WORD_SUFFIX: &str = "</w>";
/// Upper bound for a usable `model_max_length`: transformers writes ~1e30 when it is unknown.
const MAX_SANE_LENGTH: u64 = 1 << 16;

/// The four special-token roles CLIP uses, in transformers' attribute order, with
/// `CLIPTokenizer`'s defaults for a folder that names none.
const ROLES: [(&str, &str); 4] = [
    ("bos_token", "<|startoftext|>"),
    ("eos_token", "<|endoftext|>"),
    ("unk_token", "<|endoftext|>"),
    ("pad_token", "<|endoftext|>"),
];

/// A special token as a config file states it: a plain string or an `AddedToken` object.
#[derive(Debug, Clone, PartialEq)]
struct SpecialToken {
    content: String,
    /// Whether the token is also matched in the normalized (lowercased...) text.
    normalized: bool,
    /// Written as a plain string (not an `AddedToken` object) in the config.
    plain: bool,
}

impl SpecialToken {
    fn parse(value: &Value, file: &Path, role: &str) -> Result<Option<Self>> {
        match value {
            Value::Null => Ok(None),
            // transformers turns a plain string into AddedToken(special=True, normalized=False).
            Value::String(s) => Ok(Some(Self {
                content: s.clone(),
                normalized: false,
                plain: true,
            })),
            Value::Object(map) => {
                let content = map.get("content").and_then(Value::as_str).ok_or_else(|| {
                    PipelineError::config(file, format!("{role} has no string \"content\""))
                })?;
                // A bare AddedToken dict has special=False, hence normalized=True by default.
                let special = map.get("special").and_then(Value::as_bool).unwrap_or(false);
                let normalized = map
                    .get("normalized")
                    .and_then(Value::as_bool)
                    .unwrap_or(!special);
                Ok(Some(Self {
                    content: content.to_owned(),
                    normalized,
                    plain: false,
                }))
            }
            other => Err(PipelineError::config(
                file,
                format!("{role} is neither a string nor an object: {other}"),
            )),
        }
    }
}

/// CLIP tokenizer producing exactly `max_length()` ids per prompt.
#[derive(Clone)]
pub struct ClipTokenizer {
    inner: Tokenizer,
    max_length: usize,
    bos_id: u32,
    eos_id: u32,
    pad_id: u32,
    /// Added words (textual-inversion names) and the ids past the vocabulary they stand for.
    expansions: HashMap<u32, Vec<u32>>,
}

impl std::fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipTokenizer")
            .field("max_length", &self.max_length)
            .field("bos_id", &self.bos_id)
            .field("eos_id", &self.eos_id)
            .field("pad_id", &self.pad_id)
            .finish_non_exhaustive()
    }
}

impl ClipTokenizer {
    /// Loads a diffusers `tokenizer/` folder: `vocab.json` + `merges.txt` (or `tokenizer.json`,
    /// preferred when present, as transformers does),
    /// `tokenizer_config.json` (required, for `model_max_length`) and optionally
    /// `special_tokens_map.json`, whose entries override the config's as in transformers.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let config_path = dir.join("tokenizer_config.json");
        let config = read_object(&config_path)?;
        let map_path = dir.join("special_tokens_map.json");
        let special_map = if map_path.is_file() {
            Some(read_object(&map_path)?)
        } else {
            None
        };

        let max_length = config
            .get("model_max_length")
            .and_then(Value::as_u64)
            .filter(|&n| (2..=MAX_SANE_LENGTH).contains(&n))
            .ok_or_else(|| {
                PipelineError::config(
                    &config_path,
                    "model_max_length must be an integer in 2..=65536",
                )
            })? as usize;

        // Resolve each role: special_tokens_map.json wins over tokenizer_config.json.
        let mut roles: HashMap<&str, SpecialToken> = HashMap::new();
        for (role, default) in ROLES {
            let from_map = match &special_map {
                Some(m) => m
                    .get(role)
                    .map(|v| SpecialToken::parse(v, &map_path, role))
                    .transpose()?
                    .flatten(),
                None => None,
            };
            let from_config = config
                .get(role)
                .map(|v| SpecialToken::parse(v, &config_path, role))
                .transpose()?
                .flatten();
            let token = from_map.or(from_config).unwrap_or_else(|| SpecialToken {
                content: default.to_owned(),
                normalized: false,
                plain: true,
            });
            roles.insert(role, token);
        }

        let Vocabulary {
            vocab,
            merges,
            added: json_added,
        } = read_vocabulary(dir)?;
        let token_id = |role: &str| -> Result<u32> {
            let content = &roles[role].content;
            vocab.get(content).copied().ok_or_else(|| {
                PipelineError::Tokenizer(format!(
                    "{role} {content:?} is not in the vocabulary of {}",
                    dir.display()
                ))
            })
        };
        let (bos_id, eos_id, pad_id) = (
            token_id("bos_token")?,
            token_id("eos_token")?,
            token_id("pad_token")?,
        );
        let unk = roles["unk_token"].content.clone();

        let bpe = BPE::builder()
            .vocab_and_merges(
                vocab
                    .into_iter()
                    .collect::<tokenizers::models::bpe::Vocab>(),
                merges,
            )
            .continuing_subword_prefix(String::new())
            .end_of_word_suffix(END_OF_WORD_SUFFIX.to_owned())
            .unk_token(unk)
            .fuse_unk(false)
            .build()
            .map_err(tok_err)?;

        let mut inner = Tokenizer::new(bpe);
        let normalizer = NormalizerSequence::new(vec![
            NFC.into(),
            Replace::new(ReplacePattern::Regex(r"\s+".to_owned()), " ")
                .map_err(tok_err)?
                .into(),
            Lowercase.into(),
        ]);
        inner.with_normalizer(Some(normalizer)).map_err(tok_err)?;
        let split = Split::new(
            SplitPattern::Regex(CLIP_SPLIT_REGEX.to_owned()),
            SplitDelimiterBehavior::Removed,
            true,
        )
        .map_err(tok_err)?;
        // transformers 5 leaves ByteLevel's GPT-2 regex on (openai's tokenizer.json turns it
        // off). It only matters for a piece matched by the special-token alternatives of the
        // split regex that is not itself an added token, e.g. "<|ENDOFTEXT|>" lowercased:
        // the GPT-2 regex splits it into "<|", "endoftext", "|>".
        let byte_level = ByteLevel::new(false, true, true);
        inner.with_pre_tokenizer(Some(PreTokenizerSequence::new(vec![
            split.into(),
            byte_level.into(),
        ])));
        // BOS/EOS, truncation and padding are applied in `encode`.

        // Special tokens are matched in the text before BPE; a token with `normalized` also
        // matches in the normalized (lowercased...) text. Which flag wins when several roles
        // name one content follows transformers 5.24: it lists tokenizer.json's added tokens,
        // then the role values in order, skipping a role whose content tokenizer.json already
        // has and a value equal to one already listed (a string equals only the same string,
        // an AddedToken only an AddedToken with the same flag); the backend keeps the last
        // listed for each content. So the published SD 1.5 folder (eos/unk AddedTokens with
        // normalized: true, pad a plain string) ends with EOS not normalized, BOS normalized.
        let mut listed: Vec<&SpecialToken> = json_added.iter().collect();
        for (role, _) in ROLES {
            let t = &roles[role];
            if !json_added.iter().any(|a| a.content == t.content) && !listed.contains(&t) {
                listed.push(t);
            }
        }
        let mut added: Vec<AddedToken> = Vec::new();
        for t in listed {
            let token = AddedToken::from(t.content.clone(), true).normalized(t.normalized);
            match added.iter_mut().find(|a| a.content == t.content) {
                Some(a) => *a = token,
                None => added.push(token),
            }
        }
        inner.add_special_tokens(added).map_err(tok_err)?;

        Ok(Self {
            inner,
            max_length,
            bos_id,
            eos_id,
            pad_id,
            expansions: HashMap::new(),
        })
    }

    /// Token ids as diffusers' `tokenizer(prompt, padding="max_length",
    /// max_length=model_max_length, truncation=True)`: BOS, at most `max_length - 2` text
    /// tokens, EOS, then the pad token up to `max_length`.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let body = self.tokenize(text)?;
        let keep = body.len().min(self.max_length - 2);
        let mut ids = Vec::with_capacity(self.max_length);
        ids.push(self.bos_id);
        ids.extend_from_slice(&body[..keep]);
        ids.push(self.eos_id);
        ids.resize(self.max_length, self.pad_id);
        Ok(ids)
    }

    /// The ids of `text` alone: no BOS/EOS, no truncation or padding (how A1111 tokenizes each
    /// piece of a prompt).
    pub fn tokenize(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self.inner.encode(text, false).map_err(tok_err)?;
        let ids = encoding.get_ids();
        if self.expansions.is_empty() {
            return Ok(ids.to_vec());
        }
        Ok(ids
            .iter()
            .flat_map(|id| match self.expansions.get(id) {
                Some(ids) => ids.clone(),
                None => vec![*id],
            })
            .collect())
    }

    /// Adds `word` as a token (matched in the text before BPE, as transformers' `add_tokens`)
    /// that stands for the ids `ids` (textual inversion: ids past the vocabulary). A word the
    /// vocabulary already has is refused, as diffusers' `load_textual_inversion` refuses it.
    pub fn add_word(&mut self, word: &str, ids: Vec<u32>) -> Result<()> {
        if self.inner.token_to_id(word).is_some() {
            return Err(PipelineError::Tokenizer(format!(
                "{word:?} is already a token of the vocabulary"
            )));
        }
        self.inner
            .add_tokens(vec![AddedToken::from(word.to_owned(), false)])
            .map_err(tok_err)?;
        let id = self.inner.token_to_id(word).ok_or_else(|| {
            PipelineError::Tokenizer(format!("could not add {word:?} to the tokenizer"))
        })?;
        self.expansions.insert(id, ids);
        Ok(())
    }

    /// The id of a vocabulary entry (e.g. `",</w>"`), if the vocabulary has it.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// `model_max_length` from `tokenizer_config.json` (77 for CLIP).
    pub fn max_length(&self) -> usize {
        self.max_length
    }

    pub fn bos_id(&self) -> u32 {
        self.bos_id
    }

    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }
}

fn tok_err(e: impl std::fmt::Display) -> PipelineError {
    PipelineError::Tokenizer(e.to_string())
}

fn read_object(path: &Path) -> Result<serde_json::Map<String, Value>> {
    match crate::error::read_json::<Value>(path)? {
        Value::Object(m) => Ok(m),
        _ => Err(PipelineError::config(path, "expected a JSON object")),
    }
}

type Vocab = HashMap<String, u32>;
type Merges = Vec<(String, String)>;

/// What a tokenizer folder holds for the BPE model.
struct Vocabulary {
    vocab: Vocab,
    merges: Merges,
    /// `tokenizer.json`'s `added_tokens` in id order (empty without a tokenizer.json).
    added: Vec<SpecialToken>,
}

/// transformers 5 takes vocabulary and merges from `tokenizer.json` when there is one (the
/// rest of that file's pipeline is ignored: `CLIPTokenizer` rebuilds its own), else from
/// `vocab.json` + `merges.txt`.
fn read_vocabulary(dir: &Path) -> Result<Vocabulary> {
    let json_path = dir.join("tokenizer.json");
    if json_path.is_file() {
        return read_tokenizer_json(&json_path);
    }
    let vocab_path = dir.join("vocab.json");
    let merges_path = dir.join("merges.txt");
    if !(vocab_path.is_file() && merges_path.is_file()) {
        return Err(PipelineError::config(
            PathBuf::from(dir),
            "tokenizer folder has neither tokenizer.json nor vocab.json + merges.txt",
        ));
    }
    let vocab: Vocab = crate::error::read_json(&vocab_path)?;
    let text =
        std::fs::read_to_string(&merges_path).map_err(|e| PipelineError::io(&merges_path, e))?;
    Ok(Vocabulary {
        vocab,
        merges: parse_merges(&text),
        added: Vec::new(),
    })
}

fn read_tokenizer_json(json_path: &Path) -> Result<Vocabulary> {
    let json = read_object(json_path)?;
    let bad =
        |what: &str| PipelineError::config(json_path, format!("{what} missing or not BPE-shaped"));
    let model = json.get("model").and_then(Value::as_object);
    let vocab: Vocab = serde_json::from_value(
        model
            .and_then(|m| m.get("vocab"))
            .cloned()
            .ok_or_else(|| bad("model.vocab"))?,
    )
    .map_err(|_| bad("model.vocab"))?;
    let mut merges = Vec::new();
    for m in model
        .and_then(|m| m.get("merges"))
        .and_then(Value::as_array)
        .ok_or_else(|| bad("model.merges"))?
    {
        // Older files store "a b" strings, newer ones ["a", "b"] pairs.
        let pair = match m {
            Value::String(s) => s.split_once(' ').map(|(a, b)| (a.to_owned(), b.to_owned())),
            Value::Array(p) if p.len() == 2 => match (p[0].as_str(), p[1].as_str()) {
                (Some(a), Some(b)) => Some((a.to_owned(), b.to_owned())),
                _ => None,
            },
            _ => None,
        };
        merges.push(pair.ok_or_else(|| bad("model.merges"))?);
    }
    let mut added: Vec<(u64, SpecialToken)> = Vec::new();
    if let Some(list) = json.get("added_tokens").and_then(Value::as_array) {
        for t in list {
            let id = t
                .get("id")
                .and_then(Value::as_u64)
                .ok_or_else(|| bad("added_tokens.id"))?;
            // Entries are AddedToken objects; an absent flag means normalized = !special.
            if let Some(tok) = SpecialToken::parse(t, json_path, "added_tokens")? {
                added.push((id, tok));
            }
        }
    }
    added.sort_by_key(|(id, _)| *id);
    Ok(Vocabulary {
        vocab,
        merges,
        added: added.into_iter().map(|(_, t)| t).collect(),
    })
}

/// Parses `merges.txt` as transformers does: strip each line, skip blank and `#` lines,
/// keep lines of exactly two whitespace-separated symbols.
fn parse_merges(text: &str) -> Merges {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| {
            let mut parts = l.split_whitespace();
            match (parts.next(), parts.next(), parts.next()) {
                (Some(a), Some(b), None) => Some((a.to_owned(), b.to_owned())),
                _ => None,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture_dir() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/clip-tokenizer")
    }

    #[test]
    fn merges_parsing_skips_header_and_blank_lines() {
        let m = parse_merges("#version: 0.2\ni n\n\nt h</w>\n  a b  \nbad line here\n");
        assert_eq!(
            m,
            vec![
                ("i".to_owned(), "n".to_owned()),
                ("t".to_owned(), "h</w>".to_owned()),
                ("a".to_owned(), "b".to_owned())
            ]
        );
    }

    #[test]
    fn special_token_forms() {
        let p = Path::new("x.json");
        let s = SpecialToken::parse(&Value::String("<a>".into()), p, "bos_token")
            .unwrap()
            .unwrap();
        assert_eq!(
            s,
            SpecialToken {
                content: "<a>".into(),
                normalized: false,
                plain: true,
            }
        );
        let d = serde_json::json!({"__type": "AddedToken", "content": "<b>", "normalized": true});
        assert!(
            SpecialToken::parse(&d, p, "eos_token")
                .unwrap()
                .unwrap()
                .normalized
        );
        let d = serde_json::json!({"content": "<b>", "special": true});
        assert!(
            !SpecialToken::parse(&d, p, "eos_token")
                .unwrap()
                .unwrap()
                .normalized
        );
        assert!(SpecialToken::parse(&Value::Null, p, "pad_token")
            .unwrap()
            .is_none());
        assert!(SpecialToken::parse(&serde_json::json!(3), p, "pad_token").is_err());
    }

    #[test]
    fn real_clip_ids_and_layout() {
        let tok = ClipTokenizer::from_dir(&fixture_dir()).unwrap();
        assert_eq!(
            (tok.max_length(), tok.bos_id(), tok.eos_id(), tok.pad_id()),
            (77, 49406, 49407, 49407)
        );
        let ids = tok.encode("").unwrap();
        assert_eq!(ids.len(), 77);
        assert_eq!(&ids[..2], &[49406, 49407]);
        let long = "cat ".repeat(200);
        let ids = tok.encode(&long).unwrap();
        assert_eq!((ids.len(), ids[0], ids[76]), (77, 49406, 49407));
    }

    #[test]
    fn missing_config_is_an_error() {
        let err = ClipTokenizer::from_dir(Path::new("/nonexistent-tokenizer-dir")).unwrap_err();
        assert!(matches!(err, PipelineError::Io { .. }), "{err}");
    }
}
