//! The real router in process (`tower::ServiceExt::oneshot`, no socket) over a generator that
//! records what reaches it and answers tiny images at once, so thousands of requests per
//! property take seconds and every accepted request can be checked against the native rules.

use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::http::{Request, StatusCode};
use axum::Router;
use sdserve_pipeline::pipeline::{GenerationParams, RgbImage, StepHook};
use sdserve_pipeline::schedulers::SchedulerKind;
use sdserve_pipeline::PipelineError;
use serde_json::Value;
use tower::ServiceExt;

use crate::api::{self, AppState};
use crate::engine::{Engine, EngineConfig};
use crate::generator::{Generator, Loaded, ModelInfo};
use crate::metrics::Metrics;
use crate::security::{Security, SecurityConfig};
use crate::validate;

/// Bodies past this are 413 (above `api::JSON_BODY_BYTES`, so the routes without images show
/// their smaller limit).
pub const MAX_BODY: usize = 4 << 20;

pub type Seen = Arc<Mutex<Vec<GenerationParams>>>;

struct Recorder(Seen);

impl Generator for Recorder {
    fn generate(
        &mut self,
        p: &GenerationParams,
        _on_step: StepHook,
    ) -> Result<Vec<RgbImage>, PipelineError> {
        lock(&self.0).push(p.clone());
        Ok((0..p.batch_size.max(1))
            .map(|_| RgbImage {
                width: 8,
                height: 8,
                pixels: vec![128; 8 * 8 * 3],
            })
            .collect())
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

pub struct Harness {
    rt: tokio::runtime::Runtime,
    router: Router,
    seen: Seen,
    /// One case at a time: `seen` belongs to the case that holds this.
    turn: Mutex<()>,
}

pub struct Answer {
    pub status: StatusCode,
    pub headers: axum::http::HeaderMap,
    pub body: Bytes,
    /// What reached the generator, in order.
    pub generated: Vec<GenerationParams>,
}

impl Answer {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "{}: not JSON ({e}): {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }
}

pub fn harness() -> &'static Harness {
    static H: OnceLock<Harness> = OnceLock::new();
    H.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let seen: Seen = Arc::default();
        let state = app_state(&rt, seen.clone());
        Harness {
            router: rt.block_on(async { api::router(state) }),
            rt,
            seen,
            turn: Mutex::new(()),
        }
    })
}

/// The server's state over the recording generator (ready when this returns), its engine
/// started on `rt`.
pub fn app_state(rt: &tokio::runtime::Runtime, seen: Seen) -> Arc<AppState> {
    let metrics = Arc::new(Metrics::default());
    let mut cfg = EngineConfig::new(4, Duration::from_secs(60));
    // Finished jobs are kept for their TTL; thousands of cases need no more than a moment.
    cfg.job_ttl = Duration::from_secs(1);
    let engine = rt.block_on(async {
        Engine::start(
            cfg,
            Box::new(move || {
                Ok(Loaded {
                    generator: Box::new(Recorder(seen)),
                    info: ModelInfo {
                        model_version: "fuzz@0".into(),
                        default_scheduler: SchedulerKind::Pndm,
                        default_schedule: sdserve_pipeline::schedulers::SigmaSchedule::Uniform,
                        adapters: Default::default(),
                        guidance_distilled: false,
                        memory: None,
                        schedules: None,
                        limits: None,
                    },
                    taesd: None,
                    speed_probe: false,
                })
            }),
            metrics.clone(),
        )
    });
    let started = Instant::now();
    while engine.model_info().is_err() {
        assert!(started.elapsed() < Duration::from_secs(30), "never ready");
        std::thread::sleep(Duration::from_millis(5));
    }
    let security = Security::from_config(&SecurityConfig {
        body_timeout: Duration::from_secs(30),
        ..Default::default()
    })
    .unwrap();
    Arc::new(AppState {
        engine,
        cache: None,
        metrics,
        device: "cpu".into(),
        candle_device: candle_core::Device::Cpu,
        dtype: "f32".into(),
        started: Instant::now(),
        max_body_bytes: MAX_BODY,
        load_status: Default::default(),
        a1111: Default::default(),
        openai_files: Default::default(),
        security: Arc::new(security),
        adapter_dirs: Default::default(),
        models: Default::default(),
        vaes: Default::default(),
        upscalers: Default::default(),
        controlnets: Default::default(),
        ip_adapters: Default::default(),
        styles: Default::default(),
        face_restore: Default::default(),
    })
}

impl Harness {
    /// One request through the whole router; what reached the generator comes back with it.
    pub fn send(
        &self,
        method: &str,
        path: &str,
        content_type: Option<&str>,
        body: Vec<u8>,
    ) -> Answer {
        let _turn = lock(&self.turn);
        lock(&self.seen).clear();
        let mut req = Request::builder().method(method).uri(path);
        if let Some(ct) = content_type {
            req = req.header("content-type", ct);
        }
        let req = req.body(Body::from(body)).unwrap();
        let router = self.router.clone();
        let (status, headers, body) = self.rt.block_on(async move {
            let resp = tokio::time::timeout(Duration::from_secs(60), router.oneshot(req))
                .await
                .expect("answered within a minute")
                .unwrap();
            let (parts, body) = resp.into_parts();
            let body = axum::body::to_bytes(body, usize::MAX).await.unwrap();
            (parts.status, parts.headers, body)
        });
        Answer {
            status,
            headers,
            body,
            generated: std::mem::take(&mut *lock(&self.seen)),
        }
    }
}

