//! Hub downloads against a fake hub on loopback that speaks the hub's HTTP API (the revision
//! API, `resolve` with LFS redirects to a CDN path, Range), serving the tiny-a fixture model,
//! with injected faults. Also local single-file resolution into the cache.

mod common;
#[path = "../src/hub/mod.rs"]
#[allow(dead_code)]
mod hub;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hub::{HubError, HubOptions, ModelSource, Progress, Stage};
use sha2::{Digest, Sha256};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../pipeline/tests/fixtures")
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[derive(Clone, Debug)]
enum Fault {
    /// Send the headers and this many body bytes, then close the connection.
    DropAfter(usize),
    Status(u16),
    /// Flip this byte (index into the whole file).
    Corrupt(usize),
}

#[derive(Default)]
struct State {
    /// repo -> (commit, path -> bytes)
    repos: BTreeMap<String, (String, BTreeMap<String, Vec<u8>>)>,
    /// (path suffix, fault, times left)
    faults: Vec<(String, Fault, usize)>,
    /// "METHOD /path [range]" per request.
    log: Vec<String>,
}

struct FakeHub {
    url: String,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
}

impl Drop for FakeHub {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.url.trim_start_matches("http://"));
    }
}

impl FakeHub {
    fn start() -> Self {
        Self::start_on(TcpListener::bind("127.0.0.1:0").unwrap())
    }

    fn start_on(listener: TcpListener) -> Self {
        let url = format!("http://{}", listener.local_addr().unwrap());
        let state = Arc::new(Mutex::new(State::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (st, sp, base) = (state.clone(), stop.clone(), url.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if sp.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let (st, base) = (st.clone(), base.clone());
                std::thread::spawn(move || handle(conn, &st, &base));
            }
        });
        Self { url, state, stop }
    }

    /// Serves a diffusers folder as `repo` (plus `extra` files).
    fn add_repo(&self, repo: &str, dir: &Path, extra: &[(&str, &[u8])]) -> String {
        let mut files = BTreeMap::new();
        fn walk(root: &Path, dir: &Path, files: &mut BTreeMap<String, Vec<u8>>) {
            for e in std::fs::read_dir(dir).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    walk(root, &p, files);
                } else {
                    let rel = p
                        .strip_prefix(root)
                        .unwrap()
                        .to_string_lossy()
                        .replace('\\', "/");
                    files.insert(rel, std::fs::read(&p).unwrap());
                }
            }
        }
        walk(dir, dir, &mut files);
        for (p, b) in extra {
            files.insert(p.to_string(), b.to_vec());
        }
        let commit = hex(&Sha256::digest(repo.as_bytes()))[..40].to_string();
        self.state
            .lock()
            .unwrap()
            .repos
            .insert(repo.into(), (commit.clone(), files));
        commit
    }

    fn fault(&self, suffix: &str, f: Fault, times: usize) {
        self.state
            .lock()
            .unwrap()
            .faults
            .push((suffix.into(), f, times));
    }

    fn log(&self) -> Vec<String> {
        self.state.lock().unwrap().log.clone()
    }
}

fn is_lfs(path: &str) -> bool {
    path.ends_with(".safetensors") || path.ends_with(".bin") || path.ends_with(".ckpt")
}

