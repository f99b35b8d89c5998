//! Injected faults: dropped connections, 503s, corrupted bytes, unknown repos, an unreachable or
//! offline hub with a warm or cold cache, two processes on one cache, a crashed run's partial file.

use super::*;

#[test]
fn a_dropped_connection_is_resumed_with_range() {
    let hub = FakeHub::start();
    hub.add_repo("test/drop", &fixtures().join("tiny-a"), &[]);
    hub.fault(UNET, Fault::DropAfter(100_000), 1);
    let cache = Scratch::new("drop");
    let m = hub::resolve_model("test/drop", &opts(&hub, &cache.0), &quiet).unwrap();
    assert_snapshot_is_tiny_a(&m.dir);
    let log = hub.log();
    assert!(
        log.iter()
            .any(|l| l.starts_with("GET /cdn/test/drop/unet/") && l.ends_with("range=100000")),
        "{log:#?}"
    );
    no_incomplete(&cache.0);
}

#[test]
fn a_503_is_retried() {
    let hub = FakeHub::start();
    hub.add_repo("test/busy", &fixtures().join("tiny-a"), &[]);
    hub.fault(VAE, Fault::Status(503), 2);
    let cache = Scratch::new("busy");
    let m = hub::resolve_model("test/busy", &opts(&hub, &cache.0), &quiet).unwrap();
    assert_snapshot_is_tiny_a(&m.dir);
    let vae_gets = hub
        .log()
        .iter()
        .filter(|l| l.starts_with("GET /cdn/test/busy/vae/"))
        .count();
    assert_eq!(vae_gets, 3);
}

#[test]
fn a_corrupted_byte_is_detected_and_fetched_again() {
    let hub = FakeHub::start();
    hub.add_repo("test/corrupt", &fixtures().join("tiny-a"), &[]);
    hub.fault(TEXT, Fault::Corrupt(500), 1);
    let cache = Scratch::new("corrupt");
    let m = hub::resolve_model("test/corrupt", &opts(&hub, &cache.0), &quiet).unwrap();
    assert_snapshot_is_tiny_a(&m.dir);
    let gets: Vec<_> = hub
        .log()
        .into_iter()
        .filter(|l| l.starts_with("GET /cdn/test/corrupt/text_encoder/"))
        .collect();
    assert_eq!(gets.len(), 2, "{gets:?}");
    assert!(
        gets.iter().all(|l| !l.contains("range")),
        "a corrupt file is fetched whole again: {gets:?}"
    );
}

#[test]
fn a_persistently_corrupt_file_fails_with_an_integrity_error() {
    let hub = FakeHub::start();
    hub.add_repo("test/bad", &fixtures().join("tiny-a"), &[]);
    hub.fault(TEXT, Fault::Corrupt(7), 100);
    let cache = Scratch::new("bad");
    let e = hub::resolve_model("test/bad", &opts(&hub, &cache.0), &quiet).unwrap_err();
    assert!(matches!(e, HubError::Integrity { .. }), "{e}");
    assert!(e.to_string().contains(TEXT), "{e}");
    assert!(!cache
        .0
        .join("models--test--bad/snapshots")
        .read_dir()
        .unwrap()
        .flatten()
        .any(|d| d.path().join(TEXT).exists()));
    no_incomplete(&cache.0);
}

#[test]
fn an_unknown_repo_is_a_clear_404() {
    let hub = FakeHub::start();
    let cache = Scratch::new("404");
    let e = hub::resolve_model("test/does-not-exist", &opts(&hub, &cache.0), &quiet).unwrap_err();
    assert!(matches!(e, HubError::NotFound { .. }), "{e:?}");
    let msg = e.to_string();
    assert!(
        msg.contains("test/does-not-exist") && msg.contains("not found"),
        "{msg}"
    );
}

