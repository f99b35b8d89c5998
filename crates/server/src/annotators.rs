//! ANNOTATOR_DIR: the weights of the model-based ControlNet preprocessors, under the
//! sd-webui-controlnet extension's file names (`ControlNetHED.pth`, `sk_model.pth`,
//! `sk_model2.pth`, `netG.pth`, `erika.pth`, `body_pose_model.pth`, `hand_pose_model.pth`,
//! `facenet.pth`, `scannet.pt`, ... from the hub repo `lllyasviel/Annotators`,
//! `7_model.pth` from `bdsqlsz/qinglong_controlnet-lllite`'s `Annotators/`, `MTEED.pth` from
//! `TheMistoAI/MistoLine`'s `Anyline/`, `depth_anything_v2_vitl.safetensors` from
//! `MackinationsAi/Depth-Anything-V2_Safetensors`, `depth_anything_vitl14.pth` from the
//! `LiheYoung/Depth-Anything` space's `checkpoints/`, `dpt_hybrid-midas-501f0c75.pt` from
//! `lllyasviel/ControlNet`'s `annotator/ckpts/`: each file's `hub`), either in the
//! folder itself or in the subfolder the extension downloads each into
//! (`hed/ControlNetHED.pth`, `lineart/sk_model.pth`, as its `annotator/downloads` holds them), so
//! that folder can be given as it is. Which files there are, and how each is read, the
//! pipeline says (`AnnotatorFile`); the store keeps any of them the same way. A file not in
//! the folder (or with no folder) is looked for in the model cache, where
//! `sdserve download --annotators` puts the hub repo's files (its `main` snapshot).
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

use sdserve_pipeline::controlnet::preprocess::{
    AnnotatorFile, AnnotatorNetworks, AnyNetwork, ANNOTATOR_FILES,
};
use sdserve_pipeline::PipelineError;

/// The files `sdserve download --annotators` fetches: every network's file, by hub repo (in
/// the order of ANNOTATOR_FILES), each as its path in the repo.
pub fn hub_repos() -> &'static [(&'static str, Vec<&'static str>)] {
    static REPOS: OnceLock<Vec<(&'static str, Vec<&'static str>)>> = OnceLock::new();
    REPOS.get_or_init(|| {
        let mut repos: Vec<(&'static str, Vec<&'static str>)> = Vec::new();
        for f in ANNOTATOR_FILES {
            match repos.iter_mut().find(|(r, _)| *r == f.hub.repo) {
                Some((_, paths)) => paths.push(f.hub.path),
                None => repos.push((f.hub.repo, vec![f.hub.path])),
            }
        }
        repos
    })
}

/// The folder and the networks read from it.
#[derive(Default)]
pub struct AnnotatorStore {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    dir: Option<PathBuf>,
    /// The hub cache (MODEL_CACHE_DIR), where `sdserve download --annotators` puts the files.
    cache: Option<PathBuf>,
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

