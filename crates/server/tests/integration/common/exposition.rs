//! A strict reader of the Prometheus text exposition format 0.0.4, for tests: every line must be
//! a HELP, a TYPE or a sample of the family declared before it; names, labels, escapes and
//! values follow the format's grammar; histograms have ascending `le`, cumulative buckets and a
//! `+Inf` bucket equal to `_count`. Any breach is an `Err` naming the line.

use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Family {
    pub kind: String,
    pub help: Option<String>,
    pub samples: Vec<Sample>,
}

#[derive(Debug, Default)]
pub struct Exposition {
    pub families: BTreeMap<String, Family>,
}

impl Exposition {
    /// The value of the sample `name` whose labels are exactly `labels`.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let want: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.families
            .values()
            .flat_map(|f| &f.samples)
            .find(|s| s.name == name && s.labels == want)
            .map(|s| s.value)
    }
}

fn is_metric_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn is_label_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn parse_value(s: &str) -> Result<f64, String> {
    match s {
        "+Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        "NaN" => Ok(f64::NAN),
        _ if s
            .chars()
            .any(|c| c.is_ascii_alphabetic() && c != 'e' && c != 'E') =>
        {
            Err(format!("bad value {s:?}"))
        }
        _ => s.parse().map_err(|_| format!("bad value {s:?}")),
    }
}

/// `{a="x",b="y"}` at the start of `s`; returns the labels and the rest after `}`.
fn parse_labels(s: &str) -> Result<(BTreeMap<String, String>, &str), String> {
    let mut labels = BTreeMap::new();
    let mut rest = s.strip_prefix('{').ok_or("labels must start with {")?;
    loop {
        if let Some(r) = rest.strip_prefix('}') {
            return Ok((labels, r));
        }
        let eq = rest.find('=').ok_or("label without =")?;
        let name = &rest[..eq];
        if !is_label_name(name) {
            return Err(format!("bad label name {name:?}"));
        }
        let mut chars = rest[eq + 1..].char_indices();
        if chars.next().map(|(_, c)| c) != Some('"') {
            return Err(format!("label {name} value not quoted"));
        }
        let mut value = String::new();
        let mut end = None;
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => match chars.next().map(|(_, c)| c) {
                    Some('\\') => value.push('\\'),
                    Some('"') => value.push('"'),
                    Some('n') => value.push('\n'),
                    other => return Err(format!("bad escape \\{other:?} in label {name}")),
                },
                '"' => {
                    end = Some(eq + 1 + i + 1);
                    break;
                }
                '\n' => return Err("raw newline in a label value".into()),
                c => value.push(c),
            }
        }
        let end = end.ok_or_else(|| format!("label {name} value not closed"))?;
        if labels.insert(name.to_string(), value).is_some() {
            return Err(format!("label {name} twice"));
        }
        rest = &rest[end..];
        if let Some(r) = rest.strip_prefix(',') {
            rest = r;
        } else if !rest.starts_with('}') {
            return Err("labels must be separated by ,".into());
        }
    }
}

/// The family a sample name belongs to, given the family's type.
fn family_of<'a>(name: &'a str, current: Option<(&'a str, &'a str)>) -> Option<&'a str> {
    let (family, kind) = current?;
    if name == family {
        return (kind != "histogram" && kind != "summary").then_some(family);
    }
    let suffixes: &[&str] = match kind {
        "histogram" => &["_bucket", "_sum", "_count"],
        "summary" => &["_sum", "_count"],
        _ => &[],
    };
    suffixes
        .iter()
        .any(|s| name.strip_suffix(s) == Some(family))
        .then_some(family)
}

/// A new family `name`, untyped until its TYPE line; one seen before means the family is split.
fn start_family(out: &mut Exposition, name: &str) -> Result<(), String> {
    if out.families.contains_key(name) {
        return Err(format!("family {name} is not one group"));
    }
    let family = Family {
        kind: "untyped".into(),
        help: None,
        samples: vec![],
    };
    out.families.insert(name.to_string(), family);
    Ok(())
}

