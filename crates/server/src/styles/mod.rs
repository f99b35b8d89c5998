//! Prompt styles as AUTOMATIC1111 keeps them (`styles.csv`, `STYLES_FILE`): named texts that a
//! request adds to its prompt and negative prompt by name (`styles`), as A1111's
//! `modules/styles.py` does: for each style in the request's order, a style text holding
//! `{prompt}` takes the prompt in its place, any other is appended after `", "` (empty parts
//! left out). The hires pass's own prompts get the same styles (A1111's `setup_prompts`).
//!
//! The file is read on every look (it is a few KB), so an edited file counts at once. A missing
//! file means no styles, as in A1111; an unreadable one too, with the reason in the 422 of a
//! request that names a style.

mod python_csv;

use std::path::PathBuf;

use serde::Serialize;
use serde_json::{Map, Value};
use utoipa::ToSchema;

use crate::error::ApiError;

/// The most styles one request may name (A1111 has no limit; a UI offers a handful).
pub const STYLES_MAX: usize = 16;
/// The longest style name a request may give (names are echoed in errors).
const NAME_MAX_CHARS: usize = 255;
/// A styles file past this is refused (A1111's own file is a few KB).
const FILE_MAX_BYTES: u64 = 4 << 20;
/// How many known names a 422 lists.
const NAMES_LISTED: usize = 20;

/// One style (`GET /styles`, A1111's `GET /sdapi/v1/prompt-styles`).
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct Style {
    pub name: String,
    /// Added to the prompt: `{prompt}` stands for it, else appended after ", ".
    pub prompt: String,
    /// Added to the negative prompt the same way.
    pub negative_prompt: String,
}

/// Which dialect's body a request's styles apply to: where its hires prompts are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// `prompt` is required (absent stays absent for validation to name); hires prompts in
    /// the `hires` object.
    Native,
    /// An absent prompt is "" (A1111's default); hires prompts in `hr_prompt` /
    /// `hr_negative_prompt` when not empty (empty means the first pass's, already styled).
    A1111,
}

#[derive(Debug, Clone, Default)]
pub struct StyleBook {
    path: Option<PathBuf>,
}

impl StyleBook {
    pub fn new(path: Option<PathBuf>) -> Self {
        Self { path }
    }

    /// The styles of the file, in its order (a name given twice: the later row, at the first
    /// one's place, as a Python dict keeps it). No file set or none there: no styles.
    pub fn styles(&self) -> Result<Vec<Style>, String> {
        let Some(path) = &self.path else {
            return Ok(Vec::new());
        };
        let len = match std::fs::metadata(path) {
            Ok(m) => m.len(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(format!("STYLES_FILE: {e}")),
        };
        if len > FILE_MAX_BYTES {
            return Err(format!(
                "STYLES_FILE holds {len} bytes, more than {FILE_MAX_BYTES}"
            ));
        }
        let bytes = std::fs::read(path).map_err(|e| format!("STYLES_FILE: {e}"))?;
        let text = String::from_utf8(bytes).map_err(|_| "STYLES_FILE is not UTF-8".to_string())?;
        parse(&text)
    }

    /// Applies the body's `styles` (A1111's field, and ours) to its prompts in place and gives
    /// the names back; `styles` stays in the body. Absent or null: nothing changes.
    pub fn apply(
        &self,
        body: &mut Map<String, Value>,
        dialect: Dialect,
    ) -> Result<Vec<String>, ApiError> {
        let names = match body.get("styles") {
            None | Some(Value::Null) => return Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| v.as_str().map(str::to_string))
                .collect::<Option<Vec<String>>>()
                .ok_or_else(|| {
                    ApiError::validation("styles", "must be a list of style names (strings)")
                })?,
            Some(_) => {
                return Err(ApiError::validation(
                    "styles",
                    "must be a list of style names (strings)",
                ))
            }
        };
        if names.is_empty() {
            return Ok(names);
        }
        if names.iter().any(|n| n.chars().count() > NAME_MAX_CHARS) {
            return Err(ApiError::validation(
                "styles",
                format!("a style name is at most {NAME_MAX_CHARS} characters"),
            ));
        }
        if names.len() > STYLES_MAX {
            return Err(ApiError::validation(
                "styles",
                format!("at most {STYLES_MAX} styles"),
            ));
        }
        let (styles, unreadable) = match self.styles() {
            Ok(s) => (s, None),
            Err(why) => (Vec::new(), Some(why)),
        };
        let mut chosen = Vec::with_capacity(names.len());
        for name in &names {
            match styles.iter().find(|s| &s.name == name) {
                Some(s) => chosen.push(s),
                None => return Err(unknown(name, &styles, unreadable.as_deref(), &self.path)),
            }
        }
        let prompts: Vec<&str> = chosen.iter().map(|s| s.prompt.as_str()).collect();
        let negatives: Vec<&str> = chosen.iter().map(|s| s.negative_prompt.as_str()).collect();
        let prompt_absent_is_empty = dialect == Dialect::A1111;
        style_field(body, "prompt", &prompts, prompt_absent_is_empty);
        style_field(body, "negative_prompt", &negatives, true);
        match dialect {
            Dialect::Native => {
                if let Some(Value::Object(hires)) = body.get_mut("hires") {
                    style_field(hires, "prompt", &prompts, false);
                    style_field(hires, "negative_prompt", &negatives, false);
                }
            }
            Dialect::A1111 => {
                for (field, texts) in [("hr_prompt", &prompts), ("hr_negative_prompt", &negatives)]
                {
                    if body
                        .get(field)
                        .and_then(Value::as_str)
                        .is_some_and(|s| !s.is_empty())
                    {
                        style_field(body, field, texts, false);
                    }
                }
            }
        }
        Ok(names)
    }
}

