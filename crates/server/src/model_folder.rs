//! The model folders read on every look (CONTROLNET_DIR, IP_ADAPTER_DIR, UPSCALERS_DIR): the
//! files of some extensions named by their stem, as A1111's model lists name them, and the
//! identity of the files a request runs on for the image cache's key.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// One model of a folder: its name and its file (or folder).
#[derive(Debug, Clone, PartialEq)]
pub struct FolderEntry {
    pub name: String,
    pub path: PathBuf,
}

impl FolderEntry {
    /// Its [`identity`]: a diffusers folder's of the files in it.
    pub fn identity(&self) -> String {
        identity(&self.name, &files_of(&self.path))
    }
}

/// What a folder's scan lists.
pub struct FolderKinds<'a> {
    /// The file extensions read, lower case (a file's is compared in any case).
    pub extensions: &'a [&'a str],
    /// Whether a subfolder with a `config.json` (a diffusers model) is listed by its name.
    pub diffusers_folders: bool,
    /// Of two entries of one name, the lower rank is kept, then the first path.
    pub rank: fn(&Path) -> u8,
}

impl FolderKinds<'_> {
    /// No preference between entries of one name but their paths.
    pub fn by_path(_: &Path) -> u8 {
        0
    }
}

/// The models of `dir` by name, sorted, one per name (empty without the folder or when it
/// cannot be read). Blocking.
pub fn scan(dir: Option<&Path>, kinds: &FolderKinds) -> Vec<FolderEntry> {
    let Some(read) = dir.and_then(|d| std::fs::read_dir(d).ok()) else {
        return Vec::new();
    };
    let mut out: Vec<FolderEntry> = read
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter_map(|path| {
            let name = if path.is_dir() {
                if !kinds.diffusers_folders || !path.join("config.json").is_file() {
                    return None;
                }
                path.file_name()?.to_str()?.to_string()
            } else {
                let ext = path.extension()?.to_str()?.to_ascii_lowercase();
                if !path.is_file() || !kinds.extensions.contains(&ext.as_str()) {
                    return None;
                }
                path.file_stem()?.to_str()?.to_string()
            };
            Some(FolderEntry { name, path })
        })
        .collect();
    out.sort_by(|a, b| {
        let (ra, rb) = ((kinds.rank)(&a.path), (kinds.rank)(&b.path));
        (&a.name, ra, &a.path).cmp(&(&b.name, rb, &b.path))
    });
    out.dedup_by(|later, kept| later.name == kept.name);
    out
}

/// The names quoted and joined for an error message ("none" for no entry).
pub fn quoted_names(entries: &[FolderEntry]) -> String {
    if entries.is_empty() {
        return "none".into();
    }
    let names: Vec<String> = entries.iter().map(|m| format!("{:?}", m.name)).collect();
    names.join(", ")
}

/// `name`, the total size and the newest modification time of `files` (those that can be
/// read): a file replaced under its name changes it.
pub fn identity(name: &str, files: &[PathBuf]) -> String {
    let stamp = |m: &std::fs::Metadata| {
        m.modified()
            .ok()
            .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos())
    };
    let (len, modified) = files
        .iter()
        .filter_map(|p| std::fs::metadata(p).ok())
        .fold((0u64, 0u128), |(l, m), x| (l + x.len(), m.max(stamp(&x))));
    format!("{name} {len} {modified}")
}

/// The files directly in `path` for a folder, else `path` itself.
pub fn files_of(path: &Path) -> Vec<PathBuf> {
    if !path.is_dir() {
        return vec![path.to_path_buf()];
    }
    std::fs::read_dir(path)
        .map(|r| r.filter_map(Result::ok).map(|e| e.path()).collect())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_are_named_by_stem_and_one_name_keeps_the_lower_rank() {
        let root =
            std::env::temp_dir().join(format!("sdserve-model-folder-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        let dir = Dir(root);
        for f in ["b.PTH", "a.bin", "a.safetensors", "c.txt", "d.ckpt"] {
            std::fs::write(dir.path().join(f), f).unwrap();
        }
        // A folder named like a model file is not one; a diffusers folder is when asked.
        std::fs::create_dir(dir.path().join("e.pth")).unwrap();
        std::fs::create_dir(dir.path().join("f")).unwrap();
        std::fs::write(dir.path().join("f/config.json"), "{}").unwrap();
        let names = |kinds: &FolderKinds| -> Vec<(String, String)> {
            scan(Some(dir.path()), kinds)
                .into_iter()
                .map(|e| {
                    let file = e.path.file_name().unwrap().to_string_lossy().into_owned();
                    (e.name, file)
                })
                .collect()
        };
        let pairs = |v: &[(&str, &str)]| -> Vec<(String, String)> {
            v.iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect()
        };
        let not_safetensors = |p: &Path| u8::from(p.extension().is_none_or(|x| x != "safetensors"));
        let adapters = FolderKinds {
            extensions: &["safetensors", "bin"],
            diffusers_folders: false,
            rank: not_safetensors,
        };
        assert_eq!(names(&adapters), pairs(&[("a", "a.safetensors")]));
        let by_path = FolderKinds {
            extensions: &["safetensors", "bin", "pth"],
            diffusers_folders: true,
            rank: FolderKinds::by_path,
        };
        assert_eq!(
            names(&by_path),
            pairs(&[("a", "a.bin"), ("b", "b.PTH"), ("f", "f")])
        );
        assert!(scan(None, &by_path).is_empty());
        assert!(scan(Some(&dir.path().join("missing")), &by_path).is_empty());

        let entries = scan(Some(dir.path()), &by_path);
        assert_eq!(quoted_names(&entries), r#""a", "b", "f""#);
        assert_eq!(quoted_names(&[]), "none");
        // Size and newest time of the files: "a.bin" is 5 bytes, f/ holds 2.
        assert!(entries[0].identity().starts_with("a 5 "));
        assert!(entries[2].identity().starts_with("f 2 "));
        assert_eq!(identity("x", &[]), "x 0 0");
    }

    /// A scratch folder removed on drop.
    struct Dir(PathBuf);
    impl Dir {
        fn path(&self) -> &Path {
            &self.0
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}
