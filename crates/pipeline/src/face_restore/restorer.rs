//! A1111's whole face restoration of one image (`restore_with_face_helper` with CodeFormer's
//! `restore_face`): the faces found and aligned ([`detect_and_align`]), each crop through
//! CodeFormer ([`restore_crop`]), and the restored faces pasted back under their parsing
//! masks ([`paste_faces`]). An image with no face comes back as it was.
//!
//! The three networks live in one folder, as A1111's `models/Codeformer` holds them
//! (`patch_facexlib` saves facexlib's two downloads beside CodeFormer's): facexlib's fixed
//! names [`DETECTION_FILE`] and [`PARSING_FILE`], and CodeFormer as the first other `.pth`
//! in A1111's natural name order (its `load_models` walks the folder's `.pth` files in that
//! order and loads the first, which must be CodeFormer: `codeformer-v0.1.0.pth` sorts before
//! facexlib's names; here those two are passed over wherever they sort).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::Device;

use super::{detect_and_align, paste_faces, restore_crop, CodeFormer, ParseNet, RetinaFace};
use crate::named_file::{natural_sort_key, NamedFile};
use crate::pipeline::RgbImage;
use crate::{PipelineError, Result};

/// facexlib's RetinaFace ResNet50 weights (`init_detection_model('retinaface_resnet50')`).
pub const DETECTION_FILE: &str = "detection_Resnet50_Final.pth";
/// facexlib's ParseNet weights (`init_parsing_model('parsenet')`).
pub const PARSING_FILE: &str = "parsing_parsenet.pth";
/// The name A1111 gives its CodeFormer restorer (`FaceRestorerCodeFormer.name`), written in
/// infotexts (`Face restoration: CodeFormer`) and listed by `/sdapi/v1/face-restorers`.
pub const NAME: &str = "CodeFormer";
/// A1111's default `code_former_weight`.
pub const WEIGHT_DEFAULT: f64 = 0.5;

/// The three files of a face restoration folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FaceRestoreFiles {
    pub codeformer: PathBuf,
    pub detection: PathBuf,
    pub parsing: PathBuf,
}

impl FaceRestoreFiles {
    /// The files of `dir`; what is missing is the error, for a person.
    pub fn in_folder(dir: &Path) -> std::result::Result<Self, String> {
        let read = std::fs::read_dir(dir).map_err(|e| format!("cannot be read: {e}"))?;
        let mut names: Vec<String> = read
            .filter_map(|e| e.ok())
            .filter(|e| e.path().is_file())
            .filter_map(|e| e.file_name().into_string().ok())
            .collect();
        names.sort_by_cached_key(|n| natural_sort_key(n));
        let has = |name: &str| names.iter().any(|n| n == name);
        let codeformer = names.iter().find(|n| {
            n.to_ascii_lowercase().ends_with(".pth") && *n != DETECTION_FILE && *n != PARSING_FILE
        });
        let mut missing = Vec::new();
        if codeformer.is_none() {
            missing.push("a CodeFormer .pth (codeformer-v0.1.0.pth)".to_string());
        }
        for name in [DETECTION_FILE, PARSING_FILE] {
            if !has(name) {
                missing.push(name.to_string());
            }
        }
        match codeformer {
            Some(c) if missing.is_empty() => Ok(Self {
                codeformer: dir.join(c),
                detection: dir.join(DETECTION_FILE),
                parsing: dir.join(PARSING_FILE),
            }),
            _ => Err(format!("lacks {}", missing.join(", "))),
        }
    }
}

/// The loaded networks (f32, on one device).
pub struct FaceRestorer {
    detector: RetinaFace,
    parser: ParseNet,
    codeformer: CodeFormer,
}

impl FaceRestorer {
    pub fn load(files: &FaceRestoreFiles, device: &Device) -> Result<Self> {
        Ok(Self {
            detector: RetinaFace::load(&files.detection, device)?,
            parser: ParseNet::load(&files.parsing, device)?,
            codeformer: CodeFormer::load(&files.codeformer, device)?,
        })
    }

    pub fn detector(&self) -> &RetinaFace {
        &self.detector
    }

    pub fn parser(&self) -> &ParseNet {
        &self.parser
    }

    pub fn codeformer(&self) -> &CodeFormer {
        &self.codeformer
    }

    /// `image` with every face found restored at CodeFormer's `weight` (0 keeps only the
    /// codebook's face, 1 the most of the input).
    pub fn restore(&self, image: &RgbImage, weight: f64) -> Result<RgbImage> {
        let faces = detect_and_align(&self.detector, image)?;
        if faces.is_empty() {
            return Ok(image.clone());
        }
        let restored = faces
            .iter()
            .map(|f| Ok((f.affine, restore_crop(&self.codeformer, &f.crop, weight)?)))
            .collect::<Result<Vec<_>>>()?;
        paste_faces(image, &restored, &self.parser)
    }
}

/// A request's face restoration: the folder's networks (known by the folder until the worker
/// hands them over loaded) and CodeFormer's weight.
#[derive(Debug, Clone, PartialEq)]
pub struct FaceRestore {
    pub restorer: Arc<NamedFile<FaceRestorer>>,
    pub weight: f64,
}

impl FaceRestore {
    /// Restores `image`, reading the networks (f32, on `device`) if nobody handed them over.
    pub fn run(&self, image: &RgbImage, device: &Device) -> Result<RgbImage> {
        let restorer = self
            .restorer
            .get_or_read("face restorer", "FACE_RESTORE_DIR", |dir| {
                let files = FaceRestoreFiles::in_folder(dir)?;
                FaceRestorer::load(&files, device).map_err(|e| e.to_string())
            })
            .map_err(PipelineError::InvalidRequest)?;
        restorer.restore(image, self.weight)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_folder_names_what_it_lacks_and_takes_codeformer_by_name_order() {
        let dir = std::env::temp_dir().join(format!("face-restore-files-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let err = FaceRestoreFiles::in_folder(&dir).unwrap_err();
        assert!(
            err.contains("CodeFormer")
                && err.contains(DETECTION_FILE)
                && err.contains(PARSING_FILE),
            "{err}"
        );
        for name in [
            DETECTION_FILE,
            PARSING_FILE,
            "zz.pth",
            "codeformer-v0.1.0.pth",
            "notes.txt",
        ] {
            std::fs::write(dir.join(name), b"x").unwrap();
        }
        let files = FaceRestoreFiles::in_folder(&dir).unwrap();
        assert_eq!(files.codeformer, dir.join("codeformer-v0.1.0.pth"));
        assert_eq!(files.detection, dir.join(DETECTION_FILE));
        std::fs::remove_file(dir.join(PARSING_FILE)).unwrap();
        assert_eq!(
            FaceRestoreFiles::in_folder(&dir).unwrap_err(),
            format!("lacks {PARSING_FILE}")
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
