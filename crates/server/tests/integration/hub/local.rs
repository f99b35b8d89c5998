//! Local models: single files converted once into the cache, content digests of local folders,
//! a mistyped local folder.

use super::*;

/// A safetensors file as name -> (dtype, shape, bytes), whatever the file's tensor order.
fn tensors(path: &Path) -> BTreeMap<String, (String, Vec<u64>, Vec<u8>)> {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let data = &bytes[8 + n..];
    header
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| k.as_str() != "__metadata__")
        .map(|(k, v)| {
            let off: Vec<usize> = v["data_offsets"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as usize)
                .collect();
            let shape = v["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap())
                .collect();
            (
                k.clone(),
                (
                    v["dtype"].as_str().unwrap().to_string(),
                    shape,
                    data[off[0]..off[1]].to_vec(),
                ),
            )
        })
        .collect()
}

#[test]
fn single_files_are_converted_once_into_the_cache() {
    let cache = Scratch::new("single");
    let mut o = HubOptions::from_env(Some(cache.0.clone()), false);
    o.single_file_config = Some(fixtures().join("tiny-a"));
    let src = fixtures().join("single-file/tiny-a.safetensors");
    let seen = Mutex::new(Vec::new());
    let record = |p: &Progress| seen.lock().unwrap().push(p.stage);
    let m = hub::resolve_model(src.to_str().unwrap(), &o, &record).unwrap();
    assert!(m.dir.starts_with(cache.0.join("sdserve/single-file")));
    assert!(
        m.model_version.starts_with("tiny-a.safetensors@sha256:"),
        "{}",
        m.model_version
    );
    assert!(seen.lock().unwrap().contains(&Stage::Converting));
    for rel in [UNET, VAE, TEXT] {
        let (got, want) = (
            tensors(&m.dir.join(rel)),
            tensors(&fixtures().join("tiny-a").join(rel)),
        );
        assert_eq!(got.len(), want.len(), "{rel}");
        assert!(got == want, "{rel}: tensors differ");
    }
    // Second time: same folder, no conversion.
    seen.lock().unwrap().clear();
    let again = hub::resolve_model(src.to_str().unwrap(), &o, &record).unwrap();
    assert_eq!(again.dir, m.dir);
    assert_eq!(again.model_version, m.model_version);
    assert!(!seen.lock().unwrap().contains(&Stage::Converting));

    // A malicious pickle is refused through the same entry point.
    let evil = fixtures().join("single-file/malicious-os-system.ckpt");
    let e = hub::resolve_model(evil.to_str().unwrap(), &o, &quiet)
        .unwrap_err()
        .to_string();
    assert!(e.contains("refused pickle global"), "{e}");
}

#[test]
fn local_folders_get_a_content_digest_version() {
    let cache = Scratch::new("folder");
    let o = HubOptions::from_env(Some(cache.0.clone()), false);
    let tiny = fixtures().join("tiny-a");
    let a = hub::resolve_model(tiny.to_str().unwrap(), &o, &quiet).unwrap();
    let b = hub::resolve_model(fixtures().join("tiny-b").to_str().unwrap(), &o, &quiet).unwrap();
    assert_eq!(a.dir, tiny);
    assert!(
        a.model_version.starts_with("tiny-a@sha256:"),
        "{}",
        a.model_version
    );
    assert_ne!(a.model_version, b.model_version);
    assert_eq!(
        hub::resolve_model(tiny.to_str().unwrap(), &o, &quiet)
            .unwrap()
            .model_version,
        a.model_version
    );
}

/// A folder of the working directory, for a hub-shaped spec `<it>/<missing>`: an existing one
/// with a hub-id-like name (cargo runs tests in the crate's folder, which has `tests/`, but the
/// test binary may run anywhere), else one made here for the test. Its first entry, sorted.
struct HereFolder {
    name: String,
    first_entry: String,
    made: bool,
}
impl HereFolder {
    fn pick() -> Self {
        let entries = |dir: &Path| -> Vec<String> {
            let mut n: Vec<String> = std::fs::read_dir(dir)
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            n.sort();
            n
        };
        let hub_like = |n: &str| {
            !n.starts_with('.')
                && n.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        };
        let found = entries(Path::new(".")).into_iter().find_map(|n| {
            let first = entries(Path::new(&n)).into_iter().next()?;
            (hub_like(&n) && Path::new(&n).is_dir()).then_some((n, first))
        });
        match found {
            Some((name, first_entry)) => Self {
                name,
                first_entry,
                made: false,
            },
            None => {
                let name = format!("sdserve-hub-here-{}", std::process::id());
                std::fs::create_dir_all(Path::new(&name).join("unet")).unwrap();
                Self {
                    name,
                    first_entry: "unet".into(),
                    made: true,
                }
            }
        }
    }
}
impl Drop for HereFolder {
    fn drop(&mut self) {
        if self.made {
            let _ = std::fs::remove_dir_all(&self.name);
        }
    }
}

#[test]
fn a_mistyped_local_folder_is_named_as_one_quickly() {
    // `<here>/sd15-never-made`, with `<here>/` a folder of the working directory, is a local path
    // gone wrong, not a hub repo. One quick try of the (unreachable) hub, no retries, then both
    // readings.
    let here = HereFolder::pick();
    let spec = format!("{}/sd15-never-made", here.name);
    let cache = Scratch::new("mistyped");
    let mut o = HubOptions::from_env(Some(cache.0.clone()), false);
    o.endpoint = "http://127.0.0.1:9".into();
    o.offline = false;
    o.retries = 5;
    // No retry: answered before the first backoff would have ended (a long one, so that load
    // cannot make a single try look like a retry).
    o.backoff = Duration::from_secs(20);
    let t = std::time::Instant::now();
    let e = hub::resolve_model(&spec, &o, &quiet).unwrap_err();
    assert!(t.elapsed() < o.backoff, "{:?}", t.elapsed());
    assert!(matches!(e, HubError::InvalidSpec(_)), "{e:?}");
    let msg = e.to_string();
    for want in [
        format!("no local folder or file {spec}"),
        format!("{}/ holds:", here.name),
        here.first_entry.clone(),
        "as a hub id: cannot reach the hub".to_string(),
    ] {
        assert!(msg.contains(&want), "{want:?} not in {msg}");
    }
}
