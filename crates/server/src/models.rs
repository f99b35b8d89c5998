//! MODELS_DIR: a folder of models a request may name (`model`, A1111's `sd_model_checkpoint`,
//! OpenAI's `model`). Every diffusers folder and single-file checkpoint (`.safetensors`,
//! `.ckpt`) in it is a model named by its file or folder name; `--model` stays the default.
//!
//! The folder is read on every look (one directory listing), so files dropped in later are
//! there at once and removed ones are gone. What a request needs to know of a model before it
//! runs (its version for the cache and metadata, its own scheduler, whether it inpaints) is
//! read from its configs and its remembered digest (`probe`), never by loading it: the worker
//! loads one pipeline at a time (`engine::switch`).

use std::path::{Path, PathBuf};

use sdserve_pipeline::pipeline::ModelSchedules;
use sdserve_pipeline::schedulers::SchedulerConfig;
use serde::Serialize;
use utoipa::ToSchema;

use crate::generator::ModelInfo;

/// Single-file checkpoint extensions a MODELS_DIR entry may have (A1111's list, less `.pt`).
const CHECKPOINT_EXTENSIONS: [&str; 2] = ["safetensors", "ckpt"];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ModelKind {
    /// A diffusers folder (`model_index.json` or `unet/`).
    Folder,
    /// A single-file checkpoint (`.safetensors`, `.ckpt`), converted once when first loaded.
    File,
    /// A hub id (only `--model` can be one).
    Hub,
}

/// One model of MODELS_DIR.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelEntry {
    /// The file or folder name, as requests name it.
    pub name: String,
    pub path: PathBuf,
    pub kind: ModelKind,
}

/// MODELS_DIR (if set) and the default model, as this process sees them.
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    pub dir: Option<PathBuf>,
    /// `--model` / `MODEL_ID` as given.
    pub default_spec: String,
    /// MODEL_CACHE_DIR, where digests are remembered.
    pub cache_dir: Option<PathBuf>,
}

impl Catalog {
    pub fn new(dir: Option<PathBuf>, default_spec: &str, cache_dir: Option<PathBuf>) -> Self {
        Self {
            dir,
            default_spec: default_spec.trim().to_string(),
            cache_dir,
        }
    }