    /// Sets the folder and the hub cache (at startup); the networks read from others are
    /// dropped.
    pub fn set_dirs(&self, dir: Option<PathBuf>, cache: Option<PathBuf>) {
        let mut state = self.lock();
        if state.dir != dir || state.cache != cache {
            *state = State {
                dir,
                cache,
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

/// `file` in the hub cache's snapshot of its repo, if `sdserve download --annotators` put it
/// there (read on every look: a later download is found without a restart).
fn find_cached(cache: &Path, file: &AnnotatorFile) -> Option<PathBuf> {
    let path = crate::hub::cached_snapshot(cache, file.hub.repo, "main")?.join(file.hub.path);
    path.is_file().then_some(path)
}

fn missing(why: String) -> PipelineError {
    PipelineError::InvalidRequest(why)
}

impl AnnotatorNetworks for AnnotatorStore {
    fn network(&self, file: &'static AnnotatorFile) -> sdserve_pipeline::Result<AnyNetwork> {
        let name = file.name;
        // Held while reading: two requests missing at once read the file once.
        let mut state = self.lock();
        let in_dir = state
            .dir
            .as_deref()
            .and_then(|d| find(d, file.subfolder, name));
        let in_cache = || state.cache.as_deref().and_then(|c| find_cached(c, file));
        let repo = file.hub.repo;
        let Some(path) = in_dir.or_else(in_cache) else {
            let fetch = "or in the model cache, where `sdserve download --annotators` puts it";
            return Err(missing(match &state.dir {
                None => format!(
                    "needs {name} ({repo}) in ANNOTATOR_DIR, and this server has none (--annotator-dir), {fetch}"
                ),
                Some(_) => format!(
                    "needs {name} ({repo}) in ANNOTATOR_DIR (or its {}/ folder), and it is not there, {fetch}",
                    file.subfolder
                ),
            }));
        };
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

    use sdserve_pipeline::controlnet::preprocess::{
        network, HedNetwork, HED, HED_FILE, NORMAL_BAE_FILE,
    };

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
        store.set_dirs(Some(fixture()), None);
        let a = hed(&store).unwrap();
        assert!(Arc::ptr_eq(&a, &hed(&store).unwrap()), "read once");
        assert_eq!(a.widths(), [4, 8, 16, 32, 32]);
        // The extension's layout: <dir>/hed/ControlNetHED.pth; an empty folder has none.
        store.set_dirs(Some(fixture().join("..")), None);
        assert!(
            !Arc::ptr_eq(&a, &hed(&store).unwrap()),
            "another folder's file"
        );
        let dir = std::env::temp_dir().join(format!("sdserve-annotators-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        store.set_dirs(Some(dir.clone()), None);
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

    /// The hub cache's layout as `sdserve download --annotators` leaves it (tests/integration/hub.rs
    /// checks the download itself): found without a folder, or when the folder lacks it.
    #[test]
    fn a_file_missing_from_the_folder_is_taken_from_the_model_cache() {
        let root =
            std::env::temp_dir().join(format!("sdserve-annotators-cache-{}", std::process::id()));
        let repo = root.join("models--lllyasviel--Annotators");
        let commit = "0123456789abcdef0123456789abcdef01234567";
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::create_dir_all(repo.join("snapshots").join(commit)).unwrap();
        let store = AnnotatorStore::default();
        store.set_dirs(None, Some(root.clone()));
        let e = hed(&store).unwrap_err().to_string();
        assert!(e.contains("sdserve download --annotators"), "{e}");
        std::fs::write(repo.join("refs/main"), commit).unwrap();
        let e = hed(&store).unwrap_err().to_string();
        assert!(e.contains("sdserve download --annotators"), "{e}");
        std::fs::copy(
            fixture().join(HED_FILE),
            repo.join("snapshots").join(commit).join(HED_FILE),
        )
        .unwrap();
        assert_eq!(hed(&store).unwrap().widths(), [4, 8, 16, 32, 32]);
        let empty = root.join("empty");
        std::fs::create_dir_all(&empty).unwrap();
        store.set_dirs(Some(empty), Some(root.clone()));
        let found = hed(&store);
        std::fs::remove_dir_all(&root).unwrap();
        assert!(found.is_ok(), "the folder lacks it, the cache has it");
        assert!(hub_repos().contains(&(
            "lllyasviel/Annotators",
            vec![
                HED_FILE,
                "sk_model.pth",
                "sk_model2.pth",
                "netG.pth",
                "erika.pth",
                "table5_pidinet.pth",
                "mlsd_large_512_fp32.pth",
                NORMAL_BAE_FILE,
                "res101.pth",
                "ControlNetLama.pth",
                "body_pose_model.pth",
                "hand_pose_model.pth",
                "facenet.pth"
            ]
        )));
    }

    #[test]
    fn each_file_is_kept_on_its_own() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static READS: AtomicUsize = AtomicUsize::new(0);
        static ONE: AnnotatorFile = AnnotatorFile {
            name: "one.pth",
            subfolder: "one",
            hub: sdserve_pipeline::controlnet::preprocess::lllyasviel("one.pth"),
            load: |p| {
                READS.fetch_add(1, Ordering::SeqCst);
                Ok(Arc::new(std::fs::read(p).unwrap()))
            },
        };
        static TWO: AnnotatorFile = AnnotatorFile {
            name: "two.pth",
            subfolder: "two",
            hub: sdserve_pipeline::controlnet::preprocess::lllyasviel("two.pth"),
            load: ONE.load,
        };
        let dir = std::env::temp_dir().join(format!("sdserve-annotators2-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("two")).unwrap();
        std::fs::write(dir.join("one.pth"), b"1").unwrap();
        std::fs::write(dir.join("two").join("two.pth"), b"22").unwrap();
        let store = AnnotatorStore::default();
        store.set_dirs(Some(dir.clone()), None);
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
