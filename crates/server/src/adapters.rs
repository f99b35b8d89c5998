//! The LoRA files (`LORA_DIR`) and textual-inversion embeddings (`EMBEDDINGS_DIR`) a server
//! offers: read when the model loads and again whenever the folders change, listed by
//! `GET /loras`, `GET /embeddings` (and A1111's `/sdapi/v1/loras`, `/sdapi/v1/embeddings`),
//! and checked by validation (an unknown LoRA, or one that does not fit the model, is a 422
//! naming it).
//!
//! Change detection is cheap: the folders' file names, sizes and modification times, compared
//! by the worker between jobs (and every `POLL` while idle) and on the refresh routes. Only a
//! change reads the files again. A file that cannot be read (being copied in, broken) is listed
//! with its error and never fails the model.

use std::path::{Path, PathBuf};
use std::time::Duration;

use sdserve_pipeline::embeddings::EmbeddingLibrary;
use sdserve_pipeline::lora::LoraLibrary;
use sdserve_pipeline::pipeline::StableDiffusion;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// How often an idle worker looks at the folders.
pub const POLL: Duration = Duration::from_secs(1);

/// One LoRA file as `GET /loras` lists it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct LoraListing {
    /// The name requests use (`loras[].name`, `<lora:name:weight>`): the file name without
    /// `.safetensors`.
    pub name: String,
    /// The name its trainer gave it (`ss_output_name` in its metadata), else `name`; A1111
    /// lists it as `alias`.
    #[serde(default)]
    pub alias: String,
    pub file: String,
    /// `kohya` or `peft` (`unknown` when the file cannot be read).
    pub format: String,
    pub rank: usize,
    /// The parts it adapts: `unet`, `text_encoder`.
    pub targets: Vec<String>,
    /// Adapted layers, and how many of them are convolutions with a kernel (LoCon's 3x3).
    pub layers: usize,
    pub conv_layers: usize,
    /// The module types of its layers, as A1111 names them: `lora` (LoRA, LoCon), `loha`,
    /// `lokr`, `ia3`, `glora` and `full` (LyCORIS) are applied, and `dora` (DoRA's `dora_scale`
    /// beside one of them) with them; a file with `oft`, `norm`, `bias` (bias diffs) or
    /// `unknown` layers is listed with its `error` and refused.
    #[serde(default)]
    pub types: Vec<String>,
    /// The safetensors header's `__metadata__` (string pairs; kohya's training notes).
    #[serde(default)]
    #[schema(value_type = Object)]
    pub metadata: serde_json::Map<String, serde_json::Value>,
    /// Why the file cannot be used (it does not fit the model, or cannot be read); `null` when
    /// it can.
    pub error: Option<String>,
}

/// One embedding as `GET /embeddings` lists it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct EmbeddingListing {
    /// The word prompts use: the file name without its extension.
    pub name: String,
    pub file: String,
    /// `a1111_pt` or `safetensors` (`unknown` when the file cannot be read).
    pub format: String,
    pub vectors: usize,
    /// Values per vector (the text encoder's width when it fits).
    #[serde(default)]
    pub shape: usize,
    /// What an A1111 `.pt` says of its training, if it does.
    #[serde(default)]
    pub step: Option<i64>,
    #[serde(default)]
    pub sd_checkpoint: Option<String>,
    #[serde(default)]
    pub sd_checkpoint_name: Option<String>,
    /// Why prompts cannot use it (it does not fit the text encoder, or cannot be read); `null`
    /// when they can.
    #[serde(default)]
    pub error: Option<String>,
}

/// What the loaded model offers.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Adapters {
    pub loras: Vec<LoraListing>,
    pub embeddings: Vec<EmbeddingListing>,
    /// Names, sizes and modification times of the folders' files, hashed: what the response
    /// cache keys on, so that a changed folder never answers with an image of its old files.
    #[serde(default)]
    pub fingerprint: String,
}

impl Adapters {
    /// The LoRA a request's `name` means: the file of that name, else (as A1111 resolves
    /// `<lora:...>` tags) the one file whose alias it is.
    pub fn lora(&self, name: &str) -> Option<&LoraListing> {
        self.loras.iter().find(|l| l.name == name).or_else(|| {
            let mut by_alias = self.loras.iter().filter(|l| l.alias == name);
            match (by_alias.next(), by_alias.next()) {
                (Some(one), None) => Some(one),
                _ => None,
            }
        })
    }

