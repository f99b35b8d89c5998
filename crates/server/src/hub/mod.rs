//! Getting the model: `--model` / `MODEL_ID` to a local diffusers folder.
//!
//! # How to call me
//! ```ignore
//! let opts = hub::HubOptions::from_env(args.model_cache_dir.clone(), /* fp16: */ half);
//! // serve: keep the latest progress for /health ("loading: downloading unet/... 41%").
//! let status = hub::LoadStatus::default();
//! let s = status.clone();
//! let m = hub::resolve_model(&args.model, &opts, &move |p| s.update(p))?;
//! // m.dir: diffusers folder to StableDiffusion::load; m.model_version: for /health + metadata.
//! // status.describe() -> Some("downloading unet/diffusion_pytorch_model.safetensors 1.2 GB / 3.4 GB (35%), file 6 of 11")
//! // `sdserve download [MODEL]`: hub::command::download_command(&model, &opts) (progress bar on stderr).
//! ```
//! `spec` is one of:
//! - a local diffusers folder (has `model_index.json` or `unet/`; safetensors weights, or the pickle
//!   `.bin` of older saves, read without running code); version `<name>@sha256:<12 hex>`;
//! - a single-file checkpoint (`.safetensors` with LDM key names, or a pickle `.ckpt`/`.pt`/`.pth`/
//!   `.bin`, read without running code), converted once into `<cache>/sdserve/single-file/<digest>/`
//!   with the bundled CLIP tokenizer; configs from `HubOptions::single_file_config` if set, else
//!   inferred from shapes with SD 1.5 defaults; version `<file name>@sha256:<12 hex>`;
//! - a hub repo id `org/name` (optionally `org/name@revision`), downloaded into the Hugging Face
//!   cache layout (see `cache.rs`); version `org/name@<commit>`.
//!   `runwayml/stable-diffusion-v1-5` is no longer published and is mapped to
//!   `stable-diffusion-v1-5/stable-diffusion-v1-5` (logged).
//!
//! Environment: `MODEL_CACHE_DIR` (else `HF_HUB_CACHE`, `HF_HOME/hub`, `~/.cache/huggingface/hub`),
//! `HF_ENDPOINT`, `HF_TOKEN` (Bearer), `HF_HUB_OFFLINE=1` (cache only).

mod cache;
pub mod command;
mod progress;
mod repo;
mod retry;
mod spec;
// `FileMeta::commit` is parsed from the hub's headers but nothing reads it yet.
#[allow(dead_code)]
mod download;
mod http;
mod local;
mod select;

use std::path::PathBuf;
use std::time::Duration;

pub use progress::{LoadStatus, Progress, ProgressFn, Stage};
use repo::resolve_hub;
pub use retry::{resolve_model_patiently, RetryPolicy, RetryWait};
use spec::missing_local_folder;

/// The digest of a file if it was computed before (no hashing); see `local::known_file_digest`.
pub fn known_file_digest(path: &std::path::Path, opts: &HubOptions) -> Option<String> {
    local::known_file_digest(path, opts)
}

/// sha256 of a file, computed once and remembered; see `local::file_digest`.
pub fn file_digest(path: &std::path::Path, opts: &HubOptions) -> Result<String, HubError> {
    local::file_digest(path, opts)
}

/// The version a single-file checkpoint loads as, without converting it.
pub fn single_file_version(file: &std::path::Path, opts: &HubOptions) -> Result<String, HubError> {
    local::single_file_version(file, opts)
}
pub use spec::{parse_spec, Spec};

/// The snapshot folder that `revision` of `repo` points at in the cache, if it was fetched
/// (no network; the files in it are complete: links are made only after verification).
pub fn cached_snapshot(cache_dir: &std::path::Path, repo: &str, revision: &str) -> Option<PathBuf> {
    let cache = cache::RepoCache::new(cache_dir, repo);
    let commit = cache.read_ref(revision)?;
    Some(cache.snapshot(&commit))
}

/// The version a local diffusers folder loads as (`<name>@sha256:<12 hex>`); file digests are
/// remembered, so this is cheap after the first time.
pub fn folder_version(dir: &std::path::Path, opts: &HubOptions) -> Result<String, HubError> {
    Ok(local::resolve_folder(dir, opts)?.model_version)
}

