//! Test harness: runs the real `sdserve` binary on a free loopback port and talks raw HTTP/1.1
//! to it over `std::net::TcpStream` (no client library needed, and disconnects are explicit).

#![allow(dead_code)]

pub mod cluster;
pub mod exposition;
pub mod hires;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub struct Server {
    pub addr: SocketAddr,
    child: Child,
    logs: Arc<Mutex<Vec<String>>>,
}

pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// The JSON body of a 200, or a panic showing what came instead.
pub fn ok(r: &Resp) -> serde_json::Value {
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// Asserts the contract's error body and returns it.
    pub fn error(&self, status: u16, code: &str) -> serde_json::Value {
        assert_eq!(self.status, status, "body: {}", self.text());
        let j = self.json();
        let obj = j.as_object().expect("error body is an object");
        let mut keys: Vec<&str> = obj.keys().map(String::as_str).collect();
        keys.sort();
        if code == "validation_error" {
            // A 422 also lists every broken field, and `details` names the same ones in order.
            assert_eq!(keys, ["details", "error", "error_code", "fields"], "{j}");
            let listed: Vec<String> = j["fields"]
                .as_array()
                .expect("fields is a list")
                .iter()
                .map(|f| {
                    format!(
                        "{}: {}",
                        f["field"].as_str().unwrap(),
                        f["rule"].as_str().unwrap()
                    )
                })
                .collect();
            assert!(!listed.is_empty(), "{j}");
            assert_eq!(j["details"], listed.join("; "), "{j}");
        } else {
            assert_eq!(keys, ["details", "error", "error_code"], "{j}");
        }
        assert_eq!(j["error_code"], code, "{j}");
        assert!(j["error"].as_str().is_some_and(|s| !s.is_empty()), "{j}");
        assert!(j["details"].is_null() || j["details"].is_string(), "{j}");
        j
    }

    /// The broken fields of a 422, in order.
    pub fn broken_fields(&self) -> Vec<String> {
        self.error(422, "validation_error")["fields"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["field"].as_str().unwrap().to_string())
            .collect()
    }
}

/// Settings for the fake generator plus any extra environment.
pub fn fake(spec: &str) -> Vec<(String, String)> {
    vec![("SDSERVE_FAKE_GENERATOR".into(), spec.into())]
}