    /// The listing as it stands for another model than the loaded one, the diffusers folder
    /// `model` (a MODELS_DIR folder or single file, not loaded): the LoRAs `names` (a
    /// request's) checked against its weights' shapes, read from the names and shapes of both
    /// (safetensors headers, pickles' object trees; no tensor data), so that one that does not
    /// fit it is refused before the job is queued, and one that fits it though not the loaded
    /// model is not. A LoRA file that cannot be read keeps its error; a model that cannot be
    /// read keeps the loaded model's verdict (its run checks).
    pub fn fitted_to_model(mut self, names: &[String], model: &Path) -> Self {
        for name in names {
            let Some(i) = self
                .lora(name)
                .map(|l| l.name.clone())
                .and_then(|n| self.loras.iter().position(|l| l.name == n))
            else {
                continue;
            };
            let listing = &mut self.loras[i];
            if listing.format == "unknown" {
                continue;
            }
            let fit = sdserve_pipeline::lora::LoraInfo::read(Path::new(&listing.file))
                .and_then(|info| fit_problem(&info, model));
            match fit {
                Ok(problem) => listing.error = problem,
                Err(e) => {
                    tracing::warn!(lora = %listing.name, model = %model.display(), error = %e, "could not check a LoRA against a model before it is loaded");
                }
            }
        }
        self
    }

    /// The reason a request may not use LoRA `name`, if any.
    pub fn lora_problem(&self, name: &str) -> Option<String> {
        match self.lora(name) {
            None if self.loras.is_empty() => Some(format!(
                "unknown LoRA {name:?}: there is no LoRA file (LORA_DIR is not set, or holds none)"
            )),
            None => Some(format!(
                "unknown LoRA {name:?}; available: {}",
                self.loras
                    .iter()
                    .map(|l| l.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
            Some(l) => l
                .error
                .as_ref()
                .map(|e| format!("LoRA {name:?} cannot be used: {e}")),
        }
    }
}

/// Why LoRA `info` does not fit the model at `model` (a diffusers folder, or a single file
/// whose names and shapes are read once per version of it), if it does not.
fn fit_problem(
    info: &sdserve_pipeline::lora::LoraInfo,
    model: &Path,
) -> sdserve_pipeline::Result<Option<String>> {
    if !model.is_file() {
        return sdserve_pipeline::lora::fit_problem_in_model(info, model);
    }
    match &*crate::single_files::shapes(model) {
        Ok(file) => sdserve_pipeline::lora::fit_problem_in_single_file(info, file),
        Err(e) => Err(sdserve_pipeline::PipelineError::InvalidRequest(e.clone())),
    }
}

/// LORA_DIR and EMBEDDINGS_DIR, as set.
#[derive(Debug, Clone, Default)]
pub struct AdapterDirs {
    pub lora_dir: Option<PathBuf>,
    pub embeddings_dir: Option<PathBuf>,
}

impl AdapterDirs {
    /// Hash of both folders' names, sizes and modification times (`Adapters::fingerprint` as
    /// a read of them now would give it); `None` when neither folder is set.
    pub fn fingerprint(&self) -> Option<String> {
        if self.lora_dir.is_none() && self.embeddings_dir.is_none() {
            return None;
        }
        let mut h = Sha256::new();
        for (dir, exts) in [
            (&self.lora_dir, LORA_EXTS),
            (&self.embeddings_dir, EMBEDDING_EXTS),
        ] {
            let state = dir.as_deref().map(|d| folder_state(d, exts));
            h.update(format!("{state:?}\n").as_bytes());
        }
        Some(
            h.finalize()[..8]
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect(),
        )
    }
}

/// The two folders, and what was read from them last.
pub struct AdapterFolders {
    dirs: AdapterDirs,
    /// The listing as of the last scan.
    current: Adapters,
    /// The default model, when the pipeline is another model (a MODELS_DIR model the worker
    /// switched to): the listing's verdicts are judged against it (LoRAs from its files' names
    /// and shapes, embeddings by its text encoder's width), because the listing is the default
    /// model's (`GET /loras`, `/sdapi/v1/embeddings`, and validation of requests that name no
    /// model; a named model's are judged at submit). `None`: the pipeline is the default
    /// model, judged as loaded.
    judged_against: Option<crate::model::DefaultModel>,
}

/// The extensions each folder's scan reads.
const LORA_EXTS: &[&str] = &["safetensors"];
const EMBEDDING_EXTS: &[&str] = &["pt", "bin", "safetensors"];

/// A folder's files as change detection sees them: name, size, modification time. A folder
/// that cannot be listed is its error.
fn folder_state(dir: &Path, exts: &[&str]) -> Result<Vec<(String, u64, u128)>, String> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| e.to_string())? {
        let entry = entry.map_err(|e| e.to_string())?;
        let path = entry.path();
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
        if !exts.contains(&ext) {
            continue;
        }
        // A file removed between listing and stat is simply not there.
        let Ok(meta) = std::fs::metadata(&path) else {
            continue;
        };
        let mtime = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos());
        out.push((
            entry.file_name().to_string_lossy().into_owned(),
            meta.len(),
            mtime,
        ));
    }
    out.sort();
    Ok(out)
}

