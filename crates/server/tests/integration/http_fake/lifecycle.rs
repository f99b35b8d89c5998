//! The server's life cycle and observability: loading and health, failed loads, out of memory
//! and panics, metrics and request ids, SIGTERM.

use super::*;

#[test]
fn health_goes_from_loading_to_ok_and_generate_waits_for_it() {
    let s = Server::start(&fake("step_ms=0,load_ms=1200"));
    let h = s.get("/health");
    assert_eq!(h.status, 503);
    let j = h.json();
    assert_eq!(j["status"], "loading");
    assert!(j["model_version"].is_null());
    assert_eq!(j["device"], "cpu");
    assert_eq!(j["dtype"], "f32");
    assert!(j["gpu"].is_null());
    assert_eq!(j["queue"]["capacity"], 4);
    assert_eq!(j["version"], env!("CARGO_PKG_VERSION"));
    let e = s
        .post_json(&json!({"prompt": "early"}))
        .error(503, "model_unavailable");
    assert!(e["details"].as_str().unwrap().contains("loading"));
    s.wait_ready(Duration::from_secs(10));
    let j = s.get("/health").json();
    assert_eq!(j["status"], "ok");
    assert_eq!(j["model_version"], "fake@0");
    assert_eq!(
        j["queue"],
        json!({"running": 0, "waiting": 0, "capacity": 4})
    );
    assert!(j["uptime_seconds"].as_f64().unwrap() >= 1.0);
    s.wait_log(&["model ready", "load_seconds"], Duration::from_secs(2));
}

#[test]
fn failed_load_is_reported() {
    let s = Server::start(&fake("fail_load=weights missing for unet"));
    let t = Instant::now();
    loop {
        let h = s.get("/health");
        assert_eq!(h.status, 503);
        if h.json()["status"] == "unavailable" {
            assert!(h.json()["detail"]
                .as_str()
                .unwrap()
                .contains("weights missing for unet"));
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(5));
        std::thread::sleep(Duration::from_millis(20));
    }
    let e = s
        .post_json(&json!({"prompt": "x"}))
        .error(503, "model_unavailable");
    assert!(e["details"].as_str().unwrap().contains("weights missing"));
}

#[test]
fn failures_out_of_memory_and_panics() {
    let s = ready(fake("step_ms=0"));
    let small = |p: &str| json!({"prompt": p, "steps": 1, "width": 256, "height": 256});
    let j = s
        .post_json(&small("fake:error"))
        .error(500, "internal_error");
    assert!(
        j["details"].is_null() && !j.to_string().contains("secret"),
        "{j}"
    );
    s.post_json(&small("fake:panic"))
        .error(500, "internal_error");
    assert_eq!(s.post_json(&small("still alive")).status, 200);
    s.post_json(&small("fake:oom")).error(503, "out_of_memory");
    // One out-of-memory failure fails only that request.
    assert_eq!(s.get("/health").json()["status"], "ok");
    assert_eq!(s.post_json(&small("fine")).status, 200);
    // A second one within the window opens the breaker (the fake has no leaner memory plan):
    // refuse new work for a while, report degraded (still 200).
    let first = s.post_json(&small("fake:oom"));
    first.error(503, "out_of_memory");
    assert_eq!(
        first.header("retry-after"),
        None,
        "a single failure asks for no wait"
    );
    let refused = s.post_json(&small("fine"));
    let j = refused.error(503, "out_of_memory");
    assert!(
        j["details"].as_str().unwrap_or("").contains("retry after"),
        "{j}"
    );
    let wait: u64 = refused
        .header("retry-after")
        .expect("Retry-After while the breaker is open")
        .parse()
        .expect("whole seconds");
    assert!(wait >= 1, "Retry-After {wait}");
    let h = s.get("/health");
    assert_eq!(
        (h.status, h.json()["status"].as_str()),
        (200, Some("degraded"))
    );
    s.wait_log(
        &["\"error_code\":\"internal_error\""],
        Duration::from_secs(2),
    );
    assert!(
        s.logs().iter().any(|l| l.contains("secret")),
        "the cause is logged"
    );
}

