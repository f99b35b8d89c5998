//! Against what A1111's own `modules/styles.py` makes of the same files
//! (tools/make_styles_fixtures.py writes tests/fixtures/styles/styles.json).

use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};

use super::{Dialect, Style, StyleBook};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/styles")
}

fn reference() -> Value {
    serde_json::from_slice(&std::fs::read(fixtures().join("styles.json")).unwrap()).unwrap()
}

fn book(file: &str) -> StyleBook {
    StyleBook::new(Some(fixtures().join(file)))
}

#[test]
fn files_load_as_a1111_loads_them() {
    let reference = reference();
    for (file, want) in reference["files"].as_object().unwrap() {
        let want: Vec<Style> = want
            .as_array()
            .unwrap()
            .iter()
            .map(|s| Style {
                name: s["name"].as_str().unwrap().into(),
                prompt: s["prompt"].as_str().unwrap().into(),
                // A1111 keeps None for a row without the column (and fails when a request
                // uses it); here it is "".
                negative_prompt: s["negative_prompt"].as_str().unwrap_or("").into(),
            })
            .collect();
        assert_eq!(book(file).styles().unwrap(), want, "{file}");
    }
}

#[test]
fn requests_get_a1111_s_prompts() {
    let reference = reference();
    let cases = reference["cases"].as_array().unwrap();
    assert!(cases.len() >= 15);
    for case in cases {
        for dialect in [Dialect::Native, Dialect::A1111] {
            let mut body = Map::new();
            body.insert("prompt".into(), case["prompt"].clone());
            body.insert("negative_prompt".into(), case["negative_prompt"].clone());
            body.insert("styles".into(), case["styles"].clone());
            let names = book(case["file"].as_str().unwrap())
                .apply(&mut body, dialect)
                .unwrap();
            assert_eq!(json!(names), case["styles"]);
            assert_eq!(body["prompt"], case["want_prompt"], "{case}");
            assert_eq!(
                body["negative_prompt"], case["want_negative_prompt"],
                "{case}"
            );
        }
    }
}

fn apply(book: &StyleBook, body: Value, dialect: Dialect) -> Result<Value, String> {
    let mut map = body.as_object().unwrap().clone();
    book.apply(&mut map, dialect)
        .map(|_| Value::Object(map))
        .map_err(|e| serde_json::to_string(&e.body()).unwrap())
}

#[test]
fn hires_prompts_get_the_styles_and_absent_prompts_follow_each_dialect() {
    let b = book("styles.csv");
    // A1111: an absent prompt is "", an empty hr_prompt stays empty (the hires pass takes
    // the first pass's, already styled), a given one is styled.
    let a = apply(
        &b,
        json!({"styles": ["Appended"], "hr_prompt": "", "hr_negative_prompt": "dim"}),
        Dialect::A1111,
    )
    .unwrap();
    assert_eq!(a["prompt"], "masterpiece, best quality");
    assert_eq!(a["negative_prompt"], "lowres");
    assert_eq!(a["hr_prompt"], "");
    assert_eq!(a["hr_negative_prompt"], "dim, lowres");
    // Native: an absent prompt stays absent (validation names it); hires prompts styled.
    let n = apply(
        &b,
        json!({"styles": ["Appended"], "hires": {"scale": 2, "prompt": "big cat"}}),
        Dialect::Native,
    )
    .unwrap();
    assert!(n.get("prompt").is_none(), "{n}");
    assert_eq!(n["hires"]["prompt"], "big cat, masterpiece, best quality");
    assert!(n["hires"].get("negative_prompt").is_none(), "{n}");
    // No styles: nothing changes.
    let same = json!({"prompt": "x", "styles": []});
    assert_eq!(apply(&b, same.clone(), Dialect::Native).unwrap(), same);
    let same = json!({"prompt": "x", "styles": null});
    assert_eq!(apply(&b, same.clone(), Dialect::Native).unwrap(), same);
}

#[test]
fn bad_styles_are_422s_naming_styles() {
    let b = book("styles.csv");
    for (body, rule) in [
        (
            json!({"prompt": "x", "styles": "Appended"}),
            "must be a list of style names",
        ),
        (
            json!({"prompt": "x", "styles": [1]}),
            "must be a list of style names",
        ),
        (
            json!({"prompt": "x", "styles": vec!["Appended"; 17]}),
            "at most 16 styles",
        ),
        (
            json!({"prompt": "x", "styles": ["x".repeat(100_000)]}),
            "a style name is at most 255 characters",
        ),
        (
            json!({"prompt": "x", "styles": ["Appended", "Nope"]}),
            "unknown style \\\"Nope\\\"; STYLES_FILE has: Cinematic, Appended, Spaced",
        ),
    ] {
        let e = apply(&b, body, Dialect::Native).unwrap_err();
        assert!(
            e.contains("\"field\":\"styles\"") && e.contains(rule),
            "{e}"
        );
    }
    let none = StyleBook::new(None);
    let e = apply(&none, json!({"styles": ["Appended"]}), Dialect::A1111).unwrap_err();
    assert!(e.contains("no STYLES_FILE is set"), "{e}");
    // A file that is not there: no styles, as in A1111.
    let missing = StyleBook::new(Some(fixtures().join("no-such.csv")));
    assert_eq!(missing.styles().unwrap(), []);
    // One A1111 cannot read (no `name` column): the reason reaches the 422.
    let dir = std::env::temp_dir().join(format!("sdserve-styles-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("bad.csv"), "title,prompt\nA,b\n").unwrap();
    let bad = StyleBook::new(Some(dir.join("bad.csv")));
    let e = apply(
        &bad,
        json!({"prompt": "x", "styles": ["A"]}),
        Dialect::Native,
    )
    .unwrap_err();
    assert!(
        e.contains("could not be read (STYLES_FILE has no `name` column)"),
        "{e}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
