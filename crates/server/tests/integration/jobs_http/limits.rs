//! Limits and deadlines: the queue limit, 404 for unknown and expired jobs, JOB_RESULTS_MB,
//! deadlines of running and queued jobs, the speed probe giving way to jobs.

use super::*;

#[test]
fn queue_limit_counts_every_route_unknown_ids_are_404_and_finished_jobs_expire() {
    let s = ready(
        "step_ms=100",
        &[("MAX_QUEUED_JOBS", "2"), ("JOB_TTL_SECONDS", "1")],
    );
    for (method, path) in [
        ("GET", "/jobs/nope"),
        ("DELETE", "/jobs/nope"),
        ("GET", "/jobs/nope/events"),
    ] {
        s.request(method, path, &[], b"")
            .error(404, "job_not_found");
    }
    let a = submit(
        &s,
        &json!({"prompt": "a", "steps": 40, "width": 256, "height": 256}),
    );
    let a_id = a["id"].as_str().unwrap().to_string();
    wait_status(&s, &a_id, &["running"], Duration::from_secs(5));
    // One waiting /generate client and one queued job fill the queue of two.
    let _waiting = send_only(
        s.addr,
        &json!({"prompt": "g", "steps": 2, "width": 256, "height": 256}),
    );
    let t = Instant::now();
    while s.get("/health").json()["queue"]["waiting"] != 1 {
        assert!(t.elapsed() < Duration::from_secs(5));
        std::thread::sleep(Duration::from_millis(5));
    }
    let b = submit(
        &s,
        &json!({"prompt": "b", "steps": 2, "width": 256, "height": 256}),
    );
    assert_eq!(b["position"], 2);
    let r = s.request(
        "POST",
        "/jobs",
        &[("Content-Type", "application/json")],
        json!({"prompt": "c"}).to_string().as_bytes(),
    );
    r.error(429, "overloaded");
    assert!(r.header("retry-after").is_some());
    // GET /jobs: the running one, then the queue in order.
    let list = s.get("/jobs").json();
    let statuses: Vec<&str> = list["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses, ["running", "queued", "queued"], "{list}");
    assert_eq!(list["jobs"][0]["id"], a_id.as_str());
    assert_eq!(list["jobs"][2]["id"], b["id"]);
    // Cancel the running one; the rest run; then every finished job expires after the TTL.
    s.request("DELETE", &format!("/jobs/{a_id}"), &[], b"");
    let bj = wait_status(
        &s,
        b["id"].as_str().unwrap(),
        &["succeeded"],
        Duration::from_secs(5),
    );
    assert_eq!(bj["status"], "succeeded");
    let t = Instant::now();
    while s.get(&format!("/jobs/{a_id}")).status == 200 {
        assert!(t.elapsed() < Duration::from_secs(5), "never expired");
        std::thread::sleep(Duration::from_millis(50));
    }
    s.get(&format!("/jobs/{a_id}")).error(404, "job_not_found");
    let t = Instant::now();
    while !s.get("/jobs").json()["jobs"].as_array().unwrap().is_empty() {
        assert!(t.elapsed() < Duration::from_secs(5), "never expired");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn finished_jobs_past_job_results_mb_are_dropped_oldest_first_and_answer_404() {
    let s = ready("step_ms=0", &[("JOB_RESULTS_MB", "1")]);
    let body = json!({"prompt": "kept", "steps": 1, "width": 768, "height": 768, "seed": 5});
    let run = || {
        let id = submit(&s, &body)["id"].as_str().unwrap().to_string();
        let j = wait_status(&s, &id, &["succeeded"], Duration::from_secs(30));
        let b64 = j["result"]["image_base64"].as_str().unwrap().len();
        (id, b64)
    };
    let (first, b64) = run();
    // The same request each time: a record counts its image once (image_base64 and images[0]
    // share it) plus, roughly, the rest it holds (request, metadata, the record and its event
    // buffer: tens of KB; the engine's unit test checks the count itself).
    let most = (1 << 20) / b64;
    let least = (1 << 20) / (b64 + (64 << 10));
    let mut ids = vec![first.clone()];
    while s.get(&format!("/jobs/{first}")).status == 200 {
        assert!(
            ids.len() <= most + 1,
            "{} jobs of {b64} bytes kept",
            ids.len()
        );
        ids.push(run().0);
    }
    // As many as fit in the budget (or one less): dropped before the TTL, oldest first.
    assert!(
        ids.len() >= least,
        "dropped after {} jobs, at least {least} fit",
        ids.len()
    );
    s.get(&format!("/jobs/{first}")).error(404, "job_not_found");
    assert_eq!(job(&s, &ids[1])["status"], "succeeded");
    let listed = s.get("/jobs").json()["jobs"].as_array().unwrap().len();
    assert_eq!(listed, ids.len() - 1);
    assert_eq!(s.metric("sdserve_jobs_evicted_total"), 1.0);
    s.wait_log(&["JOB_RESULTS_MB", &first], Duration::from_secs(5));
}

#[test]
fn a_job_past_its_deadline_fails_with_timeout() {
    let s = ready("step_ms=50", &[("JOB_TIMEOUT_SECONDS", "1")]);
    let a = submit(
        &s,
        &json!({"prompt": "slow", "steps": 50, "width": 256, "height": 256}),
    );
    let id = a["id"].as_str().unwrap();
    let events = Events::open(s.addr, id).all();
    assert_one_terminal_last(&events, "failed");
    assert_eq!(events.last().unwrap().1["error"]["error_code"], "timeout");
    let j = job(&s, id);
    assert_eq!(j["status"], "failed");
    assert_eq!(j["error"]["error_code"], "timeout");
    // The details name the setting to raise: this job's, not /generate's.
    let details = j["error"]["details"].as_str().unwrap();
    assert!(details.contains("JOB_TIMEOUT_SECONDS=1;"), "{details}");
    assert!(!details.contains("GENERATION_TIMEOUT"), "{details}");
    assert!(j["progress"]["step"].as_u64().unwrap() < 50);
}

#[test]
fn a_queued_job_past_its_deadline_fails_without_starting() {
    let s = ready(
        "step_ms=50",
        &[
            ("JOB_TIMEOUT_SECONDS", "1"),
            ("GENERATION_TIMEOUT_SECONDS", "10"),
        ],
    );
    // A 2.5 s /generate run holds the worker past the 1 s deadline of the job queued behind it.
    let _long = send_only(
        s.addr,
        &json!({"prompt": "x", "steps": 50, "width": 256, "height": 256}),
    );
    let t = Instant::now();
    while s.get("/health").json()["queue"]["running"] != 1 {
        assert!(t.elapsed() < Duration::from_secs(5));
        std::thread::sleep(Duration::from_millis(5));
    }
    let late = submit(
        &s,
        &json!({"prompt": "y", "steps": 2, "width": 256, "height": 256}),
    );
    let id = late["id"].as_str().unwrap();
    let events = Events::open(s.addr, id).all();
    assert_eq!(names(&events), ["state", "failed"]);
    let lj = job(&s, id);
    assert_eq!(lj["status"], "failed");
    assert_eq!(lj["error"]["error_code"], "timeout");
    assert!(lj["started_at"].is_null());
    assert_eq!(s.get("/health").json()["queue"]["running"], 1);
}

/// The CPU speed probe is off the readiness path: /health is 200 before it has run, a job sent
/// at once runs at once, a job sent while it runs waits one of its steps at most, and it runs
/// again once the worker is idle; then a 408 for a request that never started says how long
/// the request needs at the measured speed.
#[test]
fn the_speed_probe_waits_for_an_idle_worker_and_gives_way_to_jobs() {
    const STEP: Duration = Duration::from_secs(3);
    let s = ready(
        "step_ms=3000,speed_probe=1",
        &[("GENERATION_TIMEOUT_SECONDS", "2")],
    );
    // Ready, though the probe (after 3 s of idleness, 2 steps of 3 s) cannot have finished.
    assert_eq!(s.get("/health").json()["status"], "ok");
    assert!(!s.logs().iter().any(|l| l.contains("CPU speed")));
    let queue_wait = |j: &Value| {
        let at = |k: &str| humantime::parse_rfc3339(j[k].as_str().unwrap()).unwrap();
        at("started_at").duration_since(at("created_at")).unwrap()
    };
    let one_step = json!({"prompt": "x", "steps": 1, "width": 256, "height": 256});
    let first = submit(&s, &one_step);
    let first = wait_status(
        &s,
        first["id"].as_str().unwrap(),
        &["succeeded"],
        Duration::from_secs(30),
    );
    // It waited for no probe step (the probe had not started): less than one such step.
    assert!(queue_wait(&first) < STEP, "{first}");

    // Idle: the probe starts; a job sent now waits for the probe's current step, no more.
    s.wait_log(&["CPU speed probe: running"], Duration::from_secs(30));
    let second = submit(&s, &one_step);
    let second = wait_status(
        &s,
        second["id"].as_str().unwrap(),
        &["succeeded"],
        Duration::from_secs(30),
    );
    assert!(
        queue_wait(&second) < STEP + Duration::from_secs(1),
        "{second}"
    );
    s.wait_log(&["the probe stopped and gave way"], Duration::ZERO);

    // Idle again: the probe runs to its end and logs what fits the deadlines.
    let line = s.wait_log(
        &["CPU speed: a step at 256x256 takes", "step_seconds"],
        Duration::from_secs(60),
    );
    let logged: Value = serde_json::from_str(&line).unwrap();
    assert!(logged["step_seconds"].as_f64().unwrap() >= 3.0, "{line}");
    assert!(
        line.contains("GENERATION_TIMEOUT_SECONDS=2 a lone request may be 256x256: none"),
        "{line}"
    );

    // A /generate that times out in the queue behind a job: its 408 uses the measured speed
    // (about one 3 s step plus the decode for one step at 256x256).
    let _busy = submit(
        &s,
        &json!({"prompt": "busy", "steps": 2, "width": 256, "height": 256}),
    );
    let e = s.post_json(&one_step).error(408, "timeout");
    let details = e["details"].as_str().unwrap();
    assert!(
        details.contains("before its first step ended")
            && details.contains("At the speed measured on this machine it needs about"),
        "{e}"
    );
}
