//! UPSCALERS_DIR: upscaler models (A1111's `models/ESRGAN` folder: ESRGAN-architecture ones,
//! R-ESRGAN 4x+, 4x-UltraSharp, NMKD's, ..., ESRGAN+, and Real-ESRGAN Compact ones; and its
//! `models/SwinIR` ones, run with SwinIR's tiles), every `.pth`, `.pt` and `.safetensors` file
//! in it named by its stem, as A1111's `modelloader.friendly_name` names them. Extras (`upscaler_1`,
//! `upscaler_2`) take these names beside A1111's built-in `None`, `Lanczos`, `Nearest`, which
//! win where a file has one of their names.
//!
//! The hires fix (`hr_upscaler`, native `hires.upscaler`) takes them too.
//!
//! The folder is read on every look (one directory listing), as VAE_DIR is: a file dropped in
//! can be named at once. A file is read when a request first uses it and kept in the
//! [`NetworkCache`]; one of no architecture the server runs is a 422 naming the file and
//! those it runs.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::SystemTime;

use candle_core::{DType, Device};
use sdserve_pipeline::pipeline::{GenerationParams, Upscaler};
use sdserve_pipeline::upscale::{ModelUpscaler, NETWORK_DTYPE};
use sdserve_pipeline::upscaler::Network;
use sdserve_pipeline::PipelineError;

use crate::error::ApiError;
use crate::model_folder::{self, FolderEntry, FolderKinds};
use crate::validate::ValidRequest;

use serde::Serialize;
use utoipa::ToSchema;

/// The extensions A1111's ESRGAN upscaler lists.
const EXTENSIONS: [&str; 3] = ["pth", "pt", "safetensors"];

/// One model of UPSCALERS_DIR.
pub type UpscalerEntry = FolderEntry;

/// What UPSCALERS_DIR lists: of two files of one stem (x.pth, x.safetensors), the first in
/// path order.
const KINDS: FolderKinds = FolderKinds {
    extensions: &EXTENSIONS,
    diffusers_folders: false,
    rank: FolderKinds::by_path,
};

/// UPSCALERS_DIR, as this process sees it.
#[derive(Debug, Clone, Default)]
pub struct UpscalerCatalog {
    pub dir: Option<PathBuf>,
}

impl UpscalerCatalog {
    pub fn new(dir: Option<PathBuf>) -> Self {
        Self { dir }
    }

    /// The models, by name (empty without the folder or when it cannot be read), less those
    /// named as a built-in upscaler. Blocking.
    pub fn scan(&self) -> Vec<UpscalerEntry> {
        let builtin = crate::validate::extras::UPSCALERS.map(|(n, _)| n);
        let mut out = model_folder::scan(self.dir.as_deref(), &KINDS);
        out.retain(|e| !builtin.contains(&e.name.as_str()));
        out
    }
}

impl UpscalerCatalog {
    /// The check a request's hires upscaler model gets before it is queued (blocking: reads
    /// the folder and the file's metadata): a name the folder does not list is a 422 naming
    /// the dialect's field and listing every name the hires fix takes. `Some` identifies the
    /// file (name, size, modification time) for the image cache's key: a file replaced under
    /// its name makes other images.
    pub fn check_hires(&self, req: &ValidRequest) -> Result<Option<String>, ApiError> {
        let Some(hires) = &req.hires else {
            return Ok(None);
        };
        let Upscaler::Model(model) = &hires.params.upscaler else {
            return Ok(None);
        };
        let models = self.scan();
        let Some(entry) = models.iter().find(|e| e.name == model.name) else {
            let why = if self.dir.is_some() {
                "no upscaler of that name"
            } else {
                "no upscaler of that name (this server has no UPSCALERS_DIR)"
            };
            return Err(ApiError::validation(
                hires.upscaler_field,
                format!(
                    "{why} ({:?}); one of {}",
                    model.name,
                    crate::validate::hires::every_upscaler_name(&models)
                ),
            ));
        };
        Ok(Some(format!("upscaler {}", entry.identity())))
    }
}

/// What a listing calls a model file: `swinir` for a SwinIR, else `esrgan` (ESRGAN, ESRGAN+,
/// Real-ESRGAN Compact, or a file of none: refused when a request names it). Told from the
/// file's tensor names (a safetensors header, a checkpoint's pickle; no weights), read once
/// per file version (path, size, modification time) in the process.
pub fn kind_of(path: &Path) -> &'static str {
    type Key = (PathBuf, u64, Option<SystemTime>);
    static KINDS: OnceLock<Mutex<std::collections::HashMap<Key, &'static str>>> = OnceLock::new();
    let Ok(meta) = std::fs::metadata(path) else {
        return "esrgan";
    };
    let key = (path.to_path_buf(), meta.len(), meta.modified().ok());
    let kinds = KINDS.get_or_init(Default::default);
    if let Some(kind) = kinds.lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
        return kind;
    }
    let kind = match Network::architecture_of(path) {
        Ok(Some("SwinIR")) => "swinir",
        _ => "esrgan",
    };
    let mut kinds = kinds.lock().unwrap_or_else(|e| e.into_inner());
    // Older versions of the file are of no more use.
    kinds.retain(|k, _| k.0 != key.0);
    kinds.insert(key, kind);
    kind
}

