//! Local models: content digests (memoized by path, size and mtime so a multi-GB file is
//! hashed once), and single-file checkpoints converted into a cached diffusers folder keyed
//! by that digest.

use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use sha2::{Digest, Sha256};

use super::download::{hex, sha256_file};
use super::{HubError, HubOptions, Progress, ResolvedModel, Stage};

/// The real CLIP ViT-L/14 tokenizer (SD 1.5's), bundled: single-file checkpoints carry none.
/// Same bytes as `crates/pipeline/tests/fixtures/clip-tokenizer/` (a test keeps them equal).
pub const CLIP_TOKENIZER: [(&str, &[u8]); 4] = [
    (
        "vocab.json",
        include_bytes!("assets/clip-tokenizer/vocab.json"),
    ),
    (
        "merges.txt",
        include_bytes!("assets/clip-tokenizer/merges.txt"),
    ),
    (
        "tokenizer_config.json",
        include_bytes!("assets/clip-tokenizer/tokenizer_config.json"),
    ),
    (
        "special_tokens_map.json",
        include_bytes!("assets/clip-tokenizer/special_tokens_map.json"),
    ),
];

/// Where sdserve keeps its own derived data inside the model cache.
fn sdserve_dir(opts: &HubOptions) -> PathBuf {
    opts.cache_dir.join("sdserve")
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> HubError + '_ {
    move |e| HubError::Io {
        path: path.to_path_buf(),
        source: e,
    }
}

/// sha256 of a file's contents, remembered under `<cache>/sdserve/digests/` keyed by the
/// canonical path, size and modification time.
pub fn file_digest(path: &Path, opts: &HubOptions) -> Result<String, HubError> {
    let memo = digest_memo(path, opts)?;
    if let Some(d) = read_memo(&memo) {
        return Ok(d);
    }
    let digest = sha256_file(path).map_err(io_err(path))?;
    // Best effort: a read-only cache only costs a re-hash next time.
    if std::fs::create_dir_all(memo.parent().expect("digests dir")).is_ok() {
        let tmp = memo.with_extension(super::cache::unique_tmp_suffix());
        if std::fs::write(&tmp, &digest).is_ok() {
            let _ = std::fs::rename(&tmp, &memo);
        }
    }
    Ok(digest)
}

/// Where the digest of `path` (as it is now: size and modification time) is remembered.
fn digest_memo(path: &Path, opts: &HubOptions) -> Result<PathBuf, HubError> {
    let meta = std::fs::metadata(path).map_err(io_err(path))?;
    let canon = path.canonicalize().map_err(io_err(path))?;
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    let key = hex(&Sha256::digest(
        format!("{}\0{}\0{}", canon.display(), meta.len(), mtime).as_bytes(),
    ));
    Ok(sdserve_dir(opts).join("digests").join(&key))
}

fn read_memo(memo: &Path) -> Option<String> {
    let s = std::fs::read_to_string(memo).ok()?;
    (s.trim().len() == 64).then(|| s.trim().to_string())
}

/// The digest of a file if it was computed before (no hashing): what A1111 lists as a
/// checkpoint's `sha256` (null until the checkpoint was hashed, as A1111 does).
pub fn known_file_digest(path: &Path, opts: &HubOptions) -> Option<String> {
    read_memo(&digest_memo(path, opts).ok()?)
}

/// The version a single-file checkpoint loads as (`<file name>@sha256:<12 hex>`), without
/// converting it; its digest is computed once (remembered for the load).
pub fn single_file_version(file: &Path, opts: &HubOptions) -> Result<String, HubError> {
    let name = file
        .file_name()
        .map_or_else(|| "model".into(), |n| n.to_string_lossy().into_owned());
    Ok(format!("{name}@sha256:{}", &file_digest(file, opts)?[..12]))
}

/// Digest of a diffusers folder: every file under it (relative path + content digest), sorted.
pub fn folder_digest(dir: &Path, opts: &HubOptions) -> Result<String, HubError> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
        for e in std::fs::read_dir(dir)? {
            let p = e?.path();
            if p.is_dir() {
                walk(root, &p, out)?;
            } else if p.is_file() {
                out.push(p.strip_prefix(root).expect("under root").to_path_buf());
            }
        }
        Ok(())
    }
    let mut files = Vec::new();
    walk(dir, dir, &mut files).map_err(io_err(dir))?;
    files.sort();
    let mut h = Sha256::new();
    for rel in files {
        let d = file_digest(&dir.join(&rel), opts)?;
        h.update(rel.to_string_lossy().as_bytes());
        h.update([0]);
        h.update(d.as_bytes());
    }
    Ok(hex(&h.finalize()))
}

