//! The engine's timing behaviour: timeouts free the worker, bursts get 429, the response
//! cache, client disconnects cancel running and queued work.

use super::*;

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
fn a_cache_hit_is_byte_identical_and_holds_each_image_once() {
    let s = ready(fake("step_ms=0"));
    let post = |body: &serde_json::Value| {
        s.request(
            "POST",
            "/generate",
            &[("Content-Type", "application/json")],
            body.to_string().as_bytes(),
        )
    };
    let mut held = 0.0;
    for batch in [1, 2] {
        let body = json!({"prompt": "twice", "steps": 2, "width": 256, "height": 256, "seed": 11, "batch_size": batch});
        let miss = post(&body);
        assert_eq!((miss.status, miss.header("x-cache")), (200, Some("miss")));
        let hit = post(&body);
        assert_eq!((hit.status, hit.header("x-cache")), (200, Some("hit")));
        assert!(
            miss.body == hit.body,
            "batch {batch}: hit differs from miss"
        );
        let j = miss.json();
        let images = j["images"].as_array().unwrap();
        assert_eq!(images.len(), batch);
        assert_eq!(images[0], j["image_base64"]);
        // The entry costs the body less the first image's second copy, plus its key (short).
        let first = j["image_base64"].as_str().unwrap().len() as f64;
        let entry = s.metric("sdserve_cache_bytes") - held;
        let once = miss.body.len() as f64 - first;
        assert!(
            entry >= once && entry < once + 1024.0,
            "batch {batch}: entry {entry} B, body {} B, first image {first} B",
            miss.body.len()
        );
        held += entry;
    }
    // The dialects built on the same cache answer a hit as they answered the miss.
    let a1111 = json!({"prompt": "twice", "steps": 2, "width": 256, "height": 256, "seed": 12, "batch_size": 2});
    let send = |path: &str, body: &serde_json::Value| {
        s.request(
            "POST",
            path,
            &[("Content-Type", "application/json")],
            body.to_string().as_bytes(),
        )
    };
    let (miss, hit) = (
        send("/sdapi/v1/txt2img", &a1111),
        send("/sdapi/v1/txt2img", &a1111),
    );
    assert_eq!((miss.status, hit.status), (200, 200), "{}", miss.text());
    // Equal but for `info`'s job_timestamp: each answer's own time (A1111's, to the second),
    // which differs where the two straddle a second.
    let without_timestamp = |r: &common::Resp| {
        let mut j = r.json();
        let mut info: serde_json::Value =
            serde_json::from_str(j["info"].as_str().expect("info is a JSON string")).unwrap();
        assert!(info["job_timestamp"].is_string(), "{info}");
        info["job_timestamp"] = json!(null);
        j["info"] = info;
        j
    };
    assert_eq!(without_timestamp(&miss), without_timestamp(&hit));
    let openai = json!({"prompt": "twice", "n": 2, "size": "256x256", "seed": 13, "steps": 2, "response_format": "b64_json"});
    let (miss, hit) = (
        send("/v1/images/generations", &openai),
        send("/v1/images/generations", &openai),
    );
    assert_eq!((miss.status, hit.status), (200, 200), "{}", miss.text());
    assert_eq!(miss.json()["data"], hit.json()["data"]);
    assert_eq!(miss.json()["data"].as_array().map(Vec::len), Some(2));
    assert_eq!(s.metric("sdserve_cache_hits_total"), 4.0);
}