/// One upscaler as `GET /upscalers` lists it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct UpscalerListing {
    /// The name Extras' `upscaler_1` / `upscaler_2` and the hires fix's `hires.upscaler` take.
    pub name: String,
    /// `builtin` (A1111's `None`, `Lanczos`, `Nearest`: Pillow's filters), `esrgan` (a model
    /// of UPSCALERS_DIR, A1111's `models/ESRGAN`: an ESRGAN, ESRGAN+ or Real-ESRGAN Compact
    /// network) or `swinir` (a SwinIR model, A1111's `models/SwinIR`, run with its tiles).
    pub kind: String,
    /// The model's file name in UPSCALERS_DIR (null for the built-ins).
    pub file: Option<String>,
}

/// The body of `GET /upscalers`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct UpscalerList {
    /// The built-ins, then UPSCALERS_DIR's models by name (files are read when a request uses
    /// them: one of no supported architecture is listed, and a 422 when named).
    pub upscalers: Vec<UpscalerListing>,
}

impl UpscalerCatalog {
    /// `GET /upscalers`. Blocking (reads the folder).
    pub fn listing(&self) -> UpscalerList {
        let builtin = crate::validate::extras::UPSCALERS.map(|(n, _)| UpscalerListing {
            name: n.to_string(),
            kind: "builtin".into(),
            file: None,
        });
        let models = self.scan().into_iter().map(|m| UpscalerListing {
            file: m.path.file_name().map(|f| f.to_string_lossy().into_owned()),
            kind: kind_of(&m.path).into(),
            name: m.name,
        });
        UpscalerList {
            upscalers: builtin.into_iter().chain(models).collect(),
        }
    }
}

/// One cache of loaded upscaler networks for the process, shared by Extras and the hires fix
/// (so a model is read once, not per request): keyed by the file (path, size, modification
/// time: a file replaced under its name is read again) and the device and dtype it was read
/// onto; at most [`NetworkCache::BOUND`] networks, the least lately used dropped first. A
/// network on a GPU holds its weights there between jobs (about 33 MB in f16 for a 4x
/// ESRGAN); the memory plan does not count them.
pub struct NetworkCache {
    entries: Mutex<VecDeque<(NetworkKey, Arc<Network>)>>,
    reads: AtomicUsize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct NetworkKey {
    path: PathBuf,
    len: u64,
    modified: Option<SystemTime>,
    device: String,
    dtype: DType,
}

impl Default for NetworkCache {
    fn default() -> Self {
        Self {
            entries: Mutex::new(VecDeque::new()),
            reads: AtomicUsize::new(0),
        }
    }
}

impl NetworkCache {
    /// Networks kept at once.
    pub const BOUND: usize = 2;

    /// The process's cache.
    pub fn shared() -> &'static NetworkCache {
        static SHARED: OnceLock<NetworkCache> = OnceLock::new();
        SHARED.get_or_init(NetworkCache::default)
    }

    /// The network of the file at `path` on `device` in `dtype`: the cached one while the
    /// file is unchanged, else read now (blocking; two callers missing at once may both read
    /// it, the later one kept). The error names the file, not its folder.
    pub fn get(&self, path: &Path, device: &Device, dtype: DType) -> Result<Arc<Network>, String> {
        let file = path
            .file_name()
            .map_or_else(String::new, |f| f.to_string_lossy().into_owned());
        let meta = std::fs::metadata(path).map_err(|e| format!("cannot read {file:?}: {e}"))?;
        let key = NetworkKey {
            path: path.to_path_buf(),
            len: meta.len(),
            modified: meta.modified().ok(),
            device: format!("{:?}", device.location()),
            dtype,
        };
        {
            let mut entries = self.lock();
            if let Some(at) = entries.iter().position(|(k, _)| *k == key) {
                let hit = entries.remove(at).expect("found above");
                let net = hit.1.clone();
                entries.push_back(hit);
                return Ok(net);
            }
        }
        self.reads.fetch_add(1, Ordering::Relaxed);
        let net = Arc::new(Network::load(path, device, dtype).map_err(|e| e.to_string())?);
        let mut entries = self.lock();
        // The file's older versions are of no more use.
        entries.retain(|(k, _)| (&k.path, &k.device, k.dtype) != (&key.path, &key.device, dtype));
        entries.push_back((key, net.clone()));
        while entries.len() > Self::BOUND {
            entries.pop_front();
        }
        Ok(net)
    }

