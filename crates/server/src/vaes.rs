//! VAE_DIR: external VAEs a request may decode with (native `vae`, A1111's `sd_vae`), as A1111
//! and ComfyUI users keep them: every `.safetensors`, `.ckpt` and `.pt` file (original LDM key
//! names, read without running pickle code) and every diffusers VAE folder (`config.json` +
//! `diffusion_pytorch_model*.safetensors`) in it, named by its file or folder name.
//!
//! The folder is read on every look (one directory listing): a file dropped in can be named at
//! once. The worker swaps the VAE between jobs (`Generator::set_vae`); a VAE whose shapes do
//! not fit the model fails its job with a 422 naming `vae`.

use std::path::{Path, PathBuf};

use sdserve_pipeline::named_file::natural_sort_key;
use serde::Serialize;
use utoipa::ToSchema;

/// A1111's VAE file extensions (`modules/sd_vae.py`).
const VAE_EXTENSIONS: [&str; 3] = ["safetensors", "ckpt", "pt"];

/// A1111's `None`: no external VAE, the model's baked one.
pub fn means_none(name: &str) -> bool {
    name.eq_ignore_ascii_case("none")
}

/// A1111's `Automatic` (also its old `auto`): the VAE found near a single-file checkpoint
/// ([`VaeCatalog::near_checkpoint`]), else the model's own.
pub fn means_automatic(name: &str) -> bool {
    name.eq_ignore_ascii_case("automatic") || name.eq_ignore_ascii_case("auto")
}

