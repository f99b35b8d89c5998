//! What a `--model` value names (folder, single file, hub id), and what a hub-shaped value
//! would be as a local path, for errors that name both.

use std::path::{Path, PathBuf};

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

/// What a `--model` value names.
#[derive(Debug, Clone, PartialEq)]
pub enum Spec {
    Folder(PathBuf),
    File(PathBuf),
    Hub {
        repo: String,
        revision: Option<String>,
    },
}

/// The hub's prefix of a Space's id (`spaces/org/name`): the extension fetches some
/// annotators' files from one (Depth Anything's from `spaces/LiheYoung/Depth-Anything`).
pub const SPACES: &str = "spaces/";

fn looks_like_path(s: &str) -> bool {
    s.starts_with('/')
        || s.starts_with("./")
        || s.starts_with("../")
        || s.starts_with('~')
        || s.starts_with('.')
        || s.strip_prefix(SPACES).unwrap_or(s).split('/').count() > 2
        || sdserve_pipeline::single_file::is_single_file(Path::new(s))
}

fn valid_repo_part(p: &str) -> bool {
    !p.is_empty()
        && p != "."
        && p != ".."
        && p.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

/// Classifies `spec`. Existing paths win over repo ids.
pub fn parse_spec(spec: &str) -> Result<Spec, HubError> {
    let spec = spec.trim();
    let p = Path::new(spec);
    if p.is_dir() {
        return Ok(Spec::Folder(p.to_path_buf()));
    }
    if p.is_file() {
        if sdserve_pipeline::single_file::is_single_file(p) {
            return Ok(Spec::File(p.to_path_buf()));
        }
        return Err(HubError::InvalidSpec(format!(
            "{spec}: not a model (expected a diffusers folder, a .safetensors or .ckpt checkpoint, or a hub id)"
        )));
    }
    if looks_like_path(spec) {
        return Err(HubError::InvalidSpec(format!(
            "{spec}: no such file or folder"
        )));
    }
    let (repo, revision) = match spec.split_once('@') {
        Some((r, rev)) if !rev.is_empty() => (r, Some(rev.to_string())),
        _ => (spec, None),
    };
    match repo.strip_prefix(SPACES).unwrap_or(repo).split_once('/') {
        Some((org, name)) if valid_repo_part(org) && valid_repo_part(name) => Ok(Spec::Hub {
            repo: repo.to_string(),
            revision,
        }),
        _ => Err(HubError::InvalidSpec(format!(
            "{spec:?} is neither an existing path nor a hub id like `org/name`"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs() {
        assert_eq!(
            parse_spec("stable-diffusion-v1-5/stable-diffusion-v1-5").unwrap(),
            Spec::Hub {
                repo: DEFAULT_MODEL.into(),
                revision: None
            }
        );
        assert_eq!(
            parse_spec("org/name@v1.0").unwrap(),
            Spec::Hub {
                repo: "org/name".into(),
                revision: Some("v1.0".into())
            }
        );
        let e = parse_spec("/no/such/model.safetensors")
            .unwrap_err()
            .to_string();
        assert!(e.contains("no such file"), "{e}");
        assert_eq!(
            parse_spec("spaces/LiheYoung/Depth-Anything").unwrap(),
            Spec::Hub {
                repo: "spaces/LiheYoung/Depth-Anything".into(),
                revision: None
            }
        );
        let e = parse_spec("spaces/a/b/c").unwrap_err().to_string();
        assert!(e.contains("no such file"), "{e}");
        let e = parse_spec("justaname").unwrap_err().to_string();
        assert!(e.contains("org/name"), "{e}");
        assert!(matches!(
            parse_spec(env!("CARGO_MANIFEST_DIR")).unwrap(),
            Spec::Folder(_)
        ));
    }
}