#[test]
fn an_unreachable_hub_with_a_warm_cache_serves_from_cache() {
    let cache = Scratch::new("warm");
    let (first, url) = {
        let hub = FakeHub::start();
        hub.add_repo("test/warm", &fixtures().join("tiny-a"), &[]);
        let m = hub::resolve_model("test/warm", &opts(&hub, &cache.0), &quiet).unwrap();
        (m, hub.url.clone())
    }; // the fake hub is gone: its port refuses connections
    let mut o = HubOptions::from_env(Some(cache.0.clone()), false);
    o.endpoint = url;
    o.offline = false;
    o.backoff = Duration::from_millis(5);
    let m = hub::resolve_model("test/warm", &o, &quiet).unwrap();
    assert_eq!(m.dir, first.dir);
    assert_eq!(m.model_version, first.model_version);
    assert_snapshot_is_tiny_a(&m.dir);

    // Offline mode with the warm cache: no request at all.
    o.endpoint = "http://127.0.0.1:9".into();
    o.offline = true;
    assert_eq!(
        hub::resolve_model("test/warm", &o, &quiet).unwrap().dir,
        first.dir
    );
}

#[test]
fn offline_with_a_cold_cache_is_a_clear_error() {
    let cache = Scratch::new("cold");
    let mut o = HubOptions::from_env(Some(cache.0.clone()), false);
    o.offline = true;
    let e = hub::resolve_model("test/never-downloaded", &o, &quiet).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, HubError::Offline(_)), "{msg}");
    assert!(
        msg.contains("HF_HUB_OFFLINE")
            && msg.contains("test/never-downloaded")
            && msg.contains("not in the cache"),
        "{msg}"
    );
}

#[test]
fn an_unreachable_hub_with_a_cold_cache_says_so() {
    let cache = Scratch::new("unreach");
    let mut o = HubOptions::from_env(Some(cache.0.clone()), false);
    o.endpoint = "http://127.0.0.1:9".into();
    o.offline = false;
    o.retries = 1;
    o.backoff = Duration::from_millis(5);
    let e = hub::resolve_model("test/x", &o, &quiet).unwrap_err();
    assert!(matches!(e, HubError::Unreachable { .. }), "{e}");
}

#[test]
fn two_processes_sharing_a_cache_do_not_corrupt_it() {
    let hub = FakeHub::start();
    hub.add_repo("test/shared", &fixtures().join("tiny-a"), &[]);
    // Slow the big file down a little so the two downloads overlap.
    hub.fault(UNET, Fault::Status(503), 2);
    let cache = Scratch::new("shared");
    let o = opts(&hub, &cache.0);
    let results: Vec<_> = std::thread::scope(|s| {
        let a = s.spawn(|| hub::resolve_model("test/shared", &o, &quiet));
        let b = s.spawn(|| hub::resolve_model("test/shared", &o, &quiet));
        vec![a.join().unwrap(), b.join().unwrap()]
    });
    for r in results {
        assert_snapshot_is_tiny_a(&r.unwrap().dir);
    }
    no_incomplete(&cache.0);
}

#[test]
fn a_partial_file_from_a_crashed_run_is_resumed() {
    let hub = FakeHub::start();
    hub.add_repo("test/crashed", &fixtures().join("tiny-a"), &[]);
    let cache = Scratch::new("crashed");
    let unet = std::fs::read(fixtures().join("tiny-a").join(UNET)).unwrap();
    let sha = hex(&Sha256::digest(&unet));
    let blobs = cache.0.join("models--test--crashed/blobs");
    std::fs::create_dir_all(&blobs).unwrap();
    std::fs::write(blobs.join(format!("{sha}.incomplete")), &unet[..4096]).unwrap();
    let m = hub::resolve_model("test/crashed", &opts(&hub, &cache.0), &quiet).unwrap();
    assert_snapshot_is_tiny_a(&m.dir);
    assert!(hub
        .log()
        .iter()
        .any(|l| l.starts_with("GET /cdn/test/crashed/unet/") && l.ends_with("range=4096")));
}
