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
//! // `sdserve download [MODEL]`: hub::download_command(&model, &opts) (progress bar on stderr).
//! ```
//! `spec` is one of:
//! - a local diffusers folder (has `model_index.json` or `unet/`); version `<name>@sha256:<12 hex>`;
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
mod retry;
mod spec;
// `FileMeta::commit` is parsed from the hub's headers but nothing reads it yet.
#[allow(dead_code)]
mod download;
mod http;
mod local;
mod select;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cache::RepoCache;
use http::{classify, Attempt, Client};
pub use retry::{resolve_model_patiently, RetryPolicy, RetryWait};
use spec::missing_local_folder;

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
    /// One diffusers model at the root (`config.json` + `diffusion_pytorch_model.safetensors`),
    /// e.g. the TAESD preview decoder `madebyollin/taesd`.
    Component,
}

impl Layout {
    fn select(self, all: &[String], fp16: bool) -> Result<Vec<String>, String> {
        match self {
            Self::Pipeline => select::select_files(all, fp16),
            Self::Component => select::select_component_files(all, fp16),
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    Resolving,
    Downloading,
    Hashing,
    Converting,
    Done,
}

/// Where model resolution stands; passed to the progress callback.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Progress {
    pub stage: Stage,
    /// The file being worked on.
    pub file: Option<String>,
    pub bytes_done: u64,
    /// Total bytes to download, when known.
    pub bytes_total: Option<u64>,
    pub files_done: usize,
    pub files_total: usize,
}

impl Progress {
    pub fn stage(stage: Stage, file: Option<String>) -> Self {
        Self {
            stage,
            file,
            bytes_done: 0,
            bytes_total: None,
            files_done: 0,
            files_total: 0,
        }
    }