fn respond(
    conn: &mut TcpStream,
    status: u16,
    headers: &[(String, String)],
    body: &[u8],
    head_only: bool,
) {
    let mut h = format!("HTTP/1.1 {status} X\r\nConnection: close\r\n");
    if !headers.iter().any(|(k, _)| k == "Content-Length") {
        h.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    for (k, v) in headers {
        h.push_str(&format!("{k}: {v}\r\n"));
    }
    h.push_str("\r\n");
    let _ = conn.write_all(h.as_bytes());
    if !head_only {
        let _ = conn.write_all(body);
    }
    let _ = conn.flush();
}

fn handle(mut conn: TcpStream, state: &Mutex<State>, base: &str) {
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut first = String::new();
    if reader.read_line(&mut first).is_err() || first.is_empty() {
        return;
    }
    let mut range: Option<u64> = None;
    let mut auth = false;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            if k.eq_ignore_ascii_case("authorization") {
                auth = v.trim() == "Bearer secret-token";
            }
            if k.eq_ignore_ascii_case("range") {
                range = v
                    .trim()
                    .strip_prefix("bytes=")
                    .and_then(|r| r.trim_end_matches('-').parse().ok());
            }
        }
    }
    let mut parts = first.split_whitespace();
    let (method, path) = (
        parts.next().unwrap_or("").to_string(),
        parts.next().unwrap_or("").to_string(),
    );
    let head = method == "HEAD";
    let mut st = state.lock().unwrap();
    st.log.push(format!(
        "{method} {path}{}{}",
        if auth { " auth" } else { "" },
        range.map(|r| format!(" range={r}")).unwrap_or_default()
    ));

    // GET /api/models/{org}/{name}/revision/{rev}
    if let Some(rest) = path.strip_prefix("/api/models/") {
        let (repo, _rev) = rest.split_once("/revision/").unwrap_or((rest, "main"));
        let body = match st.repos.get(repo) {
            Some((commit, files)) => serde_json::json!({
                "id": repo, "sha": commit,
                "siblings": files.keys().map(|f| serde_json::json!({"rfilename": f})).collect::<Vec<_>>(),
            })
            .to_string(),
            None => return respond(&mut conn, 404, &[], br#"{"error":"Repository not found"}"#, head),
        };
        return respond(&mut conn, 200, &[], body.as_bytes(), head);
    }
    // /{org}/{name}/resolve/{rev}/{path}
    if let Some((repo, rest)) = path.trim_start_matches('/').split_once("/resolve/") {
        let (_rev, file) = rest.split_once('/').unwrap_or((rest, ""));
        let Some((commit, files)) = st.repos.get(repo) else {
            return respond(&mut conn, 404, &[], b"", head);
        };
        let Some(bytes) = files.get(file) else {
            return respond(
                &mut conn,
                404,
                &[("X-Error-Code".into(), "EntryNotFound".into())],
                b"",
                head,
            );
        };
        let sha = hex(&Sha256::digest(bytes));
        let mut hs = vec![("X-Repo-Commit".to_string(), commit.clone())];
        if is_lfs(file) {
            hs.push(("X-Linked-Etag".into(), format!("\"{sha}\"")));
            hs.push(("X-Linked-Size".into(), bytes.len().to_string()));
            hs.push(("ETag".into(), "\"git-pointer-etag\"".into()));
            hs.push(("Location".into(), format!("{base}/cdn/{repo}/{file}")));
            return respond(&mut conn, 302, &hs, b"", head);
        }
        hs.push(("ETag".into(), format!("\"{}\"", &sha[..40])));
        let body = bytes.clone();
        drop(st);
        return respond(&mut conn, 200, &hs, &body, head);
    }
    // /cdn/{repo}/{file}: the LFS content, with Range and faults.
    if let Some(rest) = path.strip_prefix("/cdn/") {
        let found = st.repos.iter().find_map(|(repo, (_, files))| {
            rest.strip_prefix(&format!("{repo}/"))
                .and_then(|f| files.get(f).map(|b| (f.to_string(), b.clone())))
        });
        let Some((file, mut bytes)) = found else {
            return respond(&mut conn, 404, &[], b"", head);
        };
        let fault = st
            .faults
            .iter_mut()
            .find(|(s, _, n)| *n > 0 && file.ends_with(s.as_str()))
            .map(|f| {
                f.2 -= 1;
                f.1.clone()
            });
        drop(st);
        match fault {
            Some(Fault::Status(s)) => return respond(&mut conn, s, &[], b"", head),
            Some(Fault::Corrupt(i)) => bytes[i] ^= 0xFF,
            _ => {}
        }
        let start = range.unwrap_or(0) as usize;
        let body = &bytes[start.min(bytes.len())..];
        let mut hs = vec![("Content-Length".to_string(), body.len().to_string())];
        let status = if range.is_some() {
            hs.push((
                "Content-Range".into(),
                format!("bytes {start}-{}/{}", bytes.len() - 1, bytes.len()),
            ));
            206
        } else {
            200
        };
        if let Some(Fault::DropAfter(n)) = fault {
            respond(&mut conn, status, &hs, &body[..n.min(body.len())], head);
            let _ = conn.shutdown(std::net::Shutdown::Both);
            return;
        }
        return respond(&mut conn, status, &hs, body, head);
    }
    respond(&mut conn, 404, &[], b"", head);
}

