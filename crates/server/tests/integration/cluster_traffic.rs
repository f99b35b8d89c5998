//! What replicas sharing a real `redis-server` (QUEUE_URL) exchange besides the jobs, with
//! the fake generator: the shared response cache, which jobs' previews an API replica's
//! clients watch (the worker makes previews only for those), and the latest preview for an
//! A1111 poller.
//!
//! Each test starts its own redis-server on a free port; without one it skips loudly, unless
//! SDSERVE_REQUIRE_REDIS=1 (as `.ci/run` sets).

use crate::common;

use std::time::Duration;

use common::cluster::{follow, start_replica, submit_ok, wait_end, wait_workers, Redis};
use common::Server;
use serde_json::json;

#[test]
fn the_shared_cache_answers_another_api_byte_for_byte_holding_the_first_image_once() {
    let Some(redis) = Redis::start(
        "the_shared_cache_answers_another_api_byte_for_byte_holding_the_first_image_once",
    ) else {
        return;
    };
    let _worker = start_replica(&redis, "worker", "step_ms=0", &[]);
    let (one, two) = (
        start_replica(&redis, "api", "", &[]),
        start_replica(&redis, "api", "", &[]),
    );
    wait_workers(&one, 1);
    wait_workers(&two, 1);
    let body = json!({"prompt": "shared", "steps": 2, "width": 256, "height": 256, "seed": 5, "batch_size": 2});
    let post = |s: &Server| {
        common::request(
            s.addr,
            "POST",
            "/generate",
            &[("Content-Type", "application/json")],
            body.to_string().as_bytes(),
        )
    };
    let miss = post(&one);
    assert_eq!((miss.status, miss.header("x-cache")), (200, Some("miss")));
    let hit = post(&two);
    assert_eq!((hit.status, hit.header("x-cache")), (200, Some("hit")));
    assert!(miss.body == hit.body, "the other API's hit differs");
    // Redis holds the body less the first image's second copy (and a 28-byte header).
    // (Keys hold NUL bytes, which a command line cannot: Lua finds and measures them.)
    let lens = redis.cli(&[
        "EVAL",
        "local n = {} for _, k in ipairs(redis.call('KEYS', 'sdserve:cache:*')) do n[#n + 1] = redis.call('STRLEN', k) end return n",
        "0",
    ]);
    let lens: Vec<usize> = lens.lines().map(|l| l.parse().unwrap()).collect();
    assert_eq!(lens.len(), 1, "{lens:?}");
    let stored = lens[0];
    let first = miss.json()["image_base64"].as_str().unwrap().len();
    assert_eq!(stored, miss.body.len() - first + 28);
}

#[test]
fn a_worker_makes_previews_only_for_jobs_an_api_replica_streams() {
    let Some(redis) = Redis::start("a_worker_makes_previews_only_for_jobs_an_api_replica_streams")
    else {
        return;
    };
    let preview = [("PREVIEW", "latent"), ("PREVIEW_EVERY", "2")];
    let worker = start_replica(&redis, "worker", "step_ms=50", &preview);
    let api = start_replica(&redis, "api", "", &preview);
    wait_workers(&api, 1);
    let made = || worker.metric("sdserve_previews_total");
    let req = |seed: u64| json!({"prompt": "watched?", "steps": 20, "width": 256, "height": 256, "seed": seed});

    // Nobody can see them: a /generate client, a job nobody follows.
    assert_eq!(api.post_json(&req(1)).status, 200);
    let unseen = submit_ok(&api, &req(2));
    assert_eq!(
        wait_end(&api, &unseen, Duration::from_secs(30))["status"],
        "succeeded"
    );
    assert_eq!(made(), 0.0, "previews made that nobody could see");

    // A stream through the API: the worker hears of it within a poll or two (a preview is due
    // every 2 of the 30 steps of 50 ms) and makes the rest.
    let followed = submit_ok(
        &api,
        &json!({"prompt": "watched", "steps": 30, "width": 256, "height": 256, "seed": 3}),
    );
    let events = follow(api.addr, &followed);
    let previews = events.iter().filter(|(n, _)| n == "preview").count();
    assert_eq!(events.last().map(|(n, _)| n.as_str()), Some("succeeded"));
    assert!(previews >= 1, "no preview of the 15 due reached the stream");
    assert!(made() >= previews as f64);

    // Once the stream is gone, no more.
    let before = made();
    let after = submit_ok(&api, &req(4));
    assert_eq!(
        wait_end(&api, &after, Duration::from_secs(30))["status"],
        "succeeded"
    );
    assert_eq!(made(), before);
}

