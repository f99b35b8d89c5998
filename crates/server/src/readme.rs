//! README.md's lists come from the sources the binary itself uses, so they cannot drift: the
//! request fields and `/health` fields from the OpenAPI document, the configuration from the
//! `serve` command's flags, the Rust version from Cargo.toml (checked against Cargo.lock).
//! `UPDATE_README=1 cargo test -p sdserve --bin sdserve readme` rewrites the generated blocks.

use serde_json::Value;

const README: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md");
const WORKSPACE_TOML: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../Cargo.toml");

fn doc() -> Value {
    serde_json::from_str(&crate::api::openapi_string()).expect("OpenAPI is JSON")
}

/// Follows a local `$ref`.
fn resolve<'a>(doc: &'a Value, v: &'a Value) -> &'a Value {
    match v["$ref"].as_str() {
        Some(r) => doc.pointer(r.trim_start_matches('#')).unwrap_or(v),
        None => v,
    }
}

/// The alternatives of a property: itself, or the members of its `oneOf`, without `null`.
fn alternatives<'a>(doc: &'a Value, prop: &'a Value) -> Vec<&'a Value> {
    match prop["oneOf"].as_array() {
        Some(alts) => alts
            .iter()
            .filter(|a| a["type"] != "null")
            .map(|a| resolve(doc, a))
            .collect(),
        None => vec![resolve(doc, prop)],
    }
}

fn type_name(doc: &Value, prop: &Value) -> String {
    let mut names = Vec::new();
    for alt in alternatives(doc, prop) {
        let types: Vec<String> = match &alt["type"] {
            Value::String(t) => vec![t.clone()],
            Value::Array(ts) => ts
                .iter()
                .filter_map(|t| t.as_str())
                .filter(|t| *t != "null")
                .map(str::to_string)
                .collect(),
            _ => vec!["object".into()],
        };
        for t in types {
            let t = if t == "array" {
                let item = resolve(doc, &alt["items"]);
                format!("array of {}", type_name(doc, item))
            } else {
                t
            };
            if !names.contains(&t) {
                names.push(t);
            }
        }
    }
    names.join(" or ")
}

fn one_line(s: &str) -> String {
    s.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .replace('|', "\\|")
}

fn description(doc: &Value, prop: &Value) -> String {
    let own = prop["description"]
        .as_str()
        .or_else(|| prop["oneOf"][0]["description"].as_str());
    let target = alternatives(doc, prop);
    own.or_else(|| target.first().and_then(|t| t["description"].as_str()))
        .map(one_line)
        .unwrap_or_default()
}

/// Non-empty pieces as sentences: `a. B.`
fn sentences(pieces: &[String]) -> String {
    pieces
        .iter()
        .map(|p| p.trim().trim_end_matches('.'))
        .filter(|p| !p.is_empty())
        .map(|p| format!("{p}."))
        .collect::<Vec<_>>()
        .join(" ")
}

fn num(v: &Value) -> String {
    match v.as_f64() {
        Some(f) if f.fract() == 0.0 && f.abs() < 1e16 => format!("{}", f as i64),
        _ => v.to_string(),
    }
}

/// The rule a property's schema states, in words.
fn rule(doc: &Value, prop: &Value) -> String {
    let mut parts = Vec::new();
    for alt in alternatives(doc, prop) {
        match (alt.get("minLength"), alt.get("maxLength")) {
            (Some(a), Some(b)) => parts.push(format!("{}..={} characters", num(a), num(b))),
            (None, Some(b)) => parts.push(format!("at most {} characters", num(b))),
            _ => {}
        }
        match (alt.get("minimum"), alt.get("maximum")) {
            (Some(a), Some(b)) => parts.push(format!("{}..={}", num(a), num(b))),
            (Some(a), None) => parts.push(format!("at least {}", num(a))),
            (None, Some(b)) => parts.push(format!("at most {}", num(b))),
            _ => {}
        }
        if let Some(m) = alt.get("multipleOf") {
            parts.push(format!("a multiple of {}", num(m)));
        }
        if let Some(n) = alt.get("maxItems") {
            parts.push(format!("at most {} items", num(n)));
        }
        if let Some(values) = alt["enum"].as_array() {
            let names: Vec<String> = values
                .iter()
                .map(|v| format!("`{}`", one_line(&v.to_string().replace('"', ""))))
                .collect();
            parts.push(format!("one of {}", names.join(", ")));
        }
    }
    sentences(&[parts.join(", "), description(doc, prop)])
}