/// A scratch cache directory, removed on drop.
struct Scratch(PathBuf);
impl Scratch {
    fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("sdserve-hub-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }
}
impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn opts(hub: &FakeHub, cache: &Path) -> HubOptions {
    let mut o = HubOptions::from_env(Some(cache.to_path_buf()), false);
    o.endpoint = hub.url.clone();
    o.token = Some("secret-token".into());
    o.offline = false;
    o.backoff = Duration::from_millis(5);
    o.retries = 4;
    o.timeout = Duration::from_secs(10);
    o
}

fn quiet(_: &Progress) {}

const UNET: &str = "unet/diffusion_pytorch_model.safetensors";
const VAE: &str = "vae/diffusion_pytorch_model.safetensors";
const TEXT: &str = "text_encoder/model.safetensors";

/// The snapshot holds exactly the tiny-a files, byte for byte.
fn assert_snapshot_is_tiny_a(dir: &Path) {
    let tiny = fixtures().join("tiny-a");
    for rel in [
        UNET,
        VAE,
        TEXT,
        "unet/config.json",
        "tokenizer/vocab.json",
        "model_index.json",
        "scheduler/scheduler_config.json",
    ] {
        assert!(
            std::fs::read(dir.join(rel)).unwrap() == std::fs::read(tiny.join(rel)).unwrap(),
            "{rel} differs"
        );
    }
}

fn no_incomplete(cache: &Path) {
    fn walk(d: &Path) {
        for e in std::fs::read_dir(d).unwrap() {
            let p = e.unwrap().path();
            assert!(
                !p.to_string_lossy().contains(".incomplete"),
                "left behind: {}",
                p.display()
            );
            if p.is_dir() && !p.is_symlink() {
                walk(&p);
            }
        }
    }
    walk(cache);
}

#[test]
fn downloads_only_what_is_needed_into_the_hf_cache_layout() {
    let hub = FakeHub::start();
    let extra: &[(&str, &[u8])] = &[
        ("safety_checker/model.safetensors", b"not needed"),
        ("safety_checker/config.json", b"{}"),
        ("feature_extractor/preprocessor_config.json", b"{}"),
        ("unet/diffusion_pytorch_model.bin", b"pickle"),
        (
            "unet/diffusion_pytorch_model.fp16.safetensors",
            b"half weights",
        ),
        ("v1-5-pruned-emaonly.ckpt", b"pickle"),
        ("README.md", b"hi"),
    ];
    let commit = hub.add_repo("test/tiny-a", &fixtures().join("tiny-a"), extra);
    let cache = Scratch::new("layout");
    let seen = Mutex::new(Vec::new());
    let record = |p: &Progress| seen.lock().unwrap().push(p.clone());
    let m = hub::resolve_model("test/tiny-a", &opts(&hub, &cache.0), &record).unwrap();

    let repo_dir = cache.0.join("models--test--tiny-a");
    assert_eq!(m.dir, repo_dir.join("snapshots").join(&commit));
    assert_eq!(m.model_version, format!("test/tiny-a@{commit}"));
    assert_eq!(
        m.source,
        ModelSource::Hub {
            repo: "test/tiny-a".into(),
            commit: commit.clone()
        }
    );
    assert_eq!(
        std::fs::read_to_string(repo_dir.join("refs/main")).unwrap(),
        commit
    );
    assert_snapshot_is_tiny_a(&m.dir);
    // LFS files are stored under their sha256 and linked relatively from the snapshot.
    let unet = std::fs::read(fixtures().join("tiny-a").join(UNET)).unwrap();
    let sha = hex(&Sha256::digest(&unet));
    assert!(repo_dir.join("blobs").join(&sha).is_file());
    let link = std::fs::read_link(m.dir.join(UNET)).unwrap();
    assert_eq!(link, Path::new("../../../blobs").join(&sha));
    no_incomplete(&cache.0);

    // The token goes with every request (the CDN here shares the hub's host).
    assert!(
        hub.log().iter().all(|l| l.contains(" auth")),
        "{:#?}",
        hub.log()
    );
    let log = hub.log().join("\n");
    for unwanted in [
        "safety_checker",
        "feature_extractor",
        ".bin",
        ".ckpt",
        "README",
        "fp16",
    ] {
        assert!(!log.contains(unwanted), "fetched {unwanted}:\n{log}");
    }
    // Progress: a known total, ending complete.
    let seen = seen.lock().unwrap();
    let last_dl = seen
        .iter()
        .rev()
        .find(|p| p.stage == Stage::Downloading)
        .unwrap();
    assert_eq!(Some(last_dl.bytes_done), last_dl.bytes_total);
    assert_eq!(last_dl.files_done, last_dl.files_total);
    assert_eq!(seen.last().unwrap().stage, Stage::Done);

    // A second resolve finds everything linked: only the revision API is asked.
    let before = hub.log().len();
    let again = hub::resolve_model("test/tiny-a", &opts(&hub, &cache.0), &quiet).unwrap();
    assert_eq!(again.dir, m.dir);
    let after = hub.log();
    assert_eq!(after.len() - before, 1, "{:?}", &after[before..]);
    assert!(after[before].starts_with("GET /api/models/test/tiny-a/revision/main"));
}

#[test]
fn half_precision_fetches_the_fp16_variant() {
    let hub = FakeHub::start();
    hub.add_repo(
        "test/tiny-fp16",
        &fixtures().join("tiny-a"),
        &[("unet/diffusion_pytorch_model.fp16.safetensors", b"half")],
    );
    let cache = Scratch::new("fp16");
    let mut o = opts(&hub, &cache.0);
    o.fp16 = true;
    let m = hub::resolve_model("test/tiny-fp16", &o, &quiet).unwrap();
    assert_eq!(
        std::fs::read(m.dir.join("unet/diffusion_pytorch_model.fp16.safetensors")).unwrap(),
        b"half"
    );
    assert!(!m.dir.join(UNET).exists(), "the fp32 UNet was fetched too");
    // Components without a variant fall back to their plain weights.
    assert!(m.dir.join(VAE).is_file());
}

/// A one-model repo (the TAESD preview decoder's shape): its config and the weights of the
/// chosen precision, nothing else; a pipeline repo is refused under this layout.
#[test]
fn a_component_repo_fetches_its_config_and_weights() {
    let hub = FakeHub::start();
    let taesd = fixtures().join("taesd/taesd-a");
    hub.add_repo("test/taesd", &taesd, &[("taesd_decoder.pth", b"pickle")]);
    hub.add_repo("test/tiny-a", &fixtures().join("tiny-a"), &[]);
    let cache = Scratch::new("component");
    let mut o = opts(&hub, &cache.0);
    o.layout = hub::Layout::Component;
    let m = hub::resolve_model("test/taesd", &o, &quiet).unwrap();
    for f in ["config.json", "diffusion_pytorch_model.safetensors"] {
        assert!(
            std::fs::read(m.dir.join(f)).unwrap() == std::fs::read(taesd.join(f)).unwrap(),
            "{f} differs"
        );
    }
    assert!(!m
        .dir
        .join("diffusion_pytorch_model.fp16.safetensors")
        .exists());
    assert!(!m.dir.join("taesd_decoder.pth").exists());
    o.fp16 = true;
    let h = hub::resolve_model("test/taesd", &o, &quiet).unwrap();
    assert!(h
        .dir
        .join("diffusion_pytorch_model.fp16.safetensors")
        .is_file());

    let err = hub::resolve_model("test/tiny-a", &o, &quiet)
        .unwrap_err()
        .to_string();
    assert!(err.contains("config.json"), "{err}");
    // A local folder is checked for the same shape.
    let err = hub::resolve_model(fixtures().join("tiny-a").to_str().unwrap(), &o, &quiet)
        .unwrap_err()
        .to_string();
    assert!(err.contains("no config.json"), "{err}");
    let local = hub::resolve_model(taesd.to_str().unwrap(), &o, &quiet).unwrap();
    assert_eq!(local.dir, taesd);

    // `sdserve download --taesd` fetches it ahead (for offline serving); without the flag the
    // repo is refused as a pipeline.
    let cli_cache = Scratch::new("component-cli");
    let download = |extra: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_sdserve"))
            .arg("download")
            .args(extra)
            .arg("test/taesd")
            .env_clear()
            .env("HF_ENDPOINT", &hub.url)
            .env("MODEL_CACHE_DIR", &cli_cache.0)
            .output()
            .unwrap()
    };
    let out = download(&["--taesd"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (version, dir) = stdout.trim().split_once('\t').unwrap();
    assert!(version.starts_with("test/taesd@"), "{stdout}");
    assert!(Path::new(dir)
        .join("diffusion_pytorch_model.safetensors")
        .is_file());
    let out = download(&[]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("model_index.json"));
}

#[test]
fn a_dropped_connection_is_resumed_with_range() {
    let hub = FakeHub::start();
    hub.add_repo("test/drop", &fixtures().join("tiny-a"), &[]);
    hub.fault(UNET, Fault::DropAfter(100_000), 1);
    let cache = Scratch::new("drop");
    let m = hub::resolve_model("test/drop", &opts(&hub, &cache.0), &quiet).unwrap();
    assert_snapshot_is_tiny_a(&m.dir);
    let log = hub.log();
    assert!(
        log.iter()
            .any(|l| l.starts_with("GET /cdn/test/drop/unet/") && l.ends_with("range=100000")),
        "{log:#?}"
    );
    no_incomplete(&cache.0);
}

#[test]
fn a_503_is_retried() {
    let hub = FakeHub::start();
    hub.add_repo("test/busy", &fixtures().join("tiny-a"), &[]);
    hub.fault(VAE, Fault::Status(503), 2);
    let cache = Scratch::new("busy");
    let m = hub::resolve_model("test/busy", &opts(&hub, &cache.0), &quiet).unwrap();
    assert_snapshot_is_tiny_a(&m.dir);
    let vae_gets = hub
        .log()
        .iter()
        .filter(|l| l.starts_with("GET /cdn/test/busy/vae/"))
        .count();
    assert_eq!(vae_gets, 3);
}

#[test]
fn a_corrupted_byte_is_detected_and_fetched_again() {
    let hub = FakeHub::start();
    hub.add_repo("test/corrupt", &fixtures().join("tiny-a"), &[]);
    hub.fault(TEXT, Fault::Corrupt(500), 1);
    let cache = Scratch::new("corrupt");
    let m = hub::resolve_model("test/corrupt", &opts(&hub, &cache.0), &quiet).unwrap();
    assert_snapshot_is_tiny_a(&m.dir);
    let gets: Vec<_> = hub
        .log()
        .into_iter()
        .filter(|l| l.starts_with("GET /cdn/test/corrupt/text_encoder/"))
        .collect();
    assert_eq!(gets.len(), 2, "{gets:?}");
    assert!(
        gets.iter().all(|l| !l.contains("range")),
        "a corrupt file is fetched whole again: {gets:?}"
    );
}

#[test]
fn a_persistently_corrupt_file_fails_with_an_integrity_error() {
    let hub = FakeHub::start();
    hub.add_repo("test/bad", &fixtures().join("tiny-a"), &[]);
    hub.fault(TEXT, Fault::Corrupt(7), 100);
    let cache = Scratch::new("bad");
    let e = hub::resolve_model("test/bad", &opts(&hub, &cache.0), &quiet).unwrap_err();
    assert!(matches!(e, HubError::Integrity { .. }), "{e}");
    assert!(e.to_string().contains(TEXT), "{e}");
    assert!(!cache
        .0
        .join("models--test--bad/snapshots")
        .read_dir()
        .unwrap()
        .flatten()
        .any(|d| d.path().join(TEXT).exists()));
    no_incomplete(&cache.0);
}

#[test]
fn an_unknown_repo_is_a_clear_404() {
    let hub = FakeHub::start();
    let cache = Scratch::new("404");
    let e = hub::resolve_model("test/does-not-exist", &opts(&hub, &cache.0), &quiet).unwrap_err();
    assert!(matches!(e, HubError::NotFound { .. }), "{e:?}");
    let msg = e.to_string();
    assert!(
        msg.contains("test/does-not-exist") && msg.contains("not found"),
        "{msg}"
    );
}

#[test]
fn an_unreachable_hub_with_a_warm_cache_serves_from_cache() {
    let cache = Scratch::new("warm");
    let (first, url) = {
        let hub = FakeHub::start();
        hub.add_repo("test/warm", &fixtures().join("tiny-a"), &[]);
        let m = hub::resolve_model("test/warm", &opts(&hub, &cache.0), &quiet).unwrap();
        (m, hub.url.clone())
    }; // the fake hub is gone: its port refuses connections
    let mut o = HubOptions::from_env(Some(cache.0.clone()), false);
    o.endpoint = url;
    o.offline = false;
    o.backoff = Duration::from_millis(5);
    let m = hub::resolve_model("test/warm", &o, &quiet).unwrap();
    assert_eq!(m.dir, first.dir);
    assert_eq!(m.model_version, first.model_version);
    assert_snapshot_is_tiny_a(&m.dir);

    // Offline mode with the warm cache: no request at all.
    o.endpoint = "http://127.0.0.1:9".into();
    o.offline = true;
    assert_eq!(
        hub::resolve_model("test/warm", &o, &quiet).unwrap().dir,
        first.dir
    );
}

#[test]
fn offline_with_a_cold_cache_is_a_clear_error() {
    let cache = Scratch::new("cold");
    let mut o = HubOptions::from_env(Some(cache.0.clone()), false);
    o.offline = true;
    let e = hub::resolve_model("test/never-downloaded", &o, &quiet).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, HubError::Offline(_)), "{msg}");
    assert!(
        msg.contains("HF_HUB_OFFLINE")
            && msg.contains("test/never-downloaded")
            && msg.contains("not in the cache"),
        "{msg}"
    );
}