    /// Files read so far (each miss).
    #[cfg(test)]
    fn reads(&self) -> usize {
        self.reads.load(Ordering::Relaxed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<(NetworkKey, Arc<Network>)>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// `params` with its hires pass's upscaler model (known by name: [`ModelUpscaler::named`])
/// found in `dir` (this process's UPSCALERS_DIR) and its network read through the
/// [`NetworkCache`] onto `device` in [`NETWORK_DTYPE`] (float32, as A1111 runs its ESRGAN
/// folder's models beside a half-precision pipeline too); `None` when there is nothing to
/// find. A name no longer in the folder, or a file that is not a network, is the request's
/// error.
pub fn with_hires_network(
    params: &GenerationParams,
    dir: Option<&Path>,
    device: &Device,
) -> Result<Option<GenerationParams>, PipelineError> {
    let Some(hires) = &params.hires else {
        return Ok(None);
    };
    let Upscaler::Model(model) = &hires.upscaler else {
        return Ok(None);
    };
    let name = &model.name;
    let entry = UpscalerCatalog::new(dir.map(Path::to_path_buf))
        .scan()
        .into_iter()
        .find(|e| e.name == *name)
        .ok_or_else(|| {
            PipelineError::InvalidRequest(format!(
                "the hires upscaler {name:?} is no longer in UPSCALERS_DIR"
            ))
        })?;
    let net = NetworkCache::shared()
        .get(&entry.path, device, NETWORK_DTYPE)
        .map_err(|why| {
            PipelineError::InvalidRequest(format!(
                "the hires upscaler {name:?} cannot be used: {why}"
            ))
        })?;
    let mut resolved = params.clone();
    if let Some(h) = &mut resolved.hires {
        h.upscaler = Upscaler::Model(Arc::new(ModelUpscaler::with_network(
            name.clone(),
            entry.path,
            net,
        )));
    }
    Ok(Some(resolved))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_are_named_by_their_stem_and_builtin_names_win() {
        let dir = std::env::temp_dir().join(format!("sdserve-upscalers-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("folder.pth")).unwrap();
        for f in [
            "4x-UltraSharp.pth",
            "R-ESRGAN 4x+.safetensors",
            "Lanczos.pth",
            "notes.txt",
        ] {
            std::fs::write(dir.join(f), b"x").unwrap();
        }
        let names: Vec<String> = UpscalerCatalog::new(Some(dir.clone()))
            .scan()
            .into_iter()
            .map(|e| e.name)
            .collect();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(names, ["4x-UltraSharp", "R-ESRGAN 4x+"]);
        assert!(UpscalerCatalog::default().scan().is_empty());
    }

    #[test]
    fn the_network_cache_reads_a_file_once_again_when_replaced_and_keeps_two() {
        let fixtures =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../pipeline/tests/fixtures/esrgan");
        let dir = std::env::temp_dir().join(format!("sdserve-netcache-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let [a, b, c] = ["a.safetensors", "b.pth", "c.pth"].map(|f| dir.join(f));
        std::fs::copy(fixtures.join("x2-old.safetensors"), &a).unwrap();
        std::fs::copy(fixtures.join("x4-old.pth"), &b).unwrap();
        std::fs::copy(fixtures.join("x2-unshuffle.pth"), &c).unwrap();
        let cache = NetworkCache::default();
        let get = |p: &Path| cache.get(p, &Device::Cpu, DType::F32).unwrap();
        let first = get(&a);
        assert!(Arc::ptr_eq(&first, &get(&a)), "a hit is the same network");
        assert_eq!(cache.reads(), 1);
        // Replaced under its name (another size): read again.
        std::fs::copy(fixtures.join("x4-new.safetensors"), &a).unwrap();
        assert_eq!(get(&a).scale(), 4);
        assert_eq!(cache.reads(), 2);
        // Two kept: b and c push a out; b, used last but one, stays.
        get(&b);
        get(&c);
        assert_eq!(cache.lock().len(), NetworkCache::BOUND);
        get(&b);
        assert_eq!(cache.reads(), 4);
        get(&a);
        assert_eq!(cache.reads(), 5);
        // A file that is not a network: an error naming the file alone.
        let not = dir.join("not.pth");
        std::fs::copy(fixtures.join("not-rrdbnet.pth"), &not).unwrap();
        let err = cache.get(&not, &Device::Cpu, DType::F32).unwrap_err();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(err.contains("not.pth"), "{err}");
    }
}