/// A1111 `progress` on an API replica shows the latest preview the worker made for the job
/// its client waits on (`current_image`), and only while polled so: with
/// `skip_current_image=true`, none is made.
#[test]
fn an_a1111_poller_on_an_api_replica_gets_the_workers_previews() {
    let Some(redis) = Redis::start("an_a1111_poller_on_an_api_replica_gets_the_workers_previews")
    else {
        return;
    };
    let preview = [("PREVIEW", "latent"), ("PREVIEW_EVERY", "2")];
    let worker = start_replica(&redis, "worker", "step_ms=50", &preview);
    let api = start_replica(&redis, "api", "", &preview);
    wait_workers(&api, 1);
    let made = || worker.metric("sdserve_previews_total");
    let txt2img = |skip| common::a1111_txt2img_polled(api.addr, skip, Duration::from_millis(50));
    assert_eq!(txt2img(true), None);
    assert_eq!(made(), 0.0, "previews made for a poller that skips them");
    let image = txt2img(false).expect("current_image while polled");
    assert_eq!(common::decode_png(&image).0, 256 / 8, "the latent preview");
    assert!(made() > 0.0);
}

/// A stream that joins a running job on another API replica than the one that made its worker
/// make previews gets the latest preview (from Redis) right after `state`, then only later ones.
#[test]
fn a_stream_joining_on_another_replica_gets_the_latest_preview_first() {
    let Some(redis) =
        Redis::start("a_stream_joining_on_another_replica_gets_the_latest_preview_first")
    else {
        return;
    };
    let preview = [("PREVIEW", "latent"), ("PREVIEW_EVERY", "5")];
    let worker = start_replica(&redis, "worker", "step_ms=100", &preview);
    let (one, two) = (
        start_replica(&redis, "api", "", &preview),
        start_replica(&redis, "api", "", &preview),
    );
    wait_workers(&one, 1);
    wait_workers(&two, 1);
    let id = submit_ok(
        &one,
        &json!({"prompt": "joined", "steps": 40, "width": 256, "height": 256, "seed": 4}),
    );
    // A follower on the first replica makes previews be made; wait for the first one.
    let first = {
        let (addr, id) = (one.addr, id.clone());
        std::thread::spawn(move || follow(addr, &id))
    };
    let t = std::time::Instant::now();
    while worker.metric("sdserve_previews_total") < 1.0 {
        assert!(t.elapsed() < Duration::from_secs(20), "no preview made");
        std::thread::sleep(Duration::from_millis(20));
    }
    let joined = follow(two.addr, &id);
    assert_eq!(joined[0].0, "state");
    assert_eq!(joined[0].1["status"], "running", "{:?}", joined[0].1);
    assert_eq!(joined[1].0, "preview", "the second event: {:?}", joined[1]);
    let caught_up = joined[1].1["step"].as_u64().unwrap();
    assert!(caught_up >= 5, "{:?}", joined[1].1);
    let later: Vec<u64> = joined[2..]
        .iter()
        .filter(|(e, _)| e == "preview")
        .map(|(_, d)| d["step"].as_u64().unwrap())
        .collect();
    assert!(
        later.windows(2).all(|w| w[0] < w[1]) && later.iter().all(|&s| s > caught_up),
        "each preview once, after the one caught up with ({caught_up}): {later:?}"
    );
    assert_eq!(joined.last().unwrap().0, "succeeded");
    assert_eq!(first.join().unwrap().last().unwrap().0, "succeeded");
}