#[test]
fn an_unreachable_hub_with_a_cold_cache_says_so() {
    let cache = Scratch::new("unreach");
    let mut o = HubOptions::from_env(Some(cache.0.clone()), false);
    o.endpoint = "http://127.0.0.1:9".into();
    o.offline = false;
    o.retries = 1;
    o.backoff = Duration::from_millis(5);
    let e = hub::resolve_model("test/x", &o, &quiet).unwrap_err();
    assert!(matches!(e, HubError::Unreachable { .. }), "{e}");
}

#[test]
fn two_processes_sharing_a_cache_do_not_corrupt_it() {
    let hub = FakeHub::start();
    hub.add_repo("test/shared", &fixtures().join("tiny-a"), &[]);
    // Slow the big file down a little so the two downloads overlap.
    hub.fault(UNET, Fault::Status(503), 2);
    let cache = Scratch::new("shared");
    let o = opts(&hub, &cache.0);
    let results: Vec<_> = std::thread::scope(|s| {
        let a = s.spawn(|| hub::resolve_model("test/shared", &o, &quiet));
        let b = s.spawn(|| hub::resolve_model("test/shared", &o, &quiet));
        vec![a.join().unwrap(), b.join().unwrap()]
    });
    for r in results {
        assert_snapshot_is_tiny_a(&r.unwrap().dir);
    }
    no_incomplete(&cache.0);
}

