//! CONTROLNET_DIR: ControlNet models (A1111's `models/ControlNet`, the sd-webui-controlnet
//! extension's folder): every `.safetensors`, `.pth`, `.pt` and `.ckpt` file in it named by its
//! stem (`control_v11p_sd15_canny`), and every diffusers folder (a `config.json` inside) by its
//! folder name. Requests name them in `controlnets[i].model` (`GET /controlnets` lists them).
//!
//! The folder is read on every look (one directory listing), as UPSCALERS_DIR is. A model is
//! read when a request first uses it, onto the pipeline's device in its dtype, and kept in the
//! [`ControlNetCache`]; one that is not a ControlNet, or not one for the loaded UNet, fails that
//! request with a 422 naming it.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use candle_core::{DType, Device};
use sdserve_pipeline::controlnet::{ControlNet, ControlNetModel};
use sdserve_pipeline::pipeline::{GenerationParams, StableDiffusion};
use sdserve_pipeline::unet::UNetConfig;
use sdserve_pipeline::PipelineError;
use serde::Serialize;
use utoipa::ToSchema;

use crate::error::ApiError;
use crate::model_folder::{self, FolderEntry, FolderKinds};
use crate::validate::ValidRequest;

/// The single-file extensions the extension lists (its `cn_models_exts`, less `.bin`).
const EXTENSIONS: [&str; 4] = ["safetensors", "pth", "pt", "ckpt"];

/// One model of CONTROLNET_DIR.
pub type ControlNetEntry = FolderEntry;

/// What CONTROLNET_DIR lists: of a file and a folder of one name, the first in path order.
const KINDS: FolderKinds = FolderKinds {
    extensions: &EXTENSIONS,
    diffusers_folders: true,
    rank: FolderKinds::by_path,
};

/// CONTROLNET_DIR, as this process sees it.
#[derive(Debug, Clone, Default)]
pub struct ControlNetCatalog {
    pub dir: Option<PathBuf>,
}

impl ControlNetCatalog {
    pub fn new(dir: Option<PathBuf>) -> Self {
        Self { dir }
    }

    /// The models by name, sorted (empty without the folder or when it cannot be read); of a
    /// file and a folder of one name, the first in path order. Blocking.
    pub fn scan(&self) -> Vec<ControlNetEntry> {
        model_folder::scan(self.dir.as_deref(), &KINDS)
    }

    /// The check a request's ControlNets get before it is queued (blocking: reads the folder
    /// and the files' metadata): a name the folder does not list is a 422 naming
    /// `controlnets[i].model` (`field` is the dialect's name for the list) and listing the
    /// names. `Some` identifies the files (name, size, modification time) for the image
    /// cache's key; each unit records where its file was found.
    pub fn check(&self, req: &mut ValidRequest, field: &str) -> Result<Option<String>, ApiError> {
        if req.controlnets.is_empty() {
            return Ok(None);
        }
        let models = self.scan();
        let mut ids = Vec::new();
        for (i, unit) in req.controlnets.iter_mut().enumerate() {
            // A reference unit runs no model.
            if unit.preprocessor.is_some_and(|p| p.reference().is_some()) {
                continue;
            }
            let Some(entry) = models.iter().find(|e| e.name == unit.model) else {
                let why = if self.dir.is_some() {
                    "no ControlNet of that name"
                } else {
                    "no ControlNet of that name (this server has no CONTROLNET_DIR)"
                };
                return Err(ApiError::validation(
                    field,
                    format!(
                        "[{i}].model: {why} ({:?}); one of {}",
                        unit.model,
                        model_folder::quoted_names(&models)
                    ),
                ));
            };
            ids.push(entry.identity());
            unit.file = Some(entry.path.clone());
        }
        Ok(Some(format!("controlnets {}", ids.join(" "))))
    }

    /// `GET /controlnets`. Blocking (reads the folder).
    pub fn listing(&self) -> ControlNetList {
        ControlNetList {
            controlnets: self
                .scan()
                .into_iter()
                .map(|m| ControlNetListing {
                    file: m.path.file_name().map(|f| f.to_string_lossy().into_owned()),
                    name: m.name,
                })
                .collect(),
        }
    }
}