/// The outcome of a request's checks after [`StyleBook::apply`]: a 422 lists every broken
/// field at once, so a broken `styles` joins the other fields' (after them: `styles` is read
/// last) rather than hiding them.
/// With the names applied, the prompts as the client wrote them (`written`, read before
/// `apply`), or `None` when it named no style.
pub fn with_styles<T>(
    styled: Result<Vec<String>, ApiError>,
    written: AsWritten,
    checked: Result<T, ApiError>,
) -> Result<(T, Option<AsWritten>), ApiError> {
    match (styled, checked) {
        (Ok(names), Ok(checked)) => Ok((
            checked,
            (!names.is_empty()).then_some(AsWritten {
                styles: names,
                ..written
            }),
        )),
        (Ok(_), Err(e)) => Err(e),
        (Err(ApiError::Validation(mut fields)), Err(ApiError::Validation(mut first))) => {
            first.append(&mut fields);
            Err(ApiError::Validation(first))
        }
        (Err(e), _) => Err(e),
    }
}

/// A request's styles and its prompts as the client wrote them, before the styles' texts
/// went in: the job's record keeps them, since sending its styled prompts again with the
/// same styles would apply them twice (A1111 takes them back out of a pasted infotext).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AsWritten {
    /// The style names, in the order applied.
    pub styles: Vec<String>,
    pub prompt: String,
    pub negative_prompt: String,
    /// The hires pass's own prompts as written (native `hires.prompt`, A1111 `hr_prompt`, when
    /// given: the styles go into those too); `None` where the pass has none of its own.
    pub hires_prompt: Option<String>,
    pub hires_negative_prompt: Option<String>,
}

impl AsWritten {
    /// The prompts of `body` before [`StyleBook::apply`] (absent or not a string: "").
    pub fn read(body: &Map<String, Value>) -> Self {
        let text = |f: &str| {
            body.get(f)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string()
        };
        // The hires prompts the styles are applied to: native `hires.{prompt,negative_prompt}`
        // when strings, A1111's `hr_prompt`/`hr_negative_prompt` when not empty.
        let hires = body.get("hires").and_then(Value::as_object);
        let hires_text = |native: &str, a1111: &str| match hires {
            Some(h) => h.get(native).and_then(Value::as_str).map(str::to_string),
            None => body
                .get(a1111)
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
                .map(str::to_string),
        };
        Self {
            styles: Vec::new(),
            prompt: text("prompt"),
            negative_prompt: text("negative_prompt"),
            hires_prompt: hires_text("prompt", "hr_prompt"),
            hires_negative_prompt: hires_text("negative_prompt", "hr_negative_prompt"),
        }
    }
}

