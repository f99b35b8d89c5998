//! UPSCALERS_DIR: ESRGAN-architecture upscaler models (A1111's `models/ESRGAN` folder: R-ESRGAN
//! 4x+, 4x-UltraSharp, NMKD's, ...), every `.pth`, `.pt` and `.safetensors` file in it named by
//! its stem, as A1111's `modelloader.friendly_name` names them. Extras (`upscaler_1`,
//! `upscaler_2`) take these names beside A1111's built-in `None`, `Lanczos`, `Nearest`, which
//! win where a file has one of their names.
//!
//! The folder is read on every look (one directory listing), as VAE_DIR is: a file dropped in
//! can be named at once. A file is read when a request uses it; one that is not an RRDBNet is
//! a 422 naming the file.

use std::path::PathBuf;

use serde::Serialize;
use utoipa::ToSchema;

/// The extensions A1111's ESRGAN upscaler lists.
const EXTENSIONS: [&str; 3] = ["pth", "pt", "safetensors"];

/// One model of UPSCALERS_DIR.
#[derive(Debug, Clone, PartialEq)]
pub struct UpscalerEntry {
    pub name: String,
    pub path: PathBuf,
}

/// UPSCALERS_DIR, as this process sees it.
#[derive(Debug, Clone, Default)]
pub struct UpscalerCatalog {
    pub dir: Option<PathBuf>,
}

impl UpscalerCatalog {
    pub fn new(dir: Option<PathBuf>) -> Self {
        Self { dir }
    }

    /// The models, by name (empty without the folder or when it cannot be read). Blocking.
    pub fn scan(&self) -> Vec<UpscalerEntry> {
        let Some(dir) = &self.dir else {
            return Vec::new();
        };
        let Ok(read) = std::fs::read_dir(dir) else {
            return Vec::new();
        };
        let builtin = crate::validate::extras::UPSCALERS.map(|(n, _)| n);
        let mut out: Vec<UpscalerEntry> = read
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.is_file())
            .filter(|p| {
                p.extension()
                    .and_then(|e| e.to_str())
                    .is_some_and(|e| EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
            })
            .filter_map(|path| {
                let name = path.file_stem()?.to_str()?.to_string();
                (!builtin.contains(&name.as_str())).then_some(UpscalerEntry { name, path })
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name).then(a.path.cmp(&b.path)));
        // Two files of one stem (x.pth, x.safetensors): the first in that order is the name's.
        out.dedup_by(|b, a| a.name == b.name);
        out
    }
}

/// One upscaler as `GET /upscalers` lists it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct UpscalerListing {
    /// The name Extras' `upscaler_1` / `upscaler_2` take.
    pub name: String,
    /// `builtin` (A1111's `None`, `Lanczos`, `Nearest`: Pillow's filters) or `esrgan` (a model
    /// of UPSCALERS_DIR).
    pub kind: String,
    /// The model's file name in UPSCALERS_DIR (null for the built-ins).
    pub file: Option<String>,
}

/// The body of `GET /upscalers`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct UpscalerList {
    /// The built-ins, then UPSCALERS_DIR's models by name (files are read when a request uses
    /// them: one that is not an ESRGAN model is listed, and a 422 when named).
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
            name: m.name,
            kind: "esrgan".into(),
        });
        UpscalerList {
            upscalers: builtin.into_iter().chain(models).collect(),
        }
    }
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
}