#[test]
fn a_partial_file_from_a_crashed_run_is_resumed() {
    let hub = FakeHub::start();
    hub.add_repo("test/crashed", &fixtures().join("tiny-a"), &[]);
    let cache = Scratch::new("crashed");
    let unet = std::fs::read(fixtures().join("tiny-a").join(UNET)).unwrap();
    let sha = hex(&Sha256::digest(&unet));
    let blobs = cache.0.join("models--test--crashed/blobs");
    std::fs::create_dir_all(&blobs).unwrap();
    std::fs::write(blobs.join(format!("{sha}.incomplete")), &unet[..4096]).unwrap();
    let m = hub::resolve_model("test/crashed", &opts(&hub, &cache.0), &quiet).unwrap();
    assert_snapshot_is_tiny_a(&m.dir);
    assert!(hub
        .log()
        .iter()
        .any(|l| l.starts_with("GET /cdn/test/crashed/unet/") && l.ends_with("range=4096")));
}

#[test]
fn the_retired_runwayml_id_maps_to_the_maintained_copy() {
    let hub = FakeHub::start();
    let commit = hub.add_repo(hub::DEFAULT_MODEL, &fixtures().join("tiny-a"), &[]);
    let cache = Scratch::new("alias");
    let m = hub::resolve_model(
        "runwayml/stable-diffusion-v1-5",
        &opts(&hub, &cache.0),
        &quiet,
    )
    .unwrap();
    assert_eq!(m.model_version, format!("{}@{commit}", hub::DEFAULT_MODEL));
    assert!(!hub.log().join("\n").contains("runwayml"));
}

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