#[test]
fn metrics_count_requests_and_request_ids_are_echoed() {
    let s = ready(fake("step_ms=1"));
    let scrape = || {
        let text = s.get("/metrics").text();
        exposition::parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"))
    };
    let before = scrape();
    for _ in 0..3 {
        assert_eq!(
            s.post_json(&json!({"prompt": "m", "steps": 2, "width": 256, "height": 256}))
                .status,
            200
        );
    }
    s.post_json(&json!({"prompt": ""}))
        .error(422, "validation_error");
    s.get("/missing").error(404, "not_found");
    let r = s.request("GET", "/health", &[("X-Request-Id", "abc-123")], b"");
    assert_eq!(r.header("x-request-id"), Some("abc-123"));
    let gen_id = s.get("/health").header("x-request-id").unwrap().to_string();
    assert_eq!(gen_id.len(), 16);
    let after = scrape();
    // Counters and histograms moved by exactly what was sent (the exposition read strictly).
    let moved = |name: &str, labels: &[(&str, &str)]| {
        after
            .value(name, labels)
            .unwrap_or_else(|| panic!("no {name} {labels:?}"))
            - before.value(name, labels).unwrap_or(0.0)
    };
    let ok = [
        ("route", "/generate"),
        ("status", "200"),
        ("error_code", ""),
    ];
    assert_eq!(moved("sdserve_requests_total", &ok), 3.0);
    assert_eq!(moved("sdserve_generation_seconds_count", &[]), 3.0);
    assert_eq!(moved("sdserve_step_seconds_count", &[]), 6.0);
    assert_eq!(moved("sdserve_step_seconds_bucket", &[("le", "+Inf")]), 6.0);
    assert!(moved("sdserve_generation_seconds_sum", &[]) > 0.0);
    assert_eq!(after.families["sdserve_step_seconds"].kind, "histogram");
    assert_eq!(after.families["sdserve_requests_total"].kind, "counter");
    let m = s.get("/metrics");
    assert!(m
        .header("content-type")
        .unwrap()
        .starts_with("text/plain; version=0.0.4"));
    let text = m.text();
    for line in [
        "sdserve_requests_total{route=\"/generate\",status=\"200\",error_code=\"\"} 3",
        "sdserve_requests_total{route=\"/generate\",status=\"422\",error_code=\"validation_error\"} 1",
        "sdserve_requests_total{route=\"unmatched\",status=\"404\",error_code=\"not_found\"} 1",
        "sdserve_generation_seconds_count 3",
        "sdserve_queue_seconds_count 3",
        "sdserve_request_seconds_count 4",
        "sdserve_step_seconds_count 6",
        "sdserve_queue_depth 0",
        "sdserve_running 0",
        "sdserve_capacity 4",
    ] {
        assert!(text.contains(line), "missing {line:?} in\n{text}");
    }
    let line = s.wait_log(&["abc-123", "\"status\":200"], Duration::from_secs(2));
    assert!(line.contains("\"path\":\"/health\""), "{line}");
    let gen_line = s.wait_log(
        &["\"path\":\"/generate\"", "\"status\":200"],
        Duration::from_secs(2),
    );
    for field in [
        "queue_seconds",
        "generation_seconds",
        "total_seconds",
        "\"steps\":2",
        "\"size\":\"256x256\"",
        "request_id",
    ] {
        assert!(gen_line.contains(field), "{field} missing in {gen_line}");
    }
}

