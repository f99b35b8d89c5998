use super::*;
use crate::generator::FakeSpec;
use sdserve_pipeline::pipeline::GenerationParams;
use sdserve_pipeline::schedulers::SchedulerKind;

fn spec(steps: usize, timeout: Duration) -> JobSpec {
    JobSpec {
        params: GenerationParams {
            prompt: "p".into(),
            negative_prompt: String::new(),
            steps,
            width: 256,
            height: 256,
            seed: 1,
            guidance_scale: 7.5,
            scheduler: Some(SchedulerKind::Euler),
            ..Default::default()
        },
        request: serde_json::json!({}),
        png_texts: vec!["t".into()],
        progress_total: steps,
        model_version: "fake@0".into(),
        model: None,
        vae: None,
        timeout_setting: Default::default(),
        timeout,
    }
}

async fn ready(engine: &Engine) {
    while matches!(engine.state(), ModelState::Loading) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn png_of(f: &Finished) -> Vec<u8> {
    use base64::Engine as _;
    let r = f.result.as_ref().unwrap();
    base64::engine::general_purpose::STANDARD
        .decode(r.image_base64.as_bytes())
        .unwrap()
}

#[tokio::test]
async fn runs_times_out_and_frees_the_worker() {
    const STEP: Duration = Duration::from_millis(20);
    let s: FakeSpec = "step_ms=20".parse().unwrap();
    let timeout = Duration::from_millis(300);
    let engine = Engine::start(
        EngineConfig::new(2, timeout),
        s.loader(),
        Arc::new(Metrics::default()),
    );
    ready(&engine).await;
    let out = engine.run(spec(2, timeout), |_| {}).await.unwrap();
    assert!(png_of(&out).starts_with(b"\x89PNG"));
    let id = std::sync::Mutex::new(String::new());
    let t = Instant::now();
    let err = engine
        .run(spec(1000, timeout), |i| *id.lock().unwrap() = i.to_string())
        .await
        .unwrap_err();
    let took = t.elapsed();
    let ApiError::Timeout(info) = &err else {
        panic!("{err:?}")
    };
    // Answered at the deadline: not before it, and late by no more than a few steps at the
    // speed the steps ran (under load both the steps and this waiter's timer run late).
    let step = Duration::from_secs_f64(info.running_secs / info.step.max(1) as f64).max(STEP);
    assert!(
        took >= timeout && took < timeout + 4 * step,
        "{took:?}, steps of {step:?}: {info:?}"
    );
    // The worker stops within a step or two of the deadline. Each fake step sleeps at least
    // STEP, so at most timeout / STEP steps fit before it; a late stop would let more run.
    let id = id.into_inner().unwrap();
    let waiting = Instant::now();
    while !engine.job(&id).unwrap().status.is_final() {
        assert!(waiting.elapsed() < Duration::from_secs(30), "never stopped");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let ran = engine.job(&id).unwrap().progress.step;
    let fit = (timeout.as_millis() / STEP.as_millis()) as usize;
    assert!(
        (info.step..=fit + 2).contains(&ran),
        "ran {ran}, heard {}",
        info.step
    );
    // The worker is free: the next short job runs.
    assert_eq!(engine.gauges().running, 0);
    engine.run(spec(2, timeout), |_| {}).await.unwrap();
}

#[tokio::test]
async fn overload_and_failed_load() {
    let s: FakeSpec = "step_ms=20".parse().unwrap();
    let timeout = Duration::from_secs(5);
    let engine = Engine::start(
        EngineConfig::new(1, timeout),
        s.loader(),
        Arc::new(Metrics::default()),
    );
    ready(&engine).await;
    let e2 = engine.clone();
    let first = tokio::spawn(async move { e2.run(spec(10, timeout), |_| {}).await });
    tokio::time::sleep(Duration::from_millis(30)).await;
    let err = engine.run(spec(1, timeout), |_| {}).await.unwrap_err();
    assert!(matches!(err, ApiError::Overloaded { .. }), "{err:?}");
    first.await.unwrap().unwrap();

    let s: FakeSpec = "fail_load=no weights".parse().unwrap();
    let engine = Engine::start(
        EngineConfig::new(1, timeout),
        s.loader(),
        Arc::new(Metrics::default()),
    );
    assert!(engine.wait_worker(Duration::from_secs(5)));
    assert_eq!(engine.state(), ModelState::Failed("no weights".into()));
    assert!(matches!(
        engine.model_info(),
        Err(ApiError::ModelUnavailable(_))
    ));
}

/// The base64 bytes of a result's images, each allocation once.
fn result_bytes(f: &Finished) -> usize {
    f.result.as_ref().unwrap().image_bytes()
}

#[tokio::test]
async fn finished_jobs_past_the_results_budget_are_dropped_oldest_first() {
    // 1 ms steps: the long job below runs for minutes unless cancelled.
    let s: FakeSpec = "step_ms=1".parse().unwrap();
    let timeout = Duration::from_secs(30);
    // Every job here is the same request: its result has the same size.
    let probe = Engine::start(
        EngineConfig::new(1, timeout),
        s.clone().loader(),
        Arc::new(Metrics::default()),
    );
    ready(&probe).await;
    let out = probe.run(spec(1, timeout), |_| {}).await.unwrap();
    // The first image is one allocation for both fields, counted once; the record counts
    // a little more than its images (request, metadata, the record): no event slots, as
    // nobody follows it now.
    let r = out.result.as_ref().unwrap();
    assert!(Arc::ptr_eq(&r.image_base64, &r.images[0]));
    assert_eq!(
        result_bytes(&out),
        r.images.iter().map(|i| i.len()).sum::<usize>()
    );
    let one = probe.finished_bytes();
    eprintln!(
        "a record of a 1-step fake job counts {one} bytes, {} of them images",
        result_bytes(&out)
    );
    assert!(
        one > result_bytes(&out) && one < result_bytes(&out) + 4096,
        "{one} counted for {} bytes of images",
        result_bytes(&out)
    );
    let mut cfg = EngineConfig::new(1, timeout);
    cfg.job_results_bytes = 3 * one + one / 2;
    let metrics = Arc::new(Metrics::default());
    let engine = Engine::start(cfg, s.loader(), metrics.clone());
    ready(&engine).await;
    let finished_ids = |engine: &Engine| -> Vec<String> {
        let jobs = engine.jobs().unwrap();
        jobs.into_iter()
            .filter(|j| j.status.is_final())
            .map(|j| j.id)
            .collect()
    };
    let mut ids = Vec::new();
    for _ in 0..5 {
        let view = engine.submit(spec(1, timeout)).unwrap();
        let (_, mut rx) = engine.subscribe(&view.id).unwrap();
        while !rx.recv().await.unwrap().is_final() {}
        drop(rx);
        ids.push(view.id);
    }
    // A running and a waiting job are never dropped, however full the budget.
    let long = Duration::from_secs(60);
    let running = engine.submit(spec(100_000, long)).unwrap();
    while engine.job(&running.id).unwrap().status != JobStatus::Running {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let waiting = engine.submit(spec(1, long)).unwrap();
    // Three results fit: the two oldest went, oldest first, counted; 404 as if expired.
    for id in &ids[..2] {
        assert!(
            matches!(engine.job(id), Err(ApiError::JobNotFound(_))),
            "{id}"
        );
    }
    let mut newest: Vec<String> = ids[2..].to_vec();
    newest.reverse();
    assert_eq!(finished_ids(&engine), newest);
    assert_eq!(metrics.jobs_evicted.get(), 2);
    assert_eq!(engine.job(&running.id).unwrap().status, JobStatus::Running);
    assert_eq!(engine.job(&waiting.id).unwrap().status, JobStatus::Queued);
    // A record someone follows stays until they let go; the next oldest go instead.
    let (_, followed) = engine.subscribe(&ids[2]).unwrap();
    engine.cancel(&waiting.id).unwrap();
    engine.cancel(&running.id).unwrap();
    while !engine.job(&running.id).unwrap().status.is_final() {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let mut runs = 0;
    while engine.job(&ids[3]).is_ok() {
        engine.run(spec(1, timeout), |_| {}).await.unwrap();
        runs += 1;
        assert!(runs <= 8, "ids[3] never went");
    }
    assert!(engine.job(&ids[2]).is_ok(), "the followed record went");
    // Let go: it is the oldest, so it is the next to go.
    drop(followed);
    let evicted = metrics.jobs_evicted.get();
    let mut runs = 0;
    while metrics.jobs_evicted.get() == evicted {
        engine.run(spec(1, timeout), |_| {}).await.unwrap();
        runs += 1;
        assert!(runs <= 8, "nothing went");
    }
    assert!(matches!(engine.job(&ids[2]), Err(ApiError::JobNotFound(_))));
}

/// A job nobody follows allocates no event channel (tokio allocates its 256 slots up front,
/// about 34 KB); a subscriber still gets the state, then every event after it.
#[tokio::test]
async fn event_slots_are_allocated_for_followers_only() {
    let s: FakeSpec = "step_ms=20".parse().unwrap();
    let timeout = Duration::from_secs(30);
    let engine = Engine::start(
        EngineConfig::new(1, timeout),
        s.loader(),
        Arc::new(Metrics::default()),
    );
    ready(&engine).await;
    let job = spec(5, timeout);
    let (view, peak) = crate::fuzz_tests::images::peak_during(|| engine.submit(job).unwrap());
    eprintln!("submitting a job allocated {peak} bytes at its peak");
    assert!(
        peak < 8 << 10,
        "submitting a job allocated {peak} bytes at its peak"
    );
    let (now, mut rx) = engine.subscribe(&view.id).unwrap();
    let mut names = vec![];
    loop {
        let e = rx.recv().await.unwrap();
        names.push(e.name());
        if e.is_final() {
            break;
        }
    }
    // Every event after the snapshot, in order, ending with the one terminal event.
    let steps = names.iter().filter(|n| **n == "progress").count();
    assert_eq!(steps, 5 - now.progress.step, "{now:?} {names:?}");
    assert_eq!(names.last(), Some(&"succeeded"));
}

/// The cluster worker's way in: a job followed from its submission gives every event to its
/// follower, the first ones too, however soon the worker thread runs it (a subscription after
/// `submit` missed a model switch's `loading` under load).
#[tokio::test]
async fn a_job_submitted_followed_misses_none_of_its_events() {
    let s: FakeSpec = "step_ms=0".parse().unwrap();
    let timeout = Duration::from_secs(30);
    let local = local::Local::start(
        EngineConfig::new(1, timeout),
        s.loader(),
        None,
        Arc::new(Metrics::default()),
    );
    while matches!(local.model_state(), ModelState::Loading) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (view, mut rx) = local.submit_followed(spec(3, timeout)).unwrap();
    // The job ends before anything is read.
    while !matches!(local.finished(&view.id), Ok(Some(_))) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut names = vec![];
    while names
        .last()
        .is_none_or(|n| !["succeeded", "failed", "cancelled"].contains(n))
    {
        let e = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .unwrap_or_else(|_| panic!("no more events after {names:?}"))
            .unwrap();
        names.push(e.name());
    }
    assert_eq!(
        names,
        ["started", "progress", "progress", "progress", "succeeded"]
    );
}

#[tokio::test]
async fn queue_limit_positions_cancel_and_ttl() {
    let s: FakeSpec = "step_ms=10".parse().unwrap();
    let mut cfg = EngineConfig::new(1, Duration::from_secs(5));
    cfg.max_queued = 2;
    cfg.job_ttl = Duration::from_millis(300);
    let engine = Engine::start(cfg, s.loader(), Arc::new(Metrics::default()));
    ready(&engine).await;
    let long = Duration::from_secs(30);
    let a = engine.submit(spec(1000, long)).unwrap();
    // Wait until `a` runs, so the two below are the waiting ones.
    while engine.job(&a.id).unwrap().status != JobStatus::Running {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let b = engine.submit(spec(3, long)).unwrap();
    let c = engine.submit(spec(3, long)).unwrap();
    assert_eq!((b.position, c.position), (Some(1), Some(2)));
    let full = engine.submit(spec(3, long)).unwrap_err();
    assert!(matches!(full, ApiError::Overloaded { .. }), "{full:?}");
    // Cancelling the queued `b` moves `c` up; `b` never runs.
    let (_, mut rx) = engine.subscribe(&c.id).unwrap();
    let bv = engine.cancel(&b.id).unwrap();
    assert_eq!(bv.status, JobStatus::Cancelled);
    assert!(bv.cancel_requested && bv.started_at.is_none());
    assert!(matches!(
        rx.recv().await.unwrap(),
        JobEvent::Queued { position: 1 }
    ));
    let before = engine.job(&a.id).unwrap().progress.step;
    engine.cancel(&a.id).unwrap();
    let fin = loop {
        if let Some(f) = engine.backend.finished(&a.id).unwrap() {
            break f;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    };
    assert!(fin.result.is_err());
    assert_eq!(engine.job(&a.id).unwrap().status, JobStatus::Cancelled);
    // It stopped at once: at most the step in flight and one racing the cancel ran on.
    let ran = engine.job(&a.id).unwrap().progress.step;
    assert!((before..=before + 2).contains(&ran), "{before} -> {ran}");
    while !engine.job(&c.id).unwrap().status.is_final() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(engine.job(&c.id).unwrap().status, JobStatus::Succeeded);
    assert_eq!(engine.job(&b.id).unwrap().progress.step, 0);
    // Past the TTL every finished job is gone (the reaper looks every REAP_EVERY; under
    // load its thread runs late, so wait for it rather than a fixed time).
    let waiting = Instant::now();
    while engine.job(&c.id).is_ok() {
        assert!(waiting.elapsed() < Duration::from_secs(30), "never expired");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(matches!(engine.job(&c.id), Err(ApiError::JobNotFound(_))));
    assert!(engine.jobs().unwrap().is_empty());
}

/// A run that hangs (deaf to its stop flag) past its deadline plus the grace: its job ends
/// `failed` (`timeout`) while the run still hangs; when the run returns, its outcome is dropped
/// and the next job runs.
#[tokio::test]
async fn a_stuck_run_ends_its_job_with_timeout_before_it_returns() {
    let s: FakeSpec = "step_ms=10,hang_at_step=2,hang_ms=5000".parse().unwrap();
    let mut cfg = EngineConfig::new(1, Duration::from_millis(500));
    cfg.stuck_grace = Duration::from_millis(500);
    let engine = Engine::start(cfg, s.loader(), Arc::new(Metrics::default()));
    ready(&engine).await;
    assert_eq!(engine.degraded(None), None);
    let view = engine.submit(spec(5, Duration::from_millis(500))).unwrap();
    let (_, mut rx) = engine.subscribe(&view.id).unwrap();
    let last = loop {
        let e = rx.recv().await.unwrap();
        if e.is_final() {
            break e;
        }
    };
    // It ended while the run still hangs (the worker is still in it).
    assert_eq!(engine.gauges().running, 1, "the run returned first");
    assert_eq!(last.name(), "failed");
    let j = engine.job(&view.id).unwrap();
    assert_eq!(j.status, JobStatus::Failed);
    assert_eq!(j.error.as_ref().unwrap().error_code, "timeout");
    // /health is `degraded` (why: the stuck run) until the run returns.
    let why = engine
        .degraded(None)
        .expect("not degraded while the run is stuck");
    assert!(why.contains(&view.id) && why.contains("stuck"), "{why}");
    // The next job waits for the run to return, then runs; the stuck one stays failed.
    let out = engine.run(spec(2, Duration::from_secs(30)), |_| {}).await;
    assert!(out.is_ok(), "{:?}", out.err());
    assert_eq!(engine.job(&view.id).unwrap().status, JobStatus::Failed);
    assert_eq!(
        engine.degraded(None),
        None,
        "still degraded after the run returned"
    );
}

/// A fake generator that counts the live ones: a switch must drop the held pipeline before
/// it loads the next (one pipeline at a time).
struct Counted(
    Box<dyn crate::generator::Generator>,
    Arc<std::sync::atomic::AtomicUsize>,
);

impl crate::generator::Generator for Counted {
    fn generate(
        &mut self,
        p: &GenerationParams,
        on_step: sdserve_pipeline::pipeline::StepHook,
    ) -> Result<Vec<sdserve_pipeline::pipeline::RgbImage>, sdserve_pipeline::PipelineError> {
        self.0.generate(p, on_step)
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.1.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

#[tokio::test]
async fn a_switch_drops_the_held_model_first_and_a_failed_one_brings_the_previous_back() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let alive = Arc::new(AtomicUsize::new(0));
    // Live generators each time the switcher is called.
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let fake: FakeSpec = "step_ms=0".parse().unwrap();
    let count = |mut l: crate::generator::Loaded, alive: &Arc<AtomicUsize>, version: String| {
        alive.fetch_add(1, Ordering::SeqCst);
        l.generator = Box::new(Counted(l.generator, alive.clone()));
        l.info.model_version = version;
        l
    };
    let (a, f) = (alive.clone(), fake.clone());
    let loader: Loader = Box::new(move || Ok(count(f.loader()()?, &a, "default@0".into())));
    let (a, s) = (alive.clone(), seen.clone());
    let switcher = crate::generator::Switcher {
        load: Box::new(move |name| {
            s.lock().unwrap().push(a.load(Ordering::SeqCst));
            match name {
                Some("bad") => Err("/models/bad.safetensors: not a checkpoint".into()),
                other => {
                    let version = format!("{}@0", other.unwrap_or("default"));
                    Ok(count(fake.clone().loader()()?, &a, version))
                }
            }
        }),
        by_name: true,
    };
    let engine = Engine::start_switching(
        EngineConfig::new(2, Duration::from_secs(30)),
        loader,
        Some(switcher),
        Arc::new(Metrics::default()),
    );
    ready(&engine).await;
    let on = |model: Option<&str>| JobSpec {
        model: model.map(str::to_string),
        ..spec(2, Duration::from_secs(30))
    };
    let held = |e: &Engine| e.loaded_model().map(|m| (m.name, m.model_version));
    engine.run(on(None), |_| {}).await.unwrap();
    assert_eq!(held(&engine), Some((None, "default@0".into())));
    engine.run(on(Some("b")), |_| {}).await.unwrap();
    assert_eq!(held(&engine), Some((Some("b".into()), "b@0".into())));
    // The held model serves without a load.
    engine.run(on(Some("b")), |_| {}).await.unwrap();
    let err = engine.run(on(Some("bad")), |_| {}).await.unwrap_err();
    let ApiError::ModelUnavailable(why) = &err else {
        panic!("{err:?}")
    };
    assert!(why.contains("\"bad\"") && !why.contains("/models"), "{why}");
    assert_eq!(held(&engine), Some((Some("b".into()), "b@0".into())));
    engine.run(on(None), |_| {}).await.unwrap();
    assert_eq!(held(&engine), Some((None, "default@0".into())));
    // Loads: b, bad, b again, the default: never with another generator alive.
    assert_eq!(*seen.lock().unwrap(), [0, 0, 0, 0]);
    assert_eq!(alive.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_reload_past_its_wait_says_whether_the_load_goes_on() {
    let fake: FakeSpec = "step_ms=50".parse().unwrap();
    let slow = fake.clone();
    let switcher = crate::generator::Switcher {
        load: Box::new(move |name| {
            std::thread::sleep(Duration::from_millis(600));
            let mut l = slow.clone().loader()()?;
            l.info.model_version = format!("{}@0", name.unwrap_or("default"));
            Ok(l)
        }),
        by_name: true,
    };
    let engine = Engine::start_switching(
        EngineConfig::new(2, Duration::from_secs(30)),
        fake.clone().loader(),
        Some(switcher),
        Arc::new(Metrics::default()),
    );
    ready(&engine).await;
    let held = |e: &Engine| e.loaded_model().and_then(|m| m.name);
    let wait = Duration::from_millis(100);
    // The idle worker takes the ask at once; its load outlasts the wait, and goes on.
    let err = engine
        .ask_model(ModelAsk::Reload(Some("b".into())), wait)
        .await
        .unwrap_err();
    let ApiError::ModelUnavailable(why) = &err else {
        panic!("{err:?}")
    };
    assert!(why.contains("the load goes on"), "{why}");
    let t = Instant::now();
    while held(&engine).as_deref() != Some("b") {
        assert!(t.elapsed() < Duration::from_secs(5), "the load stopped");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // A job on b holds the worker past the wait: the ask is withdrawn and never done.
    let e2 = engine.clone();
    let job = tokio::spawn(async move {
        let on_b = JobSpec {
            model: Some("b".into()),
            ..spec(20, Duration::from_secs(30))
        };
        e2.run(on_b, |_| {}).await
    });
    while engine
        .current()
        .is_none_or(|j| j.status != JobStatus::Running)
    {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let err = engine
        .ask_model(ModelAsk::Reload(None), wait)
        .await
        .unwrap_err();
    let ApiError::ModelUnavailable(why) = &err else {
        panic!("{err:?}")
    };
    assert!(why.contains("withdrawn"), "{why}");
    job.await.unwrap().unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(held(&engine).as_deref(), Some("b"));
}