fn display_name(p: &Path) -> String {
    p.canonicalize()
        .unwrap_or_else(|_| p.to_path_buf())
        .file_name()
        .map_or_else(|| "model".into(), |n| n.to_string_lossy().into_owned())
}

pub fn resolve_folder(dir: &Path, opts: &HubOptions) -> Result<ResolvedModel, HubError> {
    if opts.layout == super::Layout::Component && !dir.join("config.json").is_file() {
        return Err(HubError::InvalidSpec(format!(
            "{} is a folder but not a diffusers model (no config.json)",
            dir.display()
        )));
    }
    if opts.layout == super::Layout::Pipeline
        && !dir.join("model_index.json").is_file()
        && !dir.join("unet").is_dir()
    {
        return Err(HubError::InvalidSpec(format!(
            "{} is a folder but not a diffusers model (no model_index.json or unet/)",
            dir.display()
        )));
    }
    let digest = folder_digest(dir, opts)?;
    Ok(ResolvedModel {
        dir: dir.to_path_buf(),
        model_version: format!("{}@sha256:{}", display_name(dir), &digest[..12]),
        source: super::ModelSource::LocalFolder,
    })
}

/// Converts (once) a single-file checkpoint into `<cache>/sdserve/single-file/<digest>/`.
pub fn resolve_single_file(
    file: &Path,
    opts: &HubOptions,
    progress: super::ProgressFn,
) -> Result<ResolvedModel, HubError> {
    use sdserve_pipeline::single_file::{convert_single_file, ConvertOptions};

    let name = file
        .file_name()
        .map_or_else(|| "model".into(), |n| n.to_string_lossy().into_owned());
    progress(&Progress::stage(Stage::Hashing, Some(name.clone())));
    let mut key = file_digest(file, opts)?;
    let file_digest_hex = key.clone();
    if let Some(cfg) = &opts.single_file_config {
        // Different configs give different folders.
        key = hex(&Sha256::digest(
            format!("{key}\0{}", folder_digest(cfg, opts)?).as_bytes(),
        ));
    }
    // So does the LDM `.yaml` beside it (A1111's), by its contents.
    if let Some(yaml) = sdserve_pipeline::single_file::config_beside(file) {
        let bytes = std::fs::read(&yaml).map_err(io_err(&yaml))?;
        key = hex(&Sha256::digest(
            format!("{key}\0yaml {}", hex(&Sha256::digest(&bytes))).as_bytes(),
        ));
    }
    let out = sdserve_dir(opts).join("single-file").join(&key);
    let version = format!("{name}@sha256:{}", &file_digest_hex[..12]);
    let source = super::ModelSource::SingleFile {
        original: file.to_path_buf(),
    };
    if out.join("model_index.json").is_file() {
        tracing::info!(file = %file.display(), dir = %out.display(), "single-file checkpoint already converted");
        return Ok(ResolvedModel {
            dir: out,
            model_version: version,
            source,
        });
    }
    // One conversion at a time per checkpoint across processes; the loser finds it done.
    let locks = opts.cache_dir.join(".locks").join("sdserve-single-file");
    std::fs::create_dir_all(&locks).map_err(io_err(&locks))?;
    let lock_path = locks.join(format!("{key}.lock"));
    let lock = std::fs::File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(io_err(&lock_path))?;
    lock.lock().map_err(io_err(&lock_path))?;
    if !out.join("model_index.json").is_file() {
        progress(&Progress::stage(Stage::Converting, Some(name.clone())));
        tracing::info!(file = %file.display(), dir = %out.display(), "converting single-file checkpoint to diffusers layout");
        let config_dir = opts.single_file_config.as_deref();
        let copts = ConvertOptions {
            config_dir,
            tokenizer_files: &CLIP_TOKENIZER,
        };
        let summary = convert_single_file(file, &out, &copts)?;
        tracing::info!(
            unet = summary.tensors[0],
            vae = summary.tensors[1],
            text_encoder = summary.tensors[2],
            ignored = summary.ignored,
            inferred_configs = summary.inferred_configs,
            yaml_config = ?summary.yaml_config,
            "converted"
        );
    }
    Ok(ResolvedModel {
        dir: out,
        model_version: version,
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bundled_tokenizer_is_the_fixture() {
        let dir =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../pipeline/tests/fixtures/clip-tokenizer");
        for (name, bytes) in CLIP_TOKENIZER {
            let want = std::fs::read(dir.join(name)).unwrap();
            assert!(want == bytes, "{name} differs from the fixture");
        }
    }
}