#[test]
fn sigterm_finishes_running_answers_queued_503_and_exits_0() {
    let mut s = ready(with(
        fake("step_ms=50"),
        &[
            ("MAX_CONCURRENT_REQUESTS", "3"),
            ("SHUTDOWN_GRACE_SECONDS", "10"),
        ],
    ));
    let addr = s.addr;
    let post = move |p: &'static str| {
        std::thread::spawn(move || {
            let t = Instant::now();
            let r = common::request(
                addr,
                "POST",
                "/generate",
                &[("Content-Type", "application/json")],
                json!({"prompt": p, "steps": 20, "width": 256, "height": 256})
                    .to_string()
                    .as_bytes(),
            );
            (r, t.elapsed(), Instant::now())
        })
    };
    let running = post("running");
    std::thread::sleep(Duration::from_millis(150));
    let queued = post("queued");
    std::thread::sleep(Duration::from_millis(150));
    s.terminate();
    let (q, q_took, q_answered) = queued.join().unwrap();
    let e = q.error(503, "model_unavailable");
    assert!(e["details"].as_str().unwrap().contains("shutting down"));
    let (r, r_took, r_answered) = running.join().unwrap();
    assert_eq!(r.status, 200, "the running job finishes: {}", r.text());
    // The queued one was answered at once, not after the running one: at the signal (after
    // 0.3 s, at most 6 of its 20 steps of at least 50 ms) the running job had 0.7 s or more
    // to go, more under load.
    assert!(
        q_answered < r_answered,
        "queued answered at once, took {q_took:?}; the running one {r_took:?}"
    );
    let status = s.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(0));
    assert!(
        std::net::TcpStream::connect(addr).is_err(),
        "still accepting after shutdown"
    );
    assert!(s.logs().iter().any(|l| l.contains("SIGTERM")));
}

/// A run that never returns (deaf to its stop flag): STUCK_GRACE_SECONDS past its deadline its
/// job fails with `timeout` and /health says `degraded`; STUCK_EXIT_SECONDS later the process
/// drains as on SIGTERM (the job waiting behind it answered 503) and exits with status 70, for
/// its supervisor to start a fresh one.
#[test]
fn a_stuck_run_makes_the_process_exit_70_after_stuck_exit_seconds() {
    let mut s = ready(with(
        fake("step_ms=20,hang_at_step=2,hang_ms=600000"),
        &[
            ("JOB_TIMEOUT_SECONDS", "1"),
            ("STUCK_GRACE_SECONDS", "1"),
            ("STUCK_EXIT_SECONDS", "3"),
            ("SHUTDOWN_GRACE_SECONDS", "1"),
        ],
    ));
    let r = s.request(
        "POST",
        "/jobs",
        &[("Content-Type", "application/json")],
        json!({"prompt": "hangs", "steps": 10, "width": 256, "height": 256})
            .to_string()
            .as_bytes(),
    );
    assert_eq!(r.status, 202, "{}", r.text());
    let id = r.json()["id"].as_str().unwrap().to_string();
    s.wait_log(&["fake generator: hanging"], Duration::from_secs(10));
    let addr = s.addr;
    let waiting = std::thread::spawn(move || {
        common::request(
            addr,
            "POST",
            "/generate",
            &[("Content-Type", "application/json")],
            json!({"prompt": "behind", "steps": 2, "width": 256, "height": 256})
                .to_string()
                .as_bytes(),
        )
    });
    // 1 s deadline + 1 s grace: the job fails, /health is degraded (until the exit, 3 s on).
    let t = Instant::now();
    let job = loop {
        let j = s.get(&format!("/jobs/{id}")).json();
        if j["status"] == "failed" {
            break j;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "{j}");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(job["error"]["error_code"], "timeout", "{job}");
    let health = s.get("/health");
    assert_eq!(health.status, 200);
    assert_eq!(health.json()["status"], "degraded", "{}", health.text());

    let status = s.wait_exit(Duration::from_secs(30));
    assert_eq!(status.code(), Some(70));
    let e = waiting.join().unwrap().error(503, "model_unavailable");
    assert!(
        e["details"].as_str().unwrap().contains("shutting down"),
        "{e}"
    );
    assert!(s
        .logs()
        .iter()
        .any(|l| l.contains("STUCK_EXIT_SECONDS") && l.contains("fresh one")));
}
