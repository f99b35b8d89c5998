//! Keys, rate limits, CORS and connection limits over real HTTP against the real binary (fake
//! generator). The routes checked are read from the server's own OpenAPI document, so a route
//! added later is covered without editing this file.

use crate::common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::{fake, Server};
use sha2::{Digest, Sha256};

const PLAIN: &str = "plain-key-0123456789";
const HASHED: &str = "hashed-key-abcdefghij";
const WRONG: &str = "plain-key-0123456788";

fn env(more: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut e = fake("step_ms=0");
    e.extend(more.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    e
}

fn sha_hex(s: &str) -> String {
    Sha256::digest(s.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn keys_file(tag: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("sdserve-sec-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join("keys");
    std::fs::write(&f, format!("# test keys\nsha256:{}\n", sha_hex(HASHED))).unwrap();
    f
}

fn bearer(k: &str) -> String {
    format!("Bearer {k}")
}

/// (method, path) of every documented route, path parameters filled with a dummy value, plus
/// the undocumented ones and an unknown path.
fn every_route(s: &Server) -> Vec<(String, String)> {
    let auth = bearer(PLAIN);
    let doc = s
        .request("GET", "/openapi.json", &[("Authorization", &auth)], b"")
        .json();
    let mut out = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        let concrete: String = path
            .split('/')
            .map(|seg| if seg.starts_with('{') { "x" } else { seg })
            .collect::<Vec<_>>()
            .join("/");
        for method in item.as_object().unwrap().keys() {
            if ["get", "post", "put", "delete", "patch"].contains(&method.as_str()) {
                out.push((method.to_uppercase(), concrete.clone()));
            }
        }
    }
    assert!(out.len() >= 3, "{out:?}");
    assert!(out.iter().any(|(_, p)| p.starts_with("/v1/")), "{out:?}");
    assert!(
        out.iter().any(|(_, p)| p.starts_with("/sdapi/v1/")),
        "{out:?}"
    );
    for extra in [
        "/openapi.json",
        "/docs",
        "/no-such-route",
        "/v1/no-such-route",
    ] {
        out.push(("GET".into(), extra.into()));
    }
    out.push(("DELETE".into(), "/health".into()));
    out
}

fn send(s: &Server, method: &str, path: &str, headers: &[(&str, &str)]) -> common::Resp {
    let mut h = headers.to_vec();
    let body: &[u8] = if method == "POST" { b"{}" } else { b"" };
    if method == "POST" {
        h.push(("Content-Type", "application/json"));
    }
    s.request(method, path, &h, body)
}

#[test]
fn every_route_needs_a_key_but_health() {
    let file = keys_file("routes");
    let s = Server::start(&env(&[
        ("API_KEYS", &format!("{PLAIN},other-key")),
        ("API_KEYS_FILE", file.to_str().unwrap()),
    ]));
    s.wait_ready(Duration::from_secs(10));
    let routes = every_route(&s);
    let wrong = bearer(WRONG);
    let right = bearer(PLAIN);
    for (m, p) in &routes {
        let open = m == "GET" && p == "/health";
        for headers in [
            vec![],
            vec![("Authorization", wrong.as_str())],
            vec![("X-Api-Key", WRONG)],
            vec![("Authorization", "Basic dXNlcjpwYXNz")],
            vec![("Authorization", "Bearer")],
            vec![("X-Api-Key", "")],
        ] {
            let r = send(&s, m, p, &headers);
            if open {
                assert_eq!(r.status, 200, "{m} {p} {headers:?}: {}", r.text());
                continue;
            }
            if p.starts_with("/v1/") {
                // OpenAI's shape on /v1.
                assert_eq!(r.status, 401, "{m} {p}: {}", r.text());
                let j = r.json();
                assert_eq!(j["error"]["code"], "unauthorized", "{m} {p}: {j}");
                assert_eq!(j["error"]["type"], "authentication_error", "{m} {p}: {j}");
            } else {
                r.error(401, "unauthorized");
            }
            assert!(
                r.header("www-authenticate")
                    .is_some_and(|v| v.starts_with("Bearer")),
                "{m} {p}: {:?}",
                r.headers
            );
        }
        for headers in [
            vec![("Authorization", right.as_str())],
            vec![("authorization", "bearer other-key")],
            vec![("X-Api-Key", PLAIN)],
            vec![("X-Api-Key", HASHED)],
            vec![("Authorization", "Bearer hashed-key-abcdefghij")],
        ] {
            let r = send(&s, m, p, &headers);
            assert_ne!(r.status, 401, "{m} {p} {headers:?}: {}", r.text());
            assert!(r.status < 500, "{m} {p} {headers:?}: {}", r.text());
        }
    }
    // A valid key does the work: a real generation.
    let r = s.request(
        "POST",
        "/generate",
        &[("X-Api-Key", HASHED), ("Content-Type", "application/json")],
        br#"{"prompt":"x","steps":1,"width":256,"height":256}"#,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    // The log names keys by id, never by value; rejections are counted by reason.
    let logs = s.logs().join("\n");
    for secret in [PLAIN, HASHED, WRONG, "other-key"] {
        assert!(!logs.contains(secret), "{secret} appears in the log");
    }
    let id = &sha_hex(HASHED)[..8];
    assert!(
        s.logs().iter().any(|l| l.contains("\"request\"")
            && l.contains(&format!("\"key_id\":\"{id}\""))
            && l.contains("/generate")),
        "no request line with key_id {id}"
    );
    let text = s
        .request("GET", "/metrics", &[("X-Api-Key", PLAIN)], b"")
        .text();
    let n: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("sdserve_rejections_total{reason=\"unauthorized\"} "))
        .unwrap_or_else(|| panic!("{text}"))
        .parse()
        .unwrap();
    assert_eq!(n as usize, routes.len() * 6 - 6, "{text}");
    // The page's static files load without a key (the page must load to ask for one); other
    // methods on them, and look-alike paths, do not.
    for p in ["/", "/static/app.js", "/static/app.css"] {
        let r = s.request("GET", p, &[], b"");
        assert_eq!(r.status, 200, "{p}: {}", r.text());
        assert!(!r.body.is_empty(), "{p}");
        s.request("POST", p, &[], b"").error(401, "unauthorized");
    }
    for p in [
        "/static/../metrics",
        "/%2e%2e/metrics",
        "//health",
        "/health/",
    ] {
        let r = s.request("GET", p, &[], b"");
        assert!(r.status == 401 || r.status == 404, "{p}: {}", r.text());
        assert!(!r.text().contains("sdserve_"), "{p}: {}", r.text());
    }
    std::fs::remove_dir_all(file.parent().unwrap()).unwrap();
}

#[test]
fn bad_key_configuration_refuses_to_start() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sdserve"))
        .arg("serve")
        .env_clear()
        .env("PORT", "0")
        .env("SDSERVE_FAKE_GENERATOR", "step_ms=0")
        .env("API_KEYS_FILE", "/nonexistent/keys")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(all.contains("API_KEYS_FILE"), "{all}");
}

#[test]
fn rate_limit_per_key_and_per_address() {
    let s = Server::start(&env(&[
        ("API_KEYS", "key-a,key-b"),
        ("RATE_LIMIT_PER_MINUTE", "3"),
    ]));
    s.wait_ready(Duration::from_secs(10));
    let get = |k: &str| s.request("GET", "/openapi.json", &[("X-Api-Key", k)], b"");
    for _ in 0..3 {
        assert_eq!(get("key-a").status, 200);
    }
    let r = get("key-a");
    r.error(429, "rate_limited");
    let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=20).contains(&retry), "{retry}");
    // Another key has its own allowance; /health is never limited.
    assert_eq!(get("key-b").status, 200);
    for _ in 0..10 {
        assert_eq!(s.get("/health").status, 200);
    }
    // Without a valid key the caller is counted by address: guessing keys is limited too.
    for _ in 0..3 {
        get("guess").error(401, "unauthorized");
    }
    get("guess").error(429, "rate_limited");
    drop(s);

    // Without keys, every caller is its address.
    let s = Server::start(&env(&[("RATE_LIMIT_PER_MINUTE", "2")]));
    s.wait_ready(Duration::from_secs(10));
    assert_eq!(s.get("/openapi.json").status, 200);
    assert_eq!(s.get("/docs").status, 200);
    s.get("/openapi.json").error(429, "rate_limited");
    assert_eq!(s.get("/health").status, 200);
}