impl AdapterFolders {
    pub fn new(dirs: AdapterDirs) -> Self {
        Self {
            dirs,
            current: Adapters::default(),
            judged_against: None,
        }
    }

    /// These folders for a pipeline that is not the default model: see `judged_against`.
    pub fn judged_against(mut self, default_model: crate::model::DefaultModel) -> Self {
        self.judged_against = Some(default_model);
        self
    }

    fn fingerprint(&self) -> String {
        self.dirs.fingerprint().unwrap_or_default()
    }

    /// Reads the folders into the pipeline at load. A folder that cannot be listed fails the
    /// load (a setting to fix); a file that cannot be used is listed with its error.
    pub fn load(&mut self, sd: &mut StableDiffusion) -> Result<Adapters, String> {
        for (dir, what) in [
            (&self.dirs.lora_dir, "LORA_DIR"),
            (&self.dirs.embeddings_dir, "EMBEDDINGS_DIR"),
        ] {
            if let Some(dir) = dir {
                std::fs::read_dir(dir).map_err(|e| format!("{what} {}: {e}", dir.display()))?;
            }
        }
        self.scan(sd, self.fingerprint());
        Ok(self.current.clone())
    }

    /// The new listing when the folders changed since the last scan (or `force`), after
    /// reading them into the pipeline; `None` when nothing changed. Runs between jobs, on the
    /// thread that owns the pipeline.
    pub fn refresh(&mut self, sd: &mut StableDiffusion, force: bool) -> Option<Adapters> {
        let fingerprint = self.fingerprint();
        if !force && fingerprint == self.current.fingerprint {
            return None;
        }
        let before = self.current.clone();
        self.scan(sd, fingerprint);
        let names = |a: &Adapters| {
            (
                a.loras.iter().map(|l| l.name.clone()).collect::<Vec<_>>(),
                a.embeddings
                    .iter()
                    .map(|e| e.name.clone())
                    .collect::<Vec<_>>(),
            )
        };
        let (loras, embeddings) = names(&self.current);
        tracing::info!(
            ?loras,
            ?embeddings,
            fingerprint = %self.current.fingerprint,
            changed = before != self.current,
            "LoRA and embedding folders read again"
        );
        Some(self.current.clone())
    }

    /// Reads both folders into the pipeline. A folder that cannot be listed now keeps what was
    /// read from it before (said in the log). `fingerprint` is taken before: a file changing
    /// during the scan makes the next look scan again.
    fn scan(&mut self, sd: &mut StableDiffusion, fingerprint: String) {
        if let Some(dir) = self.dirs.lora_dir.clone() {
            match LoraLibrary::scan_each(&dir) {
                Ok((library, failed)) => {
                    let judged_against = self.judged_against.as_ref().map(|d| d.files.as_path());
                    self.current.loras = install_loras(sd, library, failed, judged_against)
                }
                Err(e) => {
                    tracing::error!(dir = %dir.display(), error = %e, "LORA_DIR cannot be read; keeping the LoRAs read before")
                }
            }
        }
        if let Some(dir) = self.dirs.embeddings_dir.clone() {
            match EmbeddingLibrary::scan_each(&dir) {
                Ok((library, failed)) => {
                    let judged_width = self.judged_against.as_ref().map(|d| d.text_hidden_size);
                    self.current.embeddings = install_embeddings(sd, library, failed, judged_width)
                }
                Err(e) => {
                    tracing::error!(dir = %dir.display(), error = %e, "EMBEDDINGS_DIR cannot be read; keeping the embeddings read before")
                }
            }
        }
        self.current.fingerprint = fingerprint;
    }
}