impl Server {
    /// Starts the binary with a clean environment plus `env`, and waits for its "listening" line.
    pub fn start(env: &[(String, String)]) -> Server {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_sdserve"));
        cmd.arg("serve")
            .env_clear()
            .env("HOST", "127.0.0.1")
            .env("PORT", "0")
            .env("LOG_FORMAT", "json")
            .env("LOG_LEVEL", "debug")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn sdserve");
        let stdout = child.stdout.take().unwrap();
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let sink = logs.clone();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.contains("listening") {
                    let j: serde_json::Value = serde_json::from_str(&line).expect("JSON log line");
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(j["addr"].as_str().unwrap().parse::<SocketAddr>().unwrap());
                    }
                }
                sink.lock().unwrap().push(line);
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("server did not start listening");
        Server { addr, child, logs }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().unwrap().clone()
    }

    /// Waits for a log line containing all of `needles`.
    pub fn wait_log(&self, needles: &[&str], within: Duration) -> String {
        let t = Instant::now();
        loop {
            if let Some(l) = self
                .logs()
                .into_iter()
                .find(|l| needles.iter().all(|n| l.contains(n)))
            {
                return l;
            }
            assert!(
                t.elapsed() < within,
                "no log line with {needles:?}; logs:\n{}",
                self.logs().join("\n")
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn request(&self, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Resp {
        request(self.addr, method, path, headers, body)
    }

    pub fn get(&self, path: &str) -> Resp {
        self.request("GET", path, &[], b"")
    }

    pub fn post_json(&self, body: &serde_json::Value) -> Resp {
        self.post_raw(body.to_string().as_bytes())
    }

    pub fn post_raw(&self, body: &[u8]) -> Resp {
        self.request(
            "POST",
            "/generate",
            &[("Content-Type", "application/json")],
            body,
        )
    }

    pub fn wait_ready(&self, within: Duration) {
        let t = Instant::now();
        while self.get("/health").status != 200 {
            assert!(
                t.elapsed() < within,
                "model not ready in {within:?}: {}",
                self.get("/health").text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// One sample of the Prometheus text, e.g. `sdserve_cache_hits_total`.
    pub fn metric(&self, series: &str) -> f64 {
        let text = self.get("/metrics").text();
        text.lines()
            .find_map(|l| {
                l.strip_prefix(series)
                    .and_then(|rest| rest.strip_prefix(' '))
            })
            .unwrap_or_else(|| panic!("no series {series} in\n{text}"))
            .trim()
            .parse()
            .unwrap()
    }

    pub fn terminate(&self) {
        let ok = Command::new("kill")
            .arg("-TERM")
            .arg(self.pid().to_string())
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -TERM failed");
    }

    pub fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let t = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(
                t.elapsed() < within,
                "server did not exit within {within:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // A failed test leaves the server's whole log behind, and shows its end.
        if std::thread::panicking() {
            let logs = self.logs();
            let path = std::env::temp_dir().join(format!(
                "sdserve-test-server-{}-{}.log",
                std::process::id(),
                self.child.id()
            ));
            let _ = std::fs::write(&path, logs.join("\n"));
            let tail = logs.len().saturating_sub(40);
            eprintln!(
                "--- server {} (pid {}): last {} log lines; all {} in {} ---\n{}",
                self.addr,
                self.child.id(),
                logs.len() - tail,
                logs.len(),
                path.display(),
                logs[tail..].join("\n")
            );
        }
    }
}

/// Sends a request without waiting for the answer (for disconnect tests).
/// The tiny fixture model the end-to-end server tests run (`tiny-b`, fast at 256x256).
pub fn tiny_b() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../pipeline/tests/fixtures/tiny-b")
}

/// A ready server on [`tiny_b`] with a 600 s deadline and a model cache folder of its own
/// (`tag` names it; the hub module memoises digests there), plus `extra` settings, e.g.
/// `RESPONSE_CACHE_MB=0` where every request must run rather than be another's cached answer.
pub fn tiny_server(tag: &str, extra: &[(&str, &str)]) -> Server {
    let cache = std::env::temp_dir().join(format!("sdserve-{tag}-cache-{}", std::process::id()));
    std::fs::create_dir_all(&cache).unwrap();
    let mut env = vec![
        (
            "MODEL_ID".to_string(),
            tiny_b().to_string_lossy().into_owned(),
        ),
        ("GENERATION_TIMEOUT_SECONDS".to_string(), "600".to_string()),
        (
            "MODEL_CACHE_DIR".to_string(),
            cache.to_string_lossy().into_owned(),
        ),
    ];
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let s = Server::start(&env);
    s.wait_ready(Duration::from_secs(120));
    s
}

/// A ready server on the pipeline's tiny-a-vae8 (the API's smallest image, 256x256, is 32x32
/// latents there) with these folders (`LORA_DIR`, `CONTROLNET_DIR`, ...), no response cache and
/// a 120 s generation timeout.
pub fn tiny_a_vae8_server(folders: &[(&str, &std::path::Path)]) -> Server {
    let model = tiny_b().with_file_name("tiny-a-vae8");
    let env: Vec<(String, String)> = [("MODEL_ID", model.as_path())]
        .into_iter()
        .chain(folders.iter().copied())
        .map(|(k, v)| (k.to_string(), v.to_string_lossy().into_owned()))
        .chain([
            ("RESPONSE_CACHE_MB".to_string(), "0".to_string()),
            ("GENERATION_TIMEOUT_SECONDS".to_string(), "120".to_string()),
        ])
        .collect();
    let s = Server::start(&env);
    s.wait_ready(Duration::from_secs(300));
    s
}

pub fn send_only(addr: SocketAddr, body: &serde_json::Value) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    let body = body.to_string();
    let head = format!(
        "POST /generate HTTP/1.1\r\nHost: test\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(body.as_bytes()).unwrap();
    s
}

/// POSTs `body` as JSON to `path` (from any thread: takes the address, not the server).
pub fn post_json_to(addr: SocketAddr, path: &str, body: &serde_json::Value) -> Resp {
    request(
        addr,
        "POST",
        path,
        &[("Content-Type", "application/json")],
        body.to_string().as_bytes(),
    )
}

/// An A1111 txt2img (20 steps, 256x256, seed `u64::from(skip)`: a seed of its own, as a cache
/// hit would run no job) on `addr`, while `/sdapi/v1/progress?skip_current_image={skip}` is
/// polled every `poll`: the last `current_image` the polls saw.
pub fn a1111_txt2img_polled(addr: SocketAddr, skip: bool, poll: Duration) -> Option<String> {
    let body = serde_json::json!({
        "prompt": "polled", "steps": 20, "width": 256, "height": 256, "seed": u64::from(skip)
    });
    let run = std::thread::spawn(move || post_json_to(addr, "/sdapi/v1/txt2img", &body));
    let path = format!("/sdapi/v1/progress?skip_current_image={skip}");
    let mut image = None;
    while !run.is_finished() {
        let progress = request(addr, "GET", &path, &[], b"").json();
        if let Some(png) = progress["current_image"].as_str() {
            image = Some(png.to_string());
        }
        std::thread::sleep(poll);
    }
    assert_eq!(run.join().unwrap().status, 200);
    image
}

pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Resp {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() || method == "POST" {
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    head.push_str("\r\n");
    // The server may answer (413) and close before reading a large body; ignore write errors.
    let _ = s.write_all(head.as_bytes()).and_then(|_| s.write_all(body));
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    parse_response(&raw)
}

fn parse_response(raw: &[u8]) -> Resp {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| {
            panic!(
                "no HTTP response head in {:?}",
                String::from_utf8_lossy(raw)
            )
        });
    let head = std::str::from_utf8(&raw[..split]).unwrap();
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    if headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"))
    {
        body = dechunk(&body);
    }
    Resp {
        status,
        headers,
        body,
    }
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = b.windows(2).position(|w| w == b"\r\n") {
        let size_str = std::str::from_utf8(&b[..eol]).unwrap();
        let size = usize::from_str_radix(size_str.split(';').next().unwrap().trim(), 16).unwrap();
        if size == 0 {
            break;
        }
        out.extend_from_slice(&b[eol + 2..eol + 2 + size]);
        b = &b[eol + 2 + size + 2..];
    }
    out
}

/// Submits `body` to `POST /jobs` (202 asserted) and polls the job until it has ended
/// (succeeded, failed or cancelled; a panic past 300 s): the job's last `GET /jobs/{id}`.
pub fn job_to_end(s: &Server, body: &serde_json::Value) -> serde_json::Value {
    let created = post_json_to(s.addr, "/jobs", body);
    assert_eq!(created.status, 202, "{}", created.text());
    let id = created.json()["id"].as_str().unwrap().to_string();
    let until = Instant::now() + Duration::from_secs(300);
    loop {
        let j = s.get(&format!("/jobs/{id}")).json();
        if ["succeeded", "failed", "cancelled"]
            .iter()
            .any(|e| j["status"] == *e)
        {
            return j;
        }
        assert!(Instant::now() < until, "the job did not end: {j}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Decodes a base64 PNG: (width, height, RGB pixels, `parameters` text).
pub fn decode_png(b64: &str) -> (u32, u32, Vec<u8>, Option<String>) {
    use base64::Engine as _;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .expect("base64");
    let mut dec = png::Decoder::new(std::io::Cursor::new(bytes))
        .read_info()
        .expect("PNG");
    let mut buf = vec![0; dec.output_buffer_size().unwrap()];
    let frame = dec.next_frame(&mut buf).expect("PNG frame");
    assert_eq!(frame.color_type, png::ColorType::Rgb);
    buf.truncate(frame.buffer_size());
    let text = dec
        .info()
        .uncompressed_latin1_text
        .iter()
        .find(|t| t.keyword == "parameters")
        .map(|t| t.text.clone());
    (frame.width, frame.height, buf, text)
}

/// Copies the folder `from` (a fixture) into `to`, subfolders included.
pub fn copy_tree(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let p = e.unwrap().path();
        let dst = to.join(p.file_name().unwrap());
        if p.is_dir() {
            copy_tree(&p, &dst);
        } else {
            std::fs::copy(&p, &dst).unwrap();
        }
    }
}
