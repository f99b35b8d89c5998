//! A1111's prompt scheduling (prompt editing, alternation) and AND splitting against the
//! schedules A1111's own `prompt_parser.py` makes (`tools/make_prompt_schedule_fixtures.py`):
//! handpicked prompts over several step counts and hires passes, and seeded random ones.

use std::path::Path;

use sdserve_pipeline::prompt_schedule::{and_parts, schedule};
use serde_json::Value;

fn fixture() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/prompt_schedules.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn schedules_match_a1111() {
    let fixture = fixture();
    let cases = fixture["schedules"].as_array().unwrap();
    assert!(cases.len() > 1000, "{}", cases.len());
    let mut failures = Vec::new();
    let mut scheduled = 0;
    for case in cases {
        let prompt = case["prompt"].as_str().unwrap();
        let steps = case["steps"].as_u64().unwrap() as usize;
        let hires = case["hires_steps"].as_u64().map(|h| h as usize);
        let want: Vec<(usize, String)> = case["schedule"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                (
                    e[0].as_u64().unwrap() as usize,
                    e[1].as_str().unwrap().to_string(),
                )
            })
            .collect();
        scheduled += usize::from(want.len() > 1);
        let got = schedule(prompt, steps, hires);
        if got != want {
            failures.push(format!(
                "{prompt:?} steps {steps} hires {hires:?}:\n  got  {got:?}\n  want {want:?}"
            ));
        }
    }
    // The fixture exercises the scheduling itself, not only the fallback.
    assert!(scheduled > 200, "{scheduled}");
    assert!(
        failures.is_empty(),
        "{} of {} differ:\n{}",
        failures.len(),
        cases.len(),
        failures[..failures.len().min(10)].join("\n")
    );
}

#[test]
fn and_parts_match_a1111() {
    let fixture = fixture();
    let mut failures = Vec::new();
    for case in fixture["and_parts"].as_array().unwrap() {
        let prompt = case["prompt"].as_str().unwrap();
        let want: Vec<(String, f64)> = case["parts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| (p[0].as_str().unwrap().to_string(), p[1].as_f64().unwrap()))
            .collect();
        let got: Vec<(String, f64)> = and_parts(prompt)
            .into_iter()
            .map(|p| (p.text, p.weight))
            .collect();
        if got != want {
            failures.push(format!("{prompt:?}: got {got:?}, want {want:?}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
