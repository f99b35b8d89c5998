//! A real `redis-server` per test (QUEUE_URL) and the job helpers the cluster tests share:
//! submit, read, wait for the end, follow the events, list the workers.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::{Resp, Server};

/// A redis-server of our own, with an append-only file fsynced at every write, so a restart
/// keeps every accepted job.
pub struct Redis {
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl Redis {
    /// `None` (after a loud message) when redis-server is not installed.
    pub fn start(name: &str) -> Option<Redis> {
        if Command::new("redis-server")
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .is_err()
        {
            assert!(
                std::env::var("SDSERVE_REQUIRE_REDIS").is_err(),
                "SDSERVE_REQUIRE_REDIS is set but redis-server is not installed"
            );
            eprintln!(
                "\n!!!!! SKIPPED {name}: redis-server is not installed (apt-get install redis-server) !!!!!\n"
            );
            return None;
        }
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = std::env::temp_dir().join(format!("sdserve-redis-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut r = Redis {
            port,
            dir,
            child: None,
        };
        r.up();
        Some(r)
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    pub fn up(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--dir", self.dir.to_str().unwrap()])
            .args([
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
            ])
            .stdout(Stdio::null())
            .spawn()
            .expect("start redis-server");
        self.child = Some(child);
        let t = Instant::now();
        while !self.ping() {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "redis-server did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn ping(&self) -> bool {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
        let mut buf = [0u8; 7];
        s.write_all(b"PING\r\n").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
    }

    /// Runs one command with `redis-cli` against this server: its reply as text.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .expect("run redis-cli (it comes with redis-server)");
        assert!(out.status.success(), "redis-cli {args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// SIGTERM (Redis writes its file and exits), then waits for the exit.
    pub fn down(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill").arg(c.id().to_string()).status();
            let _ = c.wait();
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
/// A replica on the fake generator (`fake`: its spec) sharing `redis`, as `role`: 2 s leases,
/// room for 100 waiting jobs, plus `extra` settings.
pub fn start_replica(redis: &Redis, role: &str, fake: &str, extra: &[(&str, &str)]) -> Server {
    let mut env = super::fake(fake);
    for (k, v) in [
        ("QUEUE_URL", redis.url().as_str()),
        ("ROLE", role),
        ("JOB_LEASE_SECONDS", "2"),
        ("MAX_QUEUED_JOBS", "100"),
    ]
    .into_iter()
    .chain(extra.iter().copied())
    {
        env.push((k.to_string(), v.to_string()));
    }
    Server::start(&env)
}

pub fn submit(s: &Server, body: &Value) -> Resp {
    s.request(
        "POST",
        "/jobs",
        &[("Content-Type", "application/json")],
        body.to_string().as_bytes(),
    )
}

pub fn submit_ok(s: &Server, body: &Value) -> String {
    let r = submit(s, body);
    assert_eq!(r.status, 202, "{}", r.text());
    r.json()["id"].as_str().unwrap().to_string()
}

pub fn job(s: &Server, id: &str) -> Value {
    let r = s.get(&format!("/jobs/{id}"));
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()
}

/// Waits for the job to end. It fails when the job stalls: neither its status, its attempt
/// nor its step changed for `stall` (a slow machine makes steps slow, not a job stuck).
pub fn wait_end(s: &Server, id: &str, stall: Duration) -> Value {
    const AT_MOST: Duration = Duration::from_secs(900);
    let t = Instant::now();
    let mut seen = Value::Null;
    let mut changed = Instant::now();
    loop {
        let j = job(s, id);
        if ["succeeded", "failed", "cancelled"]
            .iter()
            .any(|w| j["status"] == *w)
        {
            return j;
        }
        let now = json!([j["status"], j["started_at"], j["progress"]["step"]]);
        if now != seen {
            seen = now;
            changed = Instant::now();
        }
        assert!(
            changed.elapsed() < stall && t.elapsed() < AT_MOST,
            "job {id} stalled: no change for {:?} ({:?} in all): {j}",
            changed.elapsed(),
            t.elapsed()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Workers that /health lists as ready, with their jobs done.
pub fn workers(s: &Server) -> Vec<Value> {
    s.get("/health").json()["workers"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

pub fn wait_workers(s: &Server, n: usize) {
    let t = Instant::now();
    loop {
        let ready = workers(s).iter().filter(|w| w["state"] == "ready").count();
        if ready >= n && s.get("/health").status == 200 {
            return;
        }
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "{n} workers not ready: {}",
            s.get("/health").text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Reads a job's Server-Sent Events until the stream ends or the connection breaks: the
/// event names in order (the connection breaking ends the list).
pub fn follow(addr: SocketAddr, id: &str) -> Vec<(String, Value)> {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    write!(
        s,
        "GET /jobs/{id}/events HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    let mut reader = BufReader::new(s);
    let mut line = String::new();
    while reader.read_line(&mut line).is_ok_and(|n| n > 0) {
        raw.push_str(&line);
        line.clear();
    }
    let mut out = Vec::new();
    let mut name = None;
    for l in raw.lines() {
        if let Some(v) = l.strip_prefix("event:") {
            name = Some(v.trim().to_string());
        } else if let Some(v) = l.strip_prefix("data:") {
            if let (Some(n), Ok(d)) = (name.take(), serde_json::from_str(v.trim())) {
                out.push((n, d));
            }
        }
    }
    out
}