/// Every native rule, on what reached the generator (whatever dialect it came from).
pub fn assert_native_rules(p: &GenerationParams) {
    assert_rules(p, validate::DialectRules::NATIVE)
}

/// The native rules as a dialect has them (A1111 may send an empty prompt and a clip skip up
/// to 12).
pub fn assert_rules(p: &GenerationParams, dialect: validate::DialectRules) {
    let n = p.prompt.chars().count();
    let least = usize::from(dialect.prompt == validate::PromptRule::Required);
    assert!((least..=validate::PROMPT_MAX_CHARS).contains(&n), "{p:?}");
    assert!(p.negative_prompt.chars().count() <= validate::PROMPT_MAX_CHARS);
    assert!(!p
        .prompt
        .chars()
        .any(|c| c.is_control() && !c.is_whitespace()));
    assert!(
        (1..=validate::STEPS_MAX as usize).contains(&p.steps),
        "{p:?}"
    );
    for s in [p.width, p.height] {
        assert!((256..=768).contains(&s) && s % 64 == 0, "{p:?}");
    }
    assert!(p.seed <= validate::SEED_MAX, "{p:?}");
    assert!((0.0..=30.0).contains(&p.guidance_scale), "{p:?}");
    assert!(
        (1..=validate::BATCH_MAX as usize).contains(&p.batch_size),
        "{p:?}"
    );
    assert!(
        (1..=dialect.clip_skip_max as usize).contains(&p.clip_skip),
        "{p:?}"
    );
    assert!(p.loras.len() <= validate::LORAS_MAX, "{p:?}");
    assert!(p.scheduler.is_some());
    if let Some(init) = &p.init_image {
        assert!((0.0..=1.0).contains(&init.strength), "{}", init.strength);
        // At least one step runs under the request's rule (diffusers': int(steps * strength)).
        let slice = p.step_rule.slice(p.steps, init.strength);
        assert!(slice.is_ok_and(|s| s.steps_run() >= 1), "{:?}", p.step_rule);
        let i = &init.image;
        // Resized to the request's size before it is queued (memory held per job is bounded),
        // but for A1111's inpainting, which blurs and crops at the upload's size.
        if p.a1111_inpaint.is_none() {
            assert_eq!((i.width as usize, i.height as usize), (p.width, p.height));
        }
        assert_eq!(i.pixels.len(), (i.width * i.height * 3) as usize);
        if let Some(m) = &init.mask {
            assert_eq!((m.width, m.height), (i.width, i.height));
        }
    }
}

/// The native error body: `{error, details, error_code}` (+ `fields` on a 422, each naming a
/// field and a rule). Returns the fields named.
pub fn assert_native_error(a: &Answer) -> Vec<String> {
    let j = a.json();
    let o = j.as_object().expect("an object");
    assert!(o["error"].as_str().is_some_and(|s| !s.is_empty()), "{j}");
    assert!(
        o["error_code"].as_str().is_some_and(|s| !s.is_empty()),
        "{j}"
    );
    assert!(o["details"].is_null() || o["details"].is_string(), "{j}");
    let code = o["error_code"].as_str().unwrap();
    match a.status.as_u16() {
        400 => assert_eq!(code, "invalid_json", "{j}"),
        413 => assert_eq!(code, "payload_too_large", "{j}"),
        422 => assert_eq!(code, "validation_error", "{j}"),
        s => panic!("status {s}: {j}"),
    }
    let fields: Vec<String> = o
        .get("fields")
        .and_then(Value::as_array)
        .map(|f| {
            f.iter()
                .map(|f| {
                    assert!(f["rule"].as_str().is_some_and(|r| !r.is_empty()), "{j}");
                    f["field"].as_str().unwrap().to_string()
                })
                .collect()
        })
        .unwrap_or_default();
    if a.status == 422 {
        assert!(!fields.is_empty(), "{j}");
    }
    fields
}

/// OpenAI's error body: exactly `{error: {message, type, param, code}}`, 400 for what the native
/// API answers 422, with `x-should-retry: false`. Returns `param`.
pub fn assert_openai_error(a: &Answer) -> Option<String> {
    let j = a.json();
    let o = j.as_object().expect("an object");
    assert_eq!(o.keys().collect::<Vec<_>>(), ["error"], "{j}");
    let e = o["error"].as_object().expect("error is an object");
    let mut keys: Vec<&str> = e.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["code", "message", "param", "type"], "{j}");
    assert!(e["message"].as_str().is_some_and(|s| !s.is_empty()), "{j}");
    let code = e["code"].as_str().expect("code");
    match a.status.as_u16() {
        400 => {
            assert!(matches!(code, "invalid_json" | "validation_error"), "{j}");
            assert_eq!(e["type"], "invalid_request_error", "{j}");
            assert_eq!(a.headers["x-should-retry"], "false", "{j}");
        }
        413 => assert_eq!(code, "payload_too_large", "{j}"),
        s => panic!("status {s}: {j}"),
    }
    if code == "validation_error" {
        assert!(e["param"].is_string(), "{j}");
    }
    e["param"].as_str().map(str::to_string)
}
