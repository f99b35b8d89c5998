//! Hub downloads against a fake hub on loopback that speaks the hub's HTTP API (the revision
//! API, `resolve` with LFS redirects to a CDN path, Range), serving the tiny-a fixture model,
//! with injected faults. Also local single-file resolution into the cache, and local folders of
//! pickle `.bin` weights served by the binary.

use crate::common;
// The server's own hub client, compiled into this module (so `hub::hub`).
#[path = "../../src/hub/mod.rs"]
#[allow(dead_code, clippy::module_inception)]
mod hub;

#[path = "hub/downloads.rs"]
mod downloads;
#[path = "hub/faults.rs"]
mod faults;
#[path = "hub/local.rs"]
mod local;
#[path = "hub/pickle_models.rs"]
mod pickle_models;
#[path = "hub/server_retry.rs"]
mod server_retry;

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

    // GET /api/models/{org}/{name}/revision/{rev}, /api/spaces/... (a Space's: its id with
    // `spaces/` in front, as it resolves files)
    let api = path
        .strip_prefix("/api/models/")
        .map(str::to_string)
        .or_else(|| {
            path.strip_prefix("/api/spaces/")
                .map(|r| format!("spaces/{r}"))
        });
    if let Some(rest) = api.as_deref() {
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
