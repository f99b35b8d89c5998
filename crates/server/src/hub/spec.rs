//! What a hub-shaped `--model` value would be as a local path, for errors that name both.

use std::path::PathBuf;

use super::{HubError, DEFAULT_MODEL, MOVED};

/// A hub-shaped spec read as a local path that does not exist.
#[derive(Debug)]
pub(super) struct MissingLocal {
    pub(super) path: PathBuf,
    /// Its first folder exists here (`my-models/` of `my-models/sd15`).
    pub(super) parent_exists: bool,
}

impl MissingLocal {
    pub(super) fn describe(&self) -> String {
        let cwd = std::env::current_dir()
            .map(|d| format!(" (relative to {})", d.display()))
            .unwrap_or_default();
        let mut s = format!("no local folder or file {}{cwd}", self.path.display());
        if self.parent_exists {
            if let Some(parent) = self.path.parent() {
                let mut names: Vec<String> = std::fs::read_dir(parent)
                    .into_iter()
                    .flatten()
                    .flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect();
                names.sort();
                names.truncate(10);
                s.push_str(&format!(
                    "; {}/ holds: {}",
                    parent.display(),
                    if names.is_empty() {
                        "nothing".to_string()
                    } else {
                        names.join(", ")
                    }
                ));
            }
        }
        s
    }
}

/// For hub ids other than the well-known ones: the local path the spec also names.
pub(super) fn missing_local_folder(spec: &str) -> Option<MissingLocal> {
    let spec = spec.trim();
    let known = std::iter::once(DEFAULT_MODEL)
        .chain(MOVED.iter().map(|(old, _)| *old))
        .any(|k| spec.eq_ignore_ascii_case(k));
    if known || spec.contains('@') {
        return None;
    }
    let path = PathBuf::from(spec);
    let parent_exists = path
        .parent()
        .is_some_and(|p| !p.as_os_str().is_empty() && p.is_dir());
    Some(MissingLocal {
        path,
        parent_exists,
    })
}

impl HubError {
    /// The same error with a hint added to its message.
    pub(super) fn with_hint(self, hint: &str) -> Self {
        match self {
            Self::NotFound { what, hint: h } => Self::NotFound {
                what,
                hint: format!("{h}; {hint}"),
            },
            Self::Unreachable { what, detail } => Self::Unreachable {
                what,
                detail: format!("{detail}; {hint}"),
            },
            Self::Offline(m) => Self::Offline(format!("{m}; {hint}")),
            other => other,
        }
    }
}
