//! ANNOTATOR_DIR: the weights of the model-based ControlNet preprocessors, under the
//! sd-webui-controlnet extension's file names (`ControlNetHED.pth` from the hub repo
//! `lllyasviel/Annotators`), either in the folder itself or in the subfolder the extension
//! downloads each into (`hed/ControlNetHED.pth`, as its `annotator/downloads` holds them), so
//! that folder can be given as it is. Which files there are, and how each is read, the
//! pipeline says (`AnnotatorFile`); the store keeps any of them the same way.
//!
//! Preprocessors run at validation, on the CPU (on tokio's blocking pool), so a network is
//! read once onto the CPU and kept while its file is unchanged (a replaced file is read
//! again), each file on its own. The folder is set once at startup (`serve`, `generate`); without it, or without
//! the file, a module that needs it is the request's 422 naming the module and the file,
//! while `/controlnet/module_list` still lists it, as the extension does.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::SystemTime;

use sdserve_pipeline::controlnet::preprocess::{AnnotatorFile, AnnotatorNetworks, AnyNetwork};
use sdserve_pipeline::PipelineError;

/// The folder and the networks read from it.
#[derive(Default)]
pub struct AnnotatorStore {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    dir: Option<PathBuf>,
    /// By file name: the file as it was read and its network.
    networks: HashMap<&'static str, (FileKey, AnyNetwork)>,
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
            *state = State {
                dir,
                networks: HashMap::new(),
            };
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
    fn network(&self, file: &'static AnnotatorFile) -> sdserve_pipeline::Result<AnyNetwork> {
        let name = file.name;
        // Held while reading: two requests missing at once read the file once.
        let mut state = self.lock();
        let Some(dir) = state.dir.clone() else {
            return Err(missing(format!(
                "needs {name} (lllyasviel/Annotators) in ANNOTATOR_DIR, and this server has none (--annotator-dir)"
            )));
        };
        let path = find(&dir, file.subfolder, name).ok_or_else(|| {
            missing(format!(
                "needs {name} (lllyasviel/Annotators) in ANNOTATOR_DIR (or its {}/ folder), and it is not there",
                file.subfolder
            ))
        })?;
        let meta =
            std::fs::metadata(&path).map_err(|e| missing(format!("cannot read {name}: {e}")))?;
        let key = FileKey {
            path: path.clone(),
            len: meta.len(),
            modified: meta.modified().ok(),
        };
        if let Some((k, net)) = state.networks.get(name) {
            if *k == key {
                return Ok(net.clone());
            }
        }
        let net = (file.load)(&path).map_err(|e| {
            let why = match e {
                PipelineError::Weights { message, .. } => message,
                other => other.to_string(),
            };
            missing(format!(
                "cannot use {name}: {}",
                why.replace(&path.display().to_string(), name)
            ))
        })?;
        state.networks.insert(name, (key, net.clone()));
        Ok(net)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use sdserve_pipeline::controlnet::preprocess::{network, HedNetwork, HED, HED_FILE};

    use super::*;

    fn hed(store: &AnnotatorStore) -> sdserve_pipeline::Result<Arc<HedNetwork>> {
        network(store, &HED)
    }

    fn fixture() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../pipeline/tests/fixtures/hed")
    }

    #[test]
    fn the_network_is_found_in_either_place_read_once_and_missing_is_said() {
        let store = AnnotatorStore::default();
        let e = hed(&store).unwrap_err().to_string();
        assert!(
            e.contains("ControlNetHED.pth") && e.contains("--annotator-dir"),
            "{e}"
        );
        store.set_dir(Some(fixture()));
        let a = hed(&store).unwrap();
        assert!(Arc::ptr_eq(&a, &hed(&store).unwrap()), "read once");
        assert_eq!(a.widths(), [4, 8, 16, 32, 32]);
        // The extension's layout: <dir>/hed/ControlNetHED.pth; an empty folder has none.
        store.set_dir(Some(fixture().join("..")));
        assert!(
            !Arc::ptr_eq(&a, &hed(&store).unwrap()),
            "another folder's file"
        );
        let dir = std::env::temp_dir().join(format!("sdserve-annotators-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        store.set_dir(Some(dir.clone()));
        let e = hed(&store).unwrap_err().to_string();
        assert!(e.contains("it is not there"), "{e}");
        std::fs::create_dir_all(dir.join("hed")).unwrap();
        std::fs::copy(fixture().join(HED_FILE), dir.join("hed").join(HED_FILE)).unwrap();
        assert!(hed(&store).is_ok());
        // A file that is no HED network: named by its file, not the server's path.
        std::fs::write(dir.join(HED_FILE), b"not a pickle").unwrap();
        let e = hed(&store).unwrap_err().to_string();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(e.contains("cannot use ControlNetHED.pth"), "{e}");
        assert!(!e.contains(dir.to_str().unwrap()), "{e}");
    }

    #[test]
    fn each_file_is_kept_on_its_own() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static READS: AtomicUsize = AtomicUsize::new(0);
        static ONE: AnnotatorFile = AnnotatorFile {
            name: "one.pth",
            subfolder: "one",
            load: |p| {
                READS.fetch_add(1, Ordering::SeqCst);
                Ok(Arc::new(std::fs::read(p).unwrap()))
            },
        };
        static TWO: AnnotatorFile = AnnotatorFile {
            name: "two.pth",
            subfolder: "two",
            load: ONE.load,
        };
        let dir = std::env::temp_dir().join(format!("sdserve-annotators2-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("two")).unwrap();
        std::fs::write(dir.join("one.pth"), b"1").unwrap();
        std::fs::write(dir.join("two").join("two.pth"), b"22").unwrap();
        let store = AnnotatorStore::default();
        store.set_dir(Some(dir.clone()));
        let one = network::<Vec<u8>>(&store, &ONE).unwrap();
        let two = network::<Vec<u8>>(&store, &TWO).unwrap();
        assert_eq!((one.as_slice(), two.as_slice()), (&b"1"[..], &b"22"[..]));
        assert!(Arc::ptr_eq(&one, &network(&store, &ONE).unwrap()));
        assert!(Arc::ptr_eq(&two, &network(&store, &TWO).unwrap()));
        assert_eq!(READS.load(Ordering::SeqCst), 2, "each read once");
        // A replaced file is read again; the other stays.
        std::fs::write(dir.join("one.pth"), b"111").unwrap();
        assert_eq!(network::<Vec<u8>>(&store, &ONE).unwrap().len(), 3);
        assert!(Arc::ptr_eq(&two, &network(&store, &TWO).unwrap()));
        let e = network::<Vec<u8>>(&store, &HED).unwrap_err().to_string();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(e.contains("its hed/ folder"), "{e}");
    }
}
