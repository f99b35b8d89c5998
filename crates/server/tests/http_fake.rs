//! The HTTP contract and the engine's timing behaviour, over real HTTP against the real binary,
//! with the fake generator (selected by the hidden `SDSERVE_FAKE_GENERATOR`).

mod common;

use std::time::{Duration, Instant};

use common::{decode_png, exposition, fake, send_only, Server};
use serde_json::json;

fn with(mut env: Vec<(String, String)>, more: &[(&str, &str)]) -> Vec<(String, String)> {
    env.extend(more.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    env
}

fn ready(env: Vec<(String, String)>) -> Server {
    let s = Server::start(&env);
    s.wait_ready(Duration::from_secs(10));
    s
}

#[test]
fn validation_rules_at_their_edges() {
    let s = ready(with(fake("step_ms=0"), &[("MAX_CONCURRENT_REQUESTS", "8")]));
    let ok = |extra: serde_json::Value| {
        let mut body = json!({"prompt": "x", "steps": 1, "width": 256, "height": 256});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        s.post_json(&body)
    };
    let p500 = "ж".repeat(500);
    let p501 = "ж".repeat(501);
    let good = [
        json!({"prompt": p500}),
        json!({"prompt": format!("  {p500}\t")}),
        json!({"negative_prompt": p500}),
        json!({"negative_prompt": ""}),
        json!({"steps": 1}),
        json!({"steps": 50}),
        json!({"width": 256, "height": 768}),
        json!({"width": 768, "height": 256}),
        json!({"seed": 0}),
        json!({"seed": 4294967295u64}),
        json!({"seed": null}),
        json!({"guidance_scale": 0.0}),
        json!({"guidance_scale": 30}),
        json!({"scheduler": "dpmpp_2m_karras"}),
    ];
    for extra in good {
        let r = ok(extra.clone());
        assert_eq!(r.status, 200, "{extra}: {}", r.text());
    }
    let bad = [
        (json!({"prompt": ""}), "prompt"),
        (json!({"prompt": " \n\t "}), "prompt"),
        (json!({"prompt": "\u{1}\u{7f}"}), "prompt"),
        (json!({"prompt": p501}), "prompt"),
        (json!({"prompt": 5}), "prompt"),
        (json!({"negative_prompt": p501}), "negative_prompt"),
        (json!({"steps": 0}), "steps"),
        (json!({"steps": 51}), "steps"),
        (json!({"steps": 2.5}), "steps"),
        (json!({"steps": "20"}), "steps"),
        (json!({"width": 192}), "width"),
        (json!({"width": 832}), "width"),
        (json!({"width": 320 + 1}), "width"),
        (json!({"height": 255}), "height"),
        (json!({"height": 769}), "height"),
        (json!({"seed": -1}), "seed"),
        (json!({"seed": 4294967296u64}), "seed"),
        (json!({"guidance_scale": -0.01}), "guidance_scale"),
        (json!({"guidance_scale": 30.01}), "guidance_scale"),
        (json!({"scheduler": "k_euler"}), "scheduler"),
        (json!({"sampler": "euler"}), "sampler"),
    ];
    for (extra, field) in bad {
        assert_eq!(ok(extra.clone()).broken_fields(), [field], "{extra}");
    }
    // Every broken field in one answer, so a client fixes its request in one round.
    let r = ok(json!({"steps": 0, "width": 300, "scheduler": "k_euler", "sampler": "x"}));
    assert_eq!(
        r.broken_fields(),
        ["sampler", "steps", "width", "scheduler"],
        "{}",
        r.text()
    );
    // Missing prompt.
    let j = s
        .post_json(&json!({"steps": 1}))
        .error(422, "validation_error");
    assert!(j["details"].as_str().unwrap().starts_with("prompt:"));
    // Cleaning is echoed.
    let r = ok(json!({"prompt": "\u{1} a\u{0}b\u{7} "}));
    assert_eq!(r.json()["metadata"]["prompt"], "ab");
}

#[test]
fn shape_errors_routes_and_methods() {
    let s = ready(with(fake("step_ms=0"), &[("MAX_BODY_BYTES", "4096")]));
    s.post_raw(b"{\"prompt\": ").error(400, "invalid_json");
    s.post_raw(b"[\"prompt\"]").error(400, "invalid_json");
    s.post_raw(b"").error(400, "invalid_json");
    let j = s
        .request(
            "POST",
            "/generate",
            &[("Content-Type", "text/plain")],
            br#"{"prompt":"x"}"#,
        )
        .error(400, "invalid_json");
    assert!(j["details"].as_str().unwrap().contains("application/json"));
    s.request("POST", "/generate", &[], br#"{"prompt":"x"}"#)
        .error(400, "invalid_json");
    s.get("/nope").error(404, "not_found");
    s.request("DELETE", "/health", &[], b"")
        .error(405, "method_not_allowed");
    let r = s.get("/generate");
    r.error(405, "method_not_allowed");
    assert!(
        r.header("allow").is_some_and(|a| a.contains("POST")),
        "{:?}",
        r.headers
    );
    let big = format!(r#"{{"prompt":"{}"}}"#, "a".repeat(10_000));
    s.post_raw(big.as_bytes()).error(413, "payload_too_large");
    // Just under the limit is parsed (and then fails validation on length, not size).
    let under = format!(r#"{{"prompt":"{}"}}"#, "a".repeat(4000));
    s.post_raw(under.as_bytes()).error(422, "validation_error");
}

#[test]
fn defaults_echoed_random_seed_reproduces_and_png_carries_parameters() {
    let s = ready(with(
        fake("step_ms=0,scheduler=ddim"),
        &[("RESPONSE_CACHE_MB", "0")],
    ));
    let r = s.post_json(&json!({"prompt": "a red fox"}));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-cache"), Some("miss"));
    let j = r.json();
    let m = &j["metadata"];
    assert_eq!(m["prompt"], "a red fox");
    assert_eq!(m["negative_prompt"], "");
    assert_eq!(
        (
            m["steps"].as_u64(),
            m["width"].as_u64(),
            m["height"].as_u64()
        ),
        (Some(20), Some(512), Some(512))
    );
    assert_eq!(m["guidance_scale"].as_f64(), Some(7.5));
    assert_eq!(
        m["scheduler"], "ddim",
        "the model's own scheduler is resolved and echoed"
    );
    assert_eq!(m["model_version"], "fake@0");
    assert!(m["generation_time_seconds"].as_f64().unwrap() >= 0.0);
    let seed = m["seed"].as_u64().expect("random seed returned");
    assert!(seed <= u32::MAX as u64);
    let (w, h, pixels, text) = decode_png(j["image_base64"].as_str().unwrap());
    assert_eq!((w, h, pixels.len()), (512, 512, 512 * 512 * 3));
    let text = text.expect("parameters chunk");
    assert!(
        text.starts_with("a red fox\nSteps: 20, Sampler: DDIM, Scheduler: ddim, CFG scale: 7.5, "),
        "{text}"
    );
    assert!(
        text.contains(&format!("Seed: {seed}, Size: 512x512, Model: fake@0")),
        "{text}"
    );

    // Sending the seed back reproduces the image (cache off: it is generated again).
    let again = s.post_json(&json!({"prompt": "a red fox", "seed": seed}));
    assert_eq!(again.header("x-cache"), Some("miss"));
    let (_, _, pixels2, _) = decode_png(again.json()["image_base64"].as_str().unwrap());
    assert_eq!(pixels, pixels2);
    // Another random seed differs (2^-32 chance of a false failure).
    let other = s.post_json(&json!({"prompt": "a red fox"})).json();
    assert_ne!(other["metadata"]["seed"], j["metadata"]["seed"]);
}

#[test]
fn timeout_stops_the_run_and_frees_the_worker() {
    // Bounds come from the run's own events and measured step time, not from an assumed
    // speed: under load a 50 ms step takes longer, so fewer steps fit in the second.
    let s = ready(with(
        fake("step_ms=50"),
        &[("GENERATION_TIMEOUT_SECONDS", "1")],
    ));
    let t = Instant::now();
    let j = s
        .post_json(&json!({"prompt": "slow", "steps": 50, "width": 256, "height": 256}))
        .error(408, "timeout");
    let took = t.elapsed();
    // The details say how far it got, what it would have needed and what to raise.
    let details = j["details"].as_str().unwrap();
    assert!(
        details.contains("GENERATION_TIMEOUT_SECONDS=1; the run was stopped at step ")
            && details.contains(" of 50 after ")
            && details.contains("raise GENERATION_TIMEOUT_SECONDS to at least"),
        "{details}"
    );
    let number_after = |key: &str| -> f64 {
        details
            .split(key)
            .nth(1)
            .and_then(|r| r.split(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no number after {key:?} in {details}"))
    };
    let heard_step = number_after("stopped at step ") as usize;
    let needed = number_after("needs about ");
    // Answered at the deadline, long before the run would have ended at the speed it ran.
    assert!(
        took >= Duration::from_millis(950) && took.as_secs_f64() < needed,
        "{took:?} {j}"
    );
    // The run itself: the record of the timed-out job says at which step the worker stopped
    // (it stops at its next step, so it may still be running as the 408 goes out).
    let jobs = s.get("/jobs").json();
    let id = jobs["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["request"]["prompt"] == "slow")
        .unwrap_or_else(|| panic!("{jobs}"))["id"]
        .as_str()
        .unwrap()
        .to_string();
    let waiting = Instant::now();
    let timed_out = loop {
        let j = s.get(&format!("/jobs/{id}")).json();
        if j["status"] != "running" {
            break j;
        }
        assert!(waiting.elapsed() < Duration::from_secs(30), "{j}");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(timed_out["status"], "failed", "{timed_out}");
    let ran = timed_out["progress"]["step"].as_u64().unwrap() as usize;
    // The worker stops at the first step that ends after the stop signal: the waiter heard
    // step `heard_step`, and at most the step in flight plus one that raced the signal ran on.
    assert!(
        (heard_step.max(1)..=heard_step + 2).contains(&ran) && ran < 50,
        "ran {ran}, heard {heard_step}: {details}"
    );
    // The quick job runs as soon as the worker is free: long before the timed-out job's
    // remaining steps could have run, were it still running.
    let step_secs =
        || s.metric("sdserve_step_seconds_sum") / s.metric("sdserve_step_seconds_count").max(1.0);
    let remaining = (50 - ran) as f64 * step_secs();
    let t = Instant::now();
    let r = s.post_json(&json!({"prompt": "quick", "steps": 2, "width": 256, "height": 256}));
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        t.elapsed().as_secs_f64() < remaining,
        "{:?}, {remaining:.2} s of the timed-out run were left",
        t.elapsed()
    );
    assert_eq!(s.metric("sdserve_cancelled_total"), 1.0);
    // Not one step more than the record says ran: the timed-out run stopped, then the 2 quick steps.
    let steps = s.metric("sdserve_step_seconds_count");
    assert_eq!(steps, (ran + 2) as f64, "ran {ran}");
    // The estimate follows the speed the steps really ran at (50 steps of the mean step).
    let expected = 50.0 * step_secs();
    assert!(
        needed >= 2.0 && (needed - expected).abs() <= 0.25 * expected + 0.5,
        "needs {needed} s, 50 steps of the measured mean step take {expected:.2} s: {details}"
    );
    eprintln!(
        "timeout: 408 after {took:?}; {ran} steps ran (the client heard {heard_step}); mean step {:.3} s; needs about {needed} s",
        step_secs()
    );
    s.wait_log(
        &["\"status\":408", "\"error_code\":\"timeout\""],
        Duration::from_secs(2),
    );
}

#[test]
fn burst_over_the_limit_gets_429_with_retry_after() {
    let s = ready(with(
        fake("step_ms=40"),
        &[("MAX_CONCURRENT_REQUESTS", "1")],
    ));
    let addr = s.addr;
    let body = json!({"prompt": "burst", "steps": 10, "width": 256, "height": 256}).to_string();
    let handles: Vec<_> = (0..6)
        .map(|_| {
            let body = body.clone();
            std::thread::spawn(move || {
                common::request(
                    addr,
                    "POST",
                    "/generate",
                    &[("Content-Type", "application/json")],
                    body.as_bytes(),
                )
            })
        })
        .collect();
    let resps: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let ok = resps.iter().filter(|r| r.status == 200).count();
    let over: Vec<_> = resps.iter().filter(|r| r.status == 429).collect();
    assert_eq!(
        ok,
        1,
        "statuses: {:?}",
        resps.iter().map(|r| r.status).collect::<Vec<_>>()
    );
    assert_eq!(over.len(), 5);
    for r in over {
        r.error(429, "overloaded");
        let ra: u64 = r
            .header("retry-after")
            .expect("Retry-After")
            .parse()
            .unwrap();
        assert!((1..=60).contains(&ra));
    }
    // The slot is free again afterwards.
    assert_eq!(
        s.post_json(&json!({"prompt": "after", "steps": 1, "width": 256, "height": 256}))
            .status,
        200
    );
}

#[test]
fn seeded_requests_hit_the_cache_unseeded_never() {
    let s = ready(fake("step_ms=20"));
    let body = json!({"prompt": "cached", "steps": 10, "width": 256, "height": 256, "seed": 7});
    let first = s.post_json(&body);
    assert_eq!((first.status, first.header("x-cache")), (200, Some("miss")));
    let steps = s.metric("sdserve_step_seconds_count");
    let t = Instant::now();
    let second = s.request(
        "POST",
        "/generate",
        &[
            ("Content-Type", "application/json"),
            ("X-Request-Id", "cache-check-1"),
        ],
        body.to_string().as_bytes(),
    );
    let hit_took = t.elapsed();
    assert_eq!(
        (second.status, second.header("x-cache")),
        (200, Some("hit"))
    );
    // A hit answers at once: no step runs, and it takes less than the 10 steps' time at the
    // speed they ran (their mean, from the metric; both slow down alike under load).
    assert_eq!(s.metric("sdserve_step_seconds_count"), steps);
    let ten_steps = 10.0 * s.metric("sdserve_step_seconds_sum") / steps;
    assert!(
        hit_took.as_secs_f64() < ten_steps,
        "a hit answers at once: {hit_took:?}, 10 steps took {ten_steps:.3} s"
    );
    assert_eq!(first.body, second.body);
    s.wait_log(
        &["cache-check-1", "\"cache\":\"hit\""],
        Duration::from_secs(2),
    );
    // The explicit default scheduler resolves to the same key.
    let third = s.post_json(&json!({"prompt": "cached", "steps": 10, "width": 256, "height": 256, "seed": 7, "scheduler": "pndm"}));
    assert_eq!(third.header("x-cache"), Some("hit"));
    // A different parameter misses.
    let other = s.post_json(&json!({"prompt": "cached", "steps": 10, "width": 256, "height": 256, "seed": 7, "guidance_scale": 7.0}));
    assert_eq!(other.header("x-cache"), Some("miss"));
    // No seed: never cached, never counted.
    for _ in 0..2 {
        let r = s.post_json(&json!({"prompt": "cached", "steps": 1, "width": 256, "height": 256}));
        assert_eq!(r.header("x-cache"), Some("miss"));
    }
    assert_eq!(s.metric("sdserve_cache_hits_total"), 2.0);
    assert_eq!(s.metric("sdserve_cache_misses_total"), 2.0);
    assert_eq!(s.metric("sdserve_cache_entries"), 2.0);
}

#[test]
fn client_disconnect_cancels_running_and_queued_work() {
    let s = ready(with(
        fake("step_ms=50"),
        &[("MAX_CONCURRENT_REQUESTS", "4")],
    ));
    // Running job: the client goes away after ~0.3 s of a 2.5 s run.
    let gone = send_only(
        s.addr,
        &json!({"prompt": "gone", "steps": 50, "width": 256, "height": 256}),
    );
    std::thread::sleep(Duration::from_millis(300));
    drop(gone);
    std::thread::sleep(Duration::from_millis(150));
    let t = Instant::now();
    let r = s.post_json(&json!({"prompt": "next", "steps": 1, "width": 256, "height": 256}));
    let took = t.elapsed();
    assert_eq!(r.status, 200);
    let ran = s.metric("sdserve_step_seconds_count");
    assert!(ran < 15.0, "the abandoned run went on for {ran} steps");
    // The next job did not wait for the abandoned run's remaining steps, at the speed the
    // steps ran (their mean, from the metric): the worker was free.
    let mean_step = s.metric("sdserve_step_seconds_sum") / ran;
    let remaining = (50.0 - (ran - 1.0)) * mean_step;
    assert!(
        took.as_secs_f64() < remaining,
        "worker still busy: {took:?}, {remaining:.2} s of the abandoned run were left"
    );

    // Queued job whose client leaves is never started: A runs (20 steps), B queues and leaves.
    let a_addr = s.addr;
    let a = std::thread::spawn(move || {
        common::request(
            a_addr,
            "POST",
            "/generate",
            &[("Content-Type", "application/json")],
            json!({"prompt": "a", "steps": 20, "width": 256, "height": 256})
                .to_string()
                .as_bytes(),
        )
    });
    std::thread::sleep(Duration::from_millis(150));
    let b = send_only(
        s.addr,
        &json!({"prompt": "b", "steps": 20, "width": 256, "height": 256}),
    );
    std::thread::sleep(Duration::from_millis(150));
    assert_eq!(s.get("/health").json()["queue"]["waiting"], 1);
    drop(b);
    std::thread::sleep(Duration::from_millis(150));
    assert_eq!(s.get("/health").json()["queue"]["waiting"], 0);
    assert_eq!(a.join().unwrap().status, 200);
    std::thread::sleep(Duration::from_millis(200));
    // Exactly A's 20 steps ran after the first part; B's none.
    assert_eq!(s.metric("sdserve_step_seconds_count"), ran + 20.0);
    assert_eq!(s.get("/health").json()["queue"]["running"], 0);
}

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
fn openapi_and_offline_docs() {
    let s = ready(fake("step_ms=0"));
    let r = s.get("/openapi.json");
    assert_eq!(r.status, 200);
    let committed =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.json")).unwrap();
    assert_eq!(r.text(), committed);
    // Every documented operation is routed (no 405, no route-level 404).
    let doc = r.json();
    for (path, ops) in doc["paths"].as_object().unwrap() {
        for method in ops.as_object().unwrap().keys() {
            let url = path.replace("{id}", "no-such-job");
            let resp = s.request(&method.to_uppercase(), &url, &[], b"");
            assert_ne!(resp.status, 405, "{method} {path}");
            if resp.status == 404 {
                assert_ne!(resp.json()["error_code"], "not_found", "{method} {path}");
            }
        }
    }
    let d = s.get("/docs");
    assert_eq!(d.status, 200);
    assert!(d.header("content-type").unwrap().starts_with("text/html"));
    let html = d.text();
    assert!(html.contains("/openapi.json") && html.contains("/generate"));
    for external in ["src=\"http", "href=\"http", "src='http", "@import", "cdn"] {
        assert!(
            !html.to_lowercase().contains(external),
            "docs page loads something external: {external}"
        );
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

/// Whether a property schema admits `null` (`type: [.., "null"]` or a `oneOf` with a null type).
fn nullable(prop: &serde_json::Value) -> bool {
    prop["type"]
        .as_array()
        .is_some_and(|t| t.iter().any(|t| t == "null"))
        || prop["oneOf"]
            .as_array()
            .is_some_and(|alts| alts.iter().any(|a| a["type"] == "null"))
}

/// Follows a local `$ref` (directly or as the first `oneOf` alternative) to its schema.
fn resolve<'a>(doc: &'a serde_json::Value, prop: &'a serde_json::Value) -> &'a serde_json::Value {
    let r = prop["$ref"]
        .as_str()
        .or_else(|| prop["oneOf"][0]["$ref"].as_str());
    match r {
        Some(r) => doc
            .pointer(r.trim_start_matches('#'))
            .unwrap_or_else(|| panic!("dangling {r}")),
        None => prop,
    }
}

/// The server's own OpenAPI document, walked property by property against the server: what the
/// document calls nullable, optional, bounded, defaulted or enumerated, the server treats so.
#[test]
fn the_openapi_schema_and_the_server_agree() {
    let s = ready(with(
        fake("step_ms=0"),
        &[("RESPONSE_CACHE_MB", "0"), ("MAX_CONCURRENT_REQUESTS", "8")],
    ));
    let doc = s.get("/openapi.json").json();
    let schema = resolve(
        &doc,
        &doc["paths"]["/generate"]["post"]["requestBody"]["content"]["application/json"]["schema"],
    );
    let props = schema["properties"].as_object().expect("properties");
    let required: Vec<&str> = schema["required"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(schema["additionalProperties"], false);
    // Small and seeded, so two answers can be compared image for image.
    let base = json!({"prompt": "x", "steps": 1, "width": 256, "height": 256, "seed": 7});
    let send = |field: &str, value: serde_json::Value| {
        let mut body = base.clone();
        body[field] = value;
        s.post_json(&body)
    };
    let same = |a: &common::Resp, b: &common::Resp, what: &str| {
        let (mut a, mut b) = (a.json(), b.json());
        for j in [&mut a, &mut b] {
            j["metadata"]
                .as_object_mut()
                .unwrap()
                .remove("generation_time_seconds");
        }
        assert_eq!(a, b, "{what}");
    };
    for (name, prop) in props {
        let target = resolve(&doc, prop);
        let is_required = required.contains(&name.as_str());
        // null: the default for every optional field, a 422 for a required one.
        assert_eq!(
            nullable(prop),
            !is_required,
            "{name}: nullable in the document"
        );
        let r = send(name, serde_json::Value::Null);
        if is_required {
            assert_eq!(r.broken_fields(), [name.as_str()], "{name}: null");
        } else {
            assert_eq!(r.status, 200, "{name}: null: {}", r.text());
            let mut absent = base.clone();
            absent.as_object_mut().unwrap().remove(name);
            let a = s.post_json(&absent);
            if name != "seed" {
                same(&r, &a, &format!("{name}: null and absent"));
            }
        }
        // The documented default is what an absent field gets.
        if let Some(default) = prop.get("default") {
            let mut absent = base.clone();
            absent.as_object_mut().unwrap().remove(name);
            same(
                &send(name, default.clone()),
                &s.post_json(&absent),
                &format!("{name}: default {default}"),
            );
        }
        // Bounds: the edges pass, one past them is a 422 naming the field.
        let is_int = target["type"] == "integer"
            || target["type"]
                .as_array()
                .is_some_and(|t| t.iter().any(|t| t == "integer"));
        let step = if is_int { 1.0 } else { 0.01 };
        for (key, edge, sign) in [("minimum", "min", -1.0), ("maximum", "max", 1.0)] {
            let Some(bound) = target[key].as_f64() else {
                continue;
            };
            let (ok, bad) = if is_int {
                (json!(bound as u64), json!(bound as i64 + sign as i64))
            } else {
                (json!(bound), json!(bound + sign * step))
            };
            let r = send(name, ok.clone());
            assert_eq!(r.status, 200, "{name}: {edge} {ok}: {}", r.text());
            assert_eq!(
                send(name, bad.clone()).broken_fields(),
                [name.as_str()],
                "{name}: {bad}"
            );
        }
        if let Some(m) = target["multipleOf"].as_u64() {
            let off = target["minimum"].as_u64().unwrap_or(0) + m + m / 2;
            assert_eq!(
                send(name, json!(off)).broken_fields(),
                [name.as_str()],
                "{name}: {off}"
            );
        }
        if let Some(max) = target["maxLength"].as_u64() {
            let r = send(name, json!("a".repeat(max as usize)));
            assert_eq!(r.status, 200, "{name}: maxLength: {}", r.text());
            let long = json!("a".repeat(max as usize + 1));
            assert_eq!(send(name, long).broken_fields(), [name.as_str()], "{name}");
        }
        if target["minLength"].as_u64() == Some(1) {
            assert_eq!(
                send(name, json!("")).broken_fields(),
                [name.as_str()],
                "{name}"
            );
        }
        if let Some(values) = target["enum"].as_array() {
            for v in values {
                let r = send(name, v.clone());
                assert_eq!(r.status, 200, "{name}: {v}: {}", r.text());
            }
            let r = send(name, json!("not-one-of-them"));
            assert_eq!(r.broken_fields(), [name.as_str()], "{name}");
        }
    }
    // Every property is checked, and nothing else is allowed: a body breaking all of them at
    // once (a JSON object fits no property's type) names exactly the document's properties.
    let mut all = serde_json::Map::new();
    for name in props.keys() {
        all.insert(name.clone(), json!({"wrong": "type"}));
    }
    all.insert("not_in_the_document".into(), json!(1));
    let mut broken = s.post_json(&serde_json::Value::Object(all)).broken_fields();
    broken.sort();
    let mut want: Vec<String> = props.keys().cloned().collect();
    want.push("not_in_the_document".into());
    want.sort();
    assert_eq!(broken, want);
}
