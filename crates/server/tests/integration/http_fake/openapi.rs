//! The OpenAPI document: served with offline docs, and walked property by property against the
//! server.

use super::*;

#[test]
fn openapi_and_offline_docs() {
    let s = ready(fake("step_ms=0"));
    let r = s.get("/openapi.json");
    assert_eq!(r.status, 200);
    let committed =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.json")).unwrap();
    assert_eq!(r.text(), committed);
    // Every documented operation is routed (no 405, no route-level 404).
    let doc = r.json();
    for (path, ops) in doc["paths"].as_object().unwrap() {
        for method in ops.as_object().unwrap().keys() {
            let url = path.replace("{id}", "no-such-job");
            let resp = s.request(&method.to_uppercase(), &url, &[], b"");
            assert_ne!(resp.status, 405, "{method} {path}");
            if resp.status == 404 {
                assert_ne!(resp.json()["error_code"], "not_found", "{method} {path}");
            }
        }
    }
    let d = s.get("/docs");
    assert_eq!(d.status, 200);
    assert!(d.header("content-type").unwrap().starts_with("text/html"));
    let html = d.text();
    assert!(html.contains("/openapi.json") && html.contains("/generate"));
    for external in ["src=\"http", "href=\"http", "src='http", "@import", "cdn"] {
        assert!(
            !html.to_lowercase().contains(external),
            "docs page loads something external: {external}"
        );
    }
}

/// Whether a property schema admits `null` (`type: [.., "null"]` or a `oneOf` with a null type).
fn nullable(prop: &serde_json::Value) -> bool {
    prop["type"]
        .as_array()
        .is_some_and(|t| t.iter().any(|t| t == "null"))
        || prop["oneOf"]
            .as_array()
            .is_some_and(|alts| alts.iter().any(|a| a["type"] == "null"))
}

/// Follows a local `$ref` (directly or as the first `oneOf` alternative) to its schema.
fn resolve<'a>(doc: &'a serde_json::Value, prop: &'a serde_json::Value) -> &'a serde_json::Value {
    let r = prop["$ref"]
        .as_str()
        .or_else(|| prop["oneOf"][0]["$ref"].as_str());
    match r {
        Some(r) => doc
            .pointer(r.trim_start_matches('#'))
            .unwrap_or_else(|| panic!("dangling {r}")),
        None => prop,
    }
}

