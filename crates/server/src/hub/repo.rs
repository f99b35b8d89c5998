//! A hub repo id to a local diffusers folder: the commit, the files the layout needs, the
//! cache first and downloads for what is missing (or the cache alone when offline).

use std::time::Duration;

use super::cache::RepoCache;
use super::http::{classify, Attempt, Client};
use super::{
    download, HubError, HubOptions, Layout, ModelSource, Progress, ProgressFn, ResolvedModel, Stage,
};

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

/// The hub API's answer for a revision: a Space's under `api/spaces/`, a model's under
/// `api/models/` (files resolve under the id itself either way: `spaces/org/name/resolve/..`).
fn api_url(endpoint: &str, repo: &str, revision: &str) -> String {
    match repo.strip_prefix(super::spec::SPACES) {
        Some(space) => format!("{endpoint}/api/spaces/{space}/revision/{revision}"),
        None => format!("{endpoint}/api/models/{repo}/revision/{revision}"),
    }
}

fn is_commit(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

pub(super) fn resolve_hub(
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
                    Layout::Files(_) => "run `sdserve download --annotators` where the hub is reachable, or point MODEL_CACHE_DIR at a cache that has them".to_string(),
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
    let url = api_url(client.endpoint(), repo, revision);
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
                     diffusion_pytorch_model.safetensors (or .bin); `sdserve download --taesd {repo}` where \
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_space_is_asked_for_and_cached_as_the_hub_names_it() {
        let e = "https://huggingface.co";
        assert_eq!(
            api_url(e, "spaces/LiheYoung/Depth-Anything", "main"),
            "https://huggingface.co/api/spaces/LiheYoung/Depth-Anything/revision/main"
        );
        assert_eq!(
            api_url(e, "lllyasviel/Annotators", "main"),
            "https://huggingface.co/api/models/lllyasviel/Annotators/revision/main"
        );
        assert_eq!(
            super::super::cache::repo_folder_name("spaces/LiheYoung/Depth-Anything"),
            "spaces--LiheYoung--Depth-Anything"
        );
        assert_eq!(
            super::super::cache::repo_folder_name("lllyasviel/Annotators"),
            "models--lllyasviel--Annotators"
        );
    }
}
