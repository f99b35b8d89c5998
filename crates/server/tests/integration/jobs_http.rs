//! Jobs over real HTTP against the real binary with the fake generator: every state change, the
//! event stream's order, cancellation (queued and running), deadlines, TTL, 404 and 429.

use crate::common;
#[path = "jobs_http/life_cycle.rs"]
mod life_cycle;
#[path = "jobs_http/limits.rs"]
mod limits;
#[path = "jobs_http/previews.rs"]
mod previews;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::{decode_png, fake, send_only, Server};
use serde_json::{json, Value};

fn ready(spec: &str, more: &[(&str, &str)]) -> Server {
    let mut env = fake(spec);
    env.extend(more.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let s = Server::start(&env);
    s.wait_ready(Duration::from_secs(10));
    s
}

fn submit(s: &Server, body: &Value) -> Value {
    let r = s.request(
        "POST",
        "/jobs",
        &[("Content-Type", "application/json")],
        body.to_string().as_bytes(),
    );
    assert_eq!(r.status, 202, "{}", r.text());
    let j = r.json();
    let id = j["id"].as_str().unwrap();
    assert_eq!(r.header("location"), Some(format!("/jobs/{id}").as_str()));
    assert_eq!(j["links"]["self"], format!("/jobs/{id}"));
    assert_eq!(j["links"]["events"], format!("/jobs/{id}/events"));
    j
}

fn job(s: &Server, id: &str) -> Value {
    let r = s.get(&format!("/jobs/{id}"));
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()
}

fn wait_status(s: &Server, id: &str, want: &[&str], within: Duration) -> Value {
    let t = Instant::now();
    loop {
        let j = job(s, id);
        if want.iter().any(|w| j["status"] == *w) {
            return j;
        }
        assert!(
            t.elapsed() < within,
            "still {} after {within:?}",
            j["status"]
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A live `GET /jobs/{id}/events` reader: dechunks as bytes arrive and yields (event, data).
struct Events {
    reader: BufReader<TcpStream>,
    pending: String,
    ended: bool,
}

impl Events {
    fn open(addr: SocketAddr, id: &str) -> Events {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        write!(
            s,
            "GET /jobs/{id}/events HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut reader = BufReader::new(s);
        let mut head = String::new();
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            if line == "\r\n" || line.is_empty() {
                break;
            }
            head.push_str(&line);
        }
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        let lower = head.to_ascii_lowercase();
        assert!(lower.contains("content-type: text/event-stream"), "{head}");
        assert!(lower.contains("transfer-encoding: chunked"), "{head}");
        Events {
            reader,
            pending: String::new(),
            ended: false,
        }
    }

    /// The next event, or `None` once the server ended the stream.
    fn next(&mut self) -> Option<(String, Value)> {
        loop {
            if let Some(end) = self.pending.find("\n\n") {
                let block: String = self.pending.drain(..end + 2).collect();
                let mut name = None;
                let mut data = String::new();
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event:") {
                        name = Some(v.trim().to_string());
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.trim_start());
                    }
                }
                match name {
                    Some(n) => return Some((n, serde_json::from_str(&data).unwrap())),
                    None => continue, // a keep-alive comment
                }
            }
            if self.ended {
                assert!(self.pending.trim().is_empty(), "{:?}", self.pending);
                return None;
            }
            let mut size = String::new();
            self.reader.read_line(&mut size).unwrap();
            let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
            if n == 0 {
                self.ended = true;
                continue;
            }
            let mut chunk = vec![0; n + 2];
            self.reader.read_exact(&mut chunk).unwrap();
            self.pending
                .push_str(std::str::from_utf8(&chunk[..n]).unwrap());
        }
    }

    fn all(mut self) -> Vec<(String, Value)> {
        let mut out = Vec::new();
        while let Some(e) = self.next() {
            out.push(e);
        }
        out
    }
}

fn names(events: &[(String, Value)]) -> Vec<&str> {
    events.iter().map(|(n, _)| n.as_str()).collect()
}

const FINAL: [&str; 3] = ["succeeded", "failed", "cancelled"];

/// Exactly one terminal event, and it is the last.
fn assert_one_terminal_last(events: &[(String, Value)], want: &str) {
    let n = names(events);
    let terminals: Vec<&&str> = n.iter().filter(|e| FINAL.contains(e)).collect();
    assert_eq!(terminals, [&want], "{n:?}");
    assert_eq!(n.last(), Some(&want), "{n:?}");
    assert_eq!(n.first(), Some(&"state"), "{n:?}");
}
