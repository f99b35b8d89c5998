//! What the submit checks read of a single-file checkpoint (MODELS_DIR's `.safetensors` and
//! `.ckpt`): its tensor names and shapes as conversion reads them (`SingleFileShapes`: the
//! model's limits, the UNet and text encoder weights a LoRA must fit). Reading them means a
//! safetensors header of a thousand tensors or a pickle's whole object tree, so each version
//! of a file (path, size, modification time) is read once and kept, for the few files used
//! last; a file replaced or rewritten is read again.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use sdserve_pipeline::single_file::SingleFileShapes;

/// Files kept (an SD 1.5 file's names and shapes take about 200 KB).
const KEPT: usize = 8;

/// A version of a file: its path, size and modification time.
type Version = (PathBuf, u64, Option<SystemTime>);

/// A file's names and shapes, or why they are not a model's.
pub type Read = Arc<Result<SingleFileShapes, String>>;

type Kept = Mutex<VecDeque<(Version, Read)>>;

/// The process's files, the one used last first.
static KEPT_FILES: Kept = Mutex::new(VecDeque::new());

/// The names and shapes of the single file at `path`, read once per version of it.
pub fn shapes(path: &Path) -> Read {
    kept_or_read(&KEPT_FILES, path, |p| {
        SingleFileShapes::read(p).map_err(|e| e.to_string())
    })
}

fn kept_or_read(
    kept: &Kept,
    path: &Path,
    read: impl FnOnce(&Path) -> Result<SingleFileShapes, String>,
) -> Read {
    // A file that cannot be looked at is not kept: the read says why.
    let Ok(meta) = std::fs::metadata(path) else {
        return Arc::new(read(path));
    };
    let version = (path.to_path_buf(), meta.len(), meta.modified().ok());
    let lock = || kept.lock().unwrap_or_else(|e| e.into_inner());
    {
        let mut files = lock();
        if let Some(i) = files.iter().position(|(v, _)| *v == version) {
            let entry = files.remove(i).expect("the position found");
            let shapes = entry.1.clone();
            files.push_front(entry);
            return shapes;
        }
    }
    // Read without the lock: another file's check need not wait for this one.
    let shapes = Arc::new(read(path));
    let mut files = lock();
    files.retain(|(v, _)| v.0 != version.0);
    files.push_front((version, shapes.clone()));
    files.truncate(KEPT);
    shapes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixtures() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../pipeline/tests/fixtures")
    }

    #[test]
    fn a_file_is_read_once_per_version_and_few_are_kept() {
        let dir = std::env::temp_dir().join(format!("sdserve-single-files-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("model.safetensors");
        let tiny_a = std::fs::read(fixtures().join("single-file/tiny-a.safetensors")).unwrap();
        std::fs::write(&file, &tiny_a).unwrap();
        let kept = Kept::default();
        let reads = std::cell::Cell::new(0);
        let get = |path: &Path| {
            kept_or_read(&kept, path, |p| {
                reads.set(reads.get() + 1);
                SingleFileShapes::read(p).map_err(|e| e.to_string())
            })
        };
        let first = get(&file);
        let limits = first.as_ref().as_ref().unwrap().limits;
        assert!(
            Arc::ptr_eq(&first, &get(&file)),
            "the second look is the first read"
        );
        assert_eq!(reads.get(), 1);
        // Rewritten (another size): read again, and the check follows the file.
        std::fs::write(&file, &tiny_a[..tiny_a.len() / 2]).unwrap();
        assert!(get(&file).is_err(), "a cut file is no model");
        assert_eq!(reads.get(), 2);
        // Only the newest version of a file is kept, and at most KEPT files.
        std::fs::write(&file, &tiny_a).unwrap();
        assert_eq!(get(&file).as_ref().as_ref().unwrap().limits, limits);
        assert_eq!(kept.lock().unwrap().len(), 1);
        for i in 0..KEPT + 2 {
            let other = dir.join(format!("other-{i}.safetensors"));
            std::fs::write(&other, b"not a model").unwrap();
            assert!(get(&other).is_err());
        }
        assert_eq!(kept.lock().unwrap().len(), KEPT);
        assert_eq!(reads.get(), 3 + KEPT + 2);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
