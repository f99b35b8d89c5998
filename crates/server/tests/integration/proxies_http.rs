//! TRUSTED_PROXIES over real HTTP against the real binary (fake generator): behind a trusted
//! reverse proxy each client has its own rate limit and appears in the request log under its
//! own address; an untrusted peer's X-Forwarded-For changes nothing; a bad value stops the
//! start naming the flag. The test connects from 127.0.0.1, so it plays the proxy.

use crate::common;

use std::time::Duration;

use common::{fake, Resp, Server};

fn start(more: &[(&str, &str)]) -> Server {
    let mut e = fake("step_ms=0");
    e.push(("RATE_LIMIT_PER_MINUTE".into(), "2".into()));
    e.extend(more.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let s = Server::start(&e);
    s.wait_ready(Duration::from_secs(10));
    s
}

fn get_for(s: &Server, forwarded: &[&str]) -> Resp {
    let headers: Vec<(&str, &str)> = forwarded.iter().map(|f| ("X-Forwarded-For", *f)).collect();
    s.request("GET", "/openapi.json", &headers, b"")
}

/// The `client` the request log wrote for the request with this id.
fn logged_client(s: &Server, request_id: &str) -> String {
    let line = s.wait_log(&["\"request\"", request_id], Duration::from_secs(10));
    let j: serde_json::Value = serde_json::from_str(&line).unwrap();
    j["client"].as_str().unwrap().to_string()
}

#[test]
fn behind_trusted_proxies_each_forwarded_client_has_its_own_limit_and_log_address() {
    let s = start(&[("TRUSTED_PROXIES", "127.0.0.1, 10.0.0.0/8")]);
    // Two a minute for 203.0.113.5, however it came through our proxies.
    assert_eq!(get_for(&s, &["203.0.113.5"]).status, 200);
    assert_eq!(get_for(&s, &["203.0.113.5, 10.1.2.3"]).status, 200);
    get_for(&s, &["203.0.113.5"]).error(429, "rate_limited");
    // What the client wrote left of its own address is not believed: still 203.0.113.5.
    get_for(&s, &["198.51.100.1, 203.0.113.5"]).error(429, "rate_limited");
    // Another client has its own allowance, also through two headers and a proxy chain.
    assert_eq!(get_for(&s, &["198.51.100.7", "10.9.9.9"]).status, 200);
    // The request log names the client, not the proxy.
    let r = s.request(
        "GET",
        "/health",
        &[
            ("X-Forwarded-For", "192.0.2.44, 10.0.0.2"),
            ("X-Request-Id", "proxied-client-log"),
        ],
        b"",
    );
    assert_eq!(r.status, 200);
    assert_eq!(logged_client(&s, "proxied-client-log"), "192.0.2.44");
    // No header: the proxy itself is the client.
    let r = s.request("GET", "/health", &[("X-Request-Id", "proxy-itself")], b"");
    assert_eq!(r.status, 200);
    assert_eq!(logged_client(&s, "proxy-itself"), "127.0.0.1");
}

#[test]
fn an_untrusted_peers_forwarded_for_changes_nothing() {
    for trusted in [None, Some("10.0.0.0/8")] {
        let s = start(
            &trusted
                .map(|t| ("TRUSTED_PROXIES", t))
                .into_iter()
                .collect::<Vec<_>>(),
        );
        // Every request counts against 127.0.0.1, whatever it claims.
        assert_eq!(get_for(&s, &["203.0.113.5"]).status, 200);
        assert_eq!(get_for(&s, &["203.0.113.6"]).status, 200);
        get_for(&s, &["203.0.113.7"]).error(429, "rate_limited");
        let r = s.request(
            "GET",
            "/health",
            &[
                ("X-Forwarded-For", "203.0.113.8"),
                ("X-Request-Id", "untrusted-peer"),
            ],
            b"",
        );
        assert_eq!(r.status, 200);
        assert_eq!(
            logged_client(&s, "untrusted-peer"),
            "127.0.0.1",
            "{trusted:?}"
        );
    }
}

#[test]
fn a_bad_trusted_proxies_value_refuses_to_start_naming_the_flag() {
    for bad in ["10.0.0.0/33", "127.0.0.1,proxy.internal"] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_sdserve"))
            .arg("serve")
            .env_clear()
            .env("PORT", "0")
            .env("SDSERVE_FAKE_GENERATOR", "step_ms=0")
            .env("TRUSTED_PROXIES", bad)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{bad}");
        let all = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(all.contains("TRUSTED_PROXIES"), "{all}");
        assert!(all.contains("neither an IP address"), "{all}");
    }
}