#[test]
fn cors_preflight_and_error_answers_carry_the_origin() {
    let s = Server::start(&env(&[
        ("API_KEYS", PLAIN),
        (
            "CORS_ALLOW_ORIGINS",
            "https://app.example,http://localhost:3000",
        ),
    ]));
    s.wait_ready(Duration::from_secs(10));
    let pre = s.request(
        "OPTIONS",
        "/generate",
        &[
            ("Origin", "https://app.example"),
            ("Access-Control-Request-Method", "POST"),
            (
                "Access-Control-Request-Headers",
                "authorization,content-type",
            ),
        ],
        b"",
    );
    assert!(pre.status < 300, "{} {:?}", pre.status, pre.headers);
    assert_eq!(
        pre.header("access-control-allow-origin"),
        Some("https://app.example")
    );
    let allowed = pre.header("access-control-allow-headers").unwrap_or("");
    assert!(allowed.contains("authorization"), "{allowed}");
    // A 401 must be readable by the page (so it can ask for a key).
    let r = s.request(
        "GET",
        "/openapi.json",
        &[("Origin", "http://localhost:3000")],
        b"",
    );
    r.error(401, "unauthorized");
    assert_eq!(
        r.header("access-control-allow-origin"),
        Some("http://localhost:3000")
    );
    // Another origin gets no grant.
    let r = s.request(
        "GET",
        "/openapi.json",
        &[("Origin", "https://evil.example"), ("X-Api-Key", PLAIN)],
        b"",
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.header("access-control-allow-origin"), None);
}

