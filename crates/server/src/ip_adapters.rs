//! IP_ADAPTER_DIR: IP-Adapters laid out as h94/IP-Adapter's `models/` folder: every
//! `.safetensors` and `.bin` adapter file in it named by its stem (`ip-adapter_sd15`), and the
//! CLIP image encoder they were trained with in `image_encoder/` (`config.json`, its weights,
//! and `preprocessor_config.json` where present). Requests name adapters in
//! `ip_adapters[i].model` (`GET /ip-adapters` lists them).
//!
//! The folder is read on every look, as CONTROLNET_DIR is. The adapter and the encoder are
//! read for the request that uses them and dropped after it (the encoder, ViT-H/14 for SD 1.5's
//! adapters, is about 1.2 GB in f16: on a GPU it is on the device only while a request uses
//! it); an adapter for another UNet fails that request with a 422 naming it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use sdserve_pipeline::ip_adapter::{ImageEncoder, IpAdapter};
use sdserve_pipeline::pipeline::GenerationParams;
use sdserve_pipeline::PipelineError;
use serde::Serialize;
use utoipa::ToSchema;

use crate::error::ApiError;
use crate::model_folder::{self, identity, FolderEntry, FolderKinds};
use crate::validate::{IpAdapterFiles, ValidIpAdapter, ValidRequest};

/// The adapter files read (h94's `.safetensors` and `.bin`).
const EXTENSIONS: [&str; 2] = ["safetensors", "bin"];
/// The image encoder's folder inside IP_ADAPTER_DIR.
pub const IMAGE_ENCODER: &str = "image_encoder";
/// The sd-webui-controlnet extension's `clip_vision_h_uc.data` (its
/// `annotator/clipvision/`) in IP_ADAPTER_DIR: a Plus adapter's negative side in A1111 units.
pub const PLUS_UNCOND: &str = "clip_vision_h_uc.data";

/// One adapter of IP_ADAPTER_DIR.
pub type IpAdapterEntry = FolderEntry;

/// What IP_ADAPTER_DIR lists: of two files of one stem, the `.safetensors`.
const KINDS: FolderKinds = FolderKinds {
    extensions: &EXTENSIONS,
    diffusers_folders: false,
    rank: |path| u8::from(path.extension().is_none_or(|x| x != "safetensors")),
};

/// IP_ADAPTER_DIR, as this process sees it.
#[derive(Debug, Clone, Default)]
pub struct IpAdapterCatalog {
    pub dir: Option<PathBuf>,
}

impl IpAdapterCatalog {
    pub fn new(dir: Option<PathBuf>) -> Self {
        Self { dir }
    }

    /// The adapters by name, sorted (empty without the folder or when it cannot be read); of
    /// two files of one stem, the `.safetensors`. Blocking.
    pub fn scan(&self) -> Vec<IpAdapterEntry> {
        model_folder::scan(self.dir.as_deref(), &KINDS)
    }

    /// The image encoder's folder, where it has a `config.json`.
    pub fn image_encoder(&self) -> Option<PathBuf> {
        let dir = self.dir.as_ref()?.join(IMAGE_ENCODER);
        dir.join("config.json").is_file().then_some(dir)
    }

