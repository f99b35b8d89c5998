//! Property-based fuzzing of everything the server parses from outside: request bodies (bytes,
//! arbitrary JSON, near-valid objects), key headers, keys files and request ids. Properties: no
//! panic; every rejection is the right 4xx error; whatever is accepted obeys the contract.
//! The dialects (`dialects`, `multipart`) run through the real router in process; request images
//! (`images`) are decoded under a counting allocator.
//!
//! `PROPTEST_CASES` sets the cases per property (CI: the default below; a long run: 100000).

use axum::http::{HeaderMap, HeaderValue, StatusCode};
use proptest::prelude::*;
use serde_json::{json, Map, Value};

use crate::error::ApiError;
use crate::security::keys::{presented_key, KeyStore};
use crate::validate::{self, parse_generate};

pub(super) fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000)
}

pub(super) fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|v| json!(v)),
        any::<u64>().prop_map(|v| json!(v)),
        any::<f64>().prop_map(|v| json!(v)),
        ".{0,40}".prop_map(Value::String),
        "[a-z_]{0,12}".prop_map(Value::String),
    ];
    leaf.prop_recursive(6, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
            prop::collection::btree_map("[a-z_]{0,12}", inner, 0..8)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Objects built from the contract's own fields with values around their edges, so most cases
/// get past the first rule and exercise the later ones.
fn near_valid() -> impl Strategy<Value = Value> {
    let int = prop_oneof![
        Just(json!(0)),
        Just(json!(1)),
        Just(json!(50)),
        Just(json!(51)),
        Just(json!(256)),
        Just(json!(320)),
        Just(json!(768)),
        Just(json!(769)),
        Just(json!(4294967295u64)),
        Just(json!(4294967296u64)),
        Just(json!(-1)),
        Just(json!(20.0)),
        Just(json!(2.5)),
        Just(json!(1e300)),
        Just(json!("20")),
        Just(Value::Null),
        any::<i64>().prop_map(|v| json!(v)),
    ];
    let text = prop_oneof![
        ".{0,20}".prop_map(Value::String),
        Just(json!("")),
        Just(json!("\u{0}\u{7}\u{1b} \t\n")),
        Just(json!("ж".repeat(500))),
        Just(json!("ж".repeat(501))),
        Just(json!("a\u{200b}".repeat(300))),
        Just(Value::Null),
        Just(json!(5)),
        Just(json!(["a"])),
    ];
    let float = prop_oneof![
        any::<f64>().prop_map(|v| json!(v)),
        Just(json!(0.0)),
        Just(json!(30.0)),
        Just(json!(30.000001)),
        Just(json!(-0.0)),
        Just(Value::Null),
        Just(json!("7.5")),
    ];
    let sched = prop_oneof![
        Just(json!("euler")),
        Just(json!("dpmpp_2m_karras")),
        Just(json!("EULER")),
        Just(json!("")),
        Just(Value::Null),
        Just(json!(3)),
    ];
    (
        prop::option::of(text.clone()),
        prop::option::of(text),
        prop::option::of(int.clone()),
        prop::option::of(int.clone()),
        prop::option::of(int.clone()),
        prop::option::of(int),
        prop::option::of(float),
        prop::option::of(sched),
        prop::option::of(("[a-z]{1,8}", any_json())),
    )
        .prop_map(|(p, n, st, w, h, seed, g, sc, extra)| {
            let mut m = Map::new();
            for (k, v) in [
                ("prompt", p),
                ("negative_prompt", n),
                ("steps", st),
                ("width", w),
                ("height", h),
                ("seed", seed),
                ("guidance_scale", g),
                ("scheduler", sc),
            ] {
                if let Some(v) = v {
                    m.insert(k.to_string(), v);
                }
            }
            if let Some((k, v)) = extra {
                m.insert(k, v);
            }
            Value::Object(m)
        })
}

/// The result of one body: an accepted request obeys every rule; a rejection is 400 or 422
/// and a 422 names a field.
fn check_outcome(r: Result<validate::ValidRequest, ApiError>) {
    match r {
        Ok(v) => {
            let n = v.prompt.chars().count();
            assert!((1..=validate::PROMPT_MAX_CHARS).contains(&n), "{v:?}");
            assert!(v.negative_prompt.chars().count() <= validate::PROMPT_MAX_CHARS);
            assert!((1..=50).contains(&v.steps), "{v:?}");
            for s in [v.width, v.height] {
                assert!((256..=768).contains(&s) && s % 64 == 0, "{v:?}");
            }
            assert!((0.0..=30.0).contains(&v.guidance_scale), "{v:?}");
            assert!(!v
                .prompt
                .chars()
                .any(|c| c.is_control() && !c.is_whitespace()));
        }
        Err(e) => {
            let (status, _) = e.status_and_code();
            assert!(
                status == StatusCode::BAD_REQUEST || status == StatusCode::UNPROCESSABLE_ENTITY,
                "{e:?}"
            );
            // (A field may be named "" when the body has an unknown key "".)
            for f in e.fields() {
                assert!(!f.rule.is_empty(), "{e:?}");
            }
            if status == StatusCode::UNPROCESSABLE_ENTITY {
                assert!(!e.fields().is_empty(), "{e:?}");
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn generate_body_bytes(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        check_outcome(parse_generate(&bytes));
    }

    #[test]
    fn generate_body_any_json(v in any_json()) {
        check_outcome(parse_generate(v.to_string().as_bytes()));
    }

    #[test]
    fn generate_body_near_valid(v in near_valid()) {
        check_outcome(parse_generate(v.to_string().as_bytes()));
    }

    #[test]
    fn content_type_values(s in ".{0,60}") {
        let _ = validate::check_content_type(Some(&s));
    }

    #[test]
    fn key_headers(auth in prop::collection::vec(any::<u8>(), 0..80), api in prop::option::of(prop::collection::vec(any::<u8>(), 0..80))) {
        let store = KeyStore::load(Some("the-key"), None).unwrap();
        let mut h = HeaderMap::new();
        if let Ok(v) = HeaderValue::from_bytes(&auth) {
            h.insert("authorization", v);
        }
        if let Some(Ok(v)) = api.map(|a| HeaderValue::from_bytes(&a)) {
            h.insert("x-api-key", v);
        }
        if let Ok(Some(k)) = presented_key(&h) {
            let ok = store.verify(k).is_some();
            prop_assert_eq!(ok, k == b"the-key");
        }
    }

    #[test]
    fn keys_files(text in "(sha256:[0-9a-fA-F]{0,70}|[^\n]{0,30}|#.*|\\s*)(\n(sha256:[0-9a-f]{64}|[^\n]{0,30}))*") {
        let dir = std::env::temp_dir().join(format!("sdserve-fuzz-keys-{}-{:?}", std::process::id(), std::thread::current().id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("keys");
        std::fs::write(&f, &text).unwrap();
        if let Ok(store) = KeyStore::load(None, Some(&f)) {
            prop_assert!(store.enabled());
            // Every plain line is a key that verifies.
            for line in text.lines().map(str::trim) {
                if !line.is_empty() && !line.starts_with('#') && !line.starts_with("sha256:") {
                    prop_assert!(store.verify(line.as_bytes()).is_some(), "{:?}", line);
                }
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// Nesting far past serde_json's recursion limit is a clean 400, not a stack overflow.
#[test]
fn deeply_nested_bodies_are_rejected_cleanly() {
    for depth in [127usize, 128, 129, 10_000, 1_000_000] {
        for (open, close) in [("[", "]"), ("{\"a\":", "}")] {
            let mut body = String::from("{\"prompt\":");
            body.push_str(&open.repeat(depth));
            body.push('1');
            body.push_str(&close.repeat(depth));
            body.push('}');
            let e = parse_generate(body.as_bytes()).unwrap_err();
            let (status, _) = e.status_and_code();
            assert!(
                status == StatusCode::BAD_REQUEST || status == StatusCode::UNPROCESSABLE_ENTITY,
                "{depth}: {e:?}"
            );
        }
    }
}

mod dialects;
pub(crate) mod harness;
pub(crate) mod images;

pub(crate) use images::peak_during;
mod multipart;