fn closed_within(mut c: TcpStream, trickle: Option<&[u8]>, within: Duration) -> Duration {
    let t = Instant::now();
    c.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut buf = [0u8; 4096];
    let mut i = 0;
    loop {
        assert!(
            t.elapsed() < within,
            "connection still open after {within:?}"
        );
        if let Some(bytes) = trickle {
            if c.write_all(&bytes[i % bytes.len()..][..1]).is_err() {
                return t.elapsed();
            }
            i += 1;
        }
        match c.read(&mut buf) {
            Ok(0) => return t.elapsed(),
            Ok(_) => {}
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => return t.elapsed(),
        }
    }
}

fn raw_exchange(s: &Server, bytes: &[u8]) -> String {
    let mut c = TcpStream::connect(s.addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = c.write_all(bytes);
    let mut raw = Vec::new();
    let _ = c.read_to_end(&mut raw);
    String::from_utf8_lossy(&raw).into_owned()
}

#[test]
fn slow_clients_hold_no_connection() {
    let s = Server::start(&env(&[
        ("HEADER_READ_TIMEOUT_SECONDS", "1"),
        ("REQUEST_BODY_TIMEOUT_SECONDS", "1"),
    ]));
    s.wait_ready(Duration::from_secs(10));
    // Connects and says nothing.
    let took = closed_within(
        TcpStream::connect(s.addr).unwrap(),
        None,
        Duration::from_secs(5),
    );
    assert!(took >= Duration::from_millis(800), "{took:?}");
    // Slowloris: a header byte every 200 ms, never finishing.
    closed_within(
        TcpStream::connect(s.addr).unwrap(),
        Some(b"GET /health HTTP/1.1\r\nX-a: bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb\r\n"),
        Duration::from_secs(5),
    );
    // Headers on time, then the body trickles: 408 body_timeout and the connection closes.
    let mut c = TcpStream::connect(s.addr).unwrap();
    c.write_all(b"POST /generate HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"prompt\":")
        .unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let t = Instant::now();
    let mut raw = Vec::new();
    let _ = c.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("\"error_code\":\"body_timeout\""), "{text}");
    assert!(t.elapsed() < Duration::from_secs(4), "{:?}", t.elapsed());
    // Too many header lines: 431. Too many header bytes: 431 or a reset (the server stops
    // reading at MAX_HEADER_BYTES, and closing with unread bytes resets), never a 5xx.
    let many: String = (0..150).map(|i| format!("X-H{i}: v\r\n")).collect();
    let head = format!("GET /health HTTP/1.1\r\nHost: t\r\n{many}\r\n");
    let raw = raw_exchange(&s, head.as_bytes());
    assert!(raw.starts_with("HTTP/1.1 431"), "{raw}");
    let head = format!(
        "GET /health HTTP/1.1\r\nX-Big: {}\r\n\r\n",
        "a".repeat(40_000)
    );
    let raw = raw_exchange(&s, head.as_bytes());
    assert!(raw.is_empty() || raw.starts_with("HTTP/1.1 431"), "{raw}");
    // The server still answers.
    assert_eq!(s.get("/health").status, 200);
    let m = s.get("/metrics").text();
    for reason in ["header_timeout", "body_timeout"] {
        assert!(
            m.contains(&format!("sdserve_rejections_total{{reason=\"{reason}\"}}")),
            "{reason}: {m}"
        );
    }
}