#[test]
fn the_server_tries_again_in_the_background_until_the_hub_comes_back() {
    // A port with nothing behind it yet: the hub is "down".
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let cache = Scratch::new("comeback");
    let env: Vec<(String, String)> = [
        ("MODEL_ID", "test/comeback"),
        ("HF_ENDPOINT", &format!("http://127.0.0.1:{port}")),
        ("MODEL_CACHE_DIR", &cache.0.to_string_lossy()),
        ("MODEL_RETRY_SECONDS", "1"),
        ("DEVICE", "cpu"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let server = common::Server::start(&env);
    // Two failed tries, the waits growing: 1 s, then 2 s.
    server.wait_log(
        &[
            "trying again in the background",
            "\"attempts\":2",
            "\"next_try_seconds\":2.0",
        ],
        Duration::from_secs(30),
    );
    server.wait_log(&["\"next_try_seconds\":1.0"], Duration::ZERO);
    let health = server.get("/health");
    assert_eq!(health.status, 503);
    let h = health.json();
    assert_eq!(h["status"], "unavailable", "{h}");
    let detail = h["detail"].as_str().unwrap();
    for want in [
        "cannot reach the hub for test/comeback",
        "next try in",
        "--model DIR",
        "sdserve download test/comeback",
        "HF_ENDPOINT",
        "HF_HUB_OFFLINE=1",
        "no local folder or file test/comeback",
    ] {
        assert!(detail.contains(want), "{want:?} not in {detail}");
    }
    let e = server
        .post_json(&serde_json::json!({"prompt": "x"}))
        .error(503, "model_unavailable");
    assert!(
        e["details"].as_str().unwrap().contains("next try in"),
        "{e}"
    );

    // The hub comes back on the same address; the next background try gets the model.
    let hub = FakeHub::start_on(TcpListener::bind(("127.0.0.1", port)).unwrap());
    let commit = hub.add_repo("test/comeback", &fixtures().join("tiny-a"), &[]);
    server.wait_ready(Duration::from_secs(60));
    let h = server.get("/health").json();
    assert_eq!(h["status"], "ok");
    assert_eq!(h["model_version"], format!("test/comeback@{commit}"));
    assert_snapshot_is_tiny_a(
        &cache
            .0
            .join(format!("models--test--comeback/snapshots/{commit}")),
    );
}

#[test]
fn errors_that_will_not_pass_are_not_tried_again() {
    let hub = FakeHub::start();
    let cache = Scratch::new("final");
    let policy = hub::RetryPolicy {
        first: Duration::from_millis(1),
        max: Duration::from_millis(1),
    };
    let waits = Mutex::new(0);
    let e = hub::resolve_model_patiently(
        "test/never-published",
        &opts(&hub, &cache.0),
        &quiet,
        policy,
        &|w| *waits.lock().unwrap() += usize::from(w.is_some()),
    )
    .unwrap_err();
    assert!(matches!(e, HubError::NotFound { .. }), "{e}");
    assert_eq!(*waits.lock().unwrap(), 0);
    // A 404 for an id that is also a (missing) local path says both.
    assert!(
        e.to_string()
            .contains("no local folder or file test/never-published"),
        "{e}"
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