/// The request fields of `POST /generate`, as the OpenAPI document states them.
fn request_fields() -> String {
    let doc = doc();
    let schema = resolve(
        &doc,
        &doc["paths"]["/generate"]["post"]["requestBody"]["content"]["application/json"]["schema"],
    );
    let required: Vec<&str> = schema["required"]
        .as_array()
        .map(|r| r.iter().filter_map(|v| v.as_str()).collect())
        .unwrap_or_default();
    let mut out = String::from("| field | type | rule | default |\n|---|---|---|---|\n");
    for (name, prop) in schema["properties"].as_object().expect("properties") {
        let default = if required.contains(&name.as_str()) {
            "required".to_string()
        } else {
            match prop.get("default") {
                Some(d) => format!("`{d}`"),
                None => "see rule".to_string(),
            }
        };
        out.push_str(&format!(
            "| `{name}` | {} | {} | {default} |\n",
            type_name(&doc, prop),
            rule(&doc, prop)
        ));
    }
    out
}

/// The fields of the `/health` body.
fn health_fields() -> String {
    let doc = doc();
    let schema = &doc["components"]["schemas"]["HealthResponse"];
    let mut out = String::from("| field | type | meaning |\n|---|---|---|\n");
    for (name, prop) in schema["properties"].as_object().expect("properties") {
        let fields: Vec<String> = alternatives(&doc, prop)
            .iter()
            .filter_map(|t| t["properties"].as_object())
            .flat_map(|p| p.keys().map(|k| format!("`{k}`")))
            .collect();
        let fields = if fields.is_empty() {
            String::new()
        } else {
            format!("Fields {}", fields.join(", "))
        };
        let meaning = sentences(&[rule(&doc, prop), fields]);
        out.push_str(&format!(
            "| `{name}` | {} | {meaning} |\n",
            type_name(&doc, prop)
        ));
    }
    out
}

/// Every `serve` flag with its environment twin, default and help.
fn configuration() -> String {
    let cmd = crate::cli::command();
    let serve = cmd.find_subcommand("serve").expect("serve");
    let mut out = String::from("| environment | flag | default | what |\n|---|---|---|---|\n");
    for arg in serve.get_arguments() {
        if arg.is_hide_set() || arg.get_long().is_none() || arg.get_env().is_none() {
            continue;
        }
        let env = arg.get_env().unwrap().to_string_lossy();
        let defaults: Vec<String> = arg
            .get_default_values()
            .iter()
            .map(|v| v.to_string_lossy().into_owned())
            .collect();
        let default = if defaults.is_empty() {
            "unset".to_string()
        } else {
            format!("`{}`", defaults.join(","))
        };
        let mut what = arg
            .get_help()
            .map(|h| one_line(&h.to_string()))
            .unwrap_or_default();
        let values: Vec<String> = arg
            .get_possible_values()
            .iter()
            .map(|v| format!("`{}`", v.get_name()))
            .collect();
        if !values.is_empty() {
            if !what.is_empty() {
                what.push(' ');
            }
            what.push_str(&format!("({})", values.join(", ")));
        }
        out.push_str(&format!(
            "| `{env}` | `--{}` | {default} | {what} |\n",
            arg.get_long().unwrap()
        ));
    }
    out
}

/// The blocks README.md holds between `<!-- BEGIN generated: NAME -->` and `<!-- END generated -->`.
fn blocks() -> Vec<(&'static str, String)> {
    vec![
        ("request fields", request_fields()),
        ("health fields", health_fields()),
        ("configuration", configuration()),
    ]
}

/// README with each generated block replaced by its current text.
fn regenerate(readme: &str) -> Result<String, String> {
    let mut out = readme.to_string();
    for (name, text) in blocks() {
        let begin = format!("<!-- BEGIN generated: {name} -->\n");
        let end = "<!-- END generated -->";
        let a = out
            .find(&begin)
            .ok_or_else(|| format!("README.md has no {begin:?} marker"))?
            + begin.len();
        let b = a + out[a..]
            .find(end)
            .ok_or_else(|| format!("README.md's {name} block has no end marker"))?;
        out.replace_range(a..b, &text);
    }
    Ok(out)
}

/// `rust-version` of the workspace's Cargo.toml.
fn rust_version() -> String {
    let toml = std::fs::read_to_string(WORKSPACE_TOML).unwrap();
    toml.lines()
        .find_map(|l| l.trim().strip_prefix("rust-version = "))
        .expect("rust-version in the workspace Cargo.toml")
        .trim_matches('"')
        .to_string()
}