    /// The models of MODELS_DIR, by name (empty without it, or when it cannot be read).
    pub fn scan(&self) -> Vec<ModelEntry> {
        let Some(dir) = &self.dir else {
            return Vec::new();
        };
        let Ok(read) = std::fs::read_dir(dir) else {
            return Vec::new();
        };
        let mut out: Vec<ModelEntry> = read
            .filter_map(Result::ok)
            .filter_map(|e| entry_of(&e.path()))
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// The MODELS_DIR model called `name` (exactly its file or folder name; nothing else
    /// reaches a path).
    pub fn find(&self, name: &str) -> Option<ModelEntry> {
        self.scan().into_iter().find(|e| e.name == name)
    }

    /// The default model's name: its file or folder name for a local one, else the hub id.
    pub fn default_name(&self) -> String {
        let p = Path::new(&self.default_spec);
        if p.exists() {
            if let Some(n) = p
                .canonicalize()
                .ok()
                .and_then(|c| c.file_name().map(|n| n.to_string_lossy().into_owned()))
            {
                return n;
            }
        }
        self.default_spec.clone()
    }

    /// True when `entry` is the default model's own file or folder (`--model` inside
    /// MODELS_DIR): naming it asks for no switch.
    pub fn is_default(&self, entry: &ModelEntry) -> bool {
        let canon = |p: &Path| p.canonicalize().ok();
        canon(Path::new(&self.default_spec)).is_some_and(|d| Some(d) == canon(&entry.path))
    }

    /// The single-file checkpoint a request runs on: the MODELS_DIR model it names, else the
    /// default model; `None` for a folder or hub model.
    pub fn checkpoint_file(&self, model: Option<&str>) -> Option<PathBuf> {
        match model {
            Some(name) => self
                .find(name)
                .filter(|e| e.kind == ModelKind::File)
                .map(|e| e.path),
            None => {
                (self.default_kind() == ModelKind::File).then(|| PathBuf::from(&self.default_spec))
            }
        }
    }

    /// The default model's kind.
    pub fn default_kind(&self) -> ModelKind {
        let p = Path::new(&self.default_spec);
        if p.is_dir() {
            ModelKind::Folder
        } else if p.is_file() {
            ModelKind::File
        } else {
            ModelKind::Hub
        }
    }

    fn hub_options(&self) -> crate::hub::HubOptions {
        crate::hub::HubOptions::from_env(self.cache_dir.clone(), false)
    }

    /// The sha256 of a single-file checkpoint if it was computed before (A1111 lists `null`
    /// until a checkpoint was hashed); `None` for folders.
    pub fn known_sha256(&self, entry: &ModelEntry) -> Option<String> {
        match entry.kind {
            ModelKind::File => crate::hub::known_file_digest(&entry.path, &self.hub_options()),
            _ => None,
        }
    }

    /// What a request checks and caches against for `entry` before it is loaded: its version
    /// (digests computed once and remembered, as the load needs them too), its own scheduler
    /// and whether it inpaints, read from its configs; LoRAs, embeddings and the memory budget
    /// are the loaded model's (`base`): the same folders, the same device. Blocking (files).
    pub fn probe(&self, entry: &ModelEntry, base: &ModelInfo) -> Result<ModelInfo, String> {
        let opts = self.hub_options();
        let (model_version, schedules, (guidance_distilled, limits)) = match entry.kind {
            ModelKind::Folder => (
                crate::hub::folder_version(&entry.path, &opts).map_err(|e| e.to_string())?,
                schedules_of(read_json(
                    &entry.path.join("scheduler/scheduler_config.json"),
                )?)?,
                (
                    folder_distilled(&entry.path)?,
                    Some(
                        sdserve_pipeline::pipeline::ModelLimits::of_folder(&entry.path)
                            .map_err(|e| e.to_string())?,
                    ),
                ),
            ),
            _ => (
                crate::hub::single_file_version(&entry.path, &opts).map_err(|e| e.to_string())?,
                // Converted with SD 1.5's scheduler config (MODEL_CONFIG is `--model`'s only).
                schedules_of(
                    serde_json::from_value(sdserve_pipeline::single_file::sd15_scheduler_config())
                        .map_err(|e| e.to_string())?,
                )?,
                // Single files convert without `time_cond_proj_dim`: never distilled here.
                // Their configs are inferred from the weights' shapes as they convert: here
                // from the names and shapes alone (a safetensors header, a pickle's tree),
                // read once per version of the file.
                single_file_facts(&entry.path),
            ),
        };
        Ok(ModelInfo {
            model_version,
            default_scheduler: schedules.default_scheduler(),
            default_schedule: schedules.default_schedule(),
            guidance_distilled,
            adapters: base.adapters.clone(),
            memory: base.memory.clone(),
            schedules: Some(std::sync::Arc::new(schedules)),
            limits,
        })
    }
}

/// Whether a single-file checkpoint is guidance-distilled (never: single files convert without
/// `time_cond_proj_dim`), and its limits as its conversion would infer its
/// configs; `None` (the run checks, and says why) when its names and shapes are not a model's.
fn single_file_facts(path: &Path) -> (bool, Option<sdserve_pipeline::pipeline::ModelLimits>) {
    match &*crate::single_files::shapes(path) {
        Ok(shapes) => (false, Some(shapes.limits)),
        Err(e) => {
            tracing::debug!(model = %path.display(), error = %e, "a single file's limits are not known before it loads");
            (false, None)
        }
    }
}

/// A MODELS_DIR entry, if `path` is a model (hidden files and other files are not).
fn entry_of(path: &Path) -> Option<ModelEntry> {
    let name = path.file_name()?.to_str()?.to_string();
    if name.starts_with('.') {
        return None;
    }
    let kind = if path.is_dir() {
        (path.join("model_index.json").is_file() || path.join("unet").is_dir())
            .then_some(ModelKind::Folder)?
    } else if crate::vaes::is_vae_file_name(&name) {
        // A1111's `model.vae.safetensors` beside `model.safetensors` (its checkpoint list
        // leaves them out): a VAE, see `vaes::VaeCatalog::near_checkpoint`.
        return None;
    } else {
        let ext = path.extension()?.to_str()?.to_ascii_lowercase();
        (path.is_file() && CHECKPOINT_EXTENSIONS.contains(&ext.as_str()))
            .then_some(ModelKind::File)?
    };
    Some(ModelEntry {
        name,
        path: path.to_path_buf(),
        kind,
    })
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", file_label(path)))?;
    sdserve_pipeline::config_json::from_str(&text).map_err(|e| format!("{}: {e}", file_label(path)))
}

/// The last two parts of a path: enough to say which file, without the folder's location.
fn file_label(path: &Path) -> String {
    let parts: Vec<_> = path.iter().rev().take(2).collect();
    parts
        .iter()
        .rev()
        .map(|p| p.to_string_lossy())
        .collect::<Vec<_>>()
        .join("/")
}

fn schedules_of(cfg: SchedulerConfig) -> Result<ModelSchedules, String> {
    ModelSchedules::from_config(cfg).map_err(|e| e.to_string())
}

/// Whether a folder's UNet is guidance-distilled (`time_cond_proj_dim`, LCM).
fn folder_distilled(dir: &Path) -> Result<bool, String> {
    let unet: serde_json::Value = read_json(&dir.join("unet/config.json"))?;
    Ok(!unet["time_cond_proj_dim"].is_null())
}

/// One model as `GET /models` lists it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ModelListing {
    /// The name a request gives in `model`.
    pub name: String,
    pub kind: ModelKind,
    /// The model requests without `model` use (`--model`).
    pub default: bool,
    /// The model the worker holds now (one at a time).
    pub loaded: bool,
}

/// `/health`'s `loaded_model`.
#[derive(Debug, Clone, Serialize, serde::Deserialize, ToSchema)]
pub struct LoadedModelHealth {
    /// Its name, as `GET /models` lists it.
    pub name: String,
    pub model_version: String,
}