/// Styles one text field of a body (a string; absent is "" when `absent_is_empty`, else left
/// alone; another type is left for validation to name).
fn style_field(body: &mut Map<String, Value>, field: &str, texts: &[&str], absent_is_empty: bool) {
    let prompt = match body.get(field) {
        Some(Value::String(s)) => s.clone(),
        None | Some(Value::Null) if absent_is_empty => String::new(),
        _ => return,
    };
    let styled = apply_styles_to_prompt(&prompt, texts);
    if styled != prompt || body.contains_key(field) {
        body.insert(field.to_string(), Value::String(styled));
    }
}

fn unknown(
    name: &str,
    styles: &[Style],
    unreadable: Option<&str>,
    path: &Option<PathBuf>,
) -> ApiError {
    let rule = match (path, unreadable) {
        (None, _) => format!("unknown style {name:?}: no STYLES_FILE is set, so there are none"),
        (Some(_), Some(why)) => {
            format!("unknown style {name:?}: the styles file could not be read ({why})")
        }
        (Some(_), None) => {
            let mut known: Vec<&str> = styles
                .iter()
                .map(|s| s.name.as_str())
                .take(NAMES_LISTED)
                .collect();
            if styles.len() > NAMES_LISTED {
                known.push("...");
            }
            format!(
                "unknown style {name:?}; STYLES_FILE has: {} (GET /styles lists them)",
                if known.is_empty() {
                    "none".to_string()
                } else {
                    known.join(", ")
                }
            )
        }
    };
    ApiError::validation("styles", rule)
}

/// A1111's `apply_styles_to_prompt`: each style in turn.
pub fn apply_styles_to_prompt(prompt: &str, styles: &[&str]) -> String {
    styles
        .iter()
        .fold(prompt.to_string(), |p, style| merge_prompts(style, &p))
}

/// A1111's `merge_prompts`.
fn merge_prompts(style: &str, prompt: &str) -> String {
    if style.contains("{prompt}") {
        style.replace("{prompt}", prompt)
    } else {
        [python_strip(prompt), python_strip(style)]
            .into_iter()
            .filter(|s| !s.is_empty())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Python's `str.strip()`: Unicode whitespace and the separators `\x1c`..`\x1f`.
fn python_strip(s: &str) -> &str {
    s.trim_matches(|c: char| c.is_whitespace() || ('\x1c'..='\x1f').contains(&c))
}

/// `csv.DictReader(f, skipinitialspace=True)` over the file as A1111's `load_from_csv` reads
/// it: the first row names the columns (`name`, `prompt` or the old `text`, optional
/// `negative_prompt`); rows whose name starts with `#` are comments; a missing value is "".
fn parse(text: &str) -> Result<Vec<Style>, String> {
    // `encoding="utf-8-sig"`: a byte order mark is not text.
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut rows = python_csv::rows(text).into_iter();
    let Some(header) = rows.next() else {
        return Ok(Vec::new());
    };
    // dict(zip(fieldnames, row)): with a column named twice, the later one's value.
    let column = |n: &str| header.iter().rposition(|h| h == n);
    let name_col = column("name").ok_or("STYLES_FILE has no `name` column")?;
    let prompt_col = column("prompt")
        .or_else(|| column("text"))
        .ok_or("STYLES_FILE has no `prompt` column")?;
    let negative_col = column("negative_prompt");
    let mut styles: Vec<Style> = Vec::new();
    for row in rows {
        let value = |i: Option<usize>| i.and_then(|i| row.get(i)).cloned().unwrap_or_default();
        let Some(name) = row.get(name_col) else {
            continue;
        };
        if name.starts_with('#') {
            continue;
        }
        let style = Style {
            name: name.clone(),
            prompt: value(Some(prompt_col)),
            negative_prompt: value(negative_col),
        };
        match styles.iter_mut().find(|s| s.name == style.name) {
            Some(earlier) => *earlier = style,
            None => styles.push(style),
        }
    }
    Ok(styles)
}

#[cfg(test)]
mod tests;