fn version_tuple(v: &str) -> Vec<u64> {
    v.split('.').map(|p| p.parse().unwrap_or(0)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readme_lists_match_the_openapi_document_and_the_cli() {
        let readme = std::fs::read_to_string(README).unwrap();
        let now = regenerate(&readme).unwrap();
        if std::env::var_os("UPDATE_README").is_some() {
            std::fs::write(README, &now).unwrap();
            return;
        }
        assert!(
            now == readme,
            "README.md's generated lists are stale; rerun with UPDATE_README=1 \
             (cargo test -p sdserve --bin sdserve readme)"
        );
    }

    #[test]
    fn readme_names_every_native_route_of_the_openapi_document() {
        let readme = std::fs::read_to_string(README).unwrap();
        let doc = doc();
        for (path, ops) in doc["paths"].as_object().unwrap() {
            if crate::api::a1111::is_dialect_path(path) || path.starts_with("/v1/") {
                continue; // the dialects have their own section
            }
            for method in ops.as_object().unwrap().keys() {
                let want = format!("`{} {path}`", method.to_ascii_uppercase());
                assert!(readme.contains(&want), "README.md does not list {want}");
            }
        }
    }

    #[test]
    fn generated_lists_hold_what_users_look_for() {
        let config = configuration();
        for env in [
            "MAX_BODY_BYTES",
            "SHUTDOWN_GRACE_SECONDS",
            "MODEL_RETRY_SECONDS",
            "GENERATION_TIMEOUT_SECONDS",
            "DTYPE",
        ] {
            assert!(
                config.contains(&format!("| `{env}` |")),
                "{env} missing:\n{config}"
            );
        }
        // Every listed flag says what it does.
        for line in config.lines().skip(2) {
            assert!(!line.ends_with("|  |"), "a flag without help: {line}");
        }
        let health = health_fields();
        for field in ["memory_plan", "detail", "queue", "gpu"] {
            assert!(
                health.contains(&format!("| `{field}` |")),
                "{field}:\n{health}"
            );
        }
        let request = request_fields();
        assert!(
            request.contains("| `steps` | integer | 1..=50"),
            "{request}"
        );
        assert!(
            request.contains("| `prompt` | string | 1..=500 characters"),
            "{request}"
        );
        assert!(request.contains("`dpmpp_2m_karras`"), "{request}");
    }

    /// The README's Rust version is Cargo.toml's `rust-version`, and no locked dependency needs
    /// a newer Rust (clippy's `incompatible_msrv` checks our own code against it).
    #[test]
    fn rust_version_is_true() {
        let ours = rust_version();
        let readme = std::fs::read_to_string(README).unwrap();
        assert!(
            readme.contains(&format!("Rust {ours}+")),
            "README.md must say `Rust {ours}+`"
        );
        // Only this platform's packages: a build downloads no others (e.g. Windows-only
        // crates), and offline metadata cannot read what was never downloaded.
        let version = std::process::Command::new(env!("CARGO"))
            .arg("-vV")
            .output()
            .expect("cargo -vV");
        let version = String::from_utf8_lossy(&version.stdout).to_string();
        let host = version
            .lines()
            .find_map(|l| l.strip_prefix("host: "))
            .expect("cargo -vV names the host");
        let out = std::process::Command::new(env!("CARGO"))
            .args(["metadata", "--format-version", "1", "--locked", "--offline"])
            .args(["--filter-platform", host])
            .arg("--manifest-path")
            .arg(WORKSPACE_TOML)
            .output()
            .expect("cargo metadata");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let meta: Value = serde_json::from_slice(&out.stdout).unwrap();
        let newest = meta["packages"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|p| Some((p["rust_version"].as_str()?, p["name"].as_str()?)))
            .max_by_key(|(v, _)| version_tuple(v))
            .unwrap();
        assert!(
            version_tuple(newest.0) <= version_tuple(&ours),
            "{} needs Rust {}, newer than rust-version {ours}",
            newest.1,
            newest.0
        );
    }

    /// Paths the docs name (in backticks or as links) exist in the repository.
    #[test]
    fn docs_name_only_files_that_exist() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let mut docs = vec![root.join("README.md")];
        for e in std::fs::read_dir(root.join("docs")).unwrap().flatten() {
            if e.path().extension().is_some_and(|x| x == "md") {
                docs.push(e.path());
            }
        }
        let roots = ["tools/", "crates/", "docs/", "scripts/", ".ci/"];
        for doc in docs {
            let text = std::fs::read_to_string(&doc).unwrap();
            let quoted = text.split('`').skip(1).step_by(2);
            let linked = text.split("](").skip(1).filter_map(|t| t.split(')').next());
            for name in quoted.chain(linked) {
                let name = name.split('#').next().unwrap_or_default();
                if !roots.iter().any(|r| name.starts_with(r))
                    || name.contains(char::is_whitespace)
                    || name.contains(['*', '<', '{', '$'])
                {
                    continue;
                }
                assert!(
                    root.join(name).exists(),
                    "{} names {name}, which does not exist",
                    doc.display()
                );
            }
        }
    }
}