    /// One line for logs and /health.
    pub fn describe(&self) -> String {
        let file = self.file.as_deref().unwrap_or("");
        match self.stage {
            Stage::Resolving => format!("resolving {file}"),
            Stage::Hashing => format!("hashing {file}"),
            Stage::Converting => format!("converting {file} to diffusers layout"),
            Stage::Done => "model files ready".into(),
            Stage::Downloading => {
                let total = self.bytes_total.map_or(String::new(), |t| {
                    let pct = if t > 0 {
                        self.bytes_done as f64 * 100.0 / t as f64
                    } else {
                        100.0
                    };
                    format!(" / {} ({pct:.0}%)", human(t))
                });
                format!(
                    "downloading {file} {}{total}, file {} of {}",
                    human(self.bytes_done),
                    (self.files_done + 1).min(self.files_total),
                    self.files_total
                )
            }
        }
    }
}

fn human(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1000.0 && u < UNITS.len() - 1 {
        v /= 1000.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

pub type ProgressFn<'a> = &'a (dyn Fn(&Progress) + Send + Sync);

/// The latest progress, shared between the loading thread and /health.
#[derive(Debug, Clone, Default)]
pub struct LoadStatus(Arc<Mutex<StatusInner>>);

#[derive(Debug, Default)]
struct StatusInner {
    progress: Option<Progress>,
    waiting: Option<RetryWait>,
}

impl LoadStatus {
    /// New progress; a planned retry is over.
    pub fn update(&self, p: &Progress) {
        let mut s = self.0.lock().unwrap_or_else(|e| e.into_inner());
        s.progress = Some(p.clone());
        s.waiting = None;
    }
    pub fn set_waiting(&self, w: Option<RetryWait>) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).waiting = w;
    }
    pub fn snapshot(&self) -> Option<Progress> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .progress
            .clone()
    }
    /// The planned retry, while resolution waits for one.
    pub fn waiting(&self) -> Option<RetryWait> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .waiting
            .clone()
    }
    pub fn describe(&self) -> Option<String> {
        match self.waiting() {
            Some(w) => Some(w.describe()),
            None => self.snapshot().map(|p| p.describe()),
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

fn looks_like_path(s: &str) -> bool {
    s.starts_with('/')
        || s.starts_with("./")
        || s.starts_with("../")
        || s.starts_with('~')
        || s.starts_with('.')
        || s.split('/').count() > 2
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
    match repo.split_once('/') {
        Some((org, name)) if valid_repo_part(org) && valid_repo_part(name) => Ok(Spec::Hub {
            repo: repo.to_string(),
            revision,
        }),
        _ => Err(HubError::InvalidSpec(format!(
            "{spec:?} is neither an existing path nor a hub id like `org/name`"
        ))),
    }
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
                "{}: expected a folder with config.json and diffusion_pytorch_model.safetensors, or a hub id",
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

#[derive(serde::Deserialize)]
struct RepoInfo {
    sha: String,
    #[serde(default)]
    siblings: Vec<Sibling>,
}

#[derive(serde::Deserialize)]
struct Sibling {
    rfilename: String,
}

fn is_commit(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

fn resolve_hub(
    repo: &str,
    revision: &str,
    opts: &HubOptions,
    progress: ProgressFn,
) -> Result<ResolvedModel, HubError> {
    let cache = RepoCache::new(&opts.cache_dir, repo);
    let cached_commit = if is_commit(revision) {
        Some(revision.to_string())
    } else {
        cache.read_ref(revision)
    };
    let from_cache = |why: &str| -> Result<ResolvedModel, HubError> {
        let Some(commit) = cached_commit.clone() else {
            return Err(HubError::Offline(format!(
                "{why}: {repo}@{revision} is not in the cache {}; {}",
                opts.cache_dir.display(),
                match opts.layout {
                    Layout::Pipeline => format!("run `sdserve download {repo}` where the hub is reachable, or point MODEL_CACHE_DIR at a cache that has it"),
                    Layout::Component => format!("run `sdserve download --taesd {repo}` where the hub is reachable, point MODEL_CACHE_DIR at a cache that has it, or name a local folder instead"),
                }
            )));
        };
        let files = cache.snapshot_files(&commit);
        let wanted = opts.layout.select(&files, opts.fp16).map_err(|e| {
            HubError::Offline(format!(
                "the cached snapshot {} of {repo} is incomplete ({e}; {why})",
                cache.snapshot(&commit).display()
            ))
        })?;
        tracing::info!(%repo, %commit, files = wanted.len(), "using cached snapshot ({why})");
        Ok(ResolvedModel {
            dir: cache.snapshot(&commit),
            model_version: format!("{repo}@{commit}"),
            source: ModelSource::Hub {
                repo: repo.to_string(),
                commit,
            },
        })
    };
    if opts.offline {
        return from_cache("offline mode (HF_HUB_OFFLINE=1)");
    }

    progress(&Progress::stage(Stage::Resolving, Some(repo.to_string())));
    let client = Client::new(
        &opts.endpoint,
        opts.token.clone(),
        opts.timeout,
        opts.retries,
        opts.backoff,
    );
    // With a warm cache, do not wait long for an unreachable hub.
    let api_retries = if cached_commit.is_some() {
        opts.retries.min(1)
    } else {
        opts.retries
    };
    let url = format!(
        "{}/api/models/{repo}/revision/{revision}",
        client.endpoint()
    );
    let info = client.with_retries(repo, api_retries, |_| {
        let mut r = classify(client.send_hub("GET", &url, &[]), repo)?;
        match r.status {
            200 => {}
            401 | 403 | 404 => {
                return Err(Attempt::Fatal(HubError::NotFound {
                    what: format!("{repo}@{revision}"),
                    hint: "check the id and revision; gated or private repos need HF_TOKEN".into(),
                }))
            }
            s => {
                return Err(Attempt::Fatal(HubError::Http {
                    url: url.clone(),
                    status: s,
                }))
            }
        }
        let body = r
            .body
            .read_to_string()
            .map_err(|e| Attempt::Retry(format!("{repo}: {e}")))?;
        serde_json::from_str::<RepoInfo>(&body)
            .map_err(|e| Attempt::Fatal(HubError::Protocol(format!("{url}: {e}"))))
    });
    let info = match info {
        Ok(i) => i,
        Err(HubError::Unreachable { detail, .. }) if cached_commit.is_some() => {
            tracing::warn!(%repo, "hub unreachable ({detail}); serving the cached snapshot");
            return from_cache("hub unreachable");
        }
        Err(HubError::Unreachable { what, detail }) if opts.layout == Layout::Component => {
            return Err(HubError::Unreachable {
                what,
                detail: format!(
                    "{detail}; nothing cached at {}. Ways out: a local folder holding config.json and \
                     diffusion_pytorch_model.safetensors; `sdserve download --taesd {repo}` where \
                     the hub is reachable, then MODEL_CACHE_DIR pointing at that cache; HF_ENDPOINT \
                     for a mirror",
                    opts.cache_dir.display()
                ),
            })
        }
        Err(HubError::Unreachable { what, detail }) => {
            return Err(HubError::Unreachable {
                what,
                detail: format!(
                    "{detail}; nothing cached at {}. Ways out: `--model DIR` (a local diffusers \
                     folder) or `--model FILE.safetensors`; `sdserve download {repo}` where the hub \
                     is reachable, then MODEL_CACHE_DIR pointing at that cache; HF_ENDPOINT for a \
                     mirror; HF_HUB_OFFLINE=1 with a cache that already holds the model",
                    opts.cache_dir.display()
                ),
            })
        }
        Err(e) => return Err(e),
    };
    let commit = info.sha;
    if !is_commit(&commit) {
        return Err(HubError::Protocol(format!(
            "{url}: bad commit sha {commit:?}"
        )));
    }
    let listing: Vec<String> = info.siblings.into_iter().map(|s| s.rfilename).collect();
    let wanted = opts
        .layout
        .select(&listing, opts.fp16)
        .map_err(|e| HubError::InvalidSpec(format!("{repo}@{commit}: {e}")))?;
    cache
        .write_ref(revision, &commit)
        .map_err(|e| HubError::Io {
            path: cache.root.clone(),
            source: e,
        })?;

    // Files already linked in this snapshot are complete (links are made only after verification).
    let present = cache.snapshot_files(&commit);
    let missing: Vec<&String> = wanted.iter().filter(|f| !present.contains(f)).collect();
    let files_total = wanted.len();
    let mut files_done = files_total - missing.len();
    if !missing.is_empty() {
        tracing::info!(%repo, %commit, missing = missing.len(), of = files_total, "downloading model files");
    }
    let mut metas = Vec::new();
    for f in &missing {
        metas.push(download::head(&client, repo, &commit, f)?);
    }
    let bytes_total = metas
        .iter()
        .try_fold(0u64, |acc, m| m.size.map(|s| acc + s));
    let mut bytes_done = 0u64;
    let mut last_log = std::time::Instant::now();
    for meta in &metas {
        let report = |done: u64, files_done: usize| Progress {
            stage: Stage::Downloading,
            file: Some(meta.path.clone()),
            bytes_done: done,
            bytes_total,
            files_done,
            files_total,
        };
        progress(&report(bytes_done, files_done));
        let done = std::cell::Cell::new(bytes_done);
        let mut on_bytes = |n: u64| {
            done.set(done.get() + n);
            let p = report(done.get(), files_done);
            progress(&p);
            if last_log.elapsed() >= Duration::from_secs(5) {
                last_log = std::time::Instant::now();
                tracing::info!("{}", p.describe());
            }
        };
        let mut on_restart = |n: u64| done.set(done.get().saturating_sub(n));
        download::fetch(
            &client,
            &cache,
            &commit,
            meta,
            &mut on_bytes,
            &mut on_restart,
        )?;
        bytes_done = done.get();
        files_done += 1;
        progress(&report(bytes_done, files_done));
    }
    Ok(ResolvedModel {
        dir: cache.snapshot(&commit),
        model_version: format!("{repo}@{commit}"),
        source: ModelSource::Hub {
            repo: repo.to_string(),
            commit,
        },
    })
}

/// `sdserve download [MODEL]`: resolves (downloads / converts) with a progress bar on stderr
/// and prints the folder and version.
pub fn download_command(spec: &str, opts: &HubOptions) -> Result<ResolvedModel, HubError> {
    use std::io::IsTerminal;
    use std::io::Write;
    let tty = std::io::stderr().is_terminal();
    // Without a terminal (logs, CI): one line per stage or file, no redrawn bar.
    let last = Mutex::new(None::<(Stage, Option<String>)>);
    let bar = move |p: &Progress| {
        let mut err = std::io::stderr().lock();
        if !tty {
            let key = Some((p.stage, p.file.clone()));
            let mut last = last.lock().unwrap_or_else(|e| e.into_inner());
            if *last != key {
                *last = key;
                let _ = writeln!(err, "{}", p.describe());
            }
            return;
        }
        let line = match (p.stage, p.bytes_total) {
            (Stage::Downloading, Some(total)) if total > 0 => {
                const W: usize = 30;
                let frac = (p.bytes_done as f64 / total as f64).clamp(0.0, 1.0);
                let fill = (frac * W as f64).round() as usize;
                format!(
                    "[{}{}] {}",
                    "#".repeat(fill),
                    "-".repeat(W - fill),
                    p.describe()
                )
            }
            _ => p.describe(),
        };
        let _ = write!(err, "\r\x1b[2K{line}");
        if p.stage == Stage::Done {
            let _ = writeln!(err);
        }
        let _ = err.flush();
    };
    let m = resolve_model(spec, opts, &bar)?;
    println!("{}\t{}", m.model_version, m.dir.display());
    Ok(m)
}

/// Entry point of `sdserve download`: exit status 0 when the model is ready in the cache.
pub fn download_main(
    model: &str,
    cache_dir: Option<PathBuf>,
    fp16: bool,
    layout: Layout,
) -> std::process::ExitCode {
    let mut opts = HubOptions::from_env(cache_dir, fp16);
    opts.layout = layout;
    match download_command(model, &opts) {
        Ok(_) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("\nerror: {e}");
            std::process::ExitCode::FAILURE
        }
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
        let e = parse_spec("justaname").unwrap_err().to_string();
        assert!(e.contains("org/name"), "{e}");
        assert!(matches!(
            parse_spec(env!("CARGO_MANIFEST_DIR")).unwrap(),
            Spec::Folder(_)
        ));
    }

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

    #[test]
    fn progress_lines() {
        let p = Progress {
            stage: Stage::Downloading,
            file: Some("unet/x.safetensors".into()),
            bytes_done: 1_500_000_000,
            bytes_total: Some(3_000_000_000),
            files_done: 5,
            files_total: 11,
        };
        assert_eq!(
            p.describe(),
            "downloading unet/x.safetensors 1.5 GB / 3.0 GB (50%), file 6 of 11"
        );
        let s = LoadStatus::default();
        assert_eq!(s.describe(), None);
        s.update(&p);
        assert_eq!(s.snapshot(), Some(p));
    }
}
