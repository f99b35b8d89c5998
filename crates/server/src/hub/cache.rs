//! The Hugging Face cache layout, shared with huggingface_hub / diffusers:
//!
//! ```text
//! <cache>/models--<org>--<name>/blobs/<etag>            file contents (etag = sha256 for LFS files)
//! <cache>/models--<org>--<name>/snapshots/<commit>/<path> -> ../../blobs/<etag>   (relative symlink)
//! <cache>/models--<org>--<name>/refs/<revision>           the commit a branch/tag pointed to
//! <cache>/.locks/models--<org>--<name>/<etag>.lock        per-blob lock (flock, as filelock uses)
//! ```
//! A blob appears under its final name only once complete and verified (it is written as
//! `<etag>.incomplete` and renamed), and a snapshot link only once its blob exists, so a reader
//! never sees a half-written file where a complete one is expected.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

/// A temporary-file suffix no other writer uses at the same time: the process id alone is not
/// enough, since threads of one process (two requests resolving one model) write the same files.
pub fn unique_tmp_suffix() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "tmp-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

pub fn repo_folder_name(repo: &str) -> String {
    // huggingface_hub's `<type>s--<org>--<name>`: a Space's files under `spaces--`.
    match repo.strip_prefix(super::spec::SPACES) {
        Some(space) => format!("spaces--{}", space.replace('/', "--")),
        None => format!("models--{}", repo.replace('/', "--")),
    }
}

pub struct RepoCache {
    pub root: PathBuf,
    locks: PathBuf,
}

/// Held while a blob is being fetched; the OS drops the lock if the process dies, so a crashed
/// download never leaves a stale lock behind.
pub struct BlobLock {
    _file: File,
}

impl RepoCache {
    pub fn new(cache_dir: &Path, repo: &str) -> Self {
        let name = repo_folder_name(repo);
        Self {
            root: cache_dir.join(&name),
            locks: cache_dir.join(".locks").join(name),
        }
    }

    pub fn blob(&self, etag: &str) -> PathBuf {
        self.root.join("blobs").join(etag)
    }

    pub fn incomplete(&self, etag: &str) -> PathBuf {
        self.root.join("blobs").join(format!("{etag}.incomplete"))
    }

    pub fn snapshot(&self, commit: &str) -> PathBuf {
        self.root.join("snapshots").join(commit)
    }

    pub fn read_ref(&self, revision: &str) -> Option<String> {
        let s = std::fs::read_to_string(self.root.join("refs").join(revision)).ok()?;
        let s = s.trim();
        (!s.is_empty()).then(|| s.to_string())
    }

    /// Records `revision -> commit` (written to a temporary file and renamed: atomic).
    pub fn write_ref(&self, revision: &str, commit: &str) -> io::Result<()> {
        if revision == commit {
            return Ok(());
        }
        let path = self.root.join("refs").join(revision);
        std::fs::create_dir_all(path.parent().expect("refs dir"))?;
        let tmp = path.with_extension(unique_tmp_suffix());
        std::fs::write(&tmp, commit)?;
        std::fs::rename(&tmp, &path)
    }

    /// Blocks until this process holds the blob's lock.
    pub fn lock_blob(&self, etag: &str) -> io::Result<BlobLock> {
        std::fs::create_dir_all(&self.locks)?;
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(self.locks.join(format!("{etag}.lock")))?;
        file.lock()?;
        Ok(BlobLock { _file: file })
    }

    /// Points `snapshots/<commit>/<path>` at `blobs/<etag>` with a relative symlink, replacing
    /// whatever was there, atomically (link under a temporary name, then rename).
    pub fn link(&self, commit: &str, path: &str, etag: &str) -> io::Result<()> {
        let dst = self.snapshot(commit).join(path);
        let dir = dst.parent().expect("snapshot dir");
        std::fs::create_dir_all(dir)?;
        let depth = path.split('/').count() + 1; // up from snapshots/<commit>/<dirs..>
        let mut target = PathBuf::new();
        for _ in 0..depth {
            target.push("..");
        }
        target.push("blobs");
        target.push(etag);
        let tmp = dir.join(format!(
            ".{}.{}",
            dst.file_name().unwrap_or_default().to_string_lossy(),
            unique_tmp_suffix()
        ));
        // A crashed process may have left one under a reused pid.
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(&target, &tmp)?;
        std::fs::rename(&tmp, &dst)
    }

    /// Files of a snapshot whose link resolves (relative paths, `/`-separated).
    pub fn snapshot_files(&self, commit: &str) -> Vec<String> {
        fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
            let Ok(rd) = std::fs::read_dir(dir) else {
                return;
            };
            for e in rd.flatten() {
                let p = e.path();
                if p.is_dir() {
                    walk(root, &p, out);
                } else if p.is_file() {
                    // is_file follows the link: dangling links are left out.
                    if let Ok(rel) = p.strip_prefix(root) {
                        let rel = rel.to_string_lossy().replace('\\', "/");
                        if !rel.rsplit('/').next().unwrap_or_default().starts_with('.') {
                            out.push(rel);
                        }
                    }
                }
            }
        }
        let root = self.snapshot(commit);
        let mut out = Vec::new();
        walk(&root, &root, &mut out);
        out.sort();
        out
    }
}