pub const DEFAULT_MODEL: &str = "stable-diffusion-v1-5/stable-diffusion-v1-5";
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// Repos that moved: (old id, maintained copy).
const MOVED: [(&str, &str); 1] = [("runwayml/stable-diffusion-v1-5", DEFAULT_MODEL)];

#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error("{0}")]
    InvalidSpec(String),
    #[error("{what} not found on the hub: {hint}")]
    NotFound { what: String, hint: String },
    /// The model is not in the cache and may not (or cannot) be downloaded.
    #[error("{0}")]
    Offline(String),
    #[error("cannot reach the hub for {what}: {detail}")]
    Unreachable { what: String, detail: String },
    #[error("HTTP {status} from {url}")]
    Http { url: String, status: u16 },
    #[error("unexpected answer from the hub: {0}")]
    Protocol(String),
    #[error("download of {file} failed its integrity check: {detail}")]
    Integrity { file: String, detail: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Pipeline(#[from] sdserve_pipeline::PipelineError),
}

/// Where and how to get models.
#[derive(Debug, Clone)]
pub struct HubOptions {
    pub cache_dir: PathBuf,
    pub endpoint: String,
    pub token: Option<String>,
    /// Use the cache only; a missing model is an error, never a download.
    pub offline: bool,
    /// Branch, tag or commit used when the spec names none.
    pub revision: String,
    /// Fetch the `*.fp16.safetensors` variants (half-precision runs) where the repo has them.
    pub fp16: bool,
    /// Configs (and tokenizer, if it has one) for single-file checkpoints: a diffusers folder.
    pub single_file_config: Option<PathBuf>,
    /// What the model is: a whole pipeline (the default) or one component's repo.
    pub layout: Layout,
    /// Retries after the first attempt, for each request.
    pub retries: u32,
    /// First backoff; doubles each retry.
    pub backoff: Duration,
    /// Connect / first-byte / per-read timeout.
    pub timeout: Duration,
}

impl HubOptions {
    /// Reads `HF_ENDPOINT`, `HF_TOKEN`, `HF_HUB_OFFLINE`; the cache is `cache_dir` (the
    /// `--model-cache-dir` / `MODEL_CACHE_DIR` value) or the Hugging Face default.
    pub fn from_env(cache_dir: Option<PathBuf>, fp16: bool) -> Self {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
        let cache_dir = cache_dir
            .or_else(|| env("MODEL_CACHE_DIR").map(PathBuf::from))
            .or_else(|| env("HF_HUB_CACHE").map(PathBuf::from))
            .or_else(|| env("HF_HOME").map(|h| PathBuf::from(h).join("hub")))
            .or_else(|| env("HOME").map(|h| PathBuf::from(h).join(".cache/huggingface/hub")))
            .unwrap_or_else(|| PathBuf::from(".cache/huggingface/hub"));
        let offline = env("HF_HUB_OFFLINE").is_some_and(|v| {
            matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on")
        });
        Self {
            cache_dir,
            endpoint: env("HF_ENDPOINT").unwrap_or_else(|| DEFAULT_ENDPOINT.into()),
            token: env("HF_TOKEN").or_else(|| env("HUGGING_FACE_HUB_TOKEN")),
            offline,
            revision: "main".into(),
            fp16,
            single_file_config: None,
            layout: Layout::Pipeline,
            retries: 5,
            backoff: Duration::from_secs(1),
            timeout: Duration::from_secs(30),
        }
    }
}

/// The shape of a model folder or repo.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// A diffusers Stable Diffusion pipeline (`model_index.json`, `unet/`, `vae/`, ...).
    Pipeline,
    /// One diffusers model at the root (`config.json` + `diffusion_pytorch_model.safetensors`, or
    /// `.bin`),
    /// e.g. the TAESD preview decoder `madebyollin/taesd`.
    Component,
    /// These files of a repo and nothing else (the ControlNet preprocessors' weights of
    /// `lllyasviel/Annotators`), each required.
    Files(&'static [&'static str]),
}