/// One ControlNet as `GET /controlnets` lists it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ControlNetListing {
    /// The name `controlnets[i].model` takes: the file's stem or the folder's name.
    pub name: String,
    /// The file or folder name in CONTROLNET_DIR.
    pub file: Option<String>,
}

/// The body of `GET /controlnets`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ControlNetList {
    /// CONTROLNET_DIR's models by name (read when a request uses them: a file that is not a
    /// ControlNet for the loaded model is listed, and a 422 when used).
    pub controlnets: Vec<ControlNetListing>,
}

/// Loaded ControlNets of the process: keyed by the file (path, size, modification time), the
/// UNet they were read for (a single file takes its config from it) and the device and dtype;
/// at most [`ControlNetCache::BOUND`], the least lately used dropped first. Each holds its
/// weights on the pipeline's device between jobs (about 0.7 GB in f16 for SD 1.5's); on a GPU
/// only the running request's stay ([`ControlNetCache::keep_only`]), which its memory plan
/// counts (docs/GPU.md).
#[derive(Default)]
pub struct ControlNetCache {
    entries: Mutex<VecDeque<(CacheKey, Arc<ControlNetModel>)>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct CacheKey {
    file: String,
    path: PathBuf,
    unet: String,
    device: String,
    dtype: DType,
}

impl ControlNetCache {
    /// Models kept at once: a request takes at most `validate::CONTROLNETS_MAX`; two cover the
    /// common one or two without holding more device memory.
    pub const BOUND: usize = 2;

    pub fn shared() -> &'static ControlNetCache {
        static SHARED: OnceLock<ControlNetCache> = OnceLock::new();
        SHARED.get_or_init(ControlNetCache::default)
    }

    /// The model of `entry` for `unet` on `device` in `dtype`: the cached one while its files
    /// are unchanged, else read now (blocking). The error names the model, not its folder.
    pub fn get(
        &self,
        entry: &ControlNetEntry,
        unet: &UNetConfig,
        device: &Device,
        dtype: DType,
    ) -> Result<Arc<ControlNetModel>, String> {
        let key = CacheKey {
            file: entry.identity(),
            path: entry.path.clone(),
            unet: format!("{unet:?}"),
            device: format!("{:?}", device.location()),
            dtype,
        };
        {
            let mut entries = self.lock();
            if let Some(at) = entries.iter().position(|(k, _)| *k == key) {
                let hit = entries.remove(at).expect("found above");
                let model = hit.1.clone();
                entries.push_back(hit);
                return Ok(model);
            }
        }
        let model = ControlNetModel::load(&entry.path, unet, device, dtype)
            .map_err(|e| client_message(&e, &entry.path))?;
        let model = Arc::new(model);
        let mut entries = self.lock();
        entries.retain(|(k, _)| k.path != key.path || k.device != key.device);
        entries.push_back((key, model.clone()));
        while entries.len() > Self::BOUND {
            entries.pop_front();
        }
        Ok(model)
    }

    /// Drops the models not read from `paths`. On a GPU the worker keeps only the running
    /// request's ControlNets (the memory plan counts those alone); a CPU keeps its cache, its
    /// memory being the host's.
    pub fn keep_only(&self, paths: &[&Path]) {
        self.lock()
            .retain(|(k, _)| paths.contains(&k.path.as_path()));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<(CacheKey, Arc<ControlNetModel>)>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().len()
    }
}

/// Why a ControlNet cannot be used, without the server's paths (the weights' message kept).
fn client_message(e: &PipelineError, path: &Path) -> String {
    let text = match e {
        PipelineError::Weights { message, .. } | PipelineError::Config { message, .. } => {
            message.clone()
        }
        PipelineError::Io { source, .. } => format!("cannot be read: {source}"),
        other => other.to_string(),
    };
    text.replace(&path.display().to_string(), "<file>")
}