/// The body of `GET /models`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ModelList {
    /// The default model's name.
    pub default: String,
    /// The loaded model's name; null while none is (loading, or after a failed switch).
    pub loaded: Option<String>,
    /// The default model first, then MODELS_DIR's models by name.
    pub models: Vec<ModelListing>,
}

impl Catalog {
    /// `GET /models`, with `loaded` the name of the model the worker holds.
    pub fn listing(&self, loaded: Option<&str>) -> ModelList {
        let default = self.default_name();
        let mut models = vec![ModelListing {
            name: default.clone(),
            kind: self.default_kind(),
            default: true,
            loaded: loaded == Some(default.as_str()),
        }];
        for e in self.scan() {
            if self.is_default(&e) {
                continue;
            }
            models.push(ModelListing {
                loaded: loaded == Some(e.name.as_str()),
                name: e.name,
                kind: e.kind,
                default: false,
            });
        }
        ModelList {
            default,
            loaded: loaded.map(str::to_string),
            models,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sdserve_pipeline::schedulers::{SchedulerKind, SigmaSchedule};

    fn fixtures() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../pipeline/tests/fixtures")
    }

    #[test]
    fn folders_and_checkpoints_are_models_and_nothing_else_is() {
        let dir = std::env::temp_dir().join(format!("sdserve-models-scan-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("diffusers/unet")).unwrap();
        std::fs::create_dir_all(dir.join("empty-folder")).unwrap();
        for f in [
            "a.safetensors",
            "a.vae.safetensors",
            "b.CKPT",
            "notes.txt",
            ".hidden.safetensors",
        ] {
            std::fs::write(dir.join(f), b"x").unwrap();
        }
        let c = Catalog::new(Some(dir.clone()), "org/name", None);
        let names: Vec<(String, ModelKind)> =
            c.scan().into_iter().map(|e| (e.name, e.kind)).collect();
        assert_eq!(
            names,
            [
                ("a.safetensors".to_string(), ModelKind::File),
                ("b.CKPT".to_string(), ModelKind::File),
                ("diffusers".to_string(), ModelKind::Folder),
            ]
        );
        assert!(c.find("../a.safetensors").is_none());
        assert_eq!(c.default_name(), "org/name");
        assert_eq!(c.default_kind(), ModelKind::Hub);
        let l = c.listing(Some("diffusers"));
        assert_eq!(l.models.len(), 4);
        assert!(l.models[0].default && !l.models[0].loaded);
        assert!(l.models.iter().any(|m| m.name == "diffusers" && m.loaded));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The default model's info a probe starts from.
    fn base_info() -> ModelInfo {
        ModelInfo {
            model_version: "base".into(),
            default_scheduler: SchedulerKind::Euler,
            default_schedule: SigmaSchedule::Uniform,
            adapters: Default::default(),
            guidance_distilled: false,
            memory: None,
            schedules: None,
            limits: None,
        }
    }

    #[test]
    fn a_probe_reads_the_model_s_own_scheduler_and_version() {
        let cache =
            std::env::temp_dir().join(format!("sdserve-models-probe-{}", std::process::id()));
        let c = Catalog::new(Some(fixtures()), "x", Some(cache.clone()));
        let base = base_info();
        let b = c.probe(&c.find("tiny-b").unwrap(), &base).unwrap();
        assert_eq!(b.default_scheduler, SchedulerKind::Ddim);
        assert!(
            b.model_version.starts_with("tiny-b@sha256:"),
            "{}",
            b.model_version
        );
        let inpaint = c.probe(&c.find("tiny-inpaint").unwrap(), &base).unwrap();
        assert!(!b.guidance_distilled && !inpaint.guidance_distilled);
        let lcm = c.probe(&c.find("tiny-lcm").unwrap(), &base).unwrap();
        assert!(lcm.guidance_distilled);
        assert_eq!(lcm.default_scheduler, SchedulerKind::Lcm);
        std::fs::remove_dir_all(&cache).unwrap();
    }

    #[test]
    fn a_probe_reads_a_scheduler_config_saved_by_diffusers() {
        // DPMSolverMultistepScheduler's save_config writes `"lambda_min_clipped": -Infinity`.
        let dir = std::env::temp_dir().join(format!("sdserve-models-py-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let model = dir.join("tiny-a-dpm");
        std::fs::create_dir_all(model.join("scheduler")).unwrap();
        for part in [
            "model_index.json",
            "text_encoder",
            "tokenizer",
            "unet",
            "vae",
        ] {
            std::os::unix::fs::symlink(fixtures().join("tiny-a").join(part), model.join(part))
                .unwrap();
        }
        std::fs::copy(
            fixtures().join("config-json/DPMSolverMultistepScheduler.json"),
            model.join("scheduler/scheduler_config.json"),
        )
        .unwrap();
        let c = Catalog::new(Some(dir.clone()), "x", Some(dir.join(".cache")));
        let base = base_info();
        let probed = c.probe(&c.find("tiny-a-dpm").unwrap(), &base).unwrap();
        assert_eq!(probed.default_scheduler, SchedulerKind::DpmPp2m);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