/// The A1111 VAE files MODELS_DIR may hold beside the checkpoints (`*.vae.ckpt`, `*.vae.pt`,
/// `*.vae.safetensors`): VAEs, never models.
pub fn is_vae_file_name(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    VAE_EXTENSIONS
        .iter()
        .any(|ext| lower.ends_with(&format!(".vae.{ext}")))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum VaeKind {
    /// A single file (`.safetensors`, `.ckpt`, `.pt`) with LDM key names, read with the
    /// model's own VAE config.
    File,
    /// A diffusers `AutoencoderKL` folder, with its own config.
    Folder,
}

/// One VAE of VAE_DIR.
#[derive(Debug, Clone, PartialEq)]
pub struct VaeEntry {
    pub name: String,
    pub path: PathBuf,
    pub kind: VaeKind,
}

/// The VAE a request decodes with: its VAE_DIR name and the first 10 hex digits of its
/// weights' sha256 (A1111's `VAE hash`).
#[derive(Debug, Clone, PartialEq)]
pub struct VaeUse {
    pub name: String,
    pub hash: String,
}

/// VAE_DIR, and the VAE files of MODELS_DIR, as this process sees them.
#[derive(Debug, Clone, Default)]
pub struct VaeCatalog {
    pub dir: Option<PathBuf>,
    /// MODEL_CACHE_DIR, where digests are remembered.
    pub cache_dir: Option<PathBuf>,
    /// MODELS_DIR, whose `*.vae.*` files are VAEs too (A1111's `ckpt_dir` in `vae_dict`).
    pub models_dir: Option<PathBuf>,
}

impl VaeCatalog {
    pub fn new(dir: Option<PathBuf>, cache_dir: Option<PathBuf>) -> Self {
        Self {
            dir,
            cache_dir,
            models_dir: None,
        }
    }

    /// The same catalog with MODELS_DIR's VAE files.
    pub fn with_models_dir(self, models_dir: Option<PathBuf>) -> Self {
        Self { models_dir, ..self }
    }

    /// The VAEs by name: MODELS_DIR's `*.vae.*` files, then VAE_DIR's files and folders (a
    /// name in both is VAE_DIR's, as A1111's `vae_dict` keeps the later); empty without
    /// either, or when they cannot be read.
    pub fn scan(&self) -> Vec<VaeEntry> {
        let list = |dir: &Option<PathBuf>| -> Vec<VaeEntry> {
            let Some(read) = dir.as_ref().and_then(|d| std::fs::read_dir(d).ok()) else {
                return Vec::new();
            };
            read.filter_map(Result::ok)
                .filter_map(|e| entry_of(&e.path()))
                .collect()
        };
        let mut out: Vec<VaeEntry> = list(&self.models_dir)
            .into_iter()
            .filter(|e| e.kind == VaeKind::File && is_vae_file_name(&e.name))
            .collect();
        for e in list(&self.dir) {
            out.retain(|o| o.name != e.name);
            out.push(e);
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// A1111's VAE "near the checkpoint" (`sd_vae.find_vae_near_checkpoint`, used when
    /// `sd_vae` is `Automatic`): of the VAE files, in A1111's natural order of their names,
    /// the first whose name starts with the checkpoint's file name less its extension
    /// (`model.safetensors`: `model.vae.pt`, but also `model-v2.pt`). Folders are not
    /// among them (A1111 has none).
    pub fn near_checkpoint(&self, checkpoint: &Path) -> Option<VaeEntry> {
        let name = checkpoint.file_name()?.to_str()?;
        let stem = name.rsplit_once('.').map_or(name, |(stem, _)| stem);
        let mut files: Vec<VaeEntry> = self
            .scan()
            .into_iter()
            .filter(|e| e.kind == VaeKind::File)
            .collect();
        files.sort_by_cached_key(|e| natural_sort_key(&e.name));
        files.into_iter().find(|e| e.name.starts_with(stem))
    }

    /// The VAE called `name` (exactly its file or folder name; nothing else reaches a path).
    pub fn find(&self, name: &str) -> Option<VaeEntry> {
        self.scan().into_iter().find(|e| e.name == name)
    }

    fn hub_options(&self) -> crate::hub::HubOptions {
        crate::hub::HubOptions::from_env(self.cache_dir.clone(), false)
    }

    /// sha256 of the VAE's weights (a folder's weight file), computed once and remembered.
    /// Blocking (reads the file the first time).
    pub fn sha256(&self, entry: &VaeEntry) -> Result<String, String> {
        crate::hub::file_digest(&weights_file(entry)?, &self.hub_options())
            .map_err(|e| e.to_string())
    }

    /// The sha256 if it was computed before (no hashing), as A1111 lists hashes once known.
    pub fn known_sha256(&self, entry: &VaeEntry) -> Option<String> {
        crate::hub::known_file_digest(&weights_file(entry).ok()?, &self.hub_options())
    }

    /// `GET /vaes`.
    pub fn listing(&self) -> VaeList {
        VaeList {
            vaes: self
                .scan()
                .into_iter()
                .map(|e| VaeListing {
                    sha256: self.known_sha256(&e),
                    name: e.name,
                    kind: e.kind,
                })
                .collect(),
        }
    }
}

/// The file a VAE's hash is of: the file itself, or a folder's full-precision weights (its
/// fp16 ones when it has only those).
fn weights_file(entry: &VaeEntry) -> Result<PathBuf, String> {
    match entry.kind {
        VaeKind::File => Ok(entry.path.clone()),
        VaeKind::Folder => sdserve_pipeline::pipeline::component_weight_files(
            &entry.path,
            "",
            "diffusion_pytorch_model",
            candle_core::DType::F32,
        )
        .map_err(|e| e.to_string())?
        .into_iter()
        .next()
        .ok_or_else(|| "no weights".to_string()),
    }
}

/// A VAE_DIR entry, if `path` is a VAE (hidden files and other files are not).
fn entry_of(path: &Path) -> Option<VaeEntry> {
    let name = path.file_name()?.to_str()?.to_string();
    if name.starts_with('.') {
        return None;
    }
    let kind = if path.is_dir() {
        let has_weights = std::fs::read_dir(path)
            .ok()?
            .filter_map(Result::ok)
            .any(|e| {
                let n = e.file_name();
                let n = n.to_string_lossy();
                n.starts_with("diffusion_pytorch_model") && n.ends_with(".safetensors")
            });
        (path.join("config.json").is_file() && has_weights).then_some(VaeKind::Folder)?
    } else {
        let ext = path.extension()?.to_str()?.to_ascii_lowercase();
        (path.is_file() && VAE_EXTENSIONS.contains(&ext.as_str())).then_some(VaeKind::File)?
    };
    Some(VaeEntry {
        name,
        path: path.to_path_buf(),
        kind,
    })
}

/// One VAE as `GET /vaes` lists it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct VaeListing {
    /// The name a request gives in `vae` (A1111: `sd_vae`).
    pub name: String,
    pub kind: VaeKind,
    /// The sha256 of its weights once a request used it (null until then, as A1111 lists
    /// hashes).
    pub sha256: Option<String>,
}

/// The body of `GET /vaes`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct VaeList {
    /// VAE_DIR's VAEs and MODELS_DIR's `*.vae.*` files by name (empty without either).
    /// Requests without `vae` (or with `automatic`) decode with the one near their single-file
    /// checkpoint, else with the model's own.
    pub vaes: Vec<VaeListing>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_and_vae_folders_are_vaes_and_nothing_else_is() {
        let dir = std::env::temp_dir().join(format!("sdserve-vaes-scan-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("folder")).unwrap();
        std::fs::create_dir_all(dir.join("no-weights")).unwrap();
        std::fs::write(dir.join("folder/config.json"), b"{}").unwrap();
        std::fs::write(dir.join("folder/diffusion_pytorch_model.safetensors"), b"x").unwrap();
        std::fs::write(dir.join("no-weights/config.json"), b"{}").unwrap();
        for f in ["a.safetensors", "b.ckpt", "c.PT", "notes.txt", ".hidden.pt"] {
            std::fs::write(dir.join(f), b"x").unwrap();
        }
        let c = VaeCatalog::new(Some(dir.clone()), Some(dir.join(".cache")));
        let names: Vec<(String, VaeKind)> =
            c.scan().into_iter().map(|e| (e.name, e.kind)).collect();
        assert_eq!(
            names,
            [
                ("a.safetensors".to_string(), VaeKind::File),
                ("b.ckpt".to_string(), VaeKind::File),
                ("c.PT".to_string(), VaeKind::File),
                ("folder".to_string(), VaeKind::Folder),
            ]
        );
        assert!(c.find("../a.safetensors").is_none());
        let a = c.find("a.safetensors").unwrap();
        assert_eq!(c.known_sha256(&a), None);
        // sha256("x")
        let digest = "2d711642b726b04401627ca9fbac32f5c8530fb1903cc4db02258717921a4881";
        assert_eq!(c.sha256(&a).unwrap(), digest);
        assert_eq!(c.known_sha256(&a).as_deref(), Some(digest));
        assert_eq!(
            c.sha256(&c.find("folder").unwrap()).unwrap(),
            digest,
            "a folder's hash is its weight file's"
        );
        assert!(means_automatic("Automatic") && means_automatic("auto") && means_none("None"));
        assert!(!means_automatic("None") && !means_none("a.safetensors"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_vae_near_a_checkpoint_is_a1111_s() {
        let root = std::env::temp_dir().join(format!("sdserve-vaes-near-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let (models, vaes) = (root.join("models"), root.join("vaes"));
        std::fs::create_dir_all(vaes.join("model-folder")).unwrap();
        std::fs::create_dir_all(&models).unwrap();
        for f in [
            "model.safetensors",
            "model.vae.pt",
            "other.ckpt",
            "x.vae.safetensors",
        ] {
            std::fs::write(models.join(f), b"x").unwrap();
        }
        for f in [
            "model10.pt",
            "Model2.safetensors",
            "zeta.safetensors",
            "x.vae.safetensors",
        ] {
            std::fs::write(vaes.join(f), b"x").unwrap();
        }
        std::fs::write(vaes.join("model-folder/config.json"), b"{}").unwrap();
        std::fs::write(
            vaes.join("model-folder/diffusion_pytorch_model.safetensors"),
            b"x",
        )
        .unwrap();
        let c = VaeCatalog::new(Some(vaes.clone()), None).with_models_dir(Some(models.clone()));
        let names: Vec<String> = c.scan().into_iter().map(|e| e.name).collect();
        // MODELS_DIR's checkpoints are not VAEs; a name in both folders is VAE_DIR's.
        assert_eq!(
            names,
            [
                "Model2.safetensors",
                "model-folder",
                "model.vae.pt",
                "model10.pt",
                "x.vae.safetensors",
                "zeta.safetensors"
            ]
        );
        assert_eq!(
            c.find("x.vae.safetensors").unwrap().path,
            vaes.join("x.vae.safetensors")
        );
        // Natural order, case-sensitive prefix: `model10` (["model", 10, ".pt"]) comes before
        // `model.vae.pt` (["model.vae.pt"]); `Model2` does not start with `model`.
        let near = |ckpt: &str| c.near_checkpoint(&models.join(ckpt)).map(|e| e.name);
        assert_eq!(near("model.safetensors").as_deref(), Some("model10.pt"));
        assert_eq!(near("other.ckpt"), None);
        assert_eq!(near("x.safetensors").as_deref(), Some("x.vae.safetensors"));
        std::fs::remove_file(vaes.join("model10.pt")).unwrap();
        assert_eq!(near("model.safetensors").as_deref(), Some("model.vae.pt"));
        std::fs::remove_dir_all(&root).unwrap();
    }
}
