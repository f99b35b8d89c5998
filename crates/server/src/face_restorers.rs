//! FACE_RESTORE_DIR: A1111's `models/Codeformer` folder (CodeFormer beside facexlib's
//! RetinaFace and ParseNet: `sdserve_pipeline::face_restore::restorer`). A request that asks
//! for face restoration (native `restore_faces`, A1111's `restore_faces` and Extras'
//! `codeformer_visibility`) is checked against it before it is queued: a missing folder or
//! file is a 422 naming the field. The worker (and Extras) read the three networks once into
//! [`RestorerCache`], in float32 as A1111 runs them beside a half-precision pipeline.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::SystemTime;

use candle_core::Device;
use sdserve_pipeline::face_restore::restorer::{FaceRestoreFiles, NAME};
use sdserve_pipeline::face_restore::{FaceRestore, FaceRestorer};
use sdserve_pipeline::named_file::NamedFile;
use sdserve_pipeline::pipeline::GenerationParams;
use sdserve_pipeline::PipelineError;
use serde_json::{json, Value};

/// FACE_RESTORE_DIR, as this process sees it.
#[derive(Debug, Clone, Default)]
pub struct FaceRestoreCatalog {
    pub dir: Option<PathBuf>,
}

impl FaceRestoreCatalog {
    pub fn new(dir: Option<PathBuf>) -> Self {
        Self { dir }
    }

    /// The folder's three files, or why faces cannot be restored here (for a person; no
    /// path). Blocking (lists the folder).
    pub fn files(&self) -> Result<FaceRestoreFiles, String> {
        let Some(dir) = &self.dir else {
            return Err("this server has no face restoration (FACE_RESTORE_DIR is not set)".into());
        };
        FaceRestoreFiles::in_folder(dir).map_err(|why| format!("FACE_RESTORE_DIR {why}"))
    }

    /// `GET /sdapi/v1/face-restorers`: `[{name: "CodeFormer", cmd_dir: null}]` when the
    /// folder holds what it needs (A1111's restorer has no `cmd_dir`), else `[]`. Blocking.
    pub fn listing(&self) -> Value {
        match self.files() {
            Ok(_) => json!([{"name": NAME, "cmd_dir": null}]),
            Err(_) => json!([]),
        }
    }
}

/// The process's loaded restorer: one (its three networks are about 143M parameters, 571 MB
/// in float32), kept while its files (path, size, modification time) stay, on the CPU only:
/// on a GPU the networks are read for the request and freed after it, so that they never sit
/// in the memory the plan gives the model (the plan does not count them: docs/GPU.md).
#[derive(Default)]
pub struct RestorerCache {
    entry: Mutex<Option<(RestorerKey, Arc<FaceRestorer>)>>,
}

type FileVersion = (PathBuf, u64, Option<SystemTime>);

#[derive(Debug, Clone, PartialEq, Eq)]
struct RestorerKey {
    files: [FileVersion; 3],
    device: String,
}

impl RestorerCache {
    pub fn shared() -> &'static RestorerCache {
        static SHARED: OnceLock<RestorerCache> = OnceLock::new();
        SHARED.get_or_init(RestorerCache::default)
    }

    /// The restorer of `files` on `device`: the cached one while the files are unchanged,
    /// else read now (blocking). The error names the file, not its folder.
    pub fn get(
        &self,
        files: &FaceRestoreFiles,
        device: &Device,
    ) -> Result<Arc<FaceRestorer>, String> {
        let version = |p: &Path| -> Result<FileVersion, String> {
            let meta =
                std::fs::metadata(p).map_err(|e| format!("cannot read {:?}: {e}", name_of(p)))?;
            Ok((p.to_path_buf(), meta.len(), meta.modified().ok()))
        };
        let key = RestorerKey {
            files: [
                version(&files.codeformer)?,
                version(&files.detection)?,
                version(&files.parsing)?,
            ],
            device: format!("{:?}", device.location()),
        };
        let mut entry = self.entry.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((k, restorer)) = entry.as_ref() {
            if *k == key {
                return Ok(restorer.clone());
            }
        }
        // The older one goes first: two sets of networks are never held at once.
        *entry = None;
        let restorer = Arc::new(FaceRestorer::load(files, device).map_err(|e| {
            // The pipeline's error may carry the path: the client hears file names only.
            match &e {
                PipelineError::Io { path, source } => {
                    format!("cannot read {:?}: {source}", name_of(path))
                }
                other => other.to_string(),
            }
        })?);
        if device.is_cpu() {
            *entry = Some((key, restorer.clone()));
        }
        Ok(restorer)
    }
}

fn name_of(path: &Path) -> String {
    path.file_name()
        .map_or_else(String::new, |f| f.to_string_lossy().into_owned())
}

/// A request's face restoration before the worker finds its networks.
pub fn named(weight: f64) -> FaceRestore {
    FaceRestore {
        restorer: Arc::new(NamedFile::named(NAME)),
        weight,
    }
}

/// The restoration of `catalog`'s networks, read (cached) onto `device` now; the error is the
/// request's, for a person.
pub fn loaded(
    catalog: &FaceRestoreCatalog,
    weight: f64,
    device: &Device,
) -> Result<FaceRestore, String> {
    let files = catalog.files()?;
    let restorer = RestorerCache::shared()
        .get(&files, device)
        .map_err(|why| format!("the face restorer cannot be used: {why}"))?;
    let dir = catalog.dir.clone().unwrap_or_default();
    Ok(FaceRestore {
        restorer: Arc::new(NamedFile::with_loaded(NAME, dir, restorer)),
        weight,
    })
}

/// `params` with its face restoration's networks found in `dir` (this process's
/// FACE_RESTORE_DIR) and read onto `device`; `None` when it asks for none.
pub fn with_face_restorer(
    params: &GenerationParams,
    dir: Option<&Path>,
    device: &Device,
) -> Result<Option<GenerationParams>, PipelineError> {
    let Some(restore) = &params.face_restore else {
        return Ok(None);
    };
    let catalog = FaceRestoreCatalog::new(dir.map(Path::to_path_buf));
    let restore =
        loaded(&catalog, restore.weight, device).map_err(PipelineError::InvalidRequest)?;
    let mut resolved = params.clone();
    resolved.face_restore = Some(restore);
    Ok(Some(resolved))
}