/// Installs `library` (its LoRAs unmerged first, so a replaced file never keeps its old
/// deltas) and lists it with the files that could not be read; each verdict is the loaded
/// model's, or `judged_against`'s (the default model's files) when given.
fn install_loras(
    sd: &mut StableDiffusion,
    library: LoraLibrary,
    failed: Vec<(PathBuf, sdserve_pipeline::PipelineError)>,
    judged_against: Option<&Path>,
) -> Vec<LoraListing> {
    if let Err(e) = sd.set_lora_library(library) {
        tracing::error!(error = %e, "the LoRAs merged before could not be taken out");
    }
    let mut out = Vec::new();
    for info in sd.lora_library().list() {
        let loaded_verdict = || sd.check_lora(&info.name).err().map(|e| e.to_string());
        let error = match judged_against {
            None => loaded_verdict(),
            Some(model) => match sdserve_pipeline::lora::fit_problem_in_model(info, model) {
                Ok(problem) => problem,
                Err(e) => {
                    tracing::warn!(lora = %info.name, model = %model.display(), error = %e, "could not check a LoRA against the default model's files; listing the loaded model's verdict");
                    loaded_verdict()
                }
            },
        };
        if let Some(e) = &error {
            tracing::warn!(lora = %info.name, "{e}");
        }
        out.push(LoraListing {
            name: info.name.clone(),
            alias: info
                .metadata
                .get("ss_output_name")
                .cloned()
                .unwrap_or_else(|| info.name.clone()),
            file: info.file.display().to_string(),
            format: info.format.name().to_string(),
            rank: info.rank,
            targets: info.targets.clone(),
            layers: info.layers,
            conv_layers: info.conv_layers,
            types: info.types.clone(),
            metadata: metadata_json(&info.metadata),
            error,
        });
    }
    for (path, e) in failed {
        tracing::warn!(file = %path.display(), error = %e, "LoRA file cannot be read; listed with its error");
        let name = stem(&path);
        out.push(LoraListing {
            alias: name.clone(),
            name,
            file: path.display().to_string(),
            format: "unknown".into(),
            rank: 0,
            targets: Vec::new(),
            layers: 0,
            conv_layers: 0,
            types: Vec::new(),
            metadata: Default::default(),
            error: Some(e.to_string()),
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// Installs the embeddings of `library` that fit the loaded model and lists them all, with why
/// the others cannot be used: the loaded model's verdict, or that of the default model's text
/// encoder width `judged_width` when given (see `AdapterFolders::judged_against`).
fn install_embeddings(
    sd: &mut StableDiffusion,
    mut library: EmbeddingLibrary,
    failed: Vec<(PathBuf, sdserve_pipeline::PipelineError)>,
    judged_width: Option<usize>,
) -> Vec<EmbeddingListing> {
    let misfits: Vec<(String, String)> = library
        .list()
        .filter_map(|e| Some((e.name.clone(), sd.embedding_problem(e)?)))
        .collect();
    let mut out: Vec<EmbeddingListing> = library
        .list()
        .map(|e| EmbeddingListing {
            name: e.name.clone(),
            file: e.file.display().to_string(),
            format: e.format.to_string(),
            vectors: e.num_vectors(),
            shape: e.hidden_size(),
            step: e.step,
            sd_checkpoint: e.sd_checkpoint.clone(),
            sd_checkpoint_name: e.sd_checkpoint_name.clone(),
            error: match judged_width {
                None => sd.embedding_problem(e),
                Some(width) => sd.embedding_problem_for(e, width),
            },
        })
        .collect();
    for (name, why) in misfits {
        tracing::warn!(embedding = %name, "embedding does not fit this model: {why}");
        library.remove(&name);
    }
    if let Err(e) = sd.set_embedding_library(library) {
        // Not expected once the misfits are out; no embedding beats a wrong one.
        tracing::error!(error = %e, "embeddings refused; none is used");
        let _ = sd.set_embedding_library(EmbeddingLibrary::default());
        for listing in out.iter_mut().filter(|l| l.error.is_none()) {
            listing.error = Some(e.to_string());
        }
    }
    for (path, e) in failed {
        tracing::warn!(file = %path.display(), error = %e, "embedding file cannot be read; listed with its error");
        out.push(EmbeddingListing {
            name: stem(&path),
            file: path.display().to_string(),
            format: "unknown".into(),
            vectors: 0,
            shape: 0,
            step: None,
            sd_checkpoint: None,
            sd_checkpoint_name: None,
            error: Some(e.to_string()),
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

fn stem(path: &Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// A header's metadata as A1111 reads it: string values, those that start with `{` parsed as
/// JSON when they parse as Python's `json.loads` does (kohya's `ss_tag_frequency`,
/// `ss_dataset_dirs`).
fn metadata_json(
    metadata: &std::collections::BTreeMap<String, String>,
) -> serde_json::Map<String, serde_json::Value> {
    metadata
        .iter()
        .map(|(k, v)| {
            let value = v
                .starts_with('{')
                .then(|| sdserve_pipeline::config_json::from_str(v).ok())
                .flatten()
                .unwrap_or_else(|| serde_json::Value::String(v.clone()));
            (k.clone(), value)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_reads_as_a1111_reads_it() {
        let m = std::collections::BTreeMap::from([
            ("ss_output_name".to_string(), "ink".to_string()),
            (
                "ss_tag_frequency".to_string(),
                r#"{"img": {"cat": 3}}"#.to_string(),
            ),
            ("note".to_string(), "{not json".to_string()),
        ]);
        let j = metadata_json(&m);
        assert_eq!(j["ss_output_name"], "ink");
        assert_eq!(j["ss_tag_frequency"]["img"]["cat"], 3);
        assert_eq!(j["note"], "{not json");
    }

    fn listing(name: &str, alias: &str) -> LoraListing {
        LoraListing {
            name: name.into(),
            alias: alias.into(),
            file: format!("{name}.safetensors"),
            format: "kohya".into(),
            rank: 4,
            targets: vec!["unet".into()],
            layers: 1,
            conv_layers: 0,
            types: vec!["lora".into()],
            metadata: Default::default(),
            error: None,
        }
    }

    #[test]
    fn a_lora_is_found_by_name_or_by_its_one_alias() {
        let a = Adapters {
            loras: vec![
                listing("ink_v2", "Ink Style"),
                listing("Ink Style", "other"),
                listing("soft", "twin"),
                listing("soft2", "twin"),
            ],
            ..Default::default()
        };
        assert_eq!(a.lora("ink_v2").unwrap().name, "ink_v2");
        // A file name wins over an alias.
        assert_eq!(a.lora("Ink Style").unwrap().name, "Ink Style");
        assert_eq!(a.lora("other").unwrap().name, "Ink Style");
        // An alias two files share names neither.
        assert!(a.lora("twin").is_none());
        assert!(a.lora_problem("twin").unwrap().contains("unknown LoRA"));
        assert!(a.lora_problem("other").is_none());
    }

    #[test]
    fn the_fingerprint_follows_names_sizes_and_times() {
        let dir = std::env::temp_dir().join(format!("sdserve-fp-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let folders = AdapterFolders::new(AdapterDirs {
            lora_dir: Some(dir.clone()),
            embeddings_dir: None,
        });
        let empty = folders.fingerprint();
        assert_eq!(empty.len(), 16);
        std::fs::write(dir.join("a.safetensors"), b"12345678").unwrap();
        let one = folders.fingerprint();
        assert_ne!(one, empty);
        // Other extensions are not LoRAs: no change.
        std::fs::write(dir.join("notes.txt"), b"x").unwrap();
        assert_eq!(folders.fingerprint(), one);
        std::fs::write(dir.join("a.safetensors"), b"123456789").unwrap();
        assert_ne!(folders.fingerprint(), one);
        std::fs::remove_file(dir.join("a.safetensors")).unwrap();
        assert_eq!(folders.fingerprint(), empty);
        std::fs::remove_dir_all(&dir).unwrap();
        assert_ne!(folders.fingerprint(), empty, "a folder gone is a change");
        assert_eq!(AdapterDirs::default().fingerprint(), None);
    }
}