    /// The check a request's adapters get before it is queued (blocking: reads the folder and
    /// the files' metadata): a name the folder does not list is a 422 naming
    /// `ip_adapters[i].model` and listing the names; a folder without `image_encoder/` a 422
    /// saying so. `Some` identifies the files (name, size, modification time) for the image
    /// cache's key; each unit records where its files were found.
    pub fn check(&self, req: &mut ValidRequest, field: &str) -> Result<Option<String>, ApiError> {
        if req.ip_adapters.is_empty() {
            return Ok(None);
        }
        let models = self.scan();
        // An A1111 unit's errors name its place in `alwayson_scripts.controlnet.args`.
        let named = |i: usize, unit: &ValidIpAdapter| match &unit.a1111 {
            Some(a) => (crate::api::a1111::CONTROLNET_FIELD, a.arg),
            None => (field, i),
        };
        let mut ids = Vec::new();
        let mut found = Vec::new();
        for (i, unit) in req.ip_adapters.iter().enumerate() {
            let (field, i) = named(i, unit);
            let Some(entry) = models.iter().find(|e| e.name == unit.model) else {
                let why = match self.dir.is_some() {
                    true => "no IP-Adapter of that name",
                    false => "no IP-Adapter of that name (this server has no IP_ADAPTER_DIR)",
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
            found.push(entry.path.clone());
        }
        let Some(encoder) = self.image_encoder() else {
            let unit = &req.ip_adapters[0];
            let (field, i) = named(0, unit);
            let at = match unit.a1111 {
                Some(_) => format!("[{i}].model: "),
                None => String::new(),
            };
            return Err(ApiError::validation(
                field,
                format!(
                    "{at}IP_ADAPTER_DIR has no {IMAGE_ENCODER}/ folder (config.json and weights)"
                ),
            ));
        };
        // A1111 units read the extension's negative side for Plus adapters where it is.
        if let Some(uc) = self
            .plus_uncond()
            .filter(|_| req.ip_adapters.iter().any(|u| u.a1111.is_some()))
        {
            ids.push(identity(PLUS_UNCOND, &[uc]));
        }
        ids.push(identity(IMAGE_ENCODER, &model_folder::files_of(&encoder)));
        for (unit, adapter) in req.ip_adapters.iter_mut().zip(found) {
            unit.files = Some(IpAdapterFiles {
                adapter,
                image_encoder: encoder.clone(),
            });
        }
        Ok(Some(format!("ip-adapters {}", ids.join(" "))))
    }

    /// The extension's `clip_vision_h_uc.data`, where IP_ADAPTER_DIR has it.
    pub fn plus_uncond(&self) -> Option<PathBuf> {
        let path = self.dir.as_ref()?.join(PLUS_UNCOND);
        path.is_file().then_some(path)
    }

    /// `GET /ip-adapters`. Blocking (reads the folder).
    pub fn listing(&self) -> IpAdapterList {
        IpAdapterList {
            ip_adapters: self
                .scan()
                .into_iter()
                .map(|m| IpAdapterListing {
                    file: m.path.file_name().map(|f| f.to_string_lossy().into_owned()),
                    name: m.name,
                })
                .collect(),
            image_encoder: self.image_encoder().is_some(),
        }
    }
}

/// One adapter as `GET /ip-adapters` lists it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct IpAdapterListing {
    /// The name `ip_adapters[i].model` takes: the file's stem.
    pub name: String,
    /// The file name in IP_ADAPTER_DIR.
    pub file: Option<String>,
}

/// The body of `GET /ip-adapters`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct IpAdapterList {
    /// IP_ADAPTER_DIR's adapters by name (read when a request uses them: a file that is not
    /// an adapter for the loaded model is listed, and a 422 when used).
    pub ip_adapters: Vec<IpAdapterListing>,
    /// Whether IP_ADAPTER_DIR has the image encoder (`image_encoder/config.json`), which every
    /// adapter needs.
    pub image_encoder: bool,
}

/// `params` with its adapters (known by name) found in `dir` (this process's IP_ADAPTER_DIR),
/// with the folder's image encoder; `None` when the request has none. A name no longer in the
/// folder is the request's error. The files are read when the request runs.
pub fn with_ip_adapter_files(
    params: &GenerationParams,
    dir: Option<&Path>,
) -> Result<Option<GenerationParams>, PipelineError> {
    if params.ip_adapters.is_empty() {
        return Ok(None);
    }
    let catalog = IpAdapterCatalog::new(dir.map(Path::to_path_buf));
    let models = catalog.scan();
    let encoder = catalog.image_encoder().ok_or_else(|| {
        PipelineError::InvalidRequest(format!(
            "ip_adapters: IP_ADAPTER_DIR has no {IMAGE_ENCODER}/ folder"
        ))
    })?;
    let encoder = Arc::new(ImageEncoder::new(IMAGE_ENCODER, encoder));
    let mut resolved = params.clone();
    for (i, unit) in resolved.ip_adapters.iter_mut().enumerate() {
        let name = unit.model.name.clone();
        let entry = models.iter().find(|e| e.name == name).ok_or_else(|| {
            PipelineError::InvalidRequest(format!(
                "ip_adapters[{i}].model: the IP-Adapter {name:?} is no longer in IP_ADAPTER_DIR"
            ))
        })?;
        unit.model = Arc::new(IpAdapter::new(name, entry.path.clone()));
        unit.image_encoder = encoder.clone();
        if let Some(run) = &mut unit.extension {
            run.plus_uncond = catalog.plus_uncond();
        }
    }
    Ok(Some(resolved))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adapter_files_are_listed_by_stem_with_the_encoder() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../pipeline/tests/fixtures/ip-adapter/models");
        let catalog = IpAdapterCatalog::new(Some(dir.clone()));
        let entries = catalog.scan();
        // The .bin and the .safetensors share a stem: one name, the .safetensors.
        let names: Vec<&str> = entries.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "ip-adapter-plus-face_sd15",
                "ip-adapter-plus_sd15",
                "ip-adapter_sd15"
            ]
        );
        assert_eq!(entries[2].path, dir.join("ip-adapter_sd15.safetensors"));
        assert_eq!(catalog.image_encoder(), Some(dir.join(IMAGE_ENCODER)));
        assert!(catalog.listing().image_encoder);
        assert!(IpAdapterCatalog::default().scan().is_empty());
    }
}