/// `params` with its ControlNets (known by name) found in `dir` (this process's CONTROLNET_DIR)
/// and loaded through the [`ControlNetCache`] onto `sd`'s device in its dtype; `None` when
/// the request has none. A name no longer in the folder, or a model that is not a ControlNet
/// for `sd`'s UNet, is the request's error.
pub fn with_controlnet_models(
    params: &GenerationParams,
    dir: Option<&Path>,
    sd: &StableDiffusion,
) -> Result<Option<GenerationParams>, PipelineError> {
    let models = match params.controlnets.is_empty() {
        true => Vec::new(),
        false => ControlNetCatalog::new(dir.map(Path::to_path_buf)).scan(),
    };
    let mut entries = Vec::with_capacity(params.controlnets.len());
    for (i, unit) in params.controlnets.iter().enumerate() {
        let name = &unit.model.name;
        let entry = models.iter().find(|e| e.name == *name).ok_or_else(|| {
            PipelineError::InvalidRequest(format!(
                "controlnets[{i}].model: the ControlNet {name:?} is no longer in CONTROLNET_DIR"
            ))
        })?;
        entries.push(entry);
    }
    if !sd.device().is_cpu() {
        let paths: Vec<&Path> = entries.iter().map(|e| e.path.as_path()).collect();
        ControlNetCache::shared().keep_only(&paths);
    }
    if params.controlnets.is_empty() {
        return Ok(None);
    }
    let mut resolved = params.clone();
    for (i, (unit, entry)) in resolved.controlnets.iter_mut().zip(entries).enumerate() {
        let name = unit.model.name.clone();
        let model = ControlNetCache::shared()
            .get(entry, &sd.controlnet_unet_config(), sd.device(), sd.dtype())
            .map_err(|why| {
                PipelineError::InvalidRequest(format!(
                    "controlnets[{i}].model: the ControlNet {name:?} cannot be used: {why}"
                ))
            })?;
        model.fits(&sd.controlnet_unet_config()).map_err(|why| {
            PipelineError::InvalidRequest(format!(
                "controlnets[{i}].model: the ControlNet {name:?} does not fit the model: {why}"
            ))
        })?;
        unit.model = Arc::new(ControlNet::with_model(name, entry.path.clone(), model));
    }
    Ok(Some(resolved))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixtures() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../pipeline/tests/fixtures/controlnet")
    }

    #[test]
    fn files_and_diffusers_folders_are_listed_by_name() {
        let catalog = ControlNetCatalog::new(Some(fixtures()));
        let names: Vec<String> = catalog.scan().into_iter().map(|e| e.name).collect();
        assert_eq!(names, ["cn-a", "cn-a-ldm", "cn-b"]);
        assert!(ControlNetCatalog::default().scan().is_empty());
    }

    #[test]
    fn the_cache_reads_a_model_once_per_unet_and_keeps_two() {
        let unet: UNetConfig = serde_json::from_str(
            &std::fs::read_to_string(fixtures().join("../tiny-a-vae8/unet/config.json")).unwrap(),
        )
        .unwrap();
        let cache = ControlNetCache::default();
        let entries = ControlNetCatalog::new(Some(fixtures())).scan();
        let get = |i: usize| {
            cache
                .get(&entries[i], &unet, &Device::Cpu, DType::F32)
                .unwrap()
        };
        let a = get(0);
        assert!(Arc::ptr_eq(&a, &get(0)));
        get(1);
        get(2);
        assert_eq!(cache.len(), 2);
        assert!(
            !Arc::ptr_eq(&a, &get(0)),
            "the least lately used was dropped"
        );
        // What a GPU worker does before a request that uses the first model only.
        let kept = get(0);
        cache.keep_only(&[entries[0].path.as_path()]);
        assert_eq!(cache.len(), 1);
        assert!(Arc::ptr_eq(&kept, &get(0)));
        cache.keep_only(&[]);
        assert_eq!(cache.len(), 0);
        // A file that is no ControlNet: the message names no server path.
        let dir = std::env::temp_dir().join(format!("sdserve-cn-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(
            fixtures().join("../tiny-a/text_encoder/model.safetensors"),
            dir.join("text.safetensors"),
        )
        .unwrap();
        let bad = ControlNetCatalog::new(Some(dir.clone())).scan();
        let e = cache
            .get(&bad[0], &unet, &Device::Cpu, DType::F32)
            .unwrap_err();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(
            e.contains("not a weight of an SD 1.x/2.x ControlNet"),
            "{e}"
        );
        assert!(!e.contains(dir.to_str().unwrap()), "{e}");
    }
}