pub fn parse(text: &str) -> Result<Exposition, String> {
    let mut out = Exposition::default();
    let mut current: Option<String> = None;
    if !text.is_empty() && !text.ends_with('\n') {
        return Err("the exposition must end with a newline".into());
    }
    for (no, line) in text.lines().enumerate() {
        let at = |e: String| format!("line {}: {e}: {line:?}", no + 1);
        if line.is_empty() {
            continue;
        }
        if let Some(comment) = line.strip_prefix('#') {
            let mut words = comment.trim_start().splitn(3, ' ');
            let keyword = words.next().unwrap_or("");
            if keyword != "HELP" && keyword != "TYPE" {
                continue; // a plain comment
            }
            let name = words.next().unwrap_or("");
            let rest = words.next().unwrap_or("");
            if !is_metric_name(name) {
                return Err(at(format!("bad metric name {name:?}")));
            }
            if current.as_deref() != Some(name) {
                start_family(&mut out, name).map_err(at)?;
                current = Some(name.to_string());
            }
            let family = out.families.get_mut(name).unwrap();
            if keyword == "HELP" {
                if family.help.replace(rest.to_string()).is_some() {
                    return Err(at("HELP twice".into()));
                }
            } else {
                if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&rest) {
                    return Err(at(format!("unknown type {rest:?}")));
                }
                if !family.samples.is_empty() || family.kind != "untyped" {
                    return Err(at("TYPE after samples or twice".into()));
                }
                family.kind = rest.to_string();
            }
            continue;
        }
        let name_end = line
            .find(['{', ' '])
            .ok_or_else(|| at("sample without value".into()))?;
        let name = &line[..name_end];
        if !is_metric_name(name) {
            return Err(at(format!("bad metric name {name:?}")));
        }
        let (labels, rest) = if line[name_end..].starts_with('{') {
            parse_labels(&line[name_end..]).map_err(at)?
        } else {
            (BTreeMap::new(), &line[name_end..])
        };
        let mut fields = rest
            .strip_prefix(' ')
            .ok_or_else(|| at("no space before the value".into()))?
            .split(' ');
        let value = parse_value(fields.next().unwrap_or("")).map_err(at)?;
        if let Some(ts) = fields.next() {
            ts.parse::<i64>()
                .map_err(|_| at(format!("bad timestamp {ts:?}")))?;
        }
        if fields.next().is_some() {
            return Err(at("trailing fields".into()));
        }
        let cur = current
            .as_deref()
            .map(|c| (c, out.families[c].kind.as_str()));
        let family = match family_of(name, cur) {
            Some(f) => f.to_string(),
            None => {
                // An untyped family of its own.
                start_family(&mut out, name).map_err(at)?;
                current = Some(name.to_string());
                name.to_string()
            }
        };
        let f = out.families.get_mut(&family).unwrap();
        if f.samples
            .iter()
            .any(|s| s.name == name && s.labels == labels)
        {
            return Err(at("the same series twice".into()));
        }
        f.samples.push(Sample {
            name: name.to_string(),
            labels,
            value,
        });
    }
    for (name, f) in &out.families {
        if f.kind == "histogram" {
            check_histogram(name, f)?;
        }
        if f.kind == "counter" && f.samples.iter().any(|s| s.value < 0.0) {
            return Err(format!("counter {name} is negative"));
        }
    }
    Ok(out)
}

fn check_histogram(name: &str, f: &Family) -> Result<(), String> {
    let bucket = format!("{name}_bucket");
    let count = f
        .samples
        .iter()
        .find(|s| s.name == format!("{name}_count"))
        .ok_or(format!("histogram {name} has no _count"))?;
    if !f.samples.iter().any(|s| s.name == format!("{name}_sum")) {
        return Err(format!("histogram {name} has no _sum"));
    }
    let mut last: Option<(f64, f64)> = None;
    for s in f.samples.iter().filter(|s| s.name == bucket) {
        let le = parse_value(
            s.labels
                .get("le")
                .ok_or(format!("{name} bucket without le"))?,
        )?;
        if let Some((prev_le, prev_n)) = last {
            if le <= prev_le || s.value < prev_n {
                return Err(format!("{name}: buckets not ascending and cumulative"));
            }
        }
        last = Some((le, s.value));
    }
    match last {
        Some((le, n)) if le == f64::INFINITY && n == count.value => Ok(()),
        _ => Err(format!(
            "{name}: the last bucket must be +Inf and equal _count"
        )),
    }
}

#[test]
fn the_reader_refuses_what_the_format_forbids() {
    let good = "# HELP a_total A.\n# TYPE a_total counter\na_total{x=\"q\\\"\\\\\\n\"} 1\n\
                # TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_bucket{le=\"+Inf\"} 2\nh_sum 3.5\nh_count 2\n";
    let e = parse(good).unwrap();
    assert_eq!(e.value("a_total", &[("x", "q\"\\\n")]), Some(1.0));
    assert_eq!(e.value("h_count", &[]), Some(2.0));
    for bad in [
        "a{x=\"1} 1\n",                                      // unclosed value
        "a{x=1} 1\n",                                        // unquoted value
        "a{x=\"\\t\"} 1\n",                                  // bad escape
        "a 1 2 3\n",                                         // trailing field
        "a one\n",                                           // not a number
        "1a 1\n",                                            // bad name
        "# TYPE a counter\na 1\n# TYPE b gauge\nb 1\na 2\n", // family split
        "# TYPE a counter\na -1\n",                          // negative counter
        "# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\nh_sum 1\nh_count 1\n",
        "# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_sum 1\nh_count 1\n", // no +Inf
        "a 1",                                                            // no final newline
    ] {
        assert!(parse(bad).is_err(), "accepted {bad:?}");
    }
}
