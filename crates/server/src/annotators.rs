//! ANNOTATOR_DIR: the weights of the model-based ControlNet preprocessors, under the
//! sd-webui-controlnet extension's file names (`ControlNetHED.pth` from the hub repo
//! `lllyasviel/Annotators`), either in the folder itself or in the subfolder the extension
//! downloads each into (`hed/ControlNetHED.pth`, as its `annotator/downloads` holds them), so
//! that folder can be given as it is.
//!
//! Preprocessors run at validation, on the CPU (on tokio's blocking pool), so a network is
//! read once onto the CPU and kept while its file is unchanged (a replaced file is read
//! again). The folder is set once at startup (`serve`, `generate`); without it, or without
//! the file, a module that needs it is the request's 422 naming the module and the file,
//! while `/controlnet/module_list` still lists it, as the extension does.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::SystemTime;

use candle_core::Device;
use sdserve_pipeline::controlnet::preprocess::{AnnotatorNetworks, HedNetwork, HED_FILE};
use sdserve_pipeline::PipelineError;

/// The folder and the networks read from it.
#[derive(Default)]
pub struct AnnotatorStore {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    dir: Option<PathBuf>,
    hed: Option<(FileKey, Arc<HedNetwork>)>,
}

/// A file as it was read: a replaced file differs in size or time.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FileKey {
    path: PathBuf,
    len: u64,
    modified: Option<SystemTime>,
}

impl AnnotatorStore {
    /// The process's store.
    pub fn shared() -> &'static AnnotatorStore {
        static SHARED: OnceLock<AnnotatorStore> = OnceLock::new();
        SHARED.get_or_init(AnnotatorStore::default)
    }

    /// Sets the folder (at startup); the networks read from another are dropped.
    pub fn set_dir(&self, dir: Option<PathBuf>) {
        let mut state = self.lock();
        if state.dir != dir {
            *state = State { dir, hed: None };
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// `file` in `dir` itself or in the extension's subfolder `sub`; `None` when in neither.
fn find(dir: &Path, sub: &str, file: &str) -> Option<PathBuf> {
    [dir.join(file), dir.join(sub).join(file)]
        .into_iter()
        .find(|p| p.is_file())
}

fn missing(why: String) -> PipelineError {
    PipelineError::InvalidRequest(why)
}

impl AnnotatorNetworks for AnnotatorStore {
    fn hed(&self) -> sdserve_pipeline::Result<Arc<HedNetwork>> {
        // Held while reading: two requests missing at once read the file once.
        let mut state = self.lock();
        let Some(dir) = state.dir.clone() else {
            return Err(missing(format!(
                "needs {HED_FILE} (lllyasviel/Annotators) in ANNOTATOR_DIR, and this server has none (--annotator-dir)"
            )));
        };
        let path = find(&dir, "hed", HED_FILE).ok_or_else(|| {
            missing(format!(
                "needs {HED_FILE} (lllyasviel/Annotators) in ANNOTATOR_DIR (or its hed/ folder), and it is not there"
            ))
        })?;
        let meta = std::fs::metadata(&path)
            .map_err(|e| missing(format!("cannot read {HED_FILE}: {e}")))?;
        let key = FileKey {
            path: path.clone(),
            len: meta.len(),
            modified: meta.modified().ok(),
        };
        if let Some((k, net)) = &state.hed {
            if *k == key {
                return Ok(net.clone());
            }
        }
        let net = HedNetwork::load(&path, &Device::Cpu).map_err(|e| {
            let why = match e {
                PipelineError::Weights { message, .. } => message,
                other => other.to_string(),
            };
            missing(format!(
                "cannot use {HED_FILE}: {}",
                why.replace(&path.display().to_string(), HED_FILE)
            ))
        })?;
        let net = Arc::new(net);
        state.hed = Some((key, net.clone()));
        Ok(net)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../pipeline/tests/fixtures/hed")
    }

    #[test]
    fn the_network_is_found_in_either_place_read_once_and_missing_is_said() {
        let store = AnnotatorStore::default();
        let e = store.hed().unwrap_err().to_string();
        assert!(
            e.contains("ControlNetHED.pth") && e.contains("--annotator-dir"),
            "{e}"
        );
        store.set_dir(Some(fixture()));
        let a = store.hed().unwrap();
        assert!(Arc::ptr_eq(&a, &store.hed().unwrap()), "read once");
        assert_eq!(a.widths(), [4, 8, 16, 32, 32]);
        // The extension's layout: <dir>/hed/ControlNetHED.pth; an empty folder has none.
        store.set_dir(Some(fixture().join("..")));
        assert!(
            !Arc::ptr_eq(&a, &store.hed().unwrap()),
            "another folder's file"
        );
        let dir = std::env::temp_dir().join(format!("sdserve-annotators-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        store.set_dir(Some(dir.clone()));
        let e = store.hed().unwrap_err().to_string();
        assert!(e.contains("it is not there"), "{e}");
        std::fs::create_dir_all(dir.join("hed")).unwrap();
        std::fs::copy(fixture().join(HED_FILE), dir.join("hed").join(HED_FILE)).unwrap();
        assert!(store.hed().is_ok());
        // A file that is no HED network: named by its file, not the server's path.
        std::fs::write(dir.join(HED_FILE), b"not a pickle").unwrap();
        let e = store.hed().unwrap_err().to_string();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(e.contains("cannot use ControlNetHED.pth"), "{e}");
        assert!(!e.contains(dir.to_str().unwrap()), "{e}");
    }
}
