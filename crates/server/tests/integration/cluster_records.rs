//! Job records in a real `redis-server` (QUEUE_URL), with the fake generator: a record that
//! leaves Redis (expired, evicted, deleted) while its job waits or runs never comes back
//! without a TTL, and the job's clients (an event stream, a waiting `/generate`) hear a clear
//! end instead of waiting forever.
//!
//! Each test starts its own redis-server on a free port; without one it skips loudly, unless
//! SDSERVE_REQUIRE_REDIS=1 (as `.ci/run` sets).

use crate::common;

use std::time::{Duration, Instant};

use common::cluster::{follow, job, start_replica, submit_ok, wait_end, wait_workers, Redis};
use common::Server;
use serde_json::{json, Value};

fn request(steps: u64) -> Value {
    json!({"prompt": "a record", "steps": steps, "width": 256, "height": 256, "seed": 3})
}

fn wait_running(api: &Server, id: &str, step: u64) {
    let t = Instant::now();
    loop {
        let j = job(api, id);
        if j["status"] == "running" && j["progress"]["step"].as_u64().unwrap_or(0) >= step {
            return;
        }
        assert!(t.elapsed() < Duration::from_secs(60), "never ran: {j}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// For `within`, the record key is either absent or has a TTL: `PTTL` is never -1.
fn never_without_ttl(redis: &Redis, id: &str, within: Duration) {
    let key = format!("sdserve:job:{id}");
    let t = Instant::now();
    while t.elapsed() < within {
        let pttl: i64 = redis.cli(&["PTTL", &key]).parse().unwrap();
        assert_ne!(pttl, -1, "{key} came back without a TTL");
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// The last event of a stream that must end with `failed` `queue_unavailable`.
fn ends_record_gone(events: &[(String, Value)]) {
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    let (last, data) = events.last().expect("no events");
    assert_eq!(last, "failed", "{names:?}");
    assert_eq!(data["error"]["error_code"], "queue_unavailable", "{data}");
    assert!(
        data["error"]["details"]
            .as_str()
            .is_some_and(|d| d.contains("record is gone")),
        "{data}"
    );
}

#[test]
fn a_record_that_leaves_redis_never_comes_back_without_a_ttl() {
    let Some(redis) = Redis::start("a_record_that_leaves_redis_never_comes_back_without_a_ttl")
    else {
        return;
    };
    // 200 ms a step: a 50-step job runs 10 s, long enough to lose its record mid-run.
    let worker = start_replica(&redis, "worker", "step_ms=200", &[]);
    let api = start_replica(&redis, "api", "step_ms=200", &[]);
    wait_workers(&api, 1);

    // 1. A running job's record deleted: the worker stops writing (no record without a TTL),
    //    its event stream ends `failed` `queue_unavailable`, GET answers 404.
    let running = submit_ok(&api, &request(50));
    wait_running(&api, &running, 2);
    let follower = {
        let (addr, id) = (api.addr, running.clone());
        std::thread::spawn(move || follow(addr, &id))
    };
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(redis.cli(&["DEL", &format!("sdserve:job:{running}")]), "1");
    never_without_ttl(&redis, &running, Duration::from_secs(2));
    ends_record_gone(&follower.join().unwrap());
    api.get(&format!("/jobs/{running}"))
        .error(404, "job_not_found");
    worker.wait_log(&["record is gone", &running], Duration::from_secs(10));

    // 2. A waiting `/generate` client whose running job's record expires: a clear 503.
    let waiting = {
        let addr = api.addr;
        std::thread::spawn(move || {
            common::request(
                addr,
                "POST",
                "/generate",
                &[("Content-Type", "application/json")],
                request(50).to_string().as_bytes(),
            )
        })
    };
    let t = Instant::now();
    let generating = loop {
        let jobs = api.get("/jobs").json();
        if let Some(j) = jobs["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|j| j["status"] == "running" && j["progress"]["step"].as_u64() >= Some(2))
        {
            break j["id"].as_str().unwrap().to_string();
        }
        assert!(t.elapsed() < Duration::from_secs(60), "no running job");
        std::thread::sleep(Duration::from_millis(10));
    };
    redis.cli(&["PEXPIRE", &format!("sdserve:job:{generating}"), "1"]);
    never_without_ttl(&redis, &generating, Duration::from_secs(2));
    let r = waiting.join().unwrap();
    let e = r.error(503, "queue_unavailable");
    assert!(
        e["details"].as_str().unwrap().contains("record is gone"),
        "{e}"
    );

    // 3. A queued job's record deleted: its stream ends at once; when the worker reaches it,
    //    it writes nothing back.
    let first = submit_ok(&api, &request(30));
    wait_running(&api, &first, 1);
    let queued = submit_ok(&api, &request(3));
    assert_eq!(job(&api, &queued)["status"], "queued");
    let follower = {
        let (addr, id) = (api.addr, queued.clone());
        std::thread::spawn(move || follow(addr, &id))
    };
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(redis.cli(&["DEL", &format!("sdserve:job:{queued}")]), "1");
    ends_record_gone(&follower.join().unwrap());
    let j = wait_end(&api, &first, Duration::from_secs(30));
    assert_eq!(j["status"], "succeeded", "{j}");
    never_without_ttl(&redis, &queued, Duration::from_secs(1));
    assert_eq!(
        redis.cli(&["EXISTS", &format!("sdserve:job:{queued}")]),
        "0"
    );

    // The worker is free again and every finished record carries a TTL.
    let last = submit_ok(&api, &request(2));
    let j = wait_end(&api, &last, Duration::from_secs(30));
    assert_eq!(j["status"], "succeeded", "{j}");
    for id in [&first, &last] {
        let pttl: i64 = redis
            .cli(&["PTTL", &format!("sdserve:job:{id}")])
            .parse()
            .unwrap();
        assert!(pttl > 0, "{id}: PTTL {pttl}");
    }
}

/// Waits (10 s at most) for a /health whose workers' states (sorted) pass `until`, and
/// answers it.
fn wait_health(api: &Server, until: impl Fn(&[&str]) -> bool) -> Value {
    let t = Instant::now();
    loop {
        let h = api.get("/health").json();
        let mut states: Vec<&str> = h["workers"]
            .as_array()
            .map(|w| {
                w.iter()
                    .map(|w| w["state"].as_str().unwrap_or(""))
                    .collect()
            })
            .unwrap_or_default();
        states.sort();
        if until(&states) {
            return h;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "{h}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_stuck_worker_stops_renewing_and_its_job_fails_with_timeout() {
    let Some(redis) = Redis::start("a_stuck_worker_stops_renewing_and_its_job_fails_with_timeout")
    else {
        return;
    };
    // Every run hangs before its second step's hook for 20 s, deaf to cancellation, like a
    // device call that never returns; jobs from this API have a 2 s deadline.
    let stuck = start_replica(
        &redis,
        "worker",
        "step_ms=50,hang_at_step=2,hang_ms=20000",
        &[],
    );
    let api = start_replica(&redis, "api", "", &[("JOB_TIMEOUT_SECONDS", "2")]);
    wait_workers(&api, 1);
    let id = submit_ok(&api, &request(10));
    let follower = {
        let (addr, id) = (api.addr, id.clone());
        std::thread::spawn(move || follow(addr, &id))
    };
    stuck.wait_log(&["fake generator: hanging"], Duration::from_secs(30));
    // It ends well before the hang does: `failed` `timeout`, after its deadline, with the
    // step it reached; the stream ends the same way.
    let j = wait_end(&api, &id, Duration::from_secs(30));
    assert!(
        !stuck.logs().iter().any(|l| l.contains("the hang is over")),
        "the job ended only when the hang did: {j}"
    );
    assert_eq!(j["status"], "failed", "{j}");
    assert_eq!(j["error"]["error_code"], "timeout", "{j}");
    assert!(
        j["error"]["details"]
            .as_str()
            .is_some_and(|d| d.contains("at step 1 of 10")),
        "{j}"
    );
    let events = follower.join().unwrap();
    let (last, data) = events.last().unwrap();
    assert_eq!(last, "failed", "{events:?}");
    assert_eq!(data["error"]["error_code"], "timeout", "{data}");
    stuck.wait_log(&["generation is stuck", &id], Duration::from_secs(10));
    // /health names the worker stuck while the hang lasts, and says `degraded` (200): no
    // worker can take a job.
    let h = wait_health(&api, |s| s == ["stuck"]);
    assert_eq!(h["status"], "degraded", "{h}");
    assert!(
        h["detail"]
            .as_str()
            .is_some_and(|d| d.contains("every worker is stuck")),
        "{h}"
    );
    assert_eq!(api.get("/health").status, 200);

    // A healthy worker takes the next job; the stuck one takes none while it hangs.
    let healthy = start_replica(&redis, "worker", "step_ms=10", &[]);
    let next = submit_ok(&api, &request(3));
    let j = wait_end(&api, &next, Duration::from_secs(30));
    assert_eq!(j["status"], "succeeded", "{j}");
    healthy.wait_log(&["job started", &next], Duration::from_secs(10));
    assert!(!stuck
        .logs()
        .iter()
        .any(|l| l.contains("job started") && l.contains(&next)));
    // With a worker that is not stuck, /health is `ok` again.
    let h = wait_health(&api, |s| s.contains(&"ready"));
    assert_eq!(h["status"], "ok", "{h}");

    // When the hang ends, its late outcome changes nothing and the worker takes jobs again.
    stuck.wait_log(&["taking jobs again"], Duration::from_secs(60));
    assert_eq!(job(&api, &id)["error"]["error_code"], "timeout");
    let h = wait_health(&api, |s| s == ["ready", "ready"]);
    assert_eq!(h["status"], "ok", "{h}");
}

/// STUCK_EXIT_SECONDS counts from when the worker gave the job up (two leases past its
/// deadline), not from the in-process engine's later mark (four leases): the process exits 70
/// before that mark is ever logged.
#[test]
fn a_stuck_worker_exits_70_stuck_exit_seconds_after_giving_the_job_up() {
    let Some(redis) =
        Redis::start("a_stuck_worker_exits_70_stuck_exit_seconds_after_giving_the_job_up")
    else {
        return;
    };
    let mut stuck = start_replica(
        &redis,
        "worker",
        "step_ms=50,hang_at_step=2,hang_ms=600000",
        &[("STUCK_EXIT_SECONDS", "1"), ("SHUTDOWN_GRACE_SECONDS", "1")],
    );
    let api = start_replica(&redis, "api", "", &[("JOB_TIMEOUT_SECONDS", "2")]);
    wait_workers(&api, 1);
    let id = submit_ok(&api, &request(10));
    // Deadline 2 s, given up 4 s (two 2 s leases) later; the exit decision follows 1 s on,
    // while the in-process engine's own mark comes only 4 s after the give-up.
    stuck.wait_log(&["generation is stuck", &id], Duration::from_secs(30));
    let status = stuck.wait_exit(Duration::from_secs(30));
    assert_eq!(status.code(), Some(70), "{:?}", stuck.logs());
    let logs = stuck.logs();
    let line = |needle: &str| logs.iter().position(|l| l.contains(needle));
    let exit = line("has not returned within STUCK_EXIT_SECONDS").expect("no exit line");
    // (The drain may outlast that mark; the decision to exit must come first.)
    assert!(
        line("deadline by the grace").is_none_or(|mark| exit < mark),
        "the exit waited for the in-process engine's own stuck mark: {logs:?}"
    );
    let j = wait_end(&api, &id, Duration::from_secs(10));
    assert_eq!(j["error"]["error_code"], "timeout", "{j}");
}

#[test]
fn an_api_replica_whose_workers_are_gone_says_degraded_until_one_comes() {
    let Some(redis) =
        Redis::start("an_api_replica_whose_workers_are_gone_says_degraded_until_one_comes")
    else {
        return;
    };
    let worker = start_replica(&redis, "worker", "step_ms=10", &[]);
    let api = start_replica(&redis, "api", "", &[]);
    wait_workers(&api, 1);
    assert_eq!(api.get("/health").json()["status"], "ok");
    // The only worker goes: once its heartbeat is stale, the replica can queue jobs but none
    // will run. Still ready (200), but `degraded`, saying why.
    drop(worker);
    let h = wait_health(&api, |s| s.is_empty());
    assert_eq!(h["status"], "degraded", "{h}");
    assert!(
        h["detail"]
            .as_str()
            .is_some_and(|d| d.contains("no worker")),
        "{h}"
    );
    assert_eq!(api.get("/health").status, 200);
    // A worker comes back: `ok`.
    let _worker = start_replica(&redis, "worker", "step_ms=10", &[]);
    let h = wait_health(&api, |s| s == ["ready"]);
    assert_eq!(h["status"], "ok", "{h}");
    assert!(h["detail"].is_null(), "{h}");
}

/// `calls` of one command in Redis's INFO commandstats.
fn calls(redis: &Redis, command: &str) -> u64 {
    let stats = redis.cli(&["INFO", "commandstats"]);
    stats
        .lines()
        .find_map(|l| l.strip_prefix(&format!("cmdstat_{command}:calls=")))
        .and_then(|rest| rest.split(',').next())
        .map_or(0, |n| n.parse().unwrap())
}

#[test]
fn listing_jobs_reads_them_in_one_round_trip_with_the_same_answers() {
    let Some(redis) =
        Redis::start("listing_jobs_reads_them_in_one_round_trip_with_the_same_answers")
    else {
        return;
    };
    let _worker = start_replica(&redis, "worker", "step_ms=100", &[]);
    let api = start_replica(&redis, "api", "", &[]);
    wait_workers(&api, 1);
    // 60 finished jobs, then one running and three waiting.
    let done: Vec<String> = (0..60).map(|_| submit_ok(&api, &request(1))).collect();
    for id in &done {
        let j = wait_end(&api, id, Duration::from_secs(30));
        assert_eq!(j["status"], "succeeded", "{j}");
    }
    let running = submit_ok(&api, &request(50));
    wait_running(&api, &running, 1);
    // Each waiting job runs 12 steps of 100 ms, several of the API's 250 ms polls, so the
    // follower below sees every place it passes (at 2 steps it could miss place 1).
    let waiting: Vec<String> = (0..3).map(|_| submit_ok(&api, &request(12))).collect();
    let last = {
        let (addr, id) = (api.addr, waiting[2].clone());
        std::thread::spawn(move || follow(addr, &id))
    };

    // One GET /jobs reads no job key by itself (GET): the reads are batched (MGET), so the
    // commands it costs do not grow with the jobs listed. What runs beside it (heartbeats,
    // the worker's stop-request poll) costs a few GETs a second.
    let gets = calls(&redis, "get");
    let listed = api.get("/jobs").json();
    let gets = calls(&redis, "get") - gets;
    eprintln!("GET /jobs of 64 jobs: {gets} Redis GETs while it ran");
    assert!(gets < 20, "GET /jobs of 64 jobs cost {gets} Redis GETs");
    assert!(calls(&redis, "mget") > 0);

    // The answer: running, then waiting in run order, then finished newest first (by
    // creation, to the millisecond); each entry as GET /jobs/{id} has it.
    let jobs = listed["jobs"].as_array().unwrap();
    let ids: Vec<&str> = jobs.iter().map(|j| j["id"].as_str().unwrap()).collect();
    let mut expected: Vec<&str> = vec![running.as_str()];
    expected.extend(waiting.iter().map(String::as_str));
    assert_eq!(ids[..4], expected);
    let mut finished = ids[4..].to_vec();
    let created: Vec<&str> = jobs[4..]
        .iter()
        .map(|j| j["created_at"].as_str().unwrap())
        .collect();
    assert!(created.windows(2).all(|w| w[0] >= w[1]), "{created:?}");
    finished.sort_unstable();
    let mut all_done: Vec<&str> = done.iter().map(String::as_str).collect();
    all_done.sort_unstable();
    assert_eq!(finished, all_done);
    let positions: Vec<&Value> = jobs[1..4].iter().map(|j| &j["position"]).collect();
    assert_eq!(positions, [&json!(1), &json!(2), &json!(3)]);
    for j in &jobs[1..] {
        assert_eq!(*j, job(&api, j["id"].as_str().unwrap()));
    }
    assert_eq!(jobs[0]["status"], "running");

    // The followed last one hears its place move up as the queue drains (the batched poll).
    let r = api.request("DELETE", &format!("/jobs/{running}"), &[], b"");
    assert_eq!(r.status, 200, "{}", r.text());
    let events = last.join().unwrap();
    let places: Vec<u64> = events
        .iter()
        .filter(|(n, _)| n == "queued")
        .map(|(_, d)| d["position"].as_u64().unwrap())
        .collect();
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    assert!(
        places.windows(2).all(|w| w[1] < w[0]) && places.last() == Some(&1),
        "{names:?} {places:?}"
    );
    assert_eq!(names.first(), Some(&"state"), "{names:?}");
    assert_eq!(names.last(), Some(&"succeeded"), "{names:?}");
}

#[test]
fn a_worker_run_past_its_deadline_names_the_jobs_setting_and_whole_limit() {
    let Some(redis) =
        Redis::start("a_worker_run_past_its_deadline_names_the_jobs_setting_and_whole_limit")
    else {
        return;
    };
    let _worker = start_replica(&redis, "worker", "step_ms=200", &[]);
    let api = start_replica(&redis, "api", "", &[("JOB_TIMEOUT_SECONDS", "2")]);
    wait_workers(&api, 1);
    // 50 steps of 200 ms: the worker's run stops at the 2 s deadline.
    let id = submit_ok(&api, &request(50));
    let j = wait_end(&api, &id, Duration::from_secs(30));
    assert_eq!(j["error"]["error_code"], "timeout", "{j}");
    let details = j["error"]["details"].as_str().unwrap();
    assert!(details.contains("JOB_TIMEOUT_SECONDS=2;"), "{details}");
    assert!(!details.contains("GENERATION_TIMEOUT"), "{details}");
}

fn now_ms() -> String {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    d.as_millis().to_string()
}

#[test]
fn an_unparsable_record_is_skipped_with_one_warning_and_answers_only_its_own_reads() {
    let Some(redis) = Redis::start(
        "an_unparsable_record_is_skipped_with_one_warning_and_answers_only_its_own_reads",
    ) else {
        return;
    };
    let worker = start_replica(&redis, "worker", "step_ms=50", &[]);
    let api = start_replica(&redis, "api", "", &[]);
    wait_workers(&api, 1);
    let good = submit_ok(&api, &request(1));
    assert_eq!(
        wait_end(&api, &good, Duration::from_secs(30))["status"],
        "succeeded"
    );

    // Records this version cannot read: garbage written by hand, valid JSON of another shape
    // (another version's record), and a queued job whose view reads but whose spec does not
    // (a newer version's); all listed in the index. The garbage one is also queued (a worker
    // takes it) and held by a worker that is gone (the reaper meets it).
    let (garbage, other, newer) = (
        "00000000-garbage",
        "00000000-other-version",
        "00000000-newer-version",
    );
    redis.cli(&["SET", &format!("sdserve:job:{garbage}"), "not json {"]);
    redis.cli(&[
        "SET",
        &format!("sdserve:job:{other}"),
        &json!({"view": {"id": other, "created_at": "2026-01-01T00:00:00.000Z"}, "format": 99})
            .to_string(),
    ]);
    let mut record: Value =
        serde_json::from_str(&redis.cli(&["GET", &format!("sdserve:job:{good}")])).unwrap();
    record["view"]["id"] = json!(newer);
    record["view"]["status"] = json!("queued");
    record["view"]["result"] = Value::Null;
    record["spec"] = json!("a spec of a later version");
    redis.cli(&["SET", &format!("sdserve:job:{newer}"), &record.to_string()]);
    for id in [garbage, other, newer] {
        redis.cli(&["ZADD", "sdserve:jobs", &now_ms(), id]);
    }
    redis.cli(&["SADD", "sdserve:workers", "gone-1"]);
    redis.cli(&["RPUSH", "sdserve:processing:gone-1", garbage]);
    redis.cli(&["LPUSH", "sdserve:queue", garbage]);
    // And a worker heartbeat that does not parse.
    redis.cli(&["SET", "sdserve:worker:garbled-1", "{\"health\": 1}"]);
    redis.cli(&["SADD", "sdserve:workers", "garbled-1"]);

    // GET /jobs answers the rest, twice; one warning per bad key in the log, however often
    // it is read (lister, reaper).
    for _ in 0..2 {
        let r = api.get("/jobs");
        assert_eq!(r.status, 200, "{}", r.text());
        let ids: Vec<String> = r.json()["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|j| j["id"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(ids, std::slice::from_ref(&good));
    }
    api.wait_log(
        &["does not parse", "sdserve:worker:garbled-1", "skipped"],
        Duration::from_secs(10),
    );
    for id in [garbage, other, newer] {
        let key = format!("sdserve:job:{id}");
        api.wait_log(
            &["does not parse", &key, "skipped"],
            Duration::from_secs(10),
        );
        let warnings = api
            .logs()
            .iter()
            .filter(|l| l.contains(&key) && l.contains("skipped"))
            .count();
        assert_eq!(warnings, 1, "{:#?}", api.logs());
    }
    // Its own reads answer what a client can act on, the cause in the log: what is not a
    // job's record is no job (404), a job's is that job, failed with a named error (no
    // internals in it), and so its cancel and events say.
    api.get(&format!("/jobs/{garbage}"))
        .error(404, "job_not_found");
    for id in [other, newer] {
        let r = api.get(&format!("/jobs/{id}"));
        assert_eq!(r.status, 200, "{}", r.text());
        let j = r.json();
        assert_eq!(
            (&j["id"], &j["status"], &j["error"]["error_code"]),
            (
                &json!(id),
                &json!("failed"),
                &json!("job_record_unreadable")
            ),
            "{j}"
        );
        assert!(!j.to_string().contains("sdserve:job"), "{j}");
        let r = api.request("DELETE", &format!("/jobs/{id}"), &[], b"");
        assert_eq!(r.json()["status"], "failed", "{}", r.text());
        let events = api.get(&format!("/jobs/{id}/events")).text();
        assert!(
            events.contains("event: failed") && events.contains("job_record_unreadable"),
            "{events}"
        );
    }
    // The job's own parts are kept where they read: its request and creation time.
    let j = api.get(&format!("/jobs/{newer}")).json();
    assert_eq!(j["request"], record["view"]["request"], "{j}");
    assert_eq!(
        api.get(&format!("/jobs/{other}")).json()["created_at"],
        "2026-01-01T00:00:00.000Z"
    );

    // The worker took the queued garbage and let it go; the reaper dropped it from the gone
    // worker's list (and then forgot that worker); jobs still run.
    worker.wait_log(
        &["does not parse", &format!("sdserve:job:{garbage}")],
        Duration::from_secs(10),
    );
    let t = Instant::now();
    while redis.cli(&["SISMEMBER", "sdserve:workers", "gone-1"]) != "0" {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the reaper stalled: {:#?}",
            api.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(redis.cli(&["LLEN", "sdserve:queue"]), "0");
    let after = submit_ok(&api, &request(1));
    assert_eq!(
        wait_end(&api, &after, Duration::from_secs(30))["status"],
        "succeeded"
    );
    let health = api.get("/health").json();
    assert_eq!(health["status"], "ok", "{health}");
    assert_eq!(
        health["workers"].as_array().map(Vec::len),
        Some(1),
        "{health}"
    );
}
