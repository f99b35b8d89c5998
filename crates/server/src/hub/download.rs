//! One file from the hub into the cache: metadata by HEAD (as huggingface_hub's
//! `get_hf_file_metadata`), then a resumable GET into `blobs/<etag>.incomplete` under the blob's
//! lock, verified against the sha256 (LFS files) or the size, renamed into place, linked from
//! the snapshot.

use std::fs::File;
use std::io::{Read, Write};

use sha2::{Digest, Sha256};

use super::cache::RepoCache;
use super::http::{classify, Attempt, Client};
use super::HubError;

/// What the hub says about one file of one commit.
#[derive(Debug, Clone)]
pub struct FileMeta {
    pub path: String,
    /// sha256 (LFS) or git blob sha1 (regular files), quotes removed.
    pub etag: String,
    pub size: Option<u64>,
    /// Where to GET the bytes (the CDN for LFS files).
    pub location: String,
    pub commit: Option<String>,
}

fn normalize_etag(e: &str) -> String {
    e.trim()
        .trim_start_matches("W/")
        .trim_matches('"')
        .to_string()
}

pub fn is_sha256(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

pub fn resolve_url(endpoint: &str, repo: &str, revision: &str, path: &str) -> String {
    format!("{endpoint}/{repo}/resolve/{revision}/{path}")
}

/// HEAD `{endpoint}/{repo}/resolve/{revision}/{path}`.
pub fn head(client: &Client, repo: &str, revision: &str, path: &str) -> Result<FileMeta, HubError> {
    let url = resolve_url(client.endpoint(), repo, revision, path);
    client.with_retries(path, client.retries, |_| {
        let r = classify(client.send_hub("HEAD", &url, &[]), path)?;
        match r.status {
            200..=399 => {}
            401 | 403 => {
                return Err(Attempt::Fatal(HubError::NotFound {
                    what: format!("{repo}/{path}"),
                    hint: "access denied: the repo may be gated or private; set HF_TOKEN".into(),
                }))
            }
            404 => {
                return Err(Attempt::Fatal(HubError::NotFound {
                    what: format!("{repo}/{path} at {revision}"),
                    hint: "no such file in the repo".into(),
                }))
            }
            s => {
                return Err(Attempt::Fatal(HubError::Http {
                    url: url.clone(),
                    status: s,
                }))
            }
        }
        let etag = r
            .header("x-linked-etag")
            .or_else(|| r.header("etag"))
            .map(normalize_etag)
            .filter(|e| !e.is_empty() && !e.contains('/') && !e.contains(".."))
            .ok_or_else(|| {
                Attempt::Fatal(HubError::Protocol(format!(
                    "{url}: no ETag in the answer (is HF_ENDPOINT a hub?)"
                )))
            })?;
        let redirect = (300..=399).contains(&r.status);
        let size = r
            .header("x-linked-size")
            .or_else(|| (!redirect).then(|| r.header("content-length")).flatten())
            .and_then(|s| s.trim().parse().ok());
        let location = r
            .header("location")
            .map_or_else(|| r.url.clone(), str::to_string);
        Ok(FileMeta {
            path: path.to_string(),
            etag,
            size,
            location,
            commit: r.header("x-repo-commit").map(str::to_string),
        })
    })
}

/// Makes `snapshots/<commit>/<meta.path>` point at a complete, verified blob, downloading it
/// if needed. `on_bytes(n)` reports newly received bytes; `on_restart(n)` takes back `n`
/// bytes reported for an attempt that was thrown away (corrupt data).
pub fn fetch(
    client: &Client,
    cache: &RepoCache,
    commit: &str,
    meta: &FileMeta,
    on_bytes: &mut dyn FnMut(u64),
    on_restart: &mut dyn FnMut(u64),
) -> Result<(), HubError> {
    let blob = cache.blob(&meta.etag);
    let io = |e: std::io::Error, p: &std::path::Path| HubError::Io {
        path: p.to_path_buf(),
        source: e,
    };
    std::fs::create_dir_all(blob.parent().expect("blobs dir")).map_err(|e| io(e, &blob))?;
    let _lock = cache.lock_blob(&meta.etag).map_err(|e| io(e, &blob))?;
    if let Ok(m) = std::fs::metadata(&blob) {
        if meta.size.is_none_or(|s| s == m.len()) {
            on_bytes(m.len());
            cache
                .link(commit, &meta.path, &meta.etag)
                .map_err(|e| io(e, &blob))?;
            return Ok(());
        }
        tracing::warn!(file = %meta.path, "cached blob has the wrong size; fetching it again");
        std::fs::remove_file(&blob).map_err(|e| io(e, &blob))?;
    }
    let part = cache.incomplete(&meta.etag);
    const INTEGRITY_ATTEMPTS: u32 = 3;
    for round in 1..=INTEGRITY_ATTEMPTS {
        let got = download_resumable(client, meta, &part, on_bytes)?;
        match verify(&part, meta) {
            Ok(()) => {
                std::fs::rename(&part, &blob).map_err(|e| io(e, &blob))?;
                cache
                    .link(commit, &meta.path, &meta.etag)
                    .map_err(|e| io(e, &blob))?;
                return Ok(());
            }
            Err(why) => {
                tracing::warn!(file = %meta.path, round, "{why}; deleting it and downloading again");
                let _ = std::fs::remove_file(&part);
                on_restart(got);
            }
        }
    }
    Err(HubError::Integrity {
        file: meta.path.clone(),
        detail: format!("still wrong after {INTEGRITY_ATTEMPTS} downloads"),
    })
}

/// Downloads into `part`, resuming what is already there (Range), retrying dropped connections,
/// 429 and 5xx. Returns the file's length when the body is complete.
fn download_resumable(
    client: &Client,
    meta: &FileMeta,
    part: &std::path::Path,
    on_bytes: &mut dyn FnMut(u64),
) -> Result<u64, HubError> {
    let mut first = true;
    client.with_retries(&meta.path, client.retries, |_| {
        let fatal_io = |e: std::io::Error| {
            Attempt::Fatal(HubError::Io {
                path: part.to_path_buf(),
                source: e,
            })
        };
        let mut have = std::fs::metadata(part).map(|m| m.len()).unwrap_or(0);
        if meta.size.is_some_and(|s| have > s) {
            std::fs::remove_file(part).map_err(fatal_io)?;
            have = 0;
        }
        if first {
            // A partial file left by an earlier (crashed) run counts as progress.
            on_bytes(have);
            first = false;
        }
        if meta.size == Some(have) && have > 0 {
            return Ok(have);
        }
        let range = [("Range", format!("bytes={have}-"))];
        let extra: &[(&str, String)] = if have > 0 { &range } else { &[] };
        let mut r = classify(client.send("GET", &meta.location, extra), &meta.path)?;
        let mut file = match r.status {
            206 => File::options().append(true).open(part).map_err(fatal_io)?,
            200 => {
                if have > 0 {
                    tracing::info!(file = %meta.path, "server ignored the range; starting over");
                }
                File::create(part).map_err(fatal_io)?
            }
            416 if have > 0 => return Ok(have),
            404 => {
                return Err(Attempt::Fatal(HubError::NotFound {
                    what: meta.path.clone(),
                    hint: format!("{} answered 404", meta.location),
                }))
            }
            s => {
                return Err(Attempt::Fatal(HubError::Http {
                    url: meta.location.clone(),
                    status: s,
                }))
            }
        };
        let mut reader = r.body.as_reader();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    file.write_all(&buf[..n]).map_err(fatal_io)?;
                    on_bytes(n as u64);
                }
                Err(e) => {
                    file.flush().map_err(fatal_io)?;
                    return Err(Attempt::Retry(format!(
                        "{}: connection lost ({e})",
                        meta.path
                    )));
                }
            }
        }
        file.sync_all().map_err(fatal_io)?;
        let len = std::fs::metadata(part).map_err(fatal_io)?.len();
        match meta.size {
            Some(s) if len < s => Err(Attempt::Retry(format!(
                "{}: connection closed after {len} of {s} bytes",
                meta.path
            ))),
            _ => Ok(len),
        }
    })
}

/// Size and, for LFS files (64-hex etag), sha256 against what the hub announced.
fn verify(path: &std::path::Path, meta: &FileMeta) -> Result<(), String> {
    let len = std::fs::metadata(path).map_err(|e| e.to_string())?.len();
    if let Some(s) = meta.size {
        if len != s {
            return Err(format!("{}: {len} bytes, expected {s}", meta.path));
        }
    }
    if is_sha256(&meta.etag) {
        let got = sha256_file(path).map_err(|e| e.to_string())?;
        if !got.eq_ignore_ascii_case(&meta.etag) {
            return Err(format!(
                "{}: sha256 {got}, expected {}",
                meta.path, meta.etag
            ));
        }
    }
    Ok(())
}

pub fn sha256_file(path: &std::path::Path) -> std::io::Result<String> {
    let mut f = File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etags_are_normalized() {
        assert_eq!(normalize_etag("\"abc\""), "abc");
        assert_eq!(normalize_etag("W/\"abc\""), "abc");
        assert!(is_sha256(&"a".repeat(64)));
        assert!(!is_sha256(&"a".repeat(40)));
    }
}
