//! The server's background retries: until the hub comes back, and never for errors that will
//! not pass.

use super::*;

#[test]
fn the_server_tries_again_in_the_background_until_the_hub_comes_back() {
    // A port with nothing behind it yet: the hub is "down".
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let cache = Scratch::new("comeback");
    let env: Vec<(String, String)> = [
        ("MODEL_ID", "test/comeback"),
        ("HF_ENDPOINT", &format!("http://127.0.0.1:{port}")),
        ("MODEL_CACHE_DIR", &cache.0.to_string_lossy()),
        ("MODEL_RETRY_SECONDS", "1"),
        ("DEVICE", "cpu"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let server = common::Server::start(&env);
    // Two failed tries, the waits growing: 1 s, then 2 s.
    server.wait_log(
        &[
            "trying again in the background",
            "\"attempts\":2",
            "\"next_try_seconds\":2.0",
        ],
        Duration::from_secs(30),
    );
    server.wait_log(&["\"next_try_seconds\":1.0"], Duration::ZERO);
    let health = server.get("/health");
    assert_eq!(health.status, 503);
    let h = health.json();
    assert_eq!(h["status"], "unavailable", "{h}");
    let detail = h["detail"].as_str().unwrap();
    for want in [
        "cannot reach the hub for test/comeback",
        "next try in",
        "--model DIR",
        "sdserve download test/comeback",
        "HF_ENDPOINT",
        "HF_HUB_OFFLINE=1",
        "no local folder or file test/comeback",
    ] {
        assert!(detail.contains(want), "{want:?} not in {detail}");
    }
    let e = server
        .post_json(&serde_json::json!({"prompt": "x"}))
        .error(503, "model_unavailable");
    assert!(
        e["details"].as_str().unwrap().contains("next try in"),
        "{e}"
    );

    // The hub comes back on the same address; the next background try gets the model.
    let hub = FakeHub::start_on(TcpListener::bind(("127.0.0.1", port)).unwrap());
    let commit = hub.add_repo("test/comeback", &fixtures().join("tiny-a"), &[]);
    server.wait_ready(Duration::from_secs(60));
    let h = server.get("/health").json();
    assert_eq!(h["status"], "ok");
    assert_eq!(h["model_version"], format!("test/comeback@{commit}"));
    assert_snapshot_is_tiny_a(
        &cache
            .0
            .join(format!("models--test--comeback/snapshots/{commit}")),
    );
}

#[test]
fn errors_that_will_not_pass_are_not_tried_again() {
    let hub = FakeHub::start();
    let cache = Scratch::new("final");
    let policy = hub::RetryPolicy {
        first: Duration::from_millis(1),
        max: Duration::from_millis(1),
    };
    let waits = Mutex::new(0);
    let e = hub::resolve_model_patiently(
        "test/never-published",
        &opts(&hub, &cache.0),
        &quiet,
        policy,
        &|w| *waits.lock().unwrap() += usize::from(w.is_some()),
    )
    .unwrap_err();
    assert!(matches!(e, HubError::NotFound { .. }), "{e}");
    assert_eq!(*waits.lock().unwrap(), 0);
    // A 404 for an id that is also a (missing) local path says both.
    assert!(
        e.to_string()
            .contains("no local folder or file test/never-published"),
        "{e}"
    );
}
