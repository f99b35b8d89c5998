//! A1111's `unload-checkpoint` / `reload-checkpoint` over real HTTP on the tiny model: the
//! worker really lets go of the model (its weight files leave the process's memory map),
//! `/health` says so, a job after the unload loads it again first (its `loading` event) and
//! makes the same image as before, a reload loads it with no job, and an unload asked during
//! a running job waits for that job, which ends as it would have. With QUEUE_URL, an API
//! replica (no worker) answers a clear 503.

use crate::common;

use std::time::{Duration, Instant};

use common::cluster::{follow, start_replica, Redis};
use common::{post_json_to, tiny_b, tiny_server, Server};
use serde_json::{json, Value};

/// Lines of the process's memory map backed by a file of the tiny model's folder: the
/// weights the loader keeps mapped (f32 CPU weights stay in their file mapping).
fn mapped_model_files(pid: u32) -> usize {
    let dir = std::fs::canonicalize(tiny_b()).unwrap();
    let dir = dir.to_string_lossy();
    std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .unwrap()
        .lines()
        .filter(|l| l.contains(dir.as_ref()))
        .count()
}

fn rss_kb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn post(s: &Server, path: &str) -> common::Resp {
    post_json_to(s.addr, path, &json!({}))
}

fn health(s: &Server) -> Value {
    let h = s.get("/health");
    assert_eq!(h.status, 200, "{}", h.text());
    h.json()
}

/// Runs `body` as a job: its events (by name) and its first image.
fn job(s: &Server, body: &Value) -> (Vec<String>, String) {
    let r = post_json_to(s.addr, "/jobs", body);
    assert_eq!(r.status, 202, "{}", r.text());
    let id = r.json()["id"].as_str().unwrap().to_string();
    let events = follow(s.addr, &id);
    let names: Vec<String> = events.iter().map(|(n, _)| n.clone()).collect();
    let (last, data) = events.last().expect("no events");
    assert_eq!(last, "succeeded", "{events:?}");
    let image = data["result"]["image_base64"].as_str().unwrap().to_string();
    (names, image)
}

fn request(seed: u64) -> Value {
    json!({"prompt": "a lighthouse", "steps": 4, "width": 256, "height": 256, "seed": seed})
}