#[test]
fn connections_past_the_cap_get_503() {
    let s = Server::start(&env(&[("MAX_CONNECTIONS", "3")]));
    s.wait_ready(Duration::from_secs(10));
    // Idle connections until one is refused: that must happen by the fourth (three may be
    // open; a just-closed one may still hold its slot for a moment, hence "by").
    let mut idle = Vec::new();
    let refused = loop {
        assert!(idle.len() < 4, "4 connections open with MAX_CONNECTIONS=3");
        let mut c = TcpStream::connect(s.addr).unwrap();
        c.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let mut raw = Vec::new();
        let _ = c.read_to_end(&mut raw);
        if !raw.is_empty() {
            break String::from_utf8_lossy(&raw).into_owned();
        }
        idle.push(c);
    };
    assert!(refused.starts_with("HTTP/1.1 503"), "{refused}");
    assert!(refused.contains("connection_limit"), "{refused}");
    assert!(idle.len() >= 2, "refused with only {} open", idle.len());
    drop(idle);
    // Slots come back when connections close.
    let t = Instant::now();
    loop {
        let mut c = TcpStream::connect(s.addr).unwrap();
        c.write_all(b"GET /health HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut raw = Vec::new();
        let _ = c.read_to_end(&mut raw);
        if raw.starts_with(b"HTTP/1.1 200") {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "{}",
            String::from_utf8_lossy(&raw)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A connection to `s` from `source` (any 127.x.y.z is this machine on Linux): a second client.
fn connect_from(s: &Server, source: &str) -> TcpStream {
    use socket2::{Domain, Socket, Type};
    let sock = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    let from: std::net::SocketAddr = format!("{source}:0").parse().unwrap();
    sock.bind(&from.into()).unwrap();
    sock.connect(&s.addr.into()).unwrap();
    let c: TcpStream = sock.into();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    c
}

/// Sends one `GET /health` on `c` (closing after) and reads the whole answer.
fn health_over(mut c: TcpStream) -> String {
    let _ = c.write_all(b"GET /health HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
    let mut raw = Vec::new();
    let _ = c.read_to_end(&mut raw);
    String::from_utf8_lossy(&raw).into_owned()
}

#[test]
fn one_client_address_cannot_hold_every_connection() {
    let s = Server::start(&env(&[
        ("MAX_CONNECTIONS_PER_CLIENT", "2"),
        ("TRUSTED_PROXIES", "127.0.0.4"),
    ]));
    s.wait_ready(Duration::from_secs(10));
    // 127.0.0.2 holds two idle connections (accepted in order, so both are counted before
    // the third): its third is answered 429 at once, even with a request already sent.
    let mut held: Vec<TcpStream> = (0..2).map(|_| connect_from(&s, "127.0.0.2")).collect();
    let refused = health_over(connect_from(&s, "127.0.0.2"));
    assert!(refused.starts_with("HTTP/1.1 429"), "{refused}");
    assert!(refused.contains("retry-after: 1"), "{refused}");
    assert!(
        refused.contains("\"error_code\":\"overloaded\""),
        "{refused}"
    );
    assert!(refused.contains("MAX_CONNECTIONS_PER_CLIENT"), "{refused}");
    // Another address is served meanwhile (twice: its own count is separate).
    for _ in 0..2 {
        let other = health_over(connect_from(&s, "127.0.0.3"));
        assert!(other.starts_with("HTTP/1.1 200"), "{other}");
    }
    // A trusted proxy is not capped: 4 idle connections, and a fifth is served.
    let proxy: Vec<TcpStream> = (0..4).map(|_| connect_from(&s, "127.0.0.4")).collect();
    let via_proxy = health_over(connect_from(&s, "127.0.0.4"));
    assert!(via_proxy.starts_with("HTTP/1.1 200"), "{via_proxy}");
    let m = s.get("/metrics").text();
    assert!(
        m.contains("sdserve_rejections_total{reason=\"connection_limit_per_client\"} 1"),
        "{m}"
    );
    // A freed slot is usable again (the other one still held).
    drop(held.pop());
    let t = Instant::now();
    loop {
        let again = health_over(connect_from(&s, "127.0.0.2"));
        if again.starts_with("HTTP/1.1 200") {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(5), "{again}");
        std::thread::sleep(Duration::from_millis(50));
    }
    drop((held, proxy));
}