impl Layout {
    fn select(self, all: &[String], fp16: bool) -> Result<Vec<String>, String> {
        match self {
            Self::Pipeline => select::select_files(all, fp16),
            Self::Component => select::select_component_files(all, fp16),
            Self::Files(names) => {
                let missing: Vec<&str> = names
                    .iter()
                    .copied()
                    .filter(|n| !all.iter().any(|f| f == n))
                    .collect();
                if missing.is_empty() {
                    Ok(names.iter().map(|n| n.to_string()).collect())
                } else {
                    Err(format!("the repo lacks {}", missing.join(", ")))
                }
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum ModelSource {
    LocalFolder,
    SingleFile { original: PathBuf },
    Hub { repo: String, commit: String },
}

/// A model ready to load.
#[derive(Debug, Clone)]
pub struct ResolvedModel {
    /// A diffusers folder.
    pub dir: PathBuf,
    /// Repo id + commit for hub models, name + content digest for local folders and files.
    pub model_version: String,
    pub source: ModelSource,
}

/// Resolves `spec` to a local diffusers folder, downloading or converting as needed.
pub fn resolve_model(
    spec: &str,
    opts: &HubOptions,
    progress: ProgressFn,
) -> Result<ResolvedModel, HubError> {
    let r = match parse_spec(spec)? {
        Spec::Folder(dir) => {
            progress(&Progress::stage(
                Stage::Hashing,
                Some(dir.display().to_string()),
            ));
            local::resolve_folder(&dir, opts)?
        }
        Spec::File(file) if opts.layout == Layout::Component => {
            return Err(HubError::InvalidSpec(format!(
                "{}: expected a folder with config.json and diffusion_pytorch_model.safetensors (or .bin), or a hub id",
                file.display()
            )))
        }
        Spec::File(file) => local::resolve_single_file(&file, opts, progress)?,
        Spec::Hub { repo, revision } => {
            let local = missing_local_folder(spec);
            // A spec whose first folder exists here is most likely a mistyped local path: one
            // quick try of the hub, then both readings in the error.
            let quick;
            let opts = match &local {
                Some(l) if l.parent_exists => {
                    quick = HubOptions {
                        retries: 0,
                        ..opts.clone()
                    };
                    &quick
                }
                _ => opts,
            };
            let repo = match MOVED
                .iter()
                .find(|(old, _)| old.eq_ignore_ascii_case(&repo))
            {
                Some((old, new)) => {
                    tracing::warn!(
                        "{old} is no longer published on the hub; using its maintained copy {new}"
                    );
                    new.to_string()
                }
                None => repo,
            };
            let revision = revision.unwrap_or_else(|| opts.revision.clone());
            match (resolve_hub(&repo, &revision, opts, progress), local) {
                (Ok(r), _) => r,
                (Err(e), Some(l)) if l.parent_exists => {
                    return Err(HubError::InvalidSpec(format!(
                        "{}; as a hub id: {e}",
                        l.describe()
                    )))
                }
                (Err(e), Some(l)) => return Err(e.with_hint(&l.describe())),
                (Err(e), None) => return Err(e),
            }
        }
    };
    progress(&Progress::stage(Stage::Done, None));
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_waits_grow_to_a_bound() {
        let p = RetryPolicy {
            first: Duration::from_secs(10),
            max: Duration::from_secs(300),
        };
        let waits: Vec<u64> = (1..=7).map(|n| p.delay(n).as_secs()).collect();
        assert_eq!(waits, [10, 20, 40, 80, 160, 300, 300]);
        assert_eq!(p.delay(u32::MAX).as_secs(), 300);
        let s = LoadStatus::default();
        s.set_waiting(Some(RetryWait {
            attempts: 3,
            error: "cannot reach".into(),
            next_try: std::time::Instant::now() + Duration::from_secs(40),
        }));
        let d = s.describe().unwrap();
        assert!(
            d.starts_with("cannot reach (try 3 failed; next try in 4"),
            "{d}"
        );
        s.update(&Progress::stage(Stage::Resolving, Some("x".into())));
        assert_eq!(s.waiting(), None);
    }
}