#[test]
fn unload_frees_the_model_and_the_next_job_or_a_reload_loads_it_again() {
    let s = tiny_server("unload", &[("RESPONSE_CACHE_MB", "0")]);
    let pid = s.pid();
    let h = health(&s);
    assert_eq!(h["status"], "ok");
    assert_eq!(h["loaded_model"]["name"], "tiny-b", "{h}");
    assert!(h["detail"].is_null(), "{h}");
    let (events, before) = job(&s, &request(7));
    assert!(!events.contains(&"loading".to_string()), "{events:?}");
    let mapped = mapped_model_files(pid);
    assert!(mapped > 0, "the loaded model maps no file of its folder");
    let rss_loaded = rss_kb(pid);

    let r = post(&s, "/sdapi/v1/unload-checkpoint");
    assert_eq!((r.status, r.json()), (200, json!({})));
    assert_eq!(
        mapped_model_files(pid),
        0,
        "weights still mapped after unload"
    );
    let h = health(&s);
    assert_eq!(h["status"], "ok", "jobs are still taken: {h}");
    assert!(h["loaded_model"].is_null(), "{h}");
    assert!(h["detail"].as_str().unwrap().contains("unloaded"), "{h}");
    assert_eq!(s.get("/models").json()["loaded"], Value::Null);
    let rss_unloaded = rss_kb(pid);
    eprintln!("RSS loaded {rss_loaded} kB, unloaded {rss_unloaded} kB ({mapped} model mappings before, 0 after)");
    // A second unload has nothing to do.
    assert_eq!(post(&s, "/sdapi/v1/unload-checkpoint").status, 200);

    // The next job loads the model first (a load, logged; its `loading` event may come before
    // the event stream is open), and makes the same image.
    // The server logs a load before it answers, but the test reads its log through a pipe:
    // under load the line may not have reached `logs()` yet, so a count waits up to 10 s to
    // reach what is expected (a count past it fails at once).
    let loads_reach = |want: usize| {
        let t = std::time::Instant::now();
        loop {
            let n = s
                .logs()
                .iter()
                .filter(|l| l.contains("\"model loaded\""))
                .count();
            if n >= want || t.elapsed() > std::time::Duration::from_secs(10) {
                return n;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    };
    let (_, after) = job(&s, &request(7));
    assert_eq!(
        loads_reach(1),
        1,
        "the job after the unload did not load the model"
    );
    assert_eq!(after, before, "the reloaded model made another image");
    let h = health(&s);
    assert_eq!(h["loaded_model"]["name"], "tiny-b", "{h}");
    assert!(h["detail"].is_null(), "{h}");
    assert!(mapped_model_files(pid) > 0);

    // reload-checkpoint loads it with no job; a job after it has nothing to load.
    assert_eq!(post(&s, "/sdapi/v1/unload-checkpoint").status, 200);
    assert!(health(&s)["loaded_model"].is_null());
    let r = post(&s, "/sdapi/v1/reload-checkpoint");
    assert_eq!((r.status, r.json()), (200, json!({})));
    assert_eq!(health(&s)["loaded_model"]["name"], "tiny-b");
    assert!(mapped_model_files(pid) > 0);
    assert_eq!(loads_reach(2), 2);
    let (events, again) = job(&s, &request(7));
    assert!(!events.contains(&"loading".to_string()), "{events:?}");
    assert_eq!(
        loads_reach(2),
        2,
        "the job after the reload loaded the model again"
    );
    assert_eq!(again, before);
    // A reload of the held model has nothing to do.
    assert_eq!(post(&s, "/sdapi/v1/reload-checkpoint").status, 200);
}

#[test]
fn an_unload_during_a_running_job_waits_for_it_and_the_job_ends_as_it_would_have() {
    let s = tiny_server("unload-running", &[("RESPONSE_CACHE_MB", "0")]);
    let slow =
        json!({"prompt": "a lighthouse", "steps": 50, "width": 256, "height": 256, "seed": 3});
    let reference = post_json_to(s.addr, "/generate", &slow);
    assert_eq!(reference.status, 200);
    let reference = reference.json()["image_base64"]
        .as_str()
        .unwrap()
        .to_string();

    let r = post_json_to(s.addr, "/jobs", &slow);
    let id = r.json()["id"].as_str().unwrap().to_string();
    let t = Instant::now();
    loop {
        let j = s.get(&format!("/jobs/{id}")).json();
        let step = j["progress"]["step"].as_u64().unwrap_or(0);
        if j["status"] == "running" && step >= 1 {
            assert!(
                step < 45,
                "the job nearly ended before the unload was asked: {j}"
            );
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(60), "never ran: {j}");
        std::thread::sleep(Duration::from_millis(5));
    }
    let r = post(&s, "/sdapi/v1/unload-checkpoint");
    assert_eq!(r.status, 200, "{}", r.text());
    // Answered only once the job was over: it ran to its end with the model it started on.
    let j = s.get(&format!("/jobs/{id}")).json();
    assert_eq!(j["status"], "succeeded", "{j}");
    assert_eq!(j["progress"]["step"], j["progress"]["total"], "{j}");
    assert_eq!(j["result"]["image_base64"].as_str().unwrap(), reference);
    assert!(health(&s)["loaded_model"].is_null());
}

#[test]
fn an_api_replica_has_no_model_to_unload() {
    let Some(redis) = Redis::start("unload") else {
        return;
    };
    let api = start_replica(&redis, "api", "step_ms=1", &[]);
    let worker = start_replica(&redis, "all", "step_ms=1", &[]);
    for s in [&api, &worker] {
        s.wait_ready(Duration::from_secs(30));
    }
    for route in ["/sdapi/v1/unload-checkpoint", "/sdapi/v1/reload-checkpoint"] {
        let r = post(&api, route);
        let e = r.error(503, "model_unavailable");
        assert!(e["error"].as_str().is_some(), "{e}");
        assert!(r.text().contains("--role api"), "{}", r.text());
    }
    // A worker replica unloads its own model; a job it takes loads the fake again.
    assert_eq!(post(&worker, "/sdapi/v1/unload-checkpoint").status, 200);
    assert!(health(&worker)["loaded_model"].is_null());
    let r = post_json_to(worker.addr, "/generate", &request(1));
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(!health(&worker)["loaded_model"].is_null());
}