/// The server's own OpenAPI document, walked property by property against the server: what the
/// document calls nullable, optional, bounded, defaulted or enumerated, the server treats so.
#[test]
fn the_openapi_schema_and_the_server_agree() {
    let s = ready(with(
        fake("step_ms=0"),
        &[("RESPONSE_CACHE_MB", "0"), ("MAX_CONCURRENT_REQUESTS", "8")],
    ));
    let doc = s.get("/openapi.json").json();
    let schema = resolve(
        &doc,
        &doc["paths"]["/generate"]["post"]["requestBody"]["content"]["application/json"]["schema"],
    );
    let props = schema["properties"].as_object().expect("properties");
    let required: Vec<&str> = schema["required"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(schema["additionalProperties"], false);
    // Small and seeded, so two answers can be compared image for image.
    let base = json!({"prompt": "x", "steps": 1, "width": 256, "height": 256, "seed": 7});
    // Fields that only go in pairs: a value for one comes with a valid value for the other.
    let partner = |field: &str| match field {
        "seed_resize_from_width" => Some(("seed_resize_from_height", json!(320))),
        "seed_resize_from_height" => Some(("seed_resize_from_width", json!(320))),
        _ => None,
    };
    let send = |field: &str, value: serde_json::Value| {
        let mut body = base.clone();
        if let Some((other, v)) = partner(field).filter(|_| !value.is_null()) {
            body[other] = v;
        }
        body[field] = value;
        s.post_json(&body)
    };
    let same = |a: &common::Resp, b: &common::Resp, what: &str| {
        let (mut a, mut b) = (a.json(), b.json());
        for j in [&mut a, &mut b] {
            j["metadata"]
                .as_object_mut()
                .unwrap()
                .remove("generation_time_seconds");
        }
        assert_eq!(a, b, "{what}");
    };
    for (name, prop) in props {
        let target = resolve(&doc, prop);
        let is_required = required.contains(&name.as_str());
        // null: the default for every optional field, a 422 for a required one.
        assert_eq!(
            nullable(prop),
            !is_required,
            "{name}: nullable in the document"
        );
        let r = send(name, serde_json::Value::Null);
        if is_required {
            assert_eq!(r.broken_fields(), [name.as_str()], "{name}: null");
        } else {
            assert_eq!(r.status, 200, "{name}: null: {}", r.text());
            let mut absent = base.clone();
            absent.as_object_mut().unwrap().remove(name);
            let a = s.post_json(&absent);
            if name != "seed" {
                same(&r, &a, &format!("{name}: null and absent"));
            }
        }
        // The documented default is what an absent field gets.
        if let Some(default) = prop.get("default") {
            let mut absent = base.clone();
            absent.as_object_mut().unwrap().remove(name);
            same(
                &send(name, default.clone()),
                &s.post_json(&absent),
                &format!("{name}: default {default}"),
            );
        }
        // Bounds: the edges pass, one past them is a 422 naming the field.
        let is_int = target["type"] == "integer"
            || target["type"]
                .as_array()
                .is_some_and(|t| t.iter().any(|t| t == "integer"));
        let step = if is_int { 1.0 } else { 0.01 };
        for (key, edge, sign) in [("minimum", "min", -1.0), ("maximum", "max", 1.0)] {
            let Some(bound) = target[key].as_f64() else {
                continue;
            };
            let (ok, bad) = if is_int {
                (json!(bound as u64), json!(bound as i64 + sign as i64))
            } else {
                (json!(bound), json!(bound + sign * step))
            };
            let r = send(name, ok.clone());
            assert_eq!(r.status, 200, "{name}: {edge} {ok}: {}", r.text());
            assert_eq!(
                send(name, bad.clone()).broken_fields(),
                [name.as_str()],
                "{name}: {bad}"
            );
        }
        if let Some(m) = target["multipleOf"].as_u64() {
            let off = target["minimum"].as_u64().unwrap_or(0) + m + m / 2;
            assert_eq!(
                send(name, json!(off)).broken_fields(),
                [name.as_str()],
                "{name}: {off}"
            );
        }
        if let Some(max) = target["maxLength"].as_u64() {
            let r = send(name, json!("a".repeat(max as usize)));
            assert_eq!(r.status, 200, "{name}: maxLength: {}", r.text());
            let long = json!("a".repeat(max as usize + 1));
            assert_eq!(send(name, long).broken_fields(), [name.as_str()], "{name}");
        }
        if target["minLength"].as_u64() == Some(1) {
            assert_eq!(
                send(name, json!("")).broken_fields(),
                [name.as_str()],
                "{name}"
            );
        }
        if let Some(values) = target["enum"].as_array() {
            for v in values {
                // Every schedule runs with euler (the fake model's own, pndm, has uniform only).
                let r = if name == "schedule" {
                    let mut body = base.clone();
                    body["scheduler"] = json!("euler");
                    body[name.as_str()] = v.clone();
                    s.post_json(&body)
                } else {
                    send(name, v.clone())
                };
                assert_eq!(r.status, 200, "{name}: {v}: {}", r.text());
            }
            let r = send(name, json!("not-one-of-them"));
            assert_eq!(r.broken_fields(), [name.as_str()], "{name}");
        }
    }
    // Every property is checked, and nothing else is allowed: a body breaking all of them at
    // once (a JSON object fits no property's type) names exactly the document's properties.
    let mut all = serde_json::Map::new();
    for name in props.keys() {
        all.insert(name.clone(), json!({"wrong": "type"}));
    }
    all.insert("not_in_the_document".into(), json!(1));
    let mut broken = s.post_json(&serde_json::Value::Object(all)).broken_fields();
    broken.sort();
    let mut want: Vec<String> = props.keys().cloned().collect();
    want.push("not_in_the_document".into());
    want.sort();
    assert_eq!(broken, want);
}
